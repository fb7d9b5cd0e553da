//! Path normalization: the one path a request is both routed by and forwarded as.
//!
//! A gateway that matches on one spelling of a path and forwards another lets
//! `/public/../admin` slip past a rule written for `/admin`. So the request
//! path is normalized once, and that result is used for matching and for the
//! upstream request line alike.
//!
//! The rules: percent-encoded unreserved characters (RFC 3986 §2.3) are
//! decoded, other escapes are kept with upper-case hex; `.` and `..` segments
//! are resolved; repeated slashes are merged. Anything whose meaning a backend
//! could read differently from us is refused instead: an encoded `/` or `\`,
//! NUL or other control characters (raw or encoded), a raw `\`, a `%` not
//! followed by two hex digits, and `..` climbing above the root.

use std::borrow::Cow;
use std::fmt;

/// Why a path was refused. Each maps to a 400 response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    EncodedSlash,
    EncodedBackslash,
    ControlCharacter,
    Backslash,
    BadPercentEncoding,
    AboveRoot,
    DotSegmentParameters,
    EmptySegmentParameters,
}

impl PathError {
    /// The reason, as given to the client in the 400 response.
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the path must start with '/'",
            PathError::EncodedSlash => "the path contains an encoded '/' (%2F)",
            PathError::EncodedBackslash => "the path contains an encoded '\\' (%5C)",
            PathError::ControlCharacter => "the path contains a control character",
            PathError::Backslash => "the path contains a '\\'",
            PathError::BadPercentEncoding => "the path contains an invalid percent-encoding",
            PathError::AboveRoot => "the path climbs above the root with '..'",
            PathError::DotSegmentParameters => {
                "the path has a dot-segment with parameters ('..;' or '.;')"
            }
            PathError::EmptySegmentParameters => {
                "the path has a segment of parameters alone ('/;')"
            }
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// Normalizes `path` (the part of the request target before `?`).
///
/// Returns the input unchanged, without allocating, when it is already in
/// normal form, which is what almost every real request is.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(bytes)? {
        return Ok(Cow::Borrowed(path));
    }
    rebuild(bytes).map(Cow::Owned)
}

/// Scans once for anything that needs rewriting or refusing. `Ok(false)`
/// means "needs the slow path", which also does the detailed validation.
fn is_normal(bytes: &[u8]) -> Result<bool, PathError> {
    let mut prev_slash = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            // `;` starts a segment's parameters, which Java backends strip
            // before resolving dot-segments; the slow path checks them.
            b'%' | b';' => return Ok(false),
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            b'/' => {
                if prev_slash {
                    return Ok(false);
                }
                prev_slash = true;
                continue;
            }
            b'.' if prev_slash => {
                // "/." followed by end, '/', or ".": a dot segment.
                match bytes.get(i + 1) {
                    None | Some(b'/') => return Ok(false),
                    Some(b'.') if matches!(bytes.get(i + 2), None | Some(b'/')) => {
                        return Ok(false)
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        prev_slash = false;
    }
    Ok(true)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes one segment's escapes into `out`. Escapes of reserved or non-ASCII
/// bytes stay escaped (with canonical upper-case hex), since decoding them
/// would change what the segment means to the backend.
fn decode_segment(seg: &[u8], out: &mut Vec<u8>) -> Result<(), PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut i = 0;
    while i < seg.len() {
        let b = seg[i];
        match b {
            b'%' => {
                let (hi, lo) = match (seg.get(i + 1), seg.get(i + 2)) {
                    (Some(&h), Some(&l)) => (h, l),
                    _ => return Err(PathError::BadPercentEncoding),
                };
                let v = match (hex_value(hi), hex_value(lo)) {
                    (Some(h), Some(l)) => h << 4 | l,
                    _ => return Err(PathError::BadPercentEncoding),
                };
                match v {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::EncodedBackslash),
                    0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                    v if is_unreserved(v) => out.push(v),
                    v => out.extend_from_slice(&[
                        b'%',
                        HEX[(v >> 4) as usize],
                        HEX[(v & 15) as usize],
                    ]),
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(())
}

fn rebuild(bytes: &[u8]) -> Result<String, PathError> {
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    // Start offsets in `out` of each kept segment's leading '/', for `..`.
    let mut starts: Vec<usize> = Vec::new();
    let mut segment = Vec::new();
    let mut trailing_slash = false;
    for raw in bytes[1..].split(|&b| b == b'/') {
        segment.clear();
        decode_segment(raw, &mut segment)?;
        if is_dot_with_parameters(&segment) {
            return Err(PathError::DotSegmentParameters);
        }
        if starts_with_parameters(&segment) {
            return Err(PathError::EmptySegmentParameters);
        }
        match segment.as_slice() {
            b"" => trailing_slash = true,
            b"." => trailing_slash = true,
            b".." => {
                let start = starts.pop().ok_or(PathError::AboveRoot)?;
                out.truncate(start);
                trailing_slash = true;
            }
            seg => {
                starts.push(out.len());
                out.push(b'/');
                out.extend_from_slice(seg);
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push(b'/');
    }
    // Only ASCII was decoded and every other byte was copied from a `&str`,
    // so this cannot fail; the fallback keeps that an invariant, not a panic.
    String::from_utf8(out).map_err(|_| PathError::BadPercentEncoding)
}

/// `..;x`, `.;x` and their `%3B` spellings: `..` and `.` to a backend that
/// strips path parameters (Tomcat, Jetty), a plain name to the router.
fn is_dot_with_parameters(segment: &[u8]) -> bool {
    let rest = segment
        .strip_prefix(b"..")
        .or_else(|| segment.strip_prefix(b"."));
    rest.is_some_and(|r| {
        r.first() == Some(&b';')
            || (r.len() >= 3 && r[0] == b'%' && r[1] == b'3' && r[2].eq_ignore_ascii_case(&b'b'))
    })
}

/// `;x` and its `%3B` spelling: an empty segment to a backend that strips
/// path parameters and merges slashes (`/;/admin` is its `/admin`), a
/// named one to the router (which would send it to a catch-all).
fn starts_with_parameters(segment: &[u8]) -> bool {
    segment.first() == Some(&b';')
        || (segment.len() >= 3
            && segment[0] == b'%'
            && segment[1] == b'3'
            && segment[2].eq_ignore_ascii_case(&b'b'))
}

/// The path to match routes on: each segment without its `;parameters`
/// (`/admin;x=1/users` matches as `/admin/users`), since backends that
/// read parameters route without them. Borrowed when there are none.
pub fn without_parameters(path: &str) -> Cow<'_, str> {
    if !path.contains(';') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split_once(';').map_or(segment, |(name, _)| name));
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> String {
        normalize_path(p).unwrap().into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a", "/a/b/", "/a.b/c..d/.e", "/api/users/7"] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes_are_resolved() {
        assert_eq!(ok("/public/../admin"), "/admin");
        assert_eq!(ok("//admin"), "/admin");
        assert_eq!(ok("/a//b///c"), "/a/b/c");
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/a/.."), "/");
    }

    #[test]
    fn encoded_dots_are_dot_segments() {
        assert_eq!(ok("/public/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/public/%2E%2e/admin"), "/admin");
        assert_eq!(ok("/a/%2e/b"), "/a/b");
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_kept_uppercase() {
        assert_eq!(ok("/%41b%7e"), "/Ab~");
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/a%3fb"), "/a%3Fb");
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
    }

    #[test]
    fn parameters_are_kept_for_forwarding_and_dropped_for_matching() {
        assert_eq!(ok("/admin;x=1/users"), "/admin;x=1/users");
        assert_eq!(without_parameters("/admin;x=1/users;y"), "/admin/users");
        assert_eq!(without_parameters("/admin;x=1"), "/admin");
        assert!(matches!(without_parameters("/plain"), Cow::Borrowed(_)));
        assert_eq!(ok("/a/..x;y/b"), "/a/..x;y/b");
    }

    #[test]
    fn dangerous_paths_are_refused() {
        assert_eq!(normalize_path("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/a%5Cb"), Err(PathError::EncodedBackslash));
        assert_eq!(normalize_path("/a%00b"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/a%0ab"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/a\\b"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/a\u{1}b"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/a%zzb"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalize_path("/a%4"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalize_path("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("a/b"), Err(PathError::NotAbsolute));
        for p in ["/a/..;x/b", "/a/.;/b", "/..;", "/a/..%3bx", "/a/.%3B"] {
            assert_eq!(
                normalize_path(p),
                Err(PathError::DotSegmentParameters),
                "{p}"
            );
        }
        // A backend that strips parameters and merges slashes reads these
        // as `/api/users`; the router would not.
        for p in ["/;/api/users", "/;x=1/api", "/%3B/api", "/a/;/b", "/;"] {
            assert_eq!(
                normalize_path(p),
                Err(PathError::EmptySegmentParameters),
                "{p}"
            );
        }
        assert!(normalize_path("/api;x=1/users").is_ok());
        assert_eq!(normalize_path(""), Err(PathError::NotAbsolute));
    }
}
