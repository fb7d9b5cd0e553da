//! The request side of `request_filter`: which request id, which route,
//! and the route's rules for this request (body size, upgrades, the
//! client's protocol version).

use super::ctx::{Client, RequestCtx, RouteMatch, Slots, Timing};
use super::respond::Rejection;
use crate::auth::cors::{self, CorsPolicy};
use crate::downstream::head::HeadFacts;
use crate::downstream::policy;
use crate::downstream::stream::RequestStream;
use crate::error::GatewayError;
use crate::limit::Verdict;
use crate::observe::request_id;
use crate::router::{normalize_path, routing_host, without_parameters, Lookup};
use crate::snapshot::Snapshot;
use crate::upstream::HashKey;
use http::header::{CONNECTION, EXPECT, HOST, UPGRADE};
use http::{HeaderName, HeaderValue, Method, Version};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The TCP peer's address.
pub fn peer_ip(session: &Session) -> Option<IpAddr> {
    session.client_addr()?.as_inet().map(SocketAddr::ip)
}

/// Keeps a sane client id when the config trusts them (the head check left
/// at most one), else generates one.
pub fn settle_request_id(snapshot: &Snapshot, req: &RequestHeader, ctx: &mut RequestCtx) {
    match req.headers.get(&X_REQUEST_ID) {
        Some(id) if snapshot.trust_request_id && request_id::is_sane(id.as_bytes()) => {
            ctx.id.value = id.clone();
        }
        _ => {
            ctx.id.value = request_id::generate();
            ctx.id.generated = true;
        }
    }
}

/// The request's host as routing sees it: `Host` (or an HTTP/2
/// `:authority`), without port, lowercase.
pub fn request_host(req: &RequestHeader) -> Option<Cow<'_, str>> {
    let host = std::str::from_utf8(host_field(req)?).ok()?;
    routing_host(host)
}

/// Whether a TLS request names a host its connection was not set up for:
/// neither the SNI nor a name of the certificate served. Without SNI
/// (clients that connect by address) any host is routed.
pub fn misdirected(served: &crate::downstream::tls::Served, host: Option<&str>) -> bool {
    match (&served.sni, host) {
        (Some(sni), Some(host)) => **sni != *host && !served.certificate.covers(host),
        _ => false,
    }
}

/// Normalizes the path and finds the route: host, then path (without its
/// `;parameters`), then `method` (the request's own, or the one a CORS
/// preflight asks about).
pub fn route(
    snapshot: &Snapshot,
    req: &RequestHeader,
    method: &Method,
) -> Result<RouteMatch, Rejection> {
    let path = normalize_path(req.uri.path()).map_err(|e| GatewayError::BadRequest(e.message()))?;
    let host = request_host(req);
    // A path with `;` always takes normalization's slow path, so only an
    // owned path can carry parameters.
    let matched = match &path {
        Cow::Owned(p) => without_parameters(p),
        Cow::Borrowed(p) => Cow::Borrowed(*p),
    };
    let index = match snapshot.index.lookup(host.as_deref(), &matched, method) {
        Lookup::Route(index) => index,
        Lookup::MethodNotAllowed(allow) => {
            return Err(Rejection {
                error: GatewayError::MethodNotAllowed,
                allow: Some(allow),
            })
        }
        Lookup::NotFound => return Err(GatewayError::NoRoute.into()),
    };
    // Both exist by construction; a missing one answers 500, never
    // forwards.
    let route = snapshot.routes.get(index).ok_or(GatewayError::Internal)?;
    let cluster = snapshot
        .clusters
        .get(route.upstream)
        .ok_or(GatewayError::Internal)?;
    let normalized_path = match path {
        Cow::Owned(p) => Some(p),
        Cow::Borrowed(_) => None,
    };
    Ok(RouteMatch {
        route: Arc::clone(route),
        cluster: Arc::clone(cluster),
        path_parameters: normalized_path.as_deref().is_some_and(|p| p.contains(';')),
        normalized_path,
    })
}

/// Routes the request; a CORS preflight (`OPTIONS` asking about another
/// method) whose route for that method has CORS rules is routed there, and
/// comes back with the route's CORS policy to be answered by the gateway.
pub fn route_or_preflight(
    snapshot: &Snapshot,
    req: &RequestHeader,
) -> (Result<RouteMatch, Rejection>, Option<Arc<CorsPolicy>>) {
    if let Some(asked) = cors::preflight_method(req) {
        if let Ok(m) = route(snapshot, req, &asked) {
            if let Some(policy) = m.route.policy.cors.clone() {
                return (Ok(m), Some(policy));
            }
        }
    }
    (route(snapshot, req, &req.method), None)
}

/// The head policy every request goes through before routing. An HTTP/1
/// request from tollgate's connection loop passed it as it was read (the
/// loop's facts are taken from there); any other head (HTTP/2, h2c) is
/// checked, and cleaned, here.
pub fn check_head(session: &mut Session) -> Result<HeadFacts, Rejection> {
    if let Some(stream) = session
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<RequestStream>())
    {
        return Ok(stream.facts());
    }
    policy::check_parsed(session.req_header_mut()).map_err(|r| Rejection {
        error: r.error,
        allow: r.allow.map(HeaderValue::from_static),
    })
}

/// The host the request names, as received: `Host`, else the HTTP/2
/// `:authority` (or an absolute target's authority).
pub fn host_field(req: &RequestHeader) -> Option<&[u8]> {
    match req.headers.get(HOST) {
        Some(h) => Some(h.as_bytes()),
        None => req.uri.authority().map(|a| a.as_str().as_bytes()),
    }
}

/// A body declared larger than the route accepts is refused before any of
/// it is read or forwarded.
pub fn check_body_size(m: &RouteMatch, facts: HeadFacts) -> Result<(), Rejection> {
    match facts.length {
        Some(len) if len > m.route.policy.max_body_bytes => Err(GatewayError::BodyTooLarge.into()),
        _ => Ok(()),
    }
}

/// The route's access rules: client address, credentials, groups.
pub async fn authorize(
    m: &RouteMatch,
    req: &RequestHeader,
    client: &mut Client,
) -> Result<(), Rejection> {
    let access = &m.route.policy.access;
    if access.is_open() {
        return Ok(());
    }
    client.identity = access.check(req, client.ip).await?;
    Ok(())
}

/// The route's rate limit: counts the request, refuses it over the limit.
pub async fn rate_limit(
    m: &RouteMatch,
    req: &RequestHeader,
    client: &Client,
    rate: &mut Option<Verdict>,
) -> Result<(), Rejection> {
    let Some(limit) = &m.route.policy.rate_limit else {
        return Ok(());
    };
    let verdict = limit.check(req, client.ip, client.identity.as_ref()).await;
    let allowed = verdict.decision.allowed;
    *rate = Some(verdict);
    if allowed {
        Ok(())
    } else {
        Err(GatewayError::RateLimited.into())
    }
}

/// In-flight limits: the route's, the upstream's, the caller's. A request
/// over any of them is refused at once (503), never queued.
pub fn admit(
    m: &RouteMatch,
    req: &RequestHeader,
    client: &Client,
    slots: &mut Slots,
) -> Result<(), Rejection> {
    let policy = &m.route.policy;
    let overloaded = || Rejection::from(GatewayError::Overloaded);
    if let Some(ceiling) = &policy.max_inflight {
        slots.route = Some(ceiling.try_acquire().ok_or_else(overloaded)?);
    }
    if let Some(ceiling) = &m.cluster.max_inflight {
        slots.upstream = Some(ceiling.try_acquire().ok_or_else(overloaded)?);
    }
    if let Some(per_client) = &policy.per_client {
        let key = per_client
            .kind
            .key(req, client.ip, client.identity.as_ref());
        slots.client = Some(per_client.limit.try_acquire(key).ok_or_else(overloaded)?);
    }
    Ok(())
}

/// The route's timeout runs from here.
pub fn start_deadline(timeout: Option<std::time::Duration>, timing: &mut Timing) {
    timing.deadline = timeout.map(|t| Instant::now() + t);
}

/// Rules of the client's protocol version for a request about to be
/// proxied: only WebSocket routes upgrade, and only from an HTTP/1.1
/// request that asks with `Connection: upgrade`; an HTTP/1.0 client gets
/// no interim responses.
pub fn apply_protocol_rules(session: &mut Session, m: &RouteMatch, facts: HeadFacts) {
    let req = session.req_header();
    let http10 = req.version == Version::HTTP_10;
    if facts.upgrade {
        let allowed = m.route.policy.websocket
            && req.version == Version::HTTP_11
            && req
                .headers
                .get_all(CONNECTION)
                .iter()
                .any(|v| connection_lists(v, "upgrade"));
        if !allowed {
            // Without it Pingora treats the request as an ordinary one, and
            // a 101 answering it as the upstream's error.
            session.req_header_mut().remove_header(&UPGRADE);
        }
    }
    if http10 {
        session.req_header_mut().remove_header(&EXPECT);
        session.set_ignore_info_resp(true);
    }
}

/// Whether a `Connection` value lists `token`.
fn connection_lists(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The bytes a consistent-hash upstream hashes for this request.
pub fn hash_key<'a>(
    key: &HashKey,
    session: &'a Session,
    ctx: &'a RequestCtx,
    m: &'a RouteMatch,
    ip_buf: &'a mut [u8; 16],
) -> &'a [u8] {
    let ip_bytes = |buf: &'a mut [u8; 16]| -> &'a [u8] {
        match ctx.client.ip {
            Some(IpAddr::V4(v4)) => {
                buf[..4].copy_from_slice(&v4.octets());
                &buf[..4]
            }
            Some(IpAddr::V6(v6)) => {
                *buf = v6.octets();
                &buf[..]
            }
            None => &[],
        }
    };
    match key {
        HashKey::ClientIp => ip_bytes(ip_buf),
        HashKey::Path => m
            .normalized_path
            .as_deref()
            .unwrap_or(session.req_header().uri.path())
            .as_bytes(),
        HashKey::Header(name) => match session.req_header().headers.get(name) {
            Some(v) => v.as_bytes(),
            None => ip_bytes(ip_buf),
        },
    }
}
