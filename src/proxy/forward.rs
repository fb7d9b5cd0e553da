//! The request the upstream sees: the normalized (and possibly stripped)
//! path, forwarding headers, a Host, the request id, the route's header
//! edits.

use super::ctx::{RequestCtx, RouteMatch};
use crate::auth::{Identity, IdentityHeaders};
use crate::observe::push_ip;
use bytes::Bytes;
use http::header::HOST;
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Result;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Names of the headers tollgate adds, as Pingora's case-preserving header
/// names. Pingora turns a non-standard `HeaderName` into a freshly allocated
/// title-cased copy on every insert; a static name skips that copy.
pub fn case_name(name: &'static str) -> Bytes {
    Bytes::from_static(name.as_bytes())
}

/// The path (and query) the upstream gets: normalized, prefix stripped,
/// always in origin form.
pub fn set_path(upstream_request: &mut RequestHeader, m: &RouteMatch) -> Result<()> {
    let current = upstream_request.uri.path();
    let normalized = m.normalized_path.as_deref().unwrap_or(current);
    let forward = if m.path_parameters {
        m.route.upstream_path_by_segments(normalized)
    } else {
        m.route.upstream_path(normalized)
    };
    let absolute_form = !upstream_request.raw_path().starts_with(b"/");
    if forward != current || absolute_form {
        let target = match upstream_request.uri.query() {
            Some(q) => format!("{forward}?{q}"),
            None => forward.to_owned(),
        };
        upstream_request.set_raw_path(target.as_bytes())?;
    }
    Ok(())
}

/// `X-Forwarded-For` (the client's list with the client appended),
/// `X-Forwarded-Proto`, `X-Forwarded-Host`; and a `Host` for a request
/// that came without one (HTTP/1.0).
pub fn set_forwarding_headers(
    session: &Session,
    upstream_request: &mut RequestHeader,
    ctx: &RequestCtx,
    m: &RouteMatch,
) -> Result<()> {
    if let Some(ip) = ctx.client.peer {
        let mut xff = Vec::with_capacity(48);
        for prior in upstream_request.headers.get_all(&X_FORWARDED_FOR) {
            xff.extend_from_slice(prior.as_bytes());
            xff.extend_from_slice(b", ");
        }
        push_ip(&mut xff, ip);
        upstream_request.insert_header(case_name("X-Forwarded-For"), xff)?;
    }
    // A `&str` value would be copied into a new allocation per request.
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    upstream_request.insert_header(
        case_name("X-Forwarded-Proto"),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    )?;
    let req = session.req_header();
    match req.headers.get(HOST) {
        Some(host) => {
            upstream_request.insert_header(case_name("X-Forwarded-Host"), host.clone())?;
        }
        // An HTTP/2 request names its host in `:authority` (Pingora makes
        // it the upstream's Host); an HTTP/1.0 request may name none, and
        // the upstream still gets one: the upstream's name.
        None => match req.uri.authority() {
            Some(authority) => {
                let value = HeaderValue::from_str(authority.as_str())
                    .map_err(|_| pingora::Error::new(pingora::ErrorType::InvalidHTTPHeader))?;
                upstream_request.insert_header(case_name("X-Forwarded-Host"), value)?;
            }
            None => {
                upstream_request.insert_header(HOST, m.cluster.name.as_str())?;
            }
        },
    }
    Ok(())
}

/// The request id goes on only when tollgate chose it; a kept client id
/// is already the request's one `X-Request-Id`.
pub fn set_request_id(upstream_request: &mut RequestHeader, ctx: &RequestCtx) -> Result<()> {
    if ctx.id.generated {
        upstream_request.insert_header(case_name("X-Request-Id"), ctx.id.value.clone())?;
    }
    Ok(())
}

/// The caller's identity, as the route's authentication found it. A
/// client's own copy of any identity header (`X-Consumer`, forwarded
/// claims) never reaches an upstream, on any route: an upstream must be
/// able to trust them.
pub fn set_identity(
    upstream_request: &mut RequestHeader,
    ctx: &RequestCtx,
    m: &RouteMatch,
) -> Result<()> {
    for name in m.route.policy.identity_headers.iter() {
        if upstream_request.headers.contains_key(name) {
            upstream_request.remove_header(name);
        }
    }
    match ctx.client.identity.as_ref().map(Identity::headers) {
        Some(IdentityHeaders::Consumer(name)) => {
            upstream_request.insert_header(case_name("X-Consumer"), name.clone())?;
        }
        Some(IdentityHeaders::Claims(claims)) => {
            for (name, value) in claims {
                upstream_request.insert_header(name.clone(), value.clone())?;
            }
        }
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

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
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }
}
