use clap::Parser;
use sinew_sidecar::config::Args;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    sinew_proto::logging::init("sinew-sidecar", args.log_format);
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
