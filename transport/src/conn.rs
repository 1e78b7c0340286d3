//! What one connection of a real transport needs whatever carries it: the bounded send queues
//! between the seam's senders and the connection's writers, the hand-off of received messages
//! to the driver, the reasons a connection is closed, a count of live tasks, and the worker's
//! reconnection backoff.
//!
//! A message that does not fit in the send budget ends the connection: the protocol recovers
//! from a broken connection, never from a gap in a live one.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sand_protocol::wire::Envelope;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinSet;

use crate::config::LinkConfig;
use crate::framing::{self, Frame, FrameBuffer, FrameError};
use crate::seam::{Classify, SendError};

/// Close code: an orderly shutdown.
pub const CLOSE_NORMAL: u32 = 0;
/// Close code: the peer broke the framing (oversize frame, garbage, undecodable message), or
/// gave up a message on a live connection.
pub const CLOSE_VIOLATION: u32 = 1;
/// Close code: the peer's certificate names no worker.
pub const CLOSE_IDENTITY: u32 = 2;
/// Close code: a newer connection of the same worker replaced this one.
pub const CLOSE_REPLACED: u32 = 3;
/// Close code: the gateway disconnected the worker on purpose.
pub const CLOSE_DISCONNECTED: u32 = 4;
/// Close code: the worker dropped its connection on purpose.
pub const CLOSE_RECONNECT: u32 = 5;
/// Close code: a message for the peer did not fit in its send queue. The connection ends rather
/// than go on without that message.
pub const CLOSE_OVERFLOW: u32 = 6;

/// What a queued frame costs against the send budget beyond its own bytes: so that a flood of
/// tiny messages is bounded too.
pub const FRAME_COST_BYTES: usize = 64;

/// A frame waiting to be written, holding its share of the send budget until it is.
#[derive(Debug)]
pub struct Queued {
    /// The frame.
    pub frame: Frame,
    _budget: OwnedSemaphorePermit,
}

/// The sending end of one connection's queues, held by the seam's sender.
#[derive(Clone)]
pub struct Outbox {
    control: mpsc::UnboundedSender<Queued>,
    payload: mpsc::UnboundedSender<Queued>,
    budget: Arc<Semaphore>,
    overflowed: Arc<Notify>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

/// The receiving end of one connection's queues, consumed by the connection's writers.
#[derive(Debug)]
pub struct Inbox {
    /// Control frames, to be written in order.
    pub control: mpsc::UnboundedReceiver<Queued>,
    /// Payload frames, each on a stream of its own where the transport has streams.
    pub payload: mpsc::UnboundedReceiver<Queued>,
    /// How the connection ends.
    pub ending: Ending,
}

/// The end of one connection: the first of its tasks to end, or an overflow of its send queue.
#[derive(Debug)]
pub struct Ending {
    /// The send budget; closed once the connection ends, so later sends are refused.
    budget: Arc<Semaphore>,
    /// Told once when a frame did not fit: the connection must then be closed.
    overflowed: Arc<Notify>,
}

impl Ending {
    /// Runs a connection's `tasks` until the first of them ends (with its result, or
    /// `panicked`) or a frame overflows the send queue (`overflow`); then refuses every later
    /// send, lets `close` tell the peer why, and stops the other tasks.
    pub async fn first_of<E: Send + 'static>(
        self,
        mut tasks: JoinSet<E>,
        overflow: E,
        panicked: E,
        close: impl FnOnce(&E),
    ) -> E {
        let ended = tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(ended)) => ended,
                // `None` only for an empty set: no task to run is a bug too.
                Some(Err(_)) | None => panicked,
            },
            () = self.overflowed.notified() => overflow,
        };
        self.budget.close();
        close(&ended);
        tasks.shutdown().await;
        ended
    }
}

impl Outbox {
    /// New queues allowing `bytes_max` bytes of unwritten frames.
    pub fn new(bytes_max: usize) -> (Self, Inbox) {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (payload_tx, payload_rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(bytes_max));
        let overflowed = Arc::new(Notify::new());
        (
            Self {
                control: control_tx,
                payload: payload_tx,
                budget: budget.clone(),
                overflowed: overflowed.clone(),
            },
            Inbox {
                control: control_rx,
                payload: payload_rx,
                ending: Ending { budget, overflowed },
            },
        )
    }

    /// Queues an encoded frame without waiting. A frame that does not fit in the budget ends
    /// the connection: every later `enqueue` is refused at once, and [`Ending::first_of`]
    /// ends it.
    ///
    /// Callers serialise the `enqueue`s of one connection (the tables in [`crate::peers`] hold
    /// a lock around it), so no frame can slip in after one that was refused.
    pub fn enqueue(&self, frame: Frame, payload: bool) -> Result<(), SendError> {
        // Frames are at most MESSAGE_BYTES_MAX + 4 bytes (Frame::encode refuses more), far
        // below u32::MAX.
        let cost = u32::try_from(frame.wire_len() + FRAME_COST_BYTES).unwrap_or(u32::MAX);
        let budget = match self.budget.clone().try_acquire_many_owned(cost) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => {
                self.budget.close();
                self.overflowed.notify_one();
                return Err(SendError::Overflowed);
            }
            Err(TryAcquireError::Closed) => return Err(SendError::NotConnected),
        };
        let queue = if payload {
            &self.payload
        } else {
            &self.control
        };
        queue
            .send(Queued {
                frame,
                _budget: budget,
            })
            .map_err(|_| SendError::NotConnected)
    }

    /// Refuses every later `enqueue` with `NotConnected`.
    pub fn close(&self) {
        self.budget.close();
    }
}

/// Encodes an envelope for [`Outbox::enqueue`], and says which stream it takes.
pub fn encode<E: Envelope + Classify>(msg: &E) -> Result<(Frame, bool), SendError> {
    Ok((Frame::encode(msg)?, msg.carries_payload()))
}

/// What a connection's tasks share with their endpoint and the driver, whatever carries them.
pub struct Plumbing<In> {
    /// The outbound queues.
    pub inbox: Inbox,
    /// Where received messages go.
    pub deliver: Deliver<In>,
    /// The endpoint's settings.
    pub config: LinkConfig,
    /// Counts the tasks spawned for the connection.
    pub tasks: TaskCounter,
}

/// Hands a received message to the driver's event stream, with one receive credit. Returns
/// `false` when this connection's messages are no longer wanted (it was replaced, or nobody
/// listens), which ends the connection.
pub type Deliver<In> = Arc<dyn Fn(In, OwnedSemaphorePermit) -> bool + Send + Sync>;

/// Why a connection's reader stopped handing messages over to the driver; either way the
/// connection ends.
#[derive(Debug)]
pub enum HandOver {
    /// The peer broke the framing.
    Violation(FrameError),
    /// Nobody wants this connection's messages any more.
    Unwanted,
}

/// Hands every complete frame in `buf` to the driver, decoded, each with one of `credits`
/// (waiting for one while the driver is behind). With `keep_alives`, a frame of no bytes is a
/// keep-alive and is skipped; without, it is a violation like any frame that does not decode.
pub async fn hand_over<In: Envelope>(
    buf: &mut FrameBuffer,
    credits: &Arc<Semaphore>,
    deliver: &Deliver<In>,
    keep_alives: bool,
) -> Result<(), HandOver> {
    while let Some(body) = buf.next_body().map_err(HandOver::Violation)? {
        if keep_alives && body.is_empty() {
            continue;
        }
        let msg = framing::decode::<In>(&body).map_err(HandOver::Violation)?;
        // Never closed: it lives as long as its connection.
        let Ok(credit) = credits.clone().acquire_owned().await else {
            return Err(HandOver::Unwanted);
        };
        if !deliver(msg, credit) {
            return Err(HandOver::Unwanted);
        }
    }
    Ok(())
}

/// Counts live tasks, so tests and operators can see that none leaked.
#[derive(Debug, Clone, Default)]
pub struct TaskCounter(Arc<AtomicUsize>);

impl TaskCounter {
    /// Wraps `fut` so that it counts as one live task until it finishes or is dropped.
    pub fn track<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> {
        let guard = TaskGuard::new(self.0.clone());
        async move {
            let _guard = guard;
            fut.await
        }
    }

    /// Tasks live now.
    pub fn live(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

struct TaskGuard(Arc<AtomicUsize>);

impl TaskGuard {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Exponential backoff with jitter: each delay is drawn from the upper half of a window that
/// doubles after every failure, up to a maximum, so a fleet of workers that lost the gateway at
/// once does not come back at once.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    window: Duration,
}

impl Backoff {
    /// Starts at `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            window: min,
        }
    }

    /// Back to the first window, after a success.
    pub fn reset(&mut self) {
        self.window = self.min;
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let window = self.window;
        self.window = (window * 2).min(self.max);
        let half = window / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_maximum() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let mut b = Backoff::new(min, max);
        let mut windows = Vec::new();
        for _ in 0..8 {
            let window = b.window;
            let d = b.next_delay();
            assert!(
                d >= window / 2 && d <= window,
                "{d:?} outside the upper half of {window:?}"
            );
            windows.push(window.as_millis());
        }
        assert_eq!(windows, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.window, min);
        let draws: std::collections::HashSet<Duration> = (0..20)
            .map(|_| {
                b.reset();
                b.next_delay()
            })
            .collect();
        assert!(draws.len() > 1, "the delay is jittered");
    }
}
