//! The sidecar's local listeners against a web page on the same machine (curl plays the
//! browser): an `Origin` not allowed is refused on the admin port and the events API, a DNS
//! name in `Host` is refused on the admin port (DNS rebinding), and `POST /shutdown` needs
//! `sinew-admin: 1`.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

/// curl's answer: status and the `sinew-error` header.
fn curl(method: &str, url: &str, headers: &[&str]) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args([
        "-sS",
        "--max-time",
        "20",
        "-o",
        "/dev/null",
        "-D",
        "-",
        "-X",
        method,
    ]);
    for header in headers {
        command.args(["-H", header]);
    }
    if method == "POST" {
        command.args(["--data-binary", "hello"]);
    }
    let output = command.arg(url).output().expect("curl is installed");
    let head = String::from_utf8_lossy(&output.stdout).to_string();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no answer from {url}: {output:?}"));
    let reason = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("sinew-error:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, reason)
}

fn admin_url(admin: SocketAddr, path: &str) -> String {
    format!("http://{admin}{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_cannot_drive_the_admin_port_or_the_events_api() {
    let mesh = Mesh::start("local-guard");
    let client = http_client();
    let out = mesh.apply(
        "kind: Subscription\nname: orders-created\nspec:\n  topic: order.created\n  service: orders\n",
    );
    assert!(out.status.success(), "{out:?}");
    let app = mesh.app("orders-1");
    let mut sidecar = mesh.sidecar(
        "orders-1",
        "orders",
        app.addr("http"),
        &["--allowed-origins", "http://dash.local:3000"],
    );
    wait_ready(&client, &sidecar).await;
    let admin = sidecar.addr("admin");
    let outbound = sidecar.addr("outbound");
    let evil = "Origin: http://evil.example";
    let events = format!("http://{outbound}/v1/events/order.created");

    // A page's cross-site POST to /shutdown: refused, the sidecar keeps running.
    let answer = curl(
        "POST",
        &admin_url(admin, "/shutdown"),
        &[evil, "sinew-admin: 1"],
    );
    assert_eq!(answer, (403, "origin-not-allowed".into()));
    // Reads too: a page learns nothing from the admin port.
    let answer = curl("GET", &admin_url(admin, "/config"), &[evil]);
    assert_eq!(answer, (403, "origin-not-allowed".into()));
    // A page publishing an event.
    let answer = curl("POST", &events, &[evil, "content-type: text/plain"]);
    assert_eq!(answer, (403, "origin-not-allowed".into()));
    // DNS rebinding: the page's own name pointing at 127.0.0.1, no Origin (same-origin GET).
    let answer = curl(
        "GET",
        &admin_url(admin, "/config"),
        &[&format!("Host: rebind.evil.example:{}", admin.port())],
    );
    assert_eq!(answer, (403, "host-not-allowed".into()));
    // ... on the events port, such a request is a mesh request to a service of that name,
    // never a publish.
    let answer = curl(
        "POST",
        &format!("http://{outbound}/v1/events/order.created"),
        &["Host: rebind.evil.example", "content-type: text/plain"],
    );
    assert_ne!(answer.0, 202, "{answer:?}");
    // /shutdown without the header a page cannot send.
    let answer = curl("POST", &admin_url(admin, "/shutdown"), &[]);
    assert_eq!(answer, (403, "admin-header-required".into()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sidecar.is_running(), "the sidecar is still running");
    let ready = get(&client, admin, "localhost", "/ready").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());

    // What local programs do keeps working: loopback names and IPs, no Origin.
    for host in ["localhost", "127.0.0.1"] {
        let answer = curl(
            "GET",
            &admin_url(admin, "/metrics"),
            &[&format!("Host: {host}:{}", admin.port())],
        );
        assert_eq!(answer.0, 200, "Host {host}");
    }
    let answer = curl("POST", &events, &["content-type: text/plain"]);
    assert_eq!(answer.0, 202);
    // An allowed origin is answered.
    let dash = "Origin: http://dash.local:3000";
    assert_eq!(curl("GET", &admin_url(admin, "/ready"), &[dash]).0, 200);
    assert_eq!(
        curl("POST", &events, &[dash, "content-type: text/plain"]).0,
        202
    );
    let refused = metric(&client, admin, "sinew_local_refused_total").await;
    assert_eq!(refused, 5.0, "every refusal counted");

    // With the header: the sidecar drains and exits 0.
    let answer = curl("POST", &admin_url(admin, "/shutdown"), &["sinew-admin: 1"]);
    assert_eq!(answer.0, 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sidecar.is_running() {
        assert!(Instant::now() < deadline, "the sidecar did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
