//! The token cache of minted credentials (spec §10): one entry per minted credential, kept in
//! [`super::state::State`] across reloads as long as the credential's configuration is unchanged.
//!
//! Lifecycle: a token is minted on first use (never at load), by one request while the others
//! wait for it; from `refresh_before` ahead of expiry a request that uses the token starts a
//! refresh in the background; when minting fails, a still-valid token keeps being used, and with
//! none the request fails with [`ProxyError::CredentialUnavailable`]. Attempts are at most one a
//! second per credential, background refreshes included. Token endpoints are reached on the
//! snapshot's pooled clients ([`Upstreams`]): destination safety, `network.resolve` and
//! `extra_upstream_ca` apply; no `[[hosts]]` rule is needed.
//!
//! Nothing from a token endpoint's body leaves this module but the token itself; failures say a
//! status code or a fixed reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request};

use super::upstream::Upstreams;
use crate::body;
use crate::credentials::github_app::Inject;
use crate::credentials::{Claims, Credential, Minter, MissingClaim, OAuth2};
use crate::error::ProxyError;
use crate::telemetry::Telemetry;

/// At most one mint attempt a second per credential.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How long a token endpoint has to answer.
const MINT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest token answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// The minted credentials' cache, by credential name.
#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, Arc<MintedEntry>>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").finish_non_exhaustive()
    }
}

impl TokenCache {
    /// The entry of `config`: the cached one when its configuration is the same (a reload that
    /// did not change it keeps its token), else a new, empty one.
    pub fn entry(&self, config: &Arc<Minter>) -> Arc<MintedEntry> {
        let mut entries = match self.entries.lock() {
            Ok(entries) => entries,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(entry) = entries.get(&**config.name()) {
            if Arc::ptr_eq(&entry.template, config) || *entry.template == **config {
                return entry.clone();
            }
        }
        let entry = Arc::new(MintedEntry::new(config.clone()));
        entries.insert(config.name().to_string(), entry.clone());
        entry
    }

    /// The entry a request's client mints with: with claim templates (spec §4), one per
    /// rendered value (the build of repository X gets a token for X only); else
    /// [`TokenCache::entry`]. A client without a claim a template needs → [`MissingClaim`].
    pub fn entry_for(
        &self,
        config: &Arc<Minter>,
        claims: Option<&Claims>,
    ) -> Result<Arc<MintedEntry>, MissingClaim> {
        let Some(rendered) = config.render(claims)? else {
            return Ok(self.entry(config));
        };
        let key = format!("{}\u{0}{}", config.name(), rendered.key);
        let mut entries = match self.entries.lock() {
            Ok(entries) => entries,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(entry) = entries.get(&key) {
            if Arc::ptr_eq(&entry.template, config) || *entry.template == **config {
                return Ok(entry.clone());
            }
        }
        let mut entry = MintedEntry::new(Arc::new(config.with_rendered(&rendered)));
        entry.template = config.clone();
        let entry = Arc::new(entry);
        entries.insert(key, entry.clone());
        Ok(entry)
    }

    /// Drops the entries of credentials no longer configured (or configured differently).
    pub fn retain(&self, configured: &crate::credentials::Minted) {
        let mut entries = match self.entries.lock() {
            Ok(entries) => entries,
            Err(poisoned) => poisoned.into_inner(),
        };
        entries.retain(|_, entry| {
            configured
                .get(&**entry.template.name())
                .is_some_and(|c| **c == *entry.template)
        });
    }
}

/// A minted token: the credential it injects and when it expires.
pub struct Token {
    /// `Authorization: Bearer <token>` (or, for a GitHub App with `inject = "basic"`,
    /// `Basic x-access-token:<token>`), with the token's echoes.
    pub credential: Credential,
    expires: Instant,
    refresh_at: Instant,
}

/// Why the last attempt failed, and when it was made.
struct Attempt {
    at: Instant,
    failure: Option<String>,
}

/// One minted credential (or one rendering of a templated one): its configuration, its current
/// token, and the single-flight lock.
pub struct MintedEntry {
    /// What it mints with (rendered, for a templated credential).
    config: Arc<Minter>,
    /// The credential as configured (what a reload compares).
    template: Arc<Minter>,
    current: RwLock<Option<Arc<Token>>>,
    /// Held by whoever mints (across the token request: a tokio lock).
    minting: tokio::sync::Mutex<()>,
    last: Mutex<Option<Attempt>>,
    refreshing: AtomicBool,
}

impl MintedEntry {
    fn new(config: Arc<Minter>) -> Self {
        Self {
            template: config.clone(),
            config,
            current: RwLock::new(None),
            minting: tokio::sync::Mutex::new(()),
            last: Mutex::new(None),
            refreshing: AtomicBool::new(false),
        }
    }

    /// The current token if still valid at `now`.
    fn valid(&self, now: Instant) -> Option<Arc<Token>> {
        let current = match self.current.read() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        current.as_ref().filter(|t| t.expires > now).cloned()
    }

    /// The last attempt's failure if it was less than [`RETRY_INTERVAL`] ago.
    fn recent_failure(&self) -> Option<Option<String>> {
        let last = match self.last.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        last.as_ref()
            .filter(|a| a.at.elapsed() < RETRY_INTERVAL)
            .map(|a| a.failure.clone())
    }

    fn note_attempt(&self, failure: Option<String>) {
        let mut last = match self.last.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        *last = Some(Attempt {
            at: Instant::now(),
            failure,
        });
    }

    /// A valid token: the cached one (starting a background refresh when it is due), or one
    /// minted now (one mint at a time: concurrent callers wait for it).
    pub async fn token(
        self: &Arc<Self>,
        upstreams: &Upstreams,
        telemetry: &Arc<Telemetry>,
    ) -> Result<Arc<Token>, ProxyError> {
        let now = Instant::now();
        if let Some(token) = self.valid(now) {
            if now >= token.refresh_at && !self.refreshing.swap(true, Ordering::AcqRel) {
                let entry = self.clone();
                let upstreams = upstreams.clone();
                let telemetry = telemetry.clone();
                tokio::spawn(async move {
                    entry.refresh(&upstreams, &telemetry).await;
                    entry.refreshing.store(false, Ordering::Release);
                });
            }
            return Ok(token);
        }
        let _minting = self.minting.lock().await;
        if let Some(token) = self.valid(Instant::now()) {
            return Ok(token);
        }
        if let Some(failure) = self.recent_failure() {
            // Another attempt within the second: its failure stands (a success left a token,
            // unless it expired at once, which counts as a failure too).
            return Err(self.unavailable(
                failure.unwrap_or_else(|| "the last token has already expired".to_owned()),
            ));
        }
        self.mint(upstreams, telemetry)
            .await
            .map_err(|why| self.unavailable(why))
    }

    /// A background refresh: skipped when a mint is under way or one was attempted within the
    /// second; a failure keeps the current token.
    async fn refresh(&self, upstreams: &Upstreams, telemetry: &Telemetry) {
        let Ok(_minting) = self.minting.try_lock() else {
            return;
        };
        if self.recent_failure().is_some() {
            return;
        }
        if let Err(why) = self.mint(upstreams, telemetry).await {
            tracing::warn!(credential = %self.config.name(), reason = %why, "credential refresh failed; the cached token stays in use while valid");
        }
    }

    fn unavailable(&self, why: String) -> ProxyError {
        ProxyError::CredentialUnavailable {
            name: self.config.name().to_string(),
            why,
        }
    }

    /// Mints a token (the caller holds `minting`), stores it, counts the attempt.
    async fn mint(
        &self,
        upstreams: &Upstreams,
        telemetry: &Telemetry,
    ) -> Result<Arc<Token>, String> {
        let metrics = &telemetry.metrics;
        let name = &**self.config.name();
        let result = self.request_token(upstreams).await;
        let label = if result.is_ok() { "success" } else { "failure" };
        metrics
            .credential_refreshes
            .with_label_values(&[name, label])
            .inc();
        match result {
            Ok(token) => {
                self.note_attempt(None);
                let expiry =
                    SystemTime::now() + token.expires.saturating_duration_since(Instant::now());
                let unix = expiry
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                metrics
                    .credential_expiry
                    .with_label_values(&[name])
                    .set(unix);
                // Scrubbed from every audit event from now on, not only its own requests'.
                if let Some(echoes) = &token.credential.echoes {
                    telemetry
                        .live_secrets
                        .remember(echoes.clone(), token.expires);
                }
                let token = Arc::new(token);
                let mut current = match self.current.write() {
                    Ok(c) => c,
                    Err(poisoned) => poisoned.into_inner(),
                };
                // The replaced token is zeroized when its last user drops it.
                *current = Some(token.clone());
                Ok(token)
            }
            Err(why) => {
                self.note_attempt(Some(why.clone()));
                Err(why)
            }
        }
    }

    /// One token request; the error is a fixed reason or a status code, never body content.
    async fn request_token(&self, upstreams: &Upstreams) -> Result<Token, String> {
        let c = &*self.config;
        let req = Request::builder()
            .method(Method::POST)
            .uri(c.token_url().clone());
        let req = match c {
            Minter::OAuth2(o) => {
                let (form, auth) = o.request_parts();
                let mut req = req
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .header(header::ACCEPT, "application/json");
                if let Some(auth) = auth {
                    req = req.header(header::AUTHORIZATION, auth);
                }
                req.body(body::full(Bytes::from(form.as_bytes().to_vec())))
            }
            Minter::GithubApp(g) => {
                let (json, auth) = g.request_parts().map_err(|e| e.to_string())?;
                req.header(header::CONTENT_TYPE, "application/json")
                    .header(header::ACCEPT, "application/vnd.github+json")
                    .header(header::USER_AGENT, "portcullis")
                    .header("x-github-api-version", "2022-11-28")
                    .header(header::AUTHORIZATION, auth)
                    .body(body::full(Bytes::from(json)))
            }
        }
        .map_err(|_| "the token request cannot be built".to_owned())?;
        let sent = Instant::now();
        let answer = upstreams
            .exchange(req, "token endpoint", MAX_ANSWER, MINT_TIMEOUT)
            .await?;
        let answer = match c {
            Minter::OAuth2(_) => OAuth2::parse_answer(&answer),
            Minter::GithubApp(_) => {
                crate::credentials::GithubApp::parse_answer(&answer, SystemTime::now())
            }
        }
        .map_err(|e| e.to_string())?;
        // The lifetime is at most a year (`MAX_LIFETIME`): no overflow.
        let expires = sent.checked_add(answer.lifetime).unwrap_or(sent);
        let refresh_at = expires
            .checked_sub(c.refresh_before(answer.lifetime))
            .unwrap_or(sent);
        let name = c.name().clone();
        let credential = match c {
            Minter::GithubApp(g) if g.inject == Inject::Basic => {
                Credential::minted_basic(name, "x-access-token", answer.token)
            }
            _ => Credential::minted_bearer(name, answer.token),
        }
        .map_err(|e| e.to_string())?;
        Ok(Token {
            credential,
            expires,
            refresh_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::credentials::{OAuth2Spec, SecretSource};

    fn config(name: &str, scope: &str) -> Arc<Minter> {
        let spec = OAuth2Spec {
            token_url: "https://auth.example/token".into(),
            client_id: "c".into(),
            client_secret: SecretSource::Value("s".into()),
            scopes: vec![scope.into()],
            audience: None,
            client_auth: Default::default(),
            extra: BTreeMap::new(),
            refresh_before_seconds: None,
        };
        Arc::new(Minter::OAuth2(
            OAuth2::build(name, &spec, Path::new(".")).unwrap(),
        ))
    }

    #[test]
    fn entries_survive_an_unchanged_configuration_only() {
        let cache = TokenCache::default();
        let first = cache.entry(&config("api", "a"));
        // The same configuration from another snapshot (another Arc): the same entry.
        assert!(Arc::ptr_eq(&first, &cache.entry(&config("api", "a"))));
        // A changed configuration: a new entry, which replaces the old one.
        let changed = cache.entry(&config("api", "b"));
        assert!(!Arc::ptr_eq(&first, &changed));
        assert!(Arc::ptr_eq(&changed, &cache.entry(&config("api", "b"))));
        // A reload that drops or changes the credential drops its entry.
        let mut configured = crate::credentials::Minted::new();
        configured.insert("api".into(), config("api", "c"));
        cache.retain(&configured);
        assert!(!Arc::ptr_eq(&changed, &cache.entry(&config("api", "b"))));
    }
}
