//! `sand fuzz`: crash-schedule fuzzing of the protocol (`sand_models::sim`), and replay of a
//! saved failing schedule. This file only parses arguments, shows progress and prints results.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use sand_models::sim::{self, FuzzOptions, FuzzReport};
use sand_protocol::mutations::{Mutation, Mutations};

/// Arguments of `sand fuzz`.
#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// The seed of the first schedule (schedule i uses seed + i) [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// How many schedules to run; the run stops at the first failure.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub schedules: u64,
    /// Workers in the simulated cluster.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Executions each schedule invokes.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub executions: u32,
    /// Switch on a deliberate protocol bug by name, to see the checker catch it (the names are
    /// in `protocol/src/mutations.rs`; an unknown name lists them all).
    #[arg(long, value_name = "NAME")]
    pub mutation: Option<Mutation>,
    /// Run a saved failing schedule again, with a trace of what happened, instead of fuzzing.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["seed", "schedules", "workers", "executions", "mutation"])]
    pub replay: Option<PathBuf>,
    /// Where to save a failing schedule.
    #[arg(long, value_name = "DIR", default_value = "sand-fuzz")]
    pub out: PathBuf,
    /// How long to spend shrinking a failing schedule, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub shrink_secs: u64,
}

/// Runs `sand fuzz`: success if every schedule passed (or a replay passed), failure otherwise.
pub fn run(args: FuzzArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.replay {
        return replay(path);
    }
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(random_seed);
    let opts = FuzzOptions {
        seed,
        schedules: args.schedules,
        workers: args.workers,
        executions: args.executions,
        mutations: args.mutation.map_or(Mutations::NONE, Mutations::only),
        out_dir: Some(args.out.clone()),
        shrink_time: Duration::from_secs(args.shrink_secs),
        ..FuzzOptions::default()
    };
    let mutation = args
        .mutation
        .map_or(String::new(), |m| format!(", mutation {m}"));
    out!(
        "sand fuzz: seed {seed}, {} schedules of {} workers and {} executions{mutation}",
        opts.schedules,
        opts.workers,
        opts.executions
    );
    let bar = progress_bar(opts.schedules);
    let report = sim::fuzz(&opts, |done, _| {
        bar.set_position(done);
    });
    bar.finish_and_clear();
    print_summary(&report);
    let Some(found) = &report.failure else {
        out!("all properties held");
        return Ok(ExitCode::SUCCESS);
    };
    out!();
    out!(
        "FAILED after {} schedules, seed {}: {}",
        found.schedules_run,
        found.seed,
        found.original
    );
    out!(
        "shrunk from {} to {} steps in {} runs: {}",
        found.original_steps,
        found.schedule.steps.len(),
        found.shrink_runs,
        found.failure
    );
    match (&found.replay_path, &found.save_error) {
        (Some(path), _) => {
            out!("saved: {}", path.display());
            out!("replay it with: sand fuzz --replay {}", path.display());
        }
        (None, Some(error)) => out!("the shrunk schedule could not be saved: {error}"),
        (None, None) => {}
    }
    out!(
        "or run the original again with: sand fuzz --seed {} --schedules 1 --workers {} --executions {}{}",
        found.seed,
        opts.workers,
        opts.executions,
        args.mutation
            .map_or(String::new(), |m| format!(" --mutation {m}"))
    );
    Ok(ExitCode::FAILURE)
}

/// How many trace lines a replay prints: the end of the run, where the failure is.
const TRACE_LINES_SHOWN: usize = 80;

fn replay(path: &Path) -> anyhow::Result<ExitCode> {
    let replay = sim::replay(path)?;
    let schedule = &replay.schedule;
    out!(
        "replaying {}: seed {}, {} workers, {} steps{}",
        path.display(),
        schedule.seed,
        schedule.config.workers,
        schedule.steps.len(),
        Mutation::ALL
            .iter()
            .filter(|m| schedule.config.mutations.has(**m))
            .map(|m| format!(", mutation {m}"))
            .collect::<String>()
    );
    out!("recorded: {}", replay.recorded);
    let trace_path = path.with_extension("trace.txt");
    match std::fs::write(&trace_path, replay.trace.join("\n") + "\n") {
        Ok(()) => out!("full trace: {}", trace_path.display()),
        Err(e) => out!(
            "the full trace could not be saved to {}: {e}",
            trace_path.display()
        ),
    }
    let skipped = replay.trace.len().saturating_sub(TRACE_LINES_SHOWN);
    if skipped > 0 {
        out!(
            "trace (the last {TRACE_LINES_SHOWN} of {} lines):",
            replay.trace.len()
        );
    } else {
        out!("trace:");
    }
    for line in &replay.trace[skipped..] {
        out!("{line}");
    }
    match &replay.verdict {
        Err(failure) => {
            out!("result: {failure}");
            if replay.reproduced() {
                out!("reproduced the recorded failure");
            } else {
                out!("a different failure than recorded");
            }
            Ok(ExitCode::FAILURE)
        }
        Ok(stats) => {
            out!(
                "result: every property held ({} executions answered); the recorded failure did not reproduce",
                stats.answered
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_summary(report: &FuzzReport) {
    out!(
        "schedules: {} in {:.1} s ({:.1} schedules/s)",
        report.schedules_run,
        report.running.as_secs_f64(),
        report.schedules_per_second()
    );
    out!(
        "executions checked: {}, steps: {}",
        report.executions_checked,
        report.steps_run
    );
    let faults: Vec<String> = report
        .faults
        .by_kind()
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    out!("faults injected: {}", faults.join(", "));
}

fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} schedules ({rate}, eta {eta})",
    );
    if let Ok(style) = style {
        let rate = |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.1}/s", state.per_sec());
        };
        bar.set_style(style.with_key("rate", rate));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A seed from the process's random hasher keys: no clock, no extra dependency.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.finish()
}
