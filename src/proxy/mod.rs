//! The proxy: listeners, lifecycle, and the one request path.
//!
//! A request's path through the code, top to bottom: [`listener`] (accept, connection limit,
//! HTTP/1.1 deadlines) → [`dispatch`] (client identity, then CONNECT or not) → [`connect`]
//! ([`tunnel`] | [`intercept`]) or the one request pipeline [`request`] (policy → credentials →
//! [`upstream`]) → [`outcome`] (the one rescue point: audit + metrics). [`state`] holds what every
//! connection shares; [`reload`] swaps its configuration snapshot.
//!
//! Shutdown (§9): stop accepting, report not-ready, let in-flight requests and tunnels finish for
//! up to `shutdown_grace_seconds`, then cut what is left.

mod client_body;
mod connect;
mod dispatch;
mod headers;
mod intercept;
pub mod keepalive;
mod listener;
pub mod minted;
mod oidc;
mod outcome;
mod pool;
pub mod reload;
mod request;
pub mod state;
mod transparent;
mod tunnel;
pub mod upstream;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use headers::VIA_TOKEN;
pub use reload::{ReloadError, Reloader};
pub use state::{Snapshot, State};

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::net::Own;
use crate::telemetry::{AuditError, AuditSink, IdGenerator, Metrics, Telemetry};
use crate::tls::{CertificateAuthority, Interceptor, TlsError};

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
    /// The serving threads could not be started.
    #[error("cannot start serving threads: {0}")]
    Workers(std::io::Error),
    /// The signing key could not be loaded or generated.
    #[error(transparent)]
    Signing(#[from] crate::signing::SigningError),
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
    /// Where the transparent listener is bound, when enabled (spec §11).
    pub transparent_addr: Option<SocketAddr>,
    state: Arc<State>,
    reloader: Arc<Reloader>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl ProxyHandle {
    /// Begins graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Reloads the configuration now (what SIGHUP does, without reopening the audit output).
    /// Blocking.
    pub fn reload(&self) -> Result<(), ReloadError> {
        self.reloader.reload()
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
    let transparent_listener = match config.listen.transparent {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let transparent_addr = match (&transparent_listener, config.listen.transparent) {
        (Some(listener), Some(addr)) => Some(
            listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?,
        ),
        _ => None,
    };
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
    let own = Own::new(
        [proxy_addr, admin_addr]
            .into_iter()
            .chain(transparent_addr)
            .collect(),
    );
    let max_connections = config.limits.max_connections;
    let grace = config.limits.shutdown_grace;
    let metrics = Metrics::new()?;
    let audit = AuditSink::start(
        &config.audit.output,
        metrics.audit_dropped.clone(),
        metrics.audit_write_errors.clone(),
    )?;
    let snapshot = Snapshot::build(config, own.clone()).map_err(|e| match e {
        state::BuildError::Tls(e) => ServerError::Tls(e),
        state::BuildError::Signing(e) => ServerError::Signing(e),
    })?;
    let telemetry = Arc::new(Telemetry {
        audit,
        metrics: metrics.clone(),
        ids: IdGenerator::new(),
        live_secrets: Default::default(),
    });
    let interceptor = Interceptor::new(ca, metrics.certificates_issued.clone());
    let ca_pem = interceptor.ca().cert_pem().into();
    let state = Arc::new(State::new(
        snapshot,
        own,
        interceptor,
        telemetry,
        max_connections,
        workers::Workers::start().map_err(ServerError::Workers)?,
    ));
    let admin = Admin {
        metrics,
        ca_pem,
        draining: state.drain.clone(),
        signing: state.published_key.clone(),
    };
    let reloader = Arc::new(Reloader::new(state.clone()));
    match transparent_addr {
        Some(transparent_addr) => {
            tracing::info!(%proxy_addr, %admin_addr, %transparent_addr, "portcullis listening")
        }
        None => tracing::info!(%proxy_addr, %admin_addr, "portcullis listening"),
    }

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(supervise(
        state.clone(),
        reloader.clone(),
        Listeners {
            proxy: proxy_listener,
            admin: admin_listener,
            transparent: transparent_listener,
            admin_view: admin,
        },
        shutdown.clone(),
        grace,
    ));
    Ok(ProxyHandle {
        proxy_addr,
        admin_addr,
        transparent_addr,
        state,
        reloader,
        shutdown,
        task,
    })
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP reopens the audit output
/// and reloads the configuration.
pub async fn run(config: Config) -> Result<(), ServerError> {
    // The handlers are installed before the listeners are bound: a signal that arrives as soon
    // as the proxy accepts must drain or reload it, not kill it (the default action).
    let stop = stop_signal();
    let hangup = hangup_signal();
    let handle = start(config).await?;
    let hangups = tokio::spawn(on_hangup(hangup, handle.reloader.clone()));
    stop.await;
    hangups.abort();
    tracing::info!("shutdown requested: draining");
    handle.shutdown();
    handle.wait().await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(unix)]
type Hangup = std::io::Result<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

/// SIGHUP's handler, installed now.
#[cfg(unix)]
fn hangup_signal() -> Hangup {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup())
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {}

#[cfg(unix)]
async fn on_hangup(hangup: Hangup, reloader: Arc<Reloader>) {
    let Ok(mut hup) = hangup else {
        tracing::warn!("cannot listen for SIGHUP: reload by editing the config file instead");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reopening the audit output and reloading");
        let reloader = reloader.clone();
        let _ = tokio::task::spawn_blocking(move || reloader.hangup()).await;
    }
}

#[cfg(not(unix))]
async fn on_hangup(_hangup: Hangup, _reloader: Arc<Reloader>) {}

/// SIGTERM's and SIGINT's handlers, installed now; the future ends at the first of them.
#[cfg(unix)]
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match signals {
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
}

#[cfg(not(unix))]
fn stop_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The bound listeners, and what the admin listener shows.
struct Listeners {
    proxy: TcpListener,
    admin: TcpListener,
    transparent: Option<TcpListener>,
    admin_view: Admin,
}

async fn supervise(
    state: Arc<State>,
    reloader: Arc<Reloader>,
    listeners: Listeners,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let Listeners {
        proxy,
        admin,
        transparent,
        admin_view,
    } = listeners;
    let admin_task = tokio::spawn(admin::serve(admin_view, admin, state.hard_stop.clone()));
    let watcher = tokio::spawn(reloader.watch());
    let redirected = async {
        match &transparent {
            Some(l) => listener::accept_loop(&state, l, transparent::serve).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = listener::accept_loop(&state, &proxy, listener::serve_connection) => {}
        () = redirected => {}
        () = shutdown.cancelled() => {}
    }
    // Stop accepting (the listeners close), report not-ready, and ask every connection to
    // finish its current request.
    drop(proxy);
    drop(transparent);
    state.drain.cancel();
    state.tasks.close();
    let open = state.tasks.len();
    if open > 0 {
        tracing::info!(
            open,
            grace_seconds = grace.as_secs(),
            "waiting for in-flight work"
        );
    }
    if tokio::time::timeout(grace, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = state.tasks.len(),
            "grace period over: closing remaining connections and tunnels"
        );
    }
    state.hard_stop.cancel();
    state.tasks.wait().await;
    state.workers.stop();
    let _ = admin_task.await;
    let _ = watcher.await;
    // Every request and tunnel has ended: write out the last audit events.
    let telemetry = state.telemetry.clone();
    let _ = tokio::task::spawn_blocking(move || telemetry.audit.close()).await;
}
