//! Bounds on client connections shared by both listeners: a write that makes no
//! progress ends ([`WriteStall`]; [`SendBounded`] for the admin listener, the proxy's
//! `GuardedStream` for pingora), and no single address holds more than its share of a
//! listener's connections ([`PerAddress`]: `server.max_connections_per_ip` on the proxy
//! listener, `admin::MAX_CONNECTIONS_PER_ADDRESS` on the admin one).
//!
//! A client that sends requests and never reads the answers fills the socket's buffers;
//! from then on every write waits, and without a bound the connection (its slot, its
//! task and its buffers) is held for ever.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The clock of a stalled write: started when a write-side poll returns `Pending`,
/// cleared by any result, `TimedOut` once it has run its timeout.
#[derive(Debug)]
pub struct WriteStall {
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteStall {
    pub fn new(timeout: Duration) -> WriteStall {
        WriteStall {
            timeout,
            timer: None,
        }
    }

    /// The longest a write may make no progress.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Pass a write-side poll through the clock.
    pub fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.timer = None;
            return polled;
        }
        let timeout = self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.timer = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client did not read its answer within server.send_timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A stream whose writes, flushes and shutdown fail with `TimedOut` after making no
/// progress for the timeout of its [`WriteStall`]. Reads pass through.
#[derive(Debug)]
pub struct SendBounded<S> {
    inner: S,
    stall: WriteStall,
}

impl<S> SendBounded<S> {
    pub fn new(inner: S, send_timeout: Duration) -> SendBounded<S> {
        SendBounded {
            inner,
            stall: WriteStall::new(send_timeout),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The longest a write may make no progress.
    pub fn send_timeout(&self) -> Duration {
        self.stall.timeout()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendBounded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendBounded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.stall.bound(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.stall.bound(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.stall.bound(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.stall.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connections held per client address, at most `cap` each.
#[derive(Debug)]
pub struct PerAddress {
    cap: usize,
    held: parking_lot::Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    pub fn new(cap: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            cap,
            held: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, released when dropped; `None` when `ip`
    /// already holds `cap`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut held = self.held.lock();
        let n = held.entry(ip).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            owner: self.clone(),
            ip,
        })
    }
}

/// One connection's share of its address's cap.
#[derive(Debug)]
pub struct AddressSlot {
    owner: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock();
        if let Some(n) = held.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_ends_at_the_send_timeout() {
        let (ours, mut client) = tokio::io::duplex(64);
        let mut s = SendBounded::new(ours, Duration::from_secs(5));
        // A reader that keeps up: writes for far longer than the timeout in all succeed.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut n = 0;
            while n < 640 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                n += client.read(&mut buf).await.unwrap();
            }
            client
        });
        for _ in 0..10 {
            s.write_all(&[b'x'; 64]).await.unwrap();
        }
        let _client = reader.await.unwrap();
        // A reader that stopped: the buffer fills, and the next write fails in time.
        s.write_all(&[b'y'; 64]).await.unwrap();
        let e = s.write_all(b"z").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn each_address_holds_at_most_its_cap() {
        let caps = PerAddress::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = caps.try_acquire(a).unwrap();
        let _second = caps.try_acquire(a).unwrap();
        assert!(caps.try_acquire(a).is_none(), "a third from one address");
        let _other = caps
            .try_acquire(b)
            .expect("another address is not affected");
        drop(first);
        let _again = caps.try_acquire(a).expect("a released slot is free again");
        assert!(caps.try_acquire(a).is_none());
    }
}
