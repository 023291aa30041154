//! `tollgate check-config` and `tollgate serve` accept exactly the same files.
//!
//! Each bad config of the table is run through both commands of the real binary:
//! `check-config` must refuse it naming the key path and the line, and `serve` must exit
//! non-zero without ever listening. A good config with every kind of value the table
//! spoils passes both (serve answers its health check).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, free_port};

/// The sections a case may change; everything else is a config `serve` starts with.
#[derive(Default, Clone)]
struct Parts {
    storage: &'static str,
    plans: &'static str,
    prices: &'static str,
    alerts: &'static str,
}

const GOOD_STORAGE: &str = r#"mode = "embedded""#;
const GOOD_PLANS: &str = r#"[plans.free]
limits = ["requests:minute=20", "usd:month=5", "tokens:day@openai=100000"]
"#;
const GOOD_PRICES: &str = r#"[prices."house-model"]
input = 0.5
output = 1.5
"#;
const GOOD_ALERTS: &str = r#"[alerts]
thresholds = [80, 100]
webhook = "http://127.0.0.1:9/hooks/tollgate"
"#;

impl Parts {
    fn good() -> Parts {
        Parts {
            storage: GOOD_STORAGE,
            plans: GOOD_PLANS,
            prices: GOOD_PRICES,
            alerts: GOOD_ALERTS,
        }
    }
}

/// Write the config into `dir`; returns its path and the two listen addresses.
fn write(dir: &Path, parts: &Parts) -> (PathBuf, SocketAddr, SocketAddr) {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let text = format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
admin_token = "check-config-admin-token"
instance_id = "check-config"
grace_period = "1s"

[storage]
journal_path = "{db}"
{storage}

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:9"
api_key = "sk-check-config"

[log]
level = "info"
format = "json"

{plans}
{prices}
{alerts}
"#,
        db = dir.join("tollgate.db").display(),
        storage = parts.storage,
        plans = parts.plans,
        prices = parts.prices,
        alerts = parts.alerts,
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    (path, listen, admin)
}

/// 1-based line of the first line of `path`'s file containing `marker`.
fn line_of(path: &Path, marker: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("`{marker}` not in {text}"))
        + 1
}

fn check_config(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `serve` until it exits (or `limit` passes, or — with `until_listening` — both its
/// ports accept), watching both listen ports meanwhile. Returns its exit code (`None`:
/// still running when stopped, then killed), whether a port ever accepted a connection,
/// and its stderr.
fn serve(
    path: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    limit: Duration,
    until_listening: bool,
) -> (Option<i32>, bool, String) {
    let log = path.with_extension("serve.log");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(path)
        .env_remove("TOLLGATE_CONFIG")
        .env_remove("TOLLGATE_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut listened = false;
    let code = loop {
        let up = [listen, admin].map(|addr| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok()
        });
        listened |= up.contains(&true);
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline || (until_listening && up == [true, true]) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        code,
        listened,
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

struct Case {
    name: &'static str,
    parts: Parts,
    /// Key path check-config names, and a text on the line it must name.
    path: &'static str,
    marker: &'static str,
}

fn cases() -> Vec<Case> {
    let good = Parts::good();
    vec![
        Case {
            name: "a plan limit that does not parse",
            parts: Parts {
                plans: "[plans.free]\nlimits = [\"requests:minute=20\",\n  \"usd:fortnight=5\"]\n",
                ..good.clone()
            },
            path: "plans.free.limits[1]",
            marker: "usd:fortnight=5",
        },
        Case {
            name: "a plan limit scoped to an upstream that is not configured",
            parts: Parts {
                plans: "[plans.team]\nlimits = [\"usd:day@gemini=5\"]\n",
                ..good.clone()
            },
            path: "plans.team.limits[0]",
            marker: "usd:day@gemini=5",
        },
        Case {
            name: "a price entry with a rate that is not a number",
            parts: Parts {
                prices: "[prices.\"house-model\"]\ninput = \"cheap\"\noutput = 1.5\n",
                ..good.clone()
            },
            path: "prices.\"house-model\".input",
            marker: "input = \"cheap\"",
        },
        Case {
            name: "a webhook URL that is not http(s)",
            parts: Parts {
                alerts: "[alerts]\nwebhook = \"ftp://hooks.example/tollgate?token=hook-s3cret\"\n",
                ..good.clone()
            },
            path: "alerts.webhook",
            marker: "ftp://hooks.example",
        },
        Case {
            // serve used to fail only when it built the Postgres pool.
            name: "a Postgres URL its client cannot read",
            parts: Parts {
                storage: "mode = \"shared\"\nredis_url = \"redis://127.0.0.1:1/0\"\npostgres_url = \"postgres://tollgate:pg-s3cret@127.0.0.1:notaport/ledger\"\n",
                ..good.clone()
            },
            path: "storage.postgres_url",
            marker: "postgres_url",
        },
        Case {
            // serve used to start and then find Redis "unreachable" on every request.
            name: "a Redis URL its client cannot read",
            parts: Parts {
                storage: "mode = \"shared\"\nredis_url = \"redis://:rd-s3cret@127.0.0.1:notaport/0\"\npostgres_url = \"postgres://tollgate@127.0.0.1:1/ledger\"\n",
                ..good.clone()
            },
            path: "storage.redis_url",
            marker: "redis_url",
        },
    ]
}

#[test]
fn a_good_config_passes_check_config_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (path, listen, admin) = write(dir.path(), &Parts::good());
    let (code, err) = check_config(&path);
    assert_eq!(code, Some(0), "{err}");
    let (code, listened, log) = serve(&path, listen, admin, Duration::from_secs(60), true);
    assert!(listened, "serve did not listen with a good config:\n{log}");
    assert_eq!(code, None, "serve exited with a good config:\n{log}");
}

#[test]
fn check_config_and_serve_refuse_the_same_bad_configs() {
    for case in cases() {
        let dir = tempfile::tempdir().unwrap();
        let (path, listen, admin) = write(dir.path(), &case.parts);
        let line = line_of(&path, case.marker);
        let name = case.name;

        let (code, err) = check_config(&path);
        assert_eq!(code, Some(1), "{name}: check-config accepted it: {err}");
        let expected = format!("{}:{line}: {}", path.display(), case.path);
        assert!(
            err.contains(&expected),
            "{name}: expected `{expected}` in:\n{err}"
        );
        assert!(
            err.contains("1 error(s)"),
            "{name}: one problem only:\n{err}"
        );
        assert!(!err.contains("s3cret"), "{name}: a secret in:\n{err}");

        let (code, listened, log) = serve(&path, listen, admin, Duration::from_secs(30), false);
        assert!(!listened, "{name}: serve listened:\n{log}");
        assert!(
            code.is_some_and(|c| c != 0),
            "{name}: serve did not refuse it (exit {code:?}):\n{log}"
        );
        assert!(log.contains(case.path), "{name}: serve's error:\n{log}");
        assert!(!log.contains("s3cret"), "{name}: a secret in:\n{log}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let parts = Parts {
        storage: "mode = \"shared\"\nredis_url = \"redis://127.0.0.1:notaport\"\npostgres_url = \"postgres://u@127.0.0.1:notaport/l\"\n",
        plans: "[plans.free]\nlimits = [\"usd:fortnight=5\", \"usd:day@gemini=5\"]\n",
        prices: "[prices.\"house-model\"]\ninput = \"cheap\"\n",
        alerts: "[alerts]\nwebhook = \"ftp://hooks.example/x\"\n",
    };
    let (path, _, _) = write(dir.path(), &parts);
    let (code, err) = check_config(&path);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("6 error(s)"), "{err}");
    for key in [
        "storage.redis_url",
        "storage.postgres_url",
        "plans.free.limits[0]",
        "plans.free.limits[1]",
        "prices.\"house-model\".input",
        "alerts.webhook",
    ] {
        assert!(
            err.contains(&format!(": {key}: ")),
            "{key} missing in:\n{err}"
        );
    }
}
