//! HTTP/2 abuse limits at their defaults, checked with nghttp2's own
//! tools (Debian's nghttp2-client) and a client that resets streams as
//! fast as it opens them.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use support::upstream::Upstream;
use support::{free_port, Gateway};

fn start() -> (Gateway, SocketAddr, Upstream) {
    let up = Upstream::start("a");
    let h2c: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = Gateway::start_with_listeners(
        &[],
        "",
        &format!("  - {{ address: \"{h2c}\", h2c: true }}\n"),
        &format!(
            "upstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n",
            up.addr
        ),
    );
    (gw, h2c, up)
}

#[test]
fn settings_bound_streams_and_headers_and_excess_streams_wait() {
    let (_gw, h2c, _up) = start();
    let out = Command::new("nghttp")
        .args(["-v", "-t", "10", &format!("http://{h2c}/x")])
        .output()
        .expect("nghttp (scripts/install-deps.sh installs nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):100"),
        "{text}"
    );
    assert!(
        text.contains("SETTINGS_MAX_HEADER_LIST_SIZE(0x06):65536"),
        "{text}"
    );
    assert!(text.contains(":status: 200"), "{text}");

    // 150 streams at once on each connection, over the limit of 100: the
    // client holds the rest back as the settings say, and every request is
    // answered.
    let out = Command::new("h2load")
        .args([
            "-n",
            "600",
            "-c",
            "2",
            "-m",
            "150",
            &format!("http://{h2c}/x"),
        ])
        .output()
        .expect("h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        text.contains("requests: 600 total, 600 started, 600 done, 600 succeeded"),
        "{text}"
    );
}

/// The "rapid reset" attack (CVE-2023-44487): streams opened and reset at
/// once, so that the server does work for requests that no longer count
/// against the stream limit. The connection must be refused (GOAWAY)
/// long before the client is done, and the gateway must keep serving.
#[test]
fn a_client_resetting_streams_as_fast_as_it_opens_them_is_cut_off() {
    let (gw, h2c, up) = start();
    let attempts = 20_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sent = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(h2c).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut sent = 0;
        let mut client = client;
        for _ in 0..attempts {
            let ready = tokio::time::timeout(Duration::from_secs(5), client.clone().ready()).await;
            let Ok(Ok(ready)) = ready else {
                break;
            };
            client = ready;
            let req = http::Request::get(format!("http://h/reset/{sent}"))
                .body(())
                .unwrap();
            match client.send_request(req, true) {
                Ok((response, _stream)) => {
                    // Dropping both handles resets the stream (CANCEL).
                    drop(response);
                    sent += 1;
                }
                Err(_) => break,
            }
            if sent % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        sent
    });
    let upstream_saw = up.hits();
    println!("streams opened and reset: {sent} of {attempts}; upstream requests: {upstream_saw}");
    assert!(
        sent < attempts,
        "the connection took {sent} resets without a GOAWAY"
    );
    // Still serving.
    assert_eq!(gw.get("h", "/after").status, 200);
}
