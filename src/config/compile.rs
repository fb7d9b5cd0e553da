//! Validation and compilation: [`FileConfig`] to [`Snapshot`].
//!
//! All checking happens here, once per load, so the request path can trust
//! what it is given. Errors are collected, never returned at the first one.

use super::access::{
    compile_access, compile_api_keys, compile_cors, compile_jwt_providers, identity_headers,
    Authenticators,
};
use super::file::{AccessLogSpec, CircuitBreakerSpec, LimitsSpec, SizeText};
use super::file::{Balance as BalanceSpec, HealthCheckSpec, ServerSection as ServerSpec};
use super::file::{DurationText, FileConfig, HeaderOpsSpec, RouteSpec, UpstreamSpec};
use super::file::{ListenSpec, TargetSpec, TlsSpec, UpstreamTlsSpec};
use super::limits::{
    ceiling, compile_consumer_rates, compile_rate_limit, compile_redis, compile_route_inflight,
};
use super::values::{
    parse_duration, parse_listen_address, parse_percent, parse_size, resolve_target,
};
use super::{ConfigError, ConfigErrors};
use crate::auth::ip::{Cidr, TrustedProxies};
use crate::downstream::head::MAX_HEADERS;
use crate::downstream::tls::{Certificate, CertificateSet};
use crate::downstream::Limits;
use crate::explain::RoutePattern;
use crate::observe::access_log::{AccessLog, Destination, Queue};
use crate::observe::metrics::RouteMetrics;
use crate::router::{
    expand_methods, normalize_path, HeaderOps, HostPattern, PathPattern, Route, RouteIndexBuilder,
    RoutePolicy,
};
use crate::snapshot::{Draws, Pools, Snapshot};
use crate::snapshot::{Listener, TlsListener, TlsVersion};
use crate::upstream::breaker::{Breaker, BreakerSettings, StatusSet};
use crate::upstream::health::{HealthProbe, HealthSettings, TICK};
use crate::upstream::transport::{load_ca, load_client, Transport, UpstreamTls};
use crate::upstream::{Balance, Cluster, HashKey, RetryOn, Timeouts};
use http::{HeaderName, HeaderValue, Method};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Weights expand into a selection table, so they are kept small.
const MAX_WEIGHT: u32 = 1000;
/// Pingora's weighted selection indexes targets with a u16.
const MAX_TARGETS: usize = 10_000;
/// Each retry is another connect; more than this only lengthens an outage.
const MAX_RETRIES: u32 = 10;
/// The sum of an upstream's weights sizes its selection table; a consistent
/// hash ring holds 160 points per unit of weight.
const MAX_TOTAL_WEIGHT: u64 = 100_000;
const MAX_HASH_RING_WEIGHT: u64 = 10_000;
/// Beyond these the server cannot start or run (thread spawn failures,
/// timer overflow on every connection), so `-t` refuses them.
const MAX_THREADS: u64 = 1024;
const MAX_LISTENER_TASKS: u64 = 64;
const MAX_POOL_SIZE: u64 = 1_000_000;
const MAX_SERVER_SECONDS: u64 = 86_400;

/// Headers that frame the message; editing them would desynchronize the
/// client, the gateway and the upstream about where a message ends.
pub(super) const FRAMING_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// A compiled file: the snapshot to run, the `server:` settings (read
/// only at start), and the state it drew from the pools, to commit once
/// the snapshot runs.
pub struct Compiled {
    pub snapshot: Snapshot,
    pub server: ServerSpec,
    pub draws: Draws,
}

/// Collects errors under key paths.
#[derive(Default)]
pub(super) struct Errors(pub(super) Vec<ConfigError>);

impl Errors {
    pub(super) fn add(&mut self, location: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(location, message));
    }
}

/// Validates everything and builds the snapshot. `previous` is the running
/// snapshot, whose unchanged upstreams (and their load state) are reused;
/// state that outlives snapshots is drawn from `pools`; files the config
/// names (keys) are relative to `base`, the config file's directory.
/// `parse_errors` come first in the report; with any of them the result is
/// an error, but the rest of the file is still checked.
pub fn compile(
    file: FileConfig,
    parse_errors: Vec<ConfigError>,
    previous: Option<&Snapshot>,
    pools: &Pools,
    base: &Path,
) -> Result<Compiled, ConfigErrors> {
    let mut errors = Errors(parse_errors);
    let mut draws = Draws::default();

    let listeners = compile_listen(&file, base, &mut errors);
    let listen: Vec<SocketAddr> = listeners.iter().map(|l| l.addr).collect();
    // Where `https_redirect` sends plain-HTTP requests: the first TLS
    // listener.
    let https_port = listeners
        .iter()
        .find(|l| l.tls.is_some())
        .map(|l| l.addr.port());
    let admin = file
        .admin
        .as_ref()
        .and_then(|a| match parse_admin_address(a.address()) {
            Ok(addr) if listen.contains(&addr) => {
                errors.add("admin", format!("{addr} is also a data listener"));
                None
            }
            Ok(addr) => Some(addr),
            Err(e) => {
                errors.add("admin", e);
                None
            }
        });
    let readyz_requires: Vec<String> = file
        .admin
        .as_ref()
        .map(|a| a.readyz_requires().to_vec())
        .unwrap_or_default();
    for (i, name) in readyz_requires.iter().enumerate() {
        if !file.upstreams.contains_key(name) && !file.unparsed_upstreams.contains(name) {
            errors.add(
                format!("admin.readyz_requires[{i}]"),
                format!("no upstream named {name:?}"),
            );
        }
    }
    check_server(&file.server, &mut errors);
    let limits = compile_limits(&file.limits, &mut errors);
    let mut trusted_proxies = TrustedProxies::default();
    for (i, text) in file.trusted_proxies.iter().enumerate() {
        match Cidr::parse(text) {
            Ok(c) => trusted_proxies.0.push(c),
            Err(e) => errors.add(format!("trusted_proxies[{i}]"), e),
        }
    }
    let jwt = compile_jwt_providers(&file, base, pools, &mut draws, &mut errors);
    let consumer_rates = compile_consumer_rates(&file, &mut errors);
    let redis = compile_redis(&file, pools, &mut draws, &mut errors);
    let access_log = compile_access_log(&file, base, pools, &mut draws, &mut errors);
    let slow_request_threshold = file
        .slow_request_threshold
        .as_ref()
        .and_then(|d| duration_at(&mut errors, "slow_request_threshold".into(), d));
    let auth = Authenticators {
        api_keys: compile_api_keys(&file, &mut errors),
        identity_headers: identity_headers(&jwt),
        jwt,
    };

    let mut clusters = Vec::new();
    for (name, spec) in &file.upstreams {
        let prev = previous.and_then(|p| p.cluster(name));
        if let Some(cluster) =
            compile_upstream(name, spec, prev, (pools, base), &mut draws, &mut errors)
        {
            clusters.push(cluster);
        }
    }
    let upstream_positions: BTreeMap<&str, usize> = file
        .upstreams
        .keys()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();

    let mut routes = Vec::new();
    let mut index = RouteIndexBuilder::default();
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, spec) in file.routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        if spec.https_redirect && https_port.is_none() && !listeners.is_empty() {
            errors.add(
                format!("{at}.https_redirect"),
                "no TLS listener to redirect to; add one under listen",
            );
        }
        if spec.name.is_empty() {
            errors.add(format!("{at}.name"), "must not be empty");
        } else if let Some(first) = names.insert(spec.name.as_str(), i) {
            errors.add(
                format!("{at}.name"),
                format!(
                    "duplicate route name {:?} (also routes[{first}])",
                    spec.name
                ),
            );
        }
        let Some(keys) = compile_route_keys(&at, spec, &mut errors) else {
            continue;
        };
        let upstream = match upstream_positions.get(spec.upstream.as_str()) {
            Some(&pos) => pos,
            None => {
                if !file.unparsed_upstreams.contains(&spec.upstream) {
                    errors.add(
                        format!("{at}.upstream"),
                        format!("no upstream named {:?}", spec.upstream),
                    );
                }
                continue;
            }
        };
        // Every host is checked before any is inserted: a conflict on a
        // later host must not leave the earlier ones in the index.
        let conflict = keys
            .hosts
            .iter()
            .find_map(|host| index.conflict(host, &keys.path, keys.methods.as_deref()));
        if let Some(conflict) = conflict {
            let other = routes
                .get(conflict.existing)
                .map_or("(unknown)", |r: &Arc<Route>| r.name.as_str());
            errors.add(
                &at,
                format!(
                    "takes the same host, path and method as route {other:?}; one of them would never be used"
                ),
            );
            continue;
        }
        let route_number = routes.len();
        for host in &keys.hosts {
            // Cannot conflict: checked above, and a route's hosts are distinct.
            let _ = index.insert(host, &keys.path, keys.methods.as_deref(), route_number);
        }
        let request_headers = compile_header_ops(
            &format!("{at}.request_headers"),
            &spec.request_headers,
            &mut errors,
        );
        let response_headers = compile_header_ops(
            &format!("{at}.response_headers"),
            &spec.response_headers,
            &mut errors,
        );
        let max_body_bytes = match &spec.max_body_bytes {
            Some(size) => size_at(&mut errors, format!("{at}.max_body_bytes"), size),
            None => limits.map(|l| l.max_body_bytes),
        };
        let timeout = spec
            .timeout
            .as_ref()
            .and_then(|t| duration_at(&mut errors, format!("{at}.timeout"), t));
        let websocket_idle_timeout = spec
            .websocket_idle_timeout
            .as_ref()
            .and_then(|t| duration_at(&mut errors, format!("{at}.websocket_idle_timeout"), t))
            .unwrap_or(crate::router::DEFAULT_WEBSOCKET_IDLE);
        let access = compile_access(&at, spec, &file, &auth, &mut errors);
        let (max_inflight, per_client) =
            compile_route_inflight(&at, spec, pools, &mut draws, &mut errors);
        let rate_limit = spec.rate_limit.as_ref().and_then(|r| {
            compile_rate_limit(
                &at,
                spec,
                r,
                &consumer_rates,
                redis.as_ref(),
                pools,
                &mut draws,
                &mut errors,
            )
        });
        let cors = spec.cors.as_ref().and_then(|c| {
            compile_cors(
                &format!("{at}.cors"),
                c,
                keys.methods.as_deref(),
                &mut errors,
            )
        });
        routes.push(Arc::new(Route {
            policy: RoutePolicy {
                timeout,
                max_body_bytes: max_body_bytes.unwrap_or(u64::MAX),
                websocket: spec.websocket,
                websocket_idle_timeout,
                https_redirect: spec.https_redirect.then_some(https_port).flatten(),
                access,
                cors,
                identity_headers: Arc::clone(&auth.identity_headers),
                rate_limit,
                max_inflight,
                per_client,
            },
            metrics: RouteMetrics::new(&spec.name),
            log_names: crate::observe::access_log::route_fields(&spec.name, &spec.upstream),
            pattern: RoutePattern {
                hosts: keys.hosts.clone(),
                path: keys.path.clone(),
                methods: keys.methods.clone(),
            },
            name: spec.name.clone(),
            upstream,
            strip_prefix: match (&keys.path, spec.strip_prefix) {
                (PathPattern::Prefix(p), true) => Some(p.len()),
                _ => None,
            },
            strip_segments: match &keys.path {
                PathPattern::Prefix(p) if p != "/" => p.matches('/').count(),
                _ => 0,
            },
            request_headers,
            response_headers,
        }));
    }

    if !errors.0.is_empty() {
        return Err(ConfigErrors(errors.0));
    }
    let Some(limits) = limits else {
        return Err(ConfigErrors(errors.0));
    };
    let snapshot = Snapshot {
        limits,
        trust_request_id: file.trust_request_id.unwrap_or(true),
        trusted_proxies,
        index: index.build(),
        routes,
        clusters,
        listen,
        listeners,
        admin,
        readyz_requires,
        jwt: auth.jwt.values().cloned().collect(),
        redis,
        access_log,
        slow_request_threshold,
    };
    Ok(Compiled {
        snapshot,
        server: file.server,
        draws,
    })
}

/// Bounds on `server:` values that `-t` must refuse because the server
/// could not run with them (a panic per connection, a hang at start, a
/// listener that accepts nothing).
fn check_server(server: &ServerSpec, errors: &mut Errors) {
    if let Some(d) = &server.drain_idle_timeout {
        match parse_duration(&d.0) {
            Ok(d) if d > Duration::from_secs(MAX_SERVER_SECONDS) => {
                errors.add("server.drain_idle_timeout", "must be at most 24h")
            }
            Ok(_) => {}
            Err(e) => errors.add("server.drain_idle_timeout", e),
        }
    }
    if server.keepalive_request_limit == Some(0) {
        errors.add(
            "server.keepalive_request_limit",
            "must be at least 1 (keepalive_timeout_seconds: 0 turns keepalive off)",
        );
    }
    let mut bounded = |key: &str, value: Option<u64>, low: u64, high: u64, why: &str| {
        if let Some(v) = value.filter(|v| !(low..=high).contains(v)) {
            errors.add(
                format!("server.{key}"),
                format!("{v} is out of range: must be between {low} and {high}{why}"),
            );
        }
    };
    let as_u64 = |v: Option<usize>| v.map(|v| v as u64);
    bounded("threads", as_u64(server.threads), 1, MAX_THREADS, "");
    bounded(
        "listener_tasks_per_fd",
        as_u64(server.listener_tasks_per_fd),
        1,
        MAX_LISTENER_TASKS,
        "",
    );
    bounded(
        "upstream_keepalive_pool_size",
        as_u64(server.upstream_keepalive_pool_size),
        0,
        MAX_POOL_SIZE,
        "",
    );
    bounded(
        "keepalive_timeout_seconds",
        server.keepalive_timeout_seconds,
        0,
        MAX_SERVER_SECONDS,
        " (0 turns keepalive off)",
    );
    bounded(
        "grace_period_seconds",
        server.grace_period_seconds,
        0,
        MAX_SERVER_SECONDS,
        "",
    );
    bounded(
        "graceful_shutdown_timeout_seconds",
        server.graceful_shutdown_timeout_seconds,
        0,
        MAX_SERVER_SECONDS,
        "",
    );
}

/// Largest head Pingora's parser accepts after tollgate's own check.
const MAX_HEADER_BYTES: u64 = 1 << 20;

fn size_at(errors: &mut Errors, at: String, text: &SizeText) -> Option<u64> {
    match parse_size(&text.0) {
        Ok(n) => Some(n),
        Err(e) => {
            errors.add(at, e);
            None
        }
    }
}

fn compile_limits(spec: &LimitsSpec, errors: &mut Errors) -> Option<Limits> {
    let before = errors.0.len();
    let header_timeout = duration_at(errors, "limits.header_timeout".into(), &spec.header_timeout);
    let body_timeout = duration_at(errors, "limits.body_timeout".into(), &spec.body_timeout);
    let max_header_bytes = size_at(
        errors,
        "limits.max_header_bytes".into(),
        &spec.max_header_bytes,
    );
    let max_uri_bytes = size_at(errors, "limits.max_uri_bytes".into(), &spec.max_uri_bytes);
    let max_body_bytes = size_at(errors, "limits.max_body_bytes".into(), &spec.max_body_bytes);
    if max_header_bytes.is_some_and(|n| !(1024..=MAX_HEADER_BYTES).contains(&n)) {
        errors.add(
            "limits.max_header_bytes",
            format!("must be between 1KiB and {}KiB", MAX_HEADER_BYTES >> 10),
        );
    }
    // One below Pingora's own limit: an absolute-form request without Host
    // is forwarded with one added.
    if !(1..MAX_HEADERS).contains(&spec.max_headers) {
        errors.add(
            "limits.max_headers",
            format!("must be between 1 and {}", MAX_HEADERS - 1),
        );
    }
    if let (Some(uri), Some(head)) = (max_uri_bytes, max_header_bytes) {
        if uri == 0 || uri >= head {
            errors.add(
                "limits.max_uri_bytes",
                "must be at least 1B and less than limits.max_header_bytes",
            );
        }
    }
    if errors.0.len() > before {
        return None;
    }
    Some(Limits {
        header_timeout: header_timeout?,
        max_header_bytes: usize::try_from(max_header_bytes?).ok()?,
        max_headers: spec.max_headers,
        max_uri_bytes: usize::try_from(max_uri_bytes?).ok()?,
        body_timeout: body_timeout?,
        max_body_bytes: max_body_bytes?,
    })
}

fn compile_listen(file: &FileConfig, base: &Path, errors: &mut Errors) -> Vec<Listener> {
    if file.listen.is_empty() {
        errors.add("listen", "at least one listen address is required");
    }
    let mut listeners: Vec<Listener> = Vec::new();
    for (i, spec) in file.listen.iter().enumerate() {
        let at = format!("listen[{i}]");
        let addr = match parse_listen_address(spec.address()) {
            Ok(addr) if listeners.iter().any(|l| l.addr == addr) => {
                errors.add(at, format!("duplicate address {addr}"));
                continue;
            }
            Ok(addr) => addr,
            Err(e) => {
                errors.add(at, e);
                continue;
            }
        };
        let (tls, h2c) = match spec {
            ListenSpec::Address(_) => (None, false),
            ListenSpec::Detailed(d) => {
                let tls = d
                    .tls
                    .as_ref()
                    .and_then(|t| compile_tls(t, base, &format!("{at}.tls"), errors));
                if d.h2c && d.tls.is_some() {
                    errors.add(
                        format!("{at}.h2c"),
                        "h2c is HTTP/2 without TLS; a TLS listener offers h2 by ALPN",
                    );
                }
                (tls, d.h2c)
            }
        };
        listeners.push(Listener { addr, tls, h2c });
    }
    listeners
}

fn compile_tls(spec: &TlsSpec, base: &Path, at: &str, errors: &mut Errors) -> Option<TlsListener> {
    let before = errors.0.len();
    if spec.certificates.is_empty() {
        errors.add(
            format!("{at}.certificates"),
            "at least one certificate is required",
        );
    }
    let mut certificates = Vec::new();
    for (i, c) in spec.certificates.iter().enumerate() {
        let path = |p: &str| base.join(p).display().to_string();
        match Certificate::load(&path(&c.cert), &path(&c.key)) {
            Ok((cert, warning)) => {
                if let Some(warning) = warning {
                    log::warn!("{at}.certificates[{i}]: {warning}");
                }
                certificates.push(cert);
            }
            Err(e) => errors.add(format!("{at}.certificates[{i}]"), e),
        }
    }
    let min_version = match spec.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::V1_2,
        Some("1.3") => TlsVersion::V1_3,
        Some(other) => {
            errors.add(
                format!("{at}.min_version"),
                format!("{other:?} is not a TLS version tollgate accepts: \"1.2\" or \"1.3\""),
            );
            TlsVersion::V1_2
        }
    };
    let (mut h2, mut http1) = (true, true);
    if let Some(alpn) = &spec.alpn {
        h2 = false;
        http1 = false;
        for (i, p) in alpn.iter().enumerate() {
            match p.as_str() {
                "h2" => h2 = true,
                "http/1.1" => http1 = true,
                other => errors.add(
                    format!("{at}.alpn[{i}]"),
                    format!("{other:?} is not a protocol tollgate serves: h2 or http/1.1"),
                ),
            }
        }
        if !h2 && !http1 {
            errors.add(format!("{at}.alpn"), "name h2, http/1.1 or both");
        }
    }
    (errors.0.len() == before).then(|| TlsListener {
        certificates: Arc::new(CertificateSet::new(certificates)),
        min_version,
        h2,
        http1,
    })
}

pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) fn duration_at(
    errors: &mut Errors,
    at: String,
    text: &DurationText,
) -> Option<Duration> {
    match parse_duration(&text.0) {
        Ok(d) if d.is_zero() => {
            errors.add(at, "must be greater than zero");
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errors.add(at, e);
            None
        }
    }
}

fn compile_upstream(
    name: &str,
    spec: &UpstreamSpec,
    previous: Option<&Arc<Cluster>>,
    (pools, base): (&Pools, &Path),
    draws: &mut Draws,
    errors: &mut Errors,
) -> Option<Arc<Cluster>> {
    let balance = match spec.balance {
        BalanceSpec::RoundRobin => Balance::RoundRobin,
        BalanceSpec::Random => Balance::Random,
        BalanceSpec::ConsistentHash => Balance::ConsistentHash,
        BalanceSpec::LeastConn => Balance::LeastConn,
    };
    let at = format!("upstreams.{name}");
    let before = errors.0.len();
    if !valid_name(name) {
        errors.add(
            &at,
            "upstream names use only letters, digits, '-', '_' and '.'",
        );
    }

    if spec.targets.is_empty() {
        errors.add(format!("{at}.targets"), "at least one target is required");
    }
    let mut targets: Vec<(SocketAddr, u32)> = Vec::new();
    for (i, target) in spec.targets.iter().enumerate() {
        let t_at = format!("{at}.targets[{i}]");
        let weight = target.weight();
        if !(1..=MAX_WEIGHT).contains(&weight) {
            errors.add(
                format!("{t_at}.weight"),
                format!("must be between 1 and {MAX_WEIGHT}"),
            );
        }
        match resolve_target(target.address()) {
            Ok(addrs) => {
                for addr in addrs {
                    if targets.iter().any(|(a, _)| *a == addr) {
                        errors.add(&t_at, format!("duplicate target {addr}"));
                    } else {
                        targets.push((addr, weight));
                    }
                }
            }
            Err(e) => errors.add(&t_at, e),
        }
    }
    let total_weight: u64 = targets.iter().map(|(_, w)| u64::from(*w)).sum();
    let weight_bound = if balance == Balance::ConsistentHash {
        MAX_HASH_RING_WEIGHT
    } else {
        MAX_TOTAL_WEIGHT
    };
    if total_weight > weight_bound {
        errors.add(
            format!("{at}.targets"),
            format!("the weights add up to {total_weight}; at most {weight_bound} for this balance mode"),
        );
    }
    if targets.len() > MAX_TARGETS {
        errors.add(
            format!("{at}.targets"),
            format!("at most {MAX_TARGETS} targets"),
        );
    }

    let hash_key = match (&spec.hash_key, balance) {
        (None, _) => HashKey::ClientIp,
        (Some(key), Balance::ConsistentHash) => match key.as_str() {
            "client_ip" => HashKey::ClientIp,
            "path" => HashKey::Path,
            other => match other
                .strip_prefix("header:")
                .map(|h| HeaderName::from_bytes(h.as_bytes()))
            {
                Some(Ok(h)) => HashKey::Header(h),
                Some(Err(_)) => {
                    errors.add(
                        format!("{at}.hash_key"),
                        format!("{other:?} does not name a valid header"),
                    );
                    HashKey::ClientIp
                }
                None => {
                    errors.add(
                        format!("{at}.hash_key"),
                        format!("{other:?} is not one of client_ip, path, header:<name>"),
                    );
                    HashKey::ClientIp
                }
            },
        },
        (Some(_), _) => {
            errors.add(
                format!("{at}.hash_key"),
                "only applies to balance: consistent_hash",
            );
            HashKey::ClientIp
        }
    };

    let t = &spec.timeouts;
    let connect = duration_at(errors, format!("{at}.timeouts.connect"), &t.connect);
    let read = duration_at(errors, format!("{at}.timeouts.read"), &t.read);
    let write = duration_at(errors, format!("{at}.timeouts.write"), &t.write);
    let idle = duration_at(errors, format!("{at}.timeouts.idle"), &t.idle);

    if spec.retries > MAX_RETRIES {
        errors.add(format!("{at}.retries"), format!("at most {MAX_RETRIES}"));
    }
    let retry_on = match &spec.retry_on {
        None => RetryOn::default(),
        Some(list) => {
            let mut on = RetryOn {
                connect_failure: false,
                reset: false,
                timeout: false,
            };
            for (i, kind) in list.iter().enumerate() {
                match kind.as_str() {
                    "connect_failure" => on.connect_failure = true,
                    "reset" => on.reset = true,
                    "timeout" => on.timeout = true,
                    other => errors.add(
                        format!("{at}.retry_on[{i}]"),
                        format!("{other:?} is not one of connect_failure, reset, timeout"),
                    ),
                }
            }
            on
        }
    };

    let transport = compile_transport(spec, base, &at, errors).unwrap_or_default();

    let mut settings = None;
    if let (Some(hc), Some(tls)) = (&spec.health_check, &transport.tls) {
        // A TCP check over TLS is a handshake on a peer that carries no
        // client certificate, and no TLS at all without a name.
        if hc.http_path.is_none() && (tls.client.is_some() || tls.sni.is_empty()) {
            errors.add(
                format!("{at}.health_check.http_path"),
                "a TLS upstream with a client certificate, or without sni, needs an HTTP health check (http_path)",
            );
        }
    }
    if let Some(hc) = &spec.health_check {
        let h_at = format!("{at}.health_check");
        let interval = duration_at(errors, format!("{h_at}.interval"), &hc.interval);
        if interval.is_some_and(|i| i < TICK) {
            errors.add(
                format!("{h_at}.interval"),
                format!("must be at least {}ms", TICK.as_millis()),
            );
        }
        if hc.healthy_after == 0 {
            errors.add(format!("{h_at}.healthy_after"), "must be at least 1");
        }
        if hc.unhealthy_after == 0 {
            errors.add(format!("{h_at}.unhealthy_after"), "must be at least 1");
        }
        if let Some(path) = &hc.http_path {
            if normalize_path(path).is_err() {
                errors.add(
                    format!("{h_at}.http_path"),
                    format!("{path:?} is not an absolute, clean path"),
                );
            }
        }
        if let (Some(interval), Some(connect)) = (interval, connect) {
            settings = Some(health_settings(hc, interval, connect, transport.clone()));
        }
    }

    if errors.0.len() > before {
        return None;
    }
    let (Some(connect), Some(read), Some(write), Some(idle)) = (connect, read, write, idle) else {
        return None;
    };
    let timeouts = Timeouts {
        connect,
        read,
        write,
        idle,
    };
    let probe = match settings.map(|s| {
        pools.health.draw(&mut draws.health, name, &s, || {
            HealthProbe::new(name, s.clone())
        })
    }) {
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            errors.add(format!("{at}.health_check"), e);
            return None;
        }
        None => None,
    };

    let max_inflight = spec.max_inflight.and_then(|max| {
        ceiling(
            &format!("{at}.max_inflight"),
            &format!("upstream:{name}"),
            max,
            pools,
            draws,
            errors,
        )
    });
    let breakers = match &spec.circuit_breaker {
        Some(b) => {
            let settings = breaker_settings(&format!("{at}.circuit_breaker"), b, errors);
            targets
                .iter()
                .filter_map(|(addr, _)| {
                    pools
                        .breakers
                        .draw::<()>(
                            &mut draws.breakers,
                            &format!("{name}/{addr}"),
                            &settings,
                            || Ok(Breaker::new(settings.clone())),
                        )
                        .ok()
                })
                .collect()
        }
        None => Vec::new(),
    };
    if errors.0.len() > before {
        return None;
    }

    // An upstream that did not change keeps its cluster object, and with it
    // its round-robin position, load counters and health state.
    if let Some(prev) = previous {
        let same_targets = prev.targets.len() == targets.len()
            && prev
                .targets
                .iter()
                .zip(&targets)
                .all(|(p, (a, w))| p.addr == *a && p.weight == *w);
        let same_probe = match (&prev.health, &probe) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        let same_breakers =
            prev.targets
                .iter()
                .enumerate()
                .all(|(i, t)| match (&t.breaker, breakers.get(i)) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                });
        if same_targets
            && same_probe
            && same_breakers
            && prev.max_inflight == max_inflight
            && prev.balance == balance
            && prev.hash_key == hash_key
            && prev.timeouts == timeouts
            && prev.transport == transport
            && prev.retries == spec.retries
            && prev.retry_on == retry_on
        {
            return Some(Arc::clone(prev));
        }
    }
    let mut cluster = Cluster::new(
        name.to_owned(),
        balance,
        targets,
        hash_key,
        timeouts,
        spec.retries,
        retry_on,
        probe,
        previous.map(|p| p.as_ref()),
    );
    cluster.max_inflight = max_inflight;
    cluster.transport = transport;
    cluster.set_breakers(breakers);
    Some(Arc::new(cluster))
}

/// The admin listener's address. A bare port (`:9901`) binds the loopback
/// address: the admin endpoints are for the node's operators, not the
/// network.
fn parse_admin_address(text: &str) -> Result<SocketAddr, String> {
    match text.strip_prefix(':') {
        Some(port) if port.parse::<u16>().is_ok() => {
            parse_listen_address(&format!("127.0.0.1:{port}"))
        }
        _ => parse_listen_address(text).map_err(|e| format!("{e} (or :PORT for 127.0.0.1:PORT)")),
    }
}

/// `access_log`: its writer, pooled by destination so a reload that keeps
/// it keeps the thread and the open file.
fn compile_access_log(
    file: &FileConfig,
    base: &Path,
    pools: &Pools,
    draws: &mut Draws,
    errors: &mut Errors,
) -> Option<Arc<AccessLog>> {
    let settings = match file.access_log.as_ref()? {
        AccessLogSpec::Word(w) if w == "off" => return None,
        AccessLogSpec::Word(w) if w == "stdout" => (Destination::Stdout, Queue::default()),
        AccessLogSpec::Word(w) => {
            errors.add(
                "access_log",
                format!("{w:?}: use off, stdout, or {{ path: FILE }}"),
            );
            return None;
        }
        AccessLogSpec::File {
            path,
            queue_lines,
            queue_bytes,
        } => {
            let defaults = Queue::default();
            let lines = queue_lines.unwrap_or(defaults.lines);
            if lines == 0 {
                errors.add("access_log.queue_lines", "must be at least 1");
                return None;
            }
            let bytes = match queue_bytes {
                None => defaults.bytes,
                Some(text) => {
                    let bytes = size_at(errors, "access_log.queue_bytes".into(), text)?;
                    match usize::try_from(bytes) {
                        Ok(bytes) if bytes >= Queue::MIN_BYTES => bytes,
                        _ => {
                            errors.add(
                                "access_log.queue_bytes",
                                "must be at least 64KiB (a line longer than the queue is never written)",
                            );
                            return None;
                        }
                    }
                }
            };
            (Destination::File(base.join(path)), Queue { lines, bytes })
        }
    };
    pools
        .access_log
        .draw(&mut draws.access_log, "access_log", &settings, || {
            AccessLog::open(settings.0.clone(), settings.1)
        })
        .map_err(|e| errors.add("access_log", e))
        .ok()
}

/// An upstream's breaker settings, defaults filled in.
fn breaker_settings(at: &str, spec: &CircuitBreakerSpec, errors: &mut Errors) -> BreakerSettings {
    let defaults = BreakerSettings::default();
    let window = spec
        .window
        .as_ref()
        .and_then(|d| duration_at(errors, format!("{at}.window"), d))
        .unwrap_or(defaults.window);
    let open_for = spec
        .open_for
        .as_ref()
        .and_then(|d| duration_at(errors, format!("{at}.open_for"), d))
        .unwrap_or(defaults.open_for);
    let error_percent = spec.error_percent.unwrap_or(defaults.error_percent);
    if !(1..=100).contains(&error_percent) {
        errors.add(format!("{at}.error_percent"), "must be 1 to 100");
    }
    let min_requests = spec.min_requests.unwrap_or(defaults.min_requests);
    if min_requests == 0 {
        errors.add(format!("{at}.min_requests"), "must be at least 1");
    }
    let half_open_probes = spec.half_open_probes.unwrap_or(defaults.half_open_probes);
    if half_open_probes == 0 {
        errors.add(format!("{at}.half_open_probes"), "must be at least 1");
    }
    let failure_statuses = match &spec.failure_statuses {
        None => defaults.failure_statuses,
        Some(list) => list
            .iter()
            .enumerate()
            .fold(StatusSet::EMPTY, |set, (i, &status)| {
                match u16::try_from(status) {
                    Ok(status) if (100..=599).contains(&status) => set.with(status),
                    _ => {
                        errors.add(
                            format!("{at}.failure_statuses[{i}]"),
                            format!("{status} is not a status from 100 to 599"),
                        );
                        set
                    }
                }
            }),
    };
    let max_open_share = match &spec.max_open_share {
        None => defaults.max_open_share,
        Some(text) => match parse_percent(&text.0) {
            Ok(0) => {
                errors.add(
                    format!("{at}.max_open_share"),
                    "must be more than 0% (100% lets every target open)",
                );
                defaults.max_open_share
            }
            Ok(share) => share,
            Err(e) => {
                errors.add(format!("{at}.max_open_share"), e);
                defaults.max_open_share
            }
        },
    };
    BreakerSettings {
        window,
        min_requests,
        error_percent,
        open_for,
        half_open_probes,
        failure_statuses,
        max_open_share,
    }
}

/// The probe settings for a `health_check` section.
fn health_settings(
    spec: &HealthCheckSpec,
    interval: Duration,
    connect: Duration,
    transport: Transport,
) -> HealthSettings {
    HealthSettings {
        http_path: spec.http_path.clone(),
        interval,
        healthy_after: spec.healthy_after,
        unhealthy_after: spec.unhealthy_after,
        connect_timeout: connect,
        transport,
    }
}

/// An upstream's `protocol` and `tls`: files read and checked now, so a
/// request only clones handles.
fn compile_transport(
    spec: &UpstreamSpec,
    base: &Path,
    at: &str,
    errors: &mut Errors,
) -> Option<Transport> {
    let before = errors.0.len();
    let protocol = spec.protocol.as_deref().unwrap_or("h1");
    let h2 = match protocol {
        "h1" => false,
        "h2" | "h2c" => true,
        other => {
            errors.add(
                format!("{at}.protocol"),
                format!("{other:?} is not h1, h2 or h2c"),
            );
            false
        }
    };
    let tls_spec = match (protocol, &spec.tls) {
        ("h2c", Some(_)) => {
            errors.add(
                format!("{at}.tls"),
                "h2c is HTTP/2 without TLS; use protocol: h2 for HTTP/2 over TLS",
            );
            None
        }
        // HTTP/2 to an upstream is negotiated by TLS's ALPN.
        ("h2", None) => Some(UpstreamTlsSpec {
            sni: None,
            verify: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
        }),
        (_, tls) => tls.clone(),
    };
    let mut key = format!("protocol={protocol}");
    let tls = tls_spec.map(|t| {
        let t_at = format!("{at}.tls");
        let verify = t.verify.unwrap_or(true);
        // The name to send and verify: given, or the targets' one host name.
        // An empty name would turn verification off (Pingora verifies
        // nothing without SNI): it counts as no name.
        let sni = t.sni.clone().filter(|s| !s.is_empty()).or_else(|| {
            let hosts: std::collections::BTreeSet<&str> = spec
                .targets
                .iter()
                .filter_map(|target| {
                    let address = match target {
                        TargetSpec::Address(a) => a.as_str(),
                        TargetSpec::Weighted(w) => w.address.as_str(),
                    };
                    address.rsplit_once(':').map(|(host, _)| host)
                })
                .collect();
            match hosts.into_iter().collect::<Vec<_>>()[..] {
                [host] if host.parse::<std::net::IpAddr>().is_err() && !host.starts_with('[') => {
                    Some(host.to_owned())
                }
                _ => None,
            }
        });
        // Pingora sends no SNI and verifies nothing for an empty name.
        if verify && sni.is_none() {
            errors.add(
                format!("{t_at}.sni"),
                "verifying a certificate needs the name to verify: set sni (the targets are addresses, or several names)",
            );
        }
        let path = |p: &str| base.join(p).display().to_string();
        let mut digest = Sha256::new();
        let ca = t.ca_file.as_deref().and_then(|f| {
            let file = path(f);
            load_ca(&file, &mut |bytes| digest.update(bytes))
                .map_err(|e| errors.add(format!("{t_at}.ca_file"), e))
                .ok()
        });
        let client = match (&t.client_cert, &t.client_key) {
            (Some(cert), Some(key)) => {
                let (cert, key) = (path(cert), path(key));
                load_client(&cert, &key, &mut |bytes| digest.update(bytes))
                    .map_err(|e| errors.add(format!("{t_at}.client_cert"), e))
                    .ok()
            }
            (None, None) => None,
            _ => {
                errors.add(t_at.clone(), "client_cert and client_key go together");
                None
            }
        };
        let sni = sni.unwrap_or_default();
        key.push_str(&format!(
            " tls sni={sni} verify={verify} files={:x}",
            digest.finalize()
        ));
        Arc::new(UpstreamTls {
            sni,
            verify,
            ca: ca.map(Arc::new),
            client: client.map(Arc::new),
        })
    });
    (errors.0.len() == before).then(|| Transport::new(tls, h2, key))
}

/// The index keys of one route: its host patterns, path pattern and methods.
struct RouteKeys {
    hosts: Vec<HostPattern>,
    path: PathPattern,
    methods: Option<Vec<Method>>,
}

fn compile_route_keys(at: &str, spec: &RouteSpec, errors: &mut Errors) -> Option<RouteKeys> {
    let before = errors.0.len();
    let path = match (&spec.path, &spec.path_prefix) {
        (Some(p), None) => compile_path(&format!("{at}.path"), p, errors).map(PathPattern::Exact),
        (None, Some(p)) => compile_path(&format!("{at}.path_prefix"), p, errors).map(|p| {
            let trimmed = p.trim_end_matches('/');
            PathPattern::Prefix(if trimmed.is_empty() {
                "/".to_owned()
            } else {
                trimmed.to_owned()
            })
        }),
        (Some(_), Some(_)) => {
            errors.add(at, "set either path or path_prefix, not both");
            None
        }
        (None, None) => {
            errors.add(at, "one of path or path_prefix is required");
            None
        }
    };
    if spec.strip_prefix && spec.path_prefix.is_none() {
        errors.add(
            format!("{at}.strip_prefix"),
            "only applies to a path_prefix route",
        );
    }

    let hosts = match &spec.hosts {
        None => vec![HostPattern::Any],
        Some(list) if list.is_empty() => {
            errors.add(
                format!("{at}.hosts"),
                "must not be empty; leave it out to accept any host",
            );
            Vec::new()
        }
        Some(list) => {
            let mut hosts = Vec::new();
            for (i, h) in list.iter().enumerate() {
                match compile_host(h) {
                    Ok(p) if hosts.contains(&p) => {
                        errors.add(format!("{at}.hosts[{i}]"), format!("duplicate host {h:?}"))
                    }
                    Ok(p) => hosts.push(p),
                    Err(e) => errors.add(format!("{at}.hosts[{i}]"), e),
                }
            }
            hosts
        }
    };

    let methods = match &spec.methods {
        None => None,
        Some(list) if list.is_empty() => {
            errors.add(
                format!("{at}.methods"),
                "must not be empty; leave it out to accept any method",
            );
            None
        }
        Some(list) => {
            let mut methods = Vec::new();
            for (i, m) in list.iter().enumerate() {
                let valid = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
                match Method::from_bytes(m.as_bytes()) {
                    Ok(method) if valid => {
                        if !methods.contains(&method) {
                            methods.push(method);
                        }
                    }
                    _ => errors.add(
                        format!("{at}.methods[{i}]"),
                        format!("{m:?} is not a method; methods are upper-case, like GET"),
                    ),
                }
            }
            Some(expand_methods(methods))
        }
    };

    if errors.0.len() > before {
        return None;
    }
    Some(RouteKeys {
        hosts,
        path: path?,
        methods,
    })
}

/// Config paths must already be in normal form: a route written for a path
/// no request can normalize to would silently never match.
fn compile_path(at: &str, path: &str, errors: &mut Errors) -> Option<String> {
    // A request path never holds these: `?` and `#` end it, a space ends
    // the request target, and non-ASCII arrives percent-encoded.
    if let Some(c) = path
        .chars()
        .find(|c| matches!(c, '?' | '#' | ' ') || !c.is_ascii())
    {
        errors.add(
            at,
            format!("{path:?} contains {c:?}, which no request path can match; percent-encode it"),
        );
        return None;
    }
    match normalize_path(path) {
        Ok(normal) if normal == path => Some(path.to_owned()),
        Ok(normal) => {
            errors.add(
                at,
                format!("{path:?} is not in normal form; write it as {normal:?}"),
            );
            None
        }
        Err(e) => {
            errors.add(at, format!("{path:?}: {e}"));
            None
        }
    }
}

fn compile_host(host: &str) -> Result<HostPattern, String> {
    let lower = host.to_ascii_lowercase();
    let (wildcard, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let valid_label = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let is_ip_literal = !wildcard
        && (name.parse::<std::net::Ipv4Addr>().is_ok()
            || (name.starts_with('[')
                && name.ends_with(']')
                && name[1..name.len() - 1]
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok()));
    if !is_ip_literal && (name.is_empty() || !name.split('.').all(valid_label)) {
        return Err(format!(
            "{host:?} is not a host name; use a name like api.example.com or a wildcard like *.example.org (no port)"
        ));
    }
    Ok(if wildcard {
        HostPattern::Wildcard(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_owned())
    })
}

fn compile_header_ops(at: &str, spec: &HeaderOpsSpec, errors: &mut Errors) -> HeaderOps {
    let mut ops = HeaderOps::default();
    let name_at = |errors: &mut Errors, key: &str, name: &str| -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) if FRAMING_HEADERS.contains(&h.as_str()) => {
                errors.add(
                    format!("{at}.{key}"),
                    format!("{name:?} frames the message and cannot be edited"),
                );
                None
            }
            Ok(h) => Some(h),
            Err(_) => {
                errors.add(
                    format!("{at}.{key}"),
                    format!("{name:?} is not a valid header name"),
                );
                None
            }
        }
    };
    for name in &spec.remove {
        if let Some(h) = name_at(errors, "remove", name) {
            ops.remove.push(h);
        }
    }
    for (key, map, out) in [
        ("set", &spec.set, &mut ops.set),
        ("add", &spec.add, &mut ops.add),
    ] {
        for (name, value) in map {
            let Some(h) = name_at(errors, key, name) else {
                continue;
            };
            match HeaderValue::from_str(value) {
                Ok(v) => out.push((h, v)),
                Err(_) => errors.add(
                    format!("{at}.{key}.{name}"),
                    format!("{value:?} is not a valid header value"),
                ),
            }
        }
    }
    let mut seen = HashSet::new();
    for (h, _) in &ops.set {
        if !seen.insert(h.clone()) {
            errors.add(format!("{at}.set"), format!("header {h} is set twice"));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_partial;

    fn compile_text(text: &str) -> Result<Snapshot, Vec<String>> {
        let (file, parse_errors) = parse_partial(text)
            .map_err(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        compile(file, parse_errors, None, &Pools::default(), Path::new("."))
            .map(|c| c.snapshot)
            .map_err(|e| e.0.iter().map(ToString::to_string).collect())
    }

    const BASE: &str =
        "listen: [\"127.0.0.1:1\"]\nupstreams:\n  users: { targets: [\"127.0.0.1:2\"] }\n";

    #[test]
    fn a_route_naming_a_missing_upstream_is_reported_with_its_path() {
        let text = format!(
            "{BASE}routes:\n  - {{ name: a, path: /a, upstream: users }}\n  - {{ name: b, path: /b, upstream: users }}\n  - {{ name: c, path: /c, upstream: userz }}\n"
        );
        assert_eq!(
            compile_text(&text).unwrap_err(),
            vec![r#"routes[2].upstream: no upstream named "userz""#]
        );
    }

    #[test]
    fn every_error_is_reported_not_just_the_first() {
        let text = r#"
listen: ["nonsense", "127.0.0.1:1"]
upstreams:
  a: { targets: [], timeouts: { connect: 5s0 } }
  c: { targets: ["127.0.0.1:3"], timeouts: { read: 5 } }
  b: { targets: ["127.0.0.1:2", "127.0.0.1:2"], hash_key: path }
routes:
  - { name: r, path_prefix: /x/../y, upstream: a }
  - { name: r, path: /z, upstream: b, methods: [get] }
  - { name: s, path: /z, upstream: b }
  - { name: t, path: /z, upstream: b, hosts: ["bad host"] }
"#;
        let errors = compile_text(text).unwrap_err();
        let expect = [
            "listen[0]:",
            "upstreams.a.targets: at least one target",
            "upstreams.a.timeouts.connect:",
            "upstreams.c.timeouts.read: 5 has no unit",
            "upstreams.b.targets[1]: duplicate target",
            "upstreams.b.hash_key: only applies",
            "routes[0].path_prefix: \"/x/../y\" is not in normal form",
            "routes[1].name: duplicate route name",
            "routes[1].methods[0]:",
            "routes[3].hosts[0]:",
        ];
        for e in expect {
            assert!(
                errors.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {errors:#?}"
            );
        }
    }

    #[test]
    fn two_routes_with_the_same_key_conflict() {
        let text = format!(
            "{BASE}routes:\n  - {{ name: a, path_prefix: /a/, upstream: users }}\n  - {{ name: b, path_prefix: /a, upstream: users }}\n"
        );
        let errors = compile_text(&text).unwrap_err();
        assert!(
            errors[0].starts_with("routes[1]: takes the same host"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_conflict_on_a_later_host_leaves_no_trace() {
        // Route b conflicts with a on its second host; c then shares only
        // b's first host, which must not point at the dropped route b.
        let text = format!(
            "{BASE}routes:\n  - {{ name: a, hosts: [x.test], path: /p, upstream: users }}\n  - {{ name: b, hosts: [y.test, x.test], path: /p, upstream: users }}\n  - {{ name: c, hosts: [y.test], path: /p, upstream: users }}\n"
        );
        let errors = compile_text(&text).unwrap_err();
        assert_eq!(
            errors,
            vec![
                r#"routes[1]: takes the same host, path and method as route "a"; one of them would never be used"#
            ]
        );
    }

    #[test]
    fn values_the_server_cannot_run_with_are_refused() {
        let ring: Vec<String> = (0..11)
            .map(|i| format!("{{ address: \"127.0.0.1:{}\", weight: 1000 }}", 10 + i))
            .collect();
        let text = format!(
            "server: {{ threads: 100000, keepalive_timeout_seconds: 18446744073709551615, listener_tasks_per_fd: 0 }}\nlisten: [\"127.0.0.1:1\"]\nupstreams:\n  users: {{ targets: [\"127.0.0.1:2\"] }}\n  h: {{ balance: consistent_hash, targets: [{}] }}\nroutes:\n  - {{ name: a, path: \"/a?b\", upstream: users }}\n  - {{ name: b, path: \"/caf\u{e9}\", upstream: users }}\n  - {{ name: c, path: \"/a b\", upstream: users }}\n",
            ring.join(", ")
        );
        let errors = compile_text(&text).unwrap_err();
        for expect in [
            "server.threads: 100000 is out of range",
            "server.listener_tasks_per_fd: 0 is out of range",
            "server.keepalive_timeout_seconds: 18446744073709551615 is out of range",
            "upstreams.h.targets: the weights add up to 11000",
            "routes[0].path: \"/a?b\" contains '?'",
            "routes[1].path: \"/caf\u{e9}\" contains '\u{e9}'",
            "routes[2].path: \"/a b\" contains ' '",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(expect)),
                "missing {expect:?} in {errors:#?}"
            );
        }
    }

    #[test]
    fn framing_headers_cannot_be_edited() {
        let text = format!(
            "{BASE}routes:\n  - {{ name: a, path: /a, upstream: users, request_headers: {{ set: {{ Content-Length: \"1\" }} }} }}\n"
        );
        let errors = compile_text(&text).unwrap_err();
        assert!(
            errors[0].starts_with("routes[0].request_headers.set:"),
            "{errors:?}"
        );
    }

    #[test]
    fn circuit_breaker_statuses_and_share_are_checked_with_their_paths() {
        let text = format!(
            "{BASE}  a: {{ targets: [\"127.0.0.1:3\"], circuit_breaker: {{ failure_statuses: [500, 99, 600], max_open_share: 0% }} }}\n  b: {{ targets: [\"127.0.0.1:4\"], circuit_breaker: {{ max_open_share: 150% }} }}\n  c: {{ targets: [\"127.0.0.1:5\"], circuit_breaker: {{ max_open_share: 50 }} }}\n  d: {{ targets: [\"127.0.0.1:6\"], circuit_breaker: {{ max_open_share: 0.5 }} }}\nroutes: []\n"
        );
        let errors = compile_text(&text).unwrap_err();
        for expect in [
            "upstreams.a.circuit_breaker.failure_statuses[1]: 99 is not a status from 100 to 599",
            "upstreams.a.circuit_breaker.failure_statuses[2]: 600 is not a status",
            "upstreams.a.circuit_breaker.max_open_share: must be more than 0%",
            "upstreams.b.circuit_breaker.max_open_share: \"150%\" is more than 100%",
            "upstreams.c.circuit_breaker.max_open_share: 50 has no unit; write it as a percentage, like 50%",
            "upstreams.d.circuit_breaker.max_open_share: 0.5 is not a percentage",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(expect)),
                "missing {expect:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), 6, "{errors:#?}");
    }

    #[test]
    fn circuit_breaker_defaults_count_gateway_failures_and_cap_half() {
        let text = format!(
            "{BASE}  a: {{ targets: [\"127.0.0.1:3\"], circuit_breaker: {{}} }}\n  b: {{ targets: [\"127.0.0.1:4\"], circuit_breaker: {{ failure_statuses: [500, 502], max_open_share: 100% }} }}\nroutes: []\n"
        );
        let snapshot = compile_text(&text).unwrap();
        let settings = |name: &str| {
            let cluster = snapshot.clusters.iter().find(|c| c.name == name).unwrap();
            cluster.targets[0]
                .breaker
                .as_ref()
                .unwrap()
                .settings
                .clone()
        };
        let a = settings("a");
        assert_eq!(
            a.failure_statuses.iter().collect::<Vec<_>>(),
            [502, 503, 504]
        );
        assert_eq!(a.max_open_share, 50);
        let b = settings("b");
        assert_eq!(b.failure_statuses.iter().collect::<Vec<_>>(), [500, 502]);
        assert_eq!(b.max_open_share, 100);
    }

    #[test]
    fn the_connect_timeout_outlasts_a_dropped_syn() {
        let snapshot = compile_text(&format!("{BASE}routes: []\n")).unwrap();
        // Linux resends a SYN after 1 s, then 3 s after the first.
        assert_eq!(
            snapshot.clusters[0].timeouts.connect,
            Duration::from_secs(4)
        );
    }

    #[test]
    fn a_valid_file_compiles() {
        let text = format!(
            "{BASE}admin: 127.0.0.1:3\nroutes:\n  - {{ name: a, path_prefix: /api/, upstream: users, strip_prefix: true, hosts: [\"*.Example.org\", api.example.com], methods: [GET] }}\n"
        );
        let snapshot = compile_text(&text).unwrap();
        assert_eq!(snapshot.routes[0].strip_prefix, Some(4));
        assert_eq!(snapshot.clusters.len(), 1);
    }
}

#[cfg(test)]
mod admin_address_tests {
    use super::parse_admin_address;

    #[test]
    fn a_bare_port_binds_the_loopback_address() {
        assert_eq!(
            parse_admin_address(":9901").unwrap().to_string(),
            "127.0.0.1:9901"
        );
        assert_eq!(
            parse_admin_address("0.0.0.0:9901").unwrap().to_string(),
            "0.0.0.0:9901"
        );
        assert!(parse_admin_address(":http").is_err());
        assert!(parse_admin_address("9901").is_err());
    }
}
