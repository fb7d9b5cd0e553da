//! One request-head policy on every protocol: each rule is asserted over
//! HTTP/1, h2c and h2 over TLS alike (the protocol matrix), against the
//! real binary and a real upstream that reports what it received.

mod support;

use serde_json::Value;
use support::matrix::{Matrix, Protocol, Request};
use support::upstream::{Scripted, Upstream};
use support::Response;
use tollgate::auth::api_key::digest_of;

const KEY: &str = "alice-key";

struct Setup {
    m: Matrix,
    log: std::path::PathBuf,
    _up: Upstream,
    _reflecting: Scripted,
}

/// An admin host behind an API key, a GET-only API behind an API key, a
/// CORS page whose upstream answers with CORS headers of its own, a CORS
/// route closed to loopback clients, and a public catch-all.
fn start() -> Setup {
    let up = Upstream::start("app");
    // An upstream that allows every origin with credentials, as one that
    // reflects `Origin` would.
    let reflecting = Scripted::replying(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAccess-Control-Allow-Origin: https://evil.example\r\nAccess-Control-Allow-Credentials: true\r\nAccess-Control-Expose-Headers: X-Secret\r\n\r\nok",
    );
    let log = support::scratch_dir("policy-log").join("access.log");
    let body = format!(
        "access_log: {{ path: \"{}\" }}\nauth:\n  api_keys: {{ header: X-API-Key, query: api_key }}\nconsumers:\n  alice: {{ api_keys: [\"{}\"] }}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\n  reflecting: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: admin, hosts: [admin.test], path_prefix: /, upstream: app, auth: [api_key] }}\n  - {{ name: api, path_prefix: /api, methods: [GET], upstream: app, auth: [api_key] }}\n  - {{ name: page, path_prefix: /page, methods: [GET, POST], upstream: reflecting, cors: {{ origins: [\"https://app.example\"], methods: [GET, POST], credentials: true }} }}\n  - {{ name: closed, path_prefix: /closed, upstream: app, ip_deny: [127.0.0.0/8], cors: {{ origins: [\"https://app.example\"], methods: [GET] }} }}\n  - {{ name: public, path_prefix: /, upstream: app }}\n",
        log.display(),
        digest_of(KEY),
        up.addr,
        reflecting.addr,
    );
    Setup {
        m: Matrix::start(&body),
        log,
        _up: up,
        _reflecting: reflecting,
    }
}

/// The gateway's JSON 400 with a request id, or (HTTP/2 only) a stream
/// Pingora's HTTP/2 layer refused before the gateway saw it: either way,
/// never forwarded.
fn refused(protocol: Protocol, r: &Response) {
    if protocol != Protocol::Http1 && r.status == 0 {
        return;
    }
    if r.header("content-type") == Some("application/json") {
        r.assert_gateway_error(400);
    } else {
        assert_eq!(r.status, 400, "{protocol:?}: {r:?}");
        assert_ne!(
            protocol,
            Protocol::Http1,
            "HTTP/1 gets the JSON error: {r:?}"
        );
    }
}

/// The access log's lines so far.
fn access_lines(s: &Setup) -> Vec<Value> {
    std::fs::read_to_string(&s.log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What the upstream received: its headers, lower-cased names.
fn received(r: &Response) -> Vec<(String, String)> {
    r.json()["headers"]
        .as_array()
        .unwrap_or_else(|| panic!("not an upstream answer: {r:?}"))
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_ascii_lowercase(),
                h[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn named<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn a_malformed_host_is_refused_on_every_protocol_never_routed_hostless() {
    let s = start();
    let hosts: [&[u8]; 12] = [
        b"admin.test..",
        b".admin.test",
        b"admin..test",
        b"admin.test\t",
        b"admin.test,x",
        b"admin.test x",
        b"admin.test/x",
        b"\"admin.test\"",
        b"admin.test\\",
        b"admin.test:1:1",
        b"[admin.test]",
        b"admin.t\xe9st",
    ];
    for host in hosts {
        // No `:authority`: the host is only in the header.
        let req = Request::get("/x").without_authority().header("host", host);
        s.m.each(&req, |protocol, r| {
            assert_ne!(r.status, 200, "{protocol:?} {host:?} was served: {r:?}");
            if protocol == Protocol::Http1 && host.ends_with(b"\t") {
                // HTTP/1 trims a field's trailing whitespace (RFC 9112
                // §5): the host is `admin.test`, whose route wants a key.
                r.assert_gateway_error(401);
            } else {
                refused(protocol, &r);
            }
        });
    }
    // The well-formed host reaches its own route (which wants a key) on
    // every protocol, in any case and with a port.
    for host in ["admin.test", "ADMIN.test:8080", "admin.test."] {
        let req = Request::get("/x").without_authority().header("host", host);
        s.m.each(&req, |protocol, r| {
            assert_eq!(
                r.assert_gateway_error(401),
                "unauthorized",
                "{protocol:?} {host}"
            );
        });
        let req = Request::get("/x").authority(host);
        s.m.each(&req, |protocol, r| {
            r.assert_gateway_error(401);
            let _ = protocol;
        });
    }
}

#[test]
fn authority_and_host_that_disagree_are_refused() {
    let s = start();
    let req = Request::get("/x")
        .authority("public.test")
        .header("host", "admin.test");
    // HTTP/1 has no `:authority`: the absolute form is its equivalent.
    let mut absolute = Request::get("http://public.test/x").without_authority();
    absolute = absolute.header("host", "admin.test");
    refused(Protocol::Http1, &s.m.send(Protocol::Http1, &absolute));
    for protocol in [Protocol::H2c, Protocol::H2Tls] {
        let r = s.m.send(protocol, &req);
        assert_ne!(r.status, 200, "{protocol:?}: {r:?}");
        refused(protocol, &r);
    }
}

#[test]
fn underscored_names_and_a_second_request_id_never_reach_the_upstream() {
    let s = start();
    let req = Request::get("/x")
        .header("x_consumer", "admin")
        .header("x_user_id", "admin")
        .header("x_forwarded_for", "10.0.0.1")
        .header("x-request-id", "first-id")
        .header("x-request-id", "second-id");
    s.m.each(&req, |protocol, r| {
        assert_eq!(r.status, 200, "{protocol:?}: {r:?}");
        let got = received(&r);
        for name in ["x_consumer", "x_user_id", "x_forwarded_for"] {
            assert!(
                named(&got, name).is_empty(),
                "{protocol:?}: {name} in {got:?}"
            );
        }
        assert_eq!(named(&got, "x-request-id"), ["first-id"], "{protocol:?}");
        assert_eq!(
            named(&got, "x-forwarded-for"),
            ["127.0.0.1"],
            "{protocol:?}"
        );
    });
}

#[test]
fn a_lowercase_method_is_refused() {
    let s = start();
    s.m.each(&Request::new("get", "/x"), |protocol, r| {
        assert_ne!(r.status, 200, "{protocol:?}");
        refused(protocol, &r);
    });
}

#[test]
fn a_second_credential_is_refused_never_forwarded() {
    let s = start();
    let two_keys = Request::get("/api/x")
        .header("x-api-key", KEY)
        .header("x-api-key", "forged");
    s.m.each(&two_keys, |protocol, r| {
        assert_eq!(r.assert_gateway_error(400), "bad_request", "{protocol:?}");
    });
    let two_authorizations = Request::get("/x")
        .header("authorization", "Bearer first")
        .header("authorization", "Bearer forged");
    s.m.each(&two_authorizations, |protocol, r| {
        assert_eq!(r.assert_gateway_error(400), "bad_request", "{protocol:?}");
    });
    // Query parameters are keys too, compared as a query parser reads them.
    for target in [
        format!("/api/x?api_key={KEY}&api%5Fkey=forged"),
        format!("/api/x?api_key={KEY}&api_key"),
    ] {
        s.m.each(&Request::get(&target), |protocol, r| {
            assert_eq!(
                r.assert_gateway_error(400),
                "bad_request",
                "{protocol:?} {target}"
            );
        });
    }
    let mixed = Request::get("/api/x?api_key=forged").header("x-api-key", KEY);
    s.m.each(&mixed, |protocol, r| {
        assert_eq!(r.assert_gateway_error(400), "bad_request", "{protocol:?}");
    });
    let one = Request::get("/api/x").header("x-api-key", KEY);
    s.m.each(&one, |protocol, r| {
        assert_eq!(r.status, 200, "{protocol:?}: {r:?}");
        assert_eq!(named(&received(&r), "x-consumer"), ["alice"]);
    });
}

#[test]
fn a_method_the_specific_route_does_not_allow_is_405_not_the_catch_all() {
    let s = start();
    for method in ["POST", "PUT", "DELETE", "PATCH", "TRACE", "PURGE"] {
        s.m.each(&Request::new(method, "/api/users"), |protocol, r| {
            assert_eq!(
                r.assert_gateway_error(405),
                "method_not_allowed",
                "{protocol:?} {method}"
            );
            assert_eq!(r.header("allow"), Some("GET, HEAD"), "{protocol:?}");
        });
    }
    // A preflight asking for a method the CORS route does not allow is
    // not forwarded either.
    let preflight = Request::new("OPTIONS", "/page/x")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "DELETE");
    s.m.each(&preflight, |protocol, r| {
        r.assert_gateway_error(405);
        let _ = protocol;
    });
    // A segment of parameters alone is an empty segment to a backend that
    // strips parameters and merges slashes (`/api/users` to it): refused,
    // never given to the catch-all.
    for path in ["/;/api/users", "/;x=1/api/users", "/%3B/api/users"] {
        s.m.each(&Request::new("POST", path), |protocol, r| {
            assert_eq!(
                r.assert_gateway_error(400),
                "bad_request",
                "{protocol:?} {path}"
            );
        });
    }
    // Paths no more specific route claims still reach the catch-all.
    s.m.each(&Request::new("POST", "/apix"), |protocol, r| {
        assert_eq!(r.status, 200, "{protocol:?}: {r:?}");
    });
}

#[test]
fn a_cors_route_sends_only_the_gateways_cors_headers() {
    let s = start();
    let from = |origin: &str| Request::get("/page/x").header("origin", origin);
    s.m.each(&from("https://evil.example"), |protocol, r| {
        assert_eq!(r.status, 200, "{protocol:?}");
        for (name, _) in &r.head.headers {
            assert!(
                !name.to_ascii_lowercase().starts_with("access-control-"),
                "{protocol:?}: {name} sent to a disallowed origin"
            );
        }
    });
    s.m.each(&from("https://app.example"), |protocol, r| {
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://app.example"),
            "{protocol:?}"
        );
        assert!(r.header("access-control-expose-headers").is_none());
    });
}

#[test]
fn a_preflight_is_held_to_the_routes_address_rules_and_logged_as_its_route() {
    let s = start();
    let preflight = |path: &str| {
        Request::new("OPTIONS", path)
            .header("origin", "https://app.example")
            .header("access-control-request-method", "GET")
    };
    s.m.each(&preflight("/closed/x"), |protocol, r| {
        assert_eq!(r.assert_gateway_error(403), "forbidden", "{protocol:?}");
        assert!(r.header("access-control-allow-methods").is_none());
    });
    s.m.each(&preflight("/page/x"), |protocol, r| {
        assert_eq!(r.status, 204, "{protocol:?}");
    });
    let lines = || access_lines(&s);
    s.m.gw.wait_until("six lines", || lines().len() >= 6);
    let all = lines();
    for line in &all {
        assert_eq!(line["method"], "OPTIONS");
        let route = if line["path"] == "/closed/x" {
            "closed"
        } else {
            "page"
        };
        assert_eq!(line["route"], route, "{line}");
    }
}

#[test]
fn the_client_cannot_speak_for_the_gateway() {
    let s = start();
    let req = Request::get("/x")
        .header("x-real-ip", "10.9.9.9")
        .header("forwarded", "for=10.9.9.9;proto=https");
    s.m.each(&req, |protocol, r| {
        let got = received(&r);
        assert!(named(&got, "x-real-ip").is_empty(), "{protocol:?}: {got:?}");
        assert!(named(&got, "forwarded").is_empty(), "{protocol:?}: {got:?}");
        assert_eq!(
            named(&got, "x-forwarded-host"),
            ["gateway.test"],
            "{protocol:?}"
        );
    });
    // HTTP/1 alone has `Connection`: nominating a header the gateway sets
    // does not remove it, nor fail the request once a target is chosen.
    let req = Request::get("/x")
        .header("connection", "X-Forwarded-For")
        .header("x-forwarded-for", "10.1.1.1");
    let r = s.m.send(Protocol::Http1, &req);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        named(&received(&r), "x-forwarded-for"),
        ["10.1.1.1, 127.0.0.1"]
    );
}

#[test]
fn a_repeated_content_length_goes_on_once() {
    let s = start();
    let req = Request::new("POST", "/x")
        .header("content-length", "5")
        .header("content-length", "5")
        .body(b"hello");
    s.m.each(&req, |protocol, r| {
        assert_eq!(r.status, 200, "{protocol:?}: {r:?}");
        assert_eq!(
            named(&received(&r), "content-length"),
            ["5"],
            "{protocol:?}"
        );
    });
}

#[test]
fn a_target_pingora_would_refuse_gets_the_json_error() {
    let s = start();
    for target in ["/a<b", "/a>b", "/x?q=<script>"] {
        let r = s.m.send(Protocol::Http1, &Request::get(target));
        r.assert_gateway_error(400);
    }
}

#[test]
fn http2_requests_are_logged_with_their_host() {
    let s = start();
    s.m.each(
        &Request::get("/logged").authority("api.example:8443"),
        |p, r| {
            assert_eq!(r.status, 200, "{p:?}");
        },
    );
    let lines = || access_lines(&s);
    s.m.gw.wait_until("three lines", || lines().len() >= 3);
    for line in lines() {
        assert_eq!(line["host"], "api.example:8443", "{line}");
    }
}
