//! Passthrough routes: provider endpoints that are forwarded but neither metered nor billed
//! (`GET /v1/models`, `POST /v1/messages/count_tokens`, …), written `"METHOD /path"` in an
//! upstream's `passthrough` list.
//!
//! A path segment written `{name}` matches exactly one non-empty segment of the request
//! path, and only one that cannot move the request elsewhere on the provider: `.`/`..`
//! (also percent-encoded), an encoded `/` or `\`, control bytes and bytes outside
//! RFC 3986's segment characters never match. A passthrough carries the provider's own
//! key, so it must reach exactly the endpoint it names and nothing next to it. The query
//! string plays no part in matching and is forwarded as sent.

use http::Method;

/// Paths of the metered provider routes ([`crate::api::ApiFormat`]); a passthrough route
/// may not match any of them, so it can never become a way around billing.
pub const METERED_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
];

/// One `"METHOD /path"` passthrough route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughRoute {
    pub method: Method,
    /// The path as configured, e.g. `/v1/models/{id}` (also the metrics label).
    pub pattern: String,
    /// Literal segments; `None` for a `{name}` segment.
    segments: Vec<Option<String>>,
}

impl PassthroughRoute {
    /// Parse `"GET /v1/models/{id}"`.
    pub fn parse(s: &str) -> Result<PassthroughRoute, String> {
        let (method, path) = s
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("`{s}` is not a route like \"GET /v1/models\""))?;
        let method = match method {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" => {
                Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?
            }
            other => {
                return Err(format!(
                    "`{other}` is not a method (GET, POST, PUT, PATCH, DELETE, HEAD)"
                ));
            }
        };
        let path = path.trim();
        let Some(rest) = path.strip_prefix('/') else {
            return Err(format!("path `{path}` must start with /"));
        };
        if path.contains(['?', '#', '%', ' ']) {
            return Err(format!(
                "path `{path}` must be a plain path (no query, fragment, escapes or spaces)"
            ));
        }
        let mut segments = Vec::new();
        for seg in rest.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(format!(
                    "path `{path}` has an empty or dot segment; write each segment out"
                ));
            }
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "`{seg}` in `{path}` is not a parameter like {{id}}"
                    ));
                }
                segments.push(None);
            } else if seg.contains(['{', '}']) {
                return Err(format!(
                    "`{seg}` in `{path}`: a parameter must be a whole segment, like {{id}}"
                ));
            } else {
                segments.push(Some(seg.to_string()));
            }
        }
        Ok(PassthroughRoute {
            method,
            pattern: path.to_string(),
            segments,
        })
    }

    /// Does a request `method path` (path without its query) hit this route?
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        *method == self.method && self.matches_path(path)
    }

    /// The path part of [`Self::matches`].
    pub fn matches_path(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for seg in &self.segments {
            let Some(part) = parts.next() else {
                return false;
            };
            let ok = match seg {
                Some(literal) => part == literal,
                None => safe_parameter(part),
            };
            if !ok {
                return false;
            }
        }
        parts.next().is_none()
    }
}

impl std::fmt::Display for PassthroughRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.pattern)
    }
}

/// A request path segment a `{name}` parameter may take: RFC 3986 `pchar`s only, escapes
/// well formed, and after decoding no separator, control byte or dot segment.
fn safe_parameter(seg: &str) -> bool {
    let b = seg.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                return false;
            };
            decoded.push(v);
            i += 3;
            continue;
        }
        let pchar = c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&c);
        if !pchar {
            return false;
        }
        decoded.push(c);
        i += 1;
    }
    !decoded.is_empty()
        && decoded != b"."
        && decoded != b".."
        && !decoded
            .iter()
            .any(|&c| c == b'/' || c == b'\\' || c < 0x20 || c == 0x7f)
}

/// Why a request target is not canonical (answered 400, never routed or forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCanonical {
    /// A target whose path does not start with `/` (`*`), or not UTF-8.
    Form,
    /// An empty segment (`//`, a trailing `/`).
    EmptySegment,
    /// A `.` or `..` segment, also percent-encoded.
    DotSegment,
    /// A byte outside RFC 3986's segment characters, or `;` (path parameters).
    Byte,
    /// A malformed escape, or one that hides a separator, `%`, `;`, `?`, `#`, a control
    /// byte, or a character that needs no escape (`%61`, `%2e`).
    Escape,
}

impl std::fmt::Display for NotCanonical {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotCanonical::Form => "the request target must be a UTF-8 path starting with `/`",
            NotCanonical::EmptySegment => "the path has an empty segment (`//` or a trailing `/`)",
            NotCanonical::DotSegment => "the path has a `.` or `..` segment",
            NotCanonical::Byte => {
                "the path has a character outside RFC 3986 path segments, or `;`"
            }
            NotCanonical::Escape => {
                "the path has a malformed or needless percent-escape, or one of `/`, `\\`, `%`, `;`, `?`, `#` or a control byte"
            }
        })
    }
}

/// Check that a request path is in the one form tollgate routes and forwards: `/`, or `/`
/// followed by non-empty segments of RFC 3986 `pchar`s other than `;`, none `.` or `..`,
/// escapes only for bytes that need one and never for `/`, `\`, `%`, `;`, `?`, `#` or
/// control bytes (so no upstream that decodes a path once more, or knows path
/// parameters, reads a different path than tollgate matched). The query is not part of
/// the path; it is forwarded as sent.
///
/// Routing compares this canonical path exactly, so `/v1/models/../chat/completions`,
/// `/v1/models%2F..%2Fchat/completions`, `//v1/chat/completions` and
/// `/v1/models;x=/../chat` are refused before any route is looked at.
pub fn check_canonical(path: &str) -> Result<(), NotCanonical> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(NotCanonical::Form);
    };
    if rest.is_empty() {
        return Ok(());
    }
    for seg in rest.split('/') {
        if seg.is_empty() {
            return Err(NotCanonical::EmptySegment);
        }
        let b = seg.as_bytes();
        let mut decoded = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'%' {
                let v = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(NotCanonical::Escape)?;
                let needless = v.is_ascii_alphanumeric() || b"-._~".contains(&v);
                let hiding = b"/\\%;?#".contains(&v) || v < 0x20 || v == 0x7f;
                if needless || hiding {
                    return Err(NotCanonical::Escape);
                }
                decoded.push(v);
                i += 3;
                continue;
            }
            let pchar = c.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&c);
            if !pchar {
                return Err(NotCanonical::Byte);
            }
            decoded.push(c);
            i += 1;
        }
        if decoded == b"." || decoded == b".." {
            return Err(NotCanonical::DotSegment);
        }
    }
    Ok(())
}

/// The default passthrough routes of an upstream kind (SPEC §6).
pub fn defaults(kind: crate::api::UpstreamKind) -> &'static [&'static str] {
    match kind {
        crate::api::UpstreamKind::Openai => &["GET /v1/models", "GET /v1/models/{id}"],
        crate::api::UpstreamKind::Anthropic => {
            &["GET /v1/models", "POST /v1/messages/count_tokens"]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches_templates() {
        let r = PassthroughRoute::parse("GET /v1/models/{id}").unwrap();
        assert_eq!(r.to_string(), "GET /v1/models/{id}");
        assert!(r.matches(&Method::GET, "/v1/models/gpt-4o-mini"));
        assert!(r.matches(&Method::GET, "/v1/models/ft:gpt-4o-mini:org:custom:abc123"));
        assert!(r.matches(&Method::GET, "/v1/models/ft%3Agpt-4o"));
        assert!(!r.matches(&Method::POST, "/v1/models/gpt-4o"), "method");
        assert!(!r.matches(&Method::GET, "/v1/models"), "segment count");
        assert!(!r.matches(&Method::GET, "/v1/models/"), "empty parameter");
        assert!(!r.matches(&Method::GET, "/v1/models/a/b"), "extra segment");
        let lit = PassthroughRoute::parse("POST /v1/messages/count_tokens").unwrap();
        assert!(lit.matches(&Method::POST, "/v1/messages/count_tokens"));
        assert!(!lit.matches(&Method::POST, "/v1/messages/count_tokens/"));
        assert!(!lit.matches(&Method::POST, "/v1/messages"));
    }

    #[test]
    fn a_parameter_cannot_walk_to_another_endpoint() {
        let r = PassthroughRoute::parse("GET /v1/models/{id}").unwrap();
        for hostile in [
            "/v1/models/..",
            "/v1/models/.",
            "/v1/models/%2e%2E",
            "/v1/models/%2E",
            "/v1/models/..%2Ffiles",
            "/v1/models/x%2fy",
            "/v1/models/x%5cy",
            "/v1/models/x\\y",
            "/v1/models/x%00",
            "/v1/models/x%0a",
            "/v1/models/%zz",
            "/v1/models/%4",
            "/v1/models/a b",
            "/v1/models/a\"b",
        ] {
            assert!(!r.matches(&Method::GET, hostile), "{hostile}");
        }
    }

    #[test]
    fn only_canonical_paths_pass() {
        for ok in [
            "/",
            "/v1/chat/completions",
            "/v1/models",
            "/v1/models/gpt-4o-mini",
            "/v1/models/ft:gpt-4o-mini:org:custom:abc123",
            "/v1/models/ft%3Agpt-4o",
            "/v1/models/a%20b",
            "/v1/models/caf%C3%A9",
            "/v1/models/...",
        ] {
            assert_eq!(check_canonical(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("v1/models", NotCanonical::Form),
            ("*", NotCanonical::Form),
            ("http://api.openai.com/v1/models", NotCanonical::Form),
            ("//v1/chat/completions", NotCanonical::EmptySegment),
            ("/v1//chat/completions", NotCanonical::EmptySegment),
            ("/v1/models/", NotCanonical::EmptySegment),
            ("/v1/models/../chat/completions", NotCanonical::DotSegment),
            ("/v1/./chat/completions", NotCanonical::DotSegment),
            ("/v1/models/..", NotCanonical::DotSegment),
            ("/v1/models/%2e%2e/chat/completions", NotCanonical::Escape),
            ("/v1/models/.%2e/chat/completions", NotCanonical::Escape),
            ("/v1/models%2F..%2Fchat/completions", NotCanonical::Escape),
            ("/v1/models%2f..%2fchat/completions", NotCanonical::Escape),
            ("/v1/models/..%5Cchat", NotCanonical::Escape),
            ("/v1/models/x%252e%252e", NotCanonical::Escape),
            ("/v1/models/x%3Bv=1", NotCanonical::Escape),
            ("/v1/models/x%3F", NotCanonical::Escape),
            ("/v1/models/x%23", NotCanonical::Escape),
            ("/v1/models/x%00", NotCanonical::Escape),
            ("/v1/models/x%0a", NotCanonical::Escape),
            ("/v1/%63hat/completions", NotCanonical::Escape),
            ("/v1/models/%zz", NotCanonical::Escape),
            ("/v1/models/%4", NotCanonical::Escape),
            ("/v1/models;x=1/../chat/completions", NotCanonical::Byte),
            ("/v1/models/..;/chat/completions", NotCanonical::Byte),
            ("/v1/models\\..\\chat", NotCanonical::Byte),
            ("/v1/models/a b", NotCanonical::Byte),
            ("/v1/models/a\"b", NotCanonical::Byte),
            ("/v1/models/\u{e9}", NotCanonical::Byte),
        ] {
            assert_eq!(check_canonical(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn bad_routes_are_refused() {
        for bad in [
            "/v1/models",
            "GET v1/models",
            "FETCH /v1/models",
            "GET /v1//models",
            "GET /v1/../models",
            "GET /v1/models?x=1",
            "GET /v1/models/{}",
            "GET /v1/models/x{id}",
            "GET /v1/%2e",
        ] {
            assert!(PassthroughRoute::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_parse() {
        for kind in [
            crate::api::UpstreamKind::Openai,
            crate::api::UpstreamKind::Anthropic,
        ] {
            for r in defaults(kind) {
                let p = PassthroughRoute::parse(r).unwrap();
                assert!(!METERED_PATHS.iter().any(|m| p.matches_path(m)), "{r}");
            }
        }
    }
}

/// The per-key rate of passthrough requests (`quota.passthrough_rate` per second, bursts
/// of `quota.passthrough_burst`): a token bucket per key id, in memory. Passthrough
/// requests are not metered, but each carries the operator's provider key and spends the
/// provider-side rate limits every tenant shares.
#[derive(Debug)]
pub struct PassthroughRate {
    /// Tokens per second.
    rate: u64,
    /// Bucket size, in tokens.
    burst: u64,
    /// key id → (milli-tokens left, when last refilled).
    buckets: parking_lot::Mutex<std::collections::HashMap<String, (u64, std::time::Instant)>>,
}

impl PassthroughRate {
    pub fn new(rate: u32, burst: u32) -> PassthroughRate {
        PassthroughRate {
            rate: u64::from(rate.max(1)),
            burst: u64::from(burst.max(1)),
            buckets: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Take one request's token for `key_id` at `now`; `false` when its bucket is empty.
    pub fn try_take(&self, key_id: &str, now: std::time::Instant) -> bool {
        const MILLI: u64 = 1000;
        let full = self.burst * MILLI;
        let mut buckets = self.buckets.lock();
        let (left, at) = buckets.entry(key_id.to_string()).or_insert((full, now));
        let elapsed_ms =
            u64::try_from(now.saturating_duration_since(*at).as_millis()).unwrap_or(u64::MAX);
        // rate tokens a second = rate milli-tokens a millisecond.
        *left = left
            .saturating_add(elapsed_ms.saturating_mul(self.rate))
            .min(full);
        *at = now;
        if *left >= MILLI {
            *left -= MILLI;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_key_gets_its_burst_then_its_rate() {
        let r = PassthroughRate::new(10, 3);
        let t = Instant::now();
        assert!((0..3).all(|_| r.try_take("k_a", t)), "the burst");
        assert!(!r.try_take("k_a", t), "past the burst");
        assert!(r.try_take("k_b", t), "another key has its own bucket");
        assert!(
            !r.try_take("k_a", t + Duration::from_millis(50)),
            "half a token"
        );
        assert!(
            r.try_take("k_a", t + Duration::from_millis(100)),
            "one token in 100 ms"
        );
        assert!(!r.try_take("k_a", t + Duration::from_millis(100)));
        // A long pause refills to the burst, no more.
        let later = t + Duration::from_secs(3600);
        assert!((0..3).all(|_| r.try_take("k_a", later)));
        assert!(!r.try_take("k_a", later));
    }
}
