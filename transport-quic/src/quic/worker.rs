//! A worker's endpoint: one connection to the gateway at a time, re-opened by itself with
//! exponential backoff and jitter whenever it ends.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use quinn::{Connection, ConnectionError, Endpoint, VarInt};
use rustls_pki_types::ServerName;
use sand_protocol::wire::{Down, Up};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::conn::{self, Ended, Outbox, Parts};
use super::{QuicConfig, TaskCounter, TransportError, CLOSE_NORMAL, CLOSE_RECONNECT};
use crate::certs::NodeIdentity;
use crate::seam::{
    EventSender, Events, SendError, WorkerEvent, WorkerLink, WorkerOutbox, WorkerSender,
};

/// A worker's QUIC endpoint. Dropping it closes the connection and stops reconnecting.
#[derive(Debug)]
pub struct QuicWorker {
    endpoint: Endpoint,
    current: Arc<Current>,
    tasks: TaskCounter,
    link: JoinHandle<()>,
    idle_timeout: Duration,
}

impl QuicWorker {
    /// Starts connecting to the gateway at `gateway`, whose certificate must name
    /// `server_name` (a DNS name or IP address it was issued for), and keeps connected until
    /// dropped. Returns the endpoint and the worker's end of the seam. Must be called on a
    /// tokio runtime, which runs its tasks.
    pub fn start(
        gateway: SocketAddr,
        server_name: &str,
        identity: &NodeIdentity,
        config: QuicConfig,
    ) -> Result<(Self, WorkerLink), TransportError> {
        ServerName::try_from(server_name)
            .map_err(|_| TransportError::ServerName(server_name.to_string()))?;
        let client = super::client_config(identity, &config)?;
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
        let (events_tx, events) = Events::channel();
        let current = Arc::new(Current::default());
        let tasks = TaskCounter::default();
        let idle_timeout = config.idle_timeout;
        let link = tokio::spawn(link_loop(LinkLoop {
            endpoint: endpoint.clone(),
            gateway,
            server_name: server_name.to_string(),
            config,
            events: events_tx,
            current: current.clone(),
            tasks: tasks.clone(),
        }));
        let sender = WorkerSender::new(Arc::new(QuicWorkerOutbox {
            current: current.clone(),
        }));
        Ok((
            Self {
                endpoint,
                current,
                tasks,
                link,
                idle_timeout,
            },
            WorkerLink { events, sender },
        ))
    }

    /// Whether a connection to the gateway is open now.
    pub fn is_connected(&self) -> bool {
        self.current.lock().is_some()
    }

    /// Drops the current connection, as a network fault would; the worker reconnects by
    /// itself. Returns whether a connection was open.
    pub fn reconnect(&self) -> bool {
        match &*self.current.lock() {
            Some(open) => {
                open.conn
                    .close(VarInt::from_u32(CLOSE_RECONNECT), b"worker reconnecting");
                true
            }
            None => false,
        }
    }

    /// Tasks of the current connection alive now (zero while disconnected).
    pub fn live_tasks(&self) -> usize {
        self.tasks.live()
    }

    /// Closes the connection, stops reconnecting, and waits (up to the idle timeout) for the
    /// gateway to be told.
    pub async fn shutdown(self) {
        self.link.abort();
        self.endpoint
            .close(VarInt::from_u32(CLOSE_NORMAL), b"worker shutting down");
        let _ = tokio::time::timeout(self.idle_timeout, self.endpoint.wait_idle()).await;
    }
}

impl Drop for QuicWorker {
    fn drop(&mut self) {
        self.link.abort();
        self.endpoint
            .close(VarInt::from_u32(CLOSE_NORMAL), b"worker shutting down");
    }
}

/// The open connection, if any: the one `send` writes to and whose messages are delivered.
/// Its `Connected` and `Disconnected` are said under the same lock that every delivery takes,
/// so that the events stay well nested.
#[derive(Debug, Default)]
struct Current(Mutex<Option<Open>>);

/// The worker's open connection.
#[derive(Debug)]
struct Open {
    /// Tells this connection from the ones before and after it.
    id: u64,
    outbox: Outbox,
    conn: Connection,
}

impl Current {
    fn lock(&self) -> MutexGuard<'_, Option<Open>> {
        // Every change under this lock is one assignment, so a poisoned value is whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `open` the current connection and says `Connected`.
    fn attach(&self, open: Open, events: &EventSender<WorkerEvent>) {
        let mut current = self.lock();
        *current = Some(open);
        events.push(WorkerEvent::Connected);
    }

    /// Delivers a message of connection `id`, unless that connection is no longer current: a
    /// reader of an ended connection may still be finishing on another thread when its
    /// `Disconnected` is said.
    fn deliver(
        &self,
        id: u64,
        msg: Down,
        credit: OwnedSemaphorePermit,
        events: &EventSender<WorkerEvent>,
    ) -> bool {
        let current = self.lock();
        if current.as_ref().map(|open| open.id) != Some(id) {
            return false;
        }
        events.push_with_credit(WorkerEvent::Message(msg), credit)
    }

    /// Forgets the current connection, refuses every later send to it, and says
    /// `Disconnected`: nothing of it is delivered after this.
    fn detach(&self, events: &EventSender<WorkerEvent>) {
        let mut current = self.lock();
        if let Some(open) = current.take() {
            open.outbox.close();
        }
        events.push(WorkerEvent::Disconnected);
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

struct QuicWorkerOutbox {
    current: Arc<Current>,
}

impl WorkerOutbox for QuicWorkerOutbox {
    fn send(&self, msg: Up) -> Result<(), SendError> {
        let (frame, payload) = conn::encode(&msg)?;
        let current = self.current.lock();
        let open = current.as_ref().ok_or(SendError::NotConnected)?;
        open.outbox.enqueue(frame, payload)
    }
}

struct LinkLoop {
    endpoint: Endpoint,
    gateway: SocketAddr,
    server_name: String,
    config: QuicConfig,
    events: EventSender<WorkerEvent>,
    current: Arc<Current>,
    tasks: TaskCounter,
}

/// Connects, runs the connection until it ends, waits, and again, until nobody listens.
async fn link_loop(l: LinkLoop) {
    let mut backoff = Backoff::new(l.config.reconnect_delay_min, l.config.reconnect_delay_max);
    let mut failures: u32 = 0;
    let mut conn_id: u64 = 0;
    while !l.events.is_closed() {
        match connect(&l).await {
            Ok((conn, control_send, control_recv)) => {
                failures = 0;
                backoff.reset();
                conn_id += 1;
                let id = conn_id;
                let (outbox, inbox) = Outbox::new(l.config.send_queue_bytes_max);
                let open = Open {
                    id,
                    outbox,
                    conn: conn.clone(),
                };
                l.current.attach(open, &l.events);
                info!(gateway = %l.gateway, "connected to the gateway");
                let (current, events) = (l.current.clone(), l.events.clone());
                let ended = conn::drive(Parts {
                    conn,
                    control_send,
                    control_recv,
                    inbox,
                    deliver: Arc::new(move |msg, credit| current.deliver(id, msg, credit, &events)),
                    recv_queue_len_max: l.config.recv_queue_len_max,
                    payload_streams_max: l.config.payload_streams_max,
                    tasks: l.tasks.clone(),
                })
                .await;
                l.current.detach(&l.events);
                log_end(l.gateway, &ended);
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                warn!(gateway = %l.gateway, attempt = failures, %error, "cannot connect to the gateway");
            }
        }
        let delay = backoff.next_delay();
        tokio::time::sleep(delay).await;
    }
}

async fn connect(
    l: &LinkLoop,
) -> Result<(Connection, quinn::SendStream, quinn::RecvStream), String> {
    let connecting = l
        .endpoint
        .connect(l.gateway, &l.server_name)
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(l.config.open_timeout, connecting)
        .await
        .map_err(|_| format!("no answer within {:?}", l.config.open_timeout))?
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 the gateway judges our certificate after our side of the handshake is done:
    // only its answer on the control stream proves it accepted us.
    let (send, recv) = match conn::open_control(&conn, l.config.open_timeout).await {
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

/// Exponential backoff with jitter: each delay is drawn from the upper half of a window that
/// doubles after every failure, up to a maximum, so a fleet of workers that lost the gateway at
/// once does not come back at once.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    window: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            window: min,
        }
    }

    fn reset(&mut self) {
        self.window = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let window = self.window;
        self.window = (window * 2).min(self.max);
        let half = window / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_maximum() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let mut b = Backoff::new(min, max);
        let mut windows = Vec::new();
        for _ in 0..8 {
            let window = b.window;
            let d = b.next_delay();
            assert!(
                d >= window / 2 && d <= window,
                "{d:?} outside the upper half of {window:?}"
            );
            windows.push(window.as_millis());
        }
        assert_eq!(windows, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.window, min);
        let draws: std::collections::HashSet<Duration> = (0..20)
            .map(|_| {
                b.reset();
                b.next_delay()
            })
            .collect();
        assert!(draws.len() > 1, "the delay is jittered");
    }
}
