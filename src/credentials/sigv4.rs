//! The `aws_sigv4` kind (spec §10): the request is re-signed with AWS Signature Version 4 using
//! the configured keys, so a pipeline's AWS SDK signs with dummy keys and the real ones never
//! leave the proxy. The signing itself is the `aws-sigv4` crate's (the one the AWS SDK for Rust
//! uses); this module decides what goes into it:
//!
//! - the client's `Authorization`, `X-Amz-Date` and `X-Amz-Security-Token` are removed;
//! - the payload hash is the client's `x-amz-content-sha256` when present (a SHA-256 digest or an
//!   unsigned mode), else `UNSIGNED-PAYLOAD` for `s3`, else the SHA-256 of the body, which the
//!   pipeline reads whole for it (up to [`MAX_HASHED_BODY_BYTES`]); `x-amz-content-sha256` is
//!   always sent;
//! - signed headers: `host`, `x-amz-date`, `x-amz-content-sha256`, `x-amz-security-token` with a
//!   session token, every other `x-amz-*` header, `content-type` and `content-md5`.
//!
//! A client that signs its body in chunks (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`) cannot be
//! re-signed: each chunk's signature chains from the client's own, made with its dummy key. Such
//! requests are refused with a 400 that says so; the AWS SDKs use unsigned payloads over HTTPS.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4::SigningParams;
use aws_smithy_runtime_api::client::identity::Identity;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde::{Deserialize, Serialize};

use super::{CredentialError, Echoes, Secret, SecretSource};

/// The largest body hashed for a service other than `s3` when the client sent no
/// `x-amz-content-sha256` (spec §10: 10 MiB, else 413).
pub const MAX_HASHED_BODY_BYTES: usize = 10 * 1024 * 1024;

/// The payload hash that says the body is not signed.
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// The client-side hash values that can be carried over as they are: a digest of the body, or a
/// mode in which the body (and its aws-chunked trailer) is not signed.
const UNSIGNED_MODES: [&str; 2] = [UNSIGNED_PAYLOAD, "STREAMING-UNSIGNED-PAYLOAD-TRAILER"];

const X_AMZ_CONTENT_SHA256: &str = "x-amz-content-sha256";

/// `aws_sigv4 = { … }` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSigV4Spec {
    /// The access key id (an identifier, but kept out of the file like the rest).
    pub access_key_id: SecretSource,
    /// The secret access key.
    pub secret_access_key: SecretSource,
    /// A session token for temporary credentials (`x-amz-security-token`).
    #[serde(default)]
    pub session_token: Option<SecretSource>,
    /// The signing region, e.g. `eu-west-1`.
    pub region: String,
    /// The signing service name, e.g. `s3`.
    pub service: String,
}

impl AwsSigV4Spec {
    /// Every secret source with its key under the credential.
    pub fn sources(&self) -> Vec<(&SecretSource, &'static str)> {
        let mut sources = vec![
            (&self.access_key_id, "aws_sigv4.access_key_id"),
            (&self.secret_access_key, "aws_sigv4.secret_access_key"),
        ];
        if let Some(token) = &self.session_token {
            sources.push((token, "aws_sigv4.session_token"));
        }
        sources
    }

    /// The files among the secret sources (watched for rotation).
    pub fn files(&self, base: &Path) -> Vec<PathBuf> {
        self.sources()
            .into_iter()
            .filter_map(|(s, _)| s.file().map(|f| base.join(f)))
            .collect()
    }
}

/// A resolved `aws_sigv4` credential: the keys and the scope requests are signed for.
#[derive(Clone)]
pub struct AwsSigV4 {
    /// The credential's name.
    pub name: Arc<str>,
    secret_access_key: Secret,
    session_token: Option<Secret>,
    /// The signing identity (the crate's copy of the keys).
    identity: Identity,
    region: String,
    service: String,
    /// What must not come back in a response: the secret key and the session token.
    pub echoes: Option<Arc<Echoes>>,
}

impl PartialEq for AwsSigV4 {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.secret_access_key.expose() == other.secret_access_key.expose()
            && self.session_token.as_ref().map(Secret::expose)
                == other.session_token.as_ref().map(Secret::expose)
            && self.region == other.region
            && self.service == other.service
    }
}

impl fmt::Debug for AwsSigV4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsSigV4")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// A request that cannot be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// The client signs its body chunk by chunk with its own key.
    #[error(
        "x-amz-content-sha256 {0} (a body signed in chunks with the client's key) cannot be re-signed; send UNSIGNED-PAYLOAD or the body's SHA-256 (the AWS SDKs do over HTTPS)"
    )]
    SignedChunks(String),
    /// The client's `x-amz-content-sha256` is neither a digest nor an unsigned mode.
    #[error("x-amz-content-sha256 is not a SHA-256 hex digest or UNSIGNED-PAYLOAD")]
    BadContentSha256,
    /// A header that must be signed is not text.
    #[error("header {0} must be visible ASCII to be signed")]
    HeaderNotText(String),
    /// The signing crate refused the request.
    #[error("the request could not be signed")]
    Signing,
}

/// How a request's payload is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadHash<'a> {
    /// The client's `x-amz-content-sha256`, carried over.
    Client,
    /// `UNSIGNED-PAYLOAD`.
    Unsigned,
    /// The SHA-256 of this body, read whole.
    Body(&'a [u8]),
}

impl AwsSigV4 {
    /// Checks `spec` without reading its secrets: region and service are what a credential scope
    /// can hold (lowercase letters, digits, `-`).
    pub fn check(spec: &AwsSigV4Spec) -> Result<(), CredentialError> {
        let scope_safe = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !scope_safe(&spec.region) {
            return Err(CredentialError::Scope("aws_sigv4.region"));
        }
        if !scope_safe(&spec.service) {
            return Err(CredentialError::Scope("aws_sigv4.service"));
        }
        Ok(())
    }

    /// Resolves `spec`'s keys.
    pub fn build(name: &str, spec: &AwsSigV4Spec, base: &Path) -> Result<Self, CredentialError> {
        Self::check(spec)?;
        let resolve = |source: &SecretSource, key| {
            source
                .resolve(base)
                .map_err(|e| CredentialError::KeySecret(key, e))
        };
        let access_key_id = resolve(&spec.access_key_id, "aws_sigv4.access_key_id")?;
        let secret_access_key = resolve(&spec.secret_access_key, "aws_sigv4.secret_access_key")?;
        let session_token = match &spec.session_token {
            Some(source) => Some(resolve(source, "aws_sigv4.session_token")?),
            None => None,
        };
        let identity = aws_credential_types::Credentials::new(
            access_key_id.expose(),
            secret_access_key.expose(),
            session_token.as_ref().map(|t| t.expose().to_owned()),
            None,
            "portcullis",
        )
        .into();
        let mut echoes = vec![secret_access_key.expose().as_bytes()];
        echoes.extend(session_token.as_ref().map(|t| t.expose().as_bytes()));
        let echoes = Echoes::new(&echoes).map(Arc::new);
        Ok(Self {
            name: Arc::from(name),
            secret_access_key,
            session_token,
            identity,
            region: spec.region.clone(),
            service: spec.service.clone(),
            echoes,
        })
    }

    /// The secrets the audit masker must know.
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.secret_access_key).chain(&self.session_token)
    }

    /// Whether signing this request needs its body read whole: no client hash, and a service
    /// other than `s3` (which takes `UNSIGNED-PAYLOAD`).
    pub fn needs_body(&self, headers: &HeaderMap) -> bool {
        self.service != "s3" && !headers.contains_key(X_AMZ_CONTENT_SHA256)
    }

    /// Signs the request in place: the client's signature headers out, ours in. `uri` loses a
    /// default port (`:443` on https), so the `Host` the upstream client derives from it and the
    /// `:authority` of h2 are the host that was signed.
    pub fn sign(
        &self,
        method: &Method,
        uri: &mut Uri,
        headers: &mut HeaderMap,
        body: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<(), SigV4Error> {
        for name in ["authorization", "x-amz-date", "x-amz-security-token"] {
            headers.remove(name);
        }
        let payload = match headers.remove(X_AMZ_CONTENT_SHA256) {
            Some(client) => {
                let text = client.to_str().map_err(|_| SigV4Error::BadContentSha256)?;
                if text.starts_with("STREAMING-") && !UNSIGNED_MODES.contains(&text) {
                    return Err(SigV4Error::SignedChunks(text.to_owned()));
                }
                let digest = text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit());
                if !digest && !UNSIGNED_MODES.contains(&text) {
                    return Err(SigV4Error::BadContentSha256);
                }
                SignableBody::Precomputed(text.to_owned())
            }
            None => match body {
                Some(bytes) if self.service != "s3" => SignableBody::Bytes(bytes),
                _ => SignableBody::UnsignedPayload,
            },
        };
        *uri = without_default_port(uri);
        let mut signed = Vec::new();
        for (name, value) in headers.iter() {
            if is_signed(name) {
                let value = value
                    .to_str()
                    .map_err(|_| SigV4Error::HeaderNotText(name.to_string()))?;
                signed.push((name.as_str(), value));
            }
        }
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = aws_sigv4::http_request::PayloadChecksumKind::XAmzSha256;
        if self.service == "s3" {
            // S3 signs the path as sent: no normalisation, no second encoding.
            settings.percent_encoding_mode = PercentEncodingMode::Single;
            settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        }
        let params = SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name(&self.service)
            .time(now)
            .settings(settings)
            .build()
            .map_err(|_| SigV4Error::Signing)?
            .into();
        let uri_text = uri.to_string();
        let request = SignableRequest::new(method.as_str(), uri_text, signed.into_iter(), payload)
            .map_err(|_| SigV4Error::Signing)?;
        let (instructions, _signature) = sign(request, &params)
            .map_err(|_| SigV4Error::Signing)?
            .into_parts();
        let (added, _) = instructions.into_parts();
        for header in added {
            let mut value =
                HeaderValue::from_str(header.value()).map_err(|_| SigV4Error::Signing)?;
            value.set_sensitive(header.sensitive() || header.name() == "authorization");
            headers.insert(header.name(), value);
        }
        Ok(())
    }
}

/// Whether a request header is one spec §10 signs (besides those the signer adds itself).
fn is_signed(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("x-amz-") || name == "content-type" || name == "content-md5"
}

/// `uri` without an explicit default port for its scheme.
fn without_default_port(uri: &Uri) -> Uri {
    let default = match uri.scheme() {
        Some(s) if *s == Scheme::HTTPS => 443,
        Some(s) if *s == Scheme::HTTP => 80,
        _ => return uri.clone(),
    };
    let Some(authority) = uri.authority() else {
        return uri.clone();
    };
    if authority.port_u16() != Some(default) {
        return uri.clone();
    }
    let host = authority.host();
    let mut parts = uri.clone().into_parts();
    match Authority::try_from(host) {
        Ok(bare) => parts.authority = Some(bare),
        Err(_) => return uri.clone(),
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(service: &str, token: bool) -> AwsSigV4 {
        let spec = AwsSigV4Spec {
            access_key_id: SecretSource::Value("AKIDEXAMPLE".into()),
            secret_access_key: SecretSource::Value(
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            ),
            session_token: token.then(|| SecretSource::Value("session-token-canary".into())),
            region: "us-east-1".into(),
            service: service.into(),
        };
        AwsSigV4::build("aws", &spec, Path::new(".")).unwrap()
    }

    fn signed_headers(headers: &HeaderMap) -> String {
        let auth = headers["authorization"].to_str().unwrap();
        let start = auth.find("SignedHeaders=").unwrap() + "SignedHeaders=".len();
        auth[start..].split(',').next().unwrap().to_owned()
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160)
    }

    #[test]
    fn client_signature_replaced_and_the_spec_headers_signed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=dummy".parse().unwrap(),
        );
        headers.insert("x-amz-date", "19990101T000000Z".parse().unwrap());
        headers.insert("x-amz-security-token", "client-token".parse().unwrap());
        headers.insert("x-amz-meta-build", "42".parse().unwrap());
        headers.insert("content-type", "text/plain".parse().unwrap());
        headers.insert("user-agent", "boto3".parse().unwrap());
        let mut uri: Uri = "https://bucket.s3.test:443/key%20a".parse().unwrap();
        signer("s3", true)
            .sign(&Method::PUT, &mut uri, &mut headers, None, at())
            .unwrap();
        assert_eq!(uri, "https://bucket.s3.test/key%20a");
        assert_eq!(headers["x-amz-date"], "20150830T123600Z");
        assert_eq!(headers["x-amz-content-sha256"], UNSIGNED_PAYLOAD);
        assert_eq!(headers["x-amz-security-token"], "session-token-canary");
        assert!(headers["authorization"].to_str().unwrap().starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/s3/aws4_request"
        ));
        assert_eq!(
            signed_headers(&headers),
            "content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-build;x-amz-security-token"
        );
        assert!(headers["authorization"].is_sensitive());
    }

    #[test]
    fn payload_hash_modes() {
        let empty_sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        // Another service with a body: its hash.
        let mut headers = HeaderMap::new();
        let mut uri: Uri = "https://api.test/".parse().unwrap();
        let s = signer("execute-api", false);
        assert!(s.needs_body(&headers));
        s.sign(&Method::POST, &mut uri, &mut headers, Some(b""), at())
            .unwrap();
        assert_eq!(headers["x-amz-content-sha256"], empty_sha);
        assert!(!headers.contains_key("x-amz-security-token"));
        // The client's digest is carried over, and then no body is needed.
        let mut headers = HeaderMap::new();
        headers.insert("x-amz-content-sha256", empty_sha.parse().unwrap());
        assert!(!s.needs_body(&headers));
        s.sign(&Method::POST, &mut uri, &mut headers, None, at())
            .unwrap();
        assert_eq!(headers["x-amz-content-sha256"], empty_sha);
        // S3 never needs the body.
        assert!(!signer("s3", false).needs_body(&HeaderMap::new()));
        // Chunk-signed bodies and garbage are refused.
        for (value, expected) in [
            (
                "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
                SigV4Error::SignedChunks("STREAMING-AWS4-HMAC-SHA256-PAYLOAD".into()),
            ),
            ("abc", SigV4Error::BadContentSha256),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("x-amz-content-sha256", value.parse().unwrap());
            let err = s
                .sign(&Method::PUT, &mut uri, &mut headers, None, at())
                .unwrap_err();
            assert_eq!(err, expected);
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-amz-content-sha256",
            "STREAMING-UNSIGNED-PAYLOAD-TRAILER".parse().unwrap(),
        );
        s.sign(&Method::PUT, &mut uri, &mut headers, None, at())
            .unwrap();
        assert_eq!(
            headers["x-amz-content-sha256"],
            "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
        );
    }

    #[test]
    fn scope_checked_and_debug_shows_no_key() {
        let mut spec = AwsSigV4Spec {
            access_key_id: SecretSource::Value("AKID".into()),
            secret_access_key: SecretSource::Value("very-secret-canary".into()),
            session_token: None,
            region: "eu-west-1".into(),
            service: "s3".into(),
        };
        let s = AwsSigV4::build("aws", &spec, Path::new(".")).unwrap();
        assert!(!format!("{s:?}").contains("very-secret"));
        spec.region = "EU West".into();
        assert_eq!(
            AwsSigV4::check(&spec).unwrap_err(),
            CredentialError::Scope("aws_sigv4.region")
        );
    }
}
