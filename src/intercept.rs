//! Intercepted CONNECT tunnels: the proxy terminates the client's TLS with a leaf minted for the
//! CONNECT host, serves HTTP/1.1 or h2 inside (by ALPN), and judges every inner request on its own
//! — method, path, credential — before relaying it over verified, pooled upstream TLS.
//!
//! The CONNECT's identity holds for every request inside, and every inner request must name the
//! CONNECT host (`Host` / `:authority`), else 421: a tunnel opened for one host is never used to
//! reach another.

use std::convert::Infallible;
use std::str::FromStr;
use std::sync::Arc;

use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{header, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::forward::{apply_credential, precheck, prepare_request_headers, send};
use crate::keepalive::{ConnTimer, CountingIo, IoCounter};
use crate::policy::{self, Host, RequestFacts, Rule};
use crate::server::{drive, ConnCtx, Snapshot};
use crate::telemetry::{Counted, Kind, Record};

/// The CONNECT target an intercepted tunnel serves.
#[derive(Debug, Clone)]
pub struct Target {
    /// CONNECT host.
    pub host: Host,
    /// CONNECT port.
    pub port: u16,
}

impl Target {
    fn authority(&self) -> String {
        match self.host {
            Host::Ip(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            ref host => format!("{host}:{}", self.port),
        }
    }
}

/// Terminates TLS on the upgraded CONNECT stream and serves the requests inside until the client
/// closes, the connection idles out, or shutdown. Returns the tunnel's byte counts (client →
/// proxy, proxy → client, TLS included) and what went wrong, if anything.
pub async fn serve(
    ctx: ConnCtx,
    target: Target,
    upgraded: Upgraded,
    tls: Arc<ServerConfig>,
) -> (u64, u64, Option<String>) {
    let counter = Arc::new(IoCounter::default());
    let upgraded = CountingIo::new(TokioIo::new(upgraded), counter.clone());
    let error = serve_tls(ctx, target, upgraded, tls).await;
    (counter.read(), counter.written(), error)
}

async fn serve_tls(
    ctx: ConnCtx,
    target: Target,
    upgraded: CountingIo<TokioIo<Upgraded>>,
    tls: Arc<ServerConfig>,
) -> Option<String> {
    let limits = ctx.state.snapshot().config.limits.clone();
    let accept = TlsAcceptor::from(tls).accept(upgraded);
    let stream = match tokio::time::timeout(limits.header_read_timeout, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            // Typically the client does not trust the proxy CA yet.
            tracing::info!(peer = %ctx.peer, host = %target.host, error = %e, "client TLS handshake failed");
            return Some(format!("client TLS handshake failed: {e}"));
        }
        Err(_) => {
            tracing::debug!(peer = %ctx.peer, host = %target.host, "client TLS handshake timed out");
            return Some("client TLS handshake timed out".to_owned());
        }
    };
    let counter = Arc::new(IoCounter::default());
    let io = TokioIo::new(CountingIo::new(stream, counter.clone()));
    let state = ctx.state.clone();
    let target = Arc::new(target);
    let service = service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        let target = target.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, &target, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(ConnTimer::new(counter, limits.idle_timeout))
        .header_read_timeout(limits.header_read_timeout)
        // hyper's floor for the read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let conn = builder.serve_connection(io, service);
    let result = drive(conn, &state, |c| c.graceful_shutdown()).await;
    match result {
        Ok(()) => None,
        Err(e) => {
            tracing::debug!(error = %e, "intercepted connection ended with an error");
            Some(e.to_string())
        }
    }
}

/// Serves one request from inside an intercepted tunnel, with its own audit event.
async fn handle(ctx: &ConnCtx, target: &Target, req: Request<Incoming>) -> Response<Body> {
    // Each inner request is judged against the rules current when it arrives.
    let snap = ctx.state.snapshot();
    let telemetry = &ctx.state.telemetry;
    let mut record = Record::new(
        telemetry,
        snap.masker.clone(),
        Kind::Request,
        &ctx.client,
        ctx.peer,
        req.method(),
    );
    record.event.intercepted = true;
    record.target(
        Some("https"),
        &target.host.to_string(),
        target.port,
        Some(req.uri()),
    );
    let (parts, incoming) = req.into_parts();
    let result = match admit(ctx, &snap, target, &parts, &mut record) {
        Ok(rule) => relay(ctx, &snap, target, parts, incoming, rule, &mut record).await,
        Err(err) => {
            body::discard(incoming).await;
            Err(err)
        }
    };
    let response = result.unwrap_or_else(|err| {
        tracing::debug!(peer = %ctx.peer, host = %target.host, error = %err, "inner request refused");
        record.fail(telemetry, &err);
        err.to_response()
    });
    telemetry.finish_response(record, response)
}

/// Everything decided before any I/O: method, loop, authority, policy.
fn admit<'s>(
    ctx: &ConnCtx,
    snap: &'s Snapshot,
    target: &Target,
    parts: &Parts,
    record: &mut Record,
) -> Result<Option<&'s Rule>, ProxyError> {
    precheck(&parts.method, &parts.headers)?;
    check_authority(parts, target)?;
    let path = policy::normalize_path(parts.uri.path());
    let facts = RequestFacts {
        host: &target.host,
        port: target.port,
        method: Some(&parts.method),
        path: Some(&path),
        client: &ctx.client,
    };
    ctx.judge(snap, &facts, record)
}

async fn relay(
    ctx: &ConnCtx,
    snap: &Snapshot,
    target: &Target,
    mut parts: Parts,
    incoming: Incoming,
    rule: Option<&Rule>,
    record: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    prepare_request_headers(&mut parts.headers);
    // The upstream client derives Host (h1) or :authority (h2) from the URI.
    parts.headers.remove(header::HOST);
    apply_credential(ctx, snap, rule, &mut parts.headers, record);
    record.request_headers(&parts.headers);
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::builder()
        .scheme("https")
        .authority(target.authority())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| ProxyError::BadRequest("invalid request target".into()))?;
    parts.version = http::Version::HTTP_11;
    let counted = Counted::new(incoming, record.request_bytes.clone());
    let upstream = Request::from_parts(parts, body::boxed(counted));
    let host = target.host.to_string();
    let timeout = snap.config.limits.idle_timeout;
    send(&snap.https, upstream, &host, timeout, record).await
}

/// The inner request must name the CONNECT host: by its URI authority (h2 `:authority`,
/// absolute-form h1) and by its `Host` header, whichever it carries.
fn check_authority(parts: &Parts, target: &Target) -> Result<(), ProxyError> {
    if let Some(scheme) = parts.uri.scheme_str() {
        if scheme != "https" {
            return Err(ProxyError::BadRequest(format!(
                "{scheme}:// requests cannot be sent inside a TLS tunnel"
            )));
        }
    }
    let host_header = match parts.headers.get(header::HOST) {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| Authority::from_str(v).ok())
                .ok_or_else(|| ProxyError::BadRequest("invalid Host header".into()))?,
        ),
        None => None,
    };
    let named: Vec<&Authority> = parts
        .uri
        .authority()
        .into_iter()
        .chain(&host_header)
        .collect();
    if named.is_empty() {
        return Err(ProxyError::BadRequest("missing Host header".into()));
    }
    for authority in named {
        let same_host = Host::parse(authority.host()).as_ref() == Some(&target.host);
        let same_port = authority.port_u16().is_none_or(|p| p == target.port);
        if !(same_host && same_port) {
            return Err(ProxyError::Misdirected {
                inner: authority.to_string(),
                tunnel: target.authority(),
            });
        }
    }
    Ok(())
}
