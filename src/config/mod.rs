//! Configuration: load (figment layers: built-in defaults ← TOML ← `PORTCULLIS_<SECTION>__<KEY>`),
//! validate everything at once, then freeze into an immutable [`Config`] shared by `Arc`.
//!
//! Every error names its origin (file or environment), the key path (`hosts[2].credential`) and,
//! for TOML syntax errors, line and column. Values are never echoed, so a literal secret in a
//! malformed config cannot reach a log.
//!
//! This module owns the entry points ([`load`], [`parse`], and [`load_unresolved`] for the
//! commands that never read secrets) and the embedded default; the rest is one file per concern:
//! - `raw`: the serde types as written, and the built-in defaults (their `Default` impls, the only
//!   place default values live; `config/default.toml` only documents them);
//! - `frozen`: the validated snapshot ([`Config`] and its parts) the rest of the crate uses, and
//!   [`UnresolvedConfig`], the view of a configuration validated without its secrets;
//! - `validate`: raw → frozen, one function per section, every problem collected;
//! - `error`: [`ConfigError`], [`ConfigErrors`] and the translation of TOML/figment errors;
//! - `summary`: [`Config::summary`], the text `portcullis check` prints.
//!
//! Every public item is re-exported here, so `crate::config::X` is the one path to use.

mod error;
mod frozen;
mod include;
mod raw;
mod summary;
mod validate;

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;

pub use error::{ConfigError, ConfigErrors};
pub use frozen::{
    AuditOutput, AuditSettings, ClaimPattern, Client, Config, Limits, Listen, OidcClient, Origin,
    SigningSettings, TlsSettings, UnresolvedConfig,
};
pub use raw::{
    RawAudit, RawClient, RawConfig, RawHostRule, RawLimits, RawListen, RawNetwork, RawPolicy,
    RawTls, UpstreamRoots, DEFAULT_PORTS,
};

/// The embedded default configuration (`config/default.toml`, compiled in).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.toml");

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "PORTCULLIS_";

/// Whether validation reads secret sources. One validation code path serves both: `Skip` runs
/// every check except reading `{ env }` / `{ file }` sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrets {
    /// Read every secret source; one that cannot be read makes the config invalid (`run`,
    /// `check`, reload).
    Resolve,
    /// Read none (`env`, `ca show`, `ca init`: they run where the secrets are not).
    Skip,
}

/// Loads the configuration `run` and `check` use: `path`, else `$PORTCULLIS_CONFIG`, else the
/// embedded default; environment overrides applied; every secret source read.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    load_with(path, Secrets::Resolve)
}

/// Loads and validates the configuration like [`load`], but reads no secret source: for `env`,
/// `ca show` and `ca init`, which work on a machine that has the config but not the secrets.
pub fn load_unresolved(path: Option<&Path>) -> Result<UnresolvedConfig, ConfigErrors> {
    load_with(path, Secrets::Skip).map(UnresolvedConfig::new)
}

/// [`load`] and [`load_unresolved`].
fn load_with(path: Option<&Path>, secrets: Secrets) -> Result<Config, ConfigErrors> {
    let path = path
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("PORTCULLIS_CONFIG").map(PathBuf::from));
    match path {
        Some(path) => {
            let file_error = |message: String| {
                ConfigErrors(vec![ConfigError {
                    origin: path.display().to_string(),
                    key: None,
                    position: None,
                    message,
                }])
            };
            let text = std::fs::read_to_string(&path)
                .map_err(|e| file_error(format!("cannot read config file: {e}")))?;
            let base = path
                .parent()
                .map(Path::to_path_buf)
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| PathBuf::from("."));
            let assembled = include::assemble(&path, &text)?;
            if !assembled.included {
                return parse_with(&text, Origin::File(path), &base, true, secrets);
            }
            let merged = toml::to_string(&assembled.table)
                .map_err(|e| file_error(format!("cannot merge the included files: {e}")))?;
            let mut config = parse_with(&merged, Origin::File(path.clone()), &base, true, secrets)
                .map_err(|errors| name_included_origins(errors, &path, &assembled))?;
            // Every included file (and glob folder) is watched like the main one.
            config.secret_files.extend(assembled.watched);
            Ok(config)
        }
        None => parse_with(
            EMBEDDED_DEFAULT,
            Origin::Embedded,
            Path::new("."),
            true,
            secrets,
        ),
    }
}

/// A credential names exactly one kind, and a secret source exactly one of `env`, `file`,
/// `value`: a table with two (`{ env = "A", file = "b" }`) is an error, not a silent pick.
fn one_of_choices(table: &toml::Table, origin: &str) -> Vec<ConfigError> {
    const SOURCES: [&str; 3] = ["env", "file", "value"];
    let mut errors = Vec::new();
    let mut add = |key: String, message: String| {
        errors.push(ConfigError {
            origin: origin.to_owned(),
            key: Some(key),
            position: None,
            message,
        })
    };
    if let Some(toml::Value::Table(credentials)) = table.get("credentials") {
        for (name, spec) in credentials {
            if let toml::Value::Table(kinds) = spec {
                if kinds.len() > 1 {
                    let found: Vec<&str> = kinds.keys().map(String::as_str).collect();
                    add(
                        format!("credentials.{name}"),
                        format!(
                            "sets {} kinds ({}): a credential has exactly one",
                            found.len(),
                            found.join(", ")
                        ),
                    );
                }
            }
        }
    }
    fn walk(value: &toml::Value, path: &str, found: &mut Vec<(String, Vec<String>)>) {
        match value {
            toml::Value::Table(t) => {
                let keys: Vec<String> = t.keys().cloned().collect();
                if keys.len() > 1 && keys.iter().all(|k| SOURCES.contains(&k.as_str())) {
                    found.push((path.to_owned(), keys));
                }
                for (k, v) in t {
                    walk(v, &format!("{path}.{k}"), found);
                }
            }
            toml::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(v, &format!("{path}[{i}]"), found);
                }
            }
            _ => {}
        }
    }
    let mut sources = Vec::new();
    for (k, v) in table {
        walk(v, k, &mut sources);
    }
    for (path, keys) in sources {
        add(
            path,
            format!(
                "a secret source takes exactly one of env, file, value; found {}",
                keys.join(", ")
            ),
        );
    }
    errors
}

/// Errors name the file that set the key: for a `hosts` or `clients` entry the file the entry
/// came from, for any other key the one file that set it (or the table around it). A key an
/// environment variable set stays the variable's.
fn name_included_origins(
    mut errors: ConfigErrors,
    root: &Path,
    assembled: &include::Assembled,
) -> ConfigErrors {
    for e in &mut errors.0 {
        let Some(key) = &e.key else { continue };
        if e.from_environment() {
            continue;
        }
        let entry = assembled.origins.iter().find_map(|(list, files)| {
            let rest = key.strip_prefix(&format!("{list}["))?;
            let index = rest.split(']').next()?.parse::<usize>().ok()?;
            files.get(index)
        });
        // Otherwise the longest key set by a file that holds this one.
        let file = entry.or_else(|| {
            assembled
                .setters
                .iter()
                .filter(|(set, _)| error::within(key, set))
                .max_by_key(|(set, _)| set.len())
                .map(|(_, file)| file)
        });
        if let Some(file) = file.filter(|f| *f != root) {
            e.origin = file.display().to_string();
        }
    }
    errors
}

/// Parses and validates TOML `text`; with `env`, `PORTCULLIS_<SECTION>__<KEY>` overrides apply.
/// Relative paths are resolved against `base`. Every secret source is read.
pub fn parse(text: &str, origin: Origin, base: &Path, env: bool) -> Result<Config, ConfigErrors> {
    parse_with(text, origin, base, env, Secrets::Resolve)
}

/// [`parse`], reading secret sources or not.
fn parse_with(
    text: &str,
    origin: Origin,
    base: &Path,
    env: bool,
    secrets: Secrets,
) -> Result<Config, ConfigErrors> {
    let origin_text = origin.to_string();
    // Syntax first, ourselves: toml's own message quotes the offending line, which could hold a
    // literal secret. We keep its message and position only.
    let table = match text.parse::<toml::Table>() {
        Ok(table) => table,
        Err(e) => {
            return Err(ConfigErrors(vec![error::toml_syntax_error(
                &e,
                text,
                &origin_text,
            )]))
        }
    };
    // One-of choices that serde would settle silently by taking the first key.
    let ambiguous = one_of_choices(&table, &origin_text);
    if !ambiguous.is_empty() {
        return Err(ConfigErrors(ambiguous));
    }
    // No defaults provider: keys the file leaves out take the `Default` impls in `raw` through
    // `#[serde(default)]`, so those impls are the built-in layer.
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
                .map(|e| error::figment_error(e, &origin_text))
                .collect(),
        )
    })?;
    // Validation names the variable, not the file, for a key an override set.
    let overrides = if env {
        error::env_overrides(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()))
    } else {
        Vec::new()
    };
    validate::validate(raw, origin, base, secrets, overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text` as the file `test.toml` in `/etc/portcullis`, without environment overrides.
    /// Shared by the tests of the submodules.
    pub(super) fn parse_str(text: &str) -> Result<Config, ConfigErrors> {
        parse(
            text,
            Origin::File("test.toml".into()),
            Path::new("/etc/portcullis"),
            false,
        )
    }

    /// [`parse_str`] without reading secret sources (what [`load_unresolved`] does).
    pub(super) fn parse_str_unresolved(text: &str) -> Result<Config, ConfigErrors> {
        parse_with(
            text,
            Origin::File("test.toml".into()),
            Path::new("/etc/portcullis"),
            false,
            Secrets::Skip,
        )
    }

    /// Splits the leaf keys of `file` (dotted paths) into those whose value equals the built-in
    /// one in `builtin` and those that differ. A table equal as a whole (e.g. `resolve = {}`)
    /// counts as one leaf.
    fn compare_leaves(
        file: &toml::Table,
        builtin: &toml::Table,
        prefix: &str,
        same: &mut Vec<String>,
        differ: &mut Vec<String>,
    ) {
        for (key, value) in file {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match (value, builtin.get(key)) {
                (v, Some(b)) if v == b => same.push(path),
                (toml::Value::Table(f), Some(toml::Value::Table(b))) => {
                    compare_leaves(f, b, &path, same, differ);
                }
                _ => differ.push(path),
            }
        }
    }

    fn builtin_table() -> toml::Table {
        toml::Table::try_from(RawConfig::default()).unwrap()
    }

    fn example_toml() -> &'static str {
        include_str!("../../config/example.toml")
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = parse(EMBEDDED_DEFAULT, Origin::Embedded, Path::new("."), false).unwrap();
        assert_eq!(c.listen.proxy, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(c.limits.max_header_bytes, 65536);
    }

    #[test]
    fn embedded_default_restates_no_builtin_default() {
        let file: toml::Table = EMBEDDED_DEFAULT.parse().unwrap();
        let (mut same, mut differ) = (Vec::new(), Vec::new());
        compare_leaves(&file, &builtin_table(), "", &mut same, &mut differ);
        assert!(
            same.is_empty(),
            "config/default.toml sets {same:?} to the built-in default (the Default impls in \
             src/config/raw.rs): remove them, the built-in value applies anyway"
        );
    }

    #[test]
    fn example_documents_the_builtin_defaults() {
        // example.toml shows every scalar section with its default: it must say what the code does.
        let file: toml::Table = example_toml().parse().unwrap();
        let builtin = builtin_table();
        let (mut same, mut differ) = (Vec::new(), Vec::new());
        for section in ["listen", "limits", "tls", "network", "policy", "audit"] {
            let Some(toml::Value::Table(table)) = file.get(section) else {
                panic!("config/example.toml lacks [{section}]");
            };
            let Some(toml::Value::Table(defaults)) = builtin.get(section) else {
                panic!("no built-in [{section}]");
            };
            compare_leaves(table, defaults, section, &mut same, &mut differ);
        }
        assert!(
            differ.is_empty(),
            "config/example.toml shows {differ:?} with a value other than the built-in default"
        );
        // The comparison itself works for each kind of value (address, integer, path, enum, list).
        for key in [
            "listen.proxy",
            "limits.max_connections",
            "tls.ca_cert",
            "policy.mode",
            "network.allow_cidrs",
        ] {
            assert!(
                same.iter().any(|k| k == key),
                "{key} not compared: {same:?}"
            );
        }
    }

    /// Replaces every `{ env = "VAR" }` secret source with a literal, returning how many: the
    /// test does not set variables in its own (multi-threaded) process.
    fn env_secrets_to_literals(value: &mut toml::Value) -> usize {
        match value {
            toml::Value::Table(t) => {
                if let (1, Some(toml::Value::String(var))) = (t.len(), t.get("env")) {
                    let literal = format!("dummy-{var}");
                    t.clear();
                    t.insert("value".into(), toml::Value::String(literal));
                    return 1;
                }
                t.iter_mut().map(|(_, v)| env_secrets_to_literals(v)).sum()
            }
            toml::Value::Array(a) => a.iter_mut().map(env_secrets_to_literals).sum(),
            _ => 0,
        }
    }

    #[test]
    fn example_config_parses_and_validates() {
        let mut example = toml::Value::Table(example_toml().parse().unwrap());
        assert!(
            env_secrets_to_literals(&mut example) >= 1,
            "example.toml reads GITHUB_TOKEN"
        );
        let text = toml::to_string(&example).unwrap();
        let c = parse_str(&text).unwrap_or_else(|e| panic!("config/example.toml: {e}"));
        assert!(c.credentials.contains_key("github"));
        assert!(!c.rules.is_empty());
        // Our literals are the only thing to warn about.
        for w in &c.warnings {
            assert!(w.contains("literal `value`"), "{w}");
        }
        // Unchanged, it fails only on the variable it needs (the env is not set here).
        if std::env::var_os("GITHUB_TOKEN").is_none() {
            let err = parse_str(example_toml()).unwrap_err();
            assert!(
                err.0
                    .iter()
                    .all(|e| e.key.as_deref() == Some("credentials.github.bearer")),
                "{err}"
            );
        }
    }
}
