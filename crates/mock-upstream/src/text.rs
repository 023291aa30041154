//! Answer generation and token accounting for the mock upstream.
//!
//! Owns: the seeded word generator, how an answer is cut into content chunks, the prompt/answer
//! token counts and the cache that keeps them cheap. Which encoding a model counts with is
//! tollgate's table (`tollgate-tokens`), not the mock's own.
//!
//! Counting rules (they only need to be deterministic and realistic, and are what the mock
//! reports as usage):
//! - output: the tiktoken count of the *whole* answer text (or tool-call arguments) exactly as
//!   streamed — never a sum of per-chunk counts, since BPE is not additive — plus any
//!   `x-mock-reasoning-tokens` (hidden reasoning is billed as output).
//! - input, message routes (chat, responses, messages): the text contents joined with `\n`,
//!   counted with the model's encoding, plus 3 tokens per message and 3 for the reply primer
//!   (the OpenAI cookbook's overhead; tool definitions and images are not counted).
//! - input, completions and embeddings: the exact count of the prompt/inputs (token-id arrays
//!   count their length).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tiktoken_rs::CoreBPE;
pub(crate) use tollgate_tokens::Encoding;

use super::controls::Controls;

/// splitmix64: tiny, fast, and good enough to make text look random. Not for anything secret.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough value in `0..n` (`n > 0`); modulo bias is irrelevant here.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `len` characters of `[0-9A-Za-z]`, the alphabet of OpenAI/Anthropic ids.
    pub(crate) fn base62(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        (0..len)
            .map(|_| char::from(ALPHABET[self.below(62) as usize]))
            .collect()
    }

    /// `len` lowercase hex characters.
    pub(crate) fn hex(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"0123456789abcdef";
        (0..len)
            .map(|_| char::from(ALPHABET[self.below(16) as usize]))
            .collect()
    }
}

/// FNV-1a 64: stable across Rust versions (unlike `DefaultHasher`), so seeds derived from a
/// request body are reproducible between runs.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// Folds several numbers into one cache key / seed.
pub(crate) fn mix(parts: &[u64]) -> u64 {
    let mut rng = Rng::new(0x5EED);
    let mut acc = 0u64;
    for p in parts {
        acc = (acc ^ p).rotate_left(29);
        rng.0 ^= acc;
        acc = rng.next_u64();
    }
    acc
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Appends `s` as a JSON string literal. Hand-rolled because the hot streaming path builds
/// events by concatenation rather than through `serde_json::Value`.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                const HEX: &[u8] = b"0123456789abcdef";
                let v = u32::from(c) as usize;
                out.push_str("\\u00");
                out.push(char::from(HEX[v >> 4]));
                out.push(char::from(HEX[v & 0xf]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// One word per line would make this table 250 lines long.
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be",
    "by", "this", "are", "or", "from", "at", "which", "an", "but", "not", "have", "has", "can",
    "will", "one", "all", "their", "there", "been", "more", "when", "would", "also", "other",
    "into", "some", "these", "its", "than", "only", "about", "after", "most", "over", "such",
    "between", "through", "where", "each", "many", "those", "while", "because", "however", "system",
    "request", "answer", "model", "token", "budget", "limit", "stream", "network", "server",
    "client", "value", "result", "process", "example", "number", "question", "information",
    "service", "account", "window", "minute", "hour", "daily", "monthly", "report", "quickly",
    "carefully", "usually", "often", "simple", "clear", "large", "small", "important", "different",
    "following", "possible", "available", "several", "general", "specific", "reliable", "accurate",
    "current", "previous", "useful", "common", "public", "private", "local", "remote", "first",
    "second", "final", "early", "recent", "modern", "careful", "quiet", "bright", "river",
    "mountain", "garden", "library", "window", "engine", "signal", "pattern", "method", "structure",
    "balance", "journey", "history", "language", "computer", "database", "ledger", "invoice",
    "payment", "customer", "product", "feature", "design", "review", "change", "update", "measure",
    "estimate", "reserve", "settle", "explain", "consider", "describe", "provide", "include",
    "require", "support", "improve", "compare", "observe", "develop", "suggest", "remember",
    "understand", "continue", "return", "happen", "become", "remain", "follow", "produce",
    "deliver", "receive", "maintain", "ensure", "reduce", "increase", "protect", "connect",
    "collect", "record", "count", "check", "build", "write", "read", "think", "know", "make",
    "take", "give", "find", "keep", "show", "learn", "start", "stop", "open", "close", "send",
    "carry", "hold", "turn", "move", "look", "well", "even", "still", "again", "already", "perhaps",
    "instead", "together", "almost", "always", "never", "rather", "nearly", "exactly", "roughly",
    "mostly", "twenty", "three", "seven", "hundred", "thousand", "percent", "morning", "evening",
    "weather", "coffee", "paper", "table", "people", "team", "city", "country", "world", "water",
    "light", "color",
];

/// `words` English-looking words in sentences of 5–14 words, deterministic in `seed`.
/// ASCII only, so every byte offset is a char boundary.
pub(crate) fn answer_text(seed: u64, words: usize) -> String {
    let mut rng = Rng::new(seed);
    let mut out = String::with_capacity(words.saturating_mul(8));
    let mut left = 0u64;
    for i in 0..words {
        let starts_sentence = left == 0;
        if starts_sentence {
            left = 5 + rng.below(10);
        }
        if i > 0 {
            out.push(' ');
        }
        let word = WORDS[rng.below(WORDS.len() as u64) as usize];
        if starts_sentence {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                out.push(first.to_ascii_uppercase());
                out.push_str(chars.as_str());
            }
        } else {
            out.push_str(word);
        }
        left -= 1;
        if left == 0 || i + 1 == words {
            out.push('.');
            left = 0;
        } else if rng.below(9) == 0 {
            out.push(',');
        }
    }
    out
}

/// Tool-call arguments: a JSON object whose `query` holds `words` generated words.
pub(crate) fn tool_arguments(seed: u64, words: usize) -> String {
    let query = answer_text(seed, words);
    let mut out = String::with_capacity(query.len() + 32);
    out.push_str("{\"query\":");
    push_json_str(&mut out, &query);
    out.push_str(",\"limit\":");
    out.push_str(&(1 + seed % 10).to_string());
    out.push('}');
    out
}

/// Byte offsets where each content chunk ends.
///
/// Text answers are cut at word starts (a chunk is `" word"` × 1–3, like provider deltas);
/// tool-call arguments in 3–12 byte pieces. `exact` asks for that many chunks, spread evenly
/// (capped at the number of words / bytes available).
pub(crate) fn chunk_ends(text: &str, tool: bool, seed: u64, exact: Option<usize>) -> Vec<usize> {
    if text.is_empty() {
        return Vec::new();
    }
    // Units: the smallest pieces a chunk may hold, given by their end offsets.
    let unit_ends: Vec<usize> = if tool {
        (1..=text.len()).collect()
    } else {
        let mut ends: Vec<usize> = text
            .char_indices()
            .filter(|(i, c)| *c == ' ' && *i > 0)
            .map(|(i, _)| i)
            .collect();
        ends.push(text.len());
        ends
    };
    let units = unit_ends.len();
    let mut out = Vec::new();
    match exact {
        Some(n) => {
            let n = n.clamp(1, units);
            for k in 1..=n {
                out.push(unit_ends[k * units / n - 1]);
            }
        }
        None => {
            let mut rng = Rng::new(seed ^ 0xC4_0C4_0C4);
            let (lo, span) = if tool { (3, 10) } else { (1, 3) };
            let mut at = 0usize;
            while at < units {
                at = (at + lo + rng.below(span) as usize).min(units);
                out.push(unit_ends[at - 1]);
            }
        }
    }
    out
}

/// tiktoken-rs's copy of a vocabulary, for cutting an answer at a token boundary (it decodes
/// token ids back to text); counting goes through [`count`].
fn bpe(enc: Encoding) -> &'static CoreBPE {
    match enc {
        Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
        Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
    }
}

/// Exact tiktoken count, through tollgate's linear-time counter (identical counts, checked
/// against tiktoken-rs in `tollgate-tokens`), so adversarial prompts don't stall the mock.
pub(crate) fn count(enc: Encoding, text: &str) -> u64 {
    tollgate_tokens::count(enc, text) as u64
}

/// The encoding a model's text is counted with: tollgate's own table
/// ([`tollgate_tokens::encoding_for_model`]), so the usage the mock reports for a text is the
/// count tollgate makes of the same text (o200k for gpt-4o/4.1/5 and the o-series, cl100k for
/// gpt-4, gpt-3.5, text-embedding-* and Claude, o200k for anything else).
pub(crate) fn encoding_for_model(model: &str) -> Encoding {
    tollgate_tokens::encoding_for_model(model).0
}

/// Prompt text collected from a request body, for the input-token count.
#[derive(Debug, Default)]
pub(crate) struct Prompt {
    pub text: String,
    /// Message routes: number of messages (adds `3 * n + 3`). `None`: count the text exactly.
    pub messages: Option<u64>,
    /// Token-id inputs (completions/embeddings arrays of integers) count one each.
    pub token_ids: u64,
    /// Inputs the provider tokenizes one by one (an array of prompts or embedding inputs):
    /// counted separately and summed, since BPE counts are not additive over a join.
    pub apart: Vec<String>,
}

impl Prompt {
    pub(crate) fn push(&mut self, part: &str) {
        if part.is_empty() {
            return;
        }
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(part);
    }

    pub(crate) fn count(&self, enc: Encoding) -> u64 {
        let overhead = self.messages.map_or(0, |n| 3 * n + 3);
        let apart: u64 = self.apart.iter().map(|s| count(enc, s)).sum();
        count(enc, &self.text) + overhead + self.token_ids + apart
    }
}

/// Counts for one (request body, answer shape) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counted {
    pub input: u64,
    pub visible_output: u64,
    /// Length of the answer after `max_tokens` truncation.
    pub text_len: usize,
    pub truncated: bool,
}

/// Bounded memo of token counts: tokenizing is the mock's only expensive step, and load
/// benchmarks replay a handful of request bodies, so almost every request hits. When full the
/// map is simply cleared (a miss costs one tokenization, never a wrong number).
#[derive(Debug, Default)]
pub(crate) struct CountCache {
    map: Mutex<HashMap<u64, Counted>>,
}

const CACHE_ENTRIES: usize = 8192;

impl CountCache {
    pub(crate) fn get_or(&self, key: u64, compute: impl FnOnce() -> Counted) -> Counted {
        if let Some(hit) = self.map.lock().get(&key) {
            return *hit;
        }
        let value = compute();
        let mut map = self.map.lock();
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
        map.insert(key, value);
        value
    }
}

/// Cuts `text` to its first `max` tokens, the way a provider stops at `max_tokens`.
/// Returns the new byte length, or `None` when no cut is needed.
fn truncate_to_tokens(enc: Encoding, text: &str, max: u64) -> Option<usize> {
    let tokens = bpe(enc).encode_ordinary(text);
    if tokens.len() as u64 <= max {
        return None;
    }
    let keep = usize::try_from(max).unwrap_or(usize::MAX).min(tokens.len());
    // Decoding a token prefix of ASCII text is always valid UTF-8; if it ever were not, the
    // answer is left whole rather than cut at a wrong place.
    let prefix = bpe(enc).decode(&tokens[..keep]).ok()?;
    text.starts_with(prefix.as_str()).then_some(prefix.len())
}

/// Everything a route needs to render one answer, in any of its formats.
#[derive(Debug, Clone)]
pub(crate) struct Turn {
    pub model: String,
    /// Answer text, or the tool call's JSON arguments when `tool_name` is set.
    pub text: String,
    pub chunk_ends: Vec<usize>,
    /// Prompt tokens as counted (see the module doc), before any cached split.
    pub input_tokens: u64,
    /// tiktoken count of `text`.
    pub visible_tokens: u64,
    /// Stopped by the request's output-token limit.
    pub truncated: bool,
    pub tool_name: Option<String>,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub cache_write_tokens: u64,
    /// Long-lifetime cache writes (Anthropic 1-hour, OpenAI 12-hour), beside `cache_write_tokens`.
    pub cache_write_1h_tokens: u64,
    /// Audio tokens, added to the prompt's and the answer's counts (OpenAI chat).
    pub audio_input_tokens: u64,
    pub audio_output_tokens: u64,
    /// Web search calls the answer reports.
    pub web_searches: u64,
    /// Service tier, speed and region the answer reports when set (`x-mock-*`), else what the
    /// route derives from the request.
    pub service_tier: Option<String>,
    pub speed: Option<String>,
    pub inference_geo: Option<String>,
    pub no_usage: bool,
    pub include_usage: bool,
    /// Source of ids (`chatcmpl-…`, `msg_…`); seeded per request unless `x-mock-seed` is set.
    pub ids: Rng,
    pub created: u64,
}

impl Turn {
    pub(crate) fn chunk_count(&self) -> usize {
        self.chunk_ends.len()
    }

    pub(crate) fn chunk(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.chunk_ends[i - 1] };
        self.text.get(start..self.chunk_ends[i]).unwrap_or("")
    }

    /// Output tokens as a provider bills them: visible text plus hidden reasoning and audio.
    pub(crate) fn output_tokens(&self) -> u64 {
        self.visible_tokens + self.reasoning_tokens + self.audio_output_tokens
    }

    /// Prompt tokens as OpenAI reports them: the counted text plus audio.
    pub(crate) fn prompt_tokens(&self) -> u64 {
        self.input_tokens + self.audio_input_tokens
    }

    /// OpenAI cache counts as parts of the prompt: (reads, writes, the 12-hour part of the
    /// writes), each cut to what the prompt has left.
    pub(crate) fn openai_cache(&self) -> (u64, u64, u64) {
        let prompt = self.prompt_tokens();
        let read = self.cached_tokens.min(prompt);
        let write = (self.cache_write_tokens + self.cache_write_1h_tokens).min(prompt - read);
        (read, write, self.cache_write_1h_tokens.min(write))
    }
}

/// Request facts a route extracts before the answer is generated.
#[derive(Debug)]
pub(crate) struct TurnSpec {
    /// Distinguishes routes in cache keys and seeds.
    pub route_tag: u64,
    pub model: String,
    pub body_hash: u64,
    pub max_output: Option<u64>,
    /// Some when answering with a tool call: the function name.
    pub tool_name: Option<String>,
    pub include_usage: bool,
    /// Unique per request, so ids differ between identical requests.
    pub salt: u64,
}

/// Fixed `created` timestamp used when `x-mock-seed` asks for reproducible bytes.
const SEEDED_CREATED: u64 = 1_750_000_000;

pub(crate) fn build_turn(
    spec: TurnSpec,
    ctl: &Controls,
    cache: &CountCache,
    prompt: impl FnOnce() -> Prompt,
) -> Turn {
    let enc = encoding_for_model(&spec.model);
    let tool = spec.tool_name.is_some();
    let seed = ctl.seed.unwrap_or(spec.body_hash);
    let generate = || {
        if tool {
            tool_arguments(seed, ctl.words)
        } else {
            answer_text(seed, ctl.words)
        }
    };
    let key = mix(&[
        spec.route_tag,
        spec.body_hash,
        seed,
        ctl.words as u64,
        u64::from(tool),
        spec.max_output.map_or(u64::MAX, |m| m),
        enc as u64,
    ]);
    let mut text = String::new();
    let counted = cache.get_or(key, || {
        text = generate();
        let cut = spec
            .max_output
            .and_then(|max| truncate_to_tokens(enc, &text, max));
        if let Some(len) = cut {
            text.truncate(len);
        }
        Counted {
            input: prompt().count(enc),
            visible_output: count(enc, &text),
            text_len: text.len(),
            truncated: cut.is_some(),
        }
    });
    if text.is_empty() && counted.text_len > 0 {
        text = generate();
        text.truncate(counted.text_len);
    }
    let chunk_ends = chunk_ends(&text, tool, seed, ctl.chunks);
    let (ids, created) = match ctl.seed {
        Some(s) => (Rng::new(mix(&[s, spec.route_tag])), SEEDED_CREATED),
        None => (
            Rng::new(mix(&[spec.body_hash, spec.salt, nanos()])),
            unix_now(),
        ),
    };
    Turn {
        model: spec.model,
        text,
        chunk_ends,
        input_tokens: counted.input,
        visible_tokens: counted.visible_output,
        truncated: counted.truncated,
        tool_name: spec.tool_name,
        cached_tokens: ctl.cached_tokens,
        reasoning_tokens: ctl.reasoning_tokens,
        cache_write_tokens: ctl.cache_write_tokens,
        cache_write_1h_tokens: ctl.cache_write_1h_tokens,
        audio_input_tokens: ctl.audio_input_tokens,
        audio_output_tokens: ctl.audio_output_tokens,
        web_searches: ctl.web_searches,
        service_tier: ctl.service_tier.clone(),
        speed: ctl.speed.clone(),
        inference_geo: ctl.inference_geo.clone(),
        no_usage: ctl.no_usage,
        include_usage: spec.include_usage,
        ids,
        created,
    }
}

fn nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos().into())
        .unwrap_or(0)
}

/// `fp_` + 10 hex digits derived from the model, like OpenAI's per-deployment fingerprint.
pub(crate) fn fingerprint(model: &str) -> String {
    let mut rng = Rng::new(fnv1a(model.as_bytes()));
    format!("fp_{}", rng.hex(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_is_deterministic_and_prefix_stable() {
        let a = answer_text(7, 50);
        assert_eq!(a, answer_text(7, 50));
        assert_ne!(a, answer_text(8, 50));
        assert_eq!(a.split(' ').count(), 50);
        assert!(a.ends_with('.'));
        assert!(a.is_ascii());
        assert!(a.chars().next().is_some_and(|c| c.is_ascii_uppercase()));
    }

    #[test]
    fn chunks_cover_the_text_in_order() {
        let text = answer_text(3, 40);
        let ends = chunk_ends(&text, false, 3, None);
        assert_eq!(ends.last(), Some(&text.len()));
        assert!(ends.windows(2).all(|w| w[0] < w[1]));
        // Every chunk after the first starts with the space before its first word.
        for w in ends.windows(2) {
            assert_eq!(&text[w[0]..w[0] + 1], " ");
        }
        let exact = chunk_ends(&text, false, 3, Some(7));
        assert_eq!(exact.len(), 7);
        assert_eq!(exact.last(), Some(&text.len()));
        let args = tool_arguments(3, 10);
        let pieces = chunk_ends(&args, true, 3, None);
        assert_eq!(pieces.last(), Some(&args.len()));
        assert!(serde_json::from_str::<serde_json::Value>(&args).is_ok());
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\nd\u{1}é");
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn truncation_stops_at_the_token_limit() {
        let text = answer_text(11, 60);
        let len = truncate_to_tokens(Encoding::O200k, &text, 10).unwrap();
        assert_eq!(count(Encoding::O200k, &text[..len]), 10);
        assert_eq!(truncate_to_tokens(Encoding::O200k, &text, 10_000), None);
    }
}
