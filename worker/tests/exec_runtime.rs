//! The `exec` runtime: a fresh process per call, JSON on stdin and stdout.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::ErrorKind;
use sand_worker::runtime::exec::{ExecGrain, ExecSpec};
use sand_worker::runtime::launch::{Exit, HostLauncher};

const GRAIN: &str = r#"#!/usr/bin/python3
import json, os, sys, time
event = json.load(sys.stdin)
kind = event["kind"]
print("working on", kind, file=sys.stderr)
if kind == "value": out = {"return": event["n"] * 2}
elif kind == "next": out = {"next": ["second", {"n": 5}]}
elif kind == "fan_out": out = {"fan_out": [["left", 1], ["right", 2]], "join": "join"}
elif kind == "ctx": out = {"return": [os.environ["SAND_EXEC"], os.environ["SAND_CALL"], os.environ["SAND_ATTEMPT"], os.environ["TRACEPARENT"]]}
elif kind == "error":
    print(json.dumps({"error": "ValueError: no"}))
    sys.exit(1)
elif kind == "exit": sys.exit(3)
elif kind == "kill": os.kill(os.getpid(), 9)
elif kind == "garbage":
    print("hello")
    sys.exit(0)
elif kind == "sleep":
    time.sleep(30)
    out = {"return": None}
print(json.dumps(out))
"#;

fn grain_in(dir: &TempDir) -> ExecGrain {
    let program = dir.write("grain.py", GRAIN);
    ExecGrain::new(
        Arc::new(HostLauncher),
        ExecSpec {
            program,
            app_dir: dir.path().to_path_buf(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            concurrency: 4,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_chains_fan_outs_and_the_call_identity() {
    let dir = TempDir::new("exec");
    let g = grain_in(&dir);
    bounded(60, async {
        let r = g.call(request(r#"{"kind":"value","n":21}"#)).await;
        assert_eq!(returned(&r), "42");
        assert_eq!(&r.stderr[..], b"working on value\n");
        assert!(
            r.stdout.is_empty(),
            "stdout is the result, not captured output"
        );

        let next = g.call(request(r#"{"kind":"next"}"#)).await;
        let fan_out = g.call(request(r#"{"kind":"fan_out"}"#)).await;
        assert_next_and_fan_out(&next, &fan_out, r#"{"n": 5}"#, "2");
        let r = g.call(request(r#"{"kind":"ctx"}"#)).await;
        assert_eq!(
            value(&r),
            serde_json::json!([common::EXEC_REF, "0000000000000016", "3", common::TRACE])
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_crashes_garbage_and_timeouts() {
    let dir = TempDir::new("exec");
    let g = grain_in(&dir);
    bounded(60, async {
        let r = g.call(request(r#"{"kind":"error"}"#)).await;
        assert_eq!(error(&r, ErrorKind::Raised), "ValueError: no");

        let r = g.call(request(r#"{"kind":"exit"}"#)).await;
        assert_eq!(
            error(&r, ErrorKind::Crashed),
            "the grain exited with status 3"
        );
        assert_eq!(r.instance_exit, Some(Exit::Exited(3)));

        let r = g.call(request(r#"{"kind":"kill"}"#)).await;
        assert_eq!(error(&r, ErrorKind::Crashed), "the grain killed by SIGKILL");
        assert!(r.killed_by_sigkill());

        let r = g.call(request(r#"{"kind":"garbage"}"#)).await;
        assert!(error(&r, ErrorKind::BadOutput).contains("not a JSON object"));

        let mut req = request(r#"{"kind":"sleep"}"#);
        req.timeout = Some(Duration::from_millis(400));
        let r = g.call(req).await;
        assert_eq!(error(&r, ErrorKind::Timeout), "ran past 400 ms");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_binary_is_unavailable() {
    let dir = TempDir::new("exec");
    let g = ExecGrain::new(
        Arc::new(HostLauncher),
        ExecSpec {
            program: dir.path().join("absent"),
            app_dir: dir.path().to_path_buf(),
            env: vec![],
            concurrency: 1,
        },
    );
    let r = bounded(30, g.call(request("1"))).await;
    assert!(error(&r, ErrorKind::Unavailable).contains("absent"));
}

/// Writes a valid result of 600 kB, and holds it in the worker for a second before exiting.
const FLOOD: &str = r#"#!/usr/bin/python3
import json, sys, time
sys.stdin.read()
sys.stdout.write(json.dumps({"return": "x" * 600000}))
sys.stdout.flush()
time.sleep(1)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calls_in_flight_share_one_output_budget_and_what_does_not_fit_is_cut_and_counted() {
    let dir = TempDir::new("exec-flood");
    let program = dir.write("flood.py", FLOOD);
    let budget = 1 << 20;
    let g = Arc::new(ExecGrain::with_output_budget(
        Arc::new(HostLauncher),
        ExecSpec {
            program,
            app_dir: dir.path().to_path_buf(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            concurrency: 4,
        },
        budget,
    ));
    bounded(60, async {
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                tokio::spawn(async move { g.call(request("{}")).await })
            })
            .collect();
        let mut cut = 0;
        for call in calls {
            let r = call.await.expect("the call task");
            if let GrainResult::Error(e) = &r.result {
                assert_eq!(e.kind, ErrorKind::BadOutput, "{e:?}");
                assert!(e.message.contains("the result was cut"), "{}", e.message);
                cut += 1;
            }
        }
        assert!(cut >= 3, "four 600 kB results do not fit 1 MiB: {cut} cut");
        let dropped = g.output_dropped_bytes();
        assert!(
            dropped >= 4 * 600_000 - budget as u64,
            "every byte beyond the budget is counted: {dropped}"
        );
        let alone = g.call(request("{}")).await;
        assert_eq!(
            returned(&alone).len(),
            600_002,
            "the budget is given back: a call alone fits"
        );
    })
    .await;
}
