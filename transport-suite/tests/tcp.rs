//! TCP with TLS 1.3 on 127.0.0.1: the whole suite, then the refusal of bare TLS peers that break
//! the framing. TCP carries no close codes: each refusal is checked by the connection ending
//! and by the gateway's warning, which says why.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::sync::Arc;
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use sand_protocol::ids::WorkerId;
use sand_protocol::wire::{MESSAGE_BYTES_MAX, WIRE_VERSION};
use sand_transport::seam::GatewayEvent;
use sand_transport::tls;
use sand_transport_suite::common::*;
use sand_transport_suite::suite::Arena;
use sand_transport_suite::Tcp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

sand_transport_suite::suite!(Tcp; real);

/// The bytes a worker says first (pinned here: it is wire format).
const PREAMBLE: &[u8; 4] = b"snd1";

/// A bare TLS connection to the arena's gateway with `tls`, not yet greeted.
async fn raw_tls(
    arena: &Arena<Tcp>,
    tls: rustls::ClientConfig,
) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = TcpStream::connect(arena.gateway.local_addr()).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(tls))
        .connect(name, socket)
        .await
}

/// A bare TLS connection authenticated as worker `id`, not yet greeted.
async fn raw_worker(arena: &Arena<Tcp>, id: u32) -> TlsStream<TcpStream> {
    let tls = tls::client_config(&arena.pki.worker(id)).unwrap();
    raw_tls(arena, tls).await.unwrap()
}

/// Says the preamble and checks that the gateway says it back.
async fn greet(stream: &mut TlsStream<TcpStream>) {
    stream.write_all(PREAMBLE).await.unwrap();
    stream.flush().await.unwrap();
    let mut answer = [0u8; 4];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, PREAMBLE);
}

/// Waits for the gateway to end the connection: reading finds its end (or an error).
async fn closed(stream: &mut TlsStream<TcpStream>) {
    let mut sink = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(EVENT_TIME_MAX, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    ended
        .await
        .expect("the gateway did not close the connection");
}

#[tokio::test]
async fn a_peer_without_a_client_certificate_is_refused() {
    bounded(async {
        let mut arena = Arena::<Tcp>::new().await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(arena.pki.ca.cert().clone()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![tls::ALPN.to_vec()];
        // With TLS 1.3 the client may finish its side first; either way the connection dies.
        if let Ok(mut stream) = raw_tls(&arena, tls).await {
            let _ = stream.write_all(PREAMBLE).await;
            closed(&mut stream).await;
        }
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
        let mut arena = Arena::<Tcp>::new().await;
        // Only the length prefix is sent, and the body never comes, so the gateway must refuse
        // on the prefix alone.
        for (id, len) in [(60, MESSAGE_BYTES_MAX as u32 + 1), (61, u32::MAX)] {
            let mut stream = raw_worker(&arena, id).await;
            greet(&mut stream).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Connected(WorkerId(id))
            );
            stream.write_all(&len.to_be_bytes()).await.unwrap();
            stream.flush().await.unwrap();
            closed(&mut stream).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Disconnected(WorkerId(id))
            );
            arena
                .logs
                .wait_for_warning(&[
                    "closed the worker's connection",
                    &format!("w{id}"),
                    &format!("frame of {len} bytes announced, above the"),
                ])
                .await;
            arena.check_unharmed().await;
        }
    })
    .await
}

#[tokio::test]
async fn garbage_bytes_close_the_connection() {
    bounded(async {
        let mut arena = Arena::<Tcp>::new().await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);

        // Instead of the preamble: refused before the worker counts as connected.
        for round in 0..4 {
            let mut stream = raw_worker(&arena, 70).await;
            let mut junk = vec![0u8; 64 + round * 100];
            rng.fill(&mut junk[..]);
            junk[0] = b'x';
            stream.write_all(&junk).await.unwrap();
            stream.flush().await.unwrap();
            closed(&mut stream).await;
            arena.check_unharmed().await;
        }
        arena
            .logs
            .wait_for_warning(&["did not greet properly", "preamble"])
            .await;

        // After the preamble, then the stream ends: some frame breaks.
        for round in 0..4 {
            let mut stream = raw_worker(&arena, 71).await;
            greet(&mut stream).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Connected(WorkerId(71))
            );
            let mut junk = vec![0u8; 200 + round * 300];
            rng.fill(&mut junk[..]);
            stream.write_all(&junk).await.unwrap();
            stream.shutdown().await.unwrap();
            closed(&mut stream).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Disconnected(WorkerId(71))
            );
            arena.check_unharmed().await;
        }

        // A well-framed body that is not a message.
        let mut stream = raw_worker(&arena, 72).await;
        greet(&mut stream).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(72))
        );
        let mut frame = 10u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[1, 250, 251, 252, 253, 254, 255, 7, 7, 7]);
        stream.write_all(&frame).await.unwrap();
        stream.flush().await.unwrap();
        closed(&mut stream).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(72))
        );
        arena
            .logs
            .wait_for_warning(&["closed the worker's connection", "w72", "undecodable"])
            .await;
        arena.check_unharmed().await;
        let violations = arena
            .logs
            .lines()
            .iter()
            .filter(|l| l.starts_with("WARN") && l.contains("broke the framing"))
            .count();
        // 4 bad preambles, 4 garbage streams after the preamble, 1 undecodable body.
        assert_eq!(violations, 9, "one clear warning per bad connection");
    })
    .await
}

#[tokio::test]
async fn a_worker_of_an_older_wire_version_is_told_which_version_the_gateway_speaks() {
    bounded(async {
        let mut arena = Arena::<Tcp>::new().await;
        let mut stream = raw_worker(&arena, 74).await;
        greet(&mut stream).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(74))
        );
        // A version 3 worker's first frame: `Hello { incarnation: 1, resumed: false,
        // started: [] }`, not in an envelope.
        let old_hello = [3, 0, 1, 0, 0];
        let mut frame = (old_hello.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&old_hello);
        stream.write_all(&frame).await.unwrap();
        stream.flush().await.unwrap();
        closed(&mut stream).await;
        let mismatch =
            format!("wire version 3 is not supported (this build speaks version {WIRE_VERSION})");
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

/// A silent peer is dropped after the idle timeout; a live one is kept by keep-alives.
#[tokio::test]
async fn a_silent_peer_is_dropped_and_an_idle_one_is_kept() {
    bounded(async {
        let mut arena = Arena::<Tcp>::new().await;
        let mut stream = raw_worker(&arena, 75).await;
        greet(&mut stream).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(75))
        );
        // Nothing more from this peer: dropped after `idle_timeout` (2 s in these settings),
        // while the good worker, as idle, stays connected.
        closed(&mut stream).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(75))
        );
        arena
            .logs
            .wait_for_warning(&["the worker's connection broke", "w75", "nothing heard"])
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        arena.check_unharmed().await;
    })
    .await
}
