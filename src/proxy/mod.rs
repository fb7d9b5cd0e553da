//! The `ProxyHttp` implementation: one short method per Pingora phase, each a
//! sequence of named steps. Read top to bottom, it is the request's path
//! through the gateway.
//!
//! - [`ctx`]: what a request carries between phases;
//! - [`request`]: request id, route, the route's rules for the request;
//! - [`forward`]: the request the upstream sees;
//! - [`response`]: the checks on an upstream's answer, and what every
//!   answer carries;
//! - [`retry`]: whether a failed attempt goes to another target;
//! - [`respond`]: the one path for every answer the gateway makes itself.

pub mod ctx;
pub mod forward;
pub mod request;
pub mod respond;
pub mod response;
pub mod retry;

use crate::downstream::tls;
use crate::error::GatewayError;
use crate::observe::access_log;
use crate::observe::metrics::{self, InFlightRequest};
use crate::store::ConfigStore;
use crate::upstream::breaker::Outcome;
use crate::upstream::Balance;
use async_trait::async_trait;
use bytes::Bytes;
use ctx::RequestCtx;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorSource, ErrorType, Result};
use respond::{classify, fail, respond};
use retry::{decide, Decision, Failure, FailureKind};
use std::sync::Arc;
use std::time::Instant;

/// The gateway: a handle on the running configuration.
pub struct Gateway {
    store: Arc<ConfigStore>,
}

/// What the access log takes from the request and its answer (the rest
/// comes from its context).
pub(crate) struct Head<'a> {
    pub method: &'a str,
    pub protocol: &'static str,
    pub host: &'a [u8],
    pub path: &'a [u8],
    pub status: u16,
    pub bytes_in: usize,
    pub bytes_out: usize,
}

/// Counts a finished request in the metrics and writes its access log line
/// (and the slow-request warning).
pub(crate) fn record(ctx: &mut RequestCtx, head: &Head, outcome: Option<GatewayError>) {
    let upstream_addr = ctx.attempt.target.take().and_then(|(index, _)| {
        let m = ctx.matched.as_ref()?;
        m.cluster.targets.get(index).map(|t| t.addr)
    });
    let latency = ctx.timing.start.map(|t| t.elapsed()).unwrap_or_default();
    let status = head.status;
    match &ctx.matched {
        Some(m) => {
            m.route.metrics.answered(status, latency.as_secs_f64());
            if let Some(upstream) = ctx.timing.upstream_latency {
                m.cluster.metrics.answered(upstream.as_secs_f64());
            }
            match outcome {
                Some(GatewayError::RateLimited) => m.route.metrics.rate_limited(),
                Some(e) => {
                    if let Some(reason) = crate::auth::failure_reason(e) {
                        m.route.metrics.auth_failure(reason);
                    }
                }
                None => {}
            }
        }
        None => metrics::answered_unrouted(status),
    }
    let slow = ctx.timing.slow_after.is_some_and(|limit| latency > limit);
    if !access_log::enabled() && !slow {
        return;
    }
    let error = outcome.map(GatewayError::code);
    let entry = access_log::Entry {
        request_id: ctx.id.value.as_bytes(),
        client_ip: ctx.client.ip,
        method: head.method,
        protocol: head.protocol,
        host: head.host,
        path: head.path,
        status,
        route: ctx.matched.as_ref().map_or("", |m| m.route.name.as_str()),
        upstream: ctx.matched.as_ref().map_or("", |m| m.cluster.name.as_str()),
        route_fields: ctx.matched.as_ref().map_or(&[], |m| &m.route.log_names),
        upstream_addr,
        latency,
        upstream_latency: ctx.timing.upstream_latency,
        bytes_in: head.bytes_in,
        bytes_out: head.bytes_out,
        consumer: ctx.client.identity.as_ref().map(|i| i.name()),
        error,
        retries: ctx.attempt.failures,
    };
    if slow {
        log::warn!(
            "slow request: {} ms, {} {} route {:?} status {} id {}",
            latency.as_millis(),
            entry.method,
            String::from_utf8_lossy(entry.path),
            entry.route,
            status,
            ctx.id.as_str()
        );
    }
    if access_log::enabled() {
        access_log::log(&entry);
    }
}

/// Logs a request whose HTTP/2 stream was reset because its body stopped
/// arriving: 408, as HTTP/1 answers it (see `downstream::h2`).
pub(crate) fn record_abandoned(ctx: &mut RequestCtx) {
    crate::downstream::h2::abandoned(|head| {
        let head = Head {
            method: head.method.as_str(),
            protocol: access_log::protocol(http::Version::HTTP_2),
            host: head.host,
            path: head.path,
            // An answer may already be on its way (a gRPC stream, an
            // upstream that answered early): its status is what the client
            // got before the reset.
            status: match ctx.responded {
                0 => GatewayError::RequestTimeout.status(),
                answered => answered,
            },
            bytes_in: head.bytes_in,
            bytes_out: 0,
        };
        record(ctx, &head, Some(GatewayError::RequestTimeout));
    });
}

impl Gateway {
    pub fn new(store: Arc<ConfigStore>) -> Self {
        Gateway { store }
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
        RequestCtx::new()
    }

    /// Runs first for every request: begin (snapshot, request id, client),
    /// then route, then the route's rules; answers itself (400, 404, 405,
    /// 413) or lets the request go on.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Begin.
        ctx.timing.start = Some(Instant::now());
        ctx.in_progress = InFlightRequest::start();
        let snapshot = self.store.load();
        ctx.timing.slow_after = snapshot.slow_request_threshold;
        request::settle_request_id(&snapshot, session.req_header(), ctx);
        ctx.client.peer = request::peer_ip(session);
        ctx.client.ip = ctx
            .client
            .peer
            .map(|peer| snapshot.trusted_proxies.client(peer, session.req_header()));
        // One head policy for every protocol, before routing.
        let facts = match request::check_head(session) {
            Ok(facts) => facts,
            Err(rejection) => {
                drop(snapshot);
                respond(session, ctx, rejection).await?;
                return Ok(true);
            }
        };

        // Route. A CORS preflight is routed by the method it asks about,
        // and answered for that route (a browser sends no credentials with
        // it), after the route's address and transport rules.
        let (routed, preflight) = request::route_or_preflight(&snapshot, session.req_header());
        drop(snapshot);
        let m = match routed {
            Ok(m) => ctx.matched.insert(m),
            Err(rejection) => {
                respond(session, ctx, rejection).await?;
                return Ok(true);
            }
        };

        // Transport: TLS requests stay on the hosts their certificate was
        // chosen for; plain ones go to HTTPS where the route says so.
        match tls::served(session.digest()) {
            Some(served) => {
                if request::misdirected(
                    served,
                    request::request_host(session.req_header()).as_deref(),
                ) {
                    respond(session, ctx, GatewayError::Misdirected.into()).await?;
                    return Ok(true);
                }
            }
            None => {
                if let Some(port) = m.route.policy.https_redirect {
                    // Never served over plain HTTP: without a host to
                    // redirect to, the request is refused.
                    let Some(host) = request::request_host(session.req_header()) else {
                        let error =
                            GatewayError::BadRequest("a Host is needed to redirect to HTTPS");
                        respond(session, ctx, error.into()).await?;
                        return Ok(true);
                    };
                    let host = host.into_owned();
                    respond::https_redirect(session, ctx, &host, port).await?;
                    return Ok(true);
                }
            }
        }

        // A preflight is held to the route's address rules, not to its
        // credentials.
        if let Some(policy) = preflight {
            match m.route.policy.access.check_address(ctx.client.ip) {
                Ok(()) => respond::preflight(session, ctx, &policy).await?,
                Err(error) => respond(session, ctx, error.into()).await?,
            }
            return Ok(true);
        }

        // The route's rules for this request. A refusal from here on
        // knows its route (a CORS route's errors are readable by the page).
        let mut checked = request::check_body_size(m, facts);
        if checked.is_ok() {
            checked = request::authorize(m, session.req_header(), &mut ctx.client).await;
        }
        if checked.is_ok() {
            checked =
                request::rate_limit(m, session.req_header(), &ctx.client, &mut ctx.rate).await;
        }
        if checked.is_ok() {
            checked = request::admit(m, session.req_header(), &ctx.client, &mut ctx.slots);
        }
        if let Err(rejection) = checked {
            respond(session, ctx, rejection).await?;
            return Ok(true);
        }
        request::start_deadline(m.route.policy.timeout, &mut ctx.timing);
        request::apply_protocol_rules(session, m, facts);
        Ok(false)
    }

    /// Counts the body as it streams (chunked bodies declare no length)
    /// against the route's limit.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Pingora times HTTP/1 body reads itself; HTTP/2 streams keep a
        // clock of their own (a no-op for HTTP/1).
        crate::downstream::h2::body_progress(session.body_bytes_read(), end_of_stream);
        // An HTTP/2 body may end with an empty DATA frame. Pingora passes
        // it on as an empty last piece, which its chunked writer to an
        // HTTP/1 upstream turns into a terminating chunk, and then ends
        // the body with a second one: the upstream reads that as another
        // request, and its reply (an error, usually) may be taken from the
        // pooled connection as the answer to the next request sent on it.
        // Nothing to write is no piece.
        if end_of_stream && body.as_ref().is_some_and(Bytes::is_empty) {
            *body = None;
        }
        // A tunnel's traffic is not a body; a retry replays bytes already
        // counted, so the count is what was read from the client.
        if body.is_none() || session.was_upgraded() {
            return Ok(());
        }
        let limit = ctx
            .matched
            .as_ref()
            .map_or(0, |m| m.route.policy.max_body_bytes);
        if session.body_bytes_read() as u64 > limit {
            ctx.outcome = Some(GatewayError::BodyTooLarge);
            return fail(
                GatewayError::BodyTooLarge,
                "request body over the route's limit",
            );
        }
        Ok(())
    }

    /// Picks a healthy target of the route's upstream that this request has
    /// not already failed on, with what is left of the route's timeout.
    /// Called again for each retry.
    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // Drop the previous attempt's load accounting before choosing again.
        ctx.attempt.target = None;
        let Some(m) = ctx.matched.as_ref() else {
            ctx.outcome = Some(GatewayError::Internal);
            return Error::e_explain(ErrorType::InternalError, "upstream_peer without a route");
        };
        let cluster = Arc::clone(&m.cluster);
        let mut ip_buf = [0u8; 16];
        let key = if cluster.balance == Balance::ConsistentHash {
            request::hash_key(&cluster.hash_key, session, ctx, m, &mut ip_buf)
        } else {
            &[]
        };
        let Some(index) = cluster.select(key, &ctx.attempt.tried) else {
            let error = if cluster.circuits_open(&ctx.attempt.tried) {
                GatewayError::CircuitOpen
            } else {
                ctx.attempt
                    .last_failure
                    .unwrap_or(GatewayError::NoHealthyTarget)
            };
            ctx.outcome = Some(error);
            return fail(error, error.message());
        };
        let mut peer = cluster
            .peer(index)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "selected target vanished"))?;
        if session.is_upgrade_req() {
            // An upgraded connection reads the upstream with this timeout
            // for its whole life (Pingora sets it per connection): a tunnel
            // may idle up to websocket_idle_timeout, never just
            // timeouts.read. Until the 101 the route's `timeout`, when it
            // has one, cuts it below.
            peer.options.read_timeout = Some(m.route.policy.websocket_idle_timeout);
        }
        if let Some(deadline) = ctx.timing.deadline {
            // The route's timeout bounds all attempts together: this one
            // gets what is left of it.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                ctx.outcome = Some(GatewayError::UpstreamTimeout);
                return fail(GatewayError::UpstreamTimeout, "route timeout");
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
        ctx.attempt.target = Some((index, cluster.acquire(index)));
        ctx.timing.upstream_start = Some(Instant::now());
        ctx.attempt.breaker = cluster.targets.get(index).and_then(|t| t.breaker.clone());
        Ok(peer)
    }

    /// Shapes the request the upstream sees. Without a route nothing is
    /// forwarded.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The body is forwarded from here on: an HTTP/2 body's clock runs.
        crate::downstream::h2::body_wanted();
        let Some(m) = ctx.matched.as_ref() else {
            ctx.outcome = Some(GatewayError::Internal);
            return Error::e_explain(ErrorType::InternalError, "forwarding without a route");
        };
        forward::set_path(upstream_request, m)?;
        forward::set_forwarding_headers(session, upstream_request, ctx, m)?;
        forward::set_request_id(upstream_request, ctx)?;
        forward::set_identity(upstream_request, ctx, m)?;
        m.route.request_headers.apply(upstream_request);
        Ok(())
    }

    /// Checks the upstream's response head before anything of it is
    /// relayed.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(m) = ctx.matched.as_ref() else {
            return fail(GatewayError::Internal, "a response without a route");
        };
        let m_cluster = Arc::clone(&m.cluster);
        let tunnel_idle = m.route.policy.websocket_idle_timeout;
        ctx.timing.upstream_latency = ctx.timing.upstream_start.map(|t| t.elapsed());
        if let Some(breaker) = ctx.attempt.breaker.take() {
            let outcome = breaker
                .settings
                .outcome_of(upstream_response.status.as_u16());
            m_cluster.record(&breaker, outcome, Instant::now());
        }
        response::check_status(upstream_response)?;
        response::check_interim(upstream_response, &mut ctx.timing, &m_cluster)?;
        response::strip_hop_by_hop(upstream_response)?;
        response::accept_upgrade(session, upstream_response, tunnel_idle, ctx.timing.deadline)?;
        Ok(())
    }

    /// What every answer to the client carries: tollgate's HTTP version,
    /// the request id, the route's response header edits.
    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.responded = upstream_response.status.as_u16();
        response::close_when_draining(session);
        response::fit_client_version(session, upstream_response);
        response::echo_request_id(upstream_response, ctx)?;
        response::set_rate_headers(upstream_response, ctx)?;
        if let Some(m) = ctx.matched.as_ref() {
            if let Some(cors) = &m.route.policy.cors {
                cors.decorate(session.req_header(), upstream_response)?;
            }
            m.route.response_headers.apply(upstream_response);
        }
        Ok(())
    }

    /// A connect failure never reached the upstream: see [`retry::decide`].
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let failure = self.failure(ctx, FailureKind::ConnectFailure, true, |f| f);
        let decision = decide(&failure);
        self.record_failure(peer, ctx, &e, decision, Outcome::ConnectFailure);
        e.set_retry(matches!(decision, Decision::Retry { .. }));
        e
    }

    /// The request may have reached the upstream: see [`retry::decide`].
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // Until another attempt starts, the body is not being read.
        crate::downstream::h2::body_not_wanted();
        let mut e = e.more_context(format!("peer: {peer}"));
        let body_done = session.is_body_done();
        let failure = self.failure(ctx, FailureKind::of(&e), Failure::from_upstream(&e), |f| {
            Failure {
                reading: matches!(e.etype(), ErrorType::ReadTimedout),
                stale_pooled: Failure::stale_pooled(&e, client_reused),
                idempotent: session.req_header().method.is_idempotent(),
                body_replayable: body_done && !session.as_ref().retry_buffer_truncated(),
                body_incomplete: !body_done,
                response_started: session.response_written().is_some(),
                ..f
            }
        });
        let decision = decide(&failure);
        match decision {
            Decision::ClientStalled => ctx.outcome = Some(GatewayError::RequestTimeout),
            Decision::Retry { counts: true } | Decision::Stop if failure.from_upstream => {
                self.record_failure(peer, ctx, &e, decision, Outcome::Error)
            }
            _ => {}
        }
        e.set_retry(matches!(decision, Decision::Retry { .. }));
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
        let Some(error) = ctx.outcome.take().or_else(|| classify(e)) else {
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
            // The connection is not reused after this answer
            // (`can_reuse_downstream` below): it says so, or a client
            // would send its next request into a closing connection.
            session.set_keepalive(None);
            if let Err(write_error) = respond(session, ctx, error.into()).await {
                log::debug!("could not send error response: {write_error}");
            }
        }
        ctx.outcome = Some(error);
        FailToProxy {
            error_code: error.status(),
            can_reuse_downstream: false,
        }
    }

    /// Runs once per request, whatever happened.
    /// The access log line and the slow-request warning.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.logged = true;
        let outcome = ctx.outcome.or_else(|| e.and_then(classify));
        let req = session.req_header();
        let head = Head {
            method: req.method.as_str(),
            protocol: access_log::protocol(req.version),
            host: request::host_field(req).unwrap_or_default(),
            path: req.uri.path().as_bytes(),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
        };
        record(ctx, &head, outcome);
    }

    /// Gateway-made errors (404s, client disconnects) are outcomes, not
    /// faults of the gateway; keep them out of the error log.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        matches!(
            ctx.outcome,
            Some(
                GatewayError::NoRoute
                    | GatewayError::MethodNotAllowed
                    | GatewayError::Unauthorized(_)
                    | GatewayError::Forbidden(_)
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

impl Gateway {
    /// The facts of a failed attempt that do not depend on how it failed,
    /// completed by `with` for an error after connecting.
    fn failure(
        &self,
        ctx: &RequestCtx,
        kind: FailureKind,
        from_upstream: bool,
        with: impl FnOnce(Failure) -> Failure,
    ) -> Failure {
        let (retries, retry_on) = ctx.matched.as_ref().map_or((0, Default::default()), |m| {
            (m.cluster.retries, m.cluster.retry_on)
        });
        with(Failure {
            kind,
            reading: true,
            from_upstream,
            stale_pooled: false,
            idempotent: true,
            body_replayable: true,
            body_incomplete: false,
            response_started: false,
            // This failure counts if it is retried or reported.
            failures: ctx.attempt.failures + 1,
            retries,
            retry_on,
            past_deadline: ctx.timing.past_deadline(),
        })
    }

    /// Remembers a failed target, so a retry goes elsewhere, and how it
    /// failed, in case no target is left.
    fn record_failure(
        &self,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: &Error,
        decision: Decision,
        outcome: Outcome,
    ) {
        if decision == (Decision::Retry { counts: false }) {
            return;
        }
        // The target's fault (a stale pooled connection returned above
        // is not): its breaker counts it.
        if let (Some(breaker), Some(m)) = (ctx.attempt.breaker.take(), ctx.matched.as_ref()) {
            m.cluster.record(&breaker, outcome, Instant::now());
        }
        if let Some(addr) = peer.address().as_inet() {
            ctx.attempt.tried.push(*addr);
        }
        ctx.attempt.failures += 1;
        ctx.attempt.last_failure = classify(e);
    }
}
