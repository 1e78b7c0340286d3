//! A short Jepsen-style history check of a real cluster: a gateway and 3 workers as processes,
//! two apps, synchronous and asynchronous invocations with idempotency keys, and on a seeded
//! schedule workers and the gateway SIGKILLed, the gateway or a worker paused longer than the
//! failure timeout, a lossy link and a partition longer than the transport's idle timeout.
//! The checker of `sand-bench chaos` judges the whole history (its rules are in
//! benches/harness/src/chaos/check.rs); the long run is `sand-bench chaos --long`.
//!
//! The seed comes from the clock, so each run draws other faults; `SAND_CHAOS_SEED=N` replays
//! one. Every process the run started is killed when it ends, also when it fails.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sand_bench::chaos::{self, Config};

const SAND: &str = env!("CARGO_BIN_EXE_sand");

#[test]
fn a_short_chaos_run_loses_nothing_and_answers_right() {
    let seed = std::env::var("SAND_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    let started = Instant::now();
    let report = chaos::run(
        Path::new(SAND),
        &Config::short(seed),
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap_or_else(|e| panic!("the run with seed {seed} could not be judged: {e:#}"));
    eprintln!(
        "{}took {:.1} s",
        report.summary,
        started.elapsed().as_secs_f64()
    );
    assert!(report.passed, "{}", report.summary);
}
