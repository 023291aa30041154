//! Anthropic Messages wire format of the mock (JSON and SSE) and Anthropic's error shape.
//!
//! Stream order is Anthropic's: `message_start` (usage with input and cache counts and
//! `output_tokens: 1`), `content_block_start`, `ping`, `content_block_delta`×N,
//! `content_block_stop`, `message_delta` (usage.output_tokens is the cumulative total — a
//! consumer that adds it to message_start's 1 counts one token too many), `message_stop`.
//!
//! Usage follows the current API: `cache_creation` splits cache writes into 5-minute and
//! 1-hour ones, `service_tier` (default `standard`), `speed` and `inference_geo` (when the
//! request or an `x-mock-*` header sets them) come in the message and in `message_start`; web
//! searches are counted in `server_tool_use.web_search_requests`, which `message_start` reports
//! as 0 (searches run during the answer) and the cumulative `message_delta` usage as the total.

use bytes::Bytes;
use serde_json::{Value, json};

use super::sse::Script;
use super::text::{Prompt, Rng, Turn, TurnSpec, build_turn};
use super::{Invalid, Plan, PlanCtx};

const TAG_MESSAGES: u64 = 10;

/// `{"type":"error","error":{"type","message"},"request_id"}`.
pub(crate) fn error_body(kind: &str, message: &str, request_id: &str) -> Bytes {
    Bytes::from(
        json!({
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": request_id
        })
        .to_string(),
    )
}

/// Anthropic's error class for an HTTP status.
pub(crate) fn error_kind(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// The body Anthropic sends for `status`, as injected by `x-mock-status`.
pub(crate) fn status_error(status: u16, model: &str, request_id: &str) -> Bytes {
    let message = match status {
        401 => "invalid x-api-key".to_owned(),
        403 => "Your API key does not have permission to use the specified resource.".to_owned(),
        404 => format!("model: {model}"),
        413 => "Request exceeds the maximum allowed number of bytes.".to_owned(),
        429 => "Number of request tokens has exceeded your per-minute rate limit; see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later.".to_owned(),
        500 => "Internal server error".to_owned(),
        504 => "Request timed out".to_owned(),
        529 => "Overloaded".to_owned(),
        s => format!("Request failed with status {s}"),
    };
    error_body(error_kind(status), &message, request_id)
}

pub(crate) fn messages(body: &Value, ctx: &PlanCtx<'_>) -> Result<Plan, Invalid> {
    let model = match body.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => return Err(Invalid::new("model: Field required", None)),
    };
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err(Invalid::new("messages: Field required", None));
    };
    let Some(max_tokens) = body.get("max_tokens").and_then(Value::as_u64) else {
        return Err(Invalid::new("max_tokens: Field required", None));
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let tool_name = ctx.controls.tool_call.then(|| {
        body.pointer("/tools/0/name")
            .and_then(Value::as_str)
            .unwrap_or("get_weather")
            .to_owned()
    });
    let spec = TurnSpec {
        route_tag: TAG_MESSAGES,
        model,
        body_hash: ctx.body_hash,
        max_output: Some(max_tokens),
        tool_name,
        include_usage: true,
        salt: ctx.salt,
    };
    let mut turn = build_turn(spec, ctx.controls, ctx.cache, || prompt(body, messages));
    let asked = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_owned);
    turn.speed = turn.speed.take().or_else(|| asked("speed"));
    turn.inference_geo = turn.inference_geo.take().or_else(|| asked("inference_geo"));
    let script = MessagesScript::new(turn);
    if stream {
        Ok(Plan::Stream(Box::new(script)))
    } else {
        Ok(Plan::Json(Bytes::from(script.message_json().to_string())))
    }
}

/// `system` counts as one message; each message's text blocks, tool results and tool inputs
/// are its text.
pub(crate) fn prompt(body: &Value, messages: &[Value]) -> Prompt {
    let mut prompt = Prompt::default();
    let mut count = messages.len() as u64;
    if let Some(system) = body.get("system").filter(|s| !s.is_null()) {
        count += 1;
        push_blocks(&mut prompt, system);
    }
    for m in messages {
        if let Some(content) = m.get("content") {
            push_blocks(&mut prompt, content);
        }
    }
    prompt.messages = Some(count);
    prompt
}

fn push_blocks(prompt: &mut Prompt, content: &Value) {
    match content {
        Value::String(s) => prompt.push(s),
        Value::Array(blocks) => {
            for block in blocks {
                if let Some(t) = block.get("text").and_then(Value::as_str) {
                    prompt.push(t);
                }
                if let Some(inner) = block.get("content") {
                    push_blocks(prompt, inner);
                }
                if let Some(input) = block.get("input") {
                    prompt.push(&input.to_string());
                }
            }
        }
        _ => {}
    }
}

struct MessagesScript {
    turn: Turn,
    message_id: String,
    tool_use_id: String,
}

impl MessagesScript {
    fn new(mut turn: Turn) -> Self {
        let message_id = format!("msg_01{}", turn.ids.base62(22));
        let tool_use_id = format!("toolu_01{}", turn.ids.base62(22));
        Self {
            turn,
            message_id,
            tool_use_id,
        }
    }

    fn stop_reason(&self) -> &'static str {
        if self.turn.truncated {
            "max_tokens"
        } else if self.turn.tool_name.is_some() {
            "tool_use"
        } else {
            "end_turn"
        }
    }

    /// Anthropic's `input_tokens` excludes cache reads and writes, which are reported beside it.
    /// `searches` is the web search count so far.
    fn usage(&self, output_tokens: u64, searches: u64) -> Value {
        let t = &self.turn;
        let mut u = json!({
            "input_tokens": t.input_tokens,
            "cache_creation_input_tokens": t.cache_write_tokens + t.cache_write_1h_tokens,
            "cache_read_input_tokens": t.cached_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": t.cache_write_tokens,
                "ephemeral_1h_input_tokens": t.cache_write_1h_tokens
            },
            "output_tokens": output_tokens,
            "service_tier": t.service_tier.as_deref().unwrap_or("standard")
        });
        if t.web_searches > 0 {
            u["server_tool_use"] =
                json!({"web_search_requests": searches, "web_fetch_requests": 0});
        }
        if let Some(geo) = &t.inference_geo {
            u["inference_geo"] = json!(geo);
        }
        if let Some(speed) = &t.speed {
            u["speed"] = json!(speed);
        }
        u
    }

    /// The cumulative usage of `message_delta`: every count, none of the names.
    fn delta_usage(&self) -> Value {
        let t = &self.turn;
        let mut u = json!({
            "input_tokens": t.input_tokens,
            "cache_creation_input_tokens": t.cache_write_tokens + t.cache_write_1h_tokens,
            "cache_read_input_tokens": t.cached_tokens,
            "output_tokens": t.output_tokens()
        });
        if t.web_searches > 0 {
            u["server_tool_use"] =
                json!({"web_search_requests": t.web_searches, "web_fetch_requests": 0});
        }
        u
    }

    fn message(
        &self,
        content: Value,
        stop_reason: Value,
        output_tokens: u64,
        searches: u64,
    ) -> Value {
        let mut m = json!({
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.turn.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null
        });
        if !self.turn.no_usage {
            m["usage"] = self.usage(output_tokens, searches);
        }
        m
    }

    fn message_json(&self) -> Value {
        let block = match &self.turn.tool_name {
            // Arguments cut by max_tokens are not valid JSON; Anthropic then returns what it
            // could parse, here an empty object.
            Some(name) => json!({
                "type": "tool_use",
                "id": self.tool_use_id,
                "name": name,
                "input": serde_json::from_str::<Value>(&self.turn.text).unwrap_or_else(|_| json!({}))
            }),
            None => json!({"type": "text", "text": self.turn.text}),
        };
        self.message(
            json!([block]),
            json!(self.stop_reason()),
            self.turn.output_tokens(),
            self.turn.web_searches,
        )
    }
}

fn event(kind: &str, payload: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {payload}\n\n"))
}

impl Script for MessagesScript {
    fn head(&mut self) -> Vec<Bytes> {
        let start = json!({
            "type": "message_start",
            "message": self.message(json!([]), Value::Null, 1, 0)
        });
        let block = match &self.turn.tool_name {
            Some(name) => {
                json!({"type": "tool_use", "id": self.tool_use_id, "name": name, "input": {}})
            }
            None => json!({"type": "text", "text": ""}),
        };
        vec![
            event("message_start", &start),
            event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0, "content_block": block}),
            ),
            Bytes::from_static(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"),
        ]
    }

    fn content_count(&self) -> usize {
        self.turn.chunk_count()
    }

    fn content(&mut self, index: usize) -> Bytes {
        let piece = self.turn.chunk(index);
        let mut out = String::with_capacity(piece.len() + 120);
        out.push_str(
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{",
        );
        if self.turn.tool_name.is_some() {
            out.push_str("\"type\":\"input_json_delta\",\"partial_json\":");
        } else {
            out.push_str("\"type\":\"text_delta\",\"text\":");
        }
        super::text::push_json_str(&mut out, piece);
        out.push_str("}}\n\n");
        Bytes::from(out)
    }

    fn tail(&mut self) -> Vec<Bytes> {
        let mut delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason(), "stop_sequence": null}
        });
        if !self.turn.no_usage {
            delta["usage"] = self.delta_usage();
        }
        vec![
            event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            ),
            event("message_delta", &delta),
            event("message_stop", &json!({"type": "message_stop"})),
        ]
    }

    fn error(&mut self) -> Vec<Bytes> {
        let body = json!({
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"}
        });
        vec![event("error", &body)]
    }
}

/// `req_` + 24 base62 characters, Anthropic's request-id format.
pub(crate) fn request_id(rng: &mut Rng) -> String {
    format!("req_{}", rng.base62(24))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_collects_system_and_blocks() {
        let body = json!({
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "user", "content": [
                    {"type": "text", "text": "there"},
                    {"type": "tool_result", "tool_use_id": "t", "content": "42"}
                ]}
            ]
        });
        let messages = body["messages"].as_array().unwrap();
        let p = prompt(&body, messages);
        assert_eq!(p.text, "be brief\nhi\nthere\n42");
        assert_eq!(p.messages, Some(3));
    }

    #[test]
    fn error_kinds_follow_anthropic_classes() {
        assert_eq!(error_kind(529), "overloaded_error");
        assert_eq!(error_kind(429), "rate_limit_error");
        assert_eq!(error_kind(401), "authentication_error");
        assert_eq!(error_kind(502), "api_error");
    }
}
