//! QUIC on 127.0.0.1: the whole suite, then what only QUIC has — a stream per payload, so
//! large payloads never hold up control messages — and the refusal of bare quinn peers that
//! break the framing on each kind of stream.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use bytes::Bytes;
use quinn::{ConnectionError, Endpoint, VarInt};
use rand::{RngExt, SeedableRng};
use sand_protocol::ids::{AppName, Attempt, ExecId, GrainName, WorkerId};
use sand_protocol::wire::{
    AppBundle, Down, RunTrace, ServiceToGateway, ServiceToWorker, ToGateway, ToWorker, Up,
    MESSAGE_BYTES_MAX, WIRE_VERSION,
};
use sand_transport::conn::CLOSE_VIOLATION;
use sand_transport::seam::{GatewayEvent, WorkerEvent};
use sand_transport::tls;
use sand_transport_suite::common::*;
use sand_transport_suite::suite::{Arena, GOOD};
use sand_transport_suite::Quic;

sand_transport_suite::suite!(Quic; real);

/// The bytes a worker says first on its control stream (pinned here: it is wire format).
const PREAMBLE: &[u8; 4] = b"snd1";

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

// ---- Refusals -------------------------------------------------------------------------------

/// A bare quinn client endpoint with `tls`.
fn raw_client(client: quinn::ClientConfig) -> Endpoint {
    let mut endpoint = Endpoint::client(localhost()).unwrap();
    endpoint.set_default_client_config(client);
    endpoint
}

/// A bare quinn connection authenticated as worker `id`, greeted on the control stream.
async fn raw_worker(arena: &Arena<Quic>, id: u32) -> (Endpoint, quinn::Connection) {
    let client = sand_transport_quic::client_config(&arena.pki.worker(id), &config()).unwrap();
    let endpoint = raw_client(client);
    let conn = endpoint
        .connect(arena.gateway.local_addr(), "localhost")
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
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
async fn a_peer_without_a_client_certificate_is_refused() {
    bounded(async {
        let mut arena = Arena::<Quic>::new().await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(arena.pki.ca.cert().clone()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![tls::ALPN.to_vec()];
        let client = quinn::ClientConfig::new(std::sync::Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let endpoint = raw_client(client);
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
async fn an_oversize_frame_closes_the_connection_before_its_body_is_read() {
    bounded(async {
        let mut arena = Arena::<Quic>::new().await;
        // On the control stream: only the length prefix is sent, and the body never comes, so
        // the gateway must refuse on the prefix alone.
        let (_e, conn) = raw_worker(&arena, 60).await;
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
        let (_e, conn) = raw_worker(&arena, 61).await;
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
        let mut arena = Arena::<Quic>::new().await;
        // The peer resets a payload stream it was sending: the gateway must not carry on as if
        // that message had never been sent.
        let (_e, conn) = raw_worker(&arena, 62).await;
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
        let (_e, conn) = raw_worker(&arena, 63).await;
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
        let mut arena = Arena::<Quic>::new().await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);

        // Instead of the preamble: refused before the worker counts as connected.
        for round in 0..4 {
            let (_e, conn) = raw_worker(&arena, 70).await;
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
            let (_e, conn) = raw_worker(&arena, 71).await;
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
        let (_e, conn) = raw_worker(&arena, 72).await;
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
            let (_e, conn) = raw_worker(&arena, 73).await;
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
        let mut arena = Arena::<Quic>::new().await;
        let (_e, conn) = raw_worker(&arena, 74).await;
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
