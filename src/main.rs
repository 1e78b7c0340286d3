//! The `sand` command line.

use clap::Parser;

/// sand: a serverless platform for chained functions.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
