//! The canary: secrets of every credential kind and every source (env, file, value) are used for
//! real traffic through a proxy running as its own process with verbose logging, then searched
//! for in everything the proxy wrote: stdout, stderr, and the bodies of responses it generated.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::process::Stdio;

use common::*;

const ENV_SECRET: &str = "CANARY-env-3b9f1e";
const FILE_SECRET: &str = "CANARY-file-8d2c7a";
const VALUE_SECRET: &str = "CANARY-value-51ae0c";
/// A secret with characters JSON escapes and queries percent-encode.
const QUOTED_SECRET: &str = r#"CANARY-q"uo\te/d+7f"#;

#[tokio::test]
async fn no_secret_reaches_any_output() {
    let up = tls_upstream(&["secure.test"]).await;
    let plain = http_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    up.write_ca(dir.path(), "upstream-ca.pem");
    std::fs::write(dir.path().join("secret-file"), format!("{FILE_SECRET}\r\n")).unwrap();
    std::fs::write(dir.path().join("quoted-secret"), QUOTED_SECRET).unwrap();
    let (port, plain_port) = (up.port(), plain.port());
    let config = format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"
[audit]
output = "stdout"
[tls]
extra_upstream_ca = ["upstream-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "secure.test" = ["127.0.0.1"], "plain.test" = ["127.0.0.1"] }}
[credentials.from-env]
bearer = {{ env = "PORTCULLIS_CANARY_TOKEN" }}
[credentials.from-file]
basic = {{ username = "svc", password = {{ file = "secret-file" }} }}
[credentials.from-value]
header = {{ name = "X-API-Key", value = {{ value = "{VALUE_SECRET}" }} }}
[credentials.quoted]
bearer = {{ file = "quoted-secret" }}
[[hosts]]
host = "secure.test"
ports = [{port}]
paths = ["/env/**"]
credential = "from-env"
[[hosts]]
host = "secure.test"
ports = [{port}]
paths = ["/file/**"]
credential = "from-file"
[[hosts]]
host = "secure.test"
ports = [{port}]
paths = ["/value/**"]
credential = "from-value"
[[hosts]]
host = "plain.test"
ports = [{plain_port}]
credential = "from-value"
"#
    );
    let config_path = dir.path().join("canary.toml");
    std::fs::write(&config_path, config).unwrap();
    // Verbose logging, so that anything a log line could carry is in the output searched below.
    let running = spawn_binary(
        &["run", "-c", config_path.to_str().unwrap()],
        &[
            ("RUST_LOG", "debug"),
            ("PORTCULLIS_CANARY_TOKEN", ENV_SECRET),
        ],
        Stdio::piped(),
    );
    let ca = dir.path().join("state/ca.pem");
    let proxy = running.proxy.clone();
    let base = format!("https://secure.test:{port}");
    let mut generated = Vec::new();

    for path in ["/env/count", "/file/count", "/value/count"] {
        // /count answers only a length, so any secret in a body would be the proxy's doing.
        let out = curl(&[
            "-x",
            &proxy,
            "--cacert",
            ca.to_str().unwrap(),
            &format!("{base}{path}"),
        ])
        .await;
        assert_eq!(out.status, 200, "{path}: {out:?}");
        assert_eq!(out.body, "0");
    }
    // Secrets where a client or upstream puts them: a query parameter, a client header, an
    // upstream response header. None of these names is masked; the value search must catch them.
    let out = curl(&[
        "-x",
        &proxy,
        "--cacert",
        ca.to_str().unwrap(),
        "-H",
        &format!("X-Client-Note: {FILE_SECRET}"),
        &format!("{base}/env/count?note={VALUE_SECRET}&token={ENV_SECRET}"),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    let out = curl(&[
        "-x",
        &proxy,
        "--cacert",
        ca.to_str().unwrap(),
        &format!("{base}/env/respond-header/x-debug-token/{ENV_SECRET}"),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    // A secret with a quote, a backslash, `/` and `+`: in a client header (JSON-escaped in the
    // audit line) and percent-encoded in a query.
    let percent_encoded = "CANARY-q%22uo%5Cte%2Fd%2B7f";
    let out = curl(&[
        "-x",
        &proxy,
        "--cacert",
        ca.to_str().unwrap(),
        "-H",
        &format!("X-Other-Note: {QUOTED_SECRET}"),
        &format!("{base}/env/count?other={percent_encoded}"),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    let metrics = running.metrics().await;
    assert!(metrics.contains("portcullis_requests_total"));

    // Every injected credential reached the upstream.
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {ENV_SECRET}").as_str())
    );
    assert_eq!(
        seen[1].header("authorization"),
        Some(basic("svc", FILE_SECRET).as_str())
    );
    assert_eq!(seen[2].header("x-api-key"), Some(VALUE_SECRET));

    // Refusals of every kind the proxy generates, each with a secret-bearing request.
    let refusals: Vec<Vec<String>> = vec![
        vec![
            "-i".into(),
            format!("{base}/elsewhere?token={VALUE_SECRET}"),
        ],
        vec![
            "-i".into(),
            "--http1.1".into(),
            "-H".into(),
            "Host: other.test".into(),
            format!("{base}/env/x"),
        ],
        vec![
            "-i".into(),
            "-H".into(),
            format!("Authorization: Bearer {ENV_SECRET}"),
            format!("http://plain.test:{plain_port}/"),
        ],
        vec![
            "-i".into(),
            "-X".into(),
            "TRACE".into(),
            format!("{base}/env/x"),
        ],
    ];
    for args in refusals {
        let mut all = vec![
            "-x".to_owned(),
            proxy.clone(),
            "--cacert".into(),
            ca.to_str().unwrap().into(),
        ];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = curl(&refs).await;
        assert!(out.status >= 400, "{out:?}");
        generated.push(out.body);
    }

    // Stop, then collect every byte the process wrote.
    let Collected { stdout, stderr } = running.stop_and_collect();

    // stdout carries the audit events: one per request and tunnel.
    assert!(
        stdout.lines().count() >= 10,
        "audit events on stdout: {stdout}"
    );
    // The upstream echoed the injected secret in a header: the client got it masked (spec §3,
    // lengths kept), and the audit records what the client got.
    let echoed = format!("\"x-debug-token\":\"{}\"", "*".repeat(ENV_SECRET.len()));
    assert!(stdout.contains(&echoed), "{stdout}");
    assert!(
        stdout.contains("\"x-client-note\":\"<HIDDEN>\""),
        "{stdout}"
    );
    for secret in [ENV_SECRET, FILE_SECRET, VALUE_SECRET] {
        assert!(!metrics.contains(secret), "{secret} in /metrics");
        assert!(!stdout.contains(secret), "{secret} in stdout");
        assert!(!stderr.contains(secret), "{secret} in stderr");
        for body in &generated {
            assert!(
                !body.contains(secret),
                "{secret} in a generated response: {body}"
            );
        }
    }
    let json_escaped = serde_json::to_string(QUOTED_SECRET).unwrap();
    let json_escaped = json_escaped.trim_matches('"');
    for form in [QUOTED_SECRET, json_escaped, percent_encoded] {
        assert!(!stdout.contains(form), "{form} in stdout:\n{stdout}");
        assert!(!stderr.contains(form), "{form} in stderr");
    }
    // Base64 of the basic credential must not leak either.
    let encoded = basic("svc", FILE_SECRET);
    let encoded = encoded.trim_start_matches("Basic ");
    assert!(!stdout.contains(encoded) && !stderr.contains(encoded));
}
