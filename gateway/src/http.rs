//! The HTTP API (JSON): deploy apps, invoke them, follow executions, watch the cluster.
//!
//! | route | what |
//! |---|---|
//! | `PUT /v1/apps/{app}` | deploy or replace, body: the app directory as a gzip'd tar |
//! | `GET /v1/apps`, `DELETE /v1/apps/{app}` | list, remove |
//! | `POST /v1/apps/{app}/invoke[?wait=S][&async=true]` | run, body: the entry grain's JSON input |
//! | `GET /v1/executions[?app=A][&before=REF][&limit=N]` | recent executions, newest first |
//! | `GET /v1/executions/{id}` | status, output or error, and the trace of every call |
//! | `GET /v1/workers`, `GET /healthz`, `GET /metrics` | cluster, liveness, Prometheus |
//! | `GET /ui` | the execution viewer ([`crate::ui`]) |
//!
//! Executions are named by references ([`ExecRefs`]): unguessable, so a client reaches only
//! the executions it was told of. A malformed one is a 400; one this gateway did not give out
//! is a 404, like an unknown execution.
//!
//! A deploy that asks for more than the operator's policy allows (a host interpreter, network,
//! memory) is a 403 `refused_by_policy` naming the key and the flag that would allow it.
//! Every failure is a 4xx or 5xx with `{"error": {"code": ..., "message": ...}}`. With a token
//! configured, every `/v1` route wants `Authorization: Bearer TOKEN`.
//!
//! Every route refuses what a browser tricked by another site would send:
//! a `Host` that is not `localhost`, an IP address or a name the operator gave (DNS
//! rebinding), an `Origin` other than the host's own, and a `POST` whose body is not
//! `application/json` (a cross-site form post).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use sand_protocol::durable::{Answer, ExecStatus};
use sand_protocol::global_queue::InvokeError;
use sand_protocol::ids::{AppName, ExecId};
use sand_protocol::wire::{AppBundle, Payload, PAYLOAD_BYTES_MAX};
use serde_json::{json, Value};

use crate::core::{Command, CoreHandle, CoreStopped, ExecSummary};
use crate::exec_ref::{ExecRefs, RefError};
use crate::metrics::{Metrics, Status};
use crate::store::Store;
use crate::token::Token;
use crate::trace::CallTrace;

/// The largest app bundle accepted: it travels to workers in one message.
pub const BUNDLE_BYTES_MAX: usize = 15 << 20;
/// The longest a synchronous invocation may wait, in seconds.
pub const WAIT_SECONDS_MAX: u64 = 300;
/// The wait of a synchronous invocation that names none, in seconds.
pub const WAIT_SECONDS_DEFAULT: u64 = 30;

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    /// The core.
    pub core: CoreHandle,
    /// The store, for bundles and traces.
    pub store: Arc<Store>,
    /// The metrics, for counting answers.
    pub metrics: Arc<Metrics>,
    /// The registry `/metrics` encodes.
    pub registry: Arc<Registry>,
    /// The bearer token `/v1` wants, if any.
    pub token: Option<Arc<Token>>,
    /// Host names, besides `localhost` and IP addresses, requests may name.
    pub hosts: Arc<[String]>,
    /// What apps may ask of the host, checked at deploy.
    pub policy: Arc<sand_app::Policy>,
    /// Names executions to clients.
    pub refs: Arc<ExecRefs>,
}

/// A failed request: its status and a JSON account.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<CoreStopped> for ApiError {
    fn from(e: CoreStopped) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    }
}

type ApiResult = Result<Response, ApiError>;

/// The API's routes, with auth, body limits and JSON errors for everything that falls through.
pub fn router(api: Api) -> Router {
    let v1 = Router::new()
        .route("/apps", get(list_apps))
        .route("/apps/{app}", put(deploy).delete(remove))
        .route("/apps/{app}/invoke", post(invoke))
        .route("/executions", get(executions))
        .route("/executions/{id}", get(execution))
        .route("/workers", get(workers))
        .layer(middleware::from_fn_with_state(api.clone(), authorize));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(crate::ui::routes())
        .fallback(|| async {
            ApiError::not_found("no_route", "no such route; see the API table in the README")
        })
        .layer(DefaultBodyLimit::max(BUNDLE_BYTES_MAX))
        .layer(middleware::from_fn_with_state(api.clone(), same_site))
        .layer(middleware::from_fn_with_state(api.clone(), count))
        .with_state(api)
}

async fn authorize(State(api): State<Api>, req: Request, next: Next) -> Response {
    if let Some(token) = &api.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !given.is_some_and(|given| token.matches(given)) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this gateway wants `Authorization: Bearer TOKEN` with its token (`sand dev` \
                 keeps it in DATA_DIR/token; the CLI reads --token-file or SAND_TOKEN)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Refuses what a browser would send on behalf of another site: a `Host` the API does not
/// answer to (a DNS rebinding: `evil.example` made to resolve to this address), an `Origin`
/// other than the `Host` (a cross-origin request), and a `POST` whose body is not
/// `application/json` (a cross-site form post, which browsers send as `text/plain` or a form
/// encoding without asking). Bundle uploads are `PUT`s, which a browser sends cross-site
/// only after a CORS preflight this API never grants.
async fn same_site(State(api): State<Api>, req: Request, next: Next) -> Response {
    match check_same_site(&api.hosts, req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn check_same_site(hosts: &[String], method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let host = text(header::HOST).ok_or_else(|| {
        ApiError::bad_request(
            "no_host",
            "the request has no Host header (HTTP/1.1 wants one)",
        )
    })?;
    if !host_allowed(hosts, host) {
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
            format!(
                "this API answers to localhost, IP addresses and the names its operator gives \
                 with --http-host, not to `{host}` (a guard against DNS rebinding)"
            ),
        ));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let authority = origin.split_once("://").map(|(_, rest)| rest);
        if !authority.is_some_and(|a| a.eq_ignore_ascii_case(host)) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "a request from the web page at `{origin}` may not use this API at `{host}`"
                ),
            ));
        }
    }
    if method == Method::POST {
        let media_type = text(header::CONTENT_TYPE)
            .and_then(|t| t.split(';').next())
            .map(str::trim);
        if !media_type.is_some_and(|t| t.eq_ignore_ascii_case("application/json")) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not_json",
                "a POST body must come with `Content-Type: application/json`",
            ));
        }
    }
    Ok(())
}

/// Whether the API answers to `host` (a `Host` header: a name or an address, and a port).
/// An IP address cannot be rebound: a browser sends it only to a page loaded from that very
/// address. `localhost` resolves on this machine, not through an attacker's DNS. Any other
/// name must be one the operator gave. The port is not checked: a rebinding attacker names
/// the right one anyway, and port forwards (`ssh -L 9000:localhost:8080`) change it.
fn host_allowed(hosts: &[String], host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The most of axum's plain-text refusal kept as an error's message.
const REFUSAL_BYTES_MAX: usize = 4096;

/// Counts answers by status; refuses a body whose announced length is over the limit before
/// it is sent; turns axum's plain-text refusals (body too large, bad method) into JSON errors.
async fn count(State(api): State<Api>, req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let response = match announced {
        Some(n) if n > BUNDLE_BYTES_MAX as u64 => StatusCode::PAYLOAD_TOO_LARGE.into_response(),
        _ => next.run(req).await,
    };
    let status = response.status();
    api.metrics
        .http_requests
        .get_or_create(&Status {
            code: status.as_u16(),
        })
        .inc();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.is_success() || is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "too_large",
            format!("the body exceeds the {BUNDLE_BYTES_MAX} byte limit"),
        ),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "method not allowed here".into()),
        // axum's own refusal (a body that failed to arrive, say) says why in plain text.
        s if s.is_client_error() => {
            let text = axum::body::to_bytes(response.into_body(), REFUSAL_BYTES_MAX).await;
            let text = text.map(|t| String::from_utf8_lossy(&t).into_owned());
            ("bad_request", text.unwrap_or_else(|_| s.to_string()))
        }
        _ => return response,
    };
    ApiError::new(status, code, message).into_response()
}

fn app_name(raw: &str) -> Result<AppName, ApiError> {
    AppName::new(raw).map_err(|e| ApiError::bad_request("bad_app_name", e.to_string()))
}

async fn deploy(State(api): State<Api>, Path(app): Path<String>, body: Bytes) -> ApiResult {
    let app = app_name(&app)?;
    let archive = body;
    let checked = tokio::task::spawn_blocking({
        let archive = archive.clone();
        move || -> Result<sand_app::Manifest, String> {
            let scratch = tempfile::tempdir().map_err(|e| format!("no scratch space: {e}"))?;
            sand_app::unpack(&archive, &scratch.path().join("app")).map_err(|e| e.to_string())
        }
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let manifest = checked.map_err(|e| ApiError::bad_request("bad_bundle", e))?;
    if manifest.name != app {
        return Err(ApiError::bad_request(
            "name_mismatch",
            format!(
                "the manifest names the app `{}`, the URL `{app}`",
                manifest.name
            ),
        ));
    }
    api.policy
        .check(&manifest)
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "refused_by_policy", e.to_string()))?;
    let spec = manifest.app_spec();
    let digest = sand_app::digest(&archive);
    let bundle = AppBundle {
        digest: digest.clone(),
        archive,
    };
    let grains: Vec<String> = spec.grains.keys().map(ToString::to_string).collect();
    let entry = spec.entry.to_string();
    // The app and its code are written in one batch; the reply comes once it is durable.
    api.core
        .ask(|reply| Command::Deploy {
            spec,
            bundle,
            reply,
        })
        .await?;
    Ok(
        Json(json!({"app": app.as_str(), "digest": digest, "entry": entry, "grains": grains}))
            .into_response(),
    )
}

async fn list_apps(State(api): State<Api>) -> ApiResult {
    let apps = api.core.ask(|reply| Command::Apps { reply }).await?;
    let apps: Vec<Value> = apps
        .into_iter()
        .map(|(spec, digest)| {
            json!({
                "app": spec.name.as_str(),
                "entry": spec.entry.as_str(),
                "grains": spec.grains.keys().map(|g| g.as_str()).collect::<Vec<_>>(),
                "digest": digest,
            })
        })
        .collect();
    Ok(Json(json!({ "apps": apps })).into_response())
}

async fn remove(State(api): State<Api>, Path(app): Path<String>) -> ApiResult {
    let app = app_name(&app)?;
    let name = app.as_str().to_owned();
    // The app and its code go in one batch; the reply comes once it is durable.
    if api.core.ask(|reply| Command::Remove { app, reply }).await? {
        Ok(Json(json!({ "removed": name })).into_response())
    } else {
        Err(ApiError::not_found(
            "unknown_app",
            format!("app {name} is not deployed"),
        ))
    }
}

/// The query of an invocation.
#[derive(Debug, PartialEq, Eq)]
struct InvokeQuery {
    wait: Duration,
    asynchronous: bool,
}

fn invoke_query(raw: Option<&str>) -> Result<InvokeQuery, ApiError> {
    let mut q = InvokeQuery {
        wait: Duration::from_secs(WAIT_SECONDS_DEFAULT),
        asynchronous: false,
    };
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "wait" => {
                let secs: f64 = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "bad_query",
                            format!("wait={value}: want seconds, a number >= 0"),
                        )
                    })?;
                if secs > WAIT_SECONDS_MAX as f64 {
                    return Err(ApiError::bad_request(
                        "bad_query",
                        format!("wait={value}: at most {WAIT_SECONDS_MAX} seconds"),
                    ));
                }
                q.wait = Duration::from_secs_f64(secs);
            }
            "async" => {
                q.asynchronous = match value {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::bad_request(
                            "bad_query",
                            format!("async={value}: want true or false"),
                        ))
                    }
                }
            }
            _ => {
                return Err(ApiError::bad_request(
                    "bad_query",
                    format!("unknown query parameter `{key}`; known: wait, async"),
                ))
            }
        }
    }
    Ok(q)
}

/// A JSON body as a payload; an empty body is `null`.
fn json_input(body: &[u8]) -> Result<Payload, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Payload::new(&b"null"[..]));
    }
    if body.len() > PAYLOAD_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the input exceeds the {PAYLOAD_BYTES_MAX} byte limit"),
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map_err(|e| ApiError::bad_request("bad_json", format!("the body is not JSON: {e}")))?;
    Ok(Payload::new(Bytes::copy_from_slice(body)))
}

async fn invoke(
    State(api): State<Api>,
    Path(app): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let app = app_name(&app)?;
    let q = invoke_query(query.as_deref())?;
    let input = json_input(&body)?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 256)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_idempotency_key",
                        "Idempotency-Key must be 1 to 256 visible ASCII characters",
                    )
                })?
                .to_owned(),
        ),
    };
    let refs = api.refs.clone();
    let pending = |exec: ExecId| {
        (
            StatusCode::ACCEPTED,
            Json(json!({"execution": refs.present(exec)})),
        )
            .into_response()
    };
    if q.asynchronous {
        // The reply comes once the acceptance is durable.
        let invoked = api
            .core
            .ask(|reply| Command::Invoke {
                app,
                input,
                idempotency_key,
                reply,
            })
            .await?
            .map_err(|e| refused(&refs, e))?;
        return Ok(pending(invoked.exec));
    }
    // One trip to the core: the answer comes once it is durable, and its batch carries the
    // acceptance with it, so the acceptance is not waited for unless the wait runs out.
    let run = api
        .core
        .ask(|reply| Command::Run {
            app,
            input,
            idempotency_key,
            reply,
        })
        .await?
        .map_err(|e| refused(&refs, e))?;
    let exec = run.invoked.exec;
    let reference = refs.present(exec);
    match tokio::time::timeout(q.wait, run.answer).await {
        Ok(Ok(Some(answer))) => Ok(Json(answered(&reference, &answer)).into_response()),
        Ok(Ok(None)) => Err(ApiError::not_found(
            "unknown_execution",
            format!("execution {reference} was forgotten"),
        )),
        Ok(Err(_)) => Err(CoreStopped.into()),
        Err(_) => {
            // The client learns the id without the answer: only once the acceptance is durable.
            let invoked = run
                .accepted
                .await
                .map_err(|_| CoreStopped)?
                .map_err(|e| refused(&refs, e))?;
            Ok(pending(invoked.exec))
        }
    }
}

/// The API's account of a refused invocation.
fn refused(refs: &ExecRefs, e: InvokeError) -> ApiError {
    match e {
        InvokeError::UnknownApp(_) => ApiError::not_found("unknown_app", e.to_string()),
        InvokeError::TooLarge(_) => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
        }
        InvokeError::KeyReused { key, exec } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!(
                "idempotency key {key:?} was used with a different input for execution {}; use \
                 a new key for a new input",
                refs.present(exec)
            ),
        ),
    }
}

/// `{"execution": REF, "output": ...}` or `{"execution": REF, "error": {...}}`.
fn answered(reference: &str, answer: &Answer) -> Value {
    match answer {
        Answer::Value(payload) => {
            let output = serde_json::from_slice::<Value>(&payload.0).unwrap_or(Value::Null);
            json!({"execution": reference, "output": output})
        }
        Answer::Error(e) => json!({
            "execution": reference,
            "error": {"kind": e.kind, "message": e.message},
        }),
    }
}

async fn execution(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let unknown = || ApiError::not_found("unknown_execution", format!("no execution {id}"));
    let exec = api.refs.resolve(&id).map_err(|e| match e {
        RefError::Malformed => ApiError::bad_request("bad_execution_id", format!("`{id}` is {e}")),
        RefError::Unknown => unknown(),
    })?;
    let record = api
        .core
        .ask(|reply| Command::Execution { exec, reply })
        .await?
        .ok_or_else(unknown)?;
    let store = api.store.clone();
    let traces = tokio::task::spawn_blocking(move || store.traces(exec))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()))?;
    let mut calls: Vec<CallTrace> = traces
        .iter()
        .filter_map(|t| serde_json::from_slice(&t.data).ok())
        .collect();
    calls.sort_by_key(|c| (c.dispatched_ms.or(c.started_ms), c.started_ms));
    let mut body = match &record.status {
        ExecStatus::Running => json!({"execution": id, "status": "running"}),
        ExecStatus::Done(answer) => {
            let mut v = answered(&id, answer);
            let status = match answer {
                Answer::Value(_) => "succeeded",
                Answer::Error(_) => "failed",
            };
            v["status"] = status.into();
            v
        }
    };
    body["app"] = record.app.as_str().into();
    body["calls"] = serde_json::to_value(calls).unwrap_or_default();
    Ok(Json(body).into_response())
}

/// The most executions one page of `GET /v1/executions` lists.
pub const LIST_LIMIT_MAX: usize = 100;
/// The executions a page lists when the query names no limit.
pub const LIST_LIMIT_DEFAULT: usize = 20;

/// The query of `GET /v1/executions`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only this app's executions.
    app: Option<String>,
    /// Only executions older than this one: the `next` of the page before.
    before: Option<String>,
    /// At most this many.
    limit: Option<usize>,
}

async fn executions(
    State(api): State<Api>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let app = q.app.as_deref().map(app_name).transpose()?;
    let before = match &q.before {
        None => None,
        Some(r) => Some(
            api.refs
                .resolve(r)
                .map_err(|e| ApiError::bad_request("bad_query", format!("before={r}: {e}")))?,
        ),
    };
    let limit = q.limit.unwrap_or(LIST_LIMIT_DEFAULT);
    if !(1..=LIST_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request(
            "bad_query",
            format!("limit={limit}: want 1 to {LIST_LIMIT_MAX}"),
        ));
    }
    let listed = api
        .core
        .ask(|reply| Command::Executions {
            before,
            app,
            limit,
            reply,
        })
        .await?;
    let next = (listed.len() == limit)
        .then(|| listed.last().map(|e| api.refs.present(e.exec)))
        .flatten();
    let executions: Vec<Value> = listed.iter().map(|e| summary(&api.refs, e)).collect();
    Ok(Json(json!({"executions": executions, "next": next})).into_response())
}

fn summary(refs: &ExecRefs, e: &ExecSummary) -> Value {
    let status = match e.succeeded {
        None => "running",
        Some(true) => "succeeded",
        Some(false) => "failed",
    };
    json!({
        "execution": refs.present(e.exec),
        "app": e.app.as_str(),
        "status": status,
        "accepted_ms": e.accepted_ms,
        "ended_ms": e.ended_ms,
        "calls": e.calls,
    })
}

async fn workers(State(api): State<Api>) -> ApiResult {
    let workers = api.core.ask(|reply| Command::Workers { reply }).await?;
    Ok(Json(json!({ "workers": workers })).into_response())
}

async fn healthz(State(api): State<Api>) -> ApiResult {
    api.core.ask(|reply| Command::Apps { reply }).await?;
    Ok(Json(json!({"status": "ok"})).into_response())
}

async fn metrics(State(api): State<Api>) -> ApiResult {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &api.registry)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_or_say_what_is_wrong() {
        assert_eq!(
            invoke_query(None).unwrap(),
            InvokeQuery {
                wait: Duration::from_secs(30),
                asynchronous: false
            }
        );
        let q = invoke_query(Some("wait=0.5&async=false")).unwrap();
        assert_eq!(q.wait, Duration::from_millis(500));
        assert!(invoke_query(Some("async")).unwrap().asynchronous);
        for bad in ["wait=-1", "wait=abc", "wait=1000", "async=maybe", "speed=9"] {
            let e = invoke_query(Some(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.code, "bad_query");
        }
    }

    #[test]
    fn hosts_are_localhost_ip_addresses_or_named_by_the_operator() {
        let named = ["sand.example".to_owned()];
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "localhost.:8080",
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:8080",
            "[2001:db8::1]",
            "sand.example:443",
            "Sand.Example",
        ] {
            assert!(host_allowed(&named, ok), "{ok}");
        }
        for refused in [
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "[::1",
            "[evil]:80",
            "",
            "sand.example.evil",
        ] {
            assert!(!host_allowed(&named, refused), "{refused}");
        }
    }

    #[test]
    fn only_same_site_json_posts_pass() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let json = ("content-type", "Application/JSON; charset=utf-8");
        let host = ("host", "localhost:8080");
        let code = |method: Method, pairs: &[(&'static str, &'static str)]| {
            check_same_site(&[], &method, &headers(pairs)).map_err(|e| e.code)
        };
        assert_eq!(code(Method::POST, &[host, json]), Ok(()));
        assert_eq!(
            code(
                Method::POST,
                &[host, json, ("origin", "http://localhost:8080")]
            ),
            Ok(())
        );
        assert_eq!(
            code(Method::PUT, &[host]),
            Ok(()),
            "bundles keep their type"
        );
        assert_eq!(code(Method::POST, &[host]), Err("not_json"));
        assert_eq!(
            code(Method::POST, &[host, ("content-type", "text/plain")]),
            Err("not_json")
        );
        assert_eq!(
            code(Method::POST, &[host, ("content-type", "application/jsonp")]),
            Err("not_json")
        );
        for origin in ["http://evil.example", "null", "http://localhost:8081"] {
            assert_eq!(
                code(Method::GET, &[host, ("origin", origin)]),
                Err("cross_origin"),
                "{origin}"
            );
        }
        assert_eq!(code(Method::GET, &[]), Err("no_host"));
        assert_eq!(
            code(Method::GET, &[("host", "evil.example")]),
            Err("unknown_host")
        );
    }

    #[test]
    fn inputs_must_be_json() {
        assert_eq!(json_input(b"").unwrap().0.as_ref(), b"null");
        assert_eq!(
            json_input(b" {\"a\": 1} ").unwrap().0.as_ref(),
            b" {\"a\": 1} "
        );
        assert_eq!(json_input(b"{nope").unwrap_err().code, "bad_json");
    }
}
