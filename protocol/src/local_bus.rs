//! The local bus: a worker's queue of the calls it runs itself, and its backups.
//!
//! When a grain emits its next call, the bus runs it here at once (local-first), unless the
//! worker is overloaded; then the call goes to the gateway unowned, to be placed. Either way the
//! hop is reported to the gateway as one atomic report, without waiting for an ack: the
//! completion and the calls it spawned travel together. Reports not yet handed to the transport
//! coalesce (`c0 → c1` and `c1 → c2` become `c0 → c2`); once sent, a message is kept as a backup
//! until acked and re-sent on a timer and after every reconnect.
//!
//! It must never start the same attempt of a call twice in one incarnation, never merge into a
//! message already sent, and never forget a report before the gateway acks it.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::ids::{Attempt, CallId, ExecId, GrainName, Incarnation, RunKey, Seq, WorkerId};
use crate::mutations::{Mutation, Mutations};
use crate::time::{self, Time};
use crate::wire::{
    CallSpec, Cont, Effects, ErrorKind, GrainError, JoinSpec, NewCall, Outcome, Payload, Report,
    Return, ToGateway, ToWorker, FANOUT_MAX, PAYLOAD_BYTES_MAX,
};

/// Settings of a local bus.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct LbConfig {
    /// This worker.
    pub worker: WorkerId,
    /// How long a sent progress message waits for its ack before being re-sent.
    pub resend_interval: Duration,
    /// With this many calls running, emitted calls go to the gateway instead of running here.
    pub overload_threshold: usize,
    /// The most progress messages sent and not yet acked; beyond it reports wait and coalesce.
    pub window: usize,
    /// A progress message stops taking reports once it weighs this many bytes.
    pub message_weight_max: usize,
}

impl Default for LbConfig {
    fn default() -> Self {
        Self {
            worker: WorkerId(0),
            resend_interval: Duration::from_secs(1),
            overload_threshold: 64,
            // A chain's reports must not wait for acks: a gateway ack is a link round trip
            // plus a commit (~1.5 ms over a 0.25 ms link), while a warm hop is ~0.3 ms. With 4,
            // a 5-grain chain's last report waited for an ack, +0.45 ms per hop over such a
            // link; with 16 it did not (sand-bench).
            window: 16,
            message_weight_max: 4 << 20,
        }
    }
}

/// The shortest heartbeat interval a worker takes from a `Welcome`: whatever a gateway says, a
/// worker does not spin on its heartbeat timer.
pub const HEARTBEAT_MIN: Duration = Duration::from_millis(20);

/// What a grain instance returned, as the worker's runtime reports it.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum GrainResult {
    /// A value: it goes to the call's continuation (the client, or a join).
    Return(Payload),
    /// `ctx.next(grain, input)`: a tail call that inherits the continuation.
    Next {
        /// The next grain.
        grain: GrainName,
        /// Its input.
        input: Payload,
    },
    /// `ctx.fan_out(branches, join)`: the branches run, and `join` gets their values as a list.
    FanOut {
        /// Each branch's grain and input, in order.
        branches: Vec<(GrainName, Payload)>,
        /// The grain that gets the branch values.
        join: GrainName,
    },
    /// The attempt failed.
    Error(GrainError),
}

impl GrainResult {
    /// Why the bus refuses this result of `spec`, which then fails the attempt: a value too
    /// large, a fan-out of too few or too many branches, or nested past the depth budget.
    pub fn refusal(&self, spec: &CallSpec) -> Option<GrainError> {
        let bad = |msg: String| Some(GrainError::new(ErrorKind::BadOutput, msg));
        let too_large = |p: &Payload| p.len() > PAYLOAD_BYTES_MAX;
        match self {
            GrainResult::Return(v) | GrainResult::Next { input: v, .. } if too_large(v) => {
                bad(format!(
                    "a value of {} bytes exceeds the {PAYLOAD_BYTES_MAX} byte limit",
                    v.len()
                ))
            }
            GrainResult::FanOut { branches, .. }
                if branches.is_empty() || branches.len() > FANOUT_MAX =>
            {
                bad(format!(
                    "a fan-out needs 1 to {FANOUT_MAX} branches, not {}",
                    branches.len()
                ))
            }
            GrainResult::FanOut { branches, .. } if branches.iter().any(|(_, v)| too_large(v)) => {
                bad(format!(
                    "a branch input exceeds the {PAYLOAD_BYTES_MAX} byte limit"
                ))
            }
            GrainResult::FanOut { .. } if spec.depth_left == 0 => Some(GrainError::new(
                ErrorKind::Budget,
                "a fan-out nested deeper than the execution's budget of fan-out depth; the \
                 operator sets it (`sand gateway --fan-out-depth-max`)",
            )),
            _ => None,
        }
    }

    /// The calls `spec` emits with this result, in order: its `next`, or its fan-out's
    /// branches then their join; none if it returned a value, failed, or is refused.
    pub fn emitted(&self, spec: &CallSpec) -> Vec<CallId> {
        if self.refusal(spec).is_some() {
            return Vec::new();
        }
        match self {
            GrainResult::Next { .. } => vec![spec.call.child(0)],
            GrainResult::FanOut { branches, .. } => (0..branches.len() as u32)
                .map(|i| spec.call.child(i))
                .chain([spec.call.join()])
                .collect(),
            GrainResult::Return(_) | GrainResult::Error(_) => Vec::new(),
        }
    }
}

/// Something that happened, fed to [`LocalBus::handle`].
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum LbEvent {
    /// A connection to the gateway is up (the first, or a new one after a break).
    Connected,
    /// The connection to the gateway broke.
    Disconnected,
    /// A protocol message from the gateway arrived.
    Message(ToWorker),
    /// A grain instance finished an attempt the bus asked to run.
    Finished {
        /// The attempt.
        run: RunKey,
        /// What it returned.
        result: GrainResult,
    },
    /// A named timer fires now, whatever its deadline.
    Timeout(LbTimer),
}

/// The local bus's timers.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum LbTimer {
    /// Time to heartbeat.
    Heartbeat,
    /// Sent progress is still unacked: send it again.
    Resend,
}

/// Something the caller must do, drained with [`LocalBus::poll_output`].
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum LbOutput {
    /// Send this to the gateway.
    Send(ToGateway),
    /// Run this attempt and report `LbEvent::Finished`.
    Run(CallSpec),
    /// Kill this attempt if it still runs; report nothing for it.
    Abort(RunKey),
    /// This worker is a new incarnation: write it durably, so a restart picks a larger one.
    PersistIncarnation(Incarnation),
}

/// A fan-out whose branches all run here, so this worker can start the join itself.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct LocalJoin {
    spec: JoinSpec,
    fan_out: CallSpec,
    contributions: Vec<Option<Payload>>,
}

/// A report not yet handed to the transport, with the attempts it settles.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Unsent {
    report: Report,
    settles: Vec<RunKey>,
}

/// The local bus state machine.
///
/// Methods come in the same kinds as [`GlobalQueue`](crate::global_queue::GlobalQueue)'s:
/// getters, [`handle`](Self::handle) and [`handle_timeouts`](Self::handle_timeouts), and
/// [`poll_output`](Self::poll_output) and [`poll_timeout`](Self::poll_timeout). After any
/// event, drain `poll_output` until it returns `None`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct LocalBus {
    config: LbConfig,
    /// Deliberate bugs, for checkers only: none unless [`with_mutations`](Self::with_mutations).
    mutations: Mutations,
    incarnation: Incarnation,
    /// Whether the gateway welcomed this incarnation on the current connection.
    welcomed: bool,
    /// Whether the gateway welcomed this incarnation on any connection: its `Hello` then says
    /// it resumes.
    resumed: bool,
    /// How often to heartbeat, as the gateway's `Welcome` said.
    heartbeat: Duration,
    connected: bool,
    /// Attempts running now.
    running: BTreeMap<RunKey, CallSpec>,
    /// Attempts that finished, with the message that reports them once sent. Kept until acked:
    /// a reconnecting `Hello` lists them, so that the gateway does not dispatch them again.
    settled: BTreeMap<RunKey, Option<Seq>>,
    /// Fan-outs whose join this worker may start, by the join's run: its call under the
    /// fan-out's attempt, which its branches run under too. Two attempts of a fan-out are two
    /// lineages, and a branch contributes only to its own.
    joins: BTreeMap<RunKey, LocalJoin>,
    unsent: Vec<Unsent>,
    /// Sent progress, kept until acked.
    inflight: BTreeMap<Seq, Vec<Report>>,
    last_seq: Seq,
    /// The last of this incarnation's messages the gateway acked.
    acked: Seq,
    timers: BTreeMap<LbTimer, Time>,
    outputs: VecDeque<LbOutput>,
}

impl LocalBus {
    /// A local bus for a worker incarnation with no past.
    pub fn new(config: LbConfig, incarnation: Incarnation) -> Self {
        Self {
            config,
            mutations: Mutations::NONE,
            incarnation,
            welcomed: false,
            resumed: false,
            heartbeat: Duration::ZERO,
            connected: false,
            running: BTreeMap::new(),
            settled: BTreeMap::new(),
            joins: BTreeMap::new(),
            unsent: Vec::new(),
            inflight: BTreeMap::new(),
            last_seq: Seq(0),
            acked: Seq(0),
            timers: BTreeMap::new(),
            outputs: VecDeque::new(),
        }
    }

    /// The same bus with deliberate bugs switched on, for the model checker and the simulator
    /// to show that they catch them. The worker never calls it: its bus runs as designed.
    pub fn with_mutations(mut self, mutations: Mutations) -> Self {
        self.mutations = mutations;
        self
    }

    /// Handles one event.
    pub fn handle(&mut self, now: Time, event: LbEvent) {
        match event {
            LbEvent::Connected => {
                self.welcomed = false;
                self.handle_connected();
            }
            LbEvent::Disconnected => {
                self.connected = false;
                self.welcomed = false;
                self.timers.clear();
            }
            LbEvent::Message(msg) => self.on_message(now, msg),
            LbEvent::Finished { run, result } => self.on_finished(run, result),
            LbEvent::Timeout(timer) => {
                if self.timers.remove(&timer).is_some() {
                    self.on_timer(now, timer);
                }
            }
        }
        self.flush(now);
    }

    /// Fires every timer whose deadline is at or before `now`.
    pub fn handle_timeouts(&mut self, now: Time) {
        for timer in time::due(&self.timers, now) {
            self.handle(now, LbEvent::Timeout(timer));
        }
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<LbOutput> {
        self.outputs.pop_front()
    }

    /// The earliest timer deadline, if any timer is set.
    pub fn poll_timeout(&self) -> Option<Time> {
        time::earliest(&self.timers)
    }

    /// The settings it runs with.
    pub fn config(&self) -> &LbConfig {
        &self.config
    }

    /// The last progress message of this incarnation the gateway acked.
    pub fn acked(&self) -> Seq {
        self.acked
    }

    /// This worker's current incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// The attempts running now.
    pub fn running(&self) -> impl Iterator<Item = &CallSpec> {
        self.running.values()
    }

    /// The timers set, with their deadlines.
    pub fn timers(&self) -> impl Iterator<Item = (LbTimer, Time)> + '_ {
        self.timers.iter().map(|(t, at)| (*t, *at))
    }

    /// How many progress messages are sent and not yet acked, and how many reports wait to be
    /// sent.
    pub fn backlog(&self) -> (usize, usize) {
        (self.inflight.len(), self.unsent.len())
    }

    fn on_message(&mut self, now: Time, msg: ToWorker) {
        if msg.incarnation() != self.incarnation {
            return; // Addressed to another life of this worker.
        }
        match msg {
            ToWorker::Welcome {
                applied, heartbeat, ..
            } => {
                if !self.connected {
                    return;
                }
                self.welcomed = true;
                self.resumed = true;
                let heartbeat = heartbeat.max(HEARTBEAT_MIN);
                self.heartbeat = heartbeat;
                self.on_ack(applied);
                self.resend(now);
                self.timers.insert(LbTimer::Heartbeat, now + heartbeat);
            }
            ToWorker::Dispatch { call, .. } => {
                let run = call.run_key();
                let rerun = self.mutations.has(Mutation::RerunStarted);
                if rerun || !self.running.contains_key(&run) && !self.settled.contains_key(&run) {
                    self.start(call);
                }
            }
            ToWorker::Ack { upto, .. } => self.on_ack(upto),
            ToWorker::Cancel { exec, .. } => {
                let runs: Vec<RunKey> = self
                    .running
                    .keys()
                    .filter(|r| r.exec == exec)
                    .copied()
                    .collect();
                for run in runs {
                    self.running.remove(&run);
                    self.outputs.push_back(LbOutput::Abort(run));
                }
                self.settled.retain(|r, _| r.exec != exec);
                self.joins.retain(|r, _| r.exec != exec);
            }
            ToWorker::Abort {
                exec,
                call,
                attempt,
                ..
            } => {
                let run = RunKey::new(exec, call, attempt);
                if self.running.remove(&run).is_some() {
                    self.outputs.push_back(LbOutput::Abort(run));
                }
            }
            ToWorker::Fenced { successor, .. } => self.reincarnate(successor),
        }
    }

    /// Declared dead: kill everything, forget everything, come back as a new incarnation, at
    /// least `successor`.
    fn reincarnate(&mut self, successor: Incarnation) {
        for run in std::mem::take(&mut self.running).into_keys() {
            self.outputs.push_back(LbOutput::Abort(run));
        }
        let fresh = Self::new(self.config, self.incarnation.next().max(successor))
            .with_mutations(self.mutations);
        let outputs = std::mem::take(&mut self.outputs);
        let connected = self.connected;
        *self = fresh;
        self.outputs = outputs;
        self.outputs
            .push_back(LbOutput::PersistIncarnation(self.incarnation));
        if connected {
            self.handle_connected();
        }
    }

    /// Says `Hello` on a new connection, listing what this incarnation started and the gateway
    /// has not acked, so that nothing started is dispatched to it again.
    fn handle_connected(&mut self) {
        self.connected = true;
        let started = self.running.keys().chain(self.settled.keys()).copied();
        self.send(ToGateway::Hello {
            incarnation: self.incarnation,
            resumed: self.resumed,
            started: started.collect(),
        });
    }

    fn on_finished(&mut self, run: RunKey, result: GrainResult) {
        let Some(spec) = self.running.remove(&run) else {
            return; // Aborted or cancelled: nobody wants its result.
        };
        let result = match result.refusal(&spec) {
            Some(error) => GrainResult::Error(error),
            None => result,
        };
        let outcome = match result {
            GrainResult::Error(error) => {
                if let Cont::Join { join, .. } = spec.cont {
                    // The gateway retries the branch, perhaps elsewhere: it starts the join.
                    self.joins
                        .remove(&RunKey::new(spec.exec, join, spec.attempt));
                }
                Outcome::Failed(error)
            }
            GrainResult::Return(value) => Outcome::Done(self.deliver(&spec, value)),
            GrainResult::Next { grain, input } => {
                let mut effects = Effects::default();
                let (cont, depth_left) = (spec.cont, spec.depth_left);
                self.emit(&spec, 0, grain, input, cont, depth_left, &mut effects);
                Outcome::Done(effects)
            }
            GrainResult::FanOut { branches, join } => {
                Outcome::Done(self.fan_out(&spec, branches, join))
            }
        };
        let report = Report {
            exec: spec.exec,
            call: spec.call,
            attempt: spec.attempt,
            outcome,
        };
        self.settled.insert(run, None);
        self.push_report(report, run);
    }

    /// A return value: to the client or a join, through the gateway, or to a join this worker
    /// holds, which it then may start.
    fn deliver(&mut self, spec: &CallSpec, value: Payload) -> Effects {
        let mut effects = Effects::default();
        effects.returns.push(Return {
            cont: spec.cont,
            value: value.clone(),
        });
        let Cont::Join { join, branch } = spec.cont else {
            return effects;
        };
        let jkey = RunKey::new(spec.exec, join, spec.attempt);
        let Some(local) = self.joins.get_mut(&jkey) else {
            return effects;
        };
        if let Some(slot) = local.contributions.get_mut(branch as usize) {
            slot.get_or_insert(value);
        }
        if !local.contributions.iter().all(Option::is_some) {
            return effects;
        }
        let Some(local) = self.joins.remove(&jkey) else {
            return effects;
        };
        // Too large or overloaded: the gateway starts the join (and reports the size error).
        let Ok(input) = Payload::json_array(local.contributions.iter().flatten()) else {
            return effects;
        };
        if self.overloaded() || self.has_run(jkey) {
            return effects;
        }
        let join = CallSpec {
            exec: spec.exec,
            call: local.spec.call,
            attempt: spec.attempt,
            app: local.fan_out.app.clone(),
            grain: local.spec.grain.clone(),
            input: input.clone(),
            cont: local.spec.cont,
            depth_left: local.spec.depth_left,
            exec_ref: spec.exec_ref.clone(),
            traceparent: local.spec.traceparent,
        };
        effects.spawned.push(NewCall {
            call: join.call,
            grain: join.grain.clone(),
            input,
            cont: join.cont,
            owned: true,
            depth_left: join.depth_left,
            traceparent: join.traceparent,
        });
        self.start(join);
        effects
    }

    fn fan_out(
        &mut self,
        spec: &CallSpec,
        branches: Vec<(GrainName, Payload)>,
        grain: GrainName,
    ) -> Effects {
        let mut effects = Effects::default();
        let join = JoinSpec {
            call: spec.call.join(),
            grain,
            branches: branches.len() as u32,
            cont: spec.cont,
            depth_left: spec.depth_left,
            traceparent: spec.traceparent.run(spec.call, spec.attempt),
        };
        effects.joins.push(join.clone());
        let mut all_local = true;
        for (i, (grain, input)) in branches.into_iter().enumerate() {
            let cont = Cont::Join {
                join: join.call,
                branch: i as u32,
            };
            // The caller checked that the fan-out fits: depth_left is at least 1.
            let depth_left = spec.depth_left - 1;
            all_local &= self.emit(spec, i as u32, grain, input, cont, depth_left, &mut effects);
        }
        if all_local {
            let contributions = vec![None; join.branches as usize];
            self.joins.insert(
                RunKey::new(spec.exec, join.call, spec.attempt),
                LocalJoin {
                    spec: join,
                    fan_out: spec.clone(),
                    contributions,
                },
            );
        }
        effects
    }

    /// Emits the `index`-th call of `parent`: runs it here unless overloaded. Returns whether it
    /// runs here.
    #[allow(clippy::too_many_arguments)] // Each is one field of the call made.
    fn emit(
        &mut self,
        parent: &CallSpec,
        index: u32,
        grain: GrainName,
        input: Payload,
        cont: Cont,
        depth_left: u32,
        effects: &mut Effects,
    ) -> bool {
        let call = parent.call.child(index);
        let local =
            !self.overloaded() && !self.has_run(RunKey::new(parent.exec, call, parent.attempt));
        // It hangs from the run that emits it.
        let traceparent = parent.traceparent.run(parent.call, parent.attempt);
        effects.spawned.push(NewCall {
            call,
            grain: grain.clone(),
            input: input.clone(),
            cont,
            owned: local,
            depth_left,
            traceparent,
        });
        if local {
            self.start(CallSpec {
                exec: parent.exec,
                call,
                attempt: parent.attempt,
                app: parent.app.clone(),
                grain,
                input,
                cont,
                depth_left,
                exec_ref: parent.exec_ref.clone(),
                traceparent,
            });
        }
        local
    }

    fn start(&mut self, spec: CallSpec) {
        self.running.insert(spec.run_key(), spec.clone());
        self.outputs.push_back(LbOutput::Run(spec));
    }

    /// Whether this incarnation still remembers starting this attempt. A call spawned here runs
    /// under its parent's attempt, so the attempts of one lineage never meet another's: two
    /// attempts of a parent (a gateway that lost its first placement placed it again) spawn
    /// different attempts of the same call. A parent attempt runs once per incarnation, so its
    /// spawned attempt can be met again only while it is remembered; then the gateway places the
    /// call instead, with a fresh attempt.
    fn has_run(&self, run: RunKey) -> bool {
        if self.mutations.has(Mutation::RerunStarted) {
            return false;
        }
        self.running.contains_key(&run) || self.settled.contains_key(&run)
    }

    fn overloaded(&self) -> bool {
        self.running.len() >= self.config.overload_threshold
    }

    /// Queues a report, folding it into the unsent report that spawned its call if there is one:
    /// the parent's pending entry for the call is replaced by the call's own effects.
    fn push_report(&mut self, report: Report, run: RunKey) {
        let Report {
            exec,
            call,
            attempt,
            outcome,
        } = report;
        let effects = match outcome {
            Outcome::Done(effects) => effects,
            failed => {
                let report = Report {
                    exec,
                    call,
                    attempt,
                    outcome: failed,
                };
                return self.unsent.push(Unsent {
                    report,
                    settles: vec![run],
                });
            }
        };
        if let Some((i, at)) = self.fold_target(exec, call, attempt, &effects) {
            let unsent = &mut self.unsent[i];
            if let Outcome::Done(parent) = &mut unsent.report.outcome {
                parent.spawned.remove(at);
                parent.joins.extend(effects.joins);
                parent.returns.extend(effects.returns);
                parent.spawned.extend(effects.spawned);
                unsent.settles.push(run);
                return;
            }
        }
        let report = Report {
            exec,
            call,
            attempt,
            outcome: Outcome::Done(effects),
        };
        self.unsent.push(Unsent {
            report,
            settles: vec![run],
        });
    }

    /// The unsent report that spawned this attempt here, and the index of its entry for it: one of
    /// the same lineage (the same attempt), only while the result stays light.
    fn fold_target(
        &self,
        exec: ExecId,
        call: CallId,
        attempt: Attempt,
        effects: &Effects,
    ) -> Option<(usize, usize)> {
        self.unsent.iter().enumerate().find_map(|(i, u)| {
            let Outcome::Done(parent) = &u.report.outcome else {
                return None;
            };
            if u.report.exec != exec || u.report.attempt != attempt {
                return None;
            }
            let at = parent
                .spawned
                .iter()
                .position(|c| c.call == call && c.owned)?;
            let light = parent.weight() + effects.weight() <= self.config.message_weight_max;
            light.then_some((i, at))
        })
    }

    /// Sends unsent reports while the window has room.
    fn flush(&mut self, now: Time) {
        if !self.welcomed {
            return;
        }
        while self.inflight.len() < self.config.window && !self.unsent.is_empty() {
            let mut weight = 0;
            let mut take = 0;
            for u in &self.unsent {
                let w = report_weight(&u.report);
                if take > 0 && weight + w > self.config.message_weight_max {
                    break;
                }
                weight += w;
                take += 1;
            }
            let seq = self.last_seq.next();
            self.last_seq = seq;
            let mut reports = Vec::with_capacity(take);
            for u in self.unsent.drain(..take) {
                for run in u.settles {
                    if let Some(s) = self.settled.get_mut(&run) {
                        *s = Some(seq);
                    }
                }
                reports.push(u.report);
            }
            self.inflight.insert(seq, reports.clone());
            self.send(ToGateway::Progress {
                incarnation: self.incarnation,
                seq,
                reports,
            });
            self.timers
                .entry(LbTimer::Resend)
                .or_insert(now + self.config.resend_interval);
        }
    }

    /// Sends every unacked message again, in order.
    fn resend(&mut self, now: Time) {
        if self.mutations.has(Mutation::NoResend) {
            return;
        }
        let msgs: Vec<ToGateway> = self
            .inflight
            .iter()
            .map(|(seq, reports)| ToGateway::Progress {
                incarnation: self.incarnation,
                seq: *seq,
                reports: reports.clone(),
            })
            .collect();
        for msg in msgs {
            self.send(msg);
        }
        if !self.inflight.is_empty() {
            self.timers
                .insert(LbTimer::Resend, now + self.config.resend_interval);
        }
    }

    fn on_ack(&mut self, upto: Seq) {
        let upto = upto.min(self.last_seq);
        self.acked = self.acked.max(upto);
        self.inflight.retain(|seq, _| *seq > upto);
        self.settled.retain(|_, sent| sent.is_none_or(|s| s > upto));
        if self.inflight.is_empty() {
            self.timers.remove(&LbTimer::Resend);
        }
    }

    fn on_timer(&mut self, now: Time, timer: LbTimer) {
        if !self.welcomed {
            return;
        }
        match timer {
            LbTimer::Heartbeat => {
                self.send(ToGateway::Heartbeat {
                    incarnation: self.incarnation,
                    running: self.running.len() as u32,
                });
                self.timers.insert(LbTimer::Heartbeat, now + self.heartbeat);
            }
            LbTimer::Resend => self.resend(now),
        }
    }

    fn send(&mut self, msg: ToGateway) {
        if self.connected {
            self.outputs.push_back(LbOutput::Send(msg));
        }
    }
}

fn report_weight(report: &Report) -> usize {
    match &report.outcome {
        Outcome::Done(e) => e.weight() + 64,
        Outcome::Failed(e) => e.message.len() + 64,
    }
}
