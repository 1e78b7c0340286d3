//! Without root, the holder falls back to a user namespace and no cgroup can be made: the
//! sandbox is refused unless the operator allowed unlimited sandboxes. Its processes keep the
//! namespace's uid 0 (the worker's uid outside) but no capability in it, with no_new_privs and
//! securebits locked so that exec does not give the capabilities back.
//!
//! Run as root, the test re-runs itself as uid 65534 (nobody) and checks that run's verdict;
//! run without root, it checks directly.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bundle, config, sh, TEST_TIMEOUT};
use sand_sandbox::{Exit, Sandbox};
use sand_testkit::proc::alive;

const TEST_NAME: &str = "unprivileged_worker_gets_a_user_namespace_sandbox";
const AS_NOBODY: &str = "SAND_SANDBOX_TEST_AS_NOBODY";
const NOBODY: u32 = 65534;
const VERDICT: &str = "unprivileged checks passed";

#[test]
fn unprivileged_worker_gets_a_user_namespace_sandbox() {
    if std::env::var_os(AS_NOBODY).is_some() || !nix::unistd::geteuid().is_root() {
        check_unprivileged();
        println!("{VERDICT}");
        return;
    }
    let mut child = Command::new(std::env::current_exe().expect("test executable"))
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(AS_NOBODY, "1")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-run the test as nobody");
    let deadline = Instant::now() + TEST_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the unprivileged run timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert!(
        status.success() && out.contains(VERDICT),
        "unprivileged run failed ({status}):\n{out}\n{err}"
    );
}

fn check_unprivileged() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let uid = nix::unistd::geteuid().as_raw();
            let app = bundle(&[("f.txt", "bundle file")]);
            let mut limited = config("rootless", app.path());
            match Sandbox::create(limited.clone()).await {
                Err(e) => {
                    let message = e.to_string();
                    assert!(
                        message.contains("memory") && message.contains("--allow-unlimited"),
                        "the refusal names the limit and the way out: {message}"
                    );
                }
                Ok(sandbox) => {
                    sandbox.destroy().await.expect("destroy");
                    panic!("a sandbox started without the limits it was given");
                }
            }
            limited.allow_unlimited = true;
            let sandbox = Sandbox::create(limited).await.expect("create without root, allowed unlimited");
            assert_eq!(sandbox.memory_limit(), None, "no cgroup can be written without root");
            assert!(sandbox.cgroup_dirs().is_empty());
            let holder = sandbox.holder_pid().expect("holder pid");
            let status = std::fs::read_to_string(format!("/proc/{holder}/status")).expect("holder status");
            assert!(status.lines().any(|l| l.starts_with("Uid:") && l.contains(&uid.to_string())), "{status}");

            let (exit, out) = sh(
                &sandbox,
                "id -u; cat /app/f.txt; echo; hostname; test -e /proc/1 || echo pid1-hidden
                 if (echo x > /app/new) 2>/dev/null; then echo app-writable; else echo app-read-only; fi
                 echo t > /tmp/t && echo tmp-writable
                 grep -c : /proc/net/dev
                 grep NoNewPrivs: /proc/self/status | tr -d '\t '
                 grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status | tr -d '\t '
                 if (echo 1 > /proc/sys/net/ipv4/ip_forward) 2>/dev/null; then echo proc-sys-writable; else echo proc-sys-read-only; fi",
            )
            .await;
            assert_eq!(exit, Exit::Exited(0), "output: {out}");
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(
                lines,
                [
                    "0", "bundle file", "rootless", "pid1-hidden", "app-read-only", "tmp-writable", "1",
                    "NoNewPrivs:1",
                    "CapInh:0000000000000000",
                    "CapPrm:0000000000000000",
                    "CapEff:0000000000000000",
                    "CapBnd:0000000000000000",
                    "CapAmb:0000000000000000",
                    "proc-sys-read-only",
                ],
                "inside, the user is uid 0 of its own namespace but holds no capability there, with no_new_privs; the rest is isolated as with root"
            );
            sandbox.destroy().await.expect("destroy");
            assert!(!alive(holder), "the holder outlived destroy");
        })
        .await
        .expect("unprivileged check timed out");
    });
}
