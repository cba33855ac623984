//! CONNECT: policy first, then dial the upstream (within the connect timeout), and only then
//! answer `200`, so a client never gets a dead tunnel. Then either relay bytes
//! ([`super::tunnel`]) or terminate TLS and serve the requests inside ([`super::intercept`]).
//!
//! The tunnel's audit event (kind `tunnel`) is written when it ends, with the bytes it moved —
//! also when it is cut at the end of the shutdown grace period.

use std::sync::Arc;

use futures_util::TryFutureExt;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;

use super::headers::precheck;
use super::intercept;
use super::keepalive::{CountingIo, IoCounter};
use super::outcome;
use super::request::{refuse_userinfo, TunnelTarget};
use super::state::{ConnCtx, Snapshot};
use super::tunnel::{self, TunnelEnd};
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::net::Dialed;
use crate::policy::{self, Host, RequestFacts};
use crate::telemetry::{Gauged, Record};

/// What the CONNECT opened before answering 200.
pub enum Opened {
    /// A tunnel: the upstream connection, already established.
    Tunnel(TunnelTarget, Dialed),
    /// Interception: the TLS configuration for the CONNECT host (addresses already judged).
    Intercept(TunnelTarget, Arc<ServerConfig>),
}

/// Policy, then either dial (tunnel) or judge the addresses and prepare the leaf (intercept).
/// An intercepted tunnel's upstream connections come from the pool, per inner request; a
/// connect failure there is answered inside the tunnel (502/504 with `Proxy-Status`).
pub async fn open(
    conn: &ConnCtx,
    snap: &Snapshot,
    identity: &Identity,
    req: &Request<Incoming>,
    record: &mut Record,
) -> Result<Opened, ProxyError> {
    let bad = || ProxyError::BadRequest("CONNECT needs host:port".into());
    let authority = req.uri().authority().ok_or_else(bad)?;
    refuse_userinfo(authority)?;
    precheck(req.method(), req.headers())?;
    let port = authority.port_u16().ok_or_else(bad)?;
    let host = Host::parse(authority.host())
        .ok_or_else(|| ProxyError::BadRequest(format!("invalid host {:?}", authority.host())))?;
    open_target(conn, snap, identity, host, port, record).await
}

/// The CONNECT path for `host:port`, however the target was named (a CONNECT request, or a
/// redirected connection's SNI and original port in transparent mode): policy, then dial
/// (tunnel) or judge the addresses and prepare the leaf (intercept).
pub async fn open_target(
    conn: &ConnCtx,
    snap: &Snapshot,
    identity: &Identity,
    host: Host,
    port: u16,
    record: &mut Record,
) -> Result<Opened, ProxyError> {
    let facts = RequestFacts {
        host: &host,
        port,
        method: None,
        path: None,
        client: &identity.name,
    };
    // Report mode may let an unlisted CONNECT through: it is tunneled (no rule, no credential).
    let verdict = policy::judge(&snap.config.rules, &facts, identity.mode);
    let rule = outcome::admit(record, verdict)?;
    let name = || host.to_string();
    if rule.is_some_and(|r| r.intercepts()) {
        record.event.intercepted = true;
        snap.dialer
            .resolve_checked(&host, port)
            .await
            .map_err(|e| ProxyError::from_dial(&name(), &e))?;
        let tls = conn
            .state
            .interceptor
            .server_config(&host)
            .await
            .map_err(|e| {
                conn.state.telemetry.metrics.certificate_errors.inc();
                tracing::error!(host = %name(), error = %e, "cannot mint an interception certificate");
                ProxyError::Internal(format!("cannot mint a certificate for {}", name()))
            })?;
        return Ok(Opened::Intercept(TunnelTarget::new(host, port)?, tls));
    }
    let dialed = snap
        .dialer
        .dial(&host, port)
        .await
        .map_err(|e| ProxyError::from_dial(&name(), &e))?;
    record.event.upstream_addr = Some(dialed.addr);
    Ok(Opened::Tunnel(TunnelTarget::new(host, port)?, dialed))
}

/// Answers `200` and spawns the tunnel, which takes over the CONNECT's record and writes it when
/// the tunnel ends.
pub fn start(
    conn: &ConnCtx,
    snap: &Snapshot,
    identity: Identity,
    opened: Opened,
    req: &mut Request<Incoming>,
    mut record: Record,
) -> Response<Body> {
    record.event.status = Some(200);
    let client = hyper::upgrade::on(req).map_ok(TokioIo::new);
    let limits = snap.config.limits.clone();
    conn.state
        .tasks
        .spawn(run(conn.clone(), identity, opened, client, limits, record));
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    response
}

/// Runs an opened tunnel over the client's connection, once `client` gives it (a CONNECT's
/// upgraded connection, or a redirected socket in transparent mode), until it ends — or the
/// shutdown grace period does — then writes its record with the bytes it moved.
///
/// One future from the upgrade to the end: an idle tunnel's memory is this future, so nothing
/// it holds is stored twice (a wrapper awaiting it would keep its own copy of the arguments).
pub async fn run<C, E>(
    conn: ConnCtx,
    identity: Identity,
    opened: Opened,
    client: impl std::future::Future<Output = Result<C, E>>,
    limits: crate::config::Limits,
    record: Record,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    E: std::fmt::Display,
{
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            let error = Some(format!("CONNECT upgrade failed: {e}"));
            record.finish_tunnel(&conn.state.telemetry, 0, 0, error);
            return;
        }
    };
    let telemetry = conn.state.telemetry.clone();
    let stop = conn.state.hard_stop.clone();
    let _active = Gauged::new(&telemetry.metrics.active_tunnels);
    // Counted on the client side and owned here, so a tunnel cut at shutdown still reports
    // what it moved: read = client → upstream, written = upstream → client.
    let counter = Arc::new(IoCounter::default());
    let client = CountingIo::new(client, counter.clone());
    let work = async {
        match opened {
            Opened::Intercept(target, tls) => {
                // Boxed: the interception future is several times a relay's, and an idle
                // tunnel should not carry its size.
                Box::pin(intercept::serve(
                    conn.clone(),
                    identity,
                    target,
                    client,
                    tls,
                ))
                .await
            }
            Opened::Tunnel(target, dialed) => {
                let idle = limits.idle_timeout;
                let hello = limits.header_read_timeout;
                // Marks the socket as the proxy's own for as long as the relay runs.
                let _opened = dialed.opened;
                let upstream = dialed.stream;
                let end = tunnel::relay(client, upstream, &target.host, idle, hello).await;
                tracing::debug!(
                    peer = %conn.peer,
                    host = %target.host,
                    port = target.port,
                    up = counter.read(),
                    down = counter.written(),
                    end = end.as_str(),
                    "tunnel closed"
                );
                (end != TunnelEnd::Closed).then(|| end.as_str().to_owned())
            }
        }
    };
    // Pinned and polled by reference: moved into `select!` it would be stored twice.
    tokio::pin!(work);
    // The hard stop first: at the end of the grace period the work may finish in the same
    // instant, and it was still cut. (An intercepted connection also says so itself: its own
    // watch of the hard stop, polled on this thread, can see the cancel another thread makes
    // after this select looked.)
    let error = tokio::select! {
        biased;
        () = stop.cancelled() => Some(TunnelEnd::Shutdown.as_str().to_owned()),
        error = &mut work => error,
    };
    let (up, down) = (counter.read(), counter.written());
    record.finish_tunnel(&telemetry, up, down, error);
}
