//! Postgres in shared mode: the ledger of record, keys and limits, and their migrations.
//!
//! Every call goes through a `deadpool-postgres` pool (a raw `tokio_postgres::Client` never
//! reconnects): a connection broken by a Postgres restart is dropped at its next recycle and
//! a fresh one is opened on demand. Connect and pool waits are bounded by
//! [`CONNECT_TIMEOUT`], so a down Postgres answers [`PgError::Unavailable`] within that
//! time instead of hanging a caller.
//!
//! Nothing on the request path waits on Postgres: only the shipper, the key directory
//! refresh, counter rebuilds, the CLI, and (bounded, see the outbox) cross-instance
//! duplicate checks use it.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

use crate::keys::{self, KeyRecord, NewKey, Snapshot, Subject};
use crate::ledger::Transaction;
use crate::quota::LimitSpec;
use crate::quota::limit::Metric;

/// Longest wait for a new connection or a free pool slot.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest check that a pooled connection still answers before it is reused (an empty
/// query). A connection that does not answer in time — half-open, or stuck behind a
/// statement abandoned at its deadline — is dropped and a fresh one opened.
pub const RECYCLE_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest a key or limit change, or one directory read, may take before it is abandoned
/// as [`PgError::Unavailable`] (its connection is then not reused, see
/// [`RECYCLE_TIMEOUT`]). A write abandoned at this deadline may still have committed.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive: first probe after this much silence, then every
/// [`KEEPALIVE_INTERVAL`], the connection dropped after [`KEEPALIVE_RETRIES`] unanswered
/// ones — so a peer that vanished (network partition, host gone) is noticed in about
/// 25 s instead of the system default of two hours.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_RETRIES: u32 = 3;
/// Data sent and not acknowledged for this long drops the connection (TCP_USER_TIMEOUT).
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);

/// Numbered migrations of the Postgres schema, applied in order by [`PgLedger::migrate`].
pub const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_price_fields.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_spend_rollups.sql"),
    ),
    (4, include_str!("../../migrations/postgres/0004_rerate.sql")),
];

/// Advisory lock key held while migrating (ASCII "tollgate" folded into an i64), so that
/// instances starting together apply each migration once.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// Timestamp as ledger text (`2026-11-22T01:02:03.123456Z`), matching [`crate::time::to_text`].
const TS_TEXT: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"#;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Connection refused, timed out or broken: transient, retry later (HTTP 503).
    #[error("postgres is unavailable: {0}")]
    Unavailable(String),
    /// Postgres answered with an error: permanent for this input.
    #[error("postgres: {0}")]
    Query(String),
    /// Postgres refused the data itself (SQLSTATE class 22, data exception — a NUL byte
    /// in a text value, say — or 23, integrity constraint violation): sending the same
    /// row again can never succeed. The shipper sets such a row aside
    /// ([`crate::shared::shipper`]); any other error is retried.
    #[error("postgres refused the row: {0}")]
    Rejected(String),
    /// The input is invalid (bad limit, unknown key...).
    #[error("{0}")]
    Invalid(String),
    #[error("invalid storage.postgres_url: {0}")]
    Config(String),
}

impl PgError {
    pub fn is_transient(&self) -> bool {
        matches!(self, PgError::Unavailable(_))
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                let text = format!("{code}: {}", db.message());
                if code.starts_with("22") || code.starts_with("23") {
                    PgError::Rejected(text)
                } else {
                    PgError::Query(text)
                }
            }
            None => PgError::Unavailable(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> PgError {
        PgError::Unavailable(e.to_string())
    }
}

impl From<crate::db::DbError> for PgError {
    fn from(e: crate::db::DbError) -> PgError {
        PgError::Invalid(e.to_string())
    }
}

/// Parse a `postgres://` URL (or key=value string), bounding the connect time.
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, PgError> {
    let mut cfg =
        tokio_postgres::Config::from_str(url).map_err(|e| PgError::Config(e.to_string()))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("tollgate");
    }
    // A half-open connection must not hang its caller forever; the URL may set its own.
    cfg.keepalives(true);
    if cfg.get_keepalives_idle() >= Duration::from_secs(7200) {
        cfg.keepalives_idle(KEEPALIVE_IDLE);
    }
    if cfg.get_keepalives_interval().is_none() {
        cfg.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if cfg.get_keepalives_retries().is_none() {
        cfg.keepalives_retries(KEEPALIVE_RETRIES);
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    Ok(cfg)
}

/// `f`, abandoned as [`PgError::Unavailable`] after [`STATEMENT_TIMEOUT`].
pub async fn bounded<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(PgError::Unavailable(format!(
            "{what} did not finish within {}",
            humantime::format_duration(STATEMENT_TIMEOUT)
        ))),
    }
}

/// The shared-mode Postgres: a pool of connections. Cheap to clone.
#[derive(Clone)]
pub struct PgLedger {
    pool: Pool,
}

impl PgLedger {
    /// A pool for `url`. Connects lazily: creating it never touches the network.
    pub fn new(url: &str) -> Result<PgLedger, PgError> {
        let mgr = Manager::from_config(
            pg_config(url)?,
            NoTls,
            ManagerConfig {
                // An empty query on every reuse: a connection whose statement was abandoned
                // at a deadline may be stuck behind it, and must not be handed out again.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(4)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(RECYCLE_TIMEOUT))
            .build()
            .map_err(|e| PgError::Config(e.to_string()))?;
        Ok(PgLedger { pool })
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        Ok(self.pool.get().await?)
    }

    /// Apply every migration newer than the database's version, in one transaction under
    /// an advisory lock. Returns the versions applied.
    pub async fn migrate(&self) -> Result<Vec<i64>, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version bigint PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await?
            .get(0);
        let mut applied = Vec::new();
        for (version, sql) in MIGRATIONS {
            if *version <= current {
                continue;
            }
            tx.batch_execute(sql).await.map_err(|e| {
                PgError::Query(format!("migration {version} failed: {}", PgError::from(e)))
            })?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            applied.push(*version);
        }
        tx.commit().await?;
        Ok(applied)
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
    /// [`crate::ledger::load_counter`] for why that stays within the window's accuracy.
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
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
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
    /// descending), as [`crate::ledger::list`] reads them from SQLite: of `key_id` if
    /// given, started at or after `since`, strictly before `before` — or at or before it
    /// when `before` ends in DEL (the admin API's cursor form) — at most `limit` (1-1000).
    pub async fn list_rows(
        &self,
        f: &crate::ledger::TxFilter,
    ) -> Result<Vec<Transaction>, PgError> {
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

    // ----- keys and limits -----

    /// The change counter instances poll.
    pub async fn config_rev(&self) -> Result<i64, PgError> {
        let client = self.client().await?;
        Ok(client
            .query_one("SELECT value FROM meta WHERE name = 'config_rev'", &[])
            .await?
            .get(0))
    }

    /// Every key (with its hash) and limit, exactly as of the revision it carries: one
    /// read-only repeatable-read transaction, so two snapshots with one revision are the
    /// same directory and a newer revision never comes with older contents.
    pub async fn snapshot(&self) -> Result<Snapshot, PgError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let snap = snapshot_with(&*tx).await?;
        tx.commit().await?;
        Ok(snap)
    }

    pub async fn create_key(&self, new: NewKey) -> Result<(KeyRecord, String), PgError> {
        keys::validate_name("name", &Some(new.name.clone()))?;
        keys::validate_name("user", &new.user)?;
        keys::validate_name("tenant", &new.tenant)?;
        keys::validate_name("plan", &new.plan)?;
        let limits = keys::canonical_limits(&new.limits)?;
        let secret = keys::generate_secret();
        let hash = keys::hash_secret(&secret);
        let rec = KeyRecord {
            id: keys::generate_id(),
            name: new.name,
            user: new.user,
            tenant: new.tenant,
            plan: new.plan,
            limits,
            status: "active".into(),
            created_at: crate::time::now_text(),
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO api_keys (id, key_hash, name, user_id, tenant_id, plan, status, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'active', ($7::text)::timestamptz)",
            &[&rec.id, &hash, &rec.name, &rec.user, &rec.tenant, &rec.plan, &rec.created_at],
        )
        .await?;
        let subject = Subject::Key(rec.id.clone()).as_text();
        for spec in &rec.limits {
            tx.execute(
                "INSERT INTO limits (subject, spec, created_at) VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
                &[&subject, spec],
            )
            .await?;
        }
        bump_rev(&tx).await?;
        tx.commit().await?;
        Ok((rec, secret))
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(&format!("{} ORDER BY created_at, id", key_select()), &[])
            .await?;
        let mut out: Vec<KeyRecord> = rows.iter().map(record_of).collect();
        for k in &mut out {
            k.limits = limits_of(&**client, &Subject::Key(k.id.clone()).as_text()).await?;
        }
        Ok(out)
    }

    pub async fn show_key(&self, id: &str) -> Result<Option<KeyRecord>, PgError> {
        let client = self.client().await?;
        show_with(&**client, id).await
    }

    /// Revoke a key. `None` when no such key exists.
    pub async fn revoke_key(&self, id: &str) -> Result<Option<KeyRecord>, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = tx
            .execute(
                "UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE id = $1 AND status = 'active'",
                &[&id],
            )
            .await?;
        if n > 0 {
            bump_rev(&tx).await?;
        }
        let rec = show_with(&*tx, id).await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// `limits set`: replace the limit with the same metric, window and scope; others stay.
    pub async fn set_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, PgError> {
        let canonical = keys::canonical_limits(specs)?;
        let subject_text = subject.as_text();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Serialise limit edits: the meta row is the one every change touches anyway.
        tx.execute(
            "SELECT value FROM meta WHERE name = 'config_rev' FOR UPDATE",
            &[],
        )
        .await?;
        let existing = limits_of(&*tx, &subject_text).await?;
        for new in &canonical {
            let new_spec = LimitSpec::from_str(new).map_err(|e| PgError::Invalid(e.to_string()))?;
            for old in &existing {
                if same_counter(old, &new_spec) {
                    tx.execute(
                        "DELETE FROM limits WHERE subject = $1 AND spec = $2",
                        &[&subject_text, old],
                    )
                    .await?;
                }
            }
            tx.execute(
                "INSERT INTO limits (subject, spec, created_at) VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
                &[&subject_text, new],
            )
            .await?;
        }
        bump_rev(&tx).await?;
        let now = limits_of(&*tx, &subject_text).await?;
        tx.commit().await?;
        Ok(now)
    }

    /// Replace every limit of `subject` with `specs` in one transaction (the admin API's
    /// `PUT …/limits`): no reader sees the subject half-updated. `None` when `subject` is a
    /// key that does not exist.
    pub async fn replace_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Option<Vec<String>>, PgError> {
        let canonical = keys::canonical_limits(specs)?;
        let subject_text = subject.as_text();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT value FROM meta WHERE name = 'config_rev' FOR UPDATE",
            &[],
        )
        .await?;
        if let Subject::Key(id) = subject
            && tx
                .query_opt("SELECT 1 FROM api_keys WHERE id = $1", &[id])
                .await?
                .is_none()
        {
            return Ok(None);
        }
        tx.execute("DELETE FROM limits WHERE subject = $1", &[&subject_text])
            .await?;
        for spec in &canonical {
            tx.execute(
                "INSERT INTO limits (subject, spec, created_at) VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
                &[&subject_text, spec],
            )
            .await?;
        }
        bump_rev(&tx).await?;
        let now = limits_of(&*tx, &subject_text).await?;
        tx.commit().await?;
        Ok(Some(now))
    }

    /// `limits clear`: remove the named limits (any value), or all when none are named.
    pub async fn clear_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, PgError> {
        let subject_text = subject.as_text();
        let targets = specs
            .iter()
            .map(|s| keys::parse_spec_pattern(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT value FROM meta WHERE name = 'config_rev' FOR UPDATE",
            &[],
        )
        .await?;
        if targets.is_empty() {
            tx.execute("DELETE FROM limits WHERE subject = $1", &[&subject_text])
                .await?;
        } else {
            let existing = limits_of(&*tx, &subject_text).await?;
            for target in &targets {
                for old in &existing {
                    if same_counter(old, target) {
                        tx.execute(
                            "DELETE FROM limits WHERE subject = $1 AND spec = $2",
                            &[&subject_text, old],
                        )
                        .await?;
                    }
                }
            }
        }
        bump_rev(&tx).await?;
        let now = limits_of(&*tx, &subject_text).await?;
        tx.commit().await?;
        Ok(now)
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

fn same_counter(stored: &str, spec: &LimitSpec) -> bool {
    LimitSpec::from_str(stored).is_ok_and(|o| {
        o.metric == spec.metric && o.window == spec.window && o.upstream == spec.upstream
    })
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

/// Move the directory revision forward: one more than before, and never less than the
/// current time in microseconds since the epoch. Instances install a directory only when
/// its revision is not older than the one they hold, so the revision must never go
/// backwards — also not when the database is re-created or restored from a backup whose
/// counter is behind: the first change made there jumps past every revision handed out
/// before (as long as clocks do not step back by more than the time between changes).
async fn bump_rev(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), PgError> {
    tx.execute(
        "UPDATE meta SET value = GREATEST(value + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
         WHERE name = 'config_rev'",
        &[],
    )
    .await?;
    Ok(())
}

fn key_select() -> String {
    format!(
        "SELECT id, name, user_id, tenant_id, plan, status, to_char(created_at AT TIME ZONE 'UTC', {TS_TEXT}), key_hash FROM api_keys"
    )
}

fn record_of(r: &tokio_postgres::Row) -> KeyRecord {
    KeyRecord {
        id: r.get(0),
        name: r.get(1),
        user: r.get(2),
        tenant: r.get(3),
        plan: r.get(4),
        limits: Vec::new(),
        status: r.get(5),
        created_at: r.get(6),
    }
}

async fn limits_of<C: tokio_postgres::GenericClient>(
    c: &C,
    subject: &str,
) -> Result<Vec<String>, PgError> {
    let rows = c
        .query(
            "SELECT spec FROM limits WHERE subject = $1 ORDER BY spec",
            &[&subject],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn show_with<C: tokio_postgres::GenericClient>(
    c: &C,
    id: &str,
) -> Result<Option<KeyRecord>, PgError> {
    let row = c
        .query_opt(&format!("{} WHERE id = $1", key_select()), &[&id])
        .await?;
    match row {
        None => Ok(None),
        Some(r) => {
            let mut k = record_of(&r);
            k.limits = limits_of(c, &Subject::Key(k.id.clone()).as_text()).await?;
            Ok(Some(k))
        }
    }
}

async fn snapshot_with<C: tokio_postgres::GenericClient>(c: &C) -> Result<Snapshot, PgError> {
    let rev: i64 = c
        .query_one("SELECT value FROM meta WHERE name = 'config_rev'", &[])
        .await?
        .get(0);
    let keys = c
        .query(&key_select(), &[])
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(7), record_of(r)))
        .collect();
    let limits = c
        .query("SELECT subject, spec FROM limits", &[])
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    Ok(Snapshot { rev, keys, limits })
}

/// Read the directory over a one-off connection (no pool), for start-up code that runs
/// outside the runtime the pool's connections would live on.
pub async fn fetch_snapshot_once(url: &str) -> Result<Snapshot, PgError> {
    let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, pg_config(url)?.connect(NoTls))
        .await
        .map_err(|_| PgError::Unavailable("connect timed out".into()))??;
    let task = tokio::spawn(conn);
    let read = async {
        client
            .batch_execute("START TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let snap = snapshot_with(&client).await?;
        client.batch_execute("COMMIT").await?;
        Ok::<_, PgError>(snap)
    };
    let snap = tokio::time::timeout(CONNECT_TIMEOUT * 2, read)
        .await
        .map_err(|_| PgError::Unavailable("directory read timed out".into()));
    drop(client);
    let _ = task.await;
    snap?
}

/// A directory snapshot as stored in the local journal (`directory_cache`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub rev: i64,
    pub keys: Vec<StoredKey>,
    pub limits: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub key_hash: String,
    pub id: String,
    pub name: String,
    pub user: Option<String>,
    pub tenant: Option<String>,
    pub plan: Option<String>,
    pub status: String,
    pub created_at: String,
}

impl From<&Snapshot> for StoredSnapshot {
    fn from(s: &Snapshot) -> StoredSnapshot {
        StoredSnapshot {
            rev: s.rev,
            keys: s
                .keys
                .iter()
                .map(|(h, k)| StoredKey {
                    key_hash: h.clone(),
                    id: k.id.clone(),
                    name: k.name.clone(),
                    user: k.user.clone(),
                    tenant: k.tenant.clone(),
                    plan: k.plan.clone(),
                    status: k.status.clone(),
                    created_at: k.created_at.clone(),
                })
                .collect(),
            limits: s.limits.clone(),
        }
    }
}

impl From<StoredSnapshot> for Snapshot {
    fn from(s: StoredSnapshot) -> Snapshot {
        Snapshot {
            rev: s.rev,
            keys: s
                .keys
                .into_iter()
                .map(|k| {
                    (
                        k.key_hash,
                        KeyRecord {
                            id: k.id,
                            name: k.name,
                            user: k.user,
                            tenant: k.tenant,
                            plan: k.plan,
                            limits: Vec::new(),
                            status: k.status,
                            created_at: k.created_at,
                        },
                    )
                })
                .collect(),
            limits: s.limits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bound_connects() {
        let c = pg_config("postgres://tollgate@127.0.0.1:5432/tollgate").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert!(matches!(
            pg_config("postgres://[bad"),
            Err(PgError::Config(_))
        ));
        assert!(
            PgLedger::new("postgres://u@127.0.0.1:1/db").is_ok(),
            "no connect at creation"
        );
    }

    #[test]
    fn stored_snapshots_round_trip() {
        let snap = Snapshot {
            rev: 7,
            keys: vec![(
                "h".into(),
                KeyRecord {
                    id: "k_1".into(),
                    name: "n".into(),
                    user: Some("u".into()),
                    tenant: None,
                    plan: Some("free".into()),
                    limits: vec![],
                    status: "active".into(),
                    created_at: "t".into(),
                },
            )],
            limits: vec![("key:k_1".into(), "requests:total=1".into())],
        };
        let stored = StoredSnapshot::from(&snap);
        let text = serde_json::to_string(&stored).unwrap();
        let back: Snapshot = serde_json::from_str::<StoredSnapshot>(&text)
            .unwrap()
            .into();
        assert_eq!(back.rev, 7);
        assert_eq!(back.keys, snap.keys);
        assert_eq!(back.limits, snap.limits);
    }

    #[test]
    fn limits_match_by_counter_identity() {
        let spec = LimitSpec::from_str("usd:day=5").unwrap();
        assert!(same_counter("usd:day=1", &spec));
        assert!(!same_counter("usd:month=1", &spec));
        assert!(!same_counter("usd:day@openai=1", &spec));
    }
}
