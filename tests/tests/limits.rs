//! The control plane's limits against the real binary: idle connections, a slowloris and a
//! silent gRPC client do not keep it from serving sidecars; an Update with 300 instances
//! carrying the largest labels allowed reaches (and is ACKed by) every stream, a real
//! sidecar's included.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use sinew_proto::v1::admin_api_client::AdminApiClient;
use sinew_proto::v1::sidecar_api_client::SidecarApiClient;
use sinew_proto::v1::{
    Ack, Hello, SidecarMessage, SidecarStatus, StatusRequest, control_message, sidecar_message,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Idle connections opened to each control-plane port.
const IDLE: usize = 2000;

/// Raises this process's open-file limit (inherited by the processes it starts) to `want`,
/// or as far as the hard limit allows.
#[allow(unsafe_code)]
fn raise_fd_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Whether the peer closed `stream` (EOF or a reset), reading whatever it sent first.
fn closed_by_peer(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Waits (up to 30 s) for the server to close `stream`; true if it did.
async fn wait_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_stop_a_sidecar_from_joining() {
    raise_fd_limit(20_000);
    // A handshake timeout longer than the test: the idle connections stay open throughout.
    let mesh = Mesh::start_opts("idle-connections", "1s", &["--handshake-timeout", "5m"]);
    let mut idle = Vec::with_capacity(2 * IDLE);
    for addr in [mesh.grpc, mesh.http] {
        for _ in 0..IDLE {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
    }
    let client = http_client();
    let app = mesh.app("orders-1");
    let started = Instant::now();
    let sidecar = mesh.sidecar("orders-1", "orders", app.addr("http"), &[]);
    wait_ready(&client, &sidecar).await;
    eprintln!(
        "FIGURES | a sidecar joined with {IDLE} idle connections on each port in {:?}",
        started.elapsed()
    );
    let still_open = idle.iter().filter(|s| !closed_by_peer(s)).count();
    assert_eq!(
        still_open,
        idle.len(),
        "the idle connections were open while the sidecar joined"
    );
    let answer = get(&client, mesh.http, "localhost", "/healthz")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_on_the_http_port_is_cut_at_the_timeout() {
    let mesh = Mesh::start_opts("slowloris", "1s", &["--handshake-timeout", "2s"]);
    let mut slow = TcpStream::connect(mesh.http).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    // One byte every 500 ms, for at most 30 s, until the server closes the connection.
    let mut cut = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if closed_by_peer(&slow) || slow.write_all(b"a").await.is_err() {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a header sent a byte every 500 ms was still open after 30 s"
    );
    // The port still serves.
    let answer = get(&http_client(), mesh.http, "localhost", "/healthz")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_connection_without_the_preface_is_closed_after_the_deadline() {
    let mesh = Mesh::start_opts("no-preface", "1s", &["--handshake-timeout", "2s"]);
    let mut silent = TcpStream::connect(mesh.grpc).await.unwrap();
    let mut half = TcpStream::connect(mesh.grpc).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(
        wait_closed(&mut silent).await,
        "a connection that sent nothing"
    );
    assert!(
        wait_closed(&mut half).await,
        "a connection that sent half the preface"
    );
    // Real clients still get through.
    let output = mesh.sinewctl(&["status"]);
    assert!(output.status.success(), "{output:?}");
}

// ----- the size of an Update -----

/// Instances registered by the test's own streams.
const INSTANCES: usize = 300;

/// The largest labels a Hello may carry: 32 labels, keys of 63 bytes, 4,096 bytes in all.
fn largest_labels(i: usize) -> HashMap<String, String> {
    use sinew_proto::limits::{MAX_LABEL_KEY, MAX_LABELS, MAX_LABELS_BYTES};
    let value_len = MAX_LABELS_BYTES / MAX_LABELS - MAX_LABEL_KEY;
    (0..MAX_LABELS)
        .map(|l| {
            let key = format!("{l:0>width$}", width = MAX_LABEL_KEY);
            let value = format!("{i:0>width$}", width = value_len);
            (key, value)
        })
        .collect()
}

/// One fake sidecar: sends its Hello, ACKs every Update as a sidecar would, and keeps the
/// last version it ACKed.
async fn instance(channel: tonic::transport::Channel, token: String, i: usize) -> Arc<AtomicU64> {
    let acked = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel(16);
    let hello = Hello {
        // Node ids and zones as long as allowed, too.
        node_id: format!("{i:0>253}"),
        service: "big".into(),
        instance_addr: format!("127.0.0.1:{}", 20_000 + i),
        zone: "z".repeat(253),
        labels: largest_labels(i),
        ..Hello::default()
    };
    sinew_proto::limits::check_labels(&hello.labels).unwrap();
    tx.send(SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(hello)),
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut updates = SidecarApiClient::new(channel)
        .max_decoding_message_size(sinew_proto::limits::MAX_UPDATE_BYTES)
        .connect(request)
        .await
        .unwrap()
        .into_inner();
    let last = acked.clone();
    tokio::spawn(async move {
        while let Ok(Some(message)) = updates.message().await {
            if let Some(control_message::Kind::Update(update)) = message.kind {
                let ack = sidecar_message::Kind::Ack(Ack {
                    version: update.version,
                    nonce: update.nonce.clone(),
                });
                if tx.send(SidecarMessage { kind: Some(ack) }).await.is_err() {
                    return;
                }
                last.store(update.version, Ordering::Relaxed);
            }
        }
    });
    acked
}

async fn status(mesh: &Mesh) -> Vec<SidecarStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(StatusRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", mesh.admin_token()).parse().unwrap(),
    );
    AdminApiClient::new(channel)
        .status(request)
        .await
        .unwrap()
        .into_inner()
        .sidecars
}

/// The version `sinewctl apply` reports.
fn applied_version(output: &std::process::Output) -> u64 {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("version ")?.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_instances_with_the_largest_labels_reach_every_sidecar() {
    let mesh = Mesh::start("largest-labels");
    // The instances see their own service's policy, not each other: each join would
    // otherwise resend all of them to all of them.
    applied_version(&mesh.apply("kind: Service\nname: big\nspec: {calls: []}\n"));
    let token = std::fs::read_to_string(mesh.dir().join("control/join-token"))
        .unwrap()
        .trim()
        .to_string();
    let mut channels = Vec::new();
    for _ in 0..10 {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.grpc)).unwrap();
        channels.push(endpoint.connect().await.unwrap());
    }
    let mut acked = Vec::new();
    for i in 0..INSTANCES {
        acked.push(instance(channels[i % channels.len()].clone(), token.clone(), i).await);
    }
    // A real sidecar whose scope (no policy: every service) includes all 300.
    let client = http_client();
    let web = mesh.sidecar("web-1", "web", "127.0.0.1:9".parse().unwrap(), &[]);
    wait_ready(&client, &web).await;
    wait_endpoints(&client, &web, "big", INSTANCES).await;
    // A change every stream sees, at a version that has all 300.
    let version =
        applied_version(&mesh.apply("kind: Service\nname: big\nspec: {calls: [], timeout: 3s}\n"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sidecars = status(&mesh).await;
        let behind: Vec<&SidecarStatus> = sidecars
            .iter()
            .filter(|s| !(s.connected && s.state == "ACK" && s.applied_version >= version))
            .collect();
        if sidecars.len() == INSTANCES + 1 && behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} sidecars in status, {} not at an ACKed version {version} after 60 s, e.g. {:?}",
            sidecars.len(),
            behind.len(),
            behind.first()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(acked.iter().all(|a| a.load(Ordering::Relaxed) >= version));
    assert_eq!(
        endpoints(&client, web.addr("admin"), "big").await.len(),
        INSTANCES
    );
    assert!(
        !web.log_text().contains("decoded message length too large"),
        "{}",
        web.log_text()
    );
}
