//! The simulated cluster: one gateway and many workers running the real `GlobalQueue` and
//! `LocalBus`, with the gateway's disk, the network between them (every message in flight can
//! be delivered next, dropped with its connection, or held by a partition), the clients with
//! their idempotency keys, the grains' runtime and the clock. It runs a schedule's steps,
//! injects their faults, and tells the [`Checker`] what it observes: every output, every write,
//! what clients are told and shown, every attempt started.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use sand_protocol::disk::MemDisk;
use sand_protocol::durable::{Answer, Batch, DurableState, ExecStatus};
use sand_protocol::global_queue::{GlobalQueue, GqConfig, GqEvent, GqOutput, GqTimer};
use sand_protocol::ids::{ExecId, Incarnation, WorkerId};
use sand_protocol::local_bus::{GrainResult, LbConfig, LbEvent, LbOutput, LocalBus};
use sand_protocol::mutations::Mutations;
use sand_protocol::policy::AppSpec;
use sand_protocol::time::Time;
use sand_protocol::trace_context::TraceParent;
use sand_protocol::wire::{CallSpec, ToGateway, ToWorker};
use serde::{Deserialize, Serialize};

use super::check::{Checker, Failure, Fenced, Property, Record, Verdict};
use super::schedule::{app, bundle, number, spare, Program, Schedule, SimConfig, Step};
use super::{describe_gq, describe_lb, Fnv, RunStats};

/// Faults injected, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    /// Connections broken (partitions and crashes included).
    pub connection_breaks: u64,
    /// Messages lost on a live connection, as an overflowing queue loses them: each closed its
    /// connection, as the transport's contract says.
    pub overflows: u64,
    /// Messages lost with their connection.
    pub messages_dropped: u64,
    /// Workers cut off from the gateway for a while.
    pub partitions: u64,
    /// Worker crashes (each followed by a restart as a new incarnation, unless the worker is
    /// lost for good).
    pub worker_crashes: u64,
    /// Worker crashes after which the worker restarted as an incarnation it had already used.
    pub incarnations_reused: u64,
    /// Workers crashed for good (never restarted).
    pub workers_lost: u64,
    /// Gateway crashes (each followed by recovery from the disk).
    pub gateway_crashes: u64,
    /// Batches lost because the gateway crashed before writing them.
    pub batches_lost: u64,
    /// Failure-detector timers fired early for a live worker.
    pub false_suspicions: u64,
    /// Other timers fired before their deadline.
    pub early_timers: u64,
    /// Attempts that failed by the grain program (retried or final).
    pub grain_errors: u64,
    /// Requests sent again with the same idempotency key.
    pub requests_retried: u64,
}

impl FaultCounts {
    /// Each kind with its name and count, in a fixed order.
    pub fn by_kind(&self) -> [(&'static str, u64); 13] {
        [
            ("connection breaks", self.connection_breaks),
            ("overflows", self.overflows),
            ("messages dropped", self.messages_dropped),
            ("partitions", self.partitions),
            ("worker crashes", self.worker_crashes),
            ("incarnations reused", self.incarnations_reused),
            ("workers lost", self.workers_lost),
            ("gateway crashes", self.gateway_crashes),
            ("batches lost", self.batches_lost),
            ("false suspicions", self.false_suspicions),
            ("timers fired early", self.early_timers),
            ("grain errors", self.grain_errors),
            ("requests retried", self.requests_retried),
        ]
    }

    /// Adds another count to this one.
    pub fn add(&mut self, other: &FaultCounts) {
        self.connection_breaks += other.connection_breaks;
        self.overflows += other.overflows;
        self.messages_dropped += other.messages_dropped;
        self.partitions += other.partitions;
        self.worker_crashes += other.worker_crashes;
        self.incarnations_reused += other.incarnations_reused;
        self.workers_lost += other.workers_lost;
        self.gateway_crashes += other.gateway_crashes;
        self.batches_lost += other.batches_lost;
        self.false_suspicions += other.false_suspicions;
        self.early_timers += other.early_timers;
        self.grain_errors += other.grain_errors;
        self.requests_retried += other.requests_retried;
    }
}

/// How many actions the liveness phase may take before it is called a livelock.
const LIVENESS_ACTIONS_MAX: u64 = 2_000_000;

type Checked = Result<(), Failure>;

/// A message in flight on a worker's connection.
enum Msg {
    Up(ToGateway),
    Down(ToWorker),
}

struct Envelope {
    worker: usize,
    msg: Msg,
}

/// A simulated worker host: its local bus (none while crashed), the attempts its runtime runs,
/// and its connection.
struct Node {
    lb: Option<LocalBus>,
    /// The last incarnation used, persisted by the worker so a restart picks a larger one.
    incarnation: Incarnation,
    running: Vec<CallSpec>,
    connected: bool,
    /// While crashed: when it restarts.
    restart_at: Time,
    /// Until when it cannot reach the gateway.
    partitioned_until: Time,
    /// Crashed for good: it never restarts.
    lost: bool,
}

/// A client's request: its idempotency key is `r` and its index. The client sends it again with
/// that key whenever it cannot know whether the gateway kept it.
struct Request {
    input: u32,
    /// The execution the gateway last named for it, and in which of the gateway's lives.
    exec: Option<(ExecId, u64)>,
}

/// The span request `r`'s client invokes under: its own trace.
fn invocation_span(r: usize) -> TraceParent {
    let mut trace = [0xa5; 16];
    trace[..8].copy_from_slice(&(r as u64 + 1).to_be_bytes());
    TraceParent::new(trace, [0x5a; 8], true)
}

fn request_key(r: usize) -> String {
    format!("r{r}")
}

/// The simulated cluster: a gateway and its disk, the workers, the network between them, the
/// clients and the clock. It runs a schedule's steps, injects its faults, and tells the
/// [`Checker`] what it observes.
pub(super) struct World {
    config: SimConfig,
    program: Program,
    gq_config: GqConfig,
    lb_config: LbConfig,
    /// The deliberate bugs switched on in every state machine the run makes.
    mutations: Mutations,
    now: Time,
    gq: Option<GlobalQueue>,
    /// The gateway's life: bumped by every recovery.
    life: u64,
    gateway_restart_at: Time,
    /// The gateway's disk: the batches its queue handed out, and what it wrote.
    disk: MemDisk,
    nodes: Vec<Node>,
    net: Vec<Envelope>,
    /// Every request made, in order.
    requests: Vec<Request>,
    /// Requests waiting for the gateway to come back, to be sent (again).
    waiting: Vec<usize>,
    /// Executions whose clients have their answer.
    answered: BTreeSet<ExecId>,
    faults: FaultCounts,
    executions: u64,
    step: Option<usize>,
    checker: Checker,
    pub(super) hash: Fnv,
    pub(super) trace: Option<Vec<String>>,
}

impl World {
    pub(super) fn new(schedule: &Schedule, tracing: bool) -> Self {
        let config = schedule.config.clone();
        let gq_config = GqConfig {
            failure_timeout: Duration::from_secs(5),
            timeout_grace: Duration::from_secs(1),
            held_max: 64,
            ..GqConfig::default()
        };
        let lb_config = LbConfig {
            worker: WorkerId(0),
            resend_interval: Duration::from_secs(1),
            overload_threshold: config.overload_threshold,
            window: config.window.max(1),
            message_weight_max: config.message_weight_max,
        };
        let nodes = (0..config.workers.max(1))
            .map(|_| Node {
                lb: None,
                incarnation: Incarnation(0),
                running: Vec::new(),
                connected: false,
                restart_at: Time::ZERO,
                partitioned_until: Time::ZERO,
                lost: false,
            })
            .collect();
        Self {
            config,
            program: schedule.program,
            gq_config,
            lb_config,
            mutations: schedule.config.mutations,
            now: Time::ZERO,
            gq: None,
            life: 0,
            gateway_restart_at: Time::ZERO,
            disk: MemDisk::default(),
            nodes,
            net: Vec::new(),
            requests: Vec::new(),
            waiting: Vec::new(),
            answered: BTreeSet::new(),
            faults: FaultCounts::default(),
            executions: 0,
            step: None,
            checker: Checker::new(schedule.program),
            hash: Fnv::default(),
            trace: tracing.then(Vec::new),
        }
    }

    pub(super) fn run(&mut self, steps: &[Step]) -> Result<RunStats, Failure> {
        self.setup()?;
        for (i, step) in steps.iter().enumerate() {
            self.step = Some(i);
            step.hash(&mut self.hash);
            let now = self.now;
            self.note(|| format!("#{i} t={}ms {step:?}", now.as_millis()));
            self.apply(*step)?;
            self.check_calls_owned()?;
            self.check_look_ups()?;
        }
        self.step = None;
        self.note(|| "-- the faults stop: heal everything, then require liveness".to_string());
        self.heal_and_finish()?;
        self.now.as_millis().hash(&mut self.hash);
        Ok(RunStats {
            steps: steps.len(),
            executions: self.executions,
            answered: self.checker.answered(),
            faults: self.faults,
            sim_ms: self.now.as_millis(),
            trace_hash: self.hash.finish(),
        })
    }

    /// A fresh cluster: the app deployed durably, every worker connected.
    fn setup(&mut self) -> Checked {
        let gq = GlobalQueue::new(self.gq_config, Time::ZERO).with_mutations(self.mutations);
        self.gq = Some(gq);
        self.drain_gq()?;
        self.checker.change_asked(true);
        if let Some(gq) = self.gq.as_mut() {
            gq.deploy(self.program.app_spec(), bundle("app"));
        }
        self.drain_gq()?;
        self.persist(usize::MAX)?;
        for w in 0..self.nodes.len() {
            self.restart_worker(w)?;
        }
        Ok(())
    }

    fn apply(&mut self, step: Step) -> Checked {
        let n = self.nodes.len();
        let w = |x: u8| usize::from(x) % n;
        match step {
            Step::Invoke(input) => self.invoke(input),
            Step::Deliver(i) => self.deliver(usize::from(i)),
            Step::Finish(i) => self.finish_any(usize::from(i)),
            Step::Persist(count) => self.persist(usize::from(count)),
            Step::Tick(ms) => self.tick(u64::from(ms)),
            Step::Break(x) => {
                if self.break_connection(w(x))? {
                    self.faults.connection_breaks += 1;
                }
                Ok(())
            }
            Step::Overflow(i) => {
                let Some(lost) = (!self.net.is_empty()).then(|| usize::from(i) % self.net.len())
                else {
                    return Ok(());
                };
                let worker = self.net[lost].worker;
                self.note(|| format!("  w{worker}: a message overflows its queue"));
                self.faults.overflows += 1;
                if self.break_connection(worker)? {
                    self.faults.connection_breaks += 1;
                }
                Ok(())
            }
            Step::Partition { worker, ms } => self.partition(w(worker), u64::from(ms)),
            Step::CrashWorker { worker, down_ms } => {
                self.crash_worker(w(worker), u64::from(down_ms))
            }
            Step::CrashWorkerForgetful { worker, down_ms } => {
                let w = w(worker);
                if self.nodes[w].lb.is_none() {
                    return Ok(());
                }
                self.crash_worker(w, u64::from(down_ms))?;
                let node = &mut self.nodes[w];
                node.incarnation = Incarnation(node.incarnation.0.saturating_sub(1));
                self.faults.incarnations_reused += 1;
                self.note(|| format!("  w{w}: lost the record of its last incarnation"));
                Ok(())
            }
            Step::CrashGateway { persisted, down_ms } => {
                self.crash_gateway(usize::from(persisted), u64::from(down_ms))
            }
            Step::Suspect(x) => self.suspect(w(x)),
            Step::KillWorker(x) => self.kill_worker(w(x)),
            Step::Retry(i) => {
                if self.requests.is_empty() {
                    return Ok(());
                }
                let r = usize::from(i) % self.requests.len();
                self.send_request(r)
            }
            Step::FireGqTimer(i) => self.fire_gq_timer(usize::from(i)),
            Step::ChangeApp(deploy) => self.change_app(deploy),
            Step::Poll(i) => {
                if self.requests.is_empty() {
                    return Ok(());
                }
                self.poll(usize::from(i) % self.requests.len())
            }
            Step::FireLbTimer { worker, timer } => {
                self.fire_lb_timer(w(worker), usize::from(timer))
            }
        }
    }

    fn fail(&self, property: Property, message: String) -> Failure {
        Failure {
            property,
            step: self.step,
            at_ms: self.now.as_millis(),
            message,
        }
    }

    /// Turns the checker's verdict into the run's, with when it was violated.
    fn checked(&self, verdict: Verdict) -> Checked {
        verdict.map_err(|v| self.fail(v.property, v.message))
    }

    /// Whether every pending call has a live owner or is about to be placed, as the gateway's
    /// record, timers and connections show.
    fn check_calls_owned(&self) -> Checked {
        let Some(gq) = self.gq.as_ref() else {
            return Ok(());
        };
        let record = Record {
            state: gq.state(),
            placeable: (0..self.nodes.len()).any(|w| gq.is_connected(WorkerId(w as u32))),
            retrying: gq
                .timers()
                .filter_map(|(t, _)| match t {
                    GqTimer::Retry(key) => Some(key),
                    _ => None,
                })
                .collect(),
        };
        self.checked(record.calls_owned())
    }

    /// Whether a look-up of every execution confirmed or answered shows it, with its answer.
    fn check_look_ups(&self) -> Checked {
        let Some(gq) = self.gq.as_ref() else {
            return Ok(());
        };
        let shown = |exec| gq.execution(exec).map(|e| &e.status);
        self.checked(self.checker.look_ups(shown))
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = self.trace.as_mut() {
            trace.push(line());
        }
    }

    // --- the gateway ---------------------------------------------------------------------------

    fn drain_gq(&mut self) -> Checked {
        let Some(gq) = self.gq.as_mut() else {
            return Ok(());
        };
        let outputs: Vec<GqOutput> = std::iter::from_fn(|| gq.poll_output()).collect();
        self.checker.outputs(&outputs);
        for out in outputs {
            out.hash(&mut self.hash);
            self.note(|| describe_gq(&out));
            let verdict = self.checker.output(self.disk.durable(), &out);
            self.checked(verdict)?;
            match out {
                GqOutput::Persist(batch) => self.disk.take(batch),
                GqOutput::Send(w, msg) => {
                    let worker = w.0 as usize;
                    if self.nodes.get(worker).is_some_and(|n| n.connected) {
                        self.net.push(Envelope {
                            worker,
                            msg: Msg::Down(msg),
                        });
                    }
                }
                // Checked: durable when they leave.
                GqOutput::ConfirmInvoke(_)
                | GqOutput::ConfirmDeploy(_)
                | GqOutput::ConfirmRemove { .. } => {}
                GqOutput::Respond(exec, answer) => self.on_answer(exec, answer)?,
            }
        }
        Ok(())
    }

    fn gq_handle(&mut self, event: GqEvent) -> Checked {
        let now = self.now;
        if let Some(gq) = self.gq.as_mut() {
            gq.handle(now, event);
        }
        self.drain_gq()
    }

    /// An operator deploys or removes the spare app (nothing, while the gateway is down).
    fn change_app(&mut self, deploy: bool) -> Checked {
        let Some(gq) = self.gq.as_mut() else {
            return Ok(());
        };
        self.checker
            .change_asked(deploy || gq.state().apps.contains_key(&spare()));
        if deploy {
            let spec = AppSpec {
                name: spare(),
                ..self.program.app_spec()
            };
            gq.deploy(spec, bundle("spare"));
        } else {
            gq.remove_app(&spare());
        }
        self.drain_gq()
    }

    /// Request `r`'s client looks its execution up, as `GET /v1/executions/{id}` does: an
    /// answer it shows must be on disk, and the one given, if one was.
    fn poll(&mut self, r: usize) -> Checked {
        let (Some(gq), Some((exec, _))) = (self.gq.as_ref(), self.requests[r].exec) else {
            return Ok(());
        };
        let Some(ExecStatus::Done(shown)) = gq.execution(exec).map(|e| &e.status) else {
            return Ok(());
        };
        self.checked(self.checker.looked_up(self.disk.durable(), exec, shown))
    }

    /// A client is told its execution's answer.
    fn on_answer(&mut self, exec: ExecId, answer: Answer) -> Checked {
        let verdict = self.checker.answer(exec, answer);
        self.checked(verdict)?;
        self.answered.insert(exec);
        Ok(())
    }

    /// A new request.
    fn invoke(&mut self, input: u32) -> Checked {
        self.requests.push(Request { input, exec: None });
        self.send_request(self.requests.len() - 1)
    }

    /// Sends request `r` with its idempotency key, or queues it until the gateway is back.
    fn send_request(&mut self, r: usize) -> Checked {
        let now = self.now;
        let Some(gq) = self.gq.as_mut() else {
            if !self.waiting.contains(&r) {
                self.waiting.push(r);
            }
            return Ok(());
        };
        let Request { input, exec: named } = self.requests[r];
        let key = request_key(r);
        let traceparent = invocation_span(r);
        let invoked = gq.invoke(
            now,
            &app(),
            number(i64::from(input)),
            Some(key.clone()),
            traceparent,
        );
        let invoked = match invoked {
            Ok(invoked) => invoked,
            Err(e) => {
                let why = format!("the gateway refused an invocation of the deployed app: {e}");
                return Err(self.fail(Property::Accepts, why));
            }
        };
        let exec = invoked.exec;
        self.checker.invoked(exec, traceparent);
        if named.is_some() {
            self.faults.requests_retried += 1;
        }
        self.note(|| format!("  client: request {key} with {input} named {exec:?}"));
        let verdict = self.checker.named(r, &key, input, exec, self.life);
        self.checked(verdict)?;
        self.requests[r].exec = Some((exec, self.life));
        if invoked.fresh {
            self.executions += 1;
        }
        self.drain_gq()
    }

    /// Writes the first `count` unwritten batches and tells the gateway.
    fn persist(&mut self, count: usize) -> Checked {
        let Some(gq) = self.gq.as_mut() else {
            return Ok(());
        };
        let (checker, trace) = (&mut self.checker, &mut self.trace);
        let flushed = self.disk.flush(gq, self.now, count, |store, batch| {
            write(checker, trace, store, batch)
        });
        match flushed {
            Ok(true) => self.drain_gq(),
            Ok(false) => Ok(()),
            Err(v) => Err(self.fail(v.property, v.message)),
        }
    }

    fn crash_gateway(&mut self, persisted: usize, down_ms: u64) -> Checked {
        if self.gq.is_none() {
            return Ok(());
        }
        let keep = persisted.min(self.disk.unwritten());
        let (checker, trace) = (&mut self.checker, &mut self.trace);
        let written = self.disk.write(persisted, |store, batch| {
            write(checker, trace, store, batch)
        });
        self.checked(written.map(drop))?;
        self.faults.batches_lost += self.disk.crash() as u64;
        self.faults.gateway_crashes += 1;
        self.gq = None;
        self.checker.gateway_crashed();
        self.note(|| format!("  gateway: crashed after writing {keep} batches"));
        for w in 0..self.nodes.len() {
            if self.break_connection(w)? {
                self.faults.connection_breaks += 1;
            }
        }
        self.gateway_restart_at = self.now + Duration::from_millis(down_ms);
        // Every client still waiting for its answer lost its connection, and cannot know
        // whether its request was kept: it sends it again, with the same key, once the gateway
        // is back. The crash may lose an execution whose acceptance was not durable (the retry
        // then starts afresh), never one that was.
        for r in 0..self.requests.len() {
            let answered = self.requests[r]
                .exec
                .is_some_and(|(e, _)| self.answered.contains(&e));
            if !answered && !self.waiting.contains(&r) {
                self.waiting.push(r);
            }
        }
        Ok(())
    }

    fn restart_gateway(&mut self) -> Checked {
        if self.gq.is_some() {
            return Ok(());
        }
        let gq = GlobalQueue::recover(self.gq_config, self.now, self.disk.durable().clone())
            .with_mutations(self.mutations);
        self.gq = Some(gq);
        self.life += 1;
        self.note(|| "  gateway: recovered from the disk".to_string());
        // An execution that ended durably while its answer waited for the crashed gateway to
        // learn so is never answered again: its client reads the answer from the durable record
        // (the status API). It is checked like any other.
        let ended: Vec<(ExecId, Answer)> = self
            .disk
            .durable()
            .execs
            .values()
            .filter(|e| !self.answered.contains(&e.exec))
            .filter_map(|e| match &e.status {
                ExecStatus::Done(answer) => Some((e.exec, answer.clone())),
                ExecStatus::Running => None,
            })
            .collect();
        for (exec, answer) in ended {
            self.note(|| format!("  client: reads {exec:?} answered {answer:?} from the record"));
            self.on_answer(exec, answer)?;
        }
        self.drain_gq()?;
        for w in 0..self.nodes.len() {
            self.connect(w)?;
        }
        self.check_look_ups()?;
        for r in std::mem::take(&mut self.waiting) {
            self.send_request(r)?;
        }
        Ok(())
    }

    fn deliver(&mut self, i: usize) -> Checked {
        if self.net.is_empty() {
            return Ok(());
        }
        let Envelope { worker, msg } = self.net.remove(i % self.net.len());
        match msg {
            Msg::Up(msg) => self.deliver_to_gq(worker, msg),
            Msg::Down(msg) => {
                self.note(|| format!("  w{worker} receives: {msg:?}"));
                self.lb_handle(worker, LbEvent::Message(msg))
            }
        }
    }

    fn deliver_to_gq(&mut self, worker: usize, msg: ToGateway) -> Checked {
        if !matches!(msg, ToGateway::Heartbeat { .. }) {
            self.note(|| format!("  gq receives from w{worker}: {msg:?}"));
        }
        let Some(gq) = self.gq.as_ref() else {
            return Ok(()); // Cannot happen: messages die with the gateway's connections.
        };
        let wid = WorkerId(worker as u32);
        let fenced = Fenced::of(gq.state(), wid, &msg).map(|f| (f, fingerprint(gq)));
        self.gq_handle(GqEvent::Message(wid, msg))?;
        match (fenced, self.gq.as_ref()) {
            (Some((fenced, before)), Some(gq)) => {
                self.checked(fenced.unchanged(before, fingerprint(gq)))
            }
            _ => Ok(()),
        }
    }

    fn suspect(&mut self, w: usize) -> Checked {
        let timer = GqTimer::Suspect(WorkerId(w as u32));
        let Some(gq) = self.gq.as_ref() else {
            return Ok(());
        };
        if !gq.timers().any(|(t, _)| t == timer) {
            return Ok(());
        }
        if self.nodes[w].lb.is_some() {
            self.faults.false_suspicions += 1;
        } else {
            self.faults.early_timers += 1;
        }
        self.fire_gq(timer)
    }

    fn fire_gq_timer(&mut self, i: usize) -> Checked {
        let Some(gq) = self.gq.as_ref() else {
            return Ok(());
        };
        let timers: Vec<GqTimer> = gq.timers().map(|(t, _)| t).collect();
        let Some(timer) = timers.get(i % timers.len().max(1)).copied() else {
            return Ok(());
        };
        let alive = |w: WorkerId| self.nodes.get(w.0 as usize).is_some_and(|n| n.lb.is_some());
        match timer {
            GqTimer::Suspect(w) if alive(w) => self.faults.false_suspicions += 1,
            _ => self.faults.early_timers += 1,
        }
        self.fire_gq(timer)
    }

    /// Fires one gateway timer, noting a deadline.
    fn fire_gq(&mut self, timer: GqTimer) -> Checked {
        self.checker.timer_fired(timer);
        self.note(|| format!("  gq: timer {timer:?} fires"));
        self.gq_handle(GqEvent::Timeout(timer))
    }

    /// Fires the due gateway timers one by one (one may cancel a later one), then the due worker
    /// timers; `deadlines` says whether gateway `Deadline` timers fire too.
    fn fire_due(&mut self, deadlines: bool) -> Checked {
        let now = self.now;
        let due: Vec<GqTimer> = self.gq.as_ref().map_or_else(Vec::new, |gq| {
            gq.timers()
                .filter(|(t, at)| *at <= now && (deadlines || !matches!(t, GqTimer::Deadline(..))))
                .map(|(t, _)| t)
                .collect()
        });
        for timer in due {
            let set = self
                .gq
                .as_ref()
                .is_some_and(|gq| gq.timers().any(|(t, _)| t == timer));
            if set {
                self.fire_gq(timer)?;
            }
        }
        for w in 0..self.nodes.len() {
            if let Some(lb) = self.nodes[w].lb.as_mut() {
                lb.handle_timeouts(now);
            }
            self.drain_lb(w)?;
        }
        Ok(())
    }

    // --- the workers ---------------------------------------------------------------------------

    fn drain_lb(&mut self, w: usize) -> Checked {
        let Some(lb) = self.nodes[w].lb.as_mut() else {
            return Ok(());
        };
        let outputs: Vec<LbOutput> = std::iter::from_fn(|| lb.poll_output()).collect();
        for out in outputs {
            out.hash(&mut self.hash);
            if !matches!(out, LbOutput::Send(ToGateway::Heartbeat { .. })) {
                self.note(|| describe_lb(w, &out));
            }
            match out {
                LbOutput::Send(msg) => {
                    if self.nodes[w].connected {
                        self.net.push(Envelope {
                            worker: w,
                            msg: Msg::Up(msg),
                        });
                    }
                }
                LbOutput::Run(spec) => {
                    let verdict = self.checker.started(w, self.nodes[w].incarnation, &spec);
                    self.checked(verdict)?;
                    self.nodes[w].running.push(spec);
                }
                LbOutput::Abort(run) => {
                    let node = &mut self.nodes[w];
                    node.running.retain(|s| s.run_key() != run);
                }
                LbOutput::PersistIncarnation(i) => {
                    self.nodes[w].incarnation = i;
                    self.checker.new_incarnation(w);
                }
            }
        }
        Ok(())
    }

    fn lb_handle(&mut self, w: usize, event: LbEvent) -> Checked {
        let now = self.now;
        if let Some(lb) = self.nodes[w].lb.as_mut() {
            lb.handle(now, event);
        }
        self.drain_lb(w)
    }

    /// Finishes the `i`-th running attempt, counted across workers.
    fn finish_any(&mut self, i: usize) -> Checked {
        let total: usize = self.nodes.iter().map(|n| n.running.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let mut i = i % total;
        for w in 0..self.nodes.len() {
            let len = self.nodes[w].running.len();
            if i < len {
                return self.finish(w, i);
            }
            i -= len;
        }
        Ok(())
    }

    fn finish(&mut self, w: usize, i: usize) -> Checked {
        let spec = self.nodes[w].running.remove(i);
        let result = self.program.run(&spec);
        if matches!(result, GrainResult::Error(_)) {
            self.faults.grain_errors += 1;
        }
        self.note(|| {
            format!(
                "  w{w}: {:?} {:?} {:?} ({}) finished: {result:?}",
                spec.exec, spec.call, spec.attempt, spec.grain
            )
        });
        let run = spec.run_key();
        self.lb_handle(w, LbEvent::Finished { run, result })
    }

    /// Breaks a worker's connection, dropping what is in flight on it. Returns whether it was up.
    fn break_connection(&mut self, w: usize) -> Result<bool, Failure> {
        let before = self.net.len();
        self.net.retain(|e| e.worker != w);
        self.faults.messages_dropped += (before - self.net.len()) as u64;
        if !self.nodes[w].connected {
            return Ok(false);
        }
        self.note(|| format!("  w{w}: connection broken"));
        self.nodes[w].connected = false;
        self.lb_handle(w, LbEvent::Disconnected)?;
        self.gq_handle(GqEvent::Disconnected(WorkerId(w as u32)))?;
        Ok(true)
    }

    fn connect(&mut self, w: usize) -> Checked {
        let node = &self.nodes[w];
        if self.gq.is_none() || node.lb.is_none() || node.connected {
            return Ok(());
        }
        if self.now < node.partitioned_until {
            return Ok(());
        }
        self.nodes[w].connected = true;
        self.note(|| format!("  w{w}: connected"));
        self.lb_handle(w, LbEvent::Connected)
    }

    fn partition(&mut self, w: usize, ms: u64) -> Checked {
        if self.break_connection(w)? {
            self.faults.connection_breaks += 1;
        }
        let until = self.now + Duration::from_millis(ms);
        let node = &mut self.nodes[w];
        node.partitioned_until = node.partitioned_until.max(until);
        self.faults.partitions += 1;
        Ok(())
    }

    fn crash_worker(&mut self, w: usize, down_ms: u64) -> Checked {
        if self.nodes[w].lb.is_none() {
            return Ok(());
        }
        if self.break_connection(w)? {
            self.faults.connection_breaks += 1;
        }
        let restart_at = self.now + Duration::from_millis(down_ms);
        let node = &mut self.nodes[w];
        node.lb = None;
        node.running.clear();
        node.restart_at = restart_at;
        self.faults.worker_crashes += 1;
        self.note(|| format!("  w{w}: crashed"));
        Ok(())
    }

    fn restart_worker(&mut self, w: usize) -> Checked {
        let node = &mut self.nodes[w];
        if node.lb.is_some() || node.lost {
            return Ok(());
        }
        node.incarnation = node.incarnation.next();
        let incarnation = node.incarnation;
        let config = LbConfig {
            worker: WorkerId(w as u32),
            ..self.lb_config
        };
        node.lb = Some(LocalBus::new(config, incarnation).with_mutations(self.mutations));
        self.checker.new_incarnation(w);
        self.note(|| format!("  w{w}: started as {incarnation:?}"));
        self.connect(w)
    }

    /// Crashes a worker for good, unless `workers - 1` have been lost already.
    fn kill_worker(&mut self, w: usize) -> Checked {
        let lost = self.nodes.iter().filter(|n| n.lost).count();
        if self.nodes[w].lost || lost + 1 >= self.nodes.len() {
            return Ok(());
        }
        self.crash_worker(w, 0)?;
        self.nodes[w].lost = true;
        self.faults.workers_lost += 1;
        self.note(|| format!("  w{w}: lost for good"));
        Ok(())
    }

    fn fire_lb_timer(&mut self, w: usize, i: usize) -> Checked {
        let Some(lb) = self.nodes[w].lb.as_ref() else {
            return Ok(());
        };
        let timers: Vec<_> = lb.timers().map(|(t, _)| t).collect();
        let Some(timer) = timers.get(i % timers.len().max(1)).copied() else {
            return Ok(());
        };
        self.faults.early_timers += 1;
        self.note(|| format!("  w{w}: timer {timer:?} fires"));
        self.lb_handle(w, LbEvent::Timeout(timer))
    }

    // --- time ----------------------------------------------------------------------------------

    fn tick(&mut self, ms: u64) -> Checked {
        self.now = self.now + Duration::from_millis(ms);
        if self.gq.is_none() && self.now >= self.gateway_restart_at {
            self.restart_gateway()?;
        }
        for w in 0..self.nodes.len() {
            if self.nodes[w].lb.is_none() && self.now >= self.nodes[w].restart_at {
                self.restart_worker(w)?;
            }
            self.connect(w)?;
        }
        self.fire_due(true)
    }

    /// Moves time to the next timer other than a gateway deadline and fires what is due.
    /// Returns false if no such timer is set.
    fn advance_time(&mut self) -> Result<bool, Failure> {
        let mut next = self.gq.as_ref().and_then(|gq| {
            gq.timers()
                .filter(|(t, _)| !matches!(t, GqTimer::Deadline(..)))
                .map(|(_, at)| at)
                .min()
        });
        for node in &self.nodes {
            if let Some(at) = node.lb.as_ref().and_then(LocalBus::poll_timeout) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        let Some(next) = next else {
            return Ok(false);
        };
        self.now = self.now.max(next);
        self.fire_due(false)?;
        Ok(true)
    }

    // --- healing and liveness ------------------------------------------------------------------

    /// Heals every fault but the loss of workers, then runs the cluster with no more faults,
    /// delivering in order and moving time to the next timer when nothing else moves, until
    /// every request and every running execution is answered and every remaining worker's
    /// backlog is empty; or fails.
    fn heal_and_finish(&mut self) -> Checked {
        for node in &mut self.nodes {
            node.partitioned_until = Time::ZERO;
        }
        self.restart_gateway()?;
        for w in 0..self.nodes.len() {
            self.restart_worker(w)?;
            self.connect(w)?;
        }
        let healed_at = self.now;
        // Every request now names an execution of this gateway life or one the disk holds: a
        // request whose execution a crash lost was sent again when the gateway came back.
        let mut must: BTreeSet<ExecId> = self
            .requests
            .iter()
            .filter_map(|r| r.exec.map(|(e, _)| e))
            .collect();
        if let Some(gq) = self.gq.as_ref() {
            let running = gq.state().execs.values();
            must.extend(
                running
                    .filter(|e| e.status == ExecStatus::Running)
                    .map(|e| e.exec),
            );
        }
        let limit = healed_at + Duration::from_millis(self.config.liveness_ms_max);
        for _ in 0..LIVENESS_ACTIONS_MAX {
            self.check_calls_owned()?;
            if self.disk.unwritten() > 0 {
                self.persist(usize::MAX)?;
                continue;
            }
            if !self.net.is_empty() {
                self.deliver(0)?;
                continue;
            }
            if let Some(w) = self.nodes.iter().position(|n| !n.running.is_empty()) {
                self.finish(w, 0)?;
                continue;
            }
            let answered = must.iter().all(|e| self.answered.contains(e));
            let drained = self
                .nodes
                .iter()
                .all(|n| n.lost || n.lb.as_ref().is_some_and(|lb| lb.backlog() == (0, 0)));
            if answered && drained {
                return self.check_look_ups();
            }
            if self.now > limit || !self.advance_time()? {
                let why = self.stall_report(&must, healed_at);
                return Err(self.fail(Property::Liveness, why));
            }
        }
        let why = format!(
            "no quiescence after {LIVENESS_ACTIONS_MAX} actions: {}",
            self.stall_report(&must, healed_at)
        );
        Err(self.fail(Property::Liveness, why))
    }

    fn stall_report(&self, must: &BTreeSet<ExecId>, healed_at: Time) -> String {
        let missing: Vec<ExecId> = must
            .iter()
            .filter(|e| !self.answered.contains(e))
            .copied()
            .collect();
        let mut out = format!(
            "{} of {} owed executions unanswered {} ms after healing",
            missing.len(),
            must.len(),
            self.now.as_millis() - healed_at.as_millis()
        );
        if let Some(gq) = self.gq.as_ref() {
            for exec in missing.iter().take(3) {
                let calls: Vec<String> = gq
                    .state()
                    .calls
                    .values()
                    .filter(|c| c.exec == *exec)
                    .map(|c| {
                        format!(
                            "{:?} {} {:?} owner {:?}",
                            c.call, c.grain, c.attempt, c.owner
                        )
                    })
                    .collect();
                out += &format!("; {exec:?} pending: [{}]", calls.join(", "));
            }
        }
        for (w, node) in self.nodes.iter().enumerate() {
            if let Some(lb) = node.lb.as_ref() {
                let (sent, unsent) = lb.backlog();
                if sent + unsent > 0 {
                    let i = lb.incarnation();
                    out += &format!("; w{w} {i:?} holds {sent} unacked and {unsent} unsent");
                }
            }
        }
        out
    }
}

/// A hash of the gateway's record and timers: what a fenced message may not change.
fn fingerprint(gq: &GlobalQueue) -> u64 {
    let mut h = Fnv::default();
    gq.state().hash(&mut h);
    for timer in gq.timers() {
        timer.hash(&mut h);
    }
    h.finish()
}

/// Puts a batch on the gateway's disk, once the checker has seen the durable history it
/// extends.
fn write(
    checker: &mut Checker,
    trace: &mut Option<Vec<String>>,
    store: &mut DurableState,
    batch: &Batch,
) -> Verdict {
    if let Some(trace) = trace.as_mut() {
        trace.push(format!("  disk: batch {:?} written", batch.index));
    }
    checker.written(store, batch)?;
    store.apply_batch(batch);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.
mod tests {
    use super::*;
    use crate::sim::schedule::Plan;
    use crate::sim::FuzzOptions;

    #[test]
    fn a_calm_cluster_answers_every_execution() {
        let schedule = Schedule {
            seed: 0,
            config: Plan::new(0, &FuzzOptions::default()).config,
            program: Program {
                hops_max: 2,
                width_max: 3,
                refuse_every: 5,
                flaky: true,
            },
            steps: (0..20).map(Step::Invoke).collect(),
        };
        let stats = schedule.run().unwrap();
        assert_eq!(stats.executions, 20);
        assert_eq!(stats.answered, 20);
    }
}
