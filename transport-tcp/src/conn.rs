//! One open TCP+TLS connection, the same on both sides: the greeting, the writer (control
//! frames first, keep-alives when idle), the reader (with its idle timeout), and how the
//! connection ends.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use sand_protocol::wire::Envelope;
use sand_transport::conn::{self, Deliver, HandOver, Inbox, Plumbing, Queued, CLOSE_NORMAL};
use sand_transport::framing::{FrameBuffer, FrameError, CONTROL_PREAMBLE, LEN_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Tcp;

/// How much one read takes at most.
const READ_BYTES: usize = 64 * 1024;

/// Frames up to this size are copied and gathered with others into one write; larger ones are
/// written from their own buffer.
const GATHER_BYTES_MAX: usize = 16 * 1024;

/// How a connection ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Reading or writing failed (the peer went away, or the network broke).
    Io(io::Error),
    /// The peer closed the connection between two frames.
    PeerClosed,
    /// Nothing came from the peer for the idle timeout.
    TimedOut(Duration),
    /// The peer broke the framing; this side closed the connection.
    Violation(FrameError),
    /// A message for the peer did not fit in its send queue; this side closed the connection
    /// rather than go on without it.
    Overflowed,
    /// This side closed the connection, with a code of [`sand_transport::conn`] and a reason.
    Closed(u32, String),
    /// Nobody wants this connection's messages any more.
    Unwanted,
    /// A task of the connection panicked (a bug); the connection was closed.
    Panicked,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Io(e) => write!(f, "{e}"),
            Ended::PeerClosed => f.write_str("the peer closed the connection"),
            Ended::TimedOut(t) => write!(f, "nothing heard from the peer for {t:?}"),
            Ended::Violation(e) => write!(f, "the peer broke the framing: {e}"),
            Ended::Overflowed => f.write_str(
                "the send queue to the peer overflowed (the peer or the network is slower than \
                 this side sends)",
            ),
            Ended::Closed(code, reason) => write!(f, "closed (code {code}): {reason}"),
            Ended::Unwanted => f.write_str("the connection was replaced or is no longer wanted"),
            Ended::Panicked => f.write_str("a connection task panicked"),
        }
    }
}

impl Ended {
    /// How bad the end is, for the log line.
    pub(crate) fn severity(&self) -> Severity {
        match self {
            Ended::Violation(_) | Ended::Overflowed | Ended::Panicked => Severity::ClosedHere,
            Ended::Io(_) | Ended::TimedOut(_) => Severity::Broke,
            Ended::Closed(code, _) if *code != CLOSE_NORMAL => Severity::ClosedHere,
            Ended::Closed(..) | Ended::PeerClosed | Ended::Unwanted => Severity::Orderly,
        }
    }
}

/// How a connection's end is logged.
pub(crate) enum Severity {
    /// This side closed it because something went wrong: a warning.
    ClosedHere,
    /// The peer or the network went away: a warning.
    Broke,
    /// Closed on purpose by either side: information.
    Orderly,
}

/// Runs a connection until it ends, then stops every task it started, which closes the socket.
///
/// `stream` is the TLS stream past the greeting; `conn` closes the connection from outside.
pub(crate) async fn drive<S, In>(stream: S, conn: Tcp, plumbing: Plumbing<In>) -> Ended
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    In: Envelope + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let config = plumbing.config;
    let credits = Arc::new(Semaphore::new(config.recv_queue_len_max));
    let counter = plumbing.tasks;
    let Inbox {
        control,
        payload,
        ending,
    } = plumbing.inbox;
    let mut tasks = JoinSet::new();
    let writing = write_frames(write, control, payload, config.keep_alive_interval);
    tasks.spawn(counter.track(writing));
    let reading = read_frames(read, credits, plumbing.deliver, config.idle_timeout);
    tasks.spawn(counter.track(reading));
    tasks.spawn(counter.track(async move {
        let (code, reason) = conn.closed().await;
        Ended::Closed(code, reason)
    }));
    ending
        // Stopping the tasks drops the socket: that is how a TCP connection is closed.
        .first_of(tasks, Ended::Overflowed, Ended::Panicked, |_| {})
        .await
}

/// Writes frames as they are queued, control frames before payload frames, and a keep-alive
/// when nothing else was written for `keep_alive`. Small frames are gathered and written
/// together, so that a burst of control messages makes few TLS records; the gathered bytes are
/// written, and flushed, whenever both queues are empty.
async fn write_frames<W: AsyncWrite>(
    mut write: WriteHalf<W>,
    mut control: mpsc::UnboundedReceiver<Queued>,
    mut payload: mpsc::UnboundedReceiver<Queued>,
    keep_alive: Duration,
) -> Ended {
    let mut gathered = BytesMut::new();
    // The timer is re-armed only when it fires, from the time of the last write: writing a
    // frame costs no timer operation.
    let mut last_write = Instant::now();
    let idle = tokio::time::sleep(keep_alive);
    tokio::pin!(idle);
    loop {
        let next = tokio::select! {
            biased;
            q = control.recv() => q,
            q = payload.recv() => q,
            () = &mut idle => {
                if last_write.elapsed() >= keep_alive {
                    let sent = async {
                        write.write_all(&[0; LEN_BYTES]).await?;
                        write.flush().await
                    };
                    if let Err(e) = sent.await {
                        return Ended::Io(e);
                    }
                    last_write = Instant::now();
                }
                idle.as_mut().reset(last_write + keep_alive);
                continue;
            }
        };
        // The outbox was dropped: the endpoint is shutting down.
        let Some(q) = next else {
            return Ended::Unwanted;
        };
        let written = async {
            gathered.extend_from_slice(&q.frame.head);
            if q.frame.body.len() <= GATHER_BYTES_MAX {
                gathered.extend_from_slice(&q.frame.body);
            } else {
                write.write_all(&gathered).await?;
                gathered.clear();
                write.write_all(&q.frame.body).await?;
            }
            if control.is_empty() && payload.is_empty() {
                write.write_all(&gathered).await?;
                gathered.clear();
                write.flush().await?;
            }
            io::Result::Ok(())
        };
        if let Err(e) = written.await {
            return Ended::Io(e);
        }
        last_write = Instant::now();
    }
}

/// Reads frames and delivers them in order, each with a receive credit: while the driver is
/// behind, reading pauses and TCP flow control holds the peer back. A peer silent for
/// `idle_timeout` while this side waits to read is dropped.
async fn read_frames<R: AsyncRead, In: Envelope>(
    mut read: ReadHalf<R>,
    credits: Arc<Semaphore>,
    deliver: Deliver<In>,
    idle_timeout: Duration,
) -> Ended {
    let mut buf = FrameBuffer::default();
    let mut chunk = vec![0u8; READ_BYTES];
    // Re-armed only when it fires, from the time reading last started or got bytes.
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    loop {
        match conn::hand_over(&mut buf, &credits, &deliver, true).await {
            Ok(()) => {}
            Err(HandOver::Violation(e)) => return Ended::Violation(e),
            Err(HandOver::Unwanted) => return Ended::Unwanted,
        }
        let waiting_since = Instant::now();
        let read = loop {
            tokio::select! {
                read = read.read(&mut chunk) => break read,
                () = &mut idle => {
                    if waiting_since.elapsed() >= idle_timeout {
                        return Ended::TimedOut(idle_timeout);
                    }
                    idle.as_mut().reset(waiting_since + idle_timeout);
                }
            }
        };
        match read {
            Ok(0) => {
                return match buf.finish() {
                    Ok(()) => Ended::PeerClosed,
                    Err(e) => Ended::Violation(e),
                }
            }
            Ok(n) => buf.extend(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && buf.finish().is_ok() => {
                return Ended::PeerClosed
            }
            Err(e) => return Ended::Io(e),
        }
    }
}

/// The worker's side of the greeting: say the preamble and wait for the gateway to say it back.
pub(crate) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(), String> {
    let greeting = async {
        stream.write_all(&CONTROL_PREAMBLE).await?;
        stream.flush().await?;
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await?;
        io::Result::Ok(answer)
    };
    let answer = tokio::time::timeout(timeout, greeting)
        .await
        .map_err(|_| format!("the gateway did not answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    if answer != CONTROL_PREAMBLE {
        return Err(FrameError::Preamble(answer).to_string());
    }
    Ok(())
}

/// The gateway's side of the greeting: check the preamble and say it back.
pub(crate) async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(), Ended> {
    let greeting = async {
        let mut said = [0u8; 4];
        stream.read_exact(&mut said).await.map_err(Ended::Io)?;
        if said != CONTROL_PREAMBLE {
            return Err(Ended::Violation(FrameError::Preamble(said)));
        }
        stream
            .write_all(&CONTROL_PREAMBLE)
            .await
            .map_err(Ended::Io)?;
        stream.flush().await.map_err(Ended::Io)
    };
    match tokio::time::timeout(timeout, greeting).await {
        Ok(result) => result,
        Err(_) => Err(Ended::TimedOut(timeout)),
    }
}
