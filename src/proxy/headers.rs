//! Header hygiene shared by every relayed request and response: hop-by-hop headers removed
//! (RFC 9110 §7.6.1, plus those `Connection` names), our `Via` added, loops (our own `Via`
//! coming back) and methods that are never relayed refused on sight.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, Version};

use crate::error::ProxyError;

/// Our `Via` received-by token. A request already carrying it has looped back to us.
pub const VIA_TOKEN: &str = "portcullis";
const VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 portcullis");

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

/// Headers that describe one hop (RFC 9110 §7.6.1) besides `Connection`, and the names that
/// `Connection` lists.
static HOP_BY_HOP: [HeaderName; 6] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// The proxy's own request header (spec §12): only the proxy says which client sent a request.
static PORTCULLIS_CLIENT: HeaderName = HeaderName::from_static("portcullis-client");

/// Removes hop-by-hop headers, including every header the `Connection` header lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present (usually none, or `Connection` alone):
    // a removal is a hash lookup, and this runs twice per request.
    let mut connection = false;
    let mut present = [false; 6];
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present[i] = true;
        }
    }
    if connection {
        strip_connection(headers);
    }
    for (hop, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, here)| *here) {
        headers.remove(hop);
    }
}

/// Removes `Connection` and every header it lists.
fn strip_connection(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONNECTION).iter();
    if let (Some(_), None) = (values.next(), values.next()) {
        // One value (the usual case): its names are removed by `&str`, which needs no
        // allocation.
        if let Some(value) = headers.remove(header::CONNECTION) {
            for name in value.to_str().unwrap_or_default().split(',') {
                headers.remove(name.trim());
            }
        }
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    headers.remove(header::CONNECTION);
}

/// What every relayed request gets: no hop-by-hop headers, our `Via`.
pub fn prepare_request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(&PORTCULLIS_CLIENT);
    headers.append(header::VIA, VIA_VALUE);
}

/// What every relayed response gets: no hop-by-hop headers, our `Via`.
pub fn prepare_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    // Proxy-Authenticate is for the client's proxy, i.e. us; an upstream's must not leak through.
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.append(header::VIA, VIA_VALUE);
}

/// While the proxy drains, an HTTP/1.x response tells its client that the connection closes
/// after it (h2 has no such header: its connection is closed with GOAWAY).
pub fn close_after<B>(response: &mut Response<B>, version: Version) {
    if version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
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
    fn names_in_several_connection_values_go_too_and_others_stay() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("X-One"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("x-two , Close"),
        );
        for name in ["x-one", "x-two", "close", "x-three", "server"] {
            h.insert(name, HeaderValue::from_static("v"));
        }
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-three", "server"]);

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::SERVER, HeaderValue::from_static("nginx"));
        prepare_response_headers(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["server", "via"]);
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
}
