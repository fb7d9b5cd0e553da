//! Load generators for tests that change the gateway under traffic: each
//! client sends requests back to back until told to stop and counts what
//! was answered and what was lost (sent, or tried to connect, and got no
//! complete response).

use super::http::{read_body, read_head};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Counts shared by a group of clients.
#[derive(Default)]
pub struct Tally {
    pub ok: AtomicUsize,
    pub lost: AtomicUsize,
}

impl Tally {
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    pub fn lost(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
    }
}

/// Starts `n` clients. `keepalive`: reuse a connection until the server
/// closes it (`Connection: close`); otherwise one connection per request.
pub fn start(
    addr: SocketAddr,
    n: usize,
    keepalive: bool,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (stop, tally) = (Arc::clone(stop), Arc::clone(tally));
            std::thread::spawn(move || client(addr, keepalive, &stop, &tally))
        })
        .collect()
}

fn client(addr: SocketAddr, keepalive: bool, stop: &AtomicBool, tally: &Tally) {
    let request: &[u8] = if keepalive {
        b"GET /load HTTP/1.1\r\nHost: h\r\n\r\n"
    } else {
        b"GET /load HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    };
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    // Bounded: a test never runs a client forever.
    for _ in 0..1_000_000 {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let (writer, reader) = match conn.as_mut() {
            Some(c) => c,
            None => {
                let Ok(stream) = TcpStream::connect(addr) else {
                    tally.lost.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let reader = BufReader::new(stream.try_clone().expect("clone"));
                conn.insert((stream, reader))
            }
        };
        let answered = writer
            .write_all(request)
            .ok()
            .and_then(|()| read_head(reader).ok().flatten())
            .and_then(|head| read_body(reader, &head, false).ok().map(|_| head));
        match answered {
            Some(head) if head.start_line.contains(" 200 ") => {
                tally.ok.fetch_add(1, Ordering::SeqCst);
                if !keepalive || head.header("connection") == Some("close") {
                    conn = None;
                }
            }
            _ => {
                tally.lost.fetch_add(1, Ordering::SeqCst);
                conn = None;
            }
        }
    }
}
