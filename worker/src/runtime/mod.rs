//! Grain runtimes: how the worker runs one call of a grain and gets its result back.
//!
//! - [`launch`]: the seam to the place processes run (a sandbox, or the host).
//! - [`zygote`]: the `python` and `rust` runtimes: one pre-initialised zygote process per grain
//!   that forks an instance per call, over the fd-3 wire of [`sand_grain::wire`].
//! - [`exec`]: the `exec` runtime, the naive baseline: a fresh process per call.
//! - [`python`]: the Python zygote runtime shipped inside the worker binary.
//!
//! Every runtime answers a [`CallRequest`] with a [`CallReport`] and never panics on what a
//! grain does: a grain's failure is a [`GrainResult::Error`].

use std::time::Instant;

use bytes::Bytes;
use sand_protocol::ids::{Attempt, CallId};
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::{Payload, MESSAGE_BYTES_MAX};

pub mod exec;
mod fd_passing;
pub mod handoff;
pub mod launch;
mod output;
pub mod python;
pub mod zygote;

pub use launch::Exit;

/// One attempt of one call, as a runtime runs it.
#[derive(Clone, Debug)]
pub struct CallRequest {
    /// The execution it belongs to, as the API names it (the handler sees it as `ctx.exec`).
    pub exec: String,
    /// The call (`ctx.call`).
    pub call: CallId,
    /// The attempt (`ctx.attempt`).
    pub attempt: Attempt,
    /// The run's W3C `traceparent` (`ctx.trace`); empty for no trace.
    pub trace: String,
    /// The input, a JSON text.
    pub input: Payload,
    /// How long the handler may run; past it the instance is killed.
    pub timeout: Option<std::time::Duration>,
}

/// What became of a call.
#[derive(Clone, Debug)]
pub struct CallReport {
    /// The grain's result, or the error it ended in.
    pub result: GrainResult,
    /// What the call wrote to stdout: at most [`CAPTURE_BYTES_MAX`] bytes, followed by
    /// [`TRUNCATED_MARK`] if it wrote more.
    pub stdout: Bytes,
    /// What the call wrote to stderr, bounded the same way.
    pub stderr: Bytes,
    /// When the call left the line and was handed to an instance.
    pub started: Instant,
    /// When its result (or failure) was known.
    pub finished: Instant,
    /// Whether an instance started for the call ran it (it had served no call before): a
    /// cold start. False when no instance answered.
    pub cold: bool,
    /// How the instance that ran it died, when it died without answering. A SIGKILL here
    /// within a memory-limited sandbox whose OOM counter went up is an out-of-memory kill:
    /// the caller, who can read that counter, turns `Crashed` into `OutOfMemory`.
    pub instance_exit: Option<Exit>,
}

impl CallReport {
    /// Whether the instance died of SIGKILL without answering (see `instance_exit`).
    pub fn killed_by_sigkill(&self) -> bool {
        self.instance_exit.is_some_and(Exit::is_sigkill)
    }

    fn failed(error: sand_protocol::wire::GrainError, started: Instant) -> Self {
        Self {
            result: GrainResult::Error(error),
            stdout: Bytes::new(),
            stderr: Bytes::new(),
            started,
            finished: Instant::now(),
            cold: false,
            instance_exit: None,
        }
    }
}

/// The most bytes of a call's stdout, and of its stderr, a report keeps.
pub const CAPTURE_BYTES_MAX: usize = sand_grain::wire::CAPTURE_BYTES_MAX;

// The grain's wire bounds a result by the same number as the worker's own messages.
const _: () = assert!(sand_grain::wire::MESSAGE_BYTES_MAX == MESSAGE_BYTES_MAX);

/// Appended to captured output that was cut at [`CAPTURE_BYTES_MAX`].
pub const TRUNCATED_MARK: &str = "...[truncated]";

/// Captured output as a report keeps it: the head, marked when there was more.
fn bounded_capture(head: &[u8], total: u64) -> Bytes {
    let keep = &head[..head.len().min(CAPTURE_BYTES_MAX)];
    if total as usize > keep.len() || head.len() > keep.len() {
        let mut out = keep.to_vec();
        out.extend_from_slice(TRUNCATED_MARK.as_bytes());
        Bytes::from(out)
    } else {
        Bytes::copy_from_slice(keep)
    }
}
