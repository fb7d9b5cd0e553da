//! The running configuration as plain data: an immutable [`Snapshot`] of
//! compiled routes, clusters and limits. Nothing here loads or swaps; the
//! store ([`crate::store`]) does that.
//!
//! A request takes what it needs from one snapshot when it starts and uses
//! it to the end, so a reload never changes a request halfway.

use crate::auth::cache::TokenCache;
use crate::auth::ip::TrustedProxies;
use crate::auth::jwt::remote::{RemoteKeys, RemoteSettings};
use crate::auth::jwt::{Provider, Verified};
use crate::downstream::Limits;
use crate::limit::gcra::{LimiterSettings, LocalLimiter};
use crate::limit::redis::{Redis, RedisSettings};
use crate::observe::access_log::{AccessLog, Destination, Queue};
use crate::router::{Route, RouteIndex};
use crate::state::{Drawn, StatePool};
use crate::upstream::breaker::{Breaker, BreakerSettings};
use crate::upstream::health::{HealthProbe, HealthSettings};
use crate::upstream::Cluster;
use pingora_limits::inflight::Inflight;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// One compiled, validated configuration.
#[derive(Debug)]
pub struct Snapshot {
    /// What clients may send.
    pub limits: Limits,
    /// Whether a sane client `X-Request-Id` is kept.
    pub trust_request_id: bool,
    /// Whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    pub index: RouteIndex,
    /// Routes in file order; the index refers to them by position. Shared,
    /// so a request holds its route, not the whole snapshot.
    pub routes: Vec<Arc<Route>>,
    /// Upstreams in name order; routes refer to them by position.
    pub clusters: Vec<Arc<Cluster>>,
    pub listen: Vec<SocketAddr>,
    /// How each listener speaks, by address (plain HTTP/1 when absent).
    pub listeners: Vec<Listener>,
    pub admin: Option<SocketAddr>,
    /// Upstreams that must have a healthy target for `/readyz` to pass.
    pub readyz_requires: Vec<String>,
    /// JWT providers by name, for the admin listener (routes hold their
    /// own references).
    pub jwt: Vec<Arc<Provider>>,
    /// The Redis of global rate limits, when configured.
    pub redis: Option<Arc<Redis>>,
    /// The access log's sink; `None`: off.
    pub access_log: Option<Arc<AccessLog>>,
    /// Requests slower than this are logged as warnings.
    pub slow_request_threshold: Option<std::time::Duration>,
}

impl Snapshot {
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.iter().find(|c| c.name == name)
    }

    pub fn listener(&self, addr: SocketAddr) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.addr == addr)
    }
}

/// A data listener.
#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: Option<TlsListener>,
    /// HTTP/2 by prior knowledge on a plain listener.
    pub h2c: bool,
}

impl Listener {
    /// What needs new sockets or a new TLS context to change: everything
    /// but the certificates, which a reload swaps.
    pub fn shape(&self) -> (SocketAddr, Option<(TlsVersion, bool, bool)>, bool) {
        (
            self.addr,
            self.tls.as_ref().map(|t| (t.min_version, t.h2, t.http1)),
            self.h2c,
        )
    }
}

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Debug, Clone)]
pub struct TlsListener {
    pub certificates: Arc<crate::downstream::tls::CertificateSet>,
    pub min_version: TlsVersion,
    /// ALPN offers h2 / http/1.1.
    pub h2: bool,
    pub http1: bool,
}

/// Every pool, as the store owns them.
#[derive(Default)]
pub struct Pools {
    pub health: Arc<StatePool<HealthSettings, HealthProbe>>,
    /// JWT providers' keys from `jwks_url`, by provider.
    pub jwks: Arc<StatePool<RemoteSettings, RemoteKeys>>,
    /// JWT providers' verified tokens, by provider, for one fingerprint of
    /// its keys and claim rules.
    pub token_caches: StatePool<[u8; 32], TokenCache<Verified>>,
    /// Local rate limiters, by route (and consumer, for consumers' own).
    pub rate_limiters: Arc<StatePool<LimiterSettings, LocalLimiter>>,
    /// `max_inflight` counters, by `route:<name>` and `upstream:<name>`:
    /// shared across reloads whatever the ceiling.
    pub inflight: StatePool<(), AtomicUsize>,
    /// `max_inflight_per_client` estimators, by route.
    pub client_inflight: StatePool<(), Inflight>,
    /// Circuit breakers, by `upstream/address`.
    pub breakers: StatePool<BreakerSettings, Breaker>,
    /// The Redis connection of global rate limits.
    pub redis: Arc<StatePool<RedisSettings, Redis>>,
    /// The access log's writer, by destination.
    pub access_log: StatePool<(Destination, Queue), AccessLog>,
}

/// What one compile drew from every pool.
#[derive(Default)]
pub struct Draws {
    pub health: Drawn<HealthSettings, HealthProbe>,
    pub jwks: Drawn<RemoteSettings, RemoteKeys>,
    pub token_caches: Drawn<[u8; 32], TokenCache<Verified>>,
    pub rate_limiters: Drawn<LimiterSettings, LocalLimiter>,
    pub inflight: Drawn<(), AtomicUsize>,
    pub client_inflight: Drawn<(), Inflight>,
    pub breakers: Drawn<BreakerSettings, Breaker>,
    pub redis: Drawn<RedisSettings, Redis>,
    pub access_log: Drawn<(Destination, Queue), AccessLog>,
}

impl Pools {
    /// Commits a compile's draws; see [`StatePool::commit`].
    pub fn commit(&self, draws: Draws) {
        self.health.commit(draws.health);
        self.jwks.commit(draws.jwks);
        self.token_caches.commit(draws.token_caches);
        self.rate_limiters.commit(draws.rate_limiters);
        self.inflight.commit(draws.inflight);
        self.client_inflight.commit(draws.client_inflight);
        self.breakers.commit(draws.breakers);
        self.redis.commit(draws.redis);
        self.access_log.commit(draws.access_log);
    }
}
