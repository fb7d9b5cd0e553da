//! HTTP/2 client connections: tollgate's own loop over Pingora's HTTP/2
//! sessions, so that what holds for an HTTP/1 connection holds for an
//! HTTP/2 one too.
//!
//! Pingora's loop (`accept_downstream_sessions`, crate-private) has an idle
//! timeout and a graceful stop, but no request limit, and its HTTP/2
//! session ignores read timeouts (`set_read_timeout` is a no-op for h2 and
//! its body read waits forever). This loop adds:
//!
//! - `keepalive_request_limit`: after that many streams the connection is
//!   closed gracefully (GOAWAY; streams already opened are answered);
//! - `limits.body_timeout`: a request whose body stops arriving for that
//!   long is ended. Pingora's session cannot be interrupted inside a read,
//!   so the stream's task is dropped, which resets the stream
//!   (`RST_STREAM CANCEL`, as nginx does), and the request is logged as
//!   408 `request_timeout` from its context ([`abandoned`]).
//!
//! Streams run as tasks of their own, as in Pingora's loop; the connection
//! task only accepts them and drives the connection.

use super::{Limits, LimitsSource};
use pingora::apps::HttpServerApp;
use pingora::protocols::http::v2::server::{self as v2, H2Accept, HttpSession};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Stream};
use pingora::server::ShutdownWatch;
use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Streams a client may have refused (malformed requests) before the
/// connection is closed: Pingora's own budget, which its public accept
/// function leaves to the caller's loop.
const MALFORMED_STREAM_BUDGET: usize = 32;

/// Streams a client may still open once told to stop at its request limit:
/// those in flight before it saw the GOAWAY (at most the 100 concurrent
/// streams of Pingora's `default_h2_options`, which tollgate uses, with
/// room to spare; raise this with that limit).
const GOAWAY_ALLOWANCE: u32 = 200;

/// What an HTTP/2 connection may do.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    /// Closed after this long without an open stream.
    pub idle_timeout: Duration,
    /// Closed gracefully after this many streams.
    pub request_limit: Option<u32>,
}

/// Serves one HTTP/2 connection (after TLS with ALPN `h2`, or a stream
/// whose first bytes are the h2c preface) until it closes.
pub async fn serve<A>(
    app: &Arc<A>,
    stream: Stream,
    shutdown: &ShutdownWatch,
    settings: H2Settings,
    limits: &dyn LimitsSource,
) where
    A: HttpServerApp + Send + Sync + 'static,
{
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });
    let mut conn = match v2::handshake(stream, app.h2_options()).await {
        Ok(conn) => conn,
        Err(e) => {
            log::debug!("HTTP/2 handshake with a client failed: {e}");
            return;
        }
    };
    let streams = Arc::new(OpenStreams::default());
    let mut stop = shutdown.clone();
    let mut closing = false;
    let mut accepted: u32 = 0;
    let mut malformed = 0usize;
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.changed(), if !closing => {
                conn.graceful_shutdown();
                closing = true;
                continue;
            }
            // After GOAWAY this goes on: streams the client opened before
            // it saw the GOAWAY are still accepted, and driving the
            // connection sends the final GOAWAY once they are done.
            next = HttpSession::from_h2_conn(&mut conn, Arc::clone(&digest)) => next,
            // Idle with nothing in flight: dropping the connection closes
            // it at once (a graceful close could wait on a dead peer).
            () = streams.idle_for(settings.idle_timeout) => return,
        };
        let session = match next {
            Ok(Some(H2Accept::Session(session))) => session,
            Ok(Some(H2Accept::Rejected)) => {
                malformed += 1;
                if malformed >= MALFORMED_STREAM_BUDGET {
                    log::warn!("closing an HTTP/2 connection after {malformed} malformed requests");
                    return;
                }
                continue;
            }
            Ok(None) => return,
            // Clients often just close the socket; nothing worth a warning.
            Err(e) => {
                log::debug!("HTTP/2 connection ended: {e}");
                return;
            }
        };
        accepted = accepted.saturating_add(1);
        if let Some(limit) = settings.request_limit {
            if !closing && accepted >= limit {
                conn.graceful_shutdown();
                closing = true;
            } else if accepted > limit.saturating_add(GOAWAY_ALLOWANCE) {
                // The final GOAWAY waits for the client to answer a PING;
                // one that never does could go on opening streams.
                log::debug!("closing an HTTP/2 connection that ignores its GOAWAY");
                return;
            }
        }
        let watch = (!session.is_body_empty()).then(|| BodyClock::new(&session, limits.limits()));
        let open = streams.open();
        let app = Arc::clone(app);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // Held for the stream's life: the connection is busy meanwhile.
            let _open = open;
            let request = app.process_new_http(ServerSession::new_http2(session), &shutdown);
            match watch {
                None => {
                    request.await;
                }
                Some(clock) => BODY.scope(clock, within_body_timeout(request)).await,
            }
        });
    }
}

/// Streams in progress on one connection, for its idle timeout.
#[derive(Default)]
struct OpenStreams {
    count: AtomicUsize,
    none_left: Notify,
}

impl OpenStreams {
    fn open(self: &Arc<Self>) -> OpenStream {
        self.count.fetch_add(1, Ordering::AcqRel);
        OpenStream(Arc::clone(self))
    }

    /// Ends after `timeout` during which no stream was open.
    async fn idle_for(&self, timeout: Duration) {
        // A stream that ends between the load and the wait leaves a permit
        // (`notify_one`), so the wait still ends.
        while self.count.load(Ordering::Acquire) != 0 {
            self.none_left.notified().await;
        }
        tokio::time::sleep(timeout).await;
    }
}

struct OpenStream(Arc<OpenStreams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_left.notify_one();
        }
    }
}

tokio::task_local! {
    /// The body clock of the request a stream task serves; set only for
    /// HTTP/2 requests that have a body.
    static BODY: BodyClock;
}

/// When the request body last moved, and what the access log needs of the
/// request should the clock run out (its session is gone by then).
struct BodyClock {
    timeout: Duration,
    /// When the body last moved, or the gateway began to want it; `None`
    /// while the gateway is not reading it (routing, authenticating,
    /// connecting upstream, between attempts), which is not the client's
    /// time to be blamed for.
    last: Cell<Option<Instant>>,
    done: Cell<bool>,
    timed_out: Cell<bool>,
    /// Body bytes read so far.
    read: Cell<usize>,
    method: http::Method,
    uri: http::Uri,
    host: Option<http::HeaderValue>,
}

impl BodyClock {
    fn new(session: &HttpSession, limits: Limits) -> Self {
        let head = session.req_header();
        BodyClock {
            timeout: limits.body_timeout,
            last: Cell::new(None),
            done: Cell::new(false),
            timed_out: Cell::new(false),
            read: Cell::new(0),
            // Reference counts, not copies: these share the head's bytes.
            method: head.method.clone(),
            uri: head.uri.clone(),
            host: head.headers.get(http::header::HOST).cloned(),
        }
    }
}

/// Called for each piece of a request body as it is read, with the body
/// bytes read so far; `end` once the body is complete. A no-op outside an
/// HTTP/2 stream with a body (as are the two below).
pub fn body_progress(read: usize, end: bool) {
    let _ = BODY.try_with(|clock| {
        clock.read.set(read);
        if end {
            clock.done.set(true);
        } else {
            clock.last.set(Some(Instant::now()));
        }
    });
}

/// An attempt at the upstream is about to forward the body: the clock
/// runs from now.
pub fn body_wanted() {
    let _ = BODY.try_with(|clock| clock.last.set(Some(Instant::now())));
}

/// An attempt failed: the body is not read until the next one starts.
pub fn body_not_wanted() {
    let _ = BODY.try_with(|clock| clock.last.set(None));
}

/// What the access log needs of a request whose session is gone.
pub struct AbandonedHead<'a> {
    pub method: &'a http::Method,
    pub path: &'a [u8],
    pub host: &'a [u8],
    /// Body bytes read before it stopped.
    pub bytes_in: usize,
}

/// The request this task serves, if it is being ended because its body
/// stopped arriving: its method, path and host, for the access log.
pub fn abandoned<R>(record: impl FnOnce(AbandonedHead) -> R) -> Option<R> {
    BODY.try_with(|clock| {
        if !clock.timed_out.get() {
            return None;
        }
        let host = match (&clock.host, clock.uri.authority()) {
            (Some(host), _) => host.as_bytes(),
            (None, Some(authority)) => authority.as_str().as_bytes(),
            (None, None) => b"",
        };
        Some(record(AbandonedHead {
            method: &clock.method,
            path: clock.uri.path().as_bytes(),
            host,
            bytes_in: clock.read.get(),
        }))
    })
    .ok()
    .flatten()
}

/// Runs `request` (inside the [`BODY`] scope) until it ends, or until its
/// body has not moved for the timeout. The timer is not pushed back per
/// piece of body: when it fires early it sleeps again until the body's
/// latest deadline.
async fn within_body_timeout(request: impl Future) {
    let watchdog = async {
        loop {
            let (last, timeout, done) =
                BODY.with(|clock| (clock.last.get(), clock.timeout, clock.done.get()));
            if done {
                return std::future::pending::<()>().await;
            }
            let Some(last) = last else {
                // Not reading: look again a timeout later.
                tokio::time::sleep(timeout).await;
                continue;
            };
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                BODY.with(|clock| clock.timed_out.set(true));
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    };
    tokio::select! {
        _ = request => {}
        // Dropping the request (inside the scope, so its context still sees
        // the clock) resets the stream and logs it.
        () = watchdog => {}
    }
}
