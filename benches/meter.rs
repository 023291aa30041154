//! Throughput of the response meter (SSE parse + usage/text extraction) on realistic streams:
//! a 200-chunk OpenAI chat stream with the hidden usage event, an OpenAI Responses stream with
//! a web search call, and an Anthropic stream. Events carry the fields current APIs send
//! (`service_tier` on every chat chunk, cache-write splits, server tool counts).
//! Reported as bytes per second of upstream body.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::api::ApiFormat;
use tollgate::api::meter::Meter;

/// One upstream chunk per event, as providers flush them.
fn openai_chat_chunks(n: usize) -> Vec<Bytes> {
    let mut chunks = Vec::with_capacity(n + 2);
    for i in 0..n {
        let text = if i % 7 == 0 { " token\\n" } else { " wörd" };
        chunks.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-B9x\",\"object\":\"chat.completion.chunk\",\"created\":1731000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        )));
    }
    chunks.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-B9x\",\"object\":\"chat.completion.chunk\",\"service_tier\":\"default\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":200,\"total_tokens\":1400,\"prompt_tokens_details\":{\"cached_tokens\":1024,\"cache_write_tokens\":128,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0}}}\n\n"));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    chunks
}

fn anthropic_chunks(n: usize) -> Vec<Bytes> {
    let mut chunks = vec![
        Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":1000,\"cache_read_input_tokens\":3000,\"cache_creation\":{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":1000},\"output_tokens\":1,\"service_tier\":\"standard\",\"inference_geo\":\"global\",\"server_tool_use\":{\"web_search_requests\":0}}}}\n\n"),
        Bytes::from_static(b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"),
    ];
    for i in 0..n {
        let text = if i % 5 == 0 {
            "Bonjour \\\"☀\\\""
        } else {
            " mot"
        };
        chunks.push(Bytes::from(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{text}\"}}}}\n\n"
        )));
    }
    chunks.push(Bytes::from_static(
        b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    ));
    chunks.push(Bytes::from_static(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":1000,\"cache_read_input_tokens\":3000,\"output_tokens\":200,\"server_tool_use\":{\"web_search_requests\":1}}}\n\n"));
    chunks.push(Bytes::from_static(
        b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ));
    chunks
}

fn responses_chunks(n: usize) -> Vec<Bytes> {
    let mut chunks = vec![
        Bytes::from_static(b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-6.1-sol\",\"service_tier\":\"auto\",\"output\":[],\"usage\":null}}\n\n"),
        Bytes::from_static(b"event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"sequence_number\":1,\"output_index\":0,\"item\":{\"type\":\"web_search_call\",\"id\":\"ws_1\",\"status\":\"in_progress\"}}\n\n"),
        Bytes::from_static(b"event: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"sequence_number\":2,\"output_index\":0,\"item\":{\"type\":\"web_search_call\",\"id\":\"ws_1\",\"status\":\"completed\",\"action\":{\"type\":\"search\",\"query\":\"x\"}}}\n\n"),
    ];
    for i in 0..n {
        let text = if i % 7 == 0 { " token\\n" } else { " wörd" };
        chunks.push(Bytes::from(format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{},\"item_id\":\"msg_1\",\"output_index\":1,\"content_index\":0,\"delta\":\"{text}\",\"logprobs\":[]}}\n\n",
            i + 3
        )));
    }
    chunks.push(Bytes::from_static(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":300,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-6.1-sol\",\"service_tier\":\"flex\",\"output\":[{\"type\":\"web_search_call\",\"id\":\"ws_1\",\"status\":\"completed\",\"action\":{\"type\":\"search\",\"query\":\"x\"}},{\"type\":\"message\",\"id\":\"msg_1\",\"role\":\"assistant\",\"status\":\"completed\",\"content\":[{\"type\":\"output_text\",\"text\":\"the whole answer again\",\"annotations\":[]}]}],\"usage\":{\"input_tokens\":5200,\"input_tokens_details\":{\"cached_tokens\":4096,\"cache_write_tokens\":0},\"output_tokens\":350,\"output_tokens_details\":{\"reasoning_tokens\":120},\"total_tokens\":5550}}}\n\n"));
    chunks
}

fn bench_stream(c: &mut Criterion, name: &str, format: ApiFormat, hide: bool, chunks: &[Bytes]) {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("meter");
    group.throughput(Throughput::Bytes(total as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            let mut meter = Meter::new(format, true, hide);
            for chunk in chunks {
                black_box(meter.feed(chunk.clone()));
            }
            black_box(meter.finish())
        })
    });
    group.finish();
}

fn meter_benches(c: &mut Criterion) {
    let chat = openai_chat_chunks(200);
    bench_stream(
        c,
        "openai_chat_200_chunks",
        ApiFormat::OpenAiChat,
        false,
        &chat,
    );
    bench_stream(
        c,
        "openai_chat_200_chunks_hide_usage",
        ApiFormat::OpenAiChat,
        true,
        &chat,
    );
    let responses = responses_chunks(200);
    bench_stream(
        c,
        "openai_responses_200_deltas_web_search",
        ApiFormat::OpenAiResponses,
        false,
        &responses,
    );
    let anthropic = anthropic_chunks(200);
    bench_stream(
        c,
        "anthropic_200_deltas",
        ApiFormat::AnthropicMessages,
        false,
        &anthropic,
    );
}

criterion_group!(benches, meter_benches);
criterion_main!(benches);
