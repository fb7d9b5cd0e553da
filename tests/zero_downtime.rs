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

/// Whether a process (not necessarily a child of this test) still runs;
/// a zombie nobody reaped yet counts as gone.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Stops the daemons a test started, whatever happens to the test: those
/// it saw, and the one its PID file names.
struct Daemons(Vec<u32>, std::path::PathBuf);

impl Drop for Daemons {
    fn drop(&mut self) {
        for pid in self.0.iter().chain(read_pid(&self.1).as_ref()) {
            // SAFETY: a plain kill(2) on a PID this test started.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

/// The unit's own commands, run as systemd runs them (no systemd is PID 1
/// here): `ExecStart` starts a daemon and returns once it serves
/// (`Type=forking`); then `systemctl reload` runs each `ExecReload` line in
/// order, with `$MAINPID` from the PID file. Under load, nothing may fail,
/// the PID file must name the new process, and the old one must exit.
#[test]
fn the_units_reload_commands_upgrade_a_daemon_under_load() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/tollgate.service"
    ))
    .expect("the unit");
    let commands = |key: &str| -> Vec<Vec<String>> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key))
            .map(|c| c.split_whitespace().map(str::to_owned).collect())
            .collect()
    };
    let start = commands("ExecStart=");
    let reload = commands("ExecReload=");
    assert_eq!(start.len(), 1, "one ExecStart");
    assert_eq!(reload.len(), 3, "validate, hand off, start the new process");

    let upstream = Scripted::start(|_, _, _, w| {
        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_ok()
    });
    let dir = support::scratch_dir("unit");
    let config = dir.join("tollgate.yaml");
    let pid_file = dir.join("tollgate.pid");
    let addr: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    std::fs::write(
        &config,
        format!(
            "server:\n  threads: 2\n  pid_file: {pid}\n  upgrade_sock: {dir}/upgrade.sock\n  error_log: {dir}/error.log\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\nlisten: [\"{addr}\"]\n{}",
            body(upstream.addr, 0),
            pid = pid_file.display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    let mut daemons = Daemons(Vec::new(), pid_file.clone());
    let run = |argv: &[String], mainpid: Option<u32>| {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| match a.as_str() {
                "/usr/local/bin/tollgate" => support::binary(),
                "/etc/tollgate/tollgate.yaml" => config.display().to_string(),
                "$MAINPID" => mainpid.expect("a main PID").to_string(),
                other => other.to_owned(),
            })
            .collect();
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("run a unit command");
        // systemd's TimeoutStartSec= is 90 s by default; a command that
        // blocks that long fails the start or reload.
        let started = Instant::now();
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Some(status);
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.is_some_and(|s| s.success()),
            "{argv:?}: {status:?} (None: still running after 30 s)"
        );
    };

    run(&start[0], None);
    let first = read_pid(&pid_file).expect("the daemon wrote its PID file");
    daemons.0.push(first);
    assert!(running(first));
    assert_eq!(
        request(addr, "GET", "h", "/", &[], b"").status,
        200,
        "ExecStart returned before the daemon served"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let keepalive = Arc::new(load::Tally::default());
    let fresh = Arc::new(load::Tally::default());
    let mut clients = load::start(addr, 4, true, &stop, &keepalive);
    clients.extend(load::start(addr, 2, false, &stop, &fresh));
    let flowing = Instant::now();
    while keepalive.ok() < 100 && flowing.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }

    // `systemctl reload`: a new binary would be installed first; the new
    // process reads the file as it starts.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("X-Config: \"0\"", "X-Config: \"1\""),
    )
    .unwrap();
    for command in &reload {
        run(command, Some(first));
    }
    let second = read_pid(&pid_file).expect("the PID file");
    daemons.0.push(second);
    assert_ne!(second, first, "the PID file names the new process");
    assert!(running(second));
    // Both processes accept on the shared sockets for a moment; once the
    // old one is gone, only the new one, with the new config, answers.
    let gone = Instant::now();
    while running(first) && gone.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!running(first), "the old process did not exit");
    for _ in 0..20 {
        assert_eq!(
            request(addr, "GET", "h", "/", &[], b"").header("x-config"),
            Some("1"),
            "the new process serves the new config"
        );
    }

    let after = keepalive.ok() + fresh.ok();
    let flowing = Instant::now();
    while keepalive.ok() + fresh.ok() < after + 100 && flowing.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    println!(
        "systemd reload: keepalive {} answered, {} failed; new connection per request {} answered, {} failed",
        keepalive.ok(),
        keepalive.lost(),
        fresh.ok(),
        fresh.lost()
    );
    assert_eq!(
        keepalive.lost() + fresh.lost(),
        0,
        "requests failed; log:\n{}",
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    );
    assert!(keepalive.ok() > 0 && fresh.ok() > 0);

    // `systemctl stop`: SIGTERM to the main process.
    // SAFETY: a plain kill(2) on the daemon this test started.
    unsafe {
        libc::kill(second as libc::pid_t, libc::SIGTERM);
    }
    let stopping = Instant::now();
    while running(second) && stopping.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!running(second), "SIGTERM did not stop the daemon");
}
