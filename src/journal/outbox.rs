//! The local journal of shared mode, used as an outbox for the Postgres ledger.
//!
//! Every reserve / settle / release appends one row to `journal_events` — the full ledger
//! row as it stands after the event — and updates `journal_traces` (the latest state per
//! trace id), in one job of the SQLite writer thread ([`crate::db`], group commit). The
//! caller gets `Ok` only once that commit is in the WAL, *before* the event is applied to
//! counters or shipped: a SIGKILL at any later point loses nothing, and the next start
//! finds open reservations in `journal_traces` and unshipped events in `journal_events`.
//!
//! The request path never waits on Postgres. The one exception is bounded: a request with
//! an `Idempotency-Key` this instance has never seen asks the Postgres ledger whether
//! another instance reserved or settled it, for at most [`REMOTE_CHECK_TIMEOUT`]. This
//! check fails closed: when Postgres cannot answer (down, unreachable, or slower than the
//! timeout), no store can vouch that another instance has not already forwarded — and
//! been charged for — that key (Redis only knows holds in flight, and only while it is
//! up; this journal only knows this instance), so the request is refused with 503
//! `store_unavailable` rather than forwarded and paid twice. The client retries with the
//! same key once Postgres is back. Requests without an `Idempotency-Key` (a fresh UUIDv7
//! trace id each) are not affected.
//!
//! `journal_traces` keeps final trace ids for `storage.journal_retention` after their
//! last event shipped, which bounds how long a repeated idempotency key is recognised
//! locally.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::Notify;

use crate::db::{Db, DbError};
use crate::journal::{Journal, JournalStatus};
use crate::ledger::postgres::PgLedger;
use crate::ledger::{Opened, Settlement, Transaction};
use crate::quota::memory::CounterLoader;

/// Longest time a request waits for the cross-instance duplicate check.
pub const REMOTE_CHECK_TIMEOUT: Duration = Duration::from_millis(200);

/// Kind of a journal event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Reserve,
    Settle,
    Release,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Reserve => "reserve",
            EventKind::Settle => "settle",
            EventKind::Release => "release",
        }
    }
}

/// One journal event as read back for shipping.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: i64,
    pub trace_id: String,
    pub payload: String,
}

fn to_json(row: &Transaction) -> Result<String, DbError> {
    serde_json::to_string(row).map_err(|e| DbError::Invalid(format!("cannot encode row: {e}")))
}

fn from_json(text: &str) -> Result<Transaction, DbError> {
    serde_json::from_str(text).map_err(|e| DbError::Invalid(format!("corrupt journal row: {e}")))
}

/// Append an event and make `row` the trace id's latest state (one writer job).
pub fn append(c: &Connection, kind: EventKind, row: &Transaction) -> Result<(), DbError> {
    append_seq(c, kind, row, false).map(|_| ())
}

/// [`append`], returning the event's sequence number. A reserve is written applied: the
/// quota check held it before it was journaled. A settle or release is written unapplied
/// when `to_apply` (an applier brings the shared counters up to date from the journal,
/// [`crate::journal::applier`]); without one, counters live in this process only and are
/// rebuilt from the ledger, so there is nothing to replay.
pub fn append_seq(
    c: &Connection,
    kind: EventKind,
    row: &Transaction,
    to_apply: bool,
) -> Result<i64, DbError> {
    let payload = to_json(row)?;
    let now = crate::time::now_text();
    let applied = (kind == EventKind::Reserve || !to_apply).then_some(now.as_str());
    c.prepare_cached(
        "INSERT INTO journal_events (trace_id, kind, payload, created_at, applied_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![row.trace_id, kind.as_str(), payload, now, applied])?;
    let seq = c.last_insert_rowid();
    c.prepare_cached(
        "INSERT INTO journal_traces (trace_id, status, instance_id, row, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(trace_id) DO UPDATE SET status = excluded.status, instance_id = excluded.instance_id,
           row = excluded.row, updated_at = excluded.updated_at",
    )?
    .execute(params![row.trace_id, row.status, row.instance_id, payload, now])?;
    Ok(seq)
}

/// Current row of a trace id, if this instance journaled it (and it is not compacted).
pub fn trace_row(c: &Connection, trace_id: &str) -> Result<Option<Transaction>, DbError> {
    let text: Option<String> = c
        .prepare_cached("SELECT row FROM journal_traces WHERE trace_id = ?1")?
        .query_row([trace_id], |r| r.get(0))
        .optional()?;
    text.as_deref().map(from_json).transpose()
}

/// Journal a reservation, unless the trace id is reserved or settled.
pub fn open_reservation_sync(c: &Connection, row: &Transaction) -> Result<Opened, DbError> {
    if let Some(old) = trace_row(c, &row.trace_id)?
        && old.status != "released"
    {
        return Ok(Opened::Duplicate);
    }
    let mut r = row.clone();
    r.status = "reserved".into();
    append(c, EventKind::Reserve, &r)?;
    Ok(Opened::Inserted)
}

/// Journal the settle of a reserved trace id: the event's sequence number and the row;
/// `None` when it was not reserved.
pub fn settle_sync(
    c: &Connection,
    trace_id: &str,
    s: &Settlement,
    to_apply: bool,
) -> Result<Option<(i64, Transaction)>, DbError> {
    let Some(mut row) = trace_row(c, trace_id)?.filter(|r| r.status == "reserved") else {
        return Ok(None);
    };
    row.status = "settled".into();
    row.input_tokens = s.input_tokens;
    row.cached_input_tokens = s.cached_input_tokens;
    row.cache_write_tokens = s.cache_write_tokens;
    row.output_tokens = s.output_tokens;
    row.reasoning_tokens = s.reasoning_tokens;
    row.cache_write_1h_tokens = s.cache_write_1h_tokens;
    row.tool_calls = s.tool_calls;
    row.service_tier = s.service_tier.clone();
    row.price_version = s.price_version.clone();
    row.audio_input_tokens = s.audio_input_tokens;
    row.audio_output_tokens = s.audio_output_tokens;
    row.speed = s.speed.clone();
    row.inference_geo = s.inference_geo.clone();
    row.cost_micros = s.cost_micros;
    row.usage_source = Some(s.usage_source.to_string());
    row.http_status = s.http_status;
    row.settled_at = Some(crate::time::now_text());
    let seq = append_seq(c, EventKind::Settle, &row, to_apply)?;
    Ok(Some((seq, row)))
}

/// Journal the release of a reserved trace id: the event's sequence number and the row;
/// `None` when it was not reserved.
pub fn release_sync(
    c: &Connection,
    trace_id: &str,
    http_status: i64,
    to_apply: bool,
) -> Result<Option<(i64, Transaction)>, DbError> {
    let Some(mut row) = trace_row(c, trace_id)?.filter(|r| r.status == "reserved") else {
        return Ok(None);
    };
    row.status = "released".into();
    row.input_tokens = 0;
    row.cached_input_tokens = 0;
    row.cache_write_tokens = 0;
    row.output_tokens = 0;
    row.reasoning_tokens = 0;
    row.cache_write_1h_tokens = 0;
    row.tool_calls = 0;
    row.service_tier = None;
    row.price_version = None;
    row.audio_input_tokens = 0;
    row.audio_output_tokens = 0;
    row.speed = None;
    row.inference_geo = None;
    row.cost_micros = 0;
    row.http_status = Some(http_status);
    row.settled_at = Some(crate::time::now_text());
    let seq = append_seq(c, EventKind::Release, &row, to_apply)?;
    Ok(Some((seq, row)))
}

/// Every reservation of this journal still open, whatever instance id it was written
/// under (SPEC §7: a renamed host or a changed port must not orphan one).
pub fn open_rows_sync(c: &Connection) -> Result<Vec<Transaction>, DbError> {
    let mut st = c.prepare_cached("SELECT row FROM journal_traces WHERE status = 'reserved'")?;
    let texts = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    texts.iter().map(|t| from_json(t)).collect()
}

/// (unshipped events, creation time of the oldest).
pub fn backlog_sync(c: &Connection) -> Result<(u64, Option<String>), DbError> {
    Ok(c.prepare_cached(
        "SELECT COUNT(*), MIN(created_at) FROM journal_events WHERE shipped_at IS NULL",
    )?
    .query_row([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?)
}

/// Events not yet applied to the shared counters: (count, sequence number of the oldest).
pub fn unapplied_sync(c: &Connection) -> Result<(u64, Option<i64>), DbError> {
    Ok(
        c.prepare_cached("SELECT COUNT(*), MIN(seq) FROM journal_events WHERE applied_at IS NULL")?
            .query_row([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?,
    )
}

/// Creation times of the oldest event not yet applied to the shared counters and of the
/// oldest not yet shipped (RFC 3339), each `None` when there is none.
pub fn lag_sync(c: &Connection) -> Result<(Option<String>, Option<String>), DbError> {
    Ok(c.prepare_cached(
        "SELECT (SELECT MIN(created_at) FROM journal_events WHERE applied_at IS NULL),
                (SELECT MIN(created_at) FROM journal_events WHERE shipped_at IS NULL)",
    )?
    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

/// How far each target has come: every event up to these sequence numbers has reached it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub applied_through: i64,
    pub shipped_through: i64,
}

/// [`Progress`] as the journal records it now.
pub fn progress_sync(c: &Connection) -> Result<Progress, DbError> {
    Ok(c.prepare_cached(
        "SELECT COALESCE((SELECT MAX(seq) FROM journal_events), 0),
                (SELECT MIN(seq) FROM journal_events WHERE applied_at IS NULL),
                (SELECT MIN(seq) FROM journal_events WHERE shipped_at IS NULL)",
    )?
    .query_row([], |r| {
        let last: i64 = r.get(0)?;
        let before = |v: Option<i64>| v.map_or(last, |s| s - 1);
        Ok(Progress {
            applied_through: before(r.get(1)?),
            shipped_through: before(r.get(2)?),
        })
    })?)
}

/// Up to `limit` events not yet applied to the shared counters, after `after_seq`, oldest
/// first.
pub fn unapplied_after(
    c: &Connection,
    after_seq: i64,
    limit: usize,
) -> Result<Vec<Event>, DbError> {
    let mut st = c.prepare_cached(
        "SELECT seq, trace_id, payload FROM journal_events WHERE applied_at IS NULL AND seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = st
        .query_map(params![after_seq, limit as i64], |r| {
            Ok(Event {
                seq: r.get(0)?,
                trace_id: r.get(1)?,
                payload: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Mark the events `seqs` applied to the shared counters. One statement per call.
pub fn mark_applied(c: &Connection, seqs: &[i64]) -> Result<usize, DbError> {
    if seqs.is_empty() {
        return Ok(0);
    }
    let list = serde_json::to_string(seqs).map_err(|e| DbError::Invalid(e.to_string()))?;
    Ok(c.prepare_cached(
        "UPDATE journal_events SET applied_at = ?2 WHERE applied_at IS NULL AND seq IN (SELECT value FROM json_each(?1))",
    )?
    .execute(params![list, crate::time::now_text()])?)
}

/// A named value kept with the journal (`journal_meta`), if set.
pub fn meta_get(c: &Connection, name: &str) -> Result<Option<String>, DbError> {
    use rusqlite::OptionalExtension;
    Ok(
        c.prepare_cached("SELECT value FROM journal_meta WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?,
    )
}

/// Set a named value kept with the journal.
pub fn meta_set(c: &Connection, name: &str, value: &str) -> Result<(), DbError> {
    c.prepare_cached(
        "INSERT INTO journal_meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
    )?
    .execute([name, value])?;
    Ok(())
}

/// This journal's instance identity: the stored one, else `generated` (stored now, once).
pub fn instance_identity(c: &Connection, generated: &str) -> Result<String, DbError> {
    c.prepare_cached("INSERT INTO journal_meta (name, value) VALUES ('instance_id', ?1) ON CONFLICT(name) DO NOTHING")?
        .execute([generated])?;
    Ok(
        c.prepare_cached("SELECT value FROM journal_meta WHERE name = 'instance_id'")?
            .query_row([], |r| r.get(0))?,
    )
}

/// Latest rows of every trace id that still has unshipped events, or an event the ledger
/// of record refused (quarantined: its charge is in no ledger row, so counters rebuilt
/// from the ledger take it from here).
pub fn pending_rows(c: &Connection) -> Result<Vec<Transaction>, DbError> {
    let mut st = c.prepare_cached(
        "SELECT row FROM journal_traces WHERE trace_id IN
           (SELECT trace_id FROM journal_events WHERE shipped_at IS NULL
            UNION SELECT trace_id FROM journal_quarantine)",
    )?;
    let texts = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    texts.iter().map(|t| from_json(t)).collect()
}

/// Every settled row still in the local trace index.
pub fn settled_rows(c: &Connection) -> Result<Vec<Transaction>, DbError> {
    let mut st = c.prepare_cached("SELECT row FROM journal_traces WHERE status = 'settled'")?;
    let texts = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    texts.iter().map(|t| from_json(t)).collect()
}

/// Up to `limit` events after `after_seq`, oldest first: unshipped ones, or every
/// retained one when `include_shipped` (a forced full replay).
pub fn events_after(
    c: &Connection,
    after_seq: i64,
    limit: usize,
    include_shipped: bool,
) -> Result<Vec<Event>, DbError> {
    let sql = if include_shipped {
        "SELECT seq, trace_id, payload FROM journal_events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
    } else {
        "SELECT seq, trace_id, payload FROM journal_events WHERE shipped_at IS NULL AND seq > ?1 ORDER BY seq LIMIT ?2"
    };
    let mut st = c.prepare_cached(sql)?;
    let rows = st
        .query_map(params![after_seq, limit as i64], |r| {
            Ok(Event {
                seq: r.get(0)?,
                trace_id: r.get(1)?,
                payload: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Mark the events `lo..=hi` shipped (those not already marked).
pub fn mark_shipped(c: &Connection, lo: i64, hi: i64) -> Result<usize, DbError> {
    Ok(c.prepare_cached(
        "UPDATE journal_events SET shipped_at = ?3 WHERE seq BETWEEN ?1 AND ?2 AND shipped_at IS NULL",
    )?
    .execute(params![lo, hi, crate::time::now_text()])?)
}

/// An event the ledger of record refused, with Postgres' error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub seq: i64,
    pub trace_id: String,
    pub payload: String,
    pub error: String,
}

/// Finish a shipped batch `lo..=hi`: set its refused events aside in `journal_quarantine`
/// and mark the whole range shipped, in one writer job (one commit). With `replayed` (a forced replay
/// of shipped events), quarantined events of the range that shipped this time are
/// released from quarantine first. Returns how many events were newly quarantined.
pub fn finish_batch(
    c: &Connection,
    lo: i64,
    hi: i64,
    refused: &[Quarantined],
    replayed: bool,
) -> Result<u64, DbError> {
    if replayed {
        // Every event of the range was read again; those not refused this time shipped
        // (or a later event of their trace id did).
        let kept: Vec<i64> = refused.iter().map(|q| q.seq).collect();
        let kept = serde_json::to_string(&kept).unwrap_or_else(|_| "[]".into());
        c.prepare_cached(
            "DELETE FROM journal_quarantine WHERE seq BETWEEN ?1 AND ?2
               AND seq NOT IN (SELECT value FROM json_each(?3))",
        )?
        .execute(params![lo, hi, kept])?;
    }
    let now = crate::time::now_text();
    let mut added = 0;
    for q in refused {
        added += c
            .prepare_cached(
                "INSERT OR IGNORE INTO journal_quarantine (seq, trace_id, payload, error, quarantined_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![q.seq, q.trace_id, q.payload, q.error, now])? as u64;
    }
    mark_shipped(c, lo, hi)?;
    Ok(added)
}

/// Events currently set aside because the ledger of record refused them.
pub fn quarantine_count(c: &Connection) -> Result<u64, DbError> {
    Ok(c.prepare_cached("SELECT COUNT(*) FROM journal_quarantine")?
        .query_row([], |r| r.get::<_, i64>(0))? as u64)
}

/// Delete events shipped before `cutoff` (and applied to the counters), and final trace
/// ids last touched before it that have nothing left to ship or apply. Returns (events,
/// trace ids) deleted.
pub fn compact(c: &Connection, cutoff: &str) -> Result<(usize, usize), DbError> {
    let events = c.execute(
        "DELETE FROM journal_events WHERE shipped_at IS NOT NULL AND shipped_at < ?1 AND applied_at IS NOT NULL",
        [cutoff],
    )?;
    let traces = c.execute(
        "DELETE FROM journal_traces WHERE status <> 'reserved' AND updated_at < ?1
           AND NOT EXISTS (SELECT 1 FROM journal_events e WHERE e.trace_id = journal_traces.trace_id
             AND (e.shipped_at IS NULL OR e.applied_at IS NULL))",
        [cutoff],
    )?;
    Ok((events, traces))
}

/// A read-only connection to the journal file, used off the writer thread (WAL lets it
/// read while the writer commits) so large reads never delay appends.
#[derive(Clone)]
pub struct Reader {
    conn: Arc<Mutex<Connection>>,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, DbError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| DbError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Reader {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Run `f` on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock()))
            .await
            .map_err(|_| DbError::Closed)?
    }
}

#[derive(Debug, Default)]
struct Backlog {
    events: u64,
    oldest: Option<String>,
    /// The shipper's last attempt reached Postgres.
    pg_up: bool,
    /// Events in `journal_quarantine` now.
    quarantined: u64,
    /// Events not yet applied to the shared counters (`None`: no applier).
    unapplied: Option<u64>,
    /// Per target: every event up to this sequence number has reached it.
    progress: std::collections::BTreeMap<String, i64>,
}

/// The shared-mode [`Journal`]: local SQLite outbox in front of the Postgres ledger.
pub struct Outbox {
    db: Db,
    reader: Reader,
    pg: PgLedger,
    notify: Notify,
    backlog: Mutex<Backlog>,
    /// Events this process set aside (`tollgate_journal_quarantined_total`).
    quarantined_total: std::sync::atomic::AtomicU64,
    /// Settles and releases wait for an applier (shared counters in Redis).
    to_apply: std::sync::atomic::AtomicBool,
}

impl Outbox {
    /// An outbox over an opened (migrated) journal database.
    pub fn new(db: Db, pg: PgLedger) -> Result<Arc<Outbox>, DbError> {
        let reader = Reader::open(db.path())?;
        let (events, oldest) = db.call_blocking(backlog_sync)?;
        let quarantined = db.call_blocking(quarantine_count)?;
        Ok(Arc::new(Outbox {
            db,
            reader,
            pg,
            notify: Notify::new(),
            backlog: Mutex::new(Backlog {
                events,
                oldest,
                pg_up: false,
                quarantined,
                ..Backlog::default()
            }),
            quarantined_total: std::sync::atomic::AtomicU64::new(0),
            to_apply: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// From now on settles and releases are written for an applier to apply (see
    /// [`append_seq`]).
    pub fn expect_applier(&self) {
        self.to_apply
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn to_apply(&self) -> bool {
        self.to_apply.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Record the applier's backlog (events not yet applied to the shared counters) and
    /// the progress of both targets.
    pub fn note_applier(&self, unapplied: u64, p: Progress) {
        let mut b = self.backlog.lock();
        b.unapplied = Some(unapplied);
        b.progress.insert("redis".into(), p.applied_through);
        b.progress.insert("postgres".into(), p.shipped_through);
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    pub fn pg(&self) -> &PgLedger {
        &self.pg
    }

    /// Resolves when an event was appended since the last call (wakes the shipper).
    pub async fn appended(&self) {
        self.notify.notified().await
    }

    fn note_append(&self) {
        {
            let mut b = self.backlog.lock();
            b.events += 1;
            if b.oldest.is_none() {
                b.oldest = Some(crate::time::now_text());
            }
        }
        self.notify.notify_one();
    }

    /// Record what the shipper found: the backlog as counted in the journal, and whether
    /// Postgres answered.
    pub fn note_shipper(&self, events: u64, oldest: Option<String>, pg_up: bool) {
        let mut b = self.backlog.lock();
        b.events = events;
        b.oldest = oldest;
        b.pg_up = pg_up;
    }

    pub fn note_pg(&self, up: bool) {
        self.backlog.lock().pg_up = up;
    }

    /// Record the events in quarantine now, and how many this pass newly set aside.
    pub fn note_quarantine(&self, now_held: u64, added: u64) {
        self.backlog.lock().quarantined = now_held;
        self.quarantined_total
            .fetch_add(added, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn pg_up(&self) -> bool {
        self.backlog.lock().pg_up
    }
}

#[async_trait::async_trait]
impl Journal for Outbox {
    async fn open_reservation(&self, row: Transaction) -> Result<Opened, DbError> {
        let out = self
            .db
            .call(move |c| open_reservation_sync(c, &row))
            .await?;
        if out == Opened::Inserted {
            self.note_append();
        }
        Ok(out)
    }

    async fn settle(&self, trace_id: &str, s: Settlement) -> Result<Option<i64>, DbError> {
        let t = trace_id.to_string();
        let to_apply = self.to_apply();
        let done = self
            .db
            .call_deferred(move |c| settle_sync(c, &t, &s, to_apply))
            .await?
            .map(|(seq, _)| seq);
        if done.is_some() {
            self.note_append();
        }
        Ok(done)
    }

    async fn release(&self, trace_id: &str, http_status: i64) -> Result<Option<i64>, DbError> {
        let t = trace_id.to_string();
        let to_apply = self.to_apply();
        let done = self
            .db
            .call_deferred(move |c| release_sync(c, &t, http_status, to_apply))
            .await?
            .map(|(seq, _)| seq);
        if done.is_some() {
            self.note_append();
        }
        Ok(done)
    }

    async fn is_taken(&self, trace_id: &str) -> Result<bool, DbError> {
        let t = trace_id.to_string();
        let local = self.reader.read(move |c| trace_row(c, &t)).await?;
        if let Some(row) = local {
            return Ok(row.status != "released");
        }
        // Not seen here: only the ledger of record can say whether another instance saw
        // it. Asked even while the shipper last found Postgres down (a refused connection
        // answers at once), so a Postgres that came back serves idempotent requests
        // without waiting for the shipper's back-off.
        let unverifiable = |why: &str| {
            DbError::Unavailable(format!(
                "cannot check the Idempotency-Key against the ledger of record ({why}); nothing was forwarded, retry later"
            ))
        };
        match tokio::time::timeout(REMOTE_CHECK_TIMEOUT, self.pg.is_taken(trace_id)).await {
            Ok(Ok(taken)) => Ok(taken),
            Ok(Err(e)) => {
                tracing::warn!(trace_id, error = %e, "cross-instance duplicate check failed; the request is refused");
                Err(unverifiable("postgres is unavailable"))
            }
            Err(_) => {
                tracing::warn!(
                    trace_id,
                    "cross-instance duplicate check timed out; the request is refused"
                );
                Err(unverifiable("postgres did not answer in time"))
            }
        }
    }

    async fn open_rows(&self) -> Result<Vec<Transaction>, DbError> {
        self.db.call(open_rows_sync).await
    }

    fn status(&self) -> JournalStatus {
        let b = self.backlog.lock();
        let mut s = JournalStatus::default();
        s.backlog.insert("postgres".into(), b.events);
        s.oldest_unshipped_at = if b.events == 0 {
            None
        } else {
            b.oldest.clone()
        };
        s.quarantined = Some(b.quarantined);
        s.quarantined_total = self
            .quarantined_total
            .load(std::sync::atomic::Ordering::Relaxed);
        if let Some(n) = b.unapplied {
            s.backlog.insert("redis".into(), n);
            s.progress = b.progress.clone();
        }
        s
    }

    fn ledger_loader(&self) -> Arc<dyn CounterLoader> {
        Arc::new(crate::journal::loader::SharedLoader::new(
            self.pg.clone(),
            self.reader.clone(),
        ))
    }

    fn reconcile_loader(&self) -> Arc<dyn CounterLoader> {
        Arc::new(
            crate::journal::loader::SharedLoader::new(self.pg.clone(), self.reader.clone())
                .strict(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;

    fn row(id: &str) -> Transaction {
        Transaction {
            trace_id: id.into(),
            key_id: "k_1".into(),
            upstream: "openai".into(),
            model: "gpt-4o-mini".into(),
            status: "reserved".into(),
            input_tokens: 10,
            output_tokens: 100,
            reserved_micros: 500,
            started_at: crate::time::now_text(),
            instance_id: "i1".into(),
            ..Default::default()
        }
    }

    fn settlement() -> Settlement {
        Settlement {
            input_tokens: 10,
            output_tokens: 20,
            cost_micros: 77,
            usage_source: "upstream",
            http_status: Some(200),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn events_append_before_anything_and_traces_follow_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("j.db"), Durability::Normal).unwrap();
        let ob = Outbox::new(
            db.clone(),
            PgLedger::new("postgres://u@127.0.0.1:1/x").unwrap(),
        )
        .unwrap();
        assert_eq!(
            ob.open_reservation(row("a")).await.unwrap(),
            Opened::Inserted
        );
        assert_eq!(
            ob.open_reservation(row("a")).await.unwrap(),
            Opened::Duplicate
        );
        assert!(ob.is_taken("a").await.unwrap());
        assert!(
            matches!(ob.is_taken("zz").await, Err(DbError::Unavailable(_))),
            "an Idempotency-Key no store can vouch for is refused, not forwarded"
        );
        assert_eq!(ob.open_rows().await.unwrap().len(), 1);
        assert!(ob.settle("a", settlement()).await.unwrap().is_some());
        assert!(
            ob.settle("a", settlement()).await.unwrap().is_none(),
            "settle is exactly once"
        );
        assert!(ob.release("a", 500).await.unwrap().is_none());
        // Released ids may be reserved again; settled ones may not.
        ob.open_reservation(row("b")).await.unwrap();
        assert!(ob.release("b", 502).await.unwrap().is_some());
        assert!(!ob.is_taken("b").await.unwrap());
        assert_eq!(
            ob.open_reservation(row("b")).await.unwrap(),
            Opened::Inserted
        );
        assert_eq!(ob.status().backlog["postgres"], 5);
        assert!(ob.status().oldest_unshipped_at.is_some());

        let events = db.call(|c| events_after(c, 0, 100, false)).await.unwrap();
        let kinds: Vec<String> = events
            .iter()
            .map(|e| from_json(&e.payload).unwrap().status)
            .collect();
        assert_eq!(
            kinds,
            ["reserved", "settled", "reserved", "released", "reserved"]
        );
        let settled = from_json(&events[1].payload).unwrap();
        assert_eq!(
            (
                settled.cost_micros,
                settled.reserved_micros,
                settled.usage_source.as_deref()
            ),
            (77, 500, Some("upstream")),
            "the settled row keeps the held estimate"
        );
        assert_eq!(db.call(pending_rows).await.unwrap().len(), 2);

        // Ship the first three, then compact with a cutoff in the future.
        assert_eq!(db.call(|c| mark_shipped(c, 1, 3)).await.unwrap(), 3);
        let (n, oldest) = db.call(backlog_sync).await.unwrap();
        assert_eq!(n, 2);
        assert!(oldest.is_some());
        let future = crate::time::to_text(chrono::Utc::now() + chrono::Duration::hours(1));
        let (ev, tr) = db.call(move |c| compact(c, &future)).await.unwrap();
        assert_eq!(ev, 3);
        assert_eq!(tr, 1, "only `a` is final with nothing left to ship");
        assert!(
            matches!(ob.is_taken("a").await, Err(DbError::Unavailable(_))),
            "forgotten here after retention: only the ledger of record could answer"
        );
    }

    #[test]
    fn events_carry_what_priced_a_row_and_older_events_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            crate::db::open_connection(&dir.path().join("j.db"), Durability::Normal).unwrap();
        crate::db::migrate(&conn).unwrap();
        open_reservation_sync(&conn, &row("a")).unwrap();
        let s = Settlement {
            cache_write_tokens: 1000,
            cache_write_1h_tokens: 700,
            tool_calls: 3,
            service_tier: Some("priority".into()),
            price_version: Some("0123456789abcdef".into()),
            ..settlement()
        };
        settle_sync(&conn, "a", &s, false).unwrap().unwrap();
        let events = events_after(&conn, 0, 10, false).unwrap();
        let settled = from_json(&events[1].payload).unwrap();
        assert_eq!(
            (
                settled.cache_write_1h_tokens,
                settled.tool_calls,
                settled.service_tier.as_deref(),
                settled.price_version.as_deref()
            ),
            (700, 3, Some("priority"), Some("0123456789abcdef"))
        );
        // A release clears them (nothing was priced).
        open_reservation_sync(&conn, &row("b")).unwrap();
        let (_, released) = release_sync(&conn, "b", 500, false).unwrap().unwrap();
        assert_eq!((released.tool_calls, released.price_version), (0, None));
        // An event journaled before these fields existed (an upgrade with a backlog)
        // still reads, with 0 / null.
        let mut old: serde_json::Value = serde_json::from_str(&events[1].payload).unwrap();
        for f in [
            "cache_write_1h_tokens",
            "tool_calls",
            "service_tier",
            "price_version",
        ] {
            old.as_object_mut().unwrap().remove(f);
        }
        let back = from_json(&old.to_string()).unwrap();
        assert_eq!(
            (back.cost_micros, back.tool_calls, back.price_version),
            (77, 0, None)
        );
    }

    #[tokio::test]
    async fn refused_events_are_set_aside_once_and_released_by_a_replay_that_ships_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("j.db"), Durability::Normal).unwrap();
        let ob = Outbox::new(
            db.clone(),
            PgLedger::new("postgres://u@127.0.0.1:1/x").unwrap(),
        )
        .unwrap();
        for id in ["a", "b", "c"] {
            ob.open_reservation(row(id)).await.unwrap();
        }
        let q = |seq: i64, trace: &str| Quarantined {
            seq,
            trace_id: trace.into(),
            payload: "{}".into(),
            error: "22021: invalid byte sequence".into(),
        };
        let refused = vec![q(2, "b")];
        let added = db
            .call(move |c| finish_batch(c, 1, 3, &refused, false))
            .await
            .unwrap();
        assert_eq!(added, 1);
        assert_eq!(
            db.call(backlog_sync).await.unwrap().0,
            0,
            "the range shipped"
        );
        assert_eq!(db.call(quarantine_count).await.unwrap(), 1);
        let pending: Vec<String> = db
            .call(pending_rows)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.trace_id)
            .collect();
        assert_eq!(
            pending,
            ["b"],
            "a refused charge still counts from the journal"
        );
        // Refused again by a replay: not counted again.
        let refused = vec![q(2, "b")];
        let added = db
            .call(move |c| finish_batch(c, 1, 3, &refused, true))
            .await
            .unwrap();
        assert_eq!(added, 0);
        assert_eq!(db.call(quarantine_count).await.unwrap(), 1);
        // A replay after the cause was fixed ships it: released.
        let added = db
            .call(move |c| finish_batch(c, 1, 3, &[], true))
            .await
            .unwrap();
        assert_eq!(added, 0);
        assert_eq!(db.call(quarantine_count).await.unwrap(), 0);
    }
}
