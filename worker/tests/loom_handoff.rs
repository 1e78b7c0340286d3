//! Loom models of the zygote's hand-off bookkeeping ([`sand_worker::runtime::handoff`]): the
//! same `HandOff` the zygote's host runs, under a loom mutex, with each racing side making the
//! host's own sequence of critical sections (see `runtime/zygote.rs`: `hand_over`, `abandon`,
//! `read_results`, `read_instance`, `on_spare`, `instance_broke`, `shut_down`). Loom runs every interleaving of those sections.
//!
//! Checked at the end of every interleaving:
//! - every call is settled exactly once (one reply, a refusal, or given up by its caller),
//!   with the right kind: a call whose frame was written whole to an instance that then ended
//!   crashed (`Died`); one whose instance ended before the write is no error, and goes on to
//!   the zygote;
//! - no instance is lost: each is idle, serving a call still waiting, or let go (closed or
//!   killed) exactly once;
//! - no spare is given to two calls, and a spare given to a call that went elsewhere is not
//!   left behind.
//!
//! Plain `loom::model` in a normal test: no `--cfg loom` (tokio changes under it).

use std::collections::HashMap;

use loom::sync::atomic::{AtomicU8, Ordering};
use loom::sync::{Arc, Mutex, MutexGuard};
use loom::thread;
use sand_worker::runtime::handoff::{Ended, HandOff, Held, Policy, Route, Spare, Written};
use sand_worker::runtime::Exit;

/// How many spares one call tries before it goes to the zygote (the host's `SPARES_TRIED_MAX`).
const SPARES_TRIED_MAX: u32 = 3;

/// A waiting call's answer channel: the call's number.
#[derive(Debug)]
struct Waiter(u32);

/// What a call was answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    Result,
    Died,
    Failed,
}

/// The claim's channel: the spare on its way, given under the world's lock.
#[derive(Debug)]
enum Chan {
    Empty,
    Given(Held<()>),
    Closed,
}

/// The giving end of a claim (the host's `oneshot::Sender<Held>`): dropped unused, it closes.
struct Give(Arc<Mutex<Chan>>);

impl Give {
    fn send(self, held: Held<()>) {
        *self.0.lock().expect("chan") = Chan::Given(held);
    }
}

impl Drop for Give {
    fn drop(&mut self) {
        let mut chan = self.0.lock().expect("chan");
        if matches!(*chan, Chan::Empty) {
            *chan = Chan::Closed;
        }
    }
}

type Hand = HandOff<(), Waiter, Give, &'static str>;

/// Everything that happened to calls and instances, in the order of the critical sections.
#[derive(Debug)]
enum Event {
    /// A call was answered.
    Reply(u32, Reply),
    /// A call was refused at its start: the life was over.
    Refused(u32),
    /// A call's caller gave up on it (timeout or drop): no answer may come after.
    Abandoned(u32),
    /// An instance was let go (socket closed, or killed): by number.
    LetGo(u32),
}

/// The host's state as the model sees it: the bookkeeping and a log, under one lock.
struct World {
    hand: Hand,
    log: Vec<Event>,
}

type Shared = Arc<Mutex<World>>;

fn world(policy: Policy) -> Shared {
    Arc::new(Mutex::new(World {
        hand: HandOff::new(policy),
        log: Vec::new(),
    }))
}

fn lock(world: &Shared) -> MutexGuard<'_, World> {
    world.lock().expect("the world's lock")
}

/// One prefork spare per call, reused once.
const ONE_SPARE: Policy = Policy {
    reuse: 1,
    prefork: true,
    spares: 1,
};

const KILLED: Exit = Exit::Signaled(9);

impl World {
    fn let_go(&mut self, held: Option<Held<()>>) {
        if let Some(held) = held {
            self.log.push(Event::LetGo(held.number));
        }
    }

    /// Whether instance `number` was let go: only then does it end (its socket closed, or
    /// killed), in these models.
    fn let_go_of(&self, number: u32) -> bool {
        self.log
            .iter()
            .any(|e| matches!(e, Event::LetGo(n) if *n == number))
    }

    fn replies(&self, call: u32) -> Vec<Reply> {
        self.log
            .iter()
            .filter_map(|e| match e {
                Event::Reply(c, reply) if *c == call => Some(*reply),
                _ => None,
            })
            .collect()
    }
}

/// `Running::deliver`: one critical section.
fn deliver(world: &Shared, slot: u32, reply: Reply) {
    let mut w = lock(world);
    if let Some(Waiter(call)) = w.hand.settle(slot) {
        w.log.push(Event::Reply(call, reply));
    }
}

/// `Running::keep_spare`'s count (the `WANT`s themselves are not modelled: the spare comes
/// from the reader side's `on_spare`).
fn keep_spare(world: &Shared) {
    lock(world).hand.ask_spares();
}

/// Holds instance `number` as an idle spare, as the start of a life does (one `WANT`, its
/// `SPARE`).
fn seed_spare(world: &Shared, number: u32) {
    keep_spare(world);
    on_spare(world, 0, number);
}

/// `Running::on_spare`: one critical section; a spare for the claimant is given under it.
fn on_spare(world: &Shared, slot: u32, number: u32) {
    let mut w = lock(world);
    match w.hand.on_spare(slot, number, ()) {
        Spare::Kept => {}
        Spare::Give(give, held) => give.send(held),
        Spare::Unwanted(()) => w.log.push(Event::LetGo(number)),
    }
}

/// Where a call's hand-over ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandedOver {
    /// Its frame was written whole to this instance.
    Written(u32),
    /// It went to the zygote (`CALL`), never having started on a spare.
    ToZygote,
    /// It was settled meanwhile (this life ended).
    Settled,
}

/// `Running::call`'s start: one critical section. `None`: refused (logged).
fn open(world: &Shared, call: u32) -> Option<u32> {
    let mut w = lock(world);
    match w.hand.open(Waiter(call)) {
        Ok(slot) => Some(slot),
        Err(_) => {
            w.log.push(Event::Refused(call));
            None
        }
    }
}

/// A claim on the spare on its way: its giving end and its channel (`oneshot::channel`).
fn claim() -> (Give, Arc<Mutex<Chan>>) {
    let chan = Arc::new(Mutex::new(Chan::Empty));
    (Give(chan.clone()), chan)
}

/// `Running::hand_over`, with each frame write's outcome taken from `writes` (in order) and
/// its end told to `wrote` (1: whole, 2: not). Waiting for the spare on its way looks at its
/// channel once: either it was given by then, or the wait timed out.
fn hand_over(world: &Shared, slot: u32, writes: &[bool], wrote: Option<&AtomicU8>) -> HandedOver {
    let mut writes = writes.iter().copied();
    for tried in 0.. {
        let route = lock(world)
            .hand
            .route(slot, tried < SPARES_TRIED_MAX, claim);
        let spare = match route {
            Route::Held(held) => held,
            Route::Coming(chan) => {
                let now = std::mem::replace(&mut *chan.lock().expect("chan"), Chan::Empty);
                match now {
                    Chan::Given(held) => held,
                    Chan::Closed => break,
                    Chan::Empty => {
                        // Timed out: `Running::unclaim`, then `try_recv` after the lock.
                        if lock(world).hand.unclaim(slot) {
                            break;
                        }
                        let now = std::mem::replace(&mut *chan.lock().expect("chan"), Chan::Empty);
                        match now {
                            Chan::Given(held) => held,
                            // Dropped: this life ended.
                            Chan::Closed => break,
                            Chan::Empty => panic!("the claim was gone but no spare was given"),
                        }
                    }
                }
            }
            Route::Zygote => break,
            Route::Settled => return HandedOver::Settled,
        };
        if lock(world).hand.begin_write(slot) {
            let whole = writes.next().unwrap_or(true);
            if let Some(wrote) = wrote {
                wrote.store(if whole { 1 } else { 2 }, Ordering::SeqCst);
            }
            // `Running::end_write`: one critical section, then `deliver` for a crash. (What
            // the model logs, it logs in the section that decided it.)
            let crashed = {
                let mut w = lock(world);
                match w.hand.end_write(slot, whole) {
                    Written::Settled | Written::Started => false,
                    Written::Crashed(_, held) => {
                        w.let_go(Some(held));
                        true
                    }
                    Written::Failed(held) => {
                        w.let_go(Some(held));
                        continue;
                    }
                }
            };
            if crashed {
                deliver(world, slot, Reply::Died);
            }
            return HandedOver::Written(spare.number);
        }
    }
    HandedOver::ToZygote
}

/// `Running::abandon` (a timeout, or `Pending`'s drop): one critical section; the caller has
/// given up, whatever was answered; the instance is killed.
fn abandon(world: &Shared, call: u32, slot: u32) {
    let mut w = lock(world);
    let abandoned = w.hand.abandon(slot);
    if let Some(Waiter(waiting)) = abandoned.waiter {
        assert_eq!(waiting, call, "a slot's waiter is its call's");
    }
    w.log.push(Event::Abandoned(call));
    w.let_go(abandoned.held);
}

/// `read_results` on a `DIED`: `instance_ended`, then `deliver` for the call it served, then
/// `keep_spare` unless the instance was not held.
fn instance_ended(world: &Shared, number: u32, exit: Exit) {
    let serving = {
        let mut w = lock(world);
        match w.hand.instance_ended(number, exit) {
            Ended::Unheld => return,
            Ended::Idle(gone) => {
                for held in gone {
                    w.let_go(Some(held));
                }
                None
            }
            Ended::Serving(slot, held) => {
                w.let_go(Some(held));
                Some(slot)
            }
        }
    };
    if let Some(slot) = serving {
        deliver(world, slot, Reply::Died);
    }
    keep_spare(world);
}

/// `read_instance` on a result of instance `number` for `slot`: `holds`, then (its body read)
/// `finish`, `deliver` and `keep_spare`; or, for a call it does not hold, `instance_broke`.
fn result(world: &Shared, number: u32, slot: u32) {
    if !lock(world).hand.holds(number, slot) {
        return broke(world, number);
    }
    {
        let mut w = lock(world);
        let let_go = w.hand.finish(slot);
        w.let_go(let_go);
    }
    deliver(world, slot, Reply::Result);
    keep_spare(world);
}

/// `Running::instance_broke`: `broke` (its call fails), then `keep_spare`.
fn broke(world: &Shared, number: u32) {
    {
        let mut w = lock(world);
        let broken = w.hand.broke(number);
        if let Some((_, Waiter(call))) = broken.call {
            w.log.push(Event::Reply(call, Reply::Failed));
        }
        w.let_go(broken.held);
    }
    keep_spare(world);
}

/// `Running::shut_down`: one critical section, then the calls in flight fail.
fn shut_down(world: &Shared) {
    let mut w = lock(world);
    let remains = w.hand.shut_down("the zygote died");
    for held in remains.instances {
        w.let_go(Some(held));
    }
    for Waiter(call) in remains.waiters {
        w.log.push(Event::Reply(call, Reply::Failed));
    }
}

/// What a finished interleaving must show, for `calls` and `instances`.
/// Each call is settled exactly once: answered once, refused, or given up by its caller (an
/// answer that came before is dropped; none may come after).
fn check_settled(w: &World, calls: &[u32]) {
    for &call in calls {
        let mine = |e: &&Event| match e {
            Event::Reply(c, _) | Event::Refused(c) | Event::Abandoned(c) => *c == call,
            Event::LetGo(_) => false,
        };
        let events: Vec<&Event> = w.log.iter().filter(mine).collect();
        let settled = match events.iter().position(|e| matches!(e, Event::Abandoned(_))) {
            Some(given_up) => events.len() == given_up + 1 && given_up <= 1,
            None => events.len() == 1,
        };
        assert!(
            settled,
            "call {call} settled once: {events:?} in {:?}",
            w.log
        );
    }
}

/// Each instance is idle, serving a call that still waits, or let go, exactly once; no
/// instance is left being handed a call (every hand-over ended).
fn check_instances(w: &World, instances: &[u32]) {
    let waiting: Vec<u32> = w.hand.waiting().collect();
    for (slot, held) in w.hand.serving() {
        assert!(
            waiting.contains(&slot),
            "instance {} serves slot {slot}, which no call waits on: {:?}",
            held.number,
            w.log
        );
    }
    assert_eq!(
        w.hand.handing().count(),
        0,
        "a spare is left being handed a call: {:?}",
        w.log
    );
    let mut count: HashMap<u32, usize> = HashMap::new();
    let held = w.hand.idle().map(|h| h.number);
    let held = held.chain(w.hand.serving().map(|(_, h)| h.number));
    let let_go = w.log.iter().filter_map(|e| match e {
        Event::LetGo(n) => Some(*n),
        _ => None,
    });
    for number in held.chain(let_go) {
        *count.entry(number).or_default() += 1;
    }
    for &number in instances {
        assert_eq!(
            count.get(&number).copied().unwrap_or(0),
            1,
            "instance {number} accounted once (idle {:?}, serving {:?}): {:?}",
            w.hand.idle().map(|h| h.number).collect::<Vec<_>>(),
            w.hand
                .serving()
                .map(|(s, h)| (s, h.number))
                .collect::<Vec<_>>(),
            w.log
        );
    }
    assert_eq!(
        count.len(),
        instances.len(),
        "no unknown instance: {count:?}"
    );
}

/// Fewer interleavings than the fewest a model here has (56) mean its sides no longer race.
const INTERLEAVINGS_MIN: usize = 50;

/// Runs `f` under every interleaving of its threads' critical sections (no preemption bound:
/// these models are small enough to explore whole, each in well under a second in release).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = runs.clone();
    loom::model(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    let runs = runs.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{runs} interleavings");
    assert!(
        runs >= INTERLEAVINGS_MIN,
        "only {runs} interleavings: the sides no longer race"
    );
}

/// Runs the call's side and the reader's side on two loom threads over `world`, and `main` on
/// the model's own thread meanwhile; returns the call's outcome once both sides are done.
fn race<T: Send + 'static>(
    world: &Shared,
    caller: impl FnOnce(&Shared) -> T + Send + 'static,
    reader: impl FnOnce(&Shared) + Send + 'static,
    main: impl FnOnce(&Shared),
) -> T {
    let caller = thread::spawn({
        let world = world.clone();
        move || caller(&world)
    });
    let reader = thread::spawn({
        let world = world.clone();
        move || reader(&world)
    });
    main(world);
    let outcome = caller.join().expect("caller");
    reader.join().expect("reader");
    outcome
}

/// The reader's side after a written frame: once the write is done, the result, then (the
/// socket closed after it) the instance's end with `exit`.
fn result_then_end(wrote: Arc<AtomicU8>, exit: Exit) -> impl FnOnce(&Shared) + Send + 'static {
    move |world| {
        while wrote.load(Ordering::SeqCst) == 0 {
            thread::yield_now();
        }
        result(world, 1, 1);
        if lock(world).let_go_of(1) {
            instance_ended(world, 1, exit);
        }
    }
}

/// A call takes a held spare (route, begin_write, write, end_write) while the reader reports
/// that spare's end. Written whole, the call crashed; the spare dead before the write (or the
/// write failed), the call goes on to the zygote with no error, and the spare is let go once.
#[test]
fn loom_a_held_spare_races_its_end() {
    for whole in [true, false] {
        model(move || {
            let world = world(ONE_SPARE);
            seed_spare(&world, 1);
            let (slot, handed) = race(
                &world,
                move |world| {
                    let slot = open(world, 10).expect("alive");
                    (slot, hand_over(world, slot, &[whole], None))
                },
                |world| instance_ended(world, 1, KILLED),
                |_| {},
            );
            let w = lock(&world);
            match handed {
                HandedOver::Written(1) => {
                    assert!(whole, "a failed write never starts a call");
                    assert_eq!(w.replies(10), [Reply::Died], "crashed: {:?}", w.log);
                }
                HandedOver::ToZygote => {
                    assert!(
                        w.replies(10).is_empty(),
                        "no error for a call that never started"
                    );
                    assert!(
                        w.hand.waiting().any(|s| s == slot),
                        "it waits on the zygote"
                    );
                }
                other => panic!("the call ended {other:?}: {:?}", w.log),
            }
            check_instances(&w, &[1]);
            drop(w);
            // The zygote's answer is not modelled: end the life, then every call is settled.
            shut_down(&world);
            let w = lock(&world);
            check_settled(&w, &[10]);
            check_instances(&w, &[1]);
        });
    }
}

/// A call takes a held spare while the reader reports its result (which follows the write)
/// and then its end, once its socket is closed after the result (`reuse` 1). The call gets
/// the result, the instance is let go once, and its end changes nothing.
#[test]
fn loom_a_held_spare_races_its_result() {
    model(|| {
        let world = world(ONE_SPARE);
        seed_spare(&world, 1);
        let wrote = Arc::new(AtomicU8::new(0));
        let handed = race(
            &world,
            {
                let wrote = wrote.clone();
                move |world| {
                    let slot = open(world, 10).expect("alive");
                    hand_over(world, slot, &[true], Some(&wrote))
                }
            },
            result_then_end(wrote, Exit::Exited(0)),
            |_| {},
        );
        assert_eq!(handed, HandedOver::Written(1));
        let w = lock(&world);
        assert_eq!(w.replies(10), [Reply::Result], "{:?}", w.log);
        check_settled(&w, &[10]);
        check_instances(&w, &[1]);
    });
}

/// A call finds no spare held but one on its way, and waits for it (route gives `Coming`);
/// the reader's `on_spare` races the wait's timeout (`unclaim`). The spare is given to the
/// call and serves it, or the call goes to the zygote and the spare is held idle: never both,
/// never lost.
#[test]
fn loom_a_call_waiting_for_the_coming_spare_races_its_arrival() {
    model(|| {
        let world = world(ONE_SPARE);
        keep_spare(&world);
        let (slot, handed) = race(
            &world,
            |world| {
                let slot = open(world, 10).expect("alive");
                (slot, hand_over(world, slot, &[true], None))
            },
            |world| on_spare(world, 0, 7),
            |_| {},
        );
        let w = lock(&world);
        let idle: Vec<u32> = w.hand.idle().map(|h| h.number).collect();
        let serving: Vec<(u32, u32)> = w.hand.serving().map(|(s, h)| (s, h.number)).collect();
        match handed {
            HandedOver::Written(7) => {
                assert_eq!(serving, [(slot, 7)], "the spare serves its call");
                assert!(idle.is_empty(), "and is not also idle");
            }
            HandedOver::ToZygote => {
                assert_eq!(idle, [7], "the spare waits for the next call");
                assert!(serving.is_empty(), "and serves no call");
            }
            other => panic!("the call ended {other:?}: {:?}", w.log),
        }
        assert!(!w.hand.claimed(), "no claim outlives its call's wait");
        assert!(w.replies(10).is_empty());
        check_instances(&w, &[7]);
    });
}

/// Two calls race for one held spare while another is on its way: no spare is given to both.
#[test]
fn loom_two_calls_race_for_the_spares() {
    model(|| {
        let world = world(Policy {
            reuse: 1,
            prefork: true,
            spares: 2,
        });
        seed_spare(&world, 1);
        keep_spare(&world);
        let callers: Vec<_> = [10, 11]
            .into_iter()
            .map(|call| {
                let world = world.clone();
                thread::spawn(move || {
                    let slot = open(&world, call).expect("alive");
                    hand_over(&world, slot, &[true], None)
                })
            })
            .collect();
        on_spare(&world, 0, 2);
        let handed: Vec<HandedOver> = callers
            .into_iter()
            .map(|c| c.join().expect("caller"))
            .collect();
        let w = lock(&world);
        let mut started: Vec<u32> = handed
            .iter()
            .filter_map(|h| match h {
                HandedOver::Written(n) => Some(*n),
                _ => None,
            })
            .collect();
        started.sort_unstable();
        started.dedup();
        let written = handed
            .iter()
            .filter(|h| matches!(h, HandedOver::Written(_)))
            .count();
        assert_eq!(
            started.len(),
            written,
            "a spare given to two calls: {handed:?}"
        );
        assert!(written >= 1, "the held spare serves a call: {handed:?}");
        check_instances(&w, &[1, 2]);
    });
}

/// A call's caller gives up (timeout or drop) after its frame was written, while the reader
/// reports its result and then, once it was let go, its instance's end. The call is settled
/// once: by its result,
/// or given up (its waiter gone, so the result goes nowhere); the instance is let go once.
#[test]
fn loom_an_abandon_races_a_result_and_an_instance_end() {
    model(|| {
        let world = world(ONE_SPARE);
        seed_spare(&world, 1);
        let wrote = Arc::new(AtomicU8::new(0));
        let handed = race(
            &world,
            {
                let wrote = wrote.clone();
                move |world| {
                    let slot = open(world, 10).expect("alive");
                    let handed = hand_over(world, slot, &[true], Some(&wrote));
                    // The timeout fires unless the answer is there by then.
                    if lock(world).replies(10).is_empty() {
                        abandon(world, 10, slot);
                    }
                    handed
                }
            },
            result_then_end(wrote, KILLED),
            |_| {},
        );
        assert_eq!(handed, HandedOver::Written(1));
        let w = lock(&world);
        check_settled(&w, &[10]);
        check_instances(&w, &[1]);
    });
}

/// A call dropped while it waits for the spare on its way (`Pending`'s drop abandons it):
/// the spare that comes is held idle, or (given to the call first) killed with the call;
/// never lost, and the claim does not outlive the spare's coming.
#[test]
fn loom_an_abandon_races_the_coming_spare() {
    model(|| {
        let world = world(ONE_SPARE);
        keep_spare(&world);
        race(
            &world,
            |world| {
                let slot = open(world, 10).expect("alive");
                let route = lock(world).hand.route(slot, true, claim);
                // Dropped while it waits (or, the spare given already, before its write).
                drop(route);
                abandon(world, 10, slot);
            },
            |world| on_spare(world, 0, 7),
            |_| {},
        );
        let w = lock(&world);
        assert!(!w.hand.claimed(), "no claim outlives the spare's coming");
        check_settled(&w, &[10]);
        check_instances(&w, &[7]);
    });
}

/// The zygote dies (`shut_down`) while a call takes a held spare and (in one model) the
/// reader reports the spare's end: the call is failed once (or was refused), and nothing
/// stays held.
#[test]
fn loom_a_death_races_a_held_hand_off_and_an_end() {
    for reported in [true, false] {
        model(move || {
            let world = world(ONE_SPARE);
            seed_spare(&world, 1);
            race(
                &world,
                |world| open(world, 10).map(|slot| hand_over(world, slot, &[true], None)),
                // The instance is killed with its zygote; its end may never be reported.
                move |world| {
                    if reported {
                        instance_ended(world, 1, KILLED);
                    }
                },
                shut_down,
            );
            let w = lock(&world);
            check_settled(&w, &[10]);
            check_instances(&w, &[1]);
            assert_eq!(
                w.hand.idle().count() + w.hand.serving().count(),
                0,
                "nothing stays held: {:?}",
                w.log
            );
            assert!(w.hand.dead().is_some());
        });
    }
}

/// The zygote dies while a call waits for the spare on its way and that spare comes: the
/// call is failed once (or refused), the claim is dropped, and the spare is let go or held
/// idle by a dead life, never lost or given.
#[test]
fn loom_a_death_races_the_coming_spare() {
    model(|| {
        let world = world(ONE_SPARE);
        keep_spare(&world);
        let handed = race(
            &world,
            |world| open(world, 10).map(|slot| hand_over(world, slot, &[true], None)),
            |world| on_spare(world, 0, 7),
            shut_down,
        );
        let w = lock(&world);
        check_settled(&w, &[10]);
        check_instances(&w, &[7]);
        assert!(!w.hand.claimed(), "no claim outlives its life");
        assert!(
            w.hand.serving().count() == 0,
            "no instance serves in a dead life: {handed:?} {:?}",
            w.log
        );
    });
}

/// A held spare breaks the wire (sends a result for a call it does not hold) while a call takes
/// it, and its end (the kill) is reported after. Whenever the break lands (idle, being handed
/// the call, serving it), the call is settled once (failed, or sent on to the zygote when the
/// spare was gone before it took it), and the instance is let go once.
#[test]
fn loom_an_instance_breaking_the_wire_races_its_hand_off() {
    model(|| {
        let world = world(ONE_SPARE);
        seed_spare(&world, 1);
        let handed = race(
            &world,
            |world| {
                let slot = open(world, 10).expect("alive");
                hand_over(world, slot, &[true], None)
            },
            |world| {
                result(world, 1, 7);
                instance_ended(world, 1, KILLED);
            },
            |_| {},
        );
        let w = lock(&world);
        match handed {
            // It broke while serving the call, or while being handed it (the writer then found
            // the call settled).
            HandedOver::Written(1) | HandedOver::Settled => {
                assert_eq!(w.replies(10), [Reply::Failed], "{:?}", w.log);
            }
            HandedOver::ToZygote => assert!(w.replies(10).is_empty(), "{:?}", w.log),
            other => panic!("the call ended {other:?}: {:?}", w.log),
        }
        check_instances(&w, &[1]);
        drop(w);
        shut_down(&world);
        let w = lock(&world);
        check_settled(&w, &[10]);
        check_instances(&w, &[1]);
    });
}
