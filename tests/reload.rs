//! Live reload: rule changes take effect without dropping open tunnels, a broken config keeps the
//! running one, rotated secret files are picked up within seconds, and SIGHUP reloads and
//! reopens the audit file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

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

/// The file watcher looks once a second and loads a change once it has been stable for 300 ms:
/// a load by the watcher shows in the counters within ~1.3 s of a change. Tests that must see
/// *no* watcher reload watch the counters for longer than that.
const WATCHER_WINDOW: Duration = Duration::from_millis(2500);

const RELOAD_SUCCESS: &str = "portcullis_config_reloads_total{result=\"success\"}";
const RELOAD_FAILURE: &str = "portcullis_config_reloads_total{result=\"failure\"}";

/// Both reload counters in a `/metrics` text: (success, failure). A series not exported yet
/// counts 0.
fn reload_counts(text: &str) -> (f64, f64) {
    (
        metric_value(text, RELOAD_SUCCESS).unwrap_or(0.0),
        metric_value(text, RELOAD_FAILURE).unwrap_or(0.0),
    )
}

async fn reloads(proxy: &TestProxy) -> (f64, f64) {
    reload_counts(&proxy.metrics().await)
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
    assert_eq!(reloads(&proxy).await, (1.0, 0.0), "the explicit reload");
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
    // The watcher sees the changed file too, but the explicit reload recorded it as loaded: no
    // second reload, however many polls pass.
    holds_for(
        "exactly one reload (the explicit one)",
        WATCHER_WINDOW,
        || async { reloads(&proxy).await == (1.0, 0.0) },
    )
    .await;
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
    // A failed load is recorded too: the watcher does not retry the broken file by itself.
    holds_for(
        "exactly the two explicit (failed) reloads",
        WATCHER_WINDOW,
        || async { reloads(&proxy).await == (0.0, 2.0) },
    )
    .await;
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
    eventually("rotation picked up", Duration::from_secs(10), || async {
        client.get(&url).send().await.unwrap();
        up.last().header("authorization") == Some("Bearer second-token")
    })
    .await;
    // The watcher loaded the change once (the counter is bumped just after the swap), and
    // recorded it: it does not load it again at its next polls.
    eventually(
        "the watcher's reload counted",
        Duration::from_secs(5),
        || async { reloads(&proxy).await == (1.0, 0.0) },
    )
    .await;
    holds_for("exactly one reload", WATCHER_WINDOW, || async {
        reloads(&proxy).await == (1.0, 0.0)
    })
    .await;
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
    eventually("the first audit event", Duration::from_secs(5), || async {
        !std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .is_empty()
    })
    .await;
    std::fs::rename(&audit, &rotated).unwrap();
    std::fs::write(&config, body(&["b.test"])).unwrap();
    Command::new("kill")
        .args(["-HUP", &running.child.0.id().to_string()])
        .status()
        .unwrap();
    running.wait_for("configuration reloaded");
    assert_eq!(get("a.test").await.unwrap().status(), 403);
    assert_eq!(get("b.test").await.unwrap().status(), 200);
    // SIGHUP's load is recorded like any other: the watcher does not load the file again.
    holds_for("exactly one reload (SIGHUP's)", WATCHER_WINDOW, || async {
        reload_counts(&running.metrics().await) == (1.0, 0.0)
    })
    .await;
    assert_eq!(running.child.terminate(Duration::from_secs(20)), Some(0));

    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(old.lines().count(), 1, "{old}");
    assert!(old.contains("\"host\":\"a.test\""));
    assert_eq!(new.lines().count(), 2, "{new}");
    assert!(new.contains("\"host\":\"b.test\""));
}

/// One proxy: `save_after` its start, its config gains a secret file (so the set of watched
/// files changes), and an explicit reload follows the save by 250 ms — an operator's SIGHUP a
/// moment after saving. Returns the success count once the watcher had time to (wrongly) load
/// the change again.
async fn reload_shortly_after_a_save_that_adds_a_watched_file(save_after: Duration) -> f64 {
    let up = http_upstream().await;
    let port = up.port();
    let hosts = format!(
        "[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"a.test\" = [\"127.0.0.1\"] }}\n[[hosts]]\nhost = \"a.test\"\nports = [{port}]\n"
    );
    let proxy = start_proxy(&hosts).await;
    std::fs::write(proxy.dir.path().join("token"), "t\n").unwrap();
    // Not synchronisation: when the save happens relative to the watcher's polls is the scenario.
    tokio::time::sleep(save_after).await;
    write_config(
        &proxy,
        &format!(
            "[credentials.t]\nbearer = {{ file = \"token\" }}\n{hosts}credential = \"t\"\nplaintext_credentials = true\n"
        ),
    );
    // Not synchronisation: the delay between the save and the reload is the scenario.
    tokio::time::sleep(Duration::from_millis(250)).await;
    proxy.handle.reload().unwrap();
    assert_eq!(reloads(&proxy).await, (1.0, 0.0));
    let mut last = (1.0, 0.0);
    // Watch for a second load; stop at the first.
    let deadline = std::time::Instant::now() + WATCHER_WINDOW;
    while std::time::Instant::now() < deadline && last == (1.0, 0.0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        last = reloads(&proxy).await;
    }
    proxy.stop().await;
    last.0
}

/// Known bug (src/proxy/reload.rs): a watcher poll that saw the save before the explicit reload
/// compares, after its 300 ms debounce, its fingerprint of the *old* set of watched files with
/// what the explicit reload recorded for the *new* set; they always differ, so it loads the
/// change a second time. The watcher's first poll comes ~1 s after the start; the saves are
/// spread from 0.6 to 0.93 s after the start, so that poll lands between save and reload for
/// about half of the twelve proxies (and the later polls for none).
#[tokio::test]
async fn a_reload_that_changes_the_watched_files_is_not_repeated_by_the_watcher() {
    let runs = (0..12).map(|i| {
        reload_shortly_after_a_save_that_adds_a_watched_file(Duration::from_millis(600 + 30 * i))
    });
    let counts = futures_util::future::join_all(runs).await;
    assert!(
        counts.iter().all(|&c| c == 1.0),
        "success counts per proxy (1 each expected): {counts:?}"
    );
}
