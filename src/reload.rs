//! Live reload (spec §9): on SIGHUP, or when the config file or a `{ file }` secret changes, the
//! configuration is re-read, validated and swapped whole. A failed reload keeps the running
//! configuration, logs why and counts `portcullis_config_reloads_total{result="failure"}`.
//! Requests and tunnels in flight keep the snapshot they started with.
//!
//! Files are watched by polling their metadata once a second (with a short debounce), which also
//! sees Kubernetes ConfigMap and Secret updates, where the file is swapped through a symlink.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{self, Config, Origin};
use crate::server::{Snapshot, State};

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
}

fn config_path(origin: &Origin) -> Option<&Path> {
    match origin {
        Origin::File(path) => Some(path),
        Origin::Embedded => None,
    }
}

impl State {
    /// Reloads the configuration from where the running one came from. On success the new
    /// snapshot serves every request that starts from now on.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let current = self.snapshot();
        let result = self.try_reload(&current.config);
        let metrics = &self.telemetry.metrics;
        match &result {
            Ok(()) => {
                metrics.config_reloads.with_label_values(&["success"]).inc();
            }
            Err(e) => {
                metrics.config_reloads.with_label_values(&["failure"]).inc();
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
        for warning in &new.warnings {
            tracing::warn!("{warning}");
        }
        let output_changed = new.audit.output != current.audit.output;
        let rules = new.rules.len();
        let output = new.audit.output.clone();
        let snapshot = Snapshot::build(new, self.own_listeners.clone())?;
        self.swap(snapshot);
        if output_changed {
            self.telemetry.audit.reopen(output);
        }
        tracing::info!(rules, "configuration reloaded");
        Ok(())
    }

    /// SIGHUP: reopen the audit file (log rotation), then reload.
    pub fn hangup(&self) {
        self.telemetry
            .audit
            .reopen(self.snapshot().config.audit.output.clone());
        let _ = self.reload();
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
    paths
}

/// Watches the config file, secret files and extra CA files until `state` stops, reloading
/// when one changes.
pub async fn watch(state: Arc<State>) {
    let mut files = watched(&state.snapshot().config);
    let mut last = fingerprint(&files);
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = state.drain.cancelled() => return,
        }
        let now = fingerprint(&files);
        if now == last {
            continue;
        }
        // Let the writer finish, then load what settled.
        tokio::time::sleep(DEBOUNCE).await;
        let settled = fingerprint(&files);
        if settled != now {
            continue;
        }
        tracing::info!("a watched file changed: reloading");
        let reloading = state.clone();
        let _ = tokio::task::spawn_blocking(move || reloading.reload()).await;
        files = watched(&state.snapshot().config);
        last = fingerprint(&files);
    }
}
