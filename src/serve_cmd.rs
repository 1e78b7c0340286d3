//! `sand gateway`, `sand worker` and `sand dev`: the long-running processes of a cluster.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use sand_gateway::{Gateway, GatewayConfig};
use sand_protocol::global_queue::GqConfig;
use sand_protocol::ids::WorkerId;
use sand_protocol::local_bus::LbConfig;
use sand_transport_quic::certs;
use sand_transport_quic::quic::{QuicConfig, QuicWorker};
use sand_worker::driver::WorkerConfig;
use sand_worker::host::{HostContext, Isolation};

use crate::client_cmd;

/// The hidden subcommand the sandbox holder runs as.
pub const SANDBOX_INIT: &str = "__sandbox-init";

/// `sand gateway`.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Where the store lives.
    #[arg(long, default_value = ".sand/gateway")]
    data_dir: PathBuf,
    /// The cluster CA and the gateway's certificate (`sand cert init`, `sand cert issue gateway`).
    #[arg(long, default_value = ".sand/certs")]
    certs: PathBuf,
    /// The HTTP API's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// The address workers dial (QUIC, UDP).
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Require `Authorization: Bearer TOKEN` on the API (or set SAND_TOKEN).
    #[arg(long, env = "SAND_TOKEN")]
    token: Option<String>,
    /// Declare a silent worker dead after this many milliseconds (at least 500). Workers
    /// heartbeat five times in that time: the gateway tells them so when they join.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..))]
    failure_timeout_ms: u64,
    /// An idempotency key names its execution for this many hours; past it, the same key
    /// starts a new execution.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=87_600))]
    key_ttl_hours: u64,
    /// Forget an ended execution (its answer, its key, its traces) this many hours after it
    /// ended. Running executions are kept.
    #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..=87_600))]
    retention_hours: u64,
    /// The most calls one execution may make; past it, it fails with a `Budget` error.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    calls_max: u32,
    /// How deep fan-outs may nest in one execution; a deeper one fails with a `Budget` error.
    #[arg(long, default_value_t = 16)]
    fan_out_depth_max: u32,
}

/// How to isolate grains.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum IsolationArg {
    /// One sandbox per app: namespaces and a cgroup.
    Sandbox,
    /// Plain processes on the host (for hosts without namespaces).
    None,
}

/// `sand worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The gateway's QUIC address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    gateway: SocketAddr,
    /// The name the gateway's certificate carries (a DNS name or IP address).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// This worker's id; its certificate must name it (`sand cert issue worker --id N`).
    #[arg(long)]
    id: u32,
    /// The cluster CA and this worker's certificate.
    #[arg(long, default_value = ".sand/certs")]
    certs: PathBuf,
    /// Where bundles are unpacked (default: .sand/worker-ID).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How grains are isolated.
    #[arg(long, value_enum, default_value = "sandbox")]
    isolation: IsolationArg,
    /// Tear an app's sandbox down after this many idle seconds.
    #[arg(long, default_value_t = 300)]
    idle_seconds: u64,
    /// Send every emitted call to the gateway to be placed, never running it here: SAND
    /// without its local bus, for the ablation benchmark.
    #[arg(long)]
    gateway_hops: bool,
}

/// `sand dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// App directories to deploy (each with a sand.toml).
    apps: Vec<PathBuf>,
    /// Where the store, certificates and bundles live.
    #[arg(long, default_value = ".sand")]
    data_dir: PathBuf,
    /// The HTTP API's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// How grains are isolated.
    #[arg(long, value_enum, default_value = "sandbox")]
    isolation: IsolationArg,
}

fn logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn gateway_config(
    data_dir: PathBuf,
    certs: PathBuf,
    http: SocketAddr,
    listen: SocketAddr,
) -> GatewayConfig {
    GatewayConfig {
        data_dir,
        cert_dir: certs,
        http_addr: http,
        quic_addr: listen,
        token: None,
        gq: GqConfig::default(),
        quic: QuicConfig::default(),
    }
}

/// `sand gateway`: serves until killed.
pub fn gateway(args: GatewayArgs) -> Result<ExitCode> {
    logging();
    let mut config = gateway_config(args.data_dir, args.certs, args.http, args.listen);
    config.token = args.token;
    config.gq.failure_timeout = Duration::from_millis(args.failure_timeout_ms);
    config.gq.key_ttl = Duration::from_secs(args.key_ttl_hours * 3600);
    config.gq.retention = Duration::from_secs(args.retention_hours * 3600);
    config.gq.calls_max = Some(args.calls_max);
    config.gq.depth_max = args.fan_out_depth_max;
    runtime()?.block_on(async move {
        let gateway = Gateway::start(config).await?;
        println!(
            "sand gateway: HTTP on http://{}, workers dial {}",
            gateway.http_addr, gateway.quic_addr
        );
        tokio::select! {
            err = gateway.wait() => Err(err.into()),
            signal = stop_signal() => {
                // Every change the gateway acknowledged is already durable: stopping here is
                // a crash it recovers from, without the wait.
                say(&format!("sand gateway: {}, stopping", signal?));
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// Prints a line on stdout, if stdout is still there: a process asked to stop must stop
/// cleanly even when whoever read its output is gone (`println!` would panic).
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM (how `kill` and service managers ask a process to
/// stop); returns the signal's name.
async fn stop_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    tokio::select! {
        _ = interrupt.recv() => Ok("SIGINT"),
        _ = terminate.recv() => Ok("SIGTERM"),
    }
}

fn worker_config(
    id: WorkerId,
    data_dir: PathBuf,
    isolation: IsolationArg,
    idle: Duration,
) -> Result<WorkerConfig> {
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot make the data directory {}", data_dir.display()))?;
    let data_dir = std::path::absolute(&data_dir).context("cannot resolve the data directory")?;
    let isolation = match isolation {
        IsolationArg::None => Isolation::None,
        IsolationArg::Sandbox => Isolation::Sandbox {
            program: std::env::current_exe().context("cannot find the sand binary")?,
            args: vec![OsString::from(SANDBOX_INIT)],
        },
    };
    let python_runtime =
        sand_worker::runtime::python::install_python_runtime(&data_dir.join("runtime"))
            .with_context(|| {
                format!(
                    "cannot install the Python runtime in {}",
                    data_dir.display()
                )
            })?;
    Ok(WorkerConfig {
        lb: LbConfig {
            worker: id,
            ..LbConfig::default()
        },
        data_dir,
        host: HostContext {
            isolation,
            python_runtime,
        },
        idle_teardown: idle,
        trace_interval: Duration::from_millis(100),
    })
}

async fn run_worker(
    gateway: SocketAddr,
    server_name: &str,
    cert_dir: &Path,
    config: WorkerConfig,
) -> Result<()> {
    let identity = certs::load_worker(cert_dir, config.lb.worker)?;
    let worker = config.lb.worker;
    let (quic, link) = QuicWorker::start(gateway, server_name, &identity, QuicConfig::default())?;
    let driver = sand_worker::driver::run(config, link);
    tokio::pin!(driver);
    let ended = tokio::select! {
        result = &mut driver => Some(result),
        signal = stop_signal() => {
            say(&format!("sand worker {worker}: {}, stopping", signal?));
            None
        }
    };
    // Closing the connection ends the driver's events: it then stops its zygotes and removes
    // its sandboxes and their cgroups before it returns.
    quic.shutdown().await;
    match ended {
        Some(result) => {
            result?;
            bail!("the worker stopped: its link to the gateway closed")
        }
        None => Ok(driver.await?),
    }
}

/// `sand worker`: serves until SIGINT or SIGTERM, then removes its sandboxes.
pub fn worker(args: WorkerArgs) -> Result<ExitCode> {
    logging();
    let id = WorkerId(args.id);
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| PathBuf::from(format!(".sand/worker-{}", args.id)));
    let mut config = worker_config(
        id,
        data_dir,
        args.isolation,
        Duration::from_secs(args.idle_seconds),
    )?;
    if args.gateway_hops {
        // The local bus sends emitted calls to the gateway once this many calls run here.
        config.lb.overload_threshold = 0;
    }
    println!("sand worker {id}: dialing {}", args.gateway);
    runtime()?.block_on(run_worker(
        args.gateway,
        &args.server_name,
        &args.certs,
        config,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Makes the CA and the certificates `sand dev` needs, once.
fn dev_certs(dir: &Path, worker: WorkerId) -> Result<()> {
    if !dir.join("ca.crt").exists() {
        certs::init_ca(dir)?;
    }
    if certs::load_gateway(dir).is_err() {
        certs::issue_gateway(dir, &["localhost".into(), "127.0.0.1".into()])?;
    }
    if certs::load_worker(dir, worker).is_err() {
        certs::issue_worker(dir, worker)?;
    }
    Ok(())
}

/// `sand dev`: a gateway and one worker in this process, the given apps deployed.
pub fn dev(args: DevArgs) -> Result<ExitCode> {
    logging();
    for app in &args.apps {
        if !app.join("sand.toml").is_file() {
            bail!("{} has no sand.toml: not an app directory", app.display());
        }
    }
    let cert_dir = args.data_dir.join("certs");
    let worker_id = WorkerId(1);
    dev_certs(&cert_dir, worker_id)?;
    let mut gconfig = gateway_config(
        args.data_dir.join("gateway"),
        cert_dir.clone(),
        args.http,
        "127.0.0.1:0".parse()?,
    );
    gconfig.gq.failure_timeout = Duration::from_secs(5);
    let wconfig = worker_config(
        worker_id,
        args.data_dir.join("worker-1"),
        args.isolation,
        Duration::from_secs(300),
    )?;
    runtime()?.block_on(async move {
        let gateway = Gateway::start(gconfig).await?;
        let url = format!("http://{}", gateway.http_addr);
        let quic_addr = gateway.quic_addr;
        let worker =
            tokio::spawn(
                async move { run_worker(quic_addr, "localhost", &cert_dir, wconfig).await },
            );
        let mut entry = None;
        for app in &args.apps {
            let client = client_cmd::Client::new(url.clone(), None);
            let app = app.clone();
            let deployed = tokio::task::spawn_blocking(move || client.deploy(&app)).await??;
            println!(
                "deployed {} ({} grains, entry {})",
                deployed.app, deployed.grains, deployed.entry
            );
            entry.get_or_insert(deployed.app);
        }
        println!("sand dev: gateway at {url}, one worker; Ctrl-C stops");
        match entry {
            Some(app) => println!("try: curl -s -X POST {url}/v1/apps/{app}/invoke -d '1'"),
            None => println!("deploy an app: sand deploy APP_DIR --gateway {url}"),
        }
        // The worker watches for SIGINT and SIGTERM itself, and ends once its sandboxes are
        // gone; the gateway stops with the process.
        tokio::select! {
            err = gateway.wait() => Err(err.into()),
            r = worker => match r {
                Ok(Ok(())) => Ok(ExitCode::SUCCESS),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e.into()),
            },
        }
    })
}
