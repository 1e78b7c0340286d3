//! The worker's driver: one task that owns the [`LocalBus`] and feeds it what happens (gateway
//! messages, finished calls, timers), then carries out what it asks: send, run, abort.
//!
//! Calls run in tasks of their own, each on its app's [`AppHost`]; their reports come back to
//! the driver over a channel. An app's bundle is fetched from the gateway at its first call
//! here; calls that arrive meanwhile wait for it. Finished runs are also traced, in batches, to
//! the gateway (best effort).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sand_protocol::ids::{AppName, Incarnation};
use sand_protocol::local_bus::{GrainResult, LbConfig, LbEvent, LbOutput, LocalBus, RunKey};
use sand_protocol::time::Time;
use sand_protocol::wire::{
    AppBundle, CallSpec, ErrorKind, GrainError, RunTrace, ToGateway, ToWorker,
};
use sand_transport_quic::seam::{WorkerEvent, WorkerLink, WorkerSender};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::host::{AppHost, HostContext};
use crate::runtime::CallReport;

/// How to run a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The local bus's settings (the worker id among them).
    pub lb: LbConfig,
    /// Where bundles are unpacked and the incarnation is kept.
    pub data_dir: PathBuf,
    /// What app hosts share: isolation and the runtime's place.
    pub host: HostContext,
    /// An app host with no call for this long is torn down.
    pub idle_teardown: Duration,
    /// How often finished runs are traced to the gateway.
    pub trace_interval: Duration,
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Its data directory could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Where an app stands on this worker.
enum Slot {
    /// Its bundle was asked for; these calls wait for it.
    Fetching(Vec<CallSpec>),
    /// Its bundle is here and its host is starting; these calls wait for it.
    Starting(Vec<CallSpec>),
    /// Ready to run calls.
    Ready(Arc<AppHost>),
}

/// What the driver's own tasks tell it.
enum Note {
    /// A run ended.
    Finished {
        spec: CallSpec,
        report: Box<CallReport>,
    },
    /// An app host started, or could not.
    Started {
        app: AppName,
        host: Result<Arc<AppHost>, String>,
    },
}

/// An attempt the bus asked to run.
struct Run {
    /// Its task, once its app is ready.
    task: Option<JoinHandle<()>>,
    /// True if the gateway dispatched it; false if the local bus started it.
    dispatched: bool,
}

/// The driver's state.
struct Driver {
    config: WorkerConfig,
    lb: LocalBus,
    sender: WorkerSender,
    started: Instant,
    apps: HashMap<AppName, Slot>,
    /// The attempt of the `Dispatch` being handled, if one is.
    dispatching: Option<RunKey>,
    /// Every attempt the bus asked to run and has not heard the end of.
    runs: HashMap<RunKey, Run>,
    notes: mpsc::UnboundedSender<Note>,
    traces: Vec<RunTrace>,
    connected: bool,
}

/// Runs a worker on `link` until the link's events end.
pub async fn run(config: WorkerConfig, link: WorkerLink) -> Result<(), WorkerError> {
    let mut config = config;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| WorkerError::Io {
        what: "cannot make the data directory",
        path: config.data_dir.clone(),
        source,
    })?;
    // Sandboxes bind-mount bundles from here: the path must not depend on the cwd.
    config.data_dir = std::path::absolute(&config.data_dir).map_err(|source| WorkerError::Io {
        what: "cannot resolve the data directory",
        path: config.data_dir.clone(),
        source,
    })?;
    let incarnation = next_incarnation(&config.data_dir)?;
    tracing::info!(worker = %config.lb.worker, incarnation = incarnation.0, "worker starting");
    let (notes, mut noted) = mpsc::unbounded_channel();
    let mut driver = Driver {
        lb: LocalBus::new(config.lb, incarnation),
        config,
        sender: link.sender,
        started: Instant::now(),
        apps: HashMap::new(),
        dispatching: None,
        runs: HashMap::new(),
        notes,
        traces: Vec::new(),
        connected: false,
    };
    let mut events = link.events;
    let mut trace_tick = tokio::time::interval(driver.config.trace_interval);
    let mut idle_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let deadline = driver
            .lb
            .poll_timeout()
            .map(|t| driver.started + Duration::from_millis(t.as_millis()));
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => driver.event(ev),
                None => break,
            },
            Some(note) = noted.recv() => driver.note(note),
            () = sleep => {
                let now = driver.now();
                driver.lb.handle_timeouts(now);
            }
            _ = trace_tick.tick() => driver.flush_traces(),
            _ = idle_tick.tick() => driver.retire_idle(),
        }
        driver.drain()?;
    }
    driver.shutdown().await;
    Ok(())
}

impl Driver {
    fn now(&self) -> Time {
        Time::from_millis(self.started.elapsed().as_millis() as u64)
    }

    fn event(&mut self, ev: WorkerEvent) {
        let now = self.now();
        match ev {
            WorkerEvent::Connected => {
                self.connected = true;
                self.lb.handle(now, LbEvent::Connected);
                // Bundle requests die with their connection: ask again.
                let fetching: Vec<AppName> = self
                    .apps
                    .iter()
                    .filter(|(_, s)| matches!(s, Slot::Fetching(_)))
                    .map(|(a, _)| a.clone())
                    .collect();
                for app in fetching {
                    self.send(ToGateway::Fetch { app });
                }
            }
            WorkerEvent::Disconnected => {
                self.connected = false;
                self.lb.handle(now, LbEvent::Disconnected);
            }
            WorkerEvent::Message(ToWorker::Bundle { app, bundle }) => self.bundle(app, bundle),
            WorkerEvent::Message(ToWorker::AppChanged { app }) => {
                if let Some(Slot::Ready(host)) = self.apps.remove(&app) {
                    tracing::info!(%app, "app changed; retiring its host");
                    retire(host);
                }
            }
            WorkerEvent::Message(msg) => {
                if let ToWorker::Dispatch { call, .. } = &msg {
                    self.dispatching = Some((call.exec, call.call, call.attempt));
                }
                // Its `Run`, if the bus starts it, comes out in the drain that follows.
                self.lb.handle(now, LbEvent::Message(msg));
            }
        }
    }

    fn send(&self, msg: ToGateway) {
        if let Err(e) = self.sender.send(msg) {
            tracing::debug!("not sent to the gateway: {e}");
        }
    }

    fn drain(&mut self) -> Result<(), WorkerError> {
        while let Some(out) = self.lb.poll_output() {
            match out {
                LbOutput::Send(msg) => self.send(msg),
                LbOutput::Run(spec) => {
                    let key = (spec.exec, spec.call, spec.attempt);
                    let dispatched = self.dispatching == Some(key);
                    self.runs.insert(
                        key,
                        Run {
                            task: None,
                            dispatched,
                        },
                    );
                    self.start_run(spec);
                }
                LbOutput::Abort(key) => {
                    if let Some(task) = self.runs.remove(&key).and_then(|r| r.task) {
                        task.abort(); // Dropping the call kills its instance.
                    }
                    for slot in self.apps.values_mut() {
                        if let Slot::Fetching(waiting) | Slot::Starting(waiting) = slot {
                            waiting.retain(|s| (s.exec, s.call, s.attempt) != key);
                        }
                    }
                }
                LbOutput::Incarnation(i) => save_incarnation(&self.config.data_dir, i)?,
            }
        }
        self.dispatching = None;
        Ok(())
    }

    fn start_run(&mut self, spec: CallSpec) {
        match self.apps.get_mut(&spec.app) {
            Some(Slot::Ready(host)) => {
                let host = host.clone();
                self.spawn_run(host, spec);
            }
            Some(Slot::Fetching(waiting) | Slot::Starting(waiting)) => waiting.push(spec),
            None => {
                let app = spec.app.clone();
                self.apps.insert(app.clone(), Slot::Fetching(vec![spec]));
                self.send(ToGateway::Fetch { app });
            }
        }
    }

    fn spawn_run(&mut self, host: Arc<AppHost>, spec: CallSpec) {
        let Some(run) = self.runs.get_mut(&(spec.exec, spec.call, spec.attempt)) else {
            return; // Aborted while its app was getting ready.
        };
        let notes = self.notes.clone();
        let task = tokio::spawn(async move {
            let report = host.run(&spec).await;
            let _ = notes.send(Note::Finished {
                spec,
                report: Box::new(report),
            });
        });
        run.task = Some(task);
    }

    /// The gateway answered a fetch: unpack the bundle and start the app's host.
    fn bundle(&mut self, app: AppName, bundle: Option<AppBundle>) {
        let Some(Slot::Fetching(waiting)) = self.apps.remove(&app) else {
            return; // Not asked for, or asked twice: the first answer did.
        };
        let Some(bundle) = bundle else {
            let error =
                GrainError::new(ErrorKind::Unavailable, format!("app {app} is not deployed"));
            self.fail_all(waiting, error);
            return;
        };
        self.apps.insert(app.clone(), Slot::Starting(waiting));
        let dir = self
            .config
            .data_dir
            .join("apps")
            .join(app.as_str())
            .join(&bundle.digest);
        let ctx = self.config.host.clone();
        let notes = self.notes.clone();
        tokio::spawn(async move {
            let unpacked = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || unpack(&bundle.archive, &dir)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            let host = match unpacked {
                Ok(manifest) => AppHost::start(&ctx, manifest, bundle.digest, &dir)
                    .await
                    .map(Arc::new),
                Err(e) => Err(e),
            };
            let _ = notes.send(Note::Started { app, host });
        });
    }

    fn note(&mut self, note: Note) {
        let now = self.now();
        match note {
            Note::Finished { spec, report } => {
                let run = (spec.exec, spec.call, spec.attempt);
                let Some(Run { dispatched, .. }) = self.runs.remove(&run) else {
                    return; // Aborted meanwhile: the bus wants nothing of it.
                };
                self.traces.push(trace_of(&spec, &report, dispatched));
                self.lb.handle(
                    now,
                    LbEvent::Finished {
                        run,
                        result: report.result,
                    },
                );
            }
            Note::Started { app, host } => {
                let Some(Slot::Starting(waiting)) = self.apps.remove(&app) else {
                    return;
                };
                match host {
                    Ok(host) => {
                        tracing::info!(%app, digest = host.digest(), "app host ready");
                        self.apps.insert(app, Slot::Ready(host.clone()));
                        for spec in waiting {
                            self.spawn_run(host.clone(), spec);
                        }
                    }
                    Err(why) => {
                        tracing::warn!(%app, "cannot host the app: {why}");
                        self.fail_all(waiting, GrainError::new(ErrorKind::Unavailable, why));
                    }
                }
            }
        }
    }

    /// Reports every waiting call as failed, so the gateway's retry policy takes over.
    fn fail_all(&mut self, waiting: Vec<CallSpec>, error: GrainError) {
        let now = self.now();
        for spec in waiting {
            let run = (spec.exec, spec.call, spec.attempt);
            self.runs.remove(&run);
            let result = GrainResult::Error(error.clone());
            self.lb.handle(now, LbEvent::Finished { run, result });
        }
    }

    fn flush_traces(&mut self) {
        if self.connected && !self.traces.is_empty() {
            let runs = std::mem::take(&mut self.traces);
            self.send(ToGateway::Trace { runs });
        } else if self.traces.len() > 4096 {
            self.traces.drain(..2048); // Best effort: keep the newest while disconnected.
        }
    }

    fn retire_idle(&mut self) {
        let idle = self.config.idle_teardown;
        let stale: Vec<AppName> = self
            .apps
            .iter()
            .filter(
                |(_, s)| matches!(s, Slot::Ready(h) if h.running() == 0 && h.idle_for() >= idle),
            )
            .map(|(a, _)| a.clone())
            .collect();
        for app in stale {
            if let Some(Slot::Ready(host)) = self.apps.remove(&app) {
                tracing::info!(%app, "app idle; tearing its host down");
                retire(host);
            }
        }
    }

    async fn shutdown(self) {
        for task in self.runs.into_values().filter_map(|r| r.task) {
            task.abort();
        }
        for (_, slot) in self.apps {
            if let Slot::Ready(host) = slot {
                if let Ok(host) = Arc::try_unwrap(host) {
                    host.shutdown().await;
                }
            }
        }
    }
}

/// Tears a host down once the calls still running on it are done.
fn retire(host: Arc<AppHost>) {
    tokio::spawn(async move {
        let mut host = host;
        loop {
            match Arc::try_unwrap(host) {
                Ok(owned) => return owned.shutdown().await,
                Err(shared) => {
                    host = shared;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

/// Unpacks a bundle into `dir` (once: a digest names its content), returning its manifest.
fn unpack(archive: &[u8], dir: &Path) -> Result<sand_app::Manifest, String> {
    if dir.join(sand_app::manifest::MANIFEST_FILE).is_file() {
        return sand_app::Manifest::load(dir).map_err(|e| e.to_string());
    }
    let partial = dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
    }
    let manifest = sand_app::unpack(archive, &partial).map_err(|e| e.to_string())?;
    std::fs::rename(&partial, dir).map_err(|e| format!("cannot place the bundle: {e}"))?;
    Ok(manifest)
}

/// A run's trace entry for the gateway.
fn trace_of(spec: &CallSpec, report: &CallReport, dispatched: bool) -> RunTrace {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let ago = |t: Instant| wall.saturating_sub(t.elapsed().as_millis() as u64);
    RunTrace {
        exec: spec.exec,
        call: spec.call,
        attempt: spec.attempt,
        grain: spec.grain.clone(),
        dispatched,
        started_ms: ago(report.started),
        ended_ms: ago(report.finished),
        error: match &report.result {
            GrainResult::Error(e) => Some(e.clone()),
            _ => None,
        },
        stdout: report.stdout.clone(),
        stderr: report.stderr.clone(),
    }
}

const INCARNATION_FILE: &str = "incarnation";

/// The incarnation after the last one this worker used, saved before it is used.
fn next_incarnation(dir: &Path) -> Result<Incarnation, WorkerError> {
    let path = dir.join(INCARNATION_FILE);
    let last = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let next = Incarnation(last + 1);
    save_incarnation(dir, next)?;
    Ok(next)
}

/// Saves an incarnation durably, so a restart picks a larger one.
fn save_incarnation(dir: &Path, incarnation: Incarnation) -> Result<(), WorkerError> {
    let path = dir.join(INCARNATION_FILE);
    let partial = dir.join(format!("{INCARNATION_FILE}.partial"));
    let io = |what, source| WorkerError::Io {
        what,
        path: path.clone(),
        source,
    };
    let file = std::fs::File::create(&partial).map_err(|e| io("cannot write", e))?;
    use std::io::Write;
    (&file)
        .write_all(incarnation.0.to_string().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io("cannot write", e))?;
    std::fs::rename(&partial, &path).map_err(|e| io("cannot replace", e))
}
