//! Input-token estimates from a parsed request body, one function per provider route, counting
//! the way each provider bills.
//!
//! Shared rules:
//! - Every string is counted on its own, as the chat format separates messages with special
//!   tokens; text parts of one message are counted one by one (OpenAI joins them without a
//!   separator we could reproduce exactly: ±1 token per extra part).
//! - Chat-shaped inputs add OpenAI's cookbook overhead: 3 tokens per message
//!   (`<|start|>{role}<|message|>…<|end|>` minus the role text, which is counted), 1 more per
//!   `name`, and 3 for priming the reply. Anthropic's message framing is not published; the same
//!   3 + 3 is used there.
//! - Tool definitions are counted as their JSON text plus [`TOOL_OVERHEAD`] each and
//!   [`TOOLS_OVERHEAD`] once. The model sees a terser, TypeScript-like rendering of the schema,
//!   so the JSON text over-counts it (the tests check it never falls below the cookbook's
//!   rendering-based formula); erring high is the safe side for a reservation.
//! - Images, audio and files follow [`super::media`].
//! - Any value of an unexpected shape — an unknown content part, a number where a string was
//!   expected, a message that is not an object — is counted as its compact JSON text, which can
//!   only over-count it. Scalars that carry no text (`null`, booleans, numbers in known
//!   non-text fields) count 0. Nothing here panics.
//! - Inputs the request only refers to (`previous_response_id`, `conversation`, a stored
//!   `prompt`, `item_reference`, files by id or URL, remote MCP servers, `file_search`)
//!   are invisible here; [`unseen_input`] names them, and the engine holds
//!   `[quota].unseen_input_tokens` for such a request (the upstream's usage settles it).

use serde_json::{Map, Value};

use super::media::{
    UNKNOWN_FILE_TOKENS, anthropic_image_tokens, audio_tokens, image_dimensions,
    inline_file_tokens, openai_image_tokens,
};
use super::{Encoding, count};

/// Framing tokens per message (OpenAI cookbook, all current chat models).
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Extra token when a message carries a `name` (OpenAI cookbook).
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the reply (`<|start|>assistant<|message|>`, OpenAI cookbook).
pub const REPLY_PRIMING: u64 = 3;
/// Per tool definition, on top of its JSON text (the cookbook's `func_init` for gpt-4o is 7,
/// for gpt-4/3.5 it is 10; we take the larger).
pub const TOOL_OVERHEAD: u64 = 10;
/// Once per request with tools (the cookbook's `func_end`).
pub const TOOLS_OVERHEAD: u64 = 12;
/// Per tool call in an assistant message, on top of its name and arguments text: the call's
/// framing is not published; 3 matches the per-message framing.
pub const TOOL_CALL_OVERHEAD: u64 = 3;
/// Anthropic's tool-use system prompt, added when `tools` is present: 346 tokens with
/// `tool_choice` `auto` or `none`, 313 with `any` or `tool` (Anthropic's pricing docs for
/// Claude 4 / 3.7 models; Claude 3.5 Sonnet used 294/261, Claude 3 Opus 530/281).
pub const ANTHROPIC_TOOL_SYSTEM_AUTO: u64 = 346;
/// See [`ANTHROPIC_TOOL_SYSTEM_AUTO`].
pub const ANTHROPIC_TOOL_SYSTEM_FORCED: u64 = 313;

fn text(enc: Encoding, s: &str) -> u64 {
    count(enc, s) as u64
}

/// Compact JSON text of any value, counted. Strings are counted as their content.
fn json_text(enc: Encoding, v: &Value) -> u64 {
    match v {
        Value::Null => 0,
        Value::String(s) => text(enc, s),
        // Serialising a `Value` to a `String` cannot fail: its keys are strings.
        other => serde_json::to_string(other).map_or(0, |s| text(enc, &s)),
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

fn model_of(body: &Value) -> &str {
    body.get("model").and_then(Value::as_str).unwrap_or("")
}

/// Tool definitions (`tools`, legacy `functions`): JSON text plus overheads.
fn openai_tools(body: &Value, enc: Encoding) -> u64 {
    let mut total = 0;
    let mut any = false;
    for key in ["tools", "functions"] {
        match body.get(key) {
            Some(Value::Array(tools)) => {
                for tool in tools {
                    any = true;
                    total += TOOL_OVERHEAD + json_text(enc, tool);
                }
            }
            None | Some(Value::Null) => {}
            Some(other) => {
                any = true;
                total += json_text(enc, other);
            }
        }
    }
    if any { total + TOOLS_OVERHEAD } else { total }
}

/// An OpenAI image part's `image_url`: a string or `{url, detail}`.
fn openai_image(model: &str, image_url: Option<&Value>, detail: Option<&str>) -> u64 {
    let (url, detail) = match image_url {
        Some(Value::String(url)) => (url.as_str(), detail),
        Some(Value::Object(o)) => (
            str_field(o, "url").unwrap_or(""),
            str_field(o, "detail").or(detail),
        ),
        _ => ("", detail),
    };
    openai_image_tokens(model, detail, image_dimensions(url))
}

/// One content part of an OpenAI chat message or Responses item.
fn openai_part(part: &Value, enc: Encoding, model: &str) -> u64 {
    let Value::Object(p) = part else {
        return json_text(enc, part);
    };
    match str_field(p, "type").unwrap_or("") {
        "text" | "input_text" | "output_text" => p.get("text").map_or(0, |t| json_text(enc, t)),
        "refusal" => p.get("refusal").map_or(0, |t| json_text(enc, t)),
        "image_url" => openai_image(model, p.get("image_url"), None),
        "input_image" => openai_image(model, p.get("image_url"), str_field(p, "detail")),
        "input_audio" => {
            let audio = p.get("input_audio").and_then(Value::as_object).unwrap_or(p);
            let data = str_field(audio, "data").unwrap_or("");
            audio_tokens(data.len(), str_field(audio, "format"))
        }
        "file" | "input_file" => {
            let file = p.get("file").and_then(Value::as_object).unwrap_or(p);
            let name = str_field(file, "filename").map_or(0, |n| text(enc, n));
            name + match str_field(file, "file_data") {
                Some(data) => inline_file_tokens(enc, data, None),
                None => UNKNOWN_FILE_TOKENS,
            }
        }
        _ => match p.get("text") {
            Some(t) => json_text(enc, t),
            None => json_text(enc, part),
        },
    }
}

/// Message content: a string, an array of parts, or null.
fn openai_content(content: &Value, enc: Encoding, model: &str) -> u64 {
    match content {
        Value::Array(parts) => parts.iter().map(|p| openai_part(p, enc, model)).sum(),
        other => json_text(enc, other),
    }
}

/// A tool call's name and arguments (`{function: {name, arguments}}`, `{custom: {name, input}}`
/// or a flat `{name, arguments}`).
fn openai_tool_call(call: &Value, enc: Encoding) -> u64 {
    let Value::Object(c) = call else {
        return json_text(enc, call);
    };
    let inner = ["function", "custom"]
        .iter()
        .find_map(|k| c.get(*k).and_then(Value::as_object))
        .unwrap_or(c);
    let name = inner.get("name").map_or(0, |v| json_text(enc, v));
    let args = ["arguments", "input"]
        .iter()
        .find_map(|k| inner.get(*k))
        .map_or(0, |v| json_text(enc, v));
    TOOL_CALL_OVERHEAD + name + args
}

/// One chat message: the cookbook's rule (every string value counted, +1 for `name`) with
/// structured fields handled by kind.
fn openai_message(msg: &Value, enc: Encoding, model: &str) -> u64 {
    let Value::Object(m) = msg else {
        return TOKENS_PER_MESSAGE + json_text(enc, msg);
    };
    let mut total = TOKENS_PER_MESSAGE;
    for (key, value) in m {
        total += match (key.as_str(), value) {
            ("content", v) => openai_content(v, enc, model),
            ("name", v) => TOKENS_PER_NAME + json_text(enc, v),
            ("tool_calls", Value::Array(calls)) => {
                calls.iter().map(|c| openai_tool_call(c, enc)).sum()
            }
            ("function_call", v) => openai_tool_call(v, enc),
            // A reference to an earlier audio reply (`{id}`): its tokens are not visible here.
            ("audio", _) => 0,
            (_, Value::String(s)) => text(enc, s),
            (_, Value::Null | Value::Bool(_) | Value::Number(_)) => 0,
            (_, other) => json_text(enc, other),
        };
    }
    total
}

/// Structured-output schemas are shown to the model: counted as JSON text.
fn response_schema(format: Option<&Value>, enc: Encoding) -> u64 {
    match format {
        Some(Value::Object(f)) => f
            .get("json_schema")
            .or_else(|| f.get("schema"))
            .map_or(0, |s| json_text(enc, s)),
        _ => 0,
    }
}

/// Input tokens of an OpenAI Chat Completions request (`/v1/chat/completions`).
///
/// `messages` with the cookbook's framing (3 per message, +1 per `name`, +3 reply priming);
/// `content` as a string or parts (text; images per [`openai_image_tokens`]; audio and files
/// approximated); assistant `tool_calls`/`function_call` as name + arguments + 3; `tools` and
/// `functions` as JSON text with overhead; a `response_format` JSON schema as JSON text.
pub fn openai_chat_input(body: &Value, enc: Encoding) -> u64 {
    let model = model_of(body);
    let messages: u64 = match body.get("messages") {
        Some(Value::Array(msgs)) => msgs.iter().map(|m| openai_message(m, enc, model)).sum(),
        Some(other) => json_text(enc, other),
        None => 0,
    };
    REPLY_PRIMING
        + messages
        + openai_tools(body, enc)
        + response_schema(body.get("response_format"), enc)
}

/// One item of a Responses `input` array.
fn responses_item(item: &Value, enc: Encoding, model: &str) -> u64 {
    let Value::Object(it) = item else {
        return TOKENS_PER_MESSAGE + json_text(enc, item);
    };
    let kind = str_field(it, "type").unwrap_or(if it.contains_key("role") {
        "message"
    } else {
        ""
    });
    let body = match kind {
        "message" => {
            let role = str_field(it, "role").map_or(0, |r| text(enc, r));
            role + it
                .get("content")
                .map_or(0, |c| openai_content(c, enc, model))
        }
        "function_call" | "custom_tool_call" => openai_tool_call(item, enc),
        "function_call_output" | "custom_tool_call_output" => it
            .get("output")
            .map_or(0, |o| openai_content(o, enc, model)),
        "reasoning" => {
            // Summaries are plain text. The encrypted reasoning is the model's own earlier
            // tokens: ciphertext is about as long as the plaintext, base64 adds a third, and
            // text runs about 4 bytes per token, so len × 3/16.
            let summary: u64 = match it.get("summary") {
                Some(Value::Array(parts)) => parts.iter().map(|p| openai_part(p, enc, model)).sum(),
                _ => 0,
            };
            let encrypted = str_field(it, "encrypted_content")
                .map_or(0, |e| (e.len() as u64).saturating_mul(3) / 16);
            summary + encrypted
        }
        // A stored item: its content is not in the request.
        "item_reference" => 0,
        _ => json_text(enc, item),
    };
    TOKENS_PER_MESSAGE + body
}

/// Input tokens of an OpenAI Responses request (`/v1/responses`).
///
/// `instructions` as a system message; `input` as a string (one user message) or an items
/// array (messages with the chat part rules, function calls and outputs, reasoning items,
/// anything else as JSON text); `tools` as JSON text with overhead; a `text.format` JSON schema.
/// Earlier turns referenced by `previous_response_id` are not visible and not counted.
pub fn openai_responses_input(body: &Value, enc: Encoding) -> u64 {
    let model = model_of(body);
    let instructions = match body.get("instructions") {
        Some(Value::String(s)) => TOKENS_PER_MESSAGE + text(enc, "system") + text(enc, s),
        Some(Value::Array(items)) => items.iter().map(|i| responses_item(i, enc, model)).sum(),
        Some(Value::Null) | None => 0,
        Some(other) => TOKENS_PER_MESSAGE + json_text(enc, other),
    };
    let input = match body.get("input") {
        Some(Value::String(s)) => TOKENS_PER_MESSAGE + text(enc, "user") + text(enc, s),
        Some(Value::Array(items)) => items.iter().map(|i| responses_item(i, enc, model)).sum(),
        Some(Value::Null) | None => 0,
        Some(other) => TOKENS_PER_MESSAGE + json_text(enc, other),
    };
    let schema = body
        .get("text")
        .and_then(|t| t.get("format"))
        .map_or(0, |f| response_schema(Some(f), enc));
    REPLY_PRIMING + instructions + input + openai_tools(body, enc) + schema
}

/// A `prompt` or embeddings `input`: a string, token ids, or an array of either.
/// Token-id arrays count their length; no framing is added (these routes bill raw tokens).
fn prompt_like(v: Option<&Value>, enc: Encoding) -> u64 {
    match v {
        None | Some(Value::Null) => 0,
        Some(Value::String(s)) => text(enc, s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::Number(_) => 1,
                Value::Array(ids) => ids.len() as u64,
                other => json_text(enc, other),
            })
            .sum(),
        Some(other) => json_text(enc, other),
    }
}

/// Input tokens of an OpenAI legacy Completions request (`/v1/completions`): `prompt` (string,
/// array of strings, token ids, or arrays of token ids) plus `suffix`.
pub fn openai_completions_input(body: &Value, enc: Encoding) -> u64 {
    prompt_like(body.get("prompt"), enc) + prompt_like(body.get("suffix"), enc)
}

/// Input tokens of an OpenAI Embeddings request (`/v1/embeddings`): `input` as a string, an
/// array of strings, token ids, or arrays of token ids (their lengths).
pub fn openai_embeddings_input(body: &Value, enc: Encoding) -> u64 {
    prompt_like(body.get("input"), enc)
}

/// An Anthropic `source` object of an image or document block.
fn anthropic_source(block: &Map<String, Value>) -> Option<&Map<String, Value>> {
    block.get("source").and_then(Value::as_object)
}

/// One Anthropic content block.
fn anthropic_block(block: &Value, enc: Encoding) -> u64 {
    let Value::Object(b) = block else {
        return json_text(enc, block);
    };
    match str_field(b, "type").unwrap_or("") {
        "text" => b.get("text").map_or(0, |t| json_text(enc, t)),
        "thinking" => b.get("thinking").map_or(0, |t| json_text(enc, t)),
        // Opaque, encrypted thinking: about as long as its text, base64, 4 bytes per token.
        "redacted_thinking" => str_field(b, "data").map_or(0, |d| (d.len() as u64) * 3 / 16),
        "image" => {
            let dims = anthropic_source(b)
                .filter(|s| str_field(s, "type") == Some("base64"))
                .and_then(|s| str_field(s, "data"))
                .and_then(image_dimensions);
            anthropic_image_tokens(dims)
        }
        "document" => {
            let title = ["title", "context"]
                .iter()
                .filter_map(|k| b.get(*k))
                .map(|v| json_text(enc, v))
                .sum::<u64>();
            title + anthropic_document(anthropic_source(b), enc)
        }
        "tool_use" | "server_tool_use" | "mcp_tool_use" => {
            let name = b.get("name").map_or(0, |n| json_text(enc, n));
            name + b.get("input").map_or(0, |i| json_text(enc, i))
        }
        "tool_result" | "mcp_tool_result" => match b.get("content") {
            Some(Value::Array(blocks)) => blocks.iter().map(|x| anthropic_block(x, enc)).sum(),
            Some(other) => json_text(enc, other),
            None => 0,
        },
        "search_result" => {
            let head: u64 = ["title", "source"]
                .iter()
                .filter_map(|k| b.get(*k))
                .map(|v| json_text(enc, v))
                .sum();
            head + match b.get("content") {
                Some(Value::Array(blocks)) => blocks.iter().map(|x| anthropic_block(x, enc)).sum(),
                Some(other) => json_text(enc, other),
                None => 0,
            }
        }
        _ => match b.get("text") {
            Some(t) => json_text(enc, t),
            None => json_text(enc, block),
        },
    }
}

/// An Anthropic document source: plain text is counted, inline PDFs per page, nested content
/// blocks one by one, URLs and file ids as one page.
fn anthropic_document(source: Option<&Map<String, Value>>, enc: Encoding) -> u64 {
    let Some(s) = source else {
        return UNKNOWN_FILE_TOKENS;
    };
    match str_field(s, "type").unwrap_or("") {
        "text" => s.get("data").map_or(0, |d| json_text(enc, d)),
        "base64" => inline_file_tokens(
            enc,
            str_field(s, "data").unwrap_or(""),
            str_field(s, "media_type"),
        ),
        "content" => match s.get("content") {
            Some(Value::Array(blocks)) => blocks.iter().map(|x| anthropic_block(x, enc)).sum(),
            Some(other) => json_text(enc, other),
            None => 0,
        },
        _ => UNKNOWN_FILE_TOKENS,
    }
}

/// Anthropic `content` or `system`: a string or an array of blocks.
fn anthropic_content(content: &Value, enc: Encoding) -> u64 {
    match content {
        Value::Array(blocks) => blocks.iter().map(|b| anthropic_block(b, enc)).sum(),
        other => json_text(enc, other),
    }
}

/// Input tokens of an Anthropic Messages request (`/v1/messages`).
///
/// `system` (string or text blocks) and each message (string or blocks) with the chat framing
/// (3 per message, 3 reply priming); blocks: text, thinking, `tool_use` input JSON,
/// `tool_result` content, documents, images per [`anthropic_image_tokens`]; `tools` as JSON text
/// plus Anthropic's tool-use system prompt ([`ANTHROPIC_TOOL_SYSTEM_AUTO`] /
/// [`ANTHROPIC_TOOL_SYSTEM_FORCED`]). `enc` is a stand-in: see [`super::encoding_for_model`].
pub fn anthropic_messages_input(body: &Value, enc: Encoding) -> u64 {
    let system = match body.get("system") {
        None | Some(Value::Null) => 0,
        Some(s) => TOKENS_PER_MESSAGE + anthropic_content(s, enc),
    };
    let messages: u64 = match body.get("messages") {
        Some(Value::Array(msgs)) => msgs
            .iter()
            .map(|m| {
                TOKENS_PER_MESSAGE
                    + match m {
                        Value::Object(o) => {
                            let role = str_field(o, "role").map_or(0, |r| text(enc, r));
                            role + o.get("content").map_or(0, |c| anthropic_content(c, enc))
                        }
                        other => json_text(enc, other),
                    }
            })
            .sum(),
        Some(other) => json_text(enc, other),
        None => 0,
    };
    let tools = match body.get("tools") {
        Some(Value::Array(tools)) if !tools.is_empty() => {
            let forced = matches!(
                body.get("tool_choice")
                    .and_then(|c| c.get("type"))
                    .and_then(Value::as_str),
                Some("any" | "tool")
            );
            let system_prompt = if forced {
                ANTHROPIC_TOOL_SYSTEM_FORCED
            } else {
                ANTHROPIC_TOOL_SYSTEM_AUTO
            };
            system_prompt + tools.iter().map(|t| json_text(enc, t)).sum::<u64>()
        }
        None | Some(Value::Null) | Some(Value::Array(_)) => 0,
        Some(other) => json_text(enc, other),
    };
    REPLY_PRIMING + system + messages + tools
}

/// The first field of a request that makes the upstream read input this estimate cannot see,
/// by its name: state kept upstream (`previous_response_id`, `conversation`, a stored
/// `prompt`, `item_reference` items), files by id or URL, remote MCP servers, and
/// `file_search` tools (their results are billed as input). The hold of such a request is
/// not a worst case from the visible text alone; the engine holds
/// `[quota].unseen_input_tokens` for it.
pub fn unseen_input(body: &Value) -> Option<&'static str> {
    let obj = body.as_object()?;
    let present = |k: &str| !matches!(obj.get(k), None | Some(Value::Null));
    for field in [
        "previous_response_id",
        "conversation",
        "prompt",
        "mcp_servers",
    ] {
        // `prompt` of the legacy completions route is the visible input itself.
        if field == "prompt" && !matches!(obj.get("prompt"), Some(Value::Object(_))) {
            continue;
        }
        if present(field) {
            return Some(field);
        }
    }
    if let Some(Value::Array(tools)) = obj.get("tools") {
        for tool in tools {
            let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
            if kind == "mcp" || kind == "file_search" {
                return Some("tools");
            }
        }
    }
    for key in ["input", "messages", "instructions", "system"] {
        if let Some(v) = obj.get(key)
            && let Some(f) = unseen_in(v, 0)
        {
            return Some(f);
        }
    }
    None
}

/// Depth bound of [`unseen_in`] (bodies are parsed with serde_json's own recursion limit).
const UNSEEN_DEPTH: usize = 64;

/// A reference to input kept elsewhere, anywhere inside message content.
fn unseen_in(v: &Value, depth: usize) -> Option<&'static str> {
    if depth > UNSEEN_DEPTH {
        return None;
    }
    match v {
        Value::Array(items) => items.iter().find_map(|x| unseen_in(x, depth + 1)),
        Value::Object(o) => {
            let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
            if kind == "item_reference" {
                return Some("item_reference");
            }
            // Files by id (OpenAI `file_id` parts, Anthropic `file` sources) or by URL
            // (OpenAI `file_url`, Anthropic documents with a `url` source).
            if !o.contains_key("file_data") {
                if matches!(o.get("file_id"), Some(Value::String(_))) {
                    return Some("file_id");
                }
                if matches!(o.get("file_url"), Some(Value::String(_))) {
                    return Some("file_url");
                }
            }
            if kind == "document"
                && let Some(src) = o
                    .get("source")
                    .and_then(|s| s.get("type"))
                    .and_then(Value::as_str)
                && (src == "url" || src == "file")
            {
                return Some("document source");
            }
            o.values().find_map(|x| unseen_in(x, depth + 1))
        }
        _ => None,
    }
}

#[cfg(test)]
mod unseen_tests {
    use serde_json::json;

    use super::unseen_input;

    #[test]
    fn unseen_input_names_what_the_estimate_cannot_see() {
        let cases = [
            (
                json!({"previous_response_id": "resp_1", "input": "hi"}),
                Some("previous_response_id"),
            ),
            (
                json!({"conversation": {"id": "conv_1"}}),
                Some("conversation"),
            ),
            (json!({"prompt": {"id": "pmpt_1"}}), Some("prompt")),
            (
                json!({"input": [{"type": "item_reference", "id": "msg_1"}]}),
                Some("item_reference"),
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
                Some("file_id"),
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x"}]}]}),
                Some("file_url"),
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]}),
                Some("file_id"),
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "https://x"}}]}]}),
                Some("document source"),
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}]}]}),
                Some("document source"),
            ),
            (
                json!({"mcp_servers": [{"url": "https://x"}]}),
                Some("mcp_servers"),
            ),
            (
                json!({"tools": [{"type": "file_search", "vector_store_ids": ["vs"]}]}),
                Some("tools"),
            ),
            (
                json!({"tools": [{"type": "mcp", "server_url": "https://x"}]}),
                Some("tools"),
            ),
            // Everything in the body is counted: nothing unseen.
            (
                json!({"previous_response_id": null, "input": "hi", "prompt": "text"}),
                None,
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_data": "data:x", "file_id": "f"}]}]}),
                None,
            ),
            (
                json!({"tools": [{"type": "function", "name": "f"}], "messages": [{"role": "user", "content": "file_id"}]}),
                None,
            ),
            (json!([1, 2]), None),
        ];
        for (body, want) in cases {
            assert_eq!(unseen_input(&body), want, "{body}");
        }
    }
}
