//! The chaos run's faults: a schedule drawn up front from the seed, so that a seed names every
//! fault of a run (what, to which host, when, for how long); and an executor that does each
//! fault when its time comes and heals it when its time is over.
//!
//! One host suffers one fault at a time. Every fault is over before the schedule's span ends:
//! then every host is up, running, and on a clear link, and the run can require progress.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use sand_lazyfs::Cut;

use sand_testkit::cluster::{Cluster, Host};

use super::{Config, QUIC_IDLE_TIMEOUT};
use sand_testkit::link::Weather;

/// What a fault does to its host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// SIGKILL; started again when the fault is over.
    Kill,
    /// The host and everything it started SIGKILLed, and every write its disk had not synced
    /// lost; started again when the fault is over.
    PowerCut,
    /// SIGSTOP; SIGCONT when the fault is over.
    Pause,
    /// The worker's link drops and reorders datagrams.
    Lossy {
        /// The probability that a datagram is dropped.
        drop: f64,
        /// The longest extra delay of a datagram.
        jitter: Duration,
    },
    /// The worker's link drops every datagram.
    Partition,
}

/// One fault of the schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fault {
    /// When it starts, from the start of the faults.
    pub at: Duration,
    /// How long it lasts.
    pub lasts: Duration,
    /// Whom it strikes.
    pub host: Host,
    /// What it does.
    pub kind: Kind,
}

/// The names of the kinds of fault, by host, in the order a summary gives them.
pub const NAMES: [&str; 8] = [
    "worker kill",
    "gateway kill",
    "worker power cut",
    "gateway power cut",
    "worker pause",
    "gateway pause",
    "lossy link",
    "partition",
];

impl Fault {
    /// The kind's name, by host: one of [`NAMES`].
    pub fn name(&self) -> &'static str {
        let gateway = self.host == Host::Gateway;
        match (self.kind, gateway) {
            (Kind::Kill, false) => NAMES[0],
            (Kind::Kill, true) => NAMES[1],
            (Kind::PowerCut, false) => NAMES[2],
            (Kind::PowerCut, true) => NAMES[3],
            (Kind::Pause, false) => NAMES[4],
            (Kind::Pause, true) => NAMES[5],
            (Kind::Lossy { .. }, _) => NAMES[6],
            (Kind::Partition, _) => NAMES[7],
        }
    }

    fn end(&self) -> Duration {
        self.at + self.lasts
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (host, lasts) = (self.host, self.lasts.as_secs_f64());
        match self.kind {
            Kind::Kill => write!(f, "SIGKILL to the {host}, down {lasts:.1} s"),
            Kind::PowerCut => write!(f, "power cut of the {host}, down {lasts:.1} s"),
            Kind::Pause => write!(f, "SIGSTOP to the {host}, SIGCONT in {lasts:.1} s"),
            Kind::Lossy { drop, jitter } => write!(
                f,
                "the {host}'s link drops {:.0}% and jitters up to {} ms for {lasts:.1} s",
                drop * 100.0,
                jitter.as_millis()
            ),
            Kind::Partition => write!(f, "the {host}'s link is cut for {lasts:.1} s"),
        }
    }
}

/// The least time between two faults of one host: a host started again gets to reconnect.
const SETTLE: Duration = Duration::from_millis(500);

/// Draws the faults `config` asks for (its kills, power cuts, pauses and link faults, over its
/// workers, within its span) from `seed`, in the order they start. Fails if they do not fit in
/// the span, one fault per host at a time.
pub fn schedule(config: &Config, seed: u64) -> Result<Vec<Fault>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ms = |lo: u64, hi: u64| (Duration::from_millis(lo), Duration::from_millis(hi));
    let mut wanted: Vec<(Host, Kind, Duration)> = Vec::new();
    let mut want = |rng: &mut StdRng, host: Option<Host>, kind, lasts| {
        let host = host.unwrap_or_else(|| Host::Worker(rng.random_range(1..=config.workers)));
        let lasts = between(rng, lasts);
        wanted.push((host, kind, lasts));
    };
    for _ in 0..config.worker_kills {
        want(&mut rng, None, Kind::Kill, ms(0, 1000));
    }
    for _ in 0..config.gateway_kills {
        want(&mut rng, Some(Host::Gateway), Kind::Kill, ms(200, 1500));
    }
    for i in 0..config.power_cuts {
        let host = (i % 2 == 0).then_some(Host::Gateway);
        want(&mut rng, host, Kind::PowerCut, ms(200, 1500));
    }
    let pause = (config.failure_timeout * 3 / 2, config.failure_timeout * 3);
    for i in 0..config.pauses {
        let host = (i % 3 == 0).then_some(Host::Gateway);
        want(&mut rng, host, Kind::Pause, pause);
    }
    let partition = (
        QUIC_IDLE_TIMEOUT + Duration::from_secs(1),
        QUIC_IDLE_TIMEOUT + Duration::from_secs(3),
    );
    for i in 0..config.link_faults {
        if i % 2 == 0 {
            let kind = Kind::Lossy {
                drop: rng.random_range(0.05..0.3),
                jitter: between(&mut rng, ms(1, 20)),
            };
            want(&mut rng, None, kind, ms(2000, 6000));
        } else {
            want(&mut rng, None, Kind::Partition, partition);
        }
    }
    // The longest first: they are the hardest to fit.
    wanted.sort_by_key(|&(_, _, lasts)| Reverse(lasts));
    let mut placed: Vec<Fault> = Vec::with_capacity(wanted.len());
    for (host, kind, lasts) in wanted {
        let latest = config.span.checked_sub(lasts).ok_or_else(|| {
            anyhow!(
                "a {lasts:?} fault of the {host} does not fit in {:?}",
                config.span
            )
        })?;
        let fits = |at: Duration| {
            placed
                .iter()
                .filter(|f| f.host == host)
                .all(|f| at + lasts + SETTLE <= f.at || f.end() + SETTLE <= at)
        };
        let at = (0..1000)
            .map(|_| between(&mut rng, (Duration::ZERO, latest)))
            .find(|&at| fits(at))
            .ok_or_else(|| {
                anyhow!(
                    "the faults of the {host} do not fit in {:?}, one at a time: ask for fewer \
                     or a longer span",
                    config.span
                )
            })?;
        placed.push(Fault {
            at,
            lasts,
            host,
            kind,
        });
    }
    placed.sort_by_key(|f| (f.at, f.host));
    Ok(placed)
}

/// Uniform in lo..=hi, to the millisecond.
fn between(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
    Duration::from_millis(rng.random_range(lo..=hi.max(lo)))
}

/// The faults of one run, as they are done.
pub struct Faults {
    schedule: Vec<Fault>,
    /// The next fault of the schedule to start.
    next: usize,
    start: Instant,
    /// Faults under way, with when each is over.
    active: Vec<(Fault, Instant)>,
    /// Faults started, by name.
    pub done: BTreeMap<&'static str, usize>,
    /// What each power cut lost, in order.
    pub cuts: Vec<(Host, Cut)>,
    /// Processes that ended without being killed, with when and how.
    pub unplanned: Vec<String>,
}

impl Faults {
    /// The faults of `schedule`, its times counted from `start`.
    pub fn new(schedule: Vec<Fault>, start: Instant) -> Self {
        Self {
            schedule,
            next: 0,
            start,
            active: Vec::new(),
            done: BTreeMap::new(),
            cuts: Vec::new(),
            unplanned: Vec::new(),
        }
    }

    /// Whether every fault has been done and healed.
    pub fn finished(&self) -> bool {
        self.next == self.schedule.len() && self.active.is_empty()
    }

    /// Does whatever is due at `now`: starts again a worker that ended by itself (noted), heals
    /// the faults that are over, starts the faults that are due. A gateway that ended by
    /// itself is an error.
    pub fn tick(&mut self, cluster: &mut Cluster, now: Instant) -> Result<()> {
        let at = now.duration_since(self.start).as_secs_f64();
        for (host, status) in cluster.ended_by_themselves() {
            if host == Host::Gateway {
                bail!("at {at:.1} s the gateway ended by itself ({status})");
            }
            self.unplanned.push(format!(
                "at {at:.1} s the {host} ended by itself ({status})"
            ));
            cluster.restart(host)?;
        }
        let (over, going): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|&(_, until)| until <= now);
        self.active = going;
        for (fault, _) in over {
            heal(cluster, &fault)?;
        }
        while let Some(&fault) = self.schedule.get(self.next) {
            if self.start + fault.at > now {
                break;
            }
            self.next += 1;
            say(&format!("{at:6.1} s: {fault}"));
            if let Some(cut) = strike(cluster, &fault)? {
                self.cuts.push((fault.host, cut));
            }
            *self.done.entry(fault.name()).or_default() += 1;
            self.active.push((fault, now + fault.lasts));
        }
        cluster.reap_orphans();
        Ok(())
    }

    /// The faults stop: what is under way is healed now, and what was still to come is not
    /// done.
    pub fn stop(&mut self, cluster: &mut Cluster) -> Result<()> {
        self.next = self.schedule.len();
        for (fault, _) in std::mem::take(&mut self.active) {
            heal(cluster, &fault)?;
        }
        Ok(())
    }
}

/// Starts a fault; what a power cut lost.
fn strike(cluster: &mut Cluster, fault: &Fault) -> Result<Option<Cut>> {
    match fault.kind {
        Kind::Kill => cluster.kill(fault.host)?,
        Kind::PowerCut => return cluster.cut_power(fault.host).map(Some),
        Kind::Pause => cluster.pause(fault.host)?,
        Kind::Lossy { drop, jitter } => {
            weather(cluster, fault.host, Weather::Lossy { drop, jitter })?
        }
        Kind::Partition => weather(cluster, fault.host, Weather::Partitioned)?,
    }
    Ok(None)
}

/// Ends a fault: the host is up, running, and on a clear link again.
fn heal(cluster: &mut Cluster, fault: &Fault) -> Result<()> {
    match fault.kind {
        Kind::Kill | Kind::PowerCut => cluster.restart(fault.host),
        Kind::Pause => cluster.resume(fault.host),
        Kind::Lossy { .. } | Kind::Partition => weather(cluster, fault.host, Weather::Clear),
    }
}

fn weather(cluster: &Cluster, host: Host, weather: Weather) -> Result<()> {
    let relay = match host {
        Host::Worker(id) => cluster.relay(id),
        Host::Gateway => None,
    };
    relay
        .ok_or_else(|| anyhow!("the {host} has no relay of its own to break"))?
        .set_weather(weather);
    Ok(())
}

fn say(line: &str) {
    eprintln!("chaos {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            workers: 3,
            span: Duration::from_secs(300),
            worker_kills: 60,
            gateway_kills: 6,
            power_cuts: 6,
            pauses: 12,
            link_faults: 24,
            failure_timeout: Duration::from_secs(1),
            ..Config::short(0)
        }
    }

    #[test]
    fn a_schedule_has_every_fault_asked_for_one_per_host_at_a_time_within_the_span() {
        let p = config();
        let faults = schedule(&p, 7).expect("a schedule");
        let count = |name| faults.iter().filter(|f| f.name() == name).count();
        assert_eq!(count("worker kill"), 60);
        assert_eq!(count("gateway kill"), 6);
        assert_eq!(count("gateway power cut"), 3);
        assert_eq!(count("worker power cut"), 3);
        assert_eq!(count("gateway pause"), 4);
        assert_eq!(count("worker pause"), 8);
        assert_eq!((count("lossy link"), count("partition")), (12, 12));
        assert!(faults.windows(2).all(|w| w[0].at <= w[1].at));
        for f in &faults {
            assert!(f.end() <= p.span, "{f:?} ends after the span");
            match f.kind {
                Kind::Pause => assert!(f.lasts > p.failure_timeout, "{f:?}"),
                Kind::Partition => assert!(f.lasts > QUIC_IDLE_TIMEOUT, "{f:?}"),
                Kind::Lossy { .. } => assert_ne!(f.host, Host::Gateway),
                Kind::Kill | Kind::PowerCut => {}
            }
            let overlapping = faults.iter().filter(|g| {
                g.host == f.host && g != &f && g.at < f.end() + SETTLE && f.at < g.end() + SETTLE
            });
            assert_eq!(
                overlapping.count(),
                0,
                "{f:?} overlaps another fault of its host"
            );
        }
        let workers: Vec<Host> = (1..=3).map(Host::Worker).collect();
        assert!(workers.iter().all(|w| faults.iter().any(|f| f.host == *w)));
        assert_eq!(schedule(&p, 7).expect("a schedule"), faults);
        assert_ne!(schedule(&p, 8).expect("a schedule"), faults);
    }

    #[test]
    fn faults_that_cannot_fit_are_refused() {
        let mut p = config();
        p.span = Duration::from_secs(30);
        assert!(schedule(&p, 7).is_err());
        p.span = Duration::from_secs(3);
        p.link_faults = 2;
        assert!(schedule(&p, 7).is_err(), "a partition longer than the span");
    }

    #[test]
    fn intervals_stay_within_their_bounds() {
        let bounds = (Duration::from_millis(1000), Duration::from_millis(3000));
        let mut rng = StdRng::seed_from_u64(7);
        let drawn: Vec<Duration> = (0..1000).map(|_| between(&mut rng, bounds)).collect();
        assert!(drawn.iter().all(|d| bounds.0 <= *d && *d <= bounds.1));
        assert!(drawn.iter().any(|d| *d < Duration::from_millis(1100)));
        assert!(drawn.iter().any(|d| *d > Duration::from_millis(2900)));
    }
}
