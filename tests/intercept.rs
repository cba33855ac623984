//! Credential injection with TLS interception, over real sockets: curl, reqwest and git against
//! local TLS upstreams (test CA) reached by name through `network.resolve`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

const BEARER: &str = "bearer-secret-7f3a";
const BASIC_PASSWORD: &str = "basic-secret-91c2";
const API_KEY: &str = "header-secret-d4e8";

struct Setup {
    proxy: TestProxy,
    up: Upstream,
    ca: PathBuf,
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("https://secure.test:{}{path}", self.up.port())
    }

    async fn curl(&self, extra: &[&str], path: &str) -> CurlOut {
        let (proxy, url) = (self.proxy.url(), self.url(path));
        let mut args = vec!["-x", &proxy, "--cacert", self.ca.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args).await
    }
}

/// Proxy + TLS upstream `secure.test` with one rule per credential kind.
async fn setup(extra_rules: &str) -> Setup {
    let up = tls_upstream(&["secure.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    up.write_ca(dir.path(), "upstream-ca.pem");
    std::fs::write(
        dir.path().join("nexus-password"),
        format!("{BASIC_PASSWORD}\n"),
    )
    .unwrap();
    let port = up.port();
    let config = format!(
        r#"
[tls]
extra_upstream_ca = ["upstream-ca.pem"]

[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "secure.test" = ["127.0.0.1"], "plain.test" = ["127.0.0.1"], "plain-ok.test" = ["127.0.0.1"], "untrusted.test" = ["127.0.0.1"] }}

[credentials.gh]
bearer = {{ value = "{BEARER}" }}

[credentials.nexus]
basic = {{ username = "svc-build", password = {{ file = "nexus-password" }} }}

[credentials.api]
header = {{ name = "X-API-Key", prefix = "key ", value = {{ value = "{API_KEY}" }} }}

[[hosts]]
host = "secure.test"
ports = [{port}]
paths = ["/bearer/**", "/echo"]
credential = "gh"

[[hosts]]
host = "secure.test"
ports = [{port}]
paths = ["/basic/**"]
credential = "nexus"

[[hosts]]
host = "secure.test"
ports = [{port}]
methods = ["GET"]
paths = ["/header/**"]
credential = "api"

[[hosts]]
host = "secure.test"
ports = [{port}]
paths = ["/open/**", "/stream/*"]
{extra_rules}
"#
    );
    let proxy = start_proxy_in(dir, &config).await;
    let ca = proxy.dir.path().join("state/ca.pem");
    assert!(ca.exists(), "CA generated at first start");
    Setup { proxy, up, ca }
}

#[tokio::test]
async fn curl_gets_200_without_holding_the_credential() {
    let s = setup("").await;
    let out = s.curl(&["--http1.1"], "/bearer/repos").await;
    assert_eq!(out.status, 200, "{out:?}");
    let seen = s.up.last();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {BEARER}").as_str())
    );
    assert_eq!(seen.header("via"), Some("1.1 portcullis"));
    // The upstream negotiated h2 by ALPN, so the authority travels as :authority.
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.uri, s.url("/bearer/repos"));

    // A wrong client-sent Authorization is replaced, not merged.
    let out = s
        .curl(
            &[
                "-H",
                "Authorization: Bearer client-guess",
                "-H",
                "authorization: x",
            ],
            "/bearer/x",
        )
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let seen = s.up.last();
    assert_eq!(
        seen.headers["authorization"],
        vec![format!("Bearer {BEARER}")]
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn basic_and_header_kinds_are_verified_at_the_upstream() {
    let s = setup("").await;
    // The upstream's /basic/USER/PASS route answers 401 unless exactly that credential arrives.
    let out = s
        .curl(&[], &format!("/basic/svc-build/{BASIC_PASSWORD}"))
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.body, "authorized\n");
    assert_eq!(
        s.up.last().header("authorization"),
        Some(basic("svc-build", BASIC_PASSWORD).as_str())
    );

    let out = s.curl(&["-H", "X-API-Key: mine"], "/header/v1").await;
    assert_eq!(out.status, 200, "{out:?}");
    let seen = s.up.last();
    assert_eq!(seen.headers["x-api-key"], vec![format!("key {API_KEY}")]);
    assert!(seen.header("authorization").is_none());

    // methods = ["GET"]: a POST to the same path is refused inside the tunnel.
    let out = s.curl(&["-X", "POST", "-d", "x"], "/header/v1").await;
    assert_eq!(out.status, 403, "{out:?}");
    assert!(out.body.contains("method POST is not allowed"), "{out:?}");
    s.proxy.stop().await;
}

#[tokio::test]
async fn http2_inside_the_tunnel() {
    let s = setup("").await;
    let out = s.curl(&["--http2"], "/bearer/h2").await;
    assert_eq!(out.status, 200, "{out:?}");
    // The upstream side negotiated h2 too.
    assert_eq!(s.up.last().version, "HTTP/2.0");
    assert_eq!(
        s.up.last().header("authorization"),
        Some(format!("Bearer {BEARER}").as_str())
    );

    let ca = std::fs::read_to_string(&s.ca).unwrap();
    let client = proxied_tls_client(&s.proxy.url(), &ca);
    let resp = client.get(s.url("/bearer/reqwest")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "client side is h2 by ALPN"
    );
    // Request bodies stream through interception too.
    let resp = client
        .post(s.url("/echo"))
        .body("through the interceptor")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "through the interceptor");
    s.proxy.stop().await;
}

#[tokio::test]
async fn paths_outside_the_rules_and_misdirected_hosts_are_refused() {
    let s = setup("").await;
    let before = s.up.count();
    let out = s.curl(&[], "/admin/delete").await;
    assert_eq!(out.status, 403, "{out:?}");
    assert_eq!(
        out.body,
        "path /admin/delete is not allowed for host secure.test\n"
    );
    // Dot segments do not sneak past a glob.
    let out = s.curl(&["--path-as-is"], "/open/../admin").await;
    assert_eq!(out.status, 403, "{out:?}");

    let out = s
        .curl(&["--http1.1", "-H", "Host: other.test"], "/open/x")
        .await;
    assert_eq!(out.status, 421, "{out:?}");
    assert!(out.body.contains("other.test"), "{out:?}");
    // An absolute-form request inside the tunnel naming another host is refused too.
    let out = s
        .curl(
            &["--http1.1", "--request-target", "https://other.test/open/x"],
            "/open/x",
        )
        .await;
    assert_eq!(out.status, 421, "{out:?}");
    assert_eq!(s.up.count(), before, "nothing refused reached the upstream");
    s.proxy.stop().await;
}

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_a_502() {
    let untrusted = tls_upstream(&["untrusted.test"]).await;
    let s = setup(&format!(
        "\n[[hosts]]\nhost = \"untrusted.test\"\nports = [{}]\nintercept = \"always\"\n",
        untrusted.port()
    ))
    .await;
    let url = format!("https://untrusted.test:{}/", untrusted.port());
    let out = curl(&[
        "-x",
        &s.proxy.url(),
        "--cacert",
        s.ca.to_str().unwrap(),
        "-i",
        &url,
    ])
    .await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(out.body.contains("error=tls_certificate_error"), "{out:?}");
    assert_eq!(
        untrusted.count(),
        0,
        "no request was sent over the unverified connection"
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn credentials_over_plain_http_need_plaintext_credentials() {
    let plain = http_upstream().await;
    let port = plain.port();
    let s = setup(&format!(
        r#"
[[hosts]]
host = "plain.test"
ports = [{port}]
credential = "gh"

[[hosts]]
host = "plain-ok.test"
ports = [{port}]
credential = "gh"
plaintext_credentials = true
"#
    ))
    .await;
    let client = proxied_client(&s.proxy.url());
    let resp = client
        .get(format!("http://plain.test:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(proxy_status(&resp).contains("plain http"));
    assert_eq!(plain.count(), 0);

    let resp = client
        .get(format!("http://plain-ok.test:{port}/"))
        .header("authorization", "Bearer client")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        plain.last().headers["authorization"],
        vec![format!("Bearer {BEARER}")]
    );
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_first_connections_mint_one_certificate() {
    let s = setup("").await;
    assert_eq!(s.proxy.handle.state().interceptor.issued(), 0);
    let ca = std::fs::read_to_string(&s.ca).unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        // A client each: 50 separate connections, 50 CONNECTs, 50 TLS handshakes.
        let client = proxied_tls_client(&s.proxy.url(), &ca);
        let url = s.url(&format!("/open/{i}"));
        tasks.push(tokio::spawn(async move {
            client.get(url).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(s.proxy.handle.state().interceptor.issued(), 1);
    assert_eq!(s.up.count(), 50);
    s.proxy.stop().await;
}

#[tokio::test]
async fn git_clone_over_https_with_the_injected_credential() {
    let work = tempfile::tempdir().unwrap();
    let repo = make_repo(work.path());
    let up = tls_upstream_with(
        &["git.test"],
        Some(StaticFiles {
            root: repo.parent().unwrap().to_path_buf(),
            authorization: basic("svc-build", BASIC_PASSWORD),
        }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    up.write_ca(dir.path(), "upstream-ca.pem");
    std::fs::write(dir.path().join("pw"), BASIC_PASSWORD).unwrap();
    let proxy = start_proxy_in(
        dir,
        &format!(
            r#"
[tls]
extra_upstream_ca = ["upstream-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "git.test" = ["127.0.0.1"] }}
[credentials.nexus]
basic = {{ username = "svc-build", password = {{ file = "pw" }} }}
[[hosts]]
host = "git.test"
ports = [{}]
methods = ["GET", "HEAD"]
paths = ["/git/**"]
credential = "nexus"
"#,
            up.port()
        ),
    )
    .await;
    let ca = proxy.dir.path().join("state/ca.pem");
    let dest = work.path().join("clone");
    let url = format!("https://git.test:{}/git/repo.git", up.port());
    let out = git_clone(&url, &dest, &proxy.url(), &ca, work.path()).await;
    assert!(
        out.status.success(),
        "git clone failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let readme = std::fs::read_to_string(work.path().join("clone/README")).unwrap();
    assert_eq!(readme, "cloned through portcullis\n");
    let seen = up.seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(seen
        .iter()
        .all(|s| s.header("authorization") == Some(basic("svc-build", BASIC_PASSWORD).as_str())));
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_distrusts_the_proxy_ca_fails_cleanly_and_others_continue() {
    let s = setup("").await;
    let out = curl(&["-x", &s.proxy.url(), &s.url("/open/x")]).await;
    assert_ne!(out.exit, 0, "no CA trust: curl must refuse: {out:?}");
    let out = s.curl(&[], "/open/after").await;
    assert_eq!(out.status, 200, "{out:?}");
    s.proxy.stop().await;
}

#[tokio::test]
async fn portcullis_env_sourced_in_a_shell_is_all_curl_needs() {
    let s = setup("").await;
    let config = s.proxy.dir.path().join("portcullis.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "env",
            "-c",
            config.to_str().unwrap(),
            "--proxy-url",
            &s.proxy.url(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env_file = s.proxy.dir.path().join("portcullis.env");
    std::fs::write(&env_file, &out.stdout).unwrap();
    let script = format!(
        ". '{}' && curl -sS --max-time 20 '{}'",
        env_file.display(),
        s.url("/bearer/from-env")
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("/bearer/from-env"));
    assert_eq!(
        s.up.last().header("authorization"),
        Some(format!("Bearer {BEARER}").as_str())
    );
    s.proxy.stop().await;
}
