//! The control protocol between a worker and its sandbox's holder.
//!
//! Frames are a 4-byte big-endian length followed by that many bytes of JSON. The worker sends
//! one [`HolderConfig`] first, then [`Request`]s; the holder answers with [`Event`]s. A spawn
//! request carries the descriptors it announces (none to four) in one SCM_RIGHTS message
//! attached to the first byte of its frame, so the holder pairs descriptors with spawn requests
//! in arrival order.
//!
//! Paths and arguments travel as raw bytes: Unix paths need not be UTF-8.
//! Nothing here does I/O; both sides feed received bytes into a [`FrameBuffer`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::RunAs;

/// Largest frame either side accepts. A spawn request with a large environment stays far below.
pub(crate) const MAX_FRAME_BYTES: usize = 16 << 20;

/// What the holder needs to build the sandbox; the first frame on the control socket.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HolderConfig {
    /// The app name, already validated; also the sandbox's hostname.
    pub name: String,
    /// Canonical host path of the app bundle, mounted read-only at `/app`.
    pub bundle_dir: Vec<u8>,
    /// Read-only mounts: a canonical host path, and where it appears inside.
    pub ro_paths: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether the sandbox shares the host's network namespace.
    pub network: bool,
    /// Who the sandbox's processes run as when the holder is real root; already validated.
    pub run_as: RunAs,
    /// The size of each of the `/tmp` and `/dev/shm` tmpfs, in bytes (never 0: that would
    /// mean unlimited to the kernel).
    pub tmpfs_bytes: u64,
}

/// A worker's request to the sandbox's PID 1.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Start a process; the frame carries the descriptors [`SpawnRequest`] announces.
    Spawn(SpawnRequest),
    /// SIGKILL the process group started by spawn request `spawn_id`, if still running.
    Kill {
        /// Correlates the reply.
        id: u64,
        /// The spawn request that started the process, so a reused pid is never hit.
        spawn_id: u64,
    },
}

/// A process to start inside the sandbox.
///
/// Its frame carries, in this order, the channel if `channel`, then stdin, stdout and stderr
/// if `stdio`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SpawnRequest {
    /// Correlates the reply; also names the process for later kills.
    pub id: u64,
    /// Program path inside the sandbox.
    pub program: Vec<u8>,
    /// Arguments after argv[0].
    pub args: Vec<Vec<u8>>,
    /// The complete environment.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory inside the sandbox.
    pub cwd: Vec<u8>,
    /// A descriptor for fd 3 rides on the frame (else the process has no fd 3).
    pub channel: bool,
    /// Descriptors for fds 0, 1 and 2 ride on the frame (else all three are /dev/null).
    pub stdio: bool,
}

impl SpawnRequest {
    /// How many descriptors ride on this request's frame.
    pub(crate) fn descriptors(&self) -> usize {
        usize::from(self.channel) + 3 * usize::from(self.stdio)
    }
}

/// What the holder reports.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum Event {
    /// The sandbox is built; requests are served from now on.
    Ready,
    /// Building the sandbox failed; the holder exits after sending this.
    SetupFailed(String),
    /// Spawn request `id` started process `pid` (a pid of the sandbox's namespace).
    Spawned {
        /// The request.
        id: u64,
        /// The new process.
        pid: u32,
    },
    /// Kill request `id` was carried out (or the process had already exited).
    Killed {
        /// The request.
        id: u64,
    },
    /// Request `id` failed.
    Failed {
        /// The request.
        id: u64,
        /// Why, for a human.
        error: String,
    },
    /// A spawned process ended.
    Exited {
        /// The process.
        pid: u32,
        /// How it ended.
        status: WireExit,
    },
}

/// How a process ended, as the holder saw it in `waitpid`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum WireExit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The length prefix exceeds [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// The body is not the JSON message expected.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes one message as a length-prefixed frame.
pub(crate) fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    let body = serde_json::to_vec(message)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&len| len as usize <= MAX_FRAME_BYTES)
        .ok_or(WireError::TooLarge(body.len()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Accumulates received bytes and splits them into messages.
#[derive(Debug, Default)]
pub(crate) struct FrameBuffer {
    bytes: Vec<u8>,
}

impl FrameBuffer {
    /// Appends received bytes.
    pub(crate) fn push(&mut self, received: &[u8]) {
        self.bytes.extend_from_slice(received);
    }

    /// Takes the next complete message, if one has fully arrived.
    pub(crate) fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, WireError> {
        let Some(prefix) = self.bytes.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(WireError::TooLarge(len));
        }
        if self.bytes.len() < 4 + len {
            return Ok(None);
        }
        let message = serde_json::from_slice(&self.bytes[4..4 + len]);
        self.bytes.drain(..4 + len);
        Ok(Some(message?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads_decode_in_order() {
        let mut wire = encode(&Event::Spawned { id: 7, pid: 42 }).expect("encode");
        wire.extend(
            encode(&Event::Exited {
                pid: 42,
                status: WireExit::Signal(9),
            })
            .expect("encode"),
        );
        let mut buffer = FrameBuffer::default();
        let mut seen = Vec::new();
        for byte in &wire {
            buffer.push(std::slice::from_ref(byte));
            while let Some(event) = buffer.next::<Event>().expect("decode") {
                seen.push(event);
            }
        }
        assert_eq!(
            seen,
            vec![
                Event::Spawned { id: 7, pid: 42 },
                Event::Exited {
                    pid: 42,
                    status: WireExit::Signal(9)
                }
            ]
        );
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors_not_panics() {
        let mut buffer = FrameBuffer::default();
        buffer.push(&u32::MAX.to_be_bytes());
        assert!(matches!(
            buffer.next::<Event>(),
            Err(WireError::TooLarge(_))
        ));

        let mut buffer = FrameBuffer::default();
        buffer.push(&3u32.to_be_bytes());
        buffer.push(b"{x}");
        assert!(matches!(
            buffer.next::<Event>(),
            Err(WireError::Malformed(_))
        ));
    }
}
