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

/// Whether `text` is Prometheus text exposition: `# HELP`/`# TYPE` lines
/// and samples `name{label="value",...} number`, each family typed once.
fn check_exposition(text: &str) -> Result<(), String> {
    if !text.ends_with('\n') {
        return Err("the body does not end with a newline".into());
    }
    let is_name = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !typed.insert(name.to_owned()) {
                return Err(format!("{name} typed twice"));
            }
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value: {line:?}"))?;
        value
            .parse::<f64>()
            .map_err(|_| format!("bad value: {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                Some(
                    rest.strip_suffix('}')
                        .ok_or_else(|| format!("unclosed labels: {line:?}"))?,
                ),
            ),
            None => (series, None),
        };
        if !is_name(name) {
            return Err(format!("bad name: {line:?}"));
        }
        for pair in labels.into_iter().flat_map(|l| l.split(',')) {
            let ok = pair.split_once('=').is_some_and(|(k, v)| {
                is_name(k) && v.len() >= 2 && v.starts_with('"') && v.ends_with('"')
            });
            if !ok {
                return Err(format!("bad label {pair:?}: {line:?}"));
            }
        }
    }
    Ok(())
}

#[test]
fn concurrent_scrapes_each_get_whole_consistent_text() {
    use std::os::unix::fs::OpenOptionsExt;
    const TARGETS: u16 = 400;
    let up = Upstream::start("a");
    // An access log into a pipe nobody reads, so some lines are dropped
    // and counted before the first scrape.
    let fifo = support::scratch_dir("metrics-fifo").join("access.pipe");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a plain mkfifo on a path this test owns.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let many: Vec<String> = (0..TARGETS)
        .map(|i| format!("\"127.0.0.1:{}\"", 20_000 + i))
        .collect();
    let gw = Gateway::start(&format!(
        "access_log: {{ path: \"{}\", queue_lines: 10 }}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\n  many: {{ targets: [{}], circuit_breaker: {{}} }}\nroutes:\n  - {{ name: open, path_prefix: /open, upstream: app }}\n",
        fifo.display(),
        up.addr,
        many.join(", ")
    ));
    let mut conn = support::Connection::open(gw.addr);
    for i in 0..200 {
        conn.send("GET", "h", &format!("/open/{i}"), &[], b"");
        assert_eq!(conn.read_response().status, 200, "request {i}");
    }
    // A line is logged after its response: wait until the count settles.
    let dropped = || {
        gw.admin_get("/config").json()["access_log_dropped"]
            .as_u64()
            .unwrap()
    };
    let mut last = dropped();
    gw.wait_until("the drop count to settle", || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = dropped();
        std::mem::replace(&mut last, now) == now
    });
    assert!(last > 0, "nothing was dropped");

    // The first scrapes all at once: nothing was scraped before.
    let start = std::sync::Barrier::new(6);
    let bodies: Vec<String> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    (0..15)
                        .map(|_| {
                            let resp = gw.admin_get("/metrics");
                            assert_eq!(resp.status, 200);
                            String::from_utf8(resp.body).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    for (i, text) in bodies.iter().enumerate() {
        if let Err(e) = check_exposition(text) {
            panic!("scrape {i}: {e}\n{text}");
        }
        let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(
            count("tollgate_upstream_target_healthy{"),
            usize::from(TARGETS) + 1,
            "scrape {i}: every target's health"
        );
        assert_eq!(
            count("tollgate_circuit_state{"),
            usize::from(TARGETS),
            "scrape {i}: every breaker"
        );
        assert_eq!(
            sample(
                text,
                r#"tollgate_requests_total{route="open",status="200"}"#
            ),
            Some(200.0),
            "scrape {i}"
        );
        assert_eq!(
            sample(text, "tollgate_access_log_dropped_total"),
            Some(last as f64),
            "scrape {i}: counted once, however many scrapes caught it up"
        );
    }
}
