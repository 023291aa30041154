//! `storage.on_unavailable` (SPEC §5): what the quota store does while the shared store
//! (Redis) cannot be reached.
//!
//! [`FallbackStore`] wraps the primary store. While the primary answers it is
//! authoritative. The first `Unavailable` error marks it down (logged once) and the policy
//! applies until a probe succeeds:
//!
//! - `local`: this instance enforces with its own in-process counters, seeded from the
//!   durable history (the loader) or, when that is unreachable too, from the last state the
//!   primary reported. The durable history has settled requests only, so the holds this
//!   instance had in the primary when it went down (requests still running) are carried
//!   over into the local counters before any local decision; otherwise the cap would be
//!   exceeded by up to the number of requests in flight. Settles made meanwhile are queued
//!   and replayed to the primary, idempotently, when it is back; then the local counters are
//!   dropped and the primary is authoritative again.
//! - `open`: admit without checking (nothing held); settles are queued for replay.
//! - `closed`: refuse (the engine answers 503).
//!
//! Bound of `local`: N instances enforcing one budget each with its own counters can admit
//! up to N times what remains during the outage; replay then makes the shared counters
//! exact again (over-admission is visible, never lost).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::config::OnUnavailable;
use crate::quota::memory::{CounterLoader, MemoryStore};
use crate::quota::store::{
    Amounts, AppliedLimit, LimitState, QuotaError, QuotaStore, ReserveOutcome, ReserveRequest,
};
use crate::quota::window::Counter;

/// How often a down primary is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Most settles queued for replay; older ones are dropped (and counted) beyond it. Each is a
/// few hundred bytes.
pub const MAX_PENDING: usize = 1_000_000;

#[derive(Debug, Clone)]
struct Pending {
    trace_id: String,
    actual: Amounts,
    started_at: DateTime<Utc>,
    limits: Vec<AppliedLimit>,
}

#[derive(Default)]
struct State {
    primary_up: bool,
    /// Trace ids held (or admitted unchecked) while the primary was down.
    local: HashSet<String>,
    pending: VecDeque<Pending>,
    dropped: u64,
    /// Last `used + reserved` the primary reported per counter, with its window.
    last_known: HashMap<String, (i64, Option<DateTime<Utc>>)>,
    /// Requests held in the primary and not yet settled or released (policy `local`
    /// only): carried over into the local counters when the primary goes down.
    primary_holds: HashMap<String, ReserveRequest>,
}

/// The primary store with the `on_unavailable` policy around it.
pub struct FallbackStore {
    primary: Arc<dyn QuotaStore>,
    local: Arc<MemoryStore>,
    policy: OnUnavailable,
    state: Arc<Mutex<State>>,
    /// Held for writing while the primary's holds are carried over to the local counters,
    /// for reading by every local reserve: no local decision sees counters without them.
    handover: tokio::sync::RwLock<()>,
}

/// Seeds local counters: durable history first, the primary's last report otherwise.
struct LocalSeed {
    inner: Option<Arc<dyn CounterLoader>>,
    state: Arc<Mutex<State>>,
}

#[async_trait::async_trait]
impl CounterLoader for LocalSeed {
    async fn load(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), QuotaError> {
        if let Some(inner) = &self.inner {
            let mut c = counter.clone();
            if inner.load(limit, &mut c, now).await.is_ok() {
                *counter = c;
                return Ok(());
            }
        }
        let known = self
            .state
            .lock()
            .last_known
            .get(&limit.counter_key())
            .copied();
        if let Some((used, window_start)) = known {
            // Still the same window? Then start from what the primary last said.
            if window_start == counter.window_start(now) {
                counter.add(window_start.unwrap_or(now), used, now);
            }
        }
        Ok(())
    }
}

impl FallbackStore {
    /// `loader` seeds local counters (durable history); `tz` as for every counter.
    pub fn new(
        primary: Arc<dyn QuotaStore>,
        policy: OnUnavailable,
        tz: chrono_tz::Tz,
        loader: Option<Arc<dyn CounterLoader>>,
    ) -> FallbackStore {
        let state = Arc::new(Mutex::new(State {
            primary_up: true,
            ..State::default()
        }));
        let seed = Arc::new(LocalSeed {
            inner: loader,
            state: state.clone(),
        });
        FallbackStore {
            primary,
            local: Arc::new(MemoryStore::new(tz, Some(seed))),
            policy,
            state,
            handover: tokio::sync::RwLock::new(()),
        }
    }

    pub fn primary_up(&self) -> bool {
        self.state.lock().primary_up
    }

    /// Settles waiting for the primary.
    pub fn pending(&self) -> usize {
        self.state.lock().pending.len()
    }

    async fn mark_down(&self, e: &QuotaError) {
        if !self.primary_up() {
            return;
        }
        // Taken before the flip, so local reserves wait for the carried-over holds.
        let _g = self.handover.write().await;
        let held = {
            let mut s = self.state.lock();
            if !s.primary_up {
                return;
            }
            s.primary_up = false;
            tracing::warn!(error = %e, policy = ?self.policy, "quota store unavailable; switching to the on_unavailable policy");
            std::mem::take(&mut s.primary_holds)
        };
        let n = held.len();
        for req in held.into_values() {
            // Finished locally from now on: the primary stops refreshing its hold, which
            // then expires by its TTL (a replayed settle moves it to used first).
            self.primary.forget(&req.trace_id);
            self.hold_locally(&req).await;
        }
        if n > 0 {
            tracing::info!(
                holds = n,
                "requests in flight carried over to the local counters"
            );
        }
    }

    /// Hold `req` (admitted by the primary) in the local counters too. A refusal means the
    /// local counters already count at least as much; its settle then adds the actual.
    async fn hold_locally(&self, req: &ReserveRequest) {
        match self.local.reserve(req).await {
            Ok(ReserveOutcome::Admitted(_)) => {
                self.state.lock().local.insert(req.trace_id.clone());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, trace_id = %req.trace_id, "cannot hold a request in flight locally")
            }
        }
    }

    fn queue(&self, p: Pending) {
        let mut s = self.state.lock();
        if s.pending.len() >= MAX_PENDING {
            s.pending.pop_front();
            s.dropped += 1;
        }
        s.pending.push_back(p);
    }

    fn remember(&self, states: &[LimitState]) {
        let mut s = self.state.lock();
        for st in states {
            // Holds count as used: most requests in flight settle, and erring high keeps
            // the local fallback from admitting past the cap.
            s.last_known.insert(
                st.limit.counter_key(),
                (st.used.saturating_add(st.reserved), st.window_start),
            );
        }
    }

    /// Probe a down primary once; when it answers, replay queued settles (idempotent per
    /// trace id), drop the local counters and make the primary authoritative again.
    /// Returns whether the primary is up afterwards.
    pub async fn probe(&self) -> bool {
        if self.primary_up() {
            return true;
        }
        if self.primary.usage(&[]).await.is_err() {
            return false;
        }
        loop {
            let next = self.state.lock().pending.front().cloned();
            let Some(p) = next else { break };
            match self
                .primary
                .settle(&p.trace_id, p.actual, p.started_at, &p.limits)
                .await
            {
                Ok(()) => {
                    self.state.lock().pending.pop_front();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "replay to the quota store failed; will retry");
                    return false;
                }
            }
        }
        {
            let mut s = self.state.lock();
            s.primary_up = true;
            s.local.clear();
            if s.dropped > 0 {
                tracing::error!(
                    dropped = s.dropped,
                    "settles dropped from the replay queue while the quota store was down"
                );
                s.dropped = 0;
            }
        }
        self.local.clear_counters();
        tracing::info!(
            "quota store reachable again; replayed queued settles, it is authoritative again"
        );
        true
    }
}

#[async_trait::async_trait]
impl QuotaStore for FallbackStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, QuotaError> {
        if self.primary_up() {
            match self.primary.reserve(req).await {
                Ok(out) => {
                    if let ReserveOutcome::Admitted(states) = &out {
                        self.remember(states);
                        if self.policy == OnUnavailable::Local {
                            let late = {
                                let mut s = self.state.lock();
                                if s.primary_up {
                                    s.primary_holds.insert(req.trace_id.clone(), req.clone());
                                }
                                !s.primary_up
                            };
                            // The primary went down since it answered: carry this one over.
                            if late {
                                let _g = self.handover.read().await;
                                self.hold_locally(req).await;
                            }
                        }
                    }
                    return Ok(out);
                }
                Err(e @ QuotaError::Unavailable(_)) => self.mark_down(&e).await,
                Err(e) => return Err(e),
            }
        }
        match self.policy {
            OnUnavailable::Closed => Err(QuotaError::Unavailable(
                "quota store down and on_unavailable = \"closed\"".into(),
            )),
            OnUnavailable::Open => {
                self.state.lock().local.insert(req.trace_id.clone());
                Ok(ReserveOutcome::Admitted(Vec::new()))
            }
            OnUnavailable::Local => {
                let _g = self.handover.read().await;
                let out = self.local.reserve(req).await?;
                if matches!(out, ReserveOutcome::Admitted(_)) {
                    self.state.lock().local.insert(req.trace_id.clone());
                }
                Ok(out)
            }
        }
    }

    async fn settle(
        &self,
        trace_id: &str,
        actual: Amounts,
        started_at: DateTime<Utc>,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        let was_local = {
            let mut s = self.state.lock();
            s.primary_holds.remove(trace_id);
            s.local.remove(trace_id)
        };
        let pending = Pending {
            trace_id: trace_id.to_string(),
            actual,
            started_at,
            limits: limits.to_vec(),
        };
        if !was_local && self.primary_up() {
            match self
                .primary
                .settle(trace_id, actual, started_at, limits)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e @ QuotaError::Unavailable(_)) => self.mark_down(&e).await,
                Err(e) => return Err(e),
            }
        }
        // Count it locally too, so local decisions see it until the primary is back.
        self.local
            .settle(trace_id, actual, started_at, limits)
            .await?;
        self.queue(pending);
        Ok(())
    }

    async fn release(&self, trace_id: &str) -> Result<(), QuotaError> {
        let was_local = {
            let mut s = self.state.lock();
            s.primary_holds.remove(trace_id);
            s.local.remove(trace_id)
        };
        if was_local {
            return self.local.release(trace_id).await;
        }
        match self.primary.release(trace_id).await {
            Ok(()) => Ok(()),
            // The hold expires by itself (reservation_ttl).
            Err(e @ QuotaError::Unavailable(_)) => {
                self.mark_down(&e).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn usage(&self, limits: &[AppliedLimit]) -> Result<Vec<LimitState>, QuotaError> {
        if self.primary_up() {
            match self.primary.usage(limits).await {
                Ok(s) => return Ok(s),
                Err(e @ QuotaError::Unavailable(_)) => self.mark_down(&e).await,
                Err(e) => return Err(e),
            }
        }
        self.local.usage(limits).await
    }

    fn open_holds(&self) -> usize {
        self.primary.open_holds() + self.local.open_holds()
    }

    fn health(&self) -> Vec<(&'static str, bool)> {
        vec![("redis", self.primary_up())]
    }

    async fn recover(&self) {
        self.probe().await;
    }

    async fn rebuild(&self, limits: &[AppliedLimit]) -> Result<(), QuotaError> {
        self.local.rebuild(limits).await?;
        if !self.primary_up() {
            // The counters in force now are the local ones, rebuilt above. Redis's own
            // are fixed by running reconcile again once it is back.
            tracing::warn!(
                "quota store down: rebuilt the local counters only; run reconcile --fix again once it is back"
            );
            return Ok(());
        }
        match self.primary.rebuild(limits).await {
            Err(e @ QuotaError::Unavailable(_)) => {
                self.mark_down(&e).await;
                tracing::warn!(
                    "quota store down: rebuilt the local counters only; run reconcile --fix again once it is back"
                );
                Ok(())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Subject;
    use std::str::FromStr;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A memory store that can be switched off.
    struct Flaky {
        inner: MemoryStore,
        down: AtomicBool,
    }

    impl Flaky {
        fn check(&self) -> Result<(), QuotaError> {
            if self.down.load(Ordering::SeqCst) {
                Err(QuotaError::Unavailable("down".into()))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait::async_trait]
    impl QuotaStore for Flaky {
        async fn reserve(&self, r: &ReserveRequest) -> Result<ReserveOutcome, QuotaError> {
            self.check()?;
            self.inner.reserve(r).await
        }
        async fn settle(
            &self,
            t: &str,
            a: Amounts,
            s: DateTime<Utc>,
            l: &[AppliedLimit],
        ) -> Result<(), QuotaError> {
            self.check()?;
            self.inner.settle(t, a, s, l).await
        }
        async fn release(&self, t: &str) -> Result<(), QuotaError> {
            self.check()?;
            self.inner.release(t).await
        }
        async fn usage(&self, l: &[AppliedLimit]) -> Result<Vec<LimitState>, QuotaError> {
            self.check()?;
            self.inner.usage(l).await
        }
        fn open_holds(&self) -> usize {
            self.inner.open_holds()
        }
    }

    fn limit(spec: &str) -> AppliedLimit {
        AppliedLimit {
            subject: Subject::Key("k".into()),
            spec: crate::quota::limit::LimitSpec::from_str(spec).unwrap(),
            plan: None,
        }
    }

    fn req(id: &str, l: &[AppliedLimit]) -> ReserveRequest {
        ReserveRequest {
            trace_id: id.into(),
            started_at: Utc::now(),
            limits: l.to_vec(),
            estimate: Amounts {
                requests: 1,
                ..Default::default()
            },
        }
    }

    async fn admit_settle(s: &FallbackStore, id: &str, l: &[AppliedLimit]) -> bool {
        match s.reserve(&req(id, l)).await.unwrap() {
            ReserveOutcome::Admitted(_) => {
                s.settle(
                    id,
                    Amounts {
                        requests: 1,
                        ..Default::default()
                    },
                    Utc::now(),
                    l,
                )
                .await
                .unwrap();
                true
            }
            _ => false,
        }
    }

    #[tokio::test]
    async fn local_policy_enforces_from_the_last_known_state_and_replays() {
        let primary = Arc::new(Flaky {
            inner: MemoryStore::new(chrono_tz::UTC, None),
            down: AtomicBool::new(false),
        });
        let store = FallbackStore::new(primary.clone(), OnUnavailable::Local, chrono_tz::UTC, None);
        let l = vec![limit("requests:total=10")];
        for i in 0..4 {
            assert!(admit_settle(&store, &format!("a{i}"), &l).await);
        }
        // Seen by the primary after the 4th reserve: used 3 (the 4th was held).
        primary.down.store(true, Ordering::SeqCst);
        let mut admitted = 0;
        for i in 0..10 {
            if admit_settle(&store, &format!("b{i}"), &l).await {
                admitted += 1;
            }
        }
        assert!(!store.primary_up());
        // The local counters start from the primary's last report (3 used + 1 held = 4),
        // so exactly 6 more fit.
        assert_eq!(admitted, 6);
        assert!(store.pending() >= 6);
        primary.down.store(false, Ordering::SeqCst);
        assert!(store.probe().await);
        assert_eq!(store.pending(), 0);
        let u = store.usage(&l).await.unwrap();
        assert_eq!(u[0].used, 10, "the primary got every settle exactly once");
        assert!(!admit_settle(&store, "c", &l).await);
    }

    /// Durable history with no settled rows (what a ledger holds while requests run).
    struct EmptyHistory;

    #[async_trait::async_trait]
    impl CounterLoader for EmptyHistory {
        async fn load(
            &self,
            _: &AppliedLimit,
            _: &mut Counter,
            _: DateTime<Utc>,
        ) -> Result<(), QuotaError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn holds_in_flight_are_carried_over_to_the_local_counters() {
        let primary = Arc::new(Flaky {
            inner: MemoryStore::new(chrono_tz::UTC, None),
            down: AtomicBool::new(false),
        });
        let store = FallbackStore::new(
            primary.clone(),
            OnUnavailable::Local,
            chrono_tz::UTC,
            Some(Arc::new(EmptyHistory)),
        );
        let l = vec![limit("requests:total=2")];
        for id in ["h1", "h2"] {
            assert!(matches!(
                store.reserve(&req(id, &l)).await.unwrap(),
                ReserveOutcome::Admitted(_)
            ));
        }
        primary.down.store(true, Ordering::SeqCst);
        // The history has no row yet, but the two running requests fill the cap.
        assert!(!admit_settle(&store, "x", &l).await);
        assert!(!store.primary_up());
        let one = Amounts {
            requests: 1,
            ..Default::default()
        };
        store.settle("h1", one, Utc::now(), &l).await.unwrap();
        store.release("h2").await.unwrap();
        // h2 freed its place; h1 is counted once.
        assert!(admit_settle(&store, "y", &l).await);
        assert!(!admit_settle(&store, "z", &l).await);
        primary.down.store(false, Ordering::SeqCst);
        assert!(store.probe().await);
        assert_eq!(store.pending(), 0);
    }

    #[tokio::test]
    async fn open_and_closed_policies() {
        let primary = Arc::new(Flaky {
            inner: MemoryStore::new(chrono_tz::UTC, None),
            down: AtomicBool::new(false),
        });
        let l = vec![limit("requests:total=1")];
        // The primary knows the counter (a memory primary only adds to counters it has).
        primary.usage(&l).await.unwrap();
        primary.down.store(true, Ordering::SeqCst);
        let closed =
            FallbackStore::new(primary.clone(), OnUnavailable::Closed, chrono_tz::UTC, None);
        assert!(matches!(
            closed.reserve(&req("x", &l)).await,
            Err(QuotaError::Unavailable(_))
        ));
        let open = FallbackStore::new(primary.clone(), OnUnavailable::Open, chrono_tz::UTC, None);
        for i in 0..3 {
            assert!(
                admit_settle(&open, &format!("o{i}"), &l).await,
                "open admits unchecked"
            );
        }
        primary.down.store(false, Ordering::SeqCst);
        assert!(open.probe().await);
        assert_eq!(
            open.usage(&l).await.unwrap()[0].used,
            3,
            "unchecked usage still reaches the shared counters"
        );
    }
}
