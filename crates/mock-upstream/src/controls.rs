//! Per-request behaviour switches read from `x-mock-*` request headers.
//!
//! The headers are documented in the parent module. Parsing is strict: a header that is present
//! but malformed is reported back as a 400 naming the header, so a typo in a test cannot silently
//! fall back to the default behaviour.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

/// Longest answer the mock will generate, in words (about 130k tokens). Keeps one request from
/// eating the memory a load benchmark needs.
pub(crate) const MAX_WORDS: usize = 100_000;
/// Default answer length in words (about 25 tokens).
pub(crate) const DEFAULT_WORDS: usize = 20;
/// Longest delay any header may ask for.
const MAX_DELAY_MS: u64 = 600_000;
/// Upper bound for the synthetic usage numbers (cached, reasoning, cache-write tokens).
const MAX_EXTRA_TOKENS: u64 = 1_000_000_000;
/// Largest fixed split size; larger values would make splitting meaningless for SSE events.
const MAX_SPLIT: usize = 1 << 20;
/// Most web search calls one answer reports.
const MAX_WEB_SEARCHES: u64 = 1000;
/// Longest tier, speed or region name a header may set.
const MAX_NAME_LEN: usize = 64;

/// A malformed `x-mock-*` header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {header} header value {value:?}: {expected}")]
pub struct ControlError {
    /// Header name.
    pub header: &'static str,
    /// The value as received (lossy UTF-8).
    pub value: String,
    /// What would have been accepted.
    pub expected: &'static str,
}

/// How the stream's bytes are cut into HTTP body frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// One frame per SSE event (how the providers' servers usually flush).
    Event,
    /// Frames of exactly this many bytes (the last one may be shorter), ignoring event boundaries.
    Fixed(usize),
    /// Frames of seeded pseudo-random sizes between 1 and 64 bytes.
    Random,
}

/// What happens after `after` content chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InterruptKind {
    /// Send the format's mid-stream error event, then end the body cleanly.
    Error,
    /// Stop sending, keep the connection open until the client leaves or the server shuts down.
    Stall,
    /// Abort the connection (no terminating chunk / RST_STREAM).
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Interrupt {
    pub after: usize,
    pub kind: InterruptKind,
}

/// Every switch a request can set, with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Controls {
    pub words: usize,
    pub chunks: Option<usize>,
    pub delay: Duration,
    pub first_byte_delay: Duration,
    pub status: Option<StatusCode>,
    pub retry_after: u64,
    pub interrupt: Option<Interrupt>,
    pub stall_before_headers: bool,
    pub split: Split,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub cache_write_tokens: u64,
    /// Long-lifetime cache writes: Anthropic 1-hour, OpenAI 12-hour.
    pub cache_write_1h_tokens: u64,
    pub audio_input_tokens: u64,
    pub audio_output_tokens: u64,
    pub web_searches: u64,
    /// Overrides the service tier the response reports.
    pub service_tier: Option<String>,
    /// Overrides Anthropic's `usage.speed`.
    pub speed: Option<String>,
    /// Overrides Anthropic's `usage.inference_geo`.
    pub inference_geo: Option<String>,
    pub tool_call: bool,
    pub no_usage: bool,
    pub seed: Option<u64>,
}

impl Default for Controls {
    fn default() -> Self {
        Self {
            words: DEFAULT_WORDS,
            chunks: None,
            delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            status: None,
            retry_after: 1,
            interrupt: None,
            stall_before_headers: false,
            split: Split::Event,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            audio_input_tokens: 0,
            audio_output_tokens: 0,
            web_searches: 0,
            service_tier: None,
            speed: None,
            inference_geo: None,
            tool_call: false,
            no_usage: false,
            seed: None,
        }
    }
}

impl Controls {
    /// Reads every `x-mock-*` header; the first malformed one is reported.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Self, ControlError> {
        let mut c = Controls::default();
        if let Some(n) = number(headers, "x-mock-words", MAX_WORDS as u64)? {
            c.words = n as usize;
        }
        if let Some(n) = number(headers, "x-mock-chunks", MAX_WORDS as u64)? {
            // Each chunk carries at least one word, so asking for more chunks than words raises
            // the word count rather than producing empty deltas no provider sends.
            c.chunks = Some(n as usize);
            c.words = c.words.max(n as usize);
        }
        if let Some(ms) = number(headers, "x-mock-delay-ms", MAX_DELAY_MS)? {
            c.delay = Duration::from_millis(ms);
        }
        if let Some(ms) = number(headers, "x-mock-first-byte-delay-ms", MAX_DELAY_MS)? {
            c.first_byte_delay = Duration::from_millis(ms);
        }
        if let Some(code) = number(headers, "x-mock-status", 599)? {
            let status = u16::try_from(code)
                .ok()
                .filter(|c| *c >= 400)
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| ControlError {
                    header: "x-mock-status",
                    value: code.to_string(),
                    expected: "an HTTP error status between 400 and 599",
                })?;
            c.status = Some(status);
        }
        if let Some(secs) = number(headers, "x-mock-retry-after", 86_400)? {
            c.retry_after = secs;
        }
        for (name, kind) in [
            ("x-mock-error-after", InterruptKind::Error),
            ("x-mock-stall-after", InterruptKind::Stall),
            ("x-mock-drop-after", InterruptKind::Drop),
        ] {
            if let Some(n) = number(headers, name, MAX_WORDS as u64)? {
                let candidate = Interrupt {
                    after: n as usize,
                    kind,
                };
                // Several interrupts in one request: the earliest one is the one that happens.
                c.interrupt = match c.interrupt {
                    Some(existing) if existing.after <= candidate.after => Some(existing),
                    _ => Some(candidate),
                };
            }
        }
        c.stall_before_headers = flag(headers, "x-mock-stall-before-headers")?;
        if let Some(raw) = text(headers, "x-mock-split") {
            c.split = if raw.eq_ignore_ascii_case("random") {
                Split::Random
            } else {
                match raw.parse::<usize>() {
                    Ok(n) if (1..=MAX_SPLIT).contains(&n) => Split::Fixed(n),
                    _ => {
                        return Err(ControlError {
                            header: "x-mock-split",
                            value: raw,
                            expected: "a byte count between 1 and 1048576, or \"random\"",
                        });
                    }
                }
            };
        }
        if let Some(n) = number(headers, "x-mock-cached-tokens", MAX_EXTRA_TOKENS)? {
            c.cached_tokens = n;
        }
        if let Some(n) = number(headers, "x-mock-reasoning-tokens", MAX_EXTRA_TOKENS)? {
            c.reasoning_tokens = n;
        }
        if let Some(n) = number(headers, "x-mock-cache-write-tokens", MAX_EXTRA_TOKENS)? {
            c.cache_write_tokens = n;
        }
        if let Some(n) = number(headers, "x-mock-cache-write-1h-tokens", MAX_EXTRA_TOKENS)? {
            c.cache_write_1h_tokens = n;
        }
        if let Some(n) = number(headers, "x-mock-audio-input-tokens", MAX_EXTRA_TOKENS)? {
            c.audio_input_tokens = n;
        }
        if let Some(n) = number(headers, "x-mock-audio-output-tokens", MAX_EXTRA_TOKENS)? {
            c.audio_output_tokens = n;
        }
        if let Some(n) = number(headers, "x-mock-web-searches", MAX_WEB_SEARCHES)? {
            c.web_searches = n;
        }
        c.service_tier = name(headers, "x-mock-service-tier")?;
        c.speed = name(headers, "x-mock-speed")?;
        c.inference_geo = name(headers, "x-mock-inference-geo")?;
        c.tool_call = flag(headers, "x-mock-tool-call")?;
        c.no_usage = flag(headers, "x-mock-no-usage")?;
        c.seed = number(headers, "x-mock-seed", u64::MAX)?;
        Ok(c)
    }
}

fn text(headers: &HeaderMap, name: &'static str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
}

fn number(headers: &HeaderMap, name: &'static str, max: u64) -> Result<Option<u64>, ControlError> {
    let Some(raw) = text(headers, name) else {
        return Ok(None);
    };
    match raw.parse::<u64>() {
        Ok(n) if n <= max => Ok(Some(n)),
        _ => Err(ControlError {
            header: name,
            value: raw,
            expected: "a non-negative integer within the documented cap",
        }),
    }
}

/// A name (tier, speed, region): 1 to 64 printable ASCII characters.
fn name(headers: &HeaderMap, header: &'static str) -> Result<Option<String>, ControlError> {
    let Some(raw) = text(headers, header) else {
        return Ok(None);
    };
    if raw.is_empty() || raw.len() > MAX_NAME_LEN || !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ControlError {
            header,
            value: raw,
            expected: "a name of 1 to 64 printable ASCII characters",
        });
    }
    Ok(Some(raw))
}

fn flag(headers: &HeaderMap, name: &'static str) -> Result<bool, ControlError> {
    let Some(raw) = text(headers, name) else {
        return Ok(false);
    };
    match raw.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(ControlError {
            header: name,
            value: raw,
            expected: "1/true or 0/false",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn defaults_without_headers() {
        assert_eq!(
            Controls::from_headers(&HeaderMap::new()),
            Ok(Controls::default())
        );
    }

    #[test]
    fn parses_every_switch() {
        let c = Controls::from_headers(&headers(&[
            ("x-mock-words", "7"),
            ("x-mock-delay-ms", "5"),
            ("x-mock-first-byte-delay-ms", "9"),
            ("x-mock-status", "529"),
            ("x-mock-stall-after", "4"),
            ("x-mock-error-after", "2"),
            ("x-mock-split", "random"),
            ("x-mock-cached-tokens", "11"),
            ("x-mock-reasoning-tokens", "12"),
            ("x-mock-cache-write-tokens", "13"),
            ("x-mock-cache-write-1h-tokens", "14"),
            ("x-mock-audio-input-tokens", "15"),
            ("x-mock-audio-output-tokens", "16"),
            ("x-mock-web-searches", "3"),
            ("x-mock-service-tier", "flex"),
            ("x-mock-speed", "fast"),
            ("x-mock-inference-geo", "us"),
            ("x-mock-tool-call", "true"),
            ("x-mock-no-usage", "1"),
            ("x-mock-seed", "42"),
        ]))
        .unwrap();
        assert_eq!(c.words, 7);
        assert_eq!(c.delay, Duration::from_millis(5));
        assert_eq!(c.first_byte_delay, Duration::from_millis(9));
        assert_eq!(c.status.map(|s| s.as_u16()), Some(529));
        assert_eq!(
            c.interrupt,
            Some(Interrupt {
                after: 2,
                kind: InterruptKind::Error
            })
        );
        assert_eq!(c.split, Split::Random);
        assert_eq!(
            (c.cached_tokens, c.reasoning_tokens, c.cache_write_tokens),
            (11, 12, 13)
        );
        assert_eq!(
            (
                c.cache_write_1h_tokens,
                c.audio_input_tokens,
                c.audio_output_tokens,
                c.web_searches
            ),
            (14, 15, 16, 3)
        );
        assert_eq!(
            (
                c.service_tier.as_deref(),
                c.speed.as_deref(),
                c.inference_geo.as_deref()
            ),
            (Some("flex"), Some("fast"), Some("us"))
        );
        assert!(c.tool_call && c.no_usage);
        assert_eq!(c.seed, Some(42));
    }

    #[test]
    fn chunks_raise_word_count() {
        let c = Controls::from_headers(&headers(&[("x-mock-words", "3"), ("x-mock-chunks", "8")]))
            .unwrap();
        assert_eq!((c.words, c.chunks), (8, Some(8)));
    }

    #[test]
    fn rejects_malformed_values() {
        for (name, value) in [
            ("x-mock-words", "many"),
            ("x-mock-words", "100001"),
            ("x-mock-status", "200"),
            ("x-mock-split", "0"),
            ("x-mock-no-usage", "maybe"),
            ("x-mock-web-searches", "1001"),
            ("x-mock-service-tier", "two words"),
        ] {
            let err = Controls::from_headers(&headers(&[(name, value)])).unwrap_err();
            assert_eq!(err.header, name);
        }
    }
}
