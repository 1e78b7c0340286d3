//! Who is connected, for the real transports: the gateway's table of its workers' current
//! connections ([`Registry`], in a [`GatewayEnd`]), a worker's one current connection
//! ([`Current`], in a [`WorkerEnd`]), and the worker's reconnection loop ([`start_worker`]).
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
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::LinkConfig;
use crate::conn::{
    self, Backoff, Outbox, Plumbing, TaskCounter, CLOSE_DISCONNECTED, CLOSE_RECONNECT,
    CLOSE_REPLACED,
};
use crate::seam::{
    EventSender, Events, GatewayEvent, GatewayLink, GatewayOutbox, GatewaySender, SendError,
    WorkerEvent, WorkerLink, WorkerOutbox, WorkerSender,
};

/// An open connection as the tables see it: something they can close, with a code from
/// [`crate::conn`] and a reason for the peer.
pub trait Closer: Send + Sync + std::fmt::Debug + 'static {
    /// Closes the connection; its tasks notice and end.
    fn close(&self, code: u32, reason: &str);
}

/// The current connection of each worker, and the one event stream they all feed.
#[derive(Debug)]
pub struct Registry {
    events: EventSender<GatewayEvent>,
    peers: Mutex<Peers>,
}

#[derive(Debug)]
struct Peers {
    current: HashMap<WorkerId, Peer>,
    /// Tells a connection from the ones before and after it.
    next_conn: u64,
}

#[derive(Debug)]
struct Peer {
    conn_id: u64,
    conn: Box<dyn Closer>,
    outbox: Outbox,
}

impl Registry {
    /// An empty table, and the gateway's end of the seam it feeds.
    fn new() -> (Arc<Self>, GatewayLink) {
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

    fn lock(&self) -> MutexGuard<'_, Peers> {
        // Every change under this lock is one insert or remove, so a poisoned map is whole.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `conn` the worker's current connection, replacing (and closing) an older one, and
    /// says `Connected`. Returns the connection's id for [`Registry::detach`], and what its
    /// tasks need: its send queues and the hand-over of its messages to the driver.
    pub fn attach(
        self: &Arc<Self>,
        worker: WorkerId,
        conn: impl Closer,
        config: LinkConfig,
        tasks: TaskCounter,
    ) -> (u64, Plumbing<Up>) {
        let (outbox, inbox) = Outbox::new(config.send_queue_bytes_max);
        let conn_id = self.insert(worker, conn, outbox);
        let registry = self.clone();
        let plumbing = Plumbing {
            inbox,
            deliver: Arc::new(move |msg, credit| registry.deliver(worker, conn_id, msg, credit)),
            config,
            tasks,
        };
        (conn_id, plumbing)
    }

    /// Makes `conn` the worker's current connection and says `Connected`; returns its id.
    fn insert(&self, worker: WorkerId, conn: impl Closer, outbox: Outbox) -> u64 {
        let mut peers = self.lock();
        let conn_id = peers.next_conn;
        peers.next_conn += 1;
        let peer = Peer {
            conn_id,
            conn: Box::new(conn),
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
    fn deliver(
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
}

impl GatewayOutbox for Registry {
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
/// It does not own the event stream's feed: the link task of [`start_worker`] does, so that
/// the stream ends when that task is stopped, although the driver's sender keeps this alive.
#[derive(Debug)]
pub struct Current {
    open: Mutex<Open>,
}

#[derive(Debug)]
struct Open {
    /// The connection, its id and its queues.
    conn: Option<(u64, Box<dyn Closer>, Outbox)>,
    next_id: u64,
}

impl Current {
    /// No connection yet, the worker's end of the seam, and the feed of its events.
    fn new() -> (Arc<Self>, WorkerLink, EventSender<WorkerEvent>) {
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

    fn lock(&self) -> MutexGuard<'_, Open> {
        // Every change under this lock is one assignment, so a poisoned value is whole.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `conn` the current connection and says `Connected`. Returns its id for
    /// [`Current::deliver`].
    fn attach(&self, conn: impl Closer, outbox: Outbox, events: &EventSender<WorkerEvent>) -> u64 {
        let mut open = self.lock();
        open.next_id += 1;
        let id = open.next_id;
        open.conn = Some((id, Box::new(conn), outbox));
        events.push(WorkerEvent::Connected);
        id
    }

    /// Delivers a message of connection `id`, unless that connection is no longer current.
    fn deliver(
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
    fn detach(&self, events: &EventSender<WorkerEvent>) {
        let mut open = self.lock();
        if let Some((_, _, outbox)) = open.conn.take() {
            outbox.close();
        }
        events.push(WorkerEvent::Disconnected);
    }
}

impl WorkerOutbox for Current {
    fn send(&self, msg: Up) -> Result<(), SendError> {
        let (frame, payload) = conn::encode(&msg)?;
        let open = self.lock();
        let (_, _, outbox) = open.conn.as_ref().ok_or(SendError::NotConnected)?;
        outbox.enqueue(frame, payload)
    }
}

/// Makes an endpoint that holds its [`GatewayEnd`] or [`WorkerEnd`] in a field `end`
/// dereference to it, so that it offers the same handles whatever transport carries it.
#[macro_export]
macro_rules! deref_to_end {
    ($endpoint:ty => $end:ty) => {
        impl ::std::ops::Deref for $endpoint {
            type Target = $end;

            fn deref(&self) -> &$end {
                &self.end
            }
        }
    };
}

/// What a gateway endpoint offers whatever transport carries it: the table of its workers'
/// connections and a count of its connection tasks. The real transports' gateway endpoints
/// dereference to it.
#[derive(Debug)]
pub struct GatewayEnd {
    registry: Arc<Registry>,
    tasks: TaskCounter,
}

impl GatewayEnd {
    /// No worker yet, and the gateway's end of the seam.
    pub fn new() -> (Self, GatewayLink) {
        let (registry, link) = Registry::new();
        let tasks = TaskCounter::default();
        (Self { registry, tasks }, link)
    }

    /// The table of connections, for the endpoint's connection tasks.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The count the endpoint's connection tasks are tracked by.
    pub fn tasks(&self) -> TaskCounter {
        self.tasks.clone()
    }

    /// Connection tasks alive now (handshakes, and the readers and writers of each
    /// connection); returns to zero when no peer is connected.
    pub fn live_tasks(&self) -> usize {
        self.tasks.live()
    }

    /// The workers connected now, in id order.
    pub fn connected_workers(&self) -> Vec<WorkerId> {
        let mut ids: Vec<WorkerId> = self.registry.lock().current.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Closes `worker`'s connection; the worker will reconnect by itself. Returns whether it
    /// was connected.
    pub fn disconnect(&self, worker: WorkerId) -> bool {
        let peers = self.registry.lock();
        let Some(peer) = peers.current.get(&worker) else {
            return false;
        };
        peer.conn
            .close(CLOSE_DISCONNECTED, "disconnected by the gateway");
        true
    }
}

/// What a worker endpoint offers whatever transport carries it: its current connection and a
/// count of that connection's tasks. The real transports' worker endpoints dereference to it.
#[derive(Debug)]
pub struct WorkerEnd {
    current: Arc<Current>,
    tasks: TaskCounter,
}

impl WorkerEnd {
    /// Whether a connection to the gateway is open now.
    pub fn is_connected(&self) -> bool {
        self.current.lock().conn.is_some()
    }

    /// Drops the current connection, as a network fault would; the worker reconnects by
    /// itself. Returns whether a connection was open.
    pub fn reconnect(&self) -> bool {
        match &self.current.lock().conn {
            Some((_, conn, _)) => {
                conn.close(CLOSE_RECONNECT, "worker reconnecting");
                true
            }
            None => false,
        }
    }

    /// Tasks of the current connection alive now (zero while disconnected).
    pub fn live_tasks(&self) -> usize {
        self.tasks.live()
    }
}

/// How a worker's transport opens and runs one connection to the gateway.
pub trait Dialer: Send + Sync + 'static {
    /// The open connection, as the table closes it.
    type Conn: Closer + Clone;
    /// What running the connection needs besides its plumbing (streams, a socket).
    type Opened: Send;

    /// Opens a connection and has the gateway accept it. Says why not otherwise.
    fn dial(&self) -> impl Future<Output = Result<(Self::Conn, Self::Opened), String>> + Send;

    /// Runs an open connection until it ends, and logs how it ended.
    fn run(
        &self,
        conn: Self::Conn,
        opened: Self::Opened,
        plumbing: Plumbing<Down>,
    ) -> impl Future<Output = ()> + Send;
}

/// Starts a worker's link to the gateway at `gateway`: a task that connects with `dialer`, runs
/// the connection until it ends, waits, and again, until nobody listens to the worker's events.
/// Returns the worker's end, its end of the seam, and the task; aborting the task closes the
/// connection and ends the event stream.
pub fn start_worker<D: Dialer>(
    dialer: D,
    config: LinkConfig,
    gateway: SocketAddr,
) -> (WorkerEnd, WorkerLink, JoinHandle<()>) {
    let (current, link, events) = Current::new();
    let end = WorkerEnd {
        current,
        tasks: TaskCounter::default(),
    };
    let task = tokio::spawn(keep_connected(Link {
        dialer,
        current: end.current.clone(),
        events,
        config,
        tasks: end.tasks.clone(),
        gateway,
    }));
    (end, link, task)
}

/// What a worker's link task holds.
struct Link<D> {
    dialer: D,
    current: Arc<Current>,
    /// The feed of the worker's events: dropped with the task, which ends the stream.
    events: EventSender<WorkerEvent>,
    config: LinkConfig,
    tasks: TaskCounter,
    gateway: SocketAddr,
}

/// Connects, runs the connection until it ends, waits, and again, until nobody listens.
async fn keep_connected<D: Dialer>(l: Link<D>) {
    let gateway = l.gateway;
    let mut backoff = Backoff::new(l.config.reconnect_delay_min, l.config.reconnect_delay_max);
    let mut failures: u32 = 0;
    while !l.events.is_closed() {
        match l.dialer.dial().await {
            Ok((conn, opened)) => {
                failures = 0;
                backoff.reset();
                let (outbox, inbox) = Outbox::new(l.config.send_queue_bytes_max);
                let id = l.current.attach(conn.clone(), outbox, &l.events);
                info!(%gateway, "connected to the gateway");
                let (to, feed) = (l.current.clone(), l.events.clone());
                let plumbing = Plumbing {
                    inbox,
                    deliver: Arc::new(move |msg, credit| to.deliver(id, msg, credit, &feed)),
                    config: l.config.clone(),
                    tasks: l.tasks.clone(),
                };
                l.dialer.run(conn, opened, plumbing).await;
                l.current.detach(&l.events);
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                warn!(%gateway, attempt = failures, %error, "cannot connect to the gateway");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
