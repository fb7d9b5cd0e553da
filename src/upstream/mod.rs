//! Upstream clusters: a named set of targets, how one is chosen per request,
//! and how the proxy connects to it.
//!
//! Selection uses pingora-load-balancing (`LoadBalancer` with its weighted
//! round robin, random and Ketama algorithms, and its health registry).
//! `least_conn` is not in Pingora; it is built here on per-target in-flight
//! counts, over the same health state.

pub mod breaker;
pub mod health;
pub mod transport;

use breaker::{Breaker, Outcome, Verdict};
use health::HealthProbe;
use pingora::lb::discovery::Static;
use pingora::lb::selection::{BackendIter, BackendSelection, Consistent, Random, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How a target is chosen for each request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    ConsistentHash,
    LeastConn,
}

/// One address of an upstream.
#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub weight: u32,
    backend: Backend,
    /// Requests currently sent to this target through `least_conn`. Shared
    /// with the previous snapshot's target of the same address, so a reload
    /// does not forget the load already there.
    pub in_flight: Arc<AtomicUsize>,
    /// The target's circuit breaker, when the upstream has one.
    pub breaker: Option<Arc<Breaker>>,
}

/// A target's position, kept in its balancer backend so a selection can
/// find the target (and its breaker) without a search.
#[derive(Debug, Clone, Copy)]
struct TargetIndex(usize);

/// One request's share of a target's in-flight count, given back on drop, so
/// every way a request can end (finished, failed, retried, cancelled)
/// releases it.
#[derive(Debug)]
pub struct InFlight(Option<Arc<AtomicUsize>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What a request's consistent-hash key is taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Path,
    Header(http::HeaderName),
}

/// Which kinds of failed attempt are tried again on another target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn {
    /// The target refused or did not accept the connection.
    pub connect_failure: bool,
    /// The connection broke after the request was sent (reset, closed,
    /// invalid response).
    pub reset: bool,
    /// The target did not answer within its read or write timeout.
    pub timeout: bool,
}

impl Default for RetryOn {
    /// A timed-out request may still be running on the target.
    fn default() -> Self {
        RetryOn {
            connect_failure: true,
            reset: true,
            timeout: false,
        }
    }
}

/// Connection timeouts toward the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
}

enum Selector {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
    ConsistentHash(LoadBalancer<Consistent>),
    /// The balancer only tracks membership and health here; the choice is
    /// made from the in-flight counts.
    LeastConn {
        lb: LoadBalancer<RoundRobin>,
        /// Rotates the starting point so equal loads spread evenly.
        next: AtomicUsize,
    },
}

/// An upstream, compiled: immutable except for health and load counters.
pub struct Cluster {
    pub name: String,
    pub balance: Balance,
    pub targets: Vec<Target>,
    pub hash_key: HashKey,
    pub timeouts: Timeouts,
    /// HTTP/1 or HTTP/2, TLS or not.
    pub transport: transport::Transport,
    pub retries: u32,
    pub retry_on: RetryOn,
    pub health: Option<Arc<HealthProbe>>,
    /// `max_inflight`: requests in progress to this upstream.
    pub max_inflight: Option<crate::limit::inflight::Ceiling>,
    /// Whether the targets have circuit breakers.
    has_breakers: bool,
    /// Taken while deciding whether a target may open, so two targets
    /// tripping at once cannot both take the last place under
    /// `max_open_share`. Never held across an await; only failures that
    /// trip a breaker take it.
    open_decision: Mutex<()>,
    /// The upstream's metric handles.
    pub metrics: crate::observe::metrics::UpstreamMetrics,
    selector: Selector,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("balance", &self.balance)
            .field("targets", &self.targets)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// Bound on how far a selection walks to skip unhealthy or tried targets.
const MAX_SELECT_ITERATIONS: usize = 256;

impl Cluster {
    /// Builds a cluster. `previous` is the same-named cluster of the running
    /// snapshot, whose in-flight counters carry over by address.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        balance: Balance,
        targets: Vec<(SocketAddr, u32)>,
        hash_key: HashKey,
        timeouts: Timeouts,
        retries: u32,
        retry_on: RetryOn,
        health: Option<Arc<HealthProbe>>,
        previous: Option<&Cluster>,
    ) -> Cluster {
        let targets: Vec<Target> = targets
            .into_iter()
            .enumerate()
            .map(|(i, (addr, weight))| Target {
                addr,
                weight,
                backend: {
                    let mut backend = Backend {
                        addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                        weight: weight as usize,
                        ext: Default::default(),
                    };
                    backend.ext.insert(TargetIndex(i));
                    backend
                },
                breaker: None,
                in_flight: previous
                    .and_then(|p| p.targets.iter().find(|t| t.addr == addr))
                    .map(|t| Arc::clone(&t.in_flight))
                    .unwrap_or_default(),
            })
            .collect();
        let backends: BTreeSet<Backend> = targets.iter().map(|t| t.backend.clone()).collect();
        let registry = health.as_ref().map(|p| Arc::clone(&p.registry));
        let selector = match balance {
            Balance::RoundRobin => Selector::RoundRobin(balancer(backends, registry)),
            Balance::Random => Selector::Random(balancer(backends, registry)),
            Balance::ConsistentHash => Selector::ConsistentHash(balancer(backends, registry)),
            Balance::LeastConn => Selector::LeastConn {
                lb: balancer(backends, registry),
                next: AtomicUsize::new(0),
            },
        };
        Cluster {
            metrics: crate::observe::metrics::UpstreamMetrics::new(&name),
            name,
            balance,
            targets,
            hash_key,
            timeouts,
            transport: transport::Transport::default(),
            retries,
            retry_on,
            health,
            max_inflight: None,
            has_breakers: false,
            open_decision: Mutex::new(()),
            selector,
        }
    }

    /// Whether target `index` is currently healthy.
    pub fn is_ready(&self, index: usize) -> bool {
        self.targets
            .get(index)
            .is_some_and(|t| self.backends().ready(&t.backend))
    }

    /// Whether any target is healthy (readiness of the whole upstream).
    pub fn has_ready_target(&self) -> bool {
        (0..self.targets.len()).any(|i| self.is_ready(i))
    }

    fn backends(&self) -> &Backends {
        match &self.selector {
            Selector::RoundRobin(lb) => lb.backends(),
            Selector::Random(lb) => lb.backends(),
            Selector::ConsistentHash(lb) => lb.backends(),
            Selector::LeastConn { lb, .. } => lb.backends(),
        }
    }

    /// Chooses a healthy target that is not in `tried`, returning its index.
    /// `key` feeds consistent hashing and is ignored by the other modes.
    pub fn select(&self, key: &[u8], tried: &[SocketAddr]) -> Option<usize> {
        if let [only] = self.targets.as_slice() {
            // One target leaves nothing to choose. The balancer would still
            // allocate a set of visited backends and hash the backend twice
            // (~900 instructions per request, callgrind); health and retries
            // are honoured the same way.
            let usable = self.backends().ready(&only.backend)
                && !tried.contains(&only.addr)
                && only
                    .breaker
                    .as_ref()
                    .is_none_or(|b| b.try_admit(Instant::now()));
            return usable.then_some(0);
        }
        let now = self.has_breakers.then(Instant::now);
        let accept = |b: &Backend, healthy: bool| {
            healthy
                && b.addr.as_inet().is_some_and(|a| !tried.contains(a))
                && now.is_none_or(|now| self.admits(b, now))
        };
        let chosen = match &self.selector {
            Selector::RoundRobin(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
            Selector::Random(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
            Selector::ConsistentHash(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
            Selector::LeastConn { lb, next } => return self.least_conn(lb, next, tried),
        }?;
        let addr = chosen.addr.as_inet()?;
        self.targets.iter().position(|t| t.addr == *addr)
    }

    /// Whether `b`'s breaker lets a request through now (taking a probe
    /// when half-open).
    fn admits(&self, b: &Backend, now: Instant) -> bool {
        b.ext
            .get::<TargetIndex>()
            .and_then(|i| self.targets.get(i.0))
            .and_then(|t| t.breaker.as_ref())
            .is_none_or(|breaker| breaker.try_admit(now))
    }

    /// Whether every target left for this request is held off by its
    /// breaker: then there is nothing to wait for (503 `circuit_open`).
    pub fn circuits_open(&self, tried: &[SocketAddr]) -> bool {
        if !self.has_breakers {
            return false;
        }
        let now = Instant::now();
        let mut left = self
            .targets
            .iter()
            .filter(|t| !tried.contains(&t.addr) && self.backends().ready(&t.backend))
            .peekable();
        // With no target left at all, the last failure says why.
        left.peek().is_some()
            && left.all(|t| t.breaker.as_ref().is_some_and(|b| b.is_blocking(now)))
    }

    /// Sets the targets' breakers (compiled and pooled by the config).
    pub fn set_breakers(&mut self, breakers: Vec<Arc<Breaker>>) {
        self.has_breakers = !breakers.is_empty();
        for (target, breaker) in self.targets.iter_mut().zip(breakers) {
            target.breaker = Some(breaker);
        }
    }

    /// Counts how an attempt on the target of `breaker` ended. A target
    /// that trips opens only if the upstream's open targets stay within
    /// `max_open_share`; otherwise it is spared and keeps its traffic, as
    /// Envoy's `max_ejection_percent` keeps hosts in: a failing upstream
    /// still answers (with its own errors) rather than the breaker
    /// answering 503 for all of it, and no client can take every target
    /// out by making its own requests fail.
    pub fn record(&self, breaker: &Arc<Breaker>, outcome: Outcome, now: Instant) {
        if breaker.record(outcome, now) == Verdict::Stay {
            return;
        }
        let _decision = self
            .open_decision
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let others_open = self
            .targets
            .iter()
            .filter_map(|t| t.breaker.as_ref())
            .filter(|b| !Arc::ptr_eq(b, breaker) && b.is_open())
            .count();
        let max_open = breaker.settings.max_open(self.targets.len());
        if others_open < max_open {
            breaker.trip(now);
            return;
        }
        breaker.spare(now);
        let target = self
            .targets
            .iter()
            .find(|t| t.breaker.as_ref().is_some_and(|b| Arc::ptr_eq(b, breaker)));
        if let Some(target) = target {
            // At most once per `open_for` per target: a spared breaker does
            // not ask again before that.
            log::warn!(
                "upstream {}: target {} is failing but stays in use: {others_open} of {} targets are open already (max_open_share {}%)",
                self.name,
                target.addr,
                self.targets.len(),
                breaker.settings.max_open_share,
            );
        }
    }

    /// The target with the fewest in-flight requests per unit of weight.
    fn least_conn(
        &self,
        lb: &LoadBalancer<RoundRobin>,
        next: &AtomicUsize,
        tried: &[SocketAddr],
    ) -> Option<usize> {
        let n = self.targets.len();
        let start = next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let mut best: Option<(usize, usize, u32)> = None;
        for offset in 0..n {
            let i = (start + offset) % n;
            let t = &self.targets[i];
            if tried.contains(&t.addr)
                || !lb.backends().ready(&t.backend)
                || t.breaker
                    .as_ref()
                    .is_some_and(|b| b.is_blocking(Instant::now()))
            {
                continue;
            }
            let load = t.in_flight.load(Ordering::Relaxed);
            // load/weight < best_load/best_weight, without division.
            let better = best.is_none_or(|(_, best_load, best_weight)| {
                (load as u128) * (best_weight as u128) < (best_load as u128) * (t.weight as u128)
            });
            if better {
                best = Some((i, load, t.weight));
            }
        }
        let (i, _, _) = best?;
        // Takes the probe of a half-open target (or finds it just closed
        // to this request by a concurrent one).
        let admitted = self.targets[i]
            .breaker
            .as_ref()
            .is_none_or(|b| b.try_admit(Instant::now()));
        admitted.then_some(i)
    }

    /// Counts a request as sent to target `index` until the returned guard
    /// is dropped. Only `least_conn` reads the counts, so only it pays for them.
    pub fn acquire(&self, index: usize) -> InFlight {
        match self.targets.get(index) {
            Some(t) if self.balance == Balance::LeastConn => {
                t.in_flight.fetch_add(1, Ordering::Relaxed);
                InFlight(Some(Arc::clone(&t.in_flight)))
            }
            _ => InFlight(None),
        }
    }

    /// The peer to connect to for target `index`.
    pub fn peer(&self, index: usize) -> Option<Box<HttpPeer>> {
        let target = self.targets.get(index)?;
        let mut peer = self.transport.peer(target.addr);
        let options = &mut peer.options;
        options.connection_timeout = Some(self.timeouts.connect);
        options.read_timeout = Some(self.timeouts.read);
        options.write_timeout = Some(self.timeouts.write);
        options.idle_timeout = Some(self.timeouts.idle);
        Some(Box::new(peer))
    }
}

/// A `LoadBalancer` over a fixed target set, sharing the upstream's health
/// registry when it has active checks.
fn balancer<S>(
    backends: BTreeSet<Backend>,
    registry: Option<Arc<pingora::lb::HealthRegistry>>,
) -> LoadBalancer<S>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let discovery = Static::new(backends);
    let view = match registry {
        Some(registry) => Backends::new_with_health_registry(discovery, registry),
        None => Backends::new(discovery),
    };
    let lb = LoadBalancer::from_backends(view);
    // Static discovery completes without waiting, so one poll publishes the
    // membership; this keeps compiling a snapshot synchronous.
    if poll_once(lb.update()).is_none() {
        log::error!("static discovery did not complete synchronously");
    }
    lb
}

fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(balance: Balance, targets: &[(&str, u32)]) -> Cluster {
        Cluster::new(
            "t".into(),
            balance,
            targets
                .iter()
                .map(|(a, w)| (a.parse().unwrap(), *w))
                .collect(),
            HashKey::ClientIp,
            Timeouts {
                connect: Duration::from_secs(1),
                read: Duration::from_secs(1),
                write: Duration::from_secs(1),
                idle: Duration::from_secs(1),
            },
            1,
            RetryOn::default(),
            None,
            None,
        )
    }

    #[test]
    fn weighted_round_robin_follows_weights_exactly() {
        let c = cluster(
            Balance::RoundRobin,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 3)],
        );
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[c.select(b"", &[]).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 300]);
    }

    #[test]
    fn tried_targets_are_skipped() {
        let c = cluster(
            Balance::RoundRobin,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)],
        );
        let tried = ["127.0.0.1:1".parse().unwrap()];
        for _ in 0..10 {
            assert_eq!(c.select(b"", &tried), Some(1));
        }
        let both = [
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        assert_eq!(c.select(b"", &both), None);
    }

    #[test]
    fn a_single_target_is_chosen_unless_tried() {
        for balance in [
            Balance::RoundRobin,
            Balance::Random,
            Balance::LeastConn,
            Balance::ConsistentHash,
        ] {
            let c = cluster(balance, &[("127.0.0.1:1", 2)]);
            assert_eq!(c.select(b"key", &[]), Some(0), "{balance:?}");
            let tried = ["127.0.0.1:1".parse().unwrap()];
            assert_eq!(c.select(b"key", &tried), None, "{balance:?}");
        }
    }

    #[test]
    fn least_conn_prefers_the_idle_target() {
        let c = cluster(
            Balance::LeastConn,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)],
        );
        let busy = c.acquire(0);
        for _ in 0..5 {
            assert_eq!(c.select(b"", &[]), Some(1));
        }
        drop(busy);
        let _busy = c.acquire(1);
        assert_eq!(c.select(b"", &[]), Some(0));
    }

    #[test]
    fn consistent_hash_is_sticky() {
        let c = cluster(
            Balance::ConsistentHash,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)],
        );
        let first = c.select(b"client-a", &[]);
        for _ in 0..20 {
            assert_eq!(c.select(b"client-a", &[]), first);
        }
    }

    fn with_breakers(targets: &[(&str, u32)], settings: breaker::BreakerSettings) -> Cluster {
        let mut c = cluster(Balance::RoundRobin, targets);
        c.set_breakers(
            targets
                .iter()
                .map(|_| Arc::new(Breaker::new(settings.clone())))
                .collect(),
        );
        c
    }

    fn quick_trip() -> breaker::BreakerSettings {
        breaker::BreakerSettings {
            min_requests: 2,
            ..Default::default()
        }
    }

    /// Fails target `i` until its breaker has asked to open.
    fn fail(c: &Cluster, i: usize, now: Instant) {
        let b = Arc::clone(c.targets[i].breaker.as_ref().unwrap());
        for _ in 0..2 {
            c.record(&b, Outcome::Error, now);
        }
    }

    #[test]
    fn a_lone_target_is_never_cut_off_at_the_default_share() {
        let c = with_breakers(&[("127.0.0.1:1", 1)], quick_trip());
        let now = Instant::now();
        fail(&c, 0, now);
        assert!(!c.targets[0].breaker.as_ref().unwrap().is_open());
        assert_eq!(c.select(b"", &[]), Some(0));
        assert!(!c.circuits_open(&[]));
    }

    #[test]
    fn a_lone_target_opens_when_the_share_allows_every_target() {
        let settings = breaker::BreakerSettings {
            max_open_share: 100,
            ..quick_trip()
        };
        let c = with_breakers(&[("127.0.0.1:1", 1)], settings);
        fail(&c, 0, Instant::now());
        assert_eq!(c.select(b"", &[]), None);
        assert!(c.circuits_open(&[]));
    }

    #[test]
    fn half_of_two_targets_may_open_and_the_other_keeps_its_traffic() {
        let c = with_breakers(&[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)], quick_trip());
        let now = Instant::now();
        fail(&c, 0, now);
        fail(&c, 1, now);
        let open: Vec<bool> = c
            .targets
            .iter()
            .map(|t| t.breaker.as_ref().unwrap().is_open())
            .collect();
        assert_eq!(open, [true, false]);
        for _ in 0..4 {
            assert_eq!(c.select(b"", &[]), Some(1));
        }
        assert!(!c.circuits_open(&[]));
    }

    #[test]
    fn a_spared_target_may_open_once_its_sibling_closed() {
        let settings = breaker::BreakerSettings {
            half_open_probes: 1,
            ..quick_trip()
        };
        let c = with_breakers(&[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)], settings);
        let now = Instant::now();
        fail(&c, 0, now);
        fail(&c, 1, now);
        // Target 0 comes back: one good probe closes it.
        let later = now + Duration::from_secs(5);
        let first = Arc::clone(c.targets[0].breaker.as_ref().unwrap());
        assert!(first.try_admit(later));
        c.record(&first, Outcome::Success, later);
        assert!(!first.is_open());
        // Target 1, spared until now, still fails: it opens now.
        let second = Arc::clone(c.targets[1].breaker.as_ref().unwrap());
        c.record(&second, Outcome::Error, later);
        assert!(second.is_open());
    }
}
