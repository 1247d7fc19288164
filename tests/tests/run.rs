//! `sinewctl run --service NAME -- APP`: one sidecar beside one app joins a running mesh;
//! the app gets the mesh's environment, Ctrl-C stops both, and the exit status is the app's.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

#[allow(unsafe_code)]
fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid we started; no memory is touched.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// `sinewctl run ...` against `mesh`, its stdout lines on a channel.
fn run(mesh: &Mesh, args: &[&str]) -> (Child, Receiver<String>) {
    let mut command = Command::new(bin("sinewctl"));
    command
        .arg("--control")
        .arg(mesh.grpc.to_string())
        .arg("run")
        .arg("--join-token-file")
        .arg(mesh.dir().join("control/join-token"))
        .arg("--state-dir")
        .arg(mesh.dir().join("run"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(mesh.dir().join("run.stderr")).unwrap());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// The next stdout line (panics after 60 s).
fn next(lines: &Receiver<String>) -> String {
    lines
        .recv_timeout(Duration::from_secs(60))
        .expect("a line from sinewctl run")
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            signal(child.id(), libc::SIGKILL);
            panic!("sinewctl run did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pid_of(line: &str) -> u32 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("pid="))
        .unwrap_or_else(|| panic!("no pid in {line}"))
        .parse()
        .unwrap()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

fn gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}

/// Issue 18, item 6: the app is reachable through the mesh by its service name, sees PORT,
/// SINEW_OUTBOUND and HTTP_PROXY, and Ctrl-C stops it and its sidecar; `run` exits with the
/// app's status (SIGTERM: 143).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_joins_an_app_to_the_mesh_and_ctrl_c_stops_both() {
    let mesh = Mesh::start("run");
    let testapp = bin("sinew-testapp");
    let script = format!(
        "echo \"env PORT=$PORT SINEW_OUTBOUND=$SINEW_OUTBOUND HTTP_PROXY=$HTTP_PROXY SINEW_SERVICE=$SINEW_SERVICE\"; \
         INSTANCE=ledger-app exec {}",
        testapp.display()
    );
    let (mut child, lines) = run(&mesh, &["--service", "ledger", "--", "sh", "-c", &script]);
    let sidecar = next(&lines);
    assert!(sidecar.starts_with("sidecar ledger-run-"), "{sidecar}");
    let outbound: std::net::SocketAddr = field(&sidecar, "outbound").parse().unwrap();
    // `run` prints its `app` line once the app is started, and the app prints its own line:
    // either may come first.
    let (first, second) = (next(&lines), next(&lines));
    let (app, env) = if first.starts_with("app ") {
        (first, second)
    } else {
        (second, first)
    };
    assert!(app.starts_with("app ledger-run-"), "{app}");
    let port = field(&app, "port");
    assert_eq!(
        env,
        format!(
            "env PORT={port} SINEW_OUTBOUND={outbound} HTTP_PROXY=http://{outbound} SINEW_SERVICE=ledger"
        )
    );

    // Through its own sidecar, by service name: out over QUIC and back in to the app.
    let client = http_client();
    let mut answer = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match get(&client, outbound, "ledger", "/whoami").await {
            Ok(a) if a.status == 200 => {
                answer = Some(a);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let answer = answer.expect("ledger answered through the mesh");
    assert_eq!(answer.text(), "ledger-app");

    let (sidecar_pid, app_pid) = (pid_of(&sidecar), pid_of(&app));
    signal(child.id(), libc::SIGINT);
    let status = wait(&mut child);
    assert_eq!(
        status.code(),
        Some(143),
        "the app's SIGTERM as a shell reports it"
    );
    let stderr = std::fs::read_to_string(mesh.dir().join("run.stderr")).unwrap();
    assert!(
        stderr.contains("SIGINT: stopping the app and its sidecar"),
        "{stderr}"
    );
    assert!(gone(sidecar_pid) && gone(app_pid), "a process outlived run");
}

/// Issue 18, item 6: an app that exits on its own ends `run` with its status, and its
/// sidecar is stopped (neither is restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_with_the_app_status_and_stops_the_sidecar() {
    let mesh = Mesh::start("run-exit");
    let (mut child, lines) = run(
        &mesh,
        &["--service", "batch", "--", "sh", "-c", "sleep 1; exit 7"],
    );
    let sidecar = next(&lines);
    assert!(sidecar.starts_with("sidecar batch-run-"), "{sidecar}");
    assert!(next(&lines).starts_with("app batch-run-"));
    let status = wait(&mut child);
    assert_eq!(status.code(), Some(7));
    let stderr = std::fs::read_to_string(mesh.dir().join("run.stderr")).unwrap();
    assert!(
        stderr.contains("the app exited (exit status: 7); stopping its sidecar"),
        "{stderr}"
    );
    assert!(gone(pid_of(&sidecar)), "the sidecar outlived its app");
}
