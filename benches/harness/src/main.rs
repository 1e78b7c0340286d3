//! `sand-bench`: sand's benchmarks, side by side with Celery and Ray, in one run.
//!
//! It starts real sand clusters (a gateway and workers, as processes of the `sand` binary
//! built beside it), drives them through the HTTP API, and writes `results.json`,
//! `results.md` and SVG plots. Needs root: sandboxes. It installs what it needs (a venv with
//! numpy, Celery, Ray and Restate: `benches/alternatives/setup.sh`), refuses to start on a busy machine
//! unless told `--noisy`, and records the load average around each part.
//!
//! ```text
//! cargo build --release -p sand -p sand-bench && target/release/sand-bench --out bench-results
//! ```
//!
//! `sand-bench chaos` is another kind of run: crashes, pauses and link faults under load, and
//! a check of the history that nothing was lost or wrong (see `chaos.rs`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use sand_bench::apps::{Apps, CHAIN_SUM};
use sand_bench::load::{self, LoadAverage, PartLoad};
use sand_bench::measure::{alternate, latency, throughput, Stats};
use sand_bench::report::{ChainRow, HopRow, MemoryRow, Results};
use sand_bench::{alternatives, chaos, cold_start, plot, recovery};
use sand_testkit::cluster::{Cluster, ClusterSpec};
use sand_testkit::{link, proc};

/// sand's benchmark harness: latency, throughput, cold start, memory and recovery, with
/// Celery and Ray on the same chain in the same run.
#[derive(Parser, Debug)]
#[command(name = "sand-bench", args_conflicts_with_subcommands = true)]
struct Args {
    /// Another kind of run than the benchmarks.
    #[command(subcommand)]
    command: Option<Command>,
    /// Where results.json, results.md and the plots are written.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Sequential chains per latency figure (after a warm-up of a tenth as many).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..))]
    runs: u64,
    /// Concurrent clients in the throughput runs.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    clients: u64,
    /// Seconds each throughput run lasts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Alternating rounds each latency figure is measured in (A B A B ...), its runs split
    /// among them, so that a drift of the machine hits every system alike.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10))]
    rounds: u64,
    /// The interpreter of the Python grains and of the cold-start bench; it needs numpy (the
    /// memory part's grain and the cold-start bench import it). By default the venv's.
    #[arg(long)]
    python: Option<PathBuf>,
    /// The virtualenv with numpy, Celery, Ray and Restate (made by benches/alternatives/setup.sh).
    #[arg(long, default_value = "target/bench-venv")]
    venv: PathBuf,
    /// Run even if the machine is busy (load average above 1.0 at the start); results.md
    /// then says the run is noisy.
    #[arg(long)]
    noisy: bool,
    /// Skip these parts (repeat the flag for more).
    #[arg(long, value_enum)]
    skip: Vec<Part>,
}

/// Runs other than the benchmarks.
#[derive(Subcommand, Debug)]
enum Command {
    /// A history check under faults: workers and the gateway SIGKILLed and paused, links
    /// broken, while keyed invocations go in; exits non-zero if any is lost or wrong.
    Chaos(chaos::ChaosArgs),
}

/// The parts of a run.
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Part {
    /// The chain on the local bus and through the gateway, on loopback; throughput.
    Chain,
    /// The same ablation over an emulated data-center link (a delaying UDP relay).
    Link,
    /// PSS of idle sandboxes and of running instances.
    Memory,
    /// SIGKILL of a worker mid-chain.
    Recovery,
    /// The worker's cold-start benchmark (cargo bench).
    ColdStart,
    /// Celery, Ray, Restate and the Unix-datagram floor.
    Alternatives,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = match &args.command {
        None => run(&args).map(|()| true),
        Some(Command::Chaos(chaos)) => {
            sand_binary(chaos.needs_root()).and_then(|sand| chaos::main(&sand, chaos))
        }
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sand-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn progress(what: &str) {
    eprintln!("sand-bench: {what}");
}

/// The `sand` binary beside this one; fails without root when `root` is needed.
fn sand_binary(root: bool) -> Result<PathBuf> {
    if root && !proc::is_root() {
        bail!("sand-bench needs root: sand's workers make sandboxes");
    }
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let sand = exe.with_file_name("sand");
    if !sand.is_file() {
        bail!(
            "no sand binary beside {}: build both with `cargo build --release -p sand -p sand-bench`",
            exe.display()
        );
    }
    Ok(sand)
}

fn run(args: &Args) -> Result<()> {
    let sand = sand_binary(true)?;
    let start = LoadAverage::now()?;
    if let Some(why) = load::refusal(start, args.noisy, || {
        load::busiest(5, Duration::from_secs(1))
    }) {
        bail!("{why}");
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let repo = repo.canonicalize().context("cannot find the repository")?;
    let scripts = alternatives::Scripts::new(&repo, &std::path::absolute(&args.venv)?);
    let mut loads = Vec::new();
    let before = LoadAverage::now()?;
    progress("installing what the run needs (benches/alternatives/setup.sh)");
    scripts.setup()?;
    loads.push(PartLoad {
        part: "setup".into(),
        before,
        after: LoadAverage::now()?,
    });
    let python = args.python.clone().unwrap_or_else(|| scripts.python());
    let scratch = tempfile::Builder::new()
        .prefix("sand-bench-apps-")
        .tempdir()?;
    let parts = Parts {
        args,
        sand,
        repo,
        apps: Apps::write(scratch.path(), &python)?,
        // The apps name the interpreter: the cluster's policy allows it.
        base: ClusterSpec {
            python: Some(python.clone()),
            ..ClusterSpec::default()
        },
        python,
        scripts,
    };
    let mut results = Results::new(
        &parts.repo,
        &parts.python,
        start,
        args.noisy,
        args.rounds as usize,
        args.clients as usize,
    );
    results.loads = loads;
    for &part in Part::value_variants() {
        if args.skip.contains(&part) {
            continue;
        }
        let before = LoadAverage::now()?;
        parts.run(part, &mut results)?;
        results.loads.push(PartLoad {
            part: part
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().into()),
            before,
            after: LoadAverage::now()?,
        });
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot make {}", args.out.display()))?;
    let markdown = results.write(&args.out)?;
    println!("{markdown}");
    progress(&format!("results in {}", args.out.display()));
    Ok(())
}

/// What every part of a run works with.
struct Parts<'a> {
    args: &'a Args,
    sand: PathBuf,
    repo: PathBuf,
    apps: Apps,
    base: ClusterSpec,
    python: PathBuf,
    scripts: alternatives::Scripts,
}

impl Parts<'_> {
    /// Runs one part, adding its figures to `results`.
    fn run(&self, part: Part, results: &mut Results) -> Result<()> {
        let args = self.args;
        let runs = args.runs as usize;
        let rounds = args.rounds as usize;
        let clients = args.clients as usize;
        match part {
            Part::Chain => {
                let routes = [
                    (false, LOCAL, "sand"),
                    (true, GATEWAY, "sand, every hop via the gateway"),
                ];
                progress(&format!(
                    "the chain on loopback: {LOCAL} and {GATEWAY}, {rounds} alternating rounds"
                ));
                let clusters = routes
                    .iter()
                    .map(|&(gateway_hops, route, _)| {
                        let spec = ClusterSpec {
                            gateway_hops,
                            ..self.base.clone()
                        };
                        Ok((Cluster::start(&self.sand, spec)?, route))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (chains, rows) = hops(&clusters, &self.apps, "loopback", runs, rounds)?;
                results.hops.extend(rows);
                for (((c, route), [fresh, reused]), (_, _, name)) in
                    clusters.iter().zip(chains).zip(routes)
                {
                    progress(&format!("throughput: {route}"));
                    let seconds = args.seconds as f64;
                    let tp = throughput(c, "chain", CHAIN_SUM, clients, seconds)?;
                    let tp_reuse = throughput(c, "chain-reuse", CHAIN_SUM, clients, seconds)?;
                    results.sand.push(ChainRow::new(
                        &format!("{name}, fresh instance per call"),
                        &fresh,
                        Some(tp),
                    ));
                    results.sand.push(ChainRow::new(
                        &format!("{name}, reused instances"),
                        &reused,
                        Some(tp_reuse),
                    ));
                }
            }
            Part::Link => {
                let delay = Duration::from_micros(250);
                let rtt = Stats::from(&link::Relay::round_trip(delay)?);
                progress(&format!(
                    "emulated link: {} ms round trip (median; p99 {} ms)",
                    plot::number(rtt.median_ms),
                    plot::number(rtt.p99_ms)
                ));
                results.link_round_trip = Some(rtt);
                let link = format!("emulated link, {} ms each way", delay.as_secs_f64() * 1e3);
                progress(&format!(
                    "the chain over the emulated link: {LOCAL} and {GATEWAY}, {rounds} alternating rounds"
                ));
                let clusters = [(false, LOCAL), (true, GATEWAY)]
                    .into_iter()
                    .map(|(gateway_hops, route)| {
                        let spec = ClusterSpec {
                            gateway_hops,
                            relay: Some(delay),
                            ..self.base.clone()
                        };
                        Ok((Cluster::start(&self.sand, spec)?, route))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (_, rows) = hops(&clusters, &self.apps, &link, runs, rounds)?;
                results.hops.extend(rows);
            }
            Part::Memory => {
                let apps = &self.apps;
                for (app, name, zygotes) in [(&apps.chain, "chain", 5), (&apps.memory, "memory", 1)]
                {
                    progress(&format!("memory of the {name} app's sandbox"));
                    results
                        .memory
                        .push(memory_row(&self.sand, &self.base, app, name, zygotes)?);
                }
            }
            Part::Recovery => {
                progress("recovery: SIGKILL of a worker mid-chain");
                results.recovery = Some(recovery::run(
                    &self.sand,
                    &self.base,
                    &self.apps.recovery,
                    16,
                )?);
            }
            Part::ColdStart => {
                progress("cold start (cargo bench -p sand-worker --bench cold_start)");
                match cold_start::run(&self.repo, &self.python, runs) {
                    Ok(c) => results.cold_start = Some(c),
                    Err(e) => results
                        .notes
                        .push(format!("cold start not measured: {e:#}")),
                }
            }
            Part::Alternatives => {
                let systems = ["unix", "celery", "ray", "restate-run", "restate-handlers"];
                progress(&format!(
                    "the chain on {}, {rounds} alternating rounds",
                    systems.join(", ")
                ));
                // Throughput in the last round only: one window per system.
                let measured = alternate(systems.len(), runs, rounds, |i, round, share| {
                    let seconds = if round + 1 == rounds { args.seconds } else { 0 };
                    progress(&format!("the chain on {}, round {}", systems[i], round + 1));
                    Ok(self.scripts.run(systems[i], share, clients, seconds))
                })?;
                results
                    .alternatives
                    .extend(measured.into_iter().filter_map(alternatives::merge));
            }
        }
        Ok(())
    }
}

/// How hops travel, as the rows name it.
const LOCAL: &str = "local bus";
const GATEWAY: &str = "gateway hop";

/// The apps `hops` measures on each cluster: the chain and the one-grain app doing the same
/// sum, each with a fresh instance per call and with reused instances.
const HOP_APPS: [&str; 4] = ["chain", "whole", "chain-reuse", "whole-reuse"];

/// One cluster's chain samples: with a fresh instance per call, and with reused instances.
type ChainSamples = [Vec<Duration>; 2];

/// Deploys the `HOP_APPS` on each cluster (named by its route), warms them up, and measures
/// them all in alternating rounds: per-hop rows, fresh and reused, and each cluster's chain
/// samples (fresh, reused).
fn hops(
    clusters: &[(Cluster, &str)],
    apps: &Apps,
    link: &str,
    runs: usize,
    rounds: usize,
) -> Result<(Vec<ChainSamples>, Vec<HopRow>)> {
    for (c, _) in clusters {
        for app in [
            &apps.chain,
            &apps.whole,
            &apps.chain_reuse,
            &apps.whole_reuse,
        ] {
            c.deploy(app)?;
        }
        for app in HOP_APPS {
            latency(c, app, CHAIN_SUM, runs / 10, 0)?;
        }
    }
    let measured = alternate(
        clusters.len() * HOP_APPS.len(),
        runs,
        rounds,
        |i, _, share| {
            let (c, _) = &clusters[i / HOP_APPS.len()];
            latency(c, HOP_APPS[i % HOP_APPS.len()], CHAIN_SUM, 0, share)
        },
    )?;
    let mut merged = measured.into_iter().map(|rounds| rounds.concat());
    let mut rows = Vec::new();
    let mut chains = Vec::new();
    for (_, route) in clusters {
        // In the order of HOP_APPS.
        let mut next = || merged.next().unwrap_or_default();
        let (chain, whole, chain_reuse, whole_reuse) = (next(), next(), next(), next());
        rows.push(HopRow::new(
            link,
            &format!("{route}, fresh instance"),
            &chain,
            &whole,
        ));
        rows.push(HopRow::new(
            link,
            &format!("{route}, reused instance"),
            &chain_reuse,
            &whole_reuse,
        ));
        chains.push([chain, chain_reuse]);
    }
    Ok((chains, rows))
}

/// The PSS of one app's sandbox with its zygotes idle, and per running instance.
fn memory_row(
    sand: &Path,
    base: &ClusterSpec,
    app: &Path,
    name: &str,
    zygotes: usize,
) -> Result<MemoryRow> {
    let c = Cluster::start(sand, base.clone())?;
    c.deploy(app)?;
    let client = c.client();
    let worker = c.worker_pid(1).context("no worker")?;
    let adds = if name == "chain" { CHAIN_SUM } else { 0 };
    client.invoke(name, 0, adds)?;
    // Let the spares be forked and the first instances exit.
    std::thread::sleep(Duration::from_millis(1500));
    let idle = proc::descendants(worker);
    let idle_pss = total_pss_kib(&idle);
    let mut row = MemoryRow {
        app: name.to_owned(),
        zygotes,
        idle_processes: idle.len(),
        idle_pss_kib: idle_pss,
        running_instances: 0,
        per_instance_pss_kib: None,
    };
    if name == "memory" {
        // Hold four calls open for three seconds, and weigh the sandbox meanwhile.
        let holding = 4;
        let ids: Vec<String> = (0..holding)
            .map(|_| client.start(name, 3))
            .collect::<Result<_>>()?;
        std::thread::sleep(Duration::from_millis(1500));
        let busy = total_pss_kib(&proc::descendants(worker));
        row.running_instances = holding;
        row.per_instance_pss_kib = Some(busy.saturating_sub(idle_pss) / holding as u64);
        for id in ids {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while client.execution(&id)?.status == sand_api::Status::Running {
                if std::time::Instant::now() > deadline {
                    bail!("a held call did not end");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(row)
}

/// The summed proportional set size of `pids`, in KiB.
fn total_pss_kib(pids: &std::collections::BTreeSet<u32>) -> u64 {
    pids.iter().filter_map(|&p| proc::pss_kib(p)).sum()
}
