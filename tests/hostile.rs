//! Hostile input (issue 11): what an attacker inside a pipeline sends to get past the proxy, and
//! what a hostile or careless upstream sends back. Real sockets, real TLS and real clients (curl,
//! reqwest, raw TCP for malformed HTTP no client library would send); all traffic on loopback,
//! except the network-namespace test, whose traffic stays inside the namespace it creates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BEARER: &str = "hostile-bearer-5e1b07";
const PASSWORD: &str = "hostile-basic-c3a9d1";
const API_KEY: &str = "hostile-header-77f0a2";

/// A 403 `destination_ip_prohibited` naming `why`.
fn assert_prohibited(r: &RawResponse, what: &str, why: &str) {
    assert_eq!(r.status, 403, "{what}: {r:?}");
    let ps = r.proxy_status();
    assert!(
        ps.starts_with("portcullis; error=destination_ip_prohibited"),
        "{what}: {ps}"
    );
    assert!(ps.contains(why), "{what}: {ps}");
}

/// A 400: from the proxy (then `Proxy-Status` says `http_request_error`) or, for what the HTTP
/// parser refuses before the proxy sees a request, a bare 400 from hyper.
fn assert_bad_request(r: &RawResponse, what: &str) {
    assert_eq!(r.status, 400, "{what}: {r:?}");
    let ps = r.proxy_status();
    assert!(
        ps.is_empty() || ps.starts_with("portcullis; error=http_request_error"),
        "{what}: {ps}"
    );
}

/// A 400 the proxy itself made (`Proxy-Status: …http_request_error`, its details containing
/// `details`).
fn assert_proxy_400(r: &RawResponse, what: &str, details: &str) {
    assert_eq!(r.status, 400, "{what}: {r:?}");
    let ps = r.proxy_status();
    assert!(
        ps.starts_with("portcullis; error=http_request_error"),
        "{what}: {ps}"
    );
    assert!(ps.contains(details), "{what}: {ps}");
}

/// `GET TARGET HTTP/1.1` with `Host: HOST`, closing after the answer.
fn get(target: &str, host: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// `CONNECT AUTHORITY HTTP/1.1`.
fn connect(authority: &str) -> Vec<u8> {
    format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").into_bytes()
}

/// Proxy with a recording plain upstream `rec.test` (→ 127.0.0.1) whose rule allows `/ok/**`;
/// `evil.test` and `denied.test` resolve to 127.0.0.1 too but no rule names them.
async fn plain_setup() -> (TestProxy, Upstream) {
    let up = http_upstream().await;
    let port = up.port();
    let proxy = start_proxy(&format!(
        r#"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "rec.test" = ["127.0.0.1"], "evil.test" = ["127.0.0.1"], "denied.test" = ["127.0.0.1"] }}

[[hosts]]
host = "rec.test"
ports = [{port}]
paths = ["/ok/**"]
"#
    ))
    .await;
    (proxy, up)
}

/// Proxy intercepting `secure.test` (a TLS upstream, → 127.0.0.1) under `rule` (TOML lines added
/// to its `[[hosts]]` entry). Returns the proxy, the upstream and the path of the proxy's CA
/// certificate.
async fn intercept_setup(rule: &str) -> (TestProxy, Upstream, std::path::PathBuf) {
    let up = tls_upstream(&["secure.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    up.write_ca(dir.path(), "upstream-ca.pem");
    let port = up.port();
    let proxy = start_proxy_in(
        dir,
        &format!(
            r#"
[tls]
extra_upstream_ca = ["upstream-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "secure.test" = ["127.0.0.1"] }}
[[hosts]]
host = "secure.test"
ports = [{port}]
{rule}
"#
        ),
    )
    .await;
    let ca = proxy.dir.path().join("state/ca.pem");
    (proxy, up, ca)
}

/// The three credential kinds (`bearer`, `pair`, `key`), with literal secrets.
fn credentials() -> String {
    format!(
        r#"
[credentials.bearer]
bearer = {{ value = "{BEARER}" }}
[credentials.pair]
basic = {{ username = "svc", password = {{ value = "{PASSWORD}" }} }}
[credentials.key]
header = {{ name = "X-API-Key", value = {{ value = "{API_KEY}" }} }}
"#
    )
}

/// A TLS session to `host` through an intercepting CONNECT, trusting the proxy's CA.
async fn intercepted(
    proxy: &TestProxy,
    ca: &Path,
    host: &str,
    port: u16,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let stream = connect_through(proxy, &format!("{host}:{port}")).await;
    let roots = roots_from_pem(&std::fs::read_to_string(ca).unwrap());
    tls_connect(stream, roots, host).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Self-dial and identity change (spec §5)
// ---------------------------------------------------------------------------------------------

/// With every loopback address allowed (`allow_private`, or `allow_cidrs` covering everything),
/// the proxy still never dials its own listeners, nor an unspecified address in any spelling.
#[tokio::test]
async fn the_proxy_never_dials_itself_or_an_unspecified_address() {
    let up = http_upstream().await;
    let upp = up.port();
    for network in [
        "allow_private = true",
        "allow_cidrs = [\"0.0.0.0/0\", \"::/0\"]",
    ] {
        let (pp, ap, free) = (
            closed_port().await,
            closed_port().await,
            closed_port().await,
        );
        let proxy = start_proxy(&format!(
            r#"[listen]
proxy = "127.0.0.1:{pp}"
admin = "127.0.0.1:{ap}"
[network]
{network}
resolve = {{ "zero.test" = ["0.0.0.0"] }}
[[hosts]]
host = "0.0.0.0/0"
ports = [{pp}, {ap}, {free}, {upp}]
[[hosts]]
host = "::/0"
ports = [{pp}, {ap}, {free}]
[[hosts]]
host = "zero.test"
ports = [{pp}, {ap}]
"#
        ))
        .await;
        // Control: these settings do let loopback through, so the refusals below are for what
        // the destination is, not for being loopback.
        let ok = send_raw(
            proxy.addr,
            &get(
                &format!("http://127.0.0.1:{upp}/control"),
                &format!("127.0.0.1:{upp}"),
            ),
        )
        .await;
        assert_eq!(ok.status, 200, "{network}: {ok:?}");

        let unspecified = "unspecified address";
        let own = "the proxy's own listener";
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                get(
                    &format!("http://0.0.0.0:{ap}/metrics"),
                    &format!("0.0.0.0:{ap}"),
                ),
                unspecified,
            ),
            (connect(&format!("0.0.0.0:{pp}")), unspecified),
            // Not a listener port: refused for being unspecified at all.
            (connect(&format!("0.0.0.0:{free}")), unspecified),
            (connect(&format!("[::ffff:0.0.0.0]:{pp}")), unspecified),
            (connect(&format!("[::]:{free}")), unspecified),
            (
                get(
                    &format!("http://zero.test:{ap}/metrics"),
                    &format!("zero.test:{ap}"),
                ),
                unspecified,
            ),
            (connect(&format!("zero.test:{pp}")), unspecified),
            (connect(&format!("127.0.0.1:{pp}")), own),
            (connect(&format!("[::ffff:127.0.0.1]:{pp}")), own),
            (
                get(
                    &format!("http://127.0.0.1:{ap}/metrics"),
                    &format!("127.0.0.1:{ap}"),
                ),
                own,
            ),
            (
                get(
                    &format!("http://127.0.0.1:{pp}/"),
                    &format!("127.0.0.1:{pp}"),
                ),
                own,
            ),
        ];
        for (request, why) in &cases {
            let what = format!("{network}: {}", String::from_utf8_lossy(request));
            let r = send_raw(proxy.addr, request).await;
            assert_prohibited(&r, &what, why);
        }
        assert_eq!(
            proxy
                .metric("portcullis_denials_total{reason=\"destination_prohibited\"}")
                .await,
            Some(cases.len() as f64),
            "{network}"
        );
        proxy.stop().await;
    }
    assert_eq!(
        up.count(),
        2,
        "only the two control requests reached anything"
    );
}

const NETNS_ENV: &str = "PORTCULLIS_IN_NETNS";
const NETNS_TEST: &str = concat!(
    module_path!(),
    "::a_listener_on_every_address_is_never_a_destination_in_a_network_namespace"
);

/// A gateway listening on `0.0.0.0` in a network with a trusted client network: a request to the
/// gateway's own interface address on its listener port is refused (else the proxy would dial
/// itself from that address and be taken for the network client). Runs in a private network
/// namespace (`unshare -n`), so it may create interfaces; skipped where that is not permitted.
#[tokio::test]
async fn a_listener_on_every_address_is_never_a_destination_in_a_network_namespace() {
    if std::env::var_os(NETNS_ENV).is_some() {
        inside_network_namespace().await;
        println!("{}", netns::DONE);
        return;
    }
    netns::rerun_in_network_namespace(NETNS_TEST, NETNS_ENV, &[]).await;
}

/// `ip ARGS`: whether it succeeded, and its stderr.
fn try_ip(args: &[&str]) -> (bool, String) {
    let binary = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip");
    let out = std::process::Command::new(binary)
        .args(args)
        .output()
        .expect("iproute2's ip runs (tests/setup.sh installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    let (ok, stderr) = try_ip(args);
    assert!(ok, "ip {args:?}: {stderr}");
}

async fn inside_network_namespace() {
    ip(&["link", "set", "lo", "up"]);
    // The gateway's interface: a dummy one, or one end of a veth pair where the kernel has no
    // dummy driver (containers without modules).
    if !try_ip(&["link", "add", "gw0", "type", "dummy"]).0 {
        ip(&["link", "add", "gw0", "type", "veth", "peer", "name", "gw1"]);
        ip(&["link", "set", "gw1", "up"]);
    }
    ip(&["addr", "add", "10.200.0.1/24", "dev", "gw0"]);
    ip(&["link", "set", "gw0", "up"]);
    let gateway: IpAddr = "10.200.0.1".parse().unwrap();
    let up = http_upstream_on(gateway).await;
    let upp = up.port();
    // A free port for the listener on every address (the namespace is ours alone: no race).
    let pp = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = start_proxy(&format!(
        r#"[listen]
proxy = "0.0.0.0:{pp}"
admin = "127.0.0.1:0"
[network]
allow_cidrs = ["10.0.0.0/8"]
[credentials.gw]
bearer = {{ value = "{BEARER}" }}
[[clients]]
name = "tok"
token = {{ value = "tok-token" }}
[[clients]]
name = "net"
networks = ["10.0.0.0/8"]
[[hosts]]
host = "10.0.0.0/8"
ports = [{pp}, {upp}]
credential = "gw"
plaintext_credentials = true
"#
    ))
    .await;
    let auth = format!("Proxy-Authorization: {}\r\n", basic("tok", "tok-token"));
    let loopback: SocketAddr = format!("127.0.0.1:{pp}").parse().unwrap();
    let with_token = |request: String| {
        let (line, rest) = request.split_once("\r\n").unwrap();
        format!("{line}\r\n{auth}{rest}").into_bytes()
    };

    // Control: the token client reaches an upstream on the gateway's address, another port.
    let target = format!("http://10.200.0.1:{upp}/control");
    let r = send_raw(
        loopback,
        &with_token(String::from_utf8(get(&target, &format!("10.200.0.1:{upp}"))).unwrap()),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        up.last().header("authorization"),
        Some(format!("Bearer {BEARER}").as_str())
    );
    // Control: a connection from the gateway's own address is the trusted network client, no
    // token needed — what a self-dial would be taken for.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(gateway, 0)).unwrap();
    let mut from_gateway = socket.connect(SocketAddr::new(gateway, pp)).await.unwrap();
    let r = exchange_raw(
        &mut from_gateway,
        &get(&target, &format!("10.200.0.1:{upp}")),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let events = proxy.audit_events(2).await;
    assert_eq!(events[0]["client"], "tok", "{events:?}");
    assert_eq!(events[1]["client"], "net", "{events:?}");

    // The gateway's own address on its listener port: refused, by token and network clients.
    for request in [
        connect(&format!("10.200.0.1:{pp}")),
        get(
            &format!("http://10.200.0.1:{pp}/"),
            &format!("10.200.0.1:{pp}"),
        ),
    ] {
        let text = String::from_utf8(request.clone()).unwrap();
        let r = send_raw(loopback, &with_token(text.clone())).await;
        assert_prohibited(&r, &text, "the proxy's own listener");
        let r = send_raw(SocketAddr::new(gateway, pp), &request).await;
        assert_prohibited(&r, &format!("from the gateway: {text}"), "own listener");
    }
    assert_eq!(up.count(), 2, "only the controls reached the upstream");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Malformed chunked bodies
// ---------------------------------------------------------------------------------------------

/// Bodies whose chunked framing is broken, each after a valid request head.
fn malformed_chunked_bodies() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("bad chunk size", b"zz\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("negative chunk size", b"-5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("0x chunk size", b"0x5\r\nhello\r\n0\r\n\r\n".to_vec()),
        (
            "overflowing chunk size",
            b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "data longer than its size",
            b"5\r\nhello, world\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "missing CRLF after the data",
            b"5\r\nhello0\r\n\r\n".to_vec(),
        ),
        (
            "200 KB chunk extension",
            format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(200 * 1024)).into_bytes(),
        ),
        (
            "10,000 chunk extensions",
            format!("{}0\r\n\r\n", "1;e=1\r\nx\r\n".repeat(10_000)).into_bytes(),
        ),
        ("LF-only line endings", b"5\nhello\n0\n\n".to_vec()),
    ]
}

fn chunked_post(target: &str, host: &str, body: &[u8]) -> Vec<u8> {
    let mut request =
        format!("POST {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    request.extend_from_slice(body);
    request
}

/// What every malformed-body case must leave behind: no upstream error counted, and the service
/// alive.
async fn assert_no_upstream_errors(proxy: &TestProxy) {
    let metrics = proxy.metrics().await;
    for kind in ["dns", "connect", "tls", "timeout", "reset"] {
        assert_eq!(
            metric_value(
                &metrics,
                &format!("portcullis_upstream_errors_total{{kind=\"{kind}\"}}")
            ),
            Some(0.0),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn malformed_chunked_bodies_are_the_clients_400_on_the_plain_path() {
    let (proxy, up) = plain_setup().await;
    let port = up.port();
    let host = format!("rec.test:{port}");
    let target = format!("http://{host}/ok/upload");
    let cases = malformed_chunked_bodies();
    for (what, body) in &cases {
        let r = send_raw(proxy.addr, &chunked_post(&target, &host, body)).await;
        // The head is valid: the proxy itself answers, once the body fails on its way upstream.
        assert_proxy_400(&r, what, "malformed request body");
    }
    assert_no_upstream_errors(&proxy).await;
    assert_eq!(
        proxy
            .metric("portcullis_denials_total{reason=\"bad_request\"}")
            .await,
        Some(cases.len() as f64)
    );
    let events = proxy.audit_events(cases.len()).await;
    assert_eq!(events.len(), cases.len());
    for e in &events {
        assert_eq!(e["decision"], "deny", "{e}");
        assert_eq!(e["status"], 400, "{e}");
        assert!(
            e["reason"]
                .as_str()
                .unwrap()
                .contains("malformed request body"),
            "{e}"
        );
    }
    // Still serving, on the same upstream.
    let r = send_raw(
        proxy.addr,
        &chunked_post(&target, &host, b"5\r\nhello\r\n0\r\n\r\n"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.last().body_bytes, 5);
    let resp = proxied_client(&proxy.url())
        .get(format!("http://{host}/ok/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    proxy.stop().await;
}

/// A request refused for its malformed body is the client's error, and audited as such: the
/// upstream never answered it.
#[tokio::test]
async fn a_malformed_body_is_not_audited_as_an_early_upstream_answer() {
    let (proxy, up) = plain_setup().await;
    let host = format!("rec.test:{}", up.port());
    let target = format!("http://{host}/ok/upload");
    let r = send_raw(proxy.addr, &chunked_post(&target, &host, b"zz\r\n")).await;
    assert_proxy_400(&r, "bad chunk size", "malformed request body");
    let events = proxy.audit_events(1).await;
    assert_eq!(events[0]["decision"], "deny", "{}", events[0]);
    assert!(
        events[0]["error"].is_null(),
        "a client error is not an upstream's early answer: {}",
        events[0]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn malformed_chunked_bodies_are_the_clients_400_inside_an_intercepted_tunnel() {
    let (proxy, up, ca) = intercept_setup("intercept = \"always\"").await;
    let port = up.port();
    let host = format!("secure.test:{port}");
    for (what, body) in &malformed_chunked_bodies() {
        let mut tls = intercepted(&proxy, &ca, "secure.test", port).await;
        let r = exchange_raw(&mut tls, &chunked_post("/upload", &host, body)).await;
        assert_proxy_400(&r, what, "malformed request body");
    }
    assert_no_upstream_errors(&proxy).await;
    let mut tls = intercepted(&proxy, &ca, "secure.test", port).await;
    let r = exchange_raw(
        &mut tls,
        &chunked_post("/upload", &host, b"5\r\nhello\r\n0\r\n\r\n"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.last().body_bytes, 5);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Userinfo
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn targets_with_userinfo_are_refused() {
    let (proxy, up) = plain_setup().await;
    let port = up.port();
    for target in [
        format!("http://denied.test:1@rec.test:{port}/ok/x"),
        format!("http://user:pass@rec.test:{port}/ok/x"),
        format!("http://@rec.test:{port}/ok/x"),
    ] {
        let r = send_raw(proxy.addr, &get(&target, &format!("rec.test:{port}"))).await;
        assert_proxy_400(&r, &target, "userinfo");
    }
    for authority in [
        format!("user@rec.test:{port}"),
        format!("denied.test:1@rec.test:{port}"),
    ] {
        let r = send_raw(proxy.addr, &connect(&authority)).await;
        assert_bad_request(&r, &authority);
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    // The same host without userinfo is allowed.
    let r = send_raw(
        proxy.addr,
        &get(
            &format!("http://rec.test:{port}/ok/x"),
            &format!("rec.test:{port}"),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        up.last().header("host"),
        Some(format!("rec.test:{port}").as_str())
    );
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Paths judged in one form and sent in that form
// ---------------------------------------------------------------------------------------------

/// Paths whose meaning depends on the upstream's parser: refused by the proxy.
const AMBIGUOUS: [&str; 8] = [
    "/ok/..;/secret",
    "/ok/.;/secret",
    "/ok/..;x=1/secret",
    "/ok/%2e%2e;/secret",
    "/ok\\..\\secret",
    "/ok/%5c../secret",
    "/ok/%5C../secret",
    "/ok%2f..%2fsecret",
];

#[tokio::test]
async fn ambiguous_paths_are_refused_and_others_sent_as_judged_on_the_plain_path() {
    let (proxy, up) = plain_setup().await;
    let port = up.port();
    let host = format!("rec.test:{port}");
    for path in AMBIGUOUS {
        let r = send_raw(proxy.addr, &get(&format!("http://{host}{path}"), &host)).await;
        assert_proxy_400(&r, path, "the request path is ambiguous");
    }
    assert_eq!(up.count(), 0, "no ambiguous path reached the upstream");

    // Judged normalised, and sent exactly as judged.
    for (path, sent) in [
        ("/ok/a/../b", "/ok/b"),
        ("/ok/./c//d", "/ok/c/d"),
        ("/ok/%2e%2e/ok/e?q=1", "/ok/e?q=1"),
        ("/ok/plain", "/ok/plain"),
    ] {
        let r = send_raw(proxy.addr, &get(&format!("http://{host}{path}"), &host)).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(up.last().uri, sent, "{path}");
    }
    let allowed = up.count();
    for (path, judged) in [
        ("/ok/../secret", "/secret"),
        ("/ok/%2e%2e/secret", "/secret"),
        ("/ok/a/../../secret/x", "/secret/x"),
    ] {
        let r = send_raw(proxy.addr, &get(&format!("http://{host}{path}"), &host)).await;
        assert_eq!(r.status, 403, "{path}: {r:?}");
        assert!(
            r.proxy_status()
                .contains(&format!("path {judged} is not allowed")),
            "{path}: {}",
            r.proxy_status()
        );
    }
    assert_eq!(
        up.count(),
        allowed,
        "denied paths did not reach the upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn ambiguous_paths_are_refused_inside_an_intercepted_tunnel() {
    let (proxy, up, ca) = intercept_setup("paths = [\"/ok/**\"]\nintercept = \"always\"").await;
    let port = up.port();
    let base = format!("https://secure.test:{port}");
    let run = |version: &'static str, path: &'static str| {
        let (proxy_url, ca, url) = (proxy.url(), ca.clone(), format!("{base}{path}"));
        async move {
            curl(&[
                version,
                "--path-as-is",
                "-x",
                &proxy_url,
                "--cacert",
                ca.to_str().unwrap(),
                &url,
            ])
            .await
        }
    };
    for version in ["--http1.1", "--http2"] {
        for path in AMBIGUOUS {
            let out = run(version, path).await;
            assert_eq!(out.status, 400, "{version} {path}: {out:?}");
            assert!(
                out.body.contains("the request path is ambiguous"),
                "{version} {path}: {out:?}"
            );
        }
        assert_eq!(
            up.count(),
            0,
            "{version}: no ambiguous path reached the upstream"
        );
    }
    for version in ["--http1.1", "--http2"] {
        let out = run(version, "/ok/a/../b").await;
        assert_eq!(out.status, 200, "{version}: {out:?}");
        assert_eq!(up.last().uri, format!("{base}/ok/b"), "{version}");
        let before = up.count();
        let out = run(version, "/ok/../secret").await;
        assert_eq!(out.status, 403, "{version}: {out:?}");
        assert!(
            out.body.contains("path /secret is not allowed"),
            "{version}: {out:?}"
        );
        assert_eq!(up.count(), before);
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Echoing upstreams
// ---------------------------------------------------------------------------------------------

/// Rules for an echoing upstream: one path prefix per credential kind.
fn echo_rules(host: &str, port: u16, extra: &str) -> String {
    let mut rules = String::new();
    for (prefix, credential) in [("bearer", "bearer"), ("basic", "pair"), ("header", "key")] {
        rules.push_str(&format!(
            "[[hosts]]\nhost = \"{host}\"\nports = [{port}]\npaths = [\"/{prefix}/**\"]\ncredential = \"{credential}\"\n{extra}\n"
        ));
    }
    rules
}

/// What one credential kind's echo looks like: the header value the upstream receives (and
/// echoes), and for Basic the decoded `user:pass`; each as sent and as the client must see it.
struct Echo {
    kind: &'static str,
    sent: String,
    masked: String,
    decoded: String,
    decoded_masked: String,
}

fn echo_expectations() -> Vec<Echo> {
    let pair = basic("svc", PASSWORD);
    let encoded = pair.trim_start_matches("Basic ").to_owned();
    let stars = |s: &str| "*".repeat(s.len());
    vec![
        Echo {
            kind: "bearer",
            sent: format!("Bearer {BEARER}"),
            masked: format!("Bearer {}", stars(BEARER)),
            decoded: String::new(),
            decoded_masked: String::new(),
        },
        Echo {
            kind: "basic",
            sent: pair.clone(),
            masked: format!("Basic {}", stars(&encoded)),
            decoded: format!("svc:{PASSWORD}"),
            decoded_masked: format!("svc:{}", stars(PASSWORD)),
        },
        Echo {
            kind: "header",
            sent: API_KEY.to_owned(),
            masked: stars(API_KEY),
            decoded: String::new(),
            decoded_masked: String::new(),
        },
    ]
}

/// Fetches `/<kind>/echo-secret` for each credential kind with `client`: the upstream echoes the
/// injected secret in a header, a cookie and the body (split across reads); the client must see
/// `*` in its place, with every length (and `Content-Length`) unchanged.
async fn check_echoes(client: &reqwest::Client, base: &str, up: &Upstream) {
    let encoded = basic("svc", PASSWORD)
        .trim_start_matches("Basic ")
        .to_owned();
    for echo in echo_expectations() {
        let kind = echo.kind;
        let resp = client
            .get(format!("{base}/{kind}/echo-secret"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{kind}");
        // The upstream did receive the secret, so it did echo it.
        let header = if kind == "header" {
            "x-api-key"
        } else {
            "authorization"
        };
        assert_eq!(up.last().header(header), Some(echo.sent.as_str()), "{kind}");

        let headers = resp.headers().clone();
        assert_eq!(headers["x-echo"], echo.masked.as_str(), "{kind}");
        assert_eq!(
            headers["set-cookie"],
            format!("echo={}; Path=/", echo.masked.replace(' ', "_")).as_str(),
            "{kind}"
        );
        let declared: usize = headers
            .get("content-length")
            .map(|v| v.to_str().unwrap().parse().unwrap())
            .expect("content-length passed on");
        let body = resp.bytes().await.unwrap();
        let expected = format!("auth={};decoded={};end\n", echo.masked, echo.decoded_masked);
        assert_eq!(String::from_utf8_lossy(&body), expected, "{kind}");
        let unmasked = format!("auth={};decoded={};end\n", echo.sent, echo.decoded);
        assert_eq!(body.len(), unmasked.len(), "{kind}: lengths hold");
        assert_eq!(body.len(), declared, "{kind}: Content-Length still right");
        let everything = format!("{headers:?}{}", String::from_utf8_lossy(&body));
        for secret in [BEARER, PASSWORD, API_KEY, encoded.as_str()] {
            assert!(!everything.contains(secret), "{kind}: {secret} came back");
        }
    }
}

#[tokio::test]
async fn echoed_secrets_come_back_masked_through_interception() {
    let up = tls_upstream(&["secure.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    up.write_ca(dir.path(), "upstream-ca.pem");
    let port = up.port();
    let proxy = start_proxy_in(
        dir,
        &format!(
            "[tls]\nextra_upstream_ca = [\"upstream-ca.pem\"]\n[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"secure.test\" = [\"127.0.0.1\"] }}\n{}\n{}",
            credentials(),
            echo_rules("secure.test", port, "")
        ),
    )
    .await;
    let ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    // reqwest negotiates h2 with the proxy; the proxy h2 with the upstream.
    let client = proxied_tls_client(&proxy.url(), &ca);
    check_echoes(&client, &format!("https://secure.test:{port}"), &up).await;
    assert_eq!(up.last().version, "HTTP/2.0");
    // The audit records what the client got.
    let events = proxy.audit_events(3).await;
    let audit = serde_json::to_string(&events).unwrap();
    for secret in [BEARER, PASSWORD, API_KEY] {
        assert!(!audit.contains(secret), "{secret} in the audit: {audit}");
    }
    let masked = format!("\"x-echo\":\"Bearer {}\"", "*".repeat(BEARER.len()));
    assert!(audit.contains(&masked), "{audit}");
    proxy.stop().await;
}

#[tokio::test]
async fn echoed_secrets_come_back_masked_over_plain_http() {
    let up = http_upstream().await;
    let port = up.port();
    let proxy = start_proxy(&format!(
        "[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"rec.test\" = [\"127.0.0.1\"] }}\n{}\n{}",
        credentials(),
        echo_rules("rec.test", port, "plaintext_credentials = true")
    ))
    .await;
    let client = proxied_client(&proxy.url());
    check_echoes(&client, &format!("http://rec.test:{port}"), &up).await;
    assert_eq!(up.last().version, "HTTP/1.1");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Upstreams that answer before reading the body
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn intercepted_h2_posts_answered_early_all_complete() {
    const REQUESTS: usize = 100;
    const AT_ONCE: usize = 10;
    let (proxy, up, ca) = intercept_setup("intercept = \"always\"").await;
    let port = up.port();
    let body = proxy.dir.path().join("body.bin");
    std::fs::write(&body, vec![b'b'; 256 * 1024]).unwrap();
    let data = format!("@{}", body.display());
    let url = format!("https://secure.test:{port}/early");
    let (proxy_url, ca) = (proxy.url(), ca.to_str().unwrap().to_owned());
    let started = Instant::now();
    let outs: Vec<CurlOut> = futures_util::stream::iter(0..REQUESTS)
        .map(|_| {
            let (proxy_url, ca, data, url) = (&proxy_url, &ca, &data, &url);
            async move {
                curl(&[
                    "--http2",
                    "-x",
                    proxy_url,
                    "--cacert",
                    ca,
                    "--data-binary",
                    data,
                    url,
                ])
                .await
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    for out in &outs {
        assert_eq!(out.exit, 0, "{out:?}");
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.body, "early\n", "{out:?}");
    }
    eprintln!("{REQUESTS} early-answered POSTs in {:?}", started.elapsed());
    assert_eq!(up.count(), REQUESTS);
    assert!(up
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.version == "HTTP/2.0"));

    // Every request and its tunnel are audited; a request whose body was still on its way says so.
    let events = proxy.audit_events(2 * REQUESTS).await;
    let requests: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["kind"] == "request").collect();
    assert_eq!(requests.len(), REQUESTS);
    let mut early = 0;
    for e in &requests {
        assert_eq!(e["status"], 200, "{e}");
        assert_eq!(e["decision"], "allow", "{e}");
        match e["error"].as_str() {
            None => {}
            Some(error) => {
                assert!(
                    error.starts_with(
                        "the upstream answered before the whole request body was sent"
                    ),
                    "{e}"
                );
                assert!(e["bytes_sent"].as_u64().unwrap() < 256 * 1024, "{e}");
                early += 1;
            }
        }
    }
    eprintln!("{early} of {REQUESTS} audited as answered before their body was sent");
    assert!(early > 0, "no request was answered early: {requests:?}");
    assert_no_upstream_errors(&proxy).await;
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. The SNI check cannot be skipped
// ---------------------------------------------------------------------------------------------

/// A ClientHello naming `sni`, as a client's first flight.
fn client_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    assert_eq!(hello[0], 0x16, "a handshake record");
    hello
}

/// Reads from a tunnel until it closes; what came back.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the proxy closes the tunnel");
        match read {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_record_before_the_client_hello_closes_the_tunnel() {
    let sink = tcp_sink().await;
    let up = tls_upstream(&["secure.test"]).await;
    let proxy = start_proxy(&format!(
        r#"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "sink.test" = ["127.0.0.1"], "secure.test" = ["127.0.0.1"] }}
[[hosts]]
host = "sink.test"
ports = [{}]
[[hosts]]
host = "secure.test"
ports = [{}]
"#,
        sink.port(),
        up.port()
    ))
    .await;
    let ccs: &[u8] = &[0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
    let alert: &[u8] = &[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00];
    let hello = client_hello("evil.test");
    let target = format!("sink.test:{}", sink.port());

    // ChangeCipherSpec then a ClientHello for another host, in one write and in two.
    let mut flights: Vec<Vec<Vec<u8>>> = vec![
        vec![[ccs, &hello].concat()],
        vec![ccs.to_vec(), hello.clone()],
        vec![[alert, &hello].concat()],
    ];
    for (i, flight) in flights.drain(..).enumerate() {
        let mut s = connect_through(&proxy, &target).await;
        for (n, part) in flight.iter().enumerate() {
            if n > 0 {
                // Written apart, so the proxy reads the first record on its own. (The pause is
                // the attack's pacing, not synchronisation.)
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = s.write_all(part).await;
        }
        let back = until_closed(&mut s).await;
        assert!(back.is_empty(), "flight {i}: {back:?}");
    }
    // Not one byte reached the destination.
    assert_eq!(sink.bytes(), 0);
    let events = proxy.audit_events(3).await;
    assert_eq!(events.len(), 3, "{events:?}");
    for e in &events {
        assert_eq!(e["kind"], "tunnel", "{e}");
        assert_eq!(e["error"], "bad_client_hello", "{e}");
    }

    // A ClientHello for the CONNECT host, first, still works end to end.
    let stream = connect_through(&proxy, &format!("secure.test:{}", up.port())).await;
    let mut tls = tls_connect(stream, roots_for(&up), "secure.test")
        .await
        .expect("a proper ClientHello passes");
    tls.write_all(b"GET /through HTTP/1.1\r\nHost: secure.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut tls).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.last().uri, "/through");
    drop(tls);
    // And a ClientHello for another host alone is the known sni_mismatch.
    let mut s = connect_through(&proxy, &target).await;
    s.write_all(&hello).await.unwrap();
    assert!(until_closed(&mut s).await.is_empty());
    assert_eq!(sink.bytes(), 0);
    let events = proxy.audit_events(5).await;
    assert!(
        events.iter().any(|e| e["error"] == "sni_mismatch"),
        "{events:?}"
    );
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Categories from the attack report
// ---------------------------------------------------------------------------------------------

/// Request smuggling on the plain path: ambiguous framing is refused, or read one way only — the
/// upstream never sees a second, hidden request (here `GET /secret`, which policy denies).
#[tokio::test]
async fn smuggling_attempts_reach_the_upstream_as_one_request_or_not_at_all() {
    let (proxy, up) = plain_setup().await;
    let port = up.port();
    let host = format!("rec.test:{port}");
    let smuggled = format!("GET /secret HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let hidden = format!("0\r\n\r\n{smuggled}");
    let n = hidden.len();
    let head = format!("POST http://{host}/ok/a HTTP/1.1\r\nHost: {host}\r\n");
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            format!("{head}Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n\r\n{hidden}"),
        ),
        (
            "Transfer-Encoding and Content-Length",
            format!("{head}Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n\r\n{hidden}"),
        ),
        (
            "two different Content-Lengths",
            format!("{head}Content-Length: 5\r\nContent-Length: {n}\r\n\r\n{hidden}"),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!(
                "{head}Content-Length: {n}\r\nTransfer-Encoding: chunked, identity\r\n\r\n{hidden}"
            ),
        ),
        (
            "obs-fold hiding Transfer-Encoding",
            format!(
                "{head}Content-Length: {n}\r\nX-Fold: a\r\n Transfer-Encoding: chunked\r\n\r\n{hidden}"
            ),
        ),
        (
            "space before the colon",
            format!("{head}Content-Length: {n}\r\nTransfer-Encoding : chunked\r\n\r\n{hidden}"),
        ),
    ];
    for (what, attack) in &cases {
        let before = up.count();
        // A well-formed last request closes the connection, so reading to its end is bounded
        // whatever the proxy made of the attack.
        let probe = format!(
            "GET http://{host}/ok/probe HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let _ = s.write_all(format!("{attack}{probe}").as_bytes()).await;
        let responses = read_responses(&mut s).await;
        let first = responses
            .first()
            .unwrap_or_else(|| panic!("{what}: no answer"));
        let seen: Vec<Seen> = up.seen.lock().unwrap()[before..].to_vec();
        let attacks: Vec<&Seen> = seen.iter().filter(|s| s.uri == "/ok/a").collect();
        match first.status {
            400 => assert!(attacks.is_empty(), "{what}: {seen:?}"),
            200 => {
                // Read one way (chunked): one request, empty body, unambiguous framing upstream.
                assert_eq!(attacks.len(), 1, "{what}: {seen:?}");
                assert_eq!(attacks[0].body_bytes, 0, "{what}");
                assert!(
                    attacks[0].header("content-length").is_none()
                        || attacks[0].header("transfer-encoding").is_none(),
                    "{what}: {:?}",
                    attacks[0]
                );
            }
            other => panic!("{what}: status {other}: {first:?}"),
        }
        assert!(
            seen.iter().all(|s| !s.uri.contains("secret")),
            "{what}: smuggled request reached the upstream: {seen:?}"
        );
        // What follows on the connection is either cut (the framing was refused or ended the
        // connection) or judged as requests of their own: the hidden one is origin-form (400),
        // and the probe is served.
        for r in &responses[1..] {
            assert!(
                r.status == 400 || (r.status == 200 && r.body_text().contains("/ok/probe")),
                "{what}: {responses:?}"
            );
        }
    }
    assert!(up
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| !s.uri.contains("secret")));
    proxy.stop().await;
}

/// SSRF encodings of loopback and the metadata endpoint, with `allow_private = false` and rules
/// that let every spelling through policy: destination safety refuses them all (or the target
/// is not a host at all), and nothing is reached.
#[tokio::test]
async fn ssrf_encodings_never_reach_anything() {
    let up = http_upstream().await;
    let p = up.port();
    let proxy = start_proxy(&format!(
        r#"
[network]
allow_private = false
resolve = {{ "metadata.test" = ["169.254.169.254"], "mixed.test" = ["93.184.215.14", "127.0.0.1"] }}
[[hosts]]
host = "0.0.0.0/0"
ports = [{p}, 80]
[[hosts]]
host = "::/0"
ports = [{p}, 80]
[[hosts]]
host = "0x7f.1"
ports = [{p}]
[[hosts]]
host = "metadata.test"
ports = [{p}, 80]
[[hosts]]
host = "mixed.test"
ports = [{p}]
"#
    ))
    .await;
    // (target authority, expected: Some(why) = 403 prohibited for that reason, None = 400)
    let cases: Vec<(String, Option<&str>)> = vec![
        (format!("2130706433:{p}"), None),
        (format!("0x7f.1:{p}"), Some("loopback")),
        (format!("127.1:{p}"), None),
        (format!("0177.0.0.1:{p}"), None),
        (format!("[::ffff:7f00:1]:{p}"), Some("loopback")),
        (format!("[::127.0.0.1]:{p}"), Some("loopback")),
        (format!("[64:ff9b::7f00:1]:{p}"), Some("loopback")),
        (format!("[2002:7f00:1::]:{p}"), Some("loopback")),
        (format!("[::1]:{p}"), Some("loopback")),
        (format!("127.0.0.1:{p}"), Some("loopback")),
        (format!("metadata.test:{p}"), Some("cloud metadata")),
        ("169.254.169.254:80".to_owned(), Some("cloud metadata")),
        ("[fd00:ec2::254]:80".to_owned(), Some("cloud metadata")),
        (
            "[::ffff:169.254.169.254]:80".to_owned(),
            Some("cloud metadata"),
        ),
        // One prohibited address refuses the whole name.
        (format!("mixed.test:{p}"), Some("loopback")),
    ];
    for (authority, why) in &cases {
        for request in [
            get(&format!("http://{authority}/"), authority),
            connect(authority),
        ] {
            let what = String::from_utf8_lossy(&request).into_owned();
            let r = send_raw(proxy.addr, &request).await;
            match why {
                Some(why) => assert_prohibited(&r, &what, why),
                None => assert_bad_request(&r, &what),
            }
        }
    }
    assert_eq!(up.count(), 0, "nothing was reached");
    assert_no_upstream_errors(&proxy).await;
    proxy.stop().await;
}

const CANARY_BEARER: &str = "CANARY-hostile-bearer-9d31f0";
const CANARY_PASSWORD: &str = "CANARY-hostile-basic-44be2c";

/// The canary for hostile requests: a proxy process with debug logging and literal secrets gets
/// the requests of this file (echoes, broken framing, userinfo and ambiguous paths carrying the
/// secret, smuggling, TRACE); the secrets (and the Basic pair's base64) appear in no answer, no
/// audit event and no log line.
#[tokio::test]
async fn no_secret_reaches_any_output_of_hostile_requests() {
    let up = http_upstream().await;
    let port = up.port();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"
[audit]
output = "stdout"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "plain.test" = ["127.0.0.1"] }}
[credentials.bear]
bearer = {{ value = "{CANARY_BEARER}" }}
[credentials.pair]
basic = {{ username = "svc", password = {{ value = "{CANARY_PASSWORD}" }} }}
[[hosts]]
host = "plain.test"
ports = [{port}]
paths = ["/b/**"]
credential = "bear"
plaintext_credentials = true
[[hosts]]
host = "plain.test"
ports = [{port}]
paths = ["/p/**"]
credential = "pair"
plaintext_credentials = true
"#
    );
    let config_path = dir.path().join("hostile-canary.toml");
    std::fs::write(&config_path, config).unwrap();
    let running = spawn_binary(
        &["run", "-c", config_path.to_str().unwrap()],
        &[("RUST_LOG", "debug")],
        std::process::Stdio::piped(),
    );
    let addr: SocketAddr = running.proxy.trim_start_matches("http://").parse().unwrap();
    let host = format!("plain.test:{port}");
    let encoded = basic("svc", CANARY_PASSWORD)
        .trim_start_matches("Basic ")
        .to_owned();
    let mut requests: Vec<Vec<u8>> = Vec::new();
    for prefix in ["b", "p"] {
        // Echoed by the upstream: in a header, a cookie, the body (split across reads), and in
        // the JSON summary of the request's headers.
        requests.push(get(&format!("http://{host}/{prefix}/echo-secret"), &host));
        requests.push(get(&format!("http://{host}/{prefix}/summary"), &host));
        requests.push(chunked_post(
            &format!("http://{host}/{prefix}/x"),
            &host,
            b"zz\r\n",
        ));
        requests.push(get(
            &format!("http://{prefix}:{CANARY_PASSWORD}@{host}/{prefix}/x"),
            &host,
        ));
        requests.push(get(
            &format!("http://{host}/{prefix}/..;/{CANARY_BEARER}?token={CANARY_PASSWORD}"),
            &host,
        ));
        requests.push(get(
            &format!("http://{host}/{prefix}/{CANARY_BEARER}/../x?note={CANARY_PASSWORD}"),
            &host,
        ));
        requests.push(
            format!(
                "TRACE http://{host}/{prefix}/x HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {CANARY_BEARER}\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
        );
        requests.push(
            format!(
                "POST http://{host}/{prefix}/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nX-Note: {CANARY_PASSWORD}\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
        );
        requests.push(connect(&format!("svc:{CANARY_PASSWORD}@{host}")));
    }
    let secrets = [CANARY_BEARER, CANARY_PASSWORD, encoded.as_str()];
    let mut answers = String::new();
    for request in &requests {
        let r = send_raw(addr, request).await;
        assert!(r.status >= 200, "{r:?}");
        let answer = format!("{}{}", r.head, r.body_text());
        let sent = String::from_utf8_lossy(request);
        for secret in secrets {
            // The proxy's own answers never carry a secret; an upstream's answer may reflect only
            // what the client itself sent.
            let generated = !r.proxy_status().is_empty();
            assert!(
                !answer.contains(secret) || (!generated && sent.contains(secret)),
                "{secret} in the answer to {sent}: {answer}"
            );
        }
        answers.push_str(&answer);
    }
    // The credentials were injected: the echoes were real.
    let seen = up.seen.lock().unwrap().clone();
    let authorizations: Vec<&str> = seen
        .iter()
        .filter_map(|s| s.header("authorization"))
        .collect();
    assert!(
        authorizations.contains(&format!("Bearer {CANARY_BEARER}").as_str())
            && authorizations.contains(&format!("Basic {encoded}").as_str()),
        "{authorizations:?}"
    );
    assert!(answers.contains("auth=Bearer ****"), "{answers}");

    let Collected { stdout, stderr } = running.stop_and_collect();
    assert!(
        stdout.lines().count() >= requests.len(),
        "audit events on stdout: {stdout}"
    );
    for secret in secrets {
        assert!(!stdout.contains(secret), "{secret} in the audit: {stdout}");
        assert!(!stderr.contains(secret), "{secret} in the log: {stderr}");
    }
}

/// 300 connections that never send a byte are cut at the header deadline, while a normal request
/// is served meanwhile.
#[tokio::test]
async fn silent_connections_are_cut_at_the_header_deadline_while_others_are_served() {
    const SILENT: usize = 300;
    let up = http_upstream().await;
    let proxy = start_proxy(&format!(
        r#"
[limits]
header_read_timeout_seconds = 2
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "rec.test" = ["127.0.0.1"] }}
[[hosts]]
host = "rec.test"
ports = [{}]
"#,
        up.port()
    ))
    .await;
    let mut watchers = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let since = Instant::now();
        watchers.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            // Any completed read (EOF, an error answer, a reset) means the proxy ended it.
            let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
            (read.is_ok(), since.elapsed())
        }));
    }
    eventually(
        "every silent connection accepted",
        Duration::from_secs(5),
        || async { proxy.metric("portcullis_active_connections").await == Some(SILENT as f64) },
    )
    .await;
    // Served meanwhile: while every silent connection is still held.
    let r = proxied_client(&proxy.url())
        .get(format!("http://rec.test:{}/meanwhile", up.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.last().uri, "/meanwhile");
    let cut_early = watchers.iter().filter(|w| w.is_finished()).count();
    assert_eq!(cut_early, 0, "silent connections cut before the deadline");
    for watcher in watchers {
        let (closed, after) = watcher.await.unwrap();
        assert!(closed, "a silent connection was still open after {after:?}");
        assert!(
            after >= Duration::from_millis(1800) && after < Duration::from_secs(6),
            "cut after {after:?}, not at the 2 s header deadline"
        );
    }
    eventually(
        "every silent connection released",
        Duration::from_secs(5),
        || async { proxy.metric("portcullis_active_connections").await == Some(0.0) },
    )
    .await;
    proxy.stop().await;
}

/// Allow-list escapes: a CONNECT authority with an allowed host as userinfo, and an absolute-form
/// request whose `Host` header names another host than its URI.
#[tokio::test]
async fn allow_list_escapes_judge_and_send_the_uris_host() {
    let evil = tcp_sink().await;
    let (proxy, up) = plain_setup().await;
    let port = up.port();
    let e = evil.port();
    for authority in [
        format!("rec.test:{port}@evil.test:{e}"),
        format!("rec.test:443@evil.test:{e}"),
        format!("rec.test@evil.test:{e}"),
    ] {
        let r = send_raw(proxy.addr, &connect(&authority)).await;
        assert_bad_request(&r, &authority);
    }
    // The URI's host is judged and sent, whatever Host says.
    let r = send_raw(
        proxy.addr,
        &get(
            &format!("http://rec.test:{port}/ok/x"),
            &format!("evil.test:{e}"),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        up.last().header("host"),
        Some(format!("rec.test:{port}").as_str())
    );
    assert_eq!(up.last().headers["host"].len(), 1, "one Host header");
    let r = send_raw(
        proxy.addr,
        &get(
            &format!("http://evil.test:{e}/ok/x"),
            &format!("rec.test:{port}"),
        ),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.proxy_status()
            .contains("host evil.test is not on the allow-list"),
        "{}",
        r.proxy_status()
    );
    // Two Host headers: refused or the URI's host, never the second.
    let r = send_raw(
        proxy.addr,
        format!(
            "GET http://rec.test:{port}/ok/y HTTP/1.1\r\nHost: rec.test:{port}\r\nHost: evil.test:{e}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(r.status == 200 || r.status == 400, "{r:?}");
    assert!(up
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.headers["host"] == vec![format!("rec.test:{port}")]));
    assert_eq!(evil.accepted(), 0, "evil.test was never dialled");
    proxy.stop().await;
}
