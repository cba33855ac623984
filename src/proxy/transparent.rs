//! Transparent mode (spec §11): connections redirected to the proxy by the network
//! (iptables/nftables `REDIRECT`) instead of by the client's `HTTP_PROXY`, so tools that ignore
//! the variable — or a build step that unsets it — are still held to the allow-list.
//!
//! For each redirected connection, top to bottom:
//! 1. the **original destination** from the socket (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`);
//!    one that is a proxy listener (a connection not redirected, or redirected back to us) is
//!    refused as a loop;
//! 2. **identity** by source network only, else `anonymous`;
//! 3. the **first bytes**, peeked (left in the socket): a TLS ClientHello → the host is its SNI
//!    (else the original IP, which only IP/CIDR rules match) and the port the original one, and
//!    it is **the CONNECT path** ([`super::connect::open_target`]: policy, tunnel or intercept,
//!    SNI bound to the host); anything else is served as HTTP/1.1, each request turned into
//!    `http://<Host>:<original port>/…` and sent down **the one request pipeline**.
//!
//! The proxy resolves the host itself and dials the address it judged: a false SNI or `Host`
//! only ever reaches the host it names, never the original IP behind it. Audit events carry
//! `"transparent": true`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::connect;
use super::keepalive::{ConnTimer, CountingIo, IoCounter, Lingering};
use super::outcome;
use super::request::{self, Origin};
use super::state::ConnCtx;
use super::tunnel::{self, Hello};
use crate::body::Body;
use crate::error::ProxyError;
use crate::policy::Host;
use crate::telemetry::{Kind, Record};

/// The most of a ClientHello peeked for its SNI.
const PEEK_BYTES: usize = 16 * 1024;
/// How often the socket is peeked again while a ClientHello is incomplete.
const PEEK_AGAIN: Duration = Duration::from_millis(2);

/// The destination a redirected connection was headed for, from the socket.
#[cfg(target_os = "linux")]
pub fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    use std::net::{Ipv4Addr, Ipv6Addr};
    let v4 = |stream: &TcpStream| -> std::io::Result<SocketAddr> {
        let a = getsockopt(stream, sockopt::OriginalDst)?;
        Ok(SocketAddr::from((
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        )))
    };
    if stream.local_addr()?.is_ipv6() {
        if let Ok(a) = getsockopt(stream, sockopt::Ip6tOriginalDst) {
            return Ok(SocketAddr::from((
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
            )));
        }
    }
    v4(stream)
}

/// The destination a redirected connection was headed for: Linux only.
#[cfg(not(target_os = "linux"))]
pub fn original_destination(_stream: &TcpStream) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::other("transparent mode needs Linux"))
}

/// What the peeked first bytes are.
enum FirstBytes {
    /// A complete ClientHello, with its SNI.
    Tls(Option<String>),
    /// Anything else (HTTP, or a protocol nothing will allow): served as HTTP.
    Other,
}

/// Peeks until the first bytes say TLS (with a whole ClientHello) or not. `None`: the client
/// closed, or sent a TLS record that is no ClientHello.
async fn peek_first_bytes(stream: &TcpStream) -> Option<FirstBytes> {
    let mut buf = vec![0u8; PEEK_BYTES];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if !tunnel::looks_like_tls(&buf[..n]) {
            return Some(FirstBytes::Other);
        }
        match tunnel::client_hello(&buf[..n]) {
            Hello::Complete(sni) => return Some(FirstBytes::Tls(sni)),
            Hello::Invalid => return None,
            // The rest of the ClientHello is on its way: peek again shortly (a peek returns at
            // once with what is there, so this waits).
            Hello::Incomplete => tokio::time::sleep(PEEK_AGAIN).await,
        }
    }
}

/// Serves one redirected connection.
pub async fn serve(conn: ConnCtx, stream: TcpStream) {
    let original = match original_destination(&stream) {
        Ok(original) => original,
        Err(e) => {
            tracing::debug!(peer = %conn.peer, error = %e, "no original destination: not a redirected connection");
            return;
        }
    };
    if conn.state.own.is_listener(original) {
        // Not redirected (a direct connection to this listener), or redirected back to the
        // proxy: serving it would loop.
        tracing::warn!(peer = %conn.peer, %original, "refused a transparent connection to the proxy itself");
        conn.state
            .telemetry
            .metrics
            .denials
            .with_label_values(&[ProxyError::Loop.class().reason])
            .inc();
        return;
    }
    let snap = conn.state.snapshot();
    let limits = snap.config.limits.clone();
    let first = tokio::time::timeout(limits.header_read_timeout, peek_first_bytes(&stream)).await;
    match first {
        Ok(Some(FirstBytes::Tls(sni))) => serve_tls(conn, stream, original, sni).await,
        Ok(Some(FirstBytes::Other)) => serve_http(conn, stream, original).await,
        Ok(None) | Err(_) => {
            tracing::debug!(peer = %conn.peer, %original, "transparent connection closed or sent no usable first bytes");
        }
    }
}

/// TLS: the CONNECT path for the SNI (else the original IP) at the original port.
async fn serve_tls(conn: ConnCtx, stream: TcpStream, original: SocketAddr, sni: Option<String>) {
    let snap = conn.state.snapshot();
    let identity = snap.clients.by_network(conn.peer.ip());
    let telemetry = conn.state.telemetry.clone();
    let mut record = Record::new(
        &telemetry,
        snap.masker.clone(),
        Kind::Tunnel,
        &identity.name,
        conn.peer,
        &Method::CONNECT,
    );
    record.event.transparent = true;
    let host = sni
        .as_deref()
        .and_then(Host::parse)
        .unwrap_or(Host::Ip(original.ip()));
    record.target(None, &host.to_string(), original.port(), None);
    let opened = connect::open_target(&conn, &snap, &identity, host, original.port(), &mut record);
    match opened.await {
        Ok(mut opened) => {
            if let connect::Opened::Intercept(target, _) = &mut opened {
                target.transparent = true;
            }
            record.event.status = Some(200);
            let limits = snap.config.limits.clone();
            drop(snap);
            let stream = std::future::ready(Ok::<_, std::convert::Infallible>(stream));
            connect::run(conn, identity, opened, stream, limits, record).await;
        }
        Err(err) => {
            // No HTTP answer is possible before TLS: the refusal is audited, the socket closed.
            tracing::debug!(peer = %conn.peer, error = %err, "transparent TLS connection refused");
            record.fail(&telemetry, &err);
            record.finish_tunnel(&telemetry, 0, 0, None);
        }
    }
}

/// Plain HTTP: each request down the one pipeline, as `http://<Host>:<original port>/…`.
async fn serve_http(conn: ConnCtx, stream: TcpStream, original: SocketAddr) {
    let state = conn.state.clone();
    let limits = state.snapshot().config.limits.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(serve_request(&conn, req, original).await) }
    });
    let counter = Arc::new(IoCounter::default());
    let stream = Lingering::new(stream, state.tasks.clone(), state.hard_stop.clone());
    let io = TokioIo::new(CountingIo::new(stream, counter.clone()));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(ConnTimer::new(counter.clone(), limits.idle_timeout))
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(256)
        .keep_alive(true)
        .serve_connection(io, service);
    let result = state
        .drive(served, &counter, |c| c.graceful_shutdown())
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "transparent connection ended with an error");
    }
}

/// One request of a redirected plain-HTTP connection.
async fn serve_request(
    conn: &ConnCtx,
    mut req: Request<Incoming>,
    original: SocketAddr,
) -> Response<Body> {
    let snap = conn.state.snapshot();
    let telemetry = &conn.state.telemetry;
    let identity = snap.clients.by_network(conn.peer.ip());
    let mut record = Record::new(
        telemetry,
        snap.masker.clone(),
        Kind::Request,
        &identity.name,
        conn.peer,
        req.method(),
    );
    record.event.transparent = true;
    let target = absolute(&req, original);
    if let Ok(uri) = &target {
        record.target(
            Some("http"),
            uri.host().unwrap_or_default(),
            original.port(),
            Some(uri),
        );
    }
    let result = match target {
        Ok(uri) => {
            *req.uri_mut() = uri;
            request::handle(conn, &snap, &identity, Origin::Listener, req, &mut record).await
        }
        Err(err) => {
            crate::body::discard(req.into_body()).await;
            Err(err)
        }
    };
    outcome::respond(telemetry, record, result)
}

/// `http://<host>:<original port><path>`: the host the request names (its `Host`, or an
/// absolute-form target's), else the original IP; the port is always the original one.
fn absolute(req: &Request<Incoming>, original: SocketAddr) -> Result<Uri, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is not served on the transparent listener".into(),
        ));
    }
    let named = match req.uri().authority() {
        Some(authority) => Some(authority.host().to_owned()),
        None => match req.headers().get(http::header::HOST) {
            Some(value) => {
                let text = value
                    .to_str()
                    .map_err(|_| ProxyError::BadRequest("invalid Host header".into()))?;
                let authority = Authority::try_from(text)
                    .map_err(|_| ProxyError::BadRequest("invalid Host header".into()))?;
                Some(authority.host().to_owned())
            }
            None => None,
        },
    };
    let host = match named {
        Some(host) => host,
        None => match original.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        },
    };
    let authority = Authority::try_from(format!("{host}:{}", original.port()))
        .map_err(|_| ProxyError::BadRequest(format!("invalid host {host:?}")))?;
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| ProxyError::BadRequest("invalid request target".into()))
}
