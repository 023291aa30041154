//! Request bodies: what the engine reads from one before admitting it (model, stream, output
//! bound, completions, held searches, input estimate), and the `Idempotency-Key` rules.

use bytes::Bytes;
use serde_json::Value;

use crate::api::{ApiFormat, Modifiers};
use crate::errors::{ApiError, ErrorCode};
use crate::tokens::{self, Encoding};

/// What was parsed from a request body.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub model: String,
    pub stream: bool,
    /// The body to forward (rewritten when usage reporting was injected).
    pub body: Bytes,
    pub hide_usage: bool,
    pub input_tokens: u64,
    /// The output bound of the whole request: the stated (or default) max output times the
    /// completions the upstream will produce, at most [`MAX_TOKEN_COUNT`].
    pub max_output_tokens: u64,
    pub encoding: Encoding,
    /// The service tier, speed and region the request asks for.
    pub(super) asked: Modifiers,
    /// The request asks the model to reason (output the meter may never see).
    pub reasoning: bool,
    /// Per-call tool uses (web searches) the request allows, held at the entry's fee.
    pub tool_calls: u64,
    /// The first field that makes the upstream read input the estimate cannot see
    /// ([`tokens::unseen_input`]); such a request is held at `[quota].unseen_input_tokens`.
    pub unseen_input: Option<&'static str>,
}

/// Longest `model` accepted (SPEC §4.2): it is written to the ledger, logs and metrics.
pub const MAX_MODEL_LEN: usize = 256;

/// Most completions one request may ask for (`n`, `best_of`); a larger value is a 400.
pub const MAX_COMPLETIONS: u64 = 128;

/// Largest token count held or billed for one request: 2⁴⁰, far above any model's output
/// limit. A larger stated max output (`max_tokens: 1e30`, `18446744073709551615`) is held as
/// this, and a larger count in a response is billed as this (the row is `estimated`):
/// clamped, never wrapped, and every sum of such counts stays far inside `i64`.
pub const MAX_TOKEN_COUNT: u64 = 1 << 40;

/// Web searches held for a request whose web search tool states no bound (Anthropic
/// `max_uses`, Responses `max_tool_calls`).
pub const DEFAULT_HELD_SEARCHES: u64 = 10;

/// Largest number of searches held for one request (a stated bound above it is held as
/// this: 10 000 searches at $0.01 hold $100).
pub const MAX_HELD_SEARCHES: u64 = 10_000;

/// Longest `Idempotency-Key` accepted, in bytes (a longer one is a 400).
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// An `Idempotency-Key` tollgate accepts: 1-255 printable ASCII characters, so that the
/// trace id `<key_id>:<Idempotency-Key>` is a valid header value on every answer.
pub fn valid_idempotency_key(k: &str) -> bool {
    (1..=MAX_IDEMPOTENCY_KEY).contains(&k.len()) && k.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// The trace id of a request by `key_id` that sent `idempotency_key` (SPEC §4.7).
pub fn idempotent_trace_id(key_id: &str, idempotency_key: &str) -> String {
    format!("{key_id}:{idempotency_key}")
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, msg)
}

/// Parse a request body of `format`: model, stream, max output, input estimate, and the
/// body to forward (with `stream_options.include_usage` injected for OpenAI chat streams).
/// Reads untrusted bytes: any input gives `Ok` or a 400, never a panic (tests/untrusted_input.rs).
pub fn parse_request(
    format: ApiFormat,
    body: Bytes,
    default_max_output: u64,
) -> Result<Parsed, ApiError> {
    let mut v: Value = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(bad("request body must be a JSON object"));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(bad("`model` is required")),
    };
    if model.len() > MAX_MODEL_LEN || model.chars().any(char::is_control) {
        return Err(bad(format!(
            "`model` must be at most {MAX_MODEL_LEN} bytes without control characters"
        )));
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("`stream` must be a boolean")),
    };
    // Only the output fields the route's API honours bound the hold; another API's field
    // is forwarded untouched and neither lowers nor raises it. Several honoured fields
    // (chat's two) hold the largest: the hold is a worst case.
    let mut max_output: Option<u64> = None;
    for field in output_bound_fields(format) {
        match obj.get(*field) {
            None | Some(Value::Null) => {}
            Some(x) => match token_bound(x) {
                Some(n) => max_output = Some(max_output.map_or(n, |m| m.max(n))),
                None => return Err(bad(format!("`{field}` must be a non-negative integer"))),
            },
        }
    }
    // Responses `background: true` answers at once and the upstream bills work done after
    // this request ended, which no meter sees: refused (docs/configuration.md).
    if format == ApiFormat::OpenAiResponses {
        match obj.get("background") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(_) => {
                return Err(bad(
                    "`background: true` is not supported: the upstream would bill work done after this response, which tollgate cannot meter; send the request in the foreground",
                ));
            }
        }
    }
    let completions = completions(format, obj)?;
    let tool_calls = held_tool_calls(format, obj)?;
    let reasoning = asks_for_reasoning(format, obj);
    let asked = Modifiers::requested(format, &v);
    let unseen_input = match format {
        ApiFormat::OpenAiCompletions | ApiFormat::OpenAiEmbeddings => None,
        _ => tokens::unseen_input(&v),
    };
    let (encoding, accuracy) = tokens::encoding_for_model(&model);
    let counted = match format {
        ApiFormat::OpenAiChat => tokens::openai_chat_input(&v, encoding),
        ApiFormat::OpenAiResponses => tokens::openai_responses_input(&v, encoding),
        ApiFormat::OpenAiCompletions => tokens::openai_completions_input(&v, encoding),
        ApiFormat::OpenAiEmbeddings => tokens::openai_embeddings_input(&v, encoding),
        ApiFormat::AnthropicMessages => tokens::anthropic_messages_input(&v, encoding),
    };
    // Approximate tokenizers (Claude) get headroom so the hold does not fall short; the
    // upstream's reported count settles the bill.
    let input_tokens = accuracy.reservation_tokens(counted);
    let max_output_tokens = match format {
        ApiFormat::OpenAiEmbeddings => 0,
        _ => max_output
            .unwrap_or(default_max_output)
            .min(MAX_TOKEN_COUNT)
            .saturating_mul(completions)
            .min(MAX_TOKEN_COUNT),
    };
    let mut hide_usage = false;
    let mut out = body;
    // Chat and legacy completions streams report usage only when asked to (both APIs take
    // `stream_options.include_usage`); ask, and hide the extra event from a client that did not.
    if matches!(format, ApiFormat::OpenAiChat | ApiFormat::OpenAiCompletions) && stream {
        let asked = v
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !asked {
            hide_usage = true;
            if let Some(o) = v.as_object_mut() {
                let so = o
                    .entry("stream_options")
                    .or_insert_with(|| Value::Object(Default::default()));
                match so.as_object_mut() {
                    Some(m) => {
                        m.insert("include_usage".into(), Value::Bool(true));
                    }
                    None => return Err(bad("`stream_options` must be an object")),
                }
            }
            out = Bytes::from(serde_json::to_vec(&v).map_err(|e| bad(e.to_string()))?);
        }
    }
    Ok(Parsed {
        model,
        stream,
        body: out,
        hide_usage,
        input_tokens,
        max_output_tokens,
        encoding,
        asked,
        reasoning,
        tool_calls,
        unseen_input,
    })
}

/// The request fields that bound the output for `format`, as its API reads them: Anthropic
/// Messages `max_tokens`; OpenAI chat `max_completion_tokens` (which replaced `max_tokens`,
/// still honoured); Responses `max_output_tokens`; legacy completions `max_tokens`;
/// embeddings none.
fn output_bound_fields(format: ApiFormat) -> &'static [&'static str] {
    match format {
        ApiFormat::AnthropicMessages | ApiFormat::OpenAiCompletions => &["max_tokens"],
        ApiFormat::OpenAiChat => &["max_completion_tokens", "max_tokens"],
        ApiFormat::OpenAiResponses => &["max_output_tokens"],
        ApiFormat::OpenAiEmbeddings => &[],
    }
}

/// A stated output bound: a non-negative integer (also written as an integral number such as
/// `1e30`), at most [`MAX_TOKEN_COUNT`]; `None` for anything else.
fn token_bound(x: &Value) -> Option<u64> {
    if let Some(n) = x.as_u64() {
        return Some(n.min(MAX_TOKEN_COUNT));
    }
    let f = x.as_f64()?;
    if !(f.is_finite() && f >= 0.0 && f.fract() == 0.0) {
        return None;
    }
    // `as` saturates; the bound is checked first so nothing is lost.
    Some(if f >= MAX_TOKEN_COUNT as f64 {
        MAX_TOKEN_COUNT
    } else {
        f as u64
    })
}

/// A count the request states (`n`, `best_of`): absent or null is 1; otherwise an integer
/// from 1 to [`MAX_COMPLETIONS`], else a 400.
fn completion_count(obj: &serde_json::Map<String, Value>, field: &str) -> Result<u64, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(1),
        Some(x) => x
            .as_u64()
            .filter(|n| (1..=MAX_COMPLETIONS).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "`{field}` must be an integer from 1 to {MAX_COMPLETIONS}"
                ))
            }),
    }
}

/// How many completions of its max output the upstream will generate for a request
/// (SPEC §4.2): chat `n`; legacy completions `max(n, best_of)` for each prompt of a prompt
/// array. The other formats produce one.
fn completions(format: ApiFormat, obj: &serde_json::Map<String, Value>) -> Result<u64, ApiError> {
    Ok(match format {
        ApiFormat::OpenAiChat => completion_count(obj, "n")?,
        ApiFormat::OpenAiCompletions => {
            let per_prompt = completion_count(obj, "n")?.max(completion_count(obj, "best_of")?);
            // `prompt`: a string, an array of tokens (one prompt), or an array of strings or
            // of token arrays (one completion set each).
            let prompts = match obj.get("prompt") {
                Some(Value::Array(items)) if items.iter().any(|i| !i.is_number()) => {
                    items.len().max(1) as u64
                }
                _ => 1,
            };
            per_prompt.saturating_mul(prompts)
        }
        _ => 1,
    })
}

/// Web searches a request allows, to hold their fees: Anthropic web search tools
/// (`"type": "web_search_…"`) each up to its `max_uses`; a Responses `web_search` tool up to
/// `max_tool_calls`. A tool without a bound holds [`DEFAULT_HELD_SEARCHES`]; every count is
/// capped at [`MAX_HELD_SEARCHES`].
fn held_tool_calls(
    format: ApiFormat,
    obj: &serde_json::Map<String, Value>,
) -> Result<u64, ApiError> {
    let Some(Value::Array(tools)) = obj.get("tools") else {
        return Ok(0);
    };
    let is_search = |t: &Value| {
        t.get("type")
            .and_then(Value::as_str)
            .is_some_and(|ty| ty.starts_with("web_search"))
    };
    let bound = |v: Option<&Value>, field: &str| -> Result<u64, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(DEFAULT_HELD_SEARCHES),
            Some(x) => x
                .as_u64()
                .map(|n| n.min(MAX_HELD_SEARCHES))
                .ok_or_else(|| bad(format!("`{field}` must be a non-negative integer"))),
        }
    };
    let held = match format {
        ApiFormat::AnthropicMessages => {
            let mut total = 0u64;
            for t in tools.iter().filter(|t| is_search(t)) {
                total = total.saturating_add(bound(t.get("max_uses"), "max_uses")?);
            }
            total
        }
        ApiFormat::OpenAiResponses if tools.iter().any(is_search) => {
            bound(obj.get("max_tool_calls"), "max_tool_calls")?
        }
        _ => 0,
    };
    Ok(held.min(MAX_HELD_SEARCHES))
}

/// Whether the request asks the model to reason (chat `reasoning_effort`, Responses
/// `reasoning`, Anthropic `thinking`), other than explicitly not at all.
fn asks_for_reasoning(format: ApiFormat, obj: &serde_json::Map<String, Value>) -> bool {
    match format {
        ApiFormat::OpenAiChat => obj
            .get("reasoning_effort")
            .and_then(Value::as_str)
            .is_some_and(|e| e != "none"),
        ApiFormat::OpenAiResponses => match obj.get("reasoning") {
            Some(Value::Object(r)) => r.get("effort").and_then(Value::as_str) != Some("none"),
            _ => false,
        },
        ApiFormat::AnthropicMessages => obj
            .get("thinking")
            .and_then(|t| t.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t != "disabled"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_bad_bodies_and_injects_usage() {
        let p = |b: &str| parse_request(ApiFormat::OpenAiChat, Bytes::from(b.to_string()), 100);
        assert!(p("{").is_err());
        assert!(p("[]").is_err());
        assert!(p(r#"{"messages":[]}"#).is_err());
        assert!(p(r#"{"model":"gpt-4o","stream":"yes"}"#).is_err());
        // SPEC §4.2: a model name is bounded and printable (it reaches logs and metrics).
        assert!(
            p(&format!(
                r#"{{"model":"{}"}}"#,
                "m".repeat(MAX_MODEL_LEN + 1)
            ))
            .is_err()
        );
        assert!(p(r#"{"model":"gpt-4o\u0007\n{\"forged\":1}"}"#).is_err());
        // A NUL byte is a control character too: Postgres refuses it in a text column, so
        // a row carrying it could never reach the ledger of record (issue 10, defect 6).
        let nul = p(r#"{"model":"claude-haiku-4-5\u0000x","messages":[]}"#);
        assert!(nul.is_err_and(|e| e.code == ErrorCode::InvalidRequest));
        assert!(p(r#"{"model":"","messages":[]}"#).is_err(), "empty model");
        assert!(
            p(r#"{"model":7,"messages":[]}"#).is_err(),
            "model not a string"
        );
        assert!(
            p(&format!(
                r#"{{"model":"{}","messages":[]}}"#,
                "m".repeat(MAX_MODEL_LEN)
            ))
            .is_ok()
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(
            p(&format!(r#"{{"model":"gpt-4o","x":{deep}}}"#)).is_err(),
            "depth is bounded"
        );
        let ok = p(r#"{"model":"gpt-4o","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert!(ok.stream && ok.hide_usage);
        assert_eq!(ok.max_output_tokens, 50);
        let v: Value = serde_json::from_slice(&ok.body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let asked = p(r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#).unwrap();
        assert!(!asked.hide_usage);
        assert_eq!(asked.max_output_tokens, 100, "default max output");
        let plain = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let np = p(plain).unwrap();
        assert_eq!(
            np.body,
            Bytes::from(plain),
            "non-stream bodies are forwarded as sent"
        );
    }

    #[test]
    fn the_output_bound_is_read_from_the_routes_own_fields() {
        let held = |format, b: &str| {
            let parsed = parse_request(format, Bytes::from(b.to_string()), 100);
            parsed.map(|p| {
                assert_eq!(p.body, Bytes::from(b.to_string()), "forwarded untouched");
                p.max_output_tokens
            })
        };
        let all = r#""max_completion_tokens":1,"max_tokens":3000,"max_output_tokens":7"#;
        let anthropic = format!(r#"{{"model":"claude-haiku-4-5",{all},"messages":[]}}"#);
        assert_eq!(
            held(ApiFormat::AnthropicMessages, &anthropic).ok(),
            Some(3000)
        );
        let chat = format!(r#"{{"model":"gpt-4o",{all},"messages":[]}}"#);
        assert_eq!(held(ApiFormat::OpenAiChat, &chat).ok(), Some(3000));
        let chat = r#"{"model":"gpt-4o","max_completion_tokens":40,"max_tokens":4,"messages":[]}"#;
        assert_eq!(held(ApiFormat::OpenAiChat, chat).ok(), Some(40));
        let responses = format!(r#"{{"model":"gpt-4o",{all},"input":"hi"}}"#);
        assert_eq!(held(ApiFormat::OpenAiResponses, &responses).ok(), Some(7));
        let completions = format!(r#"{{"model":"gpt-3.5-turbo-instruct",{all},"prompt":"hi"}}"#);
        assert_eq!(
            held(ApiFormat::OpenAiCompletions, &completions).ok(),
            Some(3000)
        );
        let embeddings = format!(r#"{{"model":"text-embedding-3-small",{all},"input":"hi"}}"#);
        assert_eq!(held(ApiFormat::OpenAiEmbeddings, &embeddings).ok(), Some(0));
        // Another API's field is not read at all (its value is the upstream's to judge);
        // only the route's own fields must be integers.
        let foreign = r#"{"model":"claude-haiku-4-5","max_completion_tokens":"x","max_output_tokens":-1,"messages":[]}"#;
        assert_eq!(held(ApiFormat::AnthropicMessages, foreign).ok(), Some(100));
        let own = r#"{"model":"gpt-4o","max_tokens":10,"max_output_tokens":"x","input":"hi"}"#;
        assert!(held(ApiFormat::OpenAiResponses, own).is_err());
        let own = r#"{"model":"gpt-4o","max_completion_tokens":10,"max_tokens":-1,"messages":[]}"#;
        assert!(held(ApiFormat::OpenAiChat, own).is_err());
    }
}
