//! The usage page (`GET /admin/`) rendered by headless Chromium against the real binary:
//! after real traffic on two keys, the DOM the page's script builds must show each key, the
//! limits that apply to it with exactly the numbers `/admin/usage` reports, and the trace
//! ids of the ledger rows; data is inserted as text, never as markup.
//!
//! Chromium is required: without it this test fails (`scripts/setup.sh --test` installs the
//! Debian package `chromium`; `TOLLGATE_CHROMIUM=/path/to/chrome` picks another binary).
//! A screenshot of the page is saved as `target/test-artifacts/usage-page.png` (under
//! `$CARGO_TARGET_DIR` when that is set) for people to look at.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";
/// A key name that would run script if the page ever parsed data as HTML.
const HOSTILE_NAME: &str = "<img src=x onerror=alert(1)> & co";

/// The Chromium binary: `TOLLGATE_CHROMIUM`, else the first usual name on `PATH`.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_CHROMIUM") {
        return PathBuf::from(p);
    }
    let names = ["chromium", "chromium-browser", "google-chrome", "chrome"];
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "headless Chromium is required to test the usage page but none of {names:?} is on \
         PATH: run `scripts/setup.sh --test` (installs the Debian package `chromium`) or set \
         TOLLGATE_CHROMIUM=/path/to/chrome"
    );
}

/// Where test artifacts go: `test-artifacts` in the target directory of this build.
fn artifacts_dir() -> PathBuf {
    let target = Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run headless Chromium on `url` with `extra` flags in a fresh profile, at most 90 s;
/// returns its standard output.
async fn run_chromium(url: String, extra: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let bin = chromium();
        let work = tempfile::tempdir().unwrap();
        let out_path = work.path().join("stdout");
        let err_path = work.path().join("stderr");
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                // Virtual time runs the page's timers at once and waits for its fetches.
                "--virtual-time-budget=5000",
            ])
            .arg(format!(
                "--user-data-dir={}",
                work.path().join("profile").display()
            ))
            .args(&extra)
            .arg(&url)
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "chromium did not finish within 90 s; stderr:\n{}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "chromium failed ({status}); stderr:\n{}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        std::fs::read_to_string(&out_path).unwrap()
    })
    .await
    .unwrap()
}

async fn admin(proxy: &Proxy, method: &str, path: &str, body: Option<Value>) -> Reply {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    send(
        method,
        &format!("http://{}{path}", proxy.admin),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        body.map(|b| b.to_string()).unwrap_or_default(),
    )
    .await
}

async fn create_key(proxy: &Proxy, body: Value) -> (String, String) {
    let r = admin(proxy, "POST", "/admin/keys", Some(body)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

async fn usage(proxy: &Proxy, key_id: &str) -> Vec<Value> {
    let r = admin(proxy, "GET", &format!("/admin/usage?key={key_id}"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v.get("error").is_none(), "{v}");
    v["limits"].as_array().unwrap().clone()
}

/// Integers as the page shows them: `1234567` → `1,234,567`.
fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// A usage amount as the page shows it: USD decimal strings without zeros past the cents
/// (`"5.000000"` → `$5.00`, `"0.004250"` → `$0.00425`), counts grouped.
fn shown(metric: &str, v: &Value) -> String {
    if metric == "usd" {
        let s = v.as_str().unwrap();
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let mut frac = frac.trim_end_matches('0').to_string();
        while frac.len() < 2 {
            frac.push('0');
        }
        format!("${whole}.{frac}")
    } else {
        grouped(v.as_i64().unwrap())
    }
}

/// The serialized `<tr>` of one limit of one key in the dumped DOM.
fn limit_row<'a>(dom: &'a str, key_id: &str, l: &Value) -> &'a str {
    let marker = format!(
        r#"<tr class="limit" data-key="{key_id}" data-subject="{}" data-spec="{}">"#,
        l["subject"].as_str().unwrap(),
        l["spec"].as_str().unwrap()
    );
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no row `{marker}` in the page:\n{dom}"));
    let len = dom[start..].find("</tr>").unwrap();
    &dom[start..start + len]
}

#[tokio::test]
async fn usage_page_shows_keys_limits_usage_and_transactions() {
    let bin = chromium();
    let mock = tollgate::mock::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = Proxy::start(
        mock.addr,
        ProxyOptions {
            extra: "[plans.team]\nlimits = [\"tokens:month=2000000\"]\n".into(),
            ..ProxyOptions::default()
        },
    )
    .await;

    let (a, a_secret) = create_key(
        &proxy,
        json!({"name": "billing-service", "user": "alice", "tenant": "acme", "plan": "team",
               "limits": ["requests:total=20", "usd:total=0.01", "tokens:day=5000"]}),
    )
    .await;
    let (b, b_secret) = create_key(
        &proxy,
        json!({"name": HOSTILE_NAME, "limits": ["requests:total=4", "tokens:total=1500", "requests:day@anthropic=0"]}),
    )
    .await;
    let (c, _) = create_key(&proxy, json!({"name": "retired-batch-job"})).await;
    assert_eq!(
        admin(&proxy, "DELETE", &format!("/admin/keys/{c}"), None)
            .await
            .status,
        200
    );
    let r = admin(
        &proxy,
        "PUT",
        "/admin/users/alice/limits",
        Some(json!({"limits": ["usd:day=5"]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    for (secret, n, text) in [
        (&a_secret, 3, "summarise the quarterly report"),
        (&b_secret, 2, "hi"),
    ] {
        for _ in 0..n {
            let r = post_json(
                &proxy.url(CHAT),
                secret,
                &chat_body("gpt-4o-mini", false, text),
                &[],
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    eventually("5 settled ledger rows", || {
        let rows = proxy.ledger();
        rows.len() == 5 && rows.iter().all(|r| r["status"] == "settled")
    })
    .await;

    let r = admin(&proxy, "GET", "/admin/transactions?limit=25", None).await;
    let traces: Vec<String> = r.json()["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["trace_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(traces.len(), 5);

    // Nothing is in flight, so usage only moves if a window rolls over while the page
    // renders (`tokens:day` at midnight UTC); then render again.
    let url = format!("http://{}/admin/?token={ADMIN_TOKEN}", proxy.admin);
    let mut attempt = 0;
    let (dom, usages) = loop {
        attempt += 1;
        let before = [usage(&proxy, &a).await, usage(&proxy, &b).await];
        let dom = run_chromium(url.clone(), vec!["--dump-dom".into()]).await;
        let after = [usage(&proxy, &a).await, usage(&proxy, &b).await];
        if before == after || attempt == 3 {
            assert_eq!(before, after, "usage kept moving");
            break (dom, before);
        }
    };

    assert!(
        dom.contains(r#"<body data-state="ready">"#),
        "the page did not finish loading:\n{dom}"
    );
    for id in [&a, &b, &c] {
        assert!(dom.contains(id.as_str()), "key {id} missing:\n{dom}");
    }
    assert!(dom.contains("billing-service"));
    // The hostile name is text: escaped in the DOM, and no element was made from it.
    assert!(
        dom.contains("&lt;img src=x onerror=alert(1)&gt; &amp; co"),
        "{dom}"
    );
    assert!(!dom.contains("<img"), "{dom}");

    let mut nonzero = 0;
    for (key_id, limits) in [(&a, &usages[0]), (&b, &usages[1])] {
        for l in limits {
            let metric = l["metric"].as_str().unwrap();
            let row = limit_row(&dom, key_id, l);
            assert!(row.contains(l["spec"].as_str().unwrap()), "{row}");
            for (field, class) in [
                ("used", r#"<b class="used">"#),
                ("reserved", r#"<span class="reserved">"#),
                ("remaining", r#"<span class="remaining">"#),
                ("limit", r#"<span class="limit-value">"#),
            ] {
                let want = format!("{class}{}<", shown(metric, &l[field]));
                assert!(
                    row.contains(&want),
                    "{key_id} {}: want {want} in {row}",
                    l["spec"]
                );
            }
            if l["used"] != json!(0) && l["used"] != json!("0.000000") {
                nonzero += 1;
            }
        }
    }
    // Key A: its 3 limits, its user's and its plan's; key B: its 3.
    assert_eq!((usages[0].len(), usages[1].len()), (5, 3));
    assert!(nonzero >= 6, "traffic shows up as usage: {usages:?}");
    // Bars are sized from the same numbers: 3 of 20 requests is 15 %.
    let requests_a = usages[0]
        .iter()
        .find(|l| l["spec"] == "requests:total=20")
        .unwrap();
    assert_eq!(requests_a["used"], 3);
    assert!(
        limit_row(&dom, &a, requests_a).contains(r#"<div class="used some" style="width: 15%;">"#),
        "{}",
        limit_row(&dom, &a, requests_a)
    );
    let disabled = usages[1]
        .iter()
        .find(|l| l["spec"] == "requests:day@anthropic=0")
        .unwrap();
    assert!(limit_row(&dom, &b, disabled).contains("disabled"));
    assert!(dom.contains("Revoked: requests with this key are refused."));

    for t in &traces {
        assert!(dom.contains(t.as_str()), "trace id {t} missing:\n{dom}");
    }
    assert!(
        !dom.contains(ADMIN_TOKEN),
        "the token never reaches the page"
    );

    // A screenshot for people; check it is a real PNG of some size.
    let png = artifacts_dir().join("usage-page.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        url,
        vec![
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1200".into(),
        ],
    )
    .await;
    let bytes = std::fs::read(&png)
        .unwrap_or_else(|e| panic!("{} did not write {}: {e}", bin.display(), png.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(bytes.len() > 20_000, "screenshot is {} bytes", bytes.len());
    eprintln!("usage page screenshot: {}", png.display());
}
