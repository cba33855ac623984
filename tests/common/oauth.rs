//! A local OAuth 2.0 token endpoint and a protected resource accepting only the bearers it
//! issued, for the minted-credential tests. Both verify on their own (the token endpoint decodes
//! the Basic header and the form itself), never with the proxy's code.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// The client id every test configures.
pub const CLIENT_ID: &str = "portcullis-ci";
/// The client secret (a canary: it must never show anywhere but the token request).
pub const CLIENT_SECRET: &str = "canary-client-secret-7Hq2 &+=";

/// One token request as the endpoint decoded it.
#[derive(Debug, Clone)]
pub struct MintSeen {
    /// `basic` or `post`: how the client authenticated.
    pub auth: String,
    /// The form, decoded.
    pub form: BTreeMap<String, String>,
}

/// The token endpoint's state.
#[derive(Default)]
pub struct TokenServer {
    /// Tokens issued (successful mints).
    pub mints: AtomicUsize,
    /// Requests received (including failed ones).
    pub attempts: AtomicUsize,
    /// While set, every request gets a 500 (with a body a proxy must not repeat).
    pub failing: AtomicBool,
    /// `expires_in` of new tokens (0: omitted).
    pub lifetime: AtomicU64,
    /// Issued tokens and when they expire.
    pub issued: Mutex<Vec<(String, Instant)>>,
    /// Every request decoded.
    pub seen: Mutex<Vec<MintSeen>>,
    /// Answers are delayed this long (ms), so concurrent first requests overlap.
    pub delay_ms: AtomicU64,
    /// The last token a protected resource accepted: one the proxy has received and injected
    /// (the newest issued one may still be on its way to the proxy).
    pub used: Mutex<Option<String>>,
}

impl TokenServer {
    /// Whether `token` was issued here and has not expired.
    pub fn accepts(&self, token: &str) -> bool {
        let now = Instant::now();
        self.issued
            .lock()
            .unwrap()
            .iter()
            .any(|(t, exp)| t == token && *exp > now)
    }

    pub fn mints(&self) -> usize {
        self.mints.load(Ordering::SeqCst)
    }

    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> MintSeen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a token request")
    }

    /// Every token issued so far.
    pub fn tokens(&self) -> Vec<String> {
        self.issued
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }
}

/// `application/x-www-form-urlencoded` decoding, written here (not the proxy's code).
pub fn form_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8()
        .unwrap()
        .into_owned()
}

fn parse_form(body: &str) -> BTreeMap<String, String> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn token_endpoint(req: Request<Incoming>, s: Arc<TokenServer>) -> Response<Full<Bytes>> {
    s.attempts.fetch_add(1, Ordering::SeqCst);
    let delay = s.delay_ms.load(Ordering::SeqCst);
    let basic = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .map(|b| {
            let raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b)
                .unwrap_or_default();
            String::from_utf8(raw).unwrap_or_default()
        });
    let form_ok = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/x-www-form-urlencoded");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let form = parse_form(&String::from_utf8_lossy(&body));
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if s.failing.load(Ordering::SeqCst) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":\"server_error\",\"detail\":\"canary-endpoint-error-body {CLIENT_SECRET}\"}}"),
        );
    }
    let auth = match (&basic, form.get("client_secret")) {
        (Some(pair), None) => {
            // RFC 6749 §2.3.1: both parts are form-encoded inside the Basic pair.
            let (id, secret) = pair.split_once(':').unwrap_or(("", ""));
            if form_decode(id) != CLIENT_ID || form_decode(secret) != CLIENT_SECRET {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "{\"error\":\"invalid_client\"}".into(),
                );
            }
            "basic"
        }
        (None, Some(secret)) => {
            if form.get("client_id").map(String::as_str) != Some(CLIENT_ID)
                || secret != CLIENT_SECRET
            {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "{\"error\":\"invalid_client\"}".into(),
                );
            }
            "post"
        }
        _ => {
            return text(
                StatusCode::UNAUTHORIZED,
                "{\"error\":\"invalid_client\"}".into(),
            )
        }
    };
    if !form_ok || form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return text(
            StatusCode::BAD_REQUEST,
            "{\"error\":\"invalid_request\"}".into(),
        );
    }
    s.seen.lock().unwrap().push(MintSeen {
        auth: auth.into(),
        form,
    });
    let n = s.mints.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("canary-minted-token-{n}-{:016x}", rand_u64());
    let lifetime = s.lifetime.load(Ordering::SeqCst);
    let shown = if lifetime == 0 { 300 } else { lifetime };
    s.issued
        .lock()
        .unwrap()
        .push((token.clone(), Instant::now() + Duration::from_secs(shown)));
    let answer = if lifetime == 0 {
        format!("{{\"access_token\":\"{token}\",\"token_type\":\"Bearer\"}}")
    } else {
        format!(
            "{{\"access_token\":\"{token}\",\"token_type\":\"Bearer\",\"expires_in\":{lifetime}}}"
        )
    };
    let mut r = text(StatusCode::OK, answer);
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// The protected resource: 200 to `Authorization: Bearer <a valid token of `tokens`>`, 401
/// otherwise. `/echo` answers with the header it received (a proxy must mask it).
async fn protected(
    req: Request<Incoming>,
    tokens: Arc<TokenServer>,
    hits: Arc<AtomicUsize>,
) -> Response<Full<Bytes>> {
    hits.fetch_add(1, Ordering::SeqCst);
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    match bearer {
        Some(t) if tokens.accepts(&t) => {
            *tokens.used.lock().unwrap() = Some(t.clone());
            if req.uri().path() == "/echo" {
                text(StatusCode::OK, format!("you sent Bearer {t}"))
            } else {
                text(StatusCode::OK, "protected ok".into())
            }
        }
        _ => text(StatusCode::UNAUTHORIZED, "no valid bearer".into()),
    }
}

/// A running server: its address and how many requests it served.
pub struct Served {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Served {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

pub async fn serve<F, Fut>(acceptor: Option<tokio_rustls::TlsAcceptor>, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    None => {
                        let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            let _ = server.serve_connection(TokioIo::new(tls), svc).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A plain-HTTP token endpoint on 127.0.0.1.
pub async fn token_server(lifetime: u64) -> (Arc<TokenServer>, Served) {
    let state = Arc::new(TokenServer::default());
    state.lifetime.store(lifetime, Ordering::SeqCst);
    let s = state.clone();
    let addr = serve(None, move |req| token_endpoint(req, s.clone())).await;
    (
        state,
        Served {
            addr,
            hits: Arc::default(),
        },
    )
}

/// The protected resource over plain HTTP.
pub async fn protected_http(tokens: &Arc<TokenServer>) -> Served {
    let hits: Arc<AtomicUsize> = Arc::default();
    let (t, h) = (tokens.clone(), hits.clone());
    let addr = serve(None, move |req| protected(req, t.clone(), h.clone())).await;
    Served { addr, hits }
}

/// The protected resource over TLS, its certificate naming `names`: (server, CA PEM).
pub async fn protected_tls(tokens: &Arc<TokenServer>, names: &[&str]) -> (Served, String) {
    let (ca_pem, chain, key) = super::test_pki(names);
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
    let hits: Arc<AtomicUsize> = Arc::default();
    let (t, h) = (tokens.clone(), hits.clone());
    let addr = serve(Some(acceptor), move |req| {
        protected(req, t.clone(), h.clone())
    })
    .await;
    (Served { addr, hits }, ca_pem)
}
