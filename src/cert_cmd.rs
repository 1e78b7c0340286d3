//! `sand cert`: the cluster CA and the gateway's and workers' certificates.

use std::path::PathBuf;

use anyhow::Context;
use sand_protocol::ids::WorkerId;
use sand_transport::tls::certs::{self, IssuedFiles};

/// Create the cluster's CA, and issue certificates signed by it. Gateways and workers accept
/// only peers with a certificate from the same CA. Keys are written with mode 0600.
#[derive(clap::Args, Debug)]
pub struct CertArgs {
    /// The directory that holds the CA and the certificates.
    #[arg(long, global = true, default_value = ".sand/certs")]
    dir: PathBuf,
    #[command(subcommand)]
    command: CertCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CertCommand {
    /// Create the cluster CA (refuses to overwrite one).
    Init,
    /// Issue a certificate signed by the cluster CA.
    Issue {
        #[command(subcommand)]
        node: Node,
    },
}

#[derive(clap::Subcommand, Debug)]
enum Node {
    /// A gateway certificate for the names (DNS names or IP addresses) workers dial.
    Gateway {
        /// A name workers use to reach the gateway; repeat for more.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
    /// A worker certificate carrying the worker's id.
    Worker {
        /// The worker's id.
        #[arg(long)]
        id: u32,
    },
}

/// Runs `sand cert`.
pub fn run(args: CertArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    let issued = match args.command {
        CertCommand::Init => certs::init_ca(dir).context("creating the cluster CA")?,
        CertCommand::Issue {
            node: Node::Gateway { names },
        } => certs::issue_gateway(dir, &names).context("issuing the gateway certificate")?,
        CertCommand::Issue {
            node: Node::Worker { id },
        } => certs::issue_worker(dir, WorkerId(id)).context("issuing the worker certificate")?,
    };
    let IssuedFiles { cert, key } = issued;
    out!(
        "wrote {} and its key {} (mode 0600)",
        cert.display(),
        key.display()
    );
    Ok(())
}
