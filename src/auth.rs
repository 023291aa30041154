//! Authentication: a request's tollgate key → the [`Principal`] it acts for.
//!
//! Every key and limit is held in memory in a [`Directory`] snapshot, so auth on the
//! request path is one SHA-256 and one hash-map lookup, with no store round trip. A
//! background task polls the store's change counter every [`REFRESH_EVERY`] and swaps in
//! a fresh snapshot when it moved: a revoke or limit change made by the CLI or admin API
//! (in any process sharing the store) takes effect within that interval plus one read.
//!
//! A key created a moment ago must work at once (SPEC §4.1), before the next poll. So a
//! presented key that is not in the directory triggers a look-up (`Misses`): the store's
//! change counter is read and, when it moved, the directory is reloaded — then the key is
//! looked up again. The look-ups are bounded so unknown-key traffic cannot turn into a
//! store read per request:
//!
//! - **Negative cache.** A hash a read found unknown is answered 401 without reading again
//!   (up to [`UNKNOWN_CACHE`] hashes, each for [`UNKNOWN_TTL`]). This never hides a new key:
//!   a secret is 256 random bits generated at creation, so no request presented it before.
//! - **Coalescing and rate.** One look-up runs at a time, at most one per
//!   [`MISS_READ_EVERY`]; every miss that arrived before a look-up started is answered by it.
//!   Whatever the flood, this instance makes at most 1 / [`MISS_READ_EVERY`] reads a second
//!   for unknown keys (`tollgate_key_miss_reads_total`).
//! - **Outages.** A failed or slow (over [`MISS_READ_TIMEOUT`]) read is not retried for
//!   [`MISS_BACKOFF`]. A miss that such a read answered, or that arrives during the
//!   back-off, is [`AuthError::Unavailable`] (503 `store_unavailable`), never 401, and is
//!   not remembered: only a read that succeeded can say a key does not exist. Keys in the
//!   directory (in shared mode, the copy kept in the journal while Postgres is down) are
//!   served as usual.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock (the system's, except in tests with a paused clock), for the look-up gate.
use tokio::time::Instant;

use parking_lot::RwLock;

pub use crate::keys::DirectorySource;
use crate::keys::{self, KeyRecord, Snapshot, Subject};
use crate::quota::LimitSpec;
use crate::quota::redis::SubjectRoots;

/// How often running instances look for key and limit changes.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);
/// A background refresh (change counter, then the directory if it moved) slower than
/// this is abandoned and retried at the next tick.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);
/// Least time between two store reads made for unknown keys.
pub const MISS_READ_EVERY: Duration = Duration::from_millis(10);
/// A look-up read slower than this counts as failed.
/// Long enough for a pooled connection to be checked (and replaced) and the directory
/// read on a loaded machine: a slower read answers the miss 503, not 200.
pub const MISS_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed look-up read, misses are answered without reading for this long.
pub const MISS_BACKOFF: Duration = Duration::from_secs(1);
/// Unknown hashes remembered at most (about 150 bytes each).
pub const UNKNOWN_CACHE: usize = 10_000;
/// How long an unknown hash is remembered.
pub const UNKNOWN_TTL: Duration = Duration::from_secs(60);

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
    /// Hashes of revoked keys: known, and refused without asking the store (a revoke is
    /// final).
    revoked: std::collections::HashSet<String>,
    by_id: HashMap<String, (Arc<Principal>, bool)>,
    limits: HashMap<String, Vec<LimitSpec>>,
}

impl Directory {
    pub fn from_snapshot(s: Snapshot) -> Directory {
        let mut by_hash = HashMap::new();
        let mut revoked = std::collections::HashSet::new();
        let mut by_id = HashMap::new();
        for (hash, rec) in s.keys {
            let active = rec.status == "active";
            let p = Arc::new(principal_of(&rec));
            if active {
                by_hash.insert(hash, p.clone());
            } else {
                revoked.insert(hash);
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
            revoked,
            by_id,
            limits,
        }
    }

    /// The active principal whose secret hashes to `hash`.
    pub fn by_hash(&self, hash: &str) -> Option<Arc<Principal>> {
        self.by_hash.get(hash).cloned()
    }

    /// Whether `hash` is the hash of a revoked key.
    pub fn is_revoked(&self, hash: &str) -> bool {
        self.revoked.contains(hash)
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
    /// The key is not in the directory and the store could not be asked (down, slow, or
    /// backing off after a failure): whether it exists is unknown, so it is not refused
    /// as invalid (HTTP 503, not 401) and nothing is remembered about it.
    #[error("cannot check the API key: the key store is unavailable; retry shortly")]
    Unavailable,
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

/// The live directory, refreshed in the background and on a miss.
#[derive(Clone, Default)]
pub struct Authenticator {
    dir: Arc<RwLock<Arc<Directory>>>,
    misses: Arc<Misses>,
}

/// Look-ups of presented keys missing from the directory (see the module docs).
#[derive(Default)]
struct Misses {
    /// The store; unset (no look-ups) until [`Authenticator::with_source`].
    source: Option<Arc<dyn DirectorySource>>,
    /// Hashes a read found unknown, with when.
    unknown: parking_lot::Mutex<HashMap<String, Instant>>,
    /// Serialises look-up reads.
    gate: tokio::sync::Mutex<Gate>,
    stats: LookupStats,
}

#[derive(Default)]
struct Gate {
    /// When the last look-up read started.
    last_read: Option<Instant>,
    /// Whether that read succeeded (a miss it answered may be remembered as unknown).
    last_ok: bool,
    /// No read before this (the last one failed).
    backoff_until: Option<Instant>,
}

/// Counts of look-ups for keys not in the directory (exported as metrics).
#[derive(Debug, Default)]
pub struct LookupStats {
    /// Store reads (change-counter checks; a reload follows only when it moved).
    pub reads: AtomicU64,
    /// Misses a look-up found (a key created since the last refresh).
    pub found: AtomicU64,
    /// Misses answered unknown after a look-up.
    pub unknown: AtomicU64,
    /// Misses answered from the negative cache or during a back-off, without a read.
    pub unread: AtomicU64,
}

impl Authenticator {
    pub fn new(dir: Directory) -> Authenticator {
        Authenticator {
            dir: Arc::new(RwLock::new(Arc::new(dir))),
            misses: Arc::default(),
        }
    }

    /// An authenticator that looks a missing key up in `source` (see the module docs).
    pub fn with_source(dir: Directory, source: Arc<dyn DirectorySource>) -> Authenticator {
        Authenticator {
            dir: Arc::new(RwLock::new(Arc::new(dir))),
            misses: Arc::new(Misses {
                source: Some(source),
                ..Default::default()
            }),
        }
    }

    /// The store this authenticator reads, if any.
    pub fn source(&self) -> Option<Arc<dyn DirectorySource>> {
        self.misses.source.clone()
    }

    /// Counts of look-ups made for unknown keys.
    pub fn lookup_stats(&self) -> &LookupStats {
        &self.misses.stats
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

    /// Authenticate a presented secret: the directory, else a bounded look-up in the store.
    pub async fn authenticate(&self, secret: &str) -> Result<Arc<Principal>, AuthError> {
        if !secret.starts_with(keys::SECRET_PREFIX) {
            return Err(AuthError::Unknown);
        }
        let hash = keys::hash_secret(secret);
        let dir = self.directory();
        if let Some(p) = dir.by_hash(&hash) {
            return Ok(p);
        }
        if dir.is_revoked(&hash) {
            return Err(AuthError::Unknown);
        }
        drop(dir);
        self.look_up(&hash).await
    }

    async fn look_up(&self, hash: &str) -> Result<Arc<Principal>, AuthError> {
        let m = &self.misses;
        let stats = &m.stats;
        let Some(source) = m.source.as_ref() else {
            return Err(AuthError::Unknown);
        };
        let arrived = Instant::now();
        if m.unknown
            .lock()
            .get(hash)
            .is_some_and(|at| arrived.duration_since(*at) < UNKNOWN_TTL)
        {
            stats.unread.fetch_add(1, Ordering::Relaxed);
            return Err(AuthError::Unknown);
        }
        let mut gate = m.gate.lock().await;
        // A read that started after this request arrived has run: its result is in the
        // directory. Otherwise read now (no sooner than MISS_READ_EVERY after the last).
        if gate.last_read.is_none_or(|t| t <= arrived) {
            if gate.backoff_until.is_some_and(|t| Instant::now() < t) {
                drop(gate);
                stats.unread.fetch_add(1, Ordering::Relaxed);
                return self.directory().by_hash(hash).ok_or(AuthError::Unavailable);
            }
            if let Some(last) = gate.last_read {
                tokio::time::sleep_until(last + MISS_READ_EVERY).await;
            }
            gate.last_read = Some(Instant::now());
            stats.reads.fetch_add(1, Ordering::Relaxed);
            let read = tokio::time::timeout(MISS_READ_TIMEOUT, refresh_once(self, source.as_ref()));
            gate.last_ok = match read.await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot look up an unknown key; answering 503 until the store answers");
                    false
                }
                Err(_) => {
                    tracing::warn!("key look-up timed out; answering 503 until the store answers");
                    false
                }
            };
            if !gate.last_ok {
                gate.backoff_until = Some(Instant::now() + MISS_BACKOFF);
            }
        }
        // Only a read that succeeded may call a key unknown; a miss answered by a failed
        // one is a 503, and is not remembered (the key may well exist).
        let answered_by_a_good_read = gate.last_ok;
        drop(gate);
        match self.directory().by_hash(hash) {
            Some(p) => {
                stats.found.fetch_add(1, Ordering::Relaxed);
                Ok(p)
            }
            None if !answered_by_a_good_read => {
                stats.unknown.fetch_add(1, Ordering::Relaxed);
                Err(AuthError::Unavailable)
            }
            None => {
                stats.unknown.fetch_add(1, Ordering::Relaxed);
                let mut unknown = m.unknown.lock();
                if unknown.len() >= UNKNOWN_CACHE {
                    let now = Instant::now();
                    unknown.retain(|_, at| now.duration_since(*at) < UNKNOWN_TTL);
                    if unknown.len() >= UNKNOWN_CACHE {
                        // Still full of fresh entries: start over rather than grow.
                        unknown.clear();
                    }
                }
                unknown.insert(hash.to_string(), arrived);
                Err(AuthError::Unknown)
            }
        }
    }
}

/// Read the store's change counter and, when it moved, install a fresh directory.
async fn refresh_once(
    auth: &Authenticator,
    source: &dyn DirectorySource,
) -> Result<(), crate::db::DbError> {
    let current = auth.directory().rev;
    if source.rev().await? != current {
        let s = source.snapshot().await?;
        tracing::debug!(rev = s.rev, keys = s.keys.len(), "key directory refreshed");
        auth.replace(Directory::from_snapshot(s));
    }
    Ok(())
}

/// Poll the authenticator's store forever, swapping in a new directory whenever its
/// revision moves. Without a store there is nothing to poll.
pub async fn refresh_loop(auth: Authenticator) {
    let Some(source) = auth.source() else {
        return;
    };
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        // A read that hangs (a half-open connection) is abandoned, so the next tick tries
        // again on a fresh connection instead of the loop waiting forever.
        let read = tokio::time::timeout(REFRESH_TIMEOUT, refresh_once(&auth, source.as_ref()));
        match read.await {
            Ok(Ok(())) => failing = false,
            Ok(Err(e)) if !failing => {
                tracing::warn!(error = %e, "cannot refresh key directory; serving the last known keys");
                failing = true;
            }
            Err(_) if !failing => {
                tracing::warn!("key directory refresh timed out; serving the last known keys");
                failing = true;
            }
            Ok(Err(_)) | Err(_) => {}
        }
    }
}

/// Hash-tag roots from the live key directory: a key's counters live under its tenant's
/// tag (else its user's, else its own), so every counter one request touches shares a
/// Redis Cluster slot.
pub struct DirectoryRoots {
    pub auth: Authenticator,
}

impl SubjectRoots for DirectoryRoots {
    fn root_of(&self, subject: &Subject) -> Subject {
        let dir = self.auth.directory();
        match subject {
            Subject::Tenant(_) => subject.clone(),
            Subject::Key(k) => match dir.by_id(k) {
                Some((p, _)) => match (&p.tenant, &p.user) {
                    (Some(t), _) => Subject::Tenant(t.clone()),
                    (None, Some(u)) => Subject::User(u.clone()),
                    (None, None) => subject.clone(),
                },
                None => subject.clone(),
            },
            Subject::User(u) => dir
                .principals()
                .find_map(|(p, _)| {
                    (p.user.as_ref() == Some(u))
                        .then(|| p.tenant.clone())
                        .flatten()
                })
                .map_or_else(|| subject.clone(), Subject::Tenant),
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

    /// A store whose keys a test changes, counting its reads.
    #[derive(Default)]
    struct FakeStore {
        snap: parking_lot::Mutex<Snapshot>,
        reads: AtomicU64,
        failing: std::sync::atomic::AtomicBool,
        /// A read started while set never answers (a half-open connection).
        hanging: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl DirectorySource for FakeStore {
        async fn rev(&self) -> Result<i64, crate::db::DbError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.hanging.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(crate::db::DbError::Invalid("down".into()));
            }
            Ok(self.snap.lock().rev)
        }
        async fn snapshot(&self) -> Result<Snapshot, crate::db::DbError> {
            Ok(self.snap.lock().clone())
        }
    }

    fn record(id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            name: "n".into(),
            user: None,
            tenant: None,
            plan: None,
            limits: vec![],
            status: "active".into(),
            created_at: "t".into(),
        }
    }

    impl FakeStore {
        /// A key created in the store (as the CLI would); returns its secret.
        fn create(&self, id: &str) -> String {
            let secret = keys::generate_secret();
            let mut s = self.snap.lock();
            s.rev += 1;
            s.keys.push((keys::hash_secret(&secret), record(id)));
            secret
        }
    }

    fn paused() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn a_key_created_after_the_last_refresh_works_at_once() {
        let store = Arc::new(FakeStore::default());
        let auth = Authenticator::with_source(Directory::default(), store.clone());
        let rt = paused();
        for i in 0..5 {
            let secret = store.create(&format!("k_{i}"));
            let p = rt.block_on(auth.authenticate(&secret)).unwrap();
            assert_eq!(p.key_id, format!("k_{i}"));
            // Known now: no further read.
            let before = store.reads.load(Ordering::SeqCst);
            rt.block_on(auth.authenticate(&secret)).unwrap();
            assert_eq!(store.reads.load(Ordering::SeqCst), before);
        }
        assert_eq!(auth.lookup_stats().found.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn the_same_unknown_key_is_read_once() {
        let store = Arc::new(FakeStore::default());
        let auth = Authenticator::with_source(Directory::default(), store.clone());
        let rt = paused();
        for _ in 0..100 {
            assert_eq!(
                rt.block_on(auth.authenticate("tg_nobody")),
                Err(AuthError::Unknown)
            );
        }
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        assert_eq!(auth.lookup_stats().unread.load(Ordering::SeqCst), 99);
        // A key created meanwhile is still found (its secret was never presented before).
        let secret = store.create("k_new");
        assert!(rt.block_on(auth.authenticate(&secret)).is_ok());
    }

    #[test]
    fn a_flood_of_distinct_unknown_keys_reads_at_a_bounded_rate() {
        let store = Arc::new(FakeStore::default());
        let auth = Authenticator::with_source(Directory::default(), store.clone());
        let rt = paused();
        let n = 2000;
        let elapsed = rt.block_on(async {
            let t0 = tokio::time::Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for i in 0..n {
                let auth = auth.clone();
                set.spawn(async move {
                    // Arrivals spread over 2 s of (virtual) time.
                    tokio::time::sleep(Duration::from_millis(i % 2000)).await;
                    auth.authenticate(&format!("tg_unknown_{i}")).await
                });
            }
            while let Some(r) = set.join_next().await {
                assert_eq!(r.unwrap(), Err(AuthError::Unknown));
            }
            t0.elapsed()
        });
        let reads = store.reads.load(Ordering::SeqCst);
        let bound = (elapsed.as_millis() / MISS_READ_EVERY.as_millis()) as u64 + 1;
        assert!(
            reads <= bound,
            "{reads} reads in {elapsed:?} (bound {bound})"
        );
        assert!(reads < n / 5, "{reads} reads for {n} unknown keys");
        // The same keys again: all answered from the negative cache.
        rt.block_on(async {
            for i in 0..n {
                let _ = auth.authenticate(&format!("tg_unknown_{i}")).await;
            }
        });
        assert_eq!(store.reads.load(Ordering::SeqCst), reads);
    }

    #[test]
    fn a_failing_store_is_not_hammered() {
        let store = Arc::new(FakeStore::default());
        let known = store.create("k_known");
        let snap = store.snap.lock().clone();
        let auth = Authenticator::with_source(Directory::from_snapshot(snap), store.clone());
        store.failing.store(true, Ordering::SeqCst);
        let rt = paused();
        rt.block_on(async {
            for i in 0..100 {
                let r = auth.authenticate(&format!("tg_x{i}")).await;
                assert_eq!(r, Err(AuthError::Unavailable));
            }
            // Known keys are served from the directory as it is.
            assert!(auth.authenticate(&known).await.is_ok());
        });
        assert_eq!(
            store.reads.load(Ordering::SeqCst),
            1,
            "one read, then back-off"
        );
        rt.block_on(async { tokio::time::sleep(MISS_BACKOFF).await });
        store.failing.store(false, Ordering::SeqCst);
        let fresh = store.create("k_after");
        assert!(rt.block_on(auth.authenticate(&fresh)).is_ok());
    }

    /// A miss answered by a failed read — its own, or one it was coalesced into — is a
    /// 503 and is not remembered: once the store answers again, the key works at once
    /// instead of answering 401 for [`UNKNOWN_TTL`].
    #[test]
    fn a_failed_look_up_is_unavailable_and_never_cached_as_unknown() {
        let store = Arc::new(FakeStore::default());
        let auth = Authenticator::with_source(Directory::default(), store.clone());
        let rt = paused();
        // One good read first, so the next read waits out MISS_READ_EVERY.
        assert_eq!(
            rt.block_on(auth.authenticate("tg_warm_up")),
            Err(AuthError::Unknown)
        );
        let secret = store.create("k_real");
        store.failing.store(true, Ordering::SeqCst);
        let (other, real) = rt.block_on(async {
            // `other` takes the gate and reads after `real` arrived; `real` is answered by
            // that failed read.
            let a = auth.clone();
            let other = tokio::spawn(async move { a.authenticate("tg_someone_else").await });
            let a = auth.clone();
            let s = secret.clone();
            let real = tokio::spawn(async move { a.authenticate(&s).await });
            (other.await.unwrap(), real.await.unwrap())
        });
        assert_eq!(other, Err(AuthError::Unavailable));
        assert_eq!(real, Err(AuthError::Unavailable));
        // During the back-off: still 503, not 401.
        assert_eq!(
            rt.block_on(auth.authenticate(&secret)),
            Err(AuthError::Unavailable)
        );
        store.failing.store(false, Ordering::SeqCst);
        rt.block_on(async { tokio::time::sleep(MISS_BACKOFF).await });
        assert_eq!(
            rt.block_on(auth.authenticate(&secret)).unwrap().key_id,
            "k_real"
        );
        // A key the good read found missing is remembered as unknown.
        assert_eq!(
            rt.block_on(auth.authenticate("tg_someone_else")),
            Err(AuthError::Unknown)
        );
        let reads = store.reads.load(Ordering::SeqCst);
        assert_eq!(
            rt.block_on(auth.authenticate("tg_someone_else")),
            Err(AuthError::Unknown)
        );
        assert_eq!(store.reads.load(Ordering::SeqCst), reads, "cached");
    }

    /// A key the directory knows as revoked is refused (401) without asking the store, so
    /// it stays a 401 while the store is down.
    #[test]
    fn a_revoked_key_is_unknown_even_while_the_store_is_down() {
        let store = Arc::new(FakeStore::default());
        let secret = store.create("k_gone");
        {
            let mut s = store.snap.lock();
            s.rev += 1;
            s.keys[0].1.status = "revoked".into();
        }
        let snap = store.snap.lock().clone();
        let auth = Authenticator::with_source(Directory::from_snapshot(snap), store.clone());
        store.failing.store(true, Ordering::SeqCst);
        let rt = paused();
        assert_eq!(
            rt.block_on(auth.authenticate(&secret)),
            Err(AuthError::Unknown)
        );
        assert_eq!(store.reads.load(Ordering::SeqCst), 0);
    }

    /// A refresh stuck on a connection that never answers is abandoned: once the store
    /// answers again, changes reach the directory within a tick or two.
    #[test]
    fn a_hung_refresh_does_not_stop_the_loop() {
        let store = Arc::new(FakeStore::default());
        let auth = Authenticator::with_source(Directory::default(), store.clone());
        let rt = paused();
        rt.block_on(async {
            let lp = tokio::spawn(refresh_loop(auth.clone()));
            store.create("k_before");
            tokio::time::sleep(REFRESH_EVERY * 2).await;
            assert!(auth.directory().by_id("k_before").is_some());
            store.hanging.store(true, Ordering::SeqCst);
            tokio::time::sleep(REFRESH_EVERY * 2).await;
            store.hanging.store(false, Ordering::SeqCst);
            store.create("k_after");
            tokio::time::sleep(REFRESH_TIMEOUT + REFRESH_EVERY * 2).await;
            assert!(
                auth.directory().by_id("k_after").is_some(),
                "the refresh loop is stuck on a read that never answers"
            );
            lp.abort();
        });
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
        assert!(d.is_revoked("h2") && !d.is_revoked("h1"));
        assert!(!d.by_id("k_2").unwrap().1);
        assert_eq!(d.limits_of(&Subject::Key("k_1".into())).len(), 1);
        assert!(d.knows_subject(&Subject::User("u".into())));
        let auth = Authenticator::new(d);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert_eq!(
            rt.block_on(auth.authenticate("nope")),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            rt.block_on(auth.authenticate("tg_unknown")),
            Err(AuthError::Unknown)
        );
    }
}
