//! Pricing fidelity end to end (SPEC §4 "The bill must match the provider's invoice"): the real
//! binary in front of the mock upstream, each usage field the providers report sent in their
//! own shapes, stream and non-stream, and the ledger's `cost_micros` checked against a
//! hand-computed formula over the usage the client saw.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{Value, json};

async fn setup(extra_toml: &str) -> (mock_upstream::MockHandle, Proxy, String) {
    let (mock, proxy) = start(ProxyOptions::with_extra(extra_toml)).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    (mock, proxy, key)
}

/// A rate written as decimal USD per 1M tokens (or per call), in nano-USD: parsed here, not
/// by tollgate, so the expected bill does not share its arithmetic.
fn nano(rate: &str) -> u128 {
    let (whole, frac) = rate.split_once('.').unwrap_or((rate, ""));
    let frac = format!("{frac:0<9}");
    whole.parse::<u128>().unwrap() * 1_000_000_000 + frac.parse::<u128>().unwrap()
}

/// `ceil(Σ tokens × rate × num / den)` in µUSD plus `calls` web searches at $0.01.
fn bill(terms: &[(i64, &str)], (num, den): (u128, u128), calls: i64) -> i64 {
    let tokens: u128 = terms
        .iter()
        .map(|(n, rate)| u128::try_from(*n).unwrap() * nano(rate))
        .sum();
    // A token at r nano-USD per 1M costs r / 10⁹ µUSD; a call at 0.01 USD is 10 000 µUSD.
    let numerator = tokens * num + u128::try_from(calls).unwrap() * 10_000 * 1_000_000_000 * den;
    i64::try_from(numerator.div_ceil(1_000_000_000 * den)).unwrap()
}

const ONE: (u128, u128) = (1, 1);

/// A chat request; a stream asks for its usage chunk so the client sees what was billed.
fn chat(model: &str, stream: bool, text: &str) -> Value {
    let mut body = chat_body(model, stream, text);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// A prompt long enough to hold every cache count the tests ask for.
fn long_prompt() -> String {
    "budget ".repeat(400)
}

/// The settled ledger row of a response.
async fn row_of(proxy: &Proxy, reply: &Reply) -> Value {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let trace = reply.header("x-tollgate-trace-id").unwrap().to_owned();
    let mut found = None;
    eventually("settled row", || {
        found = proxy
            .ledger()
            .into_iter()
            .find(|r| r["trace_id"] == trace.as_str() && r["status"] == "settled");
        found.is_some()
    })
    .await;
    found.unwrap()
}

fn sse_data(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The `usage` object the client saw (the final one of a stream).
fn seen_usage(path: &str, stream: bool, reply: &Reply) -> Value {
    if !stream {
        return reply.json()["usage"].clone();
    }
    let events = sse_data(&reply.text());
    match path {
        "/v1/chat/completions" => events
            .iter()
            .rev()
            .find_map(|e| e.get("usage").filter(|u| u.is_object()).cloned())
            .unwrap(),
        "/v1/responses" => events.last().unwrap()["response"]["usage"].clone(),
        _ => {
            // Anthropic: message_start's usage, counts updated by the last message_delta.
            let mut u = events[0]["message"]["usage"].clone();
            let delta = events.iter().rev().find(|e| e["type"] == "message_delta");
            for (k, v) in delta.unwrap()["usage"].as_object().unwrap() {
                u[k] = v.clone();
            }
            u
        }
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

#[tokio::test]
async fn anthropic_cache_lifetimes_settle_at_their_own_rates() {
    let (_mock, proxy, key) = setup("").await;
    // claude-opus-4-8: input 5, cache read 0.50, 5-minute write 6.25, 1-hour write 10, output 25.
    for stream in [false, true] {
        let body = json!({"model": "claude-opus-4-8", "max_tokens": 300, "stream": stream,
                          "messages": [{"role": "user", "content": "Tell me a story"}]});
        let headers = [
            ("x-mock-cached-tokens", "1000"),
            ("x-mock-cache-write-tokens", "300"),
            ("x-mock-cache-write-1h-tokens", "700"),
        ];
        let r = post_json(&proxy.url("/v1/messages"), &key, &body, &headers).await;
        let u = seen_usage("/v1/messages", stream, &r);
        assert_eq!(int(&u["cache_creation"]["ephemeral_1h_input_tokens"]), 700);
        let (uncached, out) = (int(&u["input_tokens"]), int(&u["output_tokens"]));
        let row = row_of(&proxy, &r).await;
        let expect = bill(
            &[
                (uncached, "5"),
                (1000, "0.50"),
                (300, "6.25"),
                (700, "10"),
                (out, "25"),
            ],
            ONE,
            0,
        );
        assert_eq!(row["cost_micros"], expect, "stream={stream}");
        assert_eq!(row["input_tokens"], uncached + 2000);
        assert_eq!(row["cache_write_tokens"], 1000);
        // The 5-minute rate for every write would have been 7 × 6.25 × 100 µUSD less.
        let at_5m = bill(
            &[(uncached, "5"), (1000, "0.50"), (1000, "6.25"), (out, "25")],
            ONE,
            0,
        );
        assert_eq!(expect - at_5m, 2625, "stream={stream}");
    }
}

#[tokio::test]
async fn openai_cache_writes_settle_at_the_write_rate() {
    let (_mock, proxy, key) = setup("").await;
    let headers = [
        ("x-mock-cached-tokens", "100"),
        ("x-mock-cache-write-tokens", "50"),
        ("x-mock-cache-write-1h-tokens", "20"),
    ];
    // gpt-6.1-sol: input 2, cached 0.10, 30-minute write 2.50, 12-hour write 5, output 10.
    // gpt-4.1 (before GPT-5.6): writes cost plain input, 2; cached 0.50; output 8.
    let cases = [
        ("gpt-6.1-sol", ["2", "0.10", "2.50", "5", "10"]),
        ("gpt-4.1", ["2", "0.50", "2", "2", "8"]),
    ];
    for (model, [input, cached, write, write_long, output]) in cases {
        for path in ["/v1/chat/completions", "/v1/responses"] {
            for stream in [false, true] {
                let body = if path == "/v1/responses" {
                    json!({"model": model, "input": long_prompt(), "max_output_tokens": 200, "stream": stream})
                } else {
                    chat(model, stream, &long_prompt())
                };
                let r = post_json(&proxy.url(path), &key, &body, &headers).await;
                let u = seen_usage(path, stream, &r);
                let (prompt, out) = if path == "/v1/responses" {
                    (int(&u["input_tokens"]), int(&u["output_tokens"]))
                } else {
                    (int(&u["prompt_tokens"]), int(&u["completion_tokens"]))
                };
                let details = if path == "/v1/responses" {
                    &u["input_tokens_details"]
                } else {
                    &u["prompt_tokens_details"]
                };
                assert_eq!(int(&details["cache_write_tokens"]), 70, "{model} {path}");
                let row = row_of(&proxy, &r).await;
                let expect = bill(
                    &[
                        (prompt - 170, input),
                        (100, cached),
                        (50, write),
                        (20, write_long),
                        (out, output),
                    ],
                    ONE,
                    0,
                );
                assert_eq!(row["cost_micros"], expect, "{model} {path} stream={stream}");
                assert_eq!(row["cache_write_tokens"], 70);
            }
        }
    }
}

#[tokio::test]
async fn web_searches_are_billed_per_call() {
    let (_mock, proxy, key) = setup("").await;
    for stream in [false, true] {
        // Anthropic: usage.server_tool_use.web_search_requests (final in message_delta).
        // claude-sonnet-4-6: 3 / 15.
        let body = json!({"model": "claude-sonnet-4-6", "max_tokens": 200, "stream": stream,
                          "messages": [{"role": "user", "content": "Search for it"}]});
        let r = post_json(
            &proxy.url("/v1/messages"),
            &key,
            &body,
            &[("x-mock-web-searches", "3")],
        )
        .await;
        let u = seen_usage("/v1/messages", stream, &r);
        assert_eq!(int(&u["server_tool_use"]["web_search_requests"]), 3);
        let row = row_of(&proxy, &r).await;
        let tokens = [
            (int(&u["input_tokens"]), "3"),
            (int(&u["output_tokens"]), "15"),
        ];
        assert_eq!(row["cost_micros"], bill(&tokens, ONE, 3), "stream={stream}");

        // OpenAI Responses: web_search_call output items. gpt-6.1-terra: 1 / 5.
        let body = json!({"model": "gpt-6.1-terra", "input": "Search for it", "stream": stream,
                          "max_output_tokens": 200, "tools": [{"type": "web_search"}]});
        let r = post_json(
            &proxy.url("/v1/responses"),
            &key,
            &body,
            &[("x-mock-web-searches", "2")],
        )
        .await;
        let u = seen_usage("/v1/responses", stream, &r);
        let row = row_of(&proxy, &r).await;
        let tokens = [
            (int(&u["input_tokens"]), "1"),
            (int(&u["output_tokens"]), "5"),
        ];
        assert_eq!(row["cost_micros"], bill(&tokens, ONE, 2), "stream={stream}");
    }
}

#[tokio::test]
async fn openai_service_tiers_bill_the_served_tier_and_hold_the_asked_one() {
    let (_mock, proxy, key) = setup("").await;
    // gpt-6.1-sol: input 2, output 10; priority ×2, flex ×0.5; no multiplier for `scale`.
    let send = |tier: Option<&'static str>,
                stream: bool,
                path: &'static str,
                extra: Vec<(&'static str, &'static str)>| {
        let mut body = if path == "/v1/responses" {
            json!({"model": "gpt-6.1-sol", "input": "Tell me a story", "max_output_tokens": 200, "stream": stream})
        } else {
            chat("gpt-6.1-sol", stream, "Tell me a story")
        };
        if let Some(t) = tier {
            body["service_tier"] = json!(t);
        }
        let url = proxy.url(path);
        let key = key.clone();
        async move { post_json(&url, &key, &body, &extra).await }
    };
    let mut held = std::collections::HashMap::new();
    for path in ["/v1/chat/completions", "/v1/responses"] {
        for stream in [false, true] {
            for (asked, served, mult) in [
                (None, "default", ONE),
                (Some("flex"), "flex", (1, 2)),
                (Some("fast"), "priority", (2, 1)),
                (Some("priority"), "priority", (2, 1)),
            ] {
                let r = send(asked, stream, path, vec![]).await;
                let u = seen_usage(path, stream, &r);
                let (input, out) = if path == "/v1/responses" {
                    (int(&u["input_tokens"]), int(&u["output_tokens"]))
                } else {
                    (int(&u["prompt_tokens"]), int(&u["completion_tokens"]))
                };
                let row = row_of(&proxy, &r).await;
                let expect = bill(&[(input, "2"), (out, "10")], mult, 0);
                assert_eq!(
                    row["cost_micros"], expect,
                    "{path} {asked:?} stream={stream}"
                );
                assert!(r.text().contains(&format!("\"service_tier\":\"{served}\"")));
                held.insert(
                    (path, stream, asked),
                    row["reserved_micros"].as_i64().unwrap(),
                );
            }
            // The hold takes the asked tier's multiplier (same estimate, so within rounding).
            let base = held[&(path, stream, None)];
            let fast = held[&(path, stream, Some("fast"))];
            assert!((fast - 2 * base).abs() <= 1, "{path}: {fast} vs 2 × {base}");
            assert!((2 * held[&(path, stream, Some("flex"))] - base).abs() <= 2);
        }
    }
    // Asked for priority, served (and billed) at default: a downgrade costs the standard rate.
    let r = send(
        Some("priority"),
        false,
        "/v1/chat/completions",
        vec![("x-mock-service-tier", "default")],
    )
    .await;
    let u = r.json()["usage"].clone();
    let row = row_of(&proxy, &r).await;
    let expect = bill(
        &[
            (int(&u["prompt_tokens"]), "2"),
            (int(&u["completion_tokens"]), "10"),
        ],
        ONE,
        0,
    );
    assert_eq!(row["cost_micros"], expect);
    // Asked for, a tier the entry has no multiplier for is refused (tests/billing.rs); served
    // anyway, it bills at standard rates and is counted.
    let r = send(
        None,
        false,
        "/v1/chat/completions",
        vec![("x-mock-service-tier", "scale")],
    )
    .await;
    let u = r.json()["usage"].clone();
    let row = row_of(&proxy, &r).await;
    let expect = bill(
        &[
            (int(&u["prompt_tokens"]), "2"),
            (int(&u["completion_tokens"]), "10"),
        ],
        ONE,
        0,
    );
    assert_eq!(row["cost_micros"], expect);
    let metrics = send_get(&format!("http://{}/metrics", proxy.admin)).await;
    assert!(
        metrics.contains(
            "tollgate_unpriced_modifiers_total{kind=\"service_tier\",model=\"gpt-6.1-sol\",name=\"scale\"} 1"
        ),
        "{metrics}"
    );
}

async fn send_get(url: &str) -> String {
    send("GET", url, &[], "").await.text()
}

#[tokio::test]
async fn anthropic_speed_and_region_multipliers_stack() {
    let (_mock, proxy, key) = setup("").await;
    // claude-opus-5-5: input 4, output 20; fast ×2; US-only inference ×1.1.
    let mut held = Vec::new();
    for stream in [false, true] {
        for (speed, geo, mult) in [
            (None, None, ONE),
            (Some("fast"), None, (2, 1)),
            (None, Some("us"), (11, 10)),
            (Some("fast"), Some("us"), (22, 10)),
        ] {
            let mut body = json!({"model": "claude-opus-5-5", "max_tokens": 300, "stream": stream,
                                  "messages": [{"role": "user", "content": "Tell me a story"}]});
            if let Some(s) = speed {
                body["speed"] = json!(s);
            }
            if let Some(g) = geo {
                body["inference_geo"] = json!(g);
            }
            let r = post_json(&proxy.url("/v1/messages"), &key, &body, &[]).await;
            let u = seen_usage("/v1/messages", stream, &r);
            let row = row_of(&proxy, &r).await;
            let tokens = [
                (int(&u["input_tokens"]), "4"),
                (int(&u["output_tokens"]), "20"),
            ];
            assert_eq!(
                row["cost_micros"],
                bill(&tokens, mult, 0),
                "{speed:?} {geo:?} {stream}"
            );
            held.push((mult, row["reserved_micros"].as_i64().unwrap()));
        }
    }
    // Same estimate each time: the holds scale with the asked multipliers.
    let base = held[0].1;
    for ((num, den), h) in held {
        let want = i64::try_from(u128::try_from(base).unwrap() * num / den).unwrap();
        assert!((h - want).abs() <= 2, "hold {h} vs {want}");
    }
}

#[tokio::test]
async fn long_context_reprices_the_whole_request_and_the_hold() {
    let (_mock, proxy, key) = setup("").await;
    // claude-haiku-5-5: up to 100 000 prompt tokens 0.10 / 0.01 read / 0.50 out; above it
    // every token at 0.50 / 0.05 / 2.50. The prompt counts cache reads and writes.
    for (cached, long) in [("90000", false), ("100000", true)] {
        for stream in [false, true] {
            let body = json!({"model": "claude-haiku-5-5", "max_tokens": 300, "stream": stream,
                              "messages": [{"role": "user", "content": "Tell me a story"}]});
            let r = post_json(
                &proxy.url("/v1/messages"),
                &key,
                &body,
                &[("x-mock-cached-tokens", cached)],
            )
            .await;
            let u = seen_usage("/v1/messages", stream, &r);
            let (uncached, reads, out) = (
                int(&u["input_tokens"]),
                int(&u["cache_read_input_tokens"]),
                int(&u["output_tokens"]),
            );
            assert_eq!(uncached + reads > 100_000, long);
            let rates = if long {
                ["0.50", "0.05", "2.50"]
            } else {
                ["0.10", "0.01", "0.50"]
            };
            let expect = bill(
                &[(uncached, rates[0]), (reads, rates[1]), (out, rates[2])],
                ONE,
                0,
            );
            let row = row_of(&proxy, &r).await;
            assert_eq!(
                row["cost_micros"], expect,
                "cached={cached} stream={stream}"
            );
        }
    }
    // The hold uses the long-context band when the estimate crosses the threshold: every
    // estimated input token at the dearest long input-side rate (1-hour write, 1.00), every
    // allowed output token at 2.50. The estimate is tollgate's own count of the prompt.
    let big = "budget ".repeat(80_000);
    let body = json!({"model": "claude-haiku-5-5", "max_tokens": 300,
                      "messages": [{"role": "user", "content": big}]});
    let (enc, accuracy) = tollgate::tokens::encoding_for_model("claude-haiku-5-5");
    let estimate =
        accuracy.reservation_tokens(tollgate::tokens::anthropic_messages_input(&body, enc));
    assert!(estimate > 100_000, "{estimate}");
    let r = post_json(&proxy.url("/v1/messages"), &key, &body, &[]).await;
    let row = row_of(&proxy, &r).await;
    let hold = bill(
        &[(i64::try_from(estimate).unwrap(), "1.00"), (300, "2.50")],
        ONE,
        0,
    );
    assert_eq!(row["reserved_micros"], hold);
    // Below the threshold, the standard band: 1-hour write 0.20, output 0.50.
    let small = json!({"model": "claude-haiku-5-5", "max_tokens": 300,
                       "messages": [{"role": "user", "content": "Tell me a story"}]});
    let estimate =
        accuracy.reservation_tokens(tollgate::tokens::anthropic_messages_input(&small, enc));
    let r = post_json(&proxy.url("/v1/messages"), &key, &small, &[]).await;
    let row = row_of(&proxy, &r).await;
    let hold = bill(
        &[(i64::try_from(estimate).unwrap(), "0.20"), (300, "0.50")],
        ONE,
        0,
    );
    assert_eq!(row["reserved_micros"], hold);
}

#[tokio::test]
async fn audio_tokens_have_their_own_rates() {
    let (_mock, proxy, key) = setup("").await;
    // gpt-audio-1.5: text 2.50 / 10, audio 32 / 64.
    for stream in [false, true] {
        let body = chat("gpt-audio-1.5", stream, "Say it aloud");
        let headers = [
            ("x-mock-audio-input-tokens", "1200"),
            ("x-mock-audio-output-tokens", "800"),
        ];
        let r = post_json(&proxy.url("/v1/chat/completions"), &key, &body, &headers).await;
        let u = seen_usage("/v1/chat/completions", stream, &r);
        let (prompt, completion) = (int(&u["prompt_tokens"]), int(&u["completion_tokens"]));
        let row = row_of(&proxy, &r).await;
        let expect = bill(
            &[
                (prompt - 1200, "2.50"),
                (1200, "32"),
                (completion - 800, "10"),
                (800, "64"),
            ],
            ONE,
            0,
        );
        assert_eq!(row["cost_micros"], expect, "stream={stream}");
    }
}

#[tokio::test]
async fn stream_and_non_stream_with_equal_usage_settle_the_same() {
    let (_mock, proxy, key) = setup("").await;
    // A fixed seed gives the same answer whatever the body; every billed field is set.
    let headers = [
        ("x-mock-seed", "7"),
        ("x-mock-cached-tokens", "100"),
        ("x-mock-cache-write-tokens", "40"),
        ("x-mock-cache-write-1h-tokens", "30"),
        ("x-mock-reasoning-tokens", "64"),
        ("x-mock-web-searches", "2"),
    ];
    let cases: Vec<(&str, Value)> = vec![
        (
            "/v1/chat/completions",
            chat_body("gpt-6.2-sol", false, &long_prompt()),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-6.2-sol", "input": long_prompt(), "max_output_tokens": 300, "service_tier": "priority"}),
        ),
        (
            "/v1/messages",
            json!({"model": "claude-opus-5-5", "max_tokens": 300, "speed": "fast", "inference_geo": "us",
                   "messages": [{"role": "user", "content": long_prompt()}]}),
        ),
    ];
    for (path, body) in cases {
        let mut rows = Vec::new();
        for stream in [false, true] {
            let mut b = body.clone();
            b["stream"] = json!(stream);
            let r = post_json(&proxy.url(path), &key, &b, &headers).await;
            rows.push(row_of(&proxy, &r).await);
        }
        let fields = [
            "input_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "output_tokens",
            "reasoning_tokens",
            "cost_micros",
        ];
        for f in fields {
            assert_eq!(rows[0][f], rows[1][f], "{path} {f}");
        }
        assert!(rows[0]["cost_micros"].as_i64().unwrap() > 0);
        assert_eq!(rows[0]["usage_source"], "upstream");
    }
}

#[tokio::test]
async fn unknown_model_answer_gives_the_config_lines_to_add() {
    let (_mock, mut proxy, key) = setup("").await;
    let body = chat_body("gpt-7-turbo", false, "hi");
    let r = post_json(&proxy.url("/v1/chat/completions"), &key, &body, &[]).await;
    assert_eq!(r.status, 400);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("`gpt-7-turbo`"), "{message}");
    let block = message.split_once("\n\n").unwrap().1;
    assert!(block.starts_with("[prices.\"gpt-7-turbo\"]"), "{block}");
    assert!(proxy.ledger().is_empty(), "a refused request leaves no row");
    // The block, pasted into the config with real prices, makes the model billable.
    let priced = block
        .replace("input = 0.0", "input = 3")
        .replace("output = 0.0", "output = 12");
    let mut config = std::fs::read_to_string(&proxy.config_path).unwrap();
    config.push_str(&priced);
    std::fs::write(&proxy.config_path, config).unwrap();
    proxy.kill9();
    proxy.spawn().await;
    let r = post_json(&proxy.url("/v1/chat/completions"), &key, &body, &[]).await;
    let u = r.json()["usage"].clone();
    let row = row_of(&proxy, &r).await;
    let expect = bill(
        &[
            (int(&u["prompt_tokens"]), "3"),
            (int(&u["completion_tokens"]), "12"),
        ],
        ONE,
        0,
    );
    assert_eq!(row["cost_micros"], expect);
}

#[tokio::test]
async fn prices_command_lists_the_active_table_with_versions() {
    let (_mock, proxy, _key) = setup(
        "[prices.\"gpt-4o-mini\"]\ninput = 0.2\noutput = 0.8\n\n[prices.\"my-finetune-*\"]\ninput = 1\noutput = 2\ntiers = { priority = \"5/3\" }\n",
    )
    .await;
    let (code, out, err) = proxy.cli(&["prices", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["as_of"], "2026-12-05");
    let entries = v["entries"].as_array().unwrap();
    let find = |m: &str| entries.iter().find(|e| e["model"] == m).unwrap().clone();
    let mini = find("gpt-4o-mini");
    assert_eq!(
        (mini["source"].as_str(), mini["input"].as_str()),
        (Some("config"), Some("0.2"))
    );
    assert_eq!(mini["cache_write"], "0.25", "defaults resolved");
    let fine = find("my-finetune-*");
    assert_eq!(fine["tiers"]["priority"], "5/3");
    let opus = find("claude-opus-4-8");
    assert_eq!(opus["source"], "shipped");
    // Versions are digests: 16 hex digits, equal for equal entries, stable across runs.
    for e in entries {
        let version = e["version"].as_str().unwrap();
        assert!(version.len() == 16 && version.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    assert_eq!(find("claude-opus-4-7")["version"], opus["version"]);
    assert_ne!(
        find("claude-opus-4-5")["version"],
        find("claude-opus-5-5")["version"]
    );
    let (_, again, _) = proxy.cli(&["prices", "--json"]);
    assert_eq!(again, out);
    // Human output: one line per entry with its version and source.
    let (code, human, _) = proxy.cli(&["prices"]);
    assert_eq!(code, 0);
    let line = human
        .lines()
        .find(|l| l.starts_with("gpt-4o-mini "))
        .unwrap();
    assert!(line.contains(&format!("version={}", mini["version"].as_str().unwrap())));
    assert!(line.ends_with("config"), "{line}");
    assert_eq!(human.lines().count(), entries.len() + 1);
    // check-config shows the resolved override with its version, and accepts the table.
    let (code, checked, _) = proxy.cli(&["check-config"]);
    assert_eq!(code, 0);
    let c: Value = serde_json::from_str(&checked).unwrap();
    assert_eq!(c["prices"]["gpt-4o-mini"]["version"], mini["version"]);
}

#[tokio::test]
async fn bad_price_entries_fail_check_config_and_serve_with_their_lines() {
    let (_mock, proxy, _key) = setup("").await;
    let path = proxy.dir.path().join("bad.toml");
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    let lines = good.lines().count();
    std::fs::write(
        &path,
        format!("{good}\n[prices.\"m\"]\ninput = 1\noutput = 2\ntiers = {{ priority = \"fast\" }}\nlong_context = {{ above = 10, input = 0.5, output = 3 }}\n"),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            ":{}: prices.\"m\".tiers.priority: `fast` is not a multiplier",
            lines + 5
        )),
        "{err}"
    );
    assert!(
        err.contains("prices.\"m\".long_context.input: 0.5 is below"),
        "{err}"
    );
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prices.\"m\".tiers.priority"));
}

#[test]
fn the_price_examples_in_the_configuration_reference_are_valid() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let section = doc.split("## `[prices.\"MODEL\"]`").nth(1).unwrap();
    let mut blocks = 0;
    let mut examples = String::new();
    for block in section.split("```toml").skip(1) {
        let toml = block.split("```").next().unwrap();
        let file = tollgate::billing::table::parse_price_file(toml)
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert!(!file.prices.is_empty());
        blocks += 1;
        examples.push_str(toml);
    }
    assert!(blocks >= 1);
    // Every key of an entry and of its long-context band is documented in the key tables
    // and used in an example (written `key = …` on a line or inside an inline table).
    let used = |key: &str, text: &str| {
        text.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with(&format!("{key} = "))
                || l.contains(&format!(" {key} = "))
                || l.contains(&format!("{{ {key} = "))
        })
    };
    for key in tollgate::billing::price::ENTRY_KEYS
        .iter()
        .chain(tollgate::billing::price::LONG_CONTEXT_KEYS)
    {
        assert!(
            section.contains(&format!("| `{key}` |")),
            "`{key}` has no row"
        );
        assert!(used(key, &examples), "`{key}` has no example");
    }
    let band = section
        .split("[prices.\"gpt-audio-long\".long_context]")
        .nth(1)
        .unwrap();
    for key in tollgate::billing::price::LONG_CONTEXT_KEYS {
        assert!(
            used(key, band.split("```").next().unwrap()),
            "long_context `{key}`"
        );
    }
}

/// The price entry versions `tollgate prices` shows, by model.
fn versions(proxy: &Proxy) -> std::collections::HashMap<String, String> {
    let (code, out, err) = proxy.cli(&["prices", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["model"].as_str().unwrap().to_owned(),
                e["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn settled_rows_record_what_priced_them() {
    // SPEC §7: cache_write_1h_tokens, tool_calls, service_tier and price_version are ledger
    // columns with the exact values the settle priced, stream and non-stream.
    let (_mock, proxy, key) = setup("").await;
    let versions = versions(&proxy);
    for stream in [false, true] {
        // claude-opus-4-8: input 5, cache read 0.50, 5-minute write 6.25, 1-hour write 10,
        // output 25; $0.01 per web search.
        let body = json!({"model": "claude-opus-4-8", "max_tokens": 300, "stream": stream,
                          "messages": [{"role": "user", "content": "Search and tell me"}]});
        let headers = [
            ("x-mock-cached-tokens", "1000"),
            ("x-mock-cache-write-tokens", "300"),
            ("x-mock-cache-write-1h-tokens", "700"),
            ("x-mock-web-searches", "3"),
        ];
        let r = post_json(&proxy.url("/v1/messages"), &key, &body, &headers).await;
        let u = seen_usage("/v1/messages", stream, &r);
        let (uncached, out) = (int(&u["input_tokens"]), int(&u["output_tokens"]));
        let row = row_of(&proxy, &r).await;
        let expect = bill(
            &[
                (uncached, "5"),
                (1000, "0.50"),
                (300, "6.25"),
                (700, "10"),
                (out, "25"),
            ],
            ONE,
            3,
        );
        assert_eq!(row["cost_micros"], expect, "stream={stream}");
        assert_eq!(row["cache_write_tokens"], 1000);
        assert_eq!(row["cache_write_1h_tokens"], 700, "stream={stream}");
        assert_eq!(row["tool_calls"], 3, "stream={stream}");
        assert_eq!(row["service_tier"], "standard", "stream={stream}");
        assert_eq!(
            row["price_version"].as_str(),
            Some(versions["claude-opus-4-8"].as_str())
        );

        // gpt-6.1-sol served at priority (×2): the row names the tier it was priced at.
        let mut body = chat("gpt-6.1-sol", stream, "Tell me a story");
        body["service_tier"] = json!("priority");
        let r = post_json(&proxy.url("/v1/chat/completions"), &key, &body, &[]).await;
        let u = seen_usage("/v1/chat/completions", stream, &r);
        let row = row_of(&proxy, &r).await;
        let expect = bill(
            &[
                (int(&u["prompt_tokens"]), "2"),
                (int(&u["completion_tokens"]), "10"),
            ],
            (2, 1),
            0,
        );
        assert_eq!(row["cost_micros"], expect, "stream={stream}");
        assert_eq!(row["service_tier"], "priority");
        assert_eq!(
            (
                row["tool_calls"].as_i64(),
                row["cache_write_1h_tokens"].as_i64()
            ),
            (Some(0), Some(0))
        );
        assert_eq!(
            row["price_version"].as_str(),
            Some(versions["gpt-6.1-sol"].as_str())
        );
    }
    // A released row carries none of them.
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat("gpt-6.1-sol", false, "hi"),
        &[("x-mock-status", "500")],
    )
    .await;
    assert_eq!(r.status, 500);
    proxy.wait_settled().await;
    let trace = r.header("x-tollgate-trace-id").unwrap();
    let row = proxy
        .ledger()
        .into_iter()
        .find(|r| r["trace_id"] == trace)
        .unwrap();
    assert_eq!(row["status"], "released");
    assert_eq!(row["service_tier"], Value::Null);
    assert_eq!(row["price_version"], Value::Null);
    // The admin API's transactions carry the same fields.
    let listed = send(
        "GET",
        &format!("http://{}/admin/transactions?limit=10", proxy.admin),
        &[("authorization", &format!("Bearer {}", ADMIN_TOKEN))],
        "",
    )
    .await
    .json();
    let tx = listed["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["model"] == "claude-opus-4-8")
        .unwrap()
        .clone();
    assert_eq!(tx["cache_write_1h_tokens"], 700);
    assert_eq!(tx["tool_calls"], 3);
    assert_eq!(
        tx["price_version"].as_str(),
        Some(versions["claude-opus-4-8"].as_str())
    );
}

/// µUSD as the CLI writes USD (`"0.001234"`, `"-0.000050"`).
fn usd_text(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// `ceil(input × in_rate + output × out_rate)` µUSD, rates in µUSD per token ×1000 (so
/// 0.15 USD / 1M = 150).
fn cost_at(input: i64, output: i64, in_milli: i64, out_milli: i64) -> i64 {
    (input * in_milli + output * out_milli + 999) / 1000
}

#[tokio::test]
async fn rerate_writes_exact_adjustments_once_and_everything_counts_them() {
    let price = |input: &str, output: &str| {
        format!("[prices.\"gpt-4o-mini\"]\ninput = {input}\noutput = {output}\n")
    };
    let (_mock, proxy, _) = setup(&price("0.15", "0.60")).await;
    let (key_id, key) = proxy
        .create_live_key(&["--limit", "usd:day=100", "--limit", "requests:day=100"])
        .await;
    for stream in [false, true, false] {
        let r = post_json(
            &proxy.url("/v1/chat/completions"),
            &key,
            &chat("gpt-4o-mini", stream, "Tell me a story"),
            &[],
        )
        .await;
        row_of(&proxy, &r).await;
    }
    // Another model's row is left alone by --model.
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat("gpt-4.1", false, "hi"),
        &[],
    )
    .await;
    row_of(&proxy, &r).await;
    let originals: Vec<Value> = proxy
        .ledger()
        .into_iter()
        .filter(|r| r["model"] == "gpt-4o-mini")
        .collect();
    assert_eq!(originals.len(), 3);
    let tokens = |r: &Value| (int(&r["input_tokens"]), int(&r["output_tokens"]));
    for r in &originals {
        let (i, o) = tokens(r);
        assert_eq!(int(&r["cost_micros"]), cost_at(i, o, 150, 600));
    }
    let old_total: i64 = originals.iter().map(|r| int(&r["cost_micros"])).sum();

    // The price was wrong: 0.30 / 1.50. Correct the config and re-rate.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        text.replace(&price("0.15", "0.60"), &price("0.30", "1.50")),
    )
    .unwrap();
    let expect: Vec<i64> = originals
        .iter()
        .map(|r| {
            let (i, o) = tokens(r);
            cost_at(i, o, 300, 1500)
        })
        .collect();
    let new_total: i64 = expect.iter().sum();
    let rerate = |extra: &[&str]| {
        let mut args = vec![
            "rerate",
            "--since",
            "1h",
            "--model",
            "gpt-4o-mini",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = proxy.cli(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    // Dry run: the per-model figures, nothing written.
    let dry = rerate(&[]);
    let m = &dry["models"][0];
    assert_eq!(m["model"], "gpt-4o-mini");
    assert_eq!(m["rows"], 3);
    assert_eq!(m["old_total"], usd_text(old_total));
    assert_eq!(m["new_total"], usd_text(new_total));
    assert_eq!(m["difference"], usd_text(new_total - old_total));
    assert_eq!(
        (dry["adjustments"].as_i64(), dry["written"].as_i64()),
        (Some(3), Some(0))
    );
    assert_eq!(proxy.ledger().len(), 4, "a dry run writes nothing");

    // Apply: one adjustment per row, exactly the difference, the original untouched.
    let applied = rerate(&["--apply"]);
    assert_eq!(applied["written"], 3, "{applied}");
    assert_eq!(applied["counters"], "rebuilt by the running instance");
    let ledger = proxy.ledger();
    for (orig, want) in originals.iter().zip(&expect) {
        let now = ledger
            .iter()
            .find(|r| r["trace_id"] == orig["trace_id"])
            .unwrap();
        assert_eq!(now, orig, "a settled row is never rewritten");
        let adj: Vec<&Value> = ledger
            .iter()
            .filter(|r| r["adjusts"] == orig["trace_id"])
            .collect();
        assert_eq!(adj.len(), 1);
        let a = adj[0];
        assert_eq!(int(&a["cost_micros"]), want - int(&orig["cost_micros"]));
        assert_eq!((tokens(a), a["status"].as_str()), ((0, 0), Some("settled")));
        assert_eq!(
            (&a["key_id"], &a["model"]),
            (&orig["key_id"], &orig["model"])
        );
        assert_eq!(
            a["started_at"], orig["started_at"],
            "same window and period"
        );
        assert!(a["trace_id"].as_str().unwrap().starts_with("rerate:"));
    }
    // Twice changes nothing.
    let again = rerate(&["--apply"]);
    assert_eq!(
        (again["written"].as_i64(), again["adjustments"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(again["models"][0]["old_total"], usd_text(new_total));
    assert_eq!(proxy.ledger().len(), 7);

    // Counters, reconcile, usage and reports include the adjustments; requests do not grow.
    let other: i64 = ledger
        .iter()
        .filter(|r| r["model"] == "gpt-4.1")
        .map(|r| int(&r["cost_micros"]))
        .sum();
    let (_, out, _) = proxy.cli(&["usage", "--key", &key_id, "--json"]);
    let u: Value = serde_json::from_str(&out).unwrap();
    let limit = |spec: &str| {
        u["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["spec"] == spec)
            .unwrap()
            .clone()
    };
    assert_eq!(limit("usd:day=100")["used"], usd_text(new_total + other));
    assert_eq!(limit("requests:day=100")["used"], 4);
    let (code, out, _) = proxy.cli(&["reconcile", "--json"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = proxy.cli(&["report", "--since", "1h", "--by", "model", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rep: Value = serde_json::from_str(&out).unwrap();
    let mini = rep["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == "gpt-4o-mini")
        .unwrap()
        .clone();
    assert_eq!(
        (int(&mini["cost_micros"]), int(&mini["requests"])),
        (new_total, 3),
        "{mini}"
    );

    // The price goes down: negative adjustments, after the earlier ones.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        text.replace(&price("0.30", "1.50"), &price("0.10", "0.40")),
    )
    .unwrap();
    let cheaper: i64 = originals
        .iter()
        .map(|r| {
            let (i, o) = tokens(r);
            cost_at(i, o, 100, 400)
        })
        .sum();
    let down = rerate(&["--apply"]);
    assert_eq!(down["written"], 3);
    assert_eq!(
        down["models"][0]["difference"],
        usd_text(cheaper - new_total)
    );
    let billed: i64 = proxy
        .ledger()
        .iter()
        .filter(|r| r["model"] == "gpt-4o-mini")
        .map(|r| int(&r["cost_micros"]))
        .sum();
    assert_eq!(billed, cheaper);
    let (code, out, _) = proxy.cli(&["reconcile", "--json"]);
    assert_eq!(code, 0, "{out}");
}
