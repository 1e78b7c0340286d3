//! `sand-bench chaos`: a cluster under crashes must lose nothing.
//!
//! A gateway and workers run a 3-grain Python chain. Clients submit thousands of async
//! invocations, each with its own `Idempotency-Key`, retrying with the same key whenever the
//! gateway is down, and then send every key once more. Meanwhile a worker is SIGKILLed and
//! started again every few seconds, and the gateway is SIGKILLed and started again once,
//! halfway. Once every request is in and every execution has ended (or after a time limit),
//! the faults stop; what still runs is polled until it ends or a deadline passes. A pure
//! checker then judges the recorded history: one execution per key, every execution
//! succeeded with its input's answer, none forgotten, none still running.

mod check;
mod faults;
mod load;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};

use self::check::{check, History, Observation, Verdict};
use self::faults::{Faults, Plan};
use self::load::{Api, Load};
use crate::apps;
use crate::cluster::{Cluster, ClusterSpec, Isolation};

/// `sand-bench chaos`: workers and the gateway SIGKILLed under a load of keyed async
/// invocations; every invocation must succeed exactly once, with the right answer.
#[derive(clap::Args, Debug)]
pub struct ChaosArgs {
    /// Invocations to submit, each with its own Idempotency-Key.
    #[arg(long, default_value_t = 8000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Workers in the cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Client threads submitting invocations.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    clients: u64,
    /// Client threads polling executions until they end.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pollers: u64,
    /// The shortest wait between two worker kills, in ms.
    #[arg(long, default_value_t = 1000)]
    kill_min_ms: u64,
    /// The longest wait between two worker kills, in ms.
    #[arg(long, default_value_t = 3000)]
    kill_max_ms: u64,
    /// How long a killed worker stays down before it is started again, in ms.
    #[arg(long, default_value_t = 0)]
    worker_down_ms: u64,
    /// SIGKILL the gateway once this many requests are accepted [default: half of them].
    #[arg(long)]
    gateway_kill_after: Option<u64>,
    /// Do not kill the gateway.
    #[arg(long, conflicts_with = "gateway_kill_after")]
    no_gateway_kill: bool,
    /// How long the gateway stays down before it is started again, in ms.
    #[arg(long, default_value_t = 500)]
    gateway_down_ms: u64,
    /// The gateway's --failure-timeout-ms: a silent worker is declared dead after it.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
    failure_timeout_ms: u64,
    /// The faults go on until every request is in and every execution returned has ended,
    /// or for this many seconds at most.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    faults_max_s: u64,
    /// How long after the faults stop every execution has to end, in seconds.
    #[arg(long, default_value_t = 120)]
    deadline_s: u64,
    /// Seed of the kill schedule (which worker, and when) [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// How the workers isolate grains (sandbox needs root).
    #[arg(long, value_enum, default_value = "sandbox")]
    isolation: Isolation,
    /// Calls one instance of a grain serves before it exits. With 1 (the default, as in
    /// examples/pipeline), every call forks a fresh instance, and the executions run long
    /// enough for the faults to reach them: with warm instances, 8,000 end within seconds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    reuse: u64,
    /// Pause between two sweeps of a poller over its executions, in ms.
    #[arg(long, default_value_t = 250)]
    poll_ms: u64,
    /// Seconds between two progress lines.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    progress_s: u64,
    /// How many problems to print, each with its execution's body.
    #[arg(long, default_value_t = 5)]
    show: usize,
    /// The grains' interpreter.
    #[arg(long, default_value = "/usr/bin/python3")]
    python: PathBuf,
    /// Keep the cluster's directory (stores, logs) even if the run passes; a run that fails
    /// always keeps it.
    #[arg(long)]
    keep: bool,
}

impl ChaosArgs {
    /// Whether the run needs root: sandboxes do.
    pub fn needs_root(&self) -> bool {
        self.isolation == Isolation::Sandbox
    }
}

/// Runs the chaos test with the `sand` binary `sand`; true if nothing was lost or wrong.
pub fn run(sand: &Path, args: &ChaosArgs) -> Result<bool> {
    if args.kill_min_ms > args.kill_max_ms {
        bail!(
            "--kill-min-ms {} is more than --kill-max-ms {}",
            args.kill_min_ms,
            args.kill_max_ms
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(stop.clone())?;
    let seed = args.seed.unwrap_or_else(seed_from_clock);
    let requests = args.requests as usize;
    let gateway_kill_after = match (args.no_gateway_kill, args.gateway_kill_after) {
        (true, _) => None,
        (false, Some(n)) => Some(n as usize),
        (false, None) => Some(requests / 2),
    };
    let plan = Plan {
        workers: args.workers,
        kill_every: (
            Duration::from_millis(args.kill_min_ms),
            Duration::from_millis(args.kill_max_ms),
        ),
        worker_down: Duration::from_millis(args.worker_down_ms),
        gateway_kill_after,
        gateway_down: Duration::from_millis(args.gateway_down_ms),
    };
    say(&format!(
        "{requests} keyed async invocations of a 3-grain chain on {} workers ({:?} isolation, \
         reuse {}); a worker SIGKILLed every {}-{} ms, the gateway {}; failure timeout {} ms; \
         seed {seed}",
        args.workers,
        args.isolation,
        args.reuse,
        args.kill_min_ms,
        args.kill_max_ms,
        match gateway_kill_after {
            Some(n) => format!("after {n} accepted"),
            None => "never".to_owned(),
        },
        args.failure_timeout_ms,
    ));

    let scratch = tempfile::Builder::new()
        .prefix("sand-bench-chaos-app-")
        .tempdir()?;
    let app = apps::pipeline(scratch.path(), &args.python, args.reuse)?;
    let mut cluster = Cluster::start(
        sand,
        ClusterSpec {
            workers: args.workers,
            failure_timeout: Duration::from_millis(args.failure_timeout_ms),
            isolation: args.isolation,
            adopt_orphans: true,
            ..ClusterSpec::default()
        },
    )?;
    cluster.deploy(&app)?;
    let load = Load::new(
        "pipeline",
        requests,
        seed,
        args.pollers as usize,
        Duration::from_millis(args.poll_ms),
        stop.clone(),
    );
    let mut faults = Faults::new(plan, seed, Instant::now());
    let run = drive(&mut cluster, &load, &mut faults, args);
    let (history, timing) = match run {
        Ok(done) => done,
        Err(e) if stop.load(Ordering::Relaxed) => return Err(e),
        Err(e) => {
            let kept = cluster.keep_dir();
            return Err(e.context(format!(
                "the cluster's logs and stores are kept in {}",
                kept.display()
            )));
        }
    };
    let verdict = check(&history, apps::pipeline_output);
    let incarnations: Vec<Option<u64>> = (1..=args.workers)
        .map(|id| cluster.incarnation(id))
        .collect();
    let report = Report {
        verdict: &verdict,
        faults: &faults,
        incarnations: &incarnations,
        timing,
        deadline_s: args.deadline_s,
        seed,
    };
    println!("{}", report.summary(args.show));
    if !verdict.passed() || args.keep {
        let kept = cluster.keep_dir();
        let problems = kept.join("problems.json");
        let all: Vec<serde_json::Value> = verdict
            .problems
            .iter()
            .map(|p| {
                serde_json::json!({
                    "kind": p.kind(),
                    "subject": p.subject(),
                    "evidence": p.evidence(),
                })
            })
            .collect();
        std::fs::write(&problems, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("cannot write {}", problems.display()))?;
        say(&format!(
            "the cluster's logs and stores are kept in {} (every problem, in full: {})",
            kept.display(),
            problems.display()
        ));
    }
    Ok(verdict.passed())
}

/// How long the phases of a run took.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// From the first request to the end of the faults.
    faults: Duration,
    /// From the first request to the end of polling.
    wall: Duration,
}

/// The run itself: clients and faults until every request is in and its execution has ended
/// (or the faults' time is up), then the pollers until every execution has ended or the
/// deadline has passed. Returns the clients' history.
fn drive(
    cluster: &mut Cluster,
    load: &Load,
    faults: &mut Faults,
    args: &ChaosArgs,
) -> Result<(History, Timing)> {
    let start = Instant::now();
    let every = Duration::from_secs(args.progress_s);
    let mut last_line = start;
    let mut retries_told = 0;
    let mut line = |cluster: &Cluster, faults: &Faults| {
        let c = load.counts();
        // Why POSTs failed, when some did since the last line.
        let why = if c.retries > retries_told {
            format!(" (the last: {})", c.last_failure)
        } else {
            String::new()
        };
        retries_told = c.retries;
        let incarnations: Vec<String> = (1..=args.workers)
            .map(|id| {
                cluster
                    .incarnation(id)
                    .map_or("-".into(), |i| i.to_string())
            })
            .collect();
        say(&format!(
            "{:6.1} s: accepted {}/{}, re-sent {}, POST retries {}{}, ended {} (lost {}), \
             worker kills {}, gateway kills {}, incarnations {}",
            start.elapsed().as_secs_f64(),
            c.accepted,
            args.requests,
            c.resent,
            c.retries,
            why,
            c.ended,
            c.lost,
            faults.worker_kills,
            faults.gateway_kills,
            incarnations.join(" "),
        ));
    };
    let http = cluster.http().to_owned();
    std::thread::scope(|s| {
        let mut submitters: Vec<_> = (0..args.clients)
            .map(|_| s.spawn(|| load.submit(&Api::new(&http))))
            .collect();
        let pollers: Vec<_> = (0..args.pollers as usize)
            .map(|me| {
                let api = Api::new(&http);
                s.spawn(move || load.poll(&api, me))
            })
            .collect();

        // The faults, while the requests go in and their executions run.
        let faults_end = start + Duration::from_secs(args.faults_max_s);
        let mut faulted = Ok(());
        let mut submitted = None;
        while faulted.is_ok() && !load.stopped() && Instant::now() < faults_end {
            if submitted.is_none() && submitters.iter().all(|t| t.is_finished()) {
                load.submissions_done();
                submitted = Some(join_all(std::mem::take(&mut submitters)));
            }
            let c = load.counts();
            if submitted.is_some() && c.ended + c.lost == c.executions {
                break;
            }
            faulted = faults.tick(cluster, c.accepted, Instant::now());
            if last_line.elapsed() >= every {
                last_line = Instant::now();
                line(cluster, faults);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let faulted = faulted.and_then(|()| faults.stop(cluster));
        let faults_span = start.elapsed();
        if faulted.is_err() {
            load.stop();
        }
        // Submitters still at work (the gateway slow to come back) go on until the deadline.
        load.set_deadline(Instant::now() + Duration::from_secs(args.deadline_s));
        let submitted = submitted.unwrap_or_else(|| {
            let joined = join_all(submitters);
            load.submissions_done();
            joined
        });
        let c = load.counts();
        say(&format!(
            "{:6.1} s: faults stopped, {} of {} executions still to end; polling them for {} s \
             at most",
            faults_span.as_secs_f64(),
            c.executions - c.ended - c.lost,
            c.executions,
            args.deadline_s
        ));

        // The executions, until they end or the deadline passes.
        while !pollers.iter().all(|t| t.is_finished()) {
            if last_line.elapsed() >= every {
                last_line = Instant::now();
                line(cluster, faults);
            }
            cluster.reap_orphans();
            std::thread::sleep(Duration::from_millis(100));
        }
        let polled = join_all(pollers);
        line(cluster, faults);
        faulted?;
        submitted?;
        let observations: BTreeMap<String, Observation> = polled?.into_iter().flatten().collect();
        if load.stopped() {
            bail!("interrupted before the end");
        }
        let timing = Timing {
            faults: faults_span,
            wall: start.elapsed(),
        };
        Ok((load.history(observations), timing))
    })
}

/// Joins scoped threads; their results, or the first error.
fn join_all<T>(threads: Vec<std::thread::ScopedJoinHandle<'_, Result<T>>>) -> Result<Vec<T>> {
    let mut results = Vec::new();
    let mut first_error = None;
    for t in threads {
        match t.join() {
            Ok(Ok(v)) => results.push(v),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow!("a client thread panicked"));
            }
        }
    }
    first_error.map_or(Ok(results), Err)
}

/// What a run found, for people.
struct Report<'a> {
    verdict: &'a Verdict,
    faults: &'a Faults,
    incarnations: &'a [Option<u64>],
    timing: Timing,
    deadline_s: u64,
    seed: u64,
}

impl Report<'_> {
    /// The summary, with the first `show` problems and their evidence.
    fn summary(&self, show: usize) -> String {
        let v = self.verdict;
        let incarnations: Vec<String> = self
            .incarnations
            .iter()
            .enumerate()
            .map(|(i, inc)| {
                format!(
                    "worker {}: {}",
                    i + 1,
                    inc.map_or("none".into(), |n| n.to_string())
                )
            })
            .collect();
        let mut out = String::from("chaos summary\n");
        let mut row = |name: &str, value: String| out.push_str(&format!("  {name:<17} {value}\n"));
        row(
            "requests",
            format!(
                "{} ({} POSTs: each key sent until accepted, then once more)",
                v.requests, v.posts
            ),
        );
        row("executions", v.executions.to_string());
        row("succeeded", v.succeeded.to_string());
        row("failed", v.failed.to_string());
        row("wrong output", v.wrong.to_string());
        row(
            "running",
            format!(
                "{} (not ended {} s after the faults stopped)",
                v.running, self.deadline_s
            ),
        );
        row("lost", format!("{} (404 for a returned id)", v.lost));
        row("worker kills", self.faults.worker_kills.to_string());
        row("gateway kills", self.faults.gateway_kills.to_string());
        row("max incarnation", incarnations.join(", "));
        row(
            "wall time",
            format!(
                "{:.1} s (faults during the first {:.1} s)",
                self.timing.wall.as_secs_f64(),
                self.timing.faults.as_secs_f64()
            ),
        );
        row("seed", self.seed.to_string());
        for note in &self.faults.unplanned {
            row("note", note.clone());
        }
        if v.passed() {
            row("verdict", "PASSED: nothing lost, nothing wrong".into());
            return out;
        }
        row(
            "verdict",
            format!("FAILED: {} problem(s)", v.problems.len()),
        );
        out.push_str(&format!(
            "first {} problem(s):\n",
            show.min(v.problems.len())
        ));
        for p in v.problems.iter().take(show) {
            let evidence = p.evidence().to_string();
            out.push_str(&format!(
                "  {} {}: {}\n",
                p.kind(),
                p.subject(),
                shorten(&evidence, 4000)
            ));
        }
        out
    }
}

/// `text`, cut to about `max` characters with a note of how much was left out.
fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} more characters)", &text[..cut], text.len() - cut)
}

fn say(line: &str) {
    eprintln!("chaos {line}");
}

fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// SIGINT (Ctrl-C) and SIGTERM set `stop` instead of ending this process at once, so that
/// the run winds down and the cluster is killed on the way out. Must be called before any
/// other thread starts: threads inherit the blocked signals. (The processes this one starts
/// do not: std clears the signal mask of a child.)
fn stop_on_signals(stop: Arc<AtomicBool>) -> Result<()> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .context("cannot block SIGINT and SIGTERM")?;
    std::thread::spawn(move || {
        while let Ok(signal) = signals.wait() {
            say(&format!("{signal}: stopping, and killing the cluster"));
            stop.store(true, Ordering::Relaxed);
        }
    });
    Ok(())
}
