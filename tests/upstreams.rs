//! Load balancing, health checks, failover, retries and timeouts, against
//! real upstream servers.

mod support;

use std::collections::HashMap;
use support::upstream::Upstream;
use support::{Connection, Gateway, Response};

/// An address on which nothing listens, reserved until the test ends.
fn dead_address() -> String {
    let port = support::DeadPort::new();
    let addr = port.addr.to_string();
    // Kept open for the rest of the test process, so no other test's
    // server can appear on the address.
    std::mem::forget(port);
    addr
}

fn one_route(upstream_yaml: &str) -> String {
    format!("upstreams:\n  pool:\n{upstream_yaml}routes:\n  - {{ name: all, path_prefix: /, upstream: pool }}\n")
}

/// Sends `n` GETs over one keepalive connection and counts answers by the
/// upstream that served them; `None` if any answer was not a 200.
fn try_tally(gw: &Gateway, n: usize, headers: &[(&str, &str)]) -> Option<HashMap<String, usize>> {
    let mut conn = Connection::open(gw.addr);
    let mut counts = HashMap::new();
    for _ in 0..n {
        conn.send("GET", "h", "/", headers, b"");
        let resp = conn.read_response();
        if resp.status != 200 {
            return None;
        }
        *counts
            .entry(resp.header("x-upstream")?.to_owned())
            .or_default() += 1;
    }
    Some(counts)
}

fn tally(gw: &Gateway, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    try_tally(gw, n, headers).expect("every request answered 200")
}

#[test]
fn weighted_round_robin_sends_three_quarters_to_weight_three() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\", {{ address: \"{}\", weight: 3 }}]\n    balance: round_robin\n",
        a.addr, b.addr
    )));
    let counts = tally(&gw, 4000, &[]);
    let share_b = counts["b"] as f64 / 4000.0;
    assert!((share_b - 0.75).abs() <= 0.02, "{counts:?}");
}

#[test]
fn weighted_random_follows_weights() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\", {{ address: \"{}\", weight: 3 }}]\n    balance: random\n",
        a.addr, b.addr
    )));
    let counts = tally(&gw, 2000, &[]);
    let share_b = counts["b"] as f64 / 2000.0;
    // 2000 draws at p=0.75: a standard deviation is ~1 point; allow 5.
    assert!((share_b - 0.75).abs() <= 0.05, "{counts:?}");
}

#[test]
fn consistent_hash_keeps_each_key_on_one_target() {
    let ups: Vec<Upstream> = ["a", "b", "c"].iter().map(|n| Upstream::start(n)).collect();
    let targets: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [{}]\n    balance: consistent_hash\n    hash_key: header:X-User\n",
        targets.join(", ")
    )));
    let mut used = std::collections::HashSet::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let counts = tally(&gw, 5, &[("X-User", &user)]);
        assert_eq!(counts.len(), 1, "{user} moved between targets: {counts:?}");
        used.extend(counts.into_keys());
    }
    assert!(used.len() >= 2, "30 keys all hashed to {used:?}");
}

#[test]
fn consistent_hash_by_client_ip_is_sticky() {
    let ups: Vec<Upstream> = ["a", "b", "c"].iter().map(|n| Upstream::start(n)).collect();
    let targets: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [{}]\n    balance: consistent_hash\n",
        targets.join(", ")
    )));
    assert_eq!(tally(&gw, 30, &[]).len(), 1);
}

#[test]
fn least_conn_avoids_the_busy_target() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\", \"{}\"]\n    balance: least_conn\n",
        a.addr, b.addr
    )));
    // Occupy one target with a slow request...
    let addr = gw.addr;
    let slow = std::thread::spawn(move || {
        support::request(addr, "GET", "h", "/", &[("X-Test-Delay-Ms", "3000")], b"")
            .header("x-upstream")
            .unwrap()
            .to_owned()
    });
    gw.wait_until("the slow request reaches a target", || {
        a.hits() + b.hits() == 1
    });
    let busy = if a.hits() == 1 { "a" } else { "b" };
    // ...then every request meanwhile goes to the idle one. Round robin
    // would send half of them to the busy target.
    let counts = tally(&gw, 10, &[]);
    assert_eq!(counts.get(busy), None, "busy target {busy} got {counts:?}");
    assert_eq!(slow.join().unwrap(), busy);
}

#[test]
fn a_dead_target_fails_over_to_a_live_one() {
    let live = Upstream::start("live");
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\", \"{}\"]\n    retries: 1\n",
        dead_address(),
        live.addr
    )));
    let counts = tally(&gw, 20, &[]);
    assert_eq!(counts["live"], 20);
}

#[test]
fn with_every_target_dead_the_answer_is_502() {
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\", \"{}\"]\n    retries: 1\n",
        dead_address(),
        dead_address()
    )));
    assert_eq!(
        gw.get("h", "/").assert_gateway_error(502),
        "upstream_unavailable"
    );
}

#[test]
fn health_checks_eject_a_failing_target_and_bring_it_back() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\", \"{}\"]\n    health_check: {{ http_path: /healthz, interval: 100ms, healthy_after: 2, unhealthy_after: 2 }}\n",
        a.addr, b.addr
    )));
    gw.wait_until("health checks run", || a.health_checks() >= 2);
    assert_eq!(tally(&gw, 10, &[]).len(), 2);

    a.set_healthy(false);
    gw.wait_until("a is ejected", || !tally(&gw, 6, &[]).contains_key("a"));
    let before = a.hits();
    assert_eq!(tally(&gw, 20, &[])["b"], 20);
    assert_eq!(a.hits(), before, "an ejected target received traffic");

    b.set_healthy(false);
    gw.wait_until("b is ejected too", || gw.get("h", "/").status == 502);
    assert_eq!(
        gw.get("h", "/").assert_gateway_error(502),
        "upstream_unavailable"
    );
    // The node stays ready (no readyz_requires); /upstreams shows why 502.
    assert_eq!(gw.admin_get("/readyz").status, 200);
    let pool = &gw.admin_get("/upstreams").json()["upstreams"]["pool"];
    assert_eq!(pool["healthy_targets"], 0, "{pool}");

    a.set_healthy(true);
    b.set_healthy(true);
    gw.wait_until("both return", || {
        try_tally(&gw, 6, &[]).is_some_and(|c| c.len() == 2)
    });
    assert_eq!(gw.admin_get("/readyz").status, 200);
}

/// An upstream with one target takes a shorter path through selection; its
/// health still decides whether it gets traffic.
#[test]
fn a_lone_target_is_ejected_and_brought_back() {
    let a = Upstream::start("a");
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\"]\n    health_check: {{ http_path: /healthz, interval: 100ms, healthy_after: 2, unhealthy_after: 2 }}\n",
        a.addr
    )));
    gw.wait_until("health checks run", || a.health_checks() >= 2);
    assert_eq!(tally(&gw, 5, &[])["a"], 5);

    a.set_healthy(false);
    gw.wait_until("a is ejected", || gw.get("h", "/").status == 502);
    let before = a.hits();
    assert_eq!(
        gw.get("h", "/").assert_gateway_error(502),
        "upstream_unavailable"
    );
    assert_eq!(a.hits(), before, "an ejected target received traffic");

    a.set_healthy(true);
    gw.wait_until("a returns", || gw.get("h", "/").status == 200);
    assert_eq!(tally(&gw, 5, &[])["a"], 5);
}

#[test]
fn tcp_health_check_ejects_a_closed_port() {
    let live = Upstream::start("live");
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\", \"{}\"]\n    retries: 0\n    health_check: {{ interval: 100ms, unhealthy_after: 1 }}\n",
        dead_address(),
        live.addr
    )));
    // With retries off, only ejection keeps requests away from the dead port.
    gw.wait_until("the dead port is ejected", || {
        (0..6).all(|_| gw.get("h", "/").status == 200)
    });
    assert_eq!(tally(&gw, 20, &[])["live"], 20);
}

/// POSTs and GETs to a pool where target `a` reads each request and hangs
/// up without answering.
fn hang_up_pool() -> (Upstream, Upstream, Gateway) {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    a.set_close_after_read(true);
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\", \"{}\"]\n    retries: 1\n",
        a.addr, b.addr
    )));
    (a, b, gw)
}

#[test]
fn a_post_that_reached_the_upstream_is_not_retried() {
    let (a, b, gw) = hang_up_pool();
    let results: Vec<Response> = (0..6)
        .map(|_| support::request(gw.addr, "POST", "h", "/", &[], b"payload"))
        .collect();
    let failed = results.iter().filter(|r| r.status == 502).count();
    assert!(failed >= 1, "round robin should have sent some POSTs to a");
    for r in results.iter().filter(|r| r.status == 502) {
        assert_eq!(r.assert_gateway_error(502), "upstream_error");
    }
    assert_eq!(a.hits(), failed, "each failed POST reached a exactly once");
    assert_eq!(b.hits(), 6 - failed, "no failed POST was replayed on b");
}

#[test]
fn an_idempotent_request_is_retried_on_another_target() {
    let (a, b, gw) = hang_up_pool();
    for _ in 0..6 {
        assert_eq!(gw.get("h", "/").status, 200);
    }
    assert!(a.hits() >= 1, "round robin should have tried a");
    assert_eq!(b.hits(), 6);
}

#[test]
fn a_slow_upstream_gives_504() {
    let slow = Upstream::start("slow");
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\"]\n    timeouts: {{ read: 300ms }}\n",
        slow.addr
    )));
    let resp = support::request(
        gw.addr,
        "GET",
        "h",
        "/",
        &[("X-Test-Delay-Ms", "2000")],
        b"",
    );
    assert_eq!(resp.assert_gateway_error(504), "upstream_timeout");
    // A fast request on the same upstream still works.
    assert_eq!(gw.get("h", "/").status, 200);
}

#[test]
fn a_client_that_hangs_up_is_not_retried_elsewhere() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\", \"{}\"]\n    retries: 1\n",
        a.addr, b.addr
    )));
    let mut conn = Connection::open(gw.addr);
    conn.send("GET", "h", "/", &[("X-Test-Delay-Ms", "800")], b"");
    gw.wait_until("the request reaches a target", || a.hits() + b.hits() == 1);
    drop(conn);
    // Give a wrong retry every chance to happen, then check it did not.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        a.hits() + b.hits(),
        1,
        "the request was sent again after the client left"
    );
    assert!(!gw.log().contains("no healthy target"), "{}", gw.log());
}

#[test]
fn a_garbage_reply_from_the_upstream_gives_502_json() {
    let bad = Upstream::start("bad");
    bad.set_garbage_reply(true);
    let gw = Gateway::start(&one_route(&format!(
        "    targets: [\"{}\"]\n    retries: 0\n",
        bad.addr
    )));
    let resp = support::request(gw.addr, "POST", "h", "/", &[], b"x");
    assert_eq!(resp.assert_gateway_error(502), "upstream_error");
    // The gateway is still serving.
    assert_eq!(gw.admin_get("/healthz").status, 200);
}

#[test]
fn a_timed_out_request_is_retried_only_when_retry_on_lists_timeout() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    for (retry_on, attempts) in [
        ("", 1),
        ("    retry_on: [connect_failure, reset, timeout]\n", 2),
    ] {
        let gw = Gateway::start(&one_route(&format!(
            "    targets: [\"{}\", \"{}\"]\n    retries: 1\n    timeouts: {{ read: 300ms }}\n{retry_on}",
            a.addr, b.addr
        )));
        let before = a.hits() + b.hits();
        let resp = support::request(
            gw.addr,
            "GET",
            "h",
            "/",
            &[("X-Test-Delay-Ms", "1500")],
            b"",
        );
        assert_eq!(resp.assert_gateway_error(504), "upstream_timeout");
        gw.wait_until("the attempts are made", || {
            a.hits() + b.hits() >= before + attempts
        });
        // Room for a wrong extra attempt to show up.
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_eq!(
            a.hits() + b.hits(),
            before + attempts,
            "retry_on: {retry_on:?}"
        );
    }
}

#[test]
fn a_route_timeout_bounds_all_attempts_together() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let gw = Gateway::start(&format!(
        "upstreams:\n  pool:\n    targets: [\"{}\", \"{}\"]\n    retries: 1\n    retry_on: [connect_failure, reset, timeout]\n    timeouts: {{ read: 5s }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: pool, timeout: 500ms }}\n",
        a.addr, b.addr
    ));
    let resp = support::request(
        gw.addr,
        "GET",
        "h",
        "/",
        &[("X-Test-Delay-Ms", "2000")],
        b"",
    );
    assert_eq!(resp.assert_gateway_error(504), "upstream_timeout");
    // The first attempt used up the route's time: no second target tried.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(a.hits() + b.hits(), 1);
}

/// A listener on 127.0.0.1 whose accept queue holds one connection
/// (a listen backlog of 0), nonblocking.
fn tiny_backlog_listener() -> std::net::TcpListener {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    // SAFETY: listen() again on a listening socket only sets its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    listener.set_nonblocking(true).expect("nonblocking");
    listener
}

/// How many times the kernel has resent the SYN of a connection being
/// made to `port` (from /proc/net/tcp: state 02 is SYN_SENT, `retrnsmt`
/// the retransmissions), if one is being made.
fn syn_resends_to(port: u16) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let to_port = fields.get(2)?.rsplit(':').next()?;
        (u16::from_str_radix(to_port, 16).ok()? == port && fields.get(3) == Some(&"02"))
            .then(|| u32::from_str_radix(fields.get(6)?, 16).ok())
            .flatten()
    })
}

#[test]
fn a_dropped_syn_and_its_first_resend_cost_a_slower_connect_not_the_request() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let listener = tiny_backlog_listener();
    let addr = listener.local_addr().expect("address");
    // Fill the accept queue: Linux then drops every SYN to the port,
    // as it does when a burst of connections overflows a real backlog.
    let mut fillers = Vec::new();
    while let Ok(conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
        fillers.push(conn);
        assert!(fillers.len() < 8, "the accept queue never filled");
    }
    assert!(!fillers.is_empty());
    // The default connect timeout, whatever it is.
    let gw = Gateway::start(&format!(
        "upstreams:\n  app: {{ targets: [\"{addr}\"] }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n"
    ));
    let gateway = gw.addr;
    let request = std::thread::spawn(move || support::get(gateway, "h", "/x"));
    // The first SYN and its first resend (1 s later) are dropped; the
    // queue is emptied only then, so the next resend gets through.
    let deadline = Instant::now() + support::WAIT;
    while syn_resends_to(addr.port()).is_none_or(|n| n < 1)
        && !request.is_finished()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(fillers);
    while !request.is_finished() && Instant::now() < deadline {
        match listener.accept() {
            Ok((conn, _)) => {
                std::thread::spawn(move || {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(support::WAIT));
                    let mut writer = conn.try_clone().expect("clone");
                    let mut reader = support::http::buffered(conn);
                    if let Ok(Some(_)) = support::http::read_head(&mut reader) {
                        let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let resp = request.join().expect("request thread");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.body, b"ok");
}
