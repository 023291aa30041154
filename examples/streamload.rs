//! Many concurrent slow streams against one endpoint: time to first byte, the gaps between
//! SSE events as the client sees them, and the resident memory the server under test
//! holds per open stream. The streams phase of `benches/load.sh` runs it against the mock
//! directly, nginx, pingora and tollgate in one run and prints the comparison; this is its
//! client.
//!
//! ```sh
//! cargo build --release --example streamload
//! target/release/examples/streamload --addr 127.0.0.1:8080 --key tg_… \
//!     --streams 5000 --chunks 250 --delay-ms 20 --rss-pids "$(pgrep -f 'tollgate serve')"
//! ```
//!
//! Each stream is its own HTTP/1.1 connection (as SDK clients with one request in flight
//! per connection are), opened over `--ramp-ms` so the listener's accept queue is not the
//! thing measured. A gap is the time between two consecutive SSE events (`\n\n`) of one
//! stream arriving at the client; the mock sends them `--delay-ms` apart, so a gap above
//! that is delay added on the way (or by the machine). Resident memory is sampled from
//! `/proc/<pid>/status` before the first connection and while every stream is open (after
//! each has its first event and before any has ended); the difference over the number of
//! streams is the memory one open stream costs the process.
//!
//! Prints one line of JSON with the results.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// host:port of the server under test.
    #[arg(long)]
    addr: String,
    /// Request path.
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Bearer key sent in `Authorization` (omit for the mock directly).
    #[arg(long)]
    key: Option<String>,
    /// Concurrent streams (one connection each).
    #[arg(long, default_value_t = 5000)]
    streams: usize,
    /// Content chunks per stream (`x-mock-chunks`).
    #[arg(long, default_value_t = 250)]
    chunks: u64,
    /// Delay between chunks at the upstream, in milliseconds (`x-mock-delay-ms`).
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Spread the connection opens over this long.
    #[arg(long, default_value_t = 3000)]
    ramp_ms: u64,
    /// Sample the resident memory of these processes, summed (the server under test).
    #[arg(long, value_delimiter = ',')]
    rss_pids: Vec<u32>,
    /// Give up on a stream after this long.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Name printed in the result line.
    #[arg(long, default_value = "target")]
    label: String,
}

#[derive(Default)]
struct StreamResult {
    /// Request written → response headers.
    ttfb_us: u64,
    /// Request written → first SSE event complete.
    first_event_us: u64,
    /// Gaps between consecutive events, microseconds.
    gaps_us: Vec<u32>,
    events: usize,
    done: bool,
}

fn rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        total += status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())?;
    }
    Some(total)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn one_stream(
    args: Arc<Args>,
    first_events: Arc<AtomicUsize>,
    all_open: Arc<Notify>,
    body: Bytes,
) -> Result<StreamResult> {
    let tcp = TcpStream::connect(&args.addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::post(&args.path)
        .header("host", &args.addr)
        .header("content-type", "application/json")
        .header("x-mock-words", args.chunks.to_string())
        .header("x-mock-chunks", args.chunks.to_string())
        .header("x-mock-delay-ms", args.delay_ms.to_string());
    if let Some(k) = &args.key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(Full::new(body))?;
    let sent = Instant::now();
    let resp = send.send_request(req).await?;
    let mut out = StreamResult {
        ttfb_us: sent.elapsed().as_micros() as u64,
        ..Default::default()
    };
    if resp.status() != 200 {
        bail!("status {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut last: Option<Instant> = None;
    // The last byte of the previous frame was '\n' (an event may end across frames).
    let mut newline_pending = false;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        let mut events = 0usize;
        let mut prev_nl = newline_pending;
        for &b in data.iter() {
            if b == b'\n' {
                if prev_nl {
                    events += 1;
                    prev_nl = false;
                    continue;
                }
                prev_nl = true;
            } else {
                prev_nl = false;
            }
        }
        newline_pending = prev_nl;
        for _ in 0..events {
            match last {
                None => {
                    out.first_event_us = now.duration_since(sent).as_micros() as u64;
                    if first_events.fetch_add(1, Ordering::SeqCst) + 1 == args.streams {
                        all_open.notify_waiters();
                    }
                }
                Some(prev) => out
                    .gaps_us
                    .push(now.duration_since(prev).as_micros() as u32),
            }
            last = Some(now);
            out.events += 1;
        }
    }
    out.done = true;
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let body = Bytes::from(
        serde_json::json!({
            "model": "gpt-4o-mini",
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": args.chunks * 4 + 16,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
        })
        .to_string(),
    );
    let rss_idle = rss_kib(&args.rss_pids);
    let first_events = Arc::new(AtomicUsize::new(0));
    let all_open = Arc::new(Notify::new());
    let started = Instant::now();

    // Sample memory once every stream has its first event (or the stream phase is over).
    let sampler = {
        let args = args.clone();
        let all_open = all_open.clone();
        let notified = all_open.notified_owned();
        tokio::spawn(async move {
            let window = Duration::from_millis(args.ramp_ms + args.delay_ms * args.chunks / 2);
            let reached = tokio::time::timeout(window.max(Duration::from_secs(1)), notified)
                .await
                .is_ok();
            (reached, rss_kib(&args.rss_pids))
        })
    };

    let mut tasks = Vec::with_capacity(args.streams);
    let step = Duration::from_micros(args.ramp_ms * 1000 / args.streams.max(1) as u64);
    let mut tick = tokio::time::interval(step.max(Duration::from_micros(1)));
    for _ in 0..args.streams {
        tick.tick().await;
        let (a, f, n, b) = (
            args.clone(),
            first_events.clone(),
            all_open.clone(),
            body.clone(),
        );
        let limit = Duration::from_secs(args.timeout_s);
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(limit, one_stream(a, f, n, b)).await
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    for t in tasks {
        match t.await {
            Ok(Ok(Ok(r))) => results.push(r),
            Ok(Ok(Err(e))) => *errors.entry(format!("{e:#}")).or_default() += 1,
            Ok(Err(_)) => *errors.entry("timeout".into()).or_default() += 1,
            Err(e) => *errors.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    let (plateau_reached, rss_open) = sampler.await.unwrap_or((false, None));

    let mut gaps: Vec<u64> = results
        .iter()
        .flat_map(|r| r.gaps_us.iter().map(|&g| u64::from(g)))
        .collect();
    gaps.sort_unstable();
    let mut ttfb: Vec<u64> = results.iter().map(|r| r.ttfb_us).collect();
    ttfb.sort_unstable();
    let mut first: Vec<u64> = results.iter().map(|r| r.first_event_us).collect();
    first.sort_unstable();
    let expected_events = args.chunks as usize + 3; // role, content…, finish, usage
    let complete = results
        .iter()
        .filter(|r| r.done && r.events >= expected_events)
        .count();
    let per_stream_bytes = match (rss_idle, rss_open) {
        (Some(a), Some(b)) if plateau_reached => {
            Some((b.saturating_sub(a) * 1024) / args.streams.max(1) as u64)
        }
        _ => None,
    };
    let line = serde_json::json!({
        "label": args.label,
        "streams": args.streams,
        "complete": complete,
        "errors": errors,
        "chunks": args.chunks,
        "delay_ms": args.delay_ms,
        "wall_s": started.elapsed().as_secs_f64(),
        "ttfb_us": {"p50": percentile(&ttfb, 50.0), "p99": percentile(&ttfb, 99.0)},
        "first_event_us": {"p50": percentile(&first, 50.0), "p99": percentile(&first, 99.0)},
        "gap_us": {
            "n": gaps.len(),
            "p50": percentile(&gaps, 50.0),
            "p99": percentile(&gaps, 99.0),
            "p999": percentile(&gaps, 99.9),
            "max": gaps.last().copied().unwrap_or(0),
        },
        "rss_kib": {"idle": rss_idle, "open": rss_open, "all_open_sampled": plateau_reached},
        "rss_per_stream_bytes": per_stream_bytes,
    });
    println!("{line}");
    Ok(())
}
