//! The HTTP API over a real core and store, with no worker (executions stay running): which
//! executions a client can name, what a reused idempotency key gets, and how the execution
//! viewer's files are served.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use prometheus_client::registry::Registry;
use sand_gateway::core::{self, Command, Core};
use sand_gateway::exec_ref::ExecRefs;
use sand_gateway::http::{self, Api};
use sand_gateway::metrics::Metrics;
use sand_gateway::store::Store;
use sand_gateway::token::Token;
use sand_protocol::global_queue::GqConfig;
use sand_protocol::ids::{AppName, GrainName};
use sand_protocol::policy::AppSpec;
use sand_protocol::wire::AppBundle;
use sand_testkit::contract;
use sand_transport::mem::MemNetwork;
use serde_json::Value;
use tower::ServiceExt;

/// A gateway's API with app `one` deployed. Keep the network: dropping it closes the core's
/// event stream.
async fn api(dir: &std::path::Path) -> (Router, MemNetwork) {
    api_with(dir, None).await
}

/// [`api`], wanting `token` if one is given.
async fn api_with(dir: &std::path::Path, token: Option<Token>) -> (Router, MemNetwork) {
    let (store, state) = Store::open(&dir.join("gq.redb")).unwrap();
    let store = Arc::new(store);
    let (net, link) = MemNetwork::new(64);
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let refs = Arc::new(ExecRefs::open(dir).unwrap());
    let core = Core::new(
        GqConfig::default(),
        store.clone(),
        state,
        link.sender,
        metrics.clone(),
        refs.clone(),
        None,
    );
    let (handle, _task) = core::spawn(core, link.events);
    let spec = AppSpec {
        name: AppName::new("one").unwrap(),
        entry: GrainName::new("square").unwrap(),
        grains: BTreeMap::new(),
    };
    let bundle = AppBundle {
        digest: "d".into(),
        archive: Bytes::new(),
    };
    handle
        .ask(|reply| Command::Deploy {
            spec,
            bundle,
            reply,
        })
        .await
        .unwrap();
    let api = Api {
        core: handle,
        store,
        metrics,
        registry: Arc::new(registry),
        token: token.map(Arc::new),
        hosts: Arc::new([]),
        policy: Arc::new(sand_app::Policy::default()),
        refs,
        telemetry: None,
    };
    (http::router(api), net)
}

/// Sends `req` and checks the answer against the OpenAPI document: every response any test
/// here sees is one the document describes.
async fn call(router: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let media_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let body = match media_type.as_deref() {
        Some("application/json") => serde_json::from_slice(&body).unwrap(),
        _ => Value::String(String::from_utf8(body.to_vec()).unwrap()),
    };
    contract::check(
        method.as_str(),
        &path,
        status.as_u16(),
        media_type.as_deref(),
        &body,
    );
    (status, body)
}

/// An asynchronous invocation of `one` with `input`, and `key` if any.
async fn invoke(router: &Router, input: &'static str, key: Option<&str>) -> (StatusCode, Value) {
    let mut req = Request::post("/v1/apps/one/invoke?async=true")
        .header("host", "localhost")
        .header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    call(router, req.body(Body::from(input)).unwrap()).await
}

async fn get(router: &Router, reference: &str) -> (StatusCode, Value) {
    let uri = format!("/v1/executions/{reference}");
    let req = Request::get(uri).header("host", "localhost");
    call(router, req.body(Body::empty()).unwrap()).await
}

#[tokio::test]
async fn a_client_reaches_only_the_executions_it_was_told_of() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _net) = api(dir.path()).await;
    let (status, body) = invoke(&router, "1", None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let mine = body["execution"].as_str().unwrap().to_owned();
    let (status, body) = invoke(&router, "2", None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let theirs = body["execution"].as_str().unwrap().to_owned();
    let (status, body) = get(&router, &mine).await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &"running".into())
    );

    // The next execution's internal id is one more than mine: with my MAC, with none, or
    // bare, it names nothing.
    let (id, mac) = mine.split_at(16);
    let next = u64::from_str_radix(id, 16).unwrap() + 1;
    assert!(theirs.starts_with(&format!("{next:016x}")), "{theirs}");
    for guess in [
        format!("{next:016x}{mac}"),
        format!("{next:016x}{}", "0".repeat(32)),
    ] {
        let (status, body) = get(&router, &guess).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{guess}: {body}");
        assert_eq!(body["error"]["code"], "unknown_execution");
    }
    for malformed in [format!("{next:016x}"), "zzz".into()] {
        let (status, body) = get(&router, &malformed).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{malformed}: {body}");
        assert_eq!(body["error"]["code"], "bad_execution_id");
    }
    let (status, _) = get(&router, &theirs).await;
    assert_eq!(status, StatusCode::OK, "the one told of it reaches it");
}

#[tokio::test]
async fn a_key_reused_with_another_input_is_a_422() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _net) = api(dir.path()).await;
    let (status, first) = invoke(&router, "1", Some("k")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, again) = invoke(&router, "1", Some("k")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(
        again["execution"], first["execution"],
        "a retry found another"
    );
    let (status, body) = invoke(&router, "2", Some("k")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    let message = body["error"]["message"].as_str().unwrap();
    let reference = first["execution"].as_str().unwrap();
    assert!(message.contains(reference), "{message}");
}

async fn list(router: &Router, query: &str) -> (StatusCode, Value) {
    let req = Request::get(format!("/v1/executions{query}")).header("host", "localhost");
    call(router, req.body(Body::empty()).unwrap()).await
}

#[tokio::test]
async fn executions_are_listed_newest_first_a_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _net) = api(dir.path()).await;
    let mut refs = Vec::new();
    for input in ["1", "2", "3"] {
        let (status, body) = invoke(&router, input, None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        refs.push(body["execution"].as_str().unwrap().to_owned());
    }
    let listed = |body: &Value| -> Vec<String> {
        let page = body["executions"].as_array().unwrap();
        page.iter()
            .map(|e| e["execution"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, body) = list(&router, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        listed(&body),
        [refs[2].clone(), refs[1].clone(), refs[0].clone()]
    );
    assert_eq!(body["next"], Value::Null, "the last page");
    assert_eq!(body["executions"][0]["status"], "running");
    assert_eq!(body["executions"][0]["app"], "one");

    let (_, body) = list(&router, "?limit=2&app=one").await;
    assert_eq!(listed(&body), [refs[2].clone(), refs[1].clone()]);
    let next = body["next"].as_str().unwrap().to_owned();
    assert_eq!(next, refs[1]);
    let (_, body) = list(&router, &format!("?limit=2&before={next}")).await;
    assert_eq!(listed(&body), [refs[0].clone()]);
    let (_, body) = list(&router, "?app=other").await;
    assert_eq!(listed(&body), Vec::<String>::new());

    for bad in [
        "?limit=0",
        "?limit=101",
        "?limit=x",
        "?colour=red",
        "?before=0001",
    ] {
        let (status, body) = list(&router, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_query", "{bad}");
    }
}

/// A request to the API as a same-site client sends it, with `token` if given.
fn request(method: &str, uri: &str, token: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost:8080");
    if method == "POST" {
        req = req.header("content-type", "application/json");
    }
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(body.into()).unwrap()
}

/// An app directory, as a bundle, whose manifest is `manifest`.
fn bundle_of(manifest: &str) -> Bytes {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sand.toml"), manifest).unwrap();
    std::fs::write(
        dir.path().join("grains.py"),
        "def f(x, ctx):\n    return x\n",
    )
    .unwrap();
    sand_app::pack(dir.path()).unwrap()
}

const TWO: &str = "name = \"two\"\nentry = \"f\"\n[grains.f]\nruntime = \"python\"\nmodule = \"grains.py\"\nhandler = \"f\"\n";

#[tokio::test]
async fn every_route_answers_as_its_document_says() {
    let dir = tempfile::tempdir().unwrap();
    let token = "t0k3n-for-the-api-test-0123456789abcdef";
    let (router, _net) = api_with(dir.path(), Some(Token::new(token, "test").unwrap())).await;
    let t = Some(token);
    let mut seen = std::collections::BTreeSet::new();
    let mut expect = async |method: &str, uri: &str, token, body: Body, want: StatusCode| {
        let (status, answer) = call(&router, request(method, uri, token, body)).await;
        assert_eq!(status, want, "{method} {uri}: {answer}");
        let path = uri.split('?').next().unwrap();
        if let Some(template) = contract::template(path) {
            seen.insert((method.to_lowercase(), template));
        }
        answer
    };
    let ok = StatusCode::OK;
    let empty = || Body::empty();

    // Apps: deploy, list, remove; refusals of each.
    let deployed = expect("PUT", "/v1/apps/two", t, bundle_of(TWO).into(), ok).await;
    assert_eq!(deployed["grains"], serde_json::json!(["f"]));
    expect(
        "PUT",
        "/v1/apps/three",
        t,
        bundle_of(TWO).into(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect(
        "PUT",
        "/v1/apps/two",
        t,
        Body::from("not a tar"),
        StatusCode::BAD_REQUEST,
    )
    .await;
    let networked = TWO.replace("[grains.f]", "network = true\n[grains.f]");
    expect(
        "PUT",
        "/v1/apps/two",
        t,
        bundle_of(&networked).into(),
        StatusCode::FORBIDDEN,
    )
    .await;
    let apps = expect("GET", "/v1/apps", t, empty(), ok).await;
    assert_eq!(apps["apps"].as_array().unwrap().len(), 2);
    expect("DELETE", "/v1/apps/two", t, empty(), ok).await;
    expect("DELETE", "/v1/apps/two", t, empty(), StatusCode::NOT_FOUND).await;
    expect(
        "DELETE",
        "/v1/apps/No%20Such",
        t,
        empty(),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // Invocations: accepted, refused by query, input, key and app.
    let accepted = expect(
        "POST",
        "/v1/apps/one/invoke?async",
        t,
        "1".into(),
        StatusCode::ACCEPTED,
    )
    .await;
    let reference = accepted["execution"].as_str().unwrap().to_owned();
    expect(
        "POST",
        "/v1/apps/one/invoke?wait=0",
        t,
        "2".into(),
        StatusCode::ACCEPTED,
    )
    .await;
    expect(
        "POST",
        "/v1/apps/one/invoke?wait=x",
        t,
        "1".into(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect(
        "POST",
        "/v1/apps/one/invoke?async",
        t,
        "{".into(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect(
        "POST",
        "/v1/apps/nope/invoke?async",
        t,
        "1".into(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let big = vec![b'1'; sand_protocol::wire::PAYLOAD_BYTES_MAX + 1];
    expect(
        "POST",
        "/v1/apps/one/invoke",
        t,
        big.into(),
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    let keyed = |body: &'static str| {
        let mut req = request("POST", "/v1/apps/one/invoke?async", t, body);
        req.headers_mut()
            .insert("idempotency-key", "k".parse().unwrap());
        req
    };
    assert_eq!(call(&router, keyed("1")).await.0, StatusCode::ACCEPTED);
    assert_eq!(
        call(&router, keyed("2")).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    // Executions: one, a list, refusals.
    let one = expect(
        "GET",
        &format!("/v1/executions/{reference}"),
        t,
        empty(),
        ok,
    )
    .await;
    assert_eq!(one["status"], "running");
    expect(
        "GET",
        "/v1/executions/nope",
        t,
        empty(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    let guessed = format!("{}{}", &reference[..16], "0".repeat(32));
    expect(
        "GET",
        &format!("/v1/executions/{guessed}"),
        t,
        empty(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let page = expect("GET", "/v1/executions?limit=2", t, empty(), ok).await;
    assert_eq!(page["executions"].as_array().unwrap().len(), 2);
    expect(
        "GET",
        "/v1/executions?sort=asc",
        t,
        empty(),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // The cluster, the document, liveness and metrics.
    expect("GET", "/v1/workers", t, empty(), ok).await;
    let document = expect("GET", "/v1/openapi.json", t, empty(), ok).await;
    assert_eq!(document, serde_json::to_value(http::openapi()).unwrap());
    assert_eq!(
        &document,
        contract::document(),
        "docs/openapi.json is out of date"
    );
    expect("GET", "/healthz", None, empty(), ok).await;
    expect("GET", "/metrics", None, empty(), ok).await;

    // What the middleware refuses, on any route.
    expect("GET", "/v1/apps", None, empty(), StatusCode::UNAUTHORIZED).await;
    let mut form = request("POST", "/v1/apps/one/invoke", t, "1");
    form.headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    assert_eq!(
        call(&router, form).await.0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let mut rebound = request("GET", "/v1/apps", t, empty());
    rebound
        .headers_mut()
        .insert("host", "evil.example".parse().unwrap());
    assert_eq!(
        call(&router, rebound).await.0,
        StatusCode::MISDIRECTED_REQUEST
    );
    let mut foreign = request("GET", "/v1/apps", t, empty());
    foreign
        .headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    assert_eq!(call(&router, foreign).await.0, StatusCode::FORBIDDEN);
    expect(
        "PATCH",
        "/v1/apps/one",
        t,
        empty(),
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .await;
    expect("GET", "/v2/nothing", t, empty(), StatusCode::NOT_FOUND).await;

    // Every operation the document names was answered above.
    let document: &Value = &document;
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let missed: Vec<_> = documented.difference(&seen).collect();
    assert!(
        missed.is_empty(),
        "documented but not exercised: {missed:?}"
    );
}

#[test]
fn the_document_in_docs_is_the_one_served() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let served = http::openapi().to_pretty_json().unwrap() + "\n";
    if std::env::var_os("SAND_BLESS").is_some() {
        std::fs::write(path, &served).unwrap();
    }
    let kept = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        kept == served,
        "docs/openapi.json is not the document this gateway serves; rewrite it with \
         `SAND_BLESS=1 cargo test -p sand-gateway --test api the_document_in_docs`"
    );
}

/// The viewer's files hold no data: they are served without the token, under a policy that
/// lets the page run only its own script and style and fetch only from this origin. The API
/// behind them still wants the token.
#[tokio::test]
async fn the_viewer_is_served_without_the_token_under_a_strict_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _net) = api_with(
        dir.path(),
        Some(Token::new("sesame", "in the test").unwrap()),
    )
    .await;
    let fetch = |path: &str, token: Option<&str>| {
        let mut req = Request::get(path).header("host", "127.0.0.1:8080");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Body::empty()).unwrap();
        let router = router.clone();
        async move {
            let response = router.oneshot(req).await.unwrap();
            let status = response.status();
            let headers = response.headers().clone();
            let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, headers, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    for (path, content_type, holds) in [
        (
            "/ui",
            "text/html; charset=utf-8",
            "<script src=\"/ui/viewer.js\"",
        ),
        (
            "/ui/",
            "text/html; charset=utf-8",
            "<link rel=\"stylesheet\"",
        ),
        (
            "/ui/viewer.js",
            "text/javascript; charset=utf-8",
            "textContent",
        ),
        ("/ui/viewer.css", "text/css; charset=utf-8", ".track"),
    ] {
        let (status, headers, body) = fetch(path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let header = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(
            header("content-security-policy"),
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; frame-ancestors 'none'",
            "{path}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert!(body.contains(holds), "{path}: {body}");
    }
    // The page has no inline script or style, and draws data only as text.
    let (_, _, page) = fetch("/ui", None).await;
    assert_eq!(page.matches("<script").count(), 1, "{page}");
    assert!(
        !page.contains("style=") && !page.contains("<style"),
        "{page}"
    );
    let (_, _, script) = fetch("/ui/viewer.js", None).await;
    for unsafe_sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(
            !script.contains(unsafe_sink),
            "viewer.js uses {unsafe_sink}"
        );
    }

    let (status, _, body) = fetch("/ui/nothing.js", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, body) = fetch("/v1/executions", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _, body) = fetch("/v1/executions", Some("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _, body) = fetch("/v1/executions", Some("sesame")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
