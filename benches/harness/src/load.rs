//! The machine's load: the load average around each part of a run, and the gate that keeps a
//! run started on a busy machine from passing for a result.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use sand_testkit::proc;

/// A run may start as a result only at or below this 1-minute load average.
pub const QUIET: f64 = 1.0;

/// The kernel's load averages over 1, 5 and 15 minutes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LoadAverage {
    /// Over the last minute.
    pub one: f64,
    /// Over the last 5 minutes.
    pub five: f64,
    /// Over the last 15 minutes.
    pub fifteen: f64,
}

impl LoadAverage {
    /// The load average now, from /proc/loadavg.
    pub fn now() -> Result<Self> {
        let text = std::fs::read_to_string("/proc/loadavg").context("cannot read /proc/loadavg")?;
        Self::parse(&text).with_context(|| format!("odd /proc/loadavg: {text:?}"))
    }

    /// The first three fields of /proc/loadavg.
    pub fn parse(text: &str) -> Option<Self> {
        let mut fields = text.split_whitespace().map(str::parse::<f64>);
        let mut next = || fields.next()?.ok();
        Some(Self {
            one: next()?,
            five: next()?,
            fifteen: next()?,
        })
    }
}

impl fmt::Display for LoadAverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} {:.2} {:.2}", self.one, self.five, self.fifteen)
    }
}

/// The load average before and after one part of a run.
#[derive(Clone, Debug, Serialize)]
pub struct PartLoad {
    /// The part.
    pub part: String,
    /// When it started.
    pub before: LoadAverage,
    /// When it ended.
    pub after: LoadAverage,
}

/// A process and its share of one CPU over a short window.
#[derive(Clone, Debug, PartialEq)]
pub struct Busy {
    /// Its pid.
    pub pid: u32,
    /// Its command line (or name).
    pub command: String,
    /// CPU time over the window, in percent of one CPU.
    pub cpu_percent: f64,
}

/// Why a run that starts at `load` may not be reported, unless told `noisy`: the load, the
/// `busiest` processes (looked for only then), and the flag. None when the run may go on.
pub fn refusal(
    load: LoadAverage,
    noisy: bool,
    busiest: impl FnOnce() -> Vec<Busy>,
) -> Option<String> {
    if noisy || load.one <= QUIET {
        return None;
    }
    let mut s = format!(
        "the machine is busy: load average {load} (1, 5, 15 minutes), above {QUIET:.1}; \
         figures taken now would not be comparable. Busiest processes:"
    );
    for b in busiest() {
        s.push_str(&format!(
            "\n  {:>5.1}% CPU  pid {:<7} {}",
            b.cpu_percent, b.pid, b.command
        ));
    }
    s.push_str(
        "\nWait for a quiet machine, or run with --noisy to measure anyway (results.md then \
         says the run is noisy).",
    );
    Some(s)
}

/// The `n` processes that used the most CPU over `window`.
pub fn busiest(n: usize, window: Duration) -> Vec<Busy> {
    let before = cpu_times();
    std::thread::sleep(window);
    rank(&before, &cpu_times(), window, n)
        .into_iter()
        .map(|(pid, cpu_percent)| Busy {
            pid,
            command: command(pid),
            cpu_percent,
        })
        .collect()
}

/// Every process's CPU time so far.
fn cpu_times() -> BTreeMap<u32, Duration> {
    proc::all()
        .into_iter()
        .filter_map(|pid| Some((pid, proc::cpu_time(pid)?)))
        .collect()
}

/// The `n` processes with the most CPU time between two readings `window` apart, busiest
/// first, in percent of one CPU; a process in only one reading is left out.
fn rank(
    before: &BTreeMap<u32, Duration>,
    after: &BTreeMap<u32, Duration>,
    window: Duration,
    n: usize,
) -> Vec<(u32, f64)> {
    let mut used: Vec<(u32, f64)> = after
        .iter()
        .filter_map(|(pid, &t)| {
            let spent = t.checked_sub(*before.get(pid)?)?;
            Some((*pid, 100.0 * spent.as_secs_f64() / window.as_secs_f64()))
        })
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    used.truncate(n);
    used
}

/// A process's command line, cut short, or its name when it has none (a kernel thread).
fn command(pid: u32) -> String {
    let line = proc::cmdline(pid).join(" ");
    let line = if line.is_empty() {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| format!("[{}]", c.trim()))
            .unwrap_or_default()
    } else {
        line
    };
    line.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(one: f64) -> LoadAverage {
        LoadAverage {
            one,
            five: 0.5,
            fifteen: 0.25,
        }
    }

    #[test]
    fn reads_the_three_averages_of_proc_loadavg() {
        assert_eq!(
            LoadAverage::parse("1.95 2.04 2.36 3/512 4242\n"),
            Some(LoadAverage {
                one: 1.95,
                five: 2.04,
                fifteen: 2.36
            })
        );
        assert_eq!(LoadAverage::parse("1.95 2.04"), None);
        assert_eq!(LoadAverage::parse(""), None);
        assert_eq!(load(0.5).to_string(), "0.50 0.50 0.25");
    }

    #[test]
    fn a_run_starts_at_or_below_one_and_above_only_when_told_noisy() {
        let busy = [Busy {
            pid: 42,
            command: "cargo build --release".into(),
            cpu_percent: 97.5,
        }];
        let unasked = || -> Vec<Busy> { panic!("no need to look for the busiest") };
        assert_eq!(refusal(load(0.3), false, unasked), None);
        assert_eq!(refusal(load(QUIET), false, unasked), None);
        assert_eq!(refusal(load(2.5), true, unasked), None);
        let why = refusal(load(2.5), false, || busy.to_vec()).expect("refused");
        for said in [
            "2.50 0.50 0.25",
            "above 1.0",
            "pid 42",
            "cargo build",
            "97.5%",
            "--noisy",
        ] {
            assert!(why.contains(said), "{said:?} not in {why}");
        }
    }

    #[test]
    fn ranks_processes_by_the_cpu_they_used_in_the_window() {
        let ms = Duration::from_millis;
        let before = BTreeMap::from([(1, ms(100)), (2, ms(0)), (3, ms(50)), (4, ms(7))]);
        let after = BTreeMap::from([(1, ms(150)), (2, ms(400)), (3, ms(50)), (5, ms(900))]);
        assert_eq!(
            rank(&before, &after, ms(500), 2),
            vec![(2, 80.0), (1, 10.0)],
            "busiest first; pid 4 ended and pid 5 began within the window"
        );
        assert_eq!(rank(&before, &after, ms(500), 9).len(), 3);
    }
}
