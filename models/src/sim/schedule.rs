//! What happens when: a seed becomes a [`Schedule`] — the cluster's settings, the grain
//! [`Program`] and the [`Step`]s — through a plan (settings, program, fault profile) and a
//! proptest strategy whose value tree, built from a `TestRng` seeded with the same seed, gives
//! the steps. The same tree is what [`shrink`](super::shrink) minimises.

use proptest::prelude::any;
use proptest::strategy::{BoxedStrategy, NewTree, Strategy, Union, ValueTree};
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use sand_protocol::durable::Answer;
use sand_protocol::ids::{AppName, GrainName};
use sand_protocol::local_bus::GrainResult;
use sand_protocol::mutations::{Mutation, Mutations};
use sand_protocol::policy::{AppSpec, GrainPolicy};
use sand_protocol::wire::{AppBundle, CallSpec, ErrorKind, GrainError, Payload};
use serde::{Deserialize, Serialize};

use super::shrink::ScheduleTree;
use super::FuzzOptions;

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

fn refusal() -> GrainError {
    GrainError::new(ErrorKind::Raised, "a refuses")
}

pub(super) fn app() -> AppName {
    // Invariant: "app" is a valid name (ASCII letters, 1 to 64 bytes).
    AppName::new("app").expect("\"app\" is a valid app name")
}

/// The app an operator deploys and removes while the requests run.
pub(super) fn spare() -> AppName {
    // Invariant: "spare" is a valid name (ASCII letters, 1 to 64 bytes).
    AppName::new("spare").expect("\"spare\" is a valid app name")
}

pub(super) fn bundle(digest: &str) -> AppBundle {
    AppBundle {
        digest: digest.into(),
        archive: Default::default(),
    }
}

fn grain(name: &'static str) -> GrainName {
    // Invariant: only the literal names "a" to "d" reach here, all valid.
    GrainName::new(name).expect("grain names a to d are valid")
}

pub(super) fn number(n: i64) -> Payload {
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
pub(super) struct Plan {
    pub(super) config: SimConfig,
    program: Program,
    profile: Profile,
    executions: u32,
    segment_max: u32,
}

impl Plan {
    pub(super) fn new(seed: u64, opts: &FuzzOptions) -> Self {
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

    pub(super) fn strategy(&self) -> ScheduleStrategy {
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
pub(super) fn runner_for(seed: u64) -> TestRunner {
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
pub(super) struct ScheduleStrategy {
    invoke: BoxedStrategy<Step>,
    step: BoxedStrategy<Step>,
    executions: u32,
    segment_max: u32,
}

impl ScheduleStrategy {
    pub(super) fn tree(&self, runner: &mut TestRunner) -> ScheduleTree {
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
    use sand_protocol::ids::{Attempt, ExecId};
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
            exec_ref: String::new(),
            traceparent: Default::default(),
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
