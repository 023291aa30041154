//! Logging: `tracing` with JSON lines by default (pretty on request), and pingora's `log`
//! records bridged into the same subscriber so there is one stream of structured logs.
//!
//! Whatever `[log] level` (or `$TOLLGATE_LOG`) asks for, other crates log at `info` at
//! most ([`THIRD_PARTY_MAX`]). Their `debug` and `trace` output dumps requests and
//! connection state — pingora's "Sending header to upstream" prints every header, the
//! provider key included — and SPEC §8 allows no secret in the log. Two fences, so that
//! neither alone has to be right: the `log` bridge drops records above `info` before they
//! are even formatted, and the subscriber drops events above `info` from any target
//! outside `tollgate`. Credential headers are also marked sensitive where tollgate builds
//! them, so a `Debug` of a request shows `Sensitive` instead of the value.

use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::config::{LogConfig, LogFormat};

/// The most verbose level logged for any target outside tollgate.
pub const THIRD_PARTY_MAX: Level = Level::INFO;

/// Whether an event of `target` at `level` may be logged at all: tollgate's own targets
/// at any level, others at [`THIRD_PARTY_MAX`] or less verbose.
pub fn allowed(target: &str, level: &Level) -> bool {
    let ours = target == "tollgate" || target.starts_with("tollgate::");
    ours || *level <= THIRD_PARTY_MAX
}

/// Install the global subscriber. Safe to call once per process; later calls are ignored.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG")
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = filter.and(filter_fn(|meta| allowed(meta.target(), meta.level())));
    let layer = match cfg.format {
        LogFormat::Json => fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
        LogFormat::Pretty => fmt::layer().with_writer(std::io::stderr).boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
    if installed.is_ok() {
        // pingora (and redis, rustls, …) log through the `log` crate; records above
        // `info` never leave it.
        let _ = tracing_log::LogTracer::builder()
            .with_max_level(log::LevelFilter::Info)
            .init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_crates_are_capped_at_info() {
        for (target, level, ok) in [
            ("tollgate", Level::TRACE, true),
            ("tollgate::proxy", Level::DEBUG, true),
            ("tollgate::alert", Level::WARN, true),
            ("pingora_proxy::proxy_h1", Level::DEBUG, false),
            (
                "pingora_core::protocols::http::v1::client",
                Level::TRACE,
                false,
            ),
            ("pingora_proxy::lib", Level::ERROR, true),
            ("h2::codec", Level::DEBUG, false),
            ("hyper::proto", Level::TRACE, false),
            ("tokio_postgres::query", Level::DEBUG, false),
            ("redis::aio", Level::DEBUG, false),
            ("rustls::client", Level::INFO, true),
            ("tollgatex", Level::DEBUG, false),
        ] {
            assert_eq!(allowed(target, &level), ok, "{target} at {level}");
        }
    }
}
