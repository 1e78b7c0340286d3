//! A worker's endpoint: one TCP connection to the gateway at a time, re-opened by itself with
//! exponential backoff and jitter whenever it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use sand_protocol::wire::Down;
use sand_transport::config::{LinkConfig, TransportError};
use sand_transport::conn::Plumbing;
use sand_transport::peers::{self, Dialer, WorkerEnd};
use sand_transport::seam::WorkerLink;
use sand_transport::tls::{self, Dial};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use crate::conn::{self, Severity};
use crate::Tcp;

/// A worker's TCP endpoint. Dropping it closes the connection and stops reconnecting.
#[derive(Debug)]
pub struct TcpWorker {
    end: WorkerEnd,
    link: JoinHandle<()>,
}

impl TcpWorker {
    /// Starts connecting to the gateway as `dial` says, and keeps connected until dropped.
    /// Returns the endpoint and the worker's end of the seam. Must be called on a tokio
    /// runtime, which runs its tasks.
    pub fn start(dial: Dial<'_>, config: LinkConfig) -> Result<(Self, WorkerLink), TransportError> {
        config.validate()?;
        let (gateway, name) = (dial.gateway, dial.checked_name()?);
        let connector = TlsConnector::from(Arc::new(tls::client_config(dial.identity)?));
        let dialer = TcpDialer {
            connector,
            gateway,
            name,
            open_timeout: config.open_timeout,
        };
        let (end, link_ends, link) = peers::start_worker(dialer, config, gateway);
        Ok((Self { end, link }, link_ends))
    }

    /// Closes the connection and stops reconnecting.
    pub async fn shutdown(self) {
        self.link.abort();
        let _ = (&mut { self }.link).await;
    }
}

sand_transport::deref_to_end!(TcpWorker => WorkerEnd);

impl Drop for TcpWorker {
    fn drop(&mut self) {
        self.link.abort();
    }
}

/// Opens TCP+TLS connections to the gateway and runs them.
struct TcpDialer {
    connector: TlsConnector,
    gateway: SocketAddr,
    name: ServerName<'static>,
    open_timeout: Duration,
}

impl Dialer for TcpDialer {
    type Conn = Tcp;
    type Opened = TlsStream<TcpStream>;

    async fn dial(&self) -> Result<(Tcp, Self::Opened), String> {
        let open = async {
            let socket = TcpStream::connect(self.gateway)
                .await
                .map_err(|e| e.to_string())?;
            let _ = socket.set_nodelay(true);
            self.connector
                .connect(self.name.clone(), socket)
                .await
                .map_err(|e| e.to_string())
        };
        let timeout = self.open_timeout;
        let mut stream = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))??;
        // With TLS 1.3 the gateway judges our certificate after our side of the handshake is
        // done: only its answer to the greeting proves it accepted us.
        conn::greet(&mut stream, timeout)
            .await
            .map_err(|e| format!("the gateway refused this worker: {e}"))?;
        Ok((Tcp::default(), stream))
    }

    async fn run(&self, conn: Tcp, stream: Self::Opened, plumbing: Plumbing<Down>) {
        let ended = conn::drive(stream, conn, plumbing).await;
        let gateway = self.gateway;
        match ended.severity() {
            Severity::ClosedHere => {
                warn!(%gateway, reason = %ended, "closed the connection to the gateway")
            }
            Severity::Broke => {
                warn!(%gateway, reason = %ended, "lost the connection to the gateway")
            }
            Severity::Orderly => {
                info!(%gateway, reason = %ended, "the connection to the gateway ended")
            }
        }
    }
}
