//! Processes' exits and kills, and sandboxes' ends: nothing may outlive a sandbox.

mod common;

use std::time::{Duration, Instant};

use common::{bundle, cgroup_pids, config, piped, run, sh, spec, start, TEST_TIMEOUT};
use sand_sandbox::{Exit, Limits, ReadOnlyPath, Sandbox, SandboxError};
use sand_testkit::proc::alive;
use tokio::io::AsyncReadExt;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_and_kill_report_exit_codes_and_signals() {
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let sandbox = Sandbox::create(config("exits", app.path()))
            .await
            .expect("create");

        let (exit, _) = sh(&sandbox, "exit 7").await;
        assert_eq!(exit, Exit::Exited(7));
        let (exit, _) = sh(&sandbox, "kill -TERM $$").await;
        assert_eq!(exit, Exit::Signaled(15));

        let (mut sleeper, _) = start(&sandbox, "/bin/sh", &["-c", "exec sleep 30 3>&-"]).await;
        sleeper.kill().await.expect("kill");
        assert_eq!(sleeper.wait().await, Exit::Signaled(9));
        assert_eq!(
            sleeper.wait().await,
            Exit::Signaled(9),
            "wait again gives the same exit"
        );
        sleeper
            .kill()
            .await
            .expect("killing an exited process is not an error");

        // kill takes the process group: the shell's background child goes too.
        let (mut group, mut output) = start(
            &sandbox,
            "/bin/sh",
            &["-c", "sleep 30 3>&- & echo $! >&3; exec 3>&-; wait"],
        )
        .await;
        let mut child = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut output, &mut child)
            .await
            .expect("read");
        group.kill().await.expect("kill group");
        assert_eq!(group.wait().await, Exit::Signaled(9));
        let (exit, out) = sh(
            &sandbox,
            &format!(
                "sleep 0.2; test -e /proc/{} && echo alive || echo gone",
                child.trim()
            ),
        )
        .await;
        assert_eq!((exit, out.as_str()), (Exit::Exited(0), "gone\n"));

        let (_, channel) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let missing = sandbox.spawn(spec("/no/such/program", &[], channel)).await;
        assert!(
            matches!(missing, Err(SandboxError::Spawn { .. })),
            "{missing:?}"
        );

        // The channel really is fd 3, stdin is /dev/null, and no other descriptor of the
        // holder leaks in: ls sees 0 to 3 and its own directory (4).
        let script = "readlink /proc/self/fd/0 >&3; cat >&3; ls /proc/self/fd | tr '\\n' ' ' >&3";
        let (exit, out) = run(&sandbox, "/bin/sh", &["-c", script]).await;
        assert_eq!(
            (exit, out.as_str()),
            (Exit::Exited(0), "/dev/null\n0 1 2 3 4 ")
        );
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_descriptors_become_the_process_streams() {
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let sandbox = Sandbox::create(config("stdio", app.path()))
            .await
            .expect("create");

        // Pipes and no channel: the shell copies stdin to stdout; then ls lists the descriptors
        // it was started with, 0 to 2, and its own directory's (3): no channel, nothing leaked.
        // End of file on both pipes means PID 1 kept no copy of them.
        let script = "cat; echo err >&2; exec ls /proc/self/fd";
        let (cat, pipes) = piped("/bin/sh", &["-c", script], None);
        let mut cat = sandbox.spawn(cat).await.expect("spawn with pipes");
        let (out, err) = timeout(
            Duration::from_secs(10),
            pipes.communicate("line one\nline two\n"),
        )
        .await
        .expect("end of file on stdout and stderr");
        assert_eq!(
            (out.as_str(), err.as_str()),
            ("line one\nline two\n0\n1\n2\n3\n", "err\n")
        );
        assert_eq!(cat.wait().await, Exit::Exited(0));

        // A channel and pipes in the same request: 0 to 3, and ls's directory (4).
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let script = "read -r line; echo \"$line\" >&3; echo err >&2; exec ls /proc/self/fd";
        let (both, pipes) = piped("/bin/sh", &["-c", script], Some(theirs));
        let mut both = sandbox
            .spawn(both)
            .await
            .expect("spawn with a channel and pipes");
        let (out, err) = timeout(Duration::from_secs(10), pipes.communicate("to fd 3\n"))
            .await
            .expect("end of file on stdout and stderr");
        assert_eq!((out.as_str(), err.as_str()), ("0\n1\n2\n3\n4\n", "err\n"));
        ours.set_nonblocking(true).expect("nonblocking");
        let mut channel = tokio::net::UnixStream::from_std(ours).expect("tokio socket");
        let mut text = String::new();
        channel.read_to_string(&mut text).await.expect("read fd 3");
        assert_eq!(text, "to fd 3\n");
        assert_eq!(both.wait().await, Exit::Exited(0));

        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

/// Starts a sandbox with busy processes; returns it with every host pid it holds.
async fn busy_sandbox(name: &str, app: &std::path::Path) -> (Sandbox, Vec<u32>) {
    let mut with_cgroup = config(name, app);
    with_cgroup.limits = Limits {
        pids_max: 64,
        ..Limits::default()
    };
    let sandbox = Sandbox::create(with_cgroup).await.expect("create");
    for _ in 0..3 {
        let (process, _) = start(
            &sandbox,
            "/bin/sh",
            &["-c", "exec 3>&-; sleep 30 & sleep 30 & wait"],
        )
        .await;
        drop(process);
    }
    let dirs = sandbox.cgroup_dirs();
    assert!(!dirs.is_empty(), "this test needs a cgroup (root)");
    // Each shell plus its two sleeps, the holder and PID 1.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cgroup_pids(&dirs).len() < 11 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut pids = cgroup_pids(&dirs);
    assert_eq!(pids.len(), 11, "pids in the cgroup: {pids:?}");
    pids.extend(sandbox.holder_pid());
    (sandbox, pids)
}

async fn assert_all_gone(pids: &[u32], dirs: &[std::path::PathBuf], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let living: Vec<_> = pids.iter().filter(|&&p| alive(p)).collect();
        let cgroups: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
        if living.is_empty() && cgroups.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: processes {living:?}, cgroups {cgroups:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_leaves_no_process_and_no_cgroup() {
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let (sandbox, pids) = busy_sandbox("destroyed", app.path()).await;
        let dirs = sandbox.cgroup_dirs();
        let started = Instant::now();
        sandbox.destroy().await.expect("destroy");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "destroy took {:?}",
            started.elapsed()
        );
        assert_all_gone(&pids, &dirs, Duration::ZERO).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_sandbox_leaves_no_process_and_no_cgroup() {
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let (sandbox, pids) = busy_sandbox("dropped", app.path()).await;
        let dirs = sandbox.cgroup_dirs();
        drop(sandbox);
        assert_all_gone(&pids, &dirs, Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_clear_errors() {
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let error = Sandbox::create(config("a/b", app.path()))
            .await
            .err()
            .expect("slash in name");
        assert!(
            matches!(error, SandboxError::InvalidName { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("a-z"), "{error}");

        let error = Sandbox::create(config("lost", &app.path().join("missing")))
            .await
            .err()
            .expect("no bundle");
        assert!(matches!(error, SandboxError::Bundle { .. }), "{error:?}");

        let mut relative = config("relative", app.path());
        relative.ro_paths = vec![ReadOnlyPath::same("usr/lib")];
        let error = Sandbox::create(relative)
            .await
            .err()
            .expect("relative ro path");
        assert!(
            matches!(error, SandboxError::ReadOnlyPath { .. }),
            "{error:?}"
        );

        let mut no_holder = config("noholder", app.path());
        no_holder.init_program = "/no/such/holder".into();
        let error = Sandbox::create(no_holder)
            .await
            .err()
            .expect("missing holder");
        assert!(
            matches!(error, SandboxError::StartHolder { .. }),
            "{error:?}"
        );

        // A holder that is not ours exits at once: a setup error, not a hang.
        let mut wrong_holder = config("wrongholder", app.path());
        wrong_holder.init_program = "/bin/true".into();
        let error = Sandbox::create(wrong_holder)
            .await
            .err()
            .expect("wrong holder");
        assert!(matches!(error, SandboxError::Setup { .. }), "{error:?}");
    })
    .await
    .expect("test timed out");
}
