//! sand's transport seam: how the gateway and its workers reach each other, independent of the
//! network that carries them.
//!
//! - [`seam`]: what the protocol drivers see — a stream of events and a non-blocking sender on
//!   each side. Every transport keeps the same contract.
//! - [`mem`]: the seam in memory, for tests and simulations, with links broken on demand.
//! - What the real transports (`sand-transport-quic`, `sand-transport-tcp`) share: the frame
//!   format ([`framing`]), settings and setup errors ([`config`]), one connection's bounded send
//!   queues and tasks ([`conn`]), the gateway's table of worker connections and the worker's
//!   current connection ([`peers`]), and, with the `tls` feature, the cluster certificates and
//!   the mutual-TLS configuration ([`tls`]).
//! - [`file`]: the atomic file write that certificates and the worker's incarnation use.
//!
//! The transport never re-sends, never reorders within a stream, and never skips a message on a
//! live connection: a message it cannot queue closes the connection instead. Ordering across
//! streams, re-sending after a reconnection, and deduplication are the protocol's job
//! (`sand_protocol`). The whole contract is in [`seam`].

pub mod config;
pub mod conn;
pub mod file;
pub mod framing;
pub mod handshakes;
pub mod mem;
pub mod peers;
pub mod seam;
#[cfg(feature = "tls")]
pub mod tls;
