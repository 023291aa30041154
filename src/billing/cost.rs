//! The exact cost of a request, and the worst-case hold taken before it runs (SPEC §4).
//!
//! Pure arithmetic over a [`Price`] entry and token counts: no I/O, no configuration.
//!
//! # Cost
//!
//! With `R` the rates of the request's band — the entry's `long_context` rates when its input
//! (cached and cache-write tokens included) exceeds `long_context.above`, else its own — and
//! every subtraction stopping at 0:
//!
//! ```text
//! tokens = (input − cached − cache_write − audio_input) × R.input
//!        + cached × R.cached_input
//!        + (cache_write − cache_write_1h) × R.cache_write + cache_write_1h × R.cache_write_1h
//!        + audio_input × R.audio_input
//!        + (output − audio_output) × R.output + audio_output × R.audio_output
//! cost   = ceil( tokens × tier × speed × region / 10⁹  +  tool_calls × web_search / 10³ ) µUSD
//! ```
//!
//! `tier`, `speed` and `region` are the entry's multipliers for the service tier, speed and
//! inference region the response reports. A reported name the entry has no multiplier for is
//! billed at 1 and returned in [`Costed::unpriced`] (the caller counts it in a metric); the
//! standard names (`default`/`standard` tiers, `standard` speed, `global` region) are 1 without
//! being counted. Per-call fees are not multiplied: providers bill searches at the standard
//! rate whatever the tier.
//!
//! When a usage report is inconsistent (its parts exceed its total) the parts are billed as
//! reported and the remainder is taken as 0, so the bill never drops below what the parts
//! alone cost.
//!
//! # Exactness
//!
//! Everything is an integer: rates are nano-USD per 1M tokens, multipliers reduced fractions
//! with denominators of at most 10⁹ and values of at most 1000. The sum is formed as one
//! fraction and divided once, rounding up, so a bill is never below the exact rational cost
//! and less than 1 µUSD above it. The numerator is below 2²⁵² for any `u64` counts and rates:
//! each token term (two `u64`) is below 2¹²⁸ and the seven of them below 2¹³¹; the three
//! multipliers' numerators (each below 1000 × 10⁹ < 2⁴⁰) multiply to below 2¹²⁰; the fee term
//! `calls × fee × 10⁶ × Π den` is below 2¹²⁸ · 2²⁰ · 2⁹⁰. So it is computed in 256-bit
//! arithmetic ([`Wide`]) and never overflows; the divisor `10⁹ × Π den` fits a `u128`; a
//! result above `i64::MAX` µUSD saturates there.
//!
//! # Hold
//!
//! [`Price::hold`] is the most the request can cost when it states its output bound: every
//! estimated input token at the dearest input-side rate (any token may be written to a cache,
//! at up to 2× input), every allowed output token at the dearest output-side rate, the
//! long-context band when the estimate crosses its threshold, and the multipliers of the tier,
//! speed and region the request asks for, plus the per-call fee of every tool use the request
//! allows (the caller derives that count from the request: `max_uses` / `max_tool_calls`, else
//! a documented default). A modifier the request asks for that the entry cannot price is found
//! by [`Price::unpriced_request`]; the caller refuses such a request instead of holding it at 1×.

use crate::api::{Modifiers, Usage};
use crate::money::Micros;

use super::price::{Multipliers, Price, RATE_SCALE, Ratio};

/// Service tiers billed at standard rates without a configured multiplier.
pub const STANDARD_TIERS: &[&str] = &["default", "standard"];
/// Speeds billed at standard rates without a configured multiplier.
pub const STANDARD_SPEEDS: &[&str] = &["standard"];
/// Inference regions billed at standard rates without a configured multiplier.
pub const STANDARD_REGIONS: &[&str] = &["global"];

/// What a request cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Costed<'u> {
    /// The bill, rounded up to a whole micro-dollar.
    pub micros: Micros,
    /// Reported modifiers the entry has no multiplier for, billed at standard rates:
    /// `("service_tier" | "speed" | "inference_geo", name)`.
    pub unpriced: Vec<(&'static str, &'u str)>,
}

impl Price {
    /// The exact cost of `usage` under this entry; see the module docs.
    pub fn cost<'u>(&self, usage: &'u Usage) -> Costed<'u> {
        let r = self.rates_for(usage.input_tokens);
        let writes_short = usage
            .cache_write_tokens
            .saturating_sub(usage.cache_write_1h_tokens);
        let input_parts = [
            usage.cached_input_tokens,
            writes_short,
            usage.cache_write_1h_tokens,
            usage.audio_input_tokens,
        ];
        let uncached = input_parts
            .iter()
            .fold(usage.input_tokens, |left, part| left.saturating_sub(*part));
        let text_output = usage
            .output_tokens
            .saturating_sub(usage.audio_output_tokens);
        let terms = [
            (uncached, r.input),
            (usage.cached_input_tokens, r.cached_input),
            (writes_short, r.cache_write),
            (usage.cache_write_1h_tokens, r.cache_write_1h),
            (usage.audio_input_tokens, r.audio_input),
            (text_output, r.output),
            (usage.audio_output_tokens, r.audio_output),
        ];
        let mut unpriced = Vec::new();
        let served = &usage.served;
        let mut pick =
            |kind: &'static str, map: &Multipliers, name: &'u Option<String>, standard: &[&str]| {
                let (ratio, priced) = multiplier(map, name.as_deref(), standard);
                if !priced && let Some(n) = name {
                    unpriced.push((kind, n.as_str()));
                }
                ratio
            };
        let ratios = [
            pick(
                "service_tier",
                &self.tiers,
                &served.service_tier,
                STANDARD_TIERS,
            ),
            pick("speed", &self.speed, &served.speed, STANDARD_SPEEDS),
            pick(
                "inference_geo",
                &self.inference_geo,
                &served.inference_geo,
                STANDARD_REGIONS,
            ),
        ];
        let micros = exact_micros(&terms, &ratios, usage.tool_calls, self.web_search);
        Costed { micros, unpriced }
    }

    /// The worst case of a request with `input_tokens` estimated input, at most
    /// `output_tokens` output and at most `tool_calls` per-call tool uses, asking for `asked`;
    /// see the module docs.
    pub fn hold(
        &self,
        input_tokens: u64,
        output_tokens: u64,
        tool_calls: u64,
        asked: &Modifiers,
    ) -> Micros {
        let r = self.rates_for(input_tokens);
        let input_rate = [
            r.input,
            r.cached_input,
            r.cache_write,
            r.cache_write_1h,
            r.audio_input,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let output_rate = r.output.max(r.audio_output);
        let ratios = [
            multiplier(&self.tiers, asked.service_tier.as_deref(), STANDARD_TIERS).0,
            multiplier(&self.speed, asked.speed.as_deref(), STANDARD_SPEEDS).0,
            multiplier(
                &self.inference_geo,
                asked.inference_geo.as_deref(),
                STANDARD_REGIONS,
            )
            .0,
        ];
        exact_micros(
            &[(input_tokens, input_rate), (output_tokens, output_rate)],
            &ratios,
            tool_calls,
            self.web_search,
        )
    }

    /// The name of a modifier the request asks for that this entry cannot price (no
    /// multiplier configured and not a standard name), as `(kind, name)`: such a request is
    /// refused rather than held and billed at standard rates.
    pub fn unpriced_request<'a>(&self, asked: &'a Modifiers) -> Option<(&'static str, &'a str)> {
        [
            (
                "service_tier",
                &self.tiers,
                &asked.service_tier,
                STANDARD_TIERS,
            ),
            ("speed", &self.speed, &asked.speed, STANDARD_SPEEDS),
            (
                "inference_geo",
                &self.inference_geo,
                &asked.inference_geo,
                STANDARD_REGIONS,
            ),
        ]
        .into_iter()
        .find_map(|(kind, map, name, standard)| {
            let n = name.as_deref()?;
            (!multiplier(map, Some(n), standard).1).then_some((kind, n))
        })
    }
}

/// The multiplier for a reported `name`, and whether it was priced (configured, standard, or
/// no name at all).
fn multiplier(map: &Multipliers, name: Option<&str>, standard: &[&str]) -> (Ratio, bool) {
    match name {
        None => (Ratio::ONE, true),
        Some(n) => match map.get(n) {
            Some(r) => (*r, true),
            None => (Ratio::ONE, standard.contains(&n)),
        },
    }
}

/// `ceil((Σ tokens × rate) × Π num / (10⁹ × Π den) + calls × fee / 10³)` in µUSD, exactly.
fn exact_micros(terms: &[(u64, u64)], ratios: &[Ratio; 3], calls: u64, fee: u64) -> Micros {
    let num = ratios
        .iter()
        .fold(1u128, |acc, r| acc * u128::from(r.num()));
    let den = ratios
        .iter()
        .fold(1u128, |acc, r| acc * u128::from(r.den()));
    // Every factor fits the bounds in the module docs, so none of these can fail; a failure
    // would mean a bound was broken, and the bill saturates rather than wraps.
    let total = (|| {
        let mut tokens = Wide::ZERO;
        for &(count, rate) in terms {
            tokens = tokens.checked_add(Wide::from(u128::from(count) * u128::from(rate)))?;
        }
        let tokens = tokens.checked_mul(num)?;
        // A fee in nano-USD is 10⁶ units of the token sum's scale (10⁻¹⁵ USD).
        let fees = Wide::from(u128::from(calls) * u128::from(fee))
            .checked_mul(1_000_000)?
            .checked_mul(den)?;
        let total = tokens.checked_add(fees)?;
        Some(total.div_ceil(u128::from(RATE_SCALE) * den))
    })();
    total.map_or(Micros::MAX, Wide::saturating_i64)
}

/// An unsigned 256-bit integer, four little-endian 64-bit limbs: just the operations the cost
/// sum needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wide([u64; 4]);

impl Wide {
    pub(crate) const ZERO: Wide = Wide([0; 4]);

    pub(crate) fn checked_add(self, other: Wide) -> Option<Wide> {
        let mut out = [0u64; 4];
        let mut carry = false;
        for (i, slot) in out.iter_mut().enumerate() {
            let (s1, c1) = self.0[i].overflowing_add(other.0[i]);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *slot = s2;
            carry = c1 || c2;
        }
        (!carry).then_some(Wide(out))
    }

    fn checked_mul_u64(self, m: u64) -> Option<Wide> {
        let mut out = [0u64; 4];
        let mut carry = 0u128;
        for (i, slot) in out.iter_mut().enumerate() {
            let product = u128::from(self.0[i]) * u128::from(m) + carry;
            *slot = product as u64;
            carry = product >> 64;
        }
        (carry == 0).then_some(Wide(out))
    }

    fn checked_shl64(self) -> Option<Wide> {
        (self.0[3] == 0).then_some(Wide([0, self.0[0], self.0[1], self.0[2]]))
    }

    pub(crate) fn checked_mul(self, m: u128) -> Option<Wide> {
        let low = self.checked_mul_u64(m as u64)?;
        let high = self.checked_mul_u64((m >> 64) as u64)?.checked_shl64()?;
        low.checked_add(high)
    }

    fn bit(&self, i: usize) -> u128 {
        u128::from((self.0[i / 64] >> (i % 64)) & 1)
    }

    /// `ceil(self / d)`; `d` must not be 0 (it is always at least 10⁹ here) — a zero divisor
    /// gives the largest value instead of panicking.
    pub(crate) fn div_ceil(self, d: u128) -> Wide {
        if d == 0 {
            return Wide([u64::MAX; 4]);
        }
        let mut quotient = [0u64; 4];
        let mut rem: u128 = 0;
        for i in (0..256).rev() {
            // rem < d, so rem·2 + bit < 2d; when rem's top bit is set the doubled value does
            // not fit in u128 but is ≥ 2¹²⁸ > d, and the wrapping subtraction is exact.
            let overflow = rem >> 127 == 1;
            rem = (rem << 1) | self.bit(i);
            if overflow || rem >= d {
                rem = rem.wrapping_sub(d);
                quotient[i / 64] |= 1 << (i % 64);
            }
        }
        let q = Wide(quotient);
        if rem == 0 {
            q
        } else {
            q.checked_add(Wide::from(1)).unwrap_or(q)
        }
    }

    pub(crate) fn saturating_i64(self) -> i64 {
        if self.0[1] != 0 || self.0[2] != 0 || self.0[3] != 0 {
            return i64::MAX;
        }
        i64::try_from(self.0[0]).unwrap_or(i64::MAX)
    }
}

impl From<u128> for Wide {
    fn from(v: u128) -> Wide {
        Wide([v as u64, (v >> 64) as u64, 0, 0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::price::{LongContext, Rates, parse_rate};
    use proptest::prelude::*;

    fn usd(text: &str) -> u64 {
        parse_rate(text).unwrap()
    }

    fn ratio(text: &str) -> Ratio {
        Ratio::parse(text).unwrap()
    }

    /// Claude Opus 4.8's entry: 5 / 0.50 / 6.25 / 10 / 25, US-only inference 1.1×, fast 2×.
    fn opus() -> Price {
        let mut p = Price::new(usd("5"), usd("25"));
        p.rates.cached_input = usd("0.5");
        p.inference_geo.insert("us".into(), ratio("1.1"));
        p.speed.insert("fast".into(), ratio("2"));
        p
    }

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        }
    }

    fn served(tier: Option<&str>, speed: Option<&str>, geo: Option<&str>) -> Modifiers {
        Modifiers {
            service_tier: tier.map(str::to_owned),
            speed: speed.map(str::to_owned),
            inference_geo: geo.map(str::to_owned),
        }
    }

    #[test]
    fn plain_tokens_round_up_once() {
        let p = opus();
        // 1000 × 5 + 200 × 25 = 10 000 µUSD.
        assert_eq!(p.cost(&usage(1_000, 200)).micros, 10_000);
        // 1 input token: 5 µUSD exactly; 1 output token 25 µUSD.
        assert_eq!(p.cost(&usage(1, 1)).micros, 30);
        let mini = Price::new(usd("0.15"), usd("0.6"));
        // 7 × 0.15 + 3 × 0.6 = 1.05 + 1.8 = 2.85 → 3 (rounded once, not per term: 2 + 2 = 4).
        assert_eq!(mini.cost(&usage(7, 3)).micros, 3);
        assert_eq!(mini.cost(&usage(0, 0)).micros, 0);
    }

    #[test]
    fn cache_reads_and_both_write_lifetimes() {
        let p = opus();
        // 10 000 input = 2 000 uncached + 5 000 reads + 3 000 writes, 1 000 of them 1-hour.
        let u = Usage {
            cached_input_tokens: 5_000,
            cache_write_tokens: 3_000,
            cache_write_1h_tokens: 1_000,
            ..usage(10_000, 0)
        };
        // 2000×5 + 5000×0.5 + 2000×6.25 + 1000×10 = 10000 + 2500 + 12500 + 10000.
        assert_eq!(p.cost(&u).micros, 35_000);
        // The same writes all at the 5-minute rate would be 3000×6.25 = 18750: 1-hour writes
        // are billed at their own rate, not the 5-minute one.
        let five_min = Usage {
            cache_write_1h_tokens: 0,
            ..u.clone()
        };
        assert_eq!(p.cost(&five_min).micros, 31_250);
    }

    #[test]
    fn openai_writes_are_priced_at_cache_write() {
        // gpt-6.1-sol: 2 / 0.10 / 2.50 (30 min) / 5.00 (12 h) / 10.
        let mut p = Price::new(usd("2"), usd("10"));
        p.rates.cached_input = usd("0.1");
        p.rates.cache_write = usd("2.5");
        p.rates.cache_write_1h = usd("5");
        let u = Usage {
            cached_input_tokens: 9_000,
            cache_write_tokens: 2_048,
            cache_write_1h_tokens: 48,
            ..usage(12_000, 800)
        };
        // uncached 952×2 + 9000×0.1 + 2000×2.5 + 48×5 + 800×10
        // = 1904 + 900 + 5000 + 240 + 8000 = 16 044.
        assert_eq!(p.cost(&u).micros, 16_044);
        // A pre-5.6 model with cache_write = input bills a write like plain input.
        let old = Price {
            rates: Rates {
                cache_write: usd("2"),
                cache_write_1h: usd("2"),
                ..p.rates
            },
            ..p.clone()
        };
        let plain = Usage {
            cached_input_tokens: 9_000,
            ..usage(12_000, 800)
        };
        assert_eq!(old.cost(&u).micros, old.cost(&plain).micros);
    }

    #[test]
    fn audio_tokens_have_their_own_rates() {
        // gpt-audio-1.5: text 2.50 / 10, audio 32 / 64.
        let mut p = Price::new(usd("2.5"), usd("10"));
        p.rates.audio_input = usd("32");
        p.rates.audio_output = usd("64");
        let u = Usage {
            audio_input_tokens: 1_200,
            audio_output_tokens: 800,
            ..usage(1_500, 900)
        };
        // 300×2.5 + 1200×32 + 100×10 + 800×64 = 750 + 38400 + 1000 + 51200.
        assert_eq!(p.cost(&u).micros, 91_350);
    }

    #[test]
    fn web_searches_are_billed_per_call_and_not_multiplied() {
        let p = opus();
        let u = Usage {
            tool_calls: 3,
            served: served(None, Some("fast"), None),
            ..usage(1_000, 0)
        };
        // 1000×5 ×2 (fast) + 3 × 10 000 µUSD.
        assert_eq!(p.cost(&u).micros, 10_000 + 30_000);
        let mut free_search = opus();
        free_search.web_search = 0;
        assert_eq!(free_search.cost(&u).micros, 10_000);
    }

    #[test]
    fn tier_speed_and_region_multipliers_stack() {
        let mut p = opus();
        p.tiers.insert("priority".into(), ratio("2"));
        p.tiers.insert("flex".into(), ratio("0.5"));
        let base = usage(1_000, 200); // 10 000 µUSD at standard rates
        let with = |m: Modifiers| {
            let u = Usage {
                served: m,
                ..base.clone()
            };
            p.cost(&u).micros
        };
        assert_eq!(with(served(Some("default"), None, None)), 10_000);
        assert_eq!(
            with(served(Some("standard"), Some("standard"), Some("global"))),
            10_000
        );
        assert_eq!(with(served(Some("flex"), None, None)), 5_000);
        assert_eq!(with(served(Some("priority"), None, None)), 20_000);
        assert_eq!(with(served(None, None, Some("us"))), 11_000);
        assert_eq!(with(served(None, Some("fast"), Some("us"))), 22_000);
        assert_eq!(
            with(served(Some("priority"), Some("fast"), Some("us"))),
            44_000
        );
    }

    #[test]
    fn exact_fraction_multipliers() {
        // gpt-4o-mini Fast: 0.25 / 1.00 per 1M, exactly 5/3 of 0.15 / 0.60.
        let mut p = Price::new(usd("0.15"), usd("0.6"));
        p.tiers.insert("priority".into(), ratio("5/3"));
        let u = Usage {
            served: served(Some("priority"), None, None),
            ..usage(1_000_000, 1_000_000)
        };
        assert_eq!(p.cost(&u).micros, 1_250_000);
        // 3 tokens × 0.25 = 0.75 µUSD → 1.
        let small = Usage {
            served: served(Some("priority"), None, None),
            ..usage(3, 0)
        };
        assert_eq!(p.cost(&small).micros, 1);
    }

    #[test]
    fn unpriced_names_bill_standard_and_are_reported() {
        let p = opus();
        let u = Usage {
            served: served(Some("priority"), Some("turbo"), Some("us")),
            ..usage(1_000, 200)
        };
        let c = p.cost(&u);
        // priority and turbo have no multiplier: 1×; us is 1.1×.
        assert_eq!(c.micros, 11_000);
        assert_eq!(
            c.unpriced,
            vec![("service_tier", "priority"), ("speed", "turbo")]
        );
        let standard = Usage {
            served: served(Some("default"), Some("standard"), Some("global")),
            ..usage(1_000, 200)
        };
        assert!(p.cost(&standard).unpriced.is_empty());
    }

    fn haiku55() -> Price {
        let mut p = Price::new(usd("0.10"), usd("0.50"));
        p.rates.cached_input = usd("0.01");
        p.rates.cache_write = usd("0.125");
        p.rates.cache_write_1h = usd("0.20");
        p.long_context = Some(LongContext {
            above: 100_000,
            rates: Rates {
                input: usd("0.50"),
                cached_input: usd("0.05"),
                cache_write: usd("0.625"),
                cache_write_1h: usd("1.00"),
                output: usd("2.50"),
                audio_input: usd("0.50"),
                audio_output: usd("2.50"),
            },
        });
        p
    }

    #[test]
    fn long_context_reprices_the_whole_request_above_the_threshold() {
        let p = haiku55();
        let at = |input: u64| {
            let u = Usage {
                cached_input_tokens: 50_000,
                cache_write_tokens: 10_000,
                ..usage(input, 1_000)
            };
            p.cost(&u).micros
        };
        // At the threshold (not above): 40 000×0.10 + 50 000×0.01 + 10 000×0.125 + 1000×0.50
        // = 4000 + 500 + 1250 + 500.
        assert_eq!(at(100_000), 6_250);
        // One token above: every token at the long rates, output included:
        // 40 001×0.50 + 50 000×0.05 + 10 000×0.625 + 1000×2.50
        // = 20000.5 + 2500 + 6250 + 2500 = 31250.5 → 31 251.
        assert_eq!(at(100_001), 31_251);
    }

    #[test]
    fn inconsistent_reports_bill_their_parts() {
        let p = opus();
        // Parts (5 reads + 10 writes, 20 of them 1-hour) exceed the input (10).
        let u = Usage {
            cached_input_tokens: 5,
            cache_write_tokens: 10,
            cache_write_1h_tokens: 20,
            audio_output_tokens: 7,
            ..usage(10, 3)
        };
        // uncached 0; reads 5×0.5; 5-minute writes 0; 1-hour 20×10; output text 0, audio 7×25:
        // 2.5 + 200 + 175 = 377.5 → 378.
        assert_eq!(p.cost(&u).micros, 378);
    }

    #[test]
    fn huge_counts_saturate_instead_of_wrapping() {
        let mut p = Price::new(u64::MAX, u64::MAX);
        p.tiers.insert("x".into(), ratio("1000"));
        p.web_search = u64::MAX;
        let u = Usage {
            tool_calls: u64::MAX,
            served: served(Some("x"), None, None),
            ..usage(u64::MAX, u64::MAX)
        };
        assert_eq!(p.cost(&u).micros, i64::MAX);
        assert_eq!(
            p.hold(u64::MAX, u64::MAX, u64::MAX, &served(Some("x"), None, None)),
            i64::MAX
        );
    }

    #[test]
    fn hold_is_the_worst_case_of_the_asked_tier_and_band() {
        let mut p = haiku55();
        p.tiers.insert("priority".into(), ratio("2"));
        p.speed.insert("fast".into(), ratio("2"));
        let none = Modifiers::default();
        // Every input token at the dearest input-side rate (1-hour write 0.20), output 0.50:
        // 1000×0.20 + 100×0.50 = 250.
        assert_eq!(p.hold(1_000, 100, 0, &none), 250);
        assert_eq!(
            p.hold(1_000, 100, 0, &served(Some("priority"), None, None)),
            500
        );
        assert_eq!(
            p.hold(1_000, 100, 0, &served(Some("priority"), Some("fast"), None)),
            1_000
        );
        // An asked tier without a multiplier is one the caller refuses; standard names and
        // configured ones are priced.
        assert_eq!(
            p.unpriced_request(&served(Some("scale"), None, None)),
            Some(("service_tier", "scale"))
        );
        assert_eq!(
            p.unpriced_request(&served(Some("priority"), Some("turbo"), None)),
            Some(("speed", "turbo"))
        );
        assert_eq!(
            p.unpriced_request(&served(None, None, Some("eu"))),
            Some(("inference_geo", "eu"))
        );
        assert_eq!(
            p.unpriced_request(&served(Some("priority"), Some("fast"), Some("global"))),
            None
        );
        assert_eq!(
            p.unpriced_request(&served(Some("default"), None, None)),
            None
        );
        // Tool uses the request allows are held at the per-call fee, unmultiplied:
        // 250 + 3 × 0.01 USD.
        assert_eq!(p.hold(1_000, 100, 3, &none), 250 + 30_000);
        assert_eq!(
            p.hold(1_000, 100, 3, &served(Some("priority"), None, None)),
            500 + 30_000
        );
        // Above the threshold the long band: 100 001 × 1.00 + 100 × 2.50.
        assert_eq!(p.hold(100_001, 100, 0, &none), 100_251);
        // The hold covers any usage the request can produce within its bounds.
        let worst = Usage {
            cache_write_tokens: 1_000,
            cache_write_1h_tokens: 1_000,
            served: served(Some("priority"), None, None),
            ..usage(1_000, 100)
        };
        assert!(
            p.cost(&worst).micros <= p.hold(1_000, 100, 0, &served(Some("priority"), None, None))
        );
    }

    #[test]
    fn wide_division_matches_u128() {
        for (n, d) in [
            (0u128, 1u128),
            (1, 1),
            (10, 3),
            (u128::MAX, 1),
            (u128::MAX, u128::MAX),
            (u128::MAX - 1, u128::MAX),
            (12_345_678_901_234_567_890, 1_000_000_000),
        ] {
            assert_eq!(
                Wide::from(n).div_ceil(d),
                Wide::from(n.div_ceil(d)),
                "{n}/{d}"
            );
        }
        // (2¹²⁸ − 1)² / (2¹²⁸ − 1) = 2¹²⁸ − 1: a quotient from a 256-bit dividend.
        let square = Wide::from(u128::MAX).checked_mul(u128::MAX).unwrap();
        assert_eq!(square.div_ceil(u128::MAX), Wide::from(u128::MAX));
        assert_eq!(
            square
                .checked_add(Wide::from(1))
                .unwrap()
                .div_ceil(u128::MAX),
            Wide::from(u128::MAX).checked_add(Wide::from(1)).unwrap()
        );
        assert_eq!(Wide::from(u128::MAX).saturating_i64(), i64::MAX);
        assert_eq!(Wide::from(42).saturating_i64(), 42);
        assert_eq!(Wide([u64::MAX; 4]).checked_add(Wide::from(1)), None);
        assert_eq!(Wide([0, 0, 0, 1]).checked_mul(1 << 64), None);
    }

    proptest! {
        #[test]
        fn wide_arithmetic_agrees_with_u128(
            q in any::<u128>(),
            d in 1u128..,
            r_seed in any::<u128>(),
            a in any::<u64>(),
            b in any::<u64>(),
        ) {
            let r = r_seed % d;
            // n = q·d + r in 256 bits; ceil(n / d) = q + (r > 0).
            let n = Wide::from(q).checked_mul(d).unwrap().checked_add(Wide::from(r)).unwrap();
            let expect = Wide::from(q).checked_add(Wide::from(u128::from(r > 0))).unwrap();
            prop_assert_eq!(n.div_ceil(d), expect);
            let ab = u128::from(a) * u128::from(b);
            prop_assert_eq!(Wide::from(u128::from(a)).checked_mul(u128::from(b)), Some(Wide::from(ab)));
        }
    }

    /// Prices and usages small enough that the exact cost fits a `u128` oracle.
    fn arb_ratio() -> impl Strategy<Value = Ratio> {
        (0u64..=4_000, 1u64..=1_000).prop_filter_map("in range", |(n, d)| Ratio::new(n, d))
    }

    fn arb_rates() -> impl Strategy<Value = Rates> {
        let rate = 0u64..=100_000_000_000; // up to 100 USD per 1M tokens
        proptest::array::uniform7(rate).prop_map(|r| Rates {
            input: r[0],
            cached_input: r[1],
            cache_write: r[2],
            cache_write_1h: r[3],
            output: r[4],
            audio_input: r[5],
            audio_output: r[6],
        })
    }

    fn arb_price() -> impl Strategy<Value = Price> {
        (
            arb_rates(),
            0u64..=1_000_000_000,
            arb_ratio(),
            arb_ratio(),
            arb_ratio(),
            proptest::option::of((
                1u64..=20_000_000,
                proptest::array::uniform7(0u64..=100_000_000_000),
            )),
        )
            .prop_map(|(rates, fee, tier, speed, geo, long)| {
                let mut p = Price::new(0, 0);
                p.rates = rates;
                p.web_search = fee;
                p.tiers.insert("t".into(), tier);
                p.speed.insert("s".into(), speed);
                p.inference_geo.insert("g".into(), geo);
                // Long-context rates are a surcharge on the standard ones.
                p.long_context = long.map(|(above, extra)| {
                    let f = rates.fields();
                    let add = |i: usize| f[i].1 + extra[i];
                    LongContext {
                        above,
                        rates: Rates {
                            input: add(0),
                            cached_input: add(1),
                            cache_write: add(2),
                            cache_write_1h: add(3),
                            output: add(4),
                            audio_input: add(5),
                            audio_output: add(6),
                        },
                    }
                });
                p
            })
    }

    fn arb_usage() -> impl Strategy<Value = Usage> {
        let n = 0u64..=10_000_000;
        (
            proptest::array::uniform8(n),
            0u64..=10_000,
            proptest::array::uniform3(proptest::option::of(0usize..3)),
        )
            .prop_map(|(c, calls, names)| {
                let pick = |i: Option<usize>, mine: &str| {
                    i.map(|k| ["standard", "unknown", mine][k].to_owned())
                };
                Usage {
                    input_tokens: c[0],
                    cached_input_tokens: c[1],
                    cache_write_tokens: c[2],
                    cache_write_1h_tokens: c[3],
                    audio_input_tokens: c[4],
                    output_tokens: c[5],
                    reasoning_tokens: c[6],
                    audio_output_tokens: c[7],
                    tool_calls: calls,
                    served: Modifiers {
                        service_tier: pick(names[0], "t"),
                        speed: pick(names[1], "s"),
                        inference_geo: pick(names[2], "g"),
                    },
                }
            })
    }

    /// The exact cost as a fraction `num / den` of µUSD, computed independently in `u128`.
    fn exact(p: &Price, u: &Usage) -> (u128, u128) {
        let r = p.rates_for(u.input_tokens);
        let short = u.cache_write_tokens.saturating_sub(u.cache_write_1h_tokens);
        let parts = u.cached_input_tokens + short + u.cache_write_1h_tokens + u.audio_input_tokens;
        let uncached = u.input_tokens.saturating_sub(parts);
        let text_out = u.output_tokens.saturating_sub(u.audio_output_tokens);
        let t = |n: u64, rate: u64| u128::from(n) * u128::from(rate);
        let tokens = t(uncached, r.input)
            + t(u.cached_input_tokens, r.cached_input)
            + t(short, r.cache_write)
            + t(u.cache_write_1h_tokens, r.cache_write_1h)
            + t(u.audio_input_tokens, r.audio_input)
            + t(text_out, r.output)
            + t(u.audio_output_tokens, r.audio_output);
        let m = |map: &Multipliers, name: &Option<String>| {
            name.as_deref()
                .and_then(|n| map.get(n))
                .copied()
                .unwrap_or(Ratio::ONE)
        };
        let ms = [
            m(&p.tiers, &u.served.service_tier),
            m(&p.speed, &u.served.speed),
            m(&p.inference_geo, &u.served.inference_geo),
        ];
        let num: u128 = ms.iter().map(|r| u128::from(r.num())).product();
        let den: u128 = ms.iter().map(|r| u128::from(r.den())).product();
        let fees = u128::from(u.tool_calls) * u128::from(p.web_search) * 1_000_000;
        (tokens * num + fees * den, 1_000_000_000 * den)
    }

    proptest! {
        #[test]
        fn cost_is_the_exact_rational_rounded_up(p in arb_price(), u in arb_usage()) {
            let cost = p.cost(&u).micros;
            let (num, den) = exact(&p, &u);
            let c = u128::try_from(cost).unwrap();
            // Never below the exact cost, and less than 1 µUSD above it.
            prop_assert!(c * den >= num, "{c} < {num}/{den}");
            prop_assert!(c == 0 || (c - 1) * den < num, "{c} ≥ {num}/{den} + 1");
        }

        #[test]
        fn cost_is_monotone_in_every_count(
            p in arb_price(),
            u in arb_usage(),
            which in 0usize..8,
            extra in 0u64..=1_000_000,
        ) {
            // More of any kind of token (a part of input or output grows its total too) or
            // more calls never costs less — also when the extra input crosses a threshold.
            let mut more = u.clone();
            match which {
                0 => more.input_tokens += extra,
                1 => { more.cached_input_tokens += extra; more.input_tokens += extra; }
                2 => { more.cache_write_tokens += extra; more.input_tokens += extra; }
                3 => {
                    more.cache_write_1h_tokens += extra;
                    more.cache_write_tokens += extra;
                    more.input_tokens += extra;
                }
                4 => { more.audio_input_tokens += extra; more.input_tokens += extra; }
                5 => more.output_tokens += extra,
                6 => { more.audio_output_tokens += extra; more.output_tokens += extra; }
                _ => more.tool_calls += extra,
            }
            prop_assert!(p.cost(&more).micros >= p.cost(&u).micros);
        }

        #[test]
        fn hold_covers_every_usage_within_the_bounds(
            p in arb_price(),
            u in arb_usage(),
        ) {
            // A consistent usage (its parts within its totals) whose input and output fit the
            // estimate, served as asked, without tool calls, never costs more than the hold —
            // also when only the estimate is in the long-context band.
            let mut u = Usage { tool_calls: 0, ..u };
            u.cache_write_1h_tokens = u.cache_write_1h_tokens.min(u.cache_write_tokens);
            u.input_tokens = u.input_tokens.max(
                u.cached_input_tokens + u.cache_write_tokens + u.audio_input_tokens,
            );
            u.output_tokens = u.output_tokens.max(u.audio_output_tokens);
            let asked = u.served.clone();
            prop_assert!(p.cost(&u).micros <= p.hold(u.input_tokens, u.output_tokens, 0, &asked));
            prop_assert!(p.cost(&u).micros <= p.hold(u.input_tokens + 10, u.output_tokens, 0, &asked));
        }
    }
}
