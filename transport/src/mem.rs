//! An in-memory transport: the gateway and its workers in one process, with links that tests
//! and simulations break and restore by hand.
//!
//! It keeps the real transports' contract (see [`crate::seam`]): events are well nested per
//! peer; each link direction has a bounded queue, and a message that does not fit breaks the
//! link ([`SendError::Overflowed`], and `Disconnected` on both sides) rather than go missing
//! from a live one; a message is encoded and decoded on the way, so the size limit and the
//! encoding are exercised exactly as on the wire. Unlike QUIC it is fully ordered, loses nothing
//! it accepted, and spawns nothing: a `send` puts the message in the receiver's event stream at
//! once, so a single-threaded test decides every interleaving.
//!
//! A broken link (by [`MemNetwork::break_link`] or by an overflow) stays broken until
//! [`MemNetwork::connect`] is called: the test plays the part of the QUIC worker's reconnect
//! loop, and so chooses when it succeeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sand_protocol::ids::WorkerId;
use sand_protocol::wire::{Down, Envelope, Up};
use tokio::sync::Semaphore;

use crate::framing::{self, Frame};
use crate::seam::{
    EventSender, Events, GatewayEvent, GatewayLink, GatewayOutbox, GatewaySender, SendError,
    WorkerEvent, WorkerLink, WorkerOutbox, WorkerSender,
};

/// The default bound on undelivered messages per link direction.
pub const MEM_QUEUE_LEN_MAX: usize = 1024;

/// A gateway and its workers, linked in memory. Cloning shares the same network.
#[derive(Clone, Debug)]
pub struct MemNetwork {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    queue_len_max: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    gateway: EventSender<GatewayEvent>,
    workers: HashMap<WorkerId, Peer>,
    /// Tells a worker's end from the one that replaced it under the same id.
    next_generation: u64,
}

#[derive(Debug)]
struct Peer {
    generation: u64,
    events: EventSender<WorkerEvent>,
    /// The link's current state; `None` while broken.
    link: Option<Link>,
}

/// One connection's queues. Made new on every connect, so messages of an older connection never
/// count against a newer one.
#[derive(Debug)]
struct Link {
    to_worker: Arc<Semaphore>,
    to_gateway: Arc<Semaphore>,
}

impl MemNetwork {
    /// A network with no workers yet, allowing `queue_len_max` undelivered messages in each
    /// direction of each link, and the gateway's end of it.
    pub fn new(queue_len_max: usize) -> (Self, GatewayLink) {
        let (gateway, events) = Events::channel();
        let shared = Arc::new(Shared {
            queue_len_max,
            state: Mutex::new(State {
                gateway,
                workers: HashMap::new(),
                next_generation: 0,
            }),
        });
        let sender = GatewaySender::new(Arc::new(MemGatewayOutbox {
            shared: shared.clone(),
        }));
        (Self { shared }, GatewayLink { events, sender })
    }

    /// Adds worker `id`, connected at once (both sides get `Connected`), and returns its end.
    /// A worker added again replaces the first: the old one's link is broken for good.
    pub fn add_worker(&self, id: WorkerId) -> WorkerLink {
        let (events_tx, events) = Events::channel();
        let mut state = self.shared.lock();
        if let Some(mut old) = state.workers.remove(&id) {
            if old.link.take().is_some() {
                old.events.push(WorkerEvent::Disconnected);
                state.gateway.push(GatewayEvent::Disconnected(id));
            }
        }
        let generation = state.next_generation;
        state.next_generation += 1;
        state.workers.insert(
            id,
            Peer {
                generation,
                events: events_tx,
                link: None,
            },
        );
        self.shared.connect(&mut state, id);
        drop(state);
        let sender = WorkerSender::new(Arc::new(MemWorkerOutbox {
            shared: self.shared.clone(),
            id,
            generation,
        }));
        WorkerLink { events, sender }
    }

    /// Breaks worker `id`'s link: both sides get `Disconnected` after the messages already
    /// delivered to them. Returns whether it was connected.
    pub fn break_link(&self, id: WorkerId) -> bool {
        let mut state = self.shared.lock();
        state.break_link(id)
    }

    /// Restores worker `id`'s link: both sides get `Connected`. Returns whether it was broken.
    pub fn connect(&self, id: WorkerId) -> bool {
        let mut state = self.shared.lock();
        self.shared.connect(&mut state, id)
    }

    /// The workers connected now, in id order.
    pub fn connected_workers(&self) -> Vec<WorkerId> {
        let state = self.shared.lock();
        let mut ids: Vec<WorkerId> = state
            .workers
            .iter()
            .filter(|(_, p)| p.link.is_some())
            .map(|(id, _)| *id)
            .collect();
        ids.sort();
        ids
    }

    /// Whether worker `id` is connected now.
    pub fn is_connected(&self, id: WorkerId) -> bool {
        let state = self.shared.lock();
        state.workers.get(&id).is_some_and(|p| p.link.is_some())
    }
}

impl State {
    /// Breaks worker `id`'s link, if it is up, and tells both sides.
    fn break_link(&mut self, id: WorkerId) -> bool {
        let Some(peer) = self.workers.get_mut(&id) else {
            return false;
        };
        if peer.link.take().is_none() {
            return false;
        }
        peer.events.push(WorkerEvent::Disconnected);
        self.gateway.push(GatewayEvent::Disconnected(id));
        true
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the maps consistent (every update is a single
        // insert or take), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connect(&self, state: &mut State, id: WorkerId) -> bool {
        let State {
            gateway, workers, ..
        } = state;
        let Some(peer) = workers.get_mut(&id) else {
            return false;
        };
        if peer.link.is_some() {
            return false;
        }
        peer.link = Some(Link {
            to_worker: Arc::new(Semaphore::new(self.queue_len_max)),
            to_gateway: Arc::new(Semaphore::new(self.queue_len_max)),
        });
        gateway.push(GatewayEvent::Connected(id));
        peer.events.push(WorkerEvent::Connected);
        true
    }
}

/// Encodes and decodes a message as the wire would, so the same size limit and encoding apply.
fn through_the_wire<E: Envelope>(msg: &E) -> Result<E, SendError> {
    let frame = Frame::encode(msg)?;
    // A message this build encoded always decodes in this build: the protocol's own tests
    // round-trip every message kind. A failure would be a protocol bug, reported as such.
    framing::decode(&frame.body)
        .map_err(|e| SendError::Encode(sand_protocol::wire::EncodeError::Serde(e.to_string())))
}

struct MemGatewayOutbox {
    shared: Arc<Shared>,
}

impl GatewayOutbox for MemGatewayOutbox {
    fn send(&self, worker: WorkerId, msg: Down) -> Result<(), SendError> {
        let msg = through_the_wire(&msg)?;
        let mut state = self.shared.lock();
        let peer = state.workers.get(&worker).ok_or(SendError::NotConnected)?;
        let link = peer.link.as_ref().ok_or(SendError::NotConnected)?;
        let Ok(credit) = link.to_worker.clone().try_acquire_owned() else {
            state.break_link(worker);
            return Err(SendError::Overflowed);
        };
        if !peer
            .events
            .push_with_credit(WorkerEvent::Message(msg), credit)
        {
            return Err(SendError::NotConnected);
        }
        Ok(())
    }
}

struct MemWorkerOutbox {
    shared: Arc<Shared>,
    id: WorkerId,
    generation: u64,
}

impl WorkerOutbox for MemWorkerOutbox {
    fn send(&self, msg: Up) -> Result<(), SendError> {
        let msg = through_the_wire(&msg)?;
        let mut state = self.shared.lock();
        let peer = state
            .workers
            .get(&self.id)
            // A worker's end replaced by a newer `add_worker` is cut off for good.
            .filter(|p| p.generation == self.generation)
            .ok_or(SendError::NotConnected)?;
        let link = peer.link.as_ref().ok_or(SendError::NotConnected)?;
        let Ok(credit) = link.to_gateway.clone().try_acquire_owned() else {
            state.break_link(self.id);
            return Err(SendError::Overflowed);
        };
        if !state
            .gateway
            .push_with_credit(GatewayEvent::Message(self.id, msg), credit)
        {
            return Err(SendError::NotConnected);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::seam::TryRecvError;
    use bytes::Bytes;
    use sand_protocol::ids::AppName;
    use sand_protocol::ids::{Attempt, ExecId, Incarnation, Seq};
    use sand_protocol::wire::{
        CallSpec, Cont, Payload, Reason, ServiceToGateway, ServiceToWorker, ToGateway, ToWorker,
        MESSAGE_BYTES_MAX,
    };

    fn heartbeat(n: u32) -> Up {
        Up::Protocol(ToGateway::Heartbeat {
            incarnation: Incarnation(1),
            running: n,
        })
    }

    fn ack(n: u64) -> Down {
        Down::Protocol(ToWorker::Ack {
            incarnation: Incarnation(1),
            upto: Seq(n),
        })
    }

    fn drain<E>(events: &mut Events<E>) -> Vec<E> {
        let mut out = Vec::new();
        while let Ok(e) = events.try_recv() {
            out.push(e);
        }
        out
    }

    const W1: WorkerId = WorkerId(1);
    const W2: WorkerId = WorkerId(2);

    #[test]
    fn messages_flow_both_ways_in_order() {
        let (net, mut gw) = MemNetwork::new(16);
        let mut w1 = net.add_worker(W1);
        let mut w2 = net.add_worker(W2);
        for i in 0..5 {
            w1.sender.send(heartbeat(i)).unwrap();
            gw.sender.send(W2, ack(u64::from(i))).unwrap();
        }
        let mut want = vec![GatewayEvent::Connected(W1), GatewayEvent::Connected(W2)];
        want.extend((0..5).map(|i| GatewayEvent::Message(W1, heartbeat(i))));
        assert_eq!(drain(&mut gw.events), want);
        assert_eq!(drain(&mut w1.events), vec![WorkerEvent::Connected]);
        let mut want = vec![WorkerEvent::Connected];
        want.extend((0..5).map(|i| WorkerEvent::Message(ack(i))));
        assert_eq!(drain(&mut w2.events), want);
    }

    #[test]
    fn service_messages_share_the_link_with_protocol_ones() {
        let (net, mut gw) = MemNetwork::new(16);
        let mut w1 = net.add_worker(W1);
        let app = AppName::new("app").unwrap();
        w1.sender.send(heartbeat(1)).unwrap();
        let fetch = ServiceToGateway::Fetch { app: app.clone() };
        w1.sender.send(fetch.clone()).unwrap();
        let bundle = ServiceToWorker::Bundle { app, bundle: None };
        gw.sender.send(W1, bundle.clone()).unwrap();
        gw.sender.send(W1, ack(1)).unwrap();
        assert_eq!(
            drain(&mut gw.events),
            vec![
                GatewayEvent::Connected(W1),
                GatewayEvent::Message(W1, heartbeat(1)),
                GatewayEvent::Message(W1, Up::Service(fetch)),
            ]
        );
        assert_eq!(
            drain(&mut w1.events),
            vec![
                WorkerEvent::Connected,
                WorkerEvent::Message(Down::Service(bundle)),
                WorkerEvent::Message(ack(1)),
            ]
        );
    }

    #[test]
    fn an_overflowing_queue_breaks_the_link_instead_of_dropping_the_message() {
        let (net, mut gw) = MemNetwork::new(3);
        let mut w1 = net.add_worker(W1);
        for i in 0..3 {
            gw.sender.send(W1, ack(i)).unwrap();
        }
        // The worker's driver took nothing: the fourth message does not fit, so the link ends
        // rather than carrying on without it.
        assert_eq!(gw.sender.send(W1, ack(3)), Err(SendError::Overflowed));
        assert!(!net.is_connected(W1));
        assert_eq!(gw.sender.send(W1, ack(4)), Err(SendError::NotConnected));
        let mut want = vec![WorkerEvent::Connected];
        want.extend((0..3).map(|i| WorkerEvent::Message(ack(i))));
        want.push(WorkerEvent::Disconnected);
        assert_eq!(drain(&mut w1.events), want);
        assert_eq!(
            drain(&mut gw.events),
            vec![GatewayEvent::Connected(W1), GatewayEvent::Disconnected(W1)]
        );

        // The same the other way, on the restored link.
        assert!(net.connect(W1));
        for i in 0..3 {
            w1.sender.send(heartbeat(i)).unwrap();
        }
        assert_eq!(w1.sender.send(heartbeat(3)), Err(SendError::Overflowed));
        assert!(!net.is_connected(W1));
        let mut want = vec![GatewayEvent::Connected(W1)];
        want.extend((0..3).map(|i| GatewayEvent::Message(W1, heartbeat(i))));
        want.push(GatewayEvent::Disconnected(W1));
        assert_eq!(drain(&mut gw.events), want);
        assert_eq!(
            drain(&mut w1.events),
            vec![WorkerEvent::Connected, WorkerEvent::Disconnected]
        );
    }

    #[test]
    fn taking_messages_makes_room_on_the_link() {
        let (net, mut gw) = MemNetwork::new(3);
        let mut w1 = net.add_worker(W1);
        for i in 0..3 {
            gw.sender.send(W1, ack(i)).unwrap();
        }
        // Taking a lifecycle event frees nothing; taking a message frees one slot.
        assert_eq!(w1.events.try_recv(), Ok(WorkerEvent::Connected));
        assert_eq!(w1.events.try_recv(), Ok(WorkerEvent::Message(ack(0))));
        gw.sender.send(W1, ack(3)).unwrap();
        assert!(net.is_connected(W1));
        drain(&mut gw.events);
    }

    #[test]
    fn a_broken_link_disconnects_both_sides_and_reconnects_on_demand() {
        let (net, mut gw) = MemNetwork::new(8);
        let mut w1 = net.add_worker(W1);
        w1.sender.send(heartbeat(1)).unwrap();
        assert!(net.break_link(W1));
        assert!(!net.break_link(W1), "already broken");
        assert!(!net.is_connected(W1));
        assert_eq!(w1.sender.send(heartbeat(2)), Err(SendError::NotConnected));
        assert_eq!(gw.sender.send(W1, ack(1)), Err(SendError::NotConnected));
        assert_eq!(
            drain(&mut gw.events),
            vec![
                GatewayEvent::Connected(W1),
                GatewayEvent::Message(W1, heartbeat(1)),
                GatewayEvent::Disconnected(W1),
            ]
        );
        assert!(net.connect(W1));
        assert!(!net.connect(W1), "already connected");
        w1.sender.send(heartbeat(3)).unwrap();
        assert_eq!(
            drain(&mut gw.events),
            vec![
                GatewayEvent::Connected(W1),
                GatewayEvent::Message(W1, heartbeat(3))
            ]
        );
        assert_eq!(
            drain(&mut w1.events),
            vec![
                WorkerEvent::Connected,
                WorkerEvent::Disconnected,
                WorkerEvent::Connected
            ]
        );
    }

    #[test]
    fn undelivered_messages_of_an_old_link_do_not_fill_the_new_one() {
        let (net, mut gw) = MemNetwork::new(2);
        let w1 = net.add_worker(W1);
        w1.sender.send(heartbeat(1)).unwrap();
        w1.sender.send(heartbeat(2)).unwrap();
        net.break_link(W1);
        net.connect(W1);
        // The two messages of the old link are still waiting for the gateway's driver.
        w1.sender.send(heartbeat(3)).unwrap();
        w1.sender.send(heartbeat(4)).unwrap();
        assert!(net.is_connected(W1));
        assert_eq!(drain(&mut gw.events).len(), 7);
    }

    #[test]
    fn unknown_and_replaced_workers_are_not_connected() {
        let (net, mut gw) = MemNetwork::new(4);
        assert_eq!(gw.sender.send(W2, ack(1)), Err(SendError::NotConnected));
        assert!(!net.break_link(W2));
        let old = net.add_worker(W1);
        let mut new = net.add_worker(W1);
        assert_eq!(old.sender.send(heartbeat(1)), Err(SendError::NotConnected));
        new.sender.send(heartbeat(2)).unwrap();
        gw.sender.send(W1, ack(2)).unwrap();
        assert_eq!(
            drain(&mut gw.events),
            vec![
                GatewayEvent::Connected(W1),
                GatewayEvent::Disconnected(W1),
                GatewayEvent::Connected(W1),
                GatewayEvent::Message(W1, heartbeat(2)),
            ]
        );
        assert_eq!(
            drain(&mut new.events),
            vec![WorkerEvent::Connected, WorkerEvent::Message(ack(2))]
        );
    }

    #[test]
    fn oversize_messages_are_refused_as_on_the_wire() {
        let (net, gw) = MemNetwork::new(4);
        let _w1 = net.add_worker(W1);
        let exec = ExecId::new(1, 1);
        let big = ToWorker::Dispatch {
            incarnation: Incarnation(1),
            call: CallSpec {
                exec,
                call: exec.root_call(),
                attempt: Attempt(0),
                app: sand_protocol::ids::AppName::new("a").unwrap(),
                grain: sand_protocol::ids::GrainName::new("g").unwrap(),
                input: Payload(Bytes::from(vec![0u8; MESSAGE_BYTES_MAX])),
                cont: Cont::Client,
                depth_left: 16,
                exec_ref: String::new(),
                traceparent: Default::default(),
            },
            reason: Reason::First,
        };
        assert!(matches!(gw.sender.send(W1, big), Err(SendError::Encode(_))));
    }

    #[test]
    fn events_end_when_the_network_is_gone() {
        let (net, mut gw) = MemNetwork::new(4);
        let mut w1 = net.add_worker(W1);
        drop(net);
        drain(&mut w1.events);
        drop(w1.sender);
        drop(gw.sender);
        drain(&mut gw.events);
        assert_eq!(gw.events.try_recv(), Err(TryRecvError::Closed));
        assert_eq!(w1.events.try_recv(), Err(TryRecvError::Closed));
    }
}
