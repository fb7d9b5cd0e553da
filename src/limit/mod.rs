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
//!
//! A request's key ([`LimitKey`]) is named by the limiter that counts it:
//! a local one hashes it under this process's random seed (nobody can
//! make two values share a bucket), a global one digests it with SHA-256,
//! which every gateway computes alike, before and after a restart.

pub mod gcra;
pub mod inflight;
pub mod redis;

use crate::auth::Identity;
use gcra::{Decision, LocalLimiter};
use http::{HeaderName, HeaderValue};
use once_cell::sync::Lazy;
use pingora::http::RequestHeader;
use redis::GlobalLimiter;
use sha2::{Digest, Sha256};
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
    /// The request's key of this kind; an IPv6 client counts by its first
    /// `ipv6_prefix` bits.
    pub fn key<'a>(
        &self,
        req: &'a RequestHeader,
        ip: Option<IpAddr>,
        identity: Option<&'a Identity>,
        ipv6_prefix: u8,
    ) -> LimitKey<'a> {
        match self {
            KeyKind::ClientIp => ip_key(ip, ipv6_prefix),
            KeyKind::Route => LimitKey::Route,
            KeyKind::Consumer => match identity {
                Some(who) => LimitKey::Consumer(who.name()),
                None => ip_key(ip, ipv6_prefix),
            },
            KeyKind::Header(name) => match req.headers.get(name) {
                Some(value) => LimitKey::Header(value.as_bytes()),
                None => ip_key(ip, ipv6_prefix),
            },
        }
    }
}

/// `ipv6_prefix` when a limit does not say: one site, or one host that
/// was handed a whole /64 (as most are), is one client; counting by /128
/// would give such a client 2^64 buckets.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// How a limit makes a request's key: what it counts by, and how much of
/// an IPv6 address is one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRule {
    pub kind: KeyKind,
    /// Leading bits of an IPv6 client address that make its key (0-128).
    pub ipv6_prefix: u8,
}

impl KeyRule {
    /// The request's key under this rule.
    pub fn key<'a>(
        &self,
        req: &'a RequestHeader,
        ip: Option<IpAddr>,
        identity: Option<&'a Identity>,
    ) -> LimitKey<'a> {
        self.kind.key(req, ip, identity, self.ipv6_prefix)
    }
}

/// What a request is counted by, before a limiter names its bucket
/// ([`LimitKey::local`] or [`LimitKey::global`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey<'a> {
    /// The whole route: one bucket.
    Route,
    /// A client address, as [`ip_key`] makes it (an IPv6 one cut to its
    /// prefix).
    Ip(u128),
    /// A consumer's name.
    Consumer(&'a str),
    /// A request header's value.
    Header(&'a [u8]),
}

impl LimitKey<'_> {
    /// The bucket's name in this process: fast, and seeded per process.
    pub fn local(&self) -> u128 {
        match *self {
            LimitKey::Route => 0,
            LimitKey::Ip(ip) => ip,
            LimitKey::Consumer(name) => hashed(name.as_bytes()),
            LimitKey::Header(value) => hashed(value),
        }
    }

    /// The bucket's name shared by every gateway: the first 128 bits of
    /// SHA-256 over a tag and the value, so it is the same in every
    /// process and release, says nothing of the value (a Redis key shows
    /// no address, tenant or consumer), and cannot be steered onto
    /// another's bucket.
    pub fn global(&self) -> u128 {
        let ip;
        let (tag, bytes): (u8, &[u8]) = match *self {
            LimitKey::Route => (b'r', b""),
            LimitKey::Ip(v) => {
                ip = v.to_be_bytes();
                (b'i', &ip)
            }
            LimitKey::Consumer(name) => (b'c', name.as_bytes()),
            LimitKey::Header(value) => (b'h', value),
        };
        let digest = Sha256::new()
            .chain_update([tag])
            .chain_update(bytes)
            .finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        u128::from_be_bytes(first)
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
    async fn check(&self, key: LimitKey<'_>) -> (Decision, bool) {
        match self {
            Limiter::Local(l) => (l.check(key.local()), true),
            // Boxed: a Redis call's future is large, and only global limits
            // should carry it.
            Limiter::Global(g) => Box::pin(g.check(key.global())).await,
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
    /// `ipv6_prefix`: how much of an IPv6 client address is one key.
    pub ipv6_prefix: u8,
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
            .field("ipv6_prefix", &self.ipv6_prefix)
            .field("burst", &self.limiter.burst())
            .field("global", &matches!(self.limiter, Limiter::Global(_)))
            .field("overrides", &self.overrides.len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for RateLimit {
    /// The same compiled limiters: state is shared, never compared.
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.ipv6_prefix == other.ipv6_prefix
            && self.limiter.same(&other.limiter)
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
/// either kind of socket is one key), an IPv6 address cut to its first
/// `ipv6_prefix` bits (an IPv4 one is always whole).
fn ip_key(ip: Option<IpAddr>, ipv6_prefix: u8) -> LimitKey<'static> {
    LimitKey::Ip(match ip {
        Some(IpAddr::V4(v4)) => u128::from(v4.to_ipv6_mapped()),
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => u128::from(v6),
        Some(IpAddr::V6(v6)) => u128::from(v6) & prefix_mask(ipv6_prefix),
        None => 0,
    })
}

/// The first `bits` bits set (all of them from 128 up).
fn prefix_mask(bits: u8) -> u128 {
    u128::MAX
        .checked_shl(128u32.saturating_sub(u32::from(bits)))
        .unwrap_or(0)
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
                Some((limiter, limit)) => (limiter, LimitKey::Consumer(&c.name), limit),
                None => (
                    &self.limiter,
                    self.kind.key(req, ip, identity, self.ipv6_prefix),
                    &self.limit_header,
                ),
            },
            _ => (
                &self.limiter,
                self.kind.key(req, ip, identity, self.ipv6_prefix),
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
        assert_eq!(ip_key(Some(v4), 64), ip_key(Some(mapped), 64));
        assert_eq!(ip_key(Some(v4), 0), ip_key(Some(v4), 128), "IPv4 is whole");
        assert_ne!(hashed(b"alice"), hashed(b"bob"));
    }

    #[test]
    fn ipv6_clients_count_by_their_prefix() {
        let key = |ip: &str, prefix| ip_key(Some(ip.parse().unwrap()), prefix);
        // One /64: one key, wherever in it the address is.
        assert_eq!(
            key("2001:db8:0:1::1", 64),
            key("2001:db8:0:1:ffff:ffff:ffff:ffff", 64)
        );
        assert_ne!(key("2001:db8:0:1::1", 64), key("2001:db8:0:2::1", 64));
        assert_eq!(key("2001:db8:0:1::1", 48), key("2001:db8:0:2::1", 48));
        assert_ne!(key("2001:db8:0:1::1", 128), key("2001:db8:0:1::2", 128));
        assert_eq!(key("2001:db8::1", 0), key("2001:db9::1", 0));
        assert_eq!(
            key("2001:db8::1", 128),
            LimitKey::Ip(u128::from(
                "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap()
            ))
        );
    }

    #[test]
    fn a_key_rule_keys_the_client_address_and_its_fallbacks_alike() {
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        let a: IpAddr = "2001:db8:0:1::a".parse().unwrap();
        let b: IpAddr = "2001:db8:0:1::b".parse().unwrap();
        for kind in [
            KeyKind::ClientIp,
            KeyKind::Consumer,
            KeyKind::Header(HeaderName::from_static("x-tenant")),
        ] {
            let rule = KeyRule {
                kind,
                ipv6_prefix: 64,
            };
            assert_eq!(rule.key(&req, Some(a), None), rule.key(&req, Some(b), None));
            let whole = KeyRule {
                ipv6_prefix: 128,
                ..rule
            };
            assert_ne!(
                whole.key(&req, Some(a), None),
                whole.key(&req, Some(b), None)
            );
        }
    }

    #[test]
    fn global_keys_are_the_same_in_every_process() {
        // Fixed values: another process, release or machine computes
        // these too (the first 128 bits of SHA-256 of tag and value).
        assert_eq!(
            format!("{:032x}", LimitKey::Header(b"tenant-a").global()),
            "35a0df649ba6ee98e18a2a188ff9b6f2"
        );
        let alice = LimitKey::Consumer("alice");
        assert_eq!(alice.global(), LimitKey::Consumer("alice").global());
        // Kinds never share a bucket, whatever the bytes.
        assert_ne!(alice.global(), LimitKey::Header(b"alice").global());
        let ip = ip_key(Some("192.0.2.1".parse().unwrap()), 64);
        assert_ne!(ip.global(), ip.local());
        assert_ne!(LimitKey::Route.global(), LimitKey::Ip(0).global());
    }
}
