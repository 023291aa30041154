//! Threshold alerts end to end: the real binary, the mock upstream, and a webhook receiver
//! in the test. Alerts fire once per limit, threshold and window, carry the documented
//! fields, are retried when the receiver fails, and are not repeated after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// One POST the receiver got: the `x-tollgate-alert-id` header, the JSON body, and the
/// status it answered.
#[derive(Debug, Clone)]
struct Hit {
    id_header: String,
    body: Value,
    answered: u16,
}

/// A webhook receiver that answers 500 to its first `fail_first` requests, 200 after.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let h = h.clone();
                            async move {
                                assert_eq!(req.method(), hyper::Method::POST);
                                assert_eq!(req.uri().path(), "/hook");
                                assert_eq!(
                                    req.headers()["content-type"].to_str().unwrap(),
                                    "application/json"
                                );
                                let id_header = req.headers()["x-tollgate-alert-id"]
                                    .to_str()
                                    .unwrap()
                                    .to_string();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let body: Value = serde_json::from_slice(&body).unwrap();
                                let mut hits = h.lock();
                                let answered = if hits.len() < fail_first { 500 } else { 200 };
                                hits.push(Hit {
                                    id_header,
                                    body,
                                    answered,
                                });
                                Ok::<_, hyper::Error>(
                                    hyper::Response::builder()
                                        .status(answered)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { addr, hits }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().clone()
    }

    /// Bodies of the accepted deliveries, in order.
    fn delivered(&self) -> Vec<Value> {
        self.hits()
            .into_iter()
            .filter(|h| h.answered == 200)
            .map(|h| h.body)
            .collect()
    }

    async fn wait_for(&self, n: usize) -> Vec<Value> {
        eventually(&format!("{n} alerts delivered"), || {
            self.delivered().len() >= n
        })
        .await;
        self.delivered()
    }
}

async fn setup(receiver: &Receiver, thresholds: &str) -> (mock_upstream::MockHandle, Proxy) {
    start(ProxyOptions::with_extra(format!(
        "[alerts]\nthresholds = {thresholds}\nwebhook = \"http://{}/hook\"\n",
        receiver.addr
    )))
    .await
}

fn body(max_tokens: u64) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello there"}],
    })
}

/// Send one request; when admitted, wait until its hold has become usage (settles run
/// just after the response), so the next request sees it.
async fn request(proxy: &Proxy, key: &str, max_tokens: u64) -> u16 {
    let r = post_json(
        &proxy.url("/v1/chat/completions"),
        key,
        &body(max_tokens),
        &[],
    )
    .await;
    if r.status == 200 {
        let t0 = std::time::Instant::now();
        loop {
            let u = send(
                "GET",
                &proxy.url("/v1/tollgate/usage"),
                &[("authorization", &format!("Bearer {key}"))],
                "",
            )
            .await
            .json();
            let limits = u["limits"].as_array().unwrap();
            if limits.iter().all(|l| l["reserved"] == 0) {
                break;
            }
            assert!(t0.elapsed().as_secs() < 10, "request never settled: {u}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    r.status
}

/// (subject, spec, threshold) of each alert.
fn summary(alerts: &[Value]) -> Vec<(String, String, u64)> {
    alerts
        .iter()
        .map(|a| {
            (
                a["subject"].as_str().unwrap().to_string(),
                a["spec"].as_str().unwrap().to_string(),
                a["threshold"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn marks_in_db(proxy: &Proxy) -> i64 {
    let c = rusqlite::Connection::open(proxy.db_path()).unwrap();
    c.query_row("SELECT COUNT(*) FROM alert_marks", [], |r| r.get(0))
        .unwrap_or(0)
}

#[tokio::test]
async fn thresholds_fire_once_per_window_and_not_again_after_a_restart() {
    let receiver = Receiver::start(0).await;
    let (_mock, mut proxy) = setup(&receiver, "[20, 50, 100]").await;
    let (a, key_a) = proxy
        .create_live_key(&["--limit", "requests:total=10"])
        .await;
    let (b, key_b) = proxy
        .create_live_key(&["--limit", "requests:total=1"])
        .await;
    let (c, key_c) = proxy.create_live_key(&["--limit", "tokens:total=50"]).await;
    let (d, key_d) = proxy.create_live_key(&["--limit", "requests:day=2"]).await;
    let sub = |id: &str| format!("key:{id}");

    // A: 1 of 10 is below every threshold, 2 of 10 reaches 20 %.
    assert_eq!(request(&proxy, &key_a, 20).await, 200);
    assert_eq!(request(&proxy, &key_a, 20).await, 200);
    let got = receiver.wait_for(1).await;
    assert_eq!(
        summary(&got),
        vec![(sub(&a), "requests:total=10".into(), 20)]
    );
    let first = &got[0];
    assert_eq!(first["event"], "quota.threshold");
    assert_eq!(first["metric"], "requests");
    assert_eq!(first["window"], "total");
    assert_eq!(first["scope"], "all");
    assert_eq!(first["plan"], Value::Null);
    assert_eq!(first["used"], 2);
    assert_eq!(first["limit"], 10);
    assert_eq!(first["percent"], 20);
    assert_eq!(first["refused"], false);
    assert_eq!(first["window_start"], Value::Null);
    assert_eq!(first["resets_at"], Value::Null);
    assert_eq!(first["instance_id"], "test-instance");
    assert!(first["fired_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(receiver.hits()[0].id_header, first["id"].as_str().unwrap());

    // B: one request takes a 1-request limit straight to 100 %: three alerts at once.
    assert_eq!(request(&proxy, &key_b, 20).await, 200);
    receiver.wait_for(4).await;
    // Refused afterwards: its 100 % alert already fired this window, nothing more.
    assert_eq!(request(&proxy, &key_b, 20).await, 429);
    // C: a request asking for more than the whole allowance is refused before any usage;
    // the refusal reports 100 % with what was really used.
    assert_eq!(request(&proxy, &key_c, 200).await, 429);
    assert_eq!(request(&proxy, &key_c, 200).await, 429);
    // D: a calendar window, 1 of 2 requests.
    assert_eq!(request(&proxy, &key_d, 20).await, 200);
    let got = receiver.wait_for(7).await;
    assert_eq!(
        summary(&got[1..]),
        vec![
            (sub(&b), "requests:total=1".into(), 20),
            (sub(&b), "requests:total=1".into(), 50),
            (sub(&b), "requests:total=1".into(), 100),
            (sub(&c), "tokens:total=50".into(), 100),
            (sub(&d), "requests:day=2".into(), 20),
            (sub(&d), "requests:day=2".into(), 50),
        ]
    );
    let refusal = &got[4];
    assert_eq!(refusal["refused"], true);
    assert_eq!(refusal["used"], 0);
    assert_eq!(refusal["limit"], 50);
    assert_eq!(refusal["percent"], 0);
    assert_eq!(got[3]["refused"], false);
    let day = &got[5];
    let fired_date = &day["fired_at"].as_str().unwrap()[..10];
    assert_eq!(
        day["window_start"],
        format!("{fired_date}T00:00:00.000000Z"),
        "a day window starts at midnight UTC"
    );
    assert!(day["resets_at"].as_str().unwrap() > day["window_start"].as_str().unwrap());
    let ids: std::collections::HashSet<&str> =
        got.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 7, "every alert has its own id");

    // Every alert is also a structured log event.
    let logs = proxy.logs();
    let events: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "tollgate::alert" && v["message"] == "quota threshold reached")
        .collect();
    assert_eq!(events.len(), 7, "{logs}");
    assert_eq!(events[0]["subject"], sub(&a));
    assert_eq!(events[0]["spec"], "requests:total=10");
    assert_eq!(events[0]["threshold"], 20);
    assert_eq!(events[0]["level"], "WARN");

    // The marks reach the database once delivered; then the process dies.
    eventually("marks persisted", || marks_in_db(&proxy) == 7).await;
    proxy.kill9();
    proxy.spawn().await;

    // Nothing already announced comes back: B and C are still refused, A goes on to 30 %.
    assert_eq!(request(&proxy, &key_b, 20).await, 429);
    assert_eq!(request(&proxy, &key_c, 200).await, 429);
    assert_eq!(request(&proxy, &key_a, 20).await, 200);
    assert_eq!(request(&proxy, &key_d, 20).await, 200);
    // A reaches 50 % — the only new alert (D at 100 % fires its 100 too).
    assert_eq!(request(&proxy, &key_a, 20).await, 200);
    assert_eq!(request(&proxy, &key_a, 20).await, 200);
    let got = receiver.wait_for(9).await;
    assert_eq!(
        summary(&got[7..]),
        vec![
            (sub(&d), "requests:day=2".into(), 100),
            (sub(&a), "requests:total=10".into(), 50),
        ]
    );
    assert_eq!(got[8]["used"], 5);
    assert_eq!(receiver.hits().len(), 9, "no retries, no repeats");
}

#[tokio::test]
async fn a_failing_receiver_gets_the_same_alert_again() {
    let receiver = Receiver::start(1).await;
    let (_mock, proxy) = setup(&receiver, "[100]").await;
    let (id, key) = proxy
        .create_live_key(&["--limit", "requests:total=1"])
        .await;
    assert_eq!(request(&proxy, &key, 20).await, 200);
    let got = receiver.wait_for(1).await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), 2, "one failed attempt, one retry");
    assert_eq!(hits[0].answered, 500);
    assert_eq!(hits[0].body, hits[1].body, "a retry sends the same alert");
    assert_eq!(hits[0].id_header, hits[1].id_header);
    assert_eq!(got[0]["subject"], format!("key:{id}"));
    assert_eq!(got[0]["threshold"], 100);
    eventually("delivery logged", || {
        proxy.logs().lines().any(|l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["message"] == "alert delivered to webhook" && v["attempts"] == 2)
        })
    })
    .await;
}
