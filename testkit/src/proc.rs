//! What /proc says about processes, read with the `procfs` crate: a process's children and
//! descendants, whether it lives, its CPU time, its memory, its cgroups.
//!
//! Every function answers for a process that is gone (or was never there) as for one with
//! nothing to show: no children, not alive, None.

use std::collections::BTreeSet;
use std::time::Duration;

use procfs::process::Process;

/// The children that `pid`'s main thread started.
pub fn children(pid: u32) -> Vec<u32> {
    process(pid)
        .and_then(|p| p.task_from_tid(p.pid).ok())
        .and_then(|t| t.children().ok())
        .unwrap_or_default()
}

/// The children of every thread of `pid`.
pub fn children_of_all_threads(pid: u32) -> Vec<u32> {
    let Some(tasks) = process(pid).and_then(|p| p.tasks().ok()) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .flat_map(|task| task.children().unwrap_or_default())
        .collect()
}

/// The children of every thread of this process.
pub fn children_of_this_process() -> Vec<u32> {
    children_of_all_threads(std::process::id())
}

/// Every descendant of `pid` (not `pid` itself), through the children of all its threads.
pub fn descendants(pid: u32) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for child in children_of_all_threads(p) {
            if found.insert(child) {
                stack.push(child);
            }
        }
    }
    found
}

/// True while a process with this pid exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    process(pid)
        .and_then(|p| p.stat().ok())
        .is_some_and(|stat| stat.state != 'Z')
}

/// The parent of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    let ppid = process(pid)?.stat().ok()?.ppid;
    u32::try_from(ppid).ok()
}

/// The arguments `pid` was started with.
pub fn cmdline(pid: u32) -> Vec<String> {
    process(pid)
        .and_then(|p| p.cmdline().ok())
        .unwrap_or_default()
}

/// Every process on the host.
pub fn all() -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|p| u32::try_from(p.pid).ok())
        .collect()
}

/// The CPU time `pid` has used so far, user and system.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = process(pid)?.stat().ok()?;
    let ticks = stat.utime + stat.stime;
    Some(Duration::from_secs_f64(
        ticks as f64 / procfs::ticks_per_second() as f64,
    ))
}

/// The proportional set size of `pid` in KiB: its memory, with each shared page split among
/// the processes that map it.
pub fn pss_kib(pid: u32) -> Option<u64> {
    rollup_kib(pid, &["Pss"])
}

/// The memory only `pid` holds (its unique set size) in KiB: what one more such process costs.
pub fn private_kib(pid: u32) -> Option<u64> {
    rollup_kib(pid, &["Private_Clean", "Private_Dirty"])
}

/// The sum of `fields` of `/proc/PID/smaps_rollup`, in KiB; None unless each is there.
fn rollup_kib(pid: u32, fields: &[&str]) -> Option<u64> {
    let rollup = process(pid)?.smaps_rollup().ok()?;
    let map = &rollup.memory_map_rollup.0.first()?.extension.map;
    fields
        .iter()
        .map(|f| map.get(*f).map(|bytes| bytes / 1024))
        .sum()
}

/// The cgroups `pid` is in: for each hierarchy, its id (0 for cgroup v2), its controllers
/// (none for v2) and the path of the cgroup under the hierarchy's mount.
pub fn cgroups(pid: u32) -> Vec<(u32, Vec<String>, String)> {
    process(pid)
        .and_then(|p| p.cgroups().ok())
        .map(|groups| {
            groups
                .into_iter()
                .map(|g| (g.hierarchy, g.controllers, g.pathname))
                .collect()
        })
        .unwrap_or_default()
}

/// True when this process runs with the effective user id of root.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn process(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_seen_alive_then_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let pid = child.id();
        assert!(alive(pid));
        assert!(children_of_this_process().contains(&pid));
        assert!(descendants(std::process::id()).contains(&pid));
        assert_eq!(parent(pid), Some(std::process::id()));
        // `spawn` returns once the child has switched to its new image, which the kernel does
        // before it lays out the arguments: for a moment the command line reads empty.
        let started = std::time::Instant::now();
        let is_sleep = || cmdline(pid).first().is_some_and(|arg| arg == "sleep");
        while !is_sleep() && started.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(is_sleep(), "command line {:?}", cmdline(pid));
        assert!(all().contains(&pid));
        assert!(cpu_time(pid).is_some());
        assert!(pss_kib(pid).is_some_and(|kib| kib > 0));
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
        assert!(!alive(pid));
        assert!(!children_of_this_process().contains(&pid));
        assert_eq!(pss_kib(pid), None);
    }
}
