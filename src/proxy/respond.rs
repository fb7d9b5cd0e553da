//! Responses the gateway makes itself, on one path: every rejection and
//! every failure to proxy ends here as the JSON error with the request id,
//! plus whatever headers the rejection carries (`Allow` now; later
//! `WWW-Authenticate`, `Retry-After`).

use super::ctx::RequestCtx;
use super::forward::case_name;
use crate::auth;
use crate::auth::cors::CorsPolicy;
use crate::error::GatewayError;
use http::header::{ALLOW, WWW_AUTHENTICATE};
use http::HeaderValue;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType, Result};

/// A request the gateway answers instead of an upstream.
pub struct Rejection {
    pub error: GatewayError,
    /// The `Allow` value of a 405.
    pub allow: Option<HeaderValue>,
}

impl From<GatewayError> for Rejection {
    fn from(error: GatewayError) -> Self {
        Rejection { error, allow: None }
    }
}

/// Writes the JSON error for `rejection`. A request whose body was not read
/// gets `Connection: close` (Pingora adds it) and a lingering close (the
/// connection's own), so its unread bytes are never taken for a request.
pub async fn respond(
    session: &mut Session,
    ctx: &mut RequestCtx,
    rejection: Rejection,
) -> Result<()> {
    let error = rejection.error;
    ctx.outcome = Some(error);
    let grpc = is_grpc(session.req_header());
    let body = if grpc {
        bytes::Bytes::new()
    } else {
        error.body(ctx.id.as_str())
    };
    let mut resp = if grpc {
        grpc_error(error)?
    } else {
        error.header(body.len())
    };
    resp.insert_header(case_name("X-Request-Id"), ctx.id.value.clone())?;
    if let Some(allow) = rejection.allow {
        resp.insert_header(ALLOW, allow)?;
    }
    if let Some(cors) = ctx
        .matched
        .as_ref()
        .and_then(|m| m.route.policy.cors.as_ref())
    {
        cors.decorate(session.req_header(), &mut resp)?;
    }
    if let GatewayError::Unauthorized(why) = error {
        let challenge = if why == auth::MISSING_CREDENTIALS {
            r#"Bearer realm="tollgate""#
        } else {
            r#"Bearer realm="tollgate", error="invalid_token""#
        };
        resp.insert_header(WWW_AUTHENTICATE, challenge)?;
    }
    super::response::set_rate_headers(&mut resp, ctx)?;
    super::response::close_when_draining(session);
    // A gRPC error is "trailers only": one header block ending the stream.
    // Pingora's session ignores "end" for HTTP/2 (it ends the stream later
    // with an empty DATA frame, and gRPC clients then see headers but no
    // trailers): the HTTP/2 session is told directly.
    if grpc {
        if let pingora::protocols::http::ServerSession::H2(h2) = session.downstream_session.as_mut()
        {
            resp.remove_header(&http::header::CONTENT_LENGTH);
            return h2.write_response_header(Box::new(resp), true);
        }
    }
    let head_only = grpc || session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Whether the client speaks gRPC (and reads errors from `grpc-status`,
/// not from a JSON body).
pub fn is_grpc(req: &pingora::http::RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A gateway error as gRPC sees one: HTTP 200 with `grpc-status` and
/// `grpc-message` (percent-encoded) and no body.
fn grpc_error(error: GatewayError) -> Result<pingora::http::ResponseHeader> {
    let mut resp = pingora::http::ResponseHeader::build(200, Some(6))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    resp.insert_header("grpc-status", error.grpc_status().to_string())?;
    let mut message = String::with_capacity(error.message().len());
    for b in error.message().bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            message.push(char::from(b));
        } else {
            message.push_str(&format!("%{b:02X}"));
        }
    }
    resp.insert_header("grpc-message", message)?;
    resp.insert_header("x-tollgate-error", error.code())?;
    resp.insert_header(http::header::CONTENT_LENGTH, 0)?;
    Ok(resp)
}

/// The gateway's answer to a CORS preflight: the route's rules, no body,
/// never the upstream's business.
pub async fn preflight(
    session: &mut Session,
    ctx: &mut RequestCtx,
    policy: &CorsPolicy,
) -> Result<()> {
    let mut resp = policy.preflight(session.req_header())?;
    resp.insert_header(case_name("X-Request-Id"), ctx.id.value.clone())?;
    resp.insert_header(http::header::CONTENT_LENGTH, 0)?;
    session.write_response_header(Box::new(resp), true).await?;
    Ok(())
}

/// A route's `https_redirect`: 308 (the method and body are kept) to the
/// same host and target over HTTPS, on the TLS listener's port.
pub async fn https_redirect(
    session: &mut Session,
    ctx: &mut RequestCtx,
    host: &str,
    port: u16,
) -> Result<()> {
    let req = session.req_header();
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    };
    let mut resp = pingora::http::ResponseHeader::build(308, Some(4))?;
    resp.insert_header(http::header::LOCATION, location)?;
    resp.insert_header(case_name("X-Request-Id"), ctx.id.value.clone())?;
    resp.insert_header(http::header::CONTENT_LENGTH, 0)?;
    super::response::close_when_draining(session);
    session.write_response_header(Box::new(resp), true).await?;
    Ok(())
}

/// How a proxy error is reported to the client; `None` when nobody is left
/// to answer.
pub fn classify(e: &Error) -> Option<GatewayError> {
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

/// An error that makes Pingora answer with status `error` (through
/// `fail_to_proxy`, which writes the JSON).
pub fn fail<T>(error: GatewayError, why: &'static str) -> Result<T> {
    Error::e_explain(ErrorType::HTTPStatus(error.status()), why)
}
