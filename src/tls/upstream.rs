//! Upstream TLS: the client configuration that verifies real servers against
//! `tls.upstream_roots` (bundled Mozilla roots or the system's) plus `extra_upstream_ca`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::config::{TlsSettings, UpstreamRoots};

use super::{file_err, provider, TlsError};

/// The operating system's root certificates as PEM (for `ca show --bundle`).
pub fn system_roots_pem() -> Result<String, TlsError> {
    use base64::Engine;
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        return Err(TlsError::Config("no system root certificates found".into()));
    }
    let mut out = String::new();
    for cert in found.certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    Ok(out)
}

/// The client configuration for upstream TLS: `tls.upstream_roots` plus `extra_upstream_ca`.
pub fn upstream_client_config(settings: &TlsSettings) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match settings.upstream_roots {
        UpstreamRoots::Webpki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        UpstreamRoots::System => {
            let found = rustls_native_certs::load_native_certs();
            for err in &found.errors {
                tracing::warn!(error = %err, "while loading system roots");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::Config(
                    "tls.upstream_roots = \"system\" but no system root certificate was found"
                        .into(),
                ));
            }
        }
    }
    for path in &settings.extra_upstream_ca {
        let pem = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| file_err(path, e))?;
            roots.add(cert).map_err(|e| file_err(path, e))?;
            count += 1;
        }
        if count == 0 {
            return Err(file_err(path, "no PEM certificate found"));
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
