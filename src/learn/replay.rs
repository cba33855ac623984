//! `portcullis check --replay AUDIT`: every recorded event judged again against a configuration,
//! and each one it would decide differently listed — what CI runs on a change to an allow-list,
//! failing when traffic that went through would now be denied.

use std::sync::Arc;

use super::{facts_of, Seen, JUDGED_IN};
use crate::config::Config;
use crate::policy::{self, Host, Verdict};

/// An event the configuration decides differently from the recording.
#[derive(Debug, Clone)]
pub struct Change {
    /// The event.
    pub seen: Seen,
    /// Whether it went through when recorded (allowed, or let through by report mode).
    pub was_allowed: bool,
    /// What the configuration says now: the rule that allows it, or why it is denied.
    pub now: Result<Arc<str>, String>,
}

impl Change {
    /// Traffic that went through and would now be denied: a pipeline would break.
    pub fn is_regression(&self) -> bool {
        self.was_allowed && self.now.is_err()
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        let now = match &self.now {
            Ok(rule) => format!("now allowed by rule {rule}"),
            Err(why) => format!("now denied: {why}"),
        };
        let was = if self.was_allowed {
            "allowed"
        } else {
            "denied"
        };
        format!(
            "line {}: {}: was {was}, {now}",
            self.seen.line,
            self.seen.describe()
        )
    }
}

/// What `config` decides for `seen`, in enforce mode: the allowing rule's name, or the denial.
pub fn verdict(config: &Config, seen: &Seen) -> Result<Arc<str>, String> {
    let host = Host::parse(&seen.host).ok_or_else(|| format!("invalid host {:?}", seen.host))?;
    let request = seen.is_request();
    let method = match request {
        true => Some(
            http::Method::from_bytes(seen.method.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("invalid method {:?}", seen.method))?,
        ),
        false => None,
    };
    // Paths are judged (normalised) only where a rule restricts them, as the proxy does.
    let path_rules = config.rules.iter().any(|r| r.paths.is_some());
    let judged = match (&seen.path, request && path_rules) {
        (Some(path), true) => Some(policy::judged_path(path).map_err(|e| e.to_string())?),
        _ => None,
    };
    let facts = facts_of(seen, &host, method.as_ref(), judged.as_deref());
    match policy::judge(&config.rules, &facts, JUDGED_IN) {
        Verdict::Allow(rule) => Ok(rule.name.clone()),
        Verdict::Deny(denial) | Verdict::WouldDeny(denial) => Err(denial.to_string()),
    }
}

/// The events `config` decides differently from their recording, in audit order.
pub fn replay(config: &Config, events: &[Seen]) -> Vec<Change> {
    events
        .iter()
        .filter_map(|seen| {
            let now = verdict(config, seen);
            let was_allowed = seen.went_through();
            (was_allowed != now.is_ok()).then(|| Change {
                seen: seen.clone(),
                was_allowed,
                now,
            })
        })
        .collect()
}
