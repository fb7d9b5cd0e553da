//! Circuit breakers over real sockets: a failing target stops getting
//! traffic, probes bring it back, a dead upstream answers 503 at once.

mod support;

use std::io::Write;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use support::upstream::{Scripted, Upstream};
use support::{DeadPort, Gateway};

/// An upstream answering with a status the test switches.
struct Switchable {
    server: Scripted,
    status: Arc<AtomicU16>,
}

impl Switchable {
    fn start(status: u16) -> Switchable {
        let status = Arc::new(AtomicU16::new(status));
        let current = Arc::clone(&status);
        let server = Scripted::start(move |_, _, _, w| {
            let code = current.load(Ordering::SeqCst);
            let resp = format!("HTTP/1.1 {code} X\r\nContent-Length: 2\r\n\r\nok");
            w.write_all(resp.as_bytes()).is_ok()
        });
        Switchable { server, status }
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn hits(&self) -> usize {
        self.server.hits()
    }
}

const BREAKER: &str =
    "circuit_breaker: { window: 10s, min_requests: 4, error_percent: 50, open_for: 1s, half_open_probes: 2 }";

fn config(targets: &[String], extra: &str) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "upstreams:\n  app: {{ targets: [{}], {BREAKER} }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: app }}\n{extra}",
        list.join(", ")
    )
}

fn circuit(gw: &Gateway, addr: std::net::SocketAddr) -> String {
    let upstreams = gw.admin_get("/upstreams").json();
    upstreams["upstreams"]["app"]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["address"] == addr.to_string())
        .map(|t| t["circuit"].as_str().unwrap_or("none").to_owned())
        .unwrap()
}

#[test]
fn a_failing_target_opens_probes_close_it_and_a_failed_probe_reopens_it() {
    let bad = Switchable::start(500);
    let good = Upstream::start("good");
    let gw = Gateway::start(&config(
        &[bad.server.addr.to_string(), good.addr.to_string()],
        "",
    ));
    let statuses: Vec<u16> = (0..20).map(|_| gw.get("h", "/x").status).collect();
    // Round robin: the bad target saw 4 requests, all 500, and opened.
    assert_eq!(bad.hits(), 4, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 4);
    assert_eq!(circuit(&gw, bad.server.addr), "open");
    assert!(gw.admin_get("/readyz").json()["open_circuits"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c.as_str().unwrap().contains(&bad.server.addr.to_string())));

    // Still failing when the breaker lets a probe through: open again,
    // after just one more request.
    gw.wait_until("half-open", || circuit(&gw, bad.server.addr) == "half_open");
    for _ in 0..6 {
        gw.get("h", "/x");
    }
    assert_eq!(bad.hits(), 5, "one probe, then open again");
    assert_eq!(circuit(&gw, bad.server.addr), "open");

    // Back to health: two good probes close it.
    bad.set(200);
    gw.wait_until("half-open again", || {
        circuit(&gw, bad.server.addr) == "half_open"
    });
    for _ in 0..8 {
        assert_eq!(gw.get("h", "/x").status, 200);
    }
    assert_eq!(circuit(&gw, bad.server.addr), "closed");
    assert!(bad.hits() >= 8, "the closed target gets its share again");
}

#[test]
fn every_circuit_open_is_503_at_once_and_survives_a_reload() {
    let bad = Switchable::start(503);
    let body = config(&[bad.server.addr.to_string()], "");
    let gw = Gateway::start(&body);
    for _ in 0..4 {
        assert_eq!(gw.get("h", "/x").status, 503);
    }
    let resp = gw.get("h", "/x");
    assert_eq!(resp.assert_gateway_error(503), "circuit_open");
    assert_eq!(bad.hits(), 4, "an open circuit sent the request anyway");
    // A reload that keeps the target keeps its breaker.
    let other = body.replace("name: r,", "name: r2,");
    assert!(gw.reload_with(&other)["last_reload_error"].is_null());
    assert_eq!(gw.get("h", "/x").assert_gateway_error(503), "circuit_open");
    assert_eq!(bad.hits(), 4);
    assert!(!gw.admin_get("/config").json()["open_circuits"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn connect_failures_in_a_row_open_the_circuit() {
    let dead = DeadPort::new();
    let gw = Gateway::start(&config(&[dead.addr.to_string()], ""));
    let got: Vec<u16> = (0..3).map(|_| gw.get("h", "/x").status).collect();
    assert_eq!(got, [502, 502, 502], "{}", gw.log());
    assert_eq!(gw.get("h", "/x").assert_gateway_error(503), "circuit_open");
    assert_eq!(circuit(&gw, dead.addr), "open");
}
