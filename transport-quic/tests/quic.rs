//! The QUIC transport on 127.0.0.1: ordering, interleaving of large payloads and heartbeats,
//! reconnection, backpressure, and the refusal of every kind of bad peer.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use quinn::{ConnectionError, Endpoint, VarInt};
use rand::{RngExt, SeedableRng};
use sand_protocol::ids::{AppName, Attempt, ExecId, GrainName, WorkerId};
use sand_protocol::wire::{
    AppBundle, Down, RunTrace, ServiceToGateway, ServiceToWorker, ToGateway, ToWorker, Up,
    MESSAGE_BYTES_MAX, WIRE_VERSION,
};
use sand_transport_quic::certs::{ClusterCa, NodeIdentity, Validity};
use sand_transport_quic::quic::{
    self, QuicConfig, QuicGateway, QuicWorker, CLOSE_VIOLATION, SEND_QUEUE_BYTES_MIN,
};
use sand_transport_quic::seam::{
    Events, GatewayEvent, GatewayLink, SendError, WorkerEvent, WorkerLink,
};

/// The bytes a worker says first on its control stream (pinned here: it is wire format).
const PREAMBLE: &[u8; 4] = b"snd1";

const GOOD: u32 = 1;

/// One message each way between the gateway and a connected worker.
async fn round_trip(gw: &mut GatewayLink, worker: &mut WorkerLink, id: u32, n: u32) {
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

#[tokio::test]
async fn messages_round_trip_in_order_per_stream() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let (_w1, mut l1) = connect_worker(&pki, &gateway, &mut gw, 1).await;
        let (_w2, mut l2) = connect_worker(&pki, &gateway, &mut gw, 2).await;
        assert_eq!(gateway.connected_workers(), vec![WorkerId(1), WorkerId(2)]);

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

#[tokio::test]
async fn a_large_payload_does_not_hold_up_heartbeats() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let (_w, mut link) = connect_worker(&pki, &gateway, &mut gw, GOOD).await;
        const BIG: usize = 12 << 20;

        // Worker to gateway: the heartbeat is sent after the large progress has started, and
        // must not wait for it.
        link.sender.send(progress(1, BIG)).unwrap();
        link.sender.send(heartbeat(1)).unwrap();
        let first = next(&mut gw.events).await;
        assert_eq!(
            first,
            GatewayEvent::Message(WorkerId(GOOD), heartbeat(1).into())
        );
        match next(&mut gw.events).await {
            GatewayEvent::Message(_, Up::Protocol(ToGateway::Progress { reports, .. })) => {
                assert_eq!(reports.len(), 1)
            }
            other => panic!("unexpected {other:?}"),
        }

        // Gateway to worker, the same with a large dispatch and an ack.
        gw.sender.send(WorkerId(GOOD), dispatch(1, BIG)).unwrap();
        gw.sender.send(WorkerId(GOOD), ack(1)).unwrap();
        assert_eq!(
            next(&mut link.events).await,
            WorkerEvent::Message(ack(1).into())
        );
        match next(&mut link.events).await {
            WorkerEvent::Message(Down::Protocol(ToWorker::Dispatch { call, .. })) => {
                assert_eq!(call.input.len(), BIG)
            }
            other => panic!("unexpected {other:?}"),
        }
    })
    .await
}

/// Service messages travel as protocol ones of their size do: a large `Trace` or `Bundle` on a
/// stream of its own, a `Fetch` or `AppChanged` on the ordered control stream, not held up.
#[tokio::test]
async fn large_service_payloads_do_not_hold_up_control_messages() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let (_w, mut link) = connect_worker(&pki, &gateway, &mut gw, GOOD).await;
        const BIG: usize = 12 << 20;
        let app = AppName::new("app").unwrap();

        // Worker to gateway: a large trace, then a fetch that must not wait for it.
        let exec = ExecId::new(1, 1);
        let run = RunTrace {
            exec,
            call: exec.root_call(),
            attempt: Attempt(0),
            grain: GrainName::new("grain").unwrap(),
            dispatched: true,
            started_ms: 1,
            ended_ms: 2,
            error: None,
            stdout: Bytes::from(vec![b'o'; BIG]),
            stderr: Bytes::new(),
        };
        link.sender
            .send(ServiceToGateway::Trace { runs: vec![run] })
            .unwrap();
        let fetch = ServiceToGateway::Fetch { app: app.clone() };
        link.sender.send(fetch.clone()).unwrap();
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Message(WorkerId(GOOD), fetch.into())
        );
        match next(&mut gw.events).await {
            GatewayEvent::Message(_, Up::Service(ServiceToGateway::Trace { runs })) => {
                assert_eq!(runs[0].stdout.len(), BIG)
            }
            other => panic!("unexpected {other:?}"),
        }

        // Gateway to worker: a large bundle, then an app change and an ack, in their order.
        let bundle = AppBundle {
            digest: "d1".into(),
            archive: Bytes::from(vec![b'z'; BIG]),
        };
        let bundle = ServiceToWorker::Bundle {
            app: app.clone(),
            bundle: Some(bundle),
        };
        gw.sender.send(WorkerId(GOOD), bundle).unwrap();
        let changed = ServiceToWorker::AppChanged { app };
        gw.sender.send(WorkerId(GOOD), changed.clone()).unwrap();
        gw.sender.send(WorkerId(GOOD), ack(1)).unwrap();
        assert_eq!(
            next(&mut link.events).await,
            WorkerEvent::Message(changed.into())
        );
        assert_eq!(
            next(&mut link.events).await,
            WorkerEvent::Message(ack(1).into())
        );
        match next(&mut link.events).await {
            WorkerEvent::Message(Down::Service(ServiceToWorker::Bundle {
                bundle: Some(bundle),
                ..
            })) => assert_eq!(bundle.archive.len(), BIG),
            other => panic!("unexpected {other:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn a_broken_connection_is_reopened_and_the_layer_above_resends() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let (worker, mut link) = connect_worker(&pki, &gateway, &mut gw, GOOD).await;

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
        assert!(gateway.disconnect(WorkerId(GOOD)));
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
        assert!(worker.reconnect());
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
            gateway.open_connections() == 1
        })
        .await;
    })
    .await
}

/// Takes one side's events up to the end of a connection and the start of the next: only
/// messages of `sent` (those of the ending connection), then the end, then the start.
async fn expect_reconnection<E: std::fmt::Debug + PartialEq, M: std::fmt::Debug + PartialEq>(
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

/// However a worker's connection is replaced, no message of the old connection reaches either
/// driver after the new one's `Connected`. Each round's messages are sent on that round's
/// connection only; large ones are still arriving and being decoded when it is torn down, on a
/// runtime with several threads, where a reader of the old connection may still be running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_message_of_an_old_connection_follows_the_new_ones_connected() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let (worker, mut link) = connect_worker(&pki, &gateway, &mut gw, GOOD).await;
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
                assert!(worker.reconnect());
            } else {
                assert!(gateway.disconnect(WorkerId(GOOD)));
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

#[tokio::test]
async fn a_worker_reconnects_to_a_restarted_gateway() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let addr = gateway.local_addr();
        let (_worker, mut link) = connect_worker(&pki, &gateway, &mut gw, GOOD).await;

        drop(gateway);
        drop(gw);
        assert_eq!(next(&mut link.events).await, WorkerEvent::Disconnected);
        // The worker keeps trying (with backoff) while no gateway listens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(link.sender.send(heartbeat(1)), Err(SendError::NotConnected));

        let (gateway, mut gw) = loop {
            // The old socket is released once its endpoint driver has stopped.
            match QuicGateway::bind(addr, &pki.gateway, config()) {
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

#[tokio::test]
async fn a_newer_connection_of_a_worker_replaces_the_older() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let identity = pki.worker(GOOD);
        // The old one waits long before it tries again, so the new one is not replaced back
        // during the test.
        let patient = QuicConfig {
            reconnect_delay_min: Duration::from_secs(30),
            reconnect_delay_max: Duration::from_secs(30),
            ..config()
        };
        let (_old, mut old_link) = start_worker(&gateway, &identity, patient);
        assert_eq!(next(&mut old_link.events).await, WorkerEvent::Connected);
        assert_eq!(
            next(&mut gw.events).await,
            GatewayEvent::Connected(WorkerId(GOOD))
        );
        let (_new, mut new_link) = start_worker(&gateway, &identity, config());
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
            gateway.open_connections() == 1
        })
        .await;
    })
    .await
}

/// Sends `make(0)`, `make(1)`, ... until `send` refuses one, letting the connection move what it
/// can in between; returns how many were accepted and why the next was refused.
async fn send_until_refused(
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

#[tokio::test]
async fn an_overflowing_send_queue_closes_the_connection_instead_of_dropping_a_message() {
    bounded(async {
        let (logs, _guard) = Logs::capture();
        let pki = Pki::new();
        let small = QuicConfig {
            send_queue_bytes_max: SEND_QUEUE_BYTES_MIN,
            recv_queue_len_max: 4,
            ..config()
        };
        let (gateway, mut gw) = start_gateway(&pki, small.clone());
        let (_worker, mut link) = start_worker(&gateway, &pki.worker(GOOD), small);
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

#[tokio::test]
async fn large_messages_fit_and_oversize_ones_are_refused_at_send() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let (_w, mut link) = connect_worker(&pki, &gateway, &mut gw, GOOD).await;
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

// ---- Refusals -------------------------------------------------------------------------------

/// A gateway with one good worker connected, to check that bad peers do not disturb it.
struct Arena {
    pki: Pki,
    gateway: QuicGateway,
    gw: GatewayLink,
    _good: QuicWorker,
    good: WorkerLink,
    baseline_tasks: usize,
    logs: Logs,
    _log_guard: tracing::subscriber::DefaultGuard,
}

impl Arena {
    async fn new() -> Self {
        let (logs, guard) = Logs::capture();
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let (good_worker, mut good) = connect_worker(&pki, &gateway, &mut gw, GOOD).await;
        round_trip(&mut gw, &mut good, GOOD, 0).await;
        let baseline_tasks = gateway.live_tasks();
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
    async fn check_unharmed(&mut self) {
        assert_quiet(&mut self.gw.events, Duration::from_millis(100)).await;
        round_trip(&mut self.gw, &mut self.good, GOOD, 99).await;
        let gateway = &self.gateway;
        wait_until("the bad connection is gone", || {
            gateway.open_connections() == 1
        })
        .await;
        let baseline = self.baseline_tasks;
        wait_until("the bad connection's tasks are gone", || {
            gateway.live_tasks() == baseline
        })
        .await;
    }

    /// A bare quinn client endpoint with `tls`.
    fn raw_client(&self, client: quinn::ClientConfig) -> Endpoint {
        let mut endpoint = Endpoint::client(localhost()).unwrap();
        endpoint.set_default_client_config(client);
        endpoint
    }

    /// A bare quinn connection authenticated as worker `id`, greeted on the control stream.
    async fn raw_worker(&self, id: u32) -> (Endpoint, quinn::Connection) {
        let client = quic::client_config(&self.pki.worker(id), &config()).unwrap();
        let endpoint = self.raw_client(client);
        let conn = endpoint
            .connect(self.gateway.local_addr(), "localhost")
            .unwrap()
            .await
            .unwrap();
        (endpoint, conn)
    }
}

async fn greet(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(PREAMBLE).await.unwrap();
    let mut answer = [0u8; 4];
    recv.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, PREAMBLE);
    (send, recv)
}

/// Waits for the gateway to close `conn` for a framing violation.
async fn closed_for_violation(conn: &quinn::Connection) -> String {
    match tokio::time::timeout(EVENT_TIME_MAX, conn.closed()).await {
        Ok(ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(
                close.error_code,
                VarInt::from_u32(CLOSE_VIOLATION),
                "{close}"
            );
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        Ok(other) => panic!("closed, but not for a violation: {other}"),
        Err(_) => panic!("the gateway did not close the connection"),
    }
}

#[tokio::test]
async fn a_worker_of_another_cluster_is_refused() {
    bounded(async {
        let mut arena = Arena::new().await;
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
        let (_w, mut link) = start_worker(&arena.gateway, &mixed, config());
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
        let (_w, mut link) = start_worker(&arena.gateway, &foreign, config());
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

#[tokio::test]
async fn a_peer_without_a_client_certificate_is_refused() {
    bounded(async {
        let mut arena = Arena::new().await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(arena.pki.ca.cert().clone()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![quic::ALPN.to_vec()];
        let client = quinn::ClientConfig::new(std::sync::Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let endpoint = arena.raw_client(client);
        let connecting = endpoint
            .connect(arena.gateway.local_addr(), "localhost")
            .unwrap();
        // With TLS 1.3 the client may finish its side first; either way the connection dies.
        let error = match connecting.await {
            Err(e) => e,
            Ok(conn) => tokio::time::timeout(EVENT_TIME_MAX, conn.closed())
                .await
                .unwrap(),
        };
        assert!(!matches!(error, ConnectionError::TimedOut), "{error}");
        arena
            .logs
            .wait_for_warning(&["refused a peer at the TLS handshake", "certificate"])
            .await;
        arena.check_unharmed().await;
    })
    .await
}

#[tokio::test]
async fn an_expired_worker_certificate_is_refused() {
    bounded(async {
        let mut arena = Arena::new().await;
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
        let (w, mut link) = start_worker(&arena.gateway, &expired, config());
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

#[tokio::test]
async fn a_certificate_that_names_no_worker_is_refused() {
    bounded(async {
        let mut arena = Arena::new().await;
        // A certificate of our CA for a server, not a worker: wrong usage and no worker name.
        let gateway_cert = arena
            .pki
            .ca
            .issue_gateway(&["sand-worker-9".to_string()], Validity::days_from_now(1))
            .unwrap();
        let (w, mut link) = start_worker(&arena.gateway, &gateway_cert, config());
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

#[tokio::test]
async fn an_oversize_frame_closes_the_connection_before_its_body_is_read() {
    bounded(async {
        let mut arena = Arena::new().await;
        // On the control stream: only the length prefix is sent, and the body never comes, so
        // the gateway must refuse on the prefix alone.
        let (_e, conn) = arena.raw_worker(60).await;
        let (mut send, _recv) = greet(&conn).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(60))
        );
        send.write_all(&((MESSAGE_BYTES_MAX as u32) + 1).to_be_bytes())
            .await
            .unwrap();
        let reason = closed_for_violation(&conn).await;
        assert!(reason.contains("above the"), "{reason}");
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(60))
        );
        arena
            .logs
            .wait_for_warning(&["closed the worker's connection", "w60", "above the"])
            .await;
        arena.check_unharmed().await;

        // On a payload stream, the same.
        let (_e, conn) = arena.raw_worker(61).await;
        let _control = greet(&conn).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(61))
        );
        let mut uni = conn.open_uni().await.unwrap();
        uni.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let reason = closed_for_violation(&conn).await;
        assert!(reason.contains("4294967295"), "{reason}");
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(61))
        );
        arena.check_unharmed().await;
    })
    .await
}

#[tokio::test]
async fn a_message_abandoned_on_a_live_connection_closes_it() {
    bounded(async {
        let mut arena = Arena::new().await;
        // The peer resets a payload stream it was sending: the gateway must not carry on as if
        // that message had never been sent.
        let (_e, conn) = arena.raw_worker(62).await;
        let _control = greet(&conn).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(62))
        );
        let mut uni = conn.open_uni().await.unwrap();
        uni.write_all(&100u32.to_be_bytes()).await.unwrap();
        uni.write_all(&[0u8; 10]).await.unwrap();
        uni.reset(VarInt::from_u32(0)).unwrap();
        let reason = closed_for_violation(&conn).await;
        assert!(reason.contains("abandoned"), "{reason}");
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(62))
        );
        arena.check_unharmed().await;

        // The peer stops reading a payload stream the gateway is writing: the same.
        let (_e, conn) = arena.raw_worker(63).await;
        let _control = greet(&conn).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(63))
        );
        arena
            .gw
            .sender
            .send(WorkerId(63), dispatch(1, 8 << 20))
            .unwrap();
        let mut uni = conn.accept_uni().await.unwrap();
        uni.stop(VarInt::from_u32(0)).unwrap();
        // The gateway's log says why it closed: the close itself may be lost among the payload's
        // packets on a loaded machine, and then this end learns of it from a stateless reset.
        tokio::time::timeout(EVENT_TIME_MAX, conn.closed())
            .await
            .expect("the gateway did not close the connection");
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(63))
        );
        arena
            .logs
            .wait_for_warning(&["closed the worker's connection", "w63", "abandoned"])
            .await;
        arena.check_unharmed().await;
    })
    .await
}

#[tokio::test]
async fn garbage_bytes_close_the_connection() {
    bounded(async {
        let mut arena = Arena::new().await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);

        // Instead of the preamble: refused before the worker counts as connected.
        for round in 0..4 {
            let (_e, conn) = arena.raw_worker(70).await;
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let mut junk = vec![0u8; 64 + round * 100];
            rng.fill(&mut junk[..]);
            junk[0] = b'x';
            send.write_all(&junk).await.unwrap();
            closed_for_violation(&conn).await;
            arena.check_unharmed().await;
        }
        arena
            .logs
            .wait_for_warning(&["did not open its control stream properly", "preamble"])
            .await;

        // After the preamble, on the control stream and then finished: some frame breaks.
        for round in 0..4 {
            let (_e, conn) = arena.raw_worker(71).await;
            let (mut send, _recv) = greet(&conn).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Connected(WorkerId(71))
            );
            let mut junk = vec![0u8; 200 + round * 300];
            rng.fill(&mut junk[..]);
            send.write_all(&junk).await.unwrap();
            send.finish().unwrap();
            closed_for_violation(&conn).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Disconnected(WorkerId(71))
            );
            arena.check_unharmed().await;
        }

        // A well-framed body that is not a message.
        let (_e, conn) = arena.raw_worker(72).await;
        let (mut send, _recv) = greet(&conn).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(72))
        );
        let mut frame = 10u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[1, 250, 251, 252, 253, 254, 255, 7, 7, 7]);
        send.write_all(&frame).await.unwrap();
        let reason = closed_for_violation(&conn).await;
        assert!(reason.contains("undecodable"), "{reason}");
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(72))
        );
        arena.check_unharmed().await;

        // Garbage on a payload stream.
        for round in 0..3 {
            let (_e, conn) = arena.raw_worker(73).await;
            let _control = greet(&conn).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Connected(WorkerId(73))
            );
            let mut uni = conn.open_uni().await.unwrap();
            let mut junk = vec![0u8; 100 + round * 1000];
            rng.fill(&mut junk[..]);
            uni.write_all(&junk).await.unwrap();
            uni.finish().unwrap();
            closed_for_violation(&conn).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Disconnected(WorkerId(73))
            );
            arena.check_unharmed().await;
        }
        let violations = arena
            .logs
            .lines()
            .iter()
            .filter(|l| l.starts_with("WARN") && l.contains("broke the framing"))
            .count();
        // 4 bad preambles, 4 garbage control streams, 1 undecodable body, 3 bad payload streams.
        assert_eq!(violations, 12, "one clear warning per bad connection");
    })
    .await
}

#[tokio::test]
async fn a_worker_of_an_older_wire_version_is_told_which_version_the_gateway_speaks() {
    bounded(async {
        let mut arena = Arena::new().await;
        let (_e, conn) = arena.raw_worker(74).await;
        let (mut send, _recv) = greet(&conn).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(74))
        );
        // A version 3 worker's first frame: `Hello { incarnation: 1, resumed: false,
        // started: [] }`, not in an envelope.
        let old_hello = [3, 0, 1, 0, 0];
        let mut frame = (old_hello.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&old_hello);
        send.write_all(&frame).await.unwrap();
        let reason = closed_for_violation(&conn).await;
        let mismatch =
            format!("wire version 3 is not supported (this build speaks version {WIRE_VERSION})");
        assert!(reason.contains(&mismatch), "{reason}");
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(74))
        );
        arena
            .logs
            .wait_for_warning(&["closed the worker's connection", "w74", &mismatch])
            .await;
        arena.check_unharmed().await;
    })
    .await
}

#[tokio::test]
async fn shutting_down_leaves_no_connection_and_no_task() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway(&pki, config());
        let (w1, mut l1) = connect_worker(&pki, &gateway, &mut gw, 1).await;
        let (w2, _l2) = connect_worker(&pki, &gateway, &mut gw, 2).await;
        gw.sender.send(WorkerId(1), dispatch(1, 3 << 20)).unwrap();
        assert!(matches!(
            next(&mut l1.events).await,
            WorkerEvent::Message(_)
        ));
        assert!(gateway.live_tasks() > 0 && w1.live_tasks() > 0);
        w1.shutdown().await;
        w2.shutdown().await;
        let mut gone = Vec::new();
        while gone.len() < 2 {
            match next(&mut gw.events).await {
                GatewayEvent::Disconnected(id) => gone.push(id),
                other => panic!("unexpected {other:?}"),
            }
        }
        gone.sort();
        assert_eq!(gone, vec![WorkerId(1), WorkerId(2)]);
        wait_until("no connection is open", || gateway.open_connections() == 0).await;
        wait_until("no connection task is alive", || gateway.live_tasks() == 0).await;
        assert_eq!(
            gw.sender.send(WorkerId(1), ack(1)),
            Err(SendError::NotConnected)
        );
        gateway.shutdown().await;
    })
    .await
}
