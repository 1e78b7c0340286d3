//! Waiting for a condition that some other process or task makes true.

use std::time::Duration;

/// How often [`eventually`] looks.
const POLL: Duration = Duration::from_millis(10);

/// How long [`eventually`] looks.
const WITHIN: Duration = Duration::from_secs(5);

/// Polls `what` every 10 ms until it holds, for at most 5 s; returns whether it held.
pub async fn eventually(mut what: impl FnMut() -> bool) -> bool {
    let tries = WITHIN.as_millis() / POLL.as_millis();
    for _ in 0..tries {
        if what() {
            return true;
        }
        tokio::time::sleep(POLL).await;
    }
    false
}
