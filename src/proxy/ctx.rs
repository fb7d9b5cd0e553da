//! What a request carries from one phase to the next, grouped by concern.

use crate::auth::Identity;
use crate::error::GatewayError;
use crate::limit::inflight::Slot;
use crate::limit::Verdict;
use crate::router::Route;
use crate::upstream::breaker::Breaker;
use crate::upstream::{Cluster, InFlight};
use http::HeaderValue;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

/// Per-request state.
pub struct RequestCtx {
    /// The route and upstream the request matched: only these are held, not
    /// the whole snapshot, so a long request pins no more than it uses.
    pub matched: Option<RouteMatch>,
    pub client: Client,
    pub id: RequestId,
    pub attempt: Attempt,
    pub timing: Timing,
    /// Set when the gateway decides the outcome itself.
    pub outcome: Option<GatewayError>,
    /// The route's rate-limit decision, for the `RateLimit-*` headers.
    pub rate: Option<Verdict>,
    /// Places held under in-flight limits until the request ends.
    pub slots: Slots,
    /// Counts the request in `tollgate_inflight_requests` while it lives.
    pub in_progress: Option<crate::observe::metrics::InFlightRequest>,
    /// The status of the response head sent to the client (0: none yet).
    pub responded: u16,
    /// The logging phase ran. A context dropped without it belongs to a
    /// request whose task was ended from outside (an HTTP/2 body timeout).
    pub logged: bool,
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        if !self.logged {
            super::record_abandoned(self);
        }
    }
}

/// A request's places under `max_inflight` limits, given back as the
/// context drops at the end of the request.
#[derive(Default)]
pub struct Slots {
    pub route: Option<Slot>,
    pub upstream: Option<Slot>,
    pub client: Option<pingora_limits::inflight::Guard>,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            matched: None,
            client: Client {
                ip: None,
                peer: None,
                identity: None,
            },
            id: RequestId {
                value: HeaderValue::from_static(""),
                generated: false,
            },
            attempt: Attempt {
                target: None,
                tried: Vec::new(),
                failures: 0,
                last_failure: None,
                breaker: None,
            },
            timing: Timing {
                start: None,
                upstream_start: None,
                upstream_latency: None,
                deadline: None,
                interim_deadline: None,
                slow_after: None,
            },
            outcome: None,
            rate: None,
            slots: Slots::default(),
            in_progress: None,
            responded: 0,
            logged: false,
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

/// The route a request matched, its upstream, and the path it goes on with.
pub struct RouteMatch {
    pub route: Arc<Route>,
    pub cluster: Arc<Cluster>,
    /// The normalized path, when it differs from the request's own.
    pub normalized_path: Option<String>,
    /// The path carries `;parameters`, so it was matched without them and
    /// a stripped prefix is cut by segments.
    pub path_parameters: bool,
}

/// Who is calling, resolved once per request.
pub struct Client {
    /// The client: the peer, or past trusted proxies the address their
    /// `X-Forwarded-For` names. Limits, IP lists and hashing use it.
    pub ip: Option<IpAddr>,
    /// The TCP peer, which `X-Forwarded-For` gets appended.
    pub peer: Option<IpAddr>,
    /// The caller the route's authentication identified.
    pub identity: Option<Identity>,
}

/// The request id, kept from the client or generated.
pub struct RequestId {
    pub value: HeaderValue,
    /// Whether `value` replaces what the client sent (or did not send).
    pub generated: bool,
}

impl RequestId {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.value.as_bytes()).unwrap_or("")
    }
}

/// The current attempt at an upstream, and those that failed before it.
pub struct Attempt {
    /// The chosen target of the current attempt and its load accounting.
    pub target: Option<(usize, InFlight)>,
    /// Targets that failed this request; retries go elsewhere.
    pub tried: Vec<SocketAddr>,
    /// Failed attempts counted against the upstream's `retries`.
    pub failures: u32,
    /// How the last failed attempt failed, reported if no target is left.
    pub last_failure: Option<GatewayError>,
    /// The current attempt's circuit breaker, until its outcome is counted.
    pub breaker: Option<Arc<Breaker>>,
}

/// Deadlines that span attempts.
pub struct Timing {
    /// When the request began (its head was read), for the access log.
    pub start: Option<Instant>,
    /// When the current attempt's target was chosen.
    pub upstream_start: Option<Instant>,
    /// From choosing the target to the response head, last attempt.
    pub upstream_latency: Option<std::time::Duration>,
    /// The route's `timeout`: when the response head must have come.
    pub deadline: Option<Instant>,
    /// When interim (1xx) responses stop counting as an answer: the
    /// upstream's read timeout, from the first one.
    pub interim_deadline: Option<Instant>,
    /// `slow_request_threshold` of the config the request began under.
    pub slow_after: Option<std::time::Duration>,
}

impl Timing {
    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}
