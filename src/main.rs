//! The `sand` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Prints a line on stdout, as `println!` does; when the reader of stdout is gone (`sand check
/// | head`), ends the process quietly with the status a shell gives SIGPIPE, as a Unix tool
/// does, where `println!` would panic.
macro_rules! out {
    () => {
        $crate::print_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::print_line(format_args!($($arg)*))
    };
}

mod cert_cmd;
mod check_cmd;
mod client_cmd;
mod fuzz_cmd;
mod render;
mod serve_cmd;

/// sand: a serverless platform for chained functions.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a gateway and one worker on loopback, with the given apps deployed.
    Dev(serve_cmd::DevArgs),
    /// Run a gateway: the HTTP API, the global queue, the store.
    Gateway(serve_cmd::GatewayArgs),
    /// Run a worker that dials a gateway.
    Worker(serve_cmd::WorkerArgs),
    /// Deploy (or replace) an app directory.
    Deploy(client_cmd::DeployArgs),
    /// Invoke an app and print its answer.
    Invoke(client_cmd::InvokeArgs),
    /// Show an execution as a table of its calls, or the cluster's workers and apps.
    Status(client_cmd::StatusArgs),
    /// Print an execution's calls and what each printed.
    Logs(client_cmd::LogsArgs),
    /// Model-check the protocol with stateright.
    Check(check_cmd::CheckArgs),
    /// Fuzz the protocol over random crash schedules.
    Fuzz(fuzz_cmd::FuzzArgs),
    /// Create the cluster CA and issue gateway and worker certificates.
    Cert(cert_cmd::CertArgs),
}

fn main() -> ExitCode {
    // The sandbox holder: single-threaded, before anything else exists.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(serve_cmd::SANDBOX_INIT))
    {
        sand_sandbox::init_main();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dev(args) => serve_cmd::dev(args),
        Command::Gateway(args) => serve_cmd::gateway(args),
        Command::Worker(args) => serve_cmd::worker(args),
        Command::Deploy(args) => client_cmd::deploy(args),
        Command::Invoke(args) => client_cmd::invoke(args),
        Command::Status(args) => client_cmd::status(args),
        Command::Logs(args) => client_cmd::logs(args),
        Command::Check(args) => check_cmd::run(args),
        Command::Fuzz(args) => fuzz_cmd::run(args),
        Command::Cert(args) => cert_cmd::run(args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}

/// What [`out!`] expands to.
fn print_line(line: std::fmt::Arguments) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"));
    if written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
        std::process::exit(128 + 13);
    }
}
