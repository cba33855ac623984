//! Signed egress requests (RFC 9421, spec §12): the proxy's Ed25519 key, loaded or generated
//! (mode 0600) like the CA; the signature of one request; the public key as SPKI PEM and as a
//! JWKS for receivers. Structured fields are serialized with `sfv`, signatures made with `ring`.
//!
//! Signed components: `"@method" "@authority" "@path" "@query" "portcullis-client"`, and
//! `"content-digest"` when the request has a body; parameters `created`, `keyid`,
//! `alg="ed25519"`; label `portcullis`.

use std::path::{Path, PathBuf};

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair};
use sfv::{key_ref, string_ref, DictSerializer, Integer, KeyRef, StringRef};

/// The signature's label in `Signature-Input` and `Signature`.
pub const LABEL: &str = "portcullis";

/// The fixed DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32-byte key.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Loading, generating or using the signing key failed. Never names key material.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The key file could not be read or written.
    #[error("signing key {path}: {reason}")]
    File {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The file holds no usable Ed25519 PKCS#8 key.
    #[error("signing key {0}: not an Ed25519 private key in PKCS#8 PEM form")]
    Malformed(PathBuf),
    /// A value could not be serialized as a structured field.
    #[error("the signature fields could not be serialized")]
    Serialize,
}

/// The proxy's signing key.
pub struct Signer {
    key_id: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The public key as the admin listener serves it, with the keys it replaced while their
/// rotation overlap lasts (receivers holding a signature made just before a rotation can still
/// verify it).
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedKey {
    /// `/signature/public-key`: SPKI PEM of the current key.
    pub pem: String,
    /// The current key's JWK.
    pub jwk: serde_json::Value,
    /// Replaced keys' JWKs, each until its overlap ends.
    pub previous: Vec<(serde_json::Value, std::time::Instant)>,
}

impl PublishedKey {
    /// `/signature/jwks.json`: the current key, then the previous ones still in their overlap.
    pub fn jwks(&self) -> String {
        let now = std::time::Instant::now();
        let keys: Vec<&serde_json::Value> = std::iter::once(&self.jwk)
            .chain(
                self.previous
                    .iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(k, _)| k),
            )
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    /// What to publish after a reload: `next`, and — when the key changed — the key it
    /// replaces for `overlap`, besides earlier keys still in theirs.
    pub fn rotated(&self, next: PublishedKey, overlap: std::time::Duration) -> PublishedKey {
        if next.jwk == self.jwk {
            return PublishedKey {
                previous: self.previous.clone(),
                ..next
            };
        }
        let now = std::time::Instant::now();
        let mut previous: Vec<_> = self
            .previous
            .iter()
            .filter(|(k, until)| *until > now && *k != next.jwk)
            .cloned()
            .collect();
        previous.push((self.jwk.clone(), now + overlap));
        PublishedKey { previous, ..next }
    }
}

/// The key the admin listener publishes; swapped with each configuration snapshot.
pub type Published = std::sync::Arc<arc_swap::ArcSwapOption<PublishedKey>>;

/// What a request carries once signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// `Signature-Input`.
    pub input: String,
    /// `Signature`.
    pub signature: String,
}

/// The parts of a request that are signed.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// `@method`.
    pub method: &'a str,
    /// `@authority`: host, and the port when it is not the scheme's default.
    pub authority: &'a str,
    /// `@path`.
    pub path: &'a str,
    /// `@query`: `?` and the query (`?` alone without one).
    pub query: &'a str,
    /// `portcullis-client`.
    pub client: &'a str,
    /// `content-digest`, when the request has a body.
    pub content_digest: Option<&'a str>,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl Signer {
    /// Loads the key at `path`; `None` when there is no file (nothing is generated).
    pub fn load(path: &Path, key_id: &str) -> Result<Option<Self>, SigningError> {
        match path.exists() {
            true => Self::load_or_create(path, key_id).map(|(s, _)| Some(s)),
            false => Ok(None),
        }
    }

    /// Loads the key at `path`, or generates one there (parent folders created, mode 0600)
    /// when the file is missing. Returns whether it was generated.
    pub fn load_or_create(path: &Path, key_id: &str) -> Result<(Self, bool), SigningError> {
        let file_err = |e: std::io::Error| SigningError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let (der, created) = if path.exists() {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(file_err)?);
            use rustls::pki_types::pem::PemObject;
            let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes())
                .map_err(|_| SigningError::Malformed(path.to_path_buf()))?;
            (
                zeroize::Zeroizing::new(der.secret_pkcs8_der().to_vec()),
                false,
            )
        } else {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| SigningError::Malformed(path.to_path_buf()))?;
            let der = zeroize::Zeroizing::new(doc.as_ref().to_vec());
            write_private(path, &pem("PRIVATE KEY", &der)).map_err(file_err)?;
            (der, true)
        };
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|_| SigningError::Malformed(path.to_path_buf()))?;
        Ok((
            Self {
                key_id: key_id.to_owned(),
                pair,
            },
            created,
        ))
    }

    /// The public key, as published (no previous key yet).
    pub fn published(&self) -> PublishedKey {
        PublishedKey {
            pem: self.public_key_pem(),
            jwk: self.jwk(),
            previous: Vec::new(),
        }
    }

    /// The key id (`keyid`, the JWKS `kid`).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key as SubjectPublicKeyInfo PEM.
    pub fn public_key_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.pair.public_key().as_ref());
        pem("PUBLIC KEY", &der)
    }

    /// The public key as a JWK (OKP, Ed25519, with its `kid`).
    pub fn jwk(&self) -> serde_json::Value {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.pair.public_key());
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.key_id, "alg": "EdDSA", "use": "sig"})
    }

    /// The public key as a JWKS of one key.
    pub fn jwks(&self) -> String {
        self.published().jwks()
    }

    /// Signs `message` at `created` (Unix seconds).
    pub fn sign(&self, message: &Message<'_>, created: i64) -> Result<Signed, SigningError> {
        let mut components: Vec<&str> = vec![
            "@method",
            "@authority",
            "@path",
            "@query",
            "portcullis-client",
        ];
        if message.content_digest.is_some() {
            components.push("content-digest");
        }
        let input = signature_input(&components, created, &self.key_id)?;
        // The serialized inner list with its parameters: the `@signature-params` value.
        let params = input
            .strip_prefix(&format!("{LABEL}="))
            .ok_or(SigningError::Serialize)?;
        let mut base = String::new();
        for component in &components {
            let value = match *component {
                "@method" => message.method,
                "@authority" => message.authority,
                "@path" => message.path,
                "@query" => message.query,
                "portcullis-client" => message.client,
                _ => message.content_digest.unwrap_or_default(),
            };
            base.push_str(&format!("\"{component}\": {value}\n"));
        }
        base.push_str(&format!("\"@signature-params\": {params}"));
        let signature = self.pair.sign(base.as_bytes());
        let mut dict = DictSerializer::new();
        let _ = dict.bare_item(key_ref(LABEL), signature.as_ref());
        Ok(Signed {
            input,
            signature: dict.finish().ok_or(SigningError::Serialize)?,
        })
    }
}

/// `portcullis=("…" …);created=…;keyid="…";alg="ed25519"`.
fn signature_input(
    components: &[&str],
    created: i64,
    key_id: &str,
) -> Result<String, SigningError> {
    let created = Integer::try_from(created).map_err(|_| SigningError::Serialize)?;
    let key_id = StringRef::from_str(key_id).map_err(|_| SigningError::Serialize)?;
    let mut dict = DictSerializer::new();
    {
        let mut list = dict.inner_list(KeyRef::constant(LABEL));
        for component in components {
            let name = StringRef::from_str(component).map_err(|_| SigningError::Serialize)?;
            let _ = list.bare_item(name);
        }
        let _ = list
            .finish()
            .parameter(key_ref("created"), created)
            .parameter(key_ref("keyid"), key_id)
            .parameter(key_ref("alg"), string_ref("ed25519"));
    }
    dict.finish().ok_or(SigningError::Serialize)
}

/// `sha-256=:…:` of `body` (RFC 9530).
pub fn content_digest(body: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let mut dict = DictSerializer::new();
    let _ = dict.bare_item(key_ref("sha-256"), digest.as_ref());
    dict.finish().unwrap_or_default()
}

/// Writes a private key file: parent folders created, mode 0600 from the start.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    options.open(path)?.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_reloaded_and_signs_verifiably() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/signing-key.pem");
        let (first, created) = Signer::load_or_create(&path, "portcullis").unwrap();
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, created) = Signer::load_or_create(&path, "portcullis").unwrap();
        assert!(!created);
        assert_eq!(first.jwks(), again.jwks());
        assert!(first
            .public_key_pem()
            .starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"));
        let message = Message {
            method: "POST",
            authority: "hooks.example.com",
            path: "/build",
            query: "?",
            client: "frontend",
            content_digest: Some(&content_digest(b"{}")),
        };
        let signed = first.sign(&message, 1_700_000_000).unwrap();
        assert_eq!(
            signed.input,
            r#"portcullis=("@method" "@authority" "@path" "@query" "portcullis-client" "content-digest");created=1700000000;keyid="portcullis";alg="ed25519""#
        );
        assert!(signed.signature.starts_with("portcullis=:") && signed.signature.ends_with(':'));
        assert_eq!(
            content_digest(b"{}"),
            "sha-256=:RBNvo1WzZ4oRRq0W9+hknpT7T8If536DEMBg9hyq/4o=:"
        );
        // A file that is not a key is an error naming the file.
        std::fs::write(dir.path().join("bad.pem"), "nope").unwrap();
        let err = Signer::load_or_create(&dir.path().join("bad.pem"), "k").unwrap_err();
        assert!(err.to_string().contains("bad.pem"));
    }
}
