//! TLS: the interception CA ([`ca`]: load, or generate on first start; `ca init`), leaf
//! certificates minted per CONNECT host and cached ([`leaves`]), the client configuration
//! that verifies real upstream servers ([`upstream`]), and the CA bundle (our CA + the system
//! roots) for tools whose CA variable replaces their roots ([`bundle`]). Every configuration uses
//! one crypto provider ([`provider`]).

mod bundle;
mod ca;
mod leaves;
mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use bundle::{ca_bundle_pem, write_bundle, BUNDLE_FILE_NAME};
pub use ca::{init_ca, write_ca, CertificateAuthority, NewCa};
pub use leaves::Interceptor;
pub use upstream::upstream_client_config;

/// TLS setup failed. Names files, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Only one of the CA certificate and key exists.
    #[error("CA certificate {cert} and key {key}: one exists without the other; restore both, or remove both to generate a new CA")]
    HalfCa {
        /// Certificate path.
        cert: PathBuf,
        /// Key path.
        key: PathBuf,
    },
    /// `ca init` would overwrite.
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    /// The CA or a leaf could not be built or parsed.
    #[error("certificate error: {0}")]
    Certificate(String),
    /// A rustls configuration could not be built.
    #[error("TLS configuration error: {0}")]
    Config(String),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn cert_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Certificate(e.to_string())
}

/// The crypto provider every TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first, within each protocol version: as strong as this use needs, and its
    // SHA-256 runs on the CPU's SHA extensions where SHA-384 runs in software. Measured: a
    // handshake-bound load spent ~9% of the proxy's CPU in SHA-512 with AES-256-GCM-SHA384
    // first (docs/benchmarks.md).
    provider.cipher_suites.sort_by_key(|suite| {
        let name = format!("{:?}", suite.suite());
        (
            suite.version().version != rustls::ProtocolVersion::TLSv1_3,
            !name.contains("AES_128_GCM"),
        )
    });
    Arc::new(provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_preferred() {
        let suites: Vec<String> = provider()
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(suites[0], "TLS13_AES_128_GCM_SHA256", "{suites:?}");
        assert!(
            suites[1].starts_with("TLS13_"),
            "TLS 1.3 suites stay first: {suites:?}"
        );
    }
}
