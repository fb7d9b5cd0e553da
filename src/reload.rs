//! SIGHUP: re-read the config file and swap the snapshot, off the request path.

use crate::store::ConfigStore;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// Waits for SIGHUP and reloads. A file that fails validation changes
/// nothing: the error is logged and the running config keeps serving.
pub struct ReloadService {
    store: Arc<ConfigStore>,
}

impl ReloadService {
    pub fn new(store: Arc<ConfigStore>) -> Self {
        ReloadService { store }
    }

    async fn reload(&self) {
        let store = Arc::clone(&self.store);
        // Reading the file and resolving target names block; keep them off
        // the runtime's worker threads.
        match tokio::task::spawn_blocking(move || store.reload()).await {
            Ok(Ok(())) => log::info!("configuration reloaded from {}", self.store.path().display()),
            Ok(Err(errors)) => log::error!(
                "configuration reload from {} failed; still serving the previous configuration:\n{errors}",
                self.store.path().display()
            ),
            Err(e) => log::error!("configuration reload task failed: {e}"),
        }
    }
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP, live reload is off: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                Some(()) = hangups.recv() => self.reload().await,
                _ = shutdown.changed() => return,
            }
        }
    }
}
