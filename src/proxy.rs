//! The `ProxyHttp` implementation: one short method per Pingora phase, each a
//! sequence of named steps. Read top to bottom, it is the request's path
//! through the gateway.

use crate::downstream::head::HeadFacts;
use crate::downstream::stream::RequestStream;
use crate::error::GatewayError;
use crate::observe::request_id;
use crate::router::{normalize_path, routing_host, without_parameters, Lookup, Route};
use crate::snapshot::Snapshot;
use crate::store::ConfigStore;
use crate::upstream::{Balance, Cluster, HashKey, InFlight};
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{ALLOW, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderName, HeaderValue, Version};
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorSource, ErrorType, Result, RetryType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Names of the headers tollgate adds, as Pingora's case-preserving header
/// names. Pingora turns a non-standard `HeaderName` into a freshly allocated
/// title-cased copy on every insert; a static name skips that copy.
fn case_name(name: &'static str) -> Bytes {
    Bytes::from_static(name.as_bytes())
}

/// The gateway: a handle on the running configuration.
pub struct Gateway {
    store: Arc<ConfigStore>,
}

impl Gateway {
    pub fn new(store: Arc<ConfigStore>) -> Self {
        Gateway { store }
    }
}

/// Per-request state, carried across phases.
pub struct RequestCtx {
    /// The snapshot this request uses from start to end.
    snapshot: Option<Arc<Snapshot>>,
    route: Option<usize>,
    /// The normalized path, when it differs from the request's own.
    normalized_path: Option<String>,
    /// The path carries `;parameters`, so it was matched without them and
    /// a stripped prefix is cut by segments.
    path_parameters: bool,
    /// When interim (1xx) responses stop counting as an answer: the
    /// upstream's read timeout, from the first one.
    interim_deadline: Option<std::time::Instant>,
    /// The route's `timeout`: when the response head must have come.
    deadline: Option<std::time::Instant>,
    request_id: HeaderValue,
    /// Whether `request_id` replaces what the client sent (or did not send).
    request_id_generated: bool,
    /// The chosen target of the current attempt and its load accounting.
    target: Option<(usize, InFlight)>,
    /// Targets that failed this request; retries go elsewhere.
    tried: Vec<SocketAddr>,
    /// Failed attempts counted against the upstream's `retries`.
    failures: u32,
    /// How the last failed attempt failed, reported if no target is left.
    last_failure: Option<GatewayError>,
    /// Set when the gateway decides the outcome itself.
    error: Option<GatewayError>,
}

/// The route and cluster a request matched.
struct Matched<'a> {
    route: &'a Route,
    cluster: &'a Arc<Cluster>,
}

impl RequestCtx {
    fn matched(&self) -> Option<Matched<'_>> {
        let snapshot = self.snapshot.as_ref()?;
        let route = snapshot.routes.get(self.route?)?;
        let cluster = snapshot.clusters.get(route.upstream)?;
        Some(Matched { route, cluster })
    }

    /// Whether another attempt may follow one that failed as `kind`.
    fn may_retry(&self, kind: FailureKind) -> bool {
        let Some(m) = self.matched() else {
            return false;
        };
        let listed = match kind {
            FailureKind::ConnectFailure => m.cluster.retry_on.connect_failure,
            FailureKind::Reset => m.cluster.retry_on.reset,
            FailureKind::Timeout => m.cluster.retry_on.timeout,
        };
        listed && self.failures <= m.cluster.retries && !self.past_deadline()
    }

    fn past_deadline(&self) -> bool {
        self.deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
    }
}

/// How an attempt failed, as `retry_on` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    ConnectFailure,
    Reset,
    Timeout,
}

impl FailureKind {
    /// For an error after the connection was made.
    fn of(e: &Error) -> FailureKind {
        match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => FailureKind::Timeout,
            _ => FailureKind::Reset,
        }
    }
}

/// What routing decided for a request that will not be proxied.
struct Rejection {
    error: GatewayError,
    allow: Option<HeaderValue>,
}

impl From<GatewayError> for Rejection {
    fn from(error: GatewayError) -> Self {
        Rejection { error, allow: None }
    }
}

/// Normalizes the path and finds the route: the pure part of `request_filter`.
fn route_request(
    snapshot: &Snapshot,
    req: &RequestHeader,
) -> std::result::Result<(usize, Option<String>), Rejection> {
    let path = normalize_path(req.uri.path()).map_err(|e| GatewayError::BadRequest(e.message()))?;
    let host = match req.headers.get(HOST) {
        Some(h) => h.to_str().ok(),
        None => req.uri.host(),
    };
    let host = host.and_then(routing_host);
    // A path with `;` always takes normalization's slow path, so only an
    // owned path can carry parameters.
    let matched = match &path {
        std::borrow::Cow::Owned(p) => without_parameters(p),
        std::borrow::Cow::Borrowed(p) => std::borrow::Cow::Borrowed(*p),
    };
    match snapshot
        .index
        .lookup(host.as_deref(), &matched, &req.method)
    {
        Lookup::Route(route) => {
            let normalized = match path {
                std::borrow::Cow::Owned(p) => Some(p),
                std::borrow::Cow::Borrowed(_) => None,
            };
            Ok((route, normalized))
        }
        Lookup::MethodNotAllowed(allow) => Err(Rejection {
            error: GatewayError::MethodNotAllowed,
            allow: Some(allow),
        }),
        Lookup::NotFound => Err(GatewayError::NoRoute.into()),
    }
}

/// The request's client IP, for X-Forwarded-For and hashing.
fn client_ip(session: &Session) -> Option<IpAddr> {
    session.client_addr()?.as_inet().map(SocketAddr::ip)
}

/// Appends `ip` in its usual text form. IPv4, nearly every request, is
/// written digit by digit: `Display` goes through the formatting machinery,
/// several times the cost.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        // Writing into a String cannot fail.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// The bytes a consistent-hash upstream hashes for this request.
fn hash_key<'a>(
    key: &HashKey,
    session: &'a Session,
    ctx: &'a RequestCtx,
    ip_buf: &'a mut [u8; 16],
) -> &'a [u8] {
    let ip_bytes = |buf: &'a mut [u8; 16]| -> &'a [u8] {
        match client_ip(session) {
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
        HashKey::Path => ctx
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

/// What the connection loop's head check learned about this request, or
/// the same looked up in the parsed header (a connection not from that
/// loop).
fn head_facts(session: &Session) -> HeadFacts {
    if let Some(stream) = session
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<RequestStream>())
    {
        return stream.facts();
    }
    let req = session.req_header();
    HeadFacts {
        upgrade: req.headers.contains_key(UPGRADE),
        length: req
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .and_then(|v| v.trim().parse::<u64>().ok()),
    }
}

/// A body declared larger than the route accepts is refused before any of
/// it is read or forwarded.
fn check_body_size(route: &Route, declared: Option<u64>) -> std::result::Result<(), Rejection> {
    match declared {
        Some(len) if len > route.max_body_bytes => Err(GatewayError::BodyTooLarge.into()),
        _ => Ok(()),
    }
}

/// Whether a `Connection` value lists `token`.
fn connection_lists(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Removes the response headers that describe one hop (RFC 9110 §7.6.1):
/// `Connection` and the headers it names, `Keep-Alive`, `Proxy-Connection`,
/// `Trailer`, `TE`, and `Upgrade` outside a 101. Refuses a transfer coding
/// other than chunked last. One pass over the names; the usual upstream
/// answer (`Connection: keep-alive` and nothing else of these) allocates
/// nothing, since Pingora writes its own `Connection` on a final response.
fn strip_hop_by_hop(resp: &mut ResponseHeader) -> Result<()> {
    let status = resp.status.as_u16();
    let interim = status < 200 && status != 101;
    let mut drop: [Option<HeaderName>; 6] = Default::default();
    let mut dropped = 0;
    let mut named = false;
    for (name, value) in resp.headers.iter() {
        let hop = match name.as_str() {
            "transfer-encoding" => {
                let last = value
                    .as_bytes()
                    .rsplit(|&b| b == b',')
                    .next()
                    .unwrap_or_default();
                if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Error::e_explain(
                        ErrorType::HTTPStatus(502),
                        "upstream transfer coding is not chunked",
                    );
                }
                false
            }
            "connection" => {
                named |= value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .any(|t| !is_hop_token(t));
                interim
            }
            "keep-alive" | "proxy-connection" | "trailer" | "te" => true,
            "upgrade" => status != 101,
            _ => false,
        };
        if hop && !drop.iter().flatten().any(|d| d == name) {
            if let Some(slot) = drop.get_mut(dropped) {
                *slot = Some(name.clone());
                dropped += 1;
            }
        }
    }
    for name in drop.iter().flatten() {
        resp.remove_header(name);
    }
    if named {
        // Rare: a Connection header naming other headers.
        let others: Vec<HeaderName> = resp
            .headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !is_hop_token(t))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in &others {
            resp.remove_header(name);
        }
    }
    Ok(())
}

/// `Connection` tokens whose headers are handled without parsing a name.
fn is_hop_token(token: &[u8]) -> bool {
    // `keep-alive` is nearly every upstream's whole Connection value.
    token.eq_ignore_ascii_case(b"keep-alive")
        || [&b"close"[..], b"upgrade", b"te", b"trailer", b""]
            .iter()
            .any(|t| token.len() == t.len() && token.eq_ignore_ascii_case(t))
}

impl Gateway {
    /// Rules of the client's protocol version for a request about to be
    /// proxied: only WebSocket routes upgrade, and only from an HTTP/1.1
    /// request that asks with `Connection: upgrade`; an HTTP/1.0 client
    /// gets no interim responses.
    fn apply_protocol_rules(&self, session: &mut Session, ctx: &RequestCtx, facts: HeadFacts) {
        let req = session.req_header();
        let http10 = req.version == Version::HTTP_10;
        if facts.upgrade {
            let allowed = ctx.matched().is_some_and(|m| m.route.websocket)
                && req.version == Version::HTTP_11
                && req
                    .headers
                    .get_all(CONNECTION)
                    .iter()
                    .any(|v| connection_lists(v, "upgrade"));
            if !allowed {
                // Without it Pingora treats the request as an ordinary one,
                // and a 101 answering it as the upstream's error.
                session.req_header_mut().remove_header(&UPGRADE);
            }
        }
        if http10 {
            session.req_header_mut().remove_header(&EXPECT);
            session.set_ignore_info_resp(true);
        }
    }

    /// Writes a gateway-made JSON response.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        rejection: Rejection,
    ) -> Result<()> {
        let error = rejection.error;
        ctx.error = Some(error);
        let request_id = std::str::from_utf8(ctx.request_id.as_bytes()).unwrap_or("");
        let body = error.body(request_id);
        let mut resp = error.header(body.len());
        resp.insert_header(case_name("X-Request-Id"), ctx.request_id.clone())?;
        if let Some(allow) = rejection.allow {
            resp.insert_header(ALLOW, allow)?;
        }
        let head_only = session.req_header().method == http::Method::HEAD;
        session
            .write_response_header(Box::new(resp), head_only)
            .await?;
        if !head_only {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }
}

/// How a proxy error is reported to the client.
fn classify(e: &Error) -> Option<GatewayError> {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (_, HTTPStatus(502)) => Some(GatewayError::UpstreamError),
        (_, HTTPStatus(504)) => Some(GatewayError::UpstreamTimeout),
        (_, HTTPStatus(400)) => Some(GatewayError::BadRequest("the request is malformed")),
        (_, HTTPStatus(408)) => Some(GatewayError::RequestTimeout),
        (_, HTTPStatus(413)) => Some(GatewayError::BodyTooLarge),
        (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout) => {
            Some(GatewayError::UpstreamTimeout)
        }
        (
            ErrorSource::Upstream,
            ConnectRefused | ConnectNoRoute | ConnectError | SocketError | ConnectProxyFailure
            | TLSHandshakeFailure | TLSHandshakeTimedout | HandshakeError,
        ) => Some(GatewayError::ConnectFailed),
        (ErrorSource::Upstream, _) => Some(GatewayError::UpstreamError),
        // The client went away: nobody is left to answer.
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => None,
        // The client stopped sending its body: its fault, and answered.
        (ErrorSource::Downstream, ReadTimedout) => Some(GatewayError::RequestTimeout),
        (ErrorSource::Downstream, WriteTimedout) => None,
        (ErrorSource::Downstream, _) => Some(GatewayError::BadRequest("the request is malformed")),
        _ => Some(GatewayError::Internal),
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules. Pingora's default registers a compression
    /// module that is switched off, yet still costs every request two
    /// allocations and a call per phase; tollgate does not compress.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            snapshot: None,
            route: None,
            normalized_path: None,
            path_parameters: false,
            interim_deadline: None,
            deadline: None,
            request_id: HeaderValue::from_static(""),
            request_id_generated: false,
            target: None,
            tried: Vec::new(),
            failures: 0,
            last_failure: None,
            error: None,
        }
    }

    /// Runs first for every request: take the snapshot, settle the request
    /// id, normalize the path and match the route. Answers 400/404/405 itself.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = self.store.current();

        // The head check left at most one X-Request-Id.
        match session.req_header().headers.get(&X_REQUEST_ID) {
            Some(id) if snapshot.trust_request_id && request_id::is_sane(id.as_bytes()) => {
                ctx.request_id = id.clone()
            }
            _ => {
                ctx.request_id = request_id::generate();
                ctx.request_id_generated = true;
            }
        }

        let facts = head_facts(session);
        let routed = route_request(&snapshot, session.req_header());
        ctx.snapshot = Some(snapshot);
        let verdict = routed.and_then(|(route, normalized_path)| {
            ctx.route = Some(route);
            ctx.path_parameters = normalized_path.as_deref().is_some_and(|p| p.contains(';'));
            ctx.normalized_path = normalized_path;
            let matched = ctx.matched().ok_or(GatewayError::Internal)?;
            check_body_size(matched.route, facts.length)?;
            ctx.deadline = matched.route.timeout.map(|t| std::time::Instant::now() + t);
            Ok(())
        });
        if let Err(rejection) = verdict {
            self.respond(session, ctx, rejection).await?;
            return Ok(true);
        }
        self.apply_protocol_rules(session, ctx, facts);
        Ok(false)
    }

    /// Counts the body as it streams (chunked bodies declare no length)
    /// against the route's limit.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A tunnel's traffic is not a body; a retry replays bytes already
        // counted, so the count is what was read from the client.
        if body.is_none() || session.was_upgraded() {
            return Ok(());
        }
        let read = session.body_bytes_read() as u64;
        let limit = ctx.matched().map_or(0, |m| m.route.max_body_bytes);
        if read > limit {
            ctx.error = Some(GatewayError::BodyTooLarge);
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                "request body over the route's limit",
            );
        }
        Ok(())
    }

    /// Picks a healthy target of the route's upstream that this request has
    /// not already failed on. Called again for each retry.
    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // Drop the previous attempt's load accounting before choosing again.
        ctx.target = None;
        let Some(Matched { cluster, .. }) = ctx.matched() else {
            return Error::e_explain(ErrorType::InternalError, "upstream_peer without a route");
        };
        let cluster = Arc::clone(cluster);
        let mut ip_buf = [0u8; 16];
        let key = if cluster.balance == Balance::ConsistentHash {
            hash_key(&cluster.hash_key, session, ctx, &mut ip_buf)
        } else {
            &[]
        };
        let Some(index) = cluster.select(key, &ctx.tried) else {
            let error = ctx.last_failure.unwrap_or(GatewayError::NoHealthyTarget);
            ctx.error = Some(error);
            return Error::e_explain(ErrorType::HTTPStatus(error.status()), error.message());
        };
        let mut peer = cluster
            .peer(index)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "selected target vanished"))?;
        if let Some(deadline) = ctx.deadline {
            // The route's timeout bounds all attempts together: this one
            // gets what is left of it.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                ctx.error = Some(GatewayError::UpstreamTimeout);
                return Error::e_explain(ErrorType::HTTPStatus(504), "route timeout");
            }
            let options = &mut peer.options;
            for t in [
                &mut options.connection_timeout,
                &mut options.read_timeout,
                &mut options.write_timeout,
            ] {
                *t = Some(t.map_or(left, |t| t.min(left)));
            }
        }
        ctx.target = Some((index, cluster.acquire(index)));
        Ok(peer)
    }

    /// Shapes the request the upstream sees: the normalized (and possibly
    /// stripped) path, forwarding headers, request id, route header edits.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(Matched { route, .. }) = ctx.matched() else {
            return Ok(());
        };

        let current = upstream_request.uri.path();
        let normalized = ctx.normalized_path.as_deref().unwrap_or(current);
        let forward = if ctx.path_parameters {
            route.upstream_path_by_segments(normalized)
        } else {
            route.upstream_path(normalized)
        };
        let absolute_form = !upstream_request.raw_path().starts_with(b"/");
        if forward != current || absolute_form {
            let target = match upstream_request.uri.query() {
                Some(q) => format!("{forward}?{q}"),
                None => forward.to_owned(),
            };
            upstream_request.set_raw_path(target.as_bytes())?;
        }

        if let Some(ip) = client_ip(session) {
            let mut xff = String::with_capacity(48);
            for prior in upstream_request.headers.get_all(&X_FORWARDED_FOR) {
                if let Ok(prior) = prior.to_str() {
                    xff.push_str(prior);
                    xff.push_str(", ");
                }
            }
            push_ip(&mut xff, ip);
            upstream_request.insert_header(case_name("X-Forwarded-For"), xff)?;
        }
        // A `&str` value would be copied into a new allocation per request.
        upstream_request.insert_header(
            case_name("X-Forwarded-Proto"),
            HeaderValue::from_static("http"),
        )?;
        match session.req_header().headers.get(HOST) {
            Some(host) => {
                upstream_request.insert_header(case_name("X-Forwarded-Host"), host.clone())?;
            }
            // Only an HTTP/1.0 request may come without Host; the upstream
            // still gets one: the target's authority, or the upstream's name.
            None => {
                let authority = session.req_header().uri.authority().map(|a| a.as_str());
                let cluster = ctx.matched().map(|m| m.cluster.name.as_str());
                if let Some(host) = authority.or(cluster) {
                    upstream_request.insert_header(HOST, host)?;
                }
            }
        }
        if ctx.request_id_generated {
            upstream_request.insert_header(case_name("X-Request-Id"), ctx.request_id.clone())?;
        }
        route.request_headers.apply(upstream_request);
        Ok(())
    }

    /// Checks the upstream's response head before anything of it is
    /// relayed: a status outside 100-599 or a body framing other than
    /// chunked or a length is the upstream's error (502); hop-by-hop
    /// headers stay on the upstream's hop; a 204 carries no length. An
    /// accepted upgrade turns the client connection into a tunnel.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if status > 599 {
            return Error::e_explain(ErrorType::HTTPStatus(502), "upstream status out of range");
        }
        if (100..200).contains(&status) && status != 101 {
            // Pingora restarts its read timer for each interim response;
            // an upstream sending them forever would hold the request.
            let now = std::time::Instant::now();
            let read = ctx
                .matched()
                .map_or(Duration::ZERO, |m| m.cluster.timeouts.read);
            if now > *ctx.interim_deadline.get_or_insert(now + read) {
                return Error::e_explain(
                    ErrorType::HTTPStatus(504),
                    "no final response within the read timeout",
                );
            }
        }
        strip_hop_by_hop(upstream_response)?;
        if status == 204 {
            upstream_response.remove_header(&CONTENT_LENGTH);
            upstream_response.remove_header(&TRANSFER_ENCODING);
        }
        if status == 101 {
            // Pingora relays a 101 whenever the requests to both sides
            // agree, including when neither asked for an upgrade.
            if !session.is_upgrade_req() {
                return Error::e_explain(
                    ErrorType::HTTPStatus(502),
                    "upstream switched protocols unasked",
                );
            }
            if let Some(stream) = session
                .stream()
                .and_then(|s| s.as_any().downcast_ref::<RequestStream>())
            {
                stream.open_tunnel();
            }
            // body_timeout is for request bodies; a tunnel may idle.
            session.set_read_timeout(None);
        }
        Ok(())
    }

    /// Echoes the request id and applies the route's response header edits.
    /// The client always sees tollgate's own HTTP version; an HTTP/1.0
    /// client gets a body delimited by the connection's close, never
    /// chunked.
    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if upstream_response.version != Version::HTTP_11 {
            upstream_response.set_version(Version::HTTP_11);
        }
        if session.req_header().version == Version::HTTP_10 {
            if upstream_response.headers.contains_key(TRANSFER_ENCODING) {
                upstream_response.remove_header(&TRANSFER_ENCODING);
            }
            // Without a length the body ends with the connection, so the
            // head must say `Connection: close`, keep-alive asked or not.
            if !upstream_response.headers.contains_key(CONTENT_LENGTH) {
                session.set_keepalive(None);
            }
        }
        upstream_response.insert_header(case_name("X-Request-Id"), ctx.request_id.clone())?;
        if let Some(Matched { route, .. }) = ctx.matched() {
            route.response_headers.apply(upstream_response);
        }
        Ok(())
    }

    /// Connect failures never reached the upstream, so any method may be
    /// retried, on another target, while the upstream's `retries` allow.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(addr) = peer.address().as_inet() {
            ctx.tried.push(*addr);
        }
        ctx.failures += 1;
        ctx.last_failure = classify(&e);
        e.set_retry(ctx.may_retry(FailureKind::ConnectFailure));
        e
    }

    /// The request may have reached the upstream: retry only idempotent
    /// methods, only before any response went to the client, and only with a
    /// complete copy of the body. A stale pooled connection (the upstream
    /// closed it before reading anything) is retried without counting.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        let body_complete = session.is_body_done();
        if !body_complete
            && *e.esource() == ErrorSource::Upstream
            && matches!(e.etype(), ErrorType::ReadTimedout)
        {
            // Each piece of body restarts the upstream's read timer, so it
            // ran out because the client stopped sending: the client's
            // timeout, not the upstream's, and nothing to retry.
            ctx.error = Some(GatewayError::RequestTimeout);
            e.set_retry(false);
            return e;
        }
        // A client that went away is not a reason to ask another target,
        // and a body not wholly received cannot be sent again.
        let replayable = *e.esource() == ErrorSource::Upstream
            && session.req_header().method.is_idempotent()
            && body_complete
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        let stale_pooled = client_reused && matches!(e.retry, RetryType::ReusedOnly);
        let retry = if !replayable {
            false
        } else if stale_pooled {
            true
        } else {
            if let Some(addr) = peer.address().as_inet() {
                ctx.tried.push(*addr);
            }
            ctx.failures += 1;
            ctx.last_failure = classify(&e);
            ctx.may_retry(FailureKind::of(&e))
        };
        e.set_retry(retry);
        e
    }

    /// The final error of a request that was meant to be proxied: answer
    /// with the JSON error, unless a response already started.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let error = ctx.error.take().or_else(|| classify(e));
        let Some(error) = error else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        // Interim (1xx) responses may have gone out; a final one may not.
        // After a 101 the connection is a tunnel: nothing more is written.
        let final_written = session.was_upgraded()
            || session
                .response_written()
                .is_some_and(|r| r.status == 101 || !r.status.is_informational());
        if !final_written {
            if let Err(write_error) = self.respond(session, ctx, error.into()).await {
                log::debug!("could not send error response: {write_error}");
            }
        }
        ctx.error = Some(error);
        FailToProxy {
            error_code: error.status(),
            can_reuse_downstream: false,
        }
    }

    /// Runs once per request, whatever happened.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.target = None;
        if log::log_enabled!(target: "tollgate::access", log::Level::Debug) {
            let status = session.response_written().map_or(0, |r| r.status.as_u16());
            let route = ctx.matched().map_or("-", |m| m.route.name.as_str());
            log::debug!(
                target: "tollgate::access",
                "{} {} {} route={} status={} id={} error={}",
                client_ip(session).map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                session.req_header().method,
                session.req_header().uri,
                route,
                status,
                String::from_utf8_lossy(ctx.request_id.as_bytes()),
                e.map_or_else(|| "-".to_owned(), |e| e.to_string()),
            );
        }
    }

    /// Gateway-made errors (404s, client disconnects) are outcomes, not
    /// faults of the gateway; keep them out of the error log.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        matches!(
            ctx.error,
            Some(
                GatewayError::NoRoute
                    | GatewayError::MethodNotAllowed
                    | GatewayError::BadRequest(_)
                    | GatewayError::RequestTimeout
                    | GatewayError::BodyTooLarge
            )
        ) || matches!(
            (error.esource(), error.etype()),
            (
                ErrorSource::Downstream,
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            )
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_ip_matches_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "203.0.113.9",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }
}
