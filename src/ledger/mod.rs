//! The billing ledger (`billing_transactions`, SPEC §7): one [`Ledger`] trait for what
//! both ledgers of record answer — listings, a row by trace id, the 409 check, counter
//! loads — with a backend per mode:
//!
//! | module | owns |
//! |---|---|
//! | this one | [`Ledger`], the row types ([`Transaction`], [`Settlement`], [`TxFilter`]) |
//! | [`sqlite`] | the embedded ledger: the rows the [`crate::journal::EmbeddedJournal`] writes (reserve, settle, release), counter loads, re-rating and export reads |
//! | [`postgres`] | shared mode's ledger of record: the shipper's idempotent upserts, settled sums, listings, exports |
//!
//! The writes differ by mode and stay with their writers: in embedded mode the ledger *is*
//! the journal (a `reserved` row committed before forwarding, then updated to `settled` or
//! `released` — only from `reserved`), written through the single SQLite writer thread
//! ([`crate::db`], which also serves keys, the outbox and alerts); in shared mode the
//! shipper replays journal events as upserts that only move a row forward. Either way a
//! settled row is final: a second settle is refused. `tests/ledger_conformance.rs` runs
//! one suite over both.
//!
//! Counters are rebuilt from the settled rows, never reset.

pub mod postgres;
pub mod sqlite;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::db::DbError;
use crate::pg::PgError;
use crate::quota::store::AppliedLimit;
use crate::quota::window::Counter;

pub use sqlite::SqliteLoader;

/// One ledger row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub trace_id: String,
    pub key_id: String,
    pub user_id: Option<String>,
    pub tenant_id: Option<String>,
    pub upstream: String,
    pub model: String,
    pub status: String,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub reserved_micros: i64,
    pub cost_micros: i64,
    pub usage_source: Option<String>,
    pub stream: bool,
    pub http_status: Option<i64>,
    pub started_at: String,
    pub settled_at: Option<String>,
    pub instance_id: String,
    /// The 1-hour part of `cache_write_tokens` (0 on rows written before it was recorded).
    #[serde(default)]
    pub cache_write_1h_tokens: i64,
    /// Server tool calls billed per call (web searches).
    #[serde(default)]
    pub tool_calls: i64,
    /// The tier the row was priced at; `None` = standard rates.
    #[serde(default)]
    pub service_tier: Option<String>,
    /// Digest of the price entry that priced the row; `None` when no entry did (or unknown:
    /// a row settled before it was recorded).
    #[serde(default)]
    pub price_version: Option<String>,
    /// Audio input tokens (part of `input_tokens`).
    #[serde(default)]
    pub audio_input_tokens: i64,
    /// Audio output tokens (part of `output_tokens`).
    #[serde(default)]
    pub audio_output_tokens: i64,
    /// The Anthropic speed the row was priced at; `None` = standard.
    #[serde(default)]
    pub speed: Option<String>,
    /// The Anthropic inference region the row was priced at; `None` = standard.
    #[serde(default)]
    pub inference_geo: Option<String>,
    /// On an adjustment row written by `tollgate rerate`: the trace id of the row it
    /// re-rates. `None` on a request's own row.
    #[serde(default)]
    pub adjusts: Option<String>,
}

/// Result of trying to open a reservation row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Inserted,
    /// The trace id exists and is reserved or settled.
    Duplicate,
}

/// Final figures of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    /// The long-lifetime part of `cache_write_tokens`.
    pub cache_write_1h_tokens: i64,
    /// Server tool calls billed per call.
    pub tool_calls: i64,
    /// The service tier the request was priced at.
    pub service_tier: Option<String>,
    /// [`crate::billing::price::Price::version`] of the entry that priced it; `None` when no
    /// entry did.
    pub price_version: Option<String>,
    pub audio_input_tokens: i64,
    pub audio_output_tokens: i64,
    /// The speed and region the request was priced at.
    pub speed: Option<String>,
    pub inference_geo: Option<String>,
    pub cost_micros: i64,
    pub usage_source: &'static str,
    /// Status the client got; `None` when unknown (recovered after a crash).
    pub http_status: Option<i64>,
}

/// Filter for listing transactions, newest first.
#[derive(Debug, Clone, Default)]
pub struct TxFilter {
    pub key_id: Option<String>,
    pub since: Option<String>,
    pub before: Option<String>,
    pub limit: usize,
}

/// What both ledgers of record answer, whatever wrote them.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    /// Rows newest first (`started_at`, then `trace_id` in byte order, both descending):
    /// of `key_id` if given, started at or after `since`, strictly before `before` — or at
    /// or before it when `before` ends in DEL (`\u{7f}`, the admin API's cursor form) — at
    /// most `limit` (clamped to 1-1000).
    async fn list(&self, filter: &TxFilter) -> Result<Vec<Transaction>, LedgerError>;
    /// The row of one trace id.
    async fn get(&self, trace_id: &str) -> Result<Option<Transaction>, LedgerError>;
    /// Whether a trace id is reserved or settled (a repeat would be a duplicate).
    async fn is_taken(&self, trace_id: &str) -> Result<bool, LedgerError>;
    /// Add the settled rows of `limit`'s subject, upstream scope and window (as of `now`)
    /// to `counter`: rolling windows by start time, the others at the window start (or now
    /// for `total`). Rows a retention pass deleted count from the hourly rollups.
    async fn load_counter(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError>;
}

/// Why a ledger read failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The request itself is wrong (a filter that is not a ledger time) — HTTP 400.
    #[error("{0}")]
    Invalid(String),
    /// The ledger could not answer (database thread gone, Postgres down) — HTTP 503.
    #[error("{0}")]
    Unavailable(String),
}

impl From<DbError> for LedgerError {
    fn from(e: DbError) -> LedgerError {
        match e {
            DbError::Invalid(m) => LedgerError::Invalid(m),
            other => LedgerError::Unavailable(other.to_string()),
        }
    }
}

impl From<PgError> for LedgerError {
    fn from(e: PgError) -> LedgerError {
        match e {
            PgError::Invalid(m) => LedgerError::Invalid(m),
            other => LedgerError::Unavailable(other.to_string()),
        }
    }
}
