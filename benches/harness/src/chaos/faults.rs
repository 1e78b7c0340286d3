//! The chaos run's faults: a worker SIGKILLed, and started again, at random intervals drawn
//! from a seeded generator; and the gateway SIGKILLed and started again once, when enough
//! requests have been accepted.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::cluster::Cluster;

/// What to break, and when.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Workers in the cluster, ids 1..=workers.
    pub workers: u32,
    /// The shortest and the longest wait between two worker kills.
    pub kill_every: (Duration, Duration),
    /// How long a killed worker stays down.
    pub worker_down: Duration,
    /// Kill the gateway once this many requests are accepted (never if None).
    pub gateway_kill_after: Option<usize>,
    /// How long the gateway stays down.
    pub gateway_down: Duration,
}

/// The faults of one run, as they are done.
pub struct Faults {
    plan: Plan,
    rng: StdRng,
    start: Instant,
    next_kill: Instant,
    /// Killed workers, and when each is to be started again.
    down: Vec<(u32, Instant)>,
    gateway_killed: bool,
    /// Workers SIGKILLed.
    pub worker_kills: usize,
    /// Gateway SIGKILLs.
    pub gateway_kills: usize,
    /// Processes that ended without being killed, with when and how.
    pub unplanned: Vec<String>,
}

impl Faults {
    /// The faults of `plan`, their randomness drawn from `seed`, the first kill due one
    /// random interval after `start`.
    pub fn new(plan: Plan, seed: u64, start: Instant) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let next_kill = start + between(&mut rng, plan.kill_every);
        Self {
            plan,
            rng,
            start,
            next_kill,
            down: Vec::new(),
            gateway_killed: false,
            worker_kills: 0,
            gateway_kills: 0,
            unplanned: Vec::new(),
        }
    }

    /// Does whatever is due at `now`, with `accepted` requests accepted so far: starts again
    /// the workers whose time down is over, kills the gateway if its turn has come, kills a
    /// worker if one is due. A worker that ended by itself is noted and started again; a
    /// gateway that did is an error.
    pub fn tick(&mut self, cluster: &mut Cluster, accepted: usize, now: Instant) -> Result<()> {
        let at = now.duration_since(self.start).as_secs_f64();
        for (name, status) in cluster.ended_by_themselves() {
            if name == "gateway" {
                bail!("at {at:.1} s the gateway ended by itself ({status})");
            }
            self.unplanned
                .push(format!("at {at:.1} s {name} ended by itself ({status})"));
            let id = name.trim_start_matches("worker ").parse()?;
            self.down.push((id, now));
        }
        let mut due = Vec::new();
        self.down.retain(|&(id, up_at)| {
            if up_at <= now {
                due.push(id);
            }
            up_at > now
        });
        for id in due {
            cluster.start_worker(id)?;
        }
        if !self.gateway_killed && self.plan.gateway_kill_after.is_some_and(|n| accepted >= n) {
            self.gateway_killed = true;
            eprintln!("chaos {at:6.1} s: SIGKILL to the gateway, after {accepted} accepted");
            cluster.crash_gateway(self.plan.gateway_down)?;
            self.gateway_kills += 1;
        }
        if now >= self.next_kill {
            let up: Vec<u32> = (1..=self.plan.workers)
                .filter(|id| !self.down.iter().any(|(d, _)| d == id))
                .collect();
            if !up.is_empty() {
                let victim = up[self.rng.random_range(0..up.len())];
                cluster.kill_worker(victim)?;
                self.worker_kills += 1;
                self.down.push((victim, now + self.plan.worker_down));
            }
            self.next_kill = now + between(&mut self.rng, self.plan.kill_every);
        }
        cluster.reap_orphans();
        Ok(())
    }

    /// The faults stop: every worker still down is started again now.
    pub fn stop(&mut self, cluster: &mut Cluster) -> Result<()> {
        for (id, _) in std::mem::take(&mut self.down) {
            cluster.start_worker(id)?;
        }
        Ok(())
    }
}

/// Uniform in lo..=hi, to the millisecond.
fn between(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
    Duration::from_millis(rng.random_range(lo..=hi.max(lo)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_stay_within_their_bounds_and_a_seed_repeats_them() {
        let bounds = (Duration::from_millis(1000), Duration::from_millis(3000));
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..1000)
                .map(|_| between(&mut rng, bounds))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert!(a.iter().all(|d| bounds.0 <= *d && *d <= bounds.1));
        assert!(a.iter().any(|d| *d < Duration::from_millis(1100)));
        assert!(a.iter().any(|d| *d > Duration::from_millis(2900)));
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
    }
}
