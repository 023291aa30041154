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

/// A proxy in shared mode against `pg` and `redis_url`, with the given policy and instance
/// id, and `extra` TOML appended.
async fn shared_proxy(
    pg: &TestPg,
    redis_url: &str,
    upstream: std::net::SocketAddr,
    policy: &str,
    instance: &str,
    extra: &str,
) -> Proxy {
    let storage = format!(
        "postgres_url = \"{}\"\nredis_url = \"{redis_url}\"\non_unavailable = \"{policy}\"\njournal_retention = \"1h\"",
        pg.url()
    );
    Proxy::start_edited(upstream, ProxyOptions::default(), |c| {
        instance_id(&shared_mode(&c, &storage), instance) + extra
    })
    .await
}

struct Env {
    pg: TestPg,
    redis: RedisServer,
    mock: mock_upstream::MockHandle,
}

async fn env() -> Env {
    let pg = TestPg::start();
    let redis = RedisServer::start();
    let mock = mock().await;
    Env { pg, redis, mock }
}

impl Env {
    async fn proxy(&self, policy: &str, instance: &str) -> Proxy {
        self.proxy_with(policy, instance, "").await
    }

    async fn proxy_with(&self, policy: &str, instance: &str, extra: &str) -> Proxy {
        shared_proxy(
            &self.pg,
            &self.redis.url(),
            self.mock.addr,
            policy,
            instance,
            extra,
        )
        .await
    }
}

/// Holds of a dead process are reaped within seconds (the default is 10 minutes).
const SHORT_TTL: &str = "\n[quota]\nreservation_ttl = \"3s\"\n";

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
    fire(n, |i| {
        let url = urls[i % urls.len()].clone();
        let key = key.to_string();
        async move {
            post_json(
                &url,
                &key,
                &chat_body("gpt-4o-mini", i % 2 == 0, "hello there"),
                &[],
            )
            .await
        }
    })
    .await
    .statuses()
}

fn count(statuses: &[u16], code: u16) -> usize {
    statuses.iter().filter(|s| **s == code).count()
}

/// Wait until `proxy` accepts `key` (keys reach other instances through Postgres).
async fn wait_key(proxy: &Proxy, key: &str) {
    proxy.wait_live(key, Duration::from_secs(2)).await;
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

/// Waits until a request of `key_id` is journaled open: its `reserved` row has shipped
/// to Postgres. (The Redis hold comes first — the quota check decides before the journal
/// is written — so a hold alone does not mean the request went upstream.)
async fn wait_journaled_open(pg: &TestPg, key_id: &str) {
    pg.wait_ledger(&format!("an open row of {key_id}"), |rows| {
        rows.iter()
            .any(|r| r["key_id"] == key_id && r["status"] == "reserved")
    })
    .await;
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

/// `(used, reserved)` of the key's requests limit, as the running instance reports it.
async fn requests_state(proxy: &Proxy, key_id: &str) -> (i64, i64) {
    let r = send(
        "GET",
        &format!("http://{}/admin/usage?key={key_id}", proxy.admin),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let l = v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["metric"] == "requests")
        .unwrap_or_else(|| panic!("no requests limit: {v}"))
        .clone();
    (l["used"].as_i64().unwrap(), l["reserved"].as_i64().unwrap())
}

/// Waits (10 s at most) until nothing is held on the key's requests limit.
async fn wait_no_holds(proxy: &Proxy, key_id: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, reserved) = requests_state(proxy, key_id).await;
        if reserved == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {reserved} still held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request that the upstream answers 500 after `delay_ms`: admitted, then released.
fn failing_later(proxy: &Proxy, key: &str, delay_ms: u64) -> tokio::task::JoinHandle<u16> {
    let url = proxy.url("/v1/chat/completions");
    let key = key.to_string();
    tokio::spawn(async move {
        let delay = delay_ms.to_string();
        post_json(
            &url,
            &key,
            &chat_body("gpt-4o-mini", false, "hello there"),
            &[
                ("x-mock-status", "500"),
                ("x-mock-first-byte-delay-ms", delay.as_str()),
            ],
        )
        .await
        .status
    })
}

/// Waits until the running instance holds `n` reservations.
async fn wait_open(proxy: &Proxy, n: i64) {
    let t0 = Instant::now();
    while readyz(proxy).await["open_reservations"] != n {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{n} reservations not held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Issue 10, defect 2: a reservation left open by a SIGKILL is settled at the next start,
/// and that settle reaches the Redis counters like any other; with `requests:total=3`,
/// three rows and a fourth request refused once the dead process's hold is gone.
#[tokio::test]
async fn sigkill_recovery_settles_reach_the_redis_counters() {
    let env = env().await;
    let mut proxy = env.proxy_with("local", "sidecar-a", SHORT_TTL).await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=3"])
        .await;
    for _ in 0..2 {
        assert_eq!(chat(&proxy, &key).await.status, 200);
    }
    assert_used(&proxy, &key_id, 2, "settled before the crash").await;
    wait_open(&proxy, 0).await;
    let inflight = proxy.stream_in_flight(&key, &[]);
    wait_journaled_open(&env.pg, &key_id).await;
    proxy.kill9();
    let _ = inflight.await;
    proxy.spawn().await;
    // The recovered settle is in Redis (before: 2, and the dead hold expired after its TTL,
    // leaving room for a fourth request).
    assert_used(&proxy, &key_id, 3, "recovered settle in redis").await;
    wait_no_holds(&proxy, &key_id, "the dead process's hold").await;
    assert_eq!(chat(&proxy, &key).await.status, 429);
    let rows = settled_in_pg(&env.pg, &key_id, 3).await;
    assert_eq!(
        rows.iter()
            .filter(|r| r["usage_source"] == "estimated")
            .count(),
        1
    );
    reconcile_clean(&proxy);
}

/// Issue 10, defect 4: recovery takes every open row of the journal, whatever instance id
/// it carries — a renamed instance (new pod name, new port) still settles what its
/// previous run left open.
#[tokio::test]
async fn recovery_takes_open_rows_written_under_another_instance_id() {
    let env = env().await;
    let mut proxy = env.proxy("local", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=10"])
        .await;
    assert_eq!(chat(&proxy, &key).await.status, 200);
    assert_used(&proxy, &key_id, 1, "settled before the crash").await;
    wait_open(&proxy, 0).await;
    let inflight = proxy.stream_in_flight(&key, &[("idempotency-key", "job-1")]);
    wait_journaled_open(&env.pg, &key_id).await;
    proxy.kill9();
    let _ = inflight.await;
    let text = std::fs::read_to_string(&proxy.config_path)
        .unwrap()
        .replace(
            "instance_id = \"sidecar-a\"",
            "instance_id = \"sidecar-a-renamed\"",
        );
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.spawn().await;
    let rows = settled_in_pg(&env.pg, &key_id, 2).await;
    let recovered = rows
        .iter()
        .find(|r| r["trace_id"].as_str().unwrap().ends_with(":job-1"))
        .unwrap();
    assert_eq!(recovered["usage_source"], "estimated");
    assert_eq!(recovered["instance_id"], "sidecar-a");
    assert_used(&proxy, &key_id, 2, "requests used").await;
    // The key's retry is a duplicate of a settled request, not of one open forever.
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[("idempotency-key", "job-1")],
    )
    .await;
    assert_eq!(r.status, 409);
}

/// Issue 10, defect 10: the recovery probe talks to Redis; while Redis is down the
/// instance stays down instead of flapping to "up" at every probe.
#[tokio::test]
async fn the_probe_keeps_redis_down_until_it_answers() {
    let mut env = env().await;
    let proxy = env.proxy("local", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=100"])
        .await;
    assert_eq!(chat(&proxy, &key).await.status, 200);
    assert_used(&proxy, &key_id, 1, "settled before the outage").await;
    env.redis.kill();
    // A read finds Redis gone; nothing is waiting to be replayed.
    let r = send(
        "GET",
        &proxy.url("/v1/tollgate/usage"),
        &[("authorization", &format!("Bearer {key}"))],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    wait_redis(&proxy, "down").await;
    // Several probe periods: every look says down.
    let mut seen = Vec::new();
    for _ in 0..40 {
        seen.push(readyz(&proxy).await["stores"]["redis"].clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.iter().all(|s| s == "down"), "{seen:?}");
    env.redis.restart();
    wait_redis(&proxy, "up").await;
}

/// Issue 10, defect 7: settles made while Redis is unreachable are journal events, so a
/// restart during the outage loses none of them; Redis (which kept its data) gets them
/// when it answers again.
#[tokio::test]
async fn settles_during_an_outage_survive_a_restart_and_reach_redis() {
    let env = env().await;
    let mut proxy = env.proxy("local", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=20"])
        .await;
    for _ in 0..5 {
        assert_eq!(chat(&proxy, &key).await.status, 200);
    }
    assert_used(&proxy, &key_id, 5, "before the outage").await;
    env.redis.pause();
    for _ in 0..5 {
        assert_eq!(chat(&proxy, &key).await.status, 200);
    }
    wait_redis(&proxy, "down").await;
    settled_in_pg(&env.pg, &key_id, 10).await;
    // A deploy during the outage.
    proxy.kill9();
    proxy.spawn().await;
    // The journal has them for Redis.
    eventually("redis backlog of the outage's 5 settles", || {
        let (_, out, _) = proxy.cli(&["journal", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["backlog"]["redis"].as_i64().is_some_and(|n| n >= 5)
    })
    .await;
    env.redis.resume();
    wait_redis(&proxy, "up").await;
    // Redis kept its 5 and got the other 5 from the journal (before: 5 forever).
    assert_used(&proxy, &key_id, 10, "requests used").await;
    eventually("redis backlog applied", || {
        let (_, out, _) = proxy.cli(&["journal", "status", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["backlog"]["redis"] == 0
    })
    .await;
    reconcile_clean(&proxy);
}

/// Issue 10, defect 9: a release made while Redis is unreachable is replayed when it is
/// back, so the hold goes at once instead of being kept alive by the refresher.
#[tokio::test]
async fn a_release_during_an_outage_leaves_no_hold_behind() {
    let env = env().await;
    let proxy = env.proxy("local", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=3"])
        .await;
    assert_eq!(chat(&proxy, &key).await.status, 200);
    assert_used(&proxy, &key_id, 1, "settled before the outage").await;
    wait_open(&proxy, 0).await;
    // Held in Redis, then failed upstream while Redis is unreachable: released.
    let failing = failing_later(&proxy, &key, 1500);
    wait_open(&proxy, 1).await;
    env.redis.pause();
    assert_eq!(failing.await.unwrap(), 500);
    wait_redis(&proxy, "down").await;
    env.redis.resume();
    wait_redis(&proxy, "up").await;
    wait_no_holds(&proxy, &key_id, "the released request's hold").await;
    assert_used(&proxy, &key_id, 1, "requests used").await;
    // The whole remainder of the cap is available.
    assert_eq!(chat(&proxy, &key).await.status, 200);
    assert_eq!(chat(&proxy, &key).await.status, 200);
    assert_eq!(chat(&proxy, &key).await.status, 429);
}

/// Issue 10, defect 8: holds of requests admitted locally during an outage and finished
/// after it do not stay in the local counters, so the next outage starts from the truth.
#[tokio::test]
async fn local_holds_do_not_outlive_their_outage() {
    let env = env().await;
    let proxy = env.proxy("local", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=4"])
        .await;
    assert_eq!(requests_state(&proxy, &key_id).await, (0, 0));
    env.redis.pause();
    // Two requests admitted locally, answered (500, released) after Redis is back.
    let first = failing_later(&proxy, &key, 100);
    assert_eq!(first.await.unwrap(), 500);
    wait_redis(&proxy, "down").await;
    wait_open(&proxy, 0).await;
    let slow: Vec<_> = (0..2).map(|_| failing_later(&proxy, &key, 2500)).collect();
    wait_open(&proxy, 2).await;
    env.redis.resume();
    wait_redis(&proxy, "up").await;
    for s in slow {
        assert_eq!(s.await.unwrap(), 500);
    }
    // Second outage: nothing was billed, so the whole cap is available locally.
    env.redis.pause();
    let r = failing_later(&proxy, &key, 0).await.unwrap();
    assert_eq!(r, 500);
    wait_redis(&proxy, "down").await;
    wait_open(&proxy, 0).await;
    let statuses = burst(&[&proxy], &key, 8).await;
    assert_eq!(count(&statuses, 200), 4, "{statuses:?}");
    env.redis.resume();
    wait_redis(&proxy, "up").await;
    settled_in_pg(&env.pg, &key_id, 4).await;
    assert_used(&proxy, &key_id, 4, "requests used").await;
}

/// Issue 10, defect 12: `tollgate reconcile` reads every key's counters where the request
/// path keeps them (one hash tag per key's widest subject). Before the fix it passed every
/// key's limits in one call under one tag: for every key but one it found nothing, seeded a
/// stray copy from the ledger and compared the ledger with itself (`"differences": []`).
#[tokio::test]
async fn reconcile_reads_each_keys_own_counters() {
    let env = env().await;
    let proxy = env.proxy("local", "sidecar-a").await;
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(
            proxy
                .create_live_key(&["--limit", "requests:total=100"])
                .await,
        );
    }
    for (id, key) in &keys {
        assert_eq!(chat(&proxy, key).await.status, 200);
        settled_in_pg(&env.pg, id, 1).await;
        assert_used(&proxy, id, 1, "requests used").await;
    }
    reconcile_clean(&proxy);
    // Another instance billed every key once more (its rows reached Postgres directly).
    let c = env.pg.client().await;
    for (i, (id, _)) in keys.iter().enumerate() {
        c.execute(
            "INSERT INTO billing_transactions (trace_id, key_id, upstream, model, status, input_tokens, output_tokens,
               reserved_micros, cost_micros, usage_source, stream, http_status, started_at, settled_at, instance_id)
             VALUES ($1, $2, 'openai', 'gpt-4o-mini', 'settled', 10, 10, 100, 50, 'upstream', false, 200, now(), now(), 'sidecar-b')",
            &[&format!("other-{i}"), id],
        )
        .await
        .unwrap();
    }
    let (code, out, err) = proxy.cli(&["reconcile", "--json"]);
    assert_eq!(code, 1, "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let diffs = v["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 3, "every key's counter is one short: {v}");
    for d in diffs {
        assert_eq!(
            (d["counter"].as_i64(), d["ledger"].as_i64()),
            (Some(1), Some(2)),
            "{v}"
        );
    }
    // --fix rebuilds the counters the request path uses.
    let (code, out, _) = proxy.cli(&["reconcile", "--fix", "--json"]);
    assert_eq!(code, 1, "{out}");
    reconcile_clean(&proxy);
    for (id, _) in &keys {
        assert_used(&proxy, id, 2, "rebuilt from the ledger").await;
    }
}

/// Issue 10, defect 3: Redis flushed while Postgres is down. The reseed may read only this
/// instance's journal, which lacks what other instances billed; it must not go below the
/// last state Redis reported (before: rebuilt from the journal alone, toward the full
/// allowance — with a cap of 5, 9 settled). A counter nothing is known of is refused.
#[tokio::test]
async fn a_reseed_while_postgres_is_down_never_lowers_what_redis_reported() {
    let env = env().await;
    let a = env.proxy("local", "sidecar-a").await;
    let b = env.proxy("local", "sidecar-b").await;
    let (key_id, key) = a.create_live_key(&["--limit", "requests:total=10"]).await;
    wait_key(&b, &key).await;
    assert_eq!(chat(&a, &key).await.status, 200);
    for _ in 0..4 {
        assert_eq!(chat(&b, &key).await.status, 200);
    }
    assert_used(&a, &key_id, 5, "a sees b's usage in redis").await;
    // a's last reserve is what Redis last told a: 5 used + its own hold.
    assert_eq!(chat(&a, &key).await.status, 200);
    settled_in_pg(&env.pg, &key_id, 6).await;
    assert_used(&a, &key_id, 6, "requests used").await;

    env.pg.stop();
    assert_eq!(env.redis.cli(&["FLUSHALL"]).trim(), "OK");
    // a's journal holds 2 of the 6; Redis last said 6.
    let statuses = burst(&[&a], &key, 10).await;
    assert_eq!(count(&statuses, 200), 4, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 6, "{statuses:?}");
    // b knows nothing of another key's counter: a key it never saw is refused, not
    // rebuilt from nothing.
    let (_, other) = {
        env.pg.start_again();
        let k = a.create_live_key(&["--limit", "requests:total=10"]).await;
        wait_key_unread().await;
        env.pg.stop();
        assert_eq!(env.redis.cli(&["FLUSHALL"]).trim(), "OK");
        k
    };
    let r = chat(&b, &other).await;
    assert_eq!(r.status, 503, "{}", r.text());
    refused_as_unknown(&b);
    env.pg.start_again();
    settled_in_pg(&env.pg, &key_id, 10).await;
}

#[tokio::test]
async fn a_failing_store_is_answered_with_a_trace_id_never_its_error_text() {
    let mut env = env().await;
    let proxy = env.proxy("closed", "sidecar-a").await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "requests:total=10"])
        .await;
    assert_eq!(chat(&proxy, &key).await.status, 200);
    env.redis.kill();
    env.pg.stop();

    // What a Redis, Postgres or SQLite error (or our own wording of one) would show.
    let redis_port = env.redis.url().rsplit(':').next().unwrap().to_string();
    let internal = [
        "os error".to_string(),
        "refused".into(),
        "broken pipe".into(),
        "redis".into(),
        "postgres".into(),
        "sqlite".into(),
        "127.0.0.1".into(),
        redis_port,
        env.pg.port.to_string(),
        proxy.dir.path().display().to_string(),
        "tollgate.db".into(),
    ];
    let check = |what: &str, body: &str| {
        let lower = body.to_lowercase();
        for s in &internal {
            assert!(
                !lower.contains(&s.to_lowercase()),
                "{what} shows `{s}`: {body}"
            );
        }
    };

    // The proxy's 503, in both providers' shapes: a stable message naming the trace id,
    // whose detail is in the log.
    let r = chat(&proxy, &key).await;
    assert_eq!(r.status, 503, "{}", r.text());
    check("503", &r.text());
    let trace = r.header("x-tollgate-trace-id").unwrap().to_string();
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains(&trace), "{message}");
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
    check("anthropic 503", &r.text());
    // The same with an Idempotency-Key (a ledger lookup comes first).
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hello there"),
        &[("idempotency-key", "retry-1")],
    )
    .await;
    assert!(r.status >= 500, "{}", r.text());
    check("503 with an idempotency key", &r.text());

    // The caller's usage report and the operator's views.
    let r = send(
        "GET",
        &proxy.url("/v1/tollgate/usage"),
        &[("authorization", &format!("Bearer {key}"))],
        "",
    )
    .await;
    check("usage", &r.text());
    let admin = |path: String| async move {
        send(
            "GET",
            &format!("http://{}{path}", proxy.admin),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            "",
        )
        .await
    };
    for path in [
        format!("/admin/usage?key={key_id}"),
        "/admin/spend".to_string(),
        "/admin/reconcile".to_string(),
        "/admin/transactions".to_string(),
        "/admin/keys".to_string(),
    ] {
        let r = admin(path.clone()).await;
        check(&path, &r.text());
        assert!(
            r.status == 200 || r.status == 503,
            "{path}: {} {}",
            r.status,
            r.text()
        );
        if r.status >= 500 {
            let v = r.json();
            let trace = v["error"]["trace_id"].as_str().unwrap_or_default();
            assert!(!trace.is_empty(), "{path}: {v}");
            assert_eq!(r.header("x-tollgate-trace-id"), Some(trace), "{path}");
        }
    }

    // The log has the detail, under the trace id, with no secret.
    let logs = proxy.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains(&trace) && l.contains("store unavailable")),
        "{logs}"
    );
}

/// Lets `proxy`'s key directory pick up a key created elsewhere without sending it a
/// request: any request reads the key's counters (even passthrough routes check the
/// requests limit), and what Redis reports then is known to the instance. The directory
/// refreshes every 250 ms.
async fn wait_key_unread() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// The instance refused a counter because nothing was known of it (not, say, because
/// it could not look the key up).
fn refused_as_unknown(proxy: &Proxy) {
    assert!(
        proxy.logs().contains("nothing is known of this counter"),
        "refused for another reason"
    );
}

/// Waits until `proxy` has heard from `n` instances (itself included) through Redis.
async fn wait_fleet(proxy: &Proxy, n: usize) {
    let t0 = Instant::now();
    loop {
        let v = readyz(proxy).await;
        if v["fleet"]["live"] == n {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "fleet of {n} never seen: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 10, defect 13 (the local-mode share, SPEC §5): while Redis is down, each of two
/// instances admits at most its half of what remained, so the cap holds between them
/// (before: each admitted all that remained, 32 of a cap of 20).
#[tokio::test]
async fn two_instances_share_what_remains_while_redis_is_down() {
    let mut env = env().await;
    let a = env.proxy("local", "sidecar-a").await;
    let b = env.proxy("local", "sidecar-b").await;
    let (key_id, key) = a.create_live_key(&["--limit", "requests:total=20"]).await;
    wait_key(&b, &key).await;
    for p in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(chat(p, &key).await.status, 200);
        }
    }
    settled_in_pg(&env.pg, &key_id, 4).await;
    for p in [&a, &b] {
        wait_fleet(p, 2).await;
    }

    env.redis.kill();
    let statuses = burst(&[&a, &b], &key, 40).await;
    // 16 remained: 8 each.
    assert_eq!(count(&statuses, 200), 16, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 24, "{statuses:?}");

    env.redis.restart();
    for p in [&a, &b] {
        wait_redis(p, "up").await;
    }
    settled_in_pg(&env.pg, &key_id, 20).await;
    assert_used(&a, &key_id, 20, "after the outage").await;
    assert_used(&b, &key_id, 20, "after the outage").await;
    assert_eq!(chat(&b, &key).await.status, 429);
    assert_eq!(chat(&a, &key).await.status, 429);
}

/// Issue 10, defect 13 (refill before the backlogs are in): Redis comes back empty while
/// another instance has not yet applied the settles it made during the outage (here it is
/// frozen). Those settles already shipped to Postgres: a rebuild from the ledger now, then
/// that instance's replay, would count them twice. The rebuild waits for it; meanwhile
/// the first instance goes on with its local counters.
#[tokio::test]
async fn a_counter_lost_in_an_outage_is_rebuilt_after_every_instance_caught_up() {
    let mut env = env().await;
    let a = env.proxy("local", "sidecar-a").await;
    let b = env.proxy("local", "sidecar-b").await;
    let (key_id, key) = a.create_live_key(&["--limit", "requests:total=40"]).await;
    wait_key(&b, &key).await;
    assert_eq!(chat(&a, &key).await.status, 200);
    assert_eq!(chat(&b, &key).await.status, 200);
    for p in [&a, &b] {
        wait_fleet(p, 2).await;
    }

    env.redis.kill();
    for _ in 0..5 {
        assert_eq!(chat(&b, &key).await.status, 200);
    }
    // b's five settles are in Postgres, and in no Redis.
    settled_in_pg(&env.pg, &key_id, 7).await;
    b.signal("STOP");
    env.redis.restart();
    wait_redis(&a, "up").await;
    // b has not been heard from since the outage: a waits for it before any rebuild.
    let t0 = Instant::now();
    while readyz(&a).await["fleet"]["waiting_on"] != serde_json::json!(["sidecar-b"]) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a never waited for b"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        assert_eq!(chat(&a, &key).await.status, 200);
    }
    // Decided by a's local counters for the counter being rebuilt; Redis stays in force.
    assert_eq!(readyz(&a).await["stores"]["redis"], "up");
    b.signal("CONT");
    wait_redis(&b, "up").await;
    settled_in_pg(&env.pg, &key_id, 10).await;
    assert_used(&a, &key_id, 10, "every request counted once").await;
    assert_used(&b, &key_id, 10, "every request counted once").await;
    reconcile_clean(&a);
}

/// Issue 10, defect 13 (local counters from the journal alone): with Postgres and Redis
/// both down, an instance's local counter starts from what Redis last reported to it —
/// not from its own journal, which lacks the other instance's usage — and a counter it
/// knows nothing of is refused rather than started from zero.
#[tokio::test]
async fn local_counters_in_a_double_outage_start_from_what_redis_reported() {
    let mut env = env().await;
    let a = env.proxy("local", "sidecar-a").await;
    let b = env.proxy("local", "sidecar-b").await;
    let (key_id, key) = a.create_live_key(&["--limit", "requests:total=10"]).await;
    // Created through b: a never reads its counters before the outage.
    let (_, unseen) = b.create_live_key(&["--limit", "requests:total=10"]).await;
    wait_key(&b, &key).await;
    wait_key_unread().await;
    for _ in 0..8 {
        assert_eq!(chat(&b, &key).await.status, 200);
    }
    // Redis tells a: 8 used, plus a's own hold.
    assert_eq!(chat(&a, &key).await.status, 200);
    settled_in_pg(&env.pg, &key_id, 9).await;
    wait_fleet(&a, 2).await;

    env.pg.stop();
    env.redis.kill();
    // a's journal has 1 of the 9. Redis last said 9: one left, and a's share of it is 0.
    let statuses = burst(&[&a], &key, 5).await;
    assert_eq!(count(&statuses, 429), 5, "{statuses:?}");
    // A key a never counted: nothing known of it, refused.
    let r = chat(&a, &unseen).await;
    assert_eq!(r.status, 503, "{}", r.text());
    refused_as_unknown(&a);

    env.pg.start_again();
    env.redis.restart();
    wait_redis(&a, "up").await;
    assert_used(&a, &key_id, 9, "nothing admitted in the outage").await;
}

/// A peer stopped while Redis is up (a deploy step) holds no rebuild back: what it left
/// unapplied comes back with it. Before, every instance then decided requests on missing
/// counters locally for 30 s, without holds in Redis.
#[tokio::test]
async fn a_peer_stopped_while_redis_is_up_holds_no_rebuild_back() {
    let env = env().await;
    let a = env.proxy("local", "sidecar-a").await;
    let mut b = env.proxy("local", "sidecar-b").await;
    wait_fleet(&a, 2).await;
    b.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        readyz(&a).await["fleet"]["waiting_on"],
        serde_json::json!([])
    );
    // A new key's counters are rebuilt at once and decided by Redis: the whole cap.
    let (key_id, key) = a.create_live_key(&["--limit", "requests:total=4"]).await;
    let statuses = burst(&[&a], &key, 6).await;
    assert_eq!(count(&statuses, 200), 4, "{statuses:?}");
    assert_eq!(readyz(&a).await["stores"]["redis"], "up");
    assert_used(&a, &key_id, 4, "counted in redis").await;
}

/// Two processes under one `server.instance_id` (a copied config): each counts the
/// other in the local-mode share, instead of each taking the whole of it.
#[tokio::test]
async fn two_processes_under_one_instance_id_both_count_in_the_share() {
    let env = env().await;
    let a = env.proxy("local", "sidecar-a").await;
    let twin = env.proxy("local", "sidecar-a").await;
    for p in [&a, &twin] {
        wait_fleet(p, 2).await;
    }
    assert!(
        a.logs()
            .contains("another process heartbeats under this instance id")
            || twin
                .logs()
                .contains("another process heartbeats under this instance id")
    );
}
