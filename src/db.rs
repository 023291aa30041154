//! The embedded SQLite database: one connection owned by one dedicated thread.
//!
//! `rusqlite::Connection` is `Send` but not `Sync`, and SQLite serialises writers anyway,
//! so every statement runs on one thread fed by a channel. That thread commits in groups:
//! it takes every job already queued (up to [`MAX_GROUP`]), runs each inside its own
//! SAVEPOINT of one transaction, commits once, and only then answers the callers — so a
//! caller that got `Ok` knows its write is in the WAL (and fsynced with
//! `durability = "full"`). Under load this turns N commits into one; alone, a job costs a
//! channel hop plus one commit.
//!
//! Writes whose caller is not waiting on the request path (settles and releases, which run
//! after the response) go through [`Db::call_deferred`]: a group made only of such jobs
//! waits up to [`DEFER_WINDOW`] for company before it commits, so at low concurrency a
//! settle shares the next reservation's commit instead of costing one of its own.
//!
//! Checkpoints run on a second thread with its own connection ([`checkpoint_loop`]), so a
//! reservation never waits behind the copy of the WAL into the database file and its fsync
//! (with SQLite's automatic checkpoint, the commit that crossed 1,000 pages did that inline:
//! a multi-millisecond stall every few thousand requests). The writer checkpoints inline
//! only when the WAL has grown past [`WAL_FORCE_FRAMES`] (the background checkpoints could
//! not catch up with a continuous stream of commits, which keeps the WAL from rewinding);
//! by then the background thread has copied almost every frame, so that pass is short.
//!
//! Nothing here blocks the async reactor: callers await a oneshot.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

/// `storage.durability`: how hard a journal commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// WAL + `synchronous=NORMAL`: survives a process crash (SIGKILL); a power loss can
    /// lose the last commits.
    Normal,
    /// WAL + `synchronous=FULL`: every journal commit is fsynced.
    Full,
}

/// Most jobs committed together.
const MAX_GROUP: usize = 256;

/// Longest a group of deferred jobs waits for another job before committing.
pub const DEFER_WINDOW: Duration = Duration::from_millis(2);

/// How often the checkpoint thread copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL size (in pages) past which the writer checkpoints inline so the WAL can rewind.
const WAL_FORCE_FRAMES: i64 = 8192;

/// Numbered migrations of the embedded schema, applied in order by [`Db::open`].
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../migrations/sqlite/0002_journal.sql")),
    (3, include_str!("../migrations/sqlite/0003_alert_marks.sql")),
    (
        4,
        include_str!("../migrations/sqlite/0004_price_fields.sql"),
    ),
    (
        5,
        include_str!("../migrations/sqlite/0005_journal_quarantine.sql"),
    ),
    (
        6,
        include_str!("../migrations/sqlite/0006_journal_progress.sql"),
    ),
    (
        7,
        include_str!("../migrations/sqlite/0007_spend_rollups.sql"),
    ),
    (8, include_str!("../migrations/sqlite/0008_rerate.sql")),
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database thread has stopped")]
    Closed,
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// A store this answer depends on cannot be reached (shared mode: the Postgres ledger
    /// of record, asked whether another instance saw an `Idempotency-Key`).
    #[error("{0}")]
    Unavailable(String),
}

type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
type Work = Box<dyn FnOnce(&Connection) -> Reply + Send>;

struct Job {
    work: Work,
    /// The caller can wait: commit may be put off for up to [`DEFER_WINDOW`].
    deferred: bool,
}

/// Handle to the database thread. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

impl Db {
    /// Open (creating if needed) the database at `path`, apply migrations and start the
    /// thread.
    pub fn open(path: &Path, durability: Durability) -> Result<Db, DbError> {
        let conn = open_connection(path, durability)?;
        migrate(&conn)?;
        // Checkpoints are the checkpoint thread's job (see the module docs).
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
        let checkpointer = open_connection(path, durability)?;
        let state = Arc::new(CheckpointState::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let writer_state = state.clone();
        std::thread::Builder::new()
            .name("tollgate-db".into())
            .spawn(move || run(conn, rx, writer_state))
            .map_err(|e| DbError::Invalid(format!("cannot start database thread: {e}")))?;
        std::thread::Builder::new()
            .name("tollgate-ckpt".into())
            .spawn(move || checkpoint_loop(checkpointer, state))
            .map_err(|e| DbError::Invalid(format!("cannot start checkpoint thread: {e}")))?;
        Ok(Db {
            tx,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on the database thread inside the current group transaction; resolves once
    /// the group is committed. An error from `f` rolls back only `f`'s own statements.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        self.submit(f, false).await
    }

    /// [`Db::call`] for a caller that is not on a request's critical path: the commit may
    /// wait up to [`DEFER_WINDOW`] to share a group with other work. Just as durable once
    /// it resolves.
    pub async fn call_deferred<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        self.submit(f, true).await
    }

    async fn submit<T, F>(&self, f: F, deferred: bool) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (otx, orx) = oneshot::channel::<Result<T, DbError>>();
        self.send(f, deferred, move |out| {
            let _ = otx.send(out);
        })?;
        orx.await.map_err(|_| DbError::Closed)?
    }

    /// Blocking variant of [`Db::call`] for CLI commands and start-up (never on the reactor).
    pub fn call_blocking<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (otx, orx) = std::sync::mpsc::channel::<Result<T, DbError>>();
        self.send(f, false, move |out| {
            let _ = otx.send(out);
        })?;
        orx.recv().map_err(|_| DbError::Closed)?
    }

    /// Queue `f` for the database thread; `deliver` gets its result once the group it ran
    /// in is committed (or the commit's error).
    fn send<T, F>(
        &self,
        f: F,
        deferred: bool,
        deliver: impl FnOnce(Result<T, DbError>) + Send + 'static,
    ) -> Result<(), DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let work: Work = Box::new(move |conn: &Connection| {
            let result = in_savepoint(conn, f);
            Box::new(move |commit: Result<(), String>| {
                deliver(match commit {
                    Ok(()) => result,
                    Err(e) => Err(DbError::Invalid(format!("commit failed: {e}"))),
                })
            }) as Reply
        });
        self.tx
            .send(Job { work, deferred })
            .map_err(|_| DbError::Closed)
    }
}

fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    match f(conn) {
        Ok(v) => {
            conn.prepare_cached("RELEASE job")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

/// Progress shared by the writer and the checkpoint thread.
#[derive(Default)]
struct CheckpointState {
    /// The WAL outgrew [`WAL_FORCE_FRAMES`]: the writer should checkpoint once.
    force: AtomicBool,
    /// The writer has stopped (every [`Db`] handle dropped).
    closed: AtomicBool,
}

fn run(conn: Connection, rx: mpsc::Receiver<Job>, state: Arc<CheckpointState>) {
    let mut replies: Vec<Reply> = Vec::with_capacity(MAX_GROUP);
    while let Ok(first) = rx.recv() {
        let began = conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut s| s.execute([]));
        if let Err(e) = began {
            tracing::error!(error = %e, "database: cannot begin transaction");
        }
        let mut all_deferred = first.deferred;
        replies.push((first.work)(&conn));
        let deadline = Instant::now() + DEFER_WINDOW;
        loop {
            while replies.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => {
                        all_deferred &= job.deferred;
                        replies.push((job.work)(&conn));
                    }
                    Err(_) => break,
                }
            }
            if !all_deferred || replies.len() >= MAX_GROUP {
                break;
            }
            // Only deferred work so far: wait a little for a job to share the commit with.
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(job) => {
                    all_deferred &= job.deferred;
                    replies.push((job.work)(&conn));
                }
                Err(_) => break,
            }
        }
        let commit = conn
            .prepare_cached("COMMIT")
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
            .map_err(|e| e.to_string());
        if let Err(e) = &commit {
            tracing::error!(error = %e, jobs = replies.len(), "database: commit failed");
            let _ = conn.execute_batch("ROLLBACK");
        }
        for reply in replies.drain(..) {
            reply(commit.clone());
        }
        if state.force.swap(false, Ordering::Relaxed)
            && let Err(e) = checkpoint(&conn)
        {
            tracing::warn!(error = %e, "database: checkpoint failed");
        }
    }
    state.closed.store(true, Ordering::Relaxed);
}

/// One passive checkpoint: `(pages in the WAL, pages copied to the database file)`.
fn checkpoint(conn: &Connection) -> Result<(i64, i64), rusqlite::Error> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`], off the writer's
/// thread; asks the writer for an inline pass when the WAL cannot rewind on its own.
fn checkpoint_loop(conn: Connection, state: Arc<CheckpointState>) {
    while !state.closed.load(Ordering::Relaxed) {
        std::thread::sleep(CHECKPOINT_EVERY);
        match checkpoint(&conn) {
            Ok((log, _)) if log > WAL_FORCE_FRAMES => state.force.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "database: background checkpoint skipped"),
        }
    }
    // A last pass so a clean shutdown leaves little WAL behind.
    let _ = checkpoint(&conn);
}

/// Open a connection with the pragmas every tollgate process uses (WAL, so other
/// processes such as the CLI can read while the proxy writes).
///
/// A database tollgate creates is readable by its own user only (0600, and its directory
/// 0700 when tollgate creates that too): the ledger names every key, user and tenant and
/// their spend. SQLite gives the `-wal` and `-shm` files the main file's mode.
pub fn open_connection(path: &Path, durability: Durability) -> Result<Connection, DbError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        let _ = b.create(dir);
    }
    #[cfg(unix)]
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        // An empty file is an empty database; SQLite takes it as it is.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
    }
    let conn = Connection::open(path).map_err(|source| DbError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let sync = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;"
    ))?;
    Ok(conn)
}

/// Apply every migration newer than the database's version. Returns the versions applied.
pub fn migrate(conn: &Connection) -> Result<Vec<i64>, DbError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    )?;
    let current: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        if *version <= current {
            continue;
        }
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let step = conn.execute_batch(sql).and_then(|_| {
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                rusqlite::params![version, crate::time::now_text()],
            )
        });
        match step {
            Ok(_) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(DbError::Invalid(format!("migration {version} failed: {e}")));
            }
        }
        applied.push(*version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_commit_and_errors_roll_back_only_their_own_work() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db"), Durability::Normal).unwrap();
        db.call(|c| {
            c.execute("INSERT INTO limits (subject, spec, created_at) VALUES ('key:a', 'requests:total=1', 'x')", [])?;
            Ok(())
        })
        .await
        .unwrap();
        let failed = db
            .call(|c| {
                c.execute("INSERT INTO limits (subject, spec, created_at) VALUES ('key:b', 'requests:total=1', 'x')", [])?;
                Err::<(), _>(DbError::Invalid("no".into()))
            })
            .await;
        assert!(failed.is_err());
        let n: i64 = db
            .call(|c| Ok(c.query_row("SELECT COUNT(*) FROM limits", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 1);
        // A second open applies no migration twice.
        let conn = open_connection(&dir.path().join("t.db"), Durability::Normal).unwrap();
        assert!(migrate(&conn).unwrap().is_empty());
    }

    #[test]
    fn rows_settled_before_the_price_columns_read_zero_and_null() {
        // A ledger at version 3 with a settled row, upgraded: the row keeps every figure
        // and reads 0 / NULL in the columns of what priced it (docs/architecture.md).
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("old.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .unwrap();
        for (version, sql) in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 'x')",
                [version],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO billing_transactions (trace_id, key_id, upstream, model, status, cache_write_tokens, cost_micros, started_at, instance_id)
             VALUES ('old', 'k_1', 'anthropic', 'claude-opus-4-8', 'settled', 700, 4321, '2026-11-01T00:00:00.000000Z', 'i')",
            [],
        )
        .unwrap();
        assert_eq!(migrate(&conn).unwrap(), vec![4, 5, 6, 7, 8]);
        let row = crate::ledger::sqlite::get(&conn, "old").unwrap().unwrap();
        assert_eq!((row.cache_write_tokens, row.cost_micros), (700, 4321));
        assert_eq!((row.cache_write_1h_tokens, row.tool_calls), (0, 0));
        assert_eq!((row.service_tier, row.price_version), (None, None));
        // Version 7 counted the row already in the ledger in both hourly rollups.
        for table in ["spend_hourly", "spend_hourly_model"] {
            let (hour, requests, cost): (String, i64, i64) = conn
                .query_row(
                    &format!("SELECT hour, requests, cost_micros FROM {table}"),
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            assert_eq!(
                (hour.as_str(), requests, cost),
                ("2026-11-01T00:00:00.000000Z", 1, 4321),
                "{table}"
            );
        }
    }

    #[tokio::test]
    async fn many_concurrent_jobs_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db"), Durability::Normal).unwrap();
        let mut tasks = Vec::new();
        for i in 0..500 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                db.call(move |c| {
                    c.execute(
                        "INSERT INTO limits (subject, spec, created_at) VALUES (?1, 'requests:total=1', 'x')",
                        [format!("key:{i}")],
                    )?;
                    Ok(())
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let n: i64 = db
            .call(|c| Ok(c.query_row("SELECT COUNT(*) FROM limits", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 500);
    }

    /// A job inserting one `limits` row for `key:{i}`.
    fn insert(i: usize) -> impl FnOnce(&Connection) -> Result<(), DbError> + Send + 'static {
        move |c: &Connection| {
            c.execute(
                "INSERT INTO limits (subject, spec, created_at) VALUES (?1, 'requests:total=1', 'x')",
                [format!("key:{i}")],
            )?;
            Ok(())
        }
    }

    #[tokio::test]
    async fn deferred_jobs_commit_alone_and_beside_immediate_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = Db::open(&path, Durability::Normal).unwrap();
        // Alone: no company ever comes, so the window runs out and it commits.
        db.call_deferred(insert(0)).await.unwrap();
        // Mixed, concurrently: every job resolves and lands.
        let mut tasks = Vec::new();
        for i in 1..=300 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    db.call_deferred(insert(i)).await
                } else {
                    db.call(insert(i)).await
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // Resolved means committed: another connection sees every row.
        let other = open_connection(&path, Durability::Normal).unwrap();
        let n: i64 = other
            .query_row("SELECT COUNT(*) FROM limits", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 301);
    }

    #[tokio::test]
    async fn the_checkpoint_thread_copies_the_wal_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = Db::open(&path, Durability::Normal).unwrap();
        for i in 0..200 {
            db.call(insert(i)).await.unwrap();
        }
        // The writer never checkpoints by itself (autocheckpoint is off); within a few
        // periods of the checkpoint thread every frame of the WAL is in the database file.
        let probe = open_connection(&path, Durability::Normal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (busy, log, copied): (i64, i64, i64) = probe
                .query_row("PRAGMA wal_checkpoint(NOOP)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .unwrap_or((1, -1, -2));
            if busy == 0 && log > 0 && copied == log {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "WAL not checkpointed: {log} frames, {copied} copied"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(all(test, unix))]
mod mode_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_database_and_its_wal_are_private_to_the_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state").join("tollgate.db");
        let db = Db::open(&path, Durability::Normal).unwrap();
        db.call_blocking(|c| {
            c.execute_batch("CREATE TABLE IF NOT EXISTS t (x INTEGER); INSERT INTO t VALUES (1);")?;
            Ok(())
        })
        .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600, "database");
        for suffix in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{suffix}", path.display()));
            assert_eq!(mode(&side), 0o600, "{}", side.display());
        }
        assert_eq!(
            mode(path.parent().unwrap()),
            0o700,
            "directory tollgate created"
        );
    }
}
