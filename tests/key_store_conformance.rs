//! One key store conformance suite, run against every `KeyStore` backend: the embedded
//! SQLite database and PostgreSQL (a private server per test). Each case pins behaviour
//! the CLI, the admin API and the key directory rely on in both modes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::pg::TestPg;
use tollgate::config::Durability;
use tollgate::db::Db;
use tollgate::keys::postgres::PgKeyStore;
use tollgate::keys::sqlite::SqliteKeyStore;
use tollgate::keys::{KeyStore, KeyStoreError, NewKey, Subject, hash_secret};
use tollgate::pg::PgPool;

// ---------------------------------------------------------------------------------------
// Backends

enum Backend {
    Sqlite { dir: tempfile::TempDir, db: Db },
    Postgres { pg: TestPg, url: String },
}

impl Backend {
    fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("keys.db"), Durability::Normal).unwrap();
        Backend::Sqlite { dir, db }
    }

    async fn postgres() -> Backend {
        let pg = TestPg::start();
        let url = pg.url();
        PgPool::new(&url).unwrap().migrate().await.unwrap();
        Backend::Postgres { pg, url }
    }

    fn store(&self) -> Arc<dyn KeyStore> {
        match self {
            Backend::Sqlite { db, .. } => Arc::new(SqliteKeyStore::new(db.clone())),
            Backend::Postgres { url, .. } => Arc::new(PgKeyStore::new(url).unwrap()),
        }
    }

    /// Every byte the store keeps about keys: the database files (SQLite), or every row
    /// of every key table as text (Postgres).
    async fn stored_bytes(&self) -> Vec<u8> {
        match self {
            Backend::Sqlite { dir, .. } => {
                let mut out = Vec::new();
                for name in ["keys.db", "keys.db-wal"] {
                    out.extend(std::fs::read(dir.path().join(name)).unwrap_or_default());
                }
                assert!(!out.is_empty());
                out
            }
            Backend::Postgres { pg, .. } => {
                let c = pg.client().await;
                let mut out = Vec::new();
                for table in ["api_keys", "limits", "meta"] {
                    for row in c
                        .query(&format!("SELECT t::text FROM {table} t"), &[])
                        .await
                        .unwrap()
                    {
                        out.extend(row.get::<_, String>(0).into_bytes());
                    }
                }
                assert!(!out.is_empty());
                out
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn new_key(name: &str, limits: &[&str]) -> NewKey {
    NewKey {
        name: name.into(),
        user: Some("alice".into()),
        tenant: Some("acme".into()),
        plan: None,
        limits: limits.iter().map(|s| s.to_string()).collect(),
    }
}

fn specs(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

fn is_invalid(e: &KeyStoreError, mentions: &str) -> bool {
    matches!(e, KeyStoreError::Invalid(m) if m.contains(mentions)) && e.status() == 400
}

// ---------------------------------------------------------------------------------------
// The suite

mod suite {
    use super::*;

    /// A created key is shown and listed as it was created, oldest first, with canonical
    /// limits and without its secret.
    pub async fn create_show_list(b: &Backend) {
        let store = b.store();
        assert!(store.list().await.unwrap().is_empty());
        let (first, secret) = store
            .create(new_key("app", &["requests:total=100", "usd:day=5.50"]))
            .await
            .unwrap();
        assert!(first.id.starts_with("k_"), "{}", first.id);
        assert!(secret.starts_with("tg_"));
        assert_eq!(first.name, "app");
        assert_eq!(first.user.as_deref(), Some("alice"));
        assert_eq!(first.tenant.as_deref(), Some("acme"));
        assert_eq!(first.status, "active");
        assert_eq!(first.limits, vec!["requests:total=100", "usd:day=5.5"]);
        assert!(tollgate::time::from_text(&first.created_at).is_some());

        assert_eq!(store.show(&first.id).await.unwrap(), Some(first.clone()));
        assert_eq!(store.show("k_0000000000000000").await.unwrap(), None);

        let (second, _) = store.create(new_key("batch", &[])).await.unwrap();
        assert!(second.limits.is_empty());
        assert_ne!(second.id, first.id);
        assert_eq!(
            store.list().await.unwrap(),
            vec![first.clone(), second.clone()],
            "oldest first"
        );
        let json = serde_json::to_string(&store.list().await.unwrap()).unwrap();
        assert!(!json.contains(&secret), "no secret in a listing");
    }

    /// Secrets are stored only as their SHA-256: the snapshot carries the hash, and the
    /// raw secret is nowhere in the store.
    pub async fn secrets_stored_only_hashed(b: &Backend) {
        let store = b.store();
        let (rec, secret) = store.create(new_key("app", &[])).await.unwrap();
        let snap = store.snapshot().await.unwrap();
        let hashes: Vec<&str> = snap
            .keys
            .iter()
            .filter(|(_, k)| k.id == rec.id)
            .map(|(h, _)| h.as_str())
            .collect();
        assert_eq!(hashes, vec![hash_secret(&secret).as_str()]);
        assert_eq!(hashes[0].len(), 64);

        let stored = b.stored_bytes().await;
        let needle = secret.as_bytes();
        assert!(
            !stored.windows(needle.len()).any(|w| w == needle),
            "the raw secret is in the store"
        );
        let hash = hash_secret(&secret).into_bytes();
        assert!(
            stored.windows(hash.len()).any(|w| w == hash.as_slice()),
            "the hash is what is stored"
        );
    }

    /// A revoke is final and shown; revoking again or an unknown id changes nothing.
    pub async fn revoke(b: &Backend) {
        let store = b.store();
        let (rec, secret) = store.create(new_key("app", &[])).await.unwrap();
        let (other, _) = store.create(new_key("other", &[])).await.unwrap();
        let revoked = store.revoke(&rec.id).await.unwrap().unwrap();
        assert_eq!(revoked.status, "revoked");
        assert_eq!(revoked.id, rec.id);
        assert_eq!(
            store.show(&rec.id).await.unwrap().unwrap().status,
            "revoked"
        );
        assert_eq!(
            store.show(&other.id).await.unwrap().unwrap().status,
            "active",
            "only that key"
        );
        let snap = store.snapshot().await.unwrap();
        let (_, in_snap) = snap
            .keys
            .iter()
            .find(|(h, _)| h == &hash_secret(&secret))
            .unwrap();
        assert_eq!(in_snap.status, "revoked", "the directory sees the revoke");

        let rev = store.config_rev().await.unwrap();
        let again = store.revoke(&rec.id).await.unwrap().unwrap();
        assert_eq!(again.status, "revoked");
        assert_eq!(store.config_rev().await.unwrap(), rev, "nothing changed");
        assert_eq!(store.revoke("k_0000000000000000").await.unwrap(), None);
        assert_eq!(store.config_rev().await.unwrap(), rev);
    }

    /// `set` replaces the limit of the same metric, window and scope and keeps the rest;
    /// `clear` removes by metric, window and scope (value optional), or everything; a
    /// replacement swaps the whole set. Invalid input is refused and writes nothing.
    pub async fn limits_set_clear_replace(b: &Backend) {
        let store = b.store();
        let (rec, _) = store
            .create(new_key("app", &["requests:total=100", "usd:day=5"]))
            .await
            .unwrap();
        let key = Subject::Key(rec.id.clone());

        let now = store
            .set_limits(
                &key,
                &specs(&["requests:total=7", "tokens:day@openai=1000"]),
            )
            .await
            .unwrap();
        assert_eq!(
            now,
            vec!["requests:total=7", "tokens:day@openai=1000", "usd:day=5"]
        );
        assert_eq!(store.show(&rec.id).await.unwrap().unwrap().limits, now);

        let now = store
            .clear_limits(&key, &specs(&["usd:day"]))
            .await
            .unwrap();
        assert_eq!(now, vec!["requests:total=7", "tokens:day@openai=1000"]);
        let now = store
            .clear_limits(&key, &specs(&["tokens:day@openai=1"]))
            .await
            .unwrap();
        assert_eq!(now, vec!["requests:total=7"], "any value matches");
        let now = store
            .clear_limits(&key, &specs(&["tokens:day"]))
            .await
            .unwrap();
        assert_eq!(
            now,
            vec!["requests:total=7"],
            "another scope is not this limit"
        );

        // Users and tenants hold limits without any key row.
        let user = Subject::User("bob".into());
        assert_eq!(
            store
                .set_limits(&user, &specs(&["usd:month=20"]))
                .await
                .unwrap(),
            vec!["usd:month=20"]
        );
        let snap = store.snapshot().await.unwrap();
        assert!(
            snap.limits
                .contains(&("user:bob".to_string(), "usd:month=20".to_string()))
        );

        let replaced = store
            .replace_limits(&key, &specs(&["input_tokens:hour=50", "usd:week=1.25"]))
            .await
            .unwrap();
        assert_eq!(
            replaced,
            Some(specs(&["input_tokens:hour=50", "usd:week=1.25"]))
        );
        assert_eq!(store.replace_limits(&key, &[]).await.unwrap(), Some(vec![]));
        assert_eq!(
            store
                .replace_limits(
                    &Subject::Key("k_0000000000000000".into()),
                    &specs(&["requests:day=1"])
                )
                .await
                .unwrap(),
            None,
            "no such key"
        );
        assert_eq!(
            store
                .replace_limits(&Subject::Tenant("acme".into()), &specs(&["requests:day=9"]))
                .await
                .unwrap(),
            Some(specs(&["requests:day=9"]))
        );
        assert_eq!(
            store
                .clear_limits(&Subject::Tenant("acme".into()), &[])
                .await
                .unwrap(),
            Vec::<String>::new(),
            "clear with no spec removes all"
        );

        // Validation: refused as Invalid (HTTP 400), nothing written.
        store
            .set_limits(&key, &specs(&["requests:total=3"]))
            .await
            .unwrap();
        let rev = store.config_rev().await.unwrap();
        let e = store
            .set_limits(&key, &specs(&["requests:day=1", "usd:fortnight=1"]))
            .await
            .unwrap_err();
        assert!(is_invalid(&e, "usd:fortnight=1"), "{e:?}");
        let e = store
            .set_limits(&key, &specs(&["bogus"]))
            .await
            .unwrap_err();
        assert!(is_invalid(&e, "bogus"), "{e:?}");
        let e = store
            .replace_limits(&key, &specs(&["requests:total=-1"]))
            .await
            .unwrap_err();
        assert!(is_invalid(&e, "requests:total=-1"), "{e:?}");
        let e = store
            .clear_limits(&key, &specs(&["nonsense:day"]))
            .await
            .unwrap_err();
        assert!(is_invalid(&e, "nonsense:day"), "{e:?}");
        assert_eq!(store.config_rev().await.unwrap(), rev, "nothing written");
        assert_eq!(
            store.show(&rec.id).await.unwrap().unwrap().limits,
            vec!["requests:total=3"]
        );
    }

    /// A create with a bad name or limit is refused and writes nothing.
    pub async fn create_validates(b: &Backend) {
        let store = b.store();
        let rev = store.config_rev().await.unwrap();
        let e = store
            .create(new_key("app", &["requests:total=1", "bogus"]))
            .await
            .unwrap_err();
        assert!(is_invalid(&e, "bogus"), "{e:?}");
        let e = store.create(new_key("", &[])).await.unwrap_err();
        assert!(is_invalid(&e, "name must be 1-200"), "{e:?}");
        let mut bad_user = new_key("app", &[]);
        bad_user.user = Some("a\nb".into());
        let e = store.create(bad_user).await.unwrap_err();
        assert!(is_invalid(&e, "user must be 1-200"), "{e:?}");
        let mut long_plan = new_key("app", &[]);
        long_plan.plan = Some("p".repeat(201));
        let e = store.create(long_plan).await.unwrap_err();
        assert!(is_invalid(&e, "plan must be 1-200"), "{e:?}");
        assert!(store.list().await.unwrap().is_empty());
        assert_eq!(store.config_rev().await.unwrap(), rev);
    }

    /// Every key of a user belongs to one tenant (or all to none): the user's limits are
    /// then counted in one place. A key that would split them is refused.
    pub async fn a_user_stays_in_one_tenant(b: &Backend) {
        let store = b.store();
        store.create(new_key("first", &[])).await.unwrap();
        let rev = store.config_rev().await.unwrap();
        let mut other = new_key("second", &[]);
        other.tenant = Some("globex".into());
        let e = store.create(other).await.unwrap_err();
        assert!(is_invalid(&e, "belongs to one tenant"), "{e:?}");
        let mut none = new_key("third", &[]);
        none.tenant = None;
        let e = store.create(none).await.unwrap_err();
        assert!(is_invalid(&e, "no tenant"), "{e:?}");
        assert_eq!(store.config_rev().await.unwrap(), rev, "nothing written");
        // The same tenant, another user, or no user at all: fine.
        store.create(new_key("fourth", &[])).await.unwrap();
        let mut bob = new_key("bob's", &[]);
        bob.user = Some("bob".into());
        bob.tenant = Some("globex".into());
        store.create(bob).await.unwrap();
        let mut nobody = new_key("service", &[]);
        nobody.user = None;
        nobody.tenant = Some("initech".into());
        store.create(nobody).await.unwrap();
        assert_eq!(store.list().await.unwrap().len(), 4);
    }

    /// Every change moves the revision forward, and a snapshot carries the revision it
    /// was read at.
    pub async fn revision_moves_on_every_change(b: &Backend) {
        let store = b.store();
        let mut rev = store.config_rev().await.unwrap();
        assert_eq!(store.snapshot().await.unwrap().rev, rev);
        let mut moved = |what: &str, now: i64| {
            assert!(now > rev, "{what}: revision {now} did not move past {rev}");
            rev = now;
        };
        let (rec, _) = store.create(new_key("app", &[])).await.unwrap();
        moved("create", store.config_rev().await.unwrap());
        let key = Subject::Key(rec.id.clone());
        store
            .set_limits(&key, &specs(&["requests:day=5"]))
            .await
            .unwrap();
        moved("set", store.config_rev().await.unwrap());
        store
            .replace_limits(&key, &specs(&["requests:day=6"]))
            .await
            .unwrap();
        moved("replace", store.config_rev().await.unwrap());
        store.clear_limits(&key, &[]).await.unwrap();
        moved("clear", store.config_rev().await.unwrap());
        store.revoke(&rec.id).await.unwrap();
        moved("revoke", store.config_rev().await.unwrap());
        let snap = store.snapshot().await.unwrap();
        assert_eq!(snap.rev, rev, "the snapshot carries the current revision");
        assert_eq!(snap.keys.len(), 1);
    }
}

macro_rules! conformance {
    ($backend:ident, $make:expr, [$($test:ident),* $(,)?]) => {
        mod $backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend: Backend = $make;
                    suite::$test(&backend).await;
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($test:ident),* $(,)?) => {
        conformance!(sqlite, Backend::sqlite(), [$($test),*]);
        conformance!(postgres, Backend::postgres().await, [$($test),*]);
    };
}

every_backend!(
    create_show_list,
    secrets_stored_only_hashed,
    revoke,
    limits_set_clear_replace,
    create_validates,
    revision_moves_on_every_change,
    a_user_stays_in_one_tenant,
);
