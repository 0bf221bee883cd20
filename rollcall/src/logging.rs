//! Logging for every rollcall binary: one line per event on stderr, at the
//! level `RUST_LOG` names (`error`, `warn`, `info`, `debug`, `trace`; default
//! `info`), coloured only on a terminal.
//!
//! Inside AWS Lambda with the JSON log format (`LoggingConfig.LogFormat:
//! JSON`), each line is a JSON object with a `level` field, so that Lambda's
//! own `ApplicationLogLevel` filter applies, and that level
//! (`AWS_LAMBDA_LOG_LEVEL`) is the default.

/// Installs the global subscriber at `info` unless told otherwise; call
/// once, first thing in `main`.
pub fn init() {
    init_with_default(tracing::Level::INFO);
}

/// [`init`] with another default level (`RUST_LOG` still wins).
pub fn init_with_default(default: tracing::Level) {
    let json = std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let level = ["RUST_LOG", "AWS_LAMBDA_LOG_LEVEL"]
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .and_then(|text| parse_level(&text))
        .unwrap_or(default);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// tracing's level names, plus Lambda's `FATAL` (tracing has no such level).
fn parse_level(text: &str) -> Option<tracing::Level> {
    if text.eq_ignore_ascii_case("fatal") {
        return Some(tracing::Level::ERROR);
    }
    text.parse().ok()
}
