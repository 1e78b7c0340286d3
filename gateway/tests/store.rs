//! The durable store: what reopens equals what was committed, group commit really groups,
//! bundles and traces round trip, and bad files are clear errors.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use sand_gateway::store::{Store, StoreError, Trace};
use sand_protocol::durable::{
    Answer, Batch, CallRecord, Deployment, DurableState, ExecRecord, ExecStatus, Idempotency,
    JoinRecord, LogIndex, Op, Owner, WorkerRecord,
};
use sand_protocol::ids::{AppName, Attempt, CallId, ExecId, GrainName, Incarnation, Seq, WorkerId};
use sand_protocol::policy::{AppSpec, GrainPolicy};
use sand_protocol::time::Time;
use sand_protocol::wire::{AppBundle, Cont, ErrorKind, GrainError, JoinSpec, Payload, Reason};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Waits (at most 20 s) until batch `index` is durable.
fn wait_durable(store: &Store, index: u64) {
    rt().block_on(async {
        tokio::time::timeout(Duration::from_secs(20), store.durable(LogIndex(index)))
            .await
            .expect("committed within 20 s")
            .unwrap();
    });
}

fn applied(batches: &[Batch]) -> DurableState {
    let mut state = DurableState::default();
    batches.iter().for_each(|b| state.apply_batch(b));
    state
}

fn name(s: &str) -> GrainName {
    GrainName::new(s).unwrap()
}

fn app(s: &str) -> AppName {
    AppName::new(s).unwrap()
}

// ---- generated ops over a small key space, so puts overwrite and deletes hit ----

fn payload() -> impl Strategy<Value = Payload> {
    proptest::collection::vec(any::<u8>(), 0..24).prop_map(|v| Payload(Bytes::from(v)))
}

fn exec_id() -> impl Strategy<Value = ExecId> {
    (0u32..2, 0u32..4).prop_map(|(e, i)| ExecId::new(e, i))
}

fn call_id() -> impl Strategy<Value = CallId> {
    (0u64..4).prop_map(|c| CallId(c.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

fn app_name() -> impl Strategy<Value = AppName> {
    prop_oneof![Just(app("alpha")), Just(app("beta"))]
}

fn cont() -> impl Strategy<Value = Cont> {
    prop_oneof![
        Just(Cont::Client),
        (call_id(), 0u32..3).prop_map(|(join, branch)| Cont::Join { join, branch }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let app_spec = (app_name(), 1u32..5, 0u64..500, 1000u32..3000, payload()).prop_map(
        |(name, attempts, backoff, factor, code)| {
            let spec = AppSpec {
                name,
                entry: GrainName::new("g").unwrap(),
                grains: BTreeMap::from([(
                    GrainName::new("g").unwrap(),
                    GrainPolicy {
                        attempts_max: attempts,
                        backoff_ms: backoff,
                        backoff_factor_milli: factor,
                        backoff_ms_max: 10_000,
                        timeout_ms: Some(1000),
                    },
                )]),
            };
            let bundle = AppBundle {
                digest: format!("{}", code.0.len()),
                archive: code.0,
            };
            Op::PutApp(Deployment { spec, bundle })
        },
    );
    let exec = (
        exec_id(),
        app_name(),
        proptest::option::of("[a-z]{1,6}"),
        0u8..3,
        payload(),
    )
        .prop_map(|(exec, app, key, status, value)| {
            let status = match status {
                0 => ExecStatus::Running,
                1 => ExecStatus::Done(Answer::Value(value)),
                _ => ExecStatus::Done(Answer::Error(GrainError::new(ErrorKind::Timeout, "slow"))),
            };
            Op::PutExec(ExecRecord {
                exec,
                app,
                idempotency: key.map(|k| Idempotency::new(k, &Payload::from("1"))),
                accepted: Time::from_millis(1),
                ended: None,
                calls: 1,
                status,
            })
        });
    let call = || {
        (
            exec_id(),
            call_id(),
            payload(),
            cont(),
            any::<u64>(),
            0u32..4,
            proptest::option::of((0u32..3, 0u64..3)),
        )
            .prop_map(|(exec, call, input, cont, attempt, failures, owner)| {
                Op::PutCall(CallRecord {
                    exec,
                    call,
                    app: app("alpha"),
                    grain: name("g"),
                    input,
                    cont,
                    attempt: Attempt(attempt),
                    failures,
                    reason: [Reason::First, Reason::Retry, Reason::Recovery][failures as usize % 3],
                    owner: owner.map(|(w, i)| Owner {
                        worker: WorkerId(w),
                        incarnation: Incarnation(i),
                    }),
                    depth_left: 16,
                    traceparent: Default::default(),
                })
            })
    };
    let join = (
        exec_id(),
        call_id(),
        cont(),
        proptest::collection::vec(proptest::option::of(payload()), 1..4),
        any::<bool>(),
    )
        .prop_map(|(exec, call, cont, contributions, fired)| {
            Op::PutJoin(JoinRecord {
                exec,
                spec: JoinSpec {
                    call,
                    grain: name("j"),
                    branches: contributions.len() as u32,
                    cont,
                    depth_left: 16,
                    traceparent: Default::default(),
                },
                contributions,
                fired,
            })
        });
    let worker = (0u32..3, 0u64..4, any::<bool>(), 0u64..9).prop_map(|(w, i, dead, seq)| {
        Op::PutWorker(
            WorkerId(w),
            WorkerRecord {
                incarnation: Incarnation(i),
                dead,
                applied: Seq(seq),
            },
        )
    });
    prop_oneof![
        (0u32..9).prop_map(Op::Epoch),
        app_spec,
        app_name().prop_map(Op::DelApp),
        exec,
        exec_id().prop_map(Op::DelExec),
        call(),
        call(),
        (exec_id(), call_id()).prop_map(|(e, c)| Op::DelCall(e, c)),
        join,
        (exec_id(), call_id()).prop_map(|(e, c)| Op::DelJoin(e, c)),
        worker,
    ]
}

/// Batches numbered from 1.
fn batches(max: usize) -> impl Strategy<Value = Vec<Batch>> {
    proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..max).prop_map(|ops| {
        ops.into_iter()
            .enumerate()
            .map(|(i, ops)| Batch {
                index: LogIndex(i as u64 + 1),
                ops,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Two gateway lives, each dropped without a clean shutdown after a random prefix of its
    /// batches was seen durable: every reopen gives exactly the state of the batches the store
    /// says it committed, which include every batch seen durable.
    #[test]
    fn reopen_equals_the_applied_state(
        first in batches(24),
        second in batches(24),
        seen_first in any::<prop::sample::Index>(),
        seen_second in any::<prop::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gq.redb");
        let mut log: Vec<Batch> = Vec::new();
        for (session, seen) in [(first, seen_first), (second, seen_second)] {
            let (store, state) = Store::open(&path).unwrap();
            prop_assert_eq!(&state, &applied(&log));
            let seen = seen.index(session.len()) as u64 + 1;
            for b in &session {
                store.append(b.clone()).unwrap();
            }
            wait_durable(&store, seen);
            drop(store);

            let (store, state) = Store::open(&path).unwrap();
            let committed = store.recovered().0;
            prop_assert!(committed >= seen && committed <= session.len() as u64,
                "committed {} seen {} appended {}", committed, seen, session.len());
            let mut expected = log.clone();
            expected.extend(session[..committed as usize].iter().cloned());
            prop_assert_eq!(&state, &applied(&expected));
            log = expected;
            store.close().unwrap();
        }
    }
}

#[test]
fn a_clean_close_commits_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gq.redb");
    let (store, _) = Store::open(&path).unwrap();
    let log: Vec<Batch> = (1..=50).map(|i| overwrite(i, 3)).collect();
    for b in &log {
        store.append(b.clone()).unwrap();
    }
    let stats = store.close().unwrap();
    assert_eq!(stats.batches, 50);
    let (store, state) = Store::open(&path).unwrap();
    assert_eq!(store.recovered(), LogIndex(50));
    assert_eq!(state, applied(&log));
}

/// A batch that rewrites the same few rows: applied out of order, the final state differs.
fn overwrite(i: u64, keys: u32) -> Batch {
    let exec = ExecId::new(1, (i % u64::from(keys)) as u32);
    Batch {
        index: LogIndex(i),
        ops: vec![
            Op::PutWorker(
                WorkerId(1),
                WorkerRecord {
                    incarnation: Incarnation(1),
                    dead: false,
                    applied: Seq(i),
                },
            ),
            Op::PutExec(ExecRecord {
                exec,
                app: app("alpha"),
                idempotency: Some(Idempotency::new(format!("k{i}"), &Payload::from("1"))),
                accepted: Time::from_millis(i),
                ended: None,
                calls: 1,
                status: ExecStatus::Running,
            }),
            Op::PutCall(CallRecord {
                exec,
                call: CallId(7),
                app: app("alpha"),
                grain: name("g"),
                input: Payload(Bytes::from(vec![b'x'; 200])),
                cont: Cont::Client,
                attempt: Attempt(i),
                failures: 0,
                reason: Reason::First,
                owner: None,
                depth_left: 16,
                traceparent: Default::default(),
            }),
            Op::DelCall(exec, CallId(i)),
        ],
    }
}

#[test]
fn group_commit_groups_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gq.redb");
    let (store, _) = Store::open(&path).unwrap();
    let mut commits = store.commits();
    let watcher = std::thread::spawn(move || {
        // Every status seen is at least the one before: batches commit in order.
        let rt = rt();
        // Marked seen, so that `changed` waits for a later status (a plain `borrow` would
        // leave it unseen, and a thread that starts after the last commit would see it twice).
        let mut seen = vec![commits.borrow_and_update().upto];
        rt.block_on(async {
            while tokio::time::timeout(Duration::from_secs(20), commits.changed())
                .await
                .is_ok_and(|r| r.is_ok())
            {
                let status = commits.borrow_and_update().clone();
                assert_eq!(status.failure, None);
                seen.push(status.upto);
                if status.upto == LogIndex(1000) {
                    break;
                }
            }
        });
        seen
    });
    let log: Vec<Batch> = (1..=1000).map(|i| overwrite(i, 5)).collect();
    for b in &log {
        store.append(b.clone()).unwrap();
    }
    wait_durable(&store, 1000);
    let stats = store.stats();
    assert_eq!(stats.batches, 1000);
    assert!(
        stats.transactions < 1000,
        "1000 batches took {} transactions",
        stats.transactions
    );
    let seen = watcher.join().unwrap();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&LogIndex(1000)));
    store.close().unwrap();
    let (_store, state) = Store::open(&path).unwrap();
    assert_eq!(state, applied(&log));
    eprintln!(
        "1000 batches in {} transactions, {} statuses seen",
        stats.transactions,
        seen.len()
    );
}

#[test]
fn appends_out_of_order_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&dir.path().join("gq.redb")).unwrap();
    let err = store.append(overwrite(2, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::OutOfOrder {
                expected: LogIndex(1),
                got: LogIndex(2)
            }
        ),
        "{err}"
    );
    store.append(overwrite(1, 1)).unwrap();
    let err = store.append(overwrite(1, 1)).unwrap_err();
    assert!(
        err.to_string().contains("the next must be LogIndex(2)"),
        "{err}"
    );
    store.append(overwrite(2, 1)).unwrap();
    assert_eq!(store.close().unwrap().batches, 2);
}

#[test]
fn an_app_and_its_bundle_are_written_and_removed_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gq.redb");
    let deploy = |name: &str, digest: &str, archive: Bytes| {
        let spec = AppSpec {
            name: app(name),
            entry: GrainName::new("g").unwrap(),
            grains: BTreeMap::new(),
        };
        let bundle = AppBundle {
            digest: digest.into(),
            archive,
        };
        Op::PutApp(Deployment { spec, bundle })
    };
    let big = Bytes::from((0..3_000_000u32).map(|i| i as u8).collect::<Vec<u8>>());
    let (store, _) = Store::open(&path).unwrap();
    let batch = |index, ops| Batch {
        index: LogIndex(index),
        ops,
    };
    store
        .append(batch(1, vec![deploy("alpha", "d1", big.clone())]))
        .unwrap();
    store
        .append(batch(
            2,
            vec![deploy("beta", "d2", Bytes::from_static(b"small"))],
        ))
        .unwrap();
    store
        .append(batch(
            3,
            vec![deploy("beta", "d3", Bytes::from_static(b"newer"))],
        ))
        .unwrap();
    store.close().unwrap();

    let (store, state) = Store::open(&path).unwrap();
    assert_eq!(state.apps[&app("alpha")].bundle.archive, big);
    let beta = &state.apps[&app("beta")].bundle;
    assert_eq!(
        (beta.digest.as_str(), &beta.archive[..]),
        ("d3", &b"newer"[..])
    );
    store
        .append(batch(1, vec![Op::DelApp(app("alpha"))]))
        .unwrap();
    store.close().unwrap();

    let (_, state) = Store::open(&path).unwrap();
    let apps: Vec<&str> = state.apps.keys().map(AppName::as_str).collect();
    assert_eq!(apps, ["beta"]);
}

fn trace(exec: ExecId, call: u64, attempt: u64, data: &str) -> Trace {
    Trace {
        exec,
        call: CallId(call),
        attempt: Attempt(attempt),
        data: Bytes::copy_from_slice(data.as_bytes()),
    }
}

#[test]
fn traces_round_trip_by_execution() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gq.redb");
    let (store, _) = Store::open(&path).unwrap();
    let (a, b) = (ExecId::new(1, 1), ExecId::new(1, 2));
    // Neighbours of `a` in key order, which a range scan must not pick up.
    let before = ExecId(a.0 - 1);
    store
        .put_traces(vec![
            trace(b, 1, 0, "b1"),
            trace(a, u64::MAX, u64::MAX, "a-last"),
            trace(a, 5, 1, "a5.1"),
            trace(a, 5, 0, "a5.0"),
            trace(before, u64::MAX, u64::MAX, "before"),
        ])
        .unwrap();
    store.append(overwrite(1, 1)).unwrap();
    wait_durable(&store, 1);
    let got = store.traces(a).unwrap();
    assert_eq!(
        got,
        vec![
            trace(a, 5, 0, "a5.0"),
            trace(a, 5, 1, "a5.1"),
            trace(a, u64::MAX, u64::MAX, "a-last")
        ]
    );
    assert_eq!(store.traces(b).unwrap(), vec![trace(b, 1, 0, "b1")]);
    assert_eq!(store.traces(ExecId::new(9, 9)).unwrap(), vec![]);

    store.delete_traces(a).unwrap();
    let stats = store.close().unwrap();
    assert_eq!(stats.traces, 5);
    let (store, _) = Store::open(&path).unwrap();
    assert_eq!(store.traces(a).unwrap(), vec![]);
    assert_eq!(store.traces(b).unwrap().len(), 1);
    assert_eq!(store.traces(before).unwrap().len(), 1);
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
    let err = Store::open(&garbage).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(err.to_string().contains("garbage.redb"), "{err}");

    let short = dir.path().join("short.redb");
    std::fs::write(&short, b"redb").unwrap();
    let err = Store::open(&short).unwrap_err();
    assert!(err.to_string().contains("short.redb"), "{err}");

    let err = Store::open(Path::new("/nonexistent-dir/x.redb")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent-dir/x.redb"), "{err}");

    let path = dir.path().join("gq.redb");
    let (_open, _) = Store::open(&path).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(err.to_string().contains("gq.redb"), "open twice: {err}");
}

/// Set in the child process of [`a_killed_gateway_loses_nothing_it_reported_durable`].
const CRASH_CHILD_ENV: &str = "SAND_STORE_CRASH_CHILD";

/// The child half of the kill -9 test; does nothing in a normal run. It appends batches as fast
/// as group commit takes them and prints each durable index, until it is killed.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let (store, _) = Store::open(Path::new(&path)).unwrap();
    let mut commits = store.commits();
    let rt = rt();
    let mut next = 1;
    for round in 0..1000u64 {
        // A few batches at a time, so some are always in flight when the kill lands.
        for _ in 0..(1 + round % 7) {
            store.append(overwrite(next, 5)).unwrap();
            next += 1;
        }
        rt.block_on(commits.changed()).unwrap();
        println!("durable {}", commits.borrow_and_update().upto.0);
    }
    // Killed long before this; if not, the parent's count check fails.
}

#[test]
fn a_killed_gateway_loses_nothing_it_reported_durable() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gq.redb");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("durable ") {
                if tx.send(n.trim().parse::<u64>().unwrap()).is_err() {
                    break;
                }
            }
        }
    });
    let mut seen = 0;
    while seen < 300 {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(n) => seen = seen.max(n),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the child stopped reporting at {seen}: {e}");
            }
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no flush
    child.wait().unwrap();
    drop(rx);
    reader.join().unwrap();

    let (store, state) = Store::open(&path).unwrap();
    let committed = store.recovered().0;
    assert!(
        committed >= seen,
        "reported {seen} durable, found {committed}"
    );
    let log: Vec<Batch> = (1..=committed).map(|i| overwrite(i, 5)).collect();
    assert_eq!(state, applied(&log));
    eprintln!("killed after {seen} reported durable; {committed} found committed");
}
