//! The quota store of shared mode, assembled: Redis counters behind the
//! `on_unavailable` policy.
//!
//! pingora runs each service on its own tokio runtime, and a Redis connection belongs to
//! the runtime that opened it, so [`LazyRedis`] opens the connection on first use — from
//! the proxy's runtime, where requests run — instead of at start-up. A Redis that is down at
//! start-up is then simply "unavailable" for the first requests, which the
//! [`FallbackStore`](crate::quota::fallback::FallbackStore) handles like any outage.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::OnceCell;

use crate::quota::memory::CounterLoader;
use crate::quota::redis::{RedisOptions, RedisStore, SubjectRoots, spawn_hold_refresher};
use crate::quota::store::{
    Amounts, AppliedLimit, LimitState, QuotaError, QuotaStore, ReserveOutcome, ReserveRequest,
};

/// A [`RedisStore`] connected on first use.
pub struct LazyRedis {
    url: String,
    opts: RedisOptions,
    loader: Option<Arc<dyn CounterLoader>>,
    roots: Arc<dyn SubjectRoots>,
    cell: OnceCell<Arc<RedisStore>>,
}

impl LazyRedis {
    pub fn new(
        url: String,
        opts: RedisOptions,
        loader: Option<Arc<dyn CounterLoader>>,
        roots: Arc<dyn SubjectRoots>,
    ) -> LazyRedis {
        LazyRedis {
            url,
            opts,
            loader,
            roots,
            cell: OnceCell::new(),
        }
    }

    async fn store(&self) -> Result<&Arc<RedisStore>, QuotaError> {
        self.cell
            .get_or_try_init(|| async {
                let s = RedisStore::connect(&self.url, self.opts.clone(), self.loader.clone())
                    .await?
                    .with_subject_roots(self.roots.clone());
                let s = Arc::new(s);
                // Keep this instance's holds alive while their requests run.
                spawn_hold_refresher(&s);
                Ok::<_, QuotaError>(s)
            })
            .await
    }
}

#[async_trait::async_trait]
impl QuotaStore for LazyRedis {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, QuotaError> {
        self.store().await?.reserve(req).await
    }

    async fn settle(
        &self,
        trace_id: &str,
        actual: Amounts,
        started_at: DateTime<Utc>,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        self.store()
            .await?
            .settle(trace_id, actual, started_at, limits)
            .await
    }

    async fn release(&self, trace_id: &str) -> Result<(), QuotaError> {
        self.store().await?.release(trace_id).await
    }

    async fn replay_release(
        &self,
        trace_id: &str,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        self.store().await?.replay_release(trace_id, limits).await
    }

    async fn ping(&self) -> Result<(), QuotaError> {
        self.store().await?.ping().await
    }

    async fn heartbeat(
        &self,
        instance: &str,
        nonce: &str,
        behind: bool,
    ) -> Result<Option<crate::quota::fleet::Heartbeat>, QuotaError> {
        self.store().await?.heartbeat(instance, nonce, behind).await
    }

    async fn usage(&self, limits: &[AppliedLimit]) -> Result<Vec<LimitState>, QuotaError> {
        self.store().await?.usage(limits).await
    }

    fn open_holds(&self) -> usize {
        self.cell.get().map_or(0, |s| s.open_holds())
    }

    async fn rebuild(&self, limits: &[AppliedLimit]) -> Result<(), QuotaError> {
        self.store().await?.rebuild(limits).await
    }

    fn forget(&self, trace_id: &str) {
        if let Some(s) = self.cell.get() {
            s.forget(trace_id);
        }
    }

    fn adopt(&self, req: &ReserveRequest) {
        if let Some(s) = self.cell.get() {
            s.adopt(req);
        }
    }
}
