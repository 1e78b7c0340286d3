//! A running gateway: the store, the core, QUIC or TCP for workers and HTTP for clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use sand_protocol::global_queue::{ConfigError, GqConfig};
use sand_transport::config::{LinkConfig, Transport, TransportError};
use sand_transport::seam::GatewayLink;
use sand_transport::tls::certs::{self, CertError, NodeIdentity};
use sand_transport_quic::QuicGateway;
use sand_transport_tcp::TcpGateway;
use tokio::task::JoinHandle;

use crate::core::{self, Core, CoreHandle};
use crate::exec_ref::{ExecRefs, SecretError};
use crate::http::{self, Api};
use crate::metrics::Metrics;
use crate::serve::{self, Limits, TlsError};
use crate::store::{Store, StoreError};
use crate::telemetry::{Telemetry, TelemetryError};
use crate::token::Token;

/// The file of the embedded store, in the data directory.
pub const STORE_FILE: &str = "gateway.redb";

/// How to run a gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where the store lives (made if missing).
    pub data_dir: PathBuf,
    /// Where the cluster CA and the gateway's certificate are.
    pub cert_dir: PathBuf,
    /// The HTTP API's address.
    pub http_addr: SocketAddr,
    /// The address workers dial (UDP for QUIC, TCP for TCP).
    pub worker_addr: SocketAddr,
    /// The bearer token the API wants on `/v1`, if any.
    pub token: Option<Token>,
    /// Serve the API without a token on an address other hosts reach (refused otherwise).
    pub insecure_no_auth: bool,
    /// Host names, besides `localhost` and IP addresses, the API answers to.
    pub http_hosts: Vec<String>,
    /// The HTTP API's certificate chain and key (PEM files), to serve it over TLS.
    pub http_tls: Option<(PathBuf, PathBuf)>,
    /// The HTTP server's connection limit and header deadline.
    pub http_limits: Limits,
    /// What apps may ask of the host: a deploy that asks for more is refused.
    pub policy: sand_app::Policy,
    /// The protocol's settings (failure timeout and so on).
    pub gq: GqConfig,
    /// Which transport workers dial.
    pub transport: Transport,
    /// The transport's settings.
    pub link: LinkConfig,
    /// The OTLP/HTTP collector executions' spans go to, if any (see [`Telemetry::otlp`]).
    pub otlp_endpoint: Option<String>,
}

/// Why a gateway could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The protocol's settings cannot be honoured.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The secret of execution references could not be had.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The gateway's certificate could not be loaded.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The QUIC endpoint could not start.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The data directory or the HTTP address could not be used.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The HTTP API would be open to other hosts without a token.
    #[error(
        "the HTTP API on {0} is reachable from other hosts and has no token: give one \
         (--token-file FILE or SAND_TOKEN), listen on a loopback address, or, to serve it \
         open to anyone who reaches it, pass --insecure-no-auth"
    )]
    NoToken(SocketAddr),
    /// The HTTP API's TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The OTLP exporter cannot start.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// A task of the gateway ended unexpectedly.
    #[error("the gateway's {0} task stopped unexpectedly")]
    Stopped(&'static str),
}

/// A gateway serving.
pub struct Gateway {
    /// The HTTP API's bound address.
    pub http_addr: SocketAddr,
    /// The workers' endpoint's bound address.
    pub worker_addr: SocketAddr,
    /// Whether the HTTP API is served over TLS.
    pub https: bool,
    /// Asks the core.
    pub core: CoreHandle,
    core_task: JoinHandle<Result<(), StoreError>>,
    http_task: JoinHandle<Infallible>,
    workers: WorkerEndpoint,
}

/// The endpoint workers dial, on the transport chosen.
#[derive(Debug)]
enum WorkerEndpoint {
    Quic(QuicGateway),
    Tcp(TcpGateway),
}

impl WorkerEndpoint {
    fn bind(
        config: &GatewayConfig,
        identity: &NodeIdentity,
    ) -> Result<(Self, GatewayLink), TransportError> {
        let (addr, link) = (config.worker_addr, config.link.clone());
        Ok(match config.transport {
            Transport::Quic => {
                let (endpoint, ends) = QuicGateway::bind(addr, identity, link)?;
                (Self::Quic(endpoint), ends)
            }
            Transport::Tcp => {
                let (endpoint, ends) = TcpGateway::bind(addr, identity, link)?;
                (Self::Tcp(endpoint), ends)
            }
        })
    }

    fn local_addr(&self) -> SocketAddr {
        match self {
            Self::Quic(endpoint) => endpoint.local_addr(),
            Self::Tcp(endpoint) => endpoint.local_addr(),
        }
    }

    async fn shutdown(self) {
        match self {
            Self::Quic(endpoint) => endpoint.shutdown().await,
            Self::Tcp(endpoint) => endpoint.shutdown().await,
        }
    }
}

impl Gateway {
    /// Opens the store, recovers the queue, and starts serving workers and clients.
    pub async fn start(config: GatewayConfig) -> Result<Self, GatewayError> {
        config.gq.validate()?;
        if config.token.is_none()
            && !config.http_addr.ip().is_loopback()
            && !config.insecure_no_auth
        {
            return Err(GatewayError::NoToken(config.http_addr));
        }
        let https = config.http_tls.is_some();
        let tls = match &config.http_tls {
            Some((cert, key)) => Some(serve::tls_config(cert, key)?),
            None => None,
        };
        std::fs::create_dir_all(&config.data_dir).map_err(|source| GatewayError::Io {
            what: format!(
                "cannot make the data directory {}",
                config.data_dir.display()
            ),
            source,
        })?;
        let refs = Arc::new(ExecRefs::open(&config.data_dir)?);
        let telemetry = match &config.otlp_endpoint {
            Some(endpoint) => Some(Arc::new(Telemetry::otlp(endpoint)?)),
            None => None,
        };
        let identity = certs::load_gateway(&config.cert_dir)?;
        let (store, state) = Store::open(&config.data_dir.join(STORE_FILE))?;
        let store = Arc::new(store);
        tracing::info!(
            executions = state.execs.len(),
            pending_calls = state.calls.len(),
            apps = state.apps.len(),
            "store opened"
        );
        let (workers, link) = WorkerEndpoint::bind(&config, &identity)?;
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let core = Core::new(
            config.gq,
            store.clone(),
            state,
            link.sender,
            metrics.clone(),
            refs.clone(),
            telemetry.clone(),
        );
        let (handle, core_task) = core::spawn(core, link.events);
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| GatewayError::Io {
                what: format!("cannot listen on {}", config.http_addr),
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| GatewayError::Io {
            what: "cannot read the HTTP address".into(),
            source,
        })?;
        let api = Api {
            core: handle.clone(),
            store,
            metrics,
            registry: Arc::new(registry),
            token: config.token.map(Arc::new),
            hosts: config.http_hosts.into(),
            policy: Arc::new(config.policy),
            refs,
            telemetry,
        };
        let app = http::router(api);
        let http_task = tokio::spawn(serve::serve(listener, app, config.http_limits, tls));
        tracing::info!(http = %http_addr, workers = %workers.local_addr(), transport = %config.transport, "gateway serving");
        Ok(Self {
            http_addr,
            worker_addr: workers.local_addr(),
            https,
            core: handle,
            core_task,
            http_task,
            workers,
        })
    }

    /// The HTTP API's base URL: `http://ADDR` or `https://ADDR`.
    pub fn http_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr)
    }

    /// Serves until a task fails; returns why.
    pub async fn wait(mut self) -> GatewayError {
        let err = tokio::select! {
            r = &mut self.core_task => match r {
                Ok(Err(e)) => GatewayError::Store(e),
                _ => GatewayError::Stopped("core"),
            },
            _ = &mut self.http_task => GatewayError::Stopped("HTTP"),
        };
        self.workers.shutdown().await;
        err
    }
}
