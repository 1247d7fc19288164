//! `sinewctl up` with health checks: `mesh ready` only once every health-checked service has a
//! serving instance; otherwise `up` names the service and the failing check, and stops.
//! Every port is 0, so these run beside the quick start test.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

#[allow(unsafe_code)]
fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid we started; no memory is touched.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// `sinewctl up FILE` in `dir`, its stdout lines on a channel; SIGTERMed when dropped.
struct Up {
    child: std::process::Child,
    lines: Receiver<String>,
    stderr: std::path::PathBuf,
}

impl Up {
    fn start(dir: &std::path::Path, file: &str, extra: &[&str]) -> Up {
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, file).unwrap();
        let stderr = dir.join("up.stderr");
        let mut up = Command::new(bin("sinewctl"));
        up.arg("up")
            .arg(&path)
            .args(extra)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        std::os::unix::process::CommandExt::process_group(&mut up, 0);
        let mut child = up.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Up {
            child,
            lines,
            stderr,
        }
    }

    /// Stdout lines until `mesh ready` (true) or the end of the output (false).
    fn until_ready(&self) -> (bool, Vec<String>) {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if line == "mesh ready" {
                return (true, seen);
            }
            seen.push(line);
        }
        (false, seen)
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sinewctl up did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), libc::SIGTERM);
            let _ = self.wait();
        }
    }
}

fn mesh_file(health: &str) -> String {
    format!(
        "control: {{grpc: 127.0.0.1:0, http: 127.0.0.1:0}}\n\
         services:\n\
         - name: orders\n  command: [demo-orders]\n  health: {health}\n\
         - name: web\n  command: [demo-web]\n  health: /healthz\n"
    )
}

/// Issue 18, item 4: the demo apps serve `/healthz`, so a quick start with `health: /healthz`
/// comes up and web reaches orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_health_checks_is_ready_only_when_they_pass_and_web_reaches_orders() {
    let scratch = Scratch::new("up-health");
    let mut up = Up::start(&scratch.0, &mesh_file("/healthz"), &[]);
    let (ready, lines) = up.until_ready();
    assert!(ready, "no `mesh ready`: {lines:#?}\n{}", up.stderr());
    let web = lines
        .iter()
        .find_map(|l| l.strip_prefix("app web-1 pid="))
        .and_then(|rest| rest.split_once(" http="))
        .map(|(_, addr)| addr.parse().unwrap())
        .unwrap_or_else(|| panic!("no web app line: {lines:#?}"));
    let client = http_client();
    let answer = get(&client, web, "web", "/").await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        answer.text().starts_with("web got from orders: "),
        "{}",
        answer.text()
    );
    signal(up.child.id(), libc::SIGINT);
    assert!(up.wait().success(), "{}", up.stderr());
}

/// Issue 18, item 4: a health check that never passes: no `mesh ready`; `up` names the
/// service, the instance and the check's failure, and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_names_a_service_whose_health_check_fails_instead_of_saying_ready() {
    let scratch = Scratch::new("up-unhealthy");
    let mut up = Up::start(
        &scratch.0,
        &mesh_file("/not-served"),
        &["--ready-timeout", "5"],
    );
    let (ready, lines) = up.until_ready();
    assert!(
        !ready,
        "`mesh ready` with orders failing its checks: {lines:#?}"
    );
    assert_eq!(lines.last().map(String::as_str), Some("mesh stopped"));
    assert!(!up.wait().success());
    let stderr = up.stderr();
    assert!(
        stderr.contains(
            "error: not ready after 5s: service orders has no serving instance (health: /not-served): \
             orders-1: GET /not-served answered 404 Not Found; logs in .sinew/logs"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("service web"), "{stderr}");
}
