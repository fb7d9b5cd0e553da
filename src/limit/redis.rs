//! Global rate limits, shared by every gateway process through one Redis.
//!
//! Each decision is one atomic server-side script: GCRA in Lua, with the
//! time taken from Redis (`TIME`), never from a gateway's clock, so N
//! gateways together allow `burst + rate x T`, not N times that, and their
//! clocks need not agree.
//!
//! All requests share one multiplexed, pipelined connection (redis-rs's
//! `MultiplexedConnection`). The [`ConnectService`] owns it, in the
//! background: it connects at start, checks the connection with a `PING`
//! every second, and makes a lost or failed one anew, retrying at least
//! every second (100 ms, doubling, at most 1 s). redis-rs's own
//! `ConnectionManager` is not used: its reconnection backoff grows to a
//! minute, and a connect awaiting it kept a gateway off a Redis that had
//! been back for a minute or two.
//!
//! A decision waits at most `timeout`; when Redis is down, not connected
//! yet, or slower than that, `on_error` decides (allow or deny). Failures
//! (of decisions, connects and checks alike) are logged once per incident,
//! with their cause, when they start and when they end, and counted.

use super::gcra::Decision;
use crate::state::StatePool;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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

/// The longest a connect (TCP, and AUTH/SELECT if the URL asks) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a working connection is checked with a `PING`.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The first retry after a failed connect; each next one waits twice as
/// long, up to [`RETRY_AT_MOST`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_AT_MOST: Duration = Duration::from_secs(1);
/// `PING`s in a row without an answer after which the connection is
/// replaced: it may be dead without the socket knowing (no RST came), or
/// just slow (`CLIENT PAUSE`, a long script); a new one costs little.
const UNANSWERED_PINGS: u32 = 5;

/// The shared connection and how it is doing.
pub struct Redis {
    pub settings: RedisSettings,
    /// `settings.url` [`redacted`], rendered once.
    shown_url: String,
    client: redis::Client,
    /// Set by the connect service alone; a request that finds the
    /// connection lost clears it, which the service sees at its next
    /// round (within a second).
    conn: arc_swap::ArcSwapOption<MultiplexedConnection>,
    script: redis::Script,
    failing: AtomicBool,
    /// Failures: decisions Redis could not make (errors, timeouts, no
    /// connection), failed connects and unanswered checks.
    pub errors: AtomicU64,
    /// The connect service's own: its wait before the next connect, and
    /// the `PING`s unanswered in a row.
    retry_ms: AtomicU64,
    unanswered: AtomicU32,
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
            retry_ms: AtomicU64::new(0),
            unanswered: AtomicU32::new(0),
        })
    }

    /// One round of the connect service: connects if there is no
    /// connection, then checks it. Returns how long to wait before the
    /// next round (at most a second).
    async fn tend(&self) -> Duration {
        if self.conn.load().is_none() {
            if let Err(wait) = self.connect().await {
                return wait;
            }
        }
        self.check_connection().await;
        CHECK_EVERY
    }

    /// One connect attempt, bounded by [`CONNECT_TIMEOUT`]; on failure,
    /// the wait before the next.
    async fn connect(&self) -> Result<(), Duration> {
        let config = AsyncConnectionConfig::new().set_connection_timeout(CONNECT_TIMEOUT);
        let connect = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let failure = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(conn)) => {
                log::info!("connected to Redis at {}", self.shown_url);
                self.conn.store(Some(Arc::new(conn)));
                self.retry_ms.store(0, Ordering::Relaxed);
                self.unanswered.store(0, Ordering::Relaxed);
                return Ok(());
            }
            Ok(Err(e)) => format!("cannot connect: {e}"),
            Err(_) => format!("cannot connect within {CONNECT_TIMEOUT:?}"),
        };
        self.incident(&failure);
        let wait = next_retry(Duration::from_millis(self.retry_ms.load(Ordering::Relaxed)));
        self.retry_ms.store(
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Err(wait)
    }

    /// A `PING`, answered within `timeout` like a decision: says whether
    /// Redis answers again, or drops a connection that is lost.
    async fn check_connection(&self) {
        let Some(conn) = self.conn.load_full() else {
            return;
        };
        let mut multiplexed = MultiplexedConnection::clone(&conn);
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<()>(&mut multiplexed);
        match tokio::time::timeout(self.settings.timeout, ping).await {
            Ok(Ok(())) => {
                self.unanswered.store(0, Ordering::Relaxed);
                self.answered();
            }
            Ok(Err(e)) => {
                self.incident(&e.to_string());
                if lost(&e) {
                    self.drop_connection(&conn);
                }
            }
            Err(_) => {
                self.incident(&format!("no answer within {:?}", self.settings.timeout));
                if self.unanswered.fetch_add(1, Ordering::Relaxed) + 1 >= UNANSWERED_PINGS {
                    log::warn!(
                        "Redis at {}: {UNANSWERED_PINGS} checks unanswered; connecting anew",
                        self.shown_url
                    );
                    self.drop_connection(&conn);
                }
            }
        }
    }

    /// Forgets `conn`, unless the service has replaced it already.
    fn drop_connection(&self, conn: &Arc<MultiplexedConnection>) {
        self.conn.rcu(|current| match current {
            Some(c) if Arc::ptr_eq(c, conn) => None,
            other => other.clone(),
        });
    }

    /// Ends an incident, if one was going on.
    fn answered(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            log::warn!("Redis at {} answers again", self.shown_url);
        }
    }

    /// One decision for `bucket`, within `timeout`; `None` when Redis could
    /// not make it.
    pub async fn check(&self, bucket: &str, interval_us: u64, burst: u32) -> Option<Decision> {
        let Some(conn) = self.conn.load_full() else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let mut multiplexed = MultiplexedConnection::clone(&conn);
        let mut invocation = self.script.key(bucket);
        invocation.arg(interval_us).arg(burst);
        let call = invocation.invoke_async::<(i64, i64, i64, i64)>(&mut multiplexed);
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok((allowed, remaining, retry_us, reset_us))) => {
                self.answered();
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
                if lost(&e) {
                    self.drop_connection(&conn);
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

/// Whether `e` means the connection is gone (rather than one command
/// failing on a working one).
fn lost(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

/// The wait before the next connect after one that failed `previous`
/// after the last success (zero: this was the first to fail).
fn next_retry(previous: Duration) -> Duration {
    if previous.is_zero() {
        RETRY_FIRST
    } else {
        (previous * 2).min(RETRY_AT_MOST)
    }
}

fn ceil_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A route's (or a consumer's) global limit.
pub struct GlobalLimiter {
    redis: Arc<Redis>,
    /// `tollgate:rl:<route>:`; the key's digest, in hex, follows
    /// ([`super::LimitKey::global`]).
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

/// Keeps the running snapshot's Redis connected: connects at start,
/// checks the connection every second, and makes a lost or failed one
/// anew within a second.
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
            let mut wait = CHECK_EVERY;
            for redis in self.pool.active() {
                wait = wait.min(redis.tend().await);
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
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
    fn retries_start_soon_and_come_at_least_every_second() {
        let mut wait = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..8 {
            wait = next_retry(wait);
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
    }

    #[tokio::test]
    async fn a_failed_connect_is_shown_counted_and_retried_soon() {
        // A port nothing listens on: the connect is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let redis = Redis::new(RedisSettings {
            url: format!("redis://:s3cret@127.0.0.1:{port}"),
            timeout: Duration::from_millis(20),
            on_error: OnError::Deny,
        })
        .unwrap();
        assert_eq!(redis.tend().await, RETRY_FIRST);
        assert_eq!(redis.tend().await, RETRY_FIRST * 2);
        let status = redis.status();
        assert_eq!(status["connected"], false);
        assert_eq!(status["failing"], true);
        assert_eq!(status["errors"], 2);
        assert!(redis.check("k", 1000, 1).await.is_none());
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
