//! `sinewctl run --service NAME [--control ADDR] -- APP [ARGS...]`: one sidecar beside one
//! app process, the way `dapr run` works, for a service that is not in an `up` file (a
//! service under development joining a running mesh, say).
//!
//! It starts `sinew-sidecar` (found like `up` finds it), waits for its `/ready` (it has its
//! configuration and certificate from the control plane), then starts the app with the
//! environment `up` gives its apps (`PORT`, `SINEW_OUTBOUND`, `HTTP_PROXY`, ...). Stdout
//! reports the two processes in `up`'s shape:
//!
//! ```text
//! sidecar orders-run-4711 pid=4712 outbound=127.0.0.1:40100 inbound=127.0.0.1:40101 admin=127.0.0.1:40102
//! app orders-run-4711 pid=4713 port=40103
//! ```
//!
//! The app's own output goes to the terminal; the sidecar's to
//! `<state-dir>/logs/sidecar-<node>.log`. Neither is restarted: when the app exits, the
//! sidecar is stopped and `run` exits with the app's status (128 + N for a signal N); Ctrl-C
//! (or SIGTERM, SIGHUP) stops both, app first, and exits the same way; a sidecar that exits
//! on its own stops the app and `run` fails.

use crate::up::children::{Children, Exit};
use crate::up::file::{find_program, health_flags};
use crate::up::{STOP_GRACE, Signals, app_env, probe, say, start_reporting, tail};
use anyhow::{Context, anyhow, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::process::Command;
use tokio::time::{Instant, sleep};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The mesh service the app is an instance of (a-z, 0-9, '-').
    #[arg(long)]
    service: String,
    /// The port the app listens on (given to it as PORT); default: a free one.
    #[arg(long)]
    app_port: Option<u16>,
    /// How the sidecar talks to the app: http1 or h2c (the sidecar's default when unset).
    #[arg(long, value_parser = ["http1", "h2c"])]
    app_protocol: Option<String>,
    /// The app's health check, as in an `up` file: a path (`/healthz`), `grpc` or
    /// `grpc:SERVICE`.
    #[arg(long)]
    health: Option<String>,
    /// The sidecar's outbound listener (given to the app as SINEW_OUTBOUND); port 0: any.
    #[arg(long, default_value = "127.0.0.1:0")]
    outbound: SocketAddr,
    /// The sidecar's inbound (QUIC) listener; port 0: any.
    #[arg(long, default_value = "127.0.0.1:0")]
    inbound: SocketAddr,
    /// The sidecar's admin listener; port 0: any.
    #[arg(long, default_value = "127.0.0.1:0")]
    admin: SocketAddr,
    /// The join token the control plane wrote into its data dir.
    #[arg(
        long,
        env = "SINEW_JOIN_TOKEN_FILE",
        default_value = "./.sinew/control/join-token"
    )]
    join_token_file: PathBuf,
    /// The instance's node id; default `<service>-run-<pid of sinewctl>`.
    #[arg(long)]
    node_id: Option<String>,
    /// Where the sidecar keeps its data (`sidecars/<node>`) and log (`logs/`).
    #[arg(long, default_value = ".sinew")]
    state_dir: PathBuf,
    /// Seconds to wait for the sidecar to be ready before starting the app.
    #[arg(long, default_value_t = 30)]
    ready_timeout: u64,
    /// The app: program and arguments, after `--`.
    #[arg(last = true, required = true, value_name = "APP")]
    command: Vec<String>,
}

/// How starting ended.
enum Start {
    Done(anyhow::Result<()>),
    Signal(&'static str),
    Exited(Option<Exit>),
}

/// How running ended.
enum Outcome {
    Signal(&'static str),
    Exited(Option<Exit>),
}

pub async fn run(args: RunArgs, control: &str) -> anyhow::Result<ExitCode> {
    sinew_proto::policy::validate_name(&args.service).map_err(|e| anyhow!("--service: {e}"))?;
    let exe = std::env::current_exe().ok();
    let exe_dir = exe.as_deref().and_then(Path::parent);
    let path_var = std::env::var_os("PATH");
    let find = |name: &str| find_program(name, exe_dir, path_var.as_deref(), Path::new("."));
    let sidecar_bin = find("sinew-sidecar")
        .map_err(|e| anyhow!("{e}; build it with `cargo build -p sinew-sidecar`"))?;
    let program = find(&args.command[0]).map_err(|e| anyhow!("the app: {e}"))?;
    let node = args
        .node_id
        .clone()
        .unwrap_or_else(|| format!("{}-run-{}", args.service, std::process::id()));
    let data_dir = args.state_dir.join("sidecars").join(&node);
    let logs = args.state_dir.join("logs");
    for dir in [&data_dir, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let app_port = match args.app_port {
        Some(port) => port,
        None => probe::free_port().context("cannot find a free port for the app")?,
    };

    let mut signals = Signals::new().context("cannot listen for signals")?;
    let (mut children, mut exits) = Children::new();
    let sidecar_name = format!("sidecar {node}");
    let sidecar_log = logs.join(format!("sidecar-{node}.log"));
    let app_name = format!("app {node}");

    let mut cmd = Command::new(&sidecar_bin);
    cmd.arg("--service")
        .arg(&args.service)
        .arg("--app-port")
        .arg(app_port.to_string())
        .arg("--control")
        .arg(control)
        .arg("--join-token-file")
        .arg(&args.join_token_file)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--node-id")
        .arg(&node)
        .arg("--inbound")
        .arg(args.inbound.to_string())
        .arg("--outbound")
        .arg(args.outbound.to_string())
        .arg("--admin")
        .arg(args.admin.to_string())
        .args(health_flags(args.health.as_deref()));
    if let Some(protocol) = &args.app_protocol {
        cmd.arg("--app-protocol").arg(protocol);
    }
    let started = async {
        let (pid, pairs) = start_reporting(&sidecar_log, &mut children, &sidecar_name, cmd).await?;
        let [outbound, inbound, admin] = ["outbound", "inbound", "admin"]
            .map(|key| probe::addr(&pairs, key).map_err(|e| anyhow!("{sidecar_name}: {e}")));
        let (outbound, inbound, admin) = (outbound?, inbound?, admin?);
        say(&format!(
            "{sidecar_name} pid={pid} outbound={outbound} inbound={inbound} admin={admin}"
        ));
        let limit = Duration::from_secs(args.ready_timeout);
        sidecar_ready(probe::dialable(admin), limit, control, &sidecar_log).await?;

        let mut cmd = Command::new(&program);
        cmd.args(&args.command[1..])
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit());
        app_env(&mut cmd, app_port, outbound, &args.service, &node);
        let (pid, _) = children
            .spawn(&app_name, cmd)
            .with_context(|| format!("cannot start the app ({})", program.display()))?;
        say(&format!("{app_name} pid={pid} port={app_port}"));
        anyhow::Ok(())
    };
    let start = tokio::select! {
        result = started => Start::Done(result),
        signal = signals.recv() => Start::Signal(signal),
        exit = exits.recv() => Start::Exited(exit),
    };
    let failed = match start {
        Start::Done(result) => result.err(),
        Start::Signal(signal) => {
            eprintln!("{signal}: stopping");
            children.stop_all(&mut exits, STOP_GRACE).await;
            return Ok(ExitCode::FAILURE);
        }
        Start::Exited(Some(exit)) => {
            children.mark_exited(&exit);
            Some(anyhow!(
                "{} exited before the app started ({}); its log:\n{}",
                exit.name,
                describe(&exit),
                tail(&sidecar_log, 10)
            ))
        }
        Start::Exited(None) => Some(anyhow!("lost track of the sidecar")),
    };
    if let Some(e) = failed {
        children.stop_all(&mut exits, STOP_GRACE).await;
        return Err(e);
    }

    let outcome = tokio::select! {
        signal = signals.recv() => Outcome::Signal(signal),
        exit = exits.recv() => Outcome::Exited(exit),
    };
    let code = match outcome {
        Outcome::Signal(signal) => {
            eprintln!("{signal}: stopping the app and its sidecar");
            children.stop_all(&mut exits, STOP_GRACE).await;
            children
                .status(&app_name)
                .map_or(ExitCode::FAILURE, exit_code)
        }
        Outcome::Exited(Some(exit)) if exit.name == app_name => {
            children.mark_exited(&exit);
            eprintln!("the app exited ({}); stopping its sidecar", describe(&exit));
            children.stop_all(&mut exits, STOP_GRACE).await;
            exit.status.map_or(ExitCode::FAILURE, exit_code)
        }
        Outcome::Exited(Some(exit)) => {
            children.mark_exited(&exit);
            eprintln!(
                "{} exited unexpectedly ({}); stopping the app",
                exit.name,
                describe(&exit)
            );
            eprint!("{}", tail(&sidecar_log, 10));
            children.stop_all(&mut exits, STOP_GRACE).await;
            ExitCode::FAILURE
        }
        Outcome::Exited(None) => ExitCode::FAILURE,
    };
    Ok(code)
}

/// Waits for the sidecar's `/ready` (configuration and certificate in hand); the error says
/// what it still lacks and where the control plane was expected.
async fn sidecar_ready(
    admin: SocketAddr,
    limit: Duration,
    control: &str,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let why = match probe::http_status(admin, "/ready").await {
            Ok(200) => return Ok(()),
            Ok(status) => format!("its /ready answered {status}"),
            Err(e) => format!("its /ready: {e}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "the sidecar is not ready after {limit:?} ({why}): is the control plane at {control} \
                 running, and --join-token-file its join token? see {}",
                log.display()
            );
        }
        sleep(Duration::from_millis(200)).await;
    }
}

fn describe(exit: &Exit) -> String {
    match &exit.status {
        Ok(status) => status.to_string(),
        Err(e) => format!("unknown status: {e}"),
    }
}

/// The app's exit status as ours: its code, or 128 + the signal that ended it (as a shell
/// reports it).
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}
