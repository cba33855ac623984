//! OIDC issuers' keys (spec §4), and the step of a request's identification that needs them.
//!
//! Keys come from a client's `jwks_file` (read at load), else from the issuer's discovery
//! document (`{issuer}/.well-known/openid-configuration` → `jwks_uri`), fetched on the snapshot's
//! pooled clients — destination safety, `network.resolve` and `extra_upstream_ca` apply — and kept
//! in [`KeyCache`], which lives in the proxy's state so a reload keeps them. They are refetched
//! when an hour old, and when a token names an unknown `kid`: the first such refetch at once
//! (issuer key rotation needs no restart), later ones at most once a minute per issuer. A failed
//! fetch keeps older keys in use; with none, tokens of that issuer fail (407) and the next fetch
//! waits [`RETRY_AFTER_FAILURE`]. Keys are only ever fetched for configured issuers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request};
use jsonwebtoken::jwk::JwkSet;

use super::state::{ConnCtx, Snapshot};
use super::upstream::Upstreams;
use crate::body;
use crate::identity::oidc::{OidcFailure, Pending};
use crate::identity::{AuthFailure, Identity};

/// Keys older than this are refetched.
const REFRESH_EVERY: Duration = Duration::from_secs(3600);
/// At most one unknown-`kid` refetch a minute per issuer (after the first).
const KID_REFETCH_EVERY: Duration = Duration::from_secs(60);
/// After a failed fetch, the next waits this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// How long a discovery document or JWKS has to arrive.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest discovery document or JWKS read.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Every configured issuer's keys, by issuer.
#[derive(Default)]
pub struct KeyCache {
    issuers: Mutex<HashMap<Arc<str>, Arc<IssuerKeys>>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").finish_non_exhaustive()
    }
}

/// One issuer's keys and when they were fetched.
#[derive(Default)]
struct IssuerKeys {
    current: RwLock<Option<(Arc<JwkSet>, Instant)>>,
    /// Held while fetching: one fetch at a time per issuer.
    fetching: tokio::sync::Mutex<()>,
    /// The last unknown-`kid` refetch.
    kid_refetch: Mutex<Option<Instant>>,
    /// The last failed fetch.
    failed: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl KeyCache {
    fn issuer(&self, issuer: &Arc<str>) -> Arc<IssuerKeys> {
        lock(&self.issuers)
            .entry(issuer.clone())
            .or_default()
            .clone()
    }
}

impl IssuerKeys {
    fn current(&self) -> Option<(Arc<JwkSet>, Instant)> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The keys, fetched when there are none or they are older than `max_age`. A failed fetch
    /// falls back on older keys.
    async fn keys(
        &self,
        issuer: &str,
        upstreams: &Upstreams,
        max_age: Duration,
    ) -> Result<Arc<JwkSet>, OidcFailure> {
        let fresh = |at: Instant| at.elapsed() < max_age;
        if let Some((keys, at)) = self.current() {
            if fresh(at) {
                return Ok(keys);
            }
        }
        let _fetching = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let stale = match self.current() {
            Some((keys, at)) if fresh(at) => return Ok(keys),
            other => other.map(|(keys, _)| keys),
        };
        let recently_failed = lock(&self.failed).is_some_and(|t| t.elapsed() < RETRY_AFTER_FAILURE);
        let fetched = match recently_failed {
            true => Err("the last fetch failed moments ago".to_owned()),
            false => fetch(issuer, upstreams).await,
        };
        match fetched {
            Ok(keys) => {
                let keys = Arc::new(keys);
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((keys.clone(), Instant::now()));
                *lock(&self.failed) = None;
                Ok(keys)
            }
            Err(why) => {
                if !recently_failed {
                    *lock(&self.failed) = Some(Instant::now());
                    tracing::warn!(issuer, reason = %why, "OIDC issuer keys could not be fetched");
                }
                stale.ok_or_else(|| OidcFailure::KeysUnavailable {
                    issuer: issuer.to_owned(),
                    why,
                })
            }
        }
    }

    /// Whether an unknown `kid` may trigger a refetch now (and if so, records it).
    fn may_refetch_for_kid(&self) -> bool {
        let mut last = lock(&self.kid_refetch);
        if last.is_some_and(|t| t.elapsed() < KID_REFETCH_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// The discovery document's `issuer` and `jwks_uri`, then the JWKS. Errors are fixed reasons or
/// status codes.
async fn fetch(issuer: &str, upstreams: &Upstreams) -> Result<JwkSet, String> {
    let get = |uri: http::Uri| {
        Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "portcullis")
            .body(body::empty())
            .map_err(|_| "the request cannot be built".to_owned())
    };
    let discovery = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let discovery = crate::credentials::endpoint_url(&discovery)
        .ok_or_else(|| "the issuer is not a URL".to_owned())?;
    let document: Bytes = upstreams
        .exchange(
            get(discovery)?,
            "discovery document",
            MAX_DOCUMENT_BYTES,
            FETCH_TIMEOUT,
        )
        .await?;
    let document: serde_json::Value = serde_json::from_slice(&document)
        .map_err(|_| "the discovery document is not JSON".to_owned())?;
    let named = document.get("issuer").and_then(serde_json::Value::as_str);
    if named.map(|n| n.trim_end_matches('/')) != Some(issuer.trim_end_matches('/')) {
        return Err("the discovery document names another issuer".to_owned());
    }
    let jwks_uri = document
        .get("jwks_uri")
        .and_then(serde_json::Value::as_str)
        .and_then(crate::credentials::endpoint_url)
        .ok_or_else(|| "the discovery document has no usable jwks_uri".to_owned())?;
    let jwks = upstreams
        .exchange(
            get(jwks_uri)?,
            "JWKS endpoint",
            MAX_DOCUMENT_BYTES,
            FETCH_TIMEOUT,
        )
        .await?;
    serde_json::from_slice(&jwks).map_err(|_| "the JWKS is not a key set".to_owned())
}

/// Verifies an OIDC token not seen before with its issuer's keys and identifies its client;
/// counts the verification.
pub async fn authenticate(
    conn: &ConnCtx,
    snap: &Snapshot,
    pending: &Pending,
) -> Result<Identity, AuthFailure> {
    let result = verify(conn, snap, pending).await;
    let (issuer, label) = match &result {
        Ok(_) => (&*pending.issuer, "ok"),
        Err(AuthFailure::Oidc { issuer, failure }) => (&**issuer, failure.label()),
        Err(_) => (&*pending.issuer, "malformed"),
    };
    count(conn, issuer, label);
    result
}

/// Counts one verification in `portcullis_oidc_verifications_total`.
pub fn count(conn: &ConnCtx, issuer: &str, result: &str) {
    conn.state
        .telemetry
        .metrics
        .oidc_verifications
        .with_label_values(&[issuer, result])
        .inc();
}

async fn verify(
    conn: &ConnCtx,
    snap: &Snapshot,
    pending: &Pending,
) -> Result<Identity, AuthFailure> {
    let fail = |failure| AuthFailure::Oidc {
        issuer: pending.issuer.clone(),
        failure,
    };
    if let Some(keys) = snap.clients.jwks_file_keys(&pending.issuer) {
        return snap.clients.identify_oidc(pending, &keys);
    }
    let entry = conn.state.issuer_keys.issuer(&pending.issuer);
    let keys = entry
        .keys(&pending.issuer, &snap.upstreams, REFRESH_EVERY)
        .await
        .map_err(fail)?;
    match snap.clients.identify_oidc(pending, &keys) {
        Err(AuthFailure::Oidc {
            failure: OidcFailure::NoKey { .. },
            ..
        }) if entry.may_refetch_for_kid() => {
            // The issuer may have rotated its keys: fetch them again, once.
            let keys = entry
                .keys(&pending.issuer, &snap.upstreams, Duration::ZERO)
                .await
                .map_err(fail)?;
            snap.clients.identify_oidc(pending, &keys)
        }
        other => other,
    }
}
