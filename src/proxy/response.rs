//! The response side: what is checked in an upstream's answer before any
//! of it is relayed, and what every answer to the client carries.

use super::ctx::{RequestCtx, Timing};
use super::forward::case_name;
use super::respond::fail;
use crate::downstream::stream::RequestStream;
use crate::error::GatewayError;
use crate::limit::number;
use crate::upstream::Cluster;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderName, Version};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use std::time::Instant;

/// A status outside 100-599 is the upstream's error.
pub fn check_status(resp: &ResponseHeader) -> Result<()> {
    if resp.status.as_u16() > 599 {
        return fail(GatewayError::UpstreamError, "upstream status out of range");
    }
    Ok(())
}

/// Pingora restarts its read timer for each interim response; an upstream
/// sending them forever would hold the request. The read timeout runs
/// from the first one until the final head.
pub fn check_interim(resp: &ResponseHeader, timing: &mut Timing, cluster: &Cluster) -> Result<()> {
    let status = resp.status.as_u16();
    if (100..200).contains(&status) && status != 101 {
        let now = Instant::now();
        let deadline = *timing
            .interim_deadline
            .get_or_insert(now + cluster.timeouts.read);
        if now > deadline {
            return fail(
                GatewayError::UpstreamTimeout,
                "no final response within the read timeout",
            );
        }
    }
    Ok(())
}

/// Removes the response headers that describe one hop (RFC 9110 §7.6.1):
/// `Connection` and the headers it names, `Keep-Alive`, `Proxy-Connection`,
/// `Trailer`, `TE`, and `Upgrade` outside a 101. Refuses a transfer coding
/// other than chunked last. One pass over the names; the usual upstream
/// answer (`Connection: keep-alive` and nothing else of these) allocates
/// nothing, since Pingora writes its own `Connection` on a final response.
/// A 204 goes on without a length.
pub fn strip_hop_by_hop(resp: &mut ResponseHeader) -> Result<()> {
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
                    return fail(
                        GatewayError::UpstreamError,
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
    if status == 204 {
        resp.remove_header(&CONTENT_LENGTH);
        resp.remove_header(&TRANSFER_ENCODING);
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

/// A 101 goes through only as the answer to an upgrade request (Pingora
/// relays one whenever the requests to both sides agree, including when
/// neither asked); it turns the client connection into a tunnel, which
/// closes after `idle` without traffic either way, and at the route's
/// `deadline` (its `timeout`) however busy.
pub fn accept_upgrade(
    session: &mut Session,
    resp: &ResponseHeader,
    idle: std::time::Duration,
    deadline: Option<Instant>,
) -> Result<()> {
    if resp.status.as_u16() != 101 {
        return Ok(());
    }
    if !session.is_upgrade_req() {
        return fail(
            GatewayError::UpstreamError,
            "upstream switched protocols unasked",
        );
    }
    if let Some(stream) = session
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<RequestStream>())
    {
        stream.open_tunnel();
        if let Some(deadline) = deadline {
            stream.end_tunnel_at(deadline);
        }
    }
    // body_timeout is for request bodies; a tunnel may idle up to the
    // route's websocket_idle_timeout (the upstream side has it too).
    session.set_read_timeout(Some(idle));
    Ok(())
}

/// The client always sees tollgate's own HTTP version; an HTTP/1.0 client
/// gets a body delimited by the connection's close, never chunked, and is
/// told so.
pub fn fit_client_version(session: &mut Session, resp: &mut ResponseHeader) {
    if resp.version != Version::HTTP_11 {
        resp.set_version(Version::HTTP_11);
    }
    if session.req_header().version == Version::HTTP_10 {
        if resp.headers.contains_key(TRANSFER_ENCODING) {
            resp.remove_header(&TRANSFER_ENCODING);
        }
        if !resp.headers.contains_key(CONTENT_LENGTH) {
            session.set_keepalive(None);
        }
    }
}

/// The request id, echoed on every response.
pub fn echo_request_id(resp: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
    resp.insert_header(case_name("X-Request-Id"), ctx.id.value.clone())?;
    Ok(())
}

/// The `RateLimit-*` headers of a limited route, on every answer (the
/// upstream's and the gateway's own); a refusal adds `Retry-After`.
pub fn set_rate_headers(resp: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
    let Some(verdict) = ctx.rate.as_ref() else {
        return Ok(());
    };
    let d = verdict.decision;
    if verdict.headers {
        resp.insert_header(case_name("RateLimit-Limit"), verdict.limit.clone())?;
        resp.insert_header(
            case_name("RateLimit-Remaining"),
            number(u64::from(d.remaining)),
        )?;
        resp.insert_header(case_name("RateLimit-Reset"), number(d.reset))?;
    }
    // Every refusal says when to come back, also one whose figures are
    // unknown (a global limit refused by `on_error: deny`): the error body
    // points the client at this header.
    if !d.allowed {
        resp.insert_header(http::header::RETRY_AFTER, number(d.retry_after))?;
    }
    Ok(())
}

/// A stopping process answers with `Connection: close` and closes the
/// connection after the response, so the client's next request goes to a
/// new connection (the new process, after an upgrade).
pub fn close_when_draining(session: &mut Session) {
    if crate::downstream::drain::draining() {
        session.set_keepalive(None);
    }
}
