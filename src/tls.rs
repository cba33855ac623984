//! TLS: the interception CA (load, or generate on first start; `ca init`), leaf certificates
//! minted per CONNECT host and cached (one mint per host however many clients race for it), and
//! the client configuration that verifies real upstream servers.
//!
//! Leaves are ECDSA P-256 with a random 128-bit serial, `not_before` an hour in the past (clock
//! skew), a DNS or IP SAN, and are sent with the CA certificate as a full chain.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use time::{Duration, OffsetDateTime};

use crate::config::{TlsSettings, UpstreamRoots};
use crate::policy::Host;

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

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| TlsError::Certificate("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // positive and a full 16 bytes long
    Ok(SerialNumber::from_slice(&bytes))
}

/// The interception certificate authority.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

/// Material of a new CA: certificate PEM and key PEM.
pub struct NewCa {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (written with mode 0600, never logged).
    pub key_pem: zeroize::Zeroizing<String>,
}

impl CertificateAuthority {
    /// Generates a new CA: ECDSA P-256, valid for ten years, path length 0.
    pub fn generate() -> Result<NewCa, TlsError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Portcullis interception CA");
        dn.push(DnType::OrganizationName, "Portcullis");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(NewCa {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }

    /// Parses a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| cert_err(format!("CA key: {e}")))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| cert_err(format!("CA certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| cert_err(format!("CA certificate: {e}")))?;
        Ok(Self {
            issuer,
            cert_der,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// Loads the CA at `cert`/`key`; when both are missing, generates one and writes it there.
    /// Returns the CA and whether it was generated.
    pub fn load_or_create(cert: &Path, key: &Path) -> Result<(Self, bool), TlsError> {
        match (cert.exists(), key.exists()) {
            (true, true) => {
                let cert_pem = std::fs::read_to_string(cert).map_err(|e| file_err(cert, e))?;
                let key_pem = zeroize::Zeroizing::new(
                    std::fs::read_to_string(key).map_err(|e| file_err(key, e))?,
                );
                Ok((Self::from_pem(&cert_pem, &key_pem)?, false))
            }
            (false, false) => {
                let new = Self::generate()?;
                write_ca(&new, cert, key)?;
                Ok((Self::from_pem(&new.cert_pem, &new.key_pem)?, true))
            }
            _ => Err(TlsError::HalfCa {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            }),
        }
    }

    /// The CA certificate, PEM (what clients must trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Mints a leaf for `host`: its chain (leaf, CA) and key.
    pub fn mint(
        &self,
        host: &Host,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match host {
            Host::Ip(ip) => SanType::IpAddress(*ip),
            Host::Name(name) => SanType::DnsName(name.clone().try_into().map_err(cert_err)?),
        }];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![leaf.der().clone(), self.cert_der.clone()], key_der))
    }
}

const LEAF_VALIDITY_DAYS: i64 = 30;
/// Cached leaves are re-minted well before they expire.
const LEAF_REFRESH: StdDuration = StdDuration::from_secs(7 * 24 * 3600);

/// Writes a new CA: the key with mode 0600, created exclusively unless `force`.
pub fn write_ca(new: &NewCa, cert: &Path, key: &Path) -> Result<(), TlsError> {
    for path in [cert, key] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        }
    }
    write_private(key, new.key_pem.as_bytes())?;
    std::fs::write(cert, new.cert_pem.as_bytes()).map_err(|e| file_err(cert, e))?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| file_err(path, e))?;
    // An existing file keeps its old mode on open: tighten it explicitly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| file_err(path, e))?;
    }
    file.write_all(bytes).map_err(|e| file_err(path, e))
}

/// `portcullis ca init`: writes a new CA, refusing to overwrite unless `force`.
pub fn init_ca(cert: &Path, key: &Path, force: bool) -> Result<(), TlsError> {
    if !force {
        for path in [cert, key] {
            if path.exists() {
                return Err(TlsError::Exists(path.to_path_buf()));
            }
        }
    }
    write_ca(&CertificateAuthority::generate()?, cert, key)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn minted_leaves_chain_to_the_ca_with_unique_serials() {
        let new = CertificateAuthority::generate().unwrap();
        let ca = CertificateAuthority::from_pem(&new.cert_pem, &new.key_pem).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for host in ["api.example.com", "192.0.2.10", "2001:db8::1"] {
            let h = Host::parse(host).unwrap();
            let (chain, _) = ca.mint(&h).unwrap();
            assert_eq!(chain.len(), 2, "leaf + CA");
            let name = rustls::pki_types::ServerName::try_from(host).unwrap();
            verifier
                .verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
                .unwrap_or_else(|e| panic!("{host}: {e}"));
            let other = rustls::pki_types::ServerName::try_from("other.example.com").unwrap();
            assert!(verifier
                .verify_server_cert(&chain[0], &chain[1..], &other, &[], now)
                .is_err());
        }
        let (a, _) = ca.mint(&Host::parse("a.example").unwrap()).unwrap();
        let (b, _) = ca.mint(&Host::parse("a.example").unwrap()).unwrap();
        let parse = |der: &CertificateDer<'_>| {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
            (
                cert.tbs_certificate.raw_serial().to_vec(),
                cert.validity().not_before.timestamp(),
            )
        };
        let (serial_a, not_before) = parse(&a[0]);
        let (serial_b, _) = parse(&b[0]);
        assert_ne!(serial_a, serial_b);
        assert_eq!(serial_a.len(), 16);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(
            now - not_before >= 3500,
            "not_before is in the past for clock skew"
        );
    }

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

    #[test]
    fn load_or_create_generates_once_and_protects_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("state/ca.pem");
        let key = dir.path().join("state/ca-key.pem");
        let (first, created) = CertificateAuthority::load_or_create(&cert, &key).unwrap();
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let (second, created) = CertificateAuthority::load_or_create(&cert, &key).unwrap();
        assert!(!created);
        assert_eq!(first.cert_pem(), second.cert_pem());
        std::fs::remove_file(&key).unwrap();
        assert!(matches!(
            CertificateAuthority::load_or_create(&cert, &key),
            Err(TlsError::HalfCa { .. })
        ));
        assert!(matches!(
            init_ca(&cert, &key, false),
            Err(TlsError::Exists(_))
        ));
        init_ca(&cert, &key, true).unwrap();
    }
}
