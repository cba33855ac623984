//! Prometheus metrics (spec §8) on the proxy's own registry, rendered by the admin listener, and
//! the per-(client, rule) handle cache that counts finished requests and tunnels.
//!
//! Every label is bounded: `rule` is a configured host pattern or `none`, `client` a configured
//! client, `anonymous` or `unauthenticated`, `method` a standard method or `OTHER`, `reason` and
//! `kind` fixed sets. Nothing here ever takes a host name, path or header from a request.
//!
//! Counters whose labels are known before any traffic (reload results, denial reasons, upstream
//! error kinds) are exported at 0 from the start (spec §8): Prometheus' `increase()` needs a
//! sample before the first event, or an alert on that event never fires. Series keyed by client
//! and rule still appear with their first event.

// foldhash (seeded per process) rather than SipHash: these maps are looked up several times per
// request with keys policy already admitted, and SipHash cost more than the counting itself.
use foldhash::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use http::{Method, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::{DENIAL_REASONS, UPSTREAM_KINDS};
use crate::telemetry::event::Decision;

/// Every metric family the proxy exports (histograms also as `_bucket`, `_sum`, `_count`), besides
/// the process collector's `process_*` families. Dashboards and alert rules may use only these.
pub const EXPORTED: [&str; 19] = [
    "portcullis_requests_total",
    "portcullis_request_duration_seconds",
    "portcullis_tunnels_total",
    "portcullis_tunnel_bytes_total",
    "portcullis_active_connections",
    "portcullis_active_tunnels",
    "portcullis_credential_injections_total",
    "portcullis_denials_total",
    "portcullis_upstream_errors_total",
    "portcullis_certificates_issued_total",
    "portcullis_config_reloads_total",
    "portcullis_build_info",
    "portcullis_audit_events_dropped_total",
    "portcullis_audit_write_errors_total",
    "portcullis_proxy_auth_failures_total",
    "portcullis_certificate_errors_total",
    "portcullis_credential_refreshes_total",
    "portcullis_credential_expiry_timestamp_seconds",
    "portcullis_oidc_verifications_total",
];

/// The `result` labels of `portcullis_oidc_verifications_total` (spec §8).
pub const OIDC_RESULTS: [&str; 7] = [
    "ok",
    "expired",
    "signature",
    "audience",
    "issuer",
    "no_client",
    "malformed",
];

/// The `result` labels of `portcullis_credential_refreshes_total`.
pub const REFRESH_RESULTS: [&str; 2] = ["success", "failure"];

/// The `result` label of `portcullis_config_reloads_total` for a reload that took effect.
pub const RELOAD_SUCCESS: &str = "success";
/// The `result` label of `portcullis_config_reloads_total` for a rejected reload.
pub const RELOAD_FAILURE: &str = "failure";

/// Latency buckets for a proxy: sub-millisecond to 30 s.
const DURATION_BUCKETS: [f64; 16] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// The `direction` label of `portcullis_tunnel_bytes_total`, in [`RuleHandles::tunnel_bytes`]
/// order.
const DIRECTIONS: [&str; 2] = ["upstream", "downstream"];

/// Every metric the proxy exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `portcullis_requests_total{client, rule, decision, method, code}`
    pub requests: IntCounterVec,
    /// `portcullis_request_duration_seconds{client, rule}`
    pub request_duration: HistogramVec,
    /// `portcullis_tunnels_total{client, rule, decision}`
    pub tunnels: IntCounterVec,
    /// `portcullis_tunnel_bytes_total{client, rule, direction}`
    pub tunnel_bytes: IntCounterVec,
    /// `portcullis_active_connections`
    pub active_connections: IntGauge,
    /// `portcullis_active_tunnels`
    pub active_tunnels: IntGauge,
    /// `portcullis_credential_injections_total{credential}`
    pub credential_injections: IntCounterVec,
    /// `portcullis_credential_refreshes_total{credential, result}`: mints of minted credentials.
    pub credential_refreshes: IntCounterVec,
    /// `portcullis_credential_expiry_timestamp_seconds{credential}`: when the cached token expires.
    pub credential_expiry: IntGaugeVec,
    /// `portcullis_denials_total{reason}`: refused requests, tunnels and connections (never a
    /// report-mode would-be denial, which is let through; it shows as `decision="would_deny"`).
    pub denials: IntCounterVec,
    /// `portcullis_upstream_errors_total{kind}`
    pub upstream_errors: IntCounterVec,
    /// `portcullis_certificates_issued_total`
    pub certificates_issued: IntCounter,
    /// `portcullis_certificate_errors_total`: interception certificates that could not be minted.
    pub certificate_errors: IntCounter,
    /// `portcullis_config_reloads_total{result}`
    pub config_reloads: IntCounterVec,
    /// `portcullis_audit_events_dropped_total`: events lost because the audit queue was full.
    pub audit_dropped: IntCounter,
    /// `portcullis_audit_write_errors_total`: writes to the audit output that failed.
    pub audit_write_errors: IntCounter,
    /// `portcullis_proxy_auth_failures_total{client}`: wrong or missing proxy credentials.
    pub auth_failures: IntCounterVec,
    /// `portcullis_oidc_verifications_total{issuer, result}`: OIDC tokens verified (a token
    /// remembered from an earlier verification is not counted again).
    pub oidc_verifications: IntCounterVec,
    /// Handles per client, then per rule label. Shared by clones: they count into the same
    /// registry. Bounded like the labels (configured names, `none`, `anonymous`,
    /// `unauthenticated`); names dropped by a reload stay, as their series do.
    by_rule: Arc<RwLock<HandleCache>>,
}

/// Client label → rule label → handles: nested so that a lookup borrows the labels (`&str`)
/// instead of building a key.
type HandleCache = HashMap<Arc<str>, HashMap<Arc<str>, Arc<RuleHandles>>>;

/// The series of one (client, rule) pair, each resolved from its vector on first use.
///
/// `with_label_values` hashes every label and takes the vector's lock; a finished request would
/// pay that for each of its series. Resolving lazily keeps `/metrics` as it was: a series appears
/// with its first event, never at 0 beforehand (a tunnel-only pair has no duration histogram).
#[derive(Default)]
struct RuleHandles {
    /// `portcullis_request_duration_seconds`.
    duration: OnceLock<Histogram>,
    /// `portcullis_tunnels_total`, by [`decision_index`].
    tunnels: [OnceLock<IntCounter>; 3],
    /// `portcullis_tunnel_bytes_total`, by [`DIRECTIONS`].
    tunnel_bytes: [OnceLock<IntCounter>; 2],
    /// `portcullis_requests_total` by decision, method label and status code: a handful per pair.
    requests: RwLock<HashMap<(Decision, &'static str, u16), IntCounter>>,
}

fn decision_index(decision: Decision) -> usize {
    match decision {
        Decision::Allow => 0,
        Decision::Deny => 1,
        Decision::WouldDeny => 2,
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric, the process collector and `portcullis_build_info`.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_request_duration_seconds",
                "Time from request head to the end of the response body.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["client", "rule"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new("portcullis_build_info", "Build information; always 1."),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let metrics = Self {
            requests: counter_vec(
                "portcullis_requests_total",
                "Requests (plain and intercepted), by outcome.",
                &["client", "rule", "decision", "method", "code"],
            )?,
            request_duration,
            tunnels: counter_vec(
                "portcullis_tunnels_total",
                "CONNECT tunnels, by decision.",
                &["client", "rule", "decision"],
            )?,
            tunnel_bytes: counter_vec(
                "portcullis_tunnel_bytes_total",
                "Bytes relayed through tunnels.",
                &["client", "rule", "direction"],
            )?,
            active_connections: gauge("portcullis_active_connections", "Open client connections.")?,
            active_tunnels: gauge("portcullis_active_tunnels", "Open CONNECT tunnels.")?,
            credential_injections: counter_vec(
                "portcullis_credential_injections_total",
                "Credentials injected into requests.",
                &["credential"],
            )?,
            denials: counter_vec(
                "portcullis_denials_total",
                "Refused requests and tunnels, by reason.",
                &["reason"],
            )?,
            upstream_errors: counter_vec(
                "portcullis_upstream_errors_total",
                "Failures reaching upstreams, by kind.",
                &["kind"],
            )?,
            certificates_issued: counter(
                "portcullis_certificates_issued_total",
                "Interception certificates minted.",
            )?,
            certificate_errors: counter(
                "portcullis_certificate_errors_total",
                "Interception certificates that could not be minted.",
            )?,
            config_reloads: counter_vec(
                "portcullis_config_reloads_total",
                "Configuration reloads, by result.",
                &["result"],
            )?,
            audit_dropped: counter(
                "portcullis_audit_events_dropped_total",
                "Audit events dropped because the audit queue was full.",
            )?,
            audit_write_errors: counter(
                "portcullis_audit_write_errors_total",
                "Writes to the audit output that failed (disk full, closed pipe); the events in them are lost.",
            )?,
            credential_refreshes: counter_vec(
                "portcullis_credential_refreshes_total",
                "Attempts to mint a minted credential's token, by result.",
                &["credential", "result"],
            )?,
            credential_expiry: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "portcullis_credential_expiry_timestamp_seconds",
                        "Unix time the cached token of a minted credential expires.",
                    ),
                    &["credential"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            auth_failures: counter_vec(
                "portcullis_proxy_auth_failures_total",
                "Requests with missing or wrong proxy credentials.",
                &["client"],
            )?,
            oidc_verifications: counter_vec(
                "portcullis_oidc_verifications_total",
                "OIDC client tokens verified, by configured issuer and result.",
                &["issuer", "result"],
            )?,
            by_rule: Arc::default(),
            registry,
        };
        metrics.export_known_labels_at_zero();
        Ok(metrics)
    }

    /// Creates, at 0, every series whose labels are known before any traffic, so the first event
    /// is an increase Prometheus can see (a series born at 1 has no earlier sample to compare).
    fn export_known_labels_at_zero(&self) {
        for result in [RELOAD_SUCCESS, RELOAD_FAILURE] {
            self.config_reloads.with_label_values(&[result]);
        }
        for reason in DENIAL_REASONS {
            self.denials.with_label_values(&[reason]);
        }
        for kind in UPSTREAM_KINDS {
            self.upstream_errors.with_label_values(&[kind]);
        }
        // `portcullis_credential_refreshes_total` and `portcullis_oidc_verifications_total` take
        // their first label from the configuration: see [`Metrics::export_configured_at_zero`],
        // called for every snapshot.
    }

    /// Creates, at 0, the series of configured names: every result of each minted credential
    /// (`portcullis_credential_refreshes_total`) and of each OIDC issuer, and of tokens naming
    /// no configured issuer (`portcullis_oidc_verifications_total`, when any issuer is).
    pub fn export_configured_at_zero<'a>(
        &self,
        credentials: impl IntoIterator<Item = &'a str>,
        issuers: &[&str],
    ) {
        self.export_credentials_at_zero(credentials);
        let unconfigured = (!issuers.is_empty()).then_some("unconfigured");
        for issuer in issuers.iter().copied().chain(unconfigured) {
            for result in OIDC_RESULTS {
                self.oidc_verifications.with_label_values(&[issuer, result]);
            }
        }
    }

    /// Creates, at 0, `portcullis_credential_refreshes_total` for every result of each of
    /// `credentials` (the minted credentials of a snapshot being put in service).
    fn export_credentials_at_zero<'a>(&self, credentials: impl IntoIterator<Item = &'a str>) {
        for name in credentials {
            for result in REFRESH_RESULTS {
                self.credential_refreshes.with_label_values(&[name, result]);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The duration histogram for one client and rule.
    pub fn duration(&self, client: &str, rule: &str) -> Histogram {
        self.request_duration.with_label_values(&[client, rule])
    }

    /// Counts a finished request in `portcullis_requests_total` and observes its duration, through
    /// the handles cached for (`client`, `rule`).
    pub fn observe_request(
        &self,
        client: &Arc<str>,
        rule: &Arc<str>,
        decision: Decision,
        method: &Method,
        code: StatusCode,
        seconds: f64,
    ) {
        let handles = self.rule_handles(client, rule);
        let method = method_label(method);
        let key = (decision, method, code.as_u16());
        // Counted under the read lock (an atomic add): no clone of the handle.
        let counted = read(&handles.requests).get(&key).map(IntCounter::inc);
        if counted.is_none() {
            write(&handles.requests)
                .entry(key)
                .or_insert_with(|| {
                    self.requests.with_label_values(&[
                        &**client,
                        &**rule,
                        decision.as_str(),
                        method,
                        code.as_str(),
                    ])
                })
                .inc();
        }
        handles
            .duration
            .get_or_init(|| self.duration(client, rule))
            .observe(seconds);
    }

    /// Counts a finished tunnel in `portcullis_tunnels_total`, and its bytes in
    /// `portcullis_tunnel_bytes_total` for each direction that carried any.
    pub fn observe_tunnel(
        &self,
        client: &Arc<str>,
        rule: &Arc<str>,
        decision: Decision,
        upstream: u64,
        downstream: u64,
    ) {
        let handles = self.rule_handles(client, rule);
        handles.tunnels[decision_index(decision)]
            .get_or_init(|| {
                self.tunnels
                    .with_label_values(&[&**client, &**rule, decision.as_str()])
            })
            .inc();
        for ((direction, counter), bytes) in DIRECTIONS
            .iter()
            .zip(&handles.tunnel_bytes)
            .zip([upstream, downstream])
        {
            // Only directions that moved bytes: an idle direction has no series, as before.
            if bytes > 0 {
                counter
                    .get_or_init(|| {
                        self.tunnel_bytes
                            .with_label_values(&[&**client, &**rule, direction])
                    })
                    .inc_by(bytes);
            }
        }
    }

    /// The handles of (`client`, `rule`), created empty on first use. The read lock is held for
    /// two lookups only; the write lock only the first time a pair is seen.
    fn rule_handles(&self, client: &Arc<str>, rule: &Arc<str>) -> Arc<RuleHandles> {
        let found = read(&self.by_rule)
            .get(&**client)
            .and_then(|rules| rules.get(&**rule))
            .cloned();
        found.unwrap_or_else(|| {
            write(&self.by_rule)
                .entry(client.clone())
                .or_default()
                .entry(rule.clone())
                .or_default()
                .clone()
        })
    }
}

// A panic while a cache lock is held leaves the map consistent (inserts are single calls), so a
// poisoned lock is used as it is rather than propagating the panic to every request.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// A bounded method label: the standard methods by name, anything else `OTHER`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(
            method_label(&Method::from_bytes(b"PROPFIND").unwrap()),
            "OTHER"
        );
    }

    #[test]
    fn renders_every_spec_metric() {
        let m = Metrics::new().unwrap();
        m.requests
            .with_label_values(&["anonymous", "none", "deny", "GET", "403"])
            .inc();
        m.tunnels
            .with_label_values(&["anonymous", "none", "deny"])
            .inc();
        m.tunnel_bytes
            .with_label_values(&["anonymous", "none", "upstream"])
            .inc();
        m.request_duration
            .with_label_values(&["anonymous", "none"])
            .observe(0.01);
        m.credential_injections.with_label_values(&["gh"]).inc();
        m.denials.with_label_values(&["no_rule"]).inc();
        m.upstream_errors.with_label_values(&["dns"]).inc();
        m.config_reloads.with_label_values(&["success"]).inc();
        m.auth_failures.with_label_values(&["unknown"]).inc();
        m.export_configured_at_zero(["api"], &["https://issuer.example"]);
        m.credential_expiry.with_label_values(&["api"]).set(1);
        let text = m.render();
        assert!(text.contains(
            "portcullis_credential_refreshes_total{credential=\"api\",result=\"failure\"} 0"
        ));
        for issuer in ["https://issuer.example", "unconfigured"] {
            assert!(text.contains(&format!(
                "portcullis_oidc_verifications_total{{issuer=\"{issuer}\",result=\"no_client\"}} 0"
            )));
        }
        for name in EXPORTED {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        let families = text
            .lines()
            .filter(|l| l.starts_with("# TYPE portcullis_"))
            .count();
        assert_eq!(families, EXPORTED.len(), "EXPORTED lists every family");
    }

    #[test]
    fn known_labels_are_exported_at_zero_from_the_start() {
        let text = Metrics::new().unwrap().render();
        let mut zeros = vec![
            r#"portcullis_config_reloads_total{result="success"} 0"#.to_owned(),
            r#"portcullis_config_reloads_total{result="failure"} 0"#.to_owned(),
        ];
        zeros.extend(
            UPSTREAM_KINDS
                .iter()
                .map(|kind| format!(r#"portcullis_upstream_errors_total{{kind="{kind}"}} 0"#)),
        );
        zeros.extend(
            DENIAL_REASONS
                .iter()
                .map(|reason| format!(r#"portcullis_denials_total{{reason="{reason}"}} 0"#)),
        );
        for zero in &zeros {
            assert!(text.lines().any(|l| l == zero), "{zero} missing:\n{text}");
        }
        // Spot checks against a list of the code's own making: a policy denial, a refusal
        // outside policy, the listener's count, every kind of spec §8.
        for zero in [
            r#"portcullis_denials_total{reason="no_rule"} 0"#,
            r#"portcullis_denials_total{reason="destination_prohibited"} 0"#,
            r#"portcullis_denials_total{reason="overloaded"} 0"#,
            r#"portcullis_upstream_errors_total{kind="reset"} 0"#,
        ] {
            assert!(zeros.iter().any(|z| z == zero), "{zero}");
        }
        // Series keyed by client and rule still wait for traffic.
        for family in ["portcullis_requests_total{", "portcullis_tunnels_total{"] {
            assert!(
                !text.contains(family),
                "{family} before any traffic:\n{text}"
            );
        }
    }

    /// The exposition without the process collector, whose values move between two renders.
    fn portcullis_lines(m: &Metrics) -> String {
        m.render()
            .lines()
            .filter(|l| !l.starts_with("process_") && !l.contains(" process_"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_handle_cache_renders_exactly_like_with_label_values() {
        let cached = Metrics::new().unwrap();
        let direct = Metrics::new().unwrap();
        let ci: Arc<str> = Arc::from("ci");
        let anonymous: Arc<str> = Arc::from("anonymous");
        let github: Arc<str> = Arc::from("api.github.com");
        let none: Arc<str> = Arc::from("none");
        let propfind = Method::from_bytes(b"PROPFIND").unwrap();
        let requests = [
            (
                &ci,
                &github,
                Decision::Allow,
                &Method::GET,
                StatusCode::OK,
                0.003,
            ),
            (
                &ci,
                &github,
                Decision::Allow,
                &Method::GET,
                StatusCode::OK,
                0.2,
            ),
            (
                &ci,
                &github,
                Decision::WouldDeny,
                &propfind,
                StatusCode::CREATED,
                1.5,
            ),
            (
                &ci,
                &none,
                Decision::Deny,
                &Method::POST,
                StatusCode::FORBIDDEN,
                0.0001,
            ),
            (
                &anonymous,
                &none,
                Decision::Deny,
                &Method::GET,
                StatusCode::BAD_GATEWAY,
                40.0,
            ),
        ];
        // (&anonymous, &github) is tunnel-only: it must get no duration histogram.
        let tunnels = [
            (&ci, &github, Decision::Allow, 10, 2000),
            (&ci, &github, Decision::Allow, 0, 7),
            (&anonymous, &github, Decision::WouldDeny, 0, 0),
            (&anonymous, &none, Decision::Deny, 0, 0),
        ];
        for _ in 0..2 {
            for (client, rule, decision, method, code, seconds) in &requests {
                cached.observe_request(client, rule, *decision, method, *code, *seconds);
                direct
                    .requests
                    .with_label_values(&[
                        client,
                        rule,
                        decision.as_str(),
                        method_label(method),
                        code.as_str(),
                    ])
                    .inc();
                direct
                    .request_duration
                    .with_label_values(&[client, rule])
                    .observe(*seconds);
            }
            for (client, rule, decision, up, down) in &tunnels {
                cached.observe_tunnel(client, rule, *decision, *up, *down);
                direct
                    .tunnels
                    .with_label_values(&[client, rule, decision.as_str()])
                    .inc();
                for (direction, bytes) in [("upstream", *up), ("downstream", *down)] {
                    if bytes > 0 {
                        direct
                            .tunnel_bytes
                            .with_label_values(&[client, rule, direction])
                            .inc_by(bytes);
                    }
                }
            }
        }
        let text = portcullis_lines(&cached);
        assert_eq!(text, portcullis_lines(&direct));
        assert!(text.contains(
            r#"portcullis_requests_total{client="ci",code="201",decision="would_deny",method="OTHER",rule="api.github.com"} 2"#
        ), "{text}");
        assert!(text.contains(
            r#"portcullis_tunnel_bytes_total{client="ci",direction="downstream",rule="api.github.com"} 4014"#
        ), "{text}");
        assert!(!text.contains(r#"portcullis_request_duration_seconds_count{client="anonymous",rule="api.github.com"}"#), "{text}");
        assert!(
            !text.contains(r#"direction="upstream",rule="none""#),
            "{text}"
        );
    }
}
