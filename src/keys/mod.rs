//! API keys and the limits attached to keys, users and tenants: one [`KeyStore`] trait
//! with a backend per mode — [`sqlite::SqliteKeyStore`] (the embedded database) and
//! [`postgres::PgKeyStore`] (shared mode) — and the types and rules both share.
//!
//! A key's secret (`tg_` + 43 URL-safe characters = 256 bits from the OS CSPRNG) is shown
//! once at creation and stored only as its SHA-256 hash. Every change moves the store's
//! revision (`meta.config_rev`), which running instances poll (see [`crate::auth`]) so that
//! a create or revoke takes effect everywhere within a second.
//!
//! | module | owns |
//! |---|---|
//! | this one | [`KeyStore`], [`KeyRecord`], [`Subject`], [`Snapshot`], secrets and validation |
//! | [`sqlite`] | keys and limits in the embedded database; the embedded directory source |
//! | [`postgres`] | keys and limits in Postgres; the shared-mode directory source and its local copy |

pub mod postgres;
pub mod sqlite;

use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{Config, StorageMode};
use crate::db::{Db, DbError};
use crate::pg::{PgError, PgPool};
use crate::quota::LimitSpec;
pub use crate::quota::Subject;

/// Prefix of every tollgate secret.
pub const SECRET_PREFIX: &str = "tg_";

/// A key as shown by `keys list/show` and the admin API (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub user: Option<String>,
    pub tenant: Option<String>,
    pub plan: Option<String>,
    pub limits: Vec<String>,
    pub status: String,
    pub created_at: String,
}

/// Keys that are not revoked (id, plan) whose plan `defined` does not know, sorted by id:
/// such a key is refused until its plan is defined again.
pub fn undefined_plans<'a>(
    keys: impl IntoIterator<Item = &'a KeyRecord>,
    defined: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = keys
        .into_iter()
        .filter(|k| k.status != "revoked")
        .filter_map(|k| {
            let plan = k.plan.as_deref()?;
            (!defined(plan)).then(|| (k.id.clone(), plan.to_string()))
        })
        .collect();
    out.sort();
    out
}

/// What `keys create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub user: Option<String>,
    pub tenant: Option<String>,
    pub plan: Option<String>,
    pub limits: Vec<String>,
}

/// Source of directory snapshots: the embedded database, or Postgres in shared mode
/// ([`source_for`]).
#[async_trait::async_trait]
pub trait DirectorySource: Send + Sync + 'static {
    /// The store's change counter.
    async fn rev(&self) -> Result<i64, DbError>;
    async fn snapshot(&self) -> Result<Snapshot, DbError>;
}

/// Hex SHA-256 of a secret: the only form in which secrets are stored or compared.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A fresh secret: `tg_` + 32 random bytes, base64url without padding.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// A fresh key id: `k_` + 16 hex digits.
pub fn generate_id() -> String {
    let mut bytes = [0u8; 8];
    rand::fill(&mut bytes);
    format!("k_{}", hex::encode(bytes))
}

/// Validate limit specs, returning their canonical text.
pub fn canonical_limits(specs: &[String]) -> Result<Vec<String>, DbError> {
    specs
        .iter()
        .map(|s| {
            LimitSpec::from_str(s)
                .map(|l| l.to_string())
                .map_err(|e| DbError::Invalid(format!("invalid limit `{s}`: {e}")))
        })
        .collect()
}

/// Why a user may not get a key in `tenant` when its other keys are in `existing`: a
/// user's limits are counted under its tenant (one Redis hash tag per request), so every
/// key of a user belongs to the same tenant, or all to none.
pub fn tenant_conflict(user: &str, tenant: Option<&str>, existing: Option<&str>) -> String {
    let name = |t: Option<&str>| match t {
        Some(t) => format!("tenant `{t}`"),
        None => "no tenant".to_string(),
    };
    format!(
        "user `{user}` already has keys with {}; a key with {} would count the user's limits in two places — every key of a user belongs to one tenant",
        name(existing),
        name(tenant)
    )
}

/// Names, users, tenants and plans are 1-200 printable characters.
pub fn validate_name(what: &str, v: &Option<String>) -> Result<(), DbError> {
    if let Some(s) = v
        && (s.is_empty() || s.len() > 200 || s.contains(char::is_control))
    {
        return Err(DbError::Invalid(format!(
            "{what} must be 1-200 printable characters"
        )));
    }
    Ok(())
}

/// `limits clear` accepts a spec with or without `=VALUE`.
pub fn parse_spec_pattern(s: &str) -> Result<LimitSpec, DbError> {
    let full = if s.contains('=') {
        s.to_string()
    } else {
        format!("{s}=1")
    };
    LimitSpec::from_str(&full).map_err(|e| DbError::Invalid(format!("invalid limit `{s}`: {e}")))
}

/// Everything auth and quota need, loaded in one read.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub rev: i64,
    /// (key hash, record)
    pub keys: Vec<(String, KeyRecord)>,
    /// (subject text, spec)
    pub limits: Vec<(String, String)>,
}

/// Where keys and limits are kept and changed: the CLI, the admin API and (for
/// [`KeyStore::config_rev`] and [`KeyStore::snapshot`]) directory reads go through it.
///
/// Every change validates its input ([`KeyStoreError::Invalid`], nothing written), is
/// atomic, and moves [`KeyStore::config_rev`] forward, so instances polling the revision
/// pick it up.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync {
    /// Create a key; returns the record and the secret (shown once, stored only hashed).
    async fn create(&self, new: NewKey) -> Result<(KeyRecord, String), KeyStoreError>;
    /// Every key, oldest first.
    async fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError>;
    /// One key; `None` when no key has this id.
    async fn show(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError>;
    /// Revoke a key (final); `None` when no key has this id. Revoking a revoked key changes
    /// nothing.
    async fn revoke(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError>;
    /// `limits set`: each spec replaces the subject's limit with the same metric, window
    /// and scope; the subject's other limits stay. Returns the subject's limits after.
    async fn set_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, KeyStoreError>;
    /// Replace every limit of `subject` with `specs` in one transaction (the admin API's
    /// `PUT …/limits`): no reader sees the subject half-updated or, between the two,
    /// unlimited. `None` when `subject` is a key that does not exist.
    async fn replace_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Option<Vec<String>>, KeyStoreError>;
    /// `limits clear`: remove the named limits (matched by metric, window and scope,
    /// whatever their value; `=VALUE` optional), or every limit of the subject when
    /// `specs` is empty. Returns the subject's limits after.
    async fn clear_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, KeyStoreError>;
    /// The store's revision: it moves forward on every change.
    async fn config_rev(&self) -> Result<i64, KeyStoreError>;
    /// Every key (with its hash) and limit, as of the revision it carries.
    async fn snapshot(&self) -> Result<Snapshot, KeyStoreError>;
}

/// Why a key or limit change failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The store of keys is unreachable (shared mode: Postgres down) — HTTP 503.
    #[error("{0}; keys and limits cannot be changed until it is reachable")]
    Unavailable(String),
    /// Bad input — HTTP 400.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Store(String),
}

impl KeyStoreError {
    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            KeyStoreError::Unavailable(_) => 503,
            KeyStoreError::Invalid(_) => 400,
            KeyStoreError::Store(_) => 500,
        }
    }
}

impl From<PgError> for KeyStoreError {
    fn from(e: PgError) -> KeyStoreError {
        match e {
            PgError::Unavailable(_) => KeyStoreError::Unavailable(e.to_string()),
            PgError::Invalid(m) => KeyStoreError::Invalid(m),
            other => KeyStoreError::Store(other.to_string()),
        }
    }
}

impl From<DbError> for KeyStoreError {
    fn from(e: DbError) -> KeyStoreError {
        match e {
            DbError::Invalid(m) => KeyStoreError::Invalid(m),
            other => KeyStoreError::Store(other.to_string()),
        }
    }
}

/// The key store `config` names: the embedded database `db`, or Postgres in shared mode
/// (no connection is made yet: pools connect lazily).
pub fn open(config: &Config, db: &Db) -> Result<Arc<dyn KeyStore>, KeyStoreError> {
    Ok(match config.storage.mode {
        StorageMode::Embedded => Arc::new(sqlite::SqliteKeyStore::new(db.clone())),
        StorageMode::Shared => Arc::new(postgres::PgKeyStore::new(&config.postgres_url())?),
    })
}

/// The directory source the auth refresh loop polls for `config`'s mode: the embedded
/// database, or (shared mode) Postgres over `pool` (the outbox's), copied into the journal.
pub fn source_for(config: &Config, db: &Db, pool: Option<&PgPool>) -> Arc<dyn DirectorySource> {
    match (config.storage.mode, pool) {
        (StorageMode::Shared, Some(pool)) => Arc::new(postgres::PgDirectory::new(
            postgres::PgKeyStore::from_pool(pool.clone()),
            db.clone(),
        )),
        _ => Arc::new(db.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_hashed() {
        let a = generate_secret();
        let b = generate_secret();
        assert!(a.starts_with("tg_"));
        assert!(a.len() >= 3 + 32);
        assert!(
            a[3..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(a, b);
        assert_eq!(hash_secret(&a).len(), 64);
        assert_ne!(hash_secret(&a), hash_secret(&b));
    }

    #[test]
    fn errors_map_to_http_statuses() {
        let down: KeyStoreError = PgError::Unavailable("connection refused".into()).into();
        assert_eq!(down.status(), 503);
        assert!(down.to_string().contains("cannot be changed"));
        let bad: KeyStoreError = PgError::Invalid("invalid limit `x`".into()).into();
        assert_eq!(bad.status(), 400);
        let bad: KeyStoreError =
            DbError::Invalid("name must be 1-200 printable characters".into()).into();
        assert_eq!(bad.status(), 400);
    }
}
