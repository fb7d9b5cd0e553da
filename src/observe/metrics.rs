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
    pub target_healthy: IntGaugeVec,
    pub rate_limited: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub circuit_state: IntGaugeVec,
    pub redis_errors: IntCounter,
    pub config_reloads: IntCounterVec,
    pub inflight: IntGauge,
    pub connections: IntGauge,
    pub access_log_dropped: IntCounter,
    pub build_info: IntGaugeVec,
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
        target_healthy: IntGaugeVec::new(
            Opts::new(
                "tollgate_upstream_target_healthy",
                "1 if the target is healthy.",
            ),
            &["upstream", "target"],
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
        circuit_state: IntGaugeVec::new(
            Opts::new(
                "tollgate_circuit_state",
                "A target's circuit breaker: 0 closed, 1 open, 2 half-open.",
            ),
            &["upstream", "target"],
        )?,
        redis_errors: IntCounter::new(
            "tollgate_redis_errors_total",
            "Global rate-limit decisions Redis could not make.",
        )?,
        config_reloads: counter_vec(
            "tollgate_config_reloads_total",
            "Configuration reloads, by result (ok, error).",
            &["result"],
        )?,
        inflight: IntGauge::new("tollgate_inflight_requests", "Requests in progress.")?,
        connections: IntGauge::new("tollgate_connections", "Open client connections.")?,
        access_log_dropped: IntCounter::new(
            "tollgate_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind.",
        )?,
        build_info: IntGaugeVec::new(
            Opts::new("tollgate_build_info", "1, labelled with the version."),
            &["version"],
        )?,
        registry,
    };
    for collector in [
        Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(m.request_duration.clone()),
        Box::new(m.upstream_duration.clone()),
        Box::new(m.target_healthy.clone()),
        Box::new(m.rate_limited.clone()),
        Box::new(m.auth_failures.clone()),
        Box::new(m.circuit_state.clone()),
        Box::new(m.redis_errors.clone()),
        Box::new(m.config_reloads.clone()),
        Box::new(m.inflight.clone()),
        Box::new(m.connections.clone()),
        Box::new(m.access_log_dropped.clone()),
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

/// The text exposition of every metric.
pub fn render() -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(m) = metrics() {
        let _ = TextEncoder::new().encode(&m.registry.gather(), &mut out);
    }
    out
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
        let text = String::from_utf8(render()).unwrap();
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
}
