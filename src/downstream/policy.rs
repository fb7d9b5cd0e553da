//! The request-head policy every request goes through before routing,
//! whatever its protocol: HTTP/1 from the bytes tollgate's own parser
//! reads ([`super::head`]), HTTP/2 and h2c from the header Pingora parsed
//! ([`check_parsed`]). A rule written here holds on every protocol.
//!
//! - the method is an upper-case token; CONNECT is refused (405);
//! - the host (`Host`, an HTTP/2 `:authority`, an absolute target's
//!   authority) is one well-formed `host[:port]`, and where a request names
//!   it twice both agree;
//! - singleton fields (`Host`, `Authorization`) appear once;
//! - header names with `_` never go on (CGI-style backends read
//!   `X_Consumer` as `X-Consumer`), nor do a client's `X-Real-IP` and
//!   `Forwarded`; a repeated `X-Request-Id` goes on once;
//! - `Connection` may not nominate what the gateway itself sets
//!   (`X-Forwarded-*`, `Host`): such a nomination is ignored; a malformed
//!   one is refused.
//!
//! Framing (`Content-Length`, `Transfer-Encoding`) is HTTP/1's own and
//! stays in its parser; HTTP/2 frames its bodies itself.

use super::head::{HeadFacts, Rejection};
use crate::error::GatewayError;
use pingora::http::RequestHeader;

/// Longest method accepted.
const MAX_METHOD: usize = 32;
/// Pingora refuses a request whose `Connection` nominates this many
/// headers, after a target was chosen; refused here, before routing.
const MAX_NOMINATIONS: usize = 10;

fn bad(why: &'static str) -> Rejection {
    Rejection::from(GatewayError::BadRequest(why))
}

/// The method: an upper-case token of at most 32 bytes; CONNECT gets 405
/// (the gateway opens no tunnels to arbitrary hosts).
pub fn check_method(method: &[u8]) -> Result<(), Rejection> {
    if method.is_empty()
        || method.len() > MAX_METHOD
        || !method
            .iter()
            .all(|&b| TOKEN_BYTE[usize::from(b)] && !b.is_ascii_lowercase())
    {
        return Err(bad(
            "the method must be an upper-case token of at most 32 characters",
        ));
    }
    if method == b"CONNECT" {
        return Err(Rejection {
            allow: Some(""),
            ..Rejection::from(GatewayError::MethodNotAllowed)
        });
    }
    Ok(())
}

/// What [`FieldRules::field`] says of one header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Goes on as received.
    Keep,
    /// Never goes on.
    Drop,
    /// Goes on rewritten (a `Connection` without the nominations the
    /// gateway ignores: [`connection_kept`]).
    Rewrite,
}

/// The policy's rules for header fields, fed one field at a time in the
/// order received. Field names may come in any case.
#[derive(Debug, Default)]
pub struct FieldRules<'a> {
    hosts: u8,
    /// The (first) `Host` value.
    pub host: Option<&'a [u8]>,
    authorizations: u8,
    request_ids: u8,
    /// The request carries an `Upgrade` header.
    pub upgrade: bool,
    /// Some field does not go on as received.
    pub rewrite: bool,
}

impl<'a> FieldRules<'a> {
    pub fn field(&mut self, name: &[u8], value: &'a [u8]) -> Result<Field, Rejection> {
        // A plain loop: names are short, and memchr's call costs more
        // (callgrind: ~200 instructions per request over a few headers).
        #[allow(clippy::manual_contains)]
        if name.iter().any(|&b| b == b'_') {
            self.rewrite = true;
            return Ok(Field::Drop);
        }
        // Dispatch on length first: most fields are none of these.
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                self.hosts += 1;
                if self.hosts > 1 {
                    return Err(bad("the request has more than one Host header"));
                }
                self.host = Some(value);
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => self.upgrade = true,
            // What a client says of its own address, other than in
            // `X-Forwarded-For` (which the gateway extends): an upstream
            // would take it for the gateway's word.
            9 if name.eq_ignore_ascii_case(b"x-real-ip")
                || name.eq_ignore_ascii_case(b"forwarded") =>
            {
                self.rewrite = true;
                return Ok(Field::Drop);
            }
            10 if name.eq_ignore_ascii_case(b"connection") && nominations(value)? => {
                self.rewrite = true;
                return Ok(Field::Rewrite);
            }
            12 if name.eq_ignore_ascii_case(b"x-request-id") => {
                self.request_ids = self.request_ids.saturating_add(1);
                if self.request_ids > 1 {
                    self.rewrite = true;
                    return Ok(Field::Drop);
                }
            }
            13 if name.eq_ignore_ascii_case(b"authorization") => {
                self.authorizations += 1;
                // Which one would be checked, and which one an upstream
                // reads, is anybody's guess (RFC 9110 makes it a singleton).
                if self.authorizations > 1 {
                    return Err(bad("the request has more than one Authorization header"));
                }
            }
            _ => {}
        }
        Ok(Field::Keep)
    }
}

/// Headers the gateway sets itself: a client may not have them removed on
/// the way (Pingora refuses such a request once it is about to forward it).
fn gateway_set(token: &[u8]) -> bool {
    [
        &b"host"[..],
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
    ]
    .iter()
    .any(|n| token.eq_ignore_ascii_case(n))
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Checks a `Connection` value's nominations; true when one of them names
/// a header the gateway sets (and must be left out).
fn nominations(value: &[u8]) -> Result<bool, Rejection> {
    let mut count = 0;
    let mut ignored = false;
    for token in tokens(value) {
        count += 1;
        if count >= MAX_NOMINATIONS {
            return Err(bad("the Connection header nominates too many fields"));
        }
        if !token.iter().all(|&b| TOKEN_BYTE[usize::from(b)]) {
            return Err(bad("the Connection header is malformed"));
        }
        ignored |= gateway_set(token);
    }
    Ok(ignored)
}

/// A `Connection` value without the nominations the gateway ignores;
/// empty when none is left.
pub fn connection_kept(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for token in tokens(value).filter(|t| !gateway_set(t)) {
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(token);
    }
    out
}

/// The request's host, checked: `Host` and the authority the request line
/// or `:authority` names (with the scheme's default port), each a valid
/// `host[:port]`, and the same origin when both are there. Returns whether
/// there was one.
pub fn check_host(host: Option<&[u8]>, authority: Option<(&[u8], u16)>) -> Result<bool, Rejection> {
    let host = match host {
        Some(h) => Some(
            split_authority(h).ok_or_else(|| bad("the Host header is not a valid host[:port]"))?,
        ),
        None => None,
    };
    let Some((authority, default_port)) = authority else {
        return Ok(host.is_some());
    };
    let authority = split_authority(authority)
        .ok_or_else(|| bad("the request's authority is not a valid host[:port]"))?;
    if let Some(host) = host {
        if !same_host(host, authority, default_port) {
            return Err(bad(
                "the Host header does not match the request's authority",
            ));
        }
    }
    Ok(true)
}

/// The policy for a request head Pingora parsed (HTTP/2, h2c): checks it,
/// removes the fields that must not go on, and tells what the proxy needs
/// of it.
pub fn check_parsed(req: &mut RequestHeader) -> Result<HeadFacts, Rejection> {
    check_method(req.method.as_str().as_bytes())?;
    let mut rules = FieldRules::default();
    for (name, value) in req.headers.iter() {
        rules.field(name.as_str().as_bytes(), value.as_bytes())?;
    }
    let default_port = match req.uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => 443,
        _ => 80,
    };
    let authority = req
        .uri
        .authority()
        .map(|a| (a.as_str().as_bytes(), default_port));
    if !check_host(rules.host, authority)? {
        return Err(bad("the request names no host"));
    }
    let upgrade = rules.upgrade;
    // HTTP/2 frames its body itself, but an HTTP/1 upstream reads the
    // length: repeated (equal) values go on as one, as on HTTP/1.
    let mut lengths = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = lengths.next();
    let length = first
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.trim().parse().ok());
    let mut repeated = None;
    for other in lengths {
        if Some(other) != first {
            return Err(bad("the Content-Length header is invalid"));
        }
        repeated = first.cloned();
    }
    if rules.rewrite {
        drop_fields(req);
    }
    if let Some(one) = repeated {
        req.remove_header(&http::header::CONTENT_LENGTH);
        let _ = req.insert_header(http::header::CONTENT_LENGTH, one);
    }
    Ok(HeadFacts { upgrade, length })
}

/// Removes what [`FieldRules`] said must not go on from a parsed head
/// (rare: only then is anything allocated).
fn drop_fields(req: &mut RequestHeader) {
    let mut rules = FieldRules::default();
    let mut dropped: Vec<http::HeaderName> = Vec::new();
    let mut first_id = None;
    let mut connection = None;
    for (name, value) in req.headers.iter() {
        match rules.field(name.as_str().as_bytes(), value.as_bytes()) {
            Ok(Field::Drop) if name == "x-request-id" => {}
            Ok(Field::Drop) => dropped.push(name.clone()),
            Ok(Field::Rewrite) => connection = Some(connection_kept(value.as_bytes())),
            Ok(Field::Keep) if name == "x-request-id" => first_id = Some(value.clone()),
            _ => {}
        }
    }
    for name in &dropped {
        req.remove_header(name);
    }
    if let Some(id) = first_id {
        if req.headers.get_all("x-request-id").iter().nth(1).is_some() {
            req.remove_header("x-request-id");
            let _ = req.insert_header("x-request-id", id);
        }
    }
    if let Some(kept) = connection {
        req.remove_header(&http::header::CONNECTION);
        if !kept.is_empty() {
            let _ = req.insert_header(http::header::CONNECTION, kept);
        }
    }
}

/// `tchar` (RFC 9110 §5.6.2): the bytes of a method or a header name.
static TOKEN_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

/// Bytes of a host name as `Host` may carry them: letters, digits, `-`,
/// `.` and `_`. A table, since every request's Host goes through it.
static HOST_NAME_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_';
        b += 1;
    }
    table
};

/// `host[:port]` split and checked: a name of letters, digits, `-`, `.`
/// and `_`, an IPv4 address or a bracketed IPv6 address; a port of digits.
/// No user info, no spaces, commas, slashes or stray brackets.
pub fn split_authority(v: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let (host, port) = if v.first() == Some(&b'[') {
        let close = v.iter().position(|&b| b == b']')?;
        let inner = std::str::from_utf8(&v[1..close]).ok()?;
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        let rest = &v[close + 1..];
        match rest {
            [] => (&v[..=close], None),
            [b':', port @ ..] => (&v[..=close], Some(port)),
            _ => return None,
        }
    } else {
        // One pass: name bytes up to an optional `:`.
        let end = v
            .iter()
            .position(|&b| !HOST_NAME_BYTE[usize::from(b)])
            .unwrap_or(v.len());
        let (host, port) = match v.get(end) {
            None => (v, None),
            Some(b':') => (&v[..end], Some(&v[end + 1..])),
            Some(_) => return None,
        };
        // Empty labels (`.a`, `a..b`; one trailing dot is a fully
        // qualified name): an upstream that trims dots may read another
        // host than the one routed.
        if host.is_empty() || host[0] == b'.' || host.windows(2).any(|w| w == b"..") {
            return None;
        }
        (host, port)
    };
    if let Some(port) = port {
        if port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let value = port.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
        if value > u32::from(u16::MAX) {
            return None;
        }
    }
    Some((host, port))
}

/// Whether two `host[:port]`s name the same origin: case-insensitively,
/// without a trailing dot, with the scheme's default port for an absent
/// (or empty) one.
fn same_host(
    host: (&[u8], Option<&[u8]>),
    authority: (&[u8], Option<&[u8]>),
    default_port: u16,
) -> bool {
    let name = |h: &'_ [u8]| -> usize { h.len() - usize::from(h.ends_with(b".")) };
    let port = |p: Option<&[u8]>| -> u16 {
        p.filter(|p| !p.is_empty())
            .and_then(|p| std::str::from_utf8(p).ok()?.parse().ok())
            .unwrap_or(default_port)
    };
    let (a, b) = (host.0, authority.0);
    a[..name(a)].eq_ignore_ascii_case(&b[..name(b)]) && port(host.1) == port(authority.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Result<impl Sized, Rejection>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(r) => r.error.status(),
        }
    }

    fn h2(method: &str, uri: &str, headers: &[(&str, &[u8])]) -> RequestHeader {
        let mut req = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
        req.set_uri(uri.parse().unwrap());
        for (name, value) in headers {
            req.append_header(
                name.to_string(),
                http::HeaderValue::from_bytes(value).unwrap(),
            )
            .unwrap();
        }
        req
    }

    #[test]
    fn methods() {
        assert_eq!(status(check_method(b"GET")), 200);
        assert_eq!(status(check_method(b"PURGE")), 200);
        assert_eq!(status(check_method(b"get")), 400);
        assert_eq!(status(check_method(b"G(T")), 400);
        assert_eq!(status(check_method(b"")), 400);
        assert_eq!(status(check_method("X".repeat(33).as_bytes())), 400);
        assert_eq!(status(check_method(b"CONNECT")), 405);
    }

    #[test]
    fn parsed_heads_get_the_host_rules() {
        for host in [
            &b"admin.test\t"[..],
            b"admin.test,x",
            b"admin.test x",
            b"admin.test/x",
            b"\"admin.test\"",
            b"admin.test\\",
            b"admin.test:1:1",
            b"[admin.test]",
            b"admin.\xfftest",
            b"u@admin.test",
            b"",
            b"admin.test..",
            b".admin.test",
            b"admin..test",
        ] {
            let mut req = h2("GET", "/x", &[("host", host)]);
            assert_eq!(status(check_parsed(&mut req)), 400, "{host:?}");
        }
        let mut ok = h2("GET", "http://Admin.Test./x", &[("host", b"admin.test:80")]);
        assert_eq!(status(check_parsed(&mut ok)), 200);
        let mut other = h2("GET", "http://admin.test/x", &[("host", b"public.test")]);
        assert_eq!(status(check_parsed(&mut other)), 400);
        let mut none = h2("GET", "/x", &[]);
        assert_eq!(status(check_parsed(&mut none)), 400);
        let mut lower = h2("get", "http://a/x", &[]);
        assert_eq!(status(check_parsed(&mut lower)), 400);
    }

    #[test]
    fn parsed_heads_drop_what_http1_drops() {
        let mut req = h2(
            "GET",
            "http://a/x",
            &[
                ("x_consumer", b"admin"),
                ("x-request-id", b"one"),
                ("x_forwarded_for", b"10.0.0.1"),
                ("x-request-id", b"two"),
                ("x-real-ip", b"10.0.0.1"),
                ("forwarded", b"for=10.0.0.1"),
                ("accept", b"*/*"),
            ],
        );
        assert_eq!(status(check_parsed(&mut req)), 200);
        let mut names: Vec<_> = req
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        names.sort();
        assert_eq!(names, [("accept", &b"*/*"[..]), ("x-request-id", b"one")]);
    }

    #[test]
    fn a_repeated_content_length_goes_on_once() {
        let mut req = h2(
            "POST",
            "http://a/x",
            &[("content-length", b"5"), ("content-length", b"5")],
        );
        assert_eq!(check_parsed(&mut req).ok().and_then(|f| f.length), Some(5));
        assert_eq!(req.headers.get_all("content-length").iter().count(), 1);
        let mut req = h2(
            "POST",
            "http://a/x",
            &[("content-length", b"5"), ("content-length", b"6")],
        );
        assert_eq!(status(check_parsed(&mut req)), 400);
    }

    #[test]
    fn one_authorization() {
        let mut req = h2(
            "GET",
            "http://a/x",
            &[
                ("authorization", b"Bearer a"),
                ("authorization", b"Bearer b"),
            ],
        );
        assert_eq!(status(check_parsed(&mut req)), 400);
    }

    #[test]
    fn connection_nominations() {
        assert_eq!(nominations(b"close").ok(), Some(false));
        assert_eq!(nominations(b"X-Forwarded-For, close").ok(), Some(true));
        assert_eq!(status(nominations(b"\"x\"")), 400);
        assert_eq!(status(nominations(b":authority")), 400);
        assert_eq!(status(nominations(b"a,b,c,d,e,f,g,h,i,j")), 400);
        assert_eq!(connection_kept(b"X-Forwarded-For, close ,host"), b"close");
        assert_eq!(connection_kept(b"x-forwarded-proto"), b"");
    }
}
