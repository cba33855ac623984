//! Plain HTTP forwarding: absolute-form requests (`GET http://host/path`) checked against policy,
//! cleaned of hop-by-hop headers, marked with `Via`, and relayed on a pooled keep-alive upstream
//! connection with both bodies streamed. Redirects are passed back, never followed.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;

use crate::body::{self, Body};
use crate::credentials::inject;
use crate::error::ProxyError;
use crate::policy::{self, Denial, Host, RequestFacts, Rule};
use crate::server::{ConnCtx, Snapshot};
use crate::telemetry::{Counted, Record};
use crate::upstream::{dial_error, tls_error, UpstreamAddr};

/// Our `Via` received-by token. A request already carrying it has looped back to us.
pub const VIA_TOKEN: &str = "portcullis";
const VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 portcullis");

/// Serves one non-CONNECT request arriving on the proxy listener, filling its audit record.
pub async fn handle(
    ctx: &ConnCtx,
    snap: &Snapshot,
    req: Request<Incoming>,
    record: &mut Record,
) -> Response<Body> {
    let (parts, incoming) = req.into_parts();
    let result = match admit(ctx, snap, &parts, record) {
        Ok(admitted) => relay(ctx, snap, parts, incoming, admitted, record).await,
        Err(err) => {
            body::discard(incoming).await;
            Err(err)
        }
    };
    result.unwrap_or_else(|err| {
        tracing::debug!(peer = %ctx.peer, error = %err, "request refused");
        record.fail(&ctx.state.telemetry, &err);
        err.to_response()
    })
}

/// A request policy let through: where it goes and the rule that allowed it (none when report
/// mode let a denied request through).
struct Admitted<'s> {
    target: Target,
    rule: Option<&'s Rule>,
}

/// A parsed absolute-form target.
struct Target {
    host: Host,
    port: u16,
    authority: String,
}

/// Refuses methods the proxy never relays, and loops.
pub fn precheck(method: &Method, headers: &HeaderMap) -> Result<(), ProxyError> {
    if matches!(method.as_str(), "TRACE" | "TRACK") {
        return Err(ProxyError::MethodNotAllowed(method.to_string()));
    }
    if is_loop(headers) {
        return Err(ProxyError::Loop);
    }
    Ok(())
}

fn target(uri: &Uri) -> Result<Target, ProxyError> {
    let Some(authority) = uri.authority() else {
        return Err(ProxyError::OriginForm);
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(ProxyError::BadRequest(
                "https:// targets must be reached through CONNECT (set HTTPS_PROXY)".into(),
            ))
        }
        _ => {
            return Err(ProxyError::BadRequest(
                "only http:// targets are forwarded".into(),
            ))
        }
    }
    let host = Host::parse(authority.host())
        .ok_or_else(|| ProxyError::BadRequest(format!("invalid host {:?}", authority.host())))?;
    Ok(Target {
        port: authority.port_u16().unwrap_or(80),
        authority: authority.as_str().to_owned(),
        host,
    })
}

/// Everything decided before any I/O: method, loop, target, policy.
fn admit<'s>(
    ctx: &ConnCtx,
    snap: &'s Snapshot,
    parts: &http::request::Parts,
    record: &mut Record,
) -> Result<Admitted<'s>, ProxyError> {
    if let Some(host) = parts.uri.host() {
        let port = parts.uri.port_u16().unwrap_or(80);
        record.target(Some("http"), host, port, Some(&parts.uri));
    }
    precheck(&parts.method, &parts.headers)?;
    let target = target(&parts.uri)?;
    let path = policy::normalize_path(parts.uri.path());
    let facts = RequestFacts {
        host: &target.host,
        port: target.port,
        method: Some(&parts.method),
        path: Some(&path),
        client: &ctx.client,
    };
    let rule = ctx.judge(snap, &facts, record)?;
    if let Some(rule) = rule {
        refuse_plaintext_credential(rule, &target.host)?;
    }
    Ok(Admitted { target, rule })
}

async fn relay(
    ctx: &ConnCtx,
    snap: &Snapshot,
    mut parts: http::request::Parts,
    incoming: Incoming,
    admitted: Admitted<'_>,
    record: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    let Admitted { target, rule } = admitted;
    prepare_request_headers(&mut parts.headers);
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&target.authority)
            .map_err(|_| ProxyError::BadRequest("invalid authority".into()))?,
    );
    apply_credential(ctx, snap, rule, &mut parts.headers, record);
    record.request_headers(&parts.headers);
    parts.version = http::Version::HTTP_11;
    let counted = Counted::new(incoming, record.request_bytes.clone());
    let upstream_req = Request::from_parts(parts, body::boxed(counted));
    let host = target.host.to_string();
    let timeout = snap.config.limits.idle_timeout;
    send(&snap.http, upstream_req, &host, timeout, record).await
}

/// Injects the rule's credential (overwriting any client-sent header of that name), counts it
/// and names it in the audit record.
pub fn apply_credential(
    ctx: &ConnCtx,
    snap: &Snapshot,
    rule: Option<&Rule>,
    headers: &mut HeaderMap,
    record: &mut Record,
) {
    let Some(cred) = rule
        .and_then(|r| r.credential.as_ref())
        .and_then(|c| snap.config.credentials.get(c))
    else {
        return;
    };
    inject(headers, cred);
    record.event.credential = Some(cred.name.clone());
    ctx.state
        .telemetry
        .metrics
        .credential_injections
        .with_label_values(&[&*cred.name])
        .inc();
}

/// A credential never travels over plain http unless the rule says it may.
fn refuse_plaintext_credential(rule: &Rule, host: &Host) -> Result<(), ProxyError> {
    if rule.credential.is_some() && !rule.plaintext_credentials {
        return Err(ProxyError::Denied(Denial::PlaintextCredential {
            host: host.to_string(),
        }));
    }
    Ok(())
}

/// Sends `req` upstream on `client` (plain or TLS) and prepares the response for the client;
/// the response head must arrive within `response_timeout`.
pub async fn send<C>(
    client: &hyper_util::client::legacy::Client<C, Body>,
    req: Request<Body>,
    host: &str,
    response_timeout: Duration,
    record: &mut Record,
) -> Result<Response<Body>, ProxyError>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let response = match tokio::time::timeout(response_timeout, client.request(req)).await {
        Err(_) => {
            return Err(ProxyError::Timeout {
                host: host.to_owned(),
                stage: "response",
            })
        }
        Ok(Err(err)) => return Err(upstream_failure(host, &err)),
        Ok(Ok(response)) => response,
    };
    let (mut parts, incoming) = response.into_parts();
    if let Some(UpstreamAddr(addr)) = parts.extensions.get::<UpstreamAddr>() {
        record.event.upstream_addr = Some(*addr);
    }
    prepare_response_headers(&mut parts.headers);
    Ok(Response::from_parts(parts, body::boxed(incoming)))
}

/// Classifies a client error: dial failures keep their class; anything after connecting is the
/// upstream dropping us.
pub fn upstream_failure(host: &str, err: &hyper_util::client::legacy::Error) -> ProxyError {
    if let Some(dial) = dial_error(err) {
        return ProxyError::from_dial(host, dial);
    }
    if let Some(tls) = tls_error(err) {
        return ProxyError::UpstreamTls {
            host: host.to_owned(),
            reason: tls.to_string(),
        };
    }
    if err.is_connect() {
        return ProxyError::Unavailable {
            host: host.to_owned(),
            reason: "cannot connect".to_owned(),
        };
    }
    ProxyError::UpstreamReset {
        host: host.to_owned(),
    }
}

/// Headers that describe one hop (RFC 9110 §7.6.1), plus those `Connection` names.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including every header the `Connection` header lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// What every relayed request gets: no hop-by-hop headers, our `Via`.
pub fn prepare_request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.append(header::VIA, VIA_VALUE);
}

/// What every relayed response gets: no hop-by-hop headers, our `Via`.
pub fn prepare_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    // Proxy-Authenticate is for the client's proxy, i.e. us; an upstream's must not leak through.
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.append(header::VIA, VIA_VALUE);
}

/// Whether any `Via` entry names us as received-by (`1.1 portcullis`, `HTTP/1.1 portcullis`).
pub fn is_loop(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|entry| {
            entry
                .split_whitespace()
                .nth(1)
                .is_some_and(|by| by.eq_ignore_ascii_case(VIA_TOKEN))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_named_ones_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic eDp5"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        prepare_request_headers(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["accept", "via"]);
        assert_eq!(h[header::VIA], "1.1 portcullis");
    }

    #[test]
    fn loops_are_recognised_by_received_by_token() {
        let mut h = HeaderMap::new();
        h.append(
            header::VIA,
            HeaderValue::from_static("1.0 fred, 1.1 example.com (Apache/1.1)"),
        );
        assert!(!is_loop(&h));
        h.append(
            header::VIA,
            HeaderValue::from_static("1.1 squid, 1.1 Portcullis"),
        );
        assert!(is_loop(&h));
        let mut h2 = HeaderMap::new();
        h2.insert(
            header::VIA,
            HeaderValue::from_static("1.1 proxy (portcullis)"),
        );
        assert!(!is_loop(&h2), "a comment is not the received-by token");
    }

    #[test]
    fn targets() {
        assert!(matches!(
            target(&"/".parse().unwrap()),
            Err(ProxyError::OriginForm)
        ));
        assert!(matches!(
            target(&"https://a.example/".parse().unwrap()),
            Err(ProxyError::BadRequest(_))
        ));
        let t = target(&"http://A.Example:8080/x".parse().unwrap()).unwrap();
        assert_eq!(t.host, Host::Name("a.example".into()));
        assert_eq!(t.port, 8080);
        let t = target(&"http://[::1]/".parse().unwrap()).unwrap();
        assert_eq!(t.port, 80);
        assert_eq!(t.host, Host::Ip("::1".parse().unwrap()));
    }
}
