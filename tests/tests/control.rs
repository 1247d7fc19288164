//! The control loop end to end: policy reaches sidecars and is ACKed, bad policy is refused
//! or NACKed while the last good one serves, the control plane can die and come back,
//! sidecars restart from their disk cache, and vanished instances leave endpoint sets.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use sinew_proto::v1::sidecar_api_server::{SidecarApi, SidecarApiServer};
use sinew_proto::v1::{
    CertificateRequest, CertificateResponse, ControlMessage, ServiceResource, SidecarMessage,
    Update, control_message, sidecar_message,
};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};

async fn version(p: &Pair, sidecar: &Proc) -> u64 {
    config(&p.client, sidecar.addr("admin")).await["version"]
        .as_u64()
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_policy_reaches_the_sidecar_and_is_acked_invalid_policy_is_refused() {
    let p = pair("apply", 1).await;
    let before = version(&p, &p.web).await;
    let policy = p.mesh.dir().join("policy.yaml");
    std::fs::write(
        &policy,
        "kind: Service\nname: orders\nspec:\n  timeout: 3s\n  allow: [web]\n",
    )
    .unwrap();
    let output = p.mesh.sinewctl(&["apply", "-f", policy.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout(&output).contains("service/orders created"),
        "{}",
        stdout(&output)
    );

    let admin = p.web.addr("admin");
    wait_until(
        "the new policy in web's /config",
        Duration::from_secs(10),
        || async {
            let config = config(&p.client, admin).await;
            config["version"].as_u64().unwrap() > before
                && config["services"]["orders"]["policy"]["timeout"] == "3s"
        },
    )
    .await;
    let applied = version(&p, &p.web).await;
    // The allow list lets web in.
    let answer = get(&p.client, p.web.addr("outbound"), "orders", "/whoami")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);

    let mut acked = false;
    for _ in 0..100 {
        let status = stdout(&p.mesh.sinewctl(&["status"]));
        let line = status
            .lines()
            .find(|l| l.starts_with("web-1"))
            .unwrap_or_default()
            .to_string();
        if line.contains("ACK") && line.contains(&applied.to_string()) {
            acked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        acked,
        "status never showed web-1 ACKing {applied}:\n{}",
        stdout(&p.mesh.sinewctl(&["status"]))
    );

    // Invalid: refused with the field path; nothing changes.
    std::fs::write(&policy, "kind: Service\nname: orders\nspec:\n  timeout: 3s\n---\nkind: Service\nname: web\nspec: {connect_timeout: soon}\n").unwrap();
    let output = p.mesh.sinewctl(&["apply", "-f", policy.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("document 2 (Service web): spec.connect_timeout"),
        "{stderr}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(version(&p, &p.web).await, applied);

    // A policy that forbids web is enforced by the orders sidecar.
    p.apply("kind: Service\nname: orders\nspec: {allow: [billing]}\n")
        .await;
    let answer = get(&p.client, p.web.addr("outbound"), "orders", "/whoami")
        .await
        .unwrap();
    assert_eq!(answer.status, 403);
    assert_eq!(answer.header("sinew-error"), Some("forbidden"));
}

/// A control plane that answers Hello with a good snapshot, then one the sidecar cannot
/// apply (a policy field it does not know, as from a newer control plane).
struct SkewedControl {
    seen: mpsc::UnboundedSender<SidecarMessage>,
}

type Updates = Pin<Box<dyn Stream<Item = Result<ControlMessage, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl SidecarApi for SkewedControl {
    type ConnectStream = Updates;

    async fn connect(
        &self,
        request: tonic::Request<tonic::Streaming<SidecarMessage>>,
    ) -> Result<tonic::Response<Updates>, tonic::Status> {
        let mut incoming = request.into_inner();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = incoming.message().await {
                let _ = seen.send(message);
            }
        });
        let service = |policy: &str| ServiceResource {
            name: "orders".into(),
            policy_json: policy.into(),
            endpoints: vec![],
        };
        let good = Update {
            version: 1000,
            nonce: "a".into(),
            full: true,
            services: vec![service(r#"{"timeout":"4s"}"#)],
            removed_services: vec![],
            base_version: 0,
            ..Update::default()
        };
        let bad = Update {
            version: 1001,
            nonce: "b".into(),
            full: false,
            services: vec![service(r#"{"timeout":"1s","mirror":{"to":"shadow"}}"#)],
            removed_services: vec![],
            base_version: 1000,
            ..Update::default()
        };
        let updates = [good, bad].map(|u| {
            Ok(ControlMessage {
                kind: Some(control_message::Kind::Update(u)),
            })
        });
        // Keep the stream open after the two updates.
        let stream = tokio_stream::iter(updates).chain(tokio_stream::pending());
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn issue_certificate(
        &self,
        _: tonic::Request<CertificateRequest>,
    ) -> Result<tonic::Response<CertificateResponse>, tonic::Status> {
        Err(tonic::Status::unavailable(
            "this control plane issues no certificates",
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_the_sidecar_cannot_apply_is_nacked_and_the_last_good_one_serves() {
    let p = pair("nack", 1).await;
    // web now has a certificate in its data dir; move it to a control plane from the future.
    let mut web = p.web;
    assert!(web.terminate().success());
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let skewed = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SidecarApiServer::new(SkewedControl { seen: seen_tx }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let web = p.mesh.sidecar(
        "web-1",
        "web",
        "127.0.0.1:9".parse().unwrap(),
        &["--control", &skewed.to_string()],
    );

    let mut replies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while replies.len() < 3 {
        let message = tokio::time::timeout_at(deadline.into(), seen.recv())
            .await
            .expect("hello, ack and nack within 20 s");
        match message.unwrap().kind.unwrap() {
            // The sidecar also reports its certificate (for `sinewctl status` and `check`).
            sidecar_message::Kind::Certificate(_) => {}
            kind => replies.push(kind),
        }
    }
    assert!(matches!(&replies[0], sidecar_message::Kind::Hello(h) if h.service == "web"));
    assert!(
        matches!(&replies[1], sidecar_message::Kind::Ack(a) if a.version == 1000 && a.nonce == "a"),
        "{:?}",
        replies[1]
    );
    let sidecar_message::Kind::Nack(nack) = &replies[2] else {
        panic!("expected a NACK, got {:?}", replies[2])
    };
    assert_eq!((nack.version, nack.nonce.as_str()), (1001, "b"));
    assert!(
        nack.error.contains("unknown field `mirror`"),
        "{}",
        nack.error
    );

    let config = config(&p.client, web.addr("admin")).await;
    assert_eq!(config["version"], 1000);
    assert_eq!(config["services"]["orders"]["policy"]["timeout"], "4s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_the_control_plane_and_sidecars_resync_when_it_returns() {
    let mut p = pair("control-down", 1).await;
    p.mesh.control_mut().kill();
    let outbound = p.web.addr("outbound");
    for i in 0..100 {
        let answer = get(&p.client, outbound, "orders", "/whoami").await.unwrap();
        assert_eq!(
            answer.status,
            200,
            "request {i} with the control plane down: {}",
            answer.text()
        );
    }
    let admin = p.web.addr("admin");
    wait_until(
        "web to notice the control plane is gone",
        Duration::from_secs(10),
        || async { config(&p.client, admin).await["control_connected"] == false },
    )
    .await;

    p.mesh.start_control();
    wait_until("web to reconnect", Duration::from_secs(40), || async {
        config(&p.client, admin).await["control_connected"] == true
    })
    .await;
    let mut listed = false;
    for _ in 0..100 {
        let status = stdout(&p.mesh.sinewctl(&["status"]));
        if status
            .lines()
            .any(|l| l.starts_with("web-1") && l.contains("ACK"))
        {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        listed,
        "web-1 not back in status:\n{}",
        stdout(&p.mesh.sinewctl(&["status"]))
    );
    let answer = get(&p.client, outbound, "orders", "/whoami").await.unwrap();
    assert_eq!(answer.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_restarted_without_a_control_plane_serves_from_its_disk_cache() {
    let mut p = pair("disk-cache", 1).await;
    p.mesh.control_mut().kill();
    assert!(p.web.terminate().success(), "SIGTERM should exit 0");
    let web = p
        .mesh
        .sidecar("web-1", "web", "127.0.0.1:9".parse().unwrap(), &[]);
    wait_ready(&p.client, &web).await;
    let answer = get(&p.client, web.addr("outbound"), "orders", "/whoami")
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "orders-1");
    assert!(web.log_text().contains("cached"), "{}", web.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_withdraws_at_once_finishes_in_flight_requests_then_exits_0() {
    // A lease grace far longer than the test: leaving quickly must come from the withdrawal.
    let mut p = pair_with("sigterm", 1, "60s").await;
    let outbound = p.web.addr("outbound");
    let client = p.client.clone();
    let slow = tokio::spawn(async move { get(&client, outbound, "orders", "/slow?ms=1500").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let sidecar_pid = p.orders[0].1.pid;
    let (_app, mut sidecar) = p.orders.remove(0);
    let terminated = tokio::task::spawn_blocking(move || sidecar.terminate());
    let admin = p.web.addr("admin");
    let withdrawn = Instant::now();
    wait_until(
        "web to drop the draining instance",
        Duration::from_secs(10),
        || async { endpoints(&p.client, admin, "orders").await.is_empty() },
    )
    .await;
    eprintln!(
        "withdrawn after {:?} (lease grace 60 s); sidecar pid {sidecar_pid}",
        withdrawn.elapsed()
    );
    let answer = slow.await.unwrap().unwrap();
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (200, "slow"),
        "the in-flight request finished"
    );
    let status = terminated.await.unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_endpoint_sets_after_the_lease_grace() {
    let mut p = pair_with("lease", 2, "3s").await;
    let killed_at = Instant::now();
    p.orders[1].1.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        endpoints(&p.client, p.web.addr("admin"), "orders")
            .await
            .len(),
        2,
        "removed before the grace ran out"
    );
    wait_endpoints(&p.client, &p.web, "orders", 1).await;
    let gone_after = killed_at.elapsed();
    assert!(
        gone_after >= Duration::from_secs(3),
        "gone after {gone_after:?}, before the 3 s grace"
    );
    let remaining = endpoints(&p.client, p.web.addr("admin"), "orders").await;
    assert_eq!(remaining, [p.orders[0].1.addr("inbound").to_string()]);
}
