//! One ledger conformance suite, run against both ledgers of record through the path that
//! writes each in production: the embedded SQLite ledger written by the embedded journal,
//! and the Postgres ledger written by the shared-mode journal (outbox) and its shipper (a
//! private PostgreSQL server per test). Every read goes through the `Ledger` trait.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;

use common::pg::TestPg;
use tollgate::config::Durability;
use tollgate::db::Db;
use tollgate::journal::outbox::Outbox;
use tollgate::journal::shipper::Shipper;
use tollgate::journal::{EmbeddedJournal, Journal};
use tollgate::keys::Subject;
use tollgate::ledger::postgres::PgLedger;
use tollgate::ledger::sqlite::SqliteLedger;
use tollgate::ledger::{Ledger, Opened, Settlement, Transaction, TxFilter};
use tollgate::quota::limit::LimitSpec;
use tollgate::quota::store::AppliedLimit;
use tollgate::quota::window::{CalendarUnit, Counter, calendar_bounds};

const TZ: Tz = chrono_tz::UTC;

// ---------------------------------------------------------------------------------------
// Backends

/// A ledger of record with the journal that writes it.
struct Env {
    journal: Arc<dyn Journal>,
    ledger: Arc<dyn Ledger>,
    /// Shared mode: moves journal events to Postgres.
    shipper: Option<tokio::sync::Mutex<Shipper>>,
    _dir: tempfile::TempDir,
    _pg: Option<TestPg>,
}

impl Env {
    fn sqlite() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("ledger.db"), Durability::Normal).unwrap();
        Env {
            journal: Arc::new(EmbeddedJournal::new(db.clone())),
            ledger: Arc::new(SqliteLedger::new(db)),
            shipper: None,
            _dir: dir,
            _pg: None,
        }
    }

    async fn postgres() -> Env {
        let pg = TestPg::start();
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("journal.db"), Durability::Normal).unwrap();
        let ledger = PgLedger::new(&pg.url()).unwrap();
        ledger.migrate().await.unwrap();
        let outbox = Outbox::new(db, ledger.clone()).unwrap();
        Env {
            journal: outbox.clone(),
            ledger: Arc::new(ledger),
            shipper: Some(tokio::sync::Mutex::new(Shipper::new(
                outbox,
                Duration::from_secs(3600),
            ))),
            _dir: dir,
            _pg: Some(pg),
        }
    }

    /// Bring what the journal holds to the ledger of record (shared mode: ship now).
    async fn sync(&self) {
        if let Some(s) = &self.shipper {
            s.lock().await.ship_all(false).await.unwrap();
            assert_eq!(
                self.journal.status().quarantined,
                Some(0),
                "Postgres refused no row"
            );
        }
    }

    async fn open(&self, row: Transaction) -> Opened {
        let o = self.journal.open_reservation(row).await.unwrap();
        self.sync().await;
        o
    }

    async fn settle(&self, trace_id: &str, s: Settlement) -> bool {
        let done = self.journal.settle(trace_id, s).await.unwrap().is_some();
        self.sync().await;
        done
    }

    async fn release(&self, trace_id: &str, http_status: i64) -> bool {
        let done = self
            .journal
            .release(trace_id, http_status)
            .await
            .unwrap()
            .is_some();
        self.sync().await;
        done
    }

    async fn row(&self, trace_id: &str) -> Transaction {
        self.ledger.get(trace_id).await.unwrap().unwrap()
    }

    /// A settled row as the engine leaves it.
    async fn settled(&self, row: Transaction, s: Settlement) {
        let id = row.trace_id.clone();
        assert_eq!(self.open(row).await, Opened::Inserted);
        assert!(self.settle(&id, s).await);
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn text(t: DateTime<Utc>) -> String {
    tollgate::time::to_text(t)
}

fn reservation(trace_id: &str, key: &str, started_at: DateTime<Utc>) -> Transaction {
    Transaction {
        trace_id: trace_id.into(),
        key_id: key.into(),
        user_id: Some(format!("u_{key}")),
        tenant_id: Some("acme".into()),
        upstream: "openai".into(),
        model: "gpt-4o-mini".into(),
        status: "reserved".into(),
        input_tokens: 100,
        output_tokens: 50,
        reserved_micros: 2_000,
        stream: true,
        started_at: text(started_at),
        instance_id: "i-1".into(),
        ..Default::default()
    }
}

fn settlement(input: i64, output: i64, cost_micros: i64) -> Settlement {
    Settlement {
        input_tokens: input,
        cached_input_tokens: 3,
        output_tokens: output,
        reasoning_tokens: 2,
        cost_micros,
        usage_source: "upstream",
        http_status: Some(200),
        ..Default::default()
    }
}

fn lim(subject: Subject, spec: &str) -> AppliedLimit {
    AppliedLimit {
        subject,
        spec: LimitSpec::from_str(spec).unwrap(),
        plan: None,
    }
}

async fn used(ledger: &dyn Ledger, limit: &AppliedLimit, now: DateTime<Utc>) -> i64 {
    let mut counter = Counter::new(limit.spec.window, TZ);
    ledger.load_counter(limit, &mut counter, now).await.unwrap();
    counter.used(now)
}

fn ids(rows: &[Transaction]) -> Vec<&str> {
    rows.iter().map(|r| r.trace_id.as_str()).collect()
}

fn filter(
    key: Option<&str>,
    since: Option<String>,
    before: Option<String>,
    limit: usize,
) -> TxFilter {
    TxFilter {
        key_id: key.map(str::to_string),
        since,
        before,
        limit,
    }
}

// ---------------------------------------------------------------------------------------
// The suite

mod suite {
    use super::*;

    /// reserved → settled carries the settlement's figures; the row is final: a second
    /// settle or a release is refused and changes nothing.
    pub async fn open_then_settle(env: &Env) {
        let start = Utc::now() - TimeDelta::seconds(5);
        assert_eq!(
            env.open(reservation("t-1", "k_a", start)).await,
            Opened::Inserted
        );
        let row = env.row("t-1").await;
        assert_eq!(row.status, "reserved");
        assert_eq!(row.started_at, text(start));
        assert_eq!((row.input_tokens, row.output_tokens), (100, 50));
        assert_eq!(row.reserved_micros, 2_000);
        assert_eq!(row.settled_at, None);
        assert!(env.ledger.is_taken("t-1").await.unwrap());

        assert!(env.settle("t-1", settlement(120, 40, 1_500)).await);
        let row = env.row("t-1").await;
        assert_eq!(row.status, "settled");
        assert_eq!(
            (
                row.input_tokens,
                row.cached_input_tokens,
                row.output_tokens,
                row.reasoning_tokens
            ),
            (120, 3, 40, 2)
        );
        assert_eq!(row.cost_micros, 1_500);
        assert_eq!(row.reserved_micros, 2_000, "the hold stays on record");
        assert_eq!(row.usage_source.as_deref(), Some("upstream"));
        assert_eq!(row.http_status, Some(200));
        assert!(row.settled_at.is_some());
        assert!(env.ledger.is_taken("t-1").await.unwrap());

        assert!(
            !env.settle("t-1", settlement(999, 999, 999_999)).await,
            "a second settle is refused"
        );
        assert!(
            !env.release("t-1", 500).await,
            "a settled row is never released"
        );
        assert_eq!(env.row("t-1").await, row, "unchanged");
        assert_eq!(
            env.open(reservation("t-1", "k_a", Utc::now())).await,
            Opened::Duplicate,
            "a settled trace id is never reserved again"
        );
        assert_eq!(env.row("t-1").await, row);
    }

    /// reserved → released bills nothing; a released trace id may be reserved again and
    /// then settled.
    pub async fn open_then_release(env: &Env) {
        let start = Utc::now() - TimeDelta::seconds(5);
        env.open(reservation("t-2", "k_a", start)).await;
        assert!(env.release("t-2", 502).await);
        let row = env.row("t-2").await;
        assert_eq!(row.status, "released");
        assert_eq!(
            (row.input_tokens, row.output_tokens, row.cost_micros),
            (0, 0, 0)
        );
        assert_eq!(row.http_status, Some(502));
        assert!(row.settled_at.is_some());
        assert!(!env.ledger.is_taken("t-2").await.unwrap());
        assert!(
            !env.settle("t-2", settlement(1, 1, 1)).await,
            "released is final"
        );
        assert!(!env.release("t-2", 500).await);
        assert_eq!(env.row("t-2").await, row);

        let again = Utc::now() - TimeDelta::seconds(1);
        assert_eq!(
            env.open(reservation("t-2", "k_a", again)).await,
            Opened::Inserted
        );
        let row = env.row("t-2").await;
        assert_eq!(row.status, "reserved");
        assert_eq!(row.started_at, text(again));
        assert_eq!(row.http_status, None);
        assert!(env.settle("t-2", settlement(7, 8, 9)).await);
        assert_eq!(env.row("t-2").await.cost_micros, 9);

        assert!(env.ledger.get("t-nope").await.unwrap().is_none());
        assert!(!env.ledger.is_taken("t-nope").await.unwrap());
        assert_eq!(
            env.open(reservation("t-3", "k_a", Utc::now())).await,
            Opened::Inserted
        );
        assert_eq!(
            env.open(reservation("t-3", "k_a", Utc::now())).await,
            Opened::Duplicate,
            "an open reservation is not reserved twice"
        );
    }

    /// Listings: newest first, ties by trace id descending; by key, `since` inclusive,
    /// `before` exclusive (inclusive with the DEL cursor form), limit clamped to 1-1000.
    pub async fn list_filters(env: &Env) {
        let base = Utc::now() - TimeDelta::hours(3);
        let t = |m: i64| base + TimeDelta::minutes(m);
        for (id, key, at) in [
            ("a-1", "k_a", t(0)),
            ("a-2", "k_a", t(10)),
            ("a-3b", "k_a", t(20)),
            ("a-3a", "k_a", t(20)),
            ("a-4", "k_a", t(30)),
            ("b-1", "k_b", t(15)),
        ] {
            env.settled(reservation(id, key, at), settlement(1, 1, 1))
                .await;
        }
        env.open(reservation("a-5", "k_a", t(40))).await;
        let list = |f: TxFilter| async move { env.ledger.list(&f).await.unwrap() };

        let all = list(filter(None, None, None, 100)).await;
        assert_eq!(
            ids(&all),
            vec!["a-5", "a-4", "a-3b", "a-3a", "b-1", "a-2", "a-1"]
        );
        assert_eq!(all[0].status, "reserved", "every status is listed");
        assert_eq!(
            ids(&list(filter(Some("k_a"), None, None, 100)).await),
            vec!["a-5", "a-4", "a-3b", "a-3a", "a-2", "a-1"]
        );
        assert_eq!(
            ids(&list(filter(Some("k_b"), None, None, 100)).await),
            vec!["b-1"]
        );
        assert!(
            list(filter(Some("k_none"), None, None, 100))
                .await
                .is_empty()
        );
        assert_eq!(
            ids(&list(filter(Some("k_a"), Some(text(t(20))), None, 100)).await),
            vec!["a-5", "a-4", "a-3b", "a-3a"],
            "since is inclusive"
        );
        assert_eq!(
            ids(&list(filter(Some("k_a"), None, Some(text(t(20))), 100)).await),
            vec!["a-2", "a-1"],
            "before is exclusive"
        );
        assert_eq!(
            ids(&list(filter(
                Some("k_a"),
                None,
                Some(format!("{}\u{7f}", text(t(20)))),
                100
            ))
            .await),
            vec!["a-3b", "a-3a", "a-2", "a-1"],
            "the cursor form keeps rows tied with its time"
        );
        assert_eq!(
            ids(&list(filter(None, Some(text(t(10))), Some(text(t(30))), 100)).await),
            vec!["a-3b", "a-3a", "b-1", "a-2"]
        );
        assert_eq!(
            ids(&list(filter(Some("k_a"), None, None, 2)).await),
            vec!["a-5", "a-4"]
        );
        assert_eq!(
            ids(&list(filter(Some("k_a"), None, None, 0)).await),
            vec!["a-5"]
        );
    }

    /// Counter loads count settled rows only, per subject, upstream scope and window.
    pub async fn counter_loads_per_window(env: &Env) {
        // Loads are evaluated at noon UTC today, whatever the clock says, so every row
        // below falls where its comment says.
        let (day_start, _) = calendar_bounds(CalendarUnit::Day, Utc::now(), TZ);
        let now = day_start + TimeDelta::hours(12);
        let mut n = 0;
        let mut row = |key: &str, at: DateTime<Utc>, upstream: &str| {
            n += 1;
            let mut r = reservation(&format!("c-{n}"), key, at);
            r.upstream = upstream.into();
            r
        };
        let ago = |minutes: i64| now - TimeDelta::minutes(minutes);
        // k_c, settled: today (3 h ago), yesterday, three days ago, 10 min ago on
        // anthropic, 40 min ago; released 5 min ago and still open 2 min ago (neither
        // counts).
        env.settled(row("k_c", ago(180), "openai"), settlement(10, 1, 100))
            .await;
        env.settled(
            row("k_c", day_start - TimeDelta::hours(1), "openai"),
            settlement(20, 2, 200),
        )
        .await;
        env.settled(
            row("k_c", ago(3 * 24 * 60), "openai"),
            settlement(40, 4, 400),
        )
        .await;
        env.settled(row("k_c", ago(10), "anthropic"), settlement(80, 8, 800))
            .await;
        env.settled(row("k_c", ago(40), "openai"), settlement(160, 16, 1_600))
            .await;
        let released = row("k_c", ago(5), "openai");
        let released_id = released.trace_id.clone();
        env.open(released).await;
        assert!(env.release(&released_id, 502).await);
        env.open(row("k_c", ago(2), "openai")).await;
        // Another key of the same tenant and user, and another user.
        env.settled(row("k_d", ago(3), "openai"), settlement(1_000, 0, 0))
            .await;
        let mut other = row("k_e", ago(3), "openai");
        other.user_id = Some("u_other".into());
        env.settled(other, settlement(5_000, 0, 0)).await;

        let key = || Subject::Key("k_c".into());
        let ledger = env.ledger.as_ref();
        assert_eq!(
            used(ledger, &lim(key(), "requests:total=100"), now).await,
            5
        );
        assert_eq!(
            used(ledger, &lim(key(), "usd:total=1"), now).await,
            100 + 200 + 400 + 800 + 1_600
        );
        assert_eq!(
            used(ledger, &lim(key(), "input_tokens:day=1000000"), now).await,
            10 + 80 + 160,
            "today only"
        );
        assert_eq!(
            used(ledger, &lim(key(), "tokens:1h=1000000"), now).await,
            (80 + 8) + (160 + 16),
            "rolling hour"
        );
        assert_eq!(
            used(ledger, &lim(key(), "requests:1h@openai=100"), now).await,
            1,
            "scoped to one upstream"
        );
        assert_eq!(
            used(
                ledger,
                &lim(key(), "output_tokens:total@anthropic=100"),
                now
            )
            .await,
            8
        );
        assert_eq!(
            used(
                ledger,
                &lim(Subject::User("u_k_c".into()), "requests:total=100"),
                now
            )
            .await,
            5
        );
        assert_eq!(
            used(
                ledger,
                &lim(Subject::Tenant("acme".into()), "input_tokens:total=1000000"),
                now
            )
            .await,
            10 + 20 + 40 + 80 + 160 + 1_000 + 5_000
        );
        assert_eq!(
            used(
                ledger,
                &lim(Subject::Key("k_none".into()), "requests:total=1"),
                now
            )
            .await,
            0
        );
    }
}

macro_rules! conformance {
    ($backend:ident, $make:expr, [$($test:ident),* $(,)?]) => {
        mod $backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let env: Env = $make;
                    suite::$test(&env).await;
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($test:ident),* $(,)?) => {
        conformance!(sqlite, Env::sqlite(), [$($test),*]);
        conformance!(postgres, Env::postgres().await, [$($test),*]);
    };
}

every_backend!(
    open_then_settle,
    open_then_release,
    list_filters,
    counter_loads_per_window,
);
