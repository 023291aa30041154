//! Every parser that reads bytes an outsider chose, fed hostile input: the request JSON
//! parser and input estimator, the response meter and its SSE parser, limit specs, the
//! config file, and the auth headers. (The admin router and its query strings are fuzzed
//! beside their private code, in `src/admin/mod.rs`.)
//!
//! The properties: no input panics; every input is answered (`Ok` or an error) within the
//! case's time, with inputs of bounded size so an unbounded loop or allocation shows up as
//! a hang or an abort; and what is accepted is well-formed (a forwarded body is JSON, a
//! model name is bounded, a limit spec round-trips, passed-through bytes are unchanged).
//! A few thousand cases per parser keep the suite within seconds of `make test`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tollgate::api::ApiFormat;
use tollgate::api::meter::Meter;
use tollgate::api::sse::SseParser;
use tollgate::auth::presented_secret;
use tollgate::config::Config;
use tollgate::engine::{MAX_MODEL_LEN, parse_request};
use tollgate::quota::limit::LimitSpec;

const FORMATS: [ApiFormat; 5] = [
    ApiFormat::OpenAiChat,
    ApiFormat::OpenAiResponses,
    ApiFormat::OpenAiCompletions,
    ApiFormat::OpenAiEmbeddings,
    ApiFormat::AnthropicMessages,
];

fn format() -> impl Strategy<Value = ApiFormat> {
    prop::sample::select(FORMATS.to_vec())
}

/// Strings an attacker would try: empty, huge-ish, control characters, escapes, unicode,
/// numbers as text, the image/data-URL shapes the estimator looks into.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9-]{1,20}",
        "\\PC{0,40}",
        ".{0,30}",
        "[\\x00-\\x1f\\x7f]{1,5}",
        Just("gpt-4o-mini".to_string()),
        Just("claude-3-5-haiku-20241022".to_string()),
        Just(
            "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
                .to_string()
        ),
        Just("data:image/png;base64,!!!!".to_string()),
        Just("x".repeat(MAX_MODEL_LEN + 1)),
        Just("9".repeat(400)),
    ]
}

/// Keys the request formats look at, and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "model",
            "messages",
            "content",
            "role",
            "text",
            "type",
            "input",
            "prompt",
            "tools",
            "tool_calls",
            "function",
            "arguments",
            "name",
            "system",
            "stream",
            "stream_options",
            "include_usage",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
            "n",
            "best_of",
            "image_url",
            "url",
            "source",
            "data",
            "media_type",
            "detail",
            "instructions",
            "input_schema",
            "parameters",
        ])
        .prop_map(str::to_string),
        "[a-z_]{1,8}",
    ]
}

/// JSON values of bounded size and depth, biased toward the shapes the parsers walk.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A request-shaped object: top-level keys the formats know, values anything.
fn request_value() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop_oneof![
            hostile_string().prop_map(Value::String),
            json_value()
        ]),
        prop::collection::vec((key(), json_value()), 0..8),
    )
        .prop_map(|(model, rest)| {
            let mut m: Map<String, Value> = rest.into_iter().collect();
            if let Some(model) = model {
                m.insert("model".into(), model);
            }
            Value::Object(m)
        })
}

/// Valid bodies of every format, to be cut and corrupted.
const TEMPLATES: &[&str] = &[
    r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":50,"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo=","detail":"high"}}]}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}"#,
    r#"{"model":"gpt-4o-mini","input":[{"role":"user","content":[{"type":"input_text","text":"hello"}]}],"instructions":"x","max_output_tokens":20,"stream":true}"#,
    r#"{"model":"gpt-3.5-turbo-instruct","prompt":["a","b"],"max_tokens":5,"n":3,"best_of":4}"#,
    r#"{"model":"text-embedding-3-small","input":[[1,2,3],"text"]}"#,
    r#"{"model":"claude-3-5-haiku-20241022","max_tokens":30,"system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="}},{"type":"tool_result","content":"r"}]}],"stream":true}"#,
];

/// Check what `parse_request` promises about anything it accepts.
fn check_parsed(format: ApiFormat, body: &[u8]) -> Result<(), TestCaseError> {
    match parse_request(format, Bytes::copy_from_slice(body), 4096) {
        Ok(p) => {
            prop_assert!(!p.model.is_empty() && p.model.len() <= MAX_MODEL_LEN);
            prop_assert!(!p.model.chars().any(char::is_control), "{:?}", p.model);
            let forwarded: Value = serde_json::from_slice(&p.body)
                .map_err(|e| TestCaseError::fail(format!("forwarded body is not JSON: {e}")))?;
            prop_assert_eq!(forwarded["model"].as_str(), Some(p.model.as_str()));
            if !p.hide_usage {
                prop_assert_eq!(
                    p.body.as_ref(),
                    body,
                    "a body is rewritten only to add usage"
                );
            }
        }
        Err(e) => prop_assert_eq!(e.status(), 400, "{}", e.message),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn request_parser_takes_any_bytes(format in format(), body in prop::collection::vec(any::<u8>(), 0..300)) {
        check_parsed(format, &body)?;
    }

    #[test]
    fn request_parser_takes_any_json(format in format(), v in request_value()) {
        check_parsed(format, &serde_json::to_vec(&v).unwrap())?;
    }

    #[test]
    fn request_parser_takes_cut_and_corrupted_bodies(
        format in format(),
        template in prop::sample::select(TEMPLATES.to_vec()),
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut body = template.as_bytes().to_vec();
        for (at, byte) in flips {
            let i = at.index(body.len());
            body[i] = byte;
        }
        let keep = cut.index(body.len() + 1);
        check_parsed(format, &body)?;
        check_parsed(format, &body[..keep])?;
    }

    #[test]
    fn request_parser_bounds_nesting(format in format(), depth in 100usize..3000, open in prop::sample::select(vec!["[", "{\"a\":"])) {
        let close = if open == "[" { "]" } else { "}" };
        let body = format!(r#"{{"model":"gpt-4o","messages":{}1{}}}"#, open.repeat(depth), close.repeat(depth));
        let r = parse_request(format, Bytes::from(body), 100);
        if depth > 130 {
            prop_assert!(r.is_err(), "nesting of {} accepted", depth);
        }
    }
}

/// Run `input` through a meter in the given pieces; returns the bytes it let through.
fn meter_run(format: ApiFormat, stream: bool, hide: bool, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut meter = Meter::new(format, stream, hide);
    let mut out = Vec::new();
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.sort_unstable();
    points.push(input.len());
    for end in points {
        if end < start {
            continue;
        }
        out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(&input[start..end])));
        start = end;
    }
    let (tail, _report) = meter.finish();
    out.extend_from_slice(&tail);
    out
}

/// Byte soup with the SSE and JSON pieces the meter reacts to.
fn sse_soup() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"event: ".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b":comment\n".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#.to_vec()),
        Just(br#"{"type":"message_delta","usage":{"output_tokens":-1}}"#.to_vec()),
        Just(br#"{"type":"response.completed","response":{"usage":{"input_tokens":1e308}}}"#.to_vec()),
        Just(br#"{"choices":[{"delta":{"content":"hi","tool_calls":[{"function":{"arguments":"{"}}]}}]}"#.to_vec()),
        Just(vec![0xEF, 0xBB, 0xBF]),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// The meter never panics on anything an upstream sends, in any chunking, and without
    /// usage hiding lets every byte through unchanged.
    #[test]
    fn meter_takes_any_upstream_bytes(
        format in format(),
        stream in any::<bool>(),
        hide in any::<bool>(),
        input in prop_oneof![sse_soup(), prop::collection::vec(any::<u8>(), 0..400)],
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let out = meter_run(format, stream, hide, &input, &cuts);
        let hides = hide && stream && matches!(format, ApiFormat::OpenAiChat | ApiFormat::OpenAiCompletions);
        if hides {
            prop_assert!(out.len() <= input.len());
        } else {
            prop_assert_eq!(out, input);
        }
    }

    /// The SSE parser's events never exceed its line bound, whatever arrives.
    #[test]
    fn sse_parser_bounds_events(
        input in prop_oneof![sse_soup(), prop::collection::vec(any::<u8>(), 0..400)],
        max in 1usize..64,
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut parser = SseParser::new(max);
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.sort_unstable();
        points.push(input.len());
        let mut start = 0;
        let mut longest = 0;
        for end in points {
            if end < start {
                continue;
            }
            parser.feed(&input[start..end], &mut |ev| longest = longest.max(ev.data.len()));
            start = end;
        }
        parser.finish(&mut |ev| longest = longest.max(ev.data.len()));
        prop_assert!(longest <= max, "an event of {} bytes passed a bound of {}", longest, max);
    }

    /// Limit specs from any text: no panic, and what is accepted is canonical on display.
    #[test]
    fn limit_specs_take_any_text(
        text in prop_oneof![
            ".{0,40}",
            "(requests|tokens|usd|input_tokens|output_tokens|x)?:(minute|day|total|[0-9]{1,25}[mhd]|)(@[a-z]{0,5})?=[-0-9.e+]{0,30}",
        ]
    ) {
        if let Ok(spec) = text.parse::<LimitSpec>() {
            let shown = spec.to_string();
            prop_assert_eq!(shown.parse::<LimitSpec>(), Ok(spec), "{}", shown);
        }
    }

    /// Credentials from any header bytes: no panic; a presented secret is trimmed and
    /// non-empty.
    #[test]
    fn auth_headers_take_any_bytes(
        authorization in prop::option::of(prop::collection::vec(any::<u8>(), 0..60)),
        x_api_key in prop::option::of(prop_oneof![
            prop::collection::vec(any::<u8>(), 0..60),
            "(Bearer|bearer|Basic)? {0,3}(tg_[a-zA-Z0-9]{0,10})? {0,3}".prop_map(String::into_bytes),
        ]),
    ) {
        if let Ok(secret) = presented_secret(authorization.as_deref(), x_api_key.as_deref()) {
            prop_assert!(!secret.is_empty());
            prop_assert_eq!(secret, secret.trim());
        }
    }
}

/// A valid config touching every section, to be cut and corrupted.
const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9091"
admin_token = "${ADMIN:-0123456789abcdef0123}"
max_request_body = "10MiB"
admin_hosts = ["admin.internal"]
header_timeout = "10s"

[storage]
mode = "shared"
redis_url = "redis://:pw@127.0.0.1:6379"
postgres_url = "postgres://u:pw@127.0.0.1/db"

[quota]
timezone = "Europe/Berlin"
reservation_ttl = "10m"

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${OPENAI_API_KEY:-sk-x}"
forward_headers = ["OpenAI-Project"]

[plans.free]
limits = ["requests:minute=20", "usd:month=5"]

[prices."gpt-4o-mini"]
input = 0.15
output = "0.60"

[alerts]
thresholds = [80, 100]
webhook = "https://hooks.example/x"

[log]
level = "info"
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    /// The config reader answers any text with a config or a list of issues, each with a
    /// key path, and never repeats a secret from the environment in them.
    #[test]
    fn config_takes_any_text(
        text in prop_oneof![
            ".{0,200}",
            (any::<prop::sample::Index>(), prop::collection::vec((any::<prop::sample::Index>(), "[\\x00-\\x7f]{0,3}"), 0..5))
                .prop_map(|(cut, edits)| {
                    let mut s = CONFIG.to_string();
                    for (at, with) in edits {
                        let mut i = at.index(s.len());
                        while !s.is_char_boundary(i) {
                            i -= 1;
                        }
                        s.insert_str(i, &with);
                    }
                    let mut keep = cut.index(s.len() + 1);
                    while !s.is_char_boundary(keep) {
                        keep -= 1;
                    }
                    s.truncate(keep);
                    s
                }),
        ]
    ) {
        let env = |k: &str| match k {
            "ADMIN" => Some("env-admin-secret-0123456789".to_string()),
            _ => None,
        };
        match Config::parse(&text, "c.toml", &env) {
            Ok(c) => {
                let shown = c.redacted_json().to_string();
                prop_assert!(!shown.contains("env-admin-secret"));
                prop_assert!(!shown.contains(":pw@"), "{}", shown);
            }
            Err(e) => {
                let shown = e.to_string();
                prop_assert!(!shown.contains("env-admin-secret"), "{}", shown);
            }
        }
    }
}
