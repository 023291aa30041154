//! Value formats of the config file that are not TOML types: sizes (`10MiB`), durations
//! (`20s`), `${VAR}` expansion, upstream base URLs and admin host names, the store and
//! webhook URLs (checked here so `check-config` refuses what `serve` could not use), and
//! how any of those URLs may be shown ([`redact_url`]).
//!
//! No error text here repeats a URL: a URL may carry a password or a token.

use std::time::Duration;

use base64::Engine as _;

use super::Secret;

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

/// Parse a duration such as `500ms`, `20s`, `10m`, `5h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like \"20s\" or \"500ms\": {e}"))
}

/// Expand `${VAR}` and `${VAR:-default}`.
pub(super) fn expand_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
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

/// Whether an upstream host (as parsed from `base_url`, IPv6 without brackets) is this
/// machine: `localhost` (and names under it) or a loopback address. Plain HTTP is allowed
/// there without `allow_insecure_http`.
pub(super) fn is_loopback_host(host: &str) -> bool {
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
pub(super) fn parse_base_url(s: &str) -> Result<(bool, String, u16, String), String> {
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
pub(super) fn normalize_host(s: &str) -> Option<String> {
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
pub(super) fn url_password(url: &str) -> Option<&str> {
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

/// A parsed `alerts.webhook` URL: where an alert is `POST`ed and with which credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    /// The URL as configured, for [`redact_url`] and [`super::Config::scrub`].
    pub(crate) url: Secret,
    pub(crate) tls: bool,
    /// Host as written in the URL (IPv6 literals keep their brackets), for `Host`.
    pub(crate) host_header: String,
    /// Host to connect to (no brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path and query sent in the request line.
    pub(crate) path: String,
    /// `Basic …` from `user:password@` in the URL, if any.
    pub(crate) authorization: Option<String>,
}

/// The URL carries credentials, so only the scheme is shown.
impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "WebhookTarget({scheme}://***)")
    }
}

impl WebhookTarget {
    /// Parse `http[s]://[user:password@]host[:port][/path][?query]`. The error text never
    /// repeats the URL (it may hold a token).
    pub fn parse(url: &str) -> Result<WebhookTarget, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| "is not a URL like \"https://hooks.example/tollgate\"".to_string())?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("must start with http:// or https://".into()),
        };
        let authority = uri.authority().ok_or("has no host")?;
        let host_header_raw = authority.host();
        if host_header_raw.is_empty() {
            return Err("has no host".into());
        }
        let host = host_header_raw
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let default_port = if tls { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        let host_header = if port == default_port {
            host_header_raw.to_string()
        } else {
            format!("{host_header_raw}:{port}")
        };
        let authorization = authority.as_str().rsplit_once('@').map(|(userinfo, _)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(userinfo)
            )
        });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_string();
        Ok(WebhookTarget {
            url: Secret::new(url),
            tls,
            host_header,
            host,
            port,
            path,
            authorization,
        })
    }

    /// The URL as configured (a secret: it may hold a token).
    pub fn url(&self) -> &Secret {
        &self.url
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }
}

/// `err` (a parser's message about `url`) with the URL and its password masked, in case
/// the parser quoted part of it.
fn without_url(err: String, url: &str) -> String {
    let mut out = err.replace(url, "***");
    if let Some(pw) = url_password(url) {
        out = out.replace(pw, "***");
    }
    out
}

/// Check `storage.postgres_url` the way the shared-mode ledger reads it
/// (`tokio_postgres::Config`), so a value it cannot use is refused before start.
pub fn check_postgres_url(url: &str) -> Result<(), String> {
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| {
            without_url(
                format!(
                    "is not a PostgreSQL URL like \"postgres://user:password@host:5432/db\": {e}"
                ),
                url,
            )
        })
}

/// Check `storage.redis_url` the way the Redis store reads it: one node
/// (`redis://`, `unix://`; not `rediss://`, which this build's client cannot connect to) or
/// a cluster's seed nodes (`redis+cluster://`). The store connects lazily, so without this a bad URL would only show as a Redis that
/// is never reachable.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    let nodes = match crate::quota::redis::Target::parse(url) {
        Ok(crate::quota::redis::Target::Single(u)) => vec![u],
        Ok(crate::quota::redis::Target::Cluster(nodes)) => nodes,
        Err(e) => {
            return Err(without_url(
                format!("is not a Redis URL like \"redis://host:6379\": {e}"),
                url,
            ));
        }
    };
    for node in &nodes {
        if let Err(e) = ::redis::Client::open(node.as_str()) {
            return Err(without_url(
                without_url(
                    format!("is not a Redis URL like \"redis://host:6379\": {e}"),
                    node,
                ),
                url,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        (k == "ADMIN").then(|| "adm-secret-0123456789".to_string())
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
            // (The mask may also stand alone, as `scheme://***@`: a password such as `//*`
            // is then "shown" by the separator and the mask.)
            let rest = format!("{scheme}://{user}:***@{host}{tail}/***?***");
            let masked = format!("{scheme}://***@{host}{tail}/***?***");
            proptest::prop_assume!(!rest.contains(&password) && !masked.contains(&password));
            let shown = redact_url(&url, keep_path);
            proptest::prop_assert!(!shown.contains(&password), "{} -> {}", url, shown);
        }
    }

    #[test]
    fn webhook_urls_parse_without_echoing_them() {
        let t = WebhookTarget::parse("https://hooks.example/a/b?token=x").unwrap();
        assert!(t.is_tls());
        assert_eq!((t.host.as_str(), t.port), ("hooks.example", 443));
        assert_eq!(t.host_header, "hooks.example");
        assert_eq!(t.path, "/a/b?token=x");
        assert!(t.authorization.is_none());
        assert_eq!(t.url().expose(), "https://hooks.example/a/b?token=x");
        assert!(!format!("{t:?}").contains("token"));

        let t = WebhookTarget::parse("http://u:p@127.0.0.1:9000").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 9000));
        assert_eq!(t.host_header, "127.0.0.1:9000");
        assert_eq!(t.path, "/");
        assert_eq!(t.authorization.as_deref(), Some("Basic dTpw"));

        let t = WebhookTarget::parse("http://[::1]:8081/h").unwrap();
        assert_eq!(
            (t.host.as_str(), t.host_header.as_str()),
            ("::1", "[::1]:8081")
        );

        for bad in ["ftp://x/", "hooks.example/x", "not a url", "https:///x"] {
            let e = WebhookTarget::parse(bad).unwrap_err();
            assert!(!e.contains(bad), "{e}");
        }
    }

    #[test]
    fn store_urls_are_checked_without_echoing_them() {
        for ok in [
            "postgres://tollgate:pw@db.internal:5432/ledger?sslmode=disable",
            "postgresql://localhost/l",
            "host=db user=tollgate",
        ] {
            assert_eq!(check_postgres_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "postgres://u:pg-s3cret@db:notaport/l",
            "postgres://u:pg-s3cret@db/l?sslmode=sometimes",
            "postgres://u:pg-s3cret@db/l?bogus_option=1",
        ] {
            let e = check_postgres_url(bad).unwrap_err();
            assert!(!e.contains("pg-s3cret"), "{e}");
        }
        for ok in [
            "redis://127.0.0.1:6379/0",
            "redis+cluster://:pw@h1:7000,h2:7001",
            "unix:///run/redis.sock",
        ] {
            assert_eq!(check_redis_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://:rd-s3cret@h:6379",
            "127.0.0.1:6379",
            "redis://:rd-s3cret@h:port/0",
            "redis+cluster://:rd-s3cret@",
        ] {
            let e = check_redis_url(bad).unwrap_err();
            assert!(!e.contains("rd-s3cret"), "{bad}: {e}");
        }
        // This build's Redis client has no TLS: a `rediss://` store could never connect.
        let e = check_redis_url("rediss://:rd-s3cret@cache.internal:6380").unwrap_err();
        assert!(e.contains("TLS") && !e.contains("rd-s3cret"), "{e}");
    }
}
