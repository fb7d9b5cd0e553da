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
            request_id: request_id.as_bytes(),
            client_ip: client.map(|c| c.ip()),
            status: error.status(),
            error: Some(error.code()),
            ..access_log::Entry::default()
        };
        access_log::log(&entry);
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
/// assembled from a table of the 256 octets: `Display` goes through the
/// formatting machinery, several times the cost (X-Forwarded-For and the
/// access log write one per request).
pub fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            // Each octet's three table bytes are copied whole and the
            // length advances by its digits: no branch per digit, and one
            // capacity check for the address.
            let mut text = [0u8; 18];
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                let (digits, len) = OCTETS[usize::from(octet)];
                text[n..n + 3].copy_from_slice(&digits);
                n += usize::from(len);
                text[n] = b'.';
                n += usize::from(i < 3);
            }
            out.extend_from_slice(&text[..n]);
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Each octet's decimal digits, left-aligned, and how many there are.
static OCTETS: [([u8; 3], u8); 256] = {
    let mut table = [([0u8; 3], 0u8); 256];
    let mut i = 0;
    while i < 256 {
        let o = i as u8;
        table[i] = if o >= 100 {
            ([b'0' + o / 100, b'0' + o / 10 % 10, b'0' + o % 10], 3)
        } else if o >= 10 {
            ([b'0' + o / 10, b'0' + o % 10, 0], 2)
        } else {
            ([b'0' + o, 0, 0], 1)
        };
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "100.200.255.9",
            "255.255.255.255",
            "192.0.2.1",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ] {
            let ip: std::net::IpAddr = text.parse().unwrap();
            let mut out = b"x".to_vec();
            super::push_ip(&mut out, ip);
            assert_eq!(out, format!("x{ip}").as_bytes(), "{text}");
        }
        for o in 0..=255u8 {
            let ip = std::net::IpAddr::from([o, 255 - o, o / 3, 7]);
            let mut out = Vec::new();
            super::push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }
}
