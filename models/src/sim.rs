//! The crash-schedule simulator: one gateway and many workers running the real `GlobalQueue` and
//! `LocalBus`, driven through long random schedules of deliveries, delays, connection breaks,
//! partitions, crashes, restarts, workers lost for good, false suspicions and client retries.
//!
//! It follows FoundationDB's simulator and TigerBeetle's VOPR. Everything a real cluster gets
//! from outside — time, the network, the disk, the grains' behaviour, the clients — is simulated
//! here and comes from one `u64` seed:
//!
//! - A seed picks a [`Schedule`]: the cluster's settings, the grain [`Program`], and a list of
//!   [`Step`]s. Steps name what happens next: a request, a message delivered (any of those in
//!   flight, so delivery order is random and a message's delay is however long it waits), an
//!   attempt finished, a group of batches made durable, time passing (timers fire when due), or
//!   a fault.
//! - Each request carries an idempotency key of its own. Its client sends it again with that key
//!   when the gateway was down, when a gateway crash broke its connection before it had its
//!   answer, and at random (a `Retry` step: a broken connection, a client that gave up waiting).
//! - Faults are biased toward danger, as FoundationDB's BUGGIFY does: each kind is switched on
//!   in about half the schedules and is then frequent, and the rare paths (a gateway crash
//!   between two batches of one group commit, a suspicion fired while a worker is busy, a
//!   connection break with progress in flight) are ordinary events. Losing a worker for good is
//!   the exception: rare, and never the last one.
//! - The checkers are separate from the code under test. After every step they check safety:
//!   - one answer per execution, and the right one;
//!   - one execution per idempotency key: a retry finds the execution the disk holds for its
//!     key, and within one gateway life the one it was first given (only an execution whose
//!     acceptance a crash lost may be replaced);
//!   - an answer never changes once given: the execution's record keeps it, across restarts;
//!   - durable before visible: no ack, welcome, fence, cancel, abort, acceptance or answer
//!     leaves before the disk holds the state behind it;
//!   - a completed call never pending again; a join fired once; a fenced incarnation changing
//!     nothing; every pending call owned by a live incarnation or about to be placed; a worker
//!     starting each attempt at most once per incarnation.
//!
//!   After the last step every fault heals but lost workers, which stay dead, and liveness is
//!   checked: every request and every running execution is answered, and every remaining
//!   worker's backlog drains, within a bound of simulated time and without firing the gateway's
//!   `Deadline` timers (a healed cluster never needs a call's timeout to make progress; a lost
//!   worker's calls move on by the failure detector alone).
//! - A failing schedule is shrunk with proptest (its steps come from a proptest strategy fed by
//!   a fixed-seed `TestRng`, so the same seed rebuilds the same value tree) and saved as JSON;
//!   [`replay`] runs the saved steps exactly again and records a readable trace.
//! - A run hashes every step and every output of the state machines into a trace hash;
//!   [`check_determinism`] runs a seed twice and compares the hashes (madsim's self-check).
//!
//! This module owns the simulated network, clocks, disk and grain runtime, and the checkers. It
//! never re-implements the protocol: it only feeds the state machines events and reads their
//! outputs and public getters. Nothing here reads a clock or draws randomness except from the
//! seed; the wall clock only measures throughput and bounds shrinking.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::any;
use proptest::strategy::{BoxedStrategy, NewTree, Strategy, Union, ValueTree};
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use sand_protocol::durable::{Answer, Batch, DurableState, ExecStatus, LogIndex, Op, Owner};
use sand_protocol::global_queue::{GlobalQueue, GqConfig, GqEvent, GqOutput, GqTimer};
use sand_protocol::ids::{
    AppName, Attempt, CallId, ExecId, GrainName, Incarnation, RunKey, WorkerId,
};
use sand_protocol::local_bus::{GrainResult, LbConfig, LbEvent, LbOutput, LocalBus};
use sand_protocol::mutations::{Mutation, Mutations};
use sand_protocol::policy::{AppSpec, GrainPolicy};
use sand_protocol::time::Time;
use sand_protocol::wire::{
    AppBundle, CallSpec, ErrorKind, GrainError, Payload, Reason, ToGateway, ToWorker,
};
use serde::{Deserialize, Serialize};

use crate::promises;

/// The version of the replay file format this build writes and reads.
pub const REPLAY_FORMAT: u32 = 1;

/// What [`fuzz`] runs: how many schedules, from which seed, of what size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuzzOptions {
    /// The seed of the first schedule; schedule `i` uses `seed + i`, so a failing schedule's own
    /// seed, run as the first of one schedule, finds it again.
    pub seed: u64,
    /// How many schedules to run (the run stops at the first failure).
    pub schedules: u64,
    /// Workers in the simulated cluster; at least 1.
    pub workers: u32,
    /// Executions each schedule invokes.
    pub executions: u32,
    /// The mean number of steps between two invocations.
    pub steps_per_execution: u32,
    /// Deliberate protocol bugs switched on in both state machines.
    pub mutations: Mutations,
    /// Where to save a failing schedule; `None` keeps it in the report only.
    pub out_dir: Option<PathBuf>,
    /// The wall-clock budget for shrinking a failing schedule.
    pub shrink_time: Duration,
    /// Whether to run the first schedule twice and compare trace hashes before fuzzing.
    pub check_determinism: bool,
}

impl Default for FuzzOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            schedules: 1000,
            workers: 5,
            executions: 100,
            steps_per_execution: 24,
            mutations: Mutations::NONE,
            out_dir: None,
            shrink_time: Duration::from_secs(60),
            check_determinism: true,
        }
    }
}

/// What a [`fuzz`] run did and found.
#[derive(Clone, Debug)]
pub struct FuzzReport {
    /// Schedules run, the failing one included.
    pub schedules_run: u64,
    /// Wall-clock time spent, shrinking included.
    pub elapsed: Duration,
    /// Wall-clock time spent running schedules, shrinking excluded.
    pub running: Duration,
    /// Executions answered and checked in schedules that passed.
    pub executions_checked: u64,
    /// Steps run in schedules that passed.
    pub steps_run: u64,
    /// Faults injected in schedules that passed, by kind.
    pub faults: FaultCounts,
    /// The first failure, shrunk, if any schedule failed.
    pub failure: Option<FoundFailure>,
}

impl FuzzReport {
    /// Schedules run per second of running time (shrinking excluded).
    pub fn schedules_per_second(&self) -> f64 {
        let secs = self.running.as_secs_f64();
        if secs > 0.0 {
            self.schedules_run as f64 / secs
        } else {
            0.0
        }
    }
}

/// A failing schedule found by [`fuzz`], after shrinking.
#[derive(Clone, Debug)]
pub struct FoundFailure {
    /// The failing schedule's own seed.
    pub seed: u64,
    /// How many schedules ran up to and including this one.
    pub schedules_run: u64,
    /// The failure of the original schedule.
    pub original: Failure,
    /// How many steps the original schedule had.
    pub original_steps: usize,
    /// The failure of the shrunk schedule (the same property).
    pub failure: Failure,
    /// The shrunk schedule.
    pub schedule: Schedule,
    /// How many candidate schedules shrinking ran.
    pub shrink_runs: u64,
    /// Where the shrunk schedule was saved, if it was.
    pub replay_path: Option<PathBuf>,
    /// Why it could not be saved, if saving failed.
    pub save_error: Option<String>,
}

/// One simulated run: the cluster's settings, the grains, and the steps. Running it is a pure
/// function of this value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The seed it was generated from (for reference; replay runs the steps below).
    pub seed: u64,
    /// The cluster's settings.
    pub config: SimConfig,
    /// What the grains do.
    pub program: Program,
    /// What happens, in order.
    pub steps: Vec<Step>,
}

/// The simulated cluster's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimConfig {
    /// Workers, numbered from 0.
    pub workers: u32,
    /// Each worker's window of unacked progress messages.
    pub window: usize,
    /// Running attempts beyond which a worker sends emitted calls to the gateway.
    pub overload_threshold: usize,
    /// The weight at which a progress message stops taking reports.
    pub message_weight_max: usize,
    /// Deliberate protocol bugs switched on, by name; at most one.
    #[serde(with = "mutation_names")]
    pub mutations: Mutations,
    /// How much simulated time the liveness phase may take, in milliseconds.
    pub liveness_ms_max: u64,
}

/// The grains of the simulated app: deterministic, so every correct answer is known.
///
/// `a(n)` refuses when `n % refuse_every == refuse_every - 1` (its two attempts fail and so does
/// the execution); otherwise it calls `b([n+1, h, w])` with `h = n % (hops_max + 1)` and
/// `w = 1 + (n / 4) % width_max`. `b([m, h, w])` calls `b([m+1, h-1, w])` while `h > 0` (local
/// hops that coalesce), then fans out to `c(m+1) .. c(m+w)` joined by `d`. `c(x)` returns `2x`,
/// but when `flaky`, an odd `x` fails the first attempt of each placement epoch (retried).
/// `d` sums its list. So `a(n)` answers `2w(n+1+h) + w(w+1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Program {
    /// The most local `b` hops before the fan-out.
    pub hops_max: u32,
    /// The most fan-out branches, at least 1.
    pub width_max: u32,
    /// Every how many inputs `a` refuses one; 0 for never.
    pub refuse_every: u32,
    /// Whether `c` fails first attempts on odd inputs.
    pub flaky: bool,
}

/// One thing that happens in a schedule. Indices pick among what exists when the step runs,
/// modulo its count, so any list of steps is a valid schedule (shrinking relies on that).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Step {
    /// A client invokes the app with input `n`: a new request, with an idempotency key of its
    /// own (it waits if the gateway is down).
    Invoke(u32),
    /// The `i`-th message in flight, either way, arrives.
    Deliver(u16),
    /// The `i`-th running attempt, counted across workers, finishes.
    Finish(u16),
    /// Group commit: the gateway's first `n` unwritten batches become durable, and it is told.
    Persist(u8),
    /// This many milliseconds pass; crashed nodes whose downtime ended restart, broken
    /// connections whose partition ended reconnect, and due timers fire.
    Tick(u32),
    /// A worker's connection breaks, dropping every message in flight on it both ways; it
    /// reconnects at the next tick.
    Break(u8),
    /// The `i`-th message in flight is lost on a live connection, as when its queue overflows.
    /// By the transport's contract (`transport/README.md`) such a loss closes the
    /// connection: the message, and whatever else is in flight on it, is lost with it.
    Overflow(u16),
    /// A worker is cut off from the gateway for `ms` milliseconds.
    Partition {
        /// The worker.
        worker: u8,
        /// How long, in milliseconds.
        ms: u32,
    },
    /// A worker crashes, losing its state; it restarts as a new incarnation after `down_ms`.
    CrashWorker {
        /// The worker.
        worker: u8,
        /// Its downtime, in milliseconds.
        down_ms: u32,
    },
    /// A worker crashes, and its disk loses the record of its last incarnation: after `down_ms`
    /// it restarts as an incarnation it already used (as after a power cut, before the fixed
    /// driver's fsyncs, or with the file deleted).
    CrashWorkerForgetful {
        /// The worker.
        worker: u8,
        /// Its downtime, in milliseconds.
        down_ms: u32,
    },
    /// The gateway crashes after its first `persisted` unwritten batches reached the disk
    /// (without it being told); it recovers from the disk after `down_ms`.
    CrashGateway {
        /// Batches written before the crash.
        persisted: u8,
        /// Its downtime, in milliseconds.
        down_ms: u32,
    },
    /// The gateway's failure detector fires for a worker now: a false suspicion if it is alive.
    Suspect(u8),
    /// A worker crashes for good: it never restarts, not even when the faults heal. Skipped if
    /// `workers - 1` have been lost already, so one is always left to come back.
    KillWorker(u8),
    /// The `i`-th request's client sends it again with the same idempotency key, as after its
    /// connection broke or it gave up waiting.
    Retry(u16),
    /// The `i`-th of the gateway's timers fires now, early.
    FireGqTimer(u16),
    /// An operator deploys (`true`) or removes (`false`) a second app, whose code no request
    /// runs: each change must be told only once durable.
    ChangeApp(bool),
    /// The `i`-th request's client looks its execution up: what it shows must be on disk.
    Poll(u16),
    /// The `timer`-th of a worker's timers fires now, early.
    FireLbTimer {
        /// The worker.
        worker: u8,
        /// Which of its timers.
        timer: u8,
    },
}

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
            Property::DurableBeforeVisible => "durable before visible",
            Property::CompletedStaysCompleted => "a completed call stays completed",
            Property::JoinFiresOnce => "a join fires once",
            Property::FencedChangesNothing => "a fenced incarnation changes nothing",
            Property::CallsOwned => "every pending call has a live owner or is about to be placed",
            Property::StartsOnce => "a worker starts each attempt at most once per incarnation",
            Property::Accepts => "the gateway accepts invocations",
            Property::Liveness => "every request is answered after healing",
            Property::DispatchReason => "a dispatch says why it was sent",
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

/// Faults injected, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    /// Connections broken (partitions and crashes included).
    pub connection_breaks: u64,
    /// Messages lost on a live connection, as an overflowing queue loses them: each closed its
    /// connection, as the transport's contract says.
    pub overflows: u64,
    /// Messages lost with their connection.
    pub messages_dropped: u64,
    /// Workers cut off from the gateway for a while.
    pub partitions: u64,
    /// Worker crashes (each followed by a restart as a new incarnation, unless the worker is
    /// lost for good).
    pub worker_crashes: u64,
    /// Worker crashes after which the worker restarted as an incarnation it had already used.
    pub incarnations_reused: u64,
    /// Workers crashed for good (never restarted).
    pub workers_lost: u64,
    /// Gateway crashes (each followed by recovery from the disk).
    pub gateway_crashes: u64,
    /// Batches lost because the gateway crashed before writing them.
    pub batches_lost: u64,
    /// Failure-detector timers fired early for a live worker.
    pub false_suspicions: u64,
    /// Other timers fired before their deadline.
    pub early_timers: u64,
    /// Attempts that failed by the grain program (retried or final).
    pub grain_errors: u64,
    /// Requests sent again with the same idempotency key.
    pub requests_retried: u64,
}

impl FaultCounts {
    /// Each kind with its name and count, in a fixed order.
    pub fn by_kind(&self) -> [(&'static str, u64); 13] {
        [
            ("connection breaks", self.connection_breaks),
            ("overflows", self.overflows),
            ("messages dropped", self.messages_dropped),
            ("partitions", self.partitions),
            ("worker crashes", self.worker_crashes),
            ("incarnations reused", self.incarnations_reused),
            ("workers lost", self.workers_lost),
            ("gateway crashes", self.gateway_crashes),
            ("batches lost", self.batches_lost),
            ("false suspicions", self.false_suspicions),
            ("timers fired early", self.early_timers),
            ("grain errors", self.grain_errors),
            ("requests retried", self.requests_retried),
        ]
    }

    /// Adds another count to this one.
    pub fn add(&mut self, other: &FaultCounts) {
        self.connection_breaks += other.connection_breaks;
        self.overflows += other.overflows;
        self.messages_dropped += other.messages_dropped;
        self.partitions += other.partitions;
        self.worker_crashes += other.worker_crashes;
        self.incarnations_reused += other.incarnations_reused;
        self.workers_lost += other.workers_lost;
        self.gateway_crashes += other.gateway_crashes;
        self.batches_lost += other.batches_lost;
        self.false_suspicions += other.false_suspicions;
        self.early_timers += other.early_timers;
        self.grain_errors += other.grain_errors;
        self.requests_retried += other.requests_retried;
    }
}

/// What a passing run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunStats {
    /// Steps run in the fault phase.
    pub steps: usize,
    /// Executions a gateway started (a retry that found its request's execution starts none).
    pub executions: u64,
    /// Executions answered (each checked).
    pub answered: u64,
    /// Faults injected.
    pub faults: FaultCounts,
    /// Simulated time at the end, in milliseconds.
    pub sim_ms: u64,
    /// A hash of every step and output, in order.
    pub trace_hash: u64,
}

/// A saved schedule run again by [`replay`].
#[derive(Clone, Debug)]
pub struct Replay {
    /// The schedule.
    pub schedule: Schedule,
    /// The failure recorded when it was saved.
    pub recorded: Failure,
    /// What running it again gave.
    pub verdict: Result<RunStats, Failure>,
    /// A readable account of the run: each step, and every message (heartbeats aside), attempt,
    /// batch and answer.
    pub trace: Vec<String>,
}

impl Replay {
    /// Whether running it again violated the same property as recorded.
    pub fn reproduced(&self) -> bool {
        matches!(&self.verdict, Err(f) if f.property == self.recorded.property)
    }
}

/// Why a replay file could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a replay file.
    #[error("{path} is not a sand fuzz replay file")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The file was written by another version of the simulator.
    #[error("{path} has replay format {found}; this build reads format {REPLAY_FORMAT}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u32,
    },
}

/// The contents of a replay file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ReplayFile {
    format: u32,
    /// How to run it again, for a reader of the file.
    replay: String,
    failure: Failure,
    schedule: Schedule,
}

/// Runs `opts.schedules` schedules from `opts.seed`, stopping at the first failure, which it
/// shrinks and (with `opts.out_dir`) saves. Calls `on_progress(done, total)` after each schedule
/// (for a failing one, before shrinking it).
pub fn fuzz(opts: &FuzzOptions, mut on_progress: impl FnMut(u64, u64)) -> FuzzReport {
    let started = Instant::now();
    let mut report = FuzzReport {
        schedules_run: 0,
        elapsed: Duration::ZERO,
        running: Duration::ZERO,
        executions_checked: 0,
        steps_run: 0,
        faults: FaultCounts::default(),
        failure: None,
    };
    if opts.check_determinism && opts.schedules > 0 {
        if let Err(failure) = check_determinism(opts.seed, opts) {
            let schedule = Schedule::generate(opts.seed, opts);
            let f = found(opts, opts.seed, 0, &schedule, failure.clone(), failure);
            report.failure = Some(f);
            report.running = started.elapsed();
            report.elapsed = started.elapsed();
            return report;
        }
    }
    for i in 0..opts.schedules {
        let seed = opts.seed.wrapping_add(i);
        let schedule = Schedule::generate(seed, opts);
        let verdict = schedule.run();
        report.schedules_run += 1;
        match verdict {
            Ok(stats) => {
                report.executions_checked += stats.answered;
                report.steps_run += stats.steps as u64;
                report.faults.add(&stats.faults);
                on_progress(i + 1, opts.schedules);
            }
            Err(failure) => {
                report.running = started.elapsed();
                on_progress(i + 1, opts.schedules);
                let (shrunk, shrunk_failure, runs) =
                    shrink(&schedule, opts, failure.clone(), opts.shrink_time);
                let mut f = found(opts, seed, i + 1, &shrunk, failure, shrunk_failure);
                f.original_steps = schedule.steps.len();
                f.shrink_runs = runs;
                report.failure = Some(f);
                report.elapsed = started.elapsed();
                return report;
            }
        }
    }
    report.running = started.elapsed();
    report.elapsed = started.elapsed();
    report
}

/// Reads a schedule saved by [`fuzz`] and runs it again, recording a trace.
pub fn replay(path: &Path) -> Result<Replay, ReplayError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: ReplayFile = serde_json::from_str(&text).map_err(|source| ReplayError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if file.format != REPLAY_FORMAT {
        return Err(ReplayError::Format {
            path: path.to_path_buf(),
            found: file.format,
        });
    }
    let (verdict, trace) = file.schedule.run_traced();
    Ok(Replay {
        schedule: file.schedule,
        recorded: file.failure,
        verdict,
        trace,
    })
}

/// Runs the schedule of `seed` twice and compares the trace hashes (madsim's determinism
/// check). Returns the hash, or a [`Property::Deterministic`] failure.
pub fn check_determinism(seed: u64, opts: &FuzzOptions) -> Result<u64, Failure> {
    let first = Schedule::generate(seed, opts);
    let second = Schedule::generate(seed, opts);
    let differ = |message: String| Failure {
        property: Property::Deterministic,
        step: None,
        at_ms: 0,
        message,
    };
    if first != second {
        return Err(differ(format!(
            "seed {seed} generated two different schedules"
        )));
    }
    let (a, hash_a, _) = run_caught(&first, false);
    let (b, hash_b, _) = run_caught(&second, false);
    if hash_a != hash_b || a != b {
        return Err(differ(format!(
            "seed {seed} run twice gave trace hashes {hash_a:016x} and {hash_b:016x}"
        )));
    }
    Ok(hash_a)
}

impl Schedule {
    /// The schedule of `seed`, sized by `opts` (workers, executions, steps, mutations).
    pub fn generate(seed: u64, opts: &FuzzOptions) -> Schedule {
        let plan = Plan::new(seed, opts);
        let steps = plan.strategy().tree(&mut runner_for(seed)).current();
        Schedule {
            seed,
            config: plan.config,
            program: plan.program,
            steps,
        }
    }

    /// Runs the schedule: the steps with safety checked after each, then healing and liveness.
    /// A panic anywhere, the protocol included, is a [`Property::NoPanic`] failure.
    pub fn run(&self) -> Result<RunStats, Failure> {
        run_caught(self, false).0
    }

    /// Runs the schedule and returns a readable trace of it with the verdict.
    pub fn run_traced(&self) -> (Result<RunStats, Failure>, Vec<String>) {
        let (verdict, _, trace) = run_caught(self, true);
        (verdict, trace)
    }

    /// Saves the schedule with its failure as a replay file.
    pub fn save(&self, failure: &Failure, path: &Path) -> std::io::Result<()> {
        let file = ReplayFile {
            format: REPLAY_FORMAT,
            replay: format!("sand fuzz --replay {}", path.display()),
            failure: failure.clone(),
            schedule: self.clone(),
        };
        let json = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")
    }
}

impl Program {
    /// The app the program is deployed as. `a` has two attempts; the others retry without a
    /// practical limit, so only `a`'s refusal and deadlines can fail an execution.
    pub fn app_spec(&self) -> AppSpec {
        let retried = GrainPolicy {
            attempts_max: 1_000_000,
            backoff_ms: 10,
            backoff_factor_milli: 2000,
            backoff_ms_max: 100,
            timeout_ms: Some(GRAIN_TIMEOUT_MS),
        };
        let entry = GrainPolicy {
            attempts_max: 2,
            ..retried
        };
        AppSpec {
            name: app(),
            entry: grain("a"),
            grains: [
                (grain("a"), entry),
                (grain("b"), retried),
                (grain("c"), retried),
                (grain("d"), retried),
            ]
            .into_iter()
            .collect(),
        }
    }

    /// The one correct answer to an execution with input `n`.
    pub fn expected(&self, n: u32) -> Answer {
        if self.refuses(n) {
            return Answer::Error(refusal());
        }
        let (h, w) = (i64::from(self.hops(n)), i64::from(self.width(n)));
        Answer::Value(number(2 * w * (i64::from(n) + 1 + h) + w * (w + 1)))
    }

    /// What one attempt of a call returns.
    pub fn run(&self, spec: &CallSpec) -> GrainResult {
        let bad = || {
            GrainResult::Error(GrainError::new(
                ErrorKind::BadOutput,
                format!("{} cannot read its input {:?}", spec.grain, spec.input),
            ))
        };
        let Some(input) = numbers(&spec.input) else {
            return bad();
        };
        match (spec.grain.as_str(), input.as_slice()) {
            ("a", &[n]) => {
                let Ok(n) = u32::try_from(n) else {
                    return bad();
                };
                if self.refuses(n) {
                    return GrainResult::Error(refusal());
                }
                let (h, w) = (i64::from(self.hops(n)), i64::from(self.width(n)));
                GrainResult::Next {
                    grain: grain("b"),
                    input: list(&[i64::from(n) + 1, h, w]),
                }
            }
            ("b", &[m, h, w]) if h > 0 => GrainResult::Next {
                grain: grain("b"),
                input: list(&[m + 1, h - 1, w]),
            },
            ("b", &[m, _, w]) => GrainResult::FanOut {
                branches: (1..=w).map(|i| (grain("c"), number(m + i))).collect(),
                join: grain("d"),
            },
            ("c", &[x]) => {
                if self.flaky && x % 2 == 1 && spec.attempt.0 as u32 == 0 {
                    GrainResult::Error(GrainError::new(ErrorKind::Crashed, "c flakes"))
                } else {
                    GrainResult::Return(number(2 * x))
                }
            }
            ("d", values) => GrainResult::Return(number(values.iter().sum())),
            _ => bad(),
        }
    }

    fn refuses(&self, n: u32) -> bool {
        self.refuse_every > 0 && n % self.refuse_every == self.refuse_every - 1
    }

    fn hops(&self, n: u32) -> u32 {
        n % (self.hops_max + 1)
    }

    fn width(&self, n: u32) -> u32 {
        1 + (n / 4) % self.width_max.max(1)
    }
}

/// How long one attempt may run; the gateway's deadline is this plus its grace.
const GRAIN_TIMEOUT_MS: u64 = 10_000;

/// How many actions the liveness phase may take before it is called a livelock.
const LIVENESS_ACTIONS_MAX: u64 = 2_000_000;

fn refusal() -> GrainError {
    GrainError::new(ErrorKind::Raised, "a refuses")
}

fn app() -> AppName {
    // Invariant: "app" is a valid name (ASCII letters, 1 to 64 bytes).
    AppName::new("app").expect("\"app\" is a valid app name")
}

/// The app an operator deploys and removes while the requests run.
fn spare() -> AppName {
    // Invariant: "spare" is a valid name (ASCII letters, 1 to 64 bytes).
    AppName::new("spare").expect("\"spare\" is a valid app name")
}

fn bundle(digest: &str) -> AppBundle {
    AppBundle {
        digest: digest.into(),
        archive: Default::default(),
    }
}

fn grain(name: &'static str) -> GrainName {
    // Invariant: only the literal names "a" to "d" reach here, all valid.
    GrainName::new(name).expect("grain names a to d are valid")
}

fn number(n: i64) -> Payload {
    Payload::from(n.to_string().as_str())
}

fn list(ns: &[i64]) -> Payload {
    let parts: Vec<String> = ns.iter().map(i64::to_string).collect();
    Payload::from(format!("[{}]", parts.join(",")).as_str())
}

/// Reads `7` or `[1,2,3]`.
fn numbers(p: &Payload) -> Option<Vec<i64>> {
    let s = std::str::from_utf8(&p.0).ok()?.trim();
    match s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        Some("") => Some(Vec::new()),
        Some(inner) => inner.split(',').map(|x| x.trim().parse().ok()).collect(),
        None => s.parse().ok().map(|n| vec![n]),
    }
}

// ---------------------------------------------------------------------------------------------
// Generation: a seed becomes a plan (settings, program, fault profile), and the plan a proptest
// strategy whose value tree, built from a TestRng seeded with the same seed, gives the steps.

/// A small deterministic generator for the plan (splitmix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// How one schedule leans: step weights, with each fault kind switched on in about half the
/// schedules and frequent when on (BUGGIFY). One schedule in eight is calm: no faults at all.
#[derive(Clone, Debug)]
struct Profile {
    deliver: u32,
    finish: u32,
    persist: u32,
    tick: u32,
    group_commit: bool,
    long_ticks: bool,
    brk: u32,
    partition: u32,
    crash_worker: u32,
    forget_incarnation: u32,
    crash_gateway: u32,
    suspect: u32,
    gq_timer: u32,
    lb_timer: u32,
    /// Losing a worker for good is rarer than any other step: when it is on, every other weight
    /// counts sixteen times, so that a schedule loses a worker or two at any point of it rather
    /// than all but one near its start.
    kill_worker: u32,
    retry: u32,
    overflow: u32,
    change_app: u32,
    poll: u32,
}

/// Everything a seed decides before the steps.
struct Plan {
    config: SimConfig,
    program: Program,
    profile: Profile,
    executions: u32,
    segment_max: u32,
}

impl Plan {
    fn new(seed: u64, opts: &FuzzOptions) -> Self {
        let mut r = SplitMix(seed ^ 0x5eed_5eed_5eed_5eed);
        let calm = r.below(8) == 0;
        let fault = |r: &mut SplitMix, weights: &[u32]| {
            let on = r.below(2) == 0;
            let weight = r.pick(weights);
            if calm || !on {
                0
            } else {
                weight
            }
        };
        let profile = Profile {
            deliver: 40,
            finish: 24,
            persist: 12,
            tick: 10,
            group_commit: r.below(2) == 0,
            long_ticks: r.below(4) != 0,
            brk: fault(&mut r, &[1, 2, 4, 8]),
            partition: fault(&mut r, &[1, 2]),
            crash_worker: fault(&mut r, &[1, 2]),
            forget_incarnation: fault(&mut r, &[1]),
            crash_gateway: fault(&mut r, &[1, 2]),
            suspect: fault(&mut r, &[1, 2, 4]),
            gq_timer: fault(&mut r, &[1, 2]),
            lb_timer: fault(&mut r, &[1, 2, 4]),
            kill_worker: 0,
            retry: 0,
            overflow: 0,
            change_app: 0,
            poll: 0,
        };
        let config = SimConfig {
            workers: opts.workers.max(1),
            window: r.pick(&[1, 2, 4, 16]),
            overload_threshold: r.pick(&[2, 4, 8, 64]),
            message_weight_max: r.pick(&[400, 4 << 20]),
            mutations: opts.mutations,
            liveness_ms_max: 60_000,
        };
        let program = Program {
            hops_max: r.pick(&[0, 1, 2, 3]),
            width_max: r.pick(&[2, 3, 4]),
            refuse_every: r.pick(&[0, 5, 7]),
            flaky: r.below(2) == 0,
        };
        // Drawn last, so that the draws above, and a schedule without these faults, are what they
        // were before these faults existed.
        let profile = Profile {
            kill_worker: fault(&mut r, &[1]),
            retry: fault(&mut r, &[1, 2]),
            overflow: fault(&mut r, &[1, 2]),
            change_app: fault(&mut r, &[1, 2]),
            poll: fault(&mut r, &[1, 4]),
            ..profile
        };
        Plan {
            config,
            program,
            profile,
            executions: opts.executions,
            segment_max: opts.steps_per_execution.saturating_mul(2),
        }
    }

    fn strategy(&self) -> ScheduleStrategy {
        ScheduleStrategy {
            invoke: (0u32..1000).prop_map(Step::Invoke).boxed(),
            step: step_strategy(&self.profile, self.config.workers),
            executions: self.executions,
            segment_max: self.segment_max,
        }
    }
}

/// One step of a schedule, weighted by the profile. Benign steps come first so that shrinking,
/// which moves a union toward its first options, turns faults into benign steps.
fn step_strategy(p: &Profile, workers: u32) -> BoxedStrategy<Step> {
    let worker = 0..u8::try_from(workers).unwrap_or(u8::MAX).max(1);
    let tick = if p.long_ticks {
        Union::new_weighted(vec![
            (14, (1u32..100).boxed()),
            (4, (100u32..2000).boxed()),
            (1, (2000u32..8000).boxed()),
        ])
        .boxed()
    } else {
        (1u32..200).boxed()
    };
    let persist = if p.group_commit {
        (1u8..=4).boxed()
    } else {
        (1u8..=1).boxed()
    };
    let mut arms: Vec<(u32, BoxedStrategy<Step>)> = vec![
        (p.tick, tick.prop_map(Step::Tick).boxed()),
        (p.persist, persist.prop_map(Step::Persist).boxed()),
        (p.deliver, any::<u16>().prop_map(Step::Deliver).boxed()),
        (p.finish, any::<u16>().prop_map(Step::Finish).boxed()),
    ];
    let faults: Vec<(u32, BoxedStrategy<Step>)> = vec![
        (p.brk, worker.clone().prop_map(Step::Break).boxed()),
        (p.overflow, any::<u16>().prop_map(Step::Overflow).boxed()),
        (
            p.lb_timer,
            (worker.clone(), 0u8..2)
                .prop_map(|(worker, timer)| Step::FireLbTimer { worker, timer })
                .boxed(),
        ),
        (p.suspect, worker.clone().prop_map(Step::Suspect).boxed()),
        (p.gq_timer, any::<u16>().prop_map(Step::FireGqTimer).boxed()),
        (
            p.partition,
            (worker.clone(), 500u32..12_000)
                .prop_map(|(worker, ms)| Step::Partition { worker, ms })
                .boxed(),
        ),
        (
            p.crash_worker,
            (worker.clone(), 0u32..12_000)
                .prop_map(|(worker, down_ms)| Step::CrashWorker { worker, down_ms })
                .boxed(),
        ),
        (
            p.forget_incarnation,
            (worker.clone(), 0u32..3000)
                .prop_map(|(worker, down_ms)| Step::CrashWorkerForgetful { worker, down_ms })
                .boxed(),
        ),
        (
            p.crash_gateway,
            (0u8..=3, 0u32..3000)
                .prop_map(|(persisted, down_ms)| Step::CrashGateway { persisted, down_ms })
                .boxed(),
        ),
        (p.retry, any::<u16>().prop_map(Step::Retry).boxed()),
        (
            p.change_app,
            any::<bool>().prop_map(Step::ChangeApp).boxed(),
        ),
        (p.poll, any::<u16>().prop_map(Step::Poll).boxed()),
    ];
    arms.extend(faults.into_iter().filter(|(w, _)| *w > 0));
    if p.kill_worker > 0 {
        for (weight, _) in &mut arms {
            *weight *= 16;
        }
        arms.push((p.kill_worker, worker.prop_map(Step::KillWorker).boxed()));
    }
    Union::new_weighted(arms).boxed()
}

/// A proptest runner whose `TestRng` is seeded from `seed` alone.
fn runner_for(seed: u64) -> TestRunner {
    let mut r = SplitMix(seed);
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&r.next().to_le_bytes());
    }
    let config = RunnerConfig {
        failure_persistence: None,
        ..RunnerConfig::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

/// The steps of a schedule: for each execution an invocation followed by a random run of steps.
#[derive(Debug)]
struct ScheduleStrategy {
    invoke: BoxedStrategy<Step>,
    step: BoxedStrategy<Step>,
    executions: u32,
    segment_max: u32,
}

impl ScheduleStrategy {
    fn tree(&self, runner: &mut TestRunner) -> ScheduleTree {
        let lengths = 0..=self.segment_max;
        let mut elements = Vec::new();
        for _ in 0..self.executions {
            // Invariant: these strategies are ranges, unions and maps with no filter, so making
            // a value tree never rejects.
            let len = lengths.new_tree(runner).map_or(0, |t| t.current());
            elements.push(self.invoke.new_tree(runner).expect("no filter rejects"));
            for _ in 0..len {
                elements.push(self.step.new_tree(runner).expect("no filter rejects"));
            }
        }
        ScheduleTree::new(elements)
    }
}

impl Strategy for ScheduleStrategy {
    type Tree = ScheduleTree;
    type Value = Vec<Step>;

    fn new_tree(&self, runner: &mut TestRunner) -> NewTree<Self> {
        Ok(self.tree(runner))
    }
}

/// The value tree of a schedule. It shrinks as proptest's `VecValueTree` does, deleting steps
/// and then simplifying each one, but deletes in chunks first (halves, quarters, ... single
/// steps) so that a schedule of thousands of steps shrinks in a few thousand runs, and it can
/// cut everything after a step at once (a safety violation does not depend on later steps).
struct ScheduleTree {
    elements: Vec<Box<dyn ValueTree<Value = Step>>>,
    included: Vec<bool>,
    phase: ShrinkPhase,
    last: Option<LastShrink>,
}

#[derive(Clone, Copy, Debug)]
enum ShrinkPhase {
    /// Delete `chunk` included steps starting at the `at`-th included one.
    Delete {
        chunk: usize,
        at: usize,
    },
    /// Simplify the element at this index.
    Simplify(usize),
    Done,
}

#[derive(Clone, Debug)]
enum LastShrink {
    Deleted(Vec<usize>),
    Simplified(usize),
}

impl ScheduleTree {
    fn new(elements: Vec<Box<dyn ValueTree<Value = Step>>>) -> Self {
        let n = elements.len();
        Self {
            elements,
            included: vec![true; n],
            phase: ShrinkPhase::Delete {
                chunk: n.div_ceil(2).max(1),
                at: 0,
            },
            last: None,
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.elements.len())
            .filter(|i| self.included[*i])
            .collect()
    }

    /// Drops every included step after the first `len`.
    fn truncate(&mut self, len: usize) {
        for i in self.live().into_iter().skip(len) {
            self.included[i] = false;
        }
    }
}

impl ValueTree for ScheduleTree {
    type Value = Vec<Step>;

    fn current(&self) -> Vec<Step> {
        self.elements
            .iter()
            .zip(&self.included)
            .filter(|(_, included)| **included)
            .map(|(e, _)| e.current())
            .collect()
    }

    fn simplify(&mut self) -> bool {
        loop {
            match self.phase {
                ShrinkPhase::Delete { chunk, at } => {
                    let live = self.live();
                    if chunk == 0 || live.is_empty() {
                        self.phase = ShrinkPhase::Simplify(0);
                        continue;
                    }
                    if at >= live.len() {
                        self.phase = ShrinkPhase::Delete {
                            chunk: chunk / 2,
                            at: 0,
                        };
                        continue;
                    }
                    let removed: Vec<usize> = live[at..(at + chunk).min(live.len())].to_vec();
                    for i in &removed {
                        self.included[*i] = false;
                    }
                    self.last = Some(LastShrink::Deleted(removed));
                    return true;
                }
                ShrinkPhase::Simplify(ix) => {
                    if ix >= self.elements.len() {
                        self.phase = ShrinkPhase::Done;
                        return false;
                    }
                    if self.included[ix] && self.elements[ix].simplify() {
                        self.last = Some(LastShrink::Simplified(ix));
                        return true;
                    }
                    self.phase = ShrinkPhase::Simplify(ix + 1);
                }
                ShrinkPhase::Done => return false,
            }
        }
    }

    fn complicate(&mut self) -> bool {
        match self.last.take() {
            None => false,
            Some(LastShrink::Deleted(removed)) => {
                for i in &removed {
                    self.included[*i] = true;
                }
                // Keep these steps; try the next chunk.
                if let ShrinkPhase::Delete { chunk, at } = self.phase {
                    self.phase = ShrinkPhase::Delete {
                        chunk,
                        at: at + removed.len(),
                    };
                }
                true
            }
            Some(LastShrink::Simplified(ix)) if self.elements[ix].complicate() => {
                self.last = Some(LastShrink::Simplified(ix));
                true
            }
            Some(LastShrink::Simplified(_)) => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running, shrinking, saving.

/// Runs a schedule, turning a panic anywhere (the protocol included) into a failure. Returns
/// the verdict, the trace hash, and the trace if `tracing`.
fn run_caught(schedule: &Schedule, tracing: bool) -> (Result<RunStats, Failure>, u64, Vec<String>) {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        let mut sim = Sim::new(schedule, tracing);
        let verdict = sim.run(&schedule.steps);
        (
            verdict,
            sim.hash.finish(),
            sim.trace.take().unwrap_or_default(),
        )
    }));
    caught.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-text payload".to_string());
        let failure = Failure {
            property: Property::NoPanic,
            step: None,
            at_ms: 0,
            message,
        };
        (Err(failure), 0, Vec::new())
    })
}

/// Shrinks a failing schedule with its proptest value tree, keeping candidates that violate the
/// same property, within `budget`. Returns the smallest, its failure, and how many runs it took.
fn shrink(
    schedule: &Schedule,
    opts: &FuzzOptions,
    failure: Failure,
    budget: Duration,
) -> (Schedule, Failure, u64) {
    let deadline = Instant::now() + budget;
    let mut tree = Plan::new(schedule.seed, opts)
        .strategy()
        .tree(&mut runner_for(schedule.seed));
    let want = failure.property;
    let mut best = (schedule.clone(), failure);
    if tree.current() != schedule.steps {
        return (best.0, best.1, 0); // Not the schedule of its seed: no tree to shrink it with.
    }
    if let Some(step) = best.1.step {
        tree.truncate(step + 1);
        best.0.steps.truncate(step + 1);
    }
    let mut cache: HashMap<u64, Option<Failure>> = HashMap::new();
    let mut runs = 0u64;
    if !tree.simplify() {
        return (best.0, best.1, runs);
    }
    while Instant::now() < deadline {
        let candidate = Schedule {
            steps: tree.current(),
            ..schedule.clone()
        };
        let mut key = Fnv::default();
        candidate.steps.hash(&mut key);
        let verdict = cache
            .entry(key.finish())
            .or_insert_with(|| {
                runs += 1;
                candidate.run().err().filter(|f| f.property == want)
            })
            .clone();
        match verdict {
            Some(f) => {
                if let Some(step) = f.step {
                    tree.truncate(step + 1);
                }
                best = (
                    Schedule {
                        steps: tree.current(),
                        ..candidate
                    },
                    f,
                );
                if !tree.simplify() {
                    break;
                }
            }
            None => {
                if !tree.complicate() {
                    break;
                }
            }
        }
    }
    (best.0, best.1, runs)
}

/// Records a found failure, saving its schedule under `opts.out_dir`.
fn found(
    opts: &FuzzOptions,
    seed: u64,
    schedules_run: u64,
    schedule: &Schedule,
    original: Failure,
    failure: Failure,
) -> FoundFailure {
    let mut found = FoundFailure {
        seed,
        schedules_run,
        original,
        original_steps: schedule.steps.len(),
        failure,
        schedule: schedule.clone(),
        shrink_runs: 0,
        replay_path: None,
        save_error: None,
    };
    if let Some(dir) = &opts.out_dir {
        let path = dir.join(format!("sand-fuzz-{seed}.json"));
        let saved =
            std::fs::create_dir_all(dir).and_then(|()| schedule.save(&found.failure, &path));
        match saved {
            Ok(()) => found.replay_path = Some(path),
            Err(e) => found.save_error = Some(format!("cannot save {}: {e}", path.display())),
        }
    }
    found
}

/// FNV-1a: a hash that is the same in every run, for trace hashes and the shrink cache.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated cluster.

type Checked = Result<(), Failure>;

/// A message in flight on a worker's connection.
enum Msg {
    Up(ToGateway),
    Down(ToWorker),
}

struct Envelope {
    worker: usize,
    msg: Msg,
}

/// A simulated worker host: its local bus (none while crashed), the attempts its runtime runs,
/// and its connection.
struct Node {
    lb: Option<LocalBus>,
    /// The last incarnation used, persisted by the worker so a restart picks a larger one.
    incarnation: Incarnation,
    running: Vec<CallSpec>,
    /// The attempts its current incarnation started (the checker's record).
    started: BTreeSet<RunKey>,
    connected: bool,
    /// While crashed: when it restarts.
    restart_at: Time,
    /// Until when it cannot reach the gateway.
    partitioned_until: Time,
    /// Crashed for good: it never restarts.
    lost: bool,
}

/// A client's request: its idempotency key is `r` and its index. The client sends it again with
/// that key whenever it cannot know whether the gateway kept it.
struct Request {
    input: u32,
    /// The execution the gateway last named for it, and in which of the gateway's lives.
    exec: Option<(ExecId, u64)>,
}

fn request_key(r: usize) -> String {
    format!("r{r}")
}

struct Sim {
    config: SimConfig,
    program: Program,
    gq_config: GqConfig,
    lb_config: LbConfig,
    /// The deliberate bugs switched on in every state machine the run makes.
    mutations: Mutations,
    now: Time,
    gq: Option<GlobalQueue>,
    /// The gateway's life: bumped by every recovery.
    life: u64,
    gateway_restart_at: Time,
    /// The gateway's disk.
    store: DurableState,
    /// Batches handed out and not yet written.
    unpersisted: Vec<Batch>,
    /// The last batch the gateway's current life handed out, and the last one written.
    logged: LogIndex,
    written: LogIndex,
    /// Each pending call's history as the gateway's current life wrote it, and as the disk
    /// holds it: what a dispatch's reason is checked against.
    placements: Placements,
    durable_placements: Placements,
    /// The app changes asked of the gateway's current life and not yet told, oldest first:
    /// each with the batch that must be written before it is told (its own, or, for a removal
    /// that finds nothing, the last one before it).
    changes: VecDeque<LogIndex>,
    nodes: Vec<Node>,
    net: Vec<Envelope>,
    /// Every request made, in order.
    requests: Vec<Request>,
    /// Requests waiting for the gateway to come back, to be sent (again).
    waiting: Vec<usize>,
    /// The execution the disk holds for each idempotency key.
    durable_keys: BTreeMap<String, ExecId>,
    inputs: BTreeMap<ExecId, u32>,
    answers: BTreeMap<ExecId, Answer>,
    /// Executions one of whose attempts hit its deadline: they may fail with a timeout.
    timed_out: BTreeSet<ExecId>,
    /// Calls deleted in the durable history.
    deleted: BTreeSet<(ExecId, CallId)>,
    /// Joins fired in the durable history.
    fired: BTreeSet<(ExecId, CallId)>,
    faults: FaultCounts,
    executions: u64,
    step: Option<usize>,
    hash: Fnv,
    trace: Option<Vec<String>>,
}

impl Sim {
    fn new(schedule: &Schedule, tracing: bool) -> Self {
        let config = schedule.config.clone();
        let gq_config = GqConfig {
            failure_timeout: Duration::from_secs(5),
            timeout_grace: Duration::from_secs(1),
            held_max: 64,
            ..GqConfig::default()
        };
        let lb_config = LbConfig {
            worker: WorkerId(0),
            resend_interval: Duration::from_secs(1),
            overload_threshold: config.overload_threshold,
            window: config.window.max(1),
            message_weight_max: config.message_weight_max,
        };
        let nodes = (0..config.workers.max(1))
            .map(|_| Node {
                lb: None,
                started: BTreeSet::new(),
                incarnation: Incarnation(0),
                running: Vec::new(),
                connected: false,
                restart_at: Time::ZERO,
                partitioned_until: Time::ZERO,
                lost: false,
            })
            .collect();
        Self {
            config,
            program: schedule.program,
            gq_config,
            lb_config,
            mutations: schedule.config.mutations,
            now: Time::ZERO,
            gq: None,
            life: 0,
            gateway_restart_at: Time::ZERO,
            store: DurableState::default(),
            unpersisted: Vec::new(),
            logged: LogIndex(0),
            written: LogIndex(0),
            placements: Placements::default(),
            durable_placements: Placements::default(),
            changes: VecDeque::new(),
            nodes,
            net: Vec::new(),
            requests: Vec::new(),
            waiting: Vec::new(),
            durable_keys: BTreeMap::new(),
            inputs: BTreeMap::new(),
            answers: BTreeMap::new(),
            timed_out: BTreeSet::new(),
            deleted: BTreeSet::new(),
            fired: BTreeSet::new(),
            faults: FaultCounts::default(),
            executions: 0,
            step: None,
            hash: Fnv::default(),
            trace: tracing.then(Vec::new),
        }
    }

    fn run(&mut self, steps: &[Step]) -> Result<RunStats, Failure> {
        self.setup()?;
        for (i, step) in steps.iter().enumerate() {
            self.step = Some(i);
            step.hash(&mut self.hash);
            let now = self.now;
            self.note(|| format!("#{i} t={}ms {step:?}", now.as_millis()));
            self.apply(*step)?;
            self.check_calls_owned()?;
            self.check_answers_stay()?;
        }
        self.step = None;
        self.note(|| "-- the faults stop: heal everything, then require liveness".to_string());
        self.heal_and_finish()?;
        self.now.as_millis().hash(&mut self.hash);
        Ok(RunStats {
            steps: steps.len(),
            executions: self.executions,
            answered: self.answers.len() as u64,
            faults: self.faults,
            sim_ms: self.now.as_millis(),
            trace_hash: self.hash.finish(),
        })
    }

    /// A fresh cluster: the app deployed durably, every worker connected.
    fn setup(&mut self) -> Checked {
        let gq = GlobalQueue::new(self.gq_config, Time::ZERO).with_mutations(self.mutations);
        self.gq = Some(gq);
        self.drain_gq()?;
        self.changes.push_back(LogIndex(self.logged.0 + 1));
        if let Some(gq) = self.gq.as_mut() {
            gq.deploy(self.program.app_spec(), bundle("app"));
        }
        self.drain_gq()?;
        self.persist(usize::MAX)?;
        for w in 0..self.nodes.len() {
            self.restart_worker(w)?;
        }
        Ok(())
    }

    fn apply(&mut self, step: Step) -> Checked {
        let n = self.nodes.len();
        let w = |x: u8| usize::from(x) % n;
        match step {
            Step::Invoke(input) => self.invoke(input),
            Step::Deliver(i) => self.deliver(usize::from(i)),
            Step::Finish(i) => self.finish_any(usize::from(i)),
            Step::Persist(count) => self.persist(usize::from(count)),
            Step::Tick(ms) => self.tick(u64::from(ms)),
            Step::Break(x) => {
                if self.break_connection(w(x))? {
                    self.faults.connection_breaks += 1;
                }
                Ok(())
            }
            Step::Overflow(i) => {
                let Some(lost) = (!self.net.is_empty()).then(|| usize::from(i) % self.net.len())
                else {
                    return Ok(());
                };
                let worker = self.net[lost].worker;
                self.note(|| format!("  w{worker}: a message overflows its queue"));
                self.faults.overflows += 1;
                if self.break_connection(worker)? {
                    self.faults.connection_breaks += 1;
                }
                Ok(())
            }
            Step::Partition { worker, ms } => self.partition(w(worker), u64::from(ms)),
            Step::CrashWorker { worker, down_ms } => {
                self.crash_worker(w(worker), u64::from(down_ms))
            }
            Step::CrashWorkerForgetful { worker, down_ms } => {
                let w = w(worker);
                if self.nodes[w].lb.is_none() {
                    return Ok(());
                }
                self.crash_worker(w, u64::from(down_ms))?;
                let node = &mut self.nodes[w];
                node.incarnation = Incarnation(node.incarnation.0.saturating_sub(1));
                self.faults.incarnations_reused += 1;
                self.note(|| format!("  w{w}: lost the record of its last incarnation"));
                Ok(())
            }
            Step::CrashGateway { persisted, down_ms } => {
                self.crash_gateway(usize::from(persisted), u64::from(down_ms))
            }
            Step::Suspect(x) => self.suspect(w(x)),
            Step::KillWorker(x) => self.kill_worker(w(x)),
            Step::Retry(i) => {
                if self.requests.is_empty() {
                    return Ok(());
                }
                let r = usize::from(i) % self.requests.len();
                self.send_request(r)
            }
            Step::FireGqTimer(i) => self.fire_gq_timer(usize::from(i)),
            Step::ChangeApp(deploy) => self.change_app(deploy),
            Step::Poll(i) => {
                if self.requests.is_empty() {
                    return Ok(());
                }
                self.poll(usize::from(i) % self.requests.len())
            }
            Step::FireLbTimer { worker, timer } => {
                self.fire_lb_timer(w(worker), usize::from(timer))
            }
        }
    }

    fn fail(&self, property: Property, message: String) -> Failure {
        Failure {
            property,
            step: self.step,
            at_ms: self.now.as_millis(),
            message,
        }
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = self.trace.as_mut() {
            trace.push(line());
        }
    }

    // --- the gateway ---------------------------------------------------------------------------

    fn drain_gq(&mut self) -> Checked {
        let Some(gq) = self.gq.as_mut() else {
            return Ok(());
        };
        let outputs: Vec<GqOutput> = std::iter::from_fn(|| gq.poll_output()).collect();
        // The history first: a dispatch may come out before the batch that records it.
        for out in &outputs {
            if let GqOutput::Persist(batch) = out {
                self.placements.observe(batch);
            }
        }
        for out in outputs {
            out.hash(&mut self.hash);
            self.note(|| describe_gq(&out));
            if let Err(why) = durable_before_visible(&self.store, &out) {
                return Err(self.fail(Property::DurableBeforeVisible, why));
            }
            match out {
                GqOutput::Persist(batch) => {
                    self.logged = batch.index;
                    self.unpersisted.push(batch);
                }
                GqOutput::Send(w, msg) => {
                    if let ToWorker::Dispatch { call, reason, .. } = &msg {
                        if let Err(why) = self.placements.dispatched(call, *reason) {
                            return Err(self.fail(Property::DispatchReason, why));
                        }
                    }
                    let worker = w.0 as usize;
                    if self.nodes.get(worker).is_some_and(|n| n.connected) {
                        self.net.push(Envelope {
                            worker,
                            msg: Msg::Down(msg),
                        });
                    }
                }
                GqOutput::Accepted(_) => {} // Checked above: durable when it leaves.
                // A later change may be durable too, and undo what this one did: what must be
                // written is its own batch.
                GqOutput::Deployed(_) | GqOutput::Removed { .. } => {
                    let needs = self.changes.pop_front();
                    if needs.is_none_or(|needs| needs > self.written) {
                        let why = format!(
                            "{} before the disk held it (it needs batch {needs:?}; written: {:?})",
                            describe_gq(&out).trim(),
                            self.written
                        );
                        return Err(self.fail(Property::DurableBeforeVisible, why));
                    }
                }
                GqOutput::Respond(exec, answer) => self.on_answer(exec, answer)?,
            }
        }
        Ok(())
    }

    fn gq_handle(&mut self, event: GqEvent) -> Checked {
        let now = self.now;
        if let Some(gq) = self.gq.as_mut() {
            gq.handle(now, event);
        }
        self.drain_gq()
    }

    /// An operator deploys or removes the spare app (nothing, while the gateway is down).
    fn change_app(&mut self, deploy: bool) -> Checked {
        let Some(gq) = self.gq.as_mut() else {
            return Ok(());
        };
        let writes = deploy || gq.state().apps.contains_key(&spare());
        let needs = if writes {
            LogIndex(self.logged.0 + 1)
        } else {
            self.logged
        };
        self.changes.push_back(needs);
        if deploy {
            let spec = AppSpec {
                name: spare(),
                ..self.program.app_spec()
            };
            gq.deploy(spec, bundle("spare"));
        } else {
            gq.remove_app(&spare());
        }
        self.drain_gq()
    }

    /// Request `r`'s client looks its execution up, as `GET /v1/executions/{id}` does: an
    /// answer it shows must be on disk, and the one given, if one was.
    fn poll(&mut self, r: usize) -> Checked {
        let (Some(gq), Some((exec, _))) = (self.gq.as_ref(), self.requests[r].exec) else {
            return Ok(());
        };
        let Some(ExecStatus::Done(shown)) = gq.execution(exec).map(|e| &e.status) else {
            return Ok(());
        };
        let on_disk = self.store.execs.get(&exec).map(|e| &e.status);
        if on_disk != Some(&ExecStatus::Done(shown.clone())) {
            let why = format!("a look-up of {exec:?} showed {shown:?}; the disk holds {on_disk:?}");
            return Err(self.fail(Property::DurableBeforeVisible, why));
        }
        if let Some(given) = self.answers.get(&exec).filter(|a| *a != shown) {
            let why =
                format!("a look-up of {exec:?} showed {shown:?}, but it was answered {given:?}");
            return Err(self.fail(Property::AnswerStays, why));
        }
        Ok(())
    }

    fn on_answer(&mut self, exec: ExecId, answer: Answer) -> Checked {
        if let Some(first) = self.answers.get(&exec) {
            let why = format!("{exec:?} answered twice: {first:?}, then {answer:?}");
            return Err(self.fail(Property::OneAnswer, why));
        }
        let Some(input) = self.inputs.get(&exec).copied() else {
            let why = format!("{exec:?} answered {answer:?} but was never invoked");
            return Err(self.fail(Property::CorrectAnswer, why));
        };
        let expected = self.program.expected(input);
        let timeout = matches!(&answer, Answer::Error(e) if e.kind == ErrorKind::Timeout);
        if answer != expected && !(timeout && self.timed_out.contains(&exec)) {
            let why = format!("{exec:?} with input {input} answered {answer:?}, not {expected:?}");
            return Err(self.fail(Property::CorrectAnswer, why));
        }
        self.answers.insert(exec, answer);
        Ok(())
    }

    /// A new request.
    fn invoke(&mut self, input: u32) -> Checked {
        self.requests.push(Request { input, exec: None });
        self.send_request(self.requests.len() - 1)
    }

    /// Sends request `r` with its idempotency key, or queues it until the gateway is back.
    fn send_request(&mut self, r: usize) -> Checked {
        let now = self.now;
        let Some(gq) = self.gq.as_mut() else {
            if !self.waiting.contains(&r) {
                self.waiting.push(r);
            }
            return Ok(());
        };
        let Request { input, exec: named } = self.requests[r];
        let key = request_key(r);
        let invoked = gq.invoke(now, &app(), number(i64::from(input)), Some(key.clone()));
        let invoked = match invoked {
            Ok(invoked) => invoked,
            Err(e) => {
                let why = format!("the gateway refused an invocation of the deployed app: {e}");
                return Err(self.fail(Property::Accepts, why));
            }
        };
        let exec = invoked.exec;
        if named.is_some() {
            self.faults.requests_retried += 1;
        }
        self.note(|| format!("  client: request {key} with {input} named {exec:?}"));
        self.check_key(r, exec)?;
        self.requests[r].exec = Some((exec, self.life));
        self.inputs.insert(exec, input);
        if invoked.fresh {
            self.executions += 1;
        }
        self.drain_gq()
    }

    /// Writes the first `count` unwritten batches and tells the gateway.
    fn persist(&mut self, count: usize) -> Checked {
        let count = count.min(self.unpersisted.len());
        if count == 0 || self.gq.is_none() {
            return Ok(());
        }
        let batches: Vec<Batch> = self.unpersisted.drain(..count).collect();
        let mut upto = LogIndex(0);
        for batch in &batches {
            self.write(batch)?;
            upto = batch.index;
        }
        self.gq_handle(GqEvent::Persisted(upto))
    }

    /// Puts a batch on the disk, checking the durable history it extends.
    fn write(&mut self, batch: &Batch) -> Checked {
        self.note(|| format!("  disk: batch {:?} written", batch.index));
        self.written = batch.index;
        self.durable_placements.observe(batch);
        for op in &batch.ops {
            match op {
                Op::PutCall(c) if self.deleted.contains(&(c.exec, c.call)) => {
                    let why = format!("{:?} {:?} became pending again: {c:?}", c.exec, c.call);
                    return Err(self.fail(Property::CompletedStaysCompleted, why));
                }
                Op::DelCall(e, c) => {
                    self.deleted.insert((*e, *c));
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
                    return Err(self.fail(Property::AnswerStays, why));
                }
                Op::PutExec(e) => {
                    if let Some(id) = &e.idempotency {
                        self.durable_keys.insert(id.key.clone(), e.exec);
                    }
                }
                Op::DelExec(e) => self.durable_keys.retain(|_, x| x != e),
                Op::PutJoin(j) if j.fired => {
                    let key = (j.exec, j.spec.call);
                    let was = self.store.joins.get(&key).is_some_and(|d| d.fired);
                    if !was && !self.fired.insert(key) {
                        let why = format!("the join {key:?} fired twice");
                        return Err(self.fail(Property::JoinFiresOnce, why));
                    }
                }
                _ => {}
            }
        }
        self.store.apply_batch(batch);
        Ok(())
    }

    fn crash_gateway(&mut self, persisted: usize, down_ms: u64) -> Checked {
        if self.gq.is_none() {
            return Ok(());
        }
        let batches: Vec<Batch> = std::mem::take(&mut self.unpersisted);
        let keep = persisted.min(batches.len());
        for batch in &batches[..keep] {
            self.write(batch)?;
        }
        self.faults.batches_lost += (batches.len() - keep) as u64;
        self.faults.gateway_crashes += 1;
        self.gq = None;
        (self.logged, self.written) = (LogIndex(0), LogIndex(0));
        self.placements = self.durable_placements.clone();
        self.changes.clear(); // Their operators' connections broke with it.
        self.note(|| format!("  gateway: crashed after writing {keep} batches"));
        for w in 0..self.nodes.len() {
            if self.break_connection(w)? {
                self.faults.connection_breaks += 1;
            }
        }
        self.gateway_restart_at = self.now + Duration::from_millis(down_ms);
        // Every client still waiting for its answer lost its connection, and cannot know
        // whether its request was kept: it sends it again, with the same key, once the gateway
        // is back. The crash may lose an execution whose acceptance was not durable (the retry
        // then starts afresh), never one that was.
        for r in 0..self.requests.len() {
            let answered = self.requests[r]
                .exec
                .is_some_and(|(e, _)| self.answers.contains_key(&e));
            if !answered && !self.waiting.contains(&r) {
                self.waiting.push(r);
            }
        }
        Ok(())
    }

    fn restart_gateway(&mut self) -> Checked {
        if self.gq.is_some() {
            return Ok(());
        }
        let gq = GlobalQueue::recover(self.gq_config, self.now, self.store.clone())
            .with_mutations(self.mutations);
        self.gq = Some(gq);
        self.life += 1;
        self.note(|| "  gateway: recovered from the disk".to_string());
        // An execution that ended durably while its answer waited for the crashed gateway to
        // learn so is never answered again: its client reads the answer from the durable record
        // (the status API). It is checked like any other.
        let ended: Vec<(ExecId, Answer)> = self
            .store
            .execs
            .values()
            .filter(|e| !self.answers.contains_key(&e.exec))
            .filter_map(|e| match &e.status {
                ExecStatus::Done(answer) => Some((e.exec, answer.clone())),
                ExecStatus::Running => None,
            })
            .collect();
        for (exec, answer) in ended {
            self.note(|| format!("  client: reads {exec:?} answered {answer:?} from the record"));
            self.on_answer(exec, answer)?;
        }
        self.drain_gq()?;
        for w in 0..self.nodes.len() {
            self.connect(w)?;
        }
        self.check_answers_stay()?;
        for r in std::mem::take(&mut self.waiting) {
            self.send_request(r)?;
        }
        Ok(())
    }

    fn deliver(&mut self, i: usize) -> Checked {
        if self.net.is_empty() {
            return Ok(());
        }
        let Envelope { worker, msg } = self.net.remove(i % self.net.len());
        match msg {
            Msg::Up(msg) => self.deliver_to_gq(worker, msg),
            Msg::Down(msg) => {
                self.note(|| format!("  w{worker} receives: {msg:?}"));
                self.lb_handle(worker, LbEvent::Message(msg))
            }
        }
    }

    fn deliver_to_gq(&mut self, worker: usize, msg: ToGateway) -> Checked {
        if !matches!(msg, ToGateway::Heartbeat { .. }) {
            self.note(|| format!("  gq receives from w{worker}: {msg:?}"));
        }
        let Some(gq) = self.gq.as_ref() else {
            return Ok(()); // Cannot happen: messages die with the gateway's connections.
        };
        let wid = WorkerId(worker as u32);
        let incarnation = match &msg {
            ToGateway::Hello { incarnation, .. }
            | ToGateway::Heartbeat { incarnation, .. }
            | ToGateway::Progress { incarnation, .. } => *incarnation,
        };
        let fenced = gq.state().workers.get(&wid).is_some_and(|r| {
            incarnation < r.incarnation || (incarnation == r.incarnation && r.dead)
        });
        let before = fenced.then(|| fingerprint(gq));
        self.gq_handle(GqEvent::Message(wid, msg))?;
        if let (Some(before), Some(gq)) = (before, self.gq.as_ref()) {
            if fingerprint(gq) != before {
                let why =
                    format!("a message from fenced {wid:?} {incarnation:?} changed the queue");
                return Err(self.fail(Property::FencedChangesNothing, why));
            }
        }
        Ok(())
    }

    fn suspect(&mut self, w: usize) -> Checked {
        let timer = GqTimer::Suspect(WorkerId(w as u32));
        let Some(gq) = self.gq.as_ref() else {
            return Ok(());
        };
        if !gq.timers().any(|(t, _)| t == timer) {
            return Ok(());
        }
        if self.nodes[w].lb.is_some() {
            self.faults.false_suspicions += 1;
        } else {
            self.faults.early_timers += 1;
        }
        self.fire_gq(timer)
    }

    fn fire_gq_timer(&mut self, i: usize) -> Checked {
        let Some(gq) = self.gq.as_ref() else {
            return Ok(());
        };
        let timers: Vec<GqTimer> = gq.timers().map(|(t, _)| t).collect();
        let Some(timer) = timers.get(i % timers.len().max(1)).copied() else {
            return Ok(());
        };
        let alive = |w: WorkerId| self.nodes.get(w.0 as usize).is_some_and(|n| n.lb.is_some());
        match timer {
            GqTimer::Suspect(w) if alive(w) => self.faults.false_suspicions += 1,
            _ => self.faults.early_timers += 1,
        }
        self.fire_gq(timer)
    }

    /// Fires one gateway timer, noting a deadline.
    fn fire_gq(&mut self, timer: GqTimer) -> Checked {
        if let GqTimer::Deadline(exec, _) = timer {
            self.timed_out.insert(exec);
        }
        self.note(|| format!("  gq: timer {timer:?} fires"));
        self.gq_handle(GqEvent::Timeout(timer))
    }

    /// Fires the due gateway timers one by one (one may cancel a later one), then the due worker
    /// timers; `deadlines` says whether gateway `Deadline` timers fire too.
    fn fire_due(&mut self, deadlines: bool) -> Checked {
        let now = self.now;
        let due: Vec<GqTimer> = self.gq.as_ref().map_or_else(Vec::new, |gq| {
            gq.timers()
                .filter(|(t, at)| *at <= now && (deadlines || !matches!(t, GqTimer::Deadline(..))))
                .map(|(t, _)| t)
                .collect()
        });
        for timer in due {
            let set = self
                .gq
                .as_ref()
                .is_some_and(|gq| gq.timers().any(|(t, _)| t == timer));
            if set {
                self.fire_gq(timer)?;
            }
        }
        for w in 0..self.nodes.len() {
            if let Some(lb) = self.nodes[w].lb.as_mut() {
                lb.handle_timeouts(now);
            }
            self.drain_lb(w)?;
        }
        Ok(())
    }

    // --- the workers ---------------------------------------------------------------------------

    fn drain_lb(&mut self, w: usize) -> Checked {
        let Some(lb) = self.nodes[w].lb.as_mut() else {
            return Ok(());
        };
        let outputs: Vec<LbOutput> = std::iter::from_fn(|| lb.poll_output()).collect();
        for out in outputs {
            out.hash(&mut self.hash);
            if !matches!(out, LbOutput::Send(ToGateway::Heartbeat { .. })) {
                self.note(|| describe_lb(w, &out));
            }
            let node = &mut self.nodes[w];
            match out {
                LbOutput::Send(msg) => {
                    if node.connected {
                        self.net.push(Envelope {
                            worker: w,
                            msg: Msg::Up(msg),
                        });
                    }
                }
                LbOutput::Run(spec) => {
                    let run = (spec.exec, spec.call, spec.attempt);
                    if !node.started.insert(run) {
                        let why = format!("w{w} started {run:?} twice in {:?}", node.incarnation);
                        return Err(self.fail(Property::StartsOnce, why));
                    }
                    node.running.push(spec);
                }
                LbOutput::Abort(run) => node.running.retain(|s| (s.exec, s.call, s.attempt) != run),
                LbOutput::Incarnation(i) => {
                    node.incarnation = i;
                    node.started.clear();
                }
            }
        }
        Ok(())
    }

    fn lb_handle(&mut self, w: usize, event: LbEvent) -> Checked {
        let now = self.now;
        if let Some(lb) = self.nodes[w].lb.as_mut() {
            lb.handle(now, event);
        }
        self.drain_lb(w)
    }

    /// Finishes the `i`-th running attempt, counted across workers.
    fn finish_any(&mut self, i: usize) -> Checked {
        let total: usize = self.nodes.iter().map(|n| n.running.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let mut i = i % total;
        for w in 0..self.nodes.len() {
            let len = self.nodes[w].running.len();
            if i < len {
                return self.finish(w, i);
            }
            i -= len;
        }
        Ok(())
    }

    fn finish(&mut self, w: usize, i: usize) -> Checked {
        let spec = self.nodes[w].running.remove(i);
        let result = self.program.run(&spec);
        if matches!(result, GrainResult::Error(_)) {
            self.faults.grain_errors += 1;
        }
        self.note(|| {
            format!(
                "  w{w}: {:?} {:?} {:?} ({}) finished: {result:?}",
                spec.exec, spec.call, spec.attempt, spec.grain
            )
        });
        let run = (spec.exec, spec.call, spec.attempt);
        self.lb_handle(w, LbEvent::Finished { run, result })
    }

    /// Breaks a worker's connection, dropping what is in flight on it. Returns whether it was up.
    fn break_connection(&mut self, w: usize) -> Result<bool, Failure> {
        let before = self.net.len();
        self.net.retain(|e| e.worker != w);
        self.faults.messages_dropped += (before - self.net.len()) as u64;
        if !self.nodes[w].connected {
            return Ok(false);
        }
        self.note(|| format!("  w{w}: connection broken"));
        self.nodes[w].connected = false;
        self.lb_handle(w, LbEvent::Disconnected)?;
        self.gq_handle(GqEvent::Disconnected(WorkerId(w as u32)))?;
        Ok(true)
    }

    fn connect(&mut self, w: usize) -> Checked {
        let node = &self.nodes[w];
        if self.gq.is_none() || node.lb.is_none() || node.connected {
            return Ok(());
        }
        if self.now < node.partitioned_until {
            return Ok(());
        }
        self.nodes[w].connected = true;
        self.note(|| format!("  w{w}: connected"));
        self.lb_handle(w, LbEvent::Connected)
    }

    fn partition(&mut self, w: usize, ms: u64) -> Checked {
        if self.break_connection(w)? {
            self.faults.connection_breaks += 1;
        }
        let until = self.now + Duration::from_millis(ms);
        let node = &mut self.nodes[w];
        node.partitioned_until = node.partitioned_until.max(until);
        self.faults.partitions += 1;
        Ok(())
    }

    fn crash_worker(&mut self, w: usize, down_ms: u64) -> Checked {
        if self.nodes[w].lb.is_none() {
            return Ok(());
        }
        if self.break_connection(w)? {
            self.faults.connection_breaks += 1;
        }
        let restart_at = self.now + Duration::from_millis(down_ms);
        let node = &mut self.nodes[w];
        node.lb = None;
        node.running.clear();
        node.restart_at = restart_at;
        self.faults.worker_crashes += 1;
        self.note(|| format!("  w{w}: crashed"));
        Ok(())
    }

    fn restart_worker(&mut self, w: usize) -> Checked {
        let node = &mut self.nodes[w];
        if node.lb.is_some() || node.lost {
            return Ok(());
        }
        node.incarnation = node.incarnation.next();
        let incarnation = node.incarnation;
        let config = LbConfig {
            worker: WorkerId(w as u32),
            ..self.lb_config
        };
        node.lb = Some(LocalBus::new(config, incarnation).with_mutations(self.mutations));
        node.started.clear();
        self.note(|| format!("  w{w}: started as {incarnation:?}"));
        self.connect(w)
    }

    /// Crashes a worker for good, unless `workers - 1` have been lost already.
    fn kill_worker(&mut self, w: usize) -> Checked {
        let lost = self.nodes.iter().filter(|n| n.lost).count();
        if self.nodes[w].lost || lost + 1 >= self.nodes.len() {
            return Ok(());
        }
        self.crash_worker(w, 0)?;
        self.nodes[w].lost = true;
        self.faults.workers_lost += 1;
        self.note(|| format!("  w{w}: lost for good"));
        Ok(())
    }

    fn fire_lb_timer(&mut self, w: usize, i: usize) -> Checked {
        let Some(lb) = self.nodes[w].lb.as_ref() else {
            return Ok(());
        };
        let timers: Vec<_> = lb.timers().map(|(t, _)| t).collect();
        let Some(timer) = timers.get(i % timers.len().max(1)).copied() else {
            return Ok(());
        };
        self.faults.early_timers += 1;
        self.note(|| format!("  w{w}: timer {timer:?} fires"));
        self.lb_handle(w, LbEvent::Timeout(timer))
    }

    // --- time ----------------------------------------------------------------------------------

    fn tick(&mut self, ms: u64) -> Checked {
        self.now = self.now + Duration::from_millis(ms);
        if self.gq.is_none() && self.now >= self.gateway_restart_at {
            self.restart_gateway()?;
        }
        for w in 0..self.nodes.len() {
            if self.nodes[w].lb.is_none() && self.now >= self.nodes[w].restart_at {
                self.restart_worker(w)?;
            }
            self.connect(w)?;
        }
        self.fire_due(true)
    }

    /// Moves time to the next timer other than a gateway deadline and fires what is due.
    /// Returns false if no such timer is set.
    fn advance_time(&mut self) -> Result<bool, Failure> {
        let mut next = self.gq.as_ref().and_then(|gq| {
            gq.timers()
                .filter(|(t, _)| !matches!(t, GqTimer::Deadline(..)))
                .map(|(_, at)| at)
                .min()
        });
        for node in &self.nodes {
            if let Some(at) = node.lb.as_ref().and_then(LocalBus::poll_timeout) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        let Some(next) = next else {
            return Ok(false);
        };
        self.now = self.now.max(next);
        self.fire_due(false)?;
        Ok(true)
    }

    // --- healing and liveness ------------------------------------------------------------------

    /// Heals every fault but the loss of workers, then runs the cluster with no more faults,
    /// delivering in order and moving time to the next timer when nothing else moves, until
    /// every request and every running execution is answered and every remaining worker's
    /// backlog is empty; or fails.
    fn heal_and_finish(&mut self) -> Checked {
        for node in &mut self.nodes {
            node.partitioned_until = Time::ZERO;
        }
        self.restart_gateway()?;
        for w in 0..self.nodes.len() {
            self.restart_worker(w)?;
            self.connect(w)?;
        }
        let healed_at = self.now;
        // Every request now names an execution of this gateway life or one the disk holds: a
        // request whose execution a crash lost was sent again when the gateway came back.
        let mut must: BTreeSet<ExecId> = self
            .requests
            .iter()
            .filter_map(|r| r.exec.map(|(e, _)| e))
            .collect();
        if let Some(gq) = self.gq.as_ref() {
            let running = gq.state().execs.values();
            must.extend(
                running
                    .filter(|e| e.status == ExecStatus::Running)
                    .map(|e| e.exec),
            );
        }
        let limit = healed_at + Duration::from_millis(self.config.liveness_ms_max);
        for _ in 0..LIVENESS_ACTIONS_MAX {
            self.check_calls_owned()?;
            if !self.unpersisted.is_empty() {
                self.persist(usize::MAX)?;
                continue;
            }
            if !self.net.is_empty() {
                self.deliver(0)?;
                continue;
            }
            if let Some(w) = self.nodes.iter().position(|n| !n.running.is_empty()) {
                self.finish(w, 0)?;
                continue;
            }
            let answered = must.iter().all(|e| self.answers.contains_key(e));
            let drained = self
                .nodes
                .iter()
                .all(|n| n.lost || n.lb.as_ref().is_some_and(|lb| lb.backlog() == (0, 0)));
            if answered && drained {
                return self.check_answers_stay();
            }
            if self.now > limit || !self.advance_time()? {
                let why = self.stall_report(&must, healed_at);
                return Err(self.fail(Property::Liveness, why));
            }
        }
        let why = format!(
            "no quiescence after {LIVENESS_ACTIONS_MAX} actions: {}",
            self.stall_report(&must, healed_at)
        );
        Err(self.fail(Property::Liveness, why))
    }

    fn stall_report(&self, must: &BTreeSet<ExecId>, healed_at: Time) -> String {
        let missing: Vec<ExecId> = must
            .iter()
            .filter(|e| !self.answers.contains_key(e))
            .copied()
            .collect();
        let mut out = format!(
            "{} of {} owed executions unanswered {} ms after healing",
            missing.len(),
            must.len(),
            self.now.as_millis() - healed_at.as_millis()
        );
        if let Some(gq) = self.gq.as_ref() {
            for exec in missing.iter().take(3) {
                let calls: Vec<String> = gq
                    .state()
                    .calls
                    .values()
                    .filter(|c| c.exec == *exec)
                    .map(|c| {
                        format!(
                            "{:?} {} {:?} owner {:?}",
                            c.call, c.grain, c.attempt, c.owner
                        )
                    })
                    .collect();
                out += &format!("; {exec:?} pending: [{}]", calls.join(", "));
            }
        }
        for (w, node) in self.nodes.iter().enumerate() {
            if let Some(lb) = node.lb.as_ref() {
                let (sent, unsent) = lb.backlog();
                if sent + unsent > 0 {
                    let i = lb.incarnation();
                    out += &format!("; w{w} {i:?} holds {sent} unacked and {unsent} unsent");
                }
            }
        }
        out
    }

    // --- checks --------------------------------------------------------------------------------

    /// Request `r`'s key names one execution: the one the disk holds for it, if any; and within
    /// one gateway life, the one named first. Only an execution whose acceptance a crash lost
    /// (it never reached the disk) may be replaced, by the retry after the crash.
    fn check_key(&self, r: usize, exec: ExecId) -> Checked {
        let key = request_key(r);
        let durable = self.durable_keys.get(&key).map(|e| (*e, "the disk holds"));
        let named = self.requests[r]
            .exec
            .filter(|(_, life)| *life == self.life)
            .map(|(e, _)| (e, "this gateway life named"));
        for (want, why) in durable.into_iter().chain(named) {
            if want != exec {
                let why = format!("request {key} was given {exec:?}, but {why} {want:?} for it");
                return Err(self.fail(Property::OneExecutionPerKey, why));
            }
        }
        Ok(())
    }

    /// Every answer given is still the execution's answer in the gateway's record, which a
    /// client polls (and a retry with its key finds).
    fn check_answers_stay(&self) -> Checked {
        let Some(gq) = self.gq.as_ref() else {
            return Ok(());
        };
        for (exec, answer) in &self.answers {
            let status = gq.execution(*exec).map(|e| &e.status);
            if !matches!(status, Some(ExecStatus::Done(a)) if a == answer) {
                let why =
                    format!("{exec:?} was answered {answer:?}, but its record says {status:?}");
                return Err(self.fail(Property::AnswerStays, why));
            }
        }
        Ok(())
    }

    /// Every pending call is owned by a live incarnation; an unowned one waits for its retry
    /// timer, or for some worker to connect.
    fn check_calls_owned(&self) -> Checked {
        let Some(gq) = self.gq.as_ref() else {
            return Ok(());
        };
        let state = gq.state();
        let placeable = (0..self.nodes.len()).any(|w| gq.is_connected(WorkerId(w as u32)));
        let retrying: BTreeSet<(ExecId, CallId)> = gq
            .timers()
            .filter_map(|(t, _)| match t {
                GqTimer::Retry(e, c) => Some((e, c)),
                _ => None,
            })
            .collect();
        for (key, call) in &state.calls {
            match call.owner {
                Some(owner) => {
                    let live = state
                        .workers
                        .get(&owner.worker)
                        .is_some_and(|r| r.incarnation == owner.incarnation && !r.dead);
                    if !live {
                        let why = format!("{key:?} is owned by {owner:?}, not a live incarnation");
                        return Err(self.fail(Property::CallsOwned, why));
                    }
                }
                None if placeable && !retrying.contains(key) => {
                    let why =
                        format!("{key:?} waits unplaced, with no retry due, while a worker is up");
                    return Err(self.fail(Property::CallsOwned, why));
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// A hash of what a fenced message may not change: the queue's durable state and its timers.
fn fingerprint(gq: &GlobalQueue) -> u64 {
    let mut h = Fnv::default();
    gq.state().hash(&mut h);
    for timer in gq.timers() {
        timer.hash(&mut h);
    }
    h.finish()
}

/// What leaves the gateway promises something only once the disk holds it.
fn durable_before_visible(store: &DurableState, out: &GqOutput) -> Result<(), String> {
    if promises::is_durable(store, out) {
        Ok(())
    } else {
        Err(format!(
            "{} before the disk held it",
            describe_gq(out).trim()
        ))
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
                            .insert((rec.exec, rec.call, rec.attempt), reason);
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
        let run = (call.exec, call.call, call.attempt);
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

fn describe_gq(out: &GqOutput) -> String {
    match out {
        GqOutput::Persist(b) => format!("  gq: write batch {:?} ({} ops)", b.index, b.ops.len()),
        GqOutput::Send(w, msg) => format!("  gq → {w:?} sent: {msg:?}"),
        GqOutput::Accepted(exec) => format!("  gq: {exec:?} accepted"),
        GqOutput::Respond(exec, answer) => format!("  gq: {exec:?} answered {answer:?}"),
        GqOutput::Deployed(app) => format!("  gq: {app} deployed"),
        GqOutput::Removed { app, existed } => format!("  gq: {app} removed (deployed: {existed})"),
    }
}

fn describe_lb(w: usize, out: &LbOutput) -> String {
    match out {
        LbOutput::Send(msg) => format!("  w{w} → gq sent: {msg:?}"),
        LbOutput::Run(spec) => format!(
            "  w{w}: run {:?} {:?} {:?} ({} {:?})",
            spec.exec, spec.call, spec.attempt, spec.grain, spec.input
        ),
        LbOutput::Abort(run) => format!("  w{w}: abort {run:?}"),
        LbOutput::Incarnation(i) => format!("  w{w}: now {i:?}"),
    }
}

/// Mutations as a list of names in replay files.
mod mutation_names {
    use super::{Mutation, Mutations};
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(m: &Mutations, s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<&str> = Mutation::ALL
            .iter()
            .filter(|x| m.has(**x))
            .map(|x| x.name())
            .collect();
        names.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Mutations, D::Error> {
        let names: Vec<String> = Vec::deserialize(d)?;
        match names.as_slice() {
            [] => Ok(Mutations::NONE),
            [one] => one
                .parse::<Mutation>()
                .map(Mutations::only)
                .map_err(D::Error::custom),
            _ => Err(D::Error::custom("at most one mutation can be switched on")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.
mod tests {
    use super::*;
    use sand_protocol::ids::Attempt;
    use sand_protocol::wire::Cont;

    fn spec(grain_name: &str, input: Payload, attempt: u64) -> CallSpec {
        let exec = ExecId::new(1, 0);
        CallSpec {
            exec,
            call: exec.root_call(),
            attempt: Attempt(attempt),
            app: app(),
            grain: GrainName::new(grain_name).unwrap(),
            input,
            cont: Cont::Client,
            depth_left: 16,
        }
    }

    /// Runs the program by hand, as one worker would with no faults, and compares with the
    /// closed form the checker uses.
    #[test]
    fn the_expected_answer_is_what_the_grains_compute() {
        let program = Program {
            hops_max: 3,
            width_max: 4,
            refuse_every: 7,
            flaky: true,
        };
        let mut refused = 0;
        for n in 0..60u32 {
            let mut result = program.run(&spec("a", number(i64::from(n)), 0));
            let answer = loop {
                match result {
                    GrainResult::Next { grain, input } => {
                        result = program.run(&spec(grain.as_str(), input, 1));
                    }
                    GrainResult::FanOut { branches, join } => {
                        let values: Vec<Payload> = branches
                            .into_iter()
                            .map(
                                |(g, input)| match program.run(&spec(g.as_str(), input, 1)) {
                                    GrainResult::Return(v) => v,
                                    other => panic!("a branch gave {other:?}"),
                                },
                            )
                            .collect();
                        let input = Payload::json_array(&values).unwrap();
                        result = program.run(&spec(join.as_str(), input, 1));
                    }
                    GrainResult::Return(v) => break Answer::Value(v),
                    GrainResult::Error(e) => break Answer::Error(e),
                }
            };
            refused += usize::from(matches!(answer, Answer::Error(_)));
            assert_eq!(answer, program.expected(n), "input {n}");
        }
        assert_eq!(refused, 8);
        // Flaky `c` fails an odd input's first attempt of an epoch, and only that.
        assert!(matches!(
            program.run(&spec("c", number(3), 1 << 32)),
            GrainResult::Error(_)
        ));
        assert!(matches!(
            program.run(&spec("c", number(3), (1 << 32) + 1)),
            GrainResult::Return(_)
        ));
        assert!(matches!(
            program.run(&spec("c", number(4), 0)),
            GrainResult::Return(_)
        ));
    }

    #[test]
    fn a_generated_schedule_invokes_every_execution() {
        let opts = FuzzOptions::default();
        let s = Schedule::generate(7, &opts);
        let invokes = s
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Invoke(_)))
            .count();
        assert_eq!(invokes, 100);
        assert_eq!(s.config.workers, 5);
        assert!(s.steps.len() > 1000, "{} steps", s.steps.len());
        assert_ne!(Schedule::generate(8, &opts).steps, s.steps);
    }

    #[test]
    fn the_tree_deletes_in_chunks_then_simplifies() {
        let opts = FuzzOptions {
            executions: 4,
            steps_per_execution: 4,
            ..FuzzOptions::default()
        };
        let plan = Plan::new(3, &opts);
        let mut tree = plan.strategy().tree(&mut runner_for(3));
        let full = tree.current();
        assert!(full.len() >= 4);
        assert!(tree.simplify());
        assert_eq!(tree.current(), full[full.len().div_ceil(2)..].to_vec());
        assert!(tree.complicate());
        assert_eq!(tree.current(), full);
        // Accepting every deletion shrinks the schedule to nothing.
        while tree.simplify() {}
        assert!(tree.current().is_empty());
        let mut tree = plan.strategy().tree(&mut runner_for(3));
        tree.truncate(2);
        assert_eq!(tree.current(), full[..2].to_vec());
    }

    #[test]
    fn a_calm_cluster_answers_every_execution() {
        let schedule = Schedule {
            seed: 0,
            config: Plan::new(0, &FuzzOptions::default()).config,
            program: Program {
                hops_max: 2,
                width_max: 3,
                refuse_every: 5,
                flaky: true,
            },
            steps: (0..20).map(Step::Invoke).collect(),
        };
        let stats = schedule.run().unwrap();
        assert_eq!(stats.executions, 20);
        assert_eq!(stats.answered, 20);
    }

    #[test]
    fn mutations_round_trip_through_json() {
        let mut config = Plan::new(0, &FuzzOptions::default()).config;
        config.mutations = Mutations::only(Mutation::EarlyJoin);
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"early-join\""), "{json}");
        assert_eq!(serde_json::from_str::<SimConfig>(&json).unwrap(), config);
        let two = json.replace("\"early-join\"", "\"early-join\",\"no-resend\"");
        assert!(serde_json::from_str::<SimConfig>(&two).is_err());
    }
}
