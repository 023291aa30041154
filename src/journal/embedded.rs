//! The embedded ledger as the journal: a `reserved` row, later updated to
//! `settled`/`released` (see [`crate::ledger::sqlite`]).

use std::sync::Arc;

use crate::db::{Db, DbError};
use crate::journal::{Journal, JournalStatus};
use crate::ledger::sqlite::{self as ledger, SqliteLoader};
use crate::ledger::{Opened, Settlement, Transaction};
use crate::quota::memory::CounterLoader;

/// The embedded ledger as the journal: the behaviour of embedded mode.
pub struct EmbeddedJournal {
    db: Db,
}

impl EmbeddedJournal {
    pub fn new(db: Db) -> EmbeddedJournal {
        EmbeddedJournal { db }
    }
}

#[async_trait::async_trait]
impl Journal for EmbeddedJournal {
    async fn open_reservation(&self, row: Transaction) -> Result<Opened, DbError> {
        self.db
            .call(move |c| ledger::open_reservation(c, &row))
            .await
    }

    async fn settle(&self, trace_id: &str, s: Settlement) -> Result<Option<i64>, DbError> {
        let t = trace_id.to_string();
        let done = self
            .db
            .call_deferred(move |c| ledger::settle_row(c, &t, &s))
            .await?;
        Ok(done.then_some(0))
    }

    async fn release(&self, trace_id: &str, http_status: i64) -> Result<Option<i64>, DbError> {
        let t = trace_id.to_string();
        let done = self
            .db
            .call_deferred(move |c| ledger::release_row(c, &t, http_status))
            .await?;
        Ok(done.then_some(0))
    }

    async fn is_taken(&self, trace_id: &str) -> Result<bool, DbError> {
        let t = trace_id.to_string();
        self.db.call(move |c| ledger::is_taken(c, &t)).await
    }

    async fn open_rows(&self) -> Result<Vec<Transaction>, DbError> {
        self.db.call(ledger::open_rows).await
    }

    fn status(&self) -> JournalStatus {
        JournalStatus::default()
    }

    fn ledger_loader(&self) -> Arc<dyn CounterLoader> {
        Arc::new(SqliteLoader {
            db: self.db.clone(),
        })
    }
}
