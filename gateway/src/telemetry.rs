//! OpenTelemetry: each execution as a trace, sent to an OTLP collector (`--otlp-endpoint`).
//!
//! An invocation is a server span of the gateway's, a child of the client's span when the
//! request carried a W3C `traceparent`. Each run of a grain is a span, a child of the run that
//! emitted its call (the entry call's parent is the invocation), whether it ran on a worker's
//! local bus or through the gateway, with the OpenTelemetry FaaS attributes, the worker, the
//! attempt, and why it was dispatched (a retry, a **recovery**).
//!
//! The spans are made here, at the gateway, from the accounts workers already send of their
//! runs (`RunTrace`), not by the workers: a run's span id is derived from its call and attempt
//! ([`TraceParent::run`]), so the worker that emitted a call and the gateway that exports its
//! run name the same span without a word between them. They go to the SDK's batch processor,
//! which exports them over OTLP/HTTP (protobuf) from a thread of its own and drops spans past
//! its queue (2,048 by default, `OTEL_BSP_MAX_QUEUE_SIZE`) rather than grow.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use ring::rand::{SecureRandom, SystemRandom};
use sand_api::CallTrace;
use sand_protocol::ids::AppName;
use sand_protocol::trace_context::TraceParent;
use sand_protocol::wire::RunTrace;

/// The path an OTLP/HTTP collector takes traces at, below its base URL.
const TRACES_PATH: &str = "/v1/traces";

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot export to the OTLP endpoint {endpoint}: {why}")]
pub struct TelemetryError {
    endpoint: String,
    why: String,
}

/// The exporter of execution spans.
#[derive(Debug)]
pub struct Telemetry {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
}

impl Telemetry {
    /// Exports to the OTLP/HTTP collector at `endpoint`: its base URL (`http://host:4318`,
    /// as `OTEL_EXPORTER_OTLP_ENDPOINT` gives it), or the full URL of its traces path. The
    /// batch processor takes its settings from the `OTEL_BSP_*` variables, and the resource
    /// its service name from `OTEL_SERVICE_NAME` (default `sand`).
    pub fn otlp(endpoint: &str) -> Result<Self, TelemetryError> {
        let failed = |why: String| TelemetryError {
            endpoint: endpoint.to_owned(),
            why,
        };
        if !endpoint.starts_with("http://") {
            return Err(failed(
                "it must be an http:// URL (no TLS is built in: run a collector on the host)"
                    .into(),
            ));
        }
        let base = endpoint.trim_end_matches('/');
        let url = if base.ends_with(TRACES_PATH) {
            base.to_owned()
        } else {
            format!("{base}{TRACES_PATH}")
        };
        let exporter = SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let mut processor = BatchSpanProcessor::builder(exporter).build();
        let named = std::env::var_os("OTEL_SERVICE_NAME").is_some();
        let resource = if named {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name("sand").build()
        };
        processor.set_resource(&resource);
        let scope = InstrumentationScope::builder("sand-gateway")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        Ok(Self { processor, scope })
    }

    /// Exports an invocation's span, ended now with the HTTP status it answered.
    pub fn invocation(&self, invocation: &Invocation, execution: &str, http_status: u16) {
        let own = invocation.own;
        if !own.sampled() {
            return;
        }
        let parent = invocation.client.map_or([0; 8], |c| c.span_id);
        let attributes = vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("http.route", "/v1/apps/{app}/invoke"),
            KeyValue::new("http.response.status_code", i64::from(http_status)),
            KeyValue::new("sand.app", invocation.app.to_string()),
            KeyValue::new("sand.execution", execution.to_owned()),
        ];
        let status = if http_status >= 500 {
            Status::error(format!("answered {http_status}"))
        } else {
            Status::Unset
        };
        self.export(Span {
            own,
            parent,
            parent_is_remote: invocation.client.is_some(),
            kind: SpanKind::Server,
            name: Cow::Borrowed("POST /v1/apps/{app}/invoke"),
            start: invocation.start,
            end: SystemTime::now(),
            attributes,
            status,
        });
    }

    /// Exports a run's span: the worker's account `run` as the trace entry `entry` tells it
    /// (with the gateway's reason for it), of an execution of `app`.
    pub fn run(&self, run: &RunTrace, entry: &CallTrace, app: Option<&AppName>) {
        if !run.traceparent.sampled() {
            return;
        }
        let entry_call = run.call == run.exec.root_call();
        let mut attributes = vec![
            KeyValue::new("faas.invocation_id", entry.call.clone()),
            KeyValue::new("faas.invoked_name", run.grain.to_string()),
            KeyValue::new("faas.trigger", if entry_call { "http" } else { "other" }),
            KeyValue::new("faas.coldstart", run.cold),
            KeyValue::new("sand.attempt", entry.attempt as i64),
            KeyValue::new("sand.worker", i64::from(entry.worker)),
            KeyValue::new("sand.via", entry.via.as_str()),
            KeyValue::new("sand.reason", entry.reason.as_str()),
            KeyValue::new("sand.recovery", entry.recovery),
        ];
        if let Some(app) = app {
            attributes.push(KeyValue::new("sand.app", app.to_string()));
        }
        let status = match &run.error {
            None => Status::Unset,
            Some(e) => {
                attributes.push(KeyValue::new("error.type", e.kind.name()));
                Status::error(e.message.clone())
            }
        };
        let at = |us: u64| UNIX_EPOCH + Duration::from_micros(us);
        self.export(Span {
            own: run.traceparent.run(run.call, run.attempt),
            parent: run.traceparent.span_id,
            parent_is_remote: false,
            kind: SpanKind::Server,
            name: Cow::Owned(run.grain.to_string()),
            start: at(run.started_us),
            end: at(run.ended_us.max(run.started_us)),
            attributes,
            status,
        });
    }

    fn export(&self, span: Span) {
        let flags = TraceFlags::SAMPLED;
        let span_context = SpanContext::new(
            TraceId::from_bytes(span.own.trace_id),
            SpanId::from_bytes(span.own.span_id),
            flags,
            false,
            TraceState::default(),
        );
        self.processor.on_end(SpanData {
            span_context,
            parent_span_id: SpanId::from_bytes(span.parent),
            parent_span_is_remote: span.parent_is_remote,
            span_kind: span.kind,
            name: span.name,
            start_time: span.start,
            end_time: span.end,
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: span.status,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

/// The spans still queued are exported when the last user lets go (the gateway stops),
/// waiting at most the export timeout.
impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(e) = self.processor.shutdown() {
            tracing::warn!("the last spans were not exported: {e}");
        }
    }
}

/// What one exported span says.
struct Span {
    own: TraceParent,
    parent: [u8; 8],
    parent_is_remote: bool,
    kind: SpanKind,
    name: Cow<'static, str>,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    status: Status,
}

/// An invocation's place in the trace: the client's span, if its request named one, and the
/// gateway's span, which the entry call hangs from.
#[derive(Clone, Debug)]
pub struct Invocation {
    /// The client's context, from its `traceparent` header.
    pub client: Option<TraceParent>,
    /// The gateway's span of the invocation (no trace when nothing asks for one).
    pub own: TraceParent,
    /// When the request came.
    pub start: SystemTime,
    /// The app invoked.
    pub app: AppName,
}

impl Invocation {
    /// The invocation of `app` by a request with `traceparent` (the header, if it came). A
    /// valid header continues the client's trace; without one, a trace starts here when
    /// `exporting`, and there is none otherwise (nobody would see its root).
    pub fn start(app: AppName, traceparent: Option<&str>, exporting: bool) -> Self {
        let client = traceparent.and_then(TraceParent::parse);
        let own = match (client, exporting) {
            (Some(client), true) => random().map(|span_id| TraceParent { span_id, ..client }),
            // Nothing of the gateway's is exported: the entry call hangs from the client.
            (Some(client), false) => Some(client),
            (None, true) => random()
                .zip(random())
                .map(|(trace_id, span_id)| TraceParent::new(trace_id, span_id, true)),
            (None, false) => None,
        };
        Self {
            client,
            own: own.or(client).unwrap_or_default(),
            start: SystemTime::now(),
            app,
        }
    }
}

/// Random bytes for an id; `None` if the OS's generator failed (then there is no trace).
fn random<const N: usize>() -> Option<[u8; N]> {
    let mut bytes = [0; N];
    SystemRandom::new().fill(&mut bytes).ok()?;
    (bytes != [0; N]).then_some(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn app() -> AppName {
        AppName::new("shop").unwrap()
    }

    #[test]
    fn an_invocation_continues_its_client_trace_or_starts_one_when_spans_go_somewhere() {
        let client = TraceParent::parse(CLIENT).unwrap();
        // Exported: the gateway's own span, in the client's trace.
        let joined = Invocation::start(app(), Some(CLIENT), true);
        assert_eq!(joined.client, Some(client));
        assert_eq!(joined.own.trace_id, client.trace_id);
        assert_ne!(joined.own.span_id, client.span_id);
        assert!(joined.own.sampled());
        // Not exported: the entry call hangs from the client's span itself.
        assert_eq!(Invocation::start(app(), Some(CLIENT), false).own, client);
        // A client that asked for no recording is obeyed.
        let unsampled = CLIENT.replace("-01", "-00");
        assert!(!Invocation::start(app(), Some(&unsampled), true)
            .own
            .sampled());
        // No header, or a malformed one: a trace starts here, or none at all.
        for header in [None, Some("00-nonsense")] {
            let fresh = Invocation::start(app(), header, true);
            assert!(fresh.client.is_none() && fresh.own.sampled());
            let other = Invocation::start(app(), header, true);
            assert_ne!(fresh.own.trace_id, other.own.trace_id);
            let none = Invocation::start(app(), header, false);
            assert_eq!(none.own, TraceParent::default());
        }
    }

    #[test]
    fn an_endpoint_is_an_http_base_url() {
        let refused = Telemetry::otlp("https://collector:4318")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("it must be an http:// URL"), "{refused}");
        assert!(Telemetry::otlp("collector:4318").is_err());
        Telemetry::otlp("http://127.0.0.1:4318").unwrap();
        Telemetry::otlp("http://127.0.0.1:4318/v1/traces").unwrap();
    }
}
