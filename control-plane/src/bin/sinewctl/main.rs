//! `sinewctl`: the mesh's command line.
//!
//! - `apply`, `get`, `delete`, `status`, `check`, `events` talk to the control plane's admin API (gRPC, bearer
//!   token) — see [`admin`];
//! - `up FILE` starts a whole local mesh (control plane, one sidecar per instance, the apps)
//!   from one YAML file, and stops all of it on Ctrl-C — see [`up`].
//!
//! The binary is self-contained: it speaks only the wire contract in `sinew_proto`, never the
//! control plane's internals, so it works against any control plane of the same protocol.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod admin;
mod check;
mod table;
mod up;

use clap::{Parser, Subcommand};
use sinew_proto::v1::events_request::Op;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "sinewctl", version, about = "Operate a Sinew mesh")]
struct Cli {
    /// The control plane's gRPC address (host:port).
    #[arg(
        long,
        global = true,
        env = "SINEW_CONTROL",
        default_value = "127.0.0.1:7700"
    )]
    control: String,
    /// File holding the admin token (written by `sinew-control` into its data dir).
    #[arg(
        long,
        global = true,
        env = "SINEW_ADMIN_TOKEN_FILE",
        default_value = "./.sinew/control/admin-token"
    )]
    token_file: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply policy documents (all of them, or none when one is invalid).
    Apply {
        /// YAML file with one or more documents; `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Show services or policy documents.
    #[command(subcommand)]
    Get(GetCommand),
    /// Delete a policy document.
    #[command(subcommand)]
    Delete(DeleteCommand),
    /// Every sidecar's connection and configuration state (like `istioctl proxy-status`).
    Status,
    /// Exit non-zero, saying why, when a certificate or the CA nears expiry or a sidecar is
    /// disconnected or NACKing.
    Check,
    /// Dead letters: list, replay, purge (asks every connected sidecar).
    #[command(subcommand)]
    Events(EventsCommand),
    /// Start a local mesh from one YAML file; Ctrl-C stops all of it.
    Up(up::UpArgs),
}

#[derive(Subcommand, Debug)]
enum GetCommand {
    /// The registered services and their instances.
    #[command(visible_alias = "svc")]
    Services,
    /// One service's policy document as YAML (no NAME: list the services).
    Service { name: Option<String> },
    /// Policy documents as YAML (every one, or the one named).
    #[command(visible_alias = "policies")]
    Policy { name: Option<String> },
    /// Event subscriptions as YAML (every one, or the one named).
    #[command(visible_alias = "subscription")]
    Subscriptions { name: Option<String> },
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// List dead letters (events a subscriber refused or never took).
    DeadLetters(admin::DeadLetterFilter),
    /// Deliver dead letters again (they leave the list; failing again brings them back).
    Replay(admin::DeadLetterFilter),
    /// Remove dead letters for good.
    Purge(admin::DeadLetterFilter),
}

#[derive(Subcommand, Debug)]
enum DeleteCommand {
    /// Delete a service's policy document.
    #[command(visible_alias = "policy")]
    Service { name: String },
    /// Delete an event subscription (its pending deliveries end with it).
    Subscription { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(run(cli));
    // `up` may leave tasks blocked on child pipes; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = admin::Target {
        addr: cli.control,
        token_file: cli.token_file,
    };
    match cli.command {
        Command::Apply { file } => admin::apply(&target, &file).await,
        Command::Get(GetCommand::Services | GetCommand::Service { name: None }) => {
            admin::get_services(&target).await
        }
        Command::Get(GetCommand::Service { name: Some(name) }) => {
            admin::get_policy(&target, "Service", Some(&name)).await
        }
        Command::Get(GetCommand::Policy { name }) => {
            admin::get_policy(&target, "Service", name.as_deref()).await
        }
        Command::Get(GetCommand::Subscriptions { name }) => {
            admin::get_policy(&target, "Subscription", name.as_deref()).await
        }
        Command::Delete(DeleteCommand::Service { name }) => {
            admin::delete(&target, "Service", &name).await
        }
        Command::Delete(DeleteCommand::Subscription { name }) => {
            admin::delete(&target, "Subscription", &name).await
        }
        Command::Status => admin::status(&target).await,
        Command::Events(EventsCommand::DeadLetters(filter)) => {
            admin::dead_letters(&target, Op::List, filter).await
        }
        Command::Events(EventsCommand::Replay(filter)) => {
            admin::dead_letters(&target, Op::Replay, filter).await
        }
        Command::Events(EventsCommand::Purge(filter)) => {
            admin::dead_letters(&target, Op::Purge, filter).await
        }
        Command::Up(args) => return up::run(args).await,
        Command::Check => return check::run(&target).await,
    }?;
    Ok(ExitCode::SUCCESS)
}
