//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! Per-request cost is kept to a few atomic operations: a route's and an
//! upstream's metric handles are resolved once, when the config compiles
//! ([`RouteMetrics`], [`UpstreamMetrics`]), so a request formats no label
//! and allocates nothing. The status label is the one value known only per
//! request: each route keeps the handles of the statuses it has answered
//! in a short list behind a read lock. Gauges that describe state (target
//! health, circuits, connections) are read from the running snapshot when
//! scraped, not kept up to date per request.

use once_cell::sync::Lazy;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

/// Request durations, in seconds: 0.5 ms to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric tollgate exports.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub rate_limited: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub inflight: IntGauge,
    pub build_info: IntGaugeVec,
    /// The most Redis errors a scrape has reported (see
    /// [`ProcessState::redis_errors`]).
    redis_errors_reported: AtomicU64,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let counter_vec =
        |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
    let histogram_vec = |name: &str, help: &str, label: &str| {
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
            &[label],
        )
    };
    let m = Metrics {
        requests: counter_vec(
            "tollgate_requests_total",
            "Requests answered, by route and status.",
            &["route", "status"],
        )?,
        request_duration: histogram_vec(
            "tollgate_request_duration_seconds",
            "From the request head to the end of the response, by route.",
            "route",
        )?,
        upstream_duration: histogram_vec(
            "tollgate_upstream_duration_seconds",
            "From choosing a target to its response head, by upstream.",
            "upstream",
        )?,
        rate_limited: counter_vec(
            "tollgate_rate_limited_total",
            "Requests refused by a rate limit, by route.",
            &["route"],
        )?,
        auth_failures: counter_vec(
            "tollgate_auth_failures_total",
            "Requests refused by authentication or access rules, by route and reason.",
            &["route", "reason"],
        )?,
        config_reloads: counter_vec(
            "tollgate_config_reloads_total",
            "Configuration reloads, by result (ok, error).",
            &["result"],
        )?,
        inflight: IntGauge::new("tollgate_inflight_requests", "Requests in progress.")?,
        build_info: IntGaugeVec::new(
            Opts::new("tollgate_build_info", "1, labelled with the version."),
            &["version"],
        )?,
        redis_errors_reported: AtomicU64::new(0),
        registry,
    };
    for collector in [
        Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(m.request_duration.clone()),
        Box::new(m.upstream_duration.clone()),
        Box::new(m.rate_limited.clone()),
        Box::new(m.auth_failures.clone()),
        Box::new(m.config_reloads.clone()),
        Box::new(m.inflight.clone()),
        Box::new(m.build_info.clone()),
    ] {
        m.registry.register(collector)?;
    }
    m.build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    Ok(m)
}

/// The process's metrics. The definitions above are fixed, so building
/// them cannot fail at run time; if it ever did, the process would have
/// no metrics rather than no service.
pub static METRICS: Lazy<Option<Metrics>> = Lazy::new(|| match build() {
    Ok(m) => Some(m),
    Err(e) => {
        log::error!("metrics are unavailable: {e}");
        None
    }
});

pub fn metrics() -> Option<&'static Metrics> {
    METRICS.as_ref()
}

/// The text exposition of every metric, with `state` read by this scrape.
pub fn render(state: Option<&ProcessState>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(m) = metrics() {
        let mut families = m.registry.gather();
        if let Some(state) = state {
            families.extend(state.registry.gather());
            families.sort_by(|a, b| a.name().cmp(b.name()));
        }
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            // A body cut off halfway would read as valid text with series
            // missing: better none at all.
            log::error!("cannot render the metrics: {e}");
            out.clear();
        }
    }
    out
}

/// What one scrape reads from the running process: target health and
/// circuits from the snapshot, open connections, and totals counted
/// outside the registry. Each scrape fills its own, so nothing is reset
/// under another scrape, and no count is caught up twice.
pub struct ProcessState {
    registry: Registry,
    target_healthy: IntGaugeVec,
    circuit_state: IntGaugeVec,
    connections: IntGauge,
    redis_errors: IntCounter,
    access_log_dropped: IntCounter,
}

impl ProcessState {
    pub fn new() -> Result<Self, prometheus::Error> {
        let target = &["upstream", "target"];
        let state = ProcessState {
            registry: Registry::new(),
            target_healthy: IntGaugeVec::new(
                Opts::new(
                    "tollgate_upstream_target_healthy",
                    "1 if the target is healthy.",
                ),
                target,
            )?,
            circuit_state: IntGaugeVec::new(
                Opts::new(
                    "tollgate_circuit_state",
                    "A target's circuit breaker: 0 closed, 1 open, 2 half-open.",
                ),
                target,
            )?,
            connections: IntGauge::new("tollgate_connections", "Open client connections.")?,
            redis_errors: IntCounter::new(
                "tollgate_redis_errors_total",
                "Global rate-limit decisions Redis could not make.",
            )?,
            access_log_dropped: IntCounter::new(
                "tollgate_access_log_dropped_total",
                "Access log lines dropped because the writer fell behind.",
            )?,
        };
        for collector in [
            Box::new(state.target_healthy.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(state.circuit_state.clone()),
            Box::new(state.connections.clone()),
            Box::new(state.redis_errors.clone()),
            Box::new(state.access_log_dropped.clone()),
        ] {
            state.registry.register(collector)?;
        }
        Ok(state)
    }

    /// One target: its health, and its breaker's phase (0 closed, 1 open,
    /// 2 half-open) when it has one.
    pub fn target(&self, upstream: &str, target: &str, healthy: bool, circuit: Option<i64>) {
        let labels = [upstream, target];
        self.target_healthy
            .with_label_values(&labels)
            .set(i64::from(healthy));
        if let Some(phase) = circuit {
            self.circuit_state.with_label_values(&labels).set(phase);
        }
    }

    pub fn connections(&self, open: usize) {
        self.connections
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// Redis errors as the running Redis counts them. A reload that
    /// replaces the Redis starts its count again from zero; the counter
    /// never goes down, so it reports the most any scrape has seen.
    pub fn redis_errors(&self, total: u64) {
        let reported = metrics().map_or(total, |m| {
            m.redis_errors_reported
                .fetch_max(total, Ordering::Relaxed)
                .max(total)
        });
        self.redis_errors.inc_by(reported);
    }

    pub fn access_log_dropped(&self, total: u64) {
        self.access_log_dropped.inc_by(total);
    }
}

/// A route's metric handles, resolved once per compile.
pub struct RouteMetrics {
    name: String,
    duration: Option<Histogram>,
    rate_limited: Option<IntCounter>,
    /// `tollgate_requests_total` by status, as answered so far.
    statuses: RwLock<Vec<(u16, IntCounter)>>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    pub fn new(route: &str) -> Self {
        let m = metrics();
        RouteMetrics {
            name: route.to_owned(),
            duration: m.map(|m| m.request_duration.with_label_values(&[route])),
            rate_limited: m.map(|m| m.rate_limited.with_label_values(&[route])),
            statuses: RwLock::new(Vec::new()),
        }
    }

    /// Counts one answered request.
    pub fn answered(&self, status: u16, seconds: f64) {
        if let Some(h) = &self.duration {
            h.observe(seconds);
        }
        let known = self
            .statuses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, c)| c.inc())
            .is_some();
        if !known {
            count_status(&self.statuses, &self.name, status);
        }
    }

    pub fn rate_limited(&self) {
        if let Some(c) = &self.rate_limited {
            c.inc();
        }
    }

    pub fn auth_failure(&self, reason: &str) {
        if let Some(m) = metrics() {
            m.auth_failures
                .with_label_values(&[&self.name, reason])
                .inc();
        }
    }
}

/// The first request of a status on a route: resolve its handle once.
fn count_status(statuses: &RwLock<Vec<(u16, IntCounter)>>, route: &str, status: u16) {
    let Some(m) = metrics() else {
        return;
    };
    let mut list = statuses.write().unwrap_or_else(PoisonError::into_inner);
    let counter = match list.iter().find(|(s, _)| *s == status) {
        Some((_, c)) => c.clone(),
        None => {
            let c = m
                .requests
                .with_label_values(&[route, itoa::Buffer::new().format(status)]);
            list.push((status, c.clone()));
            c
        }
    };
    counter.inc();
}

/// Requests refused before routing: no route, counted by status.
pub fn answered_unrouted(status: u16) {
    if let Some(m) = metrics() {
        m.requests
            .with_label_values(&["", itoa::Buffer::new().format(status)])
            .inc();
    }
}

/// An upstream's handles.
pub struct UpstreamMetrics {
    duration: Option<Histogram>,
}

impl std::fmt::Debug for UpstreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamMetrics").finish_non_exhaustive()
    }
}

impl UpstreamMetrics {
    pub fn new(upstream: &str) -> Self {
        UpstreamMetrics {
            duration: metrics().map(|m| m.upstream_duration.with_label_values(&[upstream])),
        }
    }

    pub fn answered(&self, seconds: f64) {
        if let Some(h) = &self.duration {
            h.observe(seconds);
        }
    }
}

/// Counts requests in progress for as long as it lives.
pub struct InFlightRequest(());

impl InFlightRequest {
    pub fn start() -> Option<Self> {
        let m = metrics()?;
        m.inflight.inc();
        Some(InFlightRequest(()))
    }
}

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        if let Some(m) = metrics() {
            m.inflight.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_counted_per_route() {
        let r = RouteMetrics::new("unit-test-route");
        r.answered(200, 0.001);
        r.answered(200, 0.002);
        r.answered(503, 0.5);
        let text = String::from_utf8(render(None)).unwrap();
        assert!(
            text.contains(r#"tollgate_requests_total{route="unit-test-route",status="200"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"tollgate_requests_total{route="unit-test-route",status="503"} 1"#));
        assert!(
            text.contains(r#"tollgate_request_duration_seconds_count{route="unit-test-route"} 3"#)
        );
        assert!(text.contains("tollgate_build_info{version="));
    }

    #[test]
    fn each_scrape_reports_its_own_state_whole() {
        let scrape = |targets: &[&str], redis: u64| {
            let state = ProcessState::new().unwrap();
            for (i, t) in targets.iter().enumerate() {
                state.target("unit-test-upstream", t, i == 0, Some(1));
            }
            state.connections(3);
            state.redis_errors(redis);
            state.access_log_dropped(7);
            String::from_utf8(render(Some(&state))).unwrap()
        };
        // Built at once, as two concurrent scrapes would: neither empties
        // the other's series.
        let first = ProcessState::new().unwrap();
        first.target("u", "10.0.0.1:80", true, None);
        let second = scrape(&["10.0.0.2:80", "10.0.0.3:80"], 5);
        let first = String::from_utf8(render(Some(&first))).unwrap();
        assert!(
            first.contains(
                r#"tollgate_upstream_target_healthy{target="10.0.0.1:80",upstream="u"} 1"#
            ),
            "{first}"
        );
        assert!(!first.contains("10.0.0.2:80"), "{first}");
        assert!(second.contains(r#"tollgate_upstream_target_healthy{target="10.0.0.3:80",upstream="unit-test-upstream"} 0"#), "{second}");
        assert!(second.contains(
            r#"tollgate_circuit_state{target="10.0.0.2:80",upstream="unit-test-upstream"} 1"#
        ));
        assert!(second.contains("tollgate_connections 3"));
        assert!(second.contains("tollgate_access_log_dropped_total 7"));
        assert!(second.contains("tollgate_redis_errors_total 5"));
        // A Redis replaced by a reload counts from zero: the counter stays.
        let after = scrape(&[], 2);
        assert!(after.contains("tollgate_redis_errors_total 5"), "{after}");
        // Families come in name order, each once.
        let names: Vec<&str> = second
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
    }
}
