//! End to end: real `sand` processes (a gateway and workers over QUIC on loopback, grains in
//! sandboxes), driven through the HTTP API, with workers and the gateway killed by SIGKILL.
//!
//! Each test makes its own cluster in a temporary directory and kills every process it started
//! when it ends, also when it fails.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SAND: &str = env!("CARGO_BIN_EXE_sand");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A cluster of real processes; killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    gateway: Option<Child>,
    workers: Vec<(u32, Child)>,
    http: String,
    quic: String,
    failure_timeout_ms: u64,
    token: Option<String>,
    idle_seconds: u64,
}

impl Cluster {
    /// A gateway and `workers` workers, with `apps` deployed.
    fn start(workers: u32, apps: &[&str]) -> Self {
        Self::start_with(workers, apps, None)
    }

    /// The same, with a gateway that wants `token` on its API.
    fn start_with(workers: u32, apps: &[&str], token: Option<&str>) -> Self {
        Self::start_full(workers, apps, token, 1500)
    }

    /// The same, with the gateway's failure timeout set.
    fn start_full(
        workers: u32,
        apps: &[&str],
        token: Option<&str>,
        failure_timeout_ms: u64,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        sand(&["cert", "init", "--dir", certs.to_str().unwrap()]);
        sand(&[
            "cert",
            "issue",
            "gateway",
            "--name",
            "localhost",
            "--dir",
            certs.to_str().unwrap(),
        ]);
        for id in 1..=workers {
            let id = id.to_string();
            sand(&[
                "cert",
                "issue",
                "worker",
                "--id",
                &id,
                "--dir",
                certs.to_str().unwrap(),
            ]);
        }
        let mut cluster = Self {
            dir,
            gateway: None,
            workers: Vec::new(),
            http: String::new(),
            quic: "127.0.0.1:0".into(),
            failure_timeout_ms,
            token: token.map(str::to_owned),
            idle_seconds: 300,
        };
        cluster.start_gateway();
        for id in 1..=workers {
            cluster.start_worker(id);
        }
        cluster.wait_for_workers(workers as usize);
        for app in apps {
            let dir = repo(app);
            let mut args = vec!["deploy", dir.to_str().unwrap(), "--gateway", &cluster.http];
            if let Some(t) = &cluster.token {
                args.extend(["--token", t]);
            }
            let out = sand(&args);
            assert!(out.contains("deployed"), "{out}");
        }
        cluster
    }

    fn start_gateway(&mut self) {
        let mut child = Command::new(SAND)
            .args(["gateway", "--http", "127.0.0.1:0", "--listen", &self.quic])
            .args(["--failure-timeout-ms", &self.failure_timeout_ms.to_string()])
            .arg("--data-dir")
            .arg(self.dir.path().join("gateway"))
            .arg("--certs")
            .arg(self.dir.path().join("certs"))
            .args(self.token.iter().flat_map(|t| ["--token", t]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the gateway's first line");
        // "sand gateway: HTTP on http://ADDR, workers dial ADDR"
        let http = line
            .split("HTTP on ")
            .nth(1)
            .and_then(|s| s.split(',').next());
        let quic = line.split("workers dial ").nth(1).map(str::trim);
        self.http = http
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        self.quic = quic
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        self.gateway = Some(child);
    }

    fn start_worker(&mut self, id: u32) {
        let child = Command::new(SAND)
            .args(["worker", "--gateway", &self.quic, "--id", &id.to_string()])
            .arg("--certs")
            .arg(self.dir.path().join("certs"))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("worker-{id}")))
            .args(["--idle-seconds", &self.idle_seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a worker");
        self.workers.push((id, child));
    }

    fn wait_for_workers(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, body) = get(&format!("{}/v1/workers", self.http));
            let connected = body["workers"]
                .as_array()
                .map_or(0, |w| w.iter().filter(|w| w["connected"] == true).count());
            if connected >= n {
                return;
            }
            assert!(Instant::now() < deadline, "workers did not connect: {body}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill_worker(&mut self, id: u32) {
        let i = self
            .workers
            .iter()
            .position(|(w, _)| *w == id)
            .expect("a worker");
        let (_, mut child) = self.workers.remove(i);
        child.kill().expect("SIGKILL the worker");
        child.wait().expect("reap the worker");
    }

    fn kill_gateway(&mut self) {
        let mut child = self.gateway.take().expect("a gateway");
        child.kill().expect("SIGKILL the gateway");
        child.wait().expect("reap the gateway");
    }

    fn invoke(&self, app: &str, input: &str, query: &str) -> (u16, Value) {
        post(
            &format!("{}/v1/apps/{app}/invoke{query}", self.http),
            input,
            None,
        )
    }

    /// Polls an execution until it ends; returns its status body.
    fn wait_for(&self, exec: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (code, body) = get(&format!("{}/v1/executions/{exec}", self.http));
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

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
    }
}

/// Runs a short `sand` command that must succeed; returns its stdout.
fn sand(args: &[&str]) -> String {
    let out = Command::new(SAND).args(args).output().expect("run sand");
    assert!(
        out.status.success(),
        "sand {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let cluster = Cluster::start_full(2, &["examples/pipeline"], None, 1000);
    let workers = || {
        let (_, body) = get(&format!("{}/v1/workers", cluster.http));
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

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(r) | Err(ureq::Error::Status(_, r)) => {
            let code = r.status();
            let text = r.into_string().expect("a body");
            let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
            (code, body)
        }
        Err(e) => panic!("no answer: {e}"),
    }
}

fn get(url: &str) -> (u16, Value) {
    answer(agent().get(url).call())
}

fn post(url: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = agent().post(url);
    if let Some(k) = key {
        req = req.set("Idempotency-Key", k);
    }
    answer(req.send_string(body))
}

#[test]
fn a_chain_and_a_fan_out_answer_correctly_and_are_traced() {
    let cluster = Cluster::start(2, &["examples/pipeline", "examples/fanout"]);
    for n in [3, 0, -4] {
        let (code, body) = cluster.invoke("pipeline", &n.to_string(), "");
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["output"], (n * 2 + 1) * (n * 2 + 1), "{body}");
    }
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
}

#[test]
fn async_invoke_then_poll_and_idempotent_retries() {
    let cluster = Cluster::start(1, &["examples/pipeline"]);
    let (code, body) = cluster.invoke("pipeline", "5", "?async=true");
    assert_eq!(code, 202, "{body}");
    let exec = body["execution"].as_str().expect("an id").to_owned();
    let status = cluster.wait_for(&exec, Duration::from_secs(10));
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["output"], 121);

    let url = format!("{}/v1/apps/pipeline/invoke", cluster.http);
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
    let cluster = Cluster::start(1, &["examples/pipeline"]);
    let base = &cluster.http;
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
        "PUT /v1/apps/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
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

#[test]
fn a_worker_killed_mid_chain_loses_nothing() {
    let mut cluster = Cluster::start(2, &["tests/apps/slow"]);
    let chains = start_slow_chains(&cluster, 12);
    std::thread::sleep(Duration::from_millis(250));
    cluster.kill_worker(1);
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
}

#[test]
fn a_gateway_killed_and_restarted_finishes_every_accepted_execution() {
    let mut cluster = Cluster::start(2, &["tests/apps/slow"]);
    let chains = start_slow_chains(&cluster, 10);
    std::thread::sleep(Duration::from_millis(200));
    cluster.kill_gateway();
    std::thread::sleep(Duration::from_millis(300));
    cluster.start_gateway();
    for (exec, want) in &chains {
        let status = cluster.wait_for(exec, Duration::from_secs(30));
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(status["output"], *want, "{status}");
    }
}

#[test]
fn an_exec_grain_runs_in_its_sandbox_and_chains_to_python() {
    let cluster = Cluster::start(1, &["tests/apps/shell"]);
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
    assert_eq!(body["error"]["kind"], "Raised", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("shout takes a JSON string"), "{body}");
}

#[test]
fn a_memory_hog_is_killed_with_a_clear_error() {
    let cluster = Cluster::start(1, &["tests/apps/hog"]);
    let (code, body) = cluster.invoke("hog", "8", "");
    assert_eq!(
        (code, &body["output"]),
        (200, &serde_json::json!(8)),
        "{body}"
    );
    let (code, body) = cluster.invoke("hog", "300", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["error"]["kind"], "OutOfMemory", "{body}");
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
    let cluster = Cluster::start_with(0, &["examples/pipeline"], Some("s3cret"));
    let url = format!("{}/v1/apps", cluster.http);
    let (code, body) = get(&url);
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = answer(agent().get(&url).set("Authorization", "Bearer nope").call());
    assert_eq!(wrong.0, 401);
    let (code, body) = answer(
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
        get(&format!("{}/healthz", cluster.http)).0,
        200,
        "liveness needs no token"
    );
}

/// The sandbox holders a worker has running: its children started as `sand __sandbox-init`.
fn sandboxes_of(worker: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let dir = e.path();
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            // The parent pid is the second field after the command's closing parenthesis.
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1));
            cmdline.windows(14).any(|w| w == b"__sandbox-init") && ppid == Some(&worker.to_string())
        })
        .count()
}

#[test]
fn an_idle_app_sandbox_is_torn_down_and_made_again_on_demand() {
    let mut cluster = Cluster::start(0, &["examples/pipeline"]);
    cluster.idle_seconds = 1;
    let certs = cluster.dir.path().join("certs");
    sand(&[
        "cert",
        "issue",
        "worker",
        "--id",
        "1",
        "--dir",
        certs.to_str().unwrap(),
    ]);
    cluster.start_worker(1);
    cluster.wait_for_workers(1);
    let worker = cluster.workers[0].1.id();
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
    let table = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut found = Vec::new();
    for line in table.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let root = match (id, controllers) {
            ("0", "") => PathBuf::from("/sys/fs/cgroup"),
            (_, c) if c.split(',').any(|c| c == "memory") => PathBuf::from("/sys/fs/cgroup/memory"),
            _ => continue,
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

/// Sends `signal` (`TERM`, `INT`) to `child` and waits, bounded, for it to end.
fn stop(child: &mut Child, signal: &str) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} failed");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "SIG{signal} did not stop the process within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sand dev`, the README's first command, stops on Ctrl-C and on SIGTERM alike, and leaves no
/// sandbox behind.
#[test]
fn sand_dev_stops_on_sigint_and_sigterm_and_removes_its_sandboxes() {
    for signal in ["INT", "TERM"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut dev = Command::new(SAND)
            .args(["dev", repo("examples/pipeline").to_str().unwrap()])
            .args(["--http", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sand dev");
        let mut out = BufReader::new(dev.stdout.take().expect("stdout"));
        let mut url = None;
        let mut line = String::new();
        while url.is_none() {
            line.clear();
            if out.read_line(&mut line).expect("sand dev's output") == 0 {
                let _ = dev.kill();
                panic!("sand dev ended before it served");
            }
            // "sand dev: gateway at http://ADDR, one worker; Ctrl-C stops"
            url = line
                .split("gateway at ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .map(str::to_owned);
        }
        let url = url.unwrap();
        let (code, body) = post(&format!("{url}/v1/apps/pipeline/invoke"), "1", None);
        assert_eq!((code, &body["output"]), (200, &Value::from(9)), "{body}");
        let cgroups = sandbox_cgroups(dev.id());
        assert_eq!(cgroups.len(), 1, "one sandbox for the app: {cgroups:?}");
        let status = stop(&mut dev, signal);
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        assert!(status.success(), "SIG{signal}: {status}, output {rest}");
        assert!(rest.contains(&format!("SIG{signal}, stopping")), "{rest}");
        for cgroup in cgroups {
            assert!(!cgroup.exists(), "SIG{signal} left {}", cgroup.display());
        }
    }
}

/// A worker asked to stop removes its sandboxes before it exits; the gateway exits cleanly.
#[test]
fn a_worker_and_a_gateway_stop_cleanly_on_sigterm() {
    let mut cluster = Cluster::start(1, &["examples/pipeline"]);
    assert_eq!(cluster.invoke("pipeline", "1", "").1["output"], 9);
    let (_, mut worker) = cluster.workers.remove(0);
    let cgroups = sandbox_cgroups(worker.id());
    assert_eq!(cgroups.len(), 1, "one sandbox for the app: {cgroups:?}");
    let status = stop(&mut worker, "TERM");
    assert!(status.success(), "the worker: {status}");
    for cgroup in cgroups {
        assert!(!cgroup.exists(), "the worker left {}", cgroup.display());
    }
    let mut gateway = cluster.gateway.take().expect("a gateway");
    let status = stop(&mut gateway, "TERM");
    assert!(status.success(), "the gateway: {status}");
}
