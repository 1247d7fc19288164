//! `sinewctl up FILE`: a whole local mesh from one YAML file (format: [`file`]).
//!
//! Start order: the control plane, then for each instance of each service its sidecar and
//! then its app. Each component's `listening ...` line gives its real addresses (port 0 means
//! "any"), and stdout reports one line per component in a fixed shape scripts can parse:
//!
//! ```text
//! control control pid=4711 grpc=127.0.0.1:7700 http=127.0.0.1:7701
//! sidecar web-1 pid=4712 outbound=127.0.0.1:4140 inbound=127.0.0.1:40123 admin=127.0.0.1:4191
//! app web-1 pid=4713 http=127.0.0.1:8080
//! mesh ready
//! mesh stopped
//! ```
//!
//! `mesh ready` comes once every sidecar's admin `/ready` answers 200, every app accepts
//! connections, and every service with a `health` check has an instance the control plane
//! lists as serving (a sidecar is ready as soon as it has its configuration, but callers get
//! only instances whose app passes its checks; see [`serving`]). Otherwise `up` names what is
//! not ready and why (for an HTTP health check, e.g. `GET /healthz answered 404 Not Found`)
//! and stops. Everything else (progress, errors) goes to stderr; the components' own output
//! goes to `.sinew/logs/<component>.log`. SIGINT, SIGTERM, SIGHUP or any component exiting
//! stops the whole mesh (see [`children`]).

pub mod children;
pub mod file;
pub mod probe;
mod serving;

use anyhow::{Context, anyhow};
use children::{Children, Exit};
use file::{UpFile, find_program};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::{Instant, sleep, timeout};

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// The mesh file (format: see the comment at the top of examples/quickstart.yaml).
    file: PathBuf,
    /// Where the mesh keeps its state and logs.
    #[arg(long, default_value = ".sinew")]
    state_dir: PathBuf,
    /// Seconds to wait for every sidecar and app to be ready.
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
}

/// How long a component may take to print its `listening` line.
const LISTENING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long components get between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Everything resolved before the first process starts, so a typo fails fast.
struct Plan {
    file: UpFile,
    control_bin: PathBuf,
    sidecar_bin: PathBuf,
    /// Per service, its resolved program.
    programs: Vec<PathBuf>,
    state: PathBuf,
}

impl Plan {
    fn new(args: &UpArgs) -> anyhow::Result<Plan> {
        let file = UpFile::load(&args.file)?;
        let exe = std::env::current_exe().ok();
        let exe_dir = exe.as_deref().and_then(Path::parent);
        let path_var = std::env::var_os("PATH");
        let base = match args.file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let find = |name: &str| find_program(name, exe_dir, path_var.as_deref(), &base);
        let hint = "build it with `cargo build -p sinew-control -p sinew-sidecar`";
        let control_bin = find("sinew-control").map_err(|e| anyhow!("{e}; {hint}"))?;
        let sidecar_bin = find("sinew-sidecar").map_err(|e| anyhow!("{e}; {hint}"))?;
        let programs = file
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| find(&s.command[0]).map_err(|e| anyhow!("services[{i}].command[0]: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Plan {
            file,
            control_bin,
            sidecar_bin,
            programs,
            state: args.state_dir.clone(),
        })
    }

    fn log(&self, component: &str) -> PathBuf {
        self.state
            .join("logs")
            .join(format!("{}.log", component.replace(' ', "-")))
    }
}

/// Something that must answer before the mesh is ready.
enum Probe {
    Sidecar { name: String, admin: SocketAddr },
    App { name: String, addr: SocketAddr },
}

enum Outcome {
    Ready,
    Failed(anyhow::Error),
    Signal(&'static str),
    Exited(Option<Exit>),
}

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::new(&args)?;
    for dir in ["control", "sidecars", "logs"] {
        let dir = plan.state.join(dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut signals = Signals::new().context("cannot listen for signals")?;
    let (mut children, mut exits) = Children::new();
    eprintln!("component logs: {}/", plan.state.join("logs").display());

    let ready_timeout = Duration::from_secs(args.ready_timeout);
    let outcome = tokio::select! {
        result = start(&plan, &mut children, ready_timeout) => match result {
            Ok(()) => Outcome::Ready,
            Err(e) => Outcome::Failed(e),
        },
        signal = signals.recv() => Outcome::Signal(signal),
        exit = exits.recv() => Outcome::Exited(exit),
    };
    let outcome = match outcome {
        Outcome::Ready => {
            say("mesh ready");
            tokio::select! {
                signal = signals.recv() => Outcome::Signal(signal),
                exit = exits.recv() => Outcome::Exited(exit),
            }
        }
        other => other,
    };
    let code = match outcome {
        Outcome::Ready => ExitCode::SUCCESS,
        Outcome::Signal(signal) => {
            eprintln!("{signal}: stopping the mesh");
            ExitCode::SUCCESS
        }
        Outcome::Failed(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Outcome::Exited(Some(exit)) => {
            children.mark_exited(&exit);
            let status = match &exit.status {
                Ok(status) => status.to_string(),
                Err(e) => format!("unknown status: {e}"),
            };
            eprintln!(
                "{} exited unexpectedly ({status}); stopping the mesh",
                exit.name
            );
            eprint!("{}", tail(&plan.log(&exit.name), 10));
            ExitCode::FAILURE
        }
        Outcome::Exited(None) => ExitCode::FAILURE,
    };
    children.stop_all(&mut exits, STOP_GRACE).await;
    say("mesh stopped");
    Ok(code)
}

/// Starts every component, then waits until all are ready.
async fn start(
    plan: &Plan,
    children: &mut Children,
    ready_timeout: Duration,
) -> anyhow::Result<()> {
    let control_dir = plan.state.join("control");
    let mut cmd = Command::new(&plan.control_bin);
    cmd.arg("--grpc")
        .arg(plan.file.control.grpc.to_string())
        .arg("--http")
        .arg(plan.file.control.http.to_string())
        .arg("--data-dir")
        .arg(&control_dir);
    if let Some(policy) = &plan.file.policy {
        let path = plan.state.join("policy.yaml");
        std::fs::write(&path, policy)
            .with_context(|| format!("cannot write {}", path.display()))?;
        cmd.arg("--policy").arg(&path);
    }
    let (pid, pairs) = start_reporting(&plan.log("control"), children, "control", cmd).await?;
    let grpc = probe::addr(&pairs, "grpc").map_err(|e| anyhow!("control: {e}"))?;
    let http = probe::addr(&pairs, "http").map_err(|e| anyhow!("control: {e}"))?;
    say(&format!(
        "control control pid={pid} grpc={grpc} http={http}"
    ));

    let join_token = control_dir.join("join-token");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !join_token.exists() && Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
    }

    let mut probes = Vec::new();
    for (service, program) in plan.file.services.iter().zip(&plan.programs) {
        for i in 1..=service.instances {
            let node = format!("{}-{i}", service.name);
            let first = i == 1;
            let app_port = match service.app_port.filter(|_| first) {
                Some(port) => port,
                None => probe::free_port().context("cannot find a free port for an app")?,
            };
            let fixed = |addr: Option<SocketAddr>| match addr.filter(|_| first) {
                Some(addr) => addr.to_string(),
                None => "127.0.0.1:0".to_string(),
            };
            let data_dir = plan.state.join("sidecars").join(&node);
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("cannot create {}", data_dir.display()))?;
            let mut cmd = Command::new(&plan.sidecar_bin);
            cmd.arg("--service")
                .arg(&service.name)
                .arg("--app-port")
                .arg(app_port.to_string())
                .arg("--control")
                .arg(probe::dialable(grpc).to_string())
                .arg("--join-token-file")
                .arg(&join_token)
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("--node-id")
                .arg(&node)
                .arg("--inbound")
                .arg("127.0.0.1:0")
                .arg("--outbound")
                .arg(fixed(service.sidecar.outbound))
                .arg("--admin")
                .arg(fixed(service.sidecar.admin));
            if let Some(protocol) = service.app_protocol {
                cmd.arg("--app-protocol").arg(protocol.as_flag());
            }
            cmd.args(service.health_flags());
            cmd.args(plan.file.events.flags());
            let name = format!("sidecar {node}");
            let (pid, pairs) = start_reporting(&plan.log(&name), children, &name, cmd).await?;
            let [outbound, inbound, admin] = ["outbound", "inbound", "admin"]
                .map(|key| probe::addr(&pairs, key).map_err(|e| anyhow!("{name}: {e}")));
            let (outbound, inbound, admin) = (outbound?, inbound?, admin?);
            say(&format!(
                "{name} pid={pid} outbound={outbound} inbound={inbound} admin={admin}"
            ));
            probes.push(Probe::Sidecar {
                name,
                admin: probe::dialable(admin),
            });

            let mut cmd = Command::new(program);
            cmd.args(&service.command[1..]).envs(&service.env);
            app_env(&mut cmd, app_port, outbound, &service.name, &node);
            let name = format!("app {node}");
            let log = open_log(&plan.log(&name))?;
            cmd.stdout(log.try_clone()?).stderr(log);
            let (pid, _) = children
                .spawn(&name, cmd)
                .with_context(|| format!("cannot start {name} ({})", program.display()))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], app_port));
            say(&format!("{name} pid={pid} http={addr}"));
            probes.push(Probe::App { name, addr });
        }
    }
    let deadline = Instant::now() + ready_timeout;
    wait_ready(&probes, ready_timeout).await?;
    let admin = crate::admin::Target {
        addr: probe::dialable(grpc).to_string(),
        token_file: control_dir.join("admin-token"),
    };
    serving::wait(plan, &probes, &admin, deadline, ready_timeout).await
}

/// What an app learns from the environment (these win over a file's `env`): where to listen
/// (`PORT`), its sidecar's outbound (`SINEW_OUTBOUND`, and as `HTTP_PROXY` for HTTP clients
/// that honour it, loopback excepted), its service and instance names.
pub fn app_env(cmd: &mut Command, app_port: u16, outbound: SocketAddr, service: &str, node: &str) {
    let outbound = probe::dialable(outbound);
    cmd.env("PORT", app_port.to_string())
        .env("SINEW_OUTBOUND", outbound.to_string())
        .env("HTTP_PROXY", format!("http://{outbound}"))
        .env("http_proxy", format!("http://{outbound}"))
        .env("NO_PROXY", "localhost,127.0.0.1,::1")
        .env("no_proxy", "localhost,127.0.0.1,::1")
        .env("SINEW_SERVICE", service)
        .env("SINEW_INSTANCE", node);
}

/// Starts a component that reports its addresses in a `listening ...` line on stdout; the
/// rest of its output goes to its log at `log_path`.
pub async fn start_reporting(
    log_path: &Path,
    children: &mut Children,
    name: &str,
    mut cmd: Command,
) -> anyhow::Result<(u32, std::collections::BTreeMap<String, String>)> {
    let log_path = log_path.to_path_buf();
    let log = open_log(&log_path)?;
    // Logs go to files: no terminal colour codes in them.
    cmd.env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(log.try_clone()?);
    let (pid, stdout) = children
        .spawn(name, cmd)
        .with_context(|| format!("cannot start {name}"))?;
    let stdout = stdout.ok_or_else(|| anyhow!("{name}: no stdout"))?;
    let mut lines = BufReader::new(stdout);
    let mut log = tokio::fs::File::from_std(log);
    let found = timeout(LISTENING_TIMEOUT, async {
        let mut line = String::new();
        loop {
            line.clear();
            match lines.read_line(&mut line).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            if let Some(pairs) = probe::parse_listening(&line) {
                return Some(pairs);
            }
            let _ = tokio::io::AsyncWriteExt::write_all(&mut log, line.as_bytes()).await;
        }
    })
    .await;
    let pairs = match found {
        Ok(Some(pairs)) => pairs,
        Ok(None) => {
            sleep(Duration::from_millis(100)).await; // let its last words reach the log
            return Err(anyhow!(
                "{name} exited before reporting its addresses; see {}\n{}",
                log_path.display(),
                tail(&log_path, 10)
            ));
        }
        Err(_) => {
            return Err(anyhow!(
                "{name} printed no `listening` line within {LISTENING_TIMEOUT:?}; see {}",
                log_path.display()
            ));
        }
    };
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut lines, &mut log).await;
    });
    Ok((pid, pairs))
}

/// A fresh log file, opened for appending (so stdout and stderr writers do not overwrite
/// each other).
pub fn open_log(path: &Path) -> anyhow::Result<File> {
    File::create(path)
        .and_then(|_| OpenOptions::new().append(true).open(path))
        .with_context(|| format!("cannot create {}", path.display()))
}

/// The last `n` lines of a log, indented, for an error message.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| format!("  | {l}\n"))
        .collect()
}

/// Polls every probe until all pass, or names those that did not within `limit`.
async fn wait_ready(probes: &[Probe], limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut pending: Vec<&Probe> = probes.iter().collect();
    loop {
        let mut failing = Vec::new();
        for probe in pending {
            let result = match probe {
                Probe::Sidecar { admin, .. } => match probe::http_status(*admin, "/ready").await {
                    Ok(200) => Ok(()),
                    Ok(status) => Err(format!("{admin}/ready answered {status}")),
                    Err(e) => Err(format!("{admin}/ready: {e}")),
                },
                Probe::App { addr, .. } => probe::accepts(*addr)
                    .await
                    .map_err(|e| format!("{addr}: {e}")),
            };
            if let Err(why) = result {
                failing.push((probe, why));
            }
        }
        if failing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let list: Vec<String> = failing
                .iter()
                .map(|(probe, why)| match probe {
                    Probe::Sidecar { name, .. } | Probe::App { name, .. } => {
                        format!("{name} ({why})")
                    }
                })
                .collect();
            return Err(anyhow!("not ready after {limit:?}: {}", list.join(", ")));
        }
        pending = failing.into_iter().map(|(probe, _)| probe).collect();
        sleep(Duration::from_millis(200)).await;
    }
}

/// One line to stdout, flushed; a closed stdout is not worth a panic.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}
