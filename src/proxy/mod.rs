//! The pingora glue: tollgate's [`ProxyHttp`] implementation and its per-request context.
//!
//! Only glue lives here — every decision is made by [`crate::engine`], which knows nothing
//! of pingora. The phases, in order:
//!
//! 1. `request_filter`: route (404), auth (401; a key created since the last directory
//!    refresh is looked up, see [`crate::auth`]), trace id, size (413 by
//!    `Content-Length`). A passthrough route ([`crate::passthrough`]) is forwarded from
//!    here as it comes, never admitted. A body
//!    whose length is known and at most [`SMALL_BODY`] is read here in full and admitted
//!    (400/409/403/429) *before any upstream connection*; pingora then replays it from its
//!    retry buffer into `request_body_filter`, where it is swapped for the (possibly
//!    rewritten) body.
//! 2. Larger or chunked bodies exceed pingora's 64 KiB retry buffer, which it would not
//!    replay (pingora #349/#688). They are collected in `request_body_filter` instead —
//!    every chunk swallowed — and admitted when the last chunk arrives; the whole body is
//!    then sent as one chunk with chunked transfer encoding. Such a request has already
//!    opened an upstream connection and sent headers when it is refused; the refusal
//!    aborts that upstream request.
//! 3. `upstream_request_filter`: the client's tollgate key is replaced by the upstream's own
//!    key, `accept-encoding` is dropped so the meter sees plain text.
//! 4. `upstream_response_filter` / `response_body_filter`: headers (trace id, rate-limit
//!    headers), then every chunk through the meter, which returns the bytes unchanged
//!    (or minus the usage chunk the client did not ask for). An answer whose length
//!    tollgate removed (or the upstream never sent) goes out chunked, so an HTTP/1.1
//!    client's connection is reused (`keep_alive_framing`).
//! 5. `logging` runs after success, errors and disconnects alike: the one place the
//!    request is finished (settled or released, in a task it spawns so the client's
//!    connection is free at once) and logged.

pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use crate::api::meter::{Meter, failure_event};
use crate::config::UpstreamKind;
use crate::engine::{Admission, Engine, RequestEnd, Route};
use crate::errors::{ApiError, ErrorCode};

/// Bodies up to this size (with a known length) are admitted before connecting upstream;
/// it must not exceed pingora's retry buffer (64 KiB), which replays the body to upstream.
pub const SMALL_BODY: usize = 64 * 1024;

/// A 429 whose limit frees within this many seconds is left to the SDKs' own retries;
/// a later (or never) one carries `x-should-retry: false`.
pub const SDK_RETRY_WITHIN_SECS: u64 = 60;

/// The caller's own usage report (SPEC §6).
const USAGE_PATH: &str = "/v1/tollgate/usage";

/// Per-request state.
pub struct Ctx {
    pub trace_id: String,
    started: Instant,
    route: Option<Route>,
    principal: Option<Arc<crate::auth::Principal>>,
    idempotency_key: Option<String>,
    /// Body being collected in `request_body_filter` (large/chunked path).
    collecting: Option<BytesMut>,
    /// Set once admitted.
    admission: Option<Admission>,
    /// The body to send upstream in place of the client's, once.
    replacement: Option<Bytes>,
    meter: Option<Meter>,
    /// Status we answered ourselves (refusals, upstream failures).
    answered: Option<u16>,
    upstream_status: Option<u16>,
    upstream_sent_at: Option<Instant>,
    first_byte_at: Option<Instant>,
    response_done: bool,
    admit_time: Duration,
    /// A refusal decided in `request_body_filter`, answered by `fail_to_proxy`.
    refusal: Option<ApiError>,
    /// We answered with one of our own errors.
    refused: bool,
    /// The request carries `anthropic-version`: an Anthropic client (routing and the
    /// shape of errors answered before a route is known).
    anthropic_client: bool,
    /// Rate-limit headers of a passthrough answer (nothing is admitted for those).
    passthrough_headers: Vec<(&'static str, String)>,
    /// Body bytes of a passthrough request forwarded so far (bounded like any body).
    passthrough_bytes: u64,
}

/// The proxy service.
pub struct Gateway {
    pub engine: Arc<Engine>,
}

impl Gateway {
    pub fn new(engine: Arc<Engine>) -> Gateway {
        Gateway { engine }
    }

    fn kind(&self, ctx: &Ctx) -> UpstreamKind {
        match &ctx.route {
            Some(r) => r.kind,
            None if ctx.anthropic_client => UpstreamKind::Anthropic,
            None => UpstreamKind::Openai,
        }
    }

    /// Answer with one of our errors and remember the status for logging.
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
        if err.code == ErrorCode::QuotaExceeded
            && err.retry_after.is_none_or(|s| s > SDK_RETRY_WITHIN_SECS)
        {
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
        // body has been read (refusals decided from the body, or a request without one):
        // pingora closes it by itself when a response is written before the body is done
        // (`close_on_response_before_downstream_finish`, on by default).
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(true)
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

fn header<'a>(session: &'a Session, name: &str) -> Option<&'a [u8]> {
    session.req_header().headers.get(name).map(|v| v.as_bytes())
}

fn to_pingora(err: ApiError) -> Box<Error> {
    // Carried through pingora as an HTTP status; `fail_to_proxy` renders the shape.
    Error::explain(ErrorType::HTTPStatus(err.status()), err.message)
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.engine.request_started();
        Ctx {
            trace_id: uuid::Uuid::now_v7().to_string(),
            started: Instant::now(),
            route: None,
            principal: None,
            idempotency_key: None,
            collecting: None,
            admission: None,
            replacement: None,
            meter: None,
            answered: None,
            upstream_status: None,
            upstream_sent_at: None,
            first_byte_at: None,
            response_done: false,
            admit_time: Duration::ZERO,
            refusal: None,
            refused: false,
            anthropic_client: false,
            passthrough_headers: Vec::new(),
            passthrough_bytes: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        ctx.anthropic_client = header(session, "anthropic-version").is_some();

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
            let body = Bytes::from(self.engine.usage_json_for(&p).await.to_string());
            self.name_trace(session, ctx, &p);
            ctx.principal = Some(p);
            let mut h = ResponseHeader::build(200, Some(3))?;
            h.insert_header("content-type", "application/json")?;
            h.insert_header("content-length", body.len().to_string())?;
            h.insert_header("x-tollgate-trace-id", ctx.trace_id.as_str())?;
            ctx.answered = Some(200);
            session.write_response_header(Box::new(h), false).await?;
            session.write_response_body(Some(body), true).await?;
            return Ok(true);
        }

        let Some(route) = self.engine.route(&method, &path, ctx.anthropic_client) else {
            return self
                .refuse(
                    session,
                    ctx,
                    &ApiError::new(ErrorCode::NotFound, format!("no route for {method} {path}")),
                )
                .await;
        };
        ctx.route = Some(route);
        let principal = match principal {
            Ok(p) => p,
            Err(e) => return self.refuse(session, ctx, &e).await,
        };
        self.name_trace(session, ctx, &principal);
        ctx.principal = Some(principal);

        let max = self.engine.config().server.max_request_body;
        let content_length = header(session, "content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(len) = content_length
            && len > max
        {
            return self
                .refuse(
                    session,
                    ctx,
                    &ApiError::new(
                        ErrorCode::RequestTooLarge,
                        format!("request body of {len} bytes exceeds the limit of {max} bytes"),
                    ),
                )
                .await;
        }
        if ctx.route.as_ref().is_some_and(|r| r.passthrough) {
            // Forwarded as it comes (body included), never admitted: no hold, no row.
            if let (Some(p), Some(r)) = (ctx.principal.as_ref(), ctx.route.as_ref()) {
                ctx.passthrough_headers = self.engine.passthrough_headers(p, r).await;
            }
            return Ok(false);
        }
        let chunked = header(session, "transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
        match content_length {
            Some(len) if !chunked && len as usize <= SMALL_BODY => {
                // Small body: read it all now (pingora keeps a replay copy) and decide
                // before any upstream connection exists.
                session.enable_retry_buffering();
                let mut buf = BytesMut::with_capacity(len as usize);
                while let Some(chunk) = session.read_request_body().await? {
                    buf.extend_from_slice(&chunk);
                    if buf.len() as u64 > max {
                        return self
                            .refuse(
                                session,
                                ctx,
                                &ApiError::new(
                                    ErrorCode::RequestTooLarge,
                                    "request body too large",
                                ),
                            )
                            .await;
                    }
                }
                if let Err(e) = self.admit(ctx, buf.freeze()).await {
                    return self.refuse(session, ctx, &e).await;
                }
            }
            _ => {
                ctx.collecting = Some(BytesMut::with_capacity(
                    content_length.unwrap_or(SMALL_BODY as u64).min(max) as usize,
                ));
            }
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
        if ctx.route.as_ref().is_some_and(|r| r.passthrough) {
            // A passthrough body streams through untouched, within the same size bound.
            ctx.passthrough_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
            let max = self.engine.config().server.max_request_body;
            if ctx.passthrough_bytes > max {
                let e = ApiError::new(
                    ErrorCode::RequestTooLarge,
                    format!("request body exceeds the limit of {max} bytes"),
                );
                ctx.refusal = Some(e.clone());
                return Err(to_pingora(e));
            }
            return Ok(());
        }
        if let Some(buf) = ctx.collecting.as_mut() {
            if let Some(chunk) = body.take() {
                buf.extend_from_slice(&chunk);
                let max = self.engine.config().server.max_request_body;
                if buf.len() as u64 > max {
                    ctx.collecting = None;
                    let e = ApiError::new(
                        ErrorCode::RequestTooLarge,
                        format!("request body exceeds the limit of {max} bytes"),
                    );
                    ctx.refusal = Some(e.clone());
                    return Err(to_pingora(e));
                }
            }
            if !end_of_stream {
                // Swallow: an empty chunk is "nothing yet", `None` would mean end of body.
                *body = Some(Bytes::new());
                return Ok(());
            }
            let full = ctx
                .collecting
                .take()
                .map(BytesMut::freeze)
                .unwrap_or_default();
            if let Err(e) = self.admit(ctx, full).await {
                ctx.refusal = Some(e.clone());
                return Err(to_pingora(e));
            }
        }
        if ctx.admission.is_some() {
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
        req.remove_header("authorization");
        req.remove_header("x-api-key");
        req.remove_header("accept-encoding");
        req.remove_header("idempotency-key");
        match up.cfg.kind {
            UpstreamKind::Openai => {
                req.insert_header(
                    "authorization",
                    format!("Bearer {}", up.cfg.api_key.expose()),
                )?;
            }
            UpstreamKind::Anthropic => {
                req.insert_header("x-api-key", up.cfg.api_key.expose())?;
            }
        }
        req.insert_header("host", host_header(&up.cfg))?;
        if !up.cfg.base_path.is_empty() {
            let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let uri: http::Uri = format!("{}{}", up.cfg.base_path, pq)
                .parse()
                .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream path"))?;
            req.set_uri(uri);
        }
        if let Some(body) = ctx.replacement.as_ref() {
            // Small path: the body is known now (possibly rewritten).
            req.remove_header("transfer-encoding");
            req.insert_header("content-length", body.len().to_string())?;
        } else if ctx.collecting.is_some() {
            // Large path: the body is decided later and may change size.
            req.remove_header("content-length");
            req.insert_header("transfer-encoding", "chunked")?;
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
        } else {
            replace_ratelimit_headers(resp, &ctx.passthrough_headers)?;
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
        if end_of_stream {
            ctx.response_done = true;
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(c) => {
                let c = *c;
                let err = ctx.refusal.take().unwrap_or_else(|| {
                    ApiError::new(
                        code_for_status(c),
                        e.context
                            .as_ref()
                            .map(|c| c.as_str().to_string())
                            .unwrap_or_default(),
                    )
                });
                if session.response_written().is_none() {
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
