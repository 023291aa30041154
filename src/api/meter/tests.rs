//! Meter tests over captured-style streams of every format.

use super::*;
use crate::api::sse::tests::split_at;
use proptest::prelude::*;

/// An event stream as blocks of lines; each block is followed by a blank line.
type Fixture = &'static [&'static [&'static str]];

const CHAT_TEXT: Fixture = &[
    &[
        r#"data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1731000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1731000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1731000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{"content":" wörld 🎉 \"quoted\"\n"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1731000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{"content":"世界"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1731000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-B9x","object":"chat.completion.chunk","created":1731000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[],"usage":{"prompt_tokens":1200,"completion_tokens":9,"total_tokens":1209,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
    ],
    &["data: [DONE]"],
];
/// Index of the usage block in [`CHAT_TEXT`].
const CHAT_TEXT_USAGE: usize = 5;
const CHAT_TEXT_OUT: &str = "Hello wörld 🎉 \"quoted\"\n世界";

const CHAT_TOOLS: Fixture = &[
    &[
        r#"data: {"id":"chatcmpl-C1","object":"chat.completion.chunk","created":1731000001,"model":"o4-mini-2025-04-16","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_Kp2","type":"function","function":{"name":"get_weather","arguments":""}}],"refusal":null},"finish_reason":null}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-C1","object":"chat.completion.chunk","created":1731000001,"model":"o4-mini-2025-04-16","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"loc"}}]},"finish_reason":null}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-C1","object":"chat.completion.chunk","created":1731000001,"model":"o4-mini-2025-04-16","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ation\":\"Paris\"}"}}]},"finish_reason":null}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-C1","object":"chat.completion.chunk","created":1731000001,"model":"o4-mini-2025-04-16","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-C1","object":"chat.completion.chunk","created":1731000001,"model":"o4-mini-2025-04-16","choices":[],"usage":{"prompt_tokens":310,"completion_tokens":150,"total_tokens":460,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":128}}}"#,
    ],
    &["data: [DONE]"],
];

/// A DeepSeek-style stream with `reasoning_content`, CRLF endings and a keep-alive comment.
const CHAT_REASONING_CRLF: &str = concat!(
    ": keep-alive\r\n\r\n",
    "data: {\"id\":\"r1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"reasoning_content\":\"Think\"},\"finish_reason\":null}]}\r\n\r\n",
    "data: {\"id\":\"r1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Answer\",\"reasoning_content\":null},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":40,\"total_tokens\":52,\"prompt_tokens_details\":{\"cached_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":30}}}\r\n\r\n",
    "data: [DONE]\r\n\r\n",
);

const CHAT_ERROR: Fixture = &[
    &[
        r#"data: {"id":"chatcmpl-E","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Partial"},"finish_reason":null}],"usage":null}"#,
    ],
    &[
        r#"data: {"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#,
    ],
];

const COMPLETIONS_STREAM: Fixture = &[
    &[
        r#"data: {"id":"cmpl-1","object":"text_completion","created":1731000002,"choices":[{"text":"Once upon","index":0,"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct","usage":null}"#,
    ],
    &[
        r#"data: {"id":"cmpl-1","object":"text_completion","created":1731000002,"choices":[{"text":" a time","index":0,"logprobs":null,"finish_reason":"length"}],"model":"gpt-3.5-turbo-instruct","usage":null}"#,
    ],
    &[
        r#"data: {"id":"cmpl-1","object":"text_completion","created":1731000002,"choices":[],"model":"gpt-3.5-turbo-instruct","usage":{"prompt_tokens":5,"completion_tokens":4,"total_tokens":9}}"#,
    ],
    &["data: [DONE]"],
];

const RESPONSES: Fixture = &[
    &[
        "event: response.created",
        r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c","object":"response","created_at":1741290958,"status":"in_progress","model":"o4-mini-2025-04-16","output":[],"usage":null}}"#,
    ],
    &[
        "event: response.in_progress",
        r#"data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_67c","object":"response","status":"in_progress","output":[],"usage":null}}"#,
    ],
    &[
        "event: response.output_item.added",
        r#"data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"rs_1","type":"reasoning","summary":[]}}"#,
    ],
    &[
        "event: response.reasoning_summary_text.delta",
        r#"data: {"type":"response.reasoning_summary_text.delta","sequence_number":3,"item_id":"rs_1","output_index":0,"summary_index":0,"delta":"Weighing options. "}"#,
    ],
    &[
        "event: response.output_text.delta",
        r#"data: {"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_1","output_index":1,"content_index":0,"delta":"Hi","logprobs":[]}"#,
    ],
    &[
        "event: response.output_text.delta",
        r#"data: {"type":"response.output_text.delta","sequence_number":6,"item_id":"msg_1","output_index":1,"content_index":0,"delta":" there, \"friend\" ✓","logprobs":[]}"#,
    ],
    &[
        "event: response.output_text.done",
        r#"data: {"type":"response.output_text.done","sequence_number":7,"item_id":"msg_1","output_index":1,"content_index":0,"text":"Hi there, \"friend\" ✓","logprobs":[]}"#,
    ],
    &[
        "event: response.function_call_arguments.delta",
        r#"data: {"type":"response.function_call_arguments.delta","sequence_number":9,"item_id":"fc_1","output_index":2,"delta":"{\"city\":"}"#,
    ],
    &[
        "event: response.function_call_arguments.delta",
        r#"data: {"type":"response.function_call_arguments.delta","sequence_number":10,"item_id":"fc_1","output_index":2,"delta":"\"Oslo\"}"}"#,
    ],
    &[
        "event: response.function_call_arguments.done",
        r#"data: {"type":"response.function_call_arguments.done","sequence_number":11,"item_id":"fc_1","output_index":2,"arguments":"{\"city\":\"Oslo\"}"}"#,
    ],
    &[
        "event: response.completed",
        r#"data: {"type":"response.completed","sequence_number":12,"response":{"id":"resp_67c","object":"response","status":"completed","model":"o4-mini-2025-04-16","output":[{"id":"rs_1","type":"reasoning","summary":[{"type":"summary_text","text":"Weighing options. "}]},{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"output_text","text":"Hi there, \"friend\" ✓","annotations":[]}]},{"id":"fc_1","type":"function_call","name":"weather","arguments":"{\"city\":\"Oslo\"}"}],"usage":{"input_tokens":2000,"input_tokens_details":{"cached_tokens":1536},"output_tokens":300,"output_tokens_details":{"reasoning_tokens":256},"total_tokens":2300}}}"#,
    ],
];
const RESPONSES_OUT: &str = "Weighing options. Hi there, \"friend\" ✓{\"city\":\"Oslo\"}";

const ANTHROPIC: Fixture = &[
    &[
        "event: message_start",
        r#"data: {"type":"message_start","message":{"id":"msg_01XF","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":1000,"cache_read_input_tokens":3000,"cache_creation":{"ephemeral_5m_input_tokens":1000,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}"#,
    ],
    &[
        "event: content_block_start",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}"#,
    ],
    &["event: ping", r#"data: {"type": "ping"}"#],
    &[
        "event: content_block_delta",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Let me check. "}}"#,
    ],
    &[
        "event: content_block_delta",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}"#,
    ],
    &[
        "event: content_block_stop",
        r#"data: {"type":"content_block_stop","index":0}"#,
    ],
    &[
        "event: content_block_start",
        r#"data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}"#,
    ],
    &[
        "event: content_block_delta",
        r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Bonjour ☀ "}}"#,
    ],
    &[
        "event: content_block_stop",
        r#"data: {"type":"content_block_stop","index":1}"#,
    ],
    &[
        "event: content_block_start",
        r#"data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01T1","name":"get_weather","input":{}}}"#,
    ],
    &[
        "event: content_block_delta",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}"#,
    ],
    &[
        "event: content_block_delta",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"Par"}}"#,
    ],
    &[
        "event: content_block_delta",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"is\"}"}}"#,
    ],
    &[
        "event: content_block_stop",
        r#"data: {"type":"content_block_stop","index":2}"#,
    ],
    &[
        "event: message_delta",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}"#,
    ],
    &["event: message_stop", r#"data: {"type":"message_stop"}"#],
];
const ANTHROPIC_OUT: &str = "Let me check. Bonjour ☀ {\"location\": \"Paris\"}";

fn join(blocks: &[&[&str]]) -> String {
    let mut s = String::new();
    for block in blocks {
        for line in *block {
            s.push_str(line);
            s.push('\n');
        }
        s.push('\n');
    }
    s
}

/// Feeds `chunks` and returns each returned piece, the bytes flushed by finish, and the report.
fn run_chunks(
    format: ApiFormat,
    stream: bool,
    hide: bool,
    chunks: &[Bytes],
) -> (Vec<Bytes>, Bytes, MeterReport) {
    let mut meter = Meter::new(format, stream, hide);
    let outs = chunks.iter().map(|c| meter.feed(c.clone())).collect();
    let (rest, report) = meter.finish();
    (outs, rest, report)
}

/// Feeds `input` in one chunk; returns the client bytes and the report.
fn run(format: ApiFormat, stream: bool, hide: bool, input: &[u8]) -> (Vec<u8>, MeterReport) {
    let chunks = [Bytes::copy_from_slice(input)];
    let (outs, rest, report) = run_chunks(format, stream, hide, &chunks);
    (concat_out(&outs, &rest), report)
}

fn concat_out(outs: &[Bytes], rest: &Bytes) -> Vec<u8> {
    let mut all: Vec<u8> = outs.iter().flat_map(|b| b.to_vec()).collect();
    all.extend_from_slice(rest);
    all
}

fn usage(input: u64, cached: u64, write: u64, output: u64, reasoning: u64) -> Usage {
    Usage {
        input_tokens: input,
        cached_input_tokens: cached,
        cache_write_tokens: write,
        output_tokens: output,
        reasoning_tokens: reasoning,
        ..Usage::default()
    }
}

/// `u` served at service tier `name`.
fn tier(mut u: Usage, name: &str) -> Usage {
    u.served.service_tier = Some(name.to_owned());
    u
}

#[test]
fn meter_can_live_in_a_proxy_context() {
    // Pingora keeps per-request state across await points on a multi-threaded runtime.
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Meter>();
    send_sync::<MeterReport>();
}

#[test]
fn chat_stream_text_with_cached_tokens() {
    let input = join(CHAT_TEXT);
    let (out, r) = run(ApiFormat::OpenAiChat, true, false, input.as_bytes());
    assert_eq!(out, input.as_bytes());
    assert_eq!(r.usage, usage(1200, 1024, 0, 9, 0));
    assert!(r.input_reported && r.output_reported && r.finished);
    assert!(!r.upstream_error);
    assert_eq!(r.output_text, CHAT_TEXT_OUT);
    assert_eq!(r.parse_errors, 0);
}

#[test]
fn chat_stream_hide_removes_exactly_the_usage_event() {
    let input = join(CHAT_TEXT);
    let (out, r) = run(ApiFormat::OpenAiChat, true, true, input.as_bytes());
    let mut expected = CHAT_TEXT.to_vec();
    expected.remove(CHAT_TEXT_USAGE);
    assert_eq!(String::from_utf8(out).unwrap(), join(&expected));
    // The usage is still metered.
    assert_eq!(r.usage, usage(1200, 1024, 0, 9, 0));
    assert!(r.finished);
}

#[test]
fn chat_stream_tool_calls_and_reasoning_tokens() {
    let input = join(CHAT_TOOLS);
    let (out, r) = run(ApiFormat::OpenAiChat, true, false, input.as_bytes());
    assert_eq!(out, input.as_bytes());
    assert_eq!(r.usage, usage(310, 0, 0, 150, 128));
    assert_eq!(r.output_text, r#"{"location":"Paris"}"#);
    assert!(r.finished);
}

#[test]
fn chat_stream_reasoning_content_crlf_usage_in_last_choice_chunk() {
    let input = CHAT_REASONING_CRLF.as_bytes();
    let (out, r) = run(ApiFormat::OpenAiChat, true, true, input);
    // The usage rides on a chunk that also has a choice: it is content, so nothing is hidden.
    assert_eq!(out, input);
    assert_eq!(r.usage, usage(12, 0, 0, 40, 30));
    assert_eq!(r.output_text, "ThinkAnswer");
    assert!(r.finished);
}

#[test]
fn chat_stream_without_usage_chunk() {
    let mut blocks = CHAT_TEXT.to_vec();
    blocks.remove(CHAT_TEXT_USAGE);
    let input = join(&blocks);
    let (out, r) = run(ApiFormat::OpenAiChat, true, true, input.as_bytes());
    assert_eq!(out, input.as_bytes());
    assert!(!r.input_reported && !r.output_reported);
    assert_eq!(r.usage, Usage::default());
    assert_eq!(r.output_text, CHAT_TEXT_OUT);
    assert!(r.finished);
}

#[test]
fn chat_stream_mid_stream_error() {
    let input = join(CHAT_ERROR);
    let (out, r) = run(ApiFormat::OpenAiChat, true, true, input.as_bytes());
    assert_eq!(out, input.as_bytes());
    assert!(r.upstream_error);
    assert!(!r.finished);
    assert!(!r.output_reported);
    assert_eq!(r.output_text, "Partial");
}

#[test]
fn chat_stream_truncated_mid_event() {
    let input = join(CHAT_TEXT);
    let cut = input.find("世界").unwrap();
    let truncated = &input.as_bytes()[..cut];
    for hide in [false, true] {
        let (out, r) = run(ApiFormat::OpenAiChat, true, hide, truncated);
        // Even when hiding, an incomplete event is flushed at finish, not swallowed.
        assert_eq!(out, truncated);
        assert!(!r.finished && !r.input_reported && !r.output_reported);
        assert_eq!(r.output_text, "Hello wörld 🎉 \"quoted\"\n");
    }
}

#[test]
fn completions_stream_text_and_usage_hidden() {
    let input = join(COMPLETIONS_STREAM);
    let (out, r) = run(ApiFormat::OpenAiCompletions, true, true, input.as_bytes());
    let mut expected = COMPLETIONS_STREAM.to_vec();
    expected.remove(2);
    assert_eq!(out, join(&expected).as_bytes());
    assert_eq!(r.usage, usage(5, 0, 0, 4, 0));
    assert_eq!(r.output_text, "Once upon a time");
    assert!(r.finished);
}

#[test]
fn responses_stream_reasoning_cached_and_function_call() {
    let input = join(RESPONSES);
    // hide is ignored outside chat/completions.
    let (out, r) = run(ApiFormat::OpenAiResponses, true, true, input.as_bytes());
    assert_eq!(out, input.as_bytes());
    assert_eq!(r.usage, usage(2000, 1536, 0, 300, 256));
    assert_eq!(r.output_text, RESPONSES_OUT);
    assert!(r.finished && r.input_reported && r.output_reported && !r.upstream_error);
}

#[test]
fn responses_stream_without_event_lines_uses_the_type_field() {
    let blocks: Vec<Vec<&str>> = RESPONSES.iter().map(|b| b[1..].to_vec()).collect();
    let refs: Vec<&[&str]> = blocks.iter().map(Vec::as_slice).collect();
    let (_, r) = run(
        ApiFormat::OpenAiResponses,
        true,
        false,
        join(&refs).as_bytes(),
    );
    assert_eq!(r.usage, usage(2000, 1536, 0, 300, 256));
    assert_eq!(r.output_text, RESPONSES_OUT);
    assert!(r.finished);
}

#[test]
fn responses_stream_error_event_and_failed() {
    let input = concat!(
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Par\"}\n\n",
        "event: error\n",
        "data: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"The model failed.\",\"param\":null,\"sequence_number\":4}\n\n",
    );
    let (_, r) = run(ApiFormat::OpenAiResponses, true, false, input.as_bytes());
    assert!(r.upstream_error && !r.finished && !r.input_reported);
    assert_eq!(r.output_text, "Par");

    let failed = concat!(
        "event: response.failed\n",
        "data: {\"type\":\"response.failed\",\"response\":{\"id\":\"resp_1\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"boom\"},\"usage\":null}}\n\n",
    );
    let (_, r) = run(ApiFormat::OpenAiResponses, true, false, failed.as_bytes());
    assert!(r.upstream_error && r.finished && !r.input_reported);
}

#[test]
fn responses_stream_incomplete_is_terminal_with_usage() {
    let input = concat!(
        "event: response.incomplete\n",
        "data: {\"type\":\"response.incomplete\",\"response\":{\"status\":\"incomplete\",\"incomplete_details\":{\"reason\":\"max_output_tokens\"},\"error\":null,\"usage\":{\"input_tokens\":10,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":64,\"output_tokens_details\":{\"reasoning_tokens\":64}}}}\n\n",
    );
    let (_, r) = run(ApiFormat::OpenAiResponses, true, false, input.as_bytes());
    assert!(r.finished && !r.upstream_error);
    assert_eq!(r.usage, usage(10, 0, 0, 64, 64));
}

#[test]
fn anthropic_stream_thinking_text_tool_use_and_cache() {
    let input = join(ANTHROPIC);
    let (out, r) = run(ApiFormat::AnthropicMessages, true, false, input.as_bytes());
    assert_eq!(out, input.as_bytes());
    // input = 25 uncached + 3000 cache reads + 1000 cache writes.
    assert_eq!(r.usage, tier(usage(4025, 3000, 1000, 89, 0), "standard"));
    assert_eq!(r.output_text, ANTHROPIC_OUT);
    assert!(r.finished && r.input_reported && r.output_reported && !r.upstream_error);
}

#[test]
fn anthropic_output_tokens_are_cumulative_and_input_updates_are_taken() {
    let input = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":100,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":40}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":180,\"cache_read_input_tokens\":20,\"output_tokens\":95}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );
    let (_, r) = run(ApiFormat::AnthropicMessages, true, false, input.as_bytes());
    assert_eq!(r.usage, usage(200, 20, 0, 95, 0));
    assert!(r.finished);
}

#[test]
fn anthropic_stream_cut_before_message_delta_reports_input_only() {
    let input = join(&ANTHROPIC[..8]);
    let (_, r) = run(ApiFormat::AnthropicMessages, true, false, input.as_bytes());
    assert!(r.input_reported && !r.output_reported && !r.finished);
    // The placeholder output_tokens of message_start is not reported as output.
    assert_eq!(r.usage, tier(usage(4025, 3000, 1000, 0, 0), "standard"));
    assert_eq!(r.output_text, "Let me check. Bonjour ☀ ");
}

#[test]
fn anthropic_stream_error_event() {
    let input = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n",
        "event: error\n",
        "data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    );
    let (_, r) = run(ApiFormat::AnthropicMessages, true, false, input.as_bytes());
    assert!(r.upstream_error && !r.finished);
    assert_eq!(r.usage, usage(7, 0, 0, 0, 0));
}

#[test]
fn non_stream_chat_with_tool_calls() {
    let body = r#"{"id":"chatcmpl-D","object":"chat.completion","created":1731000003,"model":"gpt-4o-2024-08-06",
        "choices":[{"index":0,"message":{"role":"assistant","content":"Checking.","tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Rome\"}"}}],"refusal":null},"logprobs":null,"finish_reason":"tool_calls"}],
        "usage":{"prompt_tokens":82,"completion_tokens":17,"total_tokens":99,"prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}},
        "service_tier":"default","system_fingerprint":"fp_1"}"#;
    let chunks: Vec<Bytes> = body
        .as_bytes()
        .chunks(37)
        .map(Bytes::copy_from_slice)
        .collect();
    let (outs, rest, r) = run_chunks(ApiFormat::OpenAiChat, false, true, &chunks);
    assert_eq!(outs, chunks);
    assert!(rest.is_empty());
    assert_eq!(r.usage, tier(usage(82, 64, 0, 17, 0), "default"));
    assert_eq!(r.output_text, "Checking.{\"city\":\"Rome\"}");
    assert!(r.finished && r.input_reported && r.output_reported);
}

#[test]
fn non_stream_completions_and_embeddings() {
    let completions = r#"{"id":"cmpl-2","object":"text_completion","choices":[{"text":"\n\nThis is a test.","index":0,"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
    let (_, r) = run(
        ApiFormat::OpenAiCompletions,
        false,
        false,
        completions.as_bytes(),
    );
    assert_eq!(r.usage, usage(5, 0, 0, 7, 0));
    assert_eq!(r.output_text, "\n\nThis is a test.");

    let embeddings = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292,-0.0028842222]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    // Embeddings never stream: a stream flag is ignored.
    let (out, r) = run(
        ApiFormat::OpenAiEmbeddings,
        true,
        true,
        embeddings.as_bytes(),
    );
    assert_eq!(out, embeddings.as_bytes());
    assert_eq!(r.usage, usage(8, 0, 0, 0, 0));
    assert!(r.input_reported && r.output_reported && r.finished);
    assert_eq!(r.output_text, "");
}

#[test]
fn non_stream_responses() {
    let body = r#"{"id":"resp_2","object":"response","status":"completed","error":null,
        "output":[{"id":"rs_1","type":"reasoning","summary":[{"type":"summary_text","text":"Plan. "}]},
                  {"id":"msg_1","type":"message","role":"assistant","content":[{"type":"output_text","text":"Done.","annotations":[]}]},
                  {"id":"fc_1","type":"function_call","call_id":"call_1","name":"f","arguments":"{\"a\":1}"}],
        "usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":123}}"#;
    let (_, r) = run(ApiFormat::OpenAiResponses, false, false, body.as_bytes());
    assert_eq!(r.usage, usage(36, 0, 0, 87, 64));
    assert_eq!(r.output_text, "Plan. Done.{\"a\":1}");
    assert!(r.finished && !r.upstream_error);
}

#[test]
fn non_stream_anthropic() {
    let body = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-opus-4-1",
        "content":[{"type":"thinking","thinking":"Hmm.","signature":"sig"},{"type":"text","text":"Sure."},
                   {"type":"tool_use","id":"toolu_1","name":"lookup","input":{"q":"tides"}}],
        "stop_reason":"tool_use","stop_sequence":null,
        "usage":{"input_tokens":50,"cache_creation_input_tokens":200,"cache_read_input_tokens":800,"output_tokens":120}}"#;
    let (_, r) = run(ApiFormat::AnthropicMessages, false, false, body.as_bytes());
    assert_eq!(r.usage, usage(1050, 800, 200, 120, 0));
    assert_eq!(r.output_text, "Hmm.Sure.{\"q\":\"tides\"}");
    assert!(r.finished && r.input_reported && r.output_reported);
}

#[test]
fn non_stream_error_bodies_and_garbage() {
    let (_, r) = run(
        ApiFormat::AnthropicMessages,
        false,
        false,
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );
    assert!(r.upstream_error && !r.input_reported);
    let (_, r) = run(
        ApiFormat::OpenAiChat,
        false,
        false,
        b"<html>502 Bad Gateway</html>",
    );
    assert!(!r.finished && !r.input_reported);
    assert_eq!(r.parse_errors, 1);
    let (_, r) = run(
        ApiFormat::OpenAiChat,
        false,
        false,
        br#"{"choices":[{"mess"#,
    );
    assert!(!r.finished);
    assert_eq!(r.parse_errors, 1);
}

#[test]
fn non_stream_body_over_the_buffer_limit_reports_no_usage() {
    let mut meter = Meter::new(ApiFormat::OpenAiChat, false, false);
    let big = Bytes::from(vec![b' '; 1 << 20]);
    for _ in 0..(MAX_BUFFERED_BODY >> 20) {
        assert_eq!(meter.feed(big.clone()), big);
    }
    let tail = Bytes::from_static(br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
    assert_eq!(meter.feed(tail.clone()), tail);
    let (_, r) = meter.finish();
    assert!(!r.input_reported && !r.finished);
    assert_eq!(r.parse_errors, 1);
}

#[test]
fn finish_is_idempotent_and_later_chunks_pass_through() {
    let input = join(CHAT_TEXT);
    let mut meter = Meter::new(ApiFormat::OpenAiChat, true, true);
    let out = meter.feed(Bytes::from(input.clone()));
    let (rest, first) = meter.finish();
    assert!(rest.is_empty());
    assert!(out.len() < input.len());
    let extra = Bytes::from_static(b"data: x\n\n");
    assert_eq!(meter.feed(extra.clone()), extra);
    let (rest, second) = meter.finish();
    assert!(rest.is_empty());
    assert_eq!(first, second);
}

#[test]
fn output_text_is_capped() {
    let mut meter = Meter::new(ApiFormat::OpenAiChat, true, false);
    let piece = "x".repeat(1 << 20);
    let event = format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{piece}\"}}}}]}}\n\n"
    );
    let event = Bytes::from(event);
    for _ in 0..(MAX_OUTPUT_TEXT >> 20) + 2 {
        meter.feed(event.clone());
    }
    let (_, r) = meter.finish();
    assert_eq!(r.output_text.len(), MAX_OUTPUT_TEXT);
    assert!(r.output_text_truncated);
}

#[test]
fn hide_mode_holds_back_at_most_the_incomplete_event() {
    let input = join(CHAT_TEXT);
    let first_end = input.find("\n\n").unwrap() + 2;
    let mut meter = Meter::new(ApiFormat::OpenAiChat, true, true);
    // First event plus half of the second: only the first is released.
    let out = meter.feed(Bytes::copy_from_slice(&input.as_bytes()[..first_end + 20]));
    assert_eq!(out, input.as_bytes()[..first_end]);
    let out = meter.feed(Bytes::copy_from_slice(&input.as_bytes()[first_end + 20..]));
    let (rest, _) = meter.finish();
    let mut all = input.as_bytes()[..first_end].to_vec();
    all.extend_from_slice(&out);
    all.extend_from_slice(&rest);
    let mut expected = CHAT_TEXT.to_vec();
    expected.remove(CHAT_TEXT_USAGE);
    assert_eq!(all, join(&expected).as_bytes());
}

#[test]
fn hide_mode_releases_an_event_that_outgrows_the_hold_limit() {
    let big = "y".repeat(HIDE_HOLD_LIMIT as usize + 10);
    let event = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{big}\"}}}}]}}\n\n");
    let bytes = event.as_bytes();
    let mut meter = Meter::new(ApiFormat::OpenAiChat, true, true);
    let half = bytes.len() - 5;
    let a = meter.feed(Bytes::copy_from_slice(&bytes[..half]));
    assert_eq!(a.len(), half, "an oversized incomplete event is not held");
    let b = meter.feed(Bytes::copy_from_slice(&bytes[half..]));
    assert_eq!(b, bytes[half..]);
    let (_, r) = meter.finish();
    assert_eq!(r.output_text, big);
}

#[test]
fn non_hide_stream_output_is_the_same_bytes_object() {
    let input = Bytes::from(join(ANTHROPIC));
    let mut meter = Meter::new(ApiFormat::AnthropicMessages, true, false);
    for piece in [input.slice(..100), input.slice(100..)] {
        let out = meter.feed(piece.clone());
        assert_eq!(out.as_ptr(), piece.as_ptr());
        assert_eq!(out.len(), piece.len());
    }
}

#[test]
fn sse_overflow_counts_as_parse_error() {
    let mut meter = Meter::new(ApiFormat::OpenAiChat, true, false);
    let mut line = b"data: ".to_vec();
    line.resize(MAX_EVENT_LEN + 100, b'z');
    meter.feed(Bytes::from(line));
    meter.feed(Bytes::from_static(b"\n\ndata: [DONE]\n\n"));
    let (_, r) = meter.finish();
    assert_eq!(r.parse_errors, 1);
    assert!(r.finished);
}

#[test]
fn failure_events_per_format() {
    let msg = "upstream \"closed\"\n";
    let chat = failure_event(ApiFormat::OpenAiChat, msg).unwrap();
    assert_eq!(
        chat,
        "data: {\"error\":{\"message\":\"upstream \\\"closed\\\"\\n\",\"type\":\"api_error\",\"code\":\"upstream_unavailable\"}}\n\n"
    );
    let responses = failure_event(ApiFormat::OpenAiResponses, msg).unwrap();
    assert_eq!(
        responses,
        "event: error\ndata: {\"type\":\"error\",\"code\":\"upstream_unavailable\",\"message\":\"upstream \\\"closed\\\"\\n\",\"param\":null}\n\n"
    );
    let anthropic = failure_event(ApiFormat::AnthropicMessages, msg).unwrap();
    assert_eq!(
        anthropic,
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"upstream \\\"closed\\\"\\n\"}}\n\n"
    );
    assert!(failure_event(ApiFormat::OpenAiEmbeddings, msg).is_none());

    // Each event is understood by the meter of its own format as an upstream error.
    for format in [
        ApiFormat::OpenAiChat,
        ApiFormat::OpenAiCompletions,
        ApiFormat::OpenAiResponses,
        ApiFormat::AnthropicMessages,
    ] {
        let ev = failure_event(format, msg).unwrap();
        let (_, r) = run(format, true, false, &ev);
        assert!(r.upstream_error, "{format:?}");
        assert_eq!(r.parse_errors, 0);
    }
}

/// A fixture rendered with a line-ending style, remembering each block's byte range.
fn render(blocks: Fixture, eols: &[u8]) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut out = Vec::new();
    let mut ranges = Vec::new();
    let mut k = 0;
    let mut prev_cr = false;
    for block in blocks {
        let start = out.len();
        let lines = block.iter().copied().chain(std::iter::once(""));
        for line in lines {
            out.extend_from_slice(line.as_bytes());
            let mut eol = eols[k % eols.len()] % 3;
            k += 1;
            // A lone CR followed by an LF-ended empty line would read as one CRLF.
            if prev_cr && line.is_empty() && eol == 0 {
                eol = 2;
            }
            out.extend_from_slice(match eol {
                0 => b"\n".as_slice(),
                1 => b"\r\n",
                _ => b"\r",
            });
            prev_cr = eol == 2;
        }
        ranges.push((start, out.len()));
    }
    (out, ranges)
}

fn fixture_strategy() -> impl Strategy<Value = (ApiFormat, Fixture, Option<usize>)> {
    prop_oneof![
        Just((ApiFormat::OpenAiChat, CHAT_TEXT, Some(CHAT_TEXT_USAGE))),
        Just((ApiFormat::OpenAiChat, CHAT_PRIORITY, Some(2))),
        Just((ApiFormat::OpenAiResponses, RESPONSES_SEARCH, None)),
        Just((ApiFormat::AnthropicMessages, ANTHROPIC_FULL, None)),
        Just((ApiFormat::OpenAiChat, CHAT_TOOLS, Some(4))),
        Just((ApiFormat::OpenAiChat, CHAT_ERROR, None)),
        Just((ApiFormat::OpenAiCompletions, COMPLETIONS_STREAM, Some(2))),
        Just((ApiFormat::OpenAiResponses, RESPONSES, None)),
        Just((ApiFormat::AnthropicMessages, ANTHROPIC, None)),
    ]
}

fn to_chunks(input: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    split_at(input, cuts).into_iter().map(Bytes::from).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any chunking gives the same report and the same client bytes: the input itself, chunk
    /// for chunk, or the input minus exactly the usage event when hiding.
    #[test]
    fn any_split_same_report_and_output(
        (format, blocks, usage_block) in fixture_strategy(),
        eols in proptest::collection::vec(0u8..3, 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
        hide in any::<bool>(),
    ) {
        let (input, ranges) = render(blocks, &eols);
        let (whole_out, whole) = run(format, true, hide, &input);
        let chunks = to_chunks(&input, &cuts);
        let (outs, rest, report) = run_chunks(format, true, hide, &chunks);
        prop_assert_eq!(&report, &whole);
        prop_assert!(report.finished || format == ApiFormat::OpenAiChat && usage_block.is_none());
        let hides = hide && matches!(format, ApiFormat::OpenAiChat | ApiFormat::OpenAiCompletions);
        let mut expected = input.clone();
        if hides && let Some(i) = usage_block {
            let (s, e) = ranges[i];
            expected.drain(s..e);
        }
        if !hides {
            // Chunk for chunk, the very same bytes.
            prop_assert_eq!(&outs, &chunks);
            prop_assert!(rest.is_empty());
        }
        prop_assert_eq!(concat_out(&outs, &rest), expected.clone());
        prop_assert_eq!(whole_out, expected);
    }

    /// A stream cut anywhere (client disconnect, upstream reset) meters the same however it
    /// was chunked, and never loses or invents client bytes beyond the hidden usage event.
    #[test]
    fn truncated_streams_are_split_invariant(
        (format, blocks, _usage) in fixture_strategy(),
        eols in proptest::collection::vec(0u8..3, 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
        keep in any::<usize>(),
        hide in any::<bool>(),
    ) {
        let (input, _) = render(blocks, &eols);
        let input = &input[..keep % (input.len() + 1)];
        let (whole_out, whole) = run(format, true, hide, input);
        let chunks = to_chunks(input, &cuts);
        let (outs, rest, report) = run_chunks(format, true, hide, &chunks);
        prop_assert_eq!(report, whole);
        let out = concat_out(&outs, &rest);
        prop_assert_eq!(&out, &whole_out);
        if !hide {
            prop_assert_eq!(out.as_slice(), input);
        }
    }

    /// Non-stream bodies pass through unchanged and meter the same in any chunking.
    #[test]
    fn non_stream_any_split(cuts in proptest::collection::vec(any::<usize>(), 0..20)) {
        let body = r#"{"content":[{"type":"text","text":"héllo 世界"}],"usage":{"input_tokens":3,"cache_read_input_tokens":2,"output_tokens":4}}"#;
        let chunks = to_chunks(body.as_bytes(), &cuts);
        let (outs, _, report) = run_chunks(ApiFormat::AnthropicMessages, false, false, &chunks);
        prop_assert_eq!(outs, chunks);
        prop_assert_eq!(report.usage, usage(5, 2, 0, 4, 0));
        prop_assert_eq!(report.output_text, "héllo 世界");
    }
}

/// A chat stream served at `priority` (every chunk says so), with cache writes of both
/// retentions and audio tokens.
const CHAT_PRIORITY: Fixture = &[
    &[
        r#"data: {"id":"chatcmpl-P","object":"chat.completion.chunk","created":1796000000,"model":"gpt-6.1-sol","service_tier":"priority","choices":[{"index":0,"delta":{"role":"assistant","content":"Fast"},"finish_reason":null}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-P","object":"chat.completion.chunk","created":1796000000,"model":"gpt-6.1-sol","service_tier":"priority","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
    ],
    &[
        r#"data: {"id":"chatcmpl-P","object":"chat.completion.chunk","created":1796000000,"model":"gpt-6.1-sol","service_tier":"priority","choices":[],"usage":{"prompt_tokens":12000,"completion_tokens":800,"total_tokens":12800,"prompt_tokens_details":{"cached_tokens":9000,"cache_write_tokens":2048,"cache_write_tokens_details":{"ttl_30m_tokens":2000,"ttl_12h_tokens":48},"audio_tokens":100},"completion_tokens_details":{"reasoning_tokens":512,"audio_tokens":30}}}"#,
    ],
    &["data: [DONE]"],
];

/// A Responses stream with two web searches, one of them failed, served at `flex`.
const RESPONSES_SEARCH: Fixture = &[
    &[
        "event: response.created",
        r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress","model":"gpt-6.1-sol","service_tier":"auto","output":[],"usage":null}}"#,
    ],
    &[
        "event: response.output_item.added",
        r#"data: {"type":"response.output_item.added","sequence_number":1,"output_index":0,"item":{"type":"web_search_call","id":"ws_1","status":"in_progress"}}"#,
    ],
    &[
        "event: response.web_search_call.completed",
        r#"data: {"type":"response.web_search_call.completed","sequence_number":2,"output_index":0,"item_id":"ws_1"}"#,
    ],
    &[
        "event: response.output_item.done",
        r#"data: {"type":"response.output_item.done","sequence_number":3,"output_index":0,"item":{"type":"web_search_call","id":"ws_1","status":"completed","action":{"type":"search","query":"tollgate proxy"}}}"#,
    ],
    &[
        "event: response.output_item.done",
        r#"data: {"type":"response.output_item.done","sequence_number":4,"output_index":1,"item":{"status":"failed","id":"ws_2","type":"web_search_call"}}"#,
    ],
    &[
        "event: response.output_text.delta",
        r#"data: {"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_1","output_index":2,"content_index":0,"delta":"Found it.","logprobs":[]}"#,
    ],
    &[
        "event: response.output_item.done",
        r#"data: {"type":"response.output_item.done","sequence_number":6,"output_index":2,"item":{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Found it.","annotations":[]}]}}"#,
    ],
    &[
        "event: response.completed",
        r#"data: {"type":"response.completed","sequence_number":7,"response":{"id":"resp_1","status":"completed","model":"gpt-6.1-sol","service_tier":"flex","output":[{"type":"web_search_call","id":"ws_1","status":"completed","action":{"type":"search","query":"tollgate proxy"}},{"type":"web_search_call","id":"ws_2","status":"failed"},{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Found it.","annotations":[]}]}],"usage":{"input_tokens":5200,"input_tokens_details":{"cached_tokens":4096,"cache_write_tokens":512},"output_tokens":350,"output_tokens_details":{"reasoning_tokens":120},"total_tokens":5550}}}"#,
    ],
];

/// An Anthropic stream with every usage field: 1-hour writes, server tool use (counts grow in
/// `message_delta`), service tier, speed, region and thinking tokens.
const ANTHROPIC_FULL: Fixture = &[
    &[
        "event: message_start",
        r#"data: {"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant","model":"claude-opus-5-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":105,"cache_creation_input_tokens":7345,"cache_read_input_tokens":7123,"cache_creation":{"ephemeral_5m_input_tokens":345,"ephemeral_1h_input_tokens":7000},"output_tokens":1,"service_tier":"standard","inference_geo":"us","speed":"fast","server_tool_use":{"web_search_requests":0,"web_fetch_requests":0}}}}"#,
    ],
    &[
        "event: content_block_delta",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Searched."}}"#,
    ],
    &[
        "event: message_delta",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":105,"cache_creation_input_tokens":7345,"cache_read_input_tokens":7123,"output_tokens":6039,"output_tokens_details":{"thinking_tokens":4100},"server_tool_use":{"web_search_requests":2,"web_fetch_requests":1}}}"#,
    ],
    &["event: message_stop", r#"data: {"type":"message_stop"}"#],
];

#[test]
fn chat_stream_reads_tier_cache_writes_and_audio() {
    let input = join(CHAT_PRIORITY);
    let (_, r) = run(ApiFormat::OpenAiChat, true, true, input.as_bytes());
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 12_000,
            cached_input_tokens: 9_000,
            cache_write_tokens: 2_048,
            cache_write_1h_tokens: 48,
            audio_input_tokens: 100,
            output_tokens: 800,
            reasoning_tokens: 512,
            audio_output_tokens: 30,
            tool_calls: 0,
            served: Modifiers {
                service_tier: Some("priority".into()),
                ..Modifiers::default()
            },
        }
    );
    // The tier comes with every chunk: a stream cut before its usage still knows it.
    let cut = join(&CHAT_PRIORITY[..1]);
    let (_, r) = run(ApiFormat::OpenAiChat, true, true, cut.as_bytes());
    assert_eq!(r.usage.served.service_tier.as_deref(), Some("priority"));
    assert!(!r.input_reported);
}

#[test]
fn openai_write_split_without_a_total_is_summed() {
    let body = r#"{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":10,"cache_write_tokens_details":{"ttl_30m_tokens":20,"ttl_12h_tokens":30}}}}"#;
    let (_, r) = run(ApiFormat::OpenAiChat, false, false, body.as_bytes());
    assert_eq!(
        (r.usage.cache_write_tokens, r.usage.cache_write_1h_tokens),
        (50, 30)
    );
}

#[test]
fn responses_stream_counts_web_searches_and_takes_the_served_tier() {
    let input = join(RESPONSES_SEARCH);
    let (_, r) = run(ApiFormat::OpenAiResponses, true, false, input.as_bytes());
    // One completed search; the failed one is not billed. `auto` (created) is not a tier.
    assert_eq!(r.usage.tool_calls, 1);
    assert_eq!(
        r.usage,
        Usage {
            tool_calls: 1,
            cache_write_tokens: 512,
            ..tier(usage(5200, 4096, 0, 350, 120), "flex")
        }
    );
    // The terminal event's output is not taken as text again.
    assert_eq!(r.output_text, "Found it.");
    // Cut after the first search finished: counted from its `output_item.done`.
    let cut = join(&RESPONSES_SEARCH[..5]);
    let (_, r) = run(ApiFormat::OpenAiResponses, true, false, cut.as_bytes());
    assert_eq!(r.usage.tool_calls, 1);
    assert_eq!(r.usage.served.service_tier, None);
    // Cut while the search runs: not counted.
    let cut = join(&RESPONSES_SEARCH[..3]);
    let (_, r) = run(ApiFormat::OpenAiResponses, true, false, cut.as_bytes());
    assert_eq!(r.usage.tool_calls, 0);
}

#[test]
fn responses_terminal_output_replaces_the_streamed_count() {
    // Items seen done: 1; the terminal output lists 3 completed searches (it is authoritative).
    let input = concat!(
        "event: response.output_item.done\n",
        "data: {\"type\":\"response.output_item.done\",\"item\":{\"type\":\"web_search_call\",\"status\":\"completed\"}}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"type\":\"web_search_call\"},{\"type\":\"web_search_call\",\"status\":\"completed\"},{\"type\":\"web_search_call\",\"status\":\"searching\"}],\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}}\n\n",
    );
    let (_, r) = run(ApiFormat::OpenAiResponses, true, false, input.as_bytes());
    assert_eq!(r.usage.tool_calls, 3);
    // A terminal event without `output` keeps the streamed count.
    let input = concat!(
        "event: response.output_item.done\n",
        "data: {\"type\":\"response.output_item.done\",\"item\":{\"type\":\"web_search_call\",\"status\":\"completed\"}}\n\n",
        "event: response.incomplete\n",
        "data: {\"type\":\"response.incomplete\",\"response\":{\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}}\n\n",
    );
    let (_, r) = run(ApiFormat::OpenAiResponses, true, false, input.as_bytes());
    assert_eq!(r.usage.tool_calls, 1);
    assert!(r.finished && r.input_reported);
}

#[test]
fn non_stream_responses_count_web_searches() {
    let body = r#"{"id":"resp_123","object":"response","status":"completed","model":"gpt-6.2-sol","service_tier":"default",
        "output":[{"type":"web_search_call","id":"ws_1","status":"completed","action":{"type":"search","query":"tollgate proxy"}},
                  {"type":"web_search_call","id":"ws_2","status":"completed","action":{"type":"open_page","url":"https://x"}},
                  {"type":"message","id":"msg_1","role":"assistant","status":"completed","content":[{"type":"output_text","text":"Answer.","annotations":[]}]}],
        "usage":{"input_tokens":300000,"input_tokens_details":{"cached_tokens":250000,"cache_write_tokens":40000,"cache_write_tokens_details":{"ttl_30m_tokens":40000,"ttl_12h_tokens":0}},"output_tokens":2000,"output_tokens_details":{"reasoning_tokens":1500},"total_tokens":302000}}"#;
    let (_, r) = run(ApiFormat::OpenAiResponses, false, false, body.as_bytes());
    assert_eq!(
        r.usage,
        Usage {
            tool_calls: 2,
            cache_write_tokens: 40_000,
            ..tier(usage(300_000, 250_000, 0, 2_000, 1_500), "default")
        }
    );
    assert_eq!(r.output_text, "Answer.");
}

#[test]
fn anthropic_stream_reads_every_billed_field() {
    let input = join(ANTHROPIC_FULL);
    let (_, r) = run(ApiFormat::AnthropicMessages, true, false, input.as_bytes());
    assert_eq!(
        r.usage,
        Usage {
            // 105 uncached + 7123 reads + 7345 writes.
            input_tokens: 14_573,
            cached_input_tokens: 7_123,
            cache_write_tokens: 7_345,
            cache_write_1h_tokens: 7_000,
            audio_input_tokens: 0,
            output_tokens: 6_039,
            reasoning_tokens: 4_100,
            audio_output_tokens: 0,
            // The cumulative count of message_delta replaces message_start's 0.
            tool_calls: 2,
            served: Modifiers {
                service_tier: Some("standard".into()),
                speed: Some("fast".into()),
                inference_geo: Some("us".into()),
            },
        }
    );
    // The same message whole (non-stream) reads the same.
    let body = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-opus-5-5",
        "content":[{"type":"text","text":"Searched."}],"stop_reason":"end_turn","stop_sequence":null,
        "usage":{"input_tokens":105,"cache_creation_input_tokens":7345,"cache_read_input_tokens":7123,
        "cache_creation":{"ephemeral_5m_input_tokens":345,"ephemeral_1h_input_tokens":7000},"output_tokens":6039,
        "output_tokens_details":{"thinking_tokens":4100},"server_tool_use":{"web_search_requests":2,"web_fetch_requests":1},
        "service_tier":"standard","inference_geo":"us","speed":"fast"}}"#;
    let (_, whole) = run(ApiFormat::AnthropicMessages, false, false, body.as_bytes());
    assert_eq!(whole.usage, r.usage);
    assert_eq!(whole.output_text, r.output_text);
}

#[test]
fn reported_names_are_bounded_and_retyped_ones_cost_no_usage() {
    let long = "x".repeat(crate::api::MAX_LABEL_LEN + 1);
    for (tier_json, expect) in [
        (r#""auto""#.to_owned(), None),
        (format!("\"{long}\""), None),
        (r#""two words""#.to_owned(), None),
        ("7".to_owned(), None),
        (r#"{"name":"x"}"#.to_owned(), None),
        (r#""scale""#.to_owned(), Some("scale")),
    ] {
        let body = format!(
            r#"{{"service_tier":{tier_json},"choices":[],"usage":{{"prompt_tokens":3,"completion_tokens":2}}}}"#
        );
        let (_, r) = run(ApiFormat::OpenAiChat, false, false, body.as_bytes());
        assert_eq!(
            r.usage.served.service_tier.as_deref(),
            expect,
            "{tier_json}"
        );
        assert!(r.input_reported && r.output_reported, "{tier_json}");
        // Anthropic reads its names inside usage, as leniently.
        let body = format!(
            r#"{{"content":[],"usage":{{"input_tokens":3,"output_tokens":2,"service_tier":{tier_json},"speed":{tier_json}}}}}"#
        );
        let (_, r) = run(ApiFormat::AnthropicMessages, false, false, body.as_bytes());
        assert_eq!(
            r.usage.served.service_tier.as_deref(),
            expect,
            "{tier_json}"
        );
        assert_eq!(r.usage.served.speed.as_deref(), expect, "{tier_json}");
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (3, 2));
    }
}

/// A usage report of `format` rendered whole (non-stream) and as the format's event stream.
fn render_both(format: ApiFormat, u: &Usage) -> (String, String) {
    use serde_json::json;
    let tier = u
        .served
        .service_tier
        .clone()
        .unwrap_or_else(|| "default".into());
    let long = u.cache_write_1h_tokens;
    let mut input_details = json!({
        "cached_tokens": u.cached_input_tokens,
        "cache_write_tokens": u.cache_write_tokens,
    });
    if long > 0 {
        input_details["cache_write_tokens_details"] =
            json!({"ttl_30m_tokens": u.cache_write_tokens - long, "ttl_12h_tokens": long});
    }
    match format {
        ApiFormat::OpenAiChat => {
            input_details["audio_tokens"] = json!(u.audio_input_tokens);
            let usage = json!({
                "prompt_tokens": u.input_tokens,
                "completion_tokens": u.output_tokens,
                "total_tokens": u.input_tokens + u.output_tokens,
                "prompt_tokens_details": input_details,
                "completion_tokens_details": {
                    "reasoning_tokens": u.reasoning_tokens,
                    "audio_tokens": u.audio_output_tokens
                }
            });
            let whole = json!({
                "id": "c", "object": "chat.completion", "model": "m", "service_tier": tier,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}],
                "usage": usage
            });
            let chunk = |choices: serde_json::Value, usage: serde_json::Value| {
                format!(
                    "data: {}\n\n",
                    json!({"id": "c", "object": "chat.completion.chunk", "model": "m", "service_tier": tier, "choices": choices, "usage": usage})
                )
            };
            let stream = [
                chunk(
                    json!([{"index": 0, "delta": {"content": "hi"}}]),
                    json!(null),
                ),
                chunk(
                    json!([{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]),
                    json!(null),
                ),
                chunk(json!([]), usage),
                "data: [DONE]\n\n".to_owned(),
            ]
            .concat();
            (whole.to_string(), stream)
        }
        ApiFormat::OpenAiResponses => {
            let usage = json!({
                "input_tokens": u.input_tokens,
                "input_tokens_details": input_details,
                "output_tokens": u.output_tokens,
                "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                "total_tokens": u.input_tokens + u.output_tokens
            });
            let search = |i: u64| json!({"type": "web_search_call", "id": format!("ws_{i}"), "status": "completed"});
            let mut output: Vec<serde_json::Value> = (0..u.tool_calls).map(search).collect();
            output.push(json!({"type": "message", "id": "msg", "role": "assistant", "content": [{"type": "output_text", "text": "hi there"}]}));
            let whole = json!({"id": "r", "object": "response", "status": "completed", "service_tier": tier, "output": output, "usage": usage});
            let event = |kind: &str, payload: serde_json::Value| {
                let mut p = payload;
                p["type"] = json!(kind);
                format!("event: {kind}\ndata: {p}\n\n")
            };
            let mut stream = event(
                "response.created",
                json!({"response": {"id": "r", "status": "in_progress", "service_tier": "auto", "output": [], "usage": null}}),
            );
            for i in 0..u.tool_calls {
                stream += &event(
                    "response.output_item.done",
                    json!({"output_index": i, "item": search(i)}),
                );
            }
            stream += &event("response.output_text.delta", json!({"delta": "hi there"}));
            stream += &event("response.completed", json!({"response": whole}));
            (whole.to_string(), stream)
        }
        _ => {
            let mut usage = json!({
                "input_tokens": u.input_tokens - u.cached_input_tokens - u.cache_write_tokens,
                "cache_creation_input_tokens": u.cache_write_tokens,
                "cache_read_input_tokens": u.cached_input_tokens,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": u.cache_write_tokens - long,
                    "ephemeral_1h_input_tokens": long
                },
                "output_tokens": u.output_tokens,
                "output_tokens_details": {"thinking_tokens": u.reasoning_tokens},
                "server_tool_use": {"web_search_requests": u.tool_calls, "web_fetch_requests": 0},
            });
            let names = &u.served;
            for (key, value) in [
                ("service_tier", &names.service_tier),
                ("speed", &names.speed),
                ("inference_geo", &names.inference_geo),
            ] {
                if let Some(v) = value {
                    usage[key] = json!(v);
                }
            }
            let whole = json!({"id": "m", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi there"}], "usage": usage});
            let mut start = usage.clone();
            start["output_tokens"] = json!(1);
            start["server_tool_use"]["web_search_requests"] = json!(0);
            let delta_usage = json!({
                "input_tokens": usage["input_tokens"],
                "cache_creation_input_tokens": u.cache_write_tokens,
                "cache_read_input_tokens": u.cached_input_tokens,
                "output_tokens": u.output_tokens,
                "output_tokens_details": {"thinking_tokens": u.reasoning_tokens},
                "server_tool_use": {"web_search_requests": u.tool_calls}
            });
            let event = |kind: &str, p: serde_json::Value| format!("event: {kind}\ndata: {p}\n\n");
            let stream = [
                event("message_start", json!({"type": "message_start", "message": {"id": "m", "content": [], "usage": start}})),
                event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi there"}})),
                event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage})),
                event("message_stop", json!({"type": "message_stop"})),
            ]
            .concat();
            (whole.to_string(), stream)
        }
    }
}

/// A consistent usage of `format`: parts within their totals, names the format reports.
fn usage_strategy() -> impl Strategy<Value = (ApiFormat, Usage)> {
    let name =
        |names: &'static [&'static str]| proptest::option::of(proptest::sample::select(names));
    (
        prop_oneof![
            Just(ApiFormat::OpenAiChat),
            Just(ApiFormat::OpenAiResponses),
            Just(ApiFormat::AnthropicMessages),
        ],
        proptest::array::uniform8(0u64..2_000_000),
        0u64..6,
        name(&["default", "priority", "flex", "scale"]),
        name(&["standard", "fast"]),
        name(&["global", "us"]),
    )
        .prop_map(|(format, n, calls, tier, speed, geo)| {
            let (cached, writes, audio_in) = (n[0], n[1], n[2]);
            let long = n[3] % (writes + 1);
            let input = cached + writes + audio_in + n[4];
            let audio_out = n[5];
            let reasoning = n[6];
            let output = audio_out + reasoning + n[7];
            let chat = format == ApiFormat::OpenAiChat;
            let anthropic = format == ApiFormat::AnthropicMessages;
            let u = Usage {
                input_tokens: if chat { input } else { input - audio_in },
                cached_input_tokens: cached,
                cache_write_tokens: writes,
                cache_write_1h_tokens: long,
                audio_input_tokens: if chat { audio_in } else { 0 },
                output_tokens: if chat { output } else { output - audio_out },
                reasoning_tokens: reasoning,
                audio_output_tokens: if chat { audio_out } else { 0 },
                tool_calls: if chat { 0 } else { calls },
                served: Modifiers {
                    // Anthropic reports `standard` for the tier; OpenAI its own names.
                    service_tier: if anthropic {
                        tier.map(|_| "standard".to_owned())
                    } else {
                        Some(tier.unwrap_or("default").to_owned())
                    },
                    speed: speed.filter(|_| anthropic).map(str::to_owned),
                    inference_geo: geo.filter(|_| anthropic).map(str::to_owned),
                },
            };
            (format, u)
        })
}

/// An entry with every kind of rate and multiplier the usages above can select.
fn full_price() -> crate::billing::price::Price {
    let text = r#"[prices."m"]
input = 1.25
cached_input = 0.125
cache_write = 1.5625
cache_write_1h = 3.125
output = 10
audio_input = 32
audio_output = 64
web_search = 0.01
tiers = { priority = 2, flex = 0.5 }
speed = { fast = 2 }
inference_geo = { us = 1.1 }
long_context = { above = 2500000, input = 2.5, output = 15 }
"#;
    let file = crate::billing::table::parse_price_file(text).unwrap();
    file.prices["m"].clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// A stream and a non-stream answer reporting the same usage meter to that usage and
    /// cost the same, however the stream is chunked.
    #[test]
    fn stream_and_non_stream_answers_with_equal_usage_cost_the_same(
        (format, u) in usage_strategy(),
        cuts in proptest::collection::vec(any::<usize>(), 0..30),
    ) {
        let (whole, stream) = render_both(format, &u);
        let (_, non_stream) = run(format, false, false, whole.as_bytes());
        let chunks = to_chunks(stream.as_bytes(), &cuts);
        let (_, _, streamed) = run_chunks(format, true, format == ApiFormat::OpenAiChat, &chunks);
        prop_assert_eq!(&non_stream.usage, &u);
        prop_assert_eq!(&streamed.usage, &u);
        prop_assert!(non_stream.finished && streamed.finished);
        prop_assert_eq!(&streamed.output_text, &non_stream.output_text);
        let price = full_price();
        prop_assert_eq!(price.cost(&streamed.usage), price.cost(&non_stream.usage));
    }
}
