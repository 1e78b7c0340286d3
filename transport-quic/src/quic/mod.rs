//! The QUIC transport: the gateway is a quinn server, each worker a quinn client, both
//! authenticated by certificates of the cluster CA ([`crate::certs`]).
//!
//! # Streams
//!
//! A worker opens one bidirectional **control stream** per connection, says the four bytes
//! `snd1` and waits for the gateway to say them back; only then do both sides report
//! `Connected`. Small messages, protocol (`Hello`, `Heartbeat`, `Welcome`, `Ack`, `Cancel`,
//! `Abort`, `Fenced`) and service (`Fetch`, `AppChanged`) alike, travel on it in order, at a
//! higher priority than anything else. Each payload-carrying message (`ToGateway::Progress`,
//! `ServiceToGateway::Trace`, `ToWorker::Dispatch`, `ServiceToWorker::Bundle`) goes on a fresh
//! **unidirectional stream** holding exactly one frame, so a large payload never holds up a
//! heartbeat. Every frame is a `u32` big-endian length and a body made by
//! [`sand_protocol::wire::encode`] of one envelope (`Up` or `Down`); a length above
//! [`sand_protocol::wire::MESSAGE_BYTES_MAX`] is refused before anything is read into memory for
//! it.
//!
//! # Failure
//!
//! Keep-alives (default every second) hold an idle connection open; a silent peer is dropped
//! after the idle timeout (default five seconds). A peer that sends an oversize frame, garbage,
//! or anything that does not decode has its connection closed with [`CLOSE_VIOLATION`] and a
//! `tracing` warning. A message that does not fit in its peer's send queue closes the
//! connection with [`CLOSE_OVERFLOW`] and a warning, on either side: a connection never lives on
//! with a message missing. A peer without a valid certificate of the cluster CA is refused
//! during the TLS handshake, also with a warning, and never appears as an event. The worker
//! reconnects by itself with exponential backoff and jitter.
//!
//! Both endpoints need a tokio runtime to run on (their tasks are spawned on the current one);
//! the seam they hand out ([`crate::seam`]) does not.

mod conn;
mod gateway;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sand_protocol::wire::MESSAGE_BYTES_MAX;
use tracing::warn;

use crate::certs::{self, NodeIdentity};

pub use gateway::QuicGateway;
pub use worker::QuicWorker;

/// The ALPN protocol name both sides require: a client speaking anything else is refused.
pub const ALPN: &[u8] = b"sand/1";

/// Close code: an orderly shutdown.
pub const CLOSE_NORMAL: u32 = 0;
/// Close code: the peer broke the framing (oversize frame, garbage, undecodable message), or
/// gave up a message on a live connection (reset or stopped its stream).
pub const CLOSE_VIOLATION: u32 = 1;
/// Close code: the peer's certificate names no worker.
pub const CLOSE_IDENTITY: u32 = 2;
/// Close code: a newer connection of the same worker replaced this one.
pub const CLOSE_REPLACED: u32 = 3;
/// Close code: the gateway disconnected the worker on purpose ([`QuicGateway::disconnect`]).
pub const CLOSE_DISCONNECTED: u32 = 4;
/// Close code: the worker dropped its connection on purpose ([`QuicWorker::reconnect`]).
pub const CLOSE_RECONNECT: u32 = 5;
/// Close code: a message for the peer did not fit in its send queue. The connection ends rather
/// than go on without that message.
pub const CLOSE_OVERFLOW: u32 = 6;

/// Settings of both endpoints. [`QuicConfig::default`] suits a cluster on a LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    /// How often an idle connection sends a keep-alive. Must be below `idle_timeout`.
    pub keep_alive_interval: Duration,
    /// How long a connection may hear nothing before it is closed as dead.
    pub idle_timeout: Duration,
    /// The bytes of frames queued for one peer and not yet written, past which `send` returns
    /// `Overflowed` and the connection is closed. At least one largest frame must fit.
    pub send_queue_bytes_max: usize,
    /// The messages received from one peer and not yet taken by the driver, past which reading
    /// from that peer pauses (and QUIC flow control slows the peer down).
    pub recv_queue_len_max: usize,
    /// The most payload streams open at once per connection and direction.
    pub payload_streams_max: u32,
    /// How long the handshake and the control-stream greeting may take.
    pub open_timeout: Duration,
    /// The first delay before a worker reconnects; doubled after each failed attempt.
    pub reconnect_delay_min: Duration,
    /// The longest delay between a worker's reconnection attempts.
    pub reconnect_delay_max: Duration,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            keep_alive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            send_queue_bytes_max: 4 * MESSAGE_BYTES_MAX,
            recv_queue_len_max: 1024,
            payload_streams_max: 16,
            open_timeout: Duration::from_secs(5),
            reconnect_delay_min: Duration::from_millis(100),
            reconnect_delay_max: Duration::from_secs(5),
        }
    }
}

/// The smallest `send_queue_bytes_max`: one largest frame and its bookkeeping.
pub const SEND_QUEUE_BYTES_MIN: usize = MESSAGE_BYTES_MAX + conn::FRAME_COST_BYTES;

impl QuicConfig {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |why: &'static str| Err(TransportError::Config(why));
        if self.keep_alive_interval.is_zero() || self.keep_alive_interval >= self.idle_timeout {
            return bad("keep_alive_interval must be above zero and below idle_timeout");
        }
        if IdleTimeout::try_from(self.idle_timeout).is_err() {
            return bad("idle_timeout is too large for QUIC");
        }
        if self.send_queue_bytes_max < SEND_QUEUE_BYTES_MIN {
            return bad("send_queue_bytes_max must hold at least one largest frame");
        }
        if self.recv_queue_len_max == 0 || self.payload_streams_max == 0 {
            return bad("recv_queue_len_max and payload_streams_max must be above zero");
        }
        if self.reconnect_delay_min.is_zero() || self.reconnect_delay_min > self.reconnect_delay_max
        {
            return bad("reconnect_delay_min must be above zero and at most reconnect_delay_max");
        }
        if self.open_timeout.is_zero() {
            return bad("open_timeout must be above zero");
        }
        Ok(())
    }

    fn transport(&self, bidi_streams_max: u32) -> Result<Arc<TransportConfig>, TransportError> {
        let mut t = TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| TransportError::Config("idle_timeout is too large for QUIC"))?;
        t.max_idle_timeout(Some(idle));
        t.keep_alive_interval(Some(self.keep_alive_interval));
        t.max_concurrent_bidi_streams(VarInt::from_u32(bidi_streams_max));
        t.max_concurrent_uni_streams(VarInt::from_u32(self.payload_streams_max));
        Ok(Arc::new(t))
    }
}

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The settings contradict each other.
    #[error("invalid transport settings: {0}")]
    Config(&'static str),
    /// The certificates or key cannot make a TLS configuration.
    #[error("invalid TLS identity: {0}")]
    Tls(#[from] rustls::Error),
    /// The cluster CA certificate cannot verify clients.
    #[error("the cluster CA certificate cannot verify workers: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration lacks what QUIC needs.
    #[error("the TLS configuration cannot carry QUIC: {0}")]
    Quic(String),
    /// The server name is not a DNS name or IP address.
    #[error("{0:?} is not a valid gateway name (a DNS name or an IP address)")]
    ServerName(String),
    /// The UDP socket could not be opened (or no tokio runtime is running).
    #[error("cannot open a UDP socket on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// The quinn server configuration of a gateway: its certificate, TLS 1.3 with ALPN [`ALPN`],
/// and client certificates required, signed by the cluster CA and naming a worker.
pub fn server_config(
    identity: &NodeIdentity,
    config: &QuicConfig,
) -> Result<quinn::ServerConfig, TransportError> {
    config.validate()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca().clone())?;
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(WorkerVerifier { inner }))
        .with_single_cert(identity.chain().to_vec(), identity.key().clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(config.transport(1)?);
    Ok(server)
}

/// The quinn client configuration of a worker: it presents its certificate and trusts only a
/// gateway certificate signed by the cluster CA.
pub fn client_config(
    identity: &NodeIdentity,
    config: &QuicConfig,
) -> Result<quinn::ClientConfig, TransportError> {
    config.validate()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca().clone())?;
    let inner =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(GatewayVerifier { inner }))
        .with_client_auth_cert(identity.chain().to_vec(), identity.key().clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(config.transport(0)?);
    Ok(client)
}

/// Verifies client certificates with webpki against the cluster CA (chain, validity, client
/// usage), then refuses any that does not name exactly one worker, so that such a peer is
/// turned away in the handshake rather than after it.
#[derive(Debug)]
struct WorkerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for WorkerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let claimed = certs::worker_id_of(end_entity).ok();
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .and_then(|verified| match claimed {
                Some(_) => Ok(verified),
                None => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    rustls::OtherError(Arc::new(certs::CertError::NoWorkerName)),
                ))),
            });
        if let Err(e) = &verified {
            warn!(worker = ?claimed, reason = %explain(e), "refused a worker's certificate");
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies the gateway's certificate with webpki against the cluster CA, and says clearly
/// why it was refused.
#[derive(Debug)]
struct GatewayVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for GatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(e) = &verified {
            warn!(gateway = ?server_name, reason = %explain(e), "refused the gateway's certificate");
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What a certificate refusal means for whoever runs the cluster.
fn explain(e: &rustls::Error) -> String {
    let what = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            // Every sand CA has the same subject name: another cluster's certificate finds an
            // issuer by name and fails on its signature.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "it was not signed by this cluster's CA"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "it has expired; issue a new one with `sand cert issue`"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "it is not valid yet; check the clocks"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "it is not meant for this role (a gateway certificate used by a worker, or the \
                 reverse)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "it does not name the address dialled; issue it with that name"
            }
            CertificateError::Other(_) => "it names no sand worker",
            _ => "it is not valid",
        },
        _ => "the handshake failed",
    };
    format!("{what} ({e})")
}

/// Counts live tasks, so tests and operators can see that none leaked.
#[derive(Debug, Clone, Default)]
pub(crate) struct TaskCounter(Arc<std::sync::atomic::AtomicUsize>);

impl TaskCounter {
    /// Wraps `fut` so that it counts as one live task until it finishes or is dropped.
    pub(crate) fn track<F: std::future::Future>(
        &self,
        fut: F,
    ) -> impl std::future::Future<Output = F::Output> {
        let guard = TaskGuard::new(self.0.clone());
        async move {
            let _guard = guard;
            fut.await
        }
    }

    /// Tasks live now.
    pub(crate) fn live(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

struct TaskGuard(Arc<std::sync::atomic::AtomicUsize>);

impl TaskGuard {
    fn new(count: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::certs::{ClusterCa, Validity};
    use rcgen::{ExtendedKeyUsagePurpose, SanType};
    use sand_protocol::ids::WorkerId;

    fn verifier(ca: &ClusterCa) -> WorkerVerifier {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert().clone()).unwrap();
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        WorkerVerifier { inner }
    }

    fn client_cert(ca: &ClusterCa, names: &[&str]) -> CertificateDer<'static> {
        let sans = names
            .iter()
            .map(|n| SanType::DnsName(n.to_string().try_into().unwrap()))
            .collect();
        let identity = ca
            .issue(
                "someone",
                sans,
                ExtendedKeyUsagePurpose::ClientAuth,
                Validity::days_from_now(1),
            )
            .unwrap();
        identity.chain()[0].clone()
    }

    #[test]
    fn client_certificates_must_name_exactly_one_worker() {
        let ca = ClusterCa::generate(Validity::days_from_now(1)).unwrap();
        let v = verifier(&ca);
        let now = UnixTime::now();
        let worker = ca
            .issue_worker(WorkerId(3), Validity::days_from_now(1))
            .unwrap();
        assert!(v.verify_client_cert(&worker.chain()[0], &[], now).is_ok());
        for names in [
            &["someone"][..],
            &["sand-worker-01"],
            &["sand-worker-1", "sand-worker-2"],
        ] {
            let err = v
                .verify_client_cert(&client_cert(&ca, names), &[], now)
                .unwrap_err();
            assert!(
                explain(&err).contains("names no sand worker"),
                "{names:?}: {err}"
            );
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(QuicConfig::default().validate().is_ok());
        let bad = [
            QuicConfig {
                keep_alive_interval: Duration::from_secs(5),
                ..QuicConfig::default()
            },
            QuicConfig {
                send_queue_bytes_max: SEND_QUEUE_BYTES_MIN - 1,
                ..QuicConfig::default()
            },
            QuicConfig {
                payload_streams_max: 0,
                ..QuicConfig::default()
            },
            QuicConfig {
                reconnect_delay_min: Duration::from_secs(10),
                ..QuicConfig::default()
            },
        ];
        for config in bad {
            assert!(
                matches!(config.validate(), Err(TransportError::Config(_))),
                "{config:?}"
            );
        }
    }
}
