//! Recovery: chains in flight on a worker that is killed with SIGKILL, re-dispatched by the
//! gateway once it declares the worker dead, and answered.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use sand_api::{Execution, Status};
use sand_testkit::cluster::{Client, Cluster, ClusterSpec, Host};
use sand_testkit::stats::Latencies;

/// What the recovery run saw.
#[derive(Clone, Debug, Serialize)]
pub struct Recovery {
    /// Chains started before the kill.
    pub chains: usize,
    /// Chains with a call recovered from the dead worker.
    pub recovered_chains: usize,
    /// The gateway's failure timeout: a silent worker is declared dead after it.
    pub failure_timeout_ms: u64,
    /// From the SIGKILL to the last recovered chain's answer.
    pub last_answer_ms: f64,
    /// From the SIGKILL to the median recovered chain's answer.
    pub median_answer_ms: f64,
}

/// Starts `chains` slow chains on two workers, kills worker 2 mid-chain, and times the
/// answers, on a cluster like `base`. Every chain must answer correctly.
pub fn run(sand: &Path, base: &ClusterSpec, app: &Path, chains: usize) -> Result<Recovery> {
    let failure_timeout = Duration::from_millis(1000);
    let cluster = Cluster::start(
        sand,
        ClusterSpec {
            workers: 2,
            failure_timeout,
            ..base.clone()
        },
    )?;
    cluster.deploy(app)?;
    let client = cluster.client();
    // Warm both workers' sandboxes, so recovery does not also pay for a first start.
    let warm: Vec<String> = (0..8)
        .map(|i| client.start("recovery", i))
        .collect::<Result<_>>()?;
    for id in &warm {
        wait(&client, id, Duration::from_secs(30))?;
    }
    let started: Vec<(String, u64)> = (0..chains as u64)
        .map(|i| Ok((client.start("recovery", 100 + i)?, 100 + i)))
        .collect::<Result<_>>()?;
    // Into the second of three 300 ms steps.
    std::thread::sleep(Duration::from_millis(450));
    let mut cluster = cluster;
    cluster.kill(Host::Worker(2))?;
    let killed = Instant::now();
    let mut answered: BTreeMap<String, (Duration, Execution)> = BTreeMap::new();
    let deadline = killed + Duration::from_secs(60);
    while answered.len() < started.len() {
        if Instant::now() > deadline {
            bail!(
                "{} of {} chains unanswered 60 s after the kill",
                started.len() - answered.len(),
                started.len()
            );
        }
        for (id, _) in &started {
            if answered.contains_key(id) {
                continue;
            }
            let body = client.execution(id)?;
            if body.status != Status::Running {
                answered.insert(id.clone(), (killed.elapsed(), body));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut answer_times = Latencies::new();
    for (id, input) in &started {
        let (after, body) = &answered[id];
        let output = body.output.as_ref().and_then(serde_json::Value::as_u64);
        if body.status != Status::Succeeded || output != Some(input + 6) {
            bail!("chain {id} on input {input} ended wrong: {body:?}");
        }
        if body.calls.iter().any(|c| c.recovery) {
            answer_times.record(*after);
        }
    }
    if answer_times.is_empty() {
        bail!("worker 2 owned none of the {chains} chains when it was killed: nothing recovered");
    }
    Ok(Recovery {
        chains,
        recovered_chains: answer_times.len() as usize,
        failure_timeout_ms: failure_timeout.as_millis() as u64,
        last_answer_ms: answer_times.max().as_secs_f64() * 1e3,
        median_answer_ms: answer_times.median().as_secs_f64() * 1e3,
    })
}

fn wait(client: &Client, id: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if client.execution(id)?.status != Status::Running {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("execution {id} did not end within {within:?}")
}
