//! Token counting throughput: `tollgate::tokens::count` against plain tiktoken-rs
//! (`o200k_base_singleton().encode_ordinary(..).len()`) on English-like prompts of 1 KB, 100 KB
//! and 1 MB and on an adversarial 1 MB run of one character; plus a whole chat-request estimate
//! at the size above which the proxy moves estimation to `spawn_blocking`; and a varied
//! corpus (real English, code, eleven languages, JSON full of ids) with both vocabularies,
//! against tiktoken-rs and against bpe-openai's own count (the library tollgate's counting
//! builds on). Every benchmark first asserts tollgate's count equals tiktoken-rs's.
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

    varied_corpus(c);

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

/// A varied corpus, each counted with both vocabularies against tiktoken-rs:
/// - `licenses`: real English, every license text Debian ships (~300 KB; skipped where
///   `/usr/share/common-licenses` does not exist);
/// - `rust-source`: this crate's own `src/` (~1 MB of code, comments and string literals);
/// - `multilingual`: sentences in eleven languages and scripts, shuffled (non-ASCII heavy);
/// - `json-ids`: JSON log lines full of random hex ids, timestamps and numbers (few repeated
///   pieces, the worst case for the per-piece cache).
fn varied_corpus(c: &mut Criterion) {
    let mut corpus: Vec<(&str, String)> = Vec::new();
    let licenses = read_tree(std::path::Path::new("/usr/share/common-licenses"), None);
    if !licenses.is_empty() {
        corpus.push(("licenses", licenses));
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    corpus.push(("rust-source", read_tree(&src, Some("rs"))));
    corpus.push(("multilingual", multilingual(256 << 10)));
    corpus.push(("json-ids", json_ids(256 << 10)));

    for (enc, reference) in [
        (Encoding::O200k, tiktoken_rs::o200k_base_singleton()),
        (Encoding::Cl100k, tiktoken_rs::cl100k_base_singleton()),
    ] {
        let mut group = c.benchmark_group(format!("count_corpus_{}", enc.name()));
        group.sample_size(10);
        for (name, text) in &corpus {
            assert_eq!(
                tokens::count(enc, text),
                reference.encode_ordinary(text).len(),
                "{name}"
            );
            group.throughput(Throughput::Bytes(text.len() as u64));
            group.bench_with_input(BenchmarkId::new("tollgate", name), text, |b, t| {
                b.iter(|| tokens::count(enc, black_box(t)))
            });
            group.bench_with_input(BenchmarkId::new("tiktoken-rs", name), text, |b, t| {
                b.iter(|| reference.encode_ordinary(black_box(t)).len())
            });
            group.bench_with_input(BenchmarkId::new("bpe-openai", name), text, |b, t| {
                let tok = match enc {
                    Encoding::O200k => bpe_openai::o200k_base(),
                    Encoding::Cl100k => bpe_openai::cl100k_base(),
                };
                b.iter(|| tok.count(black_box(t.as_str())))
            });
        }
        group.finish();
    }
}

/// Every file under `dir` (with extension `ext`, if given), in path order, concatenated.
fn read_tree(dir: &std::path::Path, ext: Option<&str>) -> String {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)) {
                paths.push(p);
            }
        }
    }
    paths.sort();
    paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect()
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn multilingual(len: usize) -> String {
    const SENTENCES: &[&str] = &[
        "Der schnelle braune Fuchs springt über den faulen Hund, während es draußen regnet.",
        "Le système de facturation réserve le budget avant d'envoyer la requête au fournisseur.",
        "El límite mensual se restablece el primer día de cada mes a medianoche, hora local.",
        "Быстрая коричневая лиса перепрыгивает через ленивую собаку в тёмном лесу.",
        "東京の天気は晴れのち曇り、最高気温は二十三度の予想です。",
        "这个网关在请求到达模型提供商之前检查每个调用者的配额和预算。",
        "오늘 회의는 오후 세 시에 시작하며 예산 검토가 주요 안건입니다.",
        "الطقس اليوم مشمس مع بعض السحب، ودرجة الحرارة العظمى ٢٣ درجة.",
        "मौसम आज साफ़ रहेगा और शाम को हल्की बारिश हो सकती है।",
        "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
        "Szybki brązowy lis przeskakuje nad leniwym psem — naprawdę! 🦊🐕",
    ];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut out = String::with_capacity(len + 256);
    while out.len() < len {
        out.push_str(SENTENCES[(xorshift(&mut state) % SENTENCES.len() as u64) as usize]);
        out.push(if xorshift(&mut state).is_multiple_of(5) {
            '\n'
        } else {
            ' '
        });
    }
    out
}

fn json_ids(len: usize) -> String {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut out = String::with_capacity(len + 256);
    while out.len() < len {
        let (a, b, n) = (
            xorshift(&mut state),
            xorshift(&mut state),
            xorshift(&mut state),
        );
        out.push_str(&format!(
            "{{\"id\":\"req_{a:016x}{b:08x}\",\"ts\":\"2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z\",\"tokens\":{},\"cost_usd\":\"0.{:06}\",\"status\":\"ok\"}}\n",
            1 + n % 28,
            n % 24,
            (n >> 8) % 60,
            (n >> 16) % 60,
            (n >> 24) % 1000,
            (n >> 32) % 100_000,
            (n >> 40) % 1_000_000,
        ));
    }
    out
}

criterion_group!(benches, count_throughput);
criterion_main!(benches);
