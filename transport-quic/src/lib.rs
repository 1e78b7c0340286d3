//! sand's transport: how the gateway and its workers reach each other.
//!
//! - [`seam`]: what the protocol drivers see — a stream of events and a non-blocking sender on
//!   each side. Both implementations below keep the same contract.
//! - [`quic`]: QUIC (quinn) with mutual TLS. The gateway is the server, each worker a client
//!   that reconnects by itself. Small control messages share one ordered stream; each
//!   payload-carrying message gets a stream of its own, so a large payload never delays a
//!   heartbeat.
//! - [`mem`]: the same seam in memory, for tests and simulations, with links broken on demand.
//! - [`certs`]: the cluster CA and the certificates of the gateway and workers.
//!
//! The transport never re-sends, never reorders within a stream, and never skips a message on a
//! live connection: a message it cannot queue closes the connection instead. Ordering across
//! streams, re-sending after a reconnection, and deduplication are the protocol's job
//! (`sand_protocol`). The whole contract is in [`seam`].

pub mod certs;
mod framing;
pub mod mem;
pub mod quic;
pub mod seam;
