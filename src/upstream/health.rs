//! Active health checks that survive reloads.
//!
//! Pingora fixes its background services when the server starts, but a reload
//! can add or remove upstreams. So each upstream with a `health_check` owns a
//! [`HealthProbe`] (a Pingora `HealthRegistry` plus its schedule), and one
//! long-lived [`HealthService`] runs whichever probes the current snapshot
//! holds when they fall due.
//!
//! Probes live in a [`crate::state::StatePool`] keyed by upstream name and
//! check settings. A reload that keeps an upstream's checks reuses its probe,
//! so targets that still exist keep their health (the registry keys health
//! by address, so even a weight change keeps it).

use crate::state::StatePool;
use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::{Backend, HealthRegistry};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::{Error, ErrorType};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often the service looks for due probes; the finest useful interval.
pub const TICK: Duration = Duration::from_millis(100);

/// The compiled form of an upstream's `health_check` section.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthSettings {
    pub http_path: Option<String>,
    pub interval: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    pub connect_timeout: Duration,
    /// Checks speak to targets as requests do.
    pub transport: super::transport::Transport,
}

impl HealthSettings {
    fn build_check(&self, upstream: &str) -> Result<Box<dyn HealthCheck + Send + Sync>, String> {
        let Some(path) = &self.http_path else {
            let mut tcp = match &self.transport.tls {
                Some(tls) => TcpHealthCheck::new_tls(&tls.sni),
                None => TcpHealthCheck::new(),
            };
            self.transport.apply(&mut tcp.peer_template.options);
            tcp.consecutive_success = self.healthy_after as usize;
            tcp.consecutive_failure = self.unhealthy_after as usize;
            tcp.peer_template.options.connection_timeout = Some(self.connect_timeout);
            return Ok(tcp);
        };
        let mut http = HttpHealthCheck::new(upstream, self.transport.tls.is_some());
        if let Some(tls) = &self.transport.tls {
            http.peer_template.sni = tls.sni.clone();
            http.peer_template.client_cert_key = tls.client.clone();
        }
        self.transport.apply(&mut http.peer_template.options);
        http.consecutive_success = self.healthy_after as usize;
        http.consecutive_failure = self.unhealthy_after as usize;
        http.peer_template.options.connection_timeout = Some(self.connect_timeout);
        // A check slower than its interval would overlap the next one.
        http.peer_template.options.read_timeout = Some(self.interval);
        let mut req = RequestHeader::build("GET", path.as_bytes(), None)
            .map_err(|e| format!("invalid http_path {path:?}: {e}"))?;
        // Over TLS the name the certificate is for (a virtual-hosted
        // upstream routes by it); else the upstream's name.
        let host = self
            .transport
            .tls
            .as_ref()
            .map(|t| t.sni.as_str())
            .filter(|sni| !sni.is_empty())
            .unwrap_or(upstream);
        req.insert_header("Host", host)
            .map_err(|e| format!("{host:?} is not a valid Host header: {e}"))?;
        req.insert_header("User-Agent", "tollgate-health-check")
            .map_err(|e| e.to_string())?;
        http.req = req;
        http.validator = Some(Box::new(|resp: &ResponseHeader| {
            if resp.status.is_success() {
                Ok(())
            } else {
                Error::e_explain(
                    ErrorType::CustomCode("health check status", resp.status.as_u16()),
                    "health check answered with a non-2xx status",
                )
            }
        }));
        Ok(Box::new(http))
    }
}

/// One upstream's health registry and when it is next due.
pub struct HealthProbe {
    pub registry: Arc<HealthRegistry>,
    pub settings: HealthSettings,
    next_due: Mutex<Instant>,
    running: AtomicBool,
}

impl HealthProbe {
    pub fn new(upstream: &str, settings: HealthSettings) -> Result<Self, String> {
        let registry = HealthRegistry::with_equivalence(address_key);
        registry.set_health_check(settings.build_check(upstream)?);
        Ok(HealthProbe {
            registry: Arc::new(registry),
            settings,
            next_due: Mutex::new(Instant::now()),
            running: AtomicBool::new(false),
        })
    }

    /// Claims the probe if it is due and not already running.
    fn claim(&self, now: Instant) -> bool {
        let mut next_due = self.next_due.lock().unwrap_or_else(PoisonError::into_inner);
        if now < *next_due || self.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        *next_due = now + self.settings.interval;
        true
    }

    async fn run(&self) {
        self.registry.run_health_check(true).await;
        self.running.store(false, Ordering::Release);
    }
}

/// Health is keyed by address alone, so a weight change keeps a target's state.
fn address_key(backend: &Backend) -> u64 {
    let mut hasher = DefaultHasher::new();
    backend.addr.hash(&mut hasher);
    hasher.finish()
}

/// The one background task that runs every due probe of the running
/// snapshot: the pool holds exactly those.
pub struct HealthService {
    probes: Arc<StatePool<HealthSettings, HealthProbe>>,
}

impl HealthService {
    pub fn new(probes: Arc<StatePool<HealthSettings, HealthProbe>>) -> Self {
        HealthService { probes }
    }
}

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let now = Instant::now();
            for probe in self.probes.active() {
                if probe.claim(now) {
                    // Each probe runs on its own so a slow upstream does
                    // not delay the checks of the others.
                    tokio::spawn(async move { probe.run().await });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
