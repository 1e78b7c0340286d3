//! Samples and their summaries: latency loops, throughput with concurrent clients, CPU time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use sand_testkit::cluster::Cluster;
use sand_testkit::stats::Latencies;

/// A summary of latency samples, in milliseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stats {
    /// How many samples.
    pub runs: usize,
    /// The median.
    pub median_ms: f64,
    /// The 99th percentile.
    pub p99_ms: f64,
    /// The mean.
    pub mean_ms: f64,
}

impl Stats {
    /// Summarizes samples.
    pub fn of(samples: &[Duration]) -> Self {
        Self::from(&samples.iter().copied().collect::<Latencies>())
    }
}

impl From<&Latencies> for Stats {
    fn from(l: &Latencies) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Self {
            runs: l.len() as usize,
            median_ms: ms(l.median()),
            p99_ms: ms(l.p99()),
            mean_ms: ms(l.mean()),
        }
    }
}

/// Chains per second with concurrent clients.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Throughput {
    /// Concurrent clients, each running chains back to back.
    pub clients: usize,
    /// How long they ran.
    pub seconds: f64,
    /// Chains answered correctly in that time.
    pub chains: u64,
    /// chains / seconds.
    pub chains_per_s: f64,
    /// The gateway's CPU time (user + system) per chain, where measured.
    pub gateway_cpu_ms_per_chain: Option<f64>,
}

/// Invokes `app` sequentially `warmup + runs` times from one client; returns the samples of
/// the last `runs`. Every answer is checked.
pub fn latency(
    cluster: &Cluster,
    app: &str,
    adds: u64,
    warmup: usize,
    runs: usize,
) -> Result<Vec<Duration>> {
    let client = cluster.client();
    for i in 0..warmup {
        client.invoke(app, i as u64, adds)?;
    }
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let t = Instant::now();
        client.invoke(app, 1000 + i as u64, adds)?;
        samples.push(t.elapsed());
    }
    Ok(samples)
}

/// `clients` clients invoke `app` back to back for `seconds`; every answer is checked and the
/// first wrong one or error fails the run.
pub fn throughput(
    cluster: &Cluster,
    app: &str,
    adds: u64,
    clients: usize,
    seconds: f64,
) -> Result<Throughput> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let cpu_before = cluster
        .gateway_pid()
        .context("the gateway is down")
        .and_then(cpu_seconds);
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let client = cluster.client();
            let app = app.to_owned();
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut input = (c as u64) << 32;
                while !stop.load(Ordering::Relaxed) {
                    let r = client.invoke(&app, input, adds);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r?;
                    done.fetch_add(1, Ordering::Relaxed);
                    input += 1;
                }
                Ok(())
            })
        })
        .collect();
    let deadline = start + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Count what finished within the window; chains in flight at the deadline do not count.
    let chains = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_after = cluster
        .gateway_pid()
        .context("the gateway is down")
        .and_then(cpu_seconds);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow!("a client thread panicked"))??;
    }
    let gateway_cpu_ms_per_chain = match (cpu_before, cpu_after) {
        (Ok(b), Ok(a)) if chains > 0 => Some((a - b) * 1e3 / chains as f64),
        _ => None,
    };
    Ok(Throughput {
        clients,
        seconds: elapsed,
        chains,
        chains_per_s: chains as f64 / elapsed,
        gateway_cpu_ms_per_chain,
    })
}

/// A process's CPU time so far (user + system), in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    sand_testkit::proc::cpu_time(pid)
        .map(|t| t.as_secs_f64())
        .ok_or_else(|| anyhow!("no CPU time for process {pid}"))
}
