//! Limit specs: `METRIC:WINDOW[@UPSTREAM]=VALUE` (SPEC §3).
//!
//! This module owns the text form of a limit and what a request counts against it:
//!
//! * [`Metric`] — `requests`, `input_tokens`, `output_tokens`, `tokens` (input + output), `usd`;
//! * [`LimitSpec`] — a parsed spec with its [`Window`] (from [`super::window`]), optional
//!   upstream scope and value. `usd` values are integer micro-dollars (`usd:day=2.5` holds
//!   `2_500_000`); the others are plain counts. A value of `0` means the limit is *disabled*
//!   (requests are refused with 403 `quota_disabled`), not "unlimited".
//!
//! `Display` writes the canonical text, which `FromStr` reads back to an equal spec; serde
//! uses the same text, so specs appear as strings in config, JSON and storage keys.
//! Canonical means: no surrounding spaces, no leading zeros, `usd` values in their shortest
//! exact form (`usd:day=5.50` is written `usd:day=5.5`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::window::{Window, WindowParseError};
use crate::money::{self, DecimalError, Micros};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Number of requests (each request counts 1).
    Requests,
    /// Input tokens, cached ones included (SPEC §4 token semantics).
    InputTokens,
    /// Output tokens, reasoning tokens included.
    OutputTokens,
    /// Input + output tokens.
    Tokens,
    /// Cost in micro-dollars.
    Usd,
}

impl Metric {
    /// The spec keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::InputTokens => "input_tokens",
            Metric::OutputTokens => "output_tokens",
            Metric::Tokens => "tokens",
            Metric::Usd => "usd",
        }
    }

    /// Whether amounts of this metric are micro-dollars.
    pub fn is_money(self) -> bool {
        self == Metric::Usd
    }

    /// An amount of this metric as the JSON APIs write it: `usd` as a 6-decimal string
    /// (`"4.250000"`), the others as a plain integer (`"1200"`).
    pub fn format_amount(self, amount: i64) -> String {
        if self.is_money() {
            money::format_usd(amount)
        } else {
            amount.to_string()
        }
    }

    /// Parses a limit value of this metric: dollars with up to 6 decimals for `usd`
    /// (returned as micro-dollars), a non-negative whole number otherwise.
    pub fn parse_value(self, text: &str) -> Result<i64, LimitParseError> {
        let invalid = |source| LimitParseError::Value {
            metric: self,
            text: text.to_owned(),
            source,
        };
        if self.is_money() {
            return money::parse_usd(text).map_err(invalid);
        }
        if text.contains('.') {
            return Err(LimitParseError::NotWhole {
                metric: self,
                text: text.to_owned(),
            });
        }
        money::parse_decimal(text, 0).map_err(invalid)
    }

    /// Writes a value of this metric as it appears in a canonical spec (`5`, `2.5`, `60`).
    pub fn format_value(self, value: i64) -> String {
        if self.is_money() {
            money::format_usd_short(value)
        } else {
            value.to_string()
        }
    }
}

impl FromStr for Metric {
    type Err = LimitParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "requests" => Ok(Metric::Requests),
            "input_tokens" => Ok(Metric::InputTokens),
            "output_tokens" => Ok(Metric::OutputTokens),
            "tokens" => Ok(Metric::Tokens),
            "usd" => Ok(Metric::Usd),
            _ => Err(LimitParseError::Metric(s.to_owned())),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a limit spec could not be parsed. Messages quote the offending part.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitParseError {
    /// Not of the shape `METRIC:WINDOW[@UPSTREAM]=VALUE`.
    #[error("limit `{0}` is not of the form METRIC:WINDOW[@UPSTREAM]=VALUE (e.g. usd:day=5)")]
    Shape(String),
    /// Unknown metric keyword.
    #[error("unknown metric `{0}` (expected requests, input_tokens, output_tokens, tokens or usd)")]
    Metric(String),
    /// Bad window.
    #[error(transparent)]
    Window(#[from] WindowParseError),
    /// Empty or malformed `@UPSTREAM`.
    #[error("upstream name `{0}` must be non-empty and use only letters, digits, `-`, `_`, `.`")]
    Upstream(String),
    /// A fractional value for a counted metric.
    #[error("{metric} limit `{text}` must be a whole number")]
    NotWhole {
        /// The metric of the spec.
        metric: Metric,
        /// The value text.
        text: String,
    },
    /// A value that is not a valid non-negative number for its metric.
    #[error("invalid {metric} limit value: {source}")]
    Value {
        /// The metric of the spec.
        metric: Metric,
        /// The value text.
        text: String,
        /// What was wrong with the number.
        source: DecimalError,
    },
}

/// One limit: `METRIC:WINDOW[@UPSTREAM]=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LimitSpec {
    /// What is counted.
    pub metric: Metric,
    /// Over which time span.
    pub window: Window,
    /// `Some(name)`: only requests routed to that upstream count; `None`: all requests.
    pub upstream: Option<String>,
    /// The cap: micro-dollars for `usd`, a count otherwise. `0` = disabled (403).
    pub value: i64,
}

impl LimitSpec {
    /// Whether the limit refuses every request (`value == 0`, SPEC §3: 403 `quota_disabled`).
    pub fn is_disabled(&self) -> bool {
        self.value == 0
    }

    /// Whether a request routed to `upstream` counts against this limit.
    pub fn applies_to(&self, upstream: &str) -> bool {
        self.upstream
            .as_deref()
            .is_none_or(|scope| scope == upstream)
    }

    /// This limit's metric for one request: `requests` (normally 1), its input and output
    /// tokens, and its cost in micro-dollars. `tokens` saturates instead of overflowing.
    pub fn amount(
        &self,
        requests: i64,
        input_tokens: i64,
        output_tokens: i64,
        cost_micros: Micros,
    ) -> i64 {
        match self.metric {
            Metric::Requests => requests,
            Metric::InputTokens => input_tokens,
            Metric::OutputTokens => output_tokens,
            Metric::Tokens => input_tokens.saturating_add(output_tokens),
            Metric::Usd => cost_micros,
        }
    }
}

fn valid_upstream(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl FromStr for LimitSpec {
    type Err = LimitParseError;

    /// Parses `METRIC:WINDOW[@UPSTREAM]=VALUE`; surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let shape = || LimitParseError::Shape(text.to_owned());
        let (lhs, value) = text.split_once('=').ok_or_else(shape)?;
        let (metric, scope) = lhs.split_once(':').ok_or_else(shape)?;
        if metric.is_empty() || scope.is_empty() || value.is_empty() {
            return Err(shape());
        }
        let metric: Metric = metric.parse()?;
        let (window, upstream) = match scope.split_once('@') {
            Some((window, upstream)) => {
                if !valid_upstream(upstream) {
                    return Err(LimitParseError::Upstream(upstream.to_owned()));
                }
                (window, Some(upstream.to_owned()))
            }
            None => (scope, None),
        };
        let window: Window = window.parse()?;
        let value = metric.parse_value(value)?;
        Ok(LimitSpec {
            metric,
            window,
            upstream,
            value,
        })
    }
}

impl fmt::Display for LimitSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.metric, self.window)?;
        if let Some(upstream) = &self.upstream {
            write!(f, "@{upstream}")?;
        }
        write!(f, "={}", self.metric.format_value(self.value))
    }
}

impl TryFrom<String> for LimitSpec {
    type Error = LimitParseError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<LimitSpec> for String {
    fn from(spec: LimitSpec) -> Self {
        spec.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::window::{CalendarUnit, RollingUnit, RollingWindow};
    use proptest::prelude::*;

    fn spec(s: &str) -> LimitSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_the_spec_examples() {
        let usd = spec("usd:day=5");
        assert_eq!(usd.metric, Metric::Usd);
        assert_eq!(usd.window, Window::Calendar(CalendarUnit::Day));
        assert_eq!(usd.upstream, None);
        assert_eq!(usd.value, 5_000_000);

        let rpm = spec("requests:minute=60");
        assert_eq!(
            (rpm.metric, rpm.window, rpm.value),
            (Metric::Requests, Window::Calendar(CalendarUnit::Minute), 60)
        );

        let tokens = spec("tokens:month=2000000");
        assert_eq!(tokens.value, 2_000_000);
        assert_eq!(tokens.window, Window::Calendar(CalendarUnit::Month));

        let scoped = spec("usd:5h@anthropic=2");
        assert_eq!(
            scoped.window,
            Window::Rolling(RollingWindow::new(5, RollingUnit::Hours).unwrap())
        );
        assert_eq!(scoped.upstream.as_deref(), Some("anthropic"));
        assert_eq!(scoped.value, 2_000_000);

        let total = spec("requests:total=100");
        assert_eq!((total.window, total.value), (Window::Total, 100));

        let input = spec("input_tokens:7d=1000");
        assert_eq!(input.metric, Metric::InputTokens);
        assert_eq!(
            input.window,
            Window::Rolling(RollingWindow::new(7, RollingUnit::Days).unwrap())
        );

        assert_eq!(spec("output_tokens:week=10").metric, Metric::OutputTokens);
        assert_eq!(spec("usd:hour=0.000001").value, 1);
    }

    #[test]
    fn displays_canonical_text() {
        for canonical in [
            "usd:day=5",
            "requests:minute=60",
            "tokens:month=2000000",
            "usd:5h@anthropic=2",
            "requests:total=100",
            "input_tokens:7d=1000",
            "usd:week=2.5",
            "usd:30m=0.000001",
            "output_tokens:hour=0",
            "requests:60m@openai-eu.2=7",
        ] {
            assert_eq!(spec(canonical).to_string(), canonical);
        }
        assert_eq!(spec(" usd:day=5.50 ").to_string(), "usd:day=5.5");
        assert_eq!(spec("requests:05m=007").to_string(), "requests:5m=7");
    }

    #[test]
    fn zero_means_disabled() {
        assert!(spec("requests:day=0").is_disabled());
        assert!(spec("usd:day=0.0").is_disabled());
        assert!(!spec("usd:day=0.000001").is_disabled());
    }

    #[test]
    fn rejects_bad_specs_with_clear_errors() {
        let err = |s: &str| s.parse::<LimitSpec>().unwrap_err();
        assert!(matches!(err("usd:day"), LimitParseError::Shape(_)));
        assert!(matches!(err("usd=5"), LimitParseError::Shape(_)));
        assert!(matches!(err(":day=5"), LimitParseError::Shape(_)));
        assert!(matches!(err("usd:=5"), LimitParseError::Shape(_)));
        assert!(matches!(err("usd:day="), LimitParseError::Shape(_)));
        assert!(matches!(err("dollars:day=5"), LimitParseError::Metric(m) if m == "dollars"));
        assert!(matches!(err("USD:day=5"), LimitParseError::Metric(_)));
        assert!(matches!(err("usd:fortnight=5"), LimitParseError::Window(_)));
        assert!(matches!(
            err("usd:0h=5"),
            LimitParseError::Window(WindowParseError::ZeroLength)
        ));
        assert!(matches!(
            err("usd:367d=5"),
            LimitParseError::Window(WindowParseError::TooLong(_))
        ));
        assert!(matches!(
            err("usd:99999999999m=5"),
            LimitParseError::Window(WindowParseError::TooLong(_))
        ));
        assert!(matches!(err("usd:h=5"), LimitParseError::Window(_)));
        assert!(matches!(err("usd:-5h=5"), LimitParseError::Window(_)));
        assert!(matches!(err("usd:day@=5"), LimitParseError::Upstream(_)));
        assert!(matches!(err("usd:day@a b=5"), LimitParseError::Upstream(_)));
        assert!(matches!(
            err("requests:day=1.5"),
            LimitParseError::NotWhole { .. }
        ));
        assert!(matches!(
            err("usd:day=-5"),
            LimitParseError::Value {
                source: DecimalError::Negative(_),
                ..
            }
        ));
        assert!(matches!(
            err("usd:day=0.0000001"),
            LimitParseError::Value {
                source: DecimalError::TooPrecise { .. },
                ..
            }
        ));
        assert!(matches!(
            err("tokens:day=99999999999999999999"),
            LimitParseError::Value {
                source: DecimalError::Overflow(_),
                ..
            }
        ));
        assert_eq!(
            err("usd:day=abc").to_string(),
            "invalid usd limit value: `abc` is not a decimal number (expected digits with an \
             optional `.` fraction, e.g. `2.5`)"
        );
        assert_eq!(
            err("usd:fortnight=5").to_string(),
            "unknown window `fortnight` (expected minute, hour, day, week, month, total, or a \
             rolling length like 30m, 5h, 7d)"
        );
    }

    #[test]
    fn bounds_of_rolling_lengths() {
        assert!(spec("requests:527040m=1").window != Window::Total);
        assert!("requests:527041m=1".parse::<LimitSpec>().is_err());
        assert!("requests:8784h=1".parse::<LimitSpec>().is_ok());
        assert!("requests:8785h=1".parse::<LimitSpec>().is_err());
        assert!("requests:366d=1".parse::<LimitSpec>().is_ok());
        assert!("requests:1m=1".parse::<LimitSpec>().is_ok());
    }

    #[test]
    fn amount_per_metric() {
        let (req, input, output, cost) = (1, 1200, 300, 4_250);
        assert_eq!(spec("requests:day=9").amount(req, input, output, cost), 1);
        assert_eq!(
            spec("input_tokens:day=9").amount(req, input, output, cost),
            1200
        );
        assert_eq!(
            spec("output_tokens:day=9").amount(req, input, output, cost),
            300
        );
        assert_eq!(spec("tokens:day=9").amount(req, input, output, cost), 1500);
        assert_eq!(spec("usd:day=9").amount(req, input, output, cost), 4_250);
        assert_eq!(
            spec("tokens:day=9").amount(1, i64::MAX, 5, 0),
            i64::MAX,
            "tokens saturates"
        );
    }

    #[test]
    fn upstream_scope() {
        assert!(spec("usd:day=1").applies_to("openai"));
        assert!(spec("usd:day@openai=1").applies_to("openai"));
        assert!(!spec("usd:day@openai=1").applies_to("anthropic"));
    }

    #[test]
    fn amounts_format_for_json() {
        assert_eq!(Metric::Usd.format_amount(4_250_000), "4.250000");
        assert_eq!(Metric::Tokens.format_amount(1200), "1200");
    }

    #[test]
    fn serde_uses_the_text_form() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plan {
            limits: Vec<LimitSpec>,
        }
        let plan: Plan = toml::from_str(r#"limits = ["requests:minute=20", "usd:month=5"]"#)
            .expect("valid plan");
        assert_eq!(plan.limits[1].value, 5_000_000);
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(json, r#"{"limits":["requests:minute=20","usd:month=5"]}"#);
        let err = toml::from_str::<Plan>(r#"limits = ["usd:month=-5"]"#).unwrap_err();
        assert!(err.to_string().contains("negative"), "{err}");
    }

    fn arb_window() -> impl Strategy<Value = Window> {
        prop_oneof![
            prop::sample::select(vec![
                CalendarUnit::Minute,
                CalendarUnit::Hour,
                CalendarUnit::Day,
                CalendarUnit::Week,
                CalendarUnit::Month,
            ])
            .prop_map(Window::Calendar),
            (1u32..=527_040).prop_map(|n| Window::Rolling(
                RollingWindow::new(n, RollingUnit::Minutes).unwrap()
            )),
            (1u32..=8_784)
                .prop_map(|n| Window::Rolling(RollingWindow::new(n, RollingUnit::Hours).unwrap())),
            (1u32..=366)
                .prop_map(|n| Window::Rolling(RollingWindow::new(n, RollingUnit::Days).unwrap())),
            Just(Window::Total),
        ]
    }

    fn arb_metric() -> impl Strategy<Value = Metric> {
        prop::sample::select(vec![
            Metric::Requests,
            Metric::InputTokens,
            Metric::OutputTokens,
            Metric::Tokens,
            Metric::Usd,
        ])
    }

    proptest! {
        #[test]
        fn display_round_trips(
            metric in arb_metric(),
            window in arb_window(),
            upstream in prop::option::of("[a-zA-Z0-9_.-]{1,12}"),
            value in 0i64..=i64::MAX,
        ) {
            let spec = LimitSpec { metric, window, upstream, value };
            let text = spec.to_string();
            prop_assert_eq!(text.parse::<LimitSpec>(), Ok(spec.clone()));
            // Canonical text is a fixed point.
            prop_assert_eq!(text.parse::<LimitSpec>().map(|s| s.to_string()), Ok(text));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = text.parse::<LimitSpec>();
        }
    }
}
