//! The audit event (spec §7): what is collected about a request or tunnel ([`Event`]), its
//! serialization in the schema's field order ([`EventLine`]), and event ids ([`IdGenerator`]).
//!
//! Collecting is cheap and happens on the request path; formatting (timestamp, addresses, masked
//! query) happens only when the writer thread writes the event. Headers are the exception: they
//! are written as masked JSON when seen, which costs less than cloning the header map.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
/// query) happens when the writer thread writes it ([`EventLine`]), off the request path.
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
    /// Request headers as sent upstream, as a masked JSON object (null for tunnels and when
    /// `audit.log_headers` is off).
    pub request_headers: Option<Vec<u8>>,
    /// Response headers, as a masked JSON object.
    pub response_headers: Option<Vec<u8>>,
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

impl EventLine<'_> {
    /// Appends the event as one JSON object (no newline) to `out`: the schema's fields in its
    /// order, header values and query parameters masked.
    pub fn write(&self, out: &mut Vec<u8>) {
        use crate::telemetry::json::{
            boolean, float, hex_id, integer, null, opt_string, socket_addr, string, timestamp,
        };
        let e = self.event;
        let masker = self.masker;
        let headers = |out: &mut Vec<u8>, json: &Option<Vec<u8>>| match json {
            Some(json) => out.extend_from_slice(json),
            None => null(out),
        };
        out.extend_from_slice(b"{\"ts\":");
        timestamp(out, e.ts);
        out.extend_from_slice(b",\"id\":");
        hex_id(out, e.id);
        out.extend_from_slice(match e.kind {
            Kind::Request => b",\"kind\":\"request\",\"client\":",
            Kind::Tunnel => b",\"kind\":\"tunnel\",\"client\":",
        });
        string(out, &e.client);
        out.extend_from_slice(b",\"subject\":");
        opt_string(out, e.subject.as_deref());
        out.extend_from_slice(b",\"peer\":");
        socket_addr(out, e.peer);
        out.extend_from_slice(b",\"method\":");
        string(out, e.method.as_str());
        out.extend_from_slice(b",\"scheme\":");
        opt_string(out, e.scheme);
        out.extend_from_slice(b",\"host\":");
        string(out, &e.host);
        out.extend_from_slice(b",\"port\":");
        integer(out, u64::from(e.port));
        out.extend_from_slice(b",\"path\":");
        opt_string(out, e.uri.as_ref().map(http::Uri::path));
        out.extend_from_slice(b",\"query\":");
        match e.uri.as_ref().and_then(http::Uri::query) {
            Some(query) => string(out, &masker.query(query)),
            None => null(out),
        }
        out.extend_from_slice(b",\"decision\":\"");
        out.extend_from_slice(e.decision.as_str().as_bytes());
        out.extend_from_slice(b"\",\"reason\":");
        opt_string(out, e.reason.as_deref());
        out.extend_from_slice(b",\"rule\":");
        opt_string(out, e.rule.as_deref());
        out.extend_from_slice(b",\"credential\":");
        opt_string(out, e.credential.as_deref());
        out.extend_from_slice(b",\"intercepted\":");
        boolean(out, e.intercepted);
        out.extend_from_slice(b",\"transparent\":");
        boolean(out, e.transparent);
        out.extend_from_slice(b",\"signed\":");
        boolean(out, e.signed);
        out.extend_from_slice(b",\"status\":");
        match e.status {
            Some(status) => integer(out, u64::from(status)),
            None => null(out),
        }
        out.extend_from_slice(b",\"bytes_sent\":");
        integer(out, e.bytes_sent);
        out.extend_from_slice(b",\"bytes_received\":");
        integer(out, e.bytes_received);
        // At most three decimals (spec §7): microseconds are all a duration here can tell.
        out.extend_from_slice(b",\"duration_ms\":");
        float(out, (e.duration_ms * 1000.0).round() / 1000.0);
        out.extend_from_slice(b",\"upstream_addr\":");
        match e.upstream_addr {
            Some(addr) => socket_addr(out, addr),
            None => null(out),
        }
        out.extend_from_slice(b",\"request_headers\":");
        headers(out, &e.request_headers);
        out.extend_from_slice(b",\"response_headers\":");
        headers(out, &e.response_headers);
        out.extend_from_slice(b",\"error\":");
        opt_string(out, e.error.as_deref());
        out.push(b'}');
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

    impl std::fmt::Display for EventLine<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let mut out = Vec::new();
            self.write(&mut out);
            f.write_str(&String::from_utf8(out).unwrap())
        }
    }

    use super::*;
    use crate::config::{parse, Origin};
    use crate::telemetry::mask::tests::masker;
    use http::HeaderMap;

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
            request_headers: m.headers_json(&headers),
            response_headers: None,
            error: None,
        };
        let line = EventLine {
            event: &event,
            masker: &m,
        }
        .to_string();
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
        assert_eq!(quiet.headers_json(&headers), None);
    }

    #[test]
    fn ids_are_unique() {
        let ids = IdGenerator::new();
        let set: HashSet<u64> = (0..10_000).map(|_| ids.next()).collect();
        assert_eq!(set.len(), 10_000);
    }
}
