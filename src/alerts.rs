//! Threshold alerts: "this limit has reached N % of its value", once per limit, threshold
//! and window.
//!
//! After a settle the engine hands over the states of the limits the request touched
//! ([`Alerts::after_settle`]) — every settle that could cross a threshold: skipped only when
//! the request's admission saw every limit below the lowest threshold even counting all
//! holds, and it billed no more than it held ([`Alerts::may_fire`]); after a reserve
//! refused because a limit would be exceeded it names that limit ([`Alerts::after_refusal`]). For each limit and each configured
//! threshold (`[alerts].thresholds`, default 80/90/100):
//!
//! * **What counts:** settled usage only (`used`), not the holds of requests in flight. A
//!   hold is an upper bound (every allowed output token), usually far above what the
//!   request ends up costing, so counting it would announce spend that never happens.
//!   The one exception is a refusal: a limit that just refused a request is reported at the
//!   100 threshold (`refused: true`) even if settled usage is lower, because from the
//!   client's side it is exhausted.
//! * **Once per period:** a threshold fires once per (subject, limit spec, alert period):
//!   the calendar window for `minute|hour|day|week|month`, the lifetime for `total`, and
//!   for rolling windows (`5h`, `30m`…) the window-length periods aligned to the Unix epoch
//!   — a rolling window never "starts", so a limit that stays above a threshold is
//!   reported again at most once per window length. The spec includes the value, so
//!   changing a cap starts fresh marks for the new cap.
//! * **Marks survive restarts:** fired marks are kept in memory (one entry per limit, a
//!   bitmask of thresholds, the period it belongs to — a new period replaces the old one,
//!   which is how marks are pruned when windows roll over) and written to the
//!   `alert_marks` table of the embedded database by the background task. They are loaded
//!   at start, so a restart does not repeat an alert — except one whose delivery had not
//!   finished when the process stopped: the mark is written after the webhook attempt, so
//!   delivery is at least once.
//! * **Never on the request path:** evaluation is O(limits × thresholds) in memory under
//!   one short lock. Each alert is a `WARN` event on target `tollgate::alert` at once, and
//!   goes to the background task through a bounded queue ([`QUEUE_CAPACITY`]); when the
//!   queue is full the alert is logged, counted in [`AlertStats::dropped`] and not sent.
//!
//! The webhook body is the [`Alert`] JSON; see `docs/operations.md` for the schema.
//! In shared mode every instance keeps its own marks, so N instances may each send an
//! alert for the same threshold; the `id` field is equal across them, for receivers to
//! de-duplicate.

pub mod webhook;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use parking_lot::Mutex;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::AlertsConfig;
use crate::db::{Db, DbError};
use crate::quota::limit::LimitSpec;
use crate::quota::store::{AppliedLimit, LimitState, QuotaStore};
use crate::quota::window::{Window, calendar_bounds};
use webhook::{RetryPolicy, Webhook};

/// Alerts waiting for the background task; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 1024;

/// Limits whose marks are kept in memory. Past it, marks of ended periods are forgotten
/// first, then those of the oldest periods (which may then fire once more).
pub const MAX_TRACKED_LIMITS: usize = 100_000;

/// The threshold a refusal reports.
const REFUSAL_THRESHOLD: u8 = 100;

/// One alert: the log event's fields and the webhook's JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// Stable for (subject, spec, period, threshold): equal on every instance and on a
    /// repeated delivery, for receivers to de-duplicate.
    pub id: String,
    /// Always `"quota.threshold"`.
    pub event: &'static str,
    pub subject: String,
    pub spec: String,
    pub plan: Option<String>,
    pub metric: &'static str,
    pub window: String,
    /// The upstream the limit is scoped to, or `"all"`.
    pub scope: String,
    /// Percent of the limit this alert is about.
    pub threshold: u8,
    /// Settled usage as a whole percent of the limit, rounded down.
    pub percent: u64,
    /// Amounts as the usage API writes them: USD as a decimal string, others as integers.
    pub used: serde_json::Value,
    pub limit: serde_json::Value,
    /// The alert was raised by a refused request (429) rather than by usage alone.
    pub refused: bool,
    /// Start of the alert period (RFC 3339); `null` for `total` limits.
    pub window_start: Option<String>,
    /// When the counted usage starts to free up; `null` for `total` limits.
    pub resets_at: Option<String>,
    pub instance_id: String,
    pub fired_at: String,
}

/// Counters of what the alerting did since start.
#[derive(Debug, Default)]
pub struct AlertStats {
    /// Alerts raised (logged).
    pub fired: AtomicU64,
    /// Alerts not queued for delivery because the queue was full.
    pub dropped: AtomicU64,
    /// Webhook deliveries that got a 2xx.
    pub delivered: AtomicU64,
    /// Webhook deliveries that gave up.
    pub failed: AtomicU64,
}

/// The persisted form of one fired threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MarkRow {
    subject: String,
    spec: String,
    threshold: u8,
    period: String,
    fired_at: String,
}

struct Queued {
    alert: Alert,
    mark: MarkRow,
}

/// Which thresholds of one limit fired in which period.
struct Mark {
    /// Period text: a window start in ledger time format, or `total`. Text order is time
    /// order, so a late evaluation of an older period is recognised and ignored.
    period: String,
    /// When the period ends (`None`: never).
    end: Option<DateTime<Utc>>,
    /// Bit `t` set: threshold `t` fired in `period`.
    fired: u128,
}

#[derive(Default)]
struct Marks {
    by_limit: HashMap<String, Mark>,
}

impl Marks {
    fn is_fired(&self, id: &str, period: &str, threshold: u8) -> bool {
        self.by_limit
            .get(id)
            .is_some_and(|m| m.period == period && m.fired & bit(threshold) != 0)
    }

    /// Record `threshold` for `period`; `true` when it had not fired yet (so it fires now).
    fn fire(
        &mut self,
        id: &str,
        period: &str,
        end: Option<DateTime<Utc>>,
        threshold: u8,
        now: DateTime<Utc>,
    ) -> bool {
        if let Some(m) = self.by_limit.get_mut(id) {
            if m.period == period {
                let new = m.fired & bit(threshold) == 0;
                m.fired |= bit(threshold);
                return new;
            }
            if period < m.period.as_str() {
                // A state read just before a window rolled over, evaluated after a newer
                // one: the old window is over, nothing to announce.
                return false;
            }
            m.period = period.to_string();
            m.end = end;
            m.fired = bit(threshold);
            return true;
        }
        self.make_room(now);
        self.by_limit.insert(
            id.to_string(),
            Mark {
                period: period.to_string(),
                end,
                fired: bit(threshold),
            },
        );
        true
    }

    fn make_room(&mut self, now: DateTime<Utc>) {
        if self.by_limit.len() < MAX_TRACKED_LIMITS {
            return;
        }
        self.by_limit.retain(|_, m| m.end.is_none_or(|e| e > now));
        if self.by_limit.len() < MAX_TRACKED_LIMITS {
            return;
        }
        // Still full of live periods: forget the tenth ending soonest (lifetime marks last).
        let mut ends: Vec<(Option<DateTime<Utc>>, String)> = self
            .by_limit
            .iter()
            .map(|(k, m)| (m.end, k.clone()))
            .collect();
        ends.sort_by(|a, b| match (a.0, b.0) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
        for (_, k) in ends.into_iter().take(MAX_TRACKED_LIMITS / 10) {
            self.by_limit.remove(&k);
        }
        tracing::warn!(target: "tollgate::alert", tracked = MAX_TRACKED_LIMITS, "too many limits with fired alerts; forgot the oldest marks (they may fire once more)");
    }
}

fn bit(threshold: u8) -> u128 {
    1u128 << threshold.min(127)
}

/// Identity of a limit for alerting: subject and spec (value included).
fn limit_id(subject: &str, spec: &str) -> String {
    format!("{subject}|{spec}")
}

/// The alert period of `spec` at `now`: (period text, start, end). `window` is the
/// calendar window the store reported with the usage, preferred so that usage and period
/// were read at the same instant.
fn period_of(
    spec: &LimitSpec,
    tz: Tz,
    now: DateTime<Utc>,
    window: Option<(DateTime<Utc>, DateTime<Utc>)>,
) -> (String, Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    match spec.window {
        Window::Calendar(unit) => {
            let (s, e) = window.unwrap_or_else(|| calendar_bounds(unit, now, tz));
            (crate::time::to_text(s), Some(s), Some(e))
        }
        Window::Rolling(r) => {
            let len = r.len_secs().max(1);
            let start_secs = now.timestamp().div_euclid(len) * len;
            let start = DateTime::from_timestamp(start_secs, 0).unwrap_or(now);
            let end = DateTime::from_timestamp(start_secs.saturating_add(len), 0);
            (crate::time::to_text(start), Some(start), end)
        }
        Window::Total => ("total".to_string(), None, None),
    }
}

/// A threshold that fires, collected under the marks lock and announced after it.
struct Due<'a> {
    state: &'a LimitState,
    threshold: u8,
    period: String,
    start: Option<DateTime<Utc>>,
    refused: bool,
}

/// The alerting of one instance: thresholds, fired marks, the queue to the background task.
pub struct Alerts {
    thresholds: Vec<u8>,
    tz: Tz,
    instance_id: String,
    marks: Mutex<Marks>,
    tx: mpsc::Sender<Queued>,
    worker: Mutex<Option<AlertWorker>>,
    stats: Arc<AlertStats>,
}

impl Alerts {
    /// Build the alerting of an instance and load the marks persisted in `db` (blocking:
    /// call at start-up, not on the reactor). A database error is logged and alerting
    /// starts with no marks (alerts of the current periods may then repeat once).
    pub fn new(cfg: &AlertsConfig, tz: Tz, instance_id: &str, db: Option<Db>) -> Alerts {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let stats = Arc::new(AlertStats::default());
        let webhook = cfg
            .webhook
            .clone()
            .map(|t| Webhook::new(t, RetryPolicy::default()));
        let mut marks = Marks::default();
        if let Some(db) = &db {
            let now = Utc::now();
            match db.call_blocking(move |c| load_marks(c, tz, now)) {
                Ok(rows) => {
                    for r in rows {
                        let (period, _, end) = match r.spec.parse::<LimitSpec>().ok() {
                            Some(spec) => period_of(&spec, tz, now, None),
                            None => continue,
                        };
                        marks.fire(
                            &limit_id(&r.subject, &r.spec),
                            &period,
                            end,
                            r.threshold,
                            now,
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(target: "tollgate::alert", error = %e, "cannot load fired alert marks; alerts of the current windows may repeat once")
                }
            }
        }
        let worker = AlertWorker {
            rx,
            db,
            webhook,
            stats: stats.clone(),
        };
        Alerts {
            thresholds: cfg.thresholds.clone(),
            tz,
            instance_id: instance_id.to_string(),
            marks: Mutex::new(marks),
            tx,
            worker: Mutex::new(Some(worker)),
            stats,
        }
    }

    /// Whether any threshold is configured.
    pub fn enabled(&self) -> bool {
        !self.thresholds.is_empty()
    }

    pub fn stats(&self) -> &AlertStats {
        &self.stats
    }

    /// The background task (delivery and persistence); `None` once taken. Run it with
    /// [`AlertWorker::run`] on the runtime that lives as long as the instance.
    pub fn take_worker(&self) -> Option<AlertWorker> {
        self.worker.lock().take()
    }

    /// Whether a settle of a request admitted with these `states` can fire an alert: the
    /// worst case seen at admission (settled usage plus every hold, this request's
    /// included) reaches the lowest threshold of some limit. If it does not, and the request
    /// bills at most its hold, settled usage stays below every threshold — requests
    /// admitted later see any growth in their own states — so the engine skips the usage
    /// read after such a settle (in shared mode a Redis round trip per request).
    pub fn may_fire(&self, states: &[LimitState]) -> bool {
        let Some(&lowest) = self.thresholds.iter().min() else {
            return false;
        };
        states.iter().any(|s| {
            let worst = i128::from(s.used) + i128::from(s.reserved);
            worst * 100 >= i128::from(s.limit.spec.value) * i128::from(lowest)
        })
    }

    /// After a settle: read the states of the request's limits and evaluate them. One
    /// `usage` call on the store (in memory for the embedded store); nothing when alerting
    /// is off or the request had no limits.
    pub async fn after_settle(&self, store: &dyn QuotaStore, limits: &[AppliedLimit]) {
        if !self.enabled() || limits.is_empty() {
            return;
        }
        match store.usage(limits).await {
            Ok(states) => {
                self.evaluate(&states, None, Utc::now());
            }
            Err(e) => {
                tracing::debug!(target: "tollgate::alert", error = %e, "no usage after settle; alerts not evaluated")
            }
        }
    }

    /// After a reserve refused because `limit` would be exceeded. Reads the limit's usage
    /// only when its 100 % alert has not fired in the current period yet, so a client
    /// hammering an exhausted limit costs one map lookup per refusal.
    pub async fn after_refusal(&self, store: &dyn QuotaStore, limit: &AppliedLimit) {
        if !self.thresholds.contains(&REFUSAL_THRESHOLD) {
            return;
        }
        let now = Utc::now();
        let subject = limit.subject.as_text();
        let spec = limit.spec.to_string();
        let (period, _, _) = period_of(&limit.spec, self.tz, now, None);
        if self
            .marks
            .lock()
            .is_fired(&limit_id(&subject, &spec), &period, REFUSAL_THRESHOLD)
        {
            return;
        }
        match store.usage(std::slice::from_ref(limit)).await {
            Ok(states) => {
                self.evaluate(&states, Some(limit), Utc::now());
            }
            Err(e) => {
                tracing::debug!(target: "tollgate::alert", error = %e, "no usage after refusal; alert not evaluated")
            }
        }
    }

    /// Evaluate limit states; fires (logs and queues) every threshold newly reached.
    /// Returns the alerts fired.
    pub fn evaluate(
        &self,
        states: &[LimitState],
        refused: Option<&AppliedLimit>,
        now: DateTime<Utc>,
    ) -> Vec<Alert> {
        let mut due: Vec<Due<'_>> = Vec::new();
        {
            let mut marks = self.marks.lock();
            for s in states {
                let value = s.limit.spec.value;
                if value <= 0 {
                    continue;
                }
                let is_refused = refused.is_some_and(|r| *r == s.limit);
                let used = i128::from(s.used.max(0));
                let mut id = None;
                let mut period = None;
                for &t in &self.thresholds {
                    let reached = used * 100 >= i128::from(t) * i128::from(value)
                        || (is_refused && t == REFUSAL_THRESHOLD);
                    if !reached {
                        continue;
                    }
                    let id = id.get_or_insert_with(|| {
                        limit_id(&s.limit.subject.as_text(), &s.limit.spec.to_string())
                    });
                    let window = s.window_start.zip(s.resets_at);
                    let (p, start, end) = period
                        .get_or_insert_with(|| period_of(&s.limit.spec, self.tz, now, window));
                    if marks.fire(id, p, *end, t, now) {
                        due.push(Due {
                            state: s,
                            threshold: t,
                            period: p.clone(),
                            start: *start,
                            refused: is_refused,
                        });
                    }
                }
            }
        }
        let mut fired = Vec::with_capacity(due.len());
        for d in due {
            let alert = self.alert(d.state, d.threshold, &d.period, d.start, d.refused, now);
            self.emit(&alert, &d.period);
            fired.push(alert);
        }
        fired
    }

    fn alert(
        &self,
        s: &LimitState,
        threshold: u8,
        period: &str,
        start: Option<DateTime<Utc>>,
        refused: bool,
        now: DateTime<Utc>,
    ) -> Alert {
        let spec = &s.limit.spec;
        let subject = s.limit.subject.as_text();
        let spec_text = spec.to_string();
        let amount = |v: i64| -> serde_json::Value {
            if spec.metric.is_money() {
                serde_json::Value::String(crate::money::format_usd(v))
            } else {
                serde_json::Value::from(v)
            }
        };
        let percent = (i128::from(s.used.max(0)) * 100 / i128::from(spec.value.max(1))) as u64;
        let digest = Sha256::digest(format!("{subject}|{spec_text}|{period}|{threshold}"));
        Alert {
            id: hex::encode(&digest[..16]),
            event: "quota.threshold",
            subject,
            spec: spec_text,
            plan: s.limit.plan.clone(),
            metric: spec.metric.as_str(),
            window: spec.window.to_string(),
            scope: spec.upstream.clone().unwrap_or_else(|| "all".to_string()),
            threshold,
            percent,
            used: amount(s.used),
            limit: amount(spec.value),
            refused,
            window_start: start.map(crate::time::to_text),
            resets_at: s.resets_at.map(crate::time::to_text),
            instance_id: self.instance_id.clone(),
            fired_at: crate::time::to_text(now),
        }
    }

    fn emit(&self, a: &Alert, period: &str) {
        self.stats.fired.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target: "tollgate::alert",
            alert_id = %a.id,
            subject = %a.subject,
            spec = %a.spec,
            plan = a.plan.as_deref().unwrap_or(""),
            threshold = a.threshold,
            percent = a.percent,
            used = %amount_text(&a.used),
            limit = %amount_text(&a.limit),
            refused = a.refused,
            window_start = a.window_start.as_deref().unwrap_or(""),
            resets_at = a.resets_at.as_deref().unwrap_or(""),
            "quota threshold reached"
        );
        let job = Queued {
            mark: MarkRow {
                subject: a.subject.clone(),
                spec: a.spec.clone(),
                threshold: a.threshold,
                period: period.to_string(),
                fired_at: a.fired_at.clone(),
            },
            alert: a.clone(),
        };
        if self.tx.try_send(job).is_err() {
            let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(target: "tollgate::alert", alert_id = %a.id, dropped_total = n, "alert queue full; alert logged but not delivered");
        }
    }
}

/// `"4.250000"` → `4.250000`, `120` → `120`: amounts in log fields without JSON quotes.
fn amount_text(v: &serde_json::Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// The background half: delivers queued alerts to the webhook, then persists their marks.
pub struct AlertWorker {
    rx: mpsc::Receiver<Queued>,
    db: Option<Db>,
    webhook: Option<Webhook>,
    stats: Arc<AlertStats>,
}

impl AlertWorker {
    /// Run until every [`Alerts`] handle is gone. Alerts are handled one at a time, in the
    /// order fired, so a receiver sees 80 before 90 for the same limit.
    pub async fn run(mut self) {
        while let Some(q) = self.rx.recv().await {
            if let Some(hook) = &self.webhook {
                match serde_json::to_vec(&q.alert) {
                    Ok(body) => match hook.deliver(Bytes::from(body), &q.alert.id).await {
                        Ok(attempts) => {
                            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(target: "tollgate::alert", alert_id = %q.alert.id, attempts, "alert delivered to webhook");
                        }
                        Err((e, attempts)) => {
                            self.stats.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(target: "tollgate::alert", alert_id = %q.alert.id, attempts, error = %e, "alert webhook delivery failed; giving up");
                        }
                    },
                    Err(e) => {
                        tracing::error!(target: "tollgate::alert", alert_id = %q.alert.id, error = %e, "cannot encode alert")
                    }
                }
            }
            if let Some(db) = &self.db {
                let row = q.mark;
                if let Err(e) = db.call(move |c| save_mark(c, &row)).await {
                    tracing::error!(target: "tollgate::alert", alert_id = %q.alert.id, error = %e, "cannot persist alert mark; it may fire again after a restart");
                }
            }
        }
    }
}

/// Upsert one mark; a row of an older period is replaced, never one of a newer period.
fn save_mark(c: &rusqlite::Connection, m: &MarkRow) -> Result<(), DbError> {
    c.execute(
        "INSERT INTO alert_marks (subject, spec, threshold, window_start, fired_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (subject, spec, threshold) DO UPDATE
           SET window_start = excluded.window_start, fired_at = excluded.fired_at
           WHERE excluded.window_start > alert_marks.window_start",
        rusqlite::params![m.subject, m.spec, m.threshold, m.period, m.fired_at],
    )?;
    Ok(())
}

/// The marks of the current periods; rows of ended periods (and of specs that no longer
/// parse) are deleted.
fn load_marks(
    c: &rusqlite::Connection,
    tz: Tz,
    now: DateTime<Utc>,
) -> Result<Vec<MarkRow>, DbError> {
    let mut st =
        c.prepare("SELECT subject, spec, threshold, window_start, fired_at FROM alert_marks")?;
    let rows = st
        .query_map([], |r| {
            Ok(MarkRow {
                subject: r.get(0)?,
                spec: r.get(1)?,
                threshold: r.get(2)?,
                period: r.get(3)?,
                fired_at: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut live = Vec::new();
    for row in rows {
        let current = row
            .spec
            .parse::<LimitSpec>()
            .ok()
            .map(|s| period_of(&s, tz, now, None).0);
        if current.as_deref() == Some(row.period.as_str()) {
            live.push(row);
        } else {
            c.execute(
                "DELETE FROM alert_marks WHERE subject = ?1 AND spec = ?2 AND threshold = ?3",
                rusqlite::params![row.subject, row.spec, row.threshold],
            )?;
        }
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Durability, Secret, WebhookTarget};
    use crate::keys::Subject;
    use crate::quota::memory::MemoryStore;
    use crate::quota::store::{Amounts, ReserveOutcome, ReserveRequest};
    use chrono::TimeZone;

    fn cfg(thresholds: &[u8]) -> AlertsConfig {
        AlertsConfig {
            thresholds: thresholds.to_vec(),
            webhook: None,
        }
    }

    fn limit(spec: &str) -> AppliedLimit {
        AppliedLimit {
            subject: Subject::User("ann".into()),
            spec: spec.parse().unwrap(),
            plan: None,
        }
    }

    fn state(spec: &str, used: i64, reserved: i64, now: DateTime<Utc>) -> LimitState {
        let l = limit(spec);
        let (window_start, resets_at) = match l.spec.window {
            Window::Calendar(u) => {
                let (s, e) = calendar_bounds(u, now, chrono_tz::UTC);
                (Some(s), Some(e))
            }
            _ => (None, None),
        };
        LimitState {
            limit: l,
            used,
            reserved,
            window_start,
            resets_at,
        }
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn thresholds(fired: &[Alert]) -> Vec<u8> {
        fired.iter().map(|a| a.threshold).collect()
    }

    #[test]
    fn a_settle_is_watched_only_when_the_worst_case_reaches_the_lowest_threshold() {
        let a = Alerts::new(&cfg(&[90, 80, 100]), chrono_tz::UTC, "i-1", None);
        let now = at(2026, 3, 10, 12, 0);
        // 50 % used + 29 % held: below 80 % even if every hold were billed.
        assert!(!a.may_fire(&[state("usd:day=10", 5_000_000, 2_900_000, now)]));
        // Holds count here (unlike in `evaluate`): 50 % + 30 % could end at 80 %.
        assert!(a.may_fire(&[state("usd:day=10", 5_000_000, 3_000_000, now)]));
        // Any one limit of the request is enough.
        assert!(a.may_fire(&[
            state("usd:day=10", 0, 0, now),
            state("requests:minute=10", 8, 0, now),
        ]));
        // A 0 cap never admits; an empty threshold list never fires.
        let none = Alerts::new(&cfg(&[]), chrono_tz::UTC, "i-1", None);
        assert!(!none.may_fire(&[state("usd:day=10", 10_000_000, 0, now)]));
    }

    #[test]
    fn each_threshold_fires_once_per_window() {
        let a = Alerts::new(&cfg(&[80, 90, 100]), chrono_tz::UTC, "i-1", None);
        let now = at(2026, 3, 10, 12, 0);
        assert!(
            a.evaluate(&[state("usd:day=10", 7_000_000, 0, now)], None, now)
                .is_empty()
        );
        // Holds do not count: 70 % used + 30 % reserved is still 70 %.
        assert!(
            a.evaluate(&[state("usd:day=10", 7_000_000, 3_000_000, now)], None, now)
                .is_empty()
        );
        let fired = a.evaluate(&[state("usd:day=10", 8_000_000, 0, now)], None, now);
        assert_eq!(thresholds(&fired), vec![80]);
        let f = &fired[0];
        assert_eq!(f.subject, "user:ann");
        assert_eq!(f.spec, "usd:day=10");
        assert_eq!(f.used, serde_json::json!("8.000000"));
        assert_eq!(f.limit, serde_json::json!("10.000000"));
        assert_eq!(f.percent, 80);
        assert_eq!(
            f.window_start.as_deref(),
            Some("2026-03-10T00:00:00.000000Z")
        );
        assert_eq!(f.resets_at.as_deref(), Some("2026-03-11T00:00:00.000000Z"));
        assert_eq!(f.instance_id, "i-1");
        assert!(!f.refused);
        // Same window, still above 80 %: nothing new.
        assert!(
            a.evaluate(&[state("usd:day=10", 8_500_000, 0, now)], None, now)
                .is_empty()
        );
        // One settle past two thresholds fires both, lowest first.
        let fired = a.evaluate(&[state("usd:day=10", 10_200_000, 0, now)], None, now);
        assert_eq!(thresholds(&fired), vec![90, 100]);
        assert_eq!(fired[1].percent, 102);
        assert_eq!(a.stats().fired.load(Ordering::Relaxed), 3);

        // The next day is a new window: 80 % fires again, with a different id.
        let tomorrow = at(2026, 3, 11, 9, 0);
        let fired = a.evaluate(
            &[state("usd:day=10", 8_000_000, 0, tomorrow)],
            None,
            tomorrow,
        );
        assert_eq!(thresholds(&fired), vec![80]);
        assert_ne!(
            fired[0].id,
            a.alert(
                &state("usd:day=10", 0, 0, now),
                80,
                "2026-03-10T00:00:00.000000Z",
                None,
                false,
                now
            )
            .id
        );
        // A late evaluation of yesterday's window announces nothing.
        assert!(
            a.evaluate(&[state("usd:day=10", 9_900_000, 0, now)], None, now)
                .is_empty()
        );
    }

    #[test]
    fn counts_disabled_and_other_limits_are_independent() {
        let a = Alerts::new(&cfg(&[50]), chrono_tz::UTC, "i", None);
        let now = at(2026, 1, 1, 0, 0);
        let fired = a.evaluate(
            &[
                state("requests:total=10", 5, 0, now),
                state("tokens:total=1000", 499, 0, now),
                state("requests:total=0", 9, 0, now),
                state("requests:total=20", 10, 0, now),
            ],
            None,
            now,
        );
        let specs: Vec<&str> = fired.iter().map(|a| a.spec.as_str()).collect();
        assert_eq!(specs, vec!["requests:total=10", "requests:total=20"]);
        assert_eq!(fired[0].used, serde_json::json!(5));
        assert_eq!(fired[0].window_start, None, "total has no window");
        // A total limit never rolls over.
        let later = at(2030, 1, 1, 0, 0);
        assert!(
            a.evaluate(&[state("requests:total=10", 9, 0, later)], None, later)
                .is_empty()
        );
        // Raising the cap is a new limit.
        let fired = a.evaluate(&[state("requests:total=16", 9, 0, later)], None, later);
        assert_eq!(thresholds(&fired), vec![50]);
    }

    #[test]
    fn rolling_windows_fire_once_per_window_length() {
        let a = Alerts::new(&cfg(&[80]), chrono_tz::UTC, "i", None);
        let t0 = at(2026, 5, 1, 10, 1);
        let fired = a.evaluate(&[state("requests:4h=10", 8, 0, t0)], None, t0);
        assert_eq!(thresholds(&fired), vec![80]);
        // Periods are aligned to the epoch: 4 h divides a day, so they start at 08:00, 12:00…
        assert_eq!(
            fired[0].window_start.as_deref(),
            Some("2026-05-01T08:00:00.000000Z")
        );
        let t1 = at(2026, 5, 1, 11, 59);
        assert!(
            a.evaluate(&[state("requests:4h=10", 9, 0, t1)], None, t1)
                .is_empty()
        );
        let t2 = at(2026, 5, 1, 12, 0);
        assert_eq!(
            thresholds(&a.evaluate(&[state("requests:4h=10", 9, 0, t2)], None, t2)),
            vec![80]
        );
    }

    #[tokio::test]
    async fn a_refusal_reports_100_once() {
        let a = Alerts::new(&cfg(&[80, 100]), chrono_tz::UTC, "i", None);
        let store = MemoryStore::new(chrono_tz::UTC, None);
        // A 1000-token limit refusing a request that asks for 600 after 500 were used.
        let l = limit("tokens:day=1000");
        let req = |id: &str, out: i64| ReserveRequest {
            trace_id: id.into(),
            started_at: Utc::now(),
            limits: vec![l.clone()],
            estimate: Amounts {
                requests: 1,
                input_tokens: 0,
                output_tokens: out,
                cost_micros: 0,
            },
        };
        assert!(matches!(
            store.reserve(&req("a", 500)).await.unwrap(),
            ReserveOutcome::Admitted(_)
        ));
        store
            .settle(
                "a",
                Amounts {
                    output_tokens: 500,
                    ..Default::default()
                },
                Utc::now(),
                &[],
            )
            .await
            .unwrap();
        let ReserveOutcome::Exceeded { limit: refused, .. } =
            store.reserve(&req("b", 600)).await.unwrap()
        else {
            panic!("expected a refusal")
        };
        a.after_refusal(&store, &refused).await;
        assert_eq!(a.stats().fired.load(Ordering::Relaxed), 1);
        {
            let m = a.marks.lock();
            let id = limit_id("user:ann", "tokens:day=1000");
            let (p, _, _) = period_of(&l.spec, chrono_tz::UTC, Utc::now(), None);
            assert!(m.is_fired(&id, &p, 100));
            assert!(
                !m.is_fired(&id, &p, 80),
                "50 % used: 80 has not been reached"
            );
        }
        a.after_refusal(&store, &refused).await;
        assert_eq!(
            a.stats().fired.load(Ordering::Relaxed),
            1,
            "fires once per window"
        );
        // A refusal with 100 not configured fires nothing.
        let quiet = Alerts::new(&cfg(&[80]), chrono_tz::UTC, "i", None);
        quiet.after_refusal(&store, &refused).await;
        assert_eq!(quiet.stats().fired.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn marks_persist_across_restarts_and_stale_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db"), Durability::Normal).unwrap();
        let now = Utc::now();
        let a = Alerts::new(&cfg(&[50, 90]), chrono_tz::UTC, "i", Some(db.clone()));
        let worker = tokio::spawn(a.take_worker().unwrap().run());
        let fired = a.evaluate(
            &[
                state("requests:day=10", 6, 0, now),
                state("requests:total=10", 9, 0, now),
            ],
            None,
            now,
        );
        assert_eq!(fired.len(), 3);
        // An old window's mark, as a process of yesterday would have left it.
        let yesterday = crate::time::to_text(
            calendar_bounds(
                crate::quota::CalendarUnit::Day,
                now - chrono::Duration::days(1),
                chrono_tz::UTC,
            )
            .0,
        );
        db.call(move |c| {
            save_mark(
                c,
                &MarkRow {
                    subject: "user:bob".into(),
                    spec: "requests:day=10".into(),
                    threshold: 50,
                    period: yesterday,
                    fired_at: "x".into(),
                },
            )
        })
        .await
        .unwrap();
        drop(a);
        worker.await.unwrap();
        let rows = |db: &Db| {
            let db = db.clone();
            async move {
                db.call(|c| {
                    Ok(c.query_row("SELECT COUNT(*) FROM alert_marks", [], |r| {
                        r.get::<_, i64>(0)
                    })?)
                })
                .await
                .unwrap()
            }
        };
        assert_eq!(rows(&db).await, 4);

        let b = Alerts::new(&cfg(&[50, 90]), chrono_tz::UTC, "i", Some(db.clone()));
        assert_eq!(
            rows(&db).await,
            3,
            "the ended window's mark is pruned at load"
        );
        let again = b.evaluate(
            &[
                state("requests:day=10", 7, 0, now),
                state("requests:total=10", 10, 0, now),
            ],
            None,
            now,
        );
        assert!(again.is_empty(), "{again:?}");
        let more = b.evaluate(&[state("requests:day=10", 9, 0, now)], None, now);
        assert_eq!(thresholds(&more), vec![90]);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        // No worker runs, so the queue fills.
        let a = Alerts::new(&cfg(&[1]), chrono_tz::UTC, "i", None);
        let now = at(2026, 1, 1, 0, 0);
        let states: Vec<LimitState> = (1..=QUEUE_CAPACITY + 5)
            .map(|i| state(&format!("requests:total={i}"), i as i64, 0, now))
            .collect();
        assert_eq!(a.evaluate(&states, None, now).len(), QUEUE_CAPACITY + 5);
        assert_eq!(a.stats().dropped.load(Ordering::Relaxed), 5);
        assert_eq!(
            a.stats().fired.load(Ordering::Relaxed),
            (QUEUE_CAPACITY + 5) as u64
        );
    }

    #[test]
    fn marks_stay_bounded() {
        let mut m = Marks::default();
        let now = at(2026, 1, 1, 0, 0);
        let ended = Some(at(2025, 12, 31, 0, 0));
        let live = Some(at(2026, 1, 2, 0, 0));
        for i in 0..MAX_TRACKED_LIMITS {
            let end = if i % 2 == 0 { ended } else { live };
            assert!(m.fire(&format!("l{i}"), "p", end, 80, now));
        }
        assert!(m.fire("new", "p", live, 80, now));
        assert_eq!(
            m.by_limit.len(),
            MAX_TRACKED_LIMITS / 2 + 1,
            "ended periods go first"
        );
        assert!(m.is_fired("l1", "p", 80));
        assert!(!m.is_fired("l0", "p", 80));
    }

    #[test]
    fn webhook_urls_are_validated_by_the_config_parser() {
        let env = |_: &str| None;
        let bad = crate::config::Config::parse(
            "[alerts]\nwebhook = \"ftp://x/y?token=s3cret\"\n",
            "c",
            &env,
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("alerts.webhook"), "{bad}");
        assert!(!bad.contains("s3cret"), "{bad}");
        let ok = crate::config::Config::parse(
            "[alerts]\nwebhook = \"https://h.example/x\"\n",
            "c",
            &env,
        )
        .unwrap();
        let target = ok.alerts.webhook.unwrap();
        assert_eq!(target.url(), &Secret::new("https://h.example/x"));
        assert_eq!(target, WebhookTarget::parse("https://h.example/x").unwrap());
    }
}
