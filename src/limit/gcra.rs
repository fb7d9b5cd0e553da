//! Local rate limits: governor's GCRA (a token bucket kept as one
//! "theoretical arrival time" per key), exact across worker threads (each
//! decision is a compare-and-swap on the key's state).
//!
//! A fresh key may send `burst` requests at once, then one per
//! `1 / rate`; over T seconds a client sending far above the rate gets
//! `burst + rate x T`. Keys are 128-bit values ([`super::LimitKey`]), so a
//! key costs the same memory whatever it was made from.
//!
//! Memory is bounded by `max_keys`: the sweeper ([`SweepService`]) drops
//! every key whose bucket has refilled (indistinguishable from a fresh
//! one) each second, and a limiter still over `max_keys` after that is
//! emptied, with a warning: every key starts again with a full bucket.

use crate::state::StatePool;
use async_trait::async_trait;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
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
}

type Store = DashMapStateStore<u128, ahash::RandomState>;
type Buckets<C> = RateLimiter<u128, Store, C, StateInformationMiddleware>;

/// One limit's buckets.
pub struct LocalLimiter<C: Clock + Clone = MonotonicClock> {
    /// Swapped for an empty one when over `max_keys` (governor's store
    /// cannot evict active keys one by one).
    limiter: arc_swap::ArcSwap<Buckets<C>>,
    quota: Quota,
    clock: C,
    max_keys: usize,
    burst: u32,
    /// The time one request's token takes to come back.
    interval: Duration,
    /// Set while over `max_keys`, so the warning is logged once.
    overflowed: AtomicBool,
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
    pub fn new(settings: &LimiterSettings) -> Result<Self, String> {
        LocalLimiter::with_clock(settings, MonotonicClock)
    }
}

impl<C: Clock + Clone> LocalLimiter<C> {
    pub fn with_clock(settings: &LimiterSettings, clock: C) -> Result<Self, String> {
        let interval = settings.per / settings.requests.max(1);
        let burst = NonZeroU32::new(settings.burst).ok_or("burst must be at least 1")?;
        let quota = Quota::with_period(interval)
            .ok_or("the rate is too high: more than one request per nanosecond")?
            .allow_burst(burst);
        Ok(LocalLimiter {
            limiter: arc_swap::ArcSwap::from_pointee(buckets(quota, &clock)),
            quota,
            clock,
            max_keys: settings.max_keys,
            burst: settings.burst,
            interval,
            overflowed: AtomicBool::new(false),
        })
    }

    /// Takes one token from `key`'s bucket, if it has one.
    pub fn check(&self, key: u128) -> Decision {
        match self.limiter.load().check_key(&key) {
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
                let wait = not_until.wait_time_from(self.clock.now());
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
        self.limiter.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the keys whose buckets are full again; empties the limiter
    /// if it still holds more than `max_keys`.
    pub fn sweep(&self) {
        let limiter = self.limiter.load_full();
        limiter.retain_recent();
        if limiter.len() > self.max_keys {
            if !self.overflowed.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "a rate limit holds more than its max_keys ({}) active keys; \
                     its buckets start over (raise max_keys if this is legitimate traffic)",
                    self.max_keys
                );
            }
            self.limiter
                .store(Arc::new(buckets(self.quota, &self.clock)));
        } else {
            self.overflowed.store(false, Ordering::Relaxed);
            limiter.shrink_to_fit();
        }
    }
}

fn buckets<C: Clock + Clone>(quota: Quota, clock: &C) -> Buckets<C> {
    RateLimiter::dashmap_with_clock_and_hasher(quota, clock.clone(), ahash::RandomState::new())
        .with_middleware::<StateInformationMiddleware>()
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
        };
        (
            LocalLimiter::with_clock(&settings, clock.clone()).unwrap(),
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
    fn idle_keys_are_swept_and_the_bound_holds() {
        let (l, clock) = limiter(10, Duration::from_secs(1), 5);
        for key in 0..500u128 {
            l.check(key);
        }
        assert_eq!(l.len(), 500);
        // Over max_keys (1000) is emptied; under, kept until refilled.
        l.sweep();
        assert_eq!(l.len(), 500);
        clock.advance(Duration::from_secs(1));
        l.sweep();
        assert_eq!(l.len(), 0, "refilled buckets are dropped");
        for key in 0..1500u128 {
            l.check(key);
        }
        l.sweep();
        assert_eq!(l.len(), 0, "over max_keys the limiter starts over");
    }
}
