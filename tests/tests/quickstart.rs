//! The README's quick start: `sinewctl up examples/quickstart.yaml`, a request to web that
//! crosses the mesh, and nothing left running after Ctrl-C.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[allow(unsafe_code)]
fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid we started; no memory is touched.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// The quick start binds fixed ports: one run at a time.
static FIXED_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_comes_up_serves_and_leaves_nothing_behind() {
    quickstart(false).await;
}

/// The same quick start with `events: {backend: nats}` added to the file: the events go
/// through a real NATS JetStream server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_with_events_through_nats() {
    quickstart(true).await;
}

async fn quickstart(through_nats: bool) {
    let _one_at_a_time = FIXED_PORTS.lock().await;
    let scratch = Scratch::new(if through_nats {
        "quickstart-nats"
    } else {
        "quickstart"
    });
    let mut file = workspace_root().join("examples/quickstart.yaml");
    let _nats = through_nats.then(|| {
        let nats = Nats::start("quickstart", &scratch.0);
        let text = std::fs::read_to_string(&file).unwrap();
        let copy = scratch.0.join("quickstart-nats.yaml");
        std::fs::write(
            &copy,
            format!(
                "{text}\nevents: {{backend: nats, url: '{}', prefix: {}}}\n",
                nats.url, nats.prefix
            ),
        )
        .unwrap();
        file = copy;
        nats
    });
    let mut up = Command::new(bin("sinewctl"));
    up.arg("up")
        .arg(&file)
        .current_dir(&scratch.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut up, 0);
    let mut up = up.spawn().unwrap();
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            signal(self.0, libc::SIGTERM);
        }
    }
    let _guard = KillOnDrop(up.id());

    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("`mesh ready` within 120 s");
        if line == "mesh ready" {
            break;
        }
        lines.push(line);
    }
    let pids: Vec<u32> = lines
        .iter()
        .filter_map(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix("pid=")))
        .map(|pid| pid.parse().unwrap())
        .collect();
    // control + (sidecar + app) × (2 orders + 2 billing + 1 web)
    assert_eq!(pids.len(), 11, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.starts_with("control control pid=")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("sidecar web-1 pid=") && l.contains("outbound=127.0.0.1:4140")),
        "{lines:#?}"
    );

    let client = http_client();
    let mut served_by = std::collections::HashSet::new();
    for _ in 0..6 {
        let answer = get(
            &client,
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:8080",
            "/",
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert!(
            answer.text().starts_with("web got from orders: "),
            "{}",
            answer.text()
        );
        let body = answer.text();
        served_by.insert(
            body.split("served_by\":\"")
                .nth(1)
                .unwrap_or_default()
                .split('"')
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(
        served_by.len(),
        2,
        "both orders instances serve: {served_by:?}"
    );
    // Each order served was published as `order.created`; billing's two instances share
    // them. Ask through web's sidecar until the six have arrived.
    let outbound = "127.0.0.1:4140".parse().unwrap();
    let mut counts = std::collections::HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while counts.values().sum::<u64>() < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "billing got {counts:?}"
        );
        let answer = get(&client, outbound, "billing", "/received")
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        counts.insert(
            v["served_by"].as_str().unwrap_or_default().to_string(),
            v["count"].as_u64().unwrap_or(0),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("billing instances received {counts:?}");

    signal(up.id(), libc::SIGINT);
    let status = up.wait().unwrap();
    assert!(status.success(), "sinewctl up exited with {status:?}");
    // The reader thread may still hold the last lines when `up` has exited: read until it
    // sees the end of the output (the channel closes), bounded in time.
    let mut rest = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while let Ok(line) = rx.recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
    {
        rest.push(line);
    }
    assert!(rest.contains(&"mesh stopped".to_string()), "{rest:?}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} outlived `sinewctl up`"
        );
    }
}
