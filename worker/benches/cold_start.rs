//! Cold start of a Python grain that imports numpy: per-call latency and memory of a
//! pre-forked zygote child, fork on demand (SAND's way), the `exec` runtime (a fresh
//! interpreter and import per call), and a warm reused instance.
//!
//! `cargo bench -p sand-worker --bench cold_start` (env: `SAND_BENCH_PYTHON`, default
//! `/usr/bin/python3`, which must have numpy; `SAND_BENCH_CALLS`, default 300;
//! `SAND_BENCH_PAUSE_MS`, the pause between calls, default 2; `SAND_BENCH_JSON=FILE` also
//! writes the figures there, for `sand-bench`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sand_protocol::ids::{Attempt, CallId};
use sand_protocol::local_bus::GrainResult;
use sand_protocol::wire::Payload;
use sand_testkit::proc::{children, private_kib, pss_kib};
use sand_testkit::stats::Latencies;
use sand_worker::runtime::exec::{ExecGrain, ExecSpec};
use sand_worker::runtime::launch::HostLauncher;
use sand_worker::runtime::python::install_python_runtime;
use sand_worker::runtime::zygote::{Zygote, ZygoteRuntime, ZygoteSpec};
use sand_worker::runtime::{CallReport, CallRequest};

const GRAINS: &str = "import time\nimport numpy as np\n\ndef handle(event, ctx):\n    if event == 'hold':\n        time.sleep(2)\n    return int(np.int64(7) + 1)\n";

fn exec_grain(python: &Path) -> String {
    format!(
        "#!{}\nimport sys, json\nimport numpy as np\njson.load(sys.stdin)\nprint(json.dumps({{'return': int(np.int64(7) + 1)}}))\n",
        python.display()
    )
}

fn request(input: &str) -> CallRequest {
    CallRequest {
        exec: String::new(),
        call: CallId(1),
        attempt: Attempt(1),
        input: Payload::from(input),
        timeout: Some(Duration::from_secs(30)),
        trace: String::new(),
    }
}

fn check(report: &CallReport) {
    if !matches!(report.result, GrainResult::Return(_)) {
        panic!(
            "benchmark call failed: {:?} stderr {:?}",
            report.result, report.stderr
        );
    }
}

struct Stats {
    median_us: f64,
    p99_us: f64,
}

fn stats(samples: Vec<Duration>) -> Stats {
    let latencies: Latencies = samples.into_iter().collect();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Stats {
        median_us: us(latencies.median()),
        p99_us: us(latencies.p99()),
    }
}

fn spec(python: &Path, script: &Path, app: &Path) -> ZygoteSpec {
    ZygoteSpec::new(
        ZygoteRuntime::Python {
            interpreter: python.into(),
            runtime_script: script.into(),
            module: "grains.py".into(),
            handler: "handle".into(),
        },
        app,
    )
}

/// How many instances hold a call at once while their memory is read.
const HELD: &[usize] = &[1, 4, 8];

/// The memory of each of `n` instances that hold a call at the same time.
struct Held {
    n: usize,
    /// Mean PSS of the instances serving the calls.
    pss_kib: u64,
    /// Mean private memory (USS) of those instances.
    private_kib: u64,
}

/// Starts `n` calls that each hold their instance for two seconds, and reads the instances'
/// memory in the middle of them. The serving instances are the children with the most private
/// memory (a spare has touched less).
async fn hold(z: &Arc<Zygote>, zygote_pid: u32, n: usize) -> Held {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let z = z.clone();
            tokio::spawn(async move { z.call(request("\"hold\"")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut instances: Vec<(u64, u64)> = children(zygote_pid)
        .into_iter()
        .filter_map(|pid| Some((private_kib(pid)?, pss_kib(pid)?)))
        .collect();
    instances.sort_unstable();
    let serving = &instances[instances.len().saturating_sub(n)..];
    assert_eq!(serving.len(), n, "{n} instances should hold a call");
    for call in calls {
        check(&call.await.expect("hold call"));
    }
    let mean = |f: fn(&(u64, u64)) -> u64| serving.iter().map(f).sum::<u64>() / n as u64;
    Held {
        n,
        pss_kib: mean(|i| i.1),
        private_kib: mean(|i| i.0),
    }
}

async fn zygote_calls(spec: ZygoteSpec, calls: usize, pause: Duration) -> Stats {
    let z = Zygote::start(Arc::new(HostLauncher), spec)
        .await
        .expect("start the zygote");
    for _ in 0..10 {
        check(&z.call(request("1")).await);
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        // A short pause, as between requests: the spare fork and the old instance's exit
        // happen off the measured path.
        tokio::time::sleep(pause).await;
        let t = Instant::now();
        check(&z.call(request("1")).await);
        samples.push(t.elapsed());
    }
    z.stop().await;
    stats(samples)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let python: PathBuf = std::env::var_os("SAND_BENCH_PYTHON")
        .map_or_else(|| "/usr/bin/python3".into(), PathBuf::from);
    let calls: usize = std::env::var("SAND_BENCH_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let pause = Duration::from_millis(
        std::env::var("SAND_BENCH_PAUSE_MS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(2),
    );
    let root = std::env::temp_dir().join(format!("sand-bench-{}", std::process::id()));
    let app = root.join("app");
    std::fs::create_dir_all(&app).expect("mkdir");
    std::fs::write(app.join("grains.py"), GRAINS).expect("write grains");
    let exec_path = app.join("grain_exec.py");
    std::fs::write(&exec_path, exec_grain(&python)).expect("write exec grain");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exec_path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let script = install_python_runtime(&root.join("runtime")).expect("install runtime");

    let prefork = zygote_calls(spec(&python, &script, &app), calls, pause).await;
    let two_spares = zygote_calls(
        ZygoteSpec {
            spares: 2,
            ..spec(&python, &script, &app)
        },
        calls,
        pause,
    )
    .await;
    let on_demand = zygote_calls(
        ZygoteSpec {
            prefork: false,
            ..spec(&python, &script, &app)
        },
        calls,
        pause,
    )
    .await;
    let warm = zygote_calls(
        ZygoteSpec {
            reuse: 1_000_000,
            ..spec(&python, &script, &app)
        },
        calls,
        pause,
    )
    .await;

    let exec = ExecGrain::new(
        Arc::new(HostLauncher),
        ExecSpec {
            program: exec_path.clone(),
            app_dir: app.clone(),
            env: vec![("PATH".into(), OsString::from("/usr/bin:/bin"))],
            concurrency: 1,
        },
    );
    let exec_calls = (calls / 10).max(10);
    let mut samples = Vec::new();
    for _ in 0..exec_calls {
        let t = Instant::now();
        check(&exec.call(request("1")).await);
        samples.push(t.elapsed());
    }
    let exec_stats = stats(samples);

    // Memory: the zygote, and 1, 4 and 8 instances in the middle of a call each.
    let z = Arc::new(
        Zygote::start(
            Arc::new(HostLauncher),
            ZygoteSpec {
                concurrency: *HELD.last().expect("a count"),
                ..spec(&python, &script, &app)
            },
        )
        .await
        .expect("start"),
    );
    let zygote_pid = z.pid().expect("pid");
    let mut held = Vec::new();
    for &n in HELD {
        held.push(hold(&z, zygote_pid, n).await);
    }
    let zygote_pss = pss_kib(zygote_pid).unwrap_or(0);
    let (instance_private, instance_pss) = (held[0].private_kib, held[0].pss_kib);
    z.stop().await;
    let mut fresh = std::process::Command::new(&python)
        .args([
            "-c",
            "import numpy, sys, time; print('ready', flush=True); time.sleep(30)",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start a fresh interpreter");
    {
        use std::io::BufRead;
        let mut line = String::new();
        let out = fresh.stdout.take().expect("piped");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("ready line");
    }
    let fresh_pss = pss_kib(fresh.id()).unwrap_or(0);
    let _ = fresh.kill();
    let _ = fresh.wait();
    let _ = std::fs::remove_dir_all(&root);

    println!("cold start of a Python grain importing numpy ({}; {calls} calls per zygote mode, {} ms apart; {exec_calls} exec calls)", python.display(), pause.as_millis());
    println!(
        "{:<34} {:>12} {:>12} {:>10}",
        "mode", "median µs", "p99 µs", "vs exec"
    );
    for (name, s) in [
        ("pre-forked zygote child", &prefork),
        ("pre-forked, 2 spares kept", &two_spares),
        ("fork on demand (SAND)", &on_demand),
        ("exec: fresh interpreter + import", &exec_stats),
        ("warm instance (reuse = 1e6)", &warm),
    ] {
        println!(
            "{name:<34} {:>12.0} {:>12.0} {:>9.0}x",
            s.median_us,
            s.p99_us,
            exec_stats.median_us / s.median_us
        );
    }
    println!(
        "pre-forked / warm median: {:.2}x",
        prefork.median_us / warm.median_us
    );
    println!("PSS: zygote {zygote_pss} KiB, fresh interpreter with numpy {fresh_pss} KiB");
    println!("an instance's PSS holds its own pages (USS) and its share of the zygote's, split among the zygote and its live children:");
    println!(
        "{:<28} {:>14} {:>10} {:>14} {:>10}",
        "instances serving a call", "PSS each KiB", "of fresh", "USS each KiB", "of fresh"
    );
    let of_fresh = |kib: u64| 100.0 * kib as f64 / fresh_pss.max(1) as f64;
    for h in &held {
        println!(
            "{:<28} {:>14} {:>9.0}% {:>14} {:>9.0}%",
            h.n,
            h.pss_kib,
            of_fresh(h.pss_kib),
            h.private_kib,
            of_fresh(h.private_kib)
        );
    }

    if let Some(path) = std::env::var_os("SAND_BENCH_JSON") {
        let mode = |s: &Stats| serde_json::json!({"median_us": s.median_us, "p99_us": s.p99_us});
        let doc = serde_json::json!({
            "calls": calls,
            "prefork": mode(&prefork),
            "prefork_two_spares": mode(&two_spares),
            "on_demand": mode(&on_demand),
            "exec": mode(&exec_stats),
            "warm": mode(&warm),
            "zygote_pss_kib": zygote_pss,
            "instance_pss_kib": instance_pss,
            "instance_private_kib": instance_private,
            "held": held.iter().map(|h| serde_json::json!({"instances": h.n, "pss_kib": h.pss_kib, "private_kib": h.private_kib})).collect::<Vec<_>>(),
            "fresh_pss_kib": fresh_pss,
        });
        std::fs::write(&path, doc.to_string()).expect("write SAND_BENCH_JSON");
    }
}
