//! What a process inside a sandbox can and cannot see.

mod common;

use common::{bundle, config, run, sh, start, TEST_TIMEOUT};
use sand_sandbox::{Exit, ReadOnlyPath, Sandbox};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_is_read_only_and_tmp_is_private() {
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[("hello.txt", "hello from the bundle")]);
        let host_marker = tempfile::Builder::new()
            .prefix("sand-host-marker-")
            .tempfile()
            .expect("marker");
        let marker_name = host_marker
            .path()
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        // An extra read-only path under /tmp, like a test's runtime directory, and the same
        // elsewhere (as a worker mounts its runtime at a fixed path).
        let runtime = bundle(&[("runtime.txt", "runtime file")]);
        let mut with_runtime = config("readonly", app.path());
        with_runtime.ro_paths = vec![
            ReadOnlyPath::same(runtime.path()),
            ReadOnlyPath {
                host: runtime.path().into(),
                inside: "/sand/elsewhere".into(),
            },
        ];
        let sandbox = Sandbox::create(with_runtime).await.expect("create");
        let runtime_dir = runtime.path().display();

        let script = format!(
            "cat /app/hello.txt; echo
             if (echo x > /app/new) 2>/dev/null; then echo app-writable; else echo app-read-only; fi
             if touch /usr/new 2>/dev/null; then echo usr-writable; else echo usr-read-only; fi
             if mkdir /newdir 2>/dev/null; then echo root-writable; else echo root-read-only; fi
             cat {runtime_dir}/runtime.txt; echo
             echo elsewhere: $(cat /sand/elsewhere/runtime.txt)
             if (echo x > /sand/elsewhere/new) 2>/dev/null; then echo elsewhere-writable; fi
             if (echo x > {runtime_dir}/new) 2>/dev/null; then echo ro-path-writable; else echo ro-path-read-only; fi
             if mknod /dev/made c 1 3 2>/dev/null && head -c0 /dev/made 2>/dev/null; then echo mknod-works; fi
             echo scratch > /tmp/scratch && cat /tmp/scratch
             echo tmp-listing: $(ls -A /tmp | grep -v sand-bundle-)"
        );
        let (exit, out) = sh(&sandbox, &script).await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        assert!(out.contains("hello from the bundle"), "{out}");
        assert!(out.contains("app-read-only"), "{out}");
        assert!(out.contains("usr-read-only"), "{out}");
        assert!(out.contains("root-read-only"), "{out}");
        assert!(out.contains("runtime file"), "{out}");
        assert!(out.contains("ro-path-read-only"), "{out}");
        assert!(out.contains("elsewhere: runtime file\n"), "{out}");
        assert!(!out.contains("elsewhere-writable"), "{out}");
        assert!(!out.contains("mknod-works"), "a device node made inside must not work: {out}");
        assert!(out.contains("scratch\n"), "{out}");
        assert!(
            out.contains("tmp-listing: scratch\n"),
            "the sandbox's /tmp holds only its own file: {out}"
        );
        assert!(!out.contains(&marker_name), "{out}");
        assert!(
            !app.path().join("new").exists(),
            "the bundle on the host was written"
        );
        sandbox.destroy().await.expect("destroy");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_cannot_see_each_others_files_or_processes() {
    timeout(TEST_TIMEOUT, async {
        let bundle_a = bundle(&[("a.txt", "secret of a")]);
        let bundle_b = bundle(&[("b.txt", "secret of b")]);
        let a = Sandbox::create(config("app-a", bundle_a.path()))
            .await
            .expect("create a");
        let b = Sandbox::create(config("app-b", bundle_b.path()))
            .await
            .expect("create b");
        // A long-running process in each; fd 3 closed so the output readers end.
        let (sleeper_a, _) = start(&a, "/bin/sh", &["-c", "exec sleep 30 3>&-"]).await;
        let (sleeper_b, _) = start(&b, "/bin/sh", &["-c", "exec sleep 30 3>&-"]).await;

        let probe = format!(
            "import json, os, socket
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
json.dump({{
    'pids': pids,
    'me': os.getpid(),
    'sees_init': os.path.exists('/proc/1'),
    'hostname': socket.gethostname(),
    'sees_b_bundle': os.path.exists({b_path:?}),
    'sees_b_file': os.path.exists({b_file:?}),
    'app': sorted(os.listdir('/app')),
}}, os.fdopen(3, 'w'))",
            b_path = bundle_b.path().display().to_string(),
            b_file = bundle_b.path().join("b.txt").display().to_string(),
        );
        let (exit, out) = run(&a, "/usr/bin/python3", &["-c", &probe]).await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        let seen: serde_json::Value = serde_json::from_str(&out).expect("probe output is JSON");
        let me = seen["me"].as_u64().expect("me");
        let mut expected = vec![u64::from(sleeper_a.id().as_raw()), me];
        expected.sort_unstable();
        assert_eq!(
            seen["pids"],
            serde_json::json!(expected),
            "A's /proc lists only A's processes"
        );
        assert_eq!(
            seen["sees_init"], false,
            "PID 1 (the holder) is hidden: /proc is hidepid and PID 1 has privileges the grain lacks"
        );
        assert_eq!(seen["hostname"], "app-a");
        assert_eq!(seen["sees_b_bundle"], false);
        assert_eq!(seen["sees_b_file"], false);
        assert_eq!(seen["app"], serde_json::json!(["a.txt"]));

        let (exit, out) = sh(
            &b,
            "hostname; cat /app/b.txt; echo; ls /proc | grep -c '^[0-9]'",
        )
        .await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        // B sees: its sleeper, sh, and grep/ls (ls may already be gone).
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("app-b"));
        assert_eq!(lines.next(), Some("secret of b"));
        let count: u32 = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("count");
        assert!((2..=4).contains(&count), "B sees {count} processes");
        let host_name =
            std::fs::read_to_string("/proc/sys/kernel/hostname").expect("host hostname");
        assert_ne!(host_name.trim(), "app-a", "the host's hostname changed");
        drop((sleeper_a, sleeper_b));
        a.destroy().await.expect("destroy a");
        b.destroy().await.expect("destroy b");
    })
    .await
    .expect("test timed out");
}

/// Interface names in a /proc/net/dev text.
fn interfaces(net_dev: &str) -> Vec<String> {
    net_dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_network_only_lo_exists_and_is_up() {
    timeout(TEST_TIMEOUT, async {
        let app = bundle(&[]);
        let sandbox = Sandbox::create(config("offline", app.path()))
            .await
            .expect("create");
        let (exit, out) = sh(&sandbox, "cat /proc/net/dev").await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        assert_eq!(interfaces(&out), vec!["lo"]);
        let loopback = "import os, socket
server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen()
client = socket.create_connection(server.getsockname(), timeout=5)
os.write(3, b'lo works')";
        let (exit, out) = run(&sandbox, "/usr/bin/python3", &["-c", loopback]).await;
        assert_eq!((exit, out.as_str()), (Exit::Exited(0), "lo works"));
        sandbox.destroy().await.expect("destroy");

        let host = std::fs::read_to_string("/proc/net/dev").expect("host net/dev");
        let mut networked = config("online", app.path());
        networked.network = true;
        let sandbox = Sandbox::create(networked).await.expect("create networked");
        let (exit, out) = sh(&sandbox, "cat /proc/net/dev").await;
        assert_eq!(exit, Exit::Exited(0), "output: {out}");
        assert_eq!(
            interfaces(&out),
            interfaces(&host),
            "network = true shares the host's interfaces"
        );
        sandbox.destroy().await.expect("destroy networked");
    })
    .await
    .expect("test timed out");
}
