//! A worker that dies (SIGKILL, no cleanup) takes its sandboxes with it; the next worker
//! removes the cgroups it left behind.
//!
//! The test re-runs itself as the "worker" in a child process, kills that child, and watches.
//! It has its own test binary because the stale-cgroup sweep runs once per process.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bundle, cgroup_pids, config, start, TEST_TIMEOUT};
use sand_sandbox::{Limits, Sandbox};
use sand_testkit::proc::alive;

const TEST_NAME: &str = "a_killed_worker_takes_its_sandbox_along";
const AS_WORKER: &str = "SAND_SANDBOX_TEST_AS_WORKER";

#[test]
fn a_killed_worker_takes_its_sandbox_along() {
    if std::env::var_os(AS_WORKER).is_some() {
        return be_the_worker();
    }
    let mut worker = Command::new(std::env::current_exe().expect("test executable"))
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(AS_WORKER, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the worker");
    // The worker prints one line: its cgroup dirs, then the host pids of its sandbox.
    let mut stdout = BufReader::new(worker.stdout.take().expect("stdout"));
    let report = loop {
        let mut line = String::new();
        let read = stdout
            .read_line(&mut line)
            .expect("read the worker's report");
        if read == 0 {
            let _ = worker.kill();
            let _ = worker.wait();
            panic!("the worker exited without reporting");
        }
        // libtest prints "test <name> ... " on the same line first.
        if let Some((_, report)) = line.split_once("SANDBOX ") {
            break report.trim().to_owned();
        }
    };
    let (dirs, pids) = report.split_once(' ').expect("dirs and pids");
    let dirs: Vec<PathBuf> = dirs.split(',').map(PathBuf::from).collect();
    let pids: Vec<u32> = pids.split(',').map(|p| p.parse().expect("pid")).collect();
    assert!(pids.len() >= 4, "holder, PID 1, shell and sleep: {pids:?}");
    assert!(pids.iter().all(|&p| alive(p)));

    worker.kill().expect("SIGKILL the worker");
    worker.wait().expect("reap the worker");

    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "sandbox processes outlived their worker: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        dirs.iter().all(|d| d.exists()),
        "a killed worker cannot remove its cgroups"
    );

    // The next worker's first sandbox sweeps them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let app = bundle(&[]);
        let mut limited = config("next-worker", app.path());
        limited.limits = Limits {
            pids_max: 8,
            ..Limits::default()
        };
        let sandbox = tokio::time::timeout(TEST_TIMEOUT, Sandbox::create(limited))
            .await
            .expect("timeout")
            .expect("create");
        sandbox.destroy().await.expect("destroy");
    });
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "stale cgroups not swept: {left:?}");
}

fn be_the_worker() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let app = bundle(&[]);
        let mut limited = config("doomed", app.path());
        limited.limits = Limits {
            pids_max: 8,
            ..Limits::default()
        };
        let sandbox = Sandbox::create(limited).await.expect("create");
        let (_sleeper, _) = start(&sandbox, "/bin/sh", &["-c", "exec 3>&-; sleep 60; true"]).await;
        let dirs = sandbox.cgroup_dirs();
        let deadline = Instant::now() + Duration::from_secs(5);
        while cgroup_pids(&dirs).len() < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut pids = cgroup_pids(&dirs);
        pids.extend(sandbox.holder_pid());
        pids.sort_unstable();
        pids.dedup();
        let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        println!("SANDBOX {} {}", dirs.join(","), pids.join(","));
        // Wait to be killed; the bound only matters if the parent test died first.
        tokio::time::sleep(TEST_TIMEOUT).await;
        std::mem::forget(sandbox);
    });
}
