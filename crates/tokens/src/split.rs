//! Pre-tokenization and per-piece counting for `o200k_base` and `cl100k_base`.
//!
//! BPE never merges across the pieces the pre-tokenizer cuts, so a text's count is the sum
//! of its pieces' counts. bpe-openai cuts with a regular expression (a DFA over tiktoken's
//! pattern); on ordinary text that cut is a third of the whole count, and most pieces are
//! common words whose BPE is done again and again. This module does both cheaper, with the
//! same result:
//!
//! - [`Splitter`] scans ASCII by hand. Every decision it takes looks only at ASCII bytes;
//!   the moment a decision would depend on a byte ≥ 0x80 (a letter, digit, space or mark the
//!   ASCII rules cannot classify) it asks bpe-openai's regex for that one piece instead. The
//!   pattern has no look-behind and its only `$` is the end of the text, so the regex's first
//!   piece of `text[p..]` is the piece at `p` of `text`. The hand rules follow the pattern's
//!   alternatives in order (leftmost-first, greedy), written out below; tests compare every
//!   cut with the regex's on random and exhaustive short inputs.
//! - [`count`] remembers the counts of short pieces per thread in a fixed-size,
//!   direct-mapped table (no allocation per piece, bounded memory, exact: a slot holds the
//!   piece's bytes and is compared in full).
//!
//! The pattern, o200k (cl100k differs where noted):
//!
//! 1. `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
//! 2. `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
//!    (cl100k: first a bare contraction `(?i:'s|'t|'re|'ve|'m|'ll|'d)`, then
//!    `[^\r\n\p{L}\p{N}]?\p{L}+` for both)
//! 3. `\p{N}{1,3}`
//! 4. ` ?[^\s\p{L}\p{N}]+[\r\n/]*` (cl100k: `[\r\n]*`)
//! 5. `\s*[\r\n]+`
//! 6. `\s+$`
//! 7. `\s+(?!\S)` (bpe-openai: `\s+\s` less its last character)
//! 8. `\s+`

use std::cell::RefCell;

use super::Encoding;

/// ASCII byte classes as the pattern sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// `A`–`Z` (`\p{Lu}`).
    Upper,
    /// `a`–`z` (`\p{Ll}`).
    Lower,
    /// `0`–`9` (`\p{N}`).
    Digit,
    /// U+0020, the only character ` ?` matches.
    Space,
    /// `\r` and `\n`.
    Newline,
    /// The rest of ASCII `\s`: tab, vertical tab, form feed.
    Blank,
    /// Neither a letter, a digit nor white space: punctuation, symbols, control characters.
    Other,
    /// A byte of a multi-byte character: the hand rules do not decide here.
    Wide,
    /// Past the end of the text.
    End,
}

const fn class_of(b: u8) -> Class {
    match b {
        b'A'..=b'Z' => Class::Upper,
        b'a'..=b'z' => Class::Lower,
        b'0'..=b'9' => Class::Digit,
        b' ' => Class::Space,
        b'\r' | b'\n' => Class::Newline,
        // White_Space in ASCII: U+0009–U+000D and U+0020 (not U+001C–U+001F).
        b'\t' | 0x0b | 0x0c => Class::Blank,
        0x80..=0xff => Class::Wide,
        _ => Class::Other,
    }
}

static CLASSES: [Class; 256] = {
    let mut t = [Class::Other; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = class_of(i as u8);
        i += 1;
    }
    t
};

#[inline]
fn class(b: &[u8], i: usize) -> Class {
    match b.get(i) {
        Some(&c) => CLASSES[c as usize],
        None => Class::End,
    }
}

/// The hand rules gave up at this piece: ask the regex.
struct Undecided;

type Cut = Result<usize, Undecided>;

/// End of the run of `want` starting at `i`; undecided if the run stops at a wide byte
/// (which might continue it).
#[inline]
fn run(b: &[u8], mut i: usize, want: Class) -> Cut {
    loop {
        match class(b, i) {
            c if c == want => i += 1,
            Class::Wide => return Err(Undecided),
            _ => return Ok(i),
        }
    }
}

/// A contraction (`(?i:'s|'t|'re|'ve|'m|'ll|'d)`) at `i`: its end, `Ok(i)` if there is none.
#[inline]
fn contraction(b: &[u8], i: usize) -> Cut {
    if b.get(i) != Some(&b'\'') {
        return Ok(i);
    }
    let lower = |j: usize| -> Result<Option<u8>, Undecided> {
        match b.get(j) {
            Some(&c) if c >= 0x80 => Err(Undecided), // e.g. U+017F folds to `s`
            Some(&c) => Ok(Some(c.to_ascii_lowercase())),
            None => Ok(None),
        }
    };
    Ok(match lower(i + 1)? {
        Some(b's' | b't' | b'm' | b'd') => i + 2,
        Some(first @ (b'r' | b'v' | b'l')) => {
            let second = if first == b'l' { b'l' } else { b'e' };
            if lower(i + 2)? == Some(second) {
                i + 3
            } else {
                i
            }
        }
        _ => i,
    })
}

/// o200k alternatives 1–2 with the letters starting at `q` (`q = p + 1` after a prefix).
#[inline]
fn o200k_letters(b: &[u8], q: usize) -> Cut {
    let upper_end = run(b, q, Class::Upper)?;
    let lower_end = run(b, upper_end, Class::Lower)?;
    // Alternative 1 needs a lower-case letter after the upper-case run, alternative 2 an
    // upper-case letter; in ASCII the two classes are disjoint, so both end here.
    contraction(b, lower_end)
}

/// cl100k alternative 2 (`\p{L}+`) with the letters starting at `q`.
#[inline]
fn cl100k_letters(b: &[u8], q: usize) -> Cut {
    let mut i = q;
    loop {
        match class(b, i) {
            Class::Upper | Class::Lower => i += 1,
            Class::Wide => return Err(Undecided),
            _ => return Ok(i),
        }
    }
}

/// Alternative 3: one to three digits at `p`.
#[inline]
fn digits(b: &[u8], p: usize) -> Cut {
    let mut i = p + 1;
    while i < p + 3 {
        match class(b, i) {
            Class::Digit => i += 1,
            Class::Wide => return Err(Undecided),
            _ => break,
        }
    }
    Ok(i)
}

/// Alternative 4 with the symbols starting at `q`: the symbol run, then the run of `\r`,
/// `\n` (and `/` for o200k). A wide byte cannot extend the second run, so it ends it.
#[inline]
fn symbols(b: &[u8], q: usize, slash: bool) -> Cut {
    let mut i = run(b, q, Class::Other)?;
    while let Some(&c) = b.get(i) {
        if c == b'\r' || c == b'\n' || (slash && c == b'/') {
            i += 1;
        } else {
            break;
        }
    }
    Ok(i)
}

/// Alternatives 5–8 at `p`, where white space starts and no earlier alternative matched.
#[inline]
fn whitespace(b: &[u8], p: usize) -> Cut {
    let mut i = p;
    let mut last_newline = None;
    loop {
        match class(b, i) {
            Class::Newline => {
                last_newline = Some(i);
                i += 1;
            }
            Class::Space | Class::Blank => i += 1,
            Class::Wide => return Err(Undecided),
            _ => break,
        }
    }
    Ok(if let Some(n) = last_newline {
        n + 1 // 5: `\s*[\r\n]+`, greedy `\s*` backs off to the last newline
    } else if i == b.len() || i - p == 1 {
        i // 6: `\s+$`, or 8: a single white-space character
    } else {
        i - 1 // 7: leave the last one to prefix what follows
    })
}

/// The end of the piece starting at `p < b.len()`, for o200k (`O200K`) or cl100k. A const
/// parameter so each vocabulary gets its own specialised copy on this hot path.
#[inline]
fn piece_end<const O200K: bool>(b: &[u8], p: usize) -> Cut {
    let o200k = O200K;
    // cl100k's first alternative is a bare contraction.
    if !o200k && b[p] == b'\'' {
        let end = contraction(b, p)?;
        if end > p {
            return Ok(end);
        }
    }
    let letters = |q| {
        if o200k {
            o200k_letters(b, q)
        } else {
            cl100k_letters(b, q)
        }
    };
    let c0 = class(b, p);
    match c0 {
        Class::Upper | Class::Lower => letters(p),
        Class::Digit => digits(b, p),
        Class::Newline => whitespace(b, p),
        Class::Space | Class::Blank | Class::Other => match class(b, p + 1) {
            Class::Wide => Err(Undecided),
            Class::Upper | Class::Lower => letters(p + 1),
            c1 => match c0 {
                Class::Other => symbols(b, p, o200k),
                Class::Space if c1 == Class::Other => symbols(b, p + 1, o200k),
                _ => whitespace(b, p),
            },
        },
        Class::Wide | Class::End => Err(Undecided),
    }
}

/// The pieces of a text, as bpe-openai's (and tiktoken's) pre-tokenizer cuts them.
pub struct Splitter<'a> {
    enc: Encoding,
    text: &'a str,
    at: usize,
}

impl<'a> Splitter<'a> {
    pub fn new(enc: Encoding, text: &'a str) -> Self {
        Splitter { enc, text, at: 0 }
    }
}

impl<'a> Iterator for Splitter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let b = self.text.as_bytes();
        let p = self.at;
        if p >= b.len() {
            return None;
        }
        let cut = match self.enc {
            Encoding::O200k => piece_end::<true>(b, p),
            Encoding::Cl100k => piece_end::<false>(b, p),
        };
        let end = match cut {
            Ok(end) if end > p => end,
            // Undecided (or, defensively, an empty cut, which would never advance).
            _ => {
                let rest = &self.text[p..];
                // The pattern matches every character, so the regex always yields a piece;
                // were it ever not to, the rest of the text is one piece (never a panic).
                match self.enc.tokenizer().split(rest).next() {
                    Some(piece) if !piece.is_empty() => p + piece.len(),
                    _ => b.len(),
                }
            }
        };
        // Every hand cut ends on an ASCII byte or the end, so on a char boundary.
        let end = end.min(b.len());
        self.at = end;
        Some(&self.text[p..end])
    }
}

/// Pieces up to this many bytes are cached (longer ones are rare in prose and code).
const CACHED_LEN: usize = 22;
/// Slots per thread, shared by both encodings (28 bytes each: 56 KiB).
const SLOTS: usize = 2048;

#[derive(Clone, Copy)]
struct Slot {
    bytes: [u8; CACHED_LEN],
    /// Length of the piece; 0 marks an empty slot (pieces are never empty).
    len: u8,
    /// The encoding the count is for (0 = o200k, 1 = cl100k).
    enc: u8,
    count: u32,
}

const EMPTY: Slot = Slot {
    bytes: [0; CACHED_LEN],
    len: 0,
    enc: 0,
    count: 0,
};

thread_local! {
    /// Per-thread memo of short pieces' token counts, allocated on a thread's first count.
    static CACHE: RefCell<Option<Box<[Slot]>>> = const { RefCell::new(None) };
}

#[inline]
fn slot_index(enc: u8, key: &[u8; CACHED_LEN], len: usize) -> usize {
    // Three words of the zero-padded piece, mixed with the length: enough spread for a
    // direct-mapped table (a collision only costs a recount).
    let mut h = (len as u64) ^ ((enc as u64) << 8);
    for chunk in key.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    ((h >> 32) as usize) & (SLOTS - 1)
}

/// The number of tokens `text` encodes to with `enc`: the sum of its pieces' counts.
pub fn count(enc: Encoding, text: &str) -> usize {
    let bpe = &enc.tokenizer().bpe;
    let tag = enc as u8;
    CACHE.with(|cell| {
        let Ok(mut guard) = cell.try_borrow_mut() else {
            // Re-entered on this thread (cannot happen today): count uncached.
            return Splitter::new(enc, text)
                .map(|piece| bpe.count(piece.as_bytes()))
                .sum();
        };
        let slots = guard.get_or_insert_with(|| vec![EMPTY; SLOTS].into_boxed_slice());
        let mut total = 0usize;
        for piece in Splitter::new(enc, text) {
            let bytes = piece.as_bytes();
            if bytes.len() > CACHED_LEN {
                total += bpe.count(bytes);
                continue;
            }
            let mut key = [0u8; CACHED_LEN];
            key[..bytes.len()].copy_from_slice(bytes);
            let slot = &mut slots[slot_index(tag, &key, bytes.len())];
            if slot.len as usize == bytes.len() && slot.enc == tag && slot.bytes == key {
                total += slot.count as usize;
            } else {
                let n = bpe.count(bytes);
                *slot = Slot {
                    bytes: key,
                    len: bytes.len() as u8,
                    enc: tag,
                    count: n as u32,
                };
                total += n;
            }
        }
        total
    })
}

#[cfg(test)]
mod tests;
