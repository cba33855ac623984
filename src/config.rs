//! Configuration: load (figment layers: built-in defaults ← TOML ← `PORTCULLIS_<SECTION>__<KEY>`),
//! validate everything at once, then freeze into an immutable [`Config`] shared by `Arc`.
//!
//! Every error names its origin (file or environment), the key path (`hosts[2].credential`) and,
//! for TOML syntax errors, line and column. Values are never echoed, so a literal secret in a
//! malformed config cannot reach a log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use http::Method;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::credentials::{Credential, CredentialSpec, Credentials, Secret, SecretSource};
use crate::net::NetworkPolicy;
use crate::policy::{self, normalize_host, HostPattern, Intercept, Mode, Rule};

/// The embedded default configuration (`config/default.toml`, compiled in).
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/default.toml");

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "PORTCULLIS_";

// ---------------------------------------------------------------------------------------------
// Raw configuration, as written. Defaults here are the built-in layer.
// ---------------------------------------------------------------------------------------------

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
}

/// `[listen]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawListen {
    /// HTTP/1.1 proxy listener.
    pub proxy: SocketAddr,
    /// Admin listener (/metrics /healthz /readyz /ca.pem).
    pub admin: SocketAddr,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            proxy: SocketAddr::from(([127, 0, 0, 1], 3128)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9090)),
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

/// A `[[hosts]]` entry as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHostRule {
    /// Exact name, `*.suffix`, IP literal or CIDR.
    pub host: String,
    /// Name of the credential to inject.
    #[serde(default)]
    pub credential: Option<String>,
    /// Allowed ports (default 80, 443).
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
}

// ---------------------------------------------------------------------------------------------
// The frozen snapshot.
// ---------------------------------------------------------------------------------------------

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
    /// Host rules in file order.
    pub rules: Vec<Rule>,
    /// Clients (empty: everyone is `anonymous`).
    pub clients: Vec<Client>,
    /// Secret files to watch for rotation.
    pub secret_files: Vec<PathBuf>,
    /// Non-fatal findings (`check` prints them, `run` logs them).
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File (or environment) the problem is in.
    pub origin: String,
    /// Key path, e.g. `hosts[2].credential`.
    pub key: Option<String>,
    /// Line and column (1-based), for syntax errors.
    pub position: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------------------------

/// Loads the configuration `run` and `check` use: `path`, else `$PORTCULLIS_CONFIG`, else the
/// embedded default; environment overrides applied.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    let path = path
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("PORTCULLIS_CONFIG").map(PathBuf::from));
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    origin: path.display().to_string(),
                    key: None,
                    position: None,
                    message: format!("cannot read config file: {e}"),
                }])
            })?;
            let base = path
                .parent()
                .map(Path::to_path_buf)
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| PathBuf::from("."));
            parse(&text, Origin::File(path), &base, true)
        }
        None => parse(EMBEDDED_DEFAULT, Origin::Embedded, Path::new("."), true),
    }
}

/// Parses and validates TOML `text`; with `env`, `PORTCULLIS_<SECTION>__<KEY>` overrides apply.
/// Relative paths are resolved against `base`.
pub fn parse(text: &str, origin: Origin, base: &Path, env: bool) -> Result<Config, ConfigErrors> {
    let origin_text = origin.to_string();
    // Syntax first, ourselves: toml's own message quotes the offending line, which could hold a
    // literal secret. We keep its message and position only.
    if let Err(e) = text.parse::<toml::Table>() {
        let position = e.span().map(|span| line_col(text, span.start));
        return Err(ConfigErrors(vec![ConfigError {
            origin: origin_text,
            key: None,
            position,
            message: format!(
                "TOML syntax error: {}",
                e.message().trim().replace('\n', "; ")
            ),
        }]));
    }
    let mut figment = Figment::new().merge(Toml::string(text));
    if env {
        // Only PORTCULLIS_<SECTION>__<KEY>: PORTCULLIS_CONFIG and friends are not config keys.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
    }
    let raw: RawConfig = figment.extract().map_err(|e| {
        ConfigErrors(
            e.into_iter()
                .map(|e| figment_error(e, &origin_text))
                .collect(),
        )
    })?;
    validate(raw, origin, base)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// `["hosts", "2", "credential"]` → `hosts[2].credential`.
fn key_path<S: AsRef<str>>(parts: &[S]) -> String {
    let mut out = String::new();
    for part in parts {
        let part = part.as_ref();
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// Rewrites a figment error with our key-path style and without echoing any value.
fn figment_error(e: figment::Error, origin: &str) -> ConfigError {
    use figment::error::Kind;
    let mut path = e.path.clone();
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.to_lowercase().contains("environment"));
    let message = match &e.kind {
        Kind::UnknownField(field, expected) => {
            // figment already appends the unknown field to the path; older versions did not.
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            if expected.is_empty() {
                "unknown key".to_owned()
            } else {
                format!("unknown key (expected one of: {})", expected.join(", "))
            }
        }
        Kind::MissingField(field) => {
            path.push(field.to_string());
            "missing required key".to_owned()
        }
        Kind::UnknownVariant(_, expected) => {
            format!("unknown value (expected one of: {})", expected.join(", "))
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!("expected {expected}, found {}", describe(actual))
        }
        Kind::InvalidLength(len, expected) => format!("expected {expected}, found {len} items"),
        Kind::DuplicateField(field) => {
            path.push((*field).to_owned());
            "duplicate key".to_owned()
        }
        Kind::Message(m) => m.clone(),
        other => other.to_string(),
    };
    let origin = if from_env {
        format!("environment ({ENV_PREFIX}<SECTION>__<KEY>)")
    } else {
        origin.to_owned()
    };
    ConfigError {
        origin,
        key: (!path.is_empty()).then(|| key_path(&path)),
        position: None,
        message,
    }
}

/// Names the kind of a value without its content (it could be a secret).
fn describe(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "another type",
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

struct Problems {
    origin: String,
    list: Vec<ConfigError>,
}

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError {
            origin: self.origin.clone(),
            key: Some(key.into()),
            position: None,
            message: message.into(),
        });
    }
}

/// Names that are not client names: they are what the spec calls unidentified traffic.
const RESERVED_CLIENT_NAMES: [&str; 2] = ["anonymous", "unauthenticated"];

fn validate(raw: RawConfig, origin: Origin, base: &Path) -> Result<Config, ConfigErrors> {
    let mut p = Problems {
        origin: origin.to_string(),
        list: Vec::new(),
    };
    let mut warnings = Vec::new();

    // [limits]
    let l = &raw.limits;
    for (key, value) in [
        (
            "limits.header_read_timeout_seconds",
            l.header_read_timeout_seconds,
        ),
        ("limits.connect_timeout_seconds", l.connect_timeout_seconds),
        ("limits.idle_timeout_seconds", l.idle_timeout_seconds),
    ] {
        if value == 0 {
            p.add(key, "must be at least 1");
        }
    }
    if l.max_connections == 0 {
        p.add("limits.max_connections", "must be at least 1");
    }
    if !(1024..=16 * 1024 * 1024).contains(&l.max_header_bytes) {
        p.add(
            "limits.max_header_bytes",
            "must be between 1024 and 16777216",
        );
    }
    if raw.listen.proxy == raw.listen.admin && raw.listen.proxy.port() != 0 {
        p.add("listen.admin", "must differ from listen.proxy");
    }

    // [network]
    let cidrs = |key: &str, list: &[String], p: &mut Problems| -> Vec<IpNet> {
        list.iter()
            .enumerate()
            .filter_map(|(i, text)| match parse_net(text) {
                Some(net) => Some(net),
                None => {
                    p.add(
                        format!("{key}[{i}]"),
                        format!("{text:?} is not a CIDR or an IP address"),
                    );
                    None
                }
            })
            .collect()
    };
    let allow = cidrs("network.allow_cidrs", &raw.network.allow_cidrs, &mut p);
    let deny = cidrs("network.deny_cidrs", &raw.network.deny_cidrs, &mut p);
    let mut resolve = HashMap::new();
    for (name, ips) in &raw.network.resolve {
        match normalize_host(name) {
            Some(n) if !ips.is_empty() => {
                resolve.insert(n, ips.clone());
            }
            Some(_) => p.add(
                format!("network.resolve.{name}"),
                "needs at least one address",
            ),
            None => p.add(format!("network.resolve.{name}"), "is not a valid DNS name"),
        }
    }

    // [credentials.*]
    let mut credentials = Credentials::new();
    let mut secret_files = Vec::new();
    for (name, spec) in &raw.credentials {
        let (source, sub) = spec.source();
        if let SecretSource::Value(_) = source {
            warnings.push(format!(
                "credentials.{name}.{sub}: a literal `value` secret is meant for tests; use env or file"
            ));
        }
        if let Some(file) = source.file() {
            secret_files.push(base.join(file));
        }
        match Credential::build(name, spec, base) {
            Ok(c) => {
                credentials.insert(name.clone(), c);
            }
            Err(e) => p.add(format!("credentials.{name}.{sub}"), e.to_string()),
        }
    }

    // [[clients]]
    let mut clients = Vec::new();
    let mut client_names = HashSet::new();
    for (i, c) in raw.clients.iter().enumerate() {
        let key = format!("clients[{i}]");
        if c.name.is_empty() || c.name.contains(':') {
            p.add(
                format!("{key}.name"),
                "must be non-empty and contain no ':'",
            );
        } else if RESERVED_CLIENT_NAMES.contains(&c.name.as_str()) {
            p.add(format!("{key}.name"), format!("{:?} is reserved", c.name));
        } else if !client_names.insert(c.name.clone()) {
            p.add(
                format!("{key}.name"),
                format!("client {:?} is defined twice", c.name),
            );
        }
        let networks = cidrs(
            &format!("{key}.networks"),
            c.networks.as_deref().unwrap_or(&[]),
            &mut p,
        );
        if c.token.is_none() && networks.is_empty() {
            p.add(key.clone(), "needs a token or networks to identify it");
        }
        if let Some(SecretSource::Value(_)) = &c.token {
            warnings.push(format!(
                "{key}.token: a literal `value` secret is meant for tests"
            ));
        }
        if let Some(file) = c.token.as_ref().and_then(SecretSource::file) {
            secret_files.push(base.join(file));
        }
        let token = match c.token.as_ref().map(|t| t.resolve(base)) {
            Some(Ok(secret)) => Some(secret),
            Some(Err(e)) => {
                p.add(format!("{key}.token"), e.to_string());
                None
            }
            None => None,
        };
        clients.push(Client {
            name: c.name.clone(),
            token,
            networks,
            mode: c.mode,
        });
    }

    // [[hosts]]
    let mut rules = Vec::new();
    for (i, h) in raw.hosts.iter().enumerate() {
        let key = format!("hosts[{i}]");
        let pattern = match HostPattern::parse(&h.host) {
            Ok(pat) => Some(pat),
            Err(e) => {
                p.add(format!("{key}.host"), e.to_string());
                None
            }
        };
        let ports = h.ports.clone().unwrap_or_else(|| vec![80, 443]);
        if ports.is_empty() || ports.contains(&0) {
            p.add(
                format!("{key}.ports"),
                "must list ports between 1 and 65535",
            );
        }
        let methods = h.methods.as_ref().map(|ms| {
            ms.iter()
                .enumerate()
                .filter_map(|(j, m)| {
                    let upper = m.to_ascii_uppercase();
                    match Method::from_bytes(upper.as_bytes()) {
                        Ok(method) if !upper.is_empty() => Some(method),
                        _ => {
                            p.add(
                                format!("{key}.methods[{j}]"),
                                format!("{m:?} is not an HTTP method"),
                            );
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        });
        let paths = match &h.paths {
            None => None,
            Some(globs) => {
                for (j, g) in globs.iter().enumerate() {
                    if !g.starts_with('/') {
                        p.add(
                            format!("{key}.paths[{j}]"),
                            format!("{g:?} must start with '/'"),
                        );
                    }
                }
                match policy::compile_paths(globs) {
                    Ok(set) => Some(set),
                    Err(e) => {
                        p.add(
                            format!("{key}.paths"),
                            format!("invalid glob: {}", e.kind()),
                        );
                        None
                    }
                }
            }
        };
        if let Some(cred) = &h.credential {
            if !raw.credentials.contains_key(cred) {
                p.add(
                    format!("{key}.credential"),
                    format!("credential {cred:?} is not defined in [credentials]"),
                );
            }
        }
        if let Some(cs) = &h.clients {
            for (j, c) in cs.iter().enumerate() {
                if !client_names.contains(c) {
                    p.add(
                        format!("{key}.clients[{j}]"),
                        format!("client {c:?} is not defined in [[clients]]"),
                    );
                }
            }
        }
        if h.intercept == Intercept::Never
            && (h.credential.is_some() || h.methods.is_some() || h.paths.is_some())
        {
            warnings.push(format!(
                "{key}: intercept = \"never\" with a credential, methods or paths: HTTPS through a tunnel is not inspected, so these apply to plain http only"
            ));
        }
        if let Some(pattern) = pattern {
            rules.push(Rule {
                name: Arc::from(h.host.trim()),
                pattern,
                ports,
                methods,
                paths,
                clients: h.clients.clone(),
                credential: h.credential.clone(),
                intercept: h.intercept,
                plaintext_credentials: h.plaintext_credentials,
            });
        }
    }

    // [audit]
    let output = match raw.audit.output.as_str() {
        "stdout" => AuditOutput::Stdout,
        "stderr" => AuditOutput::Stderr,
        "" => {
            p.add("audit.output", "must be stdout, stderr or a file path");
            AuditOutput::Stdout
        }
        path => AuditOutput::File(base.join(path)),
    };

    if !p.list.is_empty() {
        return Err(ConfigErrors(p.list));
    }
    let lower = |v: &[String]| v.iter().map(|s| s.to_ascii_lowercase()).collect();
    Ok(Config {
        origin,
        base_dir: base.to_path_buf(),
        listen: Listen {
            proxy: raw.listen.proxy,
            admin: raw.listen.admin,
        },
        limits: Limits {
            max_connections: l.max_connections,
            header_read_timeout: Duration::from_secs(l.header_read_timeout_seconds),
            connect_timeout: Duration::from_secs(l.connect_timeout_seconds),
            idle_timeout: Duration::from_secs(l.idle_timeout_seconds),
            shutdown_grace: Duration::from_secs(l.shutdown_grace_seconds),
            max_header_bytes: l.max_header_bytes,
        },
        tls: TlsSettings {
            ca_cert: base.join(&raw.tls.ca_cert),
            ca_key: base.join(&raw.tls.ca_key),
            upstream_roots: raw.tls.upstream_roots,
            extra_upstream_ca: raw
                .tls
                .extra_upstream_ca
                .iter()
                .map(|f| base.join(f))
                .collect(),
        },
        network: Arc::new(NetworkPolicy {
            allow_private: raw.network.allow_private,
            allow,
            deny,
            resolve,
        }),
        mode: raw.policy.mode,
        audit: AuditSettings {
            output,
            log_headers: raw.audit.log_headers,
            mask_headers: lower(&raw.audit.mask_headers),
            mask_query_params: lower(&raw.audit.mask_query_params),
        },
        credentials,
        rules,
        clients,
        secret_files,
        warnings,
    })
}

/// A CIDR, or a bare address taken as a single-host network.
fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .map(|n| n.trunc())
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

impl Config {
    /// A human summary for `portcullis check`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let push = |out: &mut String, line: String| {
            out.push_str(&line);
            out.push('\n');
        };
        push(&mut out, format!("config: {} (valid)", self.origin));
        push(
            &mut out,
            format!(
                "listen: proxy {} admin {}",
                self.listen.proxy, self.listen.admin
            ),
        );
        push(
            &mut out,
            format!("policy mode: {:?}", self.mode).to_lowercase(),
        );
        push(&mut out, format!("host rules ({}):", self.rules.len()));
        for r in &self.rules {
            let mut line = format!(
                "  {} ports {:?} {}",
                r.name,
                r.ports,
                if r.intercepts() {
                    "intercept"
                } else {
                    "tunnel"
                }
            );
            if let Some(c) = &r.credential {
                line.push_str(&format!(" credential={c}"));
            }
            if let Some(m) = &r.methods {
                let names: Vec<&str> = m.iter().map(Method::as_str).collect();
                line.push_str(&format!(" methods={}", names.join(",")));
            }
            if r.paths.is_some() {
                line.push_str(" paths=restricted");
            }
            if let Some(c) = &r.clients {
                line.push_str(&format!(" clients={}", c.join(",")));
            }
            push(&mut out, line);
        }
        let names: Vec<&str> = self.credentials.keys().map(String::as_str).collect();
        push(
            &mut out,
            format!("credentials ({}): {}", names.len(), names.join(", ")),
        );
        if self.clients.is_empty() {
            push(
                &mut out,
                "clients: none (every connection is `anonymous`)".into(),
            );
        } else {
            push(&mut out, format!("clients ({}):", self.clients.len()));
            for c in &self.clients {
                let reach: Vec<String> = self
                    .rules
                    .iter()
                    .filter(|r| r.clients.as_ref().is_none_or(|cs| cs.contains(&c.name)))
                    .map(|r| match &r.credential {
                        Some(cred) => format!("{} (credential {cred})", r.name),
                        None => r.name.to_string(),
                    })
                    .collect();
                push(&mut out, format!("  {}: {}", c.name, reach.join(", ")));
            }
        }
        for w in &self.warnings {
            push(&mut out, format!("warning: {w}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigErrors> {
        parse(
            text,
            Origin::File("test.toml".into()),
            Path::new("/etc/portcullis"),
            false,
        )
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = parse(EMBEDDED_DEFAULT, Origin::Embedded, Path::new("."), false).unwrap();
        assert_eq!(c.listen.proxy, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(c.limits.max_header_bytes, 65536);
    }

    #[test]
    fn syntax_errors_have_line_and_column_and_no_value() {
        let err = parse_str("[listen]\nproxy = \"127.0.0.1:1\"\n[credentials.x]\nbearer = { value = \"sekrit-canary\" \n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("test.toml:4:"), "{text}");
        assert!(text.contains("TOML syntax error"), "{text}");
        assert!(!text.contains("sekrit-canary"), "{text}");
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let err = parse_str("[limits]\nmax_conections = 5\n").unwrap_err();
        assert_eq!(
            err.0[0].key.as_deref(),
            Some("limits.max_conections"),
            "{err}"
        );
        let err = parse_str(
            "[[hosts]]\nhost = \"a.example\"\n[[hosts]]\nhost = \"b.example\"\nport = [1]\n",
        )
        .unwrap_err();
        assert_eq!(err.0[0].key.as_deref(), Some("hosts[1].port"), "{err}");
    }

    #[test]
    fn wrong_types_never_echo_the_value() {
        let err = parse_str("[credentials.gh]\nbearer = \"sekrit-canary\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("credentials.gh.bearer"), "{text}");
        assert!(!text.contains("sekrit-canary"), "{text}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = r#"
[credentials.gh]
bearer = { env = "PORTCULLIS_TEST_UNSET_VAR_1" }
[[hosts]]
host = "ok.example"
[[hosts]]
host = "a*.example.com"
[[hosts]]
host = "x.example"
credential = "missing"
methods = ["GET", "BAD METHOD"]
paths = ["nope"]
ports = []
"#;
        let err = parse_str(text).unwrap_err();
        let keys: Vec<_> = err.0.iter().filter_map(|e| e.key.clone()).collect();
        for want in [
            "credentials.gh.bearer",
            "hosts[1].host",
            "hosts[2].credential",
            "hosts[2].methods[1]",
            "hosts[2].paths[0]",
            "hosts[2].ports",
        ] {
            assert!(keys.iter().any(|k| k == want), "missing {want} in {err}");
        }
        assert!(err.to_string().contains("PORTCULLIS_TEST_UNSET_VAR_1"));
    }

    #[test]
    fn relative_paths_follow_the_config_folder() {
        let c =
            parse_str("[tls]\nca_cert = \"ca.pem\"\n[audit]\noutput = \"audit.log\"\n").unwrap();
        assert_eq!(c.tls.ca_cert, PathBuf::from("/etc/portcullis/ca.pem"));
        assert_eq!(
            c.audit.output,
            AuditOutput::File("/etc/portcullis/audit.log".into())
        );
    }

    #[test]
    fn key_paths_render_indices() {
        assert_eq!(
            key_path(&["hosts", "2", "credential"]),
            "hosts[2].credential"
        );
        assert_eq!(key_path(&["listen", "proxy"]), "listen.proxy");
    }
}
