//! The `github_app` kind (spec §10): a GitHub App installation access token. A JWT signed RS256
//! with the App's private key (`iss` = app id, `iat` 60 s back, `exp` 9 minutes ahead) is
//! exchanged at `POST {api_url}/app/installations/{installation_id}/access_tokens`; the answer's
//! `token` and `expires_at` give the token and its lifetime. This module holds the configuration,
//! builds the token request and reads the answer; the proxy's token cache (`proxy::minted`)
//! decides when to mint.
//!
//! The private key leaves this module only as a signature; the JWT only inside the token
//! request (a header marked sensitive).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Uri};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::oauth2::{TokenAnswer, TokenAnswerError, DEFAULT_LIFETIME, MAX_LIFETIME};
use super::{CredentialError, Secret, SecretSource};

/// The default `api_url`.
pub const DEFAULT_API_URL: &str = "https://api.github.com";

/// How far back `iat` is put (clock drift between us and GitHub).
const IAT_BACK: u64 = 60;

/// How far ahead `exp` is put (GitHub accepts at most 10 minutes).
const EXP_AHEAD: u64 = 9 * 60;

/// How the installation token is injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Inject {
    /// `Authorization: Bearer <token>` (the default).
    #[default]
    Bearer,
    /// `Authorization: Basic base64("x-access-token:<token>")`, for git over HTTPS.
    Basic,
}

/// `github_app = { … }` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GithubAppSpec {
    /// The App's id (the JWT's `iss`).
    pub app_id: String,
    /// The installation whose token is minted.
    pub installation_id: String,
    /// The App's private key (PEM, PKCS#1 or PKCS#8).
    pub private_key: SecretSource,
    /// The REST API's base URL (GitHub Enterprise: `https://HOST/api/v3`).
    #[serde(default)]
    pub api_url: Option<String>,
    /// Repositories (names) the token is narrowed to.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Repository ids the token is narrowed to: numbers, or claim templates
    /// (`"{claims.repository_id}"`).
    #[serde(default)]
    pub repository_ids: Vec<RepositoryId>,
    /// Permissions the token is narrowed to, e.g. `{ contents = "read" }`.
    #[serde(default)]
    pub permissions: BTreeMap<String, String>,
    /// `bearer` (default) or `basic`.
    #[serde(default)]
    pub inject: Inject,
    /// Refresh this long before expiry (default 60; at most half the lifetime).
    #[serde(default)]
    pub refresh_before_seconds: Option<u64>,
}

/// A resolved `github_app` credential: everything needed to mint. Compared on its configuration
/// and key text (the parsed key follows from them) to decide whether a reload keeps its token.
#[derive(Clone)]
pub struct GithubApp {
    /// The credential's name.
    pub name: Arc<str>,
    /// The App's id.
    pub app_id: String,
    /// The installation id (digits).
    pub installation_id: String,
    /// The token endpoint: `{api_url}/app/installations/{installation_id}/access_tokens`.
    pub token_url: Uri,
    /// The private key as read (for comparison and masking).
    pub private_key: Secret,
    key: EncodingKey,
    /// Repositories.
    pub repositories: Vec<String>,
    /// Repository ids (templates rendered per client before minting).
    pub repository_ids: Vec<RepositoryId>,
    /// Permissions.
    pub permissions: BTreeMap<String, String>,
    /// How the token is injected.
    pub inject: Inject,
    /// `refresh_before_seconds`.
    pub refresh_before: Duration,
}

impl PartialEq for GithubApp {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.app_id == other.app_id
            && self.installation_id == other.installation_id
            && self.token_url == other.token_url
            && self.private_key.expose() == other.private_key.expose()
            && self.repositories == other.repositories
            && self.repository_ids == other.repository_ids
            && self.permissions == other.permissions
            && self.inject == other.inject
            && self.refresh_before == other.refresh_before
    }
}

impl Eq for GithubApp {}

impl fmt::Debug for GithubApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubApp")
            .field("name", &self.name)
            .field("app_id", &self.app_id)
            .field("installation_id", &self.installation_id)
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

/// A `repository_ids` entry: a number, or a claim template rendered to one per client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RepositoryId {
    /// A repository id.
    Id(u64),
    /// A claim template (`"{claims.repository_id}"`), whose rendering must be a number.
    Template(String),
}

/// The JWT's claims.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
    exp: u64,
}

/// The token request's JSON body.
#[derive(Serialize)]
struct Narrowing<'a> {
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    repositories: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    repository_ids: Vec<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    permissions: &'a BTreeMap<String, String>,
}

impl GithubApp {
    /// Checks `spec` without reading its key: `api_url` an absolute http(s) URL without
    /// userinfo, `installation_id` digits, `app_id` header-safe. Returns the token endpoint.
    pub fn check(spec: &GithubAppSpec) -> Result<Uri, CredentialError> {
        let api = spec.api_url.as_deref().unwrap_or(DEFAULT_API_URL);
        let bad = || CredentialError::ApiUrl(api.to_owned());
        // A path is appended to the API base, so it cannot carry a query.
        let base = super::endpoint_url(api).ok_or_else(bad)?;
        if base.query().is_some() {
            return Err(bad());
        }
        if spec.installation_id.is_empty()
            || !spec.installation_id.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(CredentialError::NotDigits("github_app.installation_id"));
        }
        if spec.app_id.is_empty() || !spec.app_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CredentialError::NotHeaderSafe("github_app.app_id"));
        }
        super::check_templates(&spec.repositories)?;
        for id in &spec.repository_ids {
            if let RepositoryId::Template(text) = id {
                if !super::template::is_template(text) {
                    return Err(CredentialError::Template(format!(
                        "repository_ids: {text:?} is neither a number nor a claim template"
                    )));
                }
                super::template::check(text).map_err(CredentialError::Template)?;
            }
        }
        let url = format!(
            "{}/app/installations/{}/access_tokens",
            api.trim_end_matches('/'),
            spec.installation_id
        );
        url.parse().map_err(|_| bad())
    }

    /// Reads `spec`'s private key and parses it (a malformed key fails here, at load).
    pub fn build(name: &str, spec: &GithubAppSpec, base: &Path) -> Result<Self, CredentialError> {
        let token_url = Self::check(spec)?;
        let private_key = spec.private_key.resolve_multiline(base)?;
        let malformed = || {
            CredentialError::PrivateKey(match &spec.private_key {
                SecretSource::File(p) => format!("file {}", base.join(p).display()),
                SecretSource::Env(v) => format!("environment variable {v}"),
                SecretSource::Value(_) => "literal value".to_owned(),
            })
        };
        let key =
            EncodingKey::from_rsa_pem(private_key.expose().as_bytes()).map_err(|_| malformed())?;
        let app = Self {
            name: Arc::from(name),
            app_id: spec.app_id.clone(),
            installation_id: spec.installation_id.clone(),
            token_url,
            private_key,
            key,
            repositories: spec.repositories.clone(),
            repository_ids: spec.repository_ids.clone(),
            permissions: spec.permissions.clone(),
            inject: spec.inject,
            refresh_before: spec
                .refresh_before_seconds
                .map_or(super::oauth2::DEFAULT_REFRESH_BEFORE, Duration::from_secs),
        };
        // The PEM decoded; whether it holds a usable RSA key shows when signing with it.
        app.jwt().map_err(|_| malformed())?;
        Ok(app)
    }

    /// The App JWT for a token request made now.
    pub fn jwt(&self) -> Result<Zeroizing<String>, CredentialError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            iss: &self.app_id,
            iat: now.saturating_sub(IAT_BACK),
            exp: now + EXP_AHEAD,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map(Zeroizing::new)
            .map_err(|_| CredentialError::Signing)
    }

    /// The token request: its JSON body and its `Authorization: Bearer <jwt>` (sensitive).
    pub fn request_parts(&self) -> Result<(Vec<u8>, HeaderValue), CredentialError> {
        let jwt = self.jwt()?;
        let text = Zeroizing::new(format!("Bearer {}", jwt.as_str()));
        let mut auth = HeaderValue::from_str(&text).map_err(|_| CredentialError::Signing)?;
        auth.set_sensitive(true);
        let body = serde_json::to_vec(&Narrowing {
            repositories: &self.repositories,
            // Templates are rendered before a token is requested (`Minter::with_rendered`).
            repository_ids: self
                .repository_ids
                .iter()
                .filter_map(|id| match id {
                    RepositoryId::Id(id) => Some(*id),
                    RepositoryId::Template(_) => None,
                })
                .collect(),
            permissions: &self.permissions,
        })
        .map_err(|_| CredentialError::Signing)?;
        Ok((body, auth))
    }

    /// Reads a successful answer: `token`, and `expires_at` (RFC 3339) as a lifetime from `now`.
    pub fn parse_answer(body: &[u8], now: SystemTime) -> Result<TokenAnswer, TokenAnswerError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|_| TokenAnswerError::NoToken)?;
        let token = value
            .get("token")
            .and_then(serde_json::Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| Zeroizing::new(t.to_owned()))
            .ok_or(TokenAnswerError::NoToken)?;
        if token.bytes().any(|b| b.is_ascii_control() || !b.is_ascii()) {
            return Err(TokenAnswerError::NotHeaderSafe);
        }
        let now = time::OffsetDateTime::from(now);
        let lifetime = value
            .get("expires_at")
            .and_then(serde_json::Value::as_str)
            .and_then(|s| {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
            })
            .and_then(|at| Duration::try_from(at - now).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_LIFETIME)
            .min(MAX_LIFETIME);
        Ok(TokenAnswer { token, lifetime })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GithubAppSpec {
        GithubAppSpec {
            app_id: "123".into(),
            installation_id: "456".into(),
            private_key: SecretSource::Value("x".into()),
            api_url: Some("https://ghe.example/api/v3/".into()),
            repositories: vec![],
            repository_ids: vec![],
            permissions: BTreeMap::new(),
            inject: Inject::Bearer,
            refresh_before_seconds: None,
        }
    }

    #[test]
    fn checks_and_token_url() {
        assert_eq!(
            GithubApp::check(&spec()).unwrap(),
            "https://ghe.example/api/v3/app/installations/456/access_tokens"
        );
        let mut s = spec();
        s.installation_id = "45/../6".into();
        assert!(matches!(
            GithubApp::check(&s),
            Err(CredentialError::NotDigits(_))
        ));
        let mut s = spec();
        s.api_url = Some("ftp://x".into());
        assert!(matches!(
            GithubApp::check(&s),
            Err(CredentialError::ApiUrl(_))
        ));
        // Not a PEM key: a load error naming where the key came from, not the key.
        let e = GithubApp::build("gh", &spec(), Path::new(".")).unwrap_err();
        assert_eq!(e, CredentialError::PrivateKey("literal value".into()));
    }

    #[test]
    fn answers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let a = GithubApp::parse_answer(
            br#"{"token":"ghs_x","expires_at":"2023-11-14T23:13:20Z"}"#,
            now,
        )
        .unwrap();
        assert_eq!(
            (a.token.as_str(), a.lifetime),
            ("ghs_x", Duration::from_secs(3600))
        );
        let a = GithubApp::parse_answer(br#"{"token":"t","expires_at":"garbage"}"#, now).unwrap();
        assert_eq!(a.lifetime, DEFAULT_LIFETIME);
        assert!(GithubApp::parse_answer(br#"{"access_token":"t"}"#, now).is_err());
    }
}
