//! What an unmodified client meets: passthrough routes (models lists, token counting),
//! keep-alive framing on every kind of answer, and the trace id on every answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

// ---------------------------------------------------------------------------------------
// Passthrough routes

#[tokio::test]
async fn models_and_count_tokens_pass_through_unbilled() {
    let (mock, proxy) = start(ProxyOptions::default()).await;
    let (id, key) = proxy
        .create_live_key(&[
            "--limit",
            "requests:total=1",
            "--limit",
            "tokens:day=100000",
        ])
        .await;
    let auth = bearer(&key);

    // OpenAI SDK: GET /v1/models with a bearer key → OpenAI's list, OpenAI's key upstream.
    mock.clear_recorded();
    let r = send(
        "GET",
        &proxy.url("/v1/models"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "list");
    assert!(
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "gpt-4o-mini")
    );
    assert!(r.header("x-tollgate-trace-id").is_some());
    // tollgate's rate-limit headers replace the provider's (nothing was consumed).
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100000"));
    let seen = mock.recorded();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {OPENAI_UPSTREAM_KEY}").as_str())
    );

    // One model, by id.
    let r = send(
        "GET",
        &proxy.url("/v1/models/gpt-4o-mini"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], "gpt-4o-mini");
    let r = send(
        "GET",
        &proxy.url("/v1/models/no-such-model"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 404, "the provider's own 404 passes through");
    assert_eq!(r.json()["error"]["code"], "model_not_found");

    // Anthropic SDK: x-api-key + anthropic-version → Anthropic's list, with its query.
    mock.clear_recorded();
    let r = send(
        "GET",
        &proxy.url("/v1/models?limit=2"),
        &[("x-api-key", &key), ("anthropic-version", "2023-06-01")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);
    assert_eq!(r.json()["has_more"], true);
    let seen = mock.recorded();
    assert_eq!(seen[0].header("x-api-key"), Some(ANTHROPIC_UPSTREAM_KEY));
    assert_eq!(seen[0].header("authorization"), None);
    assert_eq!(seen[0].query.as_deref(), Some("limit=2"));

    // count_tokens, body forwarded as sent.
    let body = json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "How many tokens is this?"}]});
    let r = send(
        "POST",
        &proxy.url("/v1/messages/count_tokens"),
        &[
            ("x-api-key", &key),
            ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"),
        ],
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["input_tokens"].as_u64().unwrap() > 5);

    // None of that was metered, counted or written: the one allowed request is still there.
    assert!(proxy.ledger().is_empty(), "{:?}", proxy.ledger());
    let chat = |k: String| {
        let url = proxy.url("/v1/chat/completions");
        async move { post_json(&url, &k, &chat_body("gpt-4o-mini", false, "hi"), &[]).await }
    };
    assert_eq!(chat(key.clone()).await.status, 200);
    let refused = chat(key.clone()).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    proxy.wait_settled().await;
    let rows = proxy.ledger();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["key_id"], id.as_str());
    // A key whose request limit is used up is refused on passthrough routes too: they are
    // not metered, but each spends the operator's provider-side rate limits.
    mock.clear_recorded();
    for _ in 0..3 {
        let r = send(
            "GET",
            &proxy.url("/v1/models"),
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(
            r.status,
            429,
            "passthrough past requests:total=1: {}",
            r.text()
        );
        assert_eq!(r.json()["error"]["code"], "quota_exceeded");
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(
            r.header("x-should-retry"),
            Some("false"),
            "a total never frees"
        );
    }
    let r = send(
        "POST",
        &proxy.url("/v1/messages/count_tokens"),
        &[
            ("x-api-key", &key),
            ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"),
        ],
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(
        mock.recorded().is_empty(),
        "a refused passthrough reached the upstream"
    );
    assert_eq!(proxy.ledger().len(), 1);
}

#[tokio::test]
async fn passthrough_requests_of_one_key_are_rate_bounded() {
    let (mock, proxy) = start(ProxyOptions {
        extra: "[quota]\npassthrough_rate = 1\npassthrough_burst = 2\n".into(),
        ..Default::default()
    })
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let (_, other) = proxy.create_live_key(&[]).await;
    let models = |k: String| {
        let url = proxy.url("/v1/models");
        async move {
            send(
                "GET",
                &url,
                &[("authorization", &format!("Bearer {k}"))],
                "",
            )
            .await
        }
    };
    // Two at once (the burst), then one a second: six in a row cannot all pass.
    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..6 {
        let r = models(key.clone()).await;
        statuses.push(r.status);
        if r.status == 429 {
            refusal = Some(r);
        }
    }
    assert_eq!(&statuses[..2], &[200, 200], "{statuses:?}");
    let refusal = refusal.unwrap_or_else(|| panic!("no passthrough refused: {statuses:?}"));
    assert_eq!(refusal.json()["error"]["code"], "quota_exceeded");
    assert_eq!(refusal.header("retry-after"), Some("1"));
    assert!(
        mock.recorded().len() < 6,
        "every passthrough reached the upstream"
    );
    // Another key has its own budget; nothing was written to the ledger.
    assert_eq!(models(other).await.status, 200);
    assert!(proxy.ledger().is_empty());
}

#[tokio::test]
async fn passthrough_needs_a_key_and_reaches_only_what_it_names() {
    let (mock, proxy) = start(ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    mock.clear_recorded();
    let r = send("GET", &proxy.url("/v1/models"), &[], "").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = send(
        "GET",
        &proxy.url("/v1/models"),
        &[
            ("x-api-key", "tg_not_a_key"),
            ("anthropic-version", "2023-06-01"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error", "Anthropic's error shape");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let auth = bearer(&key);
    for (path, status) in [
        ("/v1/models/..%2Ffiles", 400),
        ("/v1/models/%2e%2e", 400),
        ("/v1/models/a/b", 404),
        ("/v1/models/", 400),
    ] {
        let r = send("GET", &proxy.url(path), &[("authorization", &auth)], "").await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        let code = if status == 404 {
            "not_found"
        } else {
            "invalid_request"
        };
        assert_eq!(r.json()["error"]["code"], code, "{path}");
    }
    // Wrong method: not forwarded, 405 naming the one the route takes.
    let r = send(
        "DELETE",
        &proxy.url("/v1/models/gpt-4o"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.header("allow"), Some("GET"));
    // An Anthropic client never reaches a route only the OpenAI upstream lists.
    let r = send(
        "GET",
        &proxy.url("/v1/models/claude-sonnet-4-5"),
        &[("x-api-key", &key), ("anthropic-version", "2023-06-01")],
        "",
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
    assert!(mock.recorded().is_empty(), "{:?}", mock.recorded());

    // Metrics are labelled by the configured route, not by what clients send.
    let _ = send(
        "GET",
        &proxy.url("/v1/models/gpt-4o"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    let metrics = format!("http://{}/metrics", proxy.admin);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = send("GET", &metrics, &[], "").await.text();
        if text.contains("route=\"/v1/models/{id}\",status=\"200\"") {
            assert!(
                !text.contains("/v1/models/gpt-4o\""),
                "raw paths never label"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn passthrough_is_configurable_and_bounded() {
    let (mock, proxy) = start(ProxyOptions {
        upstream_extra: r#"passthrough = ["GET /v1/models", "POST /v1/files/{id}/content"]"#.into(),
        max_request_body: "1KiB".into(),
        ..Default::default()
    })
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let auth = bearer(&key);
    // The configured list replaces the default: /v1/models/{id} is gone.
    let r = send(
        "GET",
        &proxy.url("/v1/models/gpt-4o"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 404);
    // A configured template forwards (the mock answers its own 404 for this route).
    mock.clear_recorded();
    let r = send(
        "POST",
        &proxy.url("/v1/files/file-abc/content"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(mock.recorded()[0].path, "/v1/files/file-abc/content");
    // The body bound holds for passthrough bodies, by length and when chunked.
    let big = "x".repeat(2048);
    let r = send(
        "POST",
        &proxy.url("/v1/files/f/content"),
        &[("authorization", &auth)],
        big.clone(),
    )
    .await;
    assert_eq!(r.status, 413);
    let chunked = raw_chunked_post(proxy.addr, "/v1/files/f/content", &key, big.as_bytes()).await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    assert!(proxy.ledger().is_empty());
}

/// Metered routes take POST only: `GET /v1/chat/completions` would be answered by OpenAI
/// with the account's stored completions — other callers' data, under the operator's key.
/// Passthrough routes take only their configured methods.
#[tokio::test]
async fn metered_routes_take_post_only() {
    let (mock, proxy) = start(ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let auth = bearer(&key);
    mock.clear_recorded();
    for (method, path) in [
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/chat/completions?limit=100&order=desc"),
        ("DELETE", "/v1/chat/completions"),
        ("PUT", "/v1/chat/completions"),
        ("PATCH", "/v1/responses"),
        ("GET", "/v1/responses"),
        ("GET", "/v1/embeddings"),
        ("GET", "/v1/completions"),
    ] {
        let r = send(method, &proxy.url(path), &[("authorization", &auth)], "").await;
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
        assert_eq!(r.header("allow"), Some("POST"), "{method} {path}");
        assert_eq!(r.json()["error"]["code"], "method_not_allowed");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    // A stored completion by id is no route at all.
    let r = send(
        "GET",
        &proxy.url("/v1/chat/completions/chatcmpl-abc"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    // Anthropic's shape for an Anthropic client.
    let r = send(
        "GET",
        &proxy.url("/v1/messages"),
        &[("x-api-key", &key), ("anthropic-version", "2023-06-01")],
        "",
    )
    .await;
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    // Passthroughs: only what is configured.
    let r = send(
        "POST",
        &proxy.url("/v1/models"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.header("allow"), Some("GET"));
    let r = send(
        "GET",
        &proxy.url("/v1/messages/count_tokens"),
        &[("x-api-key", &key), ("anthropic-version", "2023-06-01")],
        "",
    )
    .await;
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.header("allow"), Some("POST"));
    assert!(mock.recorded().is_empty(), "{:?}", mock.recorded());
    assert!(proxy.ledger().is_empty());
    // POST still works.
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// No request target reaches a route, or the upstream, unless it is in the one
/// canonical form: dot segments, encoded separators, double encodings, empty segments,
/// path parameters and absolute-form targets are refused (400), so a passthrough path
/// can never be walked onto a metered route or another endpoint.
#[tokio::test]
async fn only_canonical_paths_are_routed_or_forwarded() {
    let (mock, proxy) = start(ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    mock.clear_recorded();
    let body = serde_json::to_string(&chat_body("gpt-4o-mini", false, "hi")).unwrap();
    for target in [
        "/v1/models/../chat/completions",
        "/v1/models/%2e%2e/chat/completions",
        "/v1/models/.%2E/chat/completions",
        "/v1/models%2F..%2Fchat/completions",
        "/v1/models%2f..%2fchat%2fcompletions",
        "/v1/models/..%2Fchat%2Fcompletions",
        "/v1/models/%252e%252e%252fchat%252fcompletions",
        "/v1/models/..%5Cchat%5Ccompletions",
        "/v1/models/..;/chat/completions",
        "/v1/models;/../chat/completions",
        "/v1/models/gpt-4o;v=1",
        "/v1/models/x%3F/../../chat/completions",
        "//v1/chat/completions",
        "/v1//chat/completions",
        "/v1/chat/completions/",
        "/v1/./chat/completions",
        "/v1/chat/./completions",
        "/v1/%63hat/completions",
        "/v1/models/%00",
        "http://api.openai.com/v1/models/../chat/completions",
        "http://127.0.0.1/v1/models%2F..%2Fchat%2Fcompletions",
    ] {
        for method in ["GET", "POST"] {
            let req = format!(
                "{method} {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let r = raw_http(proxy.addr, req.as_bytes()).await;
            assert!(
                r.status == 400 || r.status == 404,
                "{method} {target}: {} {}",
                r.status,
                r.text()
            );
        }
    }
    assert!(mock.recorded().is_empty(), "{:?}", mock.recorded());
    assert!(proxy.ledger().is_empty());
    // The canonical forms of the same routes still work.
    let r = send(
        "GET",
        &proxy.url("/v1/models/ft%3Agpt-4o-mini"),
        &[("authorization", &bearer(&key))],
        "",
    )
    .await;
    assert_ne!(r.status, 400, "{}", r.text());
    assert_eq!(mock.recorded().len(), 1);
    assert_eq!(mock.recorded()[0].path, "/v1/models/ft%3Agpt-4o-mini");
}

/// A passthrough answers a key exactly as a metered route would: revoked → 401, a limit
/// of 0 (blocked) → 403, a limit with nothing left → 429 — and forwards nothing then.
#[tokio::test]
async fn passthrough_honours_the_keys_state() {
    let (mock, proxy) = start(ProxyOptions::default()).await;
    let (revoked_id, revoked) = proxy.create_live_key(&[]).await;
    let (_, blocked) = proxy.create_live_key(&["--limit", "requests:day=0"]).await;
    let (_, blocked_user) = proxy.create_live_key(&["--user", "bob"]).await;
    let (_, spent) = proxy.create_live_key(&["--limit", "requests:day=1"]).await;
    assert_eq!(proxy.cli(&["keys", "revoke", &revoked_id]).0, 0);
    assert_eq!(
        proxy
            .cli(&[
                "limits",
                "set",
                "--user",
                "bob",
                "--limit",
                "requests:day=0"
            ])
            .0,
        0
    );
    let chat = |k: String| {
        let url = proxy.url("/v1/chat/completions");
        async move { post_json(&url, &k, &chat_body("gpt-4o-mini", false, "hi"), &[]).await }
    };
    assert_eq!(chat(spent.clone()).await.status, 200);
    proxy.wait_settled().await;
    // Give the revoke and the user limit their (≤ 1 s) time to reach the proxy.
    let t0 = std::time::Instant::now();
    while chat(revoked.clone()).await.status != 401
        || chat(blocked_user.clone()).await.status != 403
    {
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    mock.clear_recorded();
    for (key, status, code) in [
        (&revoked, 401, "invalid_api_key"),
        (&blocked, 403, "quota_disabled"),
        (&blocked_user, 403, "quota_disabled"),
        (&spent, 429, "quota_exceeded"),
    ] {
        let metered = chat(key.clone()).await;
        assert_eq!(metered.status, status, "metered: {}", metered.text());
        let r = send(
            "GET",
            &proxy.url("/v1/models"),
            &[("authorization", &bearer(key))],
            "",
        )
        .await;
        assert_eq!(r.status, status, "GET /v1/models: {}", r.text());
        assert_eq!(r.json()["error"]["code"], code);
        let r = send(
            "POST",
            &proxy.url("/v1/messages/count_tokens"),
            &[
                ("x-api-key", key),
                ("anthropic-version", "2023-06-01"),
                ("content-type", "application/json"),
            ],
            r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
        assert_eq!(r.status, status, "count_tokens: {}", r.text());
        assert_eq!(r.json()["type"], "error");
        if status == 429 && key == &spent {
            assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
        }
    }
    assert!(mock.recorded().is_empty(), "{:?}", mock.recorded());
}

/// POST `body` with chunked transfer encoding over a raw socket; the response text.
async fn raw_chunked_post(addr: SocketAddr, path: &str, key: &str, body: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(256) {
        let _ = s
            .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await;
        let _ = s.write_all(piece).await;
        let _ = s.write_all(b"\r\n").await;
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------
// The trace id on every answer

#[tokio::test]
async fn every_answer_names_the_idempotent_trace() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let (id, key) = proxy.create_live_key(&["--limit", "requests:day=1"]).await;
    let (off_id, off_key) = proxy.create_live_key(&["--limit", "requests:day=0"]).await;
    let url = proxy.url("/v1/chat/completions");
    let body = chat_body("gpt-4o-mini", false, "hi");
    let with = |k: &'static str| [("idempotency-key", k)];

    let ok = post_json(&url, &key, &body, &with("order-1")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let trace = format!("{id}:order-1");
    assert_eq!(ok.header("x-tollgate-trace-id"), Some(trace.as_str()));
    proxy.wait_settled().await;
    assert_eq!(proxy.ledger()[0]["trace_id"], trace.as_str());

    let dup = post_json(&url, &key, &body, &with("order-1")).await;
    assert_eq!(dup.status, 409, "{}", dup.text());
    assert_eq!(dup.header("x-tollgate-trace-id"), Some(trace.as_str()));
    // The SDKs retry a 409 by default; a duplicate stays a duplicate.
    assert_eq!(dup.header("x-should-retry"), Some("false"));

    let over = post_json(&url, &key, &body, &with("order-2")).await;
    assert_eq!(over.status, 429, "{}", over.text());
    // A day's budget does not clear within a minute: SDKs are told not to retry (they
    // would honour a Retry-After of hours).
    assert!(over.header("retry-after").unwrap().parse::<u64>().unwrap() > 60);
    assert_eq!(over.header("x-should-retry"), Some("false"));
    assert_eq!(
        over.header("x-tollgate-trace-id"),
        Some(format!("{id}:order-2").as_str())
    );

    let off = post_json(&url, &off_key, &body, &with("order-3")).await;
    assert_eq!(off.status, 403, "{}", off.text());
    assert_eq!(
        off.header("x-tollgate-trace-id"),
        Some(format!("{off_id}:order-3").as_str())
    );

    let bad = post_json(&url, &key, &json!({"model": 1}), &with("order-4")).await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.header("x-tollgate-trace-id"),
        Some(format!("{id}:order-4").as_str())
    );

    let r = send(
        "GET",
        &proxy.url("/v1/models"),
        &[
            ("authorization", &bearer(&key)),
            ("idempotency-key", "list-1"),
        ],
        "",
    )
    .await;
    assert_eq!(
        r.header("x-tollgate-trace-id"),
        Some(format!("{id}:list-1").as_str())
    );

    // A key tollgate refuses (too long) keeps a generated id and is a 400.
    let long = "k".repeat(256);
    let r = post_json(&url, &key, &body, &[("idempotency-key", long.as_str())]).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let t = r.header("x-tollgate-trace-id").unwrap();
    assert!(
        !t.contains(&long) && uuid::Uuid::parse_str(t).is_ok(),
        "{t}"
    );
    // Over-long or not UTF-8: 400 on every route, passthroughs too, with the reason.
    for path in ["/v1/chat/completions", "/v1/models"] {
        let method = if path == "/v1/models" { "GET" } else { "POST" };
        let r = send(
            method,
            &proxy.url(path),
            &[
                ("authorization", &bearer(&key)),
                ("content-type", "application/json"),
                ("idempotency-key", long.as_str()),
            ],
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains("at most 255"), "{}", r.text());
        let mut raw = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-length: 0\r\nconnection: close\r\nidempotency-key: caf"
        )
        .into_bytes();
        raw.extend_from_slice(b"\xe9\r\n\r\n");
        let r = raw_http(proxy.addr, &raw).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains("not UTF-8"), "{}", r.text());
    }
    // Unauthenticated: the key id is unknown, so the id is generated.
    let r = post_json(&url, "tg_nope", &body, &with("order-5")).await;
    assert_eq!(r.status, 401);
    assert!(uuid::Uuid::parse_str(r.header("x-tollgate-trace-id").unwrap()).is_ok());
    assert_eq!(proxy.ledger().len(), 1);
}

// ---------------------------------------------------------------------------------------
// Keep-alive: two requests on one connection, for every kind of answer

/// Send `reqs` one after the other on a single HTTP/1.1 connection; panics when the
/// connection cannot carry the next request.
async fn on_one_connection(
    addr: SocketAddr,
    label: &str,
    reqs: Vec<hyper::Request<Full<Bytes>>>,
) -> Vec<Reply> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::new();
    let n = reqs.len();
    for (i, req) in reqs.into_iter().enumerate() {
        let what = format!("{label}: {} {}", req.method(), req.uri());
        sender
            .ready()
            .await
            .unwrap_or_else(|e| panic!("request {i}/{n} ({what}): connection closed: {e}"));
        let resp = sender
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("request {i}/{n} ({what}) failed: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        out.push(Reply {
            status,
            headers,
            body,
        });
    }
    out
}

/// Two copies of one request through one connection; both answered with `status`, framed
/// by length or chunks, never `Connection: close`.
async fn twice_on_one_connection(
    addr: SocketAddr,
    what: &str,
    make: impl Fn() -> hyper::Request<Full<Bytes>>,
    status: u16,
) -> Vec<Reply> {
    let replies = on_one_connection(addr, what, vec![make(), make()]).await;
    for r in &replies {
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert_ne!(r.header("connection"), Some("close"), "{what}");
        assert!(
            r.header("content-length").is_some()
                || r.header("transfer-encoding") == Some("chunked"),
            "{what}: framed by length or chunks: {:?}",
            r.headers
        );
    }
    replies
}

fn post(url: &str, headers: &[(&str, &str)], body: &Value) -> hyper::Request<Full<Bytes>> {
    let mut h: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    request("POST", url, &h, serde_json::to_vec(body).unwrap())
}

#[tokio::test]
async fn every_answer_but_a_401_keeps_the_connection() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let (_, off_key) = proxy.create_live_key(&["--limit", "requests:day=0"]).await;
    let (_, one_key) = proxy.create_live_key(&["--limit", "tokens:day=300"]).await;
    let auth = bearer(&key);
    let oa = [("authorization", auth.as_str())];
    let an = [
        ("x-api-key", key.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];
    let addr = proxy.addr;
    let u = |p: &str| proxy.url(p);

    let chat = chat_body("gpt-4o-mini", false, "hi");
    twice_on_one_connection(
        addr,
        "chat",
        || post(&u("/v1/chat/completions"), &oa, &chat),
        200,
    )
    .await;
    let hidden = chat_body("gpt-4o-mini", true, "hi");
    let r = twice_on_one_connection(
        addr,
        "stream, usage hidden",
        || post(&u("/v1/chat/completions"), &oa, &hidden),
        200,
    )
    .await;
    assert!(r[1].text().ends_with("data: [DONE]\n\n"));
    assert!(
        !r[1].text().contains("\"choices\":[],"),
        "usage chunk hidden"
    );
    let mut with_usage = hidden.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let r = twice_on_one_connection(
        addr,
        "stream with include_usage",
        || post(&u("/v1/chat/completions"), &oa, &with_usage),
        200,
    )
    .await;
    assert!(r[1].text().contains("\"choices\":[],"));
    let responses =
        json!({"model": "gpt-4o-mini", "input": "hi", "stream": true, "max_output_tokens": 50});
    twice_on_one_connection(
        addr,
        "responses stream",
        || post(&u("/v1/responses"), &oa, &responses),
        200,
    )
    .await;
    let msg = json!({"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
    twice_on_one_connection(
        addr,
        "anthropic",
        || post(&u("/v1/messages"), &an, &msg),
        200,
    )
    .await;
    let mut msg_stream = msg.clone();
    msg_stream["stream"] = json!(true);
    twice_on_one_connection(
        addr,
        "anthropic stream",
        || post(&u("/v1/messages"), &an, &msg_stream),
        200,
    )
    .await;
    let emb = json!({"model": "text-embedding-3-small", "input": "hello"});
    twice_on_one_connection(
        addr,
        "embeddings",
        || post(&u("/v1/embeddings"), &oa, &emb),
        200,
    )
    .await;
    twice_on_one_connection(
        addr,
        "models",
        || request("GET", &u("/v1/models"), &oa, ""),
        200,
    )
    .await;
    let count =
        json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]});
    twice_on_one_connection(
        addr,
        "count_tokens",
        || post(&u("/v1/messages/count_tokens"), &an, &count),
        200,
    )
    .await;
    twice_on_one_connection(
        addr,
        "usage",
        || request("GET", &u("/v1/tollgate/usage"), &oa, ""),
        200,
    )
    .await;

    // Refusals decided once the body was read, or for a request without one.
    let bad = json!({"model": 5});
    twice_on_one_connection(
        addr,
        "400",
        || post(&u("/v1/chat/completions"), &oa, &bad),
        400,
    )
    .await;
    let dup = [
        ("authorization", auth.as_str()),
        ("idempotency-key", "same"),
    ];
    let r = on_one_connection(
        addr,
        "409",
        vec![
            post(&u("/v1/chat/completions"), &dup, &chat),
            post(&u("/v1/chat/completions"), &dup, &chat),
            post(&u("/v1/chat/completions"), &dup, &chat),
        ],
    )
    .await;
    assert_eq!([r[0].status, r[1].status, r[2].status], [200, 409, 409]);
    let off = format!("Bearer {off_key}");
    twice_on_one_connection(
        addr,
        "403",
        || {
            post(
                &u("/v1/chat/completions"),
                &[("authorization", off.as_str())],
                &chat,
            )
        },
        403,
    )
    .await;
    let one = format!("Bearer {one_key}");
    let big = json!({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    twice_on_one_connection(
        addr,
        "429",
        || {
            post(
                &u("/v1/chat/completions"),
                &[("authorization", one.as_str())],
                &big,
            )
        },
        429,
    )
    .await;
    // A 401 is the exception: a request without a valid key has its connection closed
    // after the answer, so a stranger cannot keep a slot (tests/request_bodies.rs).
    let r = on_one_connection(
        addr,
        "401 without a body",
        vec![request("GET", &u("/v1/models"), &[], "")],
    )
    .await;
    assert_eq!(r[0].status, 401);
    assert_eq!(r[0].header("connection"), Some("close"));
    twice_on_one_connection(
        addr,
        "404 without a body",
        || request("GET", &u("/v1/nothing"), &oa, ""),
        404,
    )
    .await;
}

#[tokio::test]
async fn a_stream_with_content_length_is_reframed_when_its_body_changes() {
    // An upstream (or a cache in front of it) that sends a whole SSE stream with a
    // Content-Length: tollgate removes the usage chunk, so the length no longer holds.
    const SSE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n\
data: [DONE]\n\n";
    let response = http_response("text/event-stream", SSE.as_bytes(), false);
    let (up, _seen) = scripted_upstream(response, 1000, std::time::Duration::ZERO).await;
    let proxy = Proxy::start(up, ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let auth = bearer(&key);
    let oa = [("authorization", auth.as_str())];
    let body = chat_body("gpt-4o-mini", true, "hi");
    let r = twice_on_one_connection(
        proxy.addr,
        "stream with content-length, usage hidden",
        || post(&proxy.url("/v1/chat/completions"), &oa, &body),
        200,
    )
    .await;
    let expected: String = SSE
        .split_inclusive("\n\n")
        .filter(|ev| !ev.contains("\"choices\":[],"))
        .collect();
    for reply in &r {
        assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
        assert_eq!(reply.header("content-length"), None);
        assert_eq!(reply.text(), expected);
    }
    // The client that asked for usage gets the upstream's bytes, still on one connection.
    let mut asked = body.clone();
    asked["stream_options"] = json!({"include_usage": true});
    let r = twice_on_one_connection(
        proxy.addr,
        "stream with content-length, usage asked",
        || post(&proxy.url("/v1/chat/completions"), &oa, &asked),
        200,
    )
    .await;
    assert_eq!(r[0].text(), SSE);
    proxy.wait_settled().await;
    assert!(proxy.ledger().iter().all(|row| row["output_tokens"] == 1));
}

// ---------------------------------------------------------------------------------------
// Keys work the moment they are created

/// A key's own usage report (one authenticated round trip).
async fn usage_status(proxy: &Proxy, key: &str) -> u16 {
    send(
        "GET",
        &proxy.url("/v1/tollgate/usage"),
        &[("authorization", &bearer(key))],
        "",
    )
    .await
    .status
}

/// The value of a counter series on the proxy's `/metrics`.
async fn metric(proxy: &Proxy, series: &str) -> u64 {
    let text = send("GET", &format!("http://{}/metrics", proxy.admin), &[], "")
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn a_key_works_the_moment_the_cli_returns() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    for i in 0..15 {
        let (_, key) = proxy.create_key(&["--limit", "requests:day=10"]);
        assert_eq!(usage_status(&proxy, &key).await, 200, "key {i}");
        let r = post_json(
            &proxy.url("/v1/chat/completions"),
            &key,
            &chat_body("gpt-4o-mini", false, "hi"),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "key {i}: {}", r.text());
    }
}

/// A shared-mode instance on `pg` (Redis unreachable: counters fall back to local).
async fn shared_instance(pg: &common::pg::TestPg, upstream: SocketAddr) -> Proxy {
    let storage = format!(
        "postgres_url = \"{}\"\nredis_url = \"redis://127.0.0.1:1\"",
        pg.url()
    );
    Proxy::start_edited(upstream, ProxyOptions::default(), |c| {
        shared_mode(&c, &storage)
    })
    .await
}

#[tokio::test]
async fn a_key_works_at_once_on_every_instance_sharing_the_store() {
    let pg = common::pg::TestPg::start();
    let mock = mock().await;
    let a = shared_instance(&pg, mock.addr).await;
    let b = shared_instance(&pg, mock.addr).await;
    let mut last = None;
    for i in 0..10 {
        // Created through instance a's config (Postgres), used at once on both.
        let (id, key) = a.create_key(&[]);
        assert_eq!(usage_status(&b, &key).await, 200, "key {i} on b");
        assert_eq!(usage_status(&a, &key).await, 200, "key {i} on a");
        last = Some((id, key));
    }
    // A revoke reaches the other instance through its refresh (SPEC: within 1 s).
    let (id, key) = last.unwrap();
    let (code, _, err) = b.cli(&["keys", "revoke", &id]);
    assert_eq!(code, 0, "{err}");
    let t0 = std::time::Instant::now();
    loop {
        if usage_status(&a, &key).await == 401 {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "revoke never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    eprintln!(
        "revoke effective on the other instance after {:?}",
        t0.elapsed()
    );
    assert!(metric(&b, "tollgate_key_misses_total{answer=\"found\"}").await >= 1);
}

#[tokio::test]
async fn unknown_keys_cost_a_bounded_number_of_store_reads() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let reads = "tollgate_key_miss_reads_total";
    let base = metric(&proxy, reads).await;
    // One unknown key, many times: one read, then the negative cache.
    for _ in 0..200 {
        assert_eq!(usage_status(&proxy, "tg_the_same_unknown_key").await, 401);
    }
    let after_same = metric(&proxy, reads).await;
    assert_eq!(after_same - base, 1);
    // Many distinct unknown keys at once: reads are coalesced and rate-bounded.
    let n: u64 = 400;
    let t0 = std::time::Instant::now();
    let url = proxy.url("/v1/tollgate/usage");
    let fired = fire(n as usize, |i| {
        let url = url.clone();
        async move {
            send(
                "GET",
                &url,
                &[("authorization", &format!("Bearer tg_flood_{i}"))],
                "",
            )
            .await
        }
    })
    .await;
    for s in fired.statuses() {
        assert_eq!(s, 401);
    }
    let elapsed = t0.elapsed();
    let flood = metric(&proxy, reads).await - after_same;
    let bound = elapsed.as_millis() as u64 / tollgate::auth::MISS_READ_EVERY.as_millis() as u64 + 2;
    eprintln!("{n} distinct unknown keys: {flood} store reads in {elapsed:?}");
    assert!(
        flood <= bound,
        "{flood} reads in {elapsed:?} (bound {bound})"
    );
    assert!(flood < n, "{flood} reads for {n} keys");
    // The same keys again cost nothing.
    for i in 0..n {
        let _ = usage_status(&proxy, &format!("tg_flood_{i}")).await;
    }
    assert_eq!(metric(&proxy, reads).await - after_same, flood);
    // …and a key created now still works at once.
    let (_, key) = proxy.create_key(&[]);
    assert_eq!(usage_status(&proxy, &key).await, 200);
}
