//! Token counting for the `o200k_base` and `cl100k_base` vocabularies, and the one table that
//! says which vocabulary a model's text is counted with. tollgate's input estimate and usage
//! fallback (`tollgate::tokens`) and the mock upstream's reported usage both count through
//! here, so for the same text and model they give the same number.
//!
//! Pure and synchronous: no I/O, no locks after the first use, no panics on any input.
//!
//! # Tokenizers
//!
//! Counting uses the `o200k_base` and `cl100k_base` vocabularies and BPE of `bpe-openai`,
//! with the same pre-tokenization as tiktoken. Its counts are identical to `tiktoken-rs`'s
//! `encode_ordinary(..).len()` — the tests check that on a varied corpus and on random
//! strings, with tiktoken-rs as the reference — and it is linear-time on adversarial input:
//! its BPE is a backtracking encoder bounded by a bitfield of visited positions. tiktoken-rs
//! panics on 1 MB of spaces (its backtracking regex overflows its stack), which a proxy must
//! never do on client input.
//!
//! The pre-tokenizer and a per-thread cache of short pieces' counts are ours (`split.rs`):
//! ASCII is cut by hand, anything else by bpe-openai's regex, piece by piece, and tests hold
//! every cut equal to the regex's. Release build (`cargo bench --bench estimate`, see
//! docs/performance.md): 3.4–8.1× tiktoken-rs on English, code, eleven languages and JSON
//! with o200k, 4.4–10.5× with cl100k; 1 MB of one repeated character in 10 ms against
//! tiktoken-rs's 443 ms.
//!
//! Special-token strings such as `<|endoftext|>` inside user text are counted as ordinary text,
//! as the providers encode them.
//!
//! # Billing is not additive
//!
//! BPE merges across any boundary, so counting stream deltas one by one and summing them
//! overcounts (each cut can split a token in two). [`count`] takes the whole text only; the
//! stream meter accumulates text and counts it once at the end.

mod split;

/// A tokenizer vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-5 and the o-series.
    O200k,
    /// `cl100k_base`: GPT-4, GPT-3.5, the text-embedding models.
    Cl100k,
}

impl Encoding {
    /// The vocabulary's name as tiktoken spells it.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200k => "o200k_base",
            Encoding::Cl100k => "cl100k_base",
        }
    }

    fn tokenizer(self) -> &'static bpe_openai::Tokenizer {
        match self {
            Encoding::O200k => bpe_openai::o200k_base(),
            Encoding::Cl100k => bpe_openai::cl100k_base(),
        }
    }
}

/// Whether counts with the chosen [`Encoding`] are the provider's own token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accuracy {
    /// The model's published tokenizer: text counts are the provider's, the chat-format overhead
    /// follows OpenAI's cookbook.
    Exact,
    /// A stand-in vocabulary (Claude, unknown models): counts can be off by tens of percent.
    Approximate,
}

impl Accuracy {
    /// Input tokens to hold for a reservation: the count itself when exact, the count plus one
    /// third (rounded up) when approximate.
    ///
    /// Why one third: public comparisons against Anthropic's own `count_tokens` put Claude 3.x
    /// at about 16 % (English prose) to 30 % (Python) more tokens than GPT-4o's o200k for the
    /// same text; `cl100k`, which we count Claude with, already sits a few percent above o200k
    /// on such text. Newer Claude tokenizers may count more still, so this is a hold, not a
    /// bill: Anthropic always reports the real input count in `message_start`, which settles it.
    pub fn reservation_tokens(self, counted: u64) -> u64 {
        match self {
            Accuracy::Exact => counted,
            Accuracy::Approximate => counted.saturating_add(counted.div_ceil(3)),
        }
    }
}

/// The encoding a model's prompts are counted with, and whether that count is exact.
///
/// - `gpt-4o*`, `chatgpt-4o*`, `gpt-4.1*`, `gpt-4.5*`, `gpt-5*`, `o1*`, `o3*`, `o4*`,
///   `codex-mini*` → o200k, exact.
/// - `gpt-4*` (the rest), `gpt-3.5*`, `gpt-35*` (Azure names), `text-embedding-*`,
///   `davinci-002`, `babbage-002` → cl100k, exact.
/// - `claude-*` → cl100k, approximate. Anthropic's tokenizer for Claude 3 and later is not
///   public. Published comparisons against Anthropic's `count_tokens` report Claude counting
///   more tokens than o200k for the same text (≈16 % for English prose, ≈30 % for Python);
///   cl100k also counts more than o200k on most text, so it is the closer of the two and errs
///   less toward under-reserving. Expect the true Claude count to be roughly 5–25 % above the
///   cl100k count for English prose and code, and it can be further off for non-Latin scripts;
///   [`Accuracy::reservation_tokens`] adds headroom and the upstream's usage settles the bill.
/// - anything else (other providers' models behind an OpenAI-compatible route, future names) →
///   o200k, approximate.
///
/// Matching is case-insensitive, looks through a fine-tune name (`ft:gpt-4o-mini:org::id`) to
/// its base model and through a router prefix (`openai/gpt-4o`).
pub fn encoding_for_model(model: &str) -> (Encoding, Accuracy) {
    let lower = model.trim().to_ascii_lowercase();
    let base = match lower.strip_prefix("ft:") {
        Some(rest) => rest.split(':').next().unwrap_or(rest),
        None => lower.as_str(),
    };
    let name = base.rsplit('/').next().unwrap_or(base);

    const O200K: &[&str] = &[
        "gpt-4o",
        "chatgpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "o1",
        "o3",
        "o4",
        "codex-mini",
    ];
    const CL100K: &[&str] = &[
        "gpt-4",
        "gpt-3.5",
        "gpt-35",
        "text-embedding-",
        "davinci-002",
        "babbage-002",
    ];
    // Order matters: every o200k `gpt-4…` name also starts with `gpt-4`.
    if O200K.iter().any(|p| name.starts_with(p)) {
        (Encoding::O200k, Accuracy::Exact)
    } else if CL100K.iter().any(|p| name.starts_with(p)) {
        (Encoding::Cl100k, Accuracy::Exact)
    } else if name.starts_with("claude") {
        (Encoding::Cl100k, Accuracy::Approximate)
    } else {
        (Encoding::O200k, Accuracy::Approximate)
    }
}

/// The number of tokens `text` encodes to, counted as a whole.
///
/// Linear in `text.len()` whatever the input (see the module docs for measurements); it never
/// panics. Do not call it per stream delta and add the results up: BPE is not additive.
pub fn count(enc: Encoding, text: &str) -> usize {
    if text.is_empty() {
        return 0;
    }
    split::count(enc, text)
}

/// Loads both vocabularies now (≈100 ms for o200k, ≈35 ms for cl100k in a debug build) so the
/// first request does not pay for it. Call once at start, off the reactor or before it runs.
pub fn warm() {
    for enc in [Encoding::O200k, Encoding::Cl100k] {
        let _ = count(enc, "warm up");
    }
}

#[cfg(test)]
mod tests;
