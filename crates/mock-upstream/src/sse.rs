//! The streaming engine: turns a provider [`Script`] into a channel-backed HTTP body, one event
//! at a time, applying pacing, byte splitting and failure injection.
//!
//! Nothing is buffered beyond the channel's few frames: the generator task waits for the
//! connection to take each frame, so a slow client slows generation down, and a client that
//! goes away (the body is dropped) stops it at the next frame or delay.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{mpsc, watch};

use super::controls::{Interrupt, InterruptKind, Split};
use super::text::Rng;

/// The body aborted on purpose (`x-mock-drop-after`), which makes hyper cut the connection
/// without the terminating chunk (HTTP/1) or reset the stream (HTTP/2).
#[derive(Debug, thiserror::Error)]
#[error("mock upstream dropped the connection mid-body as requested")]
pub struct BodyAborted;

type Item = Result<Bytes, BodyAborted>;

/// Frames the generator may get ahead of the connection.
const CHANNEL_FRAMES: usize = 8;

/// Response body of the mock: a complete buffer, or frames fed by a generator task.
#[derive(Debug)]
pub enum MockBody {
    /// A whole JSON document (non-stream answers and errors).
    Full(Option<Bytes>),
    /// Frames produced by a spawned generator.
    Channel(mpsc::Receiver<Item>),
}

impl MockBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        MockBody::Full(Some(bytes.into()))
    }

    pub(crate) fn empty() -> Self {
        MockBody::Full(None)
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Channel(rx) => rx
                .poll_recv(cx)
                .map(|item| item.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Channel(_) => SizeHint::default(),
        }
    }
}

/// One provider stream format. Each method returns complete, framed SSE events
/// (`event: …\ndata: …\n\n` or `data: …\n\n`); the engine calls them in order:
/// `head`, `content(0..content_count)`, then `tail` — or `error` in place of the rest when a
/// mid-stream error is injected.
pub(crate) trait Script: Send + 'static {
    fn head(&mut self) -> Vec<Bytes>;
    fn content_count(&self) -> usize;
    fn content(&mut self, index: usize) -> Bytes;
    fn tail(&mut self) -> Vec<Bytes>;
    fn error(&mut self) -> Vec<Bytes>;
}

/// How the engine paces and disturbs the bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    pub delay: Duration,
    pub interrupt: Option<Interrupt>,
    pub split: Split,
    pub seed: u64,
}

/// Counts live generator tasks (exposed to tests to prove a disconnect stops generation).
#[derive(Debug)]
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::SeqCst);
        Self(active.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The client went away or the server is shutting down: stop generating.
#[derive(Debug)]
struct Gone;

/// Starts generating `script` and returns the body that carries it.
pub(crate) fn spawn_script(
    script: Box<dyn Script>,
    pacing: Pacing,
    shutdown: watch::Receiver<bool>,
    active: &Arc<AtomicUsize>,
) -> MockBody {
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    let guard = ActiveGuard::new(active);
    tokio::spawn(async move {
        let _guard = guard;
        let mut out = Writer::new(tx, pacing, shutdown);
        // `Err(Gone)` only means nobody is listening any more; there is nothing to report.
        let _ = run_script(script, pacing, &mut out).await;
    });
    MockBody::Channel(rx)
}

/// Sends a complete (non-stream) document through the engine so that splitting, stalling and
/// dropping apply to it too. A stall or drop happens after the first half of the bytes.
pub(crate) fn spawn_document(
    doc: Bytes,
    pacing: Pacing,
    shutdown: watch::Receiver<bool>,
    active: &Arc<AtomicUsize>,
) -> MockBody {
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    let guard = ActiveGuard::new(active);
    tokio::spawn(async move {
        let _guard = guard;
        let mut out = Writer::new(tx, pacing, shutdown);
        let _ = run_document(doc, pacing, &mut out).await;
    });
    MockBody::Channel(rx)
}

async fn run_script(
    mut script: Box<dyn Script>,
    pacing: Pacing,
    out: &mut Writer,
) -> Result<(), Gone> {
    for event in script.head() {
        out.write(event).await?;
    }
    let count = script.content_count();
    for index in 0..count {
        if let Some(interrupt) = pacing.interrupt.filter(|i| i.after == index) {
            return interrupt_now(interrupt.kind, &mut script, out).await;
        }
        if !pacing.delay.is_zero() {
            out.pause(pacing.delay).await?;
        }
        let event = script.content(index);
        out.write(event).await?;
    }
    // An interrupt asked for after more chunks than the answer has happens after the last one.
    if let Some(interrupt) = pacing.interrupt {
        return interrupt_now(interrupt.kind, &mut script, out).await;
    }
    for event in script.tail() {
        out.write(event).await?;
    }
    out.flush().await
}

async fn interrupt_now(
    kind: InterruptKind,
    script: &mut Box<dyn Script>,
    out: &mut Writer,
) -> Result<(), Gone> {
    match kind {
        InterruptKind::Error => {
            for event in script.error() {
                out.write(event).await?;
            }
            out.flush().await
        }
        InterruptKind::Stall => {
            out.flush().await?;
            out.stall().await
        }
        InterruptKind::Drop => {
            out.flush().await?;
            out.abort().await
        }
    }
}

async fn run_document(doc: Bytes, pacing: Pacing, out: &mut Writer) -> Result<(), Gone> {
    match pacing.interrupt.map(|i| i.kind) {
        Some(kind @ (InterruptKind::Stall | InterruptKind::Drop)) => {
            out.write(doc.slice(..doc.len() / 2)).await?;
            out.flush().await?;
            if kind == InterruptKind::Stall {
                out.stall().await
            } else {
                out.abort().await
            }
        }
        // A JSON document has no error event; an error-after request gets the whole answer.
        Some(InterruptKind::Error) | None => {
            out.write(doc).await?;
            out.flush().await
        }
    }
}

/// Random split sizes are drawn from 1..=RANDOM_SPLIT_MAX bytes.
const RANDOM_SPLIT_MAX: u64 = 64;

struct Writer {
    tx: mpsc::Sender<Item>,
    split: Split,
    rng: Rng,
    /// Bytes waiting for the next split piece to fill up.
    carry: BytesMut,
    next_piece: usize,
    shutdown: watch::Receiver<bool>,
}

impl Writer {
    fn new(tx: mpsc::Sender<Item>, pacing: Pacing, shutdown: watch::Receiver<bool>) -> Self {
        let mut rng = Rng::new(pacing.seed ^ 0x5B_11_75);
        let next_piece = match pacing.split {
            Split::Event => 0,
            Split::Fixed(n) => n,
            Split::Random => 1 + rng.below(RANDOM_SPLIT_MAX) as usize,
        };
        Self {
            tx,
            split: pacing.split,
            rng,
            carry: BytesMut::new(),
            next_piece,
            shutdown,
        }
    }

    async fn send(&mut self, bytes: Bytes) -> Result<(), Gone> {
        self.tx.send(Ok(bytes)).await.map_err(|_| Gone)
    }

    async fn write(&mut self, event: Bytes) -> Result<(), Gone> {
        if self.split == Split::Event {
            return self.send(event).await;
        }
        self.carry.extend_from_slice(&event);
        while self.carry.len() >= self.next_piece {
            let piece = self.carry.split_to(self.next_piece).freeze();
            self.next_piece = match self.split {
                Split::Random => 1 + self.rng.below(RANDOM_SPLIT_MAX) as usize,
                Split::Fixed(n) => n,
                Split::Event => 1,
            };
            self.send(piece).await?;
            // Let the connection write this piece on its own before the next one is queued,
            // so pieces usually leave as separate writes (TCP may still merge them).
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Sends whatever a split is still holding back.
    async fn flush(&mut self) -> Result<(), Gone> {
        if self.carry.is_empty() {
            return Ok(());
        }
        let rest = self.carry.split().freeze();
        self.send(rest).await
    }

    async fn pause(&mut self, delay: Duration) -> Result<(), Gone> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.tx.closed() => Err(Gone),
            _ = self.shutdown.wait_for(|stop| *stop) => Err(Gone),
        }
    }

    /// Holds the connection open, sending nothing, until the client leaves or shutdown.
    async fn stall(&mut self) -> Result<(), Gone> {
        tokio::select! {
            _ = self.tx.closed() => {}
            _ = self.shutdown.wait_for(|stop| *stop) => {}
        }
        Err(Gone)
    }

    /// Fails the body. hyper discards bytes it has buffered but not yet written when a body
    /// fails, so the frames already queued are first left to drain (hyper flushes when it
    /// finds the channel empty); without this the client would not see the N chunks the
    /// drop was supposed to come after. Waits at most about a second for a stuck client.
    async fn abort(&mut self) -> Result<(), Gone> {
        for _ in 0..1000 {
            if self.tx.capacity() == self.tx.max_capacity() {
                break;
            }
            self.pause(Duration::from_millis(1)).await?;
        }
        self.pause(Duration::from_millis(5)).await?;
        self.tx.send(Err(BodyAborted)).await.map_err(|_| Gone)
    }
}
