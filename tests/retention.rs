//! `storage.retention` and `tollgate export`, in both backends (the embedded SQLite
//! ledger and a private Postgres):
//!
//! - a retention pass deletes the settled and released rows before its watermark and
//!   nothing else (reserved rows stay);
//! - every counter the loaders build (the embedded startup seeding, the shared loader, and
//!   so `reconcile`, which compares with them) — total, month, week, day and rolling
//!   windows, scoped or not, of keys, users and tenants — is exactly equal before and
//!   after the pass, and after a second pass;
//! - every spend report (crossing the watermark, cut inside hours after it, by time,
//!   model, key, user and tenant) is exactly equal before and after;
//! - a request reserved before the watermark and settled after the pass is counted once,
//!   also after the next pass deletes its row;
//! - `export` writes exactly the ledger's rows of the period, as JSON lines and as CSV.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::str::FromStr;

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Tz;
use common::pg::TestPg;
use serde_json::Value;
use tollgate::keys::Subject;
use tollgate::ledger::Transaction;
use tollgate::quota::limit::LimitSpec;
use tollgate::quota::memory::CounterLoader;
use tollgate::quota::store::AppliedLimit;
use tollgate::quota::window::Counter;
use tollgate::spend::export::{Format, Writer};
use tollgate::spend::{self, SpendParams, SpendStore, retention};

const TZ: Tz = chrono_tz::Europe::Berlin;
const KEEP: std::time::Duration = std::time::Duration::from_secs(20 * 86_400);

/// A whole hour, a few days after Berlin's switch to summer time.
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 31, 12, 0, 0).unwrap()
}

/// `n` ledger rows over the 80 days before `now`, from a fixed seed.
fn ledger(n: usize) -> Vec<Transaction> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    (0..n)
        .map(|i| {
            let key = ["k_a", "k_b", "k_c"][next(3) as usize];
            let (user, tenant) = match key {
                "k_a" => (Some("alice"), Some("acme")),
                "k_b" => (Some("bob"), Some("acme")),
                _ => (None, None),
            };
            let status = match next(10) {
                0 => "reserved",
                1 | 2 => "released",
                _ => "settled",
            };
            let upstream = ["openai", "anthropic"][next(2) as usize];
            // A third of the rows on a whole hour, so some sit exactly on the watermark.
            let micros = 1 + next(80 * 86_400 * 1_000_000) as i64;
            let micros = if i % 3 == 0 {
                (micros - micros % 3_600_000_000).max(3_600_000_000)
            } else {
                micros
            };
            let started = now() - Duration::microseconds(micros);
            let settled = status == "settled";
            let model = ["gpt-4o-mini", "claude-sonnet-4-5", "o3"][next(3) as usize];
            let estimated = next(5) == 0;
            let stream = next(2) == 0;
            let mut tokens = |m| if settled { next(m) as i64 } else { 0 };
            Transaction {
                trace_id: format!("t{i:05}"),
                key_id: key.into(),
                user_id: user.map(str::to_string),
                tenant_id: tenant.map(str::to_string),
                upstream: upstream.into(),
                model: model.into(),
                status: status.into(),
                input_tokens: tokens(5_000),
                cached_input_tokens: tokens(100),
                cache_write_tokens: tokens(50),
                output_tokens: tokens(2_000),
                reasoning_tokens: tokens(300),
                reserved_micros: 9_000,
                cost_micros: tokens(9_000),
                usage_source: (status != "reserved")
                    .then(|| if estimated { "estimated" } else { "upstream" }.to_string()),
                stream,
                http_status: (status != "reserved").then_some(200),
                started_at: tollgate::time::to_text(started),
                settled_at: (status != "reserved").then(|| tollgate::time::to_text(started)),
                instance_id: "i-1".into(),
                ..Transaction::default()
            }
        })
        .collect()
}

fn limits() -> Vec<AppliedLimit> {
    let subjects = [
        Subject::Key("k_a".into()),
        Subject::Key("k_c".into()),
        Subject::User("alice".into()),
        Subject::Tenant("acme".into()),
    ];
    let specs = [
        "requests:total=1",
        "usd:total@openai=1",
        "usd:month=1",
        "requests:month@anthropic=1",
        "tokens:week=1",
        "input_tokens:day=1",
        "output_tokens:30d=1",
        "usd:45d@openai=1",
        "requests:6h=1",
    ];
    subjects
        .iter()
        .flat_map(|s| {
            specs.iter().map(|spec| AppliedLimit {
                subject: s.clone(),
                spec: LimitSpec::from_str(spec).unwrap(),
                plan: None,
            })
        })
        .collect()
}

/// What the loader builds for every limit: used now, and the counted buckets.
/// One limit's counter as loaded: its name, used now, and its counted buckets.
type Loaded = (String, i64, Vec<(i64, i64)>);

async fn counters(loader: &dyn CounterLoader) -> Vec<Loaded> {
    let mut out = Vec::new();
    for l in limits() {
        let mut c = Counter::new(l.spec.window, TZ);
        loader.load(&l, &mut c, now()).await.unwrap();
        out.push((
            format!("{:?} {:?}", l.subject, l.spec),
            c.used(now()),
            c.counted_buckets(now()),
        ));
    }
    out
}

fn asks() -> Vec<SpendParams> {
    let t = |d: DateTime<Utc>| Some(tollgate::time::to_text(d));
    let p = |since, until, by: &str| SpendParams {
        since,
        until,
        group_by: (!by.is_empty()).then(|| by.to_string()),
        ..SpendParams::default()
    };
    vec![
        // Across the watermark, on whole hours.
        p(t(now() - Duration::days(30)), t(now()), "day,model"),
        p(Some("2026-01-01".into()), None, "week,key"),
        p(Some("2026-01-01".into()), None, "month,tenant"),
        p(Some("2026-01-01".into()), None, "user,upstream"),
        p(Some("2026-01-01".into()), None, ""),
        SpendParams {
            key: Some("k_a".into()),
            ..p(Some("2026-02-01".into()), Some("2026-03-31".into()), "day")
        },
        // After the watermark, cut inside hours.
        p(
            t(now() - Duration::days(3) + Duration::minutes(17)),
            t(now() - Duration::minutes(5)),
            "hour,model",
        ),
    ]
}

async fn reports(store: &dyn SpendStore) -> Vec<Value> {
    let mut out = Vec::new();
    for a in asks() {
        out.push(spend::report(store, &a, now(), TZ).await.unwrap());
    }
    out
}

/// The rows `export` should write for `[since, until)`, in its order.
fn expected_export(rows: &[Transaction], since: &str, until: &str) -> Vec<Value> {
    let mut sel: Vec<&Transaction> = rows
        .iter()
        .filter(|r| r.started_at.as_str() >= since && r.started_at.as_str() < until)
        .collect();
    sel.sort_by(|a, b| (&a.started_at, &a.trace_id).cmp(&(&b.started_at, &b.trace_id)));
    sel.iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect()
}

/// Parse the CSV `export` wrote back into JSON values shaped like its JSON lines.
fn csv_values(text: &str) -> Vec<Value> {
    let mut lines = text.split("\r\n");
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let template = serde_json::to_value(Transaction::default()).unwrap();
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            // No generated value contains a comma or a quote.
            let cells: Vec<&str> = l.split(',').collect();
            assert_eq!(cells.len(), head.len(), "{l}");
            let mut m = serde_json::Map::new();
            for (h, c) in head.iter().zip(cells) {
                let v = match (&template[*h], c) {
                    (_, "") => Value::Null,
                    (Value::String(_), c) => Value::String(c.into()),
                    (Value::Bool(_), c) => Value::Bool(c == "true"),
                    (Value::Number(_), c) => Value::Number(c.parse::<i64>().unwrap().into()),
                    (Value::Null, c) => c
                        .parse::<i64>()
                        .map(|n| Value::Number(n.into()))
                        .unwrap_or_else(|_| Value::String(c.into())),
                    (other, _) => panic!("unexpected field type {other}"),
                };
                m.insert((*h).to_string(), v);
            }
            Value::Object(m)
        })
        .collect()
}

fn jsonl_values(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn sqlite_retention_keeps_counters_reports_and_exports_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let db = tollgate::db::Db::open(&path, tollgate::config::Durability::Normal).unwrap();
    let rows = ledger(3_000);
    let insert = rows.clone();
    db.call(move |c| {
        for r in &insert {
            c.execute(
                "INSERT INTO billing_transactions (trace_id, key_id, user_id, tenant_id, upstream, model, status,
                    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
                    reserved_micros, cost_micros, usage_source, stream, http_status, started_at, settled_at, instance_id)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20)",
                rusqlite::params![
                    r.trace_id, r.key_id, r.user_id, r.tenant_id, r.upstream, r.model, r.status,
                    r.input_tokens, r.cached_input_tokens, r.cache_write_tokens, r.output_tokens,
                    r.reasoning_tokens, r.reserved_micros, r.cost_micros, r.usage_source, r.stream,
                    r.http_status, r.started_at, r.settled_at, r.instance_id
                ],
            )?;
        }
        Ok(())
    })
    .await
    .unwrap();
    let loader = tollgate::ledger::SqliteLoader { db: db.clone() };
    let store = spend::sqlite::SqliteSpend::new(&path);
    let counters_before = counters(&loader).await;
    let reports_before = reports(&store).await;
    assert!(counters_before.iter().any(|(_, used, _)| *used > 0));

    // Export before the pass equals the rows.
    let w = retention::cutoff(now(), KEEP);
    let since = now() - Duration::days(81);
    let (since_t, w_t) = (tollgate::time::to_text(since), tollgate::time::to_text(w));
    let expected = expected_export(&rows, &since_t, &w_t);
    assert!(expected.len() > 1_000);
    for format in [Format::Jsonl, Format::Csv] {
        let mut out = Writer::new(Vec::new(), format).unwrap();
        let n = spend::export::from_sqlite(&path, since, w, &mut out).unwrap();
        let text = String::from_utf8(out.finish().unwrap()).unwrap();
        assert_eq!(n as usize, expected.len());
        let got = match format {
            Format::Jsonl => jsonl_values(&text),
            Format::Csv => csv_values(&text),
        };
        assert_eq!(got, expected, "{format:?}");
    }

    let pass = retention::run_embedded(&db, KEEP, now()).await.unwrap();
    assert_eq!(pass.retained_before, w);
    let old_final = |r: &&Transaction| r.started_at < w_t && r.status != "reserved";
    assert_eq!(
        pass.deleted as usize,
        rows.iter().filter(old_final).count(),
        "every settled and released row before the watermark, nothing else"
    );
    let mut out = Writer::new(Vec::new(), Format::Jsonl).unwrap();
    spend::export::from_sqlite(&path, since, now(), &mut out).unwrap();
    let remaining = jsonl_values(&String::from_utf8(out.finish().unwrap()).unwrap());
    let kept: Vec<Transaction> = rows.iter().filter(|r| !old_final(r)).cloned().collect();
    assert_eq!(
        remaining,
        expected_export(&kept, &since_t, &tollgate::time::to_text(now()))
    );

    assert_eq!(
        counters(&loader).await,
        counters_before,
        "counters after the pass"
    );
    assert_eq!(
        reports(&store).await,
        reports_before,
        "reports after the pass"
    );

    // A second pass finds nothing and changes nothing.
    let again = retention::run_embedded(&db, KEEP, now()).await.unwrap();
    assert_eq!(again.deleted, 0);
    assert_eq!(counters(&loader).await, counters_before);

    // A request reserved before the watermark settles after the pass: counted once, and
    // still once after the next pass deletes its row.
    let open = rows
        .iter()
        .find(|r| r.status == "reserved" && r.started_at < w_t && r.key_id == "k_a")
        .expect("an old open reservation of k_a")
        .clone();
    let trace = open.trace_id.clone();
    db.call(move |c| {
        c.execute(
            "UPDATE billing_transactions SET status = 'settled', cost_micros = 777, input_tokens = 5,
                 usage_source = 'upstream' WHERE trace_id = ?1",
            [trace],
        )?;
        Ok(())
    })
    .await
    .unwrap();
    let total = |cs: &[Loaded], name: &str| {
        cs.iter()
            .find(|(n, _, _)| n.starts_with(name))
            .map(|(_, u, _)| *u)
            .unwrap()
    };
    let requests_key = "Key(\"k_a\") LimitSpec { metric: Requests, window: Total";
    let after_settle = counters(&loader).await;
    assert_eq!(
        total(&after_settle, requests_key),
        total(&counters_before, requests_key) + 1
    );
    let later = retention::run_embedded(&db, KEEP, now()).await.unwrap();
    assert_eq!(later.deleted, 1);
    assert_eq!(counters(&loader).await, after_settle);
}

#[tokio::test]
async fn postgres_retention_keeps_counters_reports_and_exports_exact() {
    let pg = TestPg::start();
    let ledger_pg = tollgate::ledger::postgres::PgLedger::new(&pg.url()).unwrap();
    ledger_pg.migrate().await.unwrap();
    let rows = ledger(3_000);
    // Through the shippers' own upsert (statement triggers on INSERT … ON CONFLICT).
    for chunk in rows.chunks(500) {
        ledger_pg.upsert_rows(chunk).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.db");
    drop(tollgate::db::Db::open(&journal, tollgate::config::Durability::Normal).unwrap());
    let reader = tollgate::journal::outbox::Reader::open(&journal).unwrap();
    let loader = tollgate::journal::loader::SharedLoader::new(ledger_pg.clone(), reader);
    let store = spend::pg::PgSpend::new(&pg.url()).unwrap();
    let counters_before = counters(&loader).await;
    let reports_before = reports(&store).await;
    assert!(counters_before.iter().any(|(_, used, _)| *used > 0));

    let w = retention::cutoff(now(), KEEP);
    let since = now() - Duration::days(81);
    let (since_t, w_t) = (tollgate::time::to_text(since), tollgate::time::to_text(w));
    let expected = expected_export(&rows, &since_t, &w_t);
    for format in [Format::Jsonl, Format::Csv] {
        let mut out = Writer::new(Vec::new(), format).unwrap();
        let n = spend::export::from_pg(&ledger_pg, since, w, &mut out)
            .await
            .unwrap();
        let text = String::from_utf8(out.finish().unwrap()).unwrap();
        assert_eq!(n as usize, expected.len());
        let got = match format {
            Format::Jsonl => jsonl_values(&text),
            Format::Csv => csv_values(&text),
        };
        assert_eq!(got, expected, "{format:?}");
    }

    let pass = retention::run_pg(&ledger_pg, KEEP, now()).await.unwrap();
    assert_eq!(pass.retained_before, w);
    let old_final = |r: &&Transaction| r.started_at < w_t && r.status != "reserved";
    assert_eq!(pass.deleted as usize, rows.iter().filter(old_final).count());
    let kept: Vec<Transaction> = rows.iter().filter(|r| !old_final(r)).cloned().collect();
    let mut all = ledger_pg.all_rows().await.unwrap();
    all.sort_by(|a, b| a.trace_id.cmp(&b.trace_id));
    assert_eq!(all, kept);

    assert_eq!(
        counters(&loader).await,
        counters_before,
        "counters after the pass"
    );
    assert_eq!(
        reports(&store).await,
        reports_before,
        "reports after the pass"
    );

    let again = retention::run_pg(&ledger_pg, KEEP, now()).await.unwrap();
    assert_eq!(again.deleted, 0);
    assert_eq!(counters(&loader).await, counters_before);

    // A shipper delivers the settle of an old reservation after the pass.
    let mut open = rows
        .iter()
        .find(|r| r.status == "reserved" && r.started_at < w_t && r.key_id == "k_a")
        .expect("an old open reservation of k_a")
        .clone();
    open.status = "settled".into();
    open.cost_micros = 777;
    open.usage_source = Some("upstream".into());
    ledger_pg.upsert_rows(&[open]).await.unwrap();
    let requests_key = "Key(\"k_a\") LimitSpec { metric: Requests, window: Total";
    let total = |cs: &[Loaded]| {
        cs.iter()
            .find(|(n, _, _)| n.starts_with(requests_key))
            .map(|(_, u, _)| *u)
            .unwrap()
    };
    let after_settle = counters(&loader).await;
    assert_eq!(total(&after_settle), total(&counters_before) + 1);
    let later = retention::run_pg(&ledger_pg, KEEP, now()).await.unwrap();
    assert_eq!(later.deleted, 1);
    assert_eq!(counters(&loader).await, after_settle);
}
