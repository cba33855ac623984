//! The command line (spec §1): `run` (default) and `check`. `main.rs` parses it and calls
//! [`execute`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::logging::{self, LogFormat};
use crate::{config, server};

/// Portcullis: an authenticating egress proxy for CI and build pipelines.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Config file (default: $PORTCULLIS_CONFIG, else the embedded default).
    #[arg(short, long, global = true)]
    pub config: Option<PathBuf>,
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run,
    /// Load and validate the configuration, resolve every secret source, print a summary.
    Check,
}

/// Failures of a command, printed by `main`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration is invalid.
    #[error("invalid configuration:\n{0}")]
    Config(config::ConfigErrors),
    /// The proxy could not start or failed.
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

// Not `#[from]`: that would make the errors the *source* too, and `main` prints the chain.
impl From<config::ConfigErrors> for CliError {
    fn from(errors: config::ConfigErrors) -> Self {
        Self::Config(errors)
    }
}

/// Runs the parsed command line.
pub fn execute(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            logging::init(cli.log_format);
            let config = config::load(cli.config.as_deref())?;
            tracing::info!(config = %config.origin, rules = config.rules.len(), "configuration loaded");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(CliError::Runtime)?;
            runtime.block_on(server::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let config = config::load(cli.config.as_deref())?;
            print!("{}", config.summary());
            Ok(ExitCode::SUCCESS)
        }
    }
}
