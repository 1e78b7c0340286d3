//! Execution traces: for each call of an execution, which worker ran which attempt, when,
//! whether it came through the local bus or the gateway, whether it was a recovery, and what
//! it printed.
//!
//! Two sources meet here. The gateway sees its own dispatches, and from the batches it writes
//! it sees when a pending call loses its owner without having failed: the next dispatch of
//! that call is a **recovery** (its worker died, or was declared dead). Workers send a
//! [`RunTrace`] for each run they finish, best effort. Both are keyed by (execution, call,
//! attempt) in the store, and a worker's account overwrites the gateway's note of the same
//! attempt, keeping the recovery flag.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use sand_protocol::durable::{DurableState, Op, Owner};
use sand_protocol::ids::{Attempt, CallId, ExecId, WorkerId};
use sand_protocol::wire::{CallSpec, GrainError, RunTrace};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::store::Trace;

/// Which incarnation of which worker owned a call, and how often it had failed: what the
/// trace book compares to tell a recovery from a retry.
type Ownership = (Option<Owner>, u32);

/// The ops of a batch that concern pending calls, with their keys.
fn call_ops(ops: &[Op]) -> impl Iterator<Item = ((ExecId, CallId), Option<Ownership>)> + '_ {
    ops.iter().filter_map(|op| match op {
        Op::PutCall(rec) => Some(((rec.exec, rec.call), Some((rec.owner, rec.failures)))),
        Op::DelCall(e, c) => Some(((*e, *c), None)),
        _ => None,
    })
}

/// How one attempt of one call went: an entry of `GET /v1/executions/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallTrace {
    /// The call, as printed (16 hex digits).
    pub call: String,
    /// The grain.
    pub grain: String,
    /// The attempt.
    pub attempt: u64,
    /// The worker it ran on.
    pub worker: u32,
    /// `"gateway"` if the gateway dispatched it, `"local"` if its worker's local bus did.
    pub via: String,
    /// True if it re-ran a call whose owner was lost.
    pub recovery: bool,
    /// When the gateway dispatched it (ms since the Unix epoch), if it did.
    pub dispatched_ms: Option<u64>,
    /// When it started on its worker (ms since the Unix epoch), once the worker reported.
    pub started_ms: Option<u64>,
    /// When it ended on its worker.
    pub ended_ms: Option<u64>,
    /// How it failed, if it did.
    pub error: Option<GrainError>,
    /// What it printed on stdout (bounded by the worker; invalid UTF-8 replaced).
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

impl CallTrace {
    /// This entry as the store keeps it.
    pub fn into_write(self, exec: ExecId) -> Trace {
        let call = CallId(u64::from_str_radix(&self.call, 16).unwrap_or_default());
        let data = serde_json::to_vec(&self).unwrap_or_default();
        Trace {
            exec,
            call,
            attempt: Attempt(self.attempt),
            data: Bytes::from(data),
        }
    }
}

/// The gateway's side of tracing: who owned what, and what was dispatched.
#[derive(Debug, Default)]
pub struct TraceBook {
    owners: HashMap<(ExecId, CallId), Ownership>,
    /// Calls that lost their owner without failing: their next dispatch is a recovery.
    orphaned: HashSet<(ExecId, CallId)>,
    /// Dispatches not yet accounted for by their worker.
    notes: HashMap<(ExecId, CallId, Attempt), CallTrace>,
}

impl TraceBook {
    /// A book that knows the owners of the calls pending in `state`.
    pub fn new(state: &DurableState) -> Self {
        let owners = state
            .calls
            .iter()
            .map(|(k, c)| (*k, (c.owner, c.failures)))
            .collect();
        Self {
            owners,
            ..Self::default()
        }
    }

    /// Learns from a batch which calls changed owner.
    pub fn observe(&mut self, ops: &[Op]) {
        for (key, now) in call_ops(ops) {
            match now {
                None => {
                    self.owners.remove(&key);
                    self.orphaned.remove(&key);
                }
                Some((owner, failures)) => {
                    if let Some((before, failed_before)) =
                        self.owners.insert(key, (owner, failures))
                    {
                        if failures != failed_before {
                            self.orphaned.remove(&key); // A retry, not a recovery.
                        } else if before.is_some() && before != owner {
                            self.orphaned.insert(key);
                        }
                    }
                }
            }
        }
    }

    /// Notes a dispatch; returns the trace entry to write, flagged if it is a recovery.
    pub fn dispatched(&mut self, worker: WorkerId, call: &CallSpec, now_ms: u64) -> CallTrace {
        let key = (call.exec, call.call);
        let recovery = self.orphaned.remove(&key);
        let entry = CallTrace {
            call: call.call.to_string(),
            grain: call.grain.to_string(),
            attempt: call.attempt.0,
            worker: worker.0,
            via: "gateway".into(),
            recovery,
            dispatched_ms: Some(now_ms),
            started_ms: None,
            ended_ms: None,
            error: None,
            stdout: String::new(),
            stderr: String::new(),
        };
        self.notes
            .insert((call.exec, call.call, call.attempt), entry.clone());
        entry
    }

    /// Merges a worker's account of its runs with the dispatches noted; returns the writes.
    pub fn runs(&mut self, worker: WorkerId, runs: Vec<RunTrace>, metrics: &Metrics) -> Vec<Trace> {
        runs.into_iter()
            .map(|run| {
                let note = self.notes.remove(&(run.exec, run.call, run.attempt));
                if !run.dispatched {
                    metrics.local_hops.inc();
                }
                CallTrace {
                    call: run.call.to_string(),
                    grain: run.grain.to_string(),
                    attempt: run.attempt.0,
                    worker: worker.0,
                    via: if run.dispatched { "gateway" } else { "local" }.into(),
                    recovery: note.as_ref().is_some_and(|n| n.recovery),
                    dispatched_ms: note.and_then(|n| n.dispatched_ms),
                    started_ms: Some(run.started_ms),
                    ended_ms: Some(run.ended_ms),
                    error: run.error,
                    stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
                }
                .into_write(run.exec)
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
    use sand_protocol::durable::{CallRecord, Owner};
    use sand_protocol::ids::{AppName, GrainName, Incarnation};
    use sand_protocol::wire::{Cont, Payload};

    fn record(owner: Option<u32>, failures: u32) -> CallRecord {
        let exec = ExecId::new(1, 0);
        CallRecord {
            exec,
            call: exec.root_call(),
            app: AppName::new("a").unwrap(),
            grain: GrainName::new("g").unwrap(),
            input: Payload::new(&b"1"[..]),
            cont: Cont::Client,
            attempt: Attempt(1),
            failures,
            owner: owner.map(|w| Owner {
                worker: WorkerId(w),
                incarnation: Incarnation(1),
            }),
        }
    }

    fn dispatch(book: &mut TraceBook, rec: &CallRecord) -> bool {
        let spec = CallSpec {
            exec: rec.exec,
            call: rec.call,
            attempt: rec.attempt,
            app: rec.app.clone(),
            grain: rec.grain.clone(),
            input: rec.input.clone(),
            cont: rec.cont,
        };
        book.dispatched(WorkerId(9), &spec, 0).recovery
    }

    #[test]
    fn a_lost_owner_makes_the_next_dispatch_a_recovery() {
        let mut book = TraceBook::default();
        book.observe(&[Op::PutCall(record(Some(1), 0))]);
        assert!(!dispatch(&mut book, &record(Some(1), 0)));
        book.observe(&[Op::PutCall(record(None, 0))]);
        book.observe(&[Op::PutCall(record(Some(2), 0))]);
        assert!(dispatch(&mut book, &record(Some(2), 0)));
        assert!(!dispatch(&mut book, &record(Some(2), 0)), "flagged once");
    }

    #[test]
    fn a_retry_after_a_failure_is_not_a_recovery() {
        let mut book = TraceBook::default();
        book.observe(&[Op::PutCall(record(Some(1), 0))]);
        book.observe(&[Op::PutCall(record(None, 1))]);
        book.observe(&[Op::PutCall(record(Some(2), 1))]);
        assert!(!dispatch(&mut book, &record(Some(2), 1)));
    }
}
