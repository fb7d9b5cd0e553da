//! Graceful drain: what a stopping process (binary upgrade, `SIGTERM`)
//! does with its clients, so that none loses a request.
//!
//! From the moment the stop is announced:
//! - every response carries `Connection: close` and its connection closes
//!   after it, so a busy keepalive client moves to a new connection (the
//!   new process, after an upgrade) between two requests;
//! - a connection idle at that moment is not cut under a client that may
//!   be sending: a request arriving within `drain_idle_timeout` is still
//!   answered (with `Connection: close`); after that much silence the
//!   connection is closed.
//!
//! The flag is process-wide: one server runs per process, and the proxy's
//! response phase, which has no shutdown channel of its own, reads it.

use super::ConnectionGauge;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Idle time a connection is given once the stop is announced.
pub const DEFAULT_DRAIN_IDLE: Duration = Duration::from_secs(1);

static DRAINING: AtomicBool = AtomicBool::new(false);

/// Whether the process is stopping: answers close their connections.
pub fn draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// Marks the process as stopping.
pub fn start_draining() {
    if !DRAINING.swap(true, Ordering::Relaxed) {
        log::info!("draining: responses now close their connections");
    }
}

/// Sets the flag the moment Pingora announces the stop, then ends the
/// process as soon as no client connection is left: Pingora itself would
/// sleep out the whole grace period even with nothing to drain.
pub struct DrainService {
    connections: Arc<ConnectionGauge>,
}

impl DrainService {
    pub fn new(connections: Arc<ConnectionGauge>) -> Self {
        DrainService { connections }
    }
}

/// How often a stopping process looks for connections left.
const IDLE_CHECK: Duration = Duration::from_millis(100);

#[async_trait]
impl BackgroundService for DrainService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // A dropped sender is a stop too.
        let _ = shutdown.wait_for(|stopping| *stopping).await;
        start_draining();
        // Bounded by the grace period: Pingora stops this runtime then.
        loop {
            if self.connections.current() == 0 {
                log::info!(
                    "drained: no client connection left, exiting before the grace period ends"
                );
                // The access log writer writes what is queued every 20 ms.
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::process::exit(0);
            }
            tokio::time::sleep(IDLE_CHECK).await;
        }
    }
}
