//! `sand-bench chaos`: a Jepsen-style history check of a real cluster under faults.
//!
//! A gateway and workers, processes of the `sand` binary, run two apps: `pipeline`, a chain
//! of three grains, and `fanout`, three branches and a join. Clients send every request twice
//! with its `Idempotency-Key`, synchronously or not, and again after every failure; pollers
//! and an auditor follow every execution named (see `load.rs`). Meanwhile a schedule drawn
//! from the seed SIGKILLs workers and the gateway, cuts their power (each host's data
//! directory is a lazy filesystem that forgets what was not synced), pauses them with SIGSTOP
//! for longer than the failure timeout, and makes a worker's link to the gateway drop and
//! reorder datagrams, or drop them all for longer than the transport's idle timeout (see
//! `faults.rs`). When the
//! schedule is over every host is healed; each execution then has a bound to end in, and
//! every execution named is polled once more. A pure checker judges the recorded history (see
//! `check.rs` for its rules).
//!
//! Presets: [`Config::short`] is the root package's `tests/history.rs`, [`Config::standard`]
//! the command's default, and [`Config::long`] the long run (`--long`).

mod check;
mod faults;
mod load;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use sand_lazyfs::Cut;

use self::check::{check, History, Request, Verdict};
use self::faults::Faults;
use self::load::{Api, Load};
use crate::apps;
use sand_testkit::cluster::{Cluster, ClusterSpec, Isolation};

/// What an app computes from its input.
type Output = fn(u64) -> u64;

/// The apps a run invokes, with the output each computes from its input.
const APPS: [(&str, Output); 2] = [
    ("pipeline", apps::pipeline_output),
    ("fanout", apps::fanout_output),
];

/// The transport's idle timeout (`LinkConfig::default`): a partition lasts longer.
const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the last audit tries to get an answer for one execution.
const AUDIT_PATIENCE: Duration = Duration::from_secs(10);

/// How many problems of a failed run get their execution's full body in `problems.json`.
const BODIES_MAX: usize = 50;

/// Which preset a configuration started from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Preset {
    /// A few hundred executions in about a minute: `cargo test`'s run.
    Short,
    /// Thousands of executions in a few minutes.
    Standard,
    /// 20,000 executions, 60 worker kills, 6 gateway kills, 6 power cuts, pauses and link
    /// faults.
    Long,
}

/// Everything a run needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    /// The preset these values started from (named in the replay command).
    pub preset: Preset,
    /// Requests, each an (app, key) pair, spread over the faults.
    pub requests: usize,
    /// Workers in the cluster.
    pub workers: u32,
    /// Client threads sending POSTs.
    pub clients: usize,
    /// Client threads polling executions until they end.
    pub pollers: usize,
    /// The share of POSTs that wait for the answer, in percent.
    pub sync_percent: u32,
    /// How long a synchronous POST waits for its answer before it is told the id instead.
    pub sync_wait: Duration,
    /// How long the faults go on.
    pub span: Duration,
    /// Workers SIGKILLed and started again.
    pub worker_kills: usize,
    /// Gateway SIGKILLs.
    pub gateway_kills: usize,
    /// Power cuts: every other one the gateway's. With none, the hosts' data directories
    /// are plain directories.
    pub power_cuts: usize,
    /// SIGSTOP pauses, longer than the failure timeout: every third the gateway's.
    pub pauses: usize,
    /// Faults of a worker's link: lossy and partitioned in turn.
    pub link_faults: usize,
    /// The gateway's `--failure-timeout-ms`.
    pub failure_timeout: Duration,
    /// How long after the faults stop every execution has to end.
    pub deadline: Duration,
    /// Seeds the faults, the requests and the links.
    pub seed: u64,
    /// How the workers isolate grains (sandboxes need root).
    pub isolation: Isolation,
    /// Calls one instance of a grain serves before it exits; 1 forks a fresh one per call,
    /// so executions run long enough for the faults to reach them.
    pub reuse: u64,
    /// The grains' interpreter.
    pub python: PathBuf,
    /// Pause between two sweeps of a poller.
    pub poll_interval: Duration,
    /// Pause between two polls of the auditor.
    pub audit_pause: Duration,
    /// Time between two progress lines.
    pub progress: Duration,
    /// How many problems the summary shows.
    pub show: usize,
    /// Keep the cluster's directory even if the run passes.
    pub keep: bool,
    /// Use each key in both apps (one request of each), so that the check shows keys scoped
    /// per app; else every request has a key of its own.
    pub shared_keys: bool,
}

impl Config {
    /// The short run: 3 workers, 300 requests over 25 s of faults (2 worker kills, a gateway
    /// kill, a power cut of the gateway, a pause, a lossy link and a partition), in about a
    /// minute.
    pub fn short(seed: u64) -> Self {
        Self {
            preset: Preset::Short,
            requests: 300,
            workers: 3,
            clients: 6,
            pollers: 2,
            sync_percent: 50,
            sync_wait: Duration::from_secs(5),
            span: Duration::from_secs(25),
            worker_kills: 2,
            gateway_kills: 1,
            power_cuts: 1,
            pauses: 1,
            link_faults: 2,
            failure_timeout: Duration::from_millis(1000),
            deadline: Duration::from_secs(30),
            seed,
            isolation: Isolation::Sandbox,
            reuse: 1,
            python: PathBuf::from("/usr/bin/python3"),
            poll_interval: Duration::from_millis(250),
            audit_pause: Duration::from_millis(20),
            progress: Duration::from_secs(5),
            show: 5,
            keep: false,
            shared_keys: true,
        }
    }

    /// The default run: 3,000 requests over 90 s of faults.
    pub fn standard(seed: u64) -> Self {
        Self {
            preset: Preset::Standard,
            requests: 3000,
            clients: 12,
            pollers: 4,
            span: Duration::from_secs(90),
            worker_kills: 15,
            gateway_kills: 2,
            power_cuts: 2,
            pauses: 4,
            link_faults: 6,
            deadline: Duration::from_secs(60),
            ..Self::short(seed)
        }
    }

    /// The long run: 20,000 requests over 8 minutes of faults (60 worker kills, 6 gateway
    /// kills, 6 power cuts, 12 pauses, 24 link faults).
    pub fn long(seed: u64) -> Self {
        Self {
            preset: Preset::Long,
            requests: 20_000,
            clients: 16,
            pollers: 4,
            span: Duration::from_secs(480),
            worker_kills: 60,
            gateway_kills: 6,
            power_cuts: 6,
            pauses: 12,
            link_faults: 24,
            deadline: Duration::from_secs(120),
            ..Self::short(seed)
        }
    }

    /// The preset's values with this seed.
    pub fn preset(preset: Preset, seed: u64) -> Self {
        match preset {
            Preset::Short => Self::short(seed),
            Preset::Standard => Self::standard(seed),
            Preset::Long => Self::long(seed),
        }
    }

    /// The requests, alternating between the apps; input i for request i.
    fn requests(&self) -> Vec<Request> {
        (0..self.requests)
            .map(|i| {
                let (app, _) = APPS[i % APPS.len()];
                let key = if self.shared_keys { i / APPS.len() } else { i };
                Request {
                    app: app.to_owned(),
                    key: format!("chaos-{:016x}-{key}", self.seed),
                    input: i as u64,
                }
            })
            .collect()
    }
}

/// `sand-bench chaos`: a history check of a real cluster under crashes, pauses and link
/// faults; exits non-zero if anything was lost or wrong.
///
/// Every value left out comes from the preset: `--short` (300 requests, 25 s of faults: 2
/// worker kills, 1 gateway kill, 1 power cut, 1 pause, 2 link faults), the default (3,000
/// requests, 90 s: 15, 2, 2, 4, 6) or `--long` (20,000 requests, 480 s: 60, 6, 6, 12, 24).
/// All use 3 workers, half the POSTs synchronous, and a failure timeout of 1,000 ms. Power
/// cuts need root and /dev/fuse.
#[derive(clap::Args, Debug)]
pub struct ChaosArgs {
    /// The short preset, as `cargo test` runs it.
    #[arg(long, conflicts_with = "long")]
    short: bool,
    /// The long preset.
    #[arg(long)]
    long: bool,
    /// Requests, each an (app, key) pair, POSTed twice.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Workers in the cluster.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: Option<u32>,
    /// Client threads sending POSTs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    clients: Option<u64>,
    /// Client threads polling executions.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    pollers: Option<u64>,
    /// The share of POSTs that wait for the answer, in percent.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    sync_percent: Option<u32>,
    /// How long a synchronous POST waits for its answer, in ms.
    #[arg(long)]
    sync_wait_ms: Option<u64>,
    /// How long the faults go on, in seconds; the requests are spread over them.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    faults_s: Option<u64>,
    /// Worker SIGKILLs.
    #[arg(long)]
    worker_kills: Option<usize>,
    /// Gateway SIGKILLs.
    #[arg(long)]
    gateway_kills: Option<usize>,
    /// Power cuts (every other one the gateway's).
    #[arg(long)]
    power_cuts: Option<usize>,
    /// SIGSTOP pauses longer than the failure timeout (every third the gateway's).
    #[arg(long)]
    pauses: Option<usize>,
    /// Faults of a worker's link (lossy and partitioned in turn).
    #[arg(long)]
    link_faults: Option<usize>,
    /// The gateway's --failure-timeout-ms.
    #[arg(long, value_parser = clap::value_parser!(u64).range(500..))]
    failure_timeout_ms: Option<u64>,
    /// How long after the faults stop every execution has to end, in seconds.
    #[arg(long)]
    deadline_s: Option<u64>,
    /// Seed of the faults, the requests and the links [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// How the workers isolate grains (sandbox needs root).
    #[arg(long, value_enum)]
    isolation: Option<Isolation>,
    /// Calls one instance of a grain serves before it exits [default: 1, a fresh instance
    /// per call, so that executions run long enough for the faults to reach them].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    reuse: Option<u64>,
    /// The grains' interpreter [default: /usr/bin/python3].
    #[arg(long)]
    python: Option<PathBuf>,
    /// Seconds between two progress lines.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    progress_s: Option<u64>,
    /// How many problems to print.
    #[arg(long)]
    show: Option<usize>,
    /// Keep the cluster's directory (stores, logs, history) even if the run passes; a run
    /// that fails always keeps it.
    #[arg(long)]
    keep: bool,
    /// Give every request an idempotency key of its own, instead of using each key in both
    /// apps (one request of each).
    #[arg(long)]
    own_keys: bool,
}

impl ChaosArgs {
    /// Whether the run needs root: sandboxes do.
    pub fn needs_root(&self) -> bool {
        self.isolation.unwrap_or(Isolation::Sandbox) == Isolation::Sandbox
    }

    /// The preset's configuration with the values given on the command line.
    pub fn config(&self) -> Config {
        let preset = match (self.short, self.long) {
            (true, _) => Preset::Short,
            (_, true) => Preset::Long,
            _ => Preset::Standard,
        };
        let mut c = Config::preset(preset, self.seed.unwrap_or_else(seed_from_clock));
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        set(&mut c.requests, self.requests.map(|n| n as usize));
        set(&mut c.workers, self.workers);
        set(&mut c.clients, self.clients.map(|n| n as usize));
        set(&mut c.pollers, self.pollers.map(|n| n as usize));
        set(&mut c.sync_percent, self.sync_percent);
        set(&mut c.sync_wait, self.sync_wait_ms.map(ms));
        set(&mut c.span, self.faults_s.map(s));
        set(&mut c.worker_kills, self.worker_kills);
        set(&mut c.gateway_kills, self.gateway_kills);
        set(&mut c.power_cuts, self.power_cuts);
        set(&mut c.pauses, self.pauses);
        set(&mut c.link_faults, self.link_faults);
        set(&mut c.failure_timeout, self.failure_timeout_ms.map(ms));
        set(&mut c.deadline, self.deadline_s.map(s));
        set(&mut c.isolation, self.isolation);
        set(&mut c.reuse, self.reuse);
        set(&mut c.python, self.python.clone());
        set(&mut c.progress, self.progress_s.map(s));
        set(&mut c.show, self.show);
        c.keep = self.keep;
        c.shared_keys = !self.own_keys;
        c
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// `sand-bench chaos` with the `sand` binary `sand`: prints the summary; true if the run
/// passed.
pub fn main(sand: &Path, args: &ChaosArgs) -> Result<bool> {
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(stop.clone())?;
    let report = run(sand, &args.config(), stop)?;
    println!("{}", report.summary);
    Ok(report.passed)
}

/// What a run found.
#[derive(Clone, Debug)]
pub struct Report {
    /// Nothing lost, nothing wrong.
    pub passed: bool,
    /// The summary for people: figures, faults, problems, and how to replay the run.
    pub summary: String,
    /// Where the cluster's directory was kept (stores, logs, history, problems), if it was.
    pub kept: Option<PathBuf>,
}

/// Runs a history check with the `sand` binary `sand`; `stop` ends it early (the cluster is
/// killed on the way out). An error is a run that could not be judged: the cluster could not
/// start, a host could not be restarted, the gateway ended by itself, or the run was stopped.
pub fn run(sand: &Path, config: &Config, stop: Arc<AtomicBool>) -> Result<Report> {
    let schedule = faults::schedule(config, config.seed)?;
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().next().unwrap_or("?").to_owned())
        .unwrap_or_else(|_| "?".into());
    say(&format!(
        "{} requests to {} apps over {} s of faults ({} faults) on {} workers ({:?} isolation, \
         reuse {}), {}% synchronous; failure timeout {} ms; seed {}; load average {}",
        config.requests,
        APPS.len(),
        config.span.as_secs(),
        schedule.len(),
        config.workers,
        config.isolation,
        config.reuse,
        config.sync_percent,
        config.failure_timeout.as_millis(),
        config.seed,
        load_average
    ));

    let scratch = tempfile::Builder::new()
        .prefix("sand-bench-chaos-apps-")
        .tempdir()?;
    let app_dirs = [
        apps::pipeline(scratch.path(), &config.python, config.reuse)?,
        apps::fanout(scratch.path(), &config.python, config.reuse)?,
    ];
    let mut cluster = Cluster::start(
        sand,
        ClusterSpec {
            workers: config.workers,
            failure_timeout: config.failure_timeout,
            isolation: config.isolation,
            adopt_orphans: true,
            relay: Some(Duration::ZERO),
            seed: config.seed,
            power: config.power_cuts > 0,
            python: Some(config.python.clone()),
            ..ClusterSpec::default()
        },
    )?;
    for dir in &app_dirs {
        cluster.deploy(dir)?;
    }
    let start = Instant::now();
    let load = Load::new(
        config.requests(),
        load::jobs(
            config.requests,
            config.span,
            config.sync_percent,
            config.seed,
        ),
        config.sync_wait,
        config.pollers,
        config.poll_interval,
        start,
        cluster.gateway_lives(),
        stop.clone(),
    );
    let mut faults = Faults::new(schedule, start);
    let (history, timing) = match drive(&mut cluster, &load, &mut faults, config) {
        Ok(done) => done,
        Err(e) if stop.load(Ordering::Relaxed) => return Err(e),
        Err(e) => {
            let kept = cluster.keep_dir();
            let saved = match cluster.save_disks() {
                Ok(()) => String::new(),
                Err(e) => format!(" ({e:#})"),
            };
            return Err(e.context(format!(
                "the cluster's logs and stores are kept in {}{saved}",
                kept.display()
            )));
        }
    };
    let verdict = check(&history, expected);
    let mut summary = Summary {
        config,
        verdict: &verdict,
        faults: &faults,
        cluster: &cluster,
        timing,
        load_average: &load_average,
    }
    .to_string();
    let mut kept = None;
    if !verdict.passed() || config.keep {
        let dir = cluster.keep_dir();
        cluster.save_disks()?;
        let evidence = keep_evidence(&dir, &cluster, &history, &verdict)
            .with_context(|| format!("cannot write the evidence into {}", dir.display()))?;
        summary.push_str(&format!(
            "the cluster's logs and stores are kept in {} ({evidence})\n",
            dir.display()
        ));
        kept = Some(dir);
    }
    Ok(Report {
        passed: verdict.passed(),
        summary,
        kept,
    })
}

/// The output an execution of `app` computes from `input`; every request names one of
/// [`APPS`].
fn expected(app: &str, input: u64) -> u64 {
    APPS.iter()
        .find(|(name, _)| *name == app)
        .map_or(0, |(_, output)| output(input))
}

/// How long the phases of a run took.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// From the first request to the end of the faults.
    healed: Duration,
    /// From the first request to the end of the last audit.
    wall: Duration,
}

/// The run itself: clients, pollers and the auditor while the faults are done on schedule;
/// then every host healed, the clients until their executions have ended or the deadline has
/// passed, and every execution named polled once more. Returns the history.
fn drive(
    cluster: &mut Cluster,
    load: &Load,
    faults: &mut Faults,
    config: &Config,
) -> Result<(History, Timing)> {
    let http = cluster.http().to_owned();
    let api = || Api::new(&http, config.sync_wait);
    let mut progress = Progress::new(config.progress);
    std::thread::scope(|s| {
        let submitters: Vec<_> = (0..config.clients)
            .map(|_| {
                let api = api();
                s.spawn(move || load.submit(&api))
            })
            .collect();
        let pollers: Vec<_> = (0..config.pollers)
            .map(|me| {
                let api = api();
                s.spawn(move || load.poll(&api, me))
            })
            .collect();
        let auditor = {
            let api = api();
            s.spawn(move || load.audit_while_running(&api, config.audit_pause))
        };

        let mut faulted = Ok(());
        while faulted.is_ok() && !load.stopped() && !faults.finished() {
            faulted = faults.tick(cluster, Instant::now());
            progress.maybe(load, faults, cluster);
            std::thread::sleep(Duration::from_millis(20));
        }
        let faulted = faulted.and_then(|()| faults.stop(cluster));
        let healed = load.elapsed();
        if faulted.is_err() {
            load.stop();
        }
        load.set_deadline(Instant::now() + config.deadline);
        let c = load.counts();
        say(&format!(
            "{:6.1} s: faults over, every host healed; {} of {} POSTs answered, {} of {} \
             executions ended; {} s for the rest",
            healed.as_secs_f64(),
            c.answered,
            c.jobs,
            c.ended,
            c.executions,
            config.deadline.as_secs()
        ));

        let mut wait_for = |threads: &[std::thread::ScopedJoinHandle<'_, Result<()>>]| {
            while !threads.iter().all(|t| t.is_finished()) {
                progress.maybe(load, faults, cluster);
                cluster.reap_orphans();
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        wait_for(&submitters);
        let submitted = join_all(submitters);
        load.submissions_done();
        wait_for(&pollers);
        let polled = join_all(pollers);
        load.polling_done();
        let audited = load::joined(auditor.join());

        let audits: Vec<_> = (0..config.pollers)
            .map(|me| {
                let api = api();
                s.spawn(move || load.audit(&api, me, config.pollers, AUDIT_PATIENCE))
            })
            .collect();
        wait_for(&audits);
        let audited_after = join_all(audits);
        progress.line(load, faults, cluster);
        faulted?;
        submitted?;
        polled?;
        audited?;
        audited_after?;
        if load.stopped() {
            bail!("interrupted before the end");
        }
        let timing = Timing {
            healed,
            wall: load.elapsed(),
        };
        Ok((load.history(healed, config.deadline), timing))
    })
}

/// Joins scoped threads; the first error, if any.
fn join_all(threads: Vec<std::thread::ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    let mut first_error = None;
    for t in threads {
        if let Err(e) = load::joined(t.join()) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Progress lines, one every `every`.
struct Progress {
    every: Duration,
    last: Instant,
    retries_told: usize,
}

impl Progress {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: Instant::now(),
            retries_told: 0,
        }
    }

    /// A line, if one is due.
    fn maybe(&mut self, load: &Load, faults: &Faults, cluster: &Cluster) {
        if self.last.elapsed() >= self.every {
            self.line(load, faults, cluster);
        }
    }

    fn line(&mut self, load: &Load, faults: &Faults, cluster: &Cluster) {
        self.last = Instant::now();
        let c = load.counts();
        // Why POSTs got no reply, when some did since the last line.
        let why = if c.retries > self.retries_told {
            format!(" (the last: {})", shorten(&c.last_failure, 120))
        } else {
            String::new()
        };
        self.retries_told = c.retries;
        let done: usize = faults.done.values().sum();
        say(&format!(
            "{:6.1} s: POSTs answered {}/{}, unanswered {}{}; executions {}, ended {}, answered 404 {}; \
             faults {}; gateway life {}; incarnations {}",
            load.elapsed().as_secs_f64(),
            c.answered,
            c.jobs,
            c.retries,
            why,
            c.executions,
            c.ended,
            c.not_found,
            done,
            cluster.gateway_lives().load(Ordering::SeqCst),
            incarnations(cluster).join(" "),
        ));
    }
}

/// Each worker's incarnation, "-" before its first start.
fn incarnations(cluster: &Cluster) -> Vec<String> {
    (1..=cluster.workers())
        .map(|id| {
            cluster
                .incarnation(id)
                .map_or("-".into(), |i| i.to_string())
        })
        .collect()
}

/// The summary of a run, for people.
struct Summary<'a> {
    config: &'a Config,
    verdict: &'a Verdict,
    faults: &'a Faults,
    cluster: &'a Cluster,
    timing: Timing,
    load_average: &'a str,
}

impl std::fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (c, v) = (self.config, self.verdict);
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, value: String| {
            writeln!(f, "  {name:<15} {value}")
        };
        writeln!(f, "chaos summary")?;
        row(
            f,
            "cluster",
            format!(
                "a gateway and {} workers ({:?} isolation, reuse {}), failure timeout {} ms; \
                 load average {} at the start",
                c.workers,
                c.isolation,
                c.reuse,
                c.failure_timeout.as_millis(),
                self.load_average
            ),
        )?;
        row(
            f,
            "requests",
            format!(
                "{} ({}), each POSTed twice; keys {}",
                v.requests,
                APPS.map(|(name, _)| name).join(" and "),
                if c.shared_keys {
                    "shared by the two apps"
                } else {
                    "one per request"
                }
            ),
        )?;
        row(
            f,
            "POSTs",
            format!(
                "{} ({} synchronous, {} of them answered with the outcome); {} got no reply and \
                 were sent again",
                v.posts, v.sync_posts, v.sync_answers, v.posts_unanswered
            ),
        )?;
        row(f, "polls", v.polls.to_string())?;
        row(f, "executions", v.executions.to_string())?;
        row(
            f,
            "succeeded",
            format!("{} with the right output", v.succeeded),
        )?;
        row(
            f,
            "across crashes",
            format!(
                "{} executions seen ended by two or more lives of the gateway",
                v.seen_across_restarts
            ),
        )?;
        let done: Vec<String> = faults::NAMES
            .iter()
            .map(|name| format!("{name} {}", self.faults.done.get(name).unwrap_or(&0)))
            .collect();
        row(f, "faults", done.join(", "))?;
        let dropped: u64 = (1..=c.workers)
            .filter_map(|id| self.cluster.relay(id))
            .map(|r| r.dropped())
            .sum();
        row(f, "datagrams", format!("{dropped} dropped by the links"))?;
        let disks = self.cluster.disk_stats();
        if !disks.is_empty() {
            let sum = |stat: fn(&sand_lazyfs::Stats) -> u64| -> u64 {
                disks.iter().map(|(_, s)| stat(s)).sum()
            };
            row(
                f,
                "disks",
                format!(
                    "{} lazy filesystems: {} bytes written, {} file and {} directory fsyncs",
                    disks.len(),
                    sum(|s| s.bytes_written),
                    sum(|s| s.fsyncs),
                    sum(|s| s.fsyncdirs)
                ),
            )?;
        }
        if !self.faults.cuts.is_empty() {
            let lost = self
                .faults
                .cuts
                .iter()
                .fold(Cut::default(), |sum, (_, cut)| Cut {
                    bytes_lost: sum.bytes_lost + cut.bytes_lost,
                    files_reverted: sum.files_reverted + cut.files_reverted,
                    entries_lost: sum.entries_lost + cut.entries_lost,
                    inodes_lost: sum.inodes_lost + cut.inodes_lost,
                });
            row(
                f,
                "power cuts",
                format!(
                    "lost {} unsynced bytes, reverted {} files, lost {} directory entries and {} \
                     files or directories",
                    lost.bytes_lost, lost.files_reverted, lost.entries_lost, lost.inodes_lost
                ),
            )?;
        }
        row(
            f,
            "gateway lives",
            self.cluster
                .gateway_lives()
                .load(Ordering::SeqCst)
                .to_string(),
        )?;
        row(f, "incarnations", incarnations(self.cluster).join(", "))?;
        row(
            f,
            "wall time",
            format!(
                "{:.1} s (faults during the first {:.1} s; the bound after them {} s)",
                self.timing.wall.as_secs_f64(),
                self.timing.healed.as_secs_f64(),
                c.deadline.as_secs()
            ),
        )?;
        row(f, "seed", c.seed.to_string())?;
        let preset = match c.preset {
            Preset::Short => " --short",
            Preset::Standard => "",
            Preset::Long => " --long",
        };
        let keys = if c.shared_keys { "" } else { " --own-keys" };
        row(
            f,
            "replay",
            format!(
                "sand-bench chaos{preset}{keys} --seed {} (with the same other flags)",
                c.seed
            ),
        )?;
        for note in &self.faults.unplanned {
            row(f, "note", note.clone())?;
        }
        if v.passed() {
            return row(f, "verdict", "PASSED: nothing lost, nothing wrong".into());
        }
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &v.problems {
            *kinds.entry(p.kind()).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        row(
            f,
            "verdict",
            format!(
                "FAILED: {} problem(s): {}",
                v.problems.len(),
                kinds.join(", ")
            ),
        )?;
        writeln!(f, "first {} problem(s):", c.show.min(v.problems.len()))?;
        for p in v.problems.iter().take(c.show) {
            let evidence = p.evidence().to_string();
            writeln!(
                f,
                "  {} {}: {}",
                p.kind(),
                p.subject(),
                shorten(&evidence, 2000)
            )?;
        }
        Ok(())
    }
}

/// Writes into `dir` the history (`history.jsonl`, one exchange a line) and every problem with
/// its evidence, the first ones with their execution's body as the gateway gives it now
/// (`problems.json`); says what it wrote.
fn keep_evidence(
    dir: &Path,
    cluster: &Cluster,
    history: &History,
    verdict: &Verdict,
) -> Result<String> {
    let mut lines = std::io::BufWriter::new(std::fs::File::create(dir.join("history.jsonl"))?);
    for (i, r) in history.requests.iter().enumerate() {
        serde_json::to_writer(
            &mut lines,
            &serde_json::json!({"request": i, "app": r.app, "key": r.key, "input": r.input}),
        )?;
        lines.write_all(b"\n")?;
    }
    for e in &history.events {
        serde_json::to_writer(&mut lines, &e.to_json())?;
        lines.write_all(b"\n")?;
    }
    lines.flush()?;
    let problems: Vec<serde_json::Value> = verdict
        .problems
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let body = p.execution().filter(|_| i < BODIES_MAX).map(|id| {
                cluster
                    .get(&format!("/v1/executions/{id}"))
                    .unwrap_or_else(|e| serde_json::json!({"unavailable": e.to_string()}))
            });
            serde_json::json!({
                "kind": p.kind(),
                "subject": p.subject(),
                "evidence": p.evidence(),
                "body": body,
            })
        })
        .collect();
    std::fs::write(
        dir.join("problems.json"),
        serde_json::to_string_pretty(&problems)?,
    )?;
    Ok(format!(
        "the history in history.jsonl; {} problem(s) in problems.json, the first {} with their \
         execution's body",
        problems.len(),
        problems.len().min(BODIES_MAX)
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_draws_a_schedule_that_fits() {
        for preset in [Preset::Short, Preset::Standard, Preset::Long] {
            let c = Config::preset(preset, 7);
            let faults = faults::schedule(&c, c.seed).expect("the faults fit");
            assert_eq!(
                faults.len(),
                c.worker_kills + c.gateway_kills + c.power_cuts + c.pauses + c.link_faults,
                "{preset:?}"
            );
        }
    }

    #[test]
    fn requests_alternate_between_the_apps_sharing_keys_unless_told_not_to() {
        let mut c = Config::short(7);
        c.requests = 4;
        let r = c.requests();
        let apps: Vec<&str> = r.iter().map(|r| r.app.as_str()).collect();
        assert_eq!(apps, ["pipeline", "fanout", "pipeline", "fanout"]);
        assert_eq!(r[0].key, r[1].key);
        assert_ne!(r[1].key, r[2].key);
        c.shared_keys = false;
        let r = c.requests();
        let keys: std::collections::BTreeSet<&str> = r.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys.len(), 4);
        assert_eq!(expected("fanout", 1), 14);
        assert_eq!(expected("pipeline", 1), 9);
    }
}
