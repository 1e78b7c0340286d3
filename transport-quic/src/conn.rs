//! One open QUIC connection, the same on both sides: the control-stream writer
//! and reader, the payload-stream writers and readers, and how the connection ends.
//!
//! Every task a connection runs lives in a `JoinSet` owned by [`drive`]; when `drive` returns,
//! they have all stopped. Nothing here decides what a message means. A message that does not fit
//! in the send budget ends the connection: the protocol recovers from a broken connection, never
//! from a gap in a live one.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{
    Connection, ConnectionError, ReadExactError, ReadToEndError, RecvStream, SendStream, VarInt,
};
use sand_protocol::wire::Envelope;
use sand_transport::conn::{
    self, Deliver, HandOver, Inbox, Plumbing, Queued, TaskCounter, CLOSE_NORMAL, CLOSE_OVERFLOW,
    CLOSE_VIOLATION,
};
use sand_transport::framing::{self, FrameBuffer, FrameError, CONTROL_PREAMBLE, LEN_BYTES};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// The most control frames written in one batch.
const CONTROL_BATCH_MAX: usize = 64;

/// How much a control-stream read takes at most at once.
const CONTROL_READ_BYTES: usize = 64 * 1024;

/// How a connection ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The connection closed, for the reason quinn gives.
    Closed(ConnectionError),
    /// The peer broke the framing; this side closed the connection.
    Violation(FrameError),
    /// A message for the peer did not fit in its send queue; this side closed the connection
    /// rather than go on without it.
    Overflowed,
    /// A payload stream was given up (reset by its sender or stopped by its reader) while the
    /// connection lived; this side closed the connection rather than go on without that message.
    Abandoned(String),
    /// The peer finished its control stream.
    ControlFinished,
    /// Nobody wants this connection's messages any more.
    Unwanted,
    /// A task of the connection panicked (a bug); the connection was closed.
    Panicked,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Closed(e) => write!(f, "{e}"),
            Ended::Violation(e) => write!(f, "the peer broke the framing: {e}"),
            Ended::Abandoned(e) => write!(f, "a message was abandoned on its stream: {e}"),
            Ended::Overflowed => f.write_str(
                "the send queue to the peer overflowed (the peer or the network is slower than \
                 this side sends)",
            ),
            Ended::ControlFinished => f.write_str("the peer finished its control stream"),
            Ended::Unwanted => f.write_str("the connection was replaced or is no longer wanted"),
            Ended::Panicked => f.write_str("a connection task panicked"),
        }
    }
}

impl From<HandOver> for Ended {
    fn from(stopped: HandOver) -> Self {
        match stopped {
            HandOver::Violation(e) => Ended::Violation(e),
            HandOver::Unwanted => Ended::Unwanted,
        }
    }
}

/// Runs a connection until it ends, then stops every task it started and closes it.
pub(crate) async fn drive<In>(
    conn: Connection,
    (control_send, control_recv): (SendStream, RecvStream),
    plumbing: Plumbing<In>,
) -> Ended
where
    In: Envelope + Send + 'static,
{
    let (counter, deliver, config) = (plumbing.tasks, plumbing.deliver, plumbing.config);
    let Inbox {
        control,
        payload,
        ending,
    } = plumbing.inbox;
    // Heartbeats and acks go before payload bytes whenever both are waiting.
    let _ = control_send.set_priority(1);
    // Received and not yet taken by the driver, per stream class: so that payloads waiting for
    // the driver never hold up a heartbeat.
    let control_credits = Arc::new(Semaphore::new(config.recv_queue_len_max));
    let payload_credits = Arc::new(Semaphore::new(config.recv_queue_len_max));
    let mut tasks = JoinSet::new();
    tasks.spawn(counter.track(write_control(control_send, control)));
    tasks.spawn(counter.track(write_payloads(
        conn.clone(),
        payload,
        config.payload_streams_max,
        counter.clone(),
    )));
    tasks.spawn(counter.track(read_control(control_recv, control_credits, deliver.clone())));
    tasks.spawn(counter.track(read_payloads(
        conn.clone(),
        payload_credits,
        deliver,
        counter.clone(),
    )));
    let closed = conn.clone();
    tasks.spawn(counter.track(async move { Ended::Closed(closed.closed().await) }));
    let close = |ended: &Ended| match ended {
        Ended::Violation(e) => {
            conn.close(VarInt::from_u32(CLOSE_VIOLATION), e.to_string().as_bytes())
        }
        Ended::Abandoned(_) => conn.close(
            VarInt::from_u32(CLOSE_VIOLATION),
            ended.to_string().as_bytes(),
        ),
        Ended::Overflowed => conn.close(
            VarInt::from_u32(CLOSE_OVERFLOW),
            ended.to_string().as_bytes(),
        ),
        Ended::ControlFinished | Ended::Unwanted | Ended::Panicked => {
            conn.close(VarInt::from_u32(CLOSE_NORMAL), ended.to_string().as_bytes())
        }
        Ended::Closed(_) => {}
    };
    ending
        .first_of(tasks, Ended::Overflowed, Ended::Panicked, close)
        .await
}

/// Writes control frames in order, a batch at a time. Ends only with the connection.
async fn write_control(mut send: SendStream, mut queue: mpsc::UnboundedReceiver<Queued>) -> Ended {
    let mut batch = BytesMut::new();
    let mut held = Vec::with_capacity(CONTROL_BATCH_MAX);
    while let Some(first) = queue.recv().await {
        held.push(first);
        while held.len() < CONTROL_BATCH_MAX {
            match queue.try_recv() {
                Ok(next) => held.push(next),
                Err(_) => break,
            }
        }
        for q in &held {
            batch.extend_from_slice(&q.frame.head);
            batch.extend_from_slice(&q.frame.body);
        }
        let result = send.write_all(&batch).await;
        batch.clear();
        held.clear();
        if let Err(e) = result {
            return write_error(e);
        }
    }
    // The outbox was dropped: the endpoint is shutting down.
    Ended::Unwanted
}

/// Writes each payload frame on a stream of its own, up to `streams_max` at once. Ends when a
/// payload cannot be written, since its message would then be missing from a live connection.
async fn write_payloads(
    conn: Connection,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    streams_max: u32,
    counter: TaskCounter,
) -> Ended {
    let streams = Arc::new(Semaphore::new(streams_max as usize));
    let mut writers: JoinSet<Result<(), Ended>> = JoinSet::new();
    loop {
        tokio::select! {
            queued = queue.recv() => {
                // The outbox was dropped: the endpoint is shutting down.
                let Some(q) = queued else {
                    return Ended::Unwanted;
                };
                // Never closed: it lives as long as this task.
                let Ok(stream) = streams.clone().acquire_owned().await else {
                    return Ended::Panicked;
                };
                let conn = conn.clone();
                writers.spawn(counter.track(async move {
                    let _stream = stream;
                    write_payload(&conn, q).await
                }));
            }
            Some(written) = writers.join_next() => match written {
                Ok(Ok(())) => {}
                Ok(Err(ended)) => return ended,
                Err(_) => return Ended::Panicked,
            },
        }
    }
}

/// Writes one payload frame on a fresh stream. A peer that stops reading it before it is all
/// handed to QUIC has given the message up; one that stops later is not noticed (a sand peer
/// stops a stream only when its connection is going down).
async fn write_payload(conn: &Connection, q: Queued) -> Result<(), Ended> {
    let mut send = conn.open_uni().await.map_err(Ended::Closed)?;
    let mut chunks = [Bytes::copy_from_slice(&q.frame.head), q.frame.body];
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => Ended::Closed(e),
            other => Ended::Abandoned(other.to_string()),
        })?;
    // Fails only on a stream already finished or reset, which nothing here does.
    send.finish().map_err(|e| Ended::Abandoned(e.to_string()))
}

fn write_error(e: quinn::WriteError) -> Ended {
    match e {
        quinn::WriteError::ConnectionLost(e) => Ended::Closed(e),
        // The peer stopped or never accepted our control stream: it wants no more from us.
        _ => Ended::ControlFinished,
    }
}

/// Reads control frames in order and delivers them. Ends only with the connection.
async fn read_control<In: Envelope>(
    mut recv: RecvStream,
    credits: Arc<Semaphore>,
    deliver: Deliver<In>,
) -> Ended {
    let mut buf = FrameBuffer::default();
    loop {
        if let Err(stopped) = conn::hand_over(&mut buf, &credits, &deliver, false).await {
            return stopped.into();
        }
        match recv.read_chunk(CONTROL_READ_BYTES, true).await {
            Ok(Some(chunk)) => buf.extend(&chunk.bytes),
            Ok(None) => {
                return match buf.finish() {
                    Ok(()) => Ended::ControlFinished,
                    Err(e) => Ended::Violation(e),
                }
            }
            Err(quinn::ReadError::ConnectionLost(e)) => return Ended::Closed(e),
            Err(_) => return Ended::ControlFinished,
        }
    }
}

/// Accepts payload streams and reads each in a task of its own, so one large payload does not
/// hold up the others. A stream is accepted only with a receive credit in hand: while the driver
/// is behind, streams wait unaccepted and QUIC flow control holds the peer back, so at most
/// `recv_queue_len_max` payloads are in memory. Ends when the connection ends or a stream breaks
/// the framing.
async fn read_payloads<In: Envelope + Send + 'static>(
    conn: Connection,
    credits: Arc<Semaphore>,
    deliver: Deliver<In>,
    counter: TaskCounter,
) -> Ended {
    let mut readers: JoinSet<Result<(), Ended>> = JoinSet::new();
    let mut credit: Option<OwnedSemaphorePermit> = None;
    loop {
        tokio::select! {
            acquired = credits.clone().acquire_owned(), if credit.is_none() => match acquired {
                Ok(permit) => credit = Some(permit),
                // Never closed: it lives as long as this connection.
                Err(_) => return Ended::Unwanted,
            },
            accepted = conn.accept_uni(), if credit.is_some() => match (accepted, credit.take()) {
                (Ok(recv), Some(permit)) => {
                    readers.spawn(counter.track(read_payload(recv, permit, deliver.clone())));
                }
                (Ok(_), None) => return Ended::Panicked,
                (Err(e), _) => return Ended::Closed(e),
            },
            Some(done) = readers.join_next() => match done {
                Ok(Ok(())) => {}
                Ok(Err(ended)) => return ended,
                Err(_) => return Ended::Panicked,
            },
        }
    }
}

/// Reads the one frame of a payload stream and delivers it with `credit`.
async fn read_payload<In: Envelope>(
    mut recv: RecvStream,
    credit: OwnedSemaphorePermit,
    deliver: Deliver<In>,
) -> Result<(), Ended> {
    let mut head = [0u8; LEN_BYTES];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(got)) => {
            return Err(Ended::Violation(FrameError::Truncated {
                missing: LEN_BYTES - got,
            }))
        }
        Err(ReadExactError::ReadError(e)) => return Err(lost_stream(e)),
    }
    let len = framing::body_len(head).map_err(Ended::Violation)?;
    // `read_to_end` grows its buffer as bytes arrive, never past `len`.
    let body = match recv.read_to_end(len).await {
        Ok(body) => body,
        Err(ReadToEndError::TooLong) => return Err(Ended::Violation(FrameError::Trailing)),
        Err(ReadToEndError::Read(e)) => return Err(lost_stream(e)),
    };
    if body.len() < len {
        return Err(Ended::Violation(FrameError::Truncated {
            missing: len - body.len(),
        }));
    }
    let msg = framing::decode::<In>(&body).map_err(Ended::Violation)?;
    drop(body);
    if !deliver(msg, credit) {
        return Err(Ended::Unwanted);
    }
    Ok(())
}

/// Why a payload stream could not be read to its end.
fn lost_stream(e: quinn::ReadError) -> Ended {
    match e {
        quinn::ReadError::ConnectionLost(e) => Ended::Closed(e),
        // The peer reset the stream. Its message would be missing from a live connection,
        // which the protocol does not recover from.
        other => Ended::Abandoned(other.to_string()),
    }
}

/// The worker's side of the greeting: open the control stream, say the preamble, and wait for
/// the gateway to say it back.
pub(crate) async fn open_control(
    conn: &Connection,
    timeout: Duration,
) -> Result<(SendStream, RecvStream), String> {
    let greet = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&CONTROL_PREAMBLE)
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = [0u8; 4];
        recv.read_exact(&mut answer).await.map_err(|e| match e {
            ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e)) => e.to_string(),
            other => other.to_string(),
        })?;
        if answer != CONTROL_PREAMBLE {
            return Err(FrameError::Preamble(answer).to_string());
        }
        Ok((send, recv))
    };
    tokio::time::timeout(timeout, greet)
        .await
        .map_err(|_| format!("the gateway did not answer within {timeout:?}"))?
}

/// The gateway's side of the greeting: accept the control stream, check the preamble, and say
/// it back.
pub(crate) async fn accept_control(
    conn: &Connection,
    timeout: Duration,
) -> Result<(SendStream, RecvStream), Ended> {
    let greet = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(Ended::Closed)?;
        let mut said = [0u8; 4];
        match recv.read_exact(&mut said).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(got)) => {
                return Err(Ended::Violation(FrameError::Truncated { missing: 4 - got }))
            }
            Err(ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => {
                return Err(Ended::Closed(e))
            }
            Err(ReadExactError::ReadError(_)) => return Err(Ended::ControlFinished),
        }
        if said != CONTROL_PREAMBLE {
            return Err(Ended::Violation(FrameError::Preamble(said)));
        }
        send.write_all(&CONTROL_PREAMBLE)
            .await
            .map_err(write_error)?;
        Ok((send, recv))
    };
    match tokio::time::timeout(timeout, greet).await {
        Ok(result) => result,
        Err(_) => Err(Ended::Closed(ConnectionError::TimedOut)),
    }
}
