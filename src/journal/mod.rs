//! The journal: where the engine writes every reservation, settle and release, and reads
//! the 409 duplicate checks and crash recovery from.
//!
//! Two implementations sit behind one trait with domain verbs:
//!
//! - [`EmbeddedJournal`] (embedded mode): the SQLite ledger *is* the journal — a `reserved`
//!   row, later updated to `settled`/`released` (see [`crate::ledger::sqlite`]).
//! - [`crate::journal::outbox::Outbox`] (shared mode): every event is appended to the local
//!   SQLite `journal_events` outbox first; a shipper moves them to the Postgres ledger of
//!   record.
//!
//! Either way a caller that got `Ok` knows the event is committed to the local WAL (and
//! fsynced with `durability = "full"`), so it survives a SIGKILL of the process.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::config::Config;
use crate::db::{Db, DbError};
use crate::ledger::{Opened, Settlement, Transaction};
use crate::quota::memory::CounterLoader;

pub mod applier;
pub mod embedded;
pub mod loader;
pub mod outbox;
pub mod shipper;

pub use embedded::EmbeddedJournal;

/// Unshipped events per target, as reported by `journal status` and `GET /admin/journal`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalStatus {
    /// Target name (`postgres`, …) → events not yet shipped there. Empty in embedded mode.
    pub backlog: BTreeMap<String, u64>,
    /// Creation time of the oldest unshipped event (RFC 3339).
    pub oldest_unshipped_at: Option<String>,
    /// Events the ledger of record refused, set aside in the journal's quarantine
    /// (`None` in embedded mode, where there is nothing to ship).
    pub quarantined: Option<u64>,
    /// Events this process has set aside since it started
    /// (`tollgate_journal_quarantined_total`; not part of the JSON).
    pub quarantined_total: u64,
    /// Target → every event up to this journal sequence number has reached it (shared
    /// mode with Redis: `redis` applied, `postgres` shipped).
    pub progress: BTreeMap<String, i64>,
}

impl JournalStatus {
    /// The JSON of SPEC §2: `{"backlog": {...}, "oldest_unshipped_at": ..., "quarantined":
    /// N}`, or `{"backlog": {}}` when there is no target (embedded mode).
    pub fn to_json(&self) -> Value {
        if self.backlog.is_empty() {
            return json!({"backlog": {}});
        }
        let mut v =
            json!({"backlog": self.backlog, "oldest_unshipped_at": self.oldest_unshipped_at});
        if let Some(n) = self.quarantined {
            v["quarantined"] = json!(n);
        }
        if !self.progress.is_empty() {
            v["progress"] = json!(self.progress);
        }
        v
    }
}

/// The engine's durable record of reservations and their outcomes.
#[async_trait::async_trait]
pub trait Journal: Send + Sync {
    /// Record a `reserved` row (or reuse a `released` one of the same trace id).
    /// `Duplicate` when the trace id is reserved or settled.
    async fn open_reservation(&self, row: Transaction) -> Result<Opened, DbError>;
    /// Settle a reserved trace id: `Some(seq)`, the journal event's sequence number (0 in
    /// embedded mode, whose ledger keeps no event log); `None` when it was not reserved
    /// (already final).
    async fn settle(&self, trace_id: &str, s: Settlement) -> Result<Option<i64>, DbError>;
    /// Release a reserved trace id (nothing billed); `Some(seq)` as for [`Journal::settle`],
    /// `None` when it was not reserved.
    async fn release(&self, trace_id: &str, http_status: i64) -> Result<Option<i64>, DbError>;
    /// Whether a trace id is reserved or settled (a repeat would be a 409).
    async fn is_taken(&self, trace_id: &str) -> Result<bool, DbError>;
    /// Every reservation this journal holds open (a process died before settling them),
    /// whatever instance id it was written under: one journal belongs to one process at a
    /// time, so at start every open row is a previous run's.
    async fn open_rows(&self) -> Result<Vec<Transaction>, DbError>;
    /// Unshipped events per target.
    fn status(&self) -> JournalStatus;
    /// Loads counters from the ledger as this journal feeds it (settled rows of a window),
    /// for counter rebuilds and `reconcile`.
    fn ledger_loader(&self) -> Arc<dyn CounterLoader>;
    /// The loader `reconcile` compares with: like [`Journal::ledger_loader`], but it
    /// refuses while the ledger of record is unreachable (a partial ledger would report
    /// false differences, and `--fix` would lower counters toward it).
    fn reconcile_loader(&self) -> Arc<dyn CounterLoader> {
        self.ledger_loader()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error(transparent)]
    Postgres(#[from] crate::pg::PgError),
    #[error(transparent)]
    Journal(#[from] crate::db::DbError),
}

/// The outbox over `db` for `config`'s Postgres (no connection is made yet).
pub fn open_outbox(config: &Config, db: Db) -> Result<Arc<outbox::Outbox>, SharedError> {
    let pg = crate::ledger::postgres::PgLedger::new(&config.postgres_url())?;
    Ok(outbox::Outbox::new(db, pg)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_shapes() {
        assert_eq!(JournalStatus::default().to_json(), json!({"backlog": {}}));
        let mut s = JournalStatus::default();
        s.backlog.insert("postgres".into(), 3);
        s.oldest_unshipped_at = Some("2026-01-01T00:00:00.000000Z".into());
        assert_eq!(
            s.to_json(),
            json!({"backlog": {"postgres": 3}, "oldest_unshipped_at": "2026-01-01T00:00:00.000000Z"})
        );
    }
}
