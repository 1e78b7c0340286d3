//! Length-prefixed frames: a `u32` big-endian length, then a body made by
//! [`sand_protocol::wire::encode`].
//!
//! This module owns the size check: a length above [`MESSAGE_BYTES_MAX`] is refused as soon as
//! its four bytes are read, before any buffer for the body is grown. It does no I/O.

use bytes::{Buf, Bytes, BytesMut};
use sand_protocol::wire::{self, DecodeError, EncodeError, Envelope, MESSAGE_BYTES_MAX};

/// Bytes in a frame's length prefix.
pub const LEN_BYTES: usize = 4;

/// The first bytes a worker writes on the control stream: names the transport and its framing
/// version, so a stray client is told apart from a sand worker at once.
pub const CONTROL_PREAMBLE: [u8; 4] = *b"snd1";

/// Why received bytes are not a valid frame. Every variant closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the protocol allows.
    #[error("frame of {0} bytes announced, above the {max} byte limit", max = MESSAGE_BYTES_MAX)]
    Oversize(usize),
    /// The body is not an envelope.
    #[error("undecodable frame: {0}")]
    Decode(#[from] DecodeError),
    /// A stream ended inside a frame.
    #[error("stream ended {missing} bytes short of a frame")]
    Truncated {
        /// How many bytes were missing.
        missing: usize,
    },
    /// A payload stream held more than its one frame.
    #[error("a payload stream held bytes after its frame")]
    Trailing,
    /// The control stream did not start with [`CONTROL_PREAMBLE`].
    #[error("the control stream did not start with the sand preamble (got {0:02x?})")]
    Preamble([u8; 4]),
}

/// One encoded envelope, ready to write: its length prefix and its body.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The length prefix.
    pub head: [u8; LEN_BYTES],
    /// The encoded envelope.
    pub body: Bytes,
}

impl Frame {
    /// Encodes `msg`. Refuses it when above [`MESSAGE_BYTES_MAX`].
    pub fn encode<E: Envelope>(msg: &E) -> Result<Self, EncodeError> {
        let body = wire::encode(msg)?;
        // `wire::encode` refuses anything above MESSAGE_BYTES_MAX (16 MiB), so it fits a u32.
        let len = u32::try_from(body.len()).map_err(|_| EncodeError::TooLarge(body.len()))?;
        Ok(Self {
            head: len.to_be_bytes(),
            body: Bytes::from(body),
        })
    }

    /// Bytes on the wire, prefix included.
    pub fn wire_len(&self) -> usize {
        LEN_BYTES + self.body.len()
    }
}

/// Reads a length prefix, refusing one above the limit.
pub fn body_len(head: [u8; LEN_BYTES]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(head) as usize;
    if len > MESSAGE_BYTES_MAX {
        return Err(FrameError::Oversize(len));
    }
    Ok(len)
}

/// Decodes a frame body into an envelope.
pub fn decode<E: Envelope>(body: &[u8]) -> Result<E, FrameError> {
    Ok(wire::decode(body)?)
}

/// Cuts frames out of a byte stream that arrives in chunks of any size.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: BytesMut,
    /// The announced length of the frame being assembled, once its prefix is in.
    want: Option<usize>,
}

impl FrameBuffer {
    /// Appends received bytes.
    pub fn extend(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete frame body, if one is in. An oversize prefix is refused as soon as it
    /// arrives.
    pub fn next_body(&mut self) -> Result<Option<Bytes>, FrameError> {
        let want = match self.want {
            Some(want) => want,
            None => {
                let Some(head) = self.buf.get(..LEN_BYTES) else {
                    return Ok(None);
                };
                let mut prefix = [0; LEN_BYTES];
                prefix.copy_from_slice(head);
                let want = body_len(prefix)?;
                self.buf.advance(LEN_BYTES);
                self.want = Some(want);
                want
            }
        };
        if self.buf.len() < want {
            // Grow for the announced frame once; the length was checked against the limit.
            self.buf.reserve(want - self.buf.len());
            return Ok(None);
        }
        self.want = None;
        Ok(Some(self.buf.split_to(want).freeze()))
    }

    /// Checks that the stream ended between frames.
    pub fn finish(&self) -> Result<(), FrameError> {
        let missing = match self.want {
            Some(want) => want - self.buf.len(),
            None if self.buf.is_empty() => return Ok(()),
            None => LEN_BYTES - self.buf.len(),
        };
        Err(FrameError::Truncated { missing })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use sand_protocol::ids::Incarnation;
    use sand_protocol::wire::{ToGateway, Up};

    fn wire_bytes(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&f.head);
            out.extend_from_slice(&f.body);
        }
        out
    }

    #[test]
    fn frames_are_cut_from_chunks_of_any_size() {
        let msgs: Vec<Up> = (0..5)
            .map(|i| {
                Up::Protocol(ToGateway::Heartbeat {
                    incarnation: Incarnation(i),
                    running: i as u32 * 1000,
                })
            })
            .collect();
        let frames: Vec<Frame> = msgs.iter().map(|m| Frame::encode(m).unwrap()).collect();
        let bytes = wire_bytes(&frames);
        for chunk in 1..=bytes.len() {
            let mut buf = FrameBuffer::default();
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                buf.extend(piece);
                while let Some(body) = buf.next_body().unwrap() {
                    got.push(decode::<Up>(&body).unwrap());
                }
            }
            assert_eq!(got, msgs, "chunk size {chunk}");
            assert_eq!(buf.finish(), Ok(()));
        }
    }

    #[test]
    fn an_oversize_prefix_is_refused_before_its_body() {
        let mut buf = FrameBuffer::default();
        let len = (MESSAGE_BYTES_MAX + 1) as u32;
        buf.extend(&len.to_be_bytes());
        assert_eq!(
            buf.next_body(),
            Err(FrameError::Oversize(MESSAGE_BYTES_MAX + 1))
        );
        assert!(buf.buf.capacity() < 1024, "no room was made for the body");
        assert_eq!(
            body_len(u32::MAX.to_be_bytes()),
            Err(FrameError::Oversize(u32::MAX as usize))
        );
        assert_eq!(
            body_len((MESSAGE_BYTES_MAX as u32).to_be_bytes()),
            Ok(MESSAGE_BYTES_MAX)
        );
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_truncated() {
        let f = Frame::encode(&Up::Protocol(ToGateway::Hello {
            incarnation: Incarnation(3),
            resumed: false,
            started: Vec::new(),
        }))
        .unwrap();
        let bytes = wire_bytes(&[f]);
        let mut buf = FrameBuffer::default();
        buf.extend(&bytes[..bytes.len() - 1]);
        assert_eq!(buf.next_body(), Ok(None));
        assert_eq!(buf.finish(), Err(FrameError::Truncated { missing: 1 }));
        let mut buf = FrameBuffer::default();
        buf.extend(&bytes[..2]);
        assert_eq!(buf.finish(), Err(FrameError::Truncated { missing: 2 }));
    }

    #[test]
    fn garbage_bodies_are_decode_errors() {
        assert!(matches!(
            decode::<Up>(&[1, 200, 200, 200]),
            Err(FrameError::Decode(_))
        ));
        assert!(matches!(
            decode::<Up>(&[]),
            Err(FrameError::Decode(DecodeError::Empty))
        ));
    }
}
