//! Time as a value: the caller reads its clock and passes the reading in.
//!
//! The state machines never read a clock. They keep deadlines as [`Time`] values in named timers
//! and report the earliest through `poll_timeout`; the caller wakes them then, or (a model
//! checker) fires any timer at any moment.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Add;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since an origin the caller chooses. Only differences between
/// two `Time`s from the same caller mean anything. Times kept in durable records (an
/// execution's acceptance and end) outlive the caller's process: a driver that restarts must
/// keep its origin, as the gateway does by counting from the Unix epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Time(u64);

impl Time {
    /// The origin.
    pub const ZERO: Time = Time(0);

    /// The time `ms` milliseconds after the origin.
    pub fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the origin.
    pub fn as_millis(self) -> u64 {
        self.0
    }
}

impl Add<Duration> for Time {
    type Output = Time;

    fn add(self, d: Duration) -> Time {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Time(self.0.saturating_add(ms))
    }
}

/// The timers whose deadline is at or before `now`, in timer order: what a state machine's
/// `handle_timeouts` fires, one by one.
pub fn due<T: Copy>(timers: &BTreeMap<T, Time>, now: Time) -> Vec<T> {
    timers
        .iter()
        .filter(|(_, at)| **at <= now)
        .map(|(t, _)| *t)
        .collect()
}

/// The earliest deadline of `timers`, if any is set: what a state machine's `poll_timeout`
/// reports.
pub fn earliest<T>(timers: &BTreeMap<T, Time>) -> Option<Time> {
    timers.values().min().copied()
}

impl fmt::Debug for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}ms", self.0)
    }
}
