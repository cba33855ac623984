//! Configuration errors: [`ConfigError`] (one problem, with origin, key path and position),
//! [`ConfigErrors`] (all of them), the [`Problems`] list validation fills, and the translation of
//! TOML and figment errors into our style.
//!
//! The translation exists for two reasons: errors must name the key as the spec writes it
//! (`hosts[2].credential`), and they must never echo a value: toml and figment quote the offending
//! text, which could be a literal secret in a malformed config.

use std::fmt;

use crate::config::{Origin, ENV_PREFIX};

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

/// How an origin that is the environment begins (`environment (…)` for a type error in an
/// override, `environment variable NAME` for a value validation refused).
const ENVIRONMENT: &str = "environment";

impl ConfigError {
    /// Whether the problem is in an environment override rather than a file.
    pub fn from_environment(&self) -> bool {
        self.origin.starts_with(ENVIRONMENT)
    }
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

/// The problems validation finds, collected rather than returned one at a time so that `check`
/// reports every mistake in a file at once.
pub(super) struct Problems {
    origin: String,
    /// Keys an environment variable set (dotted path, variable name): a problem with one of them,
    /// or with a key inside it, is the variable's, not the file's.
    overrides: Vec<(String, String)>,
    list: Vec<ConfigError>,
}

impl Problems {
    /// An empty list for a config from `origin`, with `overrides` as [`env_overrides`] gives them.
    pub(super) fn new(origin: &Origin, overrides: Vec<(String, String)>) -> Self {
        Self {
            origin: origin.to_string(),
            overrides,
            list: Vec::new(),
        }
    }

    /// Records that the value at `key` is wrong.
    pub(super) fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        let origin = match self.overrides.iter().find(|(k, _)| within(&key, k)) {
            Some((_, variable)) => format!("{ENVIRONMENT} variable {variable}"),
            None => self.origin.clone(),
        };
        self.list.push(ConfigError {
            origin,
            key: Some(key),
            position: None,
            message: message.into(),
        });
    }

    /// How many problems are recorded so far.
    pub(super) fn len(&self) -> usize {
        self.list.len()
    }

    /// `Ok` when nothing was recorded, else every problem in the order found.
    pub(super) fn into_result(self) -> Result<(), ConfigErrors> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.list))
        }
    }
}

/// Whether `key` is `outer` or a key inside it (`limits.x` is within `limits`, `hosts[0].x` within
/// `hosts`, `listener` is not within `listen`).
pub(super) fn within(key: &str, outer: &str) -> bool {
    key.strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// The config keys that the `PORTCULLIS_<SECTION>__<KEY>` variables among `names` set, as dotted
/// paths the way figment reads them (lowercased, `__` → `.`), each with its variable's name.
pub(super) fn env_overrides(names: impl Iterator<Item = String>) -> Vec<(String, String)> {
    names
        .filter_map(|name| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            rest.contains("__").then(|| {
                let key = rest
                    .split("__")
                    .map(str::to_ascii_lowercase)
                    .collect::<Vec<_>>()
                    .join(".");
                (key, name.clone())
            })
        })
        .collect()
}

/// A TOML syntax error, keeping toml's message and position only: its `Display` quotes the
/// offending line, which could hold a literal secret.
pub(super) fn toml_syntax_error(e: &toml::de::Error, text: &str, origin: &str) -> ConfigError {
    ConfigError {
        origin: origin.to_owned(),
        key: None,
        position: e.span().map(|span| line_col(text, span.start)),
        message: format!(
            "TOML syntax error: {}",
            e.message().trim().replace('\n', "; ")
        ),
    }
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
pub(super) fn figment_error(e: figment::Error, origin: &str) -> ConfigError {
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
        format!("{ENVIRONMENT} ({ENV_PREFIX}<SECTION>__<KEY>)")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse_str;

    #[test]
    fn a_problem_with_a_key_an_environment_variable_set_is_the_variables() {
        let overrides = env_overrides(
            [
                "PORTCULLIS_LIMITS__MAX_CONNECTIONS",
                "PORTCULLIS_CONFIG",
                "PORTCULLIS_AUDIT",
                "HOME",
                "PORTCULLIS_Listen__Proxy",
            ]
            .into_iter()
            .map(String::from),
        );
        assert_eq!(
            overrides,
            [
                (
                    "limits.max_connections".to_owned(),
                    "PORTCULLIS_LIMITS__MAX_CONNECTIONS".to_owned()
                ),
                (
                    "listen.proxy".to_owned(),
                    "PORTCULLIS_Listen__Proxy".to_owned()
                ),
            ]
        );
        let mut p = Problems::new(&Origin::File("p.toml".into()), overrides);
        p.add("limits.max_connections", "must be at least 1");
        p.add("listen.proxy_protocol", "x");
        p.add("limits.idle_timeout_seconds", "y");
        let origins: Vec<String> = p.list.iter().map(|e| e.origin.clone()).collect();
        assert_eq!(
            origins,
            [
                "environment variable PORTCULLIS_LIMITS__MAX_CONNECTIONS",
                "p.toml",
                "p.toml"
            ]
        );
        assert!(within("hosts[0].host", "hosts"));
        assert!(within("limits", "limits"));
        assert!(!within("listener", "listen"));
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
    fn key_paths_render_indices() {
        assert_eq!(
            key_path(&["hosts", "2", "credential"]),
            "hosts[2].credential"
        );
        assert_eq!(key_path(&["listen", "proxy"]), "listen.proxy");
    }
}
