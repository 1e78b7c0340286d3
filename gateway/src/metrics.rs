//! The gateway's Prometheus metrics, served at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The label of an ended execution: `succeeded` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// How it ended.
    pub outcome: String,
}

impl From<&str> for Outcome {
    fn from(outcome: &str) -> Self {
        Self {
            outcome: outcome.to_owned(),
        }
    }
}

/// Every metric the gateway keeps.
#[derive(Debug)]
pub struct Metrics {
    /// Ended executions by outcome.
    pub executions: Family<Outcome, Counter>,
    /// Executions accepted.
    pub accepted: Counter,
    /// Calls the gateway dispatched to workers (entries, overflow, retries, recoveries).
    pub gateway_hops: Counter,
    /// Calls that workers ran through their local bus, as their traces report.
    pub local_hops: Counter,
    /// Dispatches that re-ran a call whose owner was lost.
    pub recoveries: Counter,
    /// Calls pending in the global queue.
    pub queue_depth: Gauge,
    /// Time from acceptance to answer, in seconds.
    pub execution_seconds: Histogram,
    /// HTTP requests answered, by status class.
    pub http_requests: Family<Status, Counter>,
}

/// The label of an HTTP answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    /// The status code.
    pub code: u16,
}

impl Metrics {
    /// Fresh metrics, registered in `registry` under the `sand_` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            executions: Family::default(),
            accepted: Counter::default(),
            gateway_hops: Counter::default(),
            local_hops: Counter::default(),
            recoveries: Counter::default(),
            queue_depth: Gauge::default(),
            execution_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            http_requests: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("sand");
        r.register(
            "executions",
            "Executions ended, by outcome",
            m.executions.clone(),
        );
        r.register("accepted", "Executions accepted", m.accepted.clone());
        r.register(
            "gateway_hops",
            "Calls dispatched by the gateway",
            m.gateway_hops.clone(),
        );
        r.register(
            "local_hops",
            "Calls run through a worker's local bus",
            m.local_hops.clone(),
        );
        r.register(
            "recoveries",
            "Calls re-dispatched after their owner was lost",
            m.recoveries.clone(),
        );
        r.register(
            "queue_depth",
            "Calls pending in the global queue",
            m.queue_depth.clone(),
        );
        r.register(
            "execution_seconds",
            "Time from acceptance to answer",
            m.execution_seconds.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests answered, by status",
            m.http_requests.clone(),
        );
        m
    }
}
