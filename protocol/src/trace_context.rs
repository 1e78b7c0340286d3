//! Where each run sits in its execution's OpenTelemetry trace, as W3C Trace Context puts it.
//!
//! Every call carries the [`TraceParent`] it was emitted under: its trace, and the span of the
//! run that emitted it (for an entry call, the gateway's span of the invocation). A run's own
//! span is derived, never drawn: [`TraceParent::run`] of a call and an attempt. So the gateway,
//! the worker that ran the call and the worker that ran its parent all name one run's span the
//! same without telling each other, and a call the gateway runs again after its worker was
//! lost hangs under the same parent as its lost attempt did. The state machines carry the
//! context with each call, durably, and never read it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{mix, Attempt, CallId};

/// A W3C `traceparent`: a trace, a span in it, and the trace flags. All zeros means no trace
/// (W3C calls such a header invalid): nothing is exported under it, and its runs have none.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default,
)]
pub struct TraceParent {
    /// The trace id; all zeros is none.
    pub trace_id: [u8; 16],
    /// The parent span's id; all zeros is none.
    pub span_id: [u8; 8],
    /// The trace flags: bit 0 is `sampled`, the caller's wish that the trace be recorded.
    pub flags: u8,
}

/// The `sampled` bit of [`TraceParent::flags`].
pub const SAMPLED: u8 = 0x01;

/// The length of a version-00 `traceparent` header.
pub const TRACEPARENT_LEN: usize = 55;

const RUN_TAG: u64 = 0x7370_616e_0000_0000;

impl TraceParent {
    /// A context for `trace_id` and `span_id`, sampled or not.
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> Self {
        Self {
            trace_id,
            span_id,
            flags: if sampled { SAMPLED } else { 0 },
        }
    }

    /// Whether this names a trace and a span (W3C: neither id is all zeros).
    pub fn is_valid(&self) -> bool {
        self.trace_id != [0; 16] && self.span_id != [0; 8]
    }

    /// Whether this names a trace its caller wants recorded.
    pub fn sampled(&self) -> bool {
        self.is_valid() && self.flags & SAMPLED != 0
    }

    /// The context of the run `attempt` of `call` under this parent: the same trace, the run's
    /// own span. Its calls are emitted under it. No trace stays no trace.
    pub fn run(&self, call: CallId, attempt: Attempt) -> Self {
        if !self.is_valid() {
            return Self::default();
        }
        // Unique within the execution, as (call, attempt) is; never zero.
        let span = mix(mix(call.0, attempt.0), RUN_TAG).max(1);
        Self {
            span_id: span.to_be_bytes(),
            ..*self
        }
    }

    /// Reads a `traceparent` header. `None` for anything W3C says to ignore (then a trace
    /// starts afresh): a malformed header, version `ff`, an all-zero id. A version above 00 is
    /// read as 00 if it starts like one, as W3C asks.
    pub fn parse(header: &str) -> Option<Self> {
        let bytes = header.as_bytes();
        let fields = bytes.get(..TRACEPARENT_LEN)?;
        let lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        let dashes = [2, 35, 52].iter().all(|&i| fields[i] == b'-');
        let hex = fields
            .iter()
            .enumerate()
            .all(|(i, b)| matches!(i, 2 | 35 | 52) || lower_hex(b));
        if !dashes || !hex {
            return None;
        }
        let version = byte_at(fields, 0);
        let extra = &bytes[TRACEPARENT_LEN..];
        if version == 0xff || (version == 0 && !extra.is_empty()) {
            return None;
        }
        if version > 0 && !extra.is_empty() && extra[0] != b'-' {
            return None;
        }
        let mut trace_id = [0; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = byte_at(fields, 3 + 2 * i);
        }
        let mut span_id = [0; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = byte_at(fields, 36 + 2 * i);
        }
        let parent = Self {
            trace_id,
            span_id,
            flags: byte_at(fields, 53),
        };
        parent.is_valid().then_some(parent)
    }
}

/// The byte whose two lowercase hex digits start at `at` (checked by the caller).
fn byte_at(text: &[u8], at: usize) -> u8 {
    let digit = |b: u8| match b {
        b'0'..=b'9' => b - b'0',
        _ => b - b'a' + 10,
    };
    digit(text[at]) << 4 | digit(text[at + 1])
}

/// The version-00 `traceparent` header; empty for no trace.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.is_valid() {
            return Ok(());
        }
        f.write_str("00-")?;
        self.trace_id
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str("-")?;
        self.span_id.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_header_reads_and_writes_back() {
        let parent = TraceParent::parse(HEADER).expect("valid");
        assert!(parent.sampled());
        assert_eq!(
            parent.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(parent.to_string(), HEADER);
        let unsampled = TraceParent::parse(&HEADER.replace("-01", "-00")).expect("valid");
        assert!(unsampled.is_valid() && !unsampled.sampled());
        assert_eq!(TraceParent::default().to_string(), "");
    }

    #[test]
    fn what_w3c_says_to_ignore_is_ignored() {
        let bad = [
            "",
            &HEADER[..54],
            &HEADER.to_uppercase(),
            &HEADER.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            &HEADER.replace("00f067aa0ba902b7", &"0".repeat(16)),
            &HEADER.replacen("00-", "ff-", 1),
            &format!("{HEADER}-extra"),
            &HEADER.replace('-', "_"),
            &HEADER.replacen('4', "g", 1),
            &format!("{}x", &HEADER.replacen("00-", "01-", 1)),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0ü",
        ];
        for header in bad {
            assert_eq!(TraceParent::parse(header), None, "{header:?}");
        }
        // A later version is read for the fields version 00 has.
        let later = format!("{}-more", HEADER.replacen("00-", "01-", 1));
        assert!(TraceParent::parse(&later).is_some());
    }

    proptest::proptest! {
        /// A header is a client's: any text is read or ignored, never a panic, and what is
        /// read writes back as the version-00 header it stands for.
        #[test]
        fn any_header_is_read_or_ignored(header in "\\PC{0,80}|[0-9a-f-]{50,60}") {
            if let Some(parent) = TraceParent::parse(&header) {
                proptest::prop_assert!(parent.is_valid());
                proptest::prop_assert_eq!(TraceParent::parse(&parent.to_string()), Some(parent));
            }
        }
    }

    #[test]
    fn a_run_has_its_own_span_in_the_same_trace() {
        let parent = TraceParent::parse(HEADER).expect("valid");
        let call = CallId(7);
        let run = parent.run(call, Attempt(1));
        assert_eq!((run.trace_id, run.flags), (parent.trace_id, parent.flags));
        assert_ne!(run.span_id, parent.span_id);
        // Derived: the same run has the same span wherever it is named.
        assert_eq!(run, parent.run(call, Attempt(1)));
        assert_ne!(run.span_id, parent.run(call, Attempt(2)).span_id);
        assert_ne!(run.span_id, parent.run(call.child(0), Attempt(1)).span_id);
        assert_eq!(
            TraceParent::default().run(call, Attempt(1)),
            TraceParent::default()
        );
    }
}
