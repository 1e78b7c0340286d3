//! The gateway's core: one task that owns the [`GlobalQueue`] and feeds it everything that
//! happens (worker messages, disk commits, timers, client requests), then carries out what it
//! asks (writes, sends, answers).
//!
//! Everything else talks to the core through a [`CoreHandle`]: the HTTP API asks it to deploy,
//! invoke and look up; the transport feeds it worker events; the store reports its commits.
//! The core never blocks: writes go to the store's group-commit thread, sends are queued by the
//! transport, and a request waiting for a durable acceptance or an answer parks a oneshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sand_protocol::durable::{Answer, ExecRecord, LogIndex};
use sand_protocol::global_queue::{GlobalQueue, GqConfig, GqEvent, GqOutput, InvokeError, Invoked};
use sand_protocol::ids::{AppName, ExecId};
use sand_protocol::policy::AppSpec;
use sand_protocol::time::Time;
use sand_protocol::wire::{AppBundle, Payload, ToGateway, ToWorker};
use sand_transport_quic::seam::{Events, GatewayEvent, GatewaySender};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::trace::TraceBook;

/// A request to the core, from the HTTP API or the CLI.
#[derive(Debug)]
pub enum Command {
    /// Accept an execution; the reply comes once its acceptance is durable.
    Invoke {
        /// The app.
        app: AppName,
        /// The entry grain's input.
        input: Payload,
        /// Makes a retried request find the first execution.
        idempotency_key: Option<String>,
        /// The accepted execution, or why not.
        reply: oneshot::Sender<Result<Invoked, InvokeError>>,
    },
    /// Wait for an execution's answer; the reply comes when it ends (at once if it has).
    Answer {
        /// The execution.
        exec: ExecId,
        /// Its answer, or `None` if the execution is unknown.
        reply: oneshot::Sender<Option<Answer>>,
    },
    /// Deploy or replace an app whose bundle is already in the store; the reply comes once the
    /// deployment is durable.
    Deploy {
        /// The app's policies.
        spec: AppSpec,
        /// Its code, as stored.
        bundle: AppBundle,
        /// Done, or the store failed.
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Remove an app; its running executions go on. The caller deletes its bundle after.
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
    /// List the deployed apps.
    Apps {
        /// Each app's spec and bundle digest.
        reply: oneshot::Sender<Vec<(AppSpec, String)>>,
    },
    /// List the workers the gateway knows.
    Workers {
        /// Each worker's state.
        reply: oneshot::Sender<Vec<WorkerView>>,
    },
}

/// What the API shows of a worker.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerView {
    /// The worker's id.
    pub id: u32,
    /// Its current incarnation.
    pub incarnation: u64,
    /// Whether it is connected now.
    pub connected: bool,
    /// Whether its current incarnation was declared dead.
    pub dead: bool,
    /// Calls the gateway sees it owning.
    pub load: usize,
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
    started: Instant,
    metrics: Arc<Metrics>,
    bundles: BTreeMap<AppName, AppBundle>,
    /// Clients waiting for an acceptance to be durable, each with what `invoke` said.
    accepting: HashMap<ExecId, Vec<(Invoked, InvokeReply)>>,
    /// Clients waiting for an answer.
    answering: HashMap<ExecId, Vec<oneshot::Sender<Option<Answer>>>>,
    /// Deployments waiting for their batch to be durable.
    deploying: Vec<(LogIndex, oneshot::Sender<Result<(), StoreError>>)>,
    /// The index of the last batch handed to the store.
    logged: LogIndex,
    /// When each running execution was accepted, for the latency histogram.
    begun: HashMap<ExecId, Instant>,
    traces: TraceBook,
}

impl Core {
    /// Opens the store's state into a recovered queue.
    pub fn new(
        config: GqConfig,
        store: Arc<Store>,
        state: sand_protocol::durable::DurableState,
        sender: GatewaySender,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let mut bundles = BTreeMap::new();
        for app in state.apps.keys() {
            if let Some((digest, archive)) = store.bundle(app)? {
                bundles.insert(app.clone(), AppBundle { digest, archive });
            } else {
                tracing::warn!(%app, "app is deployed but its bundle is missing; redeploy it");
            }
        }
        let traces = TraceBook::new(&state);
        let started = Instant::now();
        let gq = GlobalQueue::recover(config, Time::from_millis(0), state);
        Ok(Self {
            gq,
            store,
            sender,
            started,
            metrics,
            bundles,
            accepting: HashMap::new(),
            answering: HashMap::new(),
            deploying: Vec::new(),
            logged: LogIndex(0),
            begun: HashMap::new(),
            traces,
        })
    }

    fn now(&self) -> Time {
        Time::from_millis(self.started.elapsed().as_millis() as u64)
    }

    /// Runs until every command sender is gone, or the store fails (an error: the gateway must
    /// stop, since it can no longer make anything durable).
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut events: Events<GatewayEvent>,
    ) -> Result<(), StoreError> {
        let mut commits = self.store.commits();
        self.drain()?;
        loop {
            let deadline = self
                .gq
                .poll_timeout()
                .map(|t| self.started + Duration::from_millis(t.as_millis()));
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
                    self.release_deployments(status.upto);
                }
                () = sleep => {
                    let now = self.now();
                    self.gq.handle_timeouts(now);
                }
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
                reply,
            } => match self.gq.invoke(now, &app, input, idempotency_key) {
                Ok(invoked) => {
                    if invoked.fresh {
                        self.begun.insert(invoked.exec, Instant::now());
                    }
                    let waiting = self.accepting.entry(invoked.exec).or_default();
                    waiting.push((invoked, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Answer { exec, reply } => match self.gq.execution(exec) {
                None => {
                    let _ = reply.send(None);
                }
                Some(rec) => match &rec.status {
                    sand_protocol::durable::ExecStatus::Done(answer) => {
                        let _ = reply.send(Some(answer.clone()));
                    }
                    sand_protocol::durable::ExecStatus::Running => {
                        self.answering.entry(exec).or_default().push(reply);
                    }
                },
            },
            Command::Deploy {
                spec,
                bundle,
                reply,
            } => {
                let app = spec.name.clone();
                self.bundles.insert(app.clone(), bundle);
                self.gq.deploy(spec);
                self.deploying.push((LogIndex(u64::MAX), reply));
                self.announce(app);
            }
            Command::Remove { app, reply } => {
                let known = self.gq.remove_app(&app);
                if known {
                    self.bundles.remove(&app);
                    self.announce(app);
                }
                let _ = reply.send(known);
            }
            Command::Execution { exec, reply } => {
                let _ = reply.send(self.gq.execution(exec).cloned());
            }
            Command::Apps { reply } => {
                let apps = self
                    .gq
                    .state()
                    .apps
                    .values()
                    .map(|spec| {
                        let digest = self
                            .bundles
                            .get(&spec.name)
                            .map(|b| b.digest.clone())
                            .unwrap_or_default();
                        (spec.clone(), digest)
                    })
                    .collect();
                let _ = reply.send(apps);
            }
            Command::Workers { reply } => {
                let workers = self
                    .gq
                    .state()
                    .workers
                    .iter()
                    .map(|(w, rec)| WorkerView {
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

    /// Tells every worker that an app changed, so none runs stale code.
    fn announce(&self, app: AppName) {
        for w in self.gq.state().workers.keys() {
            if self.gq.is_connected(*w) {
                let _ = self
                    .sender
                    .send(*w, ToWorker::AppChanged { app: app.clone() });
            }
        }
    }

    fn event(&mut self, ev: GatewayEvent) {
        let now = self.now();
        match ev {
            GatewayEvent::Connected(w) => {
                tracing::info!(worker = %w, "worker connected");
            }
            GatewayEvent::Disconnected(w) => {
                tracing::info!(worker = %w, "worker disconnected");
                self.gq.handle(now, GqEvent::Disconnected(w));
            }
            GatewayEvent::Message(w, ToGateway::Fetch { app }) => {
                let bundle = self.bundles.get(&app).cloned();
                if let Err(e) = self.sender.send(w, ToWorker::Bundle { app, bundle }) {
                    tracing::debug!(worker = %w, "bundle not sent: {e}");
                }
            }
            GatewayEvent::Message(w, ToGateway::Trace { runs }) => {
                let writes = self.traces.runs(w, runs, &self.metrics);
                if let Err(e) = self.store.put_traces(writes) {
                    tracing::warn!("could not record traces: {e}");
                }
            }
            GatewayEvent::Message(w, msg) => self.gq.handle(now, GqEvent::Message(w, msg)),
        }
    }

    /// Carries out everything the queue asks.
    fn drain(&mut self) -> Result<(), StoreError> {
        let mut traces = Vec::new();
        let outputs: Vec<GqOutput> = std::iter::from_fn(|| self.gq.poll_output()).collect();
        // Ownership first: a dispatch may come out before the batch that records it.
        for out in &outputs {
            if let GqOutput::Persist(batch) = out {
                self.traces.observe(&batch.ops);
            }
        }
        for out in outputs {
            match out {
                GqOutput::Persist(batch) => {
                    self.logged = batch.index;
                    self.store.append(batch)?;
                }
                GqOutput::Send(w, msg) => {
                    if let ToWorker::Dispatch { call, .. } = &msg {
                        self.metrics.gateway_hops.inc();
                        let t = self.traces.dispatched(w, call, wall_ms());
                        if t.recovery {
                            self.metrics.recoveries.inc();
                        }
                        traces.push(t.into_write(call.exec));
                    }
                    if let Err(e) = self.sender.send(w, msg) {
                        tracing::debug!(worker = %w, "not sent: {e}");
                    }
                }
                GqOutput::Accepted(exec) => {
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
                    if let Some(t0) = self.begun.remove(&exec) {
                        self.metrics
                            .execution_seconds
                            .observe(t0.elapsed().as_secs_f64());
                    }
                    self.traces.ended(exec);
                    for reply in self.answering.remove(&exec).unwrap_or_default() {
                        let _ = reply.send(Some(answer.clone()));
                    }
                }
            }
        }
        // A deployment waits for the batch its deploy closed: the last one logged.
        for (index, _) in self.deploying.iter_mut() {
            if index.0 == u64::MAX {
                *index = self.logged;
            }
        }
        if !traces.is_empty() {
            if let Err(e) = self.store.put_traces(traces) {
                tracing::warn!("could not record traces: {e}");
            }
        }
        Ok(())
    }

    fn release_deployments(&mut self, durable: LogIndex) {
        let (done, waiting) = std::mem::take(&mut self.deploying)
            .into_iter()
            .partition(|(index, _)| *index <= durable);
        self.deploying = waiting;
        for (_, reply) in done {
            let _ = reply.send(Ok(()));
        }
    }
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
