//! Routes' `rate_limit` and consumers' own: compiled into limiters drawn
//! from the pool, so a reload keeps the buckets of an unchanged limit.

use super::compile::{duration_at, Errors};
use super::file::{FileConfig, RateLimitSpec, RouteSpec};
use super::values::parse_rate;
use crate::limit::gcra::{LimiterSettings, LocalLimiter};
use crate::limit::inflight::{Ceiling, PerClient};
use crate::limit::redis::{GlobalLimiter, OnError, Redis, RedisSettings};
use crate::limit::{number, KeyKind, KeyRule, Limiter, RateLimit, DEFAULT_IPV6_PREFIX};
use crate::router::PerClientLimit;
use crate::snapshot::{Draws, Pools};
use http::HeaderName;
use pingora_limits::inflight::Inflight;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

/// Keys a limiter holds before the sweeper drops idle ones.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// A consumer's own rate, checked once for every route.
pub(super) struct ConsumerRate {
    requests: u32,
    per: Duration,
    burst: u32,
}

/// The consumers with a `rate_limit` of their own.
pub(super) fn compile_consumer_rates(
    file: &FileConfig,
    errors: &mut Errors,
) -> BTreeMap<String, ConsumerRate> {
    let mut rates = BTreeMap::new();
    for (name, consumer) in &file.consumers {
        let Some(spec) = &consumer.rate_limit else {
            continue;
        };
        let at = format!("consumers.{name}.rate_limit");
        match parse_rate(&spec.rate) {
            Ok((requests, per)) => {
                let burst = spec.burst.unwrap_or(requests);
                if burst == 0 {
                    errors.add(format!("{at}.burst"), "must be at least 1");
                    continue;
                }
                rates.insert(
                    name.clone(),
                    ConsumerRate {
                        requests,
                        per,
                        burst,
                    },
                );
            }
            Err(e) => errors.add(format!("{at}.rate"), e),
        }
    }
    rates
}

/// A route's rate limit.
#[allow(clippy::too_many_arguments)]
pub(super) fn compile_rate_limit(
    at: &str,
    route: &RouteSpec,
    spec: &RateLimitSpec,
    consumers: &BTreeMap<String, ConsumerRate>,
    redis: Option<&Arc<Redis>>,
    pools: &Pools,
    draws: &mut Draws,
    errors: &mut Errors,
) -> Option<Arc<RateLimit>> {
    let at = format!("{at}.rate_limit");
    let before = errors.0.len();
    let has_auth = route.auth.as_ref().is_some_and(|a| !a.is_empty());
    let key_text = spec.key.as_deref().unwrap_or("client_ip");
    let kind = match key_text {
        "client_ip" => KeyKind::ClientIp,
        "route" => KeyKind::Route,
        "consumer" => {
            if !has_auth {
                errors.add(
                    format!("{at}.key"),
                    "consumer needs auth on the route: a public route has no consumer",
                );
            }
            KeyKind::Consumer
        }
        other => {
            match other.strip_prefix("header:") {
                Some(name) => match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(h) => KeyKind::Header(h),
                    Err(_) => {
                        errors.add(
                            format!("{at}.key"),
                            format!("{name:?} is not a header name"),
                        );
                        KeyKind::ClientIp
                    }
                },
                None => {
                    errors.add(
                    format!("{at}.key"),
                    format!("{other:?} is not a key; use client_ip, consumer, route or header:<name>"),
                );
                    KeyKind::ClientIp
                }
            }
        }
    };
    let rate = parse_rate(&spec.rate).map_err(|e| errors.add(format!("{at}.rate"), e));
    let burst = spec.burst.or(rate.as_ref().ok().map(|r| r.0)).unwrap_or(1);
    if burst == 0 {
        errors.add(format!("{at}.burst"), "must be at least 1");
    }
    let max_keys = spec.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
    if max_keys == 0 {
        errors.add(format!("{at}.max_keys"), "must be at least 1");
    }
    let ipv6_prefix = ipv6_prefix(spec).unwrap_or_else(|e| {
        errors.add(format!("{at}.ipv6_prefix"), e);
        DEFAULT_IPV6_PREFIX
    });
    let global = match spec.scope.as_deref().unwrap_or("local") {
        "local" => false,
        "global" => {
            if redis.is_none() {
                errors.add(
                    format!("{at}.scope"),
                    "global limits are kept in Redis: configure the redis: section",
                );
            }
            true
        }
        other => {
            errors.add(
                format!("{at}.scope"),
                format!("{other:?} is not a scope; use local or global"),
            );
            false
        }
    };
    let Ok((requests, per)) = rate else {
        return None;
    };
    if errors.0.len() > before {
        return None;
    }
    let settings = LimiterSettings {
        requests,
        per,
        burst,
        max_keys,
        key: key_text.to_owned(),
        ipv6_prefix,
    };
    // A global bucket is named by its definition too: a changed limit
    // starts fresh there as a local one does.
    let make =
        |name: &str, settings: &LimiterSettings, draws: &mut Draws, errors: &mut Errors| match (
            global, redis,
        ) {
            (true, Some(redis)) => Some(Limiter::Global(Arc::new(GlobalLimiter::new(
                Arc::clone(redis),
                &format!(
                    "{name}:{}/{}ms/{}",
                    settings.requests,
                    settings.per.as_millis(),
                    settings.burst
                ),
                settings.per / settings.requests.max(1),
                settings.burst,
            )))),
            _ => draw(name, settings, pools, draws, &at, errors).map(Limiter::Local),
        };
    let limiter = make(&route.name, &settings, draws, errors)?;
    let mut overrides = HashMap::default();
    // Only an API key names a consumer.
    if route.auth.iter().flatten().any(|m| m == "api_key") {
        for (name, rate) in consumers {
            let settings = LimiterSettings {
                requests: rate.requests,
                per: rate.per,
                burst: rate.burst,
                max_keys,
                key: "consumer".to_owned(),
                ipv6_prefix,
            };
            // Consumer names are plain (letters, digits, -_.), so "#"
            // keeps route and consumer apart.
            let state = format!("{}#{name}", route.name);
            let limiter = make(&state, &settings, draws, errors)?;
            overrides.insert(name.clone(), (limiter, number(u64::from(rate.burst))));
        }
    }
    Some(Arc::new(RateLimit {
        kind,
        ipv6_prefix,
        limiter,
        limit_header: number(u64::from(burst)),
        headers: spec.headers.unwrap_or(true),
        overrides,
    }))
}

fn draw(
    name: &str,
    settings: &LimiterSettings,
    pools: &Pools,
    draws: &mut Draws,
    at: &str,
    errors: &mut Errors,
) -> Option<Arc<LocalLimiter>> {
    pools
        .rate_limiters
        .draw(&mut draws.rate_limiters, name, settings, || {
            LocalLimiter::new(name, settings)
        })
        .map_err(|e| errors.add(at, e))
        .ok()
}

/// A route's `max_inflight` and `max_inflight_per_client`.
pub(super) fn compile_route_inflight(
    at: &str,
    route: &RouteSpec,
    pools: &Pools,
    draws: &mut Draws,
    errors: &mut Errors,
) -> (Option<Ceiling>, Option<Arc<PerClientLimit>>) {
    let ceiling = route.max_inflight.and_then(|max| {
        ceiling(
            &format!("{at}.max_inflight"),
            &format!("route:{}", route.name),
            max,
            pools,
            draws,
            errors,
        )
    });
    let per_client = route.max_inflight_per_client.and_then(|max| {
        if max == 0 {
            errors.add(
                format!("{at}.max_inflight_per_client"),
                "must be at least 1",
            );
            return None;
        }
        let counts = pools
            .client_inflight
            .draw::<()>(&mut draws.client_inflight, &route.name, &(), || {
                Ok(Inflight::new())
            })
            .ok()?;
        // Keyed like the rate limit, when the route has one (whose errors
        // are its own to report).
        let rate_limit = route.rate_limit.as_ref();
        let kind = rate_limit
            .and_then(|r| r.key.as_deref())
            .and_then(|k| match k {
                "consumer" => Some(KeyKind::Consumer),
                "route" => Some(KeyKind::Route),
                other => HeaderName::from_bytes(other.strip_prefix("header:")?.as_bytes())
                    .ok()
                    .map(KeyKind::Header),
            })
            .unwrap_or(KeyKind::ClientIp);
        let ipv6_prefix = rate_limit
            .and_then(|r| ipv6_prefix(r).ok())
            .unwrap_or(DEFAULT_IPV6_PREFIX);
        Some(Arc::new(PerClientLimit {
            kind: KeyRule { kind, ipv6_prefix },
            limit: PerClient::new(max, counts),
        }))
    });
    (ceiling, per_client)
}

/// A rate limit's `ipv6_prefix`, checked.
fn ipv6_prefix(spec: &RateLimitSpec) -> Result<u8, String> {
    match spec.ipv6_prefix {
        None => Ok(DEFAULT_IPV6_PREFIX),
        Some(bits) => u8::try_from(bits)
            .ok()
            .filter(|b| *b <= 128)
            .ok_or_else(|| format!("{bits} is not a prefix length: use 0 to 128")),
    }
}

/// An exact ceiling over the counter pooled as `state`.
pub(super) fn ceiling(
    at: &str,
    state: &str,
    max: usize,
    pools: &Pools,
    draws: &mut Draws,
    errors: &mut Errors,
) -> Option<Ceiling> {
    if max == 0 {
        errors.add(at, "must be at least 1");
        return None;
    }
    let count = pools
        .inflight
        .draw::<()>(&mut draws.inflight, state, &(), || Ok(AtomicUsize::new(0)))
        .ok()?;
    Some(Ceiling::new(max, count))
}

/// The `redis:` section: one shared connection, pooled so a reload that
/// keeps the section keeps the connection.
pub(super) fn compile_redis(
    file: &FileConfig,
    pools: &Pools,
    draws: &mut Draws,
    errors: &mut Errors,
) -> Option<Arc<Redis>> {
    let spec = file.redis.as_ref()?;
    let timeout = match &spec.timeout {
        Some(t) => duration_at(errors, "redis.timeout".into(), t)?,
        None => Duration::from_millis(20),
    };
    let on_error = match spec.on_error.as_deref().unwrap_or("allow") {
        "allow" => OnError::Allow,
        "deny" => OnError::Deny,
        other => {
            errors.add(
                "redis.on_error",
                format!("{other:?} is neither allow nor deny"),
            );
            return None;
        }
    };
    let settings = RedisSettings {
        url: spec.url.clone(),
        timeout,
        on_error,
    };
    pools
        .redis
        .draw(&mut draws.redis, "redis", &settings, || {
            Redis::new(settings.clone())
        })
        .map_err(|e| errors.add("redis.url", e))
        .ok()
}
