//! Request bodies end to end: every size is read whole and admitted *before* tollgate
//! opens an upstream connection or sends the provider key, and every admitted body reaches
//! the upstream exactly (rewritten only where usage reporting is injected), whatever its
//! size, framing (`Content-Length` or chunked) and pace. Refusals decided before the body
//! was read still reach a client that keeps sending (lingering close), and slow heads,
//! slow bodies and too many connections are cut off.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const CHAT: &str = "/v1/chat/completions";

/// A TCP relay in front of `target` that counts the connections made through it: the
/// upstream connections tollgate opens.
async fn counting_relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    (addr, count)
}

/// The raw bytes of a POST: the head, then `body` written in `piece`-byte pieces (as
/// chunks with `chunked`), yielding between pieces so they leave as separate writes.
/// Write errors are ignored: a server may answer and stop reading early.
async fn post_raw(
    addr: SocketAddr,
    key: &str,
    body: &[u8],
    chunked: bool,
    piece: usize,
) -> RawReply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let framing = if chunked {
        "transfer-encoding: chunked".to_string()
    } else {
        format!("content-length: {}", body.len())
    };
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\nconnection: close\r\n{framing}\r\n\r\n"
    );
    let mut ok = s.write_all(head.as_bytes()).await.is_ok();
    for p in body.chunks(piece.max(1)) {
        if !ok {
            break;
        }
        ok = if chunked {
            let mut framed = format!("{:x}\r\n", p.len()).into_bytes();
            framed.extend_from_slice(p);
            framed.extend_from_slice(b"\r\n");
            s.write_all(&framed).await.is_ok()
        } else {
            s.write_all(p).await.is_ok()
        };
        tokio::task::yield_now().await;
    }
    if ok && chunked {
        let _ = s.write_all(b"0\r\n\r\n").await;
    }
    read_raw_reply(&mut s).await
}

/// A chat request whose serialized body is about `size` bytes.
fn chat_of_size(size: usize, stream: bool) -> Value {
    let text: String = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
    json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "max_tokens": 20,
        "messages": [{"role": "user", "content": &text[..size.saturating_sub(120)]}],
    })
}

/// What the upstream must receive for `body`: the same bytes, or for a chat stream the
/// same JSON with `stream_options.include_usage` added.
fn expected_upstream_len(body: &Value, sent: &[u8]) -> usize {
    if body["stream"] == true {
        let mut v = body.clone();
        v["stream_options"] = json!({"include_usage": true});
        serde_json::to_vec(&v).unwrap().len()
    } else {
        sent.len()
    }
}

#[tokio::test]
async fn bodies_of_every_size_are_admitted_before_any_upstream_connection() {
    let mock = mock().await;
    let (relay, upstream_connections) = counting_relay(mock.addr).await;
    let proxy = Proxy::start(relay, ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let (_, disabled) = proxy.create_live_key(&["--limit", "requests:day=0"]).await;

    for size in [1_000usize, 100_000, 5_000_000] {
        for chunked in [false, true] {
            for stream in [false, true] {
                let what = format!("{size} bytes, chunked={chunked}, stream={stream}");
                let body = chat_of_size(size, stream);
                let bytes = serde_json::to_vec(&body).unwrap();

                // Refused after the whole body was read (quota disabled): no upstream
                // connection was opened and no header (with the provider key) was sent.
                let before = upstream_connections.load(Ordering::SeqCst);
                let recorded = mock.recorded().len();
                let r = post_raw(proxy.addr, &disabled, &bytes, chunked, 16 * 1024).await;
                assert_eq!(r.status, 403, "{what}: {}", r.text());
                assert!(r.text().contains("quota_disabled"), "{what}: {}", r.text());
                assert_eq!(
                    upstream_connections.load(Ordering::SeqCst),
                    before,
                    "{what}: a refused request opened an upstream connection"
                );
                assert_eq!(mock.recorded().len(), recorded, "{what}");

                // Admitted: the upstream gets the whole body, once.
                let r = post_raw(proxy.addr, &key, &bytes, chunked, 16 * 1024).await;
                assert_eq!(r.status, 200, "{what}: {}", r.text());
                if stream {
                    assert!(r.text().contains("data: [DONE]"), "{what}");
                } else {
                    assert!(r.text().contains("\"chat.completion\""), "{what}");
                }
                let rec = mock.recorded();
                assert_eq!(rec.len(), recorded + 1, "{what}");
                let got = rec.last().unwrap();
                assert_eq!(
                    got.body_len,
                    expected_upstream_len(&body, &bytes),
                    "{what}: the upstream got another body"
                );
                assert_eq!(got.stream, Some(stream), "{what}");
                assert_eq!(
                    got.header("authorization"),
                    Some(format!("Bearer {OPENAI_UPSTREAM_KEY}").as_str()),
                    "{what}"
                );
                assert_eq!(got.header("transfer-encoding"), None, "{what}");
                if size <= 16 * 1024 {
                    let v: Value = serde_json::from_str(got.body.as_deref().unwrap()).unwrap();
                    assert_eq!(v["messages"], body["messages"], "{what}");
                }
            }
        }
    }
    proxy.wait_settled().await;
    let rows = proxy.ledger();
    assert_eq!(
        rows.len(),
        12,
        "one row per admitted request, none for refusals"
    );
    assert!(rows.iter().all(|r| r["status"] == "settled"), "{rows:?}");
    assert!(rows.iter().all(|r| r["http_status"] == 200), "{rows:?}");
}

#[tokio::test]
async fn a_large_body_refused_or_failed_upstream_is_finished_once() {
    // Large bodies go through a subrequest: its refusals, upstream failures and the
    // client leaving must still end in exactly one final ledger row.
    let (_mock, proxy) = start(ProxyOptions::default()).await;
    let (key_id, key) = proxy.create_live_key(&[]).await;
    let big = |stream: bool| serde_json::to_vec(&chat_of_size(300_000, stream)).unwrap();

    // The upstream answers an error: passed through, released, nothing billed.
    let r = send(
        "POST",
        &proxy.url(CHAT),
        &[
            ("authorization", &format!("Bearer {key}")),
            ("content-type", "application/json"),
            ("x-mock-status", "500"),
        ],
        big(false),
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.header("x-tollgate-trace-id").is_some());

    // The upstream cuts a stream: the client gets the stream's end, the partial is billed.
    let r = send(
        "POST",
        &proxy.url(CHAT),
        &[
            ("authorization", &format!("Bearer {key}")),
            ("content-type", "application/json"),
            ("x-mock-drop-after", "2"),
            ("x-mock-chunks", "6"),
        ],
        big(true),
    )
    .await;
    assert_eq!(r.status, 200);

    // The client leaves mid-stream.
    let req = request(
        "POST",
        &proxy.url(CHAT),
        &[
            ("authorization", &format!("Bearer {key}")),
            ("content-type", "application/json"),
            ("x-mock-chunks", "50"),
            ("x-mock-delay-ms", "50"),
        ],
        big(true),
    );
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    let _ = body.frame().await;
    drop(body);

    // A stream that completes.
    let r = send(
        "POST",
        &proxy.url(CHAT),
        &[
            ("authorization", &format!("Bearer {key}")),
            ("content-type", "application/json"),
        ],
        big(true),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("[DONE]"));

    eventually("four final rows", || {
        let rows: Vec<_> = proxy
            .ledger()
            .into_iter()
            .filter(|r| r["key_id"] == key_id.as_str())
            .collect();
        rows.len() == 4 && rows.iter().all(|r| r["status"] != "reserved")
    })
    .await;
    let rows: Vec<_> = proxy.ledger();
    let statuses: Vec<(&str, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap(),
                r["http_status"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(statuses[0], ("released", 500), "{rows:?}");
    assert_eq!(statuses[1].0, "settled", "{rows:?}");
    assert_eq!(
        statuses[2].0, "settled",
        "the client's leaving bills the partial: {rows:?}"
    );
    assert_eq!(statuses[3], ("settled", 200), "{rows:?}");
    // An upstream that cannot be reached: 502 in the provider's shape, released.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let down = Proxy::start(dead, ProxyOptions::default()).await;
    let (_, key) = down.create_live_key(&[]).await;
    let r = post_json(&down.url(CHAT), &key, &chat_of_size(300_000, false), &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_unavailable");
    down.wait_settled().await;
    let rows = down.ledger();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0]["status"].as_str(), rows[0]["http_status"].as_i64()),
        (Some("released"), Some(502))
    );

    // Every hold is gone: nothing left in flight.
    let ready = format!("http://{}/readyz", proxy.admin);
    let mut open = Value::Null;
    for _ in 0..500 {
        open = send("GET", &ready, &[], "").await.json()["open_reservations"].clone();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 0);
}

#[tokio::test]
async fn an_early_refusal_reaches_a_client_that_keeps_sending() {
    // 413 is decided from Content-Length before any byte of the body is read. The client
    // writes all 11 MiB (slowly, in pieces) before it reads: closing at once would reset
    // the connection under the answer.
    let (mock, proxy) = start(ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let body = vec![b'x'; 11 << 20];
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(64 * 1024) {
        s.write_all(piece)
            .await
            .expect("the server stopped reading the body it refused");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let r = read_raw_reply(&mut s).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.text().contains("request_too_large"), "{}", r.text());

    // The same for a refusal from the head alone (401) with a body on its way. A request
    // without a valid key is drained for 64 KiB at most (a stranger does not hold the
    // connection), so a body within that is heard.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer tg_wrong\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        60 << 10
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for piece in vec![b'x'; 60 << 10].chunks(4 * 1024) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let r = read_raw_reply(&mut s).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(mock.recorded().is_empty());

    // A chunked body over the limit is refused while it is read, and heard too.
    let r = post_raw(
        proxy.addr,
        &key,
        &vec![b'y'; (10 << 20) + 1000],
        true,
        64 * 1024,
    )
    .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(mock.recorded().is_empty());
}

#[tokio::test]
async fn slow_heads_slow_bodies_and_connection_floods_are_cut_off() {
    let (mock, proxy) = start(ProxyOptions {
        server_extra: "header_timeout = \"1s\"\nbody_timeout = \"1s\"".into(),
        ..Default::default()
    })
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;

    // A head that trickles in (one byte at a time, far below pingora's per-read timeout)
    // is cut off as a whole.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST {CHAT} HTTP/1.1\r\nhost: tollgate\r\nx-padding: ");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut cut = false;
    for _ in 0..600 {
        if s.write_all(b"a").await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cut || closed_without_answer(&mut s).await,
        "a head trickling for 30 s keeps its connection"
    );

    // A body that does not arrive in time: 408, nothing forwarded.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let r = read_raw_reply(&mut s).await;
    assert_eq!(r.status, 408, "{r:?}");
    assert!(r.text().contains("request_timeout"), "{}", r.text());
    assert!(mock.recorded().is_empty());

    // A head that is complete in time is served as usual.
    let r = post_json(
        &proxy.url(CHAT),
        &key,
        &chat_body("gpt-4o-mini", false, "hi"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(proxy.ledger().len() == 1);

    // The connection cap.
    let proxy = Proxy::start(
        mock.addr,
        ProxyOptions {
            server_extra:
                "max_connections = 4\nmax_connections_per_ip = 4\nheader_timeout = \"120s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let (_, key) = proxy.create_key(&[]);
    // Hold connections that were served (a valid key's connection is kept alive) until one
    // is closed unanswered: at most `max_connections` are held at once.
    let mut held = Vec::new();
    let mut refused = false;
    let kept = format!(
        "GET /v1/tollgate/usage HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n\r\n"
    );
    for _ in 0..8 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let _ = s.write_all(kept.as_bytes()).await;
        let r = read_raw_reply(&mut s).await;
        if r.status == 0 {
            refused = true;
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
        held.push(s);
    }
    assert!(
        refused,
        "more than max_connections connections were served at once"
    );
    assert!(held.len() <= 4, "{} connections held", held.len());
    drop(held.pop());
    let usage = proxy.url("/v1/tollgate/usage");
    let auth = format!("Bearer {key}");
    let mut served = false;
    for _ in 0..200 {
        let s = raw_http(
            proxy.addr,
            format!("GET /v1/tollgate/usage HTTP/1.1\r\nhost: t\r\nauthorization: {auth}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        if s.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a freed slot takes a new connection ({usage})");
    let metrics = send("GET", &format!("http://{}/metrics", proxy.admin), &[], "").await;
    let line = metrics
        .text()
        .lines()
        .find(|l| l.starts_with("tollgate_connections_refused_total{listener=\"proxy\"}"))
        .map(str::to_string)
        .unwrap_or_default();
    let n: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(n >= 1.0, "{line}");
}

/// A connection from `local` (any 127.0.0.0/8 address) to `to`.
async fn connect_from(local: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

/// Whether the server ends `s` (EOF, reset, or a failed write) while the client trickles
/// one byte every 200 ms for `secs` seconds.
async fn cut_while_trickling(s: &mut tokio::net::TcpStream, secs: u64) -> bool {
    use tokio::io::AsyncReadExt;
    let mut tmp = [0u8; 4096];
    for _ in 0..secs * 5 {
        if s.write_all(b"x").await.is_err() {
            return true;
        }
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut tmp)).await {
            match r {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    }
    false
}

#[tokio::test]
async fn strangers_cannot_hold_proxy_slots_or_head_memory() {
    let mock = mock().await;
    // 12 slots; by default one address may hold a quarter of them (3).
    let proxy = Proxy::start(
        mock.addr,
        ProxyOptions {
            server_extra: "max_connections = 12\nheader_timeout = \"120s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let usage_with_key = format!(
        "GET /v1/tollgate/usage HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n\r\n"
    );

    // A refusal without a valid key closes the connection: no slot is kept by sending one
    // tiny request a minute.
    for head in [
        "GET /v1/tollgate/usage HTTP/1.1\r\nhost: t\r\n\r\n".to_string(),
        "GET /v1/models HTTP/1.1\r\nhost: t\r\nauthorization: Bearer tg_not_a_key\r\n\r\n"
            .to_string(),
        format!("POST {CHAT} HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{{}}"),
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let r = read_raw_reply(&mut s).await;
        assert_eq!(r.status, 401, "{r:?}");
        assert!(
            closed_without_answer(&mut s).await,
            "a stranger's connection stays open after its 401: {head}"
        );
    }

    // A stranger announcing a large body and trickling it is not waited for: the
    // lingering close after its 401 is short.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        format!("POST {CHAT} HTTP/1.1\r\nhost: t\r\ncontent-length: 20000000\r\n\r\n{{").as_bytes(),
    )
    .await
    .unwrap();
    let r = read_raw_reply(&mut s).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        cut_while_trickling(&mut s, 10).await,
        "a stranger's trickled body held its connection for 10 s after the 401"
    );

    // An idle keep-alive connection of a valid key is closed after keepalive_timeout
    // (15 s by default), not kept for pingora's minute or for ever.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(usage_with_key.as_bytes()).await.unwrap();
    assert_eq!(read_raw_reply(&mut s).await.status, 200);
    assert!(
        closed_without_answer(&mut s).await,
        "an idle keep-alive connection outlived 30 s"
    );

    // Heads over the cap (64 KiB, 100 headers) get 431 and the connection closes.
    let big = format!(
        "GET /v1/tollgate/usage HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\nx-pad: {}\r\n\r\n",
        "a".repeat(70 << 10)
    );
    let many = format!(
        "GET /v1/tollgate/usage HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n{}\r\n",
        (0..101)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    for head in [big, many] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let r = read_raw_reply(&mut s).await;
        assert_eq!(r.status, 431, "{r:?}");
        assert!(
            r.text().contains("request_header_too_large"),
            "{}",
            r.text()
        );
        assert!(!r.text().contains(&key), "the answer echoes the head");
        assert!(closed_without_answer(&mut s).await);
    }
    // A head just under the cap is served.
    let fits = format!(
        "GET /v1/tollgate/usage HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\nx-pad: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(60 << 10)
    );
    assert_eq!(raw_http(proxy.addr, fits.as_bytes()).await.status, 200);

    // One address holds at most its share of the slots (3 of 12); another address is
    // still served while the first one's connections sit idle.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.1", proxy.addr).await);
    }
    // Let the listener accept (and count) the three before the fourth: under load (the
    // other tests of this file run beside it) 200 ms was not always enough, and the
    // fourth then raced ahead of one of the three.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut fourth = connect_from("127.0.0.1", proxy.addr).await;
    let _ = fourth.write_all(usage_with_key.as_bytes()).await;
    assert_eq!(
        read_raw_reply(&mut fourth).await.status,
        0,
        "a fourth connection from one address was served"
    );
    let mut other = connect_from("127.0.0.2", proxy.addr).await;
    other.write_all(usage_with_key.as_bytes()).await.unwrap();
    assert_eq!(read_raw_reply(&mut other).await.status, 200);
    // A slot given back is free again for its address.
    drop(held.pop());
    let mut served = false;
    for _ in 0..100 {
        let mut s = connect_from("127.0.0.1", proxy.addr).await;
        let _ = s.write_all(usage_with_key.as_bytes()).await;
        if read_raw_reply(&mut s).await.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a freed slot of an address takes a new connection");
}

#[tokio::test]
async fn expect_continue_is_answered_once_the_head_passed() {
    let (mock, proxy) = start(ProxyOptions::default()).await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let body = serde_json::to_vec(&chat_of_size(200_000, false)).unwrap();
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The body is sent only after the interim answer, as curl does.
    let interim = read_raw_reply(&mut s).await;
    assert_eq!(interim.status, 100, "{interim:?}");
    s.write_all(&body).await.unwrap();
    let r = read_raw_reply(&mut s).await;
    assert_eq!(r.status, 200, "{r:?}");
    let rec = mock.recorded();
    assert_eq!(rec.last().unwrap().body_len, body.len());
    assert_eq!(rec.last().unwrap().header("expect"), None);

    // A head that is refused gets its answer instead of the interim one.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer tg_wrong\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let r = read_raw_reply(&mut s).await;
    assert_eq!(r.status, 401, "{r:?}");
}

/// A connection from a client that sends `request` and never reads (a small receive
/// buffer, so its window closes soon).
async fn never_reading(addr: SocketAddr, request: Vec<u8>) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    s.write_all(&request).await.unwrap();
    s
}

#[tokio::test]
async fn clients_that_never_read_their_answers_do_not_keep_their_slots() {
    let (_mock, proxy) = start(ProxyOptions {
        server_extra: "max_connections = 4\nmax_connections_per_ip = 4\nsend_timeout = \"1s\""
            .into(),
        ..Default::default()
    })
    .await;
    let (_, key) = proxy.create_key(&[]);

    // Without a key every path is a 401 (which closes its connection), and no answer
    // echoes the request.
    let long = "b".repeat(8192);
    let r = raw_http(
        proxy.addr,
        format!("GET /v1/{long} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(!r.text().contains("bbbb"), "{}", r.text());
    assert_eq!(r.header("connection").as_deref(), Some("close"), "{r:?}");
    let r = raw_http(
        proxy.addr,
        format!(
            "GET /v1/{long} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\nconnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(!r.text().contains("bbbb"), "{}", r.text());
    assert!(r.body.len() < 1024, "{} bytes", r.body.len());

    // Take every slot with a client that never reads: two send a path of most of a
    // megabyte without a key (an answer that echoed it would be as large), two ask with
    // a key for a long stream.
    let mut floods = Vec::new();
    for _ in 0..2 {
        let path = "c".repeat(900 * 1024);
        let req = format!("GET /v1/{path} HTTP/1.1\r\nhost: t\r\n\r\n");
        floods.push(never_reading(proxy.addr, req.into_bytes()).await);
    }
    for _ in 0..2 {
        let mut body = chat_body("gpt-4o-mini", true, "hi");
        body["max_tokens"] = json!(200_000);
        let body = serde_json::to_string(&body).unwrap();
        let req = format!(
            "POST {CHAT} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\nx-mock-words: 100000\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        floods.push(never_reading(proxy.addr, req.into_bytes()).await);
    }
    // A normal client gets through once a slot is freed: each stalled answer ends at
    // send_timeout.
    let usage = format!(
        "GET /v1/tollgate/usage HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\nconnection: close\r\n\r\n"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut served = false;
    while !served && std::time::Instant::now() < deadline {
        served = raw_http(proxy.addr, usage.as_bytes()).await.status == 200;
        if !served {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(served, "clients that never read hold every slot");
    // Every one of them was dropped, not just one: four normal clients hold a
    // connection each at once.
    let keep = format!(
        "GET /v1/tollgate/usage HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n\r\n"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
            let _ = s.write_all(keep.as_bytes()).await;
            if read_raw_reply(&mut s).await.status == 200 {
                held.push(s);
            }
        }
        if held.len() == 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of 4 slots came free",
            held.len()
        );
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(floods);
}

/// Request bodies held at once, across all connections, stay within
/// `server.max_buffered_bodies`: a body that would take the total above it waits briefly
/// and is then refused with 503 and `Retry-After` — never read into memory beyond the
/// bound. Once the bodies in flight are done, the next one is admitted.
#[tokio::test]
async fn buffered_bodies_share_one_memory_bound() {
    let (_mock, proxy) = start(ProxyOptions {
        max_request_body: "1MiB".into(),
        server_extra: "max_buffered_bodies = \"1MiB\"\nbody_timeout = \"20s\"".into(),
        ..Default::default()
    })
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    let body = serde_json::to_vec(&chat_of_size(700 << 10, false)).unwrap();
    let head = |len: usize| {
        format!(
            "POST {CHAT} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    // A holds 600 KiB of its body, read and buffered, and stalls.
    let mut a = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    a.write_all(head(body.len()).as_bytes()).await.unwrap();
    a.write_all(&body[..600 << 10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // B's whole body would take the total past 1 MiB: refused, and told when to retry.
    let mut b = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    b.write_all(head(body.len()).as_bytes()).await.unwrap();
    let _ = b.write_all(&body).await;
    let r = read_raw_reply(&mut b).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "{}", r.head);
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap()["error"]["code"],
        "overloaded"
    );
    // A finishes: admitted and answered.
    a.write_all(&body[600 << 10..]).await.unwrap();
    let r = read_raw_reply(&mut a).await;
    assert_eq!(r.status, 200, "{}", r.text());
    drop(a);
    // The budget is free again.
    let r = post_raw(proxy.addr, &key, &body, false, 64 << 10).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The proxy process's peak resident memory so far, in bytes (`VmHWM`).
fn peak_rss(proxy: &Proxy) -> u64 {
    let pid = proxy.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

/// A parsed JSON tree costs many times its body (`[0,0,0,…]`: 2 bytes a value, a tree
/// node of 32 bytes and more). Bodies parsed at once across all requests stay within
/// `server.max_parsing_bytes`, so many concurrent worst-case bodies from one key holder
/// keep the process's peak memory near one tree's worth — a request that finds no room
/// is refused 503 `overloaded` with `Retry-After`, never parsed alongside the rest.
#[tokio::test]
async fn concurrent_worst_case_bodies_parse_within_one_memory_bound() {
    const BODY: usize = 2 << 20;
    const BUDGET: u64 = 2 << 20;
    const N: usize = 16;
    let (_mock, proxy) = start(ProxyOptions {
        max_request_body: "2MiB".into(),
        server_extra: "max_parsing_bytes = \"2MiB\"\nbody_timeout = \"30s\"".into(),
        ..Default::default()
    })
    .await;
    let (_, key) = proxy.create_live_key(&[]).await;
    // Warm up: one small request, then the baseline.
    let small = serde_json::to_vec(&chat_of_size(4 << 10, false)).unwrap();
    let r = post_raw(proxy.addr, &key, &small, false, 64 << 10).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let baseline = peak_rss(&proxy);
    // A chat request whose extra field is an array of zeros filling the body.
    let mut body = br#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"x":[0"#.to_vec();
    while body.len() + 3 < BODY {
        body.extend_from_slice(b",0");
    }
    body.extend_from_slice(b"]}");
    let body = Arc::new(body);
    let mut tasks = Vec::new();
    for _ in 0..N {
        let (body, key, addr) = (body.clone(), key.clone(), proxy.addr);
        tasks.push(tokio::spawn(async move {
            post_raw(addr, &key, &body, false, 256 << 10).await
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => admitted += 1,
            503 => {
                assert!(r.header("retry-after").is_some(), "{}", r.head);
                assert_eq!(
                    serde_json::from_slice::<Value>(&r.body).unwrap()["error"]["code"],
                    "overloaded"
                );
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert!(admitted >= 1, "no worst-case body was admitted at all");
    // Generous: 80 bytes of tree per budget byte, plus each raw body held up to three
    // times (read buffer, retry buffer, forwarded copy). Without the bound the N trees
    // live at once and the peak is several times this.
    let bound = baseline + 80 * BUDGET + 3 * (N * BODY) as u64;
    let peak = peak_rss(&proxy);
    assert!(
        peak <= bound,
        "peak RSS {} MiB over the bound {} MiB (baseline {} MiB, {admitted} of {N} admitted)",
        peak >> 20,
        bound >> 20,
        baseline >> 20
    );
}
