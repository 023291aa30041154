//! Shared mode under failure (SPEC §4 guarantees, §5 `on_unavailable`): every test runs the
//! real binary against its own private Redis and PostgreSQL — never the machine's services —
//! and checks that caps hold and nothing is lost or billed twice when the stores go away
//! and come back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::pg::TestPg;
use common::redis::RedisServer;
use common::*;

/// A proxy in shared mode against `pg` and `redis_url`, with the given policy and instance id.
async fn shared_proxy(
    pg: &TestPg,
    redis_url: &str,
    upstream: std::net::SocketAddr,
    policy: &str,
    instance: &str,
) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let (config_path, addr, admin) = write_config(dir.path(), upstream, &ProxyOptions::default());
    let text = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace(
            "mode = \"embedded\"",
            &format!(
                "mode = \"shared\"\npostgres_url = \"{}\"\nredis_url = \"{redis_url}\"\non_unavailable = \"{policy}\"\njournal_retention = \"1h\"",
                pg.url()
            ),
        )
        .replace(
            "instance_id = \"test-instance\"",
            &format!("instance_id = \"{instance}\""),
        );
    std::fs::write(&config_path, text).unwrap();
    let mut p = Proxy {
        child: None,
        addr,
        admin,
        log_path: dir.path().join("proxy.log"),
        dir,
        config_path,
    };
    p.spawn().await;
    p
}

struct Env {
    pg: TestPg,
    redis: RedisServer,
    mock: tollgate::mock::MockHandle,
}

async fn env() -> Env {
    let pg = TestPg::start();
    let redis = RedisServer::start();
    let mock = tollgate::mock::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Env { pg, redis, mock }
}

impl Env {
    async fn proxy(&self, policy: &str, instance: &str) -> Proxy {
        shared_proxy(
            &self.pg,
            &self.redis.url(),
            self.mock.addr,
            policy,
            instance,
        )
        .await
    }
}

async fn chat(proxy: &Proxy, key: &str) -> Reply {
    post_json(
        &proxy.url("/v1/chat/completions"),
        key,
        &chat_body("gpt-4o-mini", false, "hello there"),
        &[],
    )
    .await
}

/// Send `n` requests at once to each of `proxies` (round robin); returns their statuses.
async fn burst(proxies: &[&Proxy], key: &str, n: usize) -> Vec<u16> {
    let urls: Vec<String> = proxies
        .iter()
        .map(|p| p.url("/v1/chat/completions"))
        .collect();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let url = urls[i % urls.len()].clone();
        let key = key.to_string();
        set.spawn(async move {
            post_json(
                &url,
                &key,
                &chat_body("gpt-4o-mini", i % 2 == 0, "hello there"),
                &[],
            )
            .await
            .status
        });
    }
    let mut out = Vec::new();
    while let Some(s) = set.join_next().await {
        out.push(s.unwrap());
    }
    out
}

fn count(statuses: &[u16], code: u16) -> usize {
    statuses.iter().filter(|s| **s == code).count()
}

/// Wait until `proxy` accepts `key` (keys reach other instances through Postgres).
async fn wait_key(proxy: &Proxy, key: &str) {
    let t0 = Instant::now();
    loop {
        let r = send(
            "GET",
            &proxy.url("/v1/tollgate/usage"),
            &[("authorization", &format!("Bearer {key}"))],
            "",
        )
        .await;
        if r.status == 200 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "key not live on {}",
            proxy.addr
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn readyz(proxy: &Proxy) -> serde_json::Value {
    send("GET", &format!("http://{}/readyz", proxy.admin), &[], "")
        .await
        .json()
}

async fn wait_redis(proxy: &Proxy, state: &str) {
    let t0 = Instant::now();
    loop {
        let v = readyz(proxy).await;
        if v["stores"]["redis"] == state {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "readyz never showed redis {state}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `used` of the key's requests limit, as the running instance reports it (Redis when up).
/// Waits until the settled `requests` usage of `key_id` is `n` (settles land just after the
/// client has its answer), then checks it stays there (nothing counted twice).
async fn assert_used(proxy: &Proxy, key_id: &str, n: i64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = used(proxy, key_id).await;
    while last != n && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        last = used(proxy, key_id).await;
    }
    assert_eq!(last, n, "{what}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        used(proxy, key_id).await,
        n,
        "{what}: changed after settling"
    );
}

async fn used(proxy: &Proxy, key_id: &str) -> i64 {
    let r = send(
        "GET",
        &format!("http://{}/admin/usage?key={key_id}", proxy.admin),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["metric"] == "requests")
        .unwrap_or_else(|| panic!("no requests limit: {v}"))["used"]
        .as_i64()
        .unwrap()
}

/// Settled rows of `key_id` in Postgres, once the ledger holds exactly `n` final rows for
/// it, checked to be one per trace id.
async fn settled_in_pg(pg: &TestPg, key_id: &str, n: usize) -> Vec<serde_json::Value> {
    let rows = pg
        .wait_ledger(&format!("{n} settled rows for {key_id}"), |rows| {
            let mine: Vec<_> = rows.iter().filter(|r| r["key_id"] == key_id).collect();
            mine.iter().filter(|r| r["status"] == "settled").count() == n
                && mine.iter().all(|r| r["status"] != "reserved")
        })
        .await;
    let mine: Vec<_> = rows
        .into_iter()
        .filter(|r| r["key_id"] == key_id && r["status"] == "settled")
        .collect();
    let ids: HashSet<&str> = mine
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), mine.len(), "one row per trace id");
    mine
}

fn reconcile_clean(proxy: &Proxy) {
    let (code, out, err) = proxy.cli(&["reconcile", "--json"]);
    assert_eq!(code, 0, "reconcile found differences: {out} {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["differences"].as_array().unwrap().len(), 0, "{v}");
}

#[tokio::test]
async fn two_instances_admit_exactly_the_cap_between_them() {
    let env = env().await;
    let a = env.proxy("local", "sidecar-a").await;
    let b = env.proxy("local", "sidecar-b").await;
    let (key_id, key) = a.create_live_key(&["--limit", "requests:total=100"]).await;
    wait_key(&b, &key).await;

    let statuses = burst(&[&a, &b], &key, 300).await;
    assert_eq!(count(&statuses, 200), 100, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 200, "{statuses:?}");
    for p in [&a, &b] {
        assert_eq!(readyz(p).await["stores"]["redis"], "up");
    }

    // Postgres holds exactly the 100 admitted requests, whichever instance served them
    // (how they split between the two depends on scheduling).
    let rows = settled_in_pg(&env.pg, &key_id, 100).await;
    assert_eq!(rows.len(), 100);
    assert_used(&a, &key_id, 100, "requests used").await;
    assert_used(&b, &key_id, 100, "requests used").await;
    assert_eq!(chat(&b, &key).await.status, 429);
}

#[tokio::test]
async fn flushall_rebuilds_counters_from_the_ledger() {
    let env = env().await;
    let proxy = env.proxy("local", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=100"])
        .await;
    assert_eq!(chat(&proxy, &key).await.status, 200);
    // The settle is in the journal (and maybe shipped); Redis then loses everything.
    eventually("the settle reached redis", || {
        env.redis.cli(&["DBSIZE"]).trim() != "0"
    })
    .await;
    settled_in_pg(&env.pg, &key_id, 1).await;
    assert_eq!(env.redis.cli(&["FLUSHALL"]).trim(), "OK");
    assert_eq!(env.redis.cli(&["DBSIZE"]).trim(), "0");

    let statuses = burst(&[&proxy], &key, 150).await;
    assert_eq!(count(&statuses, 200), 99, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 51, "{statuses:?}");
    assert_eq!(readyz(&proxy).await["stores"]["redis"], "up");
    settled_in_pg(&env.pg, &key_id, 100).await;
    assert_used(&proxy, &key_id, 100, "requests used").await;
    reconcile_clean(&proxy);
}

#[tokio::test]
async fn redis_killed_mid_traffic_local_counters_enforce_and_redis_catches_up() {
    let mut env = env().await;
    let proxy = env.proxy("local", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=20"])
        .await;
    for _ in 0..10 {
        assert_eq!(chat(&proxy, &key).await.status, 200);
    }
    assert_eq!(readyz(&proxy).await["stores"]["redis"], "up");
    env.redis.kill();

    let statuses = burst(&[&proxy], &key, 30).await;
    let admitted = count(&statuses, 200);
    assert_eq!(admitted + count(&statuses, 429), 30, "{statuses:?}");
    assert!(admitted <= 10, "cap exceeded: {statuses:?}");
    assert_eq!(admitted, 10, "local counters start from the true usage");
    // Still served: the key's own usage route answers from the local counters.
    let r = send(
        "GET",
        &proxy.url("/v1/tollgate/usage"),
        &[("authorization", &format!("Bearer {key}"))],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    wait_redis(&proxy, "down").await;
    let v = readyz(&proxy).await;
    assert_eq!(v["status"], "ready", "local policy keeps serving: {v}");

    env.redis.restart();
    wait_redis(&proxy, "up").await;
    // The Redis side now equals the true count: 10 + admitted, nothing lost or doubled.
    assert_used(&proxy, &key_id, 20, "requests used").await;
    let (code, out, err) = proxy.cli(&["usage", "--key", &key_id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let u: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(u["limits"][0]["used"], 20, "{u}");
    settled_in_pg(&env.pg, &key_id, 20).await;
    assert_eq!(chat(&proxy, &key).await.status, 429);
    reconcile_clean(&proxy);
}

#[tokio::test]
async fn closed_policy_answers_503_in_the_provider_shape() {
    let mut env = env().await;
    let proxy = env.proxy("closed", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=10"])
        .await;
    assert_eq!(chat(&proxy, &key).await.status, 200);
    env.redis.kill();

    let r = chat(&proxy, &key).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
    let r = post_json(
        &proxy.url("/v1/messages"),
        &key,
        &serde_json::json!({
            "model": "claude-3-5-haiku-20241022",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "hello"}],
        }),
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
    wait_redis(&proxy, "down").await;
    let rz = send("GET", &format!("http://{}/readyz", proxy.admin), &[], "").await;
    assert_eq!(rz.status, 503, "closed policy is not ready without redis");

    // Refused requests leave no billing row.
    env.redis.restart();
    wait_redis(&proxy, "up").await;
    assert_eq!(chat(&proxy, &key).await.status, 200);
    settled_in_pg(&env.pg, &key_id, 2).await;
    let rows = env.pg.ledger().await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_used(&proxy, &key_id, 2, "requests used").await;
}

#[tokio::test]
async fn open_policy_admits_unchecked_and_the_usage_reaches_redis() {
    let mut env = env().await;
    let proxy = env.proxy("open", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=3"])
        .await;
    assert_eq!(chat(&proxy, &key).await.status, 200);
    env.redis.kill();

    // Over the cap, yet admitted: the policy trades enforcement for availability.
    for _ in 0..5 {
        let r = chat(&proxy, &key).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    wait_redis(&proxy, "down").await;
    env.redis.restart();
    wait_redis(&proxy, "up").await;
    assert_used(&proxy, &key_id, 6, "requests used").await;
    settled_in_pg(&env.pg, &key_id, 6).await;
    // Redis is authoritative again: the cap is enforced.
    assert_eq!(chat(&proxy, &key).await.status, 429);
    reconcile_clean(&proxy);
}

#[tokio::test]
async fn redis_and_postgres_down_together_lose_and_double_nothing() {
    let mut env = env().await;
    let proxy = env.proxy("local", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=50"])
        .await;
    for _ in 0..5 {
        assert_eq!(chat(&proxy, &key).await.status, 200);
    }
    settled_in_pg(&env.pg, &key_id, 5).await;

    env.redis.kill();
    env.pg.stop();
    let statuses = burst(&[&proxy], &key, 20).await;
    assert_eq!(count(&statuses, 200), 20, "{statuses:?}");
    for _ in 0..5 {
        assert_eq!(chat(&proxy, &key).await.status, 200);
    }
    wait_redis(&proxy, "down").await;
    assert_used(&proxy, &key_id, 30, "local counters").await;

    // Redis first (seeded from this instance's journal while Postgres is still down).
    env.redis.restart();
    wait_redis(&proxy, "up").await;
    assert_used(&proxy, &key_id, 30, "requests used").await;
    env.pg.start_again();
    let rows = settled_in_pg(&env.pg, &key_id, 30).await;
    assert_eq!(rows.len(), 30);
    assert_eq!(env.pg.ledger().await.len(), 30, "no other rows");
    assert_used(&proxy, &key_id, 30, "requests used").await;
    reconcile_clean(&proxy);
    // 20 left, not more.
    let statuses = burst(&[&proxy], &key, 30).await;
    assert_eq!(count(&statuses, 200), 20, "{statuses:?}");
}

#[tokio::test]
async fn holds_in_flight_when_redis_dies_still_count_locally() {
    let mut env = env().await;
    let proxy = env.proxy("local", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=20"])
        .await;
    for _ in 0..10 {
        assert_eq!(chat(&proxy, &key).await.status, 200);
    }
    // Ten slow streams hold the rest of the cap in Redis when it dies.
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let url = proxy.url("/v1/chat/completions");
        let key = key.clone();
        slow.spawn(async move {
            post_json(
                &url,
                &key,
                &chat_body("gpt-4o-mini", true, "hello there"),
                &[("x-mock-chunks", "10"), ("x-mock-delay-ms", "300")],
            )
            .await
            .status
        });
    }
    let t0 = Instant::now();
    while readyz(&proxy).await["open_reservations"] != 10 {
        assert!(t0.elapsed() < Duration::from_secs(3), "streams not held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.redis.kill();
    let statuses = burst(&[&proxy], &key, 30).await;
    assert_eq!(
        count(&statuses, 200),
        0,
        "the held streams fill the cap: {statuses:?}"
    );
    let mut done = Vec::new();
    while let Some(s) = slow.join_next().await {
        done.push(s.unwrap());
    }
    assert_eq!(done, vec![200; 10]);
    env.redis.restart();
    wait_redis(&proxy, "up").await;
    settled_in_pg(&env.pg, &key_id, 20).await;
    assert_used(&proxy, &key_id, 20, "requests used").await;
    reconcile_clean(&proxy);
}
