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
    /// The wait before the first retry, in milliseconds; multiplied by the backoff factor for
    /// each later one.
    pub backoff_ms: u64,
    /// The factor by which each retry's wait grows, in thousandths (2000 doubles it). Values
    /// below 1000 count as 1000: the wait never shrinks.
    pub backoff_factor_milli: u32,
    /// The longest wait between retries, in milliseconds.
    pub backoff_ms_max: u64,
    /// How long one attempt may run, in milliseconds; `None` for no limit. The worker kills an
    /// instance at this limit; the gateway gives up on the attempt a grace period later.
    pub timeout_ms: Option<u64>,
}

impl GrainPolicy {
    /// The wait before retrying after the `failures`-th failure (from 1): `backoff_ms` times the
    /// factor to the power `failures - 1`, saturating, at most `backoff_ms_max`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let growth_milli = pow_milli(
            u128::from(self.backoff_factor_milli.max(1000)),
            failures.saturating_sub(1),
        );
        let ms = u128::from(self.backoff_ms).saturating_mul(growth_milli) / MILLI;
        let ms = u64::try_from(ms).unwrap_or(u64::MAX);
        Duration::from_millis(ms.min(self.backoff_ms_max))
    }
}

impl Default for GrainPolicy {
    fn default() -> Self {
        Self {
            attempts_max: 3,
            backoff_ms: 100,
            backoff_factor_milli: 2000,
            backoff_ms_max: 10_000,
            timeout_ms: Some(60_000),
        }
    }
}

/// One, in thousandths.
const MILLI: u128 = 1000;

/// `base_milli` (a factor in thousandths) to the power `exp`, in thousandths, by squaring. Every
/// intermediate saturates at `u64::MAX`, far above any wait in milliseconds times 1000, so the
/// products never overflow a `u128`.
fn pow_milli(mut base_milli: u128, mut exp: u32) -> u128 {
    let ceiling = u128::from(u64::MAX);
    let mul = |a: u128, b: u128| (a.saturating_mul(b) / MILLI).min(ceiling);
    let mut acc = MILLI;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base_milli);
        }
        exp >>= 1;
        if exp > 0 {
            base_milli = mul(base_milli, base_milli);
        }
    }
    acc
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
            backoff_factor_milli: 2000,
            backoff_ms_max: 350,
            timeout_ms: None,
        };
        let waits: Vec<u128> = (1..=4).map(|f| p.backoff(f).as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        assert_eq!(p.backoff(u32::MAX).as_millis(), 350);
    }

    #[test]
    fn backoff_follows_the_factor() {
        let p = GrainPolicy {
            attempts_max: 5,
            backoff_ms: 100,
            backoff_factor_milli: 1500,
            backoff_ms_max: 1000,
            timeout_ms: None,
        };
        let waits: Vec<u128> = (1..=6).map(|f| p.backoff(f).as_millis()).collect();
        assert_eq!(waits, [100, 150, 225, 337, 506, 759]);
        assert_eq!(p.backoff(7).as_millis(), 1000);
        assert_eq!(p.backoff(u32::MAX).as_millis(), 1000);
    }

    #[test]
    fn backoff_is_constant_at_factor_one_or_below() {
        for factor in [0, 500, 1000] {
            let p = GrainPolicy {
                backoff_factor_milli: factor,
                backoff_ms_max: u64::MAX,
                ..GrainPolicy::default()
            };
            assert_eq!(p.backoff(1), p.backoff(40), "factor {factor}");
            assert_eq!(p.backoff(u32::MAX).as_millis(), 100, "factor {factor}");
        }
    }

    #[test]
    fn backoff_saturates_without_a_cap() {
        let p = GrainPolicy {
            backoff_ms: u64::MAX,
            backoff_factor_milli: u32::MAX,
            backoff_ms_max: u64::MAX,
            ..GrainPolicy::default()
        };
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(u64::MAX));
        assert_eq!(p.backoff(1), Duration::from_millis(u64::MAX));
    }
}
