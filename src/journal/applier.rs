//! The applier: brings the shared counters (Redis) up to date from the journal.
//!
//! The journal is the only path for a counter change. Every settle and release is an
//! event in the local journal first ([`crate::journal::outbox`]), written *unapplied*; the
//! applier applies it to the counters and marks it applied. Two callers share one code
//! path:
//!
//! - **the request path** ([`Applier::settle`], [`Applier::release`]): right after its
//!   event is journaled, with the admission's own limits, through the counters in force
//!   (Redis, or the local fallback while Redis is down — then the event stays unapplied);
//! - **the replay** ([`Applier::replay_pending`]): every unapplied event, oldest first, to
//!   Redis only (never to a local fallback), with the limits of the row's key as the key
//!   directory has them now. It runs at start (settles of a crashed run's recovery, and of
//!   a run that died between the journal and Redis), every [`PASS_EVERY`], and before a
//!   down Redis is authoritative again (the fallback's probe asks for it).
//!
//! **Exactly once per event.** An event is claimed (in memory) by whichever caller takes
//! it first; the other skips it. Marks are written in batches (one journal write per
//! flush, not per event), so a crash can lose the marks of the last few ms: those events
//! are applied again at the next start, which changes nothing — Redis remembers every
//! settle of a trace id for `RedisOptions::settled_ttl` (≥ 1 h) and a release of a gone
//! hold is a no-op.
//!
//! Bound: an instance that dies and never restarts leaves its unapplied events (at most
//! the settles and releases of its requests in flight and of a Redis outage) out of the
//! shared counters; its holds expire by `quota.reservation_ttl` and `tollgate reconcile
//! --fix` reseeds the counters from the ledger.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::journal::outbox::{self, Outbox};
use crate::ledger::Transaction;
use crate::quota::fallback::Backlog;
use crate::quota::store::{Amounts, AppliedLimit, QuotaError, QuotaStore};

/// Events read per replay batch.
pub const BATCH: usize = 1000;
/// Replayed events in flight to Redis at once.
pub const PARALLEL: usize = 32;
/// How often the background loop flushes marks and looks for unapplied events.
pub const PASS_EVERY: Duration = Duration::from_millis(250);
/// Marks waiting past this many are flushed at once.
const FLUSH_AT: usize = 512;
/// Journaled changes older than this, not yet applied to Redis or not yet shipped to
/// Postgres, make this instance *behind* ([`crate::quota::fleet`]): past the normal lag
/// of a pass or two.
pub const BEHIND_AFTER: Duration = Duration::from_secs(2);

/// The limits a journaled row counts against: its key's, user's, tenant's and plan's for
/// its upstream, as the key directory has them now.
pub trait LimitsOf: Send + Sync {
    fn limits_of(&self, row: &Transaction) -> Vec<AppliedLimit>;
}

pub struct Applier {
    outbox: Arc<Outbox>,
    store: Arc<dyn QuotaStore>,
    limits: Weak<dyn LimitsOf>,
    /// Events taken by a caller and not yet marked in the journal.
    claimed: Mutex<HashSet<i64>>,
    /// Events applied, waiting for their mark.
    done: Mutex<Vec<i64>>,
    wake: Notify,
    /// One replay at a time (the background loop and the probe).
    pass: tokio::sync::Mutex<()>,
    /// Journaled changes wait past [`BEHIND_AFTER`] to reach Redis, or (Postgres
    /// answering) to ship (as of the last status refresh).
    behind: std::sync::atomic::AtomicBool,
    /// Journaled changes wait past [`BEHIND_AFTER`] to reach Redis.
    unapplied_old: std::sync::atomic::AtomicBool,
    /// Told when the first replay is done.
    fleet: std::sync::OnceLock<Arc<crate::quota::fleet::Fleet>>,
    /// Events the store refused outright, set aside (see [`Applier::replay_pending`]).
    set_aside: std::sync::atomic::AtomicU64,
}

/// What one event asks of the counters.
enum Change {
    Settle {
        trace: String,
        actual: Amounts,
        started_at: chrono::DateTime<Utc>,
    },
    Release {
        trace: String,
    },
    Nothing,
}

fn change_of(row: &Transaction) -> Change {
    match row.status.as_str() {
        "settled" => Change::Settle {
            trace: row.trace_id.clone(),
            actual: Amounts {
                requests: 1,
                input_tokens: row.input_tokens,
                output_tokens: row.output_tokens,
                cost_micros: row.cost_micros,
            },
            started_at: crate::time::from_text(&row.started_at).unwrap_or_else(Utc::now),
        },
        "released" => Change::Release {
            trace: row.trace_id.clone(),
        },
        _ => Change::Nothing,
    }
}

impl Applier {
    /// An applier over `outbox` into `store`; from now on the outbox writes settles and
    /// releases unapplied.
    pub fn new(
        outbox: Arc<Outbox>,
        store: Arc<dyn QuotaStore>,
        limits: Weak<dyn LimitsOf>,
    ) -> Arc<Applier> {
        outbox.expect_applier();
        Arc::new(Applier {
            outbox,
            store,
            limits,
            claimed: Mutex::new(HashSet::new()),
            done: Mutex::new(Vec::new()),
            wake: Notify::new(),
            pass: tokio::sync::Mutex::new(()),
            // Until the first look at the journal (one pass). What a previous run left
            // unapplied holds back this instance's own rebuilds until its first replay
            // ([`crate::quota::fleet::Fleet::wait_started`]).
            behind: std::sync::atomic::AtomicBool::new(false),
            unapplied_old: std::sync::atomic::AtomicBool::new(false),
            fleet: std::sync::OnceLock::new(),
            set_aside: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Tell `fleet` when the first replay is done (rebuilds of shared counters wait
    /// for it).
    pub fn set_fleet(&self, fleet: Arc<crate::quota::fleet::Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    fn claim(&self, seq: i64) -> bool {
        self.claimed.lock().insert(seq)
    }

    fn unclaim(&self, seq: i64) {
        self.claimed.lock().remove(&seq);
    }

    fn applied(&self, seq: i64) {
        let n = {
            let mut d = self.done.lock();
            d.push(seq);
            d.len()
        };
        if n >= FLUSH_AT {
            self.wake.notify_one();
        }
    }

    /// The request path: apply the journaled settle `seq` to the counters in force.
    /// `Unavailable` when only a local fallback took it (the replay brings it to Redis).
    pub async fn settle(
        &self,
        seq: i64,
        trace_id: &str,
        actual: Amounts,
        started_at: chrono::DateTime<Utc>,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        if !self.claim(seq) {
            return Ok(());
        }
        let r = self
            .store
            .settle(trace_id, actual, started_at, limits)
            .await;
        self.finish(seq, r)
    }

    /// The request path: apply the journaled release `seq` to the counters in force.
    pub async fn release(&self, seq: i64, trace_id: &str) -> Result<(), QuotaError> {
        if !self.claim(seq) {
            return Ok(());
        }
        let r = self.store.release(trace_id).await;
        self.finish(seq, r)
    }

    fn finish(&self, seq: i64, r: Result<(), QuotaError>) -> Result<(), QuotaError> {
        match r {
            Ok(()) => {
                self.applied(seq);
                Ok(())
            }
            Err(e) => {
                self.unclaim(seq);
                Err(e)
            }
        }
    }

    /// Write the marks of applied events (one journal write), then let them go.
    pub async fn flush(&self) -> Result<usize, QuotaError> {
        let seqs = std::mem::take(&mut *self.done.lock());
        if seqs.is_empty() {
            return Ok(0);
        }
        let marked = seqs.clone();
        match self
            .outbox
            .db()
            .call(move |c| outbox::mark_applied(c, &marked))
            .await
        {
            Ok(n) => {
                let mut claimed = self.claimed.lock();
                for s in &seqs {
                    claimed.remove(s);
                }
                Ok(n)
            }
            Err(e) => {
                self.done.lock().extend(seqs);
                Err(QuotaError::Other(format!("journal: {e}")))
            }
        }
    }

    /// Apply every unapplied event to the shared counters (never a local fallback),
    /// oldest first, [`PARALLEL`] at a time. Stops when the store is unreachable (the
    /// events not applied stay unapplied); an event the store refuses outright is set
    /// aside (logged, counted, marked applied) so it cannot hold up the rest. Returns how
    /// many were applied.
    pub async fn replay_pending(&self) -> Result<u64, QuotaError> {
        let _pass = self.pass.lock().await;
        let Some(limits_of) = self.limits.upgrade() else {
            return Ok(0);
        };
        let mut cursor = 0;
        let mut applied = 0u64;
        loop {
            let events = self
                .outbox
                .reader()
                .read(move |c| outbox::unapplied_after(c, cursor, BATCH))
                .await
                .map_err(|e| QuotaError::Other(format!("journal: {e}")))?;
            let Some(last) = events.last() else { break };
            cursor = last.seq;
            let full = events.len() == BATCH;
            let mine: Vec<outbox::Event> =
                events.into_iter().filter(|e| self.claim(e.seq)).collect();
            let mut failed: Option<QuotaError> = None;
            for chunk in mine.chunks(PARALLEL) {
                let mut set = tokio::task::JoinSet::new();
                for e in chunk {
                    let store = self.store.clone();
                    let limits_of = limits_of.clone();
                    let (seq, payload) = (e.seq, e.payload.clone());
                    set.spawn(async move {
                        let row: Transaction = match serde_json::from_str(&payload) {
                            Ok(r) => r,
                            Err(err) => {
                                // Only a damaged file gets here; it must not stop the rest.
                                tracing::error!(seq, error = %err, "unreadable journal event not applied to the counters");
                                return (seq, Ok(()));
                            }
                        };
                        let r = match change_of(&row) {
                            Change::Settle {
                                trace,
                                actual,
                                started_at,
                            } => {
                                let limits = limits_of.limits_of(&row);
                                store
                                    .replay_settle(&trace, actual, started_at, &limits)
                                    .await
                            }
                            Change::Release { trace } => {
                                let limits = limits_of.limits_of(&row);
                                store.replay_release(&trace, &limits).await
                            }
                            Change::Nothing => Ok(()),
                        };
                        (seq, r)
                    });
                }
                while let Some(joined) = set.join_next().await {
                    match joined {
                        Ok((seq, Ok(()))) => {
                            self.applied(seq);
                            applied += 1;
                        }
                        Ok((seq, Err(e @ QuotaError::Unavailable(_)))) => {
                            self.unclaim(seq);
                            failed.get_or_insert(e);
                        }
                        Ok((seq, Err(e))) => {
                            // The store answered and refused this one event: retrying
                            // cannot help, and it must not hold up the events behind it.
                            // The ledger has it; `reconcile --fix` brings it to the
                            // counters.
                            tracing::error!(seq, error = %e, "journal event set aside: the quota store refused it; run `tollgate reconcile --fix`");
                            self.set_aside
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            // Its hold is no longer kept alive: it expires by
                            // `reservation_ttl` instead of holding room for good.
                            if let Some(ev) = mine.iter().find(|ev| ev.seq == seq) {
                                self.store.forget(&ev.trace_id);
                            }
                            self.applied(seq);
                        }
                        Err(e) => {
                            failed.get_or_insert(QuotaError::Other(format!("replay task: {e}")));
                        }
                    }
                }
                if failed.is_some() {
                    break;
                }
            }
            if let Some(e) = failed {
                // Tasks that did not finish (a join error) leave their claim: release
                // every claim of this batch that was neither applied nor released.
                let done: HashSet<i64> = self.done.lock().iter().copied().collect();
                {
                    let mut claimed = self.claimed.lock();
                    for ev in &mine {
                        if !done.contains(&ev.seq) {
                            claimed.remove(&ev.seq);
                        }
                    }
                }
                let _ = self.flush().await;
                return Err(e);
            }
            if !full {
                break;
            }
        }
        self.flush().await?;
        if let Some(f) = self.fleet.get() {
            f.mark_started();
        }
        if applied > 0 {
            tracing::info!(
                events = applied,
                "journaled counter changes applied to the shared counters"
            );
        }
        Ok(applied)
    }

    /// Record the backlog and progress in the outbox (for `journal status`, `/readyz`).
    pub async fn refresh_status(&self) {
        let r = self
            .outbox
            .reader()
            .read(|c| {
                Ok((
                    outbox::unapplied_sync(c)?,
                    outbox::progress_sync(c)?,
                    outbox::lag_sync(c)?,
                ))
            })
            .await;
        match r {
            Ok(((n, _), p, (unapplied, unshipped))) => {
                self.outbox.note_applier(n, p);
                let cutoff = Utc::now()
                    - chrono::TimeDelta::from_std(BEHIND_AFTER)
                        .unwrap_or(chrono::TimeDelta::zero());
                let old = |t: Option<String>| {
                    t.and_then(|t| crate::time::from_text(&t))
                        .is_some_and(|t| t < cutoff)
                };
                // Unshipped while Postgres is down is no reason to hold back another
                // instance's rebuild: that rebuild cannot read Postgres either.
                let unapplied = old(unapplied);
                let unshipped = old(unshipped) && self.outbox.pg_up();
                self.unapplied_old
                    .store(unapplied, std::sync::atomic::Ordering::Relaxed);
                self.behind
                    .store(unapplied || unshipped, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                // Not knowing is not "caught up".
                self.behind
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot count the counters backlog");
            }
        }
    }

    /// Events set aside since start: the shared store refused them for a reason other
    /// than being unreachable (a retry would fail the same way).
    pub fn set_aside_total(&self) -> u64 {
        self.set_aside.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run forever: flush marks, replay what is unapplied while Redis is up, refresh
    /// the status; every [`PASS_EVERY`] or when many marks wait.
    pub async fn run(self: Arc<Self>) {
        let mut failing = false;
        loop {
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "cannot mark journal events applied; will retry");
            }
            if self.store.shared_up() {
                match self.replay_pending().await {
                    Ok(_) => failing = false,
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "cannot apply journal events to the shared counters; will retry");
                        }
                        failing = true;
                    }
                }
            }
            self.refresh_status().await;
            let _ = tokio::time::timeout(PASS_EVERY, self.wake.notified()).await;
        }
    }
}

#[async_trait::async_trait]
impl Backlog for Applier {
    async fn replay(&self) -> Result<(), QuotaError> {
        self.replay_pending().await.map(|_| ())
    }

    fn behind(&self) -> bool {
        self.behind.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn unapplied(&self) -> bool {
        self.unapplied_old
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
