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

use crate::auth::Identity;
use gcra::{Decision, LocalLimiter};
use http::{HeaderName, HeaderValue};
use once_cell::sync::Lazy;
use pingora::http::RequestHeader;
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

/// A route's compiled rate limit.
pub struct RateLimit {
    pub kind: KeyKind,
    pub limiter: Arc<LocalLimiter>,
    /// `RateLimit-Limit` of `limiter`, rendered once.
    pub limit_header: HeaderValue,
    /// Whether allowed answers carry the `RateLimit-*` headers (a refusal
    /// always does).
    pub headers: bool,
    /// Consumers with a `rate_limit` of their own: their limiter (keyed by
    /// consumer) and its `RateLimit-Limit`.
    pub overrides: HashMap<String, (Arc<LocalLimiter>, HeaderValue), ahash::RandomState>,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("kind", &self.kind)
            .field("burst", &self.limiter.burst())
            .field("overrides", &self.overrides.len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for RateLimit {
    /// The same compiled limiters: state is shared, never compared.
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && Arc::ptr_eq(&self.limiter, &other.limiter)
    }
}

impl Eq for RateLimit {}

/// The outcome for one request, with what its `RateLimit-*` headers say.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub decision: Decision,
    pub limit: HeaderValue,
    /// Whether the answer carries the `RateLimit-*` headers.
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
    pub fn check(
        &self,
        req: &RequestHeader,
        ip: Option<IpAddr>,
        identity: Option<&Identity>,
    ) -> Verdict {
        if let Some(Identity::Consumer(c)) = identity {
            if let Some((limiter, limit)) = self.overrides.get(&c.name) {
                let decision = limiter.check(hashed(c.name.as_bytes()));
                return Verdict {
                    headers: self.headers || !decision.allowed,
                    decision,
                    limit: limit.clone(),
                };
            }
        }
        let decision = self.limiter.check(self.kind.key(req, ip, identity));
        Verdict {
            headers: self.headers || !decision.allowed,
            decision,
            limit: self.limit_header.clone(),
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
