//! Zygotes that do what a real one should not, played by a small Python script that speaks the
//! wire of `sand_grain::wire` itself: a spare that is dead by the time the worker writes its
//! call, and a `SPARE` that brings more fds than a message may carry.
//!
//! The tests run one at a time (`SERIAL`): one of them counts the fds of this whole process.

mod common;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::*;
use sand_protocol::ids::{Attempt, CallId};
use sand_protocol::wire::{ErrorKind, Payload};
use sand_worker::runtime::launch::HostLauncher;
use sand_worker::runtime::zygote::{Zygote, ZygoteRuntime, ZygoteSpec};
use sand_worker::runtime::CallRequest;

/// The fake zygote. `FAKE_MODE` picks its fault; it counts its lives in `lives` (in its working
/// directory), so a restarted zygote can behave differently. A call that reaches it (`CALL`) is
/// answered by the zygote itself: it hands over one end of a fresh socket pair as the call's
/// instance (`SPARE` with the call's slot) and writes the result, with the call's attempt, on
/// the other end as the instance would.
///
/// - `dead-spare`: the first `WANT` is answered 50 ms later with a spare whose instance is
///   already dead (its end of the socket is closed), followed at once by its `DIED`.
/// - `more-for-invented-slots`: in its first life a `CALL` is answered with 300 result pieces of
///   60 KiB on fd 3, each flagged `MORE`, for slots no call holds (the worker used to keep them
///   all); from its second life on it behaves.
/// - `too-many-fds`: in its first life a `CALL` is answered with a `SPARE` carrying 6 fds, in its
///   second with one carrying 2; from its third life on it behaves.
const FAKE_ZYGOTE: &str = r#"
import json, os, socket, struct, time

CALL, WANT, READY, RESULT, DIED, SPARE = 1, 4, 10, 12, 13, 14
MORE = 1
HEADER = struct.Struct("<BBI")

def send(chan, kind, slot, body=b""):
    chan.send(HEADER.pack(kind, 0, slot) + body)

def spare(chan, slot, number, fds):
    head = HEADER.pack(SPARE, 0, slot) + struct.pack("<II", number, os.getpid())
    socket.send_fds(chan, [head], fds)

def main():
    chan = socket.socket(fileno=3)
    lives = int(open("lives").read()) + 1 if os.path.exists("lives") else 1
    with open("lives", "w") as f:
        f.write(str(lives))
    mode = os.environ["FAKE_MODE"]
    send(chan, READY, 0, struct.pack("<I", os.getpid()))
    wants = 0
    number = 0
    while True:
        piece = chan.recv(70000)
        if not piece:
            os._exit(0)
        kind, _flags, slot = HEADER.unpack_from(piece)
        body = piece[HEADER.size:]
        if kind == WANT:
            wants += 1
            if mode == "dead-spare" and wants == 1:
                time.sleep(0.05)
                ours, theirs = socket.socketpair()
                theirs.close()
                number += 1
                spare(chan, 0, number, [ours.fileno()])
                ours.close()
                send(chan, DIED, 0, struct.pack("<IBi", number, 1, 9))
        elif kind == CALL:
            number += 1
            if mode == "more-for-invented-slots" and lives == 1:
                for invented in range(1000, 1300):
                    try:
                        chan.send(struct.pack("<BBI", RESULT, MORE, invented) + b"x" * 60 * 1024)
                    except OSError:
                        break
                continue
            if mode == "too-many-fds" and lives <= 2:
                fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(6 if lives == 1 else 2)]
                spare(chan, slot, number, fds)
                continue
            ours, theirs = socket.socketpair()
            spare(chan, slot, number, [ours.fileno()])
            ours.close()
            at = 1 + body[0]
            at += 1 + body[at]
            _call, attempt = struct.unpack_from("<QQ", body, at)
            result = json.dumps({"return": {"attempt": attempt, "life": lives}}).encode()
            head = struct.pack("<IIIIIQQ", os.getpid(), 0, len(result), 0, 0, 0, 0)
            frame = head + result
            theirs.sendall(struct.pack("<II", 4 + len(frame), slot) + frame)
            theirs.close()

main()
"#;

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` on a fresh single-threaded runtime, one test at a time.
fn serially(test: impl std::future::Future<Output = ()>) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(bounded(60, test));
}

struct Fake {
    dir: TempDir,
    spec: ZygoteSpec,
}

fn fake(mode: &str) -> Fake {
    let dir = TempDir::new("fake-zygote");
    let script = dir.write("fake_zygote.py", FAKE_ZYGOTE);
    let mut spec = ZygoteSpec::new(
        ZygoteRuntime::Python {
            interpreter: PYTHON.into(),
            runtime_script: script,
            module: "unused.py".into(),
            handler: "unused".into(),
        },
        dir.path(),
    );
    spec.env.push(("FAKE_MODE".into(), mode.into()));
    spec.start_timeout = Duration::from_secs(10);
    Fake { dir, spec }
}

fn first_attempt() -> CallRequest {
    CallRequest {
        exec: String::new(),
        call: CallId(8),
        attempt: Attempt(1),
        input: Payload::from("{}"),
        timeout: Some(Duration::from_secs(10)),
        trace: String::new(),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .count()
}

#[test]
fn a_call_handed_to_a_spare_reported_dead_before_the_write_goes_to_the_zygote() {
    serially(async {
        let fake = fake("dead-spare");
        let z = Arc::new(
            Zygote::start(Arc::new(HostLauncher), fake.spec.clone())
                .await
                .expect("the fake zygote starts"),
        );
        // The worker asked for a spare when the zygote started; the call claims the one on
        // its way.
        let call = tokio::spawn({
            let z = z.clone();
            async move { z.call(first_attempt()).await }
        });
        tokio::task::yield_now().await;
        // Hold this (only) runtime thread while the spare and its death arrive, so the worker
        // reads both before the call gets to write: the instance is reported dead after the
        // call took it and before its frame was written. (Under the spare's 250 ms wait.)
        std::thread::sleep(Duration::from_millis(200));
        let report = call.await.expect("the call task");
        let v = value(&report);
        assert_eq!(v["attempt"], 1, "the call ran on its first attempt: {v}");
        assert_eq!(v["life"], 1, "the zygote was not restarted: {v}");
        assert!(z.is_alive(), "a dead spare is no fault of the zygote");
        z.stop().await;
        drop(fake.dir);
    });
}

#[test]
fn a_spare_with_too_many_fds_is_a_protocol_error_and_leaks_no_fd() {
    serially(async {
        // The first child process starts tokio's reaper machinery, which stays: count after it.
        tokio::process::Command::new("/bin/true")
            .status()
            .await
            .expect("run /bin/true");
        let before = open_fds();
        let fake = fake("too-many-fds");
        let z = Zygote::start(Arc::new(HostLauncher), fake.spec.clone())
            .await
            .expect("the fake zygote starts");
        for (life, fds) in [(1, 6), (2, 2)] {
            let report = z.call(first_attempt()).await;
            let message = error(&report, ErrorKind::BadOutput);
            assert!(
                message.contains("the zygote broke the wire") && message.contains("fds"),
                "life {life}, a SPARE with {fds} fds: {message}"
            );
            for _ in 0..500 {
                if !z.is_alive() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(!z.is_alive(), "life {life}: the zygote is killed");
        }
        // The next call starts the zygote again, which now behaves.
        let v = value(&z.call(first_attempt()).await);
        assert_eq!(v["life"], 3, "{v}");
        assert_eq!(v["attempt"], 1, "{v}");
        z.stop().await;
        drop(z);
        let mut now = open_fds();
        for _ in 0..500 {
            if now <= before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            now = open_fds();
        }
        assert_eq!(now, before, "every fd the zygotes sent was closed");
        drop(fake.dir);
    });
}

#[test]
fn result_pieces_on_fd_3_for_invented_slots_are_not_kept_and_the_grain_keeps_serving() {
    serially(async {
        let fake = fake("more-for-invented-slots");
        let z = Zygote::start(Arc::new(HostLauncher), fake.spec.clone())
            .await
            .expect("the fake zygote starts");
        let report = z.call(first_attempt()).await;
        let message = error(&report, ErrorKind::BadOutput);
        assert!(
            message.contains("the zygote broke the wire: a Result message from the zygote"),
            "{message}"
        );
        assert_eq!(
            z.stats().result_bytes_peak,
            0,
            "nothing of the pieces was kept"
        );
        let v = value(&z.call(first_attempt()).await);
        assert_eq!(v["life"], 2, "a new zygote serves: {v}");
        z.stop().await;
        drop(fake.dir);
    });
}
