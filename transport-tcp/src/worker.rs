//! A worker's endpoint: one TCP connection to the gateway at a time, re-opened by itself with
//! exponential backoff and jitter whenever it ends.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use sand_protocol::wire::Down;
use sand_transport::config::{LinkConfig, TransportError};
use sand_transport::conn::{Deliver, Inbox, TaskCounter};
use sand_transport::peers::{self, Current, Dialer};
use sand_transport::seam::WorkerLink;
use sand_transport::tls::{self, certs::NodeIdentity};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use crate::conn::{self, Parts, Severity};
use crate::Tcp;

/// A worker's TCP endpoint. Dropping it closes the connection and stops reconnecting.
#[derive(Debug)]
pub struct TcpWorker {
    current: Arc<Current<Tcp>>,
    tasks: TaskCounter,
    link: JoinHandle<()>,
}

impl TcpWorker {
    /// Starts connecting to the gateway at `gateway`, whose certificate must name
    /// `server_name` (a DNS name or IP address it was issued for), and keeps connected until
    /// dropped. Returns the endpoint and the worker's end of the seam. Must be called on a
    /// tokio runtime, which runs its tasks.
    pub fn start(
        gateway: SocketAddr,
        server_name: &str,
        identity: &NodeIdentity,
        config: LinkConfig,
    ) -> Result<(Self, WorkerLink), TransportError> {
        config.validate()?;
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TransportError::ServerName(server_name.to_string()))?;
        let connector = TlsConnector::from(Arc::new(tls::client_config(identity)?));
        let (current, link_ends, events) = Current::new();
        let tasks = TaskCounter::default();
        let dialer = TcpDialer {
            connector,
            gateway,
            name,
            config: config.clone(),
            tasks: tasks.clone(),
        };
        let link = tokio::spawn(peers::keep_connected(
            dialer,
            current.clone(),
            events,
            config,
            gateway,
        ));
        Ok((
            Self {
                current,
                tasks,
                link,
            },
            link_ends,
        ))
    }

    /// Whether a connection to the gateway is open now.
    pub fn is_connected(&self) -> bool {
        self.current.is_connected()
    }

    /// Drops the current connection, as a network fault would; the worker reconnects by
    /// itself. Returns whether a connection was open.
    pub fn reconnect(&self) -> bool {
        self.current.reconnect()
    }

    /// Tasks of the current connection alive now (zero while disconnected).
    pub fn live_tasks(&self) -> usize {
        self.tasks.live()
    }

    /// Closes the connection and stops reconnecting.
    pub async fn shutdown(self) {
        self.link.abort();
        let _ = (&mut { self }.link).await;
    }
}

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
    config: LinkConfig,
    tasks: TaskCounter,
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
        let timeout = self.config.open_timeout;
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

    async fn run(&self, conn: Tcp, stream: Self::Opened, inbox: Inbox, deliver: Deliver<Down>) {
        let ended = conn::drive(Parts {
            stream,
            conn,
            inbox,
            deliver,
            recv_queue_len_max: self.config.recv_queue_len_max,
            keep_alive_interval: self.config.keep_alive_interval,
            idle_timeout: self.config.idle_timeout,
            tasks: self.tasks.clone(),
        })
        .await;
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
