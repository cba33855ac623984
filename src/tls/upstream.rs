//! Upstream TLS: the client configuration that verifies real servers against
//! `tls.upstream_roots` (bundled Mozilla roots or the system's) plus `extra_upstream_ca`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::config::{TlsSettings, UpstreamRoots};

use super::{file_err, provider, TlsError};

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
