//! `sand-bench`: sand's benchmarks, side by side with Celery and Ray, in one run.
//!
//! It starts real sand clusters (a gateway and workers, as processes of the `sand` binary
//! built beside it), drives them through the HTTP API, and writes `results.json`,
//! `results.md` and SVG plots. Needs root: sandboxes.
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
use sand_bench::measure::{latency, throughput, Stats};
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
    /// The interpreter of the Python grains; it needs numpy for the cold-start figures.
    #[arg(long, default_value = "/usr/bin/python3")]
    python: PathBuf,
    /// The virtualenv for Celery and Ray (made by benches/alternatives/setup.sh).
    #[arg(long, default_value = "target/bench-venv")]
    venv: PathBuf,
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
    /// Celery, Ray and the Unix-datagram floor.
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
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let repo = repo.canonicalize().context("cannot find the repository")?;
    let scratch = tempfile::Builder::new()
        .prefix("sand-bench-apps-")
        .tempdir()?;
    let apps = Apps::write(scratch.path(), &args.python)?;
    let runs = args.runs as usize;
    let clients = args.clients as usize;
    let seconds = args.seconds as f64;
    let want = |p: Part| !args.skip.contains(&p);
    let mut results = Results::new(&repo, &args.python, clients);
    // The apps name the interpreter: the cluster's policy allows it.
    let base = ClusterSpec {
        python: Some(args.python.clone()),
        ..ClusterSpec::default()
    };

    if want(Part::Chain) {
        let warmup = runs / 10;
        for (gateway_hops, route, name) in [
            (false, LOCAL, "sand"),
            (true, GATEWAY, "sand, every hop via the gateway"),
        ] {
            progress(&format!("the chain on loopback: {route}"));
            let c = Cluster::start(
                &sand,
                ClusterSpec {
                    gateway_hops,
                    ..base.clone()
                },
            )?;
            let ([fresh, reused], rows) = hops(&c, &apps, "loopback", route, warmup, runs)?;
            results.hops.extend(rows);
            progress(&format!("throughput: {route}"));
            let tp = throughput(&c, "chain", CHAIN_SUM, clients, seconds)?;
            let tp_reuse = throughput(&c, "chain-reuse", CHAIN_SUM, clients, seconds)?;
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

    if want(Part::Link) {
        let delay = Duration::from_micros(250);
        let rtt = Stats::from(&link::Relay::round_trip(delay)?);
        progress(&format!(
            "emulated link: {} ms round trip (median; p99 {} ms)",
            plot::number(rtt.median_ms),
            plot::number(rtt.p99_ms)
        ));
        results.link_round_trip = Some(rtt);
        let link = format!("emulated link, {} ms each way", delay.as_secs_f64() * 1e3);
        for (gateway_hops, route) in [(false, LOCAL), (true, GATEWAY)] {
            progress(&format!("the chain over the emulated link: {route}"));
            let c = Cluster::start(
                &sand,
                ClusterSpec {
                    gateway_hops,
                    relay: Some(delay),
                    ..base.clone()
                },
            )?;
            let (_, rows) = hops(&c, &apps, &link, route, runs / 10, runs)?;
            results.hops.extend(rows);
        }
    }

    if want(Part::Memory) {
        for (app, name, zygotes) in [(&apps.chain, "chain", 5), (&apps.memory, "memory", 1)] {
            progress(&format!("memory of the {name} app's sandbox"));
            results
                .memory
                .push(memory_row(&sand, &base, app, name, zygotes)?);
        }
    }

    if want(Part::Recovery) {
        progress("recovery: SIGKILL of a worker mid-chain");
        results.recovery = Some(recovery::run(&sand, &base, &apps.recovery, 16)?);
    }

    if want(Part::ColdStart) {
        progress("cold start (cargo bench -p sand-worker --bench cold_start)");
        match cold_start::run(&repo, &args.python, runs) {
            Ok(c) => results.cold_start = Some(c),
            Err(e) => results
                .notes
                .push(format!("cold start not measured: {e:#}")),
        }
    }

    if want(Part::Alternatives) {
        let scripts = alternatives::Scripts::new(&repo, &std::path::absolute(&args.venv)?);
        progress("installing the alternatives (benches/alternatives/setup.sh)");
        scripts.setup()?;
        for system in ["unix", "celery", "ray"] {
            progress(&format!("the chain on {system}"));
            results
                .alternatives
                .push(scripts.run(system, runs, clients, args.seconds));
        }
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot make {}", args.out.display()))?;
    let markdown = results.write(&args.out)?;
    println!("{markdown}");
    progress(&format!("results in {}", args.out.display()));
    Ok(())
}

/// How hops travel, as the rows name it.
const LOCAL: &str = "local bus";
const GATEWAY: &str = "gateway hop";

/// Deploys the chain and the one-grain app, fresh and reused, and measures each: per-hop rows
/// for both, and the chains' samples (fresh, reused).
fn hops(
    c: &Cluster,
    apps: &Apps,
    link: &str,
    route: &str,
    warmup: usize,
    runs: usize,
) -> Result<([Vec<Duration>; 2], Vec<HopRow>)> {
    for app in [
        &apps.chain,
        &apps.chain_reuse,
        &apps.whole,
        &apps.whole_reuse,
    ] {
        c.deploy(app)?;
    }
    let mut rows = Vec::new();
    let mut chains = Vec::new();
    for (chain_app, whole_app, instances) in [
        ("chain", "whole", "fresh instance"),
        ("chain-reuse", "whole-reuse", "reused instance"),
    ] {
        let chain = latency(c, chain_app, CHAIN_SUM, warmup, runs)?;
        let whole = latency(c, whole_app, CHAIN_SUM, warmup, runs)?;
        rows.push(HopRow::new(
            link,
            &format!("{route}, {instances}"),
            &chain,
            &whole,
        ));
        chains.push(chain);
    }
    let reused = chains.pop().unwrap_or_default();
    let fresh = chains.pop().unwrap_or_default();
    Ok(([fresh, reused], rows))
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
            while client.execution(&id)?["status"] == "running" {
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
