//! Client keepalive that holds no request state while a connection is idle.
//!
//! Pingora's HTTP/1 loop starts the next request as soon as a response is
//! done, so an idle keepalive connection sits inside the proxy's whole
//! per-request future (~9 KB, boxed) with a 4 KiB header buffer allocated:
//! ~22 KB per idle client. [`LeanKeepalive`] waits for the first bytes of
//! the next request itself, reads and checks the head ([`super::head`]),
//! and only then hands the connection to Pingora, with the head as the
//! session's first bytes; meanwhile the connection holds its socket, its
//! write buffer and this module's small future (docs/performance.md,
//! "Memory").

use super::head::{self, HeadStatus, Rejection};
use super::stream::RequestStream;
use super::{Limits, LimitsSource};
use crate::observe::request_id;
use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A head is read into a buffer of this size first, growing up to the
/// configured limit only for large heads (Pingora's initial size).
const INITIAL_HEAD_BUFFER: usize = 4096;
/// How long writing a refusal to a client may take.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a new connection may take to send its first request when
/// keepalive is off (Pingora's own read timeout).
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an HTTP/2 connection may sit idle when keepalive is off
/// (Pingora's HTTP/1 default, as for `keepalive_timeout_seconds`).
const H2_IDLE_WITHOUT_KEEPALIVE: Duration = Duration::from_secs(60);

/// How long a client connection may sit idle before and between requests,
/// and how many requests it may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveSettings {
    /// `None`: close after each response.
    pub idle_timeout: Option<Duration>,
    /// `None`: unlimited.
    pub request_limit: Option<u32>,
    /// Once the server stops, how long an idle connection is kept for a
    /// request that may be on its way.
    pub drain_idle: Duration,
}

/// Wraps an HTTP application (tollgate's proxy) as the listening service's
/// application, taking over Pingora's HTTP/1 connection loop (plain and
/// TLS) and its HTTP/2 loop ([`super::h2`]). Custom protocols go to
/// Pingora.
pub struct LeanKeepalive<A> {
    inner: Arc<A>,
    settings: KeepaliveSettings,
    connections: Arc<ConnectionGauge>,
    limits: Arc<dyn LimitsSource>,
    h2c: Vec<std::net::SocketAddr>,
}

impl<A> LeanKeepalive<A> {
    pub fn new(
        inner: A,
        settings: KeepaliveSettings,
        connections: Arc<ConnectionGauge>,
        limits: Arc<dyn LimitsSource>,
    ) -> Self {
        LeanKeepalive {
            inner: Arc::new(inner),
            settings,
            connections,
            limits,
            h2c: Vec::new(),
        }
    }

    /// Pingora counts reuses, not requests (a limit of N there serves N+1),
    /// and has no keepalive-off switch that survives its reading the
    /// request's own `Connection` header: zero reuses is both.
    fn reuses(&self) -> Option<u32> {
        match self.settings.idle_timeout {
            None => Some(0),
            Some(_) => self.settings.request_limit.map(|n| n.saturating_sub(1)),
        }
    }

    /// An HTTP/2 connection carries concurrent streams even with keepalive
    /// off, so it closes after the default idle time instead.
    fn h2_settings(&self) -> super::h2::H2Settings {
        super::h2::H2Settings {
            idle_timeout: self
                .settings
                .idle_timeout
                .unwrap_or(H2_IDLE_WITHOUT_KEEPALIVE),
            request_limit: self.settings.request_limit,
        }
    }

    /// Pingora's read timeout for a request header, in whole seconds where 0
    /// means "forever": rounded up, never 0.
    fn header_timeout_secs(&self) -> u64 {
        let t = self.settings.idle_timeout.unwrap_or(FIRST_REQUEST_TIMEOUT);
        (t.as_secs() + u64::from(t.subsec_nanos() > 0)).max(1)
    }
}

/// What a client sends first on an HTTP/2 connection without TLS.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<A> LeanKeepalive<A> {
    /// Listeners that also take HTTP/2 by prior knowledge (`h2c: true`).
    pub fn with_h2c(mut self, listeners: Vec<std::net::SocketAddr>) -> Self {
        self.h2c = listeners;
        self
    }

    fn on_h2c_listener(&self, stream: &Stream) -> bool {
        if self.h2c.is_empty() {
            return false;
        }
        let Some(local) = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())
        else {
            return false;
        };
        self.h2c
            .iter()
            .any(|l| l.port() == local.port() && (l.ip().is_unspecified() || l.ip() == local.ip()))
    }
}

impl<A: HttpServerApp> LeanKeepalive<A> {
    /// Whether this loop serves the connection: HTTP/1, over TLS or not.
    /// HTTP/2 (by ALPN, and h2c, see [`read_preface`]) goes to
    /// [`super::h2`]; custom protocols to Pingora.
    fn serves(&self, stream: &Stream) -> bool {
        matches!(stream.selected_alpn_proto(), None | Some(ALPN::H1))
            && !self.inner.server_options().is_some_and(|o| o.force_custom)
    }
}

/// On an `h2c` listener: reads the connection's first bytes into the
/// stash for as long as they could be the HTTP/2 preface. `Some(true)`:
/// it is the preface; `Some(false)`: HTTP/1 (or silence), whose bytes
/// stay in the stash for the loop; `None`: the client left. (Pingora's
/// own peek reads exactly 24 bytes and loses them if fewer come: a short
/// HTTP/1.0 request would wait out the idle timeout and then be dropped.)
async fn read_preface(conn: &mut RequestStream, wait: Duration) -> Option<bool> {
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        let have = conn.stash.len().min(H2_PREFACE.len());
        if conn.stash[..have] != H2_PREFACE[..have] {
            return Some(false);
        }
        if have == H2_PREFACE.len() {
            return Some(true);
        }
        if conn.stash.capacity() == conn.stash.len() {
            conn.stash.reserve(INITIAL_HEAD_BUFFER);
        }
        let read = poll_fn(|cx| {
            let mut buf = ReadBuf::uninit(conn.stash.spare_capacity_mut());
            match Pin::new(&mut conn.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        });
        tokio::select! {
            read = read => match read {
                Ok(0) | Err(_) => return None,
                // SAFETY: `n` bytes of the spare capacity were written.
                Ok(n) => unsafe { conn.stash.set_len(conn.stash.len() + n) },
            },
            () = &mut deadline => return Some(false),
        }
    }
}

#[async_trait]
impl<A> ServerApp for LeanKeepalive<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _open = self.connections.open();
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // Boxed: an idle HTTP/1 connection's future would carry it too.
            Box::pin(super::h2::serve(
                &self.inner,
                stream,
                shutdown,
                self.h2_settings(),
                &*self.limits,
            ))
            .await;
            return None;
        }
        if !self.serves(&stream) {
            return ServerApp::process_new(&self.inner, stream, shutdown).await;
        }
        // With keepalive off there is only a first request to wait for.
        let wait = self.settings.idle_timeout.unwrap_or(FIRST_REQUEST_TIMEOUT);
        let mut idle = IdleTimer::new(wait);
        let mut stopping = Stopping::new(shutdown);
        let mut carried: Option<HttpPersistentSettings> = None;
        let tls = stream.get_ssl_digest().is_some();
        let h2c = !tls && self.on_h2c_listener(&stream);
        let mut conn = Box::new(RequestStream::new(stream));
        if tls {
            conn.gather_writes();
        }
        if h2c {
            match Box::pin(read_preface(&mut conn, wait)).await {
                // The HTTP/2 loop reads the preface back from the stash
                // (the stream passes everything through from now on).
                Some(true) => {
                    conn.open_tunnel();
                    let settings = self.h2_settings();
                    Box::pin(super::h2::serve(
                        &self.inner,
                        conn,
                        shutdown,
                        settings,
                        &*self.limits,
                    ))
                    .await;
                    return None;
                }
                Some(false) => {}
                None => return None,
            }
        }
        loop {
            // A pipelined request may already be here; otherwise wait.
            if conn.stash.is_empty() {
                let drain_idle = self.settings.drain_idle;
                if !next_request_arrives(&mut conn, tls, &mut idle, &mut stopping, drain_idle).await
                {
                    return None;
                }
            } else if conn.finished() {
                // A pipelined request that is already here is answered even
                // while stopping (with `Connection: close`).
                return None;
            }
            let limits = &self.limits.limits();
            let head = match read_head(&mut conn, limits).await {
                HeadRead::Head(head) => head,
                // Readiness left over from the last read, not a new
                // request: wait again (the read that found nothing reset it).
                HeadRead::NothingYet => continue,
                HeadRead::Closed => return None,
                HeadRead::Refused(rejection) => {
                    // Boxed, as the rare paths below: an inline future makes
                    // every connection's future, idle ones too, that large.
                    Box::pin(refuse(&mut conn, rejection)).await;
                    return None;
                }
            };
            let prefix = match head.rewritten {
                Some(rewritten) => {
                    conn.stash.advance(head.len);
                    rewritten
                }
                // Usually the head is all there is: hand the buffer over
                // whole. Splitting it would make it a shared buffer, one
                // more allocation and reference count per request.
                None if conn.stash.len() == head.len => std::mem::take(&mut conn.stash),
                None => conn.stash.split_to(head.len),
            };
            conn.begin(head.framing, head.facts);
            // The session is built in a block of its own: a local whose
            // scope spans an await is kept in this future even once moved,
            // and Pingora's session is ~1 KB that every idle connection
            // would carry.
            let request = {
                let mut session = ServerSession::new_http1(conn);
                match carried.take() {
                    // Pingora's per-connection state, e.g. the requests left.
                    Some(settings) => settings.apply_to_session(&mut session),
                    None => session.set_keepalive_reuses_remaining(self.reuses()),
                }
                // The head is already here; Pingora parses it without a read.
                session.set_pipelined_prefix(prefix);
                session.set_keepalive(Some(self.header_timeout_secs()));
                // Bounds each wait for the next piece of a request body.
                session.set_read_timeout(Some(limits.body_timeout));
                self.inner.process_new_http(session, shutdown)
            };
            let reused = request.await?;
            let stream;
            (stream, carried) = reused.consume();
            conn = stream.into_any().downcast::<RequestStream>().ok()?;
            if !conn.reusable() {
                Box::pin(conn.linger()).await;
                return None;
            }
            conn.shrink();
        }
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

/// How reading a request head ended.
enum HeadRead {
    Head(head::Head),
    /// No byte of a request had arrived after all.
    NothingYet,
    /// The client closed the connection or the socket failed.
    Closed,
    Refused(Rejection),
}

/// Reads until the stash holds a complete, acceptable head. The whole head
/// must arrive within `header_timeout` of its first byte, which is already
/// there when this is called.
async fn read_head(conn: &mut RequestStream, limits: &Limits) -> HeadRead {
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    // Bytes already parsed without completing the head: a head trickled
    // in is parsed again only when a line has been completed (or the
    // limits reached), not once per read.
    let mut checked = 0;
    loop {
        let worth_parsing = checked == 0
            || conn.stash.len() >= limits.max_header_bytes
            || conn.stash.len() > limits.max_uri_bytes
            || conn.stash[checked.min(conn.stash.len())..].contains(&b'\n');
        if !conn.stash.is_empty() && worth_parsing {
            match head::check(&conn.stash, limits) {
                HeadStatus::Partial => checked = conn.stash.len(),
                HeadStatus::Complete(head) => return HeadRead::Head(head),
                HeadStatus::Rejected(rejection) => return HeadRead::Refused(rejection),
            }
        }
        let room = limits.max_header_bytes.saturating_sub(conn.stash.len());
        let conn_is_empty = conn.stash.is_empty();
        if conn.stash.capacity() == 0 {
            conn.stash = BytesMut::with_capacity(INITIAL_HEAD_BUFFER.min(limits.max_header_bytes));
        } else if conn.stash.capacity() == conn.stash.len() {
            // A head larger than the first buffer goes straight to the
            // limit: one copy, and no trail of half-sized buffers left
            // behind in the allocator by many large heads at once.
            conn.stash.reserve(room);
        }
        let read = poll_fn(|cx| {
            let spare = conn.stash.spare_capacity_mut();
            let limit = spare.len().min(room);
            let mut buf = ReadBuf::uninit(&mut spare[..limit]);
            match Pin::new(&mut conn.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        });
        // The timer is made only for a head that needs a second read.
        let outcome = {
            tokio::pin!(read);
            match poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
                Poll::Ready(r) => Some(r),
                // The deadline runs from a head's first byte.
                Poll::Pending if conn_is_empty => return HeadRead::NothingYet,
                Poll::Pending => {
                    // The head's first byte came with the read before this
                    // one: its deadline starts now.
                    let timer = timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(limits.header_timeout)));
                    tokio::select! {
                        r = read => Some(r),
                        () = timer.as_mut() => None,
                    }
                }
            }
        };
        match outcome {
            None => return HeadRead::Refused(crate::error::GatewayError::RequestTimeout.into()),
            Some(Ok(0)) | Some(Err(_)) => return HeadRead::Closed,
            // SAFETY: `n` bytes of the spare capacity were written.
            Some(Ok(n)) => unsafe { conn.stash.set_len(conn.stash.len() + n) },
        }
    }
}

/// Answers a refused head with the gateway's JSON error, records it, and
/// closes the connection: what follows a bad head cannot be trusted to be
/// framed as the head says.
async fn refuse(conn: &mut RequestStream, rejection: Rejection) {
    let id = request_id::generate();
    let id = std::str::from_utf8(id.as_bytes()).unwrap_or("");
    let peer = conn
        .inner
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
    crate::observe::rejected_before_routing(peer, rejection.error, id);
    let response = rejection
        .error
        .raw_response(id, rejection.head_only, rejection.allow);
    let write = async {
        conn.inner.write_all(&response).await?;
        conn.inner.flush().await
    };
    if tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write)
        .await
        .is_ok()
    {
        conn.linger().await;
    }
}

/// Open client connections, and the most open at once lately:
/// what [`crate::memory::ReturnMemory`] decides by.
#[derive(Debug, Default)]
pub struct ConnectionGauge {
    open: AtomicUsize,
    high: AtomicUsize,
}

impl ConnectionGauge {
    fn open(&self) -> OpenConnection<'_> {
        let now = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.high.fetch_max(now, Ordering::Relaxed);
        OpenConnection(self)
    }

    pub fn current(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The most connections open at once since the last [`Self::reset_high`].
    pub fn high(&self) -> usize {
        self.high.load(Ordering::Relaxed).max(self.current())
    }

    /// Starts a new high-water period at the current count.
    pub fn reset_high(&self) {
        self.high.store(self.current(), Ordering::Relaxed);
    }
}

/// Counts a connection as open until dropped, on every way out.
struct OpenConnection<'a>(&'a ConnectionGauge);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection's idle timer. One tokio timer lives as long as the
/// connection and is pushed back only when it would fire too early, by an
/// extra eighth of the timeout: a busy connection touches it every few
/// seconds instead of registering a timer per request. A connection is
/// thus closed between `timeout` and `timeout * 9/8` after it fell idle.
struct IdleTimer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        IdleTimer {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout + timeout / 8)),
        }
    }

    fn arm(&mut self) {
        let earliest = Instant::now() + self.timeout;
        if self.sleep.deadline() < earliest {
            self.sleep.as_mut().reset(earliest + self.timeout / 8);
        }
    }
}

/// The connection's wait for a graceful stop, registered on the shared
/// shutdown channel once per connection rather than once per request:
/// registering a waiter and unlinking it again took two locks on that
/// channel per request (~1,000 instructions, callgrind), and re-polling a
/// registered waiter still takes one.
///
/// The waiter keeps the waker of the connection's task, which stays valid
/// for the task's life, so a stop wakes the task even while it is busy in
/// a request; each wait then only reads the channel's version (an atomic
/// load) to see whether a stop was announced.
struct Stopping {
    watch: ShutdownWatch,
    waiter: Pin<Box<dyn Future<Output = ()> + Send>>,
    registered: bool,
}

impl Stopping {
    fn new(shutdown: &ShutdownWatch) -> Self {
        let mut waiter = shutdown.clone();
        Stopping {
            watch: shutdown.clone(),
            waiter: Box::pin(async move {
                // A dropped sender means the server is going away as well.
                let _ = waiter.wait_for(|stopping| *stopping).await;
            }),
            registered: false,
        }
    }

    /// Whether the server has announced a stop. Pingora only ever sends
    /// `true`, so an unseen version is read (under the channel's lock) only
    /// once a stop is under way.
    pub(super) fn announced(&self) -> bool {
        match self.watch.has_changed() {
            Ok(false) => false,
            Ok(true) => *self.watch.borrow(),
            Err(_) => true,
        }
    }

    fn poll_stop(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.announced() {
            return Poll::Ready(());
        }
        if !self.registered {
            if self.waiter.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            self.registered = true;
        }
        Poll::Pending
    }
}

/// Waits until the client sends something (or closes), without reading it.
/// False when the connection should just be closed: idle too long, idle
/// for `drain_idle` once the server is stopping, or the socket failed.
///
/// A zero-length read waits for readability and then returns at once: it
/// consumes nothing, so Pingora's parser reads the request as usual. It
/// costs one cheap system call per request; tokio remembers readiness, so
/// bytes that are already there are not waited for.
async fn next_request_arrives(
    conn: &mut RequestStream,
    tls: bool,
    idle: &mut IdleTimer,
    stopping: &mut Stopping,
    drain_idle: Duration,
) -> bool {
    idle.arm();
    let mut readable = poll_fn(|cx| {
        if !tls {
            let mut nothing = ReadBuf::new(&mut []);
            return Pin::new(&mut conn.inner).poll_read(cx, &mut nothing);
        }
        // A TLS stream has no readiness to wait for without reading: its
        // library may already hold the request (it came with the
        // handshake), and an empty read never returns. The bytes go to
        // the stash, where the head is read from.
        if conn.stash.capacity() == conn.stash.len() {
            conn.stash.reserve(INITIAL_HEAD_BUFFER);
        }
        let mut buf = ReadBuf::uninit(conn.stash.spare_capacity_mut());
        match Pin::new(&mut conn.inner).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()));
                }
                // SAFETY: `n` bytes of the spare capacity were written.
                unsafe { conn.stash.set_len(conn.stash.len() + n) };
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    });
    tokio::select! {
        ready = &mut readable => return ready.is_ok(),
        () = idle.sleep.as_mut() => return false,
        () = poll_fn(|cx| stopping.poll_stop(cx)) => {}
    }
    // Stopping: closing now could cut a request the client is sending at
    // this moment. Waiting for `drain_idle` of silence lets it arrive (its
    // answer closes the connection); the idle timeout still applies.
    // Boxed: only a stopping process pays for the extra timer.
    super::drain::start_draining();
    Box::pin(async move {
        tokio::select! {
            ready = readable => ready.is_ok(),
            () = idle.sleep.as_mut() => false,
            () = tokio::time::sleep(drain_idle) => false,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::apps::ReusedHttpStream;

    /// An application that is never reached: the connection below stays
    /// idle.
    struct Nothing;

    #[async_trait]
    impl HttpServerApp for Nothing {
        async fn process_new_http(
            self: &Arc<Self>,
            _session: ServerSession,
            _shutdown: &ShutdownWatch,
        ) -> Option<ReusedHttpStream> {
            None
        }
    }

    #[test]
    fn a_connections_future_stays_small() {
        // Every open connection holds this future, idle or not, sized for
        // its largest state: a buffer or a timer kept inline in any state
        // costs every idle client that much (docs/performance.md, Memory).
        let app = Arc::new(LeanKeepalive::new(
            Nothing,
            KeepaliveSettings {
                idle_timeout: Some(Duration::from_secs(60)),
                request_limit: None,
                drain_idle: super::super::drain::DEFAULT_DRAIN_IDLE,
            },
            Arc::new(ConnectionGauge::default()),
            Arc::new(Limits::default()),
        ));
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let stream: Stream = Box::new(std::io::Cursor::new(Vec::<u8>::new()));
        let future = app.process_new(stream, &shutdown);
        let size = std::mem::size_of_val(&*future);
        eprintln!("process_new future: {size} bytes");
        assert!(size <= 768, "{size} bytes");
    }

    #[tokio::test]
    async fn the_idle_timer_is_never_early_and_rarely_reset() {
        let timeout = Duration::from_secs(8);
        let mut idle = IdleTimer::new(timeout);
        let before = Instant::now();
        idle.arm();
        let deadline = idle.sleep.deadline();
        assert!(deadline >= before + timeout, "would close early");
        assert!(deadline <= Instant::now() + timeout + timeout / 8);
        idle.arm();
        assert_eq!(idle.sleep.deadline(), deadline, "re-armed within its slack");
    }
}
