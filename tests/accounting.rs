//! Who is at fault: a client that hangs up in the middle of a response is audited as such, and
//! is not counted in `portcullis_upstream_errors_total` (which feeds the upstream-errors alert).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_client_hanging_up_mid_response_is_not_an_upstream_error() {
    let up = http_upstream().await;
    let port = up.port();
    let proxy = start_proxy(&format!(
        "[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"big.test\" = [\"127.0.0.1\"] }}\n[[hosts]]\nhost = \"big.test\"\nports = [{port}]\n"
    ))
    .await;
    let reset = r#"portcullis_upstream_errors_total{kind="reset"}"#;
    assert_eq!(proxy.metric(reset).await, Some(0.0));
    // 256 MiB asked for; the client reads a little and closes.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        format!(
            "GET http://big.test:{port}/stream/268435456 HTTP/1.1\r\nHost: big.test:{port}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(s);
    let events = proxy.audit_events(1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0]["error"], "the client went away before the response ended",
        "{:?}",
        events[0]
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        proxy.metric(reset).await,
        Some(0.0),
        "a client hang-up is not an upstream reset"
    );
}

/// A refused CONNECT moved no tunnel bytes: the proxy's 403 is neither in the event's
/// `bytes_received` nor in `portcullis_tunnel_bytes_total`.
#[tokio::test]
async fn a_refused_connect_moves_no_tunnel_bytes() {
    let proxy = start_proxy("[[hosts]]\nhost = \"allowed.test\"\n").await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let answer = exchange_raw(
        &mut s,
        b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 403);
    assert!(!answer.body.is_empty(), "the refusal has a body");
    let events = proxy.audit_events(1).await;
    assert_eq!(events[0]["kind"], "tunnel");
    assert_eq!(events[0]["bytes_received"], 0, "{:?}", events[0]);
    let metrics = proxy.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("portcullis_tunnel_bytes_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}
