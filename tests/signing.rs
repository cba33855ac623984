//! Signed egress requests (RFC 9421, spec §12) checked by an independent implementation: a
//! receiver verifying with the Python `http-message-signatures` package against the public key
//! the admin listener publishes (tests/support/rfc9421_server.py). GET and POST, plain and
//! intercepted; tampering with method, path, body or client header fails; a client-sent
//! `Portcullis-Client` is replaced by the authenticated client (and stripped where nothing is
//! signed); over `max_body_bytes` → 413; the key survives a restart and reaches no output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// `GET http://ADMIN{path}`, directly: the body.
async fn admin_get(admin: std::net::SocketAddr, path: &str) -> String {
    scrape_path(&format!("http://{admin}"), path).await
}

fn support(file: &str) -> String {
    format!("{}/tests/support/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// The verifying receiver and the JSON line it printed per request.
struct Receiver {
    _child: ChildGuard,
    port: u16,
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    async fn seen(&self, n: usize) -> Vec<serde_json::Value> {
        eventually("the receiver's lines", Duration::from_secs(5), || async {
            self.seen.lock().unwrap().len() >= n
        })
        .await;
        self.seen.lock().unwrap().clone()
    }
}

/// Starts the receiver; it reads the public key from `key` when it verifies.
fn receiver(key: &Path, tls: Option<(&Path, &Path)>) -> Receiver {
    let mut command = Command::new("python3");
    command.arg(support("rfc9421_server.py")).arg(key);
    if let Some((cert, k)) = tls {
        command.arg(cert).arg(k);
    }
    let (child, port, seen) = json_lines_server(command);
    Receiver {
        _child: child,
        port,
        seen,
    }
}

/// Runs the verifier on one request description: verified?
fn verifies(key: &Path, request: &serde_json::Value) -> bool {
    let mut child = Command::new("python3")
        .arg(support("rfc9421_server.py"))
        .arg(key)
        .arg("--verify")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    answer["verified"] == true
}

fn config(plain: u16, tls: u16, max_body: usize) -> String {
    format!(
        r#"
[signing]
key = "keys/signing-key.pem"
key_id = "portcullis-test"
max_body_bytes = {max_body}
[tls]
extra_upstream_ca = ["upstream-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "hooks.test" = ["127.0.0.1"], "secure.test" = ["127.0.0.1"], "plain.test" = ["127.0.0.1"] }}
[[clients]]
name = "frontend"
token = {{ value = "fe-token" }}
[[hosts]]
host = "hooks.test"
ports = [{plain}]
sign = true
[[hosts]]
host = "secure.test"
ports = [{tls}]
sign = true
[[hosts]]
host = "plain.test"
ports = [{plain}]
"#
    )
}

#[tokio::test]
async fn requests_are_signed_verifiably_and_tampering_fails() {
    let work = tempfile::tempdir().unwrap();
    let key_file = work.path().join("public.pem");
    let plain = receiver(&key_file, None);
    let (ca, cert, key_pem) = test_pki_files(work.path(), &["secure.test"]);
    let tls = receiver(&key_file, Some((&cert, &key_pem)));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &ca).unwrap();
    let proxy = start_proxy_in(dir, &config(plain.port, tls.port, 64 * 1024)).await;
    // The published key, where the receiver reads it.
    let public = admin_get(proxy.admin, "/signature/public-key").await;
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");
    std::fs::write(&key_file, &public).unwrap();
    let jwks: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin, "/signature/jwks.json").await).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "portcullis-test");
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");

    let proxy_url = format!("http://frontend:fe-token@{}", proxy.addr);
    let client = proxied_client(&proxy_url);
    let hooks = |path: &str| format!("http://hooks.test:{}{path}", plain.port);
    // GET, with a client-sent Portcullis-Client and Signature that must be replaced.
    let r = client
        .get(hooks("/status?build=7&x=1"))
        .header("portcullis-client", "someone-else")
        .header("signature", "portcullis=:AAAA:")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", plain.seen(1).await);
    // POST with a body: Content-Digest signed too.
    let r = client
        .post(hooks("/hooks/deploy"))
        .body("{\"ref\":\"main\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", plain.seen(2).await);
    let seen = plain.seen(2).await;
    assert_eq!(seen[0]["client"], "frontend");
    assert_eq!(
        seen[0]["components"],
        serde_json::json!([
            "\"@method\"",
            "\"@authority\"",
            "\"@path\"",
            "\"@query\"",
            "\"portcullis-client\"",
            "\"@signature-params\""
        ])
    );
    assert!(seen[1]["components"].to_string().contains("content-digest"));
    // Intercepted HTTPS.
    let proxy_ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    let tls_client = proxied_tls_client(&proxy_url, &proxy_ca);
    let r = tls_client
        .post(format!("https://secure.test:{}/v1/events", tls.port))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", tls.seen(1).await);
    let r = tls_client
        .get(format!("https://secure.test:{}/v1/status?x=1", tls.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", tls.seen(2).await);
    let inside = tls.seen(2).await;
    assert!(inside
        .iter()
        .all(|r| r["verified"] == true && r["client"] == "frontend"));

    // Tampering: the signed POST as received, changed one way at a time.
    let original = seen[1]["request"].clone();
    assert!(
        verifies(&key_file, &original),
        "the untouched request verifies"
    );
    let tamper = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut r = original.clone();
        f(&mut r);
        r
    };
    use base64::Engine;
    for (what, changed) in [
        ("method", tamper(&|r| r["method"] = "PUT".into())),
        ("path", tamper(&|r| r["path"] = "/hooks/destroy".into())),
        (
            "body",
            tamper(&|r| {
                r["body_b64"] = base64::engine::general_purpose::STANDARD
                    .encode("{\"ref\":\"evil\"}")
                    .into()
            }),
        ),
        (
            "client",
            tamper(&|r| r["headers"]["portcullis-client"] = "someone-else".into()),
        ),
    ] {
        assert!(
            !verifies(&key_file, &changed),
            "tampered {what} still verifies"
        );
    }

    // A rule that does not sign adds nothing, and strips a client-sent Portcullis-Client.
    let r = client
        .get(format!("http://plain.test:{}/x", plain.port))
        .header("portcullis-client", "someone-else")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the receiver refuses what is not signed");
    let seen = plain.seen(3).await;
    let headers = &seen[2]["request"]["headers"];
    assert!(
        headers.get("signature").is_none() && headers.get("portcullis-client").is_none(),
        "{headers}"
    );
    // Over max_body_bytes: 413 before anything is sent.
    let r = client
        .post(hooks("/big"))
        .body(vec![b'x'; 64 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(plain.seen(3).await.len(), 3);
    // Six requests: two plain and two intercepted signed ones, one unsigned, one refused.
    let events = proxy.audit_events(6).await;
    let signed: Vec<_> = events
        .iter()
        .filter(|e| e["host"] != "plain.test")
        .collect();
    assert!(
        signed
            .iter()
            .filter(|e| e["kind"] == "request" && e["status"] == 200)
            .all(|e| e["signed"] == true),
        "{events:#?}"
    );
    let unsigned: Vec<_> = events
        .iter()
        .filter(|e| e["host"] == "plain.test")
        .collect();
    assert!(
        !unsigned.is_empty() && unsigned.iter().all(|e| e["signed"] == false),
        "{events:#?}"
    );
}

/// The key is generated once (0600) and kept: a restarted proxy publishes the same JWKS; the key
/// reaches no output.
#[test]
fn the_key_survives_a_restart_and_reaches_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[audit]\noutput = \"stdout\"\n[signing]\nkey = \"keys/signing-key.pem\"\n",
    )
    .unwrap();
    let jwks = || {
        let running = spawn_binary(
            &["run", "-c", config.to_str().unwrap()],
            &[("RUST_LOG", "debug")],
            Stdio::piped(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (jwks, metrics) = rt.block_on(async {
            let jwks = scrape_path(&running.admin, "/signature/jwks.json").await;
            (jwks, running.metrics().await)
        });
        // Debug logging is on, but an idle proxy may log nothing at that level: plain stop.
        (jwks, metrics, running.stop())
    };
    let (first, metrics, out) = jwks();
    let (second, _, _) = jwks();
    assert_eq!(first, second, "the same key after a restart");
    let key = std::fs::read_to_string(dir.path().join("keys/signing-key.pem")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("keys/signing-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    out.assert_free_of(&[body.as_str()], &metrics, &[first]);
}

/// A new key is picked up on reload; the JWKS keeps the replaced one for the rotation overlap,
/// then drops it. `portcullis signing show` prints what the admin listener serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_published_beside_the_old_one_for_the_overlap() {
    let body = |key_id: &str| {
        format!("[signing]\nkey = \"keys/{key_id}.pem\"\nkey_id = \"{key_id}\"\nrotation_overlap_seconds = 2\n")
    };
    let dir = tempfile::tempdir().unwrap();
    // The file the proxy runs from (start_proxy_in writes it there).
    let config_path = dir.path().join("portcullis.toml");
    let proxy = start_proxy_in(dir, &body("k1")).await;
    let kids = || async {
        let text = admin_get(proxy.admin, "/signature/jwks.json").await;
        let jwks: serde_json::Value = serde_json::from_str(&text).unwrap();
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(kids().await, ["k1"]);
    // `signing show` reads the same key (the test's config file names it relative to its folder).
    let config = config_path.to_str().unwrap();
    let (code, pem, _) = run_portcullis(&["-c", config, "signing", "show"], &[]);
    assert_eq!(code, 0);
    let served = admin_get(proxy.admin, "/signature/public-key").await;
    assert_eq!(pem, served);
    let (_, jwks, _) = run_portcullis(&["-c", config, "signing", "show", "--jwks"], &[]);
    assert!(jwks.contains("\"kid\":\"k1\""), "{jwks}");

    // Rotate: a new key (and key id) on reload.
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, text.replace("k1", "k2")).unwrap();
    tokio::task::block_in_place(|| proxy.handle.reload()).unwrap();
    assert_eq!(
        kids().await,
        ["k2", "k1"],
        "the replaced key is kept for the overlap"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(kids().await, ["k2"], "and dropped after it");
    // Without [signing]: a clear error.
    std::fs::write(&config_path, "").unwrap();
    let (code, _, stderr) = run_portcullis(&["-c", config, "signing", "show"], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no [signing] section"), "{stderr}");
}
