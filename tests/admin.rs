//! The admin listener end to end (SPEC §6, §9): the real binary, every route of its OpenAPI
//! document, auth, immediate effect of key and limit changes on the proxy, ledger paging,
//! and the metrics the Grafana dashboard is built on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";

/// An admin client that records which documented operations (method, path template) the
/// test exercised.
struct Admin {
    base: String,
    covered: Mutex<BTreeSet<(String, String)>>,
}

impl Admin {
    fn new(proxy: &Proxy) -> Admin {
        Admin {
            base: format!("http://{}", proxy.admin),
            covered: Mutex::new(BTreeSet::new()),
        }
    }

    /// Call a route by its template (`{id}` filled from `id`), with the admin token.
    async fn call(
        &self,
        method: &str,
        template: &str,
        id: Option<&str>,
        query: &str,
        body: Option<Value>,
    ) -> Reply {
        self.covered
            .lock()
            .unwrap()
            .insert((method.to_string(), template.to_string()));
        let path = match id {
            Some(id) => template.replace("{id}", id),
            None => template.to_string(),
        };
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        send(
            method,
            &format!("{}{path}{query}", self.base),
            &headers,
            body,
        )
        .await
    }

    /// A request outside the coverage record (auth and error probes).
    async fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        send(
            method,
            &format!("{}{path}", self.base),
            headers,
            body.to_string(),
        )
        .await
    }
}

async fn chat(proxy: &Proxy, key: &str) -> Reply {
    post_json(
        &proxy.url(CHAT),
        key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await
}

fn error_code(r: &Reply) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_string()
}

/// Every (METHOD, path) operation of an OpenAPI document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method != "parameters" {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// Wait (up to 10 s) until the ledger rows of `key_id` are all final.
async fn settled_rows(proxy: &Proxy, key_id: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<Value> = proxy
            .ledger()
            .into_iter()
            .filter(|r| r["key_id"] == key_id)
            .collect();
        if rows.len() == n && rows.iter().all(|r| r["status"] != "reserved") {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "ledger rows of {key_id}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_documented_route_works() {
    let (_mock, proxy) = start(ProxyOptions::with_extra(
        "[plans.free]\nlimits = [\"requests:minute=100\"]\n",
    ))
    .await;
    let admin = Admin::new(&proxy);

    // The document describes itself, and the same document is compiled in.
    let r = admin
        .call("GET", "/admin/openapi.json", None, "", None)
        .await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(tollgate::admin::OPENAPI).unwrap()
    );

    // The usage page: the compiled-in HTML, never cached, under a strict policy.
    let r = admin.call("GET", "/admin/", None, "", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.header("content-security-policy"),
        Some(tollgate::admin::page::CSP.as_str())
    );
    assert_eq!(r.text(), tollgate::admin::page::PAGE);

    let r = admin.call("GET", "/healthz", None, "", None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = admin.call("GET", "/readyz", None, "", None).await;
    assert_eq!(r.status, 200);
    let ready = r.json();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["mode"], "embedded");
    assert_eq!(ready["stores"]["sqlite"], "up");
    assert_eq!(ready["open_reservations"], 0);
    assert_eq!(ready["backlog"], json!({}));

    // Create: 201 with the secret once; usable on the proxy at once.
    let r = admin
        .call(
            "POST",
            "/admin/keys",
            None,
            "",
            Some(
                json!({"name": "app", "user": "alice", "tenant": "acme", "plan": "free",
                        "limits": ["requests:total=3", "usd:day=5.50"]}),
            ),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let id = created["id"].as_str().unwrap().to_string();
    let secret = created["key"].as_str().unwrap().to_string();
    assert!(id.starts_with("k_"));
    assert!(secret.starts_with("tg_") && secret.len() >= 35);
    let fields: Vec<&str> = created
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        [
            "id",
            "key",
            "name",
            "user",
            "tenant",
            "plan",
            "limits",
            "status",
            "created_at"
        ]
    );
    assert_eq!(
        created["limits"],
        json!(["requests:total=3", "usd:day=5.5"])
    );
    assert_eq!(created["status"], "active");
    assert_eq!(created["plan"], "free");
    assert_eq!(chat(&proxy, &secret).await.status, 200);

    // List and show never carry the secret.
    let r = admin.call("GET", "/admin/keys", None, "", None).await;
    assert_eq!(r.status, 200);
    assert!(!r.text().contains(&secret));
    let listed = r.json()["keys"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(listed[0].get("key").is_none());
    let r = admin
        .call("GET", "/admin/keys/{id}", Some(&id), "", None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), listed[0]);
    let r = admin
        .call("GET", "/admin/keys/{id}", Some("k_nope"), "", None)
        .await;
    assert_eq!((r.status, error_code(&r)), (404, "not_found".into()));

    // Limits: PUT replaces the whole set and is enforced at once.
    let r = admin
        .call(
            "PUT",
            "/admin/keys/{id}/limits",
            Some(&id),
            "",
            Some(json!({"limits": ["requests:total=2"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"subject": format!("key:{id}"), "limits": ["requests:total=2"]})
    );
    assert_eq!(chat(&proxy, &secret).await.status, 200);
    let r = chat(&proxy, &secret).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("requests:total=2"), "{}", r.text());
    let r = admin
        .call(
            "PUT",
            "/admin/keys/{id}/limits",
            Some("k_nope"),
            "",
            Some(json!({"limits": []})),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = admin
        .call(
            "PUT",
            "/admin/users/{id}/limits",
            Some("alice"),
            "",
            Some(json!({"limits": ["usd:day=5", "tokens:5h@openai=20000"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["subject"], "user:alice");
    assert_eq!(
        r.json()["limits"],
        json!(["tokens:5h@openai=20000", "usd:day=5"])
    );
    let r = admin
        .call(
            "PUT",
            "/admin/tenants/{id}/limits",
            Some("acme"),
            "",
            Some(json!({"limits": ["requests:day=1000"]})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"subject": "tenant:acme", "limits": ["requests:day=1000"]})
    );

    // Usage of the key covers its own, its user's, its tenant's and its plan's limits.
    let r = admin
        .call("GET", "/admin/usage", None, &format!("?key={id}"), None)
        .await;
    assert_eq!(r.status, 200);
    let usage = r.json();
    let specs: BTreeSet<(String, String)> = usage["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["subject"].as_str().unwrap().to_string(),
                l["spec"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        (format!("key:{id}"), "requests:total=2"),
        (format!("key:{id}"), "requests:minute=100"),
        ("user:alice".into(), "usd:day=5"),
        ("user:alice".into(), "tokens:5h@openai=20000"),
        ("tenant:acme".into(), "requests:day=1000"),
    ]
    .into_iter()
    .map(|(s, p)| (s, p.to_string()))
    .collect();
    assert_eq!(specs, want);
    let total = usage["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["spec"] == "requests:total=2")
        .unwrap();
    // The second request may still be settling: its hold counts as reserved until then.
    let held = total["used"].as_i64().unwrap() + total["reserved"].as_i64().unwrap();
    assert_eq!((held, total["remaining"].as_i64()), (2, Some(0)));
    let usd = usage["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["spec"] == "usd:day=5")
        .unwrap();
    assert_eq!(usd["limit"], "5.000000", "USD as a decimal string");

    // Transactions: two settled rows of this key, newest first.
    settled_rows(&proxy, &id, 2).await;
    let r = admin
        .call(
            "GET",
            "/admin/transactions",
            None,
            &format!("?key={id}&limit=1"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let page = r.json();
    assert_eq!(page["transactions"].as_array().unwrap().len(), 1);
    assert_eq!(page["transactions"][0]["status"], "settled");
    assert_eq!(page["transactions"][0]["key_id"], id.as_str());
    assert!(page["next_cursor"].is_string());

    // Spend: the settled rows of the ledger, summed (details in tests/spend.rs).
    let r = admin
        .call(
            "GET",
            "/admin/spend",
            None,
            &format!("?since=1d&group_by=key&key={id}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let spend = r.json();
    assert_eq!(spend["rows"][0]["key"], id.as_str());
    assert!(
        spend["totals"]["requests"].as_i64().unwrap() >= 1,
        "{spend}"
    );

    let r = admin.call("GET", "/admin/journal", None, "", None).await;
    assert_eq!((r.status, r.json()), (200, json!({"backlog": {}})));

    let r = admin.call("GET", "/admin/reconcile", None, "", None).await;
    assert_eq!((r.status, &r.json()["differences"]), (200, &json!([])));
    assert_eq!(r.json()["fixed"], false);
    let r = admin
        .call("POST", "/admin/reconcile", None, "?fix=true", None)
        .await;
    assert_eq!((r.status, &r.json()["differences"]), (200, &json!([])));

    let r = admin.call("GET", "/metrics", None, "", None).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert!(r.text().contains("tollgate_settles_total{"), "{}", r.text());

    // Revoke: the key JSON, revoked, refused by the proxy at once; idempotent; 404 unknown.
    let r = admin
        .call("DELETE", "/admin/keys/{id}", Some(&id), "", None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "revoked");
    assert_eq!(r.json()["id"], id.as_str());
    assert_eq!(chat(&proxy, &secret).await.status, 401);
    let again = admin
        .call("DELETE", "/admin/keys/{id}", Some(&id), "", None)
        .await;
    assert_eq!(
        (again.status, again.json()["status"].clone()),
        (200, json!("revoked"))
    );
    let r = admin
        .call("DELETE", "/admin/keys/{id}", Some("k_nope"), "", None)
        .await;
    assert_eq!(r.status, 404);

    // Every operation of the document was exercised above.
    let covered: BTreeSet<(String, String)> = admin.covered.lock().unwrap().clone();
    let missing: Vec<_> = operations(&doc).difference(&covered).cloned().collect();
    assert!(missing.is_empty(), "documented but not tested: {missing:?}");
    let undocumented: Vec<_> = covered.difference(&operations(&doc)).cloned().collect();
    assert!(
        undocumented.is_empty(),
        "tested but not documented: {undocumented:?}"
    );

    // Neither the admin token nor a key secret reached the log.
    let logs = proxy.logs();
    assert!(!logs.contains(ADMIN_TOKEN));
    assert!(!logs.contains(&secret));
}

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let admin = Admin::new(&proxy);
    let doc: Value = serde_json::from_str(tollgate::admin::OPENAPI).unwrap();
    let wrong = "Bearer wrong-token";
    let right = format!("Bearer {ADMIN_TOKEN}");
    let almost = format!("Bearer {}x", ADMIN_TOKEN);
    let basic = format!("Basic {ADMIN_TOKEN}");
    let mut checked = 0;
    for (method, template) in operations(&doc) {
        let path = template.replace("{id}", "k_0");
        let open = doc["paths"][&template][method.to_lowercase()]["security"] == json!([]);
        for auth in [
            None,
            Some(wrong),
            Some(almost.as_str()),
            Some(basic.as_str()),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
            let r = admin.raw(&method, &path, &headers, "{}").await;
            if open {
                assert_ne!(r.status, 401, "{method} {path} is open");
            } else {
                assert_eq!(r.status, 401, "{method} {path} with {auth:?}");
                assert_eq!(error_code(&r), "invalid_admin_token");
                assert!(!r.text().contains(ADMIN_TOKEN));
            }
        }
        checked += 1;
    }
    let routed: usize = tollgate::admin::ROUTES.iter().map(|(_, m)| m.len()).sum();
    assert_eq!(checked, routed);

    // Only the usage page takes the token in the URL (a browser cannot send the header
    // when it navigates); the API routes never do.
    let r = admin
        .raw("GET", &format!("/admin/?token={ADMIN_TOKEN}"), &[], "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    for q in [
        "token=wrong-token".to_string(),
        format!("token={ADMIN_TOKEN}x"),
        format!("token=%20{ADMIN_TOKEN}"),
        "token=".to_string(),
        format!("tokens={ADMIN_TOKEN}"),
    ] {
        let r = admin.raw("GET", &format!("/admin/?{q}"), &[], "").await;
        assert_eq!(
            (r.status, error_code(&r)),
            (401, "invalid_admin_token".into()),
            "{q}"
        );
        assert!(r.text().contains("/admin/?token="), "{}", r.text());
        assert!(!r.text().contains(ADMIN_TOKEN));
    }
    for path in [
        "/admin/keys",
        "/admin/usage",
        "/admin/transactions",
        "/admin/spend",
        "/admin/openapi.json",
        "/admin",
    ] {
        let r = admin
            .raw("GET", &format!("{path}?token={ADMIN_TOKEN}"), &[], "")
            .await;
        assert_eq!(r.status, 401, "{path} takes the token in the header only");
    }
    let r = admin
        .raw("GET", &format!("/admin/?token={ADMIN_TOKEN}&x=1"), &[], "")
        .await;
    assert_eq!(r.status, 400, "unknown page parameters are refused too");

    // Unknown admin paths do not reveal themselves without the token.
    let r = admin.raw("GET", "/admin/secret-stuff", &[], "").await;
    assert_eq!(r.status, 401);
    let auth = [
        ("authorization", right.as_str()),
        ("content-type", "application/json"),
    ];
    let r = admin.raw("GET", "/admin/secret-stuff", &auth, "").await;
    assert_eq!((r.status, error_code(&r)), (404, "not_found".into()));
    let r = admin.raw("PATCH", "/admin/keys", &auth, "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST"));

    // Bad bodies and parameters: 400 with the reason, 413 above 64 KiB.
    let r = admin.raw("POST", "/admin/keys", &auth, "{not json").await;
    assert_eq!((r.status, error_code(&r)), (400, "invalid_request".into()));
    let r = admin
        .raw(
            "POST",
            "/admin/keys",
            &auth,
            r#"{"name":"x","plan":"gold"}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("plan `gold`"), "{}", r.text());
    let r = admin
        .raw(
            "POST",
            "/admin/keys",
            &auth,
            r#"{"name":"x","limits":["usd:fortnight=1"]}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("usd:fortnight=1"), "{}", r.text());
    let r = admin
        .raw(
            "POST",
            "/admin/keys",
            &auth,
            r#"{"name":"x","colour":"red"}"#,
        )
        .await;
    assert_eq!(r.status, 400, "unknown fields are refused");
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(70_000));
    let r = admin.raw("POST", "/admin/keys", &auth, &big).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (413, "request_too_large".into())
    );
    let r = admin
        .raw(
            "PUT",
            "/admin/users/bob/limits",
            &auth,
            r#"{"limits":["requests:day=5","requests:day=6"]}"#,
        )
        .await;
    assert_eq!(r.status, 400, "two values for one counter");
    let r = admin
        .raw(
            "PUT",
            "/admin/users/bob/limits",
            &auth,
            r#"{"limits":["tokens:day=-1"]}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    let r = admin.raw("GET", "/admin/usage", &auth, "").await;
    assert_eq!(r.status, 400);
    let r = admin
        .raw("GET", "/admin/usage?key=k_a&user=u", &auth, "")
        .await;
    assert_eq!(r.status, 400);
    let r = admin.raw("GET", "/admin/usage?key=k_nope", &auth, "").await;
    assert_eq!(r.status, 404);
    for q in [
        "limit=0",
        "limit=501",
        "limit=x",
        "since=yesterday",
        "cursor=zzz",
        "keys=k_1",
        "before=2026-01-01T00:00:00Z&cursor=abc",
    ] {
        let r = admin
            .raw("GET", &format!("/admin/transactions?{q}"), &auth, "")
            .await;
        assert_eq!(r.status, 400, "{q}: {}", r.text());
    }
    // Nothing was created by the refused requests.
    let r = admin.raw("GET", "/admin/keys", &auth, "").await;
    assert_eq!(r.json(), json!({"keys": []}));
}

#[tokio::test]
async fn key_changes_apply_to_the_proxy_immediately() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let admin = Admin::new(&proxy);
    // The background refresh polls every 250 ms; five create→use and revoke→use rounds
    // back to back only pass if the admin API installs each change itself.
    for round in 0..5 {
        let t0 = Instant::now();
        let r = admin
            .call(
                "POST",
                "/admin/keys",
                None,
                "",
                Some(json!({"name": format!("round-{round}")})),
            )
            .await;
        assert_eq!(r.status, 201);
        let id = r.json()["id"].as_str().unwrap().to_string();
        let secret = r.json()["key"].as_str().unwrap().to_string();
        let used = chat(&proxy, &secret).await;
        assert_eq!(used.status, 200, "round {round}: {}", used.text());
        let r = admin
            .call(
                "PUT",
                "/admin/keys/{id}/limits",
                Some(&id),
                "",
                Some(json!({"limits": ["requests:day=0"]})),
            )
            .await;
        assert_eq!(r.status, 200);
        let disabled = chat(&proxy, &secret).await;
        assert_eq!(disabled.status, 403, "round {round}: {}", disabled.text());
        let r = admin
            .call(
                "PUT",
                "/admin/keys/{id}/limits",
                Some(&id),
                "",
                Some(json!({"limits": []})),
            )
            .await;
        assert_eq!(r.json()["limits"], json!([]));
        assert_eq!(chat(&proxy, &secret).await.status, 200, "limits cleared");
        let r = admin
            .call("DELETE", "/admin/keys/{id}", Some(&id), "", None)
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(chat(&proxy, &secret).await.status, 401, "round {round}");
        assert!(
            t0.elapsed() < Duration::from_millis(2000),
            "a round took {:?}",
            t0.elapsed()
        );
    }
}

#[tokio::test]
async fn transactions_page_newest_first_without_gaps() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let admin = Admin::new(&proxy);
    let (id, secret) = proxy.create_live_key(&[]).await;
    let (other, other_secret) = proxy.create_live_key(&[]).await;
    // Concurrent requests so that some may share a start time.
    let url = proxy.url(CHAT);
    let fired = fire(7, |i| {
        let url = url.clone();
        let key = if i == 3 {
            other_secret.clone()
        } else {
            secret.clone()
        };
        async move { post_json(&url, &key, &chat_body("gpt-4o-mini", false, "hi"), &[]).await }
    })
    .await;
    for status in fired.statuses() {
        assert_eq!(status, 200);
    }
    settled_rows(&proxy, &id, 6).await;
    settled_rows(&proxy, &other, 1).await;

    // What the ledger says, newest first (started_at desc, trace_id desc).
    let c = rusqlite::Connection::open(proxy.db_path()).unwrap();
    let mut st = c
        .prepare("SELECT trace_id FROM billing_transactions WHERE key_id = ?1 ORDER BY started_at DESC, trace_id DESC")
        .unwrap();
    let want: Vec<String> = st
        .query_map([&id], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(want.len(), 6);

    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("?key={id}&limit=4&cursor={c}"),
            None => format!("?key={id}&limit=4"),
        };
        let r = admin
            .call("GET", "/admin/transactions", None, &q, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.json();
        let rows = page["transactions"].as_array().unwrap();
        assert!(rows.len() <= 4);
        for row in rows {
            assert_eq!(row["key_id"], id.as_str());
            assert_eq!(row["status"], "settled");
            assert!(row["cost_micros"].as_i64().unwrap() > 0);
            got.push(row["trace_id"].as_str().unwrap().to_string());
        }
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 2);
    assert_eq!(got, want);

    // `before` = the last row's started_at: strictly older rows; `since` bounds the other end.
    let r = admin
        .call(
            "GET",
            "/admin/transactions",
            None,
            &format!("?key={id}&limit=2"),
            None,
        )
        .await;
    let first = r.json()["transactions"].as_array().unwrap().clone();
    let boundary = first[1]["started_at"].as_str().unwrap().to_string();
    let r = admin
        .call(
            "GET",
            "/admin/transactions",
            None,
            &format!("?key={id}&before={boundary}&limit=500"),
            None,
        )
        .await;
    let older = r.json()["transactions"].as_array().unwrap().clone();
    assert!(!older.is_empty());
    assert!(
        older
            .iter()
            .all(|t| t["started_at"].as_str().unwrap() < boundary.as_str())
    );
    assert!(r.json()["next_cursor"].is_null());
    let r = admin
        .call(
            "GET",
            "/admin/transactions",
            None,
            &format!("?since={boundary}&limit=500"),
            None,
        )
        .await;
    let newer = r.json()["transactions"].as_array().unwrap().clone();
    assert!(
        newer
            .iter()
            .all(|t| t["started_at"].as_str().unwrap() >= boundary.as_str())
    );
    assert!(newer.len() >= 2);
    // Without `key`, every key's rows.
    let r = admin
        .call("GET", "/admin/transactions", None, "?limit=500", None)
        .await;
    assert_eq!(r.json()["transactions"].as_array().unwrap().len(), 7);
}

/// Value of one series line (`name{labels} value`) in Prometheus text.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .parse()
            .ok()
    })
}

/// Metric names a Grafana dashboard's queries reference.
fn dashboard_metrics(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if let (true, Some(q)) = (
                    matches!(k.as_str(), "expr" | "query" | "definition"),
                    x.as_str(),
                ) {
                    let mut rest = q;
                    while let Some(at) = rest.find("tollgate_") {
                        let tail = &rest[at..];
                        let end = tail
                            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .unwrap_or(tail.len());
                        out.insert(tail[..end].to_string());
                        rest = &tail[end..];
                    }
                }
                dashboard_metrics(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_metrics(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn metrics_after_traffic_cover_the_dashboard() {
    let (_mock, proxy) = start(ProxyOptions {
        max_request_body: "32KiB".into(),
        ..Default::default()
    })
    .await;
    let admin = Admin::new(&proxy);
    // Keys made through the admin API are live at once: no polling (whose 401s would
    // count as auth rejections).
    let mut secrets = Vec::new();
    for limit in ["requests:total=4", "requests:day=0"] {
        let r = admin
            .call(
                "POST",
                "/admin/keys",
                None,
                "",
                Some(json!({"name": "m", "limits": [limit]})),
            )
            .await;
        assert_eq!(r.status, 201);
        secrets.push(r.json()["key"].as_str().unwrap().to_string());
    }
    let (key, off) = (secrets[0].clone(), secrets[1].clone());
    let url = proxy.url(CHAT);

    // One request of each kind.
    assert_eq!(chat(&proxy, &key).await.status, 200);
    let stream = post_json(&url, &key, &chat_body("gpt-4o-mini", true, "hello"), &[]).await;
    assert_eq!(stream.status, 200);
    let idem = [("idempotency-key", "order-1")];
    let body = chat_body("gpt-4o-mini", false, "once");
    assert_eq!(post_json(&url, &key, &body, &idem).await.status, 200);
    assert_eq!(post_json(&url, &key, &body, &idem).await.status, 409);
    assert_eq!(chat(&proxy, &key).await.status, 200);
    assert_eq!(chat(&proxy, &key).await.status, 429);
    assert_eq!(chat(&proxy, &off).await.status, 403);
    assert_eq!(chat(&proxy, "tg_not_a_key").await.status, 401);
    let bad = send(
        "POST",
        &url,
        &[
            ("authorization", &format!("Bearer {key}")),
            ("content-type", "application/json"),
        ],
        "{oops",
    )
    .await;
    assert_eq!(bad.status, 400);
    let huge = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(40_000)}]});
    assert_eq!(post_json(&url, &key, &huge, &[]).await.status, 413);
    let nowhere = send(
        "GET",
        &proxy.url("/v1/nowhere"),
        &[("authorization", &format!("Bearer {key}"))],
        "",
    )
    .await;
    assert_eq!(nowhere.status, 404);

    // Requests are counted, and settles recorded, just after each response ends (in
    // pingora's logging phase and the task it spawns): wait for all eleven requests and all
    // four settles before reading anything.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let r = admin.call("GET", "/metrics", None, "", None).await;
        assert_eq!(r.status, 200);
        let t = r.text();
        let requests: f64 = t
            .lines()
            .filter(|l| l.starts_with("tollgate_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let settled = [
            "tollgate_settles_total{usage_source=\"upstream\"}",
            "tollgate_settle_seconds_count",
            "tollgate_added_latency_seconds_count",
        ]
        .iter()
        .all(|s| series(&t, s) == Some(4.0));
        if requests == 11.0 && settled {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "never saw 11 requests and 4 settles:\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let v = |s: &str| series(&text, s).unwrap_or_else(|| panic!("no series {s} in\n{text}"));
    assert_eq!(
        v(&format!(
            "tollgate_requests_total{{route=\"{CHAT}\",status=\"200\"}}"
        )),
        4.0
    );
    assert_eq!(
        v("tollgate_requests_total{route=\"unmatched\",status=\"404\"}"),
        1.0
    );
    for (reason, n) in [
        ("duplicate", 1.0),
        ("exceeded", 1.0),
        ("disabled", 1.0),
        ("auth", 1.0),
        ("invalid", 1.0),
        ("too_large", 1.0),
    ] {
        assert_eq!(
            v(&format!(
                "tollgate_quota_rejections_total{{reason=\"{reason}\"}}"
            )),
            n,
            "{reason}"
        );
    }
    assert_eq!(v("tollgate_idempotent_hits_total"), 1.0);
    assert_eq!(v("tollgate_settles_total{usage_source=\"estimated\"}"), 0.0);
    assert_eq!(
        v("tollgate_billing_failures_total{reason=\"ledger_write\"}"),
        0.0
    );
    assert!(v("tollgate_tokens_total{kind=\"input\",model=\"gpt-4o-mini\"}") > 0.0);
    assert!(v("tollgate_tokens_total{kind=\"output\",model=\"gpt-4o-mini\"}") > 0.0);
    assert_eq!(
        v("tollgate_tokens_total{kind=\"cached\",model=\"gpt-4o-mini\"}"),
        0.0
    );
    // The counter equals the ledger, to the micro-dollar.
    let billed: i64 = proxy
        .ledger()
        .iter()
        .map(|r| r["cost_micros"].as_i64().unwrap())
        .sum();
    assert!(billed > 0);
    assert_eq!(
        v("tollgate_cost_micros_total{model=\"gpt-4o-mini\"}"),
        billed as f64
    );
    assert_eq!(v("tollgate_open_reservations"), 0.0);
    assert_eq!(v("tollgate_store_up{store=\"sqlite\"}"), 1.0);
    assert_eq!(v("tollgate_journal_backlog{target=\"ledger\"}"), 0.0);
    // The admit step ran for the 4 admitted requests and the 409, 429, 403 and 400; the
    // 401 and 413 were refused before it.
    assert_eq!(v("tollgate_quota_check_seconds_count"), 8.0);
    assert_eq!(v("tollgate_settle_seconds_count"), 4.0);
    assert_eq!(
        v("tollgate_upstream_first_byte_seconds_count{upstream=\"openai\"}"),
        4.0
    );
    assert_eq!(v("tollgate_added_latency_seconds_count"), 4.0);
    assert!(text.contains("tollgate_added_latency_seconds_bucket{le=\"0.00005\"}"));

    // Every metric the dashboard queries exists in this output.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut names = BTreeSet::new();
    dashboard_metrics(&dashboard, &mut names);
    assert!(names.len() >= 14, "{names:?}");
    let exposed: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !exposed.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard queries unknown metrics: {missing:?}"
    );
}

/// A raw request to the admin listener: `head_lines` after the request line, then `body`.
fn raw_request(method: &str, path: &str, head_lines: &[String], body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\n");
    for l in head_lines {
        r.push_str(l);
        r.push_str("\r\n");
    }
    r.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ));
    r.into_bytes()
}

#[tokio::test]
async fn admin_paths_hosts_and_writes_are_checked_before_routing() {
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let own_host = format!("host: {}", proxy.admin);
    let token = format!("authorization: Bearer {ADMIN_TOKEN}");
    let json_type = "content-type: application/json".to_string();
    let keys = || {
        let c = rusqlite::Connection::open(proxy.db_path()).unwrap();
        c.query_row("SELECT count(*) FROM api_keys", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    assert_eq!(keys(), 0);

    // The reported bypass: extra leading slashes once skipped the token check and routed.
    for (method, path) in [
        ("POST", "//admin/keys"),
        ("GET", "//admin/keys"),
        ("GET", "//admin/transactions"),
        ("GET", "/admin//keys"),
        ("GET", "/%61dmin/keys"),
        ("GET", "/admin/./keys"),
        ("GET", "/admin/x/../keys"),
    ] {
        let r = raw_http(
            proxy.admin,
            &raw_request(
                method,
                path,
                &[own_host.clone(), json_type.clone()],
                r#"{"name":"x"}"#,
            ),
        )
        .await;
        assert_eq!(r.status, 400, "{method} {path}: {}", r.text());
        assert!(r.text().contains("invalid_path"), "{}", r.text());
        assert!(!r.text().contains("tg_"), "{method} {path} created a key");
    }
    assert_eq!(keys(), 0, "no key was created through a non-canonical path");

    // DNS rebinding: a page served from evil.example that resolves to 127.0.0.1 sends
    // `Host: evil.example`; even with the token (and on open routes) it is refused.
    for path in ["/admin/keys", "/healthz", "/metrics"] {
        let r = raw_http(
            proxy.admin,
            &raw_request(
                "GET",
                path,
                &[
                    format!("host: evil.example:{}", proxy.admin.port()),
                    token.clone(),
                ],
                "",
            ),
        )
        .await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains("invalid_host"), "{}", r.text());
    }
    let r = raw_http(
        proxy.admin,
        &raw_request("GET", "/admin/keys", std::slice::from_ref(&token), ""),
    )
    .await;
    assert_eq!(
        r.status, 400,
        "a request without Host is refused on loopback"
    );
    let r = raw_http(
        proxy.admin,
        &raw_request(
            "GET",
            "http://evil.example/admin/keys",
            &[own_host.clone(), token.clone()],
            "",
        ),
    )
    .await;
    assert_eq!(r.status, 400, "an absolute-form target names the host too");
    for host in [
        own_host.clone(),
        format!("host: localhost:{}", proxy.admin.port()),
        "host: LOCALHOST".to_string(),
    ] {
        let r = raw_http(
            proxy.admin,
            &raw_request("GET", "/admin/keys", &[host.clone(), token.clone()], ""),
        )
        .await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }

    // Writes take JSON only: a cross-site form post (or a simple `text/plain` request)
    // cannot create a key even if it could carry the token.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = raw_http(
            proxy.admin,
            &raw_request(
                "POST",
                "/admin/keys",
                &[
                    own_host.clone(),
                    token.clone(),
                    format!("content-type: {ct}"),
                ],
                r#"{"name":"x"}"#,
            ),
        )
        .await;
        assert_eq!(r.status, 415, "{ct}: {}", r.text());
    }
    let r = raw_http(
        proxy.admin,
        &raw_request(
            "POST",
            "/admin/keys",
            &[own_host.clone(), token.clone()],
            r#"{"name":"x"}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 415, "no content type");
    assert_eq!(keys(), 0);

    // Every answer is kept out of caches, the one with a key secret first of all.
    let r = raw_http(
        proxy.admin,
        &raw_request(
            "POST",
            "/admin/keys",
            &[own_host.clone(), token.clone(), json_type.clone()],
            r#"{"name":"x"}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.text().contains("\"key\":\"tg_"));
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/keys",
        "/admin/nope",
        "//x",
    ] {
        let r = raw_http(
            proxy.admin,
            &raw_request("GET", path, &[own_host.clone(), token.clone()], ""),
        )
        .await;
        assert_eq!(
            r.header("cache-control").as_deref(),
            Some("no-store"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn admin_listener_bounds_slow_heads_and_connections() {
    // Slow heads: a client that never finishes its request head is cut off.
    let (_mock, proxy) = start(ProxyOptions {
        server_extra: "header_timeout = \"1s\"".into(),
        ..Default::default()
    })
    .await;
    use tokio::io::AsyncWriteExt;
    let mut slow = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n")
        .await
        .unwrap();
    assert!(
        closed_without_answer(&mut slow).await,
        "an unfinished request head keeps its connection"
    );

    // The connection cap: with every slot held by idle clients, one more is closed at
    // once; a freed slot is usable again.
    let (_mock2, proxy) = start(ProxyOptions {
        server_extra: "header_timeout = \"120s\"".into(),
        ..Default::default()
    })
    .await;
    // Hold connections that were served (each keeps its connection alive after a 200)
    // until one is closed unanswered: at most MAX_CONNECTIONS are held at once. (Counting
    // rather than assuming: a probe's pooled connection may still hold a slot.)
    // From five loopback addresses, so no one address reaches its own share first.
    let mut held = Vec::new();
    let mut refused = false;
    for i in 0..tollgate::admin::MAX_CONNECTIONS + 4 {
        let mut s = connect_from(&format!("127.0.0.{}", 1 + i % 5), proxy.admin).await;
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await;
        let r = read_raw_reply(&mut s).await;
        if r.status == 0 {
            refused = true;
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
        held.push(s);
    }
    assert!(refused, "a connection past the cap is served");
    assert!(held.len() <= tollgate::admin::MAX_CONNECTIONS);
    drop(held.pop());
    let mut served = false;
    for _ in 0..200 {
        let r = raw_http(
            proxy.admin,
            &raw_request("GET", "/healthz", &["host: localhost".into()], ""),
        )
        .await;
        if r.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a freed slot takes a new connection");
    drop(held);
    let metrics = send("GET", &format!("http://{}/metrics", proxy.admin), &[], "").await;
    assert!(
        series(
            &metrics.text(),
            "tollgate_connections_refused_total{listener=\"admin\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{}",
        metrics.text()
    );
}

/// A plain socket on `addr` that records every request it gets and answers each with
/// `body` (200, JSON), as a local user who bound the admin port while tollgate was down.
async fn squatter(
    addr: std::net::SocketAddr,
    body: &'static str,
) -> std::sync::Arc<Mutex<Vec<u8>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(answer.as_bytes()).await;
                    }
                }
            });
        }
    });
    seen
}

// Multi-threaded: the squatter answers while the test thread waits for the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_the_admin_token_only_to_the_instance_that_proves_itself() {
    let (_mock, mut proxy) = start(ProxyOptions::default()).await;
    let (id, key) = proxy.create_live_key(&["--limit", "usd:total=0.01"]).await;
    let r = post_json(
        &proxy.url(CHAT),
        &key,
        &chat_body("gpt-4o-mini", false, "hello"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.wait_settled().await;

    // The running instance publishes its secret readable by its own user only.
    let secret = tollgate::instance_proof::secret_path(&proxy.db_path());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", secret.display());
    }
    // The real instance proves itself: the CLI asks it and prints its answer.
    let (code, real, err) = proxy.cli(&["usage", "--key", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("did not prove"), "{err}");

    // tollgate is down; someone else binds its admin port and forges answers.
    proxy.kill9();
    let seen = squatter(
        proxy.admin,
        r#"{"status":"ok","proof":"00","limits":[],"used":{"usd":"0"},"remaining":{"usd":"999"}}"#,
    )
    .await;
    let (code, out, err) = proxy.cli(&["usage", "--key", &id, "--json"]);
    let got = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(
        !got.contains(ADMIN_TOKEN),
        "the CLI sent the admin token to a squatter:\n{got}"
    );
    assert!(err.contains("did not prove"), "{err}\n{out}\n{got}");
    // It read the storage instead: the same usage as the real instance reported.
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("999"),
        "the CLI printed the squatter's answer: {out}"
    );
    let used = |s: &str| serde_json::from_str::<Value>(s).unwrap()["limits"].clone();
    assert_eq!(used(&out), used(&real), "{out}\n{real}");
}

/// A connection to `to` from the loopback address `src` (any of 127.0.0.0/8).
async fn connect_from(src: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

#[tokio::test]
async fn a_flood_from_one_address_leaves_slots_for_another() {
    // Connections that send nothing, held open far longer than the test runs.
    let (_mock, proxy) = start(ProxyOptions {
        server_extra: "header_timeout = \"120s\"".into(),
        ..Default::default()
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..tollgate::admin::MAX_CONNECTIONS + 4 {
        flood.push(connect_from("127.0.0.1", proxy.admin).await);
    }
    // The flood's connections beyond its address's share are closed at once...
    let mut last = flood.pop().unwrap();
    assert!(
        closed_without_answer(&mut last).await,
        "one address holds more than its share"
    );
    // ...and another address is served, with the token and without.
    use tokio::io::AsyncWriteExt;
    let mut other = connect_from("127.0.0.2", proxy.admin).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let r = read_raw_reply(&mut other).await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut other = connect_from("127.0.0.2", proxy.admin).await;
    other
        .write_all(
            format!("GET /admin/keys HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let r = read_raw_reply(&mut other).await;
    assert_eq!(r.status, 200, "{r:?}");
    drop(flood);
}
