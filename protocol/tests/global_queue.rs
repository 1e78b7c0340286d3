//! Unit tests of the global queue: one event in, the exact outputs asserted.

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use std::time::Duration;

use sand_protocol::durable::{Answer, Batch, DurableState, ExecStatus, LogIndex, Op, Owner};
use sand_protocol::global_queue::{GlobalQueue, GqConfig, GqEvent, GqOutput, GqTimer, InvokeError};
use sand_protocol::ids::{
    AppName, Attempt, CallId, CallKey, ExecId, GrainName, Incarnation, RunKey, Seq, WorkerId,
};
use sand_protocol::policy::{AppSpec, GrainPolicy};
use sand_protocol::time::Time;
use sand_protocol::wire::{
    AppBundle, CallSpec, Cont, Effects, ErrorKind, GrainError, JoinSpec, NewCall, Outcome, Payload,
    Reason, Report, Return, ToGateway, ToWorker,
};

const W0: WorkerId = WorkerId(0);
const W1: WorkerId = WorkerId(1);
const I1: Incarnation = Incarnation(1);
const T0: Time = Time::ZERO;

fn grain(s: &str) -> GrainName {
    GrainName::new(s).unwrap()
}

fn app() -> AppName {
    AppName::new("app").unwrap()
}

/// A second app, `other`, of one grain.
fn other_app() -> (AppName, AppSpec) {
    let name = AppName::new("other").unwrap();
    let spec = AppSpec {
        name: name.clone(),
        entry: grain("a"),
        grains: [(grain("a"), policy())].into_iter().collect(),
    };
    (name, spec)
}

fn bundle() -> AppBundle {
    AppBundle {
        digest: "d".into(),
        archive: Default::default(),
    }
}

fn policy() -> GrainPolicy {
    GrainPolicy {
        attempts_max: 2,
        backoff_ms: 100,
        backoff_factor_milli: 2000,
        backoff_ms_max: 1000,
        timeout_ms: Some(1000),
    }
}

/// A worker's `Hello`, listing no started attempt.
fn hello(incarnation: Incarnation, resumed: bool) -> ToGateway {
    ToGateway::Hello {
        incarnation,
        resumed,
        started: Vec::new(),
    }
}

/// The `Welcome` of the default configuration to worker `w`'s incarnation.
fn welcome(w: WorkerId, incarnation: Incarnation, applied: Seq) -> GqOutput {
    let heartbeat = GqConfig::default().heartbeat_interval();
    send(
        w,
        ToWorker::Welcome {
            incarnation,
            applied,
            heartbeat,
        },
    )
}

/// The first attempt the gateway of epoch 1 hands out.
fn first() -> Attempt {
    Attempt::epoch_floor(1)
}

/// Branch `branch` of a fan-out joined at `join`, made as call `call` by grain `b` on the
/// worker that reports it, one level deeper than the entry call.
fn branch_call(call: CallId, join: CallId, branch: u32) -> NewCall {
    NewCall {
        call,
        grain: grain("b"),
        input: Payload::from("0"),
        cont: Cont::Join { join, branch },
        owned: true,
        depth_left: 15,
        traceparent: Default::default(),
    }
}

/// The entry call `c0` fanning out to `n` branches of grain `b`, joined by `join_grain`,
/// whose value answers the client.
fn fan_out(c0: CallId, n: u32, join_grain: &str) -> Effects {
    let join = c0.join();
    Effects {
        joins: vec![JoinSpec {
            call: join,
            grain: grain(join_grain),
            branches: n,
            cont: Cont::Client,
            depth_left: 16,
            traceparent: Default::default(),
        }],
        spawned: (0..n).map(|i| branch_call(c0.child(i), join, i)).collect(),
        ..Effects::default()
    }
}

/// A test driver: a global queue, its store, and everything it said.
struct Gq {
    gq: GlobalQueue,
    store: DurableState,
    unpersisted: Vec<Batch>,
}

impl Gq {
    /// A queue with `app` deployed and everything persisted.
    fn new() -> Self {
        Self::with_config(GqConfig::default())
    }

    fn with_config(config: GqConfig) -> Self {
        let mut gq = GlobalQueue::new(config, T0);
        gq.deploy(
            AppSpec {
                name: app(),
                entry: grain("a"),
                grains: [(grain("a"), policy()), (grain("b"), policy())]
                    .into_iter()
                    .collect(),
            },
            bundle(),
        );
        let mut t = Self {
            gq,
            store: DurableState::default(),
            unpersisted: Vec::new(),
        };
        assert_eq!(t.drain(), vec![]);
        assert_eq!(t.persist(), vec![GqOutput::ConfirmDeploy(app())]);
        t
    }

    /// Drains outputs, keeping batches aside.
    fn drain(&mut self) -> Vec<GqOutput> {
        let mut out = Vec::new();
        while let Some(o) = self.gq.poll_output() {
            match o {
                GqOutput::Persist(b) => self.unpersisted.push(b),
                o => out.push(o),
            }
        }
        out
    }

    /// Persists everything and returns what that released.
    fn persist(&mut self) -> Vec<GqOutput> {
        let mut upto = LogIndex(0);
        for b in self.unpersisted.drain(..) {
            self.store.apply_batch(&b);
            upto = b.index;
        }
        self.gq.handle(T0, GqEvent::Persisted(upto));
        self.drain()
    }

    /// Persists only the oldest batch not yet persisted and returns what that released.
    fn persist_oldest(&mut self) -> Vec<GqOutput> {
        let b = self.unpersisted.remove(0);
        self.store.apply_batch(&b);
        self.gq.handle(T0, GqEvent::Persisted(b.index));
        self.drain()
    }

    fn msg(&mut self, w: WorkerId, m: ToGateway) -> Vec<GqOutput> {
        self.gq.handle(T0, GqEvent::Message(w, m));
        self.drain()
    }

    fn hello(&mut self, w: WorkerId, i: Incarnation) {
        assert_eq!(self.msg(w, hello(i, false)), vec![]);
        assert_eq!(self.persist(), vec![welcome(w, i, Seq(0))]);
    }

    fn invoke(&mut self, input: &str) -> (ExecId, Vec<GqOutput>) {
        let inv = self
            .gq
            .invoke(T0, &app(), Payload::from(input), None, Default::default())
            .unwrap();
        assert!(inv.fresh);
        (inv.exec, self.drain())
    }

    fn progress(&mut self, w: WorkerId, seq: u64, reports: Vec<Report>) -> Vec<GqOutput> {
        self.msg(
            w,
            ToGateway::Progress {
                incarnation: I1,
                seq: Seq(seq),
                reports,
            },
        )
    }

    fn fire(&mut self, t: GqTimer) -> Vec<GqOutput> {
        self.gq.handle(T0, GqEvent::Timeout(t));
        self.drain()
    }
}

fn send(w: WorkerId, m: ToWorker) -> GqOutput {
    GqOutput::Send(w, m)
}

fn spec(exec: ExecId, g: &str, input: &str, attempt: Attempt) -> CallSpec {
    CallSpec {
        exec,
        call: exec.root_call(),
        attempt,
        app: app(),
        grain: grain(g),
        input: Payload::from(input),
        cont: Cont::Client,
        depth_left: 16,
        exec_ref: String::new(),
        traceparent: Default::default(),
    }
}

fn dispatch(w: WorkerId, call: CallSpec, reason: Reason) -> GqOutput {
    send(
        w,
        ToWorker::Dispatch {
            incarnation: I1,
            call,
            reason,
        },
    )
}

fn done(exec: ExecId, call: CallId, attempt: Attempt, e: Effects) -> Report {
    Report {
        exec,
        call,
        attempt,
        outcome: Outcome::Done(e),
    }
}

fn returns(value: &str) -> Effects {
    Effects {
        returns: vec![Return {
            cont: Cont::Client,
            value: Payload::from(value),
        }],
        ..Effects::default()
    }
}

fn ack(w: WorkerId, upto: u64) -> GqOutput {
    send(
        w,
        ToWorker::Ack {
            incarnation: I1,
            upto: Seq(upto),
        },
    )
}

#[test]
fn nothing_is_sent_before_the_epoch_is_durable() {
    let mut gq = GlobalQueue::new(GqConfig::default(), T0);
    let Some(GqOutput::Persist(b)) = gq.poll_output() else {
        panic!("the epoch record comes first")
    };
    assert_eq!(b.ops, vec![Op::Epoch(1)]);
    gq.handle(T0, GqEvent::Message(W0, hello(I1, false)));
    assert!(matches!(gq.poll_output(), Some(GqOutput::Persist(_))));
    assert_eq!(gq.poll_output(), None, "the Welcome waits for the disk");
    gq.handle(T0, GqEvent::Persisted(LogIndex(2)));
    assert_eq!(gq.poll_output(), Some(welcome(W0, I1, Seq(0))));
}

#[test]
fn an_invocation_is_dispatched_at_once_and_accepted_once_durable() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, out) = t.invoke("1");
    assert_eq!(
        out,
        vec![dispatch(W0, spec(exec, "a", "1", first()), Reason::First)]
    );
    assert_eq!(t.persist(), vec![GqOutput::ConfirmInvoke(exec)]);
    assert_eq!(t.store.execs[&exec].status, ExecStatus::Running);
}

#[test]
fn a_look_up_shows_what_the_disk_holds_while_later_batches_are_written() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    let report = done(exec, exec.root_call(), first(), returns("42"));
    assert_eq!(t.progress(W0, 1, vec![report]), vec![]);
    // The acceptance is durable, the answer's batch not yet: the client that was told the id
    // must find the execution, running, as the disk holds it.
    assert_eq!(t.persist_oldest(), vec![GqOutput::ConfirmInvoke(exec)]);
    assert_eq!(t.store.execs[&exec].status, ExecStatus::Running);
    assert_eq!(
        t.gq.execution(exec).map(|e| &e.status),
        Some(&ExecStatus::Running)
    );
    assert_eq!(
        t.persist(),
        vec![
            GqOutput::Respond(exec, Answer::Value(Payload::from("42"))),
            ack(W0, 1)
        ]
    );
    assert_eq!(t.gq.execution(exec), t.store.execs.get(&exec));

    // The same for apps: a deployment confirmed durable is listed while its removal is being
    // written.
    let (other, spec) = other_app();
    t.gq.deploy(spec, bundle());
    t.gq.remove_app(&other);
    assert_eq!(t.drain(), vec![]);
    assert_eq!(
        t.persist_oldest(),
        vec![GqOutput::ConfirmDeploy(other.clone())]
    );
    assert!(t.gq.deployed().iter().any(|d| d.spec.name == other));
    assert_eq!(
        t.persist_oldest(),
        vec![GqOutput::ConfirmRemove {
            app: other.clone(),
            existed: true
        }]
    );
    assert!(t.gq.deployed().iter().all(|d| d.spec.name != other));
}

#[test]
fn executions_are_listed_newest_first_as_the_disk_holds_them() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let ids: Vec<ExecId> = (0..3).map(|i| t.invoke(&i.to_string()).0).collect();
    t.persist();
    // The fourth's acceptance is not durable yet: no client was told of it.
    let (fourth, _) = t.invoke("3");
    let listed = |t: &Gq, before, limit| -> Vec<ExecId> {
        t.gq.executions(before)
            .take(limit)
            .map(|e| e.exec)
            .collect()
    };
    assert_eq!(listed(&t, None, 10), vec![ids[2], ids[1], ids[0]]);
    assert_eq!(listed(&t, None, 2), vec![ids[2], ids[1]]);
    assert_eq!(listed(&t, Some(ids[1]), 10), vec![ids[0]]);
    assert_eq!(listed(&t, Some(ids[0]), 10), vec![]);
    t.persist();
    assert_eq!(listed(&t, None, 1), vec![fourth]);
    assert_eq!(listed(&t, None, 10), vec![fourth, ids[2], ids[1], ids[0]]);
    // An answer being written: the execution is listed once, running, as the disk holds it.
    let report = done(ids[0], ids[0].root_call(), first(), returns("42"));
    assert_eq!(t.progress(W0, 1, vec![report]), vec![]);
    assert_eq!(listed(&t, None, 10), vec![fourth, ids[2], ids[1], ids[0]]);
    let status = |t: &Gq| t.gq.executions(None).nth(3).map(|e| e.status.clone());
    assert_eq!(status(&t), Some(ExecStatus::Running));
    t.persist();
    assert!(matches!(status(&t), Some(ExecStatus::Done(_))));
}

#[test]
fn an_unknown_app_or_an_oversize_input_is_refused() {
    let mut t = Gq::new();
    let nope = AppName::new("nope").unwrap();
    assert_eq!(
        t.gq.invoke(T0, &nope, Payload::from("1"), None, Default::default()),
        Err(InvokeError::UnknownApp(nope))
    );
    let big = Payload::new(vec![b'1'; sand_protocol::wire::PAYLOAD_BYTES_MAX + 1]);
    assert!(matches!(
        t.gq.invoke(T0, &app(), big, None, Default::default()),
        Err(InvokeError::TooLarge(_))
    ));
    assert_eq!(t.drain(), vec![]);
}

#[test]
fn an_idempotency_key_finds_the_first_execution() {
    let mut t = Gq::new();
    let first =
        t.gq.invoke(
            T0,
            &app(),
            Payload::from("1"),
            Some("k".into()),
            Default::default(),
        )
        .unwrap();
    t.drain();
    let again =
        t.gq.invoke(
            T0,
            &app(),
            Payload::from("1"),
            Some("k".into()),
            Default::default(),
        )
        .unwrap();
    assert_eq!(again.exec, first.exec);
    assert!(!again.fresh);
    assert_eq!(t.drain(), vec![]);
    assert_eq!(
        t.persist(),
        vec![
            GqOutput::ConfirmInvoke(first.exec),
            GqOutput::ConfirmInvoke(first.exec)
        ]
    );
}

#[test]
fn the_same_key_with_another_input_is_refused_in_this_life_and_the_next() {
    let mut t = Gq::new();
    let key = Some("k".to_string());
    let first = t.gq.invoke(
        T0,
        &app(),
        Payload::from("1"),
        key.clone(),
        Default::default(),
    );
    let first = first.unwrap().exec;
    t.drain();
    t.persist();
    let reused = t.gq.invoke(
        T0,
        &app(),
        Payload::from("2"),
        key.clone(),
        Default::default(),
    );
    let expected = InvokeError::KeyReused {
        key: "k".into(),
        exec: first,
    };
    assert_eq!(reused, Err(expected.clone()));
    assert_eq!(t.drain(), vec![], "a refused invocation changed something");
    let mut recovered = GlobalQueue::recover(GqConfig::default(), T0, t.store.clone());
    let reused = recovered.invoke(T0, &app(), Payload::from("2"), key, Default::default());
    assert_eq!(reused, Err(expected));
}

#[test]
fn a_key_past_its_lifetime_starts_a_new_execution() {
    let mut t = Gq::new();
    let ttl = GqConfig::default().key_ttl;
    let key = Some("k".to_string());
    let first = t.gq.invoke(
        T0,
        &app(),
        Payload::from("1"),
        key.clone(),
        Default::default(),
    );
    let first = first.unwrap().exec;
    let just_before = T0 + (ttl - Duration::from_millis(1));
    let again = t.gq.invoke(
        just_before,
        &app(),
        Payload::from("1"),
        key.clone(),
        Default::default(),
    );
    assert_eq!(again.unwrap().exec, first);
    // Past its lifetime the key is free, whatever the input, and names the new execution.
    let later = t.gq.invoke(
        T0 + ttl,
        &app(),
        Payload::from("2"),
        key.clone(),
        Default::default(),
    );
    let later = later.unwrap();
    assert!(later.fresh);
    assert_ne!(later.exec, first);
    let again = t.gq.invoke(
        T0 + ttl,
        &app(),
        Payload::from("2"),
        key,
        Default::default(),
    );
    assert_eq!(again.unwrap().exec, later.exec);
}

#[test]
fn a_call_waits_for_a_worker_then_is_placed_on_hello() {
    let mut t = Gq::new();
    let (exec, out) = t.invoke("1");
    assert_eq!(out, vec![], "no worker yet");
    let out = t.msg(W0, hello(I1, false));
    assert_eq!(
        out,
        vec![dispatch(W0, spec(exec, "a", "1", first()), Reason::First)]
    );
    let rec = &t.gq.state().calls[&CallKey::new(exec, exec.root_call())];
    assert_eq!(
        rec.owner,
        Some(Owner {
            worker: W0,
            incarnation: I1
        })
    );
}

#[test]
fn a_final_value_is_answered_once_after_it_is_durable() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let report = done(exec, exec.root_call(), first(), returns("42"));
    assert_eq!(t.progress(W0, 1, vec![report.clone()]), vec![]);
    assert_eq!(
        t.persist(),
        vec![
            GqOutput::Respond(exec, Answer::Value(Payload::from("42"))),
            ack(W0, 1)
        ]
    );
    // A re-sent copy changes nothing and is acked again at once: its effect is durable.
    assert_eq!(t.progress(W0, 1, vec![report]), vec![ack(W0, 1)]);
    assert_eq!(t.persist(), vec![]);
    assert!(t.gq.state().calls.is_empty());
}

#[test]
fn progress_is_applied_in_the_order_sent() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let c0 = exec.root_call();
    let c1 = c0.child(0);
    let hop = Effects {
        spawned: vec![NewCall {
            call: c1,
            grain: grain("b"),
            input: Payload::from("2"),
            cont: Cont::Client,
            owned: true,
            depth_left: 16,
            traceparent: Default::default(),
        }],
        ..Effects::default()
    };
    // c1 → value arrives first: held back, neither applied nor acked.
    assert_eq!(
        t.progress(W0, 2, vec![done(exec, c1, first(), returns("9"))]),
        vec![]
    );
    assert_eq!(t.persist(), vec![]);
    // c0 → c1 arrives: both apply, in order.
    assert_eq!(
        t.progress(W0, 1, vec![done(exec, c0, first(), hop)]),
        vec![]
    );
    assert_eq!(
        t.persist(),
        vec![
            GqOutput::Respond(exec, Answer::Value(Payload::from("9"))),
            ack(W0, 2)
        ]
    );
}

#[test]
fn a_locally_run_call_is_owned_and_an_unowned_one_is_placed() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    t.hello(W1, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let c0 = exec.root_call();
    let new = |i: u32, owned| NewCall {
        call: c0.child(i),
        grain: grain("b"),
        input: Payload::from("2"),
        cont: Cont::Client,
        owned,
        depth_left: 16,
        traceparent: Default::default(),
    };
    let effects = Effects {
        spawned: vec![new(0, true), new(1, false)],
        ..Effects::default()
    };
    // W0 owns c0 and one new call, so W1 is the least loaded.
    let out = t.progress(W0, 1, vec![done(exec, c0, first(), effects)]);
    // The call spawned here runs under its parent's attempt; the placed one gets a fresh one.
    let mut placed = spec(exec, "b", "2", Attempt::placement(1, 1));
    placed.call = c0.child(1);
    assert_eq!(out, vec![dispatch(W1, placed, Reason::First)]);
    let owner = |i| {
        t.gq.state().calls[&CallKey::new(exec, c0.child(i))]
            .owner
            .unwrap()
            .worker
    };
    assert_eq!((owner(0), owner(1)), (W0, W1));
    assert_eq!(
        (t.gq.load(W0), t.gq.load(W1), t.gq.load(WorkerId(9))),
        (1, 1, 0)
    );
}

#[test]
fn a_failed_attempt_is_retried_after_a_backoff_then_fails_the_execution() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let c0 = exec.root_call();
    let failed = |attempt| Report {
        exec,
        call: c0,
        attempt,
        outcome: Outcome::Failed(GrainError::new(ErrorKind::Raised, "boom")),
    };
    assert_eq!(t.progress(W0, 1, vec![failed(first())]), vec![]);
    let retry = GqTimer::Retry(CallKey::new(exec, c0));
    let at = t.gq.timers().find(|(t, _)| *t == retry).map(|(_, at)| at);
    assert_eq!(at, Some(T0 + Duration::from_millis(100)));
    let second = Attempt::placement(1, 1);
    assert_eq!(
        t.fire(retry),
        vec![dispatch(W0, spec(exec, "a", "1", second), Reason::Retry)]
    );
    // A late report of the first attempt changes nothing.
    let before = t.gq.state().clone();
    t.progress(W0, 2, vec![done(exec, c0, first(), returns("1"))]);
    assert_eq!(t.gq.state().calls, before.calls);
    // The second failure is the last allowed: the execution fails with it.
    t.progress(W0, 3, vec![failed(second)]);
    let error = GrainError::new(ErrorKind::Raised, "boom");
    assert_eq!(
        t.persist(),
        vec![
            ack(W0, 1),
            ack(W0, 2),
            send(
                W0,
                ToWorker::Cancel {
                    incarnation: I1,
                    exec
                }
            ),
            GqOutput::Respond(exec, Answer::Error(error)),
            ack(W0, 3)
        ]
    );
}

#[test]
fn a_deadline_aborts_the_attempt_and_retries_it() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    let c0 = exec.root_call();
    let deadline = GqTimer::Deadline(CallKey::new(exec, c0));
    let at =
        t.gq.timers()
            .find(|(t, _)| *t == deadline)
            .map(|(_, at)| at);
    assert_eq!(
        at,
        Some(T0 + Duration::from_millis(1000) + GqConfig::default().timeout_grace)
    );
    let abort = ToWorker::Abort {
        incarnation: I1,
        exec,
        call: c0,
        attempt: first(),
    };
    // The abort lets the worker drop the attempt: it waits until the failure is durable.
    assert_eq!(t.fire(deadline), vec![]);
    assert_eq!(
        t.persist(),
        vec![GqOutput::ConfirmInvoke(exec), send(W0, abort)]
    );
    let rec = &t.gq.state().calls[&CallKey::new(exec, c0)];
    assert_eq!((rec.failures, rec.owner), (1, None));
}

#[test]
fn a_silent_worker_is_declared_dead_and_its_calls_move() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    t.hello(W1, I1);
    let second = Attempt::placement(1, 1);
    assert_eq!(
        t.fire(GqTimer::Suspect(W0)),
        vec![dispatch(W1, spec(exec, "a", "1", second), Reason::Recovery)]
    );
    // Anything the dead incarnation says is refused, once the fence is durable.
    let before = t.gq.state().clone();
    let late = done(exec, exec.root_call(), first(), returns("1"));
    assert_eq!(t.progress(W0, 1, vec![late]), vec![]);
    assert_eq!(t.gq.state(), &before);
    // Once at the suspicion (in case it is only slow), once in answer to its late message.
    let fenced = send(
        W0,
        ToWorker::Fenced {
            incarnation: I1,
            successor: Incarnation(2),
        },
    );
    assert_eq!(t.persist(), vec![fenced.clone(), fenced]);
    assert!(t.store.workers[&W0].dead);
}

#[test]
fn a_new_incarnation_loses_the_old_ones_calls_at_once() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let i2 = I1.next();
    let out = t.msg(W0, hello(i2, false));
    let mut call = spec(exec, "a", "1", Attempt::placement(1, 1));
    call.attempt = Attempt::placement(1, 1);
    assert_eq!(
        out,
        vec![send(
            W0,
            ToWorker::Dispatch {
                incarnation: i2,
                call,
                reason: Reason::Recovery,
            }
        )]
    );
    assert_eq!(t.persist(), vec![welcome(W0, i2, Seq(0))]);
}

#[test]
fn a_reconnect_resends_the_dispatches_it_owns() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    t.gq.handle(T0, GqEvent::Disconnected(W0));
    assert!(!t.gq.is_connected(W0));
    // Nothing new needs the disk, so the Welcome leaves at once, after the dispatch.
    let out = t.msg(W0, hello(I1, true));
    let welcome = welcome(W0, I1, Seq(0));
    assert_eq!(
        out,
        vec![
            dispatch(W0, spec(exec, "a", "1", first()), Reason::Resent),
            welcome
        ]
    );
    assert!(t.gq.is_connected(W0));
}

#[test]
fn heartbeats_put_off_suspicion() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let later = T0 + Duration::from_secs(3);
    t.gq.handle(
        later,
        GqEvent::Message(
            W0,
            ToGateway::Heartbeat {
                incarnation: I1,
                running: 0,
            },
        ),
    );
    assert_eq!(
        t.gq.poll_timeout(),
        Some(later + GqConfig::default().failure_timeout)
    );
    t.gq.handle_timeouts(later + Duration::from_secs(4));
    assert!(!t.gq.state().workers[&W0].dead);
    t.gq.handle_timeouts(later + Duration::from_secs(5));
    assert!(t.gq.state().workers[&W0].dead);
}

#[test]
fn a_fan_out_joins_once_in_branch_order_and_cancels_leftovers() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    t.hello(W1, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let c0 = exec.root_call();
    let join = c0.join();
    let fan = fan_out(c0, 3, "j");
    let contribute = |i: u32, v: &str| Effects {
        returns: vec![Return {
            cont: Cont::Join { join, branch: i },
            value: Payload::from(v),
        }],
        ..Effects::default()
    };
    t.progress(W0, 1, vec![done(exec, c0, first(), fan)]);
    t.progress(
        W0,
        2,
        vec![done(exec, c0.child(2), first(), contribute(2, "c"))],
    );
    // A second contribution for the same branch is ignored.
    t.progress(
        W0,
        3,
        vec![done(exec, c0.child(0), first(), contribute(0, "a"))],
    );
    assert!(!t.gq.state().joins[&CallKey::new(exec, join)].fired);
    let out = t.progress(
        W0,
        4,
        vec![done(exec, c0.child(1), first(), contribute(1, "b"))],
    );
    // The gateway's own placement of the join: an attempt no lineage carries.
    let mut j = spec(exec, "j", "[a,b,c]", Attempt::placement(1, 1));
    j.call = join;
    assert_eq!(
        out,
        vec![dispatch(W0, j.clone(), Reason::First)],
        "both idle: the lowest id wins"
    );
    assert!(t.gq.state().joins[&CallKey::new(exec, join)].fired);
    // The join answers; nothing is left.
    t.progress(W0, 5, vec![done(exec, join, j.attempt, returns("abc"))]);
    assert!(t.gq.state().calls.is_empty() && t.gq.state().joins.is_empty());
}

#[test]
fn a_join_started_by_the_worker_is_owned_by_it() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let c0 = exec.root_call();
    let join = c0.join();
    // The whole fan-out ran on W0 and was coalesced into one report.
    let effects = Effects {
        joins: vec![JoinSpec {
            call: join,
            grain: grain("j"),
            branches: 1,
            cont: Cont::Client,
            depth_left: 16,
            traceparent: Default::default(),
        }],
        returns: vec![Return {
            cont: Cont::Join { join, branch: 0 },
            value: Payload::from("x"),
        }],
        spawned: vec![NewCall {
            call: join,
            grain: grain("j"),
            input: Payload::from("[x]"),
            cont: Cont::Client,
            owned: true,
            depth_left: 16,
            traceparent: Default::default(),
        }],
    };
    assert_eq!(
        t.progress(W0, 1, vec![done(exec, c0, first(), effects)]),
        vec![]
    );
    let rec = &t.gq.state().calls[&CallKey::new(exec, join)];
    assert_eq!((rec.owner.unwrap().worker, rec.attempt), (W0, first()));
    assert!(t.gq.state().joins[&CallKey::new(exec, join)].fired);
}

#[test]
fn an_answer_cancels_the_calls_left_pending() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    t.hello(W1, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let c0 = exec.root_call();
    let new = |i: u32, owned| NewCall {
        call: c0.child(i),
        grain: grain("b"),
        input: Payload::from("2"),
        cont: Cont::Client,
        owned,
        depth_left: 16,
        traceparent: Default::default(),
    };
    // Two racing calls, one here and one placed on W1: the first value wins.
    let effects = Effects {
        spawned: vec![new(0, true), new(1, false)],
        ..Effects::default()
    };
    t.progress(W0, 1, vec![done(exec, c0, first(), effects)]);
    let out = t.progress(W0, 2, vec![done(exec, c0.child(0), first(), returns("x"))]);
    assert_eq!(out, vec![], "the cancel waits until the end is durable");
    assert!(t.gq.state().calls.is_empty());
    assert_eq!(
        t.persist(),
        vec![
            ack(W0, 1),
            send(
                W1,
                ToWorker::Cancel {
                    incarnation: I1,
                    exec
                }
            ),
            GqOutput::Respond(exec, Answer::Value(Payload::from("x"))),
            ack(W0, 2)
        ]
    );
    // W1's late value is ignored.
    let late = done(exec, c0.child(1), first(), returns("y"));
    assert_eq!(t.progress(W1, 1, vec![late]), vec![]);
    assert_eq!(t.persist(), vec![ack(W1, 1)]);
    assert!(t.gq.state().calls.is_empty());
}

#[test]
fn recovery_rebuilds_the_queue_from_its_records() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let recovered = GlobalQueue::recover(GqConfig::default(), T0, t.store.clone());
    assert_eq!(recovered.state().epoch, 2);
    assert_eq!(recovered.state().calls, t.gq.state().calls);
    assert_eq!(recovered.execution(exec), t.gq.execution(exec));
    let mut r = Gq {
        gq: recovered,
        store: t.store.clone(),
        unpersisted: Vec::new(),
    };
    r.drain();
    r.persist();
    // New executions get ids of the new epoch.
    let (exec2, _) = r.invoke("2");
    assert_eq!((exec2.epoch(), exec.epoch()), (2, 1));
    // The worker reconnects with the same incarnation: its call is dispatched again.
    let out = r.msg(W0, hello(I1, true));
    assert!(out.contains(&dispatch(W0, spec(exec, "a", "1", first()), Reason::Resent)));
}

#[test]
fn recovery_redispatches_the_calls_of_a_dead_incarnation() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.fire(GqTimer::Suspect(W0));
    t.persist();
    assert_eq!(
        t.store.calls[&CallKey::new(exec, exec.root_call())].owner,
        None
    );
    let gq = GlobalQueue::recover(GqConfig::default(), T0, t.store.clone());
    assert!(gq.timers().all(|(timer, _)| timer != GqTimer::Suspect(W0)));
}

#[test]
fn forget_drops_only_ended_executions() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    assert!(!t.gq.forget(exec), "still running");
    t.progress(
        W0,
        1,
        vec![done(exec, exec.root_call(), first(), returns("1"))],
    );
    t.persist();
    assert!(t.gq.forget(exec));
    t.drain();
    assert!(t.gq.execution(exec).is_some(), "forgotten before durable");
    t.persist();
    assert_eq!(t.gq.execution(exec), None);
}

#[test]
fn expire_forgets_what_ended_past_the_retention_age_and_keeps_what_runs() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let key = Some("k".to_string());
    let ended = t.gq.invoke(
        T0,
        &app(),
        Payload::from("1"),
        key.clone(),
        Default::default(),
    );
    let ended = ended.unwrap().exec;
    let (running, _) = t.invoke("2");
    let end = T0 + Duration::from_secs(10);
    let report = done(ended, ended.root_call(), first(), returns("1"));
    let msg = ToGateway::Progress {
        incarnation: I1,
        seq: Seq(1),
        reports: vec![report],
    };
    t.gq.handle(end, GqEvent::Message(W0, msg));
    t.drain();
    t.persist();
    let retention = GqConfig::default().retention;
    // Its age counts from its end, not its acceptance.
    assert_eq!(t.gq.expire(T0 + retention), vec![]);
    assert_eq!(t.gq.expire(end + retention), vec![ended]);
    t.drain();
    t.persist();
    assert_eq!(t.gq.execution(ended), None);
    assert!(
        t.gq.execution(running).is_some(),
        "a running execution was forgotten"
    );
    assert!(!t.store.execs.contains_key(&ended), "not durably forgotten");
    // Its key went with it: the same key starts a new execution.
    let again = t.gq.invoke(
        end + retention,
        &app(),
        Payload::from("1"),
        key,
        Default::default(),
    );
    assert!(again.unwrap().fresh);
}

#[test]
fn a_reconnect_redispatches_only_what_the_worker_has_not_started() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (e1, _) = t.invoke("1");
    let (e2, _) = t.invoke("2");
    t.persist();
    t.gq.handle(T0, GqEvent::Disconnected(W0));
    let started = vec![RunKey::new(e1, e1.root_call(), first())];
    let out = t.msg(
        W0,
        ToGateway::Hello {
            incarnation: I1,
            resumed: true,
            started,
        },
    );
    let welcome = welcome(W0, I1, Seq(0));
    assert_eq!(
        out,
        vec![
            dispatch(
                W0,
                spec(e2, "a", "2", Attempt::placement(1, 1)),
                Reason::Resent
            ),
            welcome
        ],
        "e1's call was started: its report will be re-sent, its dispatch is not"
    );
}

#[test]
fn a_hello_that_does_not_resume_a_known_incarnation_is_fenced_above_it() {
    let mut t = Gq::new();
    t.hello(W0, Incarnation(5));
    let (exec, _) = t.invoke("1");
    t.persist();
    // The worker restarted and lost its incarnation file: it says Hello as a life that does
    // not resume, with the incarnation the gateway knows. That life is over: declared dead,
    // and the worker told to start above it, once that is durable.
    let fenced = |incarnation| {
        send(
            W0,
            ToWorker::Fenced {
                incarnation,
                successor: Incarnation(6),
            },
        )
    };
    assert_eq!(t.msg(W0, hello(Incarnation(5), false)), vec![]);
    assert_eq!(t.persist(), vec![fenced(Incarnation(5))]);
    assert!(t.store.workers[&W0].dead, "the known life is over");
    // An older one is fenced at once: nothing changes.
    assert_eq!(
        t.msg(W0, hello(Incarnation(2), false)),
        vec![fenced(Incarnation(2))]
    );
    assert_eq!(
        t.store.calls[&CallKey::new(exec, exec.root_call())].owner,
        None
    );
    // Above it, it is welcomed as a new life and gets the call again.
    let i6 = Incarnation(6);
    let out = t.msg(W0, hello(i6, false));
    let again = ToWorker::Dispatch {
        incarnation: i6,
        call: spec(exec, "a", "1", Attempt::placement(1, 1)),
        reason: Reason::Recovery,
    };
    assert_eq!(out, vec![send(W0, again)]);
    assert_eq!(t.store.workers.get(&W0).map(|r| r.dead), Some(true));
    t.persist();
    assert_eq!(t.store.workers[&W0].incarnation, i6);
}

#[test]
fn a_resumed_hello_the_gateway_does_not_know_is_fenced_and_recorded_dead() {
    let mut t = Gq::new();
    assert_eq!(t.msg(W0, hello(Incarnation(3), true)), vec![]);
    let fenced = send(
        W0,
        ToWorker::Fenced {
            incarnation: Incarnation(3),
            successor: Incarnation(4),
        },
    );
    assert_eq!(t.persist(), vec![fenced]);
    assert!(t.store.workers[&W0].dead);
}

#[test]
fn a_failure_timeout_too_short_for_heartbeats_is_refused() {
    let short = GqConfig {
        failure_timeout: Duration::from_millis(499),
        ..GqConfig::default()
    };
    let err = short.validate().unwrap_err();
    assert!(err.to_string().contains("at least 500 ms"), "{err}");
    let ok = GqConfig {
        failure_timeout: Duration::from_millis(1000),
        ..GqConfig::default()
    };
    assert_eq!(ok.validate(), Ok(()));
    assert_eq!(ok.heartbeat_interval(), Duration::from_millis(200));
    assert_eq!(
        GqConfig::default().heartbeat_interval(),
        Duration::from_secs(1)
    );
}

/// A message that waited for the disk is sent only on the connection it was made for: the
/// transport would put it on the worker's next one, before that one's `Hello` is applied, and
/// that `Hello` decides again what to send (here, the dispatch would go twice).
#[test]
fn a_message_made_for_one_connection_never_leaves_on_the_next() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    // The gateway restarts; the worker says Hello before the new epoch is durable, so what
    // that Hello decides waits.
    let gq = GlobalQueue::recover(GqConfig::default(), T0, t.store.clone());
    let mut r = Gq {
        gq,
        store: t.store.clone(),
        unpersisted: Vec::new(),
    };
    r.drain();
    assert_eq!(r.msg(W0, hello(I1, true)), vec![]);
    // Its connection breaks; it opens another and says Hello again.
    r.gq.handle(T0, GqEvent::Disconnected(W0));
    assert_eq!(r.msg(W0, hello(I1, true)), vec![]);
    let welcome = welcome(W0, I1, Seq(0));
    assert_eq!(
        r.persist(),
        vec![
            dispatch(W0, spec(exec, "a", "1", first()), Reason::Resent),
            welcome
        ],
        "what the second Hello decided, once"
    );
}

#[test]
fn deploys_and_removals_are_told_only_once_durable_and_carry_the_code() {
    let mut t = Gq::new();
    let (other, spec) = other_app();
    t.gq.deploy(spec.clone(), bundle());
    assert_eq!(t.drain(), vec![], "told before durable");
    let listed = |t: &Gq| -> Vec<String> {
        t.gq.deployed()
            .iter()
            .map(|d| d.spec.name.to_string())
            .collect()
    };
    assert_eq!(listed(&t), ["app"], "listed before durable");
    assert_eq!(t.persist(), vec![GqOutput::ConfirmDeploy(other.clone())]);
    assert_eq!(
        t.store.apps[&other].bundle,
        bundle(),
        "the code is in the same write"
    );

    assert_eq!(listed(&t), ["app", "other"]);
    t.gq.remove_app(&other);
    assert_eq!(t.drain(), vec![], "told before durable");
    assert!(t.store.apps.contains_key(&other));
    assert_eq!(
        listed(&t),
        ["app", "other"],
        "gone from the list before durable"
    );
    let removed = GqOutput::ConfirmRemove {
        app: other.clone(),
        existed: true,
    };
    assert_eq!(t.persist(), vec![removed]);
    assert!(
        !t.store.apps.contains_key(&other),
        "the code goes with the app"
    );
    assert_eq!(listed(&t), ["app"]);

    // A second removal finds nothing, and says so once the disk agrees: at once here.
    t.gq.remove_app(&other);
    let absent = GqOutput::ConfirmRemove {
        app: other,
        existed: false,
    };
    assert_eq!(t.drain(), vec![absent]);
}

#[test]
fn a_look_up_sees_only_what_the_disk_holds() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    assert_eq!(t.gq.execution(exec), None, "accepted, not yet durably");
    t.persist();
    assert_eq!(t.gq.execution(exec).unwrap().status, ExecStatus::Running);
    t.progress(
        W0,
        1,
        vec![done(exec, exec.root_call(), first(), returns("7"))],
    );
    assert!(
        matches!(t.gq.state().execs[&exec].status, ExecStatus::Done(_)),
        "the queue's own state runs ahead"
    );
    assert_eq!(
        t.gq.execution(exec).unwrap().status,
        ExecStatus::Running,
        "ended, not yet durably"
    );
    t.persist();
    assert_eq!(
        t.gq.execution(exec).unwrap().status,
        ExecStatus::Done(Answer::Value(Payload::from("7")))
    );
}

#[test]
fn an_idempotency_key_names_an_execution_of_its_own_app_only() {
    let mut t = Gq::new();
    let (other, spec) = other_app();
    t.gq.deploy(spec, bundle());
    t.persist();
    let key = Some("k".to_string());
    let mine = t.gq.invoke(
        T0,
        &app(),
        Payload::from("1"),
        key.clone(),
        Default::default(),
    );
    let theirs = t.gq.invoke(
        T0,
        &other,
        Payload::from("2"),
        key.clone(),
        Default::default(),
    );
    let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
    assert!(
        theirs.fresh,
        "another app's execution was returned for its key"
    );
    assert_ne!(mine.exec, theirs.exec);
    // Each app's retry finds its own, in this life and the next.
    let again = t.gq.invoke(
        T0,
        &other,
        Payload::from("2"),
        key.clone(),
        Default::default(),
    );
    assert_eq!(again.unwrap().exec, theirs.exec);
    t.drain();
    t.persist();
    let mut recovered = GlobalQueue::recover(GqConfig::default(), T0, t.store.clone());
    let found = recovered.invoke(T0, &app(), Payload::from("1"), key, Default::default());
    assert_eq!(found.unwrap().exec, mine.exec);
}

#[test]
fn an_execution_past_its_budget_of_calls_fails_with_a_budget_error() {
    let mut t = Gq::with_config(GqConfig {
        calls_max: Some(3),
        ..GqConfig::default()
    });
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let c0 = exec.root_call();
    // The entry call and a fan-out of three would be four calls: past the budget of three, the
    // fan-out is refused whole.
    let fan = fan_out(c0, 3, "j");
    t.progress(W0, 1, vec![done(exec, c0, first(), fan)]);
    t.persist();
    let Some(ExecStatus::Done(Answer::Error(error))) =
        t.gq.execution(exec).map(|e| e.status.clone())
    else {
        panic!("the execution went on: {:?}", t.gq.execution(exec));
    };
    assert_eq!(error.kind, ErrorKind::Budget, "{error:?}");
    assert!(
        t.store.calls.is_empty(),
        "calls left pending: {:?}",
        t.store.calls
    );
}

#[test]
fn an_executions_budget_of_calls_holds_across_a_gateway_restart() {
    let config = GqConfig {
        calls_max: Some(4),
        ..GqConfig::default()
    };
    let mut t = Gq::with_config(config);
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let c0 = exec.root_call();
    let join = c0.join();
    // The entry call and two branches: three calls of four.
    let fan = fan_out(c0, 2, "a");
    t.progress(W0, 1, vec![done(exec, c0, first(), fan)]);
    t.persist();

    // The gateway restarts from its records; the worker comes back.
    let mut r = Gq {
        gq: GlobalQueue::recover(config, T0, t.store.clone()),
        store: t.store.clone(),
        unpersisted: Vec::new(),
    };
    r.drain();
    r.persist();
    r.msg(W0, hello(I1, true));
    // Each branch hands on to a next call: the fourth call fits, the fifth does not.
    let next = |branch: u32| {
        let call = c0.child(branch);
        let effects = Effects {
            spawned: vec![branch_call(call.child(0), join, branch)],
            ..Effects::default()
        };
        done(exec, call, first(), effects)
    };
    r.progress(W0, 2, vec![next(0), next(1)]);
    r.persist();
    let Some(ExecStatus::Done(Answer::Error(error))) =
        r.gq.execution(exec).map(|e| e.status.clone())
    else {
        panic!("a restart reset the budget: {:?}", r.gq.execution(exec));
    };
    assert_eq!(error.kind, ErrorKind::Budget, "{error:?}");
}

#[test]
fn a_budget_error_ends_the_execution_without_a_retry() {
    let mut t = Gq::new();
    t.hello(W0, I1);
    let (exec, _) = t.invoke("1");
    t.persist();
    let error = GrainError::new(ErrorKind::Budget, "too deep");
    let failed = Report {
        exec,
        call: exec.root_call(),
        attempt: first(),
        outcome: Outcome::Failed(error.clone()),
    };
    t.progress(W0, 1, vec![failed]);
    t.persist();
    assert_eq!(
        t.gq.execution(exec).unwrap().status,
        ExecStatus::Done(Answer::Error(error))
    );
}
