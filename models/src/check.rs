//! Running the model checker: explores a [`ModelCfg`]'s model and says, for each property,
//! whether it holds, with a readable trace for every counterexample or example found.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stateright::actor::ActorModelAction;
use stateright::{Checker, Expectation, HasDiscoveries, Model, Path};

use crate::model::{ModelCfg, Msg, SandAction, SandModel, SandState, Timer};

/// How to run the checker.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Worker threads (breadth-first search finds the shortest traces with one).
    pub threads: usize,
    /// Do not explore past this many steps.
    pub depth_max: Option<usize>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    /// Stop at the first counterexample.
    ///
    /// With this or a depth bound the search is breadth-first: a trace found is a shortest
    /// one, and a bounded search sees every path up to the bound. Otherwise it is depth-first,
    /// whose memory grows with the states seen and the depth, not with the breadth of the
    /// frontier (a breadth-first search of the three-fault model held millions of whole states
    /// in its queue and ran out of 23 GiB).
    pub stop_at_failure: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            threads: 2,
            depth_max: None,
            timeout: None,
            stop_at_failure: false,
        }
    }
}

/// One property's outcome.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// The property's name.
    pub property: &'static str,
    /// Safety (`Always`), liveness (`Eventually`) or reachability (`Sometimes`).
    pub expectation: Expectation,
    /// Whether it holds: no counterexample for `Always` and `Eventually`, an example found for
    /// `Sometimes`. Only conclusive when the check completed.
    pub holds: bool,
    /// Whether `holds` can be trusted either way. Always true for safety. False for liveness
    /// and reachability when the search was cut short (by its deadline or depth bound, or at
    /// its first failure for reachability): a path cut short looks like one that never gets
    /// there.
    pub conclusive: bool,
    /// The counterexample (or the example, for `Sometimes`) as readable steps.
    pub trace: Option<String>,
}

/// What a check found.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// States explored, counting repeats.
    pub states: usize,
    /// Distinct states explored.
    pub unique_states: usize,
    /// The longest path explored.
    pub depth_max: usize,
    /// Whether the whole space (within the depth bound) was explored.
    pub complete: bool,
    /// How long it took.
    pub elapsed: Duration,
    /// Each property's verdict, in the model's order.
    pub verdicts: Vec<Verdict>,
}

impl CheckReport {
    /// The properties that failed: a counterexample to `Always`/`Eventually`, or, for a complete
    /// check, no example of `Sometimes`.
    pub fn failures(&self) -> impl Iterator<Item = &Verdict> {
        self.verdicts.iter().filter(|v| v.conclusive && !v.holds)
    }
}

/// Explores `cfg`'s model.
pub fn check(cfg: ModelCfg, opts: &CheckOptions) -> CheckReport {
    check_with_progress(cfg, opts, |_| {})
}

/// How far a running check has got.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Distinct states explored so far.
    pub unique_states: usize,
    /// The longest path so far.
    pub depth_max: usize,
    /// Time since the start.
    pub elapsed: Duration,
}

/// Explores `cfg`'s model, calling `on_progress` about once a second.
pub fn check_with_progress(
    cfg: ModelCfg,
    opts: &CheckOptions,
    mut on_progress: impl FnMut(Progress),
) -> CheckReport {
    let start = Instant::now();
    let out_of_time = Arc::new(AtomicBool::new(false));
    let news_travels = cfg.restart_news_travels;
    let mut model = cfg.into_model();
    if let Some(t) = opts.timeout {
        model = model.with_deadline(start + t, out_of_time.clone());
    }
    let properties: Vec<(&'static str, Expectation)> = model
        .properties()
        .into_iter()
        .map(|p| (p.name, p.expectation))
        .collect();
    let mut builder = model.checker().threads(opts.threads.max(1));
    if let Some(d) = opts.depth_max {
        builder = builder.target_max_depth(d);
    }
    if opts.stop_at_failure {
        builder = builder.finish_when(HasDiscoveries::AnyFailures);
    }
    let searched = if opts.stop_at_failure || opts.depth_max.is_some() {
        watch(builder.spawn_bfs(), start, &mut on_progress)
    } else {
        watch(builder.spawn_dfs(), start, &mut on_progress)
    };
    let elapsed = start.elapsed();
    let cut_by_depth = opts.depth_max.is_some_and(|d| searched.depth_max >= d);
    let stopped_at_failure = opts.stop_at_failure && !searched.discoveries.is_empty();
    let cut = cut_by_depth || out_of_time.load(Ordering::Relaxed);
    let complete = searched.done && !cut && !stopped_at_failure;
    let verdicts = properties
        .into_iter()
        .map(|(property, expectation)| {
            let found = searched.discoveries.get(property);
            let holds = match expectation {
                Expectation::Sometimes => found.is_some(),
                _ => found.is_none(),
            };
            let trace = found.map(|path| render(path, news_travels));
            let conclusive = match expectation {
                Expectation::Always => true,
                Expectation::Eventually => !cut,
                Expectation::Sometimes => complete || holds,
            };
            Verdict {
                property,
                expectation,
                holds,
                conclusive,
                trace,
            }
        })
        .collect();
    CheckReport {
        states: searched.states,
        unique_states: searched.unique_states,
        depth_max: searched.depth_max,
        complete,
        elapsed,
        verdicts,
    }
}

/// What a finished search found, whichever its order.
struct Searched {
    states: usize,
    unique_states: usize,
    depth_max: usize,
    done: bool,
    discoveries: HashMap<&'static str, Path<SandState, SandAction>>,
}

/// Reports a running search's progress until it ends, then collects its findings.
fn watch(
    checker: impl Checker<SandModel>,
    start: Instant,
    on_progress: &mut impl FnMut(Progress),
) -> Searched {
    while !checker.is_done() {
        on_progress(Progress {
            unique_states: checker.unique_state_count(),
            depth_max: checker.max_depth(),
            elapsed: start.elapsed(),
        });
        std::thread::sleep(Duration::from_millis(1000).min(Duration::from_millis(
            50 + start.elapsed().as_millis() as u64,
        )));
    }
    let checker = checker.join();
    Searched {
        states: checker.state_count(),
        unique_states: checker.unique_state_count(),
        depth_max: checker.max_depth(),
        done: checker.is_done(),
        discoveries: checker.discoveries(),
    }
}

/// A path as numbered steps a person can follow: who did what, and the messages in full.
/// Unless `news_travels`, a gateway restart's step includes its peers learning of it.
pub fn render(path: &Path<SandState, SandAction>, news_travels: bool) -> String {
    let mut out = String::new();
    let actors = path.last_state().actor_states.len();
    let actor = |id: stateright::actor::Id| match usize::from(id) {
        0 => "gateway".to_string(),
        n if n + 1 == actors => "client".to_string(),
        n => format!("worker w{}", n - 1),
    };
    for (i, action) in path.clone().into_actions().into_iter().enumerate() {
        let step = match action {
            ActorModelAction::Deliver { src, dst, msg } => {
                format!("{} -> {}: {}", actor(src), actor(dst), message(&msg))
            }
            ActorModelAction::Timeout(id, Timer::Crash)
                if usize::from(id) == 0 && !news_travels =>
            {
                format!(
                    "gateway: {}; its workers and the client learn of it",
                    timer_text(&Timer::Crash)
                )
            }
            ActorModelAction::Timeout(id, timer) => {
                format!("{}: {}", actor(id), timer_text(&timer))
            }
            ActorModelAction::Crash(id) => format!("{} CRASHES", actor(id)),
            ActorModelAction::Recover(id) => format!("{} restarts from its storage", actor(id)),
            ActorModelAction::Drop(env) => format!("the network drops {:?}", env.msg),
            ActorModelAction::SelectRandom { actor: id, .. } => format!("{} chooses", actor(id)),
        };
        let _ = writeln!(out, "{:>3}. {step}", i + 1);
    }
    out
}

fn message(msg: &Msg) -> String {
    match msg {
        Msg::ToGateway { epoch, conn, msg }
        | Msg::Open {
            epoch: Some(epoch),
            conn,
            msg,
        } => {
            format!("{msg:?} (epoch {epoch}, connection {conn})")
        }
        Msg::ToWorker { epoch, conn, msg } => {
            format!("{msg:?} (epoch {epoch}, connection {conn})")
        }
        other => format!("{other:?}"),
    }
}

fn timer_text(timer: &Timer) -> String {
    match timer {
        Timer::Fsync => "its pending batches become durable".to_string(),
        Timer::Gq(t) => format!("global queue timer {t:?} fires"),
        Timer::Grain(run) => format!("grain attempt {run:?} finishes"),
        Timer::Reconnect => "its connection breaks; it opens a new one".to_string(),
        Timer::Resend => "its re-send timer fires".to_string(),
        Timer::Die => "DIES for good".to_string(),
        Timer::Poll => "it looks up the requests not yet answered".to_string(),
        Timer::Crash => "CRASHES, and restarts from what it persisted".to_string(),
    }
}
