//! A real HTTP upstream for tests and for `make run`'s demo: it answers every
//! request with JSON describing what it received (method, target, headers),
//! so a test can assert on exactly what the gateway forwarded.
//!
//! Behaviour the tests steer:
//! - `GET /healthz` answers 200 while healthy, 503 otherwise;
//! - a request header `X-Test-Delay-Ms: N` delays the answer by N ms;
//! - `close_after_read` makes it read a request and hang up without answering;
//! - `garbage_reply` makes it answer with bytes that are not HTTP.

#![allow(dead_code)]

use super::http::{buffered, read_body, read_head};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct State {
    name: String,
    healthy: AtomicBool,
    close_after_read: AtomicBool,
    garbage_reply: AtomicBool,
    /// Requests answered or dropped, health checks excluded.
    hits: AtomicUsize,
    health_checks: AtomicUsize,
}

/// A running upstream; it stops accepting when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    /// Starts on an ephemeral port of 127.0.0.1.
    pub fn start(name: &str) -> Upstream {
        Self::start_on("127.0.0.1:0", name).expect("bind test upstream")
    }

    pub fn start_on(addr: &str, name: &str) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            name: name.to_owned(),
            healthy: AtomicBool::new(true),
            close_after_read: AtomicBool::new(false),
            garbage_reply: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (accept_state, accept_stop) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if accept_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let state = Arc::clone(&accept_state);
                std::thread::spawn(move || serve(conn, &state));
            }
        });
        Ok(Upstream { addr, state, stop })
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    pub fn set_close_after_read(&self, close: bool) {
        self.state.close_after_read.store(close, Ordering::SeqCst);
    }

    /// Answer requests with bytes that are not HTTP.
    pub fn set_garbage_reply(&self, garbage: bool) {
        self.state.garbage_reply.store(garbage, Ordering::SeqCst);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(conn: TcpStream, state: &State) {
    let _ = conn.set_nodelay(true);
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = buffered(conn);
    loop {
        let head = match read_head(&mut reader) {
            Ok(Some(head)) => head,
            _ => return,
        };
        let Ok(body) = read_body(&mut reader, &head, false) else {
            return;
        };
        let mut parts = head.start_line.split(' ');
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();

        let (status, payload) = if target == "/healthz" {
            state.health_checks.fetch_add(1, Ordering::SeqCst);
            if state.healthy.load(Ordering::SeqCst) {
                (200, serde_json::json!({ "status": "ok" }))
            } else {
                (503, serde_json::json!({ "status": "unhealthy" }))
            }
        } else {
            state.hits.fetch_add(1, Ordering::SeqCst);
            if state.close_after_read.load(Ordering::SeqCst) {
                return;
            }
            if state.garbage_reply.load(Ordering::SeqCst) {
                let _ = writer.write_all(b"SPDY/9 banana\r\n\x00\x01\r\n\r\n");
                return;
            }
            if let Some(ms) = head.header("x-test-delay-ms").and_then(|v| v.parse().ok()) {
                std::thread::sleep(Duration::from_millis(ms));
            }
            let headers: Vec<[String; 2]> = head
                .headers
                .iter()
                .map(|(n, v)| [n.to_ascii_lowercase(), v.clone()])
                .collect();
            (
                200,
                serde_json::json!({
                    "upstream": state.name,
                    "method": method,
                    "target": target,
                    "headers": headers,
                    "body_len": body.len(),
                    "body": String::from_utf8_lossy(&body),
                }),
            )
        };
        let payload = payload.to_string();
        let response = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nServer: tollgate-test-upstream\r\nX-Upstream: {}\r\n\r\n",
            if status == 200 { "OK" } else { "Service Unavailable" },
            payload.len(),
            state.name,
        );
        // One write per response: a head and body written separately meet
        // Nagle's algorithm and delayed ACKs, and every request stalls 40 ms.
        let mut bytes = response.into_bytes();
        if method != "HEAD" {
            bytes.extend_from_slice(payload.as_bytes());
        }
        if writer.write_all(&bytes).is_err() {
            return;
        }
    }
}

/// What a scripted upstream does with one request: gets the request head
/// and body, the connection's reader (for tunnels) and writer, and says
/// whether to keep the connection for another request.
pub type Script = dyn Fn(&super::http::Head, &[u8], &mut std::io::BufReader<TcpStream>, &mut TcpStream) -> bool
    + Send
    + Sync;

/// An upstream whose answers a test writes byte by byte: for responses a
/// well-behaved server would never send (bad statuses, hop-by-hop
/// headers, interim responses, upgrades).
/// Echoes a tunnel's bytes until the client closes it.
pub fn echo_tunnel(reader: &mut std::io::BufReader<TcpStream>, writer: &mut TcpStream) {
    use std::io::BufRead;
    loop {
        let Ok(buf) = reader.fill_buf() else {
            return;
        };
        if buf.is_empty() {
            return;
        }
        let n = buf.len();
        let _ = writer.write_all(buf);
        reader.consume(n);
    }
}

pub struct Scripted {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Scripted {
    /// A WebSocket server: answers every request with 101 (after a pause:
    /// Pingora 0.9.1 can take the end of a bodyless upgrade request that
    /// reaches the upstream side after the 101 for the end of the tunnel;
    /// a real server takes longer than this to answer), then echoes the
    /// tunnel's bytes.
    pub fn websocket_echo() -> Scripted {
        Scripted::start(|_, _, reader, writer| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let _ = writer.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            );
            echo_tunnel(reader, writer);
            false
        })
    }

    pub fn start(
        script: impl Fn(
                &super::http::Head,
                &[u8],
                &mut std::io::BufReader<TcpStream>,
                &mut TcpStream,
            ) -> bool
            + Send
            + Sync
            + 'static,
    ) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind scripted upstream");
        let addr = listener.local_addr().expect("address");
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let script: Arc<Script> = Arc::new(script);
        let (accept_hits, accept_stop) = (Arc::clone(&hits), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if accept_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (hits, script) = (Arc::clone(&accept_hits), Arc::clone(&script));
                std::thread::spawn(move || {
                    let _ = conn.set_nodelay(true);
                    let Ok(mut writer) = conn.try_clone() else {
                        return;
                    };
                    let mut reader = buffered(conn);
                    loop {
                        let Ok(Some(head)) = read_head(&mut reader) else {
                            return;
                        };
                        let Ok(body) = read_body(&mut reader, &head, false) else {
                            return;
                        };
                        hits.fetch_add(1, Ordering::SeqCst);
                        if !script(&head, &body, &mut reader, &mut writer) {
                            return;
                        }
                    }
                });
            }
        });
        Scripted { addr, hits, stop }
    }

    /// Answers every request with `response`, as written.
    pub fn replying(response: &'static [u8]) -> Scripted {
        Scripted::start(move |_, _, _, w| w.write_all(response).is_ok())
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}
