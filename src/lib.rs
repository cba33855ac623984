//! Portcullis: an authenticating egress proxy for CI and build pipelines.
//!
//! A request's path through the crate, top to bottom: [`proxy`] (listener → dispatch → client
//! identity via [`identity`] → [`policy`] → tunnel | intercept | the one request pipeline →
//! [`credentials`] → upstream through [`net`]'s dialer → [`telemetry`]: audit + metrics), with
//! [`error`] the one table mapping failures to a status and `Proxy-Status`. [`config`] loads, validates and freezes
//! the configuration; [`tls`] holds the interception CA and upstream TLS; [`admin`] serves health
//! and metrics endpoints; [`cli`] is the command line (`main.rs` only parses it and calls in).
//! docs/architecture.md draws the module graph.

pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod error;
pub mod identity;
pub mod learn;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod signing;
pub mod telemetry;
pub mod tls;
