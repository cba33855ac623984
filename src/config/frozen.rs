//! The validated, immutable configuration snapshot ([`Config`]) and its parts, as the rest of the
//! crate uses them: units applied, paths resolved, secrets read, host rules compiled.
//!
//! Only [`super::validate`] builds these; nothing mutates them afterwards. A reload builds a new
//! [`Config`] and swaps the shared `Arc`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::config::raw::UpstreamRoots;
use crate::credentials::{Credentials, Secret};
use crate::net::NetworkPolicy;
use crate::policy::{Mode, Rule};

/// Where a configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `config/default.toml`, compiled in.
    Embedded,
    /// A file on disk.
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Embedded => f.write_str("<embedded default config>"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Listener addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Proxy listener.
    pub proxy: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Transparent listener (spec §11), when enabled.
    pub transparent: Option<SocketAddr>,
}

/// Limits, with units applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections beyond this get 503.
    pub max_connections: usize,
    /// Request-head deadline.
    pub header_read_timeout: Duration,
    /// Resolution + connect deadline.
    pub connect_timeout: Duration,
    /// Idle keep-alive / tunnel deadline.
    pub idle_timeout: Duration,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
}

/// TLS settings with paths resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA certificate path.
    pub ca_cert: PathBuf,
    /// CA key path.
    pub ca_key: PathBuf,
    /// Upstream roots.
    pub upstream_roots: UpstreamRoots,
    /// Extra upstream CA files.
    pub extra_upstream_ca: Vec<PathBuf>,
}

/// Where audit events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Appended to a file (reopened on SIGHUP).
    File(PathBuf),
}

/// Audit settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// Destination.
    pub output: AuditOutput,
    /// Record headers.
    pub log_headers: bool,
    /// Extra header names to mask (lower case).
    pub mask_headers: Vec<String>,
    /// Extra query parameters to mask (lower case).
    pub mask_query_params: Vec<String>,
}

/// A pipeline identity.
#[derive(Debug, Clone)]
pub struct Client {
    /// Name.
    pub name: String,
    /// Token, if identified by token.
    pub token: Option<Secret>,
    /// Source networks.
    pub networks: Vec<IpNet>,
    /// Mode override.
    pub mode: Option<Mode>,
    /// Identified by OIDC tokens of this issuer (spec §4).
    pub oidc: Option<OidcClient>,
}

/// `[signing]`, validated: the key path resolved against the config folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningSettings {
    /// The Ed25519 key file (generated when missing).
    pub key: PathBuf,
    /// `keyid` / JWKS `kid`.
    pub key_id: String,
    /// The largest body signed (its `Content-Digest` needs it whole).
    pub max_body_bytes: usize,
    /// How long a replaced key stays in the JWKS.
    pub rotation_overlap: Duration,
}

/// A client identified by its CI's OIDC token: which tokens it accepts.
#[derive(Debug, Clone)]
pub struct OidcClient {
    /// The issuer, as configured (the metric label) and as tokens name it in `iss`.
    pub issuer: Arc<str>,
    /// The audience `aud` must contain.
    pub audience: String,
    /// Claim name and pattern, every one of which must match.
    pub claims: Vec<(String, ClaimPattern)>,
    /// Keys read from `jwks_file` at load; `None`: from the issuer's discovery document.
    pub jwks: Option<Arc<jsonwebtoken::jwk::JwkSet>>,
}

/// An expected claim value: equality, or (when the value has `*`) a glob over the whole string
/// in which `*` matches any characters, `/` included.
#[derive(Debug, Clone)]
pub enum ClaimPattern {
    /// Equal to this text.
    Exact(String),
    /// Matches this glob (as written, and compiled).
    Glob(String, globset::GlobMatcher),
}

impl ClaimPattern {
    /// Compiles `text`: a glob when it contains `*`. Only `*` is special; `?`, `[`, `{` are literal.
    pub fn new(text: &str) -> Result<Self, globset::Error> {
        if !text.contains('*') {
            return Ok(Self::Exact(text.to_owned()));
        }
        let escaped: Vec<String> = text.split('*').map(globset::escape).collect();
        let matcher = globset::GlobBuilder::new(&escaped.join("*"))
            .literal_separator(false)
            .build()?
            .compile_matcher();
        Ok(Self::Glob(text.to_owned(), matcher))
    }

    /// Whether `value` (a claim's text) matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(text) => text == value,
            Self::Glob(_, matcher) => matcher.is_match(value),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Exact(text) | Self::Glob(text, _) => text,
        }
    }
}

/// A validated, immutable configuration snapshot.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from.
    pub origin: Origin,
    /// Folder relative paths were resolved against.
    pub base_dir: PathBuf,
    /// Listeners.
    pub listen: Listen,
    /// Limits.
    pub limits: Limits,
    /// TLS.
    pub tls: TlsSettings,
    /// Destination safety.
    pub network: Arc<NetworkPolicy>,
    /// Default mode.
    pub mode: Mode,
    /// Audit.
    pub audit: AuditSettings,
    /// Resolved credentials.
    pub credentials: Credentials,
    /// Minted credentials (spec §10), resolved; the proxy's token cache mints them.
    pub minted: crate::credentials::Minted,
    /// `aws_sigv4` credentials (spec §10), keys resolved; requests are re-signed with them.
    pub signers: crate::credentials::Signers,
    /// Host rules in file order.
    pub rules: Vec<Rule>,
    /// Clients (empty: everyone is `anonymous`).
    pub clients: Vec<Client>,
    /// Secret files to watch for rotation.
    pub secret_files: Vec<PathBuf>,
    /// `[signing]`, when present.
    pub signing: Option<SigningSettings>,
    /// Non-fatal findings (`check` prints them, `run` logs them).
    pub warnings: Vec<String>,
}

/// A configuration validated without reading its secret sources, for the commands that run where
/// the secrets are not (`env`, `ca show`, `ca init`). It holds no credential and no client token,
/// and only shows what those commands need: nothing turns it into a [`Config`], so a
/// configuration without its secrets is never run.
#[derive(Debug, Clone)]
pub struct UnresolvedConfig(Config);

impl UnresolvedConfig {
    /// Wraps a configuration validated with `Secrets::Skip`.
    pub(super) fn new(config: Config) -> Self {
        Self(config)
    }

    /// Where it came from.
    pub fn origin(&self) -> &Origin {
        &self.0.origin
    }

    /// Listeners.
    pub fn listen(&self) -> &Listen {
        &self.0.listen
    }

    /// TLS settings (the CA's paths).
    pub fn tls(&self) -> &TlsSettings {
        &self.0.tls
    }

    /// `[signing]`, when present.
    pub fn signing(&self) -> Option<&SigningSettings> {
        self.0.signing.as_ref()
    }

    /// Names of the configured clients (none: every connection is `anonymous`).
    pub fn client_names(&self) -> impl Iterator<Item = &str> {
        self.0.clients.iter().map(|c| c.name.as_str())
    }

    /// Whether some client is identified by its source networks, which needs no credentials.
    pub fn has_network_clients(&self) -> bool {
        self.0.clients.iter().any(|c| !c.networks.is_empty())
    }
}
