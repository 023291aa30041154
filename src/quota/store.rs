//! The quota store contract: the two-phase verbs every backend implements.
//!
//! `reserve` checks every applicable limit against `used + reserved + estimate` and holds
//! the estimate under a trace id — all limits pass and are held, or nothing is held.
//! `settle` replaces the hold with the actual amounts (attributed to the request's start
//! time); `release` drops the hold. Both are idempotent per trace id.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::quota::Subject;
use crate::quota::limit::{LimitSpec, Metric};

/// A limit as it applies to one request: whose, and which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedLimit {
    pub subject: Subject,
    pub spec: LimitSpec,
    /// `Some(plan)` when the limit comes from a config plan.
    pub plan: Option<String>,
}

impl AppliedLimit {
    /// Identity of the counter behind this limit: subject, metric, window and scope — not
    /// the value, so raising a cap keeps what was already used.
    pub fn counter_key(&self) -> String {
        let mut probe = self.spec.clone();
        probe.value = 0;
        format!("{}|{}", self.subject.as_text(), probe)
    }

    /// How the limit is named in messages: `requests:total=5 on key k_123`.
    pub fn describe(&self) -> String {
        let who = match &self.subject {
            Subject::Key(k) => format!("key {k}"),
            Subject::User(u) => format!("user {u}"),
            Subject::Tenant(t) => format!("tenant {t}"),
        };
        match &self.plan {
            Some(p) => format!("{} on {who} (plan {p})", self.spec),
            None => format!("{} on {who}", self.spec),
        }
    }
}

/// The quantities of one request, in every metric's unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Amounts {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micros: i64,
}

impl Amounts {
    /// Some field is larger than `other`'s (a settle that bills more than its hold).
    pub fn exceeds(&self, other: &Amounts) -> bool {
        self.requests > other.requests
            || self.input_tokens > other.input_tokens
            || self.output_tokens > other.output_tokens
            || self.cost_micros > other.cost_micros
    }

    pub fn for_spec(&self, spec: &LimitSpec) -> i64 {
        spec.amount(
            self.requests,
            self.input_tokens,
            self.output_tokens,
            self.cost_micros,
        )
    }
}

/// One limit's state, as reported by `usage` and used for rate-limit headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    pub limit: AppliedLimit,
    pub used: i64,
    pub reserved: i64,
    pub window_start: Option<DateTime<Utc>>,
    pub resets_at: Option<DateTime<Utc>>,
}

impl LimitState {
    pub fn remaining(&self) -> i64 {
        (self.limit.spec.value - self.used - self.reserved).max(0)
    }

    pub fn metric(&self) -> Metric {
        self.limit.spec.metric
    }

    /// The usage JSON of SPEC §2.
    pub fn to_json(&self) -> serde_json::Value {
        let m = self.limit.spec.metric;
        let amount = |v: i64| -> serde_json::Value {
            if m.is_money() {
                serde_json::Value::String(crate::money::format_usd(v))
            } else {
                serde_json::Value::from(v)
            }
        };
        serde_json::json!({
            "subject": self.limit.subject.as_text(),
            "spec": self.limit.spec.to_string(),
            "metric": m.as_str(),
            "window": self.limit.spec.window.to_string(),
            "scope": self.limit.spec.upstream.clone().unwrap_or_else(|| "all".to_string()),
            "plan": self.limit.plan,
            "limit": amount(self.limit.spec.value),
            "used": amount(self.used),
            "reserved": amount(self.reserved),
            "remaining": amount(self.remaining()),
            "window_start": self.window_start.map(crate::time::to_text),
            "resets_at": self.resets_at.map(crate::time::to_text),
        })
    }
}

/// What a reserve call asks for.
#[derive(Debug, Clone)]
pub struct ReserveRequest {
    pub trace_id: String,
    pub started_at: DateTime<Utc>,
    pub limits: Vec<AppliedLimit>,
    pub estimate: Amounts,
}

/// The answer to a reserve call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Held; the states of every limit after admitting this request.
    Admitted(Vec<LimitState>),
    /// A limit with value 0.
    Disabled(AppliedLimit),
    /// A limit would be exceeded.
    Exceeded {
        limit: AppliedLimit,
        retry_after: Option<Duration>,
    },
    /// The trace id is already held (in flight).
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("quota store unavailable: {0}")]
    Unavailable(String),
    #[error("quota store: {0}")]
    Other(String),
    /// A counter missing in the shared store cannot be rebuilt yet (another instance's
    /// journal backlog is not in the ledger and the counters; [`crate::quota::fleet`]):
    /// decide this request with the local counters, the shared store stays in force.
    #[error("quota store: {0}")]
    Deferred(String),
}

/// A backend that counts and holds.
#[async_trait::async_trait]
pub trait QuotaStore: Send + Sync {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, QuotaError>;
    /// Replace the hold of `trace_id` with `actual`. Unknown trace ids (already settled or
    /// released, or held by a dead process) add `actual` at `started_at` only when
    /// `limits` are given — callers recovering journaled work pass them.
    async fn settle(
        &self,
        trace_id: &str,
        actual: Amounts,
        started_at: DateTime<Utc>,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError>;
    async fn release(&self, trace_id: &str) -> Result<(), QuotaError>;
    async fn usage(&self, limits: &[AppliedLimit]) -> Result<Vec<LimitState>, QuotaError>;
    /// Number of open holds.
    fn open_holds(&self) -> usize;
    /// Reachability of the stores behind this one, by name (for `/readyz` and metrics).
    fn health(&self) -> Vec<(&'static str, bool)> {
        Vec::new()
    }
    /// Try to bring a down store back (called periodically by the server).
    async fn recover(&self) {}
    /// A round trip to the store (no counter touched): whether it answers now.
    async fn ping(&self) -> Result<(), QuotaError> {
        Ok(())
    }
    /// The instances enforcing the same limits, as this one last heard (`live`, the
    /// other instances a rebuild of a missing shared counter waits for); `None` when the
    /// counters are not shared.
    fn fleet(&self) -> Option<(usize, Vec<String>)> {
        None
    }
    /// Tell the shared store this instance (this process: `nonce`) is alive, and whether it
    /// is `behind` (has
    /// journaled counter changes the shared counters or the ledger of record lack); learn
    /// every instance it remembers ([`crate::quota::fleet`]). `None`: this store is not
    /// shared (nobody else enforces the same limits).
    async fn heartbeat(
        &self,
        instance: &str,
        nonce: &str,
        behind: bool,
    ) -> Result<Option<crate::quota::fleet::Heartbeat>, QuotaError> {
        let _ = (instance, nonce, behind);
        Ok(None)
    }
    /// Apply a journaled settle to the shared counters only — never to a local fallback —
    /// idempotently per trace id (the applier's replay, [`crate::journal::applier`]).
    async fn replay_settle(
        &self,
        trace_id: &str,
        actual: Amounts,
        started_at: DateTime<Utc>,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        self.settle(trace_id, actual, started_at, limits).await
    }
    /// Apply a journaled release to the shared counters only: drop the hold of `trace_id`,
    /// found through `limits` when this process did not make it.
    async fn replay_release(
        &self,
        trace_id: &str,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        let _ = limits;
        self.release(trace_id).await
    }
    /// Whether the shared counters are the ones in force (false while a fallback is).
    fn shared_up(&self) -> bool {
        true
    }
    /// Keep refreshing the hold `req` made in the shared store before this process stopped
    /// tracking it ([`QuotaStore::forget`]): it is running again under this store.
    fn adopt(&self, req: &ReserveRequest) {
        let _ = req;
    }
    /// Stop keeping `trace_id`'s hold alive: its request is finished elsewhere (the local
    /// fallback), so the hold may expire by its TTL.
    fn forget(&self, trace_id: &str) {
        let _ = trace_id;
    }
    /// Rewrite the counters of `limits` from the ledger (`reconcile --fix`), keeping the
    /// holds of requests in flight.
    async fn rebuild(&self, limits: &[AppliedLimit]) -> Result<(), QuotaError> {
        let _ = limits;
        Err(QuotaError::Other(
            "this quota store cannot rebuild counters".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settle_exceeds_its_hold_when_any_amount_is_larger() {
        let hold = Amounts {
            requests: 1,
            input_tokens: 100,
            output_tokens: 1024,
            cost_micros: 700,
        };
        assert!(!hold.exceeds(&hold));
        let under = Amounts {
            output_tokens: 20,
            cost_micros: 90,
            ..hold
        };
        assert!(!under.exceeds(&hold));
        // More input than estimated, although the total cost is lower.
        let more_input = Amounts {
            input_tokens: 101,
            cost_micros: 90,
            ..under
        };
        assert!(more_input.exceeds(&hold));
        let dearer = Amounts {
            cost_micros: 701,
            ..under
        };
        assert!(dearer.exceeds(&hold));
    }
}
