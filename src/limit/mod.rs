//! Keeping callers within their limits, per route, after authentication:
//!
//! - [`gcra`]: rate limits (token buckets) kept in this process;
//! - [`inflight`]: requests in progress per route, upstream and client.
//!
//! A route's `rate_limit` is compiled once into a [`RateLimit`]: how its
//! key is made, the limiter holding the buckets, and the limiters of
//! consumers with their own `rate_limit`. Limiters are drawn from a pool
//! by name and settings, so a reload keeps the buckets of an unchanged
//! limit.

pub mod gcra;
pub mod inflight;
pub mod redis;

use crate::auth::Identity;
use gcra::{Decision, LocalLimiter};
use http::{HeaderName, HeaderValue};
use once_cell::sync::Lazy;
use pingora::http::RequestHeader;
use redis::GlobalLimiter;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// What a limit counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// The client address (after trusted proxies).
    ClientIp,
    /// The caller authentication identified.
    Consumer,
    /// One bucket for the whole route.
    Route,
    /// A request header's value; requests without it count by client IP.
    Header(HeaderName),
}

impl KeyKind {
    /// The request's key of this kind.
    pub fn key(
        &self,
        req: &RequestHeader,
        ip: Option<IpAddr>,
        identity: Option<&Identity>,
    ) -> u128 {
        match self {
            KeyKind::ClientIp => ip_key(ip),
            KeyKind::Route => 0,
            KeyKind::Consumer => match identity {
                Some(who) => hashed(who.name().as_bytes()),
                None => ip_key(ip),
            },
            KeyKind::Header(name) => match req.headers.get(name) {
                Some(value) => hashed(value.as_bytes()),
                None => ip_key(ip),
            },
        }
    }
}

/// Where a limit's buckets are.
pub enum Limiter {
    /// In this process.
    Local(Arc<LocalLimiter>),
    /// In Redis, shared by every gateway using it.
    Global(Arc<GlobalLimiter>),
}

impl Limiter {
    fn burst(&self) -> u32 {
        match self {
            Limiter::Local(l) => l.burst(),
            Limiter::Global(g) => g.burst(),
        }
    }

    /// The decision, and whether its figures are known (a global limit
    /// that Redis could not decide is `on_error`'s call, without them).
    async fn check(&self, key: u128) -> (Decision, bool) {
        match self {
            Limiter::Local(l) => (l.check(key), true),
            // Boxed: a Redis call's future is large, and only global limits
            // should carry it.
            Limiter::Global(g) => Box::pin(g.check(key)).await,
        }
    }

    fn same(&self, other: &Limiter) -> bool {
        match (self, other) {
            (Limiter::Local(a), Limiter::Local(b)) => Arc::ptr_eq(a, b),
            (Limiter::Global(a), Limiter::Global(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// A route's compiled rate limit.
pub struct RateLimit {
    pub kind: KeyKind,
    pub limiter: Limiter,
    /// `RateLimit-Limit` of `limiter`, rendered once.
    pub limit_header: HeaderValue,
    /// Whether allowed answers carry the `RateLimit-*` headers (a refusal
    /// always does).
    pub headers: bool,
    /// Consumers with a `rate_limit` of their own: their limiter (keyed by
    /// consumer) and its `RateLimit-Limit`.
    pub overrides: HashMap<String, (Limiter, HeaderValue), ahash::RandomState>,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("kind", &self.kind)
            .field("burst", &self.limiter.burst())
            .field("global", &matches!(self.limiter, Limiter::Global(_)))
            .field("overrides", &self.overrides.len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for RateLimit {
    /// The same compiled limiters: state is shared, never compared.
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.limiter.same(&other.limiter)
    }
}

impl Eq for RateLimit {}

/// The outcome for one request, with what its `RateLimit-*` headers say.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub decision: Decision,
    pub limit: HeaderValue,
    /// Whether the answer carries the `RateLimit-*` headers (a refusal
    /// carries `Retry-After` whether or not).
    pub headers: bool,
}

/// Hashes strings into 128-bit keys under a per-process seed, so nobody
/// can make two values share a bucket.
static KEY_HASHERS: Lazy<(ahash::RandomState, ahash::RandomState)> =
    Lazy::new(|| (ahash::RandomState::new(), ahash::RandomState::new()));

fn hashed(bytes: &[u8]) -> u128 {
    let (a, b) = &*KEY_HASHERS;
    (u128::from(a.hash_one(bytes)) << 64) | u128::from(b.hash_one(bytes))
}

/// An address as a key: the IPv6 form, IPv4 mapped (the same client on
/// either kind of socket is one key).
fn ip_key(ip: Option<IpAddr>) -> u128 {
    match ip {
        Some(IpAddr::V4(v4)) => u128::from(v4.to_ipv6_mapped()),
        Some(IpAddr::V6(v6)) => u128::from(v6),
        None => 0,
    }
}

impl RateLimit {
    /// Counts the request against its bucket.
    pub async fn check(
        &self,
        req: &RequestHeader,
        ip: Option<IpAddr>,
        identity: Option<&Identity>,
    ) -> Verdict {
        let (limiter, key, limit) = match identity {
            Some(Identity::Consumer(c)) => match self.overrides.get(&c.name) {
                Some((limiter, limit)) => (limiter, hashed(c.name.as_bytes()), limit),
                None => (
                    &self.limiter,
                    self.kind.key(req, ip, identity),
                    &self.limit_header,
                ),
            },
            _ => (
                &self.limiter,
                self.kind.key(req, ip, identity),
                &self.limit_header,
            ),
        };
        let (decision, known) = limiter.check(key).await;
        Verdict {
            headers: known && (self.headers || !decision.allowed),
            decision,
            limit: limit.clone(),
        }
    }
}

/// Small numbers as header values, rendered once: the `RateLimit-*`
/// headers go on every response of a limited route.
static NUMBERS: Lazy<Vec<HeaderValue>> =
    Lazy::new(|| (0..=1024u32).map(HeaderValue::from).collect());

pub fn number(n: u64) -> HeaderValue {
    usize::try_from(n)
        .ok()
        .and_then(|i| NUMBERS.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_render_alike_from_the_table_or_not() {
        assert_eq!(number(0), "0");
        assert_eq!(number(1024), "1024");
        assert_eq!(number(1025), "1025");
        assert_eq!(number(u64::MAX), "18446744073709551615");
    }

    #[test]
    fn keys_are_per_address_family_agnostic() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(ip_key(Some(v4)), ip_key(Some(mapped)));
        assert_ne!(hashed(b"alice"), hashed(b"bob"));
    }
}
