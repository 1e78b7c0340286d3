//! The global queue's durable records, and the state they rebuild.
//!
//! Every change to the global queue's durable state is an [`Op`]. The ops of one event form a
//! [`Batch`], which the caller must write atomically and in order, then report with
//! `GqEvent::Persisted`. Replaying the written batches into a [`DurableState`] gives exactly the
//! state the queue had when the last of them was made; `GlobalQueue::recover` starts from it.
//!
//! The ops are idempotent upserts and deletes keyed by entity, so a store may keep them as tables
//! (one row per execution, call, join, worker) instead of a growing log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{
    AppName, Attempt, CallId, CallKey, ExecId, GrainName, Incarnation, Seq, WorkerId,
};
use crate::policy::AppSpec;
use crate::time::Time;
use crate::trace_context::TraceParent;
use crate::wire::{AppBundle, Cont, GrainError, JoinSpec, Payload, Reason};

/// The position of a batch in the durable log, from 1 in each gateway incarnation.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default,
)]
pub struct LogIndex(pub u64);

/// How an execution ended.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum Answer {
    /// The chain's final value.
    Value(Payload),
    /// The error of a grain's last failed attempt.
    Error(GrainError),
}

/// Where an execution stands.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum ExecStatus {
    /// Calls are still pending.
    Running,
    /// It has its one answer.
    Done(Answer),
}

/// One accepted execution.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct ExecRecord {
    /// The execution.
    pub exec: ExecId,
    /// The app invoked.
    pub app: AppName,
    /// The client's idempotency key, if it gave one, with what it was given for.
    pub idempotency: Option<Idempotency>,
    /// When it was accepted: its key expires counting from here.
    pub accepted: Time,
    /// When it ended (set with a `Done` status): it is forgotten counting from here.
    pub ended: Option<Time>,
    /// The calls it has made, its entry call included, counted against
    /// [`GqConfig::calls_max`](crate::global_queue::GqConfig::calls_max) while that limits them
    /// (and then kept here, so a restart does not reset the budget).
    pub calls: u32,
    /// Where it stands.
    pub status: ExecStatus,
}

/// A client's idempotency key and the input it came with: the same key with another input is
/// refused, not taken for a retry.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct Idempotency {
    /// The key, as the client sent it.
    pub key: String,
    /// The SHA-256 of the input.
    pub input: [u8; 32],
}

impl Idempotency {
    /// `key` sent with `input`.
    pub fn new(key: String, input: &Payload) -> Self {
        use sha2::Digest;
        Self {
            key,
            input: sha2::Sha256::digest(&input.0).into(),
        }
    }
}

/// The worker incarnation that owns a pending call.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct Owner {
    /// The worker.
    pub worker: WorkerId,
    /// Its incarnation.
    pub incarnation: Incarnation,
}

/// One pending call: everything needed to run it again.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct CallRecord {
    /// The execution.
    pub exec: ExecId,
    /// The call.
    pub call: CallId,
    /// The app.
    pub app: AppName,
    /// The grain.
    pub grain: GrainName,
    /// Its input.
    pub input: Payload,
    /// Where its value goes.
    pub cont: Cont,
    /// The current attempt; results of any other are refused.
    pub attempt: Attempt,
    /// How many attempts failed (crashes of the host not counted).
    pub failures: u32,
    /// Why its current attempt was placed, or its next one will be (never `Resent`).
    pub reason: Reason,
    /// Who runs the current attempt; `None` while it waits to be placed.
    pub owner: Option<Owner>,
    /// Its [`CallSpec::depth_left`](crate::wire::CallSpec::depth_left).
    pub depth_left: u32,
    /// Its [`CallSpec::traceparent`](crate::wire::CallSpec::traceparent).
    pub traceparent: TraceParent,
}

impl CallRecord {
    /// The call's key.
    pub fn key(&self) -> CallKey {
        CallKey::new(self.exec, self.call)
    }
}

/// A fan-out's join, and the branch values recorded so far.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct JoinRecord {
    /// The execution.
    pub exec: ExecId,
    /// The join.
    pub spec: JoinSpec,
    /// One slot per branch, filled once.
    pub contributions: Vec<Option<Payload>>,
    /// Whether the join call was spawned. It is spawned once.
    pub fired: bool,
}

impl JoinRecord {
    /// The join call's key.
    pub fn key(&self) -> CallKey {
        CallKey::new(self.exec, self.spec.call)
    }

    /// Whether every branch has contributed.
    pub fn is_complete(&self) -> bool {
        self.contributions.iter().all(Option::is_some)
    }
}

/// A deployed app: its policies and its code, written together so that no crash can leave one
/// without the other.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct Deployment {
    /// The app's grains and policies.
    pub spec: AppSpec,
    /// Its code, as shipped to workers.
    pub bundle: AppBundle,
}

/// What the gateway knows of a worker.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct WorkerRecord {
    /// Its latest incarnation.
    pub incarnation: Incarnation,
    /// Whether that incarnation was declared dead; everything it says is then refused.
    pub dead: bool,
    /// The last of its progress messages applied.
    pub applied: Seq,
}

/// One change to the durable state.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum Op {
    /// A gateway incarnation started; execution ids use it.
    Epoch(u32),
    /// An app was deployed or replaced, code and all.
    PutApp(Deployment),
    /// An app was removed.
    DelApp(AppName),
    /// An execution was accepted or ended.
    PutExec(ExecRecord),
    /// An ended execution was forgotten.
    DelExec(ExecId),
    /// A call became pending, or changed attempt or owner.
    PutCall(CallRecord),
    /// A call completed or was cancelled.
    DelCall(ExecId, CallId),
    /// A join was made or a branch contributed.
    PutJoin(JoinRecord),
    /// A join is no longer needed.
    DelJoin(ExecId, CallId),
    /// A worker incarnation joined, died, or had progress applied.
    PutWorker(WorkerId, WorkerRecord),
}

/// The ops of one event, to be written atomically and in log order.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct Batch {
    /// Its place in the log.
    pub index: LogIndex,
    /// The changes.
    pub ops: Vec<Op>,
}

/// Everything the global queue keeps across a crash.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default)]
pub struct DurableState {
    /// The latest gateway epoch.
    pub epoch: u32,
    /// Deployed apps.
    pub apps: BTreeMap<AppName, Deployment>,
    /// Executions, running and ended (until forgotten).
    pub execs: BTreeMap<ExecId, ExecRecord>,
    /// Pending calls.
    pub calls: BTreeMap<CallKey, CallRecord>,
    /// Joins of running executions.
    pub joins: BTreeMap<CallKey, JoinRecord>,
    /// Workers.
    pub workers: BTreeMap<WorkerId, WorkerRecord>,
}

impl DurableState {
    /// Applies one op.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Epoch(e) => self.epoch = *e,
            Op::PutApp(a) => {
                self.apps.insert(a.spec.name.clone(), a.clone());
            }
            Op::DelApp(a) => {
                self.apps.remove(a);
            }
            Op::PutExec(e) => {
                self.execs.insert(e.exec, e.clone());
            }
            Op::DelExec(e) => {
                self.execs.remove(e);
            }
            Op::PutCall(c) => {
                self.calls.insert(c.key(), c.clone());
            }
            Op::DelCall(e, c) => {
                self.calls.remove(&CallKey::new(*e, *c));
            }
            Op::PutJoin(j) => {
                self.joins.insert(j.key(), j.clone());
            }
            Op::DelJoin(e, c) => {
                self.joins.remove(&CallKey::new(*e, *c));
            }
            Op::PutWorker(w, r) => {
                self.workers.insert(*w, *r);
            }
        }
    }

    /// Applies every op of a batch, in order.
    pub fn apply_batch(&mut self, batch: &Batch) {
        batch.ops.iter().for_each(|op| self.apply(op));
    }
}
