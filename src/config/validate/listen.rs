//! Validation of `[listen]` and `[limits]`: timeouts and sizes in range, the two listeners
//! distinct; units applied (seconds → [`Duration`]).

use std::time::Duration;

use crate::config::error::Problems;
use crate::config::frozen::{Limits, Listen};
use crate::config::raw::{RawLimits, RawListen};

/// `[listen]` and `[limits]`.
pub(super) fn listen_and_limits(
    listen: &RawListen,
    l: &RawLimits,
    p: &mut Problems,
) -> (Listen, Limits) {
    for (key, value) in [
        (
            "limits.header_read_timeout_seconds",
            l.header_read_timeout_seconds,
        ),
        ("limits.connect_timeout_seconds", l.connect_timeout_seconds),
        ("limits.idle_timeout_seconds", l.idle_timeout_seconds),
    ] {
        if value == 0 {
            p.add(key, "must be at least 1");
        }
    }
    if l.max_connections == 0 {
        p.add("limits.max_connections", "must be at least 1");
    }
    if !(1024..=16 * 1024 * 1024).contains(&l.max_header_bytes) {
        p.add(
            "limits.max_header_bytes",
            "must be between 1024 and 16777216",
        );
    }
    // Port 0 asks the OS for a free port (tests): two such listeners never collide.
    if listen.proxy == listen.admin && listen.proxy.port() != 0 {
        p.add("listen.admin", "must differ from listen.proxy");
    }
    if let Some(transparent) = listen.transparent {
        if transparent.port() != 0 && (transparent == listen.proxy || transparent == listen.admin) {
            p.add(
                "listen.transparent",
                "must differ from listen.proxy and listen.admin",
            );
        }
    }
    (
        Listen {
            proxy: listen.proxy,
            admin: listen.admin,
            transparent: listen.transparent,
        },
        Limits {
            max_connections: l.max_connections,
            header_read_timeout: Duration::from_secs(l.header_read_timeout_seconds),
            connect_timeout: Duration::from_secs(l.connect_timeout_seconds),
            idle_timeout: Duration::from_secs(l.idle_timeout_seconds),
            shutdown_grace: Duration::from_secs(l.shutdown_grace_seconds),
            max_header_bytes: l.max_header_bytes,
        },
    )
}
