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
