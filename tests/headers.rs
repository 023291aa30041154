//! Which headers cross tollgate: callers cannot pick the account of the operator's
//! provider key nor pass credentials on, and the provider's account ids and cookies do
//! not reach callers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hi."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}"#;

/// An upstream that answers every request with `CHAT_JSON` and the account headers the
/// real providers send, and reports each request head it received.
async fn revealing_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 65536];
                loop {
                    let n = s.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        let len = head
                            .to_ascii_lowercase()
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            let _ = tx.send(head);
                            break;
                        }
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nopenai-organization: org-operator-secret\r\nopenai-project: proj_operator_secret\r\nanthropic-organization-id: 0f0e-operator-org\r\nset-cookie: __cf_bm=operator-cookie; path=/; domain=.api.openai.com\r\nanthropic-ratelimit-requests-limit: 4000\r\nanthropic-ratelimit-tokens-remaining: 1999000\r\nx-ratelimit-limit-requests: 10000\r\nx-ratelimit-remaining-tokens: 29999000\r\nopenai-processing-ms: 12\r\nx-request-id: req_123\r\nconnection: close\r\n\r\n{CHAT_JSON}",
                    CHAT_JSON.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, rx)
}

fn has_header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

#[tokio::test]
async fn callers_cannot_choose_the_account_and_never_see_it() {
    let (up, mut seen) = revealing_upstream().await;
    let proxy = Proxy::start(up, ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", false, "hi")).unwrap();
    let auth = format!("Bearer {key}");
    let r = send(
        "POST",
        &proxy.url("/v1/chat/completions"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
            ("OpenAI-Organization", "org-someone-else"),
            ("OpenAI-Project", "proj_someone_else"),
            ("api-key", "azure-style-caller-key"),
            ("proxy-authorization", "Basic Y2FsbGVyOnNlY3JldA=="),
            ("openai-beta", "assistants=v2"),
            ("x-stainless-lang", "python"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let head = seen.recv().await.unwrap();
    for dropped in [
        "openai-organization",
        "openai-project",
        "api-key",
        "proxy-authorization",
    ] {
        assert_eq!(
            has_header(&head, dropped),
            None,
            "{dropped} reached the upstream:\n{head}"
        );
    }
    assert!(
        !head.contains(&key),
        "the caller's key reached the upstream"
    );
    assert_eq!(
        has_header(&head, "authorization"),
        Some(format!("Bearer {OPENAI_UPSTREAM_KEY}"))
    );
    // Headers that select features, not accounts, pass.
    assert_eq!(
        has_header(&head, "openai-beta").as_deref(),
        Some("assistants=v2")
    );
    assert_eq!(
        has_header(&head, "x-stainless-lang").as_deref(),
        Some("python")
    );

    // The provider's account ids and cookies stay with tollgate; the rest passes.
    for hidden in [
        "openai-organization",
        "openai-project",
        "anthropic-organization-id",
        "set-cookie",
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-tokens-remaining",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-tokens",
    ] {
        assert!(r.header(hidden).is_none(), "{hidden} reached the caller");
    }
    assert_eq!(r.header("x-request-id"), Some("req_123"));
    assert_eq!(r.header("openai-processing-ms"), Some("12"));
    assert_eq!(r.body.as_ref(), CHAT_JSON.as_bytes());
    assert!(!format!("{:?}", r.headers).contains("operator"));
}

#[tokio::test]
async fn an_upstream_may_let_callers_pick_the_project() {
    let (up, mut seen) = revealing_upstream().await;
    let proxy = Proxy::start(
        up,
        ProxyOptions {
            upstream_extra: "forward_headers = [\"OpenAI-Project\"]".into(),
            ..Default::default()
        },
    )
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[
            ("OpenAI-Organization", "org-someone-else"),
            ("OpenAI-Project", "proj_allowed"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let head = seen.recv().await.unwrap();
    assert_eq!(
        has_header(&head, "openai-project").as_deref(),
        Some("proj_allowed")
    );
    assert_eq!(has_header(&head, "openai-organization"), None);
    // The account ids of the response are removed all the same.
    assert!(r.header("openai-project").is_none());
}

#[tokio::test]
async fn hostile_idempotency_keys_are_refused_or_kept_exactly() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let (key_id, key) = proxy.create_live_key(&[]).await;
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", false, "hi")).unwrap();
    let post = |idem: &[u8]| {
        let mut r = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nidempotency-key: ",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(idem);
        r.extend_from_slice(b"\r\n\r\n");
        r.extend_from_slice(&body);
        r
    };
    let longest = "k".repeat(255);
    for (idem, status) in [
        (longest.as_bytes(), 200),
        ("k".repeat(256).as_bytes(), 400),
        (b"\xff\xfe not utf-8".as_slice(), 400),
        (b"tab\tinside".as_slice(), 400),
        ("cl\u{e9}-\u{43a}\u{43b}\u{44e}\u{447}".as_bytes(), 400),
        (b"order-17 / retry".as_slice(), 200),
    ] {
        let r = raw_http(proxy.addr, &post(idem)).await;
        assert_eq!(
            r.status,
            status,
            "{:?}: {}",
            String::from_utf8_lossy(idem),
            r.text()
        );
        if status == 200 {
            let expected = format!("{key_id}:{}", String::from_utf8_lossy(idem));
            let trace = r.head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("x-tollgate-trace-id:")
                    .then(|| l.split_once(':').unwrap().1.trim().to_string())
            });
            // The header carries the key's UTF-8 bytes as they came.
            assert_eq!(
                trace.map(|t| t.into_bytes()),
                Some(expected.into_bytes()),
                "{}",
                r.head
            );
        } else {
            assert!(r.text().contains("Idempotency-Key"), "{}", r.text());
        }
    }
    proxy.wait_settled().await;
    assert_eq!(proxy.ledger().len(), 2, "refused keys leave no row");
}
