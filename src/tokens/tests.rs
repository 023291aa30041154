//! Request estimates checked against the OpenAI cookbook's chat framing (written out with
//! tiktoken-rs, the reference implementation), and robustness on odd JSON shapes.

use serde_json::{Value, json};
use tiktoken_rs::CoreBPE;

use super::*;

fn reference(enc: Encoding) -> &'static CoreBPE {
    match enc {
        Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
        Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
    }
}

fn tiktoken_count(enc: Encoding, text: &str) -> usize {
    reference(enc).encode_ordinary(text).len()
}

/// The OpenAI cookbook's `num_tokens_from_messages`, written out with tiktoken-rs: 3 per
/// message, every string value encoded, +1 per `name`, +3 reply priming.
fn cookbook_messages(enc: Encoding, messages: &Value) -> u64 {
    let mut n = 0;
    for m in messages.as_array().unwrap() {
        n += 3;
        for (k, v) in m.as_object().unwrap() {
            n += tiktoken_count(enc, v.as_str().unwrap()) as u64;
            if k == "name" {
                n += 1;
            }
        }
    }
    n + 3
}

fn cookbook_example() -> Value {
    json!([
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}
    ])
}

#[test]
fn chat_framing_matches_the_cookbook() {
    let messages = cookbook_example();
    for (model, enc) in [
        ("gpt-4o", Encoding::O200k),
        ("gpt-4-0613", Encoding::Cl100k),
    ] {
        let body = json!({"model": model, "messages": messages});
        assert_eq!(
            openai_chat_input(&body, enc),
            cookbook_messages(enc, &messages),
            "{model}"
        );
    }
    // The cookbook also prints what the API reported for this example: 124 prompt tokens for
    // gpt-4o / gpt-4o-mini and 129 for gpt-4 / gpt-3.5-turbo.
    let body = json!({"model": "gpt-4o", "messages": messages});
    assert_eq!(openai_chat_input(&body, Encoding::O200k), 124);
    assert_eq!(openai_chat_input(&body, Encoding::Cl100k), 129);
}

#[test]
fn chat_parts_tool_calls_and_images() {
    let enc = Encoding::O200k;
    let c = |s: &str| count(enc, s) as u64;
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}
        ]
    });
    let expected = REPLY_PRIMING
        + (3 + c("user") + c("What is in this image?") + 85 + 765)
        + (3 + c("assistant") + TOOL_CALL_OVERHEAD + c("get_weather") + c("{\"city\":\"Paris\"}"))
        + (3 + c("tool") + c("call_1") + c("sunny, 21C"));
    assert_eq!(openai_chat_input(&body, enc), expected);
}

#[test]
fn inline_images_are_measured() {
    // A 2048×4096 PNG header: 6 tiles → 85 + 6 × 170 on OpenAI; Anthropic caps at 1600.
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend(2048u32.to_be_bytes());
    png.extend(4096u32.to_be_bytes());
    png.extend([8, 6, 0, 0, 0, 0, 0, 0, 0]);
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(&png);
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}}
    ]}]});
    let c = |s: &str| count(Encoding::O200k, s) as u64;
    assert_eq!(
        openai_chat_input(&chat, Encoding::O200k),
        3 + 3 + c("user") + 1105
    );

    let anthropic = json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    ]}]});
    let c = |s: &str| count(Encoding::Cl100k, s) as u64;
    // 2048×4096 → 784×1568 → 1640 by area, capped at 1600.
    assert_eq!(
        anthropic_messages_input(&anthropic, Encoding::Cl100k),
        3 + 3 + c("user") + 1600
    );
}

/// The cookbook's tool-counting formula for gpt-4o (func_init 7, prop_init 3, prop_key 3,
/// enum_init -3, enum_item 3, func_end 12), which matched the API on its example.
fn cookbook_tools(enc: Encoding, tools: &Value) -> u64 {
    let c = |s: &str| tiktoken_count(enc, s) as i64;
    let mut n: i64 = 0;
    for tool in tools.as_array().unwrap() {
        let f = &tool["function"];
        n += 7;
        let desc = f["description"].as_str().unwrap().trim_end_matches('.');
        n += c(&format!("{}:{}", f["name"].as_str().unwrap(), desc));
        let props = f["parameters"]["properties"].as_object().unwrap();
        if !props.is_empty() {
            n += 3;
            for (key, p) in props {
                n += 3;
                if let Some(items) = p.get("enum").and_then(Value::as_array) {
                    n -= 3;
                    for item in items {
                        n += 3 + c(item.as_str().unwrap());
                    }
                }
                let pdesc = p["description"].as_str().unwrap().trim_end_matches('.');
                n += c(&format!("{key}:{}:{pdesc}", p["type"].as_str().unwrap()));
            }
        }
    }
    (n + 12) as u64
}

#[test]
fn tool_definitions_never_count_below_the_cookbook_formula() {
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
                },
                "required": ["location"]
            }
        }
    }]);
    let messages = json!([
        {"role": "system", "content": "You are a helpful assistant that can answer to follow up questions."},
        {"role": "user", "content": "What's the weather like in San Francisco?"}
    ]);
    let enc = Encoding::O200k;
    let with = openai_chat_input(&json!({"messages": messages, "tools": tools}), enc);
    let without = openai_chat_input(&json!({"messages": messages}), enc);
    assert_eq!(without, cookbook_messages(enc, &messages));
    let tool_part = with - without;
    let cookbook = cookbook_tools(enc, &tools);
    assert!(tool_part >= cookbook, "{tool_part} < cookbook {cookbook}");
    // ... and not absurdly above it: the JSON rendering stays within 2× on a typical schema.
    assert!(
        tool_part <= 2 * cookbook,
        "{tool_part} > 2 × cookbook {cookbook}"
    );
}

#[test]
fn responses_match_the_equivalent_chat_request() {
    let enc = Encoding::O200k;
    let responses = json!({"model": "gpt-5", "instructions": "Be brief.", "input": "Hi there"});
    let chat = json!({"model": "gpt-5", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"}
    ]});
    assert_eq!(
        openai_responses_input(&responses, enc),
        openai_chat_input(&chat, enc)
    );

    let items = json!({"model": "gpt-5", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                                     {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {"type": "item_reference", "id": "msg_1"}
    ], "tools": [{"type": "web_search"}]});
    let c = |s: &str| count(enc, s) as u64;
    let expected = REPLY_PRIMING
        + (3 + c("user") + c("Weather?") + 85)
        + (3 + TOOL_CALL_OVERHEAD + c("weather") + c("{}"))
        + (3 + c("rain"))
        + 3
        + (TOOL_OVERHEAD + c("{\"type\":\"web_search\"}") + TOOLS_OVERHEAD);
    assert_eq!(openai_responses_input(&items, enc), expected);
}

#[test]
fn completions_and_embeddings_bill_raw_tokens() {
    let enc = Encoding::Cl100k;
    let c = |s: &str| count(enc, s) as u64;
    assert_eq!(
        openai_embeddings_input(&json!({"input": "hello world"}), enc),
        c("hello world")
    );
    assert_eq!(
        openai_embeddings_input(&json!({"input": ["a cat", "a dog"]}), enc),
        c("a cat") + c("a dog")
    );
    assert_eq!(
        openai_embeddings_input(&json!({"input": [1, 2, 3]}), enc),
        3
    );
    assert_eq!(
        openai_embeddings_input(&json!({"input": [[1, 2], [3], []]}), enc),
        3
    );
    assert_eq!(
        openai_completions_input(
            &json!({"prompt": ["Once upon", "a time"], "suffix": "end"}),
            enc
        ),
        c("Once upon") + c("a time") + c("end")
    );
    assert_eq!(
        openai_completions_input(&json!({"prompt": [[5, 6, 7]]}), enc),
        3
    );
    assert_eq!(openai_completions_input(&json!({}), enc), 0);
}

#[test]
fn anthropic_blocks_tools_and_system() {
    let enc = Encoding::Cl100k;
    let c = |s: &str| count(enc, s) as u64;
    let tool = json!({"name": "get_weather", "description": "Weather for a city",
                      "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}});
    let body = json!({
        "model": "claude-sonnet-4-5",
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "tools": [tool],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Call the tool.", "signature": "sig"},
                {"type": "tool_use", "id": "tu_1", "name": "get_weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "tu_1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}}
            ]}
        ]
    });
    let tool_json = serde_json::to_string(&tool).unwrap();
    let expected = REPLY_PRIMING
        + (3 + c("You are terse."))
        + (3 + c("user") + c("Weather in Paris?"))
        + (3 + c("assistant") + c("Call the tool.") + c("get_weather") + c("{\"city\":\"Paris\"}"))
        + (3 + c("user") + c("18C") + c("notes"))
        + ANTHROPIC_TOOL_SYSTEM_AUTO
        + c(&tool_json);
    assert_eq!(anthropic_messages_input(&body, enc), expected);

    let mut forced = body.clone();
    forced["tool_choice"] = json!({"type": "any"});
    assert_eq!(
        anthropic_messages_input(&forced, enc),
        expected - ANTHROPIC_TOOL_SYSTEM_AUTO + ANTHROPIC_TOOL_SYSTEM_FORCED
    );
}

#[test]
fn unknown_parts_count_as_their_json_text() {
    let enc = Encoding::O200k;
    let c = |s: &str| count(enc, s) as u64;
    let part = json!({"type": "hologram", "payload": {"frames": 3}});
    let body = json!({"messages": [{"role": "user", "content": [part]}]});
    assert_eq!(
        openai_chat_input(&body, enc),
        3 + 3 + c("user") + c(&serde_json::to_string(&part).unwrap())
    );
    let block = json!({"type": "hologram", "frames": [1, 2]});
    let body = json!({"messages": [{"role": "user", "content": [block]}]});
    assert_eq!(
        anthropic_messages_input(&body, enc),
        3 + 3 + c("user") + c(&serde_json::to_string(&block).unwrap())
    );
}

#[test]
fn odd_shapes_do_not_panic() {
    let odd = [
        json!(null),
        json!(42),
        json!("just a string"),
        json!([1, "two", null]),
        json!({}),
        json!({"messages": null, "input": null, "prompt": null, "system": null, "tools": null}),
        json!({"messages": "not an array", "tools": "nope", "functions": 7}),
        json!({"messages": [null, 1, "x", [], {"role": 5, "content": 6, "name": false}]}),
        json!({"messages": [{"role": "user", "content": [null, 1, "s", [], {}, {"type": 9},
            {"type": "image_url"}, {"type": "image_url", "image_url": 3},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%%"}},
            {"type": "image_url", "image_url": {"url": "data:"}},
            {"type": "input_audio", "input_audio": "x"}, {"type": "input_audio"},
            {"type": "file"}, {"type": "file", "file": {"file_data": "data:application/pdf;base64,@@"}},
            {"type": "text", "text": {"nested": true}}]}]}),
        json!({"messages": [{"role": "assistant", "tool_calls": [null, 1, {"function": 3},
            {"function": {"name": null, "arguments": {"already": "parsed"}}}],
            "function_call": "weird", "audio": {"id": "a"}}]}),
        json!({"input": [null, 1, "s", {"type": "reasoning", "summary": "x", "encrypted_content": 5},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "t"}], "encrypted_content": "QUJD"},
            {"type": "message"}, {"type": "function_call_output", "output": [{"type": "input_text", "text": "x"}]},
            {"type": "computer_call", "action": {"x": 1}}], "instructions": ["odd"], "text": {"format": 3}}),
        json!({"input": {"an": "object"}, "instructions": 5, "text": "x"}),
        json!({"prompt": [null, true, {"a": 1}, [1, "x"], 3.5], "suffix": 4, "input": [[], [[1]], "s"]}),
        json!({"system": 5, "messages": [{"role": "user", "content": [null, 1,
            {"type": "image"}, {"type": "image", "source": {"type": "base64", "data": 7}},
            {"type": "image", "source": {"type": "base64", "data": "////"}},
            {"type": "document"}, {"type": "document", "source": {"type": "base64"}},
            {"type": "document", "source": {"type": "content", "content": "x"}},
            {"type": "document", "source": {"type": "url", "url": "https://x"}},
            {"type": "tool_result"}, {"type": "tool_result", "content": 5},
            {"type": "tool_use"}, {"type": "redacted_thinking", "data": "abcd"},
            {"type": "search_result", "content": 3}]}, {"content": "no role"}, "bare"],
            "tools": [1, null], "tool_choice": "any"}),
        json!({"tools": {"not": "an array"}, "messages": {"a": 1}}),
    ];
    let mut deep = json!("leaf");
    for _ in 0..100 {
        deep = json!({"type": "nest", "content": [deep]});
    }
    for body in odd.iter().chain(std::iter::once(
        &json!({"messages": [{"role": "user", "content": [deep.clone()]}], "input": [deep]}),
    )) {
        for enc in [Encoding::O200k, Encoding::Cl100k] {
            let chat = openai_chat_input(body, enc);
            let responses = openai_responses_input(body, enc);
            let anthropic = anthropic_messages_input(body, enc);
            // Every chat-shaped estimate includes at least the reply priming.
            assert!(
                chat >= REPLY_PRIMING && responses >= REPLY_PRIMING && anthropic >= REPLY_PRIMING
            );
            // Raw-token routes never exceed the JSON text of the whole body by much: each
            // element costs at most its own text (or 1 per token id).
            let all = count(enc, &serde_json::to_string(body).unwrap()) as u64;
            assert!(openai_embeddings_input(body, enc) <= all);
            assert!(openai_completions_input(body, enc) <= all);
        }
    }
}
