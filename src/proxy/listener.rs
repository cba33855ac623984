//! The proxy listener: accept → connection slot (503 beyond `max_connections`, answered without
//! reading the request) → HTTP/1.1 with header-read and keep-alive deadlines
//! ([`super::keepalive`]) → [`super::dispatch`] for each request.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::dispatch;
use super::keepalive::{ConnTimer, CountingIo, IoCounter, Lingering};
use super::state::{ConnCtx, State};
use crate::error::{raw_refusal, ProxyError};
use crate::telemetry::Gauged;

/// Accepts client connections until the future is dropped (when shutdown begins), each served
/// by `serve` (the proxy listener's HTTP/1.1, or transparent mode's redirected connections)
/// once it has a connection slot, on one of the serving threads ([`super::workers`]).
pub async fn accept_loop<F, Fut>(state: &Arc<State>, listener: &TcpListener, serve: F)
where
    F: Fn(ConnCtx, TcpStream) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if stream
            .local_addr()
            .is_ok_and(|local| state.own.opened(peer, local))
        {
            // The proxy dialled itself: a loop, and never a client (whatever network it is in).
            tracing::warn!(%peer, "refused a connection the proxy opened to itself");
            count_refusal(state, &ProxyError::Loop);
            tokio::spawn(refuse(stream, ProxyError::Loop));
            continue;
        }
        let Some(slot) = state.connection_slot() else {
            // No request was read, so there is no audit event; the refusal is counted.
            let err = ProxyError::Overloaded;
            count_refusal(state, &err);
            tokio::spawn(refuse(stream, err));
            continue;
        };
        let _ = stream.set_nodelay(true);
        // The socket moves to the serving thread's own I/O driver.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepted connection lost");
                continue;
            }
        };
        let active = Gauged::new(&state.telemetry.metrics.active_connections);
        let conn = ConnCtx::new(state.clone(), peer, slot);
        state.tasks.spawn_on(
            async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => serve(conn, stream).await,
                    Err(e) => tracing::warn!(error = %e, "accepted connection lost"),
                }
                drop(active);
            },
            state.workers.pick(),
        );
    }
}

/// Counts a connection refused before any request was read (so there is no audit event).
fn count_refusal(state: &State, err: &ProxyError) {
    state
        .telemetry
        .metrics
        .denials
        .with_label_values(&[err.class().reason])
        .inc();
}

/// Answers a connection the proxy will not serve, without reading its request.
async fn refuse(mut stream: TcpStream, err: ProxyError) {
    let bytes = raw_refusal(&err);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(&bytes).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serves one connection to the proxy listener.
pub async fn serve_connection(conn: ConnCtx, stream: TcpStream) {
    let state = conn.state.clone();
    let limits = state.snapshot().config.limits.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(dispatch::serve(&conn, req).await) }
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
        .serve_connection(io, service)
        .with_upgrades();
    let result = state
        .drive(served, &counter, |c| c.graceful_shutdown())
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}
