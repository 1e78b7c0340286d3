//! sand's protocol, checked. Everything here drives the real `GlobalQueue` and `LocalBus` from
//! `sand-protocol`; nothing re-implements the protocol.
//!
//! - [`model`]: a stateright actor model of clients, a gateway and workers, explored
//!   exhaustively for safety, liveness and reachability properties.
//! - [`sim`]: a crash-schedule simulator of a gateway and many workers, deterministic from a
//!   seed, checking safety after every step and liveness after healing; failing schedules are
//!   shrunk and saved for replay.
//! - [`promises`]: what the gateway promises when it speaks, and whether its disk holds it.
//! - [`check`]: runs the model checker on a model and reports a verdict and a trace per
//!   property.

pub mod check;
pub mod model;
pub mod promises;
pub mod sim;
