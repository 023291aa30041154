//! The admin listener (hyper, `server.admin_listen`, localhost by default): the operator's
//! HTTP surface (SPEC §6) — keys, limits, usage, the ledger, spend reports, the journal —
//! plus health, readiness and Prometheus metrics.
//!
//! Every request passes, in order:
//!
//! 1. **Host** ([`AllowedHosts`]): on a loopback address (or with `server.admin_hosts`
//!    set) only the listener's own address, `localhost` and the configured names are
//!    answered — a web page cannot reach the API through DNS rebinding. 400 `invalid_host`.
//! 2. **Canonical path** ([`Endpoint::parse`]): one leading slash, no empty, `.` or `..`
//!    segment, no percent-escape of a character that needs none (`%61dmin`). Anything else
//!    is 400 `invalid_path` and is never routed: authentication is decided on the parsed
//!    endpoint, never on the raw string.
//! 3. **Token**: every endpoint except `/healthz`, `/readyz` and `/metrics` — unknown paths
//!    included, so they do not reveal themselves — needs `Authorization: Bearer
//!    <admin_token>`, compared in constant time over SHA-256 digests (which hides the
//!    token's length too). With no admin token configured those routes answer 401. The
//!    usage page at `/admin/` ([`page`]) also takes the token as `?token=`, since a browser
//!    cannot send the header when it navigates; no other route does.
//! 4. **Content type**: `POST` and `PUT` need `Content-Type: application/json` (415
//!    otherwise), so no cross-site form or simple request can write.
//!
//! Every answer carries `Cache-Control: no-store` (key secrets, usage and ledger data must
//! not sit in a browser or proxy cache). The listener speaks HTTP/1.1 only, closes a
//! connection whose request head does not arrive within `server.header_timeout` (its body
//! within `server.body_timeout`, each write within `server.send_timeout`, its whole life
//! within [`CONNECTION_LIFETIME`]), and holds at most [`MAX_CONNECTIONS`] connections, at
//! most [`MAX_CONNECTIONS_PER_ADDRESS`] from one client address. It is plain HTTP: keep it on loopback or
//! behind TLS (docs/operations.md, "Threat model").
//!
//! The routes are listed once in [`ROUTES`]; the OpenAPI document served at
//! `/admin/openapi.json` ([`OPENAPI`]) must describe exactly those, which a unit test
//! checks. Handlers live in [`keys`] (keys and limits), [`usage`] (usage, ledger, spend) and
//! [`page`] (the usage page).
//! Bodies are JSON of at most [`MAX_BODY`] bytes; errors are
//! `{"error": {"message", "code"}}` (plus `trace_id` for a 503/500, whose detail is only
//! logged). Neither the admin token nor a key secret is ever
//! logged.

mod keys;
pub mod page;
mod usage;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::StorageMode;
use crate::db::DbError;
use crate::engine::Engine;
use crate::keys::{KeyStore, Subject};
use crate::ledger::Ledger;
use crate::spend::SpendStore;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 64 * 1024;

/// Most connections the admin listener holds at once; more are closed at accept. Its
/// clients are the CLI, a metrics scraper, probes and the odd browser tab.
pub const MAX_CONNECTIONS: usize = 64;

/// Most connections one client address holds at once (a quarter of
/// [`MAX_CONNECTIONS`]): a client flooding the listener, token or not, leaves slots for
/// the others.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = MAX_CONNECTIONS / 4;

/// Longest any admin connection lives, however busy: the longest report finishes well
/// within it, and a client that keeps a connection busy for ever gives it up.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// The OpenAPI 3 document of this listener, served at `/admin/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route: path template and methods. The OpenAPI document lists exactly these.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/healthz", &["GET"]),
    ("/readyz", &["GET"]),
    ("/metrics", &["GET"]),
    ("/admin/keys", &["GET", "POST"]),
    ("/admin/keys/{id}", &["GET", "DELETE"]),
    ("/admin/keys/{id}/limits", &["PUT"]),
    ("/admin/users/{id}/limits", &["PUT"]),
    ("/admin/tenants/{id}/limits", &["PUT"]),
    ("/admin/usage", &["GET"]),
    ("/admin/transactions", &["GET"]),
    ("/admin/spend", &["GET"]),
    ("/admin/journal", &["GET"]),
    ("/admin/reconcile", &["GET", "POST"]),
    ("/admin/openapi.json", &["GET"]),
    ("/admin/", &["GET"]),
];

type Resp = Response<Full<Bytes>>;

/// An admin request that cannot be answered as asked.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "the path is not in canonical form (empty, `.` or `..` segments, or needless percent-escapes)"
    )]
    InvalidPath,
    #[error("Host `{0}` is not a name of this listener; add it to server.admin_hosts")]
    InvalidHost(String),
    #[error("send `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("admin token required: send `Authorization: Bearer <server.admin_token>`")]
    Unauthorized,
    #[error("admin token required: open /admin/?token=<server.admin_token>")]
    PageUnauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed; use {0}")]
    MethodNotAllowed(&'static str),
    #[error("request body exceeds {MAX_BODY} bytes")]
    TooLarge,
    /// The detail is for the log only ([`handle`] logs it under a trace id).
    #[error("a store tollgate depends on is unavailable; retry later")]
    Unavailable(String),
    /// The detail is for the log only.
    #[error("internal error")]
    Internal(String),
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::BadRequest(_) | AdminError::InvalidPath | AdminError::InvalidHost(_) => {
                StatusCode::BAD_REQUEST
            }
            AdminError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AdminError::Unauthorized | AdminError::PageUnauthorized => StatusCode::UNAUTHORIZED,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AdminError::BadRequest(_) => "invalid_request",
            AdminError::InvalidPath => "invalid_path",
            AdminError::InvalidHost(_) => "invalid_host",
            AdminError::UnsupportedMediaType => "unsupported_media_type",
            AdminError::Unauthorized | AdminError::PageUnauthorized => "invalid_admin_token",
            AdminError::NotFound(_) => "not_found",
            AdminError::MethodNotAllowed(_) => "method_not_allowed",
            AdminError::TooLarge => "request_too_large",
            AdminError::Unavailable(_) => "store_unavailable",
            AdminError::Internal(_) => "internal_error",
        }
    }

    fn response(&self) -> Resp {
        self.response_traced(None)
    }

    /// The answer; a failure (503, 500) names the trace id its detail is logged under.
    fn response_traced(&self, trace_id: Option<&str>) -> Resp {
        let message = match trace_id {
            Some(t) => format!("{self} (trace id {t})"),
            None => self.to_string(),
        };
        let mut error = serde_json::json!({"message": message, "code": self.code()});
        if let Some(t) = trace_id {
            error["trace_id"] = serde_json::json!(t);
        }
        let mut r = json(self.status(), &serde_json::json!({ "error": error }));
        if let Some(v) = trace_id.and_then(|t| HeaderValue::from_str(t).ok()) {
            r.headers_mut().insert("x-tollgate-trace-id", v);
        }
        if let AdminError::MethodNotAllowed(allow) = self {
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        r
    }
}

impl From<DbError> for AdminError {
    /// `Invalid` is what the key and limit functions answer for bad input (names, limit
    /// specs); everything else means the database did not do its job.
    fn from(e: DbError) -> AdminError {
        match e {
            DbError::Invalid(m) => AdminError::BadRequest(m),
            other => AdminError::Unavailable(other.to_string()),
        }
    }
}

fn json(status: StatusCode, v: &impl Serialize) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Healthz,
    Readyz,
    Metrics,
    Keys,
    Key(String),
    Limits(Subject),
    Usage,
    Transactions,
    Spend,
    Journal,
    Reconcile,
    OpenApi,
    Page,
}

impl Endpoint {
    /// Match a request path; `Ok(None)` for no route, [`AdminError::InvalidPath`] for a
    /// path not in canonical form ([`canonical_segments`]). Id segments are
    /// percent-decoded.
    fn parse(path: &str) -> Result<Option<Endpoint>, AdminError> {
        let segments = canonical_segments(path)?;
        let id = |s: &str| -> Result<String, AdminError> {
            match percent_decode(s, false) {
                Some(id) if !id.is_empty() && !id.chars().any(char::is_control) => Ok(id),
                _ => Err(AdminError::BadRequest(format!(
                    "`{s}` is not a valid percent-encoded id"
                ))),
            }
        };
        Ok(Some(match segments.as_slice() {
            ["healthz"] => Endpoint::Healthz,
            ["readyz"] => Endpoint::Readyz,
            ["metrics"] => Endpoint::Metrics,
            ["admin", "keys"] => Endpoint::Keys,
            ["admin", "keys", k] => Endpoint::Key(id(k)?),
            ["admin", "keys", k, "limits"] => Endpoint::Limits(Subject::Key(id(k)?)),
            ["admin", "users", u, "limits"] => Endpoint::Limits(Subject::User(id(u)?)),
            ["admin", "tenants", t, "limits"] => Endpoint::Limits(Subject::Tenant(id(t)?)),
            ["admin", "usage"] => Endpoint::Usage,
            ["admin", "transactions"] => Endpoint::Transactions,
            ["admin", "spend"] => Endpoint::Spend,
            ["admin", "journal"] => Endpoint::Journal,
            ["admin", "reconcile"] => Endpoint::Reconcile,
            ["admin", "openapi.json"] => Endpoint::OpenApi,
            ["admin", ""] => Endpoint::Page,
            _ => return Ok(None),
        }))
    }

    /// Whether the endpoint answers without the admin token.
    fn is_open(&self) -> bool {
        matches!(
            self,
            Endpoint::Healthz | Endpoint::Readyz | Endpoint::Metrics
        )
    }

    /// Methods the endpoint answers, as for an `Allow` header.
    fn allow(&self) -> &'static str {
        match self {
            Endpoint::Keys => "GET, POST",
            Endpoint::Key(_) => "GET, DELETE",
            Endpoint::Limits(_) => "PUT",
            Endpoint::Reconcile => "GET, POST",
            _ => "GET",
        }
    }
}

/// The segments of a path in canonical form: exactly one leading `/`, no empty segment
/// (but a final one, as in `/admin/`), no `.` or `..`, and `%XX` escapes only for bytes
/// that must be escaped (an escaped letter, digit or `-._~` is an attempt to look like
/// something else). Fixed segments are then compared literally, so `/admin/%6beys` can
/// never match `keys`.
fn canonical_segments(path: &str) -> Result<Vec<&str>, AdminError> {
    let rest = path.strip_prefix('/').ok_or(AdminError::InvalidPath)?;
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if (seg.is_empty() && i != last) || *seg == "." || *seg == ".." {
            return Err(AdminError::InvalidPath);
        }
        let b = seg.as_bytes();
        let mut j = 0;
        while j < b.len() {
            if b[j] == b'%' {
                let byte = b
                    .get(j + 1..j + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(AdminError::InvalidPath)?;
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    return Err(AdminError::InvalidPath);
                }
                j += 3;
            } else {
                j += 1;
            }
        }
    }
    // A lone `/` (or `//…`) has an empty first segment.
    if segments[0].is_empty() {
        return Err(AdminError::InvalidPath);
    }
    Ok(segments)
}

/// Percent-encode a path segment or query value (everything but `A-Z a-z 0-9 - . _ ~`),
/// for clients building admin URLs from ids.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `Host` names the admin listener answers to (DNS-rebinding defence); `None` means
/// any (a non-loopback listener with no `server.admin_hosts`).
#[derive(Debug, Clone)]
pub struct AllowedHosts(Option<Vec<String>>);

impl AllowedHosts {
    /// For a listener bound to `local`: its own address, `localhost` and `configured`,
    /// checked when `local` is loopback or names are configured.
    pub fn new(local: std::net::SocketAddr, configured: &[String]) -> AllowedHosts {
        if configured.is_empty() && !local.ip().is_loopback() {
            return AllowedHosts(None);
        }
        let own = match local.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let mut names = vec![own, "localhost".to_string()];
        names.extend(configured.iter().map(|h| host_part(h).to_string()));
        AllowedHosts(Some(names))
    }

    /// Check the request's `Host` header and, for an absolute-form target, its authority.
    fn check(&self, req: &Request<Incoming>) -> Result<(), AdminError> {
        let Some(names) = &self.0 else {
            return Ok(());
        };
        let header = req
            .headers()
            .get(HOST)
            .map(|h| h.to_str().unwrap_or("\u{fffd}"));
        let authority = req.uri().authority().map(|a| a.as_str());
        if header.is_none() && authority.is_none() {
            return Err(AdminError::InvalidHost(String::new()));
        }
        for presented in header.into_iter().chain(authority) {
            let host = host_part(presented).to_ascii_lowercase();
            if !names.contains(&host) {
                let shown: String = presented.chars().take(100).collect();
                return Err(AdminError::InvalidHost(shown));
            }
        }
        Ok(())
    }
}

/// `host[:port]` or `[v6][:port]` → the host, brackets kept for IPv6.
fn host_part(h: &str) -> &str {
    let h = h.trim();
    let h = h.rsplit_once('@').map_or(h, |(_, host)| host);
    if h.starts_with('[') {
        return h.find(']').map_or(h, |end| &h[..=end]);
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

/// Whether a `Content-Type` header says JSON (`application/json`, parameters allowed).
fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether an `Authorization` header carries the configured admin token.
fn authorized(configured: &str, authorization: Option<&HeaderValue>) -> bool {
    let Some(presented) = authorization.and_then(|v| v.to_str().ok()).and_then(|h| {
        let (scheme, rest) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    }) else {
        return false;
    };
    token_matches(configured, presented)
}

/// Whether `presented` is the configured admin token; never true when none is configured.
fn token_matches(configured: &str, presented: &str) -> bool {
    if configured.is_empty() {
        return false;
    }
    // Digests have a fixed length, so the comparison time says nothing about the token.
    Sha256::digest(presented.as_bytes())
        .ct_eq(&Sha256::digest(configured.as_bytes()))
        .into()
}

/// Decode `%XX` escapes (and `+` as a space in query strings); `None` when malformed or
/// not UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Decoded query parameters, in order.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Result<Query, AdminError> {
        let mut out = Vec::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match (percent_decode(k, true), percent_decode(v, true)) {
                (Some(k), Some(v)) => out.push((k, v)),
                _ => {
                    return Err(AdminError::BadRequest(format!(
                        "query parameter `{pair}` is not valid percent-encoded UTF-8"
                    )));
                }
            }
        }
        Ok(Query(out))
    }

    /// The first value of `name`; an empty value counts as absent.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// Refuse parameters outside `known`, so a typo does not silently widen a query.
    fn only(&self, known: &[&str]) -> Result<(), AdminError> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(AdminError::BadRequest(format!(
                "unknown query parameter `{k}`; expected one of: {}",
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

/// Read a JSON body of at most [`MAX_BODY`] bytes, whole within `server.body_timeout`
/// (a body trickled in byte by byte does not hold the connection).
async fn read_json<T: DeserializeOwned>(
    engine: &Engine,
    req: Request<Incoming>,
) -> Result<T, AdminError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(AdminError::TooLarge);
    }
    let timeout = engine.config().server.body_timeout;
    let body = tokio::time::timeout(timeout, Limited::new(req.into_body(), MAX_BODY).collect())
        .await
        .map_err(|_| {
            AdminError::BadRequest(format!(
                "request body not received within server.body_timeout ({})",
                humantime::format_duration(timeout)
            ))
        })?
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                AdminError::TooLarge
            } else {
                AdminError::BadRequest(format!("cannot read the request body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| AdminError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Events journaled but not yet applied, per target (SPEC §2 journal status): the
/// shipper's backlog in shared mode; empty in embedded mode, where the ledger is the journal.
pub fn journal_status(engine: &Engine) -> crate::journal::JournalStatus {
    engine.journal().status()
}

/// Whether each store this instance depends on answers, by store name.
pub async fn store_status(engine: &Engine) -> BTreeMap<&'static str, bool> {
    let sqlite = engine
        .db()
        .call(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
        .await
        .is_ok();
    let mut out = BTreeMap::from([("sqlite", sqlite)]);
    out.extend(engine.store().health());
    out
}

async fn readyz(engine: &Engine) -> Resp {
    let stores = store_status(engine).await;
    let journal = journal_status(engine);
    // Serving needs the local journal; a down Redis only stops us under
    // `on_unavailable = "closed"` (the other policies keep answering).
    let closed = engine.config().storage.on_unavailable == crate::config::OnUnavailable::Closed;
    let ready = stores
        .iter()
        .all(|(name, up)| *up || (*name == "redis" && !closed));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let stores: BTreeMap<&str, &str> = stores
        .iter()
        .map(|(k, up)| (*k, if *up { "up" } else { "down" }))
        .collect();
    let mut body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "mode": engine.config().storage.mode,
        "stores": stores,
        "open_reservations": engine.store().open_holds(),
        "backlog": journal.backlog,
        // Events the ledger of record refused (shared mode): shipping goes on behind
        // them, so they do not make the instance unready, but each is a charge missing
        // from the ledger of record until an operator replays it.
        "quarantined": journal.quarantined,
    });
    // Shared counters: the instances sharing them as last heard (the local-mode share
    // divides by `live`), and those a rebuild of a missing counter waits for.
    if let Some((live, waiting_on)) = engine.store().fleet() {
        body["fleet"] = serde_json::json!({"live": live, "waiting_on": waiting_on});
    }
    json(status, &body)
}

/// Levels are read at scrape time (cheaper than tracking every change), then rendered.
async fn metrics(engine: &Engine) -> Result<Resp, AdminError> {
    let m = engine.metrics();
    m.set_open_reservations(engine.store().open_holds());
    let a = engine.alerts().stats();
    let load = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
    m.set_alert_totals(
        load(&a.fired),
        load(&a.dropped),
        load(&a.delivered),
        load(&a.failed),
    );
    m.set_key_lookup_totals(engine.authenticator().lookup_stats());
    for (store, up) in store_status(engine).await {
        m.set_store_up(store, up);
    }
    let journal = journal_status(engine);
    if journal.backlog.is_empty() {
        // Embedded mode: the ledger is the journal, so its backlog is always zero. The
        // series exists so dashboards and alerts work unchanged in both modes.
        m.set_journal_backlog("ledger", 0);
    }
    for (target, n) in &journal.backlog {
        m.set_journal_backlog(target, *n);
    }
    let oldest = journal
        .oldest_unshipped_at
        .as_deref()
        .and_then(crate::time::from_text)
        .map(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default());
    m.set_journal_oldest_unshipped(oldest);
    m.set_journal_quarantined_total(journal.quarantined_total);
    if let Some(a) = engine.applier() {
        m.set_counter_events_set_aside_total(a.set_aside_total());
    }
    let text = m
        .render()
        .map_err(|e| AdminError::Internal(e.to_string()))?;
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    Ok(r)
}

/// The stores the handlers use besides the engine: spend reports, and keys, limits and
/// ledger rows where the CLI reads and writes them (Postgres in shared mode, both over one
/// pool).
struct Stores {
    spend: Arc<dyn SpendStore>,
    /// `Err` (with why) when the store could not be set up: those routes answer 503.
    keys: Result<Arc<dyn KeyStore>, String>,
    /// Where `/admin/transactions` reads: the ledger of record (in shared mode Postgres —
    /// the local journal there holds only this instance's rows, and only until they are
    /// shipped and compacted).
    ledger: Result<Arc<dyn Ledger>, String>,
}

impl Stores {
    fn for_engine(engine: &Engine) -> Stores {
        let config = engine.config();
        let db = engine.db();
        let spend = crate::spend::open(config, db.path());
        type Both = (
            Result<Arc<dyn KeyStore>, String>,
            Result<Arc<dyn Ledger>, String>,
        );
        let (keys, ledger): Both = match config.storage.mode {
            StorageMode::Embedded => (
                Ok(Arc::new(crate::keys::sqlite::SqliteKeyStore::new(
                    db.clone(),
                ))),
                Ok(Arc::new(crate::ledger::sqlite::SqliteLedger::new(
                    db.clone(),
                ))),
            ),
            StorageMode::Shared => match crate::pg::PgPool::new(&config.postgres_url()) {
                Ok(pool) => (
                    Ok(Arc::new(crate::keys::postgres::PgKeyStore::from_pool(
                        pool.clone(),
                    ))),
                    Ok(Arc::new(crate::ledger::postgres::PgLedger::from_pool(pool))),
                ),
                Err(e) => (Err(e.to_string()), Err(e.to_string())),
            },
        };
        Stores {
            spend,
            keys,
            ledger,
        }
    }

    fn keys(&self) -> Result<&dyn KeyStore, AdminError> {
        self.keys
            .as_deref()
            .map_err(|e| AdminError::Unavailable(e.clone()))
    }

    fn ledger(&self) -> Result<&dyn Ledger, AdminError> {
        self.ledger
            .as_deref()
            .map_err(|e| AdminError::Unavailable(e.clone()))
    }
}

async fn dispatch(
    engine: &Engine,
    hosts: &AllowedHosts,
    stores: &Stores,
    req: Request<Incoming>,
) -> Result<Resp, AdminError> {
    hosts.check(&req)?;
    let path = req.uri().path().to_string();
    let endpoint = Endpoint::parse(&path)?;
    // Authentication is decided on what the path names, never on the raw string.
    if !endpoint.as_ref().is_some_and(Endpoint::is_open) {
        let configured = engine.config().server.admin_token.expose();
        let is_page = endpoint == Some(Endpoint::Page);
        let allowed = authorized(configured, req.headers().get(AUTHORIZATION))
            || (is_page && page::query_token_ok(configured, req.uri().query()));
        if !allowed {
            return Err(if is_page {
                AdminError::PageUnauthorized
            } else {
                AdminError::Unauthorized
            });
        }
    }
    let Some(endpoint) = endpoint else {
        return Err(AdminError::NotFound(format!("no route for {path}")));
    };
    if matches!(*req.method(), Method::POST | Method::PUT)
        && !is_json(req.headers().get(CONTENT_TYPE))
    {
        return Err(AdminError::UnsupportedMediaType);
    }
    let query = Query::parse(req.uri().query())?;
    let method = req.method().clone();
    match (endpoint, method) {
        (Endpoint::Healthz, Method::GET) => {
            let mut v = serde_json::json!({"status": "ok"});
            // The CLI's check that this is the instance before it sends the token
            // (crate::instance_proof).
            if let Some(proof) = query.get("challenge").and_then(|c| {
                crate::instance_proof::proof(&engine.config().server.admin_listen.to_string(), c)
            }) {
                v["proof"] = proof.into();
            }
            Ok(json(StatusCode::OK, &v))
        }
        (Endpoint::Readyz, Method::GET) => Ok(readyz(engine).await),
        (Endpoint::Metrics, Method::GET) => metrics(engine).await,
        (Endpoint::Keys, Method::GET) => keys::list(stores.keys()?).await,
        (Endpoint::Keys, Method::POST) => {
            let body = read_json(engine, req).await?;
            keys::create(engine, stores.keys()?, body).await
        }
        (Endpoint::Key(id), Method::GET) => keys::show(stores.keys()?, id).await,
        (Endpoint::Key(id), Method::DELETE) => keys::revoke(engine, stores.keys()?, id).await,
        (Endpoint::Limits(subject), Method::PUT) => {
            let body = read_json(engine, req).await?;
            keys::put_limits(engine, stores.keys()?, subject, body).await
        }
        (Endpoint::Usage, Method::GET) => usage::usage(engine, &query).await,
        (Endpoint::Transactions, Method::GET) => {
            usage::transactions(stores.ledger()?, &query).await
        }
        (Endpoint::Spend, Method::GET) => usage::spend(engine, &*stores.spend, &query).await,
        (Endpoint::Journal, Method::GET) => {
            Ok(json(StatusCode::OK, &journal_status(engine).to_json()))
        }
        (Endpoint::Reconcile, m @ (Method::GET | Method::POST)) => {
            // `POST ?fix=true` (or `?fix`) rewrites the differing counters from the ledger;
            // a GET only reports.
            let fix = m == Method::POST
                && req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "fix=true" || kv == "fix"));
            Ok(match crate::reconcile::reconcile(engine, fix).await {
                Ok(report) => json(StatusCode::OK, &report.to_json()),
                Err(e) => {
                    let trace_id = uuid::Uuid::now_v7().to_string();
                    let e = engine.store_failure(&trace_id, "ledger", &e);
                    let mut r = json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({"error": {"message": e.message, "code": "store_unavailable", "trace_id": trace_id}}),
                    );
                    // A failure names the trace id its detail is logged under, as other
                    // routes do.
                    if let Ok(v) = HeaderValue::from_str(&trace_id) {
                        r.headers_mut().insert("x-tollgate-trace-id", v);
                    }
                    r
                }
            })
        }
        (Endpoint::OpenApi, Method::GET) => {
            let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(r)
        }
        (Endpoint::Page, Method::GET) => {
            query.only(&["token"])?;
            Ok(page::page())
        }
        (endpoint, _) => Err(AdminError::MethodNotAllowed(endpoint.allow())),
    }
}

async fn handle(
    engine: Arc<Engine>,
    hosts: Arc<AllowedHosts>,
    stores: Arc<Stores>,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = match dispatch(&engine, &hosts, &stores, req).await {
        Ok(r) => r,
        Err(e) => match &e {
            AdminError::Unavailable(detail) | AdminError::Internal(detail) => {
                // The detail (a database or Redis error, a file path) goes to the log
                // only, masked; the answer names the trace id to look it up by.
                let trace_id = uuid::Uuid::now_v7().to_string();
                tracing::error!(
                    %method,
                    %path,
                    trace_id,
                    status = e.status().as_u16(),
                    error = %engine.config().scrub(detail),
                    "admin request failed"
                );
                e.response_traced(Some(&trace_id))
            }
            _ => {
                tracing::debug!(%method, %path, status = e.status().as_u16(), error = %e, "admin request refused");
                e.response()
            }
        },
    };
    // Key secrets, usage and ledger rows must not be kept by a browser or a proxy.
    let h = resp.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

/// Serve the admin API on `listener` until the task is aborted.
pub async fn run(listener: tokio::net::TcpListener, engine: Arc<Engine>) {
    let server = &engine.config().server;
    let header_timeout = server.header_timeout;
    let hosts = Arc::new(match listener.local_addr() {
        Ok(local) => AllowedHosts::new(local, &server.admin_hosts),
        Err(_) => AllowedHosts::new(server.admin_listen, &server.admin_hosts),
    });
    // Reports read the ledger of record on their own connection (or pool), never the
    // writer's; keys and limits are changed where the CLI changes them.
    let stores = Arc::new(Stores::for_engine(&engine));
    let send_timeout = server.send_timeout;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address = crate::net::PerAddress::new(MAX_CONNECTIONS_PER_ADDRESS);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "admin listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = per_address.try_acquire(peer.ip()) else {
            engine.metrics().connection_refused("admin");
            tracing::debug!(
                "admin listener: this client address holds its share of connections; connection closed"
            );
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            engine.metrics().connection_refused("admin");
            tracing::debug!("admin listener at its connection cap; connection closed");
            continue;
        };
        let e = engine.clone();
        let hosts = hosts.clone();
        let stores = stores.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let svc = hyper::service::service_fn(move |req| {
                handle(e.clone(), hosts.clone(), stores.clone(), req)
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let io = TokioIo::new(crate::net::SendBounded::new(stream, send_timeout));
            // Every phase is bounded (head, body, each write); the whole life is too.
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, http.serve_connection(io, svc)).await;
        });
    }
}

/// Bind `server.admin_listen` and serve the admin API until the task is aborted.
pub async fn serve(engine: Arc<Engine>) {
    let addr = engine.config().server.admin_listen;
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            // Only once the port is ours: the CLI trusts whoever proves this secret.
            let journal = &engine.config().storage.journal_path;
            if let Err(e) = crate::instance_proof::publish(journal) {
                tracing::warn!(error = %e, path = %crate::instance_proof::secret_path(journal).display(), "cannot write the instance secret; the CLI will read storage instead of asking this instance");
            }
            run(listener, engine).await
        }
        Err(e) => tracing::error!(%addr, error = %e, "cannot bind the admin listener"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn openapi_describes_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if method == "parameters" {
                    continue;
                }
                assert!(op["responses"].is_object(), "{method} {path} has responses");
                documented.insert((path.clone(), method.to_uppercase()));
            }
        }
        let mut routed = BTreeSet::new();
        for (template, methods) in ROUTES {
            let concrete = template.replace("{id}", "x");
            let endpoint = Endpoint::parse(&concrete).unwrap().unwrap();
            let allow: BTreeSet<&str> = endpoint.allow().split(", ").collect();
            assert_eq!(
                allow,
                methods.iter().copied().collect(),
                "{template} dispatches the methods it lists"
            );
            for m in *methods {
                routed.insert((template.to_string(), m.to_string()));
            }
        }
        assert_eq!(documented, routed);
    }

    #[test]
    fn openapi_references_resolve() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut refs = Vec::new();
        fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                        out.push(r.to_string());
                    }
                    m.values().for_each(|x| walk(x, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        walk(&doc, &mut refs);
        assert!(refs.len() > 20);
        for r in refs {
            let pointer = r.strip_prefix('#').unwrap();
            assert!(doc.pointer(pointer).is_some(), "{r} resolves");
        }
    }

    #[test]
    fn paths_decode_ids() {
        assert_eq!(
            Endpoint::parse("/admin/users/alice%40example.com/limits").unwrap(),
            Some(Endpoint::Limits(Subject::User("alice@example.com".into())))
        );
        assert_eq!(
            Endpoint::parse("/admin/keys/k_1").unwrap(),
            Some(Endpoint::Key("k_1".into()))
        );
        assert_eq!(Endpoint::parse("/admin/keys/k_1/nope").unwrap(), None);
        assert_eq!(Endpoint::parse("/admin/").unwrap(), Some(Endpoint::Page));
        assert_eq!(Endpoint::parse("/admin").unwrap(), None);
        assert!(Endpoint::parse("/admin/tenants/%zz/limits").is_err());
        assert!(
            Endpoint::parse("/admin/tenants/%ff/limits").is_err(),
            "not UTF-8"
        );
    }

    #[test]
    fn only_canonical_paths_are_routed() {
        // Each of these once reached (or could reach) a route by another spelling.
        for bad in [
            "//admin/keys",
            "///admin/transactions",
            "/admin//keys",
            "/admin/keys//",
            "/./admin/keys",
            "/admin/./keys",
            "/admin/keys/..",
            "/admin/../healthz",
            "/%61dmin/keys",
            "/admin/%6beys",
            "/admin/keys/%6B_1",
            "/admin/keys/k%5f1",
            "/admin/keys/%2e%2e",
            "/admin/keys/%2",
            "/admin/keys/%zz",
            "//healthz",
            "/",
            "",
            "admin/keys",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(AdminError::InvalidPath)),
                "{bad:?} must not be routed: {:?}",
                Endpoint::parse(bad)
            );
        }
        // Escapes of bytes that need escaping stay valid in ids.
        assert_eq!(
            Endpoint::parse("/admin/users/a%2Fb%20c%25/limits").unwrap(),
            Some(Endpoint::Limits(Subject::User("a/b c%".into())))
        );
        assert!(
            Endpoint::parse("/admin/users/a%0Ab/limits").is_err(),
            "control characters"
        );
        assert_eq!(
            Endpoint::parse("/healthz").unwrap(),
            Some(Endpoint::Healthz)
        );
        assert_eq!(
            Endpoint::parse("/healthz/").unwrap(),
            None,
            "no route, not open"
        );
        assert!(Endpoint::parse("/healthz").unwrap().unwrap().is_open());
        assert!(!Endpoint::parse("/admin/keys").unwrap().unwrap().is_open());
    }

    #[test]
    fn components_are_encoded_for_urls() {
        assert_eq!(encode_component("k_1-a.b~"), "k_1-a.b~");
        assert_eq!(encode_component("a&b=c#d/e f%"), "a%26b%3Dc%23d%2Fe%20f%25");
        assert_eq!(encode_component("é"), "%C3%A9");
        let id = "team/a&b";
        let path = format!("/admin/users/{}/limits", encode_component(id));
        assert_eq!(
            Endpoint::parse(&path).unwrap(),
            Some(Endpoint::Limits(Subject::User(id.into())))
        );
        let q = Query::parse(Some(&format!("user={}", encode_component(id)))).unwrap();
        assert_eq!(q.get("user"), Some(id));
    }

    #[test]
    fn hosts_and_content_types() {
        assert_eq!(host_part("127.0.0.1:9091"), "127.0.0.1");
        assert_eq!(host_part("[::1]:9091"), "[::1]");
        assert_eq!(host_part("[::1]"), "[::1]");
        assert_eq!(host_part("Evil.example"), "Evil.example");
        assert_eq!(host_part("u@localhost:1"), "localhost");
        let loopback = AllowedHosts::new("127.0.0.1:9091".parse().unwrap(), &[]);
        let names = loopback.0.clone().unwrap();
        assert_eq!(names, vec!["127.0.0.1", "localhost"]);
        let v6 = AllowedHosts::new(
            "[::1]:9091".parse().unwrap(),
            &["admin.internal:9091".into()],
        );
        assert_eq!(v6.0.unwrap(), vec!["[::1]", "localhost", "admin.internal"]);
        assert!(
            AllowedHosts::new("0.0.0.0:9091".parse().unwrap(), &[])
                .0
                .is_none()
        );
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(is_json(Some(&h("application/json"))));
        assert!(is_json(Some(&h("Application/JSON; charset=utf-8"))));
        assert!(!is_json(Some(&h("text/plain"))));
        assert!(!is_json(Some(&h("application/x-www-form-urlencoded"))));
        assert!(!is_json(None));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 3000, failure_persistence: None, ..Default::default() })]

        /// Any request path is answered without a panic, and one that is routed is in
        /// canonical form: nothing reaches a route by a second spelling.
        #[test]
        fn any_path_is_routed_only_when_canonical(
            path in proptest::prop_oneof![
                ".{0,40}",
                "(/{1,3}(admin|keys|users|tenants|limits|usage|healthz|\\.|\\.\\.|%[0-9a-fA-F]{2}|%..?|[a-z_]{0,4})){0,6}/?",
            ]
        ) {
            if let Ok(Some(endpoint)) = Endpoint::parse(&path) {
                proptest::prop_assert!(path.starts_with('/') && !path.starts_with("//"), "{}", path);
                proptest::prop_assert!(!path[1..].split('/').rev().skip(1).any(str::is_empty), "{}", path);
                proptest::prop_assert!(!path.split('/').any(|s| s == "." || s == ".."), "{}", path);
                if endpoint.is_open() {
                    proptest::prop_assert!(["/healthz", "/readyz", "/metrics"].contains(&path.as_str()), "{}", path);
                }
            }
        }

        /// Every id the CLI encodes comes back as itself; queries of any text parse or
        /// answer 400.
        #[test]
        fn encoded_ids_round_trip_and_queries_never_panic(id in "\\PC{1,20}", query in ".{0,60}") {
            // `.` and `..` are path syntax, not names a path can carry.
            proptest::prop_assume!(id != "." && id != "..");
            let path = format!("/admin/tenants/{}/limits", encode_component(&id));
            proptest::prop_assert_eq!(
                Endpoint::parse(&path).ok().flatten(),
                Some(Endpoint::Limits(Subject::Tenant(id.clone())))
            );
            let q = Query::parse(Some(&format!("user={}", encode_component(&id)))).ok();
            proptest::prop_assert_eq!(q.as_ref().and_then(|q| q.get("user")), Some(id.as_str()).filter(|s| !s.is_empty()));
            let _ = Query::parse(Some(&query));
        }
    }

    #[test]
    fn queries_decode_and_reject_unknown_names() {
        let q = Query::parse(Some("user=a+b%2Bc&limit=&key=k_1&key=k_2")).unwrap();
        assert_eq!(q.get("user"), Some("a b+c"));
        assert_eq!(q.get("limit"), None, "empty means absent");
        assert_eq!(q.get("key"), Some("k_1"), "first wins");
        assert!(q.only(&["user", "limit", "key"]).is_ok());
        assert!(q.only(&["user"]).is_err());
        assert!(Query::parse(Some("a=%4")).is_err());
        assert!(Query::parse(None).unwrap().0.is_empty());
    }

    #[test]
    fn admin_token_must_match_and_be_configured() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(authorized("s3cret", Some(&h("Bearer s3cret"))));
        assert!(authorized("s3cret", Some(&h("bearer  s3cret "))));
        assert!(!authorized("s3cret", Some(&h("Bearer s3cre"))));
        assert!(!authorized("s3cret", Some(&h("Bearer s3cret2"))));
        assert!(!authorized("s3cret", Some(&h("Basic s3cret"))));
        assert!(!authorized("s3cret", Some(&h("s3cret"))));
        assert!(!authorized("s3cret", None));
        // No token configured: nothing opens the admin routes, not even an empty bearer.
        assert!(!authorized("", Some(&h("Bearer "))));
        assert!(!authorized("", Some(&h("Bearer x"))));
    }

    #[test]
    fn errors_have_status_and_code() {
        let r = AdminError::MethodNotAllowed("GET, POST").response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET, POST");
        assert_eq!(
            AdminError::from(DbError::Invalid("bad".into())).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            AdminError::from(DbError::Closed).code(),
            "store_unavailable"
        );
    }
}
