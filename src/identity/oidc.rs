//! OIDC tokens (spec §4): reading a token's unverified header and issuer, verifying it against
//! one of the issuer's keys, and matching its claims against the configured clients. Pure: the
//! keys come from the caller (a `jwks_file`, or the proxy's key cache, which fetches discovery
//! documents); nothing here does I/O.
//!
//! The algorithm is the key's, never the token's: an RSA key verifies RS256, a P-256 key ES256,
//! an Ed25519 key EdDSA; a token whose header names another algorithm (`none`, `HS256`, …) is
//! refused before any verification. Signatures, `exp`, `nbf` (60 s leeway) and `iss` are checked
//! by `jsonwebtoken`; the audience and claims here, per client.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::OidcClient;

/// Leeway on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 60;

/// Claims of a verified token.
pub type Claims = Map<String, Value>;

/// Why a token was not accepted. The text is the 407's `details`; it never holds the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcFailure {
    /// Not a JWS in compact form, or its header or payload is not JSON.
    #[error("malformed OIDC token")]
    Malformed,
    /// The token's `iss` is not a configured issuer.
    #[error("OIDC token issuer {0:?} is not a configured issuer")]
    Issuer(String),
    /// The header names an algorithm that is never accepted, or not the key's.
    #[error("OIDC token algorithm {0} is not accepted")]
    Algorithm(String),
    /// No key of the issuer has the token's `kid` (after a refetch, where one was allowed).
    #[error("no key of issuer {issuer} matches the OIDC token (kid {kid})")]
    NoKey {
        /// The issuer.
        issuer: String,
        /// The token's `kid`, or `none`.
        kid: String,
    },
    /// The issuer's keys could not be obtained.
    #[error("keys of issuer {issuer} are unavailable: {why}")]
    KeysUnavailable {
        /// The issuer.
        issuer: String,
        /// What failed (a status, a fixed reason).
        why: String,
    },
    /// The signature does not verify.
    #[error("OIDC token signature does not verify")]
    Signature,
    /// `exp` has passed.
    #[error("OIDC token expired")]
    Expired,
    /// `nbf` is still ahead.
    #[error("OIDC token not yet valid")]
    NotYetValid,
    /// No client of the issuer accepts the token's `aud`.
    #[error("OIDC token audience fits no client of its issuer")]
    Audience,
    /// The audience fits, the claims do not.
    #[error("no client matches the token's claims")]
    NoClient,
}

impl OidcFailure {
    /// The `result` label of `portcullis_oidc_verifications_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Issuer(_) => "issuer",
            Self::Algorithm(_) | Self::NoKey { .. } | Self::KeysUnavailable { .. } => "signature",
            Self::Signature => "signature",
            Self::Expired | Self::NotYetValid => "expired",
            Self::Audience => "audience",
            Self::NoClient => "no_client",
        }
    }
}

/// A token as received, before verification: its header's algorithm and key id, and the issuer
/// its payload names (trusted for nothing but choosing the issuer's keys).
#[derive(Debug)]
pub struct Unverified<'t> {
    /// The compact JWS.
    pub raw: &'t str,
    /// The header's `alg`, as written.
    pub alg: String,
    /// The header's `kid`.
    pub kid: Option<String>,
    /// The payload's `iss`.
    pub iss: String,
}

/// An OIDC token waiting for its issuer's keys (the issuer is a configured one). The token is
/// zeroized when dropped and never printed.
pub struct Pending {
    /// The token.
    pub token: zeroize::Zeroizing<String>,
    /// Its SHA-256 (the verified-token cache's key).
    pub digest: [u8; 32],
    /// The configured issuer its `iss` names.
    pub issuer: Arc<str>,
    /// The header's `alg`.
    pub alg: String,
    /// The header's `kid`.
    pub kid: Option<String>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// The token as [`verify`] takes it.
    pub fn unverified(&self) -> Unverified<'_> {
        Unverified {
            raw: &self.token,
            alg: self.alg.clone(),
            kid: self.kid.clone(),
            iss: self.issuer.to_string(),
        }
    }
}

/// Whether `text` has the form of a compact JWS: three dot-separated base64url parts, the first
/// two non-empty. (A Basic password of this form may be an OIDC token.)
pub fn looks_like_jws(text: &str) -> bool {
    let mut parts = 0;
    for (i, part) in text.split('.').enumerate() {
        parts += 1;
        let b64url = part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !b64url || (i < 2 && part.is_empty()) {
            return false;
        }
    }
    parts == 3
}

/// Reads a token's header and unverified issuer.
pub fn parse(raw: &str) -> Result<Unverified<'_>, OidcFailure> {
    if !looks_like_jws(raw) {
        return Err(OidcFailure::Malformed);
    }
    let mut parts = raw.split('.');
    let json = |part: Option<&str>| -> Result<Map<String, Value>, OidcFailure> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.unwrap_or_default())
            .map_err(|_| OidcFailure::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| OidcFailure::Malformed)
    };
    let header = json(parts.next())?;
    let payload = json(parts.next())?;
    let text = |map: &Map<String, Value>, key: &str| {
        map.get(key).and_then(Value::as_str).map(str::to_owned)
    };
    Ok(Unverified {
        raw,
        alg: text(&header, "alg").ok_or(OidcFailure::Malformed)?,
        kid: text(&header, "kid"),
        iss: text(&payload, "iss").ok_or(OidcFailure::Malformed)?,
    })
}

/// The algorithm a key verifies, from the key itself: RS256 for RSA, ES256 for P-256, EdDSA for
/// Ed25519. Other keys (HMAC secrets, other curves) verify nothing.
fn key_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Some(Algorithm::EdDSA)
        }
        _ => None,
    }
}

/// The keys of `set` that could have signed `token`: the one with its `kid`, or — for a token
/// without one — every key whose algorithm is the token's.
pub fn candidates<'k>(set: &'k JwkSet, token: &Unverified<'_>) -> Vec<&'k Jwk> {
    set.keys
        .iter()
        .filter(|k| key_algorithm(k).is_some())
        .filter(|k| match &token.kid {
            Some(kid) => k.common.key_id.as_deref() == Some(kid.as_str()),
            None => true,
        })
        .collect()
}

/// Verifies `token` with `key` for `issuer`: the header's algorithm must be the key's; then the
/// signature, `iss`, `exp` (required) and `nbf`, with [`LEEWAY_SECONDS`].
pub fn verify(token: &Unverified<'_>, key: &Jwk, issuer: &str) -> Result<Claims, OidcFailure> {
    let algorithm = key_algorithm(key).ok_or(OidcFailure::Signature)?;
    let accepted = matches!(token.alg.as_str(), "RS256" | "ES256" | "EdDSA");
    if !accepted || token.alg != format!("{algorithm:?}") {
        return Err(OidcFailure::Algorithm(token.alg.clone()));
    }
    let decoding = DecodingKey::from_jwk(key).map_err(|_| OidcFailure::Signature)?;
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_nbf = true;
    // The audience is matched per client (clients of one issuer may want different ones).
    validation.validate_aud = false;
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["exp", "iss"]);
    use jsonwebtoken::errors::ErrorKind as K;
    jsonwebtoken::decode::<Claims>(token.raw, &decoding, &validation)
        .map(|data| data.claims)
        .map_err(|e| match e.kind() {
            K::ExpiredSignature => OidcFailure::Expired,
            K::ImmatureSignature => OidcFailure::NotYetValid,
            K::InvalidIssuer => OidcFailure::Issuer(token.iss.clone()),
            K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => {
                OidcFailure::Algorithm(token.alg.clone())
            }
            K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidEddsaKey | K::InvalidRsaKey(_) => {
                OidcFailure::Signature
            }
            _ => OidcFailure::Malformed,
        })
}

/// Whether the token's `aud` (a string or an array) contains `audience`.
pub fn audience_fits(claims: &Claims, audience: &str) -> bool {
    match claims.get("aud") {
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    }
}

/// A claim's text for matching: a string as it is, a number or boolean as its JSON text.
fn claim_texts(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Number(_) | Value::Bool(_) => vec![value.to_string()],
        Value::Array(items) => items
            .iter()
            .filter(|v| !v.is_array())
            .flat_map(claim_texts)
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether every configured claim of `client` matches the token's (an array claim matches when
/// one element does).
pub fn claims_match(client: &OidcClient, claims: &Claims) -> bool {
    client.claims.iter().all(|(name, pattern)| {
        claims
            .get(name)
            .is_some_and(|value| claim_texts(value).iter().any(|t| pattern.matches(t)))
    })
}

/// The first of `clients` (in file order, with their index) whose audience and claims the
/// token's claims satisfy: [`OidcFailure::Audience`] when no client's audience fits,
/// [`OidcFailure::NoClient`] when one's does but no client's claims match.
pub fn choose<'c, I>(clients: I, claims: &Claims) -> Result<usize, OidcFailure>
where
    I: IntoIterator<Item = (usize, &'c OidcClient)>,
{
    let mut audience_fit = false;
    for (index, client) in clients {
        if !audience_fits(claims, &client.audience) {
            continue;
        }
        audience_fit = true;
        if claims_match(client, claims) {
            return Ok(index);
        }
    }
    Err(match audience_fit {
        true => OidcFailure::NoClient,
        false => OidcFailure::Audience,
    })
}

/// The token's `sub`, for the audit.
pub fn subject(claims: &Claims) -> Option<Arc<str>> {
    claims.get("sub").and_then(Value::as_str).map(Arc::from)
}

/// The token's `exp` (seconds since the epoch), which bounds how long a verification is reused.
pub fn expiry(claims: &Claims) -> u64 {
    claims.get("exp").and_then(Value::as_u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClaimPattern;

    #[test]
    fn every_failure_label_is_exported() {
        let failures = [
            OidcFailure::Malformed,
            OidcFailure::Issuer("x".into()),
            OidcFailure::Algorithm("none".into()),
            OidcFailure::Signature,
            OidcFailure::Expired,
            OidcFailure::NotYetValid,
            OidcFailure::Audience,
            OidcFailure::NoClient,
        ];
        for f in failures {
            assert!(crate::telemetry::OIDC_RESULTS.contains(&f.label()), "{f}");
        }
    }

    fn b64(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn jws_form_and_unverified_fields() {
        assert!(looks_like_jws("a.b.c"));
        assert!(looks_like_jws("a.b."), "an unsigned token has the form");
        for not in ["a.b", "a.b.c.d", ".b.c", "a..c", "a.b+/.c", "plain-token"] {
            assert!(!looks_like_jws(not), "{not}");
        }
        let token = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256","kid":"k1"}"#),
            b64(r#"{"iss":"https://issuer.example","sub":"x"}"#)
        );
        let t = parse(&token).unwrap();
        assert_eq!((t.alg.as_str(), t.kid.as_deref()), ("RS256", Some("k1")));
        assert_eq!(t.iss, "https://issuer.example");
        let garbage = format!("{}.{}.sig", b64("not json"), b64("{}"));
        assert_eq!(parse(&garbage).unwrap_err(), OidcFailure::Malformed);
    }

    #[test]
    fn only_the_keys_algorithm_is_accepted() {
        let rsa: Jwk = serde_json::from_str(
            r#"{"kty":"RSA","kid":"k1","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"}"#,
        )
        .unwrap();
        let set = JwkSet { keys: vec![rsa] };
        for alg in ["none", "HS256", "ES256"] {
            let token = format!(
                "{}.{}.",
                b64(&format!(r#"{{"alg":"{alg}","kid":"k1"}}"#)),
                b64(r#"{"iss":"https://i","exp":9999999999}"#)
            );
            let t = parse(&token).unwrap();
            let keys = candidates(&set, &t);
            assert_eq!(keys.len(), 1);
            assert_eq!(
                verify(&t, keys[0], "https://i").unwrap_err(),
                OidcFailure::Algorithm(alg.into()),
                "{alg}"
            );
        }
        // Another kid: no candidate.
        let other = format!(
            "{}.{}.x",
            b64(r#"{"alg":"RS256","kid":"k2"}"#),
            b64(r#"{"iss":"https://i"}"#)
        );
        assert!(candidates(&set, &parse(&other).unwrap()).is_empty());
    }

    fn client(audience: &str, claims: &[(&str, &str)]) -> OidcClient {
        OidcClient {
            issuer: Arc::from("https://i"),
            audience: audience.into(),
            claims: claims
                .iter()
                .map(|(k, v)| ((*k).to_owned(), ClaimPattern::new(v).unwrap()))
                .collect(),
            jwks: None,
        }
    }

    #[test]
    fn clients_are_chosen_by_audience_then_claims_in_order() {
        let main = client(
            "portcullis",
            &[("repository", "acme/app"), ("ref", "refs/heads/main")],
        );
        let org = client("portcullis", &[("repository", "acme/*")]);
        let ids = client("other", &[("repository_id", "42"), ("fork", "false")]);
        let clients = [main, org, ids];
        let pick = |json: &str| {
            let claims: Claims = serde_json::from_str(json).unwrap();
            choose(clients.iter().enumerate(), &claims)
        };
        assert_eq!(
            pick(r#"{"aud":"portcullis","repository":"acme/app","ref":"refs/heads/main"}"#),
            Ok(0)
        );
        assert_eq!(
            pick(r#"{"aud":["x","portcullis"],"repository":"acme/app","ref":"refs/heads/dev"}"#),
            Ok(1)
        );
        // `*` spans `/`; the glob covers the whole string.
        assert_eq!(
            pick(r#"{"aud":"portcullis","repository":"acme/tools/x"}"#),
            Ok(1)
        );
        assert_eq!(
            pick(r#"{"aud":"portcullis","repository":"other/acme/app"}"#),
            Err(OidcFailure::NoClient)
        );
        assert_eq!(
            pick(r#"{"aud":"nobody","repository":"acme/app"}"#),
            Err(OidcFailure::Audience)
        );
        // Numbers and booleans compare by their JSON text.
        assert_eq!(
            pick(r#"{"aud":"other","repository_id":42,"fork":false}"#),
            Ok(2)
        );
        assert_eq!(
            pick(r#"{"aud":"other","repository_id":"42","fork":true}"#),
            Err(OidcFailure::NoClient)
        );
        // Only `*` is special.
        let literal = client("a", &[("ref", "refs/heads/[ma]in?")]);
        let claims: Claims = serde_json::from_str(r#"{"aud":"a","ref":"refs/heads/m"}"#).unwrap();
        assert!(!claims_match(&literal, &claims));
    }
}
