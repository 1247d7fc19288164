//! The benchmarks cannot rot: every contender of the mesh benchmark (direct, Sinew, Envoy,
//! HAProxy, nginx) and the control-plane benchmark run for a few seconds and produce results.
//! Nothing here is a timing assertion. A missing peer proxy fails with the command that
//! installs it (`bash benches/install-peers.sh`, which `.ci/run` calls).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sinew-bench-smoke-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(bin: &str, out: &PathBuf) {
    let output = Command::new(bin)
        .arg("--smoke")
        .arg("--out")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
    assert!(
        output.status.success(),
        "{bin} --smoke failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_contender_of_the_mesh_benchmark_produces_results() {
    let out = out_dir("mesh");
    run(env!("CARGO_BIN_EXE_mesh-bench"), &out);
    let report = json(out.join("mesh.json"));
    let runs = report["runs"].as_array().unwrap();
    for contender in ["direct", "sinew", "envoy", "haproxy", "nginx"] {
        let run = runs
            .iter()
            .find(|r| r["contender"] == contender)
            .unwrap_or_else(|| panic!("no run of {contender}"));
        let phases = run["phases"].as_array().unwrap();
        assert_eq!(phases.len(), 3, "{contender}: {phases:?}");
        for phase in phases {
            assert!(phase["ok"].as_u64().unwrap() > 0, "{contender}: {phase}");
            let p50 = phase["latency_us"][0][1].as_f64();
            assert!(p50.is_some_and(|v| v > 0.0), "{contender}: {phase}");
            let proxies = phase["proxy_cpu_s"].as_array().unwrap().len();
            assert_eq!(
                proxies,
                if contender == "direct" { 0 } else { 2 },
                "{contender}"
            );
        }
    }
    let markdown = std::fs::read_to_string(out.join("mesh.md")).unwrap();
    assert!(markdown.contains("| sinew |"), "{markdown}");
    assert!(out.join("mesh-latency-200rps.svg").exists());
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn the_control_plane_benchmark_produces_results() {
    let out = out_dir("control");
    run(env!("CARGO_BIN_EXE_control-bench"), &out);
    let report = json(out.join("control.json"));
    let scale = &report["scales"][0];
    assert_eq!(scale["sidecars"], 20);
    for change in scale["changes"].as_array().unwrap() {
        assert_eq!(
            change["affected_acked"], change["affected_expected"],
            "{change}"
        );
    }
    assert!(
        scale["sizes_before"]["scoped_full_update_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(scale["control_peak_rss_kib"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(out);
}

/// Issue 18, item 5: a bad flag value names the flag, the value and the form expected.
#[test]
fn a_bad_flag_value_names_the_flag_and_the_form() {
    for (args, expected) in [
        (
            ["--seconds", "15,8"],
            "--seconds: `15,8` is not one number of seconds, e.g. 15",
        ),
        (
            ["--rates", "1000,fast"],
            "--rates: `fast` is not requests per second, e.g. 1000,5000",
        ),
        (
            ["--reps", "-1"],
            "--reps: `-1` is not a whole number, e.g. 3",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_mesh-bench"))
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The first line: a RUST_BACKTRACE in the environment adds a backtrace after it.
        let first = stderr.lines().next().unwrap_or_default();
        assert_eq!(first, format!("Error: {expected}"), "{args:?}: {stderr}");
    }
}
