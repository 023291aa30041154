//! The fleet: the instances that enforce the same limits on one shared store (Redis).
//!
//! Every instance heartbeats into the shared store ([`QuotaStore::heartbeat`], every
//! [`BEAT_EVERY`] while the store answers) with whether it is *behind*: it has journaled
//! counter changes the shared counters have not had applied, or that have not reached the
//! ledger of record, for longer than the normal lag. From the answers each instance keeps
//! its own view, used for two decisions (SPEC §5):
//!
//! - **the local-mode share.** While the shared store is down, an instance enforcing with
//!   its own counters admits at most `remaining / live` of each limit, where `live` is the
//!   number of instances heard from within [`LIVE_FOR`] the last time the store answered
//!   (this one included). N instances then stay within the cap between them, up to the
//!   bounds docs/architecture.md lists.
//! - **no refill before the backlogs are in.** A counter missing in the shared store
//!   (flushed, evicted, restarted empty) is seeded from the ledger of record plus this
//!   instance's journal. While another instance is behind, that ledger lacks its backlog,
//!   and its applier would then add the same events on top of a seed that already counts
//!   the ones that shipped; so the seed waits ([`Fleet::waiting_on`]) until every
//!   remembered instance has said it is not behind — or has been silent for
//!   [`FORGET_AFTER`] while this instance was in contact (it is gone; its backlog comes
//!   back with it, and `reconcile --fix` repairs what an instance that never returns
//!   leaves).
//!
//! A peer that has not been heard from for [`STALE_AFTER`] may be in the same outage this
//! instance just came out of, with a backlog it could not report: it counts as behind.
//!
//! [`QuotaStore::heartbeat`]: crate::quota::store::QuotaStore::heartbeat

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::quota::memory::CounterLoader;
use crate::quota::store::{AppliedLimit, QuotaError};
use crate::quota::window::Counter;

/// The shared store's key of the fleet hash.
/// (Under [`crate::quota::redis::PREFIX`]; the tests hold the two together.)
pub const FLEET_KEY: &str = "tg:v1:fleet";

/// How often an instance heartbeats while the shared store answers.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// An instance heard from within this long counts in the local-mode share.
pub const LIVE_FOR: Duration = Duration::from_secs(10);
/// An instance not heard from for this long may hold a backlog it could not report.
pub const STALE_AFTER: Duration = Duration::from_secs(3);
/// An instance silent for this long, while this one was in contact, is gone.
pub const FORGET_AFTER: Duration = Duration::from_secs(30);
/// How long a rebuild at start waits for the journal's first replay into Redis.
pub const STARTUP_REPLAY_WAIT: Duration = Duration::from_secs(3);

/// One instance as the shared store remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    /// Since its last heartbeat, by the store's clock.
    pub age: Duration,
    /// It said it has a backlog the shared counters or the ledger of record lack.
    pub behind: bool,
}

/// What one heartbeat learnt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    pub peers: Vec<Peer>,
    /// Another process heartbeats under this instance's id (a duplicated
    /// `server.instance_id`).
    pub twin: bool,
}

struct Heard {
    at: Instant,
    behind: bool,
}

#[derive(Default)]
struct View {
    last_beat: Option<Instant>,
    /// Since when this instance has been in contact with the store without a break.
    contact_since: Option<Instant>,
    /// This instance lost contact with the store (an outage, or it started while the store
    /// was unreachable): peers silent since may be replaying that outage's backlog.
    lost: bool,
    /// The store answered a heartbeat in this run.
    heard: bool,
    peers: HashMap<String, Heard>,
    /// Instances heard from within [`LIVE_FOR`] at the last answer (this one included).
    live: usize,
}

/// This instance's view of the fleet.
pub struct Fleet {
    me: String,
    /// Tells this process's heartbeats from another process's under the same id.
    nonce: String,
    view: Mutex<View>,
    /// This instance's own journal has changes Redis lacks (replay pending): its own
    /// rebuilds wait too, or the replay would land on a seed that counts them.
    self_behind: std::sync::atomic::AtomicBool,
    /// The journal's first replay into Redis is done (what a previous run left
    /// unapplied, and the settles of its recovery, are in Redis).
    started: tokio::sync::watch::Sender<bool>,
    /// Told every new `live` count (to keep it for the next start).
    on_live: std::sync::OnceLock<Box<dyn Fn(usize) + Send + Sync>>,
}

impl Fleet {
    pub fn new(me: impl Into<String>) -> Fleet {
        Fleet {
            me: me.into(),
            nonce: uuid::Uuid::now_v7().simple().to_string(),
            view: Mutex::new(View {
                live: 1,
                ..View::default()
            }),
            self_behind: std::sync::atomic::AtomicBool::new(false),
            started: tokio::sync::watch::Sender::new(false),
            on_live: std::sync::OnceLock::new(),
        }
    }

    /// Call `f` with every new `live` count.
    pub fn on_live(&self, f: impl Fn(usize) + Send + Sync + 'static) {
        let _ = self.on_live.set(Box::new(f));
    }

    /// Start from the `live` count a previous run last heard (kept in the journal), so a
    /// process started during an outage does not take the whole remainder.
    pub fn with_last_live(self, live: usize) -> Fleet {
        self.view.lock().live = live.max(1);
        self
    }

    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// Record whether this instance's own journal waits to be applied to Redis.
    pub fn set_self_behind(&self, behind: bool) {
        self.self_behind
            .store(behind, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn self_behind(&self) -> bool {
        self.self_behind.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The journal's first replay into Redis is done.
    pub fn mark_started(&self) {
        self.started
            .send_if_modified(|s| !std::mem::replace(s, true));
    }

    /// Wait (at most `limit`) for the journal's first replay into Redis; whether it is done.
    pub async fn wait_started(&self, limit: Duration) -> bool {
        let mut rx = self.started.subscribe();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Whether a heartbeat is due.
    pub fn due(&self) -> bool {
        self.view
            .lock()
            .last_beat
            .is_none_or(|t| t.elapsed() >= BEAT_EVERY)
    }

    /// Record an answer of the shared store.
    pub fn observe(&self, peers: &[Peer], twin: bool) {
        let before = self.live();
        self.observe_at(peers, Instant::now());
        if twin {
            // Another process heartbeats under this instance's id: it counts too, or each
            // twin would take the whole share.
            self.view.lock().live += 1;
        }
        let now = self.live();
        if now != before
            && let Some(f) = self.on_live.get()
        {
            f(now);
        }
    }

    fn observe_at(&self, peers: &[Peer], now: Instant) {
        let mut v = self.view.lock();
        v.heard = true;
        v.last_beat = Some(now);
        v.contact_since.get_or_insert(now);
        for p in peers.iter().filter(|p| p.id != self.me) {
            let at = now.checked_sub(p.age).unwrap_or(now);
            let e = v.peers.entry(p.id.clone()).or_insert(Heard {
                at,
                behind: p.behind,
            });
            if at >= e.at {
                e.at = at;
                e.behind = p.behind;
            }
        }
        let since = v.contact_since.unwrap_or(now);
        v.peers
            .retain(|_, h| now.duration_since(h.at.max(since)) < FORGET_AFTER);
        // From this instance's view, not this one answer: a store that lost its fleet
        // hash (restarted empty) answers with this instance alone at first.
        v.live = 1 + v
            .peers
            .values()
            .filter(|h| now.duration_since(h.at) <= LIVE_FOR)
            .count();
        if v.lost && now.duration_since(since) >= FORGET_AFTER {
            v.lost = false;
        }
    }

    /// The shared store did not answer: contact is broken until the next answer.
    pub fn lost_contact(&self) {
        let mut v = self.view.lock();
        v.contact_since = None;
        v.last_beat = None;
        v.lost = true;
    }

    /// Whether the store answered a heartbeat in this run.
    pub fn heard(&self) -> bool {
        self.view.lock().heard
    }

    /// Instances that counted in the share the last time the store answered (≥ 1).
    pub fn live(&self) -> usize {
        self.view.lock().live.max(1)
    }

    /// The other instances a seed of a missing shared counter must wait for: behind, or
    /// silent for [`STALE_AFTER`] but not yet for [`FORGET_AFTER`] of this instance's
    /// contact.
    pub fn waiting_on(&self) -> Vec<String> {
        self.waiting_on_at(Instant::now())
    }

    fn waiting_on_at(&self, now: Instant) -> Vec<String> {
        let v = self.view.lock();
        let since = v.contact_since.unwrap_or(now);
        // Silence matters only after this instance lost contact itself: then a silent peer
        // may be in the same outage, with a backlog it cannot report. A peer that falls
        // silent while this instance is in contact (stopped, redeployed) holds nothing
        // back: what it left unapplied comes back with it.
        let recovering = v.lost;
        let mut out: Vec<String> = v
            .peers
            .iter()
            .filter(|(_, h)| {
                let silent = now.duration_since(h.at);
                let gone = now.duration_since(h.at.max(since)) >= FORGET_AFTER;
                !gone && (h.behind || (recovering && silent >= STALE_AFTER))
            })
            .map(|(id, _)| id.clone())
            .collect();
        out.sort();
        out
    }
}

/// Seeds of shared counters wait for the fleet: a [`CounterLoader`] that refuses
/// (`Deferred`: this request is decided by the local counters, Redis stays in force) while
/// this instance's own journal or another instance's may hold changes the ledger and the
/// counters lack ([`Fleet::waiting_on`]), and otherwise loads through `inner`.
pub struct FleetGate {
    pub inner: Arc<dyn CounterLoader>,
    pub fleet: Arc<Fleet>,
}

#[async_trait::async_trait]
impl CounterLoader for FleetGate {
    async fn load(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), QuotaError> {
        // A rebuild right after start would count this instance's unapplied settles
        // (from its journal) and then see the replay add them again.
        if !self.fleet.wait_started(STARTUP_REPLAY_WAIT).await || self.fleet.self_behind() {
            return Err(QuotaError::Deferred(
                "counter not rebuilt yet: this instance's journal is still being applied to the shared counters".into(),
            ));
        }
        let waiting = self.fleet.waiting_on();
        if !waiting.is_empty() {
            return Err(QuotaError::Deferred(format!(
                "counter not rebuilt yet: waiting for {} other instance(s) to bring their journal backlog to the shared counters and the ledger",
                waiting.len()
            )));
        }
        self.inner.load(limit, counter, now).await
    }
}

/// The local counters' loader: the ledger of record (never below what Redis last
/// reported; nothing known → refused), except on an instance that last heard of no other
/// (`live` = 1): its own journal is then the whole fleet's usage (bounded by the journal's
/// retention), and refusing would stop a lone instance whose Postgres and Redis are both
/// down for no one else's sake.
pub struct AloneOrNotBelow {
    pub not_below: Arc<dyn CounterLoader>,
    pub journal: Arc<dyn CounterLoader>,
    pub fleet: Arc<Fleet>,
    /// What the journal said at start: its last fleet size was 1, or (never recorded) it
    /// holds a history this instance made on its own. A fresh journal knows nothing: not
    /// alone, so its counters are refused rather than started from zero.
    pub alone_at_start: bool,
}

#[async_trait::async_trait]
impl CounterLoader for AloneOrNotBelow {
    async fn load(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), QuotaError> {
        let mut c = counter.clone();
        match self.not_below.load(limit, &mut c, now).await {
            Ok(()) => {
                *counter = c;
                Ok(())
            }
            Err(_) if self.fleet.live() <= 1 && (self.fleet.heard() || self.alone_at_start) => {
                self.journal.load(limit, counter, now).await
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::redis::PREFIX;

    fn peer(id: &str, age_ms: u64, behind: bool) -> Peer {
        Peer {
            id: id.into(),
            age: Duration::from_millis(age_ms),
            behind,
        }
    }

    #[test]
    fn the_key_lives_under_the_store_prefix() {
        assert_eq!(FLEET_KEY, format!("{PREFIX}fleet"));
    }

    #[test]
    fn live_counts_recent_instances_and_itself() {
        let f = Fleet::new("a");
        assert_eq!(f.live(), 1);
        f.observe(
            &[
                peer("a", 0, false),
                peer("b", 500, false),
                peer("c", 9_000, false),
                peer("d", 12_000, false),
            ],
            false,
        );
        assert_eq!(f.live(), 3, "a, b and c; d is older than LIVE_FOR");
    }

    #[test]
    fn seeds_wait_for_peers_behind_or_silent() {
        let f = Fleet::new("a");
        f.observe(&[peer("a", 0, false), peer("b", 100, false)], false);
        assert!(f.waiting_on().is_empty());
        f.observe(&[peer("a", 0, false), peer("b", 100, true)], false);
        assert_eq!(f.waiting_on(), vec!["b".to_string()]);
        // Silent past STALE_AFTER: may be in the outage this instance came out of.
        f.observe(&[peer("a", 0, false), peer("b", 4_000, false)], false);
        assert_eq!(f.waiting_on(), vec!["b".to_string()]);
        f.observe(&[peer("a", 0, false), peer("b", 50, false)], false);
        assert!(f.waiting_on().is_empty());
    }

    #[test]
    fn a_peer_that_falls_silent_while_in_contact_holds_nothing_back() {
        let f = Fleet::new("a");
        let t0 = Instant::now();
        f.observe_at(&[peer("b", 0, false)], t0);
        // b stopped (a deploy) while a kept its contact: nothing to wait for.
        let later = t0 + Duration::from_secs(10);
        f.observe_at(&[peer("a", 0, false)], later);
        assert!(f.waiting_on_at(later).is_empty());
        assert_eq!(f.live(), 2, "b was heard within LIVE_FOR");
        // The store restarted empty: a counts b from its own view.
        let f = Fleet::new("a");
        f.observe_at(&[peer("b", 0, false)], t0);
        f.lost_contact();
        f.observe_at(&[peer("a", 0, false)], t0 + Duration::from_secs(1));
        assert_eq!(f.live(), 2);
    }

    #[test]
    fn an_older_answer_never_overrides_a_newer_one() {
        let f = Fleet::new("a");
        f.observe(&[peer("b", 0, true)], false);
        // A reply that reports b older than already heard (it went quiet since) keeps
        // what is newest.
        f.observe(&[peer("b", 2_000, false)], false);
        assert_eq!(f.waiting_on(), vec!["b".to_string()]);
    }

    #[test]
    fn a_peer_missing_from_the_store_is_waited_for_until_forgotten() {
        let f = Fleet::new("a");
        let t0 = Instant::now();
        f.observe_at(&[peer("b", 0, false)], t0);
        // An outage of 20 s; the store comes back empty: b is not in its answer, and may
        // be replaying the backlog of that outage.
        f.lost_contact();
        let back = t0 + Duration::from_secs(20);
        f.observe_at(&[peer("a", 0, false)], back);
        assert_eq!(f.live(), 1);
        assert_eq!(f.waiting_on_at(back), vec!["b".to_string()]);
        // Still silent FORGET_AFTER into the contact: gone.
        let later = back + FORGET_AFTER;
        f.observe_at(&[peer("a", 0, false)], later);
        assert!(f.waiting_on_at(later).is_empty());
        // b heard from again right after coming back: waited for no more.
        let f = Fleet::new("a");
        f.observe_at(&[peer("b", 0, false)], t0);
        f.lost_contact();
        f.observe_at(&[peer("a", 0, false), peer("b", 10, false)], back);
        assert!(f.waiting_on_at(back).is_empty());
    }

    /// A loader that fails, or adds `n` to the counter.
    struct Stub(Option<i64>);

    #[async_trait::async_trait]
    impl CounterLoader for Stub {
        async fn load(
            &self,
            _limit: &AppliedLimit,
            counter: &mut Counter,
            now: DateTime<Utc>,
        ) -> Result<(), QuotaError> {
            match self.0 {
                Some(n) => {
                    counter.add(now, n, now);
                    Ok(())
                }
                None => Err(QuotaError::Other("ledger unreachable".into())),
            }
        }
    }

    /// With the ledger of record unreachable, only an instance that knows it is alone takes
    /// its journal as the fleet's usage: a fresh journal, or one that heard of others,
    /// refuses.
    #[tokio::test]
    async fn only_a_known_lone_instance_rebuilds_from_its_journal() {
        use std::str::FromStr;
        let limit = AppliedLimit {
            subject: crate::quota::Subject::Key("k_1".into()),
            spec: crate::quota::LimitSpec::from_str("requests:total=10").unwrap(),
            plan: None,
        };
        let load = |fleet: Arc<Fleet>, alone_at_start: bool| {
            let l = AloneOrNotBelow {
                not_below: Arc::new(Stub(None)),
                journal: Arc::new(Stub(Some(3))),
                fleet,
                alone_at_start,
            };
            let limit = limit.clone();
            async move {
                let now = Utc::now();
                let mut c = Counter::new(limit.spec.window, chrono_tz::UTC);
                l.load(&limit, &mut c, now).await.map(|()| c.used(now))
            }
        };
        // Fresh journal, never heard from Redis: refused.
        assert!(load(Arc::new(Fleet::new("a")), false).await.is_err());
        // A history made alone (or a recorded fleet of 1): the journal.
        assert_eq!(load(Arc::new(Fleet::new("a")), true).await.unwrap(), 3);
        // Heard of another instance this run: refused, whatever the journal says.
        let f = Arc::new(Fleet::new("a"));
        f.observe(&[peer("b", 0, false)], false);
        assert!(load(f, true).await.is_err());
        // Heard, and alone: the journal.
        let f = Arc::new(Fleet::new("a"));
        f.observe(&[peer("a", 0, false)], false);
        assert_eq!(load(f, false).await.unwrap(), 3);
    }
}
