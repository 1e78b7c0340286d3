//! The gateway's core: one task that owns the [`GlobalQueue`] and feeds it everything that
//! happens (worker messages, disk commits, timers, client requests), then carries out what it
//! asks (writes, sends, answers).
//!
//! Everything else talks to the core through a [`CoreHandle`]: the HTTP API asks it to deploy,
//! invoke and look up; the transport feeds it worker events; the store reports its commits.
//! The core never blocks: writes go to the store's group-commit thread, sends are queued by the
//! transport, and a request waiting for a durable acceptance or an answer parks a oneshot.
//!
//! Nothing leaves the core before the state behind it is durable. The queue's in-memory state
//! runs ahead of the disk (an execution is `Done` there as soon as its last report is applied),
//! so the core answers from what the queue *emits* (`ConfirmInvoke`, `Respond`, `ConfirmDeploy`,
//! `ConfirmRemove`) and looks executions up with [`GlobalQueue::execution`], which shows what the
//! disk holds: the queue decides what is visible, and the model checks it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sand_protocol::durable::{Answer, ExecRecord, ExecStatus, LogIndex};
use sand_protocol::global_queue::{GlobalQueue, GqConfig, GqEvent, GqOutput, InvokeError, Invoked};
use sand_protocol::ids::{AppName, ExecId};
use sand_protocol::policy::AppSpec;
use sand_protocol::time::Time;
use sand_protocol::trace_context::TraceParent;
use sand_protocol::wire::{
    AppBundle, Payload, Reason, ServiceToGateway, ServiceToWorker, ToWorker, Up,
};
use sand_transport::seam::{Events, GatewayEvent, GatewaySender};
use tokio::sync::{mpsc, oneshot};

use crate::exec_ref::ExecRefs;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::telemetry::Telemetry;
use crate::trace::TraceBook;

/// A request to the core, from the HTTP API or the CLI.
#[derive(Debug)]
pub enum Command {
    /// Accept an execution; the reply comes once its acceptance is durable. For clients that do
    /// not wait for the answer.
    Invoke {
        /// The app.
        app: AppName,
        /// The entry grain's input.
        input: Payload,
        /// Makes a retried request find the first execution.
        idempotency_key: Option<String>,
        /// The span the entry call hangs from.
        traceparent: TraceParent,
        /// The accepted execution, or why not.
        reply: oneshot::Sender<Result<Invoked, InvokeError>>,
    },
    /// Start an execution and wait for its answer: the reply comes at once, with where the
    /// answer and the durable acceptance will come. Its acceptance is written without a commit
    /// of its own (the design allows it: until the answer, nobody was told anything).
    Run {
        /// The app.
        app: AppName,
        /// The entry grain's input.
        input: Payload,
        /// Makes a retried request find the first execution.
        idempotency_key: Option<String>,
        /// The span the entry call hangs from.
        traceparent: TraceParent,
        /// The execution under way, or why it was refused.
        reply: oneshot::Sender<Result<Run, InvokeError>>,
    },
    /// Wait for an execution's answer; the reply comes once it ended durably (at once if it
    /// has).
    Answer {
        /// The execution.
        exec: ExecId,
        /// Its answer, or `None` if the execution is unknown.
        reply: oneshot::Sender<Option<Answer>>,
    },
    /// Deploy or replace an app, code and all; the reply comes once the deployment is durable.
    Deploy {
        /// The app's policies.
        spec: AppSpec,
        /// Its code.
        bundle: AppBundle,
        /// Fires once the deployment is durable.
        reply: oneshot::Sender<()>,
    },
    /// Remove an app, code and all; its running executions go on. The reply comes once the
    /// removal is durable.
    Remove {
        /// The app.
        app: AppName,
        /// False if it was not deployed.
        reply: oneshot::Sender<bool>,
    },
    /// Look up an execution.
    Execution {
        /// The execution.
        exec: ExecId,
        /// Its record, or `None` if unknown.
        reply: oneshot::Sender<Option<ExecRecord>>,
    },
    /// List executions as the disk holds them, newest first.
    Executions {
        /// Only those with ids below this one (the last of the page before).
        before: Option<ExecId>,
        /// Only this app's.
        app: Option<AppName>,
        /// At most this many.
        limit: usize,
        /// Each execution's summary.
        reply: oneshot::Sender<Vec<ExecSummary>>,
    },
    /// List the deployed apps, as the disk holds them.
    Apps {
        /// Each app's spec and bundle digest.
        reply: oneshot::Sender<Vec<(AppSpec, String)>>,
    },
    /// List the workers the gateway knows.
    Workers {
        /// Each worker's state.
        reply: oneshot::Sender<Vec<sand_api::Worker>>,
    },
}

/// A synchronous execution under way: the reply to [`Command::Run`].
#[derive(Debug)]
pub struct Run {
    /// The execution.
    pub invoked: Invoked,
    /// Its answer, once durable; `None` if the execution was forgotten first.
    pub answer: oneshot::Receiver<Option<Answer>>,
    /// Fires once the acceptance is durable: wait for it before giving the client the
    /// execution's id without its answer.
    pub accepted: oneshot::Receiver<Result<Invoked, InvokeError>>,
}

/// An execution as a list shows it: where it stands, not its output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecSummary {
    /// The execution.
    pub exec: ExecId,
    /// The app invoked.
    pub app: AppName,
    /// When it was accepted, in ms since the Unix epoch.
    pub accepted_ms: u64,
    /// When it ended, if it has.
    pub ended_ms: Option<u64>,
    /// Running, or whether its answer is a value (`Some(true)`) or an error.
    pub succeeded: Option<bool>,
    /// The calls it has made so far, its entry call included.
    pub calls: u32,
}

impl From<&ExecRecord> for ExecSummary {
    fn from(r: &ExecRecord) -> Self {
        Self {
            exec: r.exec,
            app: r.app.clone(),
            accepted_ms: r.accepted.as_millis(),
            ended_ms: r.ended.map(Time::as_millis),
            succeeded: match &r.status {
                ExecStatus::Running => None,
                ExecStatus::Done(answer) => Some(matches!(answer, Answer::Value(_))),
            },
            calls: r.calls,
        }
    }
}

/// Sends commands to the core. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CoreHandle {
    tx: mpsc::Sender<Command>,
}

/// The core has stopped (the gateway is shutting down or its store failed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the gateway core has stopped")]
pub struct CoreStopped;

impl CoreHandle {
    /// Sends a command built around a reply channel and waits for the reply.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, CoreStopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| CoreStopped)?;
        rx.await.map_err(|_| CoreStopped)
    }
}

/// Where the answer to an invocation goes.
type InvokeReply = oneshot::Sender<Result<Invoked, InvokeError>>;

/// The core's state: the queue and what waits on it.
pub struct Core {
    gq: GlobalQueue,
    store: Arc<Store>,
    sender: GatewaySender,
    /// The queue's clock: `origin` (the wall clock at start, ms since the Unix epoch) plus the
    /// monotonic time since `started`. See [`Core::now`].
    started: Instant,
    origin: u64,
    metrics: Arc<Metrics>,
    /// Clients waiting for an acceptance to be durable, each with what `invoke` said.
    accepting: HashMap<ExecId, Vec<(Invoked, InvokeReply)>>,
    /// Clients waiting for an answer.
    answering: HashMap<ExecId, Vec<oneshot::Sender<Option<Answer>>>>,
    /// Deployments waiting to be durable, per app in the order they were asked for (the
    /// queue emits each app's `ConfirmDeploy` in that order).
    deploying: HashMap<AppName, VecDeque<oneshot::Sender<()>>>,
    /// Removals waiting to be durable, likewise.
    removing: HashMap<AppName, VecDeque<oneshot::Sender<bool>>>,
    /// The index of the last batch handed to the store.
    logged: LogIndex,
    /// Names executions to clients, and so to the grains that run them.
    refs: Arc<ExecRefs>,
    /// When each execution accepted in this life was, until its answer: for the latency
    /// histogram only.
    accepted_at: HashMap<ExecId, Instant>,
    /// The batches of the event being handled are waited on by nobody yet: append them
    /// deferred. Reset after every drain.
    defer_batches: bool,
    traces: TraceBook,
    /// How often ended executions past the retention age are forgotten.
    sweep: Duration,
}

impl Core {
    /// Opens the store's state into a recovered queue.
    pub fn new(
        config: GqConfig,
        store: Arc<Store>,
        state: sand_protocol::durable::DurableState,
        sender: GatewaySender,
        metrics: Arc<Metrics>,
        refs: Arc<ExecRefs>,
        telemetry: Option<Arc<Telemetry>>,
    ) -> Self {
        let traces = TraceBook::new(telemetry);
        let started = Instant::now();
        let origin = wall_ms();
        let gq = GlobalQueue::recover(config, Time::from_millis(origin), state);
        // Often enough that nothing outlives the retention age by much, rarely enough that a
        // sweep (a scan of the executions) costs nothing.
        let sweep = (config.retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        Self {
            gq,
            store,
            sender,
            started,
            origin,
            metrics,
            accepting: HashMap::new(),
            answering: HashMap::new(),
            deploying: HashMap::new(),
            removing: HashMap::new(),
            logged: LogIndex(0),
            accepted_at: HashMap::new(),
            defer_batches: false,
            traces,
            sweep,
            refs,
        }
    }

    /// The time the queue is given: milliseconds since the Unix epoch, read from the wall
    /// clock once at start and advanced by the monotonic clock. Durable times (a key's birth,
    /// an execution's end) thus compare across restarts, while the timers of one life never
    /// jump with a clock adjustment.
    fn now(&self) -> Time {
        Time::from_millis(self.origin + self.started.elapsed().as_millis() as u64)
    }

    /// When, by the monotonic clock, the queue's time reaches `t`.
    fn instant(&self, t: Time) -> Instant {
        self.started + Duration::from_millis(t.as_millis().saturating_sub(self.origin))
    }

    /// Runs until every command sender is gone, or the store fails (an error: the gateway must
    /// stop, since it can no longer make anything durable).
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut events: Events<GatewayEvent>,
    ) -> Result<(), StoreError> {
        let mut commits = self.store.commits();
        let mut sweep = tokio::time::interval(self.sweep);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.drain()?;
        loop {
            let deadline = self.gq.poll_timeout().map(|t| self.instant(t));
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return Ok(()),
                },
                ev = events.recv() => match ev {
                    Some(ev) => self.event(ev),
                    None => return Ok(()),
                },
                committed = commits.changed() => {
                    let status = commits.borrow_and_update().clone();
                    if let Some(reason) = status.failure.or(committed.err().map(|_| "the commit thread stopped".into())) {
                        return Err(StoreError::Failed { path: self.store.path().to_owned(), reason });
                    }
                    let now = self.now();
                    self.gq.handle(now, GqEvent::Persisted(status.upto));
                }
                () = sleep => {
                    let now = self.now();
                    self.gq.handle_timeouts(now);
                }
                _ = sweep.tick() => self.expire(),
            }
            self.drain()?;
            self.metrics
                .queue_depth
                .set(self.gq.state().calls.len() as i64);
        }
    }

    fn command(&mut self, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Invoke {
                app,
                input,
                idempotency_key,
                traceparent,
                reply,
            } => match self.invoke(now, &app, input, idempotency_key, traceparent) {
                Ok(invoked) => {
                    let waiting = self.accepting.entry(invoked.exec).or_default();
                    waiting.push((invoked, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Run {
                app,
                input,
                idempotency_key,
                traceparent,
                reply,
            } => match self.invoke(now, &app, input, idempotency_key, traceparent) {
                Ok(invoked) => {
                    // Its batch is the only one of this event, and only a timed-out wait would
                    // ever need it before the answer's batch, which follows it in the log.
                    self.defer_batches = true;
                    let (accepted_tx, accepted) = oneshot::channel();
                    let waiting = self.accepting.entry(invoked.exec).or_default();
                    waiting.push((invoked, accepted_tx));
                    let (answer_tx, answer) = oneshot::channel();
                    self.answer(invoked.exec, answer_tx);
                    let _ = reply.send(Ok(Run {
                        invoked,
                        answer,
                        accepted,
                    }));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Answer { exec, reply } => self.answer(exec, reply),
            Command::Deploy {
                spec,
                bundle,
                reply,
            } => {
                let waiting = self.deploying.entry(spec.name.clone()).or_default();
                waiting.push_back(reply);
                self.gq.deploy(spec, bundle);
            }
            Command::Remove { app, reply } => {
                self.removing
                    .entry(app.clone())
                    .or_default()
                    .push_back(reply);
                self.gq.remove_app(&app);
            }
            Command::Execution { exec, reply } => {
                let _ = reply.send(self.gq.execution(exec).cloned());
            }
            Command::Executions {
                before,
                app,
                limit,
                reply,
            } => {
                let listed = self
                    .gq
                    .executions(before)
                    .filter(|r| app.as_ref().is_none_or(|app| r.app == *app))
                    .take(limit)
                    .map(ExecSummary::from)
                    .collect();
                let _ = reply.send(listed);
            }
            Command::Apps { reply } => {
                let apps = self
                    .gq
                    .deployed()
                    .into_iter()
                    .map(|d| (d.spec.clone(), d.bundle.digest.clone()))
                    .collect();
                let _ = reply.send(apps);
            }
            Command::Workers { reply } => {
                let workers = self
                    .gq
                    .state()
                    .workers
                    .iter()
                    .map(|(w, rec)| sand_api::Worker {
                        id: w.0,
                        incarnation: rec.incarnation.0,
                        connected: self.gq.is_connected(*w),
                        dead: rec.dead,
                        load: self.gq.load(*w),
                    })
                    .collect();
                let _ = reply.send(workers);
            }
        }
    }

    /// Forgets the executions that ended past the retention age, traces and all.
    fn expire(&mut self) {
        let now = self.now();
        let forgotten = self.gq.expire(now);
        if !forgotten.is_empty() {
            tracing::info!(
                executions = forgotten.len(),
                "forgot executions past the retention age"
            );
        }
        for exec in forgotten {
            self.traces.forget(exec);
            if let Err(e) = self.store.delete_traces(exec) {
                tracing::warn!(%exec, "could not delete traces: {e}");
            }
        }
    }

    /// Accepts an execution in the queue, noting when for the latency histogram.
    fn invoke(
        &mut self,
        now: Time,
        app: &AppName,
        input: Payload,
        idempotency_key: Option<String>,
        traceparent: TraceParent,
    ) -> Result<Invoked, InvokeError> {
        let invoked = self
            .gq
            .invoke(now, app, input, idempotency_key, traceparent)?;
        if invoked.fresh {
            self.accepted_at.insert(invoked.exec, Instant::now());
        }
        Ok(invoked)
    }

    /// Replies with an execution's answer once it is durable: at once if the disk has it,
    /// else when the queue emits its `Respond`. `None` if the queue does not know it at all.
    fn answer(&mut self, exec: ExecId, reply: oneshot::Sender<Option<Answer>>) {
        match self.gq.execution(exec).map(|rec| &rec.status) {
            Some(ExecStatus::Done(answer)) => {
                let _ = reply.send(Some(answer.clone()));
            }
            // Running, or accepted and not yet durably: its `Respond` will come.
            _ if self.gq.state().execs.contains_key(&exec) => {
                self.answering.entry(exec).or_default().push(reply);
            }
            _ => {
                let _ = reply.send(None);
            }
        }
    }

    /// Tells every worker that an app changed, so none runs stale code.
    fn announce(&self, app: AppName) {
        for w in self.gq.state().workers.keys() {
            if self.gq.is_connected(*w) {
                let _ = self
                    .sender
                    .send(*w, ServiceToWorker::AppChanged { app: app.clone() });
            }
        }
    }

    fn event(&mut self, ev: GatewayEvent) {
        let now = self.now();
        match ev {
            GatewayEvent::Connected(w) => {
                // A new connection replaces the worker's old one, whether or not the old one's
                // end was seen: nothing made for the old one may leave on it.
                tracing::info!(worker = %w, "worker connected");
                self.gq.handle(now, GqEvent::Disconnected(w));
            }
            GatewayEvent::Disconnected(w) => {
                tracing::info!(worker = %w, "worker disconnected");
                self.gq.handle(now, GqEvent::Disconnected(w));
            }
            GatewayEvent::Message(w, Up::Protocol(msg)) => {
                self.gq.handle(now, GqEvent::Message(w, msg))
            }
            GatewayEvent::Message(w, Up::Service(ServiceToGateway::Fetch { app })) => {
                let bundle = self.gq.state().apps.get(&app).map(|d| d.bundle.clone());
                if let Err(e) = self.sender.send(w, ServiceToWorker::Bundle { app, bundle }) {
                    tracing::debug!(worker = %w, "bundle not sent: {e}");
                }
            }
            GatewayEvent::Message(w, Up::Service(ServiceToGateway::Trace { mut runs })) => {
                // A forgotten execution's traces went with it: none come back.
                runs.retain(|r| self.gq.state().execs.contains_key(&r.exec));
                let gq = &self.gq;
                let app_of = |exec| gq.state().execs.get(&exec).map(|e| e.app.clone());
                let writes = self.traces.runs(w, runs, &self.metrics, app_of);
                if let Err(e) = self.store.put_traces(writes) {
                    tracing::warn!("could not record traces: {e}");
                }
            }
        }
    }

    /// Carries out everything the queue asks.
    fn drain(&mut self) -> Result<(), StoreError> {
        let mut traces = Vec::new();
        let outputs: Vec<GqOutput> = std::iter::from_fn(|| self.gq.poll_output()).collect();
        for out in outputs {
            match out {
                GqOutput::Persist(batch) => {
                    self.logged = batch.index;
                    if self.defer_batches {
                        self.store.append_deferred(batch)?;
                    } else {
                        self.store.append(batch)?;
                    }
                }
                GqOutput::Send(w, mut msg) => {
                    if let ToWorker::Dispatch { call, reason, .. } = &mut msg {
                        // The grain sees the execution as clients do.
                        call.exec_ref = self.refs.present(call.exec);
                        if let Some(t) = self.traces.dispatched(w, call, *reason, wall_ms()) {
                            self.metrics.gateway_hops.inc();
                            if *reason == Reason::Recovery {
                                self.metrics.recoveries.inc();
                            }
                            traces.push(t);
                        }
                    }
                    if let Err(e) = self.sender.send(w, msg) {
                        tracing::debug!(worker = %w, "not sent: {e}");
                    }
                }
                GqOutput::ConfirmInvoke(exec) => {
                    for (invoked, reply) in self.accepting.remove(&exec).unwrap_or_default() {
                        if invoked.fresh {
                            self.metrics.accepted.inc();
                        }
                        let _ = reply.send(Ok(invoked));
                    }
                }
                GqOutput::Respond(exec, answer) => {
                    let outcome = match &answer {
                        Answer::Value(_) => "succeeded",
                        Answer::Error(_) => "failed",
                    };
                    self.metrics.executions.get_or_create(&outcome.into()).inc();
                    if let Some(t0) = self.accepted_at.remove(&exec) {
                        self.metrics
                            .execution_seconds
                            .observe(t0.elapsed().as_secs_f64());
                    }
                    self.traces.ended(exec, wall_ms());
                    for reply in self.answering.remove(&exec).unwrap_or_default() {
                        let _ = reply.send(Some(answer.clone()));
                    }
                }
                GqOutput::ConfirmDeploy(app) => {
                    if let Some(reply) = pop(&mut self.deploying, &app) {
                        let _ = reply.send(());
                    }
                    self.announce(app);
                }
                GqOutput::ConfirmRemove { app, existed } => {
                    if let Some(reply) = pop(&mut self.removing, &app) {
                        let _ = reply.send(existed);
                    }
                    if existed {
                        self.announce(app);
                    }
                }
            }
        }
        self.defer_batches = false;
        if !traces.is_empty() {
            if let Err(e) = self.store.put_traces(traces) {
                tracing::warn!("could not record traces: {e}");
            }
        }
        Ok(())
    }
}

/// The oldest of `app`'s waiting replies, dropping the app's entry once it has none.
fn pop<T>(waiting: &mut HashMap<AppName, VecDeque<T>>, app: &AppName) -> Option<T> {
    let queue = waiting.get_mut(app)?;
    let first = queue.pop_front();
    if queue.is_empty() {
        waiting.remove(app);
    }
    first
}

/// Spawns the core on the current tokio runtime; returns its handle and its task.
pub fn spawn(
    core: Core,
    events: Events<GatewayEvent>,
) -> (CoreHandle, tokio::task::JoinHandle<Result<(), StoreError>>) {
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(core.run(rx, events));
    (CoreHandle { tx }, task)
}

/// Milliseconds since the Unix epoch, for traces people read.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use prometheus_client::registry::Registry;
    use sand_protocol::ids::{GrainName, Incarnation, Seq, WorkerId};
    use sand_protocol::wire::{CallSpec, Cont, Down, Effects, Outcome, Report, Return, ToGateway};
    use sand_transport::mem::MemNetwork;
    use sand_transport::seam::{Events, WorkerEvent};

    const WORKER: WorkerId = WorkerId(1);
    const INCARNATION: Incarnation = Incarnation(1);

    /// A core driven by hand (its loop is not running) with one app deployed and one worker
    /// welcomed, and that worker's events. The store commits by itself, but the core learns
    /// of it only through [`settle`].
    fn core_with_worker(store: Store) -> (Core, MemNetwork, Events<WorkerEvent>) {
        core_configured(store, GqConfig::default())
    }

    fn core_configured(store: Store, config: GqConfig) -> (Core, MemNetwork, Events<WorkerEvent>) {
        let (net, link) = MemNetwork::new(64);
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let state = sand_protocol::durable::DurableState::default();
        let refs = Arc::new(ExecRefs::new(b"the core's tests"));
        let mut core = Core::new(
            config,
            Arc::new(store),
            state,
            link.sender,
            metrics,
            refs,
            None,
        );
        core.drain().unwrap();
        let spec = AppSpec {
            name: AppName::new("one").unwrap(),
            entry: GrainName::new("square").unwrap(),
            grains: BTreeMap::new(),
        };
        let bundle = AppBundle {
            digest: "d".into(),
            archive: Bytes::new(),
        };
        let (reply, _) = oneshot::channel();
        core.command(Command::Deploy {
            spec,
            bundle,
            reply,
        });
        core.drain().unwrap();
        let worker = net.add_worker(WORKER);
        core.event(GatewayEvent::Connected(WORKER));
        let hello = ToGateway::Hello {
            incarnation: INCARNATION,
            resumed: false,
            started: Vec::new(),
        };
        core.event(GatewayEvent::Message(WORKER, hello.into()));
        core.drain().unwrap();
        settle(&mut core);
        (core, net, worker.events)
    }

    /// Waits (at most 20 s) until every batch handed to the store is durable, and tells the
    /// core, as its loop does after a commit.
    fn settle(core: &mut Core) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let logged = core.logged;
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), core.store.durable(logged))
                .await
                .expect("durable within 20 s")
                .unwrap();
        });
        let now = core.now();
        core.gq.handle(now, GqEvent::Persisted(logged));
        core.drain().unwrap();
    }

    /// The next call dispatched to the worker.
    fn dispatched(events: &mut Events<WorkerEvent>) -> CallSpec {
        loop {
            if let WorkerEvent::Message(Down::Protocol(ToWorker::Dispatch { call, .. })) =
                events.try_recv().unwrap()
            {
                return call;
            }
        }
    }

    /// The worker's report that `call` answered the client with `value`.
    fn answered(call: &CallSpec, seq: u64, value: &'static [u8]) -> GatewayEvent {
        let effects = Effects {
            returns: vec![Return {
                cont: Cont::Client,
                value: Payload::new(value),
            }],
            ..Effects::default()
        };
        let report = Report {
            exec: call.exec,
            call: call.call,
            attempt: call.attempt,
            outcome: Outcome::Done(effects),
        };
        let msg = ToGateway::Progress {
            incarnation: INCARNATION,
            seq: Seq(seq),
            reports: vec![report],
        };
        GatewayEvent::Message(WORKER, msg.into())
    }

    /// The span the tests' invocations come under.
    fn client_span() -> TraceParent {
        TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap()
    }

    fn run(core: &mut Core, input: &'static [u8]) -> Run {
        run_keyed(core, input, None)
    }

    fn run_keyed(core: &mut Core, input: &'static [u8], key: Option<&str>) -> Run {
        let (reply, mut rx) = oneshot::channel();
        core.command(Command::Run {
            app: AppName::new("one").unwrap(),
            input: Payload::new(input),
            idempotency_key: key.map(str::to_owned),
            traceparent: client_span(),
            reply,
        });
        core.drain().unwrap();
        rx.try_recv().unwrap().unwrap()
    }

    #[test]
    fn an_answer_leaves_only_once_its_batch_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("gq.redb")).unwrap();
        let (mut core, _net, mut worker) = core_with_worker(store);
        let mut run = run(&mut core, b"3");
        let exec = run.invoked.exec;
        let call = dispatched(&mut worker);
        // The grain is told the execution's name as clients know it, and its place in the
        // trace: under the invocation's span.
        assert_eq!(call.exec_ref, core.refs.present(exec));
        assert_eq!(call.traceparent, client_span());
        core.event(answered(&call, 1, b"9"));
        core.drain().unwrap();

        // The queue holds the execution as done, in memory only: nobody may see it yet.
        let (reply, mut asked) = oneshot::channel();
        core.command(Command::Answer { exec, reply });
        let (reply, mut record) = oneshot::channel();
        core.command(Command::Execution { exec, reply });
        core.drain().unwrap();
        assert!(run.answer.try_recv().is_err(), "answered before durable");
        assert!(asked.try_recv().is_err(), "answered before durable");
        // Its acceptance rides with its answer (a synchronous run): the disk has neither.
        assert_eq!(record.try_recv().unwrap(), None);

        settle(&mut core);
        let expected = Some(Answer::Value(Payload::new(&b"9"[..])));
        assert_eq!(run.answer.try_recv().unwrap(), expected);
        assert_eq!(asked.try_recv().unwrap(), expected);
        assert_eq!(run.accepted.try_recv().unwrap().unwrap().exec, exec);
        // Ended durably: asked again, the answer comes at once.
        let (reply, mut again) = oneshot::channel();
        core.command(Command::Answer { exec, reply });
        assert_eq!(again.try_recv().unwrap(), expected);
    }

    #[test]
    fn a_removal_is_answered_only_once_durable_and_a_crash_keeps_app_and_bundle_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gq.redb");
        let (store, _) = Store::open(&path).unwrap();
        let (mut core, _net, _worker) = core_with_worker(store);
        let (reply, mut removed) = oneshot::channel();
        core.command(Command::Remove {
            app: AppName::new("one").unwrap(),
            reply,
        });
        core.drain().unwrap();
        assert!(
            removed.try_recv().is_err(),
            "the removal was answered before it was durable"
        );
        settle(&mut core);
        assert!(removed.try_recv().unwrap());
        // The app and its code left in one batch: a restart finds neither.
        drop(core);
        let (_, state) = Store::open(&path).unwrap();
        assert!(state.apps.is_empty(), "{:?}", state.apps);
    }

    #[test]
    fn a_sync_acceptance_rides_with_its_answer_and_an_async_one_commits_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // Deferred batches here never commit by the clock.
        let (store, _) =
            Store::open_with(&dir.path().join("gq.redb"), Duration::from_secs(3600)).unwrap();
        let (mut core, _net, mut worker) = core_with_worker(store);
        let before = core.store.stats().transactions;

        let mut run = run(&mut core, b"3");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            core.store.stats().transactions,
            before,
            "the acceptance committed alone"
        );
        let call = dispatched(&mut worker);
        core.event(answered(&call, 1, b"9"));
        core.drain().unwrap();
        settle(&mut core);
        assert!(run.answer.try_recv().unwrap().is_some());
        assert_eq!(
            core.store.stats().transactions,
            before + 1,
            "acceptance and answer share one commit"
        );

        // An asynchronous client is told the id once the acceptance is durable: at once.
        let (reply, mut accepted) = oneshot::channel();
        core.command(Command::Invoke {
            app: AppName::new("one").unwrap(),
            input: Payload::new(&b"4"[..]),
            idempotency_key: None,
            traceparent: TraceParent::default(),
            reply,
        });
        core.drain().unwrap();
        assert!(accepted.try_recv().is_err(), "accepted before durable");
        settle(&mut core);
        assert!(accepted.try_recv().unwrap().is_ok());
    }

    #[test]
    fn past_the_retention_age_an_ended_execution_its_key_and_traces_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("gq.redb")).unwrap();
        let config = GqConfig {
            retention: Duration::from_millis(100),
            ..GqConfig::default()
        };
        let (mut core, _net, mut worker) = core_configured(store, config);
        let mut ended = run_keyed(&mut core, b"3", Some("k"));
        let exec = ended.invoked.exec;
        let call = dispatched(&mut worker);
        core.event(answered(&call, 1, b"9"));
        core.drain().unwrap();
        let running = run(&mut core, b"4").invoked.exec;
        settle(&mut core);
        assert!(ended.answer.try_recv().unwrap().is_some());
        assert!(
            !core.store.traces(exec).unwrap().is_empty(),
            "no trace to forget"
        );

        // Not yet past the age: kept.
        core.expire();
        assert!(
            core.gq.execution(exec).is_some(),
            "forgotten before its age"
        );
        std::thread::sleep(Duration::from_millis(150));
        core.expire();
        core.drain().unwrap();
        settle(&mut core);
        assert_eq!(core.gq.execution(exec), None);
        assert_eq!(core.store.traces(exec).unwrap(), vec![]);
        assert!(
            core.gq.execution(running).is_some(),
            "a running one was forgotten"
        );
        // A late trace does not bring it back.
        let late = sand_protocol::wire::RunTrace {
            exec,
            call: call.call,
            attempt: call.attempt,
            grain: call.grain.clone(),
            dispatched: true,
            started_us: 1_000,
            ended_us: 2_000,
            traceparent: Default::default(),
            cold: false,
            error: None,
            stdout: Bytes::new(),
            stderr: Bytes::new(),
            input: sand_protocol::wire::Preview::of(&call.input),
            output: None,
            emitted: Vec::new(),
        };
        let trace = ServiceToGateway::Trace { runs: vec![late] };
        core.event(GatewayEvent::Message(WORKER, trace.into()));
        std::thread::sleep(10 * crate::store::DEFER_MAX);
        assert_eq!(core.store.traces(exec).unwrap(), vec![]);
        // Its key went with it: the same key starts a new execution.
        let again = run_keyed(&mut core, b"3", Some("k"));
        assert!(again.invoked.fresh);
        assert_ne!(again.invoked.exec, exec);
    }
}
