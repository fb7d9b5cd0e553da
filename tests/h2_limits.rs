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

/// The upstream gets a 5 s connect timeout: 300 streams at once open up to
/// 300 connections to the test upstream, whose accept queue (128) drops the
/// excess SYNs; the kernel resends them after 1 s, which was the default
/// connect timeout (4 s since), and a few requests failed with 504 on a
/// busy machine. 5 s outlasts a few more resends.
fn start_with(server_extra: &str) -> (Gateway, SocketAddr, Upstream) {
    let up = Upstream::start("a");
    let h2c: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = Gateway::start_with_listeners(
        &[],
        server_extra,
        &format!("  - {{ address: \"{h2c}\", h2c: true }}\n"),
        &format!(
            "upstreams:\n  app: {{ targets: [\"{}\"], timeouts: {{ connect: 5s }} }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n",
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

/// Sends GETs one after another on one connection until one fails;
/// returns how many were answered and the connection's task.
async fn requests_until_refused(
    addr: SocketAddr,
    tries: usize,
) -> (usize, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut answered = 0;
    for i in 0..tries {
        let Ok(Ok(ready)) = tokio::time::timeout(Duration::from_secs(5), client.ready()).await
        else {
            break;
        };
        client = ready;
        let req = http::Request::get(format!("http://h/n/{i}"))
            .body(())
            .unwrap();
        let Ok((response, _)) = client.send_request(req, true) else {
            break;
        };
        match tokio::time::timeout(Duration::from_secs(5), response).await {
            Ok(Ok(r)) if r.status() == 200 => answered += 1,
            _ => break,
        }
    }
    (answered, conn)
}

#[test]
fn an_http2_connection_carries_at_most_the_keepalive_request_limit() {
    let (gw, h2c, up) = start_with("keepalive_request_limit: 3");
    let rt = runtime();
    rt.block_on(async {
        let (answered, conn) = requests_until_refused(h2c, 6).await;
        assert_eq!(answered, 3, "requests answered on one connection");
        // The server closes the connection (GOAWAY, then the socket).
        let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
        assert!(closed.is_ok(), "the connection stayed open past its limit");
        // A new connection gets its own three.
        let (answered, _conn) = requests_until_refused(h2c, 2).await;
        assert_eq!(answered, 2);
    });
    assert_eq!(up.hits(), 5);
    assert_eq!(gw.get("h", "/after").status, 200);
}

/// A gateway on an h2c listener with `limits.body_timeout` and an access
/// log, in front of one upstream; returns the log's path too.
fn start_with_body_timeout(timeout: &str) -> (Gateway, SocketAddr, Upstream, std::path::PathBuf) {
    let up = Upstream::start("a");
    let (gw, h2c, log) =
        start_body_timeout_gateway(timeout, &format!("targets: [\"{}\"]", up.addr));
    (gw, h2c, up, log)
}

/// The same with the upstream `app` given as YAML mapping entries.
fn start_body_timeout_gateway(
    timeout: &str,
    app: &str,
) -> (Gateway, SocketAddr, std::path::PathBuf) {
    let h2c: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = support::scratch_dir("h2-log").join("access.log");
    let gw = Gateway::start_with_listeners(
        &[],
        "",
        &format!("  - {{ address: \"{h2c}\", h2c: true }}\n"),
        &format!(
            "limits: {{ body_timeout: {timeout} }}\naccess_log: {{ path: \"{}\" }}\nupstreams:\n  app: {{ {app} }}\nroutes:\n  - {{ name: all, path_prefix: /, upstream: app }}\n",
            log.display(),
        ),
    );
    (gw, h2c, log)
}

/// An h2c client whose connection is driven in the background.
async fn h2c_client(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

/// Opens a POST stream to `path`; the caller sends its body.
async fn post(
    client: &h2::client::SendRequest<bytes::Bytes>,
    path: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let mut client = client.clone().ready().await.unwrap();
    let req = http::Request::post(format!("http://h{path}"))
        .body(())
        .unwrap();
    client.send_request(req, false).unwrap()
}

#[test]
fn an_http2_request_body_that_stops_arriving_is_reset_and_logged_as_408() {
    let (gw, h2c, up, log) = start_with_body_timeout("1s");
    let rt = runtime();
    rt.block_on(async {
        let client = h2c_client(h2c).await;
        let (response, mut body) = post(&client, "/upload").await;
        body.send_data(bytes::Bytes::from_static(b"abc"), false)
            .unwrap();
        // ...and nothing more: the stream is reset by the gateway.
        let outcome = tokio::time::timeout(Duration::from_secs(15), response)
            .await
            .expect("the stalled stream was neither answered nor reset");
        let error = outcome.expect_err("a stalled body got an answer");
        assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error:?}");

        // The connection itself is still good.
        let mut client = client.clone().ready().await.unwrap();
        let (response, _) = client
            .send_request(http::Request::get("http://h/next").body(()).unwrap(), true)
            .unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
    });
    // The upstream never got a whole request from the stalled client.
    assert_eq!(up.hits(), 1);
    let line = wait_for_line(&gw, &log, "/upload");
    assert_eq!(line["status"], 408, "{line}");
    assert_eq!(line["error"], "request_timeout", "{line}");
    assert_eq!(line["route"], "all", "{line}");
    assert_eq!(line["protocol"], "HTTP/2", "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["bytes_in"], 3, "{line}");
}

#[test]
fn an_http2_request_body_that_keeps_moving_is_not_cut_by_the_body_timeout() {
    // Each piece comes well within the timeout; the whole body takes
    // longer than it.
    let (_gw, h2c, up, _log) = start_with_body_timeout("2s");
    let rt = runtime();
    rt.block_on(async {
        let client = h2c_client(h2c).await;
        let (response, mut body) = post(&client, "/slow").await;
        for _ in 0..8 {
            body.send_data(bytes::Bytes::from_static(b"0123456789"), false)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        body.send_data(bytes::Bytes::from_static(b"end"), true)
            .unwrap();
        let json = response_json(response).await;
        assert_eq!(json["body_len"], 83, "{json}");
    });
    assert_eq!(up.hits(), 1);
}

/// Many HTTP/2 clients end a body of unknown length with an empty DATA
/// frame. Passed on as an empty chunk, that ended the chunked body to an
/// HTTP/1 upstream early, and the real end then looked like the start of
/// another request on the upstream connection.
#[test]
fn an_http2_body_ended_by_an_empty_data_frame_is_one_request_upstream() {
    let (_gw, h2c, up, _log) = start_with_body_timeout("30s");
    let rt = runtime();
    rt.block_on(async {
        let client = h2c_client(h2c).await;
        for i in 0..3 {
            let (response, mut body) = post(&client, &format!("/post/{i}")).await;
            body.send_data(bytes::Bytes::from_static(b"payload"), false)
                .unwrap();
            body.send_data(bytes::Bytes::new(), true).unwrap();
            let json = response_json(response).await;
            // Each answer is its own request's, not a stale one.
            assert_eq!(json["target"], format!("/post/{i}"), "{json}");
            assert_eq!(json["body"], "payload", "{json}");
        }
    });
    assert_eq!(up.hits(), 3, "the upstream saw requests nobody sent");
}

async fn response_json(response: h2::client::ResponseFuture) -> serde_json::Value {
    let response = tokio::time::timeout(Duration::from_secs(15), response)
        .await
        .expect("no answer")
        .expect("stream failed");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    serde_json::from_slice(&text).unwrap()
}

/// The access log line for `path`, once it is written.
fn wait_for_line(gw: &Gateway, log: &std::path::Path, path: &str) -> serde_json::Value {
    let mut found = None;
    gw.wait_until("the access log has the request", || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["path"] == path);
        found.is_some()
    });
    found.unwrap()
}

/// A head that never ends (a HEADERS frame without END_HEADERS), either
/// stalled or trickled in CONTINUATION frames: slowloris over HTTP/2. A
/// stalled head is a connection without a request in flight, closed after
/// the keepalive timeout; a trickled one runs into the codec's bound on
/// CONTINUATION frames.
#[test]
fn an_http2_head_that_never_ends_does_not_hold_its_connection() {
    let (_gw, h2c, _up) = start_with("keepalive_timeout_seconds: 1");
    for trickle in [false, true] {
        assert!(
            closed_while_sending_a_head(h2c, trickle),
            "a connection stuck in a head (trickled: {trickle}) stayed open for 15 s"
        );
    }
}

fn closed_while_sending_a_head(h2c: SocketAddr, trickle: bool) -> bool {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(h2c).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
                                                           // HEADERS on stream 1, flags 0: more of the block is to follow.
    hello.extend_from_slice(&[0, 0, 2, 1, 0, 0, 0, 0, 1, 0x82, 0x86]);
    tcp.write_all(&hello).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(15) {
        match tcp.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // One more byte of the head (a CONTINUATION frame).
                if trickle && tcp.write_all(&[0, 0, 1, 9, 0, 0, 0, 0, 1, 0x84]).is_err() {
                    return true;
                }
            }
            Err(_) => return true,
        }
    }
    false
}

/// A client past its request limit that never answers the PING behind the
/// first GOAWAY, so the final GOAWAY never comes, and goes on opening
/// streams: it is cut off instead of being served on and on.
#[test]
fn a_client_ignoring_goaway_cannot_go_past_its_request_limit() {
    use std::io::{Read, Write};
    let (_gw, h2c, up) = start_with("keepalive_request_limit: 3");
    let mut tcp = std::net::TcpStream::connect(h2c).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS: a large stream window; then a large connection window, so
    // that unread response bodies never hold streams open.
    hello.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0x7f, 0xff, 0xff, 0xff]);
    hello.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0x7f, 0xff, 0, 0]);
    tcp.write_all(&hello).unwrap();
    let mut next_stream: u32 = 1;
    let mut answered = 0;
    let mut closed = false;
    'batches: for _ in 0..20 {
        let mut batch = Vec::new();
        for _ in 0..20 {
            // HEADERS, END_STREAM | END_HEADERS: GET http://h/ (HPACK:
            // indexed :method GET, :scheme http, :path /; :authority h).
            batch.extend_from_slice(&[0, 0, 6, 1, 5]);
            batch.extend_from_slice(&next_stream.to_be_bytes());
            batch.extend_from_slice(&[0x82, 0x86, 0x84, 0x01, 0x01, b'h']);
            next_stream += 2;
        }
        if tcp.write_all(&batch).is_err() {
            closed = true;
            break;
        }
        let mut seen = 0;
        while seen < 20 {
            let mut head = [0u8; 9];
            if tcp.read_exact(&mut head).is_err() {
                closed = true;
                break 'batches;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if tcp.read_exact(&mut payload).is_err() {
                closed = true;
                break 'batches;
            }
            match (head[3], head[4]) {
                // The server's SETTINGS: acknowledged (its PINGs are not).
                (4, 0) => tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).unwrap(),
                // A response head, or a stream refused.
                (1, _) | (3, _) => {
                    seen += 1;
                    answered += usize::from(head[3] == 1);
                }
                _ => {}
            }
        }
    }
    println!(
        "answered {answered} of {} streams; closed: {closed}",
        next_stream / 2
    );
    assert!(closed, "the connection was still serving after 400 streams");
    assert!((3..400).contains(&answered), "answered {answered}");
    assert!(up.hits() < 400);
}

/// A listening socket whose accept queue is full: connecting to it hangs
/// (the kernel drops the SYN) until the connecting side gives up.
struct StuckListener {
    addr: SocketAddr,
    _listener: std::net::TcpListener,
    _queued: std::net::TcpStream,
}

impl StuckListener {
    fn new() -> StuckListener {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // A backlog of 0 holds one connection, which nobody accepts.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let addr = listener.local_addr().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        StuckListener {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

/// The body clock runs only while the gateway forwards the body: time spent
/// connecting upstream (a target whose connect hangs past the body timeout,
/// then a retry on another) is not the client's to be blamed for.
#[test]
fn time_spent_connecting_upstream_does_not_count_against_the_body_timeout() {
    let stuck = StuckListener::new();
    let up = Upstream::start("a");
    let (gw, h2c, log) = start_body_timeout_gateway(
        "1s",
        &format!(
            "targets: [\"{}\", \"{}\"], retries: 1, timeouts: {{ connect: 2s }}",
            stuck.addr, up.addr
        ),
    );
    let rt = runtime();
    rt.block_on(async {
        let client = h2c_client(h2c).await;
        // Round robin: one of the two requests tries the stuck target first.
        for i in 0..2 {
            let (response, mut body) = post(&client, &format!("/retried/{i}")).await;
            body.send_data(bytes::Bytes::from_static(b"whole body"), true)
                .unwrap();
            let json = response_json(response).await;
            assert_eq!(json["body"], "whole body", "{json}");
        }
    });
    let retried = [0, 1]
        .iter()
        .map(|i| wait_for_line(&gw, &log, &format!("/retried/{i}")))
        .filter(|line| line["retries"] == 1)
        .count();
    assert!(retried >= 1, "no request went to the stuck target first");
}
