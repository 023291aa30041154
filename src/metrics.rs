//! Prometheus metrics of one instance (SPEC §9), served as text on the admin listener's
//! `/metrics`.
//!
//! One [`Metrics`] value per [`crate::engine::Engine`], holding its own [`Registry`] with the
//! `tollgate_` prefix — not the prometheus crate's process-global default registry, so two
//! engines in one process (tests, the CLI's offline `usage`) never share or collide on
//! series. The engine records events as they happen (one call per event); levels that are
//! cheaper to read than to track (open reservations, store health, journal backlog) are set
//! by the admin listener just before each scrape.
//!
//! Cardinality is bounded: `route` takes only configured routes (or `unmatched`), `status`
//! HTTP codes, `upstream` configured names, and `model` — which comes from client request
//! bodies — at most [`MAX_MODEL_LABELS`] distinct values, after which further models are
//! counted under `other`. Label values that are known in advance are created at start with
//! a zero value, so dashboards and alerts see a series before the first event.

use std::collections::HashSet;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::errors::ErrorCode;
use crate::ledger::Settlement;

/// Distinct `model` label values kept before folding the rest into `other`.
pub const MAX_MODEL_LABELS: usize = 200;

/// Label value for models beyond [`MAX_MODEL_LABELS`].
pub const OTHER_MODEL: &str = "other";

/// Most distinct unpriced tier/speed/region names counted under their own label; later ones
/// are counted as [`OTHER_MODEL`].
pub const MAX_UNPRICED_NAMES: usize = 50;

/// Histogram buckets in seconds, from 50 µs to 10 s: a quota check or settle is tens of
/// microseconds to a few milliseconds, an upstream's first byte up to seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Why a request was refused before reaching the upstream (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Disabled,
    Exceeded,
    Duplicate,
    Invalid,
    Auth,
    TooLarge,
}

impl Rejection {
    pub const ALL: [Rejection; 6] = [
        Rejection::Disabled,
        Rejection::Exceeded,
        Rejection::Duplicate,
        Rejection::Invalid,
        Rejection::Auth,
        Rejection::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Disabled => "disabled",
            Rejection::Exceeded => "exceeded",
            Rejection::Duplicate => "duplicate",
            Rejection::Invalid => "invalid",
            Rejection::Auth => "auth",
            Rejection::TooLarge => "too_large",
        }
    }

    /// The rejection an error code stands for; `None` for errors that are not refusals
    /// of the client's request (404, upstream and store failures).
    pub fn of(code: ErrorCode) -> Option<Rejection> {
        match code {
            ErrorCode::QuotaDisabled => Some(Rejection::Disabled),
            ErrorCode::QuotaExceeded => Some(Rejection::Exceeded),
            ErrorCode::DuplicateRequest => Some(Rejection::Duplicate),
            ErrorCode::InvalidRequest => Some(Rejection::Invalid),
            ErrorCode::InvalidApiKey => Some(Rejection::Auth),
            ErrorCode::RequestTooLarge | ErrorCode::HeaderTooLarge => Some(Rejection::TooLarge),
            ErrorCode::NotFound
            | ErrorCode::MethodNotAllowed
            | ErrorCode::Overloaded
            | ErrorCode::Internal
            | ErrorCode::UpstreamUnavailable
            | ErrorCode::StoreUnavailable
            | ErrorCode::UpstreamTimeout
            | ErrorCode::RequestTimeout => None,
        }
    }
}

/// Which step of billing failed (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingFailure {
    /// The ledger row could not be settled or released; it stays `reserved` and is
    /// recovered at the next start.
    LedgerWrite,
    /// The counters could not take the actual amounts of a settled request.
    CounterSettle,
    /// The counters could not drop the hold of a released request.
    CounterRelease,
}

impl BillingFailure {
    pub const ALL: [BillingFailure; 3] = [
        BillingFailure::LedgerWrite,
        BillingFailure::CounterSettle,
        BillingFailure::CounterRelease,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BillingFailure::LedgerWrite => "ledger_write",
            BillingFailure::CounterSettle => "counter_settle",
            BillingFailure::CounterRelease => "counter_release",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot register metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every metric of one instance.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    rejections: IntCounterVec,
    idempotent_hits: IntCounter,
    settles: IntCounterVec,
    billing_failures: IntCounterVec,
    open_reservations: IntGauge,
    journal_backlog: IntGaugeVec,
    store_up: IntGaugeVec,
    tokens: IntCounterVec,
    cost_micros: IntCounterVec,
    quota_check: Histogram,
    settle: Histogram,
    upstream_first_byte: HistogramVec,
    added_latency: Histogram,
    alerts: IntCounterVec,
    key_miss_reads: IntCounter,
    key_misses: IntCounterVec,
    unpriced: IntCounterVec,
    connections_refused: IntCounterVec,
    journal_oldest_unshipped: IntGauge,
    journal_quarantined: IntCounter,
    counter_events_set_aside: IntCounter,
    undefined_plan_refusals: IntCounter,
    reconcile_differences: IntGauge,
    models: Mutex<HashSet<String>>,
    unpriced_names: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn histogram(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
}

impl Metrics {
    /// A fresh registry with every tollgate metric registered.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new_custom(Some("tollgate".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests on the proxy listener by route and the status the client got (0: no response).",
            ),
            &["route", "status"],
        )?;
        let rejections = IntCounterVec::new(
            Opts::new(
                "quota_rejections_total",
                "Requests refused before reaching the upstream, by reason.",
            ),
            &["reason"],
        )?;
        let idempotent_hits = IntCounter::new(
            "idempotent_hits_total",
            "Requests answered 409 because their trace id was already in flight or settled.",
        )?;
        let settles = IntCounterVec::new(
            Opts::new(
                "settles_total",
                "Requests billed, by where their usage came from.",
            ),
            &["usage_source"],
        )?;
        let billing_failures = IntCounterVec::new(
            Opts::new(
                "billing_failures_total",
                "Billing steps that failed, by step.",
            ),
            &["reason"],
        )?;
        let open_reservations =
            IntGauge::new("open_reservations", "Quota holds of requests in flight.")?;
        let journal_backlog = IntGaugeVec::new(
            Opts::new(
                "journal_backlog",
                "Journaled events not yet applied to a target.",
            ),
            &["target"],
        )?;
        let store_up = IntGaugeVec::new(
            Opts::new("store_up", "1 when a store answers, 0 when it is down."),
            &["store"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "tokens_total",
                "Billed tokens by model and kind (input includes cached).",
            ),
            &["model", "kind"],
        )?;
        let cost_micros = IntCounterVec::new(
            Opts::new("cost_micros_total", "Billed cost in micro-USD by model."),
            &["model"],
        )?;
        let quota_check = Histogram::with_opts(histogram(
            "quota_check_seconds",
            "Time to admit a request: parse, estimate, reserve and journal.",
        ))?;
        let settle = Histogram::with_opts(histogram(
            "settle_seconds",
            "Time to settle or release a request: ledger row and counters.",
        ))?;
        let upstream_first_byte = HistogramVec::new(
            histogram(
                "upstream_first_byte_seconds",
                "From the request sent upstream to the first response byte, by upstream.",
            ),
            &["upstream"],
        )?;
        let added_latency = Histogram::with_opts(histogram(
            "added_latency_seconds",
            "Time a forwarded request spent in tollgate: total minus the upstream's time.",
        ))?;
        let alerts = IntCounterVec::new(
            Opts::new(
                "alerts_total",
                "Threshold alerts by outcome: fired (logged), dropped (queue full), delivered and failed (webhook).",
            ),
            &["outcome"],
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "Client connections closed at accept because the listener held its maximum, by listener.",
            ),
            &["listener"],
        )?;
        for l in ["proxy", "admin"] {
            connections_refused.with_label_values(&[l]);
        }
        let journal_oldest_unshipped = IntGauge::new(
            "journal_oldest_unshipped_seconds",
            "Age of the oldest journaled event not yet shipped to the ledger of record (0 when none waits; always 0 in embedded mode).",
        )?;
        let undefined_plan_refusals = IntCounter::new(
            "undefined_plan_refusals_total",
            "Requests refused because their key is on a plan the configuration does not define.",
        )?;
        let journal_quarantined = IntCounter::new(
            "journal_quarantined_total",
            "Journal events the ledger of record refused for their data, set aside in the journal's quarantine so the rows behind them ship (shared mode; always 0 in embedded mode).",
        )?;
        let counter_events_set_aside = IntCounter::new(
            "counter_events_set_aside_total",
            "Journaled counter changes Redis refused outright (not unreachable), set aside so the rest apply; `tollgate reconcile --fix` brings them to the counters (shared mode with Redis).",
        )?;
        let reconcile_differences = IntGauge::new(
            "reconcile_differences",
            "Counters that differed from the ledger at the last reconcile this instance ran (0 before the first).",
        )?;
        for o in ["fired", "dropped", "delivered", "failed"] {
            alerts.with_label_values(&[o]);
        }
        let key_miss_reads = IntCounter::new(
            "key_miss_reads_total",
            "Store reads made because a presented key was not in this instance's key directory (at most one per 10 ms).",
        )?;
        let key_misses = IntCounterVec::new(
            Opts::new(
                "key_misses_total",
                "Presented keys not in the key directory, by answer: found (created since the last refresh), unknown (after a read), unread (negative cache or read back-off).",
            ),
            &["answer"],
        )?;
        for a in ["found", "unknown", "unread"] {
            key_misses.with_label_values(&[a]);
        }
        let unpriced = IntCounterVec::new(
            Opts::new(
                "unpriced_modifiers_total",
                "Settled requests whose response reported a service tier, speed or region the model's price entry has no multiplier for (billed at standard rates).",
            ),
            &["model", "kind", "name"],
        )?;
        for r in Rejection::ALL {
            rejections.with_label_values(&[r.as_str()]);
        }
        for b in BillingFailure::ALL {
            billing_failures.with_label_values(&[b.as_str()]);
        }
        for s in ["upstream", "estimated"] {
            settles.with_label_values(&[s]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(rejections.clone()))?;
        registry.register(Box::new(idempotent_hits.clone()))?;
        registry.register(Box::new(settles.clone()))?;
        registry.register(Box::new(billing_failures.clone()))?;
        registry.register(Box::new(open_reservations.clone()))?;
        registry.register(Box::new(journal_backlog.clone()))?;
        registry.register(Box::new(store_up.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(cost_micros.clone()))?;
        registry.register(Box::new(quota_check.clone()))?;
        registry.register(Box::new(settle.clone()))?;
        registry.register(Box::new(upstream_first_byte.clone()))?;
        registry.register(Box::new(added_latency.clone()))?;
        registry.register(Box::new(alerts.clone()))?;
        registry.register(Box::new(key_miss_reads.clone()))?;
        registry.register(Box::new(key_misses.clone()))?;
        registry.register(Box::new(unpriced.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(journal_oldest_unshipped.clone()))?;
        registry.register(Box::new(journal_quarantined.clone()))?;
        registry.register(Box::new(counter_events_set_aside.clone()))?;
        registry.register(Box::new(undefined_plan_refusals.clone()))?;
        registry.register(Box::new(reconcile_differences.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            rejections,
            idempotent_hits,
            settles,
            billing_failures,
            open_reservations,
            journal_backlog,
            store_up,
            tokens,
            cost_micros,
            quota_check,
            settle,
            upstream_first_byte,
            added_latency,
            alerts,
            key_miss_reads,
            key_misses,
            unpriced,
            connections_refused,
            journal_oldest_unshipped,
            journal_quarantined,
            counter_events_set_aside,
            undefined_plan_refusals,
            reconcile_differences,
            models: Mutex::new(HashSet::new()),
            unpriced_names: Mutex::new(HashSet::new()),
        })
    }

    /// A request on the proxy listener ended with `status` (0: no response was written).
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// tollgate answered an error of its own. Counts refusals by reason, and 409s also as
    /// idempotent hits; other errors (404, 5xx) are visible in `requests_total` only.
    pub fn refused(&self, code: ErrorCode) {
        if let Some(r) = Rejection::of(code) {
            self.rejections.with_label_values(&[r.as_str()]).inc();
            if r == Rejection::Duplicate {
                self.idempotent_hits.inc();
            }
        }
    }

    /// A request was refused because its key's plan is not defined.
    pub fn undefined_plan_refused(&self) {
        self.undefined_plan_refusals.inc();
    }

    /// A listener (`proxy` or `admin`) closed a connection at accept: it held its maximum.
    pub fn connection_refused(&self, listener: &'static str) {
        self.connections_refused
            .with_label_values(&[listener])
            .inc();
    }

    pub fn admit_time(&self, d: Duration) {
        self.quota_check.observe(d.as_secs_f64());
    }

    /// A request of `model` settled: its usage source, tokens (input counts cached ones
    /// too, as in the ledger) and cost.
    pub fn settled(&self, model: &str, s: &Settlement) {
        self.settles.with_label_values(&[s.usage_source]).inc();
        let model = self.model_label(model);
        let add = |kind: &str, n: i64| {
            self.tokens
                .with_label_values(&[model.as_str(), kind])
                .inc_by(n.max(0) as u64);
        };
        add("input", s.input_tokens);
        add("cached", s.cached_input_tokens);
        add("output", s.output_tokens);
        self.cost_micros
            .with_label_values(&[model.as_str()])
            .inc_by(s.cost_micros.max(0) as u64);
    }

    pub fn billing_failure(&self, f: BillingFailure) {
        self.billing_failures.with_label_values(&[f.as_str()]).inc();
    }

    /// Time the settle (or release) of one request took.
    pub fn settle_time(&self, d: Duration) {
        self.settle.observe(d.as_secs_f64());
    }

    /// Timings of a forwarded request: the upstream's first byte (when one came) and the
    /// latency tollgate added.
    pub fn forwarded(&self, upstream: &str, first_byte: Option<Duration>, added: Duration) {
        if let Some(fb) = first_byte {
            self.upstream_first_byte
                .with_label_values(&[upstream])
                .observe(fb.as_secs_f64());
        }
        self.added_latency.observe(added.as_secs_f64());
    }

    pub fn set_open_reservations(&self, n: usize) {
        self.open_reservations
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Bring the alert counters up to the alert worker's totals (read at scrape time).
    pub fn set_alert_totals(&self, fired: u64, dropped: u64, delivered: u64, failed: u64) {
        for (outcome, total) in [
            ("fired", fired),
            ("dropped", dropped),
            ("delivered", delivered),
            ("failed", failed),
        ] {
            let c = self.alerts.with_label_values(&[outcome]);
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        }
    }

    /// Bring the key look-up counters up to the authenticator's totals (read at scrape time).
    pub fn set_key_lookup_totals(&self, s: &crate::auth::LookupStats) {
        let load = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
        let bump = |c: &IntCounter, total: u64| {
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        };
        bump(&self.key_miss_reads, load(&s.reads));
        for (answer, total) in [
            ("found", load(&s.found)),
            ("unknown", load(&s.unknown)),
            ("unread", load(&s.unread)),
        ] {
            bump(&self.key_misses.with_label_values(&[answer]), total);
        }
    }

    pub fn set_store_up(&self, store: &str, up: bool) {
        self.store_up.with_label_values(&[store]).set(i64::from(up));
    }

    pub fn set_journal_backlog(&self, target: &str, n: u64) {
        self.journal_backlog
            .with_label_values(&[target])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Age in seconds of the oldest event waiting to ship (`None`: nothing waits).
    pub fn set_journal_oldest_unshipped(&self, age: Option<Duration>) {
        let secs = age.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.journal_oldest_unshipped.set(secs);
    }

    /// Bring the quarantine counter up to the journal's total (read at scrape time).
    pub fn set_journal_quarantined_total(&self, total: u64) {
        let seen = self.journal_quarantined.get();
        if total > seen {
            self.journal_quarantined.inc_by(total - seen);
        }
    }

    /// Bring the set-aside counter up to the applier's total (read at scrape time).
    pub fn set_counter_events_set_aside_total(&self, total: u64) {
        let seen = self.counter_events_set_aside.get();
        if total > seen {
            self.counter_events_set_aside.inc_by(total - seen);
        }
    }

    /// What the last reconcile found: the number of counters that differed from the ledger.
    pub fn set_reconcile_differences(&self, n: usize) {
        self.reconcile_differences
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Everything in the Prometheus text exposition format.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// A settled request of `model` reported `name` as its `kind` (`service_tier`, `speed`,
    /// `inference_geo`) and the price entry has no multiplier for it: billed at standard rates.
    pub fn unpriced(&self, model: &str, kind: &str, name: &str) {
        let model = self.model_label(model);
        let name = {
            let mut seen = self.unpriced_names.lock();
            if seen.contains(name) || seen.len() < MAX_UNPRICED_NAMES {
                seen.insert(name.to_owned());
                name.to_owned()
            } else {
                OTHER_MODEL.to_owned()
            }
        };
        self.unpriced
            .with_label_values(&[model.as_str(), kind, name.as_str()])
            .inc();
    }

    /// The `model` label for `model`: itself while fewer than [`MAX_MODEL_LABELS`] models
    /// have been seen, [`OTHER_MODEL`] after.
    fn model_label(&self, model: &str) -> String {
        let mut seen = self.models.lock();
        if seen.contains(model) {
            return model.to_string();
        }
        if seen.len() < MAX_MODEL_LABELS {
            seen.insert(model.to_string());
            return model.to_string();
        }
        OTHER_MODEL.to_string()
    }
}

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn known_labels_exist_before_any_event() {
        let m = Metrics::new().unwrap();
        let t = m.render().unwrap();
        for r in Rejection::ALL {
            let s = format!(
                "tollgate_quota_rejections_total{{reason=\"{}\"}}",
                r.as_str()
            );
            assert_eq!(value(&t, &s), Some(0.0), "{s}");
        }
        assert_eq!(
            value(
                &t,
                "tollgate_billing_failures_total{reason=\"ledger_write\"}"
            ),
            Some(0.0)
        );
        assert_eq!(value(&t, "tollgate_idempotent_hits_total"), Some(0.0));
        assert_eq!(
            value(&t, "tollgate_undefined_plan_refusals_total"),
            Some(0.0)
        );
        assert_eq!(value(&t, "tollgate_quota_check_seconds_count"), Some(0.0));
        assert!(t.contains("tollgate_settle_seconds_bucket{le=\"0.00005\"} 0"));
        assert!(t.contains("tollgate_added_latency_seconds_bucket{le=\"10\"} 0"));
    }

    #[test]
    fn events_are_counted_by_label() {
        let m = Metrics::new().unwrap();
        m.request("/v1/chat/completions", 200);
        m.request("/v1/chat/completions", 200);
        m.request("unmatched", 404);
        m.refused(ErrorCode::DuplicateRequest);
        m.refused(ErrorCode::QuotaExceeded);
        m.refused(ErrorCode::NotFound);
        m.settled(
            "gpt-4o-mini",
            &Settlement {
                usage_source: "upstream",
                input_tokens: 10,
                cached_input_tokens: 4,
                output_tokens: 7,
                cost_micros: 12,
                ..Default::default()
            },
        );
        m.billing_failure(BillingFailure::CounterSettle);
        m.admit_time(Duration::from_micros(70));
        m.forwarded(
            "openai",
            Some(Duration::from_millis(30)),
            Duration::from_micros(300),
        );
        m.set_open_reservations(3);
        m.set_store_up("sqlite", true);
        m.set_journal_backlog("postgres", 5);
        let t = m.render().unwrap();
        let v = |s: &str| value(&t, s);
        assert_eq!(
            v("tollgate_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"),
            Some(2.0)
        );
        assert_eq!(
            v("tollgate_requests_total{route=\"unmatched\",status=\"404\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("tollgate_quota_rejections_total{reason=\"duplicate\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("tollgate_quota_rejections_total{reason=\"exceeded\"}"),
            Some(1.0)
        );
        assert_eq!(v("tollgate_idempotent_hits_total"), Some(1.0));
        assert_eq!(
            v("tollgate_settles_total{usage_source=\"upstream\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("tollgate_tokens_total{kind=\"cached\",model=\"gpt-4o-mini\"}"),
            Some(4.0)
        );
        assert_eq!(
            v("tollgate_tokens_total{kind=\"output\",model=\"gpt-4o-mini\"}"),
            Some(7.0)
        );
        assert_eq!(
            v("tollgate_cost_micros_total{model=\"gpt-4o-mini\"}"),
            Some(12.0)
        );
        assert_eq!(
            v("tollgate_billing_failures_total{reason=\"counter_settle\"}"),
            Some(1.0)
        );
        // 70 µs lands in the 100 µs bucket, not the 50 µs one.
        assert_eq!(
            v("tollgate_quota_check_seconds_bucket{le=\"0.00005\"}"),
            Some(0.0)
        );
        assert_eq!(
            v("tollgate_quota_check_seconds_bucket{le=\"0.0001\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("tollgate_upstream_first_byte_seconds_count{upstream=\"openai\"}"),
            Some(1.0)
        );
        assert_eq!(v("tollgate_added_latency_seconds_count"), Some(1.0));
        assert_eq!(v("tollgate_open_reservations"), Some(3.0));
        assert_eq!(v("tollgate_store_up{store=\"sqlite\"}"), Some(1.0));
        assert_eq!(
            v("tollgate_journal_backlog{target=\"postgres\"}"),
            Some(5.0)
        );
    }

    #[test]
    fn unpriced_modifiers_are_counted_with_bounded_names() {
        let m = Metrics::new().unwrap();
        m.unpriced("gpt-6.1-sol", "service_tier", "scale");
        m.unpriced("gpt-6.1-sol", "service_tier", "scale");
        m.unpriced("claude-opus-5-5", "speed", "turbo");
        for i in 0..MAX_UNPRICED_NAMES + 5 {
            m.unpriced("m", "inference_geo", &format!("region-{i}"));
        }
        let t = m.render().unwrap();
        let series = |s: &str| value(&t, &format!("tollgate_unpriced_modifiers_total{{{s}}}"));
        assert_eq!(
            series("kind=\"service_tier\",model=\"gpt-6.1-sol\",name=\"scale\""),
            Some(2.0)
        );
        assert_eq!(
            series("kind=\"speed\",model=\"claude-opus-5-5\",name=\"turbo\""),
            Some(1.0)
        );
        // 2 names taken above; 48 regions get their own label, the other 7 share `other`.
        assert_eq!(
            series("kind=\"inference_geo\",model=\"m\",name=\"other\""),
            Some(7.0)
        );
    }

    fn one_output() -> Settlement {
        Settlement {
            usage_source: "estimated",
            output_tokens: 1,
            ..Default::default()
        }
    }

    #[test]
    fn model_labels_are_bounded() {
        let m = Metrics::new().unwrap();
        for i in 0..MAX_MODEL_LABELS + 50 {
            m.settled(&format!("model-{i}"), &one_output());
        }
        let t = m.render().unwrap();
        let models: HashSet<&str> = t
            .lines()
            .filter(|l| l.starts_with("tollgate_cost_micros_total{"))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert_eq!(models.len(), MAX_MODEL_LABELS + 1);
        assert!(models.contains(OTHER_MODEL));
        assert_eq!(
            value(&t, "tollgate_tokens_total{kind=\"output\",model=\"other\"}"),
            Some(50.0)
        );
        // A model seen before the cap keeps its own label.
        m.settled("model-0", &one_output());
        let t = m.render().unwrap();
        assert_eq!(
            value(
                &t,
                "tollgate_tokens_total{kind=\"output\",model=\"model-0\"}"
            ),
            Some(2.0)
        );
    }
}
