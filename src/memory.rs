//! Gives memory back to the operating system after a crowd of connections
//! has gone.
//!
//! Allocators keep freed memory for reuse: after 10,000 idle keepalive
//! clients disconnect, RSS would stay near its peak although almost all of
//! it is free. The allocator is asked to hand its free pages back: jemalloc
//! (the default build) purges every arena; glibc's `malloc_trim` returns
//! its free pages. Either walks and locks the allocator's arenas, so it
//! runs rarely and only when it pays: when the number of open connections
//! has fallen by at least [`TRIM_AFTER_CLOSED`] and to at most half of its
//! high since the last time. One mechanism: jemalloc's own decay would
//! also purge, but only as allocation goes on, and an idle process may
//! never get there.

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
                let trimmed = tokio::task::spawn_blocking(release).await;
                log::debug!(
                    "open connections fell from {high} to {now}; returned free memory: {trimmed:?}"
                );
            }
        }
    }
}

/// Returns free heap pages to the OS; whether the allocator did.
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
fn release() -> bool {
    // `arena.<i>.purge` with i = MALLCTL_ARENAS_ALL (4096): every arena's
    // unused dirty pages go back to the OS.
    const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";
    let none = std::ptr::null_mut();
    // SAFETY: a void mallctl: no value read or written, all pointers null.
    unsafe { tikv_jemalloc_sys::mallctl(PURGE_ALL.as_ptr(), none, none.cast(), none, 0) == 0 }
}

/// Returns free heap pages to the OS; whether any were.
#[cfg(all(not(feature = "jemalloc"), target_os = "linux", target_env = "gnu"))]
fn release() -> bool {
    // SAFETY: malloc_trim takes no pointers and is thread-safe; it only
    // releases memory the allocator holds as free.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(any(
    all(feature = "jemalloc", target_os = "linux"),
    all(target_os = "linux", target_env = "gnu")
)))]
fn release() -> bool {
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
