//! Shared-mode journal and shipper throughput, against a private PostgreSQL (started here
//! with initdb/pg_ctl in a temp dir, like the integration tests; fsync off, synchronous
//! commit on).
//!
//! 1. Journal append cost: one task appending sequentially (latency per event, no group
//!    commit), then `EVENTS` events (reserve + settle pairs) from 256 concurrent tasks
//!    (group commit) — what the request path pays.
//! 2. Replay: ship the whole backlog to Postgres in batches, events per second.
//!
//! `cargo bench --bench shipper` (set `SHIPPER_EVENTS` to change the backlog size).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

#[path = "../tests/common/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::Instant;

use tollgate::config::Durability;
use tollgate::db::Db;
use tollgate::journal::Journal;
use tollgate::journal::outbox::Outbox;
use tollgate::journal::shipper::Shipper;
use tollgate::ledger::postgres::PgLedger;
use tollgate::ledger::{Settlement, Transaction};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn reservation(i: u64) -> Transaction {
    Transaction {
        trace_id: format!("bench-{i:012}"),
        key_id: format!("k_{:04}", i % 1000),
        user_id: Some(format!("user-{}", i % 100)),
        tenant_id: Some("acme".into()),
        upstream: "openai".into(),
        model: "gpt-4o-mini".into(),
        status: "reserved".into(),
        input_tokens: 1200,
        output_tokens: 4096,
        reserved_micros: 2_638,
        stream: i.is_multiple_of(2),
        started_at: tollgate::time::now_text(),
        instance_id: "bench".into(),
        ..Default::default()
    }
}

fn settlement() -> Settlement {
    Settlement {
        input_tokens: 1200,
        cached_input_tokens: 1024,
        output_tokens: 312,
        cost_micros: 241,
        usage_source: "upstream",
        http_status: Some(200),
        ..Default::default()
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this as a smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let events: u64 = std::env::var("SHIPPER_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1_000_000 } else { 4_000 });
    let pg = pg::TestPg::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let db = Db::open(&dir.path().join("journal.db"), Durability::Normal).unwrap();
        let ledger = PgLedger::new(&pg.url()).unwrap();
        ledger.migrate().await.unwrap();
        let outbox = Outbox::new(db, ledger.clone()).unwrap();

        // 1a. Sequential: one event per commit.
        let n_seq = if full { 2_000u64 } else { 200 };
        let t = Instant::now();
        for i in 0..n_seq {
            outbox
                .open_reservation(reservation(u64::MAX / 2 + i))
                .await
                .unwrap();
        }
        let seq = t.elapsed();
        println!(
            "journal append, sequential: {n_seq} events in {:.2?} = {:.1} µs/event",
            seq,
            seq.as_secs_f64() * 1e6 / n_seq as f64
        );

        // 1b. Concurrent: reserve + settle pairs from 256 tasks (group commit).
        let pairs = events / 2;
        let tasks = 256u64;
        let t = Instant::now();
        let mut handles = Vec::new();
        for w in 0..tasks {
            let ob: Arc<Outbox> = outbox.clone();
            handles.push(tokio::spawn(async move {
                let mut i = w;
                while i < pairs {
                    let r = reservation(i);
                    let id = r.trace_id.clone();
                    ob.open_reservation(r).await.unwrap();
                    ob.settle(&id, settlement()).await.unwrap();
                    i += tasks;
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let append = t.elapsed();
        let journaled = pairs * 2;
        println!(
            "journal append, 256 concurrent: {journaled} events in {:.2?} = {:.0} events/s ({:.1} µs/event amortised)",
            append,
            journaled as f64 / append.as_secs_f64(),
            append.as_secs_f64() * 1e6 / journaled as f64
        );

        // 2. Replay the whole backlog.
        let backlog = outbox.status().backlog["postgres"];
        let mut shipper = Shipper::new(outbox.clone(), std::time::Duration::from_secs(3600));
        let t = Instant::now();
        let done = shipper.ship_all(false).await.unwrap();
        let ship = t.elapsed();
        println!(
            "replay: {} events ({} ledger rows) in {:.2?} = {:.0} events/s",
            done.events,
            done.rows,
            ship,
            done.events as f64 / ship.as_secs_f64()
        );
        assert_eq!(done.events, backlog);
        let rows = ledger.all_rows().await.unwrap().len() as u64;
        assert_eq!(rows, pairs + n_seq, "one ledger row per trace id");
        // Replaying everything again changes no row.
        let t = Instant::now();
        let again = shipper.ship_all(true).await.unwrap();
        println!(
            "replay --all (idempotent re-ship): {} events, {} rows changed, {:.2?} = {:.0} events/s",
            again.events,
            again.rows,
            t.elapsed(),
            again.events as f64 / t.elapsed().as_secs_f64()
        );
        drop(pg);
    });
}
