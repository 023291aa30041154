//! No secret leaves tollgate (SPEC §8). A full mix of traffic — every provider route,
//! streamed and not, every refusal, admin calls, the usage page, metrics, `check-config` —
//! runs at `[log] level = "debug"`, in embedded mode and in shared mode (Redis with a
//! password, Postgres with a password in its URL, a webhook URL with credentials and a
//! token). Then everything the process wrote and answered is searched for every secret in
//! play: the upstream keys, the callers' `tg_` keys, the admin token, the webhook's
//! credentials and token, the database passwords. One hit fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::pg::TestPg;
use common::redis::RedisServer;
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEBHOOK_USER: &str = "hookuser-7f3a";
const WEBHOOK_PASSWORD: &str = "hookpass-91c2e";
const WEBHOOK_TOKEN: &str = "hooktoken-5d8b0c";
const WEBHOOK_SIG: &str = "hooksig-2e6f4a";
const PG_PASSWORD: &str = "pgpass-3b9d71";
const REDIS_PASSWORD: &str = "redispass-c4e802";

/// What the webhook receiver got: deliveries, and each one's head and body as sent.
#[derive(Default)]
struct Hook {
    hits: AtomicUsize,
    received: std::sync::Mutex<Vec<(String, String)>>,
}

/// A webhook receiver that answers 200 to anything and keeps every delivery.
async fn webhook_receiver() -> (SocketAddr, Arc<Hook>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(Hook::default());
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 8192];
                while let Ok(n) = s.read(&mut tmp).await {
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    h.received.lock().unwrap().push((
                        String::from_utf8_lossy(&buf[..end]).into_owned(),
                        String::from_utf8_lossy(&buf[end + 4..]).into_owned(),
                    ));
                }
                h.hits.fetch_add(1, Ordering::SeqCst);
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, hits)
}

/// The webhook's credentials as an `Authorization: Basic` header carries them.
fn webhook_basic() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{WEBHOOK_USER}:{WEBHOOK_PASSWORD}"))
}

fn webhook_url(addr: SocketAddr) -> String {
    format!(
        "http://{WEBHOOK_USER}:{WEBHOOK_PASSWORD}@{addr}/hooks/{WEBHOOK_TOKEN}?sig={WEBHOOK_SIG}"
    )
}

/// Everything observed from outside: answers (status, headers, body) and CLI output.
#[derive(Default)]
struct Seen(Vec<(String, String)>);

impl Seen {
    fn reply(&mut self, what: &str, r: &Reply) {
        self.0.push((
            what.to_string(),
            format!("{} {:?}\n{}", r.status, r.headers, r.text()),
        ));
    }
    fn raw(&mut self, what: &str, r: &RawReply) {
        self.0
            .push((what.to_string(), format!("{}\n{}", r.head, r.text())));
    }
    fn text(&mut self, what: &str, t: String) {
        self.0.push((what.to_string(), t));
    }
}

/// Run the whole mix against `proxy`; returns what was seen and the secrets in play.
async fn exercise(proxy: &Proxy, hook: &Hook) -> (Seen, Vec<String>) {
    let mut seen = Seen::default();
    let (code, out, err) = proxy.cli(&["check-config"]);
    assert_eq!(code, 0, "{err}");
    seen.text("check-config", format!("{out}\n{err}"));
    let (id, key) = proxy.create_live_key(&[]).await;
    let (capped_id, capped) = proxy
        .create_live_key(&["--limit", "requests:total=2"])
        .await;
    let (_, disabled) = proxy.create_live_key(&["--limit", "requests:day=0"]).await;
    let auth = format!("Bearer {key}");
    let json_ct = ("content-type", "application/json");

    // Every provider route, streamed and not.
    for stream in [false, true] {
        let r = post_json(
            &proxy.url("/v1/chat/completions"),
            &key,
            &chat_body("gpt-4o-mini", stream, "hello"),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.reply("chat", &r);
        let r = post_json(
            &proxy.url("/v1/responses"),
            &key,
            &json!({"model": "gpt-4o-mini", "input": "hello", "stream": stream, "max_output_tokens": 30}),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.reply("responses", &r);
        let r = send(
            "POST",
            &proxy.url("/v1/messages"),
            &[
                ("x-api-key", key.as_str()),
                ("anthropic-version", "2023-06-01"),
                json_ct,
            ],
            json!({"model": "claude-3-5-haiku-20241022", "max_tokens": 30, "stream": stream,
                   "messages": [{"role": "user", "content": "hello"}]})
            .to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.reply("messages", &r);
    }
    let r = post_json(
        &proxy.url("/v1/embeddings"),
        &key,
        &json!({"model": "text-embedding-3-small", "input": "hello"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen.reply("embeddings", &r);
    let r = send(
        "GET",
        &proxy.url("/v1/tollgate/usage"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    seen.reply("usage", &r);

    // Every refusal.
    let body = chat_body("gpt-4o-mini", false, "hi");
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        "tg_not_a_key_0000000000000000000000000",
        &body,
        &[],
    )
    .await;
    assert_eq!(r.status, 401);
    seen.reply("401", &r);
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &body,
        &[("x-api-key", &capped)],
    )
    .await;
    assert_eq!(r.status, 401, "two different keys");
    seen.reply("401 two keys", &r);
    let r = post_json(&proxy.url("/v1/chat/completions"), &disabled, &body, &[]).await;
    assert_eq!(r.status, 403);
    seen.reply("403", &r);
    for expect in [200, 409] {
        let r = post_json(
            &proxy.url("/v1/chat/completions"),
            &key,
            &body,
            &[("idempotency-key", "order-1")],
        )
        .await;
        assert_eq!(r.status, expect, "{}", r.text());
        seen.reply("idempotency", &r);
    }
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, &"x".repeat(2 << 20)),
        &[],
    )
    .await;
    assert_eq!(r.status, 413);
    seen.reply("413", &r);
    let r = raw_http(
        proxy.addr,
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: {auth}\r\ncontent-length: 99999999\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 413);
    seen.raw("413 by length", &r);
    for expect in [200, 200, 429] {
        let r = post_json(&proxy.url("/v1/chat/completions"), &capped, &body, &[]).await;
        assert_eq!(r.status, expect, "{}", r.text());
        seen.reply("capped", &r);
    }
    let r = post_json(&proxy.url("/v1/nope"), &key, &body, &[]).await;
    assert_eq!(r.status, 404);
    seen.reply("404", &r);
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &json!({"messages": []}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400);
    seen.reply("400", &r);

    // The admin API, the usage page, health and metrics.
    let admin = |path: &str| format!("http://{}{path}", proxy.admin);
    let token = format!("Bearer {ADMIN_TOKEN}");
    let a = [("authorization", token.as_str()), json_ct];
    for path in [
        "/admin/keys".to_string(),
        format!("/admin/keys/{id}"),
        format!("/admin/usage?key={capped_id}"),
        "/admin/transactions?limit=100".to_string(),
        "/admin/spend?since=1d&group_by=key,model".to_string(),
        "/admin/journal".to_string(),
        "/admin/reconcile".to_string(),
        "/admin/openapi.json".to_string(),
        "/healthz".to_string(),
        "/readyz".to_string(),
    ] {
        let r = send("GET", &admin(&path), &a, "").await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        seen.reply(&path, &r);
    }
    let r = send(
        "PUT",
        &admin("/admin/users/alice/limits"),
        &a,
        r#"{"limits":["usd:day=5"]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen.reply("put limits", &r);
    let r = send(
        "GET",
        &admin("/admin/keys"),
        &[("authorization", "Bearer wrong-token-000000")],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    seen.reply("admin 401", &r);
    let r = send(
        "GET",
        &admin(&format!("/admin/?token={ADMIN_TOKEN}")),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    seen.reply("usage page", &r);
    // A key created over the API shows its secret once, in that answer only.
    let r = send("POST", &admin("/admin/keys"), &a, r#"{"name":"api-made"}"#).await;
    assert_eq!(r.status, 201);
    let api_secret = r.json()["key"].as_str().unwrap().to_string();

    // An alert crossed on the capped key reaches the webhook.
    eventually("the webhook got an alert", || {
        hook.hits.load(Ordering::SeqCst) > 0
    })
    .await;
    proxy.wait_settled().await;
    let r = send("GET", &admin("/metrics"), &[], "").await;
    assert_eq!(r.status, 200);
    seen.reply("metrics", &r);
    let r = send("GET", &admin("/admin/keys"), &a, "").await;
    seen.reply("keys after", &r);
    for args in [
        vec!["keys", "list", "--json"],
        vec!["usage", "--key", capped_id.as_str(), "--json"],
        vec!["journal", "status", "--json"],
        vec!["check-config"],
    ] {
        let (_, out, err) = proxy.cli(&args);
        seen.text(&format!("cli {args:?}"), format!("{out}\n{err}"));
    }
    // What reached the webhook: the body whole; the head carries the webhook's own
    // credentials and token (its URL is where they are meant to go), so those four are
    // masked there and only there — any other secret in it is a leak.
    for (head, body) in hook.received.lock().unwrap().iter() {
        seen.text("webhook body", body.clone());
        let mut head = head.clone();
        for own in [
            WEBHOOK_USER.to_string(),
            WEBHOOK_PASSWORD.to_string(),
            WEBHOOK_TOKEN.to_string(),
            WEBHOOK_SIG.to_string(),
            webhook_basic(),
        ] {
            head = head.replace(&own, "<webhook's own>");
        }
        seen.text("webhook head", head);
    }
    let secrets = vec![
        OPENAI_UPSTREAM_KEY.to_string(),
        ANTHROPIC_UPSTREAM_KEY.to_string(),
        ADMIN_TOKEN.to_string(),
        key,
        capped,
        disabled,
        api_secret,
        WEBHOOK_USER.to_string(),
        WEBHOOK_PASSWORD.to_string(),
        WEBHOOK_TOKEN.to_string(),
        WEBHOOK_SIG.to_string(),
        webhook_basic(),
        PG_PASSWORD.to_string(),
        REDIS_PASSWORD.to_string(),
    ];
    (seen, secrets)
}

fn assert_no_secret(proxy: &Proxy, seen: &Seen, secrets: &[String]) {
    let logs = proxy.logs();
    // Only meaningful if the debug level took effect.
    assert!(
        logs.contains("\"level\":\"DEBUG\""),
        "no debug lines in the log"
    );
    // Other crates log at info at most, whatever the level: their debug output dumps
    // requests (pingora's "Sending header to upstream" prints every header).
    for line in logs.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        if matches!(v["level"].as_str(), Some("DEBUG" | "TRACE")) {
            let target = v["target"].as_str().unwrap_or("");
            assert!(
                target == "tollgate" || target.starts_with("tollgate::"),
                "a {target} debug line was logged: {line}"
            );
        }
    }
    let mut hits = Vec::new();
    for secret in secrets {
        for (n, line) in logs.lines().enumerate() {
            if line.contains(secret.as_str()) {
                hits.push(format!("log line {n}: {line}"));
            }
        }
        for (what, text) in &seen.0 {
            if text.contains(secret.as_str()) {
                hits.push(format!("{what}: contains {secret}"));
            }
        }
    }
    assert!(hits.is_empty(), "secrets leaked:\n{}", hits.join("\n"));
}

fn debug_options(webhook: &str) -> ProxyOptions {
    ProxyOptions {
        log_level: "debug".into(),
        max_request_body: "1MiB".into(),
        extra: format!("[alerts]\nthresholds = [50]\nwebhook = \"{webhook}\"\n"),
        ..Default::default()
    }
}

#[tokio::test]
async fn no_secret_in_any_output_at_debug_level_embedded() {
    let (hook, hits) = webhook_receiver().await;
    let (_mock, proxy) = start(debug_options(&webhook_url(hook))).await;
    let (seen, secrets) = exercise(&proxy, &hits).await;
    assert_no_secret(&proxy, &seen, &secrets);
}

#[tokio::test]
async fn no_secret_in_any_output_at_debug_level_shared() {
    let pg = TestPg::start();
    let redis = RedisServer::start_with_password(REDIS_PASSWORD);
    let mock = mock().await;
    let (hook, hits) = webhook_receiver().await;
    // Postgres runs with trust auth, so the password is accepted whatever it is; it is in
    // play all the same (in the URL tollgate holds and connects with).
    let pg_url = pg
        .url()
        .replace("postgres@", &format!("postgres:{PG_PASSWORD}@"));
    let storage = format!(
        "postgres_url = \"{pg_url}\"\nredis_url = \"{}\"",
        redis.url()
    );
    let proxy = Proxy::start_edited(mock.addr, debug_options(&webhook_url(hook)), |c| {
        shared_mode(&c, &storage)
    })
    .await;
    let ready = send("GET", &format!("http://{}/readyz", proxy.admin), &[], "")
        .await
        .json();
    assert_eq!(ready["stores"]["redis"], "up", "{ready}");
    let (seen, secrets) = exercise(&proxy, &hits).await;
    // Both stores were in use: rows reached Postgres through the URL with the password.
    let mut shipped = 0;
    for _ in 0..500 {
        shipped = pg.ledger().await.len();
        if shipped > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(shipped > 0, "nothing reached Postgres");
    assert_no_secret(&proxy, &seen, &secrets);
}
