//! The global queue: the gateway's durable record of every pending call and who owns it.
//!
//! It accepts executions, places calls on workers, applies the workers' progress, answers each
//! execution once, and recovers from failures: a worker silent past the failure timeout, or one
//! that comes back as a new incarnation, loses its calls to re-dispatch; everything a dead
//! incarnation says afterwards is refused (fenced). It never does I/O and never reads a clock.
//!
//! It must never let a promise leave before the state change behind it is durable: an ack, a
//! `Welcome`, an answer, and anything that lets a worker throw work away (`Fenced`, `Cancel`,
//! `Abort`) wait until the caller reports the batch that made the change as persisted. A gateway
//! that crashed before the write would otherwise still expect work the worker dropped.
//! Dispatches need no such wait: a crash that loses the record of a dispatch costs only
//! duplicate work. The `gate` module holds that rule.

mod gate;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::time::Duration;

use self::gate::Gate;
use crate::durable::{
    Answer, Batch, CallRecord, Deployment, DurableState, ExecRecord, ExecStatus, Idempotency,
    JoinRecord, LogIndex, Op, Owner, WorkerRecord,
};
use crate::ids::{AppName, Attempt, CallKey, ExecId, Incarnation, RunKey, Seq, WorkerId};
use crate::mutations::{Mutation, Mutations};
use crate::policy::{AppSpec, GrainPolicy};
use crate::time::{self, Time};
use crate::trace_context::TraceParent;
use crate::wire::{
    AppBundle, CallSpec, Cont, ErrorKind, GrainError, Outcome, Payload, Reason, Report, ToGateway,
    ToWorker, FANOUT_MAX, PAYLOAD_BYTES_MAX,
};

/// Settings of a global queue.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct GqConfig {
    /// A worker silent this long is declared dead and its calls re-dispatched. Workers heartbeat
    /// every [`heartbeat_interval`](Self::heartbeat_interval), which the gateway derives from it
    /// and sends in `Welcome`, so that the two cannot disagree.
    pub failure_timeout: Duration,
    /// Added to a grain's timeout before the gateway gives up on an attempt the worker did not
    /// report: the worker's own kill should come first.
    pub timeout_grace: Duration,
    /// How many early progress messages per worker are held back waiting for their
    /// predecessors; more are dropped (the worker re-sends them).
    pub held_max: usize,
    /// How long an idempotency key names its execution, from its acceptance: past it, the
    /// same key starts a new execution.
    pub key_ttl: Duration,
    /// How long an ended execution (its answer, its key) is kept before
    /// [`expire`](GlobalQueue::expire) forgets it.
    pub retention: Duration,
    /// How deep fan-outs may nest in an execution (an entry call's
    /// [`depth_left`](CallSpec::depth_left)).
    pub depth_max: u32,
    /// The most calls an execution may make, if limited; more end it with a
    /// [`ErrorKind::Budget`] error. Counted in the execution's durable record
    /// ([`ExecRecord::calls`]), so the budget holds across restarts.
    pub calls_max: Option<u32>,
}

impl GqConfig {
    /// The shortest failure timeout a gateway runs with: below it, a heartbeat's share of the
    /// timeout is within the reach of ordinary scheduling delays, and live workers would be
    /// suspected.
    pub const FAILURE_TIMEOUT_MIN: Duration = Duration::from_millis(500);

    /// How many heartbeats a worker sends per failure timeout: a live, idle worker is suspected
    /// only if this many in a row are late.
    pub const HEARTBEATS_PER_TIMEOUT: u32 = 5;

    /// How often workers heartbeat, as each `Welcome` tells them.
    pub fn heartbeat_interval(&self) -> Duration {
        self.failure_timeout / Self::HEARTBEATS_PER_TIMEOUT
    }

    /// Refuses settings under which a live, idle worker could be suspected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.failure_timeout < Self::FAILURE_TIMEOUT_MIN {
            return Err(ConfigError::FailureTimeout(self.failure_timeout));
        }
        Ok(())
    }
}

impl Default for GqConfig {
    fn default() -> Self {
        Self {
            failure_timeout: Duration::from_secs(5),
            timeout_grace: Duration::from_secs(2),
            held_max: 1024,
            key_ttl: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(7 * 24 * 3600),
            depth_max: 16,
            calls_max: Some(100_000),
        }
    }
}

/// Settings a global queue refuses to run with.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum ConfigError {
    /// The failure timeout is below [`GqConfig::FAILURE_TIMEOUT_MIN`].
    #[error(
        "a failure timeout of {} ms is too short: live workers would be declared dead; use at \
         least {} ms",
        .0.as_millis(),
        GqConfig::FAILURE_TIMEOUT_MIN.as_millis()
    )]
    FailureTimeout(Duration),
}

/// Something that happened, fed to [`GlobalQueue::handle`].
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum GqEvent {
    /// A worker's protocol message arrived (the transport authenticated the worker).
    Message(WorkerId, ToGateway),
    /// A worker's connection closed. Its calls stay with it until the failure timeout.
    Disconnected(WorkerId),
    /// Every batch up to this index is durable.
    Persisted(LogIndex),
    /// A named timer fires now, whatever its deadline. Real drivers use
    /// [`GlobalQueue::handle_timeouts`]; a model checker fires any timer at any moment.
    Timeout(GqTimer),
}

/// The global queue's timers.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum GqTimer {
    /// The worker has been silent for the failure timeout.
    Suspect(WorkerId),
    /// A failed call's backoff is over: place it again.
    Retry(CallKey),
    /// A call's attempt ran past its timeout and grace.
    Deadline(CallKey),
}

/// Something the caller must do, drained with [`GlobalQueue::poll_output`]. Each variant is
/// named for the driver's action; a `Confirm*` tells a client that its request is durable.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum GqOutput {
    /// Write this batch durably, after every earlier one, then report `GqEvent::Persisted`.
    Persist(Batch),
    /// Send this message to the worker (drop it if the worker is not connected).
    Send(WorkerId, ToWorker),
    /// Tell the client its execution is accepted, durably: an asynchronous client may now be
    /// given its id.
    ConfirmInvoke(ExecId),
    /// The execution ended, durably: give the client this answer. Emitted once per execution.
    Respond(ExecId, Answer),
    /// Tell the client the app's deployment (by [`GlobalQueue::deploy`]) is durable.
    ConfirmDeploy(AppName),
    /// Tell the client its [`GlobalQueue::remove_app`] is durable: the app is gone, or was not
    /// deployed.
    ConfirmRemove {
        /// The app.
        app: AppName,
        /// Whether it was deployed.
        existed: bool,
    },
}

/// What [`GlobalQueue::invoke`] did.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Invoked {
    /// The execution.
    pub exec: ExecId,
    /// False when the idempotency key named an earlier execution, which this is.
    pub fresh: bool,
}

/// Why an invocation was refused.
#[derive(Clone, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum InvokeError {
    /// No app of that name is deployed.
    #[error("app {0} is not deployed")]
    UnknownApp(AppName),
    /// The input exceeds [`PAYLOAD_BYTES_MAX`].
    #[error("input of {0} bytes exceeds the {max} byte limit", max = PAYLOAD_BYTES_MAX)]
    TooLarge(usize),
    /// The idempotency key names an execution that was given another input.
    #[error(
        "idempotency key {key:?} was used with a different input for execution {exec}; use a \
         new key for a new input"
    )]
    KeyReused {
        /// The key.
        key: String,
        /// The execution it names.
        exec: ExecId,
    },
}

/// The gateway's connection-level view of a worker. Not durable.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default)]
struct Link {
    /// Whether its current incarnation said `Hello` on a connection that is still open.
    connected: bool,
    /// Progress messages that arrived before their predecessors.
    held: BTreeMap<Seq, Vec<Report>>,
}

/// The global queue state machine.
///
/// Methods come in four kinds, as in quinn-proto: getters (`execution`, `state`, `timers`);
/// [`handle`](Self::handle) and [`handle_timeouts`](Self::handle_timeouts) for events;
/// commands that return a value ([`invoke`](Self::invoke), [`deploy`](Self::deploy),
/// [`remove_app`](Self::remove_app), [`forget`](Self::forget), [`expire`](Self::expire)); and
/// [`poll_output`](Self::poll_output) and [`poll_timeout`](Self::poll_timeout). After any event
/// or command, drain `poll_output` until it returns `None`, then sleep until `poll_timeout`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct GlobalQueue {
    config: GqConfig,
    /// Deliberate bugs, for checkers only: none unless [`with_mutations`](Self::with_mutations).
    mutations: Mutations,
    /// Everything durable, including changes not yet reported persisted.
    state: DurableState,
    /// What the disk holds of executions and apps that batches not yet durable change.
    /// Look-ups answer from it: nobody sees a change a crash could take back.
    unsynced: OnDisk<ExecId, ExecRecord>,
    unsynced_apps: OnDisk<AppName, Deployment>,
    /// The next execution index in this epoch.
    next_index: u32,
    /// The next placement index in this epoch: every placement's attempt is its own.
    next_placement: u32,
    /// Idempotency keys of known executions. A key is its app's: the same key sent to two
    /// apps names two executions.
    keys: BTreeMap<(AppName, String), ExecId>,
    /// Pending calls by owner.
    owned: BTreeMap<Owner, BTreeSet<CallKey>>,
    links: BTreeMap<WorkerId, Link>,
    timers: BTreeMap<GqTimer, Time>,
    /// The batches being logged, and the outputs waiting for them.
    gate: Gate,
}

impl GlobalQueue {
    /// A global queue with no history: a fresh cluster.
    pub fn new(config: GqConfig, now: Time) -> Self {
        Self::recover(config, now, DurableState::default())
    }

    /// The global queue rebuilt from its durable state after a gateway crash. Starts a new
    /// epoch; every worker it knew has the failure timeout to reconnect.
    pub fn recover(config: GqConfig, now: Time, state: DurableState) -> Self {
        let mut gq = Self {
            config,
            mutations: Mutations::NONE,
            state,
            unsynced: OnDisk::default(),
            unsynced_apps: OnDisk::default(),
            next_index: 0,
            next_placement: 0,
            keys: BTreeMap::new(),
            owned: BTreeMap::new(),
            links: BTreeMap::new(),
            timers: BTreeMap::new(),
            gate: Gate::default(),
        };
        let epoch = gq.state.epoch + 1;
        gq.commit(Op::Epoch(epoch));
        for rec in gq.state.execs.values() {
            if let Some(id) = &rec.idempotency {
                gq.keys.insert((rec.app.clone(), id.key.clone()), rec.exec);
            }
        }
        let workers: Vec<(WorkerId, WorkerRecord)> =
            gq.state.workers.iter().map(|(w, r)| (*w, *r)).collect();
        for (w, rec) in workers {
            gq.links.insert(w, Link::default());
            if !rec.dead {
                gq.timers
                    .insert(GqTimer::Suspect(w), now + gq.config.failure_timeout);
            }
        }
        let calls: Vec<CallRecord> = gq.state.calls.values().cloned().collect();
        for mut rec in calls {
            match rec.owner {
                Some(owner) if gq.is_live(owner) => gq.put_call(now, rec),
                Some(_) => {
                    // Its owner was declared dead before the crash; re-dispatch it.
                    rec.owner = None;
                    rec.reason = Reason::Recovery;
                    gq.put_call(now, rec);
                }
                None => {}
            }
        }
        gq.close_batch();
        gq
    }

    /// The same queue with deliberate bugs switched on, for the model checker and the simulator
    /// to show that they catch them. The gateway never calls it: its queue runs as designed.
    pub fn with_mutations(mut self, mutations: Mutations) -> Self {
        self.mutations = mutations;
        self
    }

    /// Deploys or replaces an app, code and all. Emits `ConfirmDeploy` once the deployment is
    /// durable.
    pub fn deploy(&mut self, spec: AppSpec, bundle: AppBundle) {
        let app = spec.name.clone();
        self.commit(Op::PutApp(Deployment { spec, bundle }));
        self.gate.promise(GqOutput::ConfirmDeploy(app));
        self.close_batch();
    }

    /// Removes an app, code and all; its running executions go on. Emits `ConfirmRemove` once what
    /// it says is durable: the removal, or (for an app not deployed) the absence it found.
    pub fn remove_app(&mut self, app: &AppName) {
        let existed = self.state.apps.contains_key(app);
        if existed {
            self.commit(Op::DelApp(app.clone()));
        }
        self.gate.promise(GqOutput::ConfirmRemove {
            app: app.clone(),
            existed,
        });
        self.close_batch();
    }

    /// Accepts an execution of `app` with `input`, or finds the earlier one with the same
    /// idempotency key (accepted less than the key's lifetime ago, with the same input: the
    /// same key with another input is refused). Emits `ConfirmInvoke` once the acceptance is
    /// durable and `Respond` once it ends; the entry call is dispatched at once, without waiting
    /// for the disk.
    pub fn invoke(
        &mut self,
        now: Time,
        app: &AppName,
        input: Payload,
        idempotency_key: Option<String>,
        traceparent: TraceParent,
    ) -> Result<Invoked, InvokeError> {
        let idempotency = idempotency_key.map(|key| Idempotency::new(key, &input));
        if let Some(exec) = self.keyed(now, app, idempotency.as_ref())? {
            self.gate.promise(GqOutput::ConfirmInvoke(exec));
            self.close_batch();
            return Ok(Invoked { exec, fresh: false });
        }
        let spec = self
            .state
            .apps
            .get(app)
            .map(|d| &d.spec)
            .ok_or_else(|| InvokeError::UnknownApp(app.clone()))?;
        if input.len() > PAYLOAD_BYTES_MAX {
            return Err(InvokeError::TooLarge(input.len()));
        }
        let epoch = if self.mutated(Mutation::ReuseExecIds) {
            1
        } else {
            self.state.epoch
        };
        let exec = ExecId::new(epoch, self.next_index);
        self.next_index += 1;
        let entry = spec.entry.clone();
        if let Some(id) = &idempotency {
            self.keys.insert((app.clone(), id.key.clone()), exec);
        }
        self.commit(Op::PutExec(ExecRecord {
            exec,
            app: app.clone(),
            idempotency,
            accepted: now,
            ended: None,
            calls: 1,
            status: ExecStatus::Running,
        }));
        self.put_call(
            now,
            CallRecord {
                exec,
                call: exec.root_call(),
                app: app.clone(),
                grain: entry,
                input,
                cont: Cont::Client,
                attempt: Attempt(0),
                failures: 0,
                reason: Reason::First,
                owner: None,
                depth_left: self.config.depth_max,
                traceparent,
            },
        );
        self.gate.promise(GqOutput::ConfirmInvoke(exec));
        self.close_batch();
        Ok(Invoked { exec, fresh: true })
    }

    /// The execution a live idempotency key names, if any; refused if it was given another
    /// input.
    fn keyed(
        &self,
        now: Time,
        app: &AppName,
        idempotency: Option<&Idempotency>,
    ) -> Result<Option<ExecId>, InvokeError> {
        let Some(id) = idempotency.filter(|_| !self.mutated(Mutation::ForgetKeys)) else {
            return Ok(None);
        };
        let Some(exec) = self.keys.get(&(app.clone(), id.key.clone())) else {
            return Ok(None);
        };
        let Some(rec) = self.state.execs.get(exec) else {
            return Ok(None);
        };
        if rec.accepted + self.config.key_ttl <= now {
            return Ok(None);
        }
        if rec.idempotency.as_ref() != Some(id) {
            return Err(InvokeError::KeyReused {
                key: id.key.clone(),
                exec: *exec,
            });
        }
        Ok(Some(*exec))
    }

    /// Forgets an ended execution (and its idempotency key). Returns false if it is unknown or
    /// still running.
    pub fn forget(&mut self, exec: ExecId) -> bool {
        let forgotten = self.forget_one(exec);
        self.close_batch();
        forgotten
    }

    /// Forgets, in one batch, every execution that ended at least the retention age before
    /// `now`, with its key; returns them (their traces are the driver's to delete). Running
    /// executions are kept, however old. The driver calls it from time to time.
    pub fn expire(&mut self, now: Time) -> Vec<ExecId> {
        let retention = self.config.retention;
        let old: Vec<ExecId> = self
            .state
            .execs
            .values()
            .filter(|e| e.ended.is_some_and(|t| t + retention <= now))
            .map(|e| e.exec)
            .collect();
        old.iter().for_each(|exec| {
            self.forget_one(*exec);
        });
        self.close_batch();
        old
    }

    fn forget_one(&mut self, exec: ExecId) -> bool {
        let Some(rec) = self.state.execs.get(&exec) else {
            return false;
        };
        if rec.status == ExecStatus::Running {
            return false;
        }
        if let Some(id) = &rec.idempotency {
            let key = (rec.app.clone(), id.key.clone());
            // A key that expired may name a newer execution by now.
            if self.keys.get(&key) == Some(&exec) {
                self.keys.remove(&key);
            }
        }
        self.commit(Op::DelExec(exec));
        true
    }

    /// Handles one event.
    pub fn handle(&mut self, now: Time, event: GqEvent) {
        match event {
            GqEvent::Message(worker, msg) => self.on_message(now, worker, msg),
            GqEvent::Disconnected(worker) => {
                self.links.entry(worker).or_default().connected = false;
                self.gate.new_session(worker);
            }
            GqEvent::Persisted(upto) => self.on_persisted(upto),
            GqEvent::Timeout(timer) => {
                if self.timers.remove(&timer).is_some() {
                    self.on_timer(now, timer);
                }
            }
        }
        self.close_batch();
    }

    /// Fires every timer whose deadline is at or before `now`.
    pub fn handle_timeouts(&mut self, now: Time) {
        for timer in time::due(&self.timers, now) {
            self.handle(now, GqEvent::Timeout(timer));
        }
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<GqOutput> {
        self.gate.poll_output()
    }

    /// The earliest timer deadline, if any timer is set.
    pub fn poll_timeout(&self) -> Option<Time> {
        time::earliest(&self.timers)
    }

    /// An execution's record as a client may see it: what the disk holds. An execution whose
    /// acceptance is not durable yet is unknown, and one whose end is not durable yet still
    /// runs. (The queue's own state runs ahead of the disk: see [`state`](Self::state).)
    pub fn execution(&self, exec: ExecId) -> Option<&ExecRecord> {
        if self.mutated(Mutation::ReadAhead) {
            return self.state.execs.get(&exec);
        }
        self.unsynced.view(&exec, &self.state.execs)
    }

    /// The executions a client may see (what the disk holds) with ids below `before`, newest
    /// (highest id) first.
    pub fn executions(&self, before: Option<ExecId>) -> impl Iterator<Item = &ExecRecord> + '_ {
        let range = (
            Bound::Unbounded,
            before.map_or(Bound::Unbounded, Bound::Excluded),
        );
        let mut live = self
            .state
            .execs
            .range(range)
            .map(|(e, _)| *e)
            .rev()
            .peekable();
        let mut unsynced = self.unsynced.range(range).rev().peekable();
        // Both run newest first; an id in both comes once.
        let ids = std::iter::from_fn(move || match (live.peek(), unsynced.peek()) {
            (Some(l), Some(u)) if l == u => {
                unsynced.next();
                live.next()
            }
            (Some(l), Some(u)) if l < u => unsynced.next(),
            (Some(_), _) => live.next(),
            (None, _) => unsynced.next(),
        });
        ids.filter_map(|exec| self.execution(exec))
    }

    /// The deployed apps as a client may see them: what the disk holds.
    pub fn deployed(&self) -> Vec<&Deployment> {
        let apps = &self.state.apps;
        let names: BTreeSet<&AppName> = apps.keys().chain(self.unsynced_apps.keys()).collect();
        names
            .into_iter()
            .filter_map(|app| self.unsynced_apps.view(app, apps))
            .collect()
    }

    /// The durable state, including changes not yet persisted.
    pub fn state(&self) -> &DurableState {
        &self.state
    }

    /// The timers set, with their deadlines.
    pub fn timers(&self) -> impl Iterator<Item = (GqTimer, Time)> + '_ {
        self.timers.iter().map(|(t, at)| (*t, *at))
    }

    /// Whether the worker's current incarnation is alive and connected.
    pub fn is_connected(&self, worker: WorkerId) -> bool {
        self.links.get(&worker).is_some_and(|l| l.connected)
            && self.state.workers.get(&worker).is_some_and(|r| !r.dead)
    }

    /// How many progress messages are held back, across workers, until their predecessors
    /// arrive.
    pub fn held(&self) -> usize {
        self.links.values().map(|l| l.held.len()).sum()
    }

    /// How many pending calls the worker's current incarnation owns.
    pub fn load(&self, worker: WorkerId) -> usize {
        self.state
            .workers
            .get(&worker)
            .and_then(|r| {
                self.owned.get(&Owner {
                    worker,
                    incarnation: r.incarnation,
                })
            })
            .map_or(0, BTreeSet::len)
    }

    fn on_message(&mut self, now: Time, worker: WorkerId, msg: ToGateway) {
        let incarnation = match &msg {
            ToGateway::Hello { .. } => return self.on_hello(now, worker, msg),
            ToGateway::Heartbeat { incarnation, .. } | ToGateway::Progress { incarnation, .. } => {
                *incarnation
            }
        };
        let Some(rec) = self.state.workers.get(&worker).copied() else {
            return; // It has not said Hello: nothing it says counts yet.
        };
        if incarnation > rec.incarnation {
            return; // A newer life that has not said Hello yet.
        }
        if self.refuses(worker, incarnation) {
            tracing::info!(%worker, incarnation = incarnation.0, "refused a message of a dead incarnation");
            self.fence(worker, incarnation);
            return;
        }
        self.touch(now, worker);
        if let ToGateway::Progress { seq, reports, .. } = msg {
            self.on_progress(now, worker, rec, seq, reports);
        }
    }

    /// Whether everything but a `Hello` from this worker incarnation is refused, for good: it
    /// is older than the incarnation the gateway knows, or that one was declared dead. Such a
    /// message earns only a `Fenced`.
    pub fn refuses(&self, worker: WorkerId, incarnation: Incarnation) -> bool {
        self.state.workers.get(&worker).is_some_and(|rec| {
            let dead = rec.dead && !self.mutated(Mutation::AcceptDead);
            incarnation < rec.incarnation || (incarnation == rec.incarnation && dead)
        })
    }

    /// A worker opens a session. Only a reconnect of the live incarnation the gateway knows
    /// resumes it; a life that does not say it resumes must be new, above every incarnation the
    /// gateway knows, or it is fenced and told where to start; and any `Hello` that says the
    /// known life has ended (a newer incarnation, or the known one starting over) declares it
    /// dead first.
    fn on_hello(&mut self, now: Time, worker: WorkerId, hello: ToGateway) {
        let ToGateway::Hello {
            incarnation,
            resumed,
            started,
        } = hello
        else {
            return;
        };
        self.links.entry(worker).or_default();
        self.gate.new_session(worker);
        let known = self.state.workers.get(&worker).copied();
        let live = known.filter(|r| !r.dead);
        if resumed && live.is_some_and(|r| r.incarnation == incarnation) {
            let started = started.into_iter().collect();
            return self.on_reconnect(now, worker, incarnation, &started);
        }
        if let Some(old) = live {
            if incarnation > old.incarnation {
                self.declare_dead(now, worker, old, Death::Replaced(incarnation));
            } else if incarnation == old.incarnation && !resumed {
                self.declare_dead(now, worker, old, Death::Restarted);
            }
        }
        let above = known.is_none_or(|r| incarnation > r.incarnation);
        if resumed || !above {
            tracing::warn!(
                %worker,
                incarnation = incarnation.0,
                known = known.map(|r| r.incarnation.0),
                resumed,
                "refused a Hello: the gateway cannot take it as this incarnation; it starts over"
            );
            if above {
                // A life that says it resumes, unknown here (its record was lost): recorded
                // dead, so that nothing it says counts.
                let dead = WorkerRecord {
                    incarnation,
                    dead: true,
                    applied: Seq(0),
                };
                self.commit(Op::PutWorker(worker, dead));
            }
            return self.fence(worker, incarnation);
        }
        self.commit(Op::PutWorker(
            worker,
            WorkerRecord {
                incarnation,
                dead: false,
                applied: Seq(0),
            },
        ));
        let link = self.links.entry(worker).or_default();
        link.connected = true;
        link.held.clear();
        self.touch(now, worker);
        tracing::info!(%worker, incarnation = incarnation.0, "worker joined");
        self.gate.promise(GqOutput::Send(
            worker,
            ToWorker::Welcome {
                incarnation,
                applied: Seq(0),
                heartbeat: self.config.heartbeat_interval(),
            },
        ));
        self.place_waiting(now);
    }

    /// The live incarnation opens a new connection: welcome it back, and re-send the dispatch
    /// of every call it owns that it has not started (a started one's report is re-sent).
    fn on_reconnect(
        &mut self,
        now: Time,
        worker: WorkerId,
        incarnation: Incarnation,
        started: &BTreeSet<RunKey>,
    ) {
        let applied = self
            .state
            .workers
            .get(&worker)
            .map_or(Seq(0), |r| r.applied);
        self.links.entry(worker).or_default().connected = true;
        self.touch(now, worker);
        self.gate.promise(GqOutput::Send(
            worker,
            ToWorker::Welcome {
                incarnation,
                applied,
                heartbeat: self.config.heartbeat_interval(),
            },
        ));
        let owner = Owner {
            worker,
            incarnation,
        };
        let resend: Vec<CallSpec> = self
            .owned
            .get(&owner)
            .into_iter()
            .flatten()
            .filter_map(|key| self.state.calls.get(key))
            .filter(|c| {
                let listed = started.contains(&RunKey::new(c.exec, c.call, c.attempt));
                !listed || self.mutated(Mutation::RerunStarted)
            })
            .map(spec_of)
            .collect();
        for call in resend {
            let reason = Reason::Resent;
            let msg = ToWorker::Dispatch {
                incarnation,
                call,
                reason,
            };
            self.gate.send(worker, msg);
        }
        self.place_waiting(now);
    }

    fn on_progress(
        &mut self,
        now: Time,
        worker: WorkerId,
        rec: WorkerRecord,
        seq: Seq,
        reports: Vec<Report>,
    ) {
        let owner = Owner {
            worker,
            incarnation: rec.incarnation,
        };
        let mut applied = rec.applied;
        if self.mutated(Mutation::ArrivalOrder) && seq > applied {
            self.apply_reports(now, owner, reports);
            self.commit(Op::PutWorker(
                worker,
                WorkerRecord {
                    applied: seq,
                    ..rec
                },
            ));
            let ack = ToWorker::Ack {
                incarnation: rec.incarnation,
                upto: seq,
            };
            return self.gate.promise(GqOutput::Send(worker, ack));
        }
        if seq > applied.next() {
            let link = self.links.entry(worker).or_default();
            if link.held.len() < self.config.held_max {
                link.held.insert(seq, reports);
            }
            return;
        }
        if seq == applied.next() {
            self.apply_reports(now, owner, reports);
            applied = seq;
            loop {
                let next = self
                    .links
                    .get_mut(&worker)
                    .and_then(|l| l.held.remove(&applied.next()));
                let Some(reports) = next else { break };
                self.apply_reports(now, owner, reports);
                applied = applied.next();
            }
            if let Some(link) = self.links.get_mut(&worker) {
                link.held.retain(|s, _| *s > applied);
            }
            self.commit(Op::PutWorker(worker, WorkerRecord { applied, ..rec }));
        }
        self.gate.promise(GqOutput::Send(
            worker,
            ToWorker::Ack {
                incarnation: rec.incarnation,
                upto: applied,
            },
        ));
    }

    fn apply_reports(&mut self, now: Time, owner: Owner, reports: Vec<Report>) {
        for report in reports {
            self.apply_report(now, owner, report);
        }
    }

    /// Applies one report atomically, or not at all if it is stale: its execution ended, its
    /// call is not pending, or it is not the current attempt of the sender.
    fn apply_report(&mut self, now: Time, owner: Owner, report: Report) {
        let key = CallKey::new(report.exec, report.call);
        if !self.is_running(report.exec) {
            return;
        }
        let Some(root) = self.state.calls.get(&key) else {
            return;
        };
        let owned = root.owner == Some(owner) || self.mutated(Mutation::AcceptDead);
        if !owned || root.attempt != report.attempt {
            return;
        }
        let app = root.app.clone();
        // A call spawned by a report inherits its root's attempt: the worker ran it under it.
        let report_attempt = report.attempt;
        let effects = match report.outcome {
            Outcome::Failed(error) => return self.fail_attempt(now, key, error),
            Outcome::Done(effects) => effects,
        };
        self.del_call(key);
        if self.mutated(Mutation::SplitHop) {
            self.close_batch();
        }
        let exec = report.exec;
        for spec in effects.joins {
            let jkey = CallKey::new(exec, spec.call);
            let branches = spec.branches as usize;
            if self.state.joins.contains_key(&jkey) || branches == 0 || branches > FANOUT_MAX {
                continue;
            }
            self.commit(Op::PutJoin(JoinRecord {
                exec,
                contributions: vec![None; branches],
                spec,
                fired: false,
            }));
        }
        let mut touched = BTreeSet::new();
        for ret in effects.returns {
            match ret.cont {
                Cont::Client => return self.finish(now, exec, Answer::Value(ret.value)),
                Cont::Join { join, branch } => {
                    let Some(j) = self.state.joins.get(&CallKey::new(exec, join)) else {
                        continue;
                    };
                    let slot = branch as usize;
                    if j.fired || slot >= j.contributions.len() || j.contributions[slot].is_some() {
                        continue;
                    }
                    let mut j = j.clone();
                    j.contributions[slot] = Some(ret.value);
                    self.commit(Op::PutJoin(j));
                    touched.insert(join);
                }
            }
        }
        let fresh = effects.spawned.iter().filter(|new| {
            let ckey = CallKey::new(exec, new.call);
            !self.state.calls.contains_key(&ckey)
                && !self.state.joins.get(&ckey).is_some_and(|j| j.fired)
        });
        if let Err(error) = self.count_calls(exec, fresh.count()) {
            return self.finish(now, exec, Answer::Error(error));
        }
        for new in effects.spawned {
            let ckey = CallKey::new(exec, new.call);
            if self.state.calls.contains_key(&ckey) {
                continue;
            }
            if let Some(j) = self.state.joins.get(&ckey) {
                if j.fired {
                    continue;
                }
                let mut j = j.clone();
                j.fired = true;
                self.commit(Op::PutJoin(j));
            }
            self.put_call(
                now,
                CallRecord {
                    exec,
                    call: new.call,
                    app: app.clone(),
                    grain: new.grain,
                    input: new.input,
                    cont: new.cont,
                    attempt: report_attempt,
                    failures: 0,
                    reason: Reason::First,
                    owner: new.owned.then_some(owner),
                    // The local bus that ran the fan-out decided it (a report may carry calls
                    // of several levels: a join its branch started sits above the branch).
                    depth_left: new.depth_left,
                    traceparent: if self.mutated(Mutation::UntracedSpawn) {
                        TraceParent::default()
                    } else {
                        new.traceparent
                    },
                },
            );
        }
        for join in touched {
            self.fire_if_complete(now, CallKey::new(exec, join));
        }
    }

    /// Spawns a join whose branches have all contributed, unless a worker already did.
    fn fire_if_complete(&mut self, now: Time, jkey: CallKey) {
        let Some(j) = self.state.joins.get(&jkey) else {
            return;
        };
        let early =
            self.mutated(Mutation::EarlyJoin) && j.contributions.iter().any(Option::is_some);
        let fired = j.fired && !self.mutated(Mutation::RefireJoin);
        if fired || !(j.is_complete() || early) {
            return;
        }
        let mut j = j.clone();
        let input = Payload::json_array(j.contributions.iter().flatten());
        let Some(app) = self.state.execs.get(&jkey.exec).map(|e| e.app.clone()) else {
            return;
        };
        if let Err(error) = self.count_calls(jkey.exec, 1) {
            return self.finish(now, jkey.exec, Answer::Error(error));
        }
        match input {
            Ok(input) => {
                j.fired = true;
                let rec = CallRecord {
                    exec: jkey.exec,
                    call: j.spec.call,
                    app,
                    grain: j.spec.grain.clone(),
                    input,
                    cont: j.spec.cont,
                    attempt: Attempt(0),
                    failures: 0,
                    reason: Reason::First,
                    owner: None,
                    depth_left: j.spec.depth_left,
                    traceparent: j.spec.traceparent,
                };
                self.commit(Op::PutJoin(j));
                self.put_call(now, rec);
            }
            Err(e) => {
                let error = GrainError::new(ErrorKind::BadOutput, format!("join input: {e}"));
                self.finish(now, jkey.exec, Answer::Error(error));
            }
        }
    }

    /// Counts a failed attempt: retry after a backoff, or end the execution with the error.
    fn fail_attempt(&mut self, now: Time, key: CallKey, error: GrainError) {
        let Some(mut rec) = self.state.calls.get(&key).cloned() else {
            return;
        };
        let policy = self.policy(&rec.app, &rec);
        rec.failures += 1;
        // A budget is not a passing failure: a retry would meet it again.
        if rec.failures >= policy.attempts_max || error.kind == ErrorKind::Budget {
            return self.finish(now, key.exec, Answer::Error(error));
        }
        // The retry timer goes first, so that put_call leaves the call unplaced until it fires.
        self.timers
            .insert(GqTimer::Retry(key), now + policy.backoff(rec.failures));
        rec.owner = None;
        rec.reason = Reason::Retry;
        self.put_call(now, rec);
    }

    /// Counts `n` calls the execution makes, in its durable record; refused, all of them, if
    /// they would take it past [`GqConfig::calls_max`].
    fn count_calls(&mut self, exec: ExecId, n: usize) -> Result<(), GrainError> {
        let (Some(max), Some(rec)) = (self.config.calls_max, self.state.execs.get(&exec)) else {
            return Ok(());
        };
        let calls = u32::try_from(n)
            .ok()
            .and_then(|n| rec.calls.checked_add(n))
            .filter(|&calls| calls <= max)
            .ok_or_else(|| {
                GrainError::new(
                    ErrorKind::Budget,
                    format!(
                        "the execution would make more than {max} calls, its budget; the \
                         operator sets it (`sand gateway --calls-max`)"
                    ),
                )
            })?;
        if n > 0 {
            let mut rec = rec.clone();
            rec.calls = calls;
            self.commit(Op::PutExec(rec));
        }
        Ok(())
    }

    /// Ends an execution with its one answer and cancels whatever of it is still pending.
    fn finish(&mut self, now: Time, exec: ExecId, answer: Answer) {
        let Some(rec) = self.state.execs.get(&exec) else {
            return;
        };
        if rec.status != ExecStatus::Running {
            return;
        }
        let mut rec = rec.clone();
        rec.status = ExecStatus::Done(answer.clone());
        rec.ended = Some(now);
        self.commit(Op::PutExec(rec));
        let range = CallKey::of_exec(exec);
        let calls: Vec<CallKey> = self
            .state
            .calls
            .range(range.clone())
            .map(|(k, _)| *k)
            .collect();
        let mut owners = BTreeSet::new();
        for key in calls {
            if let Some(owner) = self.state.calls.get(&key).and_then(|c| c.owner) {
                owners.insert(owner);
            }
            self.del_call(key);
        }
        for owner in owners {
            let msg = ToWorker::Cancel {
                incarnation: owner.incarnation,
                exec,
            };
            self.gate.promise(GqOutput::Send(owner.worker, msg));
        }
        let joins: Vec<CallKey> = self.state.joins.range(range).map(|(k, _)| *k).collect();
        for key in joins {
            self.commit(Op::DelJoin(key.exec, key.call));
        }
        self.gate.promise(GqOutput::Respond(exec, answer));
    }

    fn on_timer(&mut self, now: Time, timer: GqTimer) {
        match timer {
            GqTimer::Suspect(_) if self.mutated(Mutation::NeverSuspect) => {}
            GqTimer::Suspect(worker) => {
                if let Some(rec) = self.state.workers.get(&worker).copied() {
                    if !rec.dead {
                        // Tell it, in case it is only slow: it then comes back as a new
                        // incarnation without waiting until it has something to say.
                        if self.links.get(&worker).is_some_and(|l| l.connected) {
                            self.fence(worker, rec.incarnation);
                        }
                        self.declare_dead(now, worker, rec, Death::Silent);
                    }
                }
            }
            GqTimer::Retry(key) => {
                if let Some(rec) = self.state.calls.get(&key).cloned() {
                    if rec.owner.is_none() {
                        self.put_call(now, rec);
                    }
                }
            }
            GqTimer::Deadline(key) => {
                let Some(rec) = self.state.calls.get(&key) else {
                    return;
                };
                let Some(owner) = rec.owner else { return };
                let msg = ToWorker::Abort {
                    incarnation: owner.incarnation,
                    exec: key.exec,
                    call: key.call,
                    attempt: rec.attempt,
                };
                self.gate.promise(GqOutput::Send(owner.worker, msg));
                let error = GrainError::new(ErrorKind::Timeout, "the attempt ran past its timeout");
                self.fail_attempt(now, key, error);
            }
        }
    }

    /// Fences a worker incarnation for good and re-dispatches every call it owned.
    fn declare_dead(&mut self, now: Time, worker: WorkerId, rec: WorkerRecord, why: Death) {
        tracing::warn!(%worker, incarnation = rec.incarnation.0, reason = %why, "worker incarnation declared dead");
        self.commit(Op::PutWorker(worker, WorkerRecord { dead: true, ..rec }));
        self.timers.remove(&GqTimer::Suspect(worker));
        if let Some(link) = self.links.get_mut(&worker) {
            link.connected = false;
            link.held.clear();
        }
        let owner = Owner {
            worker,
            incarnation: rec.incarnation,
        };
        let keys = self.owned.remove(&owner).unwrap_or_default();
        for key in keys {
            if let Some(mut call) = self.state.calls.get(&key).cloned() {
                tracing::info!(
                    exec = %call.exec,
                    call = %call.call,
                    attempt = ?call.attempt,
                    %worker,
                    incarnation = rec.incarnation.0,
                    "re-dispatching a call: its owner was declared dead"
                );
                call.owner = None;
                call.reason = Reason::Recovery;
                self.put_call(now, call);
            }
        }
    }

    /// Tells an incarnation it is dead, once that is durable, and where to start again: above
    /// every incarnation of the worker the gateway knows.
    fn fence(&mut self, worker: WorkerId, incarnation: Incarnation) {
        let known = self.state.workers.get(&worker).map(|r| r.incarnation);
        let successor = known.unwrap_or_default().max(incarnation).next();
        tracing::info!(%worker, incarnation = incarnation.0, successor = successor.0, "fencing a worker incarnation");
        self.gate.promise(GqOutput::Send(
            worker,
            ToWorker::Fenced {
                incarnation,
                successor,
            },
        ));
    }

    /// Places every call that waits for a worker and is not backing off.
    fn place_waiting(&mut self, now: Time) {
        if self.mutated(Mutation::LazyPlacement) {
            return;
        }
        let waiting: Vec<CallRecord> = self
            .state
            .calls
            .values()
            .filter(|c| c.owner.is_none() && !self.timers.contains_key(&GqTimer::Retry(c.key())))
            .cloned()
            .collect();
        for rec in waiting {
            self.put_call(now, rec);
        }
    }

    /// Records a pending call, placing it first if it has no owner and is not backing off, and
    /// keeps the owner index and the call's timers in step.
    fn put_call(&mut self, now: Time, mut rec: CallRecord) {
        let key = rec.key();
        let backing_off = self.timers.contains_key(&GqTimer::Retry(key));
        if rec.owner.is_none() && !backing_off {
            rec.owner = self.choose_worker();
            if let Some(owner) = rec.owner {
                rec.attempt = Attempt::placement(self.state.epoch, self.next_placement);
                self.next_placement += 1;
                let reason = match rec.reason {
                    Reason::Recovery if self.mutated(Mutation::UnmarkedRecovery) => Reason::First,
                    reason => reason,
                };
                let msg = ToWorker::Dispatch {
                    incarnation: owner.incarnation,
                    call: spec_of(&rec),
                    reason,
                };
                self.gate.send(owner.worker, msg);
            }
        }
        if let Some(old) = self.state.calls.get(&key).and_then(|c| c.owner) {
            if let Some(set) = self.owned.get_mut(&old) {
                set.remove(&key);
            }
        }
        let deadline = GqTimer::Deadline(key);
        self.timers.remove(&deadline);
        if let Some(owner) = rec.owner {
            self.owned.entry(owner).or_default().insert(key);
            let policy = self.policy(&rec.app, &rec);
            if let Some(ms) = policy.timeout_ms {
                let at = now + Duration::from_millis(ms) + self.config.timeout_grace;
                self.timers.insert(deadline, at);
            }
        }
        if self.state.calls.get(&key) != Some(&rec) {
            self.commit(Op::PutCall(rec));
        }
    }

    /// Removes a pending call (completed or cancelled) with its timers and index entry.
    fn del_call(&mut self, key: CallKey) {
        if let Some(owner) = self.state.calls.get(&key).and_then(|c| c.owner) {
            if let Some(set) = self.owned.get_mut(&owner) {
                set.remove(&key);
            }
        }
        self.timers.remove(&GqTimer::Retry(key));
        self.timers.remove(&GqTimer::Deadline(key));
        self.commit(Op::DelCall(key.exec, key.call));
    }

    /// The least loaded live, connected worker; ties go to the lowest id.
    fn choose_worker(&self) -> Option<Owner> {
        self.state
            .workers
            .iter()
            .filter(|(w, r)| !r.dead && self.links.get(w).is_some_and(|l| l.connected))
            .map(|(w, r)| Owner {
                worker: *w,
                incarnation: r.incarnation,
            })
            .min_by_key(|o| (self.owned.get(o).map_or(0, BTreeSet::len), o.worker))
    }

    fn policy(&self, app: &AppName, rec: &CallRecord) -> GrainPolicy {
        self.state
            .apps
            .get(app)
            .map(|a| a.spec.policy(&rec.grain))
            .unwrap_or_default()
    }

    fn is_running(&self, exec: ExecId) -> bool {
        self.state
            .execs
            .get(&exec)
            .is_some_and(|e| e.status == ExecStatus::Running)
    }

    fn is_live(&self, owner: Owner) -> bool {
        self.state
            .workers
            .get(&owner.worker)
            .is_some_and(|r| r.incarnation == owner.incarnation && !r.dead)
    }

    fn touch(&mut self, now: Time, worker: WorkerId) {
        self.timers
            .insert(GqTimer::Suspect(worker), now + self.config.failure_timeout);
    }

    fn on_persisted(&mut self, upto: LogIndex) {
        if let Some(durable) = self.gate.persisted(upto) {
            let stale = self.mutated(Mutation::StaleLookup);
            self.unsynced.settle(durable, stale);
            self.unsynced_apps.settle(durable, stale);
        }
    }

    fn mutated(&self, m: Mutation) -> bool {
        self.mutations.has(m)
    }

    fn commit(&mut self, op: Op) {
        let batch = self.gate.open_batch();
        match &op {
            Op::PutExec(ExecRecord { exec, .. }) | Op::DelExec(exec) => {
                self.unsynced.change(*exec, &self.state.execs, batch);
            }
            Op::PutApp(Deployment {
                spec: AppSpec { name: app, .. },
                ..
            })
            | Op::DelApp(app) => self
                .unsynced_apps
                .change(app.clone(), &self.state.apps, batch),
            _ => {}
        }
        self.state.apply(&op);
        self.gate.log(op);
    }

    /// Ends the event: hands out its batch, and holds what must wait for it.
    fn close_batch(&mut self) {
        self.gate.close_batch(self.mutations);
    }
}

/// What the disk holds of entities that batches not yet durable change: for each, every such
/// batch, oldest first, with the entity's value just before it (`None`: absent). The disk holds
/// the value before the oldest of them: each batch written moves the view on by one, so a
/// look-up is never older than what the disk holds, nor newer.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct OnDisk<K, V>(BTreeMap<K, VecDeque<(LogIndex, Option<V>)>>);

impl<K, V> Default for OnDisk<K, V> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<K: Ord + Clone, V: Clone> OnDisk<K, V> {
    /// Notes that batch `batch` changes `key`, whose value in `live` is still the one before.
    fn change(&mut self, key: K, live: &BTreeMap<K, V>, batch: LogIndex) {
        let pending = self.0.entry(key.clone()).or_default();
        if pending.back().is_none_or(|(last, _)| *last != batch) {
            pending.push_back((batch, live.get(&key).cloned()));
        }
    }

    /// Forgets what every batch up to `durable` changed: the disk has it. With `stale`, a key
    /// is settled only once its last batch is durable (the `StaleLookup` mutation).
    fn settle(&mut self, durable: LogIndex, stale: bool) {
        self.0.retain(|_, pending| {
            if stale {
                return pending.back().is_some_and(|(last, _)| *last > durable);
            }
            while pending.front().is_some_and(|(batch, _)| *batch <= durable) {
                pending.pop_front();
            }
            !pending.is_empty()
        });
    }

    /// `key`'s value as the disk holds it, given its `live` one.
    fn view<'a>(&'a self, key: &K, live: &'a BTreeMap<K, V>) -> Option<&'a V> {
        match self.0.get(key).and_then(VecDeque::front) {
            Some((_, on_disk)) => on_disk.as_ref(),
            None => live.get(key),
        }
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.keys()
    }

    fn range(&self, range: (Bound<K>, Bound<K>)) -> impl DoubleEndedIterator<Item = K> + '_ {
        self.0.range(range).map(|(k, _)| k.clone())
    }
}

/// Why a worker incarnation was declared dead.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// It was silent for the failure timeout.
    Silent,
    /// The worker said `Hello` as a newer incarnation.
    Replaced(Incarnation),
    /// The worker said `Hello` as this incarnation, starting over: it restarted without the
    /// record of its incarnation.
    Restarted,
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Death::Silent => f.write_str("silent for the failure timeout"),
            Death::Replaced(i) => write!(f, "replaced by incarnation {}", i.0),
            Death::Restarted => f.write_str("restarted with an incarnation already in use"),
        }
    }
}

/// What a worker needs to run a call's current attempt.
fn spec_of(rec: &CallRecord) -> CallSpec {
    CallSpec {
        exec: rec.exec,
        call: rec.call,
        attempt: rec.attempt,
        app: rec.app.clone(),
        grain: rec.grain.clone(),
        input: rec.input.clone(),
        cont: rec.cont,
        depth_left: rec.depth_left,
        exec_ref: String::new(),
        traceparent: rec.traceparent,
    }
}
