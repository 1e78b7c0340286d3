//! Regression schedules of the real `GlobalQueue` and `LocalBus` wired together by hand: each
//! test delivers messages in one order the transport's contract allows (control messages in
//! order; a payload message, such as a `Dispatch`, overtaken by anything), and asserts what the
//! cluster must never do.

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use std::collections::BTreeMap;

use sand_protocol::disk::{self, MemDisk};
use sand_protocol::durable::ExecStatus;
use sand_protocol::global_queue::{GlobalQueue, GqConfig, GqEvent, GqOutput};
use sand_protocol::ids::{AppName, ExecId, GrainName, Incarnation, RunKey, WorkerId};
use sand_protocol::local_bus::{GrainResult, LbConfig, LbEvent, LbOutput, LocalBus};
use sand_protocol::policy::{AppSpec, GrainPolicy};
use sand_protocol::time::Time;
use sand_protocol::wire::{AppBundle, CallSpec, Payload, ToGateway, ToWorker};

const W0: WorkerId = WorkerId(0);
const T0: Time = Time::ZERO;

fn grain(s: &str) -> GrainName {
    GrainName::new(s).unwrap()
}

fn app() -> AppName {
    AppName::new("app").unwrap()
}

/// A gateway with its disk, one worker, and the messages in flight between them.
struct Cluster {
    gq: GlobalQueue,
    disk: MemDisk,
    lb: LocalBus,
    /// Gateway → worker, in the order sent.
    to_worker: Vec<ToWorker>,
    /// Worker → gateway, in the order sent.
    to_gateway: Vec<ToGateway>,
    /// Attempts the worker was asked to run and has not finished.
    running: Vec<CallSpec>,
    /// How many times each attempt was started, per incarnation.
    starts: BTreeMap<(Incarnation, RunKey), u32>,
    answers: Vec<ExecId>,
}

impl Cluster {
    /// A gateway with a two-grain chain `a → b` deployed, and a welcomed worker.
    fn new() -> Self {
        let mut c = Self::bare();
        c.worker(LbEvent::Connected);
        c.deliver_all();
        c
    }

    /// A gateway with a two-grain chain `a → b` deployed, and a worker not yet connected.
    fn bare() -> Self {
        let mut gq = GlobalQueue::new(GqConfig::default(), T0);
        gq.deploy(
            AppSpec {
                name: app(),
                entry: grain("a"),
                grains: [("a", GrainPolicy::default()), ("b", GrainPolicy::default())]
                    .into_iter()
                    .map(|(g, p)| (grain(g), p))
                    .collect(),
            },
            AppBundle {
                digest: "d".into(),
                archive: Default::default(),
            },
        );
        let mut c = Self {
            gq,
            disk: MemDisk::default(),
            lb: LocalBus::new(LbConfig::default(), Incarnation(1)),
            to_worker: Vec::new(),
            to_gateway: Vec::new(),
            running: Vec::new(),
            starts: BTreeMap::new(),
            answers: Vec::new(),
        };
        c.drain_gq();
        c.persist();
        c
    }

    fn drain_gq(&mut self) {
        while let Some(out) = self.gq.poll_output() {
            match out {
                GqOutput::Persist(b) => self.disk.take(b),
                GqOutput::Send(_, m) => self.to_worker.push(m),
                GqOutput::Respond(exec, _) => self.answers.push(exec),
                GqOutput::ConfirmInvoke(_)
                | GqOutput::ConfirmDeploy(_)
                | GqOutput::ConfirmRemove { .. } => {}
            }
        }
    }

    fn persist(&mut self) {
        let Ok(_) = self.disk.flush(&mut self.gq, T0, usize::MAX, disk::put);
        self.drain_gq();
    }

    fn worker(&mut self, event: LbEvent) {
        self.lb.handle(T0, event);
        while let Some(out) = self.lb.poll_output() {
            match out {
                LbOutput::Send(m) => self.to_gateway.push(m),
                LbOutput::Run(spec) => {
                    let run = spec.run_key();
                    *self.starts.entry((self.lb.incarnation(), run)).or_default() += 1;
                    self.running.push(spec);
                }
                LbOutput::Abort(run) => self.running.retain(|s| s.run_key() != run),
                LbOutput::PersistIncarnation(_) => {}
            }
        }
    }

    /// A client invokes the chain; its acceptance is made durable.
    fn invoke(&mut self) -> ExecId {
        let exec = self
            .gq
            .invoke(T0, &app(), Payload::from("1"), None, Default::default());
        let exec = exec.expect("the app is deployed").exec;
        self.drain_gq();
        self.persist();
        exec
    }

    /// Delivers every worker message to the gateway and persists what that wrote.
    fn deliver_to_gateway(&mut self) {
        for m in std::mem::take(&mut self.to_gateway) {
            self.gq.handle(T0, GqEvent::Message(W0, m));
            self.drain_gq();
        }
        self.persist();
    }

    /// Delivers everything both ways until nothing is in flight, holding every `Dispatch` back
    /// until nothing else is: each travels on a stream of its own, and may arrive after every
    /// control message sent later.
    fn deliver_all(&mut self) {
        let mut held = Vec::new();
        loop {
            self.deliver_to_gateway();
            let (dispatches, control): (Vec<ToWorker>, Vec<ToWorker>) =
                std::mem::take(&mut self.to_worker)
                    .into_iter()
                    .partition(|m| matches!(m, ToWorker::Dispatch { .. }));
            held.extend(dispatches);
            if control.is_empty() && self.to_gateway.is_empty() {
                if held.is_empty() {
                    return;
                }
                let m = held.remove(0);
                self.worker(LbEvent::Message(m));
            }
            for m in control {
                self.worker(LbEvent::Message(m));
            }
        }
    }

    /// Finishes the oldest running attempt with what `program` says it returns.
    fn finish_one(&mut self, program: impl Fn(&CallSpec) -> GrainResult) {
        self.finish_one_where(|_| true, program);
    }

    /// Finishes the oldest running attempt that `pick` picks.
    fn finish_one_where(
        &mut self,
        pick: impl Fn(&CallSpec) -> bool,
        program: impl Fn(&CallSpec) -> GrainResult,
    ) {
        let i = self
            .running
            .iter()
            .position(pick)
            .expect("a running attempt");
        let spec = self.running.remove(i);
        let run = spec.run_key();
        let result = program(&spec);
        self.worker(LbEvent::Finished { run, result });
    }

    /// The gateway crashes, losing what it had not persisted and everything in flight, and
    /// restarts from its disk; the worker sees its connection break and opens a new one.
    fn restart_gateway(&mut self) {
        self.disk.crash();
        self.to_worker.clear();
        self.to_gateway.clear();
        self.gq = GlobalQueue::recover(GqConfig::default(), T0, self.disk.durable().clone());
        self.drain_gq();
        self.persist();
        self.worker(LbEvent::Disconnected);
        self.worker(LbEvent::Connected);
    }

    fn assert_started_at_most_once(&self) {
        let twice: Vec<_> = self.starts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "started twice in one incarnation: {twice:?}"
        );
    }
}

/// `a` chains to `b`; `b` returns.
fn chain(spec: &CallSpec) -> GrainResult {
    match spec.grain.as_str() {
        "a" => GrainResult::Next {
            grain: grain("b"),
            input: Payload::from("2"),
        },
        _ => GrainResult::Return(Payload::from("3")),
    }
}

/// After a gateway restart, the worker re-sends its progress and the gateway re-sends its
/// dispatches. The `Ack` of the re-sent progress travels on the control stream and may overtake
/// the re-sent `Dispatch` of the call that progress completed; the worker must not run that call
/// (or its successors) a second time.
#[test]
fn an_ack_that_overtakes_a_resent_dispatch_does_not_start_the_call_again() {
    let mut c = Cluster::new();
    let exec = c.invoke();
    c.deliver_all();
    // `a` runs and chains to `b`, which starts here at once; the report of that hop is sent,
    // and then the gateway crashes before it arrives.
    c.finish_one(chain);
    assert_eq!(c.running.len(), 1, "b runs locally");
    c.restart_gateway();
    c.deliver_all();
    c.assert_started_at_most_once();
    c.finish_one(chain);
    c.deliver_all();
    c.assert_started_at_most_once();
    assert_eq!(c.answers, vec![exec]);
    assert!(c.running.is_empty(), "nothing runs after the answer");
}

/// A worker that comes back with an incarnation the gateway already knows (its file was lost)
/// must not be welcomed as its earlier life: its reports would be acked as duplicates of the
/// earlier life's and dropped, and the execution would never end.
#[test]
fn a_worker_back_with_a_used_incarnation_is_not_welcomed_as_its_earlier_life() {
    let mut c = Cluster::new();
    // The worker's first life runs a hop and has it acked.
    let first = c.invoke();
    c.deliver_all();
    c.finish_one(chain);
    c.deliver_all();
    c.finish_one(chain);
    c.deliver_all();
    assert_eq!(c.answers, vec![first]);
    // It restarts and, its incarnation file lost, comes back as incarnation 1 again.
    c.lb = LocalBus::new(LbConfig::default(), Incarnation(1));
    c.running.clear();
    c.worker(LbEvent::Connected);
    c.deliver_all();
    let second = c.invoke();
    for _ in 0..2 {
        c.deliver_all();
        if !c.running.is_empty() {
            c.finish_one(chain);
        }
    }
    c.deliver_all();
    assert_eq!(
        c.gq.execution(second).map(|e| &e.status),
        Some(&ExecStatus::Done(sand_protocol::durable::Answer::Value(
            Payload::from("3")
        ))),
        "the second execution ends"
    );
    assert!(
        c.lb.incarnation() > Incarnation(1),
        "it came back as a new life"
    );
    let (inflight, unsent) = c.lb.backlog();
    assert_eq!((inflight, unsent), (0, 0), "every report was applied");
}

/// A gateway that crashed before its placement of a call was durable places it again, as a new
/// attempt, on the same worker incarnation, which still runs the first. Both attempts chain to
/// the same next call; once the second attempt's successor has run and been acked (and so
/// forgotten), the first attempt's successor must not be the same attempt of that call again.
#[test]
fn two_attempts_of_a_call_in_one_incarnation_never_start_the_same_successor_twice() {
    let mut c = Cluster::bare();
    let exec = c.invoke();
    // The worker joins; the gateway places the call on it, and crashes before either is durable.
    c.worker(LbEvent::Connected);
    for m in std::mem::take(&mut c.to_gateway) {
        c.gq.handle(T0, GqEvent::Message(W0, m));
        c.drain_gq();
    }
    let dispatches = std::mem::take(&mut c.to_worker);
    for m in dispatches {
        c.worker(LbEvent::Message(m));
    }
    assert_eq!(c.running.len(), 1, "the first attempt runs");
    c.restart_gateway();
    c.deliver_all();
    assert_eq!(c.running.len(), 2, "the second attempt runs beside it");
    // The second attempt and its successor finish, and are acked.
    c.finish_one_where(|s| s.attempt != c_first(&s.exec), chain);
    c.deliver_all();
    c.finish_one_where(|s| s.grain.as_str() == "b", chain);
    c.deliver_all();
    assert_eq!(c.answers, vec![exec]);
    // Then the first attempt finishes and chains on.
    c.finish_one_where(|_| true, chain);
    c.deliver_all();
    c.assert_started_at_most_once();
}

/// The attempt the first gateway life hands out for the entry call of `exec`.
fn c_first(exec: &ExecId) -> sand_protocol::ids::Attempt {
    sand_protocol::ids::Attempt::epoch_floor(exec.epoch())
}
