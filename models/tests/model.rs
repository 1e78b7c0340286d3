//! The model checker on the real protocol: the small model holds every property, and each
//! seeded protocol bug is caught with a readable counterexample.

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use sand_models::check::{check, CheckOptions};
use sand_models::model::{mutated, ModelCfg, Msg, SandState, State};
use sand_protocol::ids::{Incarnation, WorkerId};
use sand_protocol::mutations::Mutation;
use sand_protocol::wire::ToGateway;
use stateright::{Expectation, Model};

/// States are cloned and dropped by the million: see the dev-dependency's note.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Checks `cfg` with `m` switched on and returns the property it breaks, with its trace.
fn catches(cfg: ModelCfg, m: Mutation) -> (String, String) {
    let opts = CheckOptions {
        stop_at_failure: true,
        timeout: Some(Duration::from_secs(240)),
        ..CheckOptions::default()
    };
    let report = check(mutated(cfg, m), &opts);
    let failure = report
        .verdicts
        .iter()
        .find(|v| v.expectation != Expectation::Sometimes && !v.holds)
        .unwrap_or_else(|| panic!("{m} was not caught in {} states", report.unique_states));
    let trace = failure.trace.clone().unwrap();
    println!("{m} breaks \"{}\":\n{trace}", failure.property);
    (failure.property.to_string(), trace)
}

fn quiet() -> ModelCfg {
    ModelCfg {
        worker_crashes: 0,
        suspicions: 0,
        gateway_crashes: 0,
        ..ModelCfg::default()
    }
}

fn dies() -> ModelCfg {
    ModelCfg {
        worker_dies: true,
        suspicions: 1,
        ..quiet()
    }
}

fn gateway_crash() -> ModelCfg {
    ModelCfg {
        gateway_crashes: 1,
        ..quiet()
    }
}

/// Checks the `name`d model `cfg` to completion and asserts that every property holds;
/// prints its figures. `states` is the exact count of unique states, a tripwire as in
/// stateright's own examples: a change to the protocol or the model that changes it changed what
/// is explored, and must say so by pinning the new count.
fn holds_every_property(name: &str, cfg: ModelCfg, states: usize) {
    let report = check(cfg, &CheckOptions::default());
    assert!(report.complete, "the check did not complete: {report:?}");
    let failures: Vec<_> = report.failures().map(|v| v.property).collect();
    assert!(
        failures.is_empty(),
        "properties failed: {failures:?}\n{report:#?}"
    );
    println!(
        "{name} model: {} unique states ({} in all), depth {}, {:.1} s",
        report.unique_states,
        report.states,
        report.depth_max,
        report.elapsed.as_secs_f64()
    );
    assert_eq!(
        report.unique_states, states,
        "{name}: the state count changed"
    );
}

#[test]
fn a_quiet_chain_holds_every_property() {
    holds_every_property("quiet", quiet(), 262);
}

/// A worker crash and a false suspicion, in either order and at every moment, explored to
/// completion.
#[test]
fn a_worker_crash_and_a_false_suspicion_hold_every_property() {
    let cfg = ModelCfg {
        worker_crashes: 1,
        suspicions: 1,
        ..quiet()
    };
    holds_every_property("crash + suspicion", cfg, 36_624);
}

/// A chain of two grains through a worker crash and a false suspicion: nothing folds past a
/// hop in so short a chain, and no property may ask for it.
#[test]
fn a_chain_of_two_holds_every_property() {
    let cfg = ModelCfg {
        chain: 2,
        worker_crashes: 1,
        suspicions: 1,
        ..quiet()
    };
    holds_every_property("chain of 2, crash + suspicion", cfg, 13_552);
}

/// A gateway crash and a false suspicion, in either order and at every moment, explored to
/// completion.
#[test]
fn a_gateway_crash_and_a_false_suspicion_hold_every_property() {
    let cfg = ModelCfg {
        gateway_crashes: 1,
        suspicions: 1,
        ..quiet()
    };
    holds_every_property("gateway crash + suspicion", cfg, 4_549_585);
}

/// A gateway crash and a worker crash, in either order and at every moment, explored to
/// completion.
#[test]
fn a_gateway_crash_and_a_worker_crash_hold_every_property() {
    let cfg = ModelCfg {
        gateway_crashes: 1,
        worker_crashes: 1,
        ..quiet()
    };
    holds_every_property("gateway crash + worker crash", cfg, 1_095_574);
}

/// Two executions at once, and a worker crash at every moment: the calls of both compete for
/// the workers, share their progress messages and are recovered together.
#[test]
fn two_executions_and_a_worker_crash_hold_every_property() {
    let cfg = ModelCfg {
        executions: 2,
        worker_crashes: 1,
        ..quiet()
    };
    holds_every_property("two executions + worker crash", cfg, 499_509);
}

/// The model: a worker crash, a false suspicion and a gateway crash, each at every
/// moment and in every order, explored to completion.
#[test]
fn a_worker_crash_a_suspicion_and_a_gateway_crash_hold_every_property() {
    holds_every_property(
        "worker crash + suspicion + gateway crash",
        ModelCfg::default(),
        39_048_784,
    );
}

/// A deadline ends even a depth-first search that never runs out of work, and a search cut
/// short claims neither completeness nor a liveness failure (its cut paths look like runs that
/// never finish).
#[test]
fn a_deadline_stops_the_search_and_claims_nothing() {
    let opts = CheckOptions {
        threads: 1,
        timeout: Some(Duration::from_secs(2)),
        ..CheckOptions::default()
    };
    let report = check(ModelCfg::default(), &opts);
    assert!(!report.complete, "{report:?}");
    assert!(report.elapsed < Duration::from_secs(20), "{report:?}");
    let failures: Vec<_> = report.failures().map(|v| v.property).collect();
    assert!(failures.is_empty(), "{failures:?}");
    let liveness = report
        .verdicts
        .iter()
        .find(|v| v.expectation == Expectation::Eventually)
        .unwrap();
    assert!(!liveness.conclusive, "{liveness:?}");
}

/// A window of two progress messages in flight, and a reconnect: reports overtake each other and
/// the gateway holds the early ones back; a reconnect re-sends what was not acked.
#[test]
fn a_window_of_two_and_a_reconnect_hold_every_property() {
    let cfg = ModelCfg {
        window: 2,
        reconnects: 1,
        ..quiet()
    };
    holds_every_property("window of 2 + reconnect", cfg, 25_756);
}

/// A window of three: every hop of the chain may be in flight at once.
#[test]
fn a_window_of_three_and_a_reconnect_hold_every_property() {
    let cfg = ModelCfg {
        window: 3,
        reconnects: 1,
        ..quiet()
    };
    holds_every_property("window of 3 + reconnect", cfg, 33_368);
}

/// A fan-out and a gateway crash at every moment: the join's record and its branches' values
/// are recovered from the disk.
#[test]
fn a_fan_out_and_a_gateway_crash_hold_every_property() {
    let cfg = ModelCfg {
        fan_out: true,
        ..gateway_crash()
    };
    holds_every_property("fan-out + gateway crash", cfg, 1_461_501);
}

/// A fan-out whose branches run on one worker, which starts the join itself, through a worker
/// crash and a false suspicion.
#[test]
fn a_fan_out_with_a_worker_crash_and_a_suspicion_holds_every_property() {
    let cfg = ModelCfg {
        fan_out: true,
        worker_crashes: 1,
        suspicions: 1,
        ..quiet()
    };
    holds_every_property("fan-out + crash + suspicion", cfg, 195_862);
}

/// The worker's re-send timer and the gateway's deadline, each fired once at any moment: a
/// re-sent message arrives beside the first, and an attempt given up on is retried while the
/// worker may still report it. Every firing spends a budget, so neither adds a cycle and the
/// liveness verdict stays sound (stateright's `eventually` is not judged on cycles).
#[test]
fn a_resend_timer_and_a_deadline_hold_every_property() {
    let cfg = ModelCfg {
        resends: 1,
        deadlines: 1,
        ..quiet()
    };
    holds_every_property("re-send + deadline", cfg, 286_008);
}

/// A worker that dies for good, at any moment, with a false suspicion of either worker: every
/// request is still answered by the one left.
#[test]
fn a_worker_dead_for_good_leaves_every_request_answered() {
    holds_every_property("worker dies + suspicion", dies(), 20_245);
}

/// A failure detector that does nothing leaves the calls of a dead worker with it for ever.
#[test]
fn never_suspect_is_caught() {
    let (property, _) = catches(dies(), Mutation::NeverSuspect);
    assert_eq!(property, "every request is answered");
}

#[test]
fn a_fan_out_with_grain_errors_holds_every_property() {
    let cfg = ModelCfg {
        fan_out: true,
        grain_errors: true,
        ..quiet()
    };
    holds_every_property("fan-out", cfg, 8_032);
}

#[test]
fn split_hop_is_caught() {
    let cfg = ModelCfg {
        fsync_each_batch: true,
        ..gateway_crash()
    };
    catches(cfg, Mutation::SplitHop);
}

/// Durability matters only while the gateway can still crash (the model makes writes instant
/// once it cannot), so the check needs a crash in the budget.
#[test]
fn visible_before_durable_is_caught() {
    let (property, _) = catches(gateway_crash(), Mutation::VisibleBeforeDurable);
    assert_eq!(property, "what the gateway promised is durable");
}

/// An app deployed and removed while a one-grain chain runs, across a gateway crash.
fn app_changes() -> ModelCfg {
    ModelCfg {
        chain: 1,
        app_changes: true,
        ..gateway_crash()
    }
}

/// A client that looks its execution up while it waits, across a gateway crash.
fn look_ups() -> ModelCfg {
    ModelCfg {
        chain: 2,
        polls: 1,
        ..gateway_crash()
    }
}

#[test]
fn app_changes_across_a_gateway_crash_hold_every_property() {
    holds_every_property("app changes + gateway crash", app_changes(), 78_195);
}

#[test]
fn look_ups_across_a_gateway_crash_hold_every_property() {
    holds_every_property("look-ups + gateway crash", look_ups(), 101_871);
}

#[test]
fn app_change_early_is_caught() {
    let (property, _) = catches(app_changes(), Mutation::AppChangeEarly);
    assert_eq!(property, "an app change is told only once durable");
}

#[test]
fn read_ahead_is_caught() {
    let (property, _) = catches(look_ups(), Mutation::ReadAhead);
    assert_eq!(property, "what the gateway promised is durable");
}

#[test]
fn accept_dead_is_caught() {
    let cfg = ModelCfg {
        suspicions: 1,
        ..quiet()
    };
    catches(cfg, Mutation::AcceptDead);
}

#[test]
fn arrival_order_is_caught() {
    let cfg = ModelCfg {
        window: 2,
        ..quiet()
    };
    catches(cfg, Mutation::ArrivalOrder);
}

#[test]
fn no_resend_is_caught() {
    catches(gateway_crash(), Mutation::NoResend);
}

#[test]
fn rerun_started_is_caught() {
    let cfg = ModelCfg {
        reconnects: 1,
        ..quiet()
    };
    catches(cfg, Mutation::RerunStarted);
}

/// A gateway that tells a worker to abort an attempt before that decision is on its disk, and
/// crashes, still expects the attempt the worker dropped.
#[test]
fn give_up_early_is_caught() {
    let cfg = ModelCfg {
        deadlines: 1,
        ..gateway_crash()
    };
    let (property, _) = catches(cfg, Mutation::GiveUpEarly);
    assert_eq!(property, "what the gateway promised is durable");
}

/// A gateway that fires a join a worker already started, when it applies the report that
/// started it, runs the join twice.
#[test]
fn refire_join_is_caught() {
    let cfg = ModelCfg {
        fan_out: true,
        ..quiet()
    };
    let (property, _) = catches(cfg, Mutation::RefireJoin);
    assert_eq!(property, "a join fires at most once");
}

/// A gateway that does not look its idempotency keys up starts a second execution for the
/// client's retry after a crash.
#[test]
fn forget_keys_is_caught() {
    let (property, _) = catches(gateway_crash(), Mutation::ForgetKeys);
    assert_eq!(property, "one execution per idempotency key");
}

/// A gateway that does not place waiting calls when a worker joins leaves the client's call
/// waiting with a worker there to take it.
#[test]
fn lazy_placement_is_caught() {
    let (property, _) = catches(quiet(), Mutation::LazyPlacement);
    assert_eq!(
        property,
        "a call waits for a worker only while it backs off or none is connected"
    );
}

#[test]
fn early_join_is_caught() {
    let cfg = ModelCfg {
        fan_out: true,
        ..quiet()
    };
    catches(cfg.clone(), Mutation::EarlyJoin);
    // Explored whole, it breaks both the answer and the join's own rule.
    let report = check(mutated(cfg, Mutation::EarlyJoin), &CheckOptions::default());
    let broken: Vec<&str> = report.failures().map(|v| v.property).collect();
    for property in [
        "every answer is the correct one",
        "a join fires only with every branch",
    ] {
        assert!(broken.contains(&property), "{property}: {broken:?}");
    }
}

/// The model drops messages on connections that are gone: after any step of the gateway-crash
/// model (explored breadth-first for 20,000 states, so well past the crash), no message in the
/// network is addressed to an earlier gateway epoch or to an earlier incarnation of a worker,
/// and no answer that nobody waits for is left in it.
#[test]
fn dead_letters_are_dropped() {
    let (restarted, _) = no_dead_letters(gateway_crash());
    assert!(
        restarted > 1_000,
        "the gateway restarted in only {restarted} states"
    );
}

/// Nor, in the worker-crash and suspicion model, is any message left from a worker incarnation
/// the gateway refuses for good.
#[test]
fn letters_of_refused_incarnations_are_dropped() {
    let cfg = ModelCfg {
        worker_crashes: 1,
        suspicions: 1,
        ..quiet()
    };
    let (_, reincarnated) = no_dead_letters(cfg);
    assert!(
        reincarnated > 1_000,
        "a worker lived a second life in only {reincarnated} states"
    );
}

/// The news of a gateway restart reaches workers and the client in the restart's own step, a
/// shortcut argued in the model's docs. Letting it travel as a message instead reaches no
/// state of the gateway or the client that the shortcut misses, in the gateway-crash model and
/// in a chain of two with a gateway crash and a worker crash.
#[test]
fn restart_news_at_once_loses_no_gateway_or_client_state() {
    let both = ModelCfg {
        chain: 2,
        worker_crashes: 1,
        ..gateway_crash()
    };
    for cfg in [gateway_crash(), both] {
        let at_once = gateway_and_client_states(cfg.clone());
        let travels = gateway_and_client_states(ModelCfg {
            restart_news_travels: true,
            ..cfg.clone()
        });
        let missed = travels.difference(&at_once).count();
        assert_eq!(missed, 0, "{cfg:?}: the shortcut misses {missed} states");
        assert!(at_once.len() > 1_000, "{cfg:?}: {}", at_once.len());
    }
}

/// The distinct states of the gateway and the client together in `cfg`'s model, as hashes.
fn gateway_and_client_states(cfg: ModelCfg) -> HashSet<u64> {
    let mut seen = HashSet::new();
    explore(cfg, usize::MAX, |s| {
        let client = &s.actor_states[s.actor_states.len() - 1];
        seen.insert(fingerprint(&(&s.actor_states[0], client)));
    });
    seen
}

fn fingerprint(t: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// Visits `cfg`'s states breadth-first, at most `limit` of them.
fn explore(cfg: ModelCfg, limit: usize, mut visit: impl FnMut(&SandState)) {
    let model = cfg.into_model();
    let mut queue: VecDeque<_> = model.init_states().into();
    let mut seen: HashSet<u64> = queue.iter().map(fingerprint).collect();
    let mut actions = Vec::new();
    while let Some(s) = queue.pop_front() {
        visit(&s);
        if seen.len() >= limit {
            continue;
        }
        model.actions(&s, &mut actions);
        for a in actions.drain(..) {
            if let Some(next) = model.next_state(&s, a) {
                if model.within_boundary(&next) && seen.insert(fingerprint(&next)) {
                    queue.push_back(next);
                }
            }
        }
    }
}

/// Explores `cfg` breadth-first for 20,000 states and asserts that no dead letter is in flight
/// in any; returns in how many the gateway had restarted, and in how many a worker had begun a
/// second life.
fn no_dead_letters(cfg: ModelCfg) -> (usize, usize) {
    let (mut restarted, mut reincarnated) = (0, 0);
    explore(cfg, 20_000, |s| {
        let State::Gateway(g) = &*s.actor_states[0] else {
            panic!("actor 0 is the gateway");
        };
        let epoch = g.gq.state().epoch;
        restarted += usize::from(epoch > 1);
        reincarnated += usize::from(
            s.actor_states
                .iter()
                .any(|a| matches!(&**a, State::Worker(w) if w.lb.incarnation() > Incarnation(1))),
        );
        for env in s.network.iter_all() {
            let receiver = &*s.actor_states[usize::from(env.dst)];
            match (env.msg, receiver) {
                (Msg::ToGateway { epoch: e, msg, .. }, _) => {
                    assert!(*e >= epoch, "a message to dead epoch {e}: {env:?}");
                    if let ToGateway::Progress { incarnation, .. } = msg {
                        let worker = WorkerId(usize::from(env.src) as u32 - 1);
                        assert!(
                            !g.gq.refuses(worker, *incarnation),
                            "a message from a refused life: {env:?}"
                        );
                    }
                }
                (Msg::Open { epoch: Some(e), .. }, _) => {
                    assert!(*e >= epoch, "a message to dead epoch {e}: {env:?}")
                }
                (Msg::ToWorker { msg, .. }, State::Worker(w)) => {
                    let to = msg.incarnation();
                    assert!(
                        to >= w.lb.incarnation(),
                        "a message to a dead life: {env:?}"
                    );
                }
                (Msg::Answer { request: None, .. }, _) => {
                    panic!("an answer nobody waits for was left in the network: {env:?}")
                }
                _ => {}
            }
        }
    });
    (restarted, reincarnated)
}
