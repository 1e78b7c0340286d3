//! A worker's endpoint: one connection to the gateway at a time, re-opened by itself with
//! exponential backoff and jitter whenever it ends.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use quinn::{Connection, ConnectionError, Endpoint, VarInt};
use sand_protocol::wire::Down;
use sand_transport::config::{LinkConfig, TransportError};
use sand_transport::conn::{Plumbing, CLOSE_NORMAL};
use sand_transport::peers::{self, Dialer, WorkerEnd};
use sand_transport::seam::WorkerLink;
use sand_transport::tls::Dial;
use tracing::{info, warn};

use crate::conn::{self, Ended};
use crate::{Quic, Running};

/// A worker's QUIC endpoint. Dropping it closes the connection and stops reconnecting.
#[derive(Debug)]
pub struct QuicWorker {
    end: WorkerEnd,
    running: Running,
}

impl QuicWorker {
    /// Starts connecting to the gateway as `dial` says, and keeps connected until dropped.
    /// Returns the endpoint and the worker's end of the seam. Must be called on a tokio
    /// runtime, which runs its tasks.
    pub fn start(dial: Dial<'_>, config: LinkConfig) -> Result<(Self, WorkerLink), TransportError> {
        dial.checked_name()?;
        let gateway = dial.gateway;
        let client = crate::client_config(dial.identity, &config)?;
        let local: SocketAddr = if gateway.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = Endpoint::client(local).map_err(|source| TransportError::Bind {
            addr: local,
            source,
        })?;
        endpoint.set_default_client_config(client);
        let idle_timeout = config.idle_timeout;
        let dialer = QuicDialer {
            endpoint: endpoint.clone(),
            gateway,
            server_name: dial.server_name.to_string(),
            open_timeout: config.open_timeout,
        };
        let (end, link_ends, link) = peers::start_worker(dialer, config, gateway);
        Ok((
            Self {
                end,
                running: Running {
                    endpoint,
                    task: link,
                    idle_timeout,
                    farewell: b"worker shutting down",
                },
            },
            link_ends,
        ))
    }

    /// Closes the connection, stops reconnecting, and waits (up to the idle timeout) for the
    /// gateway to be told.
    pub async fn shutdown(self) {
        self.running.stop().await
    }
}

sand_transport::deref_to_end!(QuicWorker => WorkerEnd);

/// Opens QUIC connections to the gateway and runs them.
struct QuicDialer {
    endpoint: Endpoint,
    gateway: SocketAddr,
    server_name: String,
    open_timeout: Duration,
}

impl Dialer for QuicDialer {
    type Conn = Quic;
    type Opened = (quinn::SendStream, quinn::RecvStream);

    async fn dial(&self) -> Result<(Quic, Self::Opened), String> {
        let (conn, send, recv) = connect(self).await?;
        Ok((Quic(conn), (send, recv)))
    }

    async fn run(&self, Quic(conn): Quic, control: Self::Opened, plumbing: Plumbing<Down>) {
        let ended = conn::drive(conn, control, plumbing).await;
        log_end(self.gateway, &ended);
    }
}

async fn connect(
    l: &QuicDialer,
) -> Result<(Connection, quinn::SendStream, quinn::RecvStream), String> {
    let connecting = l
        .endpoint
        .connect(l.gateway, &l.server_name)
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(l.open_timeout, connecting)
        .await
        .map_err(|_| format!("no answer within {:?}", l.open_timeout))?
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 the gateway judges our certificate after our side of the handshake is done:
    // only its answer on the control stream proves it accepted us.
    let (send, recv) = match conn::open_control(&conn, l.open_timeout).await {
        Ok(streams) => streams,
        Err(e) => {
            conn.close(
                VarInt::from_u32(CLOSE_NORMAL),
                b"no answer on the control stream",
            );
            return Err(format!("the gateway refused this worker: {e}"));
        }
    };
    Ok((conn, send, recv))
}

fn log_end(gateway: SocketAddr, ended: &Ended) {
    match ended {
        Ended::Overflowed | Ended::Violation(_) | Ended::Abandoned(_) | Ended::Panicked => {
            warn!(%gateway, reason = %ended, "closed the connection to the gateway")
        }
        Ended::Closed(ConnectionError::LocallyClosed) | Ended::Unwanted => {
            info!(%gateway, "closed the connection to the gateway")
        }
        Ended::Closed(ConnectionError::ApplicationClosed(_)) => {
            info!(%gateway, reason = %ended, "the gateway closed the connection")
        }
        _ => warn!(%gateway, reason = %ended, "lost the connection to the gateway"),
    }
}
