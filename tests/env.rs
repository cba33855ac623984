//! `portcullis env`, `ca show` and `ca init` as a new user meets them: the real binary, its
//! output sourced in a clean shell, and real clients (Python requests, curl) through a running
//! proxy on 127.0.0.1 — to tunneled hosts (verified against the system roots in the bundle) and
//! intercepted ones (verified against the Portcullis CA); the commands never read a secret; the
//! proxy URL checked and percent-encoded; the bundle kept current.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Runs `portcullis ARGS` with `envs` on top of an environment free of the variables that would
/// change what it does (config path, system roots location).
async fn portcullis(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("PORTCULLIS_CONFIG")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    for (name, value) in envs {
        cmd.env(name, value);
    }
    cmd.output().await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The DER of every certificate in a PEM file.
fn certs(path: &Path) -> Vec<Vec<u8>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap().as_ref().to_vec())
        .collect()
}

/// `NAME -> value` of `export NAME='value'` lines (values without quotes inside).
fn exports(sh: &str) -> std::collections::BTreeMap<String, String> {
    sh.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

/// Runs `script` in `sh` with nothing in the environment but `PATH`, after sourcing `env_file`.
async fn in_clean_shell(env_file: &Path, script: &str, args: &[&str]) -> Output {
    tokio::process::Command::new("env")
        .arg("-i")
        .arg(format!("PATH={}", std::env::var("PATH").unwrap()))
        .args(["sh", "-c", &format!(". \"$0\" && {script}")])
        .arg(env_file)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// GETs `url` with Python requests, nothing but the sourced variables telling it about the
/// proxy and the CA.
async fn python_get(env_file: &Path, url: &str) -> Output {
    const SCRIPT: &str = "import sys, requests\n\
                          r = requests.get(sys.argv[1], timeout=20)\n\
                          print(r.status_code)\n\
                          print(r.text)\n";
    in_clean_shell(env_file, "exec python3 -c \"$1\" \"$2\"", &[SCRIPT, url]).await
}

/// Python with `requests` is a prerequisite `tests/setup.sh` installs: missing, the test fails.
async fn require_python_requests() {
    let out = tokio::process::Command::new("python3")
        .args(["-c", "import requests"])
        .output()
        .await
        .expect("python3 runs (run tests/setup.sh)");
    assert!(
        out.status.success(),
        "python3 cannot import requests: run `bash tests/setup.sh` ({})",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn ca_show_ca_init_and_env_read_no_secret_but_check_still_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        r#"
[credentials.gh]
bearer = { env = "PORTCULLIS_TEST_ENV_UNSET_TOKEN" }
[credentials.nexus]
basic = { username = "svc", password = { file = "no-such-password" } }
[credentials.api]
header = { name = "X-API-Key", value = { env = "PORTCULLIS_TEST_ENV_UNSET_KEY" } }
[[clients]]
name = "ci"
token = { env = "PORTCULLIS_TEST_ENV_UNSET_CLIENT" }
[[clients]]
name = "release"
token = { file = "no-such-token" }
[[hosts]]
host = "api.github.com"
credential = "gh"
clients = ["ci"]
"#,
    )
    .unwrap();
    let c = config.to_str().unwrap();

    let out = portcullis(&["check", "-c", c], &[]).await;
    assert_eq!(out.status.code(), Some(1), "check resolves every secret");
    let stderr = text(&out.stderr);
    for named in [
        "PORTCULLIS_TEST_ENV_UNSET_TOKEN",
        "no-such-password",
        "PORTCULLIS_TEST_ENV_UNSET_KEY",
        "PORTCULLIS_TEST_ENV_UNSET_CLIENT",
        "no-such-token",
    ] {
        assert!(stderr.contains(named), "{named}: {stderr}");
    }

    let out = portcullis(&["ca", "init", "-c", c], &[]).await;
    assert_ok(&out, "ca init");
    let ca = dir.path().join("state/ca.pem");
    assert!(ca.exists());

    let out = portcullis(&["ca", "show", "-c", c], &[]).await;
    assert_ok(&out, "ca show");
    assert_eq!(text(&out.stdout), std::fs::read_to_string(&ca).unwrap());

    let out = portcullis(
        &["env", "-c", c, "--proxy-url", "http://ci:t@127.0.0.1:3128"],
        &[],
    )
    .await;
    assert_ok(&out, "env");
    assert_eq!(
        exports(&text(&out.stdout))["NODE_EXTRA_CA_CERTS"],
        ca.to_str().unwrap()
    );

    // A config that is invalid for another reason still fails these commands.
    std::fs::write(&config, "[[hosts]]\nhost = \"a.*.example\"\n").unwrap();
    for args in [vec!["ca", "show", "-c", c], vec!["env", "-c", c]] {
        let out = portcullis(&args, &[]).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(text(&out.stderr).contains("hosts[0].host"), "{args:?}");
    }
}

#[tokio::test]
async fn python_requests_verifies_tunneled_and_intercepted_hosts_with_env_alone() {
    require_python_requests().await;
    // Each upstream has its own test CA: the tunneled one's stands in for the system roots, the
    // intercepted one's is what the proxy trusts upstream.
    let tunneled = tls_upstream(&["tunneled.test"]).await;
    let intercepted = tls_upstream(&["intercepted.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    intercepted.write_ca(dir.path(), "upstream-ca.pem");
    let system_roots = tunneled.write_ca(dir.path(), "system-roots.pem");
    let proxy = start_proxy_in(
        dir,
        &format!(
            r#"
[tls]
extra_upstream_ca = ["upstream-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "tunneled.test" = ["127.0.0.1"], "intercepted.test" = ["127.0.0.1"] }}
[[hosts]]
host = "tunneled.test"
ports = [{}]
[[hosts]]
host = "intercepted.test"
ports = [{}]
intercept = "always"
"#,
            tunneled.port(),
            intercepted.port()
        ),
    )
    .await;
    let dir = proxy.dir.path();
    let config = dir.join("portcullis.toml");
    let ca = dir.join("state/ca.pem");
    let bundle = dir.join("state/ca-bundle.pem");
    let proxy_url = proxy.url();
    let c = config.to_str().unwrap();
    let env = |extra: &[&str]| {
        let mut args = vec!["env", "-c", c, "--proxy-url", &proxy_url];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let roots = system_roots.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            portcullis(&args, &[("SSL_CERT_FILE", &roots)]).await
        }
    };

    let out = env(&[]).await;
    assert_ok(&out, "env");
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    let vars = exports(&text(&out.stdout));
    assert_eq!(vars["REQUESTS_CA_BUNDLE"], bundle.to_str().unwrap());
    // The bundle: the Portcullis CA first, then the "system" roots.
    let mut want = certs(&ca);
    want.extend(certs(&system_roots));
    assert_eq!(certs(&bundle), want);
    let env_file = dir.join("env.sh");
    std::fs::write(&env_file, &out.stdout).unwrap();

    let tunneled_url = format!("https://tunneled.test:{}/through-tunnel", tunneled.port());
    let intercepted_url = format!(
        "https://intercepted.test:{}/through-interception",
        intercepted.port()
    );
    for (url, path) in [
        (&tunneled_url, "/through-tunnel"),
        (&intercepted_url, "/through-interception"),
    ] {
        let out = python_get(&env_file, url).await;
        assert_ok(&out, url);
        let stdout = text(&out.stdout);
        assert!(stdout.starts_with("200\n"), "{url}: {stdout}");
        assert!(stdout.contains(path), "{url}: {stdout}");
    }
    assert_eq!(tunneled.count(), 1);
    assert_eq!(intercepted.count(), 1);
    let events = proxy.audit_events(3).await;
    let tunnel = events
        .iter()
        .find(|e| e["host"] == "tunneled.test")
        .expect("an event for the tunneled host");
    assert_eq!(tunnel["kind"], "tunnel", "{tunnel}");
    assert_eq!(tunnel["intercepted"], false, "{tunnel}");

    // With the Portcullis CA alone (what `env` printed before, what `--ca-file` still does) the
    // intercepted host verifies and the tunneled one does not: the failure the bundle fixes.
    let out = env(&["--ca-file", ca.to_str().unwrap()]).await;
    assert_ok(&out, "env --ca-file");
    assert_eq!(
        exports(&text(&out.stdout))["REQUESTS_CA_BUNDLE"],
        ca.to_str().unwrap()
    );
    let ca_only = dir.join("ca-only.sh");
    std::fs::write(&ca_only, &out.stdout).unwrap();
    let out = python_get(&ca_only, &intercepted_url).await;
    assert_ok(&out, "intercepted, CA alone");
    let out = python_get(&ca_only, &tunneled_url).await;
    assert_ne!(out.status.code(), Some(0), "tunneled, CA alone");
    assert!(
        text(&out.stderr).contains("CERTIFICATE_VERIFY_FAILED"),
        "{}",
        text(&out.stderr)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn env_refuses_proxy_urls_that_are_not_http() {
    // No config, no CA: the URL is checked first.
    for url in [
        "not a url",
        "proxy.internal:3128",
        "https://ci:canary-token-1@proxy:3128",
        "socks5://ci:canary-token-1@proxy:1080",
        "http://ci:canary-token-1",
        "http://proxy:3128/some/path",
    ] {
        let out = portcullis(&["env", "--proxy-url", url], &[]).await;
        assert_eq!(out.status.code(), Some(1), "{url}");
        assert!(out.stdout.is_empty(), "{url}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains("--proxy-url"), "{url}: {stderr}");
        assert!(stderr.contains("http://"), "{url}: {stderr}");
        assert!(!stderr.contains("canary-token"), "{url}: {stderr}");
    }
    let out = portcullis(&["env", "--proxy-url", "https://proxy:3128"], &[]).await;
    assert!(text(&out.stderr).contains("scheme https"));
}

#[tokio::test]
async fn a_raw_token_is_printed_encoded_and_curl_authenticates_with_it() {
    const TOKEN: &str = "t@k:en w/x%";
    let up = http_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ci-token"), format!("{TOKEN}\n")).unwrap();
    let proxy = start_proxy_in(
        dir,
        &format!(
            r#"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "plain.test" = ["127.0.0.1"] }}
[[clients]]
name = "ci"
token = {{ file = "ci-token" }}
[[hosts]]
host = "plain.test"
ports = [{}]
"#,
            up.port()
        ),
    )
    .await;
    let dir = proxy.dir.path();
    let config = dir.join("portcullis.toml");
    let c = config.to_str().unwrap();
    let addr = proxy.addr.to_string();

    // Given raw, printed encoded; the warning about credentials stays quiet.
    let raw = format!("http://ci:{TOKEN}@{addr}");
    let out = portcullis(&["env", "-c", c, "--proxy-url", &raw], &[]).await;
    assert_ok(&out, "env");
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    let vars = exports(&text(&out.stdout));
    let encoded = format!("http://ci:t%40k%3Aen%20w%2Fx%25@{addr}");
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        assert_eq!(vars[name], encoded, "{name}");
    }
    let env_file = dir.join("env.sh");
    std::fs::write(&env_file, &out.stdout).unwrap();
    let target = format!("http://plain.test:{}/as-ci", up.port());
    let status = |out: &Output| text(&out.stdout);
    let script =
        "exec curl -sS --max-time 20 -o /dev/null -w '%{http_code}' -x \"$HTTP_PROXY\" \"$1\"";
    let out = in_clean_shell(&env_file, script, &[&target]).await;
    assert_ok(&out, "curl");
    assert_eq!(status(&out), "200", "{}", text(&out.stderr));
    assert_eq!(up.last().uri, "/as-ci");

    // Without credentials: the warning on stderr, and the proxy indeed answers 407.
    let out = portcullis(
        &["env", "-c", c, "--proxy-url", &format!("http://{addr}")],
        &[],
    )
    .await;
    assert_ok(&out, "env without credentials");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("407") && stderr.contains("ci"),
        "{stderr}"
    );
    std::fs::write(&env_file, &out.stdout).unwrap();
    let out = in_clean_shell(&env_file, script, &[&target]).await;
    assert_eq!(status(&out), "407", "{}", text(&out.stderr));
    proxy.stop().await;
}

#[tokio::test]
async fn the_credentials_warning_needs_clients() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(&config, "[[hosts]]\nhost = \"example.com\"\n").unwrap();
    let c = config.to_str().unwrap();
    assert_ok(&portcullis(&["ca", "init", "-c", c], &[]).await, "ca init");
    let out = portcullis(&["env", "-c", c], &[]).await;
    assert_ok(&out, "env");
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    assert_eq!(
        exports(&text(&out.stdout))["HTTP_PROXY"],
        "http://127.0.0.1:3128"
    );
    // Clients identified by their networks alone: warned, naming the way they still get in.
    std::fs::write(
        &config,
        "[[clients]]\nname = \"runners\"\nnetworks = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    let out = portcullis(&["env", "-c", c], &[]).await;
    assert_ok(&out, "env with a network client");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("runners") && stderr.contains("networks"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_bundle_is_rewritten_when_stale_and_left_alone_when_current() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        "[tls]\nca_cert = \"ca/ca.pem\"\nca_key = \"ca/key.pem\"\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let ca = dir.path().join("ca/ca.pem");
    let bundle = dir.path().join("ca/ca-bundle.pem");
    let roots_a = dir.path().join("roots-a.pem");
    let roots_b = dir.path().join("roots-b.pem");
    std::fs::write(&roots_a, test_pki(&["a.test"]).0).unwrap();
    std::fs::write(&roots_b, test_pki(&["b.test"]).0).unwrap();
    let env = |roots: PathBuf| async move {
        let out = portcullis(&["env", "-c", c], &[("SSL_CERT_FILE", &roots)]).await;
        assert_ok(&out, "env");
        exports(&text(&out.stdout))
    };
    // (inode, mtime): a rewrite renames a new file over the old one, so the inode changes too.
    let stamp = || {
        let m = std::fs::metadata(&bundle).unwrap();
        (m.ino(), m.modified().unwrap())
    };
    let pause = || tokio::time::sleep(Duration::from_millis(20));

    // No CA yet: a clear error, nothing written.
    let out = portcullis(&["env", "-c", c], &[("SSL_CERT_FILE", &roots_a)]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("ca init"),
        "{}",
        text(&out.stderr)
    );
    assert!(!bundle.exists());
    assert_ok(&portcullis(&["ca", "init", "-c", c], &[]).await, "ca init");

    // Missing: written. NODE_EXTRA_CA_CERTS names the CA alone, the seven others the bundle.
    let vars = env(roots_a.clone()).await;
    for name in portcullis::cli::env::CA_VARIABLES {
        let want = if name == "NODE_EXTRA_CA_CERTS" {
            &ca
        } else {
            &bundle
        };
        assert_eq!(vars[name], want.to_str().unwrap(), "{name}");
    }
    let mut want = certs(&ca);
    want.extend(certs(&roots_a));
    assert_eq!(certs(&bundle), want);
    // `ca show --bundle` prints the same text.
    let out = portcullis(
        &["ca", "show", "--bundle", "-c", c],
        &[("SSL_CERT_FILE", &roots_a)],
    )
    .await;
    assert_ok(&out, "ca show --bundle");
    assert_eq!(out.stdout, std::fs::read(&bundle).unwrap());

    // Current: left alone.
    let first = stamp();
    pause().await;
    env(roots_a.clone()).await;
    assert_eq!(stamp(), first, "a current bundle is not rewritten");
    // A shell that sourced the output has SSL_CERT_FILE = the bundle: still current, no growth.
    env(bundle.clone()).await;
    assert_eq!(stamp(), first, "our CA is not appended to itself");

    // The system roots changed: rewritten.
    pause().await;
    env(roots_b.clone()).await;
    let second = stamp();
    assert_ne!(second, first);
    let mut want = certs(&ca);
    want.extend(certs(&roots_b));
    assert_eq!(certs(&bundle), want);

    // Damaged: rewritten.
    std::fs::write(&bundle, "-----BEGIN CERTIFICATE-----\n").unwrap();
    env(roots_b.clone()).await;
    assert_eq!(certs(&bundle), want);

    // A new CA: rewritten, the new CA first.
    let first_ca = certs(&ca);
    let out = portcullis(&["ca", "init", "--force", "-c", c], &[]).await;
    assert_ok(&out, "ca init --force");
    env(roots_b.clone()).await;
    let mut want = certs(&ca);
    want.extend(certs(&roots_b));
    assert_eq!(certs(&bundle), want);
    assert_ne!(want.first(), first_ca.first(), "a new CA");

    // No temporary file left beside it.
    let mut names: Vec<_> = std::fs::read_dir(dir.path().join("ca"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ca-bundle.pem", "ca.pem", "key.pem"]);

    // With --ca-file, every variable names that file and no bundle is written.
    let other = tempfile::tempdir().unwrap();
    let config = other.path().join("p.toml");
    std::fs::write(&config, "").unwrap();
    let mine = other.path().join("mine.pem");
    std::fs::copy(&ca, &mine).unwrap();
    let out = portcullis(
        &[
            "env",
            "-c",
            config.to_str().unwrap(),
            "--ca-file",
            mine.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_ok(&out, "env --ca-file");
    let vars = exports(&text(&out.stdout));
    for name in portcullis::cli::env::CA_VARIABLES {
        assert_eq!(vars[name], mine.to_str().unwrap(), "{name}");
    }
    assert!(!other.path().join("state").exists());

    // A CA certificate that is itself named ca-bundle.pem is never overwritten.
    std::fs::write(
        &config,
        "[tls]\nca_cert = \"ca-bundle.pem\"\nca_key = \"key.pem\"\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    assert_ok(&portcullis(&["ca", "init", "-c", c], &[]).await, "ca init");
    let named = other.path().join("ca-bundle.pem");
    let before = std::fs::read(&named).unwrap();
    let out = portcullis(&["env", "-c", c], &[("SSL_CERT_FILE", &roots_a)]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--ca-file"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&named).unwrap(), before);
}
