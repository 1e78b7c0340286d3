//! The worker's driver: one task that owns the [`LocalBus`] and feeds it what happens (gateway
//! messages, finished calls, timers), then carries out what it asks: send, run, abort.
//!
//! Calls run on their app's [`AppHost`] as futures the driver polls itself, not as tasks: when
//! a grain's result arrives, the driver wakes once, hands it to the bus, and starts the next call
//! in the same wake-up, before it sends the hop's report. (A task per call cost two more task
//! hand-overs per hop, each a thread wake-up on a busy machine.) An app's bundle is fetched from
//! the gateway at its first call here; calls that arrive meanwhile wait for it. Finished runs
//! are also traced, in batches, to the gateway (best effort).
//!
//! Bundles are unpacked under `DATA_DIR/apps` (mode 0700: no other local user reads an app's
//! code), one directory per app and version, named by the version's digest once it is checked
//! to be one. A version's directory is removed once it is neither the newest the gateway sent
//! nor used by a host (starting, running or shutting down).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::{AbortHandle, Abortable, Aborted};
use futures_util::stream::{FuturesUnordered, StreamExt};

use sand_protocol::ids::{AppName, Incarnation, RunKey};
use sand_protocol::local_bus::{GrainResult, LbConfig, LbEvent, LbOutput, LocalBus};
use sand_protocol::time::Time;
use sand_protocol::wire::{
    AppBundle, CallSpec, Down, ErrorKind, GrainError, Preview, RunTrace, ServiceToGateway,
    ServiceToWorker, ToGateway, ToWorker, Up,
};
use sand_transport::file::write_atomic;
use sand_transport::seam::{SendError, WorkerEvent, WorkerLink, WorkerSender};
use tokio::sync::mpsc;

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
    /// The incarnation file exists but does not say which life this worker is in. Starting
    /// over from the first incarnation could reuse a life the gateway knows.
    #[error(
        "the incarnation file {path} {problem}, so this worker cannot tell which of its lives \
         comes next; to start it as a fresh worker, which the gateway then fences above its old \
         life, remove the file"
    )]
    Incarnation {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
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

/// Where bundles are unpacked, under the data directory.
const APPS_DIR: &str = "apps";

/// About the most bytes of run traces one message carries.
const TRACE_BATCH_BYTES: usize = 2 << 20;

/// What the driver's own tasks tell it about app hosts.
enum HostEvent {
    /// A host of this bundle version started, or could not.
    Started {
        app: AppName,
        digest: String,
        host: Result<Arc<AppHost>, String>,
    },
    /// A retired host of this bundle version has shut down.
    Retired { app: AppName, digest: String },
}

/// A call running on its app's host: the attempt and how it went.
type CallFuture = Pin<Box<dyn Future<Output = (CallSpec, Box<CallReport>)> + Send>>;

/// An attempt the bus asked to run.
struct Run {
    /// Stops its call (dropping the call kills its instance), once its app is ready.
    abort: Option<AbortHandle>,
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
    /// Calls made since the run loop last took them, to be polled (started) at once.
    starting: Vec<Abortable<CallFuture>>,
    /// Messages for the gateway, sent once the calls that came with them have started.
    outbox: Vec<ToGateway>,
    host_events: mpsc::UnboundedSender<HostEvent>,
    /// The newest bundle version the gateway sent, per app: kept on disk.
    newest: HashMap<AppName, String>,
    /// How many hosts (starting, running or shutting down) use each bundle version.
    bundle_users: HashMap<(AppName, String), usize>,
    /// Bundle versions removed so far: numbers their directories on the way out.
    bundles_removed: u64,
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
    private_dir(&config.data_dir.join(APPS_DIR))?;
    let incarnation = next_incarnation(&config.data_dir)?;
    tracing::info!(worker = %config.lb.worker, incarnation = incarnation.0, "worker starting");
    let (host_events, mut hosts) = mpsc::unbounded_channel();
    let mut driver = Driver {
        lb: LocalBus::new(config.lb, incarnation),
        config,
        sender: link.sender,
        started: Instant::now(),
        apps: HashMap::new(),
        dispatching: None,
        runs: HashMap::new(),
        starting: Vec::new(),
        outbox: Vec::new(),
        host_events,
        newest: HashMap::new(),
        bundle_users: HashMap::new(),
        bundles_removed: 0,
        traces: Vec::new(),
        connected: false,
    };
    let mut events = link.events;
    let mut calls: FuturesUnordered<Abortable<CallFuture>> = FuturesUnordered::new();
    let mut trace_tick = tokio::time::interval(driver.config.trace_interval);
    let mut idle_tick = tokio::time::interval(Duration::from_secs(1));
    // One timer for the bus, moved when its deadline moves rather than made anew each turn.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        let deadline = driver.lb.poll_timeout().map(|t| {
            tokio::time::Instant::from(driver.started + Duration::from_millis(t.as_millis()))
        });
        if let Some(at) = deadline {
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
        }
        tokio::select! {
            biased;
            Some(done) = calls.next() => driver.finished(done),
            ev = events.recv() => match ev {
                Some(ev) => driver.event(ev),
                None => break,
            },
            Some(event) = hosts.recv() => driver.host_event(event),
            () = &mut timer, if deadline.is_some() => {
                let now = driver.now();
                driver.lb.handle_timeouts(now);
            }
            _ = trace_tick.tick() => driver.flush_traces(),
            _ = idle_tick.tick() => driver.retire_idle(),
        }
        driver.drain()?;
        // Start the calls just made (a call writes its CALL at its first poll), then send.
        while !driver.starting.is_empty() {
            calls.extend(driver.starting.drain(..));
            let Some(done) = poll_once(&mut calls).await else {
                break;
            };
            driver.finished(done);
            driver.drain()?;
        }
        driver.send_outbox();
    }
    drop(calls); // Dropping the calls kills their instances.
    driver.shutdown().await;
    Ok(())
}

/// Polls the calls once, without waiting: a call that ended at once, if one did.
async fn poll_once(
    calls: &mut FuturesUnordered<Abortable<CallFuture>>,
) -> Option<Result<(CallSpec, Box<CallReport>), Aborted>> {
    std::future::poll_fn(|cx| match calls.poll_next_unpin(cx) {
        Poll::Ready(Some(done)) => Poll::Ready(Some(done)),
        Poll::Ready(None) | Poll::Pending => Poll::Ready(None),
    })
    .await
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
                    self.send(ServiceToGateway::Fetch { app });
                }
            }
            WorkerEvent::Disconnected => {
                self.connected = false;
                self.lb.handle(now, LbEvent::Disconnected);
            }
            WorkerEvent::Message(Down::Protocol(msg)) => {
                if let ToWorker::Dispatch { call, .. } = &msg {
                    self.dispatching = Some(call.run_key());
                }
                // Its `Run`, if the bus starts it, comes out in the drain that follows.
                self.lb.handle(now, LbEvent::Message(msg));
            }
            WorkerEvent::Message(Down::Service(ServiceToWorker::Bundle { app, bundle })) => {
                self.bundle(app, bundle)
            }
            WorkerEvent::Message(Down::Service(ServiceToWorker::AppChanged { app })) => {
                if let Some(Slot::Ready(host)) = self.apps.remove(&app) {
                    tracing::info!(%app, "app changed; retiring its host");
                    self.retire(host);
                }
            }
        }
    }

    /// Hands `msg` to the transport. Any refusal but `Encode` needs nothing more here: the
    /// connection is gone or closing (the transport closes it rather than drop a message from a
    /// live one), so `Disconnected` and `Connected` follow, after which the bus re-sends what is
    /// unacked and the driver asks again for the bundles it waits for. Traces are not re-sent.
    fn send(&self, msg: impl Into<Up>) {
        match self.sender.send(msg) {
            Ok(()) => {}
            // Too large to encode: no reconnection will carry it.
            Err(e @ SendError::Encode(_)) => tracing::error!("cannot send to the gateway: {e}"),
            Err(e) => tracing::debug!("not sent to the gateway: {e}"),
        }
    }

    /// Sends what the bus asked to send, in order.
    fn send_outbox(&mut self) {
        for msg in std::mem::take(&mut self.outbox) {
            self.send(msg);
        }
    }

    fn drain(&mut self) -> Result<(), WorkerError> {
        while let Some(out) = self.lb.poll_output() {
            match out {
                LbOutput::Send(msg) => self.outbox.push(msg),
                LbOutput::Run(spec) => {
                    let key = spec.run_key();
                    let dispatched = self.dispatching == Some(key);
                    self.runs.insert(
                        key,
                        Run {
                            abort: None,
                            dispatched,
                        },
                    );
                    self.start_run(spec);
                }
                LbOutput::Abort(key) => {
                    if let Some(abort) = self.runs.remove(&key).and_then(|r| r.abort) {
                        abort.abort(); // Dropping the call kills its instance.
                    }
                    for slot in self.apps.values_mut() {
                        if let Slot::Fetching(waiting) | Slot::Starting(waiting) = slot {
                            waiting.retain(|s| s.run_key() != key);
                        }
                    }
                }
                LbOutput::PersistIncarnation(i) => save_incarnation(&self.config.data_dir, i)?,
            }
        }
        self.dispatching = None;
        Ok(())
    }

    fn start_run(&mut self, spec: CallSpec) {
        match self.apps.get_mut(&spec.app) {
            Some(Slot::Ready(host)) => {
                let host = host.clone();
                self.start_call(host, spec);
            }
            Some(Slot::Fetching(waiting) | Slot::Starting(waiting)) => waiting.push(spec),
            None => {
                let app = spec.app.clone();
                self.apps.insert(app.clone(), Slot::Fetching(vec![spec]));
                self.send(ServiceToGateway::Fetch { app });
            }
        }
    }

    /// Makes the call's future; the run loop starts it by polling it.
    fn start_call(&mut self, host: Arc<AppHost>, spec: CallSpec) {
        let Some(run) = self.runs.get_mut(&spec.run_key()) else {
            return; // Aborted while its app was getting ready.
        };
        let call: CallFuture = Box::pin(async move {
            let report = host.run(&spec).await;
            (spec, Box::new(report))
        });
        let (abort, registration) = AbortHandle::new_pair();
        run.abort = Some(abort);
        self.starting.push(Abortable::new(call, registration));
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
        // The digest becomes a directory name: only a digest may.
        if !sand_app::is_digest(&bundle.digest) {
            let error = GrainError::new(
                ErrorKind::Unavailable,
                format!(
                    "the gateway sent app {app}'s bundle with digest {:?}, which is not a \
                     digest (64 lowercase hex digits); refused",
                    bundle.digest.chars().take(80).collect::<String>()
                ),
            );
            self.fail_all(waiting, error);
            return;
        }
        self.apps.insert(app.clone(), Slot::Starting(waiting));
        let digest = bundle.digest.clone();
        self.newest.insert(app.clone(), digest.clone());
        *self
            .bundle_users
            .entry((app.clone(), digest.clone()))
            .or_default() += 1;
        self.prune(&app);
        let dir = self.app_dir(&app).join(&digest);
        let ctx = self.config.host.clone();
        let host_events = self.host_events.clone();
        tokio::spawn(async move {
            let unpacked = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || unpack(&bundle, &dir)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            let host = match unpacked {
                Ok(manifest) => AppHost::start(&ctx, manifest, digest.clone(), &dir)
                    .await
                    .map(Arc::new),
                Err(e) => Err(e),
            };
            let _ = host_events.send(HostEvent::Started { app, digest, host });
        });
    }

    /// Where `app`'s bundle versions are unpacked.
    fn app_dir(&self, app: &AppName) -> PathBuf {
        self.config.data_dir.join(APPS_DIR).join(app.as_str())
    }

    /// One host fewer uses this bundle version.
    fn bundle_released(&mut self, app: &AppName, digest: String) {
        let key = (app.clone(), digest);
        if let Some(users) = self.bundle_users.get_mut(&key) {
            *users -= 1;
            if *users == 0 {
                self.bundle_users.remove(&key);
            }
        }
        self.prune(app);
    }

    /// Removes `app`'s bundle versions that are neither the newest nor in use. Each is renamed
    /// away at once, so an unpack of the same version later never meets it half removed, then
    /// removed off the driver's thread.
    fn prune(&mut self, app: &AppName) {
        let dir = self.app_dir(app);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return; // Nothing unpacked yet.
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(digest) = name.to_str().filter(|d| sand_app::is_digest(d)) else {
                continue;
            };
            let in_use = self
                .bundle_users
                .contains_key(&(app.clone(), digest.to_owned()));
            if in_use || self.newest.get(app).is_some_and(|d| d == digest) {
                continue;
            }
            self.bundles_removed += 1;
            let doomed = dir.join(format!(
                ".removed-{}-{}",
                std::process::id(),
                self.bundles_removed
            ));
            match std::fs::rename(entry.path(), &doomed) {
                Ok(()) => {
                    tracing::info!(%app, digest, "removing an old bundle version");
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = std::fs::remove_dir_all(&doomed) {
                            tracing::warn!("cannot remove {}: {e}", doomed.display());
                        }
                    });
                }
                Err(e) => tracing::warn!(%app, digest, "cannot remove an old bundle: {e}"),
            }
        }
    }

    /// A call ended (or was aborted): its result goes to the bus, its run to the traces.
    fn finished(&mut self, done: Result<(CallSpec, Box<CallReport>), Aborted>) {
        let Ok((spec, report)) = done else {
            return; // Aborted: the bus wants nothing of it.
        };
        let run = spec.run_key();
        let Some(Run { dispatched, .. }) = self.runs.remove(&run) else {
            return; // Aborted meanwhile: the bus wants nothing of it.
        };
        self.traces.push(trace_of(&spec, &report, dispatched));
        let now = self.now();
        self.lb.handle(
            now,
            LbEvent::Finished {
                run,
                result: report.result,
            },
        );
    }

    fn host_event(&mut self, event: HostEvent) {
        match event {
            HostEvent::Started { app, digest, host } => self.host_started(app, digest, host),
            HostEvent::Retired { app, digest } => self.bundle_released(&app, digest),
        }
    }

    fn host_started(&mut self, app: AppName, digest: String, host: Result<Arc<AppHost>, String>) {
        let Some(Slot::Starting(waiting)) = self.apps.remove(&app) else {
            // The app changed while its host started: that host is already out of date.
            match host {
                Ok(host) => self.retire(host),
                Err(_) => self.bundle_released(&app, digest),
            }
            return;
        };
        match host {
            Ok(host) => {
                tracing::info!(%app, digest = host.digest(), "app host ready");
                self.apps.insert(app, Slot::Ready(host.clone()));
                for spec in waiting {
                    self.start_call(host.clone(), spec);
                }
            }
            Err(why) => {
                tracing::warn!(%app, "cannot host the app: {why}");
                self.fail_all(waiting, GrainError::new(ErrorKind::Unavailable, why));
                self.bundle_released(&app, digest);
            }
        }
    }

    /// Reports every waiting call as failed, so the gateway's retry policy takes over.
    fn fail_all(&mut self, waiting: Vec<CallSpec>, error: GrainError) {
        let now = self.now();
        for spec in waiting {
            let run = spec.run_key();
            self.runs.remove(&run);
            let result = GrainResult::Error(error.clone());
            self.lb.handle(now, LbEvent::Finished { run, result });
        }
    }

    /// Sends the finished runs, in messages of about [`TRACE_BATCH_BYTES`] at most: far below
    /// the largest message, which a busy interval of runs with full captures could pass.
    fn flush_traces(&mut self) {
        if self.connected && !self.traces.is_empty() {
            let mut runs = Vec::new();
            let mut bytes = 0;
            for run in std::mem::take(&mut self.traces) {
                let weight = run.stdout.len()
                    + run.stderr.len()
                    + run.input.head.len()
                    + run.output.as_ref().map_or(0, |o| o.head.len())
                    + 8 * run.emitted.len()
                    + 128;
                if !runs.is_empty() && bytes + weight > TRACE_BATCH_BYTES {
                    let batch = std::mem::take(&mut runs);
                    self.send(ServiceToGateway::Trace { runs: batch });
                    bytes = 0;
                }
                bytes += weight;
                runs.push(run);
            }
            self.send(ServiceToGateway::Trace { runs });
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
                self.retire(host);
            }
        }
    }

    /// Tears a host down once the calls still running on it are done; then its bundle
    /// version may go.
    fn retire(&self, host: Arc<AppHost>) {
        let host_events = self.host_events.clone();
        tokio::spawn(async move {
            let mut host = host;
            loop {
                match Arc::try_unwrap(host) {
                    Ok(owned) => {
                        let app = owned.app().clone();
                        let digest = owned.digest().to_owned();
                        owned.shutdown().await;
                        let _ = host_events.send(HostEvent::Retired { app, digest });
                        return;
                    }
                    Err(shared) => {
                        host = shared;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }

    async fn shutdown(self) {
        for (_, slot) in self.apps {
            if let Slot::Ready(host) = slot {
                if let Ok(host) = Arc::try_unwrap(host) {
                    host.shutdown().await;
                }
            }
        }
    }
}

/// Makes `dir` (and its parents), mode 0700 whatever the umask or its mode before.
fn private_dir(dir: &Path) -> Result<(), WorkerError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| WorkerError::Io {
            what: "cannot make the bundle directory private",
            path: dir.to_owned(),
            source,
        })
}

/// Unpacks a bundle into `dir` (once: a digest names its content), returning its manifest.
/// A bundle whose content does not match its digest is refused.
fn unpack(bundle: &AppBundle, dir: &Path) -> Result<sand_app::Manifest, String> {
    if dir.join(sand_app::manifest::MANIFEST_FILE).is_file() {
        return sand_app::Manifest::load(dir).map_err(|e| e.to_string());
    }
    if sand_app::digest(&bundle.archive) != bundle.digest {
        return Err(format!(
            "the bundle sent as version {} has other content; refused",
            bundle.digest
        ));
    }
    let archive = &bundle.archive;
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

/// A run's trace entry for the gateway: what the bus makes of its result, with previews of
/// its input and returned value.
fn trace_of(spec: &CallSpec, report: &CallReport, dispatched: bool) -> RunTrace {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let ago = |t: Instant| wall.saturating_sub(t.elapsed().as_micros() as u64);
    let refusal = report.result.refusal(spec);
    let (error, output) = match (&report.result, refusal) {
        (GrainResult::Error(e), _) => (Some(e.clone()), None),
        (_, Some(refused)) => (Some(refused), None),
        (GrainResult::Return(value), None) => (None, Some(Preview::of(value))),
        (GrainResult::Next { .. } | GrainResult::FanOut { .. }, None) => (None, None),
    };
    RunTrace {
        exec: spec.exec,
        call: spec.call,
        attempt: spec.attempt,
        grain: spec.grain.clone(),
        dispatched,
        started_us: ago(report.started),
        ended_us: ago(report.finished),
        error,
        stdout: report.stdout.clone(),
        stderr: report.stderr.clone(),
        input: Preview::of(&spec.input),
        output,
        emitted: report.result.emitted(spec),
        traceparent: spec.traceparent,
        cold: report.cold,
    }
}

const INCARNATION_FILE: &str = "incarnation";

/// The incarnation after the last one this worker used, saved before it is used. A missing
/// file means a fresh worker.
fn next_incarnation(dir: &Path) -> Result<Incarnation, WorkerError> {
    let path = dir.join(INCARNATION_FILE);
    let next = match load_incarnation(&path)? {
        None => Incarnation(1),
        Some(last) => {
            last.0
                .checked_add(1)
                .map(Incarnation)
                .ok_or_else(|| WorkerError::Incarnation {
                    path,
                    problem: format!("holds {}, the last incarnation there is", last.0),
                })?
        }
    };
    save_incarnation(dir, next)?;
    Ok(next)
}

/// The incarnation saved at `path`, or `None` if none was ever saved.
fn load_incarnation(path: &Path) -> Result<Option<Incarnation>, WorkerError> {
    let bad = |problem| WorkerError::Incarnation {
        path: path.to_path_buf(),
        problem,
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(format!("cannot be read ({e})"))),
    };
    let text = String::from_utf8_lossy(&bytes);
    match text.trim().parse::<u64>() {
        Ok(last) => Ok(Some(Incarnation(last))),
        Err(_) if text.trim().is_empty() => Err(bad("is empty".to_string())),
        Err(_) => Err(bad(format!(
            "holds {:?}, not an incarnation number",
            text.chars().take(40).collect::<String>()
        ))),
    }
}

/// Saves an incarnation durably before it is used: written to a temporary file and synced,
/// renamed over the old file, and the directory synced, so that after a crash the file holds
/// the old incarnation or the new one, whole, and a restart never reuses a life.
fn save_incarnation(dir: &Path, incarnation: Incarnation) -> Result<(), WorkerError> {
    let path = dir.join(INCARNATION_FILE);
    write_atomic(&path, incarnation.0.to_string().as_bytes(), 0o644).map_err(|source| {
        WorkerError::Io {
            what: "cannot write",
            path,
            source,
        }
    })
}
