//! Logs: `tracing` set up for a terminal (human-readable) or for a log collector
//! (`CRATERE_LOG_FORMAT=json`). The access log is HTTP's ([`crate::http`]).

use std::io::IsTerminal;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` filters (default `default_filter`).
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
