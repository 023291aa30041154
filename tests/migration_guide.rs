//! docs/migrating-from-litellm.md runs as written: its `toml` blocks form a config, and its
//! `sh` blocks run in order with bash against the built binary (`tollgate` on `PATH`,
//! `TOLLGATE_CONFIG` set, as an operator following the guide would have). The blocks are
//! read from the guide itself, so the guide and this test cannot drift apart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const GUIDE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docs/migrating-from-litellm.md"
);

/// Fenced blocks of the guide: (language, text), in order.
fn blocks(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in markdown.lines() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(lang)) => open = Some((lang.trim().to_string(), String::new())),
            (Some(_), Some(_)) => out.extend(open.take()),
            (Some((_, text)), None) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

fn run(dir: &Path, script: &str) -> (bool, String) {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("TOLLGATE_CONFIG", dir.join("config.toml"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn cli_json(dir: &Path, args: &str) -> Value {
    let (ok, out) = run(dir, &format!("tollgate {args} --json"));
    assert!(ok, "{args}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args}: {e}: {out}"))
}

#[test]
fn the_guide_runs_as_written() {
    let guide = std::fs::read_to_string(GUIDE).unwrap();
    let blocks = blocks(&guide);
    let dir = tempfile::tempdir().unwrap();
    // The operator's own part of the config: where the ledger lives (and an admin port
    // of its own, so no other instance on this machine answers `usage`).
    let mut config = format!(
        "[server]\nadmin_listen = \"127.0.0.1:{}\"\n\n[storage]\njournal_path = \"tollgate.db\"\n\n",
        free_port()
    );
    for (_, text) in blocks.iter().filter(|(lang, _)| lang == "toml") {
        config.push_str(text);
        config.push('\n');
    }
    std::fs::write(dir.path().join("config.toml"), &config).unwrap();
    let scripts: Vec<&String> = blocks
        .iter()
        .filter(|(lang, _)| lang == "sh")
        .map(|(_, t)| t)
        .collect();
    assert!(
        scripts.len() >= 3,
        "the guide's shell examples: {scripts:?}"
    );
    for script in &scripts {
        let (ok, out) = run(dir.path(), script);
        assert!(ok, "this example failed:\n{script}\n---\n{out}");
    }

    // What the examples promise.
    let keys = cli_json(dir.path(), "keys list");
    let keys = keys.as_array().unwrap();
    let find = |name: &str| {
        keys.iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("no key {name}: {keys:?}"))
    };
    let search = find("search-prod");
    assert_eq!(search["user"], "ann");
    assert_eq!(search["tenant"], "search");
    let limits: Vec<&str> = search["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    for l in [
        "usd:month=50",
        "tokens:minute=200000",
        "requests:minute=120",
    ] {
        assert!(limits.contains(&l), "{l} in {limits:?}");
    }
    assert_eq!(find("batch-job")["plan"], "team-basic");
    let tenant = cli_json(dir.path(), "usage --tenant search");
    let specs: Vec<&str> = tenant["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["spec"].as_str().unwrap())
        .collect();
    assert!(specs.contains(&"usd:month=500"), "{specs:?}");
    let id = search["id"].as_str().unwrap();
    let usage = cli_json(dir.path(), &format!("usage --key {id}"));
    let n = usage["limits"].as_array().unwrap().len();
    assert_eq!(n, 4, "key, and tenant limits apply: {usage}");
}

#[test]
fn blocks_are_read_in_order_with_their_language() {
    let md = "text\n```sh\na\nb\n```\n\n```toml\nx = 1\n```\n```json\n{}\n```\n";
    let b = blocks(md);
    assert_eq!(
        b,
        vec![
            ("sh".to_string(), "a\nb\n".to_string()),
            ("toml".to_string(), "x = 1\n".to_string()),
            ("json".to_string(), "{}\n".to_string()),
        ]
    );
}
