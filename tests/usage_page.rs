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
    let (_mock, proxy) = start(ProxyOptions {
        extra: "[plans.team]\nlimits = [\"tokens:month=2000000\"]\n".into(),
        ..ProxyOptions::default()
    })
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
    let version = r.json()["transactions"][0]["price_version"]
        .as_str()
        .unwrap()
        .to_string();

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
    // Each row shows the version of the price entry that priced it.
    assert_eq!(
        dom.matches(&format!(r#"<span class="mono muted version" title="price entry version (tollgate prices)">{version}</span>"#)).count(),
        5,
        "{dom}"
    );
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

/// Integer micro-dollars as the page shows them: `$` + the exact decimal without zeros
/// past the cents.
fn usd_shown(micros: i64) -> String {
    shown("usd", &json!(tollgate::money::format_usd(micros)))
}

/// The text of the first element that starts with `open` in `dom`, up to `close`.
fn element<'a>(dom: &'a str, open: &str, close: &str) -> &'a str {
    let start = dom
        .find(open)
        .unwrap_or_else(|| panic!("no `{open}` in the page:\n{dom}"));
    let len = dom[start..].find(close).unwrap();
    &dom[start..start + len]
}

#[tokio::test]
async fn spend_charts_show_the_numbers_of_the_spend_api() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let (a, _) = create_key(
        &proxy,
        json!({"name": "search-backend", "user": "alice", "tenant": "acme"}),
    )
    .await;
    let (b, _) = create_key(&proxy, json!({"name": "nightly-batch", "user": "bob"})).await;
    let (c, _) = create_key(&proxy, json!({"name": "idle-key"})).await;

    // A week of ledger rows written straight into the ledger (reports read settled rows,
    // whoever wrote them): three models on two upstreams, a few released and estimated.
    let now = chrono::Utc::now();
    let db = rusqlite::Connection::open(proxy.db_path()).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let models = [
        ("gpt-4o-mini", "openai", 1_200),
        ("gpt-4o", "openai", 41_000),
        ("claude-sonnet-4-5", "anthropic", 93_000),
    ];
    let mut n = 0;
    for hour in (2..6 * 24).step_by(7) {
        for (i, (model, upstream, cost)) in models.iter().enumerate() {
            if (hour + i) % 3 == 0 {
                continue;
            }
            n += 1;
            let key = if n % 3 == 0 { &b } else { &a };
            let status = if n % 11 == 0 { "released" } else { "settled" };
            let cost = if status == "settled" {
                cost * (1 + (hour % 5) as i64)
            } else {
                0
            };
            db.execute(
                "INSERT INTO billing_transactions (trace_id, key_id, user_id, tenant_id, upstream, model, status,
                    input_tokens, output_tokens, cost_micros, usage_source, started_at, settled_at, instance_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 900, 120, ?8, ?9, ?10, ?10, 'seed')",
                rusqlite::params![
                    format!("seed-{n}"),
                    key,
                    if key == &a { "alice" } else { "bob" },
                    if key == &a { Some("acme") } else { None },
                    upstream,
                    model,
                    status,
                    cost,
                    if n % 7 == 0 { "estimated" } else { "upstream" },
                    tollgate::time::to_text(now - chrono::Duration::hours(hour as i64)),
                ],
            )
            .unwrap();
        }
    }
    drop(db);

    let api = |q: String| {
        let proxy = &proxy;
        async move {
            let r = admin(proxy, "GET", &format!("/admin/spend?since=7d&{q}"), None).await;
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()
        }
    };
    let url = format!("http://{}/admin/?token={ADMIN_TOKEN}", proxy.admin);
    let mut attempt = 0;
    let (dom, by_model, top_keys, by_key) = loop {
        attempt += 1;
        let before = api("group_by=day,model&limit=10000".into()).await;
        let dom = run_chromium(
            url.clone(),
            vec!["--dump-dom".into(), "--window-size=1280,1400".into()],
        )
        .await;
        let after = api("group_by=day,model&limit=10000".into()).await;
        // The page asks for the 7 days before its own clock: the same days unless a day
        // boundary passed while it rendered (then render again).
        if before["periods"] == after["periods"] || attempt == 3 {
            assert_eq!(before["periods"], after["periods"]);
            break (
                dom,
                before,
                api("group_by=key&limit=5".into()).await,
                api("group_by=key".into()).await,
            );
        }
    };
    assert!(
        dom.contains(r#"<body data-state="ready">"#),
        "the page did not finish loading:\n{dom}"
    );

    // Every (day, model) point of the chart is the API's, to the micro-dollar.
    let rows = by_model["rows"].as_array().unwrap();
    assert!(rows.len() >= 12, "{by_model}");
    let mut per_day: std::collections::BTreeMap<String, i64> = Default::default();
    for r in rows {
        let day = r["period_start"].as_str().unwrap();
        let micros = r["cost_micros"].as_i64().unwrap();
        *per_day.entry(day.to_string()).or_default() += micros;
        let bar = element(
            &dom,
            &format!(r#"<g class="bar" data-period="{day}""#),
            "</g>",
        );
        let seg = format!(
            r#"data-series="{}" data-micros="{micros}""#,
            r["model"].as_str().unwrap()
        );
        assert!(bar.contains(&seg), "{seg} not in {bar}");
    }
    // One bar per period, empty ones included, each as tall as its day's total.
    let periods = by_model["periods"].as_array().unwrap();
    assert_eq!(dom.matches(r#"<g class="bar""#).count(), periods.len());
    for p in periods {
        let day = p["start"].as_str().unwrap();
        let total = per_day.get(day).copied().unwrap_or(0);
        assert!(
            dom.contains(&format!(
                r#"<g class="bar" data-period="{day}" data-micros="{total}">"#
            )),
            "{day}: {total}"
        );
    }
    // The totals line.
    let totals = &by_model["totals"];
    let cost = totals["cost_micros"].as_i64().unwrap();
    assert_eq!(cost, per_day.values().sum::<i64>());
    assert!(
        dom.contains(&format!(
            r#"<b data-micros="{cost}">{}</b>"#,
            usd_shown(cost)
        )),
        "total {cost} missing"
    );
    assert!(by_model["released_requests"].as_i64().unwrap() > 0);
    assert!(dom.contains(&format!(
        "{} released",
        by_model["released_requests"].as_i64().unwrap()
    )));
    // The legend names each model with its spend.
    for (model, _, _) in models {
        let sum: i64 = rows
            .iter()
            .filter(|r| r["model"] == model)
            .map(|r| r["cost_micros"].as_i64().unwrap())
            .sum();
        let item = element(
            &dom,
            &format!(r#"data-series="{model}"><i"#),
            "</span></span>",
        );
        assert!(item.contains(&usd_shown(sum)), "{item}");
    }
    // Top keys, in the API's order and amounts.
    let top = element(&dom, r#"<div id="top-key">"#, "<h3>Top users");
    let mut last = 0;
    for r in top_keys["rows"].as_array().unwrap() {
        let marker = format!(
            r#"data-who="{}" data-micros="{}""#,
            r["key"].as_str().unwrap(),
            r["cost_micros"]
        );
        let at = top
            .find(&marker)
            .unwrap_or_else(|| panic!("{marker} not in {top}"));
        assert!(at >= last, "top keys out of order");
        last = at;
    }
    assert!(top.contains("search-backend"), "{top}");
    assert!(dom.contains(r#"data-who="acme""#), "top tenants");
    // Each key's sparkline totals its spend; a key that spent nothing shows zero.
    for k in [&a, &b] {
        let micros = by_key["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == k.as_str())
            .unwrap()["cost_micros"]
            .clone();
        assert!(
            dom.contains(&format!(r#"data-key="{k}" data-micros="{micros}">"#)),
            "sparkline of {k}"
        );
    }
    assert!(dom.contains(&format!(r#"data-key="{c}" data-micros="0">"#)));
    assert!(!dom.contains(ADMIN_TOKEN));

    // Another view from the address's fragment: 30 days by day, stacked by upstream.
    let r = admin(
        &proxy,
        "GET",
        "/admin/spend?since=30d&group_by=day,upstream&limit=10000",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let by_upstream = r.json();
    let dom = run_chromium(
        format!("{url}#period=30d&stack=upstream"),
        vec!["--dump-dom".into(), "--window-size=1280,1400".into()],
    )
    .await;
    assert!(dom.contains(r#"id="stack-upstream" aria-pressed="true""#));
    assert_eq!(
        dom.matches(r#"<g class="bar""#).count(),
        by_upstream["periods"].as_array().unwrap().len()
    );
    for r in by_upstream["rows"].as_array().unwrap() {
        let day = r["period_start"].as_str().unwrap();
        let bar = element(
            &dom,
            &format!(r#"<g class="bar" data-period="{day}""#),
            "</g>",
        );
        let seg = format!(
            r#"data-series="{}" data-micros="{}""#,
            r["upstream"].as_str().unwrap(),
            r["cost_micros"]
        );
        assert!(bar.contains(&seg), "{seg} not in {bar}");
    }

    // Screenshots for people: light and dark, desktop and phone widths.
    let dir = artifacts_dir();
    for (name, width, dark) in [
        ("spend-light-1280", 1280, false),
        ("spend-dark-1280", 1280, true),
        ("spend-light-390", 390, false),
        ("spend-dark-390", 390, true),
    ] {
        let png = dir.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&png);
        let mut flags = vec![
            format!("--screenshot={}", png.display()),
            format!("--window-size={width},1500"),
        ];
        if dark {
            flags.push("--force-dark-mode".into());
            flags.push("--blink-settings=preferredColorScheme=0".into());
        }
        run_chromium(url.clone(), flags).await;
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 20_000, "{name} is {} bytes", bytes.len());
        eprintln!("spend page screenshot: {}", png.display());
    }
}
