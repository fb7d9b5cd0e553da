//! Client keepalive: idle timeout, request limit, keepalive off, requests
//! that arrive in pieces or pipelined, and idle connections at shutdown.

mod support;

use std::process::Command;
use support::upstream::Upstream;
use support::{check_config, Connection, Gateway};

fn routes(up: &Upstream) -> String {
    format!(
        "upstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n",
        up.addr
    )
}

fn ok(conn: &mut Connection) {
    conn.send("GET", "h", "/", &[], b"");
    let resp = conn.read_response();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
}

#[test]
fn an_idle_connection_is_closed_after_the_keepalive_timeout() {
    let up = Upstream::start("a");
    let gw = Gateway::start_with_server(
        "keepalive_timeout_seconds: 1",
        &format!("limits: {{ header_timeout: 1s }}\n{}", routes(&up)),
    );
    let mut conn = Connection::open(gw.addr);
    ok(&mut conn);
    ok(&mut conn);
    assert!(conn.closed_by_server(), "idle connection left open");

    // A client that connects and never sends is closed the same way.
    let mut silent = Connection::open(gw.addr);
    assert!(silent.closed_by_server(), "silent connection left open");

    // One that starts a request on a reused connection and stalls is
    // answered 408 once the head's own deadline passes, then closed.
    let mut stalled = Connection::open(gw.addr);
    ok(&mut stalled);
    stalled.send_raw(b"GET / HT");
    let resp = stalled.read_response();
    assert_eq!(resp.assert_gateway_error(408), "request_timeout");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(stalled.closed_by_server(), "stalled request left open");
}

#[test]
fn a_connection_carries_requests_up_to_the_limit() {
    let up = Upstream::start("a");
    let gw = Gateway::start_with_server("keepalive_request_limit: 3", &routes(&up));
    let mut conn = Connection::open(gw.addr);
    for _ in 0..3 {
        ok(&mut conn);
    }
    assert!(conn.closed_by_server(), "connection open after 3 requests");
    assert_eq!(up.hits(), 3);

    // Without a limit, a connection keeps serving.
    let gw = Gateway::start(&routes(&up));
    let mut conn = Connection::open(gw.addr);
    for _ in 0..50 {
        ok(&mut conn);
    }
}

#[test]
fn keepalive_timeout_zero_closes_after_each_response() {
    let up = Upstream::start("a");
    let gw = Gateway::start_with_server("keepalive_timeout_seconds: 0", &routes(&up));
    let mut conn = Connection::open(gw.addr);
    ok(&mut conn);
    assert!(conn.closed_by_server(), "connection kept open");
}

#[test]
fn a_request_that_arrives_in_pieces_is_served() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&routes(&up));
    let mut conn = Connection::open(gw.addr);
    ok(&mut conn);
    // The gateway waits for the first byte of the next request, then hands
    // the connection to the parser, which must still wait for the rest.
    for piece in [
        &b"G"[..],
        b"ET /piece",
        b"s HTTP/1.1\r\nHo",
        b"st: h\r\n",
        b"\r\n",
    ] {
        conn.send_raw(piece);
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    let resp = conn.read_response();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["target"], "/pieces");
    ok(&mut conn);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start("a");
    let gw = Gateway::start(&routes(&up));
    let mut conn = Connection::open(gw.addr);
    ok(&mut conn);
    // Two requests in one write, then a body-carrying one and a chunked
    // one glued to the requests after them, then one that arrives while
    // the one before it is still being proxied.
    conn.send_raw(
        b"GET /one HTTP/1.1\r\nHost: h\r\n\r\nGET /two HTTP/1.1\r\nHost: h\r\n\r\n\
          POST /three HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
          POST /four HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /five HTTP/1.1\r\nHost: h\r\nX-Test-Delay-Ms: 200\r\n\r\n",
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    conn.send_raw(b"GET /six HTTP/1.1\r\nHost: h\r\n\r\n");
    for (target, body) in [
        ("/one", ""),
        ("/two", ""),
        ("/three", "hello"),
        ("/four", "abc"),
        ("/five", ""),
        ("/six", ""),
    ] {
        let resp = conn.read_response();
        assert_eq!(resp.status, 200, "{target}");
        let v = resp.json();
        assert_eq!(v["target"], target);
        assert_eq!(v["body"], body, "{target}: {v}");
    }
    ok(&mut conn);
    // A client that pipelines and then closes its side is not taken for
    // one that went away while requests it sent are still to be answered.
    // (The last one is, as for any client closing before its answer.)
    let mut conn = Connection::open(gw.addr);
    conn.send_raw(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n");
    conn.shutdown_write();
    assert_eq!(conn.read_response().json()["target"], "/a");
    assert_eq!(conn.read_response().json()["target"], "/b");
}

#[test]
fn a_graceful_stop_closes_idle_connections_once_they_stay_idle() {
    let up = Upstream::start("a");
    let gw = Gateway::start_with_server("grace_period_seconds: 20", &routes(&up));
    // A connection that never sent a request, one idle after a request and
    // one idle after several: each waits for a stop in its own state.
    let mut silent = Connection::open(gw.addr);
    let mut idle = Connection::open(gw.addr);
    ok(&mut idle);
    let mut used = Connection::open(gw.addr);
    for _ in 0..3 {
        ok(&mut used);
    }
    gw.signal("TERM");
    for (name, conn) in [
        ("silent", &mut silent),
        ("idle", &mut idle),
        ("used", &mut used),
    ] {
        assert!(
            conn.closed_by_server(),
            "{name} connection kept open on SIGTERM"
        );
    }
    // Once no connection is left the process ends, long before its 20 s
    // grace period: there is nothing left to drain.
    let start = std::time::Instant::now();
    let mut exited = false;
    while start.elapsed() < std::time::Duration::from_secs(10) {
        let alive = Command::new("kill")
            .args(["-0", &gw.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        // A zombie (exited, not yet reaped) still answers kill -0: look at
        // its state too.
        let zombie = std::fs::read_to_string(format!("/proc/{}/stat", gw.pid()))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if !alive || zombie {
            exited = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(exited, "an idle gateway waited out its grace period");
    assert!(gw.log().contains("drained: no client connection left"));
}

#[test]
fn a_zero_request_limit_is_a_config_error() {
    let (code, _, err) = check_config(
        "server:\n  keepalive_request_limit: 0\nlisten: [\"127.0.0.1:18080\"]\nupstreams:\n  app: { targets: [\"127.0.0.1:9001\"] }\nroutes:\n  - { name: all, path_prefix: /, upstream: app }\n",
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server.keepalive_request_limit: must be at least 1"),
        "{err}"
    );
}

/// Resident memory of a process, in KiB.

#[test]
fn memory_comes_back_after_a_crowd_of_connections_leaves() {
    const CROWD: usize = 2_000;
    // The test and the gateway each hold a descriptor per connection.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        assert!(
            limit.rlim_max >= 3 * CROWD as u64,
            "open file limit too low for this test"
        );
        limit.rlim_cur = limit.rlim_max.min(65_536);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let up = Upstream::start("a");
    let gw = Gateway::start(&routes(&up));
    let before = support::rss_kib(gw.pid());
    let mut crowd: Vec<Connection> = (0..CROWD).map(|_| Connection::open(gw.addr)).collect();
    for conn in &mut crowd {
        ok(conn);
    }
    let peak = support::rss_kib(gw.pid());
    assert!(
        peak > before + 4 * 1024,
        "{CROWD} connections cost only {} KiB",
        peak - before
    );
    drop(crowd);
    // Without the trim, glibc keeps all of it: RSS stays at the peak.
    let halfway = before + (peak - before) / 2;
    gw.wait_until("RSS falls back after the crowd leaves", || {
        support::rss_kib(gw.pid()) < halfway
    });
}

#[test]
fn an_error_after_which_the_connection_closes_says_so() {
    // A target that refuses connections: 502 from fail_to_proxy, after
    // which Pingora does not reuse the client's connection.
    let dead = support::DeadPort::new();
    let gw = Gateway::start(&format!(
        "upstreams:\n  app: {{ targets: [\"{}\"], retries: 0 }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n",
        dead.addr
    ));
    let mut conn = Connection::open(gw.addr);
    conn.send("GET", "h", "/", &[], b"");
    let resp = conn.read_response();
    assert!(resp.status >= 500, "{resp:?}");
    assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
    assert!(conn.closed_by_server());
}
