//! Routing: path normalization, the route index, and what a matched route
//! does to the request and response on its way through.

mod index;
mod normalize;

pub use index::{Conflict, HostPattern, Lookup, PathPattern, RouteIndex, RouteIndexBuilder};
pub use normalize::{normalize_path, without_parameters, PathError};

use crate::auth::cors::CorsPolicy;
use crate::auth::AccessPolicy;
use http::{HeaderName, HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use std::borrow::Cow;

/// A compiled route: everything the proxy needs once a request matched it.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// Index of the route's upstream in the snapshot's cluster list.
    pub upstream: usize,
    /// Byte length of the matched prefix to cut from the forwarded path, when
    /// `strip_prefix` is on. The root prefix `/` strips nothing.
    pub strip_prefix: Option<usize>,
    /// Segments of that prefix, for paths with `;parameters`, whose bytes
    /// do not line up with the prefix as matched.
    pub strip_segments: usize,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// What the route demands of a request, resolved when the config
    /// compiled.
    pub policy: RoutePolicy,
    /// The route's metric handles, resolved once.
    pub metrics: crate::observe::metrics::RouteMetrics,
    /// Its access log fields that never change (`"route"`, `"upstream"`),
    /// rendered once.
    pub log_names: Box<[u8]>,
    /// Its host, path and method keys, for `explain` and `GET /routes`.
    pub pattern: crate::explain::RoutePattern,
}

/// A route's per-request policy, compiled once: the request path only
/// reads it. Authentication and limits join it as they land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    /// From request start to the response head, all attempts together.
    pub timeout: Option<std::time::Duration>,
    /// The largest request body accepted.
    pub max_body_bytes: u64,
    /// Whether WebSocket upgrades are passed through.
    pub websocket: bool,
    /// How long a tunnel may be silent in either direction.
    pub websocket_idle_timeout: std::time::Duration,
    /// With `https_redirect`, the port plain-HTTP requests are sent to.
    pub https_redirect: Option<u16>,
    /// Who may call the route.
    pub access: AccessPolicy,
    /// Which browser origins may, when set.
    pub cors: Option<std::sync::Arc<CorsPolicy>>,
    /// Headers that carry an identity to upstreams (`X-Consumer` and every
    /// JWT provider's forwarded claims): a client's own copies are removed
    /// on every route, whatever its authentication.
    pub identity_headers: std::sync::Arc<[http::HeaderName]>,
    /// The route's rate limit, when set.
    pub rate_limit: Option<std::sync::Arc<crate::limit::RateLimit>>,
    /// `max_inflight`: requests in progress on the route.
    pub max_inflight: Option<crate::limit::inflight::Ceiling>,
    /// `max_inflight_per_client`, keyed like the rate limit.
    pub per_client: Option<std::sync::Arc<PerClientLimit>>,
}

/// A route's `max_inflight_per_client` and what it counts by.
#[derive(Debug)]
pub struct PerClientLimit {
    /// The key rule: the rate limit's kind and `ipv6_prefix`.
    pub kind: crate::limit::KeyRule,
    pub limit: crate::limit::inflight::PerClient,
}

impl PartialEq for PerClientLimit {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.limit.max == other.limit.max
    }
}

impl Eq for PerClientLimit {}

/// `websocket_idle_timeout` when a route does not say.
pub const DEFAULT_WEBSOCKET_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            timeout: None,
            max_body_bytes: u64::MAX,
            websocket: false,
            websocket_idle_timeout: DEFAULT_WEBSOCKET_IDLE,
            https_redirect: None,
            access: AccessPolicy::default(),
            cors: None,
            identity_headers: std::sync::Arc::new([http::HeaderName::from_static("x-consumer")]),
            rate_limit: None,
            max_inflight: None,
            per_client: None,
        }
    }
}

impl Route {
    /// The path the upstream receives for a normalized request path.
    pub fn upstream_path<'a>(&self, path: &'a str) -> &'a str {
        match self.strip_prefix {
            Some(len) if len > 1 => match path.get(len..) {
                Some("") | None => "/",
                Some(rest) => rest,
            },
            _ => path,
        }
    }

    /// As [`Self::upstream_path`], cutting whole segments: for a path
    /// matched without its `;parameters`.
    pub fn upstream_path_by_segments<'a>(&self, path: &'a str) -> &'a str {
        if self.strip_prefix.is_none_or(|len| len <= 1) {
            return path;
        }
        let mut rest = path;
        for _ in 0..self.strip_segments {
            rest = match rest.get(1..).and_then(|r| r.find('/')) {
                Some(i) => &rest[i + 1..],
                None => "",
            };
        }
        if rest.is_empty() {
            "/"
        } else {
            rest
        }
    }
}

/// Compiled header edits: names and values validated when the config loads.
#[derive(Debug, Default)]
pub struct HeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

/// The three header operations, shared by request and response headers.
pub trait EditHeaders {
    fn remove(&mut self, name: &HeaderName);
    fn set(&mut self, name: &HeaderName, value: &HeaderValue);
    fn add(&mut self, name: &HeaderName, value: &HeaderValue);
}

macro_rules! edit_headers_for {
    ($ty:ty) => {
        impl EditHeaders for $ty {
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            // Both names and values were validated at load time, so the
            // Pingora calls below cannot fail on them.
            fn set(&mut self, name: &HeaderName, value: &HeaderValue) {
                let _ = self.insert_header(name.clone(), value.clone());
            }
            fn add(&mut self, name: &HeaderName, value: &HeaderValue) {
                let _ = self.append_header(name.clone(), value.clone());
            }
        }
    };
}

edit_headers_for!(RequestHeader);
edit_headers_for!(ResponseHeader);

impl HeaderOps {
    /// Applies remove, then set, then add.
    pub fn apply(&self, headers: &mut impl EditHeaders) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.set(name, value);
        }
        for (name, value) in &self.add {
            headers.add(name, value);
        }
    }
}

/// The request's host for routing: lower-case, without port or trailing dot.
/// Borrowed unless the client used upper case.
pub fn routing_host(raw: &str) -> Option<Cow<'_, str>> {
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: "[::1]:8080" routes as "[::1]".
        &raw[..rest.find(']').map_or(raw.len(), |i| i + 2)]
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

/// Methods a route accepts, expanded so that GET also admits HEAD (RFC 9110
/// §9.3.2: a resource that answers GET answers HEAD).
pub fn expand_methods(methods: Vec<Method>) -> Vec<Method> {
    let mut methods = methods;
    if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
        methods.push(Method::HEAD);
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_host_strips_port_and_case() {
        assert_eq!(
            routing_host("API.Example.com:8080").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(routing_host("example.com.").as_deref(), Some("example.com"));
        assert_eq!(routing_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(routing_host(":80"), None);
    }

    #[test]
    fn strip_prefix_keeps_a_rooted_path() {
        let route = Route {
            name: "r".into(),
            upstream: 0,
            strip_prefix: Some("/api/users".len()),
            strip_segments: 2,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            policy: RoutePolicy::default(),
            metrics: crate::observe::metrics::RouteMetrics::new("r"),
            log_names: Box::default(),
            pattern: crate::explain::RoutePattern {
                hosts: vec![HostPattern::Any],
                path: PathPattern::Prefix("/api/users".into()),
                methods: None,
            },
        };
        assert_eq!(route.upstream_path("/api/users/7"), "/7");
        assert_eq!(route.upstream_path("/api/users"), "/");
        assert_eq!(route.upstream_path("/api/users/"), "/");
        assert_eq!(route.upstream_path_by_segments("/api;v=1/users;x/7"), "/7");
        assert_eq!(route.upstream_path_by_segments("/api;v=1/users"), "/");
    }
}
