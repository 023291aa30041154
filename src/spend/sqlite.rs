//! Spend reports over the embedded ledger (SQLite), on a read-only connection of its own:
//! a report never runs on the writer thread, so reservations and settles do not wait
//! behind it (WAL lets it read while the writer commits).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params_from_iter};
use tokio::sync::Semaphore;

use super::sql::{self, Dialect};
use super::{CONCURRENT_REPORTS, Plan, SpendData, SpendError, SpendStore};

/// [`SpendStore`] over the SQLite ledger at a path.
pub struct SqliteSpend {
    path: PathBuf,
    permits: Semaphore,
}

impl SqliteSpend {
    pub fn new(path: &Path) -> SqliteSpend {
        SqliteSpend {
            path: path.to_path_buf(),
            permits: Semaphore::new(CONCURRENT_REPORTS),
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> SpendError {
    SpendError::Unavailable(e.to_string())
}

/// Run a plan on `c` inside one read transaction, so the rows and the totals come from
/// the same snapshot of the ledger.
pub fn spend_sync(c: &Connection, plan: &Plan) -> Result<SpendData, rusqlite::Error> {
    c.execute_batch("BEGIN")?;
    let out = run(c, plan);
    let _ = c.execute_batch("COMMIT");
    out
}

fn run(c: &Connection, plan: &Plan) -> Result<SpendData, rusqlite::Error> {
    let (groups_sql, params) = sql::groups(Dialect::Sqlite, plan);
    let mut st = c.prepare(&groups_sql)?;
    let rows = st
        .query_map(params_from_iter(params.iter()), |r| {
            sql::row(
                plan,
                |i| r.get::<_, i64>(i),
                |i| r.get::<_, Option<String>>(i),
            )
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let (totals_sql, params) = sql::totals(Dialect::Sqlite, plan);
    let totals = c.query_row(&totals_sql, params_from_iter(params.iter()), |r| {
        let mut v = [0i64; 9];
        for (i, slot) in v.iter_mut().enumerate() {
            *slot = r.get(i)?;
        }
        Ok(v)
    })?;
    Ok(sql::finish(plan, rows, totals))
}

#[async_trait::async_trait]
impl SpendStore for SqliteSpend {
    async fn spend(&self, plan: &Plan) -> Result<SpendData, SpendError> {
        let _permit = self.permits.acquire().await.map_err(unavailable)?;
        let path = self.path.clone();
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || {
            let c = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
            c.busy_timeout(Duration::from_secs(5))
                .map_err(unavailable)?;
            spend_sync(&c, &plan).map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }
}
