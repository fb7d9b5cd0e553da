//! The request head as the client sent it: parsed and checked on the raw
//! bytes, before Pingora parses them again, so that everything a hostile or
//! broken client can get wrong in a head is answered with the gateway's own
//! JSON error (Pingora answers a bare `Server: Pingora` 400 and nothing
//! reaches tollgate's hooks).
//!
//! Checked here: size limits (request target, whole head, header count),
//! the request line (method, target form, version), `Host` (present on
//! HTTP/1.1, one, well-formed, agreeing with an absolute-form target) and
//! body framing (`Content-Length` values, transfer codings). Rewritten
//! here, since it is cheapest before anything is parsed into header maps:
//! header names with underscores are dropped, a repeated `X-Request-Id` is
//! cut to the first, and a repeated `Content-Length` is sent on as one.

use super::framing::{Chunked, Framing};
use super::policy::{self, Field};
use super::Limits;
use crate::error::GatewayError;
use bytes::BytesMut;
use once_cell::sync::Lazy;

/// Pingora's parser takes at most this many header fields, so the
/// configured limit cannot be higher.
pub const MAX_HEADERS: usize = 256;
/// Room for the method, spaces and version around the request target.
const REQUEST_LINE_EXTRA: usize = 48;

/// The outcome of looking at the bytes received so far.
#[derive(Debug)]
pub enum HeadStatus {
    /// The head is not complete yet; read more.
    Partial,
    Complete(Head),
    Rejected(Rejection),
}

/// A complete, acceptable head.
#[derive(Debug)]
pub struct Head {
    /// Length of the head in the received bytes, blank line included.
    pub len: usize,
    /// Where the request's body ends.
    pub framing: Framing,
    /// What the proxy would otherwise look up in the parsed header map.
    pub facts: HeadFacts,
    /// A replacement for the received head, when lines were dropped or
    /// merged; `None` (the usual case) forwards the head as received.
    pub rewritten: Option<BytesMut>,
}

/// Facts about a head the proxy needs for every request, learned while
/// checking it, so the proxy does not search the header map again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadFacts {
    /// The request carries an `Upgrade` header.
    pub upgrade: bool,
    /// The `Content-Length` the request declares.
    pub length: Option<u64>,
}

/// A head the gateway answers itself, closing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub error: GatewayError,
    /// A HEAD request gets no response body.
    pub head_only: bool,
    /// The `Allow` value of a 405.
    pub allow: Option<&'static str>,
}

impl Rejection {
    fn new(error: GatewayError) -> Self {
        Rejection {
            error,
            head_only: false,
            allow: None,
        }
    }
}

impl From<GatewayError> for Rejection {
    fn from(error: GatewayError) -> Self {
        Rejection::new(error)
    }
}

/// Looks at the first bytes of a request. Called again as more arrive.
pub fn check(buf: &[u8], limits: &Limits) -> HeadStatus {
    // Uninitialized slots: zeroing 256 of them would cost more than
    // parsing a typical head.
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let slots = &mut slots[..limits.max_headers.clamp(1, MAX_HEADERS)];
    let mut req = httparse::Request::new(&mut []);
    let parsed = req.parse_with_uninit_headers(buf, slots);
    let head_only = req.method == Some("HEAD");
    let reject = |error: GatewayError| {
        HeadStatus::Rejected(Rejection {
            head_only,
            ..Rejection::new(error)
        })
    };
    match parsed {
        Ok(httparse::Status::Complete(len)) => match validate(&req, limits) {
            Ok(checked) => {
                let rewritten = checked.rewrite.then(|| rewrite(&req));
                HeadStatus::Complete(Head {
                    len,
                    framing: checked.framing,
                    facts: checked.facts,
                    rewritten,
                })
            }
            Err(rejection) => HeadStatus::Rejected(Rejection {
                head_only,
                ..rejection
            }),
        },
        Ok(httparse::Status::Partial) => {
            let line_done = buf.contains(&b'\n');
            let target_too_long = match req.path {
                Some(path) => path.len() > limits.max_uri_bytes,
                None => !line_done && buf.len() > limits.max_uri_bytes + REQUEST_LINE_EXTRA,
            };
            if target_too_long {
                reject(GatewayError::UriTooLong)
            } else if buf.len() >= limits.max_header_bytes {
                reject(if line_done {
                    GatewayError::HeaderTooLarge("the request head is larger than allowed")
                } else {
                    GatewayError::UriTooLong
                })
            } else {
                HeadStatus::Partial
            }
        }
        Err(httparse::Error::TooManyHeaders) => reject(GatewayError::HeaderTooLarge(
            "the request has more header fields than allowed",
        )),
        Err(httparse::Error::Version) if names_another_version(buf) => {
            reject(GatewayError::VersionNotSupported)
        }
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => reject(
            GatewayError::BadRequest("a header field of the request is malformed"),
        ),
        Err(_) => reject(GatewayError::BadRequest("the request line is malformed")),
    }
}

/// Whether the request line is well formed but for its version
/// (`GET / HTTP/2.0`), which gets 505 rather than 400.
fn names_another_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && !target.is_empty()
        && matches!(version, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit())
}

/// What validation learned beyond "acceptable".
struct Checked {
    framing: Framing,
    facts: HeadFacts,
    rewrite: bool,
}

fn validate(req: &httparse::Request<'_, '_>, limits: &Limits) -> Result<Checked, Rejection> {
    let bad = |why| Err(Rejection::new(GatewayError::BadRequest(why)));
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    let http11 = req.version == Some(1);

    policy::check_method(method.as_bytes())?;
    if target.len() > limits.max_uri_bytes {
        return Err(GatewayError::UriTooLong.into());
    }
    let absolute =
        match target.as_bytes().first() {
            Some(b'/') => None,
            Some(b'*') if target == "*" && method == "OPTIONS" => None,
            _ => match absolute_authority(target) {
                Some(authority) => Some(authority),
                None => return bad(
                    "the request target must be a path, an absolute http(s) URL, or * for OPTIONS",
                ),
            },
        };
    if !target_bytes_allowed(target.as_bytes()) {
        return bad("the request target has a character that must be percent-encoded");
    }

    let mut rules = policy::FieldRules::default();
    let mut lengths: Option<u64> = None;
    let mut length_fields = 0;
    let mut codings = 0;
    let mut chunked = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if rules.field(name, h.value)? != Field::Keep {
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            for value in h.value.split(|&b| b == b',') {
                length_fields += 1;
                let Some(n) = parse_length(value) else {
                    return bad("the Content-Length header is invalid");
                };
                if lengths.is_some_and(|l| l != n) {
                    return bad("the Content-Length header is invalid");
                }
                lengths = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings += 1;
            let value = trim(h.value);
            if !value.eq_ignore_ascii_case(b"chunked") {
                let only_chunked = value
                    .split(|&b| b == b',')
                    .all(|c| trim(c).eq_ignore_ascii_case(b"chunked"));
                return Err(if only_chunked {
                    GatewayError::BadRequest("the Transfer-Encoding header is invalid").into()
                } else {
                    GatewayError::NotImplemented("only the chunked transfer coding is supported")
                        .into()
                });
            }
            chunked = true;
        }
    }
    let mut rewrite = rules.rewrite;

    if http11 && rules.host.is_none() {
        return bad("an HTTP/1.1 request needs a Host header");
    }
    // Sent on in origin form with a Host, which Pingora and every upstream
    // read the same way.
    rewrite |= absolute.is_some();
    policy::check_host(
        rules.host,
        absolute.map(|(port, authority)| (authority.as_bytes(), port)),
    )?;

    let framing = if codings > 0 {
        if !http11 {
            return bad("Transfer-Encoding is not allowed in HTTP/1.0");
        }
        if codings > 1 {
            return bad("the Transfer-Encoding header is invalid");
        }
        if length_fields > 0 {
            return bad("the request has both Content-Length and Transfer-Encoding");
        }
        debug_assert!(chunked);
        Framing::Chunked(Chunked::default())
    } else {
        rewrite |= length_fields > 1;
        Framing::Length(lengths.unwrap_or(0))
    };
    Ok(Checked {
        framing,
        facts: HeadFacts {
            upgrade: rules.upgrade,
            length: lengths,
        },
        rewrite,
    })
}

/// The ASCII bytes the `http` crate's URI parser takes in a path (`[0]`)
/// and in a query (`[1]`). Pingora parses every request target with it and
/// answers a target it refuses with a bare 400 of its own; refused here
/// first, the client gets the gateway's JSON error. Learned from the parser
/// itself, so the two cannot disagree.
static TARGET_BYTES: Lazy<[[bool; 128]; 2]> = Lazy::new(|| {
    let mut tables = [[false; 128]; 2];
    for b in 0..128u8 {
        if b == b'?' || b == b'#' {
            continue;
        }
        for (table, prefix) in tables.iter_mut().zip([&b"/a"[..], b"/?a"]) {
            let mut target = prefix.to_vec();
            target.push(b);
            table[usize::from(b)] = http::uri::PathAndQuery::try_from(target.as_slice()).is_ok();
        }
    }
    tables
});

/// Whether Pingora's URI parser will take `target`. Bytes past 127 are
/// taken (kept as they are for the wire); a fragment is cut off unread.
fn target_bytes_allowed(target: &[u8]) -> bool {
    let tables = &*TARGET_BYTES;
    let mut table = &tables[0];
    for &b in target {
        match b {
            b'#' => return true,
            b'?' => table = &tables[1],
            128.. => {}
            _ if !table[usize::from(b)] => return false,
            _ => {}
        }
    }
    true
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// A Content-Length value: digits only, and no more than fit a u64.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The scheme's default port and the authority of an absolute-form target.
fn absolute_authority(target: &str) -> Option<(u16, &str)> {
    let (scheme, rest) = target.split_once("://")?;
    let default_port = if scheme.eq_ignore_ascii_case("http") {
        80
    } else if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        return None;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some((default_port, &rest[..end]))
}

/// The head re-serialized without the fields that must not go on: names
/// with underscores, `X-Request-Id` after the first; `Content-Length`
/// once, with its single value.
fn rewrite(req: &httparse::Request<'_, '_>) -> BytesMut {
    let mut out = BytesMut::with_capacity(1024);
    let minor = if req.version == Some(0) { b'0' } else { b'1' };
    let target = req.path.unwrap_or_default();
    let absolute = absolute_authority(target);
    out.extend_from_slice(req.method.unwrap_or_default().as_bytes());
    out.extend_from_slice(b" ");
    match absolute {
        Some((_, authority)) => {
            let after = target.find("://").map_or(0, |i| i + 3) + authority.len();
            let rest = &target[after..];
            if !rest.starts_with('/') {
                out.extend_from_slice(b"/");
            }
            out.extend_from_slice(rest.split('#').next().unwrap_or_default().as_bytes());
        }
        None => out.extend_from_slice(target.as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.");
    out.extend_from_slice(&[minor]);
    out.extend_from_slice(b"\r\n");
    if let Some((_, authority)) = absolute {
        let has_host = req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("host"));
        if !has_host {
            out.extend_from_slice(b"Host: ");
            out.extend_from_slice(authority.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    // The same rules as the check, so that what it dropped is dropped here.
    let mut rules = policy::FieldRules::default();
    let mut length_seen = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let mut value = std::borrow::Cow::Borrowed(h.value);
        match rules.field(name, h.value) {
            Ok(Field::Keep) => {}
            Ok(Field::Drop) | Err(_) => continue,
            Ok(Field::Rewrite) => {
                let kept = policy::connection_kept(h.value);
                if kept.is_empty() {
                    continue;
                }
                value = kept.into();
            }
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            if length_seen {
                continue;
            }
            length_seen = true;
            // Validated: every value is the same number.
            value = trim(h.value.split(|&b| b == b',').next().unwrap_or_default()).into();
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn status_of(raw: &str) -> Option<u16> {
        match check(raw.as_bytes(), &limits()) {
            HeadStatus::Partial => None,
            HeadStatus::Complete(_) => Some(200),
            HeadStatus::Rejected(r) => Some(r.error.status()),
        }
    }

    fn complete(raw: &str) -> Head {
        match check(raw.as_bytes(), &limits()) {
            HeadStatus::Complete(head) => head,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn ordinary_requests_pass_untouched() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\n\r\n";
        let head = complete(&format!("{raw}POST /next"));
        assert_eq!(head.len, raw.len());
        assert!(head.rewritten.is_none());
        assert_eq!(head.framing, Framing::Length(0));
        let post = complete("POST / HTTP/1.1\r\nHost: h:8080\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(post.framing, Framing::Length(12));
        let chunked = complete("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert!(matches!(chunked.framing, Framing::Chunked(_)));
        assert_eq!(status_of("GET / HTTP/1.0\r\n\r\n"), Some(200));
        assert_eq!(
            status_of("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some(200)
        );
        assert_eq!(
            status_of("GET http://h/x HTTP/1.1\r\nHost: H.:80\r\n\r\n"),
            Some(200)
        );
        assert_eq!(
            status_of("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Some(200)
        );
        assert_eq!(status_of("GET / HTTP/1.1\r\nHost: h\r\n"), None);
    }

    #[test]
    fn request_line_rules() {
        for (raw, status) in [
            ("get / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("GET a/b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            ("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 405),
            ("GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
            ("GET / HTTP/1.2\r\nHost: h\r\n\r\n", 505),
            ("GET /\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        ] {
            assert_eq!(status_of(raw), Some(status), "{raw:?}");
        }
        let long_method = format!("{} / HTTP/1.1\r\nHost: h\r\n\r\n", "X".repeat(33));
        assert_eq!(status_of(&long_method), Some(400));
    }

    #[test]
    fn host_rules() {
        for (raw, status) in [
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET http://h/ HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: api.example.com:abc\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a,b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: [a]\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: u@h\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: h:99999\r\n\r\n", 400),
            ("GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n", 400),
            ("GET http://a:8080/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET https://a/ HTTP/1.1\r\nHost: a:443\r\n\r\n", 200),
            (
                "GET http://A.example./ HTTP/1.1\r\nHost: a.example\r\n\r\n",
                200,
            ),
        ] {
            assert_eq!(status_of(raw), Some(status), "{raw:?}");
        }
    }

    #[test]
    fn targets_pingora_would_refuse_get_the_gateways_400() {
        for target in ["/a<b", "/a>b", "http://h/<"] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            assert_eq!(status_of(&raw), Some(400), "{raw:?}");
        }
        // Agrees with the parser Pingora uses on every ASCII byte, in a
        // path and in a query; a fragment is never looked at.
        for b in 0x21..0x7fu8 {
            for prefix in ["/a", "/a?b="] {
                let target = format!("{prefix}{}", b as char);
                if status_of(&format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n")).is_none() {
                    continue;
                }
                let fragment_cut = target.split('#').next().unwrap();
                let pingora = http::uri::PathAndQuery::try_from(fragment_cut).is_ok();
                assert_eq!(
                    target_bytes_allowed(target.as_bytes()),
                    pingora,
                    "{target:?}"
                );
            }
        }
        assert!(target_bytes_allowed("/caf\u{e9}?q=\u{e9}".as_bytes()));
    }

    #[test]
    fn authorization_is_a_singleton_and_connection_cannot_drop_forwarding_headers() {
        assert_eq!(
            status_of("GET / HTTP/1.1\r\nHost: h\r\nAuthorization: a\r\nauthorization: b\r\n\r\n"),
            Some(400)
        );
        let head =
            complete("GET / HTTP/1.1\r\nHost: h\r\nConnection: X-Forwarded-For, close\r\n\r\n");
        assert_eq!(
            std::str::from_utf8(&head.rewritten.unwrap()).unwrap(),
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        );
        let head = complete("GET / HTTP/1.1\r\nHost: h\r\nConnection: x-forwarded-host\r\n\r\n");
        assert_eq!(
            std::str::from_utf8(&head.rewritten.unwrap()).unwrap(),
            "GET / HTTP/1.1\r\nHost: h\r\n\r\n"
        );
        assert_eq!(
            status_of("GET / HTTP/1.1\r\nHost: h\r\nConnection: :authority\r\n\r\n"),
            Some(400)
        );
    }

    #[test]
    fn framing_rules() {
        for (raw, status) in [
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ] {
            assert_eq!(status_of(raw), Some(status), "{raw:?}");
        }
    }

    #[test]
    fn repeated_fields_are_forwarded_once_and_underscores_dropped() {
        let head = complete(
            "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\nX-Request-Id: one\r\nX-Request-Id: two\r\nX_Forwarded_For: 6.6.6.6\r\n\r\n",
        );
        assert_eq!(head.framing, Framing::Length(3));
        let rewritten = head.rewritten.expect("rewritten");
        assert_eq!(
            std::str::from_utf8(&rewritten).unwrap(),
            "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX-Request-Id: one\r\n\r\n"
        );
    }

    #[test]
    fn absolute_form_goes_on_in_origin_form_with_a_host() {
        let head = complete("GET http://a.example:8080?x=1 HTTP/1.0\r\nAccept: */*\r\n\r\n");
        assert_eq!(
            std::str::from_utf8(&head.rewritten.unwrap()).unwrap(),
            "GET /?x=1 HTTP/1.0\r\nHost: a.example:8080\r\nAccept: */*\r\n\r\n"
        );
        let head = complete("GET https://A.example/p/q HTTP/1.1\r\nHost: a.example:443\r\n\r\n");
        assert_eq!(
            std::str::from_utf8(&head.rewritten.unwrap()).unwrap(),
            "GET /p/q HTTP/1.1\r\nHost: a.example:443\r\n\r\n"
        );
    }

    #[test]
    fn size_limits() {
        let limits = Limits {
            max_uri_bytes: 16,
            max_header_bytes: 128,
            max_headers: 3,
            ..Limits::default()
        };
        let status = |raw: &str| match check(raw.as_bytes(), &limits) {
            HeadStatus::Partial => None,
            HeadStatus::Complete(_) => Some(200),
            HeadStatus::Rejected(r) => Some(r.error.status()),
        };
        assert_eq!(
            status("GET /0123456789abcdef HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some(414)
        );
        // A target still arriving is refused once it cannot fit.
        assert_eq!(status(&format!("GET /{}", "a".repeat(80))), Some(414));
        assert_eq!(
            status("GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nHost: h\r\nC: 3\r\n\r\n"),
            Some(431)
        );
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nA: {}", "x".repeat(200))),
            Some(431)
        );
        assert_eq!(status("GET / HTTP/1.1\r\nHost: h\r\n"), None);
    }
}
