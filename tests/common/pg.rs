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

impl Drop for TestPg {
    fn drop(&mut self) {
        self.stop();
    }
}
