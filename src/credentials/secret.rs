//! Secrets: where they come from (`{ env }`, `{ file }`, `{ value }`) and how they are held —
//! zeroized on drop, redacted in `Debug`; every error names the source, never the value.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Where a secret is read from.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SecretSource {
    /// An environment variable.
    Env(String),
    /// A file; trailing CR/LF are trimmed. Relative to the config file's folder.
    File(PathBuf),
    /// A literal (tests only; `check` warns).
    Value(String),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(var) => write!(f, "env:{var}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::Value(_) => f.write_str("value:<HIDDEN>"),
        }
    }
}

/// Reading a secret failed. Names the variable or file, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The variable is unset (or not unicode).
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    /// The file cannot be read.
    #[error("cannot read secret file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The source yielded an empty value.
    #[error("{0} is empty")]
    Empty(String),
    /// The value cannot go into an HTTP header (control characters).
    #[error("{0} contains characters that cannot be sent in an HTTP header")]
    NotHeaderSafe(String),
}

/// A secret value: zeroized when dropped, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<HIDDEN>)")
    }
}

impl Secret {
    /// The value itself, for building the injected header and for the audit masker.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A secret obtained at runtime (a minted token).
    pub(super) fn from_value(value: Zeroizing<String>) -> Self {
        Self(value)
    }

    /// A stand-in for a secret that was not read, so [`super::Credential::check`] runs the same
    /// checks as a real build. Header-safe, like any resolved secret, so it decides nothing.
    pub(super) fn placeholder() -> Self {
        Self(Zeroizing::new("unresolved".to_owned()))
    }
}

impl SecretSource {
    /// Resolves the source, with relative files taken from `base`.
    pub fn resolve(&self, base: &Path) -> Result<Secret, SecretError> {
        self.resolve_lines(base, false)
    }

    /// Resolves a multi-line secret (a PEM private key): line breaks are allowed inside it.
    pub fn resolve_multiline(&self, base: &Path) -> Result<Secret, SecretError> {
        self.resolve_lines(base, true)
    }

    fn resolve_lines(&self, base: &Path, lines: bool) -> Result<Secret, SecretError> {
        let (value, what) = match self {
            Self::Env(var) => (
                Zeroizing::new(
                    std::env::var(var).map_err(|_| SecretError::MissingEnv(var.clone()))?,
                ),
                format!("environment variable {var}"),
            ),
            Self::File(path) => {
                let full = base.join(path);
                let raw = std::fs::read_to_string(&full).map_err(|e| SecretError::File {
                    path: full.display().to_string(),
                    reason: e.kind().to_string(),
                })?;
                let mut raw = Zeroizing::new(raw);
                let trimmed_len = raw.trim_end_matches(['\r', '\n']).len();
                raw.truncate(trimmed_len);
                (raw, format!("secret file {}", full.display()))
            }
            Self::Value(v) => (Zeroizing::new(v.clone()), "literal value".to_owned()),
        };
        if value.is_empty() {
            return Err(SecretError::Empty(what));
        }
        if value
            .bytes()
            .any(|b| b.is_ascii_control() && b != b'\t' && !(lines && (b == b'\n' || b == b'\r')))
        {
            return Err(SecretError::NotHeaderSafe(what));
        }
        Ok(Secret(value))
    }

    /// The secret file this source reads, if any (watched for rotation).
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::File(p) => Some(p),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_trimmed_and_missing_sources_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\r\n\n").unwrap();
        let s = SecretSource::File("pw".into()).resolve(dir.path()).unwrap();
        assert_eq!(s.expose(), "s3cret");
        let err = SecretSource::File("nope".into())
            .resolve(dir.path())
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = SecretSource::Env("PORTCULLIS_TEST_SURELY_UNSET".into())
            .resolve(dir.path())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable PORTCULLIS_TEST_SURELY_UNSET is not set"
        );
    }
}
