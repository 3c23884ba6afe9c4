//! The command line: `serve`, `check`, `verify`, `report` and `crd`.

pub mod check;
pub mod crd;
pub mod report;
pub mod serve;
pub mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// fixity: signed, digest-pinned workloads, and no changes to running pods.
#[derive(Debug, Parser)]
#[command(name = "fixity", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the admission webhook.
    Serve(Box<serve::ServeArgs>),
    /// Evaluate manifests offline with the same rules the webhook applies.
    Check(check::CheckArgs),
    /// Explain, for one pinned image, whose signature the policies trust.
    Verify(verify::VerifyArgs),
    /// Show what the background scanner found in a cluster (or scan it now with --scan).
    Report(report::ReportArgs),
    /// Print the ImmutabilityPolicy and VerifiedEvidence CustomResourceDefinitions as YAML.
    Crd,
}

/// Runs the parsed command and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Check(args) => check::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Report(args) => report::run(args),
        Command::Crd => crd::run(),
    }
}
