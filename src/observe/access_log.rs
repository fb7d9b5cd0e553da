//! The access log: one JSON object per line per request, written off the
//! request path.
//!
//! A request formats its line (into one buffer, no intermediate strings)
//! and hands it to a bounded channel; a writer thread batches whatever is
//! queued into one write. A full channel drops the line and counts it
//! ([`dropped`]): a request never waits for the disk. `SIGUSR1` reopens
//! the file (for logrotate).
//!
//! The running sink is process-wide ([`install`]), so the connection loop,
//! which refuses malformed requests before any route is known, logs
//! through the same one as the proxy.

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines queued before new ones are dropped, unless configured.
pub const QUEUE_LINES: usize = 65_536;
/// The most a writer gathers into one write.
const BATCH_BYTES: usize = 256 * 1024;
/// How often the writer wakes to write what was queued. It never blocks
/// on the queue, so a request queuing a line never has a sleeping writer
/// to wake (a futex call per request, when it did).
const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

/// A writer's queue and output, before its thread takes them.
type Writer = (Receiver<Vec<u8>>, Box<dyn Write + Send>);

/// One running sink: the sending side of its writer's channel.
pub struct AccessLog {
    pub destination: Destination,
    tx: SyncSender<Vec<u8>>,
    /// The writer's end, until its thread starts with the first line: a
    /// thread started before Pingora daemonizes (forks) would not exist
    /// in the process that serves.
    idle_writer: std::sync::Mutex<Option<Writer>>,
    started: std::sync::Once,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

static SINK: ArcSwapOption<AccessLog> = ArcSwapOption::const_empty();
static DROPPED: AtomicU64 = AtomicU64::new(0);
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Lines dropped because the writer fell behind.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Makes `sink` the one requests write to (`None`: access log off).
pub fn install(sink: Option<Arc<AccessLog>>) {
    SINK.store(sink);
}

/// Whether lines are being written at all (skip formatting when not).
pub fn enabled() -> bool {
    SINK.load().is_some()
}

/// Queues a line; drops and counts it when the queue is full.
pub fn write(line: Vec<u8>) {
    let sink = SINK.load();
    let Some(sink) = sink.as_ref() else {
        return;
    };
    sink.started.call_once(|| sink.start_writer());
    match sink.tx.try_send(line) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl AccessLog {
    /// Opens the destination and starts its writer thread. The thread
    /// ends once every sender (this value) is gone and the queue is empty.
    pub fn open(destination: Destination, queue_lines: usize) -> Result<Self, String> {
        let out = open(&destination)?;
        let (tx, rx) = sync_channel(queue_lines);
        Ok(AccessLog {
            destination,
            tx,
            idle_writer: std::sync::Mutex::new(Some((rx, out))),
            started: std::sync::Once::new(),
        })
    }

    fn start_writer(&self) {
        let taken = self
            .idle_writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some((rx, out)) = taken else {
            return;
        };
        let destination = self.destination.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, out, destination))
        {
            log::error!("cannot start the access log writer: {e}; lines are dropped");
        }
    }
}

fn open(destination: &Destination) -> Result<Box<dyn Write + Send>, String> {
    match destination {
        Destination::Stdout => Ok(Box::new(std::io::stdout())),
        Destination::File(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(|f| Box::new(f) as Box<dyn Write + Send>)
            .map_err(|e| format!("cannot open {}: {e}", path.display())),
    }
}

fn writer(rx: Receiver<Vec<u8>>, mut out: Box<dyn Write + Send>, destination: Destination) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut failing = false;
    let mut open_sink = true;
    while open_sink {
        std::thread::sleep(FLUSH_INTERVAL);
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    batch.extend_from_slice(&line);
                    if batch.len() >= BATCH_BYTES {
                        flush(&mut out, &mut batch, &mut failing);
                    }
                }
                Err(TryRecvError::Empty) => break,
                // Every sender is gone: write what is left, then stop.
                Err(TryRecvError::Disconnected) => {
                    open_sink = false;
                    break;
                }
            }
        }
        if REOPEN.swap(false, Ordering::Relaxed) {
            match open(&destination) {
                Ok(reopened) => {
                    let _ = out.flush();
                    out = reopened;
                    log::info!("access log reopened");
                }
                Err(e) => log::error!("access log: {e}; still writing to the old file"),
            }
        }
        flush(&mut out, &mut batch, &mut failing);
    }
}

/// Writes a batch; a failure is logged once per incident and its lines
/// are lost.
fn flush(out: &mut Box<dyn Write + Send>, batch: &mut Vec<u8>, failing: &mut bool) {
    if batch.is_empty() {
        return;
    }
    match out.write_all(batch).and_then(|()| out.flush()) {
        Ok(()) if *failing => {
            *failing = false;
            log::warn!("access log writable again");
        }
        Ok(()) => {}
        Err(e) if !*failing => {
            *failing = true;
            log::error!("access log write failed: {e}");
        }
        Err(_) => {}
    }
    batch.clear();
}

/// Reopens the file on `SIGUSR1` (after logrotate moved it).
pub struct ReopenService;

#[async_trait]
impl BackgroundService for ReopenService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot handle SIGUSR1 (access log reopening): {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = usr1.recv() => REOPEN.store(true, Ordering::Relaxed),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// One request, as its line says it.
#[derive(Default)]
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    pub host: &'a [u8],
    pub path: &'a [u8],
    pub status: u16,
    pub route: &'a str,
    pub upstream: &'a str,
    pub upstream_addr: Option<std::net::SocketAddr>,
    pub latency: Duration,
    pub upstream_latency: Option<Duration>,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub consumer: Option<&'a str>,
    pub error: Option<&'static str>,
    pub retries: u32,
}

impl Entry<'_> {
    /// The JSON line, newline included.
    pub fn line(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(320 + self.path.len() + self.host.len());
        out.extend_from_slice(b"{\"ts\":\"");
        timestamp(&mut out, SystemTime::now());
        out.extend_from_slice(b"\",\"request_id\":");
        string(&mut out, self.request_id.as_bytes());
        out.extend_from_slice(b",\"client_ip\":");
        match self.client_ip {
            Some(ip) => {
                out.push(b'"');
                super::push_ip(&mut out, ip);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"method\":");
        string(&mut out, self.method.as_bytes());
        out.extend_from_slice(b",\"host\":");
        string(&mut out, self.host);
        out.extend_from_slice(b",\"path\":");
        string(&mut out, self.path);
        out.extend_from_slice(b",\"status\":");
        number(&mut out, u64::from(self.status));
        out.extend_from_slice(b",\"route\":");
        string(&mut out, self.route.as_bytes());
        out.extend_from_slice(b",\"upstream\":");
        string(&mut out, self.upstream.as_bytes());
        out.extend_from_slice(b",\"upstream_addr\":");
        match self.upstream_addr {
            Some(std::net::SocketAddr::V4(addr)) => {
                out.push(b'"');
                super::push_ip(&mut out, IpAddr::V4(*addr.ip()));
                out.push(b':');
                number(&mut out, u64::from(addr.port()));
                out.push(b'"');
            }
            Some(addr) => {
                out.push(b'"');
                let _ = write!(out, "{addr}");
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"latency_ms\":");
        millis(&mut out, self.latency);
        out.extend_from_slice(b",\"upstream_latency_ms\":");
        match self.upstream_latency {
            Some(d) => millis(&mut out, d),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"bytes_in\":");
        number(&mut out, self.bytes_in as u64);
        out.extend_from_slice(b",\"bytes_out\":");
        number(&mut out, self.bytes_out as u64);
        if let Some(consumer) = self.consumer {
            out.extend_from_slice(b",\"consumer\":");
            string(&mut out, consumer.as_bytes());
        }
        if let Some(error) = self.error {
            out.extend_from_slice(b",\"error\":");
            string(&mut out, error.as_bytes());
        }
        if self.retries > 0 {
            out.extend_from_slice(b",\"retries\":");
            number(&mut out, u64::from(self.retries));
        }
        out.extend_from_slice(b"}\n");
        out
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Milliseconds with three decimals (microsecond precision).
fn millis(out: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros();
    number(out, (micros / 1000) as u64);
    let frac = (micros % 1000) as u16;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// Bytes a JSON string holds as they are: printable ASCII but `"` and `\`.
static PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x20;
    while b < 0x7f {
        table[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    table
};

/// A JSON string. Bytes that are not UTF-8 (a client's path may hold any)
/// become U+FFFD; control characters are escaped.
fn string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    // Nearly always plain printable ASCII: copied as it is.
    if bytes.iter().all(|&b| PLAIN[usize::from(b)]) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let text = String::from_utf8_lossy(bytes);
    for &b in text.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f | 0x7f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

thread_local! {
    /// The formatted second of the last line this thread wrote: lines of
    /// the same second only add their milliseconds.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// RFC 3339 in UTC with milliseconds: `2026-11-30T13:30:00.123Z`.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, format_second(secs));
        }
        out.extend_from_slice(&cached.1);
    });
    let ms = since.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ]);
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (civil-from-days, proleptic
/// Gregorian).
fn format_second(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    let mut buf = [0u8; 19];
    let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}");
    buf.copy_from_slice(&text.as_bytes()[..19]);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let mut out = Vec::new();
        timestamp(
            &mut out,
            UNIX_EPOCH + Duration::from_millis(1_796_045_400_123),
        );
        assert_eq!(out, b"2026-11-30T13:30:00.123Z");
        assert_eq!(&format_second(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&format_second(0), b"1970-01-01T00:00:00");
    }

    #[test]
    fn a_line_is_one_json_object() {
        let entry = Entry {
            request_id: "abc",
            client_ip: Some("192.0.2.1".parse().unwrap()),
            method: "GET",
            host: b"api.example.com",
            path: b"/a\"b\\c\x01\xff",
            status: 200,
            route: "r",
            upstream: "app",
            upstream_addr: Some("127.0.0.1:8080".parse().unwrap()),
            latency: Duration::from_micros(1_234_567),
            upstream_latency: Some(Duration::from_micros(5)),
            bytes_in: 3,
            bytes_out: 12,
            consumer: Some("alice"),
            error: None,
            retries: 1,
        };
        let line = entry.line();
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}\u{fffd}");
        assert_eq!(v["latency_ms"], 1234.567);
        assert_eq!(v["upstream_latency_ms"], 0.005);
        assert_eq!(v["consumer"], "alice");
        assert_eq!(v["retries"], 1);
        assert!(v.get("error").is_none());
        let bare = Entry::default().line();
        let v: serde_json::Value = serde_json::from_slice(&bare).unwrap();
        assert_eq!(v["client_ip"], serde_json::Value::Null);
        assert!(v.get("retries").is_none());
    }
}
