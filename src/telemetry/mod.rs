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
mod mask;
mod metrics;
mod record;
mod sink;

pub use event::{Decision, Event, EventLine, IdGenerator, Kind};
pub use mask::{MaskedHeaders, Masker, HIDDEN, MASKED_HEADERS, MASKED_QUERY_PARAMS};
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
}
