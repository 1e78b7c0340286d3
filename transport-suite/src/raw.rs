//! Bare peers that break the rules, for the refusals every real transport must make: a peer
//! without a client certificate, an oversize frame, garbage, a worker of an older wire version,
//! handshakes begun and never finished.
//! [`RawPeers`] opens such a peer on each transport; the checks here are generic over it, and
//! each transport's own test file adds what only it has (QUIC's payload streams).

use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, Endpoint, VarInt};
use rand::{RngExt, SeedableRng};
use sand_protocol::ids::WorkerId;
use sand_protocol::wire::{MESSAGE_BYTES_MAX, WIRE_VERSION};
use sand_transport::config::LinkConfig;
use sand_transport::conn::CLOSE_VIOLATION;
use sand_transport::seam::GatewayEvent;
use sand_transport::tls;
use sand_transport_quic::QuicGateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::common::*;
use crate::suite::{round_trip, Arena};
use crate::{Quic, Tcp, TestTransport};

/// The bytes a worker says first on its control stream (pinned here: it is wire format).
pub const PREAMBLE: &[u8; 4] = b"snd1";

/// A TLS 1.3 client configuration that trusts the cluster CA and presents no certificate.
pub fn tls_without_certificate(pki: &Pki) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![tls::ALPN.to_vec()];
    tls
}

/// Bare peers of a real transport.
pub trait RawPeers: TestTransport + Sized {
    /// A bare connection.
    type Raw: Send;

    /// A bare connection authenticated as worker `id`, past the TLS handshake.
    fn raw_worker(
        arena: &Arena<Self>,
        id: u32,
    ) -> impl std::future::Future<Output = Self::Raw> + Send;
    /// Says the preamble on the control stream and checks the gateway's answer.
    fn greet(raw: &mut Self::Raw) -> impl std::future::Future<Output = ()> + Send;
    /// Writes `bytes` on the control stream (opening it if need be).
    fn write(raw: &mut Self::Raw, bytes: &[u8]) -> impl std::future::Future<Output = ()> + Send;
    /// Ends the control stream.
    fn finish(raw: &mut Self::Raw) -> impl std::future::Future<Output = ()> + Send;
    /// Waits for the gateway to close the connection for a framing violation; returns the
    /// reason the gateway gave the peer, where the transport carries one.
    fn closed_for_violation(
        raw: &mut Self::Raw,
    ) -> impl std::future::Future<Output = Option<String>> + Send;
    /// Dials the gateway with [`tls_without_certificate`] and checks that the connection dies.
    fn connect_without_certificate(
        arena: &Arena<Self>,
    ) -> impl std::future::Future<Output = ()> + Send;
    /// A peer that begins a handshake and never finishes it, until dropped.
    type Stalled: Send;
    /// Begins such a handshake.
    fn stall(arena: &Arena<Self>) -> impl std::future::Future<Output = Self::Stalled> + Send;
    /// Dials the gateway as a worker and says whether the gateway refused the connection at
    /// once, before any handshake could run.
    fn refused_at_once(arena: &Arena<Self>) -> impl std::future::Future<Output = bool> + Send;
}

/// How soon a refusal "at once" must come.
const AT_ONCE: Duration = Duration::from_secs(1);

/// A bare quinn connection and its control stream, once opened.
#[derive(Debug)]
pub struct RawQuic {
    _endpoint: Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
    /// The control stream, once opened.
    pub control: Option<(quinn::SendStream, quinn::RecvStream)>,
}

/// A bare quinn client endpoint with `tls`.
pub fn raw_client(client: quinn::ClientConfig) -> Endpoint {
    let mut endpoint = Endpoint::client(localhost()).unwrap();
    endpoint.set_default_client_config(client);
    endpoint
}

impl RawQuic {
    async fn control(&mut self) -> &mut (quinn::SendStream, quinn::RecvStream) {
        if self.control.is_none() {
            self.control = Some(self.conn.open_bi().await.unwrap());
        }
        self.control.as_mut().unwrap()
    }
}

impl RawPeers for Quic {
    type Raw = RawQuic;

    async fn raw_worker(arena: &Arena<Quic>, id: u32) -> RawQuic {
        let client = sand_transport_quic::client_config(&arena.pki.worker(id), &config()).unwrap();
        let endpoint = raw_client(client);
        let gateway: &QuicGateway = &arena.gateway;
        let conn = endpoint
            .connect(gateway.local_addr(), "localhost")
            .unwrap()
            .await
            .unwrap();
        RawQuic {
            _endpoint: endpoint,
            conn,
            control: None,
        }
    }

    async fn greet(raw: &mut RawQuic) {
        let (send, recv) = raw.control().await;
        send.write_all(PREAMBLE).await.unwrap();
        let mut answer = [0u8; 4];
        recv.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, PREAMBLE);
    }

    async fn write(raw: &mut RawQuic, bytes: &[u8]) {
        raw.control().await.0.write_all(bytes).await.unwrap();
    }

    async fn finish(raw: &mut RawQuic) {
        raw.control().await.0.finish().unwrap();
    }

    async fn closed_for_violation(raw: &mut RawQuic) -> Option<String> {
        match tokio::time::timeout(EVENT_TIME_MAX, raw.conn.closed()).await {
            Ok(ConnectionError::ApplicationClosed(close)) => {
                assert_eq!(
                    close.error_code,
                    VarInt::from_u32(CLOSE_VIOLATION),
                    "{close}"
                );
                Some(String::from_utf8_lossy(&close.reason).into_owned())
            }
            Ok(other) => panic!("closed, but not for a violation: {other}"),
            Err(_) => panic!("the gateway did not close the connection"),
        }
    }

    async fn connect_without_certificate(arena: &Arena<Quic>) {
        let tls = tls_without_certificate(&arena.pki);
        let client = quinn::ClientConfig::new(Arc::new(
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
    }

    type Stalled = StalledQuic;

    async fn stall(arena: &Arena<Quic>) -> StalledQuic {
        let (release, released) = std::sync::mpsc::channel();
        let provider = rustls::crypto::ring::default_provider();
        let verifier = Blocking {
            released: std::sync::Mutex::new(released),
            schemes: provider
                .signature_verification_algorithms
                .supported_schemes(),
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![tls::ALPN.to_vec()];
        let client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let gateway = arena.gateway.local_addr();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let endpoint = raw_client(client);
                let _ = endpoint.connect(gateway, "localhost").unwrap().await;
            });
        });
        StalledQuic {
            release: Some(release),
            thread: Some(thread),
        }
    }

    async fn refused_at_once(arena: &Arena<Quic>) -> bool {
        let client = sand_transport_quic::client_config(&arena.pki.worker(80), &config()).unwrap();
        let endpoint = raw_client(client);
        let connecting = endpoint
            .connect(arena.gateway.local_addr(), "localhost")
            .unwrap();
        match tokio::time::timeout(AT_ONCE, connecting).await {
            Ok(Err(ConnectionError::ConnectionClosed(close))) => {
                close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
            }
            _ => false,
        }
    }
}

/// A QUIC client, on a thread and runtime of its own, whose handshake stops at the gateway's
/// certificate: its verifier blocks until the peer is dropped, so the gateway waits for a
/// `Finished` that never comes.
pub struct StalledQuic {
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StalledQuic {
    fn drop(&mut self) {
        // The verifier wakes up and fails the handshake; the client closes the connection.
        drop(self.release.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A certificate verifier that waits until it is released, then refuses.
#[derive(Debug)]
struct Blocking {
    released: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    schemes: Vec<rustls::SignatureScheme>,
}

impl rustls::client::danger::ServerCertVerifier for Blocking {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let _ = self.released.lock().map(|rx| rx.recv());
        Err(rustls::Error::General("the stalled peer gives up".into()))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("never reached".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("never reached".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes.clone()
    }
}

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

/// Waits for the gateway to end the connection: reading finds its end (or an error).
pub async fn closed(stream: &mut TlsStream<TcpStream>) {
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

impl RawPeers for Tcp {
    type Raw = TlsStream<TcpStream>;

    async fn raw_worker(arena: &Arena<Tcp>, id: u32) -> TlsStream<TcpStream> {
        let tls = tls::client_config(&arena.pki.worker(id)).unwrap();
        raw_tls(arena, tls).await.unwrap()
    }

    async fn greet(raw: &mut TlsStream<TcpStream>) {
        raw.write_all(PREAMBLE).await.unwrap();
        raw.flush().await.unwrap();
        let mut answer = [0u8; 4];
        raw.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, PREAMBLE);
    }

    async fn write(raw: &mut TlsStream<TcpStream>, bytes: &[u8]) {
        raw.write_all(bytes).await.unwrap();
        raw.flush().await.unwrap();
    }

    async fn finish(raw: &mut TlsStream<TcpStream>) {
        raw.shutdown().await.unwrap();
    }

    /// TCP carries no close reason: the gateway's warning says why.
    async fn closed_for_violation(raw: &mut TlsStream<TcpStream>) -> Option<String> {
        closed(raw).await;
        None
    }

    async fn connect_without_certificate(arena: &Arena<Tcp>) {
        let tls = tls_without_certificate(&arena.pki);
        // With TLS 1.3 the client may finish its side first; either way the connection dies.
        if let Ok(mut stream) = raw_tls(arena, tls).await {
            let _ = stream.write_all(PREAMBLE).await;
            closed(&mut stream).await;
        }
    }

    /// A TCP connection that never says its `ClientHello`.
    type Stalled = TcpStream;

    async fn stall(arena: &Arena<Tcp>) -> TcpStream {
        TcpStream::connect(arena.gateway.local_addr())
            .await
            .unwrap()
    }

    /// Refused at once: the gateway closes the socket unread, before any TLS.
    async fn refused_at_once(arena: &Arena<Tcp>) -> bool {
        let mut socket = TcpStream::connect(arena.gateway.local_addr())
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(AT_ONCE, socket.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

/// Handshakes begun and never finished hold the gateway's places for them until the open
/// timeout; past the cap, a peer is refused at once, so a flood costs the gateway a bounded
/// number of tasks. Once the stalled peers go, workers connect again.
pub async fn handshakes_past_the_cap_are_refused_at_once<T: RawPeers>() {
    bounded(async {
        let cap = 3;
        let patient = LinkConfig {
            handshakes_max: cap,
            open_timeout: EVENT_TIME_MAX,
            ..config()
        };
        let mut arena = Arena::<T>::with_gateway_config(patient).await;
        let mut stalled = Vec::new();
        for _ in 0..cap {
            stalled.push(T::stall(&arena).await);
        }
        let gateway = &arena.gateway;
        wait_until("every stalled handshake is under way", || {
            T::open_connections(gateway) == 1 + cap
        })
        .await;
        assert!(
            T::refused_at_once(&arena).await,
            "a peer past the cap was not refused at once"
        );
        arena
            .logs
            .wait_for_warning(&["too many handshakes under way"])
            .await;
        assert_eq!(T::open_connections(&arena.gateway), 1 + cap);

        drop(stalled);
        arena.check_unharmed().await;
        let (_worker, mut link) =
            connect_worker::<T>(&arena.pki, &arena.gateway, &mut arena.gw, 81).await;
        round_trip(&mut arena.gw, &mut link, 81, 0).await;
    })
    .await
}

/// Asserts that the reason the gateway gave, where the transport carries one, says `what`.
fn assert_reason(reason: Option<String>, what: &str) {
    if let Some(reason) = reason {
        assert!(reason.contains(what), "{reason}");
    }
}

/// A peer without a client certificate is refused in the handshake.
pub async fn a_peer_without_a_client_certificate_is_refused<T: RawPeers>() {
    bounded(async {
        let mut arena = Arena::<T>::new().await;
        T::connect_without_certificate(&arena).await;
        arena
            .logs
            .wait_for_warning(&["refused a peer at the TLS handshake", "certificate"])
            .await;
        arena.check_unharmed().await;
    })
    .await
}

/// An oversize length prefix on the control stream closes the connection on the prefix alone:
/// the body never comes.
pub async fn an_oversize_frame_closes_the_connection_before_its_body_is_read<T: RawPeers>() {
    bounded(async {
        let mut arena = Arena::<T>::new().await;
        for (id, len) in [(60, MESSAGE_BYTES_MAX as u32 + 1), (64, u32::MAX)] {
            let mut raw = T::raw_worker(&arena, id).await;
            T::greet(&mut raw).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Connected(WorkerId(id))
            );
            T::write(&mut raw, &len.to_be_bytes()).await;
            assert_reason(T::closed_for_violation(&mut raw).await, "above the");
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Disconnected(WorkerId(id))
            );
            arena
                .logs
                .wait_for_warning(&[
                    "closed the worker's connection",
                    &format!("w{id}"),
                    "above the",
                ])
                .await;
            arena.check_unharmed().await;
        }
    })
    .await
}

/// Garbage instead of the preamble, garbage after it, and a well-framed body that is not a
/// message each close the connection, with one clear warning.
pub async fn garbage_bytes_close_the_connection<T: RawPeers>() {
    bounded(async {
        let mut arena = Arena::<T>::new().await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);

        // Instead of the preamble: refused before the worker counts as connected.
        for round in 0..4 {
            let mut raw = T::raw_worker(&arena, 70).await;
            let mut junk = vec![0u8; 64 + round * 100];
            rng.fill(&mut junk[..]);
            junk[0] = b'x';
            T::write(&mut raw, &junk).await;
            T::closed_for_violation(&mut raw).await;
            arena.check_unharmed().await;
        }
        arena
            .logs
            .wait_for_warning(&["did not open its control stream properly", "preamble"])
            .await;

        // After the preamble, on the control stream and then finished: some frame breaks.
        for round in 0..4 {
            let mut raw = T::raw_worker(&arena, 71).await;
            T::greet(&mut raw).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Connected(WorkerId(71))
            );
            let mut junk = vec![0u8; 200 + round * 300];
            rng.fill(&mut junk[..]);
            T::write(&mut raw, &junk).await;
            T::finish(&mut raw).await;
            T::closed_for_violation(&mut raw).await;
            assert_eq!(
                next(&mut arena.gw.events).await,
                GatewayEvent::Disconnected(WorkerId(71))
            );
            arena.check_unharmed().await;
        }

        // A well-framed body that is not a message.
        let mut raw = T::raw_worker(&arena, 72).await;
        T::greet(&mut raw).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(72))
        );
        let mut frame = 10u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[1, 250, 251, 252, 253, 254, 255, 7, 7, 7]);
        T::write(&mut raw, &frame).await;
        assert_reason(T::closed_for_violation(&mut raw).await, "undecodable");
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Disconnected(WorkerId(72))
        );
        arena
            .logs
            .wait_for_warning(&["closed the worker's connection", "w72", "undecodable"])
            .await;
        arena.check_unharmed().await;
        // 4 bad preambles, 4 garbage control streams, 1 undecodable body.
        assert_eq!(
            arena.logs.violations(),
            9,
            "one clear warning per bad connection"
        );
    })
    .await
}

/// A worker of the previous wire version is closed with a reason that names both versions.
pub async fn a_worker_of_an_older_wire_version_is_told_which_version_the_gateway_speaks<
    T: RawPeers,
>() {
    bounded(async {
        let mut arena = Arena::<T>::new().await;
        let mut raw = T::raw_worker(&arena, 74).await;
        T::greet(&mut raw).await;
        assert_eq!(
            next(&mut arena.gw.events).await,
            GatewayEvent::Connected(WorkerId(74))
        );
        // A version 3 worker's first frame: `Hello { incarnation: 1, resumed: false,
        // started: [] }`, not in an envelope.
        let old_hello = [3, 0, 1, 0, 0];
        let mut frame = (old_hello.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&old_hello);
        T::write(&mut raw, &frame).await;
        let mismatch =
            format!("wire version 3 is not supported (this build speaks version {WIRE_VERSION})");
        assert_reason(T::closed_for_violation(&mut raw).await, &mismatch);
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
