//! Execution traces: for each call of an execution, which worker ran which attempt, when,
//! whether it came through the local bus or the gateway, whether it was a recovery, and what
//! it printed.
//!
//! Two sources meet here. The gateway sees its own dispatches, each with the [`Reason`] the
//! global queue gave it (a first attempt, a retry, a **recovery** of a call whose owner was
//! lost). Workers send a [`RunTrace`] for each run they finish, best effort. Both are keyed by
//! (execution, call, attempt) in the store, and a worker's account overwrites the gateway's
//! note of the same attempt, keeping its reason.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use sand_api::{CallTrace, Reason as Why, Via};
use sand_protocol::ids::{AppName, Attempt, CallId, ExecId, WorkerId};
use sand_protocol::wire::{CallSpec, Preview, Reason, RunTrace};

use crate::metrics::Metrics;
use crate::store::Trace;
use crate::telemetry::Telemetry;

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

/// Bytes from a worker as text, invalid UTF-8 replaced.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// How long after its execution ends a dispatch's note still waits for its worker's account.
/// Workers trace runs in batches after the fact, so the account of the attempt that ended an
/// execution comes after the end; without its note it would lose its reason (a retry, a
/// recovery) and its dispatch time.
pub const LATE_TRACE_MS: u64 = 10_000;

/// The gateway's side of tracing: what it dispatched, until the worker's account comes; and
/// each account, as a span, to the OTLP collector if there is one.
#[derive(Debug, Default)]
pub struct TraceBook {
    /// Where spans go, if anywhere.
    telemetry: Option<Arc<Telemetry>>,
    /// Dispatches not yet accounted for by their worker, by execution.
    notes: HashMap<ExecId, HashMap<(CallId, Attempt), CallTrace>>,
    /// Ended executions whose notes are kept for late accounts, oldest first, with when they
    /// ended (ms since the Unix epoch).
    ended: VecDeque<(u64, ExecId)>,
}

impl TraceBook {
    /// A book that exports each account it merges to `telemetry`, if given.
    pub fn new(telemetry: Option<Arc<Telemetry>>) -> Self {
        Self {
            telemetry,
            ..Self::default()
        }
    }

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
        let input = Preview::of(&call.input);
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
            input: text(&input.head),
            input_cut: input.cut,
            output: None,
            output_cut: false,
            emitted: Vec::new(),
        };
        let write = stored(call.exec, &entry);
        self.notes
            .entry(call.exec)
            .or_default()
            .insert((call.call, call.attempt), entry);
        Some(write)
    }

    /// Merges a worker's account of its runs with the dispatches noted; returns the writes.
    /// Each run is exported as a span, with the app `app_of` its execution.
    pub fn runs(
        &mut self,
        worker: WorkerId,
        runs: Vec<RunTrace>,
        metrics: &Metrics,
        app_of: impl Fn(ExecId) -> Option<AppName>,
    ) -> Vec<Trace> {
        runs.into_iter()
            .map(|run| {
                let note = self
                    .notes
                    .get_mut(&run.exec)
                    .and_then(|notes| notes.remove(&(run.call, run.attempt)));
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
                    started_ms: Some(run.started_us / 1000),
                    ended_ms: Some(run.ended_us / 1000),
                    error: run.error.clone(),
                    stdout: text(&run.stdout),
                    stderr: text(&run.stderr),
                    input: text(&run.input.head),
                    input_cut: run.input.cut,
                    output_cut: run.output.as_ref().is_some_and(|o| o.cut),
                    output: run.output.as_ref().map(|o| text(&o.head)),
                    emitted: run.emitted.iter().map(ToString::to_string).collect(),
                };
                if let Some(telemetry) = &self.telemetry {
                    telemetry.run(&run, &entry, app_of(run.exec).as_ref());
                }
                stored(run.exec, &entry)
            })
            .collect()
    }

    /// An execution ended at `now_ms`: its notes are forgotten [`LATE_TRACE_MS`] later (a
    /// worker that never reports cannot leak them), at a later end.
    pub fn ended(&mut self, exec: ExecId, now_ms: u64) {
        self.ended.push_back((now_ms, exec));
        while let Some(&(at, old)) = self.ended.front() {
            if at.saturating_add(LATE_TRACE_MS) > now_ms {
                break;
            }
            self.ended.pop_front();
            self.notes.remove(&old);
        }
    }

    /// Forgets an execution's notes at once: it is forgotten, traces and all.
    pub fn forget(&mut self, exec: ExecId) {
        self.notes.remove(&exec);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use sand_protocol::ids::{AppName, GrainName};
    use sand_protocol::trace_context::TraceParent;
    use sand_protocol::wire::{Cont, ErrorKind, GrainError, Payload};

    /// The last attempt of an execution is accounted for after the execution ended: it keeps
    /// its reason while the note waits, and is taken for a local run once the note is gone.
    #[test]
    fn a_late_account_keeps_its_dispatch_reason() {
        let metrics = Metrics::new(&mut Registry::default());
        let mut book = TraceBook::default();
        let spec = |n: u32| {
            let exec = ExecId::new(1, n);
            CallSpec {
                exec,
                call: exec.root_call(),
                attempt: Attempt(2),
                app: AppName::new("app").unwrap(),
                grain: GrainName::new("g").unwrap(),
                input: Payload::from("1"),
                cont: Cont::Client,
                depth_left: 16,
                exec_ref: String::new(),
                traceparent: Default::default(),
            }
        };
        let run = |spec: &CallSpec| RunTrace {
            exec: spec.exec,
            call: spec.call,
            attempt: spec.attempt,
            grain: spec.grain.clone(),
            dispatched: true,
            started_us: 1_000,
            ended_us: 2_000,
            traceparent: TraceParent::default(),
            cold: false,
            error: None,
            stdout: Bytes::new(),
            stderr: Bytes::new(),
            input: Preview::of(&spec.input),
            output: Some(Preview::of(&Payload::from("2"))),
            emitted: Vec::new(),
        };
        let reason = |writes: Vec<Trace>| {
            let trace: CallTrace = serde_json::from_slice(&writes[0].data).unwrap();
            (trace.reason, trace.dispatched_ms)
        };
        let (a, b) = (spec(1), spec(2));
        book.dispatched(WorkerId(1), &a, Reason::Retry, 1_000);
        book.dispatched(WorkerId(1), &b, Reason::Recovery, 1_000);
        book.ended(a.exec, 1_100);
        book.ended(b.exec, 1_100);
        let late = book.runs(WorkerId(1), vec![run(&a)], &metrics, |_| None);
        assert_eq!(reason(late), (Why::Retry, Some(1_000)));
        // Much later, another execution's end forgets b's note.
        book.ended(spec(3).exec, 1_100 + LATE_TRACE_MS);
        let too_late = book.runs(WorkerId(1), vec![run(&b)], &metrics, |_| None);
        assert_eq!(reason(too_late), (Why::Local, None));
        assert!(book.notes.is_empty() && book.ended.len() == 1);
    }

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
            input: "[1]".into(),
            input_cut: false,
            output: None,
            output_cut: false,
            emitted: vec!["00000000000000bb".into()],
        };
        let json = serde_json::to_value(&trace).unwrap();
        // A trace stored before inputs, outputs and emitted calls were traced.
        let mut older = json.clone();
        for field in ["input", "input_cut", "output", "output_cut", "emitted"] {
            older.as_object_mut().unwrap().remove(field);
        }
        let read: CallTrace = serde_json::from_value(older).unwrap();
        assert_eq!((read.input.as_str(), read.emitted.len()), ("", 0));
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
            ErrorKind::OutOfMemory,
            ErrorKind::BadOutput,
            ErrorKind::Unavailable,
            ErrorKind::Budget,
        ]
        .iter()
        .map(|k| {
            let json = serde_json::to_value(k).unwrap();
            assert_eq!(json, k.name(), "name() spells it as JSON does");
            json
        })
        .collect();
        assert_eq!(
            names,
            [
                "raised",
                "crashed",
                "timeout",
                "out_of_memory",
                "bad_output",
                "unavailable",
                "budget"
            ]
        );
    }
}
