//! The configuration as written: the serde types figment extracts, and the built-in defaults.
//!
//! The `Default` impls here (plus [`DEFAULT_PORTS`] for host rules) are the only place a built-in
//! default value is written down. `config/default.toml` restates none of them (a test in
//! [`crate::config`] enforces it) and `config/example.toml` documents them (a test checks that
//! it agrees). Nothing here is validated: [`super::validate`] turns these into a
//! [`super::Config`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::credentials::{CredentialSpec, SecretSource};
use crate::policy::{Intercept, Mode};

/// The whole file as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[listen]`
    pub listen: RawListen,
    /// `[limits]`
    pub limits: RawLimits,
    /// `[tls]`
    pub tls: RawTls,
    /// `[network]`
    pub network: RawNetwork,
    /// `[policy]`
    pub policy: RawPolicy,
    /// `[audit]`
    pub audit: RawAudit,
    /// `[credentials.NAME]`
    pub credentials: BTreeMap<String, CredentialSpec>,
    /// `[[hosts]]`
    pub hosts: Vec<RawHostRule>,
    /// `[[clients]]`
    pub clients: Vec<RawClient>,
    /// `[signing]` (spec §12): present = requests of `sign = true` rules are signed.
    pub signing: Option<RawSigning>,
}

/// `[signing]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSigning {
    /// Ed25519 private key, PKCS#8 PEM; generated (mode 0600) when missing.
    pub key: PathBuf,
    /// `keyid` of the signatures and `kid` of the JWKS.
    pub key_id: String,
    /// Bodies up to this are buffered for `Content-Digest`; above: 413.
    pub max_body_bytes: usize,
    /// After a key change (picked up on reload), the JWKS keeps serving the replaced key this
    /// long, so receivers do not fail mid-rotation.
    pub rotation_overlap_seconds: u64,
}

impl Default for RawSigning {
    fn default() -> Self {
        Self {
            key: PathBuf::from("state/signing-key.pem"),
            key_id: "portcullis".into(),
            max_body_bytes: 1024 * 1024,
            rotation_overlap_seconds: 3600,
        }
    }
}

/// `[listen]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawListen {
    /// HTTP/1.1 proxy listener.
    pub proxy: SocketAddr,
    /// Admin listener (/metrics /healthz /readyz /ca.pem).
    pub admin: SocketAddr,
    /// Listener for connections redirected to the proxy by iptables/nftables `REDIRECT`
    /// (transparent mode, spec §11). Off by default.
    pub transparent: Option<SocketAddr>,
}

impl Default for RawListen {
    fn default() -> Self {
        // Loopback: a proxy that starts with no config must not be an open relay on the network.
        Self {
            proxy: SocketAddr::from(([127, 0, 0, 1], 3128)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9090)),
            transparent: None,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Connections beyond this get 503.
    pub max_connections: usize,
    /// Time a client has to send a request head.
    pub header_read_timeout_seconds: u64,
    /// Resolution + TCP connect deadline.
    pub connect_timeout_seconds: u64,
    /// Idle keep-alive connections and idle tunnels are closed after this.
    pub idle_timeout_seconds: u64,
    /// How long in-flight work may finish after SIGTERM.
    pub shutdown_grace_seconds: u64,
    /// Largest request head accepted.
    pub max_header_bytes: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout_seconds: 10,
            connect_timeout_seconds: 10,
            idle_timeout_seconds: 300,
            shutdown_grace_seconds: 30,
            max_header_bytes: 65_536,
        }
    }
}

/// Which roots verify upstream servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamRoots {
    /// Bundled Mozilla roots.
    #[default]
    Webpki,
    /// The operating system's store.
    System,
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    /// Interception CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// Interception CA key (PEM).
    pub ca_key: PathBuf,
    /// Upstream trust roots.
    pub upstream_roots: UpstreamRoots,
    /// Extra PEM files trusted for upstreams.
    pub extra_upstream_ca: Vec<PathBuf>,
}

impl Default for RawTls {
    fn default() -> Self {
        // Relative, so they follow the config file's folder (the working directory for the
        // embedded default).
        Self {
            ca_cert: PathBuf::from("state/ca.pem"),
            ca_key: PathBuf::from("state/ca-key.pem"),
            upstream_roots: UpstreamRoots::Webpki,
            extra_upstream_ca: Vec::new(),
        }
    }
}

/// `[network]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNetwork {
    /// Let special-purpose addresses through.
    pub allow_private: bool,
    /// Exceptions (CIDRs or addresses).
    pub allow_cidrs: Vec<String>,
    /// Always denied (CIDRs or addresses).
    pub deny_cidrs: Vec<String>,
    /// Static name → addresses.
    pub resolve: BTreeMap<String, Vec<IpAddr>>,
}

/// `[policy]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    /// `enforce` or `report`.
    pub mode: Mode,
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    /// `stdout`, `stderr` or a file path.
    pub output: String,
    /// Record request and response headers.
    pub log_headers: bool,
    /// Extra header names to mask.
    pub mask_headers: Vec<String>,
    /// Extra query parameters to mask.
    pub mask_query_params: Vec<String>,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            output: "stdout".into(),
            log_headers: true,
            mask_headers: Vec::new(),
            mask_query_params: Vec::new(),
        }
    }
}

/// The ports a `[[hosts]]` rule allows when it names none.
///
/// A rule has no `Default` impl (its `host` is required), so this is its one defaulted value
/// that is not a type's own default; it lives here with the others.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// A `[[hosts]]` entry as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHostRule {
    /// Exact name, `*.suffix`, IP literal or CIDR.
    #[serde(default)]
    pub host: Option<String>,
    /// Instead of `host`: a built-in group of host patterns (`portcullis presets`).
    #[serde(default)]
    pub preset: Option<String>,
    /// Name of the credential to inject.
    #[serde(default)]
    pub credential: Option<String>,
    /// Allowed ports (default [`DEFAULT_PORTS`]).
    #[serde(default)]
    pub ports: Option<Vec<u16>>,
    /// Allowed methods.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Allowed path globs.
    #[serde(default)]
    pub paths: Option<Vec<String>>,
    /// Clients the rule applies to.
    #[serde(default)]
    pub clients: Option<Vec<String>>,
    /// auto | always | never.
    #[serde(default)]
    pub intercept: Intercept,
    /// Allow injecting over plain http.
    #[serde(default)]
    pub plaintext_credentials: bool,
    /// Sign what this rule lets through (spec §12).
    #[serde(default)]
    pub sign: bool,
}

/// A `[[clients]]` entry as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    /// Identity name (the proxy URL's user name).
    pub name: String,
    /// Token (the proxy URL's password).
    #[serde(default)]
    pub token: Option<SecretSource>,
    /// Source networks identifying this client without a token.
    #[serde(default)]
    pub networks: Option<Vec<String>>,
    /// Overrides `policy.mode` for this client.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Identified by the CI's OIDC token (spec §4) instead of a token or networks.
    #[serde(default)]
    pub oidc: Option<RawOidc>,
}

/// `oidc = { … }` of a `[[clients]]` entry (spec §4).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidc {
    /// The issuer URL, exactly as tokens name it in `iss`.
    pub issuer: String,
    /// The audience a token's `aud` must contain.
    pub audience: String,
    /// Claims the token must carry: equality, or a glob where the value has `*`.
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, ClaimValue>,
    /// Keys from this JWKS file instead of the issuer's discovery document.
    #[serde(default)]
    pub jwks_file: Option<std::path::PathBuf>,
}

/// A claim's expected value as written: text, or a number or boolean compared by its JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ClaimValue {
    /// Text (a glob when it contains `*`).
    Text(String),
    /// An integer.
    Integer(i64),
    /// A boolean.
    Bool(bool),
}

impl ClaimValue {
    /// The value as the JSON text of a claim is compared with.
    pub fn text(&self) -> String {
        match self {
            Self::Text(t) => t.clone(),
            Self::Integer(i) => i.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}
