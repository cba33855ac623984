//! The CA bundle for tools whose CA variable *replaces* their roots (curl, git, pip, Python
//! requests, the AWS tools…): the Portcullis CA followed by the system roots, so intercepted hosts
//! (leaves minted from our CA) and tunneled hosts (their real certificates) both verify.
//! `ca show --bundle` prints it ([`ca_bundle_pem`]); `env` keeps a copy beside the CA certificate
//! ([`write_bundle`]). The system roots are whatever `rustls-native-certs` finds, which honours
//! `SSL_CERT_FILE` and `SSL_CERT_DIR`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::{file_err, TlsError};

/// File name of the bundle `env` writes beside the CA certificate.
pub const BUNDLE_FILE_NAME: &str = "ca-bundle.pem";

/// The bundle text: `ca_pem` as written, then every system root that is not already in it.
///
/// The roots are sorted and deduplicated, so the text depends only on which roots there are (not
/// on the order the store lists them): [`write_bundle`] compares texts to decide whether its copy
/// is stale. Dropping the roots equal to our CA keeps the bundle from growing when the "system"
/// store is itself a bundle `env` wrote (a shell that sourced `env`'s output has `SSL_CERT_FILE`
/// pointing at it).
pub fn ca_bundle_pem(ca_pem: &str) -> Result<String, TlsError> {
    let ours: BTreeSet<Vec<u8>> = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .filter_map(Result::ok)
        .map(|cert| cert.as_ref().to_vec())
        .collect();
    let found = rustls_native_certs::load_native_certs();
    let roots: BTreeSet<Vec<u8>> = found
        .certs
        .iter()
        .map(|cert| cert.as_ref().to_vec())
        .filter(|der| !ours.contains(der))
        .collect();
    if roots.is_empty() {
        return Err(TlsError::Config(
            "no system root certificates found (install the ca-certificates package, or point \
             SSL_CERT_FILE at a PEM bundle of roots)"
                .into(),
        ));
    }
    let mut out = String::with_capacity(ca_pem.len() + roots.len() * 2048);
    out.push_str(ca_pem);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    for der in &roots {
        push_pem(&mut out, der);
    }
    Ok(out)
}

/// Appends one certificate as PEM (64-character lines, as OpenSSL writes them).
fn push_pem(out: &mut String, der: &[u8]) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
}

/// Makes `ca-bundle.pem` beside `ca_cert` hold [`ca_bundle_pem`] of it, and returns its path:
/// written when missing or stale (its content differs from what it would be now: the CA was
/// replaced, the system roots changed), left alone otherwise (its modification time too).
/// Written to a temporary file and renamed over the old one, so a tool reading it concurrently
/// sees the old bundle or the new one, never half of one.
pub fn write_bundle(ca_cert: &Path) -> Result<PathBuf, TlsError> {
    let path = ca_cert.with_file_name(BUNDLE_FILE_NAME);
    if path == ca_cert {
        // Writing the bundle would overwrite the CA certificate itself.
        return Err(TlsError::Config(format!(
            "the CA certificate {} is named {BUNDLE_FILE_NAME}, the name of the bundle written \
             beside it: rename it, or pass --ca-file",
            ca_cert.display()
        )));
    }
    let ca_pem = std::fs::read_to_string(ca_cert).map_err(|e| file_err(ca_cert, e))?;
    let text = ca_bundle_pem(&ca_pem)?;
    // Missing, different or unreadable: (re)write it; the write names the problem if it fails.
    if std::fs::read(&path).is_ok_and(|current| current == text.as_bytes()) {
        return Ok(path);
    }
    let tmp = path.with_file_name(format!(".{BUNDLE_FILE_NAME}.{}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, &text)
        .map_err(|e| file_err(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| file_err(&path, e)));
    if written.is_err() {
        // Best effort: a failed write must not leave a stray temporary file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_pem_round_trips() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut pem = String::new();
        push_pem(&mut pem, &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let parsed: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.unwrap().as_ref().to_vec())
            .collect();
        assert_eq!(parsed, vec![der]);
    }
}
