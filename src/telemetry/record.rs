//! A request's or tunnel's record ([`Record`]), filled along its path, and how it is finished:
//! counted in the metrics and handed to the audit sink when the response body ends
//! ([`Telemetry::finish_response`], the [`Observed`] body) or the tunnel closes.
//! [`Counted`] follows the request body on the way up ([`BodyProgress`]: bytes, end, failure).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::body::{self, Body, BoxError};
use crate::credentials::Echoes;
use crate::error::ProxyError;
use crate::telemetry::event::{Decision, Event, Kind};
use crate::telemetry::mask::Masker;
use crate::telemetry::Telemetry;

/// An event being filled along a request's or tunnel's path.
#[derive(Debug)]
pub struct Record {
    /// The event so far.
    pub event: Event,
    started: Instant,
    /// How far the request body got on its way upstream (a [`Counted`] body reports to it).
    pub request_body: Arc<BodyProgress>,
    /// The metric label of the rule (`none` until one matches).
    pub rule_label: Arc<str>,
    masker: Arc<Masker>,
    /// Secrets no snapshot's masker knows (a minted token injected into this request, the
    /// client's own OIDC token): scrubbed from the event as well.
    runtime_secrets: Vec<Arc<Echoes>>,
}

/// The rule label of a request no rule matched (yet): one shared string, not one per request.
fn no_rule_label() -> Arc<str> {
    static NONE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("none"));
    NONE.clone()
}

impl Record {
    /// A new record of `kind` for a client at `peer`.
    pub fn new(
        telemetry: &Telemetry,
        masker: Arc<Masker>,
        kind: Kind,
        client: &Arc<str>,
        peer: SocketAddr,
        method: &http::Method,
    ) -> Self {
        Self {
            event: Event {
                ts: time::OffsetDateTime::now_utc(),
                id: telemetry.ids.next(),
                kind,
                client: client.clone(),
                subject: None,
                peer,
                method: method.clone(),
                scheme: None,
                host: String::new(),
                port: 0,
                uri: None,
                decision: Decision::Allow,
                reason: None,
                rule: None,
                credential: None,
                intercepted: false,
                transparent: false,
                signed: false,
                status: None,
                bytes_sent: 0,
                bytes_received: 0,
                duration_ms: 0.0,
                upstream_addr: None,
                request_headers: None,
                response_headers: None,
                error: None,
            },
            started: Instant::now(),
            request_body: Arc::new(BodyProgress::default()),
            rule_label: no_rule_label(),
            masker,
            runtime_secrets: Vec::new(),
        }
    }

    /// Records the destination.
    pub fn target(
        &mut self,
        scheme: Option<&'static str>,
        host: &str,
        port: u16,
        uri: Option<&http::Uri>,
    ) {
        self.event.scheme = scheme;
        self.event.host = host.to_owned();
        self.event.port = port;
        self.event.uri = uri.cloned();
    }

    /// Records the rule that allowed the request.
    pub fn rule(&mut self, rule: &crate::policy::Rule) {
        self.event.rule = Some(rule.name.clone());
        self.rule_label = rule.name.clone();
    }

    /// A secret only known at runtime (a minted token that was injected, the client's OIDC
    /// token): its value is scrubbed from the event too.
    pub fn runtime_secret(&mut self, echoes: Arc<Echoes>) {
        self.runtime_secrets.push(echoes);
    }

    /// The client this request identified as: its name, an OIDC token's subject, and the token
    /// itself, which must not appear in the event wherever else the client sent it.
    pub fn identified(
        &mut self,
        client: &Arc<str>,
        subject: Option<&Arc<str>>,
        token: Option<&Arc<Echoes>>,
    ) {
        self.event.client = client.clone();
        self.event.subject = subject.cloned();
        if let Some(token) = token {
            self.runtime_secret(token.clone());
        }
    }

    /// Records the request headers as sent upstream (masked).
    pub fn request_headers(&mut self, headers: &HeaderMap) {
        self.event.request_headers = self.masker.headers_json(headers);
    }

    /// Records a refusal or failure. Policy refusals are `deny` with a `reason`; failures after
    /// the decision keep `allow` and fill `error`.
    pub fn fail(&mut self, telemetry: &Telemetry, err: &ProxyError) {
        let class = err.class();
        if class.denial {
            self.event.decision = Decision::Deny;
            self.event.reason = Some(err.to_string());
            telemetry
                .metrics
                .denials
                .with_label_values(&[class.reason])
                .inc();
        } else {
            self.event.error = Some(err.to_string());
            if let Some(kind) = class.upstream {
                telemetry
                    .metrics
                    .upstream_errors
                    .with_label_values(&[kind])
                    .inc();
            }
        }
    }

    /// Records a policy denial let through by report mode. Not counted in
    /// `portcullis_denials_total`, which counts what was refused: a report-mode rollout must not
    /// look like a denial spike. It is counted with `decision="would_deny"` in
    /// `portcullis_requests_total` / `portcullis_tunnels_total` when it ends, and its reason is in
    /// the audit event.
    pub fn would_deny(&mut self, reason: String) {
        self.event.decision = Decision::WouldDeny;
        self.event.reason = Some(reason);
    }

    fn close(mut self, telemetry: &Telemetry, bytes_received: u64) {
        self.event.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.event.bytes_sent = self.request_body.sent();
        // A tunnel that never opened (a refused CONNECT) moved nothing: the proxy's own answer is
        // not tunnel traffic, in the event or in portcullis_tunnel_bytes_total.
        let opened = self.event.kind == Kind::Request || self.event.status == Some(200);
        self.event.bytes_received = if opened { bytes_received } else { 0 };
        if answered_early(&self) {
            self.event.error = Some(format!(
                "the upstream answered before the whole request body was sent ({} bytes sent)",
                self.event.bytes_sent
            ));
        }
        let (e, m) = (&self.event, &telemetry.metrics);
        match e.kind {
            Kind::Request => {
                // No status means the response never came: counted as the 502 it became.
                let code = e
                    .status
                    .and_then(|s| http::StatusCode::from_u16(s).ok())
                    .unwrap_or(http::StatusCode::BAD_GATEWAY);
                m.observe_request(
                    &e.client,
                    &self.rule_label,
                    e.decision,
                    &e.method,
                    code,
                    e.duration_ms / 1000.0,
                );
            }
            Kind::Tunnel => m.observe_tunnel(
                &e.client,
                &self.rule_label,
                e.decision,
                e.bytes_sent,
                e.bytes_received,
            ),
        }
        let mut runtime = self.runtime_secrets;
        runtime.extend(
            telemetry
                .live_secrets
                .current()
                .iter()
                .map(|(s, _)| s.clone()),
        );
        telemetry
            .audit
            .emit_scrubbed(self.event, &self.masker, runtime);
    }

    /// Ends a tunnel record with its byte counts and how it ended.
    pub fn finish_tunnel(
        mut self,
        telemetry: &Telemetry,
        up: u64,
        down: u64,
        error: Option<String>,
    ) {
        self.request_body.sent.store(up, Ordering::Relaxed);
        if self.event.error.is_none() {
            self.event.error = error;
        }
        self.close(telemetry, down);
    }
}

/// A relayed request whose response came while its body was still on the way (and no other
/// error explains it).
fn answered_early(record: &Record) -> bool {
    record.event.kind == Kind::Request
        && record.event.error.is_none()
        && record.event.decision != Decision::Deny
        && record.event.upstream_addr.is_some()
        && record.event.status.is_some()
        && record.request_body.failure().is_none()
        && !record.request_body.ended()
}

/// How far a request body got on its way upstream: shared by the [`Counted`] body and its record.
#[derive(Debug)]
pub struct BodyProgress {
    sent: AtomicU64,
    ended: AtomicBool,
    failure: OnceLock<String>,
}

impl Default for BodyProgress {
    /// No body yet: nothing sent, nothing pending.
    fn default() -> Self {
        Self {
            sent: AtomicU64::new(0),
            ended: AtomicBool::new(true),
            failure: OnceLock::new(),
        }
    }
}

impl BodyProgress {
    /// Bytes passed on.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Whether the body was passed on to its end (true when there was none).
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// Why the client's body failed (malformed framing, the client going away), if it did: the
    /// client's fault, not the upstream's.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

impl Telemetry {
    /// Attaches `record` to `response`: the event is written when the response body ends (or is
    /// dropped, if the client goes away), with the bytes that went through.
    pub fn finish_response(
        self: &Arc<Self>,
        mut record: Record,
        response: Response<Body>,
    ) -> Response<Body> {
        record.event.status = Some(response.status().as_u16());
        if record.event.kind == Kind::Request {
            record.event.response_headers = record.masker.headers_json(response.headers());
        }
        let (parts, inner) = response.into_parts();
        let body = Observed {
            inner,
            bytes: 0,
            pending: Some((record, self.clone())),
        };
        Response::from_parts(parts, body::boxed(body))
    }
}

/// A response body that finishes its record when it ends.
struct Observed {
    inner: Body,
    bytes: u64,
    pending: Option<(Record, Arc<Telemetry>)>,
}

impl Observed {
    /// Writes the record once. `error` is what cut the response short; it counts as an upstream
    /// reset only when the upstream's body failed (`upstream_fault`), not when the client went
    /// away — a client hanging up is not an upstream error and must not feed its alert.
    fn finish(&mut self, error: Option<String>, upstream_fault: bool) {
        if let Some((mut record, telemetry)) = self.pending.take() {
            if let Some(e) = error {
                record.event.error.get_or_insert(e);
                if upstream_fault {
                    telemetry
                        .metrics
                        .upstream_errors
                        .with_label_values(&["reset"])
                        .inc();
                }
            }
            record.close(&telemetry, self.bytes);
        }
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(None, false);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let message = format!("response body: {e}");
                self.finish(Some(message), true);
            }
            Poll::Ready(None) => self.finish(None, false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let incomplete = !self.inner.is_end_stream();
        self.finish(
            incomplete.then(|| "the client went away before the response ended".to_owned()),
            false,
        );
    }
}

/// A request body that reports its progress (bytes, end, failure) to a [`BodyProgress`].
pub struct Counted<B> {
    inner: B,
    progress: Arc<BodyProgress>,
}

impl<B: HttpBody> Counted<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, progress: Arc<BodyProgress>) -> Self {
        progress
            .ended
            .store(inner.is_end_stream(), Ordering::Relaxed);
        Self { inner, progress }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.progress
                        .sent
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if self.inner.is_end_stream() {
                    self.progress.ended.store(true, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => self.progress.ended.store(true, Ordering::Relaxed),
            Poll::Ready(Some(Err(e))) => {
                let _ = self.progress.failure.set(e.to_string());
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
