//! Audit events (spec §7): one JSON line per request (plain or intercepted) and per tunnel,
//! written when it ends, with secrets masked.
//!
//! A [`Record`] is filled along a request's path; [`Telemetry::finish_response`] wraps the
//! response body so that the event is emitted (and the request metrics counted) when the body is
//! done. Events go through a bounded queue to a writer thread, off the request path: when the
//! queue is full the event is dropped, counted in `portcullis_audit_events_dropped_total` and
//! reported in the log — traffic never stalls on a slow disk.
//!
//! Masking happens twice: header and query values by name while the event is built, then the
//! writer replaces any resolved secret value found anywhere in the serialized line.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::body::{self, Body, BoxError};
use crate::config::{AuditOutput, Config};
use crate::error::ProxyError;
use crate::metrics::{method_label, Metrics};

/// The mask token.
pub const HIDDEN: &str = "<HIDDEN>";

/// Header names always masked (spec §7).
pub const MASKED_HEADERS: [&str; 8] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
    "private-token",
    "x-amz-security-token",
];

/// Query parameters always masked (spec §7).
pub const MASKED_QUERY_PARAMS: [&str; 13] = [
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "secret",
    "password",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "client_secret",
    "code",
];

/// `allow`, `deny` or `would_deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Let through.
    Allow,
    /// Refused.
    Deny,
    /// Would have been refused; let through in report mode.
    WouldDeny,
}

impl Decision {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::WouldDeny => "would_deny",
        }
    }
}

/// `request` or `tunnel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A plain or intercepted request.
    Request,
    /// A CONNECT tunnel.
    Tunnel,
}

/// One audit event, as collected on the request path. Formatting (timestamp, addresses, masked
/// headers and query) happens when the writer thread serializes it ([`EventLine`]), off the
/// request path.
#[derive(Debug, Clone)]
pub struct Event {
    /// When the request or tunnel started.
    pub ts: time::OffsetDateTime,
    /// Unique per event in this process.
    pub id: u64,
    /// `request` | `tunnel`.
    pub kind: Kind,
    /// Client identity.
    pub client: Arc<str>,
    /// Client socket address.
    pub peer: SocketAddr,
    /// Method (`CONNECT` for tunnels).
    pub method: http::Method,
    /// `http` | `https`; null when unknown.
    pub scheme: Option<&'static str>,
    /// Destination host.
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// Request target: its path and (masked) query are written (null for tunnels).
    pub uri: Option<http::Uri>,
    /// Policy decision.
    pub decision: Decision,
    /// Why it was denied (or would be).
    pub reason: Option<String>,
    /// The rule that matched.
    pub rule: Option<Arc<str>>,
    /// The credential injected.
    pub credential: Option<Arc<str>>,
    /// Whether TLS was terminated by the proxy.
    pub intercepted: bool,
    /// Response status (null for tunnels that never got one).
    pub status: Option<u16>,
    /// Request body bytes (tunnels: client → upstream).
    pub bytes_sent: u64,
    /// Response body bytes (tunnels: upstream → client).
    pub bytes_received: u64,
    /// Milliseconds from request head (or CONNECT) to the end.
    pub duration_ms: f64,
    /// The upstream address dialled.
    pub upstream_addr: Option<SocketAddr>,
    /// Request headers as sent upstream (masked when written; null for tunnels).
    pub request_headers: Option<HeaderMap>,
    /// Response headers (masked when written).
    pub response_headers: Option<HeaderMap>,
    /// What failed (upstream errors, tunnel endings other than a clean close).
    pub error: Option<String>,
}

/// An event with the masker of its snapshot: serializes to the spec §7 schema, in its field
/// order, with header values and query parameters masked.
pub struct EventLine<'a> {
    /// The event.
    pub event: &'a Event,
    /// Its snapshot's masker.
    pub masker: &'a Masker,
}

struct Masked<'a> {
    map: &'a HeaderMap,
    masker: &'a Masker,
}

impl Serialize for Masked<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut out = serializer.serialize_map(Some(self.map.keys_len()))?;
        for name in self.map.keys() {
            let hidden = self.masker.headers.contains(name.as_str());
            let mut values = self.map.get_all(name).iter();
            let shown = if hidden {
                std::borrow::Cow::Borrowed(HIDDEN)
            } else if self.map.get_all(name).iter().count() == 1 {
                values
                    .next()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()))
                    .unwrap_or_default()
            } else {
                let joined: Vec<String> = values
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                std::borrow::Cow::Owned(joined.join(", "))
            };
            out.serialize_entry(name.as_str(), &shown)?;
        }
        out.end()
    }
}

struct Display<T>(T);

impl<T: std::fmt::Display> Serialize for Display<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

struct Timestamp(time::OffsetDateTime);

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }
}

impl<'a> Serialize for EventLine<'a> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let e = self.event;
        let log_headers = self.masker.log_headers;
        let masker = self.masker;
        let headers = |map: &'a Option<HeaderMap>| {
            map.as_ref()
                .filter(|_| log_headers)
                .map(|map| Masked { map, masker })
        };
        let mut out = serializer.serialize_struct("Event", 24)?;
        out.serialize_field("ts", &Display(Timestamp(e.ts)))?;
        out.serialize_field("id", &format_args!("{:016x}", e.id))?;
        out.serialize_field("kind", &e.kind)?;
        out.serialize_field("client", &*e.client)?;
        out.serialize_field("peer", &Display(e.peer))?;
        out.serialize_field("method", e.method.as_str())?;
        out.serialize_field("scheme", &e.scheme)?;
        out.serialize_field("host", &e.host)?;
        out.serialize_field("port", &e.port)?;
        out.serialize_field("path", &e.uri.as_ref().map(http::Uri::path))?;
        out.serialize_field(
            "query",
            &e.uri
                .as_ref()
                .and_then(http::Uri::query)
                .map(|q| self.masker.query(q)),
        )?;
        out.serialize_field("decision", &e.decision)?;
        out.serialize_field("reason", &e.reason)?;
        out.serialize_field("rule", &e.rule.as_deref())?;
        out.serialize_field("credential", &e.credential.as_deref())?;
        out.serialize_field("intercepted", &e.intercepted)?;
        out.serialize_field("status", &e.status)?;
        out.serialize_field("bytes_sent", &e.bytes_sent)?;
        out.serialize_field("bytes_received", &e.bytes_received)?;
        out.serialize_field("duration_ms", &e.duration_ms)?;
        out.serialize_field("upstream_addr", &e.upstream_addr.map(Display))?;
        out.serialize_field("request_headers", &headers(&e.request_headers))?;
        out.serialize_field("response_headers", &headers(&e.response_headers))?;
        out.serialize_field("error", &e.error)?;
        out.end()
    }
}

/// Masks header values, query parameters and secret values (one per snapshot).
pub struct Masker {
    headers: HashSet<String>,
    query_params: HashSet<String>,
    secrets: Vec<Zeroizing<String>>,
    log_headers: bool,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("headers", &self.headers)
            .field("query_params", &self.query_params)
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Masker {
    /// Built-in lists, the configured additions, every credential's header name, and every
    /// resolved secret (with the full header values built from them, e.g. a Basic pair's base64).
    pub fn new(config: &Config) -> Self {
        let mut headers: HashSet<String> = MASKED_HEADERS.iter().map(|s| (*s).to_owned()).collect();
        headers.extend(config.audit.mask_headers.iter().cloned());
        let mut secrets = Vec::new();
        for cred in config.credentials.values() {
            headers.insert(cred.header.as_str().to_owned());
            secrets.push(Zeroizing::new(cred.secret.expose().to_owned()));
            if let Ok(full) = cred.value.to_str() {
                secrets.push(Zeroizing::new(full.to_owned()));
                if let Some((_, encoded)) = full.split_once(' ') {
                    secrets.push(Zeroizing::new(encoded.to_owned()));
                }
            }
        }
        for client in &config.clients {
            if let Some(token) = &client.token {
                secrets.push(Zeroizing::new(token.expose().to_owned()));
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let mut query_params: HashSet<String> = MASKED_QUERY_PARAMS
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        query_params.extend(config.audit.mask_query_params.iter().cloned());
        Self {
            headers,
            query_params,
            secrets,
            log_headers: config.audit.log_headers,
        }
    }

    /// A query string with the values of masked parameters replaced (names compared
    /// case-insensitively, after percent-decoding).
    pub fn query(&self, query: &str) -> String {
        query
            .split('&')
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                let decoded = percent_decode(name).to_ascii_lowercase();
                if !value.is_empty() && self.query_params.contains(&decoded) {
                    format!("{name}={HIDDEN}")
                } else {
                    pair.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Replaces every resolved secret value anywhere in `line`.
    pub fn scrub(&self, line: &mut String) {
        for secret in &self.secrets {
            if line.contains(secret.as_str()) {
                *line = line.replace(secret.as_str(), HIDDEN);
            }
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Event ids: a random per-process key mixed with a counter through a bijection, so ids are
/// unique within the process and not guessable from one another.
pub struct IdGenerator {
    key: u64,
    counter: AtomicU64,
}

impl IdGenerator {
    /// A generator with a random key.
    pub fn new() -> Self {
        let mut bytes = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        Self {
            key: u64::from_le_bytes(bytes),
            counter: AtomicU64::new(0),
        }
    }

    /// The next id (written as 16 hex digits).
    pub fn next(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        splitmix64(n ^ self.key)
    }
}

impl std::fmt::Debug for IdGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdGenerator").finish_non_exhaustive()
    }
}

impl Default for IdGenerator {
    fn default() -> Self {
        Self::new()
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// The writer.
// ---------------------------------------------------------------------------------------------

/// Events the queue holds before dropping.
const QUEUE_EVENTS: usize = 65_536;

enum Message {
    Event(Box<Event>, Arc<Masker>),
    Reopen(AuditOutput),
    Shutdown,
}

/// Opening the audit output failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot open audit output {path}: {reason}")]
pub struct AuditError {
    path: String,
    reason: String,
}

/// The audit queue and its writer thread.
pub struct AuditSink {
    tx: SyncSender<Message>,
    dropped: prometheus::IntCounter,
    last_drop_warning: AtomicU64,
    started: Instant,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink").finish_non_exhaustive()
    }
}

type Output = BufWriter<Box<dyn Write + Send>>;

fn open(output: &AuditOutput) -> Result<Output, AuditError> {
    let sink: Box<dyn Write + Send> = match output {
        AuditOutput::Stdout => Box::new(std::io::stdout()),
        AuditOutput::Stderr => Box::new(std::io::stderr()),
        AuditOutput::File(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::create_dir_all(dir);
            }
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| AuditError {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?,
            )
        }
    };
    Ok(BufWriter::with_capacity(64 * 1024, sink))
}

impl AuditSink {
    /// Opens `output` and starts the writer thread.
    pub fn start(
        output: &AuditOutput,
        dropped: prometheus::IntCounter,
    ) -> Result<Self, AuditError> {
        let out = open(output)?;
        let (tx, rx) = sync_channel(QUEUE_EVENTS);
        let writer = std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || write_loop(out, rx))
            .map_err(|e| AuditError {
                path: "audit writer thread".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            tx,
            dropped,
            last_drop_warning: AtomicU64::new(0),
            started: Instant::now(),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues an event; never blocks. A full queue drops it, counts it and says so in the log
    /// (at most once every ten seconds).
    pub fn emit(&self, event: Event, masker: &Arc<Masker>) {
        match self
            .tx
            .try_send(Message::Event(Box::new(event), masker.clone()))
        {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
                let now = self.started.elapsed().as_secs();
                let last = self.last_drop_warning.load(Ordering::Relaxed);
                if now >= last + 10
                    && self
                        .last_drop_warning
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        dropped_total = self.dropped.get(),
                        "audit queue full: events are being dropped (see portcullis_audit_events_dropped_total)"
                    );
                }
            }
        }
    }

    /// Reopens the output (after log rotation, or a changed `audit.output`).
    pub fn reopen(&self, output: AuditOutput) {
        // Blocking send: a reopen must not be lost, and it is not on a request path.
        let _ = self.tx.send(Message::Reopen(output));
    }

    /// Writes what is queued, flushes and stops the writer.
    pub fn close(&self) {
        let _ = self.tx.send(Message::Shutdown);
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// While events keep coming, the writer naps this long between batches instead of blocking on
/// the queue: a blocked receiver must be woken (a futex call and a context switch) for every
/// event, which at tens of thousands of events a second costs more than writing them.
const BATCH_NAP: std::time::Duration = std::time::Duration::from_millis(5);

fn write_loop(mut out: Output, rx: Receiver<Message>) {
    let mut failing = false;
    let mut line = String::with_capacity(1024);
    let mut busy = false;
    loop {
        let first = if busy {
            std::thread::sleep(BATCH_NAP);
            rx.try_recv()
                .map_err(|e| e == std::sync::mpsc::TryRecvError::Disconnected)
        } else {
            rx.recv().map_err(|_| true)
        };
        let first = match first {
            Ok(message) => message,
            Err(true) => break,
            Err(false) => {
                busy = false;
                continue;
            }
        };
        busy = true;
        let mut next = Some(first);
        // Take whatever else is queued, then flush once.
        while let Some(message) = next {
            match message {
                Message::Event(event, masker) => {
                    // One buffer for every line: serialize, scrub, write.
                    let mut bytes = std::mem::take(&mut line).into_bytes();
                    bytes.clear();
                    let result = serde_json::to_writer(
                        &mut bytes,
                        &EventLine {
                            event: &event,
                            masker: &masker,
                        },
                    )
                    .map_err(std::io::Error::other)
                    .and_then(|()| String::from_utf8(bytes).map_err(std::io::Error::other))
                    .and_then(|text| {
                        line = text;
                        masker.scrub(&mut line);
                        line.push('\n');
                        out.write_all(line.as_bytes())
                    });
                    match result {
                        Err(e) if !failing => {
                            failing = true;
                            tracing::error!(error = %e, "cannot write audit event");
                        }
                        Ok(()) => failing = false,
                        Err(_) => {}
                    }
                }
                Message::Reopen(output) => {
                    let _ = out.flush();
                    match open(&output) {
                        Ok(new) => out = new,
                        Err(e) => tracing::error!(error = %e, "audit output not reopened"),
                    }
                }
                Message::Shutdown => {
                    let _ = out.flush();
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

// ---------------------------------------------------------------------------------------------
// Records and their completion.
// ---------------------------------------------------------------------------------------------

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

/// An event being filled along a request's or tunnel's path.
#[derive(Debug)]
pub struct Record {
    /// The event so far.
    pub event: Event,
    started: Instant,
    /// Request body bytes sent upstream (a counting body adds to it).
    pub request_bytes: Arc<AtomicU64>,
    /// The metric label of the rule (`none` until one matches).
    pub rule_label: Arc<str>,
    masker: Arc<Masker>,
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
            request_bytes: Arc::new(AtomicU64::new(0)),
            rule_label: Arc::from("none"),
            masker,
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

    /// Records the request headers as sent upstream (masked when written).
    pub fn request_headers(&mut self, headers: &HeaderMap) {
        if self.masker.log_headers {
            self.event.request_headers = Some(headers.clone());
        }
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

    /// Records a policy denial let through by report mode.
    pub fn would_deny(&mut self, telemetry: &Telemetry, reason: String, code: &'static str) {
        self.event.decision = Decision::WouldDeny;
        self.event.reason = Some(reason);
        telemetry.metrics.denials.with_label_values(&[code]).inc();
    }

    fn close(mut self, telemetry: &Telemetry, bytes_received: u64) {
        self.event.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.event.bytes_sent = self.request_bytes.load(Ordering::Relaxed);
        self.event.bytes_received = bytes_received;
        let m = &telemetry.metrics;
        match self.event.kind {
            Kind::Request => {
                let code = self
                    .event
                    .status
                    .and_then(|s| http::StatusCode::from_u16(s).ok())
                    .unwrap_or(http::StatusCode::BAD_GATEWAY);
                let method = method_label(&self.event.method);
                m.requests
                    .with_label_values(&[
                        &*self.event.client,
                        &*self.rule_label,
                        self.event.decision.as_str(),
                        method,
                        code.as_str(),
                    ])
                    .inc();
                m.duration(&self.event.client, &self.rule_label)
                    .observe(self.event.duration_ms / 1000.0);
            }
            Kind::Tunnel => {
                m.tunnels
                    .with_label_values(&[
                        &*self.event.client,
                        &*self.rule_label,
                        self.event.decision.as_str(),
                    ])
                    .inc();
                for (direction, bytes) in [
                    ("upstream", self.event.bytes_sent),
                    ("downstream", self.event.bytes_received),
                ] {
                    if bytes > 0 {
                        m.tunnel_bytes
                            .with_label_values(&[&*self.event.client, &*self.rule_label, direction])
                            .inc_by(bytes);
                    }
                }
            }
        }
        let masker = self.masker.clone();
        telemetry.audit.emit(self.event, &masker);
    }

    /// Ends a tunnel record with its byte counts and how it ended.
    pub fn finish_tunnel(
        mut self,
        telemetry: &Telemetry,
        up: u64,
        down: u64,
        error: Option<String>,
    ) {
        self.request_bytes.store(up, Ordering::Relaxed);
        if self.event.error.is_none() {
            self.event.error = error;
        }
        self.close(telemetry, down);
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
        if record.event.kind == Kind::Request && record.masker.log_headers {
            record.event.response_headers = Some(response.headers().clone());
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
    fn finish(&mut self, error: Option<String>) {
        if let Some((mut record, telemetry)) = self.pending.take() {
            if let Some(e) = error {
                record.event.error.get_or_insert(e);
                telemetry
                    .metrics
                    .upstream_errors
                    .with_label_values(&["reset"])
                    .inc();
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
                    self.finish(None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let message = format!("response body: {e}");
                self.finish(Some(message));
            }
            Poll::Ready(None) => self.finish(None),
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
        );
    }
}

/// A request body that counts the bytes it yields into `counter`.
pub struct Counted<B> {
    inner: B,
    counter: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, counter: Arc<AtomicU64>) -> Self {
        Self { inner, counter }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Origin};

    fn masker(extra: &str) -> Masker {
        let text = format!(
            "[audit]\nmask_headers = [\"X-Internal\"]\nmask_query_params = [\"Session\"]\n[credentials.api]\nheader = {{ name = \"X-Custom-Auth\", value = {{ value = \"s3cr3t-value\" }} }}\n[credentials.nexus]\nbasic = {{ username = \"svc\", password = {{ value = \"pw-9\" }} }}\n{extra}"
        );
        let config = parse(&text, Origin::Embedded, std::path::Path::new("."), false).unwrap();
        Masker::new(&config)
    }

    fn shown(masker: &Masker, map: &HeaderMap) -> serde_json::Value {
        serde_json::to_value(Masked { map, masker }).unwrap()
    }

    #[test]
    fn headers_are_masked_by_name_case_insensitively_including_repeats() {
        let m = masker("");
        let mut h = HeaderMap::new();
        h.append("authorization", "Bearer abc".parse().unwrap());
        h.append("Cookie", "a=1".parse().unwrap());
        h.append("cookie", "b=2".parse().unwrap());
        h.append("x-internal", "1".parse().unwrap());
        h.append("x-custom-auth", "s3cr3t-value".parse().unwrap());
        h.append("accept", "text/html".parse().unwrap());
        h.append("accept", "application/json".parse().unwrap());
        let shown = shown(&m, &h);
        assert_eq!(shown["authorization"], HIDDEN);
        assert_eq!(shown["cookie"], HIDDEN);
        assert_eq!(shown["x-internal"], HIDDEN);
        assert_eq!(
            shown["x-custom-auth"], HIDDEN,
            "a credential's header name is masked"
        );
        assert_eq!(shown["accept"], "text/html, application/json");
    }

    #[test]
    fn query_parameters_are_masked_by_name() {
        let m = masker("");
        assert_eq!(
            m.query("per_page=100&token=abc&Access_Token=x&session=s&%6Bey=v&keep=1&code"),
            "per_page=100&token=<HIDDEN>&Access_Token=<HIDDEN>&session=<HIDDEN>&%6Bey=<HIDDEN>&keep=1&code"
        );
    }

    #[test]
    fn secrets_are_scrubbed_anywhere() {
        let m = masker("");
        let mut line =
            "{\"path\":\"/x/s3cr3t-value/y\",\"error\":\"pw-9 and c3ZjOnB3LTk=\"}".to_owned();
        m.scrub(&mut line);
        assert_eq!(
            line,
            "{\"path\":\"/x/<HIDDEN>/y\",\"error\":\"<HIDDEN> and <HIDDEN>\"}"
        );
    }

    #[test]
    fn events_serialize_to_the_schema_with_log_headers_honoured() {
        let m = Arc::new(masker(""));
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer s3cr3t-value".parse().unwrap());
        headers.insert("user-agent", "git/2.47".parse().unwrap());
        let event = Event {
            ts: time::OffsetDateTime::UNIX_EPOCH,
            id: 0xa1b2_c3d4_e5f6,
            kind: Kind::Request,
            client: Arc::from("frontend"),
            peer: "10.1.2.3:51234".parse().unwrap(),
            method: http::Method::GET,
            scheme: Some("https"),
            host: "api.github.com".into(),
            port: 443,
            uri: Some("/repos/o/r?per_page=100&token=abc".parse().unwrap()),
            decision: Decision::Allow,
            reason: None,
            rule: Some(Arc::from("api.github.com")),
            credential: Some(Arc::from("github")),
            intercepted: true,
            status: Some(200),
            bytes_sent: 0,
            bytes_received: 4567,
            duration_ms: 12.3,
            upstream_addr: Some("140.82.112.6:443".parse().unwrap()),
            request_headers: Some(headers),
            response_headers: None,
            error: None,
        };
        let line = serde_json::to_string(&EventLine {
            event: &event,
            masker: &m,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"ts":"1970-01-01T00:00:00.000000Z","id":"0000a1b2c3d4e5f6","kind":"request","client":"frontend","peer":"10.1.2.3:51234","method":"GET","scheme":"https","host":"api.github.com","port":443,"path":"/repos/o/r","query":"per_page=100&token=<HIDDEN>","decision":"allow","reason":null,"rule":"api.github.com","credential":"github","intercepted":true,"status":200,"bytes_sent":0,"bytes_received":4567,"duration_ms":12.3,"upstream_addr":"140.82.112.6:443","request_headers":{"authorization":"<HIDDEN>","user-agent":"git/2.47"},"response_headers":null,"error":null}"#
        );
        let quiet = parse(
            "[audit]\nlog_headers = false\n",
            Origin::Embedded,
            std::path::Path::new("."),
            false,
        )
        .unwrap();
        let quiet = Masker::new(&quiet);
        let line = serde_json::to_string(&EventLine {
            event: &event,
            masker: &quiet,
        })
        .unwrap();
        assert!(line.contains(r#""request_headers":null"#), "{line}");
    }

    #[test]
    fn ids_are_unique_and_timestamps_rfc3339() {
        let ids = IdGenerator::new();
        let set: HashSet<u64> = (0..10_000).map(|_| ids.next()).collect();
        assert_eq!(set.len(), 10_000);
        let ts = Timestamp(time::OffsetDateTime::now_utc()).to_string();
        assert_eq!(ts.len(), "2026-11-23T15:04:05.123456Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
    }
}
