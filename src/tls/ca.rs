//! The interception certificate authority: generated (ECDSA P-256, ten years, path length 0)
//! or loaded from PEM, written with the key at mode 0600, and minting leaves: ECDSA P-256 with a
//! random 128-bit serial, `not_before` an hour in the past (clock skew), a DNS or IP SAN, sent
//! with the CA certificate as a full chain.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Duration as StdDuration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::policy::Host;

use super::{cert_err, file_err, TlsError};

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

    /// What `check` reports, without creating anything: `true` when both files exist and hold
    /// a usable CA, `false` when neither exists (generated at first start), an error for one
    /// without the other or a CA that does not load — what `run` would refuse.
    pub fn inspect(cert: &Path, key: &Path) -> Result<bool, TlsError> {
        match (cert.exists(), key.exists()) {
            (false, false) => Ok(false),
            (true, true) => Self::load_or_create(cert, key).map(|_| true),
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
pub(super) const LEAF_REFRESH: StdDuration = StdDuration::from_secs(7 * 24 * 3600);

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

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::RootCertStore;

    use crate::tls::provider;

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
