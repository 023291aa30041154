//! Upstream addresses, resolved off the request path.
//!
//! pingora's `HttpPeer::new` with a host name resolves DNS *blocking* on the reactor and
//! panics when the lookup fails, so tollgate resolves each upstream host in a background
//! task (at start, then every [`REFRESH_EVERY`]) and hands pingora a `SocketAddr`. A failed
//! refresh keeps the last good addresses; an upstream that never resolved answers 502.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

use crate::config::{UpstreamConfig, UpstreamKind};

pub const REFRESH_EVERY: Duration = Duration::from_secs(30);

/// One configured upstream with its current addresses.
pub struct Upstream {
    pub cfg: UpstreamConfig,
    /// The header carrying the upstream's own key, built once and marked sensitive, so
    /// no `Debug` of a request (pingora logs one at debug level) can print the key.
    pub credential: Option<(&'static str, http::HeaderValue)>,
    addrs: RwLock<Arc<Vec<SocketAddr>>>,
    next: AtomicUsize,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Upstream {
        // A literal IP needs no lookup at all.
        let literal: Vec<SocketAddr> = cfg
            .host
            .parse::<std::net::IpAddr>()
            .map(|ip| vec![SocketAddr::new(ip, cfg.port)])
            .unwrap_or_default();
        let key = cfg.api_key.expose();
        let credential = match cfg.kind {
            UpstreamKind::Openai => ("authorization", format!("Bearer {key}")),
            UpstreamKind::Anthropic => ("x-api-key", key.to_string()),
        };
        // A key that is not a valid header value cannot be sent at all; the upstream
        // then answers its own 401.
        let credential = http::HeaderValue::from_str(&credential.1)
            .ok()
            .map(|mut v| {
                v.set_sensitive(true);
                (credential.0, v)
            });
        if credential.is_none() {
            tracing::error!(upstream = %cfg.name, "api_key is not a valid HTTP header value; requests go without a key");
        }
        Upstream {
            cfg,
            credential,
            addrs: RwLock::new(Arc::new(literal)),
            next: AtomicUsize::new(0),
        }
    }

    /// Next address, round robin over what DNS returned.
    pub fn pick(&self) -> Option<SocketAddr> {
        let addrs = self.addrs.read().clone();
        if addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % addrs.len();
        addrs.get(i).copied()
    }

    fn is_literal(&self) -> bool {
        self.cfg.host.parse::<std::net::IpAddr>().is_ok()
    }

    /// Resolve now; keeps the previous addresses on failure.
    pub async fn resolve(&self) -> Result<usize, std::io::Error> {
        if self.is_literal() {
            return Ok(1);
        }
        let found: Vec<SocketAddr> =
            tokio::net::lookup_host((self.cfg.host.as_str(), self.cfg.port))
                .await?
                .collect();
        if found.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no addresses",
            ));
        }
        let n = found.len();
        *self.addrs.write() = Arc::new(found);
        Ok(n)
    }
}

/// Resolve every upstream forever. The first round runs immediately.
pub async fn resolve_loop(upstreams: Arc<Vec<Upstream>>) {
    let mut failed = vec![false; upstreams.len()];
    loop {
        for (i, u) in upstreams.iter().enumerate() {
            match u.resolve().await {
                Ok(n) => {
                    if failed[i] {
                        tracing::info!(upstream = %u.cfg.name, addresses = n, "upstream resolves again");
                    }
                    failed[i] = false;
                }
                Err(e) => {
                    if !failed[i] {
                        tracing::warn!(upstream = %u.cfg.name, host = %u.cfg.host, error = %e, "cannot resolve upstream; keeping last known addresses");
                    }
                    failed[i] = true;
                }
            }
        }
        // Retry failures sooner than the regular refresh.
        let wait = if failed.iter().any(|f| *f) {
            Duration::from_secs(2)
        } else {
            REFRESH_EVERY
        };
        tokio::time::sleep(wait).await;
    }
}
