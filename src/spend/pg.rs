//! Spend reports over the Postgres ledger of record (shared mode), on a pool of their own
//! so a long report never holds a connection the shipper or the counter loaders need.
//! Each report reads one `REPEATABLE READ` snapshot (rows and totals agree) and is cut off
//! after [`STATEMENT_TIMEOUT`].

use tokio::sync::Semaphore;

use super::sql::{self, Dialect};
use super::{CONCURRENT_REPORTS, Plan, SpendData, SpendError, SpendStore};
use crate::ledger::postgres::PgLedger;
use crate::pg::PgError;

/// Longest a report's queries may run.
pub const STATEMENT_TIMEOUT: &str = "30s";

/// [`SpendStore`] over the Postgres ledger.
pub struct PgSpend {
    pg: PgLedger,
    permits: Semaphore,
}

impl PgSpend {
    /// A lazily connecting pool for `url`.
    pub fn new(url: &str) -> Result<PgSpend, PgError> {
        Ok(PgSpend {
            pg: PgLedger::new(url)?,
            permits: Semaphore::new(CONCURRENT_REPORTS),
        })
    }

    async fn run(&self, plan: &Plan) -> Result<SpendData, PgError> {
        let mut client = self.pg.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'"
        ))
        .await?;
        let (groups_sql, params) = sql::groups(Dialect::Postgres, plan);
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let mut rows = Vec::new();
        for r in tx.query(&groups_sql, &refs).await? {
            rows.push(sql::row(
                plan,
                |i| r.try_get::<_, i64>(i),
                |i| r.try_get::<_, Option<String>>(i),
            )?);
        }
        let (totals_sql, params) = sql::totals(Dialect::Postgres, plan);
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let t = tx.query_one(&totals_sql, &refs).await?;
        let mut totals = [0i64; 9];
        for (i, slot) in totals.iter_mut().enumerate() {
            *slot = t.try_get(i)?;
        }
        tx.commit().await?;
        Ok(sql::finish(plan, rows, totals))
    }
}

#[async_trait::async_trait]
impl SpendStore for PgSpend {
    async fn spend(&self, plan: &Plan) -> Result<SpendData, SpendError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| SpendError::Unavailable(e.to_string()))?;
        self.run(plan)
            .await
            .map_err(|e| SpendError::Unavailable(e.to_string()))
    }
}
