//! Routing, path safety, forwarding and error shape, end to end over real
//! sockets: the real binary in front of a real upstream.

mod support;

use support::upstream::Upstream;
use support::{send_raw, Connection, Gateway};

/// A route that tags its responses with its name, so a test can see which
/// route a request matched.
fn tagged(name: &str, matcher: &str) -> String {
    format!(
        "  - {{ name: {name}, {matcher}, upstream: echo, response_headers: {{ set: {{ X-Route: {name} }} }} }}\n"
    )
}

fn gateway_with_routes(upstream: &Upstream, routes: &[String]) -> Gateway {
    let mut body = format!(
        "upstreams:\n  echo: {{ targets: [\"{}\"] }}\nroutes:\n",
        upstream.addr
    );
    for r in routes {
        body.push_str(r);
    }
    Gateway::start(&body)
}

#[test]
fn the_most_specific_route_wins_whatever_the_file_order() {
    let up = Upstream::start("echo");
    // Deliberately least specific first.
    let gw = gateway_with_routes(
        &up,
        &[
            tagged("catch-all", "path_prefix: /"),
            tagged("api", "path_prefix: /api"),
            tagged("api-users", "path_prefix: /api/users"),
            tagged("api-users-me", "path: /api/users/me"),
            tagged("wild-org", "hosts: [\"*.example.org\"], path_prefix: /"),
            tagged(
                "deep-wild-org",
                "hosts: [\"*.eu.example.org\"], path_prefix: /",
            ),
            tagged("exact-host", "hosts: [api.example.org], path_prefix: /"),
            tagged(
                "exact-host-api",
                "hosts: [api.example.org], path_prefix: /api",
            ),
        ],
    );
    let table = [
        ("any.test", "/", "catch-all"),
        ("any.test", "/apix", "catch-all"),
        ("any.test", "/api", "api"),
        ("any.test", "/api/orders/1", "api"),
        ("any.test", "/api/users", "api-users"),
        ("any.test", "/api/users/7", "api-users"),
        ("any.test", "/api/users/me", "api-users-me"),
        ("any.test", "/api/users/me/x", "api-users"),
        ("shop.example.org", "/api/users/me", "wild-org"),
        ("a.eu.example.org", "/x", "deep-wild-org"),
        ("example.org", "/x", "catch-all"),
        ("api.example.org", "/x", "exact-host"),
        ("API.Example.org:8080", "/api/x", "exact-host-api"),
    ];
    for (host, path, expected) in table {
        let resp = gw.get(host, path);
        assert_eq!(resp.status, 200, "{host}{path}");
        assert_eq!(resp.header("x-route"), Some(expected), "{host}{path}");
    }
}

#[test]
fn no_route_is_404_and_wrong_method_is_405_with_allow() {
    let up = Upstream::start("echo");
    let gw = gateway_with_routes(
        &up,
        &[
            tagged("read", "path_prefix: /items, methods: [GET]"),
            tagged("write", "path_prefix: /items, methods: [POST, PUT]"),
        ],
    );
    assert_eq!(
        gw.get("h", "/nothing").assert_gateway_error(404),
        "no_route"
    );

    let resp = support::request(gw.addr, "DELETE", "h", "/items/1", &[], b"");
    assert_eq!(resp.assert_gateway_error(405), "method_not_allowed");
    assert_eq!(resp.header("allow"), Some("GET, HEAD, POST, PUT"));

    let resp = support::request(gw.addr, "PUT", "h", "/items/1", &[], b"x");
    assert_eq!(resp.header("x-route"), Some("write"));
    assert_eq!(gw.get("h", "/items").header("x-route"), Some("read"));
    assert_eq!(up.hits(), 2);
}

#[test]
fn strip_prefix_and_header_transforms_reach_the_upstream() {
    let up = Upstream::start("echo");
    let route = "  - name: users\n    path_prefix: /api/users\n    upstream: echo\n    strip_prefix: true\n    request_headers: { set: { X-Gateway: tollgate }, add: { X-Via: edge }, remove: [X-Debug] }\n    response_headers: { set: { X-Frame-Options: DENY }, remove: [Server] }\n".to_owned();
    let gw = gateway_with_routes(&up, &[route]);

    let resp = support::request(
        gw.addr,
        "GET",
        "h",
        "/api/users/7?q=a%20b&x",
        &[("X-Debug", "1"), ("X-Via", "client")],
        b"",
    );
    assert_eq!(resp.status, 200);
    let seen = resp.json();
    assert_eq!(seen["target"], "/7?q=a%20b&x");
    assert_eq!(
        resp.upstream_header("x-gateway").as_deref(),
        Some("tollgate")
    );
    assert_eq!(resp.upstream_header("x-debug"), None);
    let vias: Vec<&str> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "x-via")
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert_eq!(vias, ["client", "edge"]);
    assert_eq!(resp.header("x-frame-options"), Some("DENY"));
    assert_eq!(resp.header("server"), None);

    assert_eq!(gw.get("h", "/api/users").json()["target"], "/");
}

#[test]
fn forwarding_headers_and_request_ids() {
    let up = Upstream::start("echo");
    let gw = gateway_with_routes(&up, &[tagged("all", "path_prefix: /")]);

    let resp = support::request(
        gw.addr,
        "GET",
        "shop.test",
        "/",
        &[
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Request-Id", "client-id-42"),
        ],
        b"",
    );
    assert_eq!(
        resp.upstream_header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(
        resp.upstream_header("x-forwarded-proto").as_deref(),
        Some("http")
    );
    assert_eq!(
        resp.upstream_header("x-forwarded-host").as_deref(),
        Some("shop.test")
    );
    assert_eq!(
        resp.upstream_header("x-request-id").as_deref(),
        Some("client-id-42")
    );
    assert_eq!(resp.header("x-request-id"), Some("client-id-42"));

    // No id, or an insane one: a fresh id is generated, forwarded and echoed.
    for sent in [None, Some("bad id with spaces")] {
        let headers: Vec<(&str, &str)> = sent.map(|s| ("X-Request-Id", s)).into_iter().collect();
        let resp = support::request(gw.addr, "GET", "h", "/", &headers, b"");
        let echoed = resp.header("x-request-id").unwrap().to_owned();
        assert_eq!(echoed.len(), 32, "{echoed}");
        assert_eq!(resp.upstream_header("x-request-id"), Some(echoed));
    }
}

#[test]
fn paths_are_routed_and_forwarded_in_normal_form() {
    let up = Upstream::start("echo");
    let gw = gateway_with_routes(
        &up,
        &[
            tagged("admin", "path_prefix: /admin"),
            tagged("public", "path_prefix: /public"),
        ],
    );
    for (raw, route, forwarded) in [
        ("/public/../admin", "admin", "/admin"),
        ("/public/%2e%2e/admin", "admin", "/admin"),
        ("/public/%2E%2e/admin?x=%2F", "admin", "/admin?x=%2F"),
        ("//admin", "admin", "/admin"),
        ("/public//./a", "public", "/public/a"),
        ("/public/%7euser", "public", "/public/~user"),
    ] {
        let resp = send_raw(
            gw.addr,
            format!("GET {raw} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
        );
        assert_eq!(resp.status, 200, "{raw}");
        assert_eq!(resp.header("x-route"), Some(route), "{raw}");
        assert_eq!(resp.json()["target"], forwarded, "{raw}");
    }
}

#[test]
fn unsafe_paths_are_rejected_with_400() {
    let up = Upstream::start("echo");
    let gw = gateway_with_routes(&up, &[tagged("all", "path_prefix: /")]);
    for raw in [
        "/a%2Fb",
        "/a%2fb",
        "/a%5Cb",
        "/a%00b",
        "/a\\b",
        "/a%zz",
        "/a%4",
        "/..",
        "/a/../../b",
        "/a%01b",
    ] {
        let resp = send_raw(
            gw.addr,
            format!("GET {raw} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
        );
        assert_eq!(resp.assert_gateway_error(400), "bad_request", "{raw}");
    }
    // A raw control character in the request line.
    let resp = send_raw(gw.addr, b"GET /a\x01b HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(resp.assert_gateway_error(400), "bad_request");
    assert_eq!(up.hits(), 0, "nothing unsafe reached the upstream");
}

#[test]
fn a_rejected_request_with_a_body_keeps_the_connection_usable() {
    let up = Upstream::start("echo");
    let gw = gateway_with_routes(&up, &[tagged("api", "path_prefix: /api")]);
    let mut conn = Connection::open(gw.addr);
    conn.send("POST", "h", "/nope", &[], b"0123456789");
    assert_eq!(conn.read_response().assert_gateway_error(404), "no_route");
    // Either the gateway drained the body and reuses the connection, or it
    // closed it; it must never read the body as the next request.
    conn.send("GET", "h", "/api/x", &[], b"");
    let mut next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.read_response()));
    if next.is_err() {
        let mut fresh = Connection::open(gw.addr);
        fresh.send("GET", "h", "/api/x", &[], b"");
        next = Ok(fresh.read_response());
    }
    let next = next.unwrap();
    assert_eq!(next.status, 200);
    assert_eq!(next.header("x-route"), Some("api"));
}

#[test]
fn head_requests_get_error_headers_without_a_body() {
    let up = Upstream::start("echo");
    let gw = gateway_with_routes(&up, &[tagged("api", "path_prefix: /api")]);
    let mut conn = Connection::open(gw.addr);
    conn.send("HEAD", "h", "/nope", &[], b"");
    let head = conn.read_response_head();
    assert!(head.start_line.contains(" 404"), "{head:?}");
    // If a body had been sent after the HEAD answer, it would be read here
    // as the next status line.
    conn.send("GET", "h", "/api/a", &[], b"");
    assert_eq!(conn.read_response().status, 200);
}
