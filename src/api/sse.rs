//! Incremental Server-Sent Events parser for metering upstream streams.
//!
//! Owns the byte-level SSE grammar (WHATWG HTML §9.2.6 "Interpreting an event stream"): the
//! parser is fed upstream body chunks exactly as they arrive, split anywhere — inside a field,
//! inside a UTF-8 character, between the CR and LF of a CRLF — and hands each complete event to
//! a callback together with the byte range it occupied in the stream. The range lets the meter
//! cut one event out of the client stream without re-serialising anything.
//!
//! Handled: LF, CRLF and lone-CR line endings (mixed freely), one leading BOM, `:` comments,
//! `event:` and multi-line `data:` (lines joined with `\n`), an optional single space after the
//! colon, `id:`/`retry:`/unknown fields (ignored — we never reconnect), dispatch on a blank line.
//!
//! Memory is bounded by `max_len` (constructor argument): a line longer than `max_len` bytes, or
//! an event whose joined `data` would exceed `max_len`, is discarded — the whole event it belongs
//! to is dropped and counted in [`SseParser::overflows`] — and the parser resynchronises at the
//! next blank line. The parser therefore keeps at most about `2 × max_len` bytes (one partial line
//! and one event's data), whatever the upstream sends. An oversized *comment* line is skipped
//! without dropping its event, since comments carry nothing.
//!
//! Allocation: the line, data and event-type buffers are reused across chunks and events, so once
//! they have grown to the stream's largest event, feeding a chunk allocates nothing.
//!
//! Two choices the spec leaves to the implementation, made here so offsets are the same however
//! the input is split:
//! - A blank line ended by a CR that is the last byte fed so far is dispatched only when the next
//!   byte shows whether an LF completes a CRLF (or at [`SseParser::finish`]). The event's `end`
//!   then always includes its full terminator. Real providers end lines with LF or CRLF, so this
//!   delays nothing but a CRLF split exactly between its two bytes, by one chunk.
//! - At end of input, [`SseParser::finish`] follows the spec: an event without its closing blank
//!   line is incomplete and is discarded, never dispatched — a client's SSE library would not
//!   have delivered it either.

use std::borrow::Cow;

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// One dispatched event. Borrows the parser's buffers; copy what you need before the next feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, `None` when absent or empty (the spec's default type `message`).
    pub event: Option<&'a str>,
    /// The `data:` lines joined with `\n` (no trailing newline). Raw bytes: providers send UTF-8
    /// JSON and the JSON parser validates it; use [`SseEvent::data_str`] for text.
    pub data: &'a [u8],
    /// Stream offset of the event's first byte: just after the previous blank line (or the BOM),
    /// so comment lines inside the event block belong to it.
    pub start: u64,
    /// Stream offset just past the terminator of the blank line that dispatched the event.
    pub end: u64,
}

impl<'a> SseEvent<'a> {
    /// `data` as text; invalid UTF-8 becomes U+FFFD as the SSE spec's decoder would do.
    pub fn data_str(&self) -> Cow<'a, str> {
        String::from_utf8_lossy(self.data)
    }
}

/// Incremental SSE parser; see the module docs for the grammar and bounds.
#[derive(Debug)]
pub struct SseParser {
    max_len: usize,
    /// Bytes consumed so far (the stream offset of the next byte fed).
    pos: u64,
    /// Offset where the current, not yet dispatched event block began.
    block_start: u64,
    /// Partial line carried over from the previous chunk (without terminator).
    line: Vec<u8>,
    /// The current line exceeded `max_len`: its remaining bytes are skipped up to its terminator.
    skipping_line: bool,
    /// `data:` values of the current event, each followed by `\n`.
    data: Vec<u8>,
    /// `event:` value of the current event; empty means none.
    event: String,
    /// The current event lost a line or data to the bound; it is dropped at its blank line.
    poisoned: bool,
    /// The last byte consumed was a CR terminator: an LF right after it belongs to it.
    after_cr: bool,
    /// That CR ended a blank line whose dispatch waits for the LF check.
    pending_dispatch: bool,
    /// Bytes of the leading BOM matched so far, or `None` once the stream start is behind us.
    bom_matched: Option<usize>,
    overflows: u64,
}

impl SseParser {
    /// A parser keeping at most `max_len` bytes of one line and `max_len` bytes of one event's
    /// data. `max_len` of 0 is raised to 1.
    pub fn new(max_len: usize) -> SseParser {
        SseParser {
            max_len: max_len.max(1),
            pos: 0,
            block_start: 0,
            line: Vec::new(),
            skipping_line: false,
            data: Vec::new(),
            event: String::new(),
            poisoned: false,
            after_cr: false,
            pending_dispatch: false,
            bom_matched: Some(0),
            overflows: 0,
        }
    }

    /// Total bytes fed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Offset where the event currently being assembled began. Every byte before it belongs to
    /// an event already dispatched (or to blank lines and comments between events).
    pub fn block_start(&self) -> u64 {
        self.block_start
    }

    /// Number of lines or events discarded because they exceeded the length bound.
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Parses `input`, the next bytes of the stream, calling `on_event` for each event completed.
    pub fn feed<F: FnMut(SseEvent<'_>) + ?Sized>(&mut self, mut input: &[u8], on_event: &mut F) {
        if let Some(matched) = self.bom_matched {
            input = self.strip_bom(matched, input);
        }
        while !input.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if input[0] == b'\n' {
                    input = &input[1..];
                    self.pos += 1;
                }
                if self.pending_dispatch {
                    self.pending_dispatch = false;
                    self.end_block(on_event);
                }
                continue;
            }
            let Some(i) = memchr::memchr2(b'\n', b'\r', input) else {
                self.push_partial(input);
                self.pos += input.len() as u64;
                return;
            };
            let mut consumed = i + 1;
            let mut open_cr = false;
            if input[i] == b'\r' {
                match input.get(i + 1) {
                    Some(b'\n') => consumed += 1,
                    Some(_) => {}
                    None => open_cr = true,
                }
            }
            let part = &input[..i];
            self.pos += consumed as u64;
            input = &input[consumed..];
            self.after_cr = open_cr;

            if self.skipping_line {
                self.skipping_line = false;
                self.line.clear();
                continue;
            }
            if self.line.is_empty() {
                if part.is_empty() {
                    if open_cr {
                        self.pending_dispatch = true;
                    } else {
                        self.end_block(on_event);
                    }
                } else if part.len() > self.max_len {
                    self.overflow(part[0]);
                } else {
                    self.field_line(part);
                }
            } else {
                self.push_partial(part);
                if self.skipping_line {
                    self.skipping_line = false;
                    self.line.clear();
                } else {
                    let line = std::mem::take(&mut self.line);
                    self.field_line(&line);
                    self.line = line;
                    self.line.clear();
                }
            }
        }
    }

    /// Ends the stream. Dispatches an event whose blank line was already complete, discards an
    /// incomplete one (spec behaviour, see module docs) and returns whether anything was discarded.
    /// The parser is left empty: bytes fed afterwards parse as a fresh stream (without BOM
    /// handling) continuing at the same offset.
    pub fn finish<F: FnMut(SseEvent<'_>) + ?Sized>(&mut self, on_event: &mut F) -> bool {
        if self.pending_dispatch {
            self.pending_dispatch = false;
            self.end_block(on_event);
        }
        self.after_cr = false;
        let discarded = !self.line.is_empty()
            || self.skipping_line
            || !self.data.is_empty()
            || !self.event.is_empty()
            || self.poisoned
            || matches!(self.bom_matched, Some(n) if n > 0);
        self.line.clear();
        self.skipping_line = false;
        self.data.clear();
        self.event.clear();
        self.poisoned = false;
        self.bom_matched = None;
        self.block_start = self.pos;
        discarded
    }

    /// Consumes a leading BOM, possibly split over several chunks. Returns the rest of the input.
    fn strip_bom<'i>(&mut self, mut matched: usize, mut input: &'i [u8]) -> &'i [u8] {
        while matched < BOM.len() {
            let Some(&b) = input.first() else {
                self.bom_matched = Some(matched);
                return input;
            };
            if b != BOM[matched] {
                // Not a BOM after all: the bytes matched so far are ordinary line content.
                self.bom_matched = None;
                self.push_partial(&BOM[..matched]);
                return input;
            }
            matched += 1;
            input = &input[1..];
            self.pos += 1;
        }
        self.bom_matched = None;
        self.block_start = self.pos;
        input
    }

    /// Appends part of a line that continues in a later chunk, enforcing the line bound.
    fn push_partial(&mut self, part: &[u8]) {
        if self.skipping_line || part.is_empty() {
            return;
        }
        if self.line.len() + part.len() > self.max_len {
            let first = self.line.first().copied().unwrap_or(part[0]);
            self.line.clear();
            self.overflow(first);
            self.skipping_line = true;
        } else {
            self.line.extend_from_slice(part);
        }
    }

    /// Records a line dropped for length. Only a comment can be dropped without losing its event.
    fn overflow(&mut self, first_byte: u8) {
        self.overflows += 1;
        if first_byte != b':' {
            self.poisoned = true;
        }
    }

    /// Interprets one complete, non-empty line.
    fn field_line(&mut self, line: &[u8]) {
        if line[0] == b':' {
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                if self.poisoned {
                    return;
                }
                if self.data.len() + value.len() > self.max_len {
                    self.overflows += 1;
                    self.poisoned = true;
                    self.data.clear();
                    return;
                }
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"event" => {
                self.event.clear();
                self.event.push_str(&String::from_utf8_lossy(value));
            }
            // `id` and `retry` only matter to a reconnecting client; unknown fields are ignored
            // by the spec.
            _ => {}
        }
    }

    /// A blank line: dispatch the event assembled so far, if any, and start a new block.
    fn end_block<F: FnMut(SseEvent<'_>) + ?Sized>(&mut self, on_event: &mut F) {
        let start = self.block_start;
        self.block_start = self.pos;
        if !self.poisoned && !self.data.is_empty() {
            let data = &self.data[..self.data.len() - 1];
            on_event(SseEvent {
                event: (!self.event.is_empty()).then_some(self.event.as_str()),
                data,
                start,
                end: self.pos,
            });
        }
        self.poisoned = false;
        self.data.clear();
        self.event.clear();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An owned copy of an event, for comparing runs.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Owned {
        pub event: Option<String>,
        pub data: Vec<u8>,
        pub start: u64,
        pub end: u64,
    }

    pub(crate) fn parse_chunks(chunks: &[&[u8]], max_len: usize) -> (Vec<Owned>, bool, u64) {
        let mut p = SseParser::new(max_len);
        let mut out = Vec::new();
        let mut cb = |e: SseEvent<'_>| {
            out.push(Owned {
                event: e.event.map(str::to_owned),
                data: e.data.to_vec(),
                start: e.start,
                end: e.end,
            })
        };
        for c in chunks {
            p.feed(c, &mut cb);
        }
        let discarded = p.finish(&mut cb);
        (out, discarded, p.overflows())
    }

    fn parse(input: &[u8]) -> Vec<Owned> {
        parse_chunks(&[input], 1 << 20).0
    }

    fn ev(event: Option<&str>, data: &str, start: u64, end: u64) -> Owned {
        Owned {
            event: event.map(str::to_owned),
            data: data.as_bytes().to_vec(),
            start,
            end,
        }
    }

    #[test]
    fn basic_fields_and_offsets() {
        let input = b"event: ping\ndata: {}\n\ndata:a\ndata:  b\n\n";
        assert_eq!(
            parse(input),
            vec![ev(Some("ping"), "{}", 0, 22), ev(None, "a\n b", 22, 39)]
        );
    }

    #[test]
    fn line_endings_crlf_and_cr() {
        let crlf = b"data: 1\r\n\r\ndata: 2\r\n\r\n";
        assert_eq!(
            parse(crlf),
            vec![ev(None, "1", 0, 11), ev(None, "2", 11, 22)]
        );
        let cr = b"data: 1\r\rdata: 2\r\r";
        assert_eq!(parse(cr), vec![ev(None, "1", 0, 9), ev(None, "2", 9, 18)]);
        // CRLF split between its bytes: same events, same offsets.
        let (split, _, _) = parse_chunks(&[b"data: 1\r\n\r", b"\ndata: 2\r\n\r\n"], 64);
        assert_eq!(split, parse(crlf));
    }

    #[test]
    fn comments_ids_retry_and_unknown_fields_are_ignored() {
        let input = b": keep-alive\nid: 7\nretry: 100\nfoo: bar\ndata\ndata: x\n\n";
        assert_eq!(parse(input), vec![ev(None, "\nx", 0, 53)]);
    }

    #[test]
    fn blank_lines_without_data_dispatch_nothing_but_move_the_block() {
        let input = b"\n\nevent: x\n\n: c\n\ndata: y\n\n";
        assert_eq!(parse(input), vec![ev(None, "y", 17, 26)]);
    }

    #[test]
    fn only_one_space_is_stripped_and_colons_in_values_survive() {
        let input = b"data:   a: b\n\n";
        assert_eq!(parse(input), vec![ev(None, "  a: b", 0, 14)]);
    }

    #[test]
    fn leading_bom_is_skipped_once() {
        let input = b"\xEF\xBB\xBFdata: 1\n\n\xEF\xBB\xBFdata: 2\n\n";
        let evs = parse(input);
        assert_eq!(evs[0], ev(None, "1", 3, 12));
        // A second BOM is content: it makes the field name unknown, so no event.
        assert_eq!(evs.len(), 1);
        // Split inside the BOM.
        let (split, _, _) = parse_chunks(&[b"\xEF", b"\xBB", b"\xBFdata: 1\n\n"], 64);
        assert_eq!(split, vec![ev(None, "1", 3, 12)]);
        // A false start of a BOM is kept as content.
        let (partial, _, _) = parse_chunks(&[b"\xEF\xBB", b"data: 1\n\n"], 64);
        assert!(partial.is_empty());
    }

    #[test]
    fn finish_discards_an_incomplete_event_and_dispatches_a_pending_cr() {
        let (evs, discarded, _) = parse_chunks(&[b"data: 1\n\ndata: 2\n"], 64);
        assert_eq!(evs, vec![ev(None, "1", 0, 9)]);
        assert!(discarded);
        let (evs, discarded, _) = parse_chunks(&[b"data: 1\n\ndata: 2"], 64);
        assert_eq!(evs.len(), 1);
        assert!(discarded);
        let (evs, discarded, _) = parse_chunks(&[b"data: 1\r\r"], 64);
        assert_eq!(evs, vec![ev(None, "1", 0, 9)]);
        assert!(!discarded);
    }

    #[test]
    fn line_bound_drops_the_event_and_recovers() {
        let long = format!("data: {}\n\n", "x".repeat(100));
        let input = format!("data: ok\n\n{long}data: after\n\n");
        // Whole line in one chunk.
        let (evs, _, overflows) = parse_chunks(&[input.as_bytes()], 32);
        assert_eq!(overflows, 1);
        let data: Vec<_> = evs.iter().map(|e| e.data.clone()).collect();
        assert_eq!(data, vec![b"ok".to_vec(), b"after".to_vec()]);
        // Byte by byte: the partial-line path must enforce the same bound.
        let bytes: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        let (evs2, _, overflows2) = parse_chunks(&bytes, 32);
        assert_eq!(overflows2, 1);
        assert_eq!(evs2, evs);
    }

    #[test]
    fn data_bound_applies_to_joined_lines() {
        let mut input = String::new();
        for _ in 0..10 {
            input.push_str("data: 0123456789\n");
        }
        input.push_str("\ndata: next\n\n");
        let (evs, _, overflows) = parse_chunks(&[input.as_bytes()], 50);
        assert_eq!(overflows, 1);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data, b"next");
    }

    #[test]
    fn oversized_comment_does_not_drop_its_event() {
        let input = format!(":{}\ndata: kept\n\n", "c".repeat(100));
        let bytes: Vec<&[u8]> = input.as_bytes().chunks(7).collect();
        let (evs, _, overflows) = parse_chunks(&bytes, 32);
        assert_eq!(overflows, 1);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data, b"kept");
    }

    #[test]
    fn memory_stays_bounded_on_an_endless_line() {
        let mut p = SseParser::new(1024);
        let chunk = vec![b'a'; 4096];
        for _ in 0..1000 {
            p.feed(&chunk, &mut |_| {});
        }
        assert!(p.line.capacity() <= 2048);
        assert!(p.data.capacity() <= 2048);
        assert_eq!(p.overflows(), 1);
        assert_eq!(p.position(), 4096 * 1000);
    }

    #[test]
    fn event_name_utf8_survives_splits() {
        let input = "event: héllo\ndata: ü\n\n".as_bytes();
        for cut in 0..input.len() {
            let (evs, _, _) = parse_chunks(&[&input[..cut], &input[cut..]], 64);
            assert_eq!(evs, vec![ev(Some("héllo"), "ü", 0, input.len() as u64)]);
        }
    }

    /// Builds a stream from lines with a chosen terminator per line, avoiding the one
    /// combination that changes the lines themselves: a CR followed by an empty LF-ended line
    /// reads as one CRLF.
    pub(crate) fn join_lines(lines: &[String], eols: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut prev_cr = false;
        for (i, line) in lines.iter().enumerate() {
            out.extend_from_slice(line.as_bytes());
            let mut eol = eols[i % eols.len()] % 3;
            if prev_cr && line.is_empty() && eol == 0 {
                eol = 2;
            }
            out.extend_from_slice(match eol {
                0 => b"\n".as_slice(),
                1 => b"\r\n",
                _ => b"\r",
            });
            prev_cr = eol == 2;
        }
        out
    }

    pub(crate) fn split_at(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut last = 0;
        for c in cuts {
            out.push(input[last..c].to_vec());
            last = c;
        }
        out.push(input[last..].to_vec());
        out
    }

    fn line_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just(String::new()),
            "[a-z ]{0,6}".prop_map(|v| format!("data:{v}")),
            "[a-zé世🎉 ]{0,8}".prop_map(|v| format!("data: {v}")),
            "[a-z_.]{1,10}".prop_map(|v| format!("event: {v}")),
            Just(": comment".to_owned()),
            Just("id: 1".to_owned()),
            Just("data".to_owned()),
        ]
    }

    proptest! {
        #[test]
        fn any_split_yields_the_same_events(
            lines in proptest::collection::vec(line_strategy(), 0..40),
            eols in proptest::collection::vec(0u8..3, 1..8),
            bom in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..30),
        ) {
            let mut input = if bom { BOM.to_vec() } else { Vec::new() };
            input.extend(join_lines(&lines, &eols));
            let whole = parse_chunks(&[&input], 64);
            let chunks = split_at(&input, &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(parse_chunks(&refs, 64), whole.clone());
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            prop_assert_eq!(parse_chunks(&bytes, 64), whole);
        }

        #[test]
        fn bounded_parser_is_split_invariant_too(
            lines in proptest::collection::vec(line_strategy(), 0..40),
            eols in proptest::collection::vec(0u8..3, 1..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..30),
        ) {
            let input = join_lines(&lines, &eols);
            let whole = parse_chunks(&[&input], 8);
            let chunks = split_at(&input, &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(parse_chunks(&refs, 8), whole);
        }
    }
}
