//! The YAML file format: the user-facing contract.
//!
//! These structs mirror `docs/configuration.md` key by key. Every struct denies
//! unknown fields so a typo is an error, never a silently ignored key. Nothing
//! here is used on the request path: [`super::compile`] turns a [`FileConfig`]
//! into a [`crate::snapshot::Snapshot`].

use serde::Deserialize;
use std::collections::BTreeMap;

/// The whole file. Sections are deserialized one by one (see [`super::parse`])
/// so that one bad route does not hide the errors of the next.
#[derive(Debug, Default)]
pub struct FileConfig {
    pub server: ServerSection,
    pub listen: Vec<ListenSpec>,
    pub admin: Option<AdminSpec>,
    pub limits: LimitsSpec,
    pub auth: AuthSpec,
    /// Callers known by API key, by name.
    pub consumers: BTreeMap<String, ConsumerSpec>,
    /// Whether a sane client `X-Request-Id` is kept (else one is generated).
    pub trust_request_id: Option<bool>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// Where global rate limits are kept.
    pub redis: Option<RedisSpec>,
    /// Where access log lines go; absent: off.
    pub access_log: Option<AccessLogSpec>,
    /// Requests slower than this get a warning in the error log.
    pub slow_request_threshold: Option<DurationText>,
    /// Ordered by name so errors and `/readyz` come out in a stable order.
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    pub routes: Vec<RouteSpec>,
    /// Upstreams present in the file that failed to parse; validation does
    /// not also report routes naming them as naming a missing upstream.
    pub unparsed_upstreams: std::collections::BTreeSet<String>,
}

/// The subset of Pingora's `ServerConf` an operator may set. Listed explicitly
/// (rather than embedding `ServerConf`) so unknown keys are rejected here too.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub threads: Option<usize>,
    pub pid_file: Option<String>,
    pub upgrade_sock: Option<String>,
    pub error_log: Option<String>,
    pub daemon: Option<bool>,
    /// With `daemon`, whether the starting process waits until the daemon
    /// serves; default true.
    pub daemon_wait_for_ready: Option<bool>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub work_stealing: Option<bool>,
    pub listener_tasks_per_fd: Option<usize>,
    pub upstream_keepalive_pool_size: Option<usize>,
    pub grace_period_seconds: Option<u64>,
    pub graceful_shutdown_timeout_seconds: Option<u64>,
    pub keepalive_timeout_seconds: Option<u64>,
    pub keepalive_request_limit: Option<u32>,
    /// Once stopping, how long an idle client connection is kept for a
    /// request on its way; default 1s.
    pub drain_idle_timeout: Option<DurationText>,
}

/// One upstream: a named set of targets and how to spread load over them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub targets: Vec<TargetSpec>,
    /// Requests in progress to this upstream at once.
    pub max_inflight: Option<usize>,
    /// A breaker per target.
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default)]
    pub balance: Balance,
    pub hash_key: Option<String>,
    pub health_check: Option<HealthCheckSpec>,
    #[serde(default)]
    pub timeouts: TimeoutsSpec,
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Which failures are retried: connect_failure, reset, timeout.
    pub retry_on: Option<Vec<String>>,
    /// `h1` (default), `h2` (over TLS) or `h2c` (HTTP/2 without TLS).
    pub protocol: Option<String>,
    /// TLS to the targets.
    pub tls: Option<UpstreamTlsSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSpec {
    /// The name sent as SNI and verified; default: the targets' host name.
    pub sni: Option<String>,
    /// Verify the certificate chain and name (default true).
    pub verify: Option<bool>,
    /// PEM bundle of trusted roots, instead of the system's.
    pub ca_file: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

fn default_retries() -> u32 {
    1
}

/// A target is written either as `host:port` or as `{ address, weight }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    untagged,
    expecting = "a target: \"host:port\" or { address: host:port, weight: N }"
)]
pub enum TargetSpec {
    Address(String),
    Weighted(WeightedTarget),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedTarget {
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl TargetSpec {
    pub fn address(&self) -> &str {
        match self {
            TargetSpec::Address(a) => a,
            TargetSpec::Weighted(w) => &w.address,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            TargetSpec::Address(_) => 1,
            TargetSpec::Weighted(w) => w.weight,
        }
    }
}

/// How a target is chosen for each request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    ConsistentHash,
    LeastConn,
}

/// Active health checking. Without `http_path` the check is a TCP connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    pub http_path: Option<String>,
    #[serde(default = "default_interval")]
    pub interval: DurationText,
    #[serde(default = "default_threshold")]
    pub healthy_after: u32,
    #[serde(default = "default_threshold")]
    pub unhealthy_after: u32,
}

fn default_interval() -> DurationText {
    "2s".into()
}

fn default_threshold() -> u32 {
    2
}

/// A value written with a unit (`500ms`, `32KiB`), kept as text and parsed
/// when compiled. A bare number is refused here with a hint, as YAML reads
/// it as an integer and "5" says nothing of its unit.
macro_rules! text_with_unit {
    ($(#[$doc:meta])* $name:ident, $expecting:literal, $small:literal, $large:literal, $example:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(pub String);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl serde::de::Visitor<'_> for Visitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        Ok($name(v.to_owned()))
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<$name, E> {
                        Err(E::custom(format!(
                            concat!("{v} has no unit; write it like {v}", $small, " or {v}", $large),
                            v = v
                        )))
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$name, E> {
                        Err(E::custom(format!(
                            concat!("{v} is not a ", $example),
                            v = v
                        )))
                    }
                }
                d.deserialize_any(Visitor)
            }
        }
    };
}

text_with_unit!(
    /// A duration as written in the file (`500ms`, `2s`).
    DurationText,
    "a duration with a unit, like 500ms, 2s, 1m or 1h",
    "s",
    "ms",
    "duration; write it like 500ms or 2s"
);

text_with_unit!(
    /// A size as written in the file (`32KiB`).
    SizeText,
    "a size with a unit, like 512B, 32KiB or 10MiB",
    "B",
    "KiB",
    "size; write it like 32KiB"
);

impl From<&str> for DurationText {
    fn from(s: &str) -> Self {
        DurationText(s.to_owned())
    }
}

/// A share written as a percentage (`50%`), kept as text and parsed when
/// compiled. A bare number is refused: `0.5` and `50` would each mean
/// something else to someone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PercentText(pub String);

impl<'de> Deserialize<'de> for PercentText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PercentText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a percentage, like 50%")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PercentText, E> {
                Ok(PercentText(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PercentText, E> {
                Err(E::custom(format!(
                    "{v} has no unit; write it as a percentage, like {v}%"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PercentText, E> {
                Err(E::custom(format!(
                    "{v} is not a percentage; write it like 50%"
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<PercentText, E> {
                Err(E::custom(format!(
                    "{v} is not a percentage; write it like 50%"
                )))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Per-upstream timeouts, each a duration string such as `500ms` or `10s`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSpec {
    #[serde(default = "default_connect")]
    pub connect: DurationText,
    #[serde(default = "default_read_write")]
    pub read: DurationText,
    #[serde(default = "default_read_write")]
    pub write: DurationText,
    #[serde(default = "default_idle")]
    pub idle: DurationText,
}

/// Above Linux's SYN retransmissions at 1 s and 3 s (HAProxy's advice:
/// slightly above a multiple of 3 s), so a SYN dropped by a full accept
/// queue (a burst of new connections after an upgrade does it) costs a
/// slower connect, not a failed request.
fn default_connect() -> DurationText {
    "4s".into()
}

fn default_read_write() -> DurationText {
    "10s".into()
}

fn default_idle() -> DurationText {
    "60s".into()
}

impl Default for TimeoutsSpec {
    fn default() -> Self {
        TimeoutsSpec {
            connect: default_connect(),
            read: default_read_write(),
            write: default_read_write(),
            idle: default_idle(),
        }
    }
}

/// One route: which requests it takes and where they go.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    pub hosts: Option<Vec<String>>,
    pub path_prefix: Option<String>,
    pub path: Option<String>,
    pub methods: Option<Vec<String>>,
    pub upstream: String,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub request_headers: HeaderOpsSpec,
    #[serde(default)]
    pub response_headers: HeaderOpsSpec,
    /// From request start to the response head, all attempts together.
    pub timeout: Option<DurationText>,
    /// Overrides `limits.max_body_bytes` for this route.
    pub max_body_bytes: Option<SizeText>,
    /// Whether WebSocket upgrades are passed through on this route.
    #[serde(default)]
    pub websocket: bool,
    /// How long an upgraded connection may carry nothing in a direction
    /// (default 1h).
    pub websocket_idle_timeout: Option<DurationText>,
    /// Plain-HTTP requests get a 308 to the same URL over HTTPS.
    #[serde(default)]
    pub https_redirect: bool,
    /// Ways a caller may identify itself; any one suffices. Absent or
    /// empty: public.
    pub auth: Option<Vec<String>>,
    /// Consumer groups admitted; absent: any identified caller.
    pub allow_groups: Option<Vec<String>>,
    /// Scopes a JWT must all hold (`scope` or `scp`).
    pub require_scopes: Option<Vec<String>>,
    pub ip_allow: Option<Vec<String>>,
    pub ip_deny: Option<Vec<String>>,
    pub cors: Option<CorsSpec>,
    pub rate_limit: Option<RateLimitSpec>,
    /// Requests in progress on the route at once.
    pub max_inflight: Option<usize>,
    /// Requests in progress per caller (keyed like `rate_limit`).
    pub max_inflight_per_client: Option<usize>,
}

/// `access_log`: `off`, `stdout`, or `{ path: FILE }`. A misspelt key is
/// refused, not ignored (a misspelt bound would silently be the default).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "off, stdout, or { path: FILE, queue_lines: N, queue_bytes: SIZE }"
)]
pub enum AccessLogSpec {
    Word(String),
    File {
        path: String,
        /// Lines queued for the writer before new ones are dropped.
        queue_lines: Option<usize>,
        /// Bytes of lines queued for the writer before new ones are
        /// dropped.
        queue_bytes: Option<SizeText>,
    },
}

/// The `redis:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSpec {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Longest wait for one decision; default 20ms.
    pub timeout: Option<DurationText>,
    /// `allow` (default) or `deny` when Redis cannot decide in time.
    pub on_error: Option<String>,
}

/// An upstream's circuit breaker settings; every key has a default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    pub window: Option<DurationText>,
    pub min_requests: Option<u32>,
    pub error_percent: Option<u32>,
    pub open_for: Option<DurationText>,
    pub half_open_probes: Option<u32>,
    /// Upstream statuses that count as errors; default 502, 503, 504.
    pub failure_statuses: Option<Vec<u32>>,
    /// The largest share of the upstream's targets open at once (`50%`).
    pub max_open_share: Option<PercentText>,
}

/// A route's rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// `client_ip` (default), `consumer`, `route` or `header:<name>`.
    pub key: Option<String>,
    /// `N/s`, `N/m` or `N/h`.
    pub rate: String,
    /// Requests a fresh key may send at once; default N.
    pub burst: Option<u32>,
    /// `local` (default) or `global`.
    pub scope: Option<String>,
    /// Keys held before idle ones are dropped; default 1,000,000.
    pub max_keys: Option<usize>,
    /// Leading bits of an IPv6 client address that make one key (0-128);
    /// default 64.
    pub ipv6_prefix: Option<u32>,
    /// Whether every answer carries the `RateLimit-*` headers; default true.
    pub headers: Option<bool>,
}

/// A consumer's own rate limit, replacing a route's for that consumer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerRateLimitSpec {
    pub rate: String,
    pub burst: Option<u32>,
}

/// A route's CORS rules.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSpec {
    /// `https://app.example.com`, or `*` alone for any origin.
    pub origins: Vec<String>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<Vec<String>>,
    pub max_age: Option<DurationText>,
    #[serde(default)]
    pub credentials: bool,
}

/// The `auth:` section: how credentials are read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSpec {
    pub api_keys: Option<ApiKeysSpec>,
    /// JWT providers by name, referenced by routes as `jwt:<name>`.
    #[serde(default)]
    pub jwt: BTreeMap<String, JwtProviderSpec>,
}

/// One JWT provider: its keys and the claims it demands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderSpec {
    /// `iss` must equal it when set.
    pub issuer: Option<String>,
    /// `aud` must hold one of them when set.
    pub audiences: Option<Vec<String>>,
    /// Clock skew allowed for `exp`, `nbf`, `iat`; default 30s, at most 5m.
    pub leeway: Option<DurationText>,
    #[serde(default)]
    pub keys: Vec<JwtKeySpec>,
    pub jwks_file: Option<String>,
    pub jwks_url: Option<String>,
    /// How often `jwks_url` is fetched again; default 10m.
    pub jwks_refresh: Option<DurationText>,
    /// Claim name to the header it is forwarded in.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Verified tokens remembered; default 100,000.
    pub cache_size: Option<usize>,
    /// Bytes the remembered tokens may take; default 64MiB.
    pub cache_bytes: Option<SizeText>,
}

/// One configured key, pinned to one algorithm.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeySpec {
    pub kid: Option<String>,
    pub alg: String,
    pub secret: Option<String>,
    pub secret_env: Option<String>,
    pub public_key_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysSpec {
    /// The header carrying the key; default `X-API-Key`.
    pub header: Option<String>,
    /// A query parameter also accepted; default none.
    pub query: Option<String>,
}

/// A caller known by API key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    /// `sha256:<hex of sha256(key)>`, never the key itself.
    #[serde(default)]
    pub api_keys: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub rate_limit: Option<ConsumerRateLimitSpec>,
}

/// A data listener: an address (plain HTTP), or an address with TLS or
/// h2c.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "an address like 0.0.0.0:80, or { address: 0.0.0.0:443, tls: { certificates: [{ cert: ..., key: ... }], min_version: \"1.2\", alpn: [h2, http/1.1] } } or { address: ..., h2c: true }"
)]
pub enum ListenSpec {
    Address(String),
    Detailed(ListenDetails),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenDetails {
    pub address: String,
    pub tls: Option<TlsSpec>,
    /// HTTP/2 without TLS, by prior knowledge, beside HTTP/1.
    #[serde(default)]
    pub h2c: bool,
}

impl ListenSpec {
    pub fn address(&self) -> &str {
        match self {
            ListenSpec::Address(a) => a,
            ListenSpec::Detailed(d) => &d.address,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    pub certificates: Vec<CertificateSpec>,
    /// "1.2" (default) or "1.3".
    pub min_version: Option<String>,
    /// Protocols offered by ALPN, in preference order; default
    /// `[h2, http/1.1]`.
    pub alpn: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    /// PEM chain, leaf first.
    pub cert: String,
    pub key: String,
}

/// The admin listener: an address, or an address with readiness rules.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "an address like 127.0.0.1:9901, or { address: ..., readyz_requires: [upstream, ...] }"
)]
pub enum AdminSpec {
    Address(String),
    Detailed(AdminDetails),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminDetails {
    pub address: String,
    /// Upstreams that must have a healthy target for `/readyz` to pass.
    #[serde(default)]
    pub readyz_requires: Vec<String>,
}

impl AdminSpec {
    pub fn address(&self) -> &str {
        match self {
            AdminSpec::Address(a) => a,
            AdminSpec::Detailed(d) => &d.address,
        }
    }

    pub fn readyz_requires(&self) -> &[String] {
        match self {
            AdminSpec::Address(_) => &[],
            AdminSpec::Detailed(d) => &d.readyz_requires,
        }
    }
}

/// What a client may send: the `limits:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    #[serde(default = "default_header_timeout")]
    pub header_timeout: DurationText,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: SizeText,
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    #[serde(default = "default_max_uri_bytes")]
    pub max_uri_bytes: SizeText,
    #[serde(default = "default_body_timeout")]
    pub body_timeout: DurationText,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: SizeText,
}

fn default_header_timeout() -> DurationText {
    "10s".into()
}
fn default_max_header_bytes() -> SizeText {
    SizeText("32KiB".into())
}
fn default_max_headers() -> usize {
    100
}
fn default_max_uri_bytes() -> SizeText {
    SizeText("8KiB".into())
}
fn default_body_timeout() -> DurationText {
    "30s".into()
}
fn default_max_body_bytes() -> SizeText {
    SizeText("10MiB".into())
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            header_timeout: default_header_timeout(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            max_uri_bytes: default_max_uri_bytes(),
            body_timeout: default_body_timeout(),
            max_body_bytes: default_max_body_bytes(),
        }
    }
}

/// Header edits, applied in the order remove, set, add.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOpsSpec {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}
