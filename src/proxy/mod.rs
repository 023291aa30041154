//! The pingora glue: tollgate's [`ProxyHttp`] implementation and its per-request context.
//!
//! Only glue lives here — every decision is made by [`crate::engine`], which knows nothing
//! of pingora. The phases, in order:
//!
//! 1. `early_request_filter`: the head has arrived; its clock ([`listener`]) stops.
//! 2. `request_filter`: auth (401 on every path, known or not; a key created since the
//!    last directory refresh is looked up, see [`crate::auth`]), route (404, never echoing
//!    the request), trace id, size (413 by
//!    `Content-Length`), then the whole body is read — at most `server.max_request_body`
//!    bytes (413) within `server.body_timeout` (408) — and admitted (400/409/403/429),
//!    all *before any upstream connection is opened or any header with the provider key
//!    is sent*. A passthrough route ([`crate::passthrough`]) is read the same way but
//!    never admitted. A refusal sent before the body was read lingers
//!    ([`Gateway::linger`]) so the client hears it.
//! 3. Forwarding the admitted body. A body that fits pingora's 64 KiB retry buffer is
//!    replayed by pingora into `request_body_filter`, where it is swapped for the
//!    (possibly rewritten) body. A larger one would not be replayed (pingora #349/#688),
//!    so its exchange is handed to a pingora *subrequest* ([`Gateway::hand_off`]): the
//!    same phases below run there, fed the body from memory, and the subrequest's
//!    response is piped to the client unchanged.
//! 4. `upstream_request_filter`: caller credentials and account-selecting headers are
//!    dropped, the upstream's own key is set (a header value marked sensitive),
//!    `accept-encoding` is dropped so the meter sees plain text.
//! 5. `upstream_response_filter` / `response_filter` / `response_body_filter`: headers
//!    naming the operator's provider account are removed, trace id and rate-limit headers
//!    added, then every chunk goes through the meter, which returns the bytes unchanged
//!    (or minus the usage chunk the client did not ask for). An answer whose length
//!    tollgate removed (or the upstream never sent) goes out chunked, so an HTTP/1.1
//!    client's connection is reused (`keep_alive_framing`).
//! 6. `logging` runs after success, errors and disconnects alike: the one place the
//!    request is finished (settled or released, in a task it spawns so the client's
//!    connection is free at once) and logged.

pub mod listener;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::subrequest::pipe::{InputBody, InputBodyType, pipe_subrequest};
use pingora::proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use crate::api::meter::{MAX_BUFFERED_BODY, Meter, failure_event};
use crate::config::{ACCOUNT_HEADERS, ACCOUNT_RESPONSE_HEADERS, CREDENTIAL_HEADERS, UpstreamKind};
use crate::engine::{Admission, Engine, RequestEnd, Route};
use crate::errors::{ApiError, ErrorCode};

/// A refusal sent before the request body was read waits for the rest of the body — at
/// most this long in all, and at most [`LINGER_GAP`] between two reads — before closing,
/// as nginx's lingering close does: closing with unread bytes makes the kernel send a
/// reset that can destroy the answer in the client's receive buffer.
pub const LINGER_TIME: Duration = Duration::from_secs(30);
/// Longest pause of a lingering client before the connection is closed anyway.
pub const LINGER_GAP: Duration = Duration::from_secs(5);
/// A refusal of a request that presented no valid key lingers at most this long, for at
/// most [`UNAUTHENTICATED_LINGER_BYTES`]: enough for a client that sent its body with its
/// head, while a stranger cannot hold the connection (and its request head) for long.
pub const UNAUTHENTICATED_LINGER_TIME: Duration = Duration::from_secs(2);
/// Bytes a refused unauthenticated request's body is drained for, at most.
pub const UNAUTHENTICATED_LINGER_BYTES: u64 = 64 << 10;

/// A 429 whose limit frees within this many seconds is left to the SDKs' own retries;
/// a later (or never) one carries `x-should-retry: false`.
pub const SDK_RETRY_WITHIN_SECS: u64 = 60;

/// A body that would take the bytes of request bodies held across all connections past
/// `server.max_buffered_bodies` waits at most this long (in all) for room, then is
/// refused with 503 `overloaded`.
pub const BODY_BUDGET_WAIT: Duration = Duration::from_secs(1);

/// The caller's own usage report (SPEC §6).
const USAGE_PATH: &str = "/v1/tollgate/usage";

/// Per-request state.
pub struct Ctx {
    pub trace_id: String,
    started: Instant,
    route: Option<Route>,
    principal: Option<Arc<crate::auth::Principal>>,
    idempotency_key: Option<String>,
    /// This request's exchange runs in a subrequest ([`Gateway::hand_off`]), which
    /// finishes and logs it.
    handed_off: bool,
    /// Set once admitted.
    admission: Option<Admission>,
    /// The body to send upstream in place of the client's, once.
    replacement: Option<Bytes>,
    meter: Option<Meter>,
    /// A metered non-stream answer's body, held until its end so the meter has read it
    /// whole (usage is at its end) before the first body byte goes to the client: a
    /// client that left meanwhile makes that write fail, and the request is then still
    /// settled with the upstream's own usage (SPEC §4.6). Bounded by
    /// [`MAX_BUFFERED_BODY`]; past it the body flows on.
    held: Option<BytesMut>,
    /// Status we answered ourselves (refusals, upstream failures).
    answered: Option<u16>,
    upstream_status: Option<u16>,
    upstream_sent_at: Option<Instant>,
    first_byte_at: Option<Instant>,
    response_done: bool,
    admit_time: Duration,
    /// We answered with one of our own errors.
    refused: bool,
    /// `100 Continue` was sent: the client is sending its body.
    continued: bool,
    /// The body was read whole in `request_filter`: what goes upstream is
    /// `replacement`, once.
    body_read: bool,
    /// The request carries `anthropic-version`: an Anthropic client (routing and the
    /// shape of errors answered before a route is known).
    anthropic_client: bool,
    /// Rate-limit headers of a passthrough answer (nothing is admitted for those).
    passthrough_headers: Vec<(&'static str, String)>,
    /// This request's share of `server.max_buffered_bodies`: its body's bytes, held until
    /// the request ends (the body is kept whole until then).
    body_budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A request's context handed to the subrequest that forwards its large body; taken by
/// the subrequest's `request_filter`, or back by the request if the subrequest never ran.
type Handoff = Arc<parking_lot::Mutex<Option<Ctx>>>;

/// Why a request body could not be read whole.
enum BodyError {
    TooLarge,
    /// No room under `server.max_buffered_bodies` within [`BODY_BUDGET_WAIT`].
    Busy,
    TimedOut,
    Read(Box<Error>),
}

/// The proxy service.
pub struct Gateway {
    pub engine: Arc<Engine>,
    /// Bytes of request bodies that may be held at once, across all connections
    /// (`server.max_buffered_bodies`): one permit per byte.
    body_budget: Arc<tokio::sync::Semaphore>,
}

impl Gateway {
    pub fn new(engine: Arc<Engine>) -> Gateway {
        let bytes = usize::try_from(engine.config().server.max_buffered_bodies)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Gateway {
            engine,
            body_budget: Arc::new(tokio::sync::Semaphore::new(bytes)),
        }
    }

    fn kind(&self, ctx: &Ctx) -> UpstreamKind {
        match &ctx.route {
            Some(r) => r.kind,
            None if ctx.anthropic_client => UpstreamKind::Anthropic,
            None => UpstreamKind::Openai,
        }
    }

    /// Answer with one of our errors and remember the status for logging.
    ///
    /// When the request body is still unread (a refusal decided from the head), the
    /// connection is not reused, and the rest of the body is drained within bounds
    /// ([`Gateway::linger`]) before it closes, so the client hears the answer. A client
    /// that was too slow to send its body (408) is not waited for again.
    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, err: &ApiError) -> Result<bool> {
        let kind = self.kind(ctx);
        let body = err.body(kind);
        let mut h = ResponseHeader::build(err.status(), Some(6))?;
        h.insert_header("content-type", "application/json")?;
        h.insert_header("content-length", body.len().to_string())?;
        h.insert_header("x-tollgate-trace-id", ctx.trace_id.as_str())?;
        if let Some(s) = err.retry_after {
            h.insert_header("retry-after", s.to_string())?;
        }
        let futile = match err.code {
            // The same request again is refused the same way: the first one is in flight
            // or done, and its answer is not repeated.
            ErrorCode::DuplicateRequest => true,
            ErrorCode::QuotaExceeded => err.retry_after.is_none_or(|s| s > SDK_RETRY_WITHIN_SECS),
            _ => false,
        };
        if futile {
            // The official SDKs retry a 429 by default and honour Retry-After — the
            // Anthropic Python SDK sleeps for all of it, hours for a daily budget. When
            // the limit cannot clear within a minute, tell them (the Stainless SDKs'
            // `x-should-retry`) to give the error to the application at once.
            h.insert_header("x-should-retry", "false")?;
        }
        for (name, value) in &err.headers {
            h.insert_header(*name, value.as_str())?;
        }
        ctx.answered = Some(err.status());
        ctx.refused = true;
        self.engine.metrics().refused(err.code);
        // The connection stays open for the client's next request when the whole request
        // body has been read (refusals decided from the body, or a request without one)
        // and the request presented a valid key: a stranger's connection is closed after
        // its refusal, so it cannot keep a slot with one tiny request a minute.
        let unread = !session.is_body_done();
        let stranger = ctx.principal.is_none();
        if unread || stranger || err.code == ErrorCode::HeaderTooLarge {
            session.set_keepalive(None);
        }
        // A client that asked to be told before it sends its body (and was not) has
        // nothing on its way.
        let withheld = !ctx.continued
            && header(session, "expect").is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(body), true).await?;
        if unread && !withheld && err.code != ErrorCode::RequestTimeout {
            if stranger {
                self.linger(
                    session,
                    UNAUTHENTICATED_LINGER_BYTES,
                    UNAUTHENTICATED_LINGER_TIME,
                )
                .await;
            } else {
                let budget = self
                    .engine
                    .config()
                    .server
                    .max_request_body
                    .saturating_mul(2)
                    .max(1 << 20);
                self.linger(session, budget, LINGER_TIME).await;
            }
        }
        Ok(true)
    }

    /// Lingering close: read and drop what is left of the request body — at most `budget`
    /// bytes (twice `server.max_request_body`, 1 MiB at least, for a known key), for at
    /// most `time` ([`LINGER_TIME`]), giving up after a pause of [`LINGER_GAP`] — so that
    /// closing does not reset the connection under an answer the client has not read yet.
    async fn linger(&self, session: &mut Session, budget: u64, time: Duration) {
        let deadline = Instant::now() + time;
        let mut drained: u64 = 0;
        while drained <= budget {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(LINGER_GAP);
            if wait.is_zero() {
                break;
            }
            match tokio::time::timeout(wait, session.read_request_body()).await {
                Ok(Ok(Some(chunk))) => drained += chunk.len() as u64,
                // The end of the body, a broken connection, or a client gone quiet.
                _ => break,
            }
        }
    }

    /// Read the whole request body: at most `max` bytes, within `server.body_timeout`,
    /// and only while the bytes of all bodies held stay within
    /// `server.max_buffered_bodies` — each chunk takes its share of that budget before it
    /// is kept (waiting at most [`BODY_BUDGET_WAIT`] in all for room). The share is
    /// returned with the body and given back when the request ends; on an error it is
    /// given back at once.
    async fn read_body(
        &self,
        session: &mut Session,
        max: u64,
    ) -> std::result::Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), BodyError> {
        let declared = header(session, "content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        // Trust a declared length for the first allocation only up to the cap.
        let mut buf = BytesMut::with_capacity(declared.min(max) as usize);
        let deadline = tokio::time::Instant::now() + self.engine.config().server.body_timeout;
        let budget_deadline = tokio::time::Instant::now() + BODY_BUDGET_WAIT;
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        loop {
            match tokio::time::timeout_at(deadline, session.read_request_body()).await {
                Err(_) => return Err(BodyError::TimedOut),
                Ok(Err(e)) => return Err(BodyError::Read(e)),
                Ok(Ok(None)) => return Ok((buf.freeze(), held)),
                Ok(Ok(Some(chunk))) => {
                    if buf.len() as u64 + chunk.len() as u64 > max {
                        return Err(BodyError::TooLarge);
                    }
                    let n = u32::try_from(chunk.len()).map_err(|_| BodyError::TooLarge)?;
                    if n > 0 {
                        let share = self.body_budget.clone().acquire_many_owned(n);
                        let permit = match tokio::time::timeout_at(budget_deadline, share).await {
                            Ok(Ok(p)) => p,
                            // Timed out, or (never) closed.
                            _ => return Err(BodyError::Busy),
                        };
                        match held.as_mut() {
                            Some(h) => h.merge(permit),
                            None => held = Some(permit),
                        }
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
        }
    }

    /// Forward an admitted request whose body pingora cannot replay (above its 64 KiB retry
    /// buffer) through a subrequest: the context (with its admission) moves to the
    /// subrequest, which runs the usual upstream phases on the body from memory, finishes
    /// and logs the request; its response is piped to the client as it comes.
    async fn hand_off(&self, session: &mut Session, ctx: &mut Ctx, body: Bytes) -> Result<bool> {
        let trace_id = ctx.trace_id.clone();
        let keep_running = ctx.admission.as_ref().is_some_and(|a| !a.stream);
        let mut handed = self.empty_ctx();
        std::mem::swap(ctx, &mut handed);
        ctx.trace_id = trace_id;
        ctx.handed_off = true;
        let handoff: Handoff = Arc::new(parking_lot::Mutex::new(Some(handed)));
        let sub_ctx = SubrequestCtx::builder()
            .body_mode(BodyMode::ExpectBody)
            .user_ctx(Box::new(handoff.clone()))
            .build();
        let prepared = session
            .subrequest_spawner
            .as_ref()
            .map(|spawner| spawner.create_subrequest(session.as_downstream(), sub_ctx));
        let result = match prepared {
            Some((sub, handle)) => Some(
                pipe_subrequest(
                    session,
                    sub,
                    handle,
                    |task| Ok(Some(task)),
                    InputBodyType::Preset(InputBody::Bytes(vec![body])),
                )
                .await,
            ),
            None => None,
        };
        let failed = match result {
            Some(Ok(_)) => false,
            Some(Err(e)) => {
                if e.from_subreq {
                    // The subrequest may have queued its own answer (a 502, say) just
                    // before reporting its error: deliver it.
                    if let Some(mut rx) = e.state.pipe_rx {
                        let mut tasks = Vec::new();
                        while let Ok(task) = rx.try_recv() {
                            tasks.push(task);
                        }
                        if !tasks.is_empty() {
                            let _ = session.write_response_tasks(tasks).await;
                        }
                    }
                } else {
                    tracing::debug!(trace_id = %ctx.trace_id, error = %e.error, "client gone while its response was piped");
                    // A non-stream exchange runs to its end without the client (SPEC §4.6):
                    // take what the subrequest still writes, so it reads the upstream's
                    // answer whole and settles with its usage. A stream's subrequest sees
                    // its pipe close and ends as a mid-stream disconnect.
                    if keep_running && let Some(mut rx) = e.state.pipe_rx {
                        tokio::spawn(async move { while rx.recv().await.is_some() {} });
                    }
                }
                true
            }
            None => true,
        };
        if failed {
            session.set_keepalive(None);
        }
        // The subrequest never took the context (it did not start): finish it here.
        let untaken = handoff.lock().take();
        if let Some(mut orphan) = untaken {
            tracing::error!(trace_id = %orphan.trace_id, "the forwarding subrequest did not start");
            if session.response_written().is_none() {
                let err = ApiError::new(ErrorCode::Internal, "internal error");
                let _ = self.refuse(session, &mut orphan, &err).await;
            }
            orphan.handed_off = false;
            *ctx = orphan;
        }
        Ok(true)
    }

    /// A fresh context, not yet counted as a request (see `new_ctx`).
    fn empty_ctx(&self) -> Ctx {
        Ctx {
            trace_id: uuid::Uuid::now_v7().to_string(),
            started: Instant::now(),
            route: None,
            principal: None,
            idempotency_key: None,
            handed_off: false,
            admission: None,
            replacement: None,
            meter: None,
            held: None,
            answered: None,
            upstream_status: None,
            upstream_sent_at: None,
            first_byte_at: None,
            response_done: false,
            admit_time: Duration::ZERO,
            refused: false,
            continued: false,
            body_read: false,
            anthropic_client: false,
            passthrough_headers: Vec::new(),
            body_budget: None,
        }
    }

    /// Admit a complete body; on refusal the error to answer.
    async fn admit(&self, ctx: &mut Ctx, body: Bytes) -> std::result::Result<(), ApiError> {
        let (Some(principal), Some(route)) = (ctx.principal.clone(), ctx.route.clone()) else {
            return Err(ApiError::new(
                ErrorCode::Internal,
                "request reached admission without auth",
            ));
        };
        let t = Instant::now();
        let admission = self
            .engine
            .admit(
                &principal,
                &route,
                body,
                ctx.idempotency_key.as_deref(),
                &ctx.trace_id,
            )
            .await;
        ctx.admit_time = t.elapsed();
        self.engine.metrics().admit_time(ctx.admit_time);
        let admission = admission?;
        ctx.trace_id = admission.trace_id.clone();
        ctx.replacement = Some(admission.body.clone());
        ctx.meter = Some(admission.meter());
        ctx.admission = Some(admission);
        Ok(())
    }
}

/// Why an `Idempotency-Key` header value cannot name a trace (SPEC §4.7): it must be 1 to
/// [`crate::engine::MAX_IDEMPOTENCY_KEY`] printable ASCII characters once surrounding
/// spaces are trimmed. An empty value is no key at all.
fn bad_idempotency_key(v: &[u8]) -> Option<String> {
    let max = crate::engine::MAX_IDEMPOTENCY_KEY;
    let Ok(s) = std::str::from_utf8(v) else {
        return Some("Idempotency-Key is not UTF-8; send printable ASCII characters".into());
    };
    let s = s.trim();
    if s.len() > max {
        return Some(format!(
            "Idempotency-Key is {} bytes; at most {max} are accepted",
            s.len()
        ));
    }
    if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Some("Idempotency-Key must be printable ASCII characters".into());
    }
    None
}

fn header<'a>(session: &'a Session, name: &str) -> Option<&'a [u8]> {
    session.req_header().headers.get(name).map(|v| v.as_bytes())
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.engine.request_started();
        self.empty_ctx()
    }

    fn allow_spawning_subrequest(&self, _session: &Session, _ctx: &Ctx) -> bool {
        // Large bodies are forwarded through a subrequest (see `hand_off`).
        true
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        listener::head_done(session.as_downstream().stream());
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // A subrequest forwarding a large body: take over its request's context.
        let handed = session
            .subrequest_ctx
            .as_mut()
            .and_then(|c| c.user_ctx_mut())
            .and_then(|u| u.downcast_mut::<Handoff>())
            .and_then(|h| h.lock().take());
        if let Some(handed) = handed {
            *ctx = handed;
            return Ok(false);
        }

        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        ctx.anthropic_client = header(session, "anthropic-version").is_some();

        // The head's size, before anything else reads it (pingora itself takes up to
        // 1 MiB and 256 headers).
        if let Some(e) = self.oversized_head(session) {
            return self.refuse(session, ctx, &e).await;
        }

        // Auth first: every route, including our own usage endpoint.
        let presented = crate::auth::presented_secret(
            header(session, "authorization"),
            header(session, "x-api-key"),
        )
        .map(str::to_owned);
        let principal = self.engine.authenticate(presented).await;

        if path == USAGE_PATH && method == http::Method::GET {
            let p = match principal {
                Ok(p) => p,
                Err(e) => return self.refuse(session, ctx, &e).await,
            };
            self.name_trace(session, ctx, &p);
            let body = Bytes::from(
                self.engine
                    .usage_json_for(&p, &ctx.trace_id)
                    .await
                    .to_string(),
            );
            ctx.principal = Some(p);
            let mut h = ResponseHeader::build(200, Some(3))?;
            h.insert_header("content-type", "application/json")?;
            h.insert_header("content-length", body.len().to_string())?;
            h.insert_header("x-tollgate-trace-id", ctx.trace_id.as_str())?;
            ctx.answered = Some(200);
            if !session.is_body_done() {
                session.set_keepalive(None);
            }
            session.write_response_header(Box::new(h), false).await?;
            session.write_response_body(Some(body), true).await?;
            return Ok(true);
        }

        // Authentication comes before routing: without a valid key a peer learns nothing
        // about the routes (every path is a 401), and no answer to it echoes what it sent.
        let route = self.engine.route(&method, &path, ctx.anthropic_client);
        let principal = match principal {
            Ok(p) => p,
            Err(e) => {
                // A known route still picks the error shape of its provider.
                ctx.route = route.ok();
                return self.refuse(session, ctx, &e).await;
            }
        };
        // One canonical form of the path, checked before the route is used: no dot
        // segment, escape or path parameter can walk a passthrough onto another endpoint
        // (`passthrough::check_canonical`), and what is matched is exactly what is
        // forwarded (`upstream_request_filter` sends this path and query in origin-form,
        // also for a target that came in absolute-form).
        let canonical = if session.req_header().raw_path_is_utf8() {
            crate::passthrough::check_canonical(&path).map_err(|e| e.to_string())
        } else {
            Err(crate::passthrough::NotCanonical::Form.to_string())
        };
        if let Err(why) = canonical {
            // A known key is no stranger: its connection stays open (see `refuse`).
            ctx.principal = Some(principal);
            let e = ApiError::new(
                ErrorCode::InvalidRequest,
                format!("request path not accepted: {why}"),
            );
            return self.refuse(session, ctx, &e).await;
        }
        let route = match route {
            Ok(route) => route,
            Err(e) => {
                // A caller with a valid key keeps its connection after a 404 or 405.
                ctx.principal = Some(principal);
                return self.refuse(session, ctx, &e).await;
            }
        };
        ctx.route = Some(route);
        if let Some(why) = header(session, "idempotency-key").and_then(bad_idempotency_key) {
            // Ignoring it would forward a retry the client meant to deduplicate.
            let e = ApiError::new(ErrorCode::InvalidRequest, why);
            return self.refuse(session, ctx, &e).await;
        }
        self.name_trace(session, ctx, &principal);
        ctx.principal = Some(principal);

        let max = self.engine.config().server.max_request_body;
        let declared = header(session, "content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        let too_large = |len: Option<u64>| {
            ApiError::new(
                ErrorCode::RequestTooLarge,
                match len {
                    Some(len) => {
                        format!("request body of {len} bytes exceeds the limit of {max} bytes")
                    }
                    None => format!("request body exceeds the limit of {max} bytes"),
                },
            )
        };
        if let Some(len) = declared
            && len > max
        {
            return self.refuse(session, ctx, &too_large(Some(len))).await;
        }
        // The whole body, before any upstream connection exists. pingora keeps a copy of
        // up to 64 KiB to replay it upstream; a larger body goes through `hand_off`.
        if header(session, "expect").is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue")) {
            // The head passed every check: ask for the body now rather than let the
            // client wait out its own timer (curl waits a second).
            session
                .as_downstream_mut()
                .write_continue_response()
                .await?;
            ctx.continued = true;
        }
        session.enable_retry_buffering();
        let body = match self.read_body(session, max).await {
            Ok((b, share)) => {
                ctx.body_budget = share;
                b
            }
            Err(BodyError::TooLarge) => return self.refuse(session, ctx, &too_large(None)).await,
            Err(BodyError::Busy) => {
                let mut e = ApiError::new(
                    ErrorCode::Overloaded,
                    "too many request bodies in flight; retry shortly",
                );
                e.retry_after = Some(1);
                return self.refuse(session, ctx, &e).await;
            }
            Err(BodyError::TimedOut) => {
                let timeout = self.engine.config().server.body_timeout;
                let e = ApiError::new(
                    ErrorCode::RequestTimeout,
                    format!(
                        "request body not received within {}",
                        humantime::format_duration(timeout)
                    ),
                );
                return self.refuse(session, ctx, &e).await;
            }
            Err(BodyError::Read(e)) => return Err(e),
        };
        ctx.body_read = true;
        if ctx.route.as_ref().is_some_and(|r| r.passthrough) {
            // Forwarded as it came, never metered: no hold, no row. The key's state still
            // decides (an undefined plan, a blocked or spent key is refused as on a
            // metered route).
            if let Some(p) = ctx.principal.as_ref()
                && let Err(e) = self.engine.check_plan(p)
            {
                return self.refuse(session, ctx, &e).await;
            }
            if let (Some(p), Some(r)) = (ctx.principal.clone(), ctx.route.clone()) {
                match self.engine.passthrough_admit(&p, &r).await {
                    Ok(headers) => ctx.passthrough_headers = headers,
                    Err(e) => return self.refuse(session, ctx, &e).await,
                }
            }
            ctx.replacement = Some(body.clone());
        } else if let Err(e) = self.admit(ctx, body.clone()).await {
            return self.refuse(session, ctx, &e).await;
        } else {
            // Admitted: from here on the upstream has (or will have) the prompt and charges
            // for it. A client that closes its side (FIN) while the upstream is still
            // working must not cancel the exchange (pingora's default): the answer is
            // still read — whole for a non-stream request, up to the first write that
            // fails for a stream — and settled with what the upstream reports (SPEC §4.6).
            // A client that resets its connection is handled in `Engine::finish`.
            session.as_downstream_mut().set_abort_on_close(false);
        }
        if session.as_downstream().retry_buffer_truncated() {
            return self.hand_off(session, ctx, body).await;
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The client's body was read (and admitted) in `request_filter`; pingora replays it
        // (or the subrequest feeds it) here, and the admitted body goes out in its place.
        if ctx.body_read {
            if let Some(replacement) = ctx.replacement.take() {
                *body = Some(replacement);
            } else if body.is_some() {
                // The replacement already went out whole; drop any replayed remainder.
                *body = Some(Bytes::new());
            }
        }
        if end_of_stream {
            ctx.upstream_sent_at = Some(Instant::now());
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(route) = ctx.route.as_ref() else {
            return Err(Error::explain(ErrorType::InternalError, "no route"));
        };
        let up = self.engine.upstream(route.upstream);
        let Some(addr) = up.pick() else {
            return Err(Error::explain(
                ErrorType::ConnectNoRoute,
                format!("upstream {} has no resolved address", up.cfg.name),
            ));
        };
        let sni = if up.cfg.tls {
            up.cfg.host.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, up.cfg.tls, sni);
        let o = &mut peer.options;
        o.connection_timeout = Some(up.cfg.connect_timeout);
        o.total_connection_timeout = Some(up.cfg.connect_timeout * 2);
        // pingora applies one timeout to every read of an upstream connection; the first
        // read (waiting for the model) is the long one. See docs/configuration.md.
        o.read_timeout = Some(up.cfg.first_byte_timeout);
        o.write_timeout = Some(up.cfg.idle_timeout);
        o.idle_timeout = Some(Duration::from_secs(60));
        if up.cfg.tls {
            o.verify_cert = true;
            o.verify_hostname = true;
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = ctx.route.as_ref() else {
            return Ok(());
        };
        let up = self.engine.upstream(route.upstream);
        // The caller's credentials never travel on, nor may it pick which account of the
        // operator's provider key pays (unless the upstream lets callers set that).
        for name in CREDENTIAL_HEADERS {
            req.remove_header(*name);
        }
        for name in ACCOUNT_HEADERS {
            if !up.cfg.forward_headers.iter().any(|f| f == name) {
                req.remove_header(*name);
            }
        }
        req.remove_header("accept-encoding");
        req.remove_header("idempotency-key");
        // The body is already here: the upstream has nothing to agree to.
        req.remove_header("expect");
        if let Some((name, value)) = &up.credential {
            req.insert_header(*name, value.clone())?;
        }
        req.insert_header("host", host_header(&up.cfg))?;
        // Always origin-form, from the URI the route was matched on: an absolute-form
        // target's scheme and authority are the client's, never the upstream's business.
        let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri: http::Uri = format!("{}{}", up.cfg.base_path, pq)
            .parse()
            .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream path"))?;
        req.set_uri(uri);
        // The admitted body (possibly rewritten) is known whole by now.
        req.remove_header("transfer-encoding");
        match ctx.replacement.as_ref() {
            Some(body) if !body.is_empty() => {
                req.insert_header("content-length", body.len().to_string())?;
            }
            _ => {
                req.remove_header("content-length");
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        ctx.first_byte_at.get_or_insert_with(Instant::now);
        // The operator's provider account (organization, project) is not the caller's
        // business; nor are cookies the provider set for it.
        for name in ACCOUNT_RESPONSE_HEADERS {
            resp.remove_header(*name);
        }
        // The provider's rate-limit headers describe the operator's whole account, shared
        // by every tenant (a side channel on the others' traffic); tollgate's own
        // `x-ratelimit-*` for the caller's key are added in `response_filter`.
        let account_limits: Vec<String> = resp
            .headers
            .keys()
            .map(|k| k.as_str().to_string())
            .filter(|n| n.starts_with("anthropic-ratelimit-") || n.starts_with("x-ratelimit-"))
            .collect();
        for name in account_limits {
            resp.remove_header(&name);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        resp.insert_header("x-tollgate-trace-id", ctx.trace_id.as_str())?;
        if let Some(adm) = ctx.admission.as_ref() {
            replace_ratelimit_headers(resp, adm.ratelimit_headers())?;
            let success = resp.status.is_success();
            if !success {
                // Upstream errors pass through unchanged and are not metered.
                ctx.meter = None;
            }
            if success && adm.stream {
                // The body of a metered stream may change: the hidden usage chunk is cut
                // out, and a failing upstream's stream is ended with an error event.
                resp.remove_header("content-length");
            }
            if success && !adm.stream && ctx.meter.is_some() {
                ctx.held = Some(BytesMut::new());
            }
        } else {
            replace_ratelimit_headers(resp, &ctx.passthrough_headers)?;
        }
        if !resp.status.is_success() && !resp.status.is_informational() {
            // An upstream error bills nothing: its hold is given back before the client
            // hears of it. (A 1xx is not the answer yet.)
            self.release_unbilled(ctx, resp.status.as_u16()).await;
        }
        keep_alive_framing(session, resp)?;
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(meter) = ctx.meter.as_mut() {
            if let Some(chunk) = body.take() {
                *body = Some(meter.feed(chunk));
            }
            if end_of_stream {
                let (tail, report) = meter.finish();
                if !tail.is_empty() {
                    let mut out = BytesMut::from(body.take().unwrap_or_default().as_ref());
                    out.extend_from_slice(&tail);
                    *body = Some(out.freeze());
                }
                if let Some(adm) = ctx.admission.as_mut() {
                    adm.report = Some(report);
                }
                ctx.meter = None;
            }
        }
        if let Some(held) = ctx.held.as_mut() {
            let first_and_last = end_of_stream && held.is_empty();
            if !first_and_last {
                if let Some(chunk) = body.take() {
                    held.extend_from_slice(&chunk);
                }
                if end_of_stream || held.len() > MAX_BUFFERED_BODY {
                    // Whole (or too large to hold): the meter has read all of it.
                    *body = ctx.held.take().map(BytesMut::freeze);
                } else {
                    // Nothing to write yet (pingora skips empty chunks).
                    *body = Some(Bytes::new());
                }
            } else {
                ctx.held = None;
            }
        }
        if end_of_stream {
            ctx.response_done = true;
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(c) => {
                let c = *c;
                let err = ApiError::new(
                    code_for_status(c),
                    e.context
                        .as_ref()
                        .map(|c| c.as_str().to_string())
                        .unwrap_or_default(),
                );
                if session.response_written().is_none() {
                    self.release_unbilled(ctx, err.status()).await;
                    let _ = self.refuse(session, ctx, &err).await;
                }
                c
            }
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                self.upstream_failure(
                    session,
                    ctx,
                    ErrorCode::UpstreamTimeout,
                    "upstream timed out",
                )
                .await
            }
            _ if e.esource() == &ErrorSource::Upstream
                || matches!(
                    e.etype(),
                    ErrorType::ConnectNoRoute
                        | ErrorType::ConnectRefused
                        | ErrorType::ConnectError
                        | ErrorType::TLSHandshakeFailure
                ) =>
            {
                self.upstream_failure(
                    session,
                    ctx,
                    ErrorCode::UpstreamUnavailable,
                    "upstream connection failed",
                )
                .await
            }
            _ if e.esource() == &ErrorSource::Downstream => 0,
            _ => {
                let err = ApiError::new(ErrorCode::Internal, "internal error");
                if session.response_written().is_none() {
                    self.release_unbilled(ctx, err.status()).await;
                    let _ = self.refuse(session, ctx, &err).await;
                }
                500
            }
        };
        // Our own refusal (decided once the body was read whole) keeps the connection;
        // an upstream failure or a body cut short closes it.
        let can_reuse_downstream =
            ctx.refused && matches!(e.etype(), ErrorType::HTTPStatus(_)) && session.is_body_done();
        FailToProxy {
            error_code: code,
            can_reuse_downstream,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        listener::request_done(session.as_downstream().stream());
        // A kept connection waits for its next request at most `server.keepalive_timeout`
        // (pingora's own wait is a minute, or unbounded after an HTTP/1.1 request).
        if session.get_keepalive().is_some() {
            let idle = self.engine.config().server.keepalive_timeout;
            let secs = idle.as_secs() + u64::from(idle.subsec_nanos() > 0);
            session.set_keepalive(Some(secs.max(1)));
        }
        if ctx.handed_off {
            // The subrequest that forwarded the body finished and logged the request.
            self.engine.request_ended();
            return;
        }
        let client_status = ctx
            .answered
            .or_else(|| session.response_written().map(|r| r.status.as_u16()))
            .unwrap_or(0);
        // Label by configured route only, so unknown paths cannot grow the series count.
        let path = session.req_header().uri.path();
        let route = match &ctx.route {
            Some(r) => r.label.as_str(),
            None if path == USAGE_PATH => path,
            None => "unmatched",
        };
        self.engine.metrics().request(route, client_status);
        let disconnected = e.is_some_and(|e| e.esource() == &ErrorSource::Downstream);
        // A response cut short never reached `end_of_stream`: close its meter now, so
        // what was generated so far is billed.
        let report = ctx.meter.take().map(|mut m| m.finish().1);
        let end = RequestEnd {
            client_status,
            upstream_status: ctx.upstream_status,
            complete: ctx.response_done && e.is_none(),
            client_disconnected: disconnected,
            upstream_failed: e.is_some() && !disconnected,
            report,
            started: ctx.started,
            upstream_sent_at: ctx.upstream_sent_at,
            first_byte_at: ctx.first_byte_at,
            admit_time: ctx.admit_time,
        };
        let ended = EndGuard(self.engine.clone());
        match ctx.admission.take() {
            // Settling runs in its own task: pingora reuses the client's connection only
            // after `logging` returns, and the next request on it need not wait for this
            // one's ledger write. The request stays in flight (graceful shutdown waits for
            // it) until the task ends.
            Some(adm) => {
                let engine = self.engine.clone();
                tokio::spawn(async move {
                    let _ended = ended;
                    engine.finish(adm, end).await;
                });
            }
            None => self.engine.log_unadmitted(
                ctx.principal.as_deref(),
                ctx.route.as_ref(),
                &ctx.trace_id,
                ctx.refused,
                end,
            ),
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        // Our own refusals are logged once, as the request's access log line.
        matches!(e.etype(), ErrorType::HTTPStatus(_))
    }
}

impl Gateway {
    /// A 431 when the request head is over `server.max_request_head` bytes (request
    /// target plus header names and values) or `server.max_request_headers` lines.
    fn oversized_head(&self, session: &Session) -> Option<ApiError> {
        let server = &self.engine.config().server;
        let req = session.req_header();
        let count = req.headers.len();
        if count > server.max_request_headers {
            return Some(ApiError::new(
                ErrorCode::HeaderTooLarge,
                format!(
                    "request carries {count} headers; the limit is {}",
                    server.max_request_headers
                ),
            ));
        }
        let target = req.uri.path_and_query().map_or(0, |p| p.as_str().len());
        let size = req.headers.iter().fold(target as u64, |n, (k, v)| {
            n + k.as_str().len() as u64 + v.len() as u64
        });
        (size > server.max_request_head).then(|| {
            ApiError::new(
                ErrorCode::HeaderTooLarge,
                format!(
                    "request head exceeds the limit of {} bytes",
                    server.max_request_head
                ),
            )
        })
    }

    /// Upstream failed. Before the response started: answer 502/504. After: end the
    /// stream with the format's own error event, if it has one.
    async fn upstream_failure(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        code: ErrorCode,
        msg: &str,
    ) -> u16 {
        if session.response_written().is_none() {
            self.release_unbilled(ctx, code.status()).await;
            let _ = self.refuse(session, ctx, &ApiError::new(code, msg)).await;
            return code.status();
        }
        if let Some(format) = ctx.route.as_ref().and_then(|r| r.format) {
            let streaming = ctx.admission.as_ref().is_some_and(|a| a.stream);
            if streaming && let Some(ev) = failure_event(format, msg) {
                let _ = session.write_response_body(Some(ev), true).await;
            }
        }
        code.status()
    }
}

impl Gateway {
    /// Give back the hold of an admitted request whose answer will be `status` and bills
    /// nothing (an upstream non-2xx, our own error before the first byte), before that
    /// answer is written: a client that retries the moment it has it must not be refused
    /// by this request's own hold (nor set off a threshold alert). `logging` then only
    /// logs the request (`Engine::finish` does not release or settle it again). The
    /// engine decides, by the same rule `finish` uses, whether the outcome is unbilled.
    async fn release_unbilled(&self, ctx: &mut Ctx, status: u16) {
        let Some(adm) = ctx.admission.as_mut() else {
            return;
        };
        let end = RequestEnd {
            client_status: status,
            upstream_status: ctx.upstream_status,
            complete: false,
            client_disconnected: false,
            upstream_failed: true,
            report: None,
            started: ctx.started,
            upstream_sent_at: ctx.upstream_sent_at,
            first_byte_at: ctx.first_byte_at,
            admit_time: ctx.admit_time,
        };
        self.engine.release_unbilled(adm, &end).await;
    }

    /// Once the key is known, the trace id is too (SPEC §4.7): `<key_id>:<Idempotency-Key>`
    /// when the client sent a valid one, so every answer from here on (200, 409, 403, 429,
    /// passthrough) names the trace the client's retries share. An invalid key keeps the
    /// generated id; admission refuses it with 400.
    fn name_trace(&self, session: &Session, ctx: &mut Ctx, p: &crate::auth::Principal) {
        ctx.idempotency_key = header(session, "idempotency-key")
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        if let Some(k) = ctx.idempotency_key.as_deref()
            && crate::engine::valid_idempotency_key(k)
        {
            ctx.trace_id = crate::engine::idempotent_trace_id(&p.key_id, k);
        }
    }
}

/// Put tollgate's `x-ratelimit-*` headers on an answer, replacing the upstream's own of the
/// kinds (requests, tokens) tollgate reports.
fn replace_ratelimit_headers(
    resp: &mut ResponseHeader,
    ours: &[(&'static str, String)],
) -> Result<()> {
    if ours.is_empty() {
        return Ok(());
    }
    let reported = |name: &str| {
        name.starts_with("x-ratelimit-")
            && ours.iter().any(|(n, _)| {
                let kind = if n.ends_with("requests") {
                    "requests"
                } else {
                    "tokens"
                };
                name.ends_with(kind)
            })
    };
    let names: Vec<String> = resp
        .headers
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|n| reported(n))
        .collect();
    for name in names {
        resp.remove_header(&name);
    }
    for (n, v) in ours {
        resp.insert_header(*n, v.as_str())?;
    }
    Ok(())
}

/// Frame a proxied answer so an HTTP/1.1 client's connection is reused: a body with
/// neither `Content-Length` nor `Transfer-Encoding` (tollgate removed the length because it
/// changes the body, or the upstream delimited it by closing) is sent chunked. Without
/// this pingora writes it close-delimited and silently drops keep-alive, while a
/// `Connection: keep-alive` copied from upstream still says otherwise. HTTP/1.0 clients
/// cannot read chunked (close-delimited is their framing); HTTP/2 frames by itself.
fn keep_alive_framing(session: &Session, resp: &mut ResponseHeader) -> Result<()> {
    let req = session.req_header();
    let bodyless = req.method == http::Method::HEAD
        || resp.status.is_informational()
        || resp.status == http::StatusCode::NO_CONTENT
        || resp.status == http::StatusCode::NOT_MODIFIED;
    if req.version == http::Version::HTTP_11
        && !bodyless
        && resp.headers.get("content-length").is_none()
        && resp.headers.get("transfer-encoding").is_none()
    {
        resp.insert_header("transfer-encoding", "chunked")?;
    }
    Ok(())
}

/// Marks the request ended when it is finished (or the finishing task is cancelled).
struct EndGuard(Arc<Engine>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

fn code_for_status(s: u16) -> ErrorCode {
    match s {
        400 => ErrorCode::InvalidRequest,
        401 => ErrorCode::InvalidApiKey,
        403 => ErrorCode::QuotaDisabled,
        404 => ErrorCode::NotFound,
        409 => ErrorCode::DuplicateRequest,
        413 => ErrorCode::RequestTooLarge,
        429 => ErrorCode::QuotaExceeded,
        502 => ErrorCode::UpstreamUnavailable,
        503 => ErrorCode::StoreUnavailable,
        504 => ErrorCode::UpstreamTimeout,
        _ => ErrorCode::Internal,
    }
}

fn host_header(u: &crate::config::UpstreamConfig) -> String {
    let default = if u.tls { 443 } else { 80 };
    let host = if u.host.contains(':') {
        format!("[{}]", u.host)
    } else {
        u.host.clone()
    };
    if u.port == default {
        host
    } else {
        format!("{host}:{}", u.port)
    }
}
