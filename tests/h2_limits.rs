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
    start_with("")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
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
    let rt = runtime();
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

fn start_with(server_extra: &str) -> (Gateway, SocketAddr, Upstream) {
    let up = Upstream::start("a");
    let h2c: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = Gateway::start_with_listeners(
        &[],
        server_extra,
        &format!("  - {{ address: \"{h2c}\", h2c: true }}\n"),
        &format!(
            "upstreams:\n  app: {{ targets: [\"{}\"] }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n",
            up.addr
        ),
    );
    (gw, h2c, up)
}

/// One request on a new h2c connection; returns the connection's task,
/// which ends when the server closes the connection.
async fn one_request(addr: SocketAddr) -> tokio::task::JoinHandle<Result<(), h2::Error>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let (response, _) = client
        .send_request(http::Request::get("http://h/x").body(()).unwrap(), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    // The client keeps its handle: the connection stays open on its side.
    std::mem::forget(client);
    conn
}

#[test]
fn an_idle_http2_connection_is_closed_after_the_keepalive_timeout() {
    let (_gw, h2c, _up) = start_with("keepalive_timeout_seconds: 1");
    let rt = runtime();
    rt.block_on(async {
        let conn = one_request(h2c).await;
        let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
        assert!(
            closed.is_ok(),
            "the idle HTTP/2 connection is still open after 5 s"
        );
    });
}

#[test]
fn a_stopping_gateway_sends_goaway_and_exits_without_waiting_out_its_grace() {
    let (mut gw, h2c, _up) = start_with("grace_period_seconds: 20");
    let rt = runtime();
    rt.block_on(async {
        let conn = one_request(h2c).await;
        gw.signal("TERM");
        // GOAWAY, then the connection closes: the client's side ends.
        let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
        assert!(
            closed.is_ok(),
            "the HTTP/2 connection was not closed by the stop"
        );
    });
    assert!(
        gw.exited_within(Duration::from_secs(10)),
        "the gateway waited for its 20 s grace with no connection left"
    );
}
