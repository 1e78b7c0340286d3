//! Deliberate protocol bugs, for showing that the model checker and the simulator catch them.
//!
//! Every switch is off by default and can only be turned on by the checkers: each one breaks a
//! rule the protocol's correctness rests on. The switches are compiled into the shipped state
//! machines (the checked code is the shipped code), but only `GlobalQueue::with_mutations` and
//! `LocalBus::with_mutations` set them, and neither the gateway nor the worker calls those.
//! `sand check --mutation NAME`, `sand fuzz --mutation NAME` and the models' tests turn one on
//! and expect a counterexample.

use std::fmt;
use std::str::FromStr;

/// One deliberate bug.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Mutation {
    /// The gateway makes a hop's completion and its spawned calls durable in two writes, as if
    /// they had travelled as two messages: a crash between them loses the chain.
    SplitHop,
    /// The gateway lets acks and answers leave before the state behind them is durable.
    VisibleBeforeDurable,
    /// The gateway accepts messages from an incarnation it declared dead.
    AcceptDead,
    /// The gateway applies progress in the order it arrives, not the order it was sent.
    ArrivalOrder,
    /// The worker never re-sends unacked progress, on a timer or after a reconnect.
    NoResend,
    /// The gateway re-sends a reconnecting worker the dispatches of attempts it says it started,
    /// and the worker runs a dispatch of an attempt it already started.
    RerunStarted,
    /// The gateway fires a join as soon as one branch has contributed.
    EarlyJoin,
    /// The gateway sends `Cancel` and `Abort` before the change behind them is durable: a crash
    /// then leaves it expecting work the worker has dropped.
    GiveUpEarly,
    /// The gateway does not look an invocation's idempotency key up: a retried request starts a
    /// second execution.
    ForgetKeys,
    /// The gateway leaves its epoch out of new execution ids: after a restart it hands out the
    /// ids of earlier executions again, and a new one overwrites an answered one.
    ReuseExecIds,
    /// The gateway's failure detector does nothing when it fires: the calls of a worker that
    /// never comes back are never re-dispatched.
    NeverSuspect,
    /// A worker's `Hello` does not place the calls that wait for a worker: they wait until
    /// something else places them.
    LazyPlacement,
    /// The gateway fires a join whose last contribution it applies even if a worker already
    /// started it (in the same report): the join runs twice.
    RefireJoin,
    /// The gateway tells a client an app was deployed or removed before the change is durable:
    /// a crash then undoes what the client was told.
    AppChangeEarly,
    /// The gateway answers look-ups of an execution from its memory, not from what its disk
    /// holds: a client may see an answer a crash then takes back.
    ReadAhead,
    /// The gateway dispatches a call whose owner was lost as if it were its first attempt: the
    /// trace hides the recovery.
    UnmarkedRecovery,
    /// The gateway answers look-ups from what its disk held before the oldest batch still
    /// being written that changes the entity, even once a newer batch is durable: a client told
    /// its execution is accepted may look it up and be told it does not exist.
    StaleLookup,
    /// The gateway records a call a worker spawned without the span it hangs from: once the
    /// gateway runs it again (a recovery, a retry), its spans fall out of the execution's tree.
    UntracedSpawn,
}

impl Mutation {
    /// Every mutation, in a fixed order.
    pub const ALL: [Mutation; 18] = [
        Mutation::SplitHop,
        Mutation::VisibleBeforeDurable,
        Mutation::AcceptDead,
        Mutation::ArrivalOrder,
        Mutation::NoResend,
        Mutation::RerunStarted,
        Mutation::EarlyJoin,
        Mutation::GiveUpEarly,
        Mutation::ForgetKeys,
        Mutation::ReuseExecIds,
        Mutation::NeverSuspect,
        Mutation::LazyPlacement,
        Mutation::RefireJoin,
        Mutation::AppChangeEarly,
        Mutation::ReadAhead,
        Mutation::UnmarkedRecovery,
        Mutation::StaleLookup,
        Mutation::UntracedSpawn,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::SplitHop => "split-hop",
            Mutation::VisibleBeforeDurable => "visible-before-durable",
            Mutation::AcceptDead => "accept-dead",
            Mutation::ArrivalOrder => "arrival-order",
            Mutation::NoResend => "no-resend",
            Mutation::RerunStarted => "rerun-started",
            Mutation::EarlyJoin => "early-join",
            Mutation::GiveUpEarly => "give-up-early",
            Mutation::ForgetKeys => "forget-keys",
            Mutation::ReuseExecIds => "reuse-exec-ids",
            Mutation::NeverSuspect => "never-suspect",
            Mutation::LazyPlacement => "lazy-placement",
            Mutation::RefireJoin => "refire-join",
            Mutation::AppChangeEarly => "app-change-early",
            Mutation::ReadAhead => "read-ahead",
            Mutation::UnmarkedRecovery => "unmarked-recovery",
            Mutation::StaleLookup => "stale-lookup",
            Mutation::UntracedSpawn => "untraced-spawn",
        }
    }
}

impl fmt::Display for Mutation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mutation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Mutation::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown mutation {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The set of mutations switched on: none by default. One bit per mutation.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Mutations(u32);

// A mutation past the last bit would alias the first one.
const _: () = assert!(Mutation::ALL.len() <= u32::BITS as usize);

impl Mutations {
    /// No mutation: the protocol as designed.
    pub const NONE: Mutations = Mutations(0);

    /// Just this one.
    pub fn only(m: Mutation) -> Self {
        Self(1 << m as u32)
    }

    /// Whether `m` is on.
    pub fn has(self, m: Mutation) -> bool {
        self.0 & (1 << m as u32) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sets_hold_one() {
        for m in Mutation::ALL {
            assert_eq!(m.name().parse::<Mutation>(), Ok(m));
            let set = Mutations::only(m);
            assert!(Mutation::ALL.iter().all(|o| set.has(*o) == (*o == m)));
        }
        assert!("nope".parse::<Mutation>().is_err());
        assert!(Mutation::ALL.iter().all(|m| !Mutations::NONE.has(*m)));
    }
}
