//! End to end: real `sand` processes (a gateway and workers over QUIC on loopback, grains in
//! sandboxes), driven through the HTTP API, with workers and the gateway killed by SIGKILL.
//!
//! Each test makes its own cluster in a temporary directory and kills every process it started
//! when it ends, also when it fails.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sand_testkit::cluster::{self, Cluster, ClusterSpec, Host};
use sand_testkit::contract;
use sand_testkit::proc;
use sand_testkit::process::{self, Killed};
use serde_json::Value;

const SAND: &str = env!("CARGO_BIN_EXE_sand");

/// How long a process asked to stop (SIGTERM, SIGINT) may take.
const STOP_MAX: Duration = Duration::from_secs(30);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The cluster every test starts unless it says otherwise: `workers` workers, and a gateway
/// that declares a silent worker dead after 1.5 s.
fn spec(workers: u32) -> ClusterSpec {
    ClusterSpec {
        workers,
        failure_timeout: Duration::from_millis(1500),
        ..ClusterSpec::default()
    }
}

/// A cluster of `workers` workers, with `apps` deployed.
fn start(workers: u32, apps: &[&str]) -> Cluster {
    start_spec(spec(workers), apps)
}

/// A cluster as `spec` says, with `apps` deployed.
fn start_spec(spec: ClusterSpec, apps: &[&str]) -> Cluster {
    let cluster = Cluster::start(Path::new(SAND), spec).unwrap_or_else(|e| panic!("{e:#}"));
    for app in apps {
        cluster
            .deploy(&repo(app))
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    cluster
}

/// The API calls the tests make on a cluster.
trait Api {
    /// Invokes `app` with `input`; `query` is `""` or `?...`.
    fn invoke(&self, app: &str, input: &str, query: &str) -> (u16, Value);
    /// Polls an execution until it ends; returns its status body.
    fn wait_for(&self, exec: &str, within: Duration) -> Value;
}

impl Api for Cluster {
    fn invoke(&self, app: &str, input: &str, query: &str) -> (u16, Value) {
        post(
            &format!("{}/v1/apps/{app}/invoke{query}", self.http()),
            input,
            None,
        )
    }

    fn wait_for(&self, exec: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (code, body) = get(&format!("{}/v1/executions/{exec}", self.http()));
            if code == 200 && body["status"] != "running" {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "execution {exec} did not end: {code} {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The trace entry of `grain`'s call in an ended execution, once its worker has reported it
/// (traces come in batches, best effort, and may land after the answer).
fn eventually_traced(cluster: &Cluster, exec: &str, grain: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = cluster.wait_for(exec, Duration::from_secs(5));
        let calls = status["calls"].as_array().cloned().unwrap_or_default();
        let ran = calls
            .into_iter()
            .find(|c| c["grain"] == grain && c["started_ms"].is_u64());
        match ran {
            Some(call) => return call,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            None => panic!("no trace of {grain} in {status}"),
        }
    }
}

/// Runs a short `sand` command that must succeed; returns its stdout.
fn sand(args: &[&str]) -> String {
    process::run(Path::new(SAND), args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A command whose reader went away (`sand check | head`) ends quietly with the status a shell
/// gives SIGPIPE, instead of panicking on its next line.
#[test]
fn a_command_whose_reader_is_gone_ends_quietly() {
    for args in [
        &["check", "--worker-crashes", "0", "--suspicions", "0"][..],
        &["fuzz", "--schedules", "1", "--seed", "1"][..],
    ] {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let out = Command::new(SAND)
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run sand");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "sand {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "sand {args:?}: {stderr}");
    }
}

/// The gateway refuses a failure timeout its workers' heartbeats cannot honour, with a clear
/// error, and neither daemon takes a deliberate protocol bug: those are the checkers' alone.
#[test]
fn the_daemons_refuse_unsafe_settings_and_mutations() {
    let refused = |args: &[&str]| {
        let out = Command::new(SAND).args(args).output().expect("run sand");
        assert!(!out.status.success(), "sand {args:?} ran");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = refused(&["gateway", "--failure-timeout-ms", "300"]);
    assert!(stderr.contains("500"), "{stderr}");
    for args in [
        &["gateway", "--mutation", "rerun-started"][..],
        &["worker", "--id", "1", "--mutation", "rerun-started"][..],
    ] {
        let stderr = refused(args);
        assert!(
            stderr.contains("unexpected argument '--mutation'"),
            "{stderr}"
        );
    }
}

/// At a 1 s failure timeout, idle workers are never suspected: they heartbeat as often as the
/// gateway's `Welcome` says (every 200 ms), not on a clock of their own. (A gateway at 1 s with
/// workers heartbeating every 1 s fenced every idle worker once a second and never started one
/// call: `shared/repro/stuck-call`.)
#[test]
fn idle_workers_are_not_suspected_at_a_one_second_failure_timeout() {
    let cluster = start_spec(
        ClusterSpec {
            failure_timeout: Duration::from_millis(1000),
            ..spec(2)
        },
        &["examples/pipeline"],
    );
    let workers = || {
        let (_, body) = get(&format!("{}/v1/workers", cluster.http()));
        let rows = body["workers"].as_array().cloned().unwrap_or_default();
        let view: Vec<(u64, u64, bool, bool)> = rows
            .iter()
            .map(|w| {
                let n = |k: &str| w[k].as_u64().unwrap_or(u64::MAX);
                (
                    n("id"),
                    n("incarnation"),
                    w["connected"] == true,
                    w["dead"] == true,
                )
            })
            .collect();
        view
    };
    let before = workers();
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before.iter().all(|w| w.2 && !w.3), "{before:?}");
    std::thread::sleep(Duration::from_secs(5)); // Five failure timeouts, idle.
    assert_eq!(workers(), before, "an idle worker was suspected");
    let (code, body) = cluster.invoke("pipeline", "3", "");
    assert_eq!(
        (code, &body["output"]),
        (200, &serde_json::json!(49)),
        "{body}"
    );
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

/// The status and JSON body of the answer to a `method` request, checked against the API's
/// OpenAPI document: every answer these tests see is one the document describes.
fn answer(method: &str, r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(r) | Err(ureq::Error::Status(_, r)) => {
            let code = r.status();
            let path = url_path(r.get_url());
            let media = r.content_type().to_owned();
            let text = r.into_string().expect("a body");
            let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
            contract::check(method, &path, code, Some(&media), &body);
            (code, body)
        }
        Err(e) => panic!("no answer: {e}"),
    }
}

/// The path of `url` (`http://host:port/path?query`).
fn url_path(url: &str) -> String {
    let after_host = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = after_host.find('/').map_or("/", |i| &after_host[i..]);
    path.split(['?', '#']).next().unwrap_or(path).to_owned()
}

fn get(url: &str) -> (u16, Value) {
    answer("GET", agent().get(url).call())
}

fn post(url: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = agent().post(url).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Idempotency-Key", k);
    }
    answer("POST", req.send_string(body))
}

#[test]
fn a_chain_and_a_fan_out_answer_correctly_and_are_traced() {
    let cluster = start(2, &["examples/pipeline", "examples/fanout"]);
    for n in [3, 0, -4] {
        let (code, body) = cluster.invoke("pipeline", &n.to_string(), "");
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["output"], (n * 2 + 1) * (n * 2 + 1), "{body}");
    }
    // One spelling of each id: the grain prints `ctx.exec` and `ctx.attempt` (examples/pipeline)
    // as the API and the CLI show them, so any of them pastes into any other.
    let (_, body) = cluster.invoke("pipeline", "1", "");
    let reference = body["execution"].as_str().expect("a reference");
    let double = eventually_traced(&cluster, reference, "double");
    let printed = format!("execution {reference}, attempt {}", double["attempt"]);
    assert!(
        double["stdout"]
            .as_str()
            .is_some_and(|s| s.contains(&printed)),
        "the grain printed other ids than the API's ({printed}): {double}"
    );
    let logs = sand(&["logs", reference, "--gateway", cluster.http()]);
    assert!(
        logs.contains(&format!("double attempt {}", double["attempt"])),
        "{logs}"
    );
    let (code, body) = cluster.invoke("fanout", "\"serverless chained functions\"", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["output"],
        serde_json::json!({"words": 3, "letters": 26})
    );

    // Workers trace their runs in batches, best effort: the last may land after the answer.
    let exec = body["execution"].as_str().expect("an id");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = cluster.wait_for(exec, Duration::from_secs(5));
        if status["calls"].as_array().map_or(0, Vec::len) >= 5 || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let calls = status["calls"].as_array().expect("calls");
    let grains: Vec<&str> = calls.iter().filter_map(|c| c["grain"].as_str()).collect();
    for g in ["split", "measure", "total"] {
        assert!(grains.contains(&g), "{g} missing from the trace: {status}");
    }
    assert_eq!(
        grains.iter().filter(|g| **g == "measure").count(),
        3,
        "{status}"
    );
    assert!(
        calls.iter().any(|c| c["via"] == "local"),
        "no local hop: {status}"
    );

    // What a person reads: the cluster as tables, the execution as a table of its calls, its
    // logs; and the same execution as JSON for a script.
    let gateway = cluster.http();
    let tables = sand(&["status", "--gateway", gateway]);
    for word in [
        "WORKER",
        "connected",
        "APP",
        "pipeline",
        "fanout",
        "EXECUTION",
        exec,
    ] {
        assert!(tables.contains(word), "{word} missing from:\n{tables}");
    }
    let cluster_json: Value =
        serde_json::from_str(&sand(&["status", "--json", "--gateway", gateway]))
            .expect("status --json prints one JSON document");
    assert_eq!(
        cluster_json["executions"][0]["execution"], exec,
        "{cluster_json}"
    );
    assert_eq!(cluster_json["workers"].as_array().map(Vec::len), Some(2));
    let table = sand(&["status", exec, "--gateway", gateway]);
    assert!(table.contains("fanout: succeeded"), "{table}");
    assert!(
        table.contains("GRAIN") && table.contains("measure"),
        "{table}"
    );
    let json: Value =
        serde_json::from_str(&sand(&["status", exec, "--json", "--gateway", gateway]))
            .expect("status --json prints JSON");
    assert_eq!(json["status"], "succeeded", "{json}");
    let logs = sand(&["logs", exec, "--gateway", gateway]);
    assert!(
        logs.contains("total attempt") && logs.contains("output: {"),
        "{logs}"
    );
}

#[test]
fn async_invoke_then_poll_and_idempotent_retries() {
    let cluster = start(1, &["examples/pipeline"]);
    let (code, body) = cluster.invoke("pipeline", "5", "?async=true");
    assert_eq!(code, 202, "{body}");
    let exec = body["execution"].as_str().expect("an id").to_owned();
    let status = cluster.wait_for(&exec, Duration::from_secs(10));
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["output"], 121);

    let url = format!("{}/v1/apps/pipeline/invoke", cluster.http());
    let (c1, first) = post(&url, "7", Some("order-17"));
    let (c2, again) = post(&url, "7", Some("order-17"));
    assert_eq!((c1, c2), (200, 200));
    assert_eq!(first["execution"], again["execution"], "{first} {again}");
    assert_eq!(again["output"], 225);
    let (_, other) = post(&url, "7", Some("order-18"));
    assert_ne!(other["execution"], first["execution"]);
}

#[test]
fn bad_requests_get_json_errors() {
    let cluster = start(1, &["examples/pipeline"]);
    let base = cluster.http();
    let cases: Vec<(&str, (u16, Value))> = vec![
        (
            "bad json",
            post(&format!("{base}/v1/apps/pipeline/invoke"), "{nope", None),
        ),
        (
            "unknown app",
            post(&format!("{base}/v1/apps/nope/invoke"), "1", None),
        ),
        (
            "bad app name",
            post(&format!("{base}/v1/apps/NO%20PE/invoke"), "1", None),
        ),
        (
            "bad query",
            post(
                &format!("{base}/v1/apps/pipeline/invoke?wait=-3"),
                "1",
                None,
            ),
        ),
        (
            "bad execution id",
            get(&format!("{base}/v1/executions/zzz")),
        ),
        (
            "unknown execution",
            get(&format!(
                "{base}/v1/executions/00000000000000ff{}",
                "0".repeat(32)
            )),
        ),
        ("no route", get(&format!("{base}/v2/nothing"))),
        (
            "garbage bundle",
            answer(
                "PUT",
                agent()
                    .put(&format!("{base}/v1/apps/x"))
                    .send_bytes(b"not a tarball"),
            ),
        ),
    ];
    for (what, (code, body)) in cases {
        assert!((400..500).contains(&code), "{what}: {code} {body}");
        assert!(body["error"]["message"].is_string(), "{what}: {body}");
    }
    // An oversize body is refused from its Content-Length, before it is sent.
    let mut tcp =
        std::net::TcpStream::connect(base.trim_start_matches("http://")).expect("connect");
    let head = format!(
        "PUT /v1/apps/big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        20 << 20
    );
    std::io::Write::write_all(&mut tcp, head.as_bytes()).expect("send the head");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reply = Vec::new();
    let _ = std::io::Read::read_to_end(&mut tcp, &mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("\"too_large\""), "{reply}");
    // The cluster still serves.
    assert_eq!(cluster.invoke("pipeline", "1", "").1["output"], 9);
}

/// Starts `n` slow chains asynchronously; returns their ids with the expected outputs.
fn start_slow_chains(cluster: &Cluster, n: i64) -> Vec<(String, i64)> {
    (0..n)
        .map(|i| {
            let (code, body) = cluster.invoke("slow", &i.to_string(), "?async=true");
            assert_eq!(code, 202, "{body}");
            (
                body["execution"].as_str().expect("an id").to_owned(),
                i * 10 + 3,
            )
        })
        .collect()
}

/// The Python client (`sdk/python`), installed by pip as a user would install it, runs its
/// tests against a cluster serving the example apps: none may be skipped.
#[test]
fn the_python_client_installs_and_drives_a_cluster() {
    let cluster = start(1, &["examples/pipeline", "examples/fanout"]);
    let scratch = tempfile::tempdir().expect("a scratch directory");
    // pip builds in the source tree: build from a copy, so the checkout stays clean.
    let (source, site) = (scratch.path().join("src"), scratch.path().join("site"));
    for part in ["pyproject.toml", "README.md", "sand_client", "sand_grain"] {
        let from = repo("sdk/python").join(part);
        if from.is_dir() {
            cluster::copy_tree(&from, &source.join(part)).expect("copy the package");
        } else {
            std::fs::create_dir_all(&source).expect("mkdir");
            std::fs::copy(&from, source.join(part)).expect("copy the package");
        }
    }
    let python = Path::new("/usr/bin/python3");
    let (source, site_dir) = (source.to_str().unwrap(), site.to_str().unwrap());
    process::run(
        python,
        &[
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "--target",
            site_dir,
            source,
        ],
    )
    .unwrap_or_else(|e| panic!("pip install sdk/python: {e:#}"));
    let tests = repo("sdk/python/tests");
    let run = Command::new(python)
        .args([
            "-m",
            "unittest",
            "discover",
            "-v",
            "-s",
            tests.to_str().unwrap(),
        ])
        .current_dir(&site)
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SAND_GATEWAY", cluster.http())
        .env("SAND_CLIENT_LIVE", "1")
        .env_remove("SAND_TOKEN")
        .output()
        .expect("run the Python client's tests");
    let report = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{report}");
    assert!(
        report.contains("\nOK\n") && !report.contains("skipped"),
        "{report}"
    );
    assert!(
        report.contains("test_a_chain_and_a_fan_out_answer"),
        "{report}"
    );
}

/// The Rust example app (`examples/fanout-rust`), deployed as its README says with the binaries
/// `cargo test --workspace` builds, answers as the Python `fanout` does.
#[test]
fn the_rust_example_app_answers_like_the_python_one() {
    let app = tempfile::tempdir().expect("a scratch directory");
    std::fs::copy(
        repo("examples/fanout-rust/sand.toml"),
        app.path().join("sand.toml"),
    )
    .expect("copy the manifest");
    std::fs::create_dir(app.path().join("bin")).expect("mkdir bin");
    for grain in ["fanout-split", "fanout-measure", "fanout-total"] {
        let built = Path::new(SAND).with_file_name(grain);
        assert!(
            built.exists(),
            "{} is not built: cargo build --release -p sand-example-fanout-rust (cargo test \
             --workspace --release builds it)",
            built.display()
        );
        std::fs::copy(&built, app.path().join("bin").join(grain)).expect("copy a grain");
    }
    let cluster = start(1, &[]);
    sand(&[
        "deploy",
        app.path().to_str().unwrap(),
        "--gateway",
        cluster.http(),
    ]);
    let (code, body) = cluster.invoke("fanout-rust", "\"serverless chained functions\"", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["output"],
        serde_json::json!({"words": 3, "letters": 26})
    );
    let (code, body) = cluster.invoke("fanout-rust", "\"\"", "");
    assert_eq!(
        (code, &body["output"]),
        (200, &serde_json::json!({"words": 0, "letters": 0})),
        "{body}"
    );
    let (code, body) = cluster.invoke("fanout-rust", "7", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["error"]["kind"], "raised", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("split takes a JSON string"),
        "{body}"
    );
}

/// Runs `sand args` in the background; `ended` waits for it.
fn spawn_sand(args: &[&str]) -> std::process::Child {
    Command::new(SAND)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sand")
}

/// Waits `within` at most for a command started by `spawn_sand` to succeed; returns its stdout.
fn ended(mut child: std::process::Child, within: Duration) -> String {
    let deadline = Instant::now() + within;
    while child.try_wait().expect("wait for sand").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap sand");
            panic!(
                "still running after {within:?}; it printed:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("reap sand");
    assert!(out.status.success(), "{:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_worker_killed_mid_chain_loses_nothing() {
    let mut cluster = start(2, &["tests/apps/slow"]);
    let chains = start_slow_chains(&cluster, 12);
    // A person follows the first chain while it runs, through the kill.
    let (first, gateway) = (chains[0].0.as_str(), cluster.http());
    let follow = spawn_sand(&["logs", first, "--follow", "--gateway", gateway]);
    let watch = spawn_sand(&["status", first, "--watch", "--gateway", gateway]);
    std::thread::sleep(Duration::from_millis(250));
    cluster.kill(Host::Worker(1)).expect("kill worker 1");
    let mut recovered = 0;
    for (exec, want) in &chains {
        let status = cluster.wait_for(exec, Duration::from_secs(30));
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(status["output"], *want, "{status}");
        let calls = status["calls"].as_array().expect("calls");
        recovered += calls.iter().filter(|c| c["recovery"] == true).count();
    }
    assert!(
        recovered > 0,
        "no call was recovered: did worker 1 own none?"
    );
    let followed = ended(follow, Duration::from_secs(10));
    assert!(
        followed.starts_with(&format!("execution {first} (slow: running)")),
        "{followed}"
    );
    assert!(
        followed.contains("slow: succeeded") && followed.contains("output: 3"),
        "{followed}"
    );
    let watched = ended(watch, Duration::from_secs(10));
    assert!(watched.contains("slow: running"), "{watched}");
    assert!(watched.trim_end().ends_with("output: 3"), "{watched}");
}

#[test]
fn a_gateway_killed_and_restarted_finishes_every_accepted_execution() {
    let mut cluster = start(2, &["tests/apps/slow"]);
    let chains = start_slow_chains(&cluster, 10);
    std::thread::sleep(Duration::from_millis(200));
    cluster.kill(Host::Gateway).expect("kill the gateway");
    std::thread::sleep(Duration::from_millis(300));
    cluster
        .restart(Host::Gateway)
        .expect("start the gateway again");
    for (exec, want) in &chains {
        let status = cluster.wait_for(exec, Duration::from_secs(30));
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(status["output"], *want, "{status}");
    }
}

#[test]
fn an_exec_grain_runs_in_its_sandbox_and_chains_to_python() {
    let cluster = start(1, &["examples/shell"]);
    // The shell script reads its input on stdin, writes its result on stdout, and runs in the
    // app's sandbox, whose hostname is the app's name.
    let (code, body) = cluster.invoke("shell", "\"hello sand\"", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["output"],
        serde_json::json!({"text": "HELLO SAND", "letters": 9, "host": "shell"}),
        "{body}"
    );
    // Its own error document, on a non-zero exit, is the execution's error.
    let (code, body) = cluster.invoke("shell", "[1, 2]", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["error"]["kind"], "raised", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("shout takes a JSON string"), "{body}");
}

#[test]
fn a_memory_hog_is_killed_with_a_clear_error() {
    let cluster = start(1, &["tests/apps/hog"]);
    let (code, body) = cluster.invoke("hog", "8", "");
    assert_eq!(
        (code, &body["output"]),
        (200, &serde_json::json!(8)),
        "{body}"
    );
    let (code, body) = cluster.invoke("hog", "300", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["error"]["kind"], "out_of_memory", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("out of memory") && message.contains("64 MiB"),
        "{message}"
    );
    // The app's zygote is replaced and serves again.
    assert_eq!(cluster.invoke("hog", "8", "").1["output"], 8);
}

#[test]
fn a_gateway_with_a_token_refuses_requests_without_it() {
    let cluster = start_spec(
        ClusterSpec {
            token: Some("s3cret".into()),
            ..spec(0)
        },
        &["examples/pipeline"],
    );
    let url = format!("{}/v1/apps", cluster.http());
    let (code, body) = get(&url);
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = answer(
        "GET",
        agent().get(&url).set("Authorization", "Bearer nope").call(),
    );
    assert_eq!(wrong.0, 401);
    let (code, body) = answer(
        "GET",
        agent()
            .get(&url)
            .set("Authorization", "Bearer s3cret")
            .call(),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["apps"][0]["app"], "pipeline",
        "deployed with the token: {body}"
    );
    assert_eq!(
        get(&format!("{}/healthz", cluster.http())).0,
        200,
        "liveness needs no token"
    );
}

/// Sends `head` (a request head without its final blank line) and `body` over a new
/// connection to `http` (`http://ADDR`); returns the status and the JSON body of the reply.
fn raw(http: &str, head: &str, body: &str) -> (u16, Value) {
    use std::io::{Read as _, Write as _};
    let mut tcp =
        std::net::TcpStream::connect(http.trim_start_matches("http://")).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let request = format!(
        "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).expect("send");
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).expect("a reply");
    let code = reply
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{reply}"));
    let json = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, serde_json::from_str(json).unwrap_or(Value::Null))
}

/// What a web page could make a browser send is refused: a Host the API does not answer to
/// (DNS rebinding), another site's Origin, and a POST that is not JSON (a cross-site form).
#[test]
fn the_api_refuses_what_a_browser_could_be_tricked_into_sending() {
    let cluster = start(0, &["examples/pipeline"]);
    let port = cluster.http().rsplit(':').next().unwrap().to_owned();
    let invoke = "POST /v1/apps/pipeline/invoke?async=true HTTP/1.1";
    let json = "Content-Type: application/json";
    let refused = [
        ("rebound host", format!("GET /v1/apps HTTP/1.1\r\nHost: evil.example:{port}"), "", 421, "unknown_host"),
        ("rebound host, invoke", format!("{invoke}\r\nHost: evil.example:{port}\r\n{json}"), "1", 421, "unknown_host"),
        ("no host", "GET /v1/apps HTTP/1.0".to_owned(), "", 400, "no_host"),
        ("foreign origin", format!("GET /v1/apps HTTP/1.1\r\nHost: localhost:{port}\r\nOrigin: http://evil.example"), "", 403, "cross_origin"),
        ("null origin", format!("{invoke}\r\nHost: 127.0.0.1:{port}\r\nOrigin: null\r\n{json}"), "1", 403, "cross_origin"),
        ("text/plain post", format!("{invoke}\r\nHost: 127.0.0.1:{port}\r\nContent-Type: text/plain"), "1", 415, "not_json"),
        ("form post", format!("{invoke}\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded"), "1", 415, "not_json"),
        ("untyped post", format!("{invoke}\r\nHost: 127.0.0.1:{port}"), "1", 415, "not_json"),
    ];
    for (what, head, body, code, error) in refused {
        let (got, reply) = raw(cluster.http(), &head, body);
        assert_eq!(
            (got, reply["error"]["code"].as_str()),
            (code, Some(error)),
            "{what}: {reply}"
        );
        assert!(reply["error"]["message"].is_string(), "{what}: {reply}");
    }
    // The same requests, as the API's own pages or clients send them, are served.
    let served = [
        format!(
            "GET /v1/apps HTTP/1.1\r\nHost: localhost:{port}\r\nOrigin: http://localhost:{port}"
        ),
        format!("GET /v1/apps HTTP/1.1\r\nHost: [::1]:{port}"),
        format!(
            "{invoke}\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8"
        ),
    ];
    for head in served {
        let (code, reply) = raw(cluster.http(), &head, "1");
        assert!(code == 200 || code == 202, "{head}: {code} {reply}");
    }
}

/// Makes a CA and a gateway certificate for `localhost` in `dir/certs`.
fn gateway_certs(dir: &Path) -> PathBuf {
    cluster::certificates(Path::new(SAND), dir, 0).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Starts `sand gateway` with `args` and a store and certificates in `dir`; returns it with
/// its first line, or, if it exits within 20 s, its exit status and stderr.
fn try_gateway(dir: &Path, args: &[&str], token: Option<&str>) -> Result<(Killed, String), String> {
    let log = dir.join("gateway.log");
    let mut cmd = Command::new(SAND);
    cmd.args(["gateway", "--listen", "127.0.0.1:0"])
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("gateway"))
        .arg("--certs")
        .arg(dir.join("certs"))
        .env_remove("SAND_TOKEN")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("a log file"));
    if let Some(t) = token {
        cmd.env("SAND_TOKEN", t);
    }
    let mut child = Killed(cmd.spawn().expect("start the gateway"));
    let stdout = child.0.stdout.take().expect("stdout");
    match process::first_line(stdout, Duration::from_secs(20)) {
        Ok(line) if !line.is_empty() => Ok((child, line)),
        _ => {
            let _ = child.0.kill();
            let status = child.0.wait().expect("reap the gateway");
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            Err(format!("{status}: {stderr}"))
        }
    }
}

/// Starts `sand gateway` as [`try_gateway`] does, expecting it to refuse (`why` it must);
/// returns its stderr.
fn refused_gateway(dir: &Path, args: &[&str], token: Option<&str>, why: &str) -> String {
    match try_gateway(dir, args, token) {
        Ok((_child, line)) => panic!("{why}: {line}"),
        Err(stderr) => stderr,
    }
}

/// A gateway other hosts can reach does not start without a token unless told
/// `--insecure-no-auth`; a token on the command line is refused (every local user reads argv).
#[test]
fn a_gateway_reachable_from_other_hosts_wants_a_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    gateway_certs(dir.path());
    let refused = refused_gateway(
        dir.path(),
        &["--http", "0.0.0.0:0"],
        None,
        "a gateway open to every host without a token started",
    );
    assert!(
        refused.contains("--insecure-no-auth") && refused.contains("0.0.0.0"),
        "{refused}"
    );
    let argv = refused_gateway(
        dir.path(),
        &["--http", "127.0.0.1:0", "--token", "s3cret"],
        None,
        "a gateway took its token on the command line",
    );
    assert!(
        argv.contains("--token-file") && argv.contains("SAND_TOKEN"),
        "{argv}"
    );
    let exposed = dir.path().join("exposed-token");
    std::fs::write(&exposed, "s3cret").expect("write a token file");
    std::fs::set_permissions(
        &exposed,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod 644");
    let exposed = refused_gateway(
        dir.path(),
        &["--token-file", exposed.to_str().unwrap()],
        None,
        "a gateway took a token other users can read",
    );
    assert!(exposed.contains("chmod 600"), "{exposed}");
    for (args, token) in [
        (&["--http", "0.0.0.0:0", "--insecure-no-auth"][..], None),
        (&["--http", "0.0.0.0:0"][..], Some("s3cret")),
    ] {
        let (_child, line) =
            try_gateway(dir.path(), args, token).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(line.contains("HTTP on http://0.0.0.0:"), "{line}");
    }
}

/// Over TLS, the API serves a client that trusts the cluster CA, and no other.
#[test]
fn the_api_over_tls_serves_a_client_that_trusts_its_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = gateway_certs(dir.path());
    let (cert, key) = (certs.join("gateway.crt"), certs.join("gateway.key"));
    let args = [
        "--http",
        "127.0.0.1:0",
        "--http-tls-cert",
        cert.to_str().unwrap(),
        "--http-tls-key",
        key.to_str().unwrap(),
    ];
    let (_gateway, line) = try_gateway(dir.path(), &args, None).expect("a TLS gateway");
    let port = line
        .split("HTTP on https://127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no https address in {line:?}"))
        .to_owned();
    let url = format!("https://localhost:{port}");
    let ca = certs.join("ca.crt");
    let status = |extra: &[&str]| {
        Command::new(SAND)
            .args(["status", "--gateway", &url])
            .args(extra)
            .env_remove("SAND_TOKEN")
            .output()
            .expect("run sand status")
    };
    let trusted = status(&["--ca", ca.to_str().unwrap()]);
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert!(String::from_utf8_lossy(&trusted.stdout).contains("WORKER"));
    let untrusted = status(&[]);
    assert!(
        !untrusted.status.success(),
        "a client that does not trust the CA was served"
    );
    let plain = Command::new(SAND)
        .args(["status", "--gateway", &format!("http://localhost:{port}")])
        .output()
        .expect("run sand status");
    assert!(
        !plain.status.success(),
        "plain HTTP was served on the TLS port"
    );
}

/// The sandbox holders a worker has running: its children started as `sand __sandbox-init`.
fn sandboxes_of(worker: u32) -> usize {
    proc::all()
        .into_iter()
        .filter(|&pid| {
            proc::parent(pid) == Some(worker)
                && proc::cmdline(pid)
                    .iter()
                    .any(|a| a.contains("__sandbox-init"))
        })
        .count()
}

#[test]
fn an_idle_app_sandbox_is_torn_down_and_made_again_on_demand() {
    let cluster = start_spec(
        ClusterSpec {
            idle_seconds: Some(1),
            ..spec(1)
        },
        &["examples/pipeline"],
    );
    let worker = cluster.worker_pid(1).expect("worker 1");
    assert_eq!(cluster.invoke("pipeline", "1", "").1["output"], 9);
    assert_eq!(
        sandboxes_of(worker),
        1,
        "one sandbox for the app while it is used"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while sandboxes_of(worker) > 0 {
        assert!(
            Instant::now() < deadline,
            "the idle sandbox was not torn down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cluster.invoke("pipeline", "2", "").1["output"], 25);
    assert_eq!(sandboxes_of(worker), 1);
}

/// The cgroups of the sandboxes process `pid` made (`<app>-<pid>-<n>` under its own cgroup's
/// `sand/`), in the memory hierarchy (cgroup v1) or the unified one (v2).
fn sandbox_cgroups(pid: u32) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for (id, controllers, path) in proc::cgroups(pid) {
        let root = if id == 0 && controllers.is_empty() {
            PathBuf::from("/sys/fs/cgroup")
        } else if controllers.iter().any(|c| c == "memory") {
            PathBuf::from("/sys/fs/cgroup/memory")
        } else {
            continue;
        };
        let parent = root.join(path.trim_start_matches('/')).join("sand");
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        let mark = format!("-{pid}-");
        found.extend(
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().contains(&mark))
                .map(|e| e.path()),
        );
    }
    found
}

/// Starts `sand dev` with the pipeline app and its data in `dir`; returns it, the rest of its
/// output and its API's URL.
fn start_dev(dir: &Path) -> (Killed, BufReader<std::process::ChildStdout>, String) {
    start_dev_over(dir, "quic")
}

/// The same, with its worker reaching the gateway over `transport` (`quic` or `tcp`).
fn start_dev_over(
    dir: &Path,
    transport: &str,
) -> (Killed, BufReader<std::process::ChildStdout>, String) {
    let mut dev = Killed(
        Command::new(SAND)
            .args(["dev", repo("examples/pipeline").to_str().unwrap()])
            .args([
                "--http",
                "127.0.0.1:0",
                "--transport",
                transport,
                "--data-dir",
            ])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sand dev"),
    );
    let mut out = BufReader::new(dev.0.stdout.take().expect("stdout"));
    let mut before = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).expect("sand dev's output") == 0 {
            panic!("sand dev ended before it served: {before}");
        }
        // "sand dev: gateway at http://ADDR, one worker; Ctrl-C stops"
        if let Some(url) = line
            .split("gateway at ")
            .nth(1)
            .and_then(|s| s.split(',').next())
        {
            return (dev, out, url.to_owned());
        }
        before.push_str(&line);
    }
}

/// `sand dev` makes a token only its user can read, wants it on every `/v1` request, never
/// prints it, and the CLI finds it (`.sand/token`, `--token-file`, SAND_TOKEN).
#[test]
fn sand_dev_wants_its_private_token_and_the_cli_finds_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let cwd = tempfile::tempdir().expect("temp dir");
    let data = cwd.path().join(".sand");
    let (mut dev, mut out, url) = start_dev(&data);
    let token_file = data.join("token");
    let mode = std::fs::metadata(&token_file)
        .expect("a token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the token file's mode: {mode:o}");
    let token = std::fs::read_to_string(&token_file).expect("the token");
    let token = token.trim();
    assert_eq!(token.len(), 64, "256 bits in hex: {token}");

    let invoke = format!("{url}/v1/apps/pipeline/invoke");
    let (code, body) = post(&invoke, "1", None);
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    let with = |t: &str| {
        answer(
            "POST",
            agent()
                .post(&invoke)
                .set("Content-Type", "application/json")
                .set("Authorization", &format!("Bearer {t}"))
                .send_string("1"),
        )
    };
    let (code, body) = with(&format!("{}x", &token[..63]));
    assert_eq!(code, 401, "a wrong token was taken: {body}");
    let (code, body) = with(token);
    assert_eq!((code, &body["output"]), (200, &Value::from(9)), "{body}");

    let cli = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(SAND);
        cmd.args(["invoke", "pipeline", "2", "--gateway", &url])
            .args(args)
            .current_dir(cwd.path());
        cmd.env_remove("SAND_TOKEN");
        if let Some(t) = env {
            cmd.env("SAND_TOKEN", t);
        }
        let out = cmd.output().expect("run sand invoke");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(cli(&[], None).1, "25", "the CLI reads .sand/token");
    assert_eq!(
        cli(&["--token-file", token_file.to_str().unwrap()], None).1,
        "25"
    );
    assert_eq!(cli(&[], Some(token)).1, "25", "the CLI reads SAND_TOKEN");
    let (ok, _, stderr) = cli(&[], Some("wrong"));
    assert!(!ok && stderr.contains("401"), "{stderr}");
    let (ok, _, stderr) = cli(&["--token", token], None);
    assert!(!ok && stderr.contains("visible to every user"), "{stderr}");

    // Not printed: stdout may end up in logs other users read.
    let _ = process::stop(&mut dev.0, Signal::SIGTERM, STOP_MAX);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    assert!(!rest.contains(token), "sand dev printed its token: {rest}");
    let curl = format!("Authorization: Bearer $(cat {})", token_file.display());
    assert!(
        rest.contains(&curl),
        "no curl line with the token file: {rest}"
    );
    let viewer = format!("/ui#token=$(cat {})", token_file.display());
    assert!(
        rest.contains(&viewer),
        "no viewer line with the token file: {rest}"
    );
}

/// A gateway and a worker over TCP with TLS 1.3 (`--transport tcp`, for networks that block
/// UDP) serve a chain end to end.
#[test]
fn a_gateway_and_a_worker_over_tcp_serve_a_call() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join(".sand");
    let (mut dev, _out, url) = start_dev_over(&data, "tcp");
    let token = std::fs::read_to_string(data.join("token")).expect("the token");
    let (code, body) = answer(
        "POST",
        agent()
            .post(&format!("{url}/v1/apps/pipeline/invoke"))
            .set("Content-Type", "application/json")
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .send_string("3"),
    );
    assert_eq!((code, &body["output"]), (200, &Value::from(49)), "{body}");
    let _ = process::stop(&mut dev.0, Signal::SIGTERM, STOP_MAX);
}

/// `sand dev`, the README's first command, stops on Ctrl-C and on SIGTERM alike, and leaves no
/// sandbox behind.
#[test]
fn sand_dev_stops_on_sigint_and_sigterm_and_removes_its_sandboxes() {
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut dev, mut out, url) = start_dev(dir.path());
        let token = std::fs::read_to_string(dir.path().join("token")).expect("the dev token");
        let (code, body) = answer(
            "POST",
            agent()
                .post(&format!("{url}/v1/apps/pipeline/invoke"))
                .set("Content-Type", "application/json")
                .set("Authorization", &format!("Bearer {}", token.trim()))
                .send_string("1"),
        );
        assert_eq!((code, &body["output"]), (200, &Value::from(9)), "{body}");
        let cgroups = sandbox_cgroups(dev.0.id());
        assert_eq!(cgroups.len(), 1, "one sandbox for the app: {cgroups:?}");
        let status =
            process::stop(&mut dev.0, signal, STOP_MAX).unwrap_or_else(|e| panic!("{e:#}"));
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        assert!(status.success(), "{signal}: {status}, output {rest}");
        assert!(rest.contains(&format!("{signal}, stopping")), "{rest}");
        for cgroup in cgroups {
            assert!(!cgroup.exists(), "{signal} left {}", cgroup.display());
        }
    }
}

/// A worker asked to stop removes its sandboxes before it exits; the gateway exits cleanly.
#[test]
fn a_worker_and_a_gateway_stop_cleanly_on_sigterm() {
    let mut cluster = start(1, &["examples/pipeline"]);
    assert_eq!(cluster.invoke("pipeline", "1", "").1["output"], 9);
    let worker = cluster.worker_pid(1).expect("worker 1");
    let cgroups = sandbox_cgroups(worker);
    assert_eq!(cgroups.len(), 1, "one sandbox for the app: {cgroups:?}");
    let status = cluster
        .stop(Host::Worker(1), Signal::SIGTERM, STOP_MAX)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(status.success(), "the worker: {status}");
    for cgroup in cgroups {
        assert!(!cgroup.exists(), "the worker left {}", cgroup.display());
    }
    let status = cluster
        .stop(Host::Gateway, Signal::SIGTERM, STOP_MAX)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(status.success(), "the gateway: {status}");
}

/// Writes an app `name` with one grain, `grain.py`'s `peek`, and the manifest lines `extra`, in
/// the cluster's directory; returns its directory.
fn write_app(cluster: &Cluster, name: &str, extra: &str, code: &str) -> PathBuf {
    let dir = cluster.dir().join("apps").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = format!(
        "name = \"{name}\"\nentry = \"peek\"\n{extra}\n[grains.peek]\nruntime = \"python\"\n\
         module = \"grain.py\"\nhandler = \"peek\"\n"
    );
    std::fs::write(dir.join("sand.toml"), manifest).unwrap();
    std::fs::write(dir.join("grain.py"), code).unwrap();
    dir
}

/// Deploys `dir`, which the gateway must refuse; returns what `sand deploy` said.
fn deploy_refused(cluster: &Cluster, dir: &Path) -> String {
    let out = Command::new(SAND)
        .args(["deploy", dir.to_str().unwrap(), "--gateway", cluster.http()])
        .output()
        .expect("run sand");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "deployed: {stderr}");
    stderr
}

/// The directory of the one bundle version of `app` on worker 1.
fn bundle_dir(cluster: &Cluster, app: &str) -> PathBuf {
    let apps = cluster.dir().join("worker-1").join("apps").join(app);
    let mut versions: Vec<PathBuf> = std::fs::read_dir(&apps)
        .unwrap_or_else(|e| panic!("{}: {e}", apps.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(versions.len(), 1, "one version of {app}: {versions:?}");
    versions.pop().unwrap()
}

/// The issue's attack: an interpreter path that makes the worker mount a host directory (the
/// bundles of other apps, the gateway's store), or network access an app grants itself. The
/// gateway refuses each at deploy, naming the key, the value and the flag that would allow it.
#[test]
fn an_app_cannot_name_a_host_interpreter_or_grant_itself_network() {
    let cluster = start(1, &["examples/shell"]);
    assert_eq!(cluster.invoke("shell", "\"x\"", "").0, 200);
    let other_bundle = bundle_dir(&cluster, "shell");
    let gateway_dir = cluster.dir().join("gateway");
    for python in [
        other_bundle.join("x").join("python"),
        gateway_dir.join("x").join("python"),
    ] {
        let python = python.display().to_string();
        let app = write_app(&cluster, "evil", &format!("python = {python:?}\n"), "");
        let said = deploy_refused(&cluster, &app);
        assert!(
            said.contains("`python`") && said.contains(&python) && said.contains("--python"),
            "{said}"
        );
    }
    let app = write_app(&cluster, "evil", "network = true\n", "");
    let said = deploy_refused(&cluster, &app);
    assert!(
        said.contains("`network`") && said.contains("--allow-network evil"),
        "{said}"
    );
    let (_, apps) = get(&format!("{}/v1/apps", cluster.http()));
    assert_eq!(apps["apps"].as_array().map(Vec::len), Some(1), "{apps}");
}

/// A sandboxed grain learns no host path of the worker's data directory from its argv,
/// environment or working directory, and cannot list or read another app's bundle, its own
/// bundle's host path, the worker's data directory or the gateway's. (`/proc/self/mountinfo`
/// still shows the host paths of `/app` and `/sand/runtime` as their mounts' roots: a bind
/// mount's root is its path in the source file system.)
#[test]
fn a_sandboxed_grain_sees_no_host_data_directory() {
    let cluster = start(1, &["examples/shell"]);
    assert_eq!(cluster.invoke("shell", "\"x\"", "").0, 200);
    let code = r#"
import os, sys
def peek(paths, ctx):
    reached = {}
    for p in paths:
        try:
            os.listdir(p)
            reached[p] = "listed"
        except NotADirectoryError:
            open(p).read()
            reached[p] = "read"
        except OSError as e:
            reached[p] = type(e).__name__
    return {"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd(), "reached": reached}
"#;
    let app = write_app(&cluster, "peek", "", code);
    sand(&["deploy", app.to_str().unwrap(), "--gateway", cluster.http()]);
    let worker_dir = cluster.dir().join("worker-1");
    let paths: Vec<String> = [
        worker_dir.clone(),
        bundle_dir(&cluster, "shell"),
        bundle_dir(&cluster, "shell").join("sand.toml"),
        worker_dir.join("apps").join("peek"),
        cluster.dir().join("gateway"),
    ]
    .iter()
    .map(|p| p.display().to_string())
    .collect();
    let (code, body) = cluster.invoke("peek", &serde_json::to_string(&paths).unwrap(), "");
    assert_eq!(code, 200, "{body}");
    let out = &body["output"];
    for p in &paths {
        assert_eq!(out["reached"][p], "FileNotFoundError", "{p}: {body}");
    }
    let seen = format!("{} {} {}", out["argv"], out["env"], out["cwd"]);
    let host = cluster.dir().display().to_string();
    assert!(!seen.contains(&host), "{host} seen in {seen}");
}

/// An interpreter outside the system directories, with its installation prefix: the newest
/// under `/root/.pyenv/versions` if there is one, else the system's (which needs no prefix).
fn interpreter_with_prefix() -> (PathBuf, Option<PathBuf>) {
    let versions = std::fs::read_dir("/root/.pyenv/versions")
        .into_iter()
        .flatten();
    let newest = versions
        .flatten()
        .map(|e| e.path().join("bin").join("python3"))
        .filter(|p| p.is_file())
        .max();
    match newest {
        Some(python) => {
            let prefix = python.parent().and_then(Path::parent).map(Path::to_owned);
            (python, prefix)
        }
        None => (PathBuf::from("/usr/bin/python3"), None),
    }
}

/// The operator allows an interpreter with `--python PATH=PREFIX` on the gateway and the
/// worker: an app naming it deploys, and its sandbox mounts PREFIX for it (and nothing the
/// manifest names), so its grains run there; the system's interpreter, no longer allowed, is
/// refused.
#[test]
fn an_interpreter_the_operator_allows_runs_with_the_prefix_the_operator_names() {
    let (python, prefix) = interpreter_with_prefix();
    let cluster = start_spec(
        ClusterSpec {
            python: Some(python.clone()),
            ..spec(1)
        },
        &[],
    );
    let code = "import sys\ndef peek(event, ctx):\n    return sys.executable\n";
    let named = format!("python = {:?}\n", python.display().to_string());
    let app = write_app(&cluster, "allowed", &named, code);
    sand(&["deploy", app.to_str().unwrap(), "--gateway", cluster.http()]);
    let (status, body) = cluster.invoke("allowed", "null", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"], python.display().to_string(), "{body}");
    if prefix.is_some() {
        let system = write_app(&cluster, "system", "python = \"/usr/bin/python3\"\n", code);
        let said = deploy_refused(&cluster, &system);
        assert!(said.contains(&python.display().to_string()), "{said}");
    }
}
