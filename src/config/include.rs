//! Layered files (spec §2): a top-level `include = ["base.toml", "teams/*.toml"]` merges other
//! files first, in order (a glob's matches sorted; a glob only in the last path component), paths
//! relative to the including file, nested includes allowed. A cycle is an error; a named file
//! that is missing is an error; a glob that matches nothing is not.
//!
//! Merging: `hosts` and `clients` are concatenated (included files first, then the file's own);
//! tables merge key by key; any other key set in two files is an error naming both. Relative
//! paths inside an included file (secret `{ file }` sources, `tls.ca_cert`/`ca_key`/
//! `extra_upstream_ca`, `audit.output`, `oidc.jwks_file`) are made absolute against that file's
//! folder, so they keep meaning what they meant there. Every file read (and every glob's
//! folder, for files that appear later) is returned for the reload watcher.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::error::toml_syntax_error;
use super::{ConfigError, ConfigErrors};

/// Top-level keys whose arrays concatenate across files.
const CONCATENATED: [&str; 2] = ["hosts", "clients"];

/// A configuration assembled from a file and everything it includes.
#[derive(Debug)]
pub struct Assembled {
    /// The merged table.
    pub table: Table,
    /// Every file read, and every glob's folder: what the reload watcher must watch.
    pub watched: Vec<PathBuf>,
    /// For each `hosts` and `clients` entry of the merged table, the file it came from.
    pub origins: BTreeMap<&'static str, Vec<PathBuf>>,
    /// Every other key (dotted path, tables and the keys inside them) and the file that set it.
    pub setters: BTreeMap<String, PathBuf>,
    /// Whether anything was included (else the file's own text can be used as it is).
    pub included: bool,
}

fn error(origin: &Path, key: Option<String>, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        origin: origin.display().to_string(),
        key,
        position: None,
        message,
    }])
}

/// Reads `path` and everything it includes, merged.
pub fn assemble(path: &Path, text: &str) -> Result<Assembled, ConfigErrors> {
    let mut assembled = Assembled {
        table: Table::new(),
        watched: Vec::new(),
        origins: BTreeMap::new(),
        setters: BTreeMap::new(),
        included: false,
    };
    let mut setters = BTreeMap::new();
    load(
        path,
        text,
        true,
        &mut Vec::new(),
        &mut assembled,
        &mut setters,
    )?;
    assembled.setters = setters;
    Ok(assembled)
}

/// Loads one file (its includes first) into `out`. `setters` names the file that set each
/// non-concatenated key, for conflicts.
fn load(
    path: &Path,
    text: &str,
    root: bool,
    stack: &mut Vec<PathBuf>,
    out: &mut Assembled,
    setters: &mut BTreeMap<String, PathBuf>,
) -> Result<(), ConfigErrors> {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(at) = stack.iter().position(|p| *p == canonical) {
        let cycle: Vec<String> = stack[at..]
            .iter()
            .chain(std::iter::once(&canonical))
            .map(|p| p.display().to_string())
            .collect();
        return Err(error(
            path,
            Some("include".into()),
            format!("include cycle: {}", cycle.join(" -> ")),
        ));
    }
    let mut table: Table = text.parse().map_err(|e| {
        ConfigErrors(vec![toml_syntax_error(
            &e,
            text,
            &path.display().to_string(),
        )])
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let includes = match table.remove("include") {
        None => Vec::new(),
        // Even an empty list: the key is not a configuration key, so the merged form is used.
        Some(Value::Array(items)) if items.is_empty() => {
            out.included = true;
            Vec::new()
        }
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(error(
                    path,
                    Some("include".into()),
                    "must be a list of paths".into(),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(error(
                path,
                Some("include".into()),
                "must be a list of paths".into(),
            ))
        }
    };
    stack.push(canonical);
    for (i, entry) in includes.iter().enumerate() {
        out.included = true;
        for file in expand(path, dir, i, entry, &mut out.watched)? {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                error(
                    path,
                    Some(format!("include[{i}]")),
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            out.watched.push(file.clone());
            load(&file, &text, false, stack, out, setters)?;
        }
    }
    stack.pop();
    if !root {
        absolutize(&mut table, dir);
    }
    merge(path, table, out, setters)
}

/// The files an `include` entry names: itself (which must exist), or a glob's matches, sorted.
fn expand(
    including: &Path,
    dir: &Path,
    index: usize,
    entry: &str,
    watched: &mut Vec<PathBuf>,
) -> Result<Vec<PathBuf>, ConfigErrors> {
    let full = dir.join(entry);
    let name = full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?', '[']) {
        if !full.is_file() {
            return Err(error(
                including,
                Some(format!("include[{index}]")),
                format!("{} does not exist", full.display()),
            ));
        }
        return Ok(vec![full]);
    }
    let folder = full.parent().unwrap_or(dir).to_path_buf();
    let matcher = globset::Glob::new(&name)
        .map_err(|e| error(including, Some(format!("include[{index}]")), e.to_string()))?
        .compile_matcher();
    watched.push(folder.clone());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.file_name().is_some_and(|n| matcher.is_match(n)))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    Ok(files)
}

/// Merges one file's own table into `out`.
fn merge(
    path: &Path,
    table: Table,
    out: &mut Assembled,
    setters: &mut BTreeMap<String, PathBuf>,
) -> Result<(), ConfigErrors> {
    for (key, value) in table {
        if let Some(list) = CONCATENATED.iter().find(|k| **k == key) {
            let Value::Array(items) = value else {
                return Err(error(path, Some(key), "must be an array of tables".into()));
            };
            let origins = out.origins.entry(list).or_default();
            origins.extend(std::iter::repeat_n(path.to_path_buf(), items.len()));
            match out.table.get_mut(&key) {
                Some(Value::Array(existing)) => existing.extend(items),
                _ => {
                    out.table.insert(key, Value::Array(items));
                }
            }
            continue;
        }
        merge_value(path, &key, value, &mut out.table, setters)?;
    }
    Ok(())
}

/// Merges `value` at `key` into `into`: tables key by key; anything else set twice is an error
/// naming both files.
fn merge_value(
    path: &Path,
    key: &str,
    value: Value,
    into: &mut Table,
    setters: &mut BTreeMap<String, PathBuf>,
) -> Result<(), ConfigErrors> {
    let leaf = key.rsplit('.').next().unwrap_or(key).to_owned();
    match (into.get_mut(&leaf), value) {
        (Some(Value::Table(existing)), Value::Table(incoming)) => {
            for (k, v) in incoming {
                merge_value(path, &format!("{key}.{k}"), v, existing, setters)?;
            }
            Ok(())
        }
        (None, value) => {
            record(path, key, &value, setters);
            into.insert(leaf, value);
            Ok(())
        }
        (Some(_), _) => {
            let first = setters
                .get(key)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "another file".into());
            Err(error(
                path,
                Some(key.to_owned()),
                format!("is set in both {first} and {}", path.display()),
            ))
        }
    }
}

/// Notes `path` as the file that set `key` and, for a table, every key inside it.
fn record(path: &Path, key: &str, value: &Value, setters: &mut BTreeMap<String, PathBuf>) {
    setters.insert(key.to_owned(), path.to_path_buf());
    if let Value::Table(t) = value {
        for (k, v) in t {
            record(path, &format!("{key}.{k}"), v, setters);
        }
    }
}

/// Makes the relative paths of an included file's table absolute against its folder.
fn absolutize(table: &mut Table, dir: &Path) {
    let fix = |value: &mut Value| {
        if let Value::String(s) = value {
            let p = Path::new(s.as_str());
            if p.is_relative() {
                *s = dir.join(p).display().to_string();
            }
        }
    };
    if let Some(Value::Table(tls)) = table.get_mut("tls") {
        for key in ["ca_cert", "ca_key"] {
            if let Some(v) = tls.get_mut(key) {
                fix(v);
            }
        }
        if let Some(Value::Array(list)) = tls.get_mut("extra_upstream_ca") {
            list.iter_mut().for_each(fix);
        }
    }
    if let Some(Value::Table(audit)) = table.get_mut("audit") {
        if let Some(v) = audit.get_mut("output") {
            if !matches!(v.as_str(), Some("stdout" | "stderr")) {
                fix(v);
            }
        }
    }
    // Secret sources ({ file = … }) and jwks_file, wherever they are.
    fn walk(value: &mut Value, dir: &Path) {
        match value {
            Value::Table(t) => {
                for (k, v) in t.iter_mut() {
                    if k == "file" || k == "jwks_file" {
                        if let Value::String(s) = v {
                            if Path::new(s.as_str()).is_relative() {
                                *s = dir.join(s.as_str()).display().to_string();
                            }
                        }
                    } else {
                        walk(v, dir);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, dir)),
            _ => {}
        }
    }
    for key in ["credentials", "clients"] {
        if let Some(v) = table.get_mut(key) {
            walk(v, dir);
        }
    }
}
