//! OpenAI wire formats of the mock: Chat Completions (JSON and SSE), Responses (JSON and SSE
//! with `event:` lines), legacy Completions, Embeddings, and OpenAI's error shape.
//!
//! Shapes follow what api.openai.com sends today, field for field where a consumer could care:
//! streamed chat chunks carry `"usage": null` only when `stream_options.include_usage` is true,
//! and then a last chunk with `"choices": []` carries the usage before `data: [DONE]`. Every
//! chat chunk and Responses object carries the `service_tier` served: the request's
//! (`fast` and `priority` are served as `priority`, `auto` and none as `default`) unless
//! `x-mock-service-tier` overrides it. Cache writes are reported in the input details
//! (`cache_write_tokens`, with `cache_write_tokens_details` when some are 12-hour writes), audio
//! tokens in both details objects, and web searches as `web_search_call` output items.

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};

use super::sse::Script;
use super::text::{
    Counted, Prompt, Rng, Turn, TurnSpec, build_turn, encoding_for_model, fingerprint, fnv1a, mix,
    push_json_str,
};
use super::{Invalid, Plan, PlanCtx};

/// Message OpenAI sends with a 500 and with a mid-stream `server_error`.
const SERVER_ERROR_MESSAGE: &str =
    "The server had an error while processing your request. Sorry about that!";

/// `{"error":{"message","type","param","code"}}`.
pub(crate) fn error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Bytes {
    Bytes::from(
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
            .to_string(),
    )
}

/// The body OpenAI sends for `status`, as injected by `x-mock-status`.
pub(crate) fn status_error(status: u16, model: &str) -> Bytes {
    let (message, kind, code) = match status {
        401 => (
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.".to_owned(),
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        403 => (
            format!("Project does not have access to model `{model}`"),
            "invalid_request_error",
            Some("model_not_found"),
        ),
        404 => (
            format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            Some("model_not_found"),
        ),
        429 => (
            format!(
                "Rate limit reached for {model} in organization org-mock on requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in 1s."
            ),
            "requests",
            Some("rate_limit_exceeded"),
        ),
        500 => (SERVER_ERROR_MESSAGE.to_owned(), "server_error", None),
        503 => (
            "The engine is currently overloaded, please try again later".to_owned(),
            "server_error",
            None,
        ),
        s if s >= 500 => (
            format!("Upstream error {s}"),
            "server_error",
            None,
        ),
        s => (
            format!("Request failed with status {s}"),
            "invalid_request_error",
            None,
        ),
    };
    error_body(&message, kind, None, code)
}

/// Route tags keep cache keys and seeds of different routes apart.
const TAG_CHAT: u64 = 1;
const TAG_RESPONSES: u64 = 2;
const TAG_COMPLETIONS: u64 = 3;
const TAG_EMBEDDINGS: u64 = 4;

/// The tier a response reports: `x-mock-service-tier`, else the request's as OpenAI serves it.
fn served_tier(body: &Value, turn: &Turn) -> String {
    if let Some(t) = &turn.service_tier {
        return t.clone();
    }
    match body.get("service_tier").and_then(Value::as_str) {
        Some("fast" | "priority") => "priority".to_owned(),
        Some(t @ ("flex" | "scale" | "ultrafast")) => t.to_owned(),
        _ => "default".to_owned(),
    }
}

/// `prompt_tokens_details` / `input_tokens_details`: cache reads and writes (with their
/// retention split when some are 12-hour writes) and, for chat, audio.
fn input_details(turn: &Turn, audio: bool) -> Value {
    let (read, write, long) = turn.openai_cache();
    let mut d = json!({"cached_tokens": read, "cache_write_tokens": write});
    if long > 0 {
        d["cache_write_tokens_details"] =
            json!({"ttl_30m_tokens": write - long, "ttl_12h_tokens": long});
    }
    if audio {
        d["audio_tokens"] = json!(turn.audio_input_tokens);
    }
    d
}

fn require_model(body: &Value) -> Result<String, Invalid> {
    match body.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => Ok(m.to_owned()),
        _ => Err(Invalid::new(
            "you must provide a model parameter",
            Some("model"),
        )),
    }
}

fn u64_field(body: &Value, names: &[&str]) -> Option<u64> {
    names
        .iter()
        .find_map(|n| body.get(*n).and_then(Value::as_u64))
}

fn stream_flags(body: &Value) -> Result<(bool, bool), Invalid> {
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let options = body.get("stream_options").filter(|v| !v.is_null());
    if options.is_some() && !stream {
        return Err(Invalid::new(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
        ));
    }
    let include_usage = options
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok((stream, include_usage))
}

/// Pushes the text of a `content` value: a string, or an array of parts with `text`.
fn push_content(prompt: &mut Prompt, content: Option<&Value>) {
    match content {
        Some(Value::String(s)) => prompt.push(s),
        Some(Value::Array(parts)) => {
            for part in parts {
                if let Some(t) = part.get("text").and_then(Value::as_str) {
                    prompt.push(t);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Chat Completions

pub(crate) fn chat(body: &Value, ctx: &PlanCtx<'_>) -> Result<Plan, Invalid> {
    let model = require_model(body)?;
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err(Invalid::new(
            "Missing required parameter: 'messages'.",
            Some("messages"),
        ));
    };
    let (stream, include_usage) = stream_flags(body)?;
    let tool_name = ctx.controls.tool_call.then(|| {
        body.pointer("/tools/0/function/name")
            .and_then(Value::as_str)
            .unwrap_or("get_weather")
            .to_owned()
    });
    let spec = TurnSpec {
        route_tag: TAG_CHAT,
        model,
        body_hash: ctx.body_hash,
        max_output: u64_field(body, &["max_completion_tokens", "max_tokens"]),
        tool_name,
        include_usage,
        salt: ctx.salt,
    };
    let mut turn = build_turn(spec, ctx.controls, ctx.cache, || {
        let mut prompt = Prompt {
            messages: Some(messages.len() as u64),
            ..Prompt::default()
        };
        for m in messages {
            push_content(&mut prompt, m.get("content"));
            if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                for call in calls {
                    if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str)
                    {
                        prompt.push(args);
                    }
                }
            }
        }
        prompt
    });
    turn.service_tier = Some(served_tier(body, &turn));
    if stream {
        Ok(Plan::Stream(Box::new(ChatScript::new(
            turn,
            ChatKind::Chat,
        ))))
    } else {
        Ok(Plan::Json(chat_json(turn)))
    }
}

fn chat_usage(turn: &Turn) -> Value {
    let output = turn.output_tokens();
    json!({
        "prompt_tokens": turn.prompt_tokens(),
        "completion_tokens": output,
        "total_tokens": turn.prompt_tokens() + output,
        "prompt_tokens_details": input_details(turn, true),
        "completion_tokens_details": {
            "reasoning_tokens": turn.reasoning_tokens,
            "audio_tokens": turn.audio_output_tokens,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

fn finish_reason(turn: &Turn) -> &'static str {
    if turn.truncated {
        "length"
    } else if turn.tool_name.is_some() {
        "tool_calls"
    } else {
        "stop"
    }
}

fn chat_json(mut turn: Turn) -> Bytes {
    let id = format!("chatcmpl-{}", turn.ids.base62(29));
    let message = match &turn.tool_name {
        Some(name) => json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": format!("call_{}", turn.ids.base62(24)),
                "type": "function",
                "function": {"name": name, "arguments": turn.text}
            }],
            "refusal": null,
            "annotations": []
        }),
        None => json!({
            "role": "assistant",
            "content": turn.text,
            "refusal": null,
            "annotations": []
        }),
    };
    let mut doc = json!({
        "id": id,
        "object": "chat.completion",
        "created": turn.created,
        "model": turn.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(&turn)
        }],
        "service_tier": turn.service_tier.as_deref().unwrap_or("default"),
        "system_fingerprint": fingerprint(&turn.model)
    });
    if !turn.no_usage {
        doc["usage"] = chat_usage(&turn);
    }
    Bytes::from(doc.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChatKind {
    Chat,
    Completion,
}

/// SSE script shared by chat completions and legacy completions (same framing, different
/// choice objects).
struct ChatScript {
    turn: Turn,
    kind: ChatKind,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"choices":` — everything before the
    /// choices array, identical in every chunk of one response.
    prefix: String,
    call_id: String,
}

impl ChatScript {
    fn new(mut turn: Turn, kind: ChatKind) -> Self {
        let (id, object) = match kind {
            ChatKind::Chat => (
                format!("chatcmpl-{}", turn.ids.base62(29)),
                "chat.completion.chunk",
            ),
            ChatKind::Completion => (format!("cmpl-{}", turn.ids.base62(29)), "text_completion"),
        };
        let call_id = format!("call_{}", turn.ids.base62(24));
        let mut prefix = String::from("data: {\"id\":");
        push_json_str(&mut prefix, &id);
        prefix.push_str(",\"object\":\"");
        prefix.push_str(object);
        prefix.push_str("\",\"created\":");
        prefix.push_str(&turn.created.to_string());
        prefix.push_str(",\"model\":");
        push_json_str(&mut prefix, &turn.model);
        if kind == ChatKind::Chat {
            prefix.push_str(",\"service_tier\":");
            push_json_str(
                &mut prefix,
                turn.service_tier.as_deref().unwrap_or("default"),
            );
            prefix.push_str(",\"system_fingerprint\":");
            push_json_str(&mut prefix, &fingerprint(&turn.model));
        }
        prefix.push_str(",\"choices\":");
        Self {
            turn,
            kind,
            prefix,
            call_id,
        }
    }

    /// One `data:` event around a choices array; `usage` goes in only when the client asked
    /// for usage (`null` on every chunk but the last, as OpenAI does).
    fn event(&self, choices: &str, usage: Option<&str>) -> Bytes {
        let mut out = String::with_capacity(self.prefix.len() + choices.len() + 32);
        out.push_str(&self.prefix);
        out.push_str(choices);
        if self.turn.include_usage {
            out.push_str(",\"usage\":");
            out.push_str(usage.unwrap_or("null"));
        }
        out.push_str("}\n\n");
        Bytes::from(out)
    }
}

impl Script for ChatScript {
    fn head(&mut self) -> Vec<Bytes> {
        if self.kind == ChatKind::Completion {
            return Vec::new();
        }
        let delta = match &self.turn.tool_name {
            Some(name) => json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "index": 0,
                    "id": self.call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""}
                }],
                "refusal": null
            }),
            None => json!({"role": "assistant", "content": "", "refusal": null}),
        };
        let choices =
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]);
        vec![self.event(&choices.to_string(), None)]
    }

    fn content_count(&self) -> usize {
        self.turn.chunk_count()
    }

    fn content(&mut self, index: usize) -> Bytes {
        let piece = self.turn.chunk(index);
        let mut choices = String::with_capacity(piece.len() + 96);
        match (self.kind, self.turn.tool_name.is_some()) {
            (ChatKind::Completion, _) => {
                choices.push_str("[{\"text\":");
                push_json_str(&mut choices, piece);
                choices.push_str(",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]");
            }
            (ChatKind::Chat, true) => {
                choices.push_str(
                    "[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":",
                );
                push_json_str(&mut choices, piece);
                choices.push_str("}}]},\"logprobs\":null,\"finish_reason\":null}]");
            }
            (ChatKind::Chat, false) => {
                choices.push_str("[{\"index\":0,\"delta\":{\"content\":");
                push_json_str(&mut choices, piece);
                choices.push_str("},\"logprobs\":null,\"finish_reason\":null}]");
            }
        }
        self.event(&choices, None)
    }

    fn tail(&mut self) -> Vec<Bytes> {
        let reason = finish_reason(&self.turn);
        let last = match self.kind {
            ChatKind::Chat => {
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason}])
            }
            ChatKind::Completion => {
                json!([{"text": "", "index": 0, "logprobs": null, "finish_reason": reason}])
            }
        };
        let mut events = vec![self.event(&last.to_string(), None)];
        if self.turn.include_usage && !self.turn.no_usage {
            let usage = match self.kind {
                ChatKind::Chat => chat_usage(&self.turn),
                ChatKind::Completion => completion_usage(&self.turn),
            };
            events.push(self.event("[]", Some(&usage.to_string())));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        events
    }

    fn error(&mut self) -> Vec<Bytes> {
        let body = json!({"error": {
            "message": SERVER_ERROR_MESSAGE,
            "type": "server_error",
            "param": null,
            "code": null
        }});
        vec![Bytes::from(format!("data: {body}\n\n"))]
    }
}

// ---------------------------------------------------------------------------------------------
// Legacy Completions

pub(crate) fn completions(body: &Value, ctx: &PlanCtx<'_>) -> Result<Plan, Invalid> {
    let model = require_model(body)?;
    let Some(prompt_value) = body.get("prompt").filter(|p| !p.is_null()) else {
        return Err(Invalid::new(
            "Missing required parameter: 'prompt'.",
            Some("prompt"),
        ));
    };
    let (stream, include_usage) = stream_flags(body)?;
    let spec = TurnSpec {
        route_tag: TAG_COMPLETIONS,
        model,
        body_hash: ctx.body_hash,
        max_output: u64_field(body, &["max_tokens"]),
        tool_name: None,
        include_usage,
        salt: ctx.salt,
    };
    let turn = build_turn(spec, ctx.controls, ctx.cache, || text_inputs(prompt_value));
    if stream {
        return Ok(Plan::Stream(Box::new(ChatScript::new(
            turn,
            ChatKind::Completion,
        ))));
    }
    let mut turn = turn;
    let mut doc = json!({
        "id": format!("cmpl-{}", turn.ids.base62(29)),
        "object": "text_completion",
        "created": turn.created,
        "model": turn.model,
        "choices": [{
            "text": turn.text,
            "index": 0,
            "logprobs": null,
            "finish_reason": finish_reason(&turn)
        }]
    });
    if !turn.no_usage {
        doc["usage"] = completion_usage(&turn);
    }
    Ok(Plan::Json(Bytes::from(doc.to_string())))
}

fn completion_usage(turn: &Turn) -> Value {
    let output = turn.output_tokens();
    let mut usage = json!({
        "prompt_tokens": turn.prompt_tokens(),
        "completion_tokens": output,
        "total_tokens": turn.prompt_tokens() + output
    });
    if turn.cached_tokens > 0 || turn.cache_write_tokens > 0 || turn.cache_write_1h_tokens > 0 {
        usage["prompt_tokens_details"] = input_details(turn, false);
    }
    if turn.reasoning_tokens > 0 {
        usage["completion_tokens_details"] = json!({"reasoning_tokens": turn.reasoning_tokens});
    }
    usage
}

/// Completions `prompt` / embeddings `input`: a string, an array of strings, an array of token
/// ids, or an array of token-id arrays. Counted exactly, without message overhead.
fn text_inputs(value: &Value) -> Prompt {
    let mut prompt = Prompt::default();
    let mut add = |v: &Value| match v {
        Value::String(s) => prompt.apart.push(s.clone()),
        Value::Number(_) => prompt.token_ids += 1,
        Value::Array(ids) => prompt.token_ids += ids.len() as u64,
        _ => {}
    };
    match value {
        Value::Array(items) => items.iter().for_each(&mut add),
        other => add(other),
    }
    prompt
}

// ---------------------------------------------------------------------------------------------
// Embeddings

/// Vector length when the request does not ask for `dimensions`: small on purpose, the mock's
/// vectors only need to be deterministic and well-formed.
const DEFAULT_DIMENSIONS: u64 = 16;
const MAX_DIMENSIONS: u64 = 3072;

pub(crate) fn embeddings(body: &Value, ctx: &PlanCtx<'_>) -> Result<Plan, Invalid> {
    let model = require_model(body)?;
    let inputs: Vec<&Value> = match body.get("input") {
        Some(whole @ Value::Array(items))
            if !items.is_empty() && items.iter().all(Value::is_number) =>
        {
            vec![whole]
        }
        Some(Value::Array(items)) if !items.is_empty() => items.iter().collect(),
        Some(v @ Value::String(_)) => vec![v],
        _ => {
            return Err(Invalid::new(
                "'input' is a required property and must be a non-empty string or array",
                Some("input"),
            ));
        }
    };
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(v) => match v.as_u64() {
            Some(d) if (1..=MAX_DIMENSIONS).contains(&d) => d,
            _ => {
                return Err(Invalid::new(
                    "'dimensions' must be an integer between 1 and 3072",
                    Some("dimensions"),
                ));
            }
        },
    };
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let enc = encoding_for_model(&model);
    let key = mix(&[TAG_EMBEDDINGS, ctx.body_hash, enc as u64]);
    let counted = ctx.cache.get_or(key, || Counted {
        input: inputs.iter().map(|v| text_inputs(v).count(enc)).sum(),
        visible_output: 0,
        text_len: 0,
        truncated: false,
    });
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embedding_vector(input, dimensions as usize);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let mut doc = json!({"object": "list", "data": data, "model": model});
    if !ctx.controls.no_usage {
        doc["usage"] = json!({"prompt_tokens": counted.input, "total_tokens": counted.input});
    }
    Ok(Plan::Json(Bytes::from(doc.to_string())))
}

/// Unit-length vector seeded by the input, so equal inputs embed equally.
fn embedding_vector(input: &Value, dimensions: usize) -> Vec<f32> {
    let mut rng = Rng::new(fnv1a(input.to_string().as_bytes()) ^ dimensions as u64);
    let raw: Vec<f64> = (0..dimensions)
        .map(|_| (rng.below(2_000_001) as f64 / 1_000_000.0) - 1.0)
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    raw.iter().map(|x| (x / norm) as f32).collect()
}

// ---------------------------------------------------------------------------------------------
// Responses

pub(crate) fn responses(body: &Value, ctx: &PlanCtx<'_>) -> Result<Plan, Invalid> {
    let model = require_model(body)?;
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let tool_name = ctx.controls.tool_call.then(|| {
        body.pointer("/tools/0/name")
            .and_then(Value::as_str)
            .unwrap_or("get_weather")
            .to_owned()
    });
    let spec = TurnSpec {
        route_tag: TAG_RESPONSES,
        model,
        body_hash: ctx.body_hash,
        max_output: u64_field(body, &["max_output_tokens"]),
        tool_name,
        include_usage: true,
        salt: ctx.salt,
    };
    let mut turn = build_turn(spec, ctx.controls, ctx.cache, || responses_prompt(body));
    turn.service_tier = Some(served_tier(body, &turn));
    let script = ResponsesScript::new(turn, body);
    if stream {
        Ok(Plan::Stream(Box::new(script)))
    } else {
        Ok(Plan::Json(Bytes::from(script.final_response().to_string())))
    }
}

/// `instructions` count as one message; `input` is one user message when a string, else each
/// item is a message (its content parts, a function call's arguments or a call's output).
fn responses_prompt(body: &Value) -> Prompt {
    let mut prompt = Prompt {
        messages: Some(0),
        ..Prompt::default()
    };
    let mut messages = 0u64;
    if let Some(instructions) = body.get("instructions").and_then(Value::as_str) {
        prompt.push(instructions);
        messages += 1;
    }
    match body.get("input") {
        Some(Value::String(s)) => {
            prompt.push(s);
            messages += 1;
        }
        Some(Value::Array(items)) => {
            for item in items {
                messages += 1;
                push_content(&mut prompt, item.get("content"));
                for field in ["arguments", "output"] {
                    if let Some(s) = item.get(field).and_then(Value::as_str) {
                        prompt.push(s);
                    }
                }
            }
        }
        _ => {}
    }
    prompt.messages = Some(messages);
    prompt
}

struct ResponsesScript {
    turn: Turn,
    seq: u64,
    item_id: String,
    call_id: String,
    /// Ids of the web search calls, which come first in `output`; the answer item follows.
    searches: Vec<String>,
    /// The response object with the request's echoed settings, before status/output/usage.
    template: Value,
}

impl ResponsesScript {
    fn new(mut turn: Turn, body: &Value) -> Self {
        let response_id = format!("resp_{}", turn.ids.hex(50));
        let item_id = if turn.tool_name.is_some() {
            format!("fc_{}", turn.ids.hex(50))
        } else {
            format!("msg_{}", turn.ids.hex(50))
        };
        let call_id = format!("call_{}", turn.ids.base62(24));
        let searches = (0..turn.web_searches)
            .map(|_| format!("ws_{}", turn.ids.hex(50)))
            .collect();
        let echo = |name: &str, default: Value| {
            body.get(name)
                .filter(|v| !v.is_null())
                .cloned()
                .unwrap_or(default)
        };
        let template = json!({
            "id": response_id,
            "object": "response",
            "created_at": turn.created,
            "status": "in_progress",
            "background": false,
            "error": null,
            "incomplete_details": null,
            "instructions": echo("instructions", Value::Null),
            "max_output_tokens": echo("max_output_tokens", Value::Null),
            "max_tool_calls": null,
            "model": turn.model,
            "output": [],
            "parallel_tool_calls": echo("parallel_tool_calls", json!(true)),
            "previous_response_id": echo("previous_response_id", Value::Null),
            "reasoning": {
                "effort": body.pointer("/reasoning/effort").cloned().unwrap_or(Value::Null),
                "summary": null
            },
            "service_tier": echo("service_tier", json!("auto")),
            "store": echo("store", json!(true)),
            "temperature": echo("temperature", json!(1.0)),
            "text": echo("text", json!({"format": {"type": "text"}})),
            "tool_choice": echo("tool_choice", json!("auto")),
            "tools": echo("tools", json!([])),
            "top_p": echo("top_p", json!(1.0)),
            "truncation": echo("truncation", json!("disabled")),
            "usage": null,
            "user": echo("user", Value::Null),
            "metadata": echo("metadata", json!({}))
        });
        Self {
            turn,
            seq: 0,
            item_id,
            call_id,
            searches,
            template,
        }
    }

    /// Position of the answer item in `output`, after the web search calls.
    fn answer_index(&self) -> usize {
        self.searches.len()
    }

    fn usage(&self) -> Value {
        if self.turn.no_usage {
            return Value::Null;
        }
        let output = self.turn.output_tokens();
        json!({
            "input_tokens": self.turn.prompt_tokens(),
            "input_tokens_details": input_details(&self.turn, false),
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": self.turn.reasoning_tokens},
            "total_tokens": self.turn.prompt_tokens() + output
        })
    }

    /// Web search call `i`, as `response.output` and `output_item.*` events carry it.
    fn search(&self, i: usize, done: bool) -> Value {
        let mut item = json!({
            "type": "web_search_call",
            "id": self.searches[i],
            "status": if done { "completed" } else { "in_progress" }
        });
        if done {
            item["action"] = json!({"type": "search", "query": format!("search {}", i + 1)});
        }
        item
    }

    fn item(&self, done: bool) -> Value {
        let status = if done { "completed" } else { "in_progress" };
        match &self.turn.tool_name {
            Some(name) => json!({
                "id": self.item_id,
                "type": "function_call",
                "status": status,
                "arguments": if done { self.turn.text.as_str() } else { "" },
                "call_id": self.call_id,
                "name": name
            }),
            None => json!({
                "id": self.item_id,
                "type": "message",
                "status": status,
                "content": if done { json!([self.part(true)]) } else { json!([]) },
                "role": "assistant"
            }),
        }
    }

    fn part(&self, done: bool) -> Value {
        let text = if done { self.turn.text.as_str() } else { "" };
        json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
    }

    fn response(&self, status: &str) -> Value {
        let mut r = self.template.clone();
        r["status"] = json!(status);
        r
    }

    fn final_response(&self) -> Value {
        let mut r = if self.turn.truncated {
            let mut r = self.response("incomplete");
            r["incomplete_details"] = json!({"reason": "max_output_tokens"});
            r
        } else {
            self.response("completed")
        };
        let mut output: Vec<Value> = (0..self.searches.len())
            .map(|i| self.search(i, true))
            .collect();
        output.push(self.item(true));
        r["output"] = json!(output);
        r["service_tier"] = json!(self.turn.service_tier.as_deref().unwrap_or("default"));
        r["usage"] = self.usage();
        r
    }

    /// `event: <type>` + `data:` carrying `type` and the next `sequence_number`.
    fn event(&mut self, kind: &str, mut payload: Value) -> Bytes {
        payload["type"] = json!(kind);
        payload["sequence_number"] = json!(self.seq);
        self.seq += 1;
        Bytes::from(format!("event: {kind}\ndata: {payload}\n\n"))
    }
}

impl Script for ResponsesScript {
    fn head(&mut self) -> Vec<Bytes> {
        let created = json!({"response": self.response("in_progress")});
        let mut events = vec![
            self.event("response.created", created.clone()),
            self.event("response.in_progress", created),
        ];
        // Each web search runs before the answer: added, in progress, searching, completed,
        // done.
        for i in 0..self.searches.len() {
            let added = json!({"output_index": i, "item": self.search(i, false)});
            events.push(self.event("response.output_item.added", added));
            for phase in ["in_progress", "searching", "completed"] {
                let progress = json!({"output_index": i, "item_id": self.searches[i]});
                events.push(self.event(&format!("response.web_search_call.{phase}"), progress));
            }
            let done = json!({"output_index": i, "item": self.search(i, true)});
            events.push(self.event("response.output_item.done", done));
        }
        let index = self.answer_index();
        let item = json!({"output_index": index, "item": self.item(false)});
        events.push(self.event("response.output_item.added", item));
        if self.turn.tool_name.is_none() {
            let part = json!({
                "item_id": self.item_id,
                "output_index": index,
                "content_index": 0,
                "part": self.part(false)
            });
            events.push(self.event("response.content_part.added", part));
        }
        events
    }

    fn content_count(&self) -> usize {
        self.turn.chunk_count()
    }

    fn content(&mut self, index: usize) -> Bytes {
        let piece = self.turn.chunk(index);
        let kind = if self.turn.tool_name.is_some() {
            "response.function_call_arguments.delta"
        } else {
            "response.output_text.delta"
        };
        let mut out = String::with_capacity(piece.len() + 200);
        out.push_str("event: ");
        out.push_str(kind);
        out.push_str("\ndata: {\"type\":\"");
        out.push_str(kind);
        out.push_str("\",\"sequence_number\":");
        out.push_str(&self.seq.to_string());
        out.push_str(",\"item_id\":\"");
        out.push_str(&self.item_id);
        out.push_str("\",\"output_index\":");
        out.push_str(&self.answer_index().to_string());
        out.push(',');
        if self.turn.tool_name.is_none() {
            out.push_str("\"content_index\":0,");
        }
        out.push_str("\"delta\":");
        push_json_str(&mut out, piece);
        if self.turn.tool_name.is_none() {
            out.push_str(",\"logprobs\":[]");
        }
        out.push_str("}\n\n");
        self.seq += 1;
        Bytes::from(out)
    }

    fn tail(&mut self) -> Vec<Bytes> {
        let mut events = Vec::with_capacity(5);
        let index = self.answer_index();
        if self.turn.tool_name.is_some() {
            let done = json!({
                "item_id": self.item_id,
                "output_index": index,
                "arguments": self.turn.text
            });
            events.push(self.event("response.function_call_arguments.done", done));
        } else {
            let text_done = json!({
                "item_id": self.item_id,
                "output_index": index,
                "content_index": 0,
                "text": self.turn.text,
                "logprobs": []
            });
            events.push(self.event("response.output_text.done", text_done));
            let part_done = json!({
                "item_id": self.item_id,
                "output_index": index,
                "content_index": 0,
                "part": self.part(true)
            });
            events.push(self.event("response.content_part.done", part_done));
        }
        let item_done = json!({"output_index": index, "item": self.item(true)});
        events.push(self.event("response.output_item.done", item_done));
        let kind = if self.turn.truncated {
            "response.incomplete"
        } else {
            "response.completed"
        };
        let last = json!({"response": self.final_response()});
        events.push(self.event(kind, last));
        events
    }

    fn error(&mut self) -> Vec<Bytes> {
        let error = json!({"code": "server_error", "message": SERVER_ERROR_MESSAGE, "param": null});
        let mut failed = self.response("failed");
        failed["error"] = json!({"code": "server_error", "message": SERVER_ERROR_MESSAGE});
        vec![
            self.event("error", error),
            self.event("response.failed", json!({"response": failed})),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_inputs_cover_every_prompt_shape() {
        let p = text_inputs(&json!("hello world"));
        assert_eq!(
            (p.apart.clone(), p.token_ids),
            (vec!["hello world".to_owned()], 0)
        );
        let p = text_inputs(&json!(["a", "b"]));
        assert_eq!(p.apart, vec!["a".to_owned(), "b".to_owned()]);
        let p = text_inputs(&json!([[1, 2, 3], [4]]));
        assert_eq!(p.token_ids, 4);
    }

    #[test]
    fn embedding_vectors_are_unit_length_and_deterministic() {
        let v = embedding_vector(&json!("x"), 8);
        assert_eq!(v, embedding_vector(&json!("x"), 8));
        assert_ne!(v, embedding_vector(&json!("y"), 8));
        let norm: f32 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }

    #[test]
    fn status_errors_use_openai_classes() {
        let body: Value = serde_json::from_slice(&status_error(429, "gpt-4o")).unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        let body: Value = serde_json::from_slice(&status_error(500, "gpt-4o")).unwrap();
        assert_eq!(body["error"]["type"], "server_error");
        assert!(body["error"]["code"].is_null());
    }
}
