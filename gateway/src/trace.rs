//! Execution traces: for each call of an execution, which worker ran which attempt, when,
//! whether it came through the local bus or the gateway, whether it was a recovery, and what
//! it printed.
//!
//! Two sources meet here. The gateway sees its own dispatches, each with the [`Reason`] the
//! global queue gave it (a first attempt, a retry, a **recovery** of a call whose owner was
//! lost). Workers send a [`RunTrace`] for each run they finish, best effort. Both are keyed by
//! (execution, call, attempt) in the store, and a worker's account overwrites the gateway's
//! note of the same attempt, keeping its reason.

use std::collections::HashMap;

use bytes::Bytes;
use sand_api::{CallTrace, Reason as Why, Via};
use sand_protocol::ids::{Attempt, CallId, ExecId, WorkerId};
use sand_protocol::wire::{CallSpec, Reason, RunTrace};

use crate::metrics::Metrics;
use crate::store::Trace;

/// A trace entry as the store keeps it.
fn stored(exec: ExecId, entry: &CallTrace) -> Trace {
    let call = CallId(u64::from_str_radix(&entry.call, 16).unwrap_or_default());
    let data = serde_json::to_vec(entry).unwrap_or_default();
    Trace {
        exec,
        call,
        attempt: Attempt(entry.attempt),
        data: Bytes::from(data),
    }
}

/// The gateway's side of tracing: what it dispatched, until the worker's account comes.
#[derive(Debug, Default)]
pub struct TraceBook {
    /// Dispatches not yet accounted for by their worker.
    notes: HashMap<(ExecId, CallId, Attempt), CallTrace>,
}

impl TraceBook {
    /// Notes a dispatch; returns the trace entry to write, or `None` for a re-sent attempt,
    /// whose entry its first dispatch wrote.
    pub fn dispatched(
        &mut self,
        worker: WorkerId,
        call: &CallSpec,
        reason: Reason,
        now_ms: u64,
    ) -> Option<Trace> {
        let reason = match reason {
            Reason::First => Why::First,
            Reason::Retry => Why::Retry,
            Reason::Recovery => Why::Recovery,
            Reason::Resent => return None,
        };
        let entry = CallTrace {
            call: call.call.to_string(),
            grain: call.grain.to_string(),
            attempt: call.attempt.0,
            worker: worker.0,
            via: Via::Gateway,
            reason,
            recovery: reason == Why::Recovery,
            dispatched_ms: Some(now_ms),
            started_ms: None,
            ended_ms: None,
            error: None,
            stdout: String::new(),
            stderr: String::new(),
        };
        let write = stored(call.exec, &entry);
        self.notes
            .insert((call.exec, call.call, call.attempt), entry);
        Some(write)
    }

    /// Merges a worker's account of its runs with the dispatches noted; returns the writes.
    pub fn runs(&mut self, worker: WorkerId, runs: Vec<RunTrace>, metrics: &Metrics) -> Vec<Trace> {
        runs.into_iter()
            .map(|run| {
                let note = self.notes.remove(&(run.exec, run.call, run.attempt));
                if !run.dispatched {
                    metrics.local_hops.inc();
                }
                let entry = CallTrace {
                    call: run.call.to_string(),
                    grain: run.grain.to_string(),
                    attempt: run.attempt.0,
                    worker: worker.0,
                    via: if run.dispatched {
                        Via::Gateway
                    } else {
                        Via::Local
                    },
                    reason: note.as_ref().map_or(Why::Local, |n| n.reason),
                    recovery: note.as_ref().is_some_and(|n| n.recovery),
                    dispatched_ms: note.and_then(|n| n.dispatched_ms),
                    started_ms: Some(run.started_ms),
                    ended_ms: Some(run.ended_ms),
                    error: run.error,
                    stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
                };
                stored(run.exec, &entry)
            })
            .collect()
    }

    /// Forgets the notes of an ended execution (a worker that never reports cannot leak them).
    pub fn ended(&mut self, exec: ExecId) {
        self.notes.retain(|(e, _, _), _| *e != exec);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sand_protocol::wire::{ErrorKind, GrainError};

    #[test]
    fn error_kinds_are_snake_case_and_old_traces_still_read() {
        let trace = CallTrace {
            call: "00000000000000aa".into(),
            grain: "g".into(),
            attempt: 1,
            worker: 1,
            via: Via::Local,
            reason: Why::Local,
            recovery: false,
            dispatched_ms: None,
            started_ms: Some(1),
            ended_ms: Some(2),
            error: Some(GrainError::new(ErrorKind::OutOfMemory, "killed")),
            stdout: String::new(),
            stderr: String::new(),
        };
        let json = serde_json::to_value(&trace).unwrap();
        assert_eq!(json["error"]["kind"], "out_of_memory");
        // A trace stored before the names were snake_case.
        let mut old = json;
        old["error"]["kind"] = "OutOfMemory".into();
        let read: CallTrace = serde_json::from_value(old).unwrap();
        assert_eq!(read.error.unwrap().kind, ErrorKind::OutOfMemory);
        let names: Vec<serde_json::Value> = [
            ErrorKind::Raised,
            ErrorKind::Crashed,
            ErrorKind::Timeout,
            ErrorKind::BadOutput,
            ErrorKind::Unavailable,
            ErrorKind::Budget,
        ]
        .iter()
        .map(|k| serde_json::to_value(k).unwrap())
        .collect();
        assert_eq!(
            names,
            [
                "raised",
                "crashed",
                "timeout",
                "bad_output",
                "unavailable",
                "budget"
            ]
        );
    }
}
