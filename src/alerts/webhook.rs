//! Webhook delivery of alerts: one HTTP/1.1 `POST` per alert, retried with exponential
//! backoff, each attempt bounded by a timeout.
//!
//! Alerts are rare (at most once per limit, threshold and window), so every delivery opens
//! its own connection (`Connection: close`) instead of keeping a pool: one code path for
//! `http://` and `https://`, nothing to go stale between alerts. `https://` uses rustls with
//! the operating system's root certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured),
//! loaded once, off the reactor, at the first TLS delivery.
//!
//! Failure bounds: a delivery makes at most [`RetryPolicy::attempts`] attempts; the wait
//! before attempt `n + 1` is `first_backoff × 2^(n-1)`; each attempt (DNS, connect, TLS,
//! request, response head) is cut at [`RetryPolicy::timeout`]. With the defaults a dead
//! receiver costs at most 3 × 5 s + 0.5 s + 1 s = 16.5 s per alert, spent in the background
//! task, never on a request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

/// How hard a delivery tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (at least 1).
    pub attempts: u32,
    /// Wait after the first failed attempt; doubled after each further one.
    pub first_backoff: Duration,
    /// Bound on one attempt, connect to response head.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("http: {0}")]
    Http(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("receiver answered HTTP {0}")]
    Status(u16),
}

impl DeliveryError {
    /// Whether another attempt may succeed: network trouble, timeouts, 408, 429 and 5xx.
    /// Any other non-2xx answer is the receiver refusing the alert; repeating it is useless.
    pub fn is_transient(&self) -> bool {
        match self {
            DeliveryError::Status(s) => *s == 408 || *s == 429 || *s >= 500,
            _ => true,
        }
    }
}

/// Parsed by the config reader, so a URL `serve` could not use never gets past
/// `check-config`.
pub use crate::config::WebhookTarget;

/// A webhook receiver and the policy used to reach it.
pub struct Webhook {
    target: WebhookTarget,
    policy: RetryPolicy,
    tls: OnceCell<tokio_rustls::TlsConnector>,
}

impl Webhook {
    pub fn new(target: WebhookTarget, policy: RetryPolicy) -> Webhook {
        Webhook {
            target,
            policy,
            tls: OnceCell::new(),
        }
    }

    /// POST `body` until the receiver answers 2xx, a permanent error, or the attempts run
    /// out. Returns the number of attempts made, with the last error on failure.
    pub async fn deliver(&self, body: Bytes, alert_id: &str) -> Result<u32, (DeliveryError, u32)> {
        let attempts = self.policy.attempts.max(1);
        let mut backoff = self.policy.first_backoff;
        let mut n = 0;
        loop {
            n += 1;
            let result = tokio::time::timeout(self.policy.timeout, self.post_once(&body, alert_id))
                .await
                .unwrap_or(Err(DeliveryError::Timeout(self.policy.timeout)));
            match result {
                Ok(()) => return Ok(n),
                Err(e) if n < attempts && e.is_transient() => {
                    tracing::debug!(target: "tollgate::alert", alert_id, attempt = n, error = %e, "webhook attempt failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                Err(e) => return Err((e, n)),
            }
        }
    }

    async fn post_once(&self, body: &Bytes, alert_id: &str) -> Result<(), DeliveryError> {
        let t = &self.target;
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| DeliveryError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let status = if t.tls {
            let connector = self.tls.get_or_try_init(tls_connector).await?;
            let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| DeliveryError::Tls(format!("invalid server name: {e}")))?;
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| DeliveryError::Tls(e.to_string()))?;
            exchange(stream, self.request(body.clone(), alert_id)?).await?
        } else {
            exchange(tcp, self.request(body.clone(), alert_id)?).await?
        };
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(DeliveryError::Status(status))
        }
    }

    fn request(
        &self,
        body: Bytes,
        alert_id: &str,
    ) -> Result<hyper::Request<Full<Bytes>>, DeliveryError> {
        let t = &self.target;
        let mut b = hyper::Request::builder()
            .method(hyper::Method::POST)
            .uri(t.path.as_str())
            .header(hyper::header::HOST, t.host_header.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::CONTENT_LENGTH, body.len())
            .header(hyper::header::CONNECTION, "close")
            .header(
                hyper::header::USER_AGENT,
                concat!("tollgate/", env!("CARGO_PKG_VERSION")),
            )
            .header("x-tollgate-alert-id", alert_id);
        if let Some(a) = &t.authorization {
            b = b.header(hyper::header::AUTHORIZATION, a.as_str());
        }
        b.body(Full::new(body))
            .map_err(|e| DeliveryError::Http(e.to_string()))
    }
}

/// Send one request on a fresh connection and return the response status.
async fn exchange<S>(io: S, req: hyper::Request<Full<Bytes>>) -> Result<u16, DeliveryError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| DeliveryError::Http(e.to_string()))?;
    // The connection future drives the socket; it ends when the receiver closes it.
    let driver = tokio::spawn(conn);
    let result = sender
        .send_request(req)
        .await
        .map(|resp| resp.status().as_u16())
        .map_err(|e| DeliveryError::Http(e.to_string()));
    driver.abort();
    result
}

/// A TLS connector trusting the operating system's roots. Reading the certificate store is
/// file I/O, so it runs on the blocking pool.
async fn tls_connector() -> Result<tokio_rustls::TlsConnector, DeliveryError> {
    let roots = tokio::task::spawn_blocking(|| {
        let mut roots = rustls::RootCertStore::empty();
        let certs = rustls_native_certs::load_native_certs()
            .map_err(|e| DeliveryError::Tls(format!("cannot read system certificates: {e}")))?;
        for c in certs {
            // One unparsable certificate in the system store must not disable TLS.
            let _ = roots.add(c);
        }
        Ok::<_, DeliveryError>(roots)
    })
    .await
    .map_err(|e| DeliveryError::Tls(format!("certificate loader failed: {e}")))??;
    if roots.is_empty() {
        return Err(DeliveryError::Tls(
            "no root certificates found in the system store".into(),
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DeliveryError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_retryable_answers_are_retried() {
        assert!(DeliveryError::Status(500).is_transient());
        assert!(DeliveryError::Status(429).is_transient());
        assert!(DeliveryError::Status(408).is_transient());
        assert!(!DeliveryError::Status(404).is_transient());
        assert!(!DeliveryError::Status(401).is_transient());
        assert!(DeliveryError::Connect("refused".into()).is_transient());
        assert!(DeliveryError::Timeout(Duration::from_secs(1)).is_transient());
    }

    /// A raw HTTP/1.1 receiver answering with `statuses` in turn (the last one repeats).
    async fn receiver(statuses: Vec<u16>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let i = h.fetch_add(1, Ordering::SeqCst);
                let status = statuses[i.min(statuses.len() - 1)];
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                // Read the head and the body (Content-Length) before answering.
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len || n == 0 {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        (addr, hits)
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(10),
            timeout: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn retries_until_the_receiver_accepts() {
        let (addr, hits) = receiver(vec![503, 500, 204]).await;
        let w = Webhook::new(
            WebhookTarget::parse(&format!("http://{addr}/hook")).unwrap(),
            fast(),
        );
        assert_eq!(w.deliver(Bytes::from_static(b"{}"), "a1").await.unwrap(), 3);
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gives_up_after_the_attempts_and_on_permanent_refusals() {
        let (addr, hits) = receiver(vec![500]).await;
        let w = Webhook::new(
            WebhookTarget::parse(&format!("http://{addr}/hook")).unwrap(),
            fast(),
        );
        let (e, n) = w
            .deliver(Bytes::from_static(b"{}"), "a1")
            .await
            .unwrap_err();
        assert_eq!(n, 3);
        assert!(matches!(e, DeliveryError::Status(500)));
        assert_eq!(hits.load(Ordering::SeqCst), 3);

        let (addr, hits) = receiver(vec![404]).await;
        let w = Webhook::new(
            WebhookTarget::parse(&format!("http://{addr}/hook")).unwrap(),
            fast(),
        );
        let (_, n) = w
            .deliver(Bytes::from_static(b"{}"), "a1")
            .await
            .unwrap_err();
        assert_eq!(n, 1, "a 404 is not retried");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_silent_receiver_times_out() {
        // Accepts and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut keep = Vec::new();
            loop {
                let (s, _) = l.accept().await.unwrap();
                keep.push(s);
            }
        });
        let w = Webhook::new(
            WebhookTarget::parse(&format!("http://{addr}/")).unwrap(),
            RetryPolicy {
                attempts: 2,
                first_backoff: Duration::from_millis(1),
                timeout: Duration::from_millis(100),
            },
        );
        let t0 = std::time::Instant::now();
        let (e, n) = w.deliver(Bytes::new(), "a").await.unwrap_err();
        assert!(matches!(e, DeliveryError::Timeout(_)));
        assert_eq!(n, 2);
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
