//! `portcullis` binary: parses the command line and hands it to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = portcullis::cli::Cli::parse();
    match portcullis::cli::execute(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("portcullis: {:#}", anyhow::Error::from(err));
            ExitCode::FAILURE
        }
    }
}
