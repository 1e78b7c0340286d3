//! The Rust SDK (`sand-grain`): a grain binary whose `main` is `serve(handler)`, run as a
//! zygote over the same wire as the Python runtime.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::ErrorKind;
use sand_testkit::proc::children;
use sand_testkit::wait::eventually;
use sand_worker::runtime::launch::HostLauncher;
use sand_worker::runtime::zygote::{Zygote, ZygoteRuntime, ZygoteSpec};

async fn start(reuse: u32) -> (TempDir, Zygote) {
    let dir = TempDir::new("rust-app");
    let mut spec = ZygoteSpec::new(
        ZygoteRuntime::Rust {
            binary: env!("CARGO_BIN_EXE_sand-test-grain").into(),
        },
        dir.path(),
    );
    spec.reuse = reuse;
    let z = Zygote::start(Arc::new(HostLauncher), spec)
        .await
        .expect("the zygote starts");
    (dir, z)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_chains_fan_outs_and_errors() {
    let (_dir, z) = start(1).await;
    bounded(60, async {
        assert_eq!(returned(&z.call(request("21")).await), "42");
        assert_eq!(
            z.call(request(r#""next""#)).await.result,
            GrainResult::Next {
                grain: grain("second"),
                input: "5".into()
            }
        );
        assert_eq!(
            z.call(request(r#""fan_out""#)).await.result,
            GrainResult::FanOut {
                branches: vec![(grain("left"), "1".into()), (grain("right"), "2".into())],
                join: grain("join"),
            }
        );
        assert_eq!(
            value(&z.call(request(r#""ctx""#)).await),
            common::ctx_of_request()
        );
        assert_eq!(
            error(&z.call(request(r#""fail""#)).await, ErrorKind::Raised),
            "no luck"
        );
        let panicked = z.call(request(r#""panic""#)).await;
        assert!(error(&panicked, ErrorKind::Raised).contains("on purpose"));
        let crashed = z.call(request(r#""crash""#)).await;
        assert!(error(&crashed, ErrorKind::Crashed).contains("SIGABRT"));
        let printed = z.call(request(r#""print""#)).await;
        assert_eq!(&printed.stdout[..], b"to stdout\n");
        assert_eq!(&printed.stderr[..], b"to stderr\n");

        let mut req = request(r#""sleep""#);
        req.timeout = Some(Duration::from_millis(300));
        assert_eq!(
            error(&z.call(req).await, ErrorKind::Timeout),
            "ran past 300 ms"
        );
        assert_eq!(returned(&z.call(request("2")).await), "4", "still serving");
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_is_a_fresh_instance_unless_reused() {
    for (reuse, distinct) in [(1, 6), (3, 2)] {
        let (_dir, z) = start(reuse).await;
        let zygote = z.pid().expect("pid");
        let mut pids = Vec::new();
        bounded(60, async {
            for _ in 0..6 {
                pids.push(
                    value(&z.call(request(r#""pid""#)).await)
                        .as_u64()
                        .expect("pid"),
                );
            }
        })
        .await;
        assert!(
            !pids.contains(&u64::from(zygote)),
            "the zygote never runs a handler"
        );
        let mut d = pids.clone();
        d.dedup();
        assert_eq!(d.len(), distinct, "reuse {reuse}: {pids:?}");
        z.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_reaches_a_held_spare_while_the_zygote_is_stopped() {
    let (_dir, z) = start(1).await;
    let zygote = z.pid().expect("pid");
    bounded(60, async {
        eventually(|| children(zygote).len() == 1).await;
        // SPARE goes out right after the fork: give the worker time to take the socket.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let spare = children(zygote);
        assert_eq!(spare.len(), 1, "one spare: {spare:?}");
        let pid = nix::unistd::Pid::from_raw(zygote as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::SIGSTOP).expect("stop the zygote");
        let mut req = request(r#""pid""#);
        req.timeout = Some(Duration::from_secs(5));
        let r = z.call(req).await;
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGCONT);
        assert_eq!(
            value(&r).as_u64(),
            Some(u64::from(spare[0])),
            "the held spare answered"
        );
    })
    .await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_has_no_channel_to_the_zygote_and_nothing_of_it_is_dumpable() {
    let (_dir, z) = start(1).await;
    let r = bounded(30, z.call(request(r#""reach""#))).await;
    assert_eq!(
        value(&r),
        serde_json::json!({"fd3_is_a_socket": false, "dumpable": false})
    );
    z.stop().await;
}
