//! The gateway's endpoint: accepts workers, tells them apart by certificate, and keeps one
//! current connection per worker.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::{Connection, ConnectionError, Endpoint, Incoming, VarInt};
use rustls_pki_types::CertificateDer;
use sand_protocol::ids::WorkerId;
use sand_transport::config::{LinkConfig, TransportError};
use sand_transport::conn::{TaskCounter, CLOSE_IDENTITY, CLOSE_VIOLATION};
use sand_transport::handshakes::{Handshake, Handshakes};
use sand_transport::peers::{GatewayEnd, Registry};
use sand_transport::seam::GatewayLink;
use sand_transport::tls::certs::{self, NodeIdentity};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::conn::{self, Ended};
use crate::{Quic, Running};

/// The gateway's QUIC endpoint. Dropping it closes every connection and stops every task.
#[derive(Debug)]
pub struct QuicGateway {
    local_addr: SocketAddr,
    end: GatewayEnd,
    running: Running,
}

impl QuicGateway {
    /// Listens on `addr` with the gateway's `identity`, and returns the endpoint and the
    /// gateway's end of the seam. Must be called on a tokio runtime, which runs its tasks.
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        config: LinkConfig,
    ) -> Result<(Self, GatewayLink), TransportError> {
        let server = crate::server_config(identity, &config)?;
        let endpoint = Endpoint::server(server, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| TransportError::Bind { addr, source })?;
        let (end, link) = GatewayEnd::new();
        let idle_timeout = config.idle_timeout;
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            end.registry(),
            config,
            end.tasks(),
        ));
        info!(addr = %local_addr, "gateway listening for workers");
        Ok((
            Self {
                local_addr,
                end,
                running: Running {
                    endpoint,
                    task: accept,
                    idle_timeout,
                    farewell: b"gateway shutting down",
                },
            },
            link,
        ))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// QUIC connections open now, including ones still in their handshake.
    pub fn open_connections(&self) -> usize {
        self.running.endpoint.open_connections()
    }

    /// Closes every connection and waits (up to the idle timeout) for the peers to be told.
    pub async fn shutdown(self) {
        self.running.stop().await
    }
}

sand_transport::deref_to_end!(QuicGateway => GatewayEnd);

async fn accept_loop(
    endpoint: Endpoint,
    registry: Arc<Registry>,
    config: LinkConfig,
    tasks: TaskCounter,
) {
    let mut connections = JoinSet::new();
    let mut handshakes = Handshakes::new(config.handshakes_max);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else {
                    // The endpoint was closed.
                    break;
                };
                let Some(place) = handshakes.admit(incoming.remote_address()) else {
                    incoming.refuse();
                    continue;
                };
                connections.spawn(tasks.track(serve(
                    incoming,
                    place,
                    registry.clone(),
                    config.clone(),
                    tasks.clone(),
                )));
            }
            Some(_) = connections.join_next() => {}
        }
    }
    connections.shutdown().await;
}

/// Runs one worker connection from handshake to end.
async fn serve(
    incoming: Incoming,
    place: Handshake,
    registry: Arc<Registry>,
    config: LinkConfig,
    tasks: TaskCounter,
) {
    let peer_addr = incoming.remote_address();
    let handshake = tokio::time::timeout(config.open_timeout, async {
        incoming
            .accept()
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    });
    let conn = match handshake.await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            warn!(peer = %peer_addr, %error, "refused a peer at the TLS handshake");
            return;
        }
        Err(_) => {
            warn!(peer = %peer_addr, timeout = ?config.open_timeout, "refused a peer: the TLS handshake did not finish in time");
            return;
        }
    };
    let worker = match peer_worker(&conn) {
        Ok(worker) => worker,
        Err(error) => {
            // The verifier already refuses such certificates; this is a second line.
            warn!(peer = %peer_addr, %error, "refused a peer: its certificate names no worker");
            conn.close(VarInt::from_u32(CLOSE_IDENTITY), error.as_bytes());
            return;
        }
    };
    let (control_send, control_recv) = match conn::accept_control(&conn, config.open_timeout).await
    {
        Ok(streams) => streams,
        Err(ended) => {
            if let Ended::Violation(e) = &ended {
                conn.close(VarInt::from_u32(CLOSE_VIOLATION), e.to_string().as_bytes());
            }
            warn!(%worker, peer = %peer_addr, reason = %ended, "refused a worker: it did not open its control stream properly");
            return;
        }
    };
    drop(place);
    let (conn_id, plumbing) = registry.attach(worker, Quic(conn.clone()), config, tasks);
    info!(%worker, peer = %peer_addr, "worker connected");
    let ended = conn::drive(conn, (control_send, control_recv), plumbing).await;
    registry.detach(worker, conn_id);
    log_end(worker, peer_addr, &ended);
}

fn log_end(worker: WorkerId, peer: SocketAddr, ended: &Ended) {
    match ended {
        Ended::Violation(_) | Ended::Abandoned(_) | Ended::Overflowed | Ended::Panicked => {
            warn!(%worker, %peer, reason = %ended, "closed the worker's connection")
        }
        Ended::Closed(ConnectionError::TimedOut) => {
            warn!(%worker, %peer, "the worker's connection timed out")
        }
        Ended::Closed(ConnectionError::LocallyClosed) => {
            info!(%worker, %peer, "closed the worker's connection")
        }
        Ended::Closed(ConnectionError::ApplicationClosed(_)) | Ended::ControlFinished => {
            info!(%worker, %peer, reason = %ended, "the worker closed its connection")
        }
        Ended::Closed(_) => warn!(%worker, %peer, reason = %ended, "the worker's connection broke"),
        Ended::Unwanted => debug!(%worker, %peer, "connection ended: no longer wanted"),
    }
}

/// The worker a connection's client certificate names.
fn peer_worker(conn: &Connection) -> Result<WorkerId, String> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| "the peer presented no certificate".to_string())?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "the peer's identity is not a certificate chain".to_string())?;
    let leaf = chain
        .first()
        .ok_or_else(|| "the peer presented an empty certificate chain".to_string())?;
    certs::worker_id_of(leaf).map_err(|e| e.to_string())
}
