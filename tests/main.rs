//! The integration tests, one binary: each module is one concern driven over real sockets on
//! loopback (the proxy in-process or as the built binary, real clients, real TLS). One binary
//! rather than one per file: the suite links once, which keeps build time and disk use down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod accounting;
mod canary;
mod cli;
mod clients;
mod deploy;
mod env;
mod github_app;
mod hostile;
mod include;
mod intercept;
mod large_stream;
mod learn;
mod minted;
mod newcomer;
mod observability;
mod oidc;
mod oidc_templates;
mod pool;
mod presets;
mod proxy;
mod reload;
mod shutdown;
mod signing;
mod sigv4;
mod transparent;
