//! The alerting rules shipped in `docs/prometheus-rules.yml`: valid (`promtool check
//! rules`), each expression unit-tested (`promtool test rules` over
//! `docs/prometheus-rules.test.yml`, where every alert must both fire and stay silent),
//! each documented in docs/operations.md, and every metric they query exported by a
//! running instance.
//!
//! promtool is required: without it this test fails (`scripts/setup.sh --test` installs
//! Debian's `prometheus` package, which ships it; `TOLLGATE_PROMTOOL=/path/to/promtool`
//! picks another binary).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Metrics the rules query that this build does not export yet. Empty: every metric the
/// rules query is exported (a new rule on a metric still to come would list it here).
const NOT_YET_EXPORTED: &[&str] = &[];

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_PROMTOOL") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("promtool").is_file() {
            return dir.join("promtool");
        }
    }
    panic!(
        "promtool is required to check the alerting rules but is not on PATH: run \
         `scripts/setup.sh --test` (installs the Debian package `prometheus`) or set \
         TOLLGATE_PROMTOOL=/path/to/promtool"
    );
}

fn run_promtool(args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(docs())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The alert names of the rules file, in order.
fn alerts(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn rules_are_valid_and_every_alert_is_tested_both_ways() {
    let out = run_promtool(&["check", "rules", "prometheus-rules.yml"]);
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
    let out = run_promtool(&["test", "rules", "prometheus-rules.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");

    let rules = std::fs::read_to_string(docs().join("prometheus-rules.yml")).unwrap();
    let tests = std::fs::read_to_string(docs().join("prometheus-rules.test.yml")).unwrap();
    let names = alerts(&rules);
    assert_eq!(names.len(), 7, "{names:?}");
    // Per alert: an evaluation that expects it to fire and one that expects silence.
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for name in &names {
        let mut fires = false;
        let mut silent = false;
        for (i, l) in lines.iter().enumerate() {
            if *l == format!("alertname: {name}") {
                match lines.get(i + 1) {
                    Some(&"exp_alerts: []") => silent = true,
                    Some(&"exp_alerts:") => fires = true,
                    other => panic!("{name}: unexpected {other:?}"),
                }
            }
        }
        assert!(fires && silent, "{name}: fires {fires}, silent {silent}");
    }
    // Each alert has its section in docs/operations.md (its `runbook` annotation).
    let ops = std::fs::read_to_string(docs().join("operations.md")).unwrap();
    for name in &names {
        assert!(
            ops.contains(&format!("\n### {name}\n")),
            "docs/operations.md has no `### {name}` section"
        );
        assert!(
            rules.contains(&format!(
                "runbook: \"docs/operations.md#{}\"",
                name.to_lowercase()
            )),
            "{name} has no runbook annotation"
        );
    }
}

#[tokio::test]
async fn every_metric_the_rules_query_is_exported() {
    let rules = std::fs::read_to_string(docs().join("prometheus-rules.yml")).unwrap();
    let mut queried = BTreeSet::new();
    for l in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
    {
        let mut rest = l;
        while let Some(i) = rest.find("tollgate_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            queried.insert(name);
        }
    }
    assert!(queried.len() >= 7, "{queried:?}");

    let (_mock, proxy) = start(ProxyOptions::default()).await;
    // One forwarded request, so the latency histogram has its buckets.
    let (id, key) = proxy
        .create_live_key(&["--limit", "requests:total=10"])
        .await;
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    proxy.wait_settled().await;
    let text = send("GET", &format!("http://{}/metrics", proxy.admin), &[], "")
        .await
        .text();
    let exported: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for name in &queried {
        if NOT_YET_EXPORTED.contains(&name.as_str()) {
            assert!(
                !exported.contains(name.as_str()),
                "{name} is exported now: remove it from NOT_YET_EXPORTED"
            );
            continue;
        }
        assert!(
            exported.contains(name.as_str()),
            "the rules query {name}, which /metrics does not export"
        );
    }
    // The two levels this build added for the rules exist from start, at 0.
    assert!(
        text.contains("\ntollgate_journal_oldest_unshipped_seconds 0\n"),
        "{text}"
    );
    assert!(
        text.contains("\ntollgate_reconcile_differences 0\n"),
        "{text}"
    );

    // Drift: a settled row the running counters never saw. The instance's reconcile finds
    // it and the gauge says so until a reconcile finds none.
    let c = rusqlite::Connection::open(proxy.db_path()).unwrap();
    c.execute(
        "INSERT INTO billing_transactions (trace_id, key_id, upstream, model, status, started_at, instance_id)
         VALUES ('elsewhere-1', ?1, 'openai', 'gpt-4o-mini', 'settled', ?2, 'elsewhere')",
        rusqlite::params![id, tollgate::time::now_text()],
    )
    .unwrap();
    let gauge = || async {
        let text = send("GET", &format!("http://{}/metrics", proxy.admin), &[], "")
            .await
            .text();
        text.lines()
            .find_map(|l| l.strip_prefix("tollgate_reconcile_differences "))
            .unwrap()
            .to_string()
    };
    let reconcile = |fix: bool| {
        let (code, out, err) = proxy.cli(if fix {
            &["reconcile", "--fix", "--json"][..]
        } else {
            &["reconcile", "--json"][..]
        });
        assert!(code == 0 || code == 1, "{out} {err}");
        code
    };
    assert_eq!(reconcile(false), 1);
    assert_eq!(gauge().await, "1");
    assert_eq!(reconcile(true), 1, "the fix reports what it found");
    assert_eq!(gauge().await, "1");
    assert_eq!(reconcile(false), 0);
    assert_eq!(gauge().await, "0");
}
