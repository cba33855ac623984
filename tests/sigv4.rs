//! The `aws_sigv4` credential kind (spec §10) over real sockets: boto3, configured with dummy
//! keys and otherwise unmodified, PUTs and GETs an object through the proxy — intercepted HTTPS
//! and plain HTTP — against an S3-like server that recomputes every signature with botocore's
//! signer and the real secret (tests/support/sigv4_server.py), so nothing here trusts the signing
//! crate. Payload hashing per service, the 10 MiB limit (413), session tokens, refused
//! chunk-signed bodies, `check` errors, and a canary: the secret key and the session token reach
//! no output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const ACCESS_KEY: &str = "AKIDPORTCULLISREAL01";
const SECRET: &str = "CANARY-aws-secret-9c41e7/real+key";
const SESSION_TOKEN: &str = "CANARY-aws-session-5e0d2b";

fn support(file: &str) -> String {
    format!("{}/tests/support/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// The verifying server, its port and the JSON line it printed for each request.
struct S3 {
    _child: ChildGuard,
    port: u16,
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
    ca_pem: Option<String>,
    _certs: tempfile::TempDir,
}

impl S3 {
    fn seen(&self) -> Vec<serde_json::Value> {
        self.seen.lock().unwrap().clone()
    }
}

/// Starts the verifying server for `service` (TLS for `tls_name` when given).
fn s3_server(service: &str, tls_name: Option<&str>, session_token: Option<&str>) -> S3 {
    let certs = tempfile::tempdir().unwrap();
    let mut args = vec![
        support("sigv4_server.py"),
        ACCESS_KEY.into(),
        "eu-west-1".into(),
        service.into(),
    ];
    let mut ca_pem = None;
    if let Some(name) = tls_name {
        let (ca, cert, key) = test_pki_files(certs.path(), &[name]);
        args.push(cert.to_str().unwrap().into());
        args.push(key.to_str().unwrap().into());
        ca_pem = Some(ca);
    }
    let mut command = Command::new("python3");
    command
        .args(&args)
        .env("SIGV4_SECRET", SECRET)
        .stderr(Stdio::inherit());
    if let Some(token) = session_token {
        command.env("SIGV4_SESSION_TOKEN", token);
    }
    let (child, port, seen) = json_lines_server(command);
    S3 {
        _child: child,
        port,
        seen,
        ca_pem,
        _certs: certs,
    }
}

/// The proxy configuration: `artifacts` signs for `service`, on `host:port`.
fn config(host: &str, port: u16, service: &str, session_token: bool) -> String {
    let token = match session_token {
        true => ", session_token = { file = \"aws-session-token\" }",
        false => "",
    };
    format!(
        r#"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "{host}" = ["127.0.0.1"] }}

[credentials.artifacts]
aws_sigv4 = {{ access_key_id = {{ file = "aws-key-id" }}, secret_access_key = {{ file = "aws-secret" }}, region = "eu-west-1", service = "{service}"{token} }}

[[hosts]]
host = "{host}"
ports = [{port}]
credential = "artifacts"
plaintext_credentials = true

[tls]
extra_upstream_ca = ["upstream-ca.pem"]
"#
    )
}

/// A proxy directory holding the key files and the upstream CA.
fn proxy_dir(s3: &S3) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("aws-key-id"), format!("{ACCESS_KEY}\n")).unwrap();
    std::fs::write(dir.path().join("aws-secret"), format!("{SECRET}\n")).unwrap();
    std::fs::write(dir.path().join("aws-session-token"), SESSION_TOKEN).unwrap();
    // A plain-http server has no CA: the proxy then trusts the upstream CA of another test run.
    let ca = s3
        .ca_pem
        .clone()
        .unwrap_or_else(|| test_pki(&["unused.test"]).0);
    std::fs::write(dir.path().join("upstream-ca.pem"), ca).unwrap();
    dir
}

/// Runs tests/support/boto3_roundtrip.py; its one JSON line.
async fn boto3(
    endpoint: &str,
    proxy: &str,
    ca: Option<&Path>,
    env: &[(&str, &str)],
) -> serde_json::Value {
    let mut command = tokio::process::Command::new("python3");
    command
        .arg(support("boto3_roundtrip.py"))
        .arg(endpoint)
        .arg(proxy)
        .arg(ca.map_or("-".into(), |p| p.display().to_string()))
        .arg("eu-west-1")
        // No AWS configuration of this machine leaks in.
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env("NO_PROXY", "");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("boto3 finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "boto3_roundtrip.py failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

/// The server's lines once it has printed `n` (it prints before answering; the reader may lag).
async fn seen_at_least(s3: &S3, n: usize) -> Vec<serde_json::Value> {
    eventually(
        "the server's request lines",
        Duration::from_secs(5),
        || async { s3.seen().len() >= n },
    )
    .await;
    s3.seen()
}

fn ok_roundtrip() -> serde_json::Value {
    serde_json::json!({"put": 200, "get": 200, "same": true})
}

#[tokio::test]
async fn boto3_with_dummy_keys_puts_and_gets_through_interception() {
    let s3 = s3_server("s3", Some("s3.test"), None);
    let proxy = start_proxy_in(proxy_dir(&s3), &config("s3.test", s3.port, "s3", false)).await;
    let ca = proxy.dir.path().join("state/ca.pem");
    let endpoint = format!("https://s3.test:{}", s3.port);
    let result = boto3(&endpoint, &proxy.url(), Some(&ca), &[]).await;
    assert_eq!(result, ok_roundtrip(), "{:?}", s3.seen());
    let seen = seen_at_least(&s3, 2).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    for request in &seen {
        assert_eq!(request["verified"], true, "{request}");
        let signed: Vec<&str> = request["signed_headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for name in ["host", "x-amz-date", "x-amz-content-sha256"] {
            assert!(signed.contains(&name), "{name} signed: {signed:?}");
        }
        assert!(!signed.contains(&"user-agent"), "{signed:?}");
    }
    assert_eq!(seen[0]["method"], "PUT");
    assert_eq!(seen[0]["body_len"], 19_000);
    // Over HTTPS boto3 does not hash the body; the unsigned mode it chose is what was signed.
    let mode = seen[0]["content_sha256"].as_str().unwrap();
    assert!(mode.contains("UNSIGNED-PAYLOAD"), "{mode}");
    let events = proxy.audit_events(3).await;
    let requests: Vec<_> = events.iter().filter(|e| e["method"] != "CONNECT").collect();
    assert_eq!(requests.len(), 2, "{events:?}");
    assert!(
        requests
            .iter()
            .all(|e| e["credential"] == "artifacts" && e["intercepted"] == true),
        "{events:?}"
    );
    assert_eq!(
        proxy
            .metric("portcullis_credential_injections_total{credential=\"artifacts\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn boto3_over_plain_http_has_its_payload_hash_carried_over_and_a_wrong_key_fails() {
    let s3 = s3_server("s3", None, None);
    let proxy = start_proxy_in(proxy_dir(&s3), &config("s3.test", s3.port, "s3", false)).await;
    let endpoint = format!("http://s3.test:{}", s3.port);
    let result = boto3(&endpoint, &proxy.url(), None, &[]).await;
    assert_eq!(result, ok_roundtrip(), "{:?}", s3.seen());
    let seen = seen_at_least(&s3, 2).await;
    assert!(seen.iter().all(|r| r["verified"] == true), "{seen:?}");
    // Over plain http boto3 hashes the body; the server checked the digest against it.
    let digest = seen[0]["content_sha256"].as_str().unwrap();
    assert_eq!(digest.len(), 64, "{digest}");

    // The verifier is not a rubber stamp: boto3 straight to it with the real key id but a wrong
    // secret is refused.
    let direct = format!("http://127.0.0.1:{}", s3.port);
    let wrong = boto3(
        &direct,
        "-",
        None,
        &[
            ("BOTO_KEY_ID", ACCESS_KEY),
            ("BOTO_SECRET", "not-the-secret"),
        ],
    )
    .await;
    assert_eq!(wrong["error"], "SignatureDoesNotMatch", "{wrong}");
    let last = seen_at_least(&s3, 3).await.last().cloned().unwrap();
    assert_eq!(last["why"], "signature does not match");
}

#[tokio::test]
async fn another_service_has_its_body_hashed_and_over_10_mib_is_413() {
    let s3 = s3_server("execute-api", None, None);
    let proxy = start_proxy_in(
        proxy_dir(&s3),
        &config("api.test", s3.port, "execute-api", false),
    )
    .await;
    let client = proxied_client(&proxy.url());
    let url = format!("http://api.test:{}/prod/a%20b/items?b=2&a=1", s3.port);
    let r = client
        .post(&url)
        .header("content-type", "application/json")
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=dummy/x, Signature=00",
        )
        .header("x-amz-date", "20000101T000000Z")
        .body("{\"build\": 42}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", s3.seen());
    let seen = seen_at_least(&s3, 1).await;
    assert_eq!(seen[0]["verified"], true, "{seen:?}");
    // The proxy hashed the body (sha256 of `{"build": 42}`).
    assert_eq!(
        seen[0]["content_sha256"],
        "1209819f06a80776b50ed408917efc834aa4932c870f12e3a036ca59a0b04037"
    );
    let signed = seen[0]["signed_headers"].to_string();
    assert!(signed.contains("content-type"), "{signed}");

    // Over 10 MiB: 413 before anything reaches the service, by declared length or streamed.
    let big = vec![b'x'; 10 * 1024 * 1024 + 1];
    let r = client.post(&url).body(big.clone()).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(
        proxy_status(&r).contains("http_request_error"),
        "{}",
        proxy_status(&r)
    );
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(1024 * 1024).map(|c| Ok(c.to_vec())).collect();
    let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = client.post(&url).body(streamed).send().await.unwrap();
    assert_eq!(r.status(), 413);
    // Exactly 10 MiB is hashed and sent.
    let r = client
        .post(&url)
        .body(vec![b'y'; 10 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = seen_at_least(&s3, 2).await;
    assert_eq!(
        seen.len(),
        2,
        "the oversized bodies never reached the service"
    );
    assert_eq!(seen[1]["verified"], true);
    assert_eq!(seen[1]["body_len"], 10 * 1024 * 1024);
    let events = proxy.audit_events(4).await;
    let too_large: Vec<_> = events.iter().filter(|e| e["status"] == 413).collect();
    assert_eq!(too_large.len(), 2, "{events:?}");
    assert!(too_large.iter().all(|e| e["credential"] == "artifacts"));

    // A body signed chunk by chunk with the client's key cannot be re-signed: 400, saying so.
    let r = client
        .put(&url)
        .header("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
        .body("0;chunk-signature=00\r\n\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("cannot be re-signed"));
    assert_eq!(s3.seen().len(), 2);
}

#[tokio::test]
async fn a_session_token_is_sent_signed_and_its_echo_masked() {
    let s3 = s3_server("s3", None, Some(SESSION_TOKEN));
    let proxy = start_proxy_in(proxy_dir(&s3), &config("s3.test", s3.port, "s3", true)).await;
    let client = proxied_client(&proxy.url());
    let r = client
        .get(format!("http://s3.test:{}/b/echo-security-token", s3.port))
        .header("x-amz-security-token", "the-pipeline-s-own-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", s3.seen());
    assert_eq!(seen_at_least(&s3, 1).await[0]["verified"], true);
    // The upstream reflected the real token; the client never sees it.
    let echoed = r.headers()["x-echo"].to_str().unwrap().to_owned();
    let body = r.text().await.unwrap();
    assert!(!echoed.contains(SESSION_TOKEN) && !body.contains(SESSION_TOKEN));
    assert_eq!(
        body.len(),
        "token=".len() + SESSION_TOKEN.len(),
        "lengths kept: {body}"
    );
}

// Multi-threaded: the blocking wait for the proxy's exit must not stop the client's connection
// from answering the proxy's shutdown (h2 GOAWAY and PING).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_no_aws_secret_or_session_token_reaches_any_output() {
    let s3 = s3_server("s3", Some("s3.test"), Some(SESSION_TOKEN));
    let dir = proxy_dir(&s3);
    let body = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[audit]\noutput = \"stdout\"\n{}",
        config("s3.test", s3.port, "s3", true)
    );
    let path = dir.path().join("canary.toml");
    std::fs::write(&path, body).unwrap();
    let running = spawn_binary(
        &["run", "-c", path.to_str().unwrap()],
        &[("RUST_LOG", "debug")],
        Stdio::piped(),
    );
    let ca: PathBuf = dir.path().join("state/ca.pem");
    let endpoint = format!("https://s3.test:{}", s3.port);
    let result = boto3(&endpoint, &running.proxy, Some(&ca), &[]).await;
    assert_eq!(result, ok_roundtrip(), "{:?}", s3.seen());
    let client = proxied_tls_client(&running.proxy, &std::fs::read_to_string(&ca).unwrap());
    let mut bodies = Vec::new();
    let r = client
        // (The secret key has `/` and `+`, which a query would carry encoded: it goes in a header.)
        .get(format!(
            "{endpoint}/b/echo-security-token?note={SESSION_TOKEN}"
        ))
        .header("x-client-note", SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    bodies.push(format!("{:?}", r.headers()));
    bodies.push(r.text().await.unwrap());
    let metrics = running.metrics().await;
    assert!(metrics.contains("portcullis_credential_injections_total{credential=\"artifacts\"} 3"));
    let collected = running.stop_and_collect();
    let audit = &collected.stdout;
    assert!(audit.lines().count() >= 3, "audit events: {audit}");
    collected.assert_free_of(&[SECRET, SESSION_TOKEN], &metrics, &bodies);
}

#[test]
fn check_names_a_missing_key_and_a_bad_scope() {
    let dir = tempfile::tempdir().unwrap();
    let run = |body: &str| {
        let (code, stdout, stderr) = check_config(dir.path(), body, &["PORTCULLIS_TEST_AWS_UNSET"]);
        (code, stdout + &stderr)
    };
    let spec = |key_id: &str, region: &str| {
        format!(
            "[credentials.s3]\naws_sigv4 = {{ access_key_id = {key_id}, secret_access_key = {{ file = \"secret\" }}, region = \"{region}\", service = \"s3\" }}\n[[hosts]]\nhost = \"s3.test\"\ncredential = \"s3\"\n"
        )
    };
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let (code, out) = run(&spec(
        "{ env = \"PORTCULLIS_TEST_AWS_UNSET\" }",
        "eu-west-1",
    ));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("credentials.s3.aws_sigv4.access_key_id")
            && out.contains("PORTCULLIS_TEST_AWS_UNSET"),
        "{out}"
    );
    let (code, out) = run(&spec("{ file = \"secret\" }", "EU West"));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("credentials.s3.aws_sigv4.region"), "{out}");
    let (code, out) = run(&spec("{ file = \"secret\" }", "eu-west-1"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("s3"), "{out}");
    assert!(!out.contains(SECRET), "{out}");
}
