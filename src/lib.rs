//! tollgate — a reverse-proxy sidecar for LLM APIs that enforces quotas and budgets and
//! bills every request exactly once.
//!
//! The request pipeline, one module per stage (data flows one way, top to bottom):
//!
//! ```text
//! client ─► proxy (pingora glue) ─► auth (key → principal)
//!                                    └► engine: api parse + tokens estimate
//!                                         └► quota reserve (all limits, one atomic step)
//!                                              └► ledger: `reserved` row (journal first)
//!        ◄─ bytes unchanged ◄─ api::meter (SSE tee, usage) ◄─ upstream
//!                                         └► engine::finish: settle | release
//!                                              ├► ledger row final
//!                                              └► quota counters
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | `config.toml` → validated [`config::Config`]: limits, prices and the webhook parsed when read |
//! | [`proxy`] | pingora `ProxyHttp` glue |
//! | [`upstream`] | configured upstreams and their addresses, resolved off the request path |
//! | [`auth`] | a presented key → its principal: the live in-memory key directory |
//! | [`keys`] | keys and limits behind the `KeyStore` trait: SQLite and Postgres backends |
//! | [`api`] | provider wire formats: SSE parser, usage meter |
//! | [`tokens`] | input estimates; counting and the model → encoding table are the `tollgate-tokens` crate, re-exported |
//! | [`engine`] | admit (parse, estimate, reserve, journal) and finish (settle/release) |
//! | [`quota`] | limit specs, windows, counters, the `QuotaStore` trait, memory and Redis backends |
//! | [`billing`], [`money`] | prices and integer micro-dollar arithmetic |
//! | [`ledger`] | `billing_transactions` behind the `Ledger` trait: SQLite and Postgres backends |
//! | [`db`] | the single SQLite writer thread and the embedded schema |
//! | [`admin`] | the operator HTTP API: keys, limits, usage, ledger, journal, health, metrics, usage page |
//! | [`metrics`] | Prometheus metrics of one instance |
//! | [`alerts`] | threshold alerts: log events and webhook deliveries |
//! | [`pg`] | the Postgres pool, bounds, errors and migrations that keys and the ledger share |
//! | [`journal`] | the `Journal` trait and its two implementations (embedded; shared mode's outbox) with what drains the outbox (applier → Redis, shipper → Postgres) and the shared-mode counter loader |
//! | [`reconcile`] | counter/ledger reconciliation |
//! | [`rerate`] | re-rating settled rows under the current price table: adjustment rows |
//! | [`spend`] | spend reports over the ledger of record (`/admin/spend`, `tollgate report`), SQLite and Postgres |
//! | [`passthrough`] | unmetered provider routes (`GET /v1/models`, …): patterns and matching |
//! | [`net`] | bounds on client connections shared by both listeners (stalled writes, per-address caps) |
//! | [`errors`] | the errors tollgate answers itself, in the calling provider's error shape |
//! | [`server`] | start-up: every component built from a [`config::Config`], the pingora server run until a signal |
//! | [`telemetry`] | logging: `tracing` JSON lines, pingora's `log` records bridged in, third-party levels capped |
//! | [`time`] | ledger timestamps: UTC text whose order is time order |
//! | [`instance_proof`] | how the CLI knows it talks to the real instance before it sends the admin token |
//!
//! Modules are layered (docs/architecture.md, *Layers*; checked by `tests/layers.rs`): a
//! module uses only modules of lower layers, and pingora only `proxy` and `server`.
//!
//! Beside this crate, in the same workspace: `crates/tokens` (`tollgate-tokens`: the
//! vocabularies, [`tokens::count`], [`tokens::encoding_for_model`]) and
//! `crates/mock-upstream` (`mock_upstream`: the fake OpenAI/Anthropic upstream behind
//! `tollgate mock-upstream`, the integration tests and the benchmarks).

pub mod admin;
pub mod alerts;
pub mod api;
pub mod auth;
pub mod billing;
pub mod config;
pub mod db;
pub mod engine;
pub mod errors;
pub mod instance_proof;
pub mod journal;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod net;
pub mod passthrough;
pub mod pg;
pub mod proxy;
pub mod quota;
pub mod reconcile;
pub mod rerate;
pub mod server;
pub mod spend;
pub mod telemetry;
pub mod time;
pub mod tokens;
pub mod upstream;
