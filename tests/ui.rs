//! End to end: the execution viewer (`/ui`) in headless Chromium, on a cluster of real `sand`
//! processes whose API wants a token. A chain, a failed chain with retries, a fan-out and a
//! chain recovered after a worker was SIGKILLed mid-chain are each opened in the page, and the
//! DOM the page built is checked against what the API says: the calls, their grains, their
//! hops, the retries, errors and recovery, the output.
//!
//! Needs Debian's `chromium` (`apt-get install -y chromium`). Chromium runs in a process group
//! of its own, killed when it takes too long, with a profile in a temporary directory.

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sand_testkit::cluster::{Cluster, ClusterSpec, Host};
use sand_testkit::process::{self, Killed};
use serde_json::Value;

const SAND: &str = env!("CARGO_BIN_EXE_sand");
const CHROMIUM: &str = "/usr/bin/chromium";
const TOKEN: &str = "ui-test-token-5b9e0c7a";

/// The longest one page load may take, Chromium's start included.
const PAGE_MAX: Duration = Duration::from_secs(40);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs Chromium headless on `url` until the page is idle (virtual time: timers run at once,
/// fetches are waited for) and returns the DOM it built.
fn dump_dom(url: &str) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: this test drives the viewer in headless Chromium; install it \
         with `apt-get install -y chromium`"
    );
    let profile = tempfile::tempdir().unwrap();
    // A page that polls a running execution moves virtual time on by its poll interval each
    // turn, but only as fast as its fetches come back: a large budget follows an execution to
    // its end, and costs nothing once the page stops polling.
    let mut chromium = Killed(
        Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=3600000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}")),
    );
    let mut stdout = chromium.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        dom
    });
    let deadline = Instant::now() + PAGE_MAX;
    let status = loop {
        if let Some(status) = chromium.0.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            // Its renderers are in its process group: none outlives it.
            let group = process::pid(chromium.0.id());
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            panic!("Chromium did not render {url} within {PAGE_MAX:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let group = process::pid(chromium.0.id());
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let dom = reader.join().unwrap();
    assert!(status.success(), "Chromium failed on {url}: {status}");
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page did not finish drawing {url}:\n{dom}"
    );
    dom
}

/// The page of execution `exec`, or the list when `None`, with the token in the fragment.
fn page(cluster: &Cluster, exec: Option<&str>) -> String {
    let mut url = format!("{}/ui#token={TOKEN}", cluster.http());
    if let Some(exec) = exec {
        url.push_str(&format!("&exec={exec}"));
    }
    dump_dom(&url)
}

/// Invokes `app` with the JSON `input`; returns the answer.
fn invoke(cluster: &Cluster, app: &str, input: &str, query: &str) -> Value {
    let url = format!("{}/v1/apps/{app}/invoke{query}", cluster.http());
    let response = ureq::post(&url)
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .set("Content-Type", "application/json")
        .send_string(input)
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    response.into_json().unwrap()
}

/// The execution once it has ended and its trace holds `calls` ended attempts (workers trace
/// their runs in batches, best effort: the last may land after the answer).
fn traced(cluster: &Cluster, exec: &str, calls: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: Value = cluster.get(&format!("/v1/executions/{exec}")).unwrap();
        let ended = status["calls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["ended_ms"].is_u64())
            .count();
        if status["status"] != "running" && ended >= calls {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{exec} did not end with {calls} traced calls: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The part of the page that draws the calls.
fn timeline(dom: &str) -> &str {
    let at = dom.find("id=\"timeline\"").expect("a timeline");
    &dom[at..]
}

/// The rows of the timeline: one `<details class="call ...">` per attempt.
fn rows(dom: &str) -> Vec<&str> {
    timeline(dom)
        .split("<details class=\"call ")
        .skip(1)
        .collect()
}

/// An attribute's value in a row.
fn attr<'a>(row: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    let at = row
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {row}"))
        + key.len();
    let len = row[at..].find('"').unwrap();
    &row[at..at + len]
}

/// Checks that the page draws each call the API traced, with its grain and its hop, labelled
/// in words as well as in colour.
fn check_calls(dom: &str, status: &Value) {
    let calls = status["calls"].as_array().unwrap();
    let drawn = rows(dom);
    assert_eq!(drawn.len(), calls.len(), "{status}\n{dom}");
    let mut want: Vec<(String, String)> = calls
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap().to_owned();
            (s("grain"), s("via"))
        })
        .collect();
    let mut got: Vec<(String, String)> = drawn
        .iter()
        .map(|r| {
            (
                attr(r, "data-grain").to_owned(),
                attr(r, "data-via").to_owned(),
            )
        })
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    for row in &drawn {
        let via = attr(row, "data-via");
        assert!(
            row.contains(&format!("<span class=\"badge via {via}\">{via}</span>")),
            "no {via} label: {row}"
        );
    }
}

#[test]
fn the_viewer_draws_chains_failures_fan_outs_and_recoveries() {
    let started = Instant::now();
    let mut cluster = Cluster::start(
        Path::new(SAND),
        ClusterSpec {
            workers: 2,
            failure_timeout: Duration::from_millis(1500),
            token: Some(TOKEN.into()),
            ..ClusterSpec::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    for app in ["examples/pipeline", "examples/fanout", "tests/apps/slow"] {
        cluster
            .deploy(&repo(app))
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    // A chain: double, inc, square; the first dispatched by the gateway, the rest local.
    let chain = invoke(&cluster, "pipeline", "3", "");
    assert_eq!(chain["output"], 49, "{chain}");
    let chain = chain["execution"].as_str().unwrap().to_owned();
    let status = traced(&cluster, &chain, 3);
    let dom = page(&cluster, Some(&chain));
    check_calls(&dom, &status);
    let grains: Vec<&str> = rows(&dom).iter().map(|r| attr(r, "data-grain")).collect();
    assert_eq!(grains, ["double", "inc", "square"], "drawn in chain order");
    // A link can open one call's details.
    let inc = attr(rows(&dom)[1], "data-call").to_owned();
    let url = format!(
        "{}/ui#token={TOKEN}&exec={chain}&call={inc}",
        cluster.http()
    );
    let opened = dump_dom(&url);
    let open: Vec<bool> = rows(&opened)
        .iter()
        .map(|r| r[..r.find('>').unwrap()].contains("open=\"\""))
        .collect();
    assert_eq!(open, [false, true, false], "{opened}");
    assert!(
        dom.contains("<pre class=\"value exec-output\">49</pre>"),
        "{dom}"
    );
    let drawn = timeline(&dom);
    for shown in [
        "<span class=\"badge via gateway\">gateway</span>",
        "<span class=\"badge via local\">local</span>",
        // What the first call printed, and the values in and out, one click away.
        "double: 3 (execution",
        "<pre class=\"value\">3</pre>",
        "<pre class=\"value\">49</pre>",
        "passed on to inc",
    ] {
        assert!(drawn.contains(shown), "{shown} missing:\n{drawn}");
    }

    // A failure: inc cannot add 1 to a string; its first attempt ran here, the gateway retried
    // it twice (its policy's three attempts), and the execution failed.
    let failed = invoke(&cluster, "pipeline", "\"x\"", "");
    assert_eq!(failed["error"]["kind"], "raised", "{failed}");
    let failed = failed["execution"].as_str().unwrap().to_owned();
    let status = traced(&cluster, &failed, 4);
    let dom = page(&cluster, Some(&failed));
    check_calls(&dom, &status);
    assert!(
        dom.contains("<span class=\"status failed\">failed</span>")
            && dom.contains("<pre class=\"value exec-error\">raised: "),
        "{dom}"
    );
    let drawn = rows(&dom);
    let grains: Vec<&str> = drawn.iter().map(|r| attr(r, "data-grain")).collect();
    assert_eq!(grains, ["double", "inc", "inc", "inc"]);
    let reasons: Vec<&str> = drawn.iter().map(|r| attr(r, "data-reason")).collect();
    assert_eq!(reasons, ["first", "local", "retry", "retry"], "{status}");
    for row in &drawn[1..] {
        assert!(
            row.contains("<span class=\"badge error\">raised</span>") && row.contains("TypeError"),
            "{row}"
        );
    }
    assert_eq!(
        timeline(&dom)
            .matches("<span class=\"badge retry\">retry</span>")
            .count(),
        2
    );

    // A fan-out: split, three branches and their join, each under split.
    let fan = invoke(&cluster, "fanout", "\"serverless chained functions\"", "");
    assert_eq!(fan["output"]["letters"], 26, "{fan}");
    let fan = fan["execution"].as_str().unwrap().to_owned();
    let status = traced(&cluster, &fan, 5);
    let dom = page(&cluster, Some(&fan));
    check_calls(&dom, &status);
    let grains: Vec<&str> = rows(&dom).iter().map(|r| attr(r, "data-grain")).collect();
    assert_eq!(grains, ["split", "measure", "measure", "measure", "total"]);
    assert_eq!(
        timeline(&dom).matches("<span class=\"edge\">").count(),
        4,
        "the branches and the join hang under split"
    );
    assert!(
        dom.contains("\"letters\": 26") && dom.contains("\"words\": 3"),
        "{dom}"
    );
    assert!(dom.contains("passed on to measure, measure, measure, total"));

    // A recovery: slow chains on both workers, worker 1 killed mid-chain. The page is opened
    // on one that worker 1 held while it is still running, and follows it to its end.
    let chains: Vec<String> = (0..6)
        .map(|i| {
            let body = invoke(&cluster, "slow", &i.to_string(), "?async=true");
            body["execution"].as_str().unwrap().to_owned()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(250));
    cluster.kill(Host::Worker(1)).expect("kill worker 1");
    let stalled = chains
        .iter()
        .find(|exec| {
            let status: Value = cluster.get(&format!("/v1/executions/{exec}")).unwrap();
            status["status"] == "running"
                && status["calls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["worker"] == 1)
        })
        .expect("worker 1 held none of the running chains")
        .clone();
    let dom = page(&cluster, Some(&stalled));
    let status: Value = cluster.get(&format!("/v1/executions/{stalled}")).unwrap();
    assert_eq!(status["status"], "succeeded", "{status}");
    assert!(
        dom.contains("<span class=\"status succeeded\">succeeded</span>"),
        "the page did not follow the execution to its end:\n{dom}"
    );
    let recovered = rows(&dom)
        .into_iter()
        .filter(|r| attr(r, "data-reason") == "recovery")
        .collect::<Vec<_>>();
    assert!(!recovered.is_empty(), "no recovered call drawn:\n{dom}");
    for row in recovered {
        assert!(
            row.contains("<span class=\"badge recovery\">recovery</span>"),
            "{row}"
        );
    }
    let output = status["output"].as_u64().unwrap();
    assert!(
        dom.contains(&format!("<pre class=\"value exec-output\">{output}</pre>")),
        "{dom}"
    );
    assert!(
        !dom.contains("<span id=\"live\" class=\"live\">"),
        "still live: {dom}"
    );

    // The list: the newest first, each a link to its page.
    for exec in &chains {
        traced(&cluster, exec, 0);
    }
    let dom = page(&cluster, None);
    let listed: Vec<&str> = dom
        .split("<tr class=\"execution\" data-execution=\"")
        .skip(1)
        .map(|r| &r[..r.find('"').unwrap()])
        .collect();
    assert_eq!(listed.len(), 9, "{dom}");
    assert_eq!(listed[8], chain, "the oldest last");
    assert_eq!(listed[7], failed);
    assert_eq!(listed[6], fan);
    assert!(dom.contains(&format!("href=\"#exec={chain}\"")), "{dom}");

    // Without the token the page asks for it, and shows nothing of the API.
    let dom = dump_dom(&format!("{}/ui", cluster.http()));
    assert!(dom.contains("<form id=\"login\">"), "{dom}");
    assert!(!dom.contains("data-execution="), "{dom}");
    eprintln!("the viewer test took {:?}", started.elapsed());
}
