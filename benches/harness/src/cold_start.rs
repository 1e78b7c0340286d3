//! Cold start per call, from the worker's own benchmark (`cargo bench -p sand-worker --bench
//! cold_start`), which drives the runtimes directly so that nothing but the start is timed.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Median and p99 of one way to start a call, in microseconds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Mode {
    /// The median.
    pub median_us: f64,
    /// The 99th percentile.
    pub p99_us: f64,
}

/// What the cold-start benchmark measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ColdStart {
    /// Calls per mode (fewer for exec).
    pub calls: usize,
    /// A pre-forked zygote child.
    pub prefork: Mode,
    /// A child forked when the call arrives (SAND's way).
    pub on_demand: Mode,
    /// A fresh interpreter per call (the `exec` runtime).
    pub exec: Mode,
    /// An instance that serves many calls (`reuse`).
    pub warm: Mode,
    /// PSS of the idle zygote, in KiB.
    pub zygote_pss_kib: u64,
    /// PSS of an instance in the middle of a call, in KiB.
    pub instance_pss_kib: u64,
    /// Memory only that instance holds (USS), in KiB.
    pub instance_private_kib: u64,
    /// PSS of a fresh interpreter with the same imports, in KiB.
    pub fresh_pss_kib: u64,
    /// The instances' memory when 1, 4 and 8 of them serve a call at once.
    pub held: Vec<Held>,
}

/// The memory of each of several instances serving a call at the same time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Held {
    /// Instances serving a call.
    pub instances: usize,
    /// Mean PSS of one, in KiB: its own pages and its share of the zygote's.
    pub pss_kib: u64,
    /// Mean memory only one holds (USS), in KiB.
    pub private_kib: u64,
}

/// Runs the benchmark through cargo, from the repository at `repo`.
pub fn run(repo: &Path, python: &Path, calls: usize) -> Result<ColdStart> {
    let json = tempfile::NamedTempFile::new()?;
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(repo)
        .args(["bench", "-p", "sand-worker", "--bench", "cold_start"])
        .env("SAND_BENCH_PYTHON", python)
        .env("SAND_BENCH_CALLS", calls.to_string())
        .env("SAND_BENCH_JSON", json.path())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .context("cannot run cargo bench")?;
    if !status.success() {
        bail!("the cold-start benchmark failed ({status})");
    }
    let text = std::fs::read_to_string(json.path())?;
    serde_json::from_str(&text).with_context(|| format!("odd cold-start results: {text}"))
}
