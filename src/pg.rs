//! Postgres, shared mode's store of keys and of the ledger of record: the connection pool,
//! its bounds, errors, and the schema's migrations. [`crate::keys::postgres`] and
//! [`crate::ledger::postgres`] run their statements over one [`PgPool`].
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
use tokio_postgres::NoTls;

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

/// Numbered migrations of the Postgres schema, applied in order by [`PgPool::migrate`].
pub const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../migrations/postgres/0002_price_fields.sql"),
    ),
    (
        3,
        include_str!("../migrations/postgres/0003_spend_rollups.sql"),
    ),
    (4, include_str!("../migrations/postgres/0004_rerate.sql")),
];

/// Advisory lock key held while migrating (ASCII "tollgate" folded into an i64), so that
/// instances starting together apply each migration once.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// Timestamp as ledger text (`2026-11-22T01:02:03.123456Z`), matching [`crate::time::to_text`].
pub(crate) const TS_TEXT: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"#;

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
    /// ([`crate::journal::shipper`]); any other error is retried.
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
/// A pool of connections to one Postgres database. Cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct PgPool {
    pool: Pool,
}

impl PgPool {
    /// A pool for `url`. Connects lazily: creating it never touches the network.
    pub fn new(url: &str) -> Result<PgPool, PgError> {
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
        Ok(PgPool { pool })
    }

    /// A connection from the pool (waits at most [`CONNECT_TIMEOUT`]).
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
            PgPool::new("postgres://u@127.0.0.1:1/db").is_ok(),
            "no connect at creation"
        );
    }
}
