//! `sand gateway`, `sand worker` and `sand dev`: the long-running processes of a cluster.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use sand_app::policy::APP_MEMORY_MB_MAX_DEFAULT;
use sand_app::{Interpreter, Policy};
use sand_gateway::serve::{self, Limits};
use sand_gateway::token::{Token, TOKEN_FILE};
use sand_gateway::{Gateway, GatewayConfig};
use sand_protocol::global_queue::GqConfig;
use sand_protocol::ids::{AppName, WorkerId};
use sand_protocol::local_bus::LbConfig;
use sand_transport::config::{LinkConfig, Transport};
use sand_transport::seam::WorkerLink;
use sand_transport::tls::{certs, Dial};
use sand_transport_quic::QuicWorker;
use sand_transport_tcp::TcpWorker;
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
    /// The address workers dial (UDP for QUIC, TCP for TCP).
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// How workers reach the gateway: `quic` (UDP; a large payload never delays a heartbeat)
    /// or `tcp` (TCP with TLS 1.3, for networks that block UDP; a heartbeat may wait behind a
    /// large payload). Workers must use the same.
    #[arg(long, default_value_t = Transport::Quic)]
    transport: Transport,
    /// Require `Authorization: Bearer TOKEN` on the API, with the token in this file (mode
    /// 0600); or set SAND_TOKEN. Without one, the API must listen on a loopback address.
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long = "token", hide = true, value_parser = client_cmd::refuse_token_on_argv)]
    _token: Option<String>,
    /// Serve the API without a token on an address other hosts reach: anyone who reaches it
    /// may deploy code and read every execution.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Serve the API over TLS with this certificate chain (PEM), such as the cluster's
    /// `gateway.crt`; needs --http-tls-key.
    #[arg(long, requires = "http_tls_key", value_name = "FILE")]
    http_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --http-tls-cert.
    #[arg(long, requires = "http_tls_cert", value_name = "FILE")]
    http_tls_key: Option<PathBuf>,
    #[command(flatten)]
    http_args: HttpArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
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
    #[command(flatten)]
    policy: PolicyArgs,
}

/// The operator's policy: what apps may ask of the host. Give the gateway and every worker the
/// same: the gateway refuses a deploy that asks for more, a worker refuses to host it.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    /// An interpreter apps may name as `python`: PATH, or PATH=PREFIX to mount the directory
    /// PREFIX (say, a pyenv version's) read-only into their sandboxes for it. Repeatable; the
    /// first is the interpreter of apps that name none [default: /usr/bin/python3]
    #[arg(long = "python", value_name = "PATH[=PREFIX]")]
    python: Vec<Interpreter>,
    /// An app whose sandbox may have network access (`network = true`). Repeatable.
    #[arg(long = "allow-network", value_name = "APP", value_parser = app_name)]
    allow_network: Vec<AppName>,
    /// The most memory one app's grains may ask for together (`memory_mb`), in MiB.
    #[arg(long, default_value_t = APP_MEMORY_MB_MAX_DEFAULT)]
    app_memory_mb_max: u64,
}

impl PolicyArgs {
    fn policy(&self) -> Policy {
        let default = Policy::default();
        Policy {
            interpreters: if self.python.is_empty() {
                default.interpreters
            } else {
                self.python.clone()
            },
            network_apps: self.allow_network.iter().cloned().collect(),
            app_memory_mb_max: self.app_memory_mb_max,
        }
    }
}

fn app_name(s: &str) -> Result<AppName, String> {
    AppName::new(s).map_err(|e| e.to_string())
}

/// The HTTP API's hosts and limits, for `sand gateway` and `sand dev`.
#[derive(Args, Debug)]
pub struct HttpArgs {
    /// A host name the API answers to, besides localhost and IP addresses (repeatable): the
    /// name clients use in their URLs. Requests naming any other host are refused.
    #[arg(long = "http-host", value_name = "NAME")]
    hosts: Vec<String>,
    /// At most this many API connections at once; more wait to be accepted.
    #[arg(long, default_value_t = serve::MAX_CONNECTIONS_DEFAULT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    http_max_connections: usize,
    /// Close an API connection that has not sent a whole request head within this many
    /// milliseconds (slow or idle clients).
    #[arg(long, default_value_t = serve::HEADER_TIMEOUT_DEFAULT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    http_header_timeout_ms: u64,
    /// Fail a request whose body has not all arrived within this many milliseconds of its
    /// head (clients that trickle a body).
    #[arg(long, default_value_t = serve::BODY_TIMEOUT_DEFAULT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    http_body_timeout_ms: u64,
}

/// Where execution traces go, for `sand gateway` and `sand dev`.
#[derive(Args, Debug)]
pub struct TelemetryArgs {
    /// Send each execution's spans (OpenTelemetry) to the OTLP/HTTP collector at this base
    /// URL, such as http://127.0.0.1:4318 (spans go to its /v1/traces). http only: run the
    /// collector on the host.
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

impl HttpArgs {
    fn apply(self, config: &mut GatewayConfig) {
        config.http_hosts = self.hosts;
        config.http_limits = Limits {
            max_connections: self.http_max_connections,
            header_timeout: Duration::from_millis(self.http_header_timeout_ms),
            body_timeout: Duration::from_millis(self.http_body_timeout_ms),
        };
    }
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
    /// The gateway's address for workers (`sand gateway --listen`).
    #[arg(long, default_value = "127.0.0.1:7443")]
    gateway: SocketAddr,
    /// How to reach the gateway: `quic` (UDP) or `tcp` (TCP with TLS 1.3, for networks that
    /// block UDP); the same as the gateway's `--transport`.
    #[arg(long, default_value_t = Transport::Quic)]
    transport: Transport,
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
    /// Start sandboxes even where their memory, process and CPU limits cannot be enforced
    /// (no usable cgroup): they then run without them. Without this flag such apps fail.
    #[arg(long)]
    allow_unlimited: bool,
    /// Send every emitted call to the gateway to be placed, never running it here: SAND
    /// without its local bus, for the ablation benchmark.
    #[arg(long)]
    gateway_hops: bool,
    #[command(flatten)]
    policy: PolicyArgs,
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
    /// How the worker reaches the gateway: `quic` (UDP) or `tcp` (TCP with TLS 1.3), to try
    /// what a cluster on a network that blocks UDP would use.
    #[arg(long, default_value_t = Transport::Quic)]
    transport: Transport,
    #[command(flatten)]
    http_args: HttpArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Start sandboxes even where their memory, process and CPU limits cannot be enforced
    /// (no usable cgroup): they then run without them. Without this flag such apps fail.
    #[arg(long)]
    allow_unlimited: bool,
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
    policy: Policy,
) -> GatewayConfig {
    GatewayConfig {
        data_dir,
        cert_dir: certs,
        http_addr: http,
        worker_addr: listen,
        transport: Transport::Quic,
        token: None,
        insecure_no_auth: false,
        http_hosts: Vec::new(),
        http_tls: None,
        http_limits: Limits::default(),
        policy,
        gq: GqConfig::default(),
        link: LinkConfig::default(),
        otlp_endpoint: None,
    }
}

/// `sand gateway`: serves until killed.
pub fn gateway(args: GatewayArgs) -> Result<ExitCode> {
    logging();
    let mut config = gateway_config(
        args.data_dir,
        args.certs,
        args.http,
        args.listen,
        args.policy.policy(),
    );
    config.transport = args.transport;
    config.token = client_cmd::operator_token(args.token_file.as_deref())?;
    config.insecure_no_auth = args.insecure_no_auth;
    config.http_tls = args.http_tls_cert.zip(args.http_tls_key);
    args.http_args.apply(&mut config);
    config.otlp_endpoint = args.telemetry.otlp_endpoint;
    config.gq.failure_timeout = Duration::from_millis(args.failure_timeout_ms);
    config.gq.key_ttl = Duration::from_secs(args.key_ttl_hours * 3600);
    config.gq.retention = Duration::from_secs(args.retention_hours * 3600);
    config.gq.calls_max = Some(args.calls_max);
    config.gq.depth_max = args.fan_out_depth_max;
    runtime()?.block_on(async move {
        let gateway = Gateway::start(config).await?;
        println!(
            "sand gateway: HTTP on {}, workers dial {}",
            gateway.http_url(),
            gateway.worker_addr
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
    allow_unlimited: bool,
    idle: Duration,
    policy: Policy,
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
            policy,
            allow_unlimited,
        },
        idle_teardown: idle,
        trace_interval: Duration::from_millis(100),
    })
}

/// A worker's endpoint, on the transport chosen.
enum WorkerEndpoint {
    Quic(QuicWorker),
    Tcp(TcpWorker),
}

impl WorkerEndpoint {
    fn start(
        transport: Transport,
        gateway: SocketAddr,
        server_name: &str,
        identity: &certs::NodeIdentity,
    ) -> Result<(Self, WorkerLink)> {
        let dial = Dial {
            gateway,
            server_name,
            identity,
        };
        let config = LinkConfig::default();
        Ok(match transport {
            Transport::Quic => {
                let (endpoint, link) = QuicWorker::start(dial, config)?;
                (Self::Quic(endpoint), link)
            }
            Transport::Tcp => {
                let (endpoint, link) = TcpWorker::start(dial, config)?;
                (Self::Tcp(endpoint), link)
            }
        })
    }

    async fn shutdown(self) {
        match self {
            Self::Quic(endpoint) => endpoint.shutdown().await,
            Self::Tcp(endpoint) => endpoint.shutdown().await,
        }
    }
}

async fn run_worker(
    transport: Transport,
    gateway: SocketAddr,
    server_name: &str,
    cert_dir: &Path,
    config: WorkerConfig,
) -> Result<()> {
    let identity = certs::load_worker(cert_dir, config.lb.worker)?;
    let worker = config.lb.worker;
    let (endpoint, link) = WorkerEndpoint::start(transport, gateway, server_name, &identity)?;
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
    endpoint.shutdown().await;
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
        args.allow_unlimited,
        Duration::from_secs(args.idle_seconds),
        args.policy.policy(),
    )?;
    if args.gateway_hops {
        // The local bus sends emitted calls to the gateway once this many calls run here.
        config.lb.overload_threshold = 0;
    }
    println!("sand worker {id}: dialing {}", args.gateway);
    runtime()?.block_on(run_worker(
        args.transport,
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
        args.policy.policy(),
    );
    gconfig.gq.failure_timeout = Duration::from_secs(5);
    gconfig.transport = args.transport;
    // The dev API always wants a token, whatever its address: a web page the developer
    // visits, or another local user, can reach a loopback port too.
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot make the data directory {}", args.data_dir.display()))?;
    let token_file = std::path::absolute(args.data_dir.join(TOKEN_FILE))
        .context("cannot resolve the data directory")?;
    let token = Token::read_or_create(&token_file)?;
    gconfig.token = Some(token.clone());
    args.http_args.apply(&mut gconfig);
    gconfig.otlp_endpoint = args.telemetry.otlp_endpoint;
    let wconfig = worker_config(
        worker_id,
        args.data_dir.join("worker-1"),
        args.isolation,
        args.allow_unlimited,
        Duration::from_secs(300),
        args.policy.policy(),
    )?;
    runtime()?.block_on(async move {
        let gateway = Gateway::start(gconfig).await?;
        let url = gateway.http_url();
        let worker_addr = gateway.worker_addr;
        let transport = args.transport;
        let worker = tokio::spawn(async move {
            run_worker(transport, worker_addr, "localhost", &cert_dir, wconfig).await
        });
        let mut entry = None;
        for app in &args.apps {
            let client = client_cmd::Client::new(url.clone(), Some(token.clone()), None)?;
            let app = app.clone();
            let deployed = tokio::task::spawn_blocking(move || client.deploy(&app)).await??;
            println!(
                "deployed {} ({} grains, entry {})",
                deployed.app,
                deployed.grains.len(),
                deployed.entry
            );
            entry.get_or_insert(deployed.app);
        }
        println!("sand dev: gateway at {url}, one worker; Ctrl-C stops");
        // The token stays in its file (mode 0600): this output may end up in logs others read.
        println!("the API wants the token in {}", token_file.display());
        // The viewer takes the token from the fragment, which the browser never sends.
        println!(
            "execution viewer: open \"{url}/ui#token=$(cat {})\" (or {url}/ui, and paste \
             the token)",
            token_file.display()
        );
        match entry {
            Some(app) => println!(
                "try: curl -s -X POST {url}/v1/apps/{app}/invoke -H \"Authorization: Bearer \
                 $(cat {})\" -H 'Content-Type: application/json' -d '1'",
                token_file.display()
            ),
            None => println!(
                "deploy an app: sand deploy APP_DIR --gateway {url} --token-file {}",
                token_file.display()
            ),
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
