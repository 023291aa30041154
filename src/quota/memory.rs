//! The in-process quota store (embedded mode, and the local fallback of shared mode).
//!
//! One mutex guards every counter and hold, so a reserve over many limits is a single
//! critical section: all pass and are held, or nothing is. The section does no I/O and
//! no allocation beyond the hold it records, so it stays short under contention.
//!
//! Counters are a cache over the ledger: a counter seen for the first time is loaded by a
//! [`CounterLoader`] (the ledger's settled rows of its window) before the critical
//! section. A settle that lands while a load is in progress would be missed by it, so a
//! load is retried when the settle sequence moved meanwhile (bounded: after
//! [`LOAD_ATTEMPTS`] the last load is used and the miss is at most the settles that raced
//! it).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use parking_lot::Mutex;

use crate::quota::store::{
    Amounts, AppliedLimit, LimitState, QuotaError, QuotaStore, ReserveOutcome, ReserveRequest,
};
use crate::quota::window::Counter;

pub const LOAD_ATTEMPTS: usize = 3;

/// Fills a fresh counter from durable history.
#[async_trait::async_trait]
pub trait CounterLoader: Send + Sync {
    async fn load(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), QuotaError>;
}

struct Entry {
    counter: Counter,
    reserved: i64,
    /// Usage when the counter was loaded, and the window it was in: the share of the
    /// remaining allowance ([`MemoryStore::set_share`]) is taken from what remained then.
    base: i64,
    base_window: Option<DateTime<Utc>>,
}

impl Entry {
    fn new(counter: Counter, now: DateTime<Utc>) -> Entry {
        Entry {
            base: counter.used(now),
            base_window: counter.window_start(now),
            counter,
            reserved: 0,
        }
    }

    /// The cap this store enforces for `value` when it holds one of `share` equal shares
    /// of what remained at load: `base + (value - base) / share`. A new window since the
    /// load starts from nothing used.
    fn cap(&self, value: i64, share: usize, now: DateTime<Utc>) -> i64 {
        if share <= 1 {
            return value;
        }
        let base = if self.counter.window_start(now) == self.base_window {
            self.base.clamp(0, value.max(0))
        } else {
            0
        };
        base + (value - base).max(0) / share as i64
    }
}

struct Hold {
    /// (counter key, limit, amount held)
    items: Vec<(String, AppliedLimit, i64)>,
}

#[derive(Default)]
struct Inner {
    counters: HashMap<String, Entry>,
    holds: HashMap<String, Hold>,
    settle_seq: u64,
}

pub struct MemoryStore {
    tz: Tz,
    inner: Mutex<Inner>,
    loader: Option<Arc<dyn CounterLoader>>,
    /// Of how many equal shares of each limit's remaining allowance this store enforces
    /// one (1: the whole limit).
    share: std::sync::atomic::AtomicUsize,
}

impl MemoryStore {
    pub fn new(tz: Tz, loader: Option<Arc<dyn CounterLoader>>) -> MemoryStore {
        MemoryStore {
            tz,
            inner: Mutex::new(Inner::default()),
            loader,
            share: std::sync::atomic::AtomicUsize::new(1),
        }
    }

    /// Enforce one of `n` equal shares of what remains of each limit (as of each
    /// counter's load): the local fallback of `n` instances enforcing the same limits
    /// ([`crate::quota::fleet`]). 1 (the default) enforces whole limits.
    pub fn set_share(&self, n: usize) {
        self.share
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Forget the counters of `limits` that hold nothing: they are reloaded at next use.
    pub fn drop_idle(&self, limits: &[AppliedLimit]) {
        let mut inner = self.inner.lock();
        for l in limits {
            let key = l.counter_key();
            if inner.counters.get(&key).is_some_and(|e| e.reserved == 0) {
                inner.counters.remove(&key);
            }
        }
    }

    /// Hold `req` without checking any cap: a request another store admitted, carried
    /// over into this one. A trace id already held is left as it is.
    pub async fn hold(&self, req: &ReserveRequest) -> Result<(), QuotaError> {
        self.reserve_checked(req, false).await.map(|_| ())
    }

    /// Make sure every limit has a counter, loading missing ones outside the lock.
    async fn ensure(&self, limits: &[AppliedLimit], now: DateTime<Utc>) -> Result<(), QuotaError> {
        for _ in 0..LOAD_ATTEMPTS {
            let (missing, seq) = {
                let inner = self.inner.lock();
                let missing: Vec<&AppliedLimit> = limits
                    .iter()
                    .filter(|l| !inner.counters.contains_key(&l.counter_key()))
                    .collect();
                (missing, inner.settle_seq)
            };
            if missing.is_empty() {
                return Ok(());
            }
            let mut loaded = Vec::with_capacity(missing.len());
            for l in missing {
                let mut c = Counter::new(l.spec.window, self.tz);
                if let Some(loader) = &self.loader {
                    loader.load(l, &mut c, now).await?;
                }
                loaded.push((l.counter_key(), c));
            }
            let mut inner = self.inner.lock();
            if inner.settle_seq == seq || self.loader.is_none() {
                for (k, c) in loaded {
                    inner
                        .counters
                        .entry(k)
                        .or_insert_with(|| Entry::new(c, now));
                }
                return Ok(());
            }
        }
        // Settles kept racing the load: take one more load as final.
        let mut fresh = Vec::new();
        for l in limits {
            let mut c = Counter::new(l.spec.window, self.tz);
            if let Some(loader) = &self.loader {
                loader.load(l, &mut c, now).await?;
            }
            fresh.push((l.counter_key(), c));
        }
        let mut inner = self.inner.lock();
        for (k, c) in fresh {
            inner
                .counters
                .entry(k)
                .or_insert_with(|| Entry::new(c, now));
        }
        Ok(())
    }

    /// Forget every counter and hold (the local fallback, once the shared store is
    /// authoritative again).
    pub fn clear(&self) {
        let mut inner = self.inner.lock();
        inner.counters.clear();
        inner.holds.clear();
        inner.settle_seq += 1;
    }
}

fn state_of(l: &AppliedLimit, e: &Entry, now: DateTime<Utc>) -> LimitState {
    LimitState {
        limit: l.clone(),
        used: e.counter.used(now),
        reserved: e.reserved,
        window_start: e.counter.window_start(now),
        resets_at: e.counter.resets_at(now),
    }
}

impl MemoryStore {
    async fn reserve_checked(
        &self,
        req: &ReserveRequest,
        check: bool,
    ) -> Result<ReserveOutcome, QuotaError> {
        let now = Utc::now();
        let share = self.share.load(std::sync::atomic::Ordering::Relaxed);
        // Disabled limits refuse without touching any counter.
        if let Some(l) = req.limits.iter().find(|l| check && l.spec.is_disabled()) {
            if self.inner.lock().holds.contains_key(&req.trace_id) {
                return Ok(ReserveOutcome::Duplicate);
            }
            return Ok(ReserveOutcome::Disabled(l.clone()));
        }
        self.ensure(&req.limits, now).await?;
        let mut inner = self.inner.lock();
        if inner.holds.contains_key(&req.trace_id) {
            return Ok(ReserveOutcome::Duplicate);
        }
        // Two limits may share a counter (same subject, metric, window, scope): hold once,
        // but check against each cap.
        let mut keys: Vec<String> = Vec::with_capacity(req.limits.len());
        for l in &req.limits {
            let key = l.counter_key();
            let amount = req.estimate.for_spec(&l.spec);
            let Some(e) = inner.counters.get(&key) else {
                return Err(QuotaError::Other(format!(
                    "counter {key} missing after load"
                )));
            };
            let used = e.counter.used(now);
            let have = used.saturating_add(e.reserved);
            let cap = e.cap(l.spec.value, share, now);
            if check && have.saturating_add(amount) > cap {
                let retry_after = e.counter.retry_after(now, have, amount, cap);
                return Ok(ReserveOutcome::Exceeded {
                    limit: l.clone(),
                    retry_after,
                });
            }
            keys.push(key);
        }
        let mut items = Vec::with_capacity(req.limits.len());
        for (l, key) in req.limits.iter().zip(keys) {
            if items
                .iter()
                .any(|(k, _, _): &(String, AppliedLimit, i64)| *k == key)
            {
                continue;
            }
            let amount = req.estimate.for_spec(&l.spec);
            if let Some(e) = inner.counters.get_mut(&key) {
                e.reserved = e.reserved.saturating_add(amount);
            }
            items.push((key, l.clone(), amount));
        }
        let states = req
            .limits
            .iter()
            .filter_map(|l| {
                inner
                    .counters
                    .get(&l.counter_key())
                    .map(|e| state_of(l, e, now))
            })
            .collect();
        inner.holds.insert(req.trace_id.clone(), Hold { items });
        Ok(ReserveOutcome::Admitted(states))
    }
}

#[async_trait::async_trait]
impl QuotaStore for MemoryStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, QuotaError> {
        self.reserve_checked(req, true).await
    }

    async fn settle(
        &self,
        trace_id: &str,
        actual: Amounts,
        started_at: DateTime<Utc>,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        let now = Utc::now();
        let mut inner = self.inner.lock();
        inner.settle_seq += 1;
        if let Some(hold) = inner.holds.remove(trace_id) {
            for (key, l, held) in hold.items {
                if let Some(e) = inner.counters.get_mut(&key) {
                    e.reserved = (e.reserved - held).max(0);
                    e.counter.add(started_at, actual.for_spec(&l.spec), now);
                }
            }
            return Ok(());
        }
        let mut seen = Vec::new();
        for l in limits {
            let key = l.counter_key();
            if seen.contains(&key) {
                continue;
            }
            if let Some(e) = inner.counters.get_mut(&key) {
                e.counter.add(started_at, actual.for_spec(&l.spec), now);
            }
            seen.push(key);
        }
        Ok(())
    }

    async fn release(&self, trace_id: &str) -> Result<(), QuotaError> {
        let mut inner = self.inner.lock();
        if let Some(hold) = inner.holds.remove(trace_id) {
            for (key, _, held) in hold.items {
                if let Some(e) = inner.counters.get_mut(&key) {
                    e.reserved = (e.reserved - held).max(0);
                }
            }
        }
        Ok(())
    }

    async fn usage(&self, limits: &[AppliedLimit]) -> Result<Vec<LimitState>, QuotaError> {
        let now = Utc::now();
        self.ensure(limits, now).await?;
        let inner = self.inner.lock();
        Ok(limits
            .iter()
            .filter_map(|l| {
                inner
                    .counters
                    .get(&l.counter_key())
                    .map(|e| state_of(l, e, now))
            })
            .collect())
    }

    fn open_holds(&self) -> usize {
        self.inner.lock().holds.len()
    }

    async fn rebuild(&self, limits: &[AppliedLimit]) -> Result<(), QuotaError> {
        let Some(loader) = &self.loader else {
            return Err(QuotaError::Other(
                "no ledger to rebuild counters from".into(),
            ));
        };
        let now = Utc::now();
        for l in limits {
            // A settle landing during the load would be lost by the swap: retry then.
            for _ in 0..LOAD_ATTEMPTS {
                let seq = self.inner.lock().settle_seq;
                let mut c = Counter::new(l.spec.window, self.tz);
                loader.load(l, &mut c, now).await?;
                let mut inner = self.inner.lock();
                if inner.settle_seq != seq {
                    continue;
                }
                match inner.counters.get_mut(&l.counter_key()) {
                    Some(e) => {
                        e.base = c.used(now);
                        e.base_window = c.window_start(now);
                        e.counter = c;
                    }
                    None => {
                        inner.counters.insert(l.counter_key(), Entry::new(c, now));
                    }
                }
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Subject;
    use std::str::FromStr;

    fn limit(spec: &str) -> AppliedLimit {
        AppliedLimit {
            subject: Subject::Key("k_1".into()),
            spec: crate::quota::limit::LimitSpec::from_str(spec).unwrap(),
            plan: None,
        }
    }

    fn req(id: &str, limits: &[AppliedLimit], cost: i64) -> ReserveRequest {
        ReserveRequest {
            trace_id: id.into(),
            started_at: Utc::now(),
            limits: limits.to_vec(),
            estimate: Amounts {
                requests: 1,
                input_tokens: 10,
                output_tokens: 20,
                cost_micros: cost,
            },
        }
    }

    #[tokio::test]
    async fn all_or_nothing_and_exact_under_concurrency() {
        let store = Arc::new(MemoryStore::new(chrono_tz::UTC, None));
        let limits = vec![limit("requests:total=50"), limit("tokens:day=100000")];
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = store.clone();
            let l = limits.clone();
            tasks.push(tokio::spawn(async move {
                s.reserve(&req(&format!("t{i}"), &l, 1)).await.unwrap()
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), ReserveOutcome::Admitted(_)) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 50);
        // The token limit holds only what the 50 admitted requests asked for.
        let u = store.usage(&limits).await.unwrap();
        assert_eq!(u[1].reserved, 50 * 30);
    }

    #[tokio::test]
    async fn settle_moves_hold_to_used_and_release_frees() {
        let store = MemoryStore::new(chrono_tz::UTC, None);
        let limits = vec![limit("usd:total=1")];
        assert!(matches!(
            store.reserve(&req("a", &limits, 600_000)).await.unwrap(),
            ReserveOutcome::Admitted(_)
        ));
        assert_eq!(
            store.reserve(&req("a", &limits, 1)).await.unwrap(),
            ReserveOutcome::Duplicate
        );
        assert!(matches!(
            store.reserve(&req("b", &limits, 600_000)).await.unwrap(),
            ReserveOutcome::Exceeded {
                retry_after: None,
                ..
            }
        ));
        store
            .settle(
                "a",
                Amounts {
                    requests: 1,
                    input_tokens: 1,
                    output_tokens: 1,
                    cost_micros: 250_000,
                },
                Utc::now(),
                &[],
            )
            .await
            .unwrap();
        let u = store.usage(&limits).await.unwrap();
        assert_eq!((u[0].used, u[0].reserved), (250_000, 0));
        assert!(matches!(
            store.reserve(&req("b", &limits, 600_000)).await.unwrap(),
            ReserveOutcome::Admitted(_)
        ));
        store.release("b").await.unwrap();
        // Settling twice changes nothing.
        store
            .settle(
                "a",
                Amounts {
                    cost_micros: 250_000,
                    ..Default::default()
                },
                Utc::now(),
                &[],
            )
            .await
            .unwrap();
        let u = store.usage(&limits).await.unwrap();
        assert_eq!((u[0].used, u[0].reserved), (250_000, 0));
        assert_eq!(store.open_holds(), 0);
    }

    #[tokio::test]
    async fn disabled_wins_and_retry_after_for_windows() {
        let store = MemoryStore::new(chrono_tz::UTC, None);
        let out = store
            .reserve(&req(
                "a",
                &[limit("requests:minute=5"), limit("usd:day=0")],
                0,
            ))
            .await
            .unwrap();
        assert!(matches!(out, ReserveOutcome::Disabled(l) if l.spec.to_string() == "usd:day=0"));
        let lim = vec![limit("requests:minute=1")];
        assert!(matches!(
            store.reserve(&req("x", &lim, 0)).await.unwrap(),
            ReserveOutcome::Admitted(_)
        ));
        match store.reserve(&req("y", &lim, 0)).await.unwrap() {
            ReserveOutcome::Exceeded {
                retry_after: Some(d),
                ..
            } => assert!(d.as_secs() <= 60),
            other => panic!("{other:?}"),
        }
    }

    /// A ledger whose settled total can be changed under the store.
    struct FixedLoader(std::sync::atomic::AtomicI64);

    #[async_trait::async_trait]
    impl CounterLoader for FixedLoader {
        async fn load(
            &self,
            _limit: &AppliedLimit,
            counter: &mut Counter,
            now: DateTime<Utc>,
        ) -> Result<(), QuotaError> {
            counter.add(now, self.0.load(std::sync::atomic::Ordering::SeqCst), now);
            Ok(())
        }
    }

    #[tokio::test]
    async fn rebuild_rewrites_counters_and_keeps_holds() {
        let loader = Arc::new(FixedLoader(std::sync::atomic::AtomicI64::new(3)));
        let store = MemoryStore::new(chrono_tz::UTC, Some(loader.clone()));
        let limits = vec![limit("requests:total=10")];
        assert!(matches!(
            store.reserve(&req("a", &limits, 0)).await.unwrap(),
            ReserveOutcome::Admitted(_)
        ));
        // Another instance billed 4 more: the ledger now says 7.
        loader.0.store(7, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(store.usage(&limits).await.unwrap()[0].used, 3);
        store.rebuild(&limits).await.unwrap();
        let u = store.usage(&limits).await.unwrap();
        assert_eq!(
            (u[0].used, u[0].reserved),
            (7, 1),
            "the hold of `a` survives"
        );
        let plain = MemoryStore::new(chrono_tz::UTC, None);
        assert!(plain.rebuild(&limits).await.is_err());
    }

    /// The local-mode share: each of `n` instances admits at most its share of what
    /// remained when its counter was loaded; carried-over holds are never refused.
    #[tokio::test]
    async fn a_share_admits_its_part_of_what_remained() {
        let loader = Arc::new(FixedLoader(std::sync::atomic::AtomicI64::new(4)));
        let store = MemoryStore::new(chrono_tz::UTC, Some(loader));
        store.set_share(2);
        let limits = vec![limit("requests:total=10")];
        let mut admitted = 0;
        for i in 0..10 {
            if matches!(
                store
                    .reserve(&req(&format!("t{i}"), &limits, 0))
                    .await
                    .unwrap(),
                ReserveOutcome::Admitted(_)
            ) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "4 used, 6 remained, half of them");
        // Three instances: a third of the 6 (rounded down) in all, with the three already
        // held counting against it.
        store.set_share(3);
        assert!(matches!(
            store.reserve(&req("x", &limits, 0)).await.unwrap(),
            ReserveOutcome::Exceeded { .. }
        ));
        // A carried-over hold is taken whatever the share says.
        store.hold(&req("carried", &limits, 0)).await.unwrap();
        assert_eq!(store.usage(&limits).await.unwrap()[0].reserved, 4);
        // The whole limit again: 4 used + 4 held, 2 more.
        store.set_share(1);
        for i in 0..2 {
            assert!(matches!(
                store
                    .reserve(&req(&format!("w{i}"), &limits, 0))
                    .await
                    .unwrap(),
                ReserveOutcome::Admitted(_)
            ));
        }
        assert!(matches!(
            store.reserve(&req("w2", &limits, 0)).await.unwrap(),
            ReserveOutcome::Exceeded { .. }
        ));
    }
}
