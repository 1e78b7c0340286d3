//! The durable store under a realistic global-queue workload: batches per second and commit
//! latency, with group commit and concurrent appenders, against one transaction per batch.
//!
//! Each batch is what one hop of a chain costs the gateway: `PutCall` of the next call (a
//! ~200-byte payload), `DelCall` of the one that completed, and `PutExec`. An appender
//! appends a batch and waits until it is durable, as a request waits before its answer leaves.
//!
//! Run: `cargo bench -p sand-gateway --bench store` (set `STORE_BENCH_BATCHES` to change the
//! number of batches per run; default 2000).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sand_gateway::store::Store;
use sand_protocol::durable::{Batch, CallRecord, ExecRecord, ExecStatus, LogIndex, Op, Owner};
use sand_protocol::ids::{AppName, Attempt, ExecId, GrainName, Incarnation, WorkerId};
use sand_protocol::time::Time;
use sand_protocol::wire::{Cont, Payload, Reason};

fn main() {
    let batches: u64 = std::env::var("STORE_BENCH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    println!(
        "{:<28} {:>9} {:>8} {:>11} {:>6} {:>11} {:>11} {:>11}",
        "mode", "appenders", "batches", "batches/s", "txns", "batch/txn", "median", "p99"
    );
    // One transaction per batch: a single appender waits for each commit before the next.
    run("one transaction per batch", 1, batches / 4);
    for appenders in [4, 16, 64] {
        run("group commit", appenders, batches);
    }
}

fn run(mode: &str, appenders: usize, batches: u64) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (store, _) = Store::open(&dir.path().join("store.redb")).expect("open the store");
    let store = Arc::new(store);
    let next = Arc::new(Mutex::new(0u64));
    let payload = Payload(Bytes::from(vec![b'x'; 200]));
    let started = Instant::now();
    let threads: Vec<_> = (0..appenders)
        .map(|_| {
            let store = Arc::clone(&store);
            let next = Arc::clone(&next);
            let payload = payload.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("a tokio runtime");
                let mut latencies = Vec::new();
                loop {
                    // Appending in index order is the driver's job: it holds the queue.
                    let (index, t0) = {
                        let mut n = next.lock().expect("the counter lock");
                        if *n >= batches {
                            break;
                        }
                        *n += 1;
                        let t0 = Instant::now();
                        store.append(hop(*n, &payload)).expect("append");
                        (LogIndex(*n), t0)
                    };
                    rt.block_on(async {
                        tokio::time::timeout(Duration::from_secs(30), store.durable(index))
                            .await
                            .expect("a commit within 30 s")
                            .expect("a commit");
                    });
                    latencies.push(t0.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("an appender"))
        .collect();
    let elapsed = started.elapsed();
    let stats = store.stats();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{:<28} {:>9} {:>8} {:>11.0} {:>6} {:>11.1} {:>11} {:>11}",
        mode,
        appenders,
        stats.batches,
        stats.batches as f64 / elapsed.as_secs_f64(),
        stats.transactions,
        stats.batches as f64 / stats.transactions.max(1) as f64,
        format!("{:.2?}", at(0.5)),
        format!("{:.2?}", at(0.99)),
    );
    Arc::try_unwrap(store)
        .expect("every appender has finished")
        .close()
        .expect("a clean close");
}

/// One hop of a chain in execution `n`: the next call pending, the last one done, the
/// execution record rewritten.
fn hop(n: u64, payload: &Payload) -> Batch {
    let exec = ExecId::new(1, (n % 1000) as u32);
    let call = exec.root_call().child(n as u32);
    let rec = CallRecord {
        exec,
        call,
        app: AppName::new("bench").expect("a valid name"),
        grain: GrainName::new("step").expect("a valid name"),
        input: payload.clone(),
        cont: Cont::Client,
        attempt: Attempt(0),
        failures: 0,
        reason: Reason::First,
        owner: Some(Owner {
            worker: WorkerId(1),
            incarnation: Incarnation(1),
        }),
        depth_left: 16,
        traceparent: Default::default(),
    };
    Batch {
        index: LogIndex(n),
        ops: vec![
            Op::PutCall(rec),
            Op::DelCall(exec, exec.root_call().child(n as u32 - 1)),
            Op::PutExec(ExecRecord {
                exec,
                app: AppName::new("bench").expect("a valid name"),
                idempotency: None,
                accepted: Time::ZERO,
                ended: None,
                calls: 1,
                status: ExecStatus::Running,
            }),
        ],
    }
}
