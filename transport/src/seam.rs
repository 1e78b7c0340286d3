//! The seam between the protocol drivers and the network: events in, messages out.
//!
//! The gateway and worker drivers are written against this module alone, so the same driver runs
//! over QUIC (`sand-transport-quic`), TCP with TLS (`sand-transport-tcp`) and in memory
//! ([`crate::mem`]). Both sides are channel-shaped:
//!
//! - the gateway gets an [`Events`]`<`[`GatewayEvent`]`>` stream and a cloneable
//!   [`GatewaySender`];
//! - a worker gets an [`Events`]`<`[`WorkerEvent`]`>` stream and a cloneable [`WorkerSender`].
//!
//! Nothing here needs a particular async runtime: [`Events::recv`] is a plain future,
//! [`Events::try_recv`] and [`Events::blocking_recv`] serve synchronous callers, and sending
//! never waits.
//!
//! # What the transport promises, and what it does not
//!
//! - **Per peer, events are well nested**: `Connected`, then that connection's messages, then
//!   `Disconnected`, then perhaps `Connected` again. No message of a connection arrives after
//!   its `Disconnected`, so none after the `Connected` of a newer one.
//! - **Envelopes, not bare messages.** Each event and each send carries one envelope ([`Up`] from
//!   a worker, [`Down`] from the gateway): a protocol message for the state machines, or a
//!   service message (bundles, traces) for the drivers. Both kinds travel alike.
//! - **Order holds on the control stream, and only there.** Small control messages share one
//!   ordered stream. Each payload-carrying message (`ToGateway::Progress`,
//!   `ServiceToGateway::Trace`, `ToWorker::Dispatch`, `ServiceToWorker::Bundle`) travels on a
//!   stream of its own, so it may overtake or be overtaken by another payload message and by any
//!   control message. The protocol numbers its messages and does not rely on the transport for
//!   order.
//! - **A message is lost only with its connection.** A message accepted by `send` is delivered
//!   unless its connection breaks first; everything in flight when a connection breaks may be
//!   lost, in either direction. A live connection never skips a message. The transport re-sends
//!   nothing: after every `Connected` the protocol layer says `Hello` and re-sends what is
//!   unacked.
//! - **Sending never blocks and never buffers without bound.** Each peer has a bounded queue.
//!   A message that does not fit is not dropped on its own: `send` returns
//!   [`SendError::Overflowed`] and the transport closes that connection, so both sides see
//!   `Disconnected` and the loss is a disconnection like any other. Received messages are
//!   bounded too: a peer whose messages the driver does not take is slowed down by flow control,
//!   and its own queue overflows in the end.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use sand_protocol::ids::WorkerId;
use sand_protocol::wire::{
    Down, EncodeError, ServiceToGateway, ServiceToWorker, ToGateway, ToWorker, Up,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// What the gateway hears from its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// A worker, authenticated by its certificate, opened a connection. Messages to it can be
    /// sent from now on.
    Connected(WorkerId),
    /// A worker sent a message on its current connection.
    Message(WorkerId, Up),
    /// A worker's connection ended (closed, timed out, broken, or replaced by a newer one).
    /// Messages sent to it and not yet delivered may be lost.
    Disconnected(WorkerId),
}

/// What a worker hears from the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEvent {
    /// A connection to the gateway is open (the first, or a reconnection). The protocol layer
    /// now says `Hello` and re-sends what is unacked.
    Connected,
    /// The gateway sent a message on the current connection.
    Message(Down),
    /// The connection ended. The transport reconnects by itself; `Connected` follows when it
    /// succeeds.
    Disconnected,
}

/// Why a message was not accepted for sending; in every case it was not sent. After
/// `NotConnected` or `Overflowed` the connection is gone or going, and `Disconnected` follows if
/// it has not come yet: the protocol layer keeps what it must re-send, and re-sends it after the
/// next `Connected`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// There is no open connection to the peer now (or it is closing).
    #[error("no open connection to the peer; the message was not sent")]
    NotConnected,
    /// The peer's send queue overflowed: it or the network is slower than the sender. The
    /// connection is being closed, so that the loss is seen as a disconnection.
    #[error(
        "the send queue to the peer overflowed; the message was not sent and the connection is \
         closing"
    )]
    Overflowed,
    /// The message cannot be encoded (for example, it is above the size limit). Nothing else
    /// changes: the connection stays up.
    #[error("the message cannot be sent: {0}")]
    Encode(#[from] EncodeError),
}

/// Sends messages from the gateway to workers: the gateway half of a transport.
///
/// Implemented by the gateway's table of connections ([`crate::peers`]) and by [`crate::mem`];
/// a simulator may bring its own.
pub trait GatewayOutbox: Send + Sync + 'static {
    /// Queues `msg` for `worker`'s current connection without waiting.
    fn send(&self, worker: WorkerId, msg: Down) -> Result<(), SendError>;
}

/// Sends messages from a worker to the gateway: the worker half of a transport.
pub trait WorkerOutbox: Send + Sync + 'static {
    /// Queues `msg` for the current connection to the gateway without waiting.
    fn send(&self, msg: Up) -> Result<(), SendError>;
}

/// A cloneable handle that sends messages to connected workers.
#[derive(Clone)]
pub struct GatewaySender {
    outbox: Arc<dyn GatewayOutbox>,
}

impl GatewaySender {
    /// Wraps a transport's outbox.
    pub fn new(outbox: Arc<dyn GatewayOutbox>) -> Self {
        Self { outbox }
    }

    /// Queues `msg` (a [`ToWorker`], a [`ServiceToWorker`] or a [`Down`]) for `worker` without
    /// waiting; see [`SendError`] for why it may be refused.
    pub fn send(&self, worker: WorkerId, msg: impl Into<Down>) -> Result<(), SendError> {
        self.outbox.send(worker, msg.into())
    }
}

impl fmt::Debug for GatewaySender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewaySender")
    }
}

/// A cloneable handle that sends messages on the worker's current connection.
#[derive(Clone)]
pub struct WorkerSender {
    outbox: Arc<dyn WorkerOutbox>,
}

impl WorkerSender {
    /// Wraps a transport's outbox.
    pub fn new(outbox: Arc<dyn WorkerOutbox>) -> Self {
        Self { outbox }
    }

    /// Queues `msg` (a [`ToGateway`], a [`ServiceToGateway`] or an [`Up`]) without waiting; see
    /// [`SendError`] for why it may be refused.
    pub fn send(&self, msg: impl Into<Up>) -> Result<(), SendError> {
        self.outbox.send(msg.into())
    }
}

impl fmt::Debug for WorkerSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkerSender")
    }
}

/// The gateway's end of a transport: its events and its sender.
#[derive(Debug)]
pub struct GatewayLink {
    /// Connections, messages and disconnections of every worker, in one stream.
    pub events: Events<GatewayEvent>,
    /// Sends to workers.
    pub sender: GatewaySender,
}

/// A worker's end of a transport: its events and its sender.
#[derive(Debug)]
pub struct WorkerLink {
    /// Connections, messages and disconnections of the link to the gateway.
    pub events: Events<WorkerEvent>,
    /// Sends to the gateway.
    pub sender: WorkerSender,
}

/// A stream of transport events. Ends (`None`) once the transport behind it is gone.
pub struct Events<E> {
    rx: mpsc::UnboundedReceiver<Delivery<E>>,
}

/// Why [`Events::try_recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// No event is waiting now.
    #[error("no event is waiting")]
    Empty,
    /// The transport is gone; no event will come.
    #[error("the transport is gone")]
    Closed,
}

impl<E> Events<E> {
    /// A new event stream, and the handle that feeds it, for transports outside this crate.
    pub fn channel() -> (EventSender<E>, Events<E>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EventSender { tx }, Events { rx })
    }

    /// Waits for the next event. Cancel-safe: dropping the future loses no event.
    pub fn recv(&mut self) -> impl Future<Output = Option<E>> + '_ {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&mut self) -> Result<E, TryRecvError> {
        match self.rx.try_recv() {
            Ok(d) => Ok(d.event),
            Err(mpsc::error::TryRecvError::Empty) => Err(TryRecvError::Empty),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(TryRecvError::Closed),
        }
    }

    /// Blocks the thread until the next event. Must not be called from async code.
    pub fn blocking_recv(&mut self) -> Option<E> {
        self.rx.blocking_recv().map(|d| d.event)
    }

    /// Polls for the next event, for hand-written futures.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<E>> {
        // Taking the event out of its delivery drops the receive credit with it, which lets the
        // transport read the next message from that peer.
        self.rx.poll_recv(cx).map(|d| d.map(|d| d.event))
    }
}

impl<E> fmt::Debug for Events<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("waiting", &self.rx.len())
            .finish()
    }
}

/// Feeds an [`Events`] stream. Pushing never blocks; the transport bounds what it pushes.
pub struct EventSender<E> {
    tx: mpsc::UnboundedSender<Delivery<E>>,
}

impl<E> Clone for EventSender<E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<E> fmt::Debug for EventSender<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventSender")
    }
}

impl<E> EventSender<E> {
    /// Pushes an event. Returns `false` when the [`Events`] stream was dropped.
    pub fn push(&self, event: E) -> bool {
        self.tx
            .send(Delivery {
                event,
                _credit: None,
            })
            .is_ok()
    }

    /// Pushes an event that holds one of its peer's receive credits until it is taken.
    pub fn push_with_credit(&self, event: E, credit: OwnedSemaphorePermit) -> bool {
        self.tx
            .send(Delivery {
                event,
                _credit: Some(credit),
            })
            .is_ok()
    }

    /// Whether the [`Events`] stream was dropped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// An event on its way to the driver, with the receive credit it holds until it is taken.
struct Delivery<E> {
    event: E,
    _credit: Option<OwnedSemaphorePermit>,
}

/// Whether a message carries a payload, and so travels on a stream of its own rather than on
/// the ordered control stream shared with heartbeats.
pub trait Classify {
    /// True for messages whose size grows with grain values.
    fn carries_payload(&self) -> bool;
}

impl Classify for Up {
    fn carries_payload(&self) -> bool {
        match self {
            Up::Protocol(ToGateway::Progress { .. }) => true,
            Up::Protocol(ToGateway::Hello { .. } | ToGateway::Heartbeat { .. }) => false,
            Up::Service(ServiceToGateway::Trace { .. }) => true,
            Up::Service(ServiceToGateway::Fetch { .. }) => false,
        }
    }
}

impl Classify for Down {
    fn carries_payload(&self) -> bool {
        match self {
            Down::Protocol(ToWorker::Dispatch { .. }) => true,
            Down::Protocol(
                ToWorker::Welcome { .. }
                | ToWorker::Ack { .. }
                | ToWorker::Cancel { .. }
                | ToWorker::Abort { .. }
                | ToWorker::Fenced { .. },
            ) => false,
            Down::Service(ServiceToWorker::Bundle { .. }) => true,
            Down::Service(ServiceToWorker::AppChanged { .. }) => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use sand_protocol::ids::{AppName, Incarnation, Seq};
    use tokio::sync::Semaphore;

    #[test]
    fn taking_an_event_returns_its_credit() {
        let (tx, mut rx) = Events::<u32>::channel();
        let credits = Arc::new(Semaphore::new(1));
        let permit = credits.clone().try_acquire_owned().unwrap();
        assert!(tx.push_with_credit(7, permit));
        assert_eq!(credits.available_permits(), 0);
        assert_eq!(rx.try_recv(), Ok(7));
        assert_eq!(credits.available_permits(), 1);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        drop(tx);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
    }

    #[test]
    fn only_payload_messages_leave_the_control_stream() {
        let i = Incarnation(1);
        let app = AppName::new("app").unwrap();
        let control = [
            Up::from(ToGateway::Heartbeat {
                incarnation: i,
                running: 0,
            }),
            Up::from(ToGateway::Hello {
                incarnation: i,
                resumed: true,
                started: vec![],
            }),
            Up::from(ServiceToGateway::Fetch { app: app.clone() }),
        ];
        assert!(control.iter().all(|m| !m.carries_payload()));
        let payload = [
            Up::from(ToGateway::Progress {
                incarnation: i,
                seq: Seq(1),
                reports: vec![],
            }),
            Up::from(ServiceToGateway::Trace { runs: vec![] }),
        ];
        assert!(payload.iter().all(Classify::carries_payload));
        let fenced = Down::from(ToWorker::Fenced {
            incarnation: i,
            successor: i.next(),
        });
        assert!(!fenced.carries_payload());
        let changed = Down::from(ServiceToWorker::AppChanged { app: app.clone() });
        assert!(!changed.carries_payload());
        let bundle = Down::from(ServiceToWorker::Bundle { app, bundle: None });
        assert!(bundle.carries_payload());
    }
}
