//! Presets and the embedded default (spec §2): `portcullis presets` prints every preset of
//! config/presets.toml (read here independently, with the toml crate); a `preset` rule expands to
//! one rule per host pattern with the rest of its fields; and the real binary, started with no
//! configuration at all, lets a preset registry through and denies anything else.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::process::Command;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

fn data_file() -> toml::Table {
    let text = std::fs::read_to_string(format!(
        "{}/config/presets.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    toml::from_str(&text).unwrap()
}

#[test]
fn presets_prints_every_preset_and_its_hosts() {
    let out = Command::new(BIN).arg("presets").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let table = data_file();
    assert!(table.len() >= 13, "{table:?}");
    for (name, preset) in &table {
        let hosts: Vec<&str> = preset["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        let block = format!("{name}: ");
        let at = stdout
            .find(&block)
            .unwrap_or_else(|| panic!("{name} missing:\n{stdout}"));
        let line = stdout[at..].lines().nth(1).unwrap();
        assert_eq!(line.trim(), hosts.join(" "), "{name}");
    }
}

#[tokio::test]
async fn a_preset_rule_allows_its_hosts_with_the_rules_fields_and_nothing_else() {
    let up = http_upstream().await;
    let port = up.port();
    let proxy = start_proxy(&format!(
        r#"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "pypi.org" = ["127.0.0.1"], "files.pythonhosted.org" = ["127.0.0.1"], "pypi.org.evil.test" = ["127.0.0.1"] }}
[[hosts]]
preset = "pypi"
ports = [{port}]
methods = ["GET"]
"#
    ))
    .await;
    let client = proxied_client(&proxy.url());
    for host in ["pypi.org", "files.pythonhosted.org"] {
        let r = client
            .get(format!("http://{host}:{port}/simple/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }
    // The rule's other fields apply to every host of the preset.
    let r = client
        .post(format!("http://pypi.org:{port}/upload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client
        .get(format!("http://pypi.org.evil.test:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let events = proxy.audit_events(4).await;
    assert_eq!(events[0]["rule"], "pypi.org");
    assert_eq!(events[1]["rule"], "files.pythonhosted.org");
    // An unknown preset, or host and preset together, is a load error naming the rule.
    let dir = tempfile::tempdir().unwrap();
    for (body, expected) in [
        ("[[hosts]]\npreset = \"pypy\"\n", "hosts[0].preset"),
        (
            "[[hosts]]\nhost = \"a.test\"\npreset = \"pypi\"\n",
            "host and preset are exclusive",
        ),
        ("[[hosts]]\nports = [443]\n", "needs a host or a preset"),
    ] {
        let (code, _, stderr) = check_config(dir.path(), body, &[]);
        assert_eq!(code, 1, "{body}");
        assert!(stderr.contains(expected), "{body}: {stderr}");
    }
}

/// The binary with no configuration (the embedded default; only the listeners, and resolution to
/// this machine, overridden through the environment): a preset registry is allowed — the proxy
/// dials it (no upstream listens on 443 here, so the tunnel answers 502, not 403) and audits the
/// rule — and another host is denied.
#[tokio::test]
async fn the_embedded_default_allows_the_registries_and_denies_the_rest() {
    let work = tempfile::tempdir().unwrap();
    let ca_cert = work.path().join("ca.pem");
    let ca_key = work.path().join("ca-key.pem");
    let running = spawn_binary(
        &["run"],
        &[
            ("PORTCULLIS_LISTEN__PROXY", "127.0.0.1:0"),
            ("PORTCULLIS_LISTEN__ADMIN", "127.0.0.1:0"),
            ("PORTCULLIS_TLS__CA_CERT", ca_cert.to_str().unwrap()),
            ("PORTCULLIS_TLS__CA_KEY", ca_key.to_str().unwrap()),
            ("PORTCULLIS_NETWORK__ALLOW_CIDRS", r#"["127.0.0.0/8"]"#),
            (
                "PORTCULLIS_NETWORK__RESOLVE",
                r#"{"pypi.org"=["127.0.0.1"],"registry.npmjs.org"=["127.0.0.1"],"evil.test"=["127.0.0.1"]}"#,
            ),
        ],
        std::process::Stdio::piped(),
    );
    let proxy = running.proxy.trim_start_matches("http://").to_owned();
    for (target, connect_status) in [
        ("pypi.org:443", 502),
        ("registry.npmjs.org:443", 502),
        ("evil.test:443", 403),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&proxy).await.unwrap();
        let answer = exchange_raw(
            &mut stream,
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(answer.status, connect_status, "{target}: {answer:?}");
    }
    let audit = running.stop().stdout;
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{audit}");
    assert_eq!(
        (&events[0]["decision"], &events[0]["rule"]),
        (&"allow".into(), &"pypi.org".into())
    );
    assert_eq!(events[1]["rule"], "registry.npmjs.org");
    assert_eq!(events[2]["decision"], "deny");
}
