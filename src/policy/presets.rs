//! Built-in host presets (spec §2): `preset = "pypi"` in a `[[hosts]]` rule stands for a group of
//! host patterns. The groups live in one data file, `config/presets.toml`, compiled in; tests hold
//! every pattern to the host-pattern rules and every preset to the list the spec names.

use std::sync::OnceLock;

use serde::Deserialize;

/// The preset data file, compiled in.
const PRESETS_TOML: &str = include_str!("../../config/presets.toml");

/// One preset: its name, what it is for, and its host patterns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// The name `preset = …` uses (the table's key).
    #[serde(skip)]
    pub name: String,
    /// One line on what the preset is for.
    pub description: String,
    /// Host patterns (exact names, or `*.suffix`).
    pub hosts: Vec<String>,
}

/// Every preset, in the data file's order.
pub fn presets() -> &'static [Preset] {
    static PRESETS: OnceLock<Vec<Preset>> = OnceLock::new();
    PRESETS.get_or_init(|| parse(PRESETS_TOML).unwrap_or_default())
}

/// The preset called `name`.
pub fn preset(name: &str) -> Option<&'static Preset> {
    presets().iter().find(|p| p.name == name)
}

/// The presets of a data file, in its order. (The compiled-in file is valid: a test says so.)
fn parse(text: &str) -> Result<Vec<Preset>, toml::de::Error> {
    let table: toml::Table = toml::from_str(text)?;
    let mut out = Vec::with_capacity(table.len());
    // `toml::Table` keeps keys sorted; the file's order is what `presets` prints, so read it
    // back from the text.
    let mut names: Vec<&String> = table.keys().collect();
    names.sort_by_key(|name| text.find(&format!("[{name}]")).unwrap_or(usize::MAX));
    for name in names {
        let mut preset: Preset = table[name].clone().try_into()?;
        preset.name = name.clone();
        out.push(preset);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Host, HostPattern};

    #[test]
    fn the_data_file_parses_with_every_preset_the_spec_names() {
        let parsed = parse(PRESETS_TOML).unwrap();
        assert_eq!(parsed, presets());
        for name in [
            "pypi", "npm", "crates", "go", "maven", "rubygems", "nuget", "github", "gitlab",
            "docker", "debian", "ubuntu", "alpine",
        ] {
            let p = preset(name).unwrap_or_else(|| panic!("preset {name}"));
            assert!(!p.hosts.is_empty() && !p.description.is_empty(), "{name}");
        }
        assert_eq!(presets()[0].name, "pypi", "file order is kept");
    }

    #[test]
    fn every_preset_host_matches_and_nothing_else_does() {
        for p in presets() {
            let patterns: Vec<HostPattern> = p
                .hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap_or_else(|e| panic!("{}: {h}: {e}", p.name)))
                .collect();
            let matches = |host: &str| {
                let host = Host::parse(host).unwrap();
                patterns.iter().any(|pat| pat.matches(&host))
            };
            for h in &p.hosts {
                match h.strip_prefix("*.") {
                    Some(suffix) => {
                        assert!(matches(&format!("cdn.{suffix}")), "{}: {h}", p.name);
                        assert!(!matches(suffix), "{}: {h} is not its apex", p.name);
                    }
                    None => {
                        assert!(matches(h), "{}: {h}", p.name);
                        assert!(!matches(&format!("{h}.evil.example")), "{}: {h}", p.name);
                        assert!(!matches(&format!("evil-{h}")), "{}: {h}", p.name);
                    }
                }
            }
            assert!(!matches("evil.example"), "{}", p.name);
        }
    }
}
