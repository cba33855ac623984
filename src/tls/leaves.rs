//! Leaf certificates for intercepted CONNECT hosts: minted from the CA on first use, cached
//! (one mint per host however many clients race for it), re-minted well before they expire.

use std::sync::Arc;
use std::time::Instant;

use rustls::crypto::CryptoProvider;
use rustls::ServerConfig;

use crate::policy::Host;

use super::ca::{CertificateAuthority, LEAF_REFRESH};
use super::{provider, TlsError};

#[derive(Clone)]
struct CachedLeaf {
    config: Arc<ServerConfig>,
    minted: Instant,
}

/// Terminates client TLS for intercepted CONNECTs: the CA plus a cache of per-host server
/// configurations (each built once, never per connection).
pub struct Interceptor {
    ca: CertificateAuthority,
    cache: quick_cache::sync::Cache<Host, CachedLeaf>,
    issued: prometheus::IntCounter,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("issued", &self.issued())
            .finish_non_exhaustive()
    }
}

/// How many hosts' leaves are kept.
const CERT_CACHE_HOSTS: usize = 10_000;

impl Interceptor {
    /// An interceptor minting from `ca`, counting mints in `issued`.
    pub fn new(ca: CertificateAuthority, issued: prometheus::IntCounter) -> Self {
        Self {
            ca,
            cache: quick_cache::sync::Cache::new(CERT_CACHE_HOSTS),
            issued,
            provider: provider(),
        }
    }

    /// The CA.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// Leaves minted so far.
    pub fn issued(&self) -> u64 {
        self.issued.get()
    }

    /// The server configuration for `host`, minting its leaf on first use. Concurrent first
    /// requests for one host wait for a single mint.
    pub async fn server_config(&self, host: &Host) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(cached) = self.cache.get(host) {
            if cached.minted.elapsed() < LEAF_REFRESH {
                return Ok(cached.config);
            }
            self.cache.remove(host);
        }
        let leaf = self
            .cache
            .get_or_insert_async(host, async {
                let (chain, key) = self.ca.mint(host)?;
                let mut config = ServerConfig::builder_with_provider(self.provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| TlsError::Config(e.to_string()))?
                    .with_no_client_auth()
                    .with_single_cert(chain, key)
                    .map_err(|e| TlsError::Config(e.to_string()))?;
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                // Our cipher-suite order (see `provider`), not the client's.
                config.ignore_client_order = true;
                self.issued.inc();
                tracing::debug!(%host, "minted interception certificate");
                Ok::<_, TlsError>(CachedLeaf {
                    config: Arc::new(config),
                    minted: Instant::now(),
                })
            })
            .await?;
        Ok(leaf.config)
    }
}
