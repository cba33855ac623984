//! The `oauth2` kind (spec §10): an OAuth 2.0 client-credentials grant (RFC 6749 §4.4). This
//! module holds its configuration, builds the token request and reads the token answer; the
//! proxy's token cache (`proxy::minted`) decides when to mint and sends the request on the
//! proxy's own pooled clients.
//!
//! The client secret leaves this module only inside the token request (a Basic header marked
//! sensitive, or the form body).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{HeaderValue, Uri};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{CredentialError, Secret, SecretSource};

/// Default `refresh_before_seconds`.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(60);

/// The lifetime of a token whose answer names none.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// The longest lifetime believed (a larger `expires_in` is cut to it).
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// `client_secret_basic`: `Authorization: Basic base64(id:secret)` (the default).
    #[default]
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post,
}

/// `oauth2 = { … }` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Spec {
    /// The token endpoint (`http://` or `https://`).
    pub token_url: String,
    /// The client id (not secret).
    pub client_id: String,
    /// The client secret.
    pub client_secret: SecretSource,
    /// Scopes, sent space-joined as `scope`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `audience` form parameter.
    #[serde(default)]
    pub audience: Option<String>,
    /// `basic` (default) or `post`.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// More form parameters.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
    /// Refresh this long before expiry (default 60; at most half the lifetime).
    #[serde(default)]
    pub refresh_before_seconds: Option<u64>,
}

/// A resolved `oauth2` credential: everything needed to mint. Compared whole (secret included)
/// to decide whether a reload keeps its cached token.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuth2 {
    /// The credential's name.
    pub name: Arc<str>,
    /// The token endpoint.
    pub token_url: Uri,
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: Secret,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Audience.
    pub audience: Option<String>,
    /// Client authentication method.
    pub client_auth: ClientAuth,
    /// Extra form parameters.
    pub extra: BTreeMap<String, String>,
    /// `refresh_before_seconds`.
    pub refresh_before: Duration,
}

impl fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2")
            .field("name", &self.name)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// The token endpoint's answer was unusable. Never carries anything from the answer's body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenAnswerError {
    /// Not a JSON object with a string `access_token`.
    #[error("the token endpoint's answer has no access_token")]
    NoToken,
    /// The token cannot go into a header.
    #[error("the token endpoint's access_token cannot be sent in an HTTP header")]
    NotHeaderSafe,
}

/// A token as answered: the value and its lifetime.
pub struct TokenAnswer {
    /// `access_token`.
    pub token: Zeroizing<String>,
    /// `expires_in` (or [`DEFAULT_LIFETIME`]).
    pub lifetime: Duration,
}

impl OAuth2 {
    /// Checks `spec` without reading its secret (`token_url` must be an absolute http(s) URL).
    pub fn check(spec: &OAuth2Spec) -> Result<Uri, CredentialError> {
        let uri = super::endpoint_url(&spec.token_url)
            .ok_or_else(|| CredentialError::TokenUrl(spec.token_url.clone()))?;
        if spec.client_id.contains(':') || spec.client_id.bytes().any(|b| b.is_ascii_control()) {
            return Err(CredentialError::NotHeaderSafe("oauth2.client_id"));
        }
        super::check_templates(spec.scopes.iter().chain(&spec.audience))?;
        Ok(uri)
    }

    /// Resolves `spec`'s client secret.
    pub fn build(name: &str, spec: &OAuth2Spec, base: &Path) -> Result<Self, CredentialError> {
        let token_url = Self::check(spec)?;
        let client_secret = spec.client_secret.resolve(base)?;
        Ok(Self {
            name: Arc::from(name),
            token_url,
            client_id: spec.client_id.clone(),
            client_secret,
            scopes: spec.scopes.clone(),
            audience: spec.audience.clone(),
            client_auth: spec.client_auth,
            extra: spec.extra.clone(),
            refresh_before: spec
                .refresh_before_seconds
                .map_or(DEFAULT_REFRESH_BEFORE, Duration::from_secs),
        })
    }

    /// The token request: its form body and, for `client_secret_basic`, its `Authorization`.
    pub fn request_parts(&self) -> (Zeroizing<String>, Option<HeaderValue>) {
        let mut pairs: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        let scope = self.scopes.join(" ");
        if !scope.is_empty() {
            pairs.push(("scope", &scope));
        }
        if let Some(audience) = &self.audience {
            pairs.push(("audience", audience));
        }
        for (k, v) in &self.extra {
            pairs.push((k, v));
        }
        let auth = match self.client_auth {
            ClientAuth::Post => {
                pairs.push(("client_id", &self.client_id));
                pairs.push(("client_secret", self.client_secret.expose()));
                None
            }
            ClientAuth::Basic => {
                // RFC 6749 §2.3.1: id and secret are form-encoded before the Basic encoding.
                let pair = Zeroizing::new(format!(
                    "{}:{}",
                    form_encode(&self.client_id),
                    form_encode(self.client_secret.expose())
                ));
                let encoded = Zeroizing::new(
                    base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()),
                );
                let text = Zeroizing::new(format!("Basic {}", encoded.as_str()));
                HeaderValue::from_str(&text).ok().map(|mut v| {
                    v.set_sensitive(true);
                    v
                })
            }
        };
        let mut body = Zeroizing::new(String::new());
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 {
                body.push('&');
            }
            body.push_str(&form_encode(k));
            body.push('=');
            let value = Zeroizing::new(form_encode(v));
            body.push_str(&value);
        }
        (body, auth)
    }

    /// Reads a successful token answer.
    pub fn parse_answer(body: &[u8]) -> Result<TokenAnswer, TokenAnswerError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|_| TokenAnswerError::NoToken)?;
        let token = value
            .get("access_token")
            .and_then(serde_json::Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| Zeroizing::new(t.to_owned()))
            .ok_or(TokenAnswerError::NoToken)?;
        if token.bytes().any(|b| b.is_ascii_control() || !b.is_ascii()) {
            return Err(TokenAnswerError::NotHeaderSafe);
        }
        let lifetime = match value.get("expires_in") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(Duration::from_secs),
            Some(serde_json::Value::String(s)) => s.parse().ok().map(Duration::from_secs),
            _ => None,
        }
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_LIFETIME)
        .min(MAX_LIFETIME);
        Ok(TokenAnswer { token, lifetime })
    }
}

/// `application/x-www-form-urlencoded` encoding of one name or value.
fn form_encode(s: &str) -> String {
    utf8_percent_encode(s, FORM).to_string()
}

/// What form encoding escapes: all but alphanumerics and `*-._`.
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(auth: ClientAuth) -> OAuth2Spec {
        OAuth2Spec {
            token_url: "https://auth.example/token".into(),
            client_id: "portcullis".into(),
            client_secret: SecretSource::Value("s e&cret".into()),
            scopes: vec!["a:read".into(), "b".into()],
            audience: Some("https://api.example".into()),
            client_auth: auth,
            extra: BTreeMap::from([("resource".to_owned(), "r".to_owned())]),
            refresh_before_seconds: None,
        }
    }

    #[test]
    fn request_forms() {
        let c = OAuth2::build("x", &spec(ClientAuth::Basic), Path::new(".")).unwrap();
        let (body, auth) = c.request_parts();
        assert_eq!(
            body.as_str(),
            "grant_type=client_credentials&scope=a%3Aread%20b&audience=https%3A%2F%2Fapi.example&resource=r"
        );
        let auth = auth.unwrap();
        assert!(auth.is_sensitive());
        let c = OAuth2::build("x", &spec(ClientAuth::Post), Path::new(".")).unwrap();
        let (body, auth) = c.request_parts();
        assert!(auth.is_none());
        assert!(
            body.ends_with("&client_id=portcullis&client_secret=s%20e%26cret"),
            "{}",
            *body
        );
        assert!(!format!("{c:?}").contains("cret"));
    }

    #[test]
    fn bad_token_urls_and_answers() {
        for url in ["ftp://a/", "/token", "https://u@a/", "not a url"] {
            let mut s = spec(ClientAuth::Basic);
            s.token_url = url.into();
            assert!(
                matches!(OAuth2::check(&s), Err(CredentialError::TokenUrl(_))),
                "{url}"
            );
        }
        let a = OAuth2::parse_answer(br#"{"access_token":"t","expires_in":6}"#).unwrap();
        assert_eq!(
            (a.token.as_str(), a.lifetime),
            ("t", Duration::from_secs(6))
        );
        let a = OAuth2::parse_answer(br#"{"access_token":"t"}"#).unwrap();
        assert_eq!(a.lifetime, DEFAULT_LIFETIME);
        assert!(OAuth2::parse_answer(b"{}").is_err());
        let a = OAuth2::parse_answer(br#"{"access_token":"t","expires_in":18446744073709551615}"#);
        assert_eq!(a.unwrap().lifetime, MAX_LIFETIME);
        assert!(OAuth2::parse_answer(br#"{"access_token":"a\nb"}"#).is_err());
        let c = crate::credentials::Minter::OAuth2(
            OAuth2::build("x", &spec(ClientAuth::Basic), Path::new(".")).unwrap(),
        );
        assert_eq!(
            c.refresh_before(Duration::from_secs(6)),
            Duration::from_secs(3)
        );
        assert_eq!(
            c.refresh_before(Duration::from_secs(3600)),
            Duration::from_secs(60)
        );
    }
}
