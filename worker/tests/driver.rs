//! The driver end to end, in one process: a real worker driver and real Python zygotes (no
//! sandbox), with the test playing the gateway over the in-memory transport.
//!
//! Besides checking that a local chain runs to its end and reports every hop, the latency test
//! prints the worker's own cost per warm local hop (`--nocapture`): the median of a 5-grain
//! chain minus that of a one-grain app, over 4 hops, both with reused instances. It asserts no
//! timing: a loaded machine must not fail it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{bounded, TempDir, PYTHON};
use sand_app::Policy;
use sand_protocol::ids::{AppName, Attempt, ExecId, Incarnation, Seq, WorkerId};
use sand_protocol::local_bus::LbConfig;
use sand_protocol::wire::{
    AppBundle, CallSpec, Cont, Down, GrainError, Outcome, Payload, Reason, Report, RunTrace,
    ServiceToGateway, ServiceToWorker, ToGateway, ToWorker, Up,
};
use sand_testkit::apps::CHAIN_GRAINS;
use sand_testkit::stats::Latencies;
use sand_transport::mem::MemNetwork;
use sand_transport::seam::{GatewayEvent, GatewayLink};
use sand_worker::driver::{self, WorkerConfig};
use sand_worker::host::{HostContext, Isolation};
use sand_worker::runtime::python::install_python_runtime;
use tokio::task::JoinHandle;

const WORKER: WorkerId = WorkerId(1);

/// Writes an app of `grains` (the first is the entry), each with `reuse`, and packs it.
fn app(root: &Path, name: &str, grains: &[&str], reuse: u32) -> AppBundle {
    app_with(
        root,
        name,
        grains,
        reuse,
        &format!("python = \"{PYTHON}\"\n"),
    )
}

/// As [`app`], with the manifest's top-level lines `extra`.
fn app_with(root: &Path, name: &str, grains: &[&str], reuse: u32, extra: &str) -> AppBundle {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir app");
    let mut manifest = format!("name = \"{name}\"\nentry = \"{}\"\n{extra}", grains[0]);
    for g in grains {
        manifest.push_str(&format!(
            "\n[grains.{g}]\nruntime = \"python\"\nmodule = \"grains.py\"\nhandler = \"{g}\"\n\
             reuse = {reuse}\n"
        ));
    }
    std::fs::write(dir.join("sand.toml"), manifest).expect("write manifest");
    std::fs::write(dir.join("grains.py"), CHAIN_GRAINS).expect("write grains");
    let archive = sand_app::pack(&dir).expect("pack");
    AppBundle {
        digest: sand_app::digest(&archive),
        archive,
    }
}

/// A worker driver on the in-memory transport, and the gateway's end of its link.
struct Harness {
    net: MemNetwork,
    gateway: GatewayLink,
    driver: Option<JoinHandle<Result<(), driver::WorkerError>>>,
    incarnation: Incarnation,
    bundles: Vec<(AppName, AppBundle)>,
    next_exec: u32,
    /// Runs traced so far.
    traces: Vec<RunTrace>,
    _dir: TempDir,
}

impl Harness {
    async fn start(lb: LbConfig, bundles: Vec<(AppName, AppBundle)>, dir: TempDir) -> Self {
        let (net, gateway) = MemNetwork::new(1024);
        let link = net.add_worker(WORKER);
        let python_runtime = install_python_runtime(&dir.path().join("runtime")).expect("runtime");
        let config = WorkerConfig {
            lb: LbConfig {
                worker: WORKER,
                ..lb
            },
            data_dir: dir.path().join("data"),
            host: HostContext {
                isolation: Isolation::None,
                allow_unlimited: false,
                python_runtime,
                policy: Policy::default(),
            },
            idle_teardown: Duration::from_secs(600),
            trace_interval: Duration::from_millis(20),
        };
        let driver = tokio::spawn(driver::run(config, link));
        let mut h = Harness {
            net,
            gateway,
            driver: Some(driver),
            incarnation: Incarnation(0),
            bundles,
            next_exec: 1,
            traces: Vec::new(),
            _dir: dir,
        };
        h.incarnation = bounded(10, async {
            loop {
                if let ToGateway::Hello { incarnation, .. } = h.next_message().await {
                    break incarnation;
                }
            }
        })
        .await;
        let welcome = ToWorker::Welcome {
            incarnation: h.incarnation,
            applied: Seq(0),
            heartbeat: Duration::from_secs(1),
        };
        h.send(welcome);
        h
    }

    fn send(&self, msg: impl Into<Down>) {
        self.gateway
            .sender
            .send(WORKER, msg)
            .expect("the worker is linked");
    }

    /// The worker's next message, answering fetches and keeping traces on the way.
    async fn next_message(&mut self) -> ToGateway {
        loop {
            let event = self.gateway.events.recv().await.expect("the network lives");
            let GatewayEvent::Message(_, msg) = event else {
                continue;
            };
            match msg {
                Up::Protocol(msg) => return msg,
                Up::Service(ServiceToGateway::Fetch { app }) => {
                    let bundle = self.bundles.iter().find(|(a, _)| *a == app);
                    let bundle = bundle.map(|(_, b)| b.clone());
                    self.send(ServiceToWorker::Bundle { app, bundle });
                }
                Up::Service(ServiceToGateway::Trace { runs }) => self.traces.extend(runs),
            }
        }
    }

    /// Dispatches `grain` of `app` with `input`, acks every progress message as it comes (as
    /// a gateway does once it is durable), and returns the value that answers the client with
    /// every report of the execution.
    async fn invoke(&mut self, app: &str, grain: &str, input: u64) -> (String, Vec<Report>) {
        let (answer, reports) = self.run(app, grain, input).await;
        match answer {
            Ok(answer) => (answer, reports),
            Err(e) => panic!("the execution failed: {e:?}"),
        }
    }

    /// As [`Self::invoke`], but the execution may fail: its value or its error.
    async fn run(
        &mut self,
        app: &str,
        grain: &str,
        input: u64,
    ) -> (Result<String, GrainError>, Vec<Report>) {
        let exec = ExecId::new(1, self.next_exec);
        self.next_exec += 1;
        let call = CallSpec {
            exec,
            call: exec.root_call(),
            attempt: Attempt(1),
            app: AppName::new(app).expect("app name"),
            grain: common::grain(grain),
            input: Payload::from(input.to_string().as_str()),
            cont: Cont::Client,
            depth_left: 16,
            exec_ref: String::new(),
            traceparent: Default::default(),
        };
        let incarnation = self.incarnation;
        self.send(ToWorker::Dispatch {
            incarnation,
            call,
            reason: Reason::First,
        });
        let mut reports = Vec::new();
        loop {
            let ToGateway::Progress {
                seq, reports: got, ..
            } = self.next_message().await
            else {
                continue;
            };
            self.send(ToWorker::Ack {
                incarnation,
                upto: seq,
            });
            for report in got.into_iter().filter(|r| r.exec == exec) {
                let answer = match &report.outcome {
                    Outcome::Done(effects) => effects
                        .returns
                        .iter()
                        .find(|r| r.cont == Cont::Client)
                        .map(|r| Ok(String::from_utf8_lossy(&r.value.0).into_owned())),
                    Outcome::Failed(e) => Some(Err(e.clone())),
                };
                reports.push(report);
                if let Some(answer) = answer {
                    return (answer, reports);
                }
            }
        }
    }

    /// Ends the worker: its link is replaced, so its events end, and it stops its zygotes.
    async fn stop(mut self) {
        drop(self.net.add_worker(WORKER));
        if let Some(driver) = self.driver.take() {
            let ended = bounded(20, driver).await;
            ended
                .expect("the driver task")
                .expect("the driver ends cleanly");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.abort(); // A failed test: dropping the driver's state kills its zygotes.
        }
    }
}

fn name(app: &str) -> AppName {
    AppName::new(app).expect("app name")
}

/// The median time `app` takes to answer from `grain`, over `runs` after 5 that start zygotes.
async fn measure(h: &mut Harness, app: &str, grain: &str, runs: u64) -> Duration {
    let mut samples = Vec::new();
    for i in 0..runs + 5 {
        let t = Instant::now();
        let (answer, _) = bounded(60, h.invoke(app, grain, i)).await;
        let took = t.elapsed();
        assert_eq!(answer, (i + 15).to_string());
        if i >= 5 {
            samples.push(took);
        }
    }
    samples.into_iter().collect::<Latencies>().median()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_chain_runs_every_hop_here_and_reports_each_once() {
    let dir = TempDir::new("driver-chain");
    let chain = app(dir.path(), "chain", &["s1", "s2", "s3", "s4", "s5"], 1);
    let mut h = Harness::start(LbConfig::default(), vec![(name("chain"), chain)], dir).await;
    for input in [0u64, 100] {
        let (answer, reports) = bounded(60, h.invoke("chain", "s1", input)).await;
        assert_eq!(answer, (input + 15).to_string());
        // Coalescing may fold hops together, but every hop is accounted for exactly once:
        // the entry and every call spawned (here, owned) is completed by one report, unless
        // its report was folded into its parent's, where it is neither spawned nor completed.
        let spawned: Vec<_> = reports
            .iter()
            .flat_map(|r| match &r.outcome {
                Outcome::Done(e) => e.spawned.clone(),
                Outcome::Failed(_) => Vec::new(),
            })
            .collect();
        assert!(spawned.iter().all(|c| c.owned), "every hop ran here");
        let mut spawned: Vec<_> = spawned.into_iter().map(|c| c.call).collect();
        let mut completed: Vec<_> = reports.iter().map(|r| r.call).collect();
        assert_eq!(completed.remove(0), reports[0].exec.root_call());
        spawned.sort();
        completed.sort();
        assert_eq!(spawned, completed);
    }
    // Every run is traced, the entry as dispatched, its successors as started here.
    bounded(10, async {
        while h.traces.len() < 10 {
            let _ = h.next_message().await;
        }
    })
    .await;
    let mut grains: Vec<(String, bool)> = h
        .traces
        .iter()
        .map(|t| (t.grain.to_string(), t.dispatched))
        .collect();
    grains.sort();
    grains.dedup();
    let want: Vec<(String, bool)> = ["s1", "s2", "s3", "s4", "s5"]
        .iter()
        .map(|g| (g.to_string(), *g == "s1"))
        .collect();
    assert_eq!(grains, want);
    assert!(h.traces.iter().all(|t| t.error.is_none()));
    // Each run names the call it emitted, itself traced; the last returns the answer, and the
    // values in and out are kept whole (they are short).
    for t in &h.traces {
        let last = t.grain.as_str() == "s5";
        assert_eq!(t.emitted.len(), usize::from(!last), "{t:?}");
        assert_eq!(t.output.is_some(), last, "{t:?}");
        for child in &t.emitted {
            assert!(
                h.traces
                    .iter()
                    .any(|n| n.exec == t.exec && n.call == *child),
                "{child:?}, emitted by {t:?}, is not traced"
            );
        }
        assert!(!t.input.cut && !t.output.as_ref().is_some_and(|o| o.cut));
    }
    let values = |grain: &str, value: fn(&RunTrace) -> Vec<u8>| {
        let mut v: Vec<String> = h
            .traces
            .iter()
            .filter(|t| t.grain.as_str() == grain)
            .map(|t| String::from_utf8(value(t)).expect("a number"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(values("s1", |t| t.input.head.to_vec()), ["0", "100"]);
    let answers = values("s5", |t| t.output.as_ref().expect("returned").head.to_vec());
    assert_eq!(answers, ["115", "15"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_chain_runs_ahead_of_the_gateways_acks() {
    let dir = TempDir::new("driver-noack");
    let chain = app(dir.path(), "chain", &["s1", "s2", "s3", "s4", "s5"], 1);
    let mut h = Harness::start(LbConfig::default(), vec![(name("chain"), chain)], dir).await;
    let exec = ExecId::new(1, 99);
    let call = CallSpec {
        exec,
        call: exec.root_call(),
        attempt: Attempt(1),
        app: name("chain"),
        grain: common::grain("s1"),
        input: Payload::from("0"),
        cont: Cont::Client,
        depth_left: 16,
        exec_ref: String::new(),
        traceparent: Default::default(),
    };
    let incarnation = h.incarnation;
    h.send(ToWorker::Dispatch {
        incarnation,
        call,
        reason: Reason::First,
    });
    // Nothing is acked, yet all five grains run: no local hop waits for the gateway.
    bounded(60, async {
        while h.traces.len() < 5 {
            let _ = h.next_message().await;
        }
    })
    .await;
    let mut grains: Vec<String> = h.traces.iter().map(|t| t.grain.to_string()).collect();
    grains.sort();
    assert_eq!(grains, ["s1", "s2", "s3", "s4", "s5"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_local_hop_cost() {
    let dir = TempDir::new("driver-hop");
    let chain = app(
        dir.path(),
        "chain",
        &["s1", "s2", "s3", "s4", "s5"],
        1_000_000,
    );
    let whole = app(dir.path(), "whole", &["whole"], 1_000_000);
    let bundles = vec![(name("chain"), chain), (name("whole"), whole)];
    let mut h = Harness::start(LbConfig::default(), bundles, dir).await;
    let runs: u64 = std::env::var("SAND_HOP_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let chain = measure(&mut h, "chain", "s1", runs).await;
    let whole = measure(&mut h, "whole", "whole", runs).await;
    let hop = chain.saturating_sub(whole) / 4;
    eprintln!(
        "warm local hop: chain {:?}, whole {:?}, per hop {:?} (medians of {runs})",
        chain, whole, hop
    );
    h.stop().await;
}

/// The answer of `app`'s one-grain `whole` call, or its error.
async fn whole(h: &mut Harness, app: &str) -> Result<String, GrainError> {
    bounded(60, h.run(app, "whole", 1)).await.0
}

/// The attack on the worker alone (as if a gateway had let it through): an interpreter
/// the worker's policy does not list, or network the app grants itself, is a grain error that
/// names the policy and the flag, and nothing of the app runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_the_workers_policy_refuses_fails_with_a_grain_error() {
    let dir = TempDir::new("driver-policy");
    // An interpreter that works (a link to the real one), at a path the operator never allowed.
    let elsewhere = dir.path().join("elsewhere").join("bin");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    std::os::unix::fs::symlink(PYTHON, elsewhere.join("python3")).expect("symlink");
    let python = format!("python = {:?}\n", elsewhere.join("python3"));
    let bundles = vec![
        (
            name("python"),
            app_with(dir.path(), "python", &["whole"], 1, &python),
        ),
        (
            name("network"),
            app_with(dir.path(), "network", &["whole"], 1, "network = true\n"),
        ),
    ];
    let mut h = Harness::start(LbConfig::default(), bundles, dir).await;
    let e = whole(&mut h, "python").await.expect_err("the app ran");
    assert!(
        e.message.contains("policy") && e.message.contains("--python"),
        "{e:?}"
    );
    let e = whole(&mut h, "network").await.expect_err("the app ran");
    assert!(
        e.message.contains("policy") && e.message.contains("--allow-network network"),
        "{e:?}"
    );
    h.stop().await;
}

/// A digest from the gateway names a directory only if it is a digest: `../x` would unpack the
/// bundle outside the app's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_digest_that_is_not_lowercase_hex_is_refused() {
    let dir = TempDir::new("driver-digest");
    let apps = dir.path().join("data").join("apps");
    let mut evil = app(dir.path(), "evil", &["whole"], 1);
    evil.digest = "../x".into();
    let mut h = Harness::start(LbConfig::default(), vec![(name("evil"), evil)], dir).await;
    let e = whole(&mut h, "evil").await.expect_err("the app ran");
    assert!(e.message.contains("digest"), "{e:?}");
    assert!(
        !apps.join("x").exists(),
        "unpacked outside the app's directory"
    );
    h.stop().await;
}

/// Bundles are the apps' code: no other local user may list or read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_not_readable_by_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("driver-private");
    let apps = dir.path().join("data").join("apps");
    let one = app(dir.path(), "one", &["whole"], 1);
    let mut h = Harness::start(LbConfig::default(), vec![(name("one"), one)], dir).await;
    assert_eq!(whole(&mut h, "one").await.expect("runs"), "16");
    let mode = std::fs::metadata(&apps)
        .expect("apps dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", apps.display());
    h.stop().await;
}

/// A new version of an app replaces the old one on disk once the old version's host is gone;
/// the version in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_bundle_version_is_removed_once_its_host_is_retired() {
    let dir = TempDir::new("driver-versions");
    let versions = dir.path().join("data").join("apps").join("app");
    let v1 = app_with(dir.path(), "app", &["whole"], 1, "# version 1\n");
    let v2 = app_with(dir.path(), "app", &["whole"], 1, "# version 2\n");
    let (old, new) = (versions.join(&v1.digest), versions.join(&v2.digest));
    let mut h = Harness::start(LbConfig::default(), vec![(name("app"), v1)], dir).await;
    assert_eq!(whole(&mut h, "app").await.expect("v1 runs"), "16");
    assert!(old.is_dir());
    h.bundles = vec![(name("app"), v2)];
    h.send(ServiceToWorker::AppChanged { app: name("app") });
    assert_eq!(whole(&mut h, "app").await.expect("v2 runs"), "16");
    bounded(20, async {
        while old.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(new.is_dir(), "the version in use was removed");
    assert_eq!(whole(&mut h, "app").await.expect("v2 still runs"), "16");
    h.stop().await;
}

/// An app may ship its interpreter in its bundle (a relative `python`): no policy needs to
/// allow it, and its python grains run with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interpreter_shipped_in_the_bundle_runs_the_python_grains() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("driver-bundled");
    let marker = dir.path().join("ran-the-bundled-interpreter");
    let bin = dir.path().join("shipped").join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let script = format!(
        "#!/bin/sh\necho ran > {:?}\nexec {PYTHON} \"$@\"\n",
        marker.display().to_string()
    );
    std::fs::write(bin.join("py"), script).expect("write the interpreter");
    std::fs::set_permissions(bin.join("py"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let shipped = app_with(
        dir.path(),
        "shipped",
        &["whole"],
        1,
        "python = \"bin/py\"\n",
    );
    let mut h = Harness::start(LbConfig::default(), vec![(name("shipped"), shipped)], dir).await;
    assert_eq!(whole(&mut h, "shipped").await.expect("runs"), "16");
    assert!(marker.exists(), "the grain ran with another interpreter");
    h.stop().await;
}
