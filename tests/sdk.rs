//! SDK conformance: the official OpenAI and Anthropic SDKs for Python and Node.js, pinned in
//! `tests/sdk/python/requirements.txt` and `tests/sdk/node/package-lock.json` and installed
//! by `scripts/setup.sh --test`, drive tollgate against the mock upstream. Each script
//! asserts what its SDK parsed and the ledger row each call left (see the scripts).
//!
//! The SDKs must be installed: a missing install fails here with the command to run,
//! rather than passing without having run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

const SDK_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk");

/// Keys for one script run: (env name, limits).
const KEYS: &[(&str, &[&str])] = &[
    ("TG_KEY", &[]),
    ("TG_DAY_OPENAI_KEY", &["--limit", "requests:day=1"]),
    ("TG_TOTAL_OPENAI_KEY", &["--limit", "requests:total=1"]),
    ("TG_DAY_ANTHROPIC_KEY", &["--limit", "requests:day=1"]),
    ("TG_TOTAL_ANTHROPIC_KEY", &["--limit", "requests:total=1"]),
];

/// Run `program args` against a fresh proxy with the script environment; panics with the
/// script's output unless every check passed.
async fn conformance(program: &Path, args: &[PathBuf]) {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    // tokio's Command: the mock upstream runs on this test's runtime, which a blocking
    // wait would starve.
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("TG_BASE_URL", format!("http://{}", proxy.addr))
        .env("TG_ADMIN_URL", format!("http://{}", proxy.admin))
        .env("TG_ADMIN_TOKEN", ADMIN_TOKEN)
        // The SDKs read these when present; the test decides every setting itself.
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL")
        .env_remove("ANTHROPIC_AUTH_TOKEN");
    for (name, limits) in KEYS {
        let (id, key) = proxy.create_key(limits);
        cmd.env(name, key).env(format!("{name}_ID"), id);
    }
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "SDK conformance failed ({}):\n{text}\n--- proxy log ---\n{}",
        program.display(),
        proxy.logs()
    );
    assert!(text.contains(" passed, 0 failed"), "{text}");
}

fn missing(what: &str) -> ! {
    panic!(
        "{what} is not installed; run `scripts/setup.sh --test` (it installs the pinned SDKs into tests/sdk/)"
    )
}

#[tokio::test]
async fn python_sdks() {
    let python = Path::new(SDK_DIR).join(".venv/bin/python");
    if !python.exists() {
        missing("the Python SDK environment (tests/sdk/.venv)");
    }
    conformance(&python, &[Path::new(SDK_DIR).join("python/conformance.py")]).await;
}

#[tokio::test]
async fn node_sdks() {
    let node_dir = Path::new(SDK_DIR).join("node");
    if !node_dir.join("node_modules/openai").exists()
        || !node_dir.join("node_modules/@anthropic-ai/sdk").exists()
    {
        missing("the Node.js SDKs (tests/sdk/node/node_modules)");
    }
    conformance(Path::new("node"), &[node_dir.join("conformance.mjs")]).await;
}
