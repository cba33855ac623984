//! Pure policy decisions: given what a request asks for (host, port, scheme, method, path, client),
//! find the host rule that allows it, or say precisely why nothing does.
//!
//! Rules are tried in file order and the first whose every condition holds wins. Nothing here does
//! I/O; destination *addresses* are judged later by [`crate::net`].

use std::fmt;
use std::net::IpAddr;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use http::Method;
use ipnet::IpNet;

/// A rule's `host` field, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// An exact DNS name, normalised (lower case, ASCII/punycode, no trailing dot).
    Exact(String),
    /// `*.suffix`: any subdomain of `suffix` at any depth, never `suffix` itself. Holds `.suffix`.
    Subdomains(String),
    /// An IP literal.
    Ip(IpAddr),
    /// A CIDR block of IP literals.
    Cidr(IpNet),
}

/// Why a `host` pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host pattern {pattern:?}: {why}")]
pub struct PatternError {
    pattern: String,
    why: &'static str,
}

impl HostPattern {
    /// Parses a rule's `host`: an exact name, `*.suffix`, an IP literal or a CIDR.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let err = |why| PatternError {
            pattern: text.to_owned(),
            why,
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(err("empty"));
        }
        if let Ok(ip) = trimmed
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
        {
            return Ok(Self::Ip(ip));
        }
        if trimmed.contains('/') {
            return trimmed
                .parse::<IpNet>()
                .map(|net| Self::Cidr(net.trunc()))
                .map_err(|_| err("not a valid CIDR"));
        }
        if let Some(suffix) = trimmed.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(err(
                    "'*' may only stand alone as the first label (\"*.example.com\")",
                ));
            }
            let suffix = normalize_host(suffix).ok_or_else(|| err("not a valid DNS name"))?;
            return Ok(Self::Subdomains(format!(".{suffix}")));
        }
        if trimmed.contains('*') {
            return Err(err(
                "'*' may only stand alone as the first label (\"*.example.com\")",
            ));
        }
        normalize_host(trimmed)
            .map(Self::Exact)
            .ok_or_else(|| err("not a valid DNS name, IP literal or CIDR"))
    }

    /// Whether the (already normalised) request host matches.
    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (Self::Exact(name), Host::Name(h)) => name == h,
            (Self::Subdomains(suffix), Host::Name(h)) => {
                h.len() > suffix.len() && h.ends_with(suffix.as_str())
            }
            (Self::Ip(ip), Host::Ip(h)) => ip == h,
            (Self::Cidr(net), Host::Ip(h)) => net.contains(h),
            _ => false,
        }
    }
}

/// A request's destination host, normalised once at the edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lower case, ASCII (IDNs in punycode), no trailing dot.
    Name(String),
    /// An IP literal (IPv6 without brackets).
    Ip(IpAddr),
}

impl Host {
    /// Parses the host part of a request target or CONNECT authority.
    pub fn parse(text: &str) -> Option<Self> {
        let unbracketed = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Some(Self::Ip(ip));
        }
        normalize_host(text).map(Self::Name)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Lower-cases, strips one trailing dot, converts IDNs to punycode and checks DNS syntax
/// (letters, digits, hyphens and underscores; labels 1–63 bytes; whole name ≤ 253 bytes).
pub fn normalize_host(text: &str) -> Option<String> {
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() {
        return None;
    }
    let ascii = idna::domain_to_ascii(text).ok()?;
    if ascii.is_empty() || ascii.len() > 253 {
        return None;
    }
    let labels_ok = ascii.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    // A name made only of digits and dots would be an (invalid) IPv4 literal, not a DNS name.
    let numeric = ascii.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    (labels_ok && !numeric).then_some(ascii)
}

/// When to terminate TLS for a CONNECT that a rule allows (spec §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Intercept {
    /// Intercept when the rule has a credential, methods or paths; tunnel otherwise.
    #[default]
    Auto,
    /// Always intercept.
    Always,
    /// Never intercept: relay bytes.
    Never,
}

/// `enforce`, or `report` (would-be denials are logged and let through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Denials are enforced.
    #[default]
    Enforce,
    /// Denials are reported as `would_deny` and the request goes through.
    Report,
}

/// One compiled `[[hosts]]` entry.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The `host` text as configured: the rule's name in audit events and metric labels.
    pub name: std::sync::Arc<str>,
    /// Compiled host pattern.
    pub pattern: HostPattern,
    /// Allowed destination ports.
    pub ports: Vec<u16>,
    /// Allowed methods; `None` = any.
    pub methods: Option<Vec<Method>>,
    /// Allowed paths; `None` = any.
    pub paths: Option<GlobSet>,
    /// Clients this rule applies to; `None` = every client.
    pub clients: Option<Vec<String>>,
    /// Credential injected for requests this rule allows.
    pub credential: Option<String>,
    /// Interception choice for CONNECT.
    pub intercept: Intercept,
    /// Whether the credential may be injected over plain http.
    pub plaintext_credentials: bool,
}

impl Rule {
    /// Whether a CONNECT allowed by this rule is intercepted (TLS terminated) or tunneled.
    pub fn intercepts(&self) -> bool {
        match self.intercept {
            Intercept::Always => true,
            Intercept::Never => false,
            Intercept::Auto => {
                self.credential.is_some() || self.methods.is_some() || self.paths.is_some()
            }
        }
    }
}

/// Compiles a rule's `paths` globs: `*` stays within a segment, `**` crosses segments.
pub fn compile_paths(globs: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for glob in globs {
        set.add(GlobBuilder::new(glob).literal_separator(true).build()?);
    }
    set.build()
}

/// What a request asks for, as far as policy is concerned.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Destination host.
    pub host: &'a Host,
    /// Destination port.
    pub port: u16,
    /// The request method; `None` for a CONNECT, whose inner requests are judged one by one.
    pub method: Option<&'a Method>,
    /// The (normalised) request path; `None` for a CONNECT.
    pub path: Option<&'a str>,
    /// The client identity.
    pub client: &'a str,
}

/// Why policy refused a request. The closest near miss wins, so a denial tells the operator what
/// to change ("port 8080 is not allowed", not just "denied"). Conditions are checked host →
/// port → path → method, and a rule that failed later came closer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No rule names this host (for this client).
    NoRule {
        /// The destination host.
        host: String,
    },
    /// A rule names the host but not this port.
    Port {
        /// The destination host.
        host: String,
        /// The refused port.
        port: u16,
    },
    /// A rule names the host but not this method.
    Method {
        /// The destination host.
        host: String,
        /// The refused method.
        method: String,
    },
    /// A rule names the host but not this path.
    Path {
        /// The destination host.
        host: String,
        /// The refused path.
        path: String,
    },
    /// The rule carries a credential and the request is plain http.
    PlaintextCredential {
        /// The destination host.
        host: String,
    },
}

impl Denial {
    /// Machine-friendly reason for audit events and the `reason` metric label.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoRule { .. } => "no_rule",
            Self::Port { .. } => "port_not_allowed",
            Self::Method { .. } => "method_not_allowed",
            Self::Path { .. } => "path_not_allowed",
            Self::PlaintextCredential { .. } => "plaintext_credential",
        }
    }

    fn specificity(&self) -> u8 {
        match self {
            Self::NoRule { .. } => 0,
            Self::Port { .. } => 1,
            Self::Path { .. } => 2,
            Self::Method { .. } => 3,
            Self::PlaintextCredential { .. } => 4,
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRule { host } => write!(f, "host {host} is not on the allow-list"),
            Self::Port { host, port } => write!(f, "port {port} is not allowed for host {host}"),
            Self::Method { host, method } => {
                write!(f, "method {method} is not allowed for host {host}")
            }
            Self::Path { host, path } => write!(f, "path {path} is not allowed for host {host}"),
            Self::PlaintextCredential { host } => write!(
                f,
                "host {host} carries a credential, which is not sent over plain http (use https)"
            ),
        }
    }
}

/// Finds the first rule that allows the request.
pub fn decide<'r>(rules: &'r [Rule], req: &RequestFacts<'_>) -> Result<&'r Rule, Denial> {
    let host = req.host.to_string();
    let mut best = Denial::NoRule { host: host.clone() };
    let mut consider = |d: Denial| {
        if d.specificity() > best.specificity() {
            best = d;
        }
    };
    for rule in rules {
        if let Some(clients) = &rule.clients {
            if !clients.iter().any(|c| c == req.client) {
                continue;
            }
        }
        if !rule.pattern.matches(req.host) {
            continue;
        }
        if !rule.ports.contains(&req.port) {
            consider(Denial::Port {
                host: host.clone(),
                port: req.port,
            });
            continue;
        }
        if let (Some(paths), Some(path)) = (&rule.paths, req.path) {
            if !paths.is_match(path) {
                consider(Denial::Path {
                    host: host.clone(),
                    path: path.to_owned(),
                });
                continue;
            }
        }
        if let (Some(methods), Some(method)) = (&rule.methods, req.method) {
            if !methods.contains(method) {
                consider(Denial::Method {
                    host: host.clone(),
                    method: method.to_string(),
                });
                continue;
            }
        }
        return Ok(rule);
    }
    Err(best)
}

/// Normalises a request path for `paths` matching, so `/a/./b`, `/a/x/../b` and `/a//b` cannot
/// slip past a glob: percent-encoded dots and slashes are decoded, empty and `.` segments
/// dropped and `..` resolved. The query is not part of the path.
pub fn normalize_path(path: &str) -> String {
    let decoded = path
        .replace("%2e", ".")
        .replace("%2E", ".")
        .replace("%2f", "/")
        .replace("%2F", "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (decoded.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    fn rule(pattern: &str) -> Rule {
        Rule {
            name: pattern.into(),
            pattern: HostPattern::parse(pattern).unwrap(),
            ports: vec![80, 443],
            methods: None,
            paths: None,
            clients: None,
            credential: None,
            intercept: Intercept::Auto,
            plaintext_credentials: false,
        }
    }

    fn facts<'a>(h: &'a Host, port: u16) -> RequestFacts<'a> {
        RequestFacts {
            host: h,
            port,
            method: None,
            path: None,
            client: "anonymous",
        }
    }

    #[test]
    fn exact_names_ignore_case_and_trailing_dot() {
        let p = HostPattern::parse("API.GitHub.com.").unwrap();
        assert_eq!(p, HostPattern::Exact("api.github.com".into()));
        for h in ["api.github.com", "API.GITHUB.COM", "api.github.com."] {
            assert!(p.matches(&host(h)), "{h}");
        }
        for h in [
            "github.com",
            "xapi.github.com",
            "api.github.com.evil",
            "a.api.github.com",
        ] {
            assert!(!p.matches(&host(h)), "{h}");
        }
    }

    #[test]
    fn wildcard_matches_subdomains_at_any_depth_but_not_apex_or_lookalikes() {
        let p = HostPattern::parse("*.example.com").unwrap();
        for h in [
            "a.example.com",
            "a.b.c.example.com",
            "A.EXAMPLE.COM.",
            "_x.example.com",
        ] {
            assert!(p.matches(&host(h)), "{h}");
        }
        for h in [
            "example.com",
            "badexample.com",
            "example.com.evil.net",
            "a.example.co",
            "aexample.com",
        ] {
            assert!(!p.matches(&host(h)), "{h}");
        }
    }

    #[test]
    fn idn_patterns_and_hosts_meet_in_punycode() {
        let p = HostPattern::parse("bücher.example").unwrap();
        assert_eq!(p, HostPattern::Exact("xn--bcher-kva.example".into()));
        assert!(p.matches(&host("BÜCHER.example")));
        assert!(p.matches(&host("xn--bcher-kva.example")));
        let w = HostPattern::parse("*.bücher.example").unwrap();
        assert!(w.matches(&host("www.xn--bcher-kva.example")));
    }

    #[test]
    fn ip_literals_and_cidrs() {
        let ip = HostPattern::parse("192.0.2.7").unwrap();
        assert!(ip.matches(&host("192.0.2.7")));
        assert!(!ip.matches(&host("192.0.2.8")));
        let v6 = HostPattern::parse("[2001:db8::1]").unwrap();
        assert!(v6.matches(&host("[2001:db8::1]")));
        assert!(v6.matches(&host("2001:DB8:0::1")));
        let net = HostPattern::parse("10.20.0.0/16").unwrap();
        assert!(net.matches(&host("10.20.3.4")));
        assert!(!net.matches(&host("10.21.0.1")));
        // A name is never matched by an IP pattern, nor an IP by a name pattern.
        assert!(!net.matches(&host("ten.example")));
        assert!(!HostPattern::parse("example.com")
            .unwrap()
            .matches(&host("93.184.216.34")));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in [
            "",
            "*",
            "*.",
            "a*.example.com",
            "*.*.example.com",
            "foo.*.com",
            "exa mple.com",
            "-bad.example",
            "10.0.0.0/33",
            "example..com",
            "1.2.3",
        ] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn first_match_wins_and_ports_default_to_80_443() {
        let mut a = rule("api.example.com");
        a.credential = Some("one".into());
        let mut b = rule("*.example.com");
        b.credential = Some("two".into());
        let rules = vec![a, b];
        let h = host("api.example.com");
        assert_eq!(
            decide(&rules, &facts(&h, 443))
                .unwrap()
                .credential
                .as_deref(),
            Some("one")
        );
        let h2 = host("www.example.com");
        assert_eq!(
            decide(&rules, &facts(&h2, 80))
                .unwrap()
                .credential
                .as_deref(),
            Some("two")
        );
        assert_eq!(
            decide(&rules, &facts(&h2, 8080)).unwrap_err(),
            Denial::Port {
                host: "www.example.com".into(),
                port: 8080
            }
        );
        let other = host("example.org");
        assert_eq!(
            decide(&rules, &facts(&other, 443)).unwrap_err().code(),
            "no_rule"
        );
    }

    #[test]
    fn methods_and_paths_restrict_and_fall_through_to_later_rules() {
        let mut read = rule("nexus.example");
        read.methods = Some(vec![Method::GET, Method::HEAD]);
        read.paths = Some(compile_paths(&["/repository/*/releases/**".into()]).unwrap());
        read.credential = Some("reader".into());
        let mut push = rule("nexus.example");
        push.methods = Some(vec![Method::PUT]);
        push.credential = Some("pusher".into());
        let rules = vec![read, push];
        let h = host("nexus.example");
        let mut f = facts(&h, 443);
        f.method = Some(&Method::GET);
        f.path = Some("/repository/maven/releases/a/b.jar");
        assert_eq!(
            decide(&rules, &f).unwrap().credential.as_deref(),
            Some("reader")
        );
        f.path = Some("/repository/maven/snapshots/a.jar");
        // The push rule takes any path, so the closest miss is its method.
        assert_eq!(decide(&rules, &f).unwrap_err().code(), "method_not_allowed");
        assert_eq!(
            decide(&rules[..1], &f).unwrap_err().code(),
            "path_not_allowed"
        );
        f.path = Some("/repository/a/b/releases/x");
        assert_eq!(
            decide(&rules[..1], &f).unwrap_err().code(),
            "path_not_allowed",
            "* crosses no '/'"
        );
        f.method = Some(&Method::PUT);
        assert_eq!(
            decide(&rules, &f).unwrap().credential.as_deref(),
            Some("pusher")
        );
        f.method = Some(&Method::DELETE);
        assert_eq!(decide(&rules, &f).unwrap_err().code(), "method_not_allowed");
        // A CONNECT (no method, no path) is allowed by the first rule naming the host.
        assert_eq!(
            decide(&rules, &facts(&h, 443))
                .unwrap()
                .credential
                .as_deref(),
            Some("reader")
        );
    }

    #[test]
    fn client_filter_applies_before_first_match() {
        let mut fe = rule("api.example.com");
        fe.clients = Some(vec!["frontend".into()]);
        fe.credential = Some("fe".into());
        let mut rel = rule("api.example.com");
        rel.clients = Some(vec!["release".into()]);
        rel.credential = Some("rel".into());
        let rules = vec![fe, rel];
        let h = host("api.example.com");
        let mut f = facts(&h, 443);
        f.client = "release";
        assert_eq!(
            decide(&rules, &f).unwrap().credential.as_deref(),
            Some("rel")
        );
        f.client = "other";
        assert_eq!(decide(&rules, &f).unwrap_err().code(), "no_rule");
    }

    #[test]
    fn interception_choice() {
        let mut r = rule("a.example");
        assert!(!r.intercepts());
        r.paths = Some(compile_paths(&["/x".into()]).unwrap());
        assert!(r.intercepts());
        r.intercept = Intercept::Never;
        assert!(!r.intercepts());
        let mut s = rule("b.example");
        s.intercept = Intercept::Always;
        assert!(s.intercepts());
    }

    #[test]
    fn paths_are_normalised_before_matching() {
        assert_eq!(normalize_path("/a/./b"), "/a/b");
        assert_eq!(normalize_path("/a/x/../b"), "/a/b");
        assert_eq!(normalize_path("//a//b/"), "/a/b/");
        assert_eq!(normalize_path("/a/%2e%2E/b"), "/b");
        assert_eq!(normalize_path("/a%2Fb"), "/a/b");
        assert_eq!(normalize_path("/../../etc"), "/etc");
        assert_eq!(normalize_path(""), "/");
        assert_eq!(normalize_path("/"), "/");
    }
}
