//! Logging set-up shared by the two binaries (`sinew-sidecar`, `sinew-control`), behind the
//! `logging` feature so the wire contract's other users do not build a log subscriber.

use std::io::IsTerminal;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// `--log-format`: lines for people (`text`, the default) or one JSON object per line for log
/// pipelines (`json`: `timestamp`, `level`, `target`, `fields` with `message`, and the span).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}` is not a log format: text or json")),
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` as `level` or `target=level,...` (default `info`).
/// A `Targets` filter, not `EnvFilter`: no regex engine in the binary for a log filter. A
/// spec that does not parse is reported (as `binary`) and `info` used. Colours only when
/// stderr is a terminal and `NO_COLOR` is unset: a log file gets no escape codes.
pub fn init(binary: &str, format: LogFormat) {
    let default = || Targets::new().with_default(LevelFilter::INFO);
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => parse(&spec).unwrap_or_else(|e| {
            eprintln!("{binary}: ignoring RUST_LOG={spec:?} ({e}); logging at info");
            default()
        }),
        Err(_) => default(),
    };
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(text)
        .with(json)
        .with(filter)
        .init();
}

/// Colour on a terminal, unless `NO_COLOR` is set to something (https://no-color.org).
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Empty entries (`info,`) are skipped: `Targets` would read one as `error`.
fn parse(spec: &str) -> Result<Targets, tracing_subscriber::filter::ParseError> {
    spec.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect::<Vec<_>>()
        .join(",")
        .parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_others_are_named() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        let refused = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(refused.contains("`yaml`") && refused.contains("text or json"));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn rust_log_forms_the_repo_uses_parse_and_empty_entries_are_skipped() {
        let with_empty = parse("info, ,sinew_sidecar=debug,").unwrap();
        assert_eq!(with_empty, parse("info,sinew_sidecar=debug").unwrap());
        assert_eq!(
            with_empty.default_level(),
            Some(LevelFilter::INFO),
            "an empty entry must not become `error`"
        );
        assert!(with_empty.would_enable("sinew_sidecar::outbound", &tracing::Level::DEBUG));
        assert!(!with_empty.would_enable("quinn", &tracing::Level::DEBUG));
        assert_eq!(
            parse("warn").unwrap().default_level(),
            Some(LevelFilter::WARN)
        );
        assert!(parse("sinew=loud").is_err());
    }
}
