//! The price table: the shipped `prices.toml` with config's `[prices."MODEL"]` entries on top,
//! looked up by model id.
//!
//! # Lookup rule
//!
//! An exact key equal to the model id wins. Otherwise, among glob keys (`*` = any run of
//! characters, `?` = one character, case-sensitive) that match the whole id, the most specific
//! wins: the longest literal prefix before the first wildcard, then the most literal
//! characters, then the fewest `*`, then the smaller key in byte order (so the result never
//! depends on file order). No match → `None`; the caller applies `[quota].unknown_model`.
//!
//! The shipped table has no family globs: a glob there covers only the dated snapshots of one
//! model (`gpt-5.4-mini-20??-??-??`), so a newer minor version is never priced at an older
//! one's rates (SPEC §4) — it is unknown until it gets an entry.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use chrono::NaiveDate;
use serde::Serialize;
use thiserror::Error;
use toml_edit::{Document, Item, Value};
use wildmatch::WildMatch;

use super::price::{Price, read_entry};

/// The price table shipped with tollgate (`prices.toml` at the repository root).
pub const SHIPPED_PRICES: &str = include_str!("../../prices.toml");

/// `check-config` warns when the shipped table's `as_of` date is older than this.
pub const STALE_AFTER_DAYS: i64 = 90;

/// Why a price table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PriceError {
    /// An empty model key.
    #[error("a price key must be a model id or glob pattern, not empty")]
    EmptyPattern,
    /// A price file with errors, one line per problem (`LINE: KEY PATH: reason`).
    #[error("{0}")]
    File(String),
}

/// Where an entry of the active table comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The shipped `prices.toml`.
    Shipped,
    /// The config's `[prices]`, replacing or adding to the shipped table.
    Config,
}

/// One entry of the active table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The model id or glob pattern it is keyed by.
    pub pattern: String,
    pub price: Price,
    /// [`Price::version`], computed once.
    pub version: String,
    pub source: Source,
}

impl Entry {
    /// The entry as `tollgate prices --json` lists it: the resolved price (see
    /// [`Price`]'s serialization) with `model`, `version` and `source`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.price).unwrap_or_default();
        v["model"] = self.pattern.clone().into();
        v["version"] = self.version.clone().into();
        v["source"] = serde_json::to_value(self.source).unwrap_or_default();
        v
    }

    /// One line for `tollgate prices`: the rates, then what differs from the defaults'
    /// shape (audio rates, multipliers, long context), the version and the source.
    pub fn summary(&self) -> String {
        use super::price::format_rate as f;
        let p = &self.price;
        let r = &p.rates;
        let mut out = format!(
            "{}  in={} cached={} write={} write_1h={} out={}",
            self.pattern,
            f(r.input),
            f(r.cached_input),
            f(r.cache_write),
            f(r.cache_write_1h),
            f(r.output)
        );
        if (r.audio_input, r.audio_output) != (r.input, r.output) {
            out += &format!(
                " audio_in={} audio_out={}",
                f(r.audio_input),
                f(r.audio_output)
            );
        }
        out += &format!(" web_search={}", f(p.web_search));
        for (name, map) in [
            ("tiers", &p.tiers),
            ("speed", &p.speed),
            ("inference_geo", &p.inference_geo),
        ] {
            if !map.is_empty() {
                let list: Vec<String> = map.iter().map(|(k, v)| format!("{k}×{v}")).collect();
                out += &format!(" {name}={}", list.join(","));
            }
        }
        if let Some(lc) = &p.long_context {
            out += &format!(
                " long_context(>{})=in {} out {}",
                lc.above,
                f(lc.rates.input),
                f(lc.rates.output)
            );
        }
        let source = match self.source {
            Source::Shipped => "shipped",
            Source::Config => "config",
        };
        out += &format!("  version={}  {source}", self.version);
        out
    }
}

/// A price file as read: its `as_of` date and entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceFile {
    /// When the prices were last checked against the providers' pages.
    pub as_of: Option<NaiveDate>,
    pub prices: BTreeMap<String, Price>,
}

/// Reads a TOML document of the shipped file's format: an optional top-level
/// `as_of = "YYYY-MM-DD"` and `[prices."MODEL"]` tables (see [`read_entry`]). Every problem is
/// reported, each with its line and key path.
pub fn parse_price_file(text: &str) -> Result<PriceFile, PriceError> {
    let doc = Document::parse(text).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(text, s.start));
        PriceError::File(format!("{line}: {}", e.message().trim()))
    })?;
    let root = doc.as_table();
    let mut problems = Vec::new();
    let mut problem = |span: Option<std::ops::Range<usize>>, path: &str, message: &str| {
        let line = span.map_or(0, |s| line_of(text, s.start));
        problems.push(format!("{line}: {path}: {message}"));
    };
    let mut as_of = None;
    for (key, item) in root.iter() {
        match key {
            "prices" => {}
            "as_of" => match item.as_value().and_then(date_of) {
                Some(d) => as_of = Some(d),
                None => problem(item.span(), "as_of", "expected a date like \"2026-12-05\""),
            },
            other => problem(
                item.span(),
                other,
                "unknown key (expected one of: as_of, prices)",
            ),
        }
    }
    let mut prices = BTreeMap::new();
    match root.get("prices") {
        None => {}
        Some(Item::Table(t)) => {
            for (model, item) in t.iter() {
                let path = format!("prices.\"{model}\"");
                if model.is_empty() {
                    problem(
                        item.span(),
                        &path,
                        "a model id or pattern must not be empty",
                    );
                    continue;
                }
                match read_entry(item) {
                    Ok(price) => {
                        prices.insert(model.to_owned(), price);
                    }
                    Err(issues) => {
                        for i in issues {
                            let full = if i.key.is_empty() {
                                path.clone()
                            } else {
                                format!("{path}.{}", i.key)
                            };
                            problem(i.span.or(item.span()), &full, &i.message);
                        }
                    }
                }
            }
        }
        Some(other) => problem(other.span(), "prices", "expected a table"),
    }
    if problems.is_empty() {
        Ok(PriceFile { as_of, prices })
    } else {
        Err(PriceError::File(problems.join("\n")))
    }
}

fn date_of(v: &Value) -> Option<NaiveDate> {
    let text = match v {
        Value::String(s) => s.value().clone(),
        Value::Datetime(d) => d.value().to_string(),
        _ => return None,
    };
    NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").ok()
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset.min(text.len()))
        .filter(|b| **b == b'\n')
        .count()
        + 1
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

/// Prices by model id or glob pattern, ready for lookup.
pub struct PriceTable {
    exact: HashMap<String, Entry>,
    /// Glob entries, most specific first: the first match wins.
    globs: Vec<(WildMatch, Entry)>,
    /// The shipped table's `as_of` date.
    as_of: Option<NaiveDate>,
}

impl fmt::Debug for PriceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries().map(|e| (&e.pattern, &e.version)))
            .finish()
    }
}

impl PriceTable {
    /// A table from `(pattern, price, source)` entries; a later entry replaces an earlier one
    /// with the same pattern.
    pub fn new(
        entries: impl IntoIterator<Item = (String, Price, Source)>,
        as_of: Option<NaiveDate>,
    ) -> Result<Self, PriceError> {
        let mut all: BTreeMap<String, (Price, Source)> = BTreeMap::new();
        for (pattern, price, source) in entries {
            if pattern.is_empty() {
                return Err(PriceError::EmptyPattern);
            }
            all.insert(pattern, (price, source));
        }
        let mut exact = HashMap::new();
        let mut globs = Vec::new();
        for (pattern, (price, source)) in all {
            let entry = Entry {
                version: price.version(),
                pattern,
                price,
                source,
            };
            if is_glob(&entry.pattern) {
                globs.push((WildMatch::new(&entry.pattern), entry));
            } else {
                exact.insert(entry.pattern.clone(), entry);
            }
        }
        globs.sort_by(|(_, a), (_, b)| {
            specificity(&b.pattern)
                .cmp(&specificity(&a.pattern))
                .then_with(|| a.pattern.cmp(&b.pattern))
        });
        Ok(PriceTable {
            exact,
            globs,
            as_of,
        })
    }

    /// The shipped table alone.
    pub fn shipped() -> Result<Self, PriceError> {
        Self::with_overrides(std::iter::empty())
    }

    /// The shipped table with config's `[prices."MODEL"]` entries on top: a config entry
    /// replaces the shipped entry of the same pattern, and new patterns are added.
    pub fn with_overrides(
        overrides: impl IntoIterator<Item = (String, Price)>,
    ) -> Result<Self, PriceError> {
        let shipped = parse_price_file(SHIPPED_PRICES)
            .map_err(|e| PriceError::File(format!("shipped prices.toml: {e}")))?;
        let entries = shipped
            .prices
            .into_iter()
            .map(|(k, p)| (k, p, Source::Shipped))
            .chain(overrides.into_iter().map(|(k, p)| (k, p, Source::Config)));
        Self::new(entries, shipped.as_of)
    }

    /// The entry pricing `model`, per the lookup rule in the module docs; `None` if nothing
    /// matches.
    pub fn lookup(&self, model: &str) -> Option<&Entry> {
        if let Some(entry) = self.exact.get(model) {
            return Some(entry);
        }
        self.globs
            .iter()
            .find(|(matcher, _)| matcher.matches(model))
            .map(|(_, entry)| entry)
    }

    /// Every entry, sorted by pattern.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        let mut all: Vec<&Entry> = self
            .exact
            .values()
            .chain(self.globs.iter().map(|(_, e)| e))
            .collect();
        all.sort_by(|a, b| a.pattern.cmp(&b.pattern));
        all.into_iter()
    }

    /// The shipped table's `as_of` date.
    pub fn as_of(&self) -> Option<NaiveDate> {
        self.as_of
    }
}

/// The warning `check-config` prints when the shipped prices were last checked more than
/// [`STALE_AFTER_DAYS`] before `today`.
pub fn staleness_warning(as_of: NaiveDate, today: NaiveDate) -> Option<String> {
    let age = (today - as_of).num_days();
    (age > STALE_AFTER_DAYS).then(|| {
        format!(
            "the shipped price table is dated {as_of} ({age} days ago, more than \
             {STALE_AFTER_DAYS}): providers change prices and add models; compare it with their \
             price pages and override any entry under [prices] (see `tollgate prices`)"
        )
    })
}

/// The answer to a request for a model without a price: names the model and gives the config
/// lines to add, ready to paste.
pub fn unknown_model_message(model: &str) -> String {
    format!(
        "model `{model}` has no price in tollgate's price table; the operator can add it to the \
         config (USD per 1M tokens, from the provider's price page) and restart, or set \
         [quota] unknown_model = \"free\":\n\n\
         [prices.\"{key}\"]\n\
         input = 0.0   # USD per 1M input tokens\n\
         output = 0.0  # USD per 1M output tokens\n",
        key = toml_key(model),
    )
}

/// `model` escaped for a TOML basic-string key.
fn toml_key(model: &str) -> String {
    let mut out = String::with_capacity(model.len());
    for c in model.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::price::{Rates, parse_rate};

    fn usd(text: &str) -> u64 {
        parse_rate(text).unwrap()
    }

    fn table() -> PriceTable {
        PriceTable::shipped().expect("shipped prices.toml parses")
    }

    fn key(t: &PriceTable, model: &str) -> Option<String> {
        t.lookup(model).map(|e| e.pattern.clone())
    }

    /// The snapshot pattern of a model id.
    const SNAPSHOT: &str = "-20??-??-??";

    #[test]
    fn shipped_table_parses_with_its_date() {
        let file = parse_price_file(SHIPPED_PRICES).unwrap();
        assert_eq!(file.as_of, NaiveDate::from_ymd_opt(2026, 12, 5));
        assert!(file.prices.len() > 120, "{}", file.prices.len());
        assert_eq!(table().as_of(), file.as_of);
    }

    #[test]
    fn shipped_globs_cover_only_the_snapshots_of_one_listed_model() {
        let t = table();
        for e in t.entries().filter(|e| is_glob(&e.pattern)) {
            // Structurally `ID-20??-??-??`: matches nothing but ID + a dated suffix.
            let base = e
                .pattern
                .strip_suffix(SNAPSHOT)
                .unwrap_or_else(|| panic!("{}: a shipped glob must be `ID{SNAPSHOT}`", e.pattern));
            assert!(!is_glob(base), "{}: wildcard in the model part", e.pattern);
            // ID has an entry of its own, at the same price: snapshots are the model.
            let alias = t
                .lookup(base)
                .unwrap_or_else(|| panic!("{}: no entry for {base}", e.pattern));
            assert_eq!(alias.pattern, base);
            assert_eq!(alias.price, e.price, "{}: priced unlike {base}", e.pattern);
            assert_eq!(
                key(&t, &format!("{base}-2031-07-04")),
                Some(e.pattern.clone())
            );
        }
    }

    /// Ids of versions after `id`: each number in it raised by one (`gpt-5.4-mini` →
    /// `gpt-6.4-mini`, `gpt-5.5-mini`), a minor added (`claude-opus-4-8` → `claude-opus-4-8-1`,
    /// `gpt-5` → `gpt-5.1`), and variants a family grows (`-pro`, `-2`).
    fn next_versions(id: &str) -> Vec<String> {
        let mut out = Vec::new();
        let bytes = id.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_digit() {
                let start = i;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if let Ok(n) = id[start..i].parse::<u64>() {
                    out.push(format!("{}{}{}", &id[..start], n + 1, &id[i..]));
                    out.push(format!("{}.1{}", &id[..i], &id[i..]));
                    out.push(format!("{}-1{}", &id[..i], &id[i..]));
                }
            } else {
                i += 1;
            }
        }
        out.push(format!("{id}-pro"));
        out.push(format!("{id}-2"));
        out.push(format!("{id}.1"));
        out
    }

    /// `id` without a snapshot suffix: `-2024-08-06`, `-20250929`, `-0613`.
    fn undated(id: &str) -> &str {
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        for (len, shape) in [(11, "-dddd-dd-dd"), (9, "-dddddddd"), (5, "-dddd")] {
            if id.len() > len {
                let tail = &id[id.len() - len..];
                let fits = tail.bytes().zip(shape.bytes()).all(|(b, s)| {
                    if s == b'd' {
                        b.is_ascii_digit()
                    } else {
                        b == s
                    }
                });
                if fits && digits(&tail.replace('-', "")) {
                    return &id[..id.len() - len];
                }
            }
        }
        id
    }

    #[test]
    fn no_shipped_glob_prices_a_newer_version() {
        let t = table();
        let globs: Vec<&Entry> = t.entries().filter(|e| is_glob(&e.pattern)).collect();
        assert_eq!(undated("gpt-4o-2024-05-13"), "gpt-4o");
        assert_eq!(undated("claude-opus-4-1-20250805"), "claude-opus-4-1");
        assert_eq!(undated("gpt-3.5-turbo-0125"), "gpt-3.5-turbo");
        assert_eq!(undated("claude-opus-4-8"), "claude-opus-4-8");
        let mut checked = 0;
        for e in t.entries() {
            let id = undated(e.pattern.strip_suffix(SNAPSHOT).unwrap_or(&e.pattern));
            for next in next_versions(id) {
                for g in &globs {
                    assert!(
                        !WildMatch::new(&g.pattern).matches(&next),
                        "{} would price {next}, a newer version of {id}",
                        g.pattern
                    );
                }
                // Its snapshots are not caught either.
                let snapshot = format!("{next}-2027-01-15");
                if t.lookup(&next).is_none() {
                    assert_eq!(key(&t, &snapshot), None, "{snapshot}");
                }
                checked += 1;
            }
        }
        assert!(
            globs.len() > 30 && checked > 500,
            "{} {checked}",
            globs.len()
        );
    }

    #[test]
    fn claude_opus_minor_versions_have_their_own_prices() {
        let t = table();
        let rates = |m: &str| {
            let e = t.lookup(m).unwrap_or_else(|| panic!("{m} missing"));
            assert_eq!(e.pattern, m, "{m} priced by another entry");
            let r = e.price.rates;
            (
                r.input,
                r.cached_input,
                r.cache_write,
                r.cache_write_1h,
                r.output,
            )
        };
        let opus_46 = (usd("5"), usd("0.5"), usd("6.25"), usd("10"), usd("25"));
        for m in [
            "claude-opus-4-6",
            "claude-opus-4-7",
            "claude-opus-4-8",
            "claude-opus-4-5",
        ] {
            assert_eq!(rates(m), opus_46, "{m}");
        }
        let opus_41 = (usd("15"), usd("1.5"), usd("18.75"), usd("30"), usd("75"));
        assert_eq!(rates("claude-opus-4-1"), opus_41);
        assert_eq!(rates("claude-opus-4-1-20250805"), opus_41);
        assert_eq!(rates("claude-opus-5-5").0, usd("4"));
        // Versions without an entry are unknown, not priced as a sibling.
        for m in [
            "claude-opus-4-9",
            "claude-opus-4",
            "claude-opus-5-6",
            "claude-sonnet-4-7",
        ] {
            assert_eq!(key(&t, m), None, "{m}");
        }
    }

    #[test]
    fn shipped_prices_match_the_providers_pages() {
        let t = table();
        let check = |model: &str, input: &str, cached: &str, output: &str| {
            let r = t
                .lookup(model)
                .unwrap_or_else(|| panic!("{model} missing"))
                .price
                .rates;
            assert_eq!(
                (r.input, r.cached_input, r.output),
                (usd(input), usd(cached), usd(output)),
                "{model}"
            );
        };
        check("gpt-6.2-sol", "2", "0.10", "10");
        check("gpt-6.1-terra", "1", "0.05", "5");
        check("gpt-6-astra", "10", "1", "50");
        check("gpt-6-luna", "0.10", "0.01", "0.50");
        check("gpt-5.6-sol", "5", "0.50", "30");
        check("gpt-5.6", "5", "0.50", "30");
        check("gpt-5.5", "5", "0.50", "30");
        check("gpt-5.4-mini-2026-03-17", "0.75", "0.075", "4.50");
        check("gpt-5.2", "1.75", "0.175", "14");
        check("gpt-5.1", "1.25", "0.125", "10");
        check("gpt-5-mini-2025-08-07", "0.25", "0.025", "2");
        check("gpt-4.1-nano-2025-04-14", "0.10", "0.025", "0.40");
        check("gpt-4o-2024-08-06", "2.50", "1.25", "10");
        check("gpt-4o-2024-05-13", "5", "5", "15");
        check("gpt-4o-mini-2024-07-18", "0.15", "0.075", "0.60");
        check("o3-mini", "1.10", "0.55", "4.40");
        check("o4-mini-2025-04-16", "1.10", "0.275", "4.40");
        check("gpt-3.5-turbo-instruct", "1.50", "1.50", "2");
        check("text-embedding-3-small", "0.02", "0.02", "0");
        check("claude-fable-5-2", "8", "0.20", "40");
        check("claude-sonnet-5-5", "2", "0.10", "10");
        check("claude-sonnet-4-5-20250929", "3", "0.30", "15");
        check("claude-haiku-5-5", "0.10", "0.01", "0.50");
        check("claude-haiku-4-5-20251001", "1", "0.10", "5");
        check("claude-3-5-haiku-20241022", "0.80", "0.08", "4");
        let haiku3 = t.lookup("claude-3-haiku-20240307").unwrap().price.rates;
        assert_eq!(
            (haiku3.cache_write, haiku3.cache_write_1h),
            (usd("0.30"), usd("0.50"))
        );
        let audio = t.lookup("gpt-audio-1.5").unwrap().price.rates;
        assert_eq!(
            (audio.audio_input, audio.audio_output),
            (usd("32"), usd("64"))
        );
        let haiku55 = t
            .lookup("claude-haiku-5-5")
            .unwrap()
            .price
            .long_context
            .unwrap();
        assert_eq!(haiku55.above, 100_000);
        assert_eq!(
            haiku55.rates,
            Rates {
                input: usd("0.50"),
                cached_input: usd("0.05"),
                cache_write: usd("0.625"),
                cache_write_1h: usd("1"),
                output: usd("2.50"),
                audio_input: usd("0.50"),
                audio_output: usd("2.50"),
            }
        );
        let sol = &t.lookup("gpt-6.2-sol").unwrap().price;
        assert_eq!(sol.long_context.unwrap().above, 272_000);
        assert_eq!(
            sol.tiers
                .get("ultrafast")
                .map(ToString::to_string)
                .as_deref(),
            Some("3")
        );
        let mini = &t.lookup("gpt-4o-mini").unwrap().price;
        assert_eq!(mini.tiers["priority"].to_string(), "5/3");
        let opus55 = &t.lookup("claude-opus-5-5").unwrap().price;
        assert_eq!(opus55.speed["fast"].to_string(), "2");
        assert_eq!(opus55.inference_geo["us"].to_string(), "1.1");
        // Before Claude 4.6 there is no US-only pricing.
        assert!(
            t.lookup("claude-opus-4-5")
                .unwrap()
                .price
                .inference_geo
                .is_empty()
        );
    }

    /// `gpt-N.M…` → (N, M); `gpt-N-…` → (N, 0).
    fn gpt_version(id: &str) -> Option<(u64, u64)> {
        let rest = id.strip_prefix("gpt-")?;
        let num: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = num.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
        Some((major, minor))
    }

    #[test]
    fn openai_models_before_5_6_charge_no_cache_write_premium() {
        let t = table();
        let mut checked = 0;
        for e in t.entries() {
            let id = e.pattern.as_str();
            let before_5_6 = match gpt_version(id) {
                Some(v) => v < (5, 6),
                // o-series, chat-latest and the audio models predate GPT-5.6 too.
                None => {
                    ["o1", "o3", "o4"].iter().any(|p| id.starts_with(p))
                        || id == "chat-latest"
                        || id.starts_with("gpt-audio")
                }
            };
            let r = e.price.rates;
            if id.starts_with("gpt-daybreak-red") || id == "gpt-5.6-cyber" {
                // Priced as GPT-5.6 Cyber: 1.25 × input.
                assert_eq!(r.cache_write, usd("15.625"), "{id}");
            } else if before_5_6 && !id.contains("embedding") {
                assert_eq!(
                    (r.cache_write, r.cache_write_1h),
                    (r.input, r.input),
                    "{id}"
                );
                checked += 1;
            } else if gpt_version(id).is_some_and(|v| v >= (5, 6)) {
                assert_eq!(
                    u128::from(r.cache_write) * 4,
                    u128::from(r.input) * 5,
                    "{id}"
                );
            }
        }
        assert!(checked > 50, "{checked}");
    }

    #[test]
    fn lookup_prefers_exact_then_the_most_specific_glob() {
        let t = table();
        assert_eq!(key(&t, "gpt-4o").as_deref(), Some("gpt-4o"));
        assert_eq!(
            key(&t, "gpt-4o-2024-08-06").as_deref(),
            Some("gpt-4o-20??-??-??")
        );
        assert_eq!(
            key(&t, "gpt-4o-2024-05-13").as_deref(),
            Some("gpt-4o-2024-05-13")
        );
        assert_eq!(
            key(&t, "gpt-4o-mini-2024-07-18").as_deref(),
            Some("gpt-4o-mini-20??-??-??")
        );
        for unknown in [
            "o1-preview",
            "gpt-4o-mini-tts",
            "GPT-4O",
            "llama-3",
            "gpt-6",
            "gpt-7",
        ] {
            assert_eq!(key(&t, unknown), None, "{unknown}");
        }
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
            let t = PriceTable::new(
                rotated.into_iter().map(|(k, p)| (k, p, Source::Config)),
                None,
            )
            .unwrap();
            let rate = |m: &str| t.lookup(m).map(|e| e.price.rates.input);
            assert_eq!(rate("abcd"), Some(3), "same prefix, more literal chars");
            assert_eq!(rate("abxxd"), Some(4));
            assert_eq!(rate("abc"), Some(2));
            assert_eq!(rate("ax"), Some(1));
            assert_eq!(rate("zzz"), Some(5));
        }
        assert!(matches!(
            PriceTable::new([(String::new(), p(1), Source::Config)], None),
            Err(PriceError::EmptyPattern)
        ));
    }

    #[test]
    fn config_overrides_replace_whole_entries_and_extend() {
        let overrides = parse_price_file(
            r#"
            [prices."gpt-4o-mini"]
            input = 0.20
            output = 0.80

            [prices."my-finetune-*"]
            input = 1
            output = 2
            "#,
        )
        .unwrap();
        let t = PriceTable::with_overrides(overrides.prices).unwrap();
        let mini = t.lookup("gpt-4o-mini").unwrap();
        assert_eq!(mini.source, Source::Config);
        // The whole shipped entry is replaced: no cached discount, no tiers left over.
        assert_eq!(
            (mini.price.rates.input, mini.price.rates.cached_input),
            (usd("0.20"), usd("0.20"))
        );
        assert!(mini.price.tiers.is_empty());
        assert_ne!(mini.version, table().lookup("gpt-4o-mini").unwrap().version);
        // The snapshot pattern is another key: it keeps the shipped price.
        let snapshot = t.lookup("gpt-4o-mini-2024-07-18").unwrap();
        assert_eq!(
            (snapshot.price.rates.input, snapshot.source),
            (usd("0.15"), Source::Shipped)
        );
        assert_eq!(
            t.lookup("my-finetune-42").unwrap().price.rates.output,
            usd("2")
        );
        assert_eq!(t.entries().count(), table().entries().count() + 1);
        // Unchanged entries keep their versions.
        assert_eq!(
            t.lookup("gpt-5").unwrap().version,
            table().lookup("gpt-5").unwrap().version
        );
    }

    #[test]
    fn price_file_errors_name_line_and_key() {
        let err = parse_price_file(
            "as_of = \"last week\"\nbogus = 1\n[prices.\"m\"]\ninput = 1\noutput = -1\n\
             [prices.\"n\"]\ntiers = { fast = \"x\" }\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "1: as_of: expected a date",
            "2: bogus: unknown key",
            "5: prices.\"m\".output: ",
            "7: prices.\"n\".tiers.fast: ",
            "6: prices.\"n\": needs at least `input` or `output`",
        ] {
            assert!(err.contains(want), "{want:?} not in:\n{err}");
        }
        assert!(parse_price_file("[prices\n").is_err());
        // A TOML date works as well as a string.
        let f = parse_price_file("as_of = 2026-01-31\n").unwrap();
        assert_eq!(f.as_of, NaiveDate::from_ymd_opt(2026, 1, 31));
    }

    #[test]
    fn staleness_warning_after_90_days() {
        let day = |m: u32, d: u32| NaiveDate::from_ymd_opt(2027, m, d).unwrap();
        let as_of = NaiveDate::from_ymd_opt(2026, 12, 5).unwrap();
        assert_eq!(staleness_warning(as_of, as_of), None);
        // 2026-12-05 + 90 days = 2027-03-05: still fine; the day after warns.
        assert_eq!(staleness_warning(as_of, day(3, 5)), None);
        let w = staleness_warning(as_of, day(3, 6)).unwrap();
        assert!(w.contains("2026-12-05") && w.contains("91 days"), "{w}");
        // A date in the future (a clock behind) does not warn.
        assert_eq!(staleness_warning(day(6, 1), as_of), None);
    }

    #[test]
    fn unknown_model_message_is_a_ready_to_paste_block() {
        for model in ["gpt-7-turbo", "acme/strange \"model\"\\v2"] {
            let msg = unknown_model_message(model);
            assert!(msg.contains(&format!("`{model}`")), "{msg}");
            let block = msg.split_once("\n\n").map(|(_, b)| b).unwrap();
            let file = parse_price_file(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
            assert!(file.prices.contains_key(model), "{block}");
        }
    }
}
