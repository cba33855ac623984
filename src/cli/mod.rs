//! The command line (spec §1): `run` (default), `check`, `ca init`, `ca show` and `env`.
//! `main.rs` parses it and calls [`execute`]; [`env`] renders what a pipeline container needs,
//! [`logging`] sets up log lines.
//!
//! `run` and `check` read every secret source; `env`, `ca show` and `ca init` read none
//! ([`config::load_unresolved`]): they work on a machine that has the config but not the secrets.

pub mod env;
pub mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use self::env::{CaFiles, Format, ProxyUrl, ProxyUrlError};
use self::logging::LogFormat;
use crate::{config, learn, proxy, tls};

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
    Check {
        /// Also judge every event of this audit (JSON lines; `-` = stdin) against the
        /// configuration and list each it decides differently; exit 2 when traffic that went
        /// through would now be denied.
        #[arg(long, value_name = "AUDIT")]
        replay: Option<PathBuf>,
    },
    /// Print [[hosts]] rules that allow what an audit shows and the configuration (-c, if given)
    /// does not allow yet.
    Learn {
        /// The audit (JSON lines; default: stdin).
        #[arg(long, value_name = "FILE")]
        audit: Option<PathBuf>,
        /// Only this client's events.
        #[arg(long)]
        client: Option<String>,
    },
    /// Print the environment a pipeline container needs (proxy variables and CA paths).
    Env {
        /// Proxy URL, http://[NAME:TOKEN@]HOST:PORT; the name and token may be given raw, they
        /// are percent-encoded (default: http:// + listen.proxy, with 127.0.0.1 for an
        /// unspecified address).
        #[arg(long)]
        proxy_url: Option<String>,
        /// CA file every CA variable names (default: tls.ca_cert for NODE_EXTRA_CA_CERTS, and
        /// ca-bundle.pem beside it, our CA + the system roots, written when missing or stale,
        /// for the variables that replace their tool's roots).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// `sh` (export lines) or `dotenv`.
        #[arg(long, value_enum, default_value_t = Format::Sh)]
        format: Format,
        /// Hosts that bypass the proxy (comma-separated; default: loopback and the cluster's
        /// service domains).
        #[arg(long, value_delimiter = ',')]
        no_proxy: Option<Vec<String>>,
    },
    /// List the built-in host presets (`preset = "NAME"` in a [[hosts]] rule) and their hosts.
    Presets,
    /// The request-signing key (`[signing]`).
    Signing {
        /// What to do with it.
        #[command(subcommand)]
        action: SigningCommand,
    },
    /// The interception CA.
    Ca {
        /// What to do with it.
        #[command(subcommand)]
        action: CaCommand,
    },
}

/// `portcullis signing …`
#[derive(Debug, Subcommand)]
pub enum SigningCommand {
    /// Print the public half of the signing key in use: SPKI PEM, or a JWKS with `--jwks`.
    Show {
        /// Print the JWKS instead of the PEM.
        #[arg(long)]
        jwks: bool,
    },
}

/// `portcullis ca …`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a new interception CA (ECDSA P-256; key file mode 0600).
    Init {
        /// Certificate path (default: the config's tls.ca_cert).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Key path (default: the config's tls.ca_key).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print the CA certificate in use (PEM).
    Show {
        /// Append the system's root certificates: a bundle for tools whose CA variable replaces
        /// their roots (curl, pip, git, …), so tunneled hosts keep verifying too.
        #[arg(long)]
        bundle: bool,
    },
}

/// Failures of a command, printed by `main`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration is invalid.
    #[error("invalid configuration:\n{0}")]
    Config(config::ConfigErrors),
    /// The proxy could not start or failed.
    #[error(transparent)]
    Server(#[from] proxy::ServerError),
    /// A CA or TLS operation failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// `env --proxy-url` is not an http:// URL.
    #[error(transparent)]
    ProxyUrl(#[from] ProxyUrlError),
    /// No CA certificate where the config says.
    #[error("no CA certificate at {0}: run `portcullis ca init`, or start the proxy once to generate one")]
    NoCa(PathBuf),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    /// Standard output could not be written.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    /// An input file (an audit) could not be read.
    #[error("cannot read {0}: {1}")]
    Input(String, std::io::Error),
    /// `[signing]` is not configured, or its key file does not exist yet.
    #[error("{0}")]
    NoSigningKey(String),
    /// The signing key could not be read.
    #[error(transparent)]
    Signing(#[from] crate::signing::SigningError),
    /// An audit line is not an event.
    #[error(transparent)]
    Audit(#[from] learn::BadLine),
}

/// A file's text, or standard input's for `None` or `-`.
fn read_input(path: Option<&std::path::Path>) -> Result<String, CliError> {
    match path {
        Some(p) if p != std::path::Path::new("-") => {
            std::fs::read_to_string(p).map_err(|e| CliError::Input(p.display().to_string(), e))
        }
        _ => std::io::read_to_string(std::io::stdin())
            .map_err(|e| CliError::Input("standard input".into(), e)),
    }
}

/// Writes `text` to standard output. A reader that went away (`portcullis check | head -1`) is
/// not an error: what it wanted, it got.
fn out(text: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Output(e)),
        _ => Ok(()),
    }
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
            runtime.block_on(proxy::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { replay } => {
            let config = config::load(cli.config.as_deref())?;
            // The upstream roots and extra CA files must load too.
            tls::upstream_client_config(&config.tls)?;
            out(&config.summary())?;
            // What `run` would refuse (a CA certificate without its key, or the reverse, or
            // one that does not load), `check` refuses too.
            let ca = &config.tls.ca_cert;
            if tls::CertificateAuthority::inspect(ca, &config.tls.ca_key)? {
                out(&format!("interception CA: {}\n", ca.display()))?;
            } else {
                out(&format!(
                    "interception CA: {} (missing: generated at first start)\n",
                    ca.display()
                ))?;
            }
            let Some(audit) = replay else {
                return Ok(ExitCode::SUCCESS);
            };
            let events = learn::read_events(&read_input(Some(&audit))?)?;
            let changes = learn::replay(&config, &events);
            let regressions = changes.iter().filter(|c| c.is_regression()).count();
            let mut report = format!(
                "replay: {} events, {} decided differently, {regressions} that went through would now be denied\n",
                events.len(),
                changes.len()
            );
            for change in &changes {
                report.push_str(&format!("  {}\n", change.describe()));
            }
            out(&report)?;
            Ok(match regressions {
                0 => ExitCode::SUCCESS,
                _ => ExitCode::from(2),
            })
        }
        Command::Learn { audit, client } => {
            // Only a configuration given with -c: the embedded default is not the one to extend.
            let config = match &cli.config {
                Some(path) => Some(config::load(Some(path))?),
                None => None,
            };
            let events = learn::read_events(&read_input(audit.as_deref())?)?;
            out(&learn::learn(&events, config.as_ref(), client.as_deref()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Signing {
            action: SigningCommand::Show { jwks },
        } => {
            let config = config::load_unresolved(cli.config.as_deref())?;
            let settings = config.signing().ok_or_else(|| {
                CliError::NoSigningKey("no [signing] section in the configuration".into())
            })?;
            let signer = crate::signing::Signer::load(&settings.key, &settings.key_id)?
                .ok_or_else(|| {
                    CliError::NoSigningKey(format!(
                        "no signing key at {}: start the proxy once to generate it",
                        settings.key.display()
                    ))
                })?;
            out(&match jwks {
                true => format!("{}\n", signer.jwks()),
                false => signer.public_key_pem(),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Presets => {
            let mut text = String::new();
            for preset in crate::policy::presets() {
                text.push_str(&format!(
                    "{}: {}\n  {}\n",
                    preset.name,
                    preset.description,
                    preset.hosts.join(" ")
                ));
            }
            out(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            action: CaCommand::Init { cert, key, force },
        } => {
            let (cert, key) = match (cert, key) {
                (Some(cert), Some(key)) => (cert, key),
                (cert, key) => {
                    let config = config::load_unresolved(cli.config.as_deref())?;
                    (
                        cert.unwrap_or_else(|| config.tls().ca_cert.clone()),
                        key.unwrap_or_else(|| config.tls().ca_key.clone()),
                    )
                }
            };
            tls::init_ca(&cert, &key, force)?;
            out(&format!(
                "wrote CA certificate {} and key {} (mode 0600)\n",
                cert.display(),
                key.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            action: CaCommand::Show { bundle },
        } => {
            let config = config::load_unresolved(cli.config.as_deref())?;
            let path = &config.tls().ca_cert;
            let pem = std::fs::read_to_string(path).map_err(|_| CliError::NoCa(path.clone()))?;
            if bundle {
                out(&tls::ca_bundle_pem(&pem)?)?;
            } else {
                out(&pem)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Env {
            proxy_url,
            ca_file,
            format,
            no_proxy,
        } => {
            // The URL first: a mistake in it is the likelier one, and needs no file to find.
            let proxy_url = proxy_url.as_deref().map(ProxyUrl::parse).transpose()?;
            let config = config::load_unresolved(cli.config.as_deref())?;
            let proxy_url =
                proxy_url.unwrap_or_else(|| ProxyUrl::from_listener(config.listen().proxy));
            let absolute = |path: PathBuf| std::path::absolute(&path).unwrap_or(path);
            let (ca, bundle) = match ca_file {
                Some(file) => {
                    let file = absolute(file);
                    (file.clone(), file)
                }
                None => {
                    let ca = absolute(config.tls().ca_cert.clone());
                    if !ca.exists() {
                        return Err(CliError::NoCa(ca));
                    }
                    let bundle = tls::write_bundle(&ca)?;
                    (ca, bundle)
                }
            };
            let clients: Vec<&str> = config.client_names().collect();
            if !clients.is_empty() && !proxy_url.has_credentials() {
                // Not an error: a pipeline may add its token to the URL itself.
                let unless = if config.has_network_clients() {
                    " unless it comes from a client's networks"
                } else {
                    ""
                };
                eprintln!(
                    "portcullis: warning: clients are configured ({}) and the proxy URL carries no \
                     credentials: every request will get 407 Proxy Authentication Required{unless}; \
                     pass --proxy-url http://NAME:TOKEN@HOST:PORT",
                    clients.join(", ")
                );
            }
            let no_proxy = no_proxy.unwrap_or_else(|| {
                env::DEFAULT_NO_PROXY
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect()
            });
            let files = CaFiles {
                ca: &ca.to_string_lossy(),
                bundle: &bundle.to_string_lossy(),
            };
            out(&env::render(&proxy_url, files, &no_proxy, format))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
