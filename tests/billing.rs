//! Quota and billing guarantees (SPEC §4) end to end: the real binary, the mock upstream,
//! the SQLite ledger read back directly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

async fn setup(extra_toml: &str) -> (tollgate::mock::MockHandle, Proxy) {
    let mock = tollgate::mock::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = Proxy::start(
        mock.addr,
        ProxyOptions {
            extra: extra_toml.into(),
            ..Default::default()
        },
    )
    .await;
    (mock, proxy)
}

fn settled(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .ledger()
        .into_iter()
        .filter(|r| r["status"] == "settled")
        .collect()
}

/// Usage the client saw in an SSE stream or JSON body, as (input, output).
fn visible_usage(format: &str, body: &str) -> (i64, i64) {
    match format {
        "chat" | "completions" | "embeddings" => {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            (
                v["usage"]["prompt_tokens"].as_i64().unwrap(),
                v["usage"]["completion_tokens"].as_i64().unwrap_or(0),
            )
        }
        "chat-stream" => {
            let ev = body
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .find(|d| d.contains("\"usage\":{"))
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(ev).unwrap();
            (
                v["usage"]["prompt_tokens"].as_i64().unwrap(),
                v["usage"]["completion_tokens"].as_i64().unwrap(),
            )
        }
        "responses" => {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            (
                v["usage"]["input_tokens"].as_i64().unwrap(),
                v["usage"]["output_tokens"].as_i64().unwrap(),
            )
        }
        "responses-stream" => {
            let ev = body
                .split("\n\n")
                .find(|e| e.contains("event: response.completed"))
                .unwrap();
            let data = ev.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            (
                v["response"]["usage"]["input_tokens"].as_i64().unwrap(),
                v["response"]["usage"]["output_tokens"].as_i64().unwrap(),
            )
        }
        "messages" => {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            let u = &v["usage"];
            (
                u["input_tokens"].as_i64().unwrap()
                    + u["cache_read_input_tokens"].as_i64().unwrap_or(0)
                    + u["cache_creation_input_tokens"].as_i64().unwrap_or(0),
                u["output_tokens"].as_i64().unwrap(),
            )
        }
        "messages-stream" => {
            let mut input = 0;
            let mut output = 0;
            for ev in body.split("\n\n") {
                let Some(data) = ev.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                if v["type"] == "message_start" {
                    let u = &v["message"]["usage"];
                    input = u["input_tokens"].as_i64().unwrap()
                        + u["cache_read_input_tokens"].as_i64().unwrap_or(0)
                        + u["cache_creation_input_tokens"].as_i64().unwrap_or(0);
                }
                if v["type"] == "message_delta" {
                    output = v["usage"]["output_tokens"].as_i64().unwrap();
                }
            }
            (input, output)
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn billed_tokens_equal_upstream_usage_for_every_format() {
    let (_mock, proxy) = setup("").await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let cases: Vec<(&str, &str, serde_json::Value)> = vec![
        (
            "chat",
            "/v1/chat/completions",
            json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":"Tell me a story"}],"max_tokens":300}),
        ),
        (
            "chat-stream",
            "/v1/chat/completions",
            json!({"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Tell me a story"}],"max_tokens":300}),
        ),
        (
            "responses",
            "/v1/responses",
            json!({"model":"gpt-4.1-mini","input":"Tell me a story","max_output_tokens":300}),
        ),
        (
            "responses-stream",
            "/v1/responses",
            json!({"model":"gpt-4.1-mini","input":"Tell me a story","stream":true,"max_output_tokens":300}),
        ),
        (
            "completions",
            "/v1/completions",
            json!({"model":"gpt-3.5-turbo-instruct","prompt":"Once upon a time","max_tokens":300}),
        ),
        (
            "embeddings",
            "/v1/embeddings",
            json!({"model":"text-embedding-3-small","input":["alpha beta","gamma delta epsilon"]}),
        ),
        (
            "messages",
            "/v1/messages",
            json!({"model":"claude-3-5-haiku-20241022","max_tokens":300,"messages":[{"role":"user","content":"Tell me a story"}]}),
        ),
        (
            "messages-stream",
            "/v1/messages",
            json!({"model":"claude-3-5-haiku-20241022","max_tokens":300,"stream":true,"messages":[{"role":"user","content":"Tell me a story"}]}),
        ),
    ];
    for (i, (format, path, body)) in cases.iter().enumerate() {
        let r = post_json(
            &proxy.url(path),
            &key,
            body,
            &[("x-mock-words", "40"), ("x-mock-cached-tokens", "3")],
        )
        .await;
        assert_eq!(r.status, 200, "{format}: {}", r.text());
        let (input, output) = visible_usage(format, &r.text());
        let trace = r.header("x-tollgate-trace-id").unwrap().to_string();
        eventually("settle", || settled(&proxy).len() > i).await;
        let row = proxy
            .ledger()
            .into_iter()
            .find(|x| x["trace_id"] == trace.as_str())
            .unwrap();
        assert_eq!(row["status"], "settled", "{format}");
        assert_eq!(row["input_tokens"], input, "{format} input");
        assert_eq!(row["output_tokens"], output, "{format} output");
        assert_eq!(row["usage_source"], "upstream", "{format}");
        assert_eq!(row["http_status"], 200);
        assert!(row["cost_micros"].as_i64().unwrap() > 0, "{format} cost");
        assert!(
            row["reserved_micros"].as_i64().unwrap() >= row["cost_micros"].as_i64().unwrap(),
            "{format}: held estimate covers the cost"
        );
    }
}

#[tokio::test]
async fn estimated_output_when_usage_never_arrives() {
    let (_mock, proxy) = setup("").await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let body = json!({"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}],"max_tokens":500});
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &body,
        &[("x-mock-words", "120"), ("x-mock-no-usage", "1")],
    )
    .await;
    assert_eq!(r.status, 200);
    let text: String = r
        .text()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    let expected = tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(&text)
        .len() as i64;
    eventually("settle", || !settled(&proxy).is_empty()).await;
    let row = &settled(&proxy)[0];
    assert_eq!(row["usage_source"], "estimated");
    let got = row["output_tokens"].as_i64().unwrap();
    assert!(
        (got - expected).abs() * 100 <= expected,
        "estimated {got} vs tiktoken {expected}"
    );
}

#[tokio::test]
async fn concurrent_requests_admit_exactly_the_cap() {
    let (_mock, proxy) = setup("").await;
    let (_, key) = proxy
        .create_live_key(&["--limit", "requests:total=50"])
        .await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let url = proxy.url("/v1/chat/completions");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            post_json(
                &url,
                &key,
                &chat_body("gpt-4o-mini", false, "hi"),
                &[("x-mock-words", "5")],
            )
            .await
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert_eq!(r.json()["error"]["code"], "quota_exceeded");
                assert!(
                    r.json()["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("requests:total=50")
                );
                assert!(
                    r.header("retry-after").is_none(),
                    "no Retry-After for total windows"
                );
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!(ok, 50);
    assert_eq!(limited, 150);
    eventually("all settled", || settled(&proxy).len() == 50).await;
    assert_eq!(
        proxy.ledger().len(),
        50,
        "refused requests leave no billing row"
    );
}

#[tokio::test]
async fn concurrent_spend_never_exceeds_a_usd_cap() {
    // gpt-4o: $2.50 in / $10 out per 1M. Each request states max_tokens=200.
    let (_mock, proxy) = setup("").await;
    let (id, key) = proxy.create_live_key(&["--limit", "usd:total=0.02"]).await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let url = proxy.url("/v1/chat/completions");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            post_json(
                &url,
                &key,
                &chat_body("gpt-4o", true, "hello there"),
                &[("x-mock-words", "150")],
            )
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.status == 200 || r.status == 429, "{}", r.status);
        if r.status == 200 {
            ok += 1;
        }
    }
    assert!(ok > 0);
    eventually("settled", || settled(&proxy).len() == ok).await;
    let spent: i64 = settled(&proxy)
        .iter()
        .map(|r| r["cost_micros"].as_i64().unwrap())
        .sum();
    assert!(spent <= 20_000, "spent {spent} micro-USD over a 20000 cap");
    let (code, out, _) = proxy.cli(&["usage", "--key", &id, "--json"]);
    assert_eq!(code, 0);
    let u: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(u["limits"][0]["used"], tollgate::money::format_usd(spent));
}

#[tokio::test]
async fn upstream_error_consumes_nothing() {
    let (_mock, proxy) = setup("").await;
    let (id, key) = proxy
        .create_live_key(&["--limit", "requests:total=1"])
        .await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[("x-mock-status", "500")],
    )
    .await;
    assert_eq!(r.status, 500, "upstream errors pass through");
    eventually("released", || {
        proxy.ledger().iter().any(|r| r["status"] == "released")
    })
    .await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "the released request freed its hold: {}",
        r.text()
    );
    proxy.wait_settled().await;
    let (_, out, _) = proxy.cli(&["usage", "--key", &id, "--json"]);
    let u: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(u["limits"][0]["used"], 1);
}

#[tokio::test]
async fn disconnect_mid_stream_bills_the_partial_and_frees_the_hold() {
    let (_mock, proxy) = setup("").await;
    let (id, key) = proxy
        .create_live_key(&["--limit", "requests:minute=100"])
        .await;
    let body = serde_json::to_vec(&json!({"model":"claude-3-5-haiku-20241022","max_tokens":4000,"stream":true,"messages":[{"role":"user","content":"go"}]})).unwrap();
    let resp = client()
        .request(request(
            "POST",
            &proxy.url("/v1/messages"),
            &[
                ("x-api-key", key.as_str()),
                ("content-type", "application/json"),
                ("x-mock-words", "2000"),
                ("x-mock-delay-ms", "5"),
            ],
            body,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut b = resp.into_body();
    use http_body_util::BodyExt;
    let mut got = 0;
    while got < 2000 {
        let f = b.frame().await.unwrap().unwrap();
        if let Ok(d) = f.into_data() {
            got += d.len();
        }
    }
    drop(b);
    eventually("partial settle", || !settled(&proxy).is_empty()).await;
    let row = &settled(&proxy)[0];
    assert_eq!(row["usage_source"], "estimated");
    let out = row["output_tokens"].as_i64().unwrap();
    assert!(
        out > 0 && out < 2000,
        "billed {out} output tokens of a cut stream"
    );
    assert!(
        row["input_tokens"].as_i64().unwrap() > 0,
        "input from message_start"
    );
    let (_, out, _) = proxy.cli(&["usage", "--key", &id, "--json"]);
    let u: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(u["limits"][0]["reserved"], 0, "hold freed");
}

#[tokio::test]
async fn duplicate_idempotency_key_is_409_with_one_row() {
    let (_mock, proxy) = setup("").await;
    let (id, key) = proxy.create_live_key(&[]).await;
    let body = chat_body("gpt-4o-mini", false, "hi");
    let r1 = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &body,
        &[("idempotency-key", "order-7")],
    )
    .await;
    assert_eq!(r1.status, 200);
    assert_eq!(
        r1.header("x-tollgate-trace-id"),
        Some(format!("{id}:order-7").as_str())
    );
    eventually("settle", || settled(&proxy).len() == 1).await;
    let r2 = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &body,
        &[("idempotency-key", "order-7")],
    )
    .await;
    assert_eq!(r2.status, 409);
    assert_eq!(r2.json()["error"]["code"], "duplicate_request");
    // While in flight, too.
    let slow = {
        let url = proxy.url("/v1/chat/completions");
        let key = key.clone();
        let body = body.clone();
        tokio::spawn(async move {
            post_json(
                &url,
                &key,
                &body,
                &[
                    ("idempotency-key", "order-8"),
                    ("x-mock-first-byte-delay-ms", "500"),
                ],
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r3 = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &body,
        &[("idempotency-key", "order-8")],
    )
    .await;
    assert_eq!(r3.status, 409);
    assert_eq!(slow.await.unwrap().status, 200);
    eventually("two rows", || settled(&proxy).len() == 2).await;
    assert_eq!(proxy.ledger().len(), 2);
    // A released trace id may be sent again and reuses its row.
    let r4 = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &body,
        &[("idempotency-key", "order-9"), ("x-mock-status", "503")],
    )
    .await;
    assert_eq!(r4.status, 503);
    eventually("released", || {
        proxy.ledger().iter().any(|r| r["status"] == "released")
    })
    .await;
    let r5 = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &body,
        &[("idempotency-key", "order-9")],
    )
    .await;
    assert_eq!(r5.status, 200);
    eventually("reused row settled", || settled(&proxy).len() == 3).await;
    assert_eq!(proxy.ledger().len(), 3);
}

#[tokio::test]
async fn kill_9_and_restart_keeps_every_counter() {
    let (_mock, mut proxy) = setup("").await;
    let (id, key) = proxy
        .create_live_key(&[
            "--limit",
            "requests:total=5",
            "--limit",
            "tokens:day=100000",
        ])
        .await;
    for _ in 0..3 {
        let r = post_json(
            &proxy.url("/v1/chat/completions"),
            &key,
            &chat_body("gpt-4o-mini", false, "hi"),
            &[],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    eventually("3 settled", || settled(&proxy).len() == 3).await;
    // One request in flight when the process dies.
    let inflight = {
        let url = proxy.url("/v1/chat/completions");
        let key = key.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                post_json(
                    &url,
                    &key,
                    &chat_body("gpt-4o-mini", true, "hi"),
                    &[("x-mock-words", "1000"), ("x-mock-delay-ms", "20")],
                ),
            )
            .await;
        })
    };
    eventually("reserved row", || {
        proxy.ledger().iter().any(|r| r["status"] == "reserved")
    })
    .await;
    proxy.kill9();
    let _ = inflight.await;
    proxy.spawn().await;
    // The open reservation was settled at its estimate; nothing reset.
    let rows = proxy.ledger();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r["status"] == "settled"), "{rows:?}");
    let recovered = rows.iter().find(|r| r["stream"] == true).unwrap();
    assert_eq!(recovered["usage_source"], "estimated");
    assert_eq!(
        recovered["output_tokens"], 200,
        "billed at the held max output"
    );
    let (_, out, _) = proxy.cli(&["usage", "--key", &id, "--json"]);
    let u: serde_json::Value = serde_json::from_str(&out).unwrap();
    let req = u["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["metric"] == "requests")
        .unwrap();
    assert_eq!(req["used"], 4);
    // Exactly one more request fits.
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 429);
}

#[tokio::test]
async fn small_and_large_bodies_are_both_admitted_and_forwarded() {
    let (mock, proxy) = setup("").await;
    let (_, key) = proxy
        .create_live_key(&["--limit", "input_tokens:day=10000000"])
        .await;
    for size in [1_000usize, 1_000_000] {
        let text: String = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
        let body = chat_body("gpt-4o-mini", true, &text[..size]);
        let r = post_json(
            &proxy.url("/v1/chat/completions"),
            &key,
            &body,
            &[("x-mock-words", "10")],
        )
        .await;
        assert_eq!(r.status, 200, "size {size}: {}", r.text());
        assert!(r.text().contains("[DONE]"));
        let rec = mock.recorded();
        let last = rec.last().unwrap();
        assert!(
            last.body_len >= size,
            "size {size}: upstream got {} bytes",
            last.body_len
        );
        assert_eq!(
            last.include_usage,
            Some(true),
            "usage injected for size {size}"
        );
    }
    // Over the cap with a large body: refused, nothing billed.
    let (_, key2) = proxy
        .create_live_key(&["--limit", "input_tokens:day=10"])
        .await;
    let big = chat_body("gpt-4o-mini", false, &"word ".repeat(100_000));
    let r = post_json(&proxy.url("/v1/chat/completions"), &key2, &big, &[]).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").is_some());
}

#[tokio::test]
async fn quota_refusals_headers_and_usage_endpoint() {
    let (_mock, proxy) = setup("[plans.free]\nlimits = [\"requests:minute=2\"]\n").await;
    let (_, key) = proxy
        .create_live_key(&["--plan", "free", "--limit", "tokens:day=100000"])
        .await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("1"));
    assert!(
        r.header("x-ratelimit-reset-requests")
            .unwrap()
            .ends_with('s')
    );
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100000"));
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 429);
    let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&ra));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests:minute=2")
    );
    // Anthropic shape for the same refusal.
    let r = send(
        "POST",
        &proxy.url("/v1/messages"),
        &[("x-api-key", key.as_str()), ("content-type", "application/json")],
        r#"{"model":"claude-3-5-haiku-20241022","max_tokens":10,"messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    // A disabled limit is 403.
    let (_, key0) = proxy.create_live_key(&["--limit", "usd:day=0"]).await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key0,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "quota_disabled");
    // The caller's own usage.
    proxy.wait_settled().await;
    let u = send(
        "GET",
        &proxy.url("/v1/tollgate/usage"),
        &[("authorization", &format!("Bearer {key}"))],
        "",
    )
    .await;
    assert_eq!(u.status, 200);
    let limits = u.json()["limits"].as_array().unwrap().clone();
    let req = limits
        .iter()
        .find(|l| l["spec"] == "requests:minute=2")
        .unwrap();
    assert_eq!(req["used"], 2);
    assert_eq!(req["remaining"], 0);
    assert!(req["resets_at"].is_string());
    // Malformed JSON and missing model are 400 with nothing reserved.
    let r = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[("authorization", &format!("Bearer {key0}"))],
        "{nope",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key0,
        &json!({"messages": []}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400);
    // No secret in the logs. Access-log lines are written just after each response ends,
    // so wait for the refusals' lines first.
    eventually("a refusal's access-log line", || {
        proxy.logs().contains("\"quota\":\"refused\"")
    })
    .await;
    let logs = proxy.logs();
    assert!(
        !logs.contains(&key)
            && !logs.contains(OPENAI_UPSTREAM_KEY)
            && !logs.contains(ANTHROPIC_UPSTREAM_KEY)
    );
    assert!(logs.contains("\"quota\":\"refused\""));
}

#[tokio::test]
async fn megabyte_adversarial_prompts_run_beside_small_requests() {
    // The mock counts each 1 MB prompt too: give it time on a loaded machine.
    let mock = tollgate::mock::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = Proxy::start(
        mock.addr,
        ProxyOptions {
            first_byte_timeout: "60s".into(),
            ..Default::default()
        },
    )
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    // 1 MB of "AB" pairs: half a million pre-tokenizer pieces, the slowest shape known for
    // the tokenizer; counted off the reactor, so small requests keep flowing meanwhile.
    let big_text = "AB".repeat(500_000);
    let mut big = Vec::new();
    for _ in 0..4 {
        let url = proxy.url("/v1/chat/completions");
        let key = key.clone();
        let body = chat_body("gpt-4o-mini", false, &big_text);
        big.push(tokio::spawn(async move {
            post_json(&url, &key, &body, &[("x-mock-words", "3")])
                .await
                .status
        }));
    }
    for _ in 0..20 {
        let r = post_json(
            &proxy.url("/v1/chat/completions"),
            &key,
            &chat_body("gpt-4o-mini", false, "hi"),
            &[("x-mock-words", "3")],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    for b in big {
        assert_eq!(b.await.unwrap(), 200);
    }
    eventually("all settled", || settled(&proxy).len() == 24).await;
    let big_rows: Vec<_> = settled(&proxy)
        .into_iter()
        .filter(|r| r["input_tokens"].as_i64().unwrap() > 100_000)
        .collect();
    assert_eq!(big_rows.len(), 4);
}

#[tokio::test]
async fn limits_set_and_clear_from_the_cli_apply_to_users_and_tenants() {
    let (_mock, proxy) = setup("").await;
    let (_, key) = proxy
        .create_live_key(&["--user", "alice", "--tenant", "acme"])
        .await;
    let (code, out, err) = proxy.cli(&[
        "limits",
        "set",
        "--user",
        "alice",
        "--limit",
        "requests:total=2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["subject"], "user:alice");
    assert_eq!(v["limits"][0], "requests:total=2");
    let (code, _, err) = proxy.cli(&["limits", "set", "--tenant", "acme", "--limit", "usd:day=0"]);
    assert_eq!(code, 0, "{err}");
    // Tenant limit 0 disables; applied within a second.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant acme")
    );
    let (code, _, _) = proxy.cli(&["limits", "clear", "--tenant", "acme"]);
    assert_eq!(code, 0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    for expect in [200, 200, 429] {
        let r = post_json(
            &proxy.url("/v1/chat/completions"),
            &key,
            &chat_body("gpt-4o-mini", false, "hi"),
            &[],
        )
        .await;
        assert_eq!(r.status, expect, "{}", r.text());
    }
    proxy.wait_settled().await;
    let (code, out, _) = proxy.cli(&["usage", "--user", "alice", "--json"]);
    assert_eq!(code, 0);
    let u: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(u["limits"][0]["used"], 2);
    // Bad specs are refused with the reason.
    let (code, _, err) = proxy.cli(&[
        "limits",
        "set",
        "--key",
        "k_x",
        "--limit",
        "tokens:fortnight=5",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("fortnight"), "{err}");
}
