//! A sand cluster of real processes: one gateway and its workers, started from the `sand`
//! binary built beside this harness, and killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::link::DelayRelay;

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Workers to start, ids 1..=workers.
    pub workers: u32,
    /// Every emitted call goes through the gateway (the ablation), not the local bus.
    pub gateway_hops: bool,
    /// Workers reach the gateway through a relay that delays each datagram this long, each
    /// way (an emulated data-center link); directly when None.
    pub link_delay: Option<Duration>,
    /// How long a silent worker has before the gateway declares it dead.
    pub failure_timeout: Duration,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            workers: 1,
            gateway_hops: false,
            link_delay: None,
            failure_timeout: Duration::from_secs(5),
        }
    }
}

/// A running cluster.
pub struct Cluster {
    sand: PathBuf,
    dir: tempfile::TempDir,
    spec: ClusterSpec,
    gateway: Child,
    workers: Vec<(u32, Child)>,
    http: String,
    /// Where workers dial: the gateway's QUIC address, or the relay's.
    quic: String,
    relay: Option<DelayRelay>,
    agent: ureq::Agent,
}

impl Cluster {
    /// Starts a gateway and the spec's workers, and waits until every worker is connected.
    pub fn start(sand: &Path, spec: ClusterSpec) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sand-bench-")
            .tempdir()
            .context("cannot make a scratch directory")?;
        let certs = dir.path().join("certs");
        run(sand, &["cert", "init", "--dir", path_str(&certs)?])?;
        run(
            sand,
            &[
                "cert",
                "issue",
                "gateway",
                "--name",
                "localhost",
                "--dir",
                path_str(&certs)?,
            ],
        )?;
        for id in 1..=spec.workers {
            let id = id.to_string();
            run(
                sand,
                &[
                    "cert",
                    "issue",
                    "worker",
                    "--id",
                    &id,
                    "--dir",
                    path_str(&certs)?,
                ],
            )?;
        }
        let mut gateway = Command::new(sand)
            .args([
                "gateway",
                "--http",
                "127.0.0.1:0",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--failure-timeout-ms")
            .arg(spec.failure_timeout.as_millis().to_string())
            .arg("--data-dir")
            .arg(dir.path().join("gateway"))
            .arg("--certs")
            .arg(&certs)
            .stdout(Stdio::piped())
            .stderr(log_file(dir.path(), "gateway")?)
            .spawn()
            .context("cannot start the gateway")?;
        let (http, quic) = match gateway_addresses(&mut gateway) {
            Ok(addrs) => addrs,
            Err(e) => {
                let _ = gateway.kill();
                let _ = gateway.wait();
                return Err(e);
            }
        };
        let relay = match spec.link_delay {
            Some(delay) => {
                let upstream = quic.parse().context("the gateway's QUIC address")?;
                Some(DelayRelay::start(upstream, delay)?)
            }
            None => None,
        };
        let quic = relay.as_ref().map_or(quic, |r| r.addr.to_string());
        let mut cluster = Self {
            sand: sand.to_owned(),
            dir,
            spec,
            gateway,
            workers: Vec::new(),
            http,
            quic,
            relay,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
        };
        for id in 1..=cluster.spec.workers {
            cluster.start_worker(id)?;
        }
        cluster.wait_for_workers(cluster.spec.workers as usize)?;
        Ok(cluster)
    }

    fn start_worker(&mut self, id: u32) -> Result<()> {
        let child = Command::new(&self.sand)
            .args(["worker", "--gateway", &self.quic, "--id", &id.to_string()])
            .arg("--certs")
            .arg(self.dir.path().join("certs"))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("worker-{id}")))
            .args(self.spec.gateway_hops.then_some("--gateway-hops"))
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), &format!("worker-{id}"))?)
            .spawn()
            .context("cannot start a worker")?;
        self.workers.push((id, child));
        Ok(())
    }

    fn wait_for_workers(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = self.get("/v1/workers")?;
            let connected = body["workers"]
                .as_array()
                .map_or(0, |w| w.iter().filter(|w| w["connected"] == true).count());
            if connected >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{connected} of {n} workers connected within 30 s; logs in {}",
                    self.dir.path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Deploys the app in `dir`.
    pub fn deploy(&self, dir: &Path) -> Result<()> {
        run(
            &self.sand,
            &["deploy", path_str(dir)?, "--gateway", &self.http],
        )
        .map(drop)
    }

    /// The gateway's pid.
    pub fn gateway_pid(&self) -> u32 {
        self.gateway.id()
    }

    /// The pid of worker `id`.
    pub fn worker_pid(&self, id: u32) -> Option<u32> {
        self.workers
            .iter()
            .find(|(w, _)| *w == id)
            .map(|(_, c)| c.id())
    }

    /// Kills worker `id` with SIGKILL and reaps it.
    pub fn kill_worker(&mut self, id: u32) -> Result<()> {
        let i = self
            .workers
            .iter()
            .position(|(w, _)| *w == id)
            .ok_or_else(|| anyhow!("no worker {id}"))?;
        let (_, mut child) = self.workers.remove(i);
        child.kill().context("cannot kill the worker")?;
        child.wait().context("cannot reap the worker")?;
        Ok(())
    }

    /// A GET on the API, as JSON.
    pub fn get(&self, path: &str) -> Result<Value> {
        match self.agent.get(&format!("{}{path}", self.http)).call() {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => {
                bail!("GET {path}: {code} {}", r.into_string().unwrap_or_default())
            }
            Err(e) => Err(anyhow!("GET {path}: {e}")),
        }
    }

    /// A new HTTP client for one benchmark client (its own keep-alive connection).
    pub fn client(&self) -> Client {
        Client {
            base: self.http.clone(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.gateway.kill();
        let _ = self.gateway.wait();
        self.relay.take();
    }
}

/// One client of the HTTP API.
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// Invokes `app` with the number `input` and waits for the answer; checks that it is
    /// `input + adds`.
    pub fn invoke(&self, app: &str, input: u64, adds: u64) -> Result<()> {
        let body = self.post(&format!("/v1/apps/{app}/invoke"), input)?;
        match body["output"].as_u64() {
            Some(out) if out == input + adds => Ok(()),
            _ => bail!("{app}({input}) answered {body}, not {}", input + adds),
        }
    }

    /// Starts `app` with the number `input` without waiting; returns the execution id.
    pub fn start(&self, app: &str, input: u64) -> Result<String> {
        let body = self.post(&format!("/v1/apps/{app}/invoke?async=true"), input)?;
        body["execution"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no execution id in {body}"))
    }

    /// An execution's status document.
    pub fn execution(&self, id: &str) -> Result<Value> {
        let path = format!("{}/v1/executions/{id}", self.base);
        match self.agent.get(&path).call() {
            Ok(r) => Ok(r.into_json()?),
            Err(e) => Err(anyhow!("GET {path}: {e}")),
        }
    }

    fn post(&self, path: &str, input: u64) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        match self.agent.post(&url).send_string(&input.to_string()) {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => {
                bail!(
                    "POST {path}: {code} {}",
                    r.into_string().unwrap_or_default()
                )
            }
            Err(e) => Err(anyhow!("POST {path}: {e}")),
        }
    }
}

/// Reads "sand gateway: HTTP on http://ADDR, workers dial ADDR" from the gateway's stdout.
fn gateway_addresses(gateway: &mut Child) -> Result<(String, String)> {
    let stdout = gateway.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("the gateway said nothing")?;
    let http = line
        .split("HTTP on ")
        .nth(1)
        .and_then(|s| s.split(',').next());
    let quic = line.split("workers dial ").nth(1).map(str::trim);
    match (http, quic) {
        (Some(h), Some(q)) => Ok((h.to_owned(), q.to_owned())),
        _ => bail!("the gateway did not start: {line:?}"),
    }
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    let path = dir.join(format!("{name}.log"));
    std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

/// Runs a short `sand` command that must succeed; returns its stdout.
fn run(sand: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(sand)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", sand.display()))?;
    if !out.status.success() {
        bail!(
            "sand {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
