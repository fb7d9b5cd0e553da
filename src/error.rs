//! Responses the gateway makes itself. All are JSON of one shape:
//! `{"error":{"status":502,"code":"upstream_unavailable","message":"...","request_id":"..."}}`
//! so clients and dashboards parse one format whatever went wrong.

use bytes::Bytes;
use pingora::http::ResponseHeader;

/// Why the gateway answered instead of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayError {
    BadRequest(&'static str),
    NoRoute,
    MethodNotAllowed,
    /// Missing or invalid credentials.
    Unauthorized(&'static str),
    /// A known caller, or client address, the route does not admit.
    Forbidden(&'static str),
    /// The client took too long to send the request head or body.
    RequestTimeout,
    BodyTooLarge,
    UriTooLong,
    /// The caller is over the route's rate limit.
    RateLimited,
    HeaderTooLarge(&'static str),
    /// A transfer coding other than chunked.
    NotImplemented(&'static str),
    VersionNotSupported,
    /// A route's or upstream's `max_inflight`, or the client's, is reached.
    Overloaded,
    /// Every target of the upstream has its circuit open.
    CircuitOpen,
    /// The request names a host the TLS connection's certificate does not
    /// cover, and not the connection's own SNI.
    Misdirected,
    NoHealthyTarget,
    ConnectFailed,
    UpstreamError,
    UpstreamTimeout,
    Internal,
}

impl GatewayError {
    pub fn status(self) -> u16 {
        match self {
            GatewayError::BadRequest(_) => 400,
            GatewayError::NoRoute => 404,
            GatewayError::MethodNotAllowed => 405,
            GatewayError::Unauthorized(_) => 401,
            GatewayError::Forbidden(_) => 403,
            GatewayError::RequestTimeout => 408,
            GatewayError::BodyTooLarge => 413,
            GatewayError::UriTooLong => 414,
            GatewayError::RateLimited => 429,
            GatewayError::HeaderTooLarge(_) => 431,
            GatewayError::NotImplemented(_) => 501,
            GatewayError::VersionNotSupported => 505,
            GatewayError::NoHealthyTarget
            | GatewayError::ConnectFailed
            | GatewayError::UpstreamError => 502,
            GatewayError::UpstreamTimeout => 504,
            GatewayError::Overloaded => 503,
            GatewayError::CircuitOpen => 503,
            GatewayError::Misdirected => 421,
            GatewayError::Internal => 500,
        }
    }

    /// The stable, machine-readable code.
    pub fn code(self) -> &'static str {
        match self {
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::NoRoute => "no_route",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::RequestTimeout => "request_timeout",
            GatewayError::BodyTooLarge => "body_too_large",
            GatewayError::UriTooLong => "uri_too_long",
            GatewayError::RateLimited => "rate_limited",
            GatewayError::HeaderTooLarge(_) => "header_too_large",
            GatewayError::NotImplemented(_) => "not_implemented",
            GatewayError::VersionNotSupported => "http_version_not_supported",
            GatewayError::NoHealthyTarget | GatewayError::ConnectFailed => "upstream_unavailable",
            GatewayError::UpstreamError => "upstream_error",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::Overloaded => "overloaded",
            GatewayError::CircuitOpen => "circuit_open",
            GatewayError::Misdirected => "misdirected_request",
            GatewayError::Internal => "internal_error",
        }
    }

    /// The human-readable explanation.
    pub fn message(self) -> &'static str {
        match self {
            GatewayError::BadRequest(why)
            | GatewayError::Unauthorized(why)
            | GatewayError::Forbidden(why)
            | GatewayError::HeaderTooLarge(why)
            | GatewayError::NotImplemented(why) => why,
            GatewayError::NoRoute => "no route matches this request",
            GatewayError::MethodNotAllowed => "the route does not accept this method",
            GatewayError::RequestTimeout => "the request was not received in time",
            GatewayError::BodyTooLarge => "the request body is larger than allowed",
            GatewayError::UriTooLong => "the request target is longer than allowed",
            GatewayError::RateLimited => {
                "too many requests; retry after the time Retry-After gives"
            }
            GatewayError::VersionNotSupported => "only HTTP/1.0 and HTTP/1.1 are supported",
            GatewayError::NoHealthyTarget => "the upstream has no healthy target",
            GatewayError::ConnectFailed => "could not connect to the upstream",
            GatewayError::UpstreamError => "the upstream failed while answering",
            GatewayError::UpstreamTimeout => "the upstream did not answer in time",
            GatewayError::Overloaded => "too many requests are in progress; retry shortly",
            GatewayError::CircuitOpen => {
                "every target of the upstream is failing; its circuits are open"
            }
            GatewayError::Misdirected => {
                "this connection's certificate does not cover the requested host; open a connection for it"
            }
            GatewayError::Internal => "the gateway failed to handle the request",
        }
    }

    /// The gRPC status a gRPC client gets for this error
    /// (`grpc/doc/statuscodes.md`), by what went wrong rather than by the
    /// HTTP status alone.
    pub fn grpc_status(self) -> u8 {
        match self {
            GatewayError::BadRequest(_)
            | GatewayError::UriTooLong
            | GatewayError::HeaderTooLarge(_)
            | GatewayError::NotImplemented(_)
            | GatewayError::VersionNotSupported => 3, // INVALID_ARGUMENT
            GatewayError::RequestTimeout | GatewayError::UpstreamTimeout => 4, // DEADLINE_EXCEEDED
            GatewayError::Forbidden(_) => 7,                                   // PERMISSION_DENIED
            GatewayError::RateLimited | GatewayError::BodyTooLarge => 8,       // RESOURCE_EXHAUSTED
            GatewayError::NoRoute | GatewayError::MethodNotAllowed => 12,      // UNIMPLEMENTED
            GatewayError::Internal => 13,                                      // INTERNAL
            GatewayError::Overloaded
            | GatewayError::CircuitOpen
            | GatewayError::NoHealthyTarget
            | GatewayError::ConnectFailed
            | GatewayError::UpstreamError
            | GatewayError::Misdirected => 14, // UNAVAILABLE
            GatewayError::Unauthorized(_) => 16,                               // UNAUTHENTICATED
        }
    }

    /// The JSON body for this error.
    pub fn body(self, request_id: &str) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "status": self.status(),
                "code": self.code(),
                "message": self.message(),
                "request_id": request_id,
            }
        });
        Bytes::from(body.to_string())
    }

    /// The whole response as bytes, for the connection loop, which answers
    /// before Pingora has a session to write through. It always closes the
    /// connection: a request whose head was refused leaves the framing of
    /// what follows unknown.
    pub fn raw_response(self, request_id: &str, head_only: bool, allow: Option<&str>) -> Vec<u8> {
        let body = self.body(request_id);
        let status = http::StatusCode::from_u16(self.status()).ok();
        let reason = status.and_then(|s| s.canonical_reason()).unwrap_or("");
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Request-Id: {request_id}\r\nConnection: close\r\n",
                self.status(),
                body.len()
            )
            .as_bytes(),
        );
        if let Some(allow) = allow {
            out.extend_from_slice(format!("Allow: {allow}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&body);
        }
        out
    }

    /// The response header for a body of `len` bytes.
    pub fn header(self, len: usize) -> ResponseHeader {
        // The status is one of ours, never from input; header inserts with
        // static names and numeric values cannot fail.
        let mut resp =
            ResponseHeader::build(self.status(), Some(4)).expect("gateway status codes are valid");
        let _ = resp.insert_header(http::header::CONTENT_TYPE, "application/json");
        let _ = resp.insert_header(http::header::CONTENT_LENGTH, len);
        let _ = resp.insert_header(http::header::CACHE_CONTROL, "no-store");
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_documented_shape() {
        let body = GatewayError::NoHealthyTarget.body("abc\"1");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["status"], 502);
        assert_eq!(v["error"]["code"], "upstream_unavailable");
        assert_eq!(v["error"]["request_id"], "abc\"1");
        assert!(v["error"]["message"].is_string());
    }
}
