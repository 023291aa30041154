//! Input-token estimation (SPEC §4 step 2).
//!
//! This module owns every rule that turns a parsed request body into the number of input
//! tokens the provider will bill for it. It is pure and synchronous: no I/O, no locks after
//! the first use, no panics on any JSON shape.
//!
//! Counting itself — the vocabularies, the model → encoding table and [`count`] — is the
//! workspace crate `tollgate-tokens` (`crates/tokens`), re-exported here; the mock upstream
//! counts its usage numbers through the same crate. Its docs cover the tokenizer, its
//! accuracy against tiktoken-rs and its speed.
//!
//! # Where to run it
//!
//! Everything here is CPU-bound. The caller runs estimates on request bodies larger than
//! [`SPAWN_BLOCKING_ABOVE_BYTES`] on `tokio::task::spawn_blocking`; smaller bodies finish in
//! well under the ~100 µs a reactor task may run without yielding.
//!
//! # Billing is not additive
//!
//! BPE merges across any boundary, so counting stream deltas one by one and summing them
//! overcounts (each cut can split a token in two). [`count`] takes the whole text only; the
//! stream meter accumulates text and counts it once at the end.

mod estimate;
mod media;

pub use estimate::{
    ANTHROPIC_TOOL_SYSTEM_AUTO, ANTHROPIC_TOOL_SYSTEM_FORCED, REPLY_PRIMING, TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME, TOOL_CALL_OVERHEAD, TOOL_OVERHEAD, TOOLS_OVERHEAD, anthropic_messages_input,
    openai_chat_input, openai_completions_input, openai_embeddings_input, openai_responses_input,
    unseen_input,
};
pub use tollgate_tokens::{Accuracy, Encoding, count, encoding_for_model, warm};

/// Request bodies above this size should be estimated on `spawn_blocking`.
///
/// Why 4 KiB: `benches/estimate.rs` measured (release build, 2 shared cores) counting at
/// 50–180 MiB/s (code slowest, English fastest) and a whole 4 KiB chat request's estimate at
/// ~20 µs. At the slowest rate 4 KiB costs ~80 µs, about the most a reactor task should run
/// between yields; below it the hand-off to the blocking pool (tens of µs) would cost as
/// much as the work.
pub const SPAWN_BLOCKING_ABOVE_BYTES: usize = 4 * 1024;

#[cfg(test)]
mod tests;
