//! TLS termination against the real binary: certificates minted here (a
//! test CA, leaf certificates for two names, an expired one), SNI
//! selection, 421 for misdirected hosts, HTTP/2 by ALPN and h2c through
//! curl, the HTTPS redirect, certificate reloads, idle TLS connections,
//! and `-t` refusing bad certificates.

mod support;

use openssl::ssl::{SslConnector, SslMethod, SslStream, SslVerifyMode};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;
use support::http::{read_body, read_head, Head};
use support::pki::*;
use support::upstream::Upstream;
use support::{free_port, scratch_dir, Gateway};

/// A TLS connection with SNI `sni` (none when empty), verifying against
/// the test CA but not the host name (the tests look at what was served).
fn connect(addr: SocketAddr, pki: &Pki, sni: &str) -> SslStream<TcpStream> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_ca_file(pki.dir.join("ca.pem")).unwrap();
    b.set_alpn_protos(b"\x08http/1.1").unwrap();
    let connector = b.build();
    let mut config = connector.configure().unwrap();
    config.set_verify_hostname(false);
    config.set_use_server_name_indication(!sni.is_empty());
    config.set_verify(SslVerifyMode::PEER);
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    config
        .connect(if sni.is_empty() { "ignored" } else { sni }, tcp)
        .unwrap()
}

/// The DNS names of the certificate a connection was given.
fn served_names(s: &SslStream<TcpStream>) -> Vec<String> {
    let cert = s.ssl().peer_certificate().unwrap();
    cert.subject_alt_names()
        .unwrap()
        .iter()
        .filter_map(|n| n.dnsname().map(str::to_owned))
        .collect()
}

fn get(s: &mut BufReader<SslStream<TcpStream>>, host: &str, path: &str) -> (Head, Vec<u8>) {
    write!(s.get_mut(), "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    s.get_mut().flush().unwrap();
    let head = read_head(s).unwrap().expect("a response");
    let body = read_body(s, &head, true).unwrap();
    (head, body)
}

fn status(head: &Head) -> u16 {
    head.start_line.split(' ').nth(1).unwrap().parse().unwrap()
}

fn tls_listener(addr: SocketAddr, pki: &Pki, extra: &str) -> String {
    format!(
        "  - address: \"{addr}\"\n    tls:\n      certificates:\n        - {{ cert: \"{}\", key: \"{}\" }}\n        - {{ cert: \"{}\", key: \"{}\" }}\n{extra}",
        pki.path("api.pem"),
        pki.path("api.key"),
        pki.path("shop.pem"),
        pki.path("shop.key"),
    )
}

fn body(up: &Upstream, route_extra: &str) -> String {
    format!(
        "upstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app{route_extra} }}\n",
        up.addr
    )
}

struct Setup {
    pki: Pki,
    gw: Gateway,
    tls: SocketAddr,
    _up: Upstream,
}

fn start(server_extra: &str, listener_extra: &str, route_extra: &str, more_listen: &str) -> Setup {
    let pki = Pki::new();
    pki.issue("api", &["api.test"], (-1, 90), 10);
    pki.issue("shop", &["*.shop.test", "shop.test"], (-1, 90), 11);
    let up = Upstream::start("a");
    let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = format!("{}{more_listen}", tls_listener(tls, &pki, listener_extra));
    let gw = Gateway::start_with_listeners(&[], server_extra, &listen, &body(&up, route_extra));
    Setup {
        pki,
        gw,
        tls,
        _up: up,
    }
}

#[test]
fn sni_chooses_the_certificate_and_an_unknown_name_gets_the_first() {
    let s = start("", "", "", "");
    for (sni, expected) in [
        ("api.test", vec!["api.test"]),
        ("www.shop.test", vec!["*.shop.test", "shop.test"]),
        ("shop.test", vec!["*.shop.test", "shop.test"]),
        ("unknown.test", vec!["api.test"]),
        ("", vec!["api.test"]),
    ] {
        let conn = connect(s.tls, &s.pki, sni);
        assert_eq!(served_names(&conn), expected, "SNI {sni:?}");
        let mut conn = BufReader::new(conn);
        let host = if sni.is_empty() { "127.0.0.1" } else { sni };
        let (head, body) = get(&mut conn, host, "/x");
        assert_eq!(status(&head), 200, "SNI {sni:?}");
        let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo["upstream"], "a");
        let proto = echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == "x-forwarded-proto")
            .map(|h| h[1].clone());
        assert_eq!(proto, Some(serde_json::json!("https")));
        // Keepalive over TLS: a second request on the same connection.
        let (head, _) = get(&mut conn, host, "/y");
        assert_eq!(status(&head), 200);
    }
}

#[test]
fn a_host_the_certificate_does_not_cover_gets_421() {
    let s = start("", "", "", "");
    let mut conn = BufReader::new(connect(s.tls, &s.pki, "api.test"));
    let (head, body) = get(&mut conn, "www.shop.test", "/x");
    assert_eq!(status(&head), 421);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "misdirected_request");
    // The connection's own name, and a name its certificate covers, route.
    let mut conn = BufReader::new(connect(s.tls, &s.pki, "www.shop.test"));
    assert_eq!(status(&get(&mut conn, "www.shop.test", "/x").0), 200);
    assert_eq!(status(&get(&mut conn, "shop.test:443", "/x").0), 200);
    assert_eq!(status(&get(&mut conn, "api.test", "/x").0), 421);
}

fn curl(args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ])
        .args(args)
        .output()
        .expect("curl (scripts/install-deps.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut parts = text.split(' ');
    (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    )
}

#[test]
fn http2_by_alpn_and_http1_share_the_listener_and_h2c_is_per_listener() {
    let h2c: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let s = start(
        "",
        "",
        "",
        &format!("  - {{ address: \"{h2c}\", h2c: true }}\n"),
    );
    let ca = s.pki.path("ca.pem");
    let resolve = format!("api.test:{}:127.0.0.1", s.tls.port());
    let url = format!("https://api.test:{}/x", s.tls.port());
    assert_eq!(
        curl(&["--cacert", &ca, "--resolve", &resolve, "--http2", &url]),
        ("200".into(), "2".into())
    );
    assert_eq!(
        curl(&["--cacert", &ca, "--resolve", &resolve, "--http1.1", &url]),
        ("200".into(), "1.1".into())
    );
    // A 421 over HTTP/2 too (curl reuses nothing across runs).
    let shop = format!("https://api.test:{}/x", s.tls.port());
    assert_eq!(
        curl(&[
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "--http2",
            "-H",
            "Host: www.shop.test",
            &shop
        ])
        .0,
        "421"
    );
    // h2c by prior knowledge where the listener allows it; HTTP/1 there too.
    let plain = format!("http://{h2c}/x");
    assert_eq!(
        curl(&["--http2-prior-knowledge", &plain]),
        ("200".into(), "2".into())
    );
    assert_eq!(curl(&[&plain]), ("200".into(), "1.1".into()));
    // A request shorter than the preface is answered at once, not after
    // waiting for 24 bytes.
    let started = std::time::Instant::now();
    let resp = support::send_raw(h2c, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(resp.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the short request waited"
    );
    // The harness's plain listener has no h2c: the preface is no request.
    let other = format!("http://{}/x", s.gw.addr);
    assert_ne!(curl(&["--http2-prior-knowledge", &other]).1, "2");
}

#[test]
fn https_redirect_sends_plain_requests_to_the_tls_listener() {
    let s = start("", "", ", https_redirect: true", "");
    // Without a host to redirect to, refused rather than served in clear.
    let resp = support::send_raw(s.gw.addr, b"GET /a HTTP/1.0\r\n\r\n");
    assert_eq!(resp.assert_gateway_error(400), "bad_request");
    let resp = support::request(s.gw.addr, "POST", "api.test:8080", "/a/b?c=1", &[], b"x");
    assert_eq!(resp.status, 308);
    assert_eq!(
        resp.header("location"),
        Some(format!("https://api.test:{}/a/b?c=1", s.tls.port()).as_str())
    );
    // Over TLS the route is served.
    let mut conn = BufReader::new(connect(s.tls, &s.pki, "api.test"));
    assert_eq!(status(&get(&mut conn, "api.test", "/a").0), 200);
}

#[test]
fn a_reload_serves_new_certificates_to_new_connections_only() {
    let s = start("", "", "", "");
    let mut old = BufReader::new(connect(s.tls, &s.pki, "api.test"));
    assert_eq!(status(&get(&mut old, "api.test", "/x").0), 200);
    let serial = |c: &SslStream<TcpStream>| {
        c.ssl()
            .peer_certificate()
            .unwrap()
            .serial_number()
            .to_bn()
            .unwrap()
            .to_string()
    };
    assert_eq!(serial(old.get_ref()), "10");
    // A renewed certificate in the same files.
    s.pki.issue("api", &["api.test"], (-1, 180), 20);
    let status_after = s.gw.reload_with(&body(&s._up, ""));
    assert!(
        status_after["last_reload_error"].is_null(),
        "{status_after}"
    );
    let fresh = connect(s.tls, &s.pki, "api.test");
    assert_eq!(serial(&fresh), "20");
    // The established connection goes on with its certificate.
    assert_eq!(status(&get(&mut old, "api.test", "/x").0), 200);
    assert_eq!(serial(old.get_ref()), "10");
}

#[test]
fn an_idle_tls_connection_is_closed_after_the_keepalive_timeout() {
    let s = start("keepalive_timeout_seconds: 1", "", "", "");
    let mut conn = BufReader::new(connect(s.tls, &s.pki, "api.test"));
    assert_eq!(status(&get(&mut conn, "api.test", "/x").0), 200);
    std::thread::sleep(Duration::from_millis(2500));
    let mut buf = [0u8; 1];
    let read = std::io::Read::read(conn.get_mut(), &mut buf);
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "the idle connection is still open: {read:?}"
    );
}

fn check(pki: &Pki, cert: &str, key: &str) -> (i32, String) {
    let text = format!(
        "listen:\n  - address: \"127.0.0.1:{}\"\n    tls:\n      certificates:\n        - {{ cert: \"{}\", key: \"{}\" }}\nupstreams:\n  app: {{ targets: [\"127.0.0.1:1\"] }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n",
        free_port(),
        pki.path(cert),
        pki.path(key)
    );
    let (code, stdout, stderr) = support::check_config(&text);
    (code, format!("{stdout}{stderr}"))
}

#[test]
fn the_config_check_refuses_bad_certificates() {
    let pki = Pki::new();
    pki.issue("good", &["api.test"], (-1, 90), 1);
    pki.issue("expired", &["api.test"], (-30, -1), 2);
    pki.issue("future", &["api.test"], (5, 90), 3);
    pki.issue("soon", &["api.test"], (-1, 3), 4);
    pki.issue("other", &["other.test"], (-1, 90), 5);
    std::fs::write(pki.dir.join("garbage.pem"), "not a certificate").unwrap();

    let (code, out) = check(&pki, "good.pem", "good.key");
    assert_eq!(code, 0, "{out}");
    let (code, out) = check(&pki, "expired.pem", "expired.key");
    assert_ne!(code, 0);
    assert!(out.contains("expired on"), "{out}");
    let (code, out) = check(&pki, "future.pem", "future.key");
    assert_ne!(code, 0);
    assert!(out.contains("not valid before"), "{out}");
    let (code, out) = check(&pki, "good.pem", "other.key");
    assert_ne!(code, 0);
    assert!(out.contains("is not the key of"), "{out}");
    let (code, out) = check(&pki, "garbage.pem", "good.key");
    assert_ne!(code, 0);
    assert!(out.contains("holds no certificate"), "{out}");
    let (code, out) = check(&pki, "missing.pem", "good.key");
    assert_ne!(code, 0);
    assert!(out.contains("cannot read"), "{out}");
    // Within 14 days of expiry: valid, with a warning.
    let (code, out) = check(&pki, "soon.pem", "soon.key");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("expires on"), "{out}");
}

fn upstream_header(body: &[u8], name: &str) -> Option<String> {
    let echo: serde_json::Value = serde_json::from_slice(body).ok()?;
    echo["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str().map(str::to_owned))
}

/// Gateway A speaks to gateway B (TLS with HTTP/2 and HTTP/1.1 by ALPN; a
/// TLS listener with HTTP/1.1 only; h2c), which forwards to a plain
/// upstream.
#[test]
fn upstreams_over_tls_and_http2_verify_their_certificates() {
    let pki = Pki::new();
    pki.issue("internal", &["internal.test"], (-1, 90), 30);
    let other = Pki::new();
    let up = Upstream::start("a");
    let port = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (both, h1_only, h2c) = (port(), port(), port());
    let cert = format!(
        "{{ cert: \"{}\", key: \"{}\" }}",
        pki.path("internal.pem"),
        pki.path("internal.key")
    );
    let b_listen = format!(
        "  - {{ address: \"{both}\", tls: {{ certificates: [{cert}] }} }}\n  - {{ address: \"{h1_only}\", tls: {{ certificates: [{cert}], alpn: [http/1.1] }} }}\n  - {{ address: \"{h2c}\", h2c: true }}\n"
    );
    let b_log = scratch_dir("b-log").join("access.log");
    let _b = Gateway::start_with_listeners(
        &[],
        "",
        &b_listen,
        &format!(
            "access_log: {{ path: \"{}\" }}\n{}",
            b_log.display(),
            body(&up, "")
        ),
    );
    let ca = pki.path("ca.pem");
    let wrong_ca = other.path("ca.pem");
    let a_body = format!(
        "upstreams:
  h2: {{ targets: [\"{both}\"], protocol: h2, tls: {{ sni: internal.test, ca_file: \"{ca}\" }} }}
  h1tls: {{ targets: [\"{both}\"], tls: {{ sni: internal.test, ca_file: \"{ca}\" }} }}
  h2_to_h1_only: {{ targets: [\"{h1_only}\"], protocol: h2, tls: {{ sni: internal.test, ca_file: \"{ca}\" }} }}
  wrong_ca: {{ targets: [\"{both}\"], tls: {{ sni: internal.test, ca_file: \"{wrong_ca}\" }} }}
  wrong_name: {{ targets: [\"{both}\"], tls: {{ sni: other.test, ca_file: \"{ca}\" }} }}
  no_verify: {{ targets: [\"{both}\"], tls: {{ sni: internal.test, verify: false }} }}
  h2c: {{ targets: [\"{h2c}\"], protocol: h2c }}
routes:
  - {{ name: h2, path_prefix: /h2/, upstream: h2 }}
  - {{ name: h1tls, path_prefix: /h1tls/, upstream: h1tls }}
  - {{ name: h2_to_h1_only, path_prefix: /h2_to_h1_only/, upstream: h2_to_h1_only }}
  - {{ name: wrong_ca, path_prefix: /wrong_ca/, upstream: wrong_ca }}
  - {{ name: wrong_name, path_prefix: /wrong_name/, upstream: wrong_name }}
  - {{ name: no_verify, path_prefix: /no_verify/, upstream: no_verify }}
  - {{ name: h2c, path_prefix: /h2c/, upstream: h2c }}
"
    );
    let a = Gateway::start(&a_body);
    for (path, status, proto) in [
        ("/h2/x", 200, Some("https")),
        ("/h1tls/x", 200, Some("https")),
        // An upstream that takes no HTTP/2 by ALPN gets HTTP/1.1 (TLS's
        // rule: no protocol negotiated is HTTP/1.1).
        ("/h2_to_h1_only/x", 200, Some("https")),
        ("/wrong_ca/x", 502, None),
        ("/wrong_name/x", 502, None),
        ("/no_verify/x", 200, Some("https")),
        ("/h2c/x", 200, Some("http")),
    ] {
        // B routes the client's Host, which its certificate must cover.
        let resp = a.get("internal.test", path);
        assert_eq!(
            resp.status,
            status,
            "{path}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        if let Some(proto) = proto {
            // B saw the request come over TLS (or not) and said so.
            assert_eq!(
                upstream_header(&resp.body, "x-forwarded-proto").as_deref(),
                Some(proto),
                "{path}"
            );
        }
    }
    // How each request reached B, by B's access log.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..100 {
        seen = std::fs::read_to_string(&b_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                (
                    v["path"].as_str().unwrap_or("").to_owned(),
                    v["protocol"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        if seen.len() >= 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (path, protocol) in [
        ("/h2/x", "HTTP/2"),
        ("/h1tls/x", "HTTP/1.1"),
        ("/h2_to_h1_only/x", "HTTP/1.1"),
        ("/no_verify/x", "HTTP/1.1"),
        ("/h2c/x", "HTTP/2"),
    ] {
        assert_eq!(
            seen.get(path).map(String::as_str),
            Some(protocol),
            "{path}: {seen:?}"
        );
    }
}

#[test]
fn the_config_check_refuses_inconsistent_upstream_tls() {
    let pki = Pki::new();
    let cases = [
        (
            "protocol: h2c, tls: { sni: a.test }",
            "h2c is HTTP/2 without TLS",
        ),
        ("protocol: h3", "is not h1, h2 or h2c"),
        ("tls: {}", "needs the name to verify"),
        ("tls: { sni: \"\" }", "needs the name to verify"),
        (
            "tls: { verify: false }, health_check: { interval: 1s }",
            "needs an HTTP health check",
        ),
        ("protocol: h2", "needs the name to verify"),
        (
            &*format!(
                "tls: {{ sni: a.test, ca_file: \"{}\" }}",
                pki.path("missing.pem")
            ),
            "cannot read",
        ),
        ("tls: { sni: a.test, client_cert: c.pem }", "go together"),
    ];
    for (upstream, expected) in cases {
        let text = format!(
            "listen: [\"127.0.0.1:{}\"]\nupstreams:\n  app: {{ targets: [\"127.0.0.1:1\"], {upstream} }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n",
            free_port()
        );
        let (code, stdout, stderr) = support::check_config(&text);
        assert_ne!(code, 0, "{upstream}");
        assert!(
            format!("{stdout}{stderr}").contains(expected),
            "{upstream}: {stdout}{stderr}"
        );
    }
    // Verification by a target's host name needs no sni.
    let text = format!(
        "listen: [\"127.0.0.1:{}\"]\nupstreams:\n  app: {{ targets: [\"localhost:1\"], protocol: h2 }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n",
        free_port()
    );
    let (code, stdout, stderr) = support::check_config(&text);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn a_websocket_tunnel_works_over_tls() {
    use std::io::Read;
    let ws = support::upstream::Scripted::websocket_echo();
    let pki = Pki::new();
    pki.issue("api", &["api.test"], (-1, 90), 10);
    pki.issue("shop", &["*.shop.test", "shop.test"], (-1, 90), 11);
    let tls: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _gw = Gateway::start_with_listeners(
        &[],
        "",
        &tls_listener(tls, &pki, ""),
        &format!(
            "upstreams:\n  ws: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: ws, path_prefix: /, upstream: ws, websocket: true }}\n",
            ws.addr
        ),
    );
    let mut conn = BufReader::new(connect(tls, &pki, "api.test"));
    write!(
        conn.get_mut(),
        "GET /ws HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut conn).unwrap().expect("a response");
    assert_eq!(status(&head), 101);
    for message in [&b"first"[..], b"second message"] {
        conn.get_mut().write_all(message).unwrap();
        let mut echo = vec![0u8; message.len()];
        conn.read_exact(&mut echo).unwrap();
        assert_eq!(echo, message);
    }
}

#[test]
fn health_checks_speak_tls_with_the_upstreams_settings() {
    let pki = Pki::new();
    pki.issue("internal", &["internal.test"], (-1, 90), 40);
    let other = Pki::new();
    let up = Upstream::start("a");
    let b_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let b_listen = format!(
        "  - {{ address: \"{b_addr}\", tls: {{ certificates: [{{ cert: \"{}\", key: \"{}\" }}] }} }}\n",
        pki.path("internal.pem"),
        pki.path("internal.key")
    );
    let _b = Gateway::start_with_listeners(&[], "", &b_listen, &body(&up, ""));
    let check = "health_check: { http_path: /health, interval: 100ms, healthy_after: 1, unhealthy_after: 1 }";
    let a = Gateway::start(&format!(
        "upstreams:\n  good: {{ targets: [\"{b_addr}\"], tls: {{ sni: internal.test, ca_file: \"{}\" }}, {check} }}\n  bad: {{ targets: [\"{b_addr}\"], tls: {{ sni: internal.test, ca_file: \"{}\" }}, {check} }}\nroutes:\n  - {{ name: good, path_prefix: /good, upstream: good }}\n  - {{ name: bad, path_prefix: /bad, upstream: bad }}\n",
        pki.path("ca.pem"),
        other.path("ca.pem")
    ));
    a.wait_until("the checks have run", || {
        let u = a.admin_get("/upstreams").json();
        u["upstreams"]["good"]["healthy_targets"] == 1
            && u["upstreams"]["bad"]["healthy_targets"] == 0
    });
    // The check reached B's upstream through TLS, with the certificate's name.
    a.wait_until("B's upstream saw a check", || up.hits() > 0);
    assert_eq!(a.get("internal.test", "/good/x").status, 200);
    assert_eq!(
        a.get("internal.test", "/bad/x").assert_gateway_error(502),
        "upstream_unavailable"
    );
}

/// Kills a helper process when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_upstream_that_asks_for_a_client_certificate_gets_the_configured_one() {
    let pki = Pki::new();
    pki.issue("server", &["internal.test"], (-1, 90), 50);
    pki.issue("client", &["gateway.test"], (-1, 90), 51);
    let port = free_port();
    // OpenSSL's test server: requires a client certificate signed by the
    // CA, and answers any request with a page describing the session.
    let server = Killed(
        Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-naccept",
                "10",
            ])
            .args([
                "-cert",
                &pki.path("server.pem"),
                "-key",
                &pki.path("server.key"),
            ])
            .args([
                "-CAfile",
                &pki.path("ca.pem"),
                "-Verify",
                "1",
                "-www",
                "-quiet",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    let ca = pki.path("ca.pem");
    let a = Gateway::start(&format!(
        "upstreams:\n  mtls: {{ targets: [\"127.0.0.1:{port}\"], retries: 0, tls: {{ sni: internal.test, ca_file: \"{ca}\", client_cert: \"{}\", client_key: \"{}\" }} }}\n  anonymous: {{ targets: [\"127.0.0.1:{port}\"], retries: 0, tls: {{ sni: internal.test, ca_file: \"{ca}\" }} }}\nroutes:\n  - {{ name: mtls, path_prefix: /mtls, upstream: mtls }}\n  - {{ name: anonymous, path_prefix: /anonymous, upstream: anonymous }}\n",
        pki.path("client.pem"),
        pki.path("client.key")
    ));
    a.wait_until("s_server listens", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // TLS 1.3 reports a missing client certificate after the client's
    // side of the handshake is done: the refusal comes with the first
    // read (upstream_error) rather than the connect.
    let resp = a.get("internal.test", "/anonymous");
    let code = resp.assert_gateway_error(502);
    assert!(
        ["upstream_error", "upstream_unavailable"].contains(&code.as_str()),
        "{code}"
    );
    let resp = a.get("internal.test", "/mtls");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let page = String::from_utf8_lossy(&resp.body);
    assert!(
        page.contains("gateway.test"),
        "the client certificate is not in the session: {page}"
    );
    drop(server);
}
