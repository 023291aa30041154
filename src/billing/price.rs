//! Model prices and the exact cost of a request (SPEC §4 "Token and cost semantics", §8
//! `[prices]`).
//!
//! This module owns:
//!
//! * [`Price`] — one model's rates as exact integers: USD per 1M tokens scaled by 10⁹
//!   (`0.075` → `75_000_000`), read from TOML numbers or strings without float rounding;
//! * [`Price::cost_micros`] — the SPEC cost formula, summed exactly and rounded **up** to a
//!   whole micro-dollar;
//! * [`PriceTable`] — the shipped `prices.toml` merged with `[prices."MODEL"]` overrides from
//!   config, looked up by model id with glob patterns.
//!
//! # Units
//!
//! A rate `r` is nano-USD per 1M tokens. `t` tokens at rate `r` cost `t·r / 10⁹` micro-USD,
//! so a request's cost is `ceil(Σ tᵢ·rᵢ / 10⁹)` µUSD — exact integer arithmetic in `u128`
//! (each product stays below 2¹²⁸ for any realistic count; sums saturate rather than wrap and
//! the result saturates at `i64::MAX`).
//!
//! # Lookup rule
//!
//! An exact key equal to the model id wins. Otherwise, among glob keys (`*` = any run of
//! characters, `?` = one character, case-sensitive) that match the whole id, the most specific
//! wins: the longest literal prefix before the first wildcard, then the most literal
//! characters, then the fewest `*`, then the smaller key in byte order (so the result never
//! depends on file order). No match → `None`; the caller applies `[quota].unknown_model`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use thiserror::Error;
use wildmatch::WildMatch;

use crate::money::{self, DecimalError, Micros};

/// Decimal places a rate may have (its scale is `10^RATE_DECIMALS`).
pub const RATE_DECIMALS: u32 = 9;

/// Scale of a rate: `1 USD per 1M tokens` is `RATE_SCALE`.
pub const RATE_SCALE: u64 = 1_000_000_000;

/// The default price table shipped with tollgate (`prices.toml` at the repository root).
pub const SHIPPED_PRICES: &str = include_str!("../../prices.toml");

/// Why a price or price table could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PriceError {
    /// A rate field that is not an exact non-negative decimal with at most 9 places.
    #[error("{field}: {source}")]
    Rate {
        /// `input`, `cached_input`, `cache_write` or `output`.
        field: &'static str,
        /// What was wrong with the number.
        source: DecimalError,
    },
    /// An empty model key.
    #[error("a price key must be a model id or glob pattern, not empty")]
    EmptyPattern,
    /// The TOML document itself did not parse or had unknown keys.
    #[error("price table: {0}")]
    Toml(String),
}

/// One model's prices in USD per 1M tokens, each scaled by 10⁹ ([`RATE_SCALE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Price {
    /// Uncached input tokens.
    pub input: u64,
    /// Cache reads (OpenAI cached tokens, Anthropic `cache_read_input_tokens`).
    pub cached_input: u64,
    /// Anthropic cache creation (`cache_creation_input_tokens`).
    pub cache_write: u64,
    /// Output tokens, reasoning included.
    pub output: u64,
}

/// The token counts a cost is computed from (SPEC §4): `input_tokens` includes the cached and
/// cache-write tokens; `output_tokens` includes reasoning tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TokenUsage {
    /// All input tokens, cached and cache-write ones included.
    pub input_tokens: u64,
    /// Input tokens read from a prompt cache.
    pub cached_input_tokens: u64,
    /// Input tokens written to a prompt cache (Anthropic).
    pub cache_write_tokens: u64,
    /// Output tokens, reasoning included.
    pub output_tokens: u64,
}

impl Price {
    /// A price with the SPEC defaults: `cached_input = input`, `cache_write = 1.25 × input`.
    ///
    /// `1.25 × input` is exact whenever `input` is a multiple of 4 nano-units, which holds for
    /// every price with at most 7 decimals; otherwise it is rounded up to the next nano-unit
    /// (an error below 10⁻⁹ USD per 1M tokens).
    pub fn new(input: u64, output: u64) -> Self {
        Price {
            input,
            cached_input: input,
            cache_write: default_cache_write(input),
            output,
        }
    }

    /// Cost of a request in micro-dollars, rounded up:
    /// `(input − cached − cache_write) × input + cached × cached_input +
    /// cache_write × cache_write + output × output`.
    ///
    /// When `cached + cache_write > input` (an inconsistent usage report), the uncached part is
    /// taken as 0 and the cached and cache-write tokens are billed as reported — the input
    /// count is effectively raised to their sum, never lowered below it. Never negative.
    pub fn cost_micros(&self, usage: &TokenUsage) -> Micros {
        let cache_parts = usage
            .cached_input_tokens
            .saturating_add(usage.cache_write_tokens);
        let uncached = usage.input_tokens.saturating_sub(cache_parts);
        let terms = [
            (uncached, self.input),
            (usage.cached_input_tokens, self.cached_input),
            (usage.cache_write_tokens, self.cache_write),
            (usage.output_tokens, self.output),
        ];
        let nano_sum = terms.iter().fold(0u128, |sum, &(tokens, rate)| {
            sum.saturating_add(u128::from(tokens) * u128::from(rate))
        });
        let micros = nano_sum.div_ceil(u128::from(RATE_SCALE));
        i64::try_from(micros).unwrap_or(i64::MAX)
    }

    /// Convenience for [`Price::cost_micros`] with the counts as arguments.
    pub fn cost_of(
        &self,
        input_tokens: u64,
        cached_input_tokens: u64,
        cache_write_tokens: u64,
        output_tokens: u64,
    ) -> Micros {
        self.cost_micros(&TokenUsage {
            input_tokens,
            cached_input_tokens,
            cache_write_tokens,
            output_tokens,
        })
    }
}

fn default_cache_write(input: u64) -> u64 {
    // ×5 in u128 cannot overflow; the result saturates at u64::MAX for inputs above
    // 0.8 × u64::MAX (≈ 1.5 × 10¹⁰ USD per 1M tokens — no real price comes near).
    let scaled = (u128::from(input) * 5).div_ceil(4);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// Reads a rate (USD per 1M tokens) from decimal text, exactly: `"0.075"` → `75_000_000`.
pub fn parse_rate(text: &str) -> Result<u64, DecimalError> {
    // parse_decimal never returns a negative value.
    money::parse_decimal(text, RATE_DECIMALS).map(i64::unsigned_abs)
}

/// Writes a rate in its shortest exact decimal form: `75_000_000` → `"0.075"`.
pub fn format_rate(rate: u64) -> String {
    let (whole, frac) = (rate / RATE_SCALE, rate % RATE_SCALE);
    if frac == 0 {
        whole.to_string()
    } else {
        let digits = format!("{frac:09}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// A rate as written in TOML, kept as exact decimal text.
struct RateText(String);

impl<'de> Deserialize<'de> for RateText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RateVisitor;

        impl Visitor<'_> for RateVisitor {
            type Value = RateText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of USD per 1M tokens, e.g. 0.15 or \"0.15\"")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RateText, E> {
                Ok(RateText(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RateText, E> {
                Ok(RateText(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RateText, E> {
                // TOML hands floats over as f64. Rust's `{}` prints the shortest decimal that
                // round-trips to the same f64, i.e. the literal as written (`0.075`), never
                // an exponent — so parsing that text recovers the exact decimal.
                Ok(RateText(format!("{v}")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RateText, E> {
                Ok(RateText(v.to_owned()))
            }
        }

        deserializer.deserialize_any(RateVisitor)
    }
}

/// `[prices."MODEL"]` as written: input and output required, the others defaulted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: RateText,
    output: RateText,
    cached_input: Option<RateText>,
    cache_write: Option<RateText>,
}

impl TryFrom<RawPrice> for Price {
    type Error = PriceError;

    fn try_from(raw: RawPrice) -> Result<Self, Self::Error> {
        let rate = |field: &'static str, text: &RateText| {
            parse_rate(&text.0).map_err(|source| PriceError::Rate { field, source })
        };
        let input = rate("input", &raw.input)?;
        let mut price = Price::new(input, rate("output", &raw.output)?);
        if let Some(cached) = &raw.cached_input {
            price.cached_input = rate("cached_input", cached)?;
        }
        if let Some(write) = &raw.cache_write {
            price.cache_write = rate("cache_write", write)?;
        }
        Ok(price)
    }
}

impl<'de> Deserialize<'de> for Price {
    /// Reads a `[prices."MODEL"]` table: `input` and `output` required, `cached_input` and
    /// `cache_write` optional; each a TOML number or decimal string, ≥ 0, at most 9 decimals.
    /// Unknown fields are errors.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawPrice::deserialize(deserializer)?;
        Price::try_from(raw).map_err(de::Error::custom)
    }
}

impl Serialize for Price {
    /// Writes all four rates, defaults resolved, as exact decimal strings (`"0.075"`).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = [
            ("input", self.input),
            ("cached_input", self.cached_input),
            ("cache_write", self.cache_write),
            ("output", self.output),
        ];
        let map: BTreeMap<&str, String> = fields
            .into_iter()
            .map(|(name, rate)| (name, format_rate(rate)))
            .collect();
        map.serialize(serializer)
    }
}

/// A price file: the shipped `prices.toml`, with the same `[prices."MODEL"]` tables as config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    #[serde(default)]
    prices: BTreeMap<String, Price>,
}

/// Reads a TOML document of `[prices."MODEL"]` tables (the shipped file's format).
pub fn parse_price_file(text: &str) -> Result<BTreeMap<String, Price>, PriceError> {
    toml::from_str::<PriceFile>(text)
        .map(|file| file.prices)
        .map_err(|e| PriceError::Toml(e.to_string()))
}

fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Specificity of a glob key; larger is more specific (see the module docs).
fn specificity(pattern: &str) -> (usize, usize, std::cmp::Reverse<usize>) {
    let prefix = pattern.find(['*', '?']).unwrap_or(pattern.len());
    let literal = pattern.chars().filter(|c| !matches!(c, '*' | '?')).count();
    let stars = pattern.matches('*').count();
    (prefix, literal, std::cmp::Reverse(stars))
}

struct GlobPrice {
    pattern: String,
    matcher: WildMatch,
    price: Price,
}

/// Prices by model id or glob pattern, ready for lookup.
pub struct PriceTable {
    exact: HashMap<String, Price>,
    /// Glob entries, most specific first: the first match wins.
    globs: Vec<GlobPrice>,
}

impl fmt::Debug for PriceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.entries()).finish()
    }
}

impl PriceTable {
    /// A table from `(pattern, price)` entries; a later entry replaces an earlier one with the
    /// same pattern.
    pub fn new(entries: impl IntoIterator<Item = (String, Price)>) -> Result<Self, PriceError> {
        let mut all: BTreeMap<String, Price> = BTreeMap::new();
        for (pattern, price) in entries {
            if pattern.is_empty() {
                return Err(PriceError::EmptyPattern);
            }
            all.insert(pattern, price);
        }
        let mut exact = HashMap::new();
        let mut globs = Vec::new();
        for (pattern, price) in all {
            if is_glob(&pattern) {
                globs.push(GlobPrice {
                    matcher: WildMatch::new(&pattern),
                    pattern,
                    price,
                });
            } else {
                exact.insert(pattern, price);
            }
        }
        globs.sort_by(|a, b| {
            specificity(&b.pattern)
                .cmp(&specificity(&a.pattern))
                .then_with(|| a.pattern.cmp(&b.pattern))
        });
        Ok(PriceTable { exact, globs })
    }

    /// The shipped table alone.
    pub fn shipped() -> Result<Self, PriceError> {
        Self::new(parse_price_file(SHIPPED_PRICES)?)
    }

    /// The shipped table with config's `[prices."MODEL"]` entries on top: a config entry
    /// replaces the shipped entry of the same pattern, and new patterns are added.
    pub fn with_overrides(
        overrides: impl IntoIterator<Item = (String, Price)>,
    ) -> Result<Self, PriceError> {
        let shipped = parse_price_file(SHIPPED_PRICES)?;
        Self::new(shipped.into_iter().chain(overrides))
    }

    /// The price of `model`, per the lookup rule in the module docs; `None` if nothing matches.
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        self.lookup_entry(model).map(|(_, price)| price)
    }

    /// Like [`PriceTable::lookup`], also naming the key that matched (for logs and
    /// `check-config`).
    pub fn lookup_entry(&self, model: &str) -> Option<(&str, &Price)> {
        if let Some((pattern, price)) = self.exact.get_key_value(model) {
            return Some((pattern.as_str(), price));
        }
        self.globs
            .iter()
            .find(|glob| glob.matcher.matches(model))
            .map(|glob| (glob.pattern.as_str(), &glob.price))
    }

    /// Every entry, sorted by pattern.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Price)> {
        let mut all: Vec<(&str, &Price)> = self
            .exact
            .iter()
            .map(|(p, price)| (p.as_str(), price))
            .chain(self.globs.iter().map(|g| (g.pattern.as_str(), &g.price)))
            .collect();
        all.sort_by_key(|(pattern, _)| *pattern);
        all.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usd(text: &str) -> u64 {
        parse_rate(text).unwrap()
    }

    fn table() -> PriceTable {
        PriceTable::shipped().expect("shipped prices.toml parses")
    }

    #[test]
    fn rates_are_exact_integers() {
        assert_eq!(usd("0.075"), 75_000_000);
        assert_eq!(usd("15"), 15_000_000_000);
        assert_eq!(usd("0.000000001"), 1);
        assert!(parse_rate("0.0000000001").is_err());
        assert_eq!(format_rate(75_000_000), "0.075");
        assert_eq!(format_rate(15_000_000_000), "15");
        assert_eq!(format_rate(0), "0");
    }

    #[test]
    fn defaults_for_cache_rates() {
        let p = Price::new(usd("0.15"), usd("0.60"));
        assert_eq!(p.cached_input, usd("0.15"));
        assert_eq!(p.cache_write, usd("0.1875"));
        assert_eq!(Price::new(usd("3"), 0).cache_write, usd("3.75"));
        // 1 nano-unit × 1.25 rounds up to 2.
        assert_eq!(Price::new(1, 0).cache_write, 2);
    }

    #[test]
    fn reads_toml_numbers_and_strings() {
        let prices = parse_price_file(
            r#"
            [prices."gpt-4o-mini"]
            input = 0.15
            cached_input = 0.075
            cache_write = 0.1875
            output = 0.60

            [prices."m-int"]
            input = 3
            output = "15.000000001"

            [prices."m-tiny"]
            input = 1e-9
            output = 0.1
            "#,
        )
        .unwrap();
        let mini = prices["gpt-4o-mini"];
        assert_eq!(
            (mini.input, mini.cached_input, mini.cache_write, mini.output),
            (150_000_000, 75_000_000, 187_500_000, 600_000_000)
        );
        let int = prices["m-int"];
        assert_eq!((int.input, int.output), (3_000_000_000, 15_000_000_001));
        assert_eq!(prices["m-tiny"].input, 1);
        assert_eq!(prices["m-tiny"].output, 100_000_000);
    }

    #[test]
    fn rejects_bad_rates() {
        let bad = |body: &str| {
            parse_price_file(&format!("[prices.\"m\"]\n{body}"))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("input = -0.5\noutput = 1").contains("negative"));
        assert!(bad("input = nan\noutput = 1").contains("not a decimal"));
        assert!(bad("input = inf\noutput = 1").contains("not a decimal"));
        assert!(bad("input = 1e-10\noutput = 1").contains("more than 9 decimal places"));
        assert!(bad("input = \"0.0000000001\"\noutput = 1").contains("9 decimal"));
        assert!(bad("input = 1e300\noutput = 1").contains("too large"));
        assert!(bad("input = true\noutput = 1").contains("USD per 1M tokens"));
        assert!(bad("input = 1").contains("output"));
        assert!(bad("input = 1\noutput = 1\ncached = 1").contains("unknown field"));
        let err = bad("input = 1\noutput = 1\ncache_write = -1");
        assert!(
            err.contains("cache_write") && err.contains("negative"),
            "{err}"
        );
        assert!(matches!(
            PriceTable::new([(String::new(), Price::new(1, 1))]),
            Err(PriceError::EmptyPattern)
        ));
    }

    #[test]
    fn hand_computed_costs() {
        let mini = table().lookup("gpt-4o-mini").copied().unwrap();
        // 1000 input at 0.15/M = 150 µUSD; 500 output at 0.60/M = 300 µUSD.
        assert_eq!(mini.cost_of(1_000, 0, 0, 500), 450);
        // 1 input token: 0.15 µUSD → rounds up to 1.
        assert_eq!(mini.cost_of(1, 0, 0, 0), 1);
        assert_eq!(mini.cost_of(0, 0, 0, 0), 0);
        // 10 000 input of which 4 000 cached: 6 000×0.15 + 4 000×0.075 = 900 + 300 µUSD.
        assert_eq!(mini.cost_of(10_000, 4_000, 0, 0), 1_200);
        // 3 cached tokens: 0.225 µUSD → 1; 7 uncached: 1.05 → 2 with the 0.225: 1.275 → 2.
        assert_eq!(mini.cost_of(10, 3, 0, 0), 2);

        let sonnet = table()
            .lookup("claude-sonnet-4-5-20250929")
            .copied()
            .unwrap();
        // Anthropic: 1 200 = 1 000 uncached + 100 cache reads + 100 cache writes, 300 output.
        // 1000×3 + 100×0.30 + 100×3.75 + 300×15 = 3000 + 30 + 375 + 4500 µUSD.
        assert_eq!(sonnet.cost_of(1_200, 100, 100, 300), 7_905);

        let opus = table().lookup("claude-opus-4-1-20250805").copied().unwrap();
        // 1M input + 1M output at 15/75 = 90 USD.
        assert_eq!(opus.cost_of(1_000_000, 0, 0, 1_000_000), 90_000_000);

        let haiku3 = table().lookup("claude-3-haiku-20240307").copied().unwrap();
        assert_eq!(haiku3.cache_write, usd("0.30"));
        // 1000 cache writes at 0.30/M = 300 µUSD.
        assert_eq!(haiku3.cost_of(1_000, 0, 1_000, 0), 300);
    }

    #[test]
    fn inconsistent_cache_counts_bill_the_cache_parts() {
        let p = Price {
            input: usd("1"),
            cached_input: usd("0.5"),
            cache_write: usd("2"),
            output: 0,
        };
        // cached + cache_write (30) > input (10): uncached 0, 10×0.5 + 20×2 = 45 µUSD.
        assert_eq!(p.cost_of(10, 10, 20, 0), 45);
        assert_eq!(p.cost_of(30, 10, 20, 0), 45);
    }

    #[test]
    fn costs_saturate_instead_of_wrapping() {
        let p = Price {
            input: u64::MAX,
            cached_input: u64::MAX,
            cache_write: u64::MAX,
            output: u64::MAX,
        };
        assert_eq!(p.cost_of(u64::MAX, 1, 1, u64::MAX), i64::MAX);
    }

    #[test]
    fn lookup_picks_the_right_entry() {
        let t = table();
        let key = |model: &str| t.lookup_entry(model).map(|(k, _)| k.to_owned());
        assert_eq!(key("gpt-4o").as_deref(), Some("gpt-4o"));
        assert_eq!(
            key("gpt-4o-2024-08-06").as_deref(),
            Some("gpt-4o-20??-??-??")
        );
        assert_eq!(
            key("gpt-4o-2024-05-13").as_deref(),
            Some("gpt-4o-2024-05-13")
        );
        assert_eq!(
            key("gpt-4o-mini-2024-07-18").as_deref(),
            Some("gpt-4o-mini-20??-??-??")
        );
        assert_eq!(
            key("gpt-4.1-nano-2025-04-14").as_deref(),
            Some("gpt-4.1-nano-20??-??-??")
        );
        assert_eq!(
            key("o3-mini-2025-01-31").as_deref(),
            Some("o3-mini-20??-??-??")
        );
        assert_eq!(
            key("claude-sonnet-4-5-20250929").as_deref(),
            Some("claude-sonnet-4-5*")
        );
        assert_eq!(
            key("claude-sonnet-4-5").as_deref(),
            Some("claude-sonnet-4-5*")
        );
        assert_eq!(
            key("claude-sonnet-4-20250514").as_deref(),
            Some("claude-sonnet-4*")
        );
        assert_eq!(
            key("claude-opus-4-5-20251101").as_deref(),
            Some("claude-opus-4-5*")
        );
        assert_eq!(
            key("claude-opus-4-20250514").as_deref(),
            Some("claude-opus-4*")
        );
        assert_eq!(
            key("claude-3-5-haiku-latest").as_deref(),
            Some("claude-3-5-haiku*")
        );
        assert_eq!(
            key("claude-3-haiku-20240307").as_deref(),
            Some("claude-3-haiku*")
        );
        // Not silently priced as a cheaper sibling.
        assert_eq!(key("o1-pro"), None);
        assert_eq!(key("gpt-4o-mini-tts"), None);
        assert_eq!(key("GPT-4O"), None);
        assert_eq!(key("llama-3"), None);

        let mini = t.lookup("gpt-4o-mini-2024-07-18").unwrap();
        assert_eq!((mini.input, mini.output), (usd("0.15"), usd("0.60")));
        let sonnet = t.lookup("claude-sonnet-4-5-20250929").unwrap();
        assert_eq!((sonnet.input, sonnet.cache_write), (usd("3"), usd("3.75")));
    }

    #[test]
    fn shipped_table_covers_the_listed_models() {
        let t = table();
        let expect = |model: &str, input: &str, cached: &str, output: &str| {
            let p = t.lookup(model).unwrap_or_else(|| panic!("{model} missing"));
            assert_eq!(
                (p.input, p.cached_input, p.output),
                (usd(input), usd(cached), usd(output)),
                "{model}"
            );
        };
        expect("gpt-4o", "2.50", "1.25", "10");
        expect("gpt-4o-mini", "0.15", "0.075", "0.60");
        expect("gpt-4.1", "2", "0.50", "8");
        expect("gpt-4.1-mini", "0.40", "0.10", "1.60");
        expect("gpt-4.1-nano", "0.10", "0.025", "0.40");
        expect("gpt-5", "1.25", "0.125", "10");
        expect("gpt-5-mini", "0.25", "0.025", "2");
        expect("gpt-5-nano", "0.05", "0.005", "0.40");
        expect("o1", "15", "7.5", "60");
        expect("o3", "2", "0.5", "8");
        expect("o3-mini", "1.10", "0.275", "4.40");
        expect("o4-mini", "1.10", "0.275", "4.40");
        expect("gpt-4-turbo", "10", "10", "30");
        expect("gpt-3.5-turbo", "0.50", "0.50", "1.50");
        expect("text-embedding-3-small", "0.02", "0.02", "0");
        expect("text-embedding-3-large", "0.13", "0.13", "0");
        expect("text-embedding-ada-002", "0.10", "0.10", "0");
        expect("claude-opus-4-5", "5", "0.50", "25");
        expect("claude-opus-4", "15", "1.50", "75");
        expect("claude-opus-4-1", "15", "1.50", "75");
        expect("claude-sonnet-4", "3", "0.30", "15");
        expect("claude-sonnet-4-5", "3", "0.30", "15");
        expect("claude-3-7-sonnet-20250219", "3", "0.30", "15");
        expect("claude-haiku-4-5-20251001", "1", "0.10", "5");
        expect("claude-3-5-haiku-20241022", "0.80", "0.08", "4");
        expect("claude-3-haiku-20240307", "0.25", "0.03", "1.25");
        let opus45 = t.lookup("claude-opus-4-5").unwrap();
        assert_eq!(opus45.cache_write, usd("6.25"));
    }

    #[test]
    fn config_overrides_replace_and_extend() {
        let overrides = parse_price_file(
            r#"
            [prices."gpt-4o-mini"]
            input = 0.20
            output = 0.80

            [prices."my-finetune-*"]
            input = 1
            output = 2

            [prices."claude-sonnet-4-5*"]
            input = 2
            output = 10
            "#,
        )
        .unwrap();
        let t = PriceTable::with_overrides(overrides).unwrap();
        let mini = t.lookup("gpt-4o-mini").unwrap();
        assert_eq!((mini.input, mini.cached_input), (usd("0.20"), usd("0.20")));
        // The dated pattern is a different key: it keeps the shipped price.
        assert_eq!(
            t.lookup("gpt-4o-mini-2024-07-18").unwrap().input,
            usd("0.15")
        );
        assert_eq!(t.lookup("my-finetune-42").unwrap().output, usd("2"));
        let sonnet = t.lookup("claude-sonnet-4-5-20250929").unwrap();
        assert_eq!(
            sonnet.cached_input,
            usd("2"),
            "the whole shipped entry is replaced"
        );
        assert_eq!(t.entries().count(), table().entries().count() + 1);
    }

    #[test]
    fn most_specific_glob_wins_regardless_of_order() {
        let p = |n: u64| Price::new(n, 0);
        let entries = vec![
            ("a*".to_owned(), p(1)),
            ("ab*".to_owned(), p(2)),
            ("ab?d".to_owned(), p(3)),
            ("ab*d".to_owned(), p(4)),
            ("*".to_owned(), p(5)),
        ];
        for rotation in 0..entries.len() {
            let mut rotated = entries.clone();
            rotated.rotate_left(rotation);
            let t = PriceTable::new(rotated).unwrap();
            let rate = |m: &str| t.lookup(m).map(|p| p.input);
            assert_eq!(rate("abcd"), Some(3), "same prefix, more literal chars");
            assert_eq!(rate("abxxd"), Some(4));
            assert_eq!(rate("abc"), Some(2));
            assert_eq!(rate("ax"), Some(1));
            assert_eq!(rate("zzz"), Some(5));
        }
    }

    #[test]
    fn serializes_resolved_rates_as_decimal_strings() {
        let p = Price::new(usd("0.15"), usd("0.6"));
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"cache_write":"0.1875","cached_input":"0.15","input":"0.15","output":"0.6"}"#
        );
        let back: Price = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }

    fn arb_price() -> impl Strategy<Value = Price> {
        let rate = 0u64..=1_000_000_000_000; // up to 1000 USD per 1M tokens
        (rate.clone(), rate.clone(), rate.clone(), rate).prop_map(|(i, c, w, o)| Price {
            input: i,
            cached_input: c,
            cache_write: w,
            output: o,
        })
    }

    fn arb_usage() -> impl Strategy<Value = TokenUsage> {
        let n = 0u64..=10_000_000_000;
        (n.clone(), n.clone(), n.clone(), n).prop_map(|(i, c, w, o)| TokenUsage {
            input_tokens: i,
            cached_input_tokens: c,
            cache_write_tokens: w,
            output_tokens: o,
        })
    }

    proptest! {
        #[test]
        fn cost_is_the_exact_rational_rounded_up(price in arb_price(), u in arb_usage()) {
            let cost = price.cost_micros(&u);
            prop_assert!(cost >= 0);
            let uncached = u.input_tokens.saturating_sub(u.cached_input_tokens + u.cache_write_tokens);
            let exact = u128::from(uncached) * u128::from(price.input)
                + u128::from(u.cached_input_tokens) * u128::from(price.cached_input)
                + u128::from(u.cache_write_tokens) * u128::from(price.cache_write)
                + u128::from(u.output_tokens) * u128::from(price.output);
            // cost is the smallest integer with cost × 10⁹ ≥ exact.
            let c = u128::try_from(cost).unwrap();
            prop_assert!(c * 1_000_000_000 >= exact);
            prop_assert!(c == 0 || (c - 1) * 1_000_000_000 < exact);
        }

        #[test]
        fn cost_is_monotone_in_every_count(
            price in arb_price(),
            u in arb_usage(),
            which in 0usize..4,
            extra in 0u64..=1_000_000,
        ) {
            let mut more = u;
            match which {
                0 => more.input_tokens += extra,
                1 => { more.cached_input_tokens += extra; more.input_tokens += extra; }
                2 => { more.cache_write_tokens += extra; more.input_tokens += extra; }
                _ => more.output_tokens += extra,
            }
            prop_assert!(price.cost_micros(&more) >= price.cost_micros(&u));
            // Raw counts too (a cache count can grow alone): never cheaper with more output or
            // more input, whatever the split.
            let mut out_only = u;
            out_only.output_tokens += extra;
            prop_assert!(price.cost_micros(&out_only) >= price.cost_micros(&u));
        }

        #[test]
        fn f64_literals_parse_to_their_decimal(whole in 0u32..10_000, frac in 0u32..1_000_000) {
            // Any literal with up to 6 decimals survives the f64 detour exactly.
            let text = format!("{whole}.{frac:06}");
            let doc = format!("[prices.\"m\"]\ninput = {text}\noutput = 0");
            let prices = parse_price_file(&doc).unwrap();
            prop_assert_eq!(prices["m"].input, parse_rate(&text).unwrap());
        }
    }
}
