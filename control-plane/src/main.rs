//! `sinew-control`: flags -> Config -> run.
#![forbid(unsafe_code)]

use clap::Parser;
use sinew_control::flags::Flags;
use std::process::ExitCode;

fn main() -> ExitCode {
    let config = Flags::parse().into_config();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sinew-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sinew_control::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sinew-control: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` as `level` or `target=level,...` (default `info`).
/// A `Targets` filter, not `EnvFilter`: no regex engine in the binary for a log filter.
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let default = || Targets::new().with_default(LevelFilter::INFO);
    let filter = match std::env::var("RUST_LOG") {
        // Empty entries (`info,`) are skipped: `Targets` would read one as `error`.
        Ok(spec) => spec
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .collect::<Vec<_>>()
            .join(",")
            .parse()
            .unwrap_or_else(|e| {
                eprintln!("sinew-control: ignoring RUST_LOG={spec:?} ({e}); logging at info");
                default()
            }),
        Err(_) => default(),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}
