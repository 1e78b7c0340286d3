//! The same chain on what users would pick instead: Celery, Ray, Restate (a durable peer, in
//! two shapes), and a floor of warm Python processes passing Unix datagrams. Each runs as a
//! script of `benches/alternatives/`, which starts and stops everything it needs on loopback
//! and prints one JSON document.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    runs: usize,
    median: f64,
    p99: f64,
    mean: f64,
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

    /// Installs Celery, Ray, Redis and Restate (idempotent). A part that fails is reported by the
    /// scripts that need it; the harness goes on either way.
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

    /// Runs one system's script: `celery`, `ray` or `unix`, or `restate-SHAPE`, which runs
    /// `restate_chain.py --shape SHAPE`.
    pub fn run(&self, system: &str, runs: usize, clients: usize, seconds: u64) -> Alternative {
        match self.try_run(system, runs, clients, seconds) {
            Ok(a) => a,
            Err(e) => Alternative {
                system: system.to_owned(),
                version: None,
                setup: None,
                latency: None,
                throughput: None,
                unavailable: Some(format!("{e:#}")),
            },
        }
    }

    fn try_run(
        &self,
        system: &str,
        runs: usize,
        clients: usize,
        seconds: u64,
    ) -> Result<Alternative> {
        let python = self.venv.join("bin/python");
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
        Ok(Alternative {
            system: report.system,
            version: report.version,
            setup: report.setup,
            latency: report.latency_ms.map(|l| Stats {
                runs: l.runs,
                median_ms: l.median,
                p99_ms: l.p99,
                mean_ms: l.mean,
            }),
            throughput: report.throughput.map(|t| Throughput {
                clients: t.clients,
                seconds: t.seconds,
                chains: t.chains,
                chains_per_s: t.chains_per_s,
                gateway_cpu_ms_per_chain: None,
            }),
            unavailable: report
                .unavailable
                .or(report.error.map(|e| format!("the run failed: {e}"))),
        })
    }
}
