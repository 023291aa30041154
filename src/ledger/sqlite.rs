//! The embedded ledger: `billing_transactions` in the SQLite database.
//!
//! In embedded mode the ledger is also the journal: a `reserved` row is committed before
//! the request is forwarded, and the settle or release updates that same row (only from
//! `reserved`), so a crash at any point leaves either an open reservation (recovered at
//! start) or a final row. The functions here take a `Connection` and run on the database's
//! writer thread ([`Db::call`]); [`SqliteLedger`] is the [`Ledger`] over them.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{Ledger, LedgerError, Opened, Settlement, Transaction, TxFilter};
use crate::db::{Db, DbError};
use crate::quota::Subject;
use crate::quota::limit::Metric;
use crate::quota::memory::CounterLoader;
use crate::quota::store::{AppliedLimit, QuotaError};
use crate::quota::window::{Counter, Window};

pub(crate) const COLUMNS: &str = "trace_id, key_id, user_id, tenant_id, upstream, model, status, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, reserved_micros, cost_micros, usage_source, stream, http_status, started_at, settled_at, instance_id, cache_write_1h_tokens, tool_calls, service_tier, price_version, audio_input_tokens, audio_output_tokens, speed, inference_geo, adjusts";

pub(crate) fn row_to_tx(r: &rusqlite::Row<'_>) -> rusqlite::Result<Transaction> {
    Ok(Transaction {
        trace_id: r.get(0)?,
        key_id: r.get(1)?,
        user_id: r.get(2)?,
        tenant_id: r.get(3)?,
        upstream: r.get(4)?,
        model: r.get(5)?,
        status: r.get(6)?,
        input_tokens: r.get(7)?,
        cached_input_tokens: r.get(8)?,
        cache_write_tokens: r.get(9)?,
        output_tokens: r.get(10)?,
        reasoning_tokens: r.get(11)?,
        reserved_micros: r.get(12)?,
        cost_micros: r.get(13)?,
        usage_source: r.get(14)?,
        stream: r.get::<_, i64>(15)? != 0,
        http_status: r.get(16)?,
        started_at: r.get(17)?,
        settled_at: r.get(18)?,
        instance_id: r.get(19)?,
        cache_write_1h_tokens: r.get(20)?,
        tool_calls: r.get(21)?,
        service_tier: r.get(22)?,
        price_version: r.get(23)?,
        audio_input_tokens: r.get(24)?,
        audio_output_tokens: r.get(25)?,
        speed: r.get(26)?,
        inference_geo: r.get(27)?,
        adjusts: r.get(28)?,
    })
}

/// Insert a `reserved` row, or reuse a `released` row of the same trace id.
pub fn open_reservation(c: &Connection, t: &Transaction) -> Result<Opened, DbError> {
    // Cached: parsing this statement cost more than running it (every request runs it).
    let n = c.prepare_cached(
        &format!(
            "INSERT INTO billing_transactions ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,'reserved',?7,0,0,?8,0,?9,0,NULL,?10,NULL,?11,NULL,?12,0,0,NULL,NULL,0,0,NULL,NULL,NULL)
             ON CONFLICT(trace_id) DO UPDATE SET
               key_id=excluded.key_id, user_id=excluded.user_id, tenant_id=excluded.tenant_id,
               upstream=excluded.upstream, model=excluded.model, status='reserved',
               input_tokens=excluded.input_tokens, cached_input_tokens=0, cache_write_tokens=0,
               output_tokens=excluded.output_tokens, reasoning_tokens=0,
               reserved_micros=excluded.reserved_micros, cost_micros=0, usage_source=NULL,
               stream=excluded.stream, http_status=NULL, started_at=excluded.started_at,
               settled_at=NULL, instance_id=excluded.instance_id, cache_write_1h_tokens=0,
               tool_calls=0, service_tier=NULL, price_version=NULL, audio_input_tokens=0,
               audio_output_tokens=0, speed=NULL, inference_geo=NULL, adjusts=NULL
             WHERE billing_transactions.status = 'released'"
        ),
    )?
    .execute(params![
            t.trace_id,
            t.key_id,
            t.user_id,
            t.tenant_id,
            t.upstream,
            t.model,
            t.input_tokens,
            t.output_tokens,
            t.reserved_micros,
            t.stream as i64,
            t.started_at,
            t.instance_id
        ])?;
    Ok(if n == 1 {
        Opened::Inserted
    } else {
        Opened::Duplicate
    })
}

/// Whether a trace id is reserved or settled (a repeat would be a duplicate).
pub fn is_taken(c: &Connection, trace_id: &str) -> Result<bool, DbError> {
    let st: Option<String> = c
        .query_row(
            "SELECT status FROM billing_transactions WHERE trace_id = ?1",
            [trace_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(matches!(st.as_deref(), Some("reserved") | Some("settled")))
}

/// Settle a reserved row. Returns false when it was not reserved (already final).
pub fn settle_row(c: &Connection, trace_id: &str, s: &Settlement) -> Result<bool, DbError> {
    let n = c
        .prepare_cached(
            "UPDATE billing_transactions SET status='settled', input_tokens=?2, cached_input_tokens=?3,
           cache_write_tokens=?4, output_tokens=?5, reasoning_tokens=?6, cost_micros=?7,
           usage_source=?8, http_status=?9, settled_at=?10, cache_write_1h_tokens=?11,
           tool_calls=?12, service_tier=?13, price_version=?14, audio_input_tokens=?15,
           audio_output_tokens=?16, speed=?17, inference_geo=?18
         WHERE trace_id=?1 AND status='reserved'",
        )?
        .execute(params![
            trace_id,
            s.input_tokens,
            s.cached_input_tokens,
            s.cache_write_tokens,
            s.output_tokens,
            s.reasoning_tokens,
            s.cost_micros,
            s.usage_source,
            s.http_status,
            crate::time::now_text(),
            s.cache_write_1h_tokens,
            s.tool_calls,
            s.service_tier,
            s.price_version,
            s.audio_input_tokens,
            s.audio_output_tokens,
            s.speed,
            s.inference_geo
        ])?;
    Ok(n == 1)
}

/// Release a reserved row: nothing billed.
pub fn release_row(c: &Connection, trace_id: &str, http_status: i64) -> Result<bool, DbError> {
    let n = c
        .prepare_cached(
            "UPDATE billing_transactions SET status='released', input_tokens=0, cached_input_tokens=0,
           cache_write_tokens=0, output_tokens=0, reasoning_tokens=0, cost_micros=0,
           cache_write_1h_tokens=0, tool_calls=0, service_tier=NULL, price_version=NULL,
           audio_input_tokens=0, audio_output_tokens=0, speed=NULL, inference_geo=NULL,
           http_status=?2, settled_at=?3
         WHERE trace_id=?1 AND status='reserved'",
        )?
        .execute(params![trace_id, http_status, crate::time::now_text()])?;
    Ok(n == 1)
}

/// Rows still `reserved` (left by a process that died), whatever instance id they carry:
/// the embedded ledger belongs to one process at a time.
pub fn open_rows(c: &Connection) -> Result<Vec<Transaction>, DbError> {
    let mut st = c.prepare(&format!(
        "SELECT {COLUMNS} FROM billing_transactions WHERE status='reserved'"
    ))?;
    let rows = st
        .query_map([], row_to_tx)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn get(c: &Connection, trace_id: &str) -> Result<Option<Transaction>, DbError> {
    Ok(c.query_row(
        &format!("SELECT {COLUMNS} FROM billing_transactions WHERE trace_id=?1"),
        [trace_id],
        row_to_tx,
    )
    .optional()?)
}

/// Settled request rows (not adjustments) started in `[since, until)`, optionally of one
/// model, oldest first.
pub fn settled_in(
    c: &Connection,
    since: &str,
    until: Option<&str>,
    model: Option<&str>,
) -> Result<Vec<Transaction>, DbError> {
    let mut st = c.prepare(&format!(
        "SELECT {COLUMNS} FROM billing_transactions
         WHERE status = 'settled' AND adjusts IS NULL AND started_at >= ?1
           AND (?2 IS NULL OR started_at < ?2) AND (?3 IS NULL OR model = ?3)
         ORDER BY started_at, trace_id"
    ))?;
    let rows = st
        .query_map(params![since, until, model], row_to_tx)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Insert a final row as it is (an adjustment row); a trace id already present is left
/// alone. Returns 1 when written, 0 when the trace id existed.
pub fn insert_final(c: &Connection, t: &Transaction) -> Result<usize, DbError> {
    let n = c
        .prepare_cached(&format!(
            "INSERT INTO billing_transactions ({COLUMNS}) VALUES
             (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,?22,?23,?24,?25,?26,?27,?28,?29)
             ON CONFLICT(trace_id) DO NOTHING"
        ))?
        .execute(params![
            t.trace_id,
            t.key_id,
            t.user_id,
            t.tenant_id,
            t.upstream,
            t.model,
            t.status,
            t.input_tokens,
            t.cached_input_tokens,
            t.cache_write_tokens,
            t.output_tokens,
            t.reasoning_tokens,
            t.reserved_micros,
            t.cost_micros,
            t.usage_source,
            t.stream as i64,
            t.http_status,
            t.started_at,
            t.settled_at,
            t.instance_id,
            t.cache_write_1h_tokens,
            t.tool_calls,
            t.service_tier,
            t.price_version,
            t.audio_input_tokens,
            t.audio_output_tokens,
            t.speed,
            t.inference_geo,
            t.adjusts
        ])?;
    Ok(n)
}

pub fn list(c: &Connection, f: &TxFilter) -> Result<Vec<Transaction>, DbError> {
    let mut st = c.prepare(&format!(
        "SELECT {COLUMNS} FROM billing_transactions
         WHERE (?1 IS NULL OR key_id = ?1) AND (?2 IS NULL OR started_at >= ?2) AND (?3 IS NULL OR started_at < ?3)
         ORDER BY started_at DESC, trace_id DESC LIMIT ?4"
    ))?;
    let rows = st
        .query_map(
            params![f.key_id, f.since, f.before, f.limit.clamp(1, 1000) as i64],
            row_to_tx,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn subject_clause(s: &Subject) -> (&'static str, String) {
    match s {
        Subject::Key(k) => ("key_id = ?1", k.clone()),
        Subject::User(u) => ("user_id = ?1", u.clone()),
        Subject::Tenant(t) => ("tenant_id = ?1", t.clone()),
    }
}

/// The retention watermark as ledger text, inside SQL: settled and released rows that
/// started before it were deleted by a retention pass and are counted only in
/// `spend_hourly` (see migrations/sqlite/0004_spend_rollups.sql).
const RETAINED_BEFORE: &str = "COALESCE((SELECT strftime('%Y-%m-%dT%H:%M:%S.000000Z', value, 'unixepoch') \
     FROM meta WHERE name = 'retained_before'), '1970-01-01T00:00:00.000000Z')";

/// Fill `counter` with the settled rows of `limit`'s subject, scope and window: the rows
/// from the retention watermark on, and the hourly rollups before it (one statement, so
/// one snapshot: a retention pass running meanwhile changes neither part).
///
/// Accuracy across the watermark: calendar windows and `total` start on a whole hour
/// (`storage.retention` requires a `[quota].timezone` with whole-hour offsets), so their
/// rollup hours are exact. A rolling window that reaches before the watermark is longer
/// than the retention (at least 3 days): its first, partial hour counts whole, at the
/// window start — at most one hour of usage early, within the 1/60 of its length that a
/// rolling window is exact to.
pub fn load_counter(
    c: &Connection,
    limit: &AppliedLimit,
    counter: &mut Counter,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let (who, id) = subject_clause(&limit.subject);
    let since = match limit.spec.window {
        Window::Total => None,
        _ => counter.window_start(now),
    };
    let since_text = since.map(crate::time::to_text);
    let since_hour = since.map(|s| crate::time::to_text(crate::time::hour_floor(s)));
    let metric = limit.spec.metric;
    let expr = match metric {
        // An adjustment row (`tollgate rerate`) changes money, never the request count.
        Metric::Requests => ("CASE WHEN adjusts IS NULL THEN 1 ELSE 0 END", "requests"),
        Metric::InputTokens => ("input_tokens", "input_tokens"),
        Metric::OutputTokens => ("output_tokens", "output_tokens"),
        Metric::Tokens => (
            "input_tokens + output_tokens",
            "input_tokens + output_tokens",
        ),
        Metric::Usd => ("cost_micros", "cost_micros"),
    };
    let sql = format!(
        "SELECT at, SUM(amount) FROM (
           SELECT started_at AS at, {row} AS amount FROM billing_transactions
           WHERE {who} AND status='settled' AND (?2 IS NULL OR upstream = ?2) AND (?3 IS NULL OR started_at >= ?3)
             AND started_at >= {RETAINED_BEFORE}
           UNION ALL
           SELECT CASE WHEN ?3 IS NULL OR hour >= ?3 THEN hour ELSE ?3 END AS at, {rollup} AS amount
           FROM spend_hourly
           WHERE {who} AND status='settled' AND (?2 IS NULL OR upstream = ?2) AND (?4 IS NULL OR hour >= ?4)
             AND hour < {RETAINED_BEFORE}
         ) GROUP BY {}",
        match limit.spec.window {
            // Rolling windows need amounts per start time (bucketed by the counter).
            Window::Rolling(_) => "at",
            _ => "NULL",
        },
        row = expr.0,
        rollup = expr.1,
    );
    let mut st = c.prepare_cached(&sql)?;
    let mut rows = st.query(params![id, limit.spec.upstream, since_text, since_hour])?;
    while let Some(r) = rows.next()? {
        let at: Option<String> = r.get(0)?;
        let amount: Option<i64> = r.get(1)?;
        let Some(amount) = amount else { continue };
        // Aggregated rows carry an arbitrary start time of the window: attribute them to
        // the window start (or now for total).
        let at = match limit.spec.window {
            Window::Rolling(_) => at
                .as_deref()
                .and_then(crate::time::from_text)
                .unwrap_or(now),
            _ => since.unwrap_or(now),
        };
        counter.add(at, amount, now);
    }
    Ok(())
}

/// The embedded database as a [`Ledger`]. Cheap to clone.
#[derive(Clone)]
pub struct SqliteLedger {
    db: Db,
}

impl SqliteLedger {
    pub fn new(db: Db) -> SqliteLedger {
        SqliteLedger { db }
    }
}

#[async_trait::async_trait]
impl Ledger for SqliteLedger {
    async fn list(&self, filter: &TxFilter) -> Result<Vec<Transaction>, LedgerError> {
        let f = filter.clone();
        Ok(self.db.call(move |c| list(c, &f)).await?)
    }

    async fn get(&self, trace_id: &str) -> Result<Option<Transaction>, LedgerError> {
        let t = trace_id.to_string();
        Ok(self.db.call(move |c| get(c, &t)).await?)
    }

    async fn is_taken(&self, trace_id: &str) -> Result<bool, LedgerError> {
        let t = trace_id.to_string();
        Ok(self.db.call(move |c| is_taken(c, &t)).await?)
    }

    async fn load_counter(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        Ok(load_counter_on(&self.db, limit, counter, now).await?)
    }
}

/// [`load_counter`] on the writer thread: `counter` is replaced only once the load succeeded.
async fn load_counter_on(
    db: &Db,
    limit: &AppliedLimit,
    counter: &mut Counter,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let l = limit.clone();
    let mut c = counter.clone();
    *counter = db
        .call(move |conn| {
            load_counter(conn, &l, &mut c, now)?;
            Ok(c)
        })
        .await?;
    Ok(())
}

/// [`CounterLoader`] over the embedded ledger.
pub struct SqliteLoader {
    pub db: Db,
}

#[async_trait::async_trait]
impl CounterLoader for SqliteLoader {
    async fn load(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), QuotaError> {
        load_counter_on(&self.db, limit, counter, now)
            .await
            .map_err(|e| QuotaError::Unavailable(e.to_string()))
    }
}
