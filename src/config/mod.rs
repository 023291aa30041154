//! Configuration: `config.toml` text → a validated [`Config`].
//!
//! The file is walked by hand (over `toml_edit`, which keeps spans) instead of through
//! `serde` so that *every* problem is reported at once, each with its key path and line:
//! an operator fixing a config should not have to run `check-config` once per typo.
//! Unknown keys are errors. `${VAR}` and `${VAR:-default}` are expanded inside string
//! values after parsing, so a secret full of quotes cannot break the TOML. Secrets are
//! held in [`Secret`], whose `Debug`/`Display` never show the value.
//!
//! Everything is parsed into the type its user needs — plan limits into [`LimitSpec`]s,
//! price entries into [`Price`]s, the alert webhook into a [`WebhookTarget`], passthrough
//! routes, the store URLs checked as their clients read them — so `check-config` and
//! `serve` accept exactly the same files: nothing is parsed again at start.
//!
//! - this module: the types and the [`Config`] API;
//! - `reader`: the TOML walker producing [`ConfigIssue`]s;
//! - `units`: sizes, durations, `${VAR}` expansion, URLs and their redaction.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::api::UpstreamKind;
use crate::billing::price::Price;
pub use crate::db::Durability;
use crate::passthrough::PassthroughRoute;
use crate::quota::LimitSpec;
pub use crate::quota::OnUnavailable;

mod reader;
mod units;

use units::url_password;
pub use units::{
    WebhookTarget, check_postgres_url, check_redis_url, hostname, parse_duration, parse_size,
    redact_url, whole_hour_offsets,
};

/// A configuration value that must never be printed (provider keys, admin token, URLs
/// with passwords).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the few places that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// Top-level keys (sections) of the file.
pub const ROOT_KEYS: &[&str] = &[
    "server",
    "storage",
    "quota",
    "upstreams",
    "plans",
    "prices",
    "alerts",
    "log",
];
/// Keys of `[server]`.
pub const SERVER_KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "admin_token",
    "max_request_body",
    "threads",
    "instance_id",
    "grace_period",
    "admin_hosts",
    "header_timeout",
    "body_timeout",
    "send_timeout",
    "max_connections",
    "max_connections_per_ip",
    "keepalive_timeout",
    "max_request_head",
    "max_request_headers",
    "max_buffered_bodies",
    "max_parsing_bytes",
];
/// Keys of `[storage]`.
pub const STORAGE_KEYS: &[&str] = &[
    "mode",
    "journal_path",
    "redis_url",
    "postgres_url",
    "on_unavailable",
    "durability",
    "journal_retention",
    "retention",
];
/// Keys of `[quota]`.
pub const QUOTA_KEYS: &[&str] = &[
    "timezone",
    "reservation_ttl",
    "default_max_output_tokens",
    "unseen_input_tokens",
    "unknown_model",
    "passthrough_rate",
    "passthrough_burst",
];
/// Keys of each `[[upstreams]]` table.
pub const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "kind",
    "base_url",
    "api_key",
    "routes",
    "passthrough",
    "connect_timeout",
    "first_byte_timeout",
    "idle_timeout",
    "forward_headers",
    "allow_insecure_http",
];
/// Keys of each `[plans.NAME]` table.
pub const PLAN_KEYS: &[&str] = &["limits"];
/// Keys of each `[prices."MODEL"]` table.
pub const PRICE_KEYS: &[&str] = crate::billing::price::ENTRY_KEYS;
/// Keys of a price entry's `long_context` table.
pub const LONG_CONTEXT_KEYS: &[&str] = crate::billing::price::LONG_CONTEXT_KEYS;
/// Keys of `[alerts]`.
pub const ALERTS_KEYS: &[&str] = &["thresholds", "webhook"];
/// Keys of `[log]`.
pub const LOG_KEYS: &[&str] = &["level", "format"];

/// Shortest accepted `server.admin_token` (an empty token disables the admin API).
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Request headers that choose which account of the operator's provider key pays
/// (`OpenAI-Organization`, `OpenAI-Project`). Callers' values are dropped unless the
/// upstream lists the header in `forward_headers`. Anthropic has none: its workspace is
/// fixed by the key, and `anthropic-beta` selects features, not an account.
pub const ACCOUNT_HEADERS: &[&str] = &["openai-organization", "openai-project"];

/// Request headers that carry a caller's credential; never forwarded upstream (tollgate
/// sets the upstream's own key instead).
pub const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "proxy-authorization",
];

/// Response headers that name the operator's provider account (or carry the provider's
/// cookies for it); removed before the client sees the response.
pub const ACCOUNT_RESPONSE_HEADERS: &[&str] = &[
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
    "set-cookie",
];

/// Every section with the keys it accepts, named as `docs/configuration.md` heads them
/// (`plans.NAME`, `prices."MODEL"`). The parser reads the lists above, and a test keeps
/// the reference in step with them.
pub const SECTIONS: &[(&str, &[&str])] = &[
    ("server", SERVER_KEYS),
    ("storage", STORAGE_KEYS),
    ("quota", QUOTA_KEYS),
    ("upstreams", UPSTREAM_KEYS),
    ("plans.NAME", PLAN_KEYS),
    ("prices.\"MODEL\"", PRICE_KEYS),
    ("prices.\"MODEL\".long_context", LONG_CONTEXT_KEYS),
    ("alerts", ALERTS_KEYS),
    ("log", LOG_KEYS),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    Embedded,
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownModel {
    Reject,
    Free,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub quota: QuotaConfig,
    pub upstreams: Vec<UpstreamConfig>,
    /// Plan name → its limits; a limit scoped to an upstream names a configured one.
    pub plans: BTreeMap<String, Vec<LimitSpec>>,
    /// Model (or glob) → price entries replacing or adding to the shipped table.
    pub prices: BTreeMap<String, Price>,
    pub alerts: AlertsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Secret,
    pub max_request_body: u64,
    pub threads: usize,
    /// Written on every ledger row and used as this instance's name in Redis. Unless
    /// configured, the journal's durable identity replaces the placeholder default at
    /// start ([`crate::server::adopt_instance_identity`]).
    pub instance_id: String,
    /// `server.instance_id` was set in the config (else it is the journal's own).
    pub instance_id_configured: bool,
    /// How long a graceful shutdown waits for open requests to finish.
    pub grace_period: Duration,
    /// Extra `Host` names the admin listener answers to (DNS-rebinding defence).
    pub admin_hosts: Vec<String>,
    /// Longest time a request's head may take to arrive, from its first byte (both listeners).
    pub header_timeout: Duration,
    /// Longest time a request body may take to arrive, whole (proxy listener).
    pub body_timeout: Duration,
    /// Longest time a write to a client may make no progress before its connection is
    /// closed (both listeners): a client that stops reading does not hold a slot.
    pub send_timeout: Duration,
    /// Most client connections the proxy listener holds open at once.
    pub max_connections: usize,
    /// Most proxy connections one client address holds open at once.
    pub max_connections_per_ip: usize,
    /// Longest wait for the next request on an idle keep-alive connection (proxy listener).
    pub keepalive_timeout: Duration,
    /// Largest request head (request line plus header names and values) the proxy takes.
    pub max_request_head: u64,
    /// Most header lines a proxy request may carry.
    pub max_request_headers: usize,
    /// Most request-body bytes held at once across all proxy connections.
    pub max_buffered_bodies: u64,
    /// Most request-body bytes being parsed into a JSON tree at once, across all requests.
    pub max_parsing_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub mode: StorageMode,
    pub journal_path: PathBuf,
    pub redis_url: Option<Secret>,
    pub postgres_url: Option<Secret>,
    pub on_unavailable: OnUnavailable,
    pub durability: Durability,
    /// Shared mode: how long shipped journal events (and final trace ids) are kept locally.
    pub journal_retention: Duration,
    /// How long settled and released ledger rows are kept once counted in the hourly
    /// rollups (`None`: keep everything). At least [`MIN_RETENTION`].
    pub retention: Option<Duration>,
}

/// Shortest `storage.retention`: a rolling window that reaches before the retention
/// watermark is then at least this long, so counting its first hour from the hourly
/// rollups stays within the 1/60 of its length that a rolling window is exact to.
pub const MIN_RETENTION: Duration = Duration::from_secs(3 * 86_400);

#[derive(Debug, Clone)]
pub struct QuotaConfig {
    pub timezone: chrono_tz::Tz,
    pub reservation_ttl: Duration,
    pub default_max_output_tokens: u64,
    /// Input tokens held for a request that makes the upstream read input the estimate
    /// cannot see (`previous_response_id`, files by id...); 0 refuses such requests where a
    /// USD or token limit applies.
    pub unseen_input_tokens: u64,
    pub unknown_model: UnknownModel,
    /// Passthrough requests (unmetered) one key may send per second, on average.
    pub passthrough_rate: u32,
    /// Passthrough requests one key may send at once before the rate applies.
    pub passthrough_burst: u32,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub kind: UpstreamKind,
    pub base_url: String,
    /// Parsed parts of `base_url`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix of `base_url` (without trailing slash), prepended to route paths.
    pub base_path: String,
    pub api_key: Secret,
    pub routes: Vec<String>,
    /// Unmetered routes forwarded with this upstream's key (SPEC §6).
    pub passthrough: Vec<PassthroughRoute>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    /// Account-selecting request headers ([`ACCOUNT_HEADERS`]) callers may set for this
    /// upstream, lower-cased; every other account header from a caller is dropped.
    pub forward_headers: Vec<String>,
    /// `base_url` may be `http://` to a host that is not loopback (the provider key then
    /// travels in clear); refused at load without it.
    pub allow_insecure_http: bool,
}

#[derive(Debug, Clone)]
pub struct AlertsConfig {
    pub thresholds: Vec<u8>,
    /// Where alerts are `POST`ed (`None`: alerts are only logged).
    pub webhook: Option<WebhookTarget>,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Key path, e.g. `upstreams[1].base_url`.
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", render_issues(.file, .issues))]
    Invalid {
        file: String,
        issues: Vec<ConfigIssue>,
    },
}

fn render_issues(file: &str, issues: &[ConfigIssue]) -> String {
    let mut out = format!("{} error(s) in {file}:", issues.len());
    for i in issues {
        match i.line {
            Some(l) => out.push_str(&format!("\n  {file}:{l}: {}: {}", i.path, i.message)),
            None => out.push_str(&format!("\n  {file}: {}: {}", i.path, i.message)),
        }
    }
    out
}

impl Config {
    /// `storage.postgres_url` (validation requires it in shared mode; empty otherwise).
    pub fn postgres_url(&self) -> String {
        self.storage
            .postgres_url
            .as_ref()
            .map(|s| s.expose().to_string())
            .unwrap_or_default()
    }

    /// `text` (an error from a store, say) with every secret of this config masked: the
    /// store URLs by their [`redact_url`] form, their passwords, the webhook URL, the
    /// upstream keys and the admin token. For the log; answers never carry such text.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        let urls = [
            (self.storage.redis_url.as_ref(), true),
            (self.storage.postgres_url.as_ref(), true),
            (self.alerts.webhook.as_ref().map(WebhookTarget::url), false),
        ];
        for (url, keep_path) in urls {
            let Some(url) = url.map(Secret::expose).filter(|u| !u.is_empty()) else {
                continue;
            };
            out = out.replace(url, &redact_url(url, keep_path));
            if let Some(pw) = url_password(url) {
                out = out.replace(pw, "***");
            }
        }
        let plain = self
            .upstreams
            .iter()
            .map(|u| u.api_key.expose())
            .chain([self.server.admin_token.expose()]);
        for secret in plain.filter(|s| !s.is_empty()) {
            out = out.replace(secret, "***");
        }
        out
    }

    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string(), &|k| {
            std::env::var(k).ok()
        })
    }

    /// Parse config text. `env` resolves `${VAR}`; `file` names the source in errors.
    pub fn parse(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        reader::read(text, env).map_err(|issues| ConfigError::Invalid {
            file: file.to_string(),
            issues,
        })
    }

    /// The upstream that serves `path` (query string ignored), if any.
    pub fn upstream_for_path(&self, path: &str) -> Option<(usize, &UpstreamConfig)> {
        let path = path.split('?').next().unwrap_or(path);
        self.upstreams
            .iter()
            .enumerate()
            .find(|(_, u)| u.routes.iter().any(|r| r == path))
    }

    /// The upstream passthrough route that serves `method path` (query string ignored).
    ///
    /// Several upstreams may claim one passthrough (both default kinds list `GET
    /// /v1/models`). A request carrying `anthropic-version` (every Anthropic SDK sends it,
    /// the Anthropic API requires it) goes to the first `anthropic` upstream that lists
    /// the route and never to another kind; any other request to the first `openai`
    /// upstream that lists it, else the first `anthropic` one. "First" is config order.
    pub fn passthrough_for(
        &self,
        method: &http::Method,
        path: &str,
        anthropic_client: bool,
    ) -> Option<(usize, &UpstreamConfig, &PassthroughRoute)> {
        let path = path.split('?').next().unwrap_or(path);
        let find = |kind: UpstreamKind| {
            self.upstreams
                .iter()
                .enumerate()
                .filter(|(_, u)| u.kind == kind)
                .find_map(|(i, u)| {
                    u.passthrough
                        .iter()
                        .find(|r| r.matches(method, path))
                        .map(|r| (i, u, r))
                })
        };
        if anthropic_client {
            find(UpstreamKind::Anthropic)
        } else {
            find(UpstreamKind::Openai).or_else(|| find(UpstreamKind::Anthropic))
        }
    }

    /// The methods the passthrough routes whose path matches `path` take (query string
    /// ignored), in config order without repeats: the `Allow` of a 405. Only the routes
    /// [`Self::passthrough_for`] would consider for this client: an Anthropic client's
    /// are those of `anthropic` upstreams.
    pub fn passthrough_methods(&self, path: &str, anthropic_client: bool) -> Vec<http::Method> {
        let path = path.split('?').next().unwrap_or(path);
        let mut out: Vec<http::Method> = Vec::new();
        let considered = self
            .upstreams
            .iter()
            .filter(|u| !anthropic_client || u.kind == UpstreamKind::Anthropic);
        for r in considered.flat_map(|u| u.passthrough.iter()) {
            if r.matches_path(path) && !out.contains(&r.method) {
                out.push(r.method.clone());
            }
        }
        out
    }

    /// The resolved configuration as JSON with every secret masked, for `check-config`.
    pub fn redacted_json(&self) -> serde_json::Value {
        use serde_json::json;
        let mask = |s: &Secret| {
            if s.is_empty() {
                json!("")
            } else {
                json!("***")
            }
        };
        json!({
            "server": {
                "listen": self.server.listen.to_string(),
                "admin_listen": self.server.admin_listen.to_string(),
                "admin_token": mask(&self.server.admin_token),
                "max_request_body": self.server.max_request_body,
                "threads": self.server.threads,
                "instance_id": self.server.instance_id,
                "grace_period": humantime::format_duration(self.server.grace_period).to_string(),
                "admin_hosts": self.server.admin_hosts,
                "header_timeout": humantime::format_duration(self.server.header_timeout).to_string(),
                "body_timeout": humantime::format_duration(self.server.body_timeout).to_string(),
                "send_timeout": humantime::format_duration(self.server.send_timeout).to_string(),
                "max_connections": self.server.max_connections,
                "max_connections_per_ip": self.server.max_connections_per_ip,
                "keepalive_timeout": humantime::format_duration(self.server.keepalive_timeout).to_string(),
                "max_request_head": self.server.max_request_head,
                "max_request_headers": self.server.max_request_headers,
                "max_buffered_bodies": self.server.max_buffered_bodies,
                "max_parsing_bytes": self.server.max_parsing_bytes,
            },
            "storage": {
                "mode": self.storage.mode,
                "journal_path": self.storage.journal_path.display().to_string(),
                "redis_url": self.storage.redis_url.as_ref().map(|u| redact_url(u.expose(), true)),
                "postgres_url": self.storage.postgres_url.as_ref().map(|u| redact_url(u.expose(), true)),
                "on_unavailable": self.storage.on_unavailable,
                "durability": self.storage.durability,
                "journal_retention": humantime::format_duration(self.storage.journal_retention).to_string(),
                // Whole days as written ("90d"); humantime would print 90 days as months.
                "retention": self.storage.retention.map(|d| if d.as_secs() % 86_400 == 0 {
                    format!("{}d", d.as_secs() / 86_400)
                } else {
                    humantime::format_duration(d).to_string()
                }),
            },
            "quota": {
                "timezone": self.quota.timezone.name(),
                "reservation_ttl": humantime::format_duration(self.quota.reservation_ttl).to_string(),
                "default_max_output_tokens": self.quota.default_max_output_tokens,
                "unseen_input_tokens": self.quota.unseen_input_tokens,
                "unknown_model": self.quota.unknown_model,
                "passthrough_rate": self.quota.passthrough_rate,
                "passthrough_burst": self.quota.passthrough_burst,
            },
            "upstreams": self.upstreams.iter().map(|u| json!({
                "name": u.name,
                "kind": u.kind,
                "base_url": u.base_url,
                "api_key": mask(&u.api_key),
                "routes": u.routes,
                "passthrough": u.passthrough.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "connect_timeout": humantime::format_duration(u.connect_timeout).to_string(),
                "first_byte_timeout": humantime::format_duration(u.first_byte_timeout).to_string(),
                "idle_timeout": humantime::format_duration(u.idle_timeout).to_string(),
                "forward_headers": u.forward_headers,
                "allow_insecure_http": u.allow_insecure_http,
            })).collect::<Vec<_>>(),
            "plans": self.plans,
            "prices": self.prices.iter().map(|(k, p)| {
                let mut entry = serde_json::to_value(p).unwrap_or_default();
                entry["version"] = json!(p.version());
                (k.clone(), entry)
            }).collect::<serde_json::Map<_, _>>(),
            "alerts": {
                "thresholds": self.alerts.thresholds,
                "webhook": self.alerts.webhook.as_ref().map(|w| redact_url(w.url().expose(), false)),
            },
            "log": { "level": self.log.level, "format": self.log.format },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "OPENAI_API_KEY" => Some("sk-test-secret".into()),
            "ADMIN" => Some("adm-secret-0123456789".into()),
            _ => None,
        }
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9091"
admin_token = "${ADMIN}"
max_request_body = "1MiB"
threads = 4
instance_id = "sidecar-a"

[storage]
mode = "embedded"
journal_path = "/tmp/x.db"

[quota]
timezone = "Europe/Berlin"
reservation_ttl = "10m"

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com"
api_key = "${OPENAI_API_KEY}"

[[upstreams]]
name = "anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:9999/proxy/"
api_key = "${ANTHROPIC_API_KEY:-}"
routes = ["/v1/messages"]
first_byte_timeout = "500ms"

[plans.free]
limits = ["requests:minute=20", "usd:month=5"]

[prices."gpt-4o-mini"]
input = 0.15
cached_input = 0.075
output = 0.60
"#;

    #[test]
    fn parses_a_full_config() {
        let c = Config::parse(GOOD, "config.toml", &env).unwrap();
        assert_eq!(c.server.threads, 4);
        assert_eq!(c.server.max_request_body, 1 << 20);
        assert_eq!(c.server.admin_token.expose(), "adm-secret-0123456789");
        assert_eq!(c.quota.timezone, chrono_tz::Europe::Berlin);
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.upstreams[0].routes.len(), 4, "default openai routes");
        assert!(c.upstreams[0].tls);
        assert_eq!(c.upstreams[0].port, 443);
        assert_eq!(c.upstreams[1].host, "127.0.0.1");
        assert_eq!(c.upstreams[1].port, 9999);
        assert_eq!(c.upstreams[1].base_path, "/proxy");
        assert_eq!(
            c.upstreams[1].first_byte_timeout,
            Duration::from_millis(500)
        );
        assert!(c.upstreams[1].api_key.is_empty());
        let free: Vec<String> = c.plans["free"].iter().map(ToString::to_string).collect();
        assert_eq!(free, ["requests:minute=20", "usd:month=5"]);
        assert_eq!(c.plans["free"][1].value, 5_000_000, "micro-dollars");
        let mini = &c.prices["gpt-4o-mini"];
        assert_eq!(
            (mini.rates.input, mini.rates.cached_input, mini.rates.output),
            (150_000_000, 75_000_000, 600_000_000)
        );
        assert_eq!(
            c.upstream_for_path("/v1/messages?x=1").map(|(i, _)| i),
            Some(1)
        );
        assert!(c.upstream_for_path("/v2/other").is_none());
    }

    #[test]
    fn secrets_never_show_in_debug_or_json() {
        let c = Config::parse(GOOD, "config.toml", &env).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sk-test-secret"));
        assert!(!dbg.contains("adm-secret"));
        let json = c.redacted_json().to_string();
        assert!(!json.contains("sk-test-secret"));
        assert!(!json.contains("adm-secret"));
        assert!(json.contains("\"***\""));
    }

    #[test]
    fn every_error_is_reported_with_path_and_line() {
        let bad = r#"[server]
listen = "nope"
threads = 0
bogus = 1

[storage]
mode = "clustered"

[[upstreams]]
name = "openai"
kind = "gemini"
base_url = "ftp://x"
api_key = "${MISSING_KEY}"
connect_timeout = "soon"
"#;
        let err = Config::parse(bad, "c.toml", &env).unwrap_err();
        let ConfigError::Invalid { issues, .. } = &err else {
            panic!("expected Invalid")
        };
        let find = |p: &str| {
            issues
                .iter()
                .find(|i| i.path == p)
                .unwrap_or_else(|| panic!("no issue for {p}: {issues:?}"))
        };
        assert_eq!(find("server.listen").line, Some(2));
        assert_eq!(find("server.threads").line, Some(3));
        assert_eq!(find("server.bogus").line, Some(4));
        assert_eq!(find("storage.mode").line, Some(7));
        assert_eq!(find("upstreams[0].kind").line, Some(11));
        assert_eq!(find("upstreams[0].base_url").line, Some(12));
        assert!(find("upstreams[0].api_key").message.contains("MISSING_KEY"));
        assert_eq!(find("upstreams[0].connect_timeout").line, Some(14));
        assert_eq!(issues.len(), 8, "{issues:?}");
        let text = err.to_string();
        assert!(text.contains("c.toml:2: server.listen"), "{text}");
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let err = Config::parse("[server]\nlisten = \n", "c.toml", &env).unwrap_err();
        let ConfigError::Invalid { issues, .. } = err else {
            panic!()
        };
        assert_eq!(issues[0].line, Some(2));
    }

    #[test]
    fn shared_mode_needs_urls_and_routes_are_unique() {
        let cfg = r#"
[storage]
mode = "shared"
[[upstreams]]
name = "a"
kind = "openai"
base_url = "http://localhost"
[[upstreams]]
name = "a"
kind = "openai"
base_url = "http://127.0.0.2"
"#;
        let ConfigError::Invalid { issues, .. } = Config::parse(cfg, "c", &env).unwrap_err() else {
            panic!()
        };
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert!(paths.contains(&"storage.redis_url"));
        assert!(paths.contains(&"storage.postgres_url"));
        assert!(paths.contains(&"upstreams[1].name"));
        assert!(paths.contains(&"upstreams[1].routes"));
    }

    #[test]
    fn passthrough_routes_default_per_kind_and_pick_one_upstream() {
        let c = Config::parse(GOOD, "config.toml", &env).unwrap();
        let texts = |i: usize| -> Vec<String> {
            c.upstreams[i]
                .passthrough
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(texts(0), ["GET /v1/models", "GET /v1/models/{id}"]);
        assert_eq!(
            texts(1),
            ["GET /v1/models", "POST /v1/messages/count_tokens"]
        );
        let get = http::Method::GET;
        let pick = |m: &http::Method, p: &str, anthropic: bool| {
            c.passthrough_for(m, p, anthropic)
                .map(|(i, _, r)| (i, r.pattern.clone()))
        };
        // Both claim GET /v1/models: the client's dialect decides.
        assert_eq!(
            pick(&get, "/v1/models", false),
            Some((0, "/v1/models".into()))
        );
        assert_eq!(
            pick(&get, "/v1/models?limit=2", true),
            Some((1, "/v1/models".into()))
        );
        // Only openai lists /v1/models/{id}: an Anthropic client never reaches it.
        assert_eq!(
            pick(&get, "/v1/models/gpt-4o", false),
            Some((0, "/v1/models/{id}".into()))
        );
        assert_eq!(pick(&get, "/v1/models/claude-x", true), None);
        // Only anthropic lists count_tokens: a client without the header still gets there.
        let post = http::Method::POST;
        assert_eq!(
            pick(&post, "/v1/messages/count_tokens", false).map(|p| p.0),
            Some(1)
        );
        assert_eq!(
            pick(&get, "/v1/messages/count_tokens", true),
            None,
            "method"
        );
        assert!(pick(&post, "/v1/chat/completions", false).is_none());
    }

    #[test]
    fn a_passthrough_can_never_take_a_metered_route() {
        let cfg = r#"
[[upstreams]]
name = "a"
kind = "openai"
base_url = "http://localhost"
routes = ["/v1/chat/completions", "/v1/custom"]
passthrough = ["POST /v1/chat/{op}", "GET /v1/{thing}", "GET models", "GET /v1/models"]
"#;
        let ConfigError::Invalid { issues, .. } = Config::parse(cfg, "c", &env).unwrap_err() else {
            panic!()
        };
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert!(paths.contains(&"upstreams[0].passthrough[0]"), "{issues:?}");
        assert!(paths.contains(&"upstreams[0].passthrough[1]"), "{issues:?}");
        assert!(paths.contains(&"upstreams[0].passthrough[2]"), "{issues:?}");
        assert_eq!(issues.len(), 3, "{issues:?}");
        let custom = r#"
[[upstreams]]
name = "a"
kind = "openai"
base_url = "http://localhost"
routes = ["/v1/custom/run"]
passthrough = ["GET /v1/custom/{x}"]
"#;
        let ConfigError::Invalid { issues, .. } = Config::parse(custom, "c", &env).unwrap_err()
        else {
            panic!()
        };
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].message.contains("/v1/custom/run"), "{issues:?}");
        let none = "[[upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://localhost\"\npassthrough = []\n";
        let c = Config::parse(none, "c", &env).unwrap();
        assert!(c.upstreams[0].passthrough.is_empty());
    }

    fn issues_of(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<ConfigIssue> {
        match Config::parse(text, "c.toml", env) {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("expected issues, got {other:?}"),
        }
    }

    #[test]
    fn plain_http_upstreams_need_loopback_or_an_explicit_opt_in() {
        let up = |url: &str, extra: &str| {
            format!("[[upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"{url}\"\n{extra}")
        };
        for url in [
            "http://api.openai.com",
            "http://10.0.0.5:8000/v1",
            "http://[2001:db8::1]",
            "http://localhost.evil.example",
            "http://127.0.0.1.nip.io",
        ] {
            let issues = issues_of(&up(url, ""), &env);
            assert_eq!(issues.len(), 1, "{url}: {issues:?}");
            assert_eq!(issues[0].path, "upstreams[0].base_url");
            assert!(
                issues[0].message.contains("allow_insecure_http"),
                "{issues:?}"
            );
            let c = Config::parse(&up(url, "allow_insecure_http = true"), "c", &env).unwrap();
            assert!(c.upstreams[0].allow_insecure_http);
            assert!(!c.upstreams[0].tls);
        }
        for url in [
            "http://127.0.0.1:8000",
            "http://127.9.9.9",
            "http://[::1]:9",
            "http://localhost:8000",
            "http://LocalHost",
            "http://mock.localhost",
            "https://api.openai.com",
            "https://10.0.0.5",
        ] {
            let c = Config::parse(&up(url, ""), "c", &env).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(!c.upstreams[0].allow_insecure_http);
        }
        let issues = issues_of(
            &up("http://h.example", "allow_insecure_http = \"yes\""),
            &env,
        );
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            ["upstreams[0].allow_insecure_http", "upstreams[0].base_url"]
        );
    }

    #[test]
    fn credentials_in_a_base_url_are_refused_without_echoing_them() {
        let cfg = "[[upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://user:hunter2@10.0.0.1:8000/v1\"\n";
        let issues = issues_of(cfg, &env);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].path, "upstreams[0].base_url");
        assert_eq!(issues[0].line, Some(4));
        assert!(issues[0].message.contains("api_key"), "{issues:?}");
        let shown = format!("{issues:?} {}", render_issues("c.toml", &issues));
        assert!(!shown.contains("hunter2"), "{shown}");
        // A token-only userinfo, and one that comes from the environment, too.
        let secret_env = |k: &str| (k == "UP").then(|| "http://sk-live-1@h".to_string());
        let issues = issues_of(
            "[[upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"${UP}\"\n",
            &secret_env,
        );
        assert_eq!(issues[0].path, "upstreams[0].base_url");
        assert!(!format!("{issues:?}").contains("sk-live-1"));
        // Other malformed URLs are not echoed either (they may hold a token in the query).
        let issues = issues_of(
            "[[upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"https://h/?key=tok-123\"\n",
            &env,
        );
        assert!(!format!("{issues:?}").contains("tok-123"));
    }

    #[test]
    fn short_admin_tokens_are_refused_and_never_shown() {
        let issues = issues_of("[server]\nadmin_token = \"short-s3cret\"\n", &env);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].path, "server.admin_token");
        assert_eq!(issues[0].line, Some(2));
        assert!(issues[0].message.contains("12 characters"), "{issues:?}");
        assert!(!format!("{issues:?}").contains("short-s3cret"));
        let long = "x".repeat(MIN_ADMIN_TOKEN_LEN);
        assert!(Config::parse(&format!("[server]\nadmin_token = \"{long}\"\n"), "c", &env).is_ok());
        assert!(
            Config::parse("[server]\nadmin_token = \"\"\n", "c", &env).is_ok(),
            "empty disables"
        );
        let spaced = format!("[server]\nadmin_token = \"{long} x\"\n");
        assert_eq!(issues_of(&spaced, &env)[0].path, "server.admin_token");
    }

    #[test]
    fn check_config_masks_every_url_secret() {
        let cfg = r#"
[server]
admin_token = "adm-secret-0123456789"
[storage]
mode = "shared"
redis_url = "redis://:redis-pw@10.0.0.2:6379/0"
postgres_url = "postgres://tollgate:pg-pw@db.internal:5432/ledger?sslmode=disable&password=pg-pw2"
[alerts]
webhook = "https://hook-user:hook-pw@hooks.example/services/T0/B0/hook-token?sig=hook-sig"
"#;
        let c = Config::parse(cfg, "c", &env).unwrap();
        let json = c.redacted_json();
        let text = json.to_string();
        for secret in [
            "adm-secret",
            "redis-pw",
            "pg-pw",
            "hook-pw",
            "hook-token",
            "hook-sig",
            "hook-user",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(json["storage"]["redis_url"], "redis://***@10.0.0.2:6379/0");
        assert_eq!(
            json["storage"]["postgres_url"],
            "postgres://tollgate:***@db.internal:5432/ledger?***"
        );
        assert_eq!(
            json["alerts"]["webhook"],
            "https://***@hooks.example/***?***"
        );
        assert_eq!(
            redact_url("redis+cluster://:a@h1:1,u:b@h2:2,h3:3", true),
            "redis+cluster://***@h1:1,u:***@h2:2,h3:3"
        );
        assert_eq!(redact_url("host=db password=x", true), "***");
        assert_eq!(
            redact_url("https://hooks.example/", false),
            "https://hooks.example"
        );
    }

    #[test]
    fn forward_headers_only_readmit_account_headers() {
        let up = |list: &str| {
            format!(
                "[[upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://[::1]\"\nforward_headers = {list}\n"
            )
        };
        let c = Config::parse(&up(r#"["OpenAI-Project"]"#), "c", &env).unwrap();
        assert_eq!(c.upstreams[0].forward_headers, vec!["openai-project"]);
        let issues = issues_of(
            &up(r#"["Authorization", "x-custom", "openai-organization"]"#),
            &env,
        );
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "upstreams[0].forward_headers[0]",
                "upstreams[0].forward_headers[1]"
            ]
        );
    }

    #[test]
    fn listener_bounds_and_admin_hosts() {
        let c = Config::parse("", "c", &env).unwrap();
        assert_eq!(c.server.header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.body_timeout, Duration::from_secs(60));
        assert_eq!(c.server.send_timeout, Duration::from_secs(30));
        assert_eq!(c.server.max_connections, 4096);
        assert_eq!(c.server.max_connections_per_ip, 1024);
        assert_eq!(c.server.keepalive_timeout, Duration::from_secs(15));
        assert_eq!(c.server.max_request_head, 64 << 10);
        assert_eq!(c.server.max_request_headers, 100);
        assert!(c.server.admin_hosts.is_empty());
        let c = Config::parse(
            "[server]\nadmin_hosts = [\"Admin.Internal\"]\nheader_timeout = \"2s\"\nmax_connections = 10\n",
            "c",
            &env,
        )
        .unwrap();
        assert_eq!(c.server.admin_hosts, vec!["admin.internal"]);
        assert_eq!(c.server.header_timeout, Duration::from_secs(2));
        assert_eq!(c.server.max_connections, 10);
        assert_eq!(
            c.server.max_connections_per_ip, 2,
            "a quarter, rounded down"
        );
        let issues = issues_of(
            "[server]\nmax_connections_per_ip = 0\nkeepalive_timeout = \"500ms\"\nmax_request_head = \"2MiB\"\nmax_request_headers = 1000\n",
            &env,
        );
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.max_connections_per_ip",
                "server.keepalive_timeout",
                "server.max_request_head",
                "server.max_request_headers"
            ]
        );
        let issues = issues_of(
            "[server]\nadmin_hosts = [\"bad host/\"]\nheader_timeout = \"0s\"\nmax_connections = 0\n",
            &env,
        );
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.admin_hosts[0]",
                "server.header_timeout",
                "server.max_connections"
            ]
        );
    }

    #[test]
    fn plan_limits_are_parsed_and_each_bad_one_is_reported_at_its_line() {
        let cfg = r#"
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com"

[plans.free]
limits = [
  "requests:minute=20",
  "usd:fortnight=5",
  42,
  "tokens:day@openai=1000",
  "tokens:day@gemini=1000",
  "requests",
]

[plans."bad\u0001name"]
limits = []
"#;
        let mut issues = issues_of(cfg, &env);
        issues.sort_by_key(|i| i.line);
        let found: Vec<(&str, Option<usize>)> =
            issues.iter().map(|i| (i.path.as_str(), i.line)).collect();
        assert_eq!(
            found,
            [
                ("plans.free.limits[1]", Some(10)),
                ("plans.free.limits[2]", Some(11)),
                ("plans.free.limits[4]", Some(13)),
                ("plans.free.limits[5]", Some(14)),
                ("plans.bad\u{1}name", Some(17)),
            ],
            "{issues:?}"
        );
        assert!(issues[0].message.contains("fortnight"), "{issues:?}");
        assert!(
            issues[2].message.contains("`gemini`") && issues[2].message.contains("openai"),
            "{issues:?}"
        );
        let ok = cfg
            .replace("  \"usd:fortnight=5\",\n  42,\n", "")
            .replace("  \"tokens:day@gemini=1000\",\n  \"requests\",\n", "")
            .replace("[plans.\"bad\\u0001name\"]\nlimits = []\n", "");
        let c = Config::parse(&ok, "c", &env).unwrap_or_else(|e| panic!("{e}"));
        let free: Vec<String> = c.plans["free"].iter().map(ToString::to_string).collect();
        assert_eq!(free, ["requests:minute=20", "tokens:day@openai=1000"]);
        assert_eq!(c.plans["free"][1].upstream.as_deref(), Some("openai"));
    }

    #[test]
    fn store_urls_are_checked_when_read() {
        let cfg = r#"[storage]
mode = "shared"
redis_url = "redis://:rd-s3cret@10.0.0.2:port/0"
postgres_url = "postgres://u:pg-s3cret@db:5432/l?sslmode=sometimes"
"#;
        let issues = issues_of(cfg, &env);
        let found: Vec<(&str, Option<usize>)> =
            issues.iter().map(|i| (i.path.as_str(), i.line)).collect();
        assert_eq!(
            found,
            [
                ("storage.redis_url", Some(3)),
                ("storage.postgres_url", Some(4))
            ]
        );
        let shown = render_issues("c.toml", &issues);
        assert!(!shown.contains("s3cret"), "{shown}");
        let good = cfg
            .replace("10.0.0.2:port", "10.0.0.2:6379")
            .replace("sometimes", "require");
        Config::parse(&good, "c", &env).unwrap_or_else(|e| panic!("{e}"));
        // Left empty (`${REDIS_URL:-}`), a URL is absent, not malformed.
        let c = Config::parse("[storage]\nredis_url = \"${NOPE:-}\"\n", "c", &env).unwrap();
        assert!(c.storage.redis_url.is_none());
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let c = Config::parse("", "c", &env).unwrap();
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9091");
        assert_eq!(c.server.max_request_body, 10 << 20);
        assert_eq!(c.storage.mode, StorageMode::Embedded);
        assert_eq!(c.quota.default_max_output_tokens, 4096);
        assert_eq!(c.alerts.thresholds, vec![80, 90, 100]);
        assert_eq!(c.log.format, LogFormat::Json);
    }
}
