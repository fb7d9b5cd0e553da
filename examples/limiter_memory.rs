//! Memory of a local rate limiter holding many keys: the figure behind
//! `max_keys` in docs/performance.md.
//!
//! `cargo run --release --example limiter_memory [KEYS]` prints the
//! resident memory before and after KEYS distinct client addresses each
//! sent one request.

use std::time::Duration;
use tollgate::limit::gcra::{LimiterSettings, LocalLimiter};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let keys: u128 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let settings = LimiterSettings {
        requests: 100,
        per: Duration::from_secs(1),
        burst: 20,
        max_keys: usize::MAX,
        key: "client_ip".into(),
        ipv6_prefix: tollgate::limit::DEFAULT_IPV6_PREFIX,
    };
    let limiter = LocalLimiter::new("memory", &settings).expect("limiter");
    let before = rss_kib();
    // IPv4 clients in their mapped IPv6 form, as the gateway keys them.
    for i in 0..keys {
        limiter.check((0xffff << 32) | i);
    }
    let after = rss_kib();
    println!(
        "{} keys: RSS {:.1} MB -> {:.1} MB ({:.0} bytes per key)",
        limiter.len(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after - before) as f64 * 1024.0 / keys as f64
    );
}
