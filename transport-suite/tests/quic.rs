//! QUIC on 127.0.0.1: the whole suite, then what only QUIC has — a stream per payload, so
//! large payloads never hold up control messages, and payload streams that a bare quinn peer
//! can break or give up.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use bytes::Bytes;
use quinn::VarInt;
use rand::{RngExt, SeedableRng};
use sand_protocol::ids::{AppName, Attempt, ExecId, GrainName, WorkerId};
use sand_protocol::wire::{
    AppBundle, Down, Preview, RunTrace, ServiceToGateway, ServiceToWorker, ToGateway, ToWorker, Up,
};
use sand_transport::seam::{GatewayEvent, WorkerEvent};
use sand_transport_suite::common::*;
use sand_transport_suite::raw::RawPeers;
use sand_transport_suite::suite::{Arena, GOOD};
use sand_transport_suite::Quic;

sand_transport_suite::suite!(Quic; real);

#[tokio::test]
async fn a_large_payload_does_not_hold_up_heartbeats() {
    bounded(async {
        let pki = Pki::new();
        let (gateway, mut gw) = start_gateway::<Quic>(&pki, config());
        let (_w, mut link) = connect_worker::<Quic>(&pki, &gateway, &mut gw, GOOD).await;
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
        let (gateway, mut gw) = start_gateway::<Quic>(&pki, config());
        let (_w, mut link) = connect_worker::<Quic>(&pki, &gateway, &mut gw, GOOD).await;
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
            started_us: 1,
            ended_us: 2,
            traceparent: Default::default(),
            cold: false,
            error: None,
            stdout: Bytes::from(vec![b'o'; BIG]),
            stderr: Bytes::new(),
            input: Preview::default(),
            output: None,
            emitted: Vec::new(),
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
async fn a_message_abandoned_on_a_live_connection_closes_it() {
    bounded(async {
        let mut arena = Arena::<Quic>::new().await;
        // The peer resets a payload stream it was sending: the gateway must not carry on as if
        // that message had never been sent.
        let mut raw = Quic::raw_worker(&arena, 62).await;
        Quic::greet(&mut raw).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(62))
        );
        let mut uni = raw.conn.open_uni().await.unwrap();
        uni.write_all(&100u32.to_be_bytes()).await.unwrap();
        uni.write_all(&[0u8; 10]).await.unwrap();
        uni.reset(VarInt::from_u32(0)).unwrap();
        let reason = Quic::closed_for_violation(&mut raw).await.unwrap();
        assert!(reason.contains("abandoned"), "{reason}");
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(62))
        );
        arena.check_unharmed().await;

        // The peer stops reading a payload stream the gateway is writing: the same.
        let mut raw = Quic::raw_worker(&arena, 63).await;
        Quic::greet(&mut raw).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(63))
        );
        arena
            .gw
            .sender
            .send(WorkerId(63), dispatch(1, 8 << 20))
            .unwrap();
        let mut uni = raw.conn.accept_uni().await.unwrap();
        uni.stop(VarInt::from_u32(0)).unwrap();
        // The gateway's log says why it closed: the close itself may be lost among the payload's
        // packets on a loaded machine, and then this end learns of it from a stateless reset.
        tokio::time::timeout(EVENT_TIME_MAX, raw.conn.closed())
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

/// An oversize length prefix on a payload stream closes the connection before the body is
/// read, as on the control stream (`raw::an_oversize_frame_closes_the_connection_before_its_body_is_read`).
#[tokio::test]
async fn an_oversize_frame_on_a_payload_stream_closes_the_connection() {
    bounded(async {
        let mut arena = Arena::<Quic>::new().await;
        let mut raw = Quic::raw_worker(&arena, 61).await;
        Quic::greet(&mut raw).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(61))
        );
        let mut uni = raw.conn.open_uni().await.unwrap();
        uni.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let reason = Quic::closed_for_violation(&mut raw).await.unwrap();
        assert!(reason.contains("4294967295"), "{reason}");
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(61))
        );
        arena.check_unharmed().await;
    })
    .await
}

/// Garbage on a payload stream closes the connection, with one clear warning each.
#[tokio::test]
async fn garbage_on_a_payload_stream_closes_the_connection() {
    bounded(async {
        let mut arena = Arena::<Quic>::new().await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..3 {
            let mut raw = Quic::raw_worker(&arena, 73).await;
            Quic::greet(&mut raw).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Connected(WorkerId(73))
            );
            let mut uni = raw.conn.open_uni().await.unwrap();
            let mut junk = vec![0u8; 100 + round * 1000];
            rng.fill(&mut junk[..]);
            uni.write_all(&junk).await.unwrap();
            uni.finish().unwrap();
            Quic::closed_for_violation(&mut raw).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Disconnected(WorkerId(73))
            );
            arena.check_unharmed().await;
        }
        // 3 bad payload streams (the control stream's 9 are `raw::garbage_bytes_close_the_connection`'s).
        assert_eq!(
            arena.logs.violations(),
            3,
            "one clear warning per bad connection"
        );
    })
    .await
}
