//! The Postgres names shared mode's modules use: the ledger of record
//! ([`crate::ledger::postgres`]), the pool and its errors ([`crate::pg`]), and the journal's
//! copy of the key directory ([`crate::keys::postgres`]).

pub use crate::keys::postgres::{StoredKey, StoredSnapshot, fetch_snapshot_once};
pub use crate::ledger::postgres::{EXPORT_BATCH, PgLedger};
pub use crate::pg::{
    CONNECT_TIMEOUT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_RETRIES, MIGRATIONS, PgError,
    PgPool, RECYCLE_TIMEOUT, STATEMENT_TIMEOUT, TCP_USER_TIMEOUT, bounded, pg_config,
};
