//! CONNECT: policy first, then dial the upstream (within the connect timeout), and only then
//! answer `200`, so a client never gets a dead tunnel. Then either relay bytes (tunnel) or
//! terminate TLS and serve the requests inside (intercept).
//!
//! A tunnel peeks at the client's first bytes: a TLS ClientHello whose SNI names another host
//! than the CONNECT target closes the tunnel (`sni_mismatch`), so an allowed name cannot be used
//! as a front for another destination.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::forward::precheck;
use crate::intercept;
use crate::policy::{normalize_host, Host, RequestFacts};
use crate::server::{ConnCtx, Gauged, Snapshot};
use crate::telemetry::{Kind, Record};

/// What the CONNECT opened before answering 200.
enum Opened {
    /// A tunnel: the upstream socket, already connected.
    Tunnel(TcpStream),
    /// Interception: the TLS configuration for the CONNECT host (addresses already judged).
    Intercept(Arc<ServerConfig>),
}

/// Serves one CONNECT request. Its audit event (kind `tunnel`) is written when the tunnel ends,
/// or at once if the CONNECT is refused.
pub async fn handle(ctx: &ConnCtx, snap: &Snapshot, mut req: Request<Incoming>) -> Response<Body> {
    let telemetry = ctx.state.telemetry.clone();
    let mut record = Record::new(
        &telemetry,
        snap.masker.clone(),
        Kind::Tunnel,
        &ctx.client,
        ctx.peer,
        req.method(),
    );
    let opened = if ctx.state.is_draining() {
        Err(ProxyError::Draining)
    } else {
        open(ctx, snap, &req, &mut record).await
    };
    let (host, port, opened) = match opened {
        Ok(opened) => opened,
        Err(err) => {
            tracing::debug!(peer = %ctx.peer, error = %err, "CONNECT refused");
            record.fail(&telemetry, &err);
            return telemetry.finish_response(record, err.to_response());
        }
    };
    record.event.status = Some(200);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnel_ctx = ctx.clone();
    let limits = snap.config.limits.clone();
    let stop = ctx.state.hard_stop.clone();
    ctx.state.tunnels.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                record.finish_tunnel(&telemetry, 0, 0, Some(format!("CONNECT upgrade failed: {e}")));
                return;
            }
        };
        let _active = Gauged::new(&telemetry.metrics.active_tunnels);
        let (up, down, error) = match opened {
            Opened::Intercept(tls) => {
                let target = intercept::Target { host, port };
                tokio::select! {
                    counts = intercept::serve(tunnel_ctx, target, upgraded, tls) => counts,
                    () = stop.cancelled() => (0, 0, Some("cut at shutdown".to_owned())),
                }
            }
            Opened::Tunnel(upstream) => {
                let relay = relay(
                    TokioIo::new(upgraded),
                    upstream,
                    &host,
                    limits.idle_timeout,
                    limits.header_read_timeout,
                );
                let outcome = tokio::select! {
                    outcome = relay => outcome,
                    () = stop.cancelled() => RelayOutcome { bytes_up: 0, bytes_down: 0, end: TunnelEnd::Shutdown },
                };
                tracing::debug!(
                    peer = %tunnel_ctx.peer,
                    host = %host,
                    port,
                    up = outcome.bytes_up,
                    down = outcome.bytes_down,
                    end = outcome.end.as_str(),
                    "tunnel closed"
                );
                let error = (outcome.end != TunnelEnd::Closed).then(|| outcome.end.as_str().to_owned());
                (outcome.bytes_up, outcome.bytes_down, error)
            }
        };
        record.finish_tunnel(&telemetry, up, down, error);
    });
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    response
}

/// Policy, then either dial (tunnel) or judge the addresses and prepare the leaf (intercept).
/// An intercepted tunnel's upstream connections come from the pool, per inner request; a
/// connect failure there is answered inside the tunnel (502/504 with `Proxy-Status`).
async fn open(
    ctx: &ConnCtx,
    snap: &Snapshot,
    req: &Request<Incoming>,
    record: &mut Record,
) -> Result<(Host, u16, Opened), ProxyError> {
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    record.target(
        None,
        authority.host(),
        authority.port_u16().unwrap_or(0),
        None,
    );
    precheck(req.method(), req.headers())?;
    let port = authority
        .port_u16()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    let host = Host::parse(authority.host())
        .ok_or_else(|| ProxyError::BadRequest(format!("invalid host {:?}", authority.host())))?;
    let facts = RequestFacts {
        host: &host,
        port,
        method: None,
        path: None,
        client: &ctx.client,
    };
    // Report mode may let an unlisted CONNECT through: it is tunneled (no rule, no credential).
    let rule = ctx.judge(snap, &facts, record)?;
    let name = host.to_string();
    if rule.is_some_and(|r| r.intercepts()) {
        record.event.intercepted = true;
        snap.dialer
            .resolve_checked(&host, port)
            .await
            .map_err(|e| ProxyError::from_dial(&name, &e))?;
        let tls = ctx
            .state
            .interceptor
            .server_config(&host)
            .await
            .map_err(|e| {
                ctx.state.telemetry.metrics.certificate_errors.inc();
                tracing::error!(host = %name, error = %e, "cannot mint an interception certificate");
                ProxyError::Internal(format!("cannot mint a certificate for {name}"))
            })?;
        return Ok((host, port, Opened::Intercept(tls)));
    }
    let dialed = snap
        .dialer
        .dial(&host, port)
        .await
        .map_err(|e| ProxyError::from_dial(&name, &e))?;
    record.event.upstream_addr = Some(dialed.addr);
    Ok((host, port, Opened::Tunnel(dialed.stream)))
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed.
    Closed,
    /// Nothing moved for `idle_timeout`.
    Idle,
    /// The ClientHello named another host.
    SniMismatch,
    /// The first bytes looked like TLS but were not a valid ClientHello, or never completed.
    BadClientHello,
    /// A socket error.
    Error,
    /// Cut when the shutdown grace period ended.
    Shutdown,
}

impl TunnelEnd {
    /// Name for logs and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Idle => "idle_timeout",
            Self::SniMismatch => "sni_mismatch",
            Self::BadClientHello => "bad_client_hello",
            Self::Error => "error",
            Self::Shutdown => "cut at shutdown",
        }
    }
}

/// What a relay moved and how it ended.
#[derive(Debug, Clone, Copy)]
pub struct RelayOutcome {
    /// Client → upstream bytes.
    pub bytes_up: u64,
    /// Upstream → client bytes.
    pub bytes_down: u64,
    /// Why it ended.
    pub end: TunnelEnd,
}

/// A relay buffer starts at this size (interactive traffic: small reads) …
const RELAY_BUFFER_BYTES: usize = 16 * 1024;
/// … and doubles up to this one while reads keep filling it (bulk transfers: fewer syscalls).
const RELAY_BUFFER_MAX_BYTES: usize = 256 * 1024;
const MAX_CLIENT_HELLO_BYTES: usize = 64 * 1024;
/// The first read from the client: enough for most ClientHellos, on the task's own state, so an
/// idle tunnel holds no heap buffer.
const FIRST_READ_BYTES: usize = 2048;

/// Relays bytes both ways until both sides close (a side's EOF is passed on as a write
/// shutdown), an error, or `idle` passes with no byte in either direction. The client's first
/// bytes are inspected for a ClientHello naming another host than `host`; once they start, the
/// whole ClientHello must arrive within `hello_timeout`.
///
/// Relay buffers are allocated on first traffic, so an idle tunnel costs little memory.
pub async fn relay<C>(
    client: C,
    upstream: TcpStream,
    host: &Host,
    idle: Duration,
    hello_timeout: Duration,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = upstream.into_split();

    let up = async {
        let first = inspect_first_bytes(&mut client_read, host, hello_timeout).await?;
        if first.is_empty() {
            let _ = upstream_write.shutdown().await;
            return Ok(());
        }
        upstream_write
            .write_all(&first)
            .await
            .map_err(|_| TunnelEnd::Error)?;
        up_bytes.fetch_add(first.len() as u64, Ordering::Relaxed);
        drop(first);
        touch(&last_activity, start);
        pump(
            &mut client_read,
            &mut upstream_write,
            &up_bytes,
            &last_activity,
            start,
        )
        .await
    };
    let down = async {
        // Wait for the upstream to have something before allocating a buffer.
        upstream_read
            .readable()
            .await
            .map_err(|_| TunnelEnd::Error)?;
        pump(
            &mut upstream_read,
            &mut client_write,
            &down_bytes,
            &last_activity,
            start,
        )
        .await
    };
    let idle_watch = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = start + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let end = tokio::select! {
        result = async { tokio::try_join!(up, down) } => match result {
            Ok(_) => TunnelEnd::Closed,
            Err(end) => end,
        },
        () = idle_watch => TunnelEnd::Idle,
    };
    RelayOutcome {
        bytes_up: up_bytes.load(Ordering::Relaxed),
        bytes_down: down_bytes.load(Ordering::Relaxed),
        end,
    }
}

fn touch(last: &AtomicU64, start: Instant) {
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    last.store(ms, Ordering::Relaxed);
}

async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> Result<(), TunnelEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER_BYTES];
    loop {
        let n = reader.read(&mut buf).await.map_err(|_| TunnelEnd::Error)?;
        if n == 0 {
            // Pass the EOF on; the other direction keeps flowing until its side closes too.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        writer
            .write_all(&buf[..n])
            .await
            .map_err(|_| TunnelEnd::Error)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        touch(last, start);
        if n == buf.len() && buf.len() < RELAY_BUFFER_MAX_BYTES {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// Reads the client's first bytes (however long that takes: the idle timeout governs). Not TLS:
/// returned as they are. TLS: the rest of the ClientHello must follow within `hello_timeout`,
/// then its SNI is compared with the CONNECT host. Returns the bytes to forward (empty on EOF).
async fn inspect_first_bytes<R: AsyncRead + Unpin>(
    reader: &mut R,
    host: &Host,
    hello_timeout: Duration,
) -> Result<BytesMut, TunnelEnd> {
    let mut first = [0u8; FIRST_READ_BYTES];
    let n = reader
        .read(&mut first)
        .await
        .map_err(|_| TunnelEnd::Error)?;
    let mut buf = BytesMut::from(&first[..n]);
    if n == 0 || first[0] != 0x16 {
        return Ok(buf);
    }
    match tokio::time::timeout(hello_timeout, complete_client_hello(reader, &mut buf, host)).await {
        Ok(Ok(())) => Ok(buf),
        Ok(Err(end)) => Err(end),
        Err(_) => Err(TunnelEnd::BadClientHello),
    }
}

async fn complete_client_hello<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    host: &Host,
) -> Result<(), TunnelEnd> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        let mut unread = &buf[fed..];
        while !unread.is_empty() {
            let taken = acceptor
                .read_tls(&mut unread)
                .map_err(|_| TunnelEnd::BadClientHello)?;
            if taken == 0 {
                break;
            }
        }
        fed = buf.len();
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_owned);
                return match sni {
                    Some(name) if !sni_matches(&name, host) => Err(TunnelEnd::SniMismatch),
                    _ => Ok(()),
                };
            }
            Ok(None) => {}
            Err(_) => return Err(TunnelEnd::BadClientHello),
        }
        if buf.len() >= MAX_CLIENT_HELLO_BYTES {
            return Err(TunnelEnd::BadClientHello);
        }
        let n = reader.read_buf(buf).await.map_err(|_| TunnelEnd::Error)?;
        if n == 0 {
            return Err(TunnelEnd::BadClientHello);
        }
    }
}

/// Whether a ClientHello's SNI names the CONNECT host.
pub fn sni_matches(sni: &str, host: &Host) -> bool {
    match (normalize_host(sni), host) {
        (Some(sni), Host::Name(name)) => &sni == name,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_comparison_normalises() {
        let h = Host::parse("api.example.com").unwrap();
        assert!(sni_matches("API.example.com.", &h));
        assert!(!sni_matches("evil.example.com", &h));
        let ip = Host::parse("192.0.2.1").unwrap();
        assert!(!sni_matches("api.example.com", &ip));
    }
}
