//! The hand-off bookkeeping of one zygote life: which call waits, which spare instances are
//! held idle, which instance a call is being handed to, which serves it, and which call takes
//! the spare on its way.
//!
//! [`HandOff`] is sans-IO: plain `&mut self` methods, no locks, no tasks, no sockets. Where the
//! zygote's host must act (answer a call, give a spare to the call that claimed it, close or
//! kill an instance), a method returns what to do and the host does it. The host keeps one
//! `HandOff` under a mutex shared by its call futures and its reader task, and calls each
//! method in one critical section; the loom model in `tests/loom_handoff.rs` runs this same
//! code under every interleaving of those sections. It is public only for that model.
//!
//! A call starts when its frame is written whole to an instance. A spare reported dead before
//! that never had the call, which goes elsewhere with no error; an instance that ends after
//! the write has crashed its call.
//!
//! The types it is generic over: `S`, the instance's socket (the host's `Arc<UnixStream>`: the
//! last copy dropped closes it); `W`, how a waiting call is answered; `C`, how the spare on its
//! way is given to the call that claimed it; `D`, why this life ended.

use std::collections::HashMap;

use super::launch::Exit;

/// How one zygote's instances are kept.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Calls one instance serves before the worker closes its socket (at least 1).
    pub reuse: u32,
    /// Whether spare instances are kept (off: the zygote forks on demand).
    pub prefork: bool,
    /// How many spares are kept, held or on their way (0 without `prefork`).
    pub spares: u32,
}

/// An instance whose private socket the worker holds.
#[derive(Clone, Debug)]
pub struct Held<S> {
    /// The zygote's number for it.
    pub number: u32,
    /// Its private socket.
    pub sock: S,
    /// Calls given to it so far.
    pub served: u32,
}

/// The hand-off bookkeeping of one zygote life (see the module doc).
pub struct HandOff<S, W, C, D> {
    policy: Policy,
    /// Why this life ended, once it has.
    dead: Option<D>,
    waiting: HashMap<u32, W>,
    next_slot: u32,
    /// Instances waiting for a call, most recently used last.
    idle: Vec<Held<S>>,
    /// The instance each slot is being handed to, until its frame is written whole.
    handing: HashMap<u32, Handing<S>>,
    /// The instance serving each slot, once its frame is written (or the zygote wrote it).
    serving: HashMap<u32, Held<S>>,
    /// How many `WANT`s are out whose `SPARE` is not yet here.
    spares_asked: u32,
    /// The call that takes the spare on its way, when it comes.
    claim: Option<(u32, C)>,
}

/// A spare given a call whose frame is not yet written whole to it: the call has not started.
struct Handing<S> {
    held: Held<S>,
    /// The write of the frame has begun. Before it, an end of the instance removes the entry
    /// (the call goes elsewhere); during it, the end is kept here, and the write's outcome
    /// decides.
    writing: bool,
    /// How the instance ended, when that was reported during the write.
    ended: Option<Exit>,
}

impl<S> Handing<S> {
    fn new(held: Held<S>) -> Self {
        Self {
            held,
            writing: false,
            ended: None,
        }
    }
}

/// How a call reaches an instance.
pub enum Route<S, T> {
    /// Through this held spare (a copy: the bookkeeping keeps it as being handed the call).
    Held(Held<S>),
    /// Through the spare on its way, which comes through `T`, the claim's other end.
    Coming(T),
    /// Through the zygote, which forks an instance for it.
    Zygote,
    /// Nowhere: the call no longer waits (this life ended, and failed it).
    Settled,
}

/// How the write of a call's frame to its spare ended, for the bookkeeping.
pub enum Written<S> {
    /// The call was settled meanwhile (its result came, or this life ended).
    Settled,
    /// The call started: its instance serves it.
    Started,
    /// The call started, but its instance's end was reported during the write: the call
    /// crashed (the host answers it with the end), and the instance is let go.
    Crashed(Exit, Held<S>),
    /// The write failed: the instance never had the call, and is let go (closing its socket
    /// ends a live one). The call goes elsewhere.
    Failed(Held<S>),
}

/// What a `SPARE` from the zygote becomes.
pub enum Spare<S, C> {
    /// Held: idle, or serving the call the zygote forked it for.
    Kept,
    /// Handed to the call that claimed the spare on its way: the host gives it through `C`
    /// BEFORE it releases the lock this was decided under, since [`HandOff::unclaim`] counts
    /// on a spare whose claim is gone being in the claim's channel already.
    Give(C, Held<S>),
    /// Nobody wants it (its call was given up): the host kills it, and closes its socket.
    Unwanted(S),
}

/// What an instance that ended was to the worker.
pub enum Ended<S> {
    /// Not held: its socket was closed, or it was never handed over.
    Unheld,
    /// A held spare that had started no call (idle, or being handed one); the instances let
    /// go (none when a call's frame is being written to it: the write's end decides).
    Idle(Vec<Held<S>>),
    /// Serving this slot's call, which it will never answer; the instance is let go.
    Serving(u32, Held<S>),
}

/// What a call given up leaves behind.
pub struct Abandoned<S, W> {
    /// The call's waiter, if it still waited (nobody answers it now).
    pub waiter: Option<W>,
    /// The instance serving or being handed the call: the host kills it, and closes its
    /// socket (an instance that answered anyway then exits).
    pub held: Option<Held<S>>,
}

/// What an instance that broke the wire leaves behind.
pub struct Broken<S, W> {
    /// The call it held and that call's waiter, if it still waited: the host fails it.
    pub call: Option<(u32, W)>,
    /// The instance, if still held: the host kills it, and closes its socket.
    pub held: Option<Held<S>>,
}

/// What an ended life leaves behind.
pub struct Remains<S, W, C> {
    /// The calls in flight, which the host fails.
    pub waiters: Vec<W>,
    /// Every instance held (idle, being handed a call, serving), whose sockets the host
    /// closes.
    pub instances: Vec<Held<S>>,
    /// The claim on the spare on its way, dropped.
    pub claim: Option<C>,
}

impl<S: Clone, W, C, D: Clone> HandOff<S, W, C, D> {
    /// The bookkeeping of a life just started: nothing held, nothing waiting.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            dead: None,
            waiting: HashMap::new(),
            next_slot: 0,
            idle: Vec::new(),
            handing: HashMap::new(),
            serving: HashMap::new(),
            spares_asked: 0,
            claim: None,
        }
    }

    /// A call begins: it waits in a new slot, answered through `waiter`. An error: this life
    /// ended, why.
    pub fn open(&mut self, waiter: W) -> Result<u32, D> {
        if let Some(error) = &self.dead {
            return Err(error.clone());
        }
        self.next_slot = self.next_slot.wrapping_add(1).max(1);
        let slot = self.next_slot;
        self.waiting.insert(slot, waiter);
        Ok(slot)
    }

    /// The next way to an instance for the call in `slot`; with `spares` false, the zygote.
    /// `claim` makes a channel for the spare on its way, when the call is to wait for it.
    pub fn route<T>(
        &mut self,
        slot: u32,
        spares: bool,
        claim: impl FnOnce() -> (C, T),
    ) -> Route<S, T> {
        if !self.waiting.contains_key(&slot) {
            Route::Settled
        } else if !spares {
            Route::Zygote
        } else if let Some(mut held) = self.idle.pop() {
            held.served += 1;
            self.handing.insert(slot, Handing::new(held.clone()));
            Route::Held(held)
        } else if self.spares_asked > 0 && self.claim.is_none() {
            // A spare is on its way: it comes sooner than a fork the zygote would start only
            // after forking it.
            let (give, take) = claim();
            self.claim = Some((slot, give));
            Route::Coming(take)
        } else {
            Route::Zygote
        }
    }

    /// The write of the call's frame to its spare begins; false if the spare was reported
    /// dead before (it never had the call).
    pub fn begin_write(&mut self, slot: u32) -> bool {
        match self.handing.get_mut(&slot) {
            Some(handing) => {
                handing.writing = true;
                true
            }
            None => false,
        }
    }

    /// The write of the call's frame ended, whole (`written`) or not. Written whole, the call
    /// has started: its instance serves it (and if its end was reported during the write, the
    /// call crashed).
    pub fn end_write(&mut self, slot: u32, written: bool) -> Written<S> {
        // Gone: the call's result came already, or this life ended; either settled it.
        let Some(handing) = self.handing.remove(&slot) else {
            return Written::Settled;
        };
        if !written {
            return Written::Failed(handing.held);
        }
        match handing.ended {
            None => {
                self.serving.insert(slot, handing.held);
                Written::Started
            }
            Some(exit) => Written::Crashed(exit, handing.held),
        }
    }

    /// Gives up waiting for the spare on its way. True: the claim was withdrawn, and no spare
    /// will come through it. False: the spare was given meanwhile, and is in the claim's
    /// channel (see [`Spare::Give`]).
    pub fn unclaim(&mut self, slot: u32) -> bool {
        if self
            .claim
            .as_ref()
            .is_some_and(|(claimed, _)| *claimed == slot)
        {
            self.claim = None;
            return true;
        }
        false
    }

    /// Forgets a call nobody waits for any more. A call not yet handed over has its instance
    /// killed when its `SPARE` comes.
    pub fn abandon(&mut self, slot: u32) -> Abandoned<S, W> {
        let waiter = self.waiting.remove(&slot);
        let held = self.serving.remove(&slot);
        let held = held.or_else(|| self.handing.remove(&slot).map(|handing| handing.held));
        Abandoned { waiter, held }
    }

    /// How many more spares to ask the zygote for (one `WANT` each), counted as asked, so
    /// that `spares` are held or on their way. None once this life ended.
    pub fn ask_spares(&mut self) -> u32 {
        let have = self.idle.len() as u32 + self.spares_asked;
        let ask = if self.dead.is_none() {
            self.policy.spares.saturating_sub(have)
        } else {
            0
        };
        self.spares_asked += ask;
        ask
    }

    /// A `WANT` counted by [`HandOff::ask_spares`] could not be sent.
    pub fn spare_not_asked(&mut self) {
        self.spares_asked = self.spares_asked.saturating_sub(1);
    }

    /// Takes the waiter of the call in `slot`, to answer it; none if it no longer waits.
    pub fn settle(&mut self, slot: u32) -> Option<W> {
        self.waiting.remove(&slot)
    }

    /// Ends this life, for `error` (the first reason given is kept): returns the calls in
    /// flight and every instance held.
    pub fn shut_down(&mut self, error: D) -> Remains<S, W, C> {
        if self.dead.is_none() {
            self.dead = Some(error);
        }
        let mut instances: Vec<Held<S>> = std::mem::take(&mut self.idle);
        instances.extend(self.handing.drain().map(|(_, handing)| handing.held));
        instances.extend(self.serving.drain().map(|(_, held)| held));
        Remains {
            waiters: self.waiting.drain().map(|(_, waiter)| waiter).collect(),
            instances,
            claim: self.claim.take().map(|(_, give)| give),
        }
    }

    /// A `SPARE` came for `slot` (0: one asked for by `WANT`): the instance `number`, with
    /// its socket. It is held idle, handed to the call that claimed the spare on its way, or
    /// serves the call the zygote forked it for.
    pub fn on_spare(&mut self, slot: u32, number: u32, sock: S) -> Spare<S, C> {
        if slot == 0 {
            self.spares_asked = self.spares_asked.saturating_sub(1);
            match self.claim.take() {
                Some((claimed, give)) if self.waiting.contains_key(&claimed) => {
                    let held = Held {
                        number,
                        sock,
                        served: 1,
                    };
                    self.handing.insert(claimed, Handing::new(held.clone()));
                    Spare::Give(give, held)
                }
                _ => {
                    // A warm instance (reuse) is taken before a fresh one: most recently
                    // used last.
                    let held = Held {
                        number,
                        sock,
                        served: 0,
                    };
                    self.idle.insert(0, held);
                    Spare::Kept
                }
            }
        } else if self.waiting.contains_key(&slot) {
            // The zygote forked it for the call and writes the call to it: it serves.
            let held = Held {
                number,
                sock,
                served: 1,
            };
            self.serving.insert(slot, held);
            Spare::Kept
        } else {
            Spare::Unwanted(sock)
        }
    }

    /// A slot's result is out: its instance waits for the next call (`reuse`), or is
    /// returned, to be let go (its socket closed, it exits).
    pub fn finish(&mut self, slot: u32) -> Option<Held<S>> {
        // Still handing: the instance answered before the writer saw its write end.
        let held = self.serving.remove(&slot);
        let held = held.or_else(|| self.handing.remove(&slot).map(|handing| handing.held))?;
        if self.policy.prefork && held.served < self.policy.reuse {
            self.idle.push(held);
            None
        } else {
            Some(held)
        }
    }

    /// Whether the instance `number` holds the call in `slot` (serves it, or is being handed
    /// it): the only result it may send.
    pub fn holds(&self, number: u32, slot: u32) -> bool {
        self.serving
            .get(&slot)
            .is_some_and(|held| held.number == number)
            || self
                .handing
                .get(&slot)
                .is_some_and(|handing| handing.held.number == number)
    }

    /// The instance `number` broke the wire (sent what it must not): forgets it, and takes
    /// the call it held, which the host fails.
    pub fn broke(&mut self, number: u32) -> Broken<S, W> {
        if let Some(at) = self.idle.iter().position(|held| held.number == number) {
            let held = self.idle.remove(at);
            return Broken {
                call: None,
                held: Some(held),
            };
        }
        let handing = self
            .handing
            .iter()
            .find(|(_, handing)| handing.held.number == number)
            .map(|(slot, _)| *slot);
        let serving = self
            .serving
            .iter()
            .find(|(_, held)| held.number == number)
            .map(|(slot, _)| *slot);
        let (slot, held) = match (handing, serving) {
            // Being handed the call: its writer finds it gone and takes the call as settled.
            (Some(slot), _) => (slot, self.handing.remove(&slot).map(|h| h.held)),
            (None, Some(slot)) => (slot, self.serving.remove(&slot)),
            (None, None) => {
                return Broken {
                    call: None,
                    held: None,
                }
            }
        };
        Broken {
            call: self.waiting.remove(&slot).map(|waiter| (slot, waiter)),
            held,
        }
    }

    /// The instance `number` ended (`exit`): forgets it, and says what it was.
    pub fn instance_ended(&mut self, number: u32, exit: Exit) -> Ended<S> {
        let mut gone = Vec::new();
        let mut kept = 0;
        while kept < self.idle.len() {
            if self.idle[kept].number == number {
                gone.push(self.idle.remove(kept));
            } else {
                kept += 1;
            }
        }
        if !gone.is_empty() {
            return Ended::Idle(gone);
        }
        let handing = self
            .handing
            .iter()
            .find(|(_, handing)| handing.held.number == number)
            .map(|(slot, handing)| (*slot, handing.writing));
        match handing {
            // Before the write: the call's writer finds the spare gone and goes elsewhere.
            Some((slot, false)) => {
                let gone = self.handing.remove(&slot).map(|handing| handing.held);
                return Ended::Idle(gone.into_iter().collect());
            }
            // During the write: its outcome says whether the call started.
            Some((slot, true)) => {
                if let Some(handing) = self.handing.get_mut(&slot) {
                    handing.ended = Some(exit);
                }
                return Ended::Idle(Vec::new());
            }
            None => {}
        }
        let slot = self
            .serving
            .iter()
            .find(|(_, held)| held.number == number)
            .map(|(slot, _)| *slot);
        match slot.and_then(|slot| Some((slot, self.serving.remove(&slot)?))) {
            Some((slot, held)) => Ended::Serving(slot, held),
            None => Ended::Unheld,
        }
    }

    /// Why this life ended, once it has.
    pub fn dead(&self) -> Option<&D> {
        self.dead.as_ref()
    }

    /// The instances held idle, oldest first (for checks).
    pub fn idle(&self) -> impl Iterator<Item = &Held<S>> {
        self.idle.iter()
    }

    /// The instances serving a call, with its slot (for checks).
    pub fn serving(&self) -> impl Iterator<Item = (u32, &Held<S>)> {
        self.serving.iter().map(|(slot, held)| (*slot, held))
    }

    /// The instances being handed a call, with its slot (for checks).
    pub fn handing(&self) -> impl Iterator<Item = (u32, &Held<S>)> {
        self.handing
            .iter()
            .map(|(slot, handing)| (*slot, &handing.held))
    }

    /// Whether a call claims the spare on its way (for checks).
    pub fn claimed(&self) -> bool {
        self.claim.is_some()
    }

    /// The calls waiting, by slot (for checks).
    pub fn waiting(&self) -> impl Iterator<Item = u32> + '_ {
        self.waiting.keys().copied()
    }
}
