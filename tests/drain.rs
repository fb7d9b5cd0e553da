//! Graceful drain: a stopping process (binary upgrade or SIGTERM) moves
//! its keepalive clients on without losing a request.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::upstream::{Scripted, Upstream};
use support::{load, Connection, Gateway};

fn routes(addr: SocketAddr) -> String {
    format!(
        "upstreams:\n  app: {{ targets: [\"{addr}\"] }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n"
    )
}

#[test]
fn a_request_in_flight_across_a_stop_is_answered_with_connection_close() {
    let release = Arc::new(AtomicBool::new(false));
    let released = Arc::clone(&release);
    let slow = Scripted::start(move |_, _, _, w| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !released.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_ok()
    });
    let gw = Gateway::start_with_server("grace_period_seconds: 5", &routes(slow.addr));
    let mut conn = Connection::open(gw.addr);
    conn.send_raw(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n");
    gw.wait_until("the upstream holds the request", || slow.hits() == 1);
    gw.signal("TERM");
    gw.wait_until("the drain starts", || gw.log().contains("draining"));
    release.store(true, Ordering::SeqCst);
    let resp = conn.read_response();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(
        conn.closed_by_server(),
        "the connection stayed open after its close"
    );
}

#[test]
fn an_idle_connection_still_gets_the_request_it_sends_during_the_drain() {
    let up = Upstream::start("a");
    let gw = Gateway::start_with_server(
        "grace_period_seconds: 10\ndrain_idle_timeout: 5s",
        &routes(up.addr),
    );
    let mut conn = Connection::open(gw.addr);
    conn.send_raw(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(
        conn.read_response().header("connection"),
        Some("keep-alive")
    );
    gw.signal("TERM");
    gw.wait_until("the drain starts", || gw.log().contains("draining"));
    // Idle when the stop came: its next request is answered, then closed.
    conn.send_raw(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n");
    let resp = conn.read_response();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(conn.closed_by_server());
}

#[test]
fn keepalive_load_across_two_upgrades_loses_no_request() {
    let up = Upstream::start("a");
    let mut gw = Gateway::start_with_server("grace_period_seconds: 3", &routes(up.addr));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(load::Tally::default());
    let clients = load::start(gw.addr, 32, true, &stop, &tally);
    gw.wait_until("load flows", || tally.ok() > 500);
    let mut old_pids = Vec::new();
    for round in 1..=2 {
        let old_pid = gw.pid();
        let old = gw.upgrade();
        assert!(
            support::exits_within(old, Duration::from_secs(20)).is_some(),
            "upgrade {round}: the old process did not exit"
        );
        old_pids.push(old_pid);
        let before = tally.ok();
        gw.wait_until("the new process serves", || tally.ok() > before + 200);
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let (ok, lost) = (tally.ok(), tally.lost());
    println!("across two upgrades: {ok} requests answered, {lost} lost");
    assert!(!old_pids.contains(&gw.pid()));
    assert_eq!(
        lost,
        0,
        "requests lost across the upgrades; log:\n{}",
        gw.log()
    );
}

#[test]
fn a_request_in_flight_across_an_upgrade_is_answered_and_the_next_goes_to_the_new_process() {
    let release = Arc::new(AtomicBool::new(false));
    let released = Arc::clone(&release);
    let slow = Scripted::start(move |head, _, _, w| {
        if head.start_line.contains(" /slow ") {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !released.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_ok()
    });
    let mut gw = Gateway::start_with_server("grace_period_seconds: 5", &routes(slow.addr));
    let mut conn = Connection::open(gw.addr);
    conn.send_raw(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n");
    gw.wait_until("the upstream holds the request", || slow.hits() == 1);
    let old = gw.upgrade();
    // The old process drains once Pingora's hand-off window has passed.
    gw.wait_until("the old process drains", || gw.log().contains("draining"));
    release.store(true, Ordering::SeqCst);
    let resp = conn.read_response();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(conn.closed_by_server());
    assert!(
        support::exits_within(old, Duration::from_secs(20)).is_some(),
        "the old process did not exit"
    );
    // Only the new process is left to answer a new connection.
    assert_eq!(gw.get("h", "/next").status, 200);
}
