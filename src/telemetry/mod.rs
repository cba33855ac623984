//! Telemetry: audit events (spec §7) and Prometheus metrics (spec §8), what every finished
//! request or tunnel reports to.
//!
//! - [`event`](Event): the audit event, its JSON line in schema order, event ids;
//! - [`mask`](Masker): which header values and query parameters are hidden, and the secret values
//!   scrubbed from every line;
//! - [`sink`](AuditSink): the bounded queue and the writer thread, off the request path (a full
//!   queue drops and counts, never stalls traffic);
//! - [`record`](Record): a record filled along a request's path, finished when the response body
//!   ends or the tunnel closes;
//! - [`metrics`](Metrics): the registry, its families, and cached per-(client, rule) handles.
//!
//! Masking happens twice: header and query values by name while the event is serialized, then
//! the writer replaces any resolved secret value found anywhere in the line.
//!
//! Callers use the flat re-exports below (`crate::telemetry::Record`), never the submodules.

mod event;
mod json;
mod mask;
mod metrics;
mod record;
mod sink;

pub use event::{Decision, Event, EventLine, IdGenerator, Kind};
use std::sync::Arc;

pub use mask::{Masker, HIDDEN, MASKED_HEADERS, MASKED_QUERY_PARAMS};
pub use metrics::{
    method_label, Gauged, Metrics, EXPORTED, OIDC_RESULTS, REFRESH_RESULTS, RELOAD_FAILURE,
    RELOAD_SUCCESS,
};
pub use record::{BodyProgress, Counted, Record};
pub use sink::{AuditError, AuditSink};

/// The audit sink and the metrics: what a finished request or tunnel reports to.
#[derive(Debug)]
pub struct Telemetry {
    /// The audit queue.
    pub audit: AuditSink,
    /// The metrics.
    pub metrics: Metrics,
    /// Event ids.
    pub ids: IdGenerator,
    /// Minted tokens still valid (or recently so): scrubbed from every audit event.
    pub live_secrets: LiveSecrets,
}

/// How long after its expiry a minted token is still scrubbed from audit events.
const SCRUB_AFTER_EXPIRY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Secrets only known at runtime that no snapshot's masker holds — minted tokens — kept while
/// they are valid (and an hour after), so that every audit event is scrubbed of every one of
/// them, not only the event of the request that carried it: a token minted by a background
/// refresh can show up in another request's query before that request's own token is replaced.
#[derive(Default)]
pub struct LiveSecrets {
    list: arc_swap::ArcSwap<Vec<(Arc<crate::credentials::Echoes>, std::time::Instant)>>,
    writing: std::sync::Mutex<()>,
}

impl std::fmt::Debug for LiveSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSecrets")
            .field("count", &self.list.load().len())
            .finish()
    }
}

impl LiveSecrets {
    /// Remembers a secret valid until `expires`; forgets those an hour past theirs.
    pub fn remember(&self, secret: Arc<crate::credentials::Echoes>, expires: std::time::Instant) {
        let _writing = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        let mut list: Vec<_> = self
            .list
            .load()
            .iter()
            .filter(|(_, until)| *until + SCRUB_AFTER_EXPIRY > now)
            .cloned()
            .collect();
        list.push((secret, expires));
        self.list.store(Arc::new(list));
    }

    /// Every secret remembered now.
    pub fn current(&self) -> Arc<Vec<(Arc<crate::credentials::Echoes>, std::time::Instant)>> {
        self.list.load_full()
    }
}
