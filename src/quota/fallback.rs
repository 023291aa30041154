//! `storage.on_unavailable` (SPEC §5): what the quota store does while the shared store
//! (Redis) cannot be reached.
//!
//! [`FallbackStore`] wraps the primary store. While the primary answers it is
//! authoritative. The first `Unavailable` error marks it down (logged once) and the policy
//! applies until a probe succeeds:
//!
//! - `local`: this instance enforces with its own in-process counters, seeded from the
//!   durable history (the loader) or, when that is unreachable too, from the last state the
//!   primary reported (nothing known of a counter: refused). The durable history has settled requests only, so the holds this
//!   instance had in the primary when it went down (requests still running) are carried
//!   over into the local counters before any local decision; otherwise the cap would be
//!   exceeded by up to the number of requests in flight.
//! - `open`: admit without checking (nothing held).
//! - `closed`: refuse (the engine answers 503).
//!
//! Settles and releases made while the primary is down are counted locally (`local`) and
//! answered `Unavailable`: they are in the journal, and the applier
//! ([`crate::journal::applier`]) replays them to the primary — idempotently per trace id,
//! also after a restart during the outage. The probe ([`FallbackStore::probe`]) pings the
//! primary (a real round trip), has the journal's backlog replayed to it, and only then
//! makes it authoritative again and drops every local counter and hold, so the next outage
//! starts from fresh state.
//!
//! Bounds of `local`: each instance admits at most its share of what remained when its
//! counter was loaded (`remaining / live`, [`crate::quota::fleet`]), so N instances stay
//! within the cap between them, up to the requests in flight at the outage's edges that
//! no instance's base counted yet. Requests admitted locally and still running when the
//! primary comes back are held in it before it is authoritative again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::quota::OnUnavailable;
use crate::quota::fleet::Fleet;
use crate::quota::memory::{CounterLoader, MemoryStore};
use crate::quota::store::{
    Amounts, AppliedLimit, LimitState, QuotaError, QuotaStore, ReserveOutcome, ReserveRequest,
};
use crate::quota::window::Counter;

/// How often a down primary is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// The journaled counter changes the primary has not seen yet.
#[async_trait::async_trait]
pub trait Backlog: Send + Sync {
    /// Apply every journaled settle and release not yet applied to the primary, to the
    /// primary only ([`QuotaStore::replay_settle`]); `Err` when it failed part way.
    async fn replay(&self) -> Result<(), QuotaError>;
    /// Whether journaled changes wait longer than the normal lag to reach the primary or
    /// the ledger of record (told to the other instances, [`crate::quota::fleet`]).
    fn behind(&self) -> bool {
        false
    }
    /// Whether this instance's own changes wait longer than the normal lag to reach the
    /// primary (its replay is pending).
    fn unapplied(&self) -> bool {
        false
    }
}

/// The last `used + reserved` the primary reported per counter, with its window: what is
/// known of a counter when the ledger of record cannot be read (SPEC §4: a rebuild never
/// goes below it). Holds count as used: most requests in flight settle, and erring high
/// keeps a rebuild from admitting past the cap.
#[derive(Default)]
pub struct LastKnown {
    /// Counter key → (used + reserved, start of its window).
    map: Mutex<HashMap<String, Reported>>,
}

type Reported = (i64, Option<DateTime<Utc>>);

impl LastKnown {
    pub fn record(&self, states: &[LimitState]) {
        let mut m = self.map.lock();
        for st in states {
            m.insert(
                st.limit.counter_key(),
                (st.used.saturating_add(st.reserved), st.window_start),
            );
        }
    }

    /// What the primary last reported for `limit`'s counter in the window starting at
    /// `window_start`; `None` when nothing is known of that window.
    pub fn known(&self, limit: &AppliedLimit, window_start: Option<DateTime<Utc>>) -> Option<i64> {
        let m = self.map.lock();
        let (used, start) = m.get(&limit.counter_key())?;
        (*start == window_start).then_some(*used)
    }
}

/// The answer to a settle or release the primary did not take.
fn pending() -> QuotaError {
    QuotaError::Unavailable(
        "quota store down: counted locally, the journal replays it when the store is back".into(),
    )
}

#[derive(Default)]
struct State {
    primary_up: bool,
    /// Requests held in the local counters (admitted while the primary was down, or
    /// carried over from it), by trace id: carried into the primary when it is back.
    local: HashMap<String, ReserveRequest>,
    /// Trace ids whose settle the local counters already count.
    counted_locally: HashSet<String>,
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
    /// Replays the journal to the primary before it is authoritative again.
    backlog: OnceLock<Weak<dyn Backlog>>,
    known: Arc<LastKnown>,
    /// The instances enforcing the same limits (shared store with a heartbeat).
    fleet: OnceLock<Arc<Fleet>>,
    /// Some request was decided locally while the primary was up (a deferred rebuild).
    deferred: std::sync::atomic::AtomicBool,
    /// A duplicated instance id was reported (logged once per episode).
    twin: std::sync::atomic::AtomicBool,
}

/// Seeds local counters: durable history first, the primary's last report otherwise.
struct LocalSeed {
    inner: Option<Arc<dyn CounterLoader>>,
    known: Arc<LastKnown>,
}

#[async_trait::async_trait]
impl CounterLoader for LocalSeed {
    async fn load(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), QuotaError> {
        let failed = match &self.inner {
            Some(inner) => {
                let mut c = counter.clone();
                match inner.load(limit, &mut c, now).await {
                    Ok(()) => {
                        *counter = c;
                        return Ok(());
                    }
                    Err(e) => Some(e),
                }
            }
            None => None,
        };
        // Still the same window? Then start from what the primary last said.
        let window_start = counter.window_start(now);
        match (self.known.known(limit, window_start), failed) {
            (Some(used), _) => {
                counter.add(window_start.unwrap_or(now), used, now);
                Ok(())
            }
            // Nothing known of this counter: refuse it (fail closed) rather than assume
            // nothing was used.
            (None, Some(e)) => Err(e),
            (None, None) => Ok(()),
        }
    }
}

impl FallbackStore {
    /// `loader` seeds local counters (durable history); `tz` as for every counter;
    /// `known` receives what the primary reports (share it with whatever rebuilds the
    /// primary's counters).
    pub fn new(
        primary: Arc<dyn QuotaStore>,
        policy: OnUnavailable,
        tz: chrono_tz::Tz,
        loader: Option<Arc<dyn CounterLoader>>,
        known: Arc<LastKnown>,
    ) -> FallbackStore {
        let state = Arc::new(Mutex::new(State {
            primary_up: true,
            ..State::default()
        }));
        let seed = Arc::new(LocalSeed {
            inner: loader,
            known: known.clone(),
        });
        FallbackStore {
            primary,
            local: Arc::new(MemoryStore::new(tz, Some(seed))),
            policy,
            state,
            handover: tokio::sync::RwLock::new(()),
            backlog: OnceLock::new(),
            known,
            fleet: OnceLock::new(),
            deferred: std::sync::atomic::AtomicBool::new(false),
            twin: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Heartbeat as `fleet`'s instance while the primary answers, and enforce this
    /// instance's share of the fleet in the local counters (set once, at start).
    pub fn set_fleet(&self, fleet: Arc<Fleet>) {
        // The last size heard (kept in the journal): a process started during an outage
        // takes its share of it, not the whole remainder.
        self.local.set_share(fleet.live());
        let _ = self.fleet.set(fleet);
    }

    /// The fleet this store heartbeats for, if any.
    pub fn fleet_handle(&self) -> Option<Arc<Fleet>> {
        self.fleet.get().cloned()
    }

    /// Heartbeat when one is due (primary up): learn the fleet, and set the local share to
    /// the instances live now, for the next outage.
    pub async fn heartbeat(&self) {
        let Some(fleet) = self.fleet.get() else {
            return;
        };
        if !self.primary_up() || !fleet.due() {
            return;
        }
        let behind = self
            .backlog
            .get()
            .and_then(Weak::upgrade)
            .is_some_and(|b| b.behind());
        match self
            .primary
            .heartbeat(fleet.me(), fleet.nonce(), behind)
            .await
        {
            Ok(Some(hb)) => {
                fleet.observe(&hb.peers, hb.twin);
                self.local.set_share(fleet.live());
                // Local copies made while rebuilds were deferred go once nothing is waited
                // for: the next deferral loads fresh ones.
                if fleet.waiting_on().is_empty()
                    && !fleet.self_behind()
                    && self.deferred.load(std::sync::atomic::Ordering::Relaxed)
                    && self.state.lock().local.is_empty()
                {
                    self.local.clear();
                    self.deferred
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
                let was = self
                    .twin
                    .swap(hb.twin, std::sync::atomic::Ordering::Relaxed);
                if hb.twin && !was {
                    tracing::error!(instance_id = %fleet.me(), "another process heartbeats under this instance id; give every instance its own server.instance_id (each is counted in the local-mode share meanwhile)");
                }
            }
            Ok(None) => {}
            Err(e @ QuotaError::Unavailable(_)) => self.mark_down(&e).await,
            Err(e) => tracing::warn!(error = %e, "heartbeat to the quota store failed"),
        }
    }

    /// Who replays journaled changes to the primary before it is authoritative again
    /// (set once; without one the probe makes the primary authoritative at once).
    pub fn set_backlog(&self, backlog: Weak<dyn Backlog>) {
        let _ = self.backlog.set(backlog);
    }

    pub fn primary_up(&self) -> bool {
        self.state.lock().primary_up
    }

    async fn mark_down(&self, e: &QuotaError) {
        if !self.primary_up() {
            return;
        }
        if let Some(f) = self.fleet.get() {
            f.lost_contact();
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
        // Local counters left from a deferred rebuild are stale: start this outage from
        // fresh loads, keeping the requests they still hold.
        let running: Vec<ReserveRequest> = self.state.lock().local.values().cloned().collect();
        self.local.clear();
        for req in &running {
            if let Err(e) = self.local.hold(req).await {
                tracing::warn!(error = %e, trace_id = %req.trace_id, "cannot hold a request in flight locally");
            }
        }
        let n = held.len();
        for req in held.into_values() {
            // Finished locally from now on: the primary stops refreshing its hold, which
            // then expires by its TTL (or goes with the replayed settle or release).
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

    /// Hold `req` (admitted by the primary) in the local counters too, whatever they say:
    /// the primary admitted it, and it counts against this instance's share.
    async fn hold_locally(&self, req: &ReserveRequest) {
        match self.local.hold(req).await {
            Ok(()) => {
                self.state
                    .lock()
                    .local
                    .insert(req.trace_id.clone(), req.clone());
            }
            Err(e) => {
                tracing::warn!(error = %e, trace_id = %req.trace_id, "cannot hold a request in flight locally")
            }
        }
    }

    fn remember(&self, states: &[LimitState]) {
        self.known.record(states);
    }

    /// The primary's answer, while it is up: `None` when it went down (now marked) —
    /// the policy decides then. A rebuild the fleet defers is decided by the local
    /// counters, the primary staying in force.
    async fn reserve_primary(
        &self,
        req: &ReserveRequest,
    ) -> Result<Option<ReserveOutcome>, QuotaError> {
        if !self.primary_up() {
            return Ok(None);
        }
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
                if self.deferred.load(std::sync::atomic::Ordering::Relaxed) {
                    // These counters are in the primary now: local copies made while their
                    // rebuild was deferred would be stale at the next deferral.
                    self.local.drop_idle(&req.limits);
                }
                Ok(Some(out))
            }
            Err(QuotaError::Deferred(why)) => {
                tracing::debug!(trace_id = %req.trace_id, reason = %why, "decided by the local counters");
                let _g = self.handover.read().await;
                self.reserve_by_policy(req, true).await.map(Some)
            }
            Err(e @ QuotaError::Unavailable(_)) => {
                self.mark_down(&e).await;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `on_unavailable` decides `req` (the caller holds the hand-over lock for reading).
    async fn reserve_by_policy(
        &self,
        req: &ReserveRequest,
        deferred: bool,
    ) -> Result<ReserveOutcome, QuotaError> {
        match self.policy {
            OnUnavailable::Closed => Err(QuotaError::Unavailable(if deferred {
                "a counter is being rebuilt after an outage and on_unavailable = \"closed\"".into()
            } else {
                "quota store down and on_unavailable = \"closed\"".into()
            })),
            OnUnavailable::Open => Ok(ReserveOutcome::Admitted(Vec::new())),
            OnUnavailable::Local => {
                let out = self.local.reserve(req).await?;
                if matches!(out, ReserveOutcome::Admitted(_)) {
                    self.state
                        .lock()
                        .local
                        .insert(req.trace_id.clone(), req.clone());
                    if deferred {
                        self.deferred
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Ok(out)
            }
        }
    }

    /// Probe a down primary once: a real round trip; when it answers, have the journal's
    /// backlog replayed to it (idempotent per trace id), then make it authoritative again
    /// and drop every local counter and hold. Returns whether the primary is up afterwards.
    pub async fn probe(&self) -> bool {
        if self.primary_up() {
            return true;
        }
        if self.primary.ping().await.is_err() {
            return false;
        }
        if let Some(backlog) = self.backlog.get().and_then(Weak::upgrade)
            && let Err(e) = backlog.replay().await
        {
            tracing::warn!(error = %e, "replaying the journal to the quota store failed; will retry");
            return false;
        }
        {
            let _g = self.handover.write().await;
            // Requests admitted locally and still running are held in the primary before
            // it decides again, so it does not admit past them.
            let carried: Vec<ReserveRequest> = self.state.lock().local.values().cloned().collect();
            let mut held = Vec::new();
            for req in &carried {
                match self.primary.reserve(req).await {
                    Ok(ReserveOutcome::Admitted(_)) => held.push(req.clone()),
                    // Its hold from before the outage is still there: keep it alive again.
                    Ok(ReserveOutcome::Duplicate) => {
                        self.primary.adopt(req);
                        held.push(req.clone());
                    }
                    // Full already (its settle adds the actual), or its counter is not
                    // rebuilt yet (the rebuild counts what has settled by then).
                    Ok(_) | Err(QuotaError::Deferred(_)) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "carrying local holds to the quota store failed; will retry");
                        for r in &held {
                            self.primary.forget(&r.trace_id);
                            let _ = self.primary.release(&r.trace_id).await;
                        }
                        return false;
                    }
                }
            }
            let mut s = self.state.lock();
            s.primary_up = true;
            // Those that finished meanwhile have their settle or release in the journal,
            // which the applier replays onto the hold carried here.
            let running: Vec<ReserveRequest> = held
                .into_iter()
                .filter(|r| s.local.contains_key(&r.trace_id))
                .collect();
            s.local.clear();
            s.counted_locally.clear();
            for r in running {
                s.primary_holds.insert(r.trace_id.clone(), r);
            }
            self.local.clear();
        }
        tracing::info!("quota store reachable again; journal replayed, it is authoritative again");
        true
    }
}

#[async_trait::async_trait]
impl QuotaStore for FallbackStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, QuotaError> {
        // Twice at most: a primary that came back while this request waited for the
        // hand-over decides it, not the local counters it no longer uses.
        for attempt in 0..2 {
            if let Some(out) = self.reserve_primary(req).await? {
                return Ok(out);
            }
            let _g = self.handover.read().await;
            if self.primary_up() && attempt == 0 {
                continue;
            }
            return self.reserve_by_policy(req, false).await;
        }
        Err(QuotaError::Unavailable("quota store flapping".into()))
    }

    /// The request path's settle: to the primary while it is up; otherwise counted in the
    /// local counters (once per trace id) and answered `Unavailable` — the journal has it
    /// and the applier replays it to the primary. A request the local counters decided
    /// while the primary was up (a deferred rebuild) is counted in both.
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
            s.local.remove(trace_id).is_some()
        };
        if self.primary_up() {
            if was_local {
                // Decided locally (a deferred rebuild, or just before the primary came
                // back): the local counters count it for the decisions they still make.
                self.local
                    .settle(trace_id, actual, started_at, limits)
                    .await?;
            }
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
        // Count it locally, so local decisions see it until the primary is back.
        if self.policy == OnUnavailable::Local
            && self
                .state
                .lock()
                .counted_locally
                .insert(trace_id.to_string())
        {
            self.local
                .settle(trace_id, actual, started_at, limits)
                .await?;
        }
        Err(pending())
    }

    /// The request path's release: to the primary while it is up; otherwise the local hold
    /// (if any) is dropped, the primary stops refreshing its own, and `Unavailable` tells
    /// the applier to replay the release to the primary.
    async fn release(&self, trace_id: &str) -> Result<(), QuotaError> {
        let was_local = {
            let mut s = self.state.lock();
            s.primary_holds.remove(trace_id);
            s.local.remove(trace_id).is_some()
        };
        if was_local {
            self.local.release(trace_id).await?;
        }
        if self.primary_up() {
            match self.primary.release(trace_id).await {
                Ok(()) => return Ok(()),
                Err(e @ QuotaError::Unavailable(_)) => self.mark_down(&e).await,
                Err(e) => return Err(e),
            }
        }
        self.primary.forget(trace_id);
        Err(pending())
    }

    async fn replay_settle(
        &self,
        trace_id: &str,
        actual: Amounts,
        started_at: DateTime<Utc>,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        self.state.lock().primary_holds.remove(trace_id);
        match self
            .primary
            .replay_settle(trace_id, actual, started_at, limits)
            .await
        {
            Err(e @ QuotaError::Unavailable(_)) => {
                self.mark_down(&e).await;
                Err(e)
            }
            other => other,
        }
    }

    async fn replay_release(
        &self,
        trace_id: &str,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        self.state.lock().primary_holds.remove(trace_id);
        match self.primary.replay_release(trace_id, limits).await {
            Err(e @ QuotaError::Unavailable(_)) => {
                self.mark_down(&e).await;
                Err(e)
            }
            other => other,
        }
    }

    fn shared_up(&self) -> bool {
        self.primary_up()
    }

    async fn ping(&self) -> Result<(), QuotaError> {
        self.primary.ping().await
    }

    async fn usage(&self, limits: &[AppliedLimit]) -> Result<Vec<LimitState>, QuotaError> {
        if self.primary_up() {
            match self.primary.usage(limits).await {
                Ok(s) => {
                    self.remember(&s);
                    return Ok(s);
                }
                Err(QuotaError::Deferred(_)) => return self.local.usage(limits).await,
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

    fn forget(&self, trace_id: &str) {
        self.state.lock().primary_holds.remove(trace_id);
        self.primary.forget(trace_id);
    }

    fn fleet(&self) -> Option<(usize, Vec<String>)> {
        self.fleet.get().map(|f| (f.live(), f.waiting_on()))
    }

    async fn recover(&self) {
        if let Some(f) = self.fleet.get() {
            f.set_self_behind(
                self.backlog
                    .get()
                    .and_then(Weak::upgrade)
                    .is_some_and(|b| b.unapplied()),
            );
        }
        if self.probe().await {
            self.heartbeat().await;
        }
    }

    async fn rebuild(&self, limits: &[AppliedLimit]) -> Result<(), QuotaError> {
        if !self.primary_up() {
            self.local.rebuild(limits).await?;
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
                self.local.rebuild(limits).await?;
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
    use crate::quota::Subject;
    use std::str::FromStr;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A memory store that can be switched off, counting the pings it answered.
    struct Flaky {
        inner: MemoryStore,
        down: AtomicBool,
        pings: AtomicUsize,
    }

    impl Flaky {
        fn new() -> Arc<Flaky> {
            Arc::new(Flaky {
                inner: MemoryStore::new(chrono_tz::UTC, None),
                down: AtomicBool::new(false),
                pings: AtomicUsize::new(0),
            })
        }

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
        async fn ping(&self) -> Result<(), QuotaError> {
            self.check()?;
            self.pings.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn open_holds(&self) -> usize {
            self.inner.open_holds()
        }
    }

    /// Stands in for the journal: keeps every settle the store did not take and replays
    /// them to the primary when asked.
    #[derive(Default)]
    struct Journal {
        store: OnceLock<Weak<FallbackStore>>,
        unapplied: Mutex<Vec<(String, Amounts, Vec<AppliedLimit>)>>,
    }

    #[async_trait::async_trait]
    impl Backlog for Journal {
        async fn replay(&self) -> Result<(), QuotaError> {
            let Some(store) = self.store.get().and_then(Weak::upgrade) else {
                return Ok(());
            };
            loop {
                let next = self.unapplied.lock().first().cloned();
                let Some((t, a, l)) = next else { return Ok(()) };
                store.replay_settle(&t, a, Utc::now(), &l).await?;
                self.unapplied.lock().remove(0);
            }
        }
    }

    fn fallback(
        primary: &Arc<Flaky>,
        policy: OnUnavailable,
        loader: Option<Arc<dyn CounterLoader>>,
    ) -> (Arc<FallbackStore>, Arc<Journal>) {
        let store = Arc::new(FallbackStore::new(
            primary.clone(),
            policy,
            chrono_tz::UTC,
            loader,
            Arc::new(LastKnown::default()),
        ));
        let journal = Arc::new(Journal::default());
        let _ = journal.store.set(Arc::downgrade(&store));
        let backlog: Weak<dyn Backlog> = Arc::downgrade(&journal) as _;
        store.set_backlog(backlog);
        (store, journal)
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

    const ONE: Amounts = Amounts {
        requests: 1,
        input_tokens: 0,
        output_tokens: 0,
        cost_micros: 0,
    };

    /// The engine's settle: the journal keeps what the store did not take.
    async fn settle(s: &FallbackStore, j: &Journal, id: &str, l: &[AppliedLimit]) {
        match s.settle(id, ONE, Utc::now(), l).await {
            Ok(()) => {}
            Err(QuotaError::Unavailable(_)) => {
                j.unapplied.lock().push((id.into(), ONE, l.to_vec()));
            }
            Err(e) => panic!("{e}"),
        }
    }

    async fn admit_settle(s: &FallbackStore, j: &Journal, id: &str, l: &[AppliedLimit]) -> bool {
        match s.reserve(&req(id, l)).await.unwrap() {
            ReserveOutcome::Admitted(_) => {
                settle(s, j, id, l).await;
                true
            }
            _ => false,
        }
    }

    #[tokio::test]
    async fn local_policy_enforces_from_the_last_known_state_and_replays() {
        let primary = Flaky::new();
        let (store, journal) = fallback(&primary, OnUnavailable::Local, None);
        let l = vec![limit("requests:total=10")];
        for i in 0..4 {
            assert!(admit_settle(&store, &journal, &format!("a{i}"), &l).await);
        }
        // Seen by the primary after the 4th reserve: used 3 (the 4th was held).
        primary.down.store(true, Ordering::SeqCst);
        let mut admitted = 0;
        for i in 0..10 {
            if admit_settle(&store, &journal, &format!("b{i}"), &l).await {
                admitted += 1;
            }
        }
        assert!(!store.primary_up());
        // The local counters start from the primary's last report (3 used + 1 held = 4),
        // so exactly 6 more fit.
        assert_eq!(admitted, 6);
        assert!(journal.unapplied.lock().len() >= 6);
        primary.down.store(false, Ordering::SeqCst);
        assert!(store.probe().await);
        assert!(journal.unapplied.lock().is_empty());
        let u = store.usage(&l).await.unwrap();
        assert_eq!(u[0].used, 10, "the primary got every settle exactly once");
        assert!(!admit_settle(&store, &journal, "c", &l).await);
    }

    /// A process started during an outage (Redis down from the start) takes its share of
    /// the fleet size its journal recorded, not the whole remainder.
    #[tokio::test]
    async fn a_process_started_in_an_outage_takes_its_share_of_the_recorded_fleet() {
        let primary = Flaky::new();
        primary.down.store(true, Ordering::SeqCst);
        let (store, journal) =
            fallback(&primary, OnUnavailable::Local, Some(Arc::new(EmptyHistory)));
        store.set_fleet(Arc::new(Fleet::new("a").with_last_live(2)));
        let l = vec![limit("requests:total=10")];
        let mut admitted = 0;
        for i in 0..10 {
            if admit_settle(&store, &journal, &format!("r{i}"), &l).await {
                admitted += 1;
            }
        }
        assert!(!store.primary_up());
        assert_eq!(admitted, 5, "half of the 10 for one of two instances");
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
        let primary = Flaky::new();
        let (store, journal) =
            fallback(&primary, OnUnavailable::Local, Some(Arc::new(EmptyHistory)));
        let l = vec![limit("requests:total=2")];
        for id in ["h1", "h2"] {
            assert!(matches!(
                store.reserve(&req(id, &l)).await.unwrap(),
                ReserveOutcome::Admitted(_)
            ));
        }
        primary.down.store(true, Ordering::SeqCst);
        // The history has no row yet, but the two running requests fill the cap.
        assert!(!admit_settle(&store, &journal, "x", &l).await);
        assert!(!store.primary_up());
        settle(&store, &journal, "h1", &l).await;
        assert!(
            store.release("h2").await.is_err(),
            "the release waits for replay"
        );
        // h2 freed its place; h1 is counted once.
        assert!(admit_settle(&store, &journal, "y", &l).await);
        assert!(!admit_settle(&store, &journal, "z", &l).await);
        primary.down.store(false, Ordering::SeqCst);
        assert!(store.probe().await);
        assert!(journal.unapplied.lock().is_empty());
    }

    #[tokio::test]
    async fn the_probe_talks_to_the_primary_and_only_an_answer_brings_it_back() {
        let primary = Flaky::new();
        let (store, journal) = fallback(&primary, OnUnavailable::Local, None);
        let l = vec![limit("requests:total=5")];
        assert!(admit_settle(&store, &journal, "a", &l).await);
        primary.down.store(true, Ordering::SeqCst);
        assert!(admit_settle(&store, &journal, "b", &l).await);
        assert!(!store.primary_up());
        // Down: every probe fails, however often it runs.
        for _ in 0..5 {
            assert!(!store.probe().await);
            assert!(!store.primary_up());
        }
        assert_eq!(primary.pings.load(Ordering::SeqCst), 0);
        primary.down.store(false, Ordering::SeqCst);
        assert!(store.probe().await);
        assert_eq!(primary.pings.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn local_holds_do_not_outlive_the_outage() {
        let primary = Flaky::new();
        let (store, journal) =
            fallback(&primary, OnUnavailable::Local, Some(Arc::new(EmptyHistory)));
        let l = vec![limit("requests:total=3")];
        primary.usage(&l).await.unwrap();
        primary.down.store(true, Ordering::SeqCst);
        // Admitted locally during the first outage; still running when Redis returns.
        for id in ["r1", "r2"] {
            assert!(matches!(
                store.reserve(&req(id, &l)).await.unwrap(),
                ReserveOutcome::Admitted(_)
            ));
        }
        primary.down.store(false, Ordering::SeqCst);
        assert!(store.probe().await);
        // Finished after recovery: one settles, one is released.
        settle(&store, &journal, "r1", &l).await;
        store.release("r2").await.unwrap();
        assert_eq!(store.local.open_holds(), 0, "no local hold left behind");
        // The next outage starts from the durable history (empty here), not from the
        // stale holds of r1 and r2, which would leave room for one request only.
        primary.down.store(true, Ordering::SeqCst);
        assert!(admit_settle(&store, &journal, "n1", &l).await);
        assert!(admit_settle(&store, &journal, "n2", &l).await);
    }

    #[tokio::test]
    async fn open_and_closed_policies() {
        let primary = Flaky::new();
        let l = vec![limit("requests:total=1")];
        // The primary knows the counter (a memory primary only adds to counters it has).
        primary.usage(&l).await.unwrap();
        primary.down.store(true, Ordering::SeqCst);
        let (closed, _) = fallback(&primary, OnUnavailable::Closed, None);
        assert!(matches!(
            closed.reserve(&req("x", &l)).await,
            Err(QuotaError::Unavailable(_))
        ));
        let (open, journal) = fallback(&primary, OnUnavailable::Open, None);
        for i in 0..3 {
            assert!(
                admit_settle(&open, &journal, &format!("o{i}"), &l).await,
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
