//! The README's five-minute path, step by step, as a newcomer would run it: the binary with no
//! configuration, a build pointed at it with `HTTPS_PROXY`, the audit, `learn`, `check` and
//! `check --replay`. The registry is a local stand-in for pypi.org on port 443 — in a network
//! namespace of the test's own, so the embedded default's rules (ports 80 and 443) apply as they
//! are and nothing leaves the machine. Skipped, with the reason, where namespaces are unavailable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::process::Stdio;

use common::*;

const ENV: &str = "PORTCULLIS_NEWCOMER_NETNS";
const NAME: &str = concat!(module_path!(), "::the_readme_five_minute_path_works");

#[tokio::test]
async fn the_readme_five_minute_path_works() {
    if std::env::var_os(ENV).is_some() {
        inside().await;
        println!("{}", netns::DONE);
        return;
    }
    netns::rerun_in_network_namespace(NAME, ENV, &[&["curl", "--version"]]).await;
}

/// curl through the proxy the way the README's step 2 sets it up (`HTTPS_PROXY` exported):
/// (HTTP status, CONNECT status).
async fn build_step(url: &str, cacert: &str) -> (u16, u16) {
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "10",
            "-w",
            "%{http_code} %{http_connect}",
        ])
        .args(["--cacert", cacert, url])
        .env("HTTPS_PROXY", "http://127.0.0.1:3128")
        .env("HTTP_PROXY", "http://127.0.0.1:3128")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut codes = text.split_whitespace().map(|c| c.parse().unwrap_or(0));
    (codes.next().unwrap_or(0), codes.next().unwrap_or(0))
}

async fn inside() {
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("ip");
    assert!(std::process::Command::new(ip)
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap()
        .success());
    // The registry stand-in, where pypi.org is: port 443.
    let registry = tls_upstream_at("127.0.0.1:443".parse().unwrap(), &["pypi.org"]).await;
    let work = tempfile::tempdir().unwrap();
    let registry_ca = registry.write_ca(work.path(), "registry-ca.pem");
    let registry_ca = registry_ca.to_str().unwrap();
    let (ca_cert, ca_key) = (work.path().join("ca.pem"), work.path().join("ca-key.pem"));

    // 1. The embedded default, on its default listeners; only name resolution points at the
    //    stand-in (and the CA files go to a scratch folder).
    let running = spawn_binary(
        &["run"],
        &[
            (
                "PORTCULLIS_NETWORK__RESOLVE",
                r#"{"pypi.org"=["127.0.0.1"]}"#,
            ),
            ("PORTCULLIS_NETWORK__ALLOW_CIDRS", r#"["127.0.0.0/8"]"#),
            ("PORTCULLIS_TLS__CA_CERT", ca_cert.to_str().unwrap()),
            ("PORTCULLIS_TLS__CA_KEY", ca_key.to_str().unwrap()),
        ],
        Stdio::piped(),
    );
    assert_eq!(running.proxy, "http://127.0.0.1:3128");

    // 2. A registry works (tunneled: the client verifies the registry's own certificate); a
    //    host not on the list is refused at the CONNECT.
    let (status, connect) = build_step("https://pypi.org/simple/requests/", registry_ca).await;
    assert_eq!((status, connect), (200, 200));
    assert!(registry.last().uri.ends_with("/simple/requests/"));
    let (status, connect) = build_step("https://example.com/", registry_ca).await;
    assert_eq!((status, connect), (0, 403));

    // 3. The audit, on stdout: the denial names the host and why.
    let audit = running.stop().stdout;
    let deny = audit
        .lines()
        .find(|l| l.contains("\"decision\":\"deny\""))
        .unwrap_or_else(|| panic!("a denial in the audit:\n{audit}"));
    assert!(deny.contains("\"host\":\"example.com\""), "{deny}");
    assert!(deny.contains("is not on the allow-list"), "{deny}");
    let audit_path = work.path().join("audit.jsonl");
    std::fs::write(&audit_path, &audit).unwrap();
    let audit_path = audit_path.to_str().unwrap();

    // 4. Learn a config from it, and check it.
    let (code, learned, stderr) = run_portcullis(&["learn", "--audit", audit_path], &[]);
    assert_eq!(code, 0, "{stderr}");
    let config = work.path().join("portcullis.toml");
    std::fs::write(&config, &learned).unwrap();
    let config = config.to_str().unwrap();
    let (code, _, stderr) = run_portcullis(&["check", "-c", config], &[]);
    assert_eq!(code, 0, "{stderr}\n{learned}");

    // 5. Replay the recording against it: nothing that went through is denied.
    let (code, stdout, stderr) =
        run_portcullis(&["check", "-c", config, "--replay", audit_path], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}
