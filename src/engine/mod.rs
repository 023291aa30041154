//! The request engine: auth → parse + estimate → reserve → (forward) → settle.
//!
//! Everything the proxy decides is decided here, without pingora types, so tests and the
//! admin API drive the same code. The two-phase flow is a type: [`Admission`] is
//! `#[must_use]` and is consumed by [`Engine::finish`], which settles or releases it
//! exactly once.
//!
//! Order of checks (SPEC §4.7): 401, 400/413, 409, 403, 429.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::api::meter::{Meter, MeterReport};
use crate::api::{ApiFormat, Modifiers, Usage};
use crate::auth::{AuthError, Authenticator, Principal};
use crate::billing::table::{PriceTable, unknown_model_message};
use crate::config::{Config, UnknownModel, UpstreamKind};
use crate::db::Db;
use crate::errors::{ApiError, ErrorCode};
use crate::journal::{EmbeddedJournal, Journal};
use crate::keys::Subject;
use crate::ledger::{Opened, Settlement, Transaction};
use crate::metrics::{BillingFailure, Metrics};
use crate::quota::limit::{LimitSpec, Metric};
use crate::quota::store::{
    Amounts, AppliedLimit, LimitState, QuotaError, QuotaStore, ReserveOutcome, ReserveRequest,
};
use crate::quota::window::Window;
use crate::tokens::{self, Encoding};
use crate::upstream::Upstream;

mod headers;
mod parse;

pub use headers::openai_duration;
use headers::ratelimit_headers;
pub use parse::{
    DEFAULT_HELD_SEARCHES, MAX_COMPLETIONS, MAX_HELD_SEARCHES, MAX_IDEMPOTENCY_KEY, MAX_MODEL_LEN,
    MAX_TOKEN_COUNT, Parsed, idempotent_trace_id, parse_request, valid_idempotency_key,
};

/// Bodies (and output texts) above this size are parsed and counted on the blocking pool,
/// off the reactor; see [`tokens::SPAWN_BLOCKING_ABOVE_BYTES`] for why this size.
pub const BLOCKING_PARSE_ABOVE: usize = tokens::SPAWN_BLOCKING_ABOVE_BYTES;

/// A request whose body finds no room under `server.max_parsing_bytes` waits at most this
/// long for it, then is refused with 503 `overloaded`.
pub const PARSE_BUDGET_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Where a path goes.
#[derive(Debug, Clone)]
pub struct Route {
    pub upstream: usize,
    pub upstream_name: String,
    pub kind: UpstreamKind,
    /// Known wire format of the path, if metered.
    pub format: Option<ApiFormat>,
    /// A passthrough route (SPEC §6): forwarded, never admitted, metered or billed.
    pub passthrough: bool,
    /// The route as configured (`/v1/models/{id}` for a templated passthrough): the
    /// metrics label, bounded by the config whatever paths clients send.
    pub label: String,
}

/// The hold of an admitted request. Must be handed to [`Engine::finish`].
#[must_use = "an admission must be settled or released with Engine::finish"]
pub struct Admission {
    pub trace_id: String,
    pub body: Bytes,
    pub stream: bool,
    pub hide_usage: bool,
    pub format: Option<ApiFormat>,
    /// Set by the proxy when the response ended normally.
    pub report: Option<MeterReport>,
    principal: Arc<Principal>,
    route: Route,
    model: String,
    encoding: Encoding,
    /// What the request asked for: prices a settle whose response did not say.
    asked: Modifiers,
    /// The request asked the model to reason: output the meter did not see is not zero.
    reasoning: bool,
    estimate: Amounts,
    limits: Vec<AppliedLimit>,
    started_at: DateTime<Utc>,
    headers: Vec<(&'static str, String)>,
    /// A settle of this request could cross an alert threshold ([`crate::alerts::Alerts::may_fire`]).
    alert_watch: bool,
    /// Already released, before its answer was written ([`Engine::release_unbilled`]):
    /// the billing outcome `finish` logs, without releasing or settling again.
    released: Option<&'static str>,
}

impl Admission {
    /// A fresh response meter for this request's format.
    pub fn meter(&self) -> Meter {
        let format = self.format.unwrap_or(ApiFormat::OpenAiChat);
        Meter::new(format, self.stream, self.hide_usage)
    }

    /// OpenAI-style rate-limit headers for the tightest limits after this admission.
    pub fn ratelimit_headers(&self) -> &[(&'static str, String)] {
        &self.headers
    }
}

/// How a request ended, as seen by the proxy.
#[derive(Debug, Clone)]
pub struct RequestEnd {
    pub client_status: u16,
    pub upstream_status: Option<u16>,
    /// The response reached its end normally.
    pub complete: bool,
    pub client_disconnected: bool,
    pub upstream_failed: bool,
    pub report: Option<MeterReport>,
    pub started: Instant,
    pub upstream_sent_at: Option<Instant>,
    pub first_byte_at: Option<Instant>,
    pub admit_time: Duration,
}

/// Shared state of a running instance.
pub struct Engine {
    config: Arc<Config>,
    auth: Authenticator,
    db: Db,
    /// Where reservations, settles and releases are written first (embedded ledger, or the
    /// shared-mode outbox).
    journal: Arc<dyn Journal>,
    store: Arc<dyn QuotaStore>,
    upstreams: Arc<Vec<Upstream>>,
    prices: PriceTable,
    plans: std::collections::BTreeMap<String, Vec<LimitSpec>>,
    /// Requests between the proxy's `new_ctx` and `logging`.
    in_flight: std::sync::atomic::AtomicUsize,
    metrics: Metrics,
    passthrough_rate: crate::passthrough::PassthroughRate,
    alerts: crate::alerts::Alerts,
    /// Shared mode with Redis: counter changes go through the journal's applier.
    applier: std::sync::OnceLock<Arc<crate::journal::applier::Applier>>,
    /// KiB of request bodies that may be parsed into a JSON tree at once, across all
    /// requests (`server.max_parsing_bytes`): a tree costs many times its body's bytes.
    parse_budget: Arc<tokio::sync::Semaphore>,
}

impl crate::journal::applier::LimitsOf for Engine {
    fn limits_of(&self, row: &Transaction) -> Vec<AppliedLimit> {
        match self.auth.directory().by_id(&row.key_id) {
            Some((p, _)) => self.applicable_limits(&p, Some(&row.upstream)),
            None => Vec::new(),
        }
    }
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        auth: Authenticator,
        db: Db,
        store: Arc<dyn QuotaStore>,
        upstreams: Arc<Vec<Upstream>>,
        prices: PriceTable,
    ) -> Result<Engine, String> {
        // Parsed (and checked against the upstreams) by the config reader.
        let plans = config.plans.clone();
        let metrics = Metrics::new().map_err(|e| e.to_string())?;
        let alerts = crate::alerts::Alerts::new(
            &config.alerts,
            config.quota.timezone,
            &config.server.instance_id,
            Some(db.clone()),
        );
        let passthrough_rate = crate::passthrough::PassthroughRate::new(
            config.quota.passthrough_rate,
            config.quota.passthrough_burst,
        );
        let parse_kib = usize::try_from(config.server.max_parsing_bytes.div_ceil(1024))
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Ok(Engine {
            parse_budget: Arc::new(tokio::sync::Semaphore::new(parse_kib)),
            alerts,
            passthrough_rate,
            config,
            auth,
            journal: Arc::new(EmbeddedJournal::new(db.clone())),
            db,
            store,
            upstreams,
            prices,
            plans,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            metrics,
            applier: std::sync::OnceLock::new(),
        })
    }

    /// The journal's applier, when counters are shared (Redis).
    pub fn applier(&self) -> Option<&Arc<crate::journal::applier::Applier>> {
        self.applier.get()
    }

    /// Route settles and releases through `applier` (set once, at start).
    pub fn set_applier(&self, applier: Arc<crate::journal::applier::Applier>) {
        let _ = self.applier.set(applier);
    }

    /// Apply a journaled settle to the counters: through the applier when there is one
    /// (`seq` is the journal event), else straight to the store.
    async fn count_settle(
        &self,
        seq: Option<i64>,
        trace: &str,
        amounts: Amounts,
        started_at: DateTime<Utc>,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        match (seq, self.applier.get()) {
            (Some(seq), Some(a)) => a.settle(seq, trace, amounts, started_at, limits).await,
            _ => self.store.settle(trace, amounts, started_at, limits).await,
        }
    }

    async fn count_release(&self, seq: Option<i64>, trace: &str) -> Result<(), QuotaError> {
        match (seq, self.applier.get()) {
            (Some(seq), Some(a)) => a.release(seq, trace).await,
            _ => self.store.release(trace).await,
        }
    }

    /// A counter change the store did not take: with an applier and a journaled event
    /// it waits in the journal (replayed when Redis is back); otherwise it is lost.
    fn counter_failure(&self, seq: Option<i64>, trace: &str, e: &QuotaError, what: BillingFailure) {
        if seq.is_some() && self.applier.get().is_some() && matches!(e, QuotaError::Unavailable(_))
        {
            tracing::debug!(trace_id = %trace, error = %e, "counter change waits in the journal");
            return;
        }
        tracing::error!(trace_id = %trace, error = %e, "counter change failed");
        self.metrics.billing_failure(what);
    }

    /// This instance's metrics (served on the admin listener's `/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A request started (proxy `new_ctx`).
    pub fn request_started(&self) {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A request ended (proxy `logging`, after settling).
    pub fn request_ended(&self) {
        self.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Requests currently open.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The active price table.
    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    /// Replace the journal (shared mode writes to its outbox instead of the embedded ledger).
    pub fn with_journal(mut self, journal: Arc<dyn Journal>) -> Engine {
        self.journal = journal;
        self
    }

    pub fn journal(&self) -> &Arc<dyn Journal> {
        &self.journal
    }

    pub fn store(&self) -> &Arc<dyn QuotaStore> {
        &self.store
    }

    pub fn alerts(&self) -> &crate::alerts::Alerts {
        &self.alerts
    }

    pub fn authenticator(&self) -> &Authenticator {
        &self.auth
    }

    pub fn upstream(&self, i: usize) -> &Upstream {
        // Route indices come from this config, so they are always in range.
        &self.upstreams[i.min(self.upstreams.len().saturating_sub(1))]
    }

    pub fn upstreams(&self) -> &Arc<Vec<Upstream>> {
        &self.upstreams
    }

    /// The route of `method path`: a provider route (POST only), else a passthrough;
    /// `anthropic_client` (the request carries `anthropic-version`) picks between
    /// upstreams that both list a passthrough ([`Config::passthrough_for`]).
    ///
    /// A known path with another method is 405 with `Allow` — a metered route never
    /// forwards a `GET` (OpenAI answers `GET /v1/chat/completions` with the account's
    /// stored completions, other callers' data) — and an unknown path 404.
    pub fn route(
        &self,
        method: &http::Method,
        path: &str,
        anthropic_client: bool,
    ) -> Result<Route, ApiError> {
        if let Some((i, u)) = self.config.upstream_for_path(path) {
            if method != http::Method::POST {
                let mut e = ApiError::new(
                    ErrorCode::MethodNotAllowed,
                    "this method is not allowed on this route; use POST",
                );
                e.headers.push(("allow", "POST".to_string()));
                return Err(e);
            }
            return Ok(Route {
                upstream: i,
                upstream_name: u.name.clone(),
                kind: u.kind,
                format: ApiFormat::from_path(path),
                passthrough: false,
                label: route_path(path).to_string(),
            });
        }
        if let Some((i, u, r)) = self.config.passthrough_for(method, path, anthropic_client) {
            return Ok(Route {
                upstream: i,
                upstream_name: u.name.clone(),
                kind: u.kind,
                format: None,
                passthrough: true,
                label: r.pattern.clone(),
            });
        }
        let allowed = self.config.passthrough_methods(path, anthropic_client);
        if allowed.is_empty() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                "no route for this method and path; see the upstreams' routes and passthrough lists",
            ));
        }
        let allow = allowed
            .iter()
            .map(http::Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut e = ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("this method is not allowed on this route; use {allow}"),
        );
        e.headers.push(("allow", allow));
        Err(e)
    }

    /// Whether a passthrough request of `p` may go (nothing is held, counted or written: it
    /// is not metered): refused 403 when a limit of 0 applies (the key is blocked, as on a
    /// metered route), 429 past the key's `quota.passthrough_rate`, or when one of
    /// its `requests:*` limits on the route's upstream is used up. On success, the
    /// rate-limit headers of the limits as they stand (one counter read, and only when
    /// `p` has a request or token limit).
    pub async fn passthrough_admit(
        &self,
        p: &Principal,
        route: &Route,
    ) -> Result<Vec<(&'static str, String)>, ApiError> {
        if let Some(l) = self
            .applicable_limits(p, Some(&route.upstream_name))
            .iter()
            .find(|l| l.spec.is_disabled())
        {
            return Err(ApiError::new(
                ErrorCode::QuotaDisabled,
                format!("quota disabled: {}", l.describe()),
            ));
        }
        if !self
            .passthrough_rate
            .try_take(&p.key_id, std::time::Instant::now())
        {
            let mut e = ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "quota exceeded: more than {} passthrough requests a second on key {}",
                    self.config.quota.passthrough_rate, p.key_id
                ),
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        let limits: Vec<AppliedLimit> = self
            .applicable_limits(p, Some(&route.upstream_name))
            .into_iter()
            .filter(|l| l.spec.metric != Metric::Usd)
            .collect();
        if limits.is_empty() {
            return Ok(Vec::new());
        }
        let Ok(states) = self.store.usage(&limits).await else {
            return Ok(Vec::new());
        };
        let now = Utc::now();
        let headers = ratelimit_headers(&states, now);
        if let Some(s) = states.iter().find(|s| {
            s.metric() == Metric::Requests && s.limit.spec.value > 0 && s.remaining() == 0
        }) {
            let mut e = ApiError::new(
                ErrorCode::QuotaExceeded,
                format!("quota exceeded: {}", s.limit.describe()),
            );
            if !matches!(s.limit.spec.window, Window::Total) {
                e.retry_after = s.resets_at.map(|at| {
                    crate::quota::window::ceil_secs((at - now).to_std().unwrap_or_default()).max(1)
                });
            }
            e.headers = headers;
            return Err(e);
        }
        Ok(headers)
    }

    /// The principal of a presented secret (from [`presented_secret`]).
    pub async fn authenticate(
        &self,
        presented: Result<String, AuthError>,
    ) -> Result<Arc<Principal>, ApiError> {
        let secret = presented.map_err(auth_error)?;
        self.auth.authenticate(&secret).await.map_err(auth_error)
    }

    /// Refuse a key whose plan the configuration does not define: applying no plan limits
    /// would make it unlimited (a renamed or removed `[plans.X]`, a typo, or an instance
    /// whose config lacks a plan another instance has).
    pub fn check_plan(&self, p: &Principal) -> Result<(), ApiError> {
        let Some(plan) = p.plan.as_deref() else {
            return Ok(());
        };
        if self.plans.contains_key(plan) {
            return Ok(());
        }
        self.metrics.undefined_plan_refused();
        tracing::error!(key_id = %p.key_id, plan = %plan, "refused a request: the key's plan is not defined in the configuration ([plans.{plan}])");
        Err(ApiError::new(
            ErrorCode::QuotaDisabled,
            format!(
                "quota disabled: key {} is on plan \"{plan}\", which is not defined; the key is refused until it is",
                p.key_id
            ),
        ))
    }

    /// Keys (id, plan) whose plan the configuration does not define, active ones only.
    pub fn keys_with_undefined_plans(&self) -> Vec<(String, String)> {
        let dir = self.auth.directory();
        let mut out: Vec<(String, String)> = dir
            .principals()
            .filter(|(_, active)| *active)
            .filter_map(|(p, _)| {
                let plan = p.plan.as_deref()?;
                (!self.plans.contains_key(plan)).then(|| (p.key_id.clone(), plan.to_string()))
            })
            .collect();
        out.sort();
        out
    }

    /// Every limit that applies to `p` (optionally only those covering `upstream`).
    pub fn applicable_limits(&self, p: &Principal, upstream: Option<&str>) -> Vec<AppliedLimit> {
        let dir = self.auth.directory();
        let mut out = Vec::new();
        for subject in p.subjects() {
            for spec in dir.limits_of(&subject) {
                if upstream.is_none_or(|u| spec.applies_to(u)) {
                    out.push(AppliedLimit {
                        subject: subject.clone(),
                        spec: spec.clone(),
                        plan: None,
                    });
                }
            }
        }
        if let Some(plan) = p
            .plan
            .as_ref()
            .and_then(|n| self.plans.get(n).map(|l| (n, l)))
        {
            for spec in plan.1 {
                if upstream.is_none_or(|u| spec.applies_to(u)) {
                    out.push(AppliedLimit {
                        subject: Subject::Key(p.key_id.clone()),
                        spec: spec.clone(),
                        plan: Some(plan.0.clone()),
                    });
                }
            }
        }
        out
    }

    /// This body's share of `server.max_parsing_bytes` (its length in KiB, rounded up),
    /// waiting at most [`PARSE_BUDGET_WAIT`]; past that the request is refused 503
    /// `overloaded` with `Retry-After: 1`, with nothing reserved.
    async fn parse_permit(
        &self,
        len: usize,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let kib = u32::try_from(len.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let share = self.parse_budget.clone().acquire_many_owned(kib);
        match tokio::time::timeout(PARSE_BUDGET_WAIT, share).await {
            Ok(Ok(p)) => Ok(p),
            // Timed out, or (never) closed.
            _ => {
                let mut e = ApiError::new(
                    ErrorCode::Overloaded,
                    "too many request bodies being parsed; retry shortly",
                );
                e.retry_after = Some(1);
                Err(e)
            }
        }
    }

    /// Phase 1: parse, estimate and hold. On success the request may be forwarded.
    pub async fn admit(
        &self,
        p: &Arc<Principal>,
        route: &Route,
        body: Bytes,
        idempotency_key: Option<&str>,
        generated_trace_id: &str,
    ) -> Result<Admission, ApiError> {
        let started_at = Utc::now();
        // 400: parse and estimate (large bodies off the reactor).
        let parsed = if let Some(format) = route.format {
            let default_max = self.config.quota.default_max_output_tokens;
            // The JSON tree costs many times the body: its share of `max_parsing_bytes` is
            // taken first and given back only once the tree (and everything built from it)
            // is dropped, at the end of `parse_request`, before any upstream exchange.
            let permit = self.parse_permit(body.len()).await?;
            if body.len() > BLOCKING_PARSE_ABOVE {
                // The permit moves with the parse: a request dropped while it runs still
                // holds its share until the tree is gone.
                tokio::task::spawn_blocking(move || {
                    let parsed = parse_request(format, body, default_max);
                    drop(permit);
                    parsed
                })
                .await
                .map_err(|_| ApiError::new(ErrorCode::Internal, "request parser failed"))??
            } else {
                let parsed = parse_request(format, body, default_max);
                drop(permit);
                parsed?
            }
        } else {
            Parsed {
                model: String::new(),
                stream: false,
                body,
                hide_usage: false,
                input_tokens: 0,
                max_output_tokens: 0,
                encoding: Encoding::O200k,
                asked: Modifiers::default(),
                reasoning: false,
                tool_calls: 0,
                unseen_input: None,
            }
        };
        // Input the estimate cannot see (state kept upstream, files by id, MCP, search) is
        // held at the configured allowance, so the hold stays a worst case; with the
        // allowance 0 such a request is refused where a USD or token limit applies.
        let mut parsed = parsed;
        if let Some(field) = parsed.unseen_input {
            let allowance = self.config.quota.unseen_input_tokens;
            if allowance > 0 {
                parsed.input_tokens = parsed.input_tokens.max(allowance);
            } else if self
                .applicable_limits(p, Some(&route.upstream_name))
                .iter()
                .any(|l| {
                    matches!(
                        l.spec.metric,
                        Metric::Usd | Metric::Tokens | Metric::InputTokens
                    )
                })
            {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "`{field}` makes the upstream read input tollgate cannot count, and this key has a spending or token limit; send that input in the request itself"
                    ),
                ));
            }
        }
        let entry = if route.format.is_some() {
            match self.prices.lookup(&parsed.model) {
                Some(e) => Some(e),
                None if self.config.quota.unknown_model == UnknownModel::Free => None,
                None => {
                    tracing::warn!(model = %parsed.model, "refused a model without a price; add a [prices] entry for it");
                    return Err(ApiError::new(
                        ErrorCode::InvalidRequest,
                        unknown_model_message(&parsed.model),
                    ));
                }
            }
        } else {
            None
        };
        // A tier, speed or region the request names that its entry cannot price is refused:
        // holding and billing it at 1× could be a fraction of the invoice.
        if let Some(e) = entry
            && let Some((kind, name)) = e.price.unpriced_request(&parsed.asked)
        {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "`{kind}` \"{name}\" has no price for model \"{}\"; add it to the model's [prices] entry ({}) or send a priced one",
                    parsed.model,
                    match kind {
                        "service_tier" => "tiers",
                        other => other,
                    }
                ),
            ));
        }
        // The hold is the worst case (billing::cost): the dearest input-side and output-side
        // rates, the long-context band of the estimate, the multipliers asked for, and the
        // per-call fees of the tool uses the request allows.
        let estimate_cost = entry.map_or(0, |e| {
            e.price.hold(
                parsed.input_tokens,
                parsed.max_output_tokens,
                parsed.tool_calls,
                &parsed.asked,
            )
        });
        let estimate = Amounts {
            requests: 1,
            input_tokens: parsed.input_tokens as i64,
            output_tokens: parsed.max_output_tokens as i64,
            cost_micros: estimate_cost,
        };

        // 409: an idempotency key names the trace id.
        let trace_id = match idempotency_key {
            Some(k) => {
                if !valid_idempotency_key(k) {
                    return Err(ApiError::new(
                        ErrorCode::InvalidRequest,
                        "Idempotency-Key must be 1 to 255 printable ASCII characters",
                    ));
                }
                let t = idempotent_trace_id(&p.key_id, k);
                let taken = self
                    .journal
                    .is_taken(&t)
                    .await
                    .map_err(|e| self.store_failure(&t, "ledger", &e))?;
                if taken {
                    return Err(duplicate(&t));
                }
                t
            }
            None => generated_trace_id.to_string(),
        };

        // 403 / 429: one atomic step over every applicable limit.
        self.check_plan(p)?;
        let limits = self.applicable_limits(p, Some(&route.upstream_name));
        let req = ReserveRequest {
            trace_id: trace_id.clone(),
            started_at,
            limits: limits.clone(),
            estimate,
        };
        let states = match self.store.reserve(&req).await {
            Ok(ReserveOutcome::Admitted(states)) => states,
            Ok(ReserveOutcome::Duplicate) => return Err(duplicate(&trace_id)),
            Ok(ReserveOutcome::Disabled(l)) => {
                return Err(ApiError::new(
                    ErrorCode::QuotaDisabled,
                    format!("quota disabled: {}", l.describe()),
                ));
            }
            Ok(ReserveOutcome::Exceeded { limit, retry_after }) => {
                self.alerts.after_refusal(self.store.as_ref(), &limit).await;
                let mut e = ApiError::new(
                    ErrorCode::QuotaExceeded,
                    format!("quota exceeded: {}", limit.describe()),
                );
                if !matches!(limit.spec.window, Window::Total) {
                    e.retry_after = retry_after.map(|d| crate::quota::window::ceil_secs(d).max(1));
                }
                // Refusals report the limits too (an extra read, on the refusal path only).
                if let Ok(states) = self.store.usage(&limits).await {
                    e.headers = ratelimit_headers(&states, Utc::now());
                }
                return Err(e);
            }
            Err(e) => return Err(self.store_failure(&trace_id, "quota", &e)),
        };

        // Journal the reservation before anything is forwarded.
        let row = Transaction {
            trace_id: trace_id.clone(),
            key_id: p.key_id.clone(),
            user_id: p.user.clone(),
            tenant_id: p.tenant.clone(),
            upstream: route.upstream_name.clone(),
            model: parsed.model.clone(),
            status: "reserved".into(),
            input_tokens: estimate.input_tokens,
            output_tokens: estimate.output_tokens,
            reserved_micros: estimate.cost_micros,
            stream: parsed.stream,
            started_at: crate::time::to_text(started_at),
            instance_id: self.config.server.instance_id.clone(),
            ..Default::default()
        };
        let opened = self.journal.open_reservation(row).await;
        match opened {
            Ok(Opened::Inserted) => {}
            Ok(Opened::Duplicate) => {
                let _ = self.store.release(&trace_id).await;
                return Err(duplicate(&trace_id));
            }
            Err(e) => {
                let _ = self.store.release(&trace_id).await;
                return Err(self.store_failure(&trace_id, "journal", &e));
            }
        }

        Ok(Admission {
            headers: ratelimit_headers(&states, Utc::now()),
            alert_watch: self.alerts.may_fire(&states),
            released: None,
            trace_id,
            body: parsed.body,
            stream: parsed.stream,
            hide_usage: parsed.hide_usage,
            format: route.format,
            report: None,
            principal: p.clone(),
            route: route.clone(),
            model: parsed.model,
            encoding: parsed.encoding,
            asked: parsed.asked,
            reasoning: parsed.reasoning,
            estimate,
            limits,
            started_at,
        })
    }

    /// A request that ended this way is released, nothing billed: the upstream did not
    /// answer 2xx, and the client did not abandon the exchange after it went upstream.
    fn unbilled(end: &RequestEnd) -> bool {
        let upstream_ok = end.upstream_status.is_some_and(|s| (200..300).contains(&s));
        // The client left before the upstream answered and took the exchange with it (it
        // reset its connection; a plain close keeps the exchange running, see the proxy's
        // `set_abort_on_close`), after the request went upstream: the upstream has the
        // prompt and will charge for it, but nobody will read what it reports. Billed at
        // the hold, as a crash recovery is — never zero (SPEC §4.6).
        let abandoned = end.client_disconnected
            && end.upstream_status.is_none()
            && end.upstream_sent_at.is_some();
        !upstream_ok && !abandoned
    }

    /// Release the hold of a request whose outcome is already known to bill nothing
    /// (an upstream non-2xx, a 502/504 before the first byte), before its answer is
    /// written: a client that retries the moment it hears the answer must not be refused
    /// by this request's own hold. [`Engine::finish`] then only logs it. Does nothing
    /// (returns false) when `end` would not release, or when it was released already.
    pub async fn release_unbilled(&self, adm: &mut Admission, end: &RequestEnd) -> bool {
        if adm.released.is_some() || !Self::unbilled(end) {
            return false;
        }
        let started = Instant::now();
        adm.released = Some(
            self.release(&adm.trace_id, i64::from(end.client_status))
                .await,
        );
        self.metrics.settle_time(started.elapsed());
        true
    }

    /// Release a hold in the ledger and the counters; the billing outcome to log.
    async fn release(&self, trace: &str, status: i64) -> &'static str {
        let r = self.journal.release(trace, status).await;
        let seq = r.as_ref().ok().copied().flatten();
        if let Err(e) = self.count_release(seq, trace).await {
            self.counter_failure(seq, trace, &e, BillingFailure::CounterRelease);
        }
        match r {
            Ok(_) => "released",
            Err(e) => {
                tracing::error!(trace_id = %trace, error = %e, "ledger write failed; the reservation stays open and is recovered at next start");
                self.metrics.billing_failure(BillingFailure::LedgerWrite);
                "journal_failed"
            }
        }
    }

    /// Phase 2: settle or release, exactly once, then log the request. A request released
    /// early ([`Engine::release_unbilled`]) is only logged.
    pub async fn finish(&self, mut adm: Admission, end: RequestEnd) {
        let finish_started = Instant::now();
        let report = adm.report.take().or(end.report.clone());
        let unbilled = adm.released.is_some() || Self::unbilled(&end);
        let upstream_ok = end.upstream_status.is_some_and(|s| (200..300).contains(&s));
        let settlement = if unbilled {
            None
        } else if upstream_ok {
            Some(
                self.compute_settlement(&adm, report.as_ref(), end.client_status)
                    .await,
            )
        } else {
            // Abandoned by the client after it went upstream.
            Some(self.held_settlement(&adm, end.client_status))
        };
        let trace = adm.trace_id.clone();
        let status = end.client_status as i64;
        let outcome = match &settlement {
            Some(s) => {
                let r = self.journal.settle(&trace, s.clone()).await;
                let amounts = Amounts {
                    requests: 1,
                    input_tokens: s.input_tokens,
                    output_tokens: s.output_tokens,
                    cost_micros: s.cost_micros,
                };
                let seq = r.as_ref().ok().copied().flatten();
                if r.is_err() && self.applier.get().is_some() {
                    // Not journaled: the journal is the only path to the shared counters,
                    // and the recovery at the next start settles this row through it. The
                    // hold is no longer kept alive; it expires by `reservation_ttl`.
                    self.store.forget(&trace);
                } else if let Err(e) = self
                    .count_settle(seq, &trace, amounts, adm.started_at, &adm.limits)
                    .await
                {
                    self.counter_failure(seq, &trace, &e, BillingFailure::CounterSettle);
                } else if adm.alert_watch || amounts.exceeds(&adm.estimate) {
                    self.alerts
                        .after_settle(self.store.as_ref(), &adm.limits)
                        .await;
                }
                r.map(|_| "settled")
            }
            None => Ok(match adm.released {
                Some(done) => done,
                None => self.release(&trace, status).await,
            }),
        };
        let billing = match outcome {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(trace_id = %trace, error = %e, "ledger write failed; the reservation stays open and is recovered at next start");
                self.metrics.billing_failure(BillingFailure::LedgerWrite);
                "journal_failed"
            }
        };
        if adm.released.is_none() {
            self.metrics.settle_time(finish_started.elapsed());
        }
        let s = settlement.unwrap_or_default();
        if billing == "settled" {
            self.metrics.settled(&adm.model, &s);
        }
        let total = end.started.elapsed();
        let upstream_time = match (end.upstream_sent_at, end.first_byte_at) {
            (Some(a), Some(b)) if b >= a => b - a,
            _ => Duration::ZERO,
        };
        if let Some(sent) = end.upstream_sent_at {
            // The upstream's time runs from the request sent to the end of the response;
            // the rest of the request's time up to that end (before forwarding) was spent
            // in tollgate. Settling is measured by its own histogram, not here.
            let until_end = finish_started.saturating_duration_since(end.started);
            let added = until_end.saturating_sub(finish_started.saturating_duration_since(sent));
            let first_byte = end.first_byte_at.map(|_| upstream_time);
            self.metrics
                .forwarded(&adm.route.upstream_name, first_byte, added);
        }
        tracing::info!(
            target: "tollgate::access",
            trace_id = %trace,
            key_id = %adm.principal.key_id,
            user = adm.principal.user.as_deref().unwrap_or(""),
            tenant = adm.principal.tenant.as_deref().unwrap_or(""),
            upstream = %adm.route.upstream_name,
            model = %adm.model,
            stream = adm.stream,
            status = end.client_status,
            upstream_status = end.upstream_status.unwrap_or(0),
            input_tokens = s.input_tokens,
            cached_input_tokens = s.cached_input_tokens,
            output_tokens = s.output_tokens,
            cost_micros = s.cost_micros,
            service_tier = s.service_tier.as_deref().unwrap_or(""),
            tool_calls = s.tool_calls,
            price_version = s.price_version.as_deref().unwrap_or(""),
            usage_source = s.usage_source,
            quota = "admitted",
            billing,
            client_disconnected = end.client_disconnected,
            admit_us = end.admit_time.as_micros() as u64,
            upstream_first_byte_ms = upstream_time.as_millis() as u64,
            total_ms = total.as_millis() as u64,
            "request"
        );
    }

    /// The settlement of a request whose usage nobody will report: its held estimate
    /// (an upper bound on what the upstream can charge when the request stated its max
    /// output), `usage_source = estimated`.
    fn held_settlement(&self, adm: &Admission, client_status: u16) -> Settlement {
        Settlement {
            input_tokens: adm.estimate.input_tokens,
            output_tokens: adm.estimate.output_tokens,
            cost_micros: adm.estimate.cost_micros,
            price_version: self.prices.lookup(&adm.model).map(|e| e.version.clone()),
            usage_source: "estimated",
            http_status: Some(client_status as i64),
            ..Default::default()
        }
    }

    async fn compute_settlement(
        &self,
        adm: &Admission,
        report: Option<&MeterReport>,
        client_status: u16,
    ) -> Settlement {
        let est_in = adm.estimate.input_tokens;
        let (mut usage, in_rep, out_rep, text, reasoning_seen) = match report {
            Some(r) => (
                r.usage.clone(),
                r.input_reported,
                r.output_reported,
                r.output_text.clone(),
                r.reasoning_seen,
            ),
            None => (Usage::default(), false, false, String::new(), false),
        };
        // Counts past any real response are clamped, and the row is then an estimate.
        let clamped = clamp_usage(&mut usage);
        let input = if in_rep {
            usage.input_tokens as i64
        } else {
            est_in
        };
        let output = if out_rep {
            usage.output_tokens as i64
        } else if adm.format == Some(ApiFormat::OpenAiEmbeddings) {
            0
        } else {
            let enc = adm.encoding;
            let seen = if text.len() > BLOCKING_PARSE_ABOVE {
                tokio::task::spawn_blocking(move || tokens::count(enc, &text) as i64)
                    .await
                    .unwrap_or(0)
            } else {
                tokens::count(enc, &text) as i64
            };
            // SPEC §4.6: a reasoning model's output the meter could not see (a stream cut
            // before its usage event) is never billed as zero: the held output estimate.
            if adm.reasoning || reasoning_seen {
                seen.max(adm.estimate.output_tokens)
            } else {
                seen
            }
        };
        let cached = if in_rep {
            usage.cached_input_tokens as i64
        } else {
            0
        };
        let cache_write = if in_rep {
            usage.cache_write_tokens as i64
        } else {
            0
        };
        let reasoning = if out_rep {
            usage.reasoning_tokens as i64
        } else {
            0
        };
        // The parts the upstream reported; a name it did not report is what was asked for.
        let billed = Usage {
            input_tokens: input as u64,
            cached_input_tokens: cached as u64,
            cache_write_tokens: cache_write as u64,
            cache_write_1h_tokens: if in_rep {
                usage.cache_write_1h_tokens
            } else {
                0
            },
            audio_input_tokens: if in_rep { usage.audio_input_tokens } else { 0 },
            output_tokens: output as u64,
            reasoning_tokens: reasoning as u64,
            audio_output_tokens: if out_rep {
                usage.audio_output_tokens
            } else {
                0
            },
            tool_calls: usage.tool_calls,
            served: usage.served.or(&adm.asked),
        };
        let (cost, price_version) = match self.prices.lookup(&adm.model) {
            Some(entry) => {
                let costed = entry.price.cost(&billed);
                for (kind, name) in &costed.unpriced {
                    self.metrics.unpriced(&adm.model, kind, name);
                }
                (costed.micros, Some(entry.version.clone()))
            }
            None => (0, None),
        };
        Settlement {
            input_tokens: input,
            cached_input_tokens: cached,
            cache_write_tokens: cache_write,
            output_tokens: output,
            reasoning_tokens: reasoning,
            cache_write_1h_tokens: i64::try_from(billed.cache_write_1h_tokens).unwrap_or(i64::MAX),
            tool_calls: i64::try_from(billed.tool_calls).unwrap_or(i64::MAX),
            audio_input_tokens: i64::try_from(billed.audio_input_tokens).unwrap_or(i64::MAX),
            audio_output_tokens: i64::try_from(billed.audio_output_tokens).unwrap_or(i64::MAX),
            speed: billed.served.speed.clone(),
            inference_geo: billed.served.inference_geo.clone(),
            service_tier: billed.served.service_tier,
            price_version,
            cost_micros: cost,
            usage_source: if in_rep && out_rep && !clamped {
                "upstream"
            } else {
                "estimated"
            },
            http_status: Some(client_status as i64),
        }
    }

    /// Log a request that was refused or never admitted (no billing row).
    pub fn log_unadmitted(
        &self,
        p: Option<&Principal>,
        r: Option<&Route>,
        trace_id: &str,
        refused: bool,
        end: RequestEnd,
    ) {
        tracing::info!(
            target: "tollgate::access",
            trace_id,
            key_id = p.map(|p| p.key_id.as_str()).unwrap_or(""),
            user = p.and_then(|p| p.user.as_deref()).unwrap_or(""),
            tenant = p.and_then(|p| p.tenant.as_deref()).unwrap_or(""),
            upstream = r.map(|r| r.upstream_name.as_str()).unwrap_or(""),
            status = end.client_status,
            quota = if refused { "refused" } else { "not_applicable" },
            total_ms = end.started.elapsed().as_millis() as u64,
            "request"
        );
    }

    /// Usage JSON (SPEC §2) of every limit applying to `p`.
    pub async fn usage_json_for(&self, p: &Principal, trace_id: &str) -> Value {
        let limits = self.applicable_limits(p, None);
        self.usage_json(&limits, trace_id).await
    }

    /// The usage of `limits`; when the quota store fails, no limits and a stable `error`
    /// naming `trace_id` (the failure itself is logged under it).
    pub async fn usage_json(&self, limits: &[AppliedLimit], trace_id: &str) -> Value {
        match self.store.usage(limits).await {
            Ok(states) => {
                serde_json::json!({"limits": states.iter().map(LimitState::to_json).collect::<Vec<_>>()})
            }
            Err(e) => {
                let e = self.store_failure(trace_id, "quota", &e);
                serde_json::json!({"limits": [], "error": e.message})
            }
        }
    }

    /// A store failed while serving a request: log the failure (secrets masked) under
    /// `trace_id`, and answer 503 with a stable message that names only the trace id — an
    /// error of a database or Redis client can carry addresses, file paths, user names
    /// and the like, none of which is the caller's business.
    pub fn store_failure(
        &self,
        trace_id: &str,
        store: &'static str,
        error: &dyn std::fmt::Display,
    ) -> ApiError {
        tracing::error!(
            trace_id,
            store,
            error = %self.config.scrub(&error.to_string()),
            "store unavailable; request answered 503"
        );
        ApiError::new(
            ErrorCode::StoreUnavailable,
            format!(
                "a store tollgate depends on is unavailable; retry later (trace id {trace_id})"
            ),
        )
    }

    /// Settle every reservation a dead process left open in this journal, whatever
    /// instance id it was written under (SPEC §7). Their usage is unknown, so each is
    /// billed at its held estimate (`usage_source = estimated`): an upper bound on what the
    /// upstream could have charged when the request stated its max output. Each settle is
    /// a journal event like any other: with shared counters the applier brings it to Redis
    /// (SPEC §4: recovered settles reach the live counters); in-process counters load it
    /// from the ledger. Returns how many were recovered.
    pub async fn recover_open_reservations(&self) -> Result<usize, crate::db::DbError> {
        let rows = self.journal.open_rows().await?;
        let n = rows.len();
        for row in rows {
            let s = Settlement {
                input_tokens: row.input_tokens,
                output_tokens: row.output_tokens,
                cost_micros: row.reserved_micros,
                usage_source: "estimated",
                http_status: None,
                ..Default::default()
            };
            self.journal.settle(&row.trace_id, s.clone()).await?;
            self.metrics.settled(&row.model, &s);
            tracing::warn!(trace_id = %row.trace_id, cost_micros = row.reserved_micros, "recovered an open reservation left by a previous run; billed at its estimate");
        }
        Ok(n)
    }
}

/// The path of a request target, without its query.
fn route_path(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

fn duplicate(trace_id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::DuplicateRequest,
        format!("request {trace_id} is already in flight or completed"),
    )
}

fn auth_error(e: AuthError) -> ApiError {
    match e {
        AuthError::Unavailable => {
            let mut err = ApiError::new(ErrorCode::StoreUnavailable, e.to_string());
            err.retry_after = Some(crate::auth::MISS_BACKOFF.as_secs().max(1));
            err
        }
        _ => ApiError::new(ErrorCode::InvalidApiKey, e.to_string()),
    }
}

/// Clamp every count of a usage report to [`MAX_TOKEN_COUNT`]; true when one was above it
/// (a hostile or broken upstream: the row is then `estimated`).
fn clamp_usage(u: &mut Usage) -> bool {
    let mut clamped = false;
    for n in [
        &mut u.input_tokens,
        &mut u.cached_input_tokens,
        &mut u.cache_write_tokens,
        &mut u.cache_write_1h_tokens,
        &mut u.audio_input_tokens,
        &mut u.output_tokens,
        &mut u.reasoning_tokens,
        &mut u.audio_output_tokens,
        &mut u.tool_calls,
    ] {
        if *n > MAX_TOKEN_COUNT {
            *n = MAX_TOKEN_COUNT;
            clamped = true;
        }
    }
    clamped
}
