//! One model's price entry (SPEC §4 "Token and cost semantics", §8 `[prices."MODEL"]`): every
//! rate, fee and multiplier a provider's invoice depends on, read exactly from TOML, resolved
//! with its defaults, and named by a version digest.
//!
//! This module owns:
//!
//! * [`Rates`] — per-token rates as exact integers: USD per 1M tokens scaled by 10⁹
//!   (`0.075` → `75_000_000`), read from TOML numbers or strings without float rounding;
//! * [`Ratio`] — an exact multiplier (`2.0`, `0.5`, `1.1`, `"5/3"`), kept as a reduced fraction;
//! * [`Price`] — a whole entry: rates, the per-call web search fee, the multipliers keyed by
//!   what the response reports (`tiers`, `speed`, `inference_geo`) and the long-context rates;
//! * [`read_entry`] — the one reader of a `[prices."MODEL"]` table, used for the shipped
//!   `prices.toml` and for config overrides alike, reporting every problem with its key path;
//! * [`Price::version`] — a digest of the resolved entry, recorded with every bill.
//!
//! The arithmetic that turns usage into micro-dollars is in [`super::cost`].

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use sha2::{Digest, Sha256};
use toml_edit::{Item, Value};

use crate::api::{MAX_LABEL_LEN, is_label};
use crate::money::{self, DecimalError};

/// Decimal places a rate, fee or decimal multiplier may have (its scale is `10^RATE_DECIMALS`).
pub const RATE_DECIMALS: u32 = 9;

/// Scale of a rate: `1 USD per 1M tokens` (or `1 USD per call`) is `RATE_SCALE`.
pub const RATE_SCALE: u64 = 1_000_000_000;

/// Default web search fee: 0.01 USD per call (both providers charge $10 per 1,000 searches).
pub const DEFAULT_WEB_SEARCH: u64 = RATE_SCALE / 100;

/// Largest multiplier accepted. Keeps the exact cost arithmetic within 256 bits (see
/// [`super::cost`]); real multipliers are between 0.5 and 6.
pub const MAX_MULTIPLIER: u64 = 1000;

/// Keys of a `[prices."MODEL"]` table.
pub const ENTRY_KEYS: &[&str] = &[
    "input",
    "cached_input",
    "cache_write",
    "cache_write_1h",
    "output",
    "audio_input",
    "audio_output",
    "web_search",
    "tiers",
    "speed",
    "inference_geo",
    "long_context",
];

/// Keys of an entry's `long_context` table.
pub const LONG_CONTEXT_KEYS: &[&str] = &[
    "above",
    "input",
    "cached_input",
    "cache_write",
    "cache_write_1h",
    "output",
    "audio_input",
    "audio_output",
];

/// Per-token rates, each USD per 1M tokens scaled by [`RATE_SCALE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Rates {
    /// Uncached text input.
    pub input: u64,
    /// Cache reads (OpenAI `cached_tokens`, Anthropic `cache_read_input_tokens`).
    pub cached_input: u64,
    /// Cache writes of the standard lifetime (Anthropic 5 minutes, OpenAI 30 minutes).
    pub cache_write: u64,
    /// Cache writes of the long lifetime (Anthropic 1 hour, OpenAI 12 hours).
    pub cache_write_1h: u64,
    /// Text output, reasoning included.
    pub output: u64,
    /// Audio input tokens.
    pub audio_input: u64,
    /// Audio output tokens.
    pub audio_output: u64,
}

impl Rates {
    /// Rates with the SPEC defaults derived from `input` and `output`: cache reads and audio
    /// at the text rates, `cache_write = 1.25 × input`, `cache_write_1h = 2 × input`.
    pub fn new(input: u64, output: u64) -> Rates {
        Rates {
            input,
            cached_input: input,
            cache_write: scale_up(input, 5, 4),
            cache_write_1h: scale_up(input, 2, 1),
            output,
            audio_input: input,
            audio_output: output,
        }
    }

    /// The rates as `(key, rate)` pairs, in [`LONG_CONTEXT_KEYS`] order.
    pub fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("input", self.input),
            ("cached_input", self.cached_input),
            ("cache_write", self.cache_write),
            ("cache_write_1h", self.cache_write_1h),
            ("output", self.output),
            ("audio_input", self.audio_input),
            ("audio_output", self.audio_output),
        ]
    }

    fn field_mut(&mut self, key: &str) -> Option<&mut u64> {
        Some(match key {
            "input" => &mut self.input,
            "cached_input" => &mut self.cached_input,
            "cache_write" => &mut self.cache_write,
            "cache_write_1h" => &mut self.cache_write_1h,
            "output" => &mut self.output,
            "audio_input" => &mut self.audio_input,
            "audio_output" => &mut self.audio_output,
            _ => return None,
        })
    }
}

/// `rate × num / den`, rounded up to a whole nano-unit and saturating at `u64::MAX`.
///
/// Rounding up errs toward the provider: a derived rate is never below the exact product.
/// The error is below 10⁻⁹ USD per 1M tokens, and zero for every price with at most 7
/// decimals (×1.25) or any price (×2).
fn scale_up(rate: u64, num: u64, den: u64) -> u64 {
    if den == 0 {
        return rate;
    }
    let scaled = (u128::from(rate) * u128::from(num)).div_ceil(u128::from(den));
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// An exact non-negative multiplier, a fraction in lowest terms with a denominator of at most
/// [`RATE_SCALE`] and a value of at most [`MAX_MULTIPLIER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ratio {
    num: u64,
    den: u64,
}

impl Ratio {
    /// The multiplier 1.
    pub const ONE: Ratio = Ratio { num: 1, den: 1 };

    /// `num / den` in lowest terms; `None` when `den` is 0 or above [`RATE_SCALE`], or the
    /// value is above [`MAX_MULTIPLIER`].
    pub fn new(num: u64, den: u64) -> Option<Ratio> {
        if den == 0 || den > RATE_SCALE || num / den > MAX_MULTIPLIER {
            return None;
        }
        if num / den == MAX_MULTIPLIER && !num.is_multiple_of(den) {
            return None;
        }
        let g = gcd(num, den);
        Some(Ratio {
            num: num / g,
            den: den / g,
        })
    }

    /// Reads a multiplier: a decimal with at most 9 places (`"1.1"`, `"2"`) or a fraction of
    /// integers (`"5/3"`).
    pub fn parse(text: &str) -> Result<Ratio, String> {
        let text = text.trim();
        let out_of_range = || {
            format!(
                "`{text}` is not a multiplier from 0 to {MAX_MULTIPLIER} (a decimal with at most \
                 {RATE_DECIMALS} places like 1.5, or a fraction like \"5/3\" with a denominator \
                 up to {RATE_SCALE})"
            )
        };
        if let Some((n, d)) = text.split_once('/') {
            let int = |s: &str| -> Result<u64, String> {
                let s = s.trim();
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(out_of_range());
                }
                s.parse::<u64>().map_err(|_| out_of_range())
            };
            return Ratio::new(int(n)?, int(d)?).ok_or_else(out_of_range);
        }
        let scaled = money::parse_decimal(text, RATE_DECIMALS).map_err(|_| out_of_range())?;
        Ratio::new(scaled.unsigned_abs(), RATE_SCALE).ok_or_else(out_of_range)
    }

    /// Numerator (in lowest terms).
    pub fn num(self) -> u64 {
        self.num
    }

    /// Denominator (in lowest terms, at least 1).
    pub fn den(self) -> u64 {
        self.den
    }
}

impl fmt::Display for Ratio {
    /// The shortest exact form: a decimal when the denominator divides 10⁹ (`2`, `0.5`,
    /// `1.1`), else the fraction (`5/3`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if RATE_SCALE.is_multiple_of(self.den) {
            f.write_str(&format_rate(self.num * (RATE_SCALE / self.den)))
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// Rates that replace an entry's own when a request's input exceeds `above` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LongContext {
    /// Input tokens (cached and cache-write ones included) above which the whole request is
    /// billed at `rates`.
    pub above: u64,
    /// Every rate of the request above the threshold.
    pub rates: Rates,
}

/// Multipliers by the name a response (or request) reports: tier, speed or region.
pub type Multipliers = BTreeMap<String, Ratio>;

/// One model's price entry, every default resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// Token rates below any long-context threshold.
    pub rates: Rates,
    /// Per-call web search fee, USD scaled by [`RATE_SCALE`] (not multiplied by tiers).
    pub web_search: u64,
    /// Multipliers by the service tier the response reports (OpenAI `service_tier`,
    /// Anthropic `usage.service_tier`).
    pub tiers: Multipliers,
    /// Multipliers by the speed the response reports (Anthropic `usage.speed`).
    pub speed: Multipliers,
    /// Multipliers by where inference ran (Anthropic `usage.inference_geo`).
    pub inference_geo: Multipliers,
    /// Whole-request repricing above an input threshold.
    pub long_context: Option<LongContext>,
}

impl Price {
    /// An entry with every SPEC default: see [`Rates::new`]; web search at 0.01 USD per
    /// call; no multipliers, no long-context rates.
    pub fn new(input: u64, output: u64) -> Price {
        Price {
            rates: Rates::new(input, output),
            web_search: DEFAULT_WEB_SEARCH,
            tiers: Multipliers::new(),
            speed: Multipliers::new(),
            inference_geo: Multipliers::new(),
            long_context: None,
        }
    }

    /// The rates that apply to a request with `input_tokens` of input: the long-context ones
    /// above the threshold (strictly greater), else the entry's own.
    pub fn rates_for(&self, input_tokens: u64) -> &Rates {
        match &self.long_context {
            Some(lc) if input_tokens > lc.above => &lc.rates,
            _ => &self.rates,
        }
    }

    /// The entry's canonical text: every resolved value, one `key=value` line each, in a
    /// fixed order. The version digest is taken over it, so any change of a value changes
    /// the version and nothing else does (file order, comments, how a number was written).
    pub fn canonical(&self) -> String {
        let mut out = String::from("tollgate-price/1\n");
        let mut line = |key: &str, value: &str| {
            out.push_str(key);
            out.push('=');
            out.push_str(value);
            out.push('\n');
        };
        for (key, rate) in self.rates.fields() {
            line(key, &format_rate(rate));
        }
        line("web_search", &format_rate(self.web_search));
        for (group, map) in [
            ("tiers", &self.tiers),
            ("speed", &self.speed),
            ("inference_geo", &self.inference_geo),
        ] {
            for (name, ratio) in map {
                line(
                    &format!("{group}.{name}"),
                    &format!("{}/{}", ratio.num, ratio.den),
                );
            }
        }
        if let Some(lc) = &self.long_context {
            line("long_context.above", &lc.above.to_string());
            for (key, rate) in lc.rates.fields() {
                line(&format!("long_context.{key}"), &format_rate(rate));
            }
        }
        out
    }

    /// A stable digest of the resolved entry: the first 16 hex digits of the SHA-256 of
    /// [`Price::canonical`]. Equal entries have equal versions on every machine and across
    /// restarts; a changed price gets a new one.
    pub fn version(&self) -> String {
        let digest = Sha256::digest(self.canonical().as_bytes());
        hex::encode(&digest[..8])
    }
}

impl Serialize for Price {
    /// The resolved entry: rates and fees as exact decimal strings (`"0.075"`), multipliers
    /// in their shortest exact form, `long_context` when set.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let ratios = |m: &Multipliers| -> BTreeMap<String, String> {
            m.iter().map(|(k, r)| (k.clone(), r.to_string())).collect()
        };
        let mut map = serializer.serialize_map(None)?;
        for (key, rate) in self.rates.fields() {
            map.serialize_entry(key, &format_rate(rate))?;
        }
        map.serialize_entry("web_search", &format_rate(self.web_search))?;
        map.serialize_entry("tiers", &ratios(&self.tiers))?;
        map.serialize_entry("speed", &ratios(&self.speed))?;
        map.serialize_entry("inference_geo", &ratios(&self.inference_geo))?;
        if let Some(lc) = &self.long_context {
            let mut long: BTreeMap<&str, String> = lc
                .rates
                .fields()
                .into_iter()
                .map(|(k, r)| (k, format_rate(r)))
                .collect();
            long.insert("above", lc.above.to_string());
            map.serialize_entry("long_context", &long)?;
        }
        map.end()
    }
}

/// Reads a rate (USD per 1M tokens, or per call) from decimal text, exactly:
/// `"0.075"` → `75_000_000`.
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

/// A problem in one price entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryIssue {
    /// Key path inside the entry (`output`, `tiers.priority`, `long_context.above`); empty
    /// for the entry itself.
    pub key: String,
    /// Byte range of the offending key or value in the source text, when known.
    pub span: Option<Range<usize>>,
    pub message: String,
}

/// Reads one `[prices."MODEL"]` table (a standard or inline table) into a resolved [`Price`],
/// or reports every problem in it: unknown keys, values that are not exact non-negative
/// decimals, bad multipliers, an incomplete or cheaper `long_context`.
///
/// At least one of `input` and `output` is required; the other defaults to 0. Defaults of the
/// rest: see [`Rates::new`] and [`Price::new`]; missing long-context rates scale with the
/// entry's own (input-side ones by `long_context.input / input`, output-side ones by
/// `long_context.output / output`), rounded up to a nano-unit.
pub fn read_entry(item: &Item) -> Result<Price, Vec<EntryIssue>> {
    let mut r = EntryReader { issues: Vec::new() };
    let price = r.entry(item);
    match price {
        Some(p) if r.issues.is_empty() => Ok(p),
        _ => Err(r.issues),
    }
}

struct EntryReader {
    issues: Vec<EntryIssue>,
}

/// How a number-like TOML value reads as exact decimal text.
fn decimal_text(item: &Item) -> Option<String> {
    match item.as_value()? {
        // f64 Display is the shortest text that reads back to the same float, i.e. what the
        // operator wrote for any value with at most 15 significant digits, never an exponent.
        Value::Float(f) if f.value().is_finite() => Some(format!("{}", f.value())),
        Value::Integer(i) => Some(i.value().to_string()),
        Value::String(s) => Some(s.value().trim().to_owned()),
        _ => None,
    }
}

impl EntryReader {
    fn issue(&mut self, key: &str, span: Option<Range<usize>>, message: impl Into<String>) {
        self.issues.push(EntryIssue {
            key: key.to_owned(),
            span,
            message: message.into(),
        });
    }

    fn unknown_keys(&mut self, table: &dyn toml_edit::TableLike, prefix: &str, known: &[&str]) {
        for (key, item) in table.iter() {
            if !known.contains(&key) {
                let span = table.key(key).and_then(|k| k.span()).or(item.span());
                self.issue(
                    &join(prefix, key),
                    span,
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
        }
    }

    /// A rate or fee: exact decimal, at most 9 places, not negative.
    fn rate(&mut self, item: &Item, path: &str, unit: &str) -> Option<u64> {
        let Some(text) = decimal_text(item) else {
            self.issue(
                path,
                item.span(),
                format!("expected a non-negative number ({unit})"),
            );
            return None;
        };
        match parse_rate(&text) {
            Ok(v) => Some(v),
            Err(e) => {
                self.issue(path, item.span(), e.to_string());
                None
            }
        }
    }

    fn multipliers(&mut self, item: &Item, path: &str) -> Multipliers {
        let mut out = Multipliers::new();
        let Some(table) = item.as_table_like() else {
            self.issue(
                path,
                item.span(),
                "expected a table of multipliers, e.g. { priority = 2.0, flex = 0.5 }",
            );
            return out;
        };
        for (name, value) in table.iter() {
            let key_path = format!("{path}.{name}");
            let span = value.span();
            if !is_label(name) {
                self.issue(
                    &key_path,
                    span.clone(),
                    format!(
                        "a name must be 1 to {MAX_LABEL_LEN} printable ASCII characters without spaces"
                    ),
                );
                continue;
            }
            let Some(text) = decimal_text(value) else {
                self.issue(
                    &key_path,
                    span,
                    "expected a multiplier: a number like 2.0 or a fraction like \"5/3\"",
                );
                continue;
            };
            match Ratio::parse(&text) {
                Ok(ratio) => {
                    out.insert(name.to_owned(), ratio);
                }
                Err(e) => self.issue(&key_path, span, e),
            }
        }
        out
    }

    fn entry(&mut self, item: &Item) -> Option<Price> {
        let Some(table) = item.as_table_like() else {
            self.issue("", item.span(), "expected a table of prices");
            return None;
        };
        self.unknown_keys(table, "", ENTRY_KEYS);
        let mut written: BTreeMap<&'static str, u64> = BTreeMap::new();
        for key in [
            "input",
            "cached_input",
            "cache_write",
            "cache_write_1h",
            "output",
            "audio_input",
            "audio_output",
        ] {
            if let Some(v) = table.get(key)
                && let Some(rate) = self.rate(v, key, "USD per 1M tokens")
            {
                written.insert(key, rate);
            }
        }
        if table.get("input").is_none() && table.get("output").is_none() {
            self.issue("", item.span(), "needs at least `input` or `output`");
        }
        let input = written.get("input").copied().unwrap_or(0);
        let output = written.get("output").copied().unwrap_or(0);
        let mut price = Price::new(input, output);
        for (key, rate) in &written {
            if let Some(slot) = price.rates.field_mut(key) {
                *slot = *rate;
            }
        }
        if let Some(v) = table.get("web_search")
            && let Some(fee) = self.rate(v, "web_search", "USD per call")
        {
            price.web_search = fee;
        }
        for (key, slot) in [
            ("tiers", &mut price.tiers),
            ("speed", &mut price.speed),
            ("inference_geo", &mut price.inference_geo),
        ] {
            if let Some(v) = table.get(key) {
                *slot = self.multipliers(v, key);
            }
        }
        if let Some(v) = table.get("long_context") {
            price.long_context = self.long_context(v, &price.rates);
        }
        Some(price)
    }

    fn long_context(&mut self, item: &Item, base: &Rates) -> Option<LongContext> {
        let path = "long_context";
        let Some(table) = item.as_table_like() else {
            self.issue(
                path,
                item.span(),
                "expected a table like { above = 272000, input = 4.0, output = 15.0 }",
            );
            return None;
        };
        self.unknown_keys(table, path, LONG_CONTEXT_KEYS);
        let above = match table.get("above") {
            None => {
                self.issue(path, item.span(), "needs `above` (input tokens)");
                None
            }
            Some(v) => match v.as_integer() {
                Some(n) if n >= 1 => Some(n.unsigned_abs()),
                _ => {
                    self.issue(
                        "long_context.above",
                        v.span(),
                        "expected a whole number of input tokens, at least 1",
                    );
                    None
                }
            },
        };
        let mut written: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (key, _) in base.fields() {
            if let Some(v) = table.get(key)
                && let Some(rate) = self.rate(v, &join(path, key), "USD per 1M tokens")
            {
                written.insert(key, rate);
            }
        }
        for key in ["input", "output"] {
            if table.get(key).is_none() {
                self.issue(path, item.span(), format!("needs `{key}`"));
            }
        }
        let (Some(input), Some(output)) = (written.get("input"), written.get("output")) else {
            return None;
        };
        // Unwritten rates scale like their side's written one.
        let (input, output) = (*input, *output);
        let side =
            |base_rate: u64, key: &str, long_side: u64, base_side: u64| match written.get(key) {
                Some(rate) => *rate,
                None if base_side == 0 => base_rate,
                None => scale_up(base_rate, long_side, base_side),
            };
        let rates = Rates {
            input,
            cached_input: side(base.cached_input, "cached_input", input, base.input),
            cache_write: side(base.cache_write, "cache_write", input, base.input),
            cache_write_1h: side(base.cache_write_1h, "cache_write_1h", input, base.input),
            output,
            audio_input: side(base.audio_input, "audio_input", input, base.input),
            audio_output: side(base.audio_output, "audio_output", output, base.output),
        };
        // A long context is a surcharge: rates below the standard ones would make more
        // input cost less, and the hold (priced at the estimate's band) no worst case. Only
        // written rates are checked: the others scale from them.
        for ((key, long), (_, standard)) in rates.fields().into_iter().zip(base.fields()) {
            if long < standard && written.contains_key(key) {
                let span = table.get(key).and_then(Item::span).or(item.span());
                self.issue(
                    &join(path, key),
                    span,
                    format!(
                        "{} is below the standard `{key}` ({}); long-context rates must not be lower",
                        format_rate(long),
                        format_rate(standard)
                    ),
                );
            }
        }
        above.map(|above| LongContext { above, rates })
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usd(text: &str) -> u64 {
        parse_rate(text).unwrap()
    }

    /// Reads `[prices."m"]` with `body`.
    fn entry(body: &str) -> Result<Price, Vec<EntryIssue>> {
        let text = format!("[prices.\"m\"]\n{body}\n");
        let doc = toml_edit::Document::parse(text.as_str()).unwrap();
        let item = doc.as_table()["prices"]["m"].clone();
        read_entry(&item)
    }

    /// The messages of the issues `body` gets, as `key: message`.
    fn problems(body: &str) -> Vec<String> {
        entry(body)
            .unwrap_err()
            .into_iter()
            .map(|i| format!("{}: {}", i.key, i.message))
            .collect()
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
    fn defaults_follow_the_spec() {
        let p = entry("input = 0.15\noutput = 0.60").unwrap();
        assert_eq!(p, Price::new(usd("0.15"), usd("0.6")));
        let r = p.rates;
        assert_eq!(r.cached_input, usd("0.15"));
        assert_eq!(r.cache_write, usd("0.1875"));
        assert_eq!(r.cache_write_1h, usd("0.30"));
        assert_eq!((r.audio_input, r.audio_output), (usd("0.15"), usd("0.6")));
        assert_eq!(p.web_search, usd("0.01"));
        assert!(p.tiers.is_empty() && p.speed.is_empty() && p.inference_geo.is_empty());
        assert_eq!(p.long_context, None);
        // 1 nano-unit × 1.25 rounds up to 2; × 2 is exact.
        assert_eq!(Rates::new(1, 0).cache_write, 2);
        assert_eq!(Rates::new(1, 0).cache_write_1h, 2);
        // Only output: input 0 (an entry needs at least one of them).
        assert_eq!(entry("output = 1").unwrap().rates.input, 0);
    }

    #[test]
    fn reads_every_key() {
        let p = entry(
            r#"input = 2
cached_input = "0.10"
cache_write = 2.5
cache_write_1h = 5
output = 10
audio_input = 32
audio_output = 64
web_search = 0.025
tiers = { priority = 2.0, flex = 0.5, gentle = "5/3" }
speed = { fast = 2 }
inference_geo = { us = "1.1" }
long_context = { above = 272000, input = 4, cached_input = 0.2, output = 15 }"#,
        )
        .unwrap();
        assert_eq!(
            p.rates,
            Rates {
                input: usd("2"),
                cached_input: usd("0.1"),
                cache_write: usd("2.5"),
                cache_write_1h: usd("5"),
                output: usd("10"),
                audio_input: usd("32"),
                audio_output: usd("64"),
            }
        );
        assert_eq!(p.web_search, usd("0.025"));
        assert_eq!(p.tiers["priority"], Ratio::new(2, 1).unwrap());
        assert_eq!(p.tiers["flex"], Ratio::new(1, 2).unwrap());
        assert_eq!(p.tiers["gentle"], Ratio::new(5, 3).unwrap());
        assert_eq!(p.speed["fast"], Ratio::new(2, 1).unwrap());
        assert_eq!(p.inference_geo["us"], Ratio::new(11, 10).unwrap());
        let lc = p.long_context.unwrap();
        assert_eq!(lc.above, 272_000);
        // Written long rates as written; the rest scale like their side: input-side ×2
        // (4 / 2), output-side ×1.5 (15 / 10).
        assert_eq!(
            lc.rates,
            Rates {
                input: usd("4"),
                cached_input: usd("0.2"),
                cache_write: usd("5"),
                cache_write_1h: usd("10"),
                output: usd("15"),
                audio_input: usd("64"),
                audio_output: usd("96"),
            }
        );
    }

    #[test]
    fn sub_tables_read_like_inline_tables() {
        let text = "[prices.\"m\"]\ninput = 1\noutput = 2\n[prices.\"m\".tiers]\npriority = 2\n\
                    [prices.\"m\".long_context]\nabove = 10\ninput = 2\noutput = 4\n";
        let doc = toml_edit::Document::parse(text).unwrap();
        let p = read_entry(&doc.as_table()["prices"]["m"]).unwrap();
        assert_eq!(p.tiers["priority"], Ratio::new(2, 1).unwrap());
        assert_eq!(p.long_context.unwrap().above, 10);
    }

    #[test]
    fn rejects_bad_values_with_their_key_paths() {
        let has = |body: &str, want: &[&str]| {
            let got = problems(body);
            for w in want {
                assert!(got.iter().any(|g| g.contains(w)), "{w:?} not in {got:?}");
            }
            got
        };
        has("input = -0.5\noutput = 1", &["input: ", "negative"]);
        has(
            "input = nan\noutput = 1",
            &["input: expected a non-negative number"],
        );
        has("input = 1e-10\noutput = 1", &["more than 9 decimal places"]);
        has("input = 1e300\noutput = 1", &["too large"]);
        has("input = true\noutput = 1", &["USD per 1M tokens"]);
        has("web_search = \"x\"\noutput = 1", &["web_search: "]);
        has("cached = 1\noutput = 1", &["cached: unknown key"]);
        has(
            "cached_input = 1",
            &[": needs at least `input` or `output`"],
        );
        has(
            "output = 1\ntiers = { priority = -2 }",
            &["tiers.priority: "],
        );
        has(
            "output = 1\ntiers = 2",
            &["tiers: expected a table of multipliers"],
        );
        has(
            "output = 1\nspeed = { fast = 1001 }",
            &["speed.fast: `1001` is not a multiplier"],
        );
        has(
            "output = 1\ninference_geo = { \"u s\" = 1.1 }",
            &["inference_geo.u s: a name must be"],
        );
        has(
            "output = 1\ntiers = { flex = \"1/0\" }",
            &["tiers.flex: `1/0` is not a multiplier"],
        );
        has(
            "output = 1\nlong_context = { input = 2, output = 2 }",
            &["long_context: needs `above`"],
        );
        has(
            "output = 1\nlong_context = { above = 0, input = 2, output = 2 }",
            &["long_context.above: expected a whole number"],
        );
        has(
            "output = 1\nlong_context = { above = 5, input = 2 }",
            &["long_context: needs `output`"],
        );
        has(
            "output = 1\nlong_context = { above = 5, input = 2, output = 2, bogus = 1 }",
            &["long_context.bogus: unknown key"],
        );
        // A long context cheaper than the standard rates is refused.
        has(
            "input = 2\noutput = 10\nlong_context = { above = 5, input = 1, output = 10 }",
            &["long_context.input: 1 is below the standard `input` (2)"],
        );
        // Every problem at once.
        let all = problems("input = -1\nbogus = 2\ntiers = { x = \"y\" }");
        assert_eq!(all.len(), 3, "{all:?}");
    }

    #[test]
    fn issues_carry_the_span_of_the_offending_value() {
        let text = "[prices.\"m\"]\ninput = 1\noutput = \"x\"\n";
        let doc = toml_edit::Document::parse(text).unwrap();
        let issues = read_entry(&doc.as_table()["prices"]["m"]).unwrap_err();
        let span = issues[0].span.clone().unwrap();
        assert_eq!(&text[span], "\"x\"");
    }

    #[test]
    fn multipliers_are_exact_fractions() {
        let r = |t: &str| Ratio::parse(t).map(|r| (r.num(), r.den()));
        assert_eq!(r("2"), Ok((2, 1)));
        assert_eq!(r("0.5"), Ok((1, 2)));
        assert_eq!(r("1.1"), Ok((11, 10)));
        assert_eq!(r("5/3"), Ok((5, 3)));
        assert_eq!(r("10/6"), Ok((5, 3)));
        assert_eq!(r("1.666666667"), Ok((1_666_666_667, 1_000_000_000)));
        assert_eq!(r("0"), Ok((0, 1)));
        assert_eq!(r("1000"), Ok((1000, 1)));
        for bad in [
            "-1",
            "1/0",
            "1000.5",
            "1001",
            "1e3",
            "abc",
            "1/2000000000",
            "/3",
            "2/",
        ] {
            assert!(Ratio::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Ratio::parse("5/3").unwrap().to_string(), "5/3");
        assert_eq!(Ratio::parse("0.50").unwrap().to_string(), "0.5");
        assert_eq!(Ratio::parse("2.0").unwrap().to_string(), "2");
    }

    #[test]
    fn version_is_a_stable_digest_of_the_resolved_entry() {
        let base = entry("input = 0.15\noutput = 0.6\ntiers = { priority = 2 }").unwrap();
        // The same prices written differently (defaults spelled out, other number forms,
        // other order) are the same entry and the same version.
        let spelled = entry(
            r#"tiers = { priority = "2/1" }
output = "0.60"
cache_write = 0.1875
cache_write_1h = 0.3
cached_input = 0.15
audio_input = 0.15
audio_output = 0.6
web_search = 0.01
input = 0.150"#,
        )
        .unwrap();
        assert_eq!(spelled, base);
        assert_eq!(spelled.version(), base.version());
        // The digest depends on nothing but the entry: the first 16 hex digits of the SHA-256
        // of its canonical text, the same on every machine and run (checked with
        // `printf '…' | sha256sum`); it changes only if a value or the canonical form does.
        assert_eq!(
            base.canonical(),
            "tollgate-price/1\ninput=0.15\ncached_input=0.15\ncache_write=0.1875\n\
             cache_write_1h=0.3\noutput=0.6\naudio_input=0.15\naudio_output=0.6\n\
             web_search=0.01\ntiers.priority=2/1\n"
        );
        assert_eq!(base.version(), "f06531297b88488e");
        assert_eq!(base.version().len(), 16);
        // Any change of any value gives another version.
        let changes = [
            "input = 0.16\noutput = 0.6\ntiers = { priority = 2 }",
            "input = 0.15\noutput = 0.6\ntiers = { priority = 2.5 }",
            "input = 0.15\noutput = 0.6\ntiers = { priority = 2, flex = 0.5 }",
            "input = 0.15\noutput = 0.6\ntiers = { priority = 2 }\nweb_search = 0.02",
            "input = 0.15\noutput = 0.6\ntiers = { priority = 2 }\ncache_write_1h = 0.31",
            "input = 0.15\noutput = 0.6\ntiers = { priority = 2 }\nspeed = { priority = 2 }",
            "input = 0.15\noutput = 0.6\ntiers = { priority = 2 }\nlong_context = { above = 9, input = 1, output = 1 }",
        ];
        let mut seen = std::collections::HashSet::from([base.version()]);
        for c in changes {
            assert!(seen.insert(entry(c).unwrap().version()), "{c}");
        }
    }

    #[test]
    fn serializes_resolved_values_as_decimal_strings() {
        let p = entry("input = 0.15\noutput = 0.6\ntiers = { priority = \"5/3\" }").unwrap();
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["input"], "0.15");
        assert_eq!(json["cache_write"], "0.1875");
        assert_eq!(json["cache_write_1h"], "0.3");
        assert_eq!(json["web_search"], "0.01");
        assert_eq!(json["tiers"]["priority"], "5/3");
        assert!(json.get("long_context").is_none());
    }

    proptest! {
        #[test]
        fn f64_literals_parse_to_their_decimal(whole in 0u32..10_000, frac in 0u32..1_000_000) {
            // Any literal with up to 6 decimals survives the f64 detour exactly.
            let text = format!("{whole}.{frac:06}");
            let p = entry(&format!("input = {text}\noutput = 0")).unwrap();
            prop_assert_eq!(p.rates.input, parse_rate(&text).unwrap());
        }

        #[test]
        fn decimal_multipliers_read_exactly(n in 0u64..=1_000_000_000_000) {
            let text = format_rate(n);
            let r = Ratio::parse(&text).unwrap();
            // num/den equals n / 10⁹ exactly.
            prop_assert_eq!(u128::from(r.num()) * 1_000_000_000, u128::from(n) * u128::from(r.den()));
            prop_assert_eq!(Ratio::parse(&r.to_string()).unwrap(), r);
        }
    }
}
