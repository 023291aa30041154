//! The proxy listener's connection guard: a cap on open client connections, an overall
//! deadline for every request head (slowloris) and a bound on stalled writes (a client
//! that never reads its answers).
//!
//! pingora bounds each *read* of a request head (60 s), not the whole head: a client that
//! sends one byte every 59 s keeps a connection, and its task, forever. [`Guarded`] wraps
//! pingora's HTTP app; every accepted connection must take one of
//! `server.max_connections` permits (else it is closed at once and counted) and is
//! wrapped in a [`GuardedStream`], whose reads fail with `TimedOut` once the head of the
//! current request has taken longer than `server.header_timeout`:
//!
//! - a new connection's first head is timed from the accept;
//! - [`head_done`] (called from `early_request_filter`, i.e. once pingora has parsed the
//!   head) stops the clock: bodies have their own bound (`server.body_timeout`), and
//!   responses may stream for minutes;
//! - [`request_done`] (from `logging`) marks the connection idle; the next head is timed
//!   from its first byte (the wait before it is bounded by `server.keepalive_timeout`,
//!   which `logging` sets on every connection that is kept).
//!
//! No one client address holds more than `server.max_connections_per_ip` of the slots:
//! a connection past its address's share is closed at once and counted like one past
//! the global cap, so a single peer cannot lock every other client out.
//!
//! Writes: pingora bounds none of the writes of a response head and only some body writes,
//! so a client that sends requests and never reads the answers would keep its connection
//! (its slot, and the answer's buffers) for ever. Every write, flush or shutdown of a
//! [`GuardedStream`] that makes no progress for `server.send_timeout` fails with
//! `TimedOut` ([`WriteStall`](crate::net::WriteStall)), which ends the connection. A write that progresses
//! restarts the clock, so a long stream to a reader that keeps up is never cut.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType, raw_connect::ProxyDigest,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::engine::Engine;
use crate::net::{AddressSlot, PerAddress, SendBounded};

/// Clock states kept in one atomic (anything else is a deadline, see [`GuardedStream`]).
const HEAD_DONE: u64 = 0;
const IDLE: u64 = 1;
const DEADLINE_BASE: u64 = 2;

/// A pingora server app (the HTTP proxy) behind the connection cap and head deadline.
pub struct Guarded<A> {
    app: Arc<A>,
    permits: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
    header_timeout: Duration,
    send_timeout: Duration,
    engine: Arc<Engine>,
}

/// The client address of `stream` (an IPv4-mapped IPv6 address counts as its IPv4 one).
fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    let ip = digest.peer_addr()?.as_inet()?.ip();
    Some(ip.to_canonical())
}

impl<A> Guarded<A> {
    /// `app` behind `server.max_connections` and `server.header_timeout` of `engine`'s config.
    pub fn new(app: A, engine: Arc<Engine>) -> Guarded<A> {
        let server = &engine.config().server;
        Guarded {
            app: Arc::new(app),
            permits: Arc::new(Semaphore::new(server.max_connections)),
            per_address: PerAddress::new(server.max_connections_per_ip),
            header_timeout: server.header_timeout,
            send_timeout: server.send_timeout,
            engine,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if stream.as_any().is::<GuardedStream>() {
            // A connection handed back for reuse already holds its permit.
            return self.app.process_new(stream, shutdown).await;
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            // Closing at once is the cheapest answer; a client retries on a fresh socket.
            self.engine.metrics().connection_refused("proxy");
            tracing::debug!("proxy listener at server.max_connections; connection closed");
            return None;
        };
        let slot = match peer_ip(&stream) {
            Some(ip) => match self.per_address.try_acquire(ip) {
                Some(slot) => Some(slot),
                None => {
                    self.engine.metrics().connection_refused("proxy");
                    tracing::debug!(
                        "client address at server.max_connections_per_ip; connection closed"
                    );
                    return None;
                }
            },
            None => None,
        };
        let mut guarded =
            GuardedStream::new(stream, permit, self.header_timeout, self.send_timeout);
        guarded._slot = slot;
        self.app.process_new(Box::new(guarded), shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// A client connection with its permit and its request-head clock.
pub struct GuardedStream {
    /// The client's stream; a write that makes no progress for `server.send_timeout` ends.
    inner: SendBounded<Stream>,
    _permit: OwnedSemaphorePermit,
    /// The connection's share of its client address's cap.
    _slot: Option<AddressSlot>,
    header_timeout: Duration,
    epoch: Instant,
    /// [`HEAD_DONE`], [`IDLE`], or `DEADLINE_BASE + ms since epoch` of the head deadline.
    clock: AtomicU64,
    /// Wakes a read that waits past the deadline.
    timer: Option<(u64, Pin<Box<tokio::time::Sleep>>)>,
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", self.inner.get_ref())
            .field("clock", &self.clock.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl GuardedStream {
    fn new(
        inner: Stream,
        permit: OwnedSemaphorePermit,
        header_timeout: Duration,
        send_timeout: Duration,
    ) -> Self {
        let s = GuardedStream {
            inner: SendBounded::new(inner, send_timeout),
            _permit: permit,
            _slot: None,
            header_timeout,
            epoch: Instant::now(),
            clock: AtomicU64::new(IDLE),
            timer: None,
        };
        s.arm();
        s
    }

    fn arm(&self) {
        self.clock
            .store(self.deadline_from_now(), Ordering::Relaxed);
    }

    /// The clock value of a head deadline `header_timeout` from now.
    fn deadline_from_now(&self) -> u64 {
        let at = self.epoch.elapsed() + self.header_timeout;
        DEADLINE_BASE + u64::try_from(at.as_millis()).unwrap_or(u64::MAX - DEADLINE_BASE)
    }

    /// `Err(TimedOut)` once the head deadline has passed; otherwise registers a wake-up for it.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let clock = self.clock.load(Ordering::Relaxed);
        if clock < DEADLINE_BASE {
            return Ok(());
        }
        let at = self.epoch + Duration::from_millis(clock - DEADLINE_BASE);
        if Instant::now() >= at {
            return Err(timed_out());
        }
        // One timer per connection, moved to each new deadline.
        let timer = match &mut self.timer {
            Some((armed, t)) => {
                if *armed != clock {
                    t.as_mut().reset(at);
                    *armed = clock;
                }
                t
            }
            slot => {
                let t = Box::pin(tokio::time::sleep_until(at));
                &mut slot.insert((clock, t)).1
            }
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Err(timed_out()),
            Poll::Pending => Ok(()),
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "request head not received within server.header_timeout",
    )
}

/// The request head of `stream`'s current request has been read: stop its clock.
pub fn head_done(stream: Option<&Stream>) {
    if let Some(g) = stream.and_then(|s| s.as_any().downcast_ref::<GuardedStream>()) {
        g.clock.store(HEAD_DONE, Ordering::Relaxed);
    }
}

/// The current request of `stream` is over: time the next head from its first byte.
pub fn request_done(stream: Option<&Stream>) {
    if let Some(g) = stream.and_then(|s| s.as_any().downcast_ref::<GuardedStream>()) {
        g.clock.store(IDLE, Ordering::Relaxed);
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Err(e) = this.check_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // The first byte of the next request starts its clock.
            let deadline = this.deadline_from_now();
            let _ =
                this.clock
                    .compare_exchange(IDLE, deadline, Ordering::Relaxed, Ordering::Relaxed);
        }
        polled
    }
}

// Writes are bounded by the inner `SendBounded`.
impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        // pingora closes a connection through this, not `poll_shutdown`: flushing what is
        // buffered for a client that stopped reading waits for ever without a bound.
        let bound = self.inner.send_timeout();
        if tokio::time::timeout(bound, self.inner.get_mut().shutdown())
            .await
            .is_err()
        {
            tracing::debug!("client did not read the end of its answer; connection dropped");
        }
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.get_ref().id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ref().get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ref().get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.get_ref().selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_ref().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_ref().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_ref().get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_ref().get_proxy_digest()
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_ref().get_socket_digest()
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.get_mut().try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn guarded(timeout: Duration) -> (GuardedStream, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        (
            GuardedStream::new(Box::new(ours), permit, timeout, Duration::from_secs(30)),
            theirs,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_arrive_within_the_deadline_of_each_request() {
        let (mut g, mut client) = guarded(Duration::from_secs(10));
        let mut buf = [0u8; 64];
        // First head: timed from the accept, however the bytes trickle.
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(g.read(&mut buf).await.is_ok());
        tokio::time::advance(Duration::from_secs(9)).await;
        client.write_all(b"x").await.unwrap();
        assert!(g.read(&mut buf).await.is_ok(), "within the deadline");
        tokio::time::advance(Duration::from_secs(2)).await;
        client.write_all(b"y").await.unwrap();
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        // A read waiting for bytes that never come ends at the deadline too.
        let (mut g, _client) = guarded(Duration::from_secs(10));
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        // Once the head is in, the clock stops: a body or a long stream takes its time.
        let (mut g, mut client) = guarded(Duration::from_secs(10));
        g.clock.store(HEAD_DONE, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(60)).await;
        client.write_all(b"body").await.unwrap();
        assert!(g.read(&mut buf).await.is_ok());

        // Between keep-alive requests the clock waits for the next head's first byte.
        g.clock.store(IDLE, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(50)).await;
        client.write_all(b"G").await.unwrap();
        assert!(g.read(&mut buf).await.is_ok(), "idle time does not count");
        tokio::time::advance(Duration::from_secs(11)).await;
        client.write_all(b"ET").await.unwrap();
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "the next head is timed");
    }
}
