//! Intercepted CONNECT tunnels: the proxy terminates the client's TLS with a leaf minted for the
//! CONNECT host, serves HTTP/1.1 or h2 inside (by ALPN), and judges every inner request on its own
//! — method, path, credential — before relaying it over verified, pooled upstream TLS.
//!
//! Each inner request goes through the one request pipeline ([`super::request`]) with origin
//! [`Origin::Tunnel`]: the CONNECT's identity holds for every request inside, and every inner
//! request must name the CONNECT host (`Host` / `:authority`), else 421 — a tunnel opened for one
//! host is never used to reach another.

use std::convert::Infallible;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use super::headers::close_after;
use super::keepalive::{ConnTimer, CountingIo, IoCounter};
use super::outcome;
use super::request::{self, Origin, TunnelTarget};
use super::state::{ConnCtx, Driven};
use super::tunnel::TunnelEnd;
use crate::body::Body;
use crate::identity::Identity;
use crate::telemetry::{Kind, Record};

/// What every request inside one intercepted tunnel shares.
struct Tunnel {
    conn: ConnCtx,
    identity: Identity,
    target: TunnelTarget,
}

impl Tunnel {
    /// One inner request: its own audit record, then the one request pipeline, judged against
    /// the rules current when it arrives.
    async fn serve(&self, req: Request<Incoming>) -> http::Response<Body> {
        let snap = self.conn.state.snapshot();
        let telemetry = &self.conn.state.telemetry;
        let mut record = Record::new(
            telemetry,
            snap.masker.clone(),
            Kind::Request,
            &self.identity.name,
            self.conn.peer,
            req.method(),
        );
        record.identified(
            &self.identity.name,
            self.identity.subject.as_ref(),
            self.identity.token.as_ref(),
        );
        let origin = Origin::Tunnel(&self.target);
        let version = req.version();
        let result =
            request::handle(&self.conn, &snap, &self.identity, origin, req, &mut record).await;
        let mut response = outcome::respond(telemetry, record, result);
        if self.conn.state.is_draining() {
            close_after(&mut response, version);
        }
        response
    }
}

/// Terminates TLS on the upgraded CONNECT stream (`client`) and serves the requests inside until
/// the client closes, the connection idles out, or shutdown. Returns what went wrong, if anything.
pub async fn serve<C>(
    ctx: ConnCtx,
    identity: Identity,
    target: TunnelTarget,
    client: C,
    tls: Arc<ServerConfig>,
) -> Option<String>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = ctx.state.snapshot().config.limits.clone();
    let accept = TlsAcceptor::from(tls).accept(client);
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
    // Decrypted bytes, for the keep-alive deadlines of HTTP/1.1 inside.
    let inner = Arc::new(IoCounter::default());
    let io = TokioIo::new(CountingIo::new(stream, inner.clone()));
    let state = ctx.state.clone();
    let tunnel = Arc::new(Tunnel {
        conn: ctx,
        identity,
        target,
    });
    let service = service_fn(move |req: Request<Incoming>| {
        let tunnel = tunnel.clone();
        async move { Ok::<_, Infallible>(tunnel.serve(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(ConnTimer::new(inner.clone(), limits.idle_timeout))
        .header_read_timeout(limits.header_read_timeout)
        // hyper's floor for the read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let conn = builder.serve_connection(io, service);
    let result = state.drive(conn, &inner, |c| c.graceful_shutdown()).await;
    match result {
        Ok(Driven::Ended) => None,
        Ok(Driven::Cut) => Some(TunnelEnd::Shutdown.as_str().to_owned()),
        Err(e) => {
            tracing::debug!(error = %e, "intercepted connection ended with an error");
            Some(e.to_string())
        }
    }
}
