//! Traffic through two sidecars: curl and hyper -> sidecar -> QUIC mTLS -> sidecar -> app.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use sinew_e2e::*;
use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl is installed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_round_trip_status_headers_and_32_mib_body() {
    let p = pair("round-trip", 1).await;
    let outbound = p.web.addr("outbound");
    let body: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = p.mesh.dir().join("body.bin");
    std::fs::write(&file, &body).unwrap();
    let out_file = p.mesh.dir().join("echoed.bin");
    let headers_file = p.mesh.dir().join("headers.txt");

    // Origin form, routed by Host; the app echoes headers as `echo-*` and the body back.
    let output = curl(&[
        "-H",
        "Host: orders:8080",
        "-H",
        "x-custom: hello mesh",
        "-H",
        "sinew-caller: spiffe://sinew.local/svc/admin",
        "-H",
        "Connection: x-private",
        "-H",
        "x-private: must-not-cross",
        "--data-binary",
        &format!("@{}", file.display()),
        "-o",
        out_file.to_str().unwrap(),
        "-D",
        headers_file.to_str().unwrap(),
        "-w",
        "%{http_code}",
        &format!("http://{outbound}/echo"),
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200", "{output:?}");
    let echoed = std::fs::read(&out_file).unwrap();
    assert_eq!(echoed.len(), body.len());
    assert!(echoed == body, "the 32 MiB body changed on the way");
    let headers = std::fs::read_to_string(&headers_file)
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("echo-x-custom: hello mesh"), "{headers}");
    assert!(headers.contains("echo-host: orders"), "{headers}");
    assert!(
        !headers.contains("x-private"),
        "hop-by-hop header crossed: {headers}"
    );
    // The app's claim of an identity is replaced by the verified one.
    assert!(
        headers.contains("echo-sinew-caller: spiffe://sinew.local/svc/web"),
        "{headers}"
    );
    assert!(!headers.contains("svc/admin"), "{headers}");

    // Absolute form, as an HTTP proxy; a status that is not 200 comes through unchanged.
    let output = curl(&[
        "-x",
        &format!("http://{outbound}"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://orders/status/418",
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "418");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_256_mib_each_way_with_bounded_memory() {
    let p = pair("stream-256", 1).await;
    let outbound = p.web.addr("outbound");
    let (app, orders) = &p.orders[0];
    let sidecars = [p.web.pid, orders.pid];
    let sample = |peak: &mut [u64; 2]| {
        for (i, pid) in sidecars.iter().enumerate() {
            peak[i] = peak[i].max(proc_status_kib(*pid, "VmRSS:"));
        }
    };
    let size: u64 = 256 << 20;

    // Download: curl reads 256 MiB that the app streams.
    let mut child = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            "-H",
            "Host: orders",
        ])
        .arg(format!("http://{outbound}/bytes?n={size}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak = [0u64; 2];
    while child.try_wait().unwrap().is_none() {
        sample(&mut peak);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("200 {size}")
    );

    // Upload: a streaming body of 256 MiB, which the app hashes.
    let chunk = Bytes::from(vec![7u8; 1 << 20]);
    let stream =
        futures_util::stream::iter((0..256).map(move |_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))
        }));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let request = http::Request::post(format!("http://{outbound}/sink"))
        .header("host", "orders")
        .body(StreamBody::new(stream))
        .unwrap();
    let upload = tokio::spawn(async move {
        let response = client.request(request).await.unwrap();
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    });
    while !upload.is_finished() {
        sample(&mut peak);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, answer) = upload.await.unwrap();
    assert_eq!(status, 200);
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with(&format!("{size} ")), "{answer}");
    eprintln!(
        "peak RSS: web sidecar {} KiB, orders sidecar {} KiB (app {} KiB)",
        peak[0],
        peak[1],
        app.rss_kib()
    );
    for (i, kib) in peak.iter().enumerate() {
        assert!(*kib > 0, "no RSS sample for sidecar {i}");
        assert!(
            *kib < 64 * 1024,
            "sidecar {i} peaked at {kib} KiB while streaming"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_instances_receive_requests() {
    let p = pair("two-instances", 2).await;
    let outbound = p.web.addr("outbound");
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let answer = get(&p.client, outbound, "orders", "/whoami").await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        seen.insert(answer.text());
    }
    assert_eq!(
        seen,
        HashSet::from(["orders-1".to_string(), "orders-2".to_string()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_gets_a_clear_error() {
    let p = pair("unknown-service", 1).await;
    let answer = get(&p.client, p.web.addr("outbound"), "nosuch", "/")
        .await
        .unwrap();
    assert_eq!(answer.status, 404);
    assert_eq!(answer.header("sinew-error"), Some("unknown-service"));
    assert!(
        answer.text().contains("unknown service `nosuch`"),
        "{}",
        answer.text()
    );
    // A request with no Host at all is refused by hyper or by the sidecar, never forwarded.
    let output = curl(&[
        "--http1.0",
        "-H",
        "Host:",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{}/", p.web.addr("outbound")),
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "400");
    let _ = Full::new(Bytes::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_or_a_vanished_client_cancels_the_request_upstream() {
    let p = pair("cancel", 1).await;
    p.apply("kind: Service\nname: orders\nspec: {timeout: 300ms}\n")
        .await;
    let outbound = p.web.addr("outbound");
    for _ in 0..5 {
        let answer = get(&p.client, outbound, "orders", "/slow?ms=5000")
            .await
            .unwrap();
        assert_eq!(answer.status, 504);
        assert_eq!(answer.header("sinew-error"), Some("timeout"));
    }
    let orders_admin = p.orders[0].1.addr("admin");
    wait_until(
        "the orders sidecar to cancel the 5 app requests",
        Duration::from_secs(5),
        || async { metric(&p.client, orders_admin, "sinew_inbound_cancelled_total").await >= 5.0 },
    )
    .await;

    // A client that reads a little of an endless download and leaves.
    let request = http::Request::get(format!("http://{outbound}/bytes?n={}", 1u64 << 40))
        .header("host", "orders")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = p.client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data(), "the download is streaming");
    drop(body);
    wait_until(
        "the orders sidecar to cancel the download",
        Duration::from_secs(10),
        || async { metric(&p.client, orders_admin, "sinew_inbound_cancelled_total").await >= 6.0 },
    )
    .await;
    // The instance still serves.
    let answer = get(&p.client, outbound, "orders", "/whoami").await.unwrap();
    assert_eq!(answer.status, 200);
}
