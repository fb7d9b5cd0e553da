//! The command line: `-t` validation, refusing to start on a bad file, and
//! the admin listener's endpoints.

mod support;

use support::upstream::Upstream;
use support::{check_config, Gateway};

#[test]
fn dash_t_accepts_a_valid_file() {
    let text = "listen: [\"127.0.0.1:18080\"]\nupstreams:\n  u: { targets: [\"127.0.0.1:9\"] }\nroutes:\n  - { name: r, path: /x, upstream: u }\n";
    let (code, stdout, _) = check_config(text);
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), "configuration OK");
}

#[test]
fn the_shipped_config_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tollgate.yaml"))
        .unwrap();
    let (code, stdout, stderr) = check_config(&text);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "configuration OK");
}

#[test]
fn dash_t_reports_every_error_with_its_location() {
    let text = r#"
server: { threads: 0, colour: blue }
listen: ["127.0.0.1:18080", "localhost"]
upstreams:
  users:
    targets: ["127.0.0.1:9001", { address: "127.0.0.1:9002", weight: 0 }]
    balance: round_robin
    timeouts: { connect: 10 }
  empty: { targets: [] }
  weird: { targets: ["127.0.0.1:1"], balance: fastest }
routes:
  - { name: a, path_prefix: /a, upstream: users }
  - { name: a, path_prefix: /b, upstream: users }
  - { name: c, path_prefix: /c, upstream: userz }
  - { name: d, path: /d, path_prefix: /d, upstream: users }
  - { name: e, path_prefix: /e, upstream: users, strip_prefx: true }
"#;
    let (code, stdout, stderr) = check_config(text);
    assert_eq!(code, 1, "{stdout}{stderr}");
    for expected in [
        "server.colour: unknown field",
        "listen[1]:",
        "upstreams.users.timeouts.connect: 10 has no unit",
        "upstreams.empty.targets: at least one target is required",
        "upstreams.weird.balance: unknown variant `fastest`",
        r#"routes[1].name: duplicate route name "a""#,
        r#"routes[2].upstream: no upstream named "userz""#,
        "routes[3]: set either path or path_prefix, not both",
        "routes[4].strip_prefx: unknown field",
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(expected)),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(!stdout.contains("configuration OK"));
}

#[test]
fn semantic_errors_are_all_reported_together() {
    let text = r#"
listen: ["127.0.0.1:18080"]
upstreams:
  users:
    targets: ["127.0.0.1:9001", { address: "127.0.0.1:9002", weight: 0 }, "127.0.0.1:9001"]
    hash_key: path
    health_check: { interval: 10ms, healthy_after: 0 }
routes:
  - { name: a, path_prefix: /a/../b, upstream: users }
  - { name: b, path: /x, upstream: users, hosts: ["bad host:80"], methods: [get] }
  - { name: c, path: /y, upstream: users, request_headers: { set: { "Bad Header": x } } }
"#;
    let (code, _, stderr) = check_config(text);
    assert_eq!(code, 1);
    for expected in [
        "upstreams.users.targets[1].weight: must be between 1 and 1000",
        "upstreams.users.targets[2]: duplicate target 127.0.0.1:9001",
        "upstreams.users.hash_key: only applies to balance: consistent_hash",
        "upstreams.users.health_check.interval: must be at least 100ms",
        "upstreams.users.health_check.healthy_after: must be at least 1",
        r#"routes[0].path_prefix: "/a/../b" is not in normal form; write it as "/b""#,
        "routes[1].hosts[0]:",
        "routes[1].methods[0]:",
        "routes[2].request_headers.set:",
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(expected)),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn dash_t_on_garbage_and_missing_files() {
    let (code, _, stderr) = check_config("listen: [unclosed");
    assert_eq!(code, 1);
    assert!(stderr.contains("invalid YAML"), "{stderr}");
    let (code, _, stderr) = check_config("");
    assert_eq!(code, 1);
    assert!(stderr.contains("empty"), "{stderr}");

    let out = std::process::Command::new(support::binary())
        .args(["-t", "-c", "/nonexistent/tollgate.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/tollgate.yaml"));
}

#[test]
fn the_gateway_refuses_to_start_on_an_invalid_file() {
    let dir = support::scratch_dir("refuse");
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "listen: [\"127.0.0.1:1\"]\nroutes:\n  - { name: r, path: /, upstream: missing }\n",
    )
    .unwrap();
    let out = std::process::Command::new(support::binary())
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains(r#"routes[0].upstream: no upstream named "missing""#));
}

#[test]
fn admin_endpoints() {
    let up = Upstream::start("u");
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: u }}\n",
        up.addr
    ));
    let health = gw.admin_get("/healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    let ready = gw.admin_get("/readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
    let config = gw.admin_get("/config").json();
    assert_eq!(config["generation"], 1);
    assert_eq!(config["file"], gw.config_path.display().to_string());
    assert_eq!(gw.admin_get("/nope").status, 404);
    assert_eq!(
        support::request(gw.admin, "POST", "a", "/healthz", &[], b"").status,
        405
    );
}

#[test]
fn duplicate_upstream_names_are_rejected() {
    let text = "listen: [\"127.0.0.1:1\"]\nupstreams:\n  a: { targets: [\"127.0.0.1:2\"] }\n  a: { targets: [\"127.0.0.1:3\"] }\n";
    let (code, _, stderr) = check_config(text);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(r#"duplicate entry with key "a""#),
        "{stderr}"
    );
}

#[test]
fn a_route_conflicting_on_its_second_host_is_an_error_not_a_crash() {
    let text = "listen: [\"127.0.0.1:1\"]\nupstreams:\n  u: { targets: [\"127.0.0.1:2\"] }\nroutes:\n  - { name: a, hosts: [x.test], path: /p, upstream: u }\n  - { name: b, hosts: [y.test, x.test], path: /p, upstream: u }\n  - { name: c, hosts: [y.test], path: /p, upstream: u }\n";
    let (code, _, stderr) = check_config(text);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(r#"routes[1]: takes the same host, path and method as route "a""#),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_deeply_nested_file_is_refused_before_parsing() {
    let text = format!("listen: {}\n", "[".repeat(200_000));
    let (code, _, stderr) = check_config(&text);
    assert_eq!(code, 1);
    assert!(stderr.contains("nests deeper than 64 levels"), "{stderr}");
}

#[test]
fn sighup_at_start_does_not_kill_the_gateway() {
    // The earliest a signal can come is right after the process exists,
    // before the reload service is up; it must not be fatal.
    let dir = support::scratch_dir("early-hup");
    let path = dir.join("tollgate.yaml");
    let addr = format!("127.0.0.1:{}", support::free_port());
    // Many routes: compiling them keeps the process a while in the window
    // between its start and the reload handler, where the signals go.
    let routes: String = (0..5000)
        .map(|i| format!("  - {{ name: r{i}, path: /r{i}, upstream: u }}\n"))
        .collect();
    std::fs::write(
        &path,
        format!(
            "server: {{ threads: 1, pid_file: {d}/pid, upgrade_sock: {d}/sock, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 1 }}\nlisten: [\"{addr}\"]\nupstreams:\n  u: {{ targets: [\"127.0.0.1:2\"] }}\nroutes:\n{routes}",
            d = dir.display()
        ),
    )
    .unwrap();
    /// Stops the process however the test ends, a failed assertion too.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        std::process::Command::new(support::binary())
            .arg("-c")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let pid = child.id().to_string();
    // A signal before `main` runs cannot be helped. Wait until the process
    // ignores SIGHUP (bit 0 of SigIgn), which it must do from its first
    // line, long before the reload handler exists; then signal it while
    // it is still loading its config.
    let hup_set_aside = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & 1 == 1)
    };
    let deadline = std::time::Instant::now() + support::WAIT;
    while !hup_set_aside() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP is never set aside"
        );
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        std::thread::yield_now();
    }
    for _ in 0..20 {
        let _ = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let deadline = std::time::Instant::now() + support::WAIT;
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the gateway died of an early SIGHUP"
        );
        assert!(std::time::Instant::now() < deadline, "never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none());
}

#[test]
fn readiness_depends_only_on_the_upstreams_it_names() {
    let live = Upstream::start("live");
    let dead = support::DeadPort::new();
    let body = |requires: &str| {
        format!(
            "upstreams:\n  live: {{ targets: [\"{}\"], health_check: {{ interval: 100ms, unhealthy_after: 1 }} }}\n  dead: {{ targets: [\"{}\"], health_check: {{ interval: 100ms, unhealthy_after: 1 }} }}\nroutes:\n  - {{ name: r, path_prefix: /, upstream: live }}\n{requires}",
            live.addr, dead.addr
        )
    };
    // The harness writes `admin:` as an address; a mapping replaces it.
    let gw = Gateway::start(&body(""));
    gw.wait_until("the dead upstream is seen as dead", || {
        let v = gw.admin_get("/upstreams").json();
        v["upstreams"]["dead"]["targets"][0]["healthy"] == false
    });
    // One dead upstream does not take the node out of rotation.
    assert_eq!(gw.admin_get("/readyz").status, 200);
    let up = gw.admin_get("/upstreams").json();
    assert_eq!(up["upstreams"]["live"]["targets"][0]["healthy"], true);
    assert_eq!(up["upstreams"]["live"]["healthy_targets"], 1);
    assert_eq!(up["upstreams"]["dead"]["healthy_targets"], 0);

    let admin = gw.admin;
    let status = gw.reload_with(&format!(
        "{}admin: {{ address: \"{admin}\", readyz_requires: [dead] }}\n",
        body("")
    ));
    assert_eq!(
        status["last_reload_error"],
        serde_json::Value::Null,
        "{status}"
    );
    let ready = gw.admin_get("/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["upstreams_without_healthy_target"][0], "dead");

    let (code, _, stderr) = check_config(
        "listen: [\"127.0.0.1:1\"]\nadmin: { address: \"127.0.0.1:2\", readyz_requires: [nope] }\n",
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("admin.readyz_requires[0]: no upstream named \"nope\""),
        "{stderr}"
    );
}

#[test]
fn admin_answers_carry_a_length_and_head_works() {
    let gw = Gateway::start("");
    let mut conn = support::Connection::open(gw.admin);
    conn.send("GET", "admin", "/healthz", &[], b"");
    let resp = conn.read_response();
    assert_eq!(
        resp.header("content-length"),
        Some(resp.body.len().to_string().as_str())
    );
    conn.send("HEAD", "admin", "/healthz", &[], b"");
    let head = conn.read_response_head();
    assert!(head.start_line.contains(" 200 "));
    assert_eq!(
        head.header("content-length"),
        Some(resp.body.len().to_string().as_str())
    );
    // The connection is still in step: no body followed the HEAD answer.
    conn.send("GET", "admin", "/config", &[], b"");
    assert_eq!(conn.read_response().status, 200);
    let resp = support::request(gw.admin, "POST", "a", "/healthz", &[], b"");
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("GET, HEAD"));
}

#[test]
fn the_systemd_unit_verifies() {
    // The unit names the installed binary; verify a copy naming this one.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/tollgate.service"
    ))
    .expect("systemd/tollgate.service");
    let dir = support::scratch_dir("unit");
    let copy = dir.join("tollgate.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/tollgate", &support::binary()),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze (scripts/install-deps.sh installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values too, with a warning:
    // any output is a defect.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
    for directive in [
        "Type=forking",
        "ExecReload=/bin/kill -QUIT $MAINPID",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RuntimeDirectory=tollgate",
    ] {
        assert!(unit.contains(directive), "{directive} missing");
    }
}
