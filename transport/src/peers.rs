//! Who is connected, for the real transports: the gateway's table of its workers' current
//! connections ([`Registry`]), a worker's one current connection ([`Current`]), and the worker's
//! reconnection loop ([`keep_connected`]).
//!
//! Both tables say `Connected` and `Disconnected` under the same lock that every delivery takes,
//! so the events stay well nested, and both refuse a delivery from a connection that is no
//! longer current: a reader of an ended connection may still be finishing on another thread.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use sand_protocol::ids::WorkerId;
use sand_protocol::wire::{Down, Up};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{info, warn};

use crate::config::LinkConfig;
use crate::conn::{
    self, Backoff, Deliver, Inbox, Outbox, CLOSE_DISCONNECTED, CLOSE_RECONNECT, CLOSE_REPLACED,
};
use crate::seam::{
    EventSender, Events, GatewayEvent, GatewayLink, GatewayOutbox, GatewaySender, SendError,
    WorkerEvent, WorkerLink, WorkerOutbox, WorkerSender,
};

/// An open connection as the tables see it: something they can close, with a code from
/// [`crate::conn`] and a reason for the peer.
pub trait Closer: Send + Sync + 'static {
    /// Closes the connection; its tasks notice and end.
    fn close(&self, code: u32, reason: &str);
}

/// The current connection of each worker, and the one event stream they all feed.
#[derive(Debug)]
pub struct Registry<C> {
    events: EventSender<GatewayEvent>,
    peers: Mutex<Peers<C>>,
}

#[derive(Debug)]
struct Peers<C> {
    current: HashMap<WorkerId, Peer<C>>,
    /// Tells a connection from the ones before and after it.
    next_conn: u64,
}

#[derive(Debug)]
struct Peer<C> {
    conn_id: u64,
    conn: C,
    outbox: Outbox,
}

impl<C: Closer> Registry<C> {
    /// An empty table, and the gateway's end of the seam it feeds.
    pub fn new() -> (Arc<Self>, GatewayLink) {
        let (events_tx, events) = Events::channel();
        let registry = Arc::new(Self {
            events: events_tx,
            peers: Mutex::new(Peers {
                current: HashMap::new(),
                next_conn: 0,
            }),
        });
        let sender = GatewaySender::new(registry.clone());
        (registry, GatewayLink { events, sender })
    }

    fn lock(&self) -> MutexGuard<'_, Peers<C>> {
        // Every change under this lock is one insert or remove, so a poisoned map is whole.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `conn` the worker's current connection, replacing (and closing) an older one, and
    /// says `Connected`. Returns the connection's id for [`Registry::deliver`] and
    /// [`Registry::detach`].
    pub fn attach(&self, worker: WorkerId, conn: C, outbox: Outbox) -> u64 {
        let mut peers = self.lock();
        let conn_id = peers.next_conn;
        peers.next_conn += 1;
        let peer = Peer {
            conn_id,
            conn,
            outbox,
        };
        if let Some(old) = peers.current.insert(worker, peer) {
            old.outbox.close();
            old.conn.close(
                CLOSE_REPLACED,
                "replaced by a newer connection of this worker",
            );
            info!(%worker, "a newer connection of this worker replaces the older one");
            self.events.push(GatewayEvent::Disconnected(worker));
        }
        // Pushed under the lock, so no message of this connection can come before it.
        self.events.push(GatewayEvent::Connected(worker));
        conn_id
    }

    /// Delivers a message of connection `conn_id`, unless it is no longer the worker's current.
    pub fn deliver(
        &self,
        worker: WorkerId,
        conn_id: u64,
        msg: Up,
        credit: OwnedSemaphorePermit,
    ) -> bool {
        let peers = self.lock();
        if peers.current.get(&worker).map(|p| p.conn_id) != Some(conn_id) {
            return false;
        }
        self.events
            .push_with_credit(GatewayEvent::Message(worker, msg), credit)
    }

    /// Forgets connection `conn_id` and says `Disconnected`, if it is still the worker's
    /// current one.
    pub fn detach(&self, worker: WorkerId, conn_id: u64) {
        let mut peers = self.lock();
        if peers.current.get(&worker).map(|p| p.conn_id) == Some(conn_id) {
            if let Some(peer) = peers.current.remove(&worker) {
                peer.outbox.close();
            }
            self.events.push(GatewayEvent::Disconnected(worker));
        }
    }

    /// The workers connected now, in id order.
    pub fn connected_workers(&self) -> Vec<WorkerId> {
        let mut ids: Vec<WorkerId> = self.lock().current.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Closes `worker`'s connection; the worker will reconnect by itself. Returns whether it
    /// was connected.
    pub fn disconnect(&self, worker: WorkerId) -> bool {
        let peers = self.lock();
        let Some(peer) = peers.current.get(&worker) else {
            return false;
        };
        peer.conn
            .close(CLOSE_DISCONNECTED, "disconnected by the gateway");
        true
    }
}

impl<C: Closer> GatewayOutbox for Registry<C> {
    fn send(&self, worker: WorkerId, msg: Down) -> Result<(), SendError> {
        // Encode before taking the lock: a large payload must not hold up other senders.
        let (frame, payload) = conn::encode(&msg)?;
        let peers = self.lock();
        let peer = peers.current.get(&worker).ok_or(SendError::NotConnected)?;
        peer.outbox.enqueue(frame, payload)
    }
}

/// A worker's open connection, if any: the one `send` writes to and whose messages are
/// delivered.
///
/// It does not own the event stream's feed: [`keep_connected`] does, so that the stream ends
/// when the reconnection loop is stopped, although the driver's sender keeps this alive.
#[derive(Debug)]
pub struct Current<C> {
    open: Mutex<Open<C>>,
}

#[derive(Debug)]
struct Open<C> {
    /// The connection, its id and its queues.
    conn: Option<(u64, C, Outbox)>,
    next_id: u64,
}

impl<C: Closer> Current<C> {
    /// No connection yet, the worker's end of the seam, and the feed of its events for
    /// [`keep_connected`].
    pub fn new() -> (Arc<Self>, WorkerLink, EventSender<WorkerEvent>) {
        let (feed, events) = Events::channel();
        let current = Arc::new(Self {
            open: Mutex::new(Open {
                conn: None,
                next_id: 0,
            }),
        });
        let sender = WorkerSender::new(current.clone());
        (current, WorkerLink { events, sender }, feed)
    }

    fn lock(&self) -> MutexGuard<'_, Open<C>> {
        // Every change under this lock is one assignment, so a poisoned value is whole.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `conn` the current connection and says `Connected`. Returns its id for
    /// [`Current::deliver`].
    pub fn attach(&self, conn: C, outbox: Outbox, events: &EventSender<WorkerEvent>) -> u64 {
        let mut open = self.lock();
        open.next_id += 1;
        let id = open.next_id;
        open.conn = Some((id, conn, outbox));
        events.push(WorkerEvent::Connected);
        id
    }

    /// Delivers a message of connection `id`, unless that connection is no longer current.
    pub fn deliver(
        &self,
        id: u64,
        msg: Down,
        credit: OwnedSemaphorePermit,
        events: &EventSender<WorkerEvent>,
    ) -> bool {
        let open = self.lock();
        if open.conn.as_ref().map(|(current, ..)| *current) != Some(id) {
            return false;
        }
        events.push_with_credit(WorkerEvent::Message(msg), credit)
    }

    /// Forgets the current connection, refuses every later send to it, and says
    /// `Disconnected`: nothing of it is delivered after this.
    pub fn detach(&self, events: &EventSender<WorkerEvent>) {
        let mut open = self.lock();
        if let Some((_, _, outbox)) = open.conn.take() {
            outbox.close();
        }
        events.push(WorkerEvent::Disconnected);
    }

    /// Whether a connection to the gateway is open now.
    pub fn is_connected(&self) -> bool {
        self.lock().conn.is_some()
    }

    /// Drops the current connection, as a network fault would; the worker reconnects by
    /// itself. Returns whether a connection was open.
    pub fn reconnect(&self) -> bool {
        match &self.lock().conn {
            Some((_, conn, _)) => {
                conn.close(CLOSE_RECONNECT, "worker reconnecting");
                true
            }
            None => false,
        }
    }
}

impl<C: Closer> WorkerOutbox for Current<C> {
    fn send(&self, msg: Up) -> Result<(), SendError> {
        let (frame, payload) = conn::encode(&msg)?;
        let open = self.lock();
        let (_, _, outbox) = open.conn.as_ref().ok_or(SendError::NotConnected)?;
        outbox.enqueue(frame, payload)
    }
}

/// How a worker's transport opens and runs one connection to the gateway.
pub trait Dialer: Send + Sync + 'static {
    /// The open connection, as the table closes it.
    type Conn: Closer + Clone;
    /// What running the connection needs besides its queues (streams, halves of a socket).
    type Opened: Send;

    /// Opens a connection and has the gateway accept it. Says why not otherwise.
    fn dial(&self) -> impl Future<Output = Result<(Self::Conn, Self::Opened), String>> + Send;

    /// Runs an open connection until it ends, and logs how it ended.
    fn run(
        &self,
        conn: Self::Conn,
        opened: Self::Opened,
        inbox: Inbox,
        deliver: Deliver<Down>,
    ) -> impl Future<Output = ()> + Send;
}

/// Connects, runs the connection until it ends, waits, and again, until nobody listens to
/// `events`. Stopping it (dropping its future) ends the worker's event stream.
pub async fn keep_connected<D: Dialer>(
    dialer: D,
    current: Arc<Current<D::Conn>>,
    events: EventSender<WorkerEvent>,
    config: LinkConfig,
    gateway: SocketAddr,
) {
    let mut backoff = Backoff::new(config.reconnect_delay_min, config.reconnect_delay_max);
    let mut failures: u32 = 0;
    while !events.is_closed() {
        match dialer.dial().await {
            Ok((conn, opened)) => {
                failures = 0;
                backoff.reset();
                let (outbox, inbox) = Outbox::new(config.send_queue_bytes_max);
                let id = current.attach(conn.clone(), outbox, &events);
                info!(%gateway, "connected to the gateway");
                let (to, feed) = (current.clone(), events.clone());
                let deliver: Deliver<Down> =
                    Arc::new(move |msg, credit| to.deliver(id, msg, credit, &feed));
                dialer.run(conn, opened, inbox, deliver).await;
                current.detach(&events);
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                warn!(%gateway, attempt = failures, %error, "cannot connect to the gateway");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
