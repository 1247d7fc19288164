use clap::Parser;
use sinew_sidecar::config::Args;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let threads = args.threads;
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sinew-sidecar: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // One thread asked for: a current-thread runtime, so every task runs on the thread that
    // polls the I/O driver. A multi-thread runtime with one worker still hands work between
    // the `block_on` thread and the worker: extra wake-ups, each a context switch.
    let mut runtime = match threads {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(n);
            runtime
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
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
