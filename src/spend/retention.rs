//! Retention of the ledger of record (`storage.retention`): settled and released rows
//! older than the window are deleted once the hourly rollups count them.
//!
//! ```text
//! pass(now):  W = start of the UTC hour of (now − retention)
//!   1. meta.retained_before = max(itself, W)            one committed statement
//!   2. repeat: delete ≤ BATCH settled/released rows with started_at < W
//!      (marked as a retention pass: the rollup triggers keep counting them)
//! ```
//!
//! Exactness: the rollups count every settled and released row from the moment it is
//! written (same transaction, SQL triggers — migrations/sqlite/0007_spend_rollups.sql, migrations/postgres/0003_spend_rollups.sql).
//! Readers never mix the two for the same hour: counter loaders
//! ([`crate::ledger::sqlite::load_counter`], [`crate::ledger::postgres::PgLedger::settled_sums`]) take
//! rows from the watermark on and rollups before it, in one statement; reports take whole
//! hours from rollups and only the hours they must cut from rows. Step 1 commits before
//! any row goes, so between batches a loader already ignores the rows about to be deleted.
//! What is lost: rows inside an hour that a report must cut (a `since` or `until` off the
//! hour) once that hour is older than the watermark, and idempotency keys of deleted
//! trace ids (a reused key is a new request once its row is gone).
//!
//! Reserved rows (requests in flight, or holds of a dead instance not yet reaped) are
//! never deleted. Each batch is its own short transaction, so the request path (the
//! embedded writer, the shippers) waits at most one batch. Every instance runs passes
//! (every [`EVERY`]); concurrent passes are harmless (the second finds nothing).

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::Connection;

use crate::db::{Db, DbError};
use crate::ledger::postgres::PgLedger;
use crate::pg::PgError;

/// Rows deleted per transaction.
pub const BATCH: usize = 5_000;
/// How often a running instance runs a pass.
pub const EVERY: Duration = Duration::from_secs(600);

/// What a pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// The watermark after the pass: rows before it are counted from the rollups.
    pub retained_before: DateTime<Utc>,
    pub deleted: u64,
}

/// The watermark a pass at `now` moves to.
pub fn cutoff(now: DateTime<Utc>, keep: Duration) -> DateTime<Utc> {
    let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    super::hour_floor(
        now.checked_sub_signed(keep)
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
    )
}

fn from_secs(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(s, 0).unwrap_or_default()
}

/// Move the embedded ledger's watermark to `w` (never back); answer the watermark.
pub fn advance_sqlite(c: &Connection, w: DateTime<Utc>) -> rusqlite::Result<DateTime<Utc>> {
    c.execute(
        "UPDATE meta SET value = max(value, ?1) WHERE name = 'retained_before'",
        [w.timestamp()],
    )?;
    let v: i64 = c.query_row(
        "SELECT value FROM meta WHERE name = 'retained_before'",
        [],
        |r| r.get(0),
    )?;
    Ok(from_secs(v))
}

/// Delete up to `batch` settled or released rows that started before `w`, leaving the
/// rollups as they are. Must run inside a transaction (the marker row that tells the
/// delete trigger to leave the rollups alone is never committed).
pub fn delete_batch_sqlite(
    c: &Connection,
    w: DateTime<Utc>,
    batch: usize,
) -> rusqlite::Result<usize> {
    c.execute(
        "INSERT OR REPLACE INTO meta (name, value) VALUES ('retention_pass', 1)",
        [],
    )?;
    let n = c.execute(
        "DELETE FROM billing_transactions WHERE trace_id IN (
             SELECT trace_id FROM billing_transactions
             WHERE started_at < ?1 AND status IN ('settled', 'released') LIMIT ?2)",
        rusqlite::params![crate::time::to_text(w), batch as i64],
    )?;
    c.execute("DELETE FROM meta WHERE name = 'retention_pass'", [])?;
    Ok(n)
}

/// One pass over the embedded ledger, through its writer thread.
pub async fn run_embedded(db: &Db, keep: Duration, now: DateTime<Utc>) -> Result<Pass, DbError> {
    let target = cutoff(now, keep);
    let w = db.call(move |c| Ok(advance_sqlite(c, target)?)).await?;
    let mut deleted = 0u64;
    loop {
        let n = db
            .call(move |c| Ok(delete_batch_sqlite(c, w, BATCH)?))
            .await?;
        deleted += n as u64;
        if n < BATCH {
            break;
        }
    }
    Ok(Pass {
        retained_before: w,
        deleted,
    })
}

/// One pass over the Postgres ledger.
pub async fn run_pg(pg: &PgLedger, keep: Duration, now: DateTime<Utc>) -> Result<Pass, PgError> {
    let target = cutoff(now, keep);
    let mut client = pg.client().await?;
    let row = client
        .query_one(
            "UPDATE meta SET value = GREATEST(value, $1) WHERE name = 'retained_before' RETURNING value",
            &[&target.timestamp()],
        )
        .await?;
    let w = from_secs(row.get(0));
    let mut deleted = 0u64;
    loop {
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL tollgate.retention_pass = 'on'")
            .await?;
        // The conditions are checked again on the row being deleted (a released row
        // reused by a new request meanwhile is `reserved` and stays).
        let n = tx
            .execute(
                "DELETE FROM billing_transactions WHERE trace_id IN (
                     SELECT trace_id FROM billing_transactions
                     WHERE started_at < to_timestamp($1) AND status IN ('settled', 'released')
                     LIMIT $2)
                   AND started_at < to_timestamp($1) AND status IN ('settled', 'released')",
                &[&(w.timestamp() as f64), &(BATCH as i64)],
            )
            .await?;
        tx.commit().await?;
        deleted += n;
        if n < BATCH as u64 {
            break;
        }
    }
    Ok(Pass {
        retained_before: w,
        deleted,
    })
}

/// Where a running instance's passes go.
pub enum Target {
    Embedded(Db),
    Postgres(PgLedger),
}

/// Run a pass now and every [`EVERY`], logging what each did.
pub async fn run_loop(target: Target, keep: Duration) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let now = crate::time::now();
        let result = match &target {
            Target::Embedded(db) => run_embedded(db, keep, now).await.map_err(|e| e.to_string()),
            Target::Postgres(pg) => run_pg(pg, keep, now).await.map_err(|e| e.to_string()),
        };
        match result {
            Ok(p) if p.deleted > 0 => tracing::info!(
                deleted = p.deleted,
                retained_before = %crate::time::to_text(p.retained_before),
                "retention pass deleted ledger rows counted in the rollups"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention pass failed; the next one retries"),
        }
    }
}
