//! CORS: which browser origins may call a route. Preflights are answered by
//! the gateway (they never reach the upstream, nor need credentials);
//! actual requests from an allowed origin get the CORS headers on their
//! response. A disallowed origin gets none, so the browser keeps the
//! response from the page. Every answer on a CORS route says `Vary:
//! Origin`, since it depends on the origin.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
    VARY,
};
use http::{HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};

/// A route's CORS rules, compiled once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsPolicy {
    /// `None`: any origin (`*`, only without credentials).
    pub origins: Option<Vec<HeaderValue>>,
    pub methods: HeaderValue,
    pub headers: Option<HeaderValue>,
    pub max_age: Option<HeaderValue>,
    pub credentials: bool,
}

/// The method a preflight asks about, when the request is one: `OPTIONS`
/// with `Origin` and `Access-Control-Request-Method`.
pub fn preflight_method(req: &RequestHeader) -> Option<Method> {
    if req.method != Method::OPTIONS || !req.headers.contains_key(ORIGIN) {
        return None;
    }
    let requested = req.headers.get(ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(requested.as_bytes()).ok()
}

impl CorsPolicy {
    /// The `Access-Control-Allow-Origin` value for a request's origin, if
    /// it may read the response.
    fn allowed_origin(&self, req: &RequestHeader) -> Option<HeaderValue> {
        let origin = req.headers.get(ORIGIN)?;
        match &self.origins {
            None => Some(HeaderValue::from_static("*")),
            Some(list) => list.iter().any(|o| o == origin).then(|| origin.clone()),
        }
    }

    /// The gateway's answer to a preflight: 204, with the route's rules
    /// when the origin is allowed, without any CORS header otherwise.
    pub fn preflight(&self, req: &RequestHeader) -> pingora::Result<ResponseHeader> {
        let mut resp = ResponseHeader::build(204, Some(8))?;
        resp.insert_header(VARY, "Origin")?;
        if let Some(origin) = self.allowed_origin(req) {
            resp.insert_header(ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
            resp.insert_header(ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone())?;
            if let Some(headers) = &self.headers {
                resp.insert_header(ACCESS_CONTROL_ALLOW_HEADERS, headers.clone())?;
            }
            if let Some(max_age) = &self.max_age {
                resp.insert_header(ACCESS_CONTROL_MAX_AGE, max_age.clone())?;
            }
            if self.credentials {
                resp.insert_header(ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
            }
        }
        Ok(resp)
    }

    /// The CORS headers of an actual request's response: the gateway's
    /// only. An upstream's own `Access-Control-*` headers are removed, or
    /// an upstream reflecting any `Origin` would open the route to origins
    /// the allowlist leaves out.
    pub fn decorate(&self, req: &RequestHeader, resp: &mut ResponseHeader) -> pingora::Result<()> {
        let upstreams: Vec<http::HeaderName> = resp
            .headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in &upstreams {
            resp.remove_header(name);
        }
        resp.append_header(VARY, "Origin")?;
        if let Some(origin) = self.allowed_origin(req) {
            resp.insert_header(ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
            if self.credentials {
                resp.insert_header(ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CorsPolicy {
        CorsPolicy {
            origins: Some(vec![HeaderValue::from_static("https://app.example.com")]),
            methods: HeaderValue::from_static("GET, POST"),
            headers: Some(HeaderValue::from_static("Authorization")),
            max_age: Some(HeaderValue::from_static("600")),
            credentials: true,
        }
    }

    fn req(method: &str, origin: Option<&str>, asks: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/", None).unwrap();
        if let Some(o) = origin {
            req.insert_header("Origin", o).unwrap();
        }
        if let Some(m) = asks {
            req.insert_header("Access-Control-Request-Method", m)
                .unwrap();
        }
        req
    }

    #[test]
    fn an_upstreams_own_cors_headers_never_reach_the_browser() {
        let p = policy();
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("Access-Control-Allow-Origin", "https://evil.example")
            .unwrap();
        resp.insert_header("Access-Control-Allow-Credentials", "true")
            .unwrap();
        resp.insert_header("Access-Control-Expose-Headers", "X-Secret")
            .unwrap();
        p.decorate(&req("GET", Some("https://evil.example"), None), &mut resp)
            .unwrap();
        assert!(resp
            .headers
            .keys()
            .all(|n| !n.as_str().starts_with("access-control-")));
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("Access-Control-Allow-Origin", "*")
            .unwrap();
        p.decorate(
            &req("GET", Some("https://app.example.com"), None),
            &mut resp,
        )
        .unwrap();
        assert_eq!(
            resp.headers.get("access-control-allow-origin").unwrap(),
            "https://app.example.com"
        );
    }

    #[test]
    fn preflights_are_recognized() {
        assert_eq!(
            preflight_method(&req("OPTIONS", Some("https://a"), Some("POST"))),
            Some(Method::POST)
        );
        assert_eq!(preflight_method(&req("OPTIONS", None, Some("POST"))), None);
        assert_eq!(
            preflight_method(&req("OPTIONS", Some("https://a"), None)),
            None
        );
        assert_eq!(
            preflight_method(&req("GET", Some("https://a"), Some("POST"))),
            None
        );
    }

    #[test]
    fn only_allowed_origins_get_cors_headers() {
        let p = policy();
        let ok = p
            .preflight(&req(
                "OPTIONS",
                Some("https://app.example.com"),
                Some("POST"),
            ))
            .unwrap();
        assert_eq!(
            ok.headers.get("access-control-allow-origin").unwrap(),
            "https://app.example.com"
        );
        assert_eq!(
            ok.headers.get("access-control-allow-credentials").unwrap(),
            "true"
        );
        assert_eq!(ok.headers.get("access-control-max-age").unwrap(), "600");
        let no = p
            .preflight(&req("OPTIONS", Some("https://evil.example"), Some("POST")))
            .unwrap();
        assert!(no.headers.get("access-control-allow-origin").is_none());
        assert_eq!(no.headers.get("vary").unwrap(), "Origin");
    }
}
