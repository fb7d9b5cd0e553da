//! `tollgate explain` and `GET /routes`: the route table as operators see it.

mod support;

use serde_json::Value;
use std::process::Command;
use support::upstream::Upstream;
use support::{binary, scratch_dir, Gateway};

const ROUTES: &str = "upstreams:\n  orders: { targets: [\"127.0.0.1:2\"] }\n  web: { targets: [\"127.0.0.1:3\"] }\nroutes:\n  - { name: orders, hosts: [api.example.com], path_prefix: /orders, methods: [GET, POST], upstream: orders, strip_prefix: true, rate_limit: { rate: 10/s, burst: 5 }, max_inflight: 64 }\n  - { name: orders-any-host, path_prefix: /orders, upstream: orders }\n  - { name: health, path: /healthz, methods: [GET], upstream: web }\n  - { name: admin, hosts: [\"*.internal.example\"], path_prefix: /, upstream: web }\n";

fn explain(args: &[&str]) -> (i32, String, String) {
    let dir = scratch_dir("explain");
    let config = dir.join("tollgate.yaml");
    std::fs::write(&config, format!("listen: [\"127.0.0.1:1\"]\n{ROUTES}")).unwrap();
    let out = Command::new(binary())
        .arg("explain")
        .arg("-c")
        .arg(&config)
        .args(args)
        .output()
        .expect("run tollgate explain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn explain_json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = explain(&all);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn verdict<'a>(v: &'a Value, route: &str) -> &'a str {
    v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["route"] == route)
        .and_then(|c| c["verdict"].as_str())
        .unwrap()
}

#[test]
fn a_match_says_which_route_why_and_what_applies() {
    let v = explain_json(&["GET", "http://api.example.com/orders/./7?x=1"]);
    assert_eq!(v["status"], 200);
    assert_eq!(v["route"], "orders");
    assert_eq!(v["request"]["normalized_path"], "/orders/7");
    assert_eq!(v["upstream"]["name"], "orders");
    assert_eq!(v["upstream"]["forwarded_path"], "/7");
    assert_eq!(v["policy"]["max_inflight"], 64);
    assert_eq!(v["policy"]["rate_limit"]["burst"], "5");
    assert!(verdict(&v, "orders").contains("taken"));
    assert!(verdict(&v, "orders-any-host").contains("more specific"));
    assert!(verdict(&v, "health").contains("does not match"));
    assert!(verdict(&v, "admin").contains("host api.example.com"));
    // The text form says the same for people.
    let (code, text, _) = explain(&["GET", "http://api.example.com/orders/7"]);
    assert_eq!(code, 0);
    assert!(text.contains("=> route \"orders\""), "{text}");
    assert!(text.contains("routes considered:"), "{text}");
}

#[test]
fn no_match_is_404_or_405_with_the_near_misses() {
    let v = explain_json(&["GET", "http://shop.example.com/cart"]);
    assert_eq!(v["status"], 404);
    assert_eq!(v["error"], "no_route");
    assert!(verdict(&v, "orders").contains("host shop.example.com"));
    assert!(verdict(&v, "orders-any-host").contains("/cart does not match"));
    let v = explain_json(&["-H", "Host: api.example.com", "DELETE", "/orders/7"]);
    // The exact host and path decide the method alone: no fall-through to
    // the any-host route, which says why.
    assert_eq!(v["status"], 405);
    assert_eq!(v["allow"], "GET, HEAD, POST");
    assert!(verdict(&v, "orders").contains("DELETE is not among GET, POST, HEAD"));
    let why = verdict(&v, "orders-any-host");
    assert!(
        why.contains("more specific host and path of orders decide"),
        "{why}"
    );
    let v = explain_json(&["DELETE", "http://other.example.com/orders/7"]);
    assert_eq!(v["route"], "orders-any-host");
    let v = explain_json(&["DELETE", "http://x/healthz"]);
    assert_eq!(v["status"], 405);
    assert!(v["allow"].as_str().unwrap().contains("GET"));
    let v = explain_json(&["GET", "http://x/a/../../etc"]);
    assert_eq!(v["status"], 400);
    let (code, _, err) = explain(&["GET"]);
    assert_eq!(code, 2);
    assert!(err.contains("usage"));
}

#[test]
fn the_admin_listener_serves_the_route_table() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&ROUTES.replace("127.0.0.1:2", &up.addr.to_string()));
    let table = gw.admin_get("/routes").json();
    let routes = table["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 4);
    assert_eq!(routes[0]["name"], "orders");
    assert_eq!(routes[0]["hosts"], "api.example.com");
    assert_eq!(routes[0]["path"], "path prefix /orders");
    assert_eq!(routes[0]["upstream"], "orders");
    assert_eq!(routes[3]["hosts"], "*.internal.example");
}
