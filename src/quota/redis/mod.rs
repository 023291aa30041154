//! The Redis quota store (shared mode): every instance counts and holds in one Redis (single
//! node or Cluster), so caps hold across instances.
//!
//! # Scripts
//!
//! Each verb is one Lua script under `lua/` (`reserve_v1`, `settle_v1`, `release_v1`,
//! `usage_v1`, `seed_v1`, `touch_v1`, `forget_v1`), embedded with `include_str!` and sent as
//! EVALSHA (reloaded on NOSCRIPT, e.g. after a restart or `SCRIPT FLUSH`). The helpers they
//! share (reading `TIME`, the calendar-window check, the `SEED` reply, dropping and reaping
//! holds) live once in `lua/prelude.lua`, prepended to every script when the store is built.
//! Each file's header documents its KEYS, ARGV and reply. A script runs atomically, so a
//! reserve checks every limit against `used + held + estimate` and holds on all of them, or
//! changes nothing. Key layout and hash tags: see [`layout`].
//!
//! # Time
//!
//! Decisions use the Redis server's `TIME`, so instances with skewed clocks agree on rolling
//! buckets and hold expiry. Calendar windows are aligned in a time zone, which is not Lua's
//! job: the client computes the window `[start, end)` containing its *estimate of the server
//! time* (its clock plus the offset seen in the last reply) and passes it; the script checks
//! that the window contains its `TIME` and otherwise answers `TIME` with the server time, and
//! the client recomputes the window at that time and calls again. A decision is therefore
//! never taken on a wrong window; skew costs one extra round trip near window edges only.
//!
//! # Counters are a cache over the ledger
//!
//! A counter without data in Redis (never used, flushed, evicted, or expired after its window)
//! makes reserve/usage answer `SEED` without changing anything. The client then fills a
//! [`Counter`] with the [`CounterLoader`] (the ledger's settled rows of its window), writes it
//! with `seed_v1` — which writes only counters still missing, so racing instances cannot seed
//! twice — and calls again. A `FLUSHALL` therefore rebuilds counters from the ledger; it never
//! resets them to the full allowance. Accuracy bounds of a seed:
//!
//! * a settle landing while the ledger is read bumps a per-tag sequence, and the seed is then
//!   refused and re-read (up to [`LOAD_ATTEMPTS`] times, then written anyway): misses are at
//!   most the settles that raced the last read;
//! * a request settled in the ledger just before the read and in Redis just after the seed is
//!   counted twice (the ledger row is written before the counters). This errs toward refusing.
//! * holds are not in the ledger: holds lost with a flush stop counting until their requests
//!   settle (which then adds their actual usage).
//!
//! # Holds
//!
//! A hold records the estimate on each counter and the trace id (`DUP` for a second reserve
//! under the same id). It expires after `reservation_ttl` unless refreshed: this instance's
//! open holds are refreshed by [`RedisStore::refresh_holds`] (run it every `ttl / 3`, e.g. with
//! [`spawn_hold_refresher`]), so only the holds of a dead instance are reaped. A settle or
//! release by trace id alone works for holds this instance made; for others (after a restart)
//! settle needs the limits (the journal has them) and release leaves the hold to expire.
//!
//! # Settle exactly once
//!
//! `settle_v1` leaves a marker per trace id for [`RedisOptions::settled_ttl`]; a replay inside
//! that time changes nothing. A replay of a settle that was applied longer ago than that (and
//! whose hold is gone) is counted again.

mod conn;
pub mod layout;
mod reply;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ::redis::{Script, Value};
use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use parking_lot::Mutex;

use crate::quota::memory::{CounterLoader, LOAD_ATTEMPTS};
use crate::quota::store::{
    Amounts, AppliedLimit, LimitState, QuotaError, QuotaStore, ReserveOutcome, ReserveRequest,
};
use crate::quota::window::{Counter, Window, calendar_bounds};

pub use conn::{ConnectOptions, Target, classify};
pub use layout::{PREFIX, Plan, SubjectRoots, hash_tag};
use reply::{RawState, Reply};

/// The scripts, compiled in. Each file under `lua/` is a script's body; Redis is sent
/// [`lua::source`] of it, the shared prelude followed by the body.
pub mod lua {
    /// Helpers every script may call (server time, window check, seeding reply, holds).
    pub const PRELUDE: &str = include_str!("../../../lua/prelude.lua");
    pub const RESERVE: &str = include_str!("../../../lua/reserve_v1.lua");
    pub const SETTLE: &str = include_str!("../../../lua/settle_v1.lua");
    pub const RELEASE: &str = include_str!("../../../lua/release_v1.lua");
    pub const USAGE: &str = include_str!("../../../lua/usage_v1.lua");
    pub const SEED: &str = include_str!("../../../lua/seed_v1.lua");
    pub const TOUCH: &str = include_str!("../../../lua/touch_v1.lua");
    pub const FORGET: &str = include_str!("../../../lua/forget_v1.lua");
    pub const HEARTBEAT: &str = include_str!("../../../lua/heartbeat_v1.lua");

    /// The script Redis runs for `body`: the prelude, then the body, so the SHA that EVALSHA
    /// names covers both.
    pub fn source(body: &str) -> String {
        let mut s = String::with_capacity(PRELUDE.len() + 1 + body.len());
        s.push_str(PRELUDE);
        s.push('\n');
        s.push_str(body);
        s
    }
}

/// Round trips one verb may take: clock correction, seeding, and the call itself.
const MAX_ROUNDS: usize = 6;

/// Settings of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Aligns calendar windows (`[quota].timezone`).
    pub timezone: Tz,
    /// A hold not refreshed for this long is reaped (`[quota].reservation_ttl`).
    pub reservation_ttl: Duration,
    /// How long a settle is remembered, so that a replay does not count twice.
    pub settled_ttl: Duration,
    pub connect: ConnectOptions,
}

impl RedisOptions {
    /// Defaults: settles remembered for max(1 h, 2 × `reservation_ttl`); the connection
    /// timeouts of [`ConnectOptions::default`].
    pub fn new(timezone: Tz, reservation_ttl: Duration) -> RedisOptions {
        RedisOptions {
            timezone,
            reservation_ttl,
            settled_ttl: (reservation_ttl * 2).max(Duration::from_secs(3600)),
            connect: ConnectOptions::default(),
        }
    }
}

struct Scripts {
    reserve: Script,
    settle: Script,
    release: Script,
    usage: Script,
    seed: Script,
    touch: Script,
    forget: Script,
    heartbeat: Script,
}

pub struct RedisStore {
    conn: conn::Conn,
    opts: RedisOptions,
    loader: Option<Arc<dyn CounterLoader>>,
    roots: Option<Arc<dyn SubjectRoots>>,
    scripts: Scripts,
    /// Holds this instance made and has not settled or released, by trace id.
    holds: Mutex<HashMap<String, Plan>>,
    /// Server clock minus this clock, in ms, as of the last reply.
    offset_ms: AtomicI64,
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

impl RedisStore {
    /// Connect to `url` (`redis://…` or `redis+cluster://h1,h2,…`, see [`Target`]).
    /// `loader` seeds counters missing in Redis (from the ledger); `None` seeds them empty.
    pub async fn connect(
        url: &str,
        opts: RedisOptions,
        loader: Option<Arc<dyn CounterLoader>>,
    ) -> Result<RedisStore, QuotaError> {
        let target = Target::parse(url)?;
        let conn = conn::Conn::open(&target, &opts.connect).await?;
        Ok(RedisStore {
            conn,
            opts,
            loader,
            roots: None,
            scripts: Scripts {
                reserve: Script::new(&lua::source(lua::RESERVE)),
                settle: Script::new(&lua::source(lua::SETTLE)),
                release: Script::new(&lua::source(lua::RELEASE)),
                usage: Script::new(&lua::source(lua::USAGE)),
                seed: Script::new(&lua::source(lua::SEED)),
                touch: Script::new(&lua::source(lua::TOUCH)),
                forget: Script::new(&lua::source(lua::FORGET)),
                heartbeat: Script::new(&lua::source(lua::HEARTBEAT)),
            },
            holds: Mutex::new(HashMap::new()),
            offset_ms: AtomicI64::new(0),
        })
    }

    /// Resolve hash tags from the principal's widest subject (see [`layout`]).
    pub fn with_subject_roots(mut self, roots: Arc<dyn SubjectRoots>) -> RedisStore {
        self.roots = Some(roots);
        self
    }

    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// The hash tag the counters of these limits live under (`trace` names the hold of a
    /// request without limits).
    pub fn tag_for(&self, limits: &[AppliedLimit], trace: &str) -> String {
        match layout::widest_subject(limits) {
            Some(s) => match &self.roots {
                Some(r) => layout::subject_tag(&r.root_of(s)),
                None => layout::subject_tag(s),
            },
            None => format!("h:{trace}"),
        }
    }

    /// Extend every hold this instance has open to a full `reservation_ttl` from now, so a
    /// request running longer than the TTL keeps its hold. Returns how many were refreshed;
    /// holds found gone (reaped while Redis was unreachable) are forgotten.
    pub async fn refresh_holds(&self) -> Result<usize, QuotaError> {
        let open: Vec<(String, Plan)> = self
            .holds
            .lock()
            .iter()
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        let mut refreshed = 0;
        for (trace, plan) in open {
            let mut inv = self.scripts.touch.prepare_invoke();
            for k in plan.keys(&trace) {
                inv.key(k);
            }
            inv.arg(&trace)
                .arg(ms(self.opts.reservation_ttl))
                .arg(plan.counters.len());
            let r = self.call(&inv).await?;
            if r.status == "GONE" {
                self.holds.lock().remove(&trace);
            } else {
                refreshed += 1;
            }
        }
        Ok(refreshed)
    }

    async fn call(&self, inv: &::redis::ScriptInvocation<'_>) -> Result<Reply, QuotaError> {
        let v = self
            .conn
            .invoke(inv, self.opts.connect.call_timeout)
            .await?;
        let r = reply::parse(v)?;
        self.offset_ms
            .store(r.now_ms - Utc::now().timestamp_millis(), Ordering::Relaxed);
        Ok(r)
    }

    /// This clock corrected by the offset of the server's clock seen last.
    fn server_now(&self) -> DateTime<Utc> {
        Utc::now() + TimeDelta::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    fn rebuild(&self, window: Window, raw: &RawState, now: DateTime<Utc>) -> Counter {
        let mut c = Counter::new(window, self.opts.timezone);
        match window {
            Window::Rolling(r) => {
                for (idx, amount) in &raw.buckets {
                    if let Some(at) = r.bucket_start(*idx) {
                        c.add(at, *amount, now);
                    }
                }
            }
            Window::Calendar(_) | Window::Total => {
                c.add(now, raw.used, now);
            }
        }
        c
    }

    fn states(&self, plan: &Plan, raw: &[RawState], now: DateTime<Utc>) -> Vec<LimitState> {
        plan.limits
            .iter()
            .zip(&plan.limit_counter)
            .filter_map(|(l, i)| {
                let r = raw.get(*i)?;
                let c = self.rebuild(l.spec.window, r, now);
                Some(LimitState {
                    limit: l.clone(),
                    used: c.used(now),
                    reserved: r.reserved,
                    window_start: c.window_start(now),
                    resets_at: c.resets_at(now),
                })
            })
            .collect()
    }

    /// Load the `missing` counters of `plan` and write them where still missing.
    async fn seed(
        &self,
        plan: &Plan,
        missing: &[usize],
        mut seq: i64,
        now: DateTime<Utc>,
    ) -> Result<(), QuotaError> {
        let tz = self.opts.timezone;
        for attempt in 0..=LOAD_ATTEMPTS {
            let force = attempt == LOAD_ATTEMPTS || self.loader.is_none();
            let mut inv = self.scripts.seed.prepare_invoke();
            inv.key(plan.seq_key());
            inv.arg(missing.len())
                .arg(seq)
                .arg(if force { "1" } else { "0" });
            for &i in missing {
                let Some(l) = plan.counters.get(i) else {
                    return Err(QuotaError::Other(format!("no counter {i} to seed")));
                };
                let mut c = Counter::new(l.spec.window, tz);
                if let Some(loader) = &self.loader {
                    loader.load(l, &mut c, now).await?;
                }
                inv.key(plan.data_key(i));
                match l.spec.window {
                    Window::Calendar(unit) => {
                        let (start, end) = calendar_bounds(unit, now, tz);
                        inv.arg("c")
                            .arg(start.timestamp())
                            .arg(end.timestamp())
                            .arg(c.used(now));
                    }
                    Window::Rolling(r) => {
                        let buckets = c.counted_buckets(now);
                        inv.arg("r").arg(r.bucket_secs()).arg(buckets.len());
                        for (idx, amount) in buckets {
                            inv.arg(idx).arg(amount);
                        }
                    }
                    Window::Total => {
                        inv.arg("t").arg(c.used(now));
                    }
                }
            }
            let r = self.call(&inv).await?;
            match r.status.as_str() {
                "OK" => return Ok(()),
                "RETRY" => {
                    seq = r.rest.first().map(reply::int).transpose()?.unwrap_or(seq);
                }
                other => {
                    return Err(QuotaError::Other(format!("seed answered {other}")));
                }
            }
        }
        Ok(())
    }

    /// Common handling of `TIME` and `SEED` answers; `Ok(None)` means "call again".
    async fn retry_round(&self, plan: &Plan, r: Reply) -> Result<Option<Reply>, QuotaError> {
        match r.status.as_str() {
            "TIME" => Ok(None),
            "SEED" => {
                let seq = r.rest.first().map(reply::int).transpose()?.unwrap_or(0);
                let missing = r
                    .rest
                    .iter()
                    .skip(1)
                    .map(|v| reply::index(v, plan.counters.len()))
                    .collect::<Result<Vec<_>, _>>()?;
                self.seed(plan, &missing, seq, r.now).await?;
                Ok(None)
            }
            _ => Ok(Some(r)),
        }
    }

    /// Drop the hold of `trace_id` on the counters of `plan` (release_v1, idempotent).
    async fn release_plan(&self, trace_id: &str, plan: &Plan) -> Result<(), QuotaError> {
        let mut inv = self.scripts.release.prepare_invoke();
        for k in plan.keys(trace_id) {
            inv.key(k);
        }
        inv.arg(trace_id).arg(plan.counters.len());
        self.call(&inv).await?;
        self.holds.lock().remove(trace_id);
        Ok(())
    }

    async fn settle_plan(
        &self,
        trace_id: &str,
        plan: &Plan,
        actual: Amounts,
        started_at: DateTime<Utc>,
    ) -> Result<(), QuotaError> {
        for _ in 0..MAX_ROUNDS {
            let mut inv = self.scripts.settle.prepare_invoke();
            for k in plan.keys(trace_id) {
                inv.key(k);
            }
            inv.arg(trace_id)
                .arg(ms(self.opts.settled_ttl))
                .arg(plan.counters.len())
                .arg(started_at.timestamp_millis());
            for a in plan.counter_args(self.server_now(), self.opts.timezone, actual) {
                inv.arg(a);
            }
            let r = self.call(&inv).await?;
            match r.status.as_str() {
                "OK" | "DONE" => return Ok(()),
                "TIME" => continue,
                other => return Err(QuotaError::Other(format!("settle answered {other}"))),
            }
        }
        Err(QuotaError::Other(format!(
            "settle of {trace_id} did not complete in {MAX_ROUNDS} rounds"
        )))
    }
}

#[async_trait::async_trait]
impl QuotaStore for RedisStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, QuotaError> {
        let plan = Plan::new(self.tag_for(&req.limits, &req.trace_id), &req.limits);
        for _ in 0..MAX_ROUNDS {
            let mut inv = self.scripts.reserve.prepare_invoke();
            for k in plan.keys(&req.trace_id) {
                inv.key(k);
            }
            inv.arg(&req.trace_id)
                .arg(ms(self.opts.reservation_ttl))
                .arg(plan.counters.len())
                .arg(plan.limits.len());
            for a in plan.counter_args(self.server_now(), self.opts.timezone, req.estimate) {
                inv.arg(a);
            }
            for (l, i) in plan.limits.iter().zip(&plan.limit_counter) {
                inv.arg(i + 1).arg(l.spec.value);
            }
            let r = self.call(&inv).await?;
            let Some(r) = self.retry_round(&plan, r).await? else {
                continue;
            };
            let limit_at = |v: Option<&Value>| -> Result<usize, QuotaError> {
                v.map(|v| reply::index(v, plan.limits.len()))
                    .unwrap_or_else(|| Err(QuotaError::Other("missing limit index".into())))
            };
            return match r.status.as_str() {
                "DUP" => Ok(ReserveOutcome::Duplicate),
                "DISABLED" => {
                    let j = limit_at(r.rest.first())?;
                    Ok(ReserveOutcome::Disabled(plan.limits[j].clone()))
                }
                "EXCEEDED" => {
                    let j = limit_at(r.rest.first())?;
                    let raw = r
                        .rest
                        .get(1)
                        .map(reply::states)
                        .transpose()?
                        .unwrap_or_default();
                    let l = &plan.limits[j];
                    let state = raw.get(plan.limit_counter[j]).cloned().unwrap_or_default();
                    let c = self.rebuild(l.spec.window, &state, r.now);
                    let have = c.used(r.now).saturating_add(state.reserved);
                    let retry_after =
                        c.retry_after(r.now, have, req.estimate.for_spec(&l.spec), l.spec.value);
                    Ok(ReserveOutcome::Exceeded {
                        limit: l.clone(),
                        retry_after,
                    })
                }
                "OK" => {
                    let raw = r
                        .rest
                        .first()
                        .map(reply::states)
                        .transpose()?
                        .unwrap_or_default();
                    let states = self.states(&plan, &raw, r.now);
                    self.holds.lock().insert(req.trace_id.clone(), plan);
                    Ok(ReserveOutcome::Admitted(states))
                }
                other => Err(QuotaError::Other(format!("reserve answered {other}"))),
            };
        }
        Err(QuotaError::Other(format!(
            "reserve of {} did not complete in {MAX_ROUNDS} rounds",
            req.trace_id
        )))
    }

    async fn settle(
        &self,
        trace_id: &str,
        actual: Amounts,
        started_at: DateTime<Utc>,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        let known = self.holds.lock().get(trace_id).cloned();
        let plan = match known {
            Some(p) => p,
            None => Plan::new(self.tag_for(limits, trace_id), limits),
        };
        self.settle_plan(trace_id, &plan, actual, started_at)
            .await?;
        self.holds.lock().remove(trace_id);
        Ok(())
    }

    async fn release(&self, trace_id: &str) -> Result<(), QuotaError> {
        let Some(plan) = self.holds.lock().get(trace_id).cloned() else {
            // Not held by this instance (or already released): a hold of a previous process
            // expires by its TTL, or goes with the journal's replay of the release.
            return Ok(());
        };
        self.release_plan(trace_id, &plan).await
    }

    async fn replay_release(
        &self,
        trace_id: &str,
        limits: &[AppliedLimit],
    ) -> Result<(), QuotaError> {
        let known = self.holds.lock().get(trace_id).cloned();
        let plan = match known {
            Some(p) => p,
            None => Plan::new(self.tag_for(limits, trace_id), limits),
        };
        self.release_plan(trace_id, &plan).await
    }

    async fn ping(&self) -> Result<(), QuotaError> {
        self.conn.ping(self.opts.connect.call_timeout).await
    }

    async fn heartbeat(
        &self,
        instance: &str,
        nonce: &str,
        behind: bool,
    ) -> Result<Option<crate::quota::fleet::Heartbeat>, QuotaError> {
        use crate::quota::fleet::{BEAT_EVERY, FLEET_KEY, FORGET_AFTER};
        let mut inv = self.scripts.heartbeat.prepare_invoke();
        inv.key(FLEET_KEY)
            .arg(instance)
            .arg(if behind { "1" } else { "0" })
            .arg(FORGET_AFTER.as_millis() as u64)
            .arg(nonce)
            .arg((BEAT_EVERY * 3).as_millis() as u64);
        let r = self.call(&inv).await?;
        if r.status != "OK" {
            return Err(QuotaError::Other(format!(
                "heartbeat answered {}",
                r.status
            )));
        }
        let items = match r.rest.first() {
            Some(Value::Array(items)) => items.clone(),
            _ => Vec::new(),
        };
        let mut peers = Vec::with_capacity(items.len() / 3);
        for p in items.chunks(3) {
            let [id, age, behind] = p else {
                return Err(QuotaError::Other(
                    "heartbeat reply has the wrong length".into(),
                ));
            };
            let id = match id {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                _ => {
                    return Err(QuotaError::Other(
                        "heartbeat reply: id is not a string".into(),
                    ));
                }
            };
            peers.push(crate::quota::fleet::Peer {
                id,
                age: Duration::from_millis(u64::try_from(reply::int(age)?).unwrap_or(0)),
                behind: reply::int(behind)? != 0,
            });
        }
        let twin = r.rest.get(1).map(reply::int).transpose()?.unwrap_or(0) != 0;
        Ok(Some(crate::quota::fleet::Heartbeat { peers, twin }))
    }

    fn adopt(&self, req: &ReserveRequest) {
        let plan = Plan::new(self.tag_for(&req.limits, &req.trace_id), &req.limits);
        self.holds.lock().insert(req.trace_id.clone(), plan);
    }

    /// No longer refresh `trace_id`'s hold: it expires after `reservation_ttl` unless a
    /// replayed settle moves it to used first.
    fn forget(&self, trace_id: &str) {
        self.holds.lock().remove(trace_id);
    }

    /// Drop the counters of `limits` in Redis; the next use reseeds each from the ledger.
    async fn rebuild(&self, limits: &[AppliedLimit]) -> Result<(), QuotaError> {
        if limits.is_empty() {
            return Ok(());
        }
        let plan = Plan::new(self.tag_for(limits, ""), limits);
        let mut inv = self.scripts.forget.prepare_invoke();
        inv.key(plan.seq_key());
        for i in 0..plan.counters.len() {
            inv.key(plan.data_key(i));
        }
        self.conn
            .invoke(&inv, self.opts.connect.call_timeout)
            .await?;
        Ok(())
    }

    async fn usage(&self, limits: &[AppliedLimit]) -> Result<Vec<LimitState>, QuotaError> {
        if limits.is_empty() {
            return Ok(Vec::new());
        }
        let plan = Plan::new(self.tag_for(limits, ""), limits);
        for _ in 0..MAX_ROUNDS {
            let mut inv = self.scripts.usage.prepare_invoke();
            for k in plan.keys("") {
                inv.key(k);
            }
            inv.arg(plan.counters.len());
            for a in plan.counter_args(self.server_now(), self.opts.timezone, Amounts::default()) {
                inv.arg(a);
            }
            let r = self.call(&inv).await?;
            let Some(r) = self.retry_round(&plan, r).await? else {
                continue;
            };
            if r.status != "OK" {
                return Err(QuotaError::Other(format!("usage answered {}", r.status)));
            }
            let raw = r
                .rest
                .first()
                .map(reply::states)
                .transpose()?
                .unwrap_or_default();
            return Ok(self.states(&plan, &raw, r.now));
        }
        Err(QuotaError::Other(format!(
            "usage did not complete in {MAX_ROUNDS} rounds"
        )))
    }

    fn open_holds(&self) -> usize {
        self.holds.lock().len()
    }
}

/// Refresh `store`'s open holds every `reservation_ttl / 3` until the store is dropped.
/// Failures are logged and retried on the next tick (holds survive two missed ticks).
pub fn spawn_hold_refresher(store: &Arc<RedisStore>) -> tokio::task::JoinHandle<()> {
    let weak: Weak<RedisStore> = Arc::downgrade(store);
    let every = (store.opts.reservation_ttl / 3).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade() else { return };
            if let Err(e) = store.refresh_holds().await {
                tracing::warn!(error = %e, "refreshing quota holds failed");
            }
        }
    })
}
