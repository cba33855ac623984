//! Pooled upstream HTTP clients, and what their failures mean. Connections are opened by
//! [`crate::net::Dialer`], so pooled or fresh, every upstream socket went to an address
//! destination safety judged; that address comes back with each response for the audit trail.
//!
//! Clients are built once per configuration snapshot, never per request.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::Body;
use crate::error::ProxyError;
use crate::net::{DialError, Dialer, OpenedSocket};
use crate::policy::Host;
use crate::proxy::pool::{H1Pool, PoolError};

/// The address an upstream response came from (how the TLS client's connector reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamAddr(pub SocketAddr);

/// Dials `http://host:port` URIs through the snapshot's [`Dialer`].
#[derive(Debug, Clone)]
pub struct Connector {
    dialer: Dialer,
}

impl Connector {
    /// A connector over `dialer`.
    pub fn new(dialer: Dialer) -> Self {
        Self { dialer }
    }
}

/// A dialled upstream TCP connection that reports its peer address to the pool.
#[derive(Debug)]
pub struct UpstreamStream {
    io: TokioIo<TcpStream>,
    addr: SocketAddr,
    _opened: Option<OpenedSocket>,
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new().extra(UpstreamAddr(self.addr))
    }
}

impl Read for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for UpstreamStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// A URI the connector cannot dial (no host).
#[derive(Debug, thiserror::Error)]
#[error("upstream URI has no valid host")]
pub struct NoHost;

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamStream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let host = uri.host().and_then(Host::parse).ok_or(NoHost)?;
            let default_port = if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            };
            let port = uri.port_u16().unwrap_or(default_port);
            let dialed = dialer.dial(&host, port).await?;
            Ok(UpstreamStream {
                io: TokioIo::new(dialed.stream),
                addr: dialed.addr,
                _opened: dialed.opened,
            })
        })
    }
}

/// The pooled client for TLS upstreams (intercepted requests): verifies the server against the
/// snapshot's roots, negotiates h2 or HTTP/1.1 by ALPN.
pub type HttpsClient = Client<HttpsConnector<Connector>, Body>;

/// Builds the TLS-upstream client of a snapshot.
pub fn https_client(dialer: Dialer, tls: rustls::ClientConfig) -> HttpsClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(Connector::new(dialer));
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(crate::proxy::pool::IDLE_TIMEOUT)
        .build(connector)
}

/// A snapshot's pooled clients: an HTTP/1.1 pool for `http://` upstreams, a client negotiating
/// h2 or HTTP/1.1 for `https://` ones. Clones share the pools.
#[derive(Clone)]
pub struct Upstreams {
    http: H1Pool,
    https: HttpsClient,
}

/// Why an upstream exchange failed (classified by [`failure`]).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// From the plain-http pool.
    #[error(transparent)]
    Plain(#[from] PoolError),
    /// From the TLS client.
    #[error(transparent)]
    Tls(#[from] hyper_util::client::legacy::Error),
}

impl Upstreams {
    /// Both clients, dialling through `dialer`; `tls` verifies upstream servers.
    pub fn new(dialer: &Dialer, tls: rustls::ClientConfig) -> Self {
        Self {
            http: H1Pool::new(dialer.clone()),
            https: https_client(dialer.clone(), tls),
        }
    }

    /// Sends `req` (absolute-form URI) on the client for its scheme; returns the response and
    /// the address it came from.
    pub async fn request(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<Body>, Option<SocketAddr>), UpstreamError> {
        if req.uri().scheme_str() == Some("https") {
            let mut response = self.https.request(req).await?;
            let addr = response.extensions_mut().remove::<UpstreamAddr>();
            Ok((
                boxed_response(response),
                addr.map(|UpstreamAddr(addr)| addr),
            ))
        } else {
            let (response, addr) = self.http.send(req).await?;
            Ok((response, Some(addr)))
        }
    }
}

impl Upstreams {
    /// One exchange the proxy makes for itself (a token endpoint, an OIDC issuer's keys): sends
    /// `req`, requires a 2xx, and reads at most `limit_bytes` of the answer, all within
    /// `timeout`. The error names `what` and a status code or a fixed reason — never anything
    /// from the answer's body.
    pub async fn exchange(
        &self,
        req: Request<Body>,
        what: &str,
        limit_bytes: usize,
        timeout: std::time::Duration,
    ) -> Result<bytes::Bytes, String> {
        let host = req.uri().host().unwrap_or_default().to_owned();
        let exchange = async {
            let (response, _) = self
                .request(req)
                .await
                .map_err(|e| format!("{what} unreachable ({})", failure(&host, &e)))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("{what} answered {}", status.as_u16()));
            }
            crate::body::collect_limited(&mut response.into_body(), limit_bytes)
                .await
                .map_err(|_| format!("the {what}'s answer could not be read"))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("the {what} did not answer in time"))?
    }
}

/// A response with its body boxed (a plain function: boxing inside the `async fn` trips the
/// compiler's higher-ranked `Send` check of the spawned callers).
fn boxed_response(response: Response<hyper::body::Incoming>) -> Response<Body> {
    response.map(crate::body::boxed)
}

/// Classifies a client error: dial failures keep their class; anything after connecting is the
/// upstream dropping us.
pub fn failure(host: &str, err: &UpstreamError) -> ProxyError {
    if let Some(dial) = dial_error(err) {
        return ProxyError::from_dial(host, dial);
    }
    if let Some(tls) = tls_error(err) {
        return ProxyError::UpstreamTls {
            host: host.to_owned(),
            reason: tls.to_string(),
        };
    }
    let is_connect = match err {
        UpstreamError::Plain(e) => e.is_connect(),
        UpstreamError::Tls(e) => e.is_connect(),
    };
    if is_connect {
        return ProxyError::Unavailable {
            host: host.to_owned(),
            reason: "cannot connect".to_owned(),
        };
    }
    ProxyError::UpstreamReset {
        host: host.to_owned(),
    }
}

/// Walks an error's chain, looking inside `io::Error`s too (whose `source()` skips the error
/// they wrap), and returns the first `T` found.
fn find_in_chain<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(found) = find_in_chain::<T>(inner) {
                return Some(found);
            }
        }
        current = e.source();
    }
    None
}

/// Finds the [`DialError`] behind a client error, if the failure was in dialling.
fn dial_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a DialError> {
    find_in_chain::<DialError>(err)
}

/// Finds the TLS failure behind a client error (an untrusted or mismatched certificate, a failed
/// handshake).
fn tls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    find_in_chain::<rustls::Error>(err)
}
