//! A GitHub REST API stand-in for the `github_app` tests: `POST
//! /app/installations/{id}/access_tokens` verifies the App JWT with PyJWT against the App's
//! public key (tests/support/verify_github_jwt.py, never the proxy's code), records the requested
//! narrowing and answers a fixed, distinctive installation token that expires in an hour;
//! `GET /repos/...` answers 200 only to `Authorization: Bearer <that token>` (`/echo` repeats
//! the header it got). The App's RSA key pair is generated per test with `openssl`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::oauth::{serve, Served};

/// The App id every test configures.
pub const APP_ID: &str = "123456";
/// The installation id every test configures.
pub const INSTALLATION_ID: &str = "7890123";

/// The App's key pair, generated for the test (never committed).
pub struct AppKey {
    /// The private key (PKCS#1 PEM, as GitHub hands it out).
    pub private: PathBuf,
    /// The public key (SPKI PEM), for the stand-in's verifier.
    pub public: PathBuf,
}

impl AppKey {
    /// The private key's base64 body lines (a canary: none may show anywhere).
    pub fn body_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.private)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 40)
            .map(str::to_owned)
            .collect()
    }
}

/// Generates an RSA 2048 key pair under `dir` with `openssl`.
pub fn app_key(dir: &Path) -> AppKey {
    let private = dir.join("gh-app.pem");
    let public = dir.join("gh-app.pub.pem");
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genrsa",
        "-traditional",
        "-out",
        private.to_str().unwrap(),
        "2048",
    ]);
    run(&[
        "rsa",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    AppKey { private, public }
}

/// The stand-in's state.
pub struct GithubApi {
    /// The public key the JWT must verify against.
    public: PathBuf,
    /// The installation token it issues.
    pub token: String,
    /// Token requests received.
    pub attempts: AtomicUsize,
    /// Token requests whose JWT verified (tokens issued).
    pub mints: AtomicUsize,
    /// The JSON bodies of verified token requests.
    pub bodies: Mutex<Vec<serde_json::Value>>,
    /// Why JWTs were rejected.
    pub rejections: Mutex<Vec<String>>,
    /// Answers are delayed this long (ms), so concurrent first requests overlap.
    pub delay_ms: AtomicU64,
}

impl GithubApi {
    pub fn mints(&self) -> usize {
        self.mints.load(Ordering::SeqCst)
    }

    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }

    pub fn last_body(&self) -> serde_json::Value {
        self.bodies
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a token request")
    }
}

/// `expires_at` an hour from now, RFC 3339 (formatted here, not by the proxy's code).
fn an_hour_ahead() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let (days, secs) = ((t / 86400) as i64, t % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Runs the PyJWT verifier on `jwt`: `Ok` or the rejection.
fn verify(public: &Path, jwt: &str) -> Result<(), String> {
    use std::io::Write;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/verify_github_jwt.py"
    );
    let mut child = Command::new("python3")
        .args([script, public.to_str().unwrap(), APP_ID])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(jwt.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.trim() == "ok" {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

async fn handle(req: Request<Incoming>, s: Arc<GithubApi>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if path.starts_with("/repos/") {
        return if auth == format!("Bearer {}", s.token) {
            if path.ends_with("/echo") {
                text(StatusCode::OK, format!("you sent {auth}"))
            } else {
                text(StatusCode::OK, "github ok".into())
            }
        } else {
            text(StatusCode::UNAUTHORIZED, "Bad credentials".into())
        };
    }
    if path != format!("/app/installations/{INSTALLATION_ID}/access_tokens")
        || req.method() != http::Method::POST
    {
        return text(StatusCode::NOT_FOUND, "Not Found".into());
    }
    s.attempts.fetch_add(1, Ordering::SeqCst);
    let accept_ok = req
        .headers()
        .get("accept")
        .is_some_and(|v| v == "application/vnd.github+json");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let Some(jwt) = auth.strip_prefix("Bearer ").map(str::to_owned) else {
        return text(StatusCode::UNAUTHORIZED, "no JWT".into());
    };
    let public = s.public.clone();
    let verdict = tokio::task::spawn_blocking(move || verify(&public, &jwt))
        .await
        .unwrap();
    if let Err(why) = verdict {
        s.rejections.lock().unwrap().push(why);
        return text(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded".into(),
        );
    }
    if !accept_ok {
        return text(StatusCode::UNSUPPORTED_MEDIA_TYPE, "accept".into());
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return text(StatusCode::BAD_REQUEST, "Problems parsing JSON".into());
    };
    s.bodies.lock().unwrap().push(json);
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    s.mints.fetch_add(1, Ordering::SeqCst);
    let mut r = text(
        StatusCode::CREATED,
        format!(
            "{{\"token\":\"{}\",\"expires_at\":\"{}\",\"permissions\":{{}},\"repository_selection\":\"selected\"}}",
            s.token,
            an_hour_ahead()
        ),
    );
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// The stand-in over TLS, its certificate naming `names`: (state, server, CA PEM). It issues
/// `token`.
pub async fn github_api(
    key: &AppKey,
    token: &str,
    names: &[&str],
) -> (Arc<GithubApi>, Served, String) {
    let state = Arc::new(GithubApi {
        public: key.public.clone(),
        token: token.to_owned(),
        attempts: AtomicUsize::new(0),
        mints: AtomicUsize::new(0),
        bodies: Mutex::default(),
        rejections: Mutex::default(),
        delay_ms: AtomicU64::new(0),
    });
    let (ca_pem, chain, key) = super::test_pki(names);
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let s = state.clone();
    let addr = serve(Some(acceptor), move |req| handle(req, s.clone())).await;
    (
        state,
        Served {
            addr,
            hits: Arc::default(),
        },
        ca_pem,
    )
}

/// A distinctive installation token for one test run.
pub fn installation_token() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("ghs_canaryInstallationToken{n:x}")
}
