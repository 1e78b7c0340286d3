//! Unit tests of the local bus: one event in, the exact outputs asserted.

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use std::time::Duration;

use sand_protocol::ids::{AppName, Attempt, CallId, ExecId, GrainName, Incarnation, Seq, WorkerId};
use sand_protocol::local_bus::{GrainResult, LbConfig, LbEvent, LbOutput, LbTimer, LocalBus};
use sand_protocol::time::Time;
use sand_protocol::trace_context::TraceParent;
use sand_protocol::wire::{
    CallSpec, Cont, Effects, ErrorKind, GrainError, JoinSpec, NewCall, Outcome, Payload, Reason,
    Report, Return, ToGateway, ToWorker,
};

const I1: Incarnation = Incarnation(1);
const T0: Time = Time::ZERO;

fn grain(s: &str) -> GrainName {
    GrainName::new(s).unwrap()
}

fn exec() -> ExecId {
    ExecId::new(1, 0)
}

fn root() -> CallId {
    exec().root_call()
}

fn placed() -> Attempt {
    Attempt::epoch_floor(1)
}

fn spec(call: CallId, g: &str, input: &str, attempt: Attempt, cont: Cont) -> CallSpec {
    CallSpec {
        exec: exec(),
        call,
        attempt,
        app: AppName::new("app").unwrap(),
        grain: grain(g),
        input: Payload::from(input),
        cont,
        depth_left: 16,
        // Every call of the execution carries the gateway's name for it: the comparisons of
        // whole specs below check that the bus hands it on.
        exec_ref: EXEC_REF.into(),
        // And the span it hangs from: the comparisons check that each call the bus emits
        // hangs from the run that emitted it.
        traceparent: hangs_from(call),
    }
}

/// The span the tests' execution was invoked under.
fn invocation() -> TraceParent {
    TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap()
}

/// The span `call` hangs from: the invocation's for the entry call, else that of the run of
/// the call that emits it (at the placement's attempt, which a local lineage shares); none
/// for a call no call of the execution emits.
fn hangs_from(call: CallId) -> TraceParent {
    let mut generation = vec![(root(), invocation())];
    for _ in 0..5 {
        let mut next = Vec::new();
        for (c, parent) in generation {
            if c == call {
                return parent;
            }
            let run = parent.run(c, placed());
            next.extend((0..4).map(|i| (c.child(i), run)));
            next.push((c.join(), run));
        }
        generation = next;
    }
    TraceParent::default()
}

const EXEC_REF: &str = "0000000100000000aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn root_spec() -> CallSpec {
    spec(root(), "a", "1", placed(), Cont::Client)
}

/// The gateway's `Welcome` of this worker's incarnation.
fn welcome(applied: Seq) -> ToWorker {
    ToWorker::Welcome {
        incarnation: I1,
        applied,
        heartbeat: Duration::from_secs(1),
    }
}

struct Lb {
    lb: LocalBus,
}

impl Lb {
    /// A welcomed local bus with `window` messages in flight at most.
    fn new(window: usize, overload_threshold: usize) -> Self {
        let config = LbConfig {
            worker: WorkerId(0),
            window,
            overload_threshold,
            ..LbConfig::default()
        };
        let mut t = Self {
            lb: LocalBus::new(config, I1),
        };
        assert_eq!(
            t.on(LbEvent::Connected),
            vec![LbOutput::Send(ToGateway::Hello {
                incarnation: I1,
                resumed: false,
                started: vec![]
            })]
        );
        assert_eq!(t.msg(welcome(Seq(0))), vec![]);
        t
    }

    fn on(&mut self, e: LbEvent) -> Vec<LbOutput> {
        self.lb.handle(T0, e);
        std::iter::from_fn(|| self.lb.poll_output()).collect()
    }

    fn msg(&mut self, m: ToWorker) -> Vec<LbOutput> {
        self.on(LbEvent::Message(m))
    }

    fn dispatch(&mut self, call: CallSpec) -> Vec<LbOutput> {
        self.msg(ToWorker::Dispatch {
            incarnation: I1,
            call,
            reason: Reason::First,
        })
    }

    fn finish(&mut self, s: &CallSpec, result: GrainResult) -> Vec<LbOutput> {
        let run = s.run_key();
        self.on(LbEvent::Finished { run, result })
    }
}

fn progress(seq: u64, reports: Vec<Report>) -> LbOutput {
    LbOutput::Send(ToGateway::Progress {
        incarnation: I1,
        seq: Seq(seq),
        reports,
    })
}

fn report(s: &CallSpec, effects: Effects) -> Report {
    Report {
        exec: s.exec,
        call: s.call,
        attempt: s.attempt,
        outcome: Outcome::Done(effects),
    }
}

fn next(g: &str, input: &str) -> GrainResult {
    GrainResult::Next {
        grain: grain(g),
        input: Payload::from(input),
    }
}

fn new_call(s: &CallSpec, owned: bool) -> NewCall {
    NewCall {
        call: s.call,
        grain: s.grain.clone(),
        input: s.input.clone(),
        cont: s.cont,
        owned,
        depth_left: s.depth_left,
        traceparent: s.traceparent,
    }
}

fn value(cont: Cont, v: &str) -> Return {
    Return {
        cont,
        value: Payload::from(v),
    }
}

#[test]
fn a_dispatch_runs_once_and_its_value_is_reported() {
    let mut t = Lb::new(4, 8);
    let s = root_spec();
    assert_eq!(t.dispatch(s.clone()), vec![LbOutput::Run(s.clone())]);
    assert_eq!(
        t.dispatch(s.clone()),
        vec![],
        "a re-sent dispatch of a running call"
    );
    let out = t.finish(&s, GrainResult::Return(Payload::from("7")));
    let effects = Effects {
        returns: vec![value(Cont::Client, "7")],
        ..Effects::default()
    };
    assert_eq!(out, vec![progress(1, vec![report(&s, effects)])]);
    assert_eq!(
        t.dispatch(s.clone()),
        vec![],
        "a re-sent dispatch of a finished call"
    );
    assert_eq!(
        t.msg(ToWorker::Ack {
            incarnation: I1,
            upto: Seq(1)
        }),
        vec![]
    );
    assert_eq!(t.lb.backlog(), (0, 0));
}

#[test]
fn a_next_call_runs_here_at_once_and_travels_with_the_completion() {
    let mut t = Lb::new(4, 8);
    let s = root_spec();
    t.dispatch(s.clone());
    let child = spec(root().child(0), "b", "2", placed(), Cont::Client);
    let out = t.finish(&s, next("b", "2"));
    let effects = Effects {
        spawned: vec![new_call(&child, true)],
        ..Effects::default()
    };
    assert_eq!(
        out,
        vec![LbOutput::Run(child), progress(1, vec![report(&s, effects)])]
    );
}

#[test]
fn unsent_hops_coalesce_and_sent_ones_are_never_merged() {
    let mut t = Lb::new(1, 8);
    let s = root_spec();
    t.dispatch(s.clone());
    let c1 = spec(root().child(0), "b", "2", placed(), Cont::Client);
    let c2 = spec(c1.call.child(0), "c", "3", placed(), Cont::Client);
    let c3 = spec(c2.call.child(0), "d", "4", placed(), Cont::Client);
    // c0 → c1 leaves at once: the window has room.
    let first = Effects {
        spawned: vec![new_call(&c1, true)],
        ..Effects::default()
    };
    assert_eq!(
        t.finish(&s, next("b", "2")),
        vec![
            LbOutput::Run(c1.clone()),
            progress(1, vec![report(&s, first)])
        ]
    );
    // c1 → c2 and c2 → c3 wait for the window, and fold into c1 → c3.
    assert_eq!(
        t.finish(&c1, next("c", "3")),
        vec![LbOutput::Run(c2.clone())]
    );
    assert_eq!(
        t.finish(&c2, next("d", "4")),
        vec![LbOutput::Run(c3.clone())]
    );
    assert_eq!(t.lb.backlog(), (1, 1));
    let folded = Effects {
        spawned: vec![new_call(&c3, true)],
        ..Effects::default()
    };
    assert_eq!(
        t.msg(ToWorker::Ack {
            incarnation: I1,
            upto: Seq(1)
        }),
        vec![progress(2, vec![report(&c1, folded)])]
    );
}

#[test]
fn an_overloaded_worker_hands_emitted_calls_to_the_gateway() {
    let mut t = Lb::new(4, 1);
    let s = root_spec();
    let other = spec(CallId(7), "x", "0", placed(), Cont::Client);
    t.dispatch(s.clone());
    t.dispatch(other);
    let child = spec(root().child(0), "b", "2", placed(), Cont::Client);
    let effects = Effects {
        spawned: vec![new_call(&child, false)],
        ..Effects::default()
    };
    assert_eq!(
        t.finish(&s, next("b", "2")),
        vec![progress(1, vec![report(&s, effects)])],
        "one call still runs: at the threshold, nothing more runs here"
    );
}

#[test]
fn a_fan_out_run_here_starts_its_join_here() {
    let mut t = Lb::new(1, 8);
    let s = root_spec();
    t.dispatch(s.clone());
    let join = root().join();
    let branch = |i: u32, v: &str| {
        spec(
            root().child(i),
            "c",
            v,
            placed(),
            Cont::Join { join, branch: i },
        )
    };
    let (b0, b1) = (branch(0, "10"), branch(1, "20"));
    let (b0, b1) = (
        CallSpec {
            depth_left: 15,
            ..b0
        },
        CallSpec {
            depth_left: 15,
            ..b1
        },
    );
    let fan = GrainResult::FanOut {
        branches: vec![
            (grain("c"), Payload::from("10")),
            (grain("c"), Payload::from("20")),
        ],
        join: grain("j"),
    };
    let out = t.finish(&s, fan);
    let join_spec = JoinSpec {
        call: join,
        grain: grain("j"),
        branches: 2,
        cont: Cont::Client,
        depth_left: 16,
        traceparent: hangs_from(join),
    };
    let fanned = Effects {
        joins: vec![join_spec.clone()],
        spawned: vec![new_call(&b0, true), new_call(&b1, true)],
        ..Effects::default()
    };
    assert_eq!(
        out,
        vec![
            LbOutput::Run(b0.clone()),
            LbOutput::Run(b1.clone()),
            progress(1, vec![report(&s, fanned)])
        ]
    );
    // The branches finish in reverse order; the join's input keeps branch order.
    assert_eq!(
        t.finish(&b1, GrainResult::Return(Payload::from("2"))),
        vec![]
    );
    let j = spec(join, "j", "[1,2]", placed(), Cont::Client);
    assert_eq!(
        t.finish(&b0, GrainResult::Return(Payload::from("1"))),
        vec![LbOutput::Run(j.clone())]
    );
    // Both contributions and the join fold into one report rooted at the first branch.
    let b1_report = report(
        &b1,
        Effects {
            returns: vec![value(b1.cont, "2")],
            ..Effects::default()
        },
    );
    let b0_report = report(
        &b0,
        Effects {
            returns: vec![value(b0.cont, "1")],
            spawned: vec![new_call(&j, true)],
            ..Effects::default()
        },
    );
    assert_eq!(
        t.msg(ToWorker::Ack {
            incarnation: I1,
            upto: Seq(1)
        }),
        vec![progress(2, vec![b1_report, b0_report])]
    );
}

#[test]
fn a_failed_branch_leaves_the_join_to_the_gateway() {
    let mut t = Lb::new(4, 8);
    let s = root_spec();
    t.dispatch(s.clone());
    let join = root().join();
    let fan = GrainResult::FanOut {
        branches: vec![
            (grain("c"), Payload::from("1")),
            (grain("c"), Payload::from("2")),
        ],
        join: grain("j"),
    };
    t.finish(&s, fan);
    let b0 = spec(
        root().child(0),
        "c",
        "1",
        placed(),
        Cont::Join { join, branch: 0 },
    );
    let b1 = spec(
        root().child(1),
        "c",
        "2",
        placed(),
        Cont::Join { join, branch: 1 },
    );
    let error = GrainError::new(ErrorKind::Raised, "no");
    let out = t.finish(&b0, GrainResult::Error(error.clone()));
    let failed = Report {
        exec: exec(),
        call: b0.call,
        attempt: placed(),
        outcome: Outcome::Failed(error),
    };
    assert_eq!(out, vec![progress(2, vec![failed])]);
    let out = t.finish(&b1, GrainResult::Return(Payload::from("2")));
    let only_value = Effects {
        returns: vec![value(b1.cont, "2")],
        ..Effects::default()
    };
    assert_eq!(
        out,
        vec![progress(3, vec![report(&b1, only_value)])],
        "no join here"
    );
}

#[test]
fn bad_output_is_a_grain_error() {
    let mut t = Lb::new(4, 8);
    let s = root_spec();
    t.dispatch(s.clone());
    let out = t.finish(
        &s,
        GrainResult::FanOut {
            branches: vec![],
            join: grain("j"),
        },
    );
    let [LbOutput::Send(ToGateway::Progress { reports, .. })] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert!(matches!(
        &reports[0].outcome,
        Outcome::Failed(e) if e.kind == ErrorKind::BadOutput
    ));
}

/// A trace names the calls a run emitted by the ids the bus gives them.
#[test]
fn a_result_names_the_calls_it_emits() {
    let s = root_spec();
    let fan = |n: usize| GrainResult::FanOut {
        branches: vec![(grain("c"), Payload::from("1")); n],
        join: grain("j"),
    };
    assert_eq!(next("b", "2").emitted(&s), vec![root().child(0)]);
    assert_eq!(
        fan(2).emitted(&s),
        vec![root().child(0), root().child(1), root().join()]
    );
    assert_eq!(GrainResult::Return(Payload::from("3")).emitted(&s), vec![]);
    let failed = GrainResult::Error(GrainError::new(ErrorKind::Raised, "no"));
    assert_eq!(failed.emitted(&s), vec![]);
    // A refused result emits nothing, and says why.
    assert_eq!(fan(0).emitted(&s), vec![]);
    let spent = CallSpec {
        depth_left: 0,
        ..s.clone()
    };
    assert_eq!(fan(1).emitted(&spent), vec![]);
    assert_eq!(
        fan(1).refusal(&spent).map(|e| e.kind),
        Some(ErrorKind::Budget)
    );
    assert_eq!(fan(1).refusal(&s), None);
}

#[test]
fn unacked_progress_is_resent_on_a_timer_and_after_a_reconnect() {
    let mut t = Lb::new(4, 8);
    let s = root_spec();
    t.dispatch(s.clone());
    let sent = t.finish(&s, GrainResult::Return(Payload::from("1")));
    assert_eq!(t.on(LbEvent::Timeout(LbTimer::Resend)), sent);
    // A broken connection: nothing is sent until the gateway welcomes us again.
    assert_eq!(t.on(LbEvent::Disconnected), vec![]);
    // The Hello resumes the incarnation and lists the attempt it ran, so that the gateway
    // does not dispatch it again.
    assert_eq!(
        t.on(LbEvent::Connected),
        vec![LbOutput::Send(ToGateway::Hello {
            incarnation: I1,
            resumed: true,
            started: vec![s.run_key()]
        })]
    );
    assert_eq!(t.msg(welcome(Seq(0))), sent);
    // A Welcome that says it was applied drops the backup instead.
    t.on(LbEvent::Connected);
    assert_eq!(t.msg(welcome(Seq(1))), vec![]);
    assert_eq!(t.lb.backlog(), (0, 0));
}

#[test]
fn heartbeats_go_out_on_their_timer_while_welcomed() {
    let mut t = Lb::new(4, 8);
    let at =
        t.lb.timers()
            .find(|(x, _)| *x == LbTimer::Heartbeat)
            .map(|(_, at)| at);
    assert_eq!(at, Some(T0 + Duration::from_secs(1)));
    t.lb.handle_timeouts(T0 + Duration::from_secs(1));
    let out: Vec<_> = std::iter::from_fn(|| t.lb.poll_output()).collect();
    assert_eq!(
        out,
        vec![LbOutput::Send(ToGateway::Heartbeat {
            incarnation: I1,
            running: 0
        })]
    );
    assert_eq!(t.lb.poll_timeout(), Some(T0 + Duration::from_secs(2)));
}

#[test]
fn cancel_and_abort_kill_running_attempts() {
    let mut t = Lb::new(4, 8);
    let s = root_spec();
    let other = spec(CallId(9), "x", "0", placed(), Cont::Client);
    t.dispatch(s.clone());
    t.dispatch(other.clone());
    assert_eq!(
        t.msg(ToWorker::Abort {
            incarnation: I1,
            exec: exec(),
            call: other.call,
            attempt: other.attempt
        }),
        vec![LbOutput::Abort(other.run_key())]
    );
    assert_eq!(
        t.msg(ToWorker::Cancel {
            incarnation: I1,
            exec: exec()
        }),
        vec![LbOutput::Abort(s.run_key())]
    );
    assert_eq!(
        t.finish(&s, GrainResult::Return(Payload::from("1"))),
        vec![]
    );
    assert_eq!(t.lb.running().count(), 0);
}

#[test]
fn a_fenced_worker_forgets_everything_and_comes_back_new() {
    let mut t = Lb::new(4, 8);
    let s = root_spec();
    t.dispatch(s.clone());
    // The gateway knows a later incarnation (this worker's record of its own was lost): it
    // comes back above it, as a life that does not resume.
    let successor = Incarnation(7);
    let fenced = ToWorker::Fenced {
        incarnation: I1,
        successor,
    };
    assert_eq!(
        t.msg(fenced.clone()),
        vec![
            LbOutput::Abort(s.run_key()),
            LbOutput::PersistIncarnation(successor),
            LbOutput::Send(ToGateway::Hello {
                incarnation: successor,
                resumed: false,
                started: vec![]
            })
        ]
    );
    assert_eq!(t.lb.incarnation(), successor);
    // Messages to the old incarnation are ignored.
    assert_eq!(t.dispatch(s.clone()), vec![]);
    assert_eq!(t.msg(fenced), vec![]);
}

#[test]
fn a_parent_run_again_as_a_new_attempt_spawns_its_own_attempt_of_the_call() {
    let mut t = Lb::new(4, 8);
    let s = root_spec();
    t.dispatch(s.clone());
    let first_child = spec(root().child(0), "b", "2", placed(), Cont::Client);
    assert_eq!(
        t.finish(&s, next("b", "2"))[0],
        LbOutput::Run(first_child.clone())
    );
    // The gateway lost that report and runs the parent again, here, as a new attempt. Its
    // child is the same call under the new attempt: a run of its own, never the first again.
    let mut again = s.clone();
    again.attempt = Attempt::placement(1, 1);
    assert_eq!(
        t.dispatch(again.clone()),
        vec![LbOutput::Run(again.clone())]
    );
    // It hangs from the new attempt's run.
    let child = CallSpec {
        traceparent: invocation().run(root(), again.attempt),
        ..spec(root().child(0), "b", "2", again.attempt, Cont::Client)
    };
    assert_ne!(child.traceparent, first_child.traceparent);
    let effects = Effects {
        spawned: vec![new_call(&child, true)],
        ..Effects::default()
    };
    assert_eq!(
        t.finish(&again, next("b", "2")),
        vec![
            LbOutput::Run(child.clone()),
            progress(2, vec![report(&again, effects)])
        ]
    );
    assert_ne!(child.attempt, first_child.attempt);
}

#[test]
fn a_welcome_cannot_make_the_heartbeat_spin() {
    let mut t = Lb::new(4, 8);
    let zero = ToWorker::Welcome {
        incarnation: I1,
        applied: Seq(0),
        heartbeat: Duration::ZERO,
    };
    t.on(LbEvent::Connected);
    t.msg(zero);
    let heartbeat =
        t.lb.timers()
            .find(|(timer, _)| *timer == LbTimer::Heartbeat);
    assert_eq!(
        heartbeat.map(|(_, at)| at),
        Some(T0 + sand_protocol::local_bus::HEARTBEAT_MIN)
    );
}

#[test]
fn a_fence_naming_the_largest_successor_does_not_overflow() {
    let mut t = Lb::new(4, 8);
    let top = Incarnation(u64::MAX);
    for incarnation in [I1, top] {
        t.msg(ToWorker::Fenced {
            incarnation,
            successor: top,
        });
    }
    assert_eq!(t.lb.incarnation(), top);
}

#[test]
fn a_fan_out_past_the_depth_budget_fails_without_running_a_branch() {
    let mut t = Lb::new(1, 8);
    let s = CallSpec {
        depth_left: 0,
        ..root_spec()
    };
    t.dispatch(s.clone());
    let fan = GrainResult::FanOut {
        branches: vec![(grain("c"), Payload::from("10"))],
        join: grain("j"),
    };
    let out = t.finish(&s, fan);
    let [LbOutput::Send(ToGateway::Progress { reports, .. })] = &out[..] else {
        panic!("a branch ran, or nothing was reported: {out:?}");
    };
    let Outcome::Failed(error) = &reports[0].outcome else {
        panic!("the fan-out went ahead: {reports:?}");
    };
    assert_eq!(error.kind, ErrorKind::Budget, "{error:?}");
}
