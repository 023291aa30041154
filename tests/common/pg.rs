//! A private PostgreSQL server per test: `initdb` into a temp dir, `pg_ctl start` on a free
//! loopback port (trust auth, fsync off), stopped with `-m immediate` on drop. Never the
//! machine's shared server. When the tests run as root, the server runs as the `postgres`
//! user (initdb refuses root).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Directory holding `initdb`, `pg_ctl` and `postgres`.
fn pg_bin_dir() -> PathBuf {
    let local = Path::new("/usr/local/bin");
    if local.join("initdb").exists() && local.join("pg_ctl").exists() {
        return local.to_path_buf();
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .expect("no PostgreSQL binaries in /usr/local/bin or /usr/lib/postgresql/*/bin")
}

fn id_of(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

pub struct TestPg {
    pub port: u16,
    dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    /// Run the server as `postgres` (we are root).
    as_postgres: bool,
}

impl TestPg {
    /// initdb + start. Panics (failing the test) when PostgreSQL is not installed.
    pub fn start() -> TestPg {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = id_of(&["-u"]) == Some(0);
        if as_postgres {
            let uid = id_of(&["-u", "postgres"]).expect("no postgres user");
            let gid = id_of(&["-g", "postgres"]).expect("no postgres group");
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let pg = TestPg {
            port: super::free_port(),
            dir,
            data,
            bin,
            as_postgres,
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_again();
        pg
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
                .arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// Start the server (again) on the same port and data.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c full_page_writes=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
        );
    }

    /// Stop at once (like a crash: no checkpoint).
    pub fn stop(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?connect_timeout=2",
            self.port
        )
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    /// The ledger of record, oldest first, as JSON rows (same fields as `Proxy::ledger`).
    pub async fn ledger(&self) -> Vec<serde_json::Value> {
        let c = self.client().await;
        let rows = c
            .query(
                "SELECT trace_id, key_id, status, input_tokens, cached_input_tokens, cache_write_tokens,
                        output_tokens, reasoning_tokens, reserved_micros, cost_micros, usage_source, stream,
                        http_status, upstream, model, instance_id, settled_at IS NOT NULL,
                        cache_write_1h_tokens, tool_calls, service_tier, price_version, adjusts,
                        to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
                 FROM billing_transactions ORDER BY started_at, trace_id",
                &[],
            )
            .await
            .unwrap_or_default();
        rows.iter()
            .map(|r| {
                serde_json::json!({
                    "trace_id": r.get::<_, String>(0),
                    "key_id": r.get::<_, String>(1),
                    "status": r.get::<_, String>(2),
                    "input_tokens": r.get::<_, i64>(3),
                    "cached_input_tokens": r.get::<_, i64>(4),
                    "cache_write_tokens": r.get::<_, i64>(5),
                    "output_tokens": r.get::<_, i64>(6),
                    "reasoning_tokens": r.get::<_, i64>(7),
                    "reserved_micros": r.get::<_, i64>(8),
                    "cost_micros": r.get::<_, i64>(9),
                    "usage_source": r.get::<_, Option<String>>(10),
                    "stream": r.get::<_, bool>(11),
                    "http_status": r.get::<_, Option<i32>>(12),
                    "upstream": r.get::<_, String>(13),
                    "model": r.get::<_, String>(14),
                    "instance_id": r.get::<_, String>(15),
                    "final_at_set": r.get::<_, bool>(16),
                    "cache_write_1h_tokens": r.get::<_, i64>(17),
                    "tool_calls": r.get::<_, i64>(18),
                    "service_tier": r.get::<_, Option<String>>(19),
                    "price_version": r.get::<_, Option<String>>(20),
                    "adjusts": r.get::<_, Option<String>>(21),
                    "started_at": r.get::<_, String>(22),
                })
            })
            .collect()
    }

    /// Poll the ledger until `f` holds (shipping is asynchronous).
    pub async fn wait_ledger<F: FnMut(&[serde_json::Value]) -> bool>(
        &self,
        what: &str,
        mut f: F,
    ) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let rows = self.ledger().await;
            if f(&rows) {
                return rows;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for: {what}; ledger: {rows:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl TestPg {
    /// The postmaster and every process it started (backends, background workers).
    pub fn pids(&self) -> Vec<u32> {
        let pm: u32 = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut out = vec![pm];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so split after its `)`.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pm) {
                out.push(pid);
            }
        }
        out
    }

    /// Send `signal` (`STOP`, `CONT`, `KILL`) to the server and all its processes: STOP
    /// freezes it with every connection open (the kernel still accepts and acknowledges),
    /// as a hung host would.
    pub fn signal_all(&self, signal: &str) {
        let pids = self.pids();
        for (i, pid) in pids.iter().enumerate() {
            let out = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .output()
                .unwrap();
            // A backend may exit between the listing and the signal; the postmaster may not.
            assert!(
                i > 0 || out.status.success(),
                "kill -{signal} {pid}: {out:?}"
            );
        }
    }
}

/// A TCP relay in front of a server: [`Relay::freeze`] makes every connection open at
/// that moment half-open for good (bytes are accepted and never delivered, nothing is
/// closed), while connections made afterwards work — a network path that died under
/// established connections, as a NAT or firewall dropping its state does.
pub struct Relay {
    pub port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target_port: u16) -> Relay {
        use std::sync::atomic::Ordering;
        let port = super::free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gen_ = generation.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let born = gen_.load(Ordering::SeqCst);
                let gen_ = gen_.clone();
                tokio::spawn(async move {
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let alive = move || gen_.load(Ordering::SeqCst) == born;
                    let a2 = alive.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if !alive() {
                                std::future::pending::<()>().await;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if !a2() {
                                std::future::pending::<()>().await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Either side ending ends both, unless frozen (then neither ends).
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Relay {
            port,
            generation,
            task,
        }
    }

    /// Make every connection open now half-open, forever.
    pub fn freeze(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// A URL for the server behind the relay.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?connect_timeout=2",
            self.port
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        self.stop();
    }
}
