//! The config walker: a `toml_edit` document → [`Config`], every problem recorded as a
//! [`ConfigIssue`] with its key path and line instead of stopping at the first.
//!
//! Values are parsed here into the types the rest of tollgate uses (socket addresses,
//! durations, limit specs, price entries, passthrough routes, the webhook target), and
//! every check that needs more than one value (shared mode's URLs, route ownership, scoped
//! limits naming a configured upstream) runs here too: what this accepts, `serve` can use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml_edit::{Document, Item, Table, Value};

use super::units::{
    WebhookTarget, check_postgres_url, check_redis_url, expand_env, hostname, is_loopback_host,
    normalize_host, parse_base_url, parse_duration, parse_size, whole_hour_offsets,
};
use super::{
    ACCOUNT_HEADERS, ALERTS_KEYS, AlertsConfig, CREDENTIAL_HEADERS, Config, ConfigIssue,
    Durability, LOG_KEYS, LogConfig, LogFormat, MIN_ADMIN_TOKEN_LEN, MIN_RETENTION, OnUnavailable,
    PLAN_KEYS, QUOTA_KEYS, QuotaConfig, ROOT_KEYS, SERVER_KEYS, STORAGE_KEYS, Secret, ServerConfig,
    StorageConfig, StorageMode, UPSTREAM_KEYS, UnknownModel, UpstreamConfig, UpstreamKind,
};
use crate::billing::price::Price;
use crate::passthrough::{self, METERED_PATHS, PassthroughRoute};
use crate::quota::LimitSpec;

/// One string of an array: its index, its value (`${VAR}` expanded) and its span.
type Element = (usize, String, Option<Range<usize>>);

/// Read config text into a [`Config`], or every problem found in it. `env` resolves
/// `${VAR}`.
pub(super) fn read(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<ConfigIssue>> {
    let doc = match Document::parse(text) {
        Ok(d) => d,
        Err(e) => {
            let line = e.span().map(|s| line_of(text, s.start));
            return Err(vec![ConfigIssue {
                path: "(syntax)".into(),
                line,
                message: e.message().trim().to_string(),
            }]);
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
        Err(r.issues)
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

struct Reader<'a> {
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    issues: Vec<ConfigIssue>,
}

fn item_span(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::Value(v) => v.span(),
        Item::Table(t) => t.span(),
        Item::ArrayOfTables(a) => a.span(),
        Item::None => None,
    }
}

impl Reader<'_> {
    fn issue(&mut self, path: &str, span: Option<Range<usize>>, msg: impl Into<String>) {
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
    ) -> Option<(String, Option<Range<usize>>)> {
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
        self.spanned_strings(t, prefix, key)
            .map(|v| v.into_iter().map(|(_, s, _)| s).collect())
    }

    /// An array of strings, each with its index and span (for issues about one element).
    /// Elements that are not strings are reported and left out.
    fn spanned_strings(&mut self, t: &Table, prefix: &str, key: &str) -> Option<Vec<Element>> {
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
                    Ok(x) => out.push((i, x, s.span())),
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
        let plans = self.plans(root, &upstreams);
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
        let redis_url = self.store_url(t, "redis_url", check_redis_url);
        let postgres_url = self.store_url(t, "postgres_url", check_postgres_url);
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

    /// A `[storage]` connection URL: `None` when absent or empty, checked by `check`
    /// otherwise (the value stays a secret; the issue never repeats it).
    fn store_url(
        &mut self,
        t: &Table,
        key: &str,
        check: fn(&str) -> Result<(), String>,
    ) -> Option<Secret> {
        let (url, span) = self.string(t, "storage", key)?;
        if url.is_empty() {
            return None;
        }
        if let Err(e) = check(&url) {
            self.issue(&join("storage", key), span, e);
        }
        Some(Secret(url))
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

    /// Each `[plans.NAME]` with its limits parsed (`METRIC:WINDOW[@UPSTREAM]=VALUE`), every
    /// bad limit reported at its own line.
    /// A limit scoped to an upstream (`@NAME`) must name one of `upstreams`: it would
    /// never count anything otherwise.
    fn plans(
        &mut self,
        root: &Table,
        upstreams: &[UpstreamConfig],
    ) -> BTreeMap<String, Vec<LimitSpec>> {
        let mut out = BTreeMap::new();
        let Some(t) = self.table(root, "plans") else {
            return out;
        };
        for (name, item) in t.iter() {
            let p = format!("plans.{name}");
            if name.is_empty() || name.len() > 200 || name.contains(char::is_control) {
                // Key plans are 1-200 printable characters: no key could ever be on it.
                let span = t.key(name).and_then(|k| k.span()).or(item_span(item));
                self.issue(&p, span, "a plan name must be 1-200 printable characters");
            }
            let Some(pt) = item.as_table() else {
                self.issue(&p, item_span(item), "expected a table with `limits`");
                continue;
            };
            self.unknown_keys(pt, &p, PLAN_KEYS);
            let mut limits = Vec::new();
            for (i, text, span) in self.spanned_strings(pt, &p, "limits").unwrap_or_default() {
                let path = format!("{p}.limits[{i}]");
                let spec = match text.parse::<LimitSpec>() {
                    Ok(spec) => spec,
                    Err(e) => {
                        self.issue(&path, span, e.to_string());
                        continue;
                    }
                };
                if let Some(scope) = &spec.upstream
                    && !upstreams.iter().any(|u| &u.name == scope)
                {
                    let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                    self.issue(
                        &path,
                        span,
                        format!(
                            "`{spec}` is scoped to upstream `{scope}`, which is not configured (upstreams: {})",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                    continue;
                }
                limits.push(spec);
            }
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
            Some((s, span)) if !s.is_empty() => match WebhookTarget::parse(&s) {
                Ok(target) => Some(target),
                Err(e) => {
                    self.issue("alerts.webhook", span, e);
                    None
                }
            },
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
        let span_of = |path: &[&str]| -> Option<Range<usize>> {
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
