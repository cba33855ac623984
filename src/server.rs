//! Listeners, connection limits and lifecycle.
//!
//! A request's path starts here: accept → connection slot (503 beyond `max_connections`) →
//! HTTP/1.1 with header-read and keep-alive deadlines ([`crate::keepalive`]) → [`dispatch`] → CONNECT ([`crate::connect`]) or plain
//! forwarding ([`crate::forward`]). Each request takes the configuration snapshot current when it
//! arrives and keeps it to the end, so a reload never changes a request midway.
//!
//! Shutdown (§9): stop accepting, report not-ready, let in-flight requests and tunnels finish for
//! up to `shutdown_grace_seconds`, then cut what is left.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::PROXY_AUTHORIZATION;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::Body;
use crate::config::Config;
use crate::error::{raw_refusal, ProxyError};
use crate::identity::{AuthFailure, Clients, Identity, UNAUTHENTICATED};
use crate::keepalive::{ConnTimer, CountingIo, IoCounter};
use crate::net::Dialer;
use crate::policy::{self, Mode, RequestFacts, Rule};
use crate::telemetry::{
    AuditError, AuditSink, IdGenerator, Kind, Masker, Metrics, Record, Telemetry,
};
use crate::tls::{self, CertificateAuthority, Interceptor, TlsError};
use crate::upstream::{self, HttpClient, HttpsClient};
use crate::{admin, connect, forward, reload};

/// Everything built from one configuration: swapped whole on reload, never rebuilt per request.
pub struct Snapshot {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Resolver + destination safety + dialer.
    pub dialer: Dialer,
    /// Pooled plain-http upstream client.
    pub http: HttpClient,
    /// Pooled TLS upstream client (intercepted requests).
    pub https: HttpsClient,
    /// Audit masking for this configuration.
    pub masker: Arc<Masker>,
    /// Client identification for this configuration.
    pub clients: Clients,
}

impl Snapshot {
    /// Builds the runtime objects of `config`.
    pub fn build(config: Config, own_listeners: Arc<[SocketAddr]>) -> Result<Self, TlsError> {
        let dialer = Dialer::new(
            config.network.clone(),
            own_listeners,
            config.limits.connect_timeout,
        );
        let upstream_tls = tls::upstream_client_config(&config.tls)?;
        Ok(Self {
            masker: Arc::new(Masker::new(&config)),
            clients: Clients::new(&config),
            http: upstream::http_client(dialer.clone()),
            https: upstream::https_client(dialer.clone(), upstream_tls),
            dialer,
            config: Arc::new(config),
        })
    }
}

/// Process-wide state shared by every connection.
pub struct State {
    snapshot: ArcSwap<Snapshot>,
    /// The proxy's own bound listeners (never a destination).
    pub own_listeners: Arc<[SocketAddr]>,
    /// Set once shutdown begins: `/readyz` answers 503 and new requests get 503.
    pub draining: AtomicBool,
    /// Connections and tunnels, awaited on shutdown.
    pub tunnels: TaskTracker,
    /// Cancelled when shutdown begins (connections finish their current request, then close).
    pub drain: CancellationToken,
    /// Cancelled when the grace period is over: whatever still runs is cut.
    pub hard_stop: CancellationToken,
    /// The interception CA and its certificate cache (kept across reloads).
    pub interceptor: Interceptor,
    /// Audit events and metrics.
    pub telemetry: Arc<Telemetry>,
    connections: Arc<Semaphore>,
}

impl State {
    /// The current configuration snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot: requests that start from now on use `snapshot`.
    pub(crate) fn swap(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// What a request handler knows about its connection.
#[derive(Clone)]
pub struct ConnCtx {
    /// Shared state.
    pub state: Arc<State>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The client identity (`anonymous` without `[[clients]]`); set per request, and for a
    /// tunnel by its CONNECT.
    pub client: Arc<str>,
    /// The policy mode for this client.
    pub mode: Mode,
    /// The connection's slot; a tunnel holds it for as long as it lives.
    _slot: Arc<OwnedSemaphorePermit>,
}

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The audit output cannot be opened.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The metrics registry could not be built.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The CA or the upstream TLS configuration could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The supervisor task failed.
    #[error("proxy task failed: {0}")]
    Task(String),
}

/// A running proxy.
pub struct ProxyHandle {
    /// Where the proxy listener is bound.
    pub proxy_addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin_addr: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl ProxyHandle {
    /// Begins graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Reloads the configuration now (what SIGHUP does, without reopening the audit output).
    pub fn reload(&self) -> Result<(), crate::reload::ReloadError> {
        self.state.reload()
    }

    /// Shared state (tests and the admin listener read it).
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Waits until the proxy has stopped.
    pub async fn wait(self) -> Result<(), ServerError> {
        self.task
            .await
            .map_err(|e| ServerError::Task(e.to_string()))
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Binds both listeners and starts serving `config`.
pub async fn start(config: Config) -> Result<ProxyHandle, ServerError> {
    let proxy_listener = bind(config.listen.proxy).await?;
    let admin_listener = bind(config.listen.admin).await?;
    let proxy_addr = proxy_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: config.listen.proxy,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: config.listen.admin,
            source,
        })?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let (ca, created) =
        CertificateAuthority::load_or_create(&config.tls.ca_cert, &config.tls.ca_key)?;
    if created {
        tracing::info!(
            cert = %config.tls.ca_cert.display(),
            key = %config.tls.ca_key.display(),
            "generated a new interception CA: clients must trust this certificate"
        );
    }
    let own: Arc<[SocketAddr]> = Arc::from(vec![proxy_addr, admin_addr]);
    let max_connections = config.limits.max_connections;
    let grace = config.limits.shutdown_grace;
    let metrics = Metrics::new()?;
    let audit = AuditSink::start(&config.audit.output, metrics.audit_dropped.clone())?;
    let snapshot = Snapshot::build(config, own.clone())?;
    let state = Arc::new(State {
        snapshot: ArcSwap::from_pointee(snapshot),
        interceptor: Interceptor::new(ca, metrics.certificates_issued.clone()),
        telemetry: Arc::new(Telemetry {
            audit,
            metrics,
            ids: IdGenerator::new(),
        }),
        own_listeners: own,
        draining: AtomicBool::new(false),
        tunnels: TaskTracker::new(),
        drain: CancellationToken::new(),
        hard_stop: CancellationToken::new(),
        connections: Arc::new(Semaphore::new(max_connections)),
    });
    tracing::info!(%proxy_addr, %admin_addr, "portcullis listening");

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(supervise(
        state.clone(),
        proxy_listener,
        admin_listener,
        shutdown.clone(),
        grace,
    ));
    Ok(ProxyHandle {
        proxy_addr,
        admin_addr,
        state,
        shutdown,
        task,
    })
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP reopens the audit output
/// and reloads the configuration.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let handle = start(config).await?;
    let hangups = tokio::spawn(on_hangup(handle.state.clone()));
    wait_for_stop_signal().await;
    hangups.abort();
    tracing::info!("shutdown requested: draining");
    handle.shutdown();
    handle.wait().await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(unix)]
async fn on_hangup(state: Arc<State>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reload by editing the config file instead");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reopening the audit output and reloading");
        let state = state.clone();
        let _ = tokio::task::spawn_blocking(move || state.hangup()).await;
    }
}

#[cfg(not(unix))]
async fn on_hangup(_state: Arc<State>) {}

#[cfg(unix)]
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_stop_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn supervise(
    state: Arc<State>,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let admin_task = tokio::spawn(admin::serve(state.clone(), admin, state.hard_stop.clone()));
    let watcher = tokio::spawn(reload::watch(state.clone()));
    tokio::select! {
        () = accept_loop(&state, &proxy) => {}
        () = shutdown.cancelled() => {}
    }
    // Stop accepting (the listener closes), report not-ready, and ask every connection to
    // finish its current request.
    drop(proxy);
    state.draining.store(true, Ordering::Relaxed);
    state.drain.cancel();
    state.tunnels.close();
    let open = state.tunnels.len();
    if open > 0 {
        tracing::info!(
            open,
            grace_seconds = grace.as_secs(),
            "waiting for in-flight work"
        );
    }
    if tokio::time::timeout(grace, state.tunnels.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = state.tunnels.len(),
            "grace period over: closing remaining connections and tunnels"
        );
    }
    state.hard_stop.cancel();
    state.tunnels.wait().await;
    let _ = admin_task.await;
    let _ = watcher.await;
    // Every request and tunnel has ended: write out the last audit events.
    let telemetry = state.telemetry.clone();
    let _ = tokio::task::spawn_blocking(move || telemetry.audit.close()).await;
}

async fn accept_loop(state: &Arc<State>, listener: &TcpListener) {
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
        let Ok(slot) = state.connections.clone().try_acquire_owned() else {
            // No request was read, so there is no audit event; the refusal is counted.
            let err = ProxyError::Overloaded;
            state
                .telemetry
                .metrics
                .denials
                .with_label_values(&[err.reason_code()])
                .inc();
            tokio::spawn(refuse(stream, err));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let active = Gauged::new(&state.telemetry.metrics.active_connections);
        let ctx = ConnCtx {
            state: state.clone(),
            peer,
            client: Arc::from(UNAUTHENTICATED),
            mode: Mode::Enforce,
            _slot: Arc::new(slot),
        };
        state.tunnels.spawn(async move {
            serve_connection(ctx, stream).await;
            drop(active);
        });
    }
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

async fn serve_connection(ctx: ConnCtx, stream: TcpStream) {
    let state = ctx.state.clone();
    let limits = state.snapshot().config.limits.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(dispatch(&ctx, req).await) }
    });
    let counter = Arc::new(IoCounter::default());
    let io = TokioIo::new(CountingIo::new(stream, counter.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(ConnTimer::new(counter, limits.idle_timeout))
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(256)
        .keep_alive(true)
        .serve_connection(io, service)
        .with_upgrades();
    let result = drive(conn, &state, |c| c.graceful_shutdown()).await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

impl ConnCtx {
    /// This context for a request made by `identity`.
    fn as_identity(&self, identity: Identity) -> Self {
        Self {
            client: identity.name,
            mode: identity.mode,
            ..self.clone()
        }
    }

    /// Applies policy to `facts` in this client's mode. A denial in report mode lets the
    /// request through with no rule (so no credential), audited as `would_deny`.
    pub fn judge<'s>(
        &self,
        snap: &'s Snapshot,
        facts: &RequestFacts<'_>,
        record: &mut Record,
    ) -> Result<Option<&'s Rule>, ProxyError> {
        match policy::decide(&snap.config.rules, facts) {
            Ok(rule) => {
                record.rule(rule);
                Ok(Some(rule))
            }
            Err(denial) if self.mode == Mode::Report => {
                tracing::debug!(client = %self.client, %denial, "would deny (report mode)");
                record.would_deny(&self.state.telemetry, denial.to_string(), denial.code());
                Ok(None)
            }
            Err(denial) => Err(ProxyError::Denied(denial)),
        }
    }
}

/// Runs a served connection to its end; once shutdown begins it finishes its current request
/// and closes, and when the grace period is over it is cut.
/// (`graceful_shutdown` is hyper's method of the connection type at hand.)
pub async fn drive<C, E>(
    conn: C,
    state: &State,
    graceful_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = state.drain.cancelled() => {
            graceful_shutdown(conn.as_mut());
            tokio::select! {
                result = conn.as_mut() => result,
                () = state.hard_stop.cancelled() => Ok(()),
            }
        }
    }
}

/// Routes one request from the proxy listener. Each request takes the snapshot current now and
/// is identified on its own (a CONNECT's identity then holds for its whole tunnel).
async fn dispatch(ctx: &ConnCtx, req: Request<Incoming>) -> Response<Body> {
    let snap = ctx.state.snapshot();
    let telemetry = &ctx.state.telemetry;
    let identity = snap
        .clients
        .identify(req.headers().get(PROXY_AUTHORIZATION), ctx.peer.ip());
    let ctx = match identity {
        Ok(identity) => ctx.as_identity(identity),
        Err(failure) => return refuse_unidentified(ctx, &snap, req, &failure),
    };
    let ctx = &ctx;
    if req.method() == Method::CONNECT {
        return connect::handle(ctx, &snap, req).await;
    }
    let mut record = Record::new(
        telemetry,
        snap.masker.clone(),
        Kind::Request,
        &ctx.client,
        ctx.peer,
        req.method(),
    );
    let response = if ctx.state.is_draining() {
        record.fail(telemetry, &ProxyError::Draining);
        ProxyError::Draining.to_response()
    } else {
        forward::handle(ctx, &snap, req, &mut record).await
    };
    telemetry.finish_response(record, response)
}

/// 407 for a request that did not identify itself: audited (client `unauthenticated`) and
/// counted per claimed client. Report mode never relaxes this.
fn refuse_unidentified(
    ctx: &ConnCtx,
    snap: &Snapshot,
    req: Request<Incoming>,
    failure: &AuthFailure,
) -> Response<Body> {
    let telemetry = &ctx.state.telemetry;
    let kind = if req.method() == Method::CONNECT {
        Kind::Tunnel
    } else {
        Kind::Request
    };
    let mut record = Record::new(
        telemetry,
        snap.masker.clone(),
        kind,
        &Arc::from(UNAUTHENTICATED),
        ctx.peer,
        req.method(),
    );
    if let Some(authority) = req.uri().authority() {
        let scheme = (kind == Kind::Request).then_some("http");
        let uri = (kind == Kind::Request).then_some(req.uri());
        record.target(
            scheme,
            authority.host(),
            authority.port_u16().unwrap_or(80),
            uri,
        );
    }
    telemetry
        .metrics
        .auth_failures
        .with_label_values(&[failure.label()])
        .inc();
    tracing::info!(peer = %ctx.peer, claimed = failure.label(), "{failure}");
    let err = ProxyError::ProxyAuthRequired(failure.to_string());
    record.fail(telemetry, &err);
    telemetry.finish_response(record, err.to_response())
}

/// Holds a gauge one higher for as long as it lives.
pub struct Gauged(prometheus::IntGauge);

impl Gauged {
    /// Increments `gauge` until dropped.
    pub fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        self.0.dec();
    }
}
