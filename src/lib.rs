//! Portcullis: an authenticating egress proxy for CI and build pipelines.
//!
//! A request's path through the crate, top to bottom: [`server`] (listener, limits, lifecycle) →
//! client identity → [`policy`] (pure allow/deny decisions) → [`connect`] (CONNECT tunnels) or
//! [`forward`] (plain HTTP) → [`credentials`] → [`upstream`] / [`net`] (resolution, destination
//! safety, dialling) → response, with [`error`] the one place that maps failures to a status and
//! `Proxy-Status`. [`config`] loads, validates and freezes the configuration; [`admin`] serves
//! health endpoints. `main.rs` only parses the command line and calls [`cli`].

pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod connect;
pub mod credentials;
pub mod error;
pub mod forward;
pub mod identity;
pub mod intercept;
pub mod keepalive;
pub mod logging;
pub mod net;
pub mod pipeline_env;
pub mod policy;
pub mod reload;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;
