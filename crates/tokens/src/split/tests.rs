//! Every cut of the hand scanner against bpe-openai's regex (which its own tests hold equal
//! to tiktoken's), and the cached count against the plain sum of BPE counts.

use proptest::prelude::*;

use super::{CACHED_LEN, SLOTS, Splitter, count};
use crate::Encoding;

const ENCODINGS: [Encoding; 2] = [Encoding::O200k, Encoding::Cl100k];

fn regex_pieces(enc: Encoding, text: &str) -> Vec<&str> {
    enc.tokenizer().split(text).collect()
}

fn check(enc: Encoding, text: &str) {
    let ours: Vec<&str> = Splitter::new(enc, text).collect();
    assert_eq!(ours, regex_pieces(enc, text), "{enc:?} {text:?}");
}

/// All strings of length 1..=`max` over `alphabet`.
fn every_string(alphabet: &[char], max: usize, mut f: impl FnMut(&str)) {
    let mut idx: Vec<usize> = Vec::new();
    let mut s = String::new();
    for len in 1..=max {
        idx.clear();
        idx.resize(len, 0);
        loop {
            s.clear();
            s.extend(idx.iter().map(|&i| alphabet[i]));
            f(&s);
            // Next combination, odometer style.
            let mut k = 0;
            while k < len {
                idx[k] += 1;
                if idx[k] < alphabet.len() {
                    break;
                }
                idx[k] = 0;
                k += 1;
            }
            if k == len {
                break;
            }
        }
    }
}

#[test]
fn cuts_match_the_regex_on_every_short_ascii_string() {
    // One of each class the rules distinguish, plus the characters rules look at by value
    // (the contraction letters, `'`, `/`) and the white space outside ` `/`\t`/`\r\n`.
    let alphabet = [
        'a', 'Z', 's', 'L', 'e', '7', ' ', '\t', '\n', '\r', '\'', '/', '.', '\u{b}', '\u{1c}',
    ];
    let mut n = 0;
    every_string(&alphabet, 5, |s| {
        for enc in ENCODINGS {
            check(enc, s);
        }
        n += 1;
    });
    assert!(n > 750_000, "{n}");
}

#[test]
fn cuts_match_the_regex_where_ascii_meets_other_characters() {
    // Non-ASCII letters of each kind, a combining mark, digits of other scripts, white space
    // beyond ASCII, a symbol, a character that folds to `s`, and an emoji.
    let alphabet = [
        'a', 'Q', '4', ' ', '\n', '\'', '/', '-', 'é', 'É', 'ſ', '\u{301}', '٣', '²', '\u{a0}',
        '\u{85}', '—', '日', '😀', 'ǅ',
    ];
    every_string(&alphabet, 4, |s| {
        for enc in ENCODINGS {
            check(enc, s);
        }
    });
}

#[test]
fn cuts_match_the_regex_on_real_text() {
    let texts = [
        "Hello, world! It's a fine day; we'll see what THEY'RE doing in 2024-11-22.",
        "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
        "  leading and trailing  \n\n\t\n   ",
        "http://example.com/a/b//c?q=1&r=2 // comment\r\n/* block */",
        "Ünïcödé ÀÉÎÕÜ façade naïve coöperate — “quotes” ‘single’ …",
        "日本語のテキストと English が混ざった文章。中文也可以。한국어도.",
        "مرحبا بالعالم ١٢٣٤٥ שלום עולם",
        "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇯🇵",
        "NBSP\u{a0}here and\u{2003}em-space, line\u{2028}separator",
        "I'M SHOUTING AND I'LL KEEP IT'S UP; don'T stop'S",
    ];
    for t in texts {
        for enc in ENCODINGS {
            check(enc, t);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn cuts_match_the_regex_on_arbitrary_strings(text in any::<String>()) {
        for enc in ENCODINGS {
            let ours: Vec<&str> = Splitter::new(enc, &text).collect();
            prop_assert_eq!(ours, regex_pieces(enc, &text));
        }
    }

    #[test]
    fn cuts_match_the_regex_on_mostly_ascii_strings(
        text in "[a-zA-Z0-9 \t\r\n'/.,;:!?()\\[\\]{}<>\"#_=+*&^%$@~`|\\\\-]{0,80}(\u{a0}|é|ſ|K|\u{301}|日|😀)?[a-zA-Z0-9 \t\n'/.-]{0,40}"
    ) {
        for enc in ENCODINGS {
            let ours: Vec<&str> = Splitter::new(enc, &text).collect();
            prop_assert_eq!(ours, regex_pieces(enc, &text));
        }
    }
}

/// The count without the cache, straight from bpe-openai.
fn plain_count(enc: Encoding, text: &str) -> usize {
    enc.tokenizer().count(text)
}

#[test]
fn cached_counts_equal_plain_counts_through_collisions_and_both_encodings() {
    // Far more distinct short pieces than slots, so slots are overwritten many times, with
    // both encodings sharing the table, and every length up to the cached maximum and past it.
    let mut words = Vec::new();
    for i in 0..(SLOTS * 4) {
        let len = 1 + i % (CACHED_LEN + 3);
        let w: String = (0..len)
            .map(|j| (b'a' + ((i * 7 + j * 13) % 26) as u8) as char)
            .collect();
        words.push(w);
    }
    let text = words.join(" ");
    for _ in 0..2 {
        for enc in ENCODINGS {
            assert_eq!(count(enc, &text), plain_count(enc, &text), "{enc:?}");
        }
    }
    // The same piece under the two encodings can count differently; the slot remembers which.
    for word in ["indivisibility", " antidisestablishment", " 鼠标垫"] {
        for _ in 0..3 {
            for enc in ENCODINGS {
                assert_eq!(count(enc, word), plain_count(enc, word), "{enc:?} {word}");
            }
        }
    }
}
