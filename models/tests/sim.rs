//! The crash-schedule simulator against the real protocol: clean schedules pass with every fault
//! kind injected, each seeded bug is caught within a bounded number of schedules, a caught
//! failure is shrunk and replays exactly from its file, and runs are deterministic.
//!
//! Run in release: `cargo test -p sand-models --release --test sim -- --nocapture` also prints
//! how many schedules each mutation took.

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sand_models::sim::{
    check_determinism, fuzz, replay, Failure, FoundFailure, FuzzOptions, Property, ReplayError,
    Schedule, Step,
};
use sand_protocol::mutations::{Mutation, Mutations};

/// The first seed of every run here: fixed, so a failure of these tests replays by seed.
const SEED: u64 = 20_261_127;

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sand-sim-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Fuzzes with one mutation and asserts it is caught within `schedules` schedules, violating
/// one of `properties`, and that the shrunk schedule saved for it replays the same failure.
/// Returns what it found.
fn catches(mutation: Mutation, schedules: u64, properties: &[Property]) -> FoundFailure {
    let dir = scratch_dir(mutation.name());
    let opts = FuzzOptions {
        seed: SEED,
        schedules,
        mutations: Mutations::only(mutation),
        out_dir: Some(dir.clone()),
        shrink_time: Duration::from_secs(3),
        check_determinism: false,
        ..FuzzOptions::default()
    };
    let report = fuzz(&opts, |_, _| {});
    let found = report
        .failure
        .unwrap_or_else(|| panic!("{mutation} was not caught in {schedules} schedules"));
    eprintln!(
        "{mutation}: caught after {} schedules, shrunk from {} to {} steps in {} runs: {}",
        found.schedules_run,
        found.original_steps,
        found.schedule.steps.len(),
        found.shrink_runs,
        found.failure
    );
    assert!(
        properties.contains(&found.original.property),
        "{mutation} violated {:?}, expected one of {properties:?}: {}",
        found.original.property,
        found.original
    );
    assert_eq!(found.failure.property, found.original.property);
    assert!(found.schedule.steps.len() <= found.original_steps);
    assert_eq!(found.schedule.config.mutations, Mutations::only(mutation));
    // The mutation is the cause: the same schedule passes without it.
    let mut clean = found.schedule.clone();
    clean.config.mutations = Mutations::NONE;
    if let Err(failure) = clean.run() {
        panic!("the shrunk schedule fails without {mutation} too: {failure}");
    }
    let path = found.replay_path.as_deref().unwrap();
    let replayed = replay(path).unwrap();
    assert!(replayed.reproduced(), "replay gave {:?}", replayed.verdict);
    assert_eq!(replayed.verdict.unwrap_err(), found.failure);
    assert!(!replayed.trace.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
    found
}

#[test]
fn a_clean_run_passes_with_every_fault_injected() {
    let opts = FuzzOptions {
        seed: SEED,
        schedules: 300,
        ..FuzzOptions::default()
    };
    let mut calls = 0;
    let report = fuzz(&opts, |done, total| {
        calls += 1;
        assert!(done <= total);
    });
    if let Some(found) = &report.failure {
        panic!(
            "seed {} failed: {}\nshrunk: {}",
            found.seed, found.original, found.failure
        );
    }
    assert_eq!(report.schedules_run, 300);
    assert_eq!(calls, 300);
    // Most executions are answered and checked; only those a gateway crash lost before their
    // acceptance was durable are not.
    assert!(
        report.executions_checked > 300 * 100 * 8 / 10,
        "{}",
        report.executions_checked
    );
    for (kind, count) in report.faults.by_kind() {
        assert!(count > 100, "only {count} {kind} in 300 schedules");
    }
    eprintln!(
        "300 clean schedules: {:.1} schedules/s, {} executions checked, faults {:?}",
        report.schedules_per_second(),
        report.executions_checked,
        report.faults.by_kind()
    );
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let opts = FuzzOptions::default();
    let mut hashes = Vec::new();
    for seed in [1, 2, 3, SEED] {
        let hash = check_determinism(seed, &opts).unwrap();
        assert_eq!(
            hash,
            Schedule::generate(seed, &opts).run().unwrap().trace_hash
        );
        hashes.push(hash);
    }
    hashes.sort_unstable();
    hashes.dedup();
    assert_eq!(hashes.len(), 4, "different seeds gave the same trace");
    // A different schedule of the same seed gives a different trace.
    let mut schedule = Schedule::generate(1, &opts);
    let hash = schedule.run().unwrap().trace_hash;
    schedule.steps.insert(0, Step::Tick(1));
    assert_ne!(schedule.run().unwrap().trace_hash, hash);
}

#[test]
fn replay_refuses_what_is_not_a_replay_file() {
    let dir = scratch_dir("replay-errors");
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.json");
    assert!(matches!(replay(&missing), Err(ReplayError::Read { .. })));
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "{\"format\": 1").unwrap();
    assert!(matches!(replay(&garbage), Err(ReplayError::Parse { .. })));
    // A real file, saved by the fuzzer, with its format changed.
    let saved = save_a_failure(&dir);
    let text = std::fs::read_to_string(&saved).unwrap();
    let future = dir.join("future.json");
    std::fs::write(&future, text.replacen("\"format\": 1", "\"format\": 99", 1)).unwrap();
    let err = replay(&future).unwrap_err();
    assert!(
        matches!(err, ReplayError::Format { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("format 99"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn save_a_failure(dir: &Path) -> PathBuf {
    let opts = FuzzOptions {
        seed: SEED,
        schedules: 5,
        mutations: Mutations::only(Mutation::VisibleBeforeDurable),
        out_dir: Some(dir.to_path_buf()),
        shrink_time: Duration::from_secs(1),
        ..FuzzOptions::default()
    };
    fuzz(&opts, |_, _| {}).failure.unwrap().replay_path.unwrap()
}

/// Runs the schedules of `seeds` with `mutation`, unshrunk, and returns their failures.
fn failures(mutation: Mutation, seeds: std::ops::Range<u64>) -> Vec<(u64, Failure)> {
    let opts = FuzzOptions {
        mutations: Mutations::only(mutation),
        ..FuzzOptions::default()
    };
    seeds
        .filter_map(|seed| {
            Schedule::generate(seed, &opts)
                .run()
                .err()
                .map(|f| (seed, f))
        })
        .collect()
}

#[test]
fn catches_split_hop() {
    // A hop lost between its two writes re-runs its parent where its child already ran.
    catches(
        Mutation::SplitHop,
        200,
        &[Property::Liveness, Property::StartsOnce],
    );
}

#[test]
fn catches_visible_before_durable() {
    catches(
        Mutation::VisibleBeforeDurable,
        5,
        &[Property::DurableBeforeVisible],
    );
}

#[test]
fn catches_app_change_early() {
    catches(
        Mutation::AppChangeEarly,
        50,
        &[Property::DurableBeforeVisible],
    );
}

#[test]
fn catches_read_ahead() {
    catches(Mutation::ReadAhead, 200, &[Property::DurableBeforeVisible]);
}

#[test]
fn catches_unmarked_recovery() {
    catches(Mutation::UnmarkedRecovery, 50, &[Property::DispatchReason]);
}

#[test]
fn catches_untraced_spawn() {
    catches(Mutation::UntracedSpawn, 50, &[Property::TraceTree]);
}

#[test]
fn catches_stale_lookup() {
    catches(Mutation::StaleLookup, 20, &[Property::AcceptedStaysVisible]);
}

#[test]
fn catches_accept_dead() {
    catches(Mutation::AcceptDead, 50, &[Property::FencedChangesNothing]);
}

#[test]
fn catches_arrival_order() {
    catches(
        Mutation::ArrivalOrder,
        50,
        &[Property::Liveness, Property::StartsOnce],
    );
}

#[test]
fn catches_no_resend() {
    catches(Mutation::NoResend, 50, &[Property::Liveness]);
}

#[test]
fn catches_rerun_started() {
    // A reconnect re-sends a dispatch the worker already started, and it runs it again.
    catches(Mutation::RerunStarted, 1000, &[Property::StartsOnce]);
}

#[test]
fn catches_refire_join() {
    // The join placed again while a worker runs it: its history makes that second placement a
    // recovery of a call never lost, which the dispatch's reason may show first.
    catches(
        Mutation::RefireJoin,
        200,
        &[Property::JoinFiresOnce, Property::DispatchReason],
    );
}

#[test]
fn catches_early_join() {
    catches(Mutation::EarlyJoin, 50, &[Property::CorrectAnswer]);
}

/// Runs a saved regression schedule, which failed with `property` before its fix, and asserts
/// it now passes.
fn passes_now(name: &str, property: Property) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/replays")
        .join(format!("{name}.json"));
    let replayed = replay(&path).unwrap();
    assert_eq!(replayed.recorded.property, property);
    if let Err(failure) = &replayed.verdict {
        panic!("{name}: {failure}\n{}", replayed.trace.join("\n"));
    }
}

/// Schedules the simulator found before the gateway held `Abort` and `Cancel` back until the
/// change behind them was durable. In both, the gateway gives up on work (an attempt past its
/// deadline; an execution that ended), tells the worker, which drops it, and crashes before the
/// decision is on disk. In the first, the recovered gateway, applying the worker's re-sent
/// progress, records the aborted attempt as running there again, and only its deadline, firing
/// a second time, could move it. In the second (found with only `Abort` held back), the
/// cancelled worker forgets which attempts it started, runs a re-sent dispatch again, and folds
/// the next hop into a report whose head the gateway has already completed, which it drops: the
/// chain stalls. Each must now pass. (The first is also the bug behind the older simulator's
/// regression test "a worker drops work only on durable orders", which this one replaces.)
#[test]
fn giving_up_on_work_waits_until_it_is_durable() {
    for name in ["abort-before-durable", "cancel-before-durable"] {
        passes_now(name, Property::Liveness);
    }
}

/// A schedule the simulator found with attempts numbered per gateway life (`Attempt::placement`
/// without the epoch): a gateway crash lost the record of a hop, and the recovered gateway
/// placed a call again with an attempt number the worker had already run in this incarnation,
/// which ran it a second time (the older cluster test saw a worker ignore such a dispatch as a
/// re-send, and the chain stall). Placements now take fresh attempts above the epoch's floor.
#[test]
fn a_recovered_gateway_never_repeats_an_attempt() {
    passes_now("recovered-gateway-repeats-an-attempt", Property::StartsOnce);
}

/// Clean schedules of three workers with every window the worker's bus takes as `window`: with
/// a window of one message, reports coalesce often; with a wider one, messages overtake each
/// other in flight. Every execution is answered once and correctly, and every other property
/// holds.
fn clean_with_window(window: usize) {
    let opts = FuzzOptions {
        workers: 3,
        executions: 10,
        steps_per_execution: 15,
        ..FuzzOptions::default()
    };
    for seed in SEED..SEED + 512 {
        let mut schedule = Schedule::generate(seed, &opts);
        schedule.config.window = window;
        if let Err(failure) = schedule.run() {
            panic!("seed {seed} with window {window}: {failure}");
        }
    }
}

#[test]
fn every_execution_is_answered_once_and_correctly_window_1() {
    clean_with_window(1);
}

#[test]
fn every_execution_is_answered_once_and_correctly_window_4() {
    clean_with_window(4);
}

#[test]
fn catches_give_up_early() {
    catches(Mutation::GiveUpEarly, 20, &[Property::DurableBeforeVisible]);
    // Both messages are checked: some schedules are caught by a `Cancel`, others by an `Abort`,
    // and by nothing else (everything else still waits for the disk).
    let found = failures(Mutation::GiveUpEarly, SEED..SEED + 40);
    let by = |what: &str| found.iter().any(|(_, f)| f.message.contains(what));
    assert!(by("Cancel {") && by("Abort {"), "{found:#?}");
    for (seed, f) in &found {
        assert_eq!(
            f.property,
            Property::DurableBeforeVisible,
            "seed {seed}: {f}"
        );
        assert!(
            f.message.contains("Cancel {") || f.message.contains("Abort {"),
            "{f}"
        );
    }
}

#[test]
fn catches_forget_keys() {
    // A client retrying after a broken connection, or after a gateway crash whose log held its
    // request, is given a second execution.
    catches(Mutation::ForgetKeys, 20, &[Property::OneExecutionPerKey]);
    // Both promises are checked: within a gateway life, and across a crash for a request whose
    // acceptance reached the disk.
    let found = failures(Mutation::ForgetKeys, SEED..SEED + 40);
    let by = |what: &str| found.iter().any(|(_, f)| f.message.contains(what));
    assert!(
        by("this gateway life named") && by("the disk holds"),
        "{found:#?}"
    );
    assert!(found
        .iter()
        .all(|(_, f)| f.property == Property::OneExecutionPerKey));
}

#[test]
fn catches_reuse_exec_ids() {
    // After a gateway restart a new execution takes an earlier one's id and record: an answered
    // one's answer changes, a running one's completed entry call becomes pending again, or the
    // new one's calls run under the other's trace.
    catches(
        Mutation::ReuseExecIds,
        50,
        &[
            Property::AnswerStays,
            Property::CompletedStaysCompleted,
            Property::TraceTree,
        ],
    );
    let found = failures(Mutation::ReuseExecIds, SEED..SEED + 40);
    let stays = found
        .iter()
        .filter(|(_, f)| f.property == Property::AnswerStays)
        .count();
    eprintln!(
        "reuse-exec-ids: {stays} of {} failures are AnswerStays",
        found.len()
    );
    assert!(stays > 0, "{found:#?}");
}

#[test]
fn catches_never_suspect() {
    let found = catches(Mutation::NeverSuspect, 300, &[Property::Liveness]);
    // It takes a worker that never comes back: the same schedule with each lost worker
    // restarting at once instead passes, mutation and all (its new life's Hello re-dispatches
    // the calls the failure detector should have).
    let steps = &found.schedule.steps;
    assert!(
        steps.iter().any(|s| matches!(s, Step::KillWorker(_))),
        "{steps:?}"
    );
    let mut restarted = found.schedule.clone();
    for step in &mut restarted.steps {
        if let Step::KillWorker(worker) = *step {
            *step = Step::CrashWorker { worker, down_ms: 0 };
        }
    }
    if let Err(failure) = restarted.run() {
        panic!("with every lost worker restarting, it still fails: {failure}");
    }
    // And only such schedules fail.
    let opts = FuzzOptions::default();
    let found = failures(Mutation::NeverSuspect, SEED..SEED + 100);
    assert!(!found.is_empty());
    for (seed, f) in &found {
        assert_eq!(f.property, Property::Liveness, "seed {seed}: {f}");
        let steps = Schedule::generate(*seed, &opts).steps;
        assert!(
            steps.iter().any(|s| matches!(s, Step::KillWorker(_))),
            "seed {seed} lost no worker: {f}"
        );
    }
}
