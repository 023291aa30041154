//! The mock upstream (`tollgate mock-upstream`): a fake OpenAI + Anthropic server that speaks
//! the providers' real wire formats, for tests, the demo and load benchmarks. A workspace crate
//! of its own (`crates/mock-upstream`): tollgate's binary uses it for that command, the
//! library never does. It counts tokens through `tollgate-tokens`, the crate tollgate
//! estimates with.
//!
//! Owns: the HTTP server (hyper 1, HTTP/1.1 and HTTP/2 prior knowledge on one port), routing,
//! upstream-key checks, request recording, and the per-request behaviour switches. The formats
//! live in [`openai`] and [`anthropic`], answer text and token counts in `text`, streaming in
//! `sse`.
//!
//! # Routes (POST, JSON body)
//!
//! | route | non-stream | `"stream": true` |
//! |---|---|---|
//! | `/v1/chat/completions` | `chat.completion` | `chat.completion.chunk` SSE, `data: [DONE]` |
//! | `/v1/responses` | `response` object | `event:` SSE, `response.created` … `response.completed` |
//! | `/v1/completions` | `text_completion` | `text_completion` SSE, `data: [DONE]` |
//! | `/v1/embeddings` | `list` of small unit vectors | — |
//! | `/v1/messages` | Anthropic `message` | Anthropic `message_start` … `message_stop` |
//!
//! Unmetered routes (see [`models`]): `GET /v1/models` and `GET /v1/models/{id}` in OpenAI's
//! or Anthropic's shape (an `anthropic-version` header picks Anthropic's), and
//! `POST /v1/messages/count_tokens`. They take the same keys and `x-mock-status`.
//!
//! Chat/completions streams carry `"usage": null` on every chunk and a final
//! `"choices": []` usage chunk only when `stream_options.include_usage` is true; without it no
//! chunk has a `usage` key. `stream_options` on a non-stream request is a 400, as at OpenAI.
//! Output hitting the request's `max_tokens` / `max_completion_tokens` / `max_output_tokens`
//! is cut at exactly that many tokens and ends with `length` / `max_tokens` /
//! `response.incomplete`. Anthropic requires `max_tokens`. Only one choice is produced (`n` is
//! ignored). Unknown routes get a 404 in OpenAI's shape; a body that is not JSON a 400 in the
//! route's provider shape.
//!
//! `anthropic-version` and other provider headers are recorded but not required.
//!
//! Mock-only routes: `GET /mock/requests` (recorded requests as JSON, oldest first),
//! `DELETE /mock/requests` (clear), `GET /mock/health`.
//!
//! # Authentication
//!
//! OpenAI routes need `Authorization: Bearer <key>`, Anthropic routes `x-api-key: <key>`;
//! missing → 401 in the provider's shape. With [`MockOptions::expected_key`] (or
//! `MOCK_REQUIRE_KEY` for [`serve`]) any other key is a 401 too.
//!
//! # Usage numbers
//!
//! Output tokens are the exact tiktoken count of the complete answer text (tool calls: of the
//! complete arguments JSON) in the encoding tollgate counts the model with (`tollgate-tokens`:
//! o200k_base for gpt-4o/4.1/5 and the o-series, cl100k_base for gpt-4, gpt-3.5,
//! text-embedding-* and Claude, o200k_base for other names), so a text's count is the same on
//! both sides — plus `x-mock-reasoning-tokens`. Input tokens: the
//! request's text contents joined with `\n` and counted with the same encoding, plus 3 per
//! message and 3 more (message routes); completions and embeddings count their inputs exactly.
//! OpenAI `cached_tokens` is `min(x-mock-cached-tokens, prompt_tokens)` and `cache_write_tokens`
//! the writes cut to what the prompt has left (both parts of the prompt, 12-hour writes in
//! `cache_write_tokens_details`); Anthropic reports `x-mock-cached-tokens` and the writes as
//! `cache_read_input_tokens` / `cache_creation_input_tokens` (split by lifetime in
//! `cache_creation`) beside `input_tokens` (which excludes them, as Anthropic's does). Audio
//! tokens are added to OpenAI's prompt and completion counts and reported in their details.
//! Counts are memoized per body and answer shape. The service tier, speed and region a
//! response reports follow the request (see [`openai`], [`anthropic`]) unless a header says.
//!
//! # Behaviour switches (request headers; they pass through the proxy)
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-words: N` | answer length in words (default 20, max 100000); deterministic English-like text seeded by the request body |
//! | `x-mock-chunks: N` | exactly N content chunks (words raised to N if needed); default 1–3 words per chunk |
//! | `x-mock-seed: N` | seed the answer with N instead of the body and make ids and `created` fixed: byte-for-byte reproducible responses |
//! | `x-mock-delay-ms: N` | sleep before each content chunk |
//! | `x-mock-first-byte-delay-ms: N` | sleep before the response headers |
//! | `x-mock-stall-before-headers: 1` | never send headers (until the client leaves or shutdown) |
//! | `x-mock-status: CODE` | answer that HTTP error (400–599) in the provider's error shape; 429/503/529 carry `retry-after` |
//! | `x-mock-retry-after: S` | `retry-after` seconds for those errors (default 1) |
//! | `x-mock-error-after: N` | after N content chunks send the format's mid-stream error and end the body: chat/completions `data: {"error":…}` (no `[DONE]`), Responses `event: error` + `event: response.failed`, Anthropic `event: error` `overloaded_error` |
//! | `x-mock-stall-after: N` | after N content chunks send nothing more but keep the connection open (until the client leaves or shutdown) |
//! | `x-mock-drop-after: N` | after N content chunks abort the connection (no terminating chunk / HTTP/2 reset) |
//! | `x-mock-split: N` \| `random` | write the bytes in pieces of N bytes / seeded random 1–64 bytes, across event boundaries; default one frame per event |
//! | `x-mock-cached-tokens: N` | cached prompt tokens (OpenAI `cached_tokens`, Anthropic `cache_read_input_tokens`) |
//! | `x-mock-cache-write-tokens: N` | cache writes: Anthropic 5-minute (`cache_creation.ephemeral_5m_input_tokens`), OpenAI 30-minute (`cache_write_tokens`) |
//! | `x-mock-cache-write-1h-tokens: N` | long-lived cache writes: Anthropic 1-hour (`ephemeral_1h_input_tokens`), OpenAI 12-hour (`cache_write_tokens_details.ttl_12h_tokens`) |
//! | `x-mock-audio-input-tokens: N`, `x-mock-audio-output-tokens: N` | OpenAI audio tokens, added to `prompt_tokens` / `completion_tokens` and reported in their `audio_tokens` details |
//! | `x-mock-web-searches: N` | N web searches (max 1000): Anthropic `server_tool_use.web_search_requests`, Responses `web_search_call` output items (with their stream events); ignored on chat |
//! | `x-mock-service-tier: NAME` | the service tier the response reports (OpenAI top-level `service_tier`, Anthropic `usage.service_tier`) |
//! | `x-mock-speed: NAME`, `x-mock-inference-geo: NAME` | Anthropic `usage.speed` / `usage.inference_geo` |
//! | `x-mock-reasoning-tokens: N` | hidden reasoning tokens, added to output tokens (`reasoning_tokens` on OpenAI) |
//! | `x-mock-tool-call: 1` | answer with a function/tool call whose JSON arguments stream in 3–12 byte pieces |
//! | `x-mock-no-usage: 1` | omit usage everywhere (chat streams keep `"usage": null` chunks but drop the usage chunk) |
//!
//! "After N chunks" with N at or above the answer's chunk count happens after the last one.
//! Several interrupts in one request: the smallest N wins. On non-stream routes, stall and drop
//! happen after half of the JSON document (with its full `content-length`), error-after is
//! ignored and `x-mock-delay-ms` does not apply. A malformed switch is a 400 naming the header.
//!
//! Split pieces are separate HTTP chunks and the engine yields between them, but TCP may
//! still merge neighbours; consumers must (and are meant to) handle any split.

mod anthropic;
mod controls;
mod models;
mod openai;
mod sse;
#[cfg(test)]
mod tests;
mod text;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use sse::{BodyAborted, MockBody};

use controls::Controls;
use sse::{Pacing, Script};
use text::{CountCache, Rng, fnv1a, mix};

/// Requests kept by the recorder when [`MockOptions::record_capacity`] is 0.
pub const DEFAULT_RECORD_CAPACITY: usize = 1000;
/// Largest request body accepted (413 above), well over the proxy's 10 MiB default limit.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Bodies up to this size are kept verbatim in the recorder.
const RECORD_BODY_MAX: usize = 16 * 1024;
/// Above this body size (or answer length) parsing and tokenizing move off the reactor.
const BLOCKING_BODY: usize = 64 * 1024;
const BLOCKING_WORDS: usize = 4000;

/// Configuration of one mock server.
#[derive(Clone, Default)]
pub struct MockOptions {
    /// When set, upstream keys other than this one get a 401.
    pub expected_key: Option<String>,
    /// Ring size of the request recorder; 0 means [`DEFAULT_RECORD_CAPACITY`].
    pub record_capacity: usize,
}

impl fmt::Debug for MockOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockOptions")
            .field(
                "expected_key",
                &self.expected_key.as_ref().map(|_| "<redacted>"),
            )
            .field("record_capacity", &self.record_capacity)
            .finish()
    }
}

impl MockOptions {
    /// Reads `MOCK_REQUIRE_KEY` (the expected upstream key; unset or empty: any key).
    pub fn from_env() -> Self {
        Self {
            expected_key: std::env::var("MOCK_REQUIRE_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
            record_capacity: 0,
        }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// Arrival order, from 1.
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Every header in arrival order (names lowercase, values lossy UTF-8).
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// The body's `stream` field, when it was JSON with a boolean there.
    pub stream: Option<bool>,
    /// `stream_options.include_usage`, when present.
    pub include_usage: Option<bool>,
    pub model: Option<String>,
    /// The body itself when UTF-8 and at most 16 KiB.
    pub body: Option<String>,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running mock server started with [`start`]. Dropping it also stops the server.
#[derive(Debug)]
pub struct MockHandle {
    /// The bound address (a real port when started on port 0).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

impl MockHandle {
    /// `http://<addr>`, the base URL to point a client or the proxy at.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far (up to the recorder's capacity), oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.shared.recorded.lock().iter().cloned().collect()
    }

    /// Forgets every recorded request.
    pub fn clear_recorded(&self) {
        self.shared.recorded.lock().clear();
    }

    /// Streams (and split/stalled documents) still being generated. Drops to zero shortly
    /// after their clients disconnect.
    pub fn active_streams(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Stops accepting, closes every connection (stalled ones included) and waits.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "mock upstream ended with an error"),
            Err(e) => tracing::warn!(error = %e, "mock upstream task failed"),
        }
    }
}

/// Accept-queue length asked of the kernel (capped by `net.core.somaxconn`). A proxy in
/// front opens upstream connections in bursts (every request of a commit group at once);
/// with the default 128 the queue overflowed under thousands of streams, and each dropped
/// SYN cost the client a one-second retransmit.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener with [`LISTEN_BACKLOG`].
pub fn bind(listen: SocketAddr) -> io::Result<TcpListener> {
    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds `listen` (port 0 picks a free port) and serves in the background with default options.
pub async fn start(listen: SocketAddr) -> io::Result<MockHandle> {
    start_with(listen, MockOptions::default()).await
}

/// [`start`] with options (expected upstream key, recorder size).
pub async fn start_with(listen: SocketAddr, options: MockOptions) -> io::Result<MockHandle> {
    let listener = bind(listen)?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(options));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(listener, shared.clone(), async move {
        // A dropped handle ends the server too.
        let _ = stopped.await;
    }));
    Ok(MockHandle {
        addr,
        shared,
        stop,
        task,
    })
}

/// Serves on `listener` until `shutdown` resolves (the CLI's entry point). Options come from
/// the environment ([`MockOptions::from_env`]).
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) -> io::Result<()> {
    serve_with(listener, MockOptions::from_env(), shutdown).await
}

/// [`serve`] with explicit options.
pub async fn serve_with(
    listener: TcpListener,
    options: MockOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    run(listener, Arc::new(Shared::new(options)), shutdown).await
}

struct Shared {
    expected_key: Option<String>,
    capacity: usize,
    recorded: Mutex<VecDeque<RecordedRequest>>,
    seq: AtomicU64,
    next_salt: AtomicU64,
    cache: CountCache,
    active: Arc<AtomicUsize>,
    /// Flipped to true when the server shuts down; stalls and generators watch it.
    stop: watch::Sender<bool>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("capacity", &self.capacity)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn new(options: MockOptions) -> Self {
        let capacity = if options.record_capacity == 0 {
            DEFAULT_RECORD_CAPACITY
        } else {
            options.record_capacity
        };
        Self {
            expected_key: options.expected_key,
            capacity,
            recorded: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            seq: AtomicU64::new(0),
            next_salt: AtomicU64::new(0),
            cache: CountCache::default(),
            active: Arc::new(AtomicUsize::new(0)),
            stop: watch::channel(false).0,
        }
    }

    fn record(&self, parts: &http::request::Parts, body: &[u8], json: Option<&Value>) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = RecordedRequest {
            seq,
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body_len: body.len(),
            stream: json.and_then(|j| j.get("stream")).and_then(Value::as_bool),
            include_usage: json
                .and_then(|j| j.pointer("/stream_options/include_usage"))
                .and_then(Value::as_bool),
            model: json
                .and_then(|j| j.get("model"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            body: (body.len() <= RECORD_BODY_MAX)
                .then(|| std::str::from_utf8(body).ok().map(str::to_owned))
                .flatten(),
        };
        let mut ring = self.recorded.lock();
        while ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(entry);
    }

    /// Resolves when the server is shutting down.
    async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    // First use of a tiktoken vocabulary takes 100–200 ms; pay it before the first request
    // instead of on a reactor thread in the middle of one. Connections queue meanwhile.
    let warm = tokio::task::spawn_blocking(|| {
        tollgate_tokens::warm();
    });
    if let Err(e) = warm.await {
        tracing::warn!(error = %e, "tokenizer warm-up failed");
    }
    tracing::info!(addr = ?listener.local_addr().ok(), "mock upstream listening");
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
                Err(e) => {
                    // Usually EMFILE under load: back off instead of spinning.
                    tracing::warn!(error = %e, "mock upstream accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    shared.stop.send_replace(true);
    connections.shutdown().await;
    Ok(())
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    // Small SSE frames must leave immediately, not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "mock upstream connection ended with an error");
    }
}

/// The two error/auth dialects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Responses,
    Completions,
    Embeddings,
    Messages,
}

impl Route {
    fn from_path(path: &str) -> Option<Self> {
        match path.trim_end_matches('/') {
            "/v1/chat/completions" => Some(Route::Chat),
            "/v1/responses" => Some(Route::Responses),
            "/v1/completions" => Some(Route::Completions),
            "/v1/embeddings" => Some(Route::Embeddings),
            "/v1/messages" => Some(Route::Messages),
            _ => None,
        }
    }

    fn provider(self) -> Provider {
        match self {
            Route::Messages => Provider::Anthropic,
            _ => Provider::OpenAi,
        }
    }

    fn plan(self, body: &Value, ctx: &PlanCtx<'_>) -> Result<Plan, Invalid> {
        match self {
            Route::Chat => openai::chat(body, ctx),
            Route::Responses => openai::responses(body, ctx),
            Route::Completions => openai::completions(body, ctx),
            Route::Embeddings => openai::embeddings(body, ctx),
            Route::Messages => anthropic::messages(body, ctx),
        }
    }
}

/// A request the provider would refuse with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Invalid {
    message: String,
    param: Option<&'static str>,
}

impl Invalid {
    pub(crate) fn new(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            message: message.into(),
            param,
        }
    }
}

/// What a route decided to send.
pub(crate) enum Plan {
    Json(Bytes),
    Stream(Box<dyn Script>),
}

/// Request-wide inputs for a route's planning.
pub(crate) struct PlanCtx<'a> {
    pub controls: &'a Controls,
    pub cache: &'a CountCache,
    pub body_hash: u64,
    pub salt: u64,
}

/// Per-response identity and rendering helpers.
struct Reply {
    provider: Provider,
    request_id: String,
    model: String,
    retry_after: u64,
}

impl Reply {
    fn json(&self, status: StatusCode, body: MockBody) -> Response<MockBody> {
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.provider_headers(h, status);
        resp
    }

    fn event_stream(&self, body: MockBody) -> Response<MockBody> {
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        self.provider_headers(h, StatusCode::OK);
        resp
    }

    fn provider_headers(&self, h: &mut HeaderMap, status: StatusCode) {
        let limited = matches!(status.as_u16(), 429 | 503 | 529);
        if limited {
            h.insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after));
        }
        let remaining_requests: u64 = if status.as_u16() == 429 { 0 } else { 9999 };
        let set = |h: &mut HeaderMap, name: &'static str, value: HeaderValue| {
            h.insert(HeaderName::from_static(name), value);
        };
        match self.provider {
            Provider::OpenAi => {
                if let Ok(v) = HeaderValue::from_str(&self.request_id) {
                    set(h, "x-request-id", v);
                }
                set(h, "openai-version", HeaderValue::from_static("2020-10-01"));
                set(h, "openai-processing-ms", HeaderValue::from(1u64));
                set(
                    h,
                    "x-ratelimit-limit-requests",
                    HeaderValue::from(10_000u64),
                );
                set(
                    h,
                    "x-ratelimit-remaining-requests",
                    HeaderValue::from(remaining_requests),
                );
                set(
                    h,
                    "x-ratelimit-reset-requests",
                    HeaderValue::from_static("6ms"),
                );
                set(
                    h,
                    "x-ratelimit-limit-tokens",
                    HeaderValue::from(30_000_000u64),
                );
                set(
                    h,
                    "x-ratelimit-remaining-tokens",
                    HeaderValue::from(29_999_000u64),
                );
                set(
                    h,
                    "x-ratelimit-reset-tokens",
                    HeaderValue::from_static("0s"),
                );
            }
            Provider::Anthropic => {
                if let Ok(v) = HeaderValue::from_str(&self.request_id) {
                    set(h, "request-id", v);
                }
                set(
                    h,
                    "anthropic-ratelimit-requests-limit",
                    HeaderValue::from(4000u64),
                );
                set(
                    h,
                    "anthropic-ratelimit-requests-remaining",
                    HeaderValue::from(remaining_requests.min(3999)),
                );
                set(
                    h,
                    "anthropic-ratelimit-tokens-limit",
                    HeaderValue::from(2_000_000u64),
                );
            }
        }
    }

    /// An error in the provider's own shape.
    fn error(&self, status: StatusCode, message: &str, param: Option<&str>) -> Response<MockBody> {
        let body = match self.provider {
            Provider::OpenAi => {
                let (kind, code) = match status.as_u16() {
                    401 => ("invalid_request_error", Some("invalid_api_key")),
                    s if s >= 500 => ("server_error", None),
                    _ => ("invalid_request_error", None),
                };
                openai::error_body(message, kind, param, code)
            }
            Provider::Anthropic => anthropic::error_body(
                anthropic::error_kind(status.as_u16()),
                message,
                &self.request_id,
            ),
        };
        self.json(status, MockBody::full(body))
    }

    /// The provider's canned body for an injected `x-mock-status`.
    fn injected(&self, status: StatusCode) -> Response<MockBody> {
        let body = match self.provider {
            Provider::OpenAi => openai::status_error(status.as_u16(), &self.model),
            Provider::Anthropic => {
                anthropic::status_error(status.as_u16(), &self.model, &self.request_id)
            }
        };
        self.json(status, MockBody::full(body))
    }
}

fn mock_json(status: StatusCode, body: Bytes) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn mock_routes(shared: &Shared, method: &Method, path: &str) -> Option<Response<MockBody>> {
    match (method, path) {
        (&Method::GET, "/mock/requests") => {
            let list: Vec<RecordedRequest> = shared.recorded.lock().iter().cloned().collect();
            Some(match serde_json::to_vec(&list) {
                Ok(body) => mock_json(StatusCode::OK, Bytes::from(body)),
                Err(e) => mock_json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Bytes::from(serde_json::json!({"error": e.to_string()}).to_string()),
                ),
            })
        }
        (&Method::DELETE, "/mock/requests") => {
            shared.recorded.lock().clear();
            let mut resp = Response::new(MockBody::empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Some(resp)
        }
        (&Method::GET, "/mock/health") => Some(mock_json(
            StatusCode::OK,
            Bytes::from_static(b"{\"status\":\"ok\"}"),
        )),
        _ => None,
    }
}

const OPENAI_BAD_JSON: &str = "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)";

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<MockBody> {
    if let Some(resp) = mock_routes(&shared, req.method(), req.uri().path()) {
        return resp;
    }
    let route = Route::from_path(req.uri().path());
    let listing = models::Listing::from_request(req.method(), req.uri().path(), req.headers());
    let (parts, body) = req.into_parts();
    let provider = match (&route, &listing) {
        (Some(r), _) => r.provider(),
        (None, Some(l)) if l.anthropic() => Provider::Anthropic,
        _ => Provider::OpenAi,
    };
    // Unique per request: keeps ids of identical concurrent requests apart.
    let salt = shared.next_salt.fetch_add(1, Ordering::Relaxed);
    let mut ids = Rng::new(mix(&[salt, text::unix_now()]));
    let mut reply = Reply {
        provider,
        request_id: match provider {
            Provider::OpenAi => format!("req_{}", ids.hex(32)),
            Provider::Anthropic => anthropic::request_id(&mut ids),
        },
        model: String::new(),
        retry_after: 1,
    };

    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return reply.error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request exceeds the maximum allowed number of bytes.",
                None,
            );
        }
        // The client went away mid-body; this answer will not be read.
        Err(e) => return reply.error(StatusCode::BAD_REQUEST, &e.to_string(), None),
    };
    // The body hash seeds the answer and keys the token-count cache.
    let digest = |bytes: Bytes| {
        (
            serde_json::from_slice::<Value>(&bytes),
            fnv1a(&bytes),
            bytes,
        )
    };
    let (parsed, body_hash, bytes) = if bytes.len() > BLOCKING_BODY {
        match tokio::task::spawn_blocking(move || digest(bytes)).await {
            Ok(done) => done,
            Err(e) => return reply.error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
        }
    } else {
        digest(bytes)
    };
    shared.record(&parts, &bytes, parsed.as_ref().ok());

    if let Some(listing) = listing.filter(|_| route.is_none()) {
        return passthrough(&shared, &parts, &listing, parsed.ok().as_ref(), &reply);
    }

    let Some(route) = route.filter(|_| parts.method == Method::POST) else {
        let message = format!("Invalid URL ({} {})", parts.method, parts.uri.path());
        return reply.error(StatusCode::NOT_FOUND, &message, None);
    };
    let controls = match Controls::from_headers(&parts.headers) {
        Ok(c) => c,
        Err(e) => return reply.error(StatusCode::BAD_REQUEST, &e.to_string(), None),
    };
    reply.retry_after = controls.retry_after;
    if let Ok(v) = &parsed {
        reply.model = v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
    }

    if controls.stall_before_headers {
        shared.stopped().await;
        return reply.error(StatusCode::SERVICE_UNAVAILABLE, "shutting down", None);
    }
    if !controls.first_byte_delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(controls.first_byte_delay) => {}
            _ = shared.stopped() => {}
        }
    }
    if let Err(resp) = check_key(&shared, provider, &parts.headers, &reply) {
        return *resp;
    }
    if let Some(status) = controls.status {
        return reply.injected(status);
    }
    let body = match parsed {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return reply.error(
                StatusCode::BAD_REQUEST,
                "The request body must be a JSON object.",
                None,
            );
        }
        Err(e) => {
            let message = match provider {
                Provider::OpenAi => OPENAI_BAD_JSON.to_owned(),
                Provider::Anthropic => format!("Invalid JSON in request body: {e}"),
            };
            return reply.error(StatusCode::BAD_REQUEST, &message, None);
        }
    };

    let heavy = bytes.len() > BLOCKING_BODY || controls.words > BLOCKING_WORDS;
    let planned = if heavy {
        let shared = shared.clone();
        let controls = controls.clone();
        tokio::task::spawn_blocking(move || {
            let ctx = PlanCtx {
                controls: &controls,
                cache: &shared.cache,
                body_hash,
                salt,
            };
            route.plan(&body, &ctx)
        })
        .await
    } else {
        let ctx = PlanCtx {
            controls: &controls,
            cache: &shared.cache,
            body_hash,
            salt,
        };
        Ok(route.plan(&body, &ctx))
    };
    let plan = match planned {
        Ok(Ok(plan)) => plan,
        Ok(Err(invalid)) => {
            return reply.error(StatusCode::BAD_REQUEST, &invalid.message, invalid.param);
        }
        Err(e) => return reply.error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
    };

    let pacing = Pacing {
        delay: controls.delay,
        interrupt: controls.interrupt,
        split: controls.split,
        seed: controls.seed.unwrap_or(body_hash),
    };
    match plan {
        Plan::Stream(script) => reply.event_stream(sse::spawn_script(
            script,
            pacing,
            shared.stop.subscribe(),
            &shared.active,
        )),
        Plan::Json(doc) => {
            let disturbed = controls.split != controls::Split::Event
                || controls
                    .interrupt
                    .is_some_and(|i| i.kind != controls::InterruptKind::Error);
            if !disturbed {
                return reply.json(StatusCode::OK, MockBody::full(doc));
            }
            let len = doc.len() as u64;
            let mut resp = reply.json(
                StatusCode::OK,
                sse::spawn_document(doc, pacing, shared.stop.subscribe(), &shared.active),
            );
            // Announce the whole document so a stall or drop looks like a truncated body.
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            resp
        }
    }
}

/// An unmetered route ([`models`]): key check, `x-mock-status`, then the answer.
fn passthrough(
    shared: &Shared,
    parts: &http::request::Parts,
    listing: &models::Listing,
    body: Option<&Value>,
    reply: &Reply,
) -> Response<MockBody> {
    if let Err(resp) = check_key(shared, reply.provider, &parts.headers, reply) {
        return *resp;
    }
    match Controls::from_headers(&parts.headers) {
        Err(e) => return reply.error(StatusCode::BAD_REQUEST, &e.to_string(), None),
        Ok(c) => {
            if let Some(status) = c.status {
                return reply.injected(status);
            }
        }
    }
    match models::answer(listing, parts.uri.query(), body) {
        Ok(models::Answer::Ok(doc)) => reply.json(StatusCode::OK, MockBody::full(doc)),
        Ok(models::Answer::NotFound(message)) => {
            let body = match reply.provider {
                Provider::OpenAi => openai::error_body(
                    &message,
                    "invalid_request_error",
                    Some("model"),
                    Some("model_not_found"),
                ),
                Provider::Anthropic => {
                    anthropic::error_body("not_found_error", &message, &reply.request_id)
                }
            };
            reply.json(StatusCode::NOT_FOUND, MockBody::full(body))
        }
        Err(invalid) => reply.error(StatusCode::BAD_REQUEST, &invalid.message, invalid.param),
    }
}

/// Checks the provider's auth header; `Err` carries the 401 to send.
fn check_key(
    shared: &Shared,
    provider: Provider,
    headers: &HeaderMap,
    reply: &Reply,
) -> Result<(), Box<Response<MockBody>>> {
    let presented = match provider {
        Provider::OpenAi => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim),
        Provider::Anthropic => headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim),
    }
    .filter(|k| !k.is_empty());
    let Some(key) = presented else {
        let message = match provider {
            Provider::OpenAi => {
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            }
            Provider::Anthropic => "x-api-key header is required",
        };
        // Missing key: OpenAI answers without a `code`, unlike a wrong key.
        let resp = match provider {
            Provider::OpenAi => reply.json(
                StatusCode::UNAUTHORIZED,
                MockBody::full(openai::error_body(
                    message,
                    "invalid_request_error",
                    None,
                    None,
                )),
            ),
            Provider::Anthropic => reply.error(StatusCode::UNAUTHORIZED, message, None),
        };
        return Err(Box::new(resp));
    };
    match &shared.expected_key {
        Some(expected) if !bool::from(key.as_bytes().ct_eq(expected.as_bytes())) => {
            let message = match provider {
                Provider::OpenAi => format!(
                    "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                    mask_key(key)
                ),
                Provider::Anthropic => "invalid x-api-key".to_owned(),
            };
            Err(Box::new(reply.error(
                StatusCode::UNAUTHORIZED,
                &message,
                None,
            )))
        }
        _ => Ok(()),
    }
}

/// `sk-ab***wxyz`, as OpenAI echoes a wrong key.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "***".to_owned();
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}***{tail}")
}
