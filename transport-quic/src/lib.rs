//! sand's transport over QUIC (quinn): the gateway is a quinn server, each worker a quinn
//! client, both authenticated by certificates of the cluster CA
//! ([`sand_transport::tls::certs`]). It implements the seam of [`sand_transport::seam`] and keeps
//! its contract; `sand-transport-tcp` does the same over TCP, for networks that block UDP.
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
//! or anything that does not decode has its connection closed with `CLOSE_VIOLATION` and a
//! `tracing` warning. A message that does not fit in its peer's send queue closes the
//! connection with `CLOSE_OVERFLOW` and a warning, on either side: a connection never lives on
//! with a message missing. A peer without a valid certificate of the cluster CA is refused
//! during the TLS handshake, also with a warning, and never appears as an event. The worker
//! reconnects by itself with exponential backoff and jitter.
//!
//! Both endpoints need a tokio runtime to run on (their tasks are spawned on the current one);
//! the seam they hand out ([`sand_transport::seam`]) does not.

mod conn;
mod gateway;
mod worker;

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use sand_transport::config::{LinkConfig, TransportError};
use sand_transport::conn::CLOSE_NORMAL;
use sand_transport::peers::Closer;
use sand_transport::tls::{self, certs::NodeIdentity};

pub use gateway::QuicGateway;
pub use worker::QuicWorker;

/// The quinn transport settings for `config`, with `bidi_streams_max` control streams.
fn transport(
    config: &LinkConfig,
    bidi_streams_max: u32,
) -> Result<Arc<TransportConfig>, TransportError> {
    let mut t = TransportConfig::default();
    let idle = IdleTimeout::try_from(config.idle_timeout)
        .map_err(|_| TransportError::Config("idle_timeout is too large for QUIC"))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(config.keep_alive_interval));
    t.max_concurrent_bidi_streams(VarInt::from_u32(bidi_streams_max));
    t.max_concurrent_uni_streams(VarInt::from_u32(config.payload_streams_max));
    Ok(Arc::new(t))
}

/// The quinn server configuration of a gateway: the mutual TLS of [`tls::server_config`], one
/// control stream per connection, and quinn's queue of connection attempts not yet taken by the
/// accept loop bounded like the handshakes it runs.
pub fn server_config(
    identity: &NodeIdentity,
    config: &LinkConfig,
) -> Result<quinn::ServerConfig, TransportError> {
    config.validate()?;
    let crypto = QuicServerConfig::try_from(tls::server_config(identity)?)
        .map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport(config, 1)?);
    server.max_incoming(config.handshakes_max);
    Ok(server)
}

/// The quinn client configuration of a worker: the mutual TLS of [`tls::client_config`].
pub fn client_config(
    identity: &NodeIdentity,
    config: &LinkConfig,
) -> Result<quinn::ClientConfig, TransportError> {
    config.validate()?;
    let crypto = QuicClientConfig::try_from(tls::client_config(identity)?)
        .map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport(config, 0)?);
    Ok(client)
}

/// A running endpoint: its quinn endpoint and the task that accepts or dials. Dropping it
/// stops the task and closes every connection.
#[derive(Debug)]
struct Running {
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
    idle_timeout: std::time::Duration,
    /// The close reason peers are given.
    farewell: &'static [u8],
}

impl Running {
    /// Stops, and waits (up to the idle timeout) for the peers to be told.
    async fn stop(self) {
        let endpoint = self.endpoint.clone();
        let idle_timeout = self.idle_timeout;
        drop(self);
        let _ = tokio::time::timeout(idle_timeout, endpoint.wait_idle()).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        self.endpoint
            .close(VarInt::from_u32(CLOSE_NORMAL), self.farewell);
    }
}

/// A QUIC connection as the tables of [`sand_transport::peers`] hold it.
#[derive(Debug, Clone)]
struct Quic(quinn::Connection);

impl Closer for Quic {
    fn close(&self, code: u32, reason: &str) {
        self.0.close(VarInt::from_u32(code), reason.as_bytes());
    }
}
