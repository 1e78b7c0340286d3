//! The gateway's endpoint: accepts workers over TCP, tells them apart by certificate, and keeps
//! one current connection per worker.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use sand_protocol::ids::WorkerId;
use sand_transport::config::{LinkConfig, TransportError};
use sand_transport::conn::TaskCounter;
use sand_transport::handshakes::{Handshake, Handshakes};
use sand_transport::peers::{GatewayEnd, Registry};
use sand_transport::seam::GatewayLink;
use sand_transport::tls::certs::NodeIdentity;
use sand_transport::tls::{self, certs};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::conn::{self, Severity};
use crate::Tcp;

/// The gateway's TCP endpoint. Dropping it closes every connection and stops every task.
#[derive(Debug)]
pub struct TcpGateway {
    local_addr: SocketAddr,
    end: GatewayEnd,
    connections: TaskCounter,
    accept: JoinHandle<()>,
}

impl TcpGateway {
    /// Listens on `addr` with the gateway's `identity`, and returns the endpoint and the
    /// gateway's end of the seam. Must be called on a tokio runtime, which runs its tasks.
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        config: LinkConfig,
    ) -> Result<(Self, GatewayLink), TransportError> {
        config.validate()?;
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(identity)?));
        let bind_err = |source| TransportError::Bind { addr, source };
        let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = TcpListener::from_std(std_listener).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let (end, link) = GatewayEnd::new();
        let connections = TaskCounter::default();
        let accept = tokio::spawn(accept_loop(Accept {
            listener,
            acceptor,
            registry: end.registry(),
            config,
            tasks: end.tasks(),
            connections: connections.clone(),
        }));
        info!(addr = %local_addr, "gateway listening for workers over TCP");
        Ok((
            Self {
                local_addr,
                end,
                connections,
                accept,
            },
            link,
        ))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// TCP connections open now, including ones still in their handshake.
    pub fn open_connections(&self) -> usize {
        self.connections.live()
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        self.accept.abort();
        let _ = (&mut { self }.accept).await;
    }
}

sand_transport::deref_to_end!(TcpGateway => GatewayEnd);

impl Drop for TcpGateway {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

struct Accept {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    registry: Arc<Registry>,
    config: LinkConfig,
    tasks: TaskCounter,
    /// Counts the connections open, one per `serve`.
    connections: TaskCounter,
}

/// Accepts connections until aborted; aborting it stops every connection it runs.
async fn accept_loop(a: Accept) {
    let mut connections = JoinSet::new();
    let mut handshakes = Handshakes::new(a.config.handshakes_max);
    loop {
        tokio::select! {
            accepted = a.listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    // Past the cap, the socket is closed here, unread.
                    let Some(place) = handshakes.admit(peer) else {
                        continue;
                    };
                    let serving = serve(
                        socket,
                        peer,
                        place,
                        a.acceptor.clone(),
                        a.registry.clone(),
                        a.config.clone(),
                        a.tasks.clone(),
                    );
                    connections.spawn(a.connections.track(a.tasks.track(serving)));
                }
                Err(error) => warn!(%error, "cannot accept a TCP connection"),
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Runs one worker connection from handshake to end.
async fn serve(
    socket: TcpStream,
    peer: SocketAddr,
    place: Handshake,
    acceptor: TlsAcceptor,
    registry: Arc<Registry>,
    config: LinkConfig,
    tasks: TaskCounter,
) {
    let _ = socket.set_nodelay(true);
    let mut stream = match tokio::time::timeout(config.open_timeout, acceptor.accept(socket)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            warn!(%peer, %error, "refused a peer at the TLS handshake");
            return;
        }
        Err(_) => {
            warn!(%peer, timeout = ?config.open_timeout, "refused a peer: the TLS handshake did not finish in time");
            return;
        }
    };
    let worker = match peer_worker(stream.get_ref().1.peer_certificates()) {
        Ok(worker) => worker,
        Err(error) => {
            // The verifier already refuses such certificates; this is a second line.
            warn!(%peer, %error, "refused a peer: its certificate names no worker");
            return;
        }
    };
    if let Err(ended) = conn::answer(&mut stream, config.open_timeout).await {
        warn!(%worker, %peer, reason = %ended, "refused a worker: it did not open its control stream properly");
        return;
    }
    drop(place);
    let tcp = Tcp::default();
    let (conn_id, plumbing) = registry.attach(worker, tcp.clone(), config, tasks);
    info!(%worker, %peer, "worker connected over TCP");
    let ended = conn::drive(stream, tcp, plumbing).await;
    registry.detach(worker, conn_id);
    match ended.severity() {
        Severity::ClosedHere => {
            warn!(%worker, %peer, reason = %ended, "closed the worker's connection")
        }
        Severity::Broke => warn!(%worker, %peer, reason = %ended, "the worker's connection broke"),
        Severity::Orderly => {
            info!(%worker, %peer, reason = %ended, "the worker's connection ended")
        }
    }
}

/// The worker a connection's client certificate names.
fn peer_worker(chain: Option<&[CertificateDer<'static>]>) -> Result<WorkerId, String> {
    let leaf = chain
        .and_then(|chain| chain.first())
        .ok_or_else(|| "the peer presented no certificate".to_string())?;
    certs::worker_id_of(leaf).map_err(|e| e.to_string())
}
