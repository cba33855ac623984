//! OIDC clients (spec §4) end to end, beyond verification (tests/oidc.rs): audit events name the
//! client and the token's `sub`; a CONNECT's identity holds for every request inside the
//! intercepted tunnel; claim templates in minted credentials — a `github_app` credential narrowed
//! to `{claims.repository}` mints once per repository under concurrent first requests (the
//! GitHub-API stand-in records what was asked), a client without the claim gets 403, `oauth2`
//! scopes and audience rendered per client with each build getting its own token; `check` lists
//! OIDC clients without contacting the issuer; and a canary: the real binary at debug level never
//! writes an OIDC token, in either form, nor one a client also sends in a header or a query.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::github::*;
use common::oauth::*;
use common::oidc::*;
use common::oidc_proxy::*;
use common::*;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

#[tokio::test]
async fn audit_events_name_the_client_and_the_token_subject() {
    let s = setup().await;
    let app = s.token(&s.rsa, "acme/app", "refs/heads/main");
    let lib = s.token(&s.ec, "acme/lib", "refs/heads/dev");
    assert_eq!(
        s.get(&app, "main-only.test", "/audit/app").await.status(),
        200
    );
    assert_eq!(s.get(&lib, "lib.test", "/audit/lib").await.status(), 200);
    let proxy = format!("http://static-ci:{STATIC_TOKEN}@{}", s.proxy.addr);
    let r = proxied_client(&proxy)
        .get(s.url("open.test", "/audit/static"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = s.proxy.audit_events(3).await;
    let event = |path: &str| -> &Value {
        events
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no event for {path}: {events:#?}"))
    };
    for (path, client, subject) in [
        (
            "/audit/app",
            "app-main",
            json!("repo:acme/app:ref:refs/heads/main"),
        ),
        (
            "/audit/lib",
            "lib-builds",
            json!("repo:acme/lib:ref:refs/heads/dev"),
        ),
        ("/audit/static", "static-ci", Value::Null),
    ] {
        let e = event(path);
        assert_eq!(e["client"], client, "{e}");
        assert!(e.as_object().unwrap().contains_key("subject"), "{e}");
        assert_eq!(e["subject"], subject, "{e}");
        for token in [&app, &lib] {
            assert!(!e.to_string().contains(signature(token)), "{e}");
        }
    }
    // Metric labels are the configured client names, never subjects.
    let metrics = s.proxy.metrics().await;
    for client in ["app-main", "lib-builds"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("portcullis_requests_total{")
                    && l.contains(&format!("client=\"{client}\""))),
            "{client}:\n{metrics}"
        );
    }
    assert!(!metrics.contains("repo:acme"), "{metrics}");
    s.proxy.stop().await;
}

#[tokio::test]
async fn the_connect_identity_holds_inside_an_intercepted_tunnel() {
    let s = setup().await;
    let app = s.token(&s.rsa, "acme/app", "refs/heads/main");
    let lib = s.token(&s.ec, "acme/lib", "refs/heads/main");
    let port = s.tls.port();
    let target = format!("main-only.test:{port}");
    let mut tcp = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let connect = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Bearer {app}\r\n\r\n"
    );
    let r = exchange_raw(&mut tcp, connect.as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut tls = tls_connect(tcp, roots_from_pem(&s.ca), "main-only.test")
        .await
        .unwrap();
    // Inside: no proxy credentials, another client's token, garbage — all are the CONNECT's
    // client, app-main, with its credential.
    let inner = [
        String::new(),
        format!("Proxy-Authorization: Bearer {lib}\r\n"),
        "Proxy-Authorization: Bearer not-a-jwt\r\n".to_owned(),
    ];
    for (i, auth) in inner.iter().enumerate() {
        let request = format!("GET /tunnel/{i} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
        let r = exchange_raw(&mut tls, request.as_bytes()).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        let seen = s.tls.last();
        assert!(seen.uri.ends_with(&format!("/tunnel/{i}")), "{seen:?}");
        let want = format!("Bearer {MAIN}");
        assert_eq!(seen.header("authorization"), Some(want.as_str()), "{i}");
        assert!(seen.header("proxy-authorization").is_none(), "{seen:?}");
    }
    drop(tls);
    let events = s.proxy.audit_events(4).await;
    let inside: Vec<&Value> = events.iter().filter(|e| e["kind"] == "request").collect();
    assert_eq!(inside.len(), 3, "{events:#?}");
    let tunnel = events.iter().find(|e| e["kind"] == "tunnel").unwrap();
    for e in inside.iter().copied().chain([tunnel]) {
        assert_eq!(e["client"], "app-main", "{e}");
        assert_eq!(e["subject"], "repo:acme/app:ref:refs/heads/main", "{e}");
    }
    // lib-builds may not reach main-only.test, on the CONNECT or inside; an expired token is 407.
    let auth = format!("Bearer {lib}");
    let r = get_via_connect(
        s.proxy.addr,
        Some(&auth),
        "main-only.test",
        port,
        "/x",
        &s.ca,
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    let mut expired = s.issuer.claims("acme/app", "refs/heads/main");
    expired["exp"] = json!(now() - 300);
    let auth = format!("Bearer {}", s.rsa.sign(&expired));
    let r = get_via_connect(
        s.proxy.addr,
        Some(&auth),
        "main-only.test",
        port,
        "/x",
        &s.ca,
    )
    .await;
    assert_eq!(r.status, 407, "{r:?}");
    assert!(r.proxy_status().contains("expired"), "{r:?}");
    assert_eq!(s.tls.count(), 3);
    // The Basic-password form on CONNECT (curl), too.
    let proxy = format!("http://oidc:{app}@{}", s.proxy.addr);
    let ca = s.proxy.dir.path().join("state/ca.pem");
    let url = format!("https://{target}/curl");
    let out = curl(&["-x", &proxy, "--cacert", ca.to_str().unwrap(), &url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    let want = format!("Bearer {MAIN}");
    assert_eq!(s.tls.last().header("authorization"), Some(want.as_str()));
    s.proxy.stop().await;
}

/// A proxy whose `gh` credential (GitHub App, minted by the stand-in at `api.github.test`) is
/// narrowed to the requesting build's repository; `org-builds` (acme repositories) and
/// `infra-jobs` (tokens without a repository claim) may use it.
struct Gh {
    proxy: TestProxy,
    api: Arc<GithubApi>,
    served: Served,
    issuer: Issuer,
    rsa: SigningKey,
    ca: String,
    _work: tempfile::TempDir,
}

async fn gh_setup() -> Gh {
    let work = tempfile::tempdir().unwrap();
    let key = app_key(work.path());
    let (api, served, api_ca) = github_api(&key, &installation_token(), &["api.github.test"]).await;
    let rsa = rsa_key("rsa-1");
    let issuer = issuer("issuer.test", &[&rsa]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api-ca.pem"), &api_ca).unwrap();
    issuer.write_ca(dir.path(), "issuer-ca.pem");
    std::fs::copy(&key.private, dir.path().join("gh-app.pem")).unwrap();
    let port = served.port();
    let clients = [
        oidc_client(
            "org-builds",
            &issuer.url,
            "repository_owner = \"acme\", repository = \"acme/*\"",
        ),
        oidc_client("infra-jobs", &issuer.url, "project = \"infra\""),
    ]
    .concat();
    let body = format!(
        r#"
[tls]
extra_upstream_ca = ["issuer-ca.pem", "api-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "issuer.test" = ["127.0.0.1"], "api.github.test" = ["127.0.0.1"] }}
[credentials.gh]
github_app = {{ app_id = "{APP_ID}", installation_id = "{INSTALLATION_ID}", private_key = {{ file = "gh-app.pem" }}, api_url = "https://api.github.test:{port}", repositories = ["{{claims.repository}}"], permissions = {{ contents = "read" }} }}
{clients}
[[hosts]]
host = "api.github.test"
ports = [{port}]
paths = ["/repos/**"]
credential = "gh"
"#
    );
    let proxy = start_proxy_in(dir, &body).await;
    let ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    Gh {
        proxy,
        api,
        served,
        issuer,
        rsa,
        ca,
        _work: work,
    }
}

impl Gh {
    fn client(&self, repository: &str) -> reqwest::Client {
        let jwt = self
            .rsa
            .sign(&self.issuer.claims(repository, "refs/heads/main"));
        bearer_client(&self.proxy.url(), &jwt, Some(&self.ca))
    }

    fn url(&self, path: &str) -> String {
        format!("https://api.github.test:{}{path}", self.served.port())
    }

    /// The `repositories` of every token request, sorted.
    fn requested(&self) -> Vec<Value> {
        let mut all: Vec<Value> = self
            .api
            .bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| b["repositories"].clone())
            .collect();
        all.sort_by_key(Value::to_string);
        all
    }
}

#[tokio::test]
async fn github_app_repositories_are_rendered_per_build_with_one_mint_per_repository() {
    let s = gh_setup().await;
    s.api.delay_ms.store(300, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for repository in ["acme/app", "acme/lib"] {
        let client = s.client(repository);
        for i in 0..20 {
            let (client, url) = (client.clone(), s.url(&format!("/repos/{repository}/{i}")));
            tasks.push(tokio::spawn(async move {
                let r = client.get(url).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, "github ok".to_owned()));
    }
    assert!(s.api.rejections.lock().unwrap().is_empty());
    assert_eq!(s.api.attempts(), 2, "one token request per repository");
    assert_eq!(s.api.mints(), 2);
    assert_eq!(s.requested(), [json!(["app"]), json!(["lib"])]);
    assert_eq!(
        s.api.last_body()["permissions"],
        json!({ "contents": "read" })
    );
    // Cached per repository: more requests mint nothing; a third repository gets its own token.
    for repository in ["acme/app", "acme/lib"] {
        let r = s
            .client(repository)
            .get(s.url("/repos/again"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(s.api.mints(), 2);
    let r = s
        .client("acme/tools")
        .get(s.url("/repos/acme/tools"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.api.mints(), 3);
    assert_eq!(s.api.last_body()["repositories"], json!(["tools"]));
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_client_without_the_templated_claim_gets_403_naming_credential_and_claim() {
    let s = gh_setup().await;
    let mut c = s.issuer.claims("acme/app", "refs/heads/main");
    let map = c.as_object_mut().unwrap();
    map.remove("repository");
    map.remove("repository_owner");
    map.insert("project".into(), json!("infra"));
    map.insert("sub".into(), json!("project:infra"));
    let auth = format!("Bearer {}", s.rsa.sign(&c));
    let port = s.served.port();
    let r = get_via_connect(
        s.proxy.addr,
        Some(&auth),
        "api.github.test",
        port,
        "/repos/x",
        &s.ca,
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    let status = r.proxy_status();
    assert!(status.contains("error=http_request_denied"), "{status}");
    assert!(
        status.contains("credential gh needs claim repository"),
        "{status}"
    );
    assert_eq!(s.api.attempts(), 0, "nothing minted for it");
    // The identity was fine: org builds still get their token.
    let r = s
        .client("acme/app")
        .get(s.url("/repos/acme/app"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.api.mints(), 1);
    s.proxy.stop().await;
}

#[tokio::test]
async fn oauth2_scopes_and_audience_are_rendered_per_client() {
    let (tokens, endpoint) = token_server(3600).await;
    let up = http_upstream().await;
    let rsa = rsa_key("rsa-1");
    let issuer = issuer("issuer.test", &[&rsa]).await;
    let dir = tempfile::tempdir().unwrap();
    issuer.write_ca(dir.path(), "issuer-ca.pem");
    std::fs::write(dir.path().join("client-secret"), CLIENT_SECRET).unwrap();
    let clients = oidc_client("org-builds", &issuer.url, "repository = \"acme/*\"");
    let (auth, res) = (endpoint.port(), up.port());
    let proxy = start_proxy_in(
        dir,
        &format!(
            r#"
[tls]
extra_upstream_ca = ["issuer-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "issuer.test" = ["127.0.0.1"], "auth.test" = ["127.0.0.1"], "res.test" = ["127.0.0.1"] }}
[credentials.api]
oauth2 = {{ token_url = "http://auth.test:{auth}/oauth2/token", client_id = "{CLIENT_ID}", client_secret = {{ file = "client-secret" }}, scopes = ["repo:{{claims.repository}}", "read"], audience = "https://api.example.com/{{claims.repository_owner}}" }}
{clients}
[[hosts]]
host = "res.test"
ports = [{res}]
credential = "api"
plaintext_credentials = true
"#
        ),
    )
    .await;
    let url = format!("http://res.test:{res}/resource");
    let get = |repository: &str| {
        let jwt = rsa.sign(&issuer.claims(repository, "refs/heads/main"));
        let client = bearer_client(&proxy.url(), &jwt, None);
        let url = url.clone();
        async move { client.get(url).send().await.unwrap().status() }
    };
    // Each repository's first request mints with its own scope; later ones reuse that token.
    for (round, repository) in ["acme/app", "acme/lib", "acme/app", "acme/lib"]
        .iter()
        .enumerate()
    {
        assert_eq!(get(repository).await, 200, "{repository}");
        let issued = tokens.tokens();
        assert_eq!(issued.len(), (round + 1).min(2), "{repository}");
        let which = usize::from(*repository == "acme/lib");
        let want = format!("Bearer {}", issued[which]);
        assert_eq!(
            up.last().header("authorization"),
            Some(want.as_str()),
            "{repository}"
        );
    }
    let seen = tokens.seen.lock().unwrap().clone();
    let scopes: Vec<&str> = seen.iter().map(|m| m.form["scope"].as_str()).collect();
    assert_eq!(scopes, ["repo:acme/app read", "repo:acme/lib read"]);
    for m in &seen {
        assert_eq!(m.form["audience"], "https://api.example.com/acme");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_lists_each_oidc_client_without_contacting_the_issuer() {
    let sink = tcp_sink().await;
    let iss = format!("https://issuer.test:{}", sink.port());
    let dir = tempfile::tempdir().unwrap();
    let clients = [
        oidc_client(
            "app-main",
            &iss,
            "repository = \"acme/app\", ref = \"refs/heads/main\"",
        ),
        oidc_client(
            "org-builds",
            &iss,
            "repository_owner = \"acme\", repository = \"acme/*\"",
        ),
    ]
    .concat();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(
        &path,
        format!("[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"issuer.test\" = [\"127.0.0.1\"] }}\n{clients}\n[[hosts]]\nhost = \"api.test\"\nclients = [\"app-main\"]\n[[hosts]]\nhost = \"pypi.org\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "-c", path.to_str().unwrap()])
        .env_remove("PORTCULLIS_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let oidc = format!("oidc issuer={iss} audience={AUDIENCE}");
    for claims in [
        ["repository=acme/app", "ref=refs/heads/main"],
        ["repository_owner=acme", "repository=acme/*"],
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(&oidc) && claims.iter().all(|c| l.contains(c)));
        assert!(
            line.is_some(),
            "no line with {oidc} and {claims:?}:\n{stdout}"
        );
    }
    holds_for(
        "check never contacts the issuer",
        std::time::Duration::from_millis(300),
        || async { sink.accepted() == 0 },
    )
    .await;
}

/// Checks `r`'s status and keeps its headers and body for the canary's search.
async fn keep(r: reqwest::Response, want: u16, bodies: &mut Vec<String>) {
    assert_eq!(r.status(), want, "{}", proxy_status(&r));
    bodies.push(format!("{:?}", r.headers()));
    bodies.push(r.text().await.unwrap());
}

/// The real binary at debug level, audit on stdout: OIDC tokens as Bearer and as Basic password
/// (reqwest and curl), one also sent by the client in a header and a query, and refused ones
/// (expired, altered); no token and no signature segment in stdout, stderr, /metrics or any
/// response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_no_oidc_token_reaches_any_output() {
    let (rsa, ec) = (rsa_key("rsa-1"), ec_key("ec-1"));
    let issuer = issuer("issuer.test", &[&rsa, &ec]).await;
    let up = http_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    issuer.write_ca(dir.path(), "issuer-ca.pem");
    let port = up.port();
    let clients = oidc_client("org-builds", &issuer.url, "repository = \"acme/*\"");
    let body = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[audit]\noutput = \"stdout\"\n[tls]\nextra_upstream_ca = [\"issuer-ca.pem\"]\n[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"issuer.test\" = [\"127.0.0.1\"], \"open.test\" = [\"127.0.0.1\"] }}\n[credentials.main]\nbearer = {{ value = \"{MAIN}\" }}\n{clients}\n[[hosts]]\nhost = \"open.test\"\nports = [{port}]\ncredential = \"main\"\nplaintext_credentials = true\n"
    );
    let path = dir.path().join("canary.toml");
    std::fs::write(&path, body).unwrap();
    let running = spawn_binary(
        &["run", "-c", path.to_str().unwrap()],
        &[("RUST_LOG", "debug")],
        std::process::Stdio::piped(),
    );
    let url = |p: &str| format!("http://open.test:{port}{p}");
    let bearer = rsa.sign(&issuer.claims("acme/app", "refs/heads/main"));
    let basic_jwt = ec.sign(&issuer.claims("acme/lib", "refs/heads/main"));
    let noted = rsa.sign(&issuer.claims("acme/tools", "refs/heads/main"));
    let mut expired = issuer.claims("acme/app", "refs/heads/main");
    expired["exp"] = json!(now() - 300);
    let expired = ec.sign(&expired);
    let tampered = altered(&bearer, |c| c["repository"] = json!("acme/admin"));
    let proxy_addr = running.proxy.trim_start_matches("http://").to_owned();
    let with_password = |jwt: &str| format!("http://oidc:{jwt}@{proxy_addr}");
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let r = bearer_client(&running.proxy, &bearer, None)
            .get(url("/a"))
            .send()
            .await;
        keep(r.unwrap(), 200, &mut bodies).await;
        let r = proxied_client(&with_password(&basic_jwt))
            .get(url("/b"))
            .send()
            .await;
        keep(r.unwrap(), 200, &mut bodies).await;
    }
    let out = curl(&["-x", &with_password(&basic_jwt), "-i", &url("/curl")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    bodies.push(out.body);
    // The client also sends its token in a header and a query (to a route that echoes nothing).
    let r = bearer_client(&running.proxy, &noted, None)
        .get(url(&format!("/c/count?note={noted}")))
        .header("x-client-note", noted.as_str())
        .send()
        .await;
    keep(r.unwrap(), 200, &mut bodies).await;
    let r = bearer_client(&running.proxy, &expired, None)
        .get(url("/d"))
        .send()
        .await;
    keep(r.unwrap(), 407, &mut bodies).await;
    let r = proxied_client(&with_password(&tampered))
        .get(url("/e"))
        .send()
        .await;
    keep(r.unwrap(), 407, &mut bodies).await;
    let out = curl(&["-x", &with_password(&tampered), "-i", &url("/f")]).await;
    assert_eq!(out.status, 407, "{out:?}");
    bodies.push(out.body);
    let metrics = running.metrics().await;
    assert_eq!(oidc_count(&metrics, &issuer.url, "ok"), 3.0, "{metrics}");
    let collected = running.stop_and_collect();
    assert!(
        collected.stdout.lines().count() >= 11,
        "audit: {}",
        collected.stdout
    );
    assert!(
        collected.stdout.contains("\"client\":\"org-builds\""),
        "{}",
        collected.stdout
    );
    let tokens = [&bearer, &basic_jwt, &noted, &expired, &tampered];
    let mut secrets: Vec<&str> = tokens.iter().map(|t| t.as_str()).collect();
    secrets.extend(tokens.iter().map(|t| signature(t)));
    collected.assert_free_of(&secrets, &metrics, &bodies);
}
