//! The results of a run: the JSON document, the Markdown table with the targets, and the
//! plots.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::alternatives::Alternative;
use crate::apps::CHAIN_LEN;
use crate::cold_start::ColdStart;
use crate::load::{LoadAverage, PartLoad, QUIET};
use crate::measure::{Stats, Throughput};
use crate::plot::{self, number, Bar};
use crate::recovery::Recovery;

/// One way of running the chain end to end through sand's HTTP API.
#[derive(Clone, Debug, Serialize)]
pub struct ChainRow {
    /// What was measured.
    pub name: String,
    /// One client, sequential chains.
    pub latency: Stats,
    /// Concurrent clients.
    pub throughput: Option<Throughput>,
}

impl ChainRow {
    /// A row from latency samples.
    pub fn new(name: &str, samples: &[Duration], throughput: Option<Throughput>) -> Self {
        Self {
            name: name.to_owned(),
            latency: Stats::of(samples),
            throughput,
        }
    }
}

/// Per-hop latency of one way of chaining over one link.
#[derive(Clone, Debug, Serialize)]
pub struct HopRow {
    /// The link between the gateway and the workers.
    pub link: String,
    /// How the hops travel.
    pub mode: String,
    /// The 5-grain chain end to end.
    pub chain: Stats,
    /// One grain doing the same sum end to end.
    pub whole: Stats,
    /// Per hop: each chain's time less the one-grain median, over the chain's hops.
    pub per_hop: Stats,
}

impl HopRow {
    /// A row from the chain's and the one-grain app's samples.
    pub fn new(link: &str, mode: &str, chain: &[Duration], whole: &[Duration]) -> Self {
        let whole = Stats::of(whole);
        let hops = (CHAIN_LEN - 1) as f64;
        // A chain faster than the one-grain median counts as no time per hop.
        let per_hop: Vec<Duration> = chain
            .iter()
            .map(|d| {
                let ms = (d.as_secs_f64() * 1e3 - whole.median_ms) / hops;
                Duration::try_from_secs_f64(ms / 1e3).unwrap_or_default()
            })
            .collect();
        Self {
            link: link.to_owned(),
            mode: mode.to_owned(),
            chain: Stats::of(chain),
            whole,
            per_hop: Stats::of(&per_hop),
        }
    }
}

/// Memory of one app's sandbox.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryRow {
    /// The app.
    pub app: String,
    /// Its grains, one zygote each.
    pub zygotes: usize,
    /// Processes under the worker with no call running: holder, zygotes, spares.
    pub idle_processes: usize,
    /// Their summed PSS.
    pub idle_pss_kib: u64,
    /// Calls held open for the per-instance figure.
    pub running_instances: usize,
    /// The growth of the sandbox's PSS per running instance.
    pub per_instance_pss_kib: Option<u64>,
}

/// The machine and the software measured.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
    /// The load average when the run started.
    pub load_before: LoadAverage,
    /// The grains' Python.
    pub python: String,
    /// sand's commit.
    pub sand_commit: String,
    /// When (UTC).
    pub date: String,
    /// Processes are not pinned to CPUs.
    pub pinned: bool,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Results {
    /// Where it ran.
    pub machine: Machine,
    /// Run with `--noisy`, which lets it start above the quiet load average: not a result.
    pub noisy: bool,
    /// The load average before and after each part.
    pub loads: Vec<PartLoad>,
    /// Alternating rounds each latency figure was measured in.
    pub rounds: usize,
    /// Concurrent clients in throughput runs.
    pub clients: usize,
    /// The chain end to end through sand.
    pub sand: Vec<ChainRow>,
    /// Per-hop latency: the SAND ablation.
    pub hops: Vec<HopRow>,
    /// The emulated link's measured round trip.
    pub link_round_trip: Option<Stats>,
    /// Celery, Ray, Restate's two shapes, the Unix floor.
    pub alternatives: Vec<Alternative>,
    /// Cold start per call.
    pub cold_start: Option<ColdStart>,
    /// Sandbox memory.
    pub memory: Vec<MemoryRow>,
    /// Recovery after a worker's SIGKILL.
    pub recovery: Option<Recovery>,
    /// What could not be measured, and why.
    pub notes: Vec<String>,
}

fn output(program: &str, args: &[&str], dir: &Path) -> String {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

impl Results {
    /// Empty results of a run that started at `load`, with the machine described.
    pub fn new(
        repo: &Path,
        python: &Path,
        load: LoadAverage,
        noisy: bool,
        rounds: usize,
        clients: usize,
    ) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let python_version = Command::new(python)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|_| "not found".to_owned());
        Self {
            machine: Machine {
                cpu,
                cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
                kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
                load_before: load,
                python: format!("{} ({})", python.display(), python_version),
                sand_commit: output("git", &["rev-parse", "--short", "HEAD"], repo),
                date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"], repo),
                pinned: false,
            },
            noisy,
            loads: Vec::new(),
            rounds,
            clients,
            sand: Vec::new(),
            hops: Vec::new(),
            link_round_trip: None,
            alternatives: Vec::new(),
            cold_start: None,
            memory: Vec::new(),
            recovery: None,
            notes: Vec::new(),
        }
    }

    /// Writes results.json, results.md and the plots into `dir`; returns the Markdown.
    pub fn write(&self, dir: &Path) -> Result<String> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("results.json"), json).context("cannot write results.json")?;
        let markdown = self.markdown()?;
        std::fs::write(dir.join("results.md"), &markdown).context("cannot write results.md")?;
        self.plots(dir)?;
        Ok(markdown)
    }

    fn alternative(&self, system: &str) -> Option<&Alternative> {
        self.alternatives
            .iter()
            .find(|a| a.system == system && a.unavailable.is_none())
    }

    fn sand_row(&self, prefix: &str) -> Option<&ChainRow> {
        self.sand.iter().find(|r| r.name.starts_with(prefix))
    }

    fn hop(&self, link: &str, mode: &str) -> Option<&HopRow> {
        self.hops
            .iter()
            .find(|h| h.link.starts_with(link) && h.mode.starts_with(mode))
    }

    fn markdown(&self) -> Result<String> {
        let m = &self.machine;
        let mut s = String::new();
        writeln!(s, "Machine: {} x {}, Linux {}, load before the run {}; {}; sand {} on {}; processes not pinned.\n",
            m.cpus, m.cpu, m.kernel, m.load_before, m.python, m.sand_commit, m.date)?;
        if self.noisy {
            writeln!(s, "**A noisy run, not a result**: run with `--noisy`, which lets a run start above load average {QUIET:.1}; this one started at {}.\n", m.load_before)?;
        }
        if !self.loads.is_empty() {
            writeln!(
                s,
                "Load average (1, 5, 15 minutes) before and after each part: {}.\n",
                self.loads
                    .iter()
                    .map(|l| format!("{} {} → {}", l.part, l.before, l.after))
                    .collect::<Vec<_>>()
                    .join("; ")
            )?;
        }

        writeln!(s, "**A chain of {CHAIN_LEN} trivial Python steps, end to end** (one client: median and p99 of sequential chains, in {} alternating rounds; throughput: {} clients)\n", self.rounds, self.clients)?;
        writeln!(
            s,
            "| system | median | p99 | chains/s | gateway CPU per chain |"
        )?;
        writeln!(s, "|---|---|---|---|---|")?;
        for r in &self.sand {
            let (tp, cpu) = match &r.throughput {
                Some(t) => (
                    number(t.chains_per_s),
                    t.gateway_cpu_ms_per_chain
                        .map_or("-".into(), |c| format!("{} ms", number(c))),
                ),
                None => ("-".into(), "-".into()),
            };
            writeln!(
                s,
                "| {} | {} ms | {} ms | {tp} | {cpu} |",
                r.name,
                number(r.latency.median_ms),
                number(r.latency.p99_ms)
            )?;
        }
        for a in &self.alternatives {
            let name = format!("{} {}", a.system, a.version.as_deref().unwrap_or(""));
            match (&a.latency, &a.unavailable) {
                (Some(l), None) => writeln!(
                    s,
                    "| {name} ({}) | {} ms | {} ms | {} | - |",
                    a.setup.as_deref().unwrap_or(""),
                    number(l.median_ms),
                    number(l.p99_ms),
                    a.throughput.map_or("-".into(), |t| number(t.chains_per_s))
                )?,
                (_, reason) => writeln!(
                    s,
                    "| {} | not measured: {} | | | |",
                    a.system,
                    reason.as_deref().unwrap_or("no figures")
                )?,
            }
        }

        if !self.hops.is_empty() {
            writeln!(s, "\n**Per hop: the local bus against a hop through the gateway** (per hop = (chain − one-grain median) / {})\n", CHAIN_LEN - 1)?;
            if let Some(rtt) = &self.link_round_trip {
                writeln!(s, "The emulated link is a UDP relay between the workers and the gateway that holds each datagram 0.25 ms each way (this kernel has no `sch_netem` for `tc netem`); a datagram's round trip through it measured {} ms median, {} ms p99.\n", number(rtt.median_ms), number(rtt.p99_ms))?;
            }
            writeln!(s, "| link | hops | chain median | chain p99 | one grain median | per hop median | per hop p99 |")?;
            writeln!(s, "|---|---|---|---|---|---|---|")?;
            for h in &self.hops {
                writeln!(
                    s,
                    "| {} | {} | {} ms | {} ms | {} ms | {} ms | {} ms |",
                    h.link,
                    h.mode,
                    number(h.chain.median_ms),
                    number(h.chain.p99_ms),
                    number(h.whole.median_ms),
                    number(h.per_hop.median_ms),
                    number(h.per_hop.p99_ms)
                )?;
            }
        }

        if let Some(c) = &self.cold_start {
            writeln!(
                s,
                "\n**Cold start per call, a grain that imports numpy** ({} calls per mode)\n",
                c.calls
            )?;
            writeln!(s, "| start | median | p99 |\n|---|---|---|")?;
            for (name, mode) in [
                ("pre-forked zygote child", &c.prefork),
                ("fork on demand (SAND)", &c.on_demand),
                ("exec: fresh interpreter", &c.exec),
                ("warm: reused instance", &c.warm),
            ] {
                writeln!(
                    s,
                    "| {name} | {} µs | {} µs |",
                    number(mode.median_us),
                    number(mode.p99_us)
                )?;
            }
            writeln!(
                s,
                "\nMemory: zygote PSS {} KiB; an instance mid-call {} KiB PSS, of which {} KiB private (USS); a fresh interpreter with the same imports {} KiB PSS.",
                c.zygote_pss_kib, c.instance_pss_kib, c.instance_private_kib, c.fresh_pss_kib
            )?;
            writeln!(s, "\n| instances serving a call | PSS of each | of fresh | USS of each |\n|---|---|---|---|")?;
            for h in &c.held {
                writeln!(
                    s,
                    "| {} | {} KiB | {:.0}% | {} KiB |",
                    h.instances,
                    h.pss_kib,
                    100.0 * h.pss_kib as f64 / c.fresh_pss_kib.max(1) as f64,
                    h.private_kib
                )?;
            }
        }

        if !self.memory.is_empty() {
            writeln!(s, "\n**Sandbox memory (PSS)**\n")?;
            writeln!(s, "| app | zygotes | idle processes | idle sandbox | per running instance |\n|---|---|---|---|---|")?;
            for r in &self.memory {
                writeln!(
                    s,
                    "| {} | {} | {} | {} KiB | {} |",
                    r.app,
                    r.zygotes,
                    r.idle_processes,
                    r.idle_pss_kib,
                    r.per_instance_pss_kib.map_or("-".into(), |k| format!(
                        "{k} KiB ({} held)",
                        r.running_instances
                    ))
                )?;
            }
        }

        if let Some(r) = &self.recovery {
            writeln!(s, "\n**Recovery**: {} slow chains (3 steps of 300 ms) on two workers; worker 2 killed with SIGKILL mid-chain; {} chains had calls recovered. From the kill, the median recovered chain answered after {:.0} ms and the last after {:.0} ms (the gateway's failure timeout is {} ms).",
                r.chains, r.recovered_chains, r.median_answer_ms, r.last_answer_ms, r.failure_timeout_ms)?;
        }

        writeln!(s, "\n**Targets**\n")?;
        writeln!(s, "| target | measured | verdict |\n|---|---|---|")?;
        for (target, ratio, goal) in self.targets() {
            let verdict = match ratio {
                Some(r) if r >= goal => "met",
                Some(_) => "missed",
                None => "not measured",
            };
            writeln!(
                s,
                "| {target} (≥ {goal}x) | {} | {verdict} |",
                ratio.map_or("-".into(), |r| format!("{r:.1}x"))
            )?;
        }
        for note in &self.notes {
            writeln!(s, "\nNote: {note}")?;
        }
        Ok(s)
    }

    /// (target, measured ratio, goal) for each target of the issue.
    fn targets(&self) -> Vec<(&'static str, Option<f64>, f64)> {
        let fresh = self.sand_row("sand, fresh");
        let reuse = self.sand_row("sand, reused");
        let celery = self.alternative("celery");
        let ray = self.alternative("ray");
        // Restate's faster shape: the one the target is set against.
        let restate = self
            .alternatives
            .iter()
            .filter(|a| a.system.starts_with("restate-") && a.unavailable.is_none())
            .filter_map(|a| a.latency.map(|l| l.median_ms))
            .reduce(f64::min);
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        // The hop target compares reused instances: with a fresh instance per call, each hop
        // also pays for a fork and an exit, which hides how the hop travels.
        let netem = |mode| self.hop("emulated", mode).map(|h| h.per_hop.median_ms);
        vec![
            (
                "local-bus hop faster than a gateway hop, emulated link, reused instances",
                ratio(netem("gateway hop, reused"), netem("local bus, reused")),
                3.0,
            ),
            (
                "chain latency lower than Celery's",
                ratio(
                    celery.and_then(|c| c.latency.map(|l| l.median_ms)),
                    fresh.map(|f| f.latency.median_ms),
                ),
                20.0,
            ),
            (
                "chain latency lower than Ray's",
                ratio(
                    ray.and_then(|r| r.latency.map(|l| l.median_ms)),
                    fresh.map(|f| f.latency.median_ms),
                ),
                10.0,
            ),
            (
                "chain latency lower than Restate's faster shape, reused instances",
                ratio(restate, reuse.map(|r| r.latency.median_ms)),
                10.0,
            ),
            (
                "throughput over Ray's, fresh instance per call",
                ratio(
                    fresh.and_then(|f| f.throughput.map(|t| t.chains_per_s)),
                    ray.and_then(|r| r.throughput.map(|t| t.chains_per_s)),
                ),
                1.5,
            ),
            (
                "throughput over Ray's, reused instances",
                ratio(
                    reuse.and_then(|f| f.throughput.map(|t| t.chains_per_s)),
                    ray.and_then(|r| r.throughput.map(|t| t.chains_per_s)),
                ),
                20.0,
            ),
            (
                "pre-forked cold start faster than exec",
                self.cold_start
                    .as_ref()
                    .map(|c| c.exec.median_us / c.prefork.median_us),
                50.0,
            ),
        ]
    }

    fn plots(&self, dir: &Path) -> Result<()> {
        let mut latency: Vec<Bar> = self
            .sand
            .iter()
            .map(|r| Bar {
                label: r.name.clone(),
                value: r.latency.median_ms,
                tail: Some(r.latency.p99_ms),
                ours: true,
            })
            .collect();
        let mut chains: Vec<Bar> = self
            .sand
            .iter()
            .filter_map(|r| {
                r.throughput.map(|t| Bar {
                    label: r.name.clone(),
                    value: t.chains_per_s,
                    tail: None,
                    ours: true,
                })
            })
            .collect();
        for a in &self.alternatives {
            if let Some(l) = &a.latency {
                latency.push(Bar {
                    label: a.system.clone(),
                    value: l.median_ms,
                    tail: Some(l.p99_ms),
                    ours: false,
                });
            }
            if let Some(t) = &a.throughput {
                chains.push(Bar {
                    label: a.system.clone(),
                    value: t.chains_per_s,
                    tail: None,
                    ours: false,
                });
            }
        }
        plot::bars(
            &dir.join("chain-latency.svg"),
            &format!("{CHAIN_LEN}-step chain, one client: median (bar) and p99 (tick)"),
            "milliseconds",
            &latency,
            true,
        )?;
        plot::bars(
            &dir.join("chain-throughput.svg"),
            &format!(
                "{CHAIN_LEN}-step chains per second, {} clients",
                self.clients
            ),
            "chains per second",
            &chains,
            true,
        )?;
        let hops: Vec<Bar> = self
            .hops
            .iter()
            .map(|h| Bar {
                label: format!("{}: {}", h.link, h.mode),
                value: h.per_hop.median_ms.max(1e-3),
                tail: Some(h.per_hop.p99_ms),
                ours: h.mode.starts_with("local"),
            })
            .collect();
        plot::bars(
            &dir.join("hop-latency.svg"),
            "Per-hop latency: local bus against the gateway",
            "milliseconds",
            &hops,
            false,
        )?;
        if let Some(c) = &self.cold_start {
            let starts: Vec<Bar> = [
                ("pre-forked child", &c.prefork, true),
                ("fork on demand", &c.on_demand, true),
                ("exec (fresh python)", &c.exec, false),
                ("warm instance", &c.warm, true),
            ]
            .into_iter()
            .map(|(label, m, ours)| Bar {
                label: label.into(),
                value: m.median_us,
                tail: Some(m.p99_us),
                ours,
            })
            .collect();
            plot::bars(
                &dir.join("cold-start.svg"),
                "Cold start per call, numpy grain",
                "microseconds",
                &starts,
                true,
            )?;
        }
        Ok(())
    }
}
