//! Gives memory back to the operating system after a crowd of connections
//! has gone.
//!
//! glibc keeps freed memory in its arenas: after 10,000 idle keepalive
//! clients disconnect, RSS stays where it was (~60 MB) although almost all
//! of it is free. `malloc_trim` returns the free pages. It walks and locks
//! the arenas, so it runs rarely and only when it pays: when the number of
//! open connections has fallen by at least [`TRIM_AFTER_CLOSED`] and to at
//! most half of its high since the last trim.

use crate::downstream::ConnectionGauge;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

const TRIM_AFTER_CLOSED: usize = 1_000;
const LOOK_EVERY: Duration = Duration::from_secs(2);

pub struct ReturnMemory {
    connections: Arc<ConnectionGauge>,
}

impl ReturnMemory {
    pub fn new(connections: Arc<ConnectionGauge>) -> Self {
        ReturnMemory { connections }
    }
}

/// Whether a fall from `high` to `now` open connections is worth a trim.
fn worth_trimming(high: usize, now: usize) -> bool {
    high.saturating_sub(now) >= TRIM_AFTER_CLOSED && now <= high / 2
}

#[async_trait]
impl BackgroundService for ReturnMemory {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticks = tokio::time::interval(LOOK_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            // The high holds until a trim, so a slow decline counts too.
            let high = self.connections.high();
            let now = self.connections.current();
            if worth_trimming(high, now) {
                self.connections.reset_high();
                // It takes the allocator's locks for milliseconds: not on a
                // worker thread.
                let trimmed = tokio::task::spawn_blocking(trim).await;
                log::debug!(
                    "open connections fell from {high} to {now}; returned free memory: {trimmed:?}"
                );
            }
        }
    }
}

/// Returns free heap pages to the OS; whether any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers and is thread-safe; it only
    // releases memory the allocator holds as free.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::worth_trimming;

    #[test]
    fn trims_only_after_a_large_fall() {
        assert!(worth_trimming(10_000, 0));
        assert!(worth_trimming(2_000, 1_000));
        assert!(!worth_trimming(999, 0), "too few closed to matter");
        assert!(!worth_trimming(10_000, 6_000), "most are still open");
        assert!(!worth_trimming(0, 0));
        assert!(!worth_trimming(100, 5_000), "rising");
    }
}
