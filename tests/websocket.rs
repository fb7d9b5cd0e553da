//! WebSocket tunnels: idle longer than the upstream read timeout, closed
//! after `websocket_idle_timeout`, kept across a SIGHUP reload; a route
//! `timeout` bounds a tunnel's whole life, not how long it may idle.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};
use support::upstream::Scripted;
use support::{Connection, Gateway};

fn config(ws: &Scripted, route_extra: &str, generation: u32) -> String {
    format!(
        "upstreams:\n  ws: {{ targets: [\"{}\"], timeouts: {{ read: 1s }} }}\nroutes:\n  - {{ name: socket, path_prefix: /ws, upstream: ws, websocket: true{route_extra}, response_headers: {{ set: {{ X-Generation: \"{generation}\" }} }} }}\n",
        ws.addr
    )
}

fn open_tunnel(gw: &Gateway) -> Connection {
    let mut conn = Connection::open(gw.addr);
    conn.send_raw(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    let head = conn.read_response_head();
    assert!(head.start_line.contains(" 101 "), "{}", head.start_line);
    conn
}

#[test]
fn a_tunnel_idles_past_the_upstream_read_timeout_and_survives_a_reload() {
    let ws = Scripted::websocket_echo();
    let gw = Gateway::start(&config(&ws, "", 0));
    let mut conn = open_tunnel(&gw);
    conn.send_raw(b"hello");
    assert_eq!(conn.read_bytes(5), b"hello");
    // Twice the upstream's read timeout of silence.
    std::thread::sleep(Duration::from_millis(2200));
    conn.send_raw(b"still");
    assert_eq!(conn.read_bytes(5), b"still");
    // A reload (the route changes) leaves the tunnel as it is.
    let status = gw.reload_with(&config(&ws, "", 1));
    assert!(status["last_reload_error"].is_null(), "{status}");
    conn.send_raw(b"after");
    assert_eq!(conn.read_bytes(5), b"after");
}

#[test]
fn a_silent_tunnel_closes_after_websocket_idle_timeout() {
    let ws = Scripted::websocket_echo();
    let gw = Gateway::start(&config(&ws, ", websocket_idle_timeout: 1s", 0));
    let mut conn = open_tunnel(&gw);
    conn.send_raw(b"hello");
    assert_eq!(conn.read_bytes(5), b"hello");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(conn.closed_by_server(), "the idle tunnel is still open");
}

#[test]
fn with_a_route_timeout_an_idle_tunnel_lasts_until_websocket_idle_timeout() {
    let ws = Scripted::websocket_echo();
    // The upstream's read timeout (1s) is shorter than the tunnel's idle
    // timeout (2s), which is shorter than the route's timeout (8s).
    let gw = Gateway::start(&config(&ws, ", timeout: 8s, websocket_idle_timeout: 2s", 0));
    let mut conn = open_tunnel(&gw);
    conn.send_raw(b"hello");
    assert_eq!(conn.read_bytes(5), b"hello");
    // Past timeouts.read, within websocket_idle_timeout.
    std::thread::sleep(Duration::from_millis(1500));
    conn.send_raw(b"still");
    assert_eq!(conn.read_bytes(5), b"still");
    // Past websocket_idle_timeout, well within the route's timeout.
    std::thread::sleep(Duration::from_millis(3000));
    assert!(conn.closed_by_server(), "the idle tunnel is still open");
}

#[test]
fn the_route_timeout_ends_even_a_busy_tunnel() {
    let ws = Scripted::websocket_echo();
    let gw = Gateway::start(&config(&ws, ", timeout: 2s", 0));
    let mut conn = open_tunnel(&gw);
    let mut writer = conn.writer();
    // A byte each way every 100 ms: never idle for any read timeout.
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut echoes = 0;
    let closed = loop {
        if Instant::now() > give_up {
            break false;
        }
        // After the close a write may fail; the read below tells.
        let _ = writer.write_all(b"x");
        if conn.closed_by_server() {
            break true;
        }
        echoes += 1;
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(closed, "the busy tunnel outlived the route's timeout");
    assert!(echoes > 0, "the tunnel carried nothing before it closed");
}
