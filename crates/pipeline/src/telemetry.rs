//! Logging through `tracing`: readable text by default, JSON lines with `LOG_FORMAT=json`.

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// What is logged without `RUST_LOG`: `info`, but ONNX Runtime only from `warn` (at `info` it
/// describes every graph optimisation of every model it loads).
pub const DEFAULT_FILTER: &str = "info,ort=warn";

/// Installs the global subscriber. `RUST_LOG` filters (default [`DEFAULT_FILTER`]). Logs go to
/// stderr.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal, not in files or `docker compose logs`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless, so the error is ignored on purpose.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
