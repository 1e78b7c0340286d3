//! sand's transport over TCP with TLS 1.3, for networks that block UDP: the gateway listens,
//! each worker dials and reconnects by itself, both authenticated by certificates of the
//! cluster CA ([`sand_transport::tls`], the same mutual TLS as QUIC). It implements the seam of
//! [`sand_transport::seam`] and keeps its contract.
//!
//! # The connection
//!
//! After the TLS handshake a worker says the four bytes `snd1` and waits for the gateway to say
//! them back; only then do both sides report `Connected` (with TLS 1.3 the gateway judges the
//! worker's certificate after the worker's side of the handshake is done, so only the answer
//! proves it was accepted). Then each side writes frames ([`sand_transport::framing`]): a `u32`
//! big-endian length and one envelope. A length of zero is a keep-alive, written when nothing
//! else was for `keep_alive_interval`; a peer silent for `idle_timeout` is dropped. A length
//! above [`sand_protocol::wire::MESSAGE_BYTES_MAX`] is refused before anything is read for it.
//!
//! # Head-of-line blocking
//!
//! TCP has one byte stream, so there are no payload streams: every frame travels in order. A
//! control message (a heartbeat, an ack) queued while a payload frame is being written waits
//! for that frame to be written whole: behind a 16 MiB payload on a slow link, a heartbeat
//! waits as long as the payload takes. Control frames go before payload frames that are still
//! queued, and order within the control stream holds, so the seam's contract is kept; only the
//! promise QUIC adds (a payload never delays a heartbeat) is not. Keep the failure timeout of
//! the protocol above the time the largest payload takes on the link.
//!
//! # Failure
//!
//! A peer that sends an oversize frame, garbage, or anything that does not decode has its
//! connection closed with a `tracing` warning. A message that does not fit in its peer's send
//! queue closes the connection, on either side. A peer without a valid certificate of the
//! cluster CA, or whose certificate names no worker, is refused during the TLS handshake with a
//! warning and never appears as an event. TCP carries no close codes: the side that closes a
//! connection logs why, and the other sees the connection end.

mod conn;
mod gateway;
mod worker;

use std::sync::{Arc, Mutex};

use sand_transport::peers::Closer;
use tokio::sync::Notify;

pub use gateway::TcpGateway;
pub use worker::TcpWorker;

/// A TCP connection as the tables of [`sand_transport::peers`] hold it: a signal to its
/// connection task, which closes the socket.
#[derive(Debug, Clone, Default)]
struct Tcp(Arc<CloseSignal>);

#[derive(Debug, Default)]
struct CloseSignal {
    notify: Notify,
    why: Mutex<Option<(u32, String)>>,
}

impl Closer for Tcp {
    fn close(&self, code: u32, reason: &str) {
        let mut why = self.0.why.lock().unwrap_or_else(|e| e.into_inner());
        why.get_or_insert_with(|| (code, reason.to_string()));
        self.0.notify.notify_one();
    }
}

impl Tcp {
    /// Waits until the connection is closed from outside; says with which code and why.
    async fn closed(&self) -> (u32, String) {
        loop {
            if let Some(why) = self.0.why.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return why;
            }
            self.0.notify.notified().await;
        }
    }
}
