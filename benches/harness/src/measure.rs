//! Samples and their summaries: latency loops, throughput with concurrent clients, CPU time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::cluster::Cluster;

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
    /// Summarizes samples (at least one).
    pub fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Self::of_ms(&mut ms)
    }

    /// Summarizes samples in milliseconds (at least one); sorts them.
    pub fn of_ms(ms: &mut [f64]) -> Self {
        ms.sort_unstable_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Self {
            runs: ms.len(),
            median_ms: at(0.5),
            p99_ms: at(0.99),
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
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
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the file, 12 and 13 after the command.
    let ticks: u64 = fields
        .get(11..13)
        .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    // Linux reports these in USER_HZ, which is 100 on every architecture it exports.
    Ok(ticks as f64 / 100.0)
}
