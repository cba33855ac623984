//! Pipeline identities: per-client rules and credentials, 407 for strangers, identification by
//! source network, report mode, and `Proxy-Authorization` never reaching an upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::process::Command;

use common::*;

const FE_TOKEN: &str = "fe-proxy-token";
const REL_TOKEN: &str = "rel-proxy-token";
const FE_CRED: &str = "fe-upstream-secret";
const REL_CRED: &str = "rel-upstream-secret";

struct Setup {
    proxy: TestProxy,
    up: Upstream,
    ca: std::path::PathBuf,
    /// Holds the served repository.
    _work: tempfile::TempDir,
}

impl Setup {
    fn proxy_url(&self, user: &str, token: &str) -> String {
        format!("http://{user}:{token}@{}", self.proxy.addr)
    }
}

/// Two token clients share `api.test` with different credentials; `release` alone may reach
/// `nexus.test`; `git.test` serves a repository to `frontend` only.
async fn setup(extra: &str) -> Setup {
    let work = tempfile::tempdir().unwrap();
    let repo = make_repo(work.path());
    let up = tls_upstream_with(
        &["api.test", "nexus.test", "git.test"],
        Some(StaticFiles {
            root: repo.parent().unwrap().to_path_buf(),
            authorization: format!("Bearer {FE_CRED}"),
        }),
    )
    .await;
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
resolve = {{ "api.test" = ["127.0.0.1"], "nexus.test" = ["127.0.0.1"], "git.test" = ["127.0.0.1"], "other.test" = ["127.0.0.1"] }}
[credentials.fe]
bearer = {{ value = "{FE_CRED}" }}
[credentials.rel]
bearer = {{ value = "{REL_CRED}" }}
[[clients]]
name = "frontend"
token = {{ value = "{FE_TOKEN}" }}
[[clients]]
name = "release"
token = {{ value = "{REL_TOKEN}" }}
{extra}
[[hosts]]
host = "api.test"
ports = [{port}]
clients = ["frontend"]
credential = "fe"
[[hosts]]
host = "api.test"
ports = [{port}]
clients = ["release"]
credential = "rel"
[[hosts]]
host = "nexus.test"
ports = [{port}]
clients = ["release"]
credential = "rel"
[[hosts]]
host = "git.test"
ports = [{port}]
clients = ["frontend"]
credential = "fe"
"#
        ),
    )
    .await;
    let ca = proxy.dir.path().join("state/ca.pem");
    Setup {
        proxy,
        up,
        ca,
        _work: work,
    }
}

async fn curl_as(s: &Setup, proxy_url: &str, url: &str, extra: &[&str]) -> CurlOut {
    let mut args = vec!["-x", proxy_url, "--cacert", s.ca.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args).await
}

#[tokio::test]
async fn each_client_reaches_its_hosts_with_its_own_credential() {
    let s = setup("").await;
    let api = format!("https://api.test:{}/v1", s.up.port());
    let out = curl_as(&s, &s.proxy_url("frontend", FE_TOKEN), &api, &[]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        s.up.last().header("authorization"),
        Some(format!("Bearer {FE_CRED}").as_str())
    );
    let out = curl_as(&s, &s.proxy_url("release", REL_TOKEN), &api, &[]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        s.up.last().header("authorization"),
        Some(format!("Bearer {REL_CRED}").as_str())
    );

    // frontend may not reach release's host.
    let nexus = format!("https://nexus.test:{}/repo", s.up.port());
    let before = s.up.count();
    let out = curl_as(&s, &s.proxy_url("frontend", FE_TOKEN), &nexus, &[]).await;
    assert_eq!(out.connect_status, 403, "{out:?}");
    assert_eq!(s.up.count(), before);
    let out = curl_as(&s, &s.proxy_url("release", REL_TOKEN), &nexus, &[]).await;
    assert_eq!(out.status, 200, "{out:?}");

    let events = s.proxy.audit_events(6).await;
    let clients: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "request")
        .map(|e| e["client"].as_str().unwrap())
        .collect();
    assert!(
        clients.contains(&"frontend") && clients.contains(&"release"),
        "{clients:?}"
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn git_clones_as_its_client_through_a_proxy_url_with_credentials() {
    let s = setup("").await;
    let work = tempfile::tempdir().unwrap();
    let url = format!("https://git.test:{}/git/repo.git", s.up.port());
    let home = work.path();
    let fe = s.proxy_url("frontend", FE_TOKEN);
    let ok = git_clone(&url, &home.join("fe"), &fe, &s.ca, home).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(work.path().join("fe/README").exists());
    // release has no rule for git.test: the CONNECT is refused.
    let rel = s.proxy_url("release", REL_TOKEN);
    let denied = git_clone(&url, &home.join("rel"), &rel, &s.ca, home).await;
    assert!(!denied.status.success());
    s.proxy.stop().await;
}

#[tokio::test]
async fn missing_or_wrong_proxy_credentials_get_407_and_are_audited() {
    let s = setup("").await;
    let api = format!("https://api.test:{}/v1", s.up.port());
    let plain = format!("http://api.test:{}/v1", s.up.port());
    for proxy_url in [
        s.proxy.url(),
        s.proxy_url("frontend", "wrong"),
        s.proxy_url("frontend", REL_TOKEN),
        s.proxy_url("nobody", FE_TOKEN),
    ] {
        let out = curl_as(&s, &proxy_url, &api, &[]).await;
        assert_eq!(out.connect_status, 407, "{proxy_url}: {out:?}");
        let out = curl_as(&s, &proxy_url, &plain, &["-i"]).await;
        assert_eq!(out.status, 407, "{out:?}");
        assert!(
            out.body
                .contains("proxy-authenticate: Basic realm=\"portcullis\""),
            "{out:?}"
        );
        assert!(out
            .body
            .contains("proxy-status: portcullis; error=http_request_denied"));
    }
    // A refused token that the request repeats in its query is masked there too (an old,
    // rotated token is still a secret).
    const OLD: &str = "an-old-rotated-token-7f3a";
    let leaky = format!("{plain}?ref={OLD}");
    let out = curl_as(&s, &s.proxy_url("frontend", OLD), &leaky, &["-i"]).await;
    assert_eq!(out.status, 407, "{out:?}");
    assert_eq!(s.up.count(), 0);
    let events = s.proxy.audit_events(9).await;
    let refused: Vec<_> = events.iter().filter(|e| e["status"] == 407).collect();
    assert_eq!(refused.len(), 9, "{events:#?}");
    let repeated = refused
        .iter()
        .find(|e| e["query"].as_str().is_some_and(|q| q.starts_with("ref=")))
        .unwrap_or_else(|| panic!("the request with the query is audited: {refused:#?}"));
    assert!(
        !repeated.to_string().contains(OLD),
        "refused token in the audit event: {repeated}"
    );
    assert!(refused
        .iter()
        .all(|e| e["client"] == "unauthenticated" && e["decision"] == "deny"));
    let metrics = s.proxy.metrics().await;
    assert!(
        metrics.contains("portcullis_proxy_auth_failures_total{client=\"frontend\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_proxy_auth_failures_total{client=\"unknown\"} 4"),
        "{metrics}"
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn source_networks_identify_without_a_token() {
    let s = setup("[[clients]]\nname = \"runners\"\nnetworks = [\"127.0.0.0/8\"]\n").await;
    // No rule names `runners`: identified (so 403, not 407).
    let url = format!("https://api.test:{}/v1", s.up.port());
    let out = curl_as(&s, &s.proxy.url(), &url, &[]).await;
    assert_eq!(out.connect_status, 403, "{out:?}");
    let events = s.proxy.audit_events(1).await;
    assert_eq!(events[0]["client"], "runners");
    // A token still wins over the network.
    let out = curl_as(&s, &s.proxy_url("frontend", FE_TOKEN), &url, &[]).await;
    assert_eq!(out.status, 200, "{out:?}");
    s.proxy.stop().await;
}

#[tokio::test]
async fn report_mode_lets_denials_through_as_would_deny() {
    let plain = http_upstream().await;
    let port = plain.port();
    let proxy = start_proxy(&format!(
        r#"
[policy]
mode = "report"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "listed.test" = ["127.0.0.1"], "unlisted.test" = ["127.0.0.1"], "internal.test" = ["10.0.0.7"] }}
[[hosts]]
host = "listed.test"
ports = [{port}]
[[hosts]]
host = "internal.test"
ports = [{port}]
"#
    ))
    .await;
    let client = proxied_client(&proxy.url());
    let resp = client
        .get(format!("http://unlisted.test:{port}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "report mode lets it through");
    // Destination safety is never relaxed.
    let resp = client
        .get(format!("http://internal.test:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    let events = proxy.audit_events(2).await;
    let would = events
        .iter()
        .find(|e| e["host"] == "unlisted.test")
        .unwrap();
    assert_eq!(would["decision"], "would_deny");
    assert_eq!(
        would["reason"],
        "host unlisted.test is not on the allow-list"
    );
    assert_eq!(would["status"], 200);
    let internal = events
        .iter()
        .find(|e| e["host"] == "internal.test")
        .unwrap();
    assert_eq!(internal["decision"], "deny");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("decision=\"would_deny\",method=\"GET\",rule=\"none\"} 1"),
        "{metrics}"
    );
    // A would-be denial is not a denial (no denial-spike alert for a report-mode rollout); the
    // refusal destination safety still makes is.
    for line in [
        "portcullis_denials_total{reason=\"no_rule\"} 0",
        "portcullis_denials_total{reason=\"destination_prohibited\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn per_client_report_mode_and_407_is_never_relaxed() {
    let s = setup(
        "[[clients]]\nname = \"trial\"\ntoken = { value = \"trial-token\" }\nmode = \"report\"\n",
    )
    .await;
    let url = format!("https://nexus.test:{}/x", s.up.port());
    let out = curl_as(&s, &s.proxy_url("trial", "trial-token"), &url, &["-k"]).await;
    assert_eq!(out.status, 200, "trial's denial is only reported: {out:?}");
    assert!(
        s.up.last().header("authorization").is_none(),
        "no rule, so no credential"
    );
    let out = curl_as(&s, &s.proxy_url("trial", "bad"), &url, &["-k"]).await;
    assert_eq!(out.connect_status, 407, "{out:?}");
    let out = curl_as(&s, &s.proxy_url("frontend", FE_TOKEN), &url, &[]).await;
    assert_eq!(out.connect_status, 403, "frontend stays enforced: {out:?}");
    s.proxy.stop().await;
}

#[tokio::test]
async fn proxy_authorization_never_reaches_an_upstream() {
    let s = setup("").await;
    let proxy_fe = s.proxy_url("frontend", FE_TOKEN);
    // Intercepted: curl sends it on the CONNECT only; a header inside the tunnel is stripped too.
    let api = format!("https://api.test:{}/v1", s.up.port());
    let out = curl_as(
        &s,
        &proxy_fe,
        &api,
        &["-H", "Proxy-Authorization: Basic c2VjcmV0"],
    )
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    let seen = s.up.last();
    assert!(seen.header("proxy-authorization").is_none(), "{seen:?}");
    s.proxy.stop().await;

    // Plain forwarding (curl sends Proxy-Authorization with the request itself).
    let plain = http_upstream().await;
    let port = plain.port();
    let proxy = start_proxy(&format!(
        "[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"plain.test\" = [\"127.0.0.1\"] }}\n[[clients]]\nname = \"ci\"\ntoken = {{ value = \"ci-token\" }}\n[[hosts]]\nhost = \"plain.test\"\nports = [{port}]\n"
    ))
    .await;
    let url = format!("http://ci:ci-token@{}", proxy.addr);
    let out = curl(&["-x", &url, &format!("http://plain.test:{port}/seen")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(plain.last().header("proxy-authorization").is_none());
    proxy.stop().await;
}

#[test]
fn check_prints_what_each_client_can_reach() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "[credentials.fe]\nbearer = { value = \"x\" }\n[[clients]]\nname = \"frontend\"\ntoken = { value = \"t\" }\n[[clients]]\nname = \"release\"\nnetworks = [\"10.0.0.0/8\"]\n[[hosts]]\nhost = \"api.test\"\nclients = [\"frontend\"]\ncredential = \"fe\"\n[[hosts]]\nhost = \"pypi.org\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("frontend: api.test (credential fe), pypi.org"),
        "{stdout}"
    );
    assert!(stdout.contains("release: pypi.org"), "{stdout}");

    // A rule naming an undefined client is invalid.
    std::fs::write(
        &path,
        "[[hosts]]\nhost = \"a.test\"\nclients = [\"ghost\"]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hosts[0].clients[0]"));
}
