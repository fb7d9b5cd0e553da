//! Access control over real sockets: API keys naming consumers, groups,
//! client IP lists, identity headers an upstream can trust.

mod support;

use support::upstream::Upstream;
use support::{check_config, request, Gateway};
use tollgate::auth::api_key::digest_of;

fn config(up: &Upstream, extra_auth: &str) -> String {
    format!(
        "auth:\n  api_keys: {{ header: X-API-Key{extra_auth} }}\nconsumers:\n  alice: {{ api_keys: [\"{}\"], groups: [partners] }}\n  bob: {{ api_keys: [\"{}\"], groups: [staff] }}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: keyed, path_prefix: /keyed, upstream: app, auth: [api_key] }}\n  - {{ name: partners, path_prefix: /partners, upstream: app, auth: [api_key], allow_groups: [partners] }}\n  - {{ name: inside, path_prefix: /inside, upstream: app, ip_allow: [10.0.0.0/8] }}\n  - {{ name: local, path_prefix: /local, upstream: app, ip_allow: [127.0.0.1], ip_deny: [10.0.0.0/8] }}\n  - {{ name: banned, path_prefix: /banned, upstream: app, ip_deny: [127.0.0.0/8] }}\n  - {{ name: public, path_prefix: /, upstream: app }}\n",
        digest_of("alice-key"),
        digest_of("bob-key"),
        up.addr
    )
}

#[test]
fn an_api_key_identifies_its_consumer_to_the_upstream() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&config(&up, ", query: api_key"));
    let resp = request(
        gw.addr,
        "GET",
        "h",
        "/keyed/x",
        &[("X-API-Key", "alice-key")],
        b"",
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.upstream_header("x-consumer").as_deref(), Some("alice"));
    // The key itself goes on untouched (the upstream may log who called,
    // not how): only the identity header is the gateway's.
    let resp = gw.get("h", "/keyed/x?api_key=bob-key");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.upstream_header("x-consumer").as_deref(), Some("bob"));
}

#[test]
fn missing_or_wrong_keys_get_401_with_a_challenge() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&config(&up, ""));
    let resp = gw.get("h", "/keyed/x");
    assert_eq!(resp.assert_gateway_error(401), "unauthorized");
    assert_eq!(
        resp.header("www-authenticate"),
        Some(r#"Bearer realm="tollgate""#)
    );
    let resp = request(
        gw.addr,
        "GET",
        "h",
        "/keyed/x",
        &[("X-API-Key", "guess")],
        b"",
    );
    assert_eq!(resp.assert_gateway_error(401), "unauthorized");
    assert_eq!(
        resp.header("www-authenticate"),
        Some(r#"Bearer realm="tollgate", error="invalid_token""#)
    );
    // Not configured: the query parameter is not a way in.
    assert_eq!(gw.get("h", "/keyed/x?api_key=alice-key").status, 401);
    assert_eq!(
        up.hits(),
        0,
        "an unauthenticated request reached the upstream"
    );
}

#[test]
fn groups_and_client_addresses_decide_403() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&config(&up, ""));
    let partners = |key| request(gw.addr, "GET", "h", "/partners", &[("X-API-Key", key)], b"");
    assert_eq!(partners("alice-key").status, 200);
    assert_eq!(partners("bob-key").assert_gateway_error(403), "forbidden");
    // The tests connect from 127.0.0.1.
    assert_eq!(
        gw.get("h", "/inside").assert_gateway_error(403),
        "forbidden"
    );
    assert_eq!(
        gw.get("h", "/banned").assert_gateway_error(403),
        "forbidden"
    );
    assert_eq!(gw.get("h", "/local").status, 200);
}

#[test]
fn ipv4_mapped_blocks_match_the_ipv4_clients_they_name() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&format!(
        "trusted_proxies: [\"::ffff:127.0.0.0/104\"]\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: deny, path_prefix: /deny, upstream: app, ip_deny: [\"::ffff:127.0.0.0/104\"] }}\n  - {{ name: allow, path_prefix: /allow, upstream: app, ip_allow: [\"::ffff:127.0.0.1\"] }}\n  - {{ name: behind, path_prefix: /behind, upstream: app, ip_deny: [203.0.113.0/24] }}\n",
        up.addr
    ));
    // The tests connect from 127.0.0.1, which the mapped blocks name.
    assert_eq!(gw.get("h", "/deny").assert_gateway_error(403), "forbidden");
    assert_eq!(gw.get("h", "/allow").status, 200);
    // The peer is a trusted proxy, so the client is the one it reports.
    let behind = request(
        gw.addr,
        "GET",
        "h",
        "/behind",
        &[("X-Forwarded-For", "203.0.113.9")],
        b"",
    );
    assert_eq!(behind.assert_gateway_error(403), "forbidden");
    assert_eq!(up.hits(), 1, "only /allow reached the upstream");
}

#[test]
fn a_client_cannot_claim_an_identity() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&config(&up, ""));
    // On a public route the spoofed header is dropped...
    let resp = request(
        gw.addr,
        "GET",
        "h",
        "/open",
        &[("X-Consumer", "admin")],
        b"",
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.upstream_header("x-consumer"), None);
    // ...and on an authenticated one replaced by the real caller.
    let resp = request(
        gw.addr,
        "GET",
        "h",
        "/keyed",
        &[("X-Consumer", "admin"), ("X-API-Key", "bob-key")],
        b"",
    );
    assert_eq!(resp.status, 200);
    let seen: Vec<String> = resp.json()["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "x-consumer")
        .map(|h| h[1].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, ["bob"]);
}

#[test]
fn dash_t_checks_the_access_rules() {
    let text = format!(
        "listen: [\"127.0.0.1:1\"]\nconsumers:\n  alice: {{ api_keys: [\"alice-key\"] }}\n  bob: {{ api_keys: [\"{k}\", \"{k}\"] }}\nupstreams:\n  u: {{ targets: [\"127.0.0.1:2\"] }}\nroutes:\n  - {{ name: a, path: /a, upstream: u, auth: [jwt:main] }}\n  - {{ name: b, path: /b, upstream: u, auth: [password] }}\n  - {{ name: c, path: /c, upstream: u, allow_groups: [x] }}\n  - {{ name: d, path: /d, upstream: u, ip_allow: [10.0.0.1/8] }}\n",
        k = digest_of("bob-key")
    );
    let (code, _, stderr) = check_config(&text);
    assert_eq!(code, 1);
    for expected in [
        "consumers.alice.api_keys[0]: API keys are written as sha256:",
        "consumers.bob.api_keys[1]: the same key is configured for another consumer",
        "routes[0].auth[0]: no JWT provider named \"main\"",
        "routes[1].auth[0]: \"password\" is not an authentication method",
        "routes[2].allow_groups: needs auth",
        "routes[3].ip_allow[0]: \"10.0.0.1/8\" has host bits set",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

fn cors_config(up: &Upstream) -> String {
    format!(
        "consumers:\n  alice: {{ api_keys: [\"{}\"] }}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: api, path_prefix: /api, upstream: app, methods: [GET, POST], auth: [api_key], cors: {{ origins: [\"https://app.example.com\"], headers: [Authorization, X-API-Key], max_age: 10m, credentials: true }} }}\n  - {{ name: open, path_prefix: /open, upstream: app, cors: {{ origins: [\"*\"] }} }}\n",
        digest_of("alice-key"),
        up.addr
    )
}

#[test]
fn cors_preflights_are_answered_by_the_gateway() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&cors_config(&up));
    let preflight = |origin: &str| {
        request(
            gw.addr,
            "OPTIONS",
            "h",
            "/api/orders",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "X-API-Key"),
            ],
            b"",
        )
    };
    // No credentials needed, the upstream never asked.
    let ok = preflight("https://app.example.com");
    assert_eq!(ok.status, 204);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        ok.header("access-control-allow-methods"),
        Some("GET, POST, HEAD")
    );
    assert_eq!(
        ok.header("access-control-allow-headers"),
        Some("Authorization, X-API-Key")
    );
    assert_eq!(ok.header("access-control-max-age"), Some("600"));
    assert_eq!(ok.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(ok.header("vary"), Some("Origin"));
    assert!(ok.header("x-request-id").is_some());
    let denied = preflight("https://evil.example");
    assert_eq!(denied.status, 204);
    assert_eq!(denied.header("access-control-allow-origin"), None);
    assert_eq!(up.hits(), 0, "a preflight reached the upstream");
}

#[test]
fn cors_headers_go_only_to_allowed_origins() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&cors_config(&up));
    let get = |origin: &str| {
        request(
            gw.addr,
            "GET",
            "h",
            "/api/orders",
            &[("Origin", origin), ("X-API-Key", "alice-key")],
            b"",
        )
    };
    let ok = get("https://app.example.com");
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(ok.header("vary"), Some("Origin"));
    let other = get("https://evil.example");
    assert_eq!(other.status, 200);
    assert_eq!(other.header("access-control-allow-origin"), None);
    assert_eq!(other.header("vary"), Some("Origin"));
    let any = request(
        gw.addr,
        "GET",
        "h",
        "/open",
        &[("Origin", "https://x.example")],
        b"",
    );
    assert_eq!(any.header("access-control-allow-origin"), Some("*"));
    assert_eq!(any.header("access-control-allow-credentials"), None);
    // A route without CORS answers an OPTIONS like any request.
    let plain = request(
        gw.addr,
        "OPTIONS",
        "h",
        "/elsewhere",
        &[
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "GET"),
        ],
        b"",
    );
    assert_eq!(plain.assert_gateway_error(404), "no_route");

    let (code, _, stderr) = check_config(
        "listen: [\"127.0.0.1:1\"]\nupstreams:\n  u: { targets: [\"127.0.0.1:2\"] }\nroutes:\n  - { name: a, path: /a, upstream: u, cors: { origins: [\"*\"], credentials: true } }\n  - { name: b, path: /b, upstream: u, cors: { origins: [\"https://x.example/path\"] } }\n",
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("routes[0].cors.credentials:"), "{stderr}");
    assert!(stderr.contains("routes[1].cors.origins[0]:"), "{stderr}");
}
