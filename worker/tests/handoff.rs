//! The hand-over of calls to instances: the worker writes a call straight to a spare instance
//! it holds (the zygote is not on the path), deaths are reported for exactly their call, an
//! abandoned call kills its instance, and fork on demand keeps no spare.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sand_protocol::ids::Attempt;
use sand_protocol::wire::{ErrorKind, Payload};
use sand_testkit::proc::children;
use sand_testkit::wait::eventually;
use sand_worker::runtime::launch::{Exit, HostLauncher};
use sand_worker::runtime::python::install_python_runtime;
use sand_worker::runtime::zygote::{Zygote, ZygoteRuntime, ZygoteSpec};
use sand_worker::runtime::{CallReport, CallRequest};

const GRAINS: &str = r#"
import os, time

def handle(event, ctx):
    if event["kind"] == "pid":
        return {"pid": os.getpid(), "ppid": os.getppid()}
    if event["kind"] == "attempt":
        return {"pid": os.getpid(), "attempt": ctx.attempt}
    if event["kind"] == "wait":
        with open(os.path.join(os.getcwd(), event["tag"] + ".pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(event["s"])
        return os.getpid()
    raise LookupError(event["kind"])
"#;

struct App {
    dir: TempDir,
    _runtime: TempDir,
    spec: ZygoteSpec,
}

fn app() -> App {
    let dir = TempDir::new("handoff-app");
    dir.write("grains.py", GRAINS);
    let runtime = TempDir::new("handoff-runtime");
    let script = install_python_runtime(runtime.path()).expect("install the runtime");
    let spec = ZygoteSpec::new(
        ZygoteRuntime::Python {
            interpreter: PYTHON.into(),
            runtime_script: script,
            module: "grains.py".into(),
            handler: "handle".into(),
        },
        dir.path(),
    );
    App {
        dir,
        _runtime: runtime,
        spec,
    }
}

async fn start(spec: ZygoteSpec) -> Arc<Zygote> {
    Arc::new(
        Zygote::start(Arc::new(HostLauncher), spec)
            .await
            .expect("the zygote starts"),
    )
}

/// True while `/proc/PID` exists: unlike `sand_testkit::proc::alive`, a zombie the zygote has
/// not reaped yet still counts, so that a test waits until the zygote has reaped what it killed.
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until the zygote has forked its first spare and the worker has had time to take its
/// socket (`SPARE` is sent right after the fork).
async fn spare_held(zygote_pid: u32) -> u32 {
    assert!(
        eventually(|| children(zygote_pid).len() == 1).await,
        "the first spare is forked: {:?}",
        children(zygote_pid)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    children(zygote_pid)[0]
}

/// A stopped process, continued when dropped (also when the test fails).
struct Stopped(Pid);

impl Stopped {
    fn new(pid: u32) -> Self {
        let pid = Pid::from_raw(pid as i32);
        kill(pid, Signal::SIGSTOP).expect("stop the zygote");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

fn with_timeout(input: &str, limit: Duration) -> CallRequest {
    CallRequest {
        timeout: Some(limit),
        ..request(input)
    }
}

/// The pid a `wait` call wrote to its pidfile.
async fn pid_of(app: &App, tag: &str) -> u32 {
    let path = app.dir.path().join(format!("{tag}.pid"));
    for _ in 0..500 {
        if let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the {tag} call never started");
}

fn spawn_call(z: &Arc<Zygote>, input: String) -> tokio::task::JoinHandle<CallReport> {
    let z = z.clone();
    tokio::spawn(async move { z.call(request(&input)).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reach_a_held_spare_while_the_zygote_is_stopped() {
    let app = app();
    let mut spec = app.spec.clone();
    spec.reuse = 3;
    let z = start(spec).await;
    let zygote = z.pid().expect("running");
    bounded(60, async {
        let spare = spare_held(zygote).await;
        let stopped = Stopped::new(zygote);
        for i in 0..3 {
            let r = z
                .call(with_timeout(r#"{"kind":"pid"}"#, Duration::from_secs(5)))
                .await;
            let v = value(&r);
            assert_eq!(v["pid"], spare, "call {i} went to the held spare");
            assert_eq!(
                v["ppid"], zygote,
                "call {i}: the spare is the zygote's child"
            );
            // Only the instance's first call is a cold start.
            assert_eq!(r.cold, i == 0, "call {i}");
        }
        // The spare has served its 3 calls and is gone; the next call needs the zygote, which
        // is stopped: it cannot be answered. This shows the zygote really was stopped.
        let r = z
            .call(with_timeout(
                r#"{"kind":"pid"}"#,
                Duration::from_millis(700),
            ))
            .await;
        error(&r, ErrorKind::Timeout);
        drop(stopped);
        let r = z
            .call(with_timeout(r#"{"kind":"pid"}"#, Duration::from_secs(10)))
            .await;
        assert_ne!(
            value(&r)["pid"],
            spare,
            "a new instance, once the zygote runs"
        );
        assert!(r.cold, "a new instance's first call");
        assert!(
            eventually(|| !alive(spare)).await,
            "the spare exits after its 3 calls (and is reaped)"
        );
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_call_fails_exactly_its_call() {
    let app = app();
    let mut spec = app.spec.clone();
    spec.concurrency = 3;
    let z = start(spec).await;
    bounded(60, async {
        spare_held(z.pid().expect("running")).await;
        // One call goes to the held spare, the others through the zygote.
        let doomed = spawn_call(&z, r#"{"kind":"wait","tag":"doomed","s":30}"#.into());
        let first = spawn_call(&z, r#"{"kind":"wait","tag":"first","s":1.5}"#.into());
        let second = spawn_call(&z, r#"{"kind":"wait","tag":"second","s":1.5}"#.into());
        let doomed_pid = pid_of(&app, "doomed").await;
        let first_pid = pid_of(&app, "first").await;
        let second_pid = pid_of(&app, "second").await;
        kill(Pid::from_raw(doomed_pid as i32), Signal::SIGKILL).expect("kill the instance");
        let r = doomed.await.expect("the doomed call");
        let m = error(&r, ErrorKind::Crashed);
        assert!(m.contains("killed by SIGKILL"), "{m}");
        assert_eq!(r.instance_exit, Some(Exit::Signaled(9)));
        assert!(
            alive(first_pid) && alive(second_pid),
            "the others still run"
        );
        let r = first.await.expect("the first call");
        assert_eq!(value(&r), serde_json::json!(first_pid));
        let r = second.await.expect("the second call");
        assert_eq!(value(&r), serde_json::json!(second_pid));
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_calls_kill_their_instances_whichever_way_they_went() {
    let app = app();
    let mut spec = app.spec.clone();
    spec.concurrency = 2;
    let z = start(spec).await;
    bounded(60, async {
        spare_held(z.pid().expect("running")).await;
        // The first call takes the held spare; the second goes through the zygote.
        let held = spawn_call(&z, r#"{"kind":"wait","tag":"held","s":30}"#.into());
        let relayed = spawn_call(&z, r#"{"kind":"wait","tag":"relayed","s":30}"#.into());
        let held_pid = pid_of(&app, "held").await;
        let relayed_pid = pid_of(&app, "relayed").await;
        // The worker aborts an attempt by dropping its call.
        held.abort();
        relayed.abort();
        assert!(
            eventually(|| !alive(held_pid) && !alive(relayed_pid)).await,
            "both instances end: {} {}",
            alive(held_pid),
            alive(relayed_pid)
        );
        let r = z
            .call(with_timeout(r#"{"kind":"pid"}"#, Duration::from_secs(10)))
            .await;
        value(&r);
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_kills_its_instance() {
    let app = app();
    let z = start(app.spec.clone()).await;
    bounded(60, async {
        spare_held(z.pid().expect("running")).await;
        let r = z
            .call(with_timeout(
                r#"{"kind":"wait","tag":"slow","s":30}"#,
                Duration::from_millis(500),
            ))
            .await;
        assert_eq!(error(&r, ErrorKind::Timeout), "ran past 500 ms");
        let pid = pid_of(&app, "slow").await;
        assert!(
            eventually(|| !alive(pid)).await,
            "instance {pid} was killed"
        );
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_on_demand_keeps_no_spare_and_forks_per_call() {
    let app = app();
    let mut spec = app.spec.clone();
    spec.prefork = false;
    spec.reuse = 5; // ignored on demand: an instance answers one call
    let z = start(spec).await;
    let zygote = z.pid().expect("running");
    bounded(60, async {
        let mut pids = Vec::new();
        for _ in 0..5 {
            let r = z.call(request(r#"{"kind":"pid"}"#)).await;
            pids.push(value(&r)["pid"].as_u64().expect("a pid"));
        }
        let mut distinct = pids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 5, "a fresh instance per call: {pids:?}");
        assert!(
            eventually(|| children(zygote).is_empty()).await,
            "no instance waits between calls: {:?}",
            children(zygote)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(children(zygote).is_empty(), "and none is forked ahead");
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_finds_no_spare_takes_the_one_on_its_way() {
    let app = app();
    let z = start(app.spec.clone()).await;
    let zygote = z.pid().expect("running");
    bounded(60, async {
        let first = spare_held(zygote).await;
        let stopped = Stopped::new(zygote);
        let r = z
            .call(with_timeout(r#"{"kind":"pid"}"#, Duration::from_secs(5)))
            .await;
        assert_eq!(value(&r)["pid"], first);
        // The worker has asked for the next spare (WANT); the zygote is stopped, so it stays
        // on its way while the next call comes (for less than the call waits for it).
        let next = spawn_call(&z, r#"{"kind":"pid"}"#.into());
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(stopped);
        let r = next.await.expect("the call task");
        let answered = value(&r)["pid"].as_u64().expect("a pid") as u32;
        // Had the call gone to the zygote, it would have forked the wanted spare first and
        // then another instance for the call: the call's instance would be the younger
        // (larger pid, barring a wrap of the pid counter). Taking the spare on its way, the
        // call's instance is the older, and the spare forked after its result the younger.
        assert!(
            eventually(|| children(zygote).iter().any(|&c| c != answered)).await,
            "a spare after the call: {:?}",
            children(zygote)
        );
        let spare = *children(zygote)
            .iter()
            .find(|&&c| c != answered)
            .expect("a spare");
        assert!(
            answered < spare,
            "the call took the spare on its way ({answered}), the next spare is {spare}: {:?}",
            children(zygote)
        );
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_spares_two_instances_wait_and_the_oldest_serves_first() {
    let app = app();
    let mut spec = app.spec.clone();
    spec.spares = 2;
    let z = start(spec).await;
    let zygote = z.pid().expect("running");
    bounded(60, async {
        assert!(
            eventually(|| children(zygote).len() == 2).await,
            "two spares: {:?}",
            children(zygote)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut spares = children(zygote);
        spares.sort_unstable();
        let stopped = Stopped::new(zygote);
        for (i, spare) in spares.iter().enumerate() {
            let r = z
                .call(with_timeout(r#"{"kind":"pid"}"#, Duration::from_secs(5)))
                .await;
            assert_eq!(
                value(&r)["pid"],
                *spare,
                "call {i} took the older held spare"
            );
        }
        drop(stopped);
        assert!(
            eventually(|| {
                let now = children(zygote);
                now.len() == 2 && now.iter().all(|c| !spares.contains(c))
            })
            .await,
            "two new spares replace the used ones: {:?}",
            children(zygote)
        );
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_spare_killed_while_idle_runs_elsewhere_on_its_first_attempt() {
    let app = app();
    let z = start(app.spec.clone()).await;
    let zygote = z.pid().expect("running");
    // A large input (4 MiB): the worker takes a few milliseconds to frame it after taking the
    // spare, so the spare's death is often reported in between; and no instance can take the
    // whole frame while it dies, so no round can count as a call that started.
    let input = format!(r#"{{"kind":"attempt","pad":"{}"}}"#, "x".repeat(4 << 20));
    let mut used = Vec::new();
    bounded(90, async {
        for round in 0..5 {
            assert!(
                eventually(|| {
                    let now = children(zygote);
                    now.len() == 1 && !used.contains(&now[0])
                })
                .await,
                "round {round}: a fresh spare: {:?}",
                children(zygote)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            let spare = children(zygote)[0];
            used.push(spare);
            kill(Pid::from_raw(spare as i32), Signal::SIGKILL).expect("kill the idle spare");
            let r = z
                .call(CallRequest {
                    attempt: Attempt(1),
                    input: Payload::from(input.as_str()),
                    ..request("")
                })
                .await;
            let v = value(&r);
            assert_eq!(v["attempt"], 1, "round {round}: no retry was used");
            assert_ne!(v["pid"], spare, "round {round}: another instance ran it");
            used.push(v["pid"].as_u64().expect("a pid") as u32);
        }
    })
    .await;
    z.stop().await;
}
