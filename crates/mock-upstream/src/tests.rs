//! End-to-end tests of the mock upstream over real sockets, with hyper's client.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::*;

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn mock() -> MockHandle {
    start("127.0.0.1:0".parse().unwrap()).await.unwrap()
}

fn o200k(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

fn cl100k(text: &str) -> u64 {
    tiktoken_rs::cl100k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

/// A response read frame by frame.
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    frames: Vec<Bytes>,
    /// The body ended with an error (connection cut) instead of cleanly.
    body_error: Option<String>,
}

impl Got {
    fn bytes(&self) -> Vec<u8> {
        self.frames.iter().flat_map(|f| f.iter().copied()).collect()
    }

    fn text(&self) -> String {
        String::from_utf8(self.bytes()).unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes()).unwrap()
    }

    /// SSE events as (event name, parsed data); `[DONE]` becomes `Value::String("[DONE]")`.
    fn events(&self) -> Vec<(Option<String>, Value)> {
        let text = self.text();
        assert!(
            text.ends_with("\n\n") || text.is_empty(),
            "stream must end on an event boundary"
        );
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let mut name = None;
                let mut data = None;
                for line in e.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = Some(n.to_owned());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = Some(if d == "[DONE]" {
                            Value::String(d.to_owned())
                        } else {
                            serde_json::from_str(d).unwrap()
                        });
                    }
                }
                (name, data.unwrap())
            })
            .collect()
    }
}

async fn send(
    client: &TestClient,
    method: Method,
    url: String,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Got {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    frames.push(data);
                }
            }
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    Got {
        status,
        headers,
        frames,
        body_error,
    }
}

/// POSTs JSON with the provider's auth header for `path` added.
async fn post(h: &MockHandle, path: &str, headers: &[(&str, &str)], body: Value) -> Got {
    let mut all: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if path == "/v1/messages" {
        all.push(("x-api-key", "sk-ant-test"));
        all.push(("anthropic-version", "2023-06-01"));
    } else {
        all.push(("authorization", "Bearer sk-test"));
    }
    all.extend_from_slice(headers);
    send(
        &client(),
        Method::POST,
        format!("{}{path}", h.url()),
        &all,
        body.to_string(),
    )
    .await
}

fn chat_body(stream: bool, include_usage: Option<bool>) -> Value {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something about budgets."}
        ],
        "stream": stream
    });
    if let Some(u) = include_usage {
        body["stream_options"] = json!({"include_usage": u});
    }
    body
}

fn chat_deltas(events: &[(Option<String>, Value)]) -> String {
    events
        .iter()
        .filter_map(|(_, d)| {
            d.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

#[tokio::test]
async fn chat_non_stream_reports_exact_usage() {
    let h = mock().await;
    let got = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-words", "30")],
        chat_body(false, None),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["content-type"], "application/json");
    let doc = got.json();
    assert_eq!(doc["object"], "chat.completion");
    assert_eq!(doc["model"], "gpt-4o-mini");
    assert!(doc["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(doc["choices"][0]["finish_reason"], "stop");
    let content = doc["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.split(' ').count(), 30);
    assert_eq!(doc["usage"]["completion_tokens"], o200k(content));
    // Two messages: contents joined by "\n", + 3 per message + 3.
    let prompt = o200k("You are terse.\nSay something about budgets.") + 3 * 2 + 3;
    assert_eq!(doc["usage"]["prompt_tokens"], prompt);
    assert_eq!(doc["usage"]["total_tokens"], prompt + o200k(content));
    assert_eq!(doc["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    h.shutdown().await;
}

#[tokio::test]
async fn same_request_gives_same_answer() {
    let h = mock().await;
    let a = post(&h, "/v1/chat/completions", &[], chat_body(false, None))
        .await
        .json();
    let b = post(&h, "/v1/chat/completions", &[], chat_body(false, None))
        .await
        .json();
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
    assert_ne!(a["id"], b["id"], "ids stay unique per response");
    let mut other = chat_body(false, None);
    other["messages"][1]["content"] = json!("Something else entirely.");
    let c = post(&h, "/v1/chat/completions", &[], other).await.json();
    assert_ne!(
        a["choices"][0]["message"]["content"],
        c["choices"][0]["message"]["content"]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn chat_stream_with_include_usage() {
    let h = mock().await;
    let got = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-words", "40")],
        chat_body(true, Some(true)),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.headers["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(got.headers["cache-control"], "no-cache");
    let events = got.events();
    assert_eq!(events.last().unwrap().1, Value::String("[DONE]".into()));
    let chunks = &events[..events.len() - 1];
    let (usage_chunk, others) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk.1["choices"], json!([]));
    for (_, c) in others {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(
            c.get("usage").unwrap().is_null(),
            "every other chunk has usage: null"
        );
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    assert_eq!(others[0].1["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        others.last().unwrap().1["choices"][0]["finish_reason"],
        "stop"
    );
    let text = chat_deltas(chunks);
    assert_eq!(text.split(' ').count(), 40);
    // Exact count of the concatenation, not a sum over deltas.
    assert_eq!(usage_chunk.1["usage"]["completion_tokens"], o200k(&text));
    let ids: std::collections::HashSet<&str> = chunks
        .iter()
        .map(|(_, c)| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    h.shutdown().await;
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage_key() {
    let h = mock().await;
    for include in [None, Some(false)] {
        let got = post(&h, "/v1/chat/completions", &[], chat_body(true, include)).await;
        let events = got.events();
        assert_eq!(events.last().unwrap().1, Value::String("[DONE]".into()));
        for (_, c) in &events[..events.len() - 1] {
            assert!(c.get("usage").is_none(), "no usage key at all: {c}");
            assert_eq!(c["choices"].as_array().unwrap().len(), 1);
        }
    }
    h.shutdown().await;
}

#[tokio::test]
async fn stream_options_without_stream_is_rejected() {
    let h = mock().await;
    let got = post(
        &h,
        "/v1/chat/completions",
        &[],
        chat_body(false, Some(true)),
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.json()["error"]["param"], "stream_options");
    h.shutdown().await;
}

#[tokio::test]
async fn no_usage_switch_drops_the_usage_chunk() {
    let h = mock().await;
    let got = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-no-usage", "1")],
        chat_body(true, Some(true)),
    )
    .await;
    let events = got.events();
    assert!(
        events
            .iter()
            .all(|(_, c)| c.get("choices") != Some(&json!([])))
    );
    assert_eq!(events.last().unwrap().1, Value::String("[DONE]".into()));
    let doc = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-no-usage", "1")],
        chat_body(false, None),
    )
    .await
    .json();
    assert!(doc.get("usage").is_none());
    h.shutdown().await;
}

#[tokio::test]
async fn chunk_count_and_usage_details_are_controllable() {
    let h = mock().await;
    let got = post(
        &h,
        "/v1/chat/completions",
        &[
            ("x-mock-chunks", "5"),
            ("x-mock-cached-tokens", "4"),
            ("x-mock-reasoning-tokens", "64"),
        ],
        chat_body(true, Some(true)),
    )
    .await;
    let events = got.events();
    let content_chunks = events
        .iter()
        .filter(|(_, c)| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert_eq!(content_chunks, 5);
    let usage = &events[events.len() - 2].1["usage"];
    let text = chat_deltas(&events);
    assert_eq!(usage["completion_tokens"], o200k(&text) + 64);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 64);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 4);
    h.shutdown().await;
}

#[tokio::test]
async fn max_tokens_cuts_the_answer_exactly() {
    let h = mock().await;
    let mut body = chat_body(true, Some(true));
    body["max_completion_tokens"] = json!(7);
    let events = post(&h, "/v1/chat/completions", &[("x-mock-words", "50")], body)
        .await
        .events();
    let text = chat_deltas(&events);
    assert_eq!(o200k(&text), 7);
    let finish = events.iter().find_map(|(_, c)| {
        c.pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
    });
    assert_eq!(finish, Some("length"));
    assert_eq!(events[events.len() - 2].1["usage"]["completion_tokens"], 7);
    h.shutdown().await;
}

#[tokio::test]
async fn chat_tool_call_streams_arguments() {
    let h = mock().await;
    let mut body = chat_body(true, Some(true));
    body["tools"] = json!([{"type": "function", "function": {"name": "lookup", "parameters": {}}}]);
    let events = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-tool-call", "1")],
        body,
    )
    .await
    .events();
    let first = &events[0].1["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(first["function"]["name"], "lookup");
    assert!(first["id"].as_str().unwrap().starts_with("call_"));
    let args: String = events
        .iter()
        .filter_map(|(_, c)| {
            c.pointer("/choices/0/delta/tool_calls/0/function/arguments")
                .and_then(Value::as_str)
        })
        .collect();
    let parsed: Value = serde_json::from_str(&args).unwrap();
    assert!(parsed["query"].is_string());
    let pieces = events
        .iter()
        .filter(|(_, c)| {
            c.pointer("/choices/0/delta/tool_calls/0/function/arguments")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert!(pieces > 3, "arguments arrive in pieces");
    let finish = events.iter().find_map(|(_, c)| {
        c.pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
    });
    assert_eq!(finish, Some("tool_calls"));
    assert_eq!(
        events[events.len() - 2].1["usage"]["completion_tokens"],
        o200k(&args)
    );
    h.shutdown().await;
}

#[tokio::test]
async fn responses_stream_event_sequence_and_usage() {
    let h = mock().await;
    let body = json!({
        "model": "gpt-4.1",
        "instructions": "Be kind.",
        "input": "Tell me about ledgers.",
        "stream": true
    });
    let got = post(&h, "/v1/responses", &[("x-mock-cached-tokens", "2")], body).await;
    let events = got.events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let deltas = names
        .iter()
        .filter(|n| **n == "response.output_text.delta")
        .count();
    assert!(deltas >= 1);
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_deref().unwrap());
        assert_eq!(data["sequence_number"], i as u64);
    }
    let text: String = events
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.output_text.delta"))
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    let done = &events[events.len() - 4].1;
    assert_eq!(done["text"], text);
    let completed = &events.last().unwrap().1["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["model"], "gpt-4.1");
    assert_eq!(completed["instructions"], "Be kind.");
    let usage = &completed["usage"];
    let input = o200k("Be kind.\nTell me about ledgers.") + 3 * 2 + 3;
    assert_eq!(usage["input_tokens"], input);
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 2);
    assert_eq!(usage["output_tokens"], o200k(&text));
    assert_eq!(usage["output_tokens_details"]["reasoning_tokens"], 0);
    assert_eq!(usage["total_tokens"], input + o200k(&text));
    assert_eq!(completed["output"][0]["content"][0]["text"], text);
    h.shutdown().await;
}

#[tokio::test]
async fn responses_non_stream() {
    let h = mock().await;
    let body = json!({
        "model": "gpt-5",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "max_output_tokens": 5
    });
    let doc = post(&h, "/v1/responses", &[("x-mock-words", "40")], body)
        .await
        .json();
    assert_eq!(doc["object"], "response");
    assert!(doc["id"].as_str().unwrap().starts_with("resp_"));
    // Cut by max_output_tokens: incomplete, exactly 5 output tokens.
    assert_eq!(doc["status"], "incomplete");
    assert_eq!(doc["incomplete_details"]["reason"], "max_output_tokens");
    let text = doc["output"][0]["content"][0]["text"].as_str().unwrap();
    assert_eq!(doc["usage"]["output_tokens"], o200k(text));
    assert_eq!(doc["usage"]["output_tokens"], 5);
    assert_eq!(doc["usage"]["input_tokens"], o200k("Hi") + 3 + 3);
    h.shutdown().await;
}

#[tokio::test]
async fn responses_tool_call_stream() {
    let h = mock().await;
    let body = json!({
        "model": "gpt-4o",
        "input": "weather?",
        "tools": [{"type": "function", "name": "get_forecast", "parameters": {}}],
        "stream": true
    });
    let events = post(&h, "/v1/responses", &[("x-mock-tool-call", "1")], body)
        .await
        .events();
    let args: String = events
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.function_call_arguments.delta"))
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert!(serde_json::from_str::<Value>(&args).is_ok());
    let completed = &events.last().unwrap().1["response"];
    assert_eq!(completed["output"][0]["type"], "function_call");
    assert_eq!(completed["output"][0]["name"], "get_forecast");
    assert_eq!(completed["output"][0]["arguments"], args);
    assert_eq!(completed["usage"]["output_tokens"], o200k(&args));
    h.shutdown().await;
}

#[tokio::test]
async fn completions_and_embeddings_use_cl100k() {
    let h = mock().await;
    let doc = post(
        &h,
        "/v1/completions",
        &[],
        json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time"}),
    )
    .await
    .json();
    assert_eq!(doc["object"], "text_completion");
    let text = doc["choices"][0]["text"].as_str().unwrap();
    assert_eq!(doc["usage"]["prompt_tokens"], cl100k("Once upon a time"));
    assert_eq!(doc["usage"]["completion_tokens"], cl100k(text));

    let body = json!({"model": "text-embedding-3-small", "input": ["alpha beta", "gamma"]});
    let a = post(&h, "/v1/embeddings", &[], body.clone()).await.json();
    let b = post(&h, "/v1/embeddings", &[], body).await.json();
    assert_eq!(a["object"], "list");
    assert_eq!(a["data"].as_array().unwrap().len(), 2);
    assert_eq!(a["data"][1]["index"], 1);
    assert_eq!(a["data"][0]["embedding"].as_array().unwrap().len(), 16);
    assert_eq!(a["data"], b["data"], "vectors are deterministic");
    // Each input is tokenized on its own.
    let tokens = cl100k("alpha beta") + cl100k("gamma");
    assert_eq!(a["usage"]["prompt_tokens"], tokens);
    assert_eq!(a["usage"]["total_tokens"], tokens);

    let b64 = post(
        &h,
        "/v1/embeddings",
        &[],
        json!({"model": "text-embedding-3-small", "input": "x", "dimensions": 4, "encoding_format": "base64"}),
    )
    .await
    .json();
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw.len(), 4 * 4);
    h.shutdown().await;
}

/// Claude is counted with cl100k, as tollgate counts it.
fn anthropic_body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": "You are precise.",
        "messages": [{"role": "user", "content": "Explain reservations."}],
        "stream": stream
    })
}

#[tokio::test]
async fn anthropic_stream_has_cumulative_output_tokens() {
    let h = mock().await;
    let got = post(
        &h,
        "/v1/messages",
        &[
            ("x-mock-cached-tokens", "100"),
            ("x-mock-cache-write-tokens", "50"),
        ],
        anthropic_body(true),
    )
    .await;
    assert_eq!(
        got.headers["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let events = got.events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let deltas = names
        .iter()
        .filter(|n| **n == "content_block_delta")
        .count();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", deltas));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_deref().unwrap());
    }
    let start = &events[0].1["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_01"));
    assert_eq!(start["model"], "claude-sonnet-4-5");
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(
        start["usage"]["input_tokens"],
        cl100k("You are precise.\nExplain reservations.") + 3 * 2 + 3
    );
    assert_eq!(start["usage"]["cache_read_input_tokens"], 100);
    assert_eq!(start["usage"]["cache_creation_input_tokens"], 50);
    let text: String = events
        .iter()
        .filter_map(|(_, d)| d.pointer("/delta/text").and_then(Value::as_str))
        .collect();
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    // Cumulative: the whole answer, not the increment since message_start.
    assert_eq!(delta["usage"]["output_tokens"], cl100k(&text));
    h.shutdown().await;
}

#[tokio::test]
async fn anthropic_non_stream_and_tool_use() {
    let h = mock().await;
    let doc = post(&h, "/v1/messages", &[], anthropic_body(false))
        .await
        .json();
    assert_eq!(doc["type"], "message");
    assert_eq!(doc["role"], "assistant");
    assert_eq!(doc["stop_reason"], "end_turn");
    let text = doc["content"][0]["text"].as_str().unwrap();
    assert_eq!(doc["usage"]["output_tokens"], cl100k(text));

    let mut body = anthropic_body(true);
    body["tools"] = json!([{"name": "search", "input_schema": {"type": "object"}}]);
    let events = post(&h, "/v1/messages", &[("x-mock-tool-call", "1")], body)
        .await
        .events();
    assert_eq!(events[1].1["content_block"]["type"], "tool_use");
    assert_eq!(events[1].1["content_block"]["name"], "search");
    let json_text: String = events
        .iter()
        .filter_map(|(_, d)| d.pointer("/delta/partial_json").and_then(Value::as_str))
        .collect();
    assert!(serde_json::from_str::<Value>(&json_text).is_ok());
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], cl100k(&json_text));

    let mut missing = anthropic_body(false);
    missing.as_object_mut().unwrap().remove("max_tokens");
    let got = post(&h, "/v1/messages", &[], missing).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.json()["error"]["type"], "invalid_request_error");
    h.shutdown().await;
}

#[tokio::test]
async fn injected_status_uses_provider_error_shapes() {
    let h = mock().await;
    let got = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-status", "429"), ("x-mock-retry-after", "7")],
        chat_body(true, Some(true)),
    )
    .await;
    assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(got.headers["retry-after"], "7");
    assert_eq!(got.headers["content-type"], "application/json");
    let err = &got.json()["error"];
    assert_eq!(err["code"], "rate_limit_exceeded");
    assert!(err["message"].as_str().unwrap().contains("gpt-4o-mini"));

    let got = post(
        &h,
        "/v1/responses",
        &[("x-mock-status", "500")],
        json!({"model": "gpt-4o"}),
    )
    .await;
    assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(got.json()["error"]["type"], "server_error");

    let got = post(
        &h,
        "/v1/messages",
        &[("x-mock-status", "529")],
        anthropic_body(true),
    )
    .await;
    assert_eq!(got.status.as_u16(), 529);
    assert_eq!(got.headers["retry-after"], "1");
    let doc = got.json();
    assert_eq!(doc["type"], "error");
    assert_eq!(doc["error"]["type"], "overloaded_error");
    assert_eq!(doc["error"]["message"], "Overloaded");
    assert!(doc["request_id"].as_str().unwrap().starts_with("req_"));
    h.shutdown().await;
}

#[tokio::test]
async fn mid_stream_errors_in_each_format() {
    let h = mock().await;
    let events = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-error-after", "3"), ("x-mock-chunks", "10")],
        chat_body(true, Some(true)),
    )
    .await
    .events();
    // role chunk + 3 content chunks + the error; no finish, no usage, no [DONE].
    assert_eq!(events.len(), 5);
    let content: Vec<_> = events[1..4]
        .iter()
        .map(|(_, c)| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content.len(), 3);
    assert_eq!(events[4].1["error"]["type"], "server_error");

    let body = json!({"model": "gpt-4o", "input": "x", "stream": true});
    let events = post(&h, "/v1/responses", &[("x-mock-error-after", "1")], body)
        .await
        .events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    assert_eq!(
        names[names.len() - 3..],
        ["response.output_text.delta", "error", "response.failed"]
    );
    assert_eq!(events.last().unwrap().1["response"]["status"], "failed");

    let events = post(
        &h,
        "/v1/messages",
        &[("x-mock-error-after", "2")],
        anthropic_body(true),
    )
    .await
    .events();
    let (name, data) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    assert_eq!(data["error"]["type"], "overloaded_error");
    assert_eq!(
        events
            .iter()
            .filter(|(n, _)| n.as_deref() == Some("content_block_delta"))
            .count(),
        2
    );
    assert!(
        events
            .iter()
            .all(|(n, _)| n.as_deref() != Some("message_stop"))
    );
    h.shutdown().await;
}

#[tokio::test]
async fn split_mode_only_changes_framing() {
    let h = mock().await;
    for (path, body) in [
        ("/v1/chat/completions", chat_body(true, Some(true))),
        ("/v1/messages", anthropic_body(true)),
        (
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "x", "stream": true}),
        ),
        ("/v1/chat/completions", chat_body(false, None)),
    ] {
        let seeded = [("x-mock-seed", "99"), ("x-mock-words", "60")];
        let plain = post(&h, path, &seeded, body.clone()).await;
        let fixed = post(
            &h,
            path,
            &[seeded[0], seeded[1], ("x-mock-split", "7")],
            body.clone(),
        )
        .await;
        let random = post(
            &h,
            path,
            &[seeded[0], seeded[1], ("x-mock-split", "random")],
            body,
        )
        .await;
        assert_eq!(plain.bytes(), fixed.bytes(), "{path}");
        assert_eq!(plain.bytes(), random.bytes(), "{path}");
        assert!(fixed.frames.iter().all(|f| f.len() <= 7), "{path}");
        assert!(fixed.frames.len() > plain.frames.len(), "{path}");
        assert!(random.frames.iter().all(|f| f.len() <= 64), "{path}");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn records_requests_and_serves_them() {
    let h = mock().await;
    post(
        &h,
        "/v1/chat/completions",
        &[("x-trace", "abc")],
        chat_body(true, Some(true)),
    )
    .await;
    post(&h, "/v1/messages", &[], anthropic_body(false)).await;
    let rec = h.recorded();
    assert_eq!(rec.len(), 2);
    assert_eq!(rec[0].method, "POST");
    assert_eq!(rec[0].path, "/v1/chat/completions");
    assert_eq!(rec[0].header("Authorization"), Some("Bearer sk-test"));
    assert_eq!(rec[0].header("x-trace"), Some("abc"));
    assert_eq!(rec[0].include_usage, Some(true));
    assert_eq!(rec[0].stream, Some(true));
    assert_eq!(rec[0].model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(
        rec[0].body_len,
        chat_body(true, Some(true)).to_string().len()
    );
    assert_eq!(rec[1].header("x-api-key"), Some("sk-ant-test"));
    assert_eq!(rec[1].include_usage, None);
    assert!(rec[0].seq < rec[1].seq);

    let c = client();
    let listed = send(
        &c,
        Method::GET,
        format!("{}/mock/requests", h.url()),
        &[],
        "",
    )
    .await;
    let parsed: Vec<RecordedRequest> = serde_json::from_slice(&listed.bytes()).unwrap();
    assert_eq!(parsed, rec);
    let cleared = send(
        &c,
        Method::DELETE,
        format!("{}/mock/requests", h.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(cleared.status, StatusCode::NO_CONTENT);
    assert!(h.recorded().is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn recorder_is_a_bounded_ring() {
    let options = MockOptions {
        record_capacity: 3,
        ..MockOptions::default()
    };
    let h = start_with("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    for _ in 0..5 {
        post(
            &h,
            "/v1/embeddings",
            &[],
            json!({"model": "text-embedding-3-small", "input": "a"}),
        )
        .await;
    }
    let seqs: Vec<u64> = h.recorded().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    h.shutdown().await;
}

#[tokio::test]
async fn authentication_errors() {
    let options = MockOptions {
        expected_key: Some("sk-right".into()),
        ..MockOptions::default()
    };
    let h = start_with("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", h.url());
    let body = chat_body(false, None).to_string();
    let missing = send(&c, Method::POST, url.clone(), &[], body.clone()).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.json()["error"]["type"], "invalid_request_error");
    let wrong = send(
        &c,
        Method::POST,
        url.clone(),
        &[("authorization", "Bearer sk-wrong-key-123")],
        body.clone(),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.json()["error"]["code"], "invalid_api_key");
    let right = send(
        &c,
        Method::POST,
        url,
        &[("authorization", "Bearer sk-right")],
        body,
    )
    .await;
    assert_eq!(right.status, StatusCode::OK);

    let url = format!("{}/v1/messages", h.url());
    let body = anthropic_body(false).to_string();
    // A bearer token is not how the Anthropic upstream authenticates.
    let bearer = send(
        &c,
        Method::POST,
        url.clone(),
        &[("authorization", "Bearer sk-right")],
        body.clone(),
    )
    .await;
    assert_eq!(bearer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(bearer.json()["error"]["type"], "authentication_error");
    let wrong = send(
        &c,
        Method::POST,
        url.clone(),
        &[("x-api-key", "nope")],
        body.clone(),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.json()["error"]["message"], "invalid x-api-key");
    let right = send(&c, Method::POST, url, &[("x-api-key", "sk-right")], body).await;
    assert_eq!(right.status, StatusCode::OK);
    h.shutdown().await;
}

#[tokio::test]
async fn bad_json_unknown_routes_and_bad_switches() {
    let h = mock().await;
    let c = client();
    let bad = send(
        &c,
        Method::POST,
        format!("{}/v1/chat/completions", h.url()),
        &[("authorization", "Bearer k")],
        "{not json",
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    let bad = send(
        &c,
        Method::POST,
        format!("{}/v1/messages", h.url()),
        &[("x-api-key", "k")],
        "{not json",
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let doc = bad.json();
    assert_eq!(doc["type"], "error");
    assert_eq!(doc["error"]["type"], "invalid_request_error");

    let missing = send(&c, Method::POST, format!("{}/v1/nope", h.url()), &[], "{}").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        missing.json()["error"]["message"],
        "Invalid URL (POST /v1/nope)"
    );
    assert_eq!(h.recorded().last().unwrap().path, "/v1/nope");

    let typo = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-words", "lots")],
        chat_body(false, None),
    )
    .await;
    assert_eq!(typo.status, StatusCode::BAD_REQUEST);
    assert!(
        typo.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-mock-words")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn drop_after_cuts_the_connection() {
    let h = mock().await;
    let got = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-drop-after", "2"), ("x-mock-chunks", "10")],
        chat_body(true, Some(true)),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body_error.is_some(), "client sees an incomplete body");
    let text = got.text();
    assert_eq!(
        text.matches("\"content\":").count(),
        3,
        "role chunk + 2 content chunks"
    );
    assert!(!text.contains("[DONE]"));

    let doc = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-drop-after", "0")],
        chat_body(false, None),
    )
    .await;
    assert!(doc.body_error.is_some());
    h.shutdown().await;
}

#[tokio::test]
async fn stall_after_keeps_the_connection_silent_until_shutdown() {
    let h = mock().await;
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", "Bearer k".parse().unwrap());
    headers.insert("x-mock-stall-after", "2".parse().unwrap());
    headers.insert("x-mock-chunks", "6".parse().unwrap());
    let mut req = Request::post(format!("{}/v1/chat/completions", h.url()))
        .body(Full::new(Bytes::from(chat_body(true, None).to_string())))
        .unwrap();
    *req.headers_mut() = headers;
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        let frame = body.frame().await.unwrap().unwrap();
        seen.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
    }
    let next = tokio::time::timeout(Duration::from_millis(150), body.frame()).await;
    assert!(next.is_err(), "nothing after the stall point");
    assert_eq!(h.active_streams(), 1);
    let started = Instant::now();
    h.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(2));
    // The connection is closed by shutdown: the body ends (with an error) instead of hanging.
    let after = tokio::time::timeout(Duration::from_secs(2), body.frame()).await;
    assert!(matches!(after, Ok(None) | Ok(Some(Err(_)))));
}

#[tokio::test]
async fn stall_before_headers_and_first_byte_delay() {
    let h = mock().await;
    let c = client();
    let url = format!("{}/v1/chat/completions", h.url());
    let body = chat_body(false, None).to_string();
    let stalled = tokio::time::timeout(
        Duration::from_millis(150),
        send(
            &c,
            Method::POST,
            url.clone(),
            &[
                ("authorization", "Bearer k"),
                ("x-mock-stall-before-headers", "1"),
            ],
            body.clone(),
        ),
    )
    .await;
    assert!(stalled.is_err(), "no headers while stalled");
    let started = Instant::now();
    let delayed = send(
        &c,
        Method::POST,
        url,
        &[
            ("authorization", "Bearer k"),
            ("x-mock-first-byte-delay-ms", "80"),
        ],
        body,
    )
    .await;
    assert_eq!(delayed.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(80));
    h.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_stops_generation() {
    let h = mock().await;
    let mut req = Request::post(format!("{}/v1/chat/completions", h.url()))
        .header("authorization", "Bearer k")
        .header("x-mock-words", "5000")
        .header("x-mock-delay-ms", "5")
        .body(Full::new(Bytes::from(chat_body(true, None).to_string())))
        .unwrap();
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    assert_eq!(h.active_streams(), 1);
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(2);
    while h.active_streams() != 0 {
        assert!(Instant::now() < deadline, "generator kept running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.shutdown().await;
}

#[tokio::test]
async fn delays_pace_the_stream() {
    let h = mock().await;
    let started = Instant::now();
    let got = post(
        &h,
        "/v1/messages",
        &[("x-mock-chunks", "4"), ("x-mock-delay-ms", "20")],
        anthropic_body(true),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(80));
    assert_eq!(got.frames.len(), 3 + 4 + 3, "one frame per event");
    h.shutdown().await;
}

#[tokio::test]
async fn serves_http2_prior_knowledge() {
    let h = mock().await;
    let c: TestClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let got = send(
        &c,
        Method::POST,
        format!("{}/v1/chat/completions", h.url()),
        &[("authorization", "Bearer k")],
        chat_body(true, Some(true)).to_string(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let events = got.events();
    let text = chat_deltas(&events);
    assert_eq!(
        events[events.len() - 2].1["usage"]["completion_tokens"],
        o200k(&text)
    );
    h.shutdown().await;
}

#[tokio::test]
async fn large_requests_are_counted_off_the_reactor() {
    let h = mock().await;
    let big = "lorem ipsum dolor sit amet ".repeat(40_000);
    let body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": big}],
    });
    let doc = post(
        &h,
        "/v1/chat/completions",
        &[("x-mock-words", "6000")],
        body,
    )
    .await
    .json();
    assert_eq!(doc["usage"]["prompt_tokens"], o200k(&big) + 3 + 3);
    let content = doc["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(doc["usage"]["completion_tokens"], o200k(content));
    h.shutdown().await;
}

#[tokio::test]
async fn openai_reports_cache_writes_audio_and_the_served_tier() {
    let h = mock().await;
    let headers = [
        ("x-mock-cached-tokens", "5"),
        ("x-mock-cache-write-tokens", "7"),
        ("x-mock-cache-write-1h-tokens", "3"),
        ("x-mock-audio-input-tokens", "40"),
        ("x-mock-audio-output-tokens", "20"),
    ];
    let mut body = chat_body(false, None);
    body["service_tier"] = json!("fast");
    let doc = post(&h, "/v1/chat/completions", &headers, body)
        .await
        .json();
    // Fast mode is served, and reported, as `priority`.
    assert_eq!(doc["service_tier"], "priority");
    let u = &doc["usage"];
    let text = o200k("You are terse.\nSay something about budgets.") + 3 * 2 + 3;
    assert_eq!(u["prompt_tokens"], text + 40);
    let d = &u["prompt_tokens_details"];
    assert_eq!(
        (
            &d["cached_tokens"],
            &d["cache_write_tokens"],
            &d["audio_tokens"]
        ),
        (&json!(5), &json!(10), &json!(40))
    );
    assert_eq!(
        d["cache_write_tokens_details"],
        json!({"ttl_30m_tokens": 7, "ttl_12h_tokens": 3})
    );
    assert_eq!(u["completion_tokens_details"]["audio_tokens"], 20);
    let visible = o200k(doc["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(u["completion_tokens"], visible + 20);

    // Streamed: every chunk names the tier; the usage chunk carries the same details.
    let mut body = chat_body(true, Some(true));
    body["service_tier"] = json!("flex");
    let events = post(&h, "/v1/chat/completions", &headers, body)
        .await
        .events();
    for (_, data) in events.iter().filter(|(_, d)| d.is_object()) {
        assert_eq!(data["service_tier"], "flex");
    }
    let usage = events
        .iter()
        .find_map(|(_, d)| d.get("usage").filter(|u| u.is_object()))
        .unwrap();
    assert_eq!(usage["prompt_tokens_details"], *d);
    // The header overrides what the request asked for (a downgrade), and writes are cut to
    // what the prompt has left after the reads.
    let doc = post(
        &h,
        "/v1/chat/completions",
        &[
            ("x-mock-service-tier", "default"),
            ("x-mock-cached-tokens", "1000000"),
            ("x-mock-cache-write-tokens", "9"),
        ],
        chat_body(false, None),
    )
    .await
    .json();
    assert_eq!(doc["service_tier"], "default");
    let d = &doc["usage"]["prompt_tokens_details"];
    assert_eq!(d["cached_tokens"], doc["usage"]["prompt_tokens"]);
    assert_eq!(d["cache_write_tokens"], 0);
    h.shutdown().await;
}

#[tokio::test]
async fn responses_report_web_search_calls_in_both_shapes() {
    let h = mock().await;
    let body = |stream: bool| {
        json!({"model": "gpt-6.1-sol", "input": "Find it", "stream": stream,
               "service_tier": "priority", "tools": [{"type": "web_search"}]})
    };
    let headers = [
        ("x-mock-web-searches", "2"),
        ("x-mock-cache-write-tokens", "1"),
    ];
    let doc = post(&h, "/v1/responses", &headers, body(false))
        .await
        .json();
    assert_eq!(doc["service_tier"], "priority");
    let output = doc["output"].as_array().unwrap();
    let kinds: Vec<&str> = output.iter().map(|i| i["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["web_search_call", "web_search_call", "message"]);
    assert_eq!(output[0]["status"], "completed");
    assert_eq!(output[0]["action"]["type"], "search");
    assert_eq!(
        doc["usage"]["input_tokens_details"]["cache_write_tokens"],
        1
    );

    let events = post(&h, "/v1/responses", &headers, body(true))
        .await
        .events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let searches = [
        "response.output_item.added",
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.output_item.done",
    ];
    assert_eq!(names[..2], ["response.created", "response.in_progress"]);
    assert_eq!(names[2..7], searches);
    assert_eq!(names[7..12], searches);
    assert_eq!(names[12], "response.output_item.added");
    // The request's tier while in progress, the served one at the end.
    assert_eq!(events[0].1["response"]["service_tier"], "priority");
    let (last, done) = events.last().unwrap();
    assert_eq!(last.as_deref(), Some("response.completed"));
    assert_eq!(done["response"]["output"].as_array().unwrap().len(), 3);
    assert_eq!(done["response"]["service_tier"], "priority");
    // The answer's events point at its place after the searches.
    for (name, data) in &events {
        if name.as_deref() == Some("response.output_text.delta") {
            assert_eq!(data["output_index"], 2);
        }
    }
    for (i, (_, data)) in events.iter().enumerate() {
        assert_eq!(data["sequence_number"], i as u64);
    }
    h.shutdown().await;
}

#[tokio::test]
async fn anthropic_reports_write_lifetimes_searches_and_names() {
    let h = mock().await;
    let headers = [
        ("x-mock-cached-tokens", "100"),
        ("x-mock-cache-write-tokens", "30"),
        ("x-mock-cache-write-1h-tokens", "20"),
        ("x-mock-web-searches", "3"),
    ];
    let mut body = anthropic_body(false);
    body["speed"] = json!("fast");
    body["inference_geo"] = json!("us");
    let doc = post(&h, "/v1/messages", &headers, body.clone())
        .await
        .json();
    let u = &doc["usage"];
    assert_eq!(u["cache_creation_input_tokens"], 50);
    assert_eq!(
        u["cache_creation"],
        json!({"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20})
    );
    assert_eq!(u["server_tool_use"]["web_search_requests"], 3);
    assert_eq!(
        (&u["service_tier"], &u["speed"], &u["inference_geo"]),
        (&json!("standard"), &json!("fast"), &json!("us"))
    );

    body["stream"] = json!(true);
    let mut more = headers.to_vec();
    more.push(("x-mock-service-tier", "priority"));
    let events = post(&h, "/v1/messages", &more, body).await.events();
    let start = &events[0].1["message"]["usage"];
    // Searches run during the answer: none yet at the start, the total in message_delta.
    assert_eq!(start["server_tool_use"]["web_search_requests"], 0);
    assert_eq!(start["service_tier"], "priority");
    assert_eq!(start["cache_creation"]["ephemeral_1h_input_tokens"], 20);
    let delta = &events[events.len() - 2].1["usage"];
    assert_eq!(delta["server_tool_use"]["web_search_requests"], 3);
    assert_eq!(delta["cache_creation_input_tokens"], 50);
    assert_eq!(delta["input_tokens"], start["input_tokens"]);
    // No speed or region unless asked for.
    let plain = post(&h, "/v1/messages", &[], anthropic_body(false))
        .await
        .json();
    assert!(plain["usage"].get("speed").is_none());
    assert!(plain["usage"].get("inference_geo").is_none());
    assert!(plain["usage"].get("server_tool_use").is_none());
    h.shutdown().await;
}
