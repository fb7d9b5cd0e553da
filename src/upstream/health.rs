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
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
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
    /// The upstream's name, for the log.
    upstream: String,
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
            upstream: upstream.to_owned(),
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
        self.run_round(self.registry.run_health_check(true)).await;
    }

    /// Runs one claimed round. However it ends (done, panicked, or
    /// cancelled with the runtime), the probe is released, so a round that
    /// panics costs that round only and the next one runs when due.
    async fn run_round(&self, round: impl Future<Output = ()>) {
        let _claim = Claim(self);
        round.await;
    }
}

/// A claimed round: releases its probe when dropped.
struct Claim<'a>(&'a HealthProbe);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            log::error!(
                "upstream {}: a health check round panicked; the next round runs in {:?}",
                self.0.upstream,
                self.0.settings.interval
            );
        }
        self.0.running.store(false, Ordering::Release);
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

    /// Starts a round of every probe that is due and not running.
    fn start_due(&self) {
        let now = Instant::now();
        for probe in self.probes.active() {
            if probe.claim(now) {
                // Each probe runs on its own so a slow upstream does not
                // delay the checks of the others; a task that panics ends
                // alone (tokio catches it), its claim released.
                tokio::spawn(async move { probe.run().await });
            }
        }
    }
}

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            // A panic here (a bug) must not end health checking for good:
            // the service would be gone while its probes stayed claimed.
            let started = std::panic::catch_unwind(AssertUnwindSafe(|| self.start_due()));
            if started.is_err() {
                log::error!("starting the due health check rounds panicked; trying again");
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Balance, Cluster, HashKey, RetryOn, Timeouts};
    use std::sync::atomic::AtomicUsize;

    fn settings() -> HealthSettings {
        HealthSettings {
            http_path: None,
            interval: Duration::from_millis(100),
            healthy_after: 1,
            unhealthy_after: 1,
            connect_timeout: Duration::from_millis(100),
            transport: Default::default(),
        }
    }

    /// A check that panics every time, counting its calls.
    struct Panicking(Arc<AtomicUsize>);

    #[async_trait]
    impl HealthCheck for Panicking {
        async fn check(&self, _target: &Backend) -> pingora::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("a check that panics");
        }

        fn health_threshold(&self, _success: bool) -> usize {
            1
        }
    }

    #[tokio::test]
    async fn a_round_that_panics_releases_its_probe() {
        let probe = Arc::new(HealthProbe::new("app", settings()).unwrap());
        let start = Instant::now();
        assert!(probe.claim(start));
        let running = Arc::clone(&probe);
        let round = tokio::spawn(async move {
            running
                .run_round(async { panic!("a round that panics") })
                .await
        });
        assert!(round.await.is_err_and(|e| e.is_panic()));
        assert!(!probe.claim(start), "not due again before its interval");
        assert!(
            probe.claim(start + settings().interval),
            "the next round is claimed when due: the probe is not left running"
        );
    }

    /// Pingora 0.9.1 runs each target's check in its own task and drains
    /// them one by one, so a check that panics costs that target's result
    /// for the round and nothing more. If that changes, the claim above is
    /// what keeps the probe alive; this test says the behaviour moved.
    #[tokio::test]
    async fn a_check_that_panics_costs_only_its_round() {
        let calls = Arc::new(AtomicUsize::new(0));
        let registry = HealthRegistry::with_equivalence(address_key);
        registry.set_health_check(Box::new(Panicking(Arc::clone(&calls))));
        let probe = Arc::new(HealthProbe {
            registry: Arc::new(registry),
            settings: settings(),
            upstream: "app".to_owned(),
            next_due: Mutex::new(Instant::now()),
            running: AtomicBool::new(false),
        });
        let cluster = Cluster::new(
            "app".into(),
            Balance::RoundRobin,
            vec![("127.0.0.1:1".parse().unwrap(), 1)],
            HashKey::ClientIp,
            Timeouts {
                connect: Duration::from_secs(1),
                read: Duration::from_secs(1),
                write: Duration::from_secs(1),
                idle: Duration::from_secs(1),
            },
            0,
            RetryOn::default(),
            Some(Arc::clone(&probe)),
            None,
        );
        for round in 1..=2 {
            let now = Instant::now() + settings().interval * round;
            assert!(probe.claim(now), "round {round}");
            let running = Arc::clone(&probe);
            tokio::spawn(async move { running.run().await })
                .await
                .expect("the round itself does not panic");
            assert_eq!(calls.load(Ordering::SeqCst), round as usize);
        }
        assert!(cluster.is_ready(0), "a panicked check changes no health");
    }
}
