//! Shared mode end to end with a real PostgreSQL per test: the journal as outbox, the
//! shipper, keys from Postgres, crash recovery, Postgres outages, and reconcile.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::pg::{Relay, TestPg};
use common::*;
use tollgate::ledger::Transaction;
use tollgate::ledger::postgres::PgLedger;

/// A proxy in shared mode against `pg` (counters in process until the Redis store lands).
async fn shared_proxy(pg: &TestPg, upstream: std::net::SocketAddr) -> Proxy {
    shared_proxy_at(&pg.url(), upstream).await
}

/// A proxy in shared mode against the Postgres at `url`.
async fn shared_proxy_at(url: &str, upstream: std::net::SocketAddr) -> Proxy {
    shared_proxy_on(url, "redis://127.0.0.1:1", upstream).await
}

/// A proxy in shared mode on `postgres_url` with its counters in the Redis at `redis_url`.
async fn shared_proxy_on(
    postgres_url: &str,
    redis_url: &str,
    upstream: std::net::SocketAddr,
) -> Proxy {
    let storage = format!(
        "postgres_url = \"{postgres_url}\"\nredis_url = \"{redis_url}\"\njournal_retention = \"1h\""
    );
    Proxy::start_edited(upstream, ProxyOptions::default(), |c| {
        shared_mode(&c, &storage)
    })
    .await
}

async fn setup() -> (TestPg, mock_upstream::MockHandle, Proxy) {
    let pg = TestPg::start();
    let mock = mock().await;
    let proxy = shared_proxy(&pg, mock.addr).await;
    (pg, mock, proxy)
}

fn cli_json(proxy: &Proxy, args: &[&str]) -> (i32, serde_json::Value) {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out, err) = proxy.cli(&a);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out} {err}"));
    (code, v)
}

fn backlog(proxy: &Proxy) -> i64 {
    let (code, v) = cli_json(proxy, &["journal", "status"]);
    assert_eq!(code, 0);
    v["backlog"]["postgres"].as_i64().unwrap()
}

/// The local journal's latest row per trace id (what this instance billed).
fn journal_rows(proxy: &Proxy) -> Vec<Transaction> {
    let c = rusqlite::Connection::open(proxy.db_path()).unwrap();
    let mut st = c.prepare("SELECT row FROM journal_traces").unwrap();
    st.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|t| serde_json::from_str(&t.unwrap()).unwrap())
        .collect()
}

async fn chat(proxy: &Proxy, key: &str, stream: bool, extra: &[(&str, &str)]) -> Reply {
    post_json(
        &proxy.url("/v1/chat/completions"),
        key,
        &chat_body("gpt-4o-mini", stream, "hello there"),
        extra,
    )
    .await
}

#[tokio::test]
async fn shared_mode_serves_and_ships_every_row() {
    let (pg, _mock, proxy) = setup().await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=100", "--limit", "usd:day=5"])
        .await;
    let mut traces = Vec::new();
    for i in 0..6 {
        let r = chat(&proxy, &key, i % 2 == 0, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        traces.push(r.header("x-tollgate-trace-id").unwrap().to_string());
    }
    let r = chat(&proxy, &key, false, &[("x-mock-status", "500")]).await;
    assert_eq!(r.status, 500);
    traces.push(r.header("x-tollgate-trace-id").unwrap().to_string());

    let rows = pg
        .wait_ledger("7 final rows", |rows| {
            rows.len() == 7 && rows.iter().all(|r| r["status"] != "reserved")
        })
        .await;
    let ids: HashSet<&str> = rows
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 7, "one row per trace id");
    assert_eq!(
        ids,
        traces.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    // The ledger of record equals what this instance billed, field by field.
    let local = journal_rows(&proxy);
    assert_eq!(local.len(), 7);
    for l in &local {
        let r = rows.iter().find(|r| r["trace_id"] == l.trace_id).unwrap();
        assert_eq!(r["status"], l.status.as_str());
        assert_eq!(r["key_id"], key_id.as_str());
        assert_eq!(r["input_tokens"], l.input_tokens);
        assert_eq!(r["output_tokens"], l.output_tokens);
        assert_eq!(r["cost_micros"], l.cost_micros);
        assert_eq!(r["reserved_micros"], l.reserved_micros);
        assert!(
            l.reserved_micros > 0,
            "the held estimate is kept after settle"
        );
        assert_eq!(r["usage_source"].as_str(), l.usage_source.as_deref());
        assert_eq!(r["http_status"].as_i64(), l.http_status);
        assert_eq!(r["stream"], l.stream);
        assert_eq!(r["instance_id"], "test-instance");
        assert_eq!(r["final_at_set"], true);
    }
    assert_eq!(rows.iter().filter(|r| r["status"] == "settled").count(), 6);
    assert_eq!(rows.iter().filter(|r| r["status"] == "released").count(), 1);
    assert!(
        rows.iter()
            .filter(|r| r["status"] == "settled")
            .all(|r| r["usage_source"] == "upstream" && r["cost_micros"].as_i64().unwrap() > 0)
    );
    // Nothing left to ship; the admin API answers the status.
    eventually("backlog drained", || backlog(&proxy) == 0).await;
    let (_, v) = cli_json(&proxy, &["journal", "status"]);
    assert_eq!(v["oldest_unshipped_at"], serde_json::Value::Null);
    // The counters agree with the Postgres ledger.
    let (code, v) = cli_json(&proxy, &["reconcile"]);
    assert_eq!(
        (code, v["differences"].as_array().unwrap().len()),
        (0, 0),
        "{v}"
    );
    assert!(v["checked"].as_i64().unwrap() >= 2);
}

#[tokio::test]
async fn postgres_down_changes_nothing_on_the_request_path() {
    let (pg, _mock, proxy) = setup().await;
    let (id, key) = proxy
        .create_live_key(&["--limit", "requests:total=50"])
        .await;
    let r = chat(&proxy, &key, false, &[]).await;
    assert_eq!(r.status, 200);
    pg.wait_ledger("first row", |rows| {
        rows.len() == 1 && rows[0]["status"] == "settled"
    })
    .await;

    pg.stop();
    let t0 = Instant::now();
    for i in 0..10 {
        let r = chat(&proxy, &key, i % 2 == 1, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "requests never wait on postgres: {:?}",
        t0.elapsed()
    );
    // Reserve + settle of each request wait in the journal.
    eventually("backlog of 20", || backlog(&proxy) == 20).await;
    let (_, v) = cli_json(&proxy, &["journal", "status"]);
    assert!(v["oldest_unshipped_at"].is_string(), "{v}");
    // Creating a key needs Postgres: a clear error, not a hang.
    let (code, _, err) = proxy.cli(&["keys", "create", "--name", "x"]);
    assert_ne!(code, 0);
    assert!(err.contains("postgres is unavailable"), "{err}");
    // Quota still enforced from local counters.
    let (_, u) = cli_json(&proxy, &["usage", "--key", &id]);
    assert_eq!(u["limits"][0]["used"], 11);

    pg.start_again();
    let rows = pg
        .wait_ledger("11 settled rows", |rows| {
            rows.len() == 11 && rows.iter().all(|r| r["status"] == "settled")
        })
        .await;
    let ids: HashSet<&str> = rows
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 11, "no duplicates");
    eventually("backlog drained", || backlog(&proxy) == 0).await;

    // Replaying every retained event, twice, changes nothing.
    for _ in 0..2 {
        let (code, v) = cli_json(&proxy, &["journal", "replay", "--all"]);
        assert_eq!(code, 0, "{v}");
        assert_eq!(v["shipped"], 22);
        assert_eq!(v["rows"], 0, "no ledger row changed");
        assert_eq!(pg.ledger().await, rows);
    }
    let (code, v) = cli_json(&proxy, &["journal", "replay"]);
    assert_eq!((code, v["shipped"].as_i64()), (0, Some(0)));
}

#[tokio::test]
async fn sigkill_mid_stream_is_recovered_and_shipped() {
    let (pg, _mock, mut proxy) = setup().await;
    let (_, key) = proxy
        .create_live_key(&["--limit", "requests:total=5"])
        .await;
    for _ in 0..2 {
        assert_eq!(chat(&proxy, &key, false, &[]).await.status, 200);
    }
    let inflight = proxy.stream_in_flight(&key, &[]);
    pg.wait_ledger("the reservation reached postgres", |rows| {
        rows.iter().any(|r| r["status"] == "reserved")
    })
    .await;
    proxy.kill9();
    let _ = inflight.await;
    proxy.spawn().await;
    let rows = pg
        .wait_ledger("3 settled rows", |rows| {
            rows.len() == 3 && rows.iter().all(|r| r["status"] == "settled")
        })
        .await;
    let recovered = rows.iter().find(|r| r["stream"] == true).unwrap();
    assert_eq!(recovered["usage_source"], "estimated");
    assert_eq!(
        recovered["output_tokens"], 200,
        "billed at the held max output"
    );
    assert_eq!(recovered["http_status"], serde_json::Value::Null);
    // Counters were rebuilt from Postgres + journal: 3 used, 2 left.
    assert_eq!(chat(&proxy, &key, false, &[]).await.status, 200);
    assert_eq!(chat(&proxy, &key, false, &[]).await.status, 200);
    assert_eq!(chat(&proxy, &key, false, &[]).await.status, 429);
}

#[tokio::test]
async fn keys_come_from_postgres_and_survive_a_restart_while_it_is_down() {
    let (pg, _mock, mut proxy) = setup().await;
    // Live within 1 s (asserted by the helper), created in Postgres by the CLI.
    let (id, key) = proxy
        .create_live_key(&["--user", "alice", "--limit", "requests:day=100"])
        .await;
    let c = pg.client().await;
    let n: i64 = c
        .query_one("SELECT COUNT(*) FROM api_keys WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let (code, v) = cli_json(&proxy, &["keys", "show", &id]);
    assert_eq!(code, 0);
    assert_eq!(v["limits"], serde_json::json!(["requests:day=100"]));
    let (code, v) = cli_json(
        &proxy,
        &["limits", "set", "--user", "alice", "--limit", "usd:day=2"],
    );
    assert_eq!(
        (code, v["limits"].clone()),
        (0, serde_json::json!(["usd:day=2"]))
    );
    // A revoked key stops working within a second.
    let (_, other) = proxy.create_live_key(&[]).await;
    let (other_id, _) = {
        let (_, v) = cli_json(&proxy, &["keys", "list"]);
        let k = v
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] != id.as_str())
            .unwrap()
            .clone();
        (k["id"].as_str().unwrap().to_string(), k)
    };
    assert_eq!(proxy.cli(&["keys", "revoke", &other_id]).0, 0);
    let t0 = Instant::now();
    while chat(&proxy, &other, false, &[]).await.status != 401 {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "revoke not live after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(chat(&proxy, &key, false, &[]).await.status, 200);

    // Postgres down, the instance restarts: known keys (and their limits) still work.
    pg.stop();
    proxy.kill9();
    proxy.spawn().await;
    let r = chat(&proxy, &key, false, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(chat(&proxy, &other, false, &[]).await.status, 401);
    let (_, u) = cli_json(&proxy, &["usage", "--key", &id]);
    let specs: Vec<&str> = u["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["spec"].as_str().unwrap())
        .collect();
    assert_eq!(specs, ["requests:day=100", "usd:day=2"]);
    pg.start_again();
    pg.wait_ledger("both requests of the known key shipped", |rows| {
        rows.iter()
            .filter(|r| r["status"] == "settled" && r["key_id"] == id.as_str())
            .count()
            == 2
    })
    .await;
}

#[tokio::test]
async fn reconcile_finds_an_injected_difference_and_fix_clears_it() {
    let (pg, _mock, proxy) = setup().await;
    let (id, key) = proxy
        .create_live_key(&["--limit", "requests:total=100", "--limit", "usd:total=5"])
        .await;
    for _ in 0..2 {
        assert_eq!(chat(&proxy, &key, false, &[]).await.status, 200);
    }
    pg.wait_ledger("2 settled", |rows| {
        rows.len() == 2 && rows.iter().all(|r| r["status"] == "settled")
    })
    .await;
    let (code, v) = cli_json(&proxy, &["reconcile"]);
    assert_eq!(code, 0, "{v}");
    // Another instance billed this key (its row reached Postgres directly).
    pg.client()
        .await
        .execute(
            "INSERT INTO billing_transactions (trace_id, key_id, upstream, model, status, input_tokens, output_tokens,
               reserved_micros, cost_micros, usage_source, stream, http_status, started_at, settled_at, instance_id)
             VALUES ('other-1', $1, 'openai', 'gpt-4o-mini', 'settled', 10, 10, 2000000, 1500000, 'upstream', false, 200, now(), now(), 'sidecar-b')",
            &[&id],
        )
        .await
        .unwrap();
    let (code, v) = cli_json(&proxy, &["reconcile"]);
    assert_eq!(code, 1, "{v}");
    let diffs = v["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 2, "{v}");
    let req = diffs
        .iter()
        .find(|d| d["spec"] == "requests:total=100")
        .unwrap();
    assert_eq!(req["subject"], format!("key:{id}"));
    assert_eq!(
        (req["counter"].as_i64(), req["ledger"].as_i64()),
        (Some(2), Some(3))
    );
    let usd = diffs.iter().find(|d| d["spec"] == "usd:total=5").unwrap();
    let (counter, ledger) = (
        tollgate::money::parse_usd(usd["counter"].as_str().unwrap()).unwrap(),
        tollgate::money::parse_usd(usd["ledger"].as_str().unwrap()).unwrap(),
    );
    assert_eq!(ledger - counter, 1_500_000);

    let (code, v) = cli_json(&proxy, &["reconcile", "--fix"]);
    assert_eq!((code, v["fixed"].as_bool()), (1, Some(true)), "{v}");
    let (code, v) = cli_json(&proxy, &["reconcile"]);
    assert_eq!(code, 0, "{v}");
    let (_, u) = cli_json(&proxy, &["usage", "--key", &id]);
    let used = u["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["metric"] == "requests")
        .unwrap()["used"]
        .clone();
    assert_eq!(used, 3);
}

#[tokio::test]
async fn reconcile_works_in_embedded_mode() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let (id, key) = proxy
        .create_live_key(&["--limit", "requests:total=10"])
        .await;
    assert_eq!(chat(&proxy, &key, false, &[]).await.status, 200);
    eventually("settled", || {
        proxy.ledger().iter().any(|r| r["status"] == "settled")
    })
    .await;
    assert_eq!(cli_json(&proxy, &["reconcile"]).0, 0);
    let (_, v) = cli_json(&proxy, &["journal", "status"]);
    assert_eq!(v, serde_json::json!({"backlog": {}}));
    // A row the running counters never saw.
    let c = rusqlite::Connection::open(proxy.db_path()).unwrap();
    c.execute(
        "INSERT INTO billing_transactions (trace_id, key_id, upstream, model, status, started_at, instance_id)
         VALUES ('x-1', ?1, 'openai', 'gpt-4o-mini', 'settled', ?2, 'elsewhere')",
        rusqlite::params![id, tollgate::time::now_text()],
    )
    .unwrap();
    let (code, v) = cli_json(&proxy, &["reconcile"]);
    assert_eq!(code, 1);
    assert_eq!(v["differences"][0]["counter"], 1);
    assert_eq!(v["differences"][0]["ledger"], 2);
    assert_eq!(cli_json(&proxy, &["reconcile", "--fix"]).0, 1);
    assert_eq!(cli_json(&proxy, &["reconcile"]).0, 0);
}

fn row(trace: &str, status: &str, started: &str, cost: i64) -> Transaction {
    Transaction {
        trace_id: trace.into(),
        key_id: "k_1".into(),
        upstream: "openai".into(),
        model: "gpt-4o-mini".into(),
        status: status.into(),
        output_tokens: 5,
        reserved_micros: 900,
        cost_micros: cost,
        usage_source: (status == "settled").then(|| "upstream".into()),
        http_status: (status != "reserved").then_some(200),
        started_at: started.into(),
        settled_at: (status != "reserved").then(|| started.into()),
        instance_id: "i".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn ledger_upserts_only_move_rows_forward() {
    let pg = TestPg::start();
    let ledger = PgLedger::new(&pg.url()).unwrap();
    assert_eq!(ledger.migrate().await.unwrap(), vec![1, 2, 3, 4]);
    assert!(ledger.migrate().await.unwrap().is_empty(), "applied once");
    let (t1, t2) = ("2026-01-01T00:00:00.000001Z", "2026-01-01T00:00:05.000000Z");
    let reserve1 = row("a", "reserved", t1, 0);
    let release1 = row("a", "released", t1, 0);
    let reserve2 = row("a", "reserved", t2, 0);
    let settle2 = Transaction {
        cache_write_tokens: 9,
        cache_write_1h_tokens: 7,
        tool_calls: 2,
        service_tier: Some("flex".into()),
        price_version: Some("00ff00ff00ff00ff".into()),
        ..row("a", "settled", t2, 42)
    };
    // In order, one event per batch.
    for r in [&reserve1, &release1, &reserve2, &settle2] {
        assert_eq!(
            ledger.upsert_rows(std::slice::from_ref(r)).await.unwrap(),
            1
        );
    }
    let end = ledger.all_rows().await.unwrap();
    assert_eq!(end, vec![settle2.clone()]);
    // Replays of every older event, in any order, change nothing.
    for r in [&settle2, &reserve2, &release1, &reserve1] {
        assert_eq!(
            ledger.upsert_rows(std::slice::from_ref(r)).await.unwrap(),
            0
        );
    }
    assert_eq!(ledger.all_rows().await.unwrap(), end);
    // A released row takes a later reservation; a settled row never goes back.
    let b = [row("b", "released", t1, 0), row("c", "settled", t1, 7)];
    ledger.upsert_rows(&b).await.unwrap();
    let again = [row("b", "reserved", t2, 0), row("c", "reserved", t2, 0)];
    assert_eq!(ledger.upsert_rows(&again).await.unwrap(), 1);
    let rows = ledger.all_rows().await.unwrap();
    let status = |t: &str| {
        rows.iter()
            .find(|r| r.trace_id == t)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(
        (status("b"), status("c")),
        ("reserved".into(), "settled".into())
    );
    // Many rows in one statement.
    let many: Vec<Transaction> = (0..10_000)
        .map(|i| row(&format!("m{i}"), "settled", t1, i))
        .collect();
    assert_eq!(ledger.upsert_rows(&many).await.unwrap(), 10_000);
    assert_eq!(ledger.upsert_rows(&many).await.unwrap(), 0);
    // After every forward move, refused replay and reuse above, the hourly rollups hold
    // exactly the ledger's settled and released rows: a (settled, 42), c (settled, 7) and
    // the 10,000 rows of `many`; b went from released back to reserved.
    let client = pg.client().await;
    let sums = |table: &'static str| {
        let client = &client;
        async move {
            let r = client
                .query_one(
                    &format!(
                        "SELECT status, SUM(requests)::bigint, SUM(cost_micros)::bigint FROM {table}
                         GROUP BY status HAVING SUM(requests) <> 0"
                    ),
                    &[],
                )
                .await
                .unwrap();
            (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
            )
        }
    };
    let expected = (
        "settled".to_string(),
        10_002,
        42 + 7 + (0..10_000).sum::<i64>(),
    );
    assert_eq!(sums("spend_hourly").await, expected);
    assert_eq!(sums("spend_hourly_model").await, expected);
    // Postgres gone: a transient error, quickly.
    pg.stop();
    let t0 = Instant::now();
    let err = ledger.upsert_rows(&many[..1]).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn price_fields_reach_the_ledger_of_record_through_an_outage() {
    // SPEC §7: the columns of what priced a row travel in the journal events and arrive
    // in Postgres with the exact values the settle wrote, also when they waited in the
    // journal while Postgres was down.
    let (pg, _mock, proxy) = setup().await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let (code, out, err) = proxy.cli(&["prices", "--json"]);
    assert_eq!(code, 0, "{err}");
    let table: serde_json::Value = serde_json::from_str(&out).unwrap();
    let version = |m: &str| {
        table["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["model"] == m)
            .unwrap()["version"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    pg.stop();
    let mut sent = Vec::new();
    for stream in [false, true] {
        let body = serde_json::json!({"model": "claude-opus-4-8", "max_tokens": 300, "stream": stream,
                                      "messages": [{"role": "user", "content": "Search and tell me"}]});
        let r = post_json(
            &proxy.url("/v1/messages"),
            &key,
            &body,
            &[
                ("x-mock-cache-write-tokens", "300"),
                ("x-mock-cache-write-1h-tokens", "700"),
                ("x-mock-web-searches", "3"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        sent.push((
            r.header("x-tollgate-trace-id").unwrap().to_owned(),
            "claude",
        ));
        let mut body = chat_body("gpt-6.1-sol", stream, "hello there");
        body["service_tier"] = serde_json::json!("flex");
        let r = post_json(&proxy.url("/v1/chat/completions"), &key, &body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        sent.push((r.header("x-tollgate-trace-id").unwrap().to_owned(), "gpt"));
    }
    eventually("backlog of 8", || backlog(&proxy) == 8).await;
    pg.start_again();
    let rows = pg
        .wait_ledger("4 settled rows", |rows| {
            rows.len() == 4 && rows.iter().all(|r| r["status"] == "settled")
        })
        .await;
    let local = journal_rows(&proxy);
    for (trace, kind) in &sent {
        let r = rows
            .iter()
            .find(|r| r["trace_id"] == trace.as_str())
            .unwrap();
        let l = local.iter().find(|l| &l.trace_id == trace).unwrap();
        assert_eq!(r["cost_micros"], l.cost_micros);
        if *kind == "claude" {
            assert_eq!(r["cache_write_tokens"], 1000);
            assert_eq!(r["cache_write_1h_tokens"], 700);
            assert_eq!(r["tool_calls"], 3);
            assert_eq!(r["service_tier"], "standard");
            assert_eq!(r["price_version"], version("claude-opus-4-8").as_str());
        } else {
            assert_eq!(r["cache_write_1h_tokens"], 0);
            assert_eq!(r["tool_calls"], 0);
            assert_eq!(r["service_tier"], "flex");
            assert_eq!(r["price_version"], version("gpt-6.1-sol").as_str());
        }
        assert_eq!(r["cache_write_1h_tokens"], l.cache_write_1h_tokens);
        assert_eq!(r["tool_calls"], l.tool_calls);
        assert_eq!(r["service_tier"].as_str(), l.service_tier.as_deref());
        assert_eq!(r["price_version"].as_str(), l.price_version.as_deref());
    }
}

/// Issue 10, defect 6: one row the ledger of record refuses (a NUL byte in `model` — the
/// kind of row admission now refuses, so it is written into the journal directly, as an
/// older build or a damaged client could have) must not stop shipping. Before the fix the
/// shipper retried the same batch forever: nothing after it ever reached Postgres and
/// `/readyz` said nothing.
#[tokio::test]
async fn a_row_postgres_refuses_is_quarantined_and_the_rows_behind_it_ship() {
    let (pg, _mock, proxy) = setup().await;
    let (_key_id, key) = proxy.create_live_key(&[]).await;
    let first = chat(&proxy, &key, false, &[]).await;
    assert_eq!(first.status, 200);
    pg.wait_ledger("the first row", |rows| {
        rows.len() == 1 && rows[0]["status"] == "settled"
    })
    .await;

    // The poison event, appended behind the writer's back (WAL allows a second writer).
    let poison = Transaction {
        trace_id: "poison-1".into(),
        key_id: "k_poison".into(),
        upstream: "anthropic".into(),
        model: "claude-haiku-4-5\u{0}x".into(),
        status: "settled".into(),
        input_tokens: 10,
        output_tokens: 20,
        cost_micros: 123,
        reserved_micros: 500,
        started_at: tollgate::time::now_text(),
        settled_at: Some(tollgate::time::now_text()),
        instance_id: "elsewhere".into(),
        ..Default::default()
    };
    {
        let c = rusqlite::Connection::open(proxy.db_path()).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        tollgate::journal::outbox::append(
            &c,
            tollgate::journal::outbox::EventKind::Settle,
            &poison,
        )
        .unwrap();
    }
    // Traffic behind it ships: a stream, a non-stream, and an upstream error (released).
    let mut traces = vec![first.header("x-tollgate-trace-id").unwrap().to_string()];
    for (stream, extra) in [(true, None), (false, None), (false, Some("500"))] {
        let extra: Vec<(&str, &str)> = extra.map(|s| ("x-mock-status", s)).into_iter().collect();
        let r = chat(&proxy, &key, stream, &extra).await;
        traces.push(r.header("x-tollgate-trace-id").unwrap().to_string());
    }
    let rows = pg
        .wait_ledger("the rows behind the refused one", |rows| {
            rows.len() == 4 && rows.iter().all(|r| r["status"] != "reserved")
        })
        .await;
    let shipped: HashSet<&str> = rows
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        shipped,
        traces.iter().map(String::as_str).collect::<HashSet<_>>(),
        "every row but the refused one is in the ledger of record"
    );

    // Set aside with Postgres' error, reported, and nothing left waiting.
    let c = rusqlite::Connection::open(proxy.db_path()).unwrap();
    let (trace, error): (String, String) = c
        .query_row("SELECT trace_id, error FROM journal_quarantine", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap_or_else(|e| panic!("{e}: {}", proxy.logs()));
    assert_eq!(trace, "poison-1");
    assert!(error.starts_with("22"), "a data exception: {error}");
    eventually("backlog 0", || backlog(&proxy) == 0).await;
    let (_, status) = cli_json(&proxy, &["journal", "status"]);
    assert_eq!(status["quarantined"], 1, "{status}");
    let ready = send("GET", &format!("http://{}/readyz", proxy.admin), &[], "").await;
    assert_eq!(
        ready.status, 200,
        "a quarantined row does not take the instance out"
    );
    assert_eq!(ready.json()["quarantined"], 1, "{}", ready.text());
    let metrics = send("GET", &format!("http://{}/metrics", proxy.admin), &[], "").await;
    assert!(
        metrics
            .text()
            .contains("\ntollgate_journal_quarantined_total 1\n"),
        "{}",
        metrics.text()
    );

    // A forced replay of every retained event ships the good rows again (no change) and
    // sets the refused one aside again — once: the counter does not count it twice.
    let (code, out) = cli_json(&proxy, &["journal", "replay", "--all"]);
    assert_eq!(code, 0, "{out}");
    let held: i64 = c
        .query_row("SELECT COUNT(*) FROM journal_quarantine", [], |r| r.get(0))
        .unwrap();
    assert_eq!(held, 1);
    assert_eq!(pg.ledger().await.len(), 4);
}

/// Issue 10, defect 11: cross-instance idempotency fails closed. An `Idempotency-Key`
/// settled on instance A, repeated on instance B while Postgres is down: B's journal has
/// never seen it, Redis holds only requests in flight, and the ledger of record cannot be
/// asked — no store can vouch that it is new. Before the fix B forwarded it (200) and the
/// key was paid twice; now B refuses it (503, nothing forwarded) until Postgres answers.
#[tokio::test]
async fn a_repeated_idempotency_key_no_store_can_vouch_for_is_refused_not_paid_twice() {
    let pg = TestPg::start();
    let mock = mock().await;
    let a = shared_proxy(&pg, mock.addr).await;
    let b = shared_proxy(&pg, mock.addr).await;
    let (key_id, key) = a.create_live_key(&[]).await;
    let auth = format!("Bearer {key}");
    let usage = b.url("/v1/tollgate/usage");
    let mut live = false;
    for _ in 0..100 {
        if send("GET", &usage, &[("authorization", &auth)], "")
            .await
            .status
            == 200
        {
            live = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(live, "the key reaches instance b");
    let once = [("idempotency-key", "order-1")];
    let trace = format!("{key_id}:order-1");

    let r = chat(&a, &key, false, &once).await;
    assert_eq!(r.status, 200, "{}", r.text());
    pg.wait_ledger("order-1 settled", |rows| {
        rows.len() == 1 && rows[0]["status"] == "settled"
    })
    .await;
    // Postgres up: instance b recognises a's request — a 409 naming the duplicate's trace.
    let r = chat(&b, &key, false, &once).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.header("x-tollgate-trace-id"), Some(trace.as_str()));
    assert_eq!(r.json()["error"]["code"], "duplicate_request");

    pg.stop();
    // Nobody can vouch for order-1 on b now: refused, not forwarded.
    let r = chat(&b, &key, false, &once).await;
    assert_eq!(r.status, 503, "forwarded and paid twice: {}", r.text());
    assert_eq!(r.json()["error"]["code"], "store_unavailable");
    assert_eq!(r.header("x-tollgate-trace-id"), Some(trace.as_str()));
    // Instance a's own journal still knows it.
    let r = chat(&a, &key, false, &once).await;
    assert_eq!(r.status, 409, "{}", r.text());
    // The price of failing closed: a key b has never seen is refused too while Postgres
    // is down (it may be a's); requests without an Idempotency-Key are served as ever.
    let r = chat(&b, &key, false, &[("idempotency-key", "order-2")]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let r = chat(&b, &key, true, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    pg.start_again();
    let mut answered = 0;
    for _ in 0..200 {
        answered = chat(&b, &key, false, &once).await.status;
        if answered != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        answered, 409,
        "once Postgres answers, b recognises order-1 again"
    );
    let rows = pg
        .wait_ledger("b's plain request shipped", |rows| {
            rows.len() == 2 && rows.iter().all(|r| r["status"] == "settled")
        })
        .await;
    let once_rows = rows
        .iter()
        .filter(|r| r["trace_id"] == trace.as_str())
        .count();
    assert_eq!(once_rows, 1, "order-1 billed once");
    assert!(
        !rows
            .iter()
            .any(|r| r["trace_id"] == format!("{key_id}:order-2").as_str()),
        "the refused order-2 left no row"
    );
}

/// The `instance_id` of every ledger row in an embedded proxy's database.
fn instance_ids(proxy: &Proxy) -> Vec<String> {
    let c = rusqlite::Connection::open(proxy.db_path()).unwrap();
    let mut st = c
        .prepare("SELECT instance_id FROM billing_transactions ORDER BY started_at")
        .unwrap();
    st.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Issue 10, defect 4: without a configured `server.instance_id`, the identity is made once
/// and kept in the journal file, so the instance is the same one after a restart on another
/// port (before: `<hostname>-<port>`, a new identity per port).
#[tokio::test]
async fn an_unconfigured_instance_identity_is_kept_in_the_journal() {
    let mock = mock().await;
    let mut proxy = Proxy::start_edited(mock.addr, ProxyOptions::default(), |c| {
        c.replace("instance_id = \"test-instance\"\n", "")
    })
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    assert_eq!(chat(&proxy, &key, false, &[]).await.status, 200);
    proxy.wait_settled().await;
    proxy.kill9();
    // Same journal, another port.
    let port = free_port();
    let text = std::fs::read_to_string(&proxy.config_path)
        .unwrap()
        .replace(
            &format!("listen = \"{}\"", proxy.addr),
            &format!("listen = \"127.0.0.1:{port}\""),
        );
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.addr = format!("127.0.0.1:{port}").parse().unwrap();
    proxy.spawn().await;
    assert_eq!(chat(&proxy, &key, false, &[]).await.status, 200);
    proxy.wait_settled().await;
    let ids = instance_ids(&proxy);
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], ids[1], "one identity across restarts: {ids:?}");
    assert!(!ids[0].ends_with(&format!("-{port}")), "{ids:?}");
}

#[tokio::test]
async fn rerate_writes_adjustments_to_the_ledger_of_record_once() {
    // Shared mode: the CLI re-rates the Postgres ledger, writes adjustment rows there (never
    // rewriting a settled row), a second run writes nothing, and the running instance's
    // counters and reports agree with it.
    let (pg, _mock, proxy) = setup().await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "usd:day=100", "--limit", "requests:day=100"])
        .await;
    for stream in [false, true, false] {
        let r = chat(&proxy, &key, stream, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let originals = pg
        .wait_ledger("3 settled rows", |rows| {
            rows.len() == 3 && rows.iter().all(|r| r["status"] == "settled")
        })
        .await;
    let int = |v: &serde_json::Value| v.as_i64().unwrap();
    // Shipped gpt-4o-mini: 0.15 / 0.60; corrected: 0.30 / 1.50 (µUSD per token × 1000).
    let cost = |r: &serde_json::Value, i: i64, o: i64| {
        (int(&r["input_tokens"]) * i + int(&r["output_tokens"]) * o + 999) / 1000
    };
    for r in &originals {
        assert_eq!(int(&r["cost_micros"]), cost(r, 150, 600));
    }
    let mut text = std::fs::read_to_string(&proxy.config_path).unwrap();
    text.push_str("\n[prices.\"gpt-4o-mini\"]\ninput = 0.30\noutput = 1.50\n");
    std::fs::write(&proxy.config_path, text).unwrap();

    let (code, v) = cli_json(&proxy, &["rerate", "--since", "1h", "--apply"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["written"], 3, "{v}");
    assert_eq!(v["counters"], "rebuilt by the running instance");
    let ledger = pg
        .wait_ledger("3 adjustments", |rows| rows.len() == 6)
        .await;
    let mut new_total = 0;
    for orig in &originals {
        let now = ledger
            .iter()
            .find(|r| r["trace_id"] == orig["trace_id"])
            .unwrap();
        assert_eq!(now, orig, "a settled row is never rewritten");
        let adj: Vec<_> = ledger
            .iter()
            .filter(|r| r["adjusts"] == orig["trace_id"])
            .collect();
        assert_eq!(adj.len(), 1);
        let want = cost(orig, 300, 1500);
        new_total += want;
        assert_eq!(
            int(&adj[0]["cost_micros"]),
            want - int(&orig["cost_micros"])
        );
        assert_eq!(
            (int(&adj[0]["input_tokens"]), int(&adj[0]["output_tokens"])),
            (0, 0)
        );
        assert_eq!(adj[0]["started_at"], orig["started_at"]);
        assert_eq!(adj[0]["status"], "settled");
    }
    // Again: nothing to write, the ledger unchanged.
    let (code, again) = cli_json(&proxy, &["rerate", "--since", "1h", "--apply"]);
    assert_eq!(code, 0);
    assert_eq!(
        (again["written"].as_i64(), again["adjustments"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(pg.ledger().await, ledger);
    // Counters, usage, reconcile and the report include the adjustments.
    let (_, u) = cli_json(&proxy, &["usage", "--key", &key_id]);
    let used = |spec: &str| {
        u["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["spec"] == spec)
            .unwrap()["used"]
            .clone()
    };
    assert_eq!(
        used("usd:day=100"),
        format!("{}.{:06}", new_total / 1_000_000, new_total % 1_000_000)
    );
    assert_eq!(used("requests:day=100"), 3);
    let (code, v) = cli_json(&proxy, &["reconcile"]);
    assert_eq!(code, 0, "{v}");
    let (code, rep) = cli_json(&proxy, &["report", "--since", "1h", "--by", "model"]);
    assert_eq!(code, 0, "{rep}");
    assert_eq!(
        (
            int(&rep["totals"]["cost_micros"]),
            int(&rep["totals"]["requests"])
        ),
        (new_total, 3)
    );
}

/// Issue 10, review finding 5: an `Idempotency-Key` settled on instance a and repeated on
/// instance b before a's row reached Postgres (a's shipper held up: here a's database role
/// may read the ledger but not write it). b's journal has never seen it and Postgres does
/// not have it yet; before the fix Redis forgot the settle too (reserve cleared its done
/// marker), so b forwarded it again (200): the upstream was paid twice, Redis counted both,
/// and the ledger kept one. Now Redis remembers the settle and b answers 409.
#[tokio::test]
async fn a_repeated_idempotency_key_settled_but_not_yet_shipped_is_refused_on_another_instance() {
    let pg = TestPg::start();
    let redis = common::redis::RedisServer::start();
    let mock = mock().await;
    let ledger = PgLedger::new(&pg.url()).unwrap();
    ledger.migrate().await.unwrap();
    let admin = pg.client().await;
    admin
        .batch_execute(
            "CREATE ROLE slow_shipper LOGIN;
             GRANT ALL ON SCHEMA public TO slow_shipper;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO slow_shipper;
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO slow_shipper;
             REVOKE INSERT, UPDATE ON billing_transactions FROM slow_shipper;",
        )
        .await
        .unwrap();
    let a_url = pg
        .url()
        .replace("postgres://postgres@", "postgres://slow_shipper@");
    let a = shared_proxy_on(&a_url, &redis.url(), mock.addr).await;
    let b = shared_proxy_on(&pg.url(), &redis.url(), mock.addr).await;
    let (key_id, key) = b.create_live_key(&[]).await;
    let auth = format!("Bearer {key}");
    let mut live = false;
    for _ in 0..100 {
        let r = send(
            "GET",
            &a.url("/v1/tollgate/usage"),
            &[("authorization", &auth)],
            "",
        )
        .await;
        if r.status == 200 {
            live = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(live, "the key reaches instance a");
    let once = [("idempotency-key", "order-1")];
    let trace = format!("{key_id}:order-1");

    let r = chat(&a, &key, false, &once).await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("a's settle journaled", || {
        journal_rows(&a)
            .iter()
            .any(|t| t.trace_id == trace && t.status == "settled")
    })
    .await;
    // Settled in Redis too (the client has its answer just before that).
    let redis_has = |pattern: String| {
        !redis
            .cli(&["--scan", "--pattern", &pattern])
            .trim()
            .is_empty()
    };
    eventually("a's settle counted", || {
        redis_has(format!("*:d:{trace}")) && !redis_has(format!("*:h:{trace}"))
    })
    .await;
    assert!(backlog(&a) > 0, "a's settle has not shipped");
    assert!(
        pg.ledger()
            .await
            .iter()
            .all(|r| r["trace_id"] != trace.as_str())
    );

    let before = mock.recorded().len();
    let r = chat(&b, &key, false, &once).await;
    assert_eq!(
        r.status,
        409,
        "forwarded a second time, the ledger would keep one: {}",
        r.text()
    );
    assert_eq!(r.json()["error"]["code"], "duplicate_request");
    assert_eq!(r.header("x-tollgate-trace-id"), Some(trace.as_str()));
    assert_eq!(mock.recorded().len(), before, "nothing forwarded");

    // A released trace id is still free to use again: an upstream error releases order-2
    // on a, and b serves its retry.
    let r = chat(
        &a,
        &key,
        false,
        &[("idempotency-key", "order-2"), ("x-mock-status", "500")],
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.text());
    let released = format!("{key_id}:order-2");
    eventually("a's release done", || {
        journal_rows(&a)
            .iter()
            .any(|t| t.trace_id == released && t.status == "released")
            && !redis_has(format!("*:h:{released}"))
    })
    .await;
    let r = chat(&b, &key, false, &[("idempotency-key", "order-2")]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // a's shipper gets through: one settled row for order-1, a's, and nothing set aside.
    admin
        .batch_execute("GRANT INSERT, UPDATE ON billing_transactions TO slow_shipper")
        .await
        .unwrap();
    let rows = pg
        .wait_ledger("order-1 shipped", |rows| {
            rows.iter()
                .any(|r| r["trace_id"] == trace.as_str() && r["status"] == "settled")
        })
        .await;
    assert_eq!(
        rows.iter()
            .filter(|r| r["trace_id"] == trace.as_str())
            .count(),
        1
    );
    eventually("a's backlog 0", || backlog(&a) == 0).await;
    for p in [&a, &b] {
        let (_, status) = cli_json(p, &["journal", "status"]);
        assert_eq!(status["quarantined"], 0, "{status}");
    }
}

/// Issue 10, review finding 5, the ledger of record's side: when two reservations of one
/// trace id were both settled (forwarded twice), the second settle to arrive must not
/// vanish. Before the fix the upsert ignored it (0 rows, no error); now it is refused, so
/// the shipper sets it aside in the quarantine (logged, counted, in `/readyz`). A re-ship
/// of the stored settle is still harmless, and a settle over a released row of an earlier
/// reservation is still taken.
#[tokio::test]
async fn a_second_settle_of_one_trace_id_is_refused_not_dropped() {
    let pg = TestPg::start();
    let ledger = PgLedger::new(&pg.url()).unwrap();
    ledger.migrate().await.unwrap();
    let (t1, t2) = ("2026-01-01T00:00:00.000001Z", "2026-01-01T00:00:05.000000Z");
    let first = row("k", "settled", t1, 40);
    assert_eq!(
        ledger
            .upsert_rows(std::slice::from_ref(&first))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ledger
            .upsert_rows(std::slice::from_ref(&first))
            .await
            .unwrap(),
        0,
        "a re-ship changes nothing"
    );
    // The other instance's later reservation, settled: refused, the stored row kept.
    let later = Transaction {
        instance_id: "j".into(),
        ..row("k", "settled", t2, 60)
    };
    let err = ledger
        .upsert_rows(std::slice::from_ref(&later))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, tollgate::pg::PgError::Rejected(m) if m.contains("second settle")),
        "{err}"
    );
    // Same start, another instance: refused too.
    let twin = Transaction {
        instance_id: "j".into(),
        ..row("k", "settled", t1, 60)
    };
    assert!(matches!(
        ledger.upsert_rows(std::slice::from_ref(&twin)).await,
        Err(tollgate::pg::PgError::Rejected(_))
    ));
    // The later reservation shipped its reserved row first, then the earlier settle
    // arrives: the earlier settle does not win over it, and is refused, not ignored.
    let reserved_later = row("m", "reserved", t2, 0);
    assert_eq!(ledger.upsert_rows(&[reserved_later]).await.unwrap(), 1);
    assert!(matches!(
        ledger.upsert_rows(&[row("m", "settled", t1, 40)]).await,
        Err(tollgate::pg::PgError::Rejected(_))
    ));
    // Row by row (the shipper's slow path): only the second settle is set aside.
    let batch = [
        later.clone(),
        row("n", "released", t1, 0),
        row("o", "settled", t1, 5),
    ];
    let (changed, refused) = ledger.upsert_each(&batch).await.unwrap();
    assert_eq!(changed, 2);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, 0);
    // A released trace id reserved and settled again is a new reservation, taken.
    assert_eq!(
        ledger
            .upsert_rows(&[row("n", "settled", t2, 9)])
            .await
            .unwrap(),
        1
    );
    let rows = ledger.all_rows().await.unwrap();
    let get = |t: &str| rows.iter().find(|r| r.trace_id == t).unwrap().clone();
    assert_eq!(get("k"), first);
    assert_eq!(get("m").status, "reserved");
    assert_eq!(
        (get("n").status.as_str(), get("n").cost_micros),
        ("settled", 9)
    );
}

/// `method path` on `proxy`'s admin API with the admin token (and a JSON body if given).
async fn admin(proxy: &Proxy, method: &str, path: &str, body: Option<serde_json::Value>) -> Reply {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let mut h = vec![("authorization", auth.as_str())];
    let payload = match body {
        Some(v) => {
            h.push(("content-type", "application/json"));
            serde_json::to_vec(&v).unwrap()
        }
        None => Vec::new(),
    };
    send(
        method,
        &format!("http://{}{}", proxy.admin, path),
        &h,
        payload,
    )
    .await
}

/// Every key and limit change made through one instance's admin API is written to
/// Postgres, so a second instance on the same Postgres serves it, and with Postgres down
/// the change is refused with 503 instead of landing somewhere no other instance reads.
/// `/admin/transactions` reads the ledger of record, so either instance lists the rows
/// the other one billed.
#[tokio::test]
async fn admin_api_key_and_limit_writes_reach_every_instance() {
    let (pg, mock, a) = setup().await;
    let b = shared_proxy(&pg, mock.addr).await;

    // Created on A, works on B at once (no local-only copy on A).
    let r = admin(
        &a,
        "POST",
        "/admin/keys",
        Some(serde_json::json!({"name": "via-api", "limits": ["requests:day=100"]})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let key = r.json()["key"].as_str().unwrap().to_string();
    let c = pg.client().await;
    let n: i64 = c
        .query_one("SELECT COUNT(*) FROM api_keys WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the key is in Postgres");
    let r = chat(&b, &key, false, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = chat(&a, &key, false, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // B lists and shows what A created.
    let r = admin(&b, "GET", &format!("/admin/keys/{id}"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["limits"], serde_json::json!(["requests:day=100"]));
    let r = admin(&b, "GET", "/admin/keys", None).await;
    assert!(
        r.json()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id.as_str()),
        "{}",
        r.text()
    );

    // Limits replaced on B (all zero: the key is blocked) apply on A within a second.
    let r = admin(
        &b,
        "PUT",
        &format!("/admin/keys/{id}/limits"),
        Some(serde_json::json!({"limits": ["requests:day=0"]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let specs: Vec<String> = c
        .query(
            "SELECT spec FROM limits WHERE subject = $1",
            &[&format!("key:{id}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(specs, ["requests:day=0"], "the limits are in Postgres");
    let t0 = Instant::now();
    while chat(&a, &key, false, &[]).await.status != 403 {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "limit not live on A after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(chat(&b, &key, false, &[]).await.status, 403);
    let r = admin(
        &b,
        "PUT",
        &format!("/admin/keys/{id}/limits"),
        Some(serde_json::json!({"limits": []})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Revoked on A: refused on B within a second.
    let r = admin(&a, "DELETE", &format!("/admin/keys/{id}"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(chat(&a, &key, false, &[]).await.status, 401);
    let t0 = Instant::now();
    while chat(&b, &key, false, &[]).await.status != 401 {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "revoke not live on B after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The ledger of record, from either instance: every row either of them billed.
    let t0 = Instant::now();
    while backlog(&a) != 0 || backlog(&b) != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "journals not shipped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut of_record: Vec<String> = pg
        .ledger()
        .await
        .iter()
        .filter(|r| r["key_id"] == id.as_str())
        .map(|r| r["trace_id"].as_str().unwrap().to_string())
        .collect();
    of_record.sort();
    let instances: HashSet<String> = journal_rows(&a)
        .iter()
        .chain(journal_rows(&b).iter())
        .filter(|t| t.key_id == id)
        .map(|t| t.trace_id.clone())
        .collect();
    assert!(of_record.len() >= 2, "{of_record:?}");
    assert_eq!(
        of_record.iter().cloned().collect::<HashSet<_>>(),
        instances,
        "the rows of both instances"
    );
    for inst in [&a, &b] {
        // Walked page by page with the cursor, newest first, every row exactly once.
        let mut listed = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                None => format!("/admin/transactions?key={id}&limit=3"),
                Some(c) => format!("/admin/transactions?key={id}&limit=3&cursor={c}"),
            };
            let r = admin(inst, "GET", &path, None).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            let page = v["transactions"].as_array().unwrap();
            assert!(page.len() <= 3);
            listed.extend(page.iter().map(|t| {
                (
                    t["started_at"].as_str().unwrap().to_string(),
                    t["trace_id"].as_str().unwrap().to_string(),
                )
            }));
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        let mut sorted = listed.clone();
        sorted.sort_by(|x, y| y.cmp(x));
        assert_eq!(listed, sorted, "newest first");
        let mut ids: Vec<String> = listed.into_iter().map(|(_, t)| t).collect();
        ids.sort();
        assert_eq!(ids, of_record);
    }

    // Postgres down: every write answers 503 and nothing is written anywhere.
    pg.stop();
    let r = admin(
        &a,
        "POST",
        "/admin/keys",
        Some(serde_json::json!({"name": "while-down"})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "store_unavailable");
    let r = admin(
        &a,
        "PUT",
        "/admin/users/alice/limits",
        Some(serde_json::json!({"limits": ["requests:day=5"]})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    let r = admin(&b, "DELETE", &format!("/admin/keys/{id}"), None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let r = admin(&b, "GET", "/admin/transactions", None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    pg.start_again();
    let c = pg.client().await;
    let names: Vec<String> = c
        .query("SELECT name FROM api_keys", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!names.iter().any(|n| n == "while-down"), "{names:?}");
    let n: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM limits WHERE subject = 'user:alice'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// Wait until `proxy` answers `key` with `status`, at most `within`.
async fn wait_status(proxy: &Proxy, key: &str, status: u16, within: Duration, what: &str) {
    let t0 = Instant::now();
    loop {
        let got = chat(proxy, key, false, &[]).await.status;
        if got == status {
            return;
        }
        assert!(
            t0.elapsed() < within,
            "{what}: still {got} after {within:?}\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The directory refresh of an instance never hangs on Postgres: a connection that went
/// half-open (its packets silently dropped), a Postgres frozen with every connection
/// open (SIGSTOP), and one killed and restarted. After each, a revoke made elsewhere
/// reaches the instance, and while Postgres does not answer the admin API answers 503
/// within its deadline instead of hanging.
#[tokio::test]
async fn directory_refresh_survives_half_open_frozen_and_restarted_postgres() {
    let (pg, mock, a) = setup().await;
    let relay = Relay::start(pg.port).await;
    let b = shared_proxy_at(&relay.url(), mock.addr).await;
    // Past the bounds of the refresh (2 s), a pooled connection's check (0.5 s each, 4 at
    // most) and a poll (0.25 s), with room for a loaded machine.
    let bound = Duration::from_secs(8);

    // 1. Half-open: every connection B has open stops delivering, forever.
    let (k1_id, k1) = a.create_key(&[]);
    wait_status(&b, &k1, 200, Duration::from_secs(1), "new key on B").await;
    relay.freeze();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(a.cli(&["keys", "revoke", &k1_id]).0, 0);
    wait_status(
        &b,
        &k1,
        401,
        bound,
        "revoke on B after its connections went half-open",
    )
    .await;

    // 2. Frozen: Postgres stops with every connection open (the kernel still accepts).
    let (k2_id, k2) = a.create_key(&[]);
    wait_status(&b, &k2, 200, Duration::from_secs(1), "second key on B").await;
    pg.signal_all("STOP");
    // Requests with known keys go on (nothing on the request path waits on Postgres).
    assert_eq!(chat(&b, &k2, false, &[]).await.status, 200);
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        admin(
            &b,
            "POST",
            "/admin/keys",
            Some(serde_json::json!({"name": "frozen"})),
        ),
    )
    .await
    .expect("the admin API hangs while Postgres is frozen");
    assert_eq!(r.status, 503, "{}", r.text());
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.signal_all("CONT");
    assert_eq!(a.cli(&["keys", "revoke", &k2_id]).0, 0);
    wait_status(&b, &k2, 401, bound, "revoke on B after Postgres was frozen").await;

    // 3. Killed (no shutdown) and restarted.
    pg.stop();
    tokio::time::sleep(Duration::from_millis(600)).await;
    pg.start_again();
    let (k3_id, k3) = a.create_key(&[]);
    wait_status(
        &b,
        &k3,
        200,
        Duration::from_secs(1),
        "key created after the restart",
    )
    .await;
    assert_eq!(a.cli(&["keys", "revoke", &k3_id]).0, 0);
    wait_status(&b, &k3, 401, bound, "revoke on B after Postgres restarted").await;
}

/// The directory revision only moves forward. Postgres restored to an older state (its
/// change counter behind what the instances hold) must not make the next changes look
/// older than the directory an instance serves — those would be skipped: a key created
/// there would answer 401 (and be remembered as unknown), a revoke would never apply.
#[tokio::test]
async fn directory_revision_never_goes_backwards() {
    let (pg, mock, a) = setup().await;
    let b = shared_proxy(&pg, mock.addr).await;
    for _ in 0..3 {
        a.create_key(&[]);
    }
    let (_, known) = a.create_key(&[]);
    wait_status(&b, &known, 200, Duration::from_secs(1), "key on B").await;
    let c = pg.client().await;
    let before: i64 = c
        .query_one("SELECT value FROM meta WHERE name = 'config_rev'", &[])
        .await
        .unwrap()
        .get(0);
    // A restore from an older backup: the counter is behind every instance.
    c.execute("UPDATE meta SET value = 1 WHERE name = 'config_rev'", &[])
        .await
        .unwrap();
    let (new_id, new_key) = a.create_key(&[]);
    let after: i64 = c
        .query_one("SELECT value FROM meta WHERE name = 'config_rev'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        after > before,
        "revision went from {before} back to {after}"
    );
    wait_status(
        &b,
        &new_key,
        200,
        Duration::from_secs(1),
        "key created after the restore",
    )
    .await;
    assert_eq!(a.cli(&["keys", "revoke", &new_id]).0, 0);
    wait_status(
        &b,
        &new_key,
        401,
        Duration::from_secs(1),
        "revoke after the restore",
    )
    .await;
    assert_eq!(chat(&b, &known, false, &[]).await.status, 200);
}
