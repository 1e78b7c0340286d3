//! Memory of a worker's sandboxes: the proportional set size (PSS) of the processes under a
//! worker, which splits each shared page among the processes that map it.

use std::collections::BTreeSet;

/// The PSS of one process in KiB, or None if it is gone.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

/// Every descendant of `pid` (not `pid` itself), through the children of all its threads.
pub fn descendants(pid: u32) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if found.insert(child) {
                    stack.push(child);
                }
            }
        }
    }
    found
}

/// The summed PSS of `pids`, in KiB.
pub fn total_pss_kib(pids: &BTreeSet<u32>) -> u64 {
    pids.iter().filter_map(|&p| pss_kib(p)).sum()
}
