//! The audit event (spec §7): what is collected about a request or tunnel ([`Event`]), its
//! serialization in the schema's field order ([`EventLine`]), and event ids ([`IdGenerator`]).
//!
//! Collecting is cheap and happens on the request path; formatting (timestamp, addresses, masked
//! headers and query) happens only when the writer thread serializes the event.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::HeaderMap;
use serde::Serialize;

use crate::telemetry::mask::Masker;

/// `allow`, `deny` or `would_deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
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
    /// An OIDC client's token `sub` (null for token, network and anonymous clients).
    pub subject: Option<Arc<str>>,
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
    /// Whether the connection came through the transparent listener (spec §11).
    pub transparent: bool,
    /// Whether the request was signed (spec §12).
    pub signed: bool,
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

/// Serializes any `Display` as a string without an intermediate `String`.
struct Display<T>(T);

impl<T: std::fmt::Display> Serialize for Display<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// RFC 3339 in UTC with microseconds, e.g. `2026-11-23T15:04:05.123456Z`.
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
        let masker = self.masker;
        let log_headers = masker.log_headers();
        let headers = |map: &'a Option<HeaderMap>| {
            map.as_ref()
                .filter(|_| log_headers)
                .map(|map| masker.headers(map))
        };
        let mut out = serializer.serialize_struct("Event", 27)?;
        out.serialize_field("ts", &Display(Timestamp(e.ts)))?;
        out.serialize_field("id", &format_args!("{:016x}", e.id))?;
        out.serialize_field("kind", &e.kind)?;
        out.serialize_field("client", &*e.client)?;
        out.serialize_field("subject", &e.subject.as_deref())?;
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
                .map(|q| masker.query(q)),
        )?;
        out.serialize_field("decision", &e.decision)?;
        out.serialize_field("reason", &e.reason)?;
        out.serialize_field("rule", &e.rule.as_deref())?;
        out.serialize_field("credential", &e.credential.as_deref())?;
        out.serialize_field("intercepted", &e.intercepted)?;
        out.serialize_field("transparent", &e.transparent)?;
        out.serialize_field("signed", &e.signed)?;
        out.serialize_field("status", &e.status)?;
        out.serialize_field("bytes_sent", &e.bytes_sent)?;
        out.serialize_field("bytes_received", &e.bytes_received)?;
        // At most three decimals (spec §7): microseconds are all a duration here can tell.
        out.serialize_field("duration_ms", &((e.duration_ms * 1000.0).round() / 1000.0))?;
        out.serialize_field("upstream_addr", &e.upstream_addr.map(Display))?;
        out.serialize_field("request_headers", &headers(&e.request_headers))?;
        out.serialize_field("response_headers", &headers(&e.response_headers))?;
        out.serialize_field("error", &e.error)?;
        out.end()
    }
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::config::{parse, Origin};
    use crate::telemetry::mask::tests::masker;

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
            subject: None,
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
            transparent: false,
            signed: false,
            status: Some(200),
            bytes_sent: 0,
            bytes_received: 4567,
            duration_ms: 12.300_4,
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
            r#"{"ts":"1970-01-01T00:00:00.000000Z","id":"0000a1b2c3d4e5f6","kind":"request","client":"frontend","subject":null,"peer":"10.1.2.3:51234","method":"GET","scheme":"https","host":"api.github.com","port":443,"path":"/repos/o/r","query":"per_page=100&token=<HIDDEN>","decision":"allow","reason":null,"rule":"api.github.com","credential":"github","intercepted":true,"transparent":false,"signed":false,"status":200,"bytes_sent":0,"bytes_received":4567,"duration_ms":12.3,"upstream_addr":"140.82.112.6:443","request_headers":{"authorization":"<HIDDEN>","user-agent":"git/2.47"},"response_headers":null,"error":null}"#
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
