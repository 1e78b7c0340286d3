//! What the global queue needs to know about a deployed app: its entry grain and each grain's
//! retry and timeout policy. The app's code and manifest live with the gateway and workers.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{AppName, GrainName};

/// How the global queue treats one grain's failures.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct GrainPolicy {
    /// Attempts that may fail (raise, crash, time out) before the execution fails; at least 1.
    /// Attempts lost to a worker crash do not count.
    pub attempts_max: u32,
    /// The wait before the first retry, in milliseconds; doubled for each later one.
    pub backoff_ms: u64,
    /// The longest wait between retries, in milliseconds.
    pub backoff_ms_max: u64,
    /// How long one attempt may run, in milliseconds; `None` for no limit. The worker kills an
    /// instance at this limit; the gateway gives up on the attempt a grace period later.
    pub timeout_ms: Option<u64>,
}

impl GrainPolicy {
    /// The wait before retrying after the `failures`-th failure (from 1).
    pub fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(32);
        let ms = self.backoff_ms.saturating_mul(1u64 << shift);
        Duration::from_millis(ms.min(self.backoff_ms_max))
    }
}

impl Default for GrainPolicy {
    fn default() -> Self {
        Self {
            attempts_max: 3,
            backoff_ms: 100,
            backoff_ms_max: 10_000,
            timeout_ms: Some(60_000),
        }
    }
}

/// A deployed app, as the global queue sees it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct AppSpec {
    /// The app.
    pub name: AppName,
    /// The grain an invocation calls first.
    pub entry: GrainName,
    /// Each grain's policy. A grain not listed gets the default policy.
    pub grains: BTreeMap<GrainName, GrainPolicy>,
}

impl AppSpec {
    /// The policy of `grain`.
    pub fn policy(&self, grain: &GrainName) -> GrainPolicy {
        self.grains.get(grain).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = GrainPolicy {
            attempts_max: 5,
            backoff_ms: 100,
            backoff_ms_max: 350,
            timeout_ms: None,
        };
        let waits: Vec<u128> = (1..=4).map(|f| p.backoff(f).as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        assert_eq!(p.backoff(u32::MAX).as_millis(), 350);
    }
}
