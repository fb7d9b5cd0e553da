//! The client connection as Pingora sees it: one request message at a time.
//!
//! Pingora's HTTP/1 session reads whatever the socket has. Bytes past the
//! end of the current request (a pipelined request) are then either
//! dropped with the connection or, when they arrive while the request is
//! being proxied, fail it ("Sent data after end of body"). [`RequestStream`]
//! gives Pingora only the bytes of the current message (the framing comes
//! from the head checked in [`super::head`]) and keeps the rest for the
//! connection loop, which serves pipelined requests in order.

use super::framing::Framing;
use super::head::HeadFacts;
use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Most bytes of following requests held while the current one is served;
/// past this the client is not read until the current request is done.
const MAX_STASH: usize = 64 * 1024;
/// A connection closed with unread request bytes is first drained, so the
/// client reads the response instead of a reset: at most this much, for at
/// most this long (nginx's lingering close).
const LINGER_BYTES: usize = 64 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(5);
/// Writes to a TLS client are gathered up to one TLS record's worth.
const TLS_RECORD: usize = 16 * 1024;

/// A client connection that yields one request message at a time.
pub struct RequestStream {
    pub(super) inner: Stream,
    /// Bytes received and not given to Pingora: the rest of a head being
    /// read, or the start of the next request.
    pub(super) stash: BytesMut,
    framing: Framing,
    facts: HeadFacts,
    /// Set when a 101 turned the connection into a tunnel.
    tunnel: AtomicBool,
    /// When the route's `timeout` ends the tunnel, however busy: set at
    /// the 101 through a shared reference, as `tunnel` is.
    tunnel_deadline: OnceLock<Instant>,
    /// That deadline's timer, armed by the tunnel's first read or write.
    tunnel_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The client closed its side while requests were still stashed.
    eof: bool,
    /// The end of the current message is unknown; never reuse.
    poisoned: bool,
    /// On TLS, what was written and not yet flushed. Pingora writes a
    /// response head and its body separately and flushes at the end; over
    /// plain TCP its socket buffer joins them, but over TLS each write was
    /// a record of its own, encrypted and framed separately (OpenSSL: some
    /// 8,000 instructions each). `None` on plain connections.
    pending: Option<Vec<u8>>,
}

impl std::fmt::Debug for RequestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestStream")
            .field("inner", &self.inner)
            .field("stashed", &self.stash.len())
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl RequestStream {
    pub fn new(inner: Stream) -> Self {
        RequestStream {
            inner,
            stash: BytesMut::new(),
            framing: Framing::Length(0),
            facts: HeadFacts::default(),
            tunnel: AtomicBool::new(false),
            tunnel_deadline: OnceLock::new(),
            tunnel_timer: None,
            eof: false,
            poisoned: false,
            pending: None,
        }
    }

    /// Gathers writes until a flush (TLS connections).
    pub fn gather_writes(&mut self) {
        self.pending = Some(Vec::new());
    }

    /// Writes out what was gathered.
    fn poll_write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(pending) = self.pending.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while !pending.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    pending.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Kept for the next response; `shrink` frees it when idle.
        pending.clear();
        Poll::Ready(Ok(()))
    }

    /// Starts a new message whose head has been taken from the stash.
    pub fn begin(&mut self, framing: Framing, facts: HeadFacts) {
        self.framing = framing;
        self.facts = facts;
    }

    /// What the head check learned about the current request.
    pub fn facts(&self) -> HeadFacts {
        self.facts
    }

    /// Lets every further byte through, both ways: the upstream accepted an
    /// upgrade. Called through a shared reference from the proxy.
    pub fn open_tunnel(&self) {
        self.tunnel.store(true, Ordering::Relaxed);
    }

    /// Ends the tunnel at `deadline`: its reads and writes fail from then
    /// on, which ends Pingora's relaying both ways. Pingora re-arms its
    /// read timeouts on traffic, so they cannot bound a busy tunnel.
    pub fn end_tunnel_at(&self, deadline: Instant) {
        let _ = self.tunnel_deadline.set(deadline);
    }

    /// Fails once the tunnel's deadline has passed; until then the timer
    /// wakes the task that relays the tunnel when it does.
    fn poll_tunnel_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(&deadline) = self.tunnel_deadline.get() else {
            return Ok(());
        };
        let timer = self
            .tunnel_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the route's timeout ended the tunnel",
            )),
            Poll::Pending => Ok(()),
        }
    }

    /// Whether another request may follow on this connection.
    pub fn reusable(&self) -> bool {
        !self.poisoned && !self.tunnel.load(Ordering::Relaxed) && self.framing.is_done()
    }

    /// Whether the client has closed its side and nothing is left to serve.
    pub fn finished(&self) -> bool {
        self.eof && self.stash.is_empty()
    }

    /// Releases the stash's memory once it is empty, so an idle connection
    /// holds no buffer.
    pub fn shrink(&mut self) {
        if self.stash.is_empty() && self.stash.capacity() > 0 {
            self.stash = BytesMut::new();
        }
        if let Some(pending) = self.pending.as_mut() {
            if pending.is_empty() && pending.capacity() > 0 {
                *pending = Vec::new();
            }
        }
    }

    fn passthrough(&self) -> bool {
        matches!(self.framing, Framing::Unbounded) || self.tunnel.load(Ordering::Relaxed)
    }

    /// Reads past the end of the message: the client's next request, or
    /// its close. Pingora asks for this to notice a client that hangs up
    /// during a request; the bytes are kept for the loop and Pingora waits.
    fn poll_past_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.eof {
                // More requests are waiting: this is not a hang-up yet.
                return if self.stash.is_empty() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            if self.stash.len() >= MAX_STASH {
                return Poll::Pending;
            }
            // Read onto the stack first: Pingora asks this of every request
            // while it is proxied, and nearly always nothing is there, so
            // the stash allocates only for bytes that did arrive.
            let mut landing = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            let mut buf = ReadBuf::uninit(&mut landing);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    if buf.filled().is_empty() {
                        self.eof = true;
                        continue;
                    }
                    self.stash.extend_from_slice(buf.filled());
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Lingering close: stop writing, then read and discard what the client
    /// still sends, within bounds, so that closing with unread bytes does
    /// not reset the connection under the response.
    pub async fn linger(&mut self) {
        let gathered = std::future::poll_fn(|cx| self.poll_write_pending(cx));
        let _ = tokio::time::timeout(LINGER_TIME, gathered).await;
        let unread = !(self.framing.is_done() && self.stash.is_empty());
        let inner = &mut self.inner;
        // Bounded as a whole: flushing the last response can itself wait on
        // a client that reads nothing.
        let close = async {
            inner.shutdown().await;
            if !unread {
                return;
            }
            // On the heap: a 4 KiB array here would be part of every
            // connection's future, idle or not (futures are sized for their
            // largest state), and cost each idle client 4 KiB.
            let mut sink = vec![0u8; 4096];
            let mut drained = 0;
            while drained < LINGER_BYTES {
                match inner.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => drained += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, close).await;
    }
}

impl AsyncRead for RequestStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.passthrough() {
            if this.tunnel.load(Ordering::Relaxed) {
                this.poll_tunnel_deadline(cx)?;
            }
            if !this.stash.is_empty() {
                let n = this.stash.len().min(buf.remaining());
                buf.put_slice(&this.stash[..n]);
                this.stash.advance(n);
                return Poll::Ready(Ok(()));
            }
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.framing.is_done() {
            return this.poll_past_end(cx);
        }
        if !this.stash.is_empty() {
            let offered = this.stash.len().min(buf.remaining());
            let n = match this.framing.take(&this.stash[..offered]) {
                Ok(n) => n,
                Err(_) => {
                    this.poison();
                    offered
                }
            };
            buf.put_slice(&this.stash[..n]);
            this.stash.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let fresh = &buf.filled()[before..];
        let n = match this.framing.take(fresh) {
            Ok(n) => n,
            Err(_) => {
                this.poison();
                fresh.len()
            }
        };
        if n < fresh.len() {
            // The next request began in the same read: keep it for later.
            this.stash.extend_from_slice(&fresh[n..]);
            buf.set_filled(before + n);
        }
        Poll::Ready(Ok(()))
    }
}

impl RequestStream {
    /// The message's framing cannot be followed: hand everything to
    /// Pingora, whose parser reports the error, and never reuse.
    fn poison(&mut self) {
        self.poisoned = true;
        self.framing = Framing::Unbounded;
    }
}

impl AsyncWrite for RequestStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // A tunnel's bytes go out as they come (nothing gathers them into
        // a response and flushes it).
        if this.tunnel.load(Ordering::Relaxed) {
            this.poll_tunnel_deadline(cx)?;
            if this.poll_write_pending(cx)?.is_pending() {
                return Poll::Pending;
            }
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let Some(pending) = this.pending.as_mut() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        // The first write (a response head) waits for the next one (the
        // start of its body) or a flush; what follows goes out with it at
        // once, so a body that trickles is not held back.
        if pending.is_empty() && buf.len() < TLS_RECORD {
            pending.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        let accepted = if pending.len() + buf.len() <= TLS_RECORD {
            pending.extend_from_slice(buf);
            buf.len()
        } else {
            0
        };
        match this.poll_write_pending(cx)? {
            // Gathered bytes are written by the next write or flush.
            Poll::Pending if accepted > 0 => Poll::Ready(Ok(accepted)),
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) if accepted > 0 => Poll::Ready(Ok(accepted)),
            Poll::Ready(()) => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.poll_write_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.poll_write_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.pending.is_some() {
            // Gathered like single writes (is_write_vectored says no).
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.pending.is_none() && self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for RequestStream {
    /// Pingora closes a connection this way when it will not be reused,
    /// including after a gateway-made response to a request whose body
    /// was never read.
    async fn shutdown(&mut self) {
        self.linger().await;
    }
}

impl UniqueID for RequestStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for RequestStream {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for RequestStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for RequestStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for RequestStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for RequestStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if self.stash.is_empty() {
            return self.inner.try_peek(buf).await;
        }
        let n = self.stash.len().min(buf.len());
        buf[..n].copy_from_slice(&self.stash[..n]);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_tunnel_ends_at_its_deadline_however_busy() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut stream = RequestStream::new(Box::new(server));
        stream.open_tunnel();
        stream.end_tunnel_at(Instant::now() + Duration::from_millis(200));
        // Until then bytes pass both ways.
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        stream.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // With nothing to read, the read ends at the deadline.
        let ended = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("the read outlived the deadline");
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::TimedOut);
        // From then on nothing passes, either way.
        client.write_all(b"late").await.unwrap();
        let late = stream.read(&mut buf).await;
        assert_eq!(late.unwrap_err().kind(), io::ErrorKind::TimedOut);
        let write = stream.write_all(b"late").await;
        assert_eq!(write.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_tunnel_without_a_deadline_waits_for_its_bytes() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut stream = RequestStream::new(Box::new(server));
        stream.open_tunnel();
        let mut buf = [0u8; 4];
        let waited = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await;
        assert!(waited.is_err(), "a read ended with nothing to read");
        client.write_all(b"ping").await.unwrap();
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
}
