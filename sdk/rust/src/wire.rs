//! The zygote wire: how the worker talks to a zygote over its fd 3, and to each of the zygote's
//! instances over the instance's private socket.
//!
//! fd 3 of a zygote is one end of an `AF_UNIX` `SOCK_SEQPACKET` socket pair; the worker holds the
//! other end. Every datagram is one *piece*: a 6-byte header (`kind: u8`, `flags: u8`,
//! `slot: u32` little-endian) and at most [`PIECE_BODY_BYTES_MAX`] bytes of body. A message is
//! the bodies of consecutive pieces of the same `(kind, slot)`, the last one without the
//! [`MORE`] flag. fd 3 is the zygote's alone: an instance closes its inherited copy before it
//! runs any handler code, so nothing an instance does can reach it.
//!
//! A slot is the worker's number for one call in flight on that zygote. An *instance number* is
//! the zygote's number for one forked instance, never reused within the zygote's life (a pid
//! can be, so a late `KILL` by pid could hit a newer instance).
//!
//! | kind | direction | slot | body |
//! |---|---|---|---|
//! | `CALL` 1 | worker → zygote | the call's | the execution's reference (length u8, then ASCII: the API's name for it), call u64, attempt u64 (LE), then the input JSON |
//! | `KILL` 3 | worker → zygote | the call's | instance u32: kill that instance (a timeout, an abandoned call, a broken wire) |
//! | `WANT` 4 | worker → zygote | 0 | empty: fork a spare instance and send it (`SPARE`) |
//! | `READY` 10 | zygote → worker | 0 | pid u32: the grain is loaded |
//! | `LOAD_FAILED` 11 | zygote → worker | 0 | UTF-8 text: why the grain could not be loaded |
//! | `DIED` 13 | zygote → worker | 0 | instance u32, how u8 (0 exited, 1 signal), code i32: an instance ended (every end is reported); one piece |
//! | `SPARE` 14 | zygote → worker | 0, or a call's | instance u32, pid u32, and one fd by `SCM_RIGHTS`: the instance's private socket; one piece |
//!
//! Results (kind 12, `RESULT`) do not travel on fd 3: a zygote that sends anything but `DIED`
//! and `SPARE` after `READY`, a `DIED` or `SPARE` in more than one
//! piece, or a message with fds its kind does not carry, breaks the wire; the worker closes
//! every fd that came with it and kills the zygote. The worker buffers no partial message of
//! fd 3 after `READY`, and before it at most [`HELLO_BYTES_MAX`].
//!
//! **Hand-over.** Each instance has a private `SOCK_STREAM` socket. The zygote forks it, sends
//! the worker its end of that socket (`SPARE`) and closes its own copy, so the worker holds the
//! only end. Both ways, the socket carries *private frames* ([`private_frame`]: length u32
//! counting what follows, slot u32, then the body). A `SPARE` with slot 0 is idle: the worker
//! writes a call to it (the `CALL` body), any size, without waking the zygote. The worker asks
//! for a spare with `WANT` once a call's result is out, never while a call is handed over, so
//! the fork does not compete with the call. A call for which the worker holds no spare goes to
//! the zygote as `CALL`: the zygote forks an instance, sends its `SPARE` with the call's slot
//! (before the call, so the worker can read the instance's result), and writes the call to it.
//!
//! | private frame | direction | slot | body |
//! |---|---|---|---|
//! | call | worker → instance | the call's | the `CALL` body ([`CallMsg`]) |
//! | result | instance → worker | the call it holds | [`ResultMsg`], at most [`RESULT_BYTES_MAX`] |
//!
//! **Results and ends.** The instance writes its result as a private frame ([`ResultMsg`] body,
//! at most [`RESULT_BYTES_MAX`]) on its private socket, then waits there: for the next call
//! (`--reuse N`), or end-of-file, on which it exits. A result is the only thing an instance
//! sends, and the worker takes from an instance only the result of the call it holds, once: a
//! frame for another slot, a second result, a result while it holds no call, or one above the
//! bound is the instance breaking the wire. The worker kills that instance and fails its call
//! with `BadOutput`; other calls are unaffected (the instance cannot name them). The worker
//! shuts the socket down once it has the result and wants no more calls there. The zygote
//! watches every instance by pidfd and reports each end as `DIED`; the worker knows which call
//! (if any) it gave that instance, and ignores the ends of instances that owe nothing. An
//! instance exits only at its socket's end-of-file, after the worker has read its result, so a
//! result is never mistaken for a death.
//!
//! A result document is JSON, one of `{"return": v}`, `{"next": [grain, v]}`,
//! `{"fan_out": [[grain, v], ...], "join": grain}`, `{"error": "text"}` (the handler raised) or
//! `{"error": "text", "kind": "bad_output"}` (the runtime could not encode what it returned).
//!
//! **Reach.** A zygote makes itself non-dumpable (`PR_SET_DUMPABLE` 0) before it loads the
//! grain, and its instances inherit that: an instance cannot open another's or the zygote's
//! `/proc/<pid>/mem`, `fd/`, `environ`, nor ptrace them or take their fds (`pidfd_getfd`). A
//! runtime that cannot do so does not load the grain (`LOAD_FAILED`).
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
/// The most bytes of a message between the worker and a grain (equal to the worker's own
/// bound, `sand_protocol::wire::MESSAGE_BYTES_MAX`).
pub const MESSAGE_BYTES_MAX: usize = 16 << 20;
/// The most bytes of a result frame's body ([`ResultMsg`]) an instance may send: a result
/// document of [`MESSAGE_BYTES_MAX`], two captures, and the fields.
pub const RESULT_BYTES_MAX: usize = MESSAGE_BYTES_MAX + 2 * CAPTURE_BYTES_MAX + RESULT_HEAD_BYTES;
/// The most bytes the worker buffers of a zygote's first message (`READY` or `LOAD_FAILED`).
pub const HELLO_BYTES_MAX: usize = 64 * 1024;
/// The length of a [`ResultMsg`]'s fields before its byte strings.
const RESULT_HEAD_BYTES: usize = 36;
/// The length of a private frame's head: length u32, slot u32.
pub const PRIVATE_HEAD_BYTES: usize = 8;
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
    /// A call's result: the kind of what an instance sends on its private socket, never a
    /// piece on fd 3.
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
    /// The partial messages of a channel grew past the receiver's limit for all of them.
    #[error("the partial messages of a channel exceed {limit} bytes in all")]
    TooMuchHeld {
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

/// Joins pieces back into messages, per `(kind, slot)`, refusing any message above a limit,
/// and any piece that would make the partial messages of the channel hold more than another.
#[derive(Debug)]
pub struct Reassembler {
    partial: HashMap<(Kind, u32), Vec<u8>>,
    limit: usize,
    total_limit: usize,
    /// The bytes of all partial messages.
    held: usize,
}

impl Reassembler {
    /// A reassembler that refuses messages longer than `limit` bytes, and partial messages
    /// holding more than `total_limit` bytes in all.
    pub fn new(limit: usize, total_limit: usize) -> Self {
        Self {
            partial: HashMap::new(),
            limit,
            total_limit,
            held: 0,
        }
    }

    /// Adds a piece; returns the message it completes, if any. A message that grows past the
    /// limit, or a piece past the total limit, is dropped and reported once, when it
    /// overflows.
    pub fn push(&mut self, header: Header, body: &[u8]) -> Result<Option<Vec<u8>>, WireError> {
        let key = (header.kind, header.slot);
        let mut message = self.partial.remove(&key).unwrap_or_default();
        self.held -= message.len();
        if message.len() + body.len() > self.limit {
            return Err(WireError::TooLarge {
                kind: header.kind,
                slot: header.slot,
                limit: self.limit,
            });
        }
        if header.more && self.held + message.len() + body.len() > self.total_limit {
            return Err(WireError::TooMuchHeld {
                limit: self.total_limit,
            });
        }
        message.extend_from_slice(body);
        if header.more {
            self.held += message.len();
            self.partial.insert(key, message);
            Ok(None)
        } else {
            Ok(Some(message))
        }
    }

    /// The bytes held in partial messages.
    pub fn held(&self) -> usize {
        self.held
    }
}

/// The longest execution reference a `CALL` carries (its length is one byte).
pub const EXEC_REF_BYTES_MAX: usize = u8::MAX as usize;

/// The body of a `CALL` message.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CallMsg {
    /// The execution, as the API names it (its reference); empty where there is no gateway.
    pub exec: String,
    /// The run's W3C `traceparent` (its own span, the parent of any span the handler makes);
    /// empty for no trace.
    pub trace: String,
    /// The call id.
    pub call: u64,
    /// The attempt number.
    pub attempt: u64,
    /// The input, a JSON text.
    pub input: Vec<u8>,
}

impl CallMsg {
    /// Encodes the body: the reference and the traceparent (a length byte each, then the
    /// text), the call u64, the attempt u64, then the input.
    pub fn encode(&self) -> Vec<u8> {
        let exec = &self.exec.as_bytes()[..self.exec.len().min(EXEC_REF_BYTES_MAX)];
        let trace = &self.trace.as_bytes()[..self.trace.len().min(EXEC_REF_BYTES_MAX)];
        let mut out = Vec::with_capacity(18 + exec.len() + trace.len() + self.input.len());
        for text in [exec, trace] {
            out.push(text.len() as u8);
            out.extend_from_slice(text);
        }
        out.extend_from_slice(&self.call.to_le_bytes());
        out.extend_from_slice(&self.attempt.to_le_bytes());
        out.extend_from_slice(&self.input);
        out
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(Kind::Call, body);
        let mut text = || -> Result<String, WireError> {
            let n = r.bytes(1)?[0];
            Ok(String::from_utf8_lossy(r.bytes(n.into())?).into_owned())
        };
        Ok(Self {
            exec: text()?,
            trace: text()?,
            call: r.u64()?,
            attempt: r.u64()?,
            input: r.rest().to_vec(),
        })
    }
}

/// The body of an instance's result frame: the result document and the call's captured output.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ResultMsg {
    /// The pid of the instance that ran the call (as the zygote sees it).
    pub pid: u32,
    /// How many calls the instance served before this one: 0 is a cold start.
    pub served: u32,
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
    /// Encodes the body: pid u32, served u32, result length u32, stdout length u32, stderr length u32,
    /// stdout total u64, stderr total u64, then the three byte strings.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(32 + self.result.len() + self.stdout.len() + self.stderr.len());
        out.extend_from_slice(&self.pid.to_le_bytes());
        out.extend_from_slice(&self.served.to_le_bytes());
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
        let served = r.u32()?;
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
            served,
            result,
            stdout,
            stderr,
            stdout_total,
            stderr_total,
        })
    }
}

/// A frame on an instance's private socket: length u32 (of what follows), slot u32, then the
/// body: a `CALL` body ([`CallMsg`]) from the worker, a [`ResultMsg`] from the instance.
pub fn private_frame(slot: u32, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(PRIVATE_HEAD_BYTES + body.len());
    frame.extend_from_slice(&((4 + body.len()) as u32).to_le_bytes());
    frame.extend_from_slice(&slot.to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

/// A private frame's head: the slot, and the length of the body that follows. None: the
/// length cannot even hold the slot.
pub fn parse_private_head(head: [u8; PRIVATE_HEAD_BYTES]) -> Option<(u32, usize)> {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let slot = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    Some((slot, len.checked_sub(4)?))
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
        let mut r = Reassembler::new(1 << 20, 1 << 20);
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
    fn a_call_carries_its_execution_as_the_api_names_it_and_its_trace() {
        let call = CallMsg {
            exec: "0000000100000002".to_owned() + &"ab".repeat(16),
            trace: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            call: 22,
            attempt: 3,
            input: b"[1]".to_vec(),
        };
        assert_eq!(CallMsg::decode(&call.encode()), Ok(call.clone()));
        // A reference past the length byte's reach is cut, never mis-framed.
        let long = CallMsg {
            exec: "x".repeat(300),
            trace: "y".repeat(300),
            ..call
        };
        let decoded = CallMsg::decode(&long.encode()).expect("decodes");
        assert_eq!(decoded.exec.len(), EXEC_REF_BYTES_MAX);
        assert_eq!(decoded.trace.len(), EXEC_REF_BYTES_MAX);
        assert_eq!(
            (decoded.call, decoded.attempt, decoded.input),
            (22, 3, b"[1]".to_vec())
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
        let mut r = Reassembler::new(10, 100);
        let eleven = pieces(Kind::Call, 1, &[0; 11]);
        let (h, b) = parse_piece(&eleven[0]).expect("parses");
        assert!(matches!(r.push(h, b), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn partial_messages_for_invented_slots_hold_at_most_the_total_limit() {
        let mut r = Reassembler::new(PIECE_BODY_BYTES_MAX * 4, PIECE_BODY_BYTES_MAX * 8);
        let body = vec![7u8; PIECE_BODY_BYTES_MAX];
        let mut refused = 0;
        for slot in 1..=100u32 {
            let header = Header {
                kind: Kind::Call,
                more: true,
                slot,
            };
            match r.push(header, &body) {
                Ok(None) => {}
                Err(WireError::TooMuchHeld { .. }) => refused += 1,
                other => panic!("slot {slot}: {other:?}"),
            }
            assert!(r.held() <= PIECE_BODY_BYTES_MAX * 8, "slot {slot}");
        }
        assert_eq!(
            refused, 92,
            "the first 8 slots fill the total, the rest are refused"
        );
        // A piece that ends a message never counts against the total: it frees what it held.
        let last = Header {
            kind: Kind::Call,
            more: false,
            slot: 1,
        };
        let done = r.push(last, b"end").expect("ends").expect("a message");
        assert_eq!(done.len(), PIECE_BODY_BYTES_MAX + 3);
        assert_eq!(r.held(), PIECE_BODY_BYTES_MAX * 7);
    }

    #[test]
    fn a_private_head_gives_the_slot_and_the_body_length() {
        let frame = private_frame(9, b"abc");
        let head: [u8; PRIVATE_HEAD_BYTES] = frame[..8].try_into().expect("8 bytes");
        assert_eq!(parse_private_head(head), Some((9, 3)));
        assert_eq!(parse_private_head([3, 0, 0, 0, 1, 0, 0, 0]), None);
    }

    #[test]
    fn result_round_trips() {
        assert_eq!(RESULT_HEAD_BYTES, ResultMsg::default().encode().len());
        let m = ResultMsg {
            pid: 42,
            served: 7,
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
