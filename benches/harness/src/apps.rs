//! The apps the benchmarks deploy, written into a scratch directory.
//!
//! The workload is the same everywhere, in sand, Celery, Ray and the Unix floor: a chain of
//! five trivial steps where step i adds i, so input x answers x + 15.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sand_testkit::apps::CHAIN_GRAINS;

/// Steps in the benchmark chain.
pub const CHAIN_LEN: u64 = 5;

/// What the whole chain adds to its input.
pub const CHAIN_SUM: u64 = CHAIN_LEN * (CHAIN_LEN + 1) / 2;

const MEMORY_GRAINS: &str = r#"
"""Holds a call open so its instance can be weighed."""
import time

try:
    import numpy  # loaded once, in the zygote, when the interpreter has it
except ImportError:
    numpy = None


def hold(event, ctx):
    time.sleep(event)
    return 0 if numpy is None else int(numpy.int64(event) * 0)
"#;

const RECOVERY_GRAINS: &str = r#"
"""A slow chain: each of three steps sleeps, so a worker can die mid-chain."""
import time


def r1(event, ctx):
    time.sleep(0.3)
    return ctx.next("r2", event + 1)


def r2(event, ctx):
    time.sleep(0.3)
    return ctx.next("r3", event + 2)


def r3(event, ctx):
    time.sleep(0.3)
    return event + 3
"#;

const PIPELINE_GRAINS: &str = r#"
"""The chain of examples/pipeline: double -> inc -> square, so input x answers (2x + 1)^2."""


def double(event, ctx):
    return ctx.next("inc", event * 2)


def inc(event, ctx):
    return ctx.next("square", event + 1)


def square(event, ctx):
    return event * event
"#;

const FANOUT_GRAINS: &str = r#"
"""A fan-out with a join: x goes to three branches that square x, x + 1 and x + 2, and the
join adds their squares up."""


def split(event, ctx):
    return ctx.fan_out([("square", event + i) for i in range(3)], join="total")


def square(event, ctx):
    return event * event


def total(squares, ctx):
    return sum(squares)
"#;

/// What the pipeline app answers to `input`.
pub fn pipeline_output(input: u64) -> u64 {
    (2 * input + 1).pow(2)
}

/// What the fanout app answers to `input`: x² + (x + 1)² + (x + 2)².
pub fn fanout_output(input: u64) -> u64 {
    (0..3).map(|i| (input + i).pow(2)).sum()
}

/// Writes the pipeline app (three grains, see `pipeline_output`) under `root`: each instance
/// serves up to `reuse` calls.
pub fn pipeline(root: &Path, python: &Path, reuse: u64) -> Result<PathBuf> {
    let grains: Vec<(String, String)> = ["double", "inc", "square"]
        .iter()
        .map(|g| (g.to_string(), g.to_string()))
        .collect();
    app(root, "pipeline", python, &grains, reuse, PIPELINE_GRAINS)
}

/// Writes the fanout app (a split, three branches and a join, see `fanout_output`) under
/// `root`: each instance serves up to `reuse` calls.
pub fn fanout(root: &Path, python: &Path, reuse: u64) -> Result<PathBuf> {
    let grains: Vec<(String, String)> = ["split", "square", "total"]
        .iter()
        .map(|g| (g.to_string(), g.to_string()))
        .collect();
    app(root, "fanout", python, &grains, reuse, FANOUT_GRAINS)
}

/// The app directories of one harness run.
pub struct Apps {
    /// The 5-grain chain, a fresh instance per call.
    pub chain: PathBuf,
    /// The same chain with instance reuse (warm processes).
    pub chain_reuse: PathBuf,
    /// One grain doing the whole sum, fresh instance per call.
    pub whole: PathBuf,
    /// One grain doing the whole sum, reused.
    pub whole_reuse: PathBuf,
    /// A grain that sleeps `event` seconds, for memory figures.
    pub memory: PathBuf,
    /// A slow 3-step chain (adds 6), for recovery.
    pub recovery: PathBuf,
}

impl Apps {
    /// Writes every app under `root`, with `python` as the grains' interpreter.
    pub fn write(root: &Path, python: &Path) -> Result<Self> {
        let chain_grains: Vec<(String, String)> = (1..=CHAIN_LEN)
            .map(|i| (format!("s{i}"), format!("s{i}")))
            .collect();
        let whole = vec![("whole".to_owned(), "whole".to_owned())];
        let recovery: Vec<(String, String)> = (1..=3)
            .map(|i| (format!("r{i}"), format!("r{i}")))
            .collect();
        let memory = vec![("hold".to_owned(), "hold".to_owned())];
        Ok(Self {
            chain: app(root, "chain", python, &chain_grains, 1, CHAIN_GRAINS)?,
            chain_reuse: app(
                root,
                "chain-reuse",
                python,
                &chain_grains,
                1_000_000,
                CHAIN_GRAINS,
            )?,
            whole: app(root, "whole", python, &whole, 1, CHAIN_GRAINS)?,
            whole_reuse: app(root, "whole-reuse", python, &whole, 1_000_000, CHAIN_GRAINS)?,
            memory: app(root, "memory", python, &memory, 1, MEMORY_GRAINS)?,
            recovery: app(root, "recovery", python, &recovery, 1, RECOVERY_GRAINS)?,
        })
    }
}

/// Writes one Python app: `grains` are (grain name, handler) pairs in `grains.py`; the first is
/// the entry.
fn app(
    root: &Path,
    name: &str,
    python: &Path,
    grains: &[(String, String)],
    reuse: u64,
    source: &str,
) -> Result<PathBuf> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let mut manifest = format!(
        "name = \"{name}\"\nentry = \"{}\"\npython = \"{}\"\n",
        grains[0].0,
        python.display()
    );
    for (grain, handler) in grains {
        write!(
            manifest,
            "\n[grains.{grain}]\nruntime = \"python\"\nmodule = \"grains.py\"\nhandler = \"{handler}\"\nconcurrency = 16\nreuse = {reuse}\n"
        )?;
    }
    std::fs::write(dir.join("sand.toml"), manifest)?;
    std::fs::write(dir.join("grains.py"), source)?;
    Ok(dir)
}
