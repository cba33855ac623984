//! Validation of `[[hosts]]`: patterns, ports, methods and path globs compiled into policy
//! [`Rule`]s in file order; the credentials and clients a rule names must exist.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use http::Method;

use crate::config::error::Problems;
use crate::config::raw::{RawHostRule, DEFAULT_PORTS};
use crate::credentials::CredentialSpec;
use crate::policy::{self, HostPattern, Intercept, Rule};

/// `[[hosts]]`, compiled into rules in file order. `credentials` and `client_names` are what the
/// rules may refer to.
pub(super) fn hosts(
    raw: &[RawHostRule],
    credentials: &BTreeMap<String, CredentialSpec>,
    client_names: &HashSet<String>,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (i, h) in raw.iter().enumerate() {
        let key = format!("hosts[{i}]");
        // The rule's host patterns: its `host`, or every pattern of its `preset` (each one a
        // rule named by its pattern, with the rest of this rule's fields).
        let names: Vec<String> = match (&h.host, &h.preset) {
            (Some(host), None) => vec![host.trim().to_owned()],
            (None, Some(name)) => match policy::preset(name) {
                Some(preset) => preset.hosts.clone(),
                None => {
                    p.add(
                        format!("{key}.preset"),
                        format!("unknown preset {name:?}: `portcullis presets` lists them"),
                    );
                    Vec::new()
                }
            },
            (Some(_), Some(_)) => {
                p.add(key.clone(), "host and preset are exclusive: use one");
                Vec::new()
            }
            (None, None) => {
                p.add(key.clone(), "needs a host or a preset");
                Vec::new()
            }
        };
        let mut patterns = Vec::with_capacity(names.len());
        for name in names {
            match HostPattern::parse(&name) {
                Ok(pattern) => patterns.push((name, pattern)),
                Err(e) => p.add(format!("{key}.host"), e.to_string()),
            }
        }
        let ports = h.ports.clone().unwrap_or_else(|| DEFAULT_PORTS.to_vec());
        if ports.is_empty() || ports.contains(&0) {
            p.add(
                format!("{key}.ports"),
                "must list ports between 1 and 65535",
            );
        }
        let methods = h.methods.as_ref().map(|ms| methods(&key, ms, p));
        let paths = h.paths.as_ref().and_then(|globs| paths(&key, globs, p));
        if let Some(cred) = &h.credential {
            if !credentials.contains_key(cred) {
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
        for (name, pattern) in patterns {
            rules.push(Rule {
                name: Arc::from(name.as_str()),
                pattern,
                ports: ports.clone(),
                methods: methods.clone(),
                paths: paths.clone(),
                clients: h.clients.clone(),
                credential: h.credential.clone(),
                intercept: h.intercept,
                plaintext_credentials: h.plaintext_credentials,
                path_globs: h.paths.clone().unwrap_or_default(),
                sign: h.sign,
            });
        }
    }
    rules
}

/// The valid methods of a rule's `methods` (case-insensitive); each invalid one is a problem.
fn methods(key: &str, names: &[String], p: &mut Problems) -> Vec<Method> {
    names
        .iter()
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
        .collect()
}

/// A rule's `paths`, compiled; `None` (and problems recorded) when a glob does not compile.
fn paths(key: &str, globs: &[String], p: &mut Problems) -> Option<globset::GlobSet> {
    for (j, g) in globs.iter().enumerate() {
        // Request paths always start with '/': a glob that does not could never match.
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
