//! Configuration: `config.toml` text → a validated [`Config`].
//!
//! The file is walked by hand (over `toml_edit`, which keeps spans) instead of through
//! `serde` so that *every* problem is reported at once, each with its key path and line:
//! an operator fixing a config should not have to run `check-config` once per typo.
//! Unknown keys are errors. `${VAR}` and `${VAR:-default}` are expanded inside string
//! values after parsing, so a secret full of quotes cannot break the TOML. Secrets are
//! held in [`Secret`], whose `Debug`/`Display` never show the value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Document, Item, Table, Value};

use crate::billing::price::Price;
use crate::passthrough::{self, METERED_PATHS, PassthroughRoute};

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
pub enum OnUnavailable {
    Local,
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// WAL + `synchronous=NORMAL`: survives a process crash (SIGKILL); a power loss can
    /// lose the last commits.
    Normal,
    /// WAL + `synchronous=FULL`: every journal commit is fsynced.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownModel {
    Reject,
    Free,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    Openai,
    Anthropic,
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
    /// Plan name → limit specs (validated by the quota layer when it loads them).
    pub plans: BTreeMap<String, Vec<String>>,
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
    pub webhook: Option<Secret>,
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
    /// `text` (an error from a store, say) with every secret of this config masked: the
    /// store URLs by their [`redact_url`] form, their passwords, the webhook URL, the
    /// upstream keys and the admin token. For the log; answers never carry such text.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        let urls = [
            (self.storage.redis_url.as_ref(), true),
            (self.storage.postgres_url.as_ref(), true),
            (self.alerts.webhook.as_ref(), false),
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
        let doc = match Document::parse(text) {
            Ok(d) => d,
            Err(e) => {
                let line = e.span().map(|s| line_of(text, s.start));
                return Err(ConfigError::Invalid {
                    file: file.to_string(),
                    issues: vec![ConfigIssue {
                        path: "(syntax)".into(),
                        line,
                        message: e.message().trim().to_string(),
                    }],
                });
            }
        };
        let mut r = Reader {
            text,
            env,
            issues: Vec::new(),
        };
        let cfg = r.config(doc.as_table());
        if r.issues.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                file: file.to_string(),
                issues: r.issues,
            })
        }
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
                "webhook": self.alerts.webhook.as_ref().map(|u| redact_url(u.expose(), false)),
            },
            "log": { "level": self.log.level, "format": self.log.format },
        })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset.min(text.len()))
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Parse a size such as `10MiB`, `512KB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like \"10MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parse a duration such as `500ms`, `20s`, `10m`, `5h`.
/// Whether `tz` has been a whole number of hours from UTC on every day of 2000–2040 (the
/// days a ledger can hold rows of), so its calendar windows start on whole UTC hours.
pub fn whole_hour_offsets(tz: chrono_tz::Tz) -> bool {
    use chrono::{Offset, TimeZone};
    let start = chrono::DateTime::from_timestamp(946_684_800, 0).unwrap_or_default();
    (0..41 * 366).all(|day| {
        let t = start + chrono::Duration::days(day);
        tz.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
            % 3_600
            == 0
    })
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like \"20s\" or \"500ms\": {e}"))
}

/// Expand `${VAR}` and `${VAR:-default}`.
fn expand_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated `${` in value".into());
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{inner}}}` is not a valid variable reference"));
        }
        match (env(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (write ${{{name}:-}} to allow empty)"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

struct Reader<'a> {
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    issues: Vec<ConfigIssue>,
}

fn item_span(item: &Item) -> Option<std::ops::Range<usize>> {
    match item {
        Item::Value(v) => v.span(),
        Item::Table(t) => t.span(),
        Item::ArrayOfTables(a) => a.span(),
        Item::None => None,
    }
}

impl Reader<'_> {
    fn issue(&mut self, path: &str, span: Option<std::ops::Range<usize>>, msg: impl Into<String>) {
        let line = span.map(|s| line_of(self.text, s.start));
        self.issues.push(ConfigIssue {
            path: path.to_string(),
            line,
            message: msg.into(),
        });
    }

    /// Report keys of `table` not in `known`.
    fn unknown_keys(&mut self, table: &Table, prefix: &str, known: &[&str]) {
        for (k, item) in table.iter() {
            if !known.contains(&k) {
                let path = join(prefix, k);
                let span = table.key(k).and_then(|key| key.span()).or(item_span(item));
                self.issue(
                    &path,
                    span,
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
        }
    }

    fn table<'t>(&mut self, root: &'t Table, key: &str) -> Option<&'t Table> {
        match root.get(key) {
            None => None,
            Some(Item::Table(t)) => Some(t),
            Some(other) => {
                self.issue(key, item_span(other), "expected a table");
                None
            }
        }
    }

    fn string(
        &mut self,
        t: &Table,
        prefix: &str,
        key: &str,
    ) -> Option<(String, Option<std::ops::Range<usize>>)> {
        let item = t.get(key)?;
        let path = join(prefix, key);
        match item.as_value() {
            Some(Value::String(s)) => match expand_env(s.value(), self.env) {
                Ok(v) => Some((v, s.span())),
                Err(e) => {
                    self.issue(&path, s.span(), e);
                    None
                }
            },
            _ => {
                self.issue(&path, item_span(item), "expected a string");
                None
            }
        }
    }

    /// A string converted by `f`; on error the issue is recorded and `default` returned.
    fn parsed<T>(
        &mut self,
        t: &Table,
        prefix: &str,
        key: &str,
        default: T,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        match self.string(t, prefix, key) {
            None => default,
            Some((s, span)) => match f(&s) {
                Ok(v) => v,
                Err(e) => {
                    self.issue(&join(prefix, key), span, e);
                    default
                }
            },
        }
    }

    fn integer(
        &mut self,
        t: &Table,
        prefix: &str,
        key: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        let Some(item) = t.get(key) else {
            return default;
        };
        match item.as_value() {
            Some(Value::Integer(i)) => {
                let v = *i.value();
                if v < min || v > max {
                    self.issue(
                        &join(prefix, key),
                        i.span(),
                        format!("must be between {min} and {max}, got {v}"),
                    );
                    default
                } else {
                    v
                }
            }
            _ => {
                self.issue(&join(prefix, key), item_span(item), "expected an integer");
                default
            }
        }
    }

    fn boolean(&mut self, t: &Table, prefix: &str, key: &str, default: bool) -> bool {
        let Some(item) = t.get(key) else {
            return default;
        };
        match item.as_value() {
            Some(Value::Boolean(b)) => *b.value(),
            _ => {
                self.issue(
                    &join(prefix, key),
                    item_span(item),
                    "expected true or false",
                );
                default
            }
        }
    }

    fn enum_value<T: Copy>(
        &mut self,
        t: &Table,
        prefix: &str,
        key: &str,
        default: T,
        options: &[(&str, T)],
    ) -> T {
        self.parsed(t, prefix, key, default, |s| {
            options
                .iter()
                .find(|(n, _)| *n == s)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                    format!("`{s}` is not one of: {}", names.join(", "))
                })
        })
    }

    fn string_array(&mut self, t: &Table, prefix: &str, key: &str) -> Option<Vec<String>> {
        let item = t.get(key)?;
        let path = join(prefix, key);
        let Some(Value::Array(arr)) = item.as_value() else {
            self.issue(&path, item_span(item), "expected an array of strings");
            return None;
        };
        let mut out = Vec::new();
        for (i, v) in arr.iter().enumerate() {
            match v {
                Value::String(s) => match expand_env(s.value(), self.env) {
                    Ok(x) => out.push(x),
                    Err(e) => self.issue(&format!("{path}[{i}]"), s.span(), e),
                },
                other => self.issue(&format!("{path}[{i}]"), other.span(), "expected a string"),
            }
        }
        Some(out)
    }

    fn config(&mut self, root: &Table) -> Config {
        self.unknown_keys(root, "", ROOT_KEYS);
        let empty = Table::new();
        let server_t = self.table(root, "server").unwrap_or(&empty);
        let server = self.server(server_t);
        let storage_t = self.table(root, "storage").unwrap_or(&empty);
        let storage = self.storage(storage_t);
        let quota_t = self.table(root, "quota").unwrap_or(&empty);
        let quota = self.quota(quota_t);
        let upstreams = self.upstreams(root);
        let plans = self.plans(root);
        let prices = self.prices(root);
        let alerts_t = self.table(root, "alerts").unwrap_or(&empty);
        let alerts = self.alerts(alerts_t);
        let log_t = self.table(root, "log").unwrap_or(&empty);
        let log = self.log(log_t);
        let cfg = Config {
            server,
            storage,
            quota,
            upstreams,
            plans,
            prices,
            alerts,
            log,
        };
        self.cross_checks(&cfg, root);
        cfg
    }

    fn server(&mut self, t: &Table) -> ServerConfig {
        let p = "server";
        self.unknown_keys(t, p, SERVER_KEYS);
        let addr = |s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|_| format!("`{s}` is not an address like \"127.0.0.1:8080\""))
        };
        let listen = self.parsed(
            t,
            p,
            "listen",
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            addr,
        );
        let admin_listen = self.parsed(
            t,
            p,
            "admin_listen",
            SocketAddr::from(([127, 0, 0, 1], 9091)),
            addr,
        );
        let admin_token = match self.string(t, p, "admin_token") {
            Some((s, span)) => {
                let chars = s.chars().count();
                if chars > 0 && chars < MIN_ADMIN_TOKEN_LEN {
                    // The message gives the length, never the token.
                    self.issue(
                        "server.admin_token",
                        span.clone(),
                        format!(
                            "is {chars} characters long; use at least {MIN_ADMIN_TOKEN_LEN} \
                             (e.g. `openssl rand -hex 32`), or leave it empty to close the admin API"
                        ),
                    );
                }
                if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    self.issue(
                        "server.admin_token",
                        span,
                        "must not contain whitespace or control characters",
                    );
                }
                Secret(s)
            }
            None => Secret::default(),
        };
        let max_request_body = self.parsed(t, p, "max_request_body", 10 << 20, |s| {
            let v = parse_size(s)?;
            if v == 0 {
                Err("must be greater than 0".into())
            } else {
                Ok(v)
            }
        });
        let threads = self.integer(t, p, "threads", 2, 1, 1024) as usize;
        let configured_id = self
            .string(t, p, "instance_id")
            .map(|(s, _)| s)
            .filter(|s| !s.is_empty());
        let instance_id_configured = configured_id.is_some();
        let instance_id =
            configured_id.unwrap_or_else(|| format!("{}-{}", hostname(), listen.port()));
        let grace_period = self.parsed(
            t,
            p,
            "grace_period",
            Duration::from_secs(30),
            parse_duration,
        );
        let admin_hosts = self
            .string_array(t, p, "admin_hosts")
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(i, h)| match normalize_host(&h) {
                Some(h) => Some(h),
                None => {
                    let span = t.get("admin_hosts").and_then(item_span);
                    self.issue(
                        &format!("server.admin_hosts[{i}]"),
                        span,
                        format!("`{h}` is not a host name like \"tollgate-admin.internal\""),
                    );
                    None
                }
            })
            .collect();
        let positive = |s: &str| match parse_duration(s)? {
            d if d.is_zero() => Err("must be greater than 0".to_string()),
            d => Ok(d),
        };
        let header_timeout = self.parsed(t, p, "header_timeout", Duration::from_secs(10), positive);
        let body_timeout = self.parsed(t, p, "body_timeout", Duration::from_secs(60), positive);
        let send_timeout = self.parsed(t, p, "send_timeout", Duration::from_secs(30), positive);
        let max_connections = self.integer(t, p, "max_connections", 4096, 1, 1_000_000) as usize;
        // By default no one address may hold more than a quarter of the slots.
        let max_connections_per_ip = self.integer(
            t,
            p,
            "max_connections_per_ip",
            (max_connections / 4).max(1) as i64,
            1,
            1_000_000,
        ) as usize;
        let keepalive_timeout =
            self.parsed(t, p, "keepalive_timeout", Duration::from_secs(15), |s| {
                match parse_duration(s)? {
                    d if d < Duration::from_secs(1) => Err("must be at least 1s".to_string()),
                    d => Ok(d),
                }
            });
        let max_request_head =
            self.parsed(t, p, "max_request_head", 64 << 10, |s| {
                match parse_size(s)? {
                    v if v < 1024 => Err("must be at least 1KiB".to_string()),
                    v if v > 1 << 20 => Err("must be at most 1MiB".to_string()),
                    v => Ok(v),
                }
            });
        let max_request_headers = self.integer(t, p, "max_request_headers", 100, 8, 256) as usize;
        let max_buffered_bodies =
            self.parsed(
                t,
                p,
                "max_buffered_bodies",
                256 << 20,
                |s| match parse_size(s)? {
                    0 => Err("must be greater than 0".to_string()),
                    v => Ok(v),
                },
            );
        if max_buffered_bodies < max_request_body {
            let span = t.get("max_buffered_bodies").and_then(item_span);
            self.issue(
                "server.max_buffered_bodies",
                span,
                format!(
                    "must be at least server.max_request_body ({max_request_body} bytes), or no body of the largest size could ever be read"
                ),
            );
        }
        let max_parsing_bytes = self.parsed(
            t,
            p,
            "max_parsing_bytes",
            (16 << 20).max(max_request_body),
            |s| match parse_size(s)? {
                0 => Err("must be greater than 0".to_string()),
                v => Ok(v),
            },
        );
        if max_parsing_bytes < max_request_body {
            let span = t.get("max_parsing_bytes").and_then(item_span);
            self.issue(
                "server.max_parsing_bytes",
                span,
                format!(
                    "must be at least server.max_request_body ({max_request_body} bytes), or no body of the largest size could ever be parsed"
                ),
            );
        }
        ServerConfig {
            listen,
            admin_listen,
            admin_token,
            max_request_body,
            threads,
            instance_id,
            instance_id_configured,
            grace_period,
            admin_hosts,
            header_timeout,
            body_timeout,
            send_timeout,
            max_connections,
            max_connections_per_ip,
            keepalive_timeout,
            max_request_head,
            max_request_headers,
            max_buffered_bodies,
            max_parsing_bytes,
        }
    }

    fn storage(&mut self, t: &Table) -> StorageConfig {
        let p = "storage";
        self.unknown_keys(t, p, STORAGE_KEYS);
        let mode = self.enum_value(
            t,
            p,
            "mode",
            StorageMode::Embedded,
            &[
                ("embedded", StorageMode::Embedded),
                ("shared", StorageMode::Shared),
            ],
        );
        let journal_path = self
            .string(t, p, "journal_path")
            .map(|(s, _)| PathBuf::from(s))
            .unwrap_or_else(|| PathBuf::from("./tollgate.db"));
        let redis_url = self
            .string(t, p, "redis_url")
            .map(|(s, _)| Secret(s))
            .filter(|s| !s.is_empty());
        let postgres_url = self
            .string(t, p, "postgres_url")
            .map(|(s, _)| Secret(s))
            .filter(|s| !s.is_empty());
        let on_unavailable = self.enum_value(
            t,
            p,
            "on_unavailable",
            OnUnavailable::Local,
            &[
                ("local", OnUnavailable::Local),
                ("open", OnUnavailable::Open),
                ("closed", OnUnavailable::Closed),
            ],
        );
        let durability = self.enum_value(
            t,
            p,
            "durability",
            Durability::Normal,
            &[("normal", Durability::Normal), ("full", Durability::Full)],
        );
        let journal_retention = self.parsed(
            t,
            p,
            "journal_retention",
            Duration::from_secs(24 * 3600),
            parse_duration,
        );
        let retention = self.parsed(t, p, "retention", None, |s| {
            let d = parse_duration(s)?;
            if d < MIN_RETENTION {
                return Err(format!(
                    "`{s}` is shorter than {}; use a window such as \"90d\" (or leave it out to keep every row)",
                    humantime::format_duration(MIN_RETENTION)
                ));
            }
            Ok(Some(d))
        });
        StorageConfig {
            mode,
            journal_path,
            redis_url,
            postgres_url,
            on_unavailable,
            durability,
            journal_retention,
            retention,
        }
    }

    fn quota(&mut self, t: &Table) -> QuotaConfig {
        let p = "quota";
        self.unknown_keys(t, p, QUOTA_KEYS);
        let timezone = self.parsed(t, p, "timezone", chrono_tz::UTC, |s| {
            s.parse::<chrono_tz::Tz>()
                .map_err(|_| format!("`{s}` is not an IANA time zone like \"Europe/Berlin\""))
        });
        let reservation_ttl = self.parsed(
            t,
            p,
            "reservation_ttl",
            Duration::from_secs(600),
            parse_duration,
        );
        let default_max_output_tokens =
            self.integer(t, p, "default_max_output_tokens", 4096, 1, 10_000_000) as u64;
        let unseen_input_tokens =
            self.integer(t, p, "unseen_input_tokens", 200_000, 0, 10_000_000) as u64;
        let unknown_model = self.enum_value(
            t,
            p,
            "unknown_model",
            UnknownModel::Reject,
            &[
                ("reject", UnknownModel::Reject),
                ("free", UnknownModel::Free),
            ],
        );
        let passthrough_rate = self.integer(t, p, "passthrough_rate", 10, 1, 100_000) as u32;
        let passthrough_burst = self.integer(t, p, "passthrough_burst", 20, 1, 1_000_000) as u32;
        QuotaConfig {
            timezone,
            reservation_ttl,
            default_max_output_tokens,
            unseen_input_tokens,
            unknown_model,
            passthrough_rate,
            passthrough_burst,
        }
    }

    fn upstreams(&mut self, root: &Table) -> Vec<UpstreamConfig> {
        let Some(item) = root.get("upstreams") else {
            return Vec::new();
        };
        let Some(arr) = item.as_array_of_tables() else {
            self.issue(
                "upstreams",
                item_span(item),
                "expected [[upstreams]] tables",
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, t) in arr.iter().enumerate() {
            let p = format!("upstreams[{i}]");
            self.unknown_keys(t, &p, UPSTREAM_KEYS);
            let name = match self.string(t, &p, "name") {
                Some((s, _)) if !s.is_empty() => s,
                Some((_, span)) => {
                    self.issue(&join(&p, "name"), span, "must not be empty");
                    String::new()
                }
                None => {
                    if t.get("name").is_none() {
                        self.issue(&join(&p, "name"), t.span(), "is required");
                    }
                    String::new()
                }
            };
            let kind = match t.get("kind") {
                None => {
                    self.issue(
                        &join(&p, "kind"),
                        t.span(),
                        "is required (openai or anthropic)",
                    );
                    UpstreamKind::Openai
                }
                Some(_) => self.enum_value(
                    t,
                    &p,
                    "kind",
                    UpstreamKind::Openai,
                    &[
                        ("openai", UpstreamKind::Openai),
                        ("anthropic", UpstreamKind::Anthropic),
                    ],
                ),
            };
            let default_routes: Vec<String> = match kind {
                UpstreamKind::Openai => [
                    "/v1/chat/completions",
                    "/v1/responses",
                    "/v1/completions",
                    "/v1/embeddings",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
                UpstreamKind::Anthropic => vec!["/v1/messages".to_string()],
            };
            let (base_url, tls, host, port, base_path) = match self.string(t, &p, "base_url") {
                None => {
                    if t.get("base_url").is_none() {
                        self.issue(&join(&p, "base_url"), t.span(), "is required");
                    }
                    (String::new(), false, String::new(), 0, String::new())
                }
                Some((s, span)) => match parse_base_url(&s) {
                    Ok((tls, host, port, path)) => (s, tls, host, port, path),
                    Err(e) => {
                        self.issue(&join(&p, "base_url"), span, e);
                        (s, false, String::new(), 0, String::new())
                    }
                },
            };
            let allow_insecure_http = self.boolean(t, &p, "allow_insecure_http", false);
            if !tls && !host.is_empty() && !is_loopback_host(&host) && !allow_insecure_http {
                // Plain HTTP would carry the provider key (and every prompt) in clear
                // across the network.
                let span = t.get("base_url").and_then(item_span);
                self.issue(
                    &join(&p, "base_url"),
                    span,
                    "is http:// to a host that is not loopback: the provider key would travel in clear; use https://, or set allow_insecure_http = true for a network you trust",
                );
            }
            let api_key = match self.string(t, &p, "api_key") {
                Some((s, span)) => {
                    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
                        // Said without the key: it is a secret even when malformed.
                        self.issue(
                            &join(&p, "api_key"),
                            span,
                            "must not contain whitespace or control characters (it is sent as a header)",
                        );
                    }
                    Secret(s)
                }
                None => Secret::default(),
            };
            let routes = self.string_array(t, &p, "routes").unwrap_or(default_routes);
            for (ri, r) in routes.iter().enumerate() {
                if !r.starts_with('/') {
                    let span = t.get("routes").and_then(item_span);
                    self.issue(
                        &format!("{p}.routes[{ri}]"),
                        span,
                        format!("route `{r}` must start with /"),
                    );
                }
            }
            let passthrough = self.passthrough(t, &p, kind);
            let connect_timeout = self.parsed(
                t,
                &p,
                "connect_timeout",
                Duration::from_secs(5),
                parse_duration,
            );
            let first_byte_timeout = self.parsed(
                t,
                &p,
                "first_byte_timeout",
                Duration::from_secs(120),
                parse_duration,
            );
            let idle_timeout = self.parsed(
                t,
                &p,
                "idle_timeout",
                Duration::from_secs(60),
                parse_duration,
            );
            let mut forward_headers = Vec::new();
            for (hi, h) in self
                .string_array(t, &p, "forward_headers")
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                let name = h.trim().to_ascii_lowercase();
                let span = t.get("forward_headers").and_then(item_span);
                let path = format!("{p}.forward_headers[{hi}]");
                if CREDENTIAL_HEADERS.contains(&name.as_str()) {
                    self.issue(
                        &path,
                        span,
                        format!("`{h}` carries a credential and is never forwarded"),
                    );
                } else if !ACCOUNT_HEADERS.contains(&name.as_str()) {
                    self.issue(
                        &path,
                        span,
                        format!(
                            "`{h}` is forwarded anyway; this list only re-admits the account headers tollgate drops ({})",
                            ACCOUNT_HEADERS.join(", ")
                        ),
                    );
                } else {
                    forward_headers.push(name);
                }
            }
            out.push(UpstreamConfig {
                name,
                kind,
                base_url,
                tls,
                host,
                port,
                base_path,
                api_key,
                routes,
                passthrough,
                connect_timeout,
                first_byte_timeout,
                idle_timeout,
                forward_headers,
                allow_insecure_http,
            });
        }
        out
    }

    /// An upstream's `passthrough` list (default: its kind's, SPEC §6). A route that could
    /// take a metered path is refused: it would forward billable requests unbilled.
    fn passthrough(&mut self, t: &Table, p: &str, kind: UpstreamKind) -> Vec<PassthroughRoute> {
        let texts = self.string_array(t, p, "passthrough").unwrap_or_else(|| {
            passthrough::defaults(kind)
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        let span = t.get("passthrough").and_then(item_span);
        let mut out: Vec<PassthroughRoute> = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let path = format!("{p}.passthrough[{i}]");
            match PassthroughRoute::parse(text) {
                Ok(r) => {
                    if let Some(m) = METERED_PATHS.iter().find(|m| r.matches_path(m)) {
                        self.issue(
                            &path,
                            span.clone(),
                            format!("`{text}` would take the metered route {m}; a passthrough is never billed"),
                        );
                    } else if !out.contains(&r) {
                        out.push(r);
                    }
                }
                Err(e) => self.issue(&path, span.clone(), e),
            }
        }
        out
    }

    fn plans(&mut self, root: &Table) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        let Some(t) = self.table(root, "plans") else {
            return out;
        };
        for (name, item) in t.iter() {
            let p = format!("plans.{name}");
            let Some(pt) = item.as_table() else {
                self.issue(&p, item_span(item), "expected a table with `limits`");
                continue;
            };
            self.unknown_keys(pt, &p, PLAN_KEYS);
            let limits = self.string_array(pt, &p, "limits").unwrap_or_default();
            out.insert(name.to_string(), limits);
        }
        out
    }

    /// Each `[prices."MODEL"]` entry read into its resolved price (see
    /// [`crate::billing::price::read_entry`]), every problem reported with its key path.
    fn prices(&mut self, root: &Table) -> BTreeMap<String, Price> {
        let mut out = BTreeMap::new();
        let Some(t) = self.table(root, "prices") else {
            return out;
        };
        for (model, item) in t.iter() {
            let p = format!("prices.\"{model}\"");
            if model.is_empty() {
                self.issue(
                    &p,
                    item_span(item),
                    "a model id or pattern must not be empty",
                );
                continue;
            }
            match crate::billing::price::read_entry(item) {
                Ok(price) => {
                    out.insert(model.to_string(), price);
                }
                Err(issues) => {
                    for i in issues {
                        let path = if i.key.is_empty() {
                            p.clone()
                        } else {
                            join(&p, &i.key)
                        };
                        self.issue(&path, i.span.or_else(|| item_span(item)), i.message);
                    }
                }
            }
        }
        out
    }

    fn alerts(&mut self, t: &Table) -> AlertsConfig {
        let p = "alerts";
        self.unknown_keys(t, p, ALERTS_KEYS);
        let mut thresholds = vec![80, 90, 100];
        if let Some(item) = t.get("thresholds") {
            match item.as_value() {
                Some(Value::Array(arr)) => {
                    let mut v = Vec::new();
                    for (i, x) in arr.iter().enumerate() {
                        match x.as_integer() {
                            Some(n) if (1..=100).contains(&n) => v.push(n as u8),
                            _ => self.issue(
                                &format!("alerts.thresholds[{i}]"),
                                x.span(),
                                "expected a percentage from 1 to 100",
                            ),
                        }
                    }
                    v.sort_unstable();
                    v.dedup();
                    thresholds = v;
                }
                _ => self.issue(
                    "alerts.thresholds",
                    item_span(item),
                    "expected an array of percentages",
                ),
            }
        }
        let webhook = match self.string(t, p, "webhook") {
            Some((s, span)) if !s.is_empty() => {
                if let Err(e) = crate::alerts::webhook::WebhookTarget::parse(&s) {
                    self.issue("alerts.webhook", span, e);
                }
                Some(Secret(s))
            }
            _ => None,
        };
        AlertsConfig {
            thresholds,
            webhook,
        }
    }

    fn log(&mut self, t: &Table) -> LogConfig {
        let p = "log";
        self.unknown_keys(t, p, LOG_KEYS);
        let level = self.parsed(t, p, "level", "info".to_string(), |s| {
            tracing_subscriber::EnvFilter::try_new(s)
                .map(|_| s.to_string())
                .map_err(|e| {
                    format!("`{s}` is not a log filter like \"info\" or \"tollgate=debug\": {e}")
                })
        });
        let format = self.enum_value(
            t,
            p,
            "format",
            LogFormat::Json,
            &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)],
        );
        LogConfig { level, format }
    }

    fn cross_checks(&mut self, cfg: &Config, root: &Table) {
        let span_of = |path: &[&str]| -> Option<std::ops::Range<usize>> {
            let mut t = root;
            for (i, k) in path.iter().enumerate() {
                let item = t.get(k)?;
                if i + 1 == path.len() {
                    return item_span(item);
                }
                t = item.as_table()?;
            }
            None
        };
        if cfg.storage.retention.is_some() && !whole_hour_offsets(cfg.quota.timezone) {
            // Limits' calendar windows start at local midnight; once their first rows are
            // deleted they are counted from UTC-hour rollups, which cannot cut a window
            // starting at :30 or :45.
            self.issue(
                "storage.retention",
                span_of(&["storage", "retention"]),
                format!(
                    "needs a [quota].timezone whose UTC offset is a whole number of hours; {} is not",
                    cfg.quota.timezone.name()
                ),
            );
        }
        if cfg.storage.mode == StorageMode::Shared {
            if cfg.storage.redis_url.is_none() {
                self.issue(
                    "storage.redis_url",
                    span_of(&["storage", "mode"]),
                    "is required when mode = \"shared\"",
                );
            }
            if cfg.storage.postgres_url.is_none() {
                self.issue(
                    "storage.postgres_url",
                    span_of(&["storage", "mode"]),
                    "is required when mode = \"shared\"",
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut routes: BTreeMap<&str, &str> = BTreeMap::new();
        let arr = root.get("upstreams").and_then(|i| i.as_array_of_tables());
        for (i, u) in cfg.upstreams.iter().enumerate() {
            let span = arr.and_then(|a| a.get(i)).and_then(|t| t.span());
            if !u.name.is_empty() && !names.insert(u.name.as_str()) {
                self.issue(
                    &format!("upstreams[{i}].name"),
                    span.clone(),
                    format!("duplicate upstream name `{}`", u.name),
                );
            }
            for r in &u.routes {
                if let Some(other) = routes.insert(r.as_str(), u.name.as_str()) {
                    self.issue(
                        &format!("upstreams[{i}].routes"),
                        span.clone(),
                        format!("route `{r}` is already served by upstream `{other}`"),
                    );
                }
            }
        }
        for (i, u) in cfg.upstreams.iter().enumerate() {
            for (pi, pt) in u.passthrough.iter().enumerate() {
                if let Some(r) = routes.keys().find(|r| pt.matches_path(r)) {
                    let span = arr
                        .and_then(|a| a.get(i))
                        .and_then(|t| t.get("passthrough"))
                        .and_then(item_span);
                    self.issue(
                        &format!("upstreams[{i}].passthrough[{pi}]"),
                        span,
                        format!("`{pt}` would take the route {r}, which is metered"),
                    );
                }
            }
        }
        if cfg.server.listen == cfg.server.admin_listen {
            self.issue(
                "server.admin_listen",
                span_of(&["server", "admin_listen"]),
                "must differ from server.listen",
            );
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Whether an upstream host (as parsed from `base_url`, IPv6 without brackets) is this
/// machine: `localhost` (and names under it) or a loopback address. Plain HTTP is allowed
/// there without `allow_insecure_http`.
fn is_loopback_host(host: &str) -> bool {
    let h = host.to_ascii_lowercase();
    h == "localhost"
        || h.ends_with(".localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `https://host[:port][/path]` → (tls, host, port, path without trailing slash).
///
/// Errors never repeat the value: a URL may carry a secret (`user:password@`, a token in
/// the query), and `check-config` output ends up in terminals and CI logs.
fn parse_base_url(s: &str) -> Result<(bool, String, u16, String), String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|_| "is not a URL like \"https://api.openai.com\"".to_string())?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("must start with http:// or https://".into()),
    };
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        // Credentials in the URL would be silently dropped from upstream requests (and
        // printed wherever the URL is): the provider key belongs in `api_key`.
        return Err(
            "must not carry credentials (`user:password@`); put the provider key in `api_key`"
                .into(),
        );
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| "has no host".to_string())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if uri.query().is_some() {
        return Err("must not have a query string".into());
    }
    let path = uri.path().trim_end_matches('/').to_string();
    Ok((tls, host, port, path))
}

/// A host name for `server.admin_hosts`, lower-cased, without port; `None` when it is not
/// one (so a typo is an error, not a silently dead entry).
fn normalize_host(s: &str) -> Option<String> {
    let h = s.trim().to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']'));
    ok.then_some(h)
}

/// A connection URL (`redis://`, `postgres://`, a webhook) as it may be shown: passwords
/// and query strings masked; with `keep_path = false` (webhooks, whose token may be the
/// path or the basic-auth user) the path and user name too. A value that is not
/// `scheme://…` is masked whole.
///
/// The credentials end at the *last* `@` of the URL, not at the first `/`, `?` or `#`: a
/// password is often pasted unescaped, and `p/w?x#y` must not leak because it looks like
/// the start of a path. A path or query that contains an `@` is then masked with the
/// credentials — showing too little is the safe side. `redis+cluster://` lists several
/// hosts, each with its own credentials (a password containing `,` is not supported
/// there, by Redis's URL format either).
pub fn redact_url(url: &str, keep_path: bool) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.is_empty() {
            String::new()
        } else {
            "***".into()
        };
    };
    let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid_scheme {
        return "***".into();
    }
    // Everything up to the last `@` is credentials (and whatever they swallowed).
    let (credentials, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (hosts, tail) = match after.find(['/', '?', '#']) {
        Some(i) => after.split_at(i),
        None => (after, ""),
    };
    let user_of = |userinfo: &str| -> String {
        match userinfo.split_once(':') {
            Some((user, _)) if keep_path && !user.is_empty() => format!("{user}:***@"),
            _ => "***@".to_string(),
        }
    };
    let authority = match credentials {
        None => hosts.to_string(),
        Some(creds) if scheme.ends_with("+cluster") && !creds.contains(['/', '?', '#']) => {
            // `:a@h1:1,u:b@h2:2,h3:3`: credentials and hosts alternate; the last host's
            // credentials are `creds`' last part.
            let mut parts: Vec<String> = Vec::new();
            let mut pieces = creds.split(',').peekable();
            while let Some(piece) = pieces.next() {
                if pieces.peek().is_none() {
                    parts.push(format!("{}{hosts}", user_of(piece)));
                } else {
                    match piece.rsplit_once('@') {
                        Some((userinfo, host)) => {
                            parts.push(format!("{}{host}", user_of(userinfo)))
                        }
                        None if looks_like_host(piece) => parts.push(piece.to_string()),
                        None => parts.push("***".to_string()),
                    }
                }
            }
            parts.join(",")
        }
        Some(creds) if creds.contains(['/', '?', '#']) => format!("***@{hosts}"),
        Some(creds) => format!("{}{hosts}", user_of(creds)),
    };
    let mut out = format!("{scheme}://{authority}");
    let (path, query) = match tail.split_once('?') {
        Some((p, _)) => (p, true),
        None => (tail.split('#').next().unwrap_or(""), false),
    };
    if keep_path {
        out.push_str(path);
    } else if !path.is_empty() && path != "/" {
        out.push_str("/***");
    }
    if query {
        out.push_str("?***");
    }
    out
}

/// The password of a `scheme://user:password@host…` URL (everything between the first
/// `:` of the userinfo and its last `@`), if it has one of at least 4 characters (a
/// shorter one would mask unrelated text).
fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let userinfo = &rest[..rest.rfind('@')?];
    let pw = userinfo.split_once(':')?.1;
    (pw.len() >= 4).then_some(pw)
}

/// `name[:port]` or `[v6][:port]`: what a host in a connection URL looks like.
fn looks_like_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => (h, Some(p)),
        _ => (s, None),
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    host_ok && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// This machine's host name (for generated instance ids).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "tollgate".to_string())
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
        assert_eq!(c.plans["free"], vec!["requests:minute=20", "usd:month=5"]);
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

    #[test]
    fn sizes_durations_env() {
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1PiB").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5h").unwrap(), Duration::from_secs(5 * 3600));
        assert_eq!(
            expand_env("a${ADMIN}b", &env).unwrap(),
            "aadm-secret-0123456789b"
        );
        assert_eq!(expand_env("${NOPE:-dflt}", &env).unwrap(), "dflt");
        assert!(expand_env("${NOPE}", &env).is_err());
        assert!(expand_env("${bad name}", &env).is_err());
    }

    fn issues_of(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<ConfigIssue> {
        match Config::parse(text, "c.toml", env) {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("expected issues, got {other:?}"),
        }
    }

    #[test]
    fn passwords_with_url_syntax_are_masked_whole() {
        for (url, keep, shown) in [
            ("redis://:p/ss@h:6379/0", true, "redis://***@h:6379/0"),
            (
                "postgres://u:a?b#c@db:5432/l",
                true,
                "postgres://***@db:5432/l",
            ),
            (
                "postgres://u:a#b@db/l?sslmode=require",
                true,
                "postgres://***@db/l?***",
            ),
            ("postgres://u:p@ss@db/l", true, "postgres://u:***@db/l"),
            (
                "https://tok/en@hooks.example/x",
                false,
                "https://***@hooks.example/***",
            ),
            (
                "redis+cluster://u:p,w@h1:1",
                true,
                "redis+cluster://***,***@h1:1",
            ),
            (
                "redis+cluster://:a@h1:1,h2:2",
                true,
                "redis+cluster://***@h1:1,h2:2",
            ),
            ("post gres://u:p@h", true, "***"),
        ] {
            assert_eq!(redact_url(url, keep), shown, "{url}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Whatever a password holds (`/`, `?`, `#`, `@`, `:`, any text), the shown URL
        /// never contains it.
        #[test]
        fn a_redacted_url_never_shows_its_password(
            password in "[^,]{1,24}",
            user in "[a-z]{0,6}",
            scheme in proptest::sample::select(vec!["redis", "rediss", "postgres", "postgresql", "https", "http", "redis+cluster"]),
            host in proptest::sample::select(vec!["db.internal:5432", "10.0.0.2", "[::1]:6379", "h1:1,h2:2"]),
            tail in "(/[a-z0-9@]{0,8}){0,2}(\\?[a-z=&@]{0,10})?(#[a-z]{0,4})?",
            keep_path in proptest::bool::ANY,
        ) {
            let url = format!("{scheme}://{user}:{password}@{host}{tail}");
            // A password that is also some other part of the URL proves nothing.
            let rest = format!("{scheme}://{user}:***@{host}{tail}/***?***");
            proptest::prop_assume!(!rest.contains(&password));
            let shown = redact_url(&url, keep_path);
            proptest::prop_assert!(!shown.contains(&password), "{} -> {}", url, shown);
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
