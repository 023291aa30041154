//! One journal conformance suite, run against both implementations of `Journal`: the
//! embedded journal (the SQLite ledger itself) and shared mode's outbox (a local SQLite
//! journal in front of a private PostgreSQL server per test). Both must answer the engine's
//! verbs alike; where their status differs by design (embedded mode ships nowhere), the
//! suite says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::pg::TestPg;
use tollgate::config::Durability;
use tollgate::db::Db;
use tollgate::journal::outbox::Outbox;
use tollgate::journal::{EmbeddedJournal, Journal};
use tollgate::ledger::postgres::PgLedger;
use tollgate::ledger::{Opened, Settlement, Transaction};

// ---------------------------------------------------------------------------------------
// Backends

struct Env {
    journal: Arc<dyn Journal>,
    path: PathBuf,
    /// Shared mode: the Postgres ledger the outbox ships to.
    pg: Option<PgLedger>,
    _dir: tempfile::TempDir,
    _pg: Option<TestPg>,
}

impl Env {
    fn sqlite() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let db = Db::open(&path, Durability::Normal).unwrap();
        Env {
            journal: Arc::new(EmbeddedJournal::new(db)),
            path,
            pg: None,
            _dir: dir,
            _pg: None,
        }
    }

    async fn outbox() -> Env {
        let pg = TestPg::start();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let db = Db::open(&path, Durability::Normal).unwrap();
        let ledger = PgLedger::new(&pg.url()).unwrap();
        ledger.migrate().await.unwrap();
        let outbox = Outbox::new(db, ledger.clone()).unwrap();
        Env {
            journal: outbox,
            path,
            pg: Some(ledger),
            _dir: dir,
            _pg: Some(pg),
        }
    }

    /// The same journal as a new process would open it after this one died.
    fn reopen(&self) -> Arc<dyn Journal> {
        let db = Db::open(&self.path, Durability::Normal).unwrap();
        match &self.pg {
            None => Arc::new(EmbeddedJournal::new(db)),
            Some(ledger) => Outbox::new(db, ledger.clone()).unwrap(),
        }
    }

    fn shared(&self) -> bool {
        self.pg.is_some()
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn reservation(trace_id: &str) -> Transaction {
    Transaction {
        trace_id: trace_id.into(),
        key_id: "k1".into(),
        user_id: Some("u_k1".into()),
        tenant_id: Some("acme".into()),
        upstream: "openai".into(),
        model: "gpt-4o-mini".into(),
        status: "reserved".into(),
        input_tokens: 100,
        output_tokens: 50,
        reserved_micros: 2_000,
        stream: false,
        started_at: tollgate::time::to_text(chrono::Utc::now()),
        instance_id: "i-1".into(),
        ..Default::default()
    }
}

fn settlement() -> Settlement {
    Settlement {
        input_tokens: 90,
        output_tokens: 40,
        cost_micros: 1_500,
        usage_source: "upstream",
        http_status: Some(200),
        ..Default::default()
    }
}

/// A settle or release that took effect: embedded mode keeps no event log (0), shared mode
/// returns the journal event's sequence number.
fn assert_applied(env: &Env, seq: Option<i64>) {
    let seq = seq.expect("a reserved trace id is settled or released");
    if env.shared() {
        assert!(seq > 0, "the outbox numbers its events, got {seq}");
    } else {
        assert_eq!(seq, 0);
    }
}

// ---------------------------------------------------------------------------------------
// The suite

mod suite {
    use super::*;

    pub async fn open_settle_and_release(env: &Env) {
        let j = &env.journal;
        assert!(!j.is_taken("t-settle").await.unwrap());
        assert_eq!(
            j.open_reservation(reservation("t-settle")).await.unwrap(),
            Opened::Inserted
        );
        assert!(j.is_taken("t-settle").await.unwrap());
        assert_applied(env, j.settle("t-settle", settlement()).await.unwrap());
        assert!(j.is_taken("t-settle").await.unwrap(), "settled stays taken");

        assert_eq!(
            j.open_reservation(reservation("t-release")).await.unwrap(),
            Opened::Inserted
        );
        assert_applied(env, j.release("t-release", 503).await.unwrap());
        assert!(
            !j.is_taken("t-release").await.unwrap(),
            "a released trace id may be retried"
        );
        assert_eq!(
            j.open_reservation(reservation("t-release")).await.unwrap(),
            Opened::Inserted,
            "a released row is reused"
        );
        assert!(
            j.open_rows()
                .await
                .unwrap()
                .iter()
                .any(|r| r.trace_id == "t-release")
        );
    }

    pub async fn a_second_open_is_a_duplicate(env: &Env) {
        let j = &env.journal;
        assert_eq!(
            j.open_reservation(reservation("t-dup")).await.unwrap(),
            Opened::Inserted
        );
        assert_eq!(
            j.open_reservation(reservation("t-dup")).await.unwrap(),
            Opened::Duplicate,
            "while reserved"
        );
        j.settle("t-dup", settlement()).await.unwrap();
        assert_eq!(
            j.open_reservation(reservation("t-dup")).await.unwrap(),
            Opened::Duplicate,
            "once settled"
        );
    }

    pub async fn unknown_or_final_trace_ids_change_nothing(env: &Env) {
        let j = &env.journal;
        assert_eq!(j.settle("t-unknown", settlement()).await.unwrap(), None);
        assert_eq!(j.release("t-unknown", 499).await.unwrap(), None);
        assert!(!j.is_taken("t-unknown").await.unwrap());

        j.open_reservation(reservation("t-final")).await.unwrap();
        assert_applied(env, j.settle("t-final", settlement()).await.unwrap());
        assert_eq!(j.settle("t-final", settlement()).await.unwrap(), None);
        assert_eq!(j.release("t-final", 499).await.unwrap(), None);
        assert!(j.is_taken("t-final").await.unwrap());

        j.open_reservation(reservation("t-gone")).await.unwrap();
        assert_applied(env, j.release("t-gone", 499).await.unwrap());
        assert_eq!(j.release("t-gone", 499).await.unwrap(), None);
        assert_eq!(j.settle("t-gone", settlement()).await.unwrap(), None);
        assert!(j.open_rows().await.unwrap().is_empty());
    }

    pub async fn open_rows_survive_a_crash(env: &Env) {
        let j = &env.journal;
        for t in ["t-a", "t-b", "t-c"] {
            j.open_reservation(reservation(t)).await.unwrap();
        }
        j.settle("t-b", settlement()).await.unwrap();
        let after = env.reopen();
        let mut open: Vec<String> = after
            .open_rows()
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                assert_eq!(r.status, "reserved");
                assert_eq!(r.reserved_micros, 2_000);
                r.trace_id
            })
            .collect();
        open.sort();
        assert_eq!(open, ["t-a", "t-c"]);
        assert!(after.is_taken("t-b").await.unwrap());
        assert_applied(env, after.release("t-a", 499).await.unwrap());
        assert_eq!(after.open_rows().await.unwrap().len(), 1);
    }

    pub async fn status_fields(env: &Env) {
        let j = &env.journal;
        j.open_reservation(reservation("t-status")).await.unwrap();
        j.settle("t-status", settlement()).await.unwrap();
        let s = j.status();
        if env.shared() {
            assert!(s.backlog["postgres"] >= 1, "{s:?}");
            assert!(s.oldest_unshipped_at.is_some(), "{s:?}");
            assert_eq!(s.quarantined, Some(0));
            assert_eq!(s.to_json()["quarantined"], 0);
        } else {
            assert!(s.backlog.is_empty(), "{s:?}");
            assert_eq!(s.oldest_unshipped_at, None);
            assert_eq!(s.quarantined, None);
            assert_eq!(s.to_json(), serde_json::json!({"backlog": {}}));
        }
        assert_eq!(s.quarantined_total, 0);
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

macro_rules! every_journal {
    ($($test:ident),* $(,)?) => {
        conformance!(embedded, Env::sqlite(), [$($test),*]);
        conformance!(outbox, Env::outbox().await, [$($test),*]);
    };
}

every_journal!(
    open_settle_and_release,
    a_second_open_is_a_duplicate,
    unknown_or_final_trace_ids_change_nothing,
    open_rows_survive_a_crash,
    status_fields,
);
