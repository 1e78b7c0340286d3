//! Identifiers: executions, calls, workers, incarnations, attempts, and names.
//!
//! Call ids are derived, never drawn at random: a call's id is a function of its parent's id and
//! its emission index. When a grain runs twice (a recovery), its successors get the same ids, so
//! the global queue recognises the duplicates. This module owns that derivation and must stay
//! stable across versions: changing it changes the ids in every durable record.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One client request and everything it sets off.
///
/// The gateway makes it from its durable epoch (bumped at every gateway start) and a counter, so
/// an id is never reused, even by a gateway that crashed before its last acceptance was durable.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExecId(pub u64);

impl ExecId {
    /// The id of the `index`-th execution accepted in gateway epoch `epoch`.
    pub fn new(epoch: u32, index: u32) -> Self {
        Self((u64::from(epoch) << 32) | u64::from(index))
    }

    /// The gateway epoch that accepted this execution.
    pub fn epoch(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The execution's index within its epoch.
    pub fn index(self) -> u32 {
        self.0 as u32
    }

    /// The id of this execution's entry call.
    pub fn root_call(self) -> CallId {
        CallId(mix(self.0, ROOT_TAG))
    }
}

impl fmt::Debug for ExecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}.{}", self.epoch(), self.index())
    }
}

impl fmt::Display for ExecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for ExecId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(Self)
    }
}

/// One grain invocation inside an execution. Unique within its execution.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CallId(pub u64);

impl CallId {
    /// The id of the `index`-th call this call emits (`ctx.next` is index 0; fan-out branches
    /// are 0, 1, ...).
    pub fn child(self, index: u32) -> Self {
        Self(mix(self.0, u64::from(index)))
    }

    /// The id of the join call of this call's fan-out. There is at most one per call.
    pub fn join(self) -> Self {
        Self(mix(self.0, JOIN_TAG))
    }
}

impl fmt::Debug for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{:04x}", self.0 >> 48)
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

const ROOT_TAG: u64 = 0x726f_6f74_0000_0000;
const JOIN_TAG: u64 = 0x6a6f_696e_0000_0000;

/// A stable 64-bit mix of two words (splitmix64's finaliser over a combination). Stable forever:
/// call ids in durable records depend on it.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .rotate_left(29)
        .wrapping_add(b)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A call's key: calls are unique within their execution. Ordered by execution first, so one
/// execution's calls are a range.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CallKey {
    /// The execution.
    pub exec: ExecId,
    /// The call within it.
    pub call: CallId,
}

impl CallKey {
    /// The key of call `call` of execution `exec`.
    pub fn new(exec: ExecId, call: CallId) -> Self {
        Self { exec, call }
    }

    /// Every key of execution `exec`'s calls, as a range.
    pub fn of_exec(exec: ExecId) -> std::ops::RangeInclusive<Self> {
        Self::new(exec, CallId(0))..=Self::new(exec, CallId(u64::MAX))
    }
}

impl fmt::Debug for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{:?}", self.exec, self.call)
    }
}

/// A worker host, named by the cluster (its certificate's name maps to it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub u32);

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// One life of a worker's local bus. A worker that lost its state (a restart, or being told it
/// was declared dead) comes back with a larger incarnation and no old work.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Incarnation(pub u64);

impl Incarnation {
    /// The next incarnation. It saturates: a `Fenced` naming the largest successor (from a
    /// faulty peer) must not overflow a worker.
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Debug for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "i{}", self.0)
    }
}

/// One try at running a call: one placement decision.
///
/// Every placement the gateway makes gets an attempt of its own, unique in the cluster's life:
/// the `index`-th placement of gateway epoch `epoch` (the epoch is durable and bumped at every
/// gateway start, so a gateway rebuilt after a crash never repeats an attempt the lost one
/// handed out). A call a worker spawns itself runs under its parent's attempt: one local lineage
/// shares the number of the placement it grew from. So one attempt of one call is one run per
/// worker incarnation, whatever happens: two lineages of a call grew from two placements and
/// carry two numbers, and a placement of a call is never a number a lineage carries. A worker may
/// thus ignore a dispatch of an attempt it already started: it can only be a re-send. The
/// gateway refuses results for any but a call's current attempt.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Attempt(pub u64);

impl Attempt {
    /// The `index`-th placement of gateway epoch `epoch`.
    pub fn placement(epoch: u32, index: u32) -> Self {
        Self((u64::from(epoch) << 32) | u64::from(index))
    }

    /// The first placement of gateway epoch `epoch`.
    pub fn epoch_floor(epoch: u32) -> Self {
        Self::placement(epoch, 0)
    }
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a{}.{}", self.0 >> 32, self.0 as u32)
    }
}

/// One attempt of one call: what a worker starts at most once per incarnation.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunKey {
    /// The execution.
    pub exec: ExecId,
    /// The call within it.
    pub call: CallId,
    /// The attempt of the call.
    pub attempt: Attempt,
}

impl RunKey {
    /// The key of attempt `attempt` of call `call` of execution `exec`.
    pub fn new(exec: ExecId, call: CallId, attempt: Attempt) -> Self {
        Self {
            exec,
            call,
            attempt,
        }
    }
}

impl fmt::Debug for RunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{:?}/{:?}", self.exec, self.call, self.attempt)
    }
}

/// The sequence number of a worker incarnation's progress message, from 1.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Seq(pub u64);

impl Seq {
    /// The next sequence number.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {why}")]
pub struct NameError {
    name: String,
    why: &'static str,
}

/// The longest app or grain name, in bytes.
pub const NAME_LEN_MAX: usize = 64;

fn check_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > NAME_LEN_MAX {
        return Err("must be at most 64 bytes");
    }
    if !s.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("must start with a letter or digit");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("may hold only ASCII letters, digits, '-' and '_'");
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// 1 to 64 ASCII letters, digits, `-` and `_`, starting with a letter or digit: safe in a
        /// URL path, a file name and a cgroup name.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks and wraps a name.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                match check_name(&s) {
                    Ok(()) => Ok(Self(s)),
                    Err(why) => Err(NameError { name: s, why }),
                }
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;

            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The name of a deployed app.
    AppName
);
name_type!(
    /// The name of a grain within its app.
    GrainName
);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_are_derived_deterministically() {
        let e = ExecId::new(3, 7);
        assert_eq!(e.epoch(), 3);
        assert_eq!(e.index(), 7);
        let root = e.root_call();
        assert_eq!(root, ExecId::new(3, 7).root_call());
        assert_ne!(root, ExecId::new(3, 8).root_call());
        assert_eq!(root.child(0), root.child(0));
        assert_ne!(root.child(0), root.child(1));
        assert_ne!(root.child(0), root.join());
        assert_ne!(root.child(0).child(0), root.child(0));
    }

    #[test]
    fn exec_ids_round_trip_through_text() {
        let e = ExecId::new(1, 42);
        assert_eq!(e.to_string().parse::<ExecId>(), Ok(e));
        assert!("zz".parse::<ExecId>().is_err());
    }

    #[test]
    fn keys_encode_as_the_tuples_they_name() {
        let (exec, call, attempt) = (ExecId::new(1, 2), CallId(3), Attempt::placement(4, 5));
        assert_eq!(
            postcard::to_stdvec(&CallKey::new(exec, call)).unwrap(),
            postcard::to_stdvec(&(exec, call)).unwrap()
        );
        assert_eq!(
            postcard::to_stdvec(&RunKey::new(exec, call, attempt)).unwrap(),
            postcard::to_stdvec(&(exec, call, attempt)).unwrap()
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(AppName::new("pipeline-2_a").is_ok());
        for bad in ["", "-x", "a/b", "a b", "é", &"x".repeat(65)] {
            let err = AppName::new(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid name"), "{err}");
        }
        let json_like: Result<GrainName, _> =
            postcard::from_bytes(&postcard::to_stdvec("../etc").unwrap());
        assert!(json_like.is_err(), "deserialising must check names too");
    }
}
