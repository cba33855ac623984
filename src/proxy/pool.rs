//! The pool of HTTP/1.1 connections to plain-http upstreams: checkout, dial (through the
//! snapshot's [`Dialer`], so every socket went to an address destination safety judged), send,
//! and return to the pool when the response body has been read to its end.
//!
//! Why not hyper-util's pooled client: after every HTTP/1.1 response it spawns a task that waits
//! for the connection to become idle before putting it back, and it routes each checkout through
//! a connect race: about 8% of the plain path's user-space instructions (docs/benchmarks.md).
//! Here a connection goes back when its response body ends, from the task that read it, and a
//! checkout is a short critical section over a map keyed by authority, in the shard of the
//! calling serving thread ([`super::workers`]).
//!
//! A connection whose response body was not read to the end is never reused (it is closed).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::body::Body;
use crate::net::{DialError, Dialer};
use crate::policy::Host;

/// How long an idle upstream connection stays pooled (the TLS client's pool too).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per authority; more are closed when they come back.
const MAX_IDLE_PER_AUTHORITY: usize = 256;
/// How often idle connections past [`IDLE_TIMEOUT`] (or closed by the server) are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// A connection idle at least this long may meet its origin's idle timeout: a bodiless
/// idempotent request sent on it is kept so it can be sent again if the origin closes the
/// connection instead of answering. Shorter idle times (a busy pool) skip the copy.
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);
/// How long a checkout waits for a pooled connection that is still finishing its previous
/// exchange (writing a request body the server answered early) before dialling a new one.
const READY_WAIT: Duration = Duration::from_millis(20);

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The URI names no host to dial.
    #[error("upstream URI has no valid host")]
    NoHost,
    /// Resolving, judging or connecting failed.
    #[error("cannot connect")]
    Dial(#[source] DialError),
    /// The HTTP/1.1 handshake on a fresh connection failed.
    #[error("connection setup failed")]
    Handshake(#[source] hyper::Error),
    /// The exchange failed after the request was (at least partly) sent.
    #[error("upstream exchange failed")]
    Exchange(#[source] hyper::Error),
}

impl PoolError {
    /// Whether the failure happened before a connection was established.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::NoHost | Self::Dial(_) | Self::Handshake(_))
    }
}

/// One pooled connection: its request handle and the address it went to.
struct Conn {
    sender: http1::SendRequest<Body>,
    addr: SocketAddr,
    idle_since: Instant,
}

#[derive(Default)]
struct Idle {
    // foldhash, not SipHash: `Authority` hashes byte by byte (case-insensitively), which with
    // SipHash cost more than the rest of a checkout.
    by_authority: foldhash::HashMap<Authority, Vec<Conn>>,
}

/// Idle connections are kept per serving thread ([`super::workers`]): a connection's task runs
/// on the thread that opened it, so reusing it from that thread keeps the exchange on one
/// thread (and the shards' locks uncontended).
const SHARDS: usize = 64;

struct Shared {
    dialer: Dialer,
    idle: Box<[Mutex<Idle>]>,
}

impl Shared {
    /// The idle connections of the calling thread's shard.
    fn shard(&self) -> &Mutex<Idle> {
        // `idle` has SHARDS entries, so the index is always in range.
        &self.idle[super::workers::current() % SHARDS]
    }
}

/// A pool of HTTP/1.1 upstream connections; clones share it. Built once per configuration
/// snapshot.
#[derive(Clone)]
pub struct H1Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool").finish_non_exhaustive()
    }
}

impl H1Pool {
    /// An empty pool dialling through `dialer`. Within a tokio runtime it also starts the sweeper
    /// that closes connections idle longer than 90 s; the sweeper ends with the pool.
    pub fn new(dialer: Dialer) -> Self {
        let shared = Arc::new(Shared {
            dialer,
            idle: (0..SHARDS).map(|_| Mutex::default()).collect(),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&shared)));
        }
        Self { shared }
    }

    /// Sends `req` (an absolute-form `http://` URI) on a pooled or new connection, in origin
    /// form with a `Host` header (added from the URI when the client sent none). A request that
    /// a reused connection dropped before sending any of it is sent again on a new connection;
    /// so is a bodiless idempotent one (RFC 9110 §9.2.2) that a connection idle for a while
    /// dropped after it was sent (the origin closing it at its idle timeout), as nginx retries
    /// `proxy_next_upstream error` for idempotent requests.
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<(Response<Body>, SocketAddr), PoolError> {
        let authority = req.uri().authority().cloned().ok_or(PoolError::NoHost)?;
        if !req.headers().contains_key(HOST) {
            let value = HeaderValue::from_str(authority.as_str()).map_err(|_| PoolError::NoHost)?;
            req.headers_mut().insert(HOST, value);
        }
        *req.uri_mut() = origin_form(req.uri());
        let mut reused = self.checkout(&authority).await;
        loop {
            let was_reused = reused.is_some();
            let mut conn = match reused.take() {
                Some(conn) => conn,
                None => self.connect(&authority).await?,
            };
            let replay = if was_reused && conn.idle_since.elapsed() >= REPLAY_AFTER_IDLE {
                replayable(&req)
            } else {
                None
            };
            match conn.sender.try_send_request(req).await {
                Ok(response) => {
                    let addr = conn.addr;
                    return Ok((self.pooled(response, conn, authority), addr));
                }
                Err(mut failed) => match (failed.take_message(), replay) {
                    // The server closed the idle connection as we picked it: nothing was sent.
                    (Some(unsent), _) if was_reused => req = unsent,
                    (_, Some(copy)) => req = copy,
                    _ => return Err(PoolError::Exchange(failed.into_error())),
                },
            }
        }
    }

    /// The newest idle connection to `authority` that can take a request, dropping closed and
    /// expired ones on the way. The lock is never held across an await.
    async fn checkout(&self, authority: &Authority) -> Option<Conn> {
        let mut busy = None;
        {
            let mut idle = self.shared.shard().lock().ok()?;
            let conns = idle.by_authority.get_mut(authority)?;
            while let Some(conn) = conns.pop() {
                if conn.sender.is_closed() || conn.idle_since.elapsed() > IDLE_TIMEOUT {
                    continue;
                }
                if conn.sender.is_ready() {
                    return Some(conn);
                }
                // Still finishing its last exchange: worth a short wait only if nothing better.
                busy = Some(conn);
                break;
            }
        }
        let mut conn = busy?;
        match tokio::time::timeout(READY_WAIT, conn.sender.ready()).await {
            Ok(Ok(())) => Some(conn),
            _ => None,
        }
    }

    /// Dials `authority` and performs the HTTP/1.1 handshake; the connection runs in its own task.
    async fn connect(&self, authority: &Authority) -> Result<Conn, PoolError> {
        let host = Host::parse(authority.host()).ok_or(PoolError::NoHost)?;
        let port = authority.port_u16().unwrap_or(80);
        let dialed = self
            .shared
            .dialer
            .dial(&host, port)
            .await
            .map_err(PoolError::Dial)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(dialed.stream))
            .await
            .map_err(PoolError::Handshake)?;
        let opened = dialed.opened;
        tokio::spawn(async move {
            // The connection's own failures reach the request that was using it.
            let _ = connection.await;
            drop(opened);
        });
        Ok(Conn {
            sender,
            addr: dialed.addr,
            idle_since: Instant::now(),
        })
    }

    /// The response with a body that returns `conn` to the pool when it ends.
    fn pooled(
        &self,
        response: Response<Incoming>,
        conn: Conn,
        authority: Authority,
    ) -> Response<Body> {
        let (parts, incoming) = response.into_parts();
        let body = PooledBody {
            inner: incoming,
            give_back: Some(GiveBack {
                conn,
                authority,
                pool: Arc::downgrade(&self.shared),
            }),
        };
        Response::from_parts(parts, crate::body::boxed(body))
    }
}

/// What a finished response body hands back to the pool.
struct GiveBack {
    conn: Conn,
    authority: Authority,
    pool: Weak<Shared>,
}

impl GiveBack {
    fn put(mut self) {
        if self.conn.sender.is_closed() {
            return;
        }
        let Some(shared) = self.pool.upgrade() else {
            return;
        };
        let Ok(mut idle) = shared.shard().lock() else {
            return;
        };
        let conns = idle.by_authority.entry(self.authority).or_default();
        if conns.len() < MAX_IDLE_PER_AUTHORITY {
            self.conn.idle_since = Instant::now();
            conns.push(self.conn);
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body that returns its connection to the pool once read to the end.
    struct PooledBody {
        #[pin]
        inner: Incoming,
        give_back: Option<GiveBack>,
    }

    impl PinnedDrop for PooledBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A body dropped unread leaves the connection mid-response: it closes instead.
            if let Some(give_back) = this.give_back.take() {
                if http_body::Body::is_end_stream(&*this.inner) {
                    give_back.put();
                }
            }
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            if let Some(give_back) = this.give_back.take() {
                give_back.put();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A copy of `req` to send again, if it is idempotent and has no body to replay.
fn replayable(req: &Request<Body>) -> Option<Request<Body>> {
    if !req.method().is_idempotent() || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(crate::body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// `uri` reduced to its path and query (the form an origin server expects).
fn origin_form(uri: &Uri) -> Uri {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path)
}

/// Every [`SWEEP_EVERY`], drops idle connections that expired or were closed by their server,
/// until the pool is gone.
async fn sweep(pool: Weak<Shared>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(shared) = pool.upgrade() else {
            return;
        };
        for shard in &shared.idle {
            let Ok(mut idle) = shard.lock() else {
                continue;
            };
            idle.by_authority.retain(|_, conns| {
                conns.retain(|c| !c.sender.is_closed() && c.idle_since.elapsed() <= IDLE_TIMEOUT);
                !conns.is_empty()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_keeps_path_and_query_only() {
        let uri: Uri = "http://a.example:8080/x/y?q=1".parse().unwrap();
        assert_eq!(origin_form(&uri), "/x/y?q=1");
        let uri: Uri = "http://a.example".parse().unwrap();
        assert_eq!(origin_form(&uri), "/");
    }
}
