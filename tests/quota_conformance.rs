//! One quota conformance suite, run against every `QuotaStore` backend: the in-process
//! `MemoryStore`, the `RedisStore` on a private single node, and the `RedisStore` on a private
//! 3-node Redis Cluster. Redis-only behaviour (flush and reseed, NOSCRIPT, hold expiry, an
//! unreachable server) follows the suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use parking_lot::Mutex;

use common::redis::{RedisCluster, RedisServer};
use tollgate::keys::Subject;
use tollgate::quota::limit::LimitSpec;
use tollgate::quota::memory::{CounterLoader, MemoryStore};
use tollgate::quota::redis::{RedisOptions, RedisStore};
use tollgate::quota::store::{
    Amounts, AppliedLimit, QuotaError, QuotaStore, ReserveOutcome, ReserveRequest,
};
use tollgate::quota::window::{CalendarUnit, Counter, calendar_bounds};

/// Calendar windows are aligned in a zone with DST, to exercise the bounds passed to Lua.
const TZ: Tz = chrono_tz::America::New_York;

// ---------------------------------------------------------------------------------------
// Backends

enum Backend {
    Memory,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    fn redis() -> Backend {
        Backend::Redis(RedisServer::start())
    }

    async fn store_with(
        &self,
        loader: Option<Arc<dyn CounterLoader>>,
        ttl: Duration,
    ) -> Arc<dyn QuotaStore> {
        match self {
            Backend::Memory => Arc::new(MemoryStore::new(TZ, loader)),
            Backend::Redis(s) => Arc::new(
                RedisStore::connect(&s.url(), RedisOptions::new(TZ, ttl), loader)
                    .await
                    .unwrap(),
            ),
            Backend::Cluster(c) => Arc::new(
                RedisStore::connect(&c.url(), RedisOptions::new(TZ, ttl), loader)
                    .await
                    .unwrap(),
            ),
        }
    }

    async fn store(&self, loader: Option<Arc<dyn CounterLoader>>) -> Arc<dyn QuotaStore> {
        self.store_with(loader, Duration::from_secs(600)).await
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// Fresh subjects for one test: a key of a user of a tenant.
struct Who {
    key: Subject,
    user: Subject,
    tenant: Subject,
}

fn who() -> Who {
    let id = uuid::Uuid::now_v7().simple().to_string();
    Who {
        key: Subject::Key(format!("k_{id}")),
        user: Subject::User(format!("u_{id}")),
        tenant: Subject::Tenant(format!("t_{id}")),
    }
}

fn lim(subject: &Subject, spec: &str) -> AppliedLimit {
    AppliedLimit {
        subject: subject.clone(),
        spec: LimitSpec::from_str(spec).unwrap(),
        plan: None,
    }
}

fn amounts(requests: i64, input: i64, output: i64, cost: i64) -> Amounts {
    Amounts {
        requests,
        input_tokens: input,
        output_tokens: output,
        cost_micros: cost,
    }
}

fn req(trace: &str, limits: &[AppliedLimit], estimate: Amounts) -> ReserveRequest {
    ReserveRequest {
        trace_id: trace.into(),
        started_at: Utc::now(),
        limits: limits.to_vec(),
        estimate,
    }
}

fn admitted(o: &ReserveOutcome) -> bool {
    matches!(o, ReserveOutcome::Admitted(_))
}

async fn used_reserved(store: &dyn QuotaStore, limits: &[AppliedLimit]) -> Vec<(i64, i64)> {
    store
        .usage(limits)
        .await
        .unwrap()
        .iter()
        .map(|s| (s.used, s.reserved))
        .collect()
}

/// Settled rows of one counter: start time and amounts.
type Rows = Vec<(DateTime<Utc>, Amounts)>;

/// A ledger stand-in: settled amounts per counter identity, with their start times.
#[derive(Default)]
struct FakeLedger {
    rows: Mutex<HashMap<String, Rows>>,
    loads: Mutex<usize>,
}

impl FakeLedger {
    fn record(&self, limit: &AppliedLimit, at: DateTime<Utc>, a: Amounts) {
        self.rows
            .lock()
            .entry(limit.counter_key())
            .or_default()
            .push((at, a));
    }
}

#[async_trait::async_trait]
impl CounterLoader for FakeLedger {
    async fn load(
        &self,
        limit: &AppliedLimit,
        counter: &mut Counter,
        now: DateTime<Utc>,
    ) -> Result<(), QuotaError> {
        *self.loads.lock() += 1;
        let rows = self.rows.lock().get(&limit.counter_key()).cloned();
        for (at, a) in rows.unwrap_or_default() {
            counter.add(at, a.for_spec(&limit.spec), now);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The suite

mod suite {
    use super::*;

    /// Key, user and tenant limits are checked together: a refusal on one holds nothing on
    /// the others.
    pub async fn all_or_nothing(b: &Backend) {
        let s = b.store(None).await;
        let w = who();
        let limits = vec![
            lim(&w.key, "requests:total=5"),
            lim(&w.user, "tokens:day=100"),
            lim(&w.tenant, "usd:total=1"),
        ];
        assert!(admitted(
            &s.reserve(&req("a", &limits, amounts(1, 40, 20, 100_000)))
                .await
                .unwrap()
        ));
        match s
            .reserve(&req("b", &limits, amounts(1, 40, 20, 100_000)))
            .await
            .unwrap()
        {
            ReserveOutcome::Exceeded { limit, retry_after } => {
                assert_eq!(limit, limits[1]);
                assert!(retry_after.is_some());
            }
            other => panic!("{other:?}"),
        }
        // The refused request held nothing on the key or the tenant.
        assert_eq!(
            used_reserved(&*s, &limits).await,
            vec![(0, 1), (0, 60), (0, 100_000)]
        );
        // A request that fits every limit still passes.
        assert!(admitted(
            &s.reserve(&req("c", &limits, amounts(1, 20, 20, 100_000)))
                .await
                .unwrap()
        ));
        assert_eq!(
            used_reserved(&*s, &limits).await,
            vec![(0, 2), (0, 100), (0, 200_000)]
        );
        assert_eq!(s.open_holds(), 2);
    }

    /// 200 concurrent requests against `requests:total=N` admit exactly N.
    pub async fn exact_under_concurrency(b: &Backend) {
        let s = b.store(None).await;
        let w = who();
        let limits = vec![
            lim(&w.key, "requests:total=37"),
            lim(&w.user, "tokens:10m=1000000"),
            lim(&w.tenant, "requests:minute=1000"),
        ];
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = s.clone();
                let l = limits.clone();
                tokio::spawn(async move {
                    s.reserve(&req(&format!("t{i}"), &l, amounts(1, 10, 20, 0)))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut n = 0;
        for t in tasks {
            let o = t.await.unwrap();
            match &o {
                ReserveOutcome::Admitted(_) => n += 1,
                ReserveOutcome::Exceeded { limit, retry_after } => {
                    assert_eq!(*limit, limits[0]);
                    assert_eq!(*retry_after, None);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(n, 37);
        assert_eq!(
            used_reserved(&*s, &limits).await,
            vec![(0, 37), (0, 37 * 30), (0, 37)]
        );
    }

    /// USD caps in micro-dollars; a lifetime cap has no retry-after.
    pub async fn usd_caps(b: &Backend) {
        let s = b.store(None).await;
        let w = who();
        let limits = vec![lim(&w.tenant, "usd:total=1.000001")];
        for i in 0..3 {
            assert!(admitted(
                &s.reserve(&req(&format!("u{i}"), &limits, amounts(1, 0, 0, 333_333)))
                    .await
                    .unwrap()
            ));
        }
        // 999_999 held; 2 more micro-dollars would pass the cap by one.
        assert_eq!(
            s.reserve(&req("u3", &limits, amounts(1, 0, 0, 3)))
                .await
                .unwrap(),
            ReserveOutcome::Exceeded {
                limit: limits[0].clone(),
                retry_after: None
            }
        );
        assert!(admitted(
            &s.reserve(&req("u4", &limits, amounts(1, 0, 0, 2)))
                .await
                .unwrap()
        ));
        assert_eq!(used_reserved(&*s, &limits).await, vec![(0, 1_000_001)]);
    }

    /// A limit of 0 refuses without holding; a held trace id is a duplicate first.
    pub async fn disabled(b: &Backend) {
        let s = b.store(None).await;
        let w = who();
        let open = vec![
            lim(&w.key, "requests:minute=5"),
            lim(&w.user, "tokens:day=100"),
        ];
        let mut limits = open.clone();
        limits.push(lim(&w.user, "usd:day=0"));
        match s
            .reserve(&req("d1", &limits, amounts(1, 1, 1, 1)))
            .await
            .unwrap()
        {
            ReserveOutcome::Disabled(l) => assert_eq!(l, limits[2]),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.open_holds(), 0);
        assert!(admitted(
            &s.reserve(&req("d2", &open, amounts(1, 1, 1, 1)))
                .await
                .unwrap()
        ));
        assert_eq!(
            s.reserve(&req("d2", &limits, amounts(1, 1, 1, 1)))
                .await
                .unwrap(),
            ReserveOutcome::Duplicate
        );
        assert_eq!(used_reserved(&*s, &open).await, vec![(0, 1), (0, 2)]);
    }

    /// Exceeded windows name the limit and say when to retry.
    pub async fn exceeded_retry_after(b: &Backend) {
        let s = b.store(None).await;
        let w = who();
        // Calendar minute: retry when the minute ends.
        let minute = vec![lim(&w.key, "requests:minute=1")];
        assert!(admitted(
            &s.reserve(&req("m1", &minute, amounts(1, 0, 0, 0)))
                .await
                .unwrap()
        ));
        let before = Utc::now();
        match s
            .reserve(&req("m2", &minute, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
        {
            ReserveOutcome::Exceeded {
                limit,
                retry_after: Some(d),
            } => {
                assert_eq!(limit, minute[0]);
                let (_, end) = calendar_bounds(CalendarUnit::Minute, before, TZ);
                let expect = (end - before).to_std().unwrap();
                assert!(d <= Duration::from_secs(60));
                // Both clocks are this machine's; allow for the calls in between.
                assert!(
                    d.abs_diff(expect) < Duration::from_secs(2),
                    "{d:?} vs {expect:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Rolling 10m (10 s buckets): when held, the whole window; once settled, when the
        // bucket holding the usage expires (590-600 s from now).
        let rolling = vec![lim(&w.user, "requests:10m=2")];
        for t in ["r1", "r2"] {
            assert!(admitted(
                &s.reserve(&req(t, &rolling, amounts(1, 0, 0, 0)))
                    .await
                    .unwrap()
            ));
        }
        match s
            .reserve(&req("r3", &rolling, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
        {
            ReserveOutcome::Exceeded {
                retry_after: Some(d),
                ..
            } => assert_eq!(d, Duration::from_secs(600)),
            other => panic!("{other:?}"),
        }
        let now = Utc::now();
        for t in ["r1", "r2"] {
            s.settle(t, amounts(1, 0, 0, 0), now, &rolling)
                .await
                .unwrap();
        }
        match s
            .reserve(&req("r3", &rolling, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
        {
            ReserveOutcome::Exceeded {
                retry_after: Some(d),
                ..
            } => assert!(
                d > Duration::from_secs(585) && d <= Duration::from_secs(600),
                "{d:?}"
            ),
            other => panic!("{other:?}"),
        }
        // Total: never frees.
        let total = vec![lim(&w.tenant, "tokens:total=10")];
        match s
            .reserve(&req("t1", &total, amounts(1, 6, 6, 0)))
            .await
            .unwrap()
        {
            ReserveOutcome::Exceeded { retry_after, .. } => assert_eq!(retry_after, None),
            other => panic!("{other:?}"),
        }
    }

    /// Settle replaces the hold with the actual amounts, once; release frees the hold.
    pub async fn settle_and_release(b: &Backend) {
        let s = b.store(None).await;
        let w = who();
        let limits = vec![lim(&w.key, "usd:total=1"), lim(&w.user, "tokens:day=1000")];
        assert!(admitted(
            &s.reserve(&req("a", &limits, amounts(1, 100, 500, 600_000)))
                .await
                .unwrap()
        ));
        assert!(matches!(
            s.reserve(&req("b", &limits, amounts(1, 100, 100, 600_000)))
                .await
                .unwrap(),
            ReserveOutcome::Exceeded { limit, retry_after: None } if limit == limits[0]
        ));
        s.settle("a", amounts(1, 90, 160, 250_000), Utc::now(), &[])
            .await
            .unwrap();
        assert_eq!(
            used_reserved(&*s, &limits).await,
            vec![(250_000, 0), (250, 0)]
        );
        // A replay changes nothing.
        s.settle("a", amounts(1, 90, 160, 250_000), Utc::now(), &[])
            .await
            .unwrap();
        assert_eq!(
            used_reserved(&*s, &limits).await,
            vec![(250_000, 0), (250, 0)]
        );
        assert!(admitted(
            &s.reserve(&req("b", &limits, amounts(1, 100, 100, 600_000)))
                .await
                .unwrap()
        ));
        assert_eq!(s.open_holds(), 1);
        s.release("b").await.unwrap();
        s.release("b").await.unwrap();
        assert_eq!(s.open_holds(), 0);
        assert_eq!(
            used_reserved(&*s, &limits).await,
            vec![(250_000, 0), (250, 0)]
        );
        // A released trace id may be reserved again.
        assert!(admitted(
            &s.reserve(&req("b", &limits, amounts(1, 100, 100, 700_000)))
                .await
                .unwrap()
        ));
        assert_eq!(
            used_reserved(&*s, &limits).await,
            vec![(250_000, 700_000), (250, 200)]
        );
    }

    /// A held trace id is refused as a duplicate, holding nothing more.
    pub async fn duplicate_trace(b: &Backend) {
        let s = b.store(None).await;
        let w = who();
        let limits = vec![lim(&w.key, "requests:day=10")];
        assert!(admitted(
            &s.reserve(&req("dup", &limits, amounts(1, 0, 0, 0)))
                .await
                .unwrap()
        ));
        assert_eq!(
            s.reserve(&req("dup", &limits, amounts(1, 0, 0, 0)))
                .await
                .unwrap(),
            ReserveOutcome::Duplicate
        );
        assert_eq!(used_reserved(&*s, &limits).await, vec![(0, 1)]);
    }

    /// Usage reports used, held and the window of each limit; an admission reports the
    /// states after the hold.
    pub async fn usage_reports_windows(b: &Backend) {
        let s = b.store(None).await;
        let w = who();
        let limits = vec![
            lim(&w.key, "requests:day=10"),
            lim(&w.user, "tokens:5h=1000"),
            lim(&w.tenant, "usd:total=5"),
            // Same counter as the first, another cap (a plan's).
            AppliedLimit {
                plan: Some("gold".into()),
                ..lim(&w.key, "requests:day=20")
            },
        ];
        let states = match s
            .reserve(&req("a", &limits, amounts(1, 10, 20, 7)))
            .await
            .unwrap()
        {
            ReserveOutcome::Admitted(st) => st,
            other => panic!("{other:?}"),
        };
        assert_eq!(states.len(), 4);
        let held: Vec<i64> = states.iter().map(|s| s.reserved).collect();
        assert_eq!(held, vec![1, 30, 7, 1]);
        let started = Utc::now();
        s.settle("a", amounts(1, 10, 15, 5), started, &limits)
            .await
            .unwrap();
        let u = s.usage(&limits).await.unwrap();
        let now = Utc::now();
        assert_eq!(
            u.iter().map(|s| (s.used, s.reserved)).collect::<Vec<_>>(),
            vec![(1, 0), (25, 0), (5, 0), (1, 0)]
        );
        let (start, end) = calendar_bounds(CalendarUnit::Day, now, TZ);
        assert_eq!(
            (u[0].window_start, u[0].resets_at),
            (Some(start), Some(end))
        );
        assert_eq!(u[0].remaining(), 9);
        assert_eq!(u[3].remaining(), 19);
        // 5h rolling: 5-minute buckets; the oldest counted starts 55-60 min... 4h55m-5h ago.
        let ws = u[1].window_start.unwrap();
        assert!(ws > now - TimeDelta::hours(5) && ws <= now - TimeDelta::minutes(295));
        let reset = u[1].resets_at.unwrap();
        assert!(reset > now + TimeDelta::minutes(295) && reset <= now + TimeDelta::hours(5));
        assert_eq!((u[2].window_start, u[2].resets_at), (None, None));
        let json = u[2].to_json();
        assert_eq!(json["used"], "0.000005");
    }

    /// Usage is attributed to the window of the request's start time.
    pub async fn settle_at_start_time(b: &Backend) {
        let s = b.store(None).await;
        let w = who();
        let limits = vec![
            lim(&w.key, "tokens:1h=1000"),
            lim(&w.key, "tokens:hour=1000"),
        ];
        for t in ["old", "older", "now"] {
            assert!(admitted(
                &s.reserve(&req(t, &limits, amounts(1, 1, 1, 0)))
                    .await
                    .unwrap()
            ));
        }
        let now = Utc::now();
        // 30 min ago: inside the rolling hour; before this calendar hour unless it is early.
        s.settle(
            "old",
            amounts(1, 10, 0, 0),
            now - TimeDelta::minutes(30),
            &[],
        )
        .await
        .unwrap();
        // 2 h ago: outside both.
        s.settle(
            "older",
            amounts(1, 100, 0, 0),
            now - TimeDelta::hours(2),
            &[],
        )
        .await
        .unwrap();
        s.settle("now", amounts(1, 1000 - 10 - 1, 0, 0), now, &[])
            .await
            .unwrap();
        let u = s.usage(&limits).await.unwrap();
        assert_eq!(u[0].used, 999);
        let (hour_start, _) = calendar_bounds(CalendarUnit::Hour, now, TZ);
        let expect_hour = if now - TimeDelta::minutes(30) >= hour_start {
            999
        } else {
            989
        };
        assert_eq!(u[1].used, expect_hour);
        assert_eq!(s.open_holds(), 0);
    }

    /// Counters unseen by the store are loaded from the ledger, with identical results.
    pub async fn seeds_from_loader(b: &Backend) {
        let w = who();
        let ledger = Arc::new(FakeLedger::default());
        let total = lim(&w.key, "requests:total=42");
        let day = lim(&w.user, "tokens:day=1000");
        let rolling = lim(&w.tenant, "usd:1h=1");
        let now = Utc::now();
        let (day_start, _) = calendar_bounds(CalendarUnit::Day, now, TZ);
        for _ in 0..40 {
            ledger.record(&total, now - TimeDelta::days(3), amounts(1, 0, 0, 0));
        }
        ledger.record(&day, now.max(day_start), amounts(1, 5, 7, 0));
        ledger.record(&day, day_start - TimeDelta::hours(1), amounts(1, 500, 0, 0));
        ledger.record(
            &rolling,
            now - TimeDelta::minutes(10),
            amounts(1, 0, 0, 300_000),
        );
        ledger.record(
            &rolling,
            now - TimeDelta::minutes(40),
            amounts(1, 0, 0, 200_000),
        );
        ledger.record(
            &rolling,
            now - TimeDelta::hours(2),
            amounts(1, 0, 0, 900_000),
        );
        let s = b.store(Some(ledger.clone())).await;
        let limits = vec![total, day, rolling];
        assert_eq!(
            used_reserved(&*s, &limits).await,
            vec![(40, 0), (12, 0), (500_000, 0)]
        );
        let mut admitted_n = 0;
        for i in 0..5 {
            if admitted(
                &s.reserve(&req(&format!("s{i}"), &limits, amounts(1, 1, 1, 1)))
                    .await
                    .unwrap(),
            ) {
                admitted_n += 1;
            }
        }
        assert_eq!(admitted_n, 2);
        // Loaded once per counter, not per request.
        assert_eq!(*ledger.loads.lock(), 3);
    }
}

macro_rules! conformance {
    ($backend:ident, $make:expr, [$($test:ident),* $(,)?]) => {
        mod $backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend: Backend = $make;
                    suite::$test(&backend).await;
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($test:ident),* $(,)?) => {
        conformance!(memory, Backend::Memory, [$($test),*]);
        conformance!(redis_single, Backend::redis(), [$($test),*]);

        /// The core suite on a real 3-node cluster (one cluster for all: creating one takes
        /// seconds). Each case uses its own key, user and tenant, so cases land on different
        /// slots and nodes while each request's keys share one.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn redis_cluster_core_suite() {
            let backend = Backend::Cluster(RedisCluster::start(3));
            $(suite::$test(&backend).await;)*
        }
    };
}

every_backend!(
    all_or_nothing,
    exact_under_concurrency,
    usd_caps,
    disabled,
    exceeded_retry_after,
    settle_and_release,
    duplicate_trace,
    usage_reports_windows,
    settle_at_start_time,
    seeds_from_loader,
);

// ---------------------------------------------------------------------------------------
// Redis only

async fn redis_store(
    server: &RedisServer,
    loader: Option<Arc<dyn CounterLoader>>,
    ttl: Duration,
) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::connect(&server.url(), RedisOptions::new(TZ, ttl), loader)
            .await
            .unwrap(),
    )
}

/// FLUSHALL after 1 of 100 allowed requests: the counter is rebuilt from the ledger, so
/// exactly 99 more are admitted — not 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_reseeds_from_the_ledger() {
    let server = RedisServer::start();
    let ledger = Arc::new(FakeLedger::default());
    let s = redis_store(&server, Some(ledger.clone()), Duration::from_secs(600)).await;
    let w = who();
    let limits = vec![
        lim(&w.key, "requests:total=100"),
        lim(&w.user, "tokens:day=100000"),
    ];
    let r = req("first", &limits, amounts(1, 10, 10, 0));
    assert!(admitted(&s.reserve(&r).await.unwrap()));
    // The ledger row is written before the counters (as the engine does).
    for l in &limits {
        ledger.record(l, r.started_at, amounts(1, 10, 5, 0));
    }
    s.settle("first", amounts(1, 10, 5, 0), r.started_at, &limits)
        .await
        .unwrap();
    assert_eq!(server.cli(&["FLUSHALL"]).trim(), "OK");
    assert_eq!(used_reserved(&*s, &limits).await, vec![(1, 0), (15, 0)]);
    let tasks: Vec<_> = (0..150)
        .map(|i| {
            let s = s.clone();
            let l = limits.clone();
            tokio::spawn(async move {
                s.reserve(&req(&format!("n{i}"), &l, amounts(1, 1, 1, 0)))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        if admitted(&t.await.unwrap()) {
            n += 1;
        }
    }
    assert_eq!(n, 99);
}

/// After SCRIPT FLUSH (or a restart) EVALSHA answers NOSCRIPT; the script is reloaded.
#[tokio::test]
async fn noscript_reloads() {
    let server = RedisServer::start();
    let s = redis_store(&server, None, Duration::from_secs(600)).await;
    let w = who();
    let limits = vec![lim(&w.key, "requests:total=3")];
    assert!(admitted(
        &s.reserve(&req("a", &limits, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    assert!(admitted(
        &s.reserve(&req("b", &limits, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    s.settle("a", amounts(1, 0, 0, 0), Utc::now(), &[])
        .await
        .unwrap();
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    s.release("b").await.unwrap();
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(used_reserved(&*s, &limits).await, vec![(1, 0)]);
}

/// A settle replayed with its limits (journal recovery) counts once, held or not.
#[tokio::test]
async fn settle_replays_count_once() {
    let server = RedisServer::start();
    let s = redis_store(&server, None, Duration::from_secs(600)).await;
    let w = who();
    let limits = vec![lim(&w.tenant, "tokens:total=1000")];
    assert!(admitted(
        &s.reserve(&req("a", &limits, amounts(1, 50, 50, 0)))
            .await
            .unwrap()
    ));
    for _ in 0..3 {
        s.settle("a", amounts(1, 30, 10, 0), Utc::now(), &limits)
            .await
            .unwrap();
    }
    // Another instance (a fresh store) replaying the same settle changes nothing either,
    // and one recovering a trace it never held adds it once.
    let other = redis_store(&server, None, Duration::from_secs(600)).await;
    other
        .settle("a", amounts(1, 30, 10, 0), Utc::now(), &limits)
        .await
        .unwrap();
    for _ in 0..2 {
        other
            .settle("lost", amounts(1, 5, 5, 0), Utc::now(), &limits)
            .await
            .unwrap();
    }
    assert_eq!(used_reserved(&*s, &limits).await, vec![(50, 0)]);
}

/// Holds of a dead instance are reaped after the TTL; a live instance's are refreshed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_expire_unless_refreshed() {
    let server = RedisServer::start();
    let ttl = Duration::from_millis(600);
    let dead = redis_store(&server, None, ttl).await;
    let live = redis_store(&server, None, ttl).await;
    let _refresher = tollgate::quota::redis::spawn_hold_refresher(&live);
    let w = who();
    let limits = vec![lim(&w.key, "requests:total=2")];
    assert!(admitted(
        &dead
            .reserve(&req("d", &limits, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    assert!(admitted(
        &live
            .reserve(&req("l", &limits, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    assert!(!admitted(
        &live
            .reserve(&req("x", &limits, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The dead instance's hold is gone, the live one's is still held.
    assert_eq!(used_reserved(&*live, &limits).await, vec![(0, 1)]);
    assert!(admitted(
        &live
            .reserve(&req("x", &limits, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    assert!(!admitted(
        &live
            .reserve(&req("y", &limits, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
}

/// Redis killed: calls fail fast with `Unavailable` (no hang); restarted: the store
/// reconnects by itself and reseeds the empty counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_is_unavailable_quickly() {
    let mut server = RedisServer::start();
    let ledger = Arc::new(FakeLedger::default());
    let s = redis_store(&server, Some(ledger.clone()), Duration::from_secs(600)).await;
    let w = who();
    let limits = vec![lim(&w.key, "requests:total=10")];
    assert!(admitted(
        &s.reserve(&req("a", &limits, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    server.kill();
    for i in 0..5 {
        let t = Instant::now();
        let r = s
            .reserve(&req(&format!("k{i}"), &limits, amounts(1, 0, 0, 0)))
            .await;
        assert!(matches!(r, Err(QuotaError::Unavailable(_))), "{r:?}");
        assert!(
            t.elapsed() < Duration::from_millis(1200),
            "{:?}",
            t.elapsed()
        );
    }
    let t = Instant::now();
    assert!(matches!(
        s.usage(&limits).await,
        Err(QuotaError::Unavailable(_))
    ));
    assert!(matches!(
        s.settle("a", amounts(1, 0, 0, 0), Utc::now(), &limits)
            .await,
        Err(QuotaError::Unavailable(_))
    ));
    assert!(t.elapsed() < Duration::from_millis(2500));
    ledger.record(&limits[0], Utc::now(), amounts(1, 0, 0, 0));
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match s.usage(&limits).await {
            Ok(u) => {
                assert_eq!((u[0].used, u[0].reserved), (1, 0));
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "did not reconnect: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every key of one request lives in one cluster slot: the tenant's.
#[tokio::test]
async fn keys_share_the_widest_subjects_tag() {
    let server = RedisServer::start();
    let s = redis_store(&server, None, Duration::from_secs(600)).await;
    let w = who();
    let limits = vec![
        lim(&w.key, "requests:minute=5"),
        lim(&w.user, "tokens:5h=100"),
        lim(&w.tenant, "usd:total=1"),
    ];
    assert!(admitted(
        &s.reserve(&req("a", &limits, amounts(1, 1, 1, 1)))
            .await
            .unwrap()
    ));
    let Subject::Tenant(t) = &w.tenant else {
        unreachable!()
    };
    let keys = server.cli(&["--scan", "--pattern", "tg:v1:*"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert!(keys.len() >= 7, "{keys:?}");
    let tag = format!("tg:v1:{{t:{t}}}:");
    assert!(keys.iter().all(|k| k.starts_with(&tag)), "{keys:?}");
}

struct Directory {
    tenant: Subject,
}

impl tollgate::quota::redis::SubjectRoots for Directory {
    fn root_of(&self, _subject: &Subject) -> Subject {
        self.tenant.clone()
    }
}

/// With the directory resolving roots, a request whose applicable limits name only its key
/// still stores its counters under its tenant's tag, so the key's counters are the same
/// whichever other limits apply.
#[tokio::test]
async fn subject_roots_pin_the_tag_to_the_tenant() {
    let server = RedisServer::start();
    let w = who();
    let s = Arc::new(
        RedisStore::connect(
            &server.url(),
            RedisOptions::new(TZ, Duration::from_secs(600)),
            None,
        )
        .await
        .unwrap()
        .with_subject_roots(Arc::new(Directory {
            tenant: w.tenant.clone(),
        })),
    );
    let key_only = vec![lim(&w.key, "requests:day=2")];
    let scoped = vec![
        lim(&w.key, "requests:day=2"),
        lim(&w.tenant, "usd:day@anthropic=1"),
    ];
    assert!(admitted(
        &s.reserve(&req("a", &key_only, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    assert!(admitted(
        &s.reserve(&req("b", &scoped, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    assert!(!admitted(
        &s.reserve(&req("c", &key_only, amounts(1, 0, 0, 0)))
            .await
            .unwrap()
    ));
    let Subject::Tenant(t) = &w.tenant else {
        unreachable!()
    };
    let keys = server.cli(&["--scan", "--pattern", "tg:v1:*"]);
    let tag = format!("tg:v1:{{t:{t}}}:");
    assert!(keys.lines().all(|k| k.starts_with(&tag)), "{keys}");
}
