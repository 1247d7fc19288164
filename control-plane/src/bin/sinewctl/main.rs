//! `sinewctl`: the mesh's command line.
//!
//! - `apply`, `diff`, `get`, `delete`, `status`, `check`, `events` talk to the control plane's
//!   admin API (gRPC, bearer token) — see [`admin`];
//! - `up FILE` starts a whole local mesh (control plane, one sidecar per instance, the apps)
//!   from one YAML file, and stops all of it on Ctrl-C — see [`up`];
//! - `run --service NAME -- APP` starts one sidecar beside one app, joining a running mesh —
//!   see [`run`].
//!
//! The binary is self-contained: it speaks only the wire contract in `sinew_proto`, never the
//! control plane's internals, so it works against any control plane of the same protocol.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod admin;
mod check;
mod diff;
mod run;
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
    /// Apply policy documents (all of them, or none when one is invalid). Refused by a control
    /// plane started with --policy: its files are the policy.
    Apply {
        /// YAML file with one or more documents; `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Refuse (apply nothing) when a document names a service that has neither policy
        /// nor instances, instead of warning.
        #[arg(long)]
        strict: bool,
        /// Validate and show what would change (a diff per document); change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what `apply -f FILE` would change, as a diff per document. Exits 0 when nothing
    /// differs, 1 when something does (like `diff` and `kubectl diff`).
    Diff {
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
    /// The control plane's version and policy source, and every sidecar's connection and
    /// configuration state (like `istioctl proxy-status`).
    Status,
    /// Exit non-zero, saying why, when a certificate or the CA nears expiry or a sidecar is
    /// disconnected or NACKing.
    Check,
    /// Dead letters: list, replay, purge (asks every connected sidecar).
    #[command(subcommand)]
    Events(EventsCommand),
    /// Start a local mesh from one YAML file; Ctrl-C stops all of it.
    Up(up::UpArgs),
    /// Run one app with its own sidecar, joining the mesh of --control (like `dapr run`);
    /// Ctrl-C stops both, and the exit status is the app's.
    Run(run::RunArgs),
}

#[derive(Subcommand, Debug)]
enum GetCommand {
    /// The registered services and their instances.
    #[command(visible_alias = "svc")]
    Services,
    /// One service's policy document as YAML (no NAME: list the services).
    Service { name: Option<String> },
    /// Policy documents of every kind as YAML (all of them, or those named NAME).
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
        Command::Apply {
            file,
            strict,
            dry_run,
        } => admin::apply(&target, &file, admin::ApplyMode { strict, dry_run }).await,
        Command::Diff { file } => {
            let differs = admin::diff(&target, &file).await?;
            return Ok(if differs {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        Command::Get(GetCommand::Services | GetCommand::Service { name: None }) => {
            admin::get_services(&target).await
        }
        Command::Get(GetCommand::Service { name: Some(name) }) => {
            admin::get_policy(&target, Some("Service"), Some(&name)).await
        }
        Command::Get(GetCommand::Policy { name }) => {
            admin::get_policy(&target, None, name.as_deref()).await
        }
        Command::Get(GetCommand::Subscriptions { name }) => {
            admin::get_policy(&target, Some("Subscription"), name.as_deref()).await
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
        Command::Run(args) => return run::run(args, &target.addr).await,
        Command::Check => return check::run(&target).await,
    }?;
    Ok(ExitCode::SUCCESS)
}
