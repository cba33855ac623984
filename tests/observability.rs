//! Audit events, metrics and the admin listener, checked after real traffic: the audit file is
//! parsed as JSON lines, `/metrics` with a Prometheus text-format parser.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "obs-bearer-secret-42";

/// A proxy with a plain upstream `up.test`, a TLS upstream `secure.test` (intercepted, with a
/// bearer credential under /api/**, tunneled elsewhere by a second rule on another name).
struct World {
    proxy: TestProxy,
    refused: u16,
    plain: Upstream,
    tls: Upstream,
    ca: std::path::PathBuf,
}

async fn world() -> World {
    let plain = http_upstream().await;
    let tls = tls_upstream(&["secure.test", "tunnel.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    tls.write_ca(dir.path(), "upstream-ca.pem");
    let (p, t) = (plain.port(), tls.port());
    let refused = closed_port().await;
    let proxy = start_proxy_in(
        dir,
        &format!(
            r#"
[tls]
extra_upstream_ca = ["upstream-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "up.test" = ["127.0.0.1"], "down.test" = ["127.0.0.1"], "secure.test" = ["127.0.0.1"], "tunnel.test" = ["127.0.0.1"], "internal.test" = ["10.1.2.3"] }}
[credentials.gh]
bearer = {{ value = "{SECRET}" }}
[[hosts]]
host = "up.test"
ports = [{p}]
[[hosts]]
host = "internal.test"
ports = [{p}]
[[hosts]]
host = "down.test"
ports = [{refused}]
[[hosts]]
host = "secure.test"
ports = [{t}]
credential = "gh"
[[hosts]]
host = "tunnel.test"
ports = [{t}]
"#
        ),
    )
    .await;
    let ca = proxy.dir.path().join("state/ca.pem");
    World {
        proxy,
        refused,
        plain,
        tls,
        ca,
    }
}

fn find(events: &[Value], pred: impl Fn(&Value) -> bool) -> &Value {
    events
        .iter()
        .find(|e| pred(e))
        .unwrap_or_else(|| panic!("no such event in {events:#?}"))
}

#[tokio::test]
async fn audit_events_for_allowed_denied_intercepted_and_tunneled_traffic() {
    let w = world().await;
    let client = proxied_client(&w.proxy.url());
    let p = w.plain.port();

    // 1. An allowed plain request, with a secret-looking query parameter.
    let resp = client
        .post(format!("http://up.test:{p}/count?per_page=5&token=abc123"))
        .header("user-agent", "audit-test/1")
        .header("cookie", "session=xyz")
        .body("twelve bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    // 2. A denied host.
    let resp = client
        .get(format!("http://evil.test:{p}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // 3. A denied destination address.
    let resp = client
        .get(format!("http://internal.test:{p}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // 4. An intercepted request with an injected credential.
    let out = curl(&[
        "-x",
        &w.proxy.url(),
        "--cacert",
        w.ca.to_str().unwrap(),
        "-H",
        "Authorization: Bearer client-side",
        &format!(
            "https://secure.test:{}/api/repos?access_token=zzz",
            w.tls.port()
        ),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    // 5. A tunnel (CA of the upstream trusted by curl directly).
    let upstream_ca = w.proxy.dir.path().join("upstream-ca.pem");
    let out = curl(&[
        "-x",
        &w.proxy.url(),
        "--cacert",
        upstream_ca.to_str().unwrap(),
        &format!("https://tunnel.test:{}/through", w.tls.port()),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");

    // Intercepted: one request event plus one tunnel event for the CONNECT.
    let events = w.proxy.audit_events(6).await;
    assert!(events.len() >= 6, "{events:#?}");
    let raw = std::fs::read_to_string(w.proxy.dir.path().join("audit.log")).unwrap();
    assert!(
        !raw.contains(SECRET),
        "the credential value never reaches the audit log"
    );

    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "ids are unique");

    let plain = find(&events, |e| e["host"] == "up.test");
    assert_eq!(plain["kind"], "request");
    assert_eq!(plain["client"], "anonymous");
    assert!(plain["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(plain["method"], "POST");
    assert_eq!(plain["scheme"], "http");
    assert_eq!(plain["port"], p);
    assert_eq!(plain["path"], "/count");
    assert_eq!(plain["query"], "per_page=5&token=<HIDDEN>");
    assert_eq!(plain["decision"], "allow");
    assert_eq!(plain["reason"], Value::Null);
    assert_eq!(plain["rule"], "up.test");
    assert_eq!(plain["credential"], Value::Null);
    assert_eq!(plain["intercepted"], false);
    assert_eq!(plain["status"], 200);
    assert_eq!(plain["bytes_sent"], 12);
    assert_eq!(plain["bytes_received"], body.len());
    assert!(plain["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(plain["upstream_addr"], format!("127.0.0.1:{p}"));
    assert_eq!(plain["request_headers"]["user-agent"], "audit-test/1");
    assert_eq!(plain["request_headers"]["cookie"], "<HIDDEN>");
    assert_eq!(plain["request_headers"]["via"], "1.1 portcullis");
    assert!(plain["response_headers"]["content-length"].is_string());
    assert_eq!(plain["error"], Value::Null);
    let ts = plain["ts"].as_str().unwrap();
    assert!(
        ts.len() == 27 && ts.ends_with('Z') && &ts[10..11] == "T",
        "{ts}"
    );

    let denied = find(&events, |e| e["host"] == "evil.test");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["rule"], Value::Null);
    assert_eq!(denied["reason"], "host evil.test is not on the allow-list");
    assert_eq!(denied["upstream_addr"], Value::Null);

    let prohibited = find(&events, |e| e["host"] == "internal.test");
    assert_eq!(prohibited["decision"], "deny");
    assert_eq!(prohibited["status"], 403);
    assert!(
        prohibited["reason"].as_str().unwrap().contains("10.1.2.3"),
        "{prohibited}"
    );

    let inner = find(&events, |e| {
        e["host"] == "secure.test" && e["kind"] == "request"
    });
    assert_eq!(inner["intercepted"], true);
    assert_eq!(inner["scheme"], "https");
    assert_eq!(inner["credential"], "gh");
    assert_eq!(inner["rule"], "secure.test");
    assert_eq!(inner["path"], "/api/repos");
    assert_eq!(inner["query"], "access_token=<HIDDEN>");
    assert_eq!(inner["request_headers"]["authorization"], "<HIDDEN>");
    assert_eq!(
        inner["upstream_addr"],
        format!("127.0.0.1:{}", w.tls.port())
    );
    let connect = find(&events, |e| {
        e["host"] == "secure.test" && e["kind"] == "tunnel"
    });
    assert_eq!(connect["method"], "CONNECT");
    assert_eq!(connect["intercepted"], true);

    let tunnel = find(&events, |e| e["host"] == "tunnel.test");
    assert_eq!(tunnel["kind"], "tunnel");
    assert_eq!(tunnel["method"], "CONNECT");
    assert_eq!(tunnel["intercepted"], false);
    assert_eq!(tunnel["path"], Value::Null);
    assert_eq!(tunnel["request_headers"], Value::Null);
    assert_eq!(tunnel["status"], 200);
    assert!(
        tunnel["bytes_sent"].as_u64().unwrap() > 200,
        "ClientHello and request: {tunnel}"
    );
    assert!(
        tunnel["bytes_received"].as_u64().unwrap() > 500,
        "certificates and page: {tunnel}"
    );
    assert_eq!(
        tunnel["upstream_addr"],
        format!("127.0.0.1:{}", w.tls.port())
    );
    assert_eq!(tunnel["error"], Value::Null);
    w.proxy.stop().await;
}

/// Parses `/metrics` and returns the value of `name` with exactly these labels (0 when absent).
fn sample(metrics: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

#[tokio::test]
async fn metrics_move_with_known_traffic() {
    let w = world().await;
    let client = proxied_client(&w.proxy.url());
    let p = w.plain.port();
    for _ in 0..3 {
        let resp = client
            .get(format!("http://up.test:{p}/ok"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    for _ in 0..2 {
        let resp = client
            .get(format!("http://evil.test:{p}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
    }
    let ca = w.ca.to_str().unwrap().to_owned();
    for _ in 0..2 {
        let out = curl(&[
            "-x",
            &w.proxy.url(),
            "--cacert",
            &ca,
            &format!("https://secure.test:{}/api/x", w.tls.port()),
        ])
        .await;
        assert_eq!(out.status, 200, "{out:?}");
    }
    let resp = client
        .get(format!("http://down.test:{}/", w.refused))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    // Events (and their counters) are finished when each exchange ends.
    let _ = w.proxy.audit_events(8).await;
    let text = w.proxy.metrics().await;
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("metrics.txt"),
        &text,
    )
    .unwrap();
    assert!(!text.contains(SECRET));
    let m = parse_metrics(&text);
    let req = "portcullis_requests_total";
    assert_eq!(
        sample(
            &m,
            req,
            &[
                ("client", "anonymous"),
                ("rule", "up.test"),
                ("decision", "allow"),
                ("method", "GET"),
                ("code", "200")
            ]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &m,
            req,
            &[("rule", "none"), ("decision", "deny"), ("code", "403")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            req,
            &[
                ("rule", "secure.test"),
                ("decision", "allow"),
                ("code", "200")
            ]
        ),
        2.0
    );
    assert_eq!(
        sample(&m, "portcullis_denials_total", &[("reason", "no_rule")]),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "portcullis_credential_injections_total",
            &[("credential", "gh")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "portcullis_tunnels_total",
            &[("rule", "secure.test"), ("decision", "allow")]
        ),
        2.0
    );
    assert!(
        sample(
            &m,
            "portcullis_tunnel_bytes_total",
            &[("rule", "secure.test"), ("direction", "downstream")]
        ) > 0.0
    );
    assert_eq!(sample(&m, "portcullis_certificates_issued_total", &[]), 1.0);
    assert_eq!(
        sample(
            &m,
            "portcullis_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(sample(&m, "process_resident_memory_bytes", &[]) > 0.0);
    let count = m
        .samples
        .iter()
        .find(|s| {
            s.metric == "portcullis_request_duration_seconds_count"
                && s.labels.get("rule") == Some("up.test")
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        });
    // prometheus-parse folds histograms; fall back to the raw text.
    let count = count.unwrap_or_else(|| {
        text.lines()
            .find(|l| {
                l.starts_with("portcullis_request_duration_seconds_count")
                    && l.contains("rule=\"up.test\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    });
    assert_eq!(count, 3.0);

    assert_eq!(
        sample(
            &m,
            "portcullis_upstream_errors_total",
            &[("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            req,
            &[
                ("rule", "down.test"),
                ("decision", "allow"),
                ("code", "502")
            ]
        ),
        1.0
    );
    w.proxy.stop().await;
}

#[tokio::test]
async fn label_cardinality_stays_bounded_with_many_denied_hosts() {
    let w = world().await;
    let client = proxied_client(&w.proxy.url());
    for i in 0..1000 {
        let resp = client
            .get(format!("http://host-{i}.denied.test/path-{i}?q={i}"))
            .header("user-agent", format!("agent-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
    }
    let _ = w.proxy.audit_events(1000).await;
    let text = w.proxy.metrics().await;
    assert!(
        !text.contains("denied.test"),
        "no host name becomes a label"
    );
    let m = parse_metrics(&text);
    let series = m
        .samples
        .iter()
        .filter(|s| s.metric.starts_with("portcullis_"))
        .count();
    assert!(series < 100, "{series} series after 1000 distinct hosts");
    assert_eq!(
        sample(&m, "portcullis_denials_total", &[("reason", "no_rule")]),
        1000.0
    );
    w.proxy.stop().await;
}

#[tokio::test]
async fn admin_endpoints() {
    let w = world().await;
    let direct = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str| direct.get(format!("http://{}{path}", w.proxy.admin)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let ca = get("/ca.pem").await.unwrap();
    assert_eq!(ca.status(), 200);
    assert_eq!(
        ca.text().await.unwrap(),
        std::fs::read_to_string(&w.ca).unwrap()
    );
    let metrics = get("/metrics").await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(get("/nope").await.unwrap().status(), 404);
    assert_eq!(get("/").await.unwrap().status(), 404);

    // The admin listener never proxies.
    let mut s = tokio::net::TcpStream::connect(w.proxy.admin).await.unwrap();
    s.write_all(
        format!(
            "GET http://up.test:{}/ HTTP/1.1\r\nHost: up.test\r\n\r\n",
            w.plain.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 404"));
    assert_eq!(w.plain.count(), 0);
    w.proxy.stop().await;
}

/// Opens a CONNECT as `client` (Basic proxy credentials) and returns the response head and the
/// socket, which carries the tunnel after a 200.
async fn connect_as(
    proxy: &TestProxy,
    (name, token): (&str, &str),
    target: &str,
) -> (String, tokio::net::TcpStream) {
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let auth = basic(name, token);
    s.write_all(
        format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {auth}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    (head, s)
}

/// A GET through an open tunnel, TLS to the upstream named `sni`; the status line.
async fn get_through(s: tokio::net::TcpStream, up: &Upstream, sni: &str) -> String {
    let mut tls = tls_connect(s, roots_for(up), sni).await.unwrap();
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await.ok();
    let text = String::from_utf8_lossy(&response).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

/// The series `line` (`name{labels} value`) is in the exposition exactly, value included.
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// A tunnel-only deployment (no plain or intercepted request at all), scraped fresh and after
/// traffic. The second scrape is written to `target/tmp/tunnel-only-metrics.txt`: the series of
/// `deploy/prometheus/alerts_test.yml` (run by `promtool test rules`) are copied from it.
#[tokio::test]
async fn a_tunnel_only_scrape_has_known_series_at_zero_and_no_request_series() {
    let tls = tls_upstream(&["tunnel.test", "unlisted.test"]).await;
    let (t, refused) = (tls.port(), closed_port().await);
    let proxy = start_proxy(&format!(
        r#"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "tunnel.test" = ["127.0.0.1"], "unlisted.test" = ["127.0.0.1"], "down.test" = ["127.0.0.1"] }}
[[clients]]
name = "ci"
token = {{ value = "ci-token" }}
[[clients]]
name = "trial"
token = {{ value = "trial-token" }}
mode = "report"
[[hosts]]
host = "tunnel.test"
ports = [{t}]
[[hosts]]
host = "down.test"
ports = [{refused}]
"#
    ))
    .await;
    let (ci, trial) = (("ci", "ci-token"), ("trial", "trial-token"));

    // Before any traffic: every counter whose labels are known is there at 0, so the first
    // event is an increase Prometheus sees.
    let fresh = proxy.metrics().await;
    let mut zeros = vec![
        r#"portcullis_config_reloads_total{result="success"} 0"#.to_owned(),
        r#"portcullis_config_reloads_total{result="failure"} 0"#.to_owned(),
    ];
    for kind in ["dns", "connect", "tls", "timeout", "reset"] {
        zeros.push(format!(
            r#"portcullis_upstream_errors_total{{kind="{kind}"}} 0"#
        ));
    }
    for reason in portcullis::error::DENIAL_REASONS {
        zeros.push(format!(
            r#"portcullis_denials_total{{reason="{reason}"}} 0"#
        ));
    }
    for zero in &zeros {
        assert!(has_line(&fresh, zero), "{zero} missing:\n{fresh}");
    }
    for reason in ["no_rule", "proxy_auth_required", "overloaded"] {
        let zero = format!(r#"portcullis_denials_total{{reason="{reason}"}} 0"#);
        assert!(has_line(&fresh, &zero), "{zero} missing:\n{fresh}");
    }
    assert!(!fresh.contains("portcullis_tunnels_total{"), "{fresh}");

    // An allowed tunnel, a report-mode tunnel policy would deny, a denied one, and one whose
    // upstream refuses the connection.
    let (head, s) = connect_as(&proxy, ci, &format!("tunnel.test:{t}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(get_through(s, &tls, "tunnel.test")
        .await
        .starts_with("HTTP/1.1 200"));
    let (head, s) = connect_as(&proxy, trial, &format!("unlisted.test:{t}")).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "report mode lets it through: {head}"
    );
    assert!(get_through(s, &tls, "unlisted.test")
        .await
        .starts_with("HTTP/1.1 200"));
    let (head, _s) = connect_as(&proxy, ci, &format!("unlisted.test:{t}")).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (head, _s) = connect_as(&proxy, ci, &format!("down.test:{refused}")).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    // And a rejected reload.
    std::fs::write(
        proxy.dir.path().join("portcullis.toml"),
        "[[hosts]]\nhost = \"tunnel.test\"\nbogus_key = 1\n",
    )
    .unwrap();
    assert!(proxy.handle.reload().is_err());

    let events = proxy.audit_events(4).await;
    assert_eq!(events.len(), 4, "{events:#?}");
    assert!(events.iter().all(|e| e["kind"] == "tunnel"), "{events:#?}");
    let text = proxy.metrics().await;
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tunnel-only-metrics.txt"),
        &text,
    )
    .unwrap();
    // No request series at all: alerts and panels must not depend on them.
    assert!(!text.contains("portcullis_requests_total"), "{text}");
    assert!(
        !text.contains("portcullis_request_duration_seconds"),
        "{text}"
    );
    for line in [
        r#"portcullis_tunnels_total{client="ci",decision="allow",rule="tunnel.test"} 1"#,
        r#"portcullis_tunnels_total{client="ci",decision="allow",rule="down.test"} 1"#,
        r#"portcullis_tunnels_total{client="ci",decision="deny",rule="none"} 1"#,
        r#"portcullis_tunnels_total{client="trial",decision="would_deny",rule="none"} 1"#,
        // The real denial only: a report-mode would-be denial is not a denial.
        r#"portcullis_denials_total{reason="no_rule"} 1"#,
        r#"portcullis_denials_total{reason="port_not_allowed"} 0"#,
        r#"portcullis_upstream_errors_total{kind="connect"} 1"#,
        r#"portcullis_upstream_errors_total{kind="dns"} 0"#,
        r#"portcullis_config_reloads_total{result="failure"} 1"#,
        r#"portcullis_config_reloads_total{result="success"} 0"#,
    ] {
        assert!(has_line(&text, line), "{line} missing:\n{text}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn an_audit_output_that_refuses_writes_is_counted_and_traffic_goes_on() {
    // /dev/full opens, and refuses every write with ENOSPC: a full disk.
    let up = http_upstream().await;
    let proxy = start_proxy(&format!(
        r#"
[audit]
output = "/dev/full"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "plain.test" = ["127.0.0.1"] }}
[[hosts]]
host = "plain.test"
ports = [{}]
"#,
        up.port()
    ))
    .await;
    assert_eq!(
        proxy.metric("portcullis_audit_write_errors_total").await,
        Some(0.0),
        "there from the start"
    );
    let client = proxied_client(&proxy.url());
    for i in 0..3 {
        let r = client
            .get(format!("http://plain.test:{}/{i}", up.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    eventually(
        "the failed writes are counted",
        Duration::from_secs(5),
        || async {
            proxy
                .metric("portcullis_audit_write_errors_total")
                .await
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    assert_eq!(up.count(), 3);
    proxy.stop().await;
}
