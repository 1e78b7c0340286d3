//! The zygote wire: how the worker and a zygote (and the zygote's instances) talk over fd 3.
//!
//! fd 3 of a zygote is one end of an `AF_UNIX` `SOCK_SEQPACKET` socket pair; the worker holds the
//! other end. Every datagram is one *piece*: a 6-byte header (`kind: u8`, `flags: u8`,
//! `slot: u32` little-endian) and at most [`PIECE_BODY_BYTES_MAX`] bytes of body. A message is
//! the bodies of consecutive pieces of the same `(kind, slot)`, the last one without the
//! [`MORE`] flag. Datagrams are atomic, so an instance writes its result straight to the
//! worker's socket, even while other instances (sharing the same fd) write theirs: the pieces of
//! different slots may interleave, and the receiver reassembles them by `(kind, slot)`.
//!
//! A slot is the worker's number for one call in flight on that zygote. An *instance number* is
//! the zygote's number for one forked instance, never reused within the zygote's life (a pid
//! can be, so a late `KILL` by pid could hit a newer instance).
//!
//! | kind | direction | slot | body |
//! |---|---|---|---|
//! | `CALL` 1 | worker → zygote | the call's | exec u64, call u64, attempt u64 (LE), then the input JSON |
//! | `KILL` 3 | worker → zygote | the call's | instance u32: kill that instance (a timeout, an abandoned call) |
//! | `WANT` 4 | worker → zygote | 0 | empty: fork a spare instance and send it (`SPARE`) |
//! | `READY` 10 | zygote → worker | 0 | pid u32: the grain is loaded |
//! | `LOAD_FAILED` 11 | zygote → worker | 0 | UTF-8 text: why the grain could not be loaded |
//! | `RESULT` 12 | instance → worker | the call's | [`ResultMsg`] |
//! | `DIED` 13 | zygote → worker | 0 | instance u32, how u8 (0 exited, 1 signal), code i32: an instance ended (every end is reported) |
//! | `SPARE` 14 | zygote → worker | 0, or a call's | instance u32, pid u32, and one fd by `SCM_RIGHTS`: the instance's private socket |
//!
//! **Hand-over.** Each instance has a private `SOCK_STREAM` socket. The zygote forks it, sends
//! the worker its end of that socket (`SPARE`) and closes its own copy, so the worker holds the
//! only end. A `SPARE` with slot 0 is idle: the worker writes a call to it as a *private frame*
//! ([`private_frame`]: length u32 counting what follows, slot u32, the `CALL` body), any size,
//! without waking the zygote. The worker asks for a spare with `WANT` once a call's result is
//! out, never while a call is handed over, so the fork does not compete with the call. A call
//! for which the worker holds no spare goes to the zygote as `CALL`: the zygote forks an
//! instance, sends its `SPARE` with the call's slot (before the call, so the worker has it
//! before the `RESULT`), and writes the call to it.
//!
//! Only a `SPARE` carries an fd, exactly one; a message with any other number of fds breaks the
//! wire (the worker closes every fd that came with it, and kills the zygote).
//!
//! **Results and ends.** The instance writes its `RESULT` to fd 3, then waits on its private
//! socket: for the next call (`--reuse N`), or end-of-file, on which it exits. The worker closes
//! the socket once it has read the result and wants no more calls there. The zygote watches
//! every instance by pidfd and reports each end as `DIED`; the worker knows which call (if any)
//! it gave that instance, and ignores the ends of instances that owe nothing. An instance's
//! `RESULT` is queued before the `DIED` of its end, so a result is never mistaken for a death.
//!
//! A result document is JSON, one of `{"return": v}`, `{"next": [grain, v]}`,
//! `{"fan_out": [[grain, v], ...], "join": grain}`, `{"error": "text"}` (the handler raised) or
//! `{"error": "text", "kind": "bad_output"}` (the runtime could not encode what it returned).
//!
//! The Python runtime (`runtimes/python/sand_runtime.py`) speaks the same wire; keep them equal.

use std::collections::HashMap;

/// The file descriptor on which a zygote finds its channel to the worker.
pub const CHANNEL_FD: i32 = 3;
/// The length of a piece's header.
pub const HEADER_BYTES: usize = 6;
/// The most body bytes one piece carries (well under the default socket send buffer).
pub const PIECE_BODY_BYTES_MAX: usize = 60 * 1024;
/// The most bytes of a call's stdout, and of its stderr, sent with its result.
pub const CAPTURE_BYTES_MAX: usize = 64 * 1024;
/// The header flag saying that the message continues in the next piece of its `(kind, slot)`.
pub const MORE: u8 = 1;

/// What a message is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    /// Run a call (one the worker held no spare instance for).
    Call = 1,
    /// Kill an instance.
    Kill = 3,
    /// Fork a spare instance and send it.
    Want = 4,
    /// The grain is loaded.
    Ready = 10,
    /// The grain could not be loaded.
    LoadFailed = 11,
    /// A call's result.
    Result = 12,
    /// An instance ended.
    Died = 13,
    /// An instance's private socket, handed to the worker.
    Spare = 14,
}

impl Kind {
    /// The kind with this number, if any.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Call,
            3 => Kind::Kill,
            4 => Kind::Want,
            10 => Kind::Ready,
            11 => Kind::LoadFailed,
            12 => Kind::Result,
            13 => Kind::Died,
            14 => Kind::Spare,
            _ => return None,
        })
    }

    /// How many file descriptors (`SCM_RIGHTS`) a message of this kind carries: a `SPARE` one,
    /// the instance's private socket; every other kind none.
    pub fn fds(self) -> usize {
        usize::from(self == Kind::Spare)
    }
}

/// A message the peer sent that breaks the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A datagram shorter than a header.
    #[error("a piece of {0} bytes is shorter than the {HEADER_BYTES}-byte header")]
    Short(usize),
    /// An unknown kind byte.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A piece's body is longer than allowed.
    #[error("a piece body of {0} bytes exceeds {PIECE_BODY_BYTES_MAX}")]
    LongPiece(usize),
    /// A message grew past the receiver's limit.
    #[error("a {kind:?} message for slot {slot} exceeds {limit} bytes")]
    TooLarge {
        /// Its kind.
        kind: Kind,
        /// Its slot.
        slot: u32,
        /// The receiver's limit.
        limit: usize,
    },
    /// A message body does not have the layout of its kind.
    #[error("a {kind:?} message is malformed: {why}")]
    Malformed {
        /// Its kind.
        kind: Kind,
        /// What is wrong.
        why: &'static str,
    },
    /// A message came with another number of file descriptors than its kind carries.
    #[error("a {kind:?} message came with {count} fds; it carries {}", .kind.fds())]
    Fds {
        /// Its kind.
        kind: Kind,
        /// How many came.
        count: usize,
    },
    /// A message came with more file descriptors than the receiver takes (the kernel closed
    /// those beyond its buffer; the receiver closes the rest).
    #[error("a {kind:?} message came with more fds than any message carries")]
    FdsTruncated {
        /// Its kind.
        kind: Kind,
    },
}

/// A piece's header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    /// The message kind.
    pub kind: Kind,
    /// Whether the message continues in a later piece.
    pub more: bool,
    /// The call slot.
    pub slot: u32,
}

/// Splits a datagram into its header and body.
pub fn parse_piece(datagram: &[u8]) -> Result<(Header, &[u8]), WireError> {
    if datagram.len() < HEADER_BYTES {
        return Err(WireError::Short(datagram.len()));
    }
    let kind = Kind::from_u8(datagram[0]).ok_or(WireError::UnknownKind(datagram[0]))?;
    let body = &datagram[HEADER_BYTES..];
    if body.len() > PIECE_BODY_BYTES_MAX {
        return Err(WireError::LongPiece(body.len()));
    }
    let slot = u32::from_le_bytes([datagram[2], datagram[3], datagram[4], datagram[5]]);
    let more = datagram[1] & MORE != 0;
    Ok((Header { kind, more, slot }, body))
}

/// The datagrams that carry one message (at least one, even for an empty body).
pub fn pieces(kind: Kind, slot: u32, body: &[u8]) -> Vec<Vec<u8>> {
    let mut chunks: Vec<&[u8]> = body.chunks(PIECE_BODY_BYTES_MAX).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut piece = Vec::with_capacity(HEADER_BYTES + chunk.len());
            piece.push(kind as u8);
            piece.push(if i < last { MORE } else { 0 });
            piece.extend_from_slice(&slot.to_le_bytes());
            piece.extend_from_slice(chunk);
            piece
        })
        .collect()
}

/// Joins pieces back into messages, per `(kind, slot)`, refusing any message above a limit.
#[derive(Debug)]
pub struct Reassembler {
    partial: HashMap<(Kind, u32), Vec<u8>>,
    limit: usize,
}

impl Reassembler {
    /// A reassembler that refuses messages longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            partial: HashMap::new(),
            limit,
        }
    }

    /// Adds a piece; returns the message it completes, if any. A message that grows past the
    /// limit is dropped and reported once, when it overflows.
    pub fn push(&mut self, header: Header, body: &[u8]) -> Result<Option<Vec<u8>>, WireError> {
        let key = (header.kind, header.slot);
        let mut message = self.partial.remove(&key).unwrap_or_default();
        if message.len() + body.len() > self.limit {
            return Err(WireError::TooLarge {
                kind: header.kind,
                slot: header.slot,
                limit: self.limit,
            });
        }
        message.extend_from_slice(body);
        if header.more {
            self.partial.insert(key, message);
            Ok(None)
        } else {
            Ok(Some(message))
        }
    }

    /// Forgets any partial message of `slot` (its sender is gone).
    pub fn forget(&mut self, slot: u32) {
        self.partial.retain(|(_, s), _| *s != slot);
    }
}

/// The body of a `CALL` message.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CallMsg {
    /// The execution id.
    pub exec: u64,
    /// The call id.
    pub call: u64,
    /// The attempt number.
    pub attempt: u64,
    /// The input, a JSON text.
    pub input: Vec<u8>,
}

impl CallMsg {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.input.len());
        out.extend_from_slice(&self.exec.to_le_bytes());
        out.extend_from_slice(&self.call.to_le_bytes());
        out.extend_from_slice(&self.attempt.to_le_bytes());
        out.extend_from_slice(&self.input);
        out
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(Kind::Call, body);
        Ok(Self {
            exec: r.u64()?,
            call: r.u64()?,
            attempt: r.u64()?,
            input: r.rest().to_vec(),
        })
    }
}

/// The body of a `RESULT` message: the result document and the call's captured output.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ResultMsg {
    /// The pid of the instance that ran the call (as the zygote sees it).
    pub pid: u32,
    /// The result document (JSON; see the module doc).
    pub result: Vec<u8>,
    /// The first bytes the call wrote to stdout.
    pub stdout: Vec<u8>,
    /// The first bytes the call wrote to stderr.
    pub stderr: Vec<u8>,
    /// How many bytes it wrote to stdout in all.
    pub stdout_total: u64,
    /// How many bytes it wrote to stderr in all.
    pub stderr_total: u64,
}

impl ResultMsg {
    /// Encodes the body: pid u32, result length u32, stdout length u32, stderr length u32,
    /// stdout total u64, stderr total u64, then the three byte strings.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(32 + self.result.len() + self.stdout.len() + self.stderr.len());
        out.extend_from_slice(&self.pid.to_le_bytes());
        for part in [&self.result, &self.stdout, &self.stderr] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(&self.stdout_total.to_le_bytes());
        out.extend_from_slice(&self.stderr_total.to_le_bytes());
        out.extend_from_slice(&self.result);
        out.extend_from_slice(&self.stdout);
        out.extend_from_slice(&self.stderr);
        out
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(Kind::Result, body);
        let pid = r.u32()?;
        let result_len = r.u32()? as usize;
        let stdout_len = r.u32()? as usize;
        let stderr_len = r.u32()? as usize;
        let stdout_total = r.u64()?;
        let stderr_total = r.u64()?;
        let result = r.bytes(result_len)?.to_vec();
        let stdout = r.bytes(stdout_len)?.to_vec();
        let stderr = r.bytes(stderr_len)?.to_vec();
        if !r.rest().is_empty() {
            return Err(WireError::Malformed {
                kind: Kind::Result,
                why: "bytes after the stderr",
            });
        }
        Ok(Self {
            pid,
            result,
            stdout,
            stderr,
            stdout_total,
            stderr_total,
        })
    }
}

/// A call as an instance reads it from its private socket: length u32 (of what follows), slot
/// u32, then the `CALL` body ([`CallMsg`]).
pub fn private_frame(slot: u32, call: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + call.len());
    frame.extend_from_slice(&((4 + call.len()) as u32).to_le_bytes());
    frame.extend_from_slice(&slot.to_le_bytes());
    frame.extend_from_slice(call);
    frame
}

/// The body of a `SPARE` message (its socket travels beside it, by `SCM_RIGHTS`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SpareMsg {
    /// The zygote's number for the instance.
    pub instance: u32,
    /// Its pid, as the zygote sees it.
    pub pid: u32,
}

impl SpareMsg {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.instance.to_le_bytes().to_vec();
        out.extend_from_slice(&self.pid.to_le_bytes());
        out
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(Kind::Spare, body);
        let msg = Self {
            instance: r.u32()?,
            pid: r.u32()?,
        };
        r.end()?;
        Ok(msg)
    }
}

/// The body of a `KILL` message: the instance to kill.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct KillMsg {
    /// The zygote's number for the instance.
    pub instance: u32,
}

impl KillMsg {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        self.instance.to_le_bytes().to_vec()
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(Kind::Kill, body);
        let msg = Self { instance: r.u32()? };
        r.end()?;
        Ok(msg)
    }
}

/// How an instance ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum End {
    /// It exited with this status.
    Exited(i32),
    /// A signal with this number killed it.
    Signaled(i32),
}

/// The body of a `DIED` message: which instance ended, and how.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DiedMsg {
    /// The zygote's number for the instance.
    pub instance: u32,
    /// How it ended.
    pub end: End,
}

impl DiedMsg {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let (how, code) = match self.end {
            End::Exited(code) => (0u8, code),
            End::Signaled(sig) => (1u8, sig),
        };
        let mut out = self.instance.to_le_bytes().to_vec();
        out.push(how);
        out.extend_from_slice(&code.to_le_bytes());
        out
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(Kind::Died, body);
        let instance = r.u32()?;
        let how = r.bytes(1)?[0];
        let code = r.i32()?;
        r.end()?;
        let end = match how {
            0 => End::Exited(code),
            1 => End::Signaled(code),
            _ => {
                return Err(WireError::Malformed {
                    kind: Kind::Died,
                    why: "unknown way of ending",
                })
            }
        };
        Ok(Self { instance, end })
    }
}

/// Reads little-endian fields off a body, failing cleanly when it is too short.
struct Reader<'a> {
    kind: Kind,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(kind: Kind, body: &'a [u8]) -> Self {
        Self { kind, rest: body }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Malformed {
                kind: self.kind,
                why: "the body is shorter than its fields say",
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Result<i32, WireError> {
        let b = self.bytes(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn end(&self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed {
                kind: self.kind,
                why: "bytes after the last field",
            })
        }
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_message_travels_in_pieces_and_comes_back_whole() {
        let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let ps = pieces(Kind::Result, 7, &body);
        assert_eq!(ps.len(), 4);
        let mut r = Reassembler::new(1 << 20);
        let mut done = None;
        for (i, p) in ps.iter().enumerate() {
            let (h, b) = parse_piece(p).expect("a piece we made parses");
            assert_eq!(h.more, i < 3);
            done = r.push(h, b).expect("under the limit");
        }
        assert_eq!(done, Some(body));
    }

    #[test]
    fn only_a_spare_carries_an_fd() {
        for b in 0..=u8::MAX {
            if let Some(kind) = Kind::from_u8(b) {
                assert_eq!(kind.fds(), usize::from(b == 14), "{kind:?}");
            }
        }
        let e = WireError::Fds {
            kind: Kind::Spare,
            count: 2,
        };
        assert_eq!(
            e.to_string(),
            "a Spare message came with 2 fds; it carries 1"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(parse_piece(b"ab"), Err(WireError::Short(2)));
        assert_eq!(
            parse_piece(b"\x63\0\0\0\0\0"),
            Err(WireError::UnknownKind(0x63))
        );
        assert!(ResultMsg::decode(b"\x01\0\0\0\xff\xff\xff\xff").is_err());
        assert!(CallMsg::decode(b"short").is_err());
        assert!(DiedMsg::decode(b"\x01\0\0\0\x07\0\0\0\0").is_err());
        assert!(DiedMsg::decode(b"\x01\0\0\0\x01\0\0\0").is_err());
        assert!(SpareMsg::decode(b"\x01\0\0\0\x02\0\0\0\x03").is_err());
        assert!(KillMsg::decode(b"\x01\0").is_err());
        let mut r = Reassembler::new(10);
        let eleven = pieces(Kind::Call, 1, &[0; 11]);
        let (h, b) = parse_piece(&eleven[0]).expect("parses");
        assert!(matches!(r.push(h, b), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn result_round_trips() {
        let m = ResultMsg {
            pid: 42,
            result: br#"{"return":1}"#.to_vec(),
            stdout: b"out".to_vec(),
            stderr: vec![],
            stdout_total: 3,
            stderr_total: 0,
        };
        assert_eq!(ResultMsg::decode(&m.encode()), Ok(m));
        let died = DiedMsg {
            instance: 7,
            end: End::Signaled(9),
        };
        assert_eq!(DiedMsg::decode(&died.encode()), Ok(died));
        let exited = DiedMsg {
            instance: u32::MAX,
            end: End::Exited(-1),
        };
        assert_eq!(DiedMsg::decode(&exited.encode()), Ok(exited));
        let spare = SpareMsg {
            instance: 3,
            pid: 4242,
        };
        assert_eq!(SpareMsg::decode(&spare.encode()), Ok(spare));
        let kill = KillMsg { instance: 5 };
        assert_eq!(KillMsg::decode(&kill.encode()), Ok(kill));
    }

    #[test]
    fn a_private_frame_counts_the_slot_and_the_call() {
        let frame = private_frame(9, b"abc");
        assert_eq!(frame, b"\x07\0\0\0\x09\0\0\0abc");
    }
}
