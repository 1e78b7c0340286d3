//! A sand cluster of real processes: one gateway and its workers, started from a `sand`
//! binary with certificates, an optional API token and a data directory each in a scratch
//! directory, and killed when dropped (also when a test fails).
//!
//! Each process is a [`Host`] with its own data directory. A host can be SIGKILLed and started
//! again on the same data directory (and, for the gateway, the same ports): what a crash and a
//! restart on the same host look like. It can be paused (SIGSTOP) and resumed, as a host that
//! stalls does. Each worker can reach the gateway through its own [`Relay`], whose weather is
//! the network's faults. And each host's data directory can be its own lazy filesystem
//! ([`LazyFs`]), so that its power can be cut: the host and everything it started die at once,
//! and every write it had not synced is lost.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use sand_api::{Accepted, Answer, Execution, Workers};
use sand_lazyfs::{Cut, LazyFs};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::link::Relay;
use crate::proc;
use crate::process::{first_line, pid as as_pid, run};

/// How long a gateway may take to start (recover its store, bind its ports) and say where it
/// listens.
const GATEWAY_START_MAX: Duration = Duration::from_secs(30);

/// One process of the cluster, and the machine it stands for.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Host {
    /// The gateway.
    Gateway,
    /// Worker `id`.
    Worker(u32),
}

impl Host {
    /// The name of its data directory and log in the cluster's directory.
    fn file_name(self) -> String {
        match self {
            Self::Gateway => "gateway".to_owned(),
            Self::Worker(id) => format!("worker-{id}"),
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gateway => f.write_str("gateway"),
            Self::Worker(id) => write!(f, "worker {id}"),
        }
    }
}

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Workers to start, ids 1..=workers.
    pub workers: u32,
    /// Every emitted call goes through the gateway (the ablation), not the local bus.
    pub gateway_hops: bool,
    /// Each worker reaches the gateway through its own relay, which delays each datagram this
    /// long each way (an emulated data-center link) and can be told to drop, reorder or cut
    /// them; directly when None.
    pub relay: Option<Duration>,
    /// Seeds the relays' random draws.
    pub seed: u64,
    /// How long a silent worker has before the gateway declares it dead.
    pub failure_timeout: Duration,
    /// How the workers isolate grains.
    pub isolation: Isolation,
    /// Make this process a child subreaper, so that what a killed worker leaves behind (its
    /// grains' processes, with `Isolation::None`) becomes a child of this process: reaped as
    /// it exits, and killed with the cluster.
    pub adopt_orphans: bool,
    /// Each host's data directory is its own lazy filesystem, so that its power can be cut
    /// (needs root and `/dev/fuse`).
    pub power: bool,
    /// The interpreter the apps name, which the gateway and the workers allow (`--python`),
    /// with its installation prefix mounted into sandboxes when it lives outside the system
    /// directories; sand's default (/usr/bin/python3) when None.
    pub python: Option<PathBuf>,
    /// The token the gateway wants on its API (in a file only its owner reads); none when
    /// None.
    pub token: Option<String>,
    /// How long a worker keeps an idle app's sandbox (`--idle-seconds`); the worker's default
    /// when None.
    pub idle_seconds: Option<u64>,
    /// The OTLP collector the gateway sends spans to (`--otlp-endpoint`), exporting every
    /// 100 ms; none when None.
    pub otlp_endpoint: Option<String>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            workers: 1,
            gateway_hops: false,
            relay: None,
            seed: 0,
            failure_timeout: Duration::from_secs(5),
            isolation: Isolation::Sandbox,
            adopt_orphans: false,
            power: false,
            python: None,
            token: None,
            idle_seconds: None,
            otlp_endpoint: None,
        }
    }
}

/// How a worker isolates grains (`sand worker --isolation`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Isolation {
    /// One sandbox per app: namespaces and a cgroup (needs root).
    Sandbox,
    /// Plain processes on the host.
    None,
}

/// A running cluster.
pub struct Cluster {
    sand: PathBuf,
    dir: tempfile::TempDir,
    spec: ClusterSpec,
    /// None while it is down.
    gateway: Option<Child>,
    /// How many times the gateway has started: the life it is in.
    gateway_lives: Arc<AtomicU32>,
    workers: Vec<(u32, Child)>,
    /// The API's base URL, `http://ADDR`.
    http: String,
    /// The gateway's own QUIC address; a restarted gateway listens on it again.
    gateway_quic: String,
    /// Each worker's relay, if workers dial through relays.
    relays: BTreeMap<u32, Relay>,
    /// Each host's data directory, if they are lazy filesystems. Unmounted when the cluster
    /// is dropped, after every process is dead.
    disks: BTreeMap<Host, LazyFs>,
    /// The API, as the cluster itself calls it.
    api: Client,
}

impl Cluster {
    /// Starts a gateway and the spec's workers, and waits until every worker is connected.
    pub fn start(sand: &Path, spec: ClusterSpec) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sand-cluster-")
            .tempdir()
            .context("cannot make a scratch directory")?;
        certificates(sand, dir.path(), spec.workers)?;
        if let Some(token) = &spec.token {
            private_file(&dir.path().join("token"), token)?;
        }
        if spec.adopt_orphans {
            nix::sys::prctl::set_child_subreaper(true)
                .context("cannot make this process a child subreaper")?;
        }
        let mut disks = BTreeMap::new();
        if spec.power {
            let hosts = std::iter::once(Host::Gateway).chain((1..=spec.workers).map(Host::Worker));
            for host in hosts {
                let path = dir.path().join(host.file_name());
                std::fs::create_dir(&path)
                    .with_context(|| format!("cannot make {}", path.display()))?;
                let disk = LazyFs::mount(&path).with_context(|| {
                    format!("cannot mount a lazy filesystem on {}", path.display())
                })?;
                disks.insert(host, disk);
            }
        }
        let (gateway, http, gateway_quic) =
            start_gateway(sand, dir.path(), &spec, "127.0.0.1:0", "127.0.0.1:0")?;
        // From here on, dropping the cluster kills what it started.
        let api = Client::new(&http, spec.token.as_deref());
        let mut cluster = Self {
            sand: sand.to_owned(),
            dir,
            spec,
            gateway: Some(gateway),
            gateway_lives: Arc::new(AtomicU32::new(1)),
            workers: Vec::new(),
            http,
            gateway_quic,
            relays: BTreeMap::new(),
            disks,
            api,
        };
        if let Some(delay) = cluster.spec.relay {
            let upstream = cluster
                .gateway_quic
                .parse()
                .context("the gateway's QUIC address")?;
            for id in 1..=cluster.spec.workers {
                let seed = cluster.spec.seed.wrapping_add(u64::from(id) << 32);
                cluster
                    .relays
                    .insert(id, Relay::start(upstream, delay, seed)?);
            }
        }
        for id in 1..=cluster.spec.workers {
            cluster.start_worker(id)?;
        }
        cluster.wait_for_workers(cluster.spec.workers as usize)?;
        Ok(cluster)
    }

    /// Starts worker `id`: at first, or again after `kill`, with the same id, certificate and
    /// data directory (so it comes back as a new incarnation).
    fn start_worker(&mut self, id: u32) -> Result<()> {
        if self.worker_pid(id).is_some() {
            bail!("worker {id} is already running");
        }
        let isolation: &[&str] = match self.spec.isolation {
            Isolation::Sandbox => &[],
            Isolation::None => &["--isolation", "none"],
        };
        let dial = self
            .relays
            .get(&id)
            .map_or_else(|| self.gateway_quic.clone(), |r| r.addr.to_string());
        let child = Command::new(&self.sand)
            .args(["worker", "--gateway", &dial, "--id", &id.to_string()])
            .arg("--certs")
            .arg(self.dir.path().join("certs"))
            .arg("--data-dir")
            .arg(self.worker_dir(id))
            .args(self.spec.gateway_hops.then_some("--gateway-hops"))
            .args(isolation)
            .args(python_args(self.spec.python.as_deref()))
            .args(
                self.spec
                    .idle_seconds
                    .map(|s| ["--idle-seconds".to_owned(), s.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), &Host::Worker(id).file_name())?)
            .spawn()
            .context("cannot start a worker")?;
        self.workers.push((id, child));
        Ok(())
    }

    fn wait_for_workers(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body: Workers = self.get("/v1/workers")?;
            let connected = body.workers.iter().filter(|w| w.connected).count();
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

    /// Deploys the app in `dir` (with the cluster's token, if it has one).
    pub fn deploy(&self, dir: &Path) -> Result<()> {
        let token = self.dir.path().join("token");
        let mut args = vec!["deploy", path_str(dir)?, "--gateway", &self.http];
        if self.spec.token.is_some() {
            args.extend(["--token-file", path_str(&token)?]);
        }
        run(&self.sand, &args).map(drop)
    }

    /// The gateway's pid, unless it is down.
    pub fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().map(Child::id)
    }

    /// The gateway's life (1 in its first start), counted up each time it starts again: read
    /// it before and after an exchange with the API to know which life answered.
    pub fn gateway_lives(&self) -> Arc<AtomicU32> {
        self.gateway_lives.clone()
    }

    /// How many workers the cluster has: ids 1..=workers.
    pub fn workers(&self) -> u32 {
        self.spec.workers
    }

    /// Worker `id`'s relay, if workers dial through relays.
    pub fn relay(&self, id: u32) -> Option<&Relay> {
        self.relays.get(&id)
    }

    /// The API's base URL, `http://ADDR`; it stays the same across gateway restarts.
    pub fn http(&self) -> &str {
        &self.http
    }

    /// The scratch directory: `certs/`, `token`, and each host's data directory (`gateway/`,
    /// `worker-ID/`) and log (`gateway.log`, `worker-ID.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Leaves the scratch directory in place when the cluster is dropped; returns its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_owned()
    }

    fn worker_dir(&self, id: u32) -> PathBuf {
        self.dir.path().join(Host::Worker(id).file_name())
    }

    /// What each host's lazy filesystem has seen since it was mounted.
    pub fn disk_stats(&self) -> Vec<(Host, sand_lazyfs::Stats)> {
        self.disks.iter().map(|(h, d)| (*h, d.stats())).collect()
    }

    /// Copies each lazy filesystem's files (what its host sees now) into `HOST.disk` beside
    /// it, so that they outlive the mount; for a directory kept as evidence.
    pub fn save_disks(&self) -> Result<()> {
        for (host, disk) in &self.disks {
            let to = self.dir.path().join(format!("{}.disk", host.file_name()));
            copy_tree(disk.mountpoint(), &to)
                .with_context(|| format!("cannot copy the {host}'s files to {}", to.display()))?;
        }
        Ok(())
    }

    /// The incarnation worker `id` last saved in its data directory: how many times it has
    /// started, or been fenced by the gateway and come back. None before its first start.
    pub fn incarnation(&self, id: u32) -> Option<u64> {
        std::fs::read_to_string(self.worker_dir(id).join("incarnation"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// SIGKILLs a host and reaps it.
    pub fn kill(&mut self, host: Host) -> Result<()> {
        let mut child = self.take(host)?;
        child
            .kill()
            .with_context(|| format!("cannot kill the {host}"))?;
        child
            .wait()
            .with_context(|| format!("cannot reap the {host}"))?;
        Ok(())
    }

    /// Cuts the power of a host: its process and every process it started are stopped (so
    /// that none forks or writes any more) and SIGKILLed, and its data directory forgets every
    /// write not yet synced. Start it again with `restart`.
    pub fn cut_power(&mut self, host: Host) -> Result<Cut> {
        if !self.disks.contains_key(&host) {
            bail!("the {host}'s data directory is not a lazy filesystem: start the cluster with `power`");
        }
        let pid = self.pid(host)?;
        let tree = freeze(pid)?;
        self.kill(host)?;
        for p in tree {
            // One that died meanwhile (its pid namespace's init went first) needs no signal.
            let _ = nix::sys::signal::kill(as_pid(p), Signal::SIGKILL);
        }
        Ok(self.disks[&host].cut_power())
    }

    /// Starts a host that is down again, on its data directory (and for the gateway, its
    /// ports).
    pub fn restart(&mut self, host: Host) -> Result<()> {
        match host {
            Host::Gateway => self.start_gateway_again(),
            Host::Worker(id) => self.start_worker(id),
        }
    }

    /// Sends `signal` to a running host and waits, `within` at most, for it to end; returns how
    /// it ended. Start it again with `restart`.
    pub fn stop(&mut self, host: Host, signal: Signal, within: Duration) -> Result<ExitStatus> {
        let mut child = self.take(host)?;
        let stopped = crate::process::stop(&mut child, signal, within);
        if stopped.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        stopped
    }

    /// Stops a running host with SIGSTOP: it keeps its sockets and state, and does nothing.
    pub fn pause(&self, host: Host) -> Result<()> {
        self.signal(host, Signal::SIGSTOP)
    }

    /// Lets a paused host go on (SIGCONT).
    pub fn resume(&self, host: Host) -> Result<()> {
        self.signal(host, Signal::SIGCONT)
    }

    /// The process of a running host, which the cluster then no longer holds.
    fn take(&mut self, host: Host) -> Result<Child> {
        match host {
            Host::Gateway => self.gateway.take(),
            Host::Worker(id) => self
                .workers
                .iter()
                .position(|(w, _)| *w == id)
                .map(|i| self.workers.remove(i).1),
        }
        .ok_or_else(|| anyhow!("the {host} is not running"))
    }

    fn signal(&self, host: Host, signal: Signal) -> Result<()> {
        nix::sys::signal::kill(as_pid(self.pid(host)?), signal)
            .with_context(|| format!("cannot send {signal} to the {host}"))
    }

    fn pid(&self, host: Host) -> Result<u32> {
        match host {
            Host::Gateway => self.gateway_pid(),
            Host::Worker(id) => self.worker_pid(id),
        }
        .ok_or_else(|| anyhow!("the {host} is not running"))
    }

    /// Starts the gateway again on the same data directory and ports. Its HTTP port may be
    /// briefly unavailable to a new listener, so the start is tried again for a few seconds.
    fn start_gateway_again(&mut self) -> Result<()> {
        if self.gateway.is_some() {
            bail!("the gateway is already running");
        }
        let http_addr = self.http.trim_start_matches("http://").to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match start_gateway(
                &self.sand,
                self.dir.path(),
                &self.spec,
                &http_addr,
                &self.gateway_quic,
            ) {
                Ok((gateway, http, quic)) => {
                    self.gateway = Some(gateway);
                    self.gateway_lives.fetch_add(1, Ordering::SeqCst);
                    if http != self.http || quic != self.gateway_quic {
                        bail!(
                            "the restarted gateway is on {http} and {quic}, not {} and {}",
                            self.http,
                            self.gateway_quic
                        );
                    }
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "the gateway did not start again within 10 s; its log is in {}",
                        self.dir.path().display()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The hosts whose process ended without being killed by the cluster, with how it ended.
    /// A worker that ended is forgotten, so that it can be started again; a gateway that ended
    /// stays as it is.
    pub fn ended_by_themselves(&mut self) -> Vec<(Host, std::process::ExitStatus)> {
        let mut ended = Vec::new();
        if let Some(Ok(Some(status))) = self.gateway.as_mut().map(Child::try_wait) {
            ended.push((Host::Gateway, status));
        }
        self.workers
            .retain_mut(|(id, child)| match child.try_wait() {
                Ok(Some(status)) => {
                    ended.push((Host::Worker(*id), status));
                    false
                }
                _ => true,
            });
        ended
    }

    /// Reaps the adopted orphans that have exited (see `ClusterSpec::adopt_orphans`).
    pub fn reap_orphans(&self) {
        use nix::sys::wait::{waitpid, WaitPidFlag};
        for pid in self.orphans() {
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
    }

    /// Children of this process that the cluster did not start: adopted orphans.
    fn orphans(&self) -> Vec<Pid> {
        if !self.spec.adopt_orphans {
            return Vec::new();
        }
        let ours: Vec<u32> = self
            .gateway_pid()
            .into_iter()
            .chain(self.workers.iter().map(|(_, c)| c.id()))
            .collect();
        proc::children_of_this_process()
            .into_iter()
            .filter(|pid| !ours.contains(pid))
            .map(as_pid)
            .collect()
    }

    /// The pid of worker `id`.
    pub fn worker_pid(&self, id: u32) -> Option<u32> {
        self.workers
            .iter()
            .find(|(w, _)| *w == id)
            .map(|(_, c)| c.id())
    }

    /// A GET on the API, read as the API's `T` (`serde_json::Value` for any JSON).
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.api.get(path)
    }

    /// A new HTTP client for one benchmark client (its own keep-alive connection), with the
    /// cluster's token if it has one.
    pub fn client(&self) -> Client {
        Client::new(&self.http, self.spec.token.as_deref())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(gateway) = &mut self.gateway {
            let _ = gateway.kill();
            let _ = gateway.wait();
        }
        self.relays.clear();
        // Killing an orphan orphans its own children in turn: a few rounds take them all.
        for _ in 0..10 {
            let orphans = self.orphans();
            if orphans.is_empty() {
                break;
            }
            for &pid in &orphans {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            for pid in orphans {
                let _ = nix::sys::wait::waitpid(pid, None);
            }
        }
        // Every process that wrote to them is dead.
        self.disks.clear();
    }
}

/// Stops `pid` and every process descended from it with SIGSTOP, again until no new one
/// appears (a process forking as it was stopped); returns the descendants.
fn freeze(pid: u32) -> Result<std::collections::BTreeSet<u32>> {
    nix::sys::signal::kill(as_pid(pid), Signal::SIGSTOP)
        .with_context(|| format!("cannot stop process {pid}"))?;
    let mut stopped = std::collections::BTreeSet::new();
    loop {
        let tree = proc::descendants(pid);
        if tree.is_subset(&stopped) {
            return Ok(stopped);
        }
        for &p in tree.difference(&stopped) {
            // One that has exited meanwhile needs no stopping.
            let _ = nix::sys::signal::kill(as_pid(p), Signal::SIGSTOP);
        }
        stopped.extend(tree);
    }
}

/// Copies the directories and regular files under `from` to `to`.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// One client of the HTTP API.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    fn new(base: &str, token: Option<&str>) -> Self {
        Self {
            base: base.to_owned(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
            token: token.map(str::to_owned),
        }
    }

    /// A GET on the API, read as the API's `T` (`serde_json::Value` for any JSON).
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        match self.request("GET", path).call() {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => {
                bail!("GET {path}: {code} {}", r.into_string().unwrap_or_default())
            }
            Err(e) => Err(anyhow!("GET {path}: {e}")),
        }
    }

    /// Invokes `app` with the number `input` and waits for the answer; checks that it is
    /// `input + adds`.
    pub fn invoke(&self, app: &str, input: u64, adds: u64) -> Result<()> {
        let body: Answer = self.post(&format!("/v1/apps/{app}/invoke"), input)?;
        match body.output.as_ref().and_then(Value::as_u64) {
            Some(out) if out == input + adds => Ok(()),
            _ => bail!("{app}({input}) answered {body:?}, not {}", input + adds),
        }
    }

    /// Starts `app` with the number `input` without waiting; returns the execution id.
    pub fn start(&self, app: &str, input: u64) -> Result<String> {
        let body: Accepted = self.post(&format!("/v1/apps/{app}/invoke?async=true"), input)?;
        Ok(body.execution)
    }

    /// An execution's status document.
    pub fn execution(&self, id: &str) -> Result<Execution> {
        self.get(&format!("/v1/executions/{id}"))
    }

    /// A request to `path` on the API, with the token if there is one.
    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    fn post<T: DeserializeOwned>(&self, path: &str, input: u64) -> Result<T> {
        let req = self
            .request("POST", path)
            .set("Content-Type", "application/json");
        match req.send_string(&input.to_string()) {
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

/// The policy flag that allows `python`: `--python PATH`, with `=PREFIX` (the directory above
/// its `bin/`) for one outside the system directories. A venv's python is a symlink to the
/// system's, so the prefix is the named path's when that lies outside the system directories
/// (the venv, with its site-packages), else the real interpreter's.
fn python_args(python: Option<&Path>) -> Vec<String> {
    let Some(python) = python else {
        return Vec::new();
    };
    let system = ["/usr", "/bin", "/lib", "/lib64", "/sbin"];
    let resolved = std::fs::canonicalize(python).unwrap_or_else(|_| python.to_owned());
    let prefix = [python, resolved.as_path()]
        .into_iter()
        .find(|p| !system.iter().any(|s| p.starts_with(s)))
        .and_then(|p| p.parent()?.parent());
    let flag = match prefix {
        Some(prefix) => format!("{}={}", python.display(), prefix.display()),
        None => python.display().to_string(),
    };
    vec!["--python".into(), flag]
}

/// Starts a gateway on `http` and `listen` (port 0: any), with its store in `dir/gateway`;
/// returns it with its API's base URL and its QUIC address once it is serving.
fn start_gateway(
    sand: &Path,
    dir: &Path,
    spec: &ClusterSpec,
    http: &str,
    listen: &str,
) -> Result<(Child, String, String)> {
    let mut command = Command::new(sand);
    command
        .args(["gateway", "--http", http, "--listen", listen])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    if let Some(endpoint) = &spec.otlp_endpoint {
        command
            .args(["--otlp-endpoint", endpoint])
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    }
    let mut gateway = command
        .arg("--failure-timeout-ms")
        .arg(spec.failure_timeout.as_millis().to_string())
        .arg("--data-dir")
        .arg(dir.join("gateway"))
        .arg("--certs")
        .arg(dir.join("certs"))
        .args(python_args(spec.python.as_deref()))
        .args(
            spec.token
                .as_ref()
                .map(|_| ["--token-file".into(), dir.join("token").into_os_string()])
                .into_iter()
                .flatten(),
        )
        .stdout(Stdio::piped())
        .stderr(log_file(dir, "gateway")?)
        .spawn()
        .context("cannot start the gateway")?;
    match gateway_addresses(&mut gateway) {
        Ok((http, quic)) => Ok((gateway, http, quic)),
        Err(e) => {
            let _ = gateway.kill();
            let _ = gateway.wait();
            Err(e)
        }
    }
}

/// Reads "sand gateway: HTTP on http://ADDR, workers dial ADDR" from the gateway's stdout,
/// waiting [`GATEWAY_START_MAX`] at most.
fn gateway_addresses(gateway: &mut Child) -> Result<(String, String)> {
    let stdout = gateway.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let line = first_line(stdout, GATEWAY_START_MAX).context("the gateway did not start")?;
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

/// The log of process `name` in `dir`, appended to: a restarted process's log follows its
/// previous life's, after a line that marks the restart.
fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    let path = dir.join(format!("{name}.log"));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) > 0 {
        writeln!(file, "----- {name} started again -----")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(file)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

/// Makes a CA, a gateway certificate for `localhost` and certificates for workers
/// 1..=`workers` in `dir/certs`; returns that directory.
pub fn certificates(sand: &Path, dir: &Path, workers: u32) -> Result<PathBuf> {
    let certs = dir.join("certs");
    let at = path_str(&certs)?;
    run(sand, &["cert", "init", "--dir", at])?;
    run(
        sand,
        &[
            "cert",
            "issue",
            "gateway",
            "--name",
            "localhost",
            "--dir",
            at,
        ],
    )?;
    for id in 1..=workers {
        let id = id.to_string();
        run(sand, &["cert", "issue", "worker", "--id", &id, "--dir", at])?;
    }
    Ok(certs)
}

/// Writes `text` to a new file at `path` that only its owner may read.
fn private_file(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot make {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_venv_is_mounted_for_its_python_and_the_systems_needs_no_mount() {
        let venv = tempfile::tempdir().expect("a temp dir");
        std::fs::create_dir(venv.path().join("bin")).expect("bin/");
        let python = venv.path().join("bin/python");
        std::os::unix::fs::symlink("/usr/bin/python3", &python).expect("a venv's python");
        let flag = format!("{}={}", python.display(), venv.path().display());
        assert_eq!(python_args(Some(&python)), ["--python", flag.as_str()]);
        assert_eq!(
            python_args(Some(Path::new("/usr/bin/python3"))),
            ["--python", "/usr/bin/python3"]
        );
        assert!(python_args(None).is_empty());
    }

    #[test]
    fn an_interpreter_installed_elsewhere_is_mounted_above_its_bin() {
        let prefix = tempfile::tempdir().expect("a temp dir");
        std::fs::create_dir(prefix.path().join("bin")).expect("bin/");
        let real = prefix.path().join("bin/python3.11");
        std::fs::write(&real, "").expect("an interpreter");
        let python = prefix.path().join("bin/python3");
        std::os::unix::fs::symlink(&real, &python).expect("its usual name");
        let flag = format!("{}={}", python.display(), prefix.path().display());
        assert_eq!(python_args(Some(&python)), ["--python", flag.as_str()]);
    }
}
