//! Property tests over random event sequences: one gateway and three workers, driven through
//! random deliveries, grain completions, timer firings, crashes, restarts, disconnections and
//! gateway crashes, with the invariants checked after every step and liveness after healing.
//!
//! The grains are deterministic, so every correct answer is known in advance:
//! `a(n) → next b(n+1)`, `b(n) → fan_out [c(n+1), c(n+2)] join d`, `c(n) → n*2`,
//! `d([x, y]) → x + y`, so `a(n)` answers `4n + 10`. When its input is odd, `c` fails attempt 0
//! and the first attempt of each gateway epoch (a retry fixes it; the retry budget is larger than
//! the faults a schedule can make), and `a` always fails when `n % 5 == 4` (the execution fails).

#![allow(clippy::unwrap_used)] // Tests unwrap what they built to be valid.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use sand_protocol::durable::{Answer, Batch, DurableState, ExecStatus, LogIndex, Op};
use sand_protocol::global_queue::{GlobalQueue, GqConfig, GqEvent, GqOutput, GqTimer};
use sand_protocol::ids::{AppName, CallKey, ExecId, GrainName, Incarnation, WorkerId};
use sand_protocol::local_bus::{GrainResult, LbConfig, LbEvent, LbOutput, LocalBus};
use sand_protocol::policy::{AppSpec, GrainPolicy};
use sand_protocol::time::Time;
use sand_protocol::wire::{
    AppBundle, CallSpec, ErrorKind, GrainError, Payload, ToGateway, ToWorker,
};

const WORKERS: usize = 3;

fn name(s: &str) -> GrainName {
    GrainName::new(s).unwrap()
}

fn app() -> AppName {
    AppName::new("app").unwrap()
}

fn app_spec() -> AppSpec {
    let policy = GrainPolicy {
        attempts_max: 64,
        backoff_ms: 10,
        backoff_factor_milli: 2000,
        backoff_ms_max: 100,
        timeout_ms: Some(10_000),
    };
    AppSpec {
        name: app(),
        entry: name("a"),
        grains: ["a", "b", "c", "d"]
            .iter()
            .map(|g| (name(g), policy))
            .collect(),
    }
}

fn number(p: &Payload) -> i64 {
    std::str::from_utf8(&p.0).unwrap().parse().unwrap()
}

fn text(n: i64) -> Payload {
    Payload::from(n.to_string().as_str())
}

/// The grains: a pure function of the call.
fn run_grain(spec: &CallSpec) -> GrainResult {
    match spec.grain.as_str() {
        "a" => {
            let n = number(&spec.input);
            if n % 5 == 4 {
                GrainResult::Error(GrainError::new(ErrorKind::Raised, "a refuses"))
            } else {
                GrainResult::Next {
                    grain: name("b"),
                    input: text(n + 1),
                }
            }
        }
        "b" => {
            let n = number(&spec.input);
            GrainResult::FanOut {
                branches: vec![(name("c"), text(n + 1)), (name("c"), text(n + 2))],
                join: name("d"),
            }
        }
        "c" => {
            let n = number(&spec.input);
            if n % 2 == 1 && spec.attempt.0 as u32 == 0 {
                GrainResult::Error(GrainError::new(ErrorKind::Crashed, "c flakes"))
            } else {
                GrainResult::Return(text(n * 2))
            }
        }
        "d" => {
            let s = std::str::from_utf8(&spec.input.0).unwrap();
            let inner = s.strip_prefix('[').unwrap().strip_suffix(']').unwrap();
            let sum: i64 = inner.split(',').map(|x| x.parse::<i64>().unwrap()).sum();
            GrainResult::Return(text(sum))
        }
        other => panic!("unknown grain {other}"),
    }
}

fn expected(n: i64) -> Answer {
    if n % 5 == 4 {
        Answer::Error(GrainError::new(ErrorKind::Raised, "a refuses"))
    } else {
        Answer::Value(text(4 * n + 10))
    }
}

/// What leaves the gateway promises something only once the store holds it.
fn check_durable_before_visible(store: &DurableState, out: &GqOutput) {
    match out {
        GqOutput::Send(w, ToWorker::Ack { incarnation, upto })
        | GqOutput::Send(
            w,
            ToWorker::Welcome {
                incarnation,
                applied: upto,
                ..
            },
        ) => {
            let rec = store.workers.get(w);
            assert!(
                rec.is_some_and(|r| {
                    r.incarnation > *incarnation
                        || (r.incarnation == *incarnation && r.applied >= *upto)
                }),
                "{out:?} left before the progress it acks was durable: {rec:?}"
            );
        }
        GqOutput::Send(w, ToWorker::Fenced { incarnation, .. }) => {
            let rec = store.workers.get(w);
            assert!(
                rec.is_some_and(|r| r.incarnation > *incarnation || r.dead),
                "{out:?} left before the fence was durable: {rec:?}"
            );
        }
        GqOutput::Send(_, ToWorker::Cancel { exec, .. }) => {
            let ended = store
                .execs
                .get(exec)
                .is_some_and(|e| e.status != ExecStatus::Running);
            assert!(ended, "{out:?} before the execution's end was durable");
        }
        GqOutput::Send(
            _,
            ToWorker::Abort {
                exec,
                call,
                attempt,
                ..
            },
        ) => {
            let rec = store.calls.get(&CallKey::new(*exec, *call));
            let running = rec.is_some_and(|c| c.attempt == *attempt && c.owner.is_some());
            assert!(!running, "{out:?} before giving up was durable");
        }
        GqOutput::ConfirmInvoke(exec) => {
            assert!(
                store.execs.contains_key(exec),
                "{out:?} before it was durable"
            );
        }
        GqOutput::Respond(exec, answer) => {
            let status = store.execs.get(exec).map(|e| &e.status);
            assert_eq!(
                status,
                Some(&ExecStatus::Done(answer.clone())),
                "{out:?} before it was durable"
            );
        }
        _ => {}
    }
}

struct Worker {
    lb: Option<LocalBus>,
    /// The last incarnation used; persisted by the worker, so it survives a crash.
    incarnation: Incarnation,
    running: Vec<CallSpec>,
    connected: bool,
}

/// One gateway, its store, three workers, and the messages between them.
struct Cluster {
    now: Time,
    gq: Option<GlobalQueue>,
    store: DurableState,
    unpersisted: Vec<Batch>,
    workers: Vec<Worker>,
    to_gq: Vec<(WorkerId, ToGateway)>,
    to_worker: Vec<(WorkerId, ToWorker)>,
    answers: BTreeMap<ExecId, Vec<Answer>>,
    inputs: BTreeMap<ExecId, i64>,
    /// Executions that must be answered: every one accepted durably, or not yet crashed over.
    owed: BTreeSet<ExecId>,
    /// Executions whose acceptance is durable.
    accepted: BTreeSet<ExecId>,
    /// Executions one of whose attempts hit its deadline: they may fail with a timeout.
    timed_out: BTreeSet<ExecId>,
    /// Calls deleted in the durable history; none may come back.
    deleted: BTreeSet<CallKey>,
    /// Joins fired in the durable history.
    fired: BTreeSet<CallKey>,
    lb_config: LbConfig,
}

impl Cluster {
    fn new(window: usize) -> Self {
        let mut gq = GlobalQueue::new(gq_config(), Time::ZERO);
        gq.deploy(
            app_spec(),
            AppBundle {
                digest: "d".into(),
                archive: Default::default(),
            },
        );
        let lb_config = LbConfig {
            window,
            overload_threshold: 3,
            ..LbConfig::default()
        };
        let mut c = Self {
            now: Time::ZERO,
            gq: Some(gq),
            store: DurableState::default(),
            unpersisted: Vec::new(),
            workers: Vec::new(),
            to_gq: Vec::new(),
            to_worker: Vec::new(),
            answers: BTreeMap::new(),
            inputs: BTreeMap::new(),
            owed: BTreeSet::new(),
            accepted: BTreeSet::new(),
            timed_out: BTreeSet::new(),
            deleted: BTreeSet::new(),
            fired: BTreeSet::new(),
            lb_config,
        };
        c.drain_gq();
        for w in 0..WORKERS {
            c.workers.push(Worker {
                lb: None,
                incarnation: Incarnation(0),
                running: Vec::new(),
                connected: false,
            });
            c.restart_worker(w);
        }
        c
    }

    fn drain_gq(&mut self) {
        let Some(gq) = self.gq.as_mut() else { return };
        while let Some(out) = gq.poll_output() {
            check_durable_before_visible(&self.store, &out);
            match out {
                GqOutput::Persist(b) => self.unpersisted.push(b),
                GqOutput::Send(w, msg) => {
                    if self.workers.get(w.0 as usize).is_some_and(|x| x.connected) {
                        self.to_worker.push((w, msg));
                    }
                }
                GqOutput::ConfirmInvoke(exec) => {
                    self.accepted.insert(exec);
                }
                GqOutput::Respond(exec, answer) => {
                    self.answers.entry(exec).or_default().push(answer);
                }
                GqOutput::ConfirmDeploy(_) | GqOutput::ConfirmRemove { .. } => {}
            }
        }
    }

    fn drain_lb(&mut self, w: usize) {
        let worker = &mut self.workers[w];
        let Some(lb) = worker.lb.as_mut() else { return };
        while let Some(out) = lb.poll_output() {
            match out {
                LbOutput::Send(msg) => {
                    if worker.connected {
                        self.to_gq.push((WorkerId(w as u32), msg));
                    }
                }
                LbOutput::Run(spec) => worker.running.push(spec),
                LbOutput::Abort(run) => worker.running.retain(|s| s.run_key() != run),
                LbOutput::PersistIncarnation(i) => worker.incarnation = i,
            }
        }
    }

    fn gq_handle(&mut self, event: GqEvent) {
        let now = self.now;
        if let Some(gq) = self.gq.as_mut() {
            gq.handle(now, event);
        }
        self.drain_gq();
    }

    fn lb_handle(&mut self, w: usize, event: LbEvent) {
        let now = self.now;
        if let Some(lb) = self.workers[w].lb.as_mut() {
            lb.handle(now, event);
        }
        self.drain_lb(w);
    }

    fn invoke(&mut self, n: i64) {
        let now = self.now;
        let Some(gq) = self.gq.as_mut() else { return };
        let invoked = gq.invoke(now, &app(), text(n), None).unwrap();
        self.inputs.insert(invoked.exec, n);
        self.owed.insert(invoked.exec);
        self.drain_gq();
    }

    /// Writes the first `count` unpersisted batches to the store, checking the durable history.
    fn persist(&mut self, count: usize) {
        let count = count.min(self.unpersisted.len());
        if count == 0 || self.gq.is_none() {
            return;
        }
        let mut upto = LogIndex(0);
        for batch in self.unpersisted.drain(..count) {
            for op in &batch.ops {
                match op {
                    Op::PutCall(c) => assert!(
                        !self.deleted.contains(&c.key()),
                        "a completed call became pending again: {c:?}"
                    ),
                    Op::DelCall(e, c) => {
                        self.deleted.insert(CallKey::new(*e, *c));
                    }
                    Op::PutJoin(j) if j.fired => {
                        let key = j.key();
                        let was = self.store.joins.get(&key).is_some_and(|d| d.fired);
                        if !was {
                            assert!(self.fired.insert(key), "a join fired twice: {key:?}");
                        }
                    }
                    _ => {}
                }
            }
            self.store.apply_batch(&batch);
            upto = batch.index;
        }
        self.gq_handle(GqEvent::Persisted(upto));
    }

    fn deliver_to_gq(&mut self, i: usize) {
        if self.to_gq.is_empty() || self.gq.is_none() {
            return;
        }
        let (w, msg) = self.to_gq.remove(i % self.to_gq.len());
        let gq = self.gq.as_ref().unwrap();
        let rec = gq.state().workers.get(&w).copied();
        let incarnation = match &msg {
            ToGateway::Hello { incarnation, .. }
            | ToGateway::Heartbeat { incarnation, .. }
            | ToGateway::Progress { incarnation, .. } => *incarnation,
        };
        let fenced = rec.is_some_and(|r| {
            incarnation < r.incarnation || (incarnation == r.incarnation && r.dead)
        });
        let before = fenced.then(|| (gq.state().clone(), gq.timers().collect::<Vec<_>>()));
        self.gq_handle(GqEvent::Message(w, msg));
        if let Some(before) = before {
            let gq = self.gq.as_ref().unwrap();
            let after = (gq.state().clone(), gq.timers().collect::<Vec<_>>());
            assert_eq!(before, after, "a fenced incarnation changed the queue");
        }
    }

    fn deliver_to_worker(&mut self, i: usize) {
        if self.to_worker.is_empty() {
            return;
        }
        let (w, msg) = self.to_worker.remove(i % self.to_worker.len());
        self.lb_handle(w.0 as usize, LbEvent::Message(msg));
    }

    /// Finishes the `i`-th of all running attempts, counted across workers.
    fn finish_any(&mut self, i: usize) {
        let total: usize = self.workers.iter().map(|w| w.running.len()).sum();
        if total == 0 {
            return;
        }
        let mut i = i % total;
        for w in 0..WORKERS {
            let n = self.workers[w].running.len();
            if i < n {
                return self.finish(w, i);
            }
            i -= n;
        }
    }

    fn finish(&mut self, w: usize, i: usize) {
        let worker = &mut self.workers[w];
        if worker.running.is_empty() {
            return;
        }
        let spec = worker.running.remove(i % worker.running.len());
        let result = run_grain(&spec);
        let run = spec.run_key();
        self.lb_handle(w, LbEvent::Finished { run, result });
    }

    fn disconnect(&mut self, w: usize) {
        let wid = WorkerId(w as u32);
        self.to_gq.retain(|(x, _)| *x != wid);
        self.to_worker.retain(|(x, _)| *x != wid);
        if self.workers[w].connected {
            self.workers[w].connected = false;
            self.lb_handle(w, LbEvent::Disconnected);
            self.gq_handle(GqEvent::Disconnected(wid));
        }
    }

    fn connect(&mut self, w: usize) {
        if self.gq.is_none() || self.workers[w].lb.is_none() || self.workers[w].connected {
            return;
        }
        self.workers[w].connected = true;
        self.lb_handle(w, LbEvent::Connected);
    }

    fn crash_worker(&mut self, w: usize) {
        self.disconnect(w);
        let worker = &mut self.workers[w];
        worker.lb = None;
        worker.running.clear();
    }

    fn restart_worker(&mut self, w: usize) {
        if self.workers[w].lb.is_some() {
            return;
        }
        let incarnation = self.workers[w].incarnation.next();
        self.workers[w].incarnation = incarnation;
        let config = LbConfig {
            worker: WorkerId(w as u32),
            ..self.lb_config
        };
        self.workers[w].lb = Some(LocalBus::new(config, incarnation));
        self.connect(w);
    }

    fn crash_gateway(&mut self) {
        for w in 0..WORKERS {
            self.disconnect(w);
        }
        self.gq = None;
        self.unpersisted.clear();
        // A synchronous client whose acceptance was not durable loses its connection and must
        // retry: the crash may lose that execution, though never one that was accepted.
        let accepted = &self.accepted;
        self.owed.retain(|e| accepted.contains(e));
    }

    fn restart_gateway(&mut self) {
        if self.gq.is_some() {
            return;
        }
        self.gq = Some(GlobalQueue::recover(
            gq_config(),
            self.now,
            self.store.clone(),
        ));
        self.drain_gq();
        for w in 0..WORKERS {
            self.connect(w);
        }
    }

    fn fire_gq_timer(&mut self, i: usize) {
        let Some(gq) = self.gq.as_ref() else { return };
        let timers: Vec<GqTimer> = gq.timers().map(|(t, _)| t).collect();
        if let Some(t) = timers.get(i % timers.len().max(1)).copied() {
            self.note_timer(t);
            self.gq_handle(GqEvent::Timeout(t));
        }
    }

    fn fire_lb_timer(&mut self, w: usize, i: usize) {
        let Some(lb) = self.workers[w].lb.as_ref() else {
            return;
        };
        let timers: Vec<_> = lb.timers().map(|(t, _)| t).collect();
        if let Some(t) = timers.get(i % timers.len().max(1)) {
            self.lb_handle(w, LbEvent::Timeout(*t));
        }
    }

    fn note_timer(&mut self, timer: GqTimer) {
        if let GqTimer::Deadline(CallKey { exec, .. }) = timer {
            self.timed_out.insert(exec);
        }
    }

    /// Safety, after every step: at most one answer per execution, and it is the right one.
    fn check_safety(&self) {
        for (exec, answers) in &self.answers {
            assert_eq!(answers.len(), 1, "execution {exec:?} answered {answers:?}");
            let timeout = matches!(&answers[0], Answer::Error(e) if e.kind == ErrorKind::Timeout);
            if !(timeout && self.timed_out.contains(exec)) {
                assert_eq!(
                    answers[0],
                    expected(self.inputs[exec]),
                    "wrong answer for {exec:?}"
                );
            }
        }
    }

    /// Heals every fault, then runs the cluster with time moving until every execution is
    /// answered, or fails.
    fn heal_and_finish(&mut self) {
        self.restart_gateway();
        for w in 0..WORKERS {
            self.restart_worker(w);
            self.connect(w);
        }
        for _round in 0..2000 {
            if self.owed.iter().all(|e| self.answers.contains_key(e)) {
                return;
            }
            let mut moved = !self.unpersisted.is_empty()
                || !self.to_gq.is_empty()
                || !self.to_worker.is_empty();
            self.persist(usize::MAX);
            while !self.to_gq.is_empty() {
                self.deliver_to_gq(0);
            }
            while !self.to_worker.is_empty() {
                self.deliver_to_worker(0);
            }
            for w in 0..WORKERS {
                while !self.workers[w].running.is_empty() {
                    moved = true;
                    self.finish(w, 0);
                }
            }
            self.check_safety();
            if !moved {
                self.advance_time();
            }
        }
        let missing: Vec<_> = self
            .owed
            .iter()
            .filter(|e| !self.answers.contains_key(e))
            .collect();
        let gq = self.gq.as_ref().map(GlobalQueue::state);
        let lbs: Vec<_> = self.workers.iter().map(|w| &w.lb).collect();
        panic!("executions never answered after healing: {missing:?}\n{gq:#?}\n{lbs:#?}");
    }

    /// Lets `ms` milliseconds pass, firing every timer that comes due.
    fn tick(&mut self, ms: u64) {
        self.now = self.now + Duration::from_millis(ms);
        self.fire_due();
    }

    fn fire_due(&mut self) {
        let now = self.now;
        if let Some(gq) = self.gq.as_ref() {
            let due: Vec<GqTimer> = gq
                .timers()
                .filter(|(_, at)| *at <= now)
                .map(|(t, _)| t)
                .collect();
            due.into_iter().for_each(|t| self.note_timer(t));
        }
        if let Some(gq) = self.gq.as_mut() {
            gq.handle_timeouts(now);
        }
        self.drain_gq();
        for w in 0..WORKERS {
            if let Some(lb) = self.workers[w].lb.as_mut() {
                lb.handle_timeouts(now);
            }
            self.drain_lb(w);
        }
    }

    /// Moves time to the next timer and fires what is due, except the gateway's deadlines: in a
    /// healed cluster no call should need its timeout to make progress, so a chain that waits
    /// for one has stalled.
    fn advance_time(&mut self) {
        let deadline = |t: &GqTimer| matches!(t, GqTimer::Deadline(..));
        let mut next = self.gq.as_ref().and_then(|gq| {
            gq.timers()
                .filter(|(t, _)| !deadline(t))
                .map(|(_, at)| at)
                .min()
        });
        for w in &self.workers {
            if let Some(t) = w.lb.as_ref().and_then(LocalBus::poll_timeout) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        let Some(next) = next else { return };
        self.now = self.now.max(next);
        let now = self.now;
        if let Some(gq) = self.gq.as_ref() {
            let due: Vec<GqTimer> = gq
                .timers()
                .filter(|(t, at)| *at <= now && !deadline(t))
                .map(|(t, _)| t)
                .collect();
            for t in due {
                self.gq_handle(GqEvent::Timeout(t));
            }
        }
        for w in 0..WORKERS {
            if let Some(lb) = self.workers[w].lb.as_mut() {
                lb.handle_timeouts(now);
            }
            self.drain_lb(w);
        }
    }
}

fn gq_config() -> GqConfig {
    GqConfig {
        failure_timeout: Duration::from_secs(5),
        timeout_grace: Duration::from_secs(1),
        held_max: 64,
        ..GqConfig::default()
    }
}

#[derive(Clone, Debug)]
enum Step {
    Invoke(i64),
    ToGateway(usize),
    ToWorker(usize),
    Finish(usize),
    Persist(usize),
    Tick(u64),
    GqTimer(usize),
    LbTimer(usize, usize),
    CrashWorker(usize),
    RestartWorker(usize),
    Disconnect(usize),
    Reconnect(usize),
    CrashGateway,
    RestartGateway,
}

fn step() -> impl Strategy<Value = Step> {
    let w = 0..WORKERS;
    prop_oneof![
        2 => (0i64..20).prop_map(Step::Invoke),
        12 => any::<usize>().prop_map(Step::ToGateway),
        12 => any::<usize>().prop_map(Step::ToWorker),
        12 => any::<usize>().prop_map(Step::Finish),
        6 => (1usize..4).prop_map(Step::Persist),
        3 => (1u64..1500).prop_map(Step::Tick),
        1 => any::<usize>().prop_map(Step::GqTimer),
        2 => (w.clone(), any::<usize>()).prop_map(|(w, i)| Step::LbTimer(w, i)),
        1 => w.clone().prop_map(Step::CrashWorker),
        2 => w.clone().prop_map(Step::RestartWorker),
        1 => w.clone().prop_map(Step::Disconnect),
        2 => w.prop_map(Step::Reconnect),
        1 => Just(Step::CrashGateway),
        2 => Just(Step::RestartGateway),
    ]
}

fn run(window: usize, steps: &[Step]) {
    let mut c = Cluster::new(window);
    c.persist(usize::MAX);
    for s in steps {
        match *s {
            Step::Invoke(n) => c.invoke(n),
            Step::ToGateway(i) => c.deliver_to_gq(i),
            Step::ToWorker(i) => c.deliver_to_worker(i),
            Step::Finish(i) => c.finish_any(i),
            Step::Persist(n) => c.persist(n),
            Step::Tick(ms) => c.tick(ms),
            Step::GqTimer(i) => c.fire_gq_timer(i),
            Step::LbTimer(w, i) => c.fire_lb_timer(w, i),
            Step::CrashWorker(w) => c.crash_worker(w),
            Step::RestartWorker(w) => c.restart_worker(w),
            Step::Disconnect(w) => c.disconnect(w),
            Step::Reconnect(w) => c.connect(w),
            Step::CrashGateway => c.crash_gateway(),
            Step::RestartGateway => c.restart_gateway(),
        }
        c.check_safety();
    }
    c.heal_and_finish();
    c.check_safety();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// With a window of one message, reports coalesce often.
    #[test]
    fn every_execution_is_answered_once_and_correctly_window_1(
        steps in proptest::collection::vec(step(), 1..300)
    ) {
        run(1, &steps);
    }

    /// With a wider window, messages overtake each other in flight.
    #[test]
    fn every_execution_is_answered_once_and_correctly_window_4(
        steps in proptest::collection::vec(step(), 1..300)
    ) {
        run(4, &steps);
    }
}

#[test]
fn a_quiet_cluster_answers_every_execution() {
    let mut c = Cluster::new(4);
    c.persist(usize::MAX);
    c.heal_and_finish();
    for n in 0..10 {
        c.invoke(n);
    }
    c.heal_and_finish();
    assert_eq!(c.answers.len(), 10);
    c.check_safety();
}

/// A schedule the property test found: a gateway crash lost the record of `a → b` after `b` had
/// been dispatched, so the chain ran twice; the recovered gateway then placed `c` with attempt 0
/// on a worker that had already run `c`'s attempt 0 itself, which ignored the dispatch as a
/// re-send, and the chain stalled. Placements now take fresh attempts above the epoch's floor.
#[test]
fn a_recovered_gateway_never_repeats_an_attempt() {
    let steps = vec![
        Step::ToGateway(10120736788556333909),
        Step::ToGateway(0),
        Step::ToGateway(0),
        Step::Invoke(0),
        Step::ToGateway(0),
        Step::Persist(2),
        Step::Persist(2),
        Step::Invoke(0),
        Step::Invoke(0),
        Step::Invoke(0),
        Step::CrashGateway,
        Step::RestartGateway,
        Step::ToGateway(8451327561253508672),
        Step::ToGateway(13914584451546068172),
        Step::ToWorker(0),
        Step::Invoke(0),
        Step::ToGateway(0),
        Step::ToGateway(0),
        Step::CrashWorker(0),
        Step::ToGateway(0),
        Step::Invoke(6),
        Step::Invoke(0),
        Step::ToGateway(0),
        Step::Persist(2),
        Step::ToGateway(3254814),
        Step::ToWorker(5390729787558650121),
        Step::Finish(7662736100189068145),
        Step::Disconnect(2),
        Step::Finish(18092166240568893435),
        Step::Finish(12548552837361326007),
        Step::ToWorker(5550757133753548950),
        Step::GqTimer(15246576536670710214),
        Step::Persist(3),
        Step::GqTimer(1777901255149505959),
        Step::Persist(1),
        Step::ToWorker(13140082403322828796),
        Step::Finish(5240499371443293450),
        Step::Tick(911),
        Step::Finish(3392478222398321931),
        Step::RestartWorker(1),
        Step::Disconnect(0),
        Step::Finish(3868590267616536955),
        Step::ToGateway(585217596226765751),
        Step::Persist(2),
        Step::GqTimer(12806395910372935724),
        Step::GqTimer(684448502688804952),
        Step::ToWorker(8280335103982920132),
        Step::ToWorker(16942964712444975472),
        Step::ToWorker(1426116942343068532),
        Step::Persist(3),
        Step::CrashGateway,
    ];
    run(4, &steps);
}

/// A schedule the property test found: a deadline fired, the gateway told the worker to abort
/// the attempt, and crashed before its decision was durable. The recovered gateway still
/// expected the attempt the worker had dropped. Abort and Cancel now wait for durability.
#[test]
fn a_worker_drops_work_only_on_durable_orders() {
    let steps = vec![
        Step::Invoke(0),
        Step::CrashGateway,
        Step::RestartGateway,
        Step::ToWorker(0),
        Step::Invoke(0),
        Step::Persist(1),
        Step::Invoke(0),
        Step::ToGateway(0),
        Step::ToWorker(0),
        Step::Finish(0),
        Step::ToWorker(0),
        Step::ToWorker(0),
        Step::Persist(2),
        Step::Persist(1),
        Step::ToWorker(0),
        Step::ToGateway(0),
        Step::ToWorker(0),
        Step::Invoke(0),
        Step::ToGateway(2876273946666982439),
        Step::Tick(1),
        Step::GqTimer(8796392947862229557),
        Step::ToWorker(0),
        Step::ToWorker(0),
        Step::CrashGateway,
    ];
    run(1, &steps);
}
