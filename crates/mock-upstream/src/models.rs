//! The mock's unmetered provider endpoints: model listings and Anthropic's token counter.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/models` (OpenAI client) | `{"object":"list","data":[{"id","object":"model","created","owned_by"}]}` |
//! | `GET /v1/models/{id}` (OpenAI client) | one model object; unknown id: 404 `model_not_found` |
//! | `GET /v1/models` (Anthropic client) | `{"data":[{"type":"model","id","display_name","created_at"}],"has_more","first_id","last_id"}`, paged by `limit` (1–1000, default 20), `after_id`, `before_id` |
//! | `GET /v1/models/{id}` (Anthropic client) | one model object; unknown id: 404 `not_found_error` |
//! | `POST /v1/messages/count_tokens` | `{"input_tokens": N}`: the `input_tokens` a `/v1/messages` call with the same `model`, `system` and `messages` reports (plus its cache counts) |
//!
//! Both providers serve `/v1/models` on the real APIs; the mock serves both on one port,
//! so it tells them apart the way the providers' SDKs differ: an Anthropic client sends
//! `anthropic-version` (Anthropic requires it), an OpenAI client does not.

use bytes::Bytes;
use http::{HeaderMap, Method};
use serde_json::{Value, json};

use super::Invalid;
use super::text::{Prompt, encoding_for_model};

/// What a passthrough request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listing {
    OpenAiModels,
    OpenAiModel(String),
    AnthropicModels,
    AnthropicModel(String),
    CountTokens,
}

impl Listing {
    pub(crate) fn from_request(method: &Method, path: &str, headers: &HeaderMap) -> Option<Self> {
        let anthropic = headers.contains_key("anthropic-version");
        let path = path.trim_end_matches('/');
        match (method, path) {
            (&Method::POST, "/v1/messages/count_tokens") => Some(Listing::CountTokens),
            (&Method::GET, "/v1/models") if anthropic => Some(Listing::AnthropicModels),
            (&Method::GET, "/v1/models") => Some(Listing::OpenAiModels),
            (&Method::GET, p) => {
                let id = p
                    .strip_prefix("/v1/models/")
                    .filter(|id| !id.contains('/'))?;
                Some(if anthropic {
                    Listing::AnthropicModel(id.to_owned())
                } else {
                    Listing::OpenAiModel(id.to_owned())
                })
            }
            _ => None,
        }
    }

    pub(crate) fn anthropic(&self) -> bool {
        matches!(
            self,
            Listing::AnthropicModels | Listing::AnthropicModel(_) | Listing::CountTokens
        )
    }
}

/// `(id, created unix time, owned_by)`.
const OPENAI_MODELS: &[(&str, u64, &str)] = &[
    ("gpt-4o", 1_715_367_049, "system"),
    ("gpt-4o-mini", 1_721_172_741, "system"),
    ("gpt-4.1", 1_744_316_542, "system"),
    ("gpt-4.1-mini", 1_744_318_173, "system"),
    ("gpt-5", 1_754_425_777, "system"),
    ("o3-mini", 1_737_146_383, "system"),
    ("text-embedding-3-small", 1_705_948_997, "system"),
    ("text-embedding-3-large", 1_705_953_180, "system"),
];

/// `(id, display name, created_at)`, newest first as Anthropic lists them.
const ANTHROPIC_MODELS: &[(&str, &str, &str)] = &[
    (
        "claude-opus-4-5-20251101",
        "Claude Opus 4.5",
        "2025-11-24T00:00:00Z",
    ),
    (
        "claude-haiku-4-5-20251001",
        "Claude Haiku 4.5",
        "2025-10-15T00:00:00Z",
    ),
    (
        "claude-sonnet-4-5-20250929",
        "Claude Sonnet 4.5",
        "2025-09-29T00:00:00Z",
    ),
    (
        "claude-opus-4-1-20250805",
        "Claude Opus 4.1",
        "2025-08-05T00:00:00Z",
    ),
    (
        "claude-sonnet-4-20250514",
        "Claude Sonnet 4",
        "2025-05-22T00:00:00Z",
    ),
];

fn openai_model(m: &(&str, u64, &str)) -> Value {
    json!({"id": m.0, "object": "model", "created": m.1, "owned_by": m.2})
}

fn anthropic_model(m: &(&str, &str, &str)) -> Value {
    json!({"type": "model", "id": m.0, "display_name": m.1, "created_at": m.2})
}

/// A passthrough answer: status and JSON body, or `Invalid` for a 400.
pub(crate) enum Answer {
    Ok(Bytes),
    NotFound(String),
}

/// Answer `listing`; `query` is the request's query string, `body` its parsed JSON.
pub(crate) fn answer(
    listing: &Listing,
    query: Option<&str>,
    body: Option<&Value>,
) -> Result<Answer, Invalid> {
    let doc = match listing {
        Listing::OpenAiModels => {
            json!({"object": "list", "data": OPENAI_MODELS.iter().map(openai_model).collect::<Vec<_>>()})
        }
        Listing::OpenAiModel(id) => match OPENAI_MODELS.iter().find(|m| m.0 == id) {
            Some(m) => openai_model(m),
            None => {
                return Ok(Answer::NotFound(format!(
                    "The model '{id}' does not exist or you do not have access to it."
                )));
            }
        },
        Listing::AnthropicModels => anthropic_page(query)?,
        Listing::AnthropicModel(id) => match ANTHROPIC_MODELS.iter().find(|m| m.0 == id) {
            Some(m) => anthropic_model(m),
            None => return Ok(Answer::NotFound(format!("model: {id}"))),
        },
        Listing::CountTokens => json!({"input_tokens": count_tokens(body)?}),
    };
    Ok(Answer::Ok(Bytes::from(doc.to_string())))
}

/// One page of Anthropic's model list.
fn anthropic_page(query: Option<&str>) -> Result<Value, Invalid> {
    let mut limit = 20usize;
    let mut after = None;
    let mut before = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        Invalid::new("limit: Input should be between 1 and 1000", None)
                    })?;
            }
            "after_id" => after = Some(v.to_owned()),
            "before_id" => before = Some(v.to_owned()),
            _ => {}
        }
    }
    let all: Vec<&(&str, &str, &str)> = ANTHROPIC_MODELS.iter().collect();
    let position = |id: &str| all.iter().position(|m| m.0 == id);
    let (start, end) = match (after, before) {
        (Some(a), _) => {
            let i = position(&a).map_or(all.len(), |i| i + 1);
            (i, (i + limit).min(all.len()))
        }
        (None, Some(b)) => {
            let j = position(&b).unwrap_or(0);
            (j.saturating_sub(limit), j)
        }
        (None, None) => (0, limit.min(all.len())),
    };
    let page = &all[start..end];
    Ok(json!({
        "data": page.iter().map(|m| anthropic_model(m)).collect::<Vec<_>>(),
        "has_more": end < all.len(),
        "first_id": page.first().map(|m| m.0),
        "last_id": page.last().map(|m| m.0),
    }))
}

/// Input tokens of a Messages request body, counted as `/v1/messages` counts them.
fn count_tokens(body: Option<&Value>) -> Result<u64, Invalid> {
    let Some(body) = body.filter(|b| b.is_object()) else {
        return Err(Invalid::new(
            "The request body must be a JSON object.",
            None,
        ));
    };
    let model = match body.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => m,
        _ => return Err(Invalid::new("model: Field required", None)),
    };
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err(Invalid::new("messages: Field required", None));
    };
    let prompt: Prompt = super::anthropic::prompt(body, messages);
    Ok(prompt.count(encoding_for_model(model)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anthropic_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        h
    }

    #[test]
    fn the_client_dialect_picks_the_listing() {
        let none = HeaderMap::new();
        let get = Method::GET;
        assert_eq!(
            Listing::from_request(&get, "/v1/models", &none),
            Some(Listing::OpenAiModels)
        );
        assert_eq!(
            Listing::from_request(&get, "/v1/models", &anthropic_headers()),
            Some(Listing::AnthropicModels)
        );
        assert_eq!(
            Listing::from_request(&get, "/v1/models/gpt-4o", &none),
            Some(Listing::OpenAiModel("gpt-4o".into()))
        );
        assert_eq!(
            Listing::from_request(&Method::POST, "/v1/messages/count_tokens", &none),
            Some(Listing::CountTokens)
        );
        assert_eq!(
            Listing::from_request(&Method::POST, "/v1/models", &none),
            None
        );
        assert_eq!(Listing::from_request(&get, "/v1/models/a/b", &none), None);
    }

    #[test]
    fn anthropic_pages_chain() {
        let Answer::Ok(first) = answer(&Listing::AnthropicModels, Some("limit=2"), None).unwrap()
        else {
            panic!()
        };
        let first: Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(first["data"].as_array().unwrap().len(), 2);
        assert_eq!(first["has_more"], true);
        let after = format!("limit=10&after_id={}", first["last_id"].as_str().unwrap());
        let Answer::Ok(rest) = answer(&Listing::AnthropicModels, Some(&after), None).unwrap()
        else {
            panic!()
        };
        let rest: Value = serde_json::from_slice(&rest).unwrap();
        assert_eq!(
            rest["data"].as_array().unwrap().len(),
            ANTHROPIC_MODELS.len() - 2
        );
        assert_eq!(rest["has_more"], false);
        assert!(answer(&Listing::AnthropicModels, Some("limit=0"), None).is_err());
    }

    #[test]
    fn count_tokens_needs_model_and_messages() {
        let body = json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hello there"}]});
        let Answer::Ok(b) = answer(&Listing::CountTokens, None, Some(&body)).unwrap() else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert!(v["input_tokens"].as_u64().unwrap() > 3);
        assert!(answer(&Listing::CountTokens, None, Some(&json!({"model": "x"}))).is_err());
        assert!(answer(&Listing::CountTokens, None, None).is_err());
    }
}
