//! Prometheus metrics (spec §8) on the proxy's own registry, rendered by the admin listener.
//!
//! Every label is bounded: `rule` is a configured host pattern or `none`, `client` a configured
//! client, `anonymous` or `unauthenticated`, `method` a standard method or `OTHER`, `reason` and
//! `kind` fixed sets. Nothing here ever takes a host name, path or header from a request.

use http::Method;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric family the proxy exports (histograms also as `_bucket`, `_sum`, `_count`), besides
/// the process collector's `process_*` families. Dashboards and alert rules may use only these.
pub const EXPORTED: [&str; 15] = [
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
    "portcullis_proxy_auth_failures_total",
    "portcullis_certificate_errors_total",
];

/// Latency buckets for a proxy: sub-millisecond to 30 s.
const DURATION_BUCKETS: [f64; 16] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

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
    /// `portcullis_denials_total{reason}`
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
    /// `portcullis_proxy_auth_failures_total{client}`: wrong or missing proxy credentials.
    pub auth_failures: IntCounterVec,
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
        Ok(Self {
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
            auth_failures: counter_vec(
                "portcullis_proxy_auth_failures_total",
                "Requests with missing or wrong proxy credentials.",
                &["client"],
            )?,
            registry,
        })
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
        let text = m.render();
        for name in EXPORTED {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        let families = text
            .lines()
            .filter(|l| l.starts_with("# TYPE portcullis_"))
            .count();
        assert_eq!(families, EXPORTED.len(), "EXPORTED lists every family");
    }
}
