//! From traffic to policy (spec §1): a proxy in report mode records mixed traffic — two clients,
//! tunneled and intercepted, several subdomains of one domain — and `portcullis learn` turns its
//! audit into rules that pass `check`, against which `check --replay` of the same audit exits 0;
//! with one learned rule removed, `--replay` exits 2 naming the event that would break.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// `portcullis ARGS`: exit code, stdout, stderr.
fn portcullis(args: &[&str]) -> (i32, String, String) {
    run_portcullis(args, &[])
}

fn base_config(port: u16, report: bool) -> String {
    format!(
        r#"
[policy]
mode = "{}"
[tls]
extra_upstream_ca = ["upstream-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "a.files.test" = ["127.0.0.1"], "b.files.test" = ["127.0.0.1"], "pkg.test" = ["127.0.0.1"], "api.test" = ["127.0.0.1"] }}
[credentials.api]
bearer = {{ value = "learn-api-token" }}
[[clients]]
name = "frontend"
token = {{ value = "fe-token" }}
[[clients]]
name = "backend"
token = {{ value = "be-token" }}
[[hosts]]
host = "api.test"
ports = [{port}]
credential = "api"
paths = ["/v1/**"]
"#,
        if report { "report" } else { "enforce" }
    )
}

/// Records the traffic; returns the proxy (its folder holds audit.log and upstream-ca.pem).
async fn record() -> (TestProxy, Upstream) {
    let up = tls_upstream(&["a.files.test", "b.files.test", "pkg.test", "api.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    up.write_ca(dir.path(), "upstream-ca.pem");
    let proxy = start_proxy_in(dir, &base_config(up.port(), true)).await;
    let ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    let upstream_ca = std::fs::read_to_string(proxy.dir.path().join("upstream-ca.pem")).unwrap();
    // No pooling: each request's tunnel ends (and is audited) when its response is read.
    let client = |user: &str, token: &str| {
        let proxy_url = format!("http://{user}:{token}@{}", proxy.addr);
        let mut builder = reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(proxy_url).unwrap())
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(0);
        for pem in [&ca, &upstream_ca] {
            builder = builder
                .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
        }
        builder.build().unwrap()
    };
    let (fe, be) = (
        client("frontend", "fe-token"),
        client("backend", "be-token"),
    );
    let url = |host: &str, path: &str| format!("https://{host}:{}{path}", up.port());
    // Tunneled (no rule: report mode lets them through).
    for host in ["a.files.test", "b.files.test"] {
        let r = fe.get(url(host, "/wheel.whl")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{host}");
        r.bytes().await.unwrap();
    }
    let r = be.get(url("pkg.test", "/index")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // Intercepted (the rule's credential), one path inside the rule and one outside it.
    let r = fe
        .get(url("api.test", "/v1/builds/7"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let r = be
        .post(url("api.test", "/v2/deploys/prod/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "report mode lets the path through");
    r.bytes().await.unwrap();
    // Tunnels are audited when they end: close the clients' connections.
    drop((fe, be));
    let events = proxy.audit_events(7).await;
    assert_eq!(
        events.len(),
        7,
        "5 tunnels and 2 intercepted requests: {events:#?}"
    );
    (proxy, up)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn learned_rules_pass_check_and_replay_and_a_missing_one_is_named() {
    let (proxy, up) = record().await;
    let dir = proxy.dir.path();
    let audit = dir.join("audit.log");
    let audit = audit.to_str().unwrap();

    // Everything the audit shows, learned from scratch.
    let (code, learned, stderr) = portcullis(&["learn", "--audit", audit]);
    assert_eq!(code, 0, "{stderr}");
    assert!(learned.contains("host = \"*.files.test\""), "{learned}");
    assert!(learned.contains("host = \"pkg.test\""), "{learned}");
    assert!(
        learned.contains("methods = [\"GET\", \"POST\"]"),
        "{learned}"
    );
    assert!(
        learned.contains("paths = [\"/v1/builds/**\", \"/v2/deploys/**\"]"),
        "{learned}"
    );
    let network = format!("[network]\nallow_cidrs = [\"127.0.0.0/8\"]\n{learned}");
    let path = write(dir, "learned.toml", &network);
    let (code, _, stderr) = portcullis(&["check", "-c", &path]);
    assert_eq!(code, 0, "the learned rules pass check: {stderr}\n{network}");
    let (code, stdout, stderr) = portcullis(&["check", "-c", &path, "--replay", audit]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("0 that went through would now be denied"),
        "{stdout}"
    );

    // One rule gone: the replay fails and names what would break.
    let without: String = network.replace("host = \"pkg.test\"", "host = \"other.test\"");
    let path = write(dir, "learned-minus-one.toml", &without);
    let (code, stdout, _) = portcullis(&["check", "-c", &path, "--replay", audit]);
    assert_eq!(code, 2, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "CONNECT pkg.test:{} by backend: was allowed, now denied",
            up.port()
        )),
        "{stdout}"
    );
    // The audit from stdin works the same.
    let out = Command::new(BIN)
        .args(["check", "-c", &path, "--replay", "-"])
        .stdin(std::fs::File::open(audit).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // Against the recording's own configuration: only what it does not allow yet is learned,
    // for the clients it defines; base + learned passes check and the replay.
    let base = base_config(up.port(), false);
    let base_path = write(dir, "base.toml", &base);
    let (code, learned, stderr) = portcullis(&["-c", &base_path, "learn", "--audit", audit]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !learned.contains("/v1/builds"),
        "already allowed: {learned}"
    );
    assert!(learned.contains("clients = [\"frontend\"]"), "{learned}");
    assert!(learned.contains("clients = [\"backend\"]"), "{learned}");
    let combined = write(dir, "combined.toml", &format!("{base}\n{learned}"));
    let (code, stdout, stderr) = portcullis(&["check", "-c", &combined, "--replay", audit]);
    assert_eq!(code, 0, "{stdout}{stderr}\n{learned}");
    let (_, base_replay, _) = portcullis(&["check", "-c", &base_path, "--replay", audit]);
    assert!(
        base_replay.contains("was allowed, now denied"),
        "{base_replay}"
    );
    // One client's events only.
    let (code, learned, _) = portcullis(&["learn", "--audit", audit, "--client", "backend"]);
    assert_eq!(code, 0);
    assert!(
        learned.contains("pkg.test") && !learned.contains("files.test"),
        "{learned}"
    );
    // A line that is not an event is named.
    let bad = write(dir, "bad.log", "{\"kind\":\"tunnel\"}\n");
    let (code, _, stderr) = portcullis(&["learn", "--audit", &bad]);
    assert_eq!(code, 1);
    assert!(stderr.contains("audit line 1"), "{stderr}");
}
