//! Keys and limits in the embedded database (`api_keys`, `limits`, `meta.config_rev`).
//!
//! The `*_sync` functions run on the database's writer thread ([`Db::call`]): each call is
//! one transaction, so [`SqliteKeyStore::replace_limits`] can clear and set in one step.
//! [`Db`] is also the embedded [`DirectorySource`] the auth refresh loop polls.

use std::str::FromStr;

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    KeyRecord, KeyStore, KeyStoreError, NewKey, Snapshot, Subject, canonical_limits, generate_id,
    generate_secret, hash_secret, parse_spec_pattern, validate_name,
};
use crate::db::{Db, DbError};
use crate::keys::DirectorySource;
use crate::quota::LimitSpec;

pub(crate) fn bump_rev(conn: &Connection) -> Result<(), DbError> {
    conn.execute(
        "UPDATE meta SET value = value + 1 WHERE name = 'config_rev'",
        [],
    )?;
    Ok(())
}

/// Create a key; returns the record and the secret (shown once).
pub async fn create(db: &Db, new: NewKey) -> Result<(KeyRecord, String), DbError> {
    validate_name("name", &Some(new.name.clone()))?;
    validate_name("user", &new.user)?;
    validate_name("tenant", &new.tenant)?;
    validate_name("plan", &new.plan)?;
    let limits = canonical_limits(&new.limits)?;
    let secret = generate_secret();
    let hash = hash_secret(&secret);
    let id = generate_id();
    let created_at = crate::time::now_text();
    let rec = KeyRecord {
        id: id.clone(),
        name: new.name,
        user: new.user,
        tenant: new.tenant,
        plan: new.plan,
        limits,
        status: "active".into(),
        created_at,
    };
    let r = rec.clone();
    db.call(move |c| {
        if let Some(user) = &r.user {
            let other: Option<Option<String>> = c
                .query_row(
                    "SELECT tenant_id FROM api_keys WHERE user_id = ?1 AND tenant_id IS NOT ?2 LIMIT 1",
                    params![user, r.tenant],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(existing) = other {
                return Err(DbError::Invalid(super::tenant_conflict(
                    user,
                    r.tenant.as_deref(),
                    existing.as_deref(),
                )));
            }
        }
        c.execute(
            "INSERT INTO api_keys (id, key_hash, name, user_id, tenant_id, plan, status, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'active', ?7)",
            params![r.id, hash, r.name, r.user, r.tenant, r.plan, r.created_at],
        )?;
        let subject = Subject::Key(r.id.clone()).as_text();
        for spec in &r.limits {
            c.execute(
                "INSERT OR IGNORE INTO limits (subject, spec, created_at) VALUES (?1, ?2, ?3)",
                params![subject, spec, r.created_at],
            )?;
        }
        bump_rev(c)?;
        Ok(())
    })
    .await?;
    Ok((rec, secret))
}

fn limits_of(c: &Connection, subject: &str) -> Result<Vec<String>, DbError> {
    let mut st = c.prepare_cached("SELECT spec FROM limits WHERE subject = ?1 ORDER BY spec")?;
    let rows = st.query_map([subject], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        user: r.get(2)?,
        tenant: r.get(3)?,
        plan: r.get(4)?,
        limits: Vec::new(),
        status: r.get(5)?,
        created_at: r.get(6)?,
    })
}

const KEY_COLUMNS: &str = "id, name, user_id, tenant_id, plan, status, created_at";

/// Every key, oldest first.
pub fn list_sync(c: &Connection) -> Result<Vec<KeyRecord>, DbError> {
    let mut st = c.prepare(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
    ))?;
    let mut keys = st
        .query_map([], record_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    for k in &mut keys {
        k.limits = limits_of(c, &Subject::Key(k.id.clone()).as_text())?;
    }
    Ok(keys)
}

pub fn show_sync(c: &Connection, id: &str) -> Result<Option<KeyRecord>, DbError> {
    let rec = c
        .query_row(
            &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
            [id],
            record_from_row,
        )
        .optional()?;
    match rec {
        None => Ok(None),
        Some(mut k) => {
            k.limits = limits_of(c, &Subject::Key(k.id.clone()).as_text())?;
            Ok(Some(k))
        }
    }
}

/// Revoke a key. Returns the record, or None when no such key exists.
pub fn revoke_sync(c: &Connection, id: &str) -> Result<Option<KeyRecord>, DbError> {
    let n = c.execute(
        "UPDATE api_keys SET status = 'revoked', revoked_at = ?2 WHERE id = ?1 AND status = 'active'",
        params![id, crate::time::now_text()],
    )?;
    if n > 0 {
        bump_rev(c)?;
    }
    show_sync(c, id)
}

/// Replace (`set`) or remove (`clear`) limits on a subject. `set` replaces the limit with
/// the same metric, window and upstream scope; other limits of the subject stay.
pub fn set_limits_sync(
    c: &Connection,
    subject: &Subject,
    specs: &[String],
) -> Result<Vec<String>, DbError> {
    let canonical = canonical_limits(specs)?;
    let subject_text = subject.as_text();
    let existing = limits_of(c, &subject_text)?;
    for new in &canonical {
        let new_spec = LimitSpec::from_str(new).map_err(|e| DbError::Invalid(e.to_string()))?;
        for old in &existing {
            if let Ok(old_spec) = LimitSpec::from_str(old)
                && old_spec.metric == new_spec.metric
                && old_spec.window == new_spec.window
                && old_spec.upstream == new_spec.upstream
            {
                c.execute(
                    "DELETE FROM limits WHERE subject = ?1 AND spec = ?2",
                    params![subject_text, old],
                )?;
            }
        }
        c.execute(
            "INSERT OR REPLACE INTO limits (subject, spec, created_at) VALUES (?1, ?2, ?3)",
            params![subject_text, new, crate::time::now_text()],
        )?;
    }
    bump_rev(c)?;
    limits_of(c, &subject_text)
}

/// Remove the given limits (matched by metric, window and scope, whatever their value),
/// or all limits of the subject when `specs` is empty.
pub fn clear_limits_sync(
    c: &Connection,
    subject: &Subject,
    specs: &[String],
) -> Result<Vec<String>, DbError> {
    let subject_text = subject.as_text();
    if specs.is_empty() {
        c.execute("DELETE FROM limits WHERE subject = ?1", [&subject_text])?;
    } else {
        let existing = limits_of(c, &subject_text)?;
        for s in specs {
            let target = parse_spec_pattern(s)?;
            for old in &existing {
                if let Ok(o) = LimitSpec::from_str(old)
                    && o.metric == target.metric
                    && o.window == target.window
                    && o.upstream == target.upstream
                {
                    c.execute(
                        "DELETE FROM limits WHERE subject = ?1 AND spec = ?2",
                        params![subject_text, old],
                    )?;
                }
            }
        }
    }
    bump_rev(c)?;
    limits_of(c, &subject_text)
}

pub fn config_rev(c: &Connection) -> Result<i64, DbError> {
    Ok(c.query_row(
        "SELECT value FROM meta WHERE name = 'config_rev'",
        [],
        |r| r.get(0),
    )?)
}

pub fn snapshot_sync(c: &Connection) -> Result<Snapshot, DbError> {
    let rev = config_rev(c)?;
    let mut st = c.prepare(&format!("SELECT {KEY_COLUMNS}, key_hash FROM api_keys"))?;
    let keys = st
        .query_map([], |r| Ok((r.get::<_, String>(7)?, record_from_row(r)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut st = c.prepare("SELECT subject, spec FROM limits")?;
    let limits = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Snapshot { rev, keys, limits })
}

/// The embedded database as a [`KeyStore`]. Cheap to clone.
#[derive(Clone)]
pub struct SqliteKeyStore {
    db: Db,
}

impl SqliteKeyStore {
    pub fn new(db: Db) -> SqliteKeyStore {
        SqliteKeyStore { db }
    }
}

#[async_trait::async_trait]
impl KeyStore for SqliteKeyStore {
    async fn create(&self, new: NewKey) -> Result<(KeyRecord, String), KeyStoreError> {
        Ok(create(&self.db, new).await?)
    }

    async fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError> {
        Ok(self.db.call(list_sync).await?)
    }

    async fn show(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        let id = id.to_string();
        Ok(self.db.call(move |c| show_sync(c, &id)).await?)
    }

    async fn revoke(&self, id: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        let id = id.to_string();
        Ok(self.db.call(move |c| revoke_sync(c, &id)).await?)
    }

    async fn set_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, KeyStoreError> {
        let (s, specs) = (subject.clone(), specs.to_vec());
        Ok(self
            .db
            .call(move |c| set_limits_sync(c, &s, &specs))
            .await?)
    }

    async fn replace_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Option<Vec<String>>, KeyStoreError> {
        let (s, specs) = (subject.clone(), specs.to_vec());
        // Clear and set in one database call: one transaction, so no request ever sees the
        // subject half-updated (or, between the two, unlimited).
        Ok(self
            .db
            .call(move |c| -> Result<Option<Vec<String>>, DbError> {
                if let Subject::Key(id) = &s
                    && show_sync(c, id)?.is_none()
                {
                    return Ok(None);
                }
                clear_limits_sync(c, &s, &[])?;
                if specs.is_empty() {
                    Ok(Some(Vec::new()))
                } else {
                    Ok(Some(set_limits_sync(c, &s, &specs)?))
                }
            })
            .await?)
    }

    async fn clear_limits(
        &self,
        subject: &Subject,
        specs: &[String],
    ) -> Result<Vec<String>, KeyStoreError> {
        let (s, specs) = (subject.clone(), specs.to_vec());
        Ok(self
            .db
            .call(move |c| clear_limits_sync(c, &s, &specs))
            .await?)
    }

    async fn config_rev(&self) -> Result<i64, KeyStoreError> {
        Ok(self.db.call(config_rev).await?)
    }

    async fn snapshot(&self) -> Result<Snapshot, KeyStoreError> {
        Ok(self.db.call(snapshot_sync).await?)
    }
}

#[async_trait::async_trait]
impl DirectorySource for Db {
    async fn rev(&self) -> Result<i64, DbError> {
        self.call(config_rev).await
    }
    async fn snapshot(&self) -> Result<Snapshot, DbError> {
        self.call(snapshot_sync).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;

    #[tokio::test]
    async fn create_list_show_revoke_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("k.db"), Durability::Normal).unwrap();
        let (rec, secret) = create(
            &db,
            NewKey {
                name: "app".into(),
                user: Some("alice".into()),
                tenant: None,
                plan: None,
                limits: vec!["requests:total=100".into(), "usd:day=5.50".into()],
            },
        )
        .await
        .unwrap();
        assert!(rec.id.starts_with("k_"));
        assert_eq!(rec.limits, vec!["requests:total=100", "usd:day=5.5"]);
        let hash = hash_secret(&secret);
        let snap = db.call(snapshot_sync).await.unwrap();
        assert_eq!(snap.keys.len(), 1);
        assert_eq!(snap.keys[0].0, hash);
        assert!(snap.rev >= 1);
        // The secret itself is nowhere in the database file.
        let raw = std::fs::read(dir.path().join("k.db")).unwrap();
        let wal = std::fs::read(dir.path().join("k.db-wal")).unwrap_or_default();
        let needle = secret.as_bytes();
        assert!(!raw.windows(needle.len()).any(|w| w == needle));
        assert!(!wal.windows(needle.len()).any(|w| w == needle));

        let id = rec.id.clone();
        let listed = db.call(list_sync).await.unwrap();
        assert_eq!(listed, vec![rec.clone()]);
        let subj = Subject::Key(id.clone());
        let s2 = subj.clone();
        let after = db
            .call(move |c| set_limits_sync(c, &s2, &["requests:total=7".into()]))
            .await
            .unwrap();
        assert_eq!(after, vec!["requests:total=7", "usd:day=5.5"]);
        let s3 = subj.clone();
        let after = db
            .call(move |c| clear_limits_sync(c, &s3, &["usd:day".into()]))
            .await
            .unwrap();
        assert_eq!(after, vec!["requests:total=7"]);
        let id2 = id.clone();
        let revoked = db
            .call(move |c| revoke_sync(c, &id2))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(revoked.status, "revoked");
        assert!(db.call(|c| show_sync(c, "k_nope")).await.unwrap().is_none());
        let bad = create(
            &db,
            NewKey {
                name: "x".into(),
                limits: vec!["bogus".into()],
                ..Default::default()
            },
        )
        .await;
        assert!(bad.is_err());
    }
}
