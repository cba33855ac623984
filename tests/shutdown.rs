//! Shutdown over real sockets: tunnels still open when the grace period ends are cut, and their
//! audit events say so and keep the bytes they moved (counted on the client side, outside the
//! relay that is cut); work in flight within the grace period completes — h2 downloads inside
//! intercepted tunnels, and keep-alive connections, which close only between requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What `TunnelEnd::Shutdown` writes into the tunnel's audit event (src/proxy/tunnel.rs).
const CUT: &str = "cut at shutdown";

/// An upstream that echoes every byte back.
async fn echo_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// Sends `n` bytes (plain text, so not taken for a ClientHello) through the tunnel `s` and reads
/// them back.
async fn echo_through(s: &mut TcpStream, n: usize) {
    let data: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
    let mut back = vec![0u8; n];
    let (mut r, mut w) = s.split();
    let (wrote, read) = tokio::join!(
        w.write_all(&data),
        tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut back))
    );
    wrote.unwrap();
    read.expect("echo in time").unwrap();
    assert!(back == data, "the tunnel carries the bytes unchanged");
}

/// Reads from `s` until the peer closes or fails (a cut tunnel), for up to 10 s.
async fn expect_closed<S: AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the tunnel is closed once the proxy stopped"
    );
}

/// The one `tunnel` event among `events`.
fn tunnel_event(events: &[serde_json::Value]) -> &serde_json::Value {
    let tunnels: Vec<_> = events.iter().filter(|e| e["kind"] == "tunnel").collect();
    assert_eq!(tunnels.len(), 1, "one tunnel event: {events:?}");
    tunnels[0]
}

/// Begins shutdown, checks the proxy drains (not ready), and returns when it has stopped: its
/// audit events, and how long the stop took.
async fn shut_down(proxy: TestProxy) -> (Vec<serde_json::Value>, Duration) {
    let started = Instant::now();
    proxy.handle.shutdown();
    eventually("/readyz answers 503", Duration::from_secs(5), || async {
        proxy.readyz().await == 503
    })
    .await;
    let events = proxy.wait_stopped().await;
    (events, started.elapsed())
}

#[tokio::test]
async fn a_tunnel_cut_at_shutdown_keeps_its_byte_counts() {
    let port = echo_upstream().await;
    let proxy = start_proxy(&format!(
        "[limits]\nshutdown_grace_seconds = 1\n[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"echo.test\" = [\"127.0.0.1\"] }}\n[[hosts]]\nhost = \"echo.test\"\nports = [{port}]\n"
    ))
    .await;
    let mut s = connect_through(&proxy, &format!("echo.test:{port}")).await;
    echo_through(&mut s, 100_000).await;

    let started = Instant::now();
    proxy.handle.shutdown();
    eventually("/readyz answers 503", Duration::from_secs(5), || async {
        proxy.readyz().await == 503
    })
    .await;
    // Draining: the open tunnel still carries traffic until the grace period ends.
    echo_through(&mut s, 5_000).await;
    let events = proxy.wait_stopped().await;
    let stopped = started.elapsed();
    assert!(
        stopped >= Duration::from_millis(900),
        "the tunnel was given the grace period (1 s): stopped after {stopped:?}"
    );
    assert!(stopped < Duration::from_secs(10), "{stopped:?}");
    expect_closed(&mut s).await;

    let tunnel = tunnel_event(&events);
    assert_eq!(tunnel["host"], "echo.test", "{tunnel}");
    assert_eq!(tunnel["status"], 200, "{tunnel}");
    assert_eq!(tunnel["error"], CUT, "{tunnel}");
    // Exactly what the client sent and got back: the counts survive the cut.
    assert_eq!(tunnel["bytes_sent"], 105_000, "{tunnel}");
    assert_eq!(tunnel["bytes_received"], 105_000, "{tunnel}");
}

/// Writes `data` to `s` and flushes it (TLS: the records go out now).
async fn send<S: AsyncWrite + Unpin>(s: &mut S, data: &[u8]) {
    s.write_all(data).await.unwrap();
    s.flush().await.unwrap();
}

/// An intercepted tunnel opened by [`busy_intercepted_tunnel`], busy with a request in flight.
struct Busy {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    /// The client's address, as the tunnel's audit event names it (`peer`).
    peer: String,
    /// Plaintext bytes sent and received inside; TLS only adds to them on the wire.
    sent: usize,
    received: usize,
}

/// Opens an intercepted tunnel to `secure.test:port`, completes one HTTP/1.1 exchange inside,
/// then leaves a second request in flight: its body is announced but only partly sent, so the
/// connection inside is busy when shutdown begins and is cut when the grace period ends.
async fn busy_intercepted_tunnel(proxy: &TestProxy, port: u16, roots: &RootStore) -> Busy {
    let s = connect_through(proxy, &format!("secure.test:{port}")).await;
    let peer = s.local_addr().unwrap().to_string();
    let mut tls = tls_connect(s, roots.clone(), "secure.test")
        .await
        .expect("the client trusts the proxy's leaf");

    let first = format!("GET /stream/1000 HTTP/1.1\r\nHost: secure.test:{port}\r\n\r\n");
    send(&mut tls, first.as_bytes()).await;
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = vec![0u8; 1000];
    tls.read_exact(&mut body).await.unwrap();
    let mut sent = first.len();
    let mut received = head.len() + body.len();

    let second = format!(
        "POST /echo HTTP/1.1\r\nHost: secure.test:{port}\r\nContent-Length: 1000000\r\n\r\n"
    );
    send(&mut tls, second.as_bytes()).await;
    send(&mut tls, &[b'z'; 20_000]).await;
    sent += second.len() + 20_000;
    // The upstream answers at once and streams the body back as it arrives: once the echo is
    // here, the request is in flight through the proxy.
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    received += head.len();
    let mut echoed = 0;
    let mut buf = [0u8; 4096];
    while echoed < 20_000 {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert!(n > 0, "tunnel closed before the echo came back");
        // Chunk-size lines are hex digits and CRLF: only the payload is `z`.
        echoed += buf[..n].iter().filter(|&&b| b == b'z').count();
        received += n;
    }
    Busy {
        tls,
        peer,
        sent,
        received,
    }
}

type RootStore = std::sync::Arc<rustls::RootCertStore>;

/// A proxy intercepting `secure.test` (a TLS upstream) with a 1 s grace period, and `n` busy
/// intercepted tunnels through it. Shuts it down and returns, per tunnel, its audit event and the
/// plaintext bytes it moved, once the proxy stopped (after the grace period).
async fn cut_intercepted_tunnels(n: usize) -> Vec<(serde_json::Value, usize, usize)> {
    let up = tls_upstream(&["secure.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    up.write_ca(dir.path(), "upstream-ca.pem");
    let port = up.port();
    let proxy = start_proxy_in(
        dir,
        &format!(
            "[limits]\nshutdown_grace_seconds = 1\n[tls]\nextra_upstream_ca = [\"upstream-ca.pem\"]\n[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"secure.test\" = [\"127.0.0.1\"] }}\n[[hosts]]\nhost = \"secure.test\"\nports = [{port}]\nintercept = \"always\"\n"
        ),
    )
    .await;
    let proxy_ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    let roots = roots_from_pem(&proxy_ca);
    let mut tunnels = Vec::new();
    for _ in 0..n {
        tunnels.push(busy_intercepted_tunnel(&proxy, port, &roots).await);
    }
    assert_eq!(up.count(), 2 * n, "every request reached the upstream");

    let (events, stopped) = shut_down(proxy).await;
    assert!(
        stopped >= Duration::from_millis(900),
        "requests in flight were given the grace period (1 s): stopped after {stopped:?}"
    );
    assert!(stopped < Duration::from_secs(10), "{stopped:?}");
    let tunnel_events: Vec<_> = events.iter().filter(|e| e["kind"] == "tunnel").collect();
    assert_eq!(tunnel_events.len(), n, "one event per tunnel: {events:?}");
    let mut out = Vec::new();
    for mut busy in tunnels {
        expect_closed(&mut busy.tls).await;
        let event = tunnel_events
            .iter()
            .find(|e| e["peer"] == busy.peer.as_str())
            .unwrap_or_else(|| panic!("no tunnel event for {}: {events:?}", busy.peer));
        out.push(((*event).clone(), busy.sent, busy.received));
    }
    out
}

#[tokio::test]
async fn an_intercepted_tunnel_cut_at_shutdown_keeps_its_byte_counts() {
    let cut = cut_intercepted_tunnels(1).await;
    let (tunnel, sent, received) = &cut[0];
    assert_eq!(tunnel["host"], "secure.test", "{tunnel}");
    assert_eq!(tunnel["intercepted"], true, "{tunnel}");
    assert_eq!(tunnel["status"], 200, "{tunnel}");
    let (bytes_sent, bytes_received) = (
        tunnel["bytes_sent"].as_u64().unwrap(),
        tunnel["bytes_received"].as_u64().unwrap(),
    );
    assert!(
        bytes_sent >= *sent as u64,
        "bytes_sent {bytes_sent} < {sent} plaintext bytes sent: {tunnel}"
    );
    assert!(
        bytes_received >= *received as u64,
        "bytes_received {bytes_received} < {received} plaintext bytes received: {tunnel}"
    );
}

/// When the grace period ends, the tunnel task's `select!` between the intercepted connection and
/// `hard_stop` has both branches ready (`State::drive` inside `intercept::serve` also returns on
/// `hard_stop`); the hard stop must win, or about half of the cut tunnels would be logged with
/// `"error": null`. Eight tunnels make a regression fail all but ~1% of the time.
#[tokio::test]
async fn intercepted_tunnels_cut_at_shutdown_say_so() {
    let cut = cut_intercepted_tunnels(8).await;
    let wrong: Vec<_> = cut
        .iter()
        .map(|(tunnel, _, _)| &tunnel["error"])
        .filter(|error| *error != CUT)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} cut tunnels not logged as {CUT:?}: {wrong:?}",
        wrong.len(),
        cut.len()
    );
}

/// Eight `curl --http2` downloads, each through its own intercepted tunnel of the real binary and
/// slowed so that they are in flight when SIGTERM comes, all complete within the grace period:
/// every stream gets its whole body and curl exits 0 — no reset when the connection closes and
/// the process exits.
#[tokio::test]
async fn intercepted_h2_downloads_complete_across_sigterm() {
    const DOWNLOADS: usize = 8;
    const SIZE: u64 = 30_000_000;
    let up = tls_upstream(&["secure.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    up.write_ca(dir.path(), "upstream-ca.pem");
    let port = up.port();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[limits]\nshutdown_grace_seconds = 30\n[audit]\noutput = \"audit.log\"\n[tls]\nextra_upstream_ca = [\"upstream-ca.pem\"]\n[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"secure.test\" = [\"127.0.0.1\"] }}\n[[hosts]]\nhost = \"secure.test\"\nports = [{port}]\nintercept = \"always\"\n"
        ),
    )
    .unwrap();
    let mut running = spawn_binary(
        &["run", "-c", config.to_str().unwrap()],
        &[],
        std::process::Stdio::null(),
    );
    let ca = dir.path().join("state/ca.pem");
    let url = format!("https://secure.test:{port}/stream/{SIZE}");
    let downloads: Vec<_> = (0..DOWNLOADS)
        .map(|_| {
            let args = [
                "--http2".to_owned(),
                "--limit-rate".into(),
                "10M".into(),
                "-x".into(),
                running.proxy.clone(),
                "--cacert".into(),
                ca.to_str().unwrap().into(),
                "-o".into(),
                "/dev/null".into(),
                "-w".into(),
                "%{size_download} %{http_version}".into(),
                url.clone(),
            ];
            tokio::spawn(async move {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                curl(&refs).await
            })
        })
        .collect();
    let admin = running.admin.clone();
    eventually(
        "every download is under way",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                let text = reqwest::get(format!("{admin}/metrics"))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                metric_value(&text, "portcullis_active_tunnels") == Some(DOWNLOADS as f64)
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the behaviour under test: mid-download
    let pid = running.child.0.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    for download in downloads {
        let out = download.await.unwrap();
        assert_eq!(out.exit, 0, "curl failed across SIGTERM: {out:?}");
        assert!(
            out.body.starts_with(&format!("{SIZE} 2")),
            "the whole body over h2: {out:?}"
        );
    }
    assert_eq!(running.child.terminate(Duration::from_secs(30)), Some(0));
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let requests: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["kind"] == "request")
        .collect();
    assert_eq!(requests.len(), DOWNLOADS, "{audit}");
    for r in requests {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["bytes_received"], SIZE, "{r}");
        assert_eq!(r["error"], serde_json::Value::Null, "{r}");
    }
}

/// How one keep-alive client fared across shutdown.
#[derive(Debug, Default)]
struct KeepAlive {
    answered: usize,
    closed_after_last: usize,
    /// Requests written whose connection closed or reset with no response.
    lost: usize,
}

/// One raw HTTP/1.1 client: requests back to back on a keep-alive connection, reconnecting when
/// a response says `Connection: close`, until the proxy no longer accepts connections (or 30 s).
async fn keep_alive_client(proxy: std::net::SocketAddr, url: String) -> KeepAlive {
    let mut stats = KeepAlive::default();
    let request = format!("GET {url} HTTP/1.1\r\nHost: up.test\r\n\r\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    'connections: while Instant::now() < deadline {
        let Ok(mut s) = TcpStream::connect(proxy).await else {
            return stats; // the listener is closed: done
        };
        loop {
            if s.write_all(request.as_bytes()).await.is_err() {
                stats.lost += 1;
                continue 'connections;
            }
            let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s)).await;
            let Ok(head) = head else {
                stats.lost += 1;
                continue 'connections;
            };
            if !head.starts_with("HTTP/1.1 ") {
                stats.lost += 1;
                continue 'connections;
            }
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            if s.read_exact(&mut body).await.is_err() {
                stats.lost += 1;
                continue 'connections;
            }
            stats.answered += 1;
            if head.to_ascii_lowercase().contains("\r\nconnection: close") {
                stats.closed_after_last += 1;
                continue 'connections;
            }
        }
    }
    stats
}

/// Keep-alive load across shutdown: no request is lost in the close race. Connections keep
/// serving while the proxy drains, the last response on each says `Connection: close`, and a
/// connection is closed only between requests.
#[tokio::test]
async fn keep_alive_connections_close_only_between_requests() {
    const CLIENTS: usize = 16;
    let up = http_upstream().await;
    let port = up.port();
    let proxy = start_proxy(&format!(
        "[limits]\nshutdown_grace_seconds = 10\n[audit]\nlog_headers = false\n[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"up.test\" = [\"127.0.0.1\"] }}\n[[hosts]]\nhost = \"up.test\"\nports = [{port}]\n"
    ))
    .await;
    let url = format!("http://up.test:{port}/ka");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(keep_alive_client(proxy.addr, url.clone())))
        .collect();
    eventually("load is running", Duration::from_secs(10), || async {
        up.count() >= 500
    })
    .await;
    proxy.handle.shutdown();
    let mut total = KeepAlive::default();
    for client in clients {
        let stats = client.await.unwrap();
        total.answered += stats.answered;
        total.closed_after_last += stats.closed_after_last;
        total.lost += stats.lost;
    }
    proxy.wait_stopped().await;
    assert_eq!(total.lost, 0, "requests lost across shutdown: {total:?}");
    assert!(total.answered >= 500, "{total:?}");
    assert!(
        total.closed_after_last >= CLIENTS,
        "each connection's last response said Connection: close: {total:?}"
    );
}
