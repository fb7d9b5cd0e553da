//! Local rate limits: governor's GCRA (a token bucket kept as one
//! "theoretical arrival time" per key), exact across worker threads (each
//! decision is a compare-and-swap on the key's state).
//!
//! A fresh key may send `burst` requests at once, then one per
//! `1 / rate`; over T seconds a client sending far above the rate gets
//! `burst + rate x T`. Keys are 128-bit values ([`super::LimitKey::local`]),
//! so a key costs the same memory whatever it was made from.
//!
//! Memory is bounded by `max_keys` ([`BoundedStore`]): the sweeper
//! ([`SweepService`]) drops every key whose bucket has refilled
//! (indistinguishable from a fresh one) each second. A bucket with
//! requests in it is never dropped, so never refilled early, whatever the
//! traffic: while the table holds `max_keys` such buckets, requests of
//! keys not in it share one overflow bucket (with the limit's rate and
//! burst), and a warning is logged. A flood of new keys then limits
//! itself (and, until sweeps make room, other new keys), never the
//! clients already counted.

use crate::state::StatePool;
use async_trait::async_trait;
use dashmap::DashMap;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What makes two limiters the same state: a reload keeps a limiter whose
/// settings did not change, with its buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimiterSettings {
    /// Requests per `per`.
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
    pub max_keys: usize,
    /// The kind of key, so a limiter re-keyed by a reload starts fresh.
    pub key: String,
    /// How much of an IPv6 client address is one key (`ipv6_prefix`).
    pub ipv6_prefix: u8,
}

type Buckets<C> = RateLimiter<u128, BoundedStore, C, StateInformationMiddleware>;

/// One limit's buckets.
pub struct LocalLimiter<C: Clock + Clone = MonotonicClock> {
    limiter: Buckets<C>,
    /// The same table as `limiter`'s, for the sweeper's figures.
    table: Arc<Table>,
    /// The route (and consumer) the limit is of, for the log.
    name: String,
    burst: u32,
    /// The time one request's token takes to come back.
    interval: Duration,
    /// Set while the table is full, so the warning is logged once.
    full: AtomicBool,
}

/// The buckets of one limit for governor: one GCRA state (nanoseconds of
/// its "theoretical arrival time" since the limiter started; 0: none) per
/// key, at most `max_keys` keys, and the overflow bucket that keys beyond
/// them share.
pub struct BoundedStore(Arc<Table>);

/// What a [`BoundedStore`] and its limiter's sweeper share.
struct Table {
    buckets: DashMap<u128, AtomicU64, ahash::RandomState>,
    max_keys: usize,
    /// Keys in `buckets`, kept alongside: `DashMap::len` locks every
    /// shard, too slow for each new key.
    keys: AtomicUsize,
    overflow: AtomicU64,
    /// Requests counted against `overflow` since the last sweep.
    overflowed: AtomicU64,
}

impl BoundedStore {
    fn new(max_keys: usize) -> (Self, Arc<Table>) {
        let table = Arc::new(Table {
            buckets: DashMap::with_hasher(ahash::RandomState::new()),
            max_keys,
            keys: AtomicUsize::new(0),
            overflow: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
        });
        (BoundedStore(Arc::clone(&table)), table)
    }
}

impl StateStore for BoundedStore {
    type Key = u128;

    fn measure_and_replace<T, F, E>(&self, key: &u128, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let table = &self.0;
        if let Some(state) = table.buckets.get(key) {
            return measure_and_replace(&state, f);
        }
        // Full: the key is not given a bucket of its own (which could only
        // be made by dropping one with requests in it).
        if table.keys.load(Ordering::Relaxed) >= table.max_keys {
            table.overflowed.fetch_add(1, Ordering::Relaxed);
            return measure_and_replace(&table.overflow, f);
        }
        let state = table
            .buckets
            .entry(*key)
            .or_insert_with(|| {
                table.keys.fetch_add(1, Ordering::Relaxed);
                AtomicU64::new(0)
            })
            .downgrade();
        measure_and_replace(&state, f)
    }
}

impl ShrinkableKeyedStateStore<u128> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let table = &self.0;
        let mut dropped = 0;
        table.buckets.retain(|_, state| {
            let keep = state.load(Ordering::Relaxed) > drop_below.as_u64();
            dropped += usize::from(!keep);
            keep
        });
        table.keys.fetch_sub(dropped, Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.0.buckets.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.buckets.len()
    }

    fn is_empty(&self) -> bool {
        self.0.buckets.is_empty()
    }
}

/// governor's update of one state: a compare-and-swap loop, so a decision
/// is exact across threads.
fn measure_and_replace<T, F, E>(state: &AtomicU64, f: F) -> Result<T, E>
where
    F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
{
    let decide = |prev: u64| f((prev != 0).then(|| Nanos::new(prev)));
    let mut prev = state.load(Ordering::Acquire);
    loop {
        let (result, next) = decide(prev)?;
        match state.compare_exchange_weak(prev, next.as_u64(), Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => return Ok(result),
            Err(now) => prev = now,
        }
    }
}

/// A decision and what the `RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests the key may still send at once.
    pub remaining: u32,
    /// Seconds until the bucket is full again (rounded up).
    pub reset: u64,
    /// When refused: seconds until a request would be allowed (at least 1).
    pub retry_after: u64,
}

impl LocalLimiter<MonotonicClock> {
    /// `name`: the route's (`route#consumer` for a consumer's own limit).
    pub fn new(name: &str, settings: &LimiterSettings) -> Result<Self, String> {
        LocalLimiter::with_clock(name, settings, MonotonicClock)
    }
}

impl<C: Clock + Clone> LocalLimiter<C> {
    pub fn with_clock(name: &str, settings: &LimiterSettings, clock: C) -> Result<Self, String> {
        let interval = settings.per / settings.requests.max(1);
        let burst = NonZeroU32::new(settings.burst).ok_or("burst must be at least 1")?;
        let quota = Quota::with_period(interval)
            .ok_or("the rate is too high: more than one request per nanosecond")?
            .allow_burst(burst);
        let (store, table) = BoundedStore::new(settings.max_keys);
        Ok(LocalLimiter {
            limiter: RateLimiter::new(quota, store, clock),
            table,
            name: name.to_owned(),
            burst: settings.burst,
            interval,
            full: AtomicBool::new(false),
        })
    }

    /// Takes one token from `key`'s bucket, if it has one.
    pub fn check(&self, key: u128) -> Decision {
        match self.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    remaining,
                    reset: self.refill_seconds(self.burst.saturating_sub(remaining)),
                    retry_after: 0,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Decision {
                    allowed: false,
                    remaining: 0,
                    reset: self.refill_seconds(self.burst),
                    retry_after: ceil_seconds(wait).max(1),
                }
            }
        }
    }

    /// Seconds for `tokens` to come back.
    fn refill_seconds(&self, tokens: u32) -> u64 {
        ceil_seconds(self.interval * tokens)
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the keys whose buckets are full again; says when the table
    /// fills up (new keys share the overflow bucket) and when it has room
    /// again.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        let shared = self.table.overflowed.swap(0, Ordering::Relaxed);
        let keys = self.table.keys.load(Ordering::Relaxed);
        if shared > 0 {
            if !self.full.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "rate limit of {}: max_keys ({}) keys have requests in their buckets; \
                     requests of other keys share one bucket until some refill \
                     ({shared} so far; raise max_keys if this is legitimate traffic)",
                    self.name,
                    self.table.max_keys
                );
            }
        } else if keys < self.table.max_keys {
            if self.full.swap(false, Ordering::Relaxed) {
                log::info!(
                    "rate limit of {}: room for new keys again ({keys} of max_keys {})",
                    self.name,
                    self.table.max_keys
                );
            }
            self.limiter.shrink_to_fit();
        }
    }
}

fn ceil_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The background task that sweeps every limiter of the running snapshot
/// once a second: the pool holds exactly those.
pub struct SweepService {
    limiters: Arc<StatePool<LimiterSettings, LocalLimiter>>,
}

impl SweepService {
    pub fn new(limiters: Arc<StatePool<LimiterSettings, LocalLimiter>>) -> Self {
        SweepService { limiters }
    }
}

#[async_trait]
impl BackgroundService for SweepService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            for limiter in self.limiters.active() {
                limiter.sweep();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limiter(
        requests: u32,
        per: Duration,
        burst: u32,
    ) -> (LocalLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let settings = LimiterSettings {
            requests,
            per,
            burst,
            max_keys: 1000,
            key: "client_ip".into(),
            ipv6_prefix: 64,
        };
        (
            LocalLimiter::with_clock("test", &settings, clock.clone()).unwrap(),
            clock,
        )
    }

    /// Sends `per_tick` requests every `tick` for `ticks` ticks; counts
    /// what was allowed.
    fn allowed(
        l: &LocalLimiter<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        tick: Duration,
        ticks: u32,
        per_tick: u32,
    ) -> u32 {
        let mut n = 0;
        for _ in 0..ticks {
            for _ in 0..per_tick {
                n += u32::from(l.check(7).allowed);
            }
            clock.advance(tick);
        }
        n
    }

    #[test]
    fn a_fresh_key_gets_its_burst_then_the_rate() {
        let (l, clock) = limiter(100, Duration::from_secs(1), 20);
        // The burst at once, then nothing in the same instant.
        let first: Vec<Decision> = (0..21).map(|_| l.check(1)).collect();
        assert!(first[..20].iter().all(|d| d.allowed));
        assert_eq!(first[0].remaining, 19);
        assert_eq!(first[19].remaining, 0);
        assert!(!first[20].allowed);
        assert_eq!(first[20].retry_after, 1);
        // One token per 10 ms.
        clock.advance(Duration::from_millis(10));
        assert!(l.check(1).allowed);
        assert!(!l.check(1).allowed);
        // Another key is untouched.
        assert_eq!(l.check(2).remaining, 19);
    }

    #[test]
    fn over_t_seconds_a_flood_gets_burst_plus_rate_times_t() {
        for (requests, per, burst, seconds) in [
            (100, Duration::from_secs(1), 20, 10u32),
            (1000, Duration::from_secs(60), 50, 120),
            (5, Duration::from_secs(1), 1, 30),
        ] {
            let (l, clock) = limiter(requests, per, burst);
            // 1 ms ticks, 10 requests each: far above every rate here.
            let got = allowed(&l, &clock, Duration::from_millis(1), seconds * 1000, 10);
            let rate = f64::from(requests) / per.as_secs_f64();
            let expected = f64::from(burst) + rate * f64::from(seconds);
            let error = (f64::from(got) - expected).abs() / expected;
            assert!(
                error <= 0.01,
                "{requests}/{per:?} burst {burst}: {got} allowed, expected {expected}"
            );
        }
    }

    #[test]
    fn refusals_say_when_to_come_back() {
        let (l, clock) = limiter(1, Duration::from_secs(60), 2);
        assert!(l.check(1).allowed);
        let second = l.check(1);
        assert_eq!((second.remaining, second.reset), (0, 120));
        let refused = l.check(1);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, 60);
        clock.advance(Duration::from_secs(30));
        assert_eq!(l.check(1).retry_after, 30);
    }

    #[test]
    fn exact_across_threads() {
        let (l, _clock) = limiter(1, Duration::from_secs(3600), 1000);
        let l = Arc::new(l);
        let allowed: u32 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let l = Arc::clone(&l);
                    s.spawn(move || {
                        (0..1000)
                            .map(|_| u32::from(l.check(42).allowed))
                            .sum::<u32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(
            allowed, 1000,
            "8 threads x 1000 requests against a burst of 1000"
        );
    }

    #[test]
    fn idle_keys_are_swept() {
        let (l, clock) = limiter(10, Duration::from_secs(1), 5);
        for key in 0..500u128 {
            l.check(key);
        }
        assert_eq!(l.len(), 500);
        // Kept until refilled.
        l.sweep();
        assert_eq!(l.len(), 500);
        clock.advance(Duration::from_secs(1));
        l.sweep();
        assert_eq!(l.len(), 0, "refilled buckets are dropped");
    }

    #[test]
    fn a_key_flood_never_refills_an_active_bucket() {
        // max_keys 1000; 1/m, burst 3.
        let (l, clock) = limiter(1, Duration::from_secs(60), 3);
        let victim = u128::MAX;
        for _ in 0..3 {
            assert!(l.check(victim).allowed);
        }
        assert!(!l.check(victim).allowed);
        // 1,500 new keys: 999 get a bucket each (the victim has the
        // 1000th); the other 501 share one, which lets 3 through.
        let allowed = (0..1500u128).filter(|&k| l.check(k).allowed).count();
        assert_eq!(allowed, 999 + 3);
        assert_eq!(l.len(), 1000, "the table never grows past max_keys");
        for _ in 0..3 {
            l.sweep();
            assert!(!l.check(victim).allowed, "the victim got a fresh bucket");
        }
        // Keys with a bucket keep it; a new key waits on the shared one.
        assert_eq!(l.check(0).remaining, 1);
        assert!(!l.check(5000).allowed);
        // Refilled buckets go first: room again, a new key has its own.
        clock.advance(Duration::from_secs(240));
        l.sweep();
        assert_eq!(l.len(), 0);
        assert_eq!(l.check(5000).remaining, 2);
    }
}
