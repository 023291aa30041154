//! Errors tollgate itself answers, rendered in the calling provider's own error shape so
//! that SDKs map them as usual (SPEC §6). Errors from the upstream pass through unchanged
//! and never come through here.

use bytes::Bytes;

use crate::api::UpstreamKind;

/// Our error codes (the `code` field), each with its HTTP status and provider error class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidApiKey,
    QuotaDisabled,
    NotFound,
    /// A known path with a method it does not take (the answer carries `Allow`).
    MethodNotAllowed,
    DuplicateRequest,
    RequestTooLarge,
    QuotaExceeded,
    Internal,
    UpstreamUnavailable,
    StoreUnavailable,
    UpstreamTimeout,
    /// The client did not send its request body in time (`server.body_timeout`).
    RequestTimeout,
    /// The request head is over `server.max_request_head` or `server.max_request_headers`.
    HeaderTooLarge,
    /// Request bodies held across all connections are at `server.max_buffered_bodies`.
    Overloaded,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::InvalidApiKey => 401,
            ErrorCode::QuotaDisabled => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::DuplicateRequest => 409,
            ErrorCode::RequestTooLarge => 413,
            ErrorCode::QuotaExceeded => 429,
            ErrorCode::Internal => 500,
            ErrorCode::UpstreamUnavailable => 502,
            ErrorCode::StoreUnavailable => 503,
            ErrorCode::UpstreamTimeout => 504,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::HeaderTooLarge => 431,
            ErrorCode::Overloaded => 503,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::QuotaDisabled => "quota_disabled",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::DuplicateRequest => "duplicate_request",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Internal => "internal_error",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::HeaderTooLarge => "request_header_too_large",
            ErrorCode::Overloaded => "overloaded",
        }
    }

    /// The provider's error class for this status, so SDKs raise their usual exception.
    fn class(self, kind: UpstreamKind) -> &'static str {
        match (self, kind) {
            (
                ErrorCode::InvalidRequest
                | ErrorCode::DuplicateRequest
                | ErrorCode::RequestTimeout
                | ErrorCode::HeaderTooLarge
                | ErrorCode::MethodNotAllowed,
                _,
            ) => "invalid_request_error",
            (ErrorCode::InvalidApiKey, _) => "authentication_error",
            (ErrorCode::QuotaDisabled, _) => "permission_error",
            (ErrorCode::NotFound, UpstreamKind::Anthropic) => "not_found_error",
            (ErrorCode::NotFound, UpstreamKind::Openai) => "invalid_request_error",
            (ErrorCode::RequestTooLarge, UpstreamKind::Anthropic) => "request_too_large",
            (ErrorCode::RequestTooLarge, UpstreamKind::Openai) => "invalid_request_error",
            (ErrorCode::QuotaExceeded, _) => "rate_limit_error",
            (ErrorCode::StoreUnavailable | ErrorCode::Overloaded, UpstreamKind::Anthropic) => {
                "overloaded_error"
            }
            (
                ErrorCode::Overloaded
                | ErrorCode::Internal
                | ErrorCode::UpstreamUnavailable
                | ErrorCode::StoreUnavailable
                | ErrorCode::UpstreamTimeout,
                _,
            ) => "api_error",
        }
    }
}

/// An error answered by tollgate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds for `Retry-After` (429 on windows that free over time).
    pub retry_after: Option<u64>,
    /// Extra response headers (the `x-ratelimit-*` of a quota refusal).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
            headers: Vec::new(),
        }
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// JSON body in the provider's shape.
    pub fn body(&self, kind: UpstreamKind) -> Bytes {
        let class = self.code.class(kind);
        let v = match kind {
            UpstreamKind::Openai => serde_json::json!({
                "error": {"message": self.message, "type": class, "param": null, "code": self.code.as_str()}
            }),
            UpstreamKind::Anthropic => serde_json::json!({
                "type": "error",
                "error": {"type": class, "message": self.message, "code": self.code.as_str()}
            }),
        };
        Bytes::from(v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_each_provider() {
        let e = ApiError::new(ErrorCode::QuotaExceeded, "requests:total=5 on key k_1");
        let o: serde_json::Value = serde_json::from_slice(&e.body(UpstreamKind::Openai)).unwrap();
        assert_eq!(o["error"]["type"], "rate_limit_error");
        assert_eq!(o["error"]["code"], "quota_exceeded");
        assert_eq!(o["error"]["message"], "requests:total=5 on key k_1");
        let a: serde_json::Value =
            serde_json::from_slice(&e.body(UpstreamKind::Anthropic)).unwrap();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "rate_limit_error");
        assert_eq!(a["error"]["code"], "quota_exceeded");
        assert_eq!(e.status(), 429);
        assert_eq!(ApiError::new(ErrorCode::InvalidApiKey, "x").status(), 401);
        assert_eq!(ApiError::new(ErrorCode::UpstreamTimeout, "x").status(), 504);
    }
}
