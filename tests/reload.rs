//! Live reload on SIGHUP: new config for new requests, nothing dropped,
//! invalid files change nothing, health state carries over.

mod support;

use support::upstream::Upstream;
use support::{Connection, Gateway};

fn config(a: &Upstream, b: &Upstream, routes: &str) -> String {
    format!(
        "upstreams:\n  a: {{ targets: [\"{}\"] }}\n  b: {{ targets: [\"{}\"] }}\nroutes:\n{routes}",
        a.addr, b.addr
    )
}

#[test]
fn sighup_swaps_in_a_changed_route() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gw = Gateway::start(&config(
        &a,
        &b,
        "  - { name: r, path_prefix: /old, upstream: a }\n",
    ));
    let mut kept = Connection::open(gw.addr);
    kept.send("GET", "h", "/old", &[], b"");
    assert_eq!(kept.read_response().header("x-upstream"), Some("a"));

    let status = gw.reload_with(&config(
        &a,
        &b,
        "  - { name: r, path_prefix: /new, upstream: b }\n",
    ));
    assert_eq!(status["generation"], 2, "{status}");
    assert_eq!(status["last_reload_error"], serde_json::Value::Null);

    assert_eq!(gw.get("h", "/new").header("x-upstream"), Some("b"));
    assert_eq!(gw.get("h", "/old").assert_gateway_error(404), "no_route");
    // A keepalive connection opened before the reload sees the new config.
    kept.send("GET", "h", "/new", &[], b"");
    assert_eq!(kept.read_response().header("x-upstream"), Some("b"));
}

#[test]
fn an_invalid_file_changes_nothing() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gw = Gateway::start(&config(
        &a,
        &b,
        "  - { name: r, path_prefix: /, upstream: a }\n",
    ));

    let status = gw.reload_with(&config(
        &a,
        &b,
        "  - { name: r, path_prefix: /, upstream: userz }\n",
    ));
    assert_eq!(status["generation"], 1, "{status}");
    let error = status["last_reload_error"].as_str().unwrap();
    assert!(
        error.contains(r#"routes[0].upstream: no upstream named "userz""#),
        "{error}"
    );
    assert_eq!(gw.get("h", "/x").header("x-upstream"), Some("a"));

    let status = gw.reload_with("routes: [ {");
    assert!(
        status["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("invalid YAML"),
        "{status}"
    );
    assert_eq!(gw.get("h", "/x").header("x-upstream"), Some("a"));
    assert!(gw
        .log()
        .contains("still serving the previous configuration"));
}

#[test]
fn a_request_in_flight_finishes_on_the_snapshot_it_started_with() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gw = Gateway::start(&config(
        &a,
        &b,
        "  - { name: slow, path_prefix: /slow, upstream: a }\n",
    ));
    let addr = gw.addr;
    let in_flight = std::thread::spawn(move || {
        support::request(
            addr,
            "GET",
            "h",
            "/slow",
            &[("X-Test-Delay-Ms", "1500")],
            b"",
        )
    });
    gw.wait_until("the slow request reaches the upstream", || a.hits() == 1);

    gw.reload_with(&config(
        &a,
        &b,
        "  - { name: other, path_prefix: /other, upstream: b }\n",
    ));
    assert_eq!(gw.get("h", "/slow").status, 404);

    let finished = in_flight.join().unwrap();
    assert_eq!(finished.status, 200);
    assert_eq!(finished.header("x-upstream"), Some("a"));
}

#[test]
fn health_state_of_surviving_targets_carries_over() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let pool = |retries: u32, route: &str| {
        format!(
            "upstreams:\n  pool:\n    targets: [\"{}\", \"{}\"]\n    retries: {retries}\n    health_check: {{ http_path: /healthz, interval: 100ms, unhealthy_after: 1, healthy_after: 1 }}\nroutes:\n  - {{ name: r, path_prefix: {route}, upstream: pool }}\n",
            a.addr, b.addr
        )
    };
    let gw = Gateway::start(&pool(1, "/"));
    a.set_healthy(false);
    gw.wait_until("a is ejected", || {
        (0..6).all(|_| gw.get("h", "/").header("x-upstream") == Some("b"))
    });
    // Stop checking results from here on: a must stay ejected through the
    // reload, not be re-admitted as healthy by a fresh registry.
    let before = a.hits();
    // A changed route and a changed upstream (retries): the cluster is
    // rebuilt, the health probe is reused.
    gw.reload_with(&pool(0, "/v2"));
    for _ in 0..20 {
        assert_eq!(gw.get("h", "/v2/x").header("x-upstream"), Some("b"));
    }
    assert_eq!(a.hits(), before);
}
