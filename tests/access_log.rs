//! The access log over real traffic: JSON lines with the documented
//! fields, refusals before routing, reopening on SIGUSR1, and a stalled
//! sink that drops lines instead of holding requests.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use support::upstream::Upstream;
use support::{request, scratch_dir, send_raw, Gateway};
use tollgate::auth::api_key::digest_of;

fn config(up: &Upstream, log: &Path, extra: &str) -> String {
    format!(
        "access_log: {{ path: \"{}\"{extra} }}\nauth:\n  api_keys: {{ header: X-API-Key }}\nconsumers:\n  alice: {{ api_keys: [\"{}\"] }}\nupstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: keyed, path_prefix: /keyed, upstream: app, auth: [api_key], rate_limit: {{ rate: 1/m, burst: 1 }} }}\n  - {{ name: open, path_prefix: /open, upstream: app }}\n",
        log.display(),
        digest_of("alice-key"),
        up.addr
    )
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn log_path(tag: &str) -> PathBuf {
    scratch_dir(tag).join("access.log")
}

#[test]
fn every_request_is_one_json_line_with_its_facts() {
    let up = Upstream::start("a");
    let log = log_path("access");
    let gw = Gateway::start(&config(&up, &log, ""));
    assert_eq!(gw.get("h", "/open/x?secret=1").status, 200);
    let key = [("X-API-Key", "alice-key")];
    assert_eq!(
        request(gw.addr, "POST", "h", "/keyed/y", &key, b"abc").status,
        200
    );
    assert_eq!(
        request(gw.addr, "GET", "h", "/keyed/y", &key, b"").status,
        429
    );
    assert_eq!(gw.get("h", "/keyed/z").status, 401);
    assert_eq!(gw.get("h", "/nowhere").status, 404);
    // Refused before routing: a malformed head.
    assert_eq!(
        send_raw(gw.addr, b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").status,
        400
    );
    gw.wait_until("six lines", || lines(&log).len() >= 6);
    let all = lines(&log);
    assert_eq!(all.len(), 6);

    // Lines come in the order requests finished, which two worker threads
    // may swap: each is found by what it was.
    let find = |status: u64, method: &str| {
        all.iter()
            .find(|l| l["status"] == status && (method.is_empty() || l["method"] == method))
            .unwrap_or_else(|| panic!("no line with status {status} in {all:?}"))
    };
    let ok = all
        .iter()
        .find(|l| l["path"] == "/open/x")
        .expect("the /open line");
    for field in [
        "ts",
        "request_id",
        "client_ip",
        "method",
        "host",
        "path",
        "status",
        "route",
        "upstream",
        "upstream_addr",
        "latency_ms",
        "upstream_latency_ms",
        "bytes_in",
        "bytes_out",
    ] {
        assert!(ok.get(field).is_some(), "{field} missing in {ok}");
    }
    assert_eq!(ok["path"], "/open/x", "the query is not logged");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["route"], "open");
    assert_eq!(ok["upstream"], "app");
    assert_eq!(ok["upstream_addr"], up.addr.to_string());
    assert_eq!(ok["client_ip"], "127.0.0.1");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["host"], "h");
    assert!(ok["ts"].as_str().unwrap().ends_with('Z'));
    assert!(ok["latency_ms"].as_f64().unwrap() >= ok["upstream_latency_ms"].as_f64().unwrap());
    assert!(ok.get("error").is_none() && ok.get("consumer").is_none());

    let posted = find(200, "POST");
    assert_eq!(posted["consumer"], "alice");
    assert_eq!(posted["bytes_in"], 3);
    assert_eq!(find(429, "")["error"], "rate_limited");
    assert_eq!(find(401, "")["error"], "unauthorized");
    let unrouted = find(404, "");
    assert_eq!(unrouted["error"], "no_route");
    assert_eq!(unrouted["route"], "");
    let refused = find(400, "");
    assert_eq!(refused["error"], "bad_request");
    assert_eq!(refused["route"], "");
    // Every line has its own request id, echoed to the client too.
    let ids: std::collections::HashSet<&str> = all
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 6);
}

#[test]
fn sigusr1_reopens_the_file() {
    let up = Upstream::start("a");
    let log = log_path("rotate");
    let gw = Gateway::start(&config(&up, &log, ""));
    gw.get("h", "/open/1");
    gw.wait_until("the first line", || lines(&log).len() == 1);
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    gw.signal("USR1");
    gw.wait_until("a new file", || {
        gw.get("h", "/open/2");
        !lines(&log).is_empty()
    });
    assert_eq!(lines(&rotated).len(), 1);
    assert_eq!(lines(&log)[0]["path"], "/open/2");
}

#[test]
fn lines_still_waiting_are_written_when_the_process_exits() {
    let up = Upstream::start("a");
    let log = log_path("exit");
    let mut gw = Gateway::start(&config(&up, &log, ""));
    {
        let mut conn = support::Connection::open(gw.addr);
        for i in 0..300 {
            conn.send("GET", "h", &format!("/open/{i}"), &[], b"");
            assert_eq!(conn.read_response().status, 200, "request {i}");
        }
    }
    // At once: the writer wakes every 20 ms, so the last lines are still
    // waiting in memory when the process starts to stop.
    gw.signal("TERM");
    assert!(gw.exited_within(std::time::Duration::from_secs(10)), "exit");
    let all = lines(&log);
    assert_eq!(all.len(), 300, "one line per request, none lost at exit");
    for i in 0..300 {
        let path = format!("/open/{i}");
        assert!(all.iter().any(|l| l["path"] == path.as_str()), "{path}");
    }
}

/// A pipe with a reader that never reads, and that reader: once the pipe
/// is full, the writer blocks for good.
fn stalled_pipe(tag: &str) -> (PathBuf, std::fs::File) {
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = scratch_dir(tag).join("access.pipe");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a plain mkfifo on a path this test owns.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    (fifo, reader)
}

#[test]
fn a_stalled_sink_drops_lines_instead_of_holding_requests() {
    let up = Upstream::start("a");
    let (fifo, _reader) = stalled_pipe("fifo");
    let gw = Gateway::start(&config(&up, &fifo, ", queue_lines: 50"));
    let mut conn = support::Connection::open(gw.addr);
    for i in 0..1500 {
        conn.send("GET", "h", &format!("/open/{i}"), &[], b"");
        assert_eq!(conn.read_response().status, 200, "request {i}");
    }
    let dropped = gw.admin_get("/config").json()["access_log_dropped"]
        .as_u64()
        .unwrap();
    println!("1500 requests, {dropped} lines dropped");
    assert!(
        dropped > 0,
        "nothing was dropped: the requests must have waited"
    );
}

#[test]
fn a_stalled_sink_holds_at_most_queue_bytes_of_long_lines() {
    const REQUESTS: usize = 400;
    const LINE: usize = 8_200;
    let up = Upstream::start("a");
    let (fifo, _reader) = stalled_pipe("fifo-bytes");
    // Far fewer lines than queue_lines (65,536) fit in 1 MiB.
    let gw = Gateway::start(&config(&up, &fifo, ", queue_bytes: 1MiB"));
    let long = "a".repeat(7_900);
    let mut conn = support::Connection::open(gw.addr);
    for i in 0..REQUESTS {
        conn.send("GET", "h", &format!("/open/{i}/{long}"), &[], b"");
        assert_eq!(conn.read_response().status, 200, "request {i}");
    }
    // A line is logged after its response: wait for the last one.
    let dropped = || {
        gw.admin_get("/config").json()["access_log_dropped"]
            .as_u64()
            .unwrap() as usize
    };
    // Lines of ~8.2 KB: 1 MiB holds ~128 of them, the pipe ~8 more.
    let kept = (1 << 20) / LINE + (64 << 10) / LINE;
    gw.wait_until("the lines past 1 MiB to be dropped", || {
        dropped() + kept + 4 >= REQUESTS
    });
    let dropped = dropped();
    println!("{REQUESTS} lines of ~{LINE} bytes, {dropped} dropped");
    assert!(dropped < REQUESTS, "every line was dropped");
}

#[test]
fn a_fifo_nobody_reads_is_an_error_not_a_hang() {
    let dir = scratch_dir("fifo");
    let fifo = dir.join("access.fifo");
    let c_path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo on a path this test owns.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let config = dir.join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: [\"127.0.0.1:1\"]\naccess_log: {{ path: \"{}\" }}\nupstreams:\n  app: {{ targets: [\"127.0.0.1:2\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: app }}\n",
            fifo.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(support::binary())
        .args(["-t", "-c"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + support::WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let status = status.expect("tollgate -t hung opening a FIFO with no reader");
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("a FIFO with no reader"), "{stderr}");
}
