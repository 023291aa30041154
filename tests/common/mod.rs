//! Test harness: start the real `tollgate` binary on free ports against the mock upstream
//! (or a scripted raw upstream), create keys through the CLI, and talk HTTP to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod pg;
pub mod redis;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A loopback port nothing listens on, for a server a test starts later.
///
/// Ports come from 20000..32000, below Linux's ephemeral range (32768..61000), and each is
/// handed out once per test process. A port from the ephemeral range (`bind(:0)` then drop)
/// can be taken by any outgoing connection before the server binds it, and a connect to a
/// not-yet-listening ephemeral port can even connect to itself (TCP simultaneous open), so
/// a readiness probe would pass with nothing there.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Start each process at its own offset so test binaries run back to back (or two
    // checkouts on one machine) rarely walk the same ports.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// A running proxy process; killed on drop.
pub struct Proxy {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

pub struct ProxyOptions {
    /// Extra TOML appended (plans, prices, quota overrides...).
    pub extra: String,
    pub server_extra: String,
    pub upstream_extra: String,
    pub max_request_body: String,
    pub first_byte_timeout: String,
    /// `[log] level`.
    pub log_level: String,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            extra: String::new(),
            server_extra: String::new(),
            upstream_extra: String::new(),
            max_request_body: "10MiB".into(),
            first_byte_timeout: "10s".into(),
            log_level: "info".into(),
        }
    }
}

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const OPENAI_UPSTREAM_KEY: &str = "sk-upstream-openai-secret";
pub const ANTHROPIC_UPSTREAM_KEY: &str = "sk-ant-upstream-secret";

pub fn write_config(
    dir: &Path,
    upstream: SocketAddr,
    opts: &ProxyOptions,
) -> (PathBuf, SocketAddr, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let db = dir.join("tollgate.db");
    let cfg = format!(
        r#"
[server]
listen = "{addr}"
admin_listen = "{admin}"
admin_token = "{ADMIN_TOKEN}"
max_request_body = "{max}"
threads = 2
instance_id = "test-instance"
grace_period = "1s"
{server_extra}

[storage]
mode = "embedded"
journal_path = "{db}"

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "http://{upstream}"
api_key = "{OPENAI_UPSTREAM_KEY}"
connect_timeout = "1s"
first_byte_timeout = "{first_byte}"
idle_timeout = "2s"
{upstream_extra}

[[upstreams]]
name = "anthropic"
kind = "anthropic"
base_url = "http://{upstream}"
api_key = "{ANTHROPIC_UPSTREAM_KEY}"
routes = ["/v1/messages"]
connect_timeout = "1s"
first_byte_timeout = "{first_byte}"
idle_timeout = "2s"

[log]
level = "{log_level}"
format = "json"

{extra}
"#,
        max = opts.max_request_body,
        first_byte = opts.first_byte_timeout,
        db = db.display(),
        server_extra = opts.server_extra,
        upstream_extra = opts.upstream_extra,
        log_level = opts.log_level,
        extra = opts.extra,
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    (path, addr, admin)
}

impl ProxyOptions {
    /// The defaults with `extra` appended to the config (plans, prices, alerts...).
    pub fn with_extra(extra: impl Into<String>) -> Self {
        ProxyOptions {
            extra: extra.into(),
            ..Default::default()
        }
    }
}

/// `config` (as `write_config` writes it) in shared mode: `settings` (`postgres_url`,
/// `redis_url`, ...) go under `[storage]` in place of the embedded mode.
pub fn shared_mode(config: &str, settings: &str) -> String {
    config.replace(
        "mode = \"embedded\"",
        &format!("mode = \"shared\"\n{settings}"),
    )
}

/// `config` with `server.instance_id` set to `id`.
pub fn instance_id(config: &str, id: &str) -> String {
    config.replace(
        "instance_id = \"test-instance\"",
        &format!("instance_id = \"{id}\""),
    )
}

/// The mock upstream on a free loopback port.
pub async fn mock() -> mock_upstream::MockHandle {
    mock_upstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// The mock upstream and a proxy in front of it; the proxy is ready when this returns.
pub async fn start(opts: ProxyOptions) -> (mock_upstream::MockHandle, Proxy) {
    let mock = mock().await;
    let proxy = Proxy::start(mock.addr, opts).await;
    (mock, proxy)
}

/// What `fire` got back: every reply, in the order the requests were made.
pub struct Fired {
    pub replies: Vec<Reply>,
}

impl Fired {
    /// How many replies have `status`.
    pub fn count(&self, status: u16) -> usize {
        self.replies.iter().filter(|r| r.status == status).count()
    }

    pub fn statuses(&self) -> Vec<u16> {
        self.replies.iter().map(|r| r.status).collect()
    }
}

/// Send `n` requests at once, each on its own task; `request(i)` makes the i-th.
pub async fn fire<F, Fut>(n: usize, mut request: F) -> Fired
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(request(i))).collect();
    let mut replies = Vec::with_capacity(n);
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    Fired { replies }
}

impl Proxy {
    pub async fn start(upstream: SocketAddr, opts: ProxyOptions) -> Proxy {
        Proxy::start_edited(upstream, opts, |config| config).await
    }

    /// Like `start`, with the written config rewritten by `edit` first (see `shared_mode`,
    /// `instance_id`).
    pub async fn start_edited(
        upstream: SocketAddr,
        opts: ProxyOptions,
        edit: impl FnOnce(String) -> String,
    ) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let (config_path, addr, admin) = write_config(dir.path(), upstream, &opts);
        let config = std::fs::read_to_string(&config_path).unwrap();
        std::fs::write(&config_path, edit(config)).unwrap();
        let mut p = Proxy {
            child: None,
            addr,
            admin,
            log_path: dir.path().join("proxy.log"),
            dir,
            config_path,
        };
        p.spawn().await;
        p
    }

    /// (Re)start the process on the same config and database.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        // Both streams into the log: nothing the process writes goes unseen (the
        // secrets sweep reads all of it).
        let out = log.try_clone().unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env_remove("TOLLGATE_CONFIG")
            .stdout(out)
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Ready once *this* process answers its health check on the admin port and accepts
        // on the proxy port; a process that exits early fails here with its log.
        let deadline = Instant::now() + Duration::from_secs(30);
        let health = format!("http://{}/healthz", self.admin);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("tollgate exited at start ({status}):\n{}", self.logs());
            }
            let healthy = client()
                .get(health.parse().unwrap())
                .await
                .is_ok_and(|r| r.status() == 200);
            if healthy && tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate not ready after 30 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Send `signal` (`STOP`, `CONT`, ...) to the running process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("not running").id();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Run a CLI subcommand against this proxy's config; returns (status, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("TOLLGATE_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Create a key through the CLI; returns (id, secret).
    pub fn create_key(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec!["keys", "create", "--name", "test", "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = self.cli(&args);
        assert_eq!(code, 0, "keys create failed: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        )
    }

    /// Create a key and wait until the running proxy accepts it (≤ 1 s by contract).
    pub async fn create_live_key(&self, extra: &[&str]) -> (String, String) {
        let (id, key) = self.create_key(extra);
        self.wait_live(&key, Duration::from_secs(1)).await;
        (id, key)
    }

    /// Wait until this proxy accepts `key`; fails after `within`.
    pub async fn wait_live(&self, key: &str, within: Duration) {
        let t0 = Instant::now();
        loop {
            let r = send(
                "GET",
                &self.url("/v1/tollgate/usage"),
                &[("authorization", &format!("Bearer {key}"))],
                "",
            )
            .await;
            if r.status == 200 {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "key not live on {} after {within:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A slow chat stream (1000 words, 20 ms apart) on its own task, given up after 5 s:
    /// the request in flight when a test kills the process. `extra` headers go with it.
    pub fn stream_in_flight(
        &self,
        key: &str,
        extra: &[(&'static str, &'static str)],
    ) -> tokio::task::JoinHandle<()> {
        let url = self.url("/v1/chat/completions");
        let key = key.to_string();
        let mut headers = vec![("x-mock-words", "1000"), ("x-mock-delay-ms", "20")];
        headers.extend_from_slice(extra);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                post_json(&url, &key, &chat_body("gpt-4o-mini", true, "hi"), &headers),
            )
            .await;
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.db")
    }

    /// Waits until no ledger row is `reserved`: every request answered so far is settled
    /// or released (that happens just after the client has its answer).
    pub async fn wait_settled(&self) {
        eventually("no open reservation", || {
            self.ledger().iter().all(|r| r["status"] != "reserved")
        })
        .await;
    }

    /// Read the ledger directly (WAL lets another process read).
    pub fn ledger(&self) -> Vec<serde_json::Value> {
        let c = rusqlite::Connection::open(self.db_path()).unwrap();
        let mut st = c
            .prepare("SELECT trace_id, key_id, status, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, reserved_micros, cost_micros, usage_source, stream, http_status, upstream, model, cache_write_1h_tokens, tool_calls, service_tier, price_version, started_at, adjusts FROM billing_transactions ORDER BY started_at")
            .unwrap();
        st.query_map([], |r| {
            Ok(serde_json::json!({
                "trace_id": r.get::<_, String>(0)?,
                "key_id": r.get::<_, String>(1)?,
                "status": r.get::<_, String>(2)?,
                "input_tokens": r.get::<_, i64>(3)?,
                "cached_input_tokens": r.get::<_, i64>(4)?,
                "cache_write_tokens": r.get::<_, i64>(5)?,
                "output_tokens": r.get::<_, i64>(6)?,
                "reasoning_tokens": r.get::<_, i64>(7)?,
                "reserved_micros": r.get::<_, i64>(8)?,
                "cost_micros": r.get::<_, i64>(9)?,
                "usage_source": r.get::<_, Option<String>>(10)?,
                "stream": r.get::<_, i64>(11)? != 0,
                "http_status": r.get::<_, Option<i64>>(12)?,
                "upstream": r.get::<_, String>(13)?,
                "model": r.get::<_, String>(14)?,
                "cache_write_1h_tokens": r.get::<_, i64>(15)?,
                "tool_calls": r.get::<_, i64>(16)?,
                "service_tier": r.get::<_, Option<String>>(17)?,
                "price_version": r.get::<_, Option<String>>(18)?,
                "started_at": r.get::<_, String>(19)?,
                "adjusts": r.get::<_, Option<String>>(20)?,
            }))
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> hyper::Request<Full<Bytes>> {
    let mut b = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let resp = client()
        .request(request(method, url, headers, body))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn post_json(
    url: &str,
    key: &str,
    body: &serde_json::Value,
    extra: &[(&str, &str)],
) -> Reply {
    let auth = format!("Bearer {key}");
    let mut h: Vec<(&str, &str)> = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    h.extend_from_slice(extra);
    send("POST", url, &h, serde_json::to_vec(body).unwrap()).await
}

/// Read a response body chunk by chunk, with the arrival time of each.
pub async fn send_timed(
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, Vec<(Duration, Bytes)>) {
    let t0 = Instant::now();
    let resp = client()
        .request(request("POST", url, headers, body))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut chunks = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    chunks.push((t0.elapsed(), data));
                }
            }
            Err(_) => break,
        }
    }
    (status, chunks)
}

/// Poll until `f` is true (settles happen just after the response ends).
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn chat_body(model: &str, stream: bool, text: &str) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": text}],
    })
}

/// A raw upstream that answers every request with `response` written in `pieces`, and
/// reports each request's head+body it received.
pub async fn scripted_upstream(
    response: Vec<u8>,
    piece: usize,
    gap: Duration,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let response = response.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 65536];
                // Read the head, then the body by content-length or chunked terminator.
                loop {
                    let n = s.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let body_len = buf.len() - end - 4;
                        let done = if let Some(cl) =
                            head.lines().find_map(|l| l.strip_prefix("content-length:"))
                        {
                            body_len >= cl.trim().parse::<usize>().unwrap_or(0)
                        } else if head.contains("transfer-encoding: chunked") {
                            buf.ends_with(b"0\r\n\r\n")
                        } else {
                            true
                        };
                        if done {
                            break;
                        }
                    }
                }
                let _ = tx.send(buf);
                for chunk in response.chunks(piece.max(1)) {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                    let _ = s.flush().await;
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, rx)
}

pub fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

pub fn http_response(content_type: &str, body: &[u8], chunked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if chunked {
        out.extend_from_slice(format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\nconnection: close\r\nx-ratelimit-limit-requests: 999\r\n\r\n").as_bytes());
        for piece in body.chunks(37) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        out.extend_from_slice(format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
    }
    out
}

/// A response read off a raw socket: status (0 when the server closed without answering),
/// head text, body bytes.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Read one response (head, then a `content-length` body, else until close) off `s`.
/// Status 0 when the server closed or reset the connection before a whole head.
pub async fn read_raw_reply(s: &mut tokio::net::TcpStream) -> RawReply {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let mut body = buf[end + 4..].to_vec();
            let reply = RawReply {
                status,
                head,
                body: Vec::new(),
            };
            // An interim (1xx) answer has no body.
            let want = if (100..200).contains(&status) {
                Some(0)
            } else {
                reply
                    .header("content-length")
                    .and_then(|v| v.parse::<usize>().ok())
            };
            while want.is_none_or(|n| body.len() < n) {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, s.read(&mut tmp)).await {
                    Ok(Ok(n)) if n > 0 => body.extend_from_slice(&tmp[..n]),
                    _ => break,
                }
            }
            return RawReply { body, ..reply };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&tmp[..n]),
            Ok(_) => {
                return RawReply {
                    status: 0,
                    head: String::from_utf8_lossy(&buf).into_owned(),
                    body: Vec::new(),
                };
            }
            Err(_) => panic!(
                "no response within 30 s; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
}

/// Send `request` as raw bytes on a fresh connection and read the answer.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> RawReply {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_raw_reply(&mut s).await
}

/// Whether the server closes `s` (EOF or reset) within 30 s without sending a response.
pub async fn closed_without_answer(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut tmp = [0u8; 1024];
    match tokio::time::timeout(Duration::from_secs(30), s.read(&mut tmp)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}
