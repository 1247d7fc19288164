//! `sinew-control`: flags -> Config -> run.
#![forbid(unsafe_code)]

use clap::Parser;
use sinew_control::flags::Flags;
use std::process::ExitCode;

fn main() -> ExitCode {
    let flags = Flags::parse();
    let log_format = flags.log_format;
    let config = flags.into_config();
    sinew_proto::logging::init("sinew-control", log_format);
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
