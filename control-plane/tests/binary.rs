//! The `sinew-control` binary: the one stdout line scripts parse, the token files, and a clean
//! exit on SIGTERM.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn prints_its_addresses_and_exits_cleanly_on_sigterm() {
    let dir = std::env::temp_dir().join(format!(
        "sinew-control-bin-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_sinew-control"))
        .args([
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--lease-grace",
            "1s",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let line = line.trim_end();
    let rest = line
        .strip_prefix("listening grpc=")
        .unwrap_or_else(|| panic!("unexpected line: {line}"));
    let (grpc, http) = rest.split_once(" http=").unwrap();
    let grpc: std::net::SocketAddr = grpc.parse().unwrap();
    let http: std::net::SocketAddr = http.parse().unwrap();
    assert_ne!(grpc.port(), 0);
    assert_ne!(http.port(), 0);
    assert!(std::net::TcpStream::connect(grpc).is_ok());
    assert!(dir.join("admin-token").is_file());
    assert!(dir.join("join-token").is_file());
    assert!(dir.join("control.redb").is_file());

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 18, item 5: stderr going to a file (as under `sinewctl up`, or `2> log`) gets no
/// ANSI colour codes, even without NO_COLOR.
#[test]
fn a_log_file_gets_no_colour_codes() {
    let dir = std::env::temp_dir().join(format!(
        "sinew-control-bin-log-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("control.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sinew-control"))
        .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening grpc="), "{line}");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("control plane started"), "{text}");
    assert!(!text.contains('\x1b'), "escape codes in the log: {text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 16, item 7: `--log-format json` gives one JSON object per line, for log pipelines.
#[test]
fn json_logs_are_one_object_per_line() {
    let dir = std::env::temp_dir().join(format!(
        "sinew-control-bin-json-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("control.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sinew-control"))
        .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening grpc="), "{line}");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["fields"]["message"] == "control plane started")
        .unwrap_or_else(|| panic!("no start line: {text}"));
    assert_eq!(started["level"], "INFO");
    assert!(started["timestamp"].is_string() && started["target"].is_string());
    assert!(started["fields"]["grpc_addr"].is_string(), "{started}");

    let refused = Command::new(env!("CARGO_BIN_EXE_sinew-control"))
        .args(["--log-format", "yaml"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--log-format") && stderr.contains("text or json"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn refuses_to_start_on_bad_flags_with_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_sinew-control"))
        .args([
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--trust-domain",
            "Not Valid",
        ])
        .arg("--data-dir")
        .arg(std::env::temp_dir().join(format!("sinew-control-bin-bad-{}", std::process::id())))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--trust-domain"), "{stderr}");
}
