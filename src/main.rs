use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("fixity: a TLS crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    fixity::cli::run(fixity::cli::Cli::parse())
}
