//! What every connection shares: the configuration snapshot (swapped whole on reload, never
//! rebuilt per request), the lifecycle signals (drain, hard stop, the tracker of in-flight work),
//! the interception CA and telemetry; and what one client connection carries ([`ConnCtx`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::keepalive::{IoCounter, LINGER};
use super::minted::TokenCache;
use super::oidc::KeyCache;
use super::upstream::Upstreams;
use crate::config::Config;
use crate::identity::Clients;
use crate::net::{Dialer, Own};
use crate::signing::Signer;
use crate::telemetry::{Masker, Telemetry};
use crate::tls::{self, Interceptor, TlsError};

/// Everything built from one configuration: swapped whole on reload, never rebuilt per request.
pub struct Snapshot {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Resolver + destination safety + dialer.
    pub dialer: Dialer,
    /// Pooled upstream clients (plain http and TLS).
    pub upstreams: Upstreams,
    /// Audit masking for this configuration.
    pub masker: Arc<Masker>,
    /// Client identification for this configuration.
    pub clients: Clients,
    /// Whether any rule restricts paths (else request paths are never judged).
    pub path_rules: bool,
    /// The signing key, when `[signing]` is configured (spec §12).
    pub signer: Option<Arc<Signer>>,
}

/// Building a snapshot's runtime objects failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The upstream TLS settings.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The signing key.
    #[error(transparent)]
    Signing(#[from] crate::signing::SigningError),
}

impl Snapshot {
    /// Builds the runtime objects of `config`.
    pub fn build(config: Config, own: Own) -> Result<Self, BuildError> {
        let dialer = Dialer::new(config.network.clone(), own, config.limits.connect_timeout);
        let upstream_tls = tls::upstream_client_config(&config.tls)?;
        let signer = match &config.signing {
            Some(s) => {
                let (signer, created) = Signer::load_or_create(&s.key, &s.key_id)?;
                if created {
                    tracing::info!(key = %s.key.display(), "generated a new signing key: receivers verify with /signature/jwks.json");
                }
                Some(Arc::new(signer))
            }
            None => None,
        };
        Ok(Self {
            signer,
            masker: Arc::new(Masker::new(&config)),
            clients: Clients::new(&config),
            path_rules: config.rules.iter().any(|r| r.paths.is_some()),
            upstreams: Upstreams::new(&dialer, upstream_tls),
            dialer,
            config: Arc::new(config),
        })
    }

    /// Exports at 0 the metric series named by this configuration (minted credentials, OIDC
    /// issuers).
    fn export_at_zero(&self, metrics: &crate::telemetry::Metrics) {
        let issuers = self.clients.oidc_issuers();
        let issuers: Vec<&str> = issuers.iter().map(|i| &**i).collect();
        metrics.export_configured_at_zero(self.config.minted.keys().map(String::as_str), &issuers);
    }
}

/// Process-wide state shared by every connection.
pub struct State {
    snapshot: ArcSwap<Snapshot>,
    /// The proxy's own listeners (never a destination) and sockets (never a client).
    pub own: Own,
    /// Connections, tunnels and their requests: awaited on shutdown.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown begins: `/readyz` answers 503, new requests get 503, and
    /// connections finish their current request, then close.
    pub drain: CancellationToken,
    /// Cancelled when the grace period is over: whatever still runs is cut.
    pub hard_stop: CancellationToken,
    /// The interception CA and its certificate cache (kept across reloads).
    pub interceptor: Interceptor,
    /// Audit events and metrics.
    pub telemetry: Arc<Telemetry>,
    /// Minted credentials' tokens (kept across reloads that leave a credential unchanged).
    pub tokens: TokenCache,
    /// OIDC issuers' keys (kept across reloads).
    pub issuer_keys: KeyCache,
    /// The signing public key the admin listener serves (follows the snapshot).
    pub published_key: crate::signing::Published,
    /// The threads client connections are served on.
    pub workers: super::workers::Workers,
    connections: Arc<Semaphore>,
}

impl State {
    /// State serving `snapshot`, admitting at most `max_connections` client connections.
    pub fn new(
        snapshot: Snapshot,
        own: Own,
        interceptor: Interceptor,
        telemetry: Arc<Telemetry>,
        max_connections: usize,
        workers: super::workers::Workers,
    ) -> Self {
        snapshot.export_at_zero(&telemetry.metrics);
        let published_key = crate::signing::Published::default();
        published_key.store(snapshot.signer.as_ref().map(|s| Arc::new(s.published())));
        Self {
            published_key,
            tokens: TokenCache::default(),
            issuer_keys: KeyCache::default(),
            snapshot: ArcSwap::from_pointee(snapshot),
            own,
            tasks: TaskTracker::new(),
            drain: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            interceptor,
            telemetry,
            workers,
            connections: Arc::new(Semaphore::new(max_connections)),
        }
    }

    /// The current configuration snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot: requests that start from now on use `snapshot`.
    pub fn swap(&self, snapshot: Snapshot) {
        snapshot.export_at_zero(&self.telemetry.metrics);
        self.tokens.retain(&snapshot.config.minted);
        // A new key is published at once; the one it replaces stays in the JWKS for the
        // rotation overlap.
        let next = snapshot.signer.as_ref().map(|s| s.published());
        let overlap = snapshot
            .config
            .signing
            .as_ref()
            .map_or(std::time::Duration::ZERO, |s| s.rotation_overlap);
        let published = match (self.published_key.load_full(), next) {
            (Some(current), Some(next)) => Some(current.rotated(next, overlap)),
            (_, next) => next,
        };
        self.published_key.store(published.map(Arc::new));
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// A connection slot, or `None` when `max_connections` are open.
    pub(super) fn connection_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Runs a served connection to its end. Once shutdown begins it keeps serving (responses
    /// then say `Connection: close`) and is closed between requests: as soon as it has been
    /// quiet — no byte from the client, per `counter` — for [`LINGER`], `graceful_shutdown`
    /// (hyper's method of the connection type at hand) closes it if idle, or after the request
    /// in flight. Closing an idle keep-alive connection at once would race a request the client
    /// is sending at that instant. When the grace period is over it is cut, and says so: the
    /// caller cannot tell by looking at the hard stop afterwards, since another thread may cancel
    /// it just after a connection ended on its own.
    pub async fn drive<C, E>(
        &self,
        conn: C,
        counter: &IoCounter,
        graceful_shutdown: impl FnOnce(Pin<&mut C>),
    ) -> Result<Driven, E>
    where
        C: Future<Output = Result<(), E>>,
    {
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => return result.map(|()| Driven::Ended),
            () = self.drain.cancelled() => {}
        }
        let mut seen = counter.read();
        loop {
            tokio::select! {
                result = conn.as_mut() => return result.map(|()| Driven::Ended),
                () = self.hard_stop.cancelled() => return Ok(Driven::Cut),
                () = tokio::time::sleep(LINGER) => {}
            }
            let now = counter.read();
            if now == seen {
                break;
            }
            seen = now;
        }
        graceful_shutdown(conn.as_mut());
        tokio::select! {
            result = conn.as_mut() => result.map(|()| Driven::Ended),
            () = self.hard_stop.cancelled() => Ok(Driven::Cut),
        }
    }
}

/// How a connection run by [`State::drive`] ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driven {
    /// It finished: the client closed it, or it was closed between requests while draining.
    Ended,
    /// The shutdown grace period ended first and it was cut.
    Cut,
}

/// What a request handler knows about its client connection.
#[derive(Clone)]
pub struct ConnCtx {
    /// Shared state.
    pub state: Arc<State>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The connection's slot; a tunnel holds it for as long as it lives.
    _slot: Arc<OwnedSemaphorePermit>,
}

impl ConnCtx {
    /// The context of a connection from `peer` holding `slot`.
    pub(super) fn new(state: Arc<State>, peer: SocketAddr, slot: OwnedSemaphorePermit) -> Self {
        Self {
            state,
            peer,
            _slot: Arc::new(slot),
        }
    }
}
