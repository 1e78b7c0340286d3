//! The checker: the properties of a run, judged only from what the world observed, as
//! TigerBeetle's VOPR keeps its checkers apart from its cluster. It never holds a state machine:
//! the world hands it values — the gateway's outputs, each batch the disk writes (with the disk
//! before it), what clients were told and shown, the attempts workers started, and what the
//! gateway's record, timers and look-ups show after a step. A violation is a [`Violation`],
//! which the world turns into a [`Failure`] with the step and the time.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

use sand_protocol::durable::{Answer, Batch, DurableState, ExecStatus, LogIndex, Op, Owner};
use sand_protocol::global_queue::{GqOutput, GqTimer};
use sand_protocol::ids::{Attempt, CallId, CallKey, ExecId, Incarnation, RunKey, WorkerId};
use sand_protocol::trace_context::TraceParent;
use sand_protocol::wire::{CallSpec, ErrorKind, Reason, ToGateway, ToWorker};
use serde::{Deserialize, Serialize};

use super::describe_gq;
use super::schedule::Program;
use crate::promises;

/// A property the simulator checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Property {
    /// Each execution is answered at most once.
    OneAnswer,
    /// Every answer is the chain's value, the refusing grain's error after its last retry, or
    /// (only if one of its attempts hit its deadline) a timeout error.
    CorrectAnswer,
    /// Each idempotency key names one execution: the one the disk holds for it, if any, and
    /// otherwise, within one gateway life, the first one named. Only an execution whose
    /// acceptance a gateway crash lost may be replaced by a new one.
    OneExecutionPerKey,
    /// An answer never changes once given: the execution's record says the same for good,
    /// across gateway restarts.
    AnswerStays,
    /// Once a client is told its execution is accepted, every look-up finds the execution,
    /// across gateway restarts: the record a look-up shows is never older than what the gateway
    /// confirmed.
    AcceptedStaysVisible,
    /// No ack, welcome, fence, cancel, abort, acceptance or answer leaves before the state behind
    /// it is durable.
    DurableBeforeVisible,
    /// A call completed in the durable history never becomes pending again.
    CompletedStaysCompleted,
    /// A join is fired at most once in the durable history.
    JoinFiresOnce,
    /// A message from a fenced incarnation changes nothing in the gateway.
    FencedChangesNothing,
    /// Every pending call is owned by a live incarnation, or waits for a retry, or no worker is
    /// connected to take it.
    CallsOwned,
    /// A worker starts each attempt of a call at most once per incarnation.
    StartsOnce,
    /// The gateway accepts every invocation of the deployed app.
    Accepts,
    /// After healing, every request and every running execution is answered and every backlog
    /// drains, in bounded time, with at least one worker left.
    Liveness,
    /// Every dispatch says why it was sent, as the history of its call shows: a recovery if
    /// its owner was lost since it was last placed, else a retry if an attempt failed, else a
    /// first attempt.
    DispatchReason,
    /// Every run hangs from the span of a run of the call that emitted it (the invocation's
    /// span, for an entry call), in its execution's trace: across retries, recoveries and
    /// gateway restarts, an execution's spans stay one tree.
    TraceTree,
    /// Nothing panics.
    NoPanic,
    /// The same schedule gives the same trace.
    Deterministic,
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Property::OneAnswer => "one answer per execution",
            Property::CorrectAnswer => "every answer is correct",
            Property::OneExecutionPerKey => "one execution per idempotency key",
            Property::AnswerStays => "an answer never changes once given",
            Property::AcceptedStaysVisible => "an accepted execution stays visible",
            Property::DurableBeforeVisible => "durable before visible",
            Property::CompletedStaysCompleted => "a completed call stays completed",
            Property::JoinFiresOnce => "a join fires once",
            Property::FencedChangesNothing => "a fenced incarnation changes nothing",
            Property::CallsOwned => "every pending call has a live owner or is about to be placed",
            Property::StartsOnce => "a worker starts each attempt at most once per incarnation",
            Property::Accepts => "the gateway accepts invocations",
            Property::Liveness => "every request is answered after healing",
            Property::DispatchReason => "a dispatch says why it was sent",
            Property::TraceTree => "every run hangs from a run of the call that emitted it",
            Property::NoPanic => "nothing panics",
            Property::Deterministic => "the same schedule gives the same trace",
        })
    }
}

/// A property violated by a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Which property.
    pub property: Property,
    /// The index of the step during which it was violated; `None` in setup or the liveness phase.
    pub step: Option<usize>,
    /// The simulated time, in milliseconds.
    pub at_ms: u64,
    /// What happened.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.step {
            Some(step) => write!(f, "{} violated at step {step}", self.property)?,
            None => write!(f, "{} violated after the faults", self.property)?,
        }
        write!(f, " (t = {} ms): {}", self.at_ms, self.message)
    }
}

impl std::error::Error for Failure {}

/// A property violated, as the checker saw it; the world adds when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Violation {
    pub(super) property: Property,
    pub(super) message: String,
}

/// What a check returns.
pub(super) type Verdict = Result<(), Violation>;

/// More branches than any fan-out of a simulated program has.
const BRANCHES_MAX: u32 = 64;

/// Whether `parent` emits `call`: as its `next`, a branch of its fan-out, or its join.
fn emits(parent: CallId, call: CallId) -> bool {
    call == parent.join() || (0..BRANCHES_MAX).any(|i| parent.child(i) == call)
}

fn violated(property: Property, message: String) -> Verdict {
    Err(Violation { property, message })
}

/// Everything the checker remembers of a run, from observations alone.
pub(super) struct Checker {
    program: Program,
    /// Each execution's input, as its client was told it was named.
    inputs: BTreeMap<ExecId, u32>,
    /// The answer each execution gave.
    answers: BTreeMap<ExecId, Answer>,
    /// The executions whose acceptance the gateway confirmed.
    confirmed: BTreeSet<ExecId>,
    /// The execution each request was named, and in which of the gateway's lives.
    named: BTreeMap<usize, (ExecId, u64)>,
    /// The execution the disk holds for each idempotency key.
    durable_keys: BTreeMap<String, ExecId>,
    /// Executions one of whose attempts hit its deadline: they may fail with a timeout.
    timed_out: BTreeSet<ExecId>,
    /// Calls deleted in the durable history.
    deleted: BTreeSet<CallKey>,
    /// Joins fired in the durable history.
    fired: BTreeSet<CallKey>,
    /// Each pending call's history as the gateway's current life wrote it, and as the disk
    /// holds it: what a dispatch's reason is checked against.
    placements: Placements,
    durable_placements: Placements,
    /// The last batch the gateway's current life handed out, and the last one written.
    logged: LogIndex,
    written: LogIndex,
    /// The app changes asked of the gateway's current life and not yet told, oldest first:
    /// each with the batch that must be written before it is told (its own, or, for a removal
    /// that finds nothing, the last one before it).
    changes: VecDeque<LogIndex>,
    /// The attempts each worker's current incarnation started.
    started: BTreeMap<usize, BTreeSet<RunKey>>,
    /// The span each execution was invoked under.
    invocations: BTreeMap<ExecId, TraceParent>,
    /// The span of every run started, with its call.
    spans: BTreeMap<[u8; 8], (ExecId, CallId)>,
}

impl Checker {
    pub(super) fn new(program: Program) -> Self {
        Self {
            program,
            inputs: BTreeMap::new(),
            answers: BTreeMap::new(),
            confirmed: BTreeSet::new(),
            named: BTreeMap::new(),
            durable_keys: BTreeMap::new(),
            timed_out: BTreeSet::new(),
            deleted: BTreeSet::new(),
            fired: BTreeSet::new(),
            placements: Placements::default(),
            durable_placements: Placements::default(),
            logged: LogIndex(0),
            written: LogIndex(0),
            changes: VecDeque::new(),
            started: BTreeMap::new(),
            invocations: BTreeMap::new(),
            spans: BTreeMap::new(),
        }
    }

    /// How many executions were answered, each checked.
    pub(super) fn answered(&self) -> u64 {
        self.answers.len() as u64
    }

    // --- the gateway's outputs -----------------------------------------------------------------

    /// One drain of the gateway's outputs, before any is looked at: the history first, as a
    /// dispatch may come out before the batch that records it.
    pub(super) fn outputs(&mut self, outputs: &[GqOutput]) {
        for out in outputs {
            if let GqOutput::Persist(batch) = out {
                self.placements.observe(batch);
            }
        }
    }

    /// One output of the gateway, with the disk as it is when the output leaves. An answer is
    /// checked as told to its client ([`Checker::answer`]).
    pub(super) fn output(&mut self, store: &DurableState, out: &GqOutput) -> Verdict {
        if !promises::is_durable(store, out) {
            let why = format!("{} before the disk held it", describe_gq(out).trim());
            return violated(Property::DurableBeforeVisible, why);
        }
        match out {
            GqOutput::Persist(batch) => self.logged = batch.index,
            GqOutput::Send(_, ToWorker::Dispatch { call, reason, .. }) => {
                if let Err(why) = self.placements.dispatched(call, *reason) {
                    return violated(Property::DispatchReason, why);
                }
            }
            // A later change may be durable too, and undo what this one did: what must be
            // written is its own batch.
            GqOutput::ConfirmDeploy(_) | GqOutput::ConfirmRemove { .. } => {
                let needs = self.changes.pop_front();
                if needs.is_none_or(|needs| needs > self.written) {
                    let why = format!(
                        "{} before the disk held it (it needs batch {needs:?}; written: {:?})",
                        describe_gq(out).trim(),
                        self.written
                    );
                    return violated(Property::DurableBeforeVisible, why);
                }
            }
            GqOutput::ConfirmInvoke(exec) => {
                self.confirmed.insert(*exec);
            }
            GqOutput::Send(..) | GqOutput::Respond(..) => {}
        }
        Ok(())
    }

    /// An operator asks for an app change; `writes` says whether it changes the queue's apps
    /// (a removal of an app it does not have writes nothing).
    pub(super) fn change_asked(&mut self, writes: bool) {
        let needs = if writes {
            LogIndex(self.logged.0 + 1)
        } else {
            self.logged
        };
        self.changes.push_back(needs);
    }

    /// A batch reaches the disk, which holds `store` before it.
    pub(super) fn written(&mut self, store: &DurableState, batch: &Batch) -> Verdict {
        self.written = batch.index;
        self.durable_placements.observe(batch);
        for op in &batch.ops {
            match op {
                Op::PutCall(c) if self.deleted.contains(&c.key()) => {
                    let why = format!("{:?} {:?} became pending again: {c:?}", c.exec, c.call);
                    return violated(Property::CompletedStaysCompleted, why);
                }
                Op::DelCall(e, c) => {
                    self.deleted.insert(CallKey::new(*e, *c));
                }
                Op::PutExec(e)
                    if self
                        .answers
                        .get(&e.exec)
                        .is_some_and(|a| e.status != ExecStatus::Done(a.clone())) =>
                {
                    let why = format!(
                        "{:?} was answered, but the disk's record becomes {e:?}",
                        e.exec
                    );
                    return violated(Property::AnswerStays, why);
                }
                Op::PutExec(e) => {
                    if let Some(id) = &e.idempotency {
                        self.durable_keys.insert(id.key.clone(), e.exec);
                    }
                }
                Op::DelExec(e) => self.durable_keys.retain(|_, x| x != e),
                Op::PutJoin(j) if j.fired => {
                    let key = j.key();
                    let was = store.joins.get(&key).is_some_and(|d| d.fired);
                    if !was && !self.fired.insert(key) {
                        let why = format!("the join {key:?} fired twice");
                        return violated(Property::JoinFiresOnce, why);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The gateway crashed: its next life starts from what the disk holds.
    pub(super) fn gateway_crashed(&mut self) {
        (self.logged, self.written) = (LogIndex(0), LogIndex(0));
        self.placements = self.durable_placements.clone();
        self.changes.clear(); // Their operators' connections broke with it.
    }

    /// A gateway timer fired.
    pub(super) fn timer_fired(&mut self, timer: GqTimer) {
        if let GqTimer::Deadline(CallKey { exec, .. }) = timer {
            self.timed_out.insert(exec);
        }
    }

    // --- what clients were told and shown ------------------------------------------------------

    /// Request `r`, with `input`, was named `exec` by the gateway in its life `life`. Its key
    /// names one execution: the one the disk holds for it, if any; and within one gateway life,
    /// the one named first. Only an execution whose acceptance a crash lost (it never reached
    /// the disk) may be replaced, by the retry after the crash.
    pub(super) fn named(
        &mut self,
        r: usize,
        key: &str,
        input: u32,
        exec: ExecId,
        life: u64,
    ) -> Verdict {
        let durable = self.durable_keys.get(key).map(|e| (*e, "the disk holds"));
        let named = self
            .named
            .get(&r)
            .filter(|(_, l)| *l == life)
            .map(|(e, _)| (*e, "this gateway life named"));
        for (want, why) in durable.into_iter().chain(named) {
            if want != exec {
                let why = format!("request {key} was given {exec:?}, but {why} {want:?} for it");
                return violated(Property::OneExecutionPerKey, why);
            }
        }
        self.named.insert(r, (exec, life));
        self.inputs.insert(exec, input);
        Ok(())
    }

    /// A client was told `exec`'s answer: by the gateway, or read from its durable record.
    pub(super) fn answer(&mut self, exec: ExecId, answer: Answer) -> Verdict {
        if let Some(first) = self.answers.get(&exec) {
            let why = format!("{exec:?} answered twice: {first:?}, then {answer:?}");
            return violated(Property::OneAnswer, why);
        }
        let Some(input) = self.inputs.get(&exec).copied() else {
            let why = format!("{exec:?} answered {answer:?} but was never invoked");
            return violated(Property::CorrectAnswer, why);
        };
        let expected = self.program.expected(input);
        let timeout = matches!(&answer, Answer::Error(e) if e.kind == ErrorKind::Timeout);
        if answer != expected && !(timeout && self.timed_out.contains(&exec)) {
            let why = format!("{exec:?} with input {input} answered {answer:?}, not {expected:?}");
            return violated(Property::CorrectAnswer, why);
        }
        self.answers.insert(exec, answer);
        Ok(())
    }

    /// A client's look-up of `exec` showed `shown`, while the disk held `store`: an answer it
    /// shows must be on disk, and the one given, if one was.
    pub(super) fn looked_up(&self, store: &DurableState, exec: ExecId, shown: &Answer) -> Verdict {
        let on_disk = store.execs.get(&exec).map(|e| &e.status);
        if on_disk != Some(&ExecStatus::Done(shown.clone())) {
            let why = format!("a look-up of {exec:?} showed {shown:?}; the disk holds {on_disk:?}");
            return violated(Property::DurableBeforeVisible, why);
        }
        if let Some(given) = self.answers.get(&exec).filter(|a| *a != shown) {
            let why =
                format!("a look-up of {exec:?} showed {shown:?}, but it was answered {given:?}");
            return violated(Property::AnswerStays, why);
        }
        Ok(())
    }

    // --- the workers ---------------------------------------------------------------------------

    /// Worker `w`, as `incarnation`, started an attempt: at most once per incarnation, and
    /// under the span of a run of the call that emitted it.
    pub(super) fn started(
        &mut self,
        w: usize,
        incarnation: Incarnation,
        spec: &CallSpec,
    ) -> Verdict {
        let run = spec.run_key();
        if !self.started.entry(w).or_default().insert(run) {
            let why = format!("w{w} started {run:?} twice in {incarnation:?}");
            return violated(Property::StartsOnce, why);
        }
        let parent = spec.traceparent;
        let invocation = self.invocations.get(&spec.exec);
        let hangs = if spec.call == spec.exec.root_call() {
            invocation == Some(&parent)
        } else {
            let emitter = self.spans.get(&parent.span_id);
            invocation.is_some_and(|i| i.trace_id == parent.trace_id)
                && emitter.is_some_and(|&(exec, p)| exec == spec.exec && emits(p, spec.call))
        };
        if !hangs {
            let why = format!(
                "w{w} started {run:?} under {parent:?}, the span of no run that emitted it"
            );
            return violated(Property::TraceTree, why);
        }
        let own = parent.run(spec.call, spec.attempt);
        self.spans.insert(own.span_id, (spec.exec, spec.call));
        Ok(())
    }

    /// Execution `exec` was invoked under `span`.
    pub(super) fn invoked(&mut self, exec: ExecId, span: TraceParent) {
        self.invocations.insert(exec, span);
    }

    /// Worker `w` is a new incarnation: it has started nothing yet.
    pub(super) fn new_incarnation(&mut self, w: usize) {
        self.started.remove(&w);
    }

    // --- what the gateway shows ------------------------------------------------------------

    /// Every execution whose acceptance was confirmed is found by a client's look-up
    /// (`shown`), and every answer given is still the execution's answer in the gateway's
    /// record, as the look-up finds it and as a retry with its key would.
    pub(super) fn look_ups<'q>(&self, shown: impl Fn(ExecId) -> Option<&'q ExecStatus>) -> Verdict {
        if let Some(exec) = self.confirmed.iter().find(|e| shown(**e).is_none()) {
            let why = format!("{exec:?} was confirmed accepted, but a look-up does not find it");
            return violated(Property::AcceptedStaysVisible, why);
        }
        for (exec, answer) in &self.answers {
            let status = shown(*exec);
            if !matches!(status, Some(ExecStatus::Done(a)) if a == answer) {
                let why =
                    format!("{exec:?} was answered {answer:?}, but its record says {status:?}");
                return violated(Property::AnswerStays, why);
            }
        }
        Ok(())
    }
}

/// What the world read off the gateway after a step, for the checks of its record.
pub(super) struct Record<'q> {
    /// The queue's record: what it holds, durable or about to be.
    pub(super) state: &'q DurableState,
    /// Whether some worker is connected to take a call.
    pub(super) placeable: bool,
    /// The calls whose retry timer is set.
    pub(super) retrying: BTreeSet<CallKey>,
}

impl Record<'_> {
    /// Every pending call is owned by a live incarnation; an unowned one waits for its retry
    /// timer, or for some worker to connect.
    pub(super) fn calls_owned(&self) -> Verdict {
        let state = self.state;
        for (key, call) in &state.calls {
            match call.owner {
                Some(owner) => {
                    let live = state
                        .workers
                        .get(&owner.worker)
                        .is_some_and(|r| r.incarnation == owner.incarnation && !r.dead);
                    if !live {
                        let why = format!("{key:?} is owned by {owner:?}, not a live incarnation");
                        return violated(Property::CallsOwned, why);
                    }
                }
                None if self.placeable && !self.retrying.contains(key) => {
                    let why =
                        format!("{key:?} waits unplaced, with no retry due, while a worker is up");
                    return violated(Property::CallsOwned, why);
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// A message from an incarnation the gateway has fenced: it may change nothing.
pub(super) struct Fenced {
    worker: WorkerId,
    incarnation: Incarnation,
}

impl Fenced {
    /// Whether `msg` from `worker` comes from an incarnation the gateway's record (`state`)
    /// fenced: an older one, or the current one declared dead.
    pub(super) fn of(state: &DurableState, worker: WorkerId, msg: &ToGateway) -> Option<Fenced> {
        let incarnation = match msg {
            ToGateway::Hello { incarnation, .. }
            | ToGateway::Heartbeat { incarnation, .. }
            | ToGateway::Progress { incarnation, .. } => *incarnation,
        };
        let fenced = state.workers.get(&worker).is_some_and(|r| {
            incarnation < r.incarnation || (incarnation == r.incarnation && r.dead)
        });
        fenced.then_some(Fenced {
            worker,
            incarnation,
        })
    }

    /// Whether the gateway's record and timers, as fingerprinted before and after the message,
    /// are the same.
    pub(super) fn unchanged(self, before: u64, after: u64) -> Verdict {
        if before != after {
            let why = format!(
                "a message from fenced {:?} {:?} changed the queue",
                self.worker, self.incarnation
            );
            return violated(Property::FencedChangesNothing, why);
        }
        Ok(())
    }
}

/// A call's attempt, owner and failure count as last recorded, and whether it lost an owner
/// since its attempt was placed.
type CallHistory = (Attempt, Option<Owner>, u32, bool);

/// Each pending call's placement history, read off the batches that record it: the oracle
/// for a dispatch's reason, kept apart from the reason the queue writes in the record.
#[derive(Clone, Debug, Default)]
struct Placements {
    /// Per call: its attempt, owner and failure count as last recorded, and whether it lost
    /// an owner (without failing) since its attempt was last placed.
    calls: HashMap<(ExecId, CallId), CallHistory>,
    /// The reason each placement's history gives it, kept for the whole run.
    placed: HashMap<RunKey, Reason>,
}

impl Placements {
    fn observe(&mut self, batch: &Batch) {
        for op in &batch.ops {
            match op {
                Op::PutCall(rec) => {
                    let key = (rec.exec, rec.call);
                    let before = self.calls.get(&key);
                    let mut lost = match before {
                        Some((_, _, failures, _)) if *failures != rec.failures => false,
                        Some((_, owner, _, lost)) => {
                            *lost || owner.is_some() && *owner != rec.owner
                        }
                        None => false,
                    };
                    let placed = before.is_none_or(|(attempt, ..)| *attempt != rec.attempt);
                    if placed && rec.owner.is_some() {
                        let reason = match (lost, rec.failures) {
                            (true, _) => Reason::Recovery,
                            (false, 0) => Reason::First,
                            (false, _) => Reason::Retry,
                        };
                        self.placed
                            .insert(RunKey::new(rec.exec, rec.call, rec.attempt), reason);
                        lost = false;
                    }
                    self.calls
                        .insert(key, (rec.attempt, rec.owner, rec.failures, lost));
                }
                // Its placements stay: a dispatch that waited for the disk may leave after.
                Op::DelCall(exec, call) => {
                    self.calls.remove(&(*exec, *call));
                }
                _ => {}
            }
        }
    }

    /// Checks a dispatch's reason against the history of its placement.
    fn dispatched(&self, call: &CallSpec, reason: Reason) -> Result<(), String> {
        let run = call.run_key();
        match self.placed.get(&run) {
            _ if reason == Reason::Resent => Ok(()),
            Some(want) if *want == reason => Ok(()),
            Some(want) => Err(format!(
                "{run:?} was dispatched as {reason:?}; its history makes it {want:?}"
            )),
            None => Err(format!(
                "{run:?} was dispatched ({reason:?}) but never placed"
            )),
        }
    }
}
