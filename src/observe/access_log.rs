//! The access log: one JSON object per line per request, written off the
//! request path.
//!
//! A request formats its line straight into one of a few shared buffers
//! (one per worker thread, as far as there are buffers), under a lock
//! nobody else wants: the writer thread only takes it to swap the buffer
//! for an empty one every 20 ms. So a line costs no allocation, no
//! channel and no copy; a batch is one write. When the lines waiting
//! reach `queue_lines`, or their bytes `queue_bytes` (the writer is stuck
//! on a full disk or pipe), new lines are dropped and counted
//! ([`dropped`]): a request never waits for the disk, and a stalled sink
//! holds at most `queue_bytes` of lines however long they are. `SIGUSR1`
//! reopens the file (for logrotate), and lines still waiting when the
//! process exits are written on the way out.
//!
//! The running sink is the running snapshot's, read from the store's one
//! published value ([`follow`]): the connection loop, which refuses
//! malformed requests before any route is known, logs through the same one
//! as the proxy, and a reload changes it with the rest of the config in one
//! swap.

use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How much may wait for the writer before new lines are dropped: the
/// first bound reached drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    pub lines: usize,
    /// Bytes of formatted lines.
    pub bytes: usize,
}

impl Queue {
    /// The least `queue_bytes`: a line longer than the queue is never
    /// written, and a line's path alone may be `limits.max_uri_bytes`.
    pub const MIN_BYTES: usize = 64 * 1024;
}

impl Default for Queue {
    /// 65,536 lines, 64 MiB. Lines of a few hundred bytes (most requests)
    /// reach the line bound first, at some 20-30 MB, so the byte bound
    /// changes nothing for them; it caps what long lines (long paths and
    /// hosts, up to `limits.max_uri_bytes` and `max_header_bytes`) could
    /// hold: 65,536 lines of 8 KiB paths were over 600 MB.
    fn default() -> Self {
        Queue {
            lines: 65_536,
            bytes: 64 * 1024 * 1024,
        }
    }
}
/// Buffers lines are formatted into. Threads take them in turn, so up to
/// this many worker threads never share one.
const SHARDS: usize = 16;
/// A buffer grown past this by a burst is given back after its write.
const KEEP_BYTES: usize = 256 * 1024;
/// How often the writer wakes to write what is waiting. It never sleeps
/// on a queue, so a request has no sleeping writer to wake (a futex call
/// per request, when it did).
const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

/// Lines formatted and not yet taken by the writer.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: usize,
}

/// One buffer, on its own cache lines so that threads writing to
/// neighbouring buffers do not slow each other down.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<Pending>);

/// What requests and the writer share.
struct Shared {
    shards: [Shard; SHARDS],
    /// Lines formatted and not yet written (taken, or still in a buffer).
    waiting: AtomicUsize,
    /// Their bytes.
    waiting_bytes: AtomicUsize,
    capacity: Queue,
    /// The sink is gone: the writer writes what is left and stops.
    closed: AtomicBool,
    /// Taken by whoever writes: the writer thread, or the exit handler.
    out: Mutex<Output>,
}

struct Output {
    sink: Box<dyn Write + Send>,
    destination: Destination,
    /// The buffer each shard is swapped with.
    spare: Vec<Vec<u8>>,
    failing: bool,
}

/// One running sink.
pub struct AccessLog {
    pub destination: Destination,
    shared: Arc<Shared>,
    /// The writer thread starts with the first line: a thread started
    /// before Pingora daemonizes (forks) would not exist in the process
    /// that serves.
    started: std::sync::Once,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
    }
}

/// The store's running snapshot, whose sink lines go to.
static RUNNING: OnceLock<Arc<ArcSwap<Snapshot>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
static REOPEN: AtomicBool = AtomicBool::new(false);
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's buffer: threads are dealt buffers in turn on their first
/// line.
fn shard_index() -> usize {
    SHARD.with(|cell| {
        let mut index = cell.get();
        if index == usize::MAX {
            index = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
            cell.set(index);
        }
        index
    })
}

/// Lines dropped because the writer fell behind.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Logs through the sink of whatever snapshot `running` holds (none: the
/// access log is off). A process serves one configuration: the first
/// store opened (the one that serves) is followed, later ones are not.
pub fn follow(running: Arc<ArcSwap<Snapshot>>) {
    if RUNNING.set(running).is_ok() {
        // SAFETY: registers a plain `extern "C"` function without
        // arguments; Pingora ends the process with `exit`, which runs it.
        unsafe {
            libc::atexit(flush_at_exit);
        }
    }
}

/// Whether lines are being written at all (skip formatting when not).
pub fn enabled() -> bool {
    RUNNING
        .get()
        .is_some_and(|running| running.load().access_log.is_some())
}

/// Logs one request; drops and counts the line when too many wait.
pub fn log(entry: &Entry) {
    let Some(running) = RUNNING.get() else {
        return;
    };
    let snapshot = running.load();
    let Some(sink) = snapshot.access_log.as_deref() else {
        return;
    };
    sink.log(entry);
}

fn dropped_line() {
    DROPPED.fetch_add(1, Ordering::Relaxed);
}

/// Locks ignoring poisoning: a buffer of finished lines stays usable
/// whatever panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AccessLog {
    /// Opens the destination; its writer thread starts with the first
    /// line and ends after this value is dropped and every line is
    /// written.
    pub fn open(destination: Destination, queue: Queue) -> Result<Self, String> {
        let sink = open(&destination)?;
        let shared = Arc::new(Shared {
            shards: Default::default(),
            waiting: AtomicUsize::new(0),
            waiting_bytes: AtomicUsize::new(0),
            capacity: queue,
            closed: AtomicBool::new(false),
            out: Mutex::new(Output {
                sink,
                destination: destination.clone(),
                spare: vec![Vec::new(); SHARDS],
                failing: false,
            }),
        });
        Ok(AccessLog {
            destination,
            shared,
            started: std::sync::Once::new(),
        })
    }

    /// Formats `entry` into this thread's buffer, unless the queue is
    /// full.
    fn log(&self, entry: &Entry) {
        self.started.call_once(|| self.start_writer());
        let shared = &self.shared;
        // A full queue by bytes drops the line before it is formatted.
        if shared.waiting_bytes.load(Ordering::Relaxed) >= shared.capacity.bytes {
            return dropped_line();
        }
        if shared.waiting.fetch_add(1, Ordering::Relaxed) >= shared.capacity.lines {
            shared.waiting.fetch_sub(1, Ordering::Relaxed);
            return dropped_line();
        }
        let mut pending = lock(&shared.shards[shard_index()].0);
        let start = pending.bytes.len();
        entry.write(&mut pending.bytes);
        // A line's length is known once it is formatted: one that does not
        // fit is taken back out.
        let len = pending.bytes.len() - start;
        if shared.waiting_bytes.fetch_add(len, Ordering::Relaxed) + len > shared.capacity.bytes {
            shared.waiting_bytes.fetch_sub(len, Ordering::Relaxed);
            shared.waiting.fetch_sub(1, Ordering::Relaxed);
            pending.bytes.truncate(start);
            return dropped_line();
        }
        pending.lines += 1;
    }

    fn start_writer(&self) {
        let shared = Arc::clone(&self.shared);
        if let Err(e) = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(&shared))
        {
            log::error!("cannot start the access log writer: {e}; lines are dropped");
        }
    }
}

fn open(destination: &Destination) -> Result<Box<dyn Write + Send>, String> {
    match destination {
        Destination::Stdout => Ok(Box::new(std::io::stdout())),
        Destination::File(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            // Non-blocking, so that a FIFO nobody reads fails here (ENXIO)
            // instead of holding `-t`, the start or a reload (and the
            // admin listener behind it) inside `open`; writes block as
            // usual once it is open.
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ENXIO) => format!(
                        "cannot open {}: a FIFO with no reader (start its reader first)",
                        path.display()
                    ),
                    _ => format!("cannot open {}: {e}", path.display()),
                })?;
            set_blocking(&file).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            Ok(Box::new(file) as Box<dyn Write + Send>)
        }
    }
}

/// Clears `O_NONBLOCK` on a file opened with it.
fn set_blocking(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns and keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn writer(shared: &Shared) {
    loop {
        // Read before writing, so that lines logged before the close are
        // in this round.
        let closing = shared.closed.load(Ordering::Acquire);
        if !closing {
            std::thread::sleep(FLUSH_INTERVAL);
        }
        let mut out = lock(&shared.out);
        if REOPEN.swap(false, Ordering::Relaxed) {
            out.reopen();
        }
        out.write_waiting(shared);
        if closing {
            return;
        }
    }
}

/// How long the exit handler waits for a writer busy on a slow sink.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Writes what is waiting in the running sink as the process exits. A
/// writer stuck on a sink (a pipe nobody reads) must not hold the exit:
/// after [`EXIT_WAIT`] the lines are given up.
extern "C" fn flush_at_exit() {
    let Some(running) = RUNNING.get() else {
        return;
    };
    let snapshot = running.load();
    let Some(sink) = snapshot.access_log.as_deref() else {
        return;
    };
    let start = std::time::Instant::now();
    loop {
        match sink.shared.out.try_lock() {
            Ok(mut out) => return out.write_waiting(&sink.shared),
            Err(std::sync::TryLockError::Poisoned(e)) => {
                return e.into_inner().write_waiting(&sink.shared)
            }
            Err(std::sync::TryLockError::WouldBlock) if start.elapsed() < EXIT_WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(std::sync::TryLockError::WouldBlock) => return,
        }
    }
}

impl Output {
    /// Takes every buffer's lines and writes them, one write per buffer.
    fn write_waiting(&mut self, shared: &Shared) {
        for (shard, spare) in shared.shards.iter().zip(self.spare.iter_mut()) {
            let lines = {
                let mut pending = lock(&shard.0);
                if pending.lines == 0 {
                    continue;
                }
                std::mem::swap(&mut pending.bytes, spare);
                std::mem::take(&mut pending.lines)
            };
            write_batch(&mut self.sink, spare, &mut self.failing);
            // Only now: lines stuck behind a blocked write still count
            // as waiting, so new ones are dropped rather than piling up.
            shared.waiting.fetch_sub(lines, Ordering::Relaxed);
            shared
                .waiting_bytes
                .fetch_sub(spare.len(), Ordering::Relaxed);
            spare.clear();
            if spare.capacity() > KEEP_BYTES {
                *spare = Vec::new();
            }
        }
        if let Err(e) = self.sink.flush() {
            if !self.failing {
                self.failing = true;
                log::error!("access log flush failed: {e}");
            }
        }
    }

    fn reopen(&mut self) {
        match open(&self.destination) {
            Ok(reopened) => {
                let _ = self.sink.flush();
                self.sink = reopened;
                log::info!("access log reopened");
            }
            Err(e) => log::error!("access log: {e}; still writing to the old file"),
        }
    }
}

/// Writes a batch; a failure is logged once per incident and its lines
/// are lost.
fn write_batch(out: &mut Box<dyn Write + Send>, batch: &[u8], failing: &mut bool) {
    match out.write_all(batch) {
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
    pub request_id: &'a [u8],
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    /// `HTTP/1.1`, `HTTP/2`...; empty: not known (refused before parsing).
    pub protocol: &'static str,
    pub host: &'a [u8],
    pub path: &'a [u8],
    pub status: u16,
    pub route: &'a str,
    pub upstream: &'a str,
    /// `route` and `upstream` as [`route_fields`] rendered them when the
    /// config compiled; used instead of them when not empty.
    pub route_fields: &'a [u8],
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
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    /// Appends the JSON line, newline included.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.reserve(320 + self.path.len() + self.host.len());
        out.extend_from_slice(b"{\"ts\":\"");
        timestamp(out, SystemTime::now());
        out.extend_from_slice(b"\",\"request_id\":");
        // Request ids are sane by construction (`request_id::is_sane`).
        plain(out, self.request_id);
        out.extend_from_slice(b",\"client_ip\":");
        match self.client_ip {
            Some(ip) => {
                out.push(b'"');
                super::push_ip(out, ip);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"method\":");
        // A method is an HTTP token: no quote, backslash or control byte.
        plain(out, self.method.as_bytes());
        if !self.protocol.is_empty() {
            out.extend_from_slice(b",\"protocol\":");
            plain(out, self.protocol.as_bytes());
        }
        out.extend_from_slice(b",\"host\":");
        string(out, self.host);
        out.extend_from_slice(b",\"path\":");
        string(out, self.path);
        out.extend_from_slice(b",\"status\":");
        number(out, u64::from(self.status));
        if self.route_fields.is_empty() {
            out.extend_from_slice(b",\"route\":");
            string(out, self.route.as_bytes());
            out.extend_from_slice(b",\"upstream\":");
            string(out, self.upstream.as_bytes());
        } else {
            out.extend_from_slice(self.route_fields);
        }
        out.extend_from_slice(b",\"upstream_addr\":");
        match self.upstream_addr {
            Some(std::net::SocketAddr::V4(addr)) => {
                out.push(b'"');
                super::push_ip(out, IpAddr::V4(*addr.ip()));
                out.push(b':');
                number(out, u64::from(addr.port()));
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
        millis(out, self.latency);
        out.extend_from_slice(b",\"upstream_latency_ms\":");
        match self.upstream_latency {
            Some(d) => millis(out, d),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"bytes_in\":");
        number(out, self.bytes_in as u64);
        out.extend_from_slice(b",\"bytes_out\":");
        number(out, self.bytes_out as u64);
        if let Some(consumer) = self.consumer {
            out.extend_from_slice(b",\"consumer\":");
            string(out, consumer.as_bytes());
        }
        if let Some(error) = self.error {
            out.extend_from_slice(b",\"error\":");
            string(out, error.as_bytes());
        }
        if self.retries > 0 {
            out.extend_from_slice(b",\"retries\":");
            number(out, u64::from(self.retries));
        }
        out.extend_from_slice(b"}\n");
    }
}

/// The access log's name for an HTTP version.
pub fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "",
    }
}

/// A route's `"route"` and `"upstream"` fields, rendered once per config:
/// every line of the route repeats them.
pub fn route_fields(route: &str, upstream: &str) -> Box<[u8]> {
    let mut out = b",\"route\":".to_vec();
    string(&mut out, route.as_bytes());
    out.extend_from_slice(b",\"upstream\":");
    string(&mut out, upstream.as_bytes());
    out.into_boxed_slice()
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Milliseconds with three decimals (microsecond precision).
fn millis(out: &mut Vec<u8>, d: Duration) {
    // In u64: `as_micros` is a u128, whose division is a library call.
    let micros = d.subsec_micros();
    number(out, d.as_secs() * 1000 + u64::from(micros / 1000));
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

/// Whether every byte is printable ASCII but `"` and `\\`, checked eight
/// bytes at a time (a byte-by-byte table walk was most of a line's cost).
fn is_plain(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    /// Whether any byte of `v` is zero (exact as a yes/no answer).
    fn has_zero(v: u64) -> bool {
        v.wrapping_sub(ONES) & !v & HIGH != 0
    }
    fn word_is_plain(w: u64) -> bool {
        let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0;
        let high = w & HIGH != 0;
        !(control
            || high
            || has_zero(w ^ (ONES * 0x7f))
            || has_zero(w ^ (ONES * u64::from(b'"')))
            || has_zero(w ^ (ONES * u64::from(b'\\'))))
    }
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        if !word_is_plain(u64::from_le_bytes(word)) {
            return false;
        }
    }
    // The tail, padded with a plain byte.
    let rest = chunks.remainder();
    let mut word = [b'a'; 8];
    word[..rest.len()].copy_from_slice(rest);
    word_is_plain(u64::from_le_bytes(word))
}

/// A JSON string of bytes known to need no escaping.
fn plain(out: &mut Vec<u8>, bytes: &[u8]) {
    debug_assert!(bytes.iter().all(|&b| PLAIN[usize::from(b)]));
    out.push(b'"');
    out.extend_from_slice(bytes);
    out.push(b'"');
}

/// A JSON string. Bytes that are not UTF-8 (a client's path may hold any)
/// become U+FFFD; control characters are escaped.
fn string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    // Nearly always plain printable ASCII: copied as it is.
    if is_plain(bytes) {
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

    /// A sink whose writer never runs: as stalled as a sink gets.
    fn stalled(tag: &str, queue: Queue) -> AccessLog {
        let dir =
            std::env::temp_dir().join(format!("tollgate-access-log-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sink = AccessLog::open(Destination::File(dir.join("access.log")), queue).unwrap();
        // The open file is enough: nothing is ever written to it.
        let _ = std::fs::remove_dir_all(&dir);
        sink.started.call_once(|| {});
        sink
    }

    fn buffered(sink: &AccessLog) -> usize {
        sink.shared
            .shards
            .iter()
            .map(|s| lock(&s.0).bytes.len())
            .sum()
    }

    #[test]
    fn a_stalled_queue_drops_lines_past_either_bound() {
        let before = dropped();
        // Long lines reach the byte bound first...
        let long = stalled(
            "bytes",
            Queue {
                lines: 1000,
                bytes: Queue::MIN_BYTES,
            },
        );
        let path = vec![b'a'; 7900];
        let entry = Entry {
            path: &path,
            ..Entry::default()
        };
        let line = entry.line().len();
        for _ in 0..100 {
            long.log(&entry);
        }
        let fit = Queue::MIN_BYTES / line;
        assert_eq!(long.shared.waiting.load(Ordering::Relaxed), fit);
        assert_eq!(
            long.shared.waiting_bytes.load(Ordering::Relaxed),
            fit * line
        );
        assert_eq!(
            buffered(&long),
            fit * line,
            "a dropped line leaves no bytes"
        );
        // ...short ones the line bound.
        let short = stalled(
            "lines",
            Queue {
                lines: 10,
                bytes: Queue::MIN_BYTES,
            },
        );
        for _ in 0..25 {
            short.log(&Entry::default());
        }
        assert_eq!(short.shared.waiting.load(Ordering::Relaxed), 10);
        assert_eq!(buffered(&short), 10 * Entry::default().line().len());
        // Every line that did not fit was counted (other tests drop none).
        assert_eq!(dropped() - before, (100 - fit + 15) as u64);
    }

    #[test]
    fn written_lines_leave_the_queue() {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-access-log-{}-written",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("access.log");
        let sink = AccessLog::open(Destination::File(file.clone()), Queue::default()).unwrap();
        for _ in 0..50 {
            sink.log(&Entry::default());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.shared.waiting_bytes.load(Ordering::Relaxed) > 0 {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(sink.shared.waiting.load(Ordering::Relaxed), 0);
        let written = std::fs::read_to_string(&file).unwrap();
        assert_eq!(written.lines().count(), 50);
        drop(sink);
        let _ = std::fs::remove_dir_all(dir);
    }

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
    fn the_word_check_agrees_with_the_table() {
        for b in 0..=255u8 {
            for at in 0..13 {
                let mut text = vec![b'x'; 13];
                text[at] = b;
                assert_eq!(
                    is_plain(&text),
                    PLAIN[usize::from(b)],
                    "byte {b:#x} at {at}"
                );
                assert_eq!(is_plain(&text[..=at]), PLAIN[usize::from(b)]);
            }
        }
        assert!(is_plain(b""));
    }

    #[test]
    fn a_line_is_one_json_object() {
        let entry = Entry {
            request_id: b"abc",
            client_ip: Some("192.0.2.1".parse().unwrap()),
            method: "GET",
            protocol: "HTTP/2",
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
            route_fields: &[],
        };
        let line = entry.line();
        let fields = route_fields("r", "app");
        let prerendered = Entry {
            route_fields: &fields,
            route: "",
            upstream: "",
            ..entry
        };
        let without_time = |line: &[u8]| {
            let mut v: serde_json::Value = serde_json::from_slice(line).unwrap();
            v.as_object_mut().unwrap().remove("ts");
            v
        };
        assert_eq!(without_time(&prerendered.line()), without_time(&line));
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}\u{fffd}");
        assert_eq!(v["latency_ms"], 1234.567);
        assert_eq!(v["upstream_latency_ms"], 0.005);
        assert_eq!(v["consumer"], "alice");
        assert_eq!(v["protocol"], "HTTP/2");
        assert_eq!(v["retries"], 1);
        assert!(v.get("error").is_none());
        let bare = Entry::default().line();
        let v: serde_json::Value = serde_json::from_slice(&bare).unwrap();
        assert_eq!(v["client_ip"], serde_json::Value::Null);
        assert!(v.get("retries").is_none());
    }
}
