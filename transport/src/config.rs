//! The settings of a real transport's endpoints, and why an endpoint could not be set up.

use std::time::Duration;

use sand_protocol::wire::MESSAGE_BYTES_MAX;

use crate::conn::FRAME_COST_BYTES;

/// Settings of the gateway's and workers' endpoints, the same for every real transport.
/// [`LinkConfig::default`] suits a cluster on a LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// How often an idle connection sends a keep-alive. Must be below `idle_timeout`.
    pub keep_alive_interval: Duration,
    /// How long a connection may hear nothing before it is closed as dead.
    pub idle_timeout: Duration,
    /// The bytes of frames queued for one peer and not yet written, past which `send` returns
    /// `Overflowed` and the connection is closed. At least one largest frame must fit.
    pub send_queue_bytes_max: usize,
    /// The messages received from one peer and not yet taken by the driver, past which reading
    /// from that peer pauses (and flow control slows the peer down).
    pub recv_queue_len_max: usize,
    /// The most payload frames written at once per connection and direction (on QUIC, streams
    /// open at once; TCP writes one at a time whatever this says).
    pub payload_streams_max: u32,
    /// How long the handshake and the control-stream greeting may take.
    pub open_timeout: Duration,
    /// The gateway's cap on connections in their handshake and greeting at once, before the
    /// peer is known to be a worker; more are refused at once. Workers ignore it.
    pub handshakes_max: usize,
    /// The first delay before a worker reconnects; doubled after each failed attempt.
    pub reconnect_delay_min: Duration,
    /// The longest delay between a worker's reconnection attempts.
    pub reconnect_delay_max: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            keep_alive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            send_queue_bytes_max: 4 * MESSAGE_BYTES_MAX,
            recv_queue_len_max: 1024,
            payload_streams_max: 16,
            open_timeout: Duration::from_secs(5),
            handshakes_max: 64,
            reconnect_delay_min: Duration::from_millis(100),
            reconnect_delay_max: Duration::from_secs(5),
        }
    }
}

/// The smallest `send_queue_bytes_max`: one largest frame and its bookkeeping.
pub const SEND_QUEUE_BYTES_MIN: usize = MESSAGE_BYTES_MAX + FRAME_COST_BYTES;

impl LinkConfig {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |why: &'static str| Err(TransportError::Config(why));
        if self.keep_alive_interval.is_zero() || self.keep_alive_interval >= self.idle_timeout {
            return bad("keep_alive_interval must be above zero and below idle_timeout");
        }
        if self.send_queue_bytes_max < SEND_QUEUE_BYTES_MIN {
            return bad("send_queue_bytes_max must hold at least one largest frame");
        }
        if self.recv_queue_len_max == 0 || self.payload_streams_max == 0 || self.handshakes_max == 0
        {
            return bad(
                "recv_queue_len_max, payload_streams_max and handshakes_max must be above zero",
            );
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
}

/// Which real transport carries the gateway's link to its workers. Gateway and workers must
/// use the same one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// QUIC over UDP (`sand-transport-quic`): a stream per payload, so a large payload never
    /// delays a heartbeat.
    #[default]
    Quic,
    /// TCP with TLS 1.3 (`sand-transport-tcp`), for networks that block UDP: every frame in
    /// one byte stream, so a heartbeat may wait behind a large payload.
    Tcp,
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quic" => Ok(Self::Quic),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!(
                "unknown transport {other:?}: expected `quic` or `tcp`"
            )),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        })
    }
}

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The settings contradict each other.
    #[error("invalid transport settings: {0}")]
    Config(&'static str),
    /// The certificates or key cannot make a TLS configuration.
    #[cfg(feature = "tls")]
    #[error("invalid TLS identity: {0}")]
    Tls(#[from] rustls::Error),
    /// The cluster CA certificate cannot verify clients.
    #[cfg(feature = "tls")]
    #[error("the cluster CA certificate cannot verify workers: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration lacks what the transport needs.
    #[error("the TLS configuration cannot carry the transport: {0}")]
    Crypto(String),
    /// The server name is not a DNS name or IP address.
    #[error("{0:?} is not a valid gateway name (a DNS name or an IP address)")]
    ServerName(String),
    /// The socket could not be opened (or no tokio runtime is running).
    #[error("cannot open a socket on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(LinkConfig::default().validate().is_ok());
        let bad = [
            LinkConfig {
                keep_alive_interval: Duration::from_secs(5),
                ..LinkConfig::default()
            },
            LinkConfig {
                send_queue_bytes_max: SEND_QUEUE_BYTES_MIN - 1,
                ..LinkConfig::default()
            },
            LinkConfig {
                payload_streams_max: 0,
                ..LinkConfig::default()
            },
            LinkConfig {
                handshakes_max: 0,
                ..LinkConfig::default()
            },
            LinkConfig {
                reconnect_delay_min: Duration::from_secs(10),
                ..LinkConfig::default()
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
