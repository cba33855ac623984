//! Shared test harness: starts the proxy in-process on port 0, plain and TLS upstreams on
//! loopback (TLS with a throwaway test CA), and drives them with real clients (reqwest and the
//! `curl` binary). All traffic stays on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::body::{self, Body};
use portcullis::config::{self, Config, Origin};
use portcullis::proxy::{self, ProxyHandle};
use tokio::net::TcpListener;

pub mod github;
pub mod netns;
pub mod oauth;
pub mod oidc;
pub mod oidc_proxy;

/// A proxy running in this process.
pub struct TestProxy {
    pub handle: ProxyHandle,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The transparent listener (`listen.transparent`), when configured.
    pub transparent: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    /// Audit events written so far (the proxy's audit output is `audit.log` in its folder).
    /// Waits until at least `at_least` events are there, for up to 5 s: events are written
    /// asynchronously, when each request or tunnel ends.
    pub async fn audit_events(&self, at_least: usize) -> Vec<serde_json::Value> {
        let path = self.dir.path().join("audit.log");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let events: Vec<serde_json::Value> = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).expect("each audit line is JSON"))
                .collect();
            if events.len() >= at_least || std::time::Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        scrape(&format!("http://{}", self.admin)).await
    }

    /// The value of one series on `/metrics`, named as exposed, labels included (e.g.
    /// `portcullis_active_connections`, `portcullis_config_reloads_total{result="success"}`);
    /// `None` when the series is not there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await, series)
    }

    /// `GET /readyz` on the admin listener: its status code.
    pub async fn readyz(&self) -> u16 {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{}/readyz", self.admin))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// `http://127.0.0.1:PORT` of the proxy listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits (up to 30 s) for a proxy whose shutdown has begun to stop, then returns its audit
    /// events: all of them are written by then.
    pub async fn wait_stopped(self) -> Vec<serde_json::Value> {
        let TestProxy { handle, dir, .. } = self;
        tokio::time::timeout(Duration::from_secs(30), handle.wait())
            .await
            .expect("proxy stops in time")
            .expect("proxy stops cleanly");
        std::fs::read_to_string(dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("each audit line is JSON"))
            .collect()
    }

    /// Stops the proxy and waits for it.
    pub async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(Duration::from_secs(30), self.handle.wait())
            .await
            .expect("proxy stops in time")
            .expect("proxy stops cleanly");
    }
}

/// The value of `series` (name and labels exactly as exposed) in a Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        if name == series {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// How often [`eventually`] and [`holds_for`] look.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Polls `check` every 20 ms until it is true. Panics naming `what` when `deadline` passes first
/// (a check still running at the deadline is abandoned). The way tests wait for something to
/// have happened — never a fixed sleep.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        if let Ok(true) = tokio::time::timeout(left.max(POLL_EVERY), check()).await {
            return;
        }
        if started.elapsed() >= deadline {
            panic!("still waiting after {deadline:?} for {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `check` every 20 ms for `window` and panics naming `what` the first time it is false.
/// For what must *not* happen (a second reload, …): there is no event to wait for, so the test
/// watches for as long as the thing would take to show up.
pub async fn holds_for<F, Fut>(what: &str, window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        assert!(
            check().await,
            "{what}: no longer true after {:?}",
            started.elapsed()
        );
        if started.elapsed() >= window {
            return;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Listener section every test config starts with: both listeners on port 0.
pub const LISTEN: &str = "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n";

/// Parses a test config (with [`LISTEN`] prepended unless it has its own) whose relative paths
/// live in `dir`.
pub fn parse_config(dir: &Path, body: &str) -> Config {
    let mut text = if body.contains("[listen]") {
        body.to_owned()
    } else {
        format!("{LISTEN}{body}")
    };
    if !text.contains("[audit]") {
        // Audit events go to a file the test can read (stdout would mix with the test output).
        text.push_str("\n[audit]\noutput = \"audit.log\"\n");
    }
    let path = dir.join("portcullis.toml");
    std::fs::write(&path, &text).unwrap();
    match config::parse(&text, Origin::File(path), dir, false) {
        Ok(c) => c,
        Err(e) => panic!("test config invalid:\n{e}\n---\n{text}"),
    }
}

/// Starts a proxy with `body` as its config (after [`LISTEN`]).
pub async fn start_proxy(body: &str) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    start_proxy_in(dir, body).await
}

/// Starts a proxy whose config folder is `dir`.
pub async fn start_proxy_in(dir: tempfile::TempDir, body: &str) -> TestProxy {
    let config = parse_config(dir.path(), body);
    let handle = proxy::start(config).await.expect("proxy starts");
    TestProxy {
        addr: handle.proxy_addr,
        admin: handle.admin_addr,
        transparent: handle.transparent_addr,
        handle,
        dir,
    }
}

/// What an upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_bytes: u64,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// A loopback upstream server recording what it received.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// PEM of the CA that signed a TLS upstream's certificate.
    pub ca_pem: Option<String>,
}

impl Upstream {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Writes the CA PEM to `dir/name` and returns the path.
    pub fn write_ca(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.ca_pem.as_ref().expect("TLS upstream")).unwrap();
        path
    }
}

fn record(req: &Request<Incoming>) -> Seen {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        version: format!("{:?}", req.version()),
        headers,
        body_bytes: 0,
    }
}

/// A body of `n` bytes produced in 64 KiB chunks, never held in memory at once.
pub fn generated_body(n: u64) -> Body {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(chunk.len() as u64);
            let frame: Result<Frame<Bytes>, portcullis::body::BoxError> =
                Ok(Frame::data(chunk.slice(..take as usize)));
            Some((frame, left - take))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// The upstream's routes:
/// - `/stream/N`: N generated bytes;
/// - `/echo`: the request body back, streamed;
/// - `…/count`: counts the request body, answers its length;
/// - `/redirect`: 302 to another host;
/// - `…/respond-header/NAME/VALUE`: 200 with that response header;
/// - `…/echo-secret`: echoes the request's credential ([`echo_secret`]);
/// - `…/early`: answers 200 at once, never reading the request body;
/// - `/basic/USER/PASS`: 401 unless that basic credential is sent;
/// - anything else: 200 with a JSON summary of what was received.
async fn route(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    files: Option<Arc<StaticFiles>>,
) -> Response<Body> {
    let mut record = record(&req);
    let path = req.uri().path().to_owned();
    let reply = |status: StatusCode, body: Body| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        r
    };
    if let (Some(files), Some(rest)) = (files, path.strip_prefix("/git/")) {
        let authorized = record.header("authorization") == Some(files.authorization.as_str());
        seen.lock().unwrap().push(record);
        if !authorized {
            let mut r = reply(StatusCode::UNAUTHORIZED, body::full("unauthorized\n"));
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                "Basic realm=\"git\"".parse().unwrap(),
            );
            return r;
        }
        let file = files.root.join(rest);
        return match (rest.contains(".."), std::fs::read(&file)) {
            (false, Ok(bytes)) => reply(StatusCode::OK, body::full(bytes)),
            _ => reply(StatusCode::NOT_FOUND, body::full("not found\n")),
        };
    }
    if let Some(n) = path.strip_prefix("/stream/") {
        seen.lock().unwrap().push(record);
        let n: u64 = n.parse().unwrap_or(0);
        let mut r = reply(StatusCode::OK, generated_body(n));
        r.headers_mut()
            .insert(http::header::CONTENT_LENGTH, n.to_string().parse().unwrap());
        return r;
    }
    if path == "/echo" {
        seen.lock().unwrap().push(record);
        return reply(StatusCode::OK, body::boxed(req.into_body()));
    }
    if let Some((_, rest)) = path.split_once("/respond-header/") {
        seen.lock().unwrap().push(record);
        let (name, value) = rest.split_once('/').unwrap();
        let mut r = reply(StatusCode::OK, body::full("ok\n"));
        r.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        return r;
    }
    if path.ends_with("/echo-secret") {
        seen.lock().unwrap().push(record);
        return echo_secret(req.headers());
    }
    if path.ends_with("/early") {
        // The body is dropped unread: the upstream has answered before the client finished.
        seen.lock().unwrap().push(record);
        return reply(StatusCode::OK, body::full("early\n"));
    }
    if path == "/redirect" {
        seen.lock().unwrap().push(record);
        let mut r = reply(StatusCode::FOUND, body::empty());
        r.headers_mut().insert(
            http::header::LOCATION,
            "http://elsewhere.test/".parse().unwrap(),
        );
        return r;
    }
    let mut incoming = req.into_body();
    let mut total = 0u64;
    while let Some(Ok(frame)) = incoming.frame().await {
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
        }
    }
    record.body_bytes = total;
    if let Some(rest) = path.strip_prefix("/basic/") {
        let (user, pass) = rest.split_once('/').unwrap_or((rest, ""));
        let want = basic(user, pass);
        let ok = record.header("authorization") == Some(want.as_str());
        seen.lock().unwrap().push(record);
        if !ok {
            let mut r = reply(StatusCode::UNAUTHORIZED, body::full("unauthorized\n"));
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                "Basic realm=\"test\"".parse().unwrap(),
            );
            return r;
        }
        return reply(StatusCode::OK, body::full("authorized\n"));
    }
    let summary = serde_json::json!({
        "method": record.method,
        "uri": record.uri,
        "version": record.version,
        "headers": record.headers,
        "body_bytes": total,
    });
    seen.lock().unwrap().push(record);
    if path.ends_with("/count") {
        return reply(StatusCode::OK, body::full(total.to_string()));
    }
    let mut r = reply(StatusCode::OK, body::full(summary.to_string()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    r
}

/// What an upstream that reflects credentials sends back: the request's `Authorization` (else its
/// `X-API-Key`) in an `X-Echo` header, in a `Set-Cookie`, and in the body as
/// `auth=<value>;decoded=<user:pass of a Basic value>;end`, with `Content-Length`. The body comes in
/// frames cut in the middle of each echoed value, flushed apart (30 ms), so every echo straddles
/// two reads on the way back.
pub fn echo_secret(headers: &http::HeaderMap) -> Response<Body> {
    let value = headers
        .get("authorization")
        .or_else(|| headers.get("x-api-key"))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let decoded = value
        .strip_prefix("Basic ")
        .and_then(|b| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let text = format!("auth={value};decoded={decoded};end\n");
    // Cut points: the middle of each echoed value.
    let first = "auth=".len() + value.len() / 2;
    let second = "auth=".len() + value.len() + ";decoded=".len() + decoded.len() / 2;
    let bytes = Bytes::from(text);
    let len = bytes.len();
    let frames = vec![
        bytes.slice(..first),
        bytes.slice(first..second),
        bytes.slice(second..),
    ];
    let stream = futures_util::stream::unfold(
        (frames.into_iter(), true),
        |(mut frames, first)| async move {
            let next = frames.next()?;
            if !first {
                // Written and flushed apart: the proxy reads the halves separately.
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            let frame: Result<Frame<Bytes>, portcullis::body::BoxError> = Ok(Frame::data(next));
            Some((frame, (frames, false)))
        },
    );
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_LENGTH,
        len.to_string().parse().unwrap(),
    );
    h.insert("x-echo", value.parse().unwrap());
    h.insert(
        http::header::SET_COOKIE,
        format!("echo={}; Path=/", value.replace(' ', "_"))
            .parse()
            .unwrap(),
    );
    r
}

/// Files served under `/git/` (a dumb-HTTP git repository) to requests carrying `authorization`.
pub struct StaticFiles {
    pub root: PathBuf,
    pub authorization: String,
}

/// A plain-HTTP upstream on 127.0.0.1.
pub async fn http_upstream() -> Upstream {
    serve_upstream(None, None, None).await
}

/// A plain-HTTP upstream on `ip` (another address of this host, e.g. inside a test's own network
/// namespace), on a free port.
pub async fn http_upstream_on(ip: std::net::IpAddr) -> Upstream {
    serve_upstream_on(SocketAddr::new(ip, 0), None, None, None).await
}

/// Serves [`route`] on 127.0.0.1, over TLS when `acceptor` is given.
async fn serve_upstream(
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    ca_pem: Option<String>,
    files: Option<Arc<StaticFiles>>,
) -> Upstream {
    serve_upstream_on("127.0.0.1:0".parse().unwrap(), acceptor, ca_pem, files).await
}

/// Serves [`route`] on `bind`, over TLS when `acceptor` is given.
async fn serve_upstream_on(
    bind: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    ca_pem: Option<String>,
    files: Option<Arc<StaticFiles>>,
) -> Upstream {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen2.clone();
            let acceptor = acceptor.clone();
            let files = files.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let seen = seen.clone();
                    let files = files.clone();
                    async move { Ok::<_, Infallible>(route(req, seen, files).await) }
                });
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    None => {
                        let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(acceptor) => {
                        let accepted =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                        if let Ok(Ok(tls)) = accepted.await {
                            let _ = server.serve_connection(TokioIo::new(tls), svc).await;
                        }
                    }
                }
            });
        }
    });
    Upstream { addr, seen, ca_pem }
}

/// A test CA and a leaf for `names` signed by it: (CA PEM, leaf chain DER, leaf key DER).
pub fn test_pki(
    names: &[&str],
) -> (
    String,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "portcullis test upstream CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut leaf_params = rcgen::CertificateParams::new(names).unwrap();
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    (ca.pem(), vec![leaf.der().clone(), ca.der().clone()], key)
}

/// A TLS upstream (HTTP/1.1 and h2 by ALPN) whose certificate names `names`.
pub async fn tls_upstream(names: &[&str]) -> Upstream {
    tls_upstream_with(names, None).await
}

/// A TLS upstream that also serves `files` under `/git/`.
pub async fn tls_upstream_with(names: &[&str], files: Option<StaticFiles>) -> Upstream {
    tls_upstream_bound("127.0.0.1:0".parse().unwrap(), names, files).await
}

/// A TLS upstream bound to `bind` (a fixed port, in a network namespace of the test's own).
pub async fn tls_upstream_at(bind: SocketAddr, names: &[&str]) -> Upstream {
    tls_upstream_bound(bind, names, None).await
}

async fn tls_upstream_bound(
    bind: SocketAddr,
    names: &[&str],
    files: Option<StaticFiles>,
) -> Upstream {
    let (ca_pem, chain, key) = test_pki(names);
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
    serve_upstream_on(bind, Some(acceptor), Some(ca_pem), files.map(Arc::new)).await
}

/// Root store trusting a TLS upstream's test CA.
pub fn roots_for(up: &Upstream) -> Arc<rustls::RootCertStore> {
    roots_from_pem(up.ca_pem.as_ref().expect("TLS upstream"))
}

/// Root store trusting the certificates in `pem` (e.g. the proxy's interception CA).
pub fn roots_from_pem(pem: &str) -> Arc<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// A TLS client handshake over `stream` (e.g. a CONNECT tunnel) naming `sni`.
pub async fn tls_connect(
    stream: tokio::net::TcpStream,
    roots: Arc<rustls::RootCertStore>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let connect = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::other("TLS handshake timed out")),
    }
}

/// `Basic base64(user:pass)`.
pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{user}:{pass}")
        )
    )
}

/// A reqwest client that uses `proxy` for everything.
pub fn proxied_client(proxy: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A reqwest client that trusts `ca_pem` and uses `proxy`.
pub fn proxied_tls_client(proxy: &str, ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// What a `curl` run produced.
#[derive(Debug)]
pub struct CurlOut {
    /// Final HTTP status (0 when none).
    pub status: u16,
    /// Status of the proxy's CONNECT answer (0 when no CONNECT).
    pub connect_status: u16,
    pub body: String,
    pub stderr: String,
    pub exit: i32,
}

/// Runs the `curl` binary with `args` (plus silent mode, a 30 s cap and status reporting).
pub async fn curl(args: &[&str]) -> CurlOut {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-w",
            "\n__STATUS__ %{http_code} %{http_connect}",
        ])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("NO_PROXY")
        .kill_on_drop(true)
        .output()
        .await
        .expect("curl runs (install curl)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status_line) = stdout
        .rsplit_once("\n__STATUS__ ")
        .map(|(b, s)| (b.to_owned(), s.to_owned()))
        .unwrap_or((stdout.clone(), String::new()));
    let mut codes = status_line
        .split_whitespace()
        .map(|c| c.parse().unwrap_or(0));
    CurlOut {
        status: codes.next().unwrap_or(0),
        connect_status: codes.next().unwrap_or(0),
        body,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        exit: out.status.code().unwrap_or(-1),
    }
}

/// Resident set size of this process, in bytes (Linux).
pub fn rss_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A loopback port with nothing listening on it.
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

/// The `Proxy-Status` header of a response, as text.
pub fn proxy_status(r: &reqwest::Response) -> String {
    r.headers()
        .get("proxy-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A child process that is killed and reaped when dropped, so a failing test leaves none behind.
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// Sends SIGTERM and waits up to `limit` for the exit code.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let pid = self.0.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens a raw CONNECT tunnel and returns the socket after the 200.
pub async fn connect_through(proxy: &TestProxy, target: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Reads a response head (up to the blank line), byte by byte so nothing after it is consumed.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(s, &mut byte),
        )
        .await
        .expect("head in time")
        .unwrap();
        if n == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A bare repository with one commit, prepared for the dumb HTTP protocol.
pub fn make_repo(root: &Path) -> PathBuf {
    let git = |dir: &Path, args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("HOME", root)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    std::fs::write(src.join("README"), "cloned through portcullis\n").unwrap();
    git(&src, &["add", "README"]);
    git(&src, &["commit", "-q", "-m", "first"]);
    let served = root.join("served");
    std::fs::create_dir_all(&served).unwrap();
    let bare = served.join("repo.git");
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            src.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    git(&bare, &["update-server-info"]);
    bare
}

/// `git clone URL DEST` through `proxy_url` trusting `ca`, with an isolated `home` and no prompt.
pub async fn git_clone(
    url: &str,
    dest: &Path,
    proxy_url: &str,
    ca: &Path,
    home: &Path,
) -> std::process::Output {
    let (url, dest, proxy_url, ca, home) = (
        url.to_owned(),
        dest.to_path_buf(),
        proxy_url.to_owned(),
        ca.to_path_buf(),
        home.to_path_buf(),
    );
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("git")
            .args(["clone", &url, dest.to_str().unwrap()])
            .env("HOME", &home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("HTTPS_PROXY", &proxy_url)
            .env("https_proxy", &proxy_url)
            .env("GIT_SSL_CAINFO", &ca)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The real `portcullis` binary running as a child process, its stderr read line by line.
pub struct RunningBinary {
    pub child: ChildGuard,
    /// `http://ADDR` of the proxy listener, from the "listening" log line.
    pub proxy: String,
    /// `http://ADDR` of the admin listener.
    pub admin: String,
    /// The stderr lines up to and including the "listening" line.
    pub startup: Vec<String>,
    lines: std::sync::mpsc::Receiver<String>,
    /// Reads a piped stdout while the proxy runs (so a full pipe never blocks it).
    stdout: Option<std::thread::JoinHandle<String>>,
}

/// Everything a stopped proxy wrote.
pub struct Collected {
    /// stdout (the audit, in the canaries' configurations).
    pub stdout: String,
    /// stderr, every line.
    pub stderr: String,
}

impl Collected {
    /// The canary's check: none of `secrets` in stdout, stderr, `metrics` or any of `bodies`.
    pub fn assert_free_of(&self, secrets: &[&str], metrics: &str, bodies: &[String]) {
        for secret in secrets {
            assert!(
                !self.stdout.contains(secret),
                "{secret} in stdout:\n{}",
                self.stdout
            );
            assert!(
                !self.stderr.contains(secret),
                "{secret} in stderr:\n{}",
                self.stderr
            );
            assert!(!metrics.contains(secret), "{secret} in /metrics");
            for body in bodies {
                assert!(!body.contains(secret), "{secret} in a response: {body}");
            }
        }
    }
}

/// Starts `portcullis ARGS` with `envs` and waits (up to 20 s) until it logs where it listens,
/// in the text or the JSON log format.
pub fn spawn_binary(
    args: &[&str],
    envs: &[(&str, &str)],
    stdout: std::process::Stdio,
) -> RunningBinary {
    use std::io::BufRead;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    command
        .args(args)
        .stdout(stdout)
        .stderr(std::process::Stdio::piped());
    for (name, value) in envs {
        command.env(name, value);
    }
    let mut child = ChildGuard(command.spawn().unwrap());
    let stdout = child.0.stdout.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut out = String::new();
            std::io::Read::read_to_string(&mut pipe, &mut out).unwrap();
            out
        })
    });
    let stderr = child.0.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut startup = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "proxy did not start: {startup:?}"
        );
        let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        startup.push(line.clone());
        if !line.contains("portcullis listening") {
            continue;
        }
        let field = |name: &str| -> String {
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                return event[name].as_str().unwrap().to_owned();
            }
            line.split(&format!("{name}="))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap()
                .to_owned()
        };
        return RunningBinary {
            proxy: format!("http://{}", field("proxy_addr")),
            admin: format!("http://{}", field("admin_addr")),
            child,
            startup,
            lines,
            stdout,
        };
    }
}

impl RunningBinary {
    /// Waits (up to 20 s) for a stderr line containing `needle`.
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {needle:?}"
            );
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                if line.contains(needle) {
                    return line;
                }
            }
        }
    }

    /// Every stderr line logged since the last call.
    pub fn drain_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        scrape(&self.admin).await
    }

    /// Stops the proxy (SIGTERM; it must exit 0 within 20 s) and returns what it wrote.
    pub fn stop(mut self) -> Collected {
        assert_eq!(self.child.terminate(Duration::from_secs(20)), Some(0));
        let stdout = self
            .stdout
            .take()
            .map(|reader| reader.join().unwrap())
            .unwrap_or_default();
        let mut stderr = std::mem::take(&mut self.startup);
        stderr.extend(self.drain_lines());
        Collected {
            stdout,
            stderr: stderr.join("\n"),
        }
    }

    /// [`RunningBinary::stop`], for the canaries, which run the proxy with debug logging
    /// (checked here) and search everything it wrote for secrets.
    pub fn stop_and_collect(self) -> Collected {
        let collected = self.stop();
        assert!(collected.stderr.contains("DEBUG"), "debug logging was on");
        collected
    }
}

/// `portcullis ARGS` to completion (no `$PORTCULLIS_CONFIG`, and the variables `unset`
/// removed): exit code, stdout, stderr.
pub fn run_portcullis(args: &[&str], unset: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    command.args(args).env_remove("PORTCULLIS_CONFIG");
    for var in unset {
        command.env_remove(var);
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `portcullis check -c DIR/portcullis.toml` with `body` as the file: exit code, stdout, stderr.
/// `unset` names environment variables removed for the run.
pub fn check_config(dir: &Path, body: &str, unset: &[&str]) -> (i32, String, String) {
    let path = dir.join("portcullis.toml");
    std::fs::write(&path, body).unwrap();
    run_portcullis(&["check", "-c", path.to_str().unwrap()], unset)
}

/// A PEM block of `der`.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A test PKI for `names` written as PEM files under `dir`: (CA PEM, cert chain path, key path),
/// for servers that take files (the Python verifiers).
pub fn test_pki_files(dir: &Path, names: &[&str]) -> (String, PathBuf, PathBuf) {
    let (ca, chain, key) = test_pki(names);
    let cert = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(
        &cert,
        chain
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect::<String>(),
    )
    .unwrap();
    std::fs::write(&key_path, pem_block("PRIVATE KEY", key.secret_der())).unwrap();
    (ca, cert, key_path)
}

/// A helper server (`command`, a Python verifier) that prints its port on its first stdout line
/// and then one JSON object per line: the child, its port, and the lines so far.
pub fn json_lines_server(
    mut command: std::process::Command,
) -> (ChildGuard, u16, Arc<Mutex<Vec<serde_json::Value>>>) {
    use std::io::BufRead;
    let mut child = ChildGuard(
        command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (tests/setup.sh installs it and its packages)"),
    );
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let port = first.trim().parse().unwrap_or_else(|_| {
        panic!("the server did not start (a Python package missing?): {first:?}")
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            sink.lock()
                .unwrap()
                .push(serde_json::from_str(&line).unwrap());
        }
    });
    (child, port, seen)
}

/// `/metrics` of the admin listener at `admin` (`http://host:port`), fetched directly.
pub async fn scrape(admin: &str) -> String {
    scrape_path(admin, "/metrics").await
}

/// `GET {admin}{path}` of the admin listener at `admin` (`http://host:port`), fetched directly.
pub async fn scrape_path(admin: &str, path: &str) -> String {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{admin}{path}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A response read off a raw connection: status, head (lower-cased header names), body.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// The status line and headers as received.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The `Proxy-Status` header, or "" (a bare answer from the HTTP parser has none).
    pub fn proxy_status(&self) -> String {
        self.header("proxy-status").unwrap_or_default()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One byte, or `None` at EOF or on a reset (a server that closes with unread input resets the
/// connection; what it sent before is still read).
async fn read_byte<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<u8> {
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(s, &mut byte),
    )
    .await
    .expect("response bytes in time")
    .ok()?;
    (n == 1).then_some(byte[0])
}

async fn read_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        line.push(read_byte(s).await?);
    }
    line.truncate(line.len() - 2);
    Some(String::from_utf8_lossy(&line).into_owned())
}

/// Reads one HTTP/1.1 response off `s` (byte by byte, so nothing after it is consumed): its head,
/// then its body as framed by `Content-Length`, chunked coding, or the end of the connection.
/// `None` when the connection ends before a status line.
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<RawResponse> {
    read_response_to(s, false).await
}

/// [`read_response`] for a response to `CONNECT` when `connect` is set: a 2xx has no body (the
/// tunnel starts after the head).
pub async fn read_response_to<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    connect: bool,
) -> Option<RawResponse> {
    let mut head = String::new();
    loop {
        let line = read_line(s).await?;
        if line.is_empty() {
            break;
        }
        head.push_str(&line);
        head.push_str("\r\n");
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut response = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
    if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().unwrap();
        while response.body.len() < len {
            match read_byte(s).await {
                Some(b) => response.body.push(b),
                None => break,
            }
        }
    } else if chunked {
        while let Some(size) = read_line(s).await {
            let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
            for _ in 0..size {
                response.body.push(read_byte(s).await.unwrap());
            }
            read_line(s).await;
            if size == 0 {
                break;
            }
        }
    } else if !(status == 204
        || status == 304
        || (100..200).contains(&status)
        || (connect && (200..300).contains(&status)))
    {
        while let Some(b) = read_byte(s).await {
            response.body.push(b);
        }
    }
    Some(response)
}

/// Every response on `s` until the connection ends.
pub async fn read_responses<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<RawResponse> {
    let mut all = Vec::new();
    while let Some(response) = read_response(s).await {
        all.push(response);
    }
    all
}

/// Writes `request` as raw bytes on `s` (a write the server cuts short by closing is not an
/// error: its answer is what the test looks at) and reads the first response (only the head of a
/// 2xx to a `CONNECT`: the tunnel is then open).
pub async fn exchange_raw<S>(s: &mut S, request: &[u8]) -> RawResponse
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let write = async {
        let _ = tokio::io::AsyncWriteExt::write_all(s, request).await;
        let _ = tokio::io::AsyncWriteExt::flush(s).await;
    };
    tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("request written in time");
    read_response_to(s, request.starts_with(b"CONNECT "))
        .await
        .expect("a response before the connection ended")
}

/// Sends `request` as raw bytes on a new connection to `addr` (for malformed HTTP no client
/// library would send) and reads the first response.
pub async fn send_raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange_raw(&mut s, request).await
}

/// A TCP listener on 127.0.0.1 that accepts connections and swallows their bytes, counting both:
/// to prove that nothing reached a destination.
pub struct TcpSink {
    pub addr: SocketAddr,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    pub bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl TcpSink {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub async fn tcp_sink() -> TcpSink {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicUsize::new(0));
    let (a, b) = (accepted.clone(), bytes.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let b = b.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                    if n == 0 {
                        break;
                    }
                    b.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    TcpSink {
        addr,
        accepted,
        bytes,
    }
}
