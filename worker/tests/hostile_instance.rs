//! Instances that attack the other calls of their grain, or their zygote: a handler (running in
//! an instance, `reuse` 1, with another call of the same grain in flight) forges a result or a
//! death for the other call, on the zygote's fd 3 or on its own socket, or reads its zygote
//! through `/proc` and `pidfd_getfd`.
//!
//! What a forger gets: a forgery on fd 3 reaches nobody (the instance closed fd 3 before the
//! handler ran), and the forger's call gets its own result; a frame on its own socket for a call
//! it does not hold breaks the wire, and the forger's call fails with `BadOutput`. The other
//! call gets its own true result in every case.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sand_grain::wire::RESULT_BYTES_MAX;
use sand_protocol::wire::ErrorKind;
use sand_worker::runtime::launch::HostLauncher;
use sand_worker::runtime::python::install_python_runtime;
use sand_worker::runtime::zygote::{Zygote, ZygoteRuntime, ZygoteSpec};

const GRAINS: &str = r#"
import ctypes, json, os, socket, stat, struct, time

def channel_and_own_socket():
    """fd 3 as a socket (None if it is not one), and the instance's other socket."""
    chan, own = None, None
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
        except OSError:
            continue
        s = socket.socket(fileno=os.dup(fd))
        if fd == 3:
            chan = s
        elif s.type == socket.SOCK_STREAM:
            own = s
    return chan, own

def result_body(text):
    doc = json.dumps({"return": text}).encode()
    return struct.pack("<IIIIIQQ", os.getpid(), 0, len(doc), 0, 0, 0, 0) + doc

def handle(event, ctx):
    kind = event["kind"]
    if kind == "victim":
        time.sleep(1.0)
        return "victim's own result"
    chan, own = channel_and_own_socket()
    sent = 0
    if kind == "forge-on-fd3":
        for slot in range(1, 9):
            try:
                chan.send(struct.pack("<BBI", 12, 0, slot) + result_body("forged"))
                sent += 1
            except (AttributeError, OSError):
                pass
    elif kind == "died-on-fd3":
        for number in range(1, 17):
            try:
                chan.send(struct.pack("<BBI", 13, 0, 0) + struct.pack("<IBi", number, 1, 9))
                sent += 1
            except (AttributeError, OSError):
                pass
    elif kind == "forge-on-own-socket":
        for slot in range(1, 9):
            body = result_body("forged")
            own.sendall(struct.pack("<II", 4 + len(body), slot) + body)
            sent += 1
        time.sleep(0.5)
    elif kind == "flood-own-socket":
        # A head for its own call (the test gives its slot) claiming `len` bytes, then `send`.
        own.sendall(struct.pack("<II", event["len"], event["slot"]))
        chunk = b"\0" * (1 << 20)
        left = event["send"]
        try:
            while left > 0:
                own.sendall(chunk[:left])
                left -= len(chunk)
        except OSError:
            pass
        time.sleep(0.5)
    elif kind == "read-zygote":
        zygote = os.getppid()
        seen = {}
        for what in ["mem", "fd/3", "environ"]:
            try:
                os.close(os.open("/proc/%d/%s" % (zygote, what), os.O_RDONLY))
                seen[what] = "opened"
            except OSError as e:
                seen[what] = e.strerror
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(zygote)
        stolen = libc.syscall(438, pidfd, 3, 0)  # pidfd_getfd
        seen["pidfd_getfd"] = "stole fd %d" % stolen if stolen >= 0 else os.strerror(ctypes.get_errno())
        return seen
    return {"forger": sent}
"#;

struct App {
    dir: TempDir,
    runtime: TempDir,
}

fn app() -> App {
    let dir = TempDir::new("hostile-app");
    dir.write("grains.py", GRAINS);
    App {
        dir,
        runtime: TempDir::new("hostile-runtime"),
    }
}

fn spec(app: &App, interpreter: std::path::PathBuf) -> ZygoteSpec {
    let script = install_python_runtime(app.runtime.path()).expect("install the runtime");
    let mut spec = ZygoteSpec::new(
        ZygoteRuntime::Python {
            interpreter,
            runtime_script: script,
            module: "grains.py".into(),
            handler: "handle".into(),
        },
        app.dir.path(),
    );
    spec.concurrency = 2;
    spec
}

/// Runs the victim's call and, while it is in flight, the forger's: returns both reports.
async fn victim_and_forger(
    forger: &str,
) -> (
    sand_worker::runtime::CallReport,
    sand_worker::runtime::CallReport,
) {
    let app = app();
    let z = Arc::new(
        Zygote::start(Arc::new(HostLauncher), spec(&app, PYTHON.into()))
            .await
            .expect("the zygote starts"),
    );
    let reports = bounded(60, async {
        // The victim takes slot 1; the forger comes while it sleeps.
        let victim = tokio::spawn({
            let z = z.clone();
            async move { z.call(request(r#"{"kind":"victim"}"#)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let forger = z.call(request(&format!(r#"{{"kind":"{forger}"}}"#))).await;
        let victim = victim.await.expect("the victim's call");
        let after = z.call(request(r#"{"kind":"forge-on-fd3"}"#)).await;
        assert!(
            matches!(
                after.result,
                sand_protocol::local_bus::GrainResult::Return(_)
            ),
            "the grain keeps serving: {:?}",
            after.result
        );
        (victim, forger)
    })
    .await;
    z.stop().await;
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_forged_on_fd_3_for_every_slot_reaches_no_call() {
    let (victim, forger) = victim_and_forger("forge-on-fd3").await;
    assert_eq!(value(&victim), "victim's own result");
    assert_eq!(
        value(&forger),
        serde_json::json!({"forger": 0}),
        "fd 3 is closed in an instance: no forgery was even sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_death_forged_on_fd_3_for_every_instance_kills_no_call() {
    let (victim, forger) = victim_and_forger("died-on-fd3").await;
    assert_eq!(value(&victim), "victim's own result");
    assert_eq!(value(&forger), serde_json::json!({"forger": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_forged_on_its_own_socket_fails_only_the_forger() {
    let (victim, forger) = victim_and_forger("forge-on-own-socket").await;
    assert_eq!(value(&victim), "victim's own result");
    let m = error(&forger, ErrorKind::BadOutput);
    assert!(
        m.contains("the instance broke the wire") && m.contains("slot 1"),
        "{m}"
    );
}

/// The interpreter, run as an unprivileged user when the tests run as root (root may read any
/// process through `/proc` whatever its dumpable flag: `CAP_SYS_PTRACE`).
fn unprivileged_python(dir: &TempDir) -> std::path::PathBuf {
    if !nix::unistd::geteuid().is_root() {
        return PYTHON.into();
    }
    dir.write(
        "python-as-nobody.sh",
        &format!(
            "#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups \
             --inh-caps=-all {PYTHON} \"$@\"\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cannot_read_its_zygote_nor_steal_its_channel() {
    let app = app();
    let wrapper = TempDir::new("hostile-wrapper");
    let z = Zygote::start(
        Arc::new(HostLauncher),
        spec(&app, unprivileged_python(&wrapper)),
    )
    .await
    .expect("the zygote starts");
    let r = bounded(30, z.call(request(r#"{"kind":"read-zygote"}"#))).await;
    assert_eq!(
        value(&r),
        serde_json::json!({
            "mem": "Permission denied",
            "fd/3": "Permission denied",
            "environ": "Permission denied",
            "pidfd_getfd": "Operation not permitted",
        })
    );
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_flooding_its_socket_makes_the_worker_hold_at_most_one_result() {
    let app = app();
    let z = Zygote::start(Arc::new(HostLauncher), spec(&app, PYTHON.into()))
        .await
        .expect("the zygote starts");
    bounded(60, async {
        // Slot 1: a result of exactly the bound, then 4 MiB more: read, and refused as malformed.
        let flood = format!(
            r#"{{"kind":"flood-own-socket","slot":1,"len":{},"send":{}}}"#,
            4 + RESULT_BYTES_MAX,
            RESULT_BYTES_MAX + (4 << 20)
        );
        let r = z.call(request(&flood)).await;
        let m = error(&r, ErrorKind::BadOutput);
        assert!(m.contains("malformed"), "{m}");
        // Slot 2: a head claiming 4 GiB: refused before any of it is read.
        let flood = r#"{"kind":"flood-own-socket","slot":2,"len":4294967295,"send":1048576}"#;
        let r = z.call(request(flood)).await;
        let m = error(&r, ErrorKind::BadOutput);
        assert!(m.contains("exceeds"), "{m}");
        let stats = z.stats();
        assert_eq!(
            stats.result_bytes_peak, RESULT_BYTES_MAX,
            "the worker held the one result it read, and no more: {stats:?}"
        );
        assert_eq!(stats.result_bytes, 0, "and holds nothing now: {stats:?}");
        assert!(stats.broken_instances >= 1, "{stats:?}");
        let r = z.call(request(r#"{"kind":"forge-on-fd3"}"#)).await;
        assert_eq!(
            value(&r),
            serde_json::json!({"forger": 0}),
            "it keeps serving"
        );
    })
    .await;
    z.stop().await;
}
