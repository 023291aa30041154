//! Logging: `tracing` with JSON lines by default (pretty on request), and pingora's `log`
//! records bridged into the same subscriber so there is one stream of structured logs.

use crate::config::{LogConfig, LogFormat};

/// Install the global subscriber. Safe to call once per process; later calls are ignored.
pub fn init(cfg: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    if installed.is_ok() {
        // pingora logs through the `log` crate.
        let _ = tracing_log::LogTracer::init();
    }
}
