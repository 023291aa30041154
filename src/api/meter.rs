//! Response metering: reads an upstream response as it streams to the client and reports the
//! token usage and output text, per wire format (SPEC §4 step 5).
//!
//! [`Meter`] is fed each upstream body chunk from the proxy's synchronous body filter and returns
//! what the client must receive. It never decompresses (the proxy asks upstream for identity
//! encoding) and never rewrites: the returned bytes are the input bytes, zero-copy, with one
//! exception — when the proxy injected `stream_options.include_usage` into an OpenAI chat or
//! completions request the client did not make, the extra usage event is cut out (`hide` mode).
//!
//! Streams go through [`SseParser`]; each event's JSON is walked by the selectors of the
//! `select` submodule, which copy only the wanted strings into the output text, so metering a
//! chunk builds no JSON tree. Non-stream bodies (and embeddings, which never stream) are kept as
//! reference-counted chunks and parsed once in [`Meter::finish`].
//!
//! Every usage field that changes the bill is read, per format (SPEC §4):
//!
//! | field | OpenAI chat / completions | OpenAI Responses | Anthropic Messages |
//! |---|---|---|---|
//! | input, output | `prompt_tokens`, `completion_tokens` | `input_tokens`, `output_tokens` | `input_tokens` + cache reads + cache writes, `output_tokens` (last `message_delta`) |
//! | cache reads | `prompt_tokens_details.cached_tokens` | `input_tokens_details.cached_tokens` | `cache_read_input_tokens` |
//! | cache writes | `prompt_tokens_details.cache_write_tokens` | `input_tokens_details.cache_write_tokens` | `cache_creation_input_tokens` |
//! | long-lived writes | `…cache_write_tokens_details.ttl_12h_tokens` | same | `cache_creation.ephemeral_1h_input_tokens` |
//! | audio | `prompt_tokens_details` / `completion_tokens_details` `.audio_tokens` | same | — |
//! | reasoning | `completion_tokens_details.reasoning_tokens` | `output_tokens_details.reasoning_tokens` | `output_tokens_details.thinking_tokens` |
//! | web searches | — | `web_search_call` output items not `failed` (stream: `response.output_item.done`, then the terminal event's `output`) | `server_tool_use.web_search_requests` |
//! | service tier | top-level `service_tier` (every chunk) | `response.service_tier` | `usage.service_tier` |
//! | speed, region | — | — | `usage.speed`, `usage.inference_geo` |
//!
//! Reported names are copied once per response (a chat stream repeats `service_tier` on every
//! chunk; it is compared, not copied again), so metering a chunk allocates nothing new.
//!
//! Bounds, so memory per request stays bounded whatever the upstream sends:
//! - [`MAX_OUTPUT_TEXT`] (16 MiB) of collected output text; past it the text is cut and
//!   `output_text_truncated` is set, so a token count made from it is a lower bound.
//! - [`MAX_BUFFERED_BODY`] (32 MiB) of non-stream body; past it buffering stops and the report
//!   carries no usage (the proxy then estimates).
//! - [`MAX_EVENT_LEN`] (16 MiB) per SSE line and per event's data; an OpenAI Responses
//!   `response.completed` event repeats the whole output, so this must exceed the largest output.
//!   A longer event is dropped and counted in `parse_errors`.
//! - In hide mode at most [`HIDE_HOLD_LIMIT`] (64 KiB) of an incomplete event is held back. A
//!   usage event is a few hundred bytes, so a larger event cannot be it and is released at once.

mod select;

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use self::select::{Envelope, Nested, OnStr, Sel, Select, TextSink, parse_with, store_label};
use super::sse::{SseEvent, SseParser};
use super::{ApiFormat, Modifiers, Usage};

/// Cap on collected output text, in bytes.
pub const MAX_OUTPUT_TEXT: usize = 16 << 20;
/// Cap on a buffered non-stream body, in bytes.
pub const MAX_BUFFERED_BODY: usize = 32 << 20;
/// Cap on one SSE line and on one event's data, in bytes.
pub const MAX_EVENT_LEN: usize = 16 << 20;
/// Cap on the bytes of one incomplete event held back in hide mode.
pub const HIDE_HOLD_LIMIT: u64 = 64 << 10;

/// What the meter learned about one response.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MeterReport {
    /// Usage as reported by the upstream, normalised to our semantics; fields the upstream did
    /// not report are 0.
    pub usage: Usage,
    /// The upstream reported input tokens (`usage.input_tokens` and the cache fields are exact).
    pub input_reported: bool,
    /// The upstream reported final output tokens. For Anthropic streams this needs a
    /// `message_delta`: the `output_tokens` in `message_start` is only a running count.
    /// Embeddings have no output, so it is set together with `input_reported`.
    pub output_reported: bool,
    /// Text, tool-call arguments and reasoning/thinking text seen, concatenated, for counting
    /// output tokens when `output_reported` is false. At most [`MAX_OUTPUT_TEXT`] bytes.
    pub output_text: String,
    /// `output_text` hit its cap; a count made from it is a lower bound.
    pub output_text_truncated: bool,
    /// The format's terminal event was seen (`[DONE]`, `response.completed|incomplete|failed`,
    /// `message_stop`), or for a non-stream response, the complete body parsed as JSON.
    pub finished: bool,
    /// The upstream reported an error: a mid-stream error event, `response.failed`, or an
    /// `error` object in a non-stream body.
    pub upstream_error: bool,
    /// Events or bodies that could not be read: SSE events over [`MAX_EVENT_LEN`], event data
    /// that was not valid JSON, a non-stream body over [`MAX_BUFFERED_BODY`] or not valid JSON.
    pub parse_errors: u32,
    /// The stream showed the model reasoning (OpenAI Responses `response.reasoning…`
    /// events): output the meter cannot count exactly was produced.
    pub reasoning_seen: bool,
}

/// Per-request response meter; see the module docs.
///
/// ```text
/// let mut meter = Meter::new(ApiFormat::OpenAiChat, true, injected_include_usage);
/// for each upstream chunk:  send(meter.feed(chunk))
/// at end of response:       let (rest, report) = meter.finish(); send(rest)
/// ```
#[derive(Debug)]
pub struct Meter {
    state: State,
    body: Body,
    report: Option<MeterReport>,
}

#[derive(Debug)]
enum Body {
    Sse {
        parser: SseParser,
        hide: Option<Hide>,
    },
    Buffered {
        chunks: Vec<Bytes>,
        len: usize,
        over_limit: bool,
    },
}

impl Meter {
    /// A meter for one response. `stream` is whether the response is an event stream (the
    /// request asked for `stream: true`; embeddings are always read as one JSON body).
    /// `hide_usage_chunk` removes the `include_usage` event from OpenAI chat and completions
    /// streams; it is ignored for other formats and for non-stream responses.
    pub fn new(format: ApiFormat, stream: bool, hide_usage_chunk: bool) -> Meter {
        let stream = stream && format != ApiFormat::OpenAiEmbeddings;
        let hide = hide_usage_chunk
            && stream
            && matches!(format, ApiFormat::OpenAiChat | ApiFormat::OpenAiCompletions);
        let body = if stream {
            Body::Sse {
                parser: SseParser::new(MAX_EVENT_LEN),
                hide: hide.then(Hide::default),
            }
        } else {
            Body::Buffered {
                chunks: Vec::new(),
                len: 0,
                over_limit: false,
            }
        };
        Meter {
            state: State {
                format,
                usage: UsageAcc::default(),
                sink: TextSink::new(MAX_OUTPUT_TEXT),
                finished: false,
                upstream_error: false,
                parse_errors: 0,
                reasoning_seen: false,
            },
            body,
            report: None,
        }
    }

    /// Meters one upstream chunk and returns what the client receives for it: the same bytes
    /// (the same `Bytes`, no copy), except in hide mode, where the bytes of an event still
    /// incomplete at the chunk's end are held back until it completes, and the usage event is
    /// left out. After [`Meter::finish`] chunks pass through unmetered.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.report.is_some() {
            return chunk;
        }
        let state = &mut self.state;
        match &mut self.body {
            Body::Sse { parser, hide: None } => {
                parser.feed(&chunk, &mut |ev| {
                    state.on_event(&ev);
                });
                chunk
            }
            Body::Sse {
                parser,
                hide: Some(hide),
            } => {
                let chunk_start = parser.position();
                hide.parse(parser, state, |p, cb| p.feed(&chunk, cb));
                let boundary = hide.boundary(parser);
                hide.release(chunk, chunk_start, boundary)
            }
            Body::Buffered {
                chunks,
                len,
                over_limit,
            } => {
                if !*over_limit {
                    if *len + chunk.len() > MAX_BUFFERED_BODY {
                        *over_limit = true;
                        *chunks = Vec::new();
                    } else {
                        *len += chunk.len();
                        chunks.push(chunk.clone());
                    }
                }
                chunk
            }
        }
    }

    /// Ends the response: returns the bytes still held back (empty unless in hide mode) and the
    /// report. An event not closed by its blank line is discarded, as a client would (see
    /// [`SseParser::finish`]). Calling it again returns empty bytes and the same report.
    pub fn finish(&mut self) -> (Bytes, MeterReport) {
        if let Some(report) = &self.report {
            return (Bytes::new(), report.clone());
        }
        let state = &mut self.state;
        let rest = match &mut self.body {
            Body::Sse { parser, hide } => {
                let rest = match hide {
                    None => {
                        parser.finish(&mut |ev| {
                            state.on_event(&ev);
                        });
                        Bytes::new()
                    }
                    Some(hide) => {
                        hide.parse(parser, state, |p, cb| {
                            p.finish(cb);
                        });
                        let end = parser.position();
                        hide.release(Bytes::new(), end, end)
                    }
                };
                let overflows = u32::try_from(parser.overflows()).unwrap_or(u32::MAX);
                state.parse_errors = state.parse_errors.saturating_add(overflows);
                rest
            }
            Body::Buffered {
                chunks, over_limit, ..
            } => {
                if *over_limit {
                    state.parse_errors += 1;
                } else {
                    let body = concat(std::mem::take(chunks));
                    state.whole_body(&body);
                }
                Bytes::new()
            }
        };
        let report = state.report();
        self.report = Some(report.clone());
        (rest, report)
    }
}

fn concat(chunks: Vec<Bytes>) -> Bytes {
    if chunks.len() == 1 {
        return chunks.into_iter().next().unwrap_or_default();
    }
    let mut all = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for c in &chunks {
        all.extend_from_slice(c);
    }
    all.freeze()
}

/// Hide-mode state: bytes held back from the client and the event ranges to leave out.
#[derive(Debug, Default)]
struct Hide {
    /// Stream bytes `[held_start, parser position)` not yet released.
    held: BytesMut,
    held_start: u64,
    /// Usage events to cut, as stream ranges, in order, all at or after `held_start`.
    drops: Vec<(u64, u64)>,
}

impl Hide {
    /// Runs the parser (feed or finish) and records usage events that are still fully held.
    fn parse<F>(&mut self, parser: &mut SseParser, state: &mut State, run: F)
    where
        F: FnOnce(&mut SseParser, &mut dyn FnMut(SseEvent<'_>)),
    {
        let held_start = self.held_start;
        let drops = &mut self.drops;
        run(parser, &mut |ev: SseEvent<'_>| {
            // An event that began before `held_start` was partly released already (it outgrew
            // the hold limit) and can no longer be cut.
            if state.on_event(&ev) && ev.start >= held_start {
                drops.push((ev.start, ev.end));
            }
        });
    }

    /// How far the client may be sent: up to the start of the event still being assembled,
    /// or everything if that event has outgrown the hold limit.
    fn boundary(&self, parser: &SseParser) -> u64 {
        let end = parser.position();
        if end - parser.block_start() > HIDE_HOLD_LIMIT {
            end
        } else {
            parser.block_start().max(self.held_start)
        }
    }

    /// Appends `chunk` (starting at stream offset `chunk_start`) and releases the bytes before
    /// `boundary`, minus the recorded drops.
    fn release(&mut self, chunk: Bytes, chunk_start: u64, boundary: u64) -> Bytes {
        if self.held.is_empty() && self.drops.is_empty() {
            // Usual case: nothing held over, nothing to cut. Offsets are within the chunk.
            let cut = (boundary.saturating_sub(chunk_start) as usize).min(chunk.len());
            self.held.extend_from_slice(&chunk[cut..]);
            self.held_start = chunk_start + cut as u64;
            return if cut == chunk.len() {
                chunk
            } else {
                chunk.slice(..cut)
            };
        }
        self.held.extend_from_slice(&chunk);
        let cut = (boundary.saturating_sub(self.held_start) as usize).min(self.held.len());
        let ready = self.held.split_to(cut).freeze();
        let base = self.held_start;
        self.held_start = base + cut as u64;
        if self.drops.is_empty() {
            return ready;
        }
        let mut out = BytesMut::with_capacity(ready.len());
        let mut at = 0;
        for &(start, end) in &self.drops {
            let start = ((start - base) as usize).clamp(at, ready.len());
            let end = ((end - base) as usize).clamp(start, ready.len());
            out.extend_from_slice(&ready[at..start]);
            at = end;
        }
        out.extend_from_slice(&ready[at..]);
        self.drops.clear();
        out.freeze()
    }
}

/// Usage fields as reported, before normalisation.
#[derive(Debug, Default)]
struct UsageAcc {
    /// OpenAI: all input. Anthropic: uncached input only (`input_tokens`).
    input: Option<u64>,
    cached: Option<u64>,
    /// All cache writes, whatever their lifetime.
    cache_write: Option<u64>,
    /// The long-lifetime part of `cache_write` (Anthropic 1 hour, OpenAI 12 hours).
    cache_write_1h: Option<u64>,
    audio_input: Option<u64>,
    output: Option<u64>,
    reasoning: Option<u64>,
    audio_output: Option<u64>,
    /// Anthropic `server_tool_use.web_search_requests`; OpenAI's calls are counted in the
    /// text sink as output items.
    tool_calls: Option<u64>,
    served: Modifiers,
}

#[derive(Debug, Deserialize)]
struct OpenAiUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<InputDetails>,
    completion_tokens_details: Option<OutputDetails>,
}

#[derive(Debug, Deserialize)]
struct ResponsesUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<InputDetails>,
    output_tokens_details: Option<OutputDetails>,
}

/// OpenAI `prompt_tokens_details` (chat) and `input_tokens_details` (Responses): parts of
/// the input count.
#[derive(Debug, Deserialize)]
struct InputDetails {
    cached_tokens: Option<u64>,
    cache_write_tokens: Option<u64>,
    cache_write_tokens_details: Option<WriteDetails>,
    audio_tokens: Option<u64>,
}

/// Cache writes by retention.
#[derive(Debug, Deserialize)]
struct WriteDetails {
    ttl_30m_tokens: Option<u64>,
    ttl_12h_tokens: Option<u64>,
}

/// OpenAI `completion_tokens_details` / `output_tokens_details`: parts of the output count.
#[derive(Debug, Deserialize)]
struct OutputDetails {
    reasoning_tokens: Option<u64>,
    audio_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct AnthropicUsage {
    input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
    output_tokens: Option<u64>,
    output_tokens_details: Option<ThinkingDetails>,
    server_tool_use: Option<ServerToolUse>,
    service_tier: Option<LabelText>,
    speed: Option<LabelText>,
    inference_geo: Option<LabelText>,
}

/// Anthropic `usage.cache_creation`: cache writes by lifetime.
#[derive(Debug, Deserialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ThinkingDetails {
    thinking_tokens: Option<u64>,
}

/// Anthropic `usage.server_tool_use`: calls of server-side tools; web searches are billed.
#[derive(Debug, Deserialize)]
struct ServerToolUse {
    web_search_requests: Option<u64>,
}

/// A reported name read leniently: a string, or nothing for any other JSON type (a provider
/// retyping it must not cost us the usage numbers beside it).
#[derive(Debug, Default)]
struct LabelText(Option<String>);

impl<'de> Deserialize<'de> for LabelText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OnStr(|v: &str| LabelText(Some(v.to_owned()))))
    }
}

#[derive(Debug, Deserialize)]
struct AnthropicMessageStart {
    message: Option<AnthropicUsageHolder>,
}

#[derive(Debug, Deserialize)]
struct AnthropicUsageHolder {
    usage: Option<AnthropicUsage>,
}

/// The `type` field, read when an event has no `event:` line.
#[derive(Debug, Deserialize)]
struct TypeField<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
}

impl UsageAcc {
    fn openai(&mut self, u: OpenAiUsage, embeddings: bool) {
        self.input = u.prompt_tokens.or(self.input);
        self.output = u.completion_tokens.or(self.output);
        self.input_details(u.prompt_tokens_details);
        self.output_details(u.completion_tokens_details);
        if embeddings && self.input.is_some() && self.output.is_none() {
            self.output = Some(0);
        }
    }

    fn responses(&mut self, u: ResponsesUsage) {
        self.input = u.input_tokens.or(self.input);
        self.output = u.output_tokens.or(self.output);
        self.input_details(u.input_tokens_details);
        self.output_details(u.output_tokens_details);
    }

    fn input_details(&mut self, d: Option<InputDetails>) {
        let Some(d) = d else { return };
        self.cached = d.cached_tokens.or(self.cached);
        self.audio_input = d.audio_tokens.or(self.audio_input);
        let split = d.cache_write_tokens_details;
        let long = split.as_ref().and_then(|s| s.ttl_12h_tokens);
        let total = d.cache_write_tokens.or_else(|| {
            split.map(|s| {
                s.ttl_30m_tokens
                    .unwrap_or(0)
                    .saturating_add(s.ttl_12h_tokens.unwrap_or(0))
            })
        });
        self.cache_write = total.or(self.cache_write);
        self.cache_write_1h = long.or(self.cache_write_1h);
    }

    fn output_details(&mut self, d: Option<OutputDetails>) {
        let Some(d) = d else { return };
        self.reasoning = d.reasoning_tokens.or(self.reasoning);
        self.audio_output = d.audio_tokens.or(self.audio_output);
    }

    /// `final_output`: the usage comes from `message_delta` or a whole message, where
    /// `output_tokens` is the cumulative total so far (the last one wins; never summed). In
    /// `message_start` it is a placeholder and is ignored. Every count a `message_delta`
    /// carries is cumulative too and replaces the earlier one; the lifetime split of cache
    /// writes and the reported names come only with `message_start` and are kept.
    fn anthropic(&mut self, u: AnthropicUsage, final_output: bool) {
        self.input = u.input_tokens.or(self.input);
        let split = u.cache_creation;
        let long = split.as_ref().and_then(|s| s.ephemeral_1h_input_tokens);
        let total = u.cache_creation_input_tokens.or_else(|| {
            split.map(|s| {
                s.ephemeral_5m_input_tokens
                    .unwrap_or(0)
                    .saturating_add(s.ephemeral_1h_input_tokens.unwrap_or(0))
            })
        });
        self.cache_write = total.or(self.cache_write);
        self.cache_write_1h = long.or(self.cache_write_1h);
        self.cached = u.cache_read_input_tokens.or(self.cached);
        self.tool_calls = u
            .server_tool_use
            .and_then(|s| s.web_search_requests)
            .or(self.tool_calls);
        for (slot, value) in [
            (&mut self.served.service_tier, u.service_tier),
            (&mut self.served.speed, u.speed),
            (&mut self.served.inference_geo, u.inference_geo),
        ] {
            if let Some(LabelText(Some(v))) = value {
                store_label(slot, &v);
            }
        }
        if final_output {
            self.output = u.output_tokens.or(self.output);
            self.reasoning = u
                .output_tokens_details
                .and_then(|d| d.thinking_tokens)
                .or(self.reasoning);
        }
    }
}

// Selectors: which strings count as output text, per format.
const FUNCTION_ARGS: Sel = Sel::Obj(&[("arguments", Sel::Text)]);
const TOOL_CALL: Sel = Sel::Obj(&[("function", FUNCTION_ARGS)]);
/// A chat `delta` (stream) or `message` (non-stream).
const CHAT_MESSAGE: Sel = Sel::Obj(&[
    ("content", Sel::Text),
    ("reasoning_content", Sel::Text),
    ("reasoning", Sel::Text),
    ("refusal", Sel::Text),
    ("tool_calls", Sel::Each(&TOOL_CALL)),
    ("function_call", FUNCTION_ARGS),
]);
const CHOICE: Sel = Sel::Obj(&[
    ("delta", CHAT_MESSAGE),
    ("message", CHAT_MESSAGE),
    ("text", Sel::Text),
]);
/// Chat, completions and embeddings bodies and chunks.
const OPENAI_TOP: &[(&str, Sel)] = &[("choices", Sel::Each(&CHOICE))];

const RESPONSES_PART: Sel = Sel::Obj(&[("text", Sel::Text), ("refusal", Sel::Text)]);
/// Output items of this type are billed per call (`web_search` fee).
const WEB_SEARCH_CALL: &str = "web_search_call";
/// An item of a Responses `output`: message content, reasoning summary and content, function
/// call arguments, custom tool call input; web search calls counted.
const RESPONSES_ITEM: Sel = Sel::Call {
    kind: WEB_SEARCH_CALL,
    fields: &[
        ("content", Sel::Each(&RESPONSES_PART)),
        ("summary", Sel::Each(&RESPONSES_PART)),
        ("arguments", Sel::Text),
        ("input", Sel::Text),
    ],
};
const RESPONSES_TOP: &[(&str, Sel)] = &[("output", Sel::Each(&RESPONSES_ITEM))];
/// An output item counted, its text not taken (a stream's deltas carried it already).
const COUNTED_ITEM: Sel = Sel::Call {
    kind: WEB_SEARCH_CALL,
    fields: &[],
};
/// The `response` of a terminal stream event: its `output` repeats every item.
const RESPONSES_TERMINAL: &[(&str, Sel)] = &[("output", Sel::Each(&COUNTED_ITEM))];
/// `response.output_item.done`.
const RESPONSES_ITEM_DONE: Sel = Sel::Obj(&[("item", COUNTED_ITEM)]);
/// Every Responses `*.delta` event we collect carries its text in `delta`.
const RESPONSES_DELTA: Sel = Sel::Obj(&[("delta", Sel::Text)]);

/// A whole Anthropic content block. `tool_use.input` is serialised as JSON.
const ANTHROPIC_BLOCK: Sel = Sel::Obj(&[
    ("text", Sel::Text),
    ("thinking", Sel::Text),
    ("input", Sel::Json),
]);
const ANTHROPIC_TOP: &[(&str, Sel)] = &[("content", Sel::Each(&ANTHROPIC_BLOCK))];
/// `content_block_start`: a tool_use block starts with an empty `input` whose real content
/// follows as `input_json_delta`, so only text fields are taken here.
const ANTHROPIC_BLOCK_START: Sel = Sel::Obj(&[(
    "content_block",
    Sel::Obj(&[("text", Sel::Text), ("thinking", Sel::Text)]),
)]);
const ANTHROPIC_DELTA: Sel = Sel::Obj(&[(
    "delta",
    Sel::Obj(&[
        ("text", Sel::Text),
        ("partial_json", Sel::Text),
        ("thinking", Sel::Text),
    ]),
)]);

/// Format-specific reading of events and bodies into usage, text and flags.
#[derive(Debug)]
struct State {
    format: ApiFormat,
    usage: UsageAcc,
    sink: TextSink,
    finished: bool,
    upstream_error: bool,
    parse_errors: u32,
    reasoning_seen: bool,
}

impl State {
    /// Reads one stream event. Returns true for an OpenAI `include_usage` event: usage, no
    /// choices, no error — the event hide mode removes.
    fn on_event(&mut self, ev: &SseEvent<'_>) -> bool {
        match self.format {
            ApiFormat::OpenAiChat | ApiFormat::OpenAiCompletions | ApiFormat::OpenAiEmbeddings => {
                self.openai_chunk(ev.data)
            }
            ApiFormat::OpenAiResponses => {
                self.responses_event(ev);
                false
            }
            ApiFormat::AnthropicMessages => {
                self.anthropic_event(ev);
                false
            }
        }
    }

    fn openai_chunk(&mut self, data: &[u8]) -> bool {
        if data.trim_ascii() == b"[DONE]" {
            self.finished = true;
            return false;
        }
        let envelope = Envelope::<OpenAiUsage>::new(OPENAI_TOP, &mut self.sink)
            .tier(&mut self.usage.served.service_tier);
        match parse_with(data, envelope) {
            Ok(info) => {
                self.upstream_error |= info.error;
                let usage_only = info.usage.is_some() && info.items.unwrap_or(0) == 0;
                if let Some(u) = info.usage {
                    self.usage.openai(u, false);
                }
                usage_only && !info.error
            }
            Err(_) => {
                self.parse_errors += 1;
                false
            }
        }
    }

    /// The event's type: its `event:` line, else the `type` field of its data.
    fn event_kind<'a>(&mut self, ev: &SseEvent<'a>) -> Option<Cow<'a, str>> {
        if let Some(kind) = ev.event {
            return Some(Cow::Borrowed(kind));
        }
        match serde_json::from_slice::<TypeField<'a>>(ev.data) {
            Ok(t) => t.kind,
            Err(_) => {
                self.parse_errors += 1;
                None
            }
        }
    }

    fn select(&mut self, data: &[u8], sel: &'static Sel) {
        let seed = Select {
            sel,
            sink: &mut self.sink,
        };
        if parse_with(data, seed).is_err() {
            self.parse_errors += 1;
        }
    }

    fn responses_event(&mut self, ev: &SseEvent<'_>) {
        let Some(kind) = self.event_kind(ev) else {
            return;
        };
        self.reasoning_seen |= kind.starts_with("response.reasoning");
        match kind.as_ref() {
            "response.output_text.delta"
            | "response.refusal.delta"
            | "response.function_call_arguments.delta"
            | "response.custom_tool_call_input.delta"
            | "response.reasoning_summary_text.delta"
            | "response.reasoning_text.delta" => self.select(ev.data, &RESPONSES_DELTA),
            "response.output_item.done" => self.select(ev.data, &RESPONSES_ITEM_DONE),
            "response.completed" | "response.incomplete" | "response.failed" => {
                self.finished = true;
                self.upstream_error |= kind == "response.failed";
                self.responses_terminal(ev.data);
            }
            "error" => self.upstream_error = true,
            _ => {}
        }
    }

    /// A terminal Responses event: usage, error, the tier served, and the web search calls of
    /// its `output`, which replace the count taken from `response.output_item.done` events
    /// (kept when the event has no `output`).
    fn responses_terminal(&mut self, data: &[u8]) {
        let seen = std::mem::take(&mut self.sink.tool_calls);
        let envelope = Envelope::<ResponsesUsage>::new(RESPONSES_TERMINAL, &mut self.sink)
            .tier(&mut self.usage.served.service_tier);
        let counted = match parse_with(
            data,
            Nested {
                key: "response",
                seed: envelope,
            },
        ) {
            Ok(Some(info)) => {
                self.upstream_error |= info.error;
                if let Some(u) = info.usage {
                    self.usage.responses(u);
                }
                info.items.is_some()
            }
            Ok(None) => false,
            Err(_) => {
                self.parse_errors += 1;
                false
            }
        };
        if !counted {
            self.sink.tool_calls = seen;
        }
    }

    fn anthropic_event(&mut self, ev: &SseEvent<'_>) {
        let Some(kind) = self.event_kind(ev) else {
            return;
        };
        match kind.as_ref() {
            "content_block_delta" => self.select(ev.data, &ANTHROPIC_DELTA),
            "content_block_start" => self.select(ev.data, &ANTHROPIC_BLOCK_START),
            "message_start" => match serde_json::from_slice::<AnthropicMessageStart>(ev.data) {
                Ok(start) => {
                    if let Some(u) = start.message.and_then(|m| m.usage) {
                        self.usage.anthropic(u, false);
                    }
                }
                Err(_) => self.parse_errors += 1,
            },
            "message_delta" => match serde_json::from_slice::<AnthropicUsageHolder>(ev.data) {
                Ok(delta) => {
                    if let Some(u) = delta.usage {
                        self.usage.anthropic(u, true);
                    }
                }
                Err(_) => self.parse_errors += 1,
            },
            "message_stop" => self.finished = true,
            "error" => self.upstream_error = true,
            _ => {}
        }
    }

    /// Reads a complete non-stream body.
    fn whole_body(&mut self, body: &[u8]) {
        let sink = &mut self.sink;
        let ok = match self.format {
            ApiFormat::OpenAiChat | ApiFormat::OpenAiCompletions | ApiFormat::OpenAiEmbeddings => {
                let envelope = Envelope::<OpenAiUsage>::new(OPENAI_TOP, sink)
                    .tier(&mut self.usage.served.service_tier);
                parse_with(body, envelope).map(|info| {
                    if let Some(u) = info.usage {
                        let embeddings = self.format == ApiFormat::OpenAiEmbeddings;
                        self.usage.openai(u, embeddings);
                    }
                    info.error
                })
            }
            ApiFormat::OpenAiResponses => {
                let envelope = Envelope::<ResponsesUsage>::new(RESPONSES_TOP, sink)
                    .tier(&mut self.usage.served.service_tier);
                parse_with(body, envelope).map(|info| {
                    if let Some(u) = info.usage {
                        self.usage.responses(u);
                    }
                    info.error
                })
            }
            ApiFormat::AnthropicMessages => {
                parse_with(body, Envelope::<AnthropicUsage>::new(ANTHROPIC_TOP, sink)).map(|info| {
                    if let Some(u) = info.usage {
                        self.usage.anthropic(u, true);
                    }
                    info.error
                })
            }
        };
        match ok {
            Ok(error) => {
                self.finished = true;
                self.upstream_error |= error;
            }
            Err(_) => self.parse_errors += 1,
        }
    }

    fn report(&mut self) -> MeterReport {
        let u = &self.usage;
        let cached = u.cached.unwrap_or(0);
        let cache_write = u.cache_write.unwrap_or(0);
        let input = match self.format {
            // Anthropic's input_tokens excludes cache reads and writes; ours includes them.
            ApiFormat::AnthropicMessages => u
                .input
                .map(|i| i.saturating_add(cached).saturating_add(cache_write)),
            _ => u.input,
        };
        MeterReport {
            usage: Usage {
                input_tokens: input.unwrap_or(0),
                cached_input_tokens: cached,
                cache_write_tokens: cache_write,
                cache_write_1h_tokens: u.cache_write_1h.unwrap_or(0),
                audio_input_tokens: u.audio_input.unwrap_or(0),
                output_tokens: u.output.unwrap_or(0),
                reasoning_tokens: u.reasoning.unwrap_or(0),
                audio_output_tokens: u.audio_output.unwrap_or(0),
                tool_calls: u.tool_calls.unwrap_or(self.sink.tool_calls),
                served: u.served.clone(),
            },
            input_reported: input.is_some(),
            output_reported: u.output.is_some(),
            output_text: std::mem::take(&mut self.sink.text),
            output_text_truncated: self.sink.truncated,
            finished: self.finished,
            upstream_error: self.upstream_error,
            parse_errors: self.parse_errors,
            reasoning_seen: self.reasoning_seen,
        }
    }
}

/// The format's own error event, sent to end a stream whose upstream failed after the first
/// byte. `None` for embeddings, which never stream. Completions streams use the chat shape.
pub fn failure_event(format: ApiFormat, message: &str) -> Option<Bytes> {
    // A JSON string literal with the message escaped.
    let msg = serde_json::Value::String(message.to_owned()).to_string();
    let event = match format {
        ApiFormat::OpenAiChat | ApiFormat::OpenAiCompletions => format!(
            "data: {{\"error\":{{\"message\":{msg},\"type\":\"api_error\",\"code\":\"upstream_unavailable\"}}}}\n\n"
        ),
        ApiFormat::OpenAiResponses => format!(
            "event: error\ndata: {{\"type\":\"error\",\"code\":\"upstream_unavailable\",\"message\":{msg},\"param\":null}}\n\n"
        ),
        ApiFormat::AnthropicMessages => format!(
            "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"api_error\",\"message\":{msg}}}}}\n\n"
        ),
        ApiFormat::OpenAiEmbeddings => return None,
    };
    Some(Bytes::from(event))
}

#[cfg(test)]
mod tests;
