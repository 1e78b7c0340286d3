//! The same chain on what users would pick instead: Celery, Ray, Restate (a durable peer, in
//! two shapes), and a floor of warm Python processes passing Unix datagrams. Each runs as a
//! script of `benches/alternatives/`, which starts and stops everything it needs on loopback
//! and prints one JSON document. A system is measured in rounds, each a run of its script:
//! the rounds' latency samples are merged.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::measure::{Stats, Throughput};

/// One alternative's figures, or why it has none.
#[derive(Clone, Debug, Serialize)]
pub struct Alternative {
    /// "celery", "ray", "restate-run", "restate-handlers" or "unix".
    pub system: String,
    /// The version measured.
    pub version: Option<String>,
    /// How it was set up.
    pub setup: Option<String>,
    /// One client, sequential chains.
    pub latency: Option<Stats>,
    /// Concurrent clients.
    pub throughput: Option<Throughput>,
    /// Why it could not run.
    pub unavailable: Option<String>,
}

/// What a script prints.
#[derive(Deserialize)]
struct Report {
    system: String,
    version: Option<String>,
    setup: Option<String>,
    latency_ms: Option<ReportLatency>,
    throughput: Option<ReportThroughput>,
    unavailable: Option<String>,
    /// Set when the run failed (a wrong answer, a timeout, a part that died).
    error: Option<String>,
}

#[derive(Deserialize)]
struct ReportLatency {
    /// Every sequential chain's time, in ms.
    samples: Vec<f64>,
}

#[derive(Deserialize)]
struct ReportThroughput {
    clients: usize,
    seconds: f64,
    chains: u64,
    chains_per_s: f64,
}

/// Where the scripts live, and the venv they run in.
pub struct Scripts {
    dir: PathBuf,
    venv: PathBuf,
}

impl Scripts {
    /// The scripts of the repository at `repo`, with their venv at `venv`.
    pub fn new(repo: &Path, venv: &Path) -> Self {
        Self {
            dir: repo.join("benches/alternatives"),
            venv: venv.to_owned(),
        }
    }

    /// The venv's interpreter, which has numpy.
    pub fn python(&self) -> PathBuf {
        self.venv.join("bin/python")
    }

    /// Installs Celery, Ray, Restate, numpy and Redis (idempotent). A part that fails is
    /// reported by the scripts that need it; the harness goes on either way.
    pub fn setup(&self) -> Result<()> {
        let status = Command::new("bash")
            .arg(self.dir.join("setup.sh"))
            .arg(&self.venv)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .context("cannot run benches/alternatives/setup.sh")?;
        if !status.success() {
            eprintln!("sand-bench: setup.sh could not install everything (see above); going on");
        }
        Ok(())
    }

    /// Runs one system's script once: one round. `system` is `celery`, `ray` or `unix`, or
    /// `restate-SHAPE`, which runs `restate_chain.py --shape SHAPE`. With `seconds` 0 it
    /// measures latency only.
    pub fn run(&self, system: &str, runs: usize, clients: usize, seconds: u64) -> Round {
        self.try_run(system, runs, clients, seconds)
            .unwrap_or_else(|e| Round {
                report: Alternative {
                    system: system.to_owned(),
                    version: None,
                    setup: None,
                    latency: None,
                    throughput: None,
                    unavailable: Some(format!("{e:#}")),
                },
                samples: Vec::new(),
            })
    }

    fn try_run(&self, system: &str, runs: usize, clients: usize, seconds: u64) -> Result<Round> {
        let python = self.python();
        if !python.exists() {
            bail!("no venv at {} (setup.sh failed?)", self.venv.display());
        }
        let (script, shape) = system.split_once('-').unwrap_or((system, ""));
        let script = format!("{script}_chain.py");
        let mut command = Command::new(&python);
        command.arg(self.dir.join(&script));
        if !shape.is_empty() {
            command.args(["--shape", shape]);
        }
        let out = command
            .args(["--runs", &runs.to_string()])
            .args(["--clients", &clients.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {script}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let report: Report = serde_json::from_str(text.trim())
            .with_context(|| format!("{script} printed no result ({}): {text}", out.status))?;
        let samples: Vec<Duration> = report
            .latency_ms
            .map(|l| {
                l.samples
                    .iter()
                    .map(|ms| Duration::from_secs_f64(ms / 1e3))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Round {
            report: Alternative {
                system: report.system,
                version: report.version,
                setup: report.setup,
                latency: (!samples.is_empty()).then(|| Stats::of(&samples)),
                throughput: report
                    .throughput
                    .filter(|t| t.seconds > 0.0)
                    .map(|t| Throughput {
                        clients: t.clients,
                        seconds: t.seconds,
                        chains: t.chains,
                        chains_per_s: t.chains_per_s,
                        gateway_cpu_ms_per_chain: None,
                    }),
                unavailable: report
                    .unavailable
                    .or(report.error.map(|e| format!("the run failed: {e}"))),
            },
            samples,
        })
    }
}

/// One round of one system: its report, and the latency samples behind it.
pub struct Round {
    /// The script's figures for this round.
    pub report: Alternative,
    /// Its sequential chains' times.
    pub samples: Vec<Duration>,
}

/// One system's rounds as one report: the samples of all its rounds summarized together, the
/// throughput of the round that measured it, and the first reason a round had no figures.
pub fn merge(rounds: Vec<Round>) -> Option<Alternative> {
    let samples: Vec<Duration> = rounds.iter().flat_map(|r| r.samples.clone()).collect();
    let mut rounds = rounds.into_iter().map(|r| r.report);
    let mut merged = rounds.next()?;
    for round in rounds {
        merged.version = merged.version.or(round.version);
        merged.setup = merged.setup.or(round.setup);
        merged.throughput = merged.throughput.or(round.throughput);
        merged.unavailable = merged.unavailable.or(round.unavailable);
    }
    merged.latency = (!samples.is_empty()).then(|| Stats::of(&samples));
    Some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(samples_ms: &[u64], chains_per_s: Option<f64>, unavailable: Option<&str>) -> Round {
        let samples: Vec<Duration> = samples_ms
            .iter()
            .map(|&ms| Duration::from_millis(ms))
            .collect();
        Round {
            report: Alternative {
                system: "ray".into(),
                version: Some("2.60.0".into()),
                setup: None,
                latency: (!samples.is_empty()).then(|| Stats::of(&samples)),
                throughput: chains_per_s.map(|chains_per_s| Throughput {
                    clients: 8,
                    seconds: 10.0,
                    chains: (chains_per_s * 10.0) as u64,
                    chains_per_s,
                    gateway_cpu_ms_per_chain: None,
                }),
                unavailable: unavailable.map(str::to_owned),
            },
            samples,
        }
    }

    #[test]
    fn rounds_merge_their_samples_before_the_percentiles() {
        let merged = merge(vec![
            round(&[1, 1, 1], None, None),
            round(&[9, 9, 9, 9], Some(237.0), None),
        ])
        .expect("a report");
        let latency = merged.latency.expect("latency");
        assert_eq!(latency.runs, 7);
        // To the histogram's 3 significant digits.
        assert!(
            (latency.median_ms - 9.0).abs() < 0.01,
            "the median of all 7 samples, not of the rounds': {latency:?}"
        );
        assert_eq!(merged.throughput.map(|t| t.chains_per_s), Some(237.0));
        assert_eq!(merged.version.as_deref(), Some("2.60.0"));
        assert_eq!(merged.unavailable, None);
    }

    #[test]
    fn a_round_without_figures_says_why() {
        let merged = merge(vec![
            round(&[1, 2], None, None),
            round(&[], None, Some("ray.init failed")),
        ])
        .expect("a report");
        assert_eq!(merged.unavailable.as_deref(), Some("ray.init failed"));
        assert!(merge(Vec::new()).is_none());
    }

    #[test]
    fn the_samples_of_a_report_are_read_in_ms() {
        let report: Report = serde_json::from_str(
            r#"{"system": "unix", "latency_ms": {"runs": 2, "median": 0.15, "samples": [0.1, 0.2]},
                "throughput": {"clients": 8, "seconds": 0, "chains": 0, "chains_per_s": 0.0}}"#,
        )
        .expect("parsed");
        let samples = report.latency_ms.expect("latency").samples;
        assert_eq!(samples, [0.1, 0.2]);
        let missing: Result<Report, _> =
            serde_json::from_str(r#"{"system": "unix", "latency_ms": {"median": 0.15}}"#);
        assert!(
            missing.is_err(),
            "a latency without its samples breaks the contract"
        );
    }
}
