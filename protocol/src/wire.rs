//! The messages between the gateway and its workers, and their binary encoding.
//!
//! Two kinds of message share a connection. Protocol messages ([`ToGateway`], [`ToWorker`]) are
//! the two-level queue's: each names the incarnation it belongs to, so a receiver can refuse
//! what an older life of a worker said, and only they reach `GlobalQueue` and `LocalBus`, so the
//! model checker hashes protocol state alone. Service messages ([`ServiceToGateway`],
//! [`ServiceToWorker`]) are the drivers' own traffic: bundles and traces, which the protocol
//! neither numbers nor recovers. Every frame holds one envelope, [`Up`] from a worker or [`Down`]
//! from the gateway, that says which kind it carries.
//!
//! The encoding is a one-byte version followed by postcard (serde's compact varint format) of
//! the envelope. A frame is at most [`MESSAGE_BYTES_MAX`] long; decoding any byte string returns
//! an envelope or an error, never a panic.
//!
//! This module does not decide anything: what a receiver must do with each message is written on
//! the message, and done by `GlobalQueue` and `LocalBus` for protocol messages, by the drivers
//! for service messages.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{AppName, Attempt, CallId, ExecId, GrainName, Incarnation, RunKey, Seq};
use crate::trace_context::TraceParent;

/// The encoding version this build writes and reads.
pub const WIRE_VERSION: u8 = 8;

/// The largest encoded message, in bytes. A frame above it is refused without being read.
pub const MESSAGE_BYTES_MAX: usize = 16 << 20;

/// The largest single value a grain may take or produce, in bytes (the input, each emitted call's
/// input, a return value, and a join's assembled input).
pub const PAYLOAD_BYTES_MAX: usize = 6 << 20;

/// The most branches one fan-out may emit.
pub const FANOUT_MAX: usize = 256;

/// A value passed between grains and to the client: a JSON text by convention. The protocol never
/// parses it; it only assembles a join's input as a JSON array of the branch values.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Payload(pub Bytes);

impl Payload {
    /// Wraps bytes.
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Self(bytes.into())
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The input of a join: the branch values as a JSON array, in branch order. Refused when the
    /// result would exceed [`PAYLOAD_BYTES_MAX`].
    pub fn json_array<'a>(
        parts: impl IntoIterator<Item = &'a Payload>,
    ) -> Result<Payload, TooLarge> {
        let mut out = Vec::from(&b"["[..]);
        for (i, p) in parts.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&p.0);
            if out.len() >= PAYLOAD_BYTES_MAX {
                return Err(TooLarge { bytes: out.len() });
            }
        }
        out.push(b']');
        Ok(Payload(out.into()))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) if s.len() <= 32 => write!(f, "{s}"),
            _ => write!(f, "<{} bytes>", self.0.len()),
        }
    }
}

impl From<&str> for Payload {
    fn from(s: &str) -> Self {
        Self(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// A value above [`PAYLOAD_BYTES_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a value of {bytes} bytes or more exceeds the {max} byte limit", max = PAYLOAD_BYTES_MAX)]
pub struct TooLarge {
    /// How many bytes it had reached when refused.
    pub bytes: usize,
}

/// Where a call's return value goes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum Cont {
    /// The value answers the execution.
    Client,
    /// The value is branch `branch` of the fan-out whose join call is `join`.
    Join {
        /// The join call.
        join: CallId,
        /// The branch index, from 0.
        branch: u32,
    },
}

/// Everything a worker needs to run one attempt of one call.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct CallSpec {
    /// The execution it belongs to.
    pub exec: ExecId,
    /// The call.
    pub call: CallId,
    /// The attempt this run is.
    pub attempt: Attempt,
    /// The app that holds the grain.
    pub app: AppName,
    /// The grain to run.
    pub grain: GrainName,
    /// The grain's input.
    pub input: Payload,
    /// Where its return value goes. Calls it emits with `next` inherit it.
    pub cont: Cont,
    /// How many levels of fan-out may still nest below it: its branches get one less, its
    /// `next` and its join the same. A fan-out at 0 fails with [`ErrorKind::Budget`].
    pub depth_left: u32,
    /// The execution as clients name it (the gateway's reference: its id and a MAC), which
    /// the grain sees as `ctx.exec`, so an id a grain prints is one the API takes. The state
    /// machines carry it and never read it: the gateway's driver sets it on each dispatch,
    /// and the local bus gives it to the calls a call makes.
    pub exec_ref: String,
    /// Its place in the execution's trace: the span of the run that emitted it (the gateway's
    /// span of the invocation, for the entry call). Its run's own span is
    /// `traceparent.run(call, attempt)`, the parent of the calls it emits.
    pub traceparent: TraceParent,
}

impl CallSpec {
    /// The run this spec starts.
    pub fn run_key(&self) -> RunKey {
        RunKey::new(self.exec, self.call, self.attempt)
    }
}

/// A call that a report leaves pending.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct NewCall {
    /// The call (derived from its parent).
    pub call: CallId,
    /// The grain to run, in the same app as the report's root.
    pub grain: GrainName,
    /// Its input: the backup from which the gateway can run it again.
    pub input: Payload,
    /// Where its return value goes.
    pub cont: Cont,
    /// Whether the reporting worker already runs it (attempt 0). If not, the gateway places it.
    pub owned: bool,
    /// Its [`CallSpec::depth_left`].
    pub depth_left: u32,
    /// Its [`CallSpec::traceparent`]: the span of the run that emitted it.
    pub traceparent: TraceParent,
}

/// A fan-out's join, made when the fan-out runs.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct JoinSpec {
    /// The join call's id (`fan_out_call.join()`).
    pub call: CallId,
    /// The grain that gets the branch values.
    pub grain: GrainName,
    /// How many branches contribute.
    pub branches: u32,
    /// Where the join's return value goes (the fan-out call's own continuation).
    pub cont: Cont,
    /// The join call's [`CallSpec::depth_left`]: the fan-out call's.
    pub depth_left: u32,
    /// The join call's [`CallSpec::traceparent`]: the span of the fan-out's run.
    pub traceparent: TraceParent,
}

/// A value a report delivers.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct Return {
    /// Where it goes.
    pub cont: Cont,
    /// The value.
    pub value: Payload,
}

/// The net effect of running a call and, coalesced into it, any successors the worker ran
/// before reporting: the joins started, the values delivered, and the calls left pending.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default)]
pub struct Effects {
    /// Joins created by fan-outs, applied first.
    pub joins: Vec<JoinSpec>,
    /// Values delivered to the client or to joins, applied second.
    pub returns: Vec<Return>,
    /// Calls left pending, applied last. A join call listed here was started by the worker.
    pub spawned: Vec<NewCall>,
}

impl Effects {
    /// A rough count of the bytes this takes on the wire, for batching.
    pub fn weight(&self) -> usize {
        let values: usize = self.returns.iter().map(|r| r.value.len() + 24).sum();
        let inputs: usize = self.spawned.iter().map(|c| c.input.len() + 96).sum();
        values + inputs + self.joins.len() * 96
    }
}

/// Why an attempt failed. Named in JSON (the HTTP API, traces) in snake_case, a stable
/// contract: `raised`, `crashed`, `timeout`, `out_of_memory`, `bad_output`, `unavailable`,
/// `budget`. The binary wire numbers the variants; new ones go last. Traces written before
/// the names were snake_case still read (the aliases).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The handler raised an error.
    #[serde(alias = "Raised")]
    Raised,
    /// The instance died without answering (a signal, an exit).
    #[serde(alias = "Crashed")]
    Crashed,
    /// The instance ran past the grain's timeout and was killed.
    #[serde(alias = "Timeout")]
    Timeout,
    /// The instance was killed for exceeding its memory limit.
    #[serde(alias = "OutOfMemory")]
    OutOfMemory,
    /// The handler's output could not be understood (not JSON, too large, a bad `next`).
    #[serde(alias = "BadOutput")]
    BadOutput,
    /// The grain or app is not deployed, or the platform could not run it.
    #[serde(alias = "Unavailable")]
    Unavailable,
    /// The execution went past its budget of calls or of fan-out depth (set by the operator):
    /// it ends at once, without retries.
    #[serde(alias = "Budget")]
    Budget,
}

impl ErrorKind {
    /// Its name, as JSON spells it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Raised => "raised",
            ErrorKind::Crashed => "crashed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::OutOfMemory => "out_of_memory",
            ErrorKind::BadOutput => "bad_output",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Budget => "budget",
        }
    }
}

/// A grain's failure, as the client sees it after the last retry.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GrainError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// A human-readable account (for `Raised`, the exception and its message).
    pub message: String,
}

impl GrainError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// What happened to a report's root call.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum Outcome {
    /// It finished; these are its effects.
    Done(Effects),
    /// This attempt failed.
    Failed(GrainError),
}

/// One unit the gateway applies atomically: the outcome of a call it knows as pending.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct Report {
    /// The execution.
    pub exec: ExecId,
    /// The root call: one the gateway knows, owned by the sender.
    pub call: CallId,
    /// The attempt that ran.
    pub attempt: Attempt,
    /// What came of it.
    pub outcome: Outcome,
}

/// A message from a worker to the gateway.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum ToGateway {
    /// Sent first on every connection. The gateway answers `Welcome`, or `Fenced` if it will not
    /// take the sender as this incarnation. A new incarnation makes the gateway re-dispatch at
    /// once every call the older one owned.
    Hello {
        /// The sender's incarnation.
        incarnation: Incarnation,
        /// Whether the gateway welcomed this incarnation before, on an earlier connection: this
        /// is a reconnect. A life that says `false` must be new to the gateway: one that names an
        /// incarnation the gateway already knows is fenced, so a worker that lost the record of
        /// its incarnation is never taken for its earlier life.
        resumed: bool,
        /// Every attempt this incarnation started whose report the gateway has not acked. On a
        /// reconnect the gateway re-dispatches only the calls it sees the sender owning that are
        /// not listed, so no dispatch of a started attempt is ever sent again.
        started: Vec<RunKey>,
    },
    /// Sent every heartbeat interval while connected. The gateway resets the sender's failure
    /// timer.
    Heartbeat {
        /// The sender's incarnation.
        incarnation: Incarnation,
        /// Calls running on the sender now.
        running: u32,
    },
    /// Sent when reports are ready and fewer than the window's worth of messages are unacked;
    /// re-sent, unchanged, on a timer and after every `Welcome` until acked. The gateway
    /// applies an incarnation's messages in `seq` order, each atomically, holding back any that
    /// arrive early, and acks once the result is durable.
    Progress {
        /// The sender's incarnation.
        incarnation: Incarnation,
        /// Numbered from 1 per incarnation, with no gaps.
        seq: Seq,
        /// Applied in order, each alone: a stale one is skipped, the rest still apply.
        reports: Vec<Report>,
    },
}

/// A message from the gateway to a worker.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum ToWorker {
    /// Answers `Hello`. The worker drops its backups up to `applied`, re-sends the rest in
    /// order, and starts sending new progress, and heartbeats every `heartbeat`.
    Welcome {
        /// The incarnation welcomed.
        incarnation: Incarnation,
        /// The last of its progress messages the gateway has durably applied.
        applied: Seq,
        /// How often to heartbeat: the gateway derives it from its failure timeout, so that a
        /// live, idle worker is never suspected.
        heartbeat: Duration,
    },
    /// Sent when the gateway places a call on the worker, and again after a reconnecting `Hello`
    /// for each call it still sees the worker owning that the `Hello` does not list as started.
    /// The worker runs it, unless it already started this attempt in this incarnation: then it
    /// ignores it.
    Dispatch {
        /// The incarnation addressed; another ignores it.
        incarnation: Incarnation,
        /// The call to run.
        call: CallSpec,
        /// Why it is sent: what an execution's trace shows.
        reason: Reason,
    },
    /// Sent once the progress up to `upto` is durable. The worker drops those backups.
    Ack {
        /// The incarnation addressed.
        incarnation: Incarnation,
        /// Every message numbered up to this one is applied.
        upto: Seq,
    },
    /// Sent when an execution has ended while the worker owned some of its calls. The worker
    /// kills them and forgets the execution.
    Cancel {
        /// The incarnation addressed.
        incarnation: Incarnation,
        /// The execution that ended.
        exec: ExecId,
    },
    /// Sent when the gateway gave up on an attempt (its timeout ran out). The worker kills it.
    Abort {
        /// The incarnation addressed.
        incarnation: Incarnation,
        /// The execution.
        exec: ExecId,
        /// The call.
        call: CallId,
        /// The attempt to kill.
        attempt: Attempt,
    },
    /// Sent in answer to anything from an incarnation the gateway declared dead, and to a `Hello`
    /// it will not take. The worker kills everything, forgets everything, and says `Hello` as a
    /// new incarnation, at least `successor`.
    Fenced {
        /// The incarnation refused.
        incarnation: Incarnation,
        /// Above every incarnation of the worker the gateway knows: the lowest it would welcome
        /// as a new life.
        successor: Incarnation,
    },
}

impl ToWorker {
    /// The worker incarnation the message is addressed to; a worker drops any other.
    pub fn incarnation(&self) -> Incarnation {
        match self {
            ToWorker::Welcome { incarnation, .. }
            | ToWorker::Dispatch { incarnation, .. }
            | ToWorker::Ack { incarnation, .. }
            | ToWorker::Cancel { incarnation, .. }
            | ToWorker::Abort { incarnation, .. }
            | ToWorker::Fenced { incarnation, .. } => *incarnation,
        }
    }
}

/// A service message from a worker's driver to the gateway's.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum ServiceToGateway {
    /// Asks for an app's bundle, on the worker's first call of the app or after `AppChanged`.
    /// The gateway answers `Bundle`. Lost with its connection: the worker asks again after the
    /// next `Connected`.
    Fetch {
        /// The app wanted.
        app: AppName,
    },
    /// What the worker saw of finished runs, for the execution's trace. Best effort: never
    /// re-sent, lost with its connection.
    Trace {
        /// The runs, oldest first.
        runs: Vec<RunTrace>,
    },
}

/// How one run of a call went, as its worker saw it: the raw matter of an execution's trace.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct RunTrace {
    /// The execution.
    pub exec: ExecId,
    /// The call.
    pub call: CallId,
    /// The attempt run.
    pub attempt: Attempt,
    /// The grain.
    pub grain: GrainName,
    /// True if the gateway dispatched it; false if the worker's local bus started it.
    pub dispatched: bool,
    /// Wall-clock start and end, in microseconds since the Unix epoch.
    pub started_us: u64,
    /// See `started_us`.
    pub ended_us: u64,
    /// `None` if it finished (returned, chained or fanned out); else how it failed.
    pub error: Option<GrainError>,
    /// The run's captured stdout, bounded by the worker.
    pub stdout: Bytes,
    /// The run's captured stderr, bounded by the worker.
    pub stderr: Bytes,
    /// The start of the call's input.
    pub input: Preview,
    /// The start of the value it returned; `None` if it chained, fanned out or failed.
    pub output: Option<Preview>,
    /// The calls it emitted, in order: its `next`, or its fan-out's branches then their join.
    pub emitted: Vec<CallId>,
    /// The run's [`CallSpec::traceparent`].
    pub traceparent: TraceParent,
    /// Whether its instance was started for it (it served no call before): a cold start.
    pub cold: bool,
}

/// The most bytes of a value a [`Preview`] keeps.
pub const PREVIEW_BYTES_MAX: usize = 4096;

/// The start of a value, for a trace: at most [`PREVIEW_BYTES_MAX`] bytes, never the whole
/// payload of a large one.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default)]
pub struct Preview {
    /// The value's first bytes. When the value is UTF-8, a cut falls between characters.
    pub head: Bytes,
    /// True if the value was longer than `head`.
    pub cut: bool,
}

impl Preview {
    /// The start of `value`, copied: a preview kept for a while never holds a large value's
    /// buffer alive.
    pub fn of(value: &Payload) -> Self {
        let bytes = &value.0[..];
        let end = if bytes.len() <= PREVIEW_BYTES_MAX {
            bytes.len()
        } else {
            // Text cut inside a character ends before that character.
            match std::str::from_utf8(&bytes[..PREVIEW_BYTES_MAX]) {
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                _ => PREVIEW_BYTES_MAX,
            }
        };
        Self {
            head: Bytes::copy_from_slice(&bytes[..end]),
            cut: end < bytes.len(),
        }
    }
}

/// A service message from the gateway's driver to a worker's.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum ServiceToWorker {
    /// Answers `Fetch`.
    Bundle {
        /// The app asked for.
        app: AppName,
        /// Its deployed bundle, or `None` if it is not deployed.
        bundle: Option<AppBundle>,
    },
    /// The app was redeployed or removed. The worker retires its sandbox of the app once idle,
    /// and fetches the bundle again at the next call.
    AppChanged {
        /// The app.
        app: AppName,
    },
}

/// Why the gateway dispatches a call's attempt.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum Reason {
    /// The call's first attempt.
    First,
    /// An attempt after a failed one (an error, or a deadline passed), once its backoff is over.
    Retry,
    /// Its owner was lost before the attempt ended (declared dead, or followed by a new life):
    /// it runs again.
    Recovery,
    /// The same attempt again, to the reconnected life that owns it and has not started it.
    Resent,
}

/// A deployed app's code, as shipped to workers.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct AppBundle {
    /// Names this version of the bundle (a hash of the archive).
    pub digest: String,
    /// The gzip'd tar of the app directory.
    pub archive: Bytes,
}

/// What one frame from a worker to the gateway holds.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum Up {
    /// For the gateway's `GlobalQueue`.
    Protocol(ToGateway),
    /// For the gateway's driver.
    Service(ServiceToGateway),
}

/// What one frame from the gateway to a worker holds.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub enum Down {
    /// For the worker's `LocalBus`.
    Protocol(ToWorker),
    /// For the worker's driver.
    Service(ServiceToWorker),
}

impl From<ToGateway> for Up {
    fn from(msg: ToGateway) -> Self {
        Up::Protocol(msg)
    }
}

impl From<ServiceToGateway> for Up {
    fn from(msg: ServiceToGateway) -> Self {
        Up::Service(msg)
    }
}

impl From<ToWorker> for Down {
    fn from(msg: ToWorker) -> Self {
        Down::Protocol(msg)
    }
}

impl From<ServiceToWorker> for Down {
    fn from(msg: ServiceToWorker) -> Self {
        Down::Service(msg)
    }
}

/// What a frame holds: [`Up`] or [`Down`], never a bare message, so that every receiver can tell
/// protocol from service traffic.
pub trait Envelope: Serialize + DeserializeOwned + sealed::Sealed {}

impl Envelope for Up {}
impl Envelope for Down {}

mod sealed {
    /// Keeps [`Envelope`](super::Envelope) to the two envelopes.
    pub trait Sealed {}
    impl Sealed for super::Up {}
    impl Sealed for super::Down {}
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame had no bytes.
    #[error("empty frame")]
    Empty,
    /// The frame is longer than [`MESSAGE_BYTES_MAX`].
    #[error("frame of {0} bytes exceeds the {max} byte limit", max = MESSAGE_BYTES_MAX)]
    TooLarge(usize),
    /// The peer speaks another encoding version.
    #[error("wire version {0} is not supported (this build speaks version {WIRE_VERSION})")]
    Version(u8),
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A valid message was followed by more bytes.
    #[error("{0} stray bytes after the message")]
    Trailing(usize),
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoding is longer than [`MESSAGE_BYTES_MAX`].
    #[error("message of {0} bytes exceeds the {max} byte limit", max = MESSAGE_BYTES_MAX)]
    TooLarge(usize),
    /// serde refused the value.
    #[error("cannot encode: {0}")]
    Serde(String),
}

/// Encodes an envelope as one frame: the version byte, then postcard.
pub fn encode<E: Envelope>(msg: &E) -> Result<Vec<u8>, EncodeError> {
    let out = postcard::to_extend(msg, vec![WIRE_VERSION])
        .map_err(|e| EncodeError::Serde(e.to_string()))?;
    if out.len() > MESSAGE_BYTES_MAX {
        return Err(EncodeError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Decodes one frame made by [`encode`].
pub fn decode<E: Envelope>(frame: &[u8]) -> Result<E, DecodeError> {
    let (&version, body) = frame.split_first().ok_or(DecodeError::Empty)?;
    if frame.len() > MESSAGE_BYTES_MAX {
        return Err(DecodeError::TooLarge(frame.len()));
    }
    if version != WIRE_VERSION {
        return Err(DecodeError::Version(version));
    }
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(msg)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ids::ExecId;

    fn spec() -> CallSpec {
        let exec = ExecId::new(1, 1);
        CallSpec {
            exec,
            call: exec.root_call(),
            attempt: Attempt(2),
            app: AppName::new("app").unwrap(),
            grain: GrainName::new("first").unwrap(),
            input: Payload::from("{\"x\":1}"),
            cont: Cont::Client,
            depth_left: 16,
            exec_ref: String::new(),
            traceparent: TraceParent::default(),
        }
    }

    #[test]
    fn messages_round_trip() {
        let msgs = vec![
            ToWorker::Dispatch {
                incarnation: Incarnation(3),
                call: spec(),
                reason: Reason::Recovery,
            },
            ToWorker::Ack {
                incarnation: Incarnation(3),
                upto: Seq(9),
            },
            ToWorker::Fenced {
                incarnation: Incarnation(1),
                successor: Incarnation(4),
            },
        ];
        let app = AppName::new("app").unwrap();
        let service = [
            ServiceToWorker::Bundle {
                app: app.clone(),
                bundle: Some(AppBundle {
                    digest: "d1".into(),
                    archive: Bytes::from_static(b"tar"),
                }),
            },
            ServiceToWorker::AppChanged { app: app.clone() },
        ];
        let downs = msgs
            .into_iter()
            .map(Down::from)
            .chain(service.map(Down::from));
        for m in downs {
            let frame = encode(&m).unwrap();
            assert_eq!(frame[0], WIRE_VERSION);
            assert_eq!(decode::<Down>(&frame), Ok(m));
        }
        let p = ToGateway::Progress {
            incarnation: Incarnation(1),
            seq: Seq(1),
            reports: vec![Report {
                exec: spec().exec,
                call: spec().call,
                attempt: Attempt(0),
                outcome: Outcome::Failed(GrainError::new(ErrorKind::Raised, "boom")),
            }],
        };
        let trace = ServiceToGateway::Trace {
            runs: vec![RunTrace {
                exec: spec().exec,
                call: spec().call,
                attempt: Attempt(0),
                grain: spec().grain,
                dispatched: true,
                started_us: 1,
                ended_us: 2,
                traceparent: TraceParent::default(),
                cold: false,
                error: None,
                stdout: Bytes::from_static(b"out"),
                stderr: Bytes::new(),
                input: Preview::of(&spec().input),
                output: Some(Preview::of(&Payload::from("2"))),
                emitted: vec![spec().call.child(0), spec().call.join()],
            }],
        };
        let ups = [
            Up::from(p),
            Up::from(ServiceToGateway::Fetch { app }),
            Up::from(trace),
        ];
        for m in ups {
            assert_eq!(decode::<Up>(&encode(&m).unwrap()), Ok(m));
        }
    }

    #[test]
    fn frames_from_before_the_envelopes_are_refused_by_their_version() {
        // An old worker's first frame, `Hello { incarnation: 1, resumed: false, started: [] }`,
        // the same in versions 2 and 3. Read as this version's body, it would pass for an
        // `Up::Protocol(Heartbeat)` of incarnation 0: the version byte is all that tells them
        // apart.
        for version in [2, 3] {
            let old_hello = [version, 0, 1, 0, 0];
            let refused = decode::<Up>(&old_hello).unwrap_err();
            assert_eq!(refused, DecodeError::Version(version));
            assert_eq!(
                refused.to_string(),
                format!(
                    "wire version {version} is not supported (this build speaks version \
                     {WIRE_VERSION})"
                )
            );
            let misread: Up = postcard::from_bytes(&old_hello[1..]).unwrap();
            assert!(matches!(misread, Up::Protocol(ToGateway::Heartbeat { .. })));
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let good = encode(&Up::Protocol(ToGateway::Hello {
            incarnation: Incarnation(1),
            resumed: false,
            started: Vec::new(),
        }))
        .unwrap();
        assert_eq!(decode::<Up>(&[]), Err(DecodeError::Empty));
        let mut wrong_version = good.clone();
        wrong_version[0] = 9;
        assert_eq!(decode::<Up>(&wrong_version), Err(DecodeError::Version(9)));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode::<Up>(&trailing), Err(DecodeError::Trailing(1)));
        assert!(matches!(
            decode::<Up>(&good[..1]),
            Err(DecodeError::Malformed(_))
        ));
        let mut no_such_envelope = good.clone();
        no_such_envelope[1] = 2;
        assert!(matches!(
            decode::<Up>(&no_such_envelope),
            Err(DecodeError::Malformed(_))
        ));
        let huge = vec![WIRE_VERSION; MESSAGE_BYTES_MAX + 1];
        assert_eq!(
            decode::<Up>(&huge),
            Err(DecodeError::TooLarge(MESSAGE_BYTES_MAX + 1))
        );
    }

    #[test]
    fn oversize_messages_are_not_encoded() {
        let mut s = spec();
        s.input = Payload::new(vec![b'x'; MESSAGE_BYTES_MAX]);
        let m = ToWorker::Dispatch {
            incarnation: Incarnation(0),
            call: s,
            reason: Reason::First,
        };
        assert!(matches!(
            encode(&Down::Protocol(m)),
            Err(EncodeError::TooLarge(_))
        ));
        let bundle = ServiceToWorker::Bundle {
            app: AppName::new("app").unwrap(),
            bundle: Some(AppBundle {
                digest: "d1".into(),
                archive: Bytes::from(vec![0; MESSAGE_BYTES_MAX]),
            }),
        };
        assert!(matches!(
            encode(&Down::Service(bundle)),
            Err(EncodeError::TooLarge(_))
        ));
    }

    #[test]
    fn previews_keep_the_start_of_a_value_and_say_when_cut() {
        let short = Preview::of(&Payload::from("[1,2]"));
        assert_eq!((short.head.as_ref(), short.cut), (&b"[1,2]"[..], false));
        let exact = Preview::of(&Payload::new(vec![b'a'; PREVIEW_BYTES_MAX]));
        assert_eq!((exact.head.len(), exact.cut), (PREVIEW_BYTES_MAX, false));
        let long = Preview::of(&Payload::new(vec![b'a'; PAYLOAD_BYTES_MAX]));
        assert_eq!((long.head.len(), long.cut), (PREVIEW_BYTES_MAX, true));
        // A three-byte character across the limit is left out whole.
        let mut text = vec![b'a'; PREVIEW_BYTES_MAX - 1];
        text.extend_from_slice("€uro".as_bytes());
        let cut = Preview::of(&Payload::new(text));
        assert_eq!((cut.head.len(), cut.cut), (PREVIEW_BYTES_MAX - 1, true));
        assert!(std::str::from_utf8(&cut.head).is_ok());
        // Bytes that are not text are cut at the limit.
        let binary = Preview::of(&Payload::new(vec![0xff; PREVIEW_BYTES_MAX + 1]));
        assert_eq!(binary.head.len(), PREVIEW_BYTES_MAX);
    }

    #[test]
    fn join_input_is_a_json_array_in_order() {
        let parts = [Payload::from("1"), Payload::from("{\"a\":2}")];
        assert_eq!(
            Payload::json_array(&parts).unwrap(),
            Payload::from("[1,{\"a\":2}]")
        );
        assert_eq!(Payload::json_array([]).unwrap(), Payload::from("[]"));
        let big = Payload::new(vec![b'1'; PAYLOAD_BYTES_MAX / 2 + 1]);
        assert!(Payload::json_array([&big, &big]).is_err());
    }
}
