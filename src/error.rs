//! The one place that turns a failed request into a response the proxy makes itself.
//!
//! Every generated response carries the status from spec §6, a one-line `text/plain` body naming
//! the host and the reason, and an RFC 9209 `Proxy-Status` header. Nothing here ever formats a
//! secret: the details are built from host names, addresses and policy reasons only.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::net::{DialError, Prohibited, ResolveError};
use crate::policy::Denial;

/// Why the proxy answered a request itself instead of relaying the upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request could not be understood (bad target, bad header, …).
    #[error("malformed request: {0}")]
    BadRequest(String),
    /// An origin-form request (`GET /`) sent to the proxy port as if it were a web server.
    #[error(
        "this is a forward proxy: send absolute-form requests (GET http://host/path) or CONNECT"
    )]
    OriginForm,
    /// TRACE / TRACK are never relayed: they reflect headers, injected credentials included.
    #[error("method {0} is not allowed through the proxy")]
    MethodNotAllowed(String),
    /// Policy said no: no rule matches, or the method / path / port / scheme is not allowed.
    #[error("{0}")]
    Denied(Denial),
    /// The destination resolved to an address that destination safety (§5) refuses.
    #[error("host {host} resolves to {addr}, which is prohibited ({why})")]
    Prohibited {
        /// The host the client asked for.
        host: String,
        /// The offending address.
        addr: std::net::IpAddr,
        /// Which range it falls in.
        why: Prohibited,
    },
    /// The destination name does not resolve.
    #[error("host {host} could not be resolved: {source}")]
    Dns {
        /// The host the client asked for.
        host: String,
        /// Resolver failure.
        source: ResolveError,
    },
    /// TCP connect failed (refused, unreachable).
    #[error("host {host} is unavailable: {reason}")]
    Unavailable {
        /// The host the client asked for.
        host: String,
        /// Short human reason ("connection refused to 1.2.3.4:443").
        reason: String,
    },
    /// The upstream closed or reset the connection before answering.
    #[error("host {host} closed the connection before responding")]
    UpstreamReset {
        /// The host the client asked for.
        host: String,
    },
    /// The upstream's TLS certificate did not verify, or its handshake failed.
    #[error("host {host} failed TLS verification: {reason}")]
    UpstreamTls {
        /// The host the client asked for.
        host: String,
        /// What went wrong.
        reason: String,
    },
    /// Connect or response timeout.
    #[error("host {host} timed out ({stage})")]
    Timeout {
        /// The host the client asked for.
        host: String,
        /// "connect" or "response".
        stage: &'static str,
    },
    /// Something inside the proxy failed (e.g. minting a certificate).
    #[error("internal proxy error: {0}")]
    Internal(String),
    /// Over `limits.max_connections`.
    #[error("the proxy is at its connection limit")]
    Overloaded,
    /// Shutting down.
    #[error("the proxy is shutting down")]
    Draining,
    /// A minted credential (spec §10) cannot be obtained and no valid cached token is left.
    /// `why` never holds a secret nor anything from a token endpoint's body.
    #[error("credential {name} is unavailable: {why}")]
    CredentialUnavailable {
        /// The credential's name.
        name: String,
        /// Why minting failed (a status code, a fixed reason).
        why: String,
    },
    /// A step that needs the request body whole (spec §10's SigV4 payload hash) found it larger
    /// than it reads.
    #[error("the request body is larger than {limit_bytes} bytes, the most read for {purpose}")]
    BodyTooLarge {
        /// The limit.
        limit_bytes: usize,
        /// What the body was read for.
        purpose: &'static str,
    },
    /// A minted credential's claim template needs a claim the client does not have.
    #[error("{0}")]
    MissingClaim(crate::credentials::MissingClaim),
    /// The request already went through this proxy.
    #[error("request loop detected: the request already passed through portcullis")]
    Loop,
    /// Clients are configured and this request did not identify as one.
    #[error("{0}")]
    ProxyAuthRequired(String),
    /// An intercepted request names another host than its tunnel.
    #[error("host {inner} does not match the tunnel's host {tunnel}")]
    Misdirected {
        /// Host / :authority of the inner request.
        inner: String,
        /// The CONNECT target.
        tunnel: String,
    },
}

/// How the proxy answers and accounts for one kind of failure: the one table of spec §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// The HTTP status.
    pub status: StatusCode,
    /// The RFC 9209 error type for `Proxy-Status`.
    pub proxy_status: &'static str,
    /// A short machine-friendly reason: the audit `reason` and the denial metric label.
    pub reason: &'static str,
    /// A refusal (audited `deny`, counted in `portcullis_denials_total`), as opposed to a failure
    /// after the request was allowed (audited `allow` with an `error`).
    pub denial: bool,
    /// The `portcullis_upstream_errors_total` kind, for failures reaching an upstream.
    pub upstream: Option<&'static str>,
}

/// Every `reason` label `portcullis_denials_total` can carry: the reason of each refusal in the
/// table ([`Class::denial`]), policy denials ([`Denial::code`]) included, and `overloaded`, which
/// the listener counts for a connection refused at the limit before any request is read. The
/// metric exports each at 0 from the start (spec §8), so `increase()` and alerts see the first
/// denial; the tests hold this list to the table in both directions.
pub const DENIAL_REASONS: [&str; 13] = [
    "bad_request",
    "origin_form",
    "method_not_allowed",
    "no_rule",
    "port_not_allowed",
    "path_not_allowed",
    "plaintext_credential",
    "destination_prohibited",
    "misdirected",
    "proxy_auth_required",
    "missing_claim",
    "loop",
    "overloaded",
];

/// Every `kind` label of `portcullis_upstream_errors_total` ([`Class::upstream`]), exported at 0
/// from the start like [`DENIAL_REASONS`]; the tests hold it to the table.
pub const UPSTREAM_KINDS: [&str; 5] = ["dns", "connect", "tls", "timeout", "reset"];

const REQUEST_ERROR: &str = "http_request_error";
const REQUEST_DENIED: &str = "http_request_denied";
const UNAVAILABLE: &str = "destination_unavailable";
const INTERNAL: &str = "proxy_internal_error";

impl ProxyError {
    /// This error's row of the table: status, `Proxy-Status` error, reason, accounting.
    pub fn class(&self) -> Class {
        use StatusCode as S;
        let (status, proxy_status, reason, denial, upstream) = match self {
            Self::BadRequest(_) => (S::BAD_REQUEST, REQUEST_ERROR, "bad_request", true, None),
            Self::OriginForm => (S::BAD_REQUEST, REQUEST_ERROR, "origin_form", true, None),
            Self::MethodNotAllowed(_) => (
                S::METHOD_NOT_ALLOWED,
                REQUEST_DENIED,
                "method_not_allowed",
                true,
                None,
            ),
            Self::Denied(d) => (S::FORBIDDEN, REQUEST_DENIED, d.code(), true, None),
            Self::Prohibited { .. } => (
                S::FORBIDDEN,
                "destination_ip_prohibited",
                "destination_prohibited",
                true,
                None,
            ),
            Self::Misdirected { .. } => (
                S::MISDIRECTED_REQUEST,
                REQUEST_DENIED,
                "misdirected",
                true,
                None,
            ),
            Self::ProxyAuthRequired(_) => (
                S::PROXY_AUTHENTICATION_REQUIRED,
                REQUEST_DENIED,
                "proxy_auth_required",
                true,
                None,
            ),
            Self::MissingClaim(_) => (S::FORBIDDEN, REQUEST_DENIED, "missing_claim", true, None),
            Self::Loop => (S::LOOP_DETECTED, "proxy_loop_detected", "loop", true, None),
            Self::Dns { .. } => (S::BAD_GATEWAY, "dns_error", "dns_error", false, Some("dns")),
            Self::Unavailable { .. } => (
                S::BAD_GATEWAY,
                UNAVAILABLE,
                "destination_unavailable",
                false,
                Some("connect"),
            ),
            Self::UpstreamReset { .. } => (
                S::BAD_GATEWAY,
                UNAVAILABLE,
                "destination_unavailable",
                false,
                Some("reset"),
            ),
            Self::UpstreamTls { .. } => (
                S::BAD_GATEWAY,
                "tls_certificate_error",
                "upstream_tls",
                false,
                Some("tls"),
            ),
            Self::Timeout { .. } => (
                S::GATEWAY_TIMEOUT,
                "connection_timeout",
                "timeout",
                false,
                Some("timeout"),
            ),
            Self::BodyTooLarge { .. } => (
                S::PAYLOAD_TOO_LARGE,
                REQUEST_ERROR,
                "body_too_large",
                false,
                None,
            ),
            Self::Internal(_) => (S::INTERNAL_SERVER_ERROR, INTERNAL, "internal", false, None),
            Self::Overloaded => (S::SERVICE_UNAVAILABLE, INTERNAL, "overloaded", false, None),
            Self::Draining => (S::SERVICE_UNAVAILABLE, INTERNAL, "draining", false, None),
            Self::CredentialUnavailable { .. } => (
                S::SERVICE_UNAVAILABLE,
                INTERNAL,
                "credential_unavailable",
                false,
                None,
            ),
        };
        Class {
            status,
            proxy_status,
            reason,
            denial,
            upstream,
        }
    }

    /// The HTTP status spec §6 assigns.
    pub fn status(&self) -> StatusCode {
        self.class().status
    }

    /// Builds the response the client sees.
    pub fn to_response(&self) -> Response<Body> {
        let details = self.to_string();
        let class = self.class();
        let mut response = Response::new(body::full(Bytes::from(format!("{details}\n"))));
        *response.status_mut() = class.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(
            "proxy-status",
            proxy_status_value(class.proxy_status, &details),
        );
        if matches!(self, Self::ProxyAuthRequired(_)) {
            headers.insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"portcullis\""),
            );
        }
        if matches!(self, Self::Overloaded | Self::Draining) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// Maps a resolution / dial failure for `host` to its response class.
    pub fn from_dial(host: &str, err: &DialError) -> Self {
        let host = host.to_owned();
        match err {
            DialError::Resolve(source) => Self::Dns {
                host,
                source: source.clone(),
            },
            DialError::Prohibited { addr, why } => Self::Prohibited {
                host,
                addr: *addr,
                why: *why,
            },
            DialError::Timeout => Self::Timeout {
                host,
                stage: "connect",
            },
            DialError::Connect { addr, source } => Self::Unavailable {
                host,
                reason: connect_reason(*addr, source),
            },
        }
    }
}

fn connect_reason(addr: SocketAddr, err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::ConnectionRefused => format!("connection refused by {addr}"),
        std::io::ErrorKind::ConnectionReset => format!("connection reset by {addr}"),
        _ => format!("cannot connect to {addr}: {err}"),
    }
}

/// Formats `portcullis; error=<type>; details="<text>"` with the details as a valid sf-string.
pub fn proxy_status_value(error: &str, details: &str) -> HeaderValue {
    let escaped: String = details
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            _ => vec![c],
        })
        .collect();
    let value = format!("portcullis; error={error}; details=\"{escaped}\"");
    HeaderValue::from_str(&value)
        .unwrap_or_else(|_| HeaderValue::from_static("portcullis; error=proxy_internal_error"))
}

/// A complete HTTP/1.1 response written straight to a socket that hyper never saw (used when
/// refusing a connection before serving it: over the connection limit, or draining).
pub fn raw_refusal(err: &ProxyError) -> Vec<u8> {
    let details = err.to_string();
    let class = err.class();
    let status = class.status;
    let body = format!("{details}\n");
    let proxy_status = proxy_status_value(class.proxy_status, &details);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\nproxy-status: ",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(proxy_status.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_status_escapes_quotes_and_drops_controls() {
        let v = proxy_status_value("http_request_denied", "a \"b\" \\ c\r\nd");
        assert_eq!(
            v.to_str().unwrap(),
            r#"portcullis; error=http_request_denied; details="a \"b\" \\ cd""#
        );
    }

    #[test]
    fn every_error_maps_to_spec_status() {
        let cases: Vec<(ProxyError, u16, &str)> = vec![
            (ProxyError::OriginForm, 400, "http_request_error"),
            (
                ProxyError::MethodNotAllowed("TRACE".into()),
                405,
                "http_request_denied",
            ),
            (ProxyError::Loop, 508, "proxy_loop_detected"),
            (ProxyError::Overloaded, 503, "proxy_internal_error"),
            (
                ProxyError::Timeout {
                    host: "h".into(),
                    stage: "connect",
                },
                504,
                "connection_timeout",
            ),
            (
                ProxyError::Misdirected {
                    inner: "a".into(),
                    tunnel: "b".into(),
                },
                421,
                "http_request_denied",
            ),
        ];
        for (err, status, kind) in cases {
            assert_eq!(err.class().status.as_u16(), status, "{err}");
            assert_eq!(err.class().proxy_status, kind, "{err}");
        }
    }

    /// One error of every variant, every policy denial among them. The exhaustive matches make a
    /// new variant a compile error here until it has a sample, so the label lists below cannot
    /// silently miss its reason.
    fn samples() -> Vec<ProxyError> {
        let host = || "h.test".to_owned();
        let denials = [
            Denial::NoRule { host: host() },
            Denial::Port {
                host: host(),
                port: 8080,
            },
            Denial::Method {
                host: host(),
                method: "POST".into(),
            },
            Denial::Path {
                host: host(),
                path: "/x".into(),
            },
            Denial::PlaintextCredential { host: host() },
        ];
        let mut covered = [false; 5];
        for d in &denials {
            covered[match d {
                Denial::NoRule { .. } => 0,
                Denial::Port { .. } => 1,
                Denial::Method { .. } => 2,
                Denial::Path { .. } => 3,
                Denial::PlaintextCredential { .. } => 4,
            }] = true;
        }
        assert!(covered.iter().all(|c| *c), "a Denial variant has no sample");
        let mut errors: Vec<ProxyError> = denials.into_iter().map(ProxyError::Denied).collect();
        errors.extend([
            ProxyError::BadRequest("x".into()),
            ProxyError::OriginForm,
            ProxyError::MethodNotAllowed("TRACE".into()),
            ProxyError::Prohibited {
                host: host(),
                addr: std::net::IpAddr::from([10, 0, 0, 1]),
                why: Prohibited::Private,
            },
            ProxyError::Dns {
                host: host(),
                source: ResolveError::NotFound,
            },
            ProxyError::Unavailable {
                host: host(),
                reason: "refused".into(),
            },
            ProxyError::UpstreamReset { host: host() },
            ProxyError::UpstreamTls {
                host: host(),
                reason: "bad".into(),
            },
            ProxyError::Timeout {
                host: host(),
                stage: "connect",
            },
            ProxyError::Internal("x".into()),
            ProxyError::Overloaded,
            ProxyError::Draining,
            ProxyError::CredentialUnavailable {
                name: "c".into(),
                why: "token endpoint answered 500".into(),
            },
            ProxyError::BodyTooLarge {
                limit_bytes: 10,
                purpose: "a hash",
            },
            ProxyError::MissingClaim(crate::credentials::MissingClaim {
                credential: "gh".into(),
                claim: "repository".into(),
            }),
            ProxyError::Loop,
            ProxyError::ProxyAuthRequired("x".into()),
            ProxyError::Misdirected {
                inner: "a".into(),
                tunnel: "b".into(),
            },
        ]);
        let mut covered = [false; 19];
        for e in &errors {
            covered[match e {
                ProxyError::BadRequest(_) => 0,
                ProxyError::OriginForm => 1,
                ProxyError::MethodNotAllowed(_) => 2,
                ProxyError::Denied(_) => 3,
                ProxyError::Prohibited { .. } => 4,
                ProxyError::Dns { .. } => 5,
                ProxyError::Unavailable { .. } => 6,
                ProxyError::UpstreamReset { .. } => 7,
                ProxyError::UpstreamTls { .. } => 8,
                ProxyError::Timeout { .. } => 9,
                ProxyError::Internal(_) => 10,
                ProxyError::Overloaded => 11,
                ProxyError::Draining => 12,
                ProxyError::Loop => 13,
                ProxyError::ProxyAuthRequired(_) => 14,
                ProxyError::Misdirected { .. } => 15,
                ProxyError::CredentialUnavailable { .. } => 16,
                ProxyError::BodyTooLarge { .. } => 17,
                ProxyError::MissingClaim(_) => 18,
            }] = true;
        }
        assert!(
            covered.iter().all(|c| *c),
            "a ProxyError variant has no sample"
        );
        errors
    }

    #[test]
    fn denial_reasons_are_exactly_the_reasons_of_refusals() {
        // What the denial metric is counted with: a refusal's reason (outcome), and the
        // listener's count of connections refused at the limit.
        let mut counted: Vec<&str> = samples()
            .iter()
            .map(ProxyError::class)
            .filter(|c| c.denial)
            .map(|c| c.reason)
            .collect();
        counted.push(ProxyError::Overloaded.class().reason);
        for reason in &counted {
            assert!(
                DENIAL_REASONS.contains(reason),
                "{reason} not in DENIAL_REASONS"
            );
        }
        for reason in DENIAL_REASONS {
            assert!(counted.contains(&reason), "{reason} is never counted");
        }
    }

    #[test]
    fn upstream_kinds_are_exactly_the_kinds_of_the_table() {
        let kinds: Vec<&str> = samples()
            .iter()
            .filter_map(|e| e.class().upstream)
            .collect();
        for kind in &kinds {
            assert!(
                UPSTREAM_KINDS.contains(kind),
                "{kind} not in UPSTREAM_KINDS"
            );
        }
        for kind in UPSTREAM_KINDS {
            assert!(kinds.contains(&kind), "{kind} is in no row of the table");
        }
    }

    #[test]
    fn raw_refusal_is_a_parseable_response() {
        let raw = String::from_utf8(raw_refusal(&ProxyError::Overloaded)).unwrap();
        assert!(raw.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(raw.contains("proxy-status: portcullis; error=proxy_internal_error"));
        assert!(raw.ends_with("the proxy is at its connection limit\n"));
    }
}
