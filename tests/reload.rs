//! Live reload: rule changes take effect without dropping open tunnels, a broken config keeps the
//! running one, rotated secret files are picked up within seconds, and SIGHUP reloads and
//! reopens the audit file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rules(up: u16, tls: u16, hosts: &[&str]) -> String {
    let mut text = String::from(
        "[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = { \"a.test\" = [\"127.0.0.1\"], \"b.test\" = [\"127.0.0.1\"], \"tunnel.test\" = [\"127.0.0.1\"] }\n",
    );
    for host in hosts {
        let port = if *host == "tunnel.test" { tls } else { up };
        text.push_str(&format!("[[hosts]]\nhost = \"{host}\"\nports = [{port}]\n"));
    }
    text
}

fn write_config(proxy: &TestProxy, body: &str) {
    std::fs::write(
        proxy.dir.path().join("portcullis.toml"),
        format!("{LISTEN}{body}\n[audit]\noutput = \"audit.log\"\n"),
    )
    .unwrap();
}

#[tokio::test]
async fn reload_swaps_rules_without_dropping_an_open_tunnel() {
    let up = http_upstream().await;
    let tls = tls_upstream(&["tunnel.test"]).await;
    let proxy = start_proxy(&rules(up.port(), tls.port(), &["a.test", "tunnel.test"])).await;
    let client = proxied_client(&proxy.url());
    let get = |host: &str| client.get(format!("http://{host}:{}/", up.port())).send();
    assert_eq!(get("a.test").await.unwrap().status(), 200);
    assert_eq!(get("b.test").await.unwrap().status(), 403);

    // Open a tunnel and complete a TLS handshake through it.
    let target = format!("tunnel.test:{}", tls.port());
    let s = connect_through(&proxy, &target).await;
    let mut tunnel = tls_connect(s, roots_for(&tls), "tunnel.test")
        .await
        .unwrap();

    // b.test in, a.test and tunnel.test out.
    write_config(&proxy, &rules(up.port(), tls.port(), &["b.test"]));
    proxy.handle.reload().unwrap();
    assert_eq!(get("a.test").await.unwrap().status(), 403);
    assert_eq!(get("b.test").await.unwrap().status(), 200);
    let out = curl(&["-x", &proxy.url(), "-k", &format!("https://{target}/")]).await;
    assert_eq!(
        out.connect_status, 403,
        "new tunnels to a removed host are refused: {out:?}"
    );

    // The tunnel opened before the reload still carries traffic.
    tunnel
        .write_all(b"GET /after-reload HTTP/1.1\r\nHost: tunnel.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tunnel.read_to_end(&mut response).await.ok();
    assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"));
    drop(tunnel);

    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("portcullis_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_broken_config_keeps_the_running_rules() {
    let up = http_upstream().await;
    let proxy = start_proxy(&rules(up.port(), 1, &["a.test"])).await;
    let client = proxied_client(&proxy.url());
    write_config(&proxy, "[[hosts]]\nhost = \"b.test\"\nbogus_key = 1\n");
    let err = proxy.handle.reload().unwrap_err();
    assert!(err.to_string().contains("hosts[0].bogus_key"), "{err}");
    write_config(&proxy, "[[hosts]\nhost = ");
    assert!(proxy.handle.reload().is_err());
    let resp = client
        .get(format!("http://a.test:{}/", up.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "old rules still serve");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("portcullis_config_reloads_total{result=\"failure\"} 2"),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_rotated_secret_file_is_injected_within_seconds() {
    let up = http_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token");
    std::fs::write(&secret, "first-token\n").unwrap();
    let port = up.port();
    let proxy = start_proxy_in(
        dir,
        &format!(
            "[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"a.test\" = [\"127.0.0.1\"] }}\n[credentials.t]\nbearer = {{ file = \"token\" }}\n[[hosts]]\nhost = \"a.test\"\nports = [{port}]\ncredential = \"t\"\nplaintext_credentials = true\n"
        ),
    )
    .await;
    let client = proxied_client(&proxy.url());
    let url = format!("http://a.test:{port}/");
    client.get(&url).send().await.unwrap();
    assert_eq!(
        up.last().header("authorization"),
        Some("Bearer first-token")
    );

    // Rotate (write a new file and rename it over, as secret managers do).
    let staged = proxy.dir.path().join("token.new");
    std::fs::write(&staged, "second-token\n").unwrap();
    std::fs::rename(&staged, proxy.dir.path().join("token")).unwrap();
    let started = Instant::now();
    loop {
        client.get(&url).send().await.unwrap();
        if up.last().header("authorization") == Some("Bearer second-token") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn sighup_reloads_and_reopens_the_audit_file() {
    let up = http_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    let body = |hosts: &[&str]| {
        format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[audit]\noutput = \"audit.log\"\n{}",
            rules(up.port(), 1, hosts)
        )
    };
    std::fs::write(&config, body(&["a.test"])).unwrap();
    let mut running = spawn_binary(&["run", "-c", config.to_str().unwrap()], &[], Stdio::null());
    let client = proxied_client(&running.proxy);
    let get = |host: &str| client.get(format!("http://{host}:{}/", up.port())).send();
    assert_eq!(get("a.test").await.unwrap().status(), 200);

    // logrotate: move the file away, then SIGHUP.
    let audit = dir.path().join("audit.log");
    let rotated = dir.path().join("audit.log.1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&audit)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::rename(&audit, &rotated).unwrap();
    std::fs::write(&config, body(&["b.test"])).unwrap();
    Command::new("kill")
        .args(["-HUP", &running.child.0.id().to_string()])
        .status()
        .unwrap();
    running.wait_for("configuration reloaded");
    assert_eq!(get("a.test").await.unwrap().status(), 403);
    assert_eq!(get("b.test").await.unwrap().status(), 200);
    assert_eq!(running.child.terminate(Duration::from_secs(20)), Some(0));

    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(old.lines().count(), 1, "{old}");
    assert!(old.contains("\"host\":\"a.test\""));
    assert_eq!(new.lines().count(), 2, "{new}");
    assert!(new.contains("\"host\":\"b.test\""));
}
