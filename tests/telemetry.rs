//! End to end: OpenTelemetry. A cluster of real `sand` processes exports its spans to an
//! OTLP/HTTP receiver run by this test, which decodes them (protobuf) and checks the trees: a
//! 3-grain chain invoked under a client's `traceparent`, a fan-out, a chain whose grains read
//! their own context (`ctx.trace`), and a chain recovered after its worker was SIGKILLed
//! mid-chain.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use sand_testkit::cluster::{Cluster, ClusterSpec, Host};
use serde_json::Value;

const SAND: &str = env!("CARGO_BIN_EXE_sand");
const TOKEN: &str = "telemetry-test-token-3f7d";
/// The client's span the chain is invoked under.
const CLIENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// One span as the receiver got it, ids in hex.
#[derive(Clone, Debug)]
struct Span {
    trace: String,
    id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, Any>,
    error: bool,
}

impl Span {
    fn text(&self, key: &str) -> &str {
        match self.attributes.get(key) {
            Some(Any::StringValue(s)) => s,
            other => panic!("{key} is {other:?} in {self:?}"),
        }
    }

    fn int(&self, key: &str) -> i64 {
        match self.attributes.get(key) {
            Some(Any::IntValue(i)) => *i,
            other => panic!("{key} is {other:?} in {self:?}"),
        }
    }

    fn flag(&self, key: &str) -> bool {
        match self.attributes.get(key) {
            Some(Any::BoolValue(b)) => *b,
            other => panic!("{key} is {other:?} in {self:?}"),
        }
    }
}

/// An OTLP/HTTP receiver on a loopback port: what it was sent, decoded.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/v1/traces", post(receive))
            .with_state(spans.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            spans,
            _runtime: runtime,
        }
    }

    /// The spans of `trace` once `done` says they are all in, waiting 30 s at most.
    fn trace(&self, trace: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans: Vec<Span> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace == trace)
                .cloned()
                .collect();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace} is not complete: {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The gateway's span of the invocation of `execution`.
    fn invocation(&self, execution: &str) -> Span {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let wanted = Some(Any::StringValue(execution.into()));
            let found = (self.spans.lock().unwrap().iter())
                .find(|s| s.attributes.get("sand.execution") == wanted.as_ref())
                .cloned();
            if let Some(span) = found {
                return span;
            }
            assert!(Instant::now() < deadline, "no span for {execution}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn receive(
    State(spans): State<Arc<Mutex<Vec<Span>>>>,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    let request = ExportTraceServiceRequest::decode(body).unwrap();
    let mut got = spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.clone()?.value);
        assert_eq!(service, Some(Any::StringValue("sand".into())));
        for scope in resource.scope_spans {
            for span in scope.spans {
                let attributes = span
                    .attributes
                    .into_iter()
                    .filter_map(|kv| Some((kv.key, kv.value?.value?)))
                    .collect();
                got.push(Span {
                    trace: hex(&span.trace_id),
                    id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                    attributes,
                    error: span.status.is_some_and(|s| s.code == 2),
                });
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Invokes `app` with `input`, under `traceparent` if given; returns the answer.
fn invoke(
    cluster: &Cluster,
    app: &str,
    input: &str,
    query: &str,
    traceparent: Option<&str>,
) -> Value {
    let url = format!("{}/v1/apps/{app}/invoke{query}", cluster.http());
    let mut request = ureq::post(&url)
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .set("Content-Type", "application/json");
    if let Some(traceparent) = traceparent {
        request = request.set("traceparent", traceparent);
    }
    let response = request
        .send_string(input)
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    response.into_json().unwrap()
}

/// The spans of runs of `grain`.
fn runs<'a>(spans: &'a [Span], grain: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == grain).collect()
}

/// The one span of a run of `grain`.
fn run<'a>(spans: &'a [Span], grain: &str) -> &'a Span {
    match runs(spans, grain)[..] {
        [one] => one,
        ref other => panic!("{} runs of {grain}: {spans:#?}", other.len()),
    }
}

/// The tree of `spans` below the span `root`, a line a span: its name, worker, attempt, hop and
/// reason, as docs/telemetry.md shows one.
fn tree(spans: &[Span], root: &str, depth: usize, out: &mut String) {
    for span in spans.iter().filter(|s| s.parent == root) {
        let about = match span.attributes.get("sand.worker") {
            Some(_) => format!(
                "worker {} attempt {} {} {}{}{}",
                span.int("sand.worker"),
                span.int("sand.attempt"),
                span.text("sand.via"),
                span.text("sand.reason"),
                if span.flag("faas.coldstart") {
                    " cold"
                } else {
                    ""
                },
                if span.error { " ERROR" } else { "" },
            ),
            None => format!("execution {}", span.text("sand.execution")),
        };
        out.push_str(&format!("{}{}  [{about}]\n", "  ".repeat(depth), span.name));
        tree(spans, &span.id, depth + 1, out);
    }
}

/// Every span hangs from another of its trace, but the invocation, which hangs from `root`.
fn check_tree(spans: &[Span], root: &str) {
    for span in spans {
        let parent_known = spans.iter().any(|p| p.id == span.parent);
        let is_invocation = span.name == "POST /v1/apps/{app}/invoke";
        assert!(
            parent_known || (is_invocation && span.parent == root),
            "{} hangs from nothing in its trace: {spans:#?}",
            span.name
        );
    }
}

#[test]
fn executions_are_traced_across_hops_fan_outs_and_recoveries() {
    let receiver = Receiver::start();
    let mut cluster = Cluster::start(
        Path::new(SAND),
        ClusterSpec {
            workers: 2,
            failure_timeout: Duration::from_millis(1500),
            token: Some(TOKEN.into()),
            otlp_endpoint: Some(receiver.url.clone()),
            ..ClusterSpec::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    for app in [
        "examples/pipeline",
        "examples/fanout",
        "tests/apps/slow",
        "tests/apps/traced",
    ] {
        cluster
            .deploy(&repo(app))
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    // A chain under the client's span: the gateway's span of the invocation hangs from it,
    // double from the invocation, inc from double, square from inc.
    let chain = invoke(&cluster, "pipeline", "3", "", Some(CLIENT));
    assert_eq!(chain["output"], 49, "{chain}");
    let execution = chain["execution"].as_str().unwrap();
    let spans = receiver.trace(CLIENT_TRACE, |s| s.len() == 4);
    let invocation = receiver.invocation(execution);
    assert_eq!(invocation.trace, CLIENT_TRACE);
    assert_eq!(invocation.parent, CLIENT_SPAN);
    assert_eq!(invocation.text("sand.app"), "pipeline");
    assert_eq!(invocation.int("http.response.status_code"), 200);
    let (double, inc, square) = (
        run(&spans, "double"),
        run(&spans, "inc"),
        run(&spans, "square"),
    );
    assert_eq!(double.parent, invocation.id);
    assert_eq!(inc.parent, double.id);
    assert_eq!(square.parent, inc.id);
    check_tree(&spans, CLIENT_SPAN);
    assert_eq!(double.text("faas.trigger"), "http");
    assert_eq!(double.text("sand.via"), "gateway");
    assert_eq!(double.text("sand.reason"), "first");
    for span in [inc, square] {
        assert_eq!(span.text("faas.trigger"), "other");
        assert_eq!(span.text("sand.via"), "local");
        assert_eq!(span.text("sand.reason"), "local");
    }
    for span in [double, inc, square] {
        assert_eq!(span.text("faas.invoked_name"), span.name);
        assert_eq!(span.text("sand.app"), "pipeline");
        assert_eq!(span.text("faas.invocation_id").len(), 16);
        assert!(!span.flag("sand.recovery") && !span.error);
        // The default: a fresh instance per call, each a cold start.
        assert!(span.flag("faas.coldstart"), "{span:?}");
        assert!((1..=2).contains(&span.int("sand.worker")));
        assert!(span.int("sand.attempt") > 0);
    }
    // The calls the API traces are the spans' calls.
    let status: Value = cluster.get(&format!("/v1/executions/{execution}")).unwrap();
    let mut calls: Vec<&str> = status["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["call"].as_str().unwrap())
        .collect();
    let mut traced: Vec<&str> = [double, inc, square]
        .iter()
        .map(|s| s.text("faas.invocation_id"))
        .collect();
    calls.sort_unstable();
    traced.sort_unstable();
    assert_eq!(calls, traced);

    // A fan-out, without a client's span: a trace starts at the gateway; the three branches
    // and their join hang from split.
    let fan = invoke(
        &cluster,
        "fanout",
        "\"serverless chained functions\"",
        "",
        None,
    );
    assert_eq!(fan["output"]["letters"], 26, "{fan}");
    let invocation = receiver.invocation(fan["execution"].as_str().unwrap());
    assert_eq!(invocation.parent, "", "a root span");
    let spans = receiver.trace(&invocation.trace, |s| s.len() == 6);
    let split = run(&spans, "split");
    assert_eq!(split.parent, invocation.id);
    let measures = runs(&spans, "measure");
    assert_eq!(measures.len(), 3);
    for span in measures.iter().chain([&run(&spans, "total")]) {
        assert_eq!(span.parent, split.id, "{span:?}");
    }
    check_tree(&spans, "");
    let mut drawn = String::new();
    tree(&spans, "", 0, &mut drawn);
    eprintln!("the fan-out's trace {}:\n{drawn}", invocation.trace);

    // A grain reads its own context: each run's traceparent names its span.
    let traced = invoke(&cluster, "traced", "null", "", Some(CLIENT));
    let seen: Vec<String> = serde_json::from_value(traced["output"].clone()).unwrap();
    let spans = receiver.trace(CLIENT_TRACE, |s| runs(s, "second").len() == 1);
    let (first, second) = (run(&spans, "first"), run(&spans, "second"));
    assert_eq!(seen[0], format!("00-{CLIENT_TRACE}-{}-01", first.id));
    assert_eq!(seen[1], format!("00-{CLIENT_TRACE}-{}-01", second.id));
    assert_eq!(second.parent, first.id);

    // A recovery: slow chains on both workers; worker 1 is killed once one of its chains has
    // finished its first step (the gateway has that step's account) and runs its second.
    let chains: Vec<String> = (0..4)
        .map(|i| {
            let body = invoke(&cluster, "slow", &i.to_string(), "?async=true", None);
            body["execution"].as_str().unwrap().to_owned()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let victim = loop {
        let found = chains.iter().find(|exec| {
            let status: Value = cluster.get(&format!("/v1/executions/{exec}")).unwrap();
            let calls = status["calls"].as_array().unwrap();
            let first_done_on_1 = calls
                .iter()
                .any(|c| c["grain"] == "one" && c["worker"] == 1 && c["ended_ms"].is_u64());
            let later = calls.iter().any(|c| c["grain"] != "one");
            status["status"] == "running" && first_done_on_1 && !later
        });
        if let Some(exec) = found {
            break exec.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no chain ran its first step on worker 1"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    cluster.kill(Host::Worker(1)).expect("kill worker 1");
    let invocation = receiver.invocation(&victim);
    let spans = receiver.trace(&invocation.trace, |s| {
        runs(s, "three").iter().any(|t| !t.error)
    });
    let recovered: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name != invocation.name && s.flag("sand.recovery"))
        .collect();
    assert!(!recovered.is_empty(), "no recovery marked: {spans:#?}");
    for span in &recovered {
        assert_eq!(span.text("sand.reason"), "recovery");
        assert_eq!(span.int("sand.worker"), 2, "{span:?}");
        // It hangs where its lost attempt did: under a run of the grain that emitted it.
        let emitter = match span.name.as_str() {
            "one" => invocation.name.as_str(),
            "two" => "one",
            _ => "two",
        };
        assert!(
            spans
                .iter()
                .any(|p| p.name == emitter && p.id == span.parent),
            "{span:?} does not hang from {emitter}: {spans:#?}"
        );
    }
    check_tree(&spans, "");
    let mut drawn = String::new();
    tree(&spans, "", 0, &mut drawn);
    eprintln!(
        "the recovered execution's trace {}:\n{drawn}",
        invocation.trace
    );
    let status: Value = cluster.get(&format!("/v1/executions/{victim}")).unwrap();
    assert_eq!(status["status"], "succeeded", "{status}");
}
