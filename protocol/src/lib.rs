//! sand's protocol: the two-level queue and its crash recovery, as pure state machines.
//!
//! This crate is a fully deterministic implementation of the protocol between sand's gateway and
//! its workers. It has no networking code, reads no clock, touches no file, spawns nothing and
//! locks nothing: every input arrives as an event with the current time passed in as a value,
//! every effect leaves as an output the caller drains. The same code is driven by the gateway
//! and worker daemons over QUIC, by the stateright models, and by the crash-schedule simulator.
//!
//! - [`ids`]: executions, calls (derived deterministically from their parent), workers,
//!   incarnations, attempts.
//! - [`wire`]: the messages, the envelopes that keep the drivers' service traffic apart from
//!   them, and their versioned binary encoding.
//! - [`global_queue`]: the gateway's durable record of every pending call and who owns it.
//! - [`local_bus`]: a worker's queue of the calls it runs itself, and its backups.
//! - [`durable`]: the records the global queue persists, and the state they rebuild.
//! - [`disk`]: a gateway's disk in memory, for driving the global queue without I/O.
//! - [`time`]: the time values the caller passes in.
//! - [`trace_context`]: where each run sits in its execution's OpenTelemetry trace.
//! - [`mutations`]: deliberate bugs, off by default, that the checkers must catch.

pub mod disk;
pub mod durable;
pub mod global_queue;
pub mod ids;
pub mod local_bus;
pub mod mutations;
pub mod policy;
pub mod time;
pub mod trace_context;
pub mod wire;
