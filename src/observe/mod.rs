//! What the gateway records about requests: request ids and the access
//! log, including requests refused before routing.

pub mod access_log;
pub mod metrics;
pub mod request_id;

use crate::error::GatewayError;
use std::net::SocketAddr;

/// A request refused before it was routed (a malformed or oversized head,
/// a slow client): attack traffic, which must stay visible. This is the
/// hook the access log writes these requests through.
pub fn rejected_before_routing(client: Option<SocketAddr>, error: GatewayError, request_id: &str) {
    metrics::answered_unrouted(error.status());
    if access_log::enabled() {
        let entry = access_log::Entry {
            request_id,
            client_ip: client.map(|c| c.ip()),
            status: error.status(),
            error: Some(error.code()),
            ..access_log::Entry::default()
        };
        access_log::write(entry.line());
    }
    log::debug!(
        target: "tollgate::access",
        "{} - - route= status={} id={request_id} error={}",
        client.map_or_else(|| "-".to_owned(), |c| c.ip().to_string()),
        error.status(),
        error.code(),
    );
}

/// Appends `ip` in its usual text form. IPv4, nearly every request, is
/// written digit by digit: `Display` goes through the formatting machinery,
/// several times the cost (X-Forwarded-For and the access log write one
/// per request).
pub fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            // Built on the stack and appended once: one capacity check, not
            // one per digit.
            let mut text = [0u8; 15];
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    text[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    text[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                text[n] = b'0' + octet % 10;
                n += 1;
            }
            out.extend_from_slice(&text[..n]);
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}
