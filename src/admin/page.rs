//! `GET /admin/`: the usage page — one self-contained HTML document ([`PAGE`], inline CSS
//! and script, no external asset) that reads `/admin/keys`, `/admin/usage` and
//! `/admin/transactions` with the admin token and redraws itself every 5 s.
//!
//! A browser cannot set headers when it navigates, so this one route also takes the admin
//! token as `?token=` (compared in constant time like the header). The page's script keeps
//! the token in memory, sends it as a Bearer header to the API, and removes it from the
//! address bar; the API routes themselves never accept a token in the URL, where it would
//! end up in histories and access logs.
//!
//! The Content-Security-Policy allows exactly the page's own `<script>` and `<style>` by
//! their SHA-256 hashes (no `'unsafe-inline'`), connections to this origin only, and
//! nothing else: no images, fonts, frames, forms or plugins.

use std::sync::LazyLock;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use sha2::{Digest, Sha256};

use super::{Query, Resp, token_matches};

/// The page, served as is.
pub const PAGE: &str = include_str!("page.html");

/// The text between the first `<tag>` and `</tag>` of [`PAGE`], as the browser hashes it.
fn inline_block(tag: &str) -> Option<&'static str> {
    let open = format!("<{tag}>");
    let start = PAGE.find(&open)? + open.len();
    let len = PAGE[start..].find(&format!("</{tag}>"))?;
    Some(&PAGE[start..start + len])
}

/// A CSP source expression allowing one inline block by hash; `'none'` when the block is
/// missing (the page then stays inert, which the tests would catch).
fn hash_source(tag: &str) -> String {
    match inline_block(tag) {
        Some(text) => format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
        ),
        None => "'none'".to_string(),
    }
}

/// The Content-Security-Policy of the page, computed once from [`PAGE`] itself so it can
/// never fall out of step with an edit of the HTML.
pub static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash_source("script"),
        hash_source("style"),
    )
});

/// Whether the request's `?token=` is the configured admin token. Only the page route
/// asks this.
pub(super) fn query_token_ok(configured: &str, raw_query: Option<&str>) -> bool {
    match Query::parse(raw_query) {
        Ok(q) => q
            .get("token")
            .is_some_and(|presented| token_matches(configured, presented)),
        Err(_) => false,
    }
}

/// The page response with its security headers.
pub(super) fn page() -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(csp) = HeaderValue::from_str(&CSP) {
        h.insert("content-security-policy", csp);
    }
    // The URL may carry the admin token until the script removes it: never send it on.
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csp_pins_the_inline_script_and_style_by_hash() {
        let csp = CSP.as_str();
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        let script = inline_block("script").unwrap();
        let style = inline_block("style").unwrap();
        assert!(script.contains("replaceState"));
        assert!(style.contains(".bar"));
        let expect = |t: &str| {
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(Sha256::digest(t.as_bytes()))
            )
        };
        assert!(
            csp.contains(&format!("script-src {};", expect(script))),
            "{csp}"
        );
        assert!(
            csp.contains(&format!("style-src {};", expect(style))),
            "{csp}"
        );
        // Exactly one of each, so the hashes cover everything the page runs.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert_eq!(hash_source("marquee"), "'none'");
    }

    #[test]
    fn page_is_self_contained_and_never_parses_data_as_html() {
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "http://",
            "https://",
            " src=",
            " href=",
            "style=\"",
            "onclick",
            "onload",
        ] {
            assert!(!PAGE.contains(banned), "page.html contains `{banned}`");
        }
        assert!(PAGE.contains("textContent"));
    }

    #[test]
    fn the_query_token_must_match() {
        assert!(query_token_ok("s3cret", Some("token=s3cret")));
        assert!(query_token_ok("s3cret", Some("token=s3%63ret")));
        assert!(!query_token_ok("s3cret", Some("token=s3cre")));
        assert!(!query_token_ok("s3cret", Some("token=")));
        assert!(!query_token_ok("s3cret", Some("tok=s3cret")));
        assert!(!query_token_ok("s3cret", Some("token=%zz")));
        assert!(!query_token_ok("s3cret", None));
        assert!(!query_token_ok("", Some("token=")));
    }

    #[test]
    fn page_headers() {
        let r = page();
        assert_eq!(r.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(r.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(r.headers()["content-security-policy"], CSP.as_str());
        assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    }
}
