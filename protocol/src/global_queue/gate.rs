//! The durability gate: the global queue's log of batches, and the outputs that wait for them.
//!
//! The queue logs each event's state changes as one batch and hands it out to be persisted.
//! What the event promises (an ack, a `Welcome`, an answer, a confirmation, anything that lets a
//! worker drop work) leaves only once that batch is reported durable; a dispatch leaves at once,
//! once the epoch record is durable. A message held for a worker is dropped if the worker's
//! connection changed while it waited.

use std::collections::{BTreeMap, VecDeque};

use super::GqOutput;
use crate::durable::{Batch, LogIndex, Op};
use crate::ids::WorkerId;
use crate::mutations::{Mutation, Mutations};
use crate::wire::ToWorker;

/// The batch that records a queue's epoch: the first of its life. Ids of the epoch must not
/// leave before it is durable.
const EPOCH_BATCH: LogIndex = LogIndex(1);

/// The log of batches and the outputs waiting for them.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default)]
pub(super) struct Gate {
    /// The last batch index handed out, and the last one reported durable.
    logged: LogIndex,
    durable: LogIndex,
    /// Ops of the event being handled: the open batch.
    batch: Vec<Op>,
    /// Outputs of the event being handled that must wait for its batch.
    promised: Vec<GqOutput>,
    /// Outputs waiting for their batch to be durable.
    held: Vec<Held>,
    /// Counts each worker's connections as the queue saw them come and go. A message made for
    /// one session is never sent in another: the transport would put it on the worker's new
    /// connection, ahead of what that connection's `Hello` decides (a dispatch sent twice, a
    /// `Welcome` out of turn).
    sessions: BTreeMap<WorkerId, u64>,
    /// Outputs free to leave.
    ready: VecDeque<GqOutput>,
}

/// An output waiting for a batch to be durable.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Held {
    /// The batch it waits for.
    needs: LogIndex,
    /// The session of its worker when it was held.
    session: u64,
    out: GqOutput,
}

impl Gate {
    /// The index the open batch gets when it closes.
    pub(super) fn open_batch(&self) -> LogIndex {
        LogIndex(self.logged.0 + 1)
    }

    /// Adds a state change to the open batch.
    pub(super) fn log(&mut self, op: Op) {
        self.batch.push(op);
    }

    /// Sends a message that promises nothing (a dispatch): a crash that loses the record of it
    /// costs only duplicate work. It waits only for the epoch record.
    pub(super) fn send(&mut self, worker: WorkerId, msg: ToWorker) {
        let out = GqOutput::Send(worker, msg);
        if self.durable >= EPOCH_BATCH {
            self.ready.push_back(out);
        } else {
            self.hold(EPOCH_BATCH, out);
        }
    }

    /// Holds an output until the open batch is durable.
    pub(super) fn promise(&mut self, out: GqOutput) {
        self.promised.push(out);
    }

    /// The worker opened or lost a connection: what is held for it now is dropped.
    pub(super) fn new_session(&mut self, worker: WorkerId) {
        *self.sessions.entry(worker).or_default() += 1;
    }

    /// Ends the event: hands out its batch, if it changed anything, and holds what it promised
    /// until that batch, or the last one, is durable. The `mutations` may let some promises out
    /// early, for checkers to catch.
    pub(super) fn close_batch(&mut self, mutations: Mutations) {
        if !self.batch.is_empty() {
            self.logged = self.open_batch();
            let batch = Batch {
                index: self.logged,
                ops: std::mem::take(&mut self.batch),
            };
            self.ready.push_back(GqOutput::Persist(batch));
        }
        let needs = self.logged;
        for out in std::mem::take(&mut self.promised) {
            if needs <= self.durable || leaves_early(mutations, &out) {
                self.ready.push_back(out);
            } else {
                self.hold(needs, out);
            }
        }
    }

    /// Every batch up to `upto` is durable: lets out what waited for them. Returns the new
    /// durable index, or `None` if `upto` is nothing new.
    pub(super) fn persisted(&mut self, upto: LogIndex) -> Option<LogIndex> {
        if upto <= self.durable {
            return None;
        }
        self.durable = upto.min(self.logged);
        let durable = self.durable;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            self.held.drain(..).partition(|h| h.needs <= durable);
        self.held = waiting;
        for h in ready {
            if self.session_of(&h.out) == h.session {
                self.ready.push_back(h.out);
            } else {
                tracing::debug!(output = ?h.out, "dropped: its worker's connection changed while it waited for the disk");
            }
        }
        Some(durable)
    }

    /// The next output free to leave, if any.
    pub(super) fn poll_output(&mut self) -> Option<GqOutput> {
        self.ready.pop_front()
    }

    fn hold(&mut self, needs: LogIndex, out: GqOutput) {
        let session = self.session_of(&out);
        self.held.push(Held {
            needs,
            session,
            out,
        });
    }

    /// The session of the worker a message goes to (0 for outputs that go to no worker).
    fn session_of(&self, out: &GqOutput) -> u64 {
        match out {
            GqOutput::Send(worker, _) => self.sessions.get(worker).copied().unwrap_or(0),
            _ => 0,
        }
    }
}

/// Whether a deliberate bug lets this promise out before its batch is durable.
fn leaves_early(mutations: Mutations, out: &GqOutput) -> bool {
    let gives_up = matches!(
        out,
        GqOutput::Send(_, ToWorker::Cancel { .. } | ToWorker::Abort { .. })
    );
    let app_change = matches!(
        out,
        GqOutput::ConfirmDeploy(_) | GqOutput::ConfirmRemove { .. }
    );
    mutations.has(Mutation::VisibleBeforeDurable)
        || gives_up && mutations.has(Mutation::GiveUpEarly)
        || app_change && mutations.has(Mutation::AppChangeEarly)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ids::{ExecId, Incarnation, Seq};

    const W: WorkerId = WorkerId(0);

    fn ack(upto: u64) -> ToWorker {
        ToWorker::Ack {
            incarnation: Incarnation(1),
            upto: Seq(upto),
        }
    }

    fn confirm(index: u32) -> GqOutput {
        GqOutput::ConfirmInvoke(ExecId::new(1, index))
    }

    fn persist(index: u64) -> GqOutput {
        GqOutput::Persist(Batch {
            index: LogIndex(index),
            ops: vec![Op::Epoch(index as u32)],
        })
    }

    /// A gate that has logged batch 1 (the epoch record), not yet durable.
    fn gate() -> Gate {
        let mut g = Gate::default();
        g.log(Op::Epoch(1));
        g.close_batch(Mutations::NONE);
        assert_eq!(drain(&mut g), vec![persist(1)]);
        g
    }

    fn drain(g: &mut Gate) -> Vec<GqOutput> {
        std::iter::from_fn(|| g.poll_output()).collect()
    }

    #[test]
    fn a_promise_waits_for_its_batch() {
        let mut g = gate();
        assert_eq!(g.persisted(LogIndex(1)), Some(LogIndex(1)));
        assert_eq!(g.open_batch(), LogIndex(2));
        g.log(Op::Epoch(2));
        g.promise(confirm(0));
        g.close_batch(Mutations::NONE);
        assert_eq!(drain(&mut g), vec![persist(2)]);
        assert_eq!(g.persisted(LogIndex(2)), Some(LogIndex(2)));
        assert_eq!(drain(&mut g), vec![confirm(0)]);
    }

    #[test]
    fn a_promise_that_changed_nothing_waits_for_the_last_batch() {
        let mut g = gate();
        g.promise(confirm(0));
        g.close_batch(Mutations::NONE);
        assert_eq!(drain(&mut g), vec![], "batch 1 is not durable yet");
        g.persisted(LogIndex(1));
        assert_eq!(drain(&mut g), vec![confirm(0)]);
        g.promise(confirm(1));
        g.close_batch(Mutations::NONE);
        assert_eq!(drain(&mut g), vec![confirm(1)], "everything is durable");
    }

    #[test]
    fn a_dispatch_waits_only_for_the_epoch_batch() {
        let mut g = gate();
        g.send(W, ack(1));
        assert_eq!(drain(&mut g), vec![]);
        g.persisted(LogIndex(1));
        assert_eq!(drain(&mut g), vec![GqOutput::Send(W, ack(1))]);
        g.log(Op::Epoch(2));
        g.send(W, ack(2));
        g.close_batch(Mutations::NONE);
        assert_eq!(
            drain(&mut g),
            vec![GqOutput::Send(W, ack(2)), persist(2)],
            "batch 2 need not be durable"
        );
    }

    #[test]
    fn a_message_held_across_a_new_session_is_dropped() {
        let mut g = gate();
        g.promise(GqOutput::Send(W, ack(1)));
        g.promise(GqOutput::Send(WorkerId(1), ack(1)));
        g.promise(confirm(0));
        g.close_batch(Mutations::NONE);
        g.new_session(W);
        g.persisted(LogIndex(1));
        assert_eq!(
            drain(&mut g),
            vec![GqOutput::Send(WorkerId(1), ack(1)), confirm(0)]
        );
        g.promise(GqOutput::Send(W, ack(2)));
        g.close_batch(Mutations::NONE);
        assert_eq!(
            drain(&mut g),
            vec![GqOutput::Send(W, ack(2))],
            "made in the new session"
        );
    }

    #[test]
    fn durability_is_never_ahead_of_the_log() {
        let mut g = gate();
        assert_eq!(g.persisted(LogIndex(5)), Some(LogIndex(1)));
        assert_eq!(g.persisted(LogIndex(1)), None);
        g.log(Op::Epoch(2));
        g.promise(confirm(0));
        g.close_batch(Mutations::NONE);
        assert_eq!(drain(&mut g), vec![persist(2)], "batch 2 is not durable");
        g.persisted(LogIndex(2));
        assert_eq!(drain(&mut g), vec![confirm(0)]);
    }

    #[test]
    fn mutations_let_their_promises_out_early() {
        let cancel = GqOutput::Send(
            W,
            ToWorker::Cancel {
                incarnation: Incarnation(1),
                exec: ExecId::new(1, 0),
            },
        );
        let deployed = GqOutput::ConfirmDeploy(crate::ids::AppName::new("a").unwrap());
        let cases = [
            (Mutation::VisibleBeforeDurable, vec![true, true, true]),
            (Mutation::GiveUpEarly, vec![true, false, false]),
            (Mutation::AppChangeEarly, vec![false, true, false]),
        ];
        for (m, early) in cases {
            let outs = [cancel.clone(), deployed.clone(), confirm(0)];
            for (out, early) in outs.into_iter().zip(early) {
                let mut g = gate();
                g.promise(out.clone());
                g.close_batch(Mutations::only(m));
                let want = if early { vec![out] } else { vec![] };
                assert_eq!(drain(&mut g), want, "{m:?}");
            }
        }
    }
}
