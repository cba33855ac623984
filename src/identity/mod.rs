//! Client identity (spec §4): which pipeline is asking. Without `[[clients]]` every connection is
//! `anonymous`. With clients, a request identifies itself by `Proxy-Authorization: Basic
//! base64(name:token)` (what curl, git, pip, npm and cargo send for
//! `HTTP_PROXY=http://name:token@host:port`), compared in constant time, by coming from a
//! client's `networks`, or by its CI's OIDC token ([`oidc`]: `Proxy-Authorization: Bearer <JWT>`,
//! or the JWT as the Basic password); anything else is 407.
//!
//! OIDC tokens need the issuer's keys, which the proxy may have to fetch: [`Clients::identify`]
//! hands such a token back ([`Presented::Oidc`]) for the proxy's key cache, and
//! [`Clients::identify_oidc`] finishes with the keys. Verified tokens are remembered by their
//! SHA-256 until they expire, so a build's thousand requests verify once.

pub mod oidc;

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use http::HeaderValue;
use ipnet::IpNet;
use ring::digest::{digest, SHA256};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::config::OidcClient;
use crate::policy::Mode;
use oidc::{Claims, OidcFailure};

/// The name of every connection when no clients are configured.
pub const ANONYMOUS: &str = "anonymous";
/// The metric label of requests that failed to identify.
pub const UNAUTHENTICATED: &str = "unauthenticated";

struct Known {
    name: Arc<str>,
    token_digest: Option<[u8; 32]>,
    networks: Vec<IpNet>,
    mode: Option<Mode>,
    oidc: Option<OidcClient>,
}

/// How many verified OIDC tokens are remembered.
const VERIFIED_CAPACITY: usize = 10_000;

/// A verified OIDC token: who it is, until when.
#[derive(Clone)]
struct Verified {
    identity: Identity,
    exp: u64,
}

/// The configured clients, ready to identify requests.
pub struct Clients {
    known: Vec<Known>,
    anonymous: Arc<str>,
    unauthenticated: Arc<str>,
    default_mode: Mode,
    /// Verified OIDC tokens by SHA-256 (this snapshot's clients only: a reload starts afresh).
    verified: quick_cache::sync::Cache<[u8; 32], Verified>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("count", &self.known.len())
            .finish_non_exhaustive()
    }
}

/// Who a request is, and the policy mode that applies to it.
#[derive(Clone)]
pub struct Identity {
    /// Client name (`anonymous` without clients); shared, so identifying allocates nothing.
    pub name: Arc<str>,
    /// `policy.mode`, or the client's own `mode`.
    pub mode: Mode,
    /// An OIDC client's token `sub` (audited).
    pub subject: Option<Arc<str>>,
    /// An OIDC client's verified claims (claim templates render from them).
    pub claims: Option<Arc<Claims>>,
    /// An OIDC client's token, to be masked wherever else the client sends it (a header, a
    /// query): the audit and the masker never saw it otherwise.
    pub token: Option<Arc<crate::credentials::Echoes>>,
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.mode == other.mode
            && self.subject == other.subject
            && self.claims == other.claims
    }
}

impl Eq for Identity {}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// What a request presented: an identity settled now, or an OIDC token to verify with its
/// issuer's keys ([`Clients::identify_oidc`]).
#[derive(Debug)]
pub enum Presented {
    /// Identified (token, networks, a remembered OIDC token, or no clients configured).
    Identified(Identity),
    /// An OIDC token not seen before; its issuer is configured.
    Oidc(oidc::Pending),
}

/// Why a request could not be identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No credentials, and the source address is in no client's networks.
    #[error("proxy credentials required")]
    Missing,
    /// Credentials were sent but do not match a client (named, if the name is a client's).
    #[error("wrong proxy credentials")]
    Wrong {
        /// The claimed client, when it is a configured one (for the metric label).
        claimed: Option<String>,
    },
    /// An OIDC token was presented and not accepted.
    #[error("{failure}")]
    Oidc {
        /// The configured issuer it named, else `unconfigured` (the metric label).
        issuer: Arc<str>,
        /// Why.
        failure: OidcFailure,
    },
}

impl AuthFailure {
    /// What the 407 says: the reason, and how to identify for token clients.
    pub fn details(&self) -> String {
        match self {
            Self::Oidc { .. } => self.to_string(),
            _ => format!("{self}: use HTTP_PROXY=http://NAME:TOKEN@proxy:port"),
        }
    }

    /// Bounded metric label: the claimed configured client, else `unknown`.
    pub fn label(&self) -> &str {
        match self {
            Self::Wrong {
                claimed: Some(name),
            } => name,
            _ => "unknown",
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

impl Clients {
    /// Compiles the clients of `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            known: config
                .clients
                .iter()
                .map(|c| Known {
                    name: Arc::from(c.name.as_str()),
                    token_digest: c.token.as_ref().map(|t| sha256(t.expose().as_bytes())),
                    networks: c.networks.clone(),
                    mode: c.mode,
                    oidc: c.oidc.clone(),
                })
                .collect(),
            anonymous: Arc::from(ANONYMOUS),
            unauthenticated: Arc::from(UNAUTHENTICATED),
            default_mode: config.mode,
            verified: quick_cache::sync::Cache::new(VERIFIED_CAPACITY),
        }
    }

    /// The configured OIDC issuers (each once, in file order): the `issuer` label values of
    /// `portcullis_oidc_verifications_total`.
    pub fn oidc_issuers(&self) -> Vec<Arc<str>> {
        let mut issuers: Vec<Arc<str>> = Vec::new();
        for k in &self.known {
            if let Some(o) = &k.oidc {
                if !issuers.contains(&o.issuer) {
                    issuers.push(o.issuer.clone());
                }
            }
        }
        issuers
    }

    /// The keys configured for `issuer` in a `jwks_file` (the first client of it that has one).
    pub fn jwks_file_keys(&self, issuer: &str) -> Option<Arc<jsonwebtoken::jwk::JwkSet>> {
        self.known
            .iter()
            .filter_map(|k| k.oidc.as_ref())
            .find(|o| &*o.issuer == issuer && o.jwks.is_some())
            .and_then(|o| o.jwks.clone())
    }

    fn identity(&self, k: &Known) -> Identity {
        Identity {
            name: k.name.clone(),
            mode: k.mode.unwrap_or(self.default_mode),
            subject: None,
            claims: None,
            token: None,
        }
    }

    /// A connection identified by its source address alone (transparent mode, spec §11): the
    /// client whose `networks` hold it, else `anonymous`.
    pub fn by_network(&self, source: IpAddr) -> Identity {
        let source = match source {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
            v4 => v4,
        };
        self.known
            .iter()
            .find(|k| k.networks.iter().any(|n| n.contains(&source)))
            .map_or_else(
                || Identity {
                    name: self.anonymous.clone(),
                    mode: self.default_mode,
                    subject: None,
                    claims: None,
                    token: None,
                },
                |k| self.identity(k),
            )
    }

    /// Reads an OIDC token: remembered (identified now), or pending verification — or refused
    /// when it is malformed or names an issuer no client has.
    fn present_oidc(&self, raw: &str) -> Result<Presented, AuthFailure> {
        let digest = sha256(raw.as_bytes());
        if let Some(seen) = self.verified.get(&digest) {
            if now_unix() <= seen.exp + oidc::LEEWAY_SECONDS {
                return Ok(Presented::Identified(seen.identity));
            }
            self.verified.remove(&digest);
        }
        let unconfigured = |failure| AuthFailure::Oidc {
            issuer: Arc::from(UNCONFIGURED),
            failure,
        };
        let token = oidc::parse(raw).map_err(unconfigured)?;
        let issuer = self
            .oidc_issuers()
            .into_iter()
            .find(|i| **i == *token.iss)
            .ok_or_else(|| unconfigured(OidcFailure::Issuer(token.iss.clone())))?;
        Ok(Presented::Oidc(oidc::Pending {
            token: zeroize::Zeroizing::new(raw.to_owned()),
            digest,
            issuer,
            alg: token.alg,
            kid: token.kid,
        }))
    }

    /// Finishes an OIDC identification with the issuer's keys: verifies the token, chooses the
    /// first client whose audience and claims match, and remembers the result until `exp`.
    pub fn identify_oidc(
        &self,
        pending: &oidc::Pending,
        keys: &jsonwebtoken::jwk::JwkSet,
    ) -> Result<Identity, AuthFailure> {
        let fail = |failure| AuthFailure::Oidc {
            issuer: pending.issuer.clone(),
            failure,
        };
        let token = pending.unverified();
        let candidates = oidc::candidates(keys, &token);
        if candidates.is_empty() {
            return Err(fail(OidcFailure::NoKey {
                issuer: pending.issuer.to_string(),
                kid: pending.kid.clone().unwrap_or_else(|| "none".into()),
            }));
        }
        let mut last = OidcFailure::Signature;
        let mut claims = None;
        for key in candidates {
            match oidc::verify(&token, key, &pending.issuer) {
                Ok(verified) => {
                    claims = Some(verified);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let claims = claims.ok_or_else(|| fail(last))?;
        let of_issuer = self
            .known
            .iter()
            .enumerate()
            .filter_map(|(i, k)| k.oidc.as_ref().map(|o| (i, o)))
            .filter(|(_, o)| o.issuer == pending.issuer);
        let index = oidc::choose(of_issuer, &claims).map_err(fail)?;
        let Some(k) = self.known.get(index) else {
            return Err(fail(OidcFailure::NoClient));
        };
        let exp = oidc::expiry(&claims);
        let identity = Identity {
            subject: oidc::subject(&claims),
            claims: Some(Arc::new(claims)),
            token: crate::credentials::Echoes::new(&[pending.token.as_bytes()]).map(Arc::new),
            ..self.identity(k)
        };
        self.verified.insert(
            pending.digest,
            Verified {
                identity: identity.clone(),
                exp,
            },
        );
        Ok(identity)
    }

    /// The name a request has until it is identified (shared: naming it allocates nothing).
    pub fn unauthenticated(&self) -> &Arc<str> {
        &self.unauthenticated
    }

    /// Identifies a request from its `Proxy-Authorization` header and source address. An OIDC
    /// token not seen before comes back as [`Presented::Oidc`], to be verified with its issuer's
    /// keys.
    pub fn identify(
        &self,
        proxy_authorization: Option<&HeaderValue>,
        source: IpAddr,
    ) -> Result<Presented, AuthFailure> {
        if self.known.is_empty() {
            return Ok(Presented::Identified(Identity {
                name: self.anonymous.clone(),
                mode: self.default_mode,
                subject: None,
                claims: None,
                token: None,
            }));
        }
        let identified = |k: &Known| Presented::Identified(self.identity(k));
        if let Some(header) = proxy_authorization {
            if let Some(jwt) = parse_bearer(header) {
                return self.present_oidc(jwt);
            }
            let (name, token) = parse_basic(header).ok_or(AuthFailure::Wrong { claimed: None })?;
            // A password of a JWS's form naming a configured issuer is an OIDC token (spec §4).
            if oidc::looks_like_jws(&token)
                && oidc::parse(&token)
                    .is_ok_and(|t| self.oidc_issuers().iter().any(|i| **i == *t.iss))
            {
                return self.present_oidc(&token);
            }
            let given = sha256(token.as_bytes());
            // Compare against every client with a token, so timing says nothing about which
            // names exist or how much of a token matched.
            let mut matched = None;
            for k in &self.known {
                if let Some(want) = &k.token_digest {
                    let same = want.ct_eq(&given) & k.name.as_bytes().ct_eq(name.as_bytes());
                    if bool::from(same) {
                        matched = Some(k);
                    }
                }
            }
            return match matched {
                Some(k) => Ok(identified(k)),
                None => Err(AuthFailure::Wrong {
                    claimed: self
                        .known
                        .iter()
                        .find(|k| *k.name == *name)
                        .map(|k| k.name.to_string()),
                }),
            };
        }
        let source = match source {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
            v4 => v4,
        };
        self.known
            .iter()
            .find(|k| k.networks.iter().any(|n| n.contains(&source)))
            .map(identified)
            .ok_or(AuthFailure::Missing)
    }
}

/// The `issuer` label of a token that names no configured issuer (or none readable).
pub const UNCONFIGURED: &str = "unconfigured";

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `Bearer <token>` → the token.
fn parse_bearer(header: &HeaderValue) -> Option<&str> {
    let text = header.to_str().ok()?;
    let (scheme, token) = text.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Refused credentials shorter than this are not masked elsewhere in the event: the audit line
/// is scrubbed whole, and a short string would also match ordinary text in it.
pub const MIN_MASKED_REFUSED_BYTES: usize = 12;

/// The secret part of a `Proxy-Authorization` that was refused (a bearer token, or a Basic
/// pair's password), so that it can be masked wherever else the request repeats it. `None` when
/// there is none, or it is shorter than [`MIN_MASKED_REFUSED_BYTES`].
pub fn refused_secret(header: &HeaderValue) -> Option<zeroize::Zeroizing<String>> {
    let secret = match parse_bearer(header) {
        Some(token) => zeroize::Zeroizing::new(token.to_owned()),
        None => parse_basic(header)?.1,
    };
    (secret.len() >= MIN_MASKED_REFUSED_BYTES).then_some(secret)
}

/// `Basic base64(name:token)` → (name, token).
fn parse_basic(header: &HeaderValue) -> Option<(String, zeroize::Zeroizing<String>)> {
    let text = header.to_str().ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?,
    );
    let pair = std::str::from_utf8(&decoded).ok()?;
    let (name, token) = pair.split_once(':')?;
    Some((name.to_owned(), zeroize::Zeroizing::new(token.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_bearer_token_or_basic_password_is_its_secret_when_long_enough() {
        let header = |s: &str| HeaderValue::from_str(s).unwrap();
        let basic = |pair: &str| {
            header(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            ))
        };
        let secret = |h: &HeaderValue| refused_secret(h).map(|s| s.as_str().to_owned());
        assert_eq!(
            secret(&header("Bearer eyJhbGciOi.eyJzdWIi.c2ln")).as_deref(),
            Some("eyJhbGciOi.eyJzdWIi.c2ln")
        );
        assert_eq!(
            secret(&basic("ci:old-rotated-token")).as_deref(),
            Some("old-rotated-token")
        );
        assert_eq!(secret(&basic("ci:short")), None, "under the minimum");
        assert_eq!(secret(&header("Bearer abc")), None);
        assert_eq!(secret(&header("Digest whatever-this-is-long")), None);
        assert_eq!(secret(&header("Basic %%%not-base64%%%")), None);
    }
    use crate::config::{parse, Origin};

    /// `identify`, for requests that present no OIDC token.
    fn known(
        c: &Clients,
        header: Option<&HeaderValue>,
        source: IpAddr,
    ) -> Result<Identity, AuthFailure> {
        match c.identify(header, source)? {
            Presented::Identified(identity) => Ok(identity),
            Presented::Oidc(p) => panic!("not an OIDC token: {p:?}"),
        }
    }

    fn clients(extra: &str) -> Clients {
        let text = format!(
            "[[clients]]\nname = \"frontend\"\ntoken = {{ value = \"fe-token\" }}\n[[clients]]\nname = \"release\"\ntoken = {{ value = \"rel-token\" }}\nmode = \"report\"\n[[clients]]\nname = \"runners\"\nnetworks = [\"10.1.0.0/16\"]\n{extra}"
        );
        Clients::new(&parse(&text, Origin::Embedded, std::path::Path::new("."), false).unwrap())
    }

    fn basic(pair: &str) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        ))
        .unwrap()
    }

    const OUTSIDE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn tokens_identify_their_client_and_mode() {
        let c = clients("");
        let fe = known(&c, Some(&basic("frontend:fe-token")), OUTSIDE).unwrap();
        assert_eq!(
            fe,
            Identity {
                name: "frontend".into(),
                mode: Mode::Enforce,
                subject: None,
                claims: None,
                token: None,
            }
        );
        let rel = known(&c, Some(&basic("release:rel-token")), OUTSIDE).unwrap();
        assert_eq!(rel.mode, Mode::Report);
    }

    #[test]
    fn wrong_or_swapped_tokens_fail() {
        let c = clients("");
        for pair in [
            "frontend:rel-token",
            "frontend:fe-tokenX",
            "nobody:fe-token",
            "frontend",
            ":",
        ] {
            assert!(known(&c, Some(&basic(pair)), OUTSIDE).is_err(), "{pair}");
        }
        assert_eq!(
            known(&c, Some(&basic("frontend:nope")), OUTSIDE)
                .unwrap_err()
                .label(),
            "frontend"
        );
        assert_eq!(
            known(&c, Some(&basic("intruder:nope")), OUTSIDE)
                .unwrap_err()
                .label(),
            "unknown"
        );
        let bearer = HeaderValue::from_static("Bearer fe-token");
        assert!(known(&c, Some(&bearer), OUTSIDE).is_err());
    }

    #[test]
    fn networks_identify_without_a_token() {
        let c = clients("");
        let inside: IpAddr = "10.1.4.5".parse().unwrap();
        assert_eq!(&*known(&c, None, inside).unwrap().name, "runners");
        let mapped: IpAddr = "::ffff:10.1.4.5".parse().unwrap();
        assert_eq!(&*known(&c, None, mapped).unwrap().name, "runners");
        assert_eq!(known(&c, None, OUTSIDE), Err(AuthFailure::Missing));
    }

    #[test]
    fn no_clients_means_anonymous() {
        let c =
            Clients::new(&parse("", Origin::Embedded, std::path::Path::new("."), false).unwrap());
        assert_eq!(&*known(&c, None, OUTSIDE).unwrap().name, ANONYMOUS);
    }
}
