//! Spend reports (`GET /admin/spend`, `tollgate report`):
//!
//! - over random ledgers, in both backends (the embedded SQLite ledger and a private
//!   Postgres), every report equals a recomputation straight from the rows, with buckets
//!   from `calendar_bounds` in several time zones;
//! - against the real binary, after real traffic: the API's sums equal the ledger's, the
//!   CLI's CSV and JSON equal the API's answer, with the instance up and (reading storage)
//!   down; bad parameters are refused with a clear 400; in shared mode the report reads
//!   the Postgres ledger of record.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Tz;
use common::pg::TestPg;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use serde_json::{Value, json};
use tollgate::quota::window::{CalendarUnit, calendar_bounds};
use tollgate::spend::{self, SpendParams, SpendStore};

/// One generated ledger row.
#[derive(Debug, Clone)]
struct Row {
    key: &'static str,
    user: Option<&'static str>,
    tenant: Option<&'static str>,
    upstream: &'static str,
    model: &'static str,
    status: &'static str,
    tokens: [i64; 5],
    cost: i64,
    estimated: bool,
    started_at: DateTime<Utc>,
}

const KEYS: &[&str] = &["k_a", "k_B", "k_c"];
const USERS: &[Option<&str>] = &[None, Some("alice"), Some("Bob"), Some("émile")];
const TENANTS: &[Option<&str>] = &[None, Some("acme"), Some("Zeta")];
const UPSTREAMS: &[&str] = &["openai", "anthropic"];
const MODELS: &[&str] = &[
    "gpt-4o-mini",
    "claude-sonnet-4-5",
    "Zed",
    "it's \"quoted\"",
    "b",
];
const ZONES: &[&str] = &[
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
];
const DIMS: &[&str] = &[
    "",
    "hour",
    "day",
    "week",
    "month",
    "model",
    "upstream",
    "key",
    "user",
    "tenant",
    "day,model",
    "week,key",
    "month,tenant",
    "user,hour",
    "model,upstream",
    "tenant,user",
    "key,day",
];

/// The anchor of generated times: a month with a DST change in both hemispheres' zones.
fn anchor() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 20, 0, 0, 0).unwrap()
}

fn row_strategy() -> impl Strategy<Value = Row> {
    (
        (
            prop::sample::select(KEYS),
            prop::sample::select(USERS),
            prop::sample::select(TENANTS),
            prop::sample::select(UPSTREAMS),
            prop::sample::select(MODELS),
        ),
        (
            prop::sample::select(&["settled", "settled", "settled", "released", "reserved"][..]),
            prop::array::uniform5(0i64..5_000_000),
            0i64..50_000_000_000,
            any::<bool>(),
            // Within 40 days of the anchor; three rows in ten on a whole UTC day or hour, so
            // rows fall on bucket boundaries too.
            (-40 * 86_400i64..40 * 86_400, 0u8..10),
        ),
    )
        .prop_map(
            |((key, user, tenant, upstream, model), (status, tokens, cost, estimated, (s, k)))| {
                let secs = match k {
                    0 => s - s.rem_euclid(86_400),
                    1 | 2 => s - s.rem_euclid(3_600),
                    _ => s,
                };
                let micros = if k <= 2 {
                    0
                } else {
                    (s.rem_euclid(997) * 1003) % 1_000_000
                };
                Row {
                    key,
                    user,
                    tenant,
                    upstream,
                    model,
                    status,
                    tokens,
                    cost,
                    estimated,
                    started_at: anchor() + Duration::seconds(secs) + Duration::microseconds(micros),
                }
            },
        )
}

/// A report request: params, and the zone.
#[derive(Debug, Clone)]
struct Ask {
    params: SpendParams,
    tz: &'static str,
}

fn ask_strategy() -> impl Strategy<Value = Ask> {
    (
        prop::sample::select(ZONES),
        prop::sample::select(DIMS),
        -42 * 86_400i64..0,
        1i64..41 * 86_400,
        prop::option::of(prop::sample::select(KEYS)),
        prop::option::of(prop::sample::select(MODELS)),
        prop::option::of(prop::sample::select(&["alice", "Bob"][..])),
        prop::option::of(1usize..12),
    )
        .prop_map(|(tz, dims, since, len, key, model, user, limit)| {
            let since_t = anchor() + Duration::seconds(since);
            let until_t = since_t + Duration::seconds(len);
            Ask {
                params: SpendParams {
                    since: Some(tollgate::time::to_text(since_t)),
                    until: Some(tollgate::time::to_text(until_t)),
                    group_by: (!dims.is_empty()).then(|| dims.to_string()),
                    key: key.map(str::to_string),
                    user: user.map(str::to_string),
                    model: model.map(str::to_string),
                    limit: limit.map(|n| n.to_string()),
                    ..SpendParams::default()
                },
                tz,
            }
        })
}

/// A group of the recomputed report: its bucket start and dimension values.
type GroupKey = (Option<DateTime<Utc>>, Vec<Option<String>>);

/// The report recomputed from the rows alone: (rows, totals, released, truncated) as JSON.
fn expected(rows: &[Row], ask: &Ask) -> Value {
    let tz: Tz = ask.tz.parse().unwrap();
    let p = &ask.params;
    let since = tollgate::time::from_text(p.since.as_deref().unwrap()).unwrap();
    let until = tollgate::time::from_text(p.until.as_deref().unwrap()).unwrap();
    let dims: Vec<&str> = p
        .group_by
        .as_deref()
        .map(|g| g.split(',').collect())
        .unwrap_or_default();
    let unit = dims.iter().find_map(|d| match *d {
        "hour" => Some(CalendarUnit::Hour),
        "day" => Some(CalendarUnit::Day),
        "week" => Some(CalendarUnit::Week),
        "month" => Some(CalendarUnit::Month),
        _ => None,
    });
    let others: Vec<&str> = dims
        .iter()
        .copied()
        .filter(|d| !["hour", "day", "week", "month"].contains(d))
        .collect();
    let matches = |r: &Row| {
        r.started_at >= since
            && r.started_at < until
            && p.key.as_deref().is_none_or(|k| k == r.key)
            && p.user.as_deref().is_none_or(|u| Some(u) == r.user)
            && p.model.as_deref().is_none_or(|m| m == r.model)
    };
    // Group key: (bucket start, dimension values) → sums [requests, 5 tokens, cost, estimated].
    let mut groups: BTreeMap<GroupKey, [i64; 8]> = BTreeMap::new();
    let mut totals = [0i64; 8];
    let mut released = 0;
    for r in rows.iter().filter(|r| matches(r)) {
        if r.status == "released" {
            released += 1;
        }
        if r.status != "settled" {
            continue;
        }
        let bucket = unit.map(|u| calendar_bounds(u, r.started_at, tz).0);
        let values: Vec<Option<String>> = others
            .iter()
            .map(|d| match *d {
                "model" => Some(r.model.to_string()),
                "upstream" => Some(r.upstream.to_string()),
                "key" => Some(r.key.to_string()),
                "user" => r.user.map(str::to_string),
                "tenant" => r.tenant.map(str::to_string),
                other => panic!("{other}"),
            })
            .collect();
        let add = [
            1,
            r.tokens[0],
            r.tokens[1],
            r.tokens[2],
            r.tokens[3],
            r.tokens[4],
            r.cost,
            i64::from(r.estimated),
        ];
        let g = groups.entry((bucket, values)).or_default();
        for i in 0..8 {
            g[i] += add[i];
            totals[i] += add[i];
        }
    }
    let mut list: Vec<_> = groups.into_iter().collect();
    // By bucket, then cost (highest first), then dimension values (None first, bytes).
    list.sort_by(|((b1, d1), s1), ((b2, d2), s2)| {
        b1.cmp(b2).then(s2[6].cmp(&s1[6])).then(d1.cmp(d2))
    });
    let limit: usize = p.limit.as_deref().map_or(1000, |l| l.parse().unwrap());
    let truncated = list.len() > limit;
    list.truncate(limit);
    let sums = |s: &[i64; 8]| {
        json!({
            "requests": s[0], "input_tokens": s[1], "cached_input_tokens": s[2],
            "cache_write_tokens": s[3], "output_tokens": s[4], "reasoning_tokens": s[5],
            "cost_micros": s[6], "cost_usd": tollgate::money::format_usd(s[6]), "estimated": s[7],
        })
    };
    let rows: Vec<Value> = list
        .iter()
        .map(|((bucket, values), s)| {
            let mut v = sums(s);
            if let (Some(b), Some(u)) = (bucket, unit) {
                let end = calendar_bounds(u, *b, tz).1;
                let local = |t: DateTime<Utc>| {
                    t.with_timezone(&tz)
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                };
                v["period_start"] = local(*b).into();
                v["period_end"] = local(end).into();
            }
            for (d, val) in others.iter().zip(values) {
                v[*d] = val.clone().into();
            }
            v
        })
        .collect();
    json!({"rows": rows, "totals": sums(&totals), "released_requests": released, "truncated": truncated})
}

/// The parts of a report [`expected`] recomputes (rows compared as objects, any key order).
fn comparable(v: &Value) -> Value {
    json!({
        "rows": v["rows"], "totals": v["totals"],
        "released_requests": v["released_requests"], "truncated": v["truncated"],
    })
}

fn insert_sqlite(c: &rusqlite::Connection, rows: &[Row]) {
    c.execute_batch("BEGIN; DELETE FROM billing_transactions;")
        .unwrap();
    for (i, r) in rows.iter().enumerate() {
        c.execute(
            "INSERT INTO billing_transactions (trace_id, key_id, user_id, tenant_id, upstream, model, status,
                input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
                cost_micros, usage_source, started_at, instance_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, 'i')",
            rusqlite::params![
                format!("t{i}"),
                r.key,
                r.user,
                r.tenant,
                r.upstream,
                r.model,
                r.status,
                r.tokens[0],
                r.tokens[1],
                r.tokens[2],
                r.tokens[3],
                r.tokens[4],
                r.cost,
                if r.estimated { "estimated" } else { "upstream" },
                tollgate::time::to_text(r.started_at),
            ],
        )
        .unwrap();
    }
    // Every third row goes back to `reserved` and is settled again, so the rollups see
    // updates (old row out, new row in) as well as inserts.
    for i in (1..rows.len()).step_by(3) {
        let r = &rows[i];
        c.execute(
            "UPDATE billing_transactions SET status = 'reserved', cost_micros = 0 WHERE trace_id = ?1",
            [format!("t{i}")],
        )
        .unwrap();
        c.execute(
            "UPDATE billing_transactions SET status = ?2, cost_micros = ?3 WHERE trace_id = ?1",
            rusqlite::params![format!("t{i}"), r.status, r.cost],
        )
        .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
}

async fn insert_pg(c: &tokio_postgres::Client, rows: &[Row]) {
    // TRUNCATE fires no row or statement delete trigger: clear the rollups with it.
    c.batch_execute("TRUNCATE billing_transactions, spend_hourly, spend_hourly_model")
        .await
        .unwrap();
    let st = c
        .prepare(
            "INSERT INTO billing_transactions (trace_id, key_id, user_id, tenant_id, upstream, model, status,
                input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
                cost_micros, usage_source, started_at, instance_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, ($15::text)::timestamptz, 'i')",
        )
        .await
        .unwrap();
    for (i, r) in rows.iter().enumerate() {
        c.execute(
            &st,
            &[
                &format!("t{i}"),
                &r.key,
                &r.user,
                &r.tenant,
                &r.upstream,
                &r.model,
                &r.status,
                &r.tokens[0],
                &r.tokens[1],
                &r.tokens[2],
                &r.tokens[3],
                &r.tokens[4],
                &r.cost,
                &(if r.estimated { "estimated" } else { "upstream" }),
                &tollgate::time::to_text(r.started_at),
            ],
        )
        .await
        .unwrap();
    }
    for i in (1..rows.len()).step_by(3) {
        let r = &rows[i];
        c.execute(
            "UPDATE billing_transactions SET status = 'reserved', cost_micros = 0 WHERE trace_id = $1",
            &[&format!("t{i}")],
        )
        .await
        .unwrap();
        c.execute(
            "UPDATE billing_transactions SET status = $2, cost_micros = $3 WHERE trace_id = $1",
            &[&format!("t{i}"), &r.status, &r.cost],
        )
        .await
        .unwrap();
    }
}

/// Run the property over `cases` random ledgers, each asked `asks` random reports.
fn check_backend(
    rt: &tokio::runtime::Runtime,
    cases: u32,
    store: &dyn SpendStore,
    load: impl Fn(&[Row]),
) {
    let mut runner = TestRunner::new(PropConfig {
        cases,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let strategy = (
        prop::collection::vec(row_strategy(), 0..160),
        prop::collection::vec(ask_strategy(), 1..6),
    );
    runner
        .run(&strategy, |(rows, asks)| {
            load(&rows);
            for ask in &asks {
                let tz: Tz = ask.tz.parse().unwrap();
                let got = rt
                    .block_on(spend::report(store, &ask.params, anchor(), tz))
                    .unwrap();
                prop_assert_eq!(comparable(&got), expected(&rows, ask), "{:?}", ask);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn reports_equal_a_recomputation_from_the_rows_sqlite() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    drop(tollgate::db::Db::open(&path, tollgate::config::Durability::Normal).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let store = spend::sqlite::SqliteSpend::new(&path);
    check_backend(&rt, 200, &store, |rows| insert_sqlite(&conn, rows));
}

#[test]
fn reports_equal_a_recomputation_from_the_rows_postgres() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = TestPg::start();
    let ledger = tollgate::ledger::postgres::PgLedger::new(&pg.url()).unwrap();
    rt.block_on(ledger.migrate()).unwrap();
    let client = rt.block_on(pg.client());
    let store = spend::pg::PgSpend::new(&pg.url()).unwrap();
    check_backend(&rt, 60, &store, |rows| {
        rt.block_on(insert_pg(&client, rows))
    });
}

async fn admin_get(proxy: &Proxy, path: &str) -> Reply {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    send(
        "GET",
        &format!("http://{}{path}", proxy.admin),
        &[("authorization", auth.as_str())],
        "",
    )
    .await
}

/// Parse CSV lines (no quoted commas in these values) into header-keyed maps.
fn csv_rows(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let head: Vec<String> = lines
        .next()
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    lines
        .map(|l| {
            head.iter()
                .cloned()
                .zip(l.split(',').map(str::to_string))
                .collect()
        })
        .collect()
}

fn json_cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn api_cli_and_csv_agree_with_the_ledger() {
    let (_mock, mut proxy) = start(ProxyOptions {
        extra: "[quota]\ntimezone = \"Asia/Kathmandu\"\n".into(),
        ..ProxyOptions::default()
    })
    .await;
    let (a, a_secret) = proxy
        .create_live_key(&["--user", "alice", "--tenant", "acme"])
        .await;
    let (b, b_secret) = proxy.create_live_key(&[]).await;
    for (secret, model, n) in [
        (&a_secret, "gpt-4o-mini", 3),
        (&a_secret, "gpt-4o", 1),
        (&b_secret, "gpt-4o-mini", 2),
    ] {
        for _ in 0..n {
            let r = post_json(
                &proxy.url("/v1/chat/completions"),
                secret,
                &chat_body(model, n == 2, "count the costs"),
                &[],
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    // A request the upstream refuses is released: counted apart, not billed.
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &b_secret,
        &chat_body("gpt-4o-mini", false, "x"),
        &[("x-mock-status", "500")],
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.text());
    proxy.wait_settled().await;
    let ledger = proxy.ledger();
    assert_eq!(ledger.len(), 7);

    let since = tollgate::time::to_text(Utc::now() - Duration::days(2));
    let until = tollgate::time::to_text(Utc::now() + Duration::hours(1));
    let q = format!(
        "since={}&until={}&group_by=key,model",
        tollgate::admin::encode_component(&since),
        tollgate::admin::encode_component(&until)
    );
    let r = admin_get(&proxy, &format!("/admin/spend?{q}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let api = r.json();
    assert_eq!(api["timezone"], "Asia/Kathmandu");
    assert_eq!(api["released_requests"], 1);
    // The API's sums are the ledger's.
    let settled: Vec<&Value> = ledger.iter().filter(|r| r["status"] == "settled").collect();
    let sum = |f: &str| settled.iter().map(|r| r[f].as_i64().unwrap()).sum::<i64>();
    assert_eq!(api["totals"]["requests"], 6);
    for f in [
        "input_tokens",
        "output_tokens",
        "cost_micros",
        "cached_input_tokens",
    ] {
        assert_eq!(api["totals"][f], sum(f), "{f}");
    }
    assert!(sum("cost_micros") > 0);
    let rows = api["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{api}");
    for row in rows {
        let mine: Vec<&&Value> = settled
            .iter()
            .filter(|r| r["key_id"] == row["key"] && r["model"] == row["model"])
            .collect();
        assert_eq!(row["requests"], mine.len());
        assert_eq!(
            row["cost_micros"],
            mine.iter()
                .map(|r| r["cost_micros"].as_i64().unwrap())
                .sum::<i64>()
        );
    }
    assert!(rows.iter().any(|r| r["key"] == a.as_str()));
    assert!(rows.iter().any(|r| r["key"] == b.as_str()));

    // The CLI asks the running instance: its JSON is the API's, its CSV the API's rows.
    let args = [
        "report",
        "--since",
        &since,
        "--until",
        &until,
        "--by",
        "key,model",
    ];
    let (code, out, err) = proxy.cli(&[&args[..], &["--json"]].concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), api);
    let (code, csv, err) = proxy.cli(&[&args[..], &["--csv"]].concat());
    assert_eq!(code, 0, "{err}");
    let parsed = csv_rows(&csv);
    assert_eq!(parsed.len(), rows.len());
    for (line, row) in parsed.iter().zip(rows) {
        let obj = row.as_object().unwrap();
        assert_eq!(line.len(), obj.len(), "{line:?} vs {row}");
        for (k, v) in obj {
            assert_eq!(line[k], json_cell(v), "{k}");
        }
    }
    // The table ends with the totals row.
    let (code, table, _) = proxy.cli(&args);
    assert_eq!(code, 0);
    let total_line = table.lines().find(|l| l.starts_with("total")).unwrap();
    assert!(
        total_line.contains(api["totals"]["cost_usd"].as_str().unwrap()),
        "{table}"
    );
    assert!(
        table.contains("released (upstream refused, not billed): 1 requests"),
        "{table}"
    );

    // Bad parameters: a clear 400, from the API and from the CLI.
    for (bad, says) in [
        ("group_by=day,hour", "at most one of hour"),
        ("group_by=price", "unknown `group_by`"),
        ("since=2026-13-01", "`since` must be"),
        ("since=2024-01-01&until=2026-01-01", "366 days"),
        ("limit=0", "`limit`"),
        ("colour=red", "unknown query parameter"),
    ] {
        let r = admin_get(&proxy, &format!("/admin/spend?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_request");
        assert!(r.text().contains(says), "{bad}: {}", r.text());
    }
    let (code, _, err) = proxy.cli(&["report", "--by", "day,hour"]);
    assert_eq!(code, 1);
    assert!(err.contains("at most one of hour"), "{err}");

    // With the instance down the CLI reads the ledger itself: the same report.
    proxy.kill9();
    let (code, out, err) = proxy.cli(&[&args[..], &["--json"]].concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), api);
    let (code, offline_csv, _) = proxy.cli(&[&args[..], &["--csv"]].concat());
    assert_eq!(code, 0);
    assert_eq!(offline_csv, csv);
}

#[tokio::test]
async fn shared_mode_reports_the_postgres_ledger() {
    let pg = TestPg::start();
    let mock = mock().await;
    let storage = format!(
        "postgres_url = \"{}\"\nredis_url = \"redis://127.0.0.1:1\"",
        pg.url()
    );
    let proxy = Proxy::start_edited(mock.addr, ProxyOptions::default(), |c| {
        shared_mode(&c, &storage)
    })
    .await;
    let (_, secret) = proxy.create_live_key(&["--user", "ops"]).await;
    for _ in 0..3 {
        let r = post_json(
            &proxy.url("/v1/chat/completions"),
            &secret,
            &chat_body("gpt-4o-mini", false, "hello"),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let rows = pg
        .wait_ledger("3 settled rows in Postgres", |rows| {
            rows.len() == 3 && rows.iter().all(|r| r["status"] == "settled")
        })
        .await;
    let cost: i64 = rows
        .iter()
        .map(|r| r["cost_micros"].as_i64().unwrap())
        .sum();
    let r = admin_get(&proxy, "/admin/spend?since=1d&group_by=user").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["rows"][0]["user"], "ops");
    assert_eq!(v["rows"][0]["requests"], 3);
    assert_eq!(v["totals"]["cost_micros"], cost);
    // Postgres down: the report says so (503), it does not answer zeros.
    pg.stop();
    let r = admin_get(&proxy, "/admin/spend?since=1d").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "store_unavailable");
    // What waits to ship ages in the metric the shipping-stalled alert reads.
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &secret,
        &chat_body("gpt-4o-mini", false, "while postgres is down"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = format!("http://{}/metrics", proxy.admin);
    let mut age = 0;
    for _ in 0..200 {
        let text = send("GET", &metrics, &[], "").await.text();
        age = text
            .lines()
            .find_map(|l| l.strip_prefix("tollgate_journal_oldest_unshipped_seconds "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        if age >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(age >= 1, "the oldest unshipped event's age never showed");
}
