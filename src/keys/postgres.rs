//! Keys and limits in Postgres (shared mode): [`PgKeyStore`], the [`KeyStore`] every
//! instance sharing the database writes through, and [`PgDirectory`], the
//! [`DirectorySource`] the auth refresh loop polls (the `meta.config_rev` counter every
//! 250 ms, a full read when it moved), so a key created or revoked anywhere takes effect on
//! every instance within a second.
//!
//! The local journal keeps the last directory read ([`StoredSnapshot`]) so an instance
//! (re)started while Postgres is down still serves the keys it knew ([`initial_snapshot`]).
//!
//! Every [`KeyStore`] call is bounded by [`crate::pg::STATEMENT_TIMEOUT`]: Postgres down or hung
//! answers [`KeyStoreError::Unavailable`] (HTTP 503), never a hang.

use std::str::FromStr;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

use super::{KeyRecord, KeyStore, KeyStoreError, NewKey, Snapshot, Subject};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::keys::DirectorySource;
use crate::pg::{CONNECT_TIMEOUT, PgError, PgPool, TS_TEXT, bounded, pg_config};
use crate::quota::LimitSpec;

/// Keys and limits in Postgres. Cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct PgKeyStore {
    pool: PgPool,
}

impl PgKeyStore {
    /// A store with its own pool for `url`. Connects lazily: creating it never touches the
    /// network.
    pub fn new(url: &str) -> Result<PgKeyStore, PgError> {
        Ok(PgKeyStore {
            pool: PgPool::new(url)?,
        })
    }

    /// A store over an existing pool (shared with the ledger).
    pub fn from_pool(pool: PgPool) -> PgKeyStore {
        PgKeyStore { pool }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        self.pool.client().await
    }

    /// The change counter instances poll.
    async fn read_rev(&self) -> Result<i64, PgError> {
        let client = self.client().await?;
        Ok(client
            .query_one("SELECT value FROM meta WHERE name = 'config_rev'", &[])
            .await?
            .get(0))
    }

    /// Every key (with its hash) and limit, exactly as of the revision it carries: one
    /// read-only repeatable-read transaction, so two snapshots with one revision are the
    /// same directory and a newer revision never comes with older contents.
    async fn read_snapshot(&self) -> Result<Snapshot, PgError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let snap = snapshot_with(&*tx).await?;
        tx.commit().await?;
        Ok(snap)
    }

    async fn insert_key(&self, new: NewKey) -> Result<(KeyRecord, String), PgError> {
        super::validate_name("name", &Some(new.name.clone()))?;
        super::validate_name("user", &new.user)?;
        super::validate_name("tenant", &new.tenant)?;
        super::validate_name("plan", &new.plan)?;
        let limits = super::canonical_limits(&new.limits)?;
        let secret = super::generate_secret();
        let hash = super::hash_secret(&secret);
        let rec = KeyRecord {
            id: super::generate_id(),
            name: new.name,
            user: new.user,
            tenant: new.tenant,
            plan: new.plan,
            limits,
            status: "active".into(),
            created_at: crate::time::now_text(),
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some(user) = &rec.user {
            // One creation per user at a time, so two concurrent keys cannot pick two
            // tenants.
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[user])
                .await?;
            let other = tx
                .query_opt(
                    "SELECT tenant_id FROM api_keys WHERE user_id = $1 AND tenant_id IS DISTINCT FROM $2 LIMIT 1",
                    &[user, &rec.tenant],
                )
                .await?;
            if let Some(row) = other {
                let existing: Option<String> = row.get(0);
                return Err(PgError::Invalid(super::tenant_conflict(
                    user,
                    rec.tenant.as_deref(),
                    existing.as_deref(),
                )));
            }
        }
        tx.execute(
            "INSERT INTO api_keys (id, key_hash, name, user_id, tenant_id, plan, status, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'active', ($7::text)::timestamptz)",
            &[&rec.id, &hash, &rec.name, &rec.user, &rec.tenant, &rec.plan, &rec.created_at],
        )
        .await?;
        let subject = Subject::Key(rec.id.clone()).as_text();
        for spec in &rec.limits {
            tx.execute(
                "INSERT INTO limits (subject, spec, created_at) VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
                &[&subject, spec],
            )
            .await?;
        }
        bump_rev(&tx).await?;
        tx.commit().await?;
        Ok((rec, secret))
    }

    async fn read_keys(&self) -> Result<Vec<KeyRecord>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(&format!("{} ORDER BY created_at, id", key_select()), &[])
            .await?;
        let mut out: Vec<KeyRecord> = rows.iter().map(record_of).collect();
        for k in &mut out {
            k.limits = limits_of(&**client, &Subject::Key(k.id.clone()).as_text()).await?;
        }
        Ok(out)
    }

    async fn read_key(&self, id: &str) -> Result<Option<KeyRecord>, PgError> {
        let client = self.client().await?;
        show_with(&**client, id).await
    }

    /// Revoke a key. `None` when no such key exists.
    async fn revoke_key(&self, id: &str) -> Result<Option<KeyRecord>, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = tx
            .execute(
                "UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE id = $1 AND status = 'active'",
                &[&id],
            )
            .await?;
        if n > 0 {
            bump_rev(&tx).await?;
        }
        let rec = show_with(&*tx, id).await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// `limits set`: replace the limit with the same metric, window and scope; others stay.
    async fn update_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, PgError> {
        let canonical = super::canonical_limits(specs)?;
        let subject_text = subject.as_text();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Serialise limit edits: the meta row is the one every change touches anyway.
        tx.execute(
            "SELECT value FROM meta WHERE name = 'config_rev' FOR UPDATE",
            &[],
        )
        .await?;
        let existing = limits_of(&*tx, &subject_text).await?;
        for new in &canonical {
            let new_spec = LimitSpec::from_str(new).map_err(|e| PgError::Invalid(e.to_string()))?;
            for old in &existing {
                if same_counter(old, &new_spec) {
                    tx.execute(
                        "DELETE FROM limits WHERE subject = $1 AND spec = $2",
                        &[&subject_text, old],
                    )
                    .await?;
                }
            }
            tx.execute(
                "INSERT INTO limits (subject, spec, created_at) VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
                &[&subject_text, new],
            )
            .await?;
        }
        bump_rev(&tx).await?;
        let now = limits_of(&*tx, &subject_text).await?;
        tx.commit().await?;
        Ok(now)
    }

    /// Replace every limit of `subject` with `specs` in one transaction (the admin API's
    /// `PUT …/limits`): no reader sees the subject half-updated. `None` when `subject` is a
    /// key that does not exist.
    async fn swap_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Option<Vec<String>>, PgError> {
        let canonical = super::canonical_limits(specs)?;
        let subject_text = subject.as_text();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT value FROM meta WHERE name = 'config_rev' FOR UPDATE",
            &[],
        )
        .await?;
        if let Subject::Key(id) = subject
            && tx
                .query_opt("SELECT 1 FROM api_keys WHERE id = $1", &[id])
                .await?
                .is_none()
        {
            return Ok(None);
        }
        tx.execute("DELETE FROM limits WHERE subject = $1", &[&subject_text])
            .await?;
        for spec in &canonical {
            tx.execute(
                "INSERT INTO limits (subject, spec, created_at) VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
                &[&subject_text, spec],
            )
            .await?;
        }
        bump_rev(&tx).await?;
        let now = limits_of(&*tx, &subject_text).await?;
        tx.commit().await?;
        Ok(Some(now))
    }

    /// `limits clear`: remove the named limits (any value), or all when none are named.
    async fn delete_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, PgError> {
        let subject_text = subject.as_text();
        let targets = specs
            .iter()
            .map(|s| super::parse_spec_pattern(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT value FROM meta WHERE name = 'config_rev' FOR UPDATE",
            &[],
        )
        .await?;
        if targets.is_empty() {
            tx.execute("DELETE FROM limits WHERE subject = $1", &[&subject_text])
                .await?;
        } else {
            let existing = limits_of(&*tx, &subject_text).await?;
            for target in &targets {
                for old in &existing {
                    if same_counter(old, target) {
                        tx.execute(
                            "DELETE FROM limits WHERE subject = $1 AND spec = $2",
                            &[&subject_text, old],
                        )
                        .await?;
                    }
                }
            }
        }
        bump_rev(&tx).await?;
        let now = limits_of(&*tx, &subject_text).await?;
        tx.commit().await?;
        Ok(now)
    }
}

/// One key or limit change or read, abandoned at [`crate::pg::STATEMENT_TIMEOUT`].
async fn request<T>(
    f: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, KeyStoreError> {
    Ok(bounded("a key store request", f).await?)
}

#[async_trait::async_trait]
impl KeyStore for PgKeyStore {
    async fn create(&self, new: NewKey) -> Result<(KeyRecord, String), KeyStoreError> {
        request(self.insert_key(new)).await
    }

    async fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError> {
        request(self.read_keys()).await
    }

    async fn show(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        request(self.read_key(id)).await
    }

    async fn revoke(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        request(self.revoke_key(id)).await
    }

    async fn set_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, KeyStoreError> {
        request(self.update_limits(subject, specs)).await
    }

    async fn replace_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Option<Vec<String>>, KeyStoreError> {
        request(self.swap_limits(subject, specs)).await
    }

    async fn clear_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, KeyStoreError> {
        request(self.delete_limits(subject, specs)).await
    }

    async fn config_rev(&self) -> Result<i64, KeyStoreError> {
        request(self.read_rev()).await
    }

    async fn snapshot(&self) -> Result<Snapshot, KeyStoreError> {
        request(self.read_snapshot()).await
    }
}

/// The Postgres directory, cached into the local journal on every read.
pub struct PgDirectory {
    store: PgKeyStore,
    db: Db,
}

impl PgDirectory {
    pub fn new(store: PgKeyStore, db: Db) -> PgDirectory {
        PgDirectory { store, db }
    }
}

fn db_err(e: PgError) -> DbError {
    DbError::Invalid(e.to_string())
}

#[async_trait::async_trait]
impl DirectorySource for PgDirectory {
    async fn rev(&self) -> Result<i64, DbError> {
        bounded("reading the key directory revision", self.store.read_rev())
            .await
            .map_err(db_err)
    }

    async fn snapshot(&self) -> Result<Snapshot, DbError> {
        let snap = bounded("reading the key directory", self.store.read_snapshot())
            .await
            .map_err(db_err)?;
        let stored = StoredSnapshot::from(&snap);
        if let Err(e) = self.db.call(move |c| save_directory(c, &stored)).await {
            tracing::warn!(error = %e, "cannot keep a local copy of the key directory");
        }
        Ok(snap)
    }
}

/// The directory an instance starts with in shared mode: Postgres if it answers (the
/// copy is saved locally), else the last local copy, else empty (logged). Blocking: runs
/// its own short-lived runtime, so call it from start-up code, never on a reactor.
pub fn initial_snapshot(config: &Config, db: &Db) -> Result<Snapshot, DbError> {
    let url = config.postgres_url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DbError::Invalid(format!("cannot start a runtime: {e}")))?;
    match rt.block_on(fetch_snapshot_once(&url)) {
        Ok(snap) => {
            let stored = StoredSnapshot::from(&snap);
            db.call_blocking(move |c| save_directory(c, &stored))?;
            Ok(snap)
        }
        Err(e) => match db.call_blocking(load_directory)? {
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

/// Move the directory revision forward: one more than before, and never less than the
/// current time in microseconds since the epoch. Instances install a directory only when
/// its revision is not older than the one they hold, so the revision must never go
/// backwards — also not when the database is re-created or restored from a backup whose
/// counter is behind: the first change made there jumps past every revision handed out
/// before (as long as clocks do not step back by more than the time between changes).
async fn bump_rev(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), PgError> {
    tx.execute(
        "UPDATE meta SET value = GREATEST(value + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
         WHERE name = 'config_rev'",
        &[],
    )
    .await?;
    Ok(())
}

fn key_select() -> String {
    format!(
        "SELECT id, name, user_id, tenant_id, plan, status, to_char(created_at AT TIME ZONE 'UTC', {TS_TEXT}), key_hash FROM api_keys"
    )
}

fn record_of(r: &tokio_postgres::Row) -> KeyRecord {
    KeyRecord {
        id: r.get(0),
        name: r.get(1),
        user: r.get(2),
        tenant: r.get(3),
        plan: r.get(4),
        limits: Vec::new(),
        status: r.get(5),
        created_at: r.get(6),
    }
}

async fn limits_of<C: tokio_postgres::GenericClient>(
    c: &C,
    subject: &str,
) -> Result<Vec<String>, PgError> {
    let rows = c
        .query(
            "SELECT spec FROM limits WHERE subject = $1 ORDER BY spec",
            &[&subject],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn show_with<C: tokio_postgres::GenericClient>(
    c: &C,
    id: &str,
) -> Result<Option<KeyRecord>, PgError> {
    let row = c
        .query_opt(&format!("{} WHERE id = $1", key_select()), &[&id])
        .await?;
    match row {
        None => Ok(None),
        Some(r) => {
            let mut k = record_of(&r);
            k.limits = limits_of(c, &Subject::Key(k.id.clone()).as_text()).await?;
            Ok(Some(k))
        }
    }
}

async fn snapshot_with<C: tokio_postgres::GenericClient>(c: &C) -> Result<Snapshot, PgError> {
    let rev: i64 = c
        .query_one("SELECT value FROM meta WHERE name = 'config_rev'", &[])
        .await?
        .get(0);
    let keys = c
        .query(&key_select(), &[])
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(7), record_of(r)))
        .collect();
    let limits = c
        .query("SELECT subject, spec FROM limits", &[])
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    Ok(Snapshot { rev, keys, limits })
}

/// Read the directory over a one-off connection (no pool), for start-up code that runs
/// outside the runtime the pool's connections would live on.
pub async fn fetch_snapshot_once(url: &str) -> Result<Snapshot, PgError> {
    let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, pg_config(url)?.connect(NoTls))
        .await
        .map_err(|_| PgError::Unavailable("connect timed out".into()))??;
    let task = tokio::spawn(conn);
    let read = async {
        client
            .batch_execute("START TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let snap = snapshot_with(&client).await?;
        client.batch_execute("COMMIT").await?;
        Ok::<_, PgError>(snap)
    };
    let snap = tokio::time::timeout(CONNECT_TIMEOUT * 2, read)
        .await
        .map_err(|_| PgError::Unavailable("directory read timed out".into()));
    drop(client);
    let _ = task.await;
    snap?
}

/// A directory snapshot as stored in the local journal (`directory_cache`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub rev: i64,
    pub keys: Vec<StoredKey>,
    pub limits: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub key_hash: String,
    pub id: String,
    pub name: String,
    pub user: Option<String>,
    pub tenant: Option<String>,
    pub plan: Option<String>,
    pub status: String,
    pub created_at: String,
}

impl From<&Snapshot> for StoredSnapshot {
    fn from(s: &Snapshot) -> StoredSnapshot {
        StoredSnapshot {
            rev: s.rev,
            keys: s
                .keys
                .iter()
                .map(|(h, k)| StoredKey {
                    key_hash: h.clone(),
                    id: k.id.clone(),
                    name: k.name.clone(),
                    user: k.user.clone(),
                    tenant: k.tenant.clone(),
                    plan: k.plan.clone(),
                    status: k.status.clone(),
                    created_at: k.created_at.clone(),
                })
                .collect(),
            limits: s.limits.clone(),
        }
    }
}

impl From<StoredSnapshot> for Snapshot {
    fn from(s: StoredSnapshot) -> Snapshot {
        Snapshot {
            rev: s.rev,
            keys: s
                .keys
                .into_iter()
                .map(|k| {
                    (
                        k.key_hash,
                        KeyRecord {
                            id: k.id,
                            name: k.name,
                            user: k.user,
                            tenant: k.tenant,
                            plan: k.plan,
                            limits: Vec::new(),
                            status: k.status,
                            created_at: k.created_at,
                        },
                    )
                })
                .collect(),
            limits: s.limits,
        }
    }
}

fn same_counter(stored: &str, spec: &LimitSpec) -> bool {
    LimitSpec::from_str(stored).is_ok_and(|o| {
        o.metric == spec.metric && o.window == spec.window && o.upstream == spec.upstream
    })
}

// The directory copy kept in the local journal database (`directory_cache`), so a
// restart while Postgres is down still serves the keys last read.

/// Keep the last directory read from Postgres.
pub fn save_directory(c: &Connection, s: &StoredSnapshot) -> Result<(), DbError> {
    let text = serde_json::to_string(s).map_err(|e| DbError::Invalid(e.to_string()))?;
    // Never over a newer copy: a slow read finishing after a faster, later one must not
    // put revoked keys back into what a restart while Postgres is down would serve.
    c.execute(
        "INSERT INTO directory_cache (id, rev, snapshot, saved_at) VALUES (1, ?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET rev = excluded.rev, snapshot = excluded.snapshot, saved_at = excluded.saved_at
         WHERE excluded.rev >= directory_cache.rev",
        params![s.rev, text, crate::time::now_text()],
    )?;
    Ok(())
}

/// The last directory read from Postgres, if any.
pub fn load_directory(c: &Connection) -> Result<Option<Snapshot>, DbError> {
    let text: Option<String> = c
        .query_row(
            "SELECT snapshot FROM directory_cache WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match text {
        None => Ok(None),
        Some(t) => {
            let s: StoredSnapshot = serde_json::from_str(&t)
                .map_err(|e| DbError::Invalid(format!("corrupt directory cache: {e}")))?;
            Ok(Some(s.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_snapshots_round_trip() {
        let snap = Snapshot {
            rev: 7,
            keys: vec![(
                "h".into(),
                KeyRecord {
                    id: "k_1".into(),
                    name: "n".into(),
                    user: Some("u".into()),
                    tenant: None,
                    plan: Some("free".into()),
                    limits: vec![],
                    status: "active".into(),
                    created_at: "t".into(),
                },
            )],
            limits: vec![("key:k_1".into(), "requests:total=1".into())],
        };
        let stored = StoredSnapshot::from(&snap);
        let text = serde_json::to_string(&stored).unwrap();
        let back: Snapshot = serde_json::from_str::<StoredSnapshot>(&text)
            .unwrap()
            .into();
        assert_eq!(back.rev, 7);
        assert_eq!(back.keys, snap.keys);
        assert_eq!(back.limits, snap.limits);
    }

    #[test]
    fn limits_match_by_counter_identity() {
        let spec = LimitSpec::from_str("usd:day=5").unwrap();
        assert!(same_counter("usd:day=1", &spec));
        assert!(!same_counter("usd:month=1", &spec));
        assert!(!same_counter("usd:day@openai=1", &spec));
    }

    #[tokio::test]
    async fn directory_cache_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("j.db"), crate::config::Durability::Normal).unwrap();
        assert!(db.call(load_directory).await.unwrap().is_none());
        let s = StoredSnapshot {
            rev: 4,
            keys: vec![],
            limits: vec![("user:u".into(), "requests:day=3".into())],
        };
        db.call(move |c| save_directory(c, &s)).await.unwrap();
        let back = db.call(load_directory).await.unwrap().unwrap();
        assert_eq!(back.rev, 4);
        assert_eq!(back.limits.len(), 1);
        // An older read saved late never replaces a newer copy; a newer one does.
        let older = StoredSnapshot {
            rev: 3,
            keys: vec![],
            limits: vec![],
        };
        db.call(move |c| save_directory(c, &older)).await.unwrap();
        let back = db.call(load_directory).await.unwrap().unwrap();
        assert_eq!((back.rev, back.limits.len()), (4, 1));
        let newer = StoredSnapshot {
            rev: 9,
            keys: vec![],
            limits: vec![],
        };
        db.call(move |c| save_directory(c, &newer)).await.unwrap();
        let back = db.call(load_directory).await.unwrap().unwrap();
        assert_eq!((back.rev, back.limits.len()), (9, 0));
    }
}
