//! Minted credentials (spec §10) over real sockets: an `oauth2` credential minted from a local
//! token endpoint (which checks the client authentication itself) reaches a protected resource
//! that accepts only the bearers that endpoint issued — plain http and intercepted HTTPS, one
//! mint for many concurrent first requests, refreshes ahead of a short lifetime, 503 when no
//! valid token can be had and recovery afterwards, a reload that keeps the token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::oauth::*;
use common::*;

/// A proxy whose `api` credential mints from `token` (reached as `auth.test`, no `[[hosts]]`
/// rule for it), injected on plain `plain.test` and intercepted `secure.test`.
struct Setup {
    proxy: TestProxy,
    tokens: Arc<TokenServer>,
    plain: Served,
    tls: Served,
    ca: String,
}

fn config(token_port: u16, plain: u16, tls: u16, oauth_extra: &str) -> String {
    format!(
        r#"
[tls]
extra_upstream_ca = ["upstream-ca.pem"]

[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "auth.test" = ["127.0.0.1"], "plain.test" = ["127.0.0.1"], "secure.test" = ["127.0.0.1"] }}

[credentials.api]
oauth2 = {{ token_url = "http://auth.test:{token_port}/oauth2/token", client_id = "{CLIENT_ID}", client_secret = {{ file = "client-secret" }}, scopes = ["artifacts:read", "builds:write"], audience = "https://api.example.com", extra = {{ resource = "https://api.example.com/v1" }}{oauth_extra} }}

[[hosts]]
host = "plain.test"
ports = [{plain}]
credential = "api"
plaintext_credentials = true

[[hosts]]
host = "secure.test"
ports = [{tls}]
credential = "api"
"#
    )
}

async fn setup(lifetime: u64, oauth_extra: &str) -> Setup {
    let (tokens, endpoint) = token_server(lifetime).await;
    let plain = protected_http(&tokens).await;
    let (tls, upstream_ca) = protected_tls(&tokens, &["secure.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &upstream_ca).unwrap();
    std::fs::write(
        dir.path().join("client-secret"),
        format!("{CLIENT_SECRET}\n"),
    )
    .unwrap();
    let body = config(endpoint.port(), plain.port(), tls.port(), oauth_extra);
    let proxy = start_proxy_in(dir, &body).await;
    let ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    Setup {
        proxy,
        tokens,
        plain,
        tls,
        ca,
    }
}

impl Setup {
    fn plain_url(&self, path: &str) -> String {
        format!("http://plain.test:{}{path}", self.plain.port())
    }
    fn tls_url(&self, path: &str) -> String {
        format!("https://secure.test:{}{path}", self.tls.port())
    }
    fn client(&self) -> reqwest::Client {
        proxied_tls_client(&self.proxy.url(), &self.ca)
    }
}

#[tokio::test]
async fn minted_bearer_reaches_plain_and_intercepted_resources() {
    let s = setup(3600, "").await;
    // Metrics exist at 0 before any mint.
    let refreshes = |r: &str| {
        format!("portcullis_credential_refreshes_total{{credential=\"api\",result=\"{r}\"}}")
    };
    assert_eq!(s.proxy.metric(&refreshes("success")).await, Some(0.0));
    assert_eq!(s.proxy.metric(&refreshes("failure")).await, Some(0.0));
    assert_eq!(s.tokens.attempts(), 0, "nothing minted at startup");
    let client = s.client();
    // The client's own Authorization is overwritten.
    let r = client
        .get(s.plain_url("/x"))
        .header("authorization", "Bearer client-made-up")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "protected ok");
    let r = client.get(s.tls_url("/y")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "protected ok");
    assert_eq!(s.tokens.mints(), 1, "one token serves both");
    let seen = s.tokens.last();
    assert_eq!(seen.auth, "basic");
    assert_eq!(seen.form["scope"], "artifacts:read builds:write");
    assert_eq!(seen.form["audience"], "https://api.example.com");
    assert_eq!(seen.form["resource"], "https://api.example.com/v1");
    assert!(!seen.form.contains_key("client_secret"));
    // An echo of the minted token is masked in the response.
    let token = s.tokens.tokens().pop().unwrap();
    for url in [s.plain_url("/echo"), s.tls_url("/echo")] {
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body = r.text().await.unwrap();
        assert!(body.starts_with("you sent Bearer ***"), "{body}");
        assert!(!body.contains(&token), "{body}");
    }
    assert_eq!(s.proxy.metric(&refreshes("success")).await, Some(1.0));
    let expiry = s
        .proxy
        .metric("portcullis_credential_expiry_timestamp_seconds{credential=\"api\"}")
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((expiry - (now + 3600.0)).abs() < 30.0, "{expiry} vs {now}");
    let events = s.proxy.audit_events(4).await;
    assert_eq!(events.len(), 4);
    for e in &events {
        assert_eq!(e["credential"], "api");
        let line = e.to_string();
        assert!(
            !line.contains(&token) && !line.contains("canary-client-secret"),
            "{line}"
        );
    }
    let metrics = s.proxy.metrics().await;
    assert!(!metrics.contains("canary"), "{metrics}");
}

#[tokio::test]
async fn client_secret_post_sends_the_secret_in_the_form() {
    let s = setup(3600, ", client_auth = \"post\"").await;
    let r = s.client().get(s.plain_url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = s.tokens.last();
    assert_eq!(seen.auth, "post");
    assert_eq!(seen.form["client_id"], CLIENT_ID);
    assert_eq!(seen.form["client_secret"], CLIENT_SECRET);
    assert_eq!(seen.form["grant_type"], "client_credentials");
}

#[tokio::test]
async fn fifty_concurrent_first_requests_cause_one_mint() {
    let s = setup(3600, "").await;
    s.tokens.delay_ms.store(300, Ordering::SeqCst);
    let client = s.client();
    let requests = (0..50).map(|i| {
        let client = client.clone();
        let url = if i % 2 == 0 {
            s.plain_url("/c")
        } else {
            s.tls_url("/c")
        };
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(s.tokens.attempts(), 1);
    assert_eq!(s.tokens.mints(), 1);
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_ahead_of_expiry_without_failures() {
    let s = setup(6, "").await;
    let client = s.client();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let url = if n % 2 == 0 {
            s.plain_url("/r")
        } else {
            s.tls_url("/r")
        };
        let r = client.get(url).send().await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "request {n} at {:?}: {}",
            started.elapsed(),
            proxy_status(&r)
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mints = s.tokens.mints();
    // Refreshed 3 s (half the lifetime) before expiry: about every 3 s.
    assert!((4..=15).contains(&mints), "{mints} mints");
    assert_eq!(
        s.tokens.attempts(),
        mints,
        "no failed or rejected token request"
    );
}

#[tokio::test]
async fn failing_endpoint_keeps_a_valid_token_then_503_then_recovers() {
    let s = setup(6, "").await;
    let client = s.client();
    let r = client.get(s.plain_url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let minted_at = Instant::now();
    s.tokens.failing.store(true, Ordering::SeqCst);
    // Past the refresh point (3 s) and before expiry (6 s) the cached token keeps working while
    // the background refreshes fail.
    while minted_at.elapsed() < Duration::from_millis(5200) {
        let r = client.get(s.plain_url("/a")).send().await.unwrap();
        assert_eq!(r.status(), 200, "at {:?}", minted_at.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.tokens.attempts() >= 2, "background refreshes were tried");
    tokio::time::sleep(
        Duration::from_secs(6).saturating_sub(minted_at.elapsed()) + Duration::from_millis(300),
    )
    .await;
    // No valid token: 503 naming the credential, at most one attempt a second.
    let before = s.tokens.attempts();
    let window = Instant::now();
    let mut failures = 0;
    while window.elapsed() < Duration::from_secs(3) {
        let r = client.get(s.tls_url("/b")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let ps = proxy_status(&r);
        assert!(ps.contains("error=proxy_internal_error"), "{ps}");
        assert!(
            ps.contains("credential api is unavailable: token endpoint answered 500"),
            "{ps}"
        );
        let body = r.text().await.unwrap();
        assert!(!body.contains("canary"), "{body}");
        failures += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts = s.tokens.attempts() - before;
    assert!(failures > 20, "{failures}");
    assert!((1..=4).contains(&attempts), "{attempts} attempts in 3 s");
    let events = s.proxy.audit_events(1).await;
    let failed: Vec<_> = events.iter().filter(|e| e["status"] == 503).collect();
    assert!(!failed.is_empty());
    for e in &failed {
        assert_eq!(e["credential"], "api", "{e}");
    }
    let fail_count = s
        .proxy
        .metric("portcullis_credential_refreshes_total{credential=\"api\",result=\"failure\"}")
        .await
        .unwrap();
    assert!(fail_count >= 2.0, "{fail_count}");
    // The endpoint recovers: within a second requests succeed again.
    s.tokens.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = client.get(s.tls_url("/b")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client.get(s.plain_url("/b")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_credentials_token_and_a_change_mints_anew() {
    let s = setup(3600, "").await;
    let client = s.client();
    assert_eq!(
        client.get(s.plain_url("/1")).send().await.unwrap().status(),
        200
    );
    assert_eq!(s.tokens.mints(), 1);
    let path = s.proxy.dir.path().join("portcullis.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Another rule: the credential is unchanged.
    std::fs::write(&path, format!("{text}\n[[hosts]]\nhost = \"other.test\"\n")).unwrap();
    s.proxy.handle.reload().unwrap();
    assert_eq!(
        client.get(s.tls_url("/2")).send().await.unwrap().status(),
        200
    );
    assert_eq!(s.tokens.mints(), 1, "the reload kept the token");
    // A changed scope is another credential: minted anew.
    let changed = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"builds:write\"", "\"builds:read\"");
    std::fs::write(&path, changed).unwrap();
    s.proxy.handle.reload().unwrap();
    assert_eq!(
        client.get(s.tls_url("/3")).send().await.unwrap().status(),
        200
    );
    assert_eq!(s.tokens.mints(), 2);
    assert_eq!(s.tokens.last().form["scope"], "artifacts:read builds:read");
}

#[tokio::test]
async fn check_validates_oauth2_without_minting() {
    let (tokens, endpoint) = token_server(3600).await;
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[credentials.api]\noauth2 = {{ token_url = \"http://127.0.0.1:{}/t\", client_id = \"c\", client_secret = {{ env = \"PORTCULLIS_TEST_MINTED_UNSET\" }} }}\n[credentials.bad]\noauth2 = {{ token_url = \"ftp://x/\", client_id = \"c\", client_secret = {{ file = \"missing-secret\" }} }}\n",
        endpoint.port()
    );
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, body).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "-c", path.to_str().unwrap()])
        .env_remove("PORTCULLIS_TEST_MINTED_UNSET")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("PORTCULLIS_TEST_MINTED_UNSET"), "{text}");
    assert!(text.contains("credentials.bad.oauth2.token_url"), "{text}");
    assert_eq!(tokens.attempts(), 0, "check never mints");
}

/// The canary: the real binary at debug log level mints canary tokens, injects them on plain and
/// intercepted requests, sees them echoed and sent back by a client, meets a failing endpoint
/// whose error body holds the client secret; neither the client secret nor any minted token is
/// in stdout (audit), stderr (logs), `/metrics` or any response body.
// Multi-threaded: `terminate` blocks this thread while the client's pooled h2 connection (in
// this runtime) answers the proxy's GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_no_client_secret_or_minted_token_reaches_any_output() {
    let (tokens, endpoint) = token_server(3).await;
    let plain = protected_http(&tokens).await;
    let (tls, upstream_ca) = protected_tls(&tokens, &["secure.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &upstream_ca).unwrap();
    let body = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[audit]\noutput = \"stdout\"\n{}",
        config(endpoint.port(), plain.port(), tls.port(), "")
            .replace("{ file = \"client-secret\" }", "{ env = \"PORTCULLIS_CANARY_CLIENT_SECRET\" }")
    );
    let path = dir.path().join("canary.toml");
    std::fs::write(&path, body).unwrap();
    let running = spawn_binary(
        &["run", "-c", path.to_str().unwrap()],
        &[
            ("RUST_LOG", "debug"),
            ("PORTCULLIS_CANARY_CLIENT_SECRET", CLIENT_SECRET),
        ],
        std::process::Stdio::piped(),
    );
    let ca = std::fs::read_to_string(dir.path().join("state/ca.pem")).unwrap();
    let client = proxied_tls_client(&running.proxy, &ca);
    let plain_url = |p: &str| format!("http://plain.test:{}{p}", plain.port());
    let tls_url = |p: &str| format!("https://secure.test:{}{p}", tls.port());
    let mut bodies = Vec::new();
    // 3 s tokens: several are minted over these ~4 s.
    for i in 0..20 {
        let url = if i % 2 == 0 {
            plain_url("/echo")
        } else {
            tls_url("/echo")
        };
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        bodies.push(r.text().await.unwrap());
        // A client that learned the current token sends it back in a query and a header: the
        // audit event must not show it. (The token the upstream last accepted, not the newest
        // issued: a refresh may have minted one the proxy has not received yet, which no client
        // could know.)
        let current = tokens.used.lock().unwrap().clone().unwrap();
        let r = client
            .get(tls_url(&format!("/x?note={current}")))
            .header("x-client-note", current.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        bodies.push(r.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(tokens.mints() >= 2, "{}", tokens.mints());
    // The first token, replaced since: a client sending it in another request's query and header
    // gets it scrubbed from that event too (every minted token is, not only each request's own).
    let first = tokens.tokens()[0].clone();
    let r = client
        .get(tls_url(&format!("/x?note={first}")))
        .header("x-client-note", first.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    bodies.push(r.text().await.unwrap());
    // The endpoint fails (its error body holds the client secret): 503s, then recovery.
    tokens.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = client.get(plain_url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    bodies.push(proxy_status(&r));
    bodies.push(r.text().await.unwrap());
    tokens.failing.store(false, Ordering::SeqCst);
    let metrics = running.metrics().await;
    assert!(metrics
        .contains("portcullis_credential_refreshes_total{credential=\"api\",result=\"failure\"}"));

    let Collected { stdout, stderr } = running.stop_and_collect();
    assert!(stdout.lines().count() >= 40, "audit events: {stdout}");
    assert!(
        stdout.contains("\"x-client-note\":\"<HIDDEN>\""),
        "{stdout}"
    );
    assert!(stdout.contains("note=<HIDDEN>"), "{stdout}");
    let issued = tokens.tokens();
    let mut secrets: Vec<String> = issued.clone();
    secrets.push(CLIENT_SECRET.to_owned());
    secrets.push(common::oauth::form_decode("canary-client-secret-7Hq2"));
    secrets.push("canary-endpoint-error-body".to_owned());
    secrets.push("canary-minted-token".to_owned());
    for secret in &secrets {
        assert!(
            !stdout.contains(secret.as_str()),
            "{secret} in stdout:\n{stdout}"
        );
        assert!(
            !stderr.contains(secret.as_str()),
            "{secret} in stderr:\n{stderr}"
        );
        assert!(!metrics.contains(secret.as_str()), "{secret} in /metrics");
        for body in &bodies {
            assert!(
                !body.contains(secret.as_str()),
                "{secret} in a response: {body}"
            );
        }
    }
}
