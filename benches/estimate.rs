//! Token counting throughput: `tollgate::tokens::count` against plain tiktoken-rs
//! (`o200k_base_singleton().encode_ordinary(..).len()`) on English-like prompts of 1 KB, 100 KB
//! and 1 MB and on an adversarial 1 MB run of one character; plus a whole chat-request estimate
//! at the size above which the proxy moves estimation to `spawn_blocking`. On real English
//! (the license texts in `/usr/share/common-licenses`, when present) it also times the
//! pre-tokenising split alone and a count with a per-piece cache — the measurements behind
//! "what it would take" for the 3× estimation target in docs/performance.md.
//!
//! Run: `cargo bench --bench estimate -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use tollgate::tokens::{self, Encoding, SPAWN_BLOCKING_ABOVE_BYTES};

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "request",
    "budget",
    "tokenizer",
    "streaming",
    "reservation",
    "settlement",
    "latency",
    "throughput",
    "configuration",
    "Kubernetes",
    "JSON",
    "2024",
    "42",
    "user's",
    "don't",
    "e.g.",
    "GPU",
];

/// Deterministic English-like text of `len` bytes: words, numbers, punctuation, paragraphs.
fn english(len: usize) -> String {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = String::with_capacity(len + 32);
    let mut sentence = 0;
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let word = WORDS[(state % WORDS.len() as u64) as usize];
        if sentence == 0 {
            let mut c = word.chars();
            if let Some(first) = c.next() {
                out.extend(first.to_uppercase());
                out.push_str(c.as_str());
            }
        } else {
            out.push_str(word);
        }
        sentence += 1;
        match state % 23 {
            0 if sentence > 4 => {
                out.push_str(".\n\n");
                sentence = 0;
            }
            1..=2 if sentence > 5 => {
                out.push_str(". ");
                sentence = 0;
            }
            3 => out.push_str(", "),
            _ => out.push(' '),
        }
    }
    out.truncate(len);
    out
}

fn count_throughput(c: &mut Criterion) {
    tokens::warm();
    let baseline = tiktoken_rs::o200k_base_singleton();

    let mut group = c.benchmark_group("count_english_o200k");
    for (label, len) in [("1KB", 1 << 10), ("100KB", 100 << 10), ("1MB", 1 << 20)] {
        let text = english(len);
        assert_eq!(
            tokens::count(Encoding::O200k, &text),
            baseline.encode_ordinary(&text).len()
        );
        group.throughput(Throughput::Bytes(text.len() as u64));
        if len >= 100 << 10 {
            group.sample_size(10);
        }
        group.bench_with_input(BenchmarkId::new("tollgate", label), &text, |b, t| {
            b.iter(|| tokens::count(Encoding::O200k, black_box(t)))
        });
        group.bench_with_input(BenchmarkId::new("tiktoken-rs", label), &text, |b, t| {
            b.iter(|| baseline.encode_ordinary(black_box(t)).len())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("count_adversarial_o200k");
    group.sample_size(10);
    let run = "a".repeat(1 << 20);
    group.throughput(Throughput::Bytes(run.len() as u64));
    group.bench_with_input(
        BenchmarkId::new("tollgate", "1MB-single-char"),
        &run,
        |b, t| b.iter(|| tokens::count(Encoding::O200k, black_box(t))),
    );
    group.bench_with_input(
        BenchmarkId::new("tiktoken-rs", "1MB-single-char"),
        &run,
        |b, t| b.iter(|| baseline.encode_ordinary(black_box(t)).len()),
    );
    group.finish();

    real_english(c, baseline);

    // A whole chat request of the size where the proxy switches to spawn_blocking.
    let mut group = c.benchmark_group("estimate_chat_request");
    let content = english(SPAWN_BLOCKING_ABOVE_BYTES / 4);
    let body = json!({"model": "gpt-4o", "messages": [
        {"role": "system", "content": content},
        {"role": "user", "content": content},
        {"role": "assistant", "content": content},
        {"role": "user", "content": content}
    ]});
    group.throughput(Throughput::Bytes(SPAWN_BLOCKING_ABOVE_BYTES as u64));
    group.bench_function("openai_chat_input_at_threshold", |b| {
        b.iter(|| tokens::openai_chat_input(black_box(&body), Encoding::O200k))
    });
    group.finish();
}

/// Real English: every license text Debian ships, concatenated (~300 KB). Skipped where the
/// directory does not exist.
fn real_english(c: &mut Criterion, baseline: &tiktoken_rs::CoreBPE) {
    let Ok(dir) = std::fs::read_dir("/usr/share/common-licenses") else {
        return;
    };
    let mut paths: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut text = String::new();
    for p in paths.iter().filter(|p| p.is_file()) {
        text.push_str(&std::fs::read_to_string(p).unwrap_or_default());
    }
    if text.is_empty() {
        return;
    }
    let tok = bpe_openai::o200k_base();
    let expected = baseline.encode_ordinary(&text).len();
    assert_eq!(tokens::count(Encoding::O200k, &text), expected);
    assert_eq!(cached_count(tok, &text), expected);

    let mut group = c.benchmark_group("count_licenses_o200k");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_with_input(BenchmarkId::new("tollgate", "all"), &text, |b, t| {
        b.iter(|| tokens::count(Encoding::O200k, black_box(t)))
    });
    group.bench_with_input(BenchmarkId::new("tiktoken-rs", "all"), &text, |b, t| {
        b.iter(|| baseline.encode_ordinary(black_box(t)).len())
    });
    group.bench_with_input(BenchmarkId::new("split-only", "all"), &text, |b, t| {
        b.iter(|| tok.split(black_box(t)).count())
    });
    group.bench_with_input(BenchmarkId::new("piece-cache", "all"), &text, |b, t| {
        b.iter(|| cached_count(tok, black_box(t)))
    });
    group.finish();
}

/// bpe-openai's count with each short piece's count memoised (identical result: BPE counts
/// pieces independently).
fn cached_count(tok: &bpe_openai::Tokenizer, text: &str) -> usize {
    let mut cache: std::collections::HashMap<&str, usize, foldhash::fast::RandomState> =
        Default::default();
    tok.split(text)
        .map(|piece| {
            if piece.len() <= 24 {
                *cache
                    .entry(piece)
                    .or_insert_with(|| tok.bpe.count(piece.as_bytes()))
            } else {
                tok.bpe.count(piece.as_bytes())
            }
        })
        .sum()
}

criterion_group!(benches, count_throughput);
criterion_main!(benches);
