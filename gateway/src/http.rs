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
//! | `GET /v1/openapi.json` | this table as an OpenAPI 3.1 document |
//! | `GET /ui` | the execution viewer ([`crate::ui`]): a web page, not part of the API |
//!
//! The bodies are [`sand_api`]'s types. Each route is registered together with its OpenAPI
//! description ([`utoipa_axum`]), so the document ([`openapi`], kept in `docs/openapi.json`)
//! names every route of the API there is.
//!
//! Executions are named by references ([`ExecRefs`]): unguessable from one another, so a
//! client reaches only the executions it was told of, by an answer or by the list (which, like
//! everything under `/v1`, wants the token). A malformed one is a 400; one this gateway did
//! not give out is a 404, like an unknown execution.
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

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use sand_api::{
    Accepted, Answer as AnswerBody, App, Apps, ErrorBody, ErrorCode, ErrorDetail, Execution,
    ExecutionSummary, Executions, Health, InvokeQuery, ListQuery, Removed, Status as ExecState,
    Workers, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, WAIT_SECONDS_DEFAULT, WAIT_SECONDS_MAX,
};
use sand_protocol::durable::{Answer, ExecStatus};
use sand_protocol::global_queue::InvokeError;
use sand_protocol::ids::{AppName, ExecId};
use sand_protocol::policy::AppSpec;
use sand_protocol::trace_context::TraceParent;
use sand_protocol::wire::{AppBundle, GrainError, Payload, PAYLOAD_BYTES_MAX};
use utoipa::openapi::{self, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::core::{Command, CoreHandle, CoreStopped, ExecSummary};
use crate::exec_ref::{ExecRefs, RefError};
use crate::metrics::{Metrics, Status};
use crate::store::Store;
use crate::telemetry::{Invocation, Telemetry};
use crate::token::Token;

/// The largest app bundle accepted: it travels to workers in one message.
pub const BUNDLE_BYTES_MAX: usize = 15 << 20;

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
    /// Where invocations' spans go, if anywhere.
    pub telemetry: Option<Arc<Telemetry>>,
}

/// A failed request: its status and a JSON account.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn not_found(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<CoreStopped> for ApiError {
    fn from(e: CoreStopped) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            e.to_string(),
        )
    }
}

type ApiResult = Result<Response, ApiError>;

/// The routes under `/v1`, each with its description.
fn v1_routes() -> OpenApiRouter<Api> {
    OpenApiRouter::new()
        .routes(routes!(list_apps))
        .routes(routes!(deploy, remove))
        .routes(routes!(invoke))
        .routes(routes!(executions))
        .routes(routes!(execution))
        .routes(routes!(workers))
        .routes(routes!(openapi_json))
}

/// The routes outside `/v1`, open to anyone who reaches the port.
fn open_routes() -> OpenApiRouter<Api> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(metrics))
}

/// The API's routes, with auth, body limits and JSON errors for everything that falls through.
pub fn router(api: Api) -> Router {
    let (v1, _) = v1_routes().split_for_parts();
    let (open, _) = open_routes().split_for_parts();
    let v1 = v1.layer(middleware::from_fn_with_state(api.clone(), authorize));
    Router::new()
        .nest("/v1", v1)
        .merge(open)
        .merge(crate::ui::routes())
        .fallback(|| async {
            ApiError::not_found(
                ErrorCode::NoRoute,
                "no such route; see the API table in the README",
            )
        })
        .layer(DefaultBodyLimit::max(BUNDLE_BYTES_MAX))
        .layer(middleware::from_fn_with_state(api.clone(), same_site))
        .layer(middleware::from_fn_with_state(api.clone(), count))
        .with_state(api)
}

/// The API's OpenAPI 3.1 document, made from the same route table as [`router`].
pub fn openapi() -> OpenApi {
    let mut doc = OpenApiRouter::<Api>::new()
        .nest("/v1", v1_routes())
        .merge(open_routes())
        .into_openapi();
    doc.info = openapi::InfoBuilder::new()
        .title("sand")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "The HTTP API of a sand gateway: deploy apps, invoke them, follow their executions.",
        ))
        .license(Some(
            openapi::LicenseBuilder::new().name("Apache-2.0").build(),
        ))
        .build();
    let bearer = openapi::security::HttpBuilder::new()
        .scheme(openapi::security::HttpAuthScheme::Bearer)
        .description(Some(
            "The gateway's token (`sand dev` keeps it in DATA_DIR/token)",
        ))
        .build();
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme("token", openapi::security::SecurityScheme::Http(bearer));
    for (path, item) in doc.paths.paths.iter_mut() {
        let v1 = path.starts_with("/v1/");
        for (method, op) in operations(item) {
            add_common_errors(op, v1, method == Method::POST);
            if v1 {
                op.security = Some(vec![openapi::security::SecurityRequirement::new(
                    "token",
                    Vec::<String>::new(),
                )]);
            }
        }
    }
    doc
}

/// The operations of a path, by method.
fn operations(
    item: &mut openapi::PathItem,
) -> impl Iterator<Item = (Method, &mut openapi::path::Operation)> {
    [
        (Method::GET, &mut item.get),
        (Method::PUT, &mut item.put),
        (Method::POST, &mut item.post),
        (Method::DELETE, &mut item.delete),
    ]
    .into_iter()
    .filter_map(|(method, op)| op.as_mut().map(|op| (method, op)))
}

/// Documents the refusals every route may answer with, whatever its handler does: those of
/// the middleware (host, origin, token, content type, size) and of a stopped core.
fn add_common_errors(op: &mut openapi::path::Operation, v1: bool, post: bool) {
    let mut common = vec![
        (
            StatusCode::BAD_REQUEST,
            "no Host header, or a malformed request",
        ),
        (
            StatusCode::FORBIDDEN,
            "a request from a web page of another origin",
        ),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "the route does not take this method",
        ),
        (StatusCode::PAYLOAD_TOO_LARGE, "the body is over its limit"),
        (
            StatusCode::MISDIRECTED_REQUEST,
            "a Host this API does not answer to",
        ),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the gateway failed inside",
        ),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is stopping or its store failed",
        ),
    ];
    if v1 {
        common.push((
            StatusCode::UNAUTHORIZED,
            "no bearer token, or not this gateway's",
        ));
    }
    if post {
        common.push((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body is not sent as application/json",
        ));
    }
    for (status, why) in common {
        op.responses
            .responses
            .entry(status.as_u16().to_string())
            .or_insert_with(|| error_response(why).into());
    }
}

/// A documented error answer: an [`ErrorBody`].
fn error_response(description: &str) -> openapi::Response {
    openapi::ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            openapi::ContentBuilder::new()
                .schema(Some(openapi::Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// `GET /v1/openapi.json`: the document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object))
)]
async fn openapi_json() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let text = DOCUMENT.get_or_init(|| openapi().to_pretty_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], text.as_str()).into_response()
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
                ErrorCode::Unauthorized,
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
            ErrorCode::NoHost,
            "the request has no Host header (HTTP/1.1 wants one)",
        )
    })?;
    if !host_allowed(hosts, host) {
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            ErrorCode::UnknownHost,
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
                ErrorCode::CrossOrigin,
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
                ErrorCode::NotJson,
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
            ErrorCode::TooLarge,
            format!("the body exceeds the {BUNDLE_BYTES_MAX} byte limit"),
        ),
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::MethodNotAllowed,
            "method not allowed here".into(),
        ),
        // axum's own refusal (a body that failed to arrive, say) says why in plain text.
        s if s.is_client_error() => {
            let text = axum::body::to_bytes(response.into_body(), REFUSAL_BYTES_MAX).await;
            let text = text.map(|t| String::from_utf8_lossy(&t).into_owned());
            (
                ErrorCode::BadRequest,
                text.unwrap_or_else(|_| s.to_string()),
            )
        }
        _ => return response,
    };
    ApiError::new(status, code, message).into_response()
}

fn app_name(raw: &str) -> Result<AppName, ApiError> {
    AppName::new(raw).map_err(|e| ApiError::bad_request(ErrorCode::BadAppName, e.to_string()))
}

/// A query through axum's `Query`, unknown fields refused, as an [`ErrorCode::BadQuery`].
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(ErrorCode::BadQuery, e.body_text()))
}

/// Deploys or replaces an app.
#[utoipa::path(
    put,
    path = "/apps/{app}",
    params(("app" = String, Path, description = "The app's name, as its manifest gives it")),
    request_body(
        content = String,
        content_type = "application/gzip",
        description = "The app directory as a gzip'd tar (what `sand deploy` sends)"
    ),
    responses(
        (status = 200, description = "Deployed: the reply comes once the deployment is durable", body = App),
        (status = 400, description = "`bad_app_name`, `bad_bundle` or `name_mismatch`", body = ErrorBody),
        (status = 403, description = "`refused_by_policy`: the manifest asks for more than the operator allows", body = ErrorBody),
    )
)]
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
    .map_err(internal)?;
    let manifest = checked.map_err(|e| ApiError::bad_request(ErrorCode::BadBundle, e))?;
    if manifest.name != app {
        return Err(ApiError::bad_request(
            ErrorCode::NameMismatch,
            format!(
                "the manifest names the app `{}`, the URL `{app}`",
                manifest.name
            ),
        ));
    }
    api.policy.check(&manifest).map_err(|e| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::RefusedByPolicy,
            e.to_string(),
        )
    })?;
    let spec = manifest.app_spec();
    let digest = sand_app::digest(&archive);
    let bundle = AppBundle {
        digest: digest.clone(),
        archive,
    };
    let deployed = app_of(&spec, digest);
    // The app and its code are written in one batch; the reply comes once it is durable.
    api.core
        .ask(|reply| Command::Deploy {
            spec,
            bundle,
            reply,
        })
        .await?;
    Ok(Json(deployed).into_response())
}

/// Lists the deployed apps.
#[utoipa::path(
    get,
    path = "/apps",
    responses((status = 200, description = "Every deployed app, as the disk holds them", body = Apps))
)]
async fn list_apps(State(api): State<Api>) -> ApiResult {
    let apps = api.core.ask(|reply| Command::Apps { reply }).await?;
    let apps = apps
        .into_iter()
        .map(|(spec, digest)| app_of(&spec, digest))
        .collect();
    Ok(Json(Apps { apps }).into_response())
}

/// A deployed app as the API shows it.
fn app_of(spec: &AppSpec, digest: String) -> App {
    App {
        app: spec.name.to_string(),
        digest,
        entry: spec.entry.to_string(),
        grains: spec.grains.keys().map(ToString::to_string).collect(),
    }
}

/// Removes an app, code and all; its running executions go on.
#[utoipa::path(
    delete,
    path = "/apps/{app}",
    params(("app" = String, Path, description = "The app's name")),
    responses(
        (status = 200, description = "Removed, durably", body = Removed),
        (status = 400, description = "`bad_app_name`", body = ErrorBody),
        (status = 404, description = "`unknown_app`", body = ErrorBody),
    )
)]
async fn remove(State(api): State<Api>, Path(app): Path<String>) -> ApiResult {
    let app = app_name(&app)?;
    let removed = app.to_string();
    // The app and its code go in one batch; the reply comes once it is durable.
    if api.core.ask(|reply| Command::Remove { app, reply }).await? {
        Ok(Json(Removed { removed }).into_response())
    } else {
        Err(ApiError::not_found(
            ErrorCode::UnknownApp,
            format!("app {removed} is not deployed"),
        ))
    }
}

/// How long an invocation waits for its answer, and whether it waits at all.
fn invoke_wait(q: &InvokeQuery) -> Result<Option<Duration>, ApiError> {
    if q.asynchronous == Some(true) {
        return Ok(None);
    }
    let Some(secs) = q.wait else {
        return Ok(Some(Duration::from_secs(WAIT_SECONDS_DEFAULT)));
    };
    if !(secs.is_finite() && (0.0..=WAIT_SECONDS_MAX as f64).contains(&secs)) {
        return Err(ApiError::bad_request(
            ErrorCode::BadQuery,
            format!("wait={secs}: want seconds, 0 to {WAIT_SECONDS_MAX}"),
        ));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// A JSON body as a payload; an empty body is `null`.
fn json_input(body: &[u8]) -> Result<Payload, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Payload::new(&b"null"[..]));
    }
    if body.len() > PAYLOAD_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("the input exceeds the {PAYLOAD_BYTES_MAX} byte limit"),
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| {
        ApiError::bad_request(ErrorCode::BadJson, format!("the body is not JSON: {e}"))
    })?;
    Ok(Payload::new(Bytes::copy_from_slice(body)))
}

/// The client's idempotency key, if it sent one.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 256)
        .ok_or_else(|| {
            ApiError::bad_request(
                ErrorCode::BadIdempotencyKey,
                "Idempotency-Key must be 1 to 256 visible ASCII characters",
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// Invokes an app: runs its entry grain on the body.
#[utoipa::path(
    post,
    path = "/apps/{app}/invoke",
    params(
        ("app" = String, Path, description = "The app's name"),
        InvokeQuery,
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 256 visible ASCII characters: a retried request with the same key and input finds the first execution; the same key with another input is a 422"),
        ("traceparent" = Option<String>, Header, description = "W3C Trace Context: the execution continues the caller's trace (a malformed one is ignored, and a trace starts at the gateway)"),
    ),
    request_body(
        content = serde_json::Value,
        content_type = "application/json",
        description = "The entry grain's input: any JSON value (an empty body is null)"
    ),
    responses(
        (status = 200, description = "The execution's answer, durable", body = AnswerBody),
        (status = 202, description = "Accepted, durably, and still running (`async`, or the wait ran out)", body = Accepted),
        (status = 400, description = "`bad_app_name`, `bad_query`, `bad_json` or `bad_idempotency_key`", body = ErrorBody),
        (status = 404, description = "`unknown_app`, or `unknown_execution` if the execution was forgotten before it answered", body = ErrorBody),
        (status = 413, description = "`too_large`: the input is over the payload limit", body = ErrorBody),
        (status = 422, description = "`idempotency_key_reused` with another input", body = ErrorBody),
    )
)]
async fn invoke(
    State(api): State<Api>,
    Path(app): Path<String>,
    q: Result<Query<InvokeQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let app = app_name(&app)?;
    let wait = invoke_wait(&query(q)?)?;
    let input = json_input(&body)?;
    let idempotency_key = idempotency_key(&headers)?;
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let invocation = Invocation::start(app.clone(), traceparent, api.telemetry.is_some());
    let answer = run_invocation(&api, app, input, idempotency_key, invocation.own, wait).await;
    if let (Some(telemetry), Ok((response, reference))) = (&api.telemetry, &answer) {
        telemetry.invocation(&invocation, reference, response.status().as_u16());
    }
    answer.map(|(response, _)| response)
}

/// Starts an execution under `traceparent` and answers for it, with its reference: once it
/// ended, waiting at most `wait`, or once it is accepted.
async fn run_invocation(
    api: &Api,
    app: AppName,
    input: Payload,
    idempotency_key: Option<String>,
    traceparent: TraceParent,
    wait: Option<Duration>,
) -> Result<(Response, String), ApiError> {
    let refs = api.refs.clone();
    let pending = |exec: ExecId| {
        let execution = refs.present(exec);
        let accepted = Accepted {
            execution: execution.clone(),
        };
        (
            (StatusCode::ACCEPTED, Json(accepted)).into_response(),
            execution,
        )
    };
    let Some(wait) = wait else {
        // The reply comes once the acceptance is durable.
        let invoked = api
            .core
            .ask(|reply| Command::Invoke {
                app,
                input,
                idempotency_key,
                traceparent,
                reply,
            })
            .await?
            .map_err(|e| refused(&refs, e))?;
        return Ok(pending(invoked.exec));
    };
    // One trip to the core: the answer comes once it is durable, and its batch carries the
    // acceptance with it, so the acceptance is not waited for unless the wait runs out.
    let run = api
        .core
        .ask(|reply| Command::Run {
            app,
            input,
            idempotency_key,
            traceparent,
            reply,
        })
        .await?
        .map_err(|e| refused(&refs, e))?;
    let exec = run.invoked.exec;
    let reference = refs.present(exec);
    match tokio::time::timeout(wait, run.answer).await {
        Ok(Ok(Some(answer))) => {
            let response = Json(answered(reference.clone(), &answer)).into_response();
            Ok((response, reference))
        }
        Ok(Ok(None)) => Err(ApiError::not_found(
            ErrorCode::UnknownExecution,
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
        InvokeError::UnknownApp(_) => ApiError::not_found(ErrorCode::UnknownApp, e.to_string()),
        InvokeError::TooLarge(_) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            e.to_string(),
        ),
        InvokeError::KeyReused { key, exec } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::IdempotencyKeyReused,
            format!(
                "idempotency key {key:?} was used with a different input for execution {}; use \
                 a new key for a new input",
                refs.present(exec)
            ),
        ),
    }
}

/// An answer as the API shows it.
fn answered(execution: String, answer: &Answer) -> AnswerBody {
    let (status, output, error) = outcome(answer);
    AnswerBody {
        execution,
        status,
        output,
        error,
    }
}

/// An answer's status, and its value or its error, as the API shows them.
fn outcome(answer: &Answer) -> (ExecState, Option<serde_json::Value>, Option<GrainError>) {
    match answer {
        Answer::Value(payload) => {
            let value = serde_json::from_slice(&payload.0).unwrap_or_default();
            (ExecState::Succeeded, Some(value), None)
        }
        Answer::Error(e) => (ExecState::Failed, None, Some(e.clone())),
    }
}

/// Shows an execution: where it stands, its answer, and each attempt of each call.
#[utoipa::path(
    get,
    path = "/executions/{ref}",
    params(("ref" = String, Path, description = "The execution's reference, as an invocation or a list gave it")),
    responses(
        (status = 200, description = "The execution, as the disk holds it", body = Execution),
        (status = 400, description = "`bad_execution_id`: not a reference", body = ErrorBody),
        (status = 404, description = "`unknown_execution`: never given out, or forgotten past the retention age", body = ErrorBody),
    )
)]
async fn execution(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let unknown = || ApiError::not_found(ErrorCode::UnknownExecution, format!("no execution {id}"));
    let exec = api.refs.resolve(&id).map_err(|e| match e {
        RefError::Malformed => {
            ApiError::bad_request(ErrorCode::BadExecutionId, format!("`{id}` is {e}"))
        }
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
        .map_err(internal)?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Store,
                e.to_string(),
            )
        })?;
    let mut calls: Vec<sand_api::CallTrace> = traces
        .iter()
        .filter_map(|t| serde_json::from_slice(&t.data).ok())
        .collect();
    calls.sort_by_key(|c| (c.dispatched_ms.or(c.started_ms), c.started_ms));
    let (status, output, error) = match &record.status {
        ExecStatus::Running => (ExecState::Running, None, None),
        ExecStatus::Done(answer) => outcome(answer),
    };
    Ok(Json(Execution {
        execution: id,
        app: record.app.to_string(),
        status,
        output,
        error,
        calls,
    })
    .into_response())
}

/// Lists recent executions, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/executions",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of executions, as the disk holds them", body = Executions),
        (status = 400, description = "`bad_query`, or `bad_app_name`", body = ErrorBody),
    )
)]
async fn executions(
    State(api): State<Api>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    let app = q.app.as_deref().map(app_name).transpose()?;
    let before =
        match &q.before {
            None => None,
            Some(r) => Some(api.refs.resolve(r).map_err(|e| {
                ApiError::bad_request(ErrorCode::BadQuery, format!("before={r}: {e}"))
            })?),
        };
    let limit = q.limit.unwrap_or(LIST_LIMIT_DEFAULT);
    if !(1..=LIST_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request(
            ErrorCode::BadQuery,
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
    let executions = listed.iter().map(|e| summary(&api.refs, e)).collect();
    Ok(Json(Executions { executions, next }).into_response())
}

fn summary(refs: &ExecRefs, e: &ExecSummary) -> ExecutionSummary {
    ExecutionSummary {
        execution: refs.present(e.exec),
        app: e.app.to_string(),
        status: match e.succeeded {
            None => ExecState::Running,
            Some(true) => ExecState::Succeeded,
            Some(false) => ExecState::Failed,
        },
        accepted_ms: e.accepted_ms,
        ended_ms: e.ended_ms,
        calls: e.calls,
    }
}

/// Lists the workers the gateway knows.
#[utoipa::path(
    get,
    path = "/workers",
    responses((status = 200, description = "Each worker: connected, dead, its load", body = Workers))
)]
async fn workers(State(api): State<Api>) -> ApiResult {
    let workers = api.core.ask(|reply| Command::Workers { reply }).await?;
    Ok(Json(Workers { workers }).into_response())
}

/// Liveness: the core answers.
#[utoipa::path(
    get,
    path = "/healthz",
    responses((status = 200, description = "The gateway's core answers", body = Health))
)]
async fn healthz(State(api): State<Api>) -> ApiResult {
    api.core.ask(|reply| Command::Apps { reply }).await?;
    Ok(Json(Health {
        status: "ok".into(),
    })
    .into_response())
}

/// The gateway's metrics, for Prometheus.
#[utoipa::path(
    get,
    path = "/metrics",
    responses((
        status = 200,
        description = "The metrics in the OpenMetrics text format",
        body = String,
        content_type = "application/openmetrics-text"
    ))
)]
async fn metrics(State(api): State<Api>) -> ApiResult {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &api.registry).map_err(internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// A failure inside the gateway.
fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        e.to_string(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The wait of an invocation with query `q`: `None` for an asynchronous one.
    fn wait_of(q: &str) -> Result<Option<Duration>, ApiError> {
        let uri: axum::http::Uri = format!("/v1/apps/a/invoke?{q}").parse().unwrap();
        invoke_wait(&query(Query::try_from_uri(&uri))?)
    }

    #[test]
    fn queries_parse_or_say_what_is_wrong() {
        assert_eq!(wait_of("").unwrap(), Some(Duration::from_secs(30)));
        assert_eq!(
            wait_of("wait=0.5&async=false").unwrap(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            wait_of("wait=%31.5").unwrap(),
            Some(Duration::from_millis(1500))
        );
        for asynchronous in ["async", "async=", "async=true", "async=1", "wait=2&async"] {
            assert_eq!(wait_of(asynchronous).unwrap(), None, "{asynchronous}");
        }
        for bad in [
            "wait=-1",
            "wait=abc",
            "wait=1000",
            "wait=NaN",
            "wait=inf",
            "async=maybe",
            "speed=9",
            "wait=1&wait=2",
        ] {
            let e = wait_of(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.code, ErrorCode::BadQuery, "{bad}");
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
        assert_eq!(code(Method::POST, &[host]), Err(ErrorCode::NotJson));
        assert_eq!(
            code(Method::POST, &[host, ("content-type", "text/plain")]),
            Err(ErrorCode::NotJson)
        );
        assert_eq!(
            code(Method::POST, &[host, ("content-type", "application/jsonp")]),
            Err(ErrorCode::NotJson)
        );
        for origin in ["http://evil.example", "null", "http://localhost:8081"] {
            assert_eq!(
                code(Method::GET, &[host, ("origin", origin)]),
                Err(ErrorCode::CrossOrigin),
                "{origin}"
            );
        }
        assert_eq!(code(Method::GET, &[]), Err(ErrorCode::NoHost));
        assert_eq!(
            code(Method::GET, &[("host", "evil.example")]),
            Err(ErrorCode::UnknownHost)
        );
    }

    #[test]
    fn inputs_must_be_json() {
        assert_eq!(json_input(b"").unwrap().0.as_ref(), b"null");
        assert_eq!(
            json_input(b" {\"a\": 1} ").unwrap().0.as_ref(),
            b" {\"a\": 1} "
        );
        assert_eq!(json_input(b"{nope").unwrap_err().code, ErrorCode::BadJson);
    }
}
