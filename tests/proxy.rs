//! The proxy end to end: the real binary against the mock upstream (and a scripted raw
//! upstream for byte-exact checks).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const CHAT_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, friend."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;

const CHAT_SSE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n\
data: [DONE]\n\n";

#[tokio::test]
async fn non_stream_body_is_byte_identical_and_keys_are_swapped() {
    let (up, mut seen) = scripted_upstream(
        http_response("application/json", CHAT_JSON.as_bytes(), false),
        1000,
        Duration::ZERO,
    )
    .await;
    let proxy = Proxy::start(up, ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body.as_ref(), CHAT_JSON.as_bytes());
    assert!(r.header("x-tollgate-trace-id").is_some());
    let req = String::from_utf8(seen.recv().await.unwrap()).unwrap();
    let lower = req.to_ascii_lowercase();
    assert!(
        lower.contains(&format!(
            "authorization: bearer {}",
            OPENAI_UPSTREAM_KEY.to_ascii_lowercase()
        )),
        "{req}"
    );
    assert!(
        !req.contains(&key),
        "the tollgate key must never reach the upstream"
    );
    assert!(
        !lower.contains("accept-encoding"),
        "the meter needs identity encoding"
    );
}

#[tokio::test]
async fn stream_body_is_byte_identical_when_client_asked_for_usage() {
    let (up, _seen) = scripted_upstream(
        http_response("text/event-stream", CHAT_SSE.as_bytes(), true),
        23,
        Duration::from_millis(1),
    )
    .await;
    let proxy = Proxy::start(up, ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let mut body = chat_body("gpt-4o-mini", true, "hi");
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let r = post_json(&proxy.url("/v1/chat/completions"), &key, &body, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), CHAT_SSE);
}

#[tokio::test]
async fn stream_hides_the_injected_usage_chunk() {
    let (up, mut seen) = scripted_upstream(
        http_response("text/event-stream", CHAT_SSE.as_bytes(), true),
        17,
        Duration::ZERO,
    )
    .await;
    let proxy = Proxy::start(up, ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", true, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let expected: String = CHAT_SSE
        .split_inclusive("\n\n")
        .filter(|ev| !ev.contains("\"choices\":[],\"usage\""))
        .collect();
    assert_eq!(r.text(), expected);
    let req = String::from_utf8(seen.recv().await.unwrap()).unwrap();
    assert!(
        req.contains("\"include_usage\":true"),
        "usage reporting is requested upstream: {req}"
    );
    // Billed from the upstream's usage chunk the client never saw.
    eventually("settled row", || {
        proxy.ledger().iter().any(|r| r["status"] == "settled")
    })
    .await;
    let row = &proxy.ledger()[0];
    assert_eq!(row["input_tokens"], 9);
    assert_eq!(row["output_tokens"], 2);
    assert_eq!(row["usage_source"], "upstream");
}

#[tokio::test]
async fn auth_failures_are_401_in_the_provider_shape() {
    let (mock, proxy) = start(ProxyOptions::default()).await;
    let body = chat_body("gpt-4o-mini", false, "hi");
    // Missing key.
    let r = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[("content-type", "application/json")],
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert!(r.header("x-tollgate-trace-id").is_some());
    // Unknown key.
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        "tg_not_a_real_key_000000000000000000000",
        &body,
        &[],
    )
    .await;
    assert_eq!(r.status, 401);
    // Anthropic shape on the Anthropic route, via x-api-key.
    let r = send(
        "POST",
        &proxy.url("/v1/messages"),
        &[
            ("x-api-key", "tg_wrong"),
            ("anthropic-version", "2023-06-01"),
        ],
        r#"{"model":"claude-3-5-haiku-latest","max_tokens":10,"messages":[]}"#,
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    // Two different keys in the two headers.
    let (_, key) = proxy.create_live_key(&[]).await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &body,
        &[("x-api-key", "tg_other")],
    )
    .await;
    assert_eq!(r.status, 401);
    // A valid key works, then a revoke takes effect within a second.
    let (id, key2) = proxy.create_live_key(&[]).await;
    let r = post_json(&proxy.url("/v1/chat/completions"), &key2, &body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, _, err) = proxy.cli(&["keys", "revoke", &id]);
    assert_eq!(code, 0, "{err}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = post_json(&proxy.url("/v1/chat/completions"), &key2, &body, &[]).await;
    assert_eq!(r.status, 401, "revoked key still accepted after 1 s");
    // No upstream request was made for any refused request.
    let auths: Vec<_> = mock.recorded().iter().map(|r| r.path.clone()).collect();
    assert_eq!(auths.len(), 1, "{auths:?}");
}

#[tokio::test]
async fn upstream_sees_its_own_keys_and_provider_headers() {
    let (mock, proxy) = start(ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let r = send(
        "POST",
        &proxy.url("/v1/messages"),
        &[("x-api-key", key.as_str()), ("anthropic-version", "2023-06-01"), ("anthropic-beta", "tools-2024"), ("content-type", "application/json")],
        r#"{"model":"claude-3-5-haiku-20241022","max_tokens":50,"messages":[{"role":"user","content":"hello"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = mock.recorded();
    let last = rec.last().unwrap();
    let h = |n: &str| {
        last.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(h("x-api-key").as_deref(), Some(ANTHROPIC_UPSTREAM_KEY));
    assert_eq!(h("anthropic-version").as_deref(), Some("2023-06-01"));
    assert_eq!(h("anthropic-beta").as_deref(), Some("tools-2024"));
    assert!(h("authorization").is_none());
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let (mock, proxy) = start(ProxyOptions {
        max_request_body: "2KiB".into(),
        ..Default::default()
    })
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, &"x".repeat(4000)),
        &[],
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    assert!(mock.recorded().is_empty());
    assert!(
        proxy.ledger().is_empty(),
        "refused requests leave no billing row"
    );
}

#[tokio::test]
async fn upstream_down_is_502_and_stall_is_504() {
    // Nothing listens on this port.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = Proxy::start(dead, ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_unavailable");
    eventually("released row", || {
        proxy.ledger().iter().any(|r| r["status"] == "released")
    })
    .await;

    let (_mock, proxy) = start(ProxyOptions {
        first_byte_timeout: "1s".into(),
        ..Default::default()
    })
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[("x-mock-stall-before-headers", "1")],
    )
    .await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn sse_chunks_are_not_delayed() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let auth = format!("Bearer {key}");
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", true, "hi")).unwrap();
    let (status, chunks) = send_timed(
        &proxy.url("/v1/chat/completions"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
            ("x-mock-words", "6"),
            ("x-mock-delay-ms", "150"),
        ],
        body,
    )
    .await;
    assert_eq!(status, 200);
    // With 150 ms between upstream chunks, a buffering proxy would deliver everything at
    // the end; chunks must instead arrive spread over the stream's life.
    let first_content = chunks
        .iter()
        .find(|(_, b)| b.windows(7).any(|w| w == b"content"))
        .unwrap()
        .0;
    let last = chunks.last().unwrap().0;
    assert!(chunks.len() >= 4, "got {} reads", chunks.len());
    assert!(
        last - first_content >= Duration::from_millis(500),
        "first {first_content:?} last {last:?}"
    );
}

#[test]
fn config_errors_name_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = \"nowhere\"\nthreads = \"two\"\n\n[[upstreams]]\nname = \"x\"\nkind = \"gemini\"\nbase_url = \"https://example.com\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2: server.listen"), "{err}");
    assert!(err.contains("bad.toml:3: server.threads"), "{err}");
    assert!(err.contains("bad.toml:7: upstreams[0].kind"), "{err}");
}

#[test]
fn check_config_prints_resolved_config_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = write_config(
        dir.path(),
        "127.0.0.1:9".parse().unwrap(),
        &ProxyOptions::default(),
    );
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(OPENAI_UPSTREAM_KEY));
    assert!(!text.contains(ADMIN_TOKEN));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["upstreams"][0]["api_key"], "***");
    assert_eq!(v["server"]["instance_id"], "test-instance");
}

#[tokio::test]
async fn unknown_route_is_404() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let r = post_json(
        &proxy.url("/v1/images/generations"),
        &key,
        &serde_json::json!({}),
        &[],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
}

#[tokio::test]
async fn sigterm_lets_open_streams_finish_and_settle() {
    let (_mock, mut proxy) = start(ProxyOptions {
        server_extra: String::new(),
        ..Default::default()
    })
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let url = proxy.url("/v1/chat/completions");
    let stream = tokio::spawn(async move {
        post_json(
            &url,
            &key,
            &chat_body("gpt-4o-mini", true, "hi"),
            &[("x-mock-words", "20"), ("x-mock-delay-ms", "25")],
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let pid = proxy.child.as_ref().unwrap().id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let r = stream.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("data: [DONE]"),
        "the stream ran to its end"
    );
    // The process exits by itself within its grace period.
    let mut child = proxy.child.take().unwrap();
    let t0 = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = proxy.ledger();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], "settled", "{rows:?}");
}

#[tokio::test]
async fn a_key_whose_plan_is_no_longer_defined_is_refused_not_unlimited() {
    let (mock, mut proxy) = start(ProxyOptions {
        extra: "[plans.free]\nlimits = [\"requests:total=1\"]\n".into(),
        ..Default::default()
    })
    .await;
    let (id, key) = proxy.create_live_key(&["--plan", "free"]).await;
    let chat = chat_body("gpt-4o-mini", false, "hi");
    let url = proxy.url("/v1/chat/completions");
    assert_eq!(post_json(&url, &key, &chat, &[]).await.status, 200);
    assert_eq!(post_json(&url, &key, &chat, &[]).await.status, 429);

    // The plan is renamed in the config (an edit, a typo): the key's plan is gone.
    proxy.kill9();
    let cfg = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        cfg.replace("[plans.free]", "[plans.free-v2]"),
    )
    .unwrap();
    let (code, _, err) = proxy.cli(&["check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&id) && err.contains("`free`"),
        "check-config does not name the key on an undefined plan: {err}"
    );
    proxy.spawn().await;
    for _ in 0..3 {
        let r = post_json(&url, &key, &chat, &[]).await;
        assert_eq!(
            r.status,
            403,
            "a key on an undefined plan went unlimited: {}",
            r.text()
        );
        assert_eq!(r.json()["error"]["code"], "quota_disabled");
        assert!(r.text().contains("\\\"free\\\""), "{}", r.text());
    }
    // Passthrough routes refuse it too.
    let r = send(
        "GET",
        &proxy.url("/v1/models"),
        &[("authorization", &format!("Bearer {key}"))],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        mock.recorded().len() == 1,
        "only the first request reached the upstream"
    );
    let metrics = send("GET", &format!("http://{}/metrics", proxy.admin), &[], "").await;
    assert!(
        metrics
            .text()
            .contains("\ntollgate_undefined_plan_refusals_total 4\n"),
        "{}",
        metrics.text()
    );
    eventually("the undefined plan logged at error level", || {
        proxy
            .logs()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(&id) && l.contains("free"))
    })
    .await;
}

#[test]
fn check_config_refuses_plain_http_to_a_remote_upstream_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.toml");
    let config = |extra: &str| {
        format!(
            "[server]\nadmin_token = \"{ADMIN_TOKEN}-0123456789\"\n\n[[upstreams]]\nname = \"lan\"\nkind = \"openai\"\nbase_url = \"http://llm.internal.example:8000/v1\"\napi_key = \"{OPENAI_UPSTREAM_KEY}\"\n{extra}\n\n[[upstreams]]\nname = \"local\"\nkind = \"anthropic\"\nbase_url = \"http://127.0.0.1:8001\"\n"
        )
    };
    let check = |text: String| {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("TOLLGATE_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The provider key would cross the network in clear: refused, naming the key path
    // and the opt-in; the loopback upstream is fine.
    let (code, out, err) = check(config(""));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("http.toml:7: upstreams[0].base_url"), "{err}");
    assert!(err.contains("allow_insecure_http"), "{err}");
    assert!(!err.contains("upstreams[1]"), "{err}");
    assert!(!format!("{out}{err}").contains(OPENAI_UPSTREAM_KEY));
    // An operator who trusts the network says so.
    let (code, out, err) = check(config("allow_insecure_http = true"));
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["upstreams"][0]["allow_insecure_http"], true);
    assert_eq!(v["upstreams"][1]["allow_insecure_http"], false);
}
