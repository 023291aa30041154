//! Cost of the embedded quota check: one `reserve` + `settle` pair through
//! `tollgate::quota::memory::MemoryStore` over the three limits a typical key carries
//! (`requests:minute`, `tokens:day`, `usd:month`), with limits far above what the loop
//! uses so every reserve is admitted. Two shapes:
//!
//! * `single` — one task on a current-thread runtime: the uncontended cost of the critical
//!   sections (counter keys, window arithmetic, hold bookkeeping).
//! * `contended/N` — N tasks on a 2-worker runtime (the proxy's default thread count)
//!   hammering the same three counters, so every call fights for the store's one mutex.
//!   The time reported is wall time per pair across all tasks (aggregate throughput),
//!   so it is directly comparable with `single`.
//!
//! Counters are warmed before timing (a counter's first use loads it, here from nothing);
//! the store has no loader, so no call ever waits on I/O.
//!
//! Run: `cargo bench --bench quota -- --warm-up-time 1 --measurement-time 3`

// A benchmark that cannot set itself up or whose limits refuse has nothing to measure:
// failing loudly is the right answer.
#![allow(clippy::expect_used, clippy::panic)]

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tollgate::keys::Subject;
use tollgate::quota::LimitSpec;
use tollgate::quota::memory::MemoryStore;
use tollgate::quota::store::{Amounts, AppliedLimit, QuotaStore, ReserveOutcome, ReserveRequest};

const LIMITS: [&str; 3] = [
    "requests:minute=100000000",
    "tokens:day=100000000000",
    "usd:month=100000000",
];

fn limits() -> Vec<AppliedLimit> {
    LIMITS
        .iter()
        .map(|s| AppliedLimit {
            subject: Subject::Key("k_bench".into()),
            spec: LimitSpec::from_str(s).expect("benchmark limit parses"),
            plan: None,
        })
        .collect()
}

/// A chat request's hold: 1 request, 12 input tokens, 1024 allowed output tokens.
const ESTIMATE: Amounts = Amounts {
    requests: 1,
    input_tokens: 12,
    output_tokens: 1024,
    cost_micros: 617,
};

/// What it actually used.
const ACTUAL: Amounts = Amounts {
    requests: 1,
    input_tokens: 12,
    output_tokens: 27,
    cost_micros: 18,
};

/// One admitted request, settled. Trace ids are unique per call, as in the proxy.
async fn reserve_settle(store: &MemoryStore, limits: &[AppliedLimit], trace_id: String) {
    let req = ReserveRequest {
        trace_id,
        started_at: Utc::now(),
        limits: limits.to_vec(),
        estimate: ESTIMATE,
    };
    match store.reserve(&req).await {
        Ok(ReserveOutcome::Admitted(states)) => {
            std::hint::black_box(states);
        }
        other => panic!("benchmark limits must admit: {other:?}"),
    }
    if let Err(e) = store
        .settle(&req.trace_id, ACTUAL, req.started_at, &[])
        .await
    {
        panic!("settle failed: {e}");
    }
}

fn bench_single(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let store = MemoryStore::new(chrono_tz::UTC, None);
    let limits = limits();
    rt.block_on(reserve_settle(&store, &limits, "warm".into()));
    let mut group = c.benchmark_group("quota");
    group.throughput(Throughput::Elements(1));
    let mut seq = 0u64;
    group.bench_function("single", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..iters {
                    seq += 1;
                    reserve_settle(&store, &limits, format!("t-{seq}")).await;
                }
                t0.elapsed()
            })
        })
    });
    group.finish();
}

fn bench_contended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("tokio runtime");
    let store = Arc::new(MemoryStore::new(chrono_tz::UTC, None));
    let limits = Arc::new(limits());
    rt.block_on(reserve_settle(&store, &limits, "warm".into()));
    let mut group = c.benchmark_group("quota/contended");
    group.throughput(Throughput::Elements(1));
    let mut round = 0u64;
    for tasks in [4u64, 64] {
        group.bench_with_input(BenchmarkId::from_parameter(tasks), &tasks, |b, &tasks| {
            b.iter_custom(|iters| {
                round += 1;
                let per_task = iters.div_ceil(tasks);
                let r = round;
                let elapsed: Duration = rt.block_on({
                    let store = store.clone();
                    let limits = limits.clone();
                    async move {
                        let t0 = Instant::now();
                        let mut set = tokio::task::JoinSet::new();
                        for t in 0..tasks {
                            let store = store.clone();
                            let limits = limits.clone();
                            set.spawn(async move {
                                for i in 0..per_task {
                                    reserve_settle(&store, &limits, format!("c{r}-{t}-{i}")).await;
                                    // Let the other tasks of this worker interleave, as
                                    // requests on one proxy thread do.
                                    tokio::task::yield_now().await;
                                }
                            });
                        }
                        while set.join_next().await.is_some() {}
                        t0.elapsed()
                    }
                });
                // Report per pair actually run (per_task * tasks ≥ iters).
                elapsed.mul_f64(iters as f64 / (per_task * tasks) as f64)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_single, bench_contended);
criterion_main!(benches);
