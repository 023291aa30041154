//! Counts checked against tiktoken-rs (the reference implementation), linear time on
//! adversarial input, and the model → encoding table.

use proptest::prelude::*;
use tiktoken_rs::CoreBPE;

use super::*;

fn reference(enc: Encoding) -> &'static CoreBPE {
    match enc {
        Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
        Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
    }
}

fn tiktoken_count(enc: Encoding, text: &str) -> usize {
    reference(enc).encode_ordinary(text).len()
}

/// A small deterministic generator (xorshift64*), so failures reproduce without a seed file.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Random Unicode scalar values, weighted toward the BMP where most scripts live.
    fn unicode(&mut self, chars: usize) -> String {
        (0..chars)
            .map(|_| {
                let r = self.next();
                let cp = match r % 4 {
                    0 => (r >> 8) % 0x80,
                    1 => (r >> 8) % 0x800,
                    2 => (r >> 8) % 0x1_0000,
                    _ => (r >> 8) % 0x11_0000,
                } as u32;
                char::from_u32(cp).unwrap_or('\u{fffd}')
            })
            .collect()
    }
}

fn corpus() -> Vec<String> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut texts: Vec<String> = [
        "",
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog. It's 12:45 and we've got 3,141,592 items.",
        "I'll've you're they'd WE'LL SHE'S don't can't won't shouldn't've",
        "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
        "def f(a, b):\r\n\treturn a ** b  # trailing spaces   \r\n\r\n\r\n",
        "<html><body><div class=\"x\">&nbsp;</div></body></html>",
        "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id DESC;",
        "日本語のテキストと中文文本，还有한국어 텍스트。",
        "Русский текст с ёлками и ЪЁ; Ελληνικά; עברית; العربية; हिन्दी पाठ",
        "emoji 😀😃😄 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 keycap 1️⃣",
        "e\u{301}te\u{301} combining marks and NFC vs NFD: caf\u{e9} cafe\u{301}",
        "    leading spaces, trailing spaces    ",
        "\n\n\n\n   \n\t\t\n  \u{a0}\u{2003}\u{3000} mixed whitespace \u{2028}\u{2029}\u{85}",
        "numbers 1 12 123 1234 12345 123456 ١٢٣ ४५६ ½ Ⅻ",
        "ALLCAPSRUN THEN lowercase ThenMixedCase camelCaseWord snake_case_word",
        "<|endoftext|> special-token text <|fim_prefix|> treated as ordinary",
        "\u{0}\u{1}\u{7f} control characters \u{feff} BOM \u{200b} zero-width",
        "////// slashes and ----- dashes ===== and ..... dots !!!!! ?????",
        "https://example.com/path?query=value&other=1#frag user@example.com",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.push(" ".repeat(5000));
    texts.push(" ".repeat(4999) + "x");
    texts.push("\n ".repeat(2000));
    texts.push("a".repeat(10_000));
    texts.push("ab".repeat(7_777));
    texts.push("中".repeat(3_000));
    texts.push("😀".repeat(2_000));
    texts.push("!?".repeat(4_000));
    texts.push("AB".repeat(4_000));
    texts.push("0123456789".repeat(500));
    texts.push("Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(300));
    for len in [1, 7, 64, 1000, 20_000] {
        texts.push(String::from_utf8_lossy(&rng.bytes(len)).into_owned());
        texts.push(rng.unicode(len));
    }
    texts
}

#[test]
fn counts_equal_tiktoken_on_a_varied_corpus() {
    for enc in [Encoding::O200k, Encoding::Cl100k] {
        for text in corpus() {
            assert_eq!(
                count(enc, &text),
                tiktoken_count(enc, &text),
                "{} differs on {:?}",
                enc.name(),
                text.chars().take(80).collect::<String>()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn counts_equal_tiktoken_on_arbitrary_strings(text in any::<String>()) {
        for enc in [Encoding::O200k, Encoding::Cl100k] {
            prop_assert_eq!(count(enc, &text), tiktoken_count(enc, &text));
        }
    }

    // Arbitrary strings rarely hit the pre-tokenizer's interesting cases; this alphabet mixes
    // letters of every case class, apostrophes, digits, punctuation and whitespace kinds.
    #[test]
    fn counts_equal_tiktoken_on_tricky_alphabets(
        text in "[aZ'’sStT0-9 \t\r\n\u{a0}!?./中ü\u{301}😀Ǆǅ]{0,300}"
    ) {
        for enc in [Encoding::O200k, Encoding::Cl100k] {
            prop_assert_eq!(count(enc, &text), tiktoken_count(enc, &text));
        }
    }
}

/// 1 MB inputs that defeat pre-tokenization (one piece of 1 MB) or maximise piece count. A
/// quadratic encoder needs ~10^12 steps on the single-piece ones, i.e. hours; a linear one
/// takes tens of milliseconds. Each is checked against tiktoken-rs where it can answer (since
/// 0.12 it merges long pieces with a heap, O(n log n)); on 1 MB of spaces its backtracking
/// regex gives up with a stack-overflow error and `encode_ordinary` panics, one more reason the
/// proxy does not count with it.
#[test]
fn one_megabyte_adversarial_inputs_complete_and_match() {
    const MB: usize = 1 << 20;
    let mut rng = Rng(42);
    let inputs = [
        ("single character run", "a".repeat(MB), true),
        ("whitespace run", " ".repeat(MB), false),
        ("whitespace run then a word", " ".repeat(MB) + "word", false),
        ("no spaces", "abcdefghij".repeat(MB / 10), true),
        ("CJK without punctuation", "中文字".repeat(MB / 9), true),
        ("alternating case pairs", "AB".repeat(MB / 2), true),
        ("random unicode", rng.unicode(MB / 2), true),
    ];
    for (name, text, tiktoken_can) in &inputs {
        assert!(text.len() >= MB * 9 / 10, "{name} is too short");
        for enc in [Encoding::O200k, Encoding::Cl100k] {
            let ours = count(enc, text);
            // No encoding yields more tokens than bytes, and 1 MB never fits in a handful.
            assert!(ours > 100 && ours <= text.len(), "{name}: {ours}");
            if *tiktoken_can {
                assert_eq!(ours, tiktoken_count(enc, text), "{name}");
            }
        }
    }
}

#[test]
fn counting_is_not_additive_over_deltas() {
    // Why the meter must count the whole text: splitting a word mid-token adds tokens.
    let whole = "internationalization";
    let (a, b) = whole.split_at(7);
    assert!(count(Encoding::O200k, a) + count(Encoding::O200k, b) > count(Encoding::O200k, whole));
}

#[test]
fn models_map_to_their_encodings() {
    use Accuracy::*;
    use Encoding::*;
    let cases = [
        ("gpt-4o", O200k, Exact),
        ("gpt-4o-mini-2024-07-18", O200k, Exact),
        ("chatgpt-4o-latest", O200k, Exact),
        ("gpt-4.1-nano", O200k, Exact),
        ("gpt-5", O200k, Exact),
        ("gpt-5.2-codex", O200k, Exact),
        ("o1-preview", O200k, Exact),
        ("o3-mini", O200k, Exact),
        ("o4-mini", O200k, Exact),
        ("GPT-4O", O200k, Exact),
        ("ft:gpt-4o-mini:acme::abc123", O200k, Exact),
        ("openai/gpt-4.1", O200k, Exact),
        ("gpt-4", Cl100k, Exact),
        ("gpt-4-turbo-2024-04-09", Cl100k, Exact),
        ("gpt-3.5-turbo", Cl100k, Exact),
        ("gpt-35-turbo", Cl100k, Exact),
        ("text-embedding-3-small", Cl100k, Exact),
        ("text-embedding-ada-002", Cl100k, Exact),
        ("claude-sonnet-4-5", Cl100k, Approximate),
        ("claude-3-haiku-20240307", Cl100k, Approximate),
        ("llama-3.1-70b", O200k, Approximate),
        ("", O200k, Approximate),
    ];
    for (model, enc, acc) in cases {
        assert_eq!(encoding_for_model(model), (enc, acc), "{model}");
        // Where tiktoken-rs knows the model, we agree with it.
        if let Some(t) = tiktoken_rs::tokenizer::get_tokenizer(model) {
            let expected = match t {
                tiktoken_rs::tokenizer::Tokenizer::O200kBase => Some(O200k),
                tiktoken_rs::tokenizer::Tokenizer::Cl100kBase => Some(Cl100k),
                _ => None,
            };
            assert_eq!(expected, Some(enc), "{model}");
        }
    }
}

#[test]
fn approximate_counts_get_a_third_of_headroom() {
    assert_eq!(Accuracy::Exact.reservation_tokens(1000), 1000);
    assert_eq!(Accuracy::Approximate.reservation_tokens(1000), 1334);
    assert_eq!(Accuracy::Approximate.reservation_tokens(0), 0);
    assert_eq!(Accuracy::Approximate.reservation_tokens(u64::MAX), u64::MAX);
}

#[test]
fn warm_loads_both_vocabularies() {
    warm();
    assert_eq!(count(Encoding::O200k, "hello"), 1);
    assert_eq!(count(Encoding::Cl100k, "hello"), 1);
}
