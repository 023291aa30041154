//! OpenAI-style `x-ratelimit-*` headers for an admitted request.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::quota::limit::Metric;
use crate::quota::store::LimitState;
use crate::quota::window::Window;

/// `x-ratelimit-*` headers for the request and token limits with the smallest remaining
/// fraction, counted after admitting this request.
pub(super) fn ratelimit_headers(
    states: &[LimitState],
    now: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    let tightest = |want: &dyn Fn(Metric) -> bool| {
        states
            .iter()
            .filter(|s| want(s.metric()) && s.limit.spec.value > 0)
            .min_by(|a, b| {
                // remaining/limit compared exactly: a.r * b.l vs b.r * a.l
                let l = (a.remaining() as i128) * (b.limit.spec.value as i128);
                let r = (b.remaining() as i128) * (a.limit.spec.value as i128);
                l.cmp(&r)
            })
    };
    let mut out = Vec::new();
    let mut push = |s: &LimitState, names: [&'static str; 3]| {
        out.push((names[0], s.limit.spec.value.to_string()));
        out.push((names[1], s.remaining().to_string()));
        if let (false, Some(at)) = (matches!(s.limit.spec.window, Window::Total), s.resets_at) {
            out.push((
                names[2],
                openai_duration((at - now).to_std().unwrap_or_default()),
            ));
        }
    };
    if let Some(s) = tightest(&|m| m == Metric::Requests) {
        push(
            s,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
        );
    }
    if let Some(s) = tightest(&|m| {
        matches!(
            m,
            Metric::Tokens | Metric::InputTokens | Metric::OutputTokens
        )
    }) {
        push(
            s,
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        );
    }
    out
}

/// A duration as OpenAI writes it: `6m0s`, `1s`, `20ms`, `1h2m3s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_durations() {
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
