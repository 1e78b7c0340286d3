//! The `sand` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cert_cmd;
mod check_cmd;
mod fuzz_cmd;

/// sand: a serverless platform for chained functions.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Model-check the protocol with stateright.
    Check(check_cmd::CheckArgs),
    /// Fuzz the protocol over random crash schedules.
    Fuzz(fuzz_cmd::FuzzArgs),
    /// Create the cluster CA and issue gateway and worker certificates.
    Cert(cert_cmd::CertArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => check_cmd::run(args),
        Command::Fuzz(args) => fuzz_cmd::run(args),
        Command::Cert(args) => cert_cmd::run(args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}
