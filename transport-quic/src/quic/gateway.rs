//! The gateway's endpoint: accepts workers, tells them apart by certificate, and keeps one
//! current connection per worker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use quinn::{Connection, ConnectionError, Endpoint, Incoming, VarInt};
use rustls_pki_types::CertificateDer;
use sand_protocol::ids::WorkerId;
use sand_protocol::wire::{Down, Up};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::conn::{self, Ended, Outbox, Parts};
use super::{QuicConfig, TaskCounter, TransportError, CLOSE_DISCONNECTED, CLOSE_IDENTITY};
use super::{CLOSE_NORMAL, CLOSE_REPLACED};
use crate::certs::{self, NodeIdentity};
use crate::seam::{
    EventSender, Events, GatewayEvent, GatewayLink, GatewayOutbox, GatewaySender, SendError,
};

/// The gateway's QUIC endpoint. Dropping it closes every connection and stops every task.
#[derive(Debug)]
pub struct QuicGateway {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    registry: Arc<Registry>,
    tasks: TaskCounter,
    accept: JoinHandle<()>,
    idle_timeout: std::time::Duration,
}

impl QuicGateway {
    /// Listens on `addr` with the gateway's `identity`, and returns the endpoint and the
    /// gateway's end of the seam. Must be called on a tokio runtime, which runs its tasks.
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        config: QuicConfig,
    ) -> Result<(Self, GatewayLink), TransportError> {
        let server = super::server_config(identity, &config)?;
        let endpoint = Endpoint::server(server, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| TransportError::Bind { addr, source })?;
        let (events_tx, events) = Events::channel();
        let registry = Arc::new(Registry {
            events: events_tx,
            peers: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let tasks = TaskCounter::default();
        let idle_timeout = config.idle_timeout;
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            registry.clone(),
            config,
            tasks.clone(),
        ));
        info!(addr = %local_addr, "gateway listening for workers");
        let sender = GatewaySender::new(Arc::new(QuicGatewayOutbox {
            registry: registry.clone(),
        }));
        Ok((
            Self {
                endpoint,
                local_addr,
                registry,
                tasks,
                accept,
                idle_timeout,
            },
            GatewayLink { events, sender },
        ))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// QUIC connections open now, including ones still in their handshake.
    pub fn open_connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// Connection tasks alive now (handshakes, and the readers and writers of each
    /// connection); returns to zero when no peer is connected.
    pub fn live_tasks(&self) -> usize {
        self.tasks.live()
    }

    /// The workers connected now, in id order.
    pub fn connected_workers(&self) -> Vec<WorkerId> {
        let mut ids: Vec<WorkerId> = self.registry.lock().keys().copied().collect();
        ids.sort();
        ids
    }

    /// Closes `worker`'s connection; the worker will reconnect by itself. Returns whether it
    /// was connected.
    pub fn disconnect(&self, worker: WorkerId) -> bool {
        let peers = self.registry.lock();
        let Some(peer) = peers.get(&worker) else {
            return false;
        };
        peer.conn.close(
            VarInt::from_u32(CLOSE_DISCONNECTED),
            b"disconnected by the gateway",
        );
        true
    }

    /// Closes every connection and waits (up to the idle timeout) for the peers to be told.
    pub async fn shutdown(self) {
        self.accept.abort();
        self.endpoint
            .close(VarInt::from_u32(CLOSE_NORMAL), b"gateway shutting down");
        let _ = tokio::time::timeout(self.idle_timeout, self.endpoint.wait_idle()).await;
    }
}

impl Drop for QuicGateway {
    fn drop(&mut self) {
        self.accept.abort();
        self.endpoint
            .close(VarInt::from_u32(CLOSE_NORMAL), b"gateway shutting down");
    }
}

/// The current connection of each worker, and the one event stream they all feed.
#[derive(Debug)]
struct Registry {
    events: EventSender<GatewayEvent>,
    peers: Mutex<HashMap<WorkerId, Peer>>,
    next_conn: AtomicU64,
}

struct Peer {
    conn_id: u64,
    conn: Connection,
    outbox: Outbox,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("conn_id", &self.conn_id)
            .finish()
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<WorkerId, Peer>> {
        // Every change under this lock is one insert or remove, so a poisoned map is whole.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `peer` the worker's current connection, replacing (and closing) an older one.
    fn attach(&self, worker: WorkerId, peer: Peer) {
        let mut peers = self.lock();
        if let Some(old) = peers.insert(worker, peer) {
            old.outbox.close();
            old.conn.close(
                VarInt::from_u32(CLOSE_REPLACED),
                b"replaced by a newer connection of this worker",
            );
            info!(%worker, "a newer connection of this worker replaces the older one");
            self.events.push(GatewayEvent::Disconnected(worker));
        }
        // Pushed under the lock, so no message of this connection can come before it.
        self.events.push(GatewayEvent::Connected(worker));
    }

    /// Delivers a message of connection `conn_id`, unless it is no longer the worker's current.
    fn deliver(
        &self,
        worker: WorkerId,
        conn_id: u64,
        msg: Up,
        credit: OwnedSemaphorePermit,
    ) -> bool {
        let peers = self.lock();
        if peers.get(&worker).map(|p| p.conn_id) != Some(conn_id) {
            return false;
        }
        self.events
            .push_with_credit(GatewayEvent::Message(worker, msg), credit)
    }

    /// Forgets connection `conn_id`, if it is still the worker's current one.
    fn detach(&self, worker: WorkerId, conn_id: u64) {
        let mut peers = self.lock();
        if peers.get(&worker).map(|p| p.conn_id) == Some(conn_id) {
            if let Some(peer) = peers.remove(&worker) {
                peer.outbox.close();
            }
            self.events.push(GatewayEvent::Disconnected(worker));
        }
    }
}

struct QuicGatewayOutbox {
    registry: Arc<Registry>,
}

impl GatewayOutbox for QuicGatewayOutbox {
    fn send(&self, worker: WorkerId, msg: Down) -> Result<(), SendError> {
        // Encode before taking the lock: a large payload must not hold up other senders.
        let (frame, payload) = conn::encode(&msg)?;
        let peers = self.registry.lock();
        let peer = peers.get(&worker).ok_or(SendError::NotConnected)?;
        peer.outbox.enqueue(frame, payload)
    }
}

async fn accept_loop(
    endpoint: Endpoint,
    registry: Arc<Registry>,
    config: QuicConfig,
    tasks: TaskCounter,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else {
                    // The endpoint was closed.
                    break;
                };
                connections.spawn(tasks.track(serve(
                    incoming,
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
    registry: Arc<Registry>,
    config: QuicConfig,
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
                conn.close(
                    VarInt::from_u32(super::CLOSE_VIOLATION),
                    e.to_string().as_bytes(),
                );
            }
            warn!(%worker, peer = %peer_addr, reason = %ended, "refused a worker: it did not open its control stream properly");
            return;
        }
    };
    let conn_id = registry.next_conn.fetch_add(1, Ordering::Relaxed);
    let (outbox, inbox) = Outbox::new(config.send_queue_bytes_max);
    registry.attach(
        worker,
        Peer {
            conn_id,
            conn: conn.clone(),
            outbox,
        },
    );
    info!(%worker, peer = %peer_addr, "worker connected");
    let deliver_to = registry.clone();
    let ended = conn::drive(Parts {
        conn,
        control_send,
        control_recv,
        inbox,
        deliver: Arc::new(move |msg, credit| deliver_to.deliver(worker, conn_id, msg, credit)),
        recv_queue_len_max: config.recv_queue_len_max,
        payload_streams_max: config.payload_streams_max,
        tasks,
    })
    .await;
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
