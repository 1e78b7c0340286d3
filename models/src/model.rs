//! A stateright actor model of a sand cluster: a client, a gateway, and workers.
//!
//! The gateway actor wraps the real [`GlobalQueue`]; each worker actor wraps the real
//! [`LocalBus`]. The model only plays the environment: it runs grains (each finishing at a
//! moment the checker chooses), writes the gateway's pending batches to its durable storage
//! (all at once, as group commit does, or one at a time to explore a crash between two), and
//! carries messages over connections. The checker explores every order of delivery, every
//! moment for a grain to finish, for a write to become durable, for a worker or the gateway to
//! crash and restart from what it persisted, for a connection to break, and for any gateway
//! timer to fire, which is how a false suspicion of a live worker is explored.
//!
//! The network is the transport's contract (`transport/README.md`), no more: any message
//! may overtake any other (the QUIC transport orders only its control stream, and each payload
//! message takes a stream of its own, so the model assumes no order at all), and messages are
//! lost only with their connection, never on a live one. Connections are explicit: a message
//! travels on one worker connection (`conn`) to one gateway epoch. When the gateway restarts,
//! its connections are gone and whatever was on them is dropped, as QUIC would; every worker
//! learns of it and opens a new connection with `Hello`, and the client re-sends what was not
//! answered. A worker whose connection breaks opens the next one; nothing of the old one is
//! delivered to it after that, and the gateway reads nothing of it once the new one's `Hello`
//! arrived (the transport replaced it). A restarted worker opens a new one too; messages its
//! earlier life sent may still arrive, which is harsher than QUIC and which the protocol must
//! (and does) refuse by incarnation.
//!
//! Grains are deterministic: in a chain, grain `i` adds `i + 1` and hands on; with fan-out,
//! the first grain fans out to two branches that double their input, and a join sums them.
//! Every correct answer is therefore known in advance.
//!
//! # Keeping the space small without losing behaviours
//!
//! The space is the product of every actor's state and every message in flight, so each
//! choice below removes states that differ only in ways no actor can ever observe:
//!
//! - **A crash is a restart.** An actor crashes and restarts in one step (its `Crash` timer),
//!   from what it persisted. A crashed actor that stays down for a while adds nothing: while it
//!   is down it receives nothing and sends nothing, and the rest of the cluster can do exactly
//!   the same while the restarted actor's first messages (its `Hello`, or the gateway's
//!   `Welcome`s) are still in flight, undelivered. Messages sent to it before the crash wait
//!   in the network either way. So every run with a downtime is matched, step for step, by a
//!   run with an instant restart, and the downtime's own states (the whole cluster's progress
//!   times "this actor is down") are gone.
//! - **Nothing persisted twice.** The gateway's durable state lives in its actor state (the
//!   restart reads it there); workers persist nothing that their state does not already hold.
//!   stateright's own storage slots stay empty.
//! - **News of a gateway restart arrives at once.** Workers and the client learn of a restart
//!   in the restart's own step. Learning later adds nothing the gateway could see: until a
//!   worker learns, nothing reaches it (the old connection's messages died with it) and all it
//!   sends is lost; its grains may finish meanwhile, and the reports it seals into lost
//!   messages are re-sent after the `Welcome` in the very messages it would seal then, had
//!   those grains finished after the `Welcome`. A client that learns late only skips a re-send
//!   when an answer overtook the news, and a re-sent request of an answered execution is a
//!   look-up that changes nothing. [`ModelCfg::restart_news_travels`] turns the shortcut off,
//!   and a test checks that the gateway and the client reach the same states either way.
//! - **Dead connections carry nothing.** A message on a connection that can never deliver it
//!   again (to an earlier gateway epoch, or to an earlier incarnation of a worker) would only
//!   sit in the network and split otherwise equal states; [`SandModel`] removes it at once, as
//!   the transport would. Its delivery would have been a no-op, forever.
//!
//! There is no symmetry reduction over workers, although they look interchangeable: the global
//! queue places a call on the least loaded worker and breaks ties by the lowest id, so swapping
//! two workers does not swap the queue's choices. A state and its mirror image then have
//! successors that are *not* mirror images of each other (one places the call on the restarted
//! worker, the other on the one that never crashed), and exploring only one of each pair would
//! drop real behaviours. (Canonicalising the queue's private per-worker tables would also need a
//! renaming API in `sand-protocol`.)

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sand_protocol::disk::{self, MemDisk};
use sand_protocol::durable::{Answer, Batch, DurableState, ExecRecord, ExecStatus, Op};
use sand_protocol::global_queue::{GlobalQueue, GqConfig, GqEvent, GqOutput, GqTimer};
use sand_protocol::ids::{
    AppName, Attempt, CallId, CallKey, ExecId, GrainName, Incarnation, RunKey, WorkerId,
};
use sand_protocol::local_bus::{GrainResult, LbConfig, LbEvent, LbOutput, LbTimer, LocalBus};
use sand_protocol::mutations::{Mutation, Mutations};
use sand_protocol::policy::{AppSpec, GrainPolicy};
use sand_protocol::time::Time;
use sand_protocol::trace_context::TraceParent;
use sand_protocol::wire::{
    AppBundle, CallSpec, Cont, ErrorKind, GrainError, Outcome, Payload, ToGateway, ToWorker,
};
use stateright::actor::{
    model_timeout, Actor, ActorModel, ActorModelAction, ActorModelState, Envelope, Id, Network, Out,
};
use stateright::{Model, Property};

use crate::promises;

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
    /// The second grain (and each fan-out branch) fails when run under the first attempt the
    /// first gateway life hands out (its first local run, in the first lineage), so a retry
    /// must happen.
    pub grain_errors: bool,
    /// How many times workers may crash, in all.
    pub worker_crashes: u64,
    /// How many times the gateway may suspect a worker (by firing its failure timer early, or
    /// on time for a crashed one), in all.
    pub suspicions: u32,
    /// How many times the gateway may crash.
    pub gateway_crashes: u32,
    /// Worker `w0` may die for good at any moment (never the last worker: `w1` stays). The
    /// gateway's failure detector then fires for it, as a timeout eventually does for a process
    /// that is gone, and every request must still be answered: SAND's core promise.
    pub worker_dies: bool,
    /// How many times each worker's connection may break (without a crash) and reopen.
    pub reconnects: u32,
    /// How many times, in each worker life, its re-send timer may fire while progress is
    /// unacked (re-sending it all). Each firing spends the budget, so the timer adds no cycle.
    pub resends: u32,
    /// How many times, in all, the gateway may give up on an attempt at its deadline (grains
    /// then have a timeout; its timer fires at any moment, as a slow grain's would).
    pub deadlines: u32,
    /// The client also deploys a second app and then removes it, one change at a time, each
    /// once the gateway said the one before is durable.
    pub app_changes: bool,
    /// How many times, in all, the client may look its executions up while it waits (an
    /// answer a look-up shows counts as the request's answer).
    pub polls: u32,
    /// Progress messages a worker may have unacked at once.
    pub window: usize,
    /// Make one batch durable per write, instead of every pending batch at once (group
    /// commit): more interleavings, needed to crash between two batches of one event.
    pub fsync_each_batch: bool,
    /// Let the news of a gateway restart travel as a `Restarted` message to each worker and the
    /// client, delivered at any later moment, instead of arriving in the restart's step. The
    /// news is about a connection, so a worker that restarts before it arrives never gets it.
    pub restart_news_travels: bool,
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
            worker_dies: false,
            reconnects: 0,
            resends: 0,
            deadlines: 0,
            app_changes: false,
            polls: 0,
            window: 1,
            fsync_each_batch: false,
            restart_news_travels: false,
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
    /// Client → gateway: deploy the second app, or (`deploy: false`) remove it.
    Change {
        /// Deploy, or remove.
        deploy: bool,
    },
    /// Gateway → client: the change is durable.
    Changed {
        /// The deploy (or else the removal) is.
        deployed: bool,
    },
    /// Client → gateway: look up the execution of request `request` (the model's stand-in for
    /// the execution id the client would hold).
    Poll {
        /// The request.
        request: u8,
    },
    /// Gateway → worker or client, after a gateway restart: the old connection is gone; dial
    /// again (a worker) or re-send what was not answered (the client).
    Restarted,
    /// Dying worker → gateway: not a message of the protocol but the environment's word that
    /// the worker is gone for good, after which the gateway's failure timer for it may fire at
    /// any moment, whatever the suspicion budget.
    Gone,
    /// Worker → gateway: a `Hello`, which (re)opens the worker's session.
    Open {
        /// The gateway epoch of the connection it travels on: `None` when it opens a new
        /// connection, the epoch of the worker's open connection when a fenced worker says
        /// `Hello` as its next incarnation on it.
        epoch: Option<u32>,
        /// The worker's connection it travels on (see [`WorkerState::conn`]).
        conn: u32,
        /// The protocol message.
        msg: ToGateway,
    },
    /// Worker → gateway, on the worker's connection `conn` to gateway epoch `epoch`.
    ToGateway {
        /// The gateway epoch the connection was opened to.
        epoch: u32,
        /// The worker's connection.
        conn: u32,
        /// The protocol message.
        msg: ToGateway,
    },
    /// Gateway → worker, on the worker's connection `conn` from gateway epoch `epoch`.
    ToWorker {
        /// The gateway's epoch.
        epoch: u32,
        /// The worker's connection, as the gateway last saw it opened.
        conn: u32,
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
    /// Worker: its re-send timer fires while progress is unacked.
    Resend,
    /// Worker `w0`: it dies for good.
    Die,
    /// Client: it looks up every request not yet answered.
    Poll,
    /// Gateway or worker: it crashes and restarts at once from what it persisted. Set while the
    /// actor's crash budget lasts.
    Crash,
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

/// The gateway actor's state: its volatile state, and what its disk holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatewayState {
    /// The real global queue.
    pub gq: GlobalQueue,
    /// The disk: batches written but not yet durable, oldest first, and the durable state,
    /// all a restart keeps.
    pub disk: MemDisk,
    /// Suspicions fired, in all of the gateway's lives (the model's fault budget, not the
    /// gateway's knowledge).
    pub suspected: u32,
    /// Deadlines fired, in all of the gateway's lives (likewise).
    pub deadlines: u32,
    /// Workers gone for good, as the environment told the gateway (kept across its lives: the
    /// failure detector finds a dead process after any restart too).
    pub gone: BTreeSet<WorkerId>,
    /// The joins the durable history fired, and whether one fired twice (the checker's record
    /// of the disk's past, kept across the gateway's lives).
    pub fired: Fired,
    /// Requests waiting for each execution's answer.
    pub waiting: BTreeMap<ExecId, BTreeSet<u8>>,
    /// Retried requests that found their execution already ended: answered once the look-up's
    /// `ConfirmInvoke` says the state it read is durable.
    pub lookups: BTreeMap<ExecId, BTreeSet<u8>>,
    /// Global queue timers currently armed.
    pub armed: BTreeSet<GqTimer>,
    /// Each worker's connection its latest `Open` came on: what the gateway sends goes on it,
    /// and nothing from an older one is read any more (the transport replaced it).
    pub conns: BTreeMap<WorkerId, u32>,
}

/// A worker actor's volatile state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkerState {
    /// The real local bus.
    pub lb: LocalBus,
    /// The gateway epoch of the open connection, once the gateway answered on it.
    pub epoch: Option<u32>,
    /// How many times this worker started (what it persists, with its incarnation).
    pub boots: u32,
    /// Its connection to the gateway within this life and gateway epoch: bumped when it breaks
    /// and is opened again. What travelled on an earlier one is never delivered after it: the
    /// transport's contract (`transport/README.md`).
    pub conn: u32,
    /// Connection breaks left in this life.
    pub reconnects: u32,
    /// Firings of its re-send timer left in this life.
    pub resends: u32,
    /// Whether it died for good: it receives, sends and runs nothing any more.
    pub gone: bool,
    /// The attempts this incarnation started (the checker's record, not the worker's).
    pub started: BTreeSet<RunKey>,
    /// Whether this incarnation started an attempt twice.
    pub started_twice: bool,
}

/// The client's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ClientState {
    /// The answers received per request.
    pub answers: BTreeMap<u8, BTreeSet<Answer>>,
    /// The app change under way (deploy, then remove), `None` once both are told durable.
    pub change: Option<bool>,
    /// Look-ups left.
    pub polls: u32,
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

/// The auxiliary history: what the properties need that no actor keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct History {
    /// How many times each execution got its `Respond`.
    pub responds: BTreeMap<ExecId, u8>,
    /// Whether an answer nobody waited for left the gateway before it was durable (such an
    /// answer is taken off the network at once, so the durability property cannot see it
    /// there).
    pub unread_answer_not_durable: bool,
}

const T0: Time = Time::ZERO;

fn gateway_id() -> Id {
    Id::from(0)
}

fn app() -> AppName {
    AppName::new("app").expect("a valid literal name")
}

fn second_app() -> AppName {
    AppName::new("second").expect("a valid literal name")
}

fn bundle(digest: &str) -> AppBundle {
    AppBundle {
        digest: digest.into(),
        archive: Default::default(),
    }
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
    /// The app as the gateway sees it: two attempts per grain, and a timeout only if deadlines
    /// are explored (every wait is explored anyway; the timeout's length never matters here).
    fn app_spec(&self) -> AppSpec {
        let policy = GrainPolicy {
            attempts_max: 2,
            backoff_ms: 1,
            backoff_factor_milli: 2000,
            backoff_ms_max: 1,
            timeout_ms: (self.deadlines > 0).then_some(1000),
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

    /// The second app, which the client deploys and removes (`app_changes`).
    fn second_app(&self) -> (AppSpec, AppBundle) {
        let spec = AppSpec {
            name: second_app(),
            ..self.app_spec()
        };
        (spec, bundle("b1"))
    }

    /// What a grain returns: a pure function of the call.
    fn run_grain(&self, spec: &CallSpec) -> GrainResult {
        let g = spec.grain.as_str();
        if self.grain_errors && (g == "g1" || g == "h") && spec.attempt == Attempt::epoch_floor(1) {
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
        // The model's executions make a handful of calls: a call budget would never bind, and
        // its count would only split states that the checker now merges.
        GqConfig {
            calls_max: None,
            ..GqConfig::default()
        }
    }

    fn lb_config(&self, worker: WorkerId) -> LbConfig {
        LbConfig {
            worker,
            window: self.window,
            overload_threshold: 8,
            ..LbConfig::default()
        }
    }

    /// The stateright model of this configuration, with its properties.
    pub fn into_model(self) -> SandModel {
        let cfg = Arc::new(self.clone());
        let node = |role| Node {
            role,
            cfg: cfg.clone(),
        };
        let actors = ActorModel::new(self.clone(), History::default())
            .actor(node(Role::Gateway))
            .actors((0..self.workers).map(|w| node(Role::Worker(WorkerId(w as u32)))))
            .actor(node(Role::Client))
            .init_network(Network::new_unordered_nonduplicating([]))
            .record_msg_out(|_, history, env| match env.msg {
                Msg::Answer {
                    exec, first: true, ..
                } => {
                    let mut h = history.clone();
                    *h.responds.entry(*exec).or_default() += 1;
                    Some(h)
                }
                _ => None,
            });
        let mut properties = vec![
            Property::<SandModel>::always("each execution is answered at most once", |_, s| {
                s.history.responds.values().all(|n| *n <= 1)
            }),
            Property::<SandModel>::always("every answer is the correct one", |m, s| {
                client(s).is_none_or(|c| {
                    c.answers
                        .iter()
                        .all(|(r, a)| a.iter().all(|a| *a == m.cfg.expected(*r)))
                })
            }),
            Property::<SandModel>::always(
                "a worker starts each attempt at most once per incarnation",
                |_, s| workers(s).all(|w| !w.started_twice),
            ),
            // The worker ignores a dispatch of an attempt it started, but the gateway never sends
            // one: a reconnecting Hello lists what was started.
            Property::<SandModel>::always(
                "no worker is sent a dispatch of an attempt it started",
                |_, s| {
                    s.network
                        .iter_all()
                        .all(|env| match (env.msg, actor(s, env.dst)) {
                            (
                                Msg::ToWorker {
                                    msg:
                                        ToWorker::Dispatch {
                                            incarnation, call, ..
                                        },
                                    conn,
                                    ..
                                },
                                State::Worker(w),
                            ) => {
                                *incarnation != w.lb.incarnation()
                                    || *conn != w.conn
                                    || !w.started.contains(&call.run_key())
                            }
                            _ => true,
                        })
                },
            ),
            Property::<SandModel>::always(
                "every pending call is owned by a live incarnation or waits to be placed",
                |_, s| owners_are_live(gateway(s)),
            ),
            Property::<SandModel>::always(
                "a call waits for a worker only while it backs off or none is connected",
                |_, s| waiting_calls_wait_for_a_reason(gateway(s)),
            ),
            Property::<SandModel>::always("what the gateway promised is durable", acked_is_durable),
            Property::<SandModel>::always("one execution per idempotency key", |_, s| {
                let execs = gateway(s).gq.state().execs.values();
                let keys: Vec<(&AppName, &String)> = execs
                    .filter_map(|e| Some((&e.app, &e.idempotency.as_ref()?.key)))
                    .collect();
                let distinct: BTreeSet<_> = keys.iter().copied().collect();
                distinct.len() == keys.len()
            }),
            Property::<SandModel>::eventually("every request is answered", answered),
        ];
        // In the fan-out model the fan-out's report always leaves before its branches finish,
        // so nothing folds; chains coalesce, and a spawn folds past a hop from three grains on.
        if !self.fan_out && self.chain >= 3 {
            properties.push(Property::<SandModel>::sometimes(
                "progress is coalesced",
                |_, s| s.network.iter_all().any(|env| coalesced(env.msg)),
            ));
        }
        // A model that never reaches these proves nothing about them: each configuration that
        // can reach one must.
        if self.worker_crashes > 0 {
            properties.push(Property::<SandModel>::sometimes(
                "answered after a worker crash",
                |m, s| answered(m, s) && workers(s).any(|w| w.boots > 1),
            ));
        }
        if self.gateway_crashes > 0 {
            properties.push(Property::<SandModel>::sometimes(
                "answered after a gateway crash",
                |m, s| answered(m, s) && gateway(s).disk.durable().epoch > 1,
            ));
        }
        if self.suspicions > 0 {
            properties.push(Property::<SandModel>::sometimes(
                "answered after a false suspicion",
                |m, s| answered(m, s) && gateway(s).suspected > 0,
            ));
        }
        // The protocol's branches that matter, each reached by a CI configuration; `sand check`
        // lists them as "reached".
        if self.window >= 2 {
            properties.push(Property::<SandModel>::sometimes(
                "the gateway holds back progress that arrived early",
                |_, s| gateway(s).gq.held() > 0,
            ));
        }
        if self.worker_dies {
            properties.push(Property::<SandModel>::sometimes(
                "answered after a worker died for good",
                |m, s| answered(m, s) && workers(s).any(|w| w.gone),
            ));
            properties.push(Property::<SandModel>::sometimes(
                "a dead worker's call is dispatched again, to another",
                |_, s| {
                    let lost: BTreeSet<CallKey> = workers(s)
                        .filter(|w| w.gone)
                        .flat_map(|w| w.lb.running().map(|c| CallKey::new(c.exec, c.call)))
                        .collect();
                    s.network
                        .iter_all()
                        .any(|env| match (env.msg, actor(s, env.dst)) {
                            (
                                Msg::ToWorker {
                                    msg: ToWorker::Dispatch { call, .. },
                                    ..
                                },
                                State::Worker(w),
                            ) => !w.gone && lost.contains(&CallKey::new(call.exec, call.call)),
                            _ => false,
                        })
                },
            ));
        }
        if self.resends > 0 {
            properties.push(Property::<SandModel>::sometimes(
                "a worker re-sends unacked progress on its timer",
                |m, s| workers(s).any(|w| w.resends < m.cfg.resends),
            ));
        }
        if self.deadlines > 0 {
            properties.push(Property::<SandModel>::sometimes(
                "answered after an attempt ran past its deadline",
                |m, s| answered(m, s) && gateway(s).deadlines > 0,
            ));
        }
        if self.grain_errors {
            properties.push(Property::<SandModel>::sometimes(
                "a failed attempt is placed again",
                |_, s| {
                    let calls = gateway(s).gq.state().calls.values();
                    calls
                        .into_iter()
                        .any(|c| c.failures > 0 && c.owner.is_some())
                },
            ));
        }
        if self.suspicions > 0 {
            properties.push(Property::<SandModel>::sometimes(
                "a live incarnation is fenced",
                |_, s| {
                    s.network
                        .iter_all()
                        .any(|env| match (env.msg, actor(s, env.dst)) {
                            (Msg::ToWorker { msg, conn, .. }, State::Worker(w)) => {
                                matches!(msg, ToWorker::Fenced { incarnation, .. }
                                if *incarnation == w.lb.incarnation() && *conn == w.conn)
                            }
                            _ => false,
                        })
                },
            ));
        }
        // With grain errors a first branch run fails, so the gateway joins; without, one worker
        // runs every branch and joins itself.
        if self.fan_out && !self.grain_errors {
            properties.push(Property::<SandModel>::sometimes(
                "a worker starts a join itself",
                |_, s| {
                    let joins = &gateway(s).gq.state().joins;
                    s.network.iter_all().any(|env| match env.msg {
                        Msg::ToGateway {
                            msg: ToGateway::Progress { reports, .. },
                            ..
                        } => reports.iter().any(|r| match &r.outcome {
                            Outcome::Done(e) => e.spawned.iter().any(|c| {
                                c.owned && joins.contains_key(&CallKey::new(r.exec, c.call))
                            }),
                            Outcome::Failed(_) => false,
                        }),
                        _ => false,
                    })
                },
            ));
        }
        if self.fan_out && self.grain_errors {
            properties.push(Property::<SandModel>::sometimes(
                "the gateway starts a join",
                |_, s| {
                    let joins = &gateway(s).gq.state().joins;
                    s.network.iter_all().any(|env| match env.msg {
                        Msg::ToWorker {
                            msg: ToWorker::Dispatch { call, .. },
                            ..
                        } => joins.contains_key(&CallKey::new(call.exec, call.call)),
                        _ => false,
                    })
                },
            ));
        }
        if self.app_changes {
            properties.push(Property::<SandModel>::always(
                "an app change is told only once durable",
                |_, s| {
                    let deployed = gateway(s).disk.durable().apps.contains_key(&second_app());
                    s.network.iter_all().all(|env| match env.msg {
                        Msg::Changed { deployed: told } => *told == deployed,
                        _ => true,
                    })
                },
            ));
            properties.push(Property::<SandModel>::sometimes(
                "an app is deployed and removed, each told durable",
                |_, s| client(s).is_some_and(|c| c.change.is_none()),
            ));
        }
        if self.polls > 0 {
            properties.push(Property::<SandModel>::sometimes(
                "a look-up shows an answer",
                |_, s| {
                    s.network.iter_all().any(|env| {
                        matches!(
                            env.msg,
                            Msg::Answer {
                                request: Some(_),
                                first: false,
                                ..
                            }
                        )
                    })
                },
            ));
        }
        if self.fan_out {
            properties.push(Property::<SandModel>::always(
                "a join fires at most once",
                |_, s| !gateway(s).fired.twice,
            ));
            properties.push(Property::<SandModel>::always(
                "a join fires only with every branch",
                |_, s| {
                    let joins = gateway(s).gq.state().joins.values();
                    joins.filter(|j| j.fired).all(|j| j.is_complete())
                },
            ));
            properties.push(Property::<SandModel>::sometimes("a join fires", |_, s| {
                gateway(s).gq.state().joins.values().any(|j| j.fired)
            }));
        }
        SandModel {
            cfg: self,
            actors,
            properties,
            deadline: None,
            out_of_time: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// The model of a [`ModelCfg`]: stateright's actor model of the cluster, with the transport's
/// one duty added (a message on a connection that is gone is dropped, not kept forever), the
/// fault budgets as its boundary, and the properties checked.
pub struct SandModel {
    /// The configuration it was built from.
    pub cfg: ModelCfg,
    actors: ActorModel<Node, ModelCfg, History>,
    properties: Vec<Property<SandModel>>,
    deadline: Option<Instant>,
    out_of_time: Arc<AtomicBool>,
}

impl SandModel {
    /// Ends the search at `deadline`: from then on no new state is inside the boundary, so the
    /// checker drains what it holds and stops, and `out_of_time` is set. (stateright's own
    /// timeout is only looked at when a thread runs out of work, which a depth-first search
    /// seldom does.)
    pub fn with_deadline(mut self, deadline: Instant, out_of_time: Arc<AtomicBool>) -> Self {
        self.deadline = Some(deadline);
        self.out_of_time = out_of_time;
        self
    }
}

/// A state of the model.
pub type SandState = ActorModelState<Node, History>;

/// A step of the model.
pub type SandAction = ActorModelAction<Msg, Timer, ()>;

impl Model for SandModel {
    type State = SandState;
    type Action = SandAction;

    fn init_states(&self) -> Vec<SandState> {
        self.actors.init_states()
    }

    fn actions(&self, state: &SandState, actions: &mut Vec<SandAction>) {
        self.actors.actions(state, actions);
    }

    fn next_state(&self, state: &SandState, action: SandAction) -> Option<SandState> {
        let crashed = match action {
            ActorModelAction::Timeout(id, Timer::Crash) => Some(id),
            _ => None,
        };
        let gateway_restarts = crashed == Some(gateway_id());
        let mut next = self.actors.next_state(state, action)?;
        drop_dead_connections(&mut next, gateway_restarts);
        if gateway_restarts && !self.cfg.restart_news_travels {
            for peer in 1..=self.cfg.workers + 1 {
                let news = ActorModelAction::Deliver {
                    src: gateway_id(),
                    dst: Id::from(peer),
                    msg: Msg::Restarted,
                };
                if let Some(learned) = self.actors.next_state(&next, news) {
                    next = learned;
                }
                drop_dead_connections(&mut next, false);
            }
        }
        if let (Some(worker), true) = (crashed, self.cfg.restart_news_travels) {
            if let Network::UnorderedNonDuplicating(multiset) = &mut next.network {
                multiset.retain(|env, _| env.dst != worker || env.msg != Msg::Restarted);
            }
        }
        Some(next)
    }

    fn format_action(&self, action: &SandAction) -> String {
        self.actors.format_action(action)
    }

    fn format_step(&self, state: &SandState, action: SandAction) -> Option<String> {
        self.actors.format_step(state, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        self.properties.clone()
    }

    fn within_boundary(&self, state: &SandState) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.out_of_time.store(true, Ordering::Relaxed);
            return false;
        }
        within_boundary(&self.cfg, state)
    }
}

/// Removes every message that travels on a connection no longer open at its receiver.
///
/// When the gateway has just restarted, that is everything in flight on its connections: to
/// it, since every connection to the dead process is gone with it, as with QUIC, and its peers
/// retry on a new one (workers with `Hello`, the client with its request) once they learn of
/// the restart; and from it to workers. A worker that reads such a message before it learns of
/// the restart touches only its own state and its dead connection (whatever it sends on it is
/// lost, its `Hello`s included), which commutes with the gateway's restart: the same run with
/// that delivery moved before the restart reaches the same states. After it learns of the
/// restart, nothing more arrives on the old connection. (The client's answers are kept: they
/// are durable facts, and the client reads them from any connection.)
///
/// Then, at any step, messages that can never be delivered: worker messages on a connection to
/// an earlier gateway epoch (the gateway's epoch only grows), and gateway messages to an
/// earlier incarnation of a worker (a worker's incarnation only grows, by a restart or by being
/// fenced). [`Node`] refuses these on delivery (see `is_stale`), so removing them changes no
/// run; it only stops equal states from differing by dead letters.
///
/// Likewise worker messages from an incarnation the global queue refuses for good
/// ([`GlobalQueue::refuses`]: older than the one it knows, or declared dead). Their delivery
/// only makes the gateway send that incarnation a `Fenced`, which is either addressed to a life
/// that has ended (dropped at once) or another copy of the `Fenced` it sent when it declared the
/// incarnation dead: it does so whenever the incarnation is connected, and one that is not has
/// sent nothing on this epoch's connection yet.
///
/// Last, answers that nobody waits for (`request: None`: the request came to an earlier life
/// of the gateway, and the client re-sent it under its idempotency key, or gets its answer
/// from the look-up). The client ignores them, so their delivery is a no-op at any moment;
/// the checker would otherwise explore every moment for it. The one thing a property reads in
/// them is whether they are durable, and that cannot change while they wait (an ended
/// execution's record on the disk stays ended), so it is checked here, once, into the history.
fn drop_dead_connections(s: &mut SandState, gateway_restarted: bool) {
    let epoch = gateway(s).gq.state().epoch;
    let unread_not_durable = s.network.iter_all().any(|env| match env.msg {
        Msg::Answer {
            request: None,
            exec,
            answer,
            ..
        } => gateway(s)
            .disk
            .durable()
            .execs
            .get(exec)
            .is_none_or(|e| e.status != ExecStatus::Done(answer.clone())),
        _ => false,
    });
    if unread_not_durable {
        s.history.unread_answer_not_durable = true;
    }
    let dead = |env: &Envelope<&Msg>| match (env.msg, &*s.actor_states[usize::from(env.dst)]) {
        _ if gateway_restarted && env.dst == gateway_id() => true,
        (Msg::Answer { request: None, .. }, _) => true,
        // A change told on a connection that died with the gateway (the client asks again on
        // a new one), or one the client no longer waits for.
        (Msg::Changed { .. }, _) if gateway_restarted => true,
        (Msg::Changed { deployed }, State::Client(c)) => c.change != Some(*deployed),
        (Msg::ToWorker { epoch: e, .. }, _) if gateway_restarted => *e < epoch,
        (Msg::ToGateway { epoch: e, .. }, _) if *e < epoch => true,
        (Msg::ToGateway { msg, conn, .. }, State::Gateway(g)) => {
            replaced(g, env.src, *conn)
                || sender(msg).is_some_and(|i| g.gq.refuses(worker_of(env.src), i))
        }
        (Msg::Open { epoch: Some(e), .. }, _) => *e < epoch,
        (Msg::ToWorker { conn, msg, .. }, State::Worker(w)) => {
            w.gone || *conn < w.conn || msg.incarnation() < w.lb.incarnation()
        }
        (Msg::Restarted, State::Worker(w)) => w.gone,
        (Msg::Open { conn, .. }, State::Gateway(g)) => replaced(g, env.src, *conn),
        _ => false,
    };
    // Removed in place: rebuilding the network from `iter_all` would not do, as stateright
    // 0.31's iterator yields a message held `n > 1` times `n + 1` times.
    let gone: Vec<Envelope<Msg>> = s
        .network
        .iter_deliverable()
        .filter(|env| dead(env))
        .map(|env| Envelope {
            src: env.src,
            dst: env.dst,
            msg: env.msg.clone(),
        })
        .collect();
    if let Network::UnorderedNonDuplicating(multiset) = &mut s.network {
        for env in &gone {
            multiset.remove(env);
        }
    }
}

/// The worker incarnation a worker message speaks for; `None` for `Hello`, which opens a
/// connection (see `is_stale`).
fn sender(msg: &ToGateway) -> Option<Incarnation> {
    match msg {
        ToGateway::Heartbeat { incarnation, .. } | ToGateway::Progress { incarnation, .. } => {
            Some(*incarnation)
        }
        ToGateway::Hello { .. } => None,
    }
}

fn client(s: &SandState) -> Option<&ClientState> {
    s.actor_states.iter().find_map(|a| match &**a {
        State::Client(c) => Some(c),
        _ => None,
    })
}

/// The gateway's state. Actor 0 is always the gateway, and no actor is ever marked crashed (a
/// crash is a restart), so it is always there.
fn gateway(s: &SandState) -> &GatewayState {
    match &*s.actor_states[0] {
        State::Gateway(g) => g,
        _ => unreachable!("actor 0 is the gateway"),
    }
}

fn actor(s: &SandState, id: Id) -> &State {
    &s.actor_states[usize::from(id)]
}

fn workers(s: &SandState) -> impl Iterator<Item = &WorkerState> + '_ {
    s.actor_states.iter().filter_map(|a| match &**a {
        State::Worker(w) => Some(&**w),
        _ => None,
    })
}

fn answered(m: &SandModel, s: &SandState) -> bool {
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

/// An unowned call is placed as soon as it may be: it waits only while its retry backs off, or
/// while no live worker is connected to take it.
fn waiting_calls_wait_for_a_reason(g: &GatewayState) -> bool {
    let st = g.gq.state();
    let backing_off: BTreeSet<CallKey> =
        g.gq.timers()
            .filter_map(|(t, _)| match t {
                GqTimer::Retry(key) => Some(key),
                _ => None,
            })
            .collect();
    let someone_connected = st.workers.keys().any(|w| g.gq.is_connected(*w));
    st.calls
        .values()
        .all(|c| c.owner.is_some() || backing_off.contains(&c.key()) || !someone_connected)
}

/// A worker never holds an ack for progress the gateway's disk lacks, and nothing the gateway
/// promises (an answer, an ack, a `Welcome`, a `Fenced`, a `Cancel`, an `Abort`) is on its way
/// before the disk has it.
fn acked_is_durable(_: &SandModel, s: &SandState) -> bool {
    let d = gateway(s).disk.durable();
    let workers_ok = workers(s).all(|w| {
        let acked = w.lb.acked();
        let rec = d.workers.get(&w.lb.config().worker);
        acked.0 == 0
            || rec.is_some_and(|r| {
                r.incarnation > w.lb.incarnation()
                    || (r.incarnation == w.lb.incarnation() && r.applied >= acked)
            })
    });
    let messages_ok = s.network.iter_all().all(|env| match env.msg {
        Msg::Answer { exec, answer, .. } => d
            .execs
            .get(exec)
            .is_some_and(|e| e.status == ExecStatus::Done(answer.clone())),
        Msg::ToWorker { msg, .. } => promises::sent_is_durable(d, worker_of(env.dst), msg),
        _ => true,
    });
    workers_ok && messages_ok && !s.history.unread_answer_not_durable
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
        Outcome::Done(e) => {
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

/// Keeps the explored space finite: the fault budgets. Each actor arms its `Crash` timer only
/// while its own crashes are under the budget; worker crashes are budgeted in all, which only
/// the whole state shows.
fn within_boundary(cfg: &ModelCfg, s: &SandState) -> bool {
    let gateway_crashes = gateway(s).disk.durable().epoch.saturating_sub(1);
    let worker_crashes: u64 = workers(s).map(|w| u64::from(w.boots - 1)).sum();
    gateway_crashes <= cfg.gateway_crashes && worker_crashes <= cfg.worker_crashes
}

impl Actor for Node {
    type Msg = Msg;
    type State = State;
    type Timer = Timer;
    type Random = ();
    /// Nothing: a crash is a restart within the actor's own step (its `Crash` timer), which
    /// reads what the actor persisted from its state.
    type Storage = ();

    fn on_start(&self, _id: Id, _storage: &Option<()>, o: &mut Out<Self>) -> State {
        let cfg = &self.cfg;
        match self.role {
            Role::Gateway => {
                State::Gateway(Box::new(start_gateway(cfg, None, Spent::default(), o)))
            }
            Role::Worker(w) => State::Worker(Box::new(start_worker(cfg, w, Incarnation(1), 1, o))),
            Role::Client => {
                for request in 0..cfg.executions as u8 {
                    o.send(gateway_id(), Msg::Invoke { request });
                }
                let change = cfg.app_changes.then_some(true);
                if let Some(deploy) = change {
                    o.send(gateway_id(), Msg::Change { deploy });
                }
                if cfg.polls > 0 {
                    o.set_timer(Timer::Poll, model_timeout());
                }
                State::Client(ClientState {
                    answers: BTreeMap::new(),
                    change,
                    polls: cfg.polls,
                })
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
            State::Worker(w) if w.gone => {}
            State::Worker(w) => worker_msg(w, msg, o),
            State::Client(c) => match msg {
                Msg::Answer {
                    request: Some(request),
                    answer,
                    ..
                } => {
                    c.answers.entry(request).or_default().insert(answer);
                }
                // The change is durable: the next one, if any.
                Msg::Changed { deployed } if c.change == Some(deployed) => {
                    c.change = deployed.then_some(false);
                    if let Some(deploy) = c.change {
                        o.send(gateway_id(), Msg::Change { deploy });
                    }
                }
                // Its connection broke with the gateway: retry, with the same idempotency key
                // (a change is idempotent).
                Msg::Restarted => {
                    for request in 0..cfg.executions as u8 {
                        if !c.answers.contains_key(&request) {
                            o.send(gateway_id(), Msg::Invoke { request });
                        }
                    }
                    if let Some(deploy) = c.change {
                        o.send(gateway_id(), Msg::Change { deploy });
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
                    g.disk.unwritten()
                };
                let g = &mut **g;
                let fired = &mut g.fired;
                let Ok(_) = g.disk.flush(&mut g.gq, T0, count, |d, b| fired.put(d, b));
                drain_gateway(cfg, g, o);
            }
            (State::Gateway(g), Timer::Gq(t)) => {
                g.armed.remove(t);
                match t {
                    GqTimer::Suspect(w) if g.gone.contains(w) => {}
                    GqTimer::Suspect(_) => g.suspected += 1,
                    GqTimer::Deadline(..) => g.deadlines += 1,
                    GqTimer::Retry(..) => {}
                }
                g.gq.handle(T0, GqEvent::Timeout(*t));
                drain_gateway(cfg, g, o);
            }
            (State::Gateway(g), Timer::Crash) => {
                // Everything volatile is lost: unpersisted batches, gated outputs, timers,
                // waiting requests. The disk and the fault budget remain.
                o.cancel_timer(Timer::Fsync);
                for t in &g.armed {
                    o.cancel_timer(Timer::Gq(*t));
                }
                let durable = std::mem::take(&mut g.disk).into_durable();
                let spent = Spent {
                    suspected: g.suspected,
                    deadlines: g.deadlines,
                    gone: std::mem::take(&mut g.gone),
                    fired: std::mem::take(&mut g.fired),
                };
                **g = start_gateway(cfg, Some(durable), spent, o);
            }
            (State::Worker(w), Timer::Reconnect) => {
                w.reconnects -= 1;
                if w.reconnects > 0 {
                    o.set_timer(Timer::Reconnect, model_timeout());
                }
                w.epoch = None;
                w.conn += 1;
                w.lb.handle(T0, LbEvent::Disconnected);
                w.lb.handle(T0, LbEvent::Connected);
                drain_worker(w, o);
            }
            (State::Worker(w), Timer::Die) => {
                for spec in w.lb.running() {
                    o.cancel_timer(Timer::Grain(spec.run_key()));
                }
                for t in [Timer::Reconnect, Timer::Resend, Timer::Crash] {
                    o.cancel_timer(t);
                }
                w.gone = true;
                o.send(gateway_id(), Msg::Gone);
            }
            (State::Client(c), Timer::Poll) => {
                c.polls -= 1;
                if c.polls > 0 {
                    o.set_timer(Timer::Poll, model_timeout());
                }
                for request in 0..cfg.executions as u8 {
                    if !c.answers.contains_key(&request) {
                        o.send(gateway_id(), Msg::Poll { request });
                    }
                }
            }
            (State::Worker(w), Timer::Resend) => {
                w.resends -= 1;
                w.lb.handle(T0, LbEvent::Timeout(LbTimer::Resend));
                drain_worker(w, o);
            }
            (State::Worker(w), Timer::Grain(run)) => {
                let spec = w.lb.running().find(|s| s.run_key() == *run).cloned();
                if let Some(spec) = spec {
                    let result = cfg.run_grain(&spec);
                    w.lb.handle(T0, LbEvent::Finished { run: *run, result });
                    drain_worker(w, o);
                }
            }
            (State::Worker(w), Timer::Crash) => {
                // Its grains die with it; it persisted its incarnation and boot count.
                for spec in w.lb.running() {
                    o.cancel_timer(Timer::Grain(spec.run_key()));
                }
                o.cancel_timer(Timer::Reconnect);
                o.cancel_timer(Timer::Resend);
                o.cancel_timer(Timer::Die);
                let worker = w.lb.config().worker;
                let incarnation = w.lb.incarnation().next();
                **w = start_worker(cfg, worker, incarnation, w.boots + 1, o);
            }
            _ => {}
        }
    }
}

/// Whether a message travelled on a connection that no longer exists at its receiver: one to
/// an earlier gateway epoch, an open from a worker life older than the gateway knows (a dead
/// process opens no connection), one to an earlier gateway epoch than the worker's current
/// connection, or one addressed to an earlier incarnation of the worker (sent on the connection
/// of a life that has ended).
fn is_stale(state: &State, src: Id, msg: &Msg) -> bool {
    match (state, msg) {
        (State::Gateway(g), Msg::ToGateway { epoch, conn, .. }) => {
            *epoch != g.gq.state().epoch || replaced(g, src, *conn)
        }
        (State::Gateway(g), Msg::Open { epoch, conn, msg }) => {
            if epoch.is_some_and(|e| e != g.gq.state().epoch) || replaced(g, src, *conn) {
                return true;
            }
            let worker = worker_of(src);
            let known = g.gq.state().workers.get(&worker).map(|r| r.incarnation);
            match msg {
                ToGateway::Hello { incarnation, .. } => known.is_some_and(|k| *incarnation < k),
                _ => true,
            }
        }
        (State::Worker(w), Msg::ToWorker { epoch, conn, msg }) => {
            w.epoch.is_some_and(|e| *epoch < e)
                || *conn < w.conn
                || msg.incarnation() != w.lb.incarnation()
        }
        _ => false,
    }
}

/// Whether the gateway has seen the worker open a later connection than `conn`: the transport
/// replaced that one, and reads nothing more from it.
fn replaced(g: &GatewayState, src: Id, conn: u32) -> bool {
    g.conns.get(&worker_of(src)).is_some_and(|c| conn < *c)
}

fn worker_of(actor: Id) -> WorkerId {
    WorkerId((usize::from(actor) as u32).wrapping_sub(1))
}

/// Starts a worker's life `boots` as `incarnation`, and says `Hello`.
fn start_worker(
    cfg: &ModelCfg,
    worker: WorkerId,
    incarnation: Incarnation,
    boots: u32,
    o: &mut Out<Node>,
) -> WorkerState {
    let mut w = WorkerState {
        lb: LocalBus::new(cfg.lb_config(worker), incarnation).with_mutations(cfg.mutations),
        epoch: None,
        boots,
        conn: 0,
        reconnects: cfg.reconnects,
        resends: cfg.resends,
        gone: false,
        started: BTreeSet::new(),
        started_twice: false,
    };
    if cfg.worker_dies && worker == WorkerId(0) {
        o.set_timer(Timer::Die, model_timeout());
    }
    if cfg.reconnects > 0 {
        o.set_timer(Timer::Reconnect, model_timeout());
    }
    if u64::from(boots - 1) < cfg.worker_crashes {
        o.set_timer(Timer::Crash, model_timeout());
    }
    w.lb.handle(T0, LbEvent::Connected);
    drain_worker(&mut w, o);
    w
}

/// What a gateway restart keeps of the environment: the fault budgets spent, the workers gone,
/// and the checker's record of the durable history.
#[derive(Default)]
struct Spent {
    suspected: u32,
    deadlines: u32,
    gone: BTreeSet<WorkerId>,
    fired: Fired,
}

/// The joins fired in the durable history, in the order the disk took the batches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fired {
    joins: BTreeSet<CallKey>,
    /// Whether a join was fired again after it was first fired.
    pub twice: bool,
}

impl Fired {
    /// Writes a batch to the disk, noting the joins it fires.
    fn put(&mut self, durable: &mut DurableState, batch: &Batch) -> Result<(), Infallible> {
        for op in &batch.ops {
            if let Op::PutJoin(j) = op {
                let key = j.key();
                let before = durable.joins.get(&key).is_some_and(|d| d.fired);
                if j.fired && (before || !self.joins.insert(key)) {
                    self.twice = true;
                }
            }
            durable.apply(op);
        }
        Ok(())
    }
}

/// Starts the gateway: a fresh cluster, or a restart from the disk (`durable`). `spent` carries
/// what the environment keeps across its lives.
fn start_gateway(
    cfg: &ModelCfg,
    durable: Option<DurableState>,
    spent: Spent,
    o: &mut Out<Node>,
) -> GatewayState {
    let (mut gq, durable) = match durable {
        Some(d) => {
            for actor in 1..=cfg.workers + 1 {
                o.send(Id::from(actor), Msg::Restarted);
            }
            let gq = GlobalQueue::recover(cfg.gq_config(), T0, d.clone());
            (gq.with_mutations(cfg.mutations), d)
        }
        None => {
            let mut gq = GlobalQueue::new(cfg.gq_config(), T0).with_mutations(cfg.mutations);
            gq.deploy(cfg.app_spec(), bundle("a1"));
            (gq, DurableState::default())
        }
    };
    // A gateway's first act is a durable write of its epoch (and, for a fresh cluster, of the
    // app), before it serves anything: the disk then counts every start.
    let mut disk = MemDisk::new(durable);
    while let Some(out) = gq.poll_output() {
        if let GqOutput::Persist(b) = out {
            disk.take(b);
            let Ok(_) = disk.flush(&mut gq, T0, 1, disk::put);
        }
    }
    if disk.durable().epoch.saturating_sub(1) < cfg.gateway_crashes {
        o.set_timer(Timer::Crash, model_timeout());
    }
    let mut g = GatewayState {
        gq,
        disk,
        suspected: spent.suspected,
        deadlines: spent.deadlines,
        gone: spent.gone,
        fired: spent.fired,
        waiting: BTreeMap::new(),
        lookups: BTreeMap::new(),
        armed: BTreeSet::new(),
        conns: BTreeMap::new(),
    };
    drain_gateway(cfg, &mut g, o);
    g
}

fn gateway_msg(cfg: &ModelCfg, g: &mut GatewayState, src: Id, msg: Msg, o: &mut Out<Node>) {
    let worker = worker_of(src);
    match msg {
        Msg::Invoke { request } => {
            let key = Some(request.to_string());
            if let Ok(inv) = g.gq.invoke(
                T0,
                &app(),
                text(i64::from(request)),
                key,
                TraceParent::default(),
            ) {
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
        Msg::Change { deploy: true } => {
            let (spec, bundle) = cfg.second_app();
            g.gq.deploy(spec, bundle);
        }
        Msg::Change { deploy: false } => g.gq.remove_app(&second_app()),
        Msg::Poll { request } => {
            // The execution of the request's key, as the queue knows it (a client holds its
            // id); what a look-up shows of it is what the queue says is visible.
            let key = request.to_string();
            let execs = g.gq.state().execs.values();
            let exec = execs
                .filter(|e| e.idempotency.as_ref().is_some_and(|i| i.key == key))
                .map(|e| e.exec)
                .next();
            let seen = exec.and_then(|e| g.gq.execution(e)).cloned();
            if let Some(ExecRecord {
                exec,
                status: ExecStatus::Done(answer),
                ..
            }) = seen
            {
                look_up_answer(cfg, request, exec, answer, o);
            }
        }
        Msg::Open { conn, msg, .. } => {
            // A new connection replaces the worker's old one.
            if g.conns.insert(worker, conn) != Some(conn) {
                g.gq.handle(T0, GqEvent::Disconnected(worker));
            }
            g.gq.handle(T0, GqEvent::Message(worker, msg));
        }
        Msg::ToGateway { msg, .. } => g.gq.handle(T0, GqEvent::Message(worker, msg)),
        Msg::Gone => {
            g.gone.insert(worker);
        }
        _ => {}
    }
    drain_gateway(cfg, g, o);
}

/// Carries out the global queue's outputs.
///
/// A batch becomes durable when the `Fsync` timer fires, at a moment the checker chooses, as
/// long as the gateway may still crash. Once its crash budget is spent, a batch is durable the
/// moment it is written: then durability only decides *when* the queue's gated outputs (acks,
/// answers, `Welcome`s) leave, never what the queue decides (it reads no durability but to
/// gate), and a message that leaves earlier may still arrive at any later moment. Every run
/// with a late write is thus matched by one with an instant write and the same deliveries, and
/// the states that differ only by a pending write are gone. (The durability property is then
/// true by construction; it is checked in the lives that can still crash, where it matters.)
fn drain_gateway(cfg: &ModelCfg, g: &mut GatewayState, o: &mut Out<Node>) {
    let client = Id::from(cfg.workers + 1);
    let may_crash = g.disk.durable().epoch.saturating_sub(1) < cfg.gateway_crashes;
    while let Some(out) = g.gq.poll_output() {
        match out {
            GqOutput::Persist(b) if may_crash => {
                g.disk.take(b);
                o.set_timer(Timer::Fsync, model_timeout());
            }
            GqOutput::Persist(b) => {
                g.disk.take(b);
                let fired = &mut g.fired;
                let Ok(_) = g.disk.flush(&mut g.gq, T0, 1, |d, b| fired.put(d, b));
            }
            GqOutput::Send(w, msg) => {
                let epoch = g.gq.state().epoch;
                let conn = g.conns.get(&w).copied().unwrap_or_default();
                o.send(
                    Id::from(w.0 as usize + 1),
                    Msg::ToWorker { epoch, conn, msg },
                );
            }
            GqOutput::ConfirmInvoke(exec) => {
                // A look-up for a retried request: answer it if the execution already ended.
                if let Some(ExecStatus::Done(answer)) = g.gq.execution(exec).map(|e| &e.status) {
                    for request in g.lookups.remove(&exec).unwrap_or_default() {
                        look_up_answer(cfg, request, exec, answer.clone(), o);
                    }
                }
            }
            GqOutput::ConfirmDeploy(_) => o.send(client, Msg::Changed { deployed: true }),
            GqOutput::ConfirmRemove { .. } => o.send(client, Msg::Changed { deployed: false }),
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
    if g.disk.unwritten() == 0 {
        o.cancel_timer(Timer::Fsync);
    }
    // Suspicion is explored within its budget; a crashed worker is found by its new Hello.
    // Deadlines likewise: a grain finishes at any moment anyway.
    let suspect = g.suspected < cfg.suspicions;
    let deadline = g.deadlines < cfg.deadlines;
    let now: BTreeSet<GqTimer> =
        g.gq.timers()
            .map(|(t, _)| t)
            .filter(|t| match t {
                GqTimer::Suspect(w) => suspect || g.gone.contains(w),
                GqTimer::Deadline(..) => deadline,
                GqTimer::Retry(..) => true,
            })
            .collect();
    for t in g.armed.difference(&now) {
        o.cancel_timer(Timer::Gq(*t));
    }
    for t in now.difference(&g.armed) {
        o.set_timer(Timer::Gq(*t), model_timeout());
    }
    g.armed = now;
}

/// Answers request `request` with what a look-up found: its execution's durable answer.
fn look_up_answer(cfg: &ModelCfg, request: u8, exec: ExecId, answer: Answer, o: &mut Out<Node>) {
    let msg = Msg::Answer {
        request: Some(request),
        exec,
        first: false,
        answer,
    };
    o.send(Id::from(cfg.workers + 1), msg);
}

fn worker_msg(w: &mut WorkerState, msg: Msg, o: &mut Out<Node>) {
    match msg {
        Msg::Restarted => {
            w.epoch = None;
            w.lb.handle(T0, LbEvent::Disconnected);
            w.lb.handle(T0, LbEvent::Connected);
        }
        Msg::ToWorker { epoch, conn, msg } => {
            // The first answer on a new connection names the gateway epoch it belongs to.
            if w.epoch.is_none_or(|e| e < epoch) {
                w.epoch = Some(epoch);
            }
            if w.epoch == Some(epoch) && conn == w.conn {
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
                let (epoch, conn) = (w.epoch, w.conn);
                o.send(gateway_id(), Msg::Open { epoch, conn, msg })
            }
            LbOutput::Send(msg) => {
                if let Some(epoch) = w.epoch {
                    let conn = w.conn;
                    o.send(gateway_id(), Msg::ToGateway { epoch, conn, msg });
                }
            }
            LbOutput::Run(spec) => {
                let run = spec.run_key();
                w.started_twice |= !w.started.insert(run);
                o.set_timer(Timer::Grain(run), model_timeout());
            }
            LbOutput::Abort(run) => o.cancel_timer(Timer::Grain(run)),
            // The incarnation is in the worker's state, which a restart reads; a new one has
            // started nothing yet.
            LbOutput::PersistIncarnation(_) => w.started.clear(),
        }
    }
    // The re-send timer fires at any moment while it is set and the budget lasts.
    if w.resends > 0 && w.lb.timers().any(|(t, _)| t == LbTimer::Resend) {
        o.set_timer(Timer::Resend, model_timeout());
    } else {
        o.cancel_timer(Timer::Resend);
    }
}

/// The configuration `cfg` with mutation `m` switched on.
pub fn mutated(cfg: ModelCfg, m: Mutation) -> ModelCfg {
    ModelCfg {
        mutations: Mutations::only(m),
        ..cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dead letters leave the network, and every copy of every other message stays.
    #[test]
    fn dropping_dead_letters_keeps_every_copy_of_the_rest() {
        let cfg = ModelCfg::default();
        let client = Id::from(cfg.workers + 1);
        let model = cfg.into_model();
        let mut s = model.init_states().remove(0);
        let invoke = Envelope {
            src: client,
            dst: gateway_id(),
            msg: Msg::Invoke { request: 0 },
        };
        let to_dead_epoch = Envelope {
            src: Id::from(1),
            dst: gateway_id(),
            msg: Msg::ToGateway {
                epoch: 0,
                conn: 0,
                msg: ToGateway::Hello {
                    incarnation: Incarnation(1),
                    resumed: false,
                    started: Vec::new(),
                },
            },
        };
        s.network =
            Network::new_unordered_nonduplicating([invoke.clone(), invoke.clone(), to_dead_epoch]);
        drop_dead_connections(&mut s, false);
        let left: Vec<Envelope<&Msg>> = s.network.iter_deliverable().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].msg, &invoke.msg);
        assert_eq!(s.network.len(), 2, "{:?}", s.network);
    }
}
