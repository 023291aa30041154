//! The durable half of shared mode: the Postgres ledger of record, the local SQLite
//! journal used as its outbox, the shipper between them, keys and limits from Postgres,
//! and counter rebuilds from ledger + journal.
//!
//! ```text
//! engine ─► Outbox (journal_events + journal_traces, SQLite WAL, committed first)
//!              │  ├─► Applier ─► counters (QuotaStore; replayed until applied)
//!              │  └─► 409 checks / crash recovery (local, no Postgres needed)
//!              ▼
//!           Shipper ─► Postgres billing_transactions (batched idempotent upserts)
//! Postgres api_keys / limits / meta.config_rev ─► keys::postgres::PgDirectory ─► auth (+ local copy)
//! Postgres settled rows + unshipped journal rows ─► SharedLoader ─► counter rebuild
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`pg`] | the Postgres names these modules use, re-exported from [`crate::ledger::postgres`], [`crate::pg`] and [`crate::keys::postgres`] |
//! | [`outbox`] | the journal tables and the shared-mode [`crate::journal::Journal`] |
//! | [`shipper`] | shipping with retry/backoff, compaction |
//! | [`applier`] | journal → shared counters (Redis): the request path's apply, replays |
//! | [`loader`] | the shared-mode [`crate::quota::memory::CounterLoader`] |

pub mod applier;
pub mod loader;
pub mod outbox;
pub mod pg;
pub mod shipper;

use std::sync::Arc;

use crate::config::Config;
use crate::db::Db;

/// `storage.postgres_url` (config validation requires it in shared mode).
pub fn postgres_url(config: &Config) -> String {
    config
        .storage
        .postgres_url
        .as_ref()
        .map(|s| s.expose().to_string())
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error(transparent)]
    Postgres(#[from] pg::PgError),
    #[error(transparent)]
    Journal(#[from] crate::db::DbError),
}

/// The outbox over `db` for `config`'s Postgres (no connection is made yet).
pub fn open_outbox(config: &Config, db: Db) -> Result<Arc<outbox::Outbox>, SharedError> {
    let pg = pg::PgLedger::new(&postgres_url(config))?;
    Ok(outbox::Outbox::new(db, pg)?)
}
