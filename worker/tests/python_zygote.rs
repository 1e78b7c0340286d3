//! The Python runtime through a real zygote on the host: values, chains, errors, timeouts,
//! crashes, captured output, concurrency, and a zygote that breaks the wire.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sand_protocol::wire::ErrorKind;
use sand_worker::runtime::launch::{Exit, HostLauncher};
use sand_worker::runtime::python::install_python_runtime;
use sand_worker::runtime::zygote::{Zygote, ZygoteError, ZygoteRuntime, ZygoteSpec};
use sand_worker::runtime::{CAPTURE_BYTES_MAX, TRUNCATED_MARK};

const GRAINS: &str = r#"
import os, sys, time
with open(os.path.join(os.getcwd(), "imports.txt"), "a") as f:
    f.write("x")

def handle(event, ctx):
    kind = event["kind"]
    if kind == "value": return {"doubled": event["n"] * 2}
    if kind == "next": return ctx.next("second", {"n": 5})
    if kind == "fan_out": return ctx.fan_out([("left", 1), ("right", [2])], join="join")
    if kind == "ctx": return [ctx.exec, ctx.call, ctx.attempt, ctx.trace]
    if kind == "pools":
        names = ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"]
        return [os.environ.get(n) for n in names]
    if kind == "pid": return {"pid": os.getpid(), "ppid": os.getppid()}
    if kind == "raise": raise ValueError("bad input %d" % event["n"])
    if kind == "exit": os._exit(3)
    if kind == "kill": os.kill(os.getpid(), 9)
    if kind == "segv": os.kill(os.getpid(), 11)
    if kind == "set": return {1, 2}
    if kind == "nan": return float("nan")
    if kind == "bad_next": return ctx.next("../etc", 1)
    if kind == "wide": return ctx.fan_out([("b", i) for i in range(300)], join="j")
    if kind == "huge": return "x" * (7 << 20)
    if kind == "loop":
        while True: pass
    if kind == "hang":
        with open(os.path.join(os.getcwd(), "hang.pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(30)
    if kind == "sleep":
        time.sleep(event["s"])
        return os.getpid()
    if kind == "print":
        print("out", event["n"])
        print("err", event["n"], file=sys.stderr)
        return None
    if kind == "flood":
        sys.stdout.write("y" * 200000)
        return None
    raise LookupError(kind)
"#;

struct App {
    dir: TempDir,
    runtime: TempDir,
}

fn app(grains: &str) -> App {
    let dir = TempDir::new("py-app");
    dir.write("grains.py", grains);
    let runtime = TempDir::new("py-runtime");
    App { dir, runtime }
}

fn spec(app: &App) -> ZygoteSpec {
    let script = install_python_runtime(app.runtime.path()).expect("install the runtime");
    ZygoteSpec::new(
        ZygoteRuntime::Python {
            interpreter: PYTHON.into(),
            runtime_script: script,
            module: "grains.py".into(),
            handler: "handle".into(),
        },
        app.dir.path(),
    )
}

async fn start(spec: ZygoteSpec) -> Zygote {
    Zygote::start(Arc::new(HostLauncher), spec)
        .await
        .expect("the zygote starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_chains_and_fan_outs_come_back_as_grain_results() {
    let app = app(GRAINS);
    let z = start(spec(&app)).await;
    bounded(60, async {
        let r = z.call(request(r#"{"kind":"value","n":21}"#)).await;
        assert_eq!(value(&r), serde_json::json!({"doubled": 42}));
        assert!(r.finished >= r.started);

        let next = z.call(request(r#"{"kind":"next"}"#)).await;
        let fan_out = z.call(request(r#"{"kind":"fan_out"}"#)).await;
        assert_next_and_fan_out(&next, &fan_out, r#"{"n":5}"#, "[2]");

        let r = z.call(request(r#"{"kind":"ctx"}"#)).await;
        assert_eq!(value(&r), common::ctx_of_request());
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_thread_pools_get_one_thread_unless_the_app_says_otherwise() {
    let app = app(GRAINS);
    let z = start(spec(&app)).await;
    bounded(30, async {
        let r = z.call(request(r#"{"kind":"pools"}"#)).await;
        assert_eq!(value(&r), serde_json::json!(["1", "1", "1"]));
    })
    .await;
    z.stop().await;

    let mut with_omp = spec(&app);
    with_omp.env.push(("OMP_NUM_THREADS".into(), "4".into()));
    let z = start(with_omp).await;
    bounded(30, async {
        let r = z.call(request(r#"{"kind":"pools"}"#)).await;
        assert_eq!(value(&r), serde_json::json!(["1", "4", "1"]));
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_is_imported_once_per_zygote_and_each_call_is_a_fresh_child() {
    let app = app(GRAINS);
    let z = start(spec(&app)).await;
    let zygote_pid = z.pid().expect("a running zygote has a pid");
    let mut pids = Vec::new();
    bounded(60, async {
        for _ in 0..20 {
            let r = z.call(request(r#"{"kind":"pid"}"#)).await;
            let v = value(&r);
            assert_eq!(v["ppid"], zygote_pid, "the instance is the zygote's child");
            pids.push(v["pid"].as_u64().expect("a pid"));
        }
    })
    .await;
    let imports = std::fs::read_to_string(app.dir.path().join("imports.txt")).expect("read");
    assert_eq!(imports, "x", "the module ran once, in the zygote");
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        20,
        "reuse = 1: every call in a new process: {pids:?}"
    );
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_reuse_3_one_instance_serves_three_calls() {
    let app = app(GRAINS);
    let mut s = spec(&app);
    s.reuse = 3;
    let z = start(s).await;
    let mut pids = Vec::new();
    bounded(60, async {
        for _ in 0..6 {
            let r = z.call(request(r#"{"kind":"pid"}"#)).await;
            pids.push(value(&r)["pid"].as_u64().expect("a pid"));
        }
    })
    .await;
    assert_eq!(pids[0], pids[1], "{pids:?}");
    assert_eq!(pids[1], pids[2], "{pids:?}");
    assert_ne!(pids[2], pids[3], "{pids:?}");
    assert_eq!(pids[3], pids[4], "{pids:?}");
    assert_eq!(pids[4], pids[5], "{pids:?}");
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_dying_and_unencodable_handlers_are_clear_errors() {
    let app = app(GRAINS);
    let z = start(spec(&app)).await;
    bounded(60, async {
        let r = z.call(request(r#"{"kind":"raise","n":7}"#)).await;
        let m = error(&r, ErrorKind::Raised);
        assert!(m.starts_with("ValueError: bad input 7"), "{m}");
        assert!(m.contains("grains.py"), "the traceback names the file: {m}");

        let r = z.call(request(r#"{"kind":"exit"}"#)).await;
        assert_eq!(
            error(&r, ErrorKind::Crashed),
            "the instance exited with status 3 before answering"
        );
        assert_eq!(r.instance_exit, Some(Exit::Exited(3)));

        let r = z.call(request(r#"{"kind":"kill"}"#)).await;
        assert!(error(&r, ErrorKind::Crashed).contains("killed by SIGKILL"));
        assert!(
            r.killed_by_sigkill(),
            "the caller can tell an OOM-style kill"
        );

        let r = z.call(request(r#"{"kind":"segv"}"#)).await;
        let m = error(&r, ErrorKind::Crashed);
        assert!(m.contains("killed by SIGSEGV"), "{m}");
        assert!(!r.killed_by_sigkill());

        for (kind, says) in [
            ("set", "not JSON"),
            ("nan", "not JSON"),
            ("bad_next", "bad grain name"),
            ("wide", "not 300"),
            ("huge", "byte limit"),
        ] {
            let r = z.call(request(&format!(r#"{{"kind":"{kind}"}}"#))).await;
            let m = error(&r, ErrorKind::BadOutput);
            assert!(m.contains(says), "{kind}: {m}");
        }

        let r = z.call(request("not json")).await;
        assert!(error(&r, ErrorKind::Raised).contains("JSONDecodeError"));

        let r = z.call(request(r#"{"kind":"value","n":1}"#)).await;
        assert_eq!(
            value(&r),
            serde_json::json!({"doubled": 2}),
            "the zygote still serves"
        );
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_grain_is_killed_at_its_timeout_and_the_zygote_keeps_serving() {
    let app = app(GRAINS);
    let z = start(spec(&app)).await;
    bounded(60, async {
        let mut req = request(r#"{"kind":"loop"}"#);
        req.timeout = Some(Duration::from_millis(500));
        let r = z.call(req).await;
        assert_eq!(error(&r, ErrorKind::Timeout), "ran past 500 ms");
        assert!(r.finished - r.started >= Duration::from_millis(500));
        let r = z.call(request(r#"{"kind":"value","n":2}"#)).await;
        assert_eq!(value(&r), serde_json::json!({"doubled": 4}));
        assert!(z.is_alive());
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_zygote_fails_its_calls_in_flight_and_is_replaced() {
    let app = app(GRAINS);
    let z = Arc::new(start(spec(&app)).await);
    bounded(60, async {
        let first = z.pid().expect("pid");
        let sleeper = {
            let z = z.clone();
            tokio::spawn(async move { z.call(request(r#"{"kind":"sleep","s":30}"#)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(first as i32),
            nix::sys::signal::SIGKILL,
        )
        .expect("kill the zygote");
        let r = sleeper.await.expect("the call task");
        let m = error(&r, ErrorKind::Crashed);
        assert!(m.contains("zygote"), "{m}");
        assert!(!z.is_alive());

        let r = z.call(request(r#"{"kind":"value","n":5}"#)).await;
        assert_eq!(value(&r), serde_json::json!({"doubled": 10}));
        let second = z.pid().expect("restarted");
        assert_ne!(first, second);
        let imports = std::fs::read_to_string(app.dir.path().join("imports.txt")).expect("read");
        assert_eq!(
            imports, "xx",
            "the new zygote imported the module once more"
        );
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_are_captured_per_call_and_bounded() {
    let app = app(GRAINS);
    let mut s = spec(&app);
    s.reuse = 2; // the same instance serves both calls: its capture is still per call
    let z = start(s).await;
    bounded(60, async {
        let r = z.call(request(r#"{"kind":"print","n":1}"#)).await;
        assert_eq!(&r.stdout[..], b"out 1\n");
        assert_eq!(&r.stderr[..], b"err 1\n");
        let r = z.call(request(r#"{"kind":"print","n":2}"#)).await;
        assert_eq!(&r.stdout[..], b"out 2\n");
        assert_eq!(&r.stderr[..], b"err 2\n");

        let r = z.call(request(r#"{"kind":"flood"}"#)).await;
        assert_eq!(r.stdout.len(), CAPTURE_BYTES_MAX + TRUNCATED_MARK.len());
        assert!(r.stdout.ends_with(TRUNCATED_MARK.as_bytes()));
        assert!(r.stderr.is_empty());
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_concurrency_2_two_calls_overlap_and_a_third_waits() {
    let app = app(GRAINS);
    let mut s = spec(&app);
    s.concurrency = 2;
    let z = Arc::new(start(s).await);
    let reports = bounded(60, async {
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let z = z.clone();
                tokio::spawn(async move { z.call(request(r#"{"kind":"sleep","s":0.6}"#)).await })
            })
            .collect();
        let mut reports = Vec::new();
        for c in calls {
            reports.push(c.await.expect("call task"));
        }
        reports
    })
    .await;
    for r in &reports {
        value(r);
    }
    let mut by_start: Vec<_> = reports.iter().collect();
    by_start.sort_by_key(|r| r.started);
    let (a, b, c) = (by_start[0], by_start[1], by_start[2]);
    assert!(
        a.started < b.finished && b.started < a.finished,
        "the first two overlap"
    );
    let first_done = a.finished.min(b.finished);
    assert!(
        c.started >= first_done,
        "the third waited in line for a free place"
    );
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_fails_to_import_is_a_load_error() {
    let raising = app("x = 1 / 0\n");
    match Zygote::start(Arc::new(HostLauncher), spec(&raising)).await {
        Err(ZygoteError::Load(m)) => assert!(m.contains("ZeroDivisionError"), "{m}"),
        Err(other) => panic!("expected a load error, got {other}"),
        Ok(_) => panic!("a module that raises at import must not load"),
    }
    let no_handler = app("def other(e, c): return 1\n");
    match Zygote::start(Arc::new(HostLauncher), spec(&no_handler)).await {
        Err(ZygoteError::Load(m)) => assert!(m.contains("no function 'handle'"), "{m}"),
        Err(other) => panic!("expected a load error, got {other}"),
        Ok(_) => panic!("a missing handler must not load"),
    }
}

/// A fake zygote that speaks the wire badly, in the way its first argument says.
const BAD_ZYGOTE: &str = r#"#!/usr/bin/python3
import os, socket, struct, sys, time
mode = sys.argv[1]
chan = socket.socket(fileno=3)
if mode == "garbage-first":
    chan.send(b"\x01")
    time.sleep(30)
chan.send(struct.pack("<BBI", 10, 0, 0) + struct.pack("<I", os.getpid()))
while True:
    piece = chan.recv(70000)
    if not piece:
        sys.exit(0)
    kind, flags, slot = struct.unpack_from("<BBI", piece)
    if kind != 1:
        continue
    if mode == "unknown-kind":
        chan.send(struct.pack("<BBI", 99, 0, slot) + b"junk")
    elif mode == "lying-lengths":
        ours, theirs = socket.socketpair()
        spare = struct.pack("<BBI", 14, 0, slot) + struct.pack("<II", 1, os.getpid())
        socket.send_fds(chan, [spare], [ours.fileno()])
        ours.close()
        result = struct.pack("<IIIIIQQ", 1, 0, 1000, 0, 0, 0, 0) + b"{}"
        theirs.sendall(struct.pack("<II", 4 + len(result), slot) + result)
        keep = theirs
    elif mode == "short":
        chan.send(b"\x0c\x00")
"#;

fn bad_zygote(dir: &TempDir, mode: &str) -> ZygoteSpec {
    let script = dir.write("bad_zygote.py", BAD_ZYGOTE);
    // A "rust" zygote is any binary that speaks the wire; --reuse is appended after the mode.
    let wrapper = dir.write(
        &format!("bad-{mode}.sh"),
        &format!("#!/bin/sh\nexec {PYTHON} {} {mode}\n", script.display()),
    );
    let mut s = ZygoteSpec::new(ZygoteRuntime::Rust { binary: wrapper }, dir.path());
    s.start_timeout = Duration::from_secs(5);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_from_a_zygote_are_clear_errors() {
    let dir = TempDir::new("bad-zygote");
    bounded(60, async {
        match Zygote::start(Arc::new(HostLauncher), bad_zygote(&dir, "garbage-first")).await {
            Err(ZygoteError::Wire(e)) => assert!(e.to_string().contains("shorter than"), "{e}"),
            Err(other) => panic!("expected a wire error, got {other}"),
            Ok(_) => panic!("garbage instead of READY must not start"),
        }

        let z = start(bad_zygote(&dir, "lying-lengths")).await;
        let r = z.call(request("1")).await;
        let m = error(&r, ErrorKind::BadOutput);
        assert!(m.contains("shorter than its fields say"), "{m}");
        assert!(z.is_alive(), "one bad result fails one call");
        z.stop().await;

        for mode in ["unknown-kind", "short"] {
            let z = start(bad_zygote(&dir, mode)).await;
            let r = z.call(request("1")).await;
            let m = error(&r, ErrorKind::BadOutput);
            assert!(m.contains("broke the wire"), "{mode}: {m}");
            assert!(
                !z.is_alive(),
                "{mode}: a zygote that breaks the wire is killed"
            );
            z.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_kills_its_instance() {
    let app = app(GRAINS);
    let z = Arc::new(start(spec(&app)).await);
    bounded(30, async {
        let call = tokio::spawn({
            let z = z.clone();
            async move { z.call(request(r#"{"kind":"hang"}"#)).await }
        });
        let pidfile = app.dir.path().join("hang.pid");
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
            {
                break pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The worker aborts an attempt by dropping its call.
        call.abort();
        let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        for _ in 0..100 {
            if !proc_dir.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !proc_dir.exists(),
            "instance {pid} still runs after its call was dropped"
        );
        let r = z.call(request(r#"{"kind":"value","n":1}"#)).await;
        assert_eq!(value(&r), serde_json::json!({"doubled": 2}));
    })
    .await;
    z.stop().await;
}
