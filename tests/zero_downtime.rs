//! Zero downtime, proved: two load generators (keepalive connections, and
//! a new connection per request) run throughout while the gateway gets 3
//! SIGHUP reloads and 2 binary upgrades, with one slow request straddling
//! an upgrade. No request may fail and no connection may be refused; each
//! step's config is live after it; each old process exits within its grace
//! period.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::upstream::Scripted;
use support::{load, request, Gateway};

/// The config of step `generation`: every answer carries it.
fn body(upstream: SocketAddr, generation: u32) -> String {
    format!(
        "upstreams:\n  app: {{ targets: [\"{upstream}\"] }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app, response_headers: {{ set: {{ X-Config: \"{generation}\" }} }} }}\n"
    )
}

fn generation(gw: &Gateway) -> Option<String> {
    request(gw.addr, "GET", "h", "/probe", &[], b"")
        .header("x-config")
        .map(str::to_owned)
}

#[test]
fn reloads_and_upgrades_under_load_lose_nothing() {
    let release = Arc::new(AtomicBool::new(false));
    let released = Arc::clone(&release);
    let upstream = Scripted::start(move |head, _, _, w| {
        if head.start_line.contains(" /slow ") {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !released.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_ok()
    });
    // Pingora's hand-off window (5 s) + grace (3 s) + runtime stop (1 s).
    let grace = Duration::from_secs(5 + 3 + 1);
    let mut gw = Gateway::start_with_server("grace_period_seconds: 3", &body(upstream.addr, 0));
    let stop = Arc::new(AtomicBool::new(false));
    let keepalive = Arc::new(load::Tally::default());
    let fresh = Arc::new(load::Tally::default());
    let mut clients = load::start(gw.addr, 8, true, &stop, &keepalive);
    clients.extend(load::start(gw.addr, 4, false, &stop, &fresh));
    gw.wait_until("load flows", || keepalive.ok() > 200 && fresh.ok() > 50);

    let mut slow = None;
    let mut step = 0;
    let mut upgrades = 0;
    for action in ["reload", "reload", "upgrade", "reload", "upgrade"] {
        step += 1;
        match action {
            "reload" => {
                let status = gw.reload_with(&body(upstream.addr, step));
                assert!(
                    status["last_reload_error"].is_null(),
                    "step {step}: {status}"
                );
            }
            _ => {
                // The new process reads the file as it starts.
                std::fs::write(
                    &gw.config_path,
                    std::fs::read_to_string(&gw.config_path).unwrap().replace(
                        &format!("X-Config: \"{}\"", step - 1),
                        &format!("X-Config: \"{step}\""),
                    ),
                )
                .unwrap();
                if slow.is_none() {
                    // One slow request straddles the first upgrade.
                    let addr = gw.addr;
                    slow = Some(std::thread::spawn(move || {
                        request(addr, "GET", "h", "/slow", &[], b"").status
                    }));
                    gw.wait_until("the slow request is upstream", || upstream.hits() > 0);
                }
                let old = gw.upgrade();
                upgrades += 1;
                gw.wait_until("the old process drains", || {
                    gw.log().matches("draining: responses").count() >= upgrades
                });
                release.store(true, Ordering::SeqCst);
                let took = support::exits_within(old, grace + Duration::from_secs(5));
                assert!(
                    took.is_some_and(|t| t <= grace + Duration::from_secs(2)),
                    "step {step}: the old process took {took:?}"
                );
            }
        }
        let expected = step.to_string();
        gw.wait_until("the step's config answers", || {
            generation(&gw).as_deref() == Some(expected.as_str())
        });
    }
    let slow_status = slow.map(|t| t.join().unwrap());
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    println!(
        "keepalive: {} answered, {} failed; new connection per request: {} answered, {} failed; slow request: {slow_status:?}",
        keepalive.ok(),
        keepalive.lost(),
        fresh.ok(),
        fresh.lost()
    );
    assert_eq!(slow_status, Some(200), "the slow request did not complete");
    assert_eq!(
        keepalive.lost() + fresh.lost(),
        0,
        "requests failed; log:\n{}",
        gw.log()
    );
    assert!(keepalive.ok() > 0 && fresh.ok() > 0);
}
