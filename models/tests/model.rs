//! The model checker on the real protocol: the small model holds every property, and each
//! seeded protocol bug is caught with a readable counterexample.

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use std::time::Duration;

use sand_models::check::{check, CheckOptions, CheckReport};
use sand_models::model::{mutated, ModelCfg};
use sand_protocol::mutations::Mutation;
use stateright::Expectation;

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

fn gateway_crash() -> ModelCfg {
    ModelCfg {
        gateway_crashes: 1,
        ..quiet()
    }
}

fn assert_clean(report: &CheckReport) {
    assert!(report.complete, "the check did not complete: {report:?}");
    let failures: Vec<_> = report.failures().map(|v| v.property).collect();
    assert!(
        failures.is_empty(),
        "properties failed: {failures:?}\n{report:#?}"
    );
}

#[test]
fn a_quiet_chain_holds_every_property() {
    let report = check(quiet(), &CheckOptions::default());
    assert_clean(&report);
    assert!(report.unique_states > 100, "{report:?}");
}

/// The CI model: two workers, a chain of three, one execution, one worker crash and one false
/// suspicion, explored to completion. (With a gateway crash as well the space outgrows CI; the
/// gateway-crash mutations below, the simulator and `sand check --gateway-crashes 1` cover it.)
#[test]
fn a_worker_crash_and_a_false_suspicion_hold_every_property() {
    let cfg = ModelCfg {
        worker_crashes: 1,
        suspicions: 1,
        ..quiet()
    };
    let report = check(cfg, &CheckOptions::default());
    assert_clean(&report);
    println!(
        "crash + suspicion model: {} unique states, depth {}, {:.1} s",
        report.unique_states,
        report.depth_max,
        report.elapsed.as_secs_f64()
    );
    // A tripwire: a change to the protocol or the model that shrinks the space this much
    // probably stopped exploring something.
    assert!(report.unique_states > 500_000, "{}", report.unique_states);
}

/// All three faults of the model together, bounded to 10 steps: not the exhaustive
/// check (which outgrows CI with a gateway crash), but every safety property on every path that
/// short.
#[test]
fn a_worker_crash_a_suspicion_and_a_gateway_crash_hold_safety_to_depth_10() {
    let cfg = ModelCfg {
        gateway_crashes: 1,
        ..ModelCfg::default()
    };
    let opts = CheckOptions {
        depth_max: Some(10),
        ..CheckOptions::default()
    };
    let report = check(cfg, &opts);
    assert!(
        !report.complete,
        "a depth-bounded check must not claim completeness"
    );
    let violated: Vec<_> = report
        .verdicts
        .iter()
        .filter(|v| v.expectation == Expectation::Always && !v.holds)
        .map(|v| v.property)
        .collect();
    assert!(violated.is_empty(), "{violated:?}");
    assert!(report.unique_states > 10_000, "{}", report.unique_states);
}

#[test]
fn a_fan_out_with_grain_errors_holds_every_property() {
    let cfg = ModelCfg {
        fan_out: true,
        grain_errors: true,
        ..quiet()
    };
    let report = check(cfg, &CheckOptions::default());
    assert_clean(&report);
    println!("fan-out model: {} unique states", report.unique_states);
}

#[test]
fn split_hop_is_caught() {
    let cfg = ModelCfg {
        fsync_each_batch: true,
        ..gateway_crash()
    };
    catches(cfg, Mutation::SplitHop);
}

#[test]
fn visible_before_durable_is_caught() {
    let (property, _) = catches(quiet(), Mutation::VisibleBeforeDurable);
    assert_eq!(property, "what the gateway acked or answered is durable");
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

#[test]
fn early_join_is_caught() {
    let cfg = ModelCfg {
        fan_out: true,
        ..quiet()
    };
    let (property, _) = catches(cfg, Mutation::EarlyJoin);
    assert_eq!(property, "every answer is the correct one");
}
