//! A stateright actor model of a sand cluster: a client, a gateway, and workers.
//!
//! The gateway actor wraps the real [`GlobalQueue`]; each worker actor wraps the real
//! [`LocalBus`]. The model only plays the environment: it runs grains (each finishing at a
//! moment the checker chooses), writes the gateway's pending batches to its durable storage
//! (all at once, as group commit does, or one at a time to explore a crash between two), and
//! carries messages over connections. The checker explores every order of delivery, every
//! moment for a grain to finish, for a write to become durable, for a worker or the gateway to
//! crash and recover from its storage, for a connection to break, and for any gateway timer to
//! fire, which is how a false suspicion of a live worker is explored.
//!
//! Connections are explicit: a message travels on the connection to one gateway epoch. When the
//! gateway restarts, that connection is gone and whatever was on it is dropped, as QUIC would;
//! the gateway tells every worker, which opens a new connection with `Hello`. A restarted
//! worker opens a new one too; messages of its earlier life may still arrive, which is harsher
//! than QUIC and which the protocol must (and does) refuse by incarnation.
//!
//! Grains are deterministic: in a chain, grain `i` adds `i + 1` and hands on; with fan-out,
//! the first grain fans out to two branches that double their input, and a join sums them.
//! Every correct answer is therefore known in advance.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sand_protocol::durable::{Answer, Batch, DurableState, ExecStatus};
use sand_protocol::global_queue::{GlobalQueue, GqConfig, GqEvent, GqOutput, GqTimer};
use sand_protocol::ids::{AppName, CallId, ExecId, GrainName, Incarnation, WorkerId};
use sand_protocol::local_bus::{GrainResult, LbConfig, LbEvent, LbOutput, LocalBus, RunKey};
use sand_protocol::mutations::{Mutation, Mutations};
use sand_protocol::policy::{AppSpec, GrainPolicy};
use sand_protocol::time::Time;
use sand_protocol::wire::{CallSpec, Cont, ErrorKind, GrainError, Payload, ToGateway, ToWorker};
use stateright::actor::{model_timeout, Actor, ActorModel, ActorModelState, Id, Network, Out};
use stateright::Expectation;

/// The size of a model and the faults it may explore.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelCfg {
    /// Worker hosts.
    pub workers: usize,
    /// Grains in the chain (ignored with `fan_out`).
    pub chain: usize,
    /// Client requests, each one execution (unless lost before it was durable and retried).
    pub executions: usize,
    /// Use the fan-out program (`f → [h, h] → j`) instead of a chain.
    pub fan_out: bool,
    /// The second grain (and each fan-out branch) fails when run as attempt 0, its first
    /// local run, so a retry must happen.
    pub grain_errors: bool,
    /// How many times workers may crash, in all.
    pub worker_crashes: u64,
    /// How many times the gateway may suspect a worker (by firing its failure timer early, or
    /// on time for a crashed one), per gateway life.
    pub suspicions: u32,
    /// How many times the gateway may crash.
    pub gateway_crashes: u32,
    /// How many times each worker's connection may break (without a crash) and reopen.
    pub reconnects: u32,
    /// Progress messages a worker may have unacked at once.
    pub window: usize,
    /// Make one batch durable per write, instead of every pending batch at once (group
    /// commit): more interleavings, needed to crash between two batches of one event.
    pub fsync_each_batch: bool,
    /// Deliberate protocol bugs to switch on.
    pub mutations: Mutations,
}

impl Default for ModelCfg {
    /// The model CI checks: two workers, a chain of three, one execution, one worker crash, one
    /// false suspicion and one gateway crash.
    fn default() -> Self {
        Self {
            workers: 2,
            chain: 3,
            executions: 1,
            fan_out: false,
            grain_errors: false,
            worker_crashes: 1,
            suspicions: 1,
            gateway_crashes: 1,
            reconnects: 0,
            window: 1,
            fsync_each_batch: false,
            mutations: Mutations::NONE,
        }
    }
}

/// A message between the actors.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Msg {
    /// Client → gateway: run request `request` (also its idempotency key).
    Invoke {
        /// The request.
        request: u8,
    },
    /// Gateway → client: the answer to a request.
    Answer {
        /// The request, unless nobody waits for it any more (its gateway life ended).
        request: Option<u8>,
        /// The execution that answered it.
        exec: ExecId,
        /// Whether this is the execution's one `Respond` (not a look-up for a retried request).
        first: bool,
        /// The answer.
        answer: Answer,
    },
    /// Gateway → worker or client, after a gateway restart: the old connection is gone; dial
    /// again (a worker) or re-send what was not answered (the client).
    Restarted,
    /// Worker → gateway: the first message of a new connection (a `Hello`).
    Open {
        /// The protocol message.
        msg: ToGateway,
    },
    /// Worker → gateway, on the connection to gateway epoch `epoch`.
    ToGateway {
        /// The gateway epoch the connection was opened to.
        epoch: u32,
        /// The protocol message.
        msg: ToGateway,
    },
    /// Gateway → worker, on the connection from gateway epoch `epoch`.
    ToWorker {
        /// The gateway's epoch.
        epoch: u32,
        /// The protocol message.
        msg: ToWorker,
    },
}

/// A timer of any actor.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// Gateway: the oldest unpersisted batch becomes durable.
    Fsync,
    /// Gateway: a global queue timer fires.
    Gq(GqTimer),
    /// Worker: a running grain finishes.
    Grain(RunKey),
    /// Worker: its connection breaks, and it opens a new one.
    Reconnect,
}

/// An actor's volatile state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// The gateway.
    Gateway(Box<GatewayState>),
    /// A worker.
    Worker(Box<WorkerState>),
    /// The client.
    Client(ClientState),
}

/// The gateway actor's volatile state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatewayState {
    /// The real global queue.
    pub gq: GlobalQueue,
    /// Batches written but not yet durable, oldest first.
    pub unpersisted: Vec<Batch>,
    /// The durable state, as the storage holds it.
    pub durable: DurableState,
    /// Suspicions fired in this life.
    pub suspected: u32,
    /// Requests waiting for each execution's answer.
    pub waiting: BTreeMap<ExecId, BTreeSet<u8>>,
    /// Retried requests that found their execution already ended: answered once the look-up's
    /// `Accepted` says the state it read is durable.
    pub lookups: BTreeMap<ExecId, BTreeSet<u8>>,
    /// Global queue timers currently armed.
    pub armed: BTreeSet<GqTimer>,
}

/// A worker actor's volatile state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkerState {
    /// The real local bus.
    pub lb: LocalBus,
    /// The gateway epoch of the open connection, once the gateway answered on it.
    pub epoch: Option<u32>,
    /// How many times this worker started.
    pub boots: u32,
    /// Connection breaks left in this life.
    pub reconnects: u32,
}

/// The client's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ClientState {
    /// The answers received per request.
    pub answers: BTreeMap<u8, BTreeSet<Answer>>,
}

/// What an actor keeps across a crash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    /// The gateway's durable state.
    Gateway(Box<DurableState>),
    /// A worker's last incarnation, and how many times it started.
    Worker(Incarnation, u32),
}

/// An actor of the model: its role and the model's configuration.
#[derive(Clone, Debug)]
pub struct Node {
    role: Role,
    cfg: Arc<ModelCfg>,
}

/// What an actor is.
#[derive(Clone, Copy, Debug)]
enum Role {
    /// The gateway, actor 0.
    Gateway,
    /// Worker `WorkerId(n)`, actor `n + 1`.
    Worker(WorkerId),
    /// The client, the last actor.
    Client,
}

/// The auxiliary history: how many times each execution got its `Respond`.
pub type History = BTreeMap<ExecId, u8>;

const T0: Time = Time::ZERO;

fn gateway_id() -> Id {
    Id::from(0)
}

fn app() -> AppName {
    AppName::new("app").expect("a valid literal name")
}

fn grain(i: usize) -> GrainName {
    GrainName::new(format!("g{i}")).expect("a valid generated name")
}

fn named(s: &str) -> GrainName {
    GrainName::new(s).expect("a valid literal name")
}

fn number(p: &Payload) -> Option<i64> {
    std::str::from_utf8(&p.0).ok()?.parse().ok()
}

fn text(n: i64) -> Payload {
    Payload::from(n.to_string().as_str())
}

impl ModelCfg {
    /// The app as the gateway sees it: no timeouts (every wait is explored anyway), two attempts
    /// per grain.
    fn app_spec(&self) -> AppSpec {
        let policy = GrainPolicy {
            attempts_max: 2,
            backoff_ms: 1,
            backoff_ms_max: 1,
            backoff_factor_milli: 2000,
            timeout_ms: None,
        };
        let entry = if self.fan_out { named("f") } else { grain(0) };
        let mut grains: Vec<GrainName> = (0..self.chain).map(grain).collect();
        grains.extend(["f", "h", "j"].map(named));
        AppSpec {
            name: app(),
            entry,
            grains: grains.into_iter().map(|g| (g, policy)).collect(),
        }
    }

    /// What a grain returns: a pure function of the call.
    fn run_grain(&self, spec: &CallSpec) -> GrainResult {
        let g = spec.grain.as_str();
        if self.grain_errors && (g == "g1" || g == "h") && spec.attempt.0 == 0 {
            return GrainResult::Error(GrainError::new(ErrorKind::Raised, "flaky"));
        }
        let n = number(&spec.input);
        match (g, n) {
            ("f", Some(n)) => GrainResult::FanOut {
                branches: vec![(named("h"), text(n)), (named("h"), text(n + 1))],
                join: named("j"),
            },
            ("h", Some(n)) => GrainResult::Return(text(2 * n)),
            ("j", _) => {
                let s = std::str::from_utf8(&spec.input.0).unwrap_or("");
                let inner = s.trim_start_matches('[').trim_end_matches(']');
                let sum = inner.split(',').filter_map(|x| x.parse::<i64>().ok()).sum();
                GrainResult::Return(text(sum))
            }
            (g, Some(n)) => {
                let i: usize = g.trim_start_matches('g').parse().unwrap_or(0);
                let n = n + i as i64 + 1;
                if i + 1 < self.chain {
                    GrainResult::Next {
                        grain: grain(i + 1),
                        input: text(n),
                    }
                } else {
                    GrainResult::Return(text(n))
                }
            }
            _ => GrainResult::Error(GrainError::new(ErrorKind::BadOutput, "not a number")),
        }
    }

    /// The one correct answer to a request.
    pub fn expected(&self, request: u8) -> Answer {
        let n = i64::from(request);
        let value = if self.fan_out {
            2 * n + 2 * (n + 1)
        } else {
            n + (1..=self.chain as i64).sum::<i64>()
        };
        Answer::Value(text(value))
    }

    fn gq_config(&self) -> GqConfig {
        GqConfig {
            mutations: self.mutations,
            ..GqConfig::default()
        }
    }

    fn lb_config(&self, worker: WorkerId) -> LbConfig {
        LbConfig {
            worker,
            window: self.window,
            overload_threshold: 8,
            mutations: self.mutations,
            ..LbConfig::default()
        }
    }

    /// The stateright model of this configuration, with its properties.
    pub fn into_model(self) -> ActorModel<Node, ModelCfg, History> {
        let cfg = Arc::new(self.clone());
        let node = |role| Node {
            role,
            cfg: cfg.clone(),
        };
        let mut model = ActorModel::new(self.clone(), History::new())
            .actor(node(Role::Gateway))
            .actors((0..self.workers).map(|w| node(Role::Worker(WorkerId(w as u32)))))
            .actor(node(Role::Client))
            .init_network(Network::new_unordered_nonduplicating([]))
            .max_crashes(1)
            .record_msg_out(|_, history, env| match env.msg {
                Msg::Answer {
                    exec, first: true, ..
                } => {
                    let mut h = history.clone();
                    *h.entry(*exec).or_default() += 1;
                    Some(h)
                }
                _ => None,
            })
            .within_boundary(within_boundary)
            .property(
                Expectation::Always,
                "each execution is answered at most once",
                |_, s| s.history.values().all(|n| *n <= 1),
            )
            .property(
                Expectation::Always,
                "every answer is the correct one",
                |m, s| {
                    client(s).is_none_or(|c| {
                        c.answers
                            .iter()
                            .all(|(r, a)| a.iter().all(|a| *a == m.cfg.expected(*r)))
                    })
                },
            )
            .property(
                Expectation::Always,
                "every pending call is owned by a live incarnation or waits to be placed",
                |_, s| gateway(s).is_none_or(owners_are_live),
            )
            .property(
                Expectation::Always,
                "what the gateway acked or answered is durable",
                acked_is_durable,
            )
            .property(
                Expectation::Eventually,
                "every request is answered",
                |m, s| client(s).is_some_and(|c| c.answers.len() == m.cfg.executions),
            );
        // In the fan-out model the fan-out's report always leaves before its branches finish,
        // so nothing folds; chains coalesce.
        if !self.fan_out {
            model = model.property(Expectation::Sometimes, "progress is coalesced", |_, s| {
                s.network.iter_all().any(|env| coalesced(env.msg))
            });
        }
        // A model that never reaches these proves nothing about them: each configuration that
        // can reach one must.
        if self.worker_crashes > 0 {
            model = model.property(
                Expectation::Sometimes,
                "answered after a worker crash",
                |m, s| answered(m, s) && worker_storages(s).any(|(_, boots)| boots > 1),
            );
        }
        if self.gateway_crashes > 0 {
            model = model.property(
                Expectation::Sometimes,
                "answered after a gateway crash",
                |m, s| answered(m, s) && durable(s).is_some_and(|d| d.epoch > 1),
            );
        }
        if self.suspicions > 0 {
            model = model.property(
                Expectation::Sometimes,
                "answered after a false suspicion",
                |m, s| answered(m, s) && gateway(s).is_some_and(|g| g.suspected > 0),
            );
        }
        if self.fan_out {
            model = model.property(Expectation::Sometimes, "a join fires", |_, s| {
                gateway(s).is_some_and(|g| g.gq.state().joins.values().any(|j| j.fired))
            });
        }
        model
    }
}

fn client(s: &ActorModelState<Node, History>) -> Option<&ClientState> {
    s.actor_states.iter().find_map(|a| match &**a {
        State::Client(c) => Some(c),
        _ => None,
    })
}

fn gateway(s: &ActorModelState<Node, History>) -> Option<&GatewayState> {
    match &*s.actor_states[0] {
        State::Gateway(g) if !s.crashed[0] => Some(g),
        _ => None,
    }
}

fn durable(s: &ActorModelState<Node, History>) -> Option<&DurableState> {
    match &s.actor_storages[0] {
        Some(Storage::Gateway(d)) => Some(d),
        _ => None,
    }
}

fn worker_storages(
    s: &ActorModelState<Node, History>,
) -> impl Iterator<Item = (Incarnation, u32)> + '_ {
    s.actor_storages.iter().filter_map(|st| match st {
        Some(Storage::Worker(i, boots)) => Some((*i, *boots)),
        _ => None,
    })
}

fn answered(m: &ActorModel<Node, ModelCfg, History>, s: &ActorModelState<Node, History>) -> bool {
    client(s).is_some_and(|c| c.answers.len() == m.cfg.executions)
}

/// Every owned pending call's owner is its worker's current, live incarnation.
fn owners_are_live(g: &GatewayState) -> bool {
    let st = g.gq.state();
    st.calls.values().all(|c| {
        c.owner.is_none_or(|o| {
            st.workers
                .get(&o.worker)
                .is_some_and(|r| r.incarnation == o.incarnation && !r.dead)
        })
    })
}

/// A worker never holds an ack for progress the gateway's storage lacks, and the client never
/// holds an answer the storage lacks.
fn acked_is_durable(
    _: &ActorModel<Node, ModelCfg, History>,
    s: &ActorModelState<Node, History>,
) -> bool {
    let empty = DurableState::default();
    let d = durable(s).unwrap_or(&empty);
    let workers_ok = s.actor_states.iter().all(|a| match &**a {
        State::Worker(w) => {
            let acked = w.lb.acked();
            let rec = d.workers.get(&w.lb.config().worker);
            acked.0 == 0
                || rec.is_some_and(|r| {
                    r.incarnation > w.lb.incarnation()
                        || (r.incarnation == w.lb.incarnation() && r.applied >= acked)
                })
        }
        _ => true,
    });
    let answers_ok = s.network.iter_all().all(|env| match env.msg {
        Msg::Answer { exec, answer, .. } => d
            .execs
            .get(exec)
            .is_some_and(|e| e.status == ExecStatus::Done(answer.clone())),
        _ => true,
    });
    workers_ok && answers_ok
}

/// A progress report that carries more than its root's own hop: a spawned call more than one
/// hop away, or a branch's value returned to the root's own fan-out.
fn coalesced(msg: &Msg) -> bool {
    let Msg::ToGateway {
        msg: ToGateway::Progress { reports, .. },
        ..
    } = msg
    else {
        return false;
    };
    reports.iter().any(|r| match &r.outcome {
        sand_protocol::wire::Outcome::Done(e) => {
            let direct =
                |c: CallId| c == r.call.child(0) || c == r.call.child(1) || c == r.call.join();
            let deep_spawn = e.spawned.iter().any(|c| !direct(c.call));
            let folded_branch = e
                .returns
                .iter()
                .any(|v| matches!(v.cont, Cont::Join { join, .. } if join == r.call.join()));
            deep_spawn || folded_branch
        }
        _ => false,
    })
}

/// Keeps the explored space finite: fault budgets, and no crash of the client. A crashed
/// actor counts against its budget at once; its storage counts it once it restarts.
fn within_boundary(cfg: &ModelCfg, s: &ActorModelState<Node, History>) -> bool {
    let n = s.crashed.len();
    let client_up = !s.crashed[n - 1];
    let epoch = durable(s).map_or(1, |d| d.epoch);
    let gateway_crashes = epoch - 1 + u32::from(s.crashed[0]);
    let worker_crashes: u64 = worker_storages(s)
        .map(|(_, boots)| u64::from(boots.saturating_sub(1)))
        .sum::<u64>()
        + s.crashed[1..n - 1].iter().filter(|c| **c).count() as u64;
    client_up && gateway_crashes <= cfg.gateway_crashes && worker_crashes <= cfg.worker_crashes
}

impl Actor for Node {
    type Msg = Msg;
    type State = State;
    type Timer = Timer;
    type Random = ();
    type Storage = Storage;

    fn on_start(&self, _id: Id, storage: &Option<Storage>, o: &mut Out<Self>) -> State {
        let cfg = &self.cfg;
        match self.role {
            Role::Gateway => State::Gateway(Box::new(start_gateway(cfg, storage, o))),
            Role::Worker(w) => {
                let (last, boots) = match storage {
                    Some(Storage::Worker(i, boots)) => (*i, *boots),
                    _ => (Incarnation(0), 0),
                };
                let incarnation = last.next();
                o.save(Storage::Worker(incarnation, boots + 1));
                let mut w = WorkerState {
                    lb: LocalBus::new(cfg.lb_config(w), incarnation),
                    epoch: None,
                    boots: boots + 1,
                    reconnects: cfg.reconnects,
                };
                if cfg.reconnects > 0 {
                    o.set_timer(Timer::Reconnect, model_timeout());
                }
                w.lb.handle(T0, LbEvent::Connected);
                drain_worker(&mut w, o);
                State::Worker(Box::new(w))
            }
            Role::Client => {
                for request in 0..cfg.executions as u8 {
                    o.send(gateway_id(), Msg::Invoke { request });
                }
                State::Client(ClientState::default())
            }
        }
    }

    fn on_msg(&self, _id: Id, state: &mut Cow<State>, src: Id, msg: Msg, o: &mut Out<Self>) {
        let cfg = &self.cfg;
        if is_stale(state, src, &msg) {
            return; // Its connection is gone: a no-op, which the checker prunes.
        }
        match state.to_mut() {
            State::Gateway(g) => gateway_msg(cfg, g, src, msg, o),
            State::Worker(w) => worker_msg(w, msg, o),
            State::Client(c) => match msg {
                Msg::Answer {
                    request: Some(request),
                    answer,
                    ..
                } => {
                    c.answers.entry(request).or_default().insert(answer);
                }
                // Its connection broke with the gateway: retry, with the same idempotency key.
                Msg::Restarted => {
                    for request in 0..cfg.executions as u8 {
                        if !c.answers.contains_key(&request) {
                            o.send(gateway_id(), Msg::Invoke { request });
                        }
                    }
                }
                _ => {}
            },
        }
    }

    fn on_timeout(&self, _id: Id, state: &mut Cow<State>, timer: &Timer, o: &mut Out<Self>) {
        let cfg = &self.cfg;
        match (state.to_mut(), timer) {
            (State::Gateway(g), Timer::Fsync) => {
                let count = if cfg.fsync_each_batch {
                    1
                } else {
                    g.unpersisted.len()
                };
                let batches: Vec<Batch> = g.unpersisted.drain(..count).collect();
                if let Some(last) = batches.last().map(|b| b.index) {
                    batches.iter().for_each(|b| g.durable.apply_batch(b));
                    o.save(Storage::Gateway(Box::new(g.durable.clone())));
                    g.gq.handle(T0, GqEvent::Persisted(last));
                }
                drain_gateway(cfg, g, o);
            }
            (State::Gateway(g), Timer::Gq(t)) => {
                g.armed.remove(t);
                if let GqTimer::Suspect(_) = t {
                    g.suspected += 1;
                }
                g.gq.handle(T0, GqEvent::Timeout(*t));
                drain_gateway(cfg, g, o);
            }
            (State::Worker(w), Timer::Reconnect) => {
                w.reconnects -= 1;
                if w.reconnects > 0 {
                    o.set_timer(Timer::Reconnect, model_timeout());
                }
                w.epoch = None;
                w.lb.handle(T0, LbEvent::Disconnected);
                w.lb.handle(T0, LbEvent::Connected);
                drain_worker(w, o);
            }
            (State::Worker(w), Timer::Grain(run)) => {
                let spec =
                    w.lb.running()
                        .find(|s| (s.exec, s.call, s.attempt) == *run)
                        .cloned();
                if let Some(spec) = spec {
                    let result = cfg.run_grain(&spec);
                    w.lb.handle(T0, LbEvent::Finished { run: *run, result });
                    drain_worker(w, o);
                }
            }
            _ => {}
        }
    }
}

/// Whether a message travelled on a connection that no longer exists at its receiver: one to
/// an earlier gateway epoch, or an open from a worker life older than the gateway knows (a dead
/// process opens no connection).
fn is_stale(state: &State, src: Id, msg: &Msg) -> bool {
    match (state, msg) {
        (State::Gateway(g), Msg::ToGateway { epoch, .. }) => *epoch != g.gq.state().epoch,
        (State::Gateway(g), Msg::Open { msg }) => {
            let worker = worker_of(src);
            let known = g.gq.state().workers.get(&worker).map(|r| r.incarnation);
            match msg {
                ToGateway::Hello { incarnation } => known.is_some_and(|k| *incarnation < k),
                _ => true,
            }
        }
        (State::Worker(w), Msg::ToWorker { epoch, .. }) => w.epoch.is_some_and(|e| *epoch < e),
        _ => false,
    }
}

fn worker_of(actor: Id) -> WorkerId {
    WorkerId((usize::from(actor) as u32).wrapping_sub(1))
}

fn start_gateway(cfg: &ModelCfg, storage: &Option<Storage>, o: &mut Out<Node>) -> GatewayState {
    let (mut gq, durable) = match storage {
        Some(Storage::Gateway(d)) => {
            for actor in 1..=cfg.workers + 1 {
                o.send(Id::from(actor), Msg::Restarted);
            }
            let gq = GlobalQueue::recover(cfg.gq_config(), T0, (**d).clone());
            (gq, (**d).clone())
        }
        _ => {
            let mut gq = GlobalQueue::new(cfg.gq_config(), T0);
            gq.deploy(cfg.app_spec());
            (gq, DurableState::default())
        }
    };
    // A gateway's first act is a durable write of its epoch (and, for a fresh cluster, of the
    // app), before it serves anything: the storage then counts every start.
    let mut durable = durable;
    while let Some(out) = gq.poll_output() {
        if let GqOutput::Persist(b) = out {
            durable.apply_batch(&b);
            gq.handle(T0, GqEvent::Persisted(b.index));
        }
    }
    o.save(Storage::Gateway(Box::new(durable.clone())));
    let mut g = GatewayState {
        gq,
        unpersisted: Vec::new(),
        durable,
        suspected: 0,
        waiting: BTreeMap::new(),
        lookups: BTreeMap::new(),
        armed: BTreeSet::new(),
    };
    drain_gateway(cfg, &mut g, o);
    g
}

fn gateway_msg(cfg: &ModelCfg, g: &mut GatewayState, src: Id, msg: Msg, o: &mut Out<Node>) {
    let worker = worker_of(src);
    match msg {
        Msg::Invoke { request } => {
            let key = Some(request.to_string());
            if let Ok(inv) = g.gq.invoke(T0, &app(), text(i64::from(request)), key) {
                let ended =
                    g.gq.execution(inv.exec)
                        .is_some_and(|e| e.status != ExecStatus::Running);
                let wait = if ended {
                    &mut g.lookups
                } else {
                    &mut g.waiting
                };
                wait.entry(inv.exec).or_default().insert(request);
            }
        }
        Msg::Open { msg } => {
            // A new connection replaces the worker's old one.
            g.gq.handle(T0, GqEvent::Disconnected(worker));
            g.gq.handle(T0, GqEvent::Message(worker, msg));
        }
        Msg::ToGateway { msg, .. } => g.gq.handle(T0, GqEvent::Message(worker, msg)),
        _ => {}
    }
    drain_gateway(cfg, g, o);
}

fn drain_gateway(cfg: &ModelCfg, g: &mut GatewayState, o: &mut Out<Node>) {
    let client = Id::from(cfg.workers + 1);
    while let Some(out) = g.gq.poll_output() {
        match out {
            GqOutput::Persist(b) => {
                g.unpersisted.push(b);
                o.set_timer(Timer::Fsync, model_timeout());
            }
            GqOutput::Send(w, msg) => {
                let epoch = g.gq.state().epoch;
                o.send(Id::from(w.0 as usize + 1), Msg::ToWorker { epoch, msg });
            }
            GqOutput::Accepted(exec) => {
                // A look-up for a retried request: answer it if the execution already ended.
                if let Some(ExecStatus::Done(answer)) = g.gq.execution(exec).map(|e| &e.status) {
                    for request in g.lookups.remove(&exec).unwrap_or_default() {
                        let answer = answer.clone();
                        let request = Some(request);
                        let msg = Msg::Answer {
                            request,
                            exec,
                            first: false,
                            answer,
                        };
                        o.send(client, msg);
                    }
                }
            }
            GqOutput::Respond(exec, answer) => {
                // The first answer is the execution's one Respond; it goes out even when nobody
                // waits any more (the request came to an earlier life of the gateway).
                let requests = g.waiting.remove(&exec).unwrap_or_default();
                let mut requests: Vec<Option<u8>> = requests.into_iter().map(Some).collect();
                if requests.is_empty() {
                    requests.push(None);
                }
                for (i, request) in requests.into_iter().enumerate() {
                    let answer = answer.clone();
                    o.send(
                        client,
                        Msg::Answer {
                            request,
                            exec,
                            first: i == 0,
                            answer,
                        },
                    );
                }
            }
        }
    }
    if g.unpersisted.is_empty() {
        o.cancel_timer(Timer::Fsync);
    }
    // Suspicion is explored within its budget; a crashed worker is found by its new Hello.
    let suspect = g.suspected < cfg.suspicions;
    let now: BTreeSet<GqTimer> =
        g.gq.timers()
            .map(|(t, _)| t)
            .filter(|t| suspect || !matches!(t, GqTimer::Suspect(_)))
            .collect();
    for t in g.armed.difference(&now) {
        o.cancel_timer(Timer::Gq(*t));
    }
    for t in now.difference(&g.armed) {
        o.set_timer(Timer::Gq(*t), model_timeout());
    }
    g.armed = now;
}

fn worker_msg(w: &mut WorkerState, msg: Msg, o: &mut Out<Node>) {
    match msg {
        Msg::Restarted => {
            w.epoch = None;
            w.lb.handle(T0, LbEvent::Disconnected);
            w.lb.handle(T0, LbEvent::Connected);
        }
        Msg::ToWorker { epoch, msg } => {
            // The first answer on a new connection names the gateway epoch it belongs to.
            if w.epoch.is_none_or(|e| e < epoch) {
                w.epoch = Some(epoch);
            }
            if w.epoch == Some(epoch) {
                w.lb.handle(T0, LbEvent::Message(msg));
            }
        }
        _ => {}
    }
    drain_worker(w, o);
}

fn drain_worker(w: &mut WorkerState, o: &mut Out<Node>) {
    while let Some(out) = w.lb.poll_output() {
        match out {
            LbOutput::Send(msg @ ToGateway::Hello { .. }) => {
                o.send(gateway_id(), Msg::Open { msg })
            }
            LbOutput::Send(msg) => {
                if let Some(epoch) = w.epoch {
                    o.send(gateway_id(), Msg::ToGateway { epoch, msg });
                }
            }
            LbOutput::Run(spec) => o.set_timer(
                Timer::Grain((spec.exec, spec.call, spec.attempt)),
                model_timeout(),
            ),
            LbOutput::Abort(run) => o.cancel_timer(Timer::Grain(run)),
            LbOutput::Incarnation(i) => o.save(Storage::Worker(i, w.boots)),
        }
    }
}

/// The configuration `cfg` with mutation `m` switched on.
pub fn mutated(cfg: ModelCfg, m: Mutation) -> ModelCfg {
    ModelCfg {
        mutations: Mutations::only(m),
        ..cfg
    }
}
