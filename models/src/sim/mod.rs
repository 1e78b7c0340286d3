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
//! It is four parts, as in TigerBeetle's VOPR:
//!
//! - `schedule`: what happens when — the settings, the grains and the steps a seed gives;
//! - `world`: the simulated cluster — the real state machines, the network, the gateway's disk,
//!   the clients and the clock — which runs the steps and records what it observes;
//! - `check`: the properties, judged only from what the world observed;
//! - `shrink`: minimising a failing schedule.
//!
//! This module ties them together: fuzzing, saving and replaying schedules.
//!
//! It never re-implements the protocol: the world only feeds the state machines events and reads
//! their outputs and public getters. Nothing here reads a clock or draws randomness except from
//! the seed; the wall clock only measures throughput and bounds shrinking.

mod check;
mod schedule;
mod shrink;
mod world;

use std::hash::Hasher;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sand_protocol::global_queue::GqOutput;
use sand_protocol::local_bus::LbOutput;
use sand_protocol::mutations::Mutations;
use serde::{Deserialize, Serialize};

pub use check::{Failure, Property};
pub use schedule::{Program, Schedule, SimConfig, Step};
pub use world::FaultCounts;

use shrink::shrink;
use world::World;

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

// ---------------------------------------------------------------------------------------------
// Running, saving.

/// Runs a schedule, turning a panic anywhere (the protocol included) into a failure. Returns
/// the verdict, the trace hash, and the trace if `tracing`.
fn run_caught(schedule: &Schedule, tracing: bool) -> (Result<RunStats, Failure>, u64, Vec<String>) {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        let mut world = World::new(schedule, tracing);
        let verdict = world.run(&schedule.steps);
        (
            verdict,
            world.hash.finish(),
            world.trace.take().unwrap_or_default(),
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

/// A gateway output as a line of a trace.
fn describe_gq(out: &GqOutput) -> String {
    match out {
        GqOutput::Persist(b) => format!("  gq: write batch {:?} ({} ops)", b.index, b.ops.len()),
        GqOutput::Send(w, msg) => format!("  gq → {w:?} sent: {msg:?}"),
        GqOutput::ConfirmInvoke(exec) => format!("  gq: {exec:?} accepted"),
        GqOutput::Respond(exec, answer) => format!("  gq: {exec:?} answered {answer:?}"),
        GqOutput::ConfirmDeploy(app) => format!("  gq: {app} deployed"),
        GqOutput::ConfirmRemove { app, existed } => {
            format!("  gq: {app} removed (deployed: {existed})")
        }
    }
}

/// A worker's output as a line of a trace.
fn describe_lb(w: usize, out: &LbOutput) -> String {
    match out {
        LbOutput::Send(msg) => format!("  w{w} → gq sent: {msg:?}"),
        LbOutput::Run(spec) => format!(
            "  w{w}: run {:?} {:?} {:?} ({} {:?})",
            spec.exec, spec.call, spec.attempt, spec.grain, spec.input
        ),
        LbOutput::Abort(run) => format!("  w{w}: abort {run:?}"),
        LbOutput::PersistIncarnation(i) => format!("  w{w}: now {i:?}"),
    }
}
