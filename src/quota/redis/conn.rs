//! Connections to a single Redis node or a Redis Cluster, with bounded waits, and the
//! classification of Redis errors into transient (`Unavailable`) and permanent (`Other`).
//!
//! Both kinds reconnect by themselves: the single-node `ConnectionManager` swaps in a new
//! connection after an I/O error (the call that saw the error still fails — the next one
//! reconnects), and the cluster connection refreshes its slot map and node connections.
//! Every call is additionally bounded by [`RedisOptions::call_timeout`], so a hung or
//! unreachable server costs a request at most that long before the caller falls back
//! (SPEC §5).

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::quota::store::QuotaError;

/// Connection settings; the defaults suit the request path (a request waits on Redis).
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Per TCP connect attempt.
    pub connect_timeout: Duration,
    /// Per command, once connected.
    pub response_timeout: Duration,
    /// Reconnect attempts (single node) or command retries (cluster) before an error.
    pub retries: usize,
    /// Upper bound of one whole call, retries included.
    pub call_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_millis(250),
            response_timeout: Duration::from_millis(250),
            retries: 2,
            call_timeout: Duration::from_millis(800),
        }
    }
}

/// Where to connect: `redis://host:port[/db]` (also `rediss://`, `unix://`) for one node, or
/// `redis+cluster://[user:pass@]h1[:p1],h2[:p2],...` for a cluster (any reachable seed node
/// is enough; the rest of the topology is discovered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Single(String),
    Cluster(Vec<String>),
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, QuotaError> {
        let bad = |why: &str| QuotaError::Other(format!("redis url: {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("missing scheme"))?;
        let node_scheme = match scheme {
            "redis+cluster" => "redis",
            "rediss+cluster" => "rediss",
            "redis" | "rediss" | "unix" | "redis+unix" => return Ok(Target::Single(url.into())),
            _ => return Err(bad("unknown scheme (redis, rediss, redis+cluster)")),
        };
        let rest = rest.split(['/', '?']).next().unwrap_or_default();
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), rest),
        };
        let nodes: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.rsplit_once(':')
                    .is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                {
                    format!("{node_scheme}://{auth}{h}")
                } else {
                    format!("{node_scheme}://{auth}{h}:6379")
                }
            })
            .collect();
        if nodes.is_empty() {
            return Err(bad("no cluster nodes"));
        }
        Ok(Target::Cluster(nodes))
    }
}

/// A cheap-to-clone handle; commands from many tasks share the multiplexed connection(s).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Single node: lazy — no I/O here, the first command connects, so an instance can start
    /// while Redis is down. Cluster: connects to the seed nodes now (the slot map is needed
    /// before any command) and fails if none answers.
    pub async fn open(target: &Target, opts: &ConnectOptions) -> Result<Conn, QuotaError> {
        match target {
            Target::Single(url) => {
                let client = ::redis::Client::open(url.as_str()).map_err(classify)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(opts.connect_timeout))
                    .set_response_timeout(Some(opts.response_timeout))
                    .set_number_of_retries(opts.retries)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(100));
                let manager =
                    ConnectionManager::new_lazy_with_config(client, config).map_err(classify)?;
                Ok(Conn::Single(manager))
            }
            Target::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(opts.connect_timeout)
                    .response_timeout(opts.response_timeout)
                    .retries(u32::try_from(opts.retries).unwrap_or(u32::MAX))
                    .min_retry_wait(10)
                    .max_retry_wait(100)
                    .build()
                    .map_err(classify)?;
                let conn = tokio::time::timeout(opts.call_timeout, client.get_async_connection())
                    .await
                    .map_err(|_| {
                        QuotaError::Unavailable("redis cluster: connect timed out".into())
                    })?
                    .map_err(classify)?;
                Ok(Conn::Cluster(conn))
            }
        }
    }

    /// Run a script (EVALSHA, loading it on NOSCRIPT), bounded by `limit`.
    pub async fn invoke(
        &self,
        inv: &::redis::ScriptInvocation<'_>,
        limit: Duration,
    ) -> Result<::redis::Value, QuotaError> {
        let call = async {
            match self.clone() {
                Conn::Single(mut c) => inv.invoke_async(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
            }
        };
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(QuotaError::Unavailable(format!(
                "redis: no answer within {} ms",
                limit.as_millis()
            ))),
        }
    }
}

impl Conn {
    /// One `PING`, bounded by `limit`: whether the server answers at all.
    pub async fn ping(&self, limit: Duration) -> Result<(), QuotaError> {
        let call = async {
            let cmd = ::redis::cmd("PING");
            match self.clone() {
                Conn::Single(mut c) => cmd.query_async::<String>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<String>(&mut c).await,
            }
        };
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r.map(|_| ()).map_err(classify),
            Err(_) => Err(QuotaError::Unavailable(format!(
                "redis: no answer within {} ms",
                limit.as_millis()
            ))),
        }
    }
}

/// Transient failures (the store may come back: I/O, timeouts, refused or dropped
/// connections, cluster reconfiguration, loading) are `Unavailable`, which the caller answers
/// with its `on_unavailable` policy; everything else (a script error, a wrong URL, denied
/// permissions) is `Other` — retrying would not help.
pub fn classify(e: RedisError) -> QuotaError {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                        | ServerErrorKind::ReadOnly
                )
        )
        // Out of memory, a busy script, a missing permission: the operator can fix the
        // server while the request path goes on under its policy; a journaled change
        // must wait for that, not be set aside.
        || matches!(e.code(), Some("OOM" | "BUSY" | "NOPERM" | "LOADING"));
    if transient {
        QuotaError::Unavailable(format!("redis: {e}"))
    } else {
        QuotaError::Other(format!("redis: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_cluster_urls() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:6379/0").unwrap(),
            Target::Single("redis://127.0.0.1:6379/0".into())
        );
        assert_eq!(
            Target::parse("redis+cluster://a:7000, b:7001,c").unwrap(),
            Target::Cluster(vec![
                "redis://a:7000".into(),
                "redis://b:7001".into(),
                "redis://c:6379".into()
            ])
        );
        assert_eq!(
            Target::parse("rediss+cluster://u:p@a:7000,b:7001/").unwrap(),
            Target::Cluster(vec![
                "rediss://u:p@a:7000".into(),
                "rediss://u:p@b:7001".into()
            ])
        );
        assert!(Target::parse("redis+cluster://").is_err());
        assert!(Target::parse("http://x").is_err());
        assert!(Target::parse("127.0.0.1:6379").is_err());
    }

    #[test]
    fn io_errors_are_transient_script_errors_are_not() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(classify(io), QuotaError::Unavailable(_)));
        let script = RedisError::from((ErrorKind::Client, "bad reply"));
        assert!(matches!(classify(script), QuotaError::Other(_)));
    }
}
