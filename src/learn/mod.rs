//! Policy from traffic (spec §1): `portcullis learn` turns audit events into `[[hosts]]` rules,
//! and `portcullis check --replay` judges recorded events against a configuration — the loop a
//! team adopting an allow-list runs: report mode, learn, review, enforce, and replay in CI on every
//! change to the allow-list. Pure: events in, text or verdicts out; the CLI does the reading.

mod replay;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::config::Config;
use crate::identity::{ANONYMOUS, UNAUTHENTICATED};
use crate::policy::{Host, Mode, RequestFacts};

pub use replay::{replay, Change};

/// The fields of an audit event that policy judges.
#[derive(Debug, Clone, Deserialize)]
pub struct Seen {
    /// `request` or `tunnel`.
    pub kind: String,
    /// The client.
    pub client: String,
    /// The method (`CONNECT` for tunnels).
    pub method: String,
    /// Destination host.
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// The request path (null for tunnels).
    #[serde(default)]
    pub path: Option<String>,
    /// `allow`, `deny` or `would_deny`.
    pub decision: String,
    /// Whether the request was inside an intercepted tunnel.
    #[serde(default)]
    pub intercepted: bool,
    /// The line it was read from (1-based).
    #[serde(skip)]
    pub line: usize,
}

impl Seen {
    /// Whether the traffic went through: allowed, or let through by report mode.
    pub fn went_through(&self) -> bool {
        matches!(self.decision.as_str(), "allow" | "would_deny")
    }

    /// Whether it is a request (judged with method and path) rather than a tunnel.
    fn is_request(&self) -> bool {
        self.kind == "request"
    }

    /// One line naming it: `GET https://host:port/path by client`.
    pub fn describe(&self) -> String {
        let target = match (&self.path, self.is_request()) {
            (Some(path), true) => format!("{}:{}{path}", self.host, self.port),
            _ => format!("{}:{}", self.host, self.port),
        };
        format!("{} {target} by {}", self.method, self.client)
    }
}

/// A line of the audit that is not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit line {line}: {why}")]
pub struct BadLine {
    /// The line (1-based).
    pub line: usize,
    /// What is wrong with it.
    pub why: String,
}

/// The events of an audit (JSON lines; blank lines skipped). Identification failures
/// (`unauthenticated`) are left out: they say nothing about destinations.
pub fn read_events(text: &str) -> Result<Vec<Seen>, BadLine> {
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut seen: Seen = serde_json::from_str(line).map_err(|e| BadLine {
            line: i + 1,
            why: e.to_string(),
        })?;
        seen.line = i + 1;
        if seen.client != UNAUTHENTICATED {
            events.push(seen);
        }
    }
    Ok(events)
}

/// The facts policy judges an event by; `None` when its host is not a host.
fn facts_of<'a>(
    seen: &'a Seen,
    host: &'a Host,
    method: Option<&'a http::Method>,
    path: Option<&'a str>,
) -> RequestFacts<'a> {
    RequestFacts {
        host,
        port: seen.port,
        method,
        path,
        client: &seen.client,
    }
}

/// Whether `config` allows `seen` (enforce mode: what the rules say, not what report mode lets
/// through).
pub fn allows(config: &Config, seen: &Seen) -> bool {
    replay::verdict(config, seen).is_ok()
}

/// What one learned rule covers.
#[derive(Debug, Default)]
struct Learned {
    methods: BTreeSet<String>,
    paths: BTreeSet<String>,
    clients: BTreeSet<String>,
    /// Whether any of its traffic was inspected (intercepted or plain requests with paths).
    inspected: bool,
    events: usize,
}

/// `[[hosts]]` rules, as TOML, that allow the events `config` (if given) does not allow yet:
/// one per host and port; `*.domain` where several subdomains of one registrable domain appear;
/// `methods` and `paths` for intercepted requests; `clients` when the events name clients the
/// configuration defines. Only `client`'s events, when given.
pub fn learn(events: &[Seen], config: Option<&Config>, client: Option<&str>) -> String {
    let defined: BTreeSet<&str> = config
        .map(|c| c.clients.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    let mut by_target: BTreeMap<(String, u16), Learned> = BTreeMap::new();
    let mut considered = 0;
    for seen in events {
        if client.is_some_and(|c| c != seen.client) {
            continue;
        }
        considered += 1;
        if config.is_some_and(|c| allows(c, seen)) {
            continue;
        }
        let Some(host) = Host::parse(&seen.host) else {
            continue;
        };
        let learned = by_target.entry((host.to_string(), seen.port)).or_default();
        learned.events += 1;
        if seen.client != ANONYMOUS {
            learned.clients.insert(seen.client.clone());
        }
        if seen.is_request() && seen.intercepted {
            learned.inspected = true;
            learned.methods.insert(seen.method.to_ascii_uppercase());
            if let Some(path) = &seen.path {
                learned.paths.insert(path_glob(path));
            }
        }
    }
    let rules = collapse(by_target);
    let mut out = format!(
        "# {} rules learned from {considered} audit events{}\n",
        rules.len(),
        if config.is_some() {
            " that the configuration does not allow yet"
        } else {
            ""
        }
    );
    for ((pattern, port), learned) in &rules {
        out.push_str(&format!(
            "\n# {} events\n[[hosts]]\nhost = {}\nports = [{port}]\n",
            learned.events,
            toml_string(pattern)
        ));
        if learned.inspected {
            out.push_str(&format!("methods = {}\n", toml_list(&learned.methods)));
            if !learned.paths.is_empty() {
                out.push_str(&format!("paths = {}\n", toml_list(&learned.paths)));
            }
        }
        let named: BTreeSet<&String> = learned
            .clients
            .iter()
            .filter(|c| defined.contains(c.as_str()))
            .collect();
        if !named.is_empty() && named.len() == learned.clients.len() {
            let list: BTreeSet<String> = named.into_iter().cloned().collect();
            out.push_str(&format!("clients = {}\n", toml_list(&list)));
        } else if !learned.clients.is_empty() {
            let list: Vec<&str> = learned.clients.iter().map(String::as_str).collect();
            out.push_str(&format!(
                "# clients seen (not all defined in the configuration): {}\n",
                list.join(", ")
            ));
        }
    }
    out
}

/// Collapses host names: where two or more subdomains of one registrable domain appear on a
/// port, one `*.domain` rule covers them (the apex, if seen, keeps its own rule).
fn collapse(by_target: BTreeMap<(String, u16), Learned>) -> BTreeMap<(String, u16), Learned> {
    let mut groups: BTreeMap<(String, u16), Vec<String>> = BTreeMap::new();
    for (host, port) in by_target.keys() {
        if let Some(domain) = registrable(host) {
            if host != &domain {
                groups
                    .entry((domain, *port))
                    .or_default()
                    .push(host.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut merged: BTreeMap<(String, u16), String> = BTreeMap::new();
    for ((domain, port), hosts) in &groups {
        if hosts.len() >= 2 {
            for host in hosts {
                merged.insert((host.clone(), *port), format!("*.{domain}"));
            }
        }
    }
    for ((host, port), learned) in by_target {
        let pattern = merged.get(&(host.clone(), port)).cloned().unwrap_or(host);
        let entry: &mut Learned = out.entry((pattern, port)).or_default();
        entry.methods.extend(learned.methods);
        entry.paths.extend(learned.paths);
        entry.clients.extend(learned.clients);
        entry.inspected |= learned.inspected;
        entry.events += learned.events;
    }
    out
}

/// The registrable domain of a host name (public-suffix list); `None` for IPs and bare suffixes.
fn registrable(host: &str) -> Option<String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    psl::domain_str(host).map(str::to_owned)
}

/// A path glob for a seen path: the path itself when it has at most two segments, else its first
/// two segments and `/**`. Literal characters that are glob syntax are escaped.
fn path_glob(path: &str) -> String {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let escaped = |s: &[&str]| {
        s.iter()
            .map(|seg| globset::escape(seg))
            .collect::<Vec<_>>()
            .join("/")
    };
    if segments.len() <= 2 {
        format!("/{}", escaped(&segments))
    } else {
        format!("/{}/**", escaped(&segments[..2]))
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn toml_list(items: &BTreeSet<String>) -> String {
    let quoted: Vec<String> = items.iter().map(|i| toml_string(i)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The mode events are judged in: enforce (what the rules say).
const JUDGED_IN: Mode = Mode::Enforce;

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        kind: &str,
        client: &str,
        method: &str,
        host: &str,
        port: u16,
        path: Option<&str>,
        intercepted: bool,
    ) -> Seen {
        Seen {
            kind: kind.into(),
            client: client.into(),
            method: method.into(),
            host: host.into(),
            port,
            path: path.map(str::to_owned),
            decision: "would_deny".into(),
            intercepted,
            line: 1,
        }
    }

    #[test]
    fn subdomains_of_one_registrable_domain_collapse_and_paths_generalise() {
        let tunnel = |host: &str| event("tunnel", "anonymous", "CONNECT", host, 443, None, false);
        let inner = |method: &str, path: &str| {
            event(
                "request",
                "anonymous",
                method,
                "api.github.com",
                443,
                Some(path),
                true,
            )
        };
        let events = [
            tunnel("a.cdn.example.co.uk"),
            tunnel("b.cdn.example.co.uk"),
            tunnel("example.co.uk"),
            tunnel("pypi.org"),
            inner("GET", "/repos/acme/app/pulls"),
            inner("post", "/graphql"),
        ];
        let text = learn(&events, None, None);
        assert!(text.contains("host = \"*.example.co.uk\""), "{text}");
        assert!(text.contains("host = \"example.co.uk\""), "{text}");
        assert!(
            text.contains("host = \"pypi.org\"\nports = [443]\n"),
            "{text}"
        );
        assert!(text.contains("methods = [\"GET\", \"POST\"]"), "{text}");
        assert!(
            text.contains("paths = [\"/graphql\", \"/repos/acme/**\"]"),
            "{text}"
        );
        // It parses as TOML with four rules.
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(table["hosts"].as_array().unwrap().len(), 4, "{text}");
        assert_eq!(path_glob("/a*b/[x]"), "/a[*]b/[[]x[]]");
    }

    #[test]
    fn events_read_from_json_lines() {
        let text = "{\"kind\":\"tunnel\",\"client\":\"ci\",\"method\":\"CONNECT\",\"host\":\"pypi.org\",\"port\":443,\"path\":null,\"decision\":\"allow\",\"intercepted\":false}\n\n{\"kind\":\"request\",\"client\":\"unauthenticated\",\"method\":\"GET\",\"host\":\"x\",\"port\":80,\"decision\":\"deny\"}\nnot json\n";
        let err = read_events(text).unwrap_err();
        assert_eq!(err.line, 4);
        let events = read_events(&text[..text.rfind("not json").unwrap()]).unwrap();
        assert_eq!(events.len(), 1, "identification failures are left out");
        assert_eq!(events[0].line, 1);
        assert!(events[0].went_through());
    }
}
