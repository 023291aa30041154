//! Spend reports over a large ledger, in both modes: generates `SPEND_ROWS` ledger rows
//! (default 1,000,000) spread evenly over 30 days into a fresh embedded (SQLite) ledger
//! and a private PostgreSQL (initdb/pg_ctl in a temp dir, like the integration tests),
//! then times reports through the same code as `GET /admin/spend` and prints the query
//! plans. Each report's totals are checked against a direct sum over the rows.
//!
//! `cargo bench --bench spend` (or `make bench-spend`); `cargo test --all-targets` runs it
//! with 20,000 rows as a smoke test. `SPEND_ROWS` and `SPEND_RUNS` (timed runs per report,
//! default 15) change the sizes.
//!
//! The rows: 200 keys (40 users, 8 tenants), each key sending to 2 of 12 models (7
//! OpenAI, 5 Anthropic), one row in 50 released, one in 20 estimated.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

#[path = "../tests/common/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use tollgate::spend::sql::{self, Dialect};
use tollgate::spend::{self, SpendParams, SpendStore};

/// A free loopback port for the private Postgres (used by the shared test helper).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// First row's start; rows cover the 30 days from here.
const T0: i64 = 1_793_491_200; // 2026-11-01T00:00:00Z
const SPAN_SECS: i64 = 30 * 86_400;

/// The generated rows, as one SQL expression per column over `i` (0..rows), identical in
/// both dialects except for the start time.
fn columns(rows: i64) -> Vec<(&'static str, String)> {
    let key = "((i * 7919) % 200)";
    let model = format!("(({key} + (i / 3) % 2) % 12)");
    vec![
        ("key_id", format!("'k_' || {key}")),
        ("user_id", format!("'user-' || ({key} % 40)")),
        ("tenant_id", format!("'tenant-' || ({key} % 8)")),
        (
            "upstream",
            format!("CASE WHEN {model} < 7 THEN 'openai' ELSE 'anthropic' END"),
        ),
        ("model", format!("'model-' || {model}")),
        (
            "status",
            "CASE WHEN i % 50 = 0 THEN 'released' ELSE 'settled' END".into(),
        ),
        ("input_tokens", "1000 + i % 3000".into()),
        ("cached_input_tokens", "(i % 5) * 100".into()),
        ("output_tokens", "100 + i % 700".into()),
        ("reasoning_tokens", "(i % 3) * 10".into()),
        ("reserved_micros", "5000".into()),
        (
            "cost_micros",
            "CASE WHEN i % 50 = 0 THEN 0 ELSE 300 + i % 9000 END".into(),
        ),
        (
            "usage_source",
            "CASE WHEN i % 50 = 0 THEN NULL WHEN i % 20 = 0 THEN 'estimated' ELSE 'upstream' END"
                .into(),
        ),
        ("http_status", "200".into()),
        ("instance_id", "'bench'".into()),
        // Evenly spread: row i starts i * SPAN / rows seconds after T0.
        ("started_at", format!("{T0} + (i * {SPAN_SECS}) / {rows}")),
    ]
}

fn fill_sqlite(c: &rusqlite::Connection, rows: i64) {
    let cols = columns(rows);
    let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
    let exprs: Vec<String> = cols
        .iter()
        .map(|(n, e)| {
            if *n == "started_at" {
                format!("strftime('%Y-%m-%dT%H:%M:%S.000000Z', {e}, 'unixepoch')")
            } else {
                e.clone()
            }
        })
        .collect();
    c.execute_batch(&format!(
        "BEGIN;
         WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {rows} - 1)
         INSERT INTO billing_transactions (trace_id, {}) SELECT printf('t%08d', i), {} FROM s;
         COMMIT;",
        names.join(", "),
        exprs.join(", ")
    ))
    .unwrap();
}

async fn fill_pg(c: &tokio_postgres::Client, rows: i64) {
    let cols = columns(rows);
    let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
    let exprs: Vec<String> = cols
        .iter()
        .map(|(n, e)| match *n {
            "started_at" => format!("to_timestamp({e})"),
            _ => e.clone(),
        })
        .collect();
    c.batch_execute(&format!(
        "INSERT INTO billing_transactions (trace_id, {}) SELECT 't' || i, {} FROM generate_series(0::bigint, {rows} - 1) AS i",
        names.join(", "),
        exprs.join(", ")
    ))
    .await
    .unwrap();
    // One statement each: VACUUM refuses to run inside a multi-statement batch.
    for table in ["billing_transactions", "spend_hourly", "spend_hourly_model"] {
        c.batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .unwrap();
    }
}

/// The reports timed: (name, params, zone).
fn asks() -> Vec<(&'static str, SpendParams, Tz)> {
    let p = |by: &str, key: Option<&str>| SpendParams {
        since: Some("2026-11-01".into()),
        until: Some("2026-12-01".into()),
        group_by: Some(by.into()),
        key: key.map(str::to_string),
        ..SpendParams::default()
    };
    let relative = SpendParams {
        since: Some("2026-11-01T00:17:23Z".into()),
        until: Some("2026-11-30T23:41:07Z".into()),
        group_by: Some("day,model".into()),
        ..SpendParams::default()
    };
    vec![
        (
            "30 days by day,model (UTC)",
            p("day,model", None),
            chrono_tz::UTC,
        ),
        (
            "30 days by day,model (Europe/Berlin)",
            p("day,model", None),
            chrono_tz::Europe::Berlin,
        ),
        (
            "30 days by day,model, cut ends (UTC)",
            relative,
            chrono_tz::UTC,
        ),
        ("30 days by hour (UTC)", p("hour", None), chrono_tz::UTC),
        (
            "30 days by day, one key (UTC)",
            p("day", Some("k_7")),
            chrono_tz::UTC,
        ),
        ("30 days by key (UTC)", p("key", None), chrono_tz::UTC),
        (
            "30 days by day,model (Asia/Kolkata, every row read)",
            p("day,model", None),
            chrono_tz::Asia::Kolkata,
        ),
    ]
}

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 5, 0, 0, 0).unwrap()
}

/// Time each report `runs` times; print median and max; check the totals.
fn time_reports(
    rt: &tokio::runtime::Runtime,
    mode: &str,
    store: &dyn SpendStore,
    runs: usize,
    expected_cost: i64,
) {
    for (name, params, tz) in asks() {
        let mut times = Vec::new();
        let mut v = serde_json::Value::Null;
        for _ in 0..runs {
            let t = Instant::now();
            v = rt
                .block_on(spend::report(store, &params, now(), tz))
                .unwrap();
            times.push(t.elapsed());
        }
        times.sort();
        let median = times[times.len() / 2];
        let max = times[times.len() - 1];
        println!(
            "{mode:<8} {name:<52} median {:>9.2?}  max {:>9.2?}  ({} rows, {} requests)",
            median,
            max,
            v["rows"].as_array().map_or(0, Vec::len),
            v["totals"]["requests"]
        );
        if params.key.is_none()
            && params.since.as_deref() == Some("2026-11-01")
            && tz == chrono_tz::UTC
        {
            assert_eq!(
                v["totals"]["cost_micros"].as_i64().unwrap(),
                expected_cost,
                "{name}"
            );
        }
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rows: i64 = std::env::var("SPEND_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1_000_000 } else { 20_000 });
    let runs: usize = std::env::var("SPEND_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 15 } else { 2 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let main_plan = |tz| spend::plan(&asks()[0].1, now(), tz).unwrap();

    // Embedded.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    drop(tollgate::db::Db::open(&path, tollgate::config::Durability::Normal).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let t = Instant::now();
    fill_sqlite(&conn, rows);
    let fill = t.elapsed();
    conn.execute_batch("ANALYZE").unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    let expected_cost =
        count("SELECT SUM(cost_micros) FROM billing_transactions WHERE status = 'settled'");
    println!(
        "sqlite: {rows} rows written in {fill:.2?} ({} rollup rows, {} narrow rollup rows, file {} MB)",
        count("SELECT COUNT(*) FROM spend_hourly"),
        count("SELECT COUNT(*) FROM spend_hourly_model"),
        std::fs::metadata(&path)
            .map(|m| m.len() / 1_000_000)
            .unwrap_or(0)
    );
    let (q, params) = sql::groups(Dialect::Sqlite, &main_plan(chrono_tz::UTC));
    let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {q}")).unwrap();
    let plan: Vec<String> = st
        .query_map(rusqlite::params_from_iter(params.iter()), |r| {
            Ok(format!(
                "  {:?} {}",
                r.get::<_, i64>(0)?,
                r.get::<_, String>(3)?
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    println!(
        "sqlite plan of `30 days by day,model (UTC)`:\n{}",
        plan.join("\n")
    );
    let store = spend::sqlite::SqliteSpend::new(&path);
    time_reports(&rt, "sqlite", &store, runs, expected_cost);
    drop(st);
    drop(conn);

    // Shared.
    let pg = pg::TestPg::start();
    let ledger = tollgate::ledger::postgres::PgLedger::new(&pg.url()).unwrap();
    rt.block_on(ledger.migrate()).unwrap();
    let client = rt.block_on(pg.client());
    let t = Instant::now();
    rt.block_on(fill_pg(&client, rows));
    let fill = t.elapsed();
    let count = |sql: &str| -> i64 { rt.block_on(client.query_one(sql, &[])).unwrap().get(0) };
    let expected_pg =
        count("SELECT SUM(cost_micros)::bigint FROM billing_transactions WHERE status = 'settled'");
    assert_eq!(
        expected_pg, expected_cost,
        "both ledgers hold the same rows"
    );
    println!(
        "postgres: {rows} rows written in {fill:.2?} (with VACUUM ANALYZE; {} rollup rows, {} narrow rollup rows)",
        count("SELECT COUNT(*) FROM spend_hourly"),
        count("SELECT COUNT(*) FROM spend_hourly_model"),
    );
    let (q, params) = sql::groups(Dialect::Postgres, &main_plan(chrono_tz::UTC));
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let plan = rt
        .block_on(client.query(&format!("EXPLAIN (ANALYZE, BUFFERS) {q}"), &refs))
        .unwrap();
    println!("postgres plan of `30 days by day,model (UTC)`:");
    for r in plan {
        println!("  {}", r.get::<_, String>(0));
    }
    let store = spend::pg::PgSpend::new(&pg.url()).unwrap();
    time_reports(&rt, "postgres", &store, runs, expected_cost);
    std::thread::sleep(Duration::from_millis(10));
    drop(pg);
}
