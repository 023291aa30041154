//! The shipper: moves journal events to the Postgres ledger, retries while Postgres is
//! down, and compacts what has shipped.
//!
//! One pass reads unshipped events in `seq` order, [`BATCH`] at a time, keeps the latest
//! event of each trace id in the batch (every event carries the full row, so the latest
//! is the whole truth), upserts the batch in one Postgres transaction, then marks it
//! shipped locally. A crash between the upsert and the mark re-ships the batch at the
//! next pass, which changes nothing: the upsert only moves a row forward (see
//! [`crate::ledger::postgres::PgLedger::upsert_rows`]).
//!
//! A batch Postgres refuses for its data ([`PgError::Rejected`]: a NUL byte in a text
//! value, a number out of range) is shipped again row by row, each under a savepoint: the
//! rows Postgres accepts are committed, each refused one is set aside with its error in
//! the journal's `journal_quarantine` table, counted
//! (`tollgate_journal_quarantined_total`) and shown in `journal status` and `/readyz`,
//! and shipping goes on with the rows behind it — one poison row never stops the ledger
//! of record. Any other error (connection lost, Postgres shutting down) is retried.
//!
//! While Postgres is down, passes are retried with exponential backoff from
//! [`BACKOFF_MIN`] to [`BACKOFF_MAX`]; events wait in the journal, and the request path
//! is untouched. Up/down transitions are logged once each.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::journal::outbox::{self, Outbox};
use crate::ledger::Transaction;
use crate::pg::PgError;

/// Events read and upserted per Postgres transaction.
pub const BATCH: usize = 5000;
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often shipped events older than the retention period are deleted.
pub const COMPACT_EVERY: Duration = Duration::from_secs(60);
/// Longest idle wait between passes (also how stale `journal status` can be).
const IDLE_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error("journal: {0}")]
    Journal(#[from] crate::db::DbError),
}

impl ShipError {
    pub fn is_transient(&self) -> bool {
        match self {
            ShipError::Postgres(e) => e.is_transient(),
            ShipError::Journal(_) => false,
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shipped {
    /// Events read from the journal.
    pub events: u64,
    /// Rows upserted (at most one per trace id per batch).
    pub rows: u64,
}

/// One batch of journal events ready to ship.
struct Batch {
    lo: i64,
    hi: i64,
    count: usize,
    /// The latest event of each trace id: its `seq` and row.
    rows: Vec<(i64, Transaction)>,
}

/// A batch upserted, waiting to be marked shipped.
struct Done {
    lo: i64,
    hi: i64,
    refused: Vec<outbox::Quarantined>,
}

pub struct Shipper {
    outbox: Arc<Outbox>,
    retention: Duration,
    migrated: bool,
}

/// Keep the latest event of each trace id, in first-seen order.
fn latest_per_trace(events: &[outbox::Event]) -> Vec<(i64, Transaction)> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(events.len());
    let mut rows: Vec<Option<&outbox::Event>> = Vec::with_capacity(events.len());
    for e in events {
        match index.get(e.trace_id.as_str()) {
            Some(&i) => rows[i] = Some(e),
            None => {
                index.insert(&e.trace_id, rows.len());
                rows.push(Some(e));
            }
        }
    }
    rows.into_iter()
        .flatten()
        .filter_map(|e| match serde_json::from_str::<Transaction>(&e.payload) {
            Ok(t) => Some((e.seq, t)),
            Err(err) => {
                // Only a damaged file can get here; shipping the rest beats blocking forever.
                tracing::error!(seq = e.seq, trace_id = %e.trace_id, error = %err, "unreadable journal event skipped");
                None
            }
        })
        .collect()
}

impl Shipper {
    pub fn new(outbox: Arc<Outbox>, retention: Duration) -> Shipper {
        Shipper {
            outbox,
            retention,
            migrated: false,
        }
    }

    /// Ship every unshipped event now (or, with `include_shipped`, every retained event
    /// again — idempotent). Returns what was shipped; stops at the first error.
    ///
    /// Three stages overlap: while batch N is upserted into Postgres, batch N+1 is read
    /// (and decoded, on the blocking pool) and batch N-1 is marked shipped. A batch is
    /// marked only after its upsert committed.
    pub async fn ship_all(&mut self, include_shipped: bool) -> Result<Shipped, ShipError> {
        if !self.migrated {
            self.outbox.pg().migrate().await?;
            self.migrated = true;
        }
        let mut done = Shipped::default();
        let mut upserted: Option<Done> = None;
        let mut batch = self.read_batch(0, include_shipped).await?;
        while let Some(b) = batch {
            let (lo, hi, count) = (b.lo, b.hi, b.count);
            let (shipped, marked, next) = tokio::join!(
                self.upsert(&b.rows),
                self.mark(upserted.take(), include_shipped),
                async {
                    if count < BATCH {
                        Ok(None)
                    } else {
                        self.read_batch(hi, include_shipped).await
                    }
                }
            );
            let (rows, refused) = shipped?;
            done.rows += rows;
            marked?;
            done.events += count as u64;
            upserted = Some(Done { lo, hi, refused });
            batch = next?;
        }
        self.mark(upserted, include_shipped).await?;
        self.refresh_status(true).await;
        Ok(done)
    }

    /// Upsert one batch's rows. When Postgres refuses the batch for its data, ship it
    /// again row by row and return the refused rows (with their errors) to set aside.
    async fn upsert(
        &self,
        rows: &[(i64, Transaction)],
    ) -> Result<(u64, Vec<outbox::Quarantined>), ShipError> {
        let plain: Vec<Transaction> = rows.iter().map(|(_, t)| t.clone()).collect();
        match self.outbox.pg().upsert_rows(&plain).await {
            Ok(n) => Ok((n, Vec::new())),
            Err(PgError::Rejected(batch_error)) => {
                tracing::warn!(error = %batch_error, rows = plain.len(), "postgres refused a journal batch; shipping it row by row to set the refused rows aside");
                let (n, refused) = self.outbox.pg().upsert_each(&plain).await?;
                let mut out = Vec::with_capacity(refused.len());
                for (i, error) in refused {
                    let Some((seq, row)) = rows.get(i) else {
                        continue;
                    };
                    tracing::error!(seq, trace_id = %row.trace_id, error = %error, "postgres refused a ledger row; the event is set aside in journal_quarantine and shipping continues");
                    out.push(outbox::Quarantined {
                        seq: *seq,
                        trace_id: row.trace_id.clone(),
                        payload: serde_json::to_string(row).unwrap_or_default(),
                        error,
                    });
                }
                Ok((n, out))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The next batch after `cursor`, decoded to one row per trace id; `None` when empty.
    async fn read_batch(
        &self,
        cursor: i64,
        include_shipped: bool,
    ) -> Result<Option<Batch>, ShipError> {
        Ok(self
            .outbox
            .reader()
            .read(move |c| {
                let events = outbox::events_after(c, cursor, BATCH, include_shipped)?;
                let (Some(first), Some(last)) = (events.first(), events.last()) else {
                    return Ok(None);
                };
                Ok(Some(Batch {
                    lo: first.seq,
                    hi: last.seq,
                    count: events.len(),
                    rows: latest_per_trace(&events),
                }))
            })
            .await?)
    }

    /// Mark an upserted batch shipped, setting its refused events aside.
    async fn mark(&self, done: Option<Done>, replayed: bool) -> Result<(), ShipError> {
        let Some(Done { lo, hi, refused }) = done else {
            return Ok(());
        };
        if refused.is_empty() && !replayed {
            self.outbox
                .db()
                .call(move |c| outbox::mark_shipped(c, lo, hi))
                .await?;
            return Ok(());
        }
        let (added, held) = self
            .outbox
            .db()
            .call(move |c| {
                let added = outbox::finish_batch(c, lo, hi, &refused, replayed)?;
                Ok((added, outbox::quarantine_count(c)?))
            })
            .await?;
        self.outbox.note_quarantine(held, added);
        Ok(())
    }

    async fn refresh_status(&self, pg_up: bool) {
        match self.outbox.reader().read(outbox::backlog_sync).await {
            Ok((n, oldest)) => self.outbox.note_shipper(n, oldest, pg_up),
            Err(e) => {
                tracing::warn!(error = %e, "cannot count the journal backlog");
                self.outbox.note_pg(pg_up);
            }
        }
    }

    /// Delete shipped events (and final trace ids) older than the retention period.
    pub async fn compact(&self) -> Result<(usize, usize), ShipError> {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(self.retention).unwrap_or(chrono::Duration::days(1));
        let cutoff = crate::time::to_text(cutoff);
        Ok(self
            .outbox
            .db()
            .call(move |c| outbox::compact(c, &cutoff))
            .await?)
    }

    /// Ship forever: after every append (woken by the outbox), at least every
    /// [`IDLE_WAIT`], with backoff while Postgres is down.
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut down_since: Option<Instant> = None;
        let mut last_compact: Option<Instant> = None;
        loop {
            match self.ship_all(false).await {
                Ok(s) => {
                    if let Some(t) = down_since.take() {
                        tracing::info!(
                            shipped = s.events,
                            down_for_ms = t.elapsed().as_millis() as u64,
                            "postgres is reachable again; journal backlog shipped"
                        );
                    } else if s.events > 0 {
                        tracing::debug!(events = s.events, rows = s.rows, "journal shipped");
                    }
                    backoff = BACKOFF_MIN;
                    if last_compact.is_none_or(|t| t.elapsed() >= COMPACT_EVERY) {
                        match self.compact().await {
                            Ok((0, 0)) => {}
                            Ok((events, traces)) => {
                                tracing::debug!(events, traces, "journal compacted")
                            }
                            Err(e) => tracing::warn!(error = %e, "journal compaction failed"),
                        }
                        last_compact = Some(Instant::now());
                    }
                    let _ = tokio::time::timeout(IDLE_WAIT, self.outbox.appended()).await;
                }
                Err(e) => {
                    if down_since.is_none() {
                        let transient = e.is_transient();
                        tracing::warn!(
                            error = %e,
                            transient,
                            "cannot ship the journal to postgres; events wait in the journal and ship when it is back"
                        );
                        down_since = Some(Instant::now());
                    }
                    self.refresh_status(false).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, trace: &str, status: &str) -> outbox::Event {
        let t = Transaction {
            trace_id: trace.into(),
            status: status.into(),
            ..Default::default()
        };
        outbox::Event {
            seq,
            trace_id: trace.into(),
            payload: serde_json::to_string(&t).unwrap(),
        }
    }

    #[test]
    fn a_batch_keeps_the_latest_row_of_each_trace() {
        let rows = latest_per_trace(&[
            ev(1, "a", "reserved"),
            ev(2, "b", "reserved"),
            ev(3, "a", "settled"),
            ev(4, "c", "reserved"),
            ev(5, "b", "released"),
            ev(6, "b", "reserved"),
        ]);
        let got: Vec<(i64, &str, &str)> = rows
            .iter()
            .map(|(seq, r)| (*seq, r.trace_id.as_str(), r.status.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (3, "a", "settled"),
                (6, "b", "reserved"),
                (4, "c", "reserved")
            ]
        );
    }
}
