//! The `github_app` credential kind (spec §10) over real sockets: the proxy signs an App JWT
//! (verified by the GitHub API stand-in with PyJWT against the App's public key), exchanges it
//! for an installation token with the configured narrowing, and injects it as a bearer or, for
//! git over HTTPS, as Basic `x-access-token:<token>`; one mint for many concurrent first requests;
//! a malformed key is a `check` error; neither key nor token reaches any output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::github::*;
use common::oauth::Served;
use common::*;

/// A proxy with a `gh` credential minting from the stand-in at `api.github.test`, injected on
/// `api.github.test` itself (intercepted): the resource accepts only the minted token.
struct Setup {
    proxy: TestProxy,
    api: Arc<GithubApi>,
    served: Served,
    ca: String,
    _work: tempfile::TempDir,
}

fn config(port: u16, extra: &str) -> String {
    format!(
        r#"
[tls]
extra_upstream_ca = ["upstream-ca.pem"]

[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "api.github.test" = ["127.0.0.1"] }}

[credentials.gh]
github_app = {{ app_id = "{APP_ID}", installation_id = "{INSTALLATION_ID}", private_key = {{ file = "gh-app.pem" }}, api_url = "https://api.github.test:{port}", repositories = ["app", "lib"], repository_ids = [42], permissions = {{ contents = "read", packages = "write" }}{extra} }}

[[hosts]]
host = "api.github.test"
ports = [{port}]
paths = ["/repos/**"]
credential = "gh"
"#
    )
}

async fn setup() -> Setup {
    let work = tempfile::tempdir().unwrap();
    let key = app_key(work.path());
    let (api, served, upstream_ca) =
        github_api(&key, &installation_token(), &["api.github.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &upstream_ca).unwrap();
    std::fs::copy(&key.private, dir.path().join("gh-app.pem")).unwrap();
    let proxy = start_proxy_in(dir, &config(served.port(), "")).await;
    let ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    Setup {
        proxy,
        api,
        served,
        ca,
        _work: work,
    }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("https://api.github.test:{}{path}", self.served.port())
    }
}

#[tokio::test]
async fn github_app_token_is_minted_with_a_verified_jwt_and_injected_as_bearer() {
    let s = setup().await;
    assert_eq!(s.api.attempts(), 0, "nothing minted at startup");
    let client = proxied_tls_client(&s.proxy.url(), &s.ca);
    // Without the proxy's credential the resource refuses (the stand-in is not lenient).
    let r = client
        .get(s.url("/repos/acme/app"))
        .header("authorization", "Bearer client-made-up")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the client's header is overwritten");
    assert_eq!(r.text().await.unwrap(), "github ok");
    assert_eq!(s.api.mints(), 1);
    assert!(s.api.rejections.lock().unwrap().is_empty());
    let body = s.api.last_body();
    assert_eq!(body["repositories"], serde_json::json!(["app", "lib"]));
    assert_eq!(body["repository_ids"], serde_json::json!([42]));
    assert_eq!(
        body["permissions"],
        serde_json::json!({ "contents": "read", "packages": "write" })
    );
    // An echo of the token is masked.
    let r = client.get(s.url("/repos/acme/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.starts_with("you sent Bearer ***"), "{text}");
    assert!(!text.contains(&s.api.token), "{text}");
    // The token lasts an hour: the second request reused it.
    assert_eq!(s.api.mints(), 1);
    let events = s.proxy.audit_events(2).await;
    for e in &events {
        assert_eq!(e["credential"], "gh", "{e}");
        assert!(!e.to_string().contains(&s.api.token), "{e}");
    }
    let metrics = s.proxy.metrics().await;
    assert!(!metrics.contains(&s.api.token));
    assert_eq!(
        metric_value(
            &metrics,
            "portcullis_credential_refreshes_total{credential=\"gh\",result=\"success\"}"
        ),
        Some(1.0)
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_jwt_signed_with_another_key_is_refused_by_the_stand_in() {
    // The stand-in's verification can fail: a proxy holding a different key gets 503.
    let work = tempfile::tempdir().unwrap();
    let key = app_key(work.path());
    let other = tempfile::tempdir().unwrap();
    let wrong = app_key(other.path());
    let (api, served, upstream_ca) =
        github_api(&key, &installation_token(), &["api.github.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &upstream_ca).unwrap();
    std::fs::copy(&wrong.private, dir.path().join("gh-app.pem")).unwrap();
    let proxy = start_proxy_in(dir, &config(served.port(), "")).await;
    let ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    let client = proxied_tls_client(&proxy.url(), &ca);
    let r = client
        .get(format!(
            "https://api.github.test:{}/repos/acme/app",
            served.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        proxy_status(&r).contains("credential gh is unavailable"),
        "{}",
        proxy_status(&r)
    );
    assert_eq!(api.mints(), 0);
    assert_eq!(api.attempts(), 1);
    assert!(!api.rejections.lock().unwrap().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn twenty_concurrent_first_requests_cause_one_token_request() {
    let s = setup().await;
    s.api.delay_ms.store(300, Ordering::SeqCst);
    let client = proxied_tls_client(&s.proxy.url(), &s.ca);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (client, url) = (client.clone(), s.url(&format!("/repos/acme/app/{i}")));
        tasks.push(tokio::spawn(async move {
            client.get(url).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(s.api.attempts(), 1);
    assert_eq!(s.api.mints(), 1);
    s.proxy.stop().await;
}

#[tokio::test]
async fn git_clone_with_an_installation_token_as_basic_x_access_token() {
    let work = tempfile::tempdir().unwrap();
    let key = app_key(work.path());
    let token = installation_token();
    let (api, served, api_ca) = github_api(&key, &token, &["api.github.test"]).await;
    let repo = make_repo(work.path());
    let git = tls_upstream_with(
        &["git.test"],
        Some(StaticFiles {
            root: repo.parent().unwrap().to_path_buf(),
            authorization: basic("x-access-token", &token),
        }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api-ca.pem"), &api_ca).unwrap();
    git.write_ca(dir.path(), "git-ca.pem");
    std::fs::copy(&key.private, dir.path().join("gh-app.pem")).unwrap();
    let proxy = start_proxy_in(
        dir,
        &format!(
            r#"
[tls]
extra_upstream_ca = ["api-ca.pem", "git-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "api.github.test" = ["127.0.0.1"], "git.test" = ["127.0.0.1"] }}
[credentials.gh-git]
github_app = {{ app_id = "{APP_ID}", installation_id = "{INSTALLATION_ID}", private_key = {{ file = "gh-app.pem" }}, api_url = "https://api.github.test:{}", repositories = ["repo"], permissions = {{ contents = "read" }}, inject = "basic" }}
[[hosts]]
host = "git.test"
ports = [{}]
methods = ["GET", "HEAD"]
paths = ["/git/**", "/x/**"]
credential = "gh-git"
"#,
            served.port(),
            git.port()
        ),
    )
    .await;
    let ca = proxy.dir.path().join("state/ca.pem");
    let dest = work.path().join("clone");
    let url = format!("https://git.test:{}/git/repo.git", git.port());
    let out = git_clone(&url, &dest, &proxy.url(), &ca, work.path()).await;
    assert!(
        out.status.success(),
        "git clone failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let readme = std::fs::read_to_string(dest.join("README")).unwrap();
    assert_eq!(readme, "cloned through portcullis\n");
    let seen = git.seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    let want = basic("x-access-token", &token);
    assert!(seen
        .iter()
        .all(|s| s.header("authorization") == Some(want.as_str())));
    assert_eq!(api.mints(), 1);
    assert_eq!(api.last_body()["repositories"], serde_json::json!(["repo"]));
    assert_eq!(
        api.last_body()["permissions"],
        serde_json::json!({ "contents": "read" })
    );
    assert!(api.last_body().get("repository_ids").is_none());
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!output.contains(&token));
    // An upstream echoing the credential back: neither the token nor the base64 pair returns.
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let client = proxied_tls_client(&proxy.url(), &ca_pem);
    let r = client
        .get(format!("https://git.test:{}/x/echo-secret", git.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo = format!("{:?}", r.headers());
    let text = r.text().await.unwrap();
    let encoded = want.strip_prefix("Basic ").unwrap();
    for shown in [&text, &echo] {
        assert!(!shown.contains(&token), "{shown}");
        assert!(!shown.contains(encoded), "{shown}");
    }
    // Masked in place (same length): the echo is there, starred out.
    assert!(
        text.starts_with("auth=Basic ****") && text.contains(";decoded=x-access-token:****"),
        "{text}"
    );
    proxy.stop().await;
}

/// The real binary at debug level with audit on stdout: a bearer-injected GitHub App token is
/// echoed back by the resource and sent back by the client in a query and a header; neither the
/// private key's PEM body, the minted token nor an App JWT is in stdout (audit), stderr (logs),
/// `/metrics` or any response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_no_private_key_or_installation_token_reaches_any_output() {
    let work = tempfile::tempdir().unwrap();
    let key = app_key(work.path());
    let (api, served, upstream_ca) =
        github_api(&key, &installation_token(), &["api.github.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &upstream_ca).unwrap();
    std::fs::copy(&key.private, dir.path().join("gh-app.pem")).unwrap();
    let body = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[audit]\noutput = \"stdout\"\n{}",
        config(served.port(), "")
    );
    let path = dir.path().join("canary.toml");
    std::fs::write(&path, body).unwrap();
    let running = spawn_binary(
        &["run", "-c", path.to_str().unwrap()],
        &[("RUST_LOG", "debug")],
        std::process::Stdio::piped(),
    );
    let ca = std::fs::read_to_string(dir.path().join("state/ca.pem")).unwrap();
    let client = proxied_tls_client(&running.proxy, &ca);
    let url = |p: &str| format!("https://api.github.test:{}{p}", served.port());
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let r = client.get(url("/repos/acme/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        bodies.push(format!("{:?}", r.headers()));
        bodies.push(r.text().await.unwrap());
        let r = client
            .get(url(&format!("/repos/acme/app?note={}", api.token)))
            .header("x-client-note", api.token.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        bodies.push(r.text().await.unwrap());
    }
    // A client sending a line of the App's key: the audit event hides it.
    let r = client
        .get(url("/repos/acme/app"))
        .header("x-key-note", key.body_lines()[5].as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(api.mints(), 1);
    let metrics = running.metrics().await;
    assert!(metrics
        .contains("portcullis_credential_refreshes_total{credential=\"gh\",result=\"success\"} 1"));
    let Collected { stdout, stderr } = running.stop_and_collect();
    assert!(stdout.lines().count() >= 10, "audit events: {stdout}");
    assert!(
        stdout.contains("\"x-client-note\":\"<HIDDEN>\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"x-key-note\":\"<HIDDEN>\""),
        "a key line in a header is masked: {stdout}"
    );
    let mut secrets = key.body_lines();
    assert!(secrets.len() >= 20, "a 2048-bit key has ~25 body lines");
    secrets.push(api.token.clone());
    secrets.push("ghs_canaryInstallationToken".to_owned());
    // An App JWT's header ({"typ":"JWT","alg":"RS256"} or {"alg":"RS256",...}) in base64url.
    secrets.push("eyJ0eXAiOiJKV1Qi".to_owned());
    secrets.push("eyJhbGciOiJSUzI1NiI".to_owned());
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    Collected { stdout, stderr }.assert_free_of(&secrets, &metrics, &bodies);
}

fn check(dir: &std::path::Path, body: &str) -> (i32, String, String) {
    check_config(dir, body, &[])
}

#[test]
fn check_refuses_a_malformed_or_missing_key_naming_its_path_and_accepts_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = app_key(dir.path());
    let body = |file: &str| {
        format!(
            r#"
[credentials.gh]
github_app = {{ app_id = "{APP_ID}", installation_id = "{INSTALLATION_ID}", private_key = {{ file = "{file}" }} }}
[[hosts]]
host = "api.github.com"
credential = "gh"
"#
        )
    };
    let (code, stdout, stderr) = check(dir.path(), &body("gh-app.pem"));
    assert_eq!(code, 0, "{stdout}{stderr}");
    // A malformed key: the PEM with its body damaged (still PEM-looking, not a key).
    let good = std::fs::read_to_string(&key.private).unwrap();
    let lines = key.body_lines();
    let broken = good.replace(&lines[3], &"A".repeat(lines[3].len()));
    std::fs::write(dir.path().join("broken.pem"), &broken).unwrap();
    let (code, stdout, stderr) = check(dir.path(), &body("broken.pem"));
    assert_eq!(code, 1, "{stdout}{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("credentials.gh.github_app.private_key"),
        "{all}"
    );
    assert!(all.contains("broken.pem"), "{all}");
    for line in lines.iter().filter(|l| **l != lines[3]) {
        assert!(!all.contains(line.as_str()), "key material printed: {all}");
    }
    // Not PEM at all, and missing.
    std::fs::write(dir.path().join("junk.pem"), "not a key\n").unwrap();
    let (code, _, stderr) = check(dir.path(), &body("junk.pem"));
    assert_eq!(code, 1);
    assert!(stderr.contains("junk.pem"), "{stderr}");
    let (code, _, stderr) = check(dir.path(), &body("absent.pem"));
    assert_eq!(code, 1);
    assert!(stderr.contains("absent.pem"), "{stderr}");
    // A non-numeric installation id.
    let bad = body("gh-app.pem").replace(INSTALLATION_ID, "../x");
    let (code, _, stderr) = check(dir.path(), &bad);
    assert_eq!(code, 1);
    assert!(stderr.contains("github_app.installation_id"), "{stderr}");
}
