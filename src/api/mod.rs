//! Provider wire formats: which API a route speaks, the token usage it reports, and the
//! streaming machinery that reads responses without touching what the client receives
//! ([`sse`] parses Server-Sent Events incrementally, [`meter`] extracts usage and output text
//! per format).

pub mod meter;
pub mod sse;

/// The provider an upstream is (`[[upstreams]].kind`): its credential header and
/// default passthrough routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    Openai,
    Anthropic,
}

/// Wire format of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ApiFormat {
    OpenAiChat,
    OpenAiResponses,
    OpenAiCompletions,
    OpenAiEmbeddings,
    AnthropicMessages,
}

impl ApiFormat {
    /// The format served at a request path (a query string is ignored), `None` for paths that
    /// are not a metered API route.
    pub fn from_path(path: &str) -> Option<ApiFormat> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        match path {
            "/v1/chat/completions" => Some(ApiFormat::OpenAiChat),
            "/v1/responses" => Some(ApiFormat::OpenAiResponses),
            "/v1/completions" => Some(ApiFormat::OpenAiCompletions),
            "/v1/embeddings" => Some(ApiFormat::OpenAiEmbeddings),
            "/v1/messages" => Some(ApiFormat::AnthropicMessages),
            _ => None,
        }
    }
}

/// Longest tier, speed or region name kept, in bytes: a reported name longer than this (or
/// not printable ASCII) is ignored, and a configured one is refused.
pub const MAX_LABEL_LEN: usize = 64;

/// Whether `s` can name a tier, speed or region: 1 to [`MAX_LABEL_LEN`] printable ASCII
/// characters, no spaces.
pub fn is_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LABEL_LEN && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Token usage of one request, normalised to SPEC §4's semantics: every part is a subset of
/// its total. `input_tokens` counts all input — cached reads, cache writes and audio included;
/// `output_tokens` includes reasoning and audio tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    /// Input read from a prompt cache.
    pub cached_input_tokens: u64,
    /// Input written to a prompt cache, whatever the lifetime.
    pub cache_write_tokens: u64,
    /// The part of `cache_write_tokens` written with the long lifetime (Anthropic 1 hour,
    /// OpenAI 12 hours).
    pub cache_write_1h_tokens: u64,
    /// Audio input tokens.
    pub audio_input_tokens: u64,
    pub output_tokens: u64,
    /// Reasoning (thinking) tokens, kept for reporting; billed as output.
    pub reasoning_tokens: u64,
    /// Audio output tokens.
    pub audio_output_tokens: u64,
    /// Server tool calls billed per call (web searches).
    pub tool_calls: u64,
    /// The tier, speed and region the response says it was served with.
    pub served: Modifiers,
}

/// Names that select price multipliers: the ones a request asks for, or the ones a response
/// reports it was served with. `None` means standard.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Modifiers {
    /// OpenAI `service_tier`; Anthropic `usage.service_tier`.
    pub service_tier: Option<String>,
    /// Anthropic `speed` (`usage.speed`).
    pub speed: Option<String>,
    /// Anthropic `inference_geo` (`usage.inference_geo`).
    pub inference_geo: Option<String>,
}

impl Modifiers {
    /// These names, each missing one taken from `fallback`.
    pub fn or(&self, fallback: &Modifiers) -> Modifiers {
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        Modifiers {
            service_tier: pick(&self.service_tier, &fallback.service_tier),
            speed: pick(&self.speed, &fallback.speed),
            inference_geo: pick(&self.inference_geo, &fallback.inference_geo),
        }
    }

    /// What a request body asks for, named as the response would report it: OpenAI's
    /// `service_tier` (`fast` is reported as `priority`; `auto` and `default` are standard);
    /// Anthropic's `speed` and `inference_geo` (its request `service_tier` values, `auto` and
    /// `standard_only`, select no price). Values that are not names are ignored.
    pub fn requested(format: ApiFormat, body: &serde_json::Value) -> Modifiers {
        let name = |key: &str| {
            body.get(key)
                .and_then(serde_json::Value::as_str)
                .filter(|v| is_label(v))
        };
        match format {
            ApiFormat::AnthropicMessages => Modifiers {
                service_tier: None,
                speed: name("speed")
                    .filter(|s| *s != "standard")
                    .map(str::to_owned),
                inference_geo: name("inference_geo")
                    .filter(|g| *g != "global")
                    .map(str::to_owned),
            },
            _ => Modifiers {
                service_tier: match name("service_tier") {
                    None | Some("auto" | "default") => None,
                    Some("fast") => Some("priority".to_owned()),
                    Some(t) => Some(t.to_owned()),
                },
                speed: None,
                inference_geo: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_modifiers_are_named_as_responses_report_them() {
        let asked = |format, body: serde_json::Value| Modifiers::requested(format, &body);
        let tier = |t: serde_json::Value| {
            asked(
                ApiFormat::OpenAiChat,
                serde_json::json!({"service_tier": t}),
            )
            .service_tier
        };
        assert_eq!(tier("fast".into()).as_deref(), Some("priority"));
        assert_eq!(tier("priority".into()).as_deref(), Some("priority"));
        assert_eq!(tier("flex".into()).as_deref(), Some("flex"));
        assert_eq!(tier("ultrafast".into()).as_deref(), Some("ultrafast"));
        assert_eq!(tier("auto".into()), None);
        assert_eq!(tier("default".into()), None);
        assert_eq!(tier(7.into()), None);
        assert_eq!(tier("x".repeat(MAX_LABEL_LEN + 1).into()), None);
        assert_eq!(
            asked(ApiFormat::OpenAiResponses, serde_json::json!({})),
            Modifiers::default()
        );
        // Anthropic: speed and region; its request tiers select no price.
        let a = asked(
            ApiFormat::AnthropicMessages,
            serde_json::json!({"service_tier": "auto", "speed": "fast", "inference_geo": "us"}),
        );
        assert_eq!(
            a,
            Modifiers {
                service_tier: None,
                speed: Some("fast".into()),
                inference_geo: Some("us".into()),
            }
        );
        let standard = asked(
            ApiFormat::AnthropicMessages,
            serde_json::json!({"speed": "standard", "inference_geo": "global"}),
        );
        assert_eq!(standard, Modifiers::default());
        // What the response reports wins; what it leaves out comes from the request.
        let served = Modifiers {
            service_tier: Some("standard".into()),
            ..Modifiers::default()
        };
        assert_eq!(
            served.or(&a),
            Modifiers {
                service_tier: Some("standard".into()),
                ..a.clone()
            }
        );
    }

    #[test]
    fn format_from_path() {
        assert_eq!(
            ApiFormat::from_path("/v1/chat/completions"),
            Some(ApiFormat::OpenAiChat)
        );
        assert_eq!(
            ApiFormat::from_path("/v1/responses?stream=true"),
            Some(ApiFormat::OpenAiResponses)
        );
        assert_eq!(
            ApiFormat::from_path("/v1/completions"),
            Some(ApiFormat::OpenAiCompletions)
        );
        assert_eq!(
            ApiFormat::from_path("/v1/embeddings?"),
            Some(ApiFormat::OpenAiEmbeddings)
        );
        assert_eq!(
            ApiFormat::from_path("/v1/messages?beta=true"),
            Some(ApiFormat::AnthropicMessages)
        );
        assert_eq!(ApiFormat::from_path("/v1/messages/count_tokens"), None);
        assert_eq!(ApiFormat::from_path("/v1/models"), None);
        assert_eq!(ApiFormat::from_path(""), None);
    }
}
