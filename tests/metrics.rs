//! Prometheus metrics after known traffic, over the admin listener.

mod support;

use support::upstream::Upstream;
use support::{request, send_raw, Gateway};
use tollgate::auth::api_key::digest_of;

fn body(up: &Upstream, route_name: &str) -> String {
    format!(
        "consumers:\n  alice: {{ api_keys: [\"{}\"] }}\nupstreams:\n  app: {{ targets: [\"{}\"], circuit_breaker: {{}} }}\nroutes:\n  - {{ name: keyed, path_prefix: /keyed, upstream: app, auth: [api_key], ip_deny: [10.0.0.0/8], rate_limit: {{ rate: 1/m, burst: 2 }} }}\n  - {{ name: {route_name}, path_prefix: /open, upstream: app }}\n",
        digest_of("alice-key"),
        up.addr
    )
}

/// The value of the sample whose line starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_count_known_traffic() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&body(&up, "open"));
    for _ in 0..3 {
        assert_eq!(gw.get("h", "/open/x").status, 200);
    }
    let key = [("X-API-Key", "alice-key")];
    for expected in [200, 200, 429] {
        assert_eq!(
            request(gw.addr, "GET", "h", "/keyed", &key, b"").status,
            expected
        );
    }
    assert_eq!(gw.get("h", "/keyed").status, 401);
    assert_eq!(
        request(gw.addr, "GET", "h", "/keyed", &[("X-API-Key", "nope")], b"").status,
        401
    );
    assert_eq!(gw.get("h", "/nowhere").status, 404);
    assert_eq!(send_raw(gw.addr, b"GET /x HTTP/1.1\r\n\r\n").status, 400);
    assert!(gw.reload_with(&body(&up, "open2"))["last_reload_error"].is_null());
    assert!(!gw.reload_with("routes: [")["last_reload_error"].is_null());

    let resp = gw.admin_get("/metrics");
    assert_eq!(resp.status, 200);
    assert!(resp
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(resp.body).unwrap();
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    };
    expect(r#"tollgate_requests_total{route="open",status="200"}"#, 3.0);
    expect(
        r#"tollgate_requests_total{route="keyed",status="200"}"#,
        2.0,
    );
    expect(
        r#"tollgate_requests_total{route="keyed",status="429"}"#,
        1.0,
    );
    expect(
        r#"tollgate_requests_total{route="keyed",status="401"}"#,
        2.0,
    );
    expect(r#"tollgate_requests_total{route="",status="404"}"#, 1.0);
    expect(r#"tollgate_requests_total{route="",status="400"}"#, 1.0);
    expect(r#"tollgate_rate_limited_total{route="keyed"}"#, 1.0);
    expect(
        r#"tollgate_auth_failures_total{reason="missing_credentials",route="keyed"}"#,
        1.0,
    );
    expect(
        r#"tollgate_auth_failures_total{reason="invalid_api_key",route="keyed"}"#,
        1.0,
    );
    expect(
        r#"tollgate_request_duration_seconds_count{route="open"}"#,
        3.0,
    );
    expect(
        r#"tollgate_upstream_duration_seconds_count{upstream="app"}"#,
        5.0,
    );
    expect(r#"tollgate_config_reloads_total{result="ok"}"#, 1.0);
    expect(r#"tollgate_config_reloads_total{result="error"}"#, 1.0);
    let target = up.addr.to_string();
    expect(
        &format!(r#"tollgate_upstream_target_healthy{{target="{target}",upstream="app"}}"#),
        1.0,
    );
    expect(
        &format!(r#"tollgate_circuit_state{{target="{target}",upstream="app"}}"#),
        0.0,
    );
    expect("tollgate_access_log_dropped_total", 0.0);
    expect("tollgate_redis_errors_total", 0.0);
    assert!(sample(&text, "tollgate_connections").is_some());
    // The scrape itself is not a proxied request.
    expect("tollgate_inflight_requests", 0.0);
    assert!(text.contains("tollgate_build_info{version=\""));
}
