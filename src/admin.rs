//! The admin listener, off the data path: liveness, readiness and the state
//! of the loaded configuration, for probes and operators.
//!
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 once the config is loaded and the listeners are
//!   bound, and the upstreams named in `admin.readyz_requires` (only those)
//!   each have a healthy target; otherwise 503 naming the ones that have
//!   none. One dead upstream must not take a whole node out of rotation.
//! - `GET /upstreams`: every upstream's targets and their health.
//! - `GET /config`: which file is loaded and how the last reload went.
//!
//! Every answer carries `Content-Length`; `HEAD` gets the same head with
//! no body.

use crate::downstream::ConnectionGauge;
use crate::observe::metrics::ProcessState;
use crate::store::ConfigStore;
use crate::upstream::breaker::Phase;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

/// Serves the admin endpoints.
pub struct AdminApp {
    store: Arc<ConfigStore>,
    connections: Option<Arc<ConnectionGauge>>,
}

impl AdminApp {
    pub fn new(store: Arc<ConfigStore>) -> Self {
        AdminApp {
            store,
            connections: None,
        }
    }

    /// Reports the proxy's open client connections in `/metrics`.
    pub fn with_connections(mut self, connections: Arc<ConnectionGauge>) -> Self {
        self.connections = Some(connections);
        self
    }

    /// The Prometheus text, with the process's state read now, by this
    /// scrape alone (see [`ProcessState`]).
    fn metrics(&self) -> Vec<u8> {
        let state = match ProcessState::new() {
            Ok(state) => state,
            Err(e) => {
                log::error!("metrics: {e}");
                return crate::observe::metrics::render(None);
            }
        };
        let snapshot = self.store.current();
        let now = Instant::now();
        for c in &snapshot.clusters {
            for (i, t) in c.targets.iter().enumerate() {
                let circuit = t.breaker.as_ref().map(|b| match b.phase(now) {
                    Phase::Closed => 0,
                    Phase::Open { .. } => 1,
                    Phase::HalfOpen { .. } => 2,
                });
                state.target(&c.name, &t.addr.to_string(), c.is_ready(i), circuit);
            }
        }
        if let Some(connections) = &self.connections {
            state.connections(connections.current());
        }
        state.redis_errors(
            snapshot
                .redis
                .as_ref()
                .map_or(0, |r| r.errors.load(std::sync::atomic::Ordering::Relaxed)),
        );
        state.access_log_dropped(crate::observe::access_log::dropped());
        crate::observe::metrics::render(Some(&state))
    }

    fn readiness(&self) -> (StatusCode, Value) {
        let snapshot = self.store.current();
        let unready: Vec<&str> = snapshot
            .readyz_requires
            .iter()
            .filter(|name| snapshot.cluster(name).is_none_or(|c| !c.has_ready_target()))
            .map(String::as_str)
            .collect();
        let open = open_circuits(&snapshot);
        if unready.is_empty() {
            (
                StatusCode::OK,
                json!({ "status": "ready", "open_circuits": open }),
            )
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "not_ready", "upstreams_without_healthy_target": unready, "open_circuits": open }),
            )
        }
    }

    fn upstreams(&self) -> Value {
        let snapshot = self.store.current();
        let upstreams: serde_json::Map<String, Value> = snapshot
            .clusters
            .iter()
            .map(|c| {
                let targets: Vec<Value> = c
                    .targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        json!({
                            "address": t.addr.to_string(),
                            "weight": t.weight,
                            "healthy": c.is_ready(i),
                            "circuit": t.breaker.as_ref().map(|b| b.phase(Instant::now()).name()),
                        })
                    })
                    .collect();
                let value = json!({
                    "health_checked": c.health.is_some(),
                    "healthy_targets": (0..c.targets.len()).filter(|&i| c.is_ready(i)).count(),
                    "targets": targets,
                });
                (c.name.clone(), value)
            })
            .collect();
        json!({ "upstreams": upstreams })
    }

    /// JWT providers: their keys, JWKS fetches and token caches.
    fn auth(&self) -> Value {
        let snapshot = self.store.current();
        let jwt: serde_json::Map<String, Value> = snapshot
            .jwt
            .iter()
            .map(|p| (p.name.clone(), p.status()))
            .collect();
        json!({ "jwt": jwt })
    }

    fn config_status(&self) -> Value {
        let status = self.store.status();
        json!({
            "file": self.store.path().display().to_string(),
            "generation": status.generation,
            "reload_attempts": status.reload_attempts,
            "last_reload_error": status.last_reload_error,
            "open_circuits": open_circuits(&self.store.current()),
            "redis": self.store.current().redis.as_ref().map(|r| r.status()),
            "access_log_dropped": crate::observe::access_log::dropped(),
        })
    }
}

/// Targets whose breaker is not closed, as `upstream/address`.
fn open_circuits(snapshot: &crate::snapshot::Snapshot) -> Vec<String> {
    let now = Instant::now();
    snapshot
        .clusters
        .iter()
        .flat_map(|c| {
            c.targets.iter().filter_map(move |t| {
                let phase = t.breaker.as_ref()?.phase(now);
                (phase != Phase::Closed)
                    .then(|| format!("{}/{} ({})", c.name, t.addr, phase.name()))
            })
        })
        .collect()
}

fn json_response(status: StatusCode, body: &Value) -> Response<Vec<u8>> {
    response(status, "application/json", body.to_string().into_bytes())
}

/// Every admin answer: its type, never cached, with its length.
fn response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Vec<u8>> {
    let len = body.len();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    response
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != Method::GET && req.method != Method::HEAD {
            let mut response = json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({ "error": { "status": 405, "code": "method_not_allowed", "message": "admin endpoints accept GET and HEAD" } }),
            );
            response.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static("GET, HEAD"),
            );
            return response;
        }
        // For HEAD, Pingora writes the head (Content-Length included) and
        // drops the body.
        match req.uri.path() {
            "/healthz" => json_response(StatusCode::OK, &json!({ "status": "ok" })),
            "/readyz" => {
                let (status, body) = self.readiness();
                json_response(status, &body)
            }
            "/upstreams" => json_response(StatusCode::OK, &self.upstreams()),
            "/config" => json_response(StatusCode::OK, &self.config_status()),
            "/auth" => json_response(StatusCode::OK, &self.auth()),
            "/routes" => json_response(
                StatusCode::OK,
                &crate::explain::route_table(&self.store.current()),
            ),
            "/metrics" => response(StatusCode::OK, "text/plain; version=0.0.4", self.metrics()),
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({ "error": { "status": 404, "code": "no_route", "message": "admin endpoints: /healthz, /readyz, /upstreams, /config, /auth, /metrics, /routes" } }),
            ),
        }
    }
}
