//! Credentials: what a rule injects into the requests it allows. A credential kind
//! (`bearer`, `basic`, `header`) builds the header it sets from a secret ([`secret`]); the
//! request pipeline injects it with [`inject`], overwriting any client-sent header of its name.
//!
//! A secret's value leaves this module only as a sensitive [`HeaderValue`] for injection or
//! through [`Secret::expose`] for the audit masker.

mod echo;
pub mod github_app;
pub mod oauth2;
mod secret;
pub mod sigv4;
pub mod template;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use echo::{encoded_forms, secret_matcher, Echoes, Masked};
pub use github_app::{GithubApp, GithubAppSpec, RepositoryId};
pub use oauth2::{ClientAuth, OAuth2, OAuth2Spec};
pub use secret::{Secret, SecretError, SecretSource};
pub use sigv4::{AwsSigV4, AwsSigV4Spec};
pub use template::{Claims, MissingClaim};

/// A `[credentials.NAME]` entry as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum CredentialSpec {
    /// `Authorization: Bearer <secret>`.
    Bearer(SecretSource),
    /// `Authorization: Basic base64(username:password)`.
    Basic {
        /// Not secret.
        username: String,
        /// The password.
        password: SecretSource,
    },
    /// `<name>: <prefix><secret>`.
    Header {
        /// Header name.
        name: String,
        /// Optional prefix, e.g. `"token "`.
        #[serde(default)]
        prefix: Option<String>,
        /// The secret.
        value: SecretSource,
    },
    /// Minted: an OAuth 2.0 client-credentials token, `Authorization: Bearer <token>` (spec §10).
    Oauth2(OAuth2Spec),
    /// Minted: a GitHub App installation token, `Authorization: Bearer <token>` or Basic
    /// `x-access-token:<token>` (spec §10).
    #[serde(rename = "github_app")]
    GithubApp(GithubAppSpec),
    /// Re-signing: the request is signed with AWS Signature Version 4 (spec §10).
    #[serde(rename = "aws_sigv4")]
    AwsSigv4(AwsSigV4Spec),
}

impl CredentialSpec {
    /// The secret source and its key under the credential, for error paths.
    pub fn source(&self) -> (&SecretSource, &'static str) {
        match self {
            Self::Bearer(s) => (s, "bearer"),
            Self::Basic { password, .. } => (password, "basic.password"),
            Self::Header { value, .. } => (value, "header.value"),
            Self::Oauth2(o) => (&o.client_secret, "oauth2.client_secret"),
            Self::GithubApp(g) => (&g.private_key, "github_app.private_key"),
            Self::AwsSigv4(a) => (&a.secret_access_key, "aws_sigv4.secret_access_key"),
        }
    }

    /// The header this credential sets.
    pub fn header_name(&self) -> Result<HeaderName, http::header::InvalidHeaderName> {
        match self {
            Self::Bearer(_)
            | Self::Basic { .. }
            | Self::Oauth2(_)
            | Self::GithubApp(_)
            | Self::AwsSigv4(_) => Ok(http::header::AUTHORIZATION),
            Self::Header { name, .. } => HeaderName::from_bytes(name.as_bytes()),
        }
    }
}

/// A credential ready to inject: header name and sensitive value, plus the raw secret for masking.
#[derive(Clone)]
pub struct Credential {
    /// The credential's name (`[credentials.NAME]`).
    pub name: std::sync::Arc<str>,
    /// The header it sets (client-sent headers of this name are removed first).
    pub header: HeaderName,
    /// The full header value, marked sensitive (never logged by hyper, never HPACK-indexed).
    pub value: HeaderValue,
    /// The resolved secret (masking searches audit events for it).
    pub secret: Secret,
    /// What of it must not come back in a response (the secret, a Basic pair's base64 form).
    pub echoes: Option<std::sync::Arc<Echoes>>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// Building a credential failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The secret could not be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The configured header name is not a valid HTTP header name.
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    /// The username or prefix is not header-safe.
    #[error("{0} contains characters that cannot be sent in an HTTP header")]
    NotHeaderSafe(&'static str),
    /// `oauth2.token_url` is not an absolute `http(s)://` URL without userinfo.
    #[error("token_url {0:?} is not an absolute http:// or https:// URL")]
    TokenUrl(String),
    /// `github_app.api_url` is not an absolute `http(s)://` URL without userinfo or query.
    #[error("api_url {0:?} is not an absolute http:// or https:// URL")]
    ApiUrl(String),
    /// A key that must be digits is not.
    #[error("{0} must be digits")]
    NotDigits(&'static str),
    /// The GitHub App private key is not an RSA private key in PEM form.
    #[error("the private key ({0}) is not an RSA private key in PEM form")]
    PrivateKey(String),
    /// The App JWT could not be signed.
    #[error("the GitHub App JWT could not be signed")]
    Signing,
    /// A minted or signing kind has no static value (the token cache or the signer makes it).
    #[error("a minted or signing credential has no static value")]
    NotStatic,
    /// One of several secrets of a credential could not be read: the key it is under, and why.
    #[error("{1}")]
    KeySecret(&'static str, SecretError),
    /// A claim template is malformed.
    #[error("{0}")]
    Template(String),
    /// An `aws_sigv4` region or service is not what a credential scope can hold.
    #[error("{0} must be lowercase letters, digits and '-'")]
    Scope(&'static str),
}

impl Credential {
    /// Resolves `spec`'s secret and builds the header it injects.
    pub fn build(name: &str, spec: &CredentialSpec, base: &Path) -> Result<Self, CredentialError> {
        let header = Self::header(spec)?;
        let (source, _) = spec.source();
        let secret = source.resolve(base)?;
        Self::assemble(name, spec, header, secret)
    }

    /// Checks everything in `spec` but its secret (header name, username, prefix) without reading
    /// the secret source: for commands that run where the secrets are not (`env`, `ca show`).
    /// The same checks as [`Credential::build`]; the credential built on the way holds a
    /// placeholder and is dropped here, so it can never be injected.
    pub fn check(name: &str, spec: &CredentialSpec) -> Result<(), CredentialError> {
        let header = Self::header(spec)?;
        Self::assemble(name, spec, header, Secret::placeholder()).map(drop)
    }

    /// The header `spec` sets, or the error naming the bad header name.
    fn header(spec: &CredentialSpec) -> Result<HeaderName, CredentialError> {
        spec.header_name().map_err(|_| match spec {
            CredentialSpec::Header { name, .. } => CredentialError::HeaderName(name.clone()),
            _ => CredentialError::HeaderName("authorization".into()),
        })
    }

    /// Builds the injected header value from `secret`.
    fn assemble(
        name: &str,
        spec: &CredentialSpec,
        header: HeaderName,
        secret: Secret,
    ) -> Result<Self, CredentialError> {
        // Besides the secret itself, a Basic pair travels as base64: an echo of either must not
        // come back.
        let mut encoded_pair = None;
        let text = Zeroizing::new(match spec {
            CredentialSpec::Bearer(_) => format!("Bearer {}", secret.expose()),
            CredentialSpec::Basic { username, .. } => {
                if username.contains(':') || username.bytes().any(|b| b.is_ascii_control()) {
                    return Err(CredentialError::NotHeaderSafe("basic.username"));
                }
                let pair = Zeroizing::new(format!("{username}:{}", secret.expose()));
                let encoded = Zeroizing::new(
                    base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()),
                );
                let text = format!("Basic {}", encoded.as_str());
                encoded_pair = Some(encoded);
                text
            }
            CredentialSpec::Header { prefix, .. } => {
                format!("{}{}", prefix.as_deref().unwrap_or(""), secret.expose())
            }
            CredentialSpec::Oauth2(_)
            | CredentialSpec::GithubApp(_)
            | CredentialSpec::AwsSigv4(_) => return Err(CredentialError::NotStatic),
        });
        let mut value = HeaderValue::from_str(&text)
            .map_err(|_| CredentialError::NotHeaderSafe("header.prefix"))?;
        value.set_sensitive(true);
        let mut echoes: Vec<&[u8]> = vec![secret.expose().as_bytes()];
        echoes.extend(encoded_pair.as_ref().map(|e| e.as_bytes()));
        let echoes = Echoes::new(&echoes).map(std::sync::Arc::new);
        Ok(Self {
            name: std::sync::Arc::from(name),
            header,
            value,
            echoes,
            secret,
        })
    }
}

impl Credential {
    /// The credential a minted bearer `token` injects: `Authorization: Bearer <token>`, with the
    /// token (and the full header value) as what must not come back in a response.
    pub fn minted_bearer(
        name: Arc<str>,
        token: Zeroizing<String>,
    ) -> Result<Self, CredentialError> {
        let secret = Secret::from_value(token);
        let text = Zeroizing::new(format!("Bearer {}", secret.expose()));
        let mut value = HeaderValue::from_str(&text)
            .map_err(|_| CredentialError::NotHeaderSafe("access_token"))?;
        value.set_sensitive(true);
        let echoes = Echoes::new(&[secret.expose().as_bytes()]).map(Arc::new);
        Ok(Self {
            name,
            header: http::header::AUTHORIZATION,
            value,
            secret,
            echoes,
        })
    }
}

impl Credential {
    /// The credential a minted token injects as `Authorization: Basic base64(user:token)` (a
    /// GitHub App token for git: `x-access-token`), with the token and the base64 form as what
    /// must not come back in a response.
    pub fn minted_basic(
        name: Arc<str>,
        user: &str,
        token: Zeroizing<String>,
    ) -> Result<Self, CredentialError> {
        let secret = Secret::from_value(token);
        let pair = Zeroizing::new(format!("{user}:{}", secret.expose()));
        let encoded =
            Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()));
        let text = Zeroizing::new(format!("Basic {}", encoded.as_str()));
        let mut value = HeaderValue::from_str(&text)
            .map_err(|_| CredentialError::NotHeaderSafe("access_token"))?;
        value.set_sensitive(true);
        let echoes = Echoes::new(&[secret.expose().as_bytes(), encoded.as_bytes()]).map(Arc::new);
        Ok(Self {
            name,
            header: http::header::AUTHORIZATION,
            value,
            secret,
            echoes,
        })
    }
}

/// A minted credential's configuration: what the token cache mints from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Minter {
    /// An OAuth 2.0 client-credentials grant.
    OAuth2(OAuth2),
    /// A GitHub App installation token.
    GithubApp(GithubApp),
}

impl Minter {
    /// The credential's name.
    pub fn name(&self) -> &Arc<str> {
        match self {
            Self::OAuth2(o) => &o.name,
            Self::GithubApp(g) => &g.name,
        }
    }

    /// The configured secret (client secret, private key), for the audit masker.
    pub fn secret(&self) -> &Secret {
        match self {
            Self::OAuth2(o) => &o.client_secret,
            Self::GithubApp(g) => &g.private_key,
        }
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &http::Uri {
        match self {
            Self::OAuth2(o) => &o.token_url,
            Self::GithubApp(g) => &g.token_url,
        }
    }

    /// How long before expiry a token of `lifetime` is refreshed: `refresh_before_seconds`, at
    /// most half the lifetime (spec §10), whatever the kind.
    pub fn refresh_before(&self, lifetime: std::time::Duration) -> std::time::Duration {
        let configured = match self {
            Self::OAuth2(o) => o.refresh_before,
            Self::GithubApp(g) => g.refresh_before,
        };
        configured.min(lifetime / 2)
    }
}

/// A minted credential's narrowing rendered from a client's claims: the values in field order,
/// and the key the token cache keeps their token under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The rendered values joined (the cache key under the credential).
    pub key: String,
    values: Vec<String>,
}

impl Minter {
    /// The templated fields, in a fixed order: `oauth2.scopes` then `oauth2.audience`;
    /// `github_app.repositories` then the templates among `github_app.repository_ids`.
    fn template_fields(&self) -> Vec<&str> {
        match self {
            Self::OAuth2(o) => o
                .scopes
                .iter()
                .map(String::as_str)
                .chain(o.audience.as_deref())
                .collect(),
            Self::GithubApp(g) => g
                .repositories
                .iter()
                .map(String::as_str)
                .chain(g.repository_ids.iter().filter_map(|id| match id {
                    RepositoryId::Template(t) => Some(t.as_str()),
                    RepositoryId::Id(_) => None,
                }))
                .collect(),
        }
    }

    /// Renders the claim templates of this credential from a client's claims: `None` when it has
    /// none (one token for every client), else the rendered values. For `github_app.repositories`
    /// an `owner/name` value becomes `name` (spec §4).
    pub fn render(&self, claims: Option<&Claims>) -> Result<Option<Rendered>, MissingClaim> {
        let fields = self.template_fields();
        if !fields.iter().any(|f| template::is_template(f)) {
            return Ok(None);
        }
        // Which fields are repository names (owner/name → name) and which ids (numbers).
        let (names, ids) = match self {
            Self::GithubApp(g) => (g.repositories.len(), fields.len() - g.repositories.len()),
            Self::OAuth2(_) => (0, 0),
        };
        let missing = |claim| MissingClaim {
            credential: self.name().to_string(),
            claim,
        };
        let mut values = Vec::with_capacity(fields.len());
        for (i, field) in fields.iter().enumerate() {
            let value = template::render(field, claims).map_err(missing)?;
            let value = if i < names && template::is_template(field) {
                value.rsplit('/').next().unwrap_or_default().to_owned()
            } else if ids > 0 && i >= names && value.parse::<u64>().is_err() {
                // A repository id claim that is not a number cannot narrow a token.
                return Err(missing(
                    field
                        .trim_start_matches("{claims.")
                        .trim_end_matches('}')
                        .to_owned(),
                ));
            } else {
                value
            };
            values.push(value);
        }
        Ok(Some(Rendered {
            key: values.join("\u{1f}"),
            values,
        }))
    }

    /// This credential with its templated fields replaced by `rendered`'s values.
    pub fn with_rendered(&self, rendered: &Rendered) -> Self {
        let mut values = rendered.values.iter().cloned();
        match self {
            Self::OAuth2(o) => {
                let mut r = o.clone();
                r.scopes = o.scopes.iter().filter_map(|_| values.next()).collect();
                r.audience = o.audience.as_ref().and_then(|_| values.next());
                Self::OAuth2(r)
            }
            Self::GithubApp(g) => {
                let mut r = g.clone();
                r.repositories = g
                    .repositories
                    .iter()
                    .filter_map(|_| values.next())
                    .collect();
                r.repository_ids = g
                    .repository_ids
                    .iter()
                    .map(|id| match id {
                        RepositoryId::Template(_) => values
                            .next()
                            .and_then(|v| v.parse().ok())
                            .map_or_else(|| id.clone(), RepositoryId::Id),
                        RepositoryId::Id(_) => id.clone(),
                    })
                    .collect();
                Self::GithubApp(r)
            }
        }
    }
}

/// Checks the claim templates of `fields`.
pub(crate) fn check_templates<'a>(
    fields: impl IntoIterator<Item = &'a String>,
) -> Result<(), CredentialError> {
    fields
        .into_iter()
        .try_for_each(|f| template::check(f).map_err(CredentialError::Template))
}

/// An endpoint the proxy itself calls (a token endpoint, an API base): an absolute `http://` or
/// `https://` URL with a host and no userinfo. `None` otherwise.
pub(crate) fn endpoint_url(text: &str) -> Option<http::Uri> {
    let uri: http::Uri = text.parse().ok()?;
    let usable = matches!(uri.scheme_str(), Some("http" | "https"))
        && uri.host().is_some_and(|h| !h.is_empty())
        && uri.authority().is_some_and(|a| !a.as_str().contains('@'));
    usable.then_some(uri)
}

/// Injects `cred`, overwriting: every client-sent header of the same name goes first.
pub fn inject(headers: &mut http::HeaderMap, cred: &Credential) {
    headers.remove(&cred.header);
    headers.insert(cred.header.clone(), cred.value.clone());
}

/// All resolved credentials of a snapshot, by name.
pub type Credentials = BTreeMap<String, Credential>;

/// All minted credentials of a snapshot (resolved, not yet minted), by name.
pub type Minted = BTreeMap<String, Arc<Minter>>;

/// All `aws_sigv4` credentials of a snapshot (keys resolved), by name.
pub type Signers = BTreeMap<String, Arc<AwsSigV4>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_values() {
        let src = SecretSource::Value("hunter2-canary".into());
        assert!(!format!("{src:?}").contains("hunter2"));
        let secret = src.resolve(Path::new(".")).unwrap();
        assert!(!format!("{secret:?}").contains("hunter2"));
        let cred = Credential::build("x", &CredentialSpec::Bearer(src), Path::new(".")).unwrap();
        assert!(!format!("{cred:?}").contains("hunter2"));
        assert!(cred.value.is_sensitive());
    }

    #[test]
    fn check_reads_no_secret_but_checks_the_rest() {
        let unset = || SecretSource::Env("PORTCULLIS_TEST_CHECK_UNSET".into());
        let missing_file = SecretSource::File("/nonexistent/portcullis-secret".into());
        assert!(Credential::build("gh", &CredentialSpec::Bearer(unset()), Path::new(".")).is_err());
        Credential::check("gh", &CredentialSpec::Bearer(unset())).unwrap();
        Credential::check("f", &CredentialSpec::Bearer(missing_file)).unwrap();
        let bad_name = CredentialSpec::Header {
            name: "X Bad".into(),
            prefix: None,
            value: unset(),
        };
        assert_eq!(
            Credential::check("h", &bad_name).unwrap_err(),
            CredentialError::HeaderName("X Bad".into())
        );
        let bad_user = CredentialSpec::Basic {
            username: "a:b".into(),
            password: unset(),
        };
        assert_eq!(
            Credential::check("b", &bad_user).unwrap_err(),
            CredentialError::NotHeaderSafe("basic.username")
        );
        let bad_prefix = CredentialSpec::Header {
            name: "X-Key".into(),
            prefix: Some("a\nb".into()),
            value: unset(),
        };
        assert_eq!(
            Credential::check("p", &bad_prefix).unwrap_err(),
            CredentialError::NotHeaderSafe("header.prefix")
        );
    }

    #[test]
    fn claim_templates_render_per_client() {
        let spec = OAuth2Spec {
            token_url: "https://auth.example/token".into(),
            client_id: "c".into(),
            client_secret: SecretSource::Value("s".into()),
            scopes: vec!["read".into(), "repo:{claims.repository}".into()],
            audience: Some("{claims.aud_claim}".into()),
            client_auth: ClientAuth::Basic,
            extra: BTreeMap::new(),
            refresh_before_seconds: None,
        };
        let minter = Minter::OAuth2(OAuth2::build("api", &spec, Path::new(".")).unwrap());
        let claims: Claims =
            serde_json::from_str(r#"{"repository":"acme/app","aud_claim":"https://api"}"#).unwrap();
        let rendered = minter.render(Some(&claims)).unwrap().unwrap();
        let Minter::OAuth2(o) = minter.with_rendered(&rendered) else {
            panic!("an oauth2 minter")
        };
        assert_eq!(o.scopes, ["read", "repo:acme/app"]);
        assert_eq!(o.audience.as_deref(), Some("https://api"));
        // Another client, another key; a client without the claim: refused, naming it.
        let other: Claims =
            serde_json::from_str(r#"{"repository":"acme/lib","aud_claim":"https://api"}"#).unwrap();
        assert_ne!(
            minter.render(Some(&other)).unwrap().unwrap().key,
            rendered.key
        );
        let err = minter.render(None).unwrap_err();
        assert_eq!(err.to_string(), "credential api needs claim repository");
        // No template: one token for everyone.
        let plain = OAuth2Spec {
            scopes: vec!["read".into()],
            audience: None,
            ..spec
        };
        let plain = Minter::OAuth2(OAuth2::build("api", &plain, Path::new(".")).unwrap());
        assert_eq!(plain.render(None).unwrap(), None);
        // A malformed placeholder is a load error.
        let bad = OAuth2Spec {
            scopes: vec!["{claims.repo".into()],
            ..OAuth2Spec::clone(&spec_for_errors())
        };
        assert!(matches!(
            OAuth2::check(&bad),
            Err(CredentialError::Template(_))
        ));
    }

    fn spec_for_errors() -> OAuth2Spec {
        OAuth2Spec {
            token_url: "https://auth.example/token".into(),
            client_id: "c".into(),
            client_secret: SecretSource::Value("s".into()),
            scopes: vec![],
            audience: None,
            client_auth: ClientAuth::Basic,
            extra: BTreeMap::new(),
            refresh_before_seconds: None,
        }
    }

    #[test]
    fn kinds_build_their_headers() {
        let base = Path::new(".");
        let bearer = CredentialSpec::Bearer(SecretSource::Value("t0k".into()));
        let c = Credential::build("gh", &bearer, base).unwrap();
        assert_eq!(c.header, http::header::AUTHORIZATION);
        assert_eq!(c.value, "Bearer t0k");
        let basic = CredentialSpec::Basic {
            username: "svc".into(),
            password: SecretSource::Value("pw".into()),
        };
        let c = Credential::build("nexus", &basic, base).unwrap();
        assert_eq!(c.value, "Basic c3ZjOnB3");
        let header = CredentialSpec::Header {
            name: "X-API-Key".into(),
            prefix: Some("token ".into()),
            value: SecretSource::Value("k".into()),
        };
        let c = Credential::build("api", &header, base).unwrap();
        assert_eq!(c.header.as_str(), "x-api-key");
        assert_eq!(c.value, "token k");
    }
}
