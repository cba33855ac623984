//! Live reload (spec §9): on SIGHUP, or when the config file or a `{ file }` secret changes, the
//! configuration is re-read, validated and swapped whole. A failed reload keeps the running
//! configuration, logs why and counts `portcullis_config_reloads_total{result="failure"}`.
//! Requests and tunnels in flight keep the snapshot they started with.
//!
//! Files are watched by polling their metadata once a second (with a short debounce), which also
//! sees Kubernetes ConfigMap and Secret updates, where the file is swapped through a symlink. The
//! polling runs on the blocking pool, never on a runtime worker. Every load — SIGHUP, an explicit
//! [`Reloader::reload`], or the watcher — records what the watched files looked like, so a change
//! is loaded once, not once more by the watcher.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::state::{Snapshot, State};
use crate::config::{self, Config, Origin};
use crate::telemetry::{RELOAD_FAILURE, RELOAD_SUCCESS};

/// How often watched files are checked.
const POLL: Duration = Duration::from_secs(1);
/// How long a change must settle before it is loaded (editors write in steps).
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration is invalid.
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    /// Its TLS settings cannot be built.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// Its signing key cannot be loaded.
    #[error("{0}")]
    Signing(#[from] crate::signing::SigningError),
}

impl From<super::state::BuildError> for ReloadError {
    fn from(e: super::state::BuildError) -> Self {
        match e {
            super::state::BuildError::Tls(e) => Self::Tls(e),
            super::state::BuildError::Signing(e) => Self::Signing(e),
        }
    }
}

fn config_path(origin: &Origin) -> Option<&Path> {
    match origin {
        Origin::File(path) => Some(path),
        Origin::Embedded => None,
    }
}

/// Reloads the configuration of a running proxy.
pub struct Reloader {
    state: Arc<State>,
    /// What the watched files looked like at the last load (held while loading, so loads never
    /// overlap).
    loaded: Mutex<Fingerprint>,
}

impl Reloader {
    /// A reloader for `state`, whose current configuration was loaded from the files as they
    /// are now.
    pub fn new(state: Arc<State>) -> Self {
        let loaded = fingerprint(&watched(&state.snapshot().config));
        Self {
            state,
            loaded: Mutex::new(loaded),
        }
    }

    /// Reloads the configuration from where the running one came from. On success the new
    /// snapshot serves every request that starts from now on. Blocking: call it off the runtime's
    /// workers.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        self.load(&mut loaded)
    }

    /// Reloads only if the watched files still look as `seen` and differ from what the last load
    /// saw. (A load in between may have changed which files are watched: then `seen`, taken over
    /// the old list, is stale, and the next poll decides.)
    fn reload_if_changed(&self, seen: &Fingerprint) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let current = fingerprint(&watched(&self.state.snapshot().config));
        if current == *seen && *loaded != current {
            tracing::info!("a watched file changed: reloading");
            let _ = self.load(&mut loaded);
        }
    }

    fn load(&self, loaded: &mut Fingerprint) -> Result<(), ReloadError> {
        let current = self.state.snapshot();
        // Taken before reading, so a change made while loading is seen by the next poll.
        let before = fingerprint(&watched(&current.config));
        let result = self.try_reload(&current.config);
        *loaded = match &result {
            // The new configuration may watch other files (a new secret file).
            Ok(()) => fingerprint(&watched(&self.state.snapshot().config))
                .into_iter()
                .map(|(path, meta)| {
                    let old = before.iter().find(|(p, _)| *p == path);
                    (path, old.map_or(meta, |(_, m)| *m))
                })
                .collect(),
            Err(_) => before,
        };
        let metrics = &self.state.telemetry.metrics;
        match &result {
            Ok(()) => {
                metrics
                    .config_reloads
                    .with_label_values(&[RELOAD_SUCCESS])
                    .inc();
            }
            Err(e) => {
                metrics
                    .config_reloads
                    .with_label_values(&[RELOAD_FAILURE])
                    .inc();
                tracing::error!(
                    "configuration reload failed; keeping the running configuration:\n{e}"
                );
            }
        }
        result
    }

    fn try_reload(&self, current: &Config) -> Result<(), ReloadError> {
        let new = config::load(config_path(&current.origin))?;
        if new.listen != current.listen {
            tracing::warn!(
                old_proxy = %current.listen.proxy,
                old_admin = %current.listen.admin,
                new_proxy = %new.listen.proxy,
                new_admin = %new.listen.admin,
                "listener addresses changed: they take effect after a restart"
            );
        }
        if new.tls.ca_cert != current.tls.ca_cert || new.tls.ca_key != current.tls.ca_key {
            tracing::warn!(
                "tls.ca_cert / tls.ca_key changed: the CA is replaced only by a restart"
            );
        }
        if new.limits.max_connections != current.limits.max_connections {
            tracing::warn!("limits.max_connections changed: it takes effect after a restart");
        }
        if new.limits.shutdown_grace != current.limits.shutdown_grace {
            tracing::warn!(
                "limits.shutdown_grace_seconds changed: it takes effect after a restart"
            );
        }
        for warning in &new.warnings {
            tracing::warn!("{warning}");
        }
        let output_changed = new.audit.output != current.audit.output;
        let rules = new.rules.len();
        let output = new.audit.output.clone();
        let snapshot = Snapshot::build(new, self.state.own.clone())?;
        self.state.swap(snapshot);
        if output_changed {
            self.state.telemetry.audit.reopen(output);
        }
        tracing::info!(rules, "configuration reloaded");
        Ok(())
    }

    /// SIGHUP: reopen the audit file (log rotation), then reload. Blocking.
    pub fn hangup(&self) {
        self.state
            .telemetry
            .audit
            .reopen(self.state.snapshot().config.audit.output.clone());
        let _ = self.reload();
    }

    /// Watches the config file, secret files and extra CA files until shutdown begins, reloading
    /// when one changes and has settled.
    pub async fn watch(self: Arc<Self>) {
        let drain = self.state.drain.clone();
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = drain.cancelled() => return,
            }
            let reloader = self.clone();
            let _ = tokio::task::spawn_blocking(move || reloader.poll()).await;
        }
    }

    /// One look at the watched files (blocking: `stat` calls).
    fn poll(&self) {
        let files = watched(&self.state.snapshot().config);
        let now = fingerprint(&files);
        let unchanged = {
            let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            *loaded == now
        };
        if unchanged {
            return;
        }
        // Let the writer finish, then load what settled.
        std::thread::sleep(DEBOUNCE);
        if fingerprint(&files) == now {
            self.reload_if_changed(&now);
        }
    }
}

/// What a watched file looked like.
type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    paths
        .iter()
        .map(|p| {
            // `metadata` follows symlinks: a ConfigMap's `..data` swap changes what it sees.
            let meta = std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (p.clone(), meta)
        })
        .collect()
}

fn watched(config: &Config) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = config_path(&config.origin)
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    paths.extend(config.secret_files.iter().cloned());
    paths.extend(config.tls.extra_upstream_ca.iter().cloned());
    // A replaced signing key is picked up like a changed config.
    paths.extend(config.signing.iter().map(|s| s.key.clone()));
    paths
}
