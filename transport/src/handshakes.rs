//! The cap on connections in their handshake. Until a peer's certificate names a worker and it
//! has greeted on its control stream, anyone may be at the other end: each such connection
//! costs the gateway a task, buffers and a TLS state for up to the open timeout. So only so
//! many may be at it at once ([`LinkConfig::handshakes_max`](crate::config::LinkConfig)); a
//! peer past them is refused at once, and the refusals are logged at most once a second.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// How often refusals are logged, at most: a flood must not become a flood of log lines.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// The handshakes under way at one gateway endpoint; owned by its accept loop.
#[derive(Debug)]
pub struct Handshakes {
    permits: Arc<Semaphore>,
    max: usize,
    /// Refusals not yet logged, and when refusals were last logged.
    unlogged: u64,
    logged: Option<Instant>,
}

/// A handshake's place under the cap; dropping it (once the peer is known to be a worker, or
/// refused) frees the place.
#[derive(Debug)]
pub struct Handshake {
    _place: OwnedSemaphorePermit,
}

impl Handshakes {
    /// At most `max` handshakes at once.
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            unlogged: 0,
            logged: None,
        }
    }

    /// A place for `peer`'s handshake, or `None` if `max` are under way: the caller drops the
    /// connection at once.
    pub fn admit(&mut self, peer: SocketAddr) -> Option<Handshake> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Some(Handshake { _place: permit });
        }
        self.unlogged += 1;
        if self.logged.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            warn!(
                %peer,
                refused = self.unlogged,
                max = self.max,
                "refused peers: too many handshakes under way"
            );
            self.unlogged = 0;
            self.logged = Some(Instant::now());
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_place_is_freed_when_its_handshake_ends() {
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let mut handshakes = Handshakes::new(2);
        let first = handshakes.admit(peer).unwrap();
        let _second = handshakes.admit(peer).unwrap();
        assert!(handshakes.admit(peer).is_none());
        assert!(handshakes.admit(peer).is_none());
        assert_eq!(
            handshakes.unlogged, 1,
            "the first refusal is logged at once"
        );
        drop(first);
        assert!(handshakes.admit(peer).is_some());
    }
}
