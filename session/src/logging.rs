//! Log output of both binaries: human-readable text on a terminal, or one
//! JSON object per line for log collectors (the default on Kubernetes).

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (coloured on a terminal).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`
    /// (the message in `fields.message`), `span` and `spans`.
    Json,
}

/// Installs the global subscriber; `filter` is a level or tracing directive
/// (an invalid one falls back to `info`).
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}
