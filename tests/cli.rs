//! The `portcullis` binary: `check` exit codes and messages, environment overrides, and `run`
//! serving traffic, logging JSON, and exiting 0 on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

fn check(config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    common::check_config(dir.path(), config, &[])
}

#[test]
fn check_accepts_a_valid_config_and_prints_a_summary() {
    let (code, stdout, stderr) = check(
        "[[hosts]]\nhost = \"api.example.com\"\nports = [443]\n[[hosts]]\nhost = \"*.pythonhosted.org\"\n",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("(valid)"), "{stdout}");
    assert!(stdout.contains("host rules (2)"), "{stdout}");
    assert!(
        stdout.contains("api.example.com ports [443] tunnel"),
        "{stdout}"
    );
    assert!(
        stdout.contains("*.pythonhosted.org ports [80, 443]"),
        "{stdout}"
    );
    assert!(stdout.contains("clients: none"), "{stdout}");
}

#[test]
fn check_rejects_an_unknown_key_naming_file_and_key() {
    let (code, _, stderr) = check("[limits]\nmax_conections = 5\n");
    assert_eq!(code, 1);
    assert!(stderr.contains("portcullis.toml"), "{stderr}");
    assert!(
        stderr.contains("limits.max_conections: unknown key"),
        "{stderr}"
    );
}

#[test]
fn check_rejects_a_bad_host_pattern_naming_the_rule() {
    let (code, _, stderr) =
        check("[[hosts]]\nhost = \"ok.example\"\n[[hosts]]\nhost = \"api.*.example.com\"\n");
    assert_eq!(code, 1);
    assert!(stderr.contains("hosts[1].host"), "{stderr}");
    assert!(stderr.contains("api.*.example.com"), "{stderr}");
}

#[test]
fn check_rejects_a_syntax_error_with_line_and_column() {
    let (code, _, stderr) =
        check("[listen]\nproxy = \"127.0.0.1:3128\"\n\n[[hosts]\nhost = \"a.example\"\n");
    assert_eq!(code, 1);
    assert!(stderr.contains("portcullis.toml:4:"), "{stderr}");
    assert!(stderr.contains("TOML syntax error"), "{stderr}");
}

#[test]
fn check_names_a_missing_secret_source_but_never_a_value() {
    let (code, _, stderr) = check(
        "[credentials.gh]\nbearer = { env = \"PORTCULLIS_TEST_MISSING_TOKEN\" }\n[credentials.lit]\nbearer = \"canary-literal-value\"\n",
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("credentials.lit.bearer"), "{stderr}");
    assert!(!stderr.contains("canary-literal-value"), "{stderr}");
    let (code, _, stderr) =
        check("[credentials.gh]\nbearer = { env = \"PORTCULLIS_TEST_MISSING_TOKEN\" }\n");
    assert_eq!(code, 1);
    assert!(stderr.contains("credentials.gh.bearer"), "{stderr}");
    assert!(
        stderr.contains("PORTCULLIS_TEST_MISSING_TOKEN is not set"),
        "{stderr}"
    );
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, "[listen]\nproxy = \"127.0.0.1:3128\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c", path.to_str().unwrap()])
        .env("PORTCULLIS_LISTEN__PROXY", "127.0.0.1:4128")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("proxy 127.0.0.1:4128"), "{stdout}");

    let out = Command::new(BIN)
        .args(["check", "-c", path.to_str().unwrap()])
        .env("PORTCULLIS_LIMITS__NOPE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("environment") && stderr.contains("limits.nope"),
        "{stderr}"
    );

    // A value the file does not have, set wrong by a variable: the variable is named.
    let out = Command::new(BIN)
        .args(["check", "-c", path.to_str().unwrap()])
        .env("PORTCULLIS_LIMITS__MAX_CONNECTIONS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "environment variable PORTCULLIS_LIMITS__MAX_CONNECTIONS: limits.max_connections: must be at least 1"
        ),
        "{stderr}"
    );
}

#[test]
fn embedded_default_is_valid() {
    let out = Command::new(BIN)
        .arg("check")
        .env_remove("PORTCULLIS_CONFIG")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("<embedded default config>"));
}

#[tokio::test]
async fn run_serves_logs_json_and_exits_zero_on_sigterm() {
    let up = common::http_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"up.test\" = [\"127.0.0.1\"] }}\n[[hosts]]\nhost = \"up.test\"\nports = [{}]\n",
            up.port()
        ),
    )
    .unwrap();
    let mut running = common::spawn_binary(
        &["run", "--log-format", "json", "-c", path.to_str().unwrap()],
        &[],
        Stdio::null(),
    );
    // Every line is JSON, and the "listening" line names the bound address.
    for line in &running.startup {
        let event: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
        assert!(event["message"].is_string(), "{line}");
    }
    let listening: serde_json::Value =
        serde_json::from_str(running.startup.last().unwrap()).unwrap();
    assert_eq!(listening["message"], "portcullis listening");
    let proxy_addr = running.proxy.clone();
    let out = common::curl(&["-x", &proxy_addr, &format!("http://up.test:{}/", up.port())]).await;
    assert_eq!(out.status, 200, "{out:?}");

    let code = running.child.terminate(Duration::from_secs(20));
    assert_eq!(code, Some(0));
}

#[test]
fn ca_init_writes_a_p256_ca_with_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("ca/ca.pem");
    let key = dir.path().join("ca/ca-key.pem");
    let init = |force: bool| {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "ca",
            "init",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ]);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let out = init(false);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read_to_string(&cert).unwrap();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|d: rustls::pki_types::CertificateDer<'static>| d)
        .unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    assert!(parsed.is_ca());
    assert_eq!(
        parsed
            .public_key()
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string()),
        Some("1.2.840.10045.3.1.7".to_owned()),
        "ECDSA P-256"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let out = init(false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(
        std::fs::read_to_string(&cert).unwrap(),
        pem,
        "not overwritten"
    );
    let out = init(true);
    assert_eq!(out.status.code(), Some(0));
    assert_ne!(
        std::fs::read_to_string(&cert).unwrap(),
        pem,
        "overwritten with --force"
    );
    let key_text = std::fs::read_to_string(&key).unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(key_text.trim()));
}

#[test]
fn ca_show_prints_the_ca_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        "[tls]\nca_cert = \"my-ca.pem\"\nca_key = \"my-ca-key.pem\"\n",
    )
    .unwrap();
    let show = || {
        Command::new(BIN)
            .args(["ca", "show", "-c", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = show();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("my-ca.pem"));
    // `ca init` with the config's paths, then `ca show` prints that certificate.
    let out = Command::new(BIN)
        .args(["ca", "init", "-c", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = show();
    assert_eq!(out.status.code(), Some(0));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(printed.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        printed,
        std::fs::read_to_string(dir.path().join("my-ca.pem")).unwrap()
    );
}

/// `check | head -1`: the reader goes away before the summary is written; the command ends
/// quietly with 0 instead of a panic and a backtrace.
#[test]
fn check_into_a_closed_pipe_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(
        &path,
        "[[hosts]]\nhost = \"pypi.org\"\n[[hosts]]\nhost = \"api.example.com\"\npaths = [\"/v1/**\"]\ncredential = \"api\"\n[credentials.api]\nbearer = { value = \"t\" }\n",
    )
    .unwrap();
    for _ in 0..3 {
        let mut child = Command::new(BIN)
            .args(["check", "-c", path.to_str().unwrap()])
            .env_remove("PORTCULLIS_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The read end closes before the command has loaded its config, let alone written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    }
    // And the summary names the path globs, and a plain-http rule as such.
    let out = Command::new(BIN)
        .args(["check", "-c", path.to_str().unwrap()])
        .env_remove("PORTCULLIS_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("paths=/v1/**"), "{stdout}");
    std::fs::write(
        &path,
        "[[hosts]]\nhost = \"mirror.test\"\nports = [80]\nmethods = [\"GET\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c", path.to_str().unwrap()])
        .env_remove("PORTCULLIS_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("mirror.test ports [80] plain-http"),
        "{stdout}"
    );
}

/// A CA certificate without its key is what `run` refuses to start with: `check` says so too,
/// instead of passing.
#[test]
fn check_refuses_half_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/ca.pem"), "not used").unwrap();
    let (code, _, stderr) = common::check_config(dir.path(), "[[hosts]]\nhost = \"a.test\"\n", &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("one exists without the other"), "{stderr}");
}

/// `{ env = "A", file = "b" }` or a credential with two kinds is refused, naming the key, instead
/// of serde quietly using the first.
#[test]
fn ambiguous_secret_sources_and_credential_kinds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = common::check_config(
        dir.path(),
        "[credentials.a]\nbearer = { env = \"HOME\", file = \"/etc/hostname\" }\n[[hosts]]\nhost = \"a.test\"\ncredential = \"a\"\n",
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("credentials.a.bearer")
            && stderr.contains("exactly one of env, file, value"),
        "{stderr}"
    );
    let (code, _, stderr) = common::check_config(
        dir.path(),
        "[credentials.a]\nbearer = { env = \"HOME\" }\nheader = { name = \"X-Key\", value = { env = \"HOME\" } }\n",
        &[],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("credentials.a: sets 2 kinds"), "{stderr}");
}
