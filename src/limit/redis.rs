//! Global rate limits, shared by every gateway process through one Redis.
//!
//! Each decision is one atomic server-side script: GCRA in Lua, with the
//! time taken from Redis (`TIME`), never from a gateway's clock, so N
//! gateways together allow `burst + rate x T`, not N times that, and their
//! clocks need not agree.
//!
//! The connection is redis-rs's `ConnectionManager`: one multiplexed,
//! pipelined connection shared by all requests, reconnecting by itself.
//! A decision waits at most `timeout`; when Redis is down, not connected
//! yet, or slower than that, `on_error` decides (allow or deny). Failures
//! are logged once per incident (when they start and when they end) and
//! counted.

use super::gcra::Decision;
use crate::state::StatePool;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// GCRA over Redis time. KEYS[1]: the bucket. ARGV[1]: microseconds per
/// request; ARGV[2]: the burst. Returns {allowed, remaining, retry after
/// µs, reset µs}. The bucket expires once it would be full again.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
";

/// What to do when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Allow,
    Deny,
}

/// The `redis:` section, compiled.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// As written, password included: for connecting only; everything
    /// shown goes through [`redacted`].
    pub url: String,
    pub timeout: Duration,
    pub on_error: OnError,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redacted(&self.url))
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

/// A Redis URL fit to be shown (logs, `/config`, config errors): its
/// password, and a user part written without one (often a password
/// too), replaced by `***`, as is a `pass=` or `password=` parameter
/// (where unix-socket URLs carry it).
pub fn redacted(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let rest = match url.find("://") {
        Some(i) => {
            let (scheme, rest) = url.split_at(i + 3);
            out.push_str(scheme);
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, rest) = rest.split_at(authority_end);
            match authority.rfind('@') {
                Some(at) => {
                    match authority[..at].split_once(':') {
                        Some((user, _)) => {
                            out.push_str(user);
                            out.push_str(":***");
                        }
                        None => out.push_str("***"),
                    }
                    out.push_str(&authority[at..]);
                }
                None => out.push_str(authority),
            }
            rest
        }
        None => url,
    };
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    out.push_str(path);
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, _)) if name == "pass" || name == "password" => {
                    out.push_str(name);
                    out.push_str("=***");
                }
                _ => out.push_str(pair),
            }
        }
    }
    out
}

/// The shared connection and how it is doing.
pub struct Redis {
    pub settings: RedisSettings,
    /// `settings.url` [`redacted`], rendered once.
    shown_url: String,
    client: redis::Client,
    conn: arc_swap::ArcSwapOption<ConnectionManager>,
    script: redis::Script,
    failing: AtomicBool,
    /// Decisions Redis could not make (errors, timeouts, no connection).
    pub errors: AtomicU64,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Redis {
    pub fn new(settings: RedisSettings) -> Result<Self, String> {
        let shown_url = redacted(&settings.url);
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("{shown_url:?} is not a Redis URL: {e}"))?;
        Ok(Redis {
            settings,
            shown_url,
            client,
            conn: arc_swap::ArcSwapOption::empty(),
            script: redis::Script::new(GCRA),
            failing: AtomicBool::new(false),
            errors: AtomicU64::new(0),
        })
    }

    /// Connects if not connected yet (the manager reconnects by itself
    /// afterwards).
    async fn ensure_connected(&self) {
        if self.conn.load().is_some() {
            return;
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(self.settings.timeout)
            .set_number_of_retries(2);
        match ConnectionManager::new_with_config(self.client.clone(), config).await {
            Ok(conn) => {
                log::info!("connected to Redis at {}", self.shown_url);
                self.conn.store(Some(Arc::new(conn)));
            }
            Err(e) => self.incident(&format!("cannot connect: {e}")),
        }
    }

    /// One decision for `bucket`, within `timeout`; `None` when Redis could
    /// not make it.
    pub async fn check(&self, bucket: &str, interval_us: u64, burst: u32) -> Option<Decision> {
        let Some(conn) = self.conn.load_full() else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let mut conn = ConnectionManager::clone(&conn);
        let mut invocation = self.script.key(bucket);
        invocation.arg(interval_us).arg(burst);
        let call = invocation.invoke_async::<(i64, i64, i64, i64)>(&mut conn);
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok((allowed, remaining, retry_us, reset_us))) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    log::warn!("Redis at {} answers again", self.shown_url);
                }
                let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
                Some(Decision {
                    allowed: allowed == 1,
                    remaining: u32::try_from(remaining).unwrap_or(0),
                    reset: ceil_seconds(micros(reset_us)),
                    retry_after: ceil_seconds(micros(retry_us)).max(u64::from(allowed != 1)),
                })
            }
            Ok(Err(e)) => {
                self.incident(&e.to_string());
                // A lost connection is made anew by the connect service
                // (within a second) rather than left to the manager's own
                // reconnection, which a request's timeout can abandon
                // halfway.
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                    self.conn.store(None);
                }
                None
            }
            Err(_) => {
                self.incident(&format!("no answer within {:?}", self.settings.timeout));
                None
            }
        }
    }

    /// Counts a failure; logs the first of an incident.
    fn incident(&self, what: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::Relaxed) {
            log::error!(
                "Redis at {}: {what}; global rate limits {} requests until it answers",
                self.shown_url,
                match self.settings.on_error {
                    OnError::Allow => "allow",
                    OnError::Deny => "refuse",
                }
            );
        }
    }

    /// For the admin listener.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "url": self.shown_url,
            "connected": self.conn.load().is_some(),
            "failing": self.failing.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
        })
    }
}

fn ceil_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A route's (or a consumer's) global limit.
pub struct GlobalLimiter {
    redis: Arc<Redis>,
    /// `tollgate:rl:<route>:`; the key's hex follows.
    prefix: String,
    interval_us: u64,
    burst: u32,
}

impl GlobalLimiter {
    pub fn new(redis: Arc<Redis>, name: &str, interval: Duration, burst: u32) -> Self {
        GlobalLimiter {
            redis,
            prefix: format!("tollgate:rl:{name}:"),
            interval_us: u64::try_from(interval.as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
            burst,
        }
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The decision for `key`; when Redis cannot make it, `on_error`'s
    /// (an allowed request then carries no `RateLimit-*` figures: `None`
    /// in the second place).
    pub async fn check(&self, key: u128) -> (Decision, bool) {
        let bucket = format!("{}{key:032x}", self.prefix);
        match self
            .redis
            .check(&bucket, self.interval_us, self.burst)
            .await
        {
            Some(decision) => (decision, true),
            None => (
                Decision {
                    allowed: self.redis.settings.on_error == OnError::Allow,
                    remaining: 0,
                    reset: 0,
                    retry_after: 1,
                },
                false,
            ),
        }
    }
}

/// Keeps the running snapshot's Redis connected: connects at start and
/// whenever the connection could not be made yet.
pub struct ConnectService {
    pool: Arc<StatePool<RedisSettings, Redis>>,
}

impl ConnectService {
    pub fn new(pool: Arc<StatePool<RedisSettings, Redis>>) -> Self {
        ConnectService { pool }
    }
}

#[async_trait]
impl BackgroundService for ConnectService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            for redis in self.pool.active() {
                redis.ensure_connected().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_in_a_url() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "redis://:s3cret@127.0.0.1:6379/2",
                "redis://:***@127.0.0.1:6379/2",
            ),
            (
                "rediss://app:s3cret@cache.internal",
                "rediss://app:***@cache.internal",
            ),
            ("redis://s3cret@127.0.0.1", "redis://***@127.0.0.1"),
            ("redis://:p@ss@host/0", "redis://:***@host/0"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "unix:///run/redis.sock?password=s3cret&user=app",
                "unix:///run/redis.sock?password=***&user=app",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }

    #[test]
    fn settings_and_errors_show_the_redacted_url() {
        let settings = RedisSettings {
            url: "redis://:s3cret@127.0.0.1:6379".into(),
            timeout: Duration::from_millis(20),
            on_error: OnError::Allow,
        };
        assert!(!format!("{settings:?}").contains("s3cret"));
        let redis = Redis::new(settings).unwrap();
        assert_eq!(redis.status()["url"], "redis://:***@127.0.0.1:6379");
        let bad = RedisSettings {
            url: "http://:s3cret@127.0.0.1".into(),
            timeout: Duration::from_millis(20),
            on_error: OnError::Allow,
        };
        let error = Redis::new(bad).err().unwrap();
        assert!(!error.contains("s3cret"), "{error}");
    }
}
