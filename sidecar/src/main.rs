use clap::Parser;
use sinew_sidecar::config::Args;

fn main() -> std::process::ExitCode {
    init_logging();
    let args = Args::parse();
    let threads = args.threads;
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sinew-sidecar: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sinew-sidecar: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sinew_sidecar::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sinew-sidecar: {e:#}");
            std::process::ExitCode::FAILURE
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
                eprintln!("sinew-sidecar: ignoring RUST_LOG={spec:?} ({e}); logging at info");
                default()
            }),
        Err(_) => default(),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}
