//! Client IP allow and deny lists: CIDR blocks, checked before any
//! credential.

use http::HeaderName;
use ipnet::{IpNet, Ipv4Net};
use pingora::http::RequestHeader;
use std::net::IpAddr;

/// One CIDR block. An IPv4-mapped IPv6 block (`::ffff:10.0.0.0/104`) is
/// kept as the IPv4 block it names (`10.0.0.0/8`): IPv4 clients are
/// matched as IPv4 whatever socket they came in on, so the mapped form
/// would otherwise match nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, `::ffff:10.0.0.0/104`, or a
    /// bare address (one host).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR block like 10.0.0.0/8"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let net = match prefix {
            None => Ok(IpNet::from(network)),
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| ())
                .and_then(|p| IpNet::new(network, p).map_err(|_| ())),
        }
        .map_err(|()| format!("{text:?}: the prefix length must be 0 to {max}"))?;
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has host bits set; write the network address, like {}",
                net.trunc()
            ));
        }
        Ok(Cidr(unmapped_net(net)))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on an IPv6 socket arrives mapped (::ffff:a.b.c.d).
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

/// The IPv4 block an IPv4-mapped block (within `::ffff:0:0/96`) names;
/// any other block as it is.
fn unmapped_net(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else {
        return net;
    };
    match (
        v6.network().to_ipv4_mapped(),
        v6.prefix_len().checked_sub(96),
    ) {
        (Some(v4), Some(prefix)) => Ipv4Net::new(v4, prefix).map_or(net, IpNet::V4),
        _ => net,
    }
}

/// Proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client behind `peer`: the peer itself, unless it is a trusted
    /// proxy; then `X-Forwarded-For` is walked from the right (the entry
    /// the peer added) past trusted hops, and the first address not
    /// trusted is the client. An entry that is not an address stops the
    /// walk at the hop that reported it: what lies left of it is the
    /// client's to write.
    pub fn client(&self, peer: IpAddr, req: &RequestHeader) -> IpAddr {
        if self.0.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for line in req.headers.get_all(&X_FORWARDED_FOR).iter().rev() {
            let Ok(text) = line.to_str() else {
                return client;
            };
            for entry in text.rsplit(',') {
                let Some(ip) = forwarded_address(entry.trim()) else {
                    return client;
                };
                client = ip;
                if !self.trusts(ip) {
                    return client;
                }
            }
        }
        client
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// An `X-Forwarded-For` entry: an address, possibly with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// A route's IP rules: a deny list, and an allow list that, when present,
/// admits only the addresses it names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpRules {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl IpRules {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether `ip` may use the route. Without a known client address only
    /// a route without rules admits the request.
    pub fn permits(&self, ip: Option<IpAddr>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(ip) = ip else {
            return false;
        };
        !self.deny.iter().any(|c| c.contains(ip))
            && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_found_past_trusted_proxies_only() {
        let trusted = TrustedProxies(vec![
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("192.0.2.7").unwrap(),
        ]);
        let client = |peer: &str, xff: &[&str]| {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            for line in xff {
                req.append_header("X-Forwarded-For", *line).unwrap();
            }
            trusted.client(ip(peer), &req)
        };
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(client("203.0.113.9", &["1.1.1.1"]), ip("203.0.113.9"));
        // A trusted peer: the rightmost untrusted entry.
        assert_eq!(client("10.0.0.1", &["1.1.1.1, 2.2.2.2"]), ip("2.2.2.2"));
        assert_eq!(
            client("10.0.0.1", &["6.6.6.6, 1.1.1.1, 10.9.9.9", "192.0.2.7"]),
            ip("1.1.1.1")
        );
        assert_eq!(
            client("10.0.0.1", &["[2001:db8::5]:4711"]),
            ip("2001:db8::5")
        );
        assert_eq!(client("10.0.0.1", &["1.1.1.1:80"]), ip("1.1.1.1"));
        // No header, or only trusted hops: the last trusted address.
        assert_eq!(client("10.0.0.1", &[]), ip("10.0.0.1"));
        assert_eq!(client("10.0.0.1", &["10.0.0.2"]), ip("10.0.0.2"));
        // Garbage stops the walk at the hop that reported it.
        assert_eq!(
            client("10.0.0.1", &["1.1.1.1, junk, 10.0.0.3"]),
            ip("10.0.0.3")
        );
        assert_eq!(
            TrustedProxies::default().client(
                ip("10.0.0.1"),
                &RequestHeader::build("GET", b"/", None).unwrap()
            ),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn blocks_contain_their_addresses() {
        let ten = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(ten.contains(ip("10.1.2.3")));
        assert!(!ten.contains(ip("11.0.0.1")));
        assert!(ten.contains(ip("::ffff:10.9.9.9")), "IPv4-mapped");
        let doc = Cidr::parse("2001:db8::/32").unwrap();
        assert!(doc.contains(ip("2001:db8::7")));
        assert!(!doc.contains(ip("10.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
    }

    #[test]
    fn an_ipv4_mapped_block_matches_the_ipv4_clients_it_names() {
        let mapped = Cidr::parse("::ffff:127.0.0.0/104").unwrap();
        assert_eq!(mapped, Cidr::parse("127.0.0.0/8").unwrap());
        assert!(mapped.contains(ip("127.0.0.1")));
        assert!(mapped.contains(ip("::ffff:127.9.9.9")), "arrived mapped");
        assert!(!mapped.contains(ip("128.0.0.1")));
        assert!(!mapped.contains(ip("::1")));
        let host = Cidr::parse("::ffff:192.0.2.7").unwrap();
        assert!(host.contains(ip("192.0.2.7")));
        assert!(!host.contains(ip("192.0.2.8")));
        assert!(Cidr::parse("::ffff:0:0/96")
            .unwrap()
            .contains(ip("203.0.113.1")));
        // A wider IPv6 block is IPv6 space: it names no IPv4 client.
        assert!(!Cidr::parse("::/0").unwrap().contains(ip("10.0.0.1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        assert!(Cidr::parse("::ffff:10.0.0.1/104").is_err(), "host bits");
        let rules = IpRules {
            allow: Vec::new(),
            deny: vec![mapped],
        };
        assert!(!rules.permits(Some(ip("127.0.0.1"))));
        assert!(rules.permits(Some(ip("10.0.0.1"))));
    }

    #[test]
    fn bad_blocks_are_refused() {
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "nonsense",
            "10.0.0.0/x",
            "::1/129",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let rules = IpRules {
            allow: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            deny: vec![Cidr::parse("10.6.0.0/16").unwrap()],
        };
        assert!(rules.permits(Some(ip("10.1.1.1"))));
        assert!(!rules.permits(Some(ip("10.6.1.1"))));
        assert!(!rules.permits(Some(ip("192.168.1.1"))));
        assert!(!rules.permits(None));
        assert!(IpRules::default().permits(None));
    }
}
