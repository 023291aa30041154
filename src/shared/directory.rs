//! Keys and limits in shared mode: Postgres is their source; the local journal keeps the
//! last snapshot read so an instance (re)started while Postgres is down still serves the
//! keys it knew.
//!
//! [`PgDirectory`] is the [`DirectorySource`] the auth refresh loop polls (the
//! `meta.config_rev` counter every 250 ms, a full read when it moved), so a key created
//! or revoked anywhere takes effect on every instance within a second. [`KeyAdmin`] is
//! what the CLI (and the admin API) call to change keys and limits, in either mode.

use std::sync::Arc;

use crate::auth::DirectorySource;
use crate::config::{Config, StorageMode};
use crate::db::{Db, DbError};
use crate::keys::{self, KeyRecord, NewKey, Snapshot, Subject};
use crate::shared::outbox;
use crate::shared::pg::{PgError, PgLedger, StoredSnapshot, bounded};

/// The Postgres directory, cached into the local journal on every read.
pub struct PgDirectory {
    pg: PgLedger,
    db: Db,
}

impl PgDirectory {
    pub fn new(pg: PgLedger, db: Db) -> PgDirectory {
        PgDirectory { pg, db }
    }
}

fn db_err(e: PgError) -> DbError {
    DbError::Invalid(e.to_string())
}

#[async_trait::async_trait]
impl DirectorySource for PgDirectory {
    async fn rev(&self) -> Result<i64, DbError> {
        bounded("reading the key directory revision", self.pg.config_rev())
            .await
            .map_err(db_err)
    }

    async fn snapshot(&self) -> Result<Snapshot, DbError> {
        let snap = bounded("reading the key directory", self.pg.snapshot())
            .await
            .map_err(db_err)?;
        let stored = StoredSnapshot::from(&snap);
        if let Err(e) = self
            .db
            .call(move |c| outbox::save_directory(c, &stored))
            .await
        {
            tracing::warn!(error = %e, "cannot keep a local copy of the key directory");
        }
        Ok(snap)
    }
}

/// The directory an instance starts with in shared mode: Postgres if it answers (the
/// copy is saved locally), else the last local copy, else empty (logged). Blocking: runs
/// its own short-lived runtime, so call it from start-up code, never on a reactor.
pub fn initial_snapshot(config: &Config, db: &Db) -> Result<Snapshot, DbError> {
    let url = config
        .storage
        .postgres_url
        .as_ref()
        .map(|s| s.expose().to_string())
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DbError::Invalid(format!("cannot start a runtime: {e}")))?;
    match rt.block_on(crate::shared::pg::fetch_snapshot_once(&url)) {
        Ok(snap) => {
            let stored = StoredSnapshot::from(&snap);
            db.call_blocking(move |c| outbox::save_directory(c, &stored))?;
            Ok(snap)
        }
        Err(e) => match db.call_blocking(outbox::load_directory)? {
            Some(snap) => {
                tracing::warn!(error = %e, rev = snap.rev, keys = snap.keys.len(), "postgres unavailable at start; serving the key directory saved locally");
                Ok(snap)
            }
            None => {
                tracing::error!(error = %e, "postgres unavailable at start and no local copy of the key directory; no key is accepted until it is reachable");
                Ok(Snapshot::default())
            }
        },
    }
}

/// Why a key or limit change failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyAdminError {
    /// The store of keys is unreachable (shared mode: Postgres down) — HTTP 503.
    #[error("{0}; keys and limits cannot be changed until it is reachable")]
    Unavailable(String),
    /// Bad input — HTTP 400.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Store(String),
}

impl KeyAdminError {
    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            KeyAdminError::Unavailable(_) => 503,
            KeyAdminError::Invalid(_) => 400,
            KeyAdminError::Store(_) => 500,
        }
    }
}

impl From<PgError> for KeyAdminError {
    fn from(e: PgError) -> KeyAdminError {
        match e {
            PgError::Unavailable(_) => KeyAdminError::Unavailable(e.to_string()),
            PgError::Invalid(m) => KeyAdminError::Invalid(m),
            other => KeyAdminError::Store(other.to_string()),
        }
    }
}

impl From<DbError> for KeyAdminError {
    fn from(e: DbError) -> KeyAdminError {
        match e {
            DbError::Invalid(m) => KeyAdminError::Invalid(m),
            other => KeyAdminError::Store(other.to_string()),
        }
    }
}

/// Where keys and limits are changed: the embedded database, or Postgres in shared mode.
#[derive(Clone)]
pub enum KeyAdmin {
    Embedded(Db),
    Shared(PgLedger),
}

impl KeyAdmin {
    /// The store `config` names. Shared mode needs no connection yet (pools connect lazily).
    pub fn for_config(config: &Config, db: &Db) -> Result<KeyAdmin, KeyAdminError> {
        Ok(match config.storage.mode {
            StorageMode::Embedded => KeyAdmin::Embedded(db.clone()),
            StorageMode::Shared => {
                let url = config
                    .storage
                    .postgres_url
                    .as_ref()
                    .map(|s| s.expose().to_string())
                    .unwrap_or_default();
                KeyAdmin::Shared(PgLedger::new(&url)?)
            }
        })
    }

    pub async fn create(&self, new: NewKey) -> Result<(KeyRecord, String), KeyAdminError> {
        match self {
            KeyAdmin::Embedded(db) => Ok(keys::create(db, new).await?),
            KeyAdmin::Shared(pg) => Ok(bounded("a key store request", pg.create_key(new)).await?),
        }
    }

    pub async fn list(&self) -> Result<Vec<KeyRecord>, KeyAdminError> {
        match self {
            KeyAdmin::Embedded(db) => Ok(db.call(keys::list_sync).await?),
            KeyAdmin::Shared(pg) => Ok(bounded("a key store request", pg.list_keys()).await?),
        }
    }

    pub async fn show(&self, id: &str) -> Result<Option<KeyRecord>, KeyAdminError> {
        match self {
            KeyAdmin::Embedded(db) => {
                let id = id.to_string();
                Ok(db.call(move |c| keys::show_sync(c, &id)).await?)
            }
            KeyAdmin::Shared(pg) => Ok(bounded("a key store request", pg.show_key(id)).await?),
        }
    }

    pub async fn revoke(&self, id: &str) -> Result<Option<KeyRecord>, KeyAdminError> {
        match self {
            KeyAdmin::Embedded(db) => {
                let id = id.to_string();
                Ok(db.call(move |c| keys::revoke_sync(c, &id)).await?)
            }
            KeyAdmin::Shared(pg) => Ok(bounded("a key store request", pg.revoke_key(id)).await?),
        }
    }

    pub async fn set_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, KeyAdminError> {
        match self {
            KeyAdmin::Embedded(db) => {
                let (s, specs) = (subject.clone(), specs.to_vec());
                Ok(db
                    .call(move |c| keys::set_limits_sync(c, &s, &specs))
                    .await?)
            }
            KeyAdmin::Shared(pg) => {
                Ok(bounded("a key store request", pg.set_limits(subject, specs)).await?)
            }
        }
    }

    /// Replace every limit of `subject` with `specs`, atomically. `None` when `subject`
    /// is a key that does not exist.
    pub async fn replace_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Option<Vec<String>>, KeyAdminError> {
        match self {
            KeyAdmin::Embedded(db) => {
                let (s, specs) = (subject.clone(), specs.to_vec());
                // Clear and set in one database call: one transaction, so no request ever
                // sees the subject half-updated (or, between the two, unlimited).
                Ok(db
                    .call(move |c| -> Result<Option<Vec<String>>, DbError> {
                        if let Subject::Key(id) = &s
                            && keys::show_sync(c, id)?.is_none()
                        {
                            return Ok(None);
                        }
                        keys::clear_limits_sync(c, &s, &[])?;
                        if specs.is_empty() {
                            Ok(Some(Vec::new()))
                        } else {
                            Ok(Some(keys::set_limits_sync(c, &s, &specs)?))
                        }
                    })
                    .await?)
            }
            KeyAdmin::Shared(pg) => {
                Ok(bounded("a key store request", pg.replace_limits(subject, specs)).await?)
            }
        }
    }

    pub async fn clear_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, KeyAdminError> {
        match self {
            KeyAdmin::Embedded(db) => {
                let (s, specs) = (subject.clone(), specs.to_vec());
                Ok(db
                    .call(move |c| keys::clear_limits_sync(c, &s, &specs))
                    .await?)
            }
            KeyAdmin::Shared(pg) => {
                Ok(bounded("a key store request", pg.clear_limits(subject, specs)).await?)
            }
        }
    }
}

/// The directory source the refresh loop polls for `config`'s mode.
pub fn source_for(
    config: &Config,
    db: &Db,
    outbox: Option<&Arc<outbox::Outbox>>,
) -> Arc<dyn DirectorySource> {
    match (config.storage.mode, outbox) {
        (StorageMode::Shared, Some(ob)) => Arc::new(PgDirectory::new(ob.pg().clone(), db.clone())),
        _ => Arc::new(db.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_http_statuses() {
        let down: KeyAdminError = PgError::Unavailable("connection refused".into()).into();
        assert_eq!(down.status(), 503);
        assert!(down.to_string().contains("cannot be changed"));
        let bad: KeyAdminError = PgError::Invalid("invalid limit `x`".into()).into();
        assert_eq!(bad.status(), 400);
        let bad: KeyAdminError =
            DbError::Invalid("name must be 1-200 printable characters".into()).into();
        assert_eq!(bad.status(), 400);
    }
}
