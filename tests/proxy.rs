//! The core proxy over real sockets: plain forwarding, CONNECT tunnels, destination safety,
//! generated responses, limits and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Rules letting `up.test` (→ 127.0.0.1) through on `port`.
fn allow_up(port: u16) -> String {
    format!(
        r#"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "up.test" = ["127.0.0.1"], "secure.test" = ["127.0.0.1"], "other.test" = ["127.0.0.1"] }}

[[hosts]]
host = "up.test"
ports = [{port}]

[[hosts]]
host = "secure.test"
ports = [{port}]
"#
    )
}

#[tokio::test]
async fn plain_get_is_forwarded_with_hop_by_hop_removed_and_via_added() {
    let up = http_upstream().await;
    let proxy = start_proxy(&allow_up(up.port())).await;
    let client = proxied_client(&proxy.url());
    let resp = client
        .get(format!("http://up.test:{}/hello?x=1", up.port()))
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header("x-keep-me", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["via"], "1.1 portcullis");
    let _ = resp.text().await.unwrap();
    let seen = up.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/hello?x=1", "origin-form upstream");
    assert_eq!(
        seen.header("host"),
        Some(format!("up.test:{}", up.port()).as_str())
    );
    assert_eq!(seen.header("via"), Some("1.1 portcullis"));
    assert_eq!(seen.header("x-keep-me"), Some("2"));
    for gone in [
        "x-drop-me",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
    ] {
        assert!(seen.header(gone).is_none(), "{gone} must not be forwarded");
    }

    // The same through the curl binary.
    let out = curl(&[
        "-x",
        &proxy.url(),
        &format!("http://up.test:{}/curl", up.port()),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(out.body.contains("\"uri\":\"/curl\""), "{out:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn post_with_streamed_body_reaches_upstream_whole() {
    let up = http_upstream().await;
    let proxy = start_proxy(&allow_up(up.port())).await;
    let client = proxied_client(&proxy.url());
    const CHUNKS: usize = 80;
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let stream = futures_util::stream::iter(
        (0..CHUNKS).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let resp = client
        .post(format!("http://up.test:{}/count", up.port()))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), (CHUNKS * 64 * 1024).to_string());
    let seen = up.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(
        seen.header("transfer-encoding"),
        Some("chunked"),
        "streamed, not buffered"
    );

    // Echo: the body streams back too.
    let resp = client
        .post(format!("http://up.test:{}/echo", up.port()))
        .body("ping-pong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "ping-pong");
    proxy.stop().await;
}

#[tokio::test]
async fn denied_host_gets_403_with_proxy_status() {
    let up = http_upstream().await;
    let proxy = start_proxy(&allow_up(up.port())).await;
    let client = proxied_client(&proxy.url());
    let resp = client
        .get(format!("http://other.test:{}/", up.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(
        proxy_status(&resp),
        "portcullis; error=http_request_denied; details=\"host other.test is not on the allow-list\""
    );
    assert_eq!(
        resp.text().await.unwrap(),
        "host other.test is not on the allow-list\n"
    );
    assert_eq!(up.count(), 0, "nothing reached the upstream");

    // Port not in `ports`.
    let other_port = closed_port().await;
    let resp = client
        .get(format!("http://up.test:{other_port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(proxy_status(&resp).contains(&format!(
        "port {other_port} is not allowed for host up.test"
    )));
    let out = curl(&[
        "-x",
        &proxy.url(),
        &format!("https://up.test:{other_port}/"),
    ])
    .await;
    assert_eq!(out.connect_status, 403, "{out:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn connect_tunnel_to_allowed_tls_upstream_with_curl() {
    let up = tls_upstream(&["secure.test"]).await;
    let proxy = start_proxy(&allow_up(up.port())).await;
    let ca = up.write_ca(proxy.dir.path(), "upstream-ca.pem");
    let out = curl(&[
        "--http1.1",
        "-x",
        &proxy.url(),
        "--cacert",
        ca.to_str().unwrap(),
        &format!("https://secure.test:{}/through-tunnel", up.port()),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.connect_status, 200, "{out:?}");
    assert!(out.body.contains("\"uri\":\"/through-tunnel\""), "{out:?}");
    assert_eq!(up.last().version, "HTTP/1.1");
    // Tunneled, not intercepted: the upstream sees the client's own request, no Via.
    assert!(up.last().header("via").is_none());

    // HTTP/2 end to end through the tunnel.
    let out = curl(&[
        "--http2",
        "-x",
        &proxy.url(),
        "--cacert",
        ca.to_str().unwrap(),
        &format!("https://secure.test:{}/h2", up.port()),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(up.last().version, "HTTP/2.0");
    // Clean tunnels (curl closes its end, whether or not it half-closes first): no error.
    let events = proxy.audit_events(2).await;
    let tunnels: Vec<_> = events.iter().filter(|e| e["kind"] == "tunnel").collect();
    assert_eq!(tunnels.len(), 2, "{events:?}");
    for t in tunnels {
        assert!(t["error"].is_null(), "{t}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn connect_to_denied_host_is_403() {
    let up = tls_upstream(&["other.test"]).await;
    let proxy = start_proxy(&allow_up(up.port())).await;
    let out = curl(&[
        "-x",
        &proxy.url(),
        &format!("https://other.test:{}/", up.port()),
    ])
    .await;
    assert_eq!(out.connect_status, 403, "{out:?}");
    assert_eq!(up.count(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn loopback_destination_without_allow_cidrs_is_prohibited() {
    let up = http_upstream().await;
    let port = up.port();
    let proxy = start_proxy(&format!(
        r#"
[network]
resolve = {{ "up.test" = ["127.0.0.1"] }}
[[hosts]]
host = "up.test"
ports = [{port}]
[[hosts]]
host = "127.0.0.0/8"
ports = [{port}]
"#
    ))
    .await;
    let client = proxied_client(&proxy.url());
    for url in [
        format!("http://up.test:{port}/"),
        format!("http://127.0.0.1:{port}/"),
    ] {
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{url}");
        let ps = proxy_status(&resp);
        assert!(
            ps.starts_with("portcullis; error=destination_ip_prohibited"),
            "{ps}"
        );
        assert!(ps.contains("127.0.0.1") && ps.contains("loopback"), "{ps}");
    }
    let out = curl(&["-x", &proxy.url(), &format!("https://up.test:{port}/")]).await;
    assert_eq!(out.connect_status, 403, "{out:?}");
    assert_eq!(up.count(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn the_proxy_is_never_its_own_destination() {
    let port = closed_port().await;
    let proxy = start_proxy(&format!(
        r#"[listen]
proxy = "127.0.0.1:{port}"
admin = "127.0.0.1:0"
[network]
allow_cidrs = ["127.0.0.0/8"]
[[hosts]]
host = "127.0.0.0/8"
ports = [{port}]
"#
    ))
    .await;
    let resp = proxied_client(&proxy.url())
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let ps = proxy_status(&resp);
    assert!(
        ps.contains("destination_ip_prohibited") && ps.contains("own listener"),
        "{ps}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn sni_mismatch_closes_the_tunnel() {
    let up = tls_upstream(&["secure.test", "other.test"]).await;
    let proxy = start_proxy(&allow_up(up.port())).await;
    let roots = roots_for(&up);

    // Control: matching SNI completes a TLS handshake through the tunnel.
    let stream = connect_through(&proxy, &format!("secure.test:{}", up.port())).await;
    let control = tls_connect(stream, roots.clone(), "secure.test").await;
    assert!(control.is_ok(), "matching SNI must work");
    drop(control);

    // CONNECT to secure.test (allowed) but SNI other.test (not): closed before any byte moves.
    let stream = connect_through(&proxy, &format!("secure.test:{}", up.port())).await;
    let ok = tls_connect(stream, roots, "other.test").await;
    assert!(
        ok.is_err(),
        "a mismatched SNI must not complete a handshake"
    );
    assert_eq!(up.count(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_refused_is_502() {
    let port = closed_port().await;
    let proxy = start_proxy(&allow_up(port)).await;
    let client = proxied_client(&proxy.url());
    let resp = client
        .get(format!("http://up.test:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let ps = proxy_status(&resp);
    assert!(
        ps.starts_with("portcullis; error=destination_unavailable"),
        "{ps}"
    );
    assert!(ps.contains("connection refused"), "{ps}");
    let out = curl(&["-x", &proxy.url(), &format!("https://up.test:{port}/")]).await;
    assert_eq!(
        out.connect_status, 502,
        "CONNECT answers 502, not a dead tunnel: {out:?}"
    );

    // An unresolvable name is a dns_error.
    let proxy2 = start_proxy("[[hosts]]\nhost = \"does-not-exist.invalid\"\n").await;
    let resp = proxied_client(&proxy2.url())
        .get("http://does-not-exist.invalid/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert!(proxy_status(&resp).starts_with("portcullis; error=dns_error"));
    proxy2.stop().await;
    proxy.stop().await;
}

#[tokio::test]
async fn generated_responses_for_trace_origin_form_loop_and_redirects() {
    let up = http_upstream().await;
    let proxy = start_proxy(&allow_up(up.port())).await;
    let client = proxied_client(&proxy.url());
    let base = format!("http://up.test:{}", up.port());

    let resp = client
        .request(
            reqwest::Method::from_bytes(b"TRACE").unwrap(),
            format!("{base}/"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert!(proxy_status(&resp).contains("error=http_request_denied"));

    let resp = client
        .request(
            reqwest::Method::from_bytes(b"TRACK").unwrap(),
            format!("{base}/"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);

    let resp = client
        .get(format!("{base}/"))
        .header("via", "1.1 squid, 1.1 portcullis")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 508);
    assert!(proxy_status(&resp).contains("error=proxy_loop_detected"));

    // Origin-form to the proxy port: 400 with a hint.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(proxy_status(&resp).contains("error=http_request_error"));
    assert!(resp.text().await.unwrap().contains("forward proxy"));

    // Redirects are passed back, never followed.
    let resp = client.get(format!("{base}/redirect")).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "http://elsewhere.test/");
    assert_eq!(
        up.count(),
        1,
        "only the redirecting request reached upstream"
    );

    // A malformed request line gets 400 and the proxy keeps serving.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET http://up.test/ HTTP/1.1 garbage\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let resp = client.get(format!("{base}/after")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    proxy.stop().await;
}

#[tokio::test]
async fn slowloris_is_cut_off_while_others_are_served() {
    let up = http_upstream().await;
    let proxy = start_proxy(&format!(
        "[limits]\nheader_read_timeout_seconds = 1\n{}",
        allow_up(up.port())
    ))
    .await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(
        format!(
            "GET http://up.test:{}/ HTTP/1.1\r\nHost: up.test\r\n",
            up.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();

    // Others are served meanwhile.
    let client = proxied_client(&proxy.url());
    let resp = client
        .get(format!("http://up.test:{}/meanwhile", up.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Keep dribbling a header byte now and then: the deadline is for the whole head. (The sleep is
    // the slowloris pace under test, not synchronisation.)
    let mut closed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if slow.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        // A read that completes at all means the proxy ended the exchange (EOF, or an error
        // response before closing); a pending read means it is still waiting for us.
        if tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf))
            .await
            .is_ok()
        {
            closed = true;
            break;
        }
    }
    let elapsed = started.elapsed();
    assert!(closed, "slow client still connected after {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(4),
        "cut off after {elapsed:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn keep_alive_connections_idle_longer_than_the_header_deadline() {
    let up = http_upstream().await;
    let proxy = start_proxy(&format!(
        "[limits]\nheader_read_timeout_seconds = 1\nidle_timeout_seconds = 3\n{}",
        allow_up(up.port())
    ))
    .await;
    let request = format!(
        "GET http://up.test:{}/ka HTTP/1.1\r\nHost: up.test\r\n\r\n",
        up.port()
    );
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();

    // Idle past the header deadline (1 s) but within the idle timeout (3 s): still open. (The
    // sleep is the idleness under test, not synchronisation.)
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "second request on the same connection: {head}"
    );
    s.read_exact(&mut body).await.unwrap();

    // Idle past the idle timeout: closed.
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf))
        .await
        .expect("closed by the idle timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );

    // A connection that never sends a byte only gets the header deadline.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(6), silent.read(&mut buf))
        .await
        .expect("silent connection closed");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503() {
    let up = http_upstream().await;
    let proxy = start_proxy(&format!(
        "[limits]\nmax_connections = 2\n{}",
        allow_up(up.port())
    ))
    .await;
    let _a = TcpStream::connect(proxy.addr).await.unwrap();
    let _b = TcpStream::connect(proxy.addr).await.unwrap();
    // Both accepted (each holds a slot before the gauge counts it).
    eventually("2 active connections", Duration::from_secs(5), || async {
        proxy.metric("portcullis_active_connections").await == Some(2.0)
    })
    .await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let head = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.contains("proxy-status: portcullis; error=proxy_internal_error"),
        "{head}"
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("portcullis_denials_total{reason=\"overloaded\"} 1"),
        "{metrics}"
    );
    drop(_a);
    drop(_b);
    // Slots free again once those close.
    eventually(
        "0 active connections once the clients closed",
        Duration::from_secs(5),
        || async { proxy.metric("portcullis_active_connections").await == Some(0.0) },
    )
    .await;
    let client = proxied_client(&proxy.url());
    let r = client
        .get(format!("http://up.test:{}/", up.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "slots are released");
    proxy.stop().await;
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let up = tls_upstream(&["secure.test"]).await;
    let proxy = start_proxy(&format!(
        "[limits]\nidle_timeout_seconds = 1\n{}",
        allow_up(up.port())
    ))
    .await;
    let mut s = connect_through(&proxy, &format!("secure.test:{}", up.port())).await;
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_open_tunnels_finish() {
    let up = tls_upstream(&["secure.test"]).await;
    let proxy = start_proxy(&format!(
        "[limits]\nshutdown_grace_seconds = 10\n{}",
        allow_up(up.port())
    ))
    .await;
    let admin = format!("http://{}/readyz", proxy.admin);
    let direct = reqwest::Client::builder().no_proxy().build().unwrap();
    assert_eq!(direct.get(&admin).send().await.unwrap().status(), 200);

    let stream = connect_through(&proxy, &format!("secure.test:{}", up.port())).await;
    let mut tls = tls_connect(stream, roots_for(&up), "secure.test")
        .await
        .unwrap();

    let proxy_addr = proxy.addr;
    proxy.handle.shutdown();
    // Draining: not ready (the listener is closed before /readyz turns 503), no new connections.
    eventually("/readyz answers 503", Duration::from_secs(5), || async {
        proxy.readyz().await == 503
    })
    .await;
    assert!(
        TcpStream::connect(proxy_addr).await.is_err(),
        "listener closed"
    );

    // The open tunnel still works.
    tls.write_all(b"GET /in-flight HTTP/1.1\r\nHost: secure.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await.ok();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    drop(tls);
    // With the tunnel closed, the proxy stops well before the grace period ends.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(8), proxy.handle.wait())
        .await
        .expect("stops once in-flight work is done")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn server_first_protocols_and_quiet_clients_keep_their_tunnel() {
    // An SSH-like upstream that speaks first.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"SSH-2.0-banner\r\n").await;
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let proxy = start_proxy(&format!(
        "[limits]\nheader_read_timeout_seconds = 1\nidle_timeout_seconds = 10\n{}",
        allow_up(port)
    ))
    .await;
    let mut s = connect_through(&proxy, &format!("up.test:{port}")).await;
    let mut banner = [0u8; 16];
    s.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"SSH-2.0-banner\r\n");
    // Quiet for longer than the header deadline: the tunnel stays. (The sleep is the quiet period
    // under test, not synchronisation.)
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping");
    drop(s);
    proxy.stop().await;
}

#[tokio::test]
async fn connect_timeout_is_504() {
    // A listener that never accepts, its backlog filled: further SYNs go unanswered, so a
    // connect to it hangs — the loopback stand-in for an unreachable host.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let _listener = socket.listen(1).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let proxy = start_proxy(&format!(
        "[limits]\nconnect_timeout_seconds = 1\n{}",
        allow_up(port)
    ))
    .await;
    let started = Instant::now();
    let resp = proxied_client(&proxy.url())
        .get(format!("http://up.test:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(proxy_status(&resp).starts_with("portcullis; error=connection_timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let out = curl(&["-x", &proxy.url(), &format!("https://up.test:{port}/")]).await;
    assert_eq!(out.connect_status, 504, "{out:?}");
    proxy.stop().await;
}
