//! The checks of the seam's contract that every transport passes, generic over
//! [`TestTransport`]. Each runs under [`bounded`]; [`suite!`](crate::suite!) makes them tests.

use std::time::Duration;

use sand_protocol::ids::WorkerId;
use sand_protocol::wire::{Down, ToGateway, ToWorker, Up, MESSAGE_BYTES_MAX};
use sand_transport::config::{LinkConfig, SEND_QUEUE_BYTES_MIN};
use sand_transport::seam::{Events, GatewayEvent, GatewayLink, SendError, WorkerEvent, WorkerLink};
use sand_transport::tls::certs::{ClusterCa, NodeIdentity, Validity};

use crate::common::*;
use crate::TestTransport;

/// The id of the worker that stays connected while bad peers come and go.
pub const GOOD: u32 = 1;

/// One message each way between the gateway and a connected worker.
pub async fn round_trip(gw: &mut GatewayLink, worker: &mut WorkerLink, id: u32, n: u32) {
    worker.sender.send(heartbeat(n)).unwrap();
    assert_eq!(
        next(&mut gw.events).await,
        GatewayEvent::Message(WorkerId(id), heartbeat(n).into())
    );
    gw.sender.send(WorkerId(id), ack(u64::from(n))).unwrap();
    assert_eq!(
        next(&mut worker.events).await,
        WorkerEvent::Message(ack(u64::from(n)).into())
    );
}

/// Takes one side's events up to the end of a connection and the start of the next: only
/// messages of `sent` (those of the ending connection), then the end, then the start.
pub async fn expect_reconnection<E: std::fmt::Debug + PartialEq, M: std::fmt::Debug + PartialEq>(
    events: &mut Events<E>,
    message: impl Fn(&E) -> Option<&M>,
    sent: &[M],
    ended: E,
    started: E,
) {
    loop {
        let event = next(events).await;
        if event == ended {
            break;
        }
        match message(&event) {
            Some(m) => assert!(sent.contains(m), "a message of another connection: {m:?}"),
            None => panic!("unexpected {event:?}"),
        }
    }
    assert_eq!(
        next(events).await,
        started,
        "nothing comes between an end and a start"
    );
}

/// Sends `make(0)`, `make(1)`, ... until `send` refuses one, letting the connection move what it
/// can in between; returns how many were accepted and why the next was refused.
pub async fn send_until_refused(
    mut send: impl FnMut(u32) -> Result<(), SendError>,
) -> (u32, SendError) {
    let mut accepted = 0u32;
    loop {
        match send(accepted) {
            Ok(()) => accepted += 1,
            Err(e) => return (accepted, e),
        }
        assert!(accepted < 400, "the send queue never filled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ---- Refusals (certificates), and the arena they share with each transport's own ---------

/// A gateway with one good worker connected, to check that bad peers do not disturb it.
pub struct Arena<T: TestTransport> {
    /// The cluster PKI.
    pub pki: Pki,
    /// The gateway.
    pub gateway: T::Gateway,
    /// The gateway's end of the seam.
    pub gw: GatewayLink,
    _good: T::Worker,
    /// The good worker's end.
    pub good: WorkerLink,
    baseline_tasks: usize,
    /// The transports' log lines.
    pub logs: Logs,
    _log_guard: tracing::subscriber::DefaultGuard,
}

impl<T: TestTransport> Arena<T> {
    /// A gateway and one good worker, connected.
    pub async fn new() -> Self {
        Self::with_gateway_config(config()).await
    }

    /// A gateway with `gateway_config` and one good worker, connected.
    pub async fn with_gateway_config(gateway_config: LinkConfig) -> Self {
        let (logs, guard) = Logs::capture();
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<T>(&pki, gateway_config);
        let (good_worker, mut good) = connect_worker::<T>(&pki, &gateway, &mut gw, GOOD).await;
        round_trip(&mut gw, &mut good, GOOD, 0).await;
        let baseline_tasks = T::live_tasks(&gateway);
        assert!(baseline_tasks > 0);
        Self {
            pki,
            gateway,
            gw,
            _good: good_worker,
            good,
            baseline_tasks,
            logs,
            _log_guard: guard,
        }
    }

    /// After a bad peer: nothing of it reached the protocol, the good worker still works, and
    /// the gateway is back to one connection and the same tasks as before.
    pub async fn check_unharmed(&mut self) {
        assert_quiet(&mut self.gw.events, Duration::from_millis(100)).await;
        round_trip(&mut self.gw, &mut self.good, GOOD, 99).await;
        let gateway = &self.gateway;
        wait_until("the bad connection is gone", || {
            T::open_connections(gateway) == 1
        })
        .await;
        let baseline = self.baseline_tasks;
        wait_until("the bad connection's tasks are gone", || {
            T::live_tasks(gateway) == baseline
        })
        .await;
    }
}

// ---- The checks ------------------------------------------------------------------------------

/// Control messages of each worker arrive in order both ways; payload messages arrive whole, each once.
pub async fn messages_round_trip_in_order_per_stream<T: TestTransport>() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<T>(&pki, config());
        let (_w1, mut l1) = connect_worker::<T>(&pki, &gateway, &mut gw, 1).await;
        let (_w2, mut l2) = connect_worker::<T>(&pki, &gateway, &mut gw, 2).await;
        assert_eq!(
            T::connected_workers(&gateway),
            vec![WorkerId(1), WorkerId(2)]
        );

        const N: u32 = 300;
        for i in 0..N {
            l1.sender.send(heartbeat(i)).unwrap();
            l2.sender.send(heartbeat(N + i)).unwrap();
        }
        let (mut from1, mut from2) = (Vec::new(), Vec::new());
        while from1.len() + from2.len() < 2 * N as usize {
            match next(&mut gw.events).await {
                GatewayEvent::Message(
                    WorkerId(1),
                    Up::Protocol(ToGateway::Heartbeat { running, .. }),
                ) => from1.push(running),
                GatewayEvent::Message(
                    WorkerId(2),
                    Up::Protocol(ToGateway::Heartbeat { running, .. }),
                ) => from2.push(running),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            from1,
            (0..N).collect::<Vec<_>>(),
            "worker 1's control messages in order"
        );
        assert_eq!(
            from2,
            (N..2 * N).collect::<Vec<_>>(),
            "worker 2's control messages in order"
        );

        for i in 0..N {
            gw.sender.send(WorkerId(2), ack(u64::from(i))).unwrap();
        }
        for i in 0..N {
            assert_eq!(
                next(&mut l2.events).await,
                WorkerEvent::Message(ack(u64::from(i)).into())
            );
        }

        // Payload-carrying messages arrive whole, each exactly once (order across their streams
        // is not promised).
        for i in 0..20 {
            gw.sender
                .send(WorkerId(1), dispatch(i, 1000 + i as usize))
                .unwrap();
            l1.sender.send(progress(u64::from(i) + 1, 2000)).unwrap();
        }
        let mut dispatches = Vec::new();
        for _ in 0..20 {
            match next(&mut l1.events).await {
                WorkerEvent::Message(Down::Protocol(m @ ToWorker::Dispatch { .. })) => {
                    dispatches.push(m)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let mut progresses = Vec::new();
        for _ in 0..20 {
            match next(&mut gw.events).await {
                GatewayEvent::Message(
                    WorkerId(1),
                    Up::Protocol(m @ ToGateway::Progress { .. }),
                ) => progresses.push(m),
                other => panic!("unexpected {other:?}"),
            }
        }
        dispatches.sort();
        let mut want: Vec<ToWorker> = (0..20).map(|i| dispatch(i, 1000 + i as usize)).collect();
        want.sort();
        assert_eq!(dispatches, want);
        progresses.sort();
        let mut want: Vec<ToGateway> = (0..20).map(|i| progress(i + 1, 2000)).collect();
        want.sort();
        assert_eq!(progresses, want);
        assert_quiet(&mut gw.events, Duration::from_millis(50)).await;
    })
    .await
}

/// A connection dropped by either side comes back by itself, and what the layer above re-sends arrives.
pub async fn a_broken_connection_is_reopened_and_the_layer_above_resends<T: TestTransport>() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<T>(&pki, config());
        let (worker, mut link) = connect_worker::<T>(&pki, &gateway, &mut gw, GOOD).await;

        // A stand-in for the protocol layer: it keeps what is unacked and re-sends it after
        // every `Connected`.
        let unacked = vec![progress(1, 100), progress(2, 100)];
        for m in &unacked {
            link.sender.send(m.clone()).unwrap();
        }
        for _ in 0..2 {
            assert!(matches!(
                next(&mut gw.events).await,
                GatewayEvent::Message(_, Up::Protocol(ToGateway::Progress { .. }))
            ));
        }

        // The gateway drops the connection; the worker comes back by itself.
        assert!(T::disconnect(&gateway, WorkerId(GOOD)));
        assert_eq!(next(&mut link.events).await, WorkerEvent::Disconnected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Disconnected(WorkerId(GOOD))
        );
        assert_eq!(link.sender.send(heartbeat(0)), Err(SendError::NotConnected));
        assert_eq!(next(&mut link.events).await, WorkerEvent::Connected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Connected(WorkerId(GOOD))
        );
        link.sender.send(hello()).unwrap();
        for m in &unacked {
            link.sender.send(m.clone()).unwrap();
        }
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Message(WorkerId(GOOD), hello().into())
        );
        let mut resent = Vec::new();
        for _ in 0..2 {
            match next(&mut gw.events).await {
                GatewayEvent::Message(_, Up::Protocol(m)) => resent.push(m),
                other => panic!("unexpected {other:?}"),
            }
        }
        resent.sort();
        assert_eq!(resent, unacked);

        // The worker drops its own connection, as a network fault would.
        assert!(T::reconnect(&worker));
        assert_eq!(next(&mut link.events).await, WorkerEvent::Disconnected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Disconnected(WorkerId(GOOD))
        );
        assert_eq!(next(&mut link.events).await, WorkerEvent::Connected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Connected(WorkerId(GOOD))
        );
        round_trip(&mut gw, &mut link, GOOD, 7).await;
        wait_until("the old connections are gone", || {
            T::open_connections(&gateway) == 1
        })
        .await;
    })
    .await
}

/// However a worker's connection is replaced, no message of the old connection reaches either
/// driver after the new one's `Connected`. Each round's messages are sent on that round's
/// connection only; large ones are still arriving and being decoded when it is torn down, on a
/// runtime with several threads, where a reader of the old connection may still be running.
pub async fn no_message_of_an_old_connection_follows_the_new_ones_connected<T: TestTransport>() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<T>(&pki, config());
        let (worker, mut link) = connect_worker::<T>(&pki, &gateway, &mut gw, GOOD).await;
        const ROUNDS: u32 = 200;
        const PER_ROUND: u32 = 4;
        for round in 0..ROUNDS {
            let tag = |i| round * PER_ROUND + i;
            let to_worker: Vec<ToWorker> =
                (0..PER_ROUND).map(|i| dispatch(tag(i), 1 << 20)).collect();
            let to_gateway: Vec<ToGateway> = (0..PER_ROUND)
                .map(|i| progress(u64::from(tag(i)), 1 << 20))
                .collect();
            for (d, p) in to_worker.iter().zip(&to_gateway) {
                gw.sender.send(WorkerId(GOOD), d.clone()).unwrap();
                link.sender.send(p.clone()).unwrap();
            }
            // Tear the connection down at a different point of the transfer each round.
            tokio::time::sleep(Duration::from_micros(u64::from(round % 8) * 500)).await;
            if round % 2 == 0 {
                assert!(T::reconnect(&worker));
            } else {
                assert!(T::disconnect(&gateway, WorkerId(GOOD)));
            }
            let worker_side = expect_reconnection(
                &mut link.events,
                |e| match e {
                    WorkerEvent::Message(Down::Protocol(m)) => Some(m),
                    _ => None,
                },
                &to_worker,
                WorkerEvent::Disconnected,
                WorkerEvent::Connected,
            );
            let gateway_side = expect_reconnection(
                &mut gw.events,
                |e| match e {
                    GatewayEvent::Message(WorkerId(GOOD), Up::Protocol(m)) => Some(m),
                    _ => None,
                },
                &to_gateway,
                GatewayEvent::Disconnected(WorkerId(GOOD)),
                GatewayEvent::Connected(WorkerId(GOOD)),
            );
            tokio::join!(worker_side, gateway_side);
        }
        assert_quiet(&mut link.events, Duration::from_millis(100)).await;
        assert_quiet(&mut gw.events, Duration::from_millis(100)).await;
    })
    .await
}

/// A worker keeps trying while no gateway listens, and connects to one started again on the same address.
pub async fn a_worker_reconnects_to_a_restarted_gateway<T: TestTransport>() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<T>(&pki, config());
        let addr = T::local_addr(&gateway);
        let (_worker, mut link) = connect_worker::<T>(&pki, &gateway, &mut gw, GOOD).await;

        drop(gateway);
        drop(gw);
        assert_eq!(next(&mut link.events).await, WorkerEvent::Disconnected);
        // The worker keeps trying (with backoff) while no gateway listens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(link.sender.send(heartbeat(1)), Err(SendError::NotConnected));

        let (gateway, mut gw) = loop {
            // The old socket is released once its endpoint driver has stopped.
            match T::bind(&pki, addr, config()) {
                Ok(bound) => break bound,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        assert_eq!(next(&mut link.events).await, WorkerEvent::Connected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Connected(WorkerId(GOOD))
        );
        round_trip(&mut gw, &mut link, GOOD, 1).await;
        drop(gateway);
    })
    .await
}

/// A second connection of the same worker replaces the first, which is told to go.
pub async fn a_newer_connection_of_a_worker_replaces_the_older<T: TestTransport>() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<T>(&pki, config());
        let identity = pki.worker(GOOD);
        // The old one waits long before it tries again, so the new one is not replaced back
        // during the test.
        let patient = LinkConfig {
            reconnect_delay_min: Duration::from_secs(30),
            reconnect_delay_max: Duration::from_secs(30),
            ..config()
        };
        let (_old, mut old_link) = start_worker::<T>(&gateway, &identity, patient);
        assert_eq!(next(&mut old_link.events).await, WorkerEvent::Connected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Connected(WorkerId(GOOD))
        );
        let (_new, mut new_link) = start_worker::<T>(&gateway, &identity, config());
        assert_eq!(next(&mut new_link.events).await, WorkerEvent::Connected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Disconnected(WorkerId(GOOD))
        );
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Connected(WorkerId(GOOD))
        );
        round_trip(&mut gw, &mut new_link, GOOD, 3).await;
        // The old one was told to go.
        assert_eq!(next(&mut old_link.events).await, WorkerEvent::Disconnected);
        assert_eq!(
            old_link.sender.send(heartbeat(1)),
            Err(SendError::NotConnected)
        );
        wait_until("the old connection is gone", || {
            T::open_connections(&gateway) == 1
        })
        .await;
    })
    .await
}

/// A send queue that overflows closes its connection, both ways, and the worker comes back.
pub async fn an_overflowing_send_queue_closes_the_connection_instead_of_dropping_a_message<
    T: TestTransport,
>() {
    bounded(async {
        let (logs, _guard) = Logs::capture();
        let pki = Pki::new();
        let small = LinkConfig {
            send_queue_bytes_max: SEND_QUEUE_BYTES_MIN,
            recv_queue_len_max: 4,
            ..config()
        };
        let (gateway, mut gw) = start_gateway::<T>(&pki, small.clone());
        let (_worker, mut link) = start_worker::<T>(&gateway, &pki.worker(GOOD), small);
        assert_eq!(next(&mut link.events).await, WorkerEvent::Connected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Connected(WorkerId(GOOD))
        );

        // Gateway to worker: the worker's driver takes nothing while 1 MiB dispatches are sent.
        // The queue is bounded, and once it overflows the connection ends: some of what was
        // accepted may be lost with it, but nothing goes missing on a connection that lives on.
        let (accepted, refused) =
            send_until_refused(|i| gw.sender.send(WorkerId(GOOD), dispatch(i, 1 << 20))).await;
        assert_eq!(refused, SendError::Overflowed);
        assert_eq!(
            gw.sender.send(WorkerId(GOOD), ack(1)),
            Err(SendError::NotConnected),
            "nothing is sent after the lost message"
        );
        let mut delivered = 0;
        loop {
            match next(&mut link.events).await {
                WorkerEvent::Message(Down::Protocol(ToWorker::Dispatch { .. })) => delivered += 1,
                WorkerEvent::Disconnected => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(delivered <= accepted);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Disconnected(WorkerId(GOOD))
        );
        logs.wait_for_warning(&["closed the worker's connection", "overflowed"])
            .await;
        // The worker comes back by itself, and the protocol would now re-send.
        assert_eq!(next(&mut link.events).await, WorkerEvent::Connected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Connected(WorkerId(GOOD))
        );
        round_trip(&mut gw, &mut link, GOOD, 1).await;

        // Worker to gateway, the same.
        let (accepted, refused) =
            send_until_refused(|i| link.sender.send(progress(u64::from(i) + 1, 1 << 20))).await;
        assert_eq!(refused, SendError::Overflowed);
        assert_eq!(
            link.sender.send(heartbeat(2)),
            Err(SendError::NotConnected),
            "nothing is sent after the lost message"
        );
        let mut delivered = 0;
        loop {
            match next(&mut gw.events).await {
                GatewayEvent::Message(_, Up::Protocol(ToGateway::Progress { .. })) => {
                    delivered += 1
                }
                GatewayEvent::Disconnected(WorkerId(GOOD)) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(delivered <= accepted);
        assert_eq!(next(&mut link.events).await, WorkerEvent::Disconnected);
        logs.wait_for_warning(&["closed the connection to the gateway", "overflowed"])
            .await;
        assert_eq!(next(&mut link.events).await, WorkerEvent::Connected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Connected(WorkerId(GOOD))
        );
        round_trip(&mut gw, &mut link, GOOD, 2).await;
    })
    .await
}

/// Messages just under the size limit go through; ones above it are refused at `send`.
pub async fn large_messages_fit_and_oversize_ones_are_refused_at_send<T: TestTransport>() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<T>(&pki, config());
        let (_w, mut link) = connect_worker::<T>(&pki, &gateway, &mut gw, GOOD).await;
        let too_big = progress(1, MESSAGE_BYTES_MAX);
        assert!(matches!(
            link.sender.send(too_big),
            Err(SendError::Encode(_))
        ));
        // Just under the limit goes through.
        let near = MESSAGE_BYTES_MAX - 1024;
        gw.sender.send(WorkerId(GOOD), dispatch(1, near)).unwrap();
        match next(&mut link.events).await {
            WorkerEvent::Message(Down::Protocol(ToWorker::Dispatch { call, .. })) => {
                assert_eq!(call.input.len(), near)
            }
            other => panic!("unexpected {other:?}"),
        }
    })
    .await
}

/// A certificate of another cluster is refused by either side, with a warning that says so.
pub async fn a_worker_of_another_cluster_is_refused<T: TestTransport>() {
    bounded(async {
        let mut arena = Arena::<T>::new().await;
        let other = ClusterCa::generate(Validity::days_from_now(1)).unwrap();
        let foreign = other
            .issue_worker(WorkerId(50), Validity::days_from_now(1))
            .unwrap();

        // Trusting our CA but holding a certificate of another: the gateway refuses it.
        let mixed = NodeIdentity::new(
            arena.pki.ca.cert().clone(),
            foreign.chain().to_vec(),
            foreign.key().clone_key(),
        );
        let (_w, mut link) = start_worker::<T>(&arena.gateway, &mixed, config());
        arena
            .logs
            .wait_for_warning(&[
                "refused a worker's certificate",
                "not signed by this cluster",
            ])
            .await;
        arena
            .logs
            .wait_for_warning(&["refused a peer at the TLS handshake"])
            .await;
        arena
            .logs
            .wait_for_warning(&["cannot connect", "refused"])
            .await;
        assert_quiet(&mut link.events, Duration::from_millis(100)).await;
        drop(_w);
        arena.check_unharmed().await;

        // Trusting only the other CA: the worker refuses the gateway.
        let (_w, mut link) = start_worker::<T>(&arena.gateway, &foreign, config());
        arena
            .logs
            .wait_for_warning(&[
                "refused the gateway's certificate",
                "not signed by this cluster",
            ])
            .await;
        arena
            .logs
            .wait_for_warning(&["cannot connect", "invalid peer certificate"])
            .await;
        assert_quiet(&mut link.events, Duration::from_millis(100)).await;
        drop(_w);
        arena.check_unharmed().await;
    })
    .await
}

/// An expired worker certificate is refused in the handshake.
pub async fn an_expired_worker_certificate_is_refused<T: TestTransport>() {
    bounded(async {
        let mut arena = Arena::<T>::new().await;
        let now = time::OffsetDateTime::now_utc();
        let expired = arena
            .pki
            .ca
            .issue_worker(
                WorkerId(51),
                Validity {
                    not_before: now - time::Duration::days(30),
                    not_after: now - time::Duration::days(1),
                },
            )
            .unwrap();
        let (w, mut link) = start_worker::<T>(&arena.gateway, &expired, config());
        arena
            .logs
            .wait_for_warning(&["refused a worker's certificate", "w51", "expired"])
            .await;
        arena
            .logs
            .wait_for_warning(&["refused a peer at the TLS handshake", "expired"])
            .await;
        arena
            .logs
            .wait_for_warning(&["cannot connect", "expired"])
            .await;
        assert_quiet(&mut link.events, Duration::from_millis(100)).await;
        drop(w);
        arena.check_unharmed().await;
    })
    .await
}

/// A certificate that names no worker (a gateway certificate) is refused in the handshake.
pub async fn a_certificate_that_names_no_worker_is_refused<T: TestTransport>() {
    bounded(async {
        let mut arena = Arena::<T>::new().await;
        // A certificate of our CA for a server, not a worker: wrong usage and no worker name.
        let gateway_cert = arena
            .pki
            .ca
            .issue_gateway(&["sand-worker-9".to_string()], Validity::days_from_now(1))
            .unwrap();
        let (w, mut link) = start_worker::<T>(&arena.gateway, &gateway_cert, config());
        arena
            .logs
            .wait_for_warning(&["refused a worker's certificate", "not meant for this role"])
            .await;
        arena
            .logs
            .wait_for_warning(&["refused a peer at the TLS handshake"])
            .await;
        assert_quiet(&mut link.events, Duration::from_millis(100)).await;
        drop(w);
        arena.check_unharmed().await;
    })
    .await
}

/// Workers shutting down leave the gateway with no connection and no task.
pub async fn shutting_down_leaves_no_connection_and_no_task<T: TestTransport>() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<T>(&pki, config());
        let (w1, mut l1) = connect_worker::<T>(&pki, &gateway, &mut gw, 1).await;
        let (w2, _l2) = connect_worker::<T>(&pki, &gateway, &mut gw, 2).await;
        gw.sender.send(WorkerId(1), dispatch(1, 3 << 20)).unwrap();
        assert!(matches!(
            next(&mut l1.events).await,
            WorkerEvent::Message(_)
        ));
        assert!(T::live_tasks(&gateway) > 0 && T::worker_live_tasks(&w1) > 0);
        T::shutdown_worker(w1).await;
        T::shutdown_worker(w2).await;
        let mut gone = Vec::new();
        while gone.len() < 2 {
            match next(&mut gw.events).await {
                GatewayEvent::Disconnected(id) => gone.push(id),
                other => panic!("unexpected {other:?}"),
            }
        }
        gone.sort();
        assert_eq!(gone, vec![WorkerId(1), WorkerId(2)]);
        wait_until("no connection is open", || {
            T::open_connections(&gateway) == 0
        })
        .await;
        wait_until("no connection task is alive", || {
            T::live_tasks(&gateway) == 0
        })
        .await;
        assert_eq!(
            gw.sender.send(WorkerId(1), ack(1)),
            Err(SendError::NotConnected)
        );
        T::shutdown_gateway(gateway).await;
    })
    .await
}

/// A worker stopped ends its event stream, so that its driver ends too.
pub async fn a_stopped_worker_ends_its_event_stream<T: TestTransport>() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<T>(&pki, config());
        let (worker, mut link) = connect_worker::<T>(&pki, &gateway, &mut gw, GOOD).await;
        T::shutdown_worker(worker).await;
        loop {
            match tokio::time::timeout(EVENT_TIME_MAX, link.events.recv()).await {
                Ok(None) => break,
                Ok(Some(WorkerEvent::Disconnected)) => {}
                Ok(Some(other)) => panic!("unexpected {other:?}"),
                Err(_) => panic!("the event stream did not end"),
            }
        }
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Disconnected(WorkerId(GOOD))
        );
    })
    .await
}
