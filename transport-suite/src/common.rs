//! Shared pieces of the tests: a cluster PKI in memory, fast settings, message makers, bounded
//! waits, and a capture of the transports' log lines.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sand_protocol::ids::{AppName, Attempt, ExecId, GrainName, Incarnation, Seq, WorkerId};
use sand_protocol::wire::{
    CallSpec, Cont, Effects, Outcome, Payload, Reason, Report, Return, ToGateway, ToWorker,
};
use sand_transport::config::LinkConfig;
use sand_transport::seam::{Events, GatewayEvent, GatewayLink, WorkerEvent, WorkerLink};
use sand_transport::tls::certs::{ClusterCa, NodeIdentity, Validity};

use crate::TestTransport;

/// Every test's whole body runs under this bound.
pub const TEST_TIME_MAX: Duration = Duration::from_secs(60);
/// A single expected event must come within this.
pub const EVENT_TIME_MAX: Duration = Duration::from_secs(10);

/// Runs `fut` under [`TEST_TIME_MAX`].
pub async fn bounded<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(TEST_TIME_MAX, fut)
        .await
        .expect("the test did not finish in time")
}

/// A cluster CA with a gateway identity for `localhost` and `127.0.0.1`.
pub struct Pki {
    /// The cluster CA.
    pub ca: ClusterCa,
    /// The gateway's identity.
    pub gateway: NodeIdentity,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A new CA and gateway identity.
    pub fn new() -> Self {
        let ca = ClusterCa::generate(Validity::days_from_now(1)).unwrap();
        let gateway = ca
            .issue_gateway(
                &["localhost".to_string(), "127.0.0.1".to_string()],
                Validity::days_from_now(1),
            )
            .unwrap();
        Self { ca, gateway }
    }

    /// Worker `id`'s identity.
    pub fn worker(&self, id: u32) -> NodeIdentity {
        self.ca
            .issue_worker(WorkerId(id), Validity::days_from_now(1))
            .unwrap()
    }
}

/// Settings that make reconnections fast in tests.
pub fn config() -> LinkConfig {
    LinkConfig {
        keep_alive_interval: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(2),
        open_timeout: Duration::from_secs(2),
        reconnect_delay_min: Duration::from_millis(20),
        reconnect_delay_max: Duration::from_millis(200),
        ..LinkConfig::default()
    }
}

/// Any free port on 127.0.0.1.
pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Starts a gateway of transport `T` on a free port.
pub fn start_gateway<T: TestTransport>(pki: &Pki, config: LinkConfig) -> (T::Gateway, GatewayLink) {
    T::bind(pki, localhost(), config).unwrap()
}

/// Starts a worker of transport `T` dialing `gateway` as `localhost`.
pub fn start_worker<T: TestTransport>(
    gateway: &T::Gateway,
    identity: &NodeIdentity,
    config: LinkConfig,
) -> (T::Worker, WorkerLink) {
    T::start_worker(gateway, identity, config)
}

/// Starts worker `id` and waits until both sides say it is connected.
pub async fn connect_worker<T: TestTransport>(
    pki: &Pki,
    gateway: &T::Gateway,
    gw: &mut GatewayLink,
    id: u32,
) -> (T::Worker, WorkerLink) {
    let (worker, mut link) = start_worker::<T>(gateway, &pki.worker(id), config());
    assert_eq!(next(&mut link.events).await, WorkerEvent::Connected);
    assert_eq!(
        next(&mut gw.events).await,
        GatewayEvent::Connected(WorkerId(id))
    );
    (worker, link)
}

/// The next event, within [`EVENT_TIME_MAX`].
pub async fn next<E: std::fmt::Debug>(events: &mut Events<E>) -> E {
    tokio::time::timeout(EVENT_TIME_MAX, events.recv())
        .await
        .expect("no event in time")
        .expect("the event stream ended")
}

/// Asserts that no event comes within `quiet`.
pub async fn assert_quiet<E: std::fmt::Debug>(events: &mut Events<E>, quiet: Duration) {
    if let Ok(e) = tokio::time::timeout(quiet, events.recv()).await {
        panic!("unexpected event {e:?}");
    }
}

/// Waits until `cond` holds, polling.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENT_TIME_MAX;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A heartbeat carrying `n`.
pub fn heartbeat(n: u32) -> ToGateway {
    ToGateway::Heartbeat {
        incarnation: Incarnation(1),
        running: n,
    }
}

/// A first `Hello`.
pub fn hello() -> ToGateway {
    ToGateway::Hello {
        incarnation: Incarnation(1),
        resumed: false,
        started: Vec::new(),
    }
}

/// An ack up to `n`.
pub fn ack(n: u64) -> ToWorker {
    ToWorker::Ack {
        incarnation: Incarnation(1),
        upto: Seq(n),
    }
}

/// A progress message whose one returned value is `bytes` long.
pub fn progress(seq: u64, bytes: usize) -> ToGateway {
    let exec = ExecId::new(1, seq as u32);
    ToGateway::Progress {
        incarnation: Incarnation(1),
        seq: Seq(seq),
        reports: vec![Report {
            exec,
            call: exec.root_call(),
            attempt: Attempt(0),
            outcome: Outcome::Done(Effects {
                returns: vec![Return {
                    cont: Cont::Client,
                    value: Payload(Bytes::from(vec![b'7'; bytes])),
                }],
                ..Effects::default()
            }),
        }],
    }
}

/// A dispatch whose input is `bytes` long.
pub fn dispatch(index: u32, bytes: usize) -> ToWorker {
    let exec = ExecId::new(1, index);
    ToWorker::Dispatch {
        incarnation: Incarnation(1),
        call: CallSpec {
            exec,
            call: exec.root_call(),
            attempt: Attempt(0),
            app: AppName::new("app").unwrap(),
            grain: GrainName::new("grain").unwrap(),
            input: Payload(Bytes::from(vec![b'1'; bytes])),
            cont: Cont::Client,
            depth_left: 16,
            exec_ref: String::new(),
            traceparent: Default::default(),
        },
        reason: Reason::First,
    }
}

/// Captures this crate's log lines on the current thread (a current-thread tokio test runs
/// every task there), and echoes them to stderr for failing tests.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<String>>>);

impl Logs {
    /// Captures from now until the guard is dropped.
    pub fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let guard = tracing::subscriber::set_default(Capture(logs.clone()));
        (logs, guard)
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Whether a WARN line contains every one of `words` (case-insensitive).
    pub fn warned(&self, words: &[&str]) -> bool {
        self.lines().iter().any(|l| {
            let l = l.to_lowercase();
            l.starts_with("warn") && words.iter().all(|w| l.contains(&w.to_lowercase()))
        })
    }

    /// WARN lines that say a peer broke the framing.
    pub fn violations(&self) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.starts_with("WARN") && l.contains("broke the framing"))
            .count()
    }

    /// Waits for a WARN line with every one of `words`.
    pub async fn wait_for_warning(&self, words: &[&str]) {
        let deadline = tokio::time::Instant::now() + EVENT_TIME_MAX;
        while !self.warned(words) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no WARN line with {words:?}; lines: {:#?}",
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

struct Capture(Logs);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        meta.target().starts_with("sand_transport")
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(format!("{}", event.metadata().level()));
        event.record(&mut fields);
        eprintln!("{}", fields.0);
        self.0 .0.lock().unwrap().push(fields.0);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
