//! Provider wire formats: which API a route speaks, the token usage it reports, and the
//! streaming machinery that reads responses without touching what the client receives
//! ([`sse`] parses Server-Sent Events incrementally, [`meter`] extracts usage and output text
//! per format).

pub mod meter;
pub mod sse;

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

/// Token usage of one request. input_tokens counts ALL input incl. cached and cache writes;
/// output_tokens includes reasoning tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

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
