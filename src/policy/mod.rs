//! Pure policy decisions: given what a request asks for (host, port, method, path, client) and
//! the client's mode, find the host rule that allows it, or say precisely why nothing does.
//!
//! Rules are tried in file order and the first whose every condition holds wins. Report mode is
//! part of the verdict ([`judge`]): a denial becomes `WouldDeny`, and the caller lets the request
//! through with no rule (so no credential). Nothing here does I/O; destination *addresses* are
//! judged after resolution, by the network layer.
//!
//! Allowed requests pay for nothing they do not use: the host is formatted only for a denial's
//! message. Paths come in already judged ([`judged_path`]), and only when some rule has `paths`.

mod host;
mod path;
mod presets;

use std::fmt;

use globset::GlobSet;
use http::Method;

pub use host::{normalize_host, Host, HostPattern, PatternError};
pub use path::{compile_paths, judged_path, normalize_path, AmbiguousPath};
pub use presets::{preset, presets, Preset};

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
    /// The `paths` globs as written (for `check`).
    pub path_globs: Vec<String>,
    /// Whether requests this rule allows are signed (spec §12).
    pub sign: bool,
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
            // Signing (spec §12) needs the requests, as a credential, methods or paths do.
            Intercept::Auto => {
                self.credential.is_some()
                    || self.methods.is_some()
                    || self.paths.is_some()
                    || self.sign
            }
        }
    }
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
    /// The request path in its judged form ([`judged_path`]); `None` for a CONNECT, and where no
    /// rule restricts paths.
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

/// What policy says about a request, in its client's mode.
#[derive(Debug)]
pub enum Verdict<'r> {
    /// This rule allows it.
    Allow(&'r Rule),
    /// Denied, but the client is in report mode: let through with no rule, audited `would_deny`.
    WouldDeny(Denial),
    /// Denied.
    Deny(Denial),
}

/// Decides `req` against `rules` in `mode`.
pub fn judge<'r>(rules: &'r [Rule], req: &RequestFacts<'_>, mode: Mode) -> Verdict<'r> {
    match decide(rules, req) {
        Ok(rule) => Verdict::Allow(rule),
        Err(denial) if mode == Mode::Report => Verdict::WouldDeny(denial),
        Err(denial) => Verdict::Deny(denial),
    }
}

/// How close a rule that names the host came; the closest miss becomes the denial.
enum Miss {
    Port,
    Path(String),
    Method,
}

impl Miss {
    fn specificity(&self) -> u8 {
        match self {
            Self::Port => 1,
            Self::Path(_) => 2,
            Self::Method => 3,
        }
    }

    fn into_denial(self, req: &RequestFacts<'_>) -> Denial {
        let host = req.host.to_string();
        match self {
            Self::Port => Denial::Port {
                host,
                port: req.port,
            },
            Self::Path(path) => Denial::Path { host, path },
            Self::Method => Denial::Method {
                host,
                method: req.method.map(Method::to_string).unwrap_or_default(),
            },
        }
    }
}

/// Finds the first rule that allows the request, or the closest miss.
pub fn decide<'r>(rules: &'r [Rule], req: &RequestFacts<'_>) -> Result<&'r Rule, Denial> {
    let mut best: Option<Miss> = None;
    let mut consider = |miss: Miss| {
        if best
            .as_ref()
            .is_none_or(|b| miss.specificity() > b.specificity())
        {
            best = Some(miss);
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
            consider(Miss::Port);
            continue;
        }
        if let (Some(paths), Some(path)) = (&rule.paths, req.path) {
            if !paths.is_match(path) {
                consider(Miss::Path(path.to_owned()));
                continue;
            }
        }
        if let (Some(methods), Some(method)) = (&rule.methods, req.method) {
            if !methods.contains(method) {
                consider(Miss::Method);
                continue;
            }
        }
        return Ok(rule);
    }
    Err(match best {
        Some(miss) => miss.into_denial(req),
        None => Denial::NoRule {
            host: req.host.to_string(),
        },
    })
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
            path_globs: Vec::new(),
            sign: false,
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
    fn report_mode_turns_a_denial_into_would_deny() {
        let rules = vec![rule("a.example")];
        let h = host("b.example");
        assert!(matches!(
            judge(&rules, &facts(&h, 443), Mode::Report),
            Verdict::WouldDeny(Denial::NoRule { .. })
        ));
        assert!(matches!(
            judge(&rules, &facts(&h, 443), Mode::Enforce),
            Verdict::Deny(Denial::NoRule { .. })
        ));
        let a = host("a.example");
        assert!(matches!(
            judge(&rules, &facts(&a, 443), Mode::Report),
            Verdict::Allow(_)
        ));
    }

    #[test]
    fn paths_are_judged_normalised() {
        let mut r = rule("a.example");
        r.paths = Some(compile_paths(&["/ok/**".into()]).unwrap());
        let rules = vec![r];
        let h = host("a.example");
        let mut f = facts(&h, 443);
        f.method = Some(&Method::GET);
        let judged = judged_path("/ok/../secret").unwrap();
        f.path = Some(&judged);
        assert_eq!(
            decide(&rules, &f).unwrap_err(),
            Denial::Path {
                host: "a.example".into(),
                path: "/secret".into()
            }
        );
        let judged = judged_path("/x/%2e%2e/ok/y").unwrap();
        f.path = Some(&judged);
        assert!(decide(&rules, &f).is_ok());
    }
}
