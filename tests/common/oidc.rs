//! A local OIDC issuer for the OIDC-client tests (spec §4): served over TLS (a throwaway CA from
//! [`super::test_pki`]) under a test name (`issuer.test`, resolved by the proxy's
//! `network.resolve`), it answers `/.well-known/openid-configuration` and the JWKS it names,
//! counts both, and lets a test swap the JWKS at runtime (key rotation). Key pairs (RSA 2048,
//! EC P-256, Ed25519) are generated per test with `openssl` and their JWKs derived from the
//! public keys openssl prints, not by the proxy's code. Tokens are signed here with
//! `jsonwebtoken`; helpers build the invalid ones (unsigned, HMAC keyed with the RSA public key,
//! payload altered after signing).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::oauth::serve;
use super::RawResponse;

/// The audience every test configures.
pub const AUDIENCE: &str = "portcullis";

/// base64url without padding (JWS and JWK encoding).
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Runs `openssl ARGS` and returns its stdout.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn hex_decode(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex: {hex}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// A signing key pair and its public JWK.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    /// The private key, PEM (PKCS#1 for RSA, PKCS#8 for EC and Ed25519).
    pub private_pem: String,
    /// The public key, SPKI PEM.
    pub public_pem: String,
    /// The public key as a JWK (RFC 7517/7518/8037).
    pub jwk: Value,
}

/// Generates a private key with `openssl KIND... PATH` (`kind` ends with `-out`) in a fresh
/// folder: (private PEM, public SPKI PEM, public SPKI DER, the private key's path, the folder,
/// which must outlive the path's use).
fn generate(kind: &[&str]) -> (String, String, Vec<u8>, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("key.pem");
    let mut args = kind.to_vec();
    args.push(private.to_str().unwrap());
    openssl(&args);
    let p = private.to_str().unwrap();
    let public_pem = String::from_utf8(openssl(&["pkey", "-in", p, "-pubout"])).unwrap();
    let public_der = openssl(&["pkey", "-in", p, "-pubout", "-outform", "DER"]);
    let private_pem = std::fs::read_to_string(&private).unwrap();
    (private_pem, public_pem, public_der, private, dir)
}

/// An RSA 2048 key (RS256) named `kid`.
pub fn rsa_key(kid: &str) -> SigningKey {
    // (openssl 3's `genrsa` makes 2048-bit keys with e = 65537 by default.)
    let (private_pem, public_pem, _, path, _dir) = generate(&["genrsa", "-traditional", "-out"]);
    let modulus = String::from_utf8(openssl(&[
        "rsa",
        "-in",
        path.to_str().unwrap(),
        "-noout",
        "-modulus",
    ]))
    .unwrap();
    let hex = modulus.trim().strip_prefix("Modulus=").unwrap();
    let text = String::from_utf8(openssl(&[
        "rsa",
        "-in",
        path.to_str().unwrap(),
        "-noout",
        "-text",
    ]))
    .unwrap();
    assert!(text.contains("publicExponent: 65537"), "{text}");
    SigningKey {
        kid: kid.to_owned(),
        alg: Algorithm::RS256,
        private_pem,
        public_pem,
        jwk: json!({
            "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": b64url(&hex_decode(hex)), "e": "AQAB",
        }),
    }
}

/// An EC P-256 key (ES256) named `kid`. Its JWK has no `alg` (optional in a JWKS).
pub fn ec_key(kid: &str) -> SigningKey {
    let (private_pem, public_pem, der, _, _dir) = generate(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
    ]);
    // SPKI DER ends with the uncompressed point 04 || X || Y.
    let point = &der[der.len() - 65..];
    assert_eq!(point[0], 4, "uncompressed P-256 point");
    SigningKey {
        kid: kid.to_owned(),
        alg: Algorithm::ES256,
        private_pem,
        public_pem,
        jwk: json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": b64url(&point[1..33]), "y": b64url(&point[33..65]),
        }),
    }
}

/// An Ed25519 key (EdDSA) named `kid` (an `OKP` JWK, RFC 8037).
pub fn ed_key(kid: &str) -> SigningKey {
    let (private_pem, public_pem, der, _, _dir) =
        generate(&["genpkey", "-algorithm", "ed25519", "-out"]);
    SigningKey {
        kid: kid.to_owned(),
        alg: Algorithm::EdDSA,
        private_pem,
        public_pem,
        jwk: json!({
            "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "alg": "EdDSA",
            "x": b64url(&der[der.len() - 32..]),
        }),
    }
}

impl SigningKey {
    fn encoding_key(&self) -> EncodingKey {
        let pem = self.private_pem.as_bytes();
        match self.alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
            _ => EncodingKey::from_ed_pem(pem),
        }
        .unwrap()
    }

    /// `claims` signed with this key, the header naming its `kid` and algorithm.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(self.alg, &self.kid, claims)
    }

    /// `claims` signed with this key under `alg` (of the key's family), the header naming `kid`
    /// (for tokens whose header lies about the key).
    pub fn sign_as(&self, alg: Algorithm, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding_key()).unwrap()
    }
}

/// A JWKS document of `keys`.
pub fn jwks(keys: &[&SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
}

/// Writes the JWKS of `keys` to `path`.
pub fn write_jwks(path: &Path, keys: &[&SigningKey]) {
    std::fs::write(path, serde_json::to_string_pretty(&jwks(keys)).unwrap()).unwrap();
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

static JTI: AtomicU64 = AtomicU64::new(0);

/// The claims of a GitHub Actions job token of `repository` (`owner/name`) at `git_ref`:
/// valid now for ten minutes, for [`AUDIENCE`], with a unique `jti` (so no two tokens are equal).
pub fn claims(issuer: &str, repository: &str, git_ref: &str) -> Value {
    let now = now();
    let owner = repository.split('/').next().unwrap();
    json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": format!("repo:{repository}:ref:{git_ref}"),
        "repository": repository,
        "repository_owner": owner,
        "ref": git_ref,
        "jti": format!("jti-{}-{}", std::process::id(), JTI.fetch_add(1, Ordering::SeqCst)),
        "iat": now,
        "nbf": now - 5,
        "exp": now + 600,
    })
}

/// An unsigned token (`alg: none`, empty signature: `xxx.yyy.`) naming `kid`.
pub fn unsigned(kid: &str, claims: &Value) -> String {
    let header = json!({ "alg": "none", "typ": "JWT", "kid": kid });
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// The key-confusion attack: an HS256 token whose HMAC secret is `key`'s public key PEM (what a
/// verifier that lets the token pick the algorithm would use), naming `key`'s `kid`.
pub fn hs256_keyed_with_public_pem(key: &SigningKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.clone());
    let secret = EncodingKey::from_secret(key.public_pem.as_bytes());
    jsonwebtoken::encode(&header, claims, &secret).unwrap()
}

/// The decoded payload of `token`.
pub fn payload(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// `token` with its payload changed by `change` and re-encoded; header and signature kept.
pub fn altered(token: &str, change: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let mut claims = payload(token);
    change(&mut claims);
    format!(
        "{}.{}.{}",
        parts[0],
        b64url(claims.to_string().as_bytes()),
        parts[2]
    )
}

/// The signature segment of `token`.
pub fn signature(token: &str) -> &str {
    token.rsplit('.').next().unwrap()
}

/// The issuer's state.
#[derive(Default)]
struct IssuerState {
    /// `https://HOST:PORT`, known once bound.
    url: Mutex<String>,
    /// What the discovery document names as `issuer` (default: `url`).
    discovery_issuer: Mutex<Option<String>>,
    jwks: Mutex<Value>,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
}

/// A running issuer.
pub struct Issuer {
    /// `https://HOST:PORT`: the issuer identifier to configure and to put in tokens' `iss`.
    pub url: String,
    pub addr: SocketAddr,
    /// PEM of the CA that signed the issuer's certificate (for `tls.extra_upstream_ca`).
    pub ca_pem: String,
    state: Arc<IssuerState>,
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

async fn handle(req: Request<Incoming>, s: Arc<IssuerState>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/.well-known/openid-configuration") => {
            s.discovery_fetches.fetch_add(1, Ordering::SeqCst);
            let url = s.url.lock().unwrap().clone();
            let named = s.discovery_issuer.lock().unwrap().clone();
            json_response(
                StatusCode::OK,
                &json!({
                    "issuer": named.unwrap_or_else(|| url.clone()),
                    "jwks_uri": format!("{url}/.well-known/jwks"),
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
                }),
            )
        }
        (&http::Method::GET, "/.well-known/jwks") => {
            s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            let jwks = s.jwks.lock().unwrap().clone();
            json_response(StatusCode::OK, &jwks)
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found" })),
    }
}

/// An issuer at `https://HOST:PORT` over TLS (certificate for `host`), serving the JWKS of `keys`.
pub async fn issuer(host: &str, keys: &[&SigningKey]) -> Issuer {
    let (ca_pem, chain, key) = super::test_pki(&[host]);
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let state = Arc::new(IssuerState::default());
    *state.jwks.lock().unwrap() = jwks(keys);
    let s = state.clone();
    let addr = serve(Some(acceptor), move |req| handle(req, s.clone())).await;
    let url = format!("https://{host}:{}", addr.port());
    *state.url.lock().unwrap() = url.clone();
    Issuer {
        url,
        addr,
        ca_pem,
        state,
    }
}

impl Issuer {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serves the JWKS of `keys` from now on (rotation).
    pub fn set_keys(&self, keys: &[&SigningKey]) {
        *self.state.jwks.lock().unwrap() = jwks(keys);
    }

    /// Makes the discovery document name `issuer` instead of this issuer's own URL.
    pub fn set_discovery_issuer(&self, issuer: &str) {
        *self.state.discovery_issuer.lock().unwrap() = Some(issuer.to_owned());
    }

    /// The JWKS currently served.
    pub fn served_jwks(&self) -> Value {
        self.state.jwks.lock().unwrap().clone()
    }

    /// How often the JWKS was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// How often the discovery document was fetched.
    pub fn discovery_fetches(&self) -> usize {
        self.state.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Writes the issuer's CA PEM to `dir/name`.
    pub fn write_ca(&self, dir: &Path, name: &str) {
        std::fs::write(dir.join(name), &self.ca_pem).unwrap();
    }

    /// The claims of a job of `repository` at `git_ref`, issued here.
    pub fn claims(&self, repository: &str, git_ref: &str) -> Value {
        claims(&self.url, repository, git_ref)
    }
}

/// A `[[clients]]` entry identified by an OIDC token of `issuer` (for [`AUDIENCE`]) whose claims
/// match `claims` (the inside of a TOML inline table, e.g. `repository = "acme/app"`).
pub fn oidc_client(name: &str, issuer: &str, claims: &str) -> String {
    format!(
        "[[clients]]\nname = \"{name}\"\noidc = {{ issuer = \"{issuer}\", audience = \"{AUDIENCE}\", claims = {{ {claims} }} }}\n"
    )
}

/// A reqwest client sending `Proxy-Authorization: Bearer <jwt>` to `proxy` (on plain requests and
/// on CONNECT), trusting `ca_pem` when given.
pub fn bearer_client(proxy: &str, jwt: &str, ca_pem: Option<&str>) -> reqwest::Client {
    let auth = http::HeaderValue::from_str(&format!("Bearer {jwt}")).unwrap();
    let mut builder = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy).unwrap().custom_http_auth(auth))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30));
    if let Some(pem) = ca_pem {
        builder = builder
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
            .tls_built_in_root_certs(false);
    }
    builder.build().unwrap()
}

/// `portcullis_oidc_verifications_total` for `issuer` and `result` in `metrics` (label order
/// free); 0 when the series is absent.
pub fn oidc_count(metrics: &str, issuer: &str, result: &str) -> f64 {
    let (want_issuer, want_result) = (
        format!("issuer=\"{issuer}\""),
        format!("result=\"{result}\""),
    );
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("portcullis_oidc_verifications_total{"))
        .filter_map(|l| l.rsplit_once("} "))
        .find(|(labels, _)| {
            let labels: Vec<&str> = labels.split(',').collect();
            labels.len() == 2
                && labels.contains(&want_issuer.as_str())
                && labels.contains(&want_result.as_str())
        })
        .map(|(_, v)| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// `GET https://HOST:PORT{path}` through the proxy at `proxy`, the tunnel opened by a raw
/// `CONNECT` carrying `proxy_authorization` (a full header value) when given, the origin's
/// certificate trusted from `ca_pem` (the proxy's interception CA). Returns the CONNECT answer
/// when it is not 200 — so a refusal is seen whether the proxy makes it on the CONNECT or inside
/// the tunnel — else the answer to the request.
pub async fn get_via_connect(
    proxy: SocketAddr,
    proxy_authorization: Option<&str>,
    host: &str,
    port: u16,
    path: &str,
    ca_pem: &str,
) -> RawResponse {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let auth = proxy_authorization
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    let connect = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n");
    let answer = super::exchange_raw(&mut tcp, connect.as_bytes()).await;
    if answer.status != 200 {
        return answer;
    }
    let mut tls = super::tls_connect(tcp, super::roots_from_pem(ca_pem), host)
        .await
        .unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n");
    super::exchange_raw(&mut tls, request.as_bytes()).await
}
