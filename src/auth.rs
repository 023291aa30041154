//! Authentication: a request's tollgate key → the [`Principal`] it acts for.
//!
//! Every key and limit is held in memory in a [`Directory`] snapshot, so auth on the
//! request path is one SHA-256 and one hash-map lookup, with no store round trip. A
//! background task polls the store's change counter every [`REFRESH_EVERY`] and swaps in
//! a fresh snapshot when it moved: a key created or revoked by the CLI or admin API (in
//! any process sharing the store) takes effect within that interval plus one read.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::keys::{self, KeyRecord, Snapshot, Subject};
use crate::quota::LimitSpec;

/// How often running instances look for key and limit changes.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// Who a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub name: String,
    pub user: Option<String>,
    pub tenant: Option<String>,
    pub plan: Option<String>,
}

impl Principal {
    /// Subjects whose limits apply to this principal: key, then user, then tenant.
    pub fn subjects(&self) -> Vec<Subject> {
        let mut v = vec![Subject::Key(self.key_id.clone())];
        if let Some(u) = &self.user {
            v.push(Subject::User(u.clone()));
        }
        if let Some(t) = &self.tenant {
            v.push(Subject::Tenant(t.clone()));
        }
        v
    }
}

/// Keys and limits at one revision of the store.
#[derive(Debug, Default)]
pub struct Directory {
    pub rev: i64,
    by_hash: HashMap<String, Arc<Principal>>,
    by_id: HashMap<String, (Arc<Principal>, bool)>,
    limits: HashMap<String, Vec<LimitSpec>>,
}

impl Directory {
    pub fn from_snapshot(s: Snapshot) -> Directory {
        let mut by_hash = HashMap::new();
        let mut by_id = HashMap::new();
        for (hash, rec) in s.keys {
            let active = rec.status == "active";
            let p = Arc::new(principal_of(&rec));
            if active {
                by_hash.insert(hash, p.clone());
            }
            by_id.insert(rec.id.clone(), (p, active));
        }
        let mut limits: HashMap<String, Vec<LimitSpec>> = HashMap::new();
        for (subject, spec) in s.limits {
            match LimitSpec::from_str(&spec) {
                Ok(l) => limits.entry(subject).or_default().push(l),
                Err(e) => {
                    tracing::warn!(%subject, %spec, error = %e, "ignoring unparsable stored limit")
                }
            }
        }
        Directory {
            rev: s.rev,
            by_hash,
            by_id,
            limits,
        }
    }

    /// The active principal whose secret hashes to `hash`.
    pub fn by_hash(&self, hash: &str) -> Option<Arc<Principal>> {
        self.by_hash.get(hash).cloned()
    }

    /// A principal by key id, active or not (for usage reports).
    pub fn by_id(&self, id: &str) -> Option<(Arc<Principal>, bool)> {
        self.by_id.get(id).cloned()
    }

    /// Every key's principal and whether it is active.
    pub fn principals(&self) -> impl Iterator<Item = (&Arc<Principal>, bool)> {
        self.by_id.values().map(|(p, active)| (p, *active))
    }

    /// Stored limits of one subject.
    pub fn limits_of(&self, subject: &Subject) -> &[LimitSpec] {
        self.limits
            .get(&subject.as_text())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Every user or tenant that has limits or keys (for usage look-ups by user/tenant).
    pub fn knows_subject(&self, subject: &Subject) -> bool {
        if self.limits.contains_key(&subject.as_text()) {
            return true;
        }
        self.by_id.values().any(|(p, _)| match subject {
            Subject::Key(k) => &p.key_id == k,
            Subject::User(u) => p.user.as_ref() == Some(u),
            Subject::Tenant(t) => p.tenant.as_ref() == Some(t),
        })
    }
}

fn principal_of(rec: &KeyRecord) -> Principal {
    Principal {
        key_id: rec.id.clone(),
        name: rec.name.clone(),
        user: rec.user.clone(),
        tenant: rec.tenant.clone(),
        plan: rec.plan.clone(),
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send `Authorization: Bearer tg_…` or `x-api-key: tg_…`")]
    Missing,
    #[error("invalid API key")]
    Unknown,
    #[error("conflicting API keys in Authorization and x-api-key")]
    Conflict,
}

/// The tollgate secret presented by a request, from `Authorization: Bearer` or
/// `x-api-key`. Two different keys in the two headers are refused.
pub fn presented_secret<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
) -> Result<&'a str, AuthError> {
    let bearer = authorization.and_then(|v| {
        let s = std::str::from_utf8(v).ok()?.trim();
        let (scheme, rest) = s.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let xkey = x_api_key
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim);
    match (bearer, xkey) {
        (Some(a), Some(b)) if a != b => Err(AuthError::Conflict),
        (Some(a), _) if !a.is_empty() => Ok(a),
        (_, Some(b)) if !b.is_empty() => Ok(b),
        _ => Err(AuthError::Missing),
    }
}

/// The live directory, refreshed in the background.
#[derive(Clone, Default)]
pub struct Authenticator {
    dir: Arc<RwLock<Arc<Directory>>>,
}

impl Authenticator {
    pub fn new(dir: Directory) -> Authenticator {
        Authenticator {
            dir: Arc::new(RwLock::new(Arc::new(dir))),
        }
    }

    /// The current snapshot.
    pub fn directory(&self) -> Arc<Directory> {
        self.dir.read().clone()
    }

    /// Install `dir` unless the current directory is newer: a slow background poll must
    /// not roll back a change the admin API installed meanwhile.
    pub fn replace(&self, dir: Directory) {
        let mut current = self.dir.write();
        if dir.rev >= current.rev {
            *current = Arc::new(dir);
        }
    }

    /// Authenticate a presented secret.
    pub fn authenticate(&self, secret: &str) -> Result<Arc<Principal>, AuthError> {
        if !secret.starts_with(keys::SECRET_PREFIX) {
            return Err(AuthError::Unknown);
        }
        let hash = keys::hash_secret(secret);
        self.directory().by_hash(&hash).ok_or(AuthError::Unknown)
    }
}

/// Source of directory snapshots (the embedded database, or Postgres in shared mode).
#[async_trait::async_trait]
pub trait DirectorySource: Send + Sync + 'static {
    /// The store's change counter.
    async fn rev(&self) -> Result<i64, crate::db::DbError>;
    async fn snapshot(&self) -> Result<Snapshot, crate::db::DbError>;
}

#[async_trait::async_trait]
impl DirectorySource for crate::db::Db {
    async fn rev(&self) -> Result<i64, crate::db::DbError> {
        self.call(keys::config_rev).await
    }
    async fn snapshot(&self) -> Result<Snapshot, crate::db::DbError> {
        self.call(keys::snapshot_sync).await
    }
}

/// Poll `source` forever, swapping in a new directory whenever its revision moves.
pub async fn refresh_loop(auth: Authenticator, source: Arc<dyn DirectorySource>) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let current = auth.directory().rev;
        match source.rev().await {
            Ok(rev) if rev == current => {}
            Ok(_) => match source.snapshot().await {
                Ok(s) => {
                    tracing::debug!(rev = s.rev, keys = s.keys.len(), "key directory refreshed");
                    auth.replace(Directory::from_snapshot(s));
                    failing = false;
                }
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "cannot refresh key directory; serving the last known keys");
                    failing = true;
                }
                Err(_) => {}
            },
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot refresh key directory; serving the last known keys");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_from_either_header() {
        assert_eq!(presented_secret(Some(b"Bearer tg_abc"), None), Ok("tg_abc"));
        assert_eq!(
            presented_secret(Some(b"bearer  tg_abc "), None),
            Ok("tg_abc")
        );
        assert_eq!(presented_secret(None, Some(b"tg_abc")), Ok("tg_abc"));
        assert_eq!(
            presented_secret(Some(b"Bearer tg_abc"), Some(b"tg_abc")),
            Ok("tg_abc")
        );
        assert_eq!(
            presented_secret(Some(b"Bearer tg_a"), Some(b"tg_b")),
            Err(AuthError::Conflict)
        );
        assert_eq!(presented_secret(None, None), Err(AuthError::Missing));
        assert_eq!(
            presented_secret(Some(b"Basic xyz"), None),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn directory_finds_active_keys_only() {
        let rec = |id: &str, status: &str| KeyRecord {
            id: id.into(),
            name: "n".into(),
            user: Some("u".into()),
            tenant: None,
            plan: None,
            limits: vec![],
            status: status.into(),
            created_at: "t".into(),
        };
        let snap = Snapshot {
            rev: 3,
            keys: vec![
                ("h1".into(), rec("k_1", "active")),
                ("h2".into(), rec("k_2", "revoked")),
            ],
            limits: vec![("key:k_1".into(), "requests:total=5".into())],
        };
        let d = Directory::from_snapshot(snap);
        assert_eq!(d.by_hash("h1").unwrap().key_id, "k_1");
        assert!(d.by_hash("h2").is_none());
        assert!(!d.by_id("k_2").unwrap().1);
        assert_eq!(d.limits_of(&Subject::Key("k_1".into())).len(), 1);
        assert!(d.knows_subject(&Subject::User("u".into())));
        let auth = Authenticator::new(d);
        assert_eq!(auth.authenticate("nope"), Err(AuthError::Unknown));
        assert_eq!(auth.authenticate("tg_unknown"), Err(AuthError::Unknown));
    }
}
