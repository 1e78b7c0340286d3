//! sand's HTTP API as types: what the gateway serves and what its clients (the CLI, the bench
//! harness, the end-to-end tests) read. The gateway's OpenAPI 3.1 document is generated from
//! them, so the document, the server and its clients cannot drift apart.
//!
//! Execution references are strings (see the gateway's `exec_ref`): a client only passes
//! them back.

use sand_protocol::wire::GrainError;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// The longest a synchronous invocation may wait, in seconds.
pub const WAIT_SECONDS_MAX: u64 = 300;
/// The wait of a synchronous invocation that names none, in seconds.
pub const WAIT_SECONDS_DEFAULT: u64 = 30;
/// The most executions one page of `GET /v1/executions` lists.
pub const LIST_LIMIT_MAX: usize = 100;
/// The executions a page lists when the query names no limit.
pub const LIST_LIMIT_DEFAULT: usize = 20;

/// Every failure: `{"error": {"code": ..., "message": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A failure's stable code and an account for a person.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// What kind of failure: a stable name a client may branch on.
    pub code: ErrorCode,
    /// What happened and, where it helps, how to fix it.
    pub message: String,
}

/// The kinds of failure the API answers with. Stable snake_case names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A malformed request axum itself refused (a body that did not arrive whole, say).
    BadRequest,
    /// A query parameter that is unknown or out of range.
    BadQuery,
    /// An invocation's body is not JSON.
    BadJson,
    /// An app name that is not one (see the manifest's rules).
    BadAppName,
    /// A bundle that is not a gzip'd tar of an app directory, or whose manifest is wrong.
    BadBundle,
    /// The manifest names another app than the URL.
    NameMismatch,
    /// An `Idempotency-Key` header that is empty, too long or not visible ASCII.
    BadIdempotencyKey,
    /// A string that is not an execution reference.
    BadExecutionId,
    /// The request has no `Host` header.
    NoHost,
    /// No `Authorization: Bearer TOKEN` with this gateway's token.
    Unauthorized,
    /// A deploy that asks for more than the operator's policy allows.
    RefusedByPolicy,
    /// A request from a web page of another origin.
    CrossOrigin,
    /// No such route.
    NoRoute,
    /// No such app deployed.
    UnknownApp,
    /// No such execution (or one this gateway did not name to anyone).
    UnknownExecution,
    /// The route does not take this method.
    MethodNotAllowed,
    /// A body or an input over its limit.
    TooLarge,
    /// A `POST` body without `Content-Type: application/json`.
    NotJson,
    /// A `Host` this API does not answer to (a guard against DNS rebinding).
    UnknownHost,
    /// An idempotency key used before with another input.
    IdempotencyKeyReused,
    /// The gateway failed inside (a task panicked).
    Internal,
    /// The gateway's store failed to read.
    Store,
    /// The gateway is shutting down or its store failed.
    Unavailable,
}

/// A deployed app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// Its name.
    pub app: String,
    /// The digest of its bundle: the version deployed.
    pub digest: String,
    /// The grain an invocation starts at.
    pub entry: String,
    /// Its grains, by name.
    pub grains: Vec<String>,
}

/// `GET /v1/apps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Apps {
    /// Every deployed app, by name.
    pub apps: Vec<App>,
}

/// `DELETE /v1/apps/{app}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Removed {
    /// The app removed.
    pub removed: String,
}

/// The query of `POST /v1/apps/{app}/invoke`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InvokeQuery {
    /// How long to wait for the answer, in seconds (0 to 300, default 30); past it, a 202 with
    /// the execution's reference.
    pub wait: Option<f64>,
    /// Answer at once with a 202 and the execution's reference, once its acceptance is durable
    /// (`async`, `async=true` or `async=1`).
    #[serde(rename = "async", default, deserialize_with = "flag")]
    #[param(rename = "async", value_type = Option<bool>)]
    pub asynchronous: Option<bool>,
}

/// A flag of a query string: present bare (`?async`), `true`, `1`, `false` or `0`.
fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let text = String::deserialize(d)?;
    match text.as_str() {
        "" | "true" | "1" => Ok(Some(true)),
        "false" | "0" => Ok(Some(false)),
        other => Err(serde::de::Error::custom(format!(
            "`{other}`: want true or false"
        ))),
    }
}

/// An execution accepted and still running: the 202 of an invocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    /// The execution's reference, for `GET /v1/executions/{ref}`.
    pub execution: String,
}

/// Where an execution stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Its answer is not durable yet.
    Running,
    /// It answered with a value.
    Succeeded,
    /// It answered with an error.
    Failed,
}

impl Status {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
        }
    }
}

/// An execution's answer: the 200 of a synchronous invocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// The execution's reference.
    pub execution: String,
    /// `succeeded` or `failed`.
    pub status: Status,
    /// The value, if it succeeded (JSON; may be `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<GrainError>,
}

/// `GET /v1/executions/{ref}`: where an execution stands, its answer once it has one, and
/// each attempt of each of its calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Execution {
    /// The execution's reference.
    pub execution: String,
    /// The app invoked.
    pub app: String,
    /// Where it stands.
    pub status: Status,
    /// The value, if it succeeded (JSON; may be `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<GrainError>,
    /// Each attempt of each call, in the order they were dispatched or started.
    pub calls: Vec<CallTrace>,
}

/// How one attempt of one call went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CallTrace {
    /// The call, as printed (16 hex digits).
    pub call: String,
    /// The grain.
    pub grain: String,
    /// The attempt.
    pub attempt: u64,
    /// The worker it ran on.
    pub worker: u32,
    /// `gateway` if the gateway dispatched it, `local` if its worker's local bus did.
    pub via: Via,
    /// Why it ran: `first`, `retry` or `recovery` (the gateway's reason for dispatching it);
    /// `local` if its worker's local bus ran it.
    pub reason: Reason,
    /// True if it re-ran a call whose owner was lost.
    pub recovery: bool,
    /// When the gateway dispatched it (ms since the Unix epoch), if it did.
    pub dispatched_ms: Option<u64>,
    /// When it started on its worker (ms since the Unix epoch), once the worker reported.
    pub started_ms: Option<u64>,
    /// When it ended on its worker.
    pub ended_ms: Option<u64>,
    /// How it failed, if it did.
    pub error: Option<GrainError>,
    /// What it printed on stdout (bounded by the worker; invalid UTF-8 replaced).
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
    /// The start of its input: at most
    /// [`PREVIEW_BYTES_MAX`](sand_protocol::wire::PREVIEW_BYTES_MAX) bytes, invalid UTF-8
    /// replaced.
    #[serde(default)]
    pub input: String,
    /// True if `input` is only the start of a longer input.
    #[serde(default)]
    pub input_cut: bool,
    /// The start of the value it returned, bounded like `input`; `null` if it chained, fanned
    /// out or failed, or its worker has not reported.
    #[serde(default)]
    pub output: Option<String>,
    /// True if `output` is only the start of a longer value.
    #[serde(default)]
    pub output_cut: bool,
    /// The calls it emitted (16 hex digits each): its `next`, or its fan-out's branches then
    /// their join.
    #[serde(default)]
    pub emitted: Vec<String>,
}

/// Which queue started a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The gateway's global queue dispatched it.
    Gateway,
    /// Its worker's local bus started it.
    Local,
}

impl Via {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Gateway => "gateway",
            Via::Local => "local",
        }
    }
}

/// Why a call ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The gateway's first dispatch of it.
    First,
    /// The gateway retried it after a failed attempt.
    Retry,
    /// The gateway re-ran it after its owner was lost.
    Recovery,
    /// Its worker's local bus ran it.
    Local,
}

impl Reason {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::First => "first",
            Reason::Retry => "retry",
            Reason::Recovery => "recovery",
            Reason::Local => "local",
        }
    }
}

/// The query of `GET /v1/executions`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this app's executions.
    pub app: Option<String>,
    /// Only executions older than this one: the `next` of the page before.
    pub before: Option<String>,
    /// At most this many (1 to 100, default 20).
    pub limit: Option<usize>,
}

/// `GET /v1/executions`: a page of recent executions, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Executions {
    /// The executions of this page.
    pub executions: Vec<ExecutionSummary>,
    /// The `before` of the next page; `null` on the last.
    pub next: Option<String>,
}

/// An execution as a list shows it: where it stands, not its output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutionSummary {
    /// The execution's reference.
    pub execution: String,
    /// The app invoked.
    pub app: String,
    /// Where it stands.
    pub status: Status,
    /// When it was accepted, in ms since the Unix epoch.
    pub accepted_ms: u64,
    /// When it ended, if it has.
    pub ended_ms: Option<u64>,
    /// The calls it has made so far, its entry call included.
    pub calls: u32,
}

/// A worker as the gateway sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Worker {
    /// The worker's id.
    pub id: u32,
    /// Its current incarnation.
    pub incarnation: u64,
    /// Whether it is connected now.
    pub connected: bool,
    /// Whether its current incarnation was declared dead.
    pub dead: bool,
    /// Calls the gateway sees it owning.
    pub load: usize,
}

/// `GET /v1/workers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Workers {
    /// Every worker the gateway knows, by id.
    pub workers: Vec<Worker>,
}

/// `GET /healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_with_a_null_output_is_told_from_an_error_by_its_status() {
        let text = r#"{"execution":"e","status":"succeeded","output":null}"#;
        let answer: Answer = serde_json::from_str(text).unwrap();
        assert_eq!(answer.status, Status::Succeeded);
        assert_eq!(answer.error, None);
        let text =
            r#"{"execution":"e","status":"failed","error":{"kind":"timeout","message":"m"}}"#;
        let answer: Answer = serde_json::from_str(text).unwrap();
        assert_eq!(answer.error.unwrap().message, "m");
    }

    #[test]
    fn names_are_the_serialised_ones() {
        for s in [Status::Running, Status::Succeeded, Status::Failed] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for v in [Via::Gateway, Via::Local] {
            assert_eq!(serde_json::to_value(v).unwrap(), v.as_str());
        }
        for r in [
            Reason::First,
            Reason::Retry,
            Reason::Recovery,
            Reason::Local,
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
    }

    #[test]
    fn an_unknown_field_is_refused_not_dropped() {
        let text = r#"{"execution":"e","colour":"red"}"#;
        assert!(serde_json::from_str::<Accepted>(text).is_err());
    }
}
