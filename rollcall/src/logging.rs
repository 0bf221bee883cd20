//! Logging for every rollcall binary: one line per event on stderr, at the
//! level `RUST_LOG` names (`error`, `warn`, `info`, `debug`, `trace`; default
//! `info`), coloured only on a terminal.

/// Installs the global subscriber; call once, first thing in `main`.
pub fn init() {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
