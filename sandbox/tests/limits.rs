//! cgroup limits: a memory hog is OOM-killed and counted, a fork bomb hits the pids limit.
//! These need a usable cgroup (root on this host); they fail, not skip, without one.

mod common;

use common::{bundle, config, run, TEST_TIMEOUT};
use sand_sandbox::{Exit, Limits, Sandbox};
use sand_testkit::cgroups::assert_usable as assert_cgroups_usable;
use tokio::time::timeout;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_is_oom_killed_and_counted() {
    assert_cgroups_usable();
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let mut hungry = config("hog", app.path());
        hungry.limits = Limits {
            memory_bytes: 64 * MIB,
            ..Limits::default()
        };
        let sandbox = Sandbox::create(hungry).await.expect("create");
        assert_eq!(sandbox.memory_limit(), Some(64 * MIB));
        assert_eq!(sandbox.oom_kills(), 0);

        // Small allocations are fine under the limit.
        let (exit, _) = run(
            &sandbox,
            "/usr/bin/python3",
            &["-c", "b = b'x' * (16 << 20)"],
        )
        .await;
        assert_eq!(exit, Exit::Exited(0));
        assert_eq!(sandbox.oom_kills(), 0);

        let (exit, _) = run(
            &sandbox,
            "/usr/bin/python3",
            &["-c", "b = b'x' * (200 << 20)"],
        )
        .await;
        assert_eq!(exit, Exit::Signaled(9), "the hog is SIGKILLed");
        assert!(
            sandbox.oom_kills() >= 1,
            "the kill is counted as an OOM kill"
        );

        // The sandbox survives its hog.
        let (exit, out) = run(&sandbox, "/bin/sh", &["-c", "echo alive >&3"]).await;
        assert_eq!((exit, out.as_str()), (Exit::Exited(0), "alive\n"));
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_limit_stops_a_fork_bomb() {
    assert_cgroups_usable();
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let mut bounded = config("forks", app.path());
        bounded.limits = Limits {
            pids_max: 16,
            cpu_millis: 500,
            ..Limits::default()
        };
        let sandbox = Sandbox::create(bounded).await.expect("create");
        let bomb = "import os, time
started = refused = 0
for _ in range(50):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        os.close(3)
        time.sleep(30)
        os._exit(0)
    started += 1
os.write(3, f'{started} {refused}'.encode())";
        let (exit, out) = run(&sandbox, "/usr/bin/python3", &["-c", bomb]).await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        let counts: Vec<u32> = out.split(' ').filter_map(|n| n.parse().ok()).collect();
        // 16 pids: PID 1 and python itself take 2.
        assert_eq!(counts.len(), 2, "output: {out}");
        assert!(
            counts[0] <= 14,
            "{} forks succeeded under pids.max = 16",
            counts[0]
        );
        assert_eq!(counts[0] + counts[1], 50);
        assert!(counts[1] >= 36, "only {} forks refused", counts[1]);
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

/// A sandbox made with the default limits gets every one of them written to its cgroup: one
/// core of CPU, 1024 processes, 512 MiB of memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_limits_are_all_enforced() {
    assert_cgroups_usable();
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let sandbox = Sandbox::create(config("defaults", app.path()))
            .await
            .expect("create");
        assert_eq!(sandbox.memory_limit(), Some(Limits::MEMORY_BYTES_DEFAULT));
        let read = |file: &str| {
            sandbox
                .cgroup_dirs()
                .iter()
                .find_map(|dir| std::fs::read_to_string(dir.join(file)).ok())
                .map(|text| text.trim().to_owned())
        };
        assert_eq!(read("pids.max").as_deref(), Some("1024"));
        match read("cpu.max") {
            Some(max) => assert_eq!(max, "100000 100000", "cgroup v2"),
            None => {
                assert_eq!(
                    read("cpu.cfs_quota_us").as_deref(),
                    Some("100000"),
                    "cgroup v1"
                );
                assert_eq!(read("cpu.cfs_period_us").as_deref(), Some("100000"));
            }
        }
        let memory = read("memory.max").or_else(|| read("memory.limit_in_bytes"));
        assert_eq!(memory, Some((512u64 << 20).to_string()));
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}
