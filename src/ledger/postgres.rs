//! The ledger of record in shared mode: `billing_transactions` in Postgres — the shipper's
//! idempotent upserts, settled sums for counter rebuilds, listings and exports — and
//! [`PgLedger`] as the [`Ledger`] over them.
//!
//! The pool, its bounds and the migrations are [`crate::pg`]'s, shared with
//! [`crate::keys::postgres`].

use chrono::{DateTime, TimeZone, Utc};
use tokio_postgres::types::ToSql;

use super::{Ledger, LedgerError, Transaction, TxFilter};
use crate::pg::{PgError, PgPool, TS_TEXT};
use crate::quota::Subject;
use crate::quota::limit::Metric;
use crate::quota::store::AppliedLimit;
use crate::quota::window::{Counter, Window};

/// The Postgres ledger over a pool of connections. Cheap to clone.
#[derive(Clone)]
pub struct PgLedger {
    pool: PgPool,
}

impl PgLedger {
    /// A pool for `url`. Connects lazily: creating it never touches the network.
    pub fn new(url: &str) -> Result<PgLedger, PgError> {
        Ok(PgLedger {
            pool: PgPool::new(url)?,
        })
    }

    /// The ledger over an existing pool (shared with the key store).
    pub fn from_pool(pool: PgPool) -> PgLedger {
        PgLedger { pool }
    }

    /// The pool, to run other statements (keys, spend reports) over the same connections.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        self.pool.client().await
    }

    /// Apply every pending migration (see [`PgPool::migrate`]).
    pub async fn migrate(&self) -> Result<Vec<i64>, PgError> {
        self.pool.migrate().await
    }

    /// Upsert ledger rows in one transaction (one statement, whatever the count).
    ///
    /// A row replaces the stored one only when it is newer, so replaying any events in any
    /// order converges on the same ledger:
    /// - same reservation (equal `started_at`): `reserved` → `settled`/`released` only —
    ///   a final row never goes back to reserved;
    /// - a later reservation (greater `started_at`) of the same trace id: only over a row
    ///   that is not `settled` (a released trace id may be reserved again, SPEC §4.7);
    /// - anything older is ignored;
    /// - a `settled` row of one reservation that meets the row of another reservation of
    ///   the same trace id (another `started_at` or `instance_id`), and so did not become
    ///   the stored row, is refused ([`PgError::Rejected`]): two reservations of one trace
    ///   id were both forwarded and settled (an `Idempotency-Key` repeated on a second
    ///   instance before the first settle reached Postgres), so the upstream was paid twice
    ///   and keeping one row would lose a charge without a word. The shipper sets the row
    ///   aside in the journal's quarantine (logged, counted, shown in `/readyz`). A re-ship
    ///   of the stored settle itself changes nothing, as before.
    ///
    /// `rows` must hold at most one row per trace id (Postgres refuses to touch a row twice
    /// in one statement); the shipper keeps the latest event of each trace id.
    pub async fn upsert_rows(&self, rows: &[Transaction]) -> Result<u64, PgError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = upsert_in(&tx, rows).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Upsert `rows` one at a time in one transaction, setting aside each row Postgres
    /// refuses ([`PgError::Rejected`]) under a savepoint instead of failing the batch.
    /// Returns the rows changed and, for each refused row, its index in `rows` and the
    /// error. Any other error fails the whole call (nothing is committed). The slow path
    /// of the shipper, taken only after a batch was refused.
    pub async fn upsert_each(
        &self,
        rows: &[Transaction],
    ) -> Result<(u64, Vec<(usize, String)>), PgError> {
        let mut client = self.client().await?;
        let mut tx = client.transaction().await?;
        let mut changed = 0;
        let mut refused = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let sp = tx.savepoint("row").await?;
            match upsert_in(&sp, std::slice::from_ref(row)).await {
                Ok(n) => {
                    sp.commit().await?;
                    changed += n;
                }
                Err(PgError::Rejected(e)) => {
                    sp.rollback().await?;
                    refused.push((i, e));
                }
                Err(e) => return Err(e),
            }
        }
        tx.commit().await?;
        Ok((changed, refused))
    }

    /// Whether a trace id is reserved or settled in the ledger of record.
    pub async fn is_taken(&self, trace_id: &str) -> Result<bool, PgError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT status FROM billing_transactions WHERE trace_id = $1",
                &[&trace_id],
            )
            .await?;
        Ok(row.is_some_and(|r| {
            let s: String = r.get(0);
            s == "reserved" || s == "settled"
        }))
    }

    /// Settled amounts of `metric` for one subject, scope and window start, excluding
    /// `exclude` trace ids. Rows are `(started_at in µs since the epoch, amount)` per start
    /// time when `per_start`, else one `(None, sum)` row.
    ///
    /// Rows that started before the retention watermark (`meta.retained_before`) are read
    /// from the hourly rollups instead (a retention pass deleted them, or will), in the same
    /// statement and so the same snapshot. An hour's rollup starting before `since` (a
    /// rolling window's first, partial hour) counts at `since`; see
    /// [`crate::ledger::sqlite::load_counter`] for why that stays within the window's accuracy.
    /// Excluded trace ids are journal rows not yet shipped — recent, so after the
    /// watermark.
    pub async fn settled_sums(
        &self,
        subject: &Subject,
        metric: Metric,
        upstream: Option<&str>,
        since: Option<String>,
        exclude: &[String],
        per_start: bool,
    ) -> Result<Vec<(Option<i64>, i64)>, PgError> {
        let (who, id) = match subject {
            Subject::Key(k) => ("key_id", k.as_str()),
            Subject::User(u) => ("user_id", u.as_str()),
            Subject::Tenant(t) => ("tenant_id", t.as_str()),
        };
        let expr = metric_expr(metric);
        let rollup_expr = match metric {
            Metric::Requests => "requests",
            _ => expr,
        };
        let at = if per_start {
            "(extract(epoch FROM at) * 1000000)::bigint"
        } else {
            "NULL::bigint"
        };
        let sql = format!(
            "WITH w AS (SELECT COALESCE((SELECT to_timestamp(value) FROM meta
                                         WHERE name = 'retained_before'), 'epoch') AS w)
             SELECT {at} AS at_us, SUM(amount)::bigint FROM (
               SELECT started_at AS at, {expr} AS amount FROM billing_transactions, w
               WHERE {who} = $1 AND status = 'settled'
                 AND ($2::text IS NULL OR upstream = $2)
                 AND ($3::text IS NULL OR started_at >= ($3::text)::timestamptz)
                 AND started_at >= w.w
                 AND NOT (trace_id = ANY($4::text[]))
               UNION ALL
               SELECT GREATEST(hour, COALESCE(($3::text)::timestamptz, hour)) AS at,
                      {rollup_expr} AS amount
               FROM spend_hourly, w
               WHERE {who} = $1 AND status = 'settled'
                 AND ($2::text IS NULL OR upstream = $2)
                 AND ($3::text IS NULL OR hour > ($3::text)::timestamptz - interval '1 hour')
                 AND hour < w.w
             ) s
             GROUP BY 1"
        );
        let client = self.client().await?;
        let st = client.prepare_cached(&sql).await?;
        let rows = client
            .query(&st, &[&id, &upstream, &since, &exclude])
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let amount: Option<i64> = r.get(1);
                amount.map(|a| (r.get::<_, Option<i64>>(0), a))
            })
            .collect())
    }

    /// Every ledger row, oldest first (for tools and tests).
    pub async fn all_rows(&self) -> Result<Vec<Transaction>, PgError> {
        self.rows_where("TRUE", &[]).await
    }

    /// Insert rows that must not replace anything (adjustment rows), in one transaction: a
    /// trace id already present is left alone. Returns how many were written.
    pub async fn insert_new_rows(&self, rows: &[Transaction]) -> Result<u64, PgError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = write_rows(&tx, rows, INSERT_NEW).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Ledger rows matching `condition` (SQL over `billing_transactions`, with `params`),
    /// oldest first.
    pub async fn rows_where(
        &self,
        condition: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Transaction>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {} FROM billing_transactions WHERE {condition} ORDER BY started_at, trace_id",
            row_select()
        );
        let rows = client.query(&sql, params).await?;
        Ok(rows.iter().map(row_to_tx).collect())
    }

    /// Hand the rows with `since <= started_at < until` (ledger text), oldest first, to
    /// `f`, without holding them all: a cursor is read [`EXPORT_BATCH`] rows at a time,
    /// in one read-only snapshot.
    pub async fn each_row(
        &self,
        since: &str,
        until: &str,
        mut f: impl FnMut(Transaction) -> std::io::Result<()>,
    ) -> Result<u64, PgError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let sql = format!(
            "SELECT {} FROM billing_transactions
             WHERE started_at >= ($1::text)::timestamptz AND started_at < ($2::text)::timestamptz
             ORDER BY started_at, trace_id",
            row_select()
        );
        let st = tx.prepare(&sql).await?;
        let portal = tx.bind(&st, &[&since, &until]).await?;
        let mut n = 0u64;
        loop {
            let rows = tx.query_portal(&portal, EXPORT_BATCH).await?;
            for row in &rows {
                f(row_to_tx(row)).map_err(|e| PgError::Query(format!("writing a row: {e}")))?;
                n += 1;
            }
            if rows.len() < EXPORT_BATCH as usize {
                break;
            }
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Ledger rows newest first (`started_at`, then `trace_id` in byte order, both
    /// descending), as [`crate::ledger::sqlite::list`] reads them from SQLite: of `key_id` if
    /// given, started at or after `since`, strictly before `before` — or at or before it
    /// when `before` ends in DEL (the admin API's cursor form) — at most `limit` (1-1000).
    pub async fn list_rows(&self, f: &TxFilter) -> Result<Vec<Transaction>, PgError> {
        let parse = |what: &str, t: &str| {
            crate::time::from_text(t)
                .map(crate::time::to_text)
                .ok_or_else(|| PgError::Invalid(format!("`{what}` is not a ledger time: {t}")))
        };
        let since = f.since.as_deref().map(|t| parse("since", t)).transpose()?;
        let (before, inclusive) = match f.before.as_deref() {
            None => (None, false),
            Some(b) => match b.strip_suffix('\u{7f}') {
                Some(b) => (Some(parse("before", b)?), true),
                None => (Some(parse("before", b)?), false),
            },
        };
        let limit = f.limit.clamp(1, 1000) as i64;
        let cmp = if inclusive { "<=" } else { "<" };
        let sql = format!(
            "SELECT {} FROM billing_transactions
             WHERE ($1::text IS NULL OR key_id = $1)
               AND ($2::text IS NULL OR started_at >= ($2::text)::timestamptz)
               AND ($3::text IS NULL OR started_at {cmp} ($3::text)::timestamptz)
             ORDER BY started_at DESC, trace_id COLLATE \"C\" DESC LIMIT $4",
            row_select()
        );
        let client = self.client().await?;
        let rows = client
            .query(&sql, &[&f.key_id, &since, &before, &limit])
            .await?;
        Ok(rows.iter().map(row_to_tx).collect())
    }
}
#[async_trait::async_trait]
impl Ledger for PgLedger {
    async fn list(&self, filter: &TxFilter) -> Result<Vec<Transaction>, LedgerError> {
        Ok(self.list_rows(filter).await?)
    }

    async fn get(&self, trace_id: &str) -> Result<Option<Transaction>, LedgerError> {
        let mut rows = self.rows_where("trace_id = $1", &[&trace_id]).await?;
        Ok(rows.pop())
    }

    async fn is_taken(&self, trace_id: &str) -> Result<bool, LedgerError> {
        Ok(PgLedger::is_taken(self, trace_id).await?)
    }

    /// The settled sums of the window, attributed as the embedded ledger attributes its
    /// rows (the read [`crate::journal::loader`] makes of the ledger of record, without its
    /// journal exclusions).
    async fn load_counter(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        let since = match limit.spec.window {
            Window::Total => None,
            _ => counter.window_start(now),
        };
        let rolling = matches!(limit.spec.window, Window::Rolling(_));
        let sums = self
            .settled_sums(
                &limit.subject,
                limit.spec.metric,
                limit.spec.upstream.as_deref(),
                since.map(crate::time::to_text),
                &[],
                rolling,
            )
            .await?;
        for (at, amount) in sums {
            let at = match at {
                Some(us) if rolling => Utc.timestamp_micros(us).single().unwrap_or(now),
                _ => since.unwrap_or(now),
            };
            counter.add(at, amount, now);
        }
        Ok(())
    }
}

fn metric_expr(metric: Metric) -> &'static str {
    match metric {
        // An adjustment row (`tollgate rerate`) changes money, never the request count.
        Metric::Requests => "CASE WHEN adjusts IS NULL THEN 1 ELSE 0 END",
        Metric::InputTokens => "input_tokens",
        Metric::OutputTokens => "output_tokens",
        Metric::Tokens => "input_tokens + output_tokens",
        Metric::Usd => "cost_micros",
    }
}

/// The ledger columns in [`row_to_tx`]'s order, times as ledger text.
/// Rows fetched per round trip by [`PgLedger::each_row`].
pub const EXPORT_BATCH: i32 = 1_000;

fn row_select() -> String {
    format!(
        "trace_id, key_id, user_id, tenant_id, upstream, model, status, input_tokens,
         cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
         reserved_micros, cost_micros, usage_source, stream, http_status::bigint,
         to_char(started_at AT TIME ZONE 'UTC', {TS_TEXT}),
         to_char(settled_at AT TIME ZONE 'UTC', {TS_TEXT}), instance_id,
         cache_write_1h_tokens, tool_calls, service_tier, price_version,
         audio_input_tokens, audio_output_tokens, speed, inference_geo, adjusts"
    )
}

fn row_to_tx(r: &tokio_postgres::Row) -> Transaction {
    Transaction {
        trace_id: r.get(0),
        key_id: r.get(1),
        user_id: r.get(2),
        tenant_id: r.get(3),
        upstream: r.get(4),
        model: r.get(5),
        status: r.get(6),
        input_tokens: r.get(7),
        cached_input_tokens: r.get(8),
        cache_write_tokens: r.get(9),
        output_tokens: r.get(10),
        reasoning_tokens: r.get(11),
        reserved_micros: r.get(12),
        cost_micros: r.get(13),
        usage_source: r.get(14),
        stream: r.get(15),
        http_status: r.get(16),
        started_at: r.get(17),
        settled_at: r.get(18),
        instance_id: r.get(19),
        cache_write_1h_tokens: r.get(20),
        tool_calls: r.get(21),
        service_tier: r.get(22),
        price_version: r.get(23),
        audio_input_tokens: r.get(24),
        audio_output_tokens: r.get(25),
        speed: r.get(26),
        inference_geo: r.get(27),
        adjusts: r.get(28),
    }
}

/// The `INSERT … SELECT … FROM UNNEST(…)` of ledger rows, without its conflict clause.
macro_rules! insert_rows {
    () => {
        "INSERT INTO billing_transactions (trace_id, key_id, user_id, tenant_id, upstream, model, status,
        input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
        reserved_micros, cost_micros, usage_source, stream, http_status, started_at, settled_at, instance_id,
        cache_write_1h_tokens, tool_calls, service_tier, price_version,
        audio_input_tokens, audio_output_tokens, speed, inference_geo, adjusts)
    SELECT t.trace_id, t.key_id, t.user_id, t.tenant_id, t.upstream, t.model, t.status,
        t.input_tokens, t.cached_input_tokens, t.cache_write_tokens, t.output_tokens, t.reasoning_tokens,
        t.reserved_micros, t.cost_micros, t.usage_source, t.stream, t.http_status::integer,
        t.started_at::timestamptz, t.settled_at::timestamptz, t.instance_id,
        t.cache_write_1h_tokens, t.tool_calls, t.service_tier, t.price_version,
        t.audio_input_tokens, t.audio_output_tokens, t.speed, t.inference_geo, t.adjusts
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[],
        $15::text[], $16::bool[], $17::int8[], $18::text[], $19::text[], $20::text[],
        $21::int8[], $22::int8[], $23::text[], $24::text[],
        $25::int8[], $26::int8[], $27::text[], $28::text[], $29::text[])
      AS t(trace_id, key_id, user_id, tenant_id, upstream, model, status,
        input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
        reserved_micros, cost_micros, usage_source, stream, http_status, started_at, settled_at, instance_id,
        cache_write_1h_tokens, tool_calls, service_tier, price_version,
        audio_input_tokens, audio_output_tokens, speed, inference_geo, adjusts)
"
    };
}

const UPSERT: &str = concat!(
    insert_rows!(),
    "ON CONFLICT (trace_id) DO UPDATE SET
        key_id = EXCLUDED.key_id, user_id = EXCLUDED.user_id, tenant_id = EXCLUDED.tenant_id,
        upstream = EXCLUDED.upstream, model = EXCLUDED.model, status = EXCLUDED.status,
        input_tokens = EXCLUDED.input_tokens, cached_input_tokens = EXCLUDED.cached_input_tokens,
        cache_write_tokens = EXCLUDED.cache_write_tokens, output_tokens = EXCLUDED.output_tokens,
        reasoning_tokens = EXCLUDED.reasoning_tokens, reserved_micros = EXCLUDED.reserved_micros,
        cost_micros = EXCLUDED.cost_micros, usage_source = EXCLUDED.usage_source,
        stream = EXCLUDED.stream, http_status = EXCLUDED.http_status,
        started_at = EXCLUDED.started_at, settled_at = EXCLUDED.settled_at,
        instance_id = EXCLUDED.instance_id, cache_write_1h_tokens = EXCLUDED.cache_write_1h_tokens,
        tool_calls = EXCLUDED.tool_calls, service_tier = EXCLUDED.service_tier,
        price_version = EXCLUDED.price_version, audio_input_tokens = EXCLUDED.audio_input_tokens,
        audio_output_tokens = EXCLUDED.audio_output_tokens, speed = EXCLUDED.speed,
        inference_geo = EXCLUDED.inference_geo, adjusts = EXCLUDED.adjusts
    WHERE (EXCLUDED.started_at > billing_transactions.started_at
           AND billing_transactions.status <> 'settled')
       OR (EXCLUDED.started_at = billing_transactions.started_at
           AND billing_transactions.status = 'reserved' AND EXCLUDED.status <> 'reserved')"
);

/// Insert rows, leaving any trace id already present alone (adjustment rows).
const INSERT_NEW: &str = concat!(insert_rows!(), "    ON CONFLICT (trace_id) DO NOTHING");

async fn upsert_in(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &[Transaction],
) -> Result<u64, PgError> {
    let changed = write_rows(tx, rows, UPSERT).await?;
    // Read after the upsert, in the same transaction: a concurrent upsert of the same trace
    // id has committed by now (the upsert waited for its row lock), so of two instances
    // shipping two settles at once, the one whose row did not stay is refused.
    let col = |f: fn(&Transaction) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let trace_id = col(|t| t.trace_id.clone());
    let status = col(|t| t.status.clone());
    let started_at = col(|t| t.started_at.clone());
    let instance_id = col(|t| t.instance_id.clone());
    let check = tx.prepare_cached(SECOND_SETTLE).await?;
    let conflicts = tx
        .query(&check, &[&trace_id, &status, &started_at, &instance_id])
        .await?;
    if let Some(r) = conflicts.first() {
        let trace: String = r.get(0);
        let theirs: String = r.get(1);
        let their_instance: String = r.get(2);
        let ours = rows
            .iter()
            .find(|t| t.trace_id == trace)
            .map(|t| (t.started_at.as_str(), t.instance_id.as_str()))
            .unwrap_or_default();
        return Err(PgError::Rejected(format!(
            "second settle of trace id {trace}: this reservation (started {} on instance {}) was settled, but the ledger holds another reservation of the same trace id (started {theirs} on instance {their_instance}); the upstream was paid for both",
            ours.0, ours.1
        )));
    }
    Ok(changed)
}

/// The incoming `settled` rows (by trace id, status, started_at, instance_id) whose trace id
/// the ledger holds for another reservation: each is a charge the upsert did not keep.
const SECOND_SETTLE: &str = "SELECT b.trace_id, to_char(b.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), b.instance_id
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS t(trace_id, status, started_at, instance_id)
    JOIN billing_transactions b ON b.trace_id = t.trace_id
    WHERE t.status = 'settled'
      AND (b.started_at <> t.started_at::timestamptz OR b.instance_id <> t.instance_id)
    LIMIT 1";

async fn write_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &[Transaction],
    sql: &str,
) -> Result<u64, PgError> {
    let col = |f: fn(&Transaction) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let opt =
        |f: fn(&Transaction) -> Option<String>| rows.iter().map(f).collect::<Vec<Option<String>>>();
    let int = |f: fn(&Transaction) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
    let trace_id = col(|t| t.trace_id.clone());
    let key_id = col(|t| t.key_id.clone());
    let user_id = opt(|t| t.user_id.clone());
    let tenant_id = opt(|t| t.tenant_id.clone());
    let upstream = col(|t| t.upstream.clone());
    let model = col(|t| t.model.clone());
    let status = col(|t| t.status.clone());
    let input = int(|t| t.input_tokens);
    let cached = int(|t| t.cached_input_tokens);
    let cache_write = int(|t| t.cache_write_tokens);
    let output = int(|t| t.output_tokens);
    let reasoning = int(|t| t.reasoning_tokens);
    let reserved = int(|t| t.reserved_micros);
    let cost = int(|t| t.cost_micros);
    let usage_source = opt(|t| t.usage_source.clone());
    let stream: Vec<bool> = rows.iter().map(|t| t.stream).collect();
    let http_status: Vec<Option<i64>> = rows.iter().map(|t| t.http_status).collect();
    let started_at = col(|t| t.started_at.clone());
    let settled_at = opt(|t| t.settled_at.clone());
    let instance_id = col(|t| t.instance_id.clone());
    let cache_write_1h = int(|t| t.cache_write_1h_tokens);
    let tool_calls = int(|t| t.tool_calls);
    let service_tier = opt(|t| t.service_tier.clone());
    let price_version = opt(|t| t.price_version.clone());
    let audio_input = int(|t| t.audio_input_tokens);
    let audio_output = int(|t| t.audio_output_tokens);
    let speed = opt(|t| t.speed.clone());
    let inference_geo = opt(|t| t.inference_geo.clone());
    let adjusts = opt(|t| t.adjusts.clone());
    let st = tx.prepare_cached(sql).await?;
    Ok(tx
        .execute(
            &st,
            &[
                &trace_id,
                &key_id,
                &user_id,
                &tenant_id,
                &upstream,
                &model,
                &status,
                &input,
                &cached,
                &cache_write,
                &output,
                &reasoning,
                &reserved,
                &cost,
                &usage_source,
                &stream,
                &http_status,
                &started_at,
                &settled_at,
                &instance_id,
                &cache_write_1h,
                &tool_calls,
                &service_tier,
                &price_version,
                &audio_input,
                &audio_output,
                &speed,
                &inference_geo,
                &adjusts,
            ],
        )
        .await?)
}
