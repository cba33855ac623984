//! The proxy most OIDC tests run against (spec §4): a local issuer with an RSA and an EC key,
//! three OIDC clients (`app-main`: acme/app on main; `lib-builds`: acme/lib; `org-builds`: any
//! acme repository) and a static one, each with hosts of its own carrying its own credential on a
//! recording plain-HTTP upstream (and on a TLS one, for tunnels); plus an unconfigured "rogue"
//! issuer that must never be contacted. Also the PyJWT verdict the smoke test compares against.

use serde_json::Value;

use super::oidc::*;
use super::*;

pub const MAIN: &str = "main-upstream-secret-1f";
pub const LIB: &str = "lib-upstream-secret-2e";
pub const ORG: &str = "org-upstream-secret-3d";
/// A static client token with three dot-separated base64url parts: not a JWT of a configured
/// issuer, so still a static token.
pub const STATIC_TOKEN: &str = "ci-static.proxy-token.v1";

/// Verifies `token` with PyJWT against `jwks` (tests/support/verify_oidc_jwt.py): its one-line
/// verdict, `ok SUB` or `rejected: ERROR: why`.
pub fn pyjwt_verdict(jwks: &Value, issuer: &str, token: &str) -> String {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks.to_string()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/verify_oidc_jwt.py"
    );
    let mut child = std::process::Command::new("python3")
        .args([script, file.to_str().unwrap(), issuer, AUDIENCE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(token.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let verdict = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        verdict.starts_with("ok ") == out.status.success(),
        "{verdict} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    verdict
}

/// The proxy of most tests: three OIDC clients of `issuer` and a static one; per-client hosts on
/// the plain upstream (`plaintext_credentials`) and, for the tunnel test, on the TLS one.
pub struct Setup {
    pub proxy: TestProxy,
    pub issuer: Issuer,
    /// Another issuer, not configured: tokens naming it must never make the proxy contact it.
    pub rogue: Issuer,
    pub rsa: SigningKey,
    pub ec: SigningKey,
    pub up: Upstream,
    pub tls: Upstream,
    /// The proxy's interception CA.
    pub ca: String,
}

pub async fn setup() -> Setup {
    let (rsa, ec) = (rsa_key("rsa-1"), ec_key("ec-1"));
    let issuer = issuer("issuer.test", &[&rsa, &ec]).await;
    let rogue_key = ec_key("rogue-1");
    let rogue = super::oidc::issuer("rogue.test", &[&rogue_key]).await;
    let up = http_upstream().await;
    let tls = tls_upstream(&["main-only.test", "lib.test", "org.test", "open.test"]).await;
    let dir = tempfile::tempdir().unwrap();
    issuer.write_ca(dir.path(), "issuer-ca.pem");
    rogue.write_ca(dir.path(), "rogue-ca.pem");
    tls.write_ca(dir.path(), "upstream-ca.pem");
    let iss = issuer.url.as_str();
    let (p, t) = (up.port(), tls.port());
    let clients = [
        oidc_client(
            "app-main",
            iss,
            "repository = \"acme/app\", ref = \"refs/heads/main\"",
        ),
        oidc_client("lib-builds", iss, "repository = \"acme/lib\""),
        oidc_client(
            "org-builds",
            iss,
            "repository_owner = \"acme\", repository = \"acme/*\"",
        ),
    ]
    .concat();
    let host = |name: &str, client: &str, cred: &str| {
        format!("[[hosts]]\nhost = \"{name}\"\nports = [{p}, {t}]\nclients = [\"{client}\"]\ncredential = \"{cred}\"\nplaintext_credentials = true\n")
    };
    let body = format!(
        r#"
[tls]
extra_upstream_ca = ["issuer-ca.pem", "rogue-ca.pem", "upstream-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "issuer.test" = ["127.0.0.1"], "rogue.test" = ["127.0.0.1"], "main-only.test" = ["127.0.0.1"], "lib.test" = ["127.0.0.1"], "org.test" = ["127.0.0.1"], "open.test" = ["127.0.0.1"] }}
[credentials.main]
bearer = {{ value = "{MAIN}" }}
[credentials.lib]
bearer = {{ value = "{LIB}" }}
[credentials.org]
bearer = {{ value = "{ORG}" }}
{clients}
[[clients]]
name = "static-ci"
token = {{ value = "{STATIC_TOKEN}" }}
{}{}{}
[[hosts]]
host = "open.test"
ports = [{p}, {t}]
"#,
        host("main-only.test", "app-main", "main"),
        host("lib.test", "lib-builds", "lib"),
        host("org.test", "org-builds", "org"),
    );
    let proxy = start_proxy_in(dir, &body).await;
    let ca = std::fs::read_to_string(proxy.dir.path().join("state/ca.pem")).unwrap();
    Setup {
        proxy,
        issuer,
        rogue,
        rsa,
        ec,
        up,
        tls,
        ca,
    }
}

impl Setup {
    pub fn token(&self, key: &SigningKey, repository: &str, git_ref: &str) -> String {
        key.sign(&self.issuer.claims(repository, git_ref))
    }

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.up.port())
    }

    /// A plain request through the proxy with `Proxy-Authorization: Bearer <jwt>`.
    pub async fn get(&self, jwt: &str, host: &str, path: &str) -> reqwest::Response {
        bearer_client(&self.proxy.url(), jwt, None)
            .get(self.url(host, path))
            .send()
            .await
            .unwrap()
    }

    pub async fn count(&self, result: &str) -> f64 {
        oidc_count(&self.proxy.metrics().await, &self.issuer.url, result)
    }
}

/// A proxy with `clients` (TOML) and one host, `open.test` on the plain upstream `up`, open to
/// every client; keys from `issuer` by discovery unless the clients name a `jwks_file` in `dir`.
pub async fn open_proxy(
    dir: tempfile::TempDir,
    issuer_ca: &str,
    up: &Upstream,
    clients: &str,
) -> TestProxy {
    std::fs::write(dir.path().join("issuer-ca.pem"), issuer_ca).unwrap();
    let port = up.port();
    start_proxy_in(
        dir,
        &format!(
            "[tls]\nextra_upstream_ca = [\"issuer-ca.pem\"]\n[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"issuer.test\" = [\"127.0.0.1\"], \"open.test\" = [\"127.0.0.1\"] }}\n{clients}\n[[hosts]]\nhost = \"open.test\"\nports = [{port}]\n"
        ),
    )
    .await
}
