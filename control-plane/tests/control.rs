//! The control plane in-process on 127.0.0.1:0, driven by real tonic clients: the sidecar
//! protocol (Hello, Updates, Ack/Nack, leases), the admin API, the CA, restarts, policy
//! files, and the HTTP port.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use sinew_proto::v1::sidecar_api_client::SidecarApiClient;
use sinew_proto::v1::{CertificateRequest, Health, SidecarMessage, sidecar_message};
use std::time::Duration;
use tonic::Code;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

const ORDERS: &str = "kind: Service\nname: orders\nspec: {timeout: 3s}\n";

#[tokio::test]
async fn hello_gets_the_full_view_then_deltas_and_acks_nacks_are_recorded() {
    let dir = temp_dir("push");
    let control = start(&dir, Duration::from_secs(10)).await;
    let mut admin = Admin::new(&control).await;
    admin.apply(ORDERS).await.unwrap();

    let mut web = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    let full = web.next_update().await;
    assert!(full.full);
    assert!(!full.nonce.is_empty());
    assert_eq!(names(&full), ["orders", "web"]);
    let orders = &full.services[0];
    assert!(
        orders.policy_json.contains("\"timeout\":\"3s\""),
        "{}",
        orders.policy_json
    );
    assert!(orders.endpoints.is_empty());
    let me = &full.services[1];
    assert_eq!(me.policy_json, "");
    assert_eq!(me.endpoints.len(), 1);
    assert_eq!(me.endpoints[0].node_id, "web-1");
    assert_eq!(me.endpoints[0].addr, "127.0.0.1:4005");
    assert_eq!(me.endpoints[0].zone, "z1");
    assert_eq!(me.endpoints[0].identity, "spiffe://sinew.local/svc/web");

    let pending = admin.sidecar("web-1").await.unwrap();
    assert!(pending.connected && pending.connected_since_unix_ms > 0);
    assert_eq!(pending.service, "web");
    assert_eq!(pending.instance_addr, "127.0.0.1:4005");
    assert_eq!(pending.sent_version, full.version);

    web.ack(&full).await;
    let acked = admin
        .wait_for_sidecar("web-1", "ACK", |s| s.state == "ACK")
        .await;
    assert_eq!(acked.applied_version, full.version);

    // A policy change reaches the stream as a delta carrying only the changed service.
    let applied = admin
        .apply("kind: Service\nname: orders\nspec: {timeout: 2s}\n")
        .await
        .unwrap();
    assert_eq!(applied.documents[0].outcome, "changed");
    let delta = web.next_update().await;
    assert!(!delta.full);
    assert_eq!(names(&delta), ["orders"]);
    assert!(delta.removed_services.is_empty());
    assert!(delta.version > full.version);
    assert_eq!(delta.version, applied.version);
    assert_ne!(delta.nonce, full.nonce);
    assert!(delta.services[0].policy_json.contains("\"timeout\":\"2s\""));

    web.nack(&delta, "spec.timeout: too short for me").await;
    // A refused delta may have failed for lack of its base: the whole view goes at once.
    let resync = web.next_update().await;
    assert!(resync.full, "a NACKed delta is answered with a full update");
    assert_eq!(resync.version, delta.version);
    assert_eq!(names(&resync), ["orders", "web"]);
    // Refusing that too leaves the sidecar on its last good version until the next change.
    web.nack(&resync, "spec.timeout: too short for me").await;
    web.expect_quiet(Duration::from_millis(300)).await;
    let nacked = admin
        .wait_for_sidecar("web-1", "NACK", |s| s.state == "NACK")
        .await;
    assert_eq!(nacked.last_nack_error, "spec.timeout: too short for me");
    assert_eq!(nacked.last_nack_version, delta.version);
    assert_eq!(
        nacked.applied_version, full.version,
        "the NACKed version is not applied"
    );

    // An Ack with a superseded nonce changes nothing.
    web.ack(&delta).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(admin.sidecar("web-1").await.unwrap().state, "NACK");

    // A second instance joins: web-1 sees its own service change; after a NACK the
    // control plane resends the whole view.
    let _orders1 = Sidecar::connect(&control, hello("orders-1", "orders"))
        .await
        .unwrap();
    let next = web.next_update().await;
    assert!(next.full, "after a NACK the next update is full");
    assert_eq!(names(&next), ["orders", "web"]);
    assert_eq!(
        next.services[0].endpoints[0].identity,
        "spiffe://sinew.local/svc/orders"
    );
    web.ack(&next).await;
    admin
        .wait_for_sidecar("web-1", "ACK again", |s| s.state == "ACK")
        .await;

    // A change outside the view is not sent.
    admin
        .apply("kind: Service\nname: web\nspec: {calls: [orders]}\n")
        .await
        .unwrap();
    let scoped = web.next_update().await;
    assert!(!scoped.full);
    // web keeps itself in view (its policy governs its inbound) and gets its new policy.
    assert!(scoped.removed_services.is_empty(), "{scoped:?}");
    assert_eq!(names(&scoped), ["web"]);
    admin.apply("kind: Service\nname: billing\n").await.unwrap();
    web.expect_quiet(Duration::from_millis(300)).await;

    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_first_message_must_be_a_valid_hello() {
    let dir = temp_dir("hello");
    let control = start(&dir, Duration::from_secs(10)).await;
    let health = SidecarMessage {
        kind: Some(sidecar_message::Kind::Health(Health { serving: true })),
    };
    let err = Sidecar::connect_with(&control, health).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("Hello"), "{}", err.message());

    let err = Sidecar::connect(&control, hello("n1", "Not_A_Name"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("hello.service"),
        "{}",
        err.message()
    );
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_dropped_stream_keeps_its_instance_for_the_grace_then_it_leaves() {
    let dir = temp_dir("lease");
    let control = start(&dir, Duration::from_millis(300)).await;
    let mut admin = Admin::new(&control).await;
    admin.apply(ORDERS).await.unwrap();

    let mut watcher = Sidecar::connect(&control, hello("orders-1", "orders"))
        .await
        .unwrap();
    assert_eq!(names(&watcher.next_update().await), ["orders"]);
    let mut web = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    web.next_update().await;
    let joined = watcher.next_update().await;
    assert_eq!(names(&joined), ["web"]);

    drop(web);
    // Still listed while the lease runs.
    let deadline = tokio::time::Instant::now() + WAIT;
    let instance = loop {
        let services = admin.services().await;
        let web = services
            .iter()
            .find(|s| s.name == "web")
            .expect("web listed during grace");
        assert!(!web.has_policy);
        let instance = web.instances[0].clone();
        if !instance.connected {
            break instance;
        }
        assert!(tokio::time::Instant::now() < deadline, "never disconnected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(instance.node_id, "web-1");
    assert!(instance.serving);
    assert!(instance.lease_expires_unix_ms > 0);
    let status = admin.sidecar("web-1").await.unwrap();
    assert!(!status.connected);

    // Then it leaves everyone's endpoint sets.
    let left = watcher.next_update().await;
    assert!(!left.full);
    assert_eq!(left.removed_services, ["web"]);
    let services = admin.services().await;
    assert!(services.iter().all(|s| s.name != "web"), "{services:?}");
    assert!(
        admin.sidecar("web-1").await.is_some(),
        "status keeps the record a while"
    );

    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn health_and_replacement_by_node_id() {
    let dir = temp_dir("health");
    let control = start(&dir, Duration::from_secs(10)).await;
    let mut admin = Admin::new(&control).await;
    let mut watcher = Sidecar::connect(&control, hello("orders-1", "orders"))
        .await
        .unwrap();
    watcher.next_update().await;
    let mut web = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    web.next_update().await;
    assert_eq!(names(&watcher.next_update().await), ["web"]);

    web.send(sidecar_message::Kind::Health(Health { serving: false }))
        .await;
    let gone = watcher.next_update().await;
    assert_eq!(gone.removed_services, ["web"], "not serving: no endpoint");
    let services = admin.services().await;
    let listed = services.iter().find(|s| s.name == "web").unwrap();
    assert!(!listed.instances[0].serving);

    web.send(sidecar_message::Kind::Health(Health { serving: true }))
        .await;
    assert_eq!(names(&watcher.next_update().await), ["web"]);

    // A new stream with the same node id replaces the old one, which ends.
    let mut again = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    assert!(again.next_update().await.full);
    // The old stream ends (after the updates already queued for it).
    tokio::time::timeout(WAIT, async {
        while let Ok(Some(_)) = web.updates.message().await {}
    })
    .await
    .expect("the replaced stream did not end");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = admin.sidecar("web-1").await.unwrap();
    assert!(
        status.connected,
        "the old stream ending does not start the lease"
    );
    watcher.expect_quiet(Duration::from_millis(200)).await;

    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn invalid_apply_is_refused_with_the_field_path_and_changes_nothing() {
    let dir = temp_dir("apply");
    let control = start(&dir, Duration::from_secs(10)).await;
    let mut admin = Admin::new(&control).await;
    let first = admin.apply(ORDERS).await.unwrap();
    assert_eq!(first.documents[0].kind, "Service");
    assert_eq!(first.documents[0].name, "orders");
    assert_eq!(first.documents[0].outcome, "created");
    let same = admin.apply(ORDERS).await.unwrap();
    assert_eq!(same.documents[0].outcome, "unchanged");
    assert_eq!(same.version, first.version, "nothing changed, same version");

    let bad =
        "kind: Service\nname: web\n---\nkind: Service\nname: orders\nspec: {timeout: 2 seconds}\n";
    let err = admin.apply(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("document 2 (Service orders): spec.timeout: "),
        "{}",
        err.message()
    );
    assert_eq!(admin.status().await.version, first.version);
    assert_eq!(
        admin.get("service", "web").await.unwrap_err().code(),
        Code::NotFound,
        "all or nothing"
    );
    assert!(
        admin
            .get("services", "orders")
            .await
            .unwrap()
            .contains("timeout: 3s")
    );

    let both = admin
        .apply("kind: Service\nname: web\n---\nkind: Service\nname: billing\n")
        .await
        .unwrap();
    assert!(both.version > first.version);
    let all = admin.get("Service", "").await.unwrap();
    assert_eq!(all.matches("---\n").count(), 2, "{all}");
    let parsed = sinew_proto::policy::parse_documents(&all).unwrap();
    let names: Vec<&str> = parsed.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["billing", "orders", "web"]);

    assert_eq!(
        admin.get("gateway", "").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let deleted = admin.delete("service", "web").await.unwrap();
    assert!(deleted > both.version);
    assert_eq!(
        admin.delete("service", "web").await.unwrap_err().code(),
        Code::NotFound
    );

    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_admin_api_needs_the_token() {
    let dir = temp_dir("auth");
    let control = start(&dir, Duration::from_secs(10)).await;
    let token_file = std::fs::read_to_string(dir.join("admin-token")).unwrap();
    assert_eq!(token_file.trim(), control.admin_token);

    let mut client =
        sinew_proto::v1::admin_api_client::AdminApiClient::new(channel(&control).await);
    let err = client
        .status(sinew_proto::v1::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(sinew_proto::v1::StatusRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(
        client.status(request).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn connect_needs_the_join_token() {
    let dir = temp_dir("connect-auth");
    let control = start(&dir, Duration::from_secs(10)).await;
    for token in [None, Some("wrong"), Some(control.admin_token.as_str())] {
        let mut client = SidecarApiClient::new(channel(&control).await);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(hello("intruder-1", "orders"))),
        })
        .await
        .unwrap();
        let stream = ReceiverStream::new(rx);
        let request = match token {
            Some(t) => with_join_token(stream, t),
            None => tonic::Request::new(stream),
        };
        let err = client.connect(request).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "token {token:?}");
    }
    // Nothing was registered.
    let mut admin = Admin::new(&control).await;
    assert!(admin.status().await.sidecars.is_empty());
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

fn csr(service_asked: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec![format!("{service_asked}.example.com")]).unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

async fn issue(
    control: &sinew_control::RunningControl,
    token: &str,
    service: &str,
    csr_pem: &str,
) -> Result<sinew_proto::v1::CertificateResponse, tonic::Status> {
    let mut client = SidecarApiClient::new(channel(control).await);
    client
        .issue_certificate(CertificateRequest {
            join_token: token.into(),
            service: service.into(),
            csr_pem: csr_pem.into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn certificates_carry_the_spiffe_identity_and_need_the_join_token() {
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::parse_x509_pem;

    let dir = temp_dir("ca");
    let control = start(&dir, Duration::from_secs(10)).await;
    let join = control.join_token.clone();
    assert_eq!(
        std::fs::read_to_string(dir.join("join-token"))
            .unwrap()
            .trim(),
        join
    );

    let err = issue(&control, "wrong", "orders", &csr("orders"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = issue(
        &control,
        &join,
        "orders",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("CSR"), "{}", err.message());
    let err = issue(&control, &join, "Bad Name", &csr("x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let issued = issue(&control, &join, "orders", &csr("admin"))
        .await
        .unwrap();
    assert_eq!(issued.spiffe_id, "spiffe://sinew.local/svc/orders");
    assert!((issued.not_after_unix - now - 24 * 3600).abs() < 60);

    let (_, leaf_pem) = parse_x509_pem(issued.certificate_pem.as_bytes()).unwrap();
    let leaf = leaf_pem.parse_x509().unwrap();
    let (_, ca_pem) = parse_x509_pem(issued.ca_pem.as_bytes()).unwrap();
    let ca = ca_pem.parse_x509().unwrap();

    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1, "exactly one SAN");
    assert!(matches!(
        san.value.general_names[0],
        GeneralName::URI("spiffe://sinew.local/svc/orders")
    ));
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.value.digital_signature());
    assert!(!leaf.is_ca());
    assert_eq!(leaf.issuer(), ca.subject());
    assert!(ca.is_ca());
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    assert!(leaf.validity().not_before.timestamp() <= now - 59);
    assert_eq!(leaf.validity().not_after.timestamp(), issued.not_after_unix);

    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_restart_on_the_same_data_dir_keeps_policy_ca_tokens_and_versions() {
    let dir = temp_dir("restart");
    let control = start(&dir, Duration::from_secs(10)).await;
    let mut admin = Admin::new(&control).await;
    let applied = admin.apply(ORDERS).await.unwrap();
    let first_ca = issue(&control, &control.join_token, "orders", &csr("a"))
        .await
        .unwrap()
        .ca_pem;
    let (admin_token, join_token) = (control.admin_token.clone(), control.join_token.clone());
    drop(admin);
    control.shutdown().await.unwrap();

    let control = start(&dir, Duration::from_secs(10)).await;
    assert_eq!(control.admin_token, admin_token);
    assert_eq!(control.join_token, join_token);
    let mut admin = Admin::new(&control).await;
    assert!(
        admin
            .get("service", "orders")
            .await
            .unwrap()
            .contains("timeout: 3s")
    );
    let again = issue(&control, &join_token, "orders", &csr("b"))
        .await
        .unwrap();
    assert_eq!(again.ca_pem, first_ca, "same CA");
    let status = admin.status().await;
    assert!(status.version >= applied.version);
    let mut web = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    let full = web.next_update().await;
    assert!(
        full.version > applied.version,
        "versions keep increasing across restarts"
    );
    assert_eq!(names(&full), ["orders", "web"]);
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn instances_survive_a_restart_until_their_lease_ends() {
    let dir = temp_dir("restart-instances");
    let control = start(&dir, Duration::from_secs(10)).await;
    let orders = Sidecar::connect(&control, hello("orders-1", "orders"))
        .await
        .unwrap();
    control.shutdown().await.unwrap();
    drop(orders);

    // Restarted: a sidecar that reconnects first still sees orders-1, whose own sidecar has
    // not come back yet; when orders-1's lease (restarted at boot) ends, it leaves.
    let control = start(&dir, Duration::from_millis(500)).await;
    let mut web = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    let full = web.next_update().await;
    let orders_resource = full
        .services
        .iter()
        .find(|s| s.name == "orders")
        .expect("orders is still known after the restart");
    assert_eq!(orders_resource.endpoints[0].node_id, "orders-1");
    let gone = web.next_update().await;
    assert!(!gone.full);
    assert!(
        gone.removed_services.contains(&"orders".to_string()),
        "{gone:?}"
    );
    control.shutdown().await.unwrap();

    // And a third start does not bring it back.
    let control = start(&dir, Duration::from_millis(500)).await;
    let mut web = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    assert_eq!(names(&web.next_update().await), ["web"]);
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn policy_files_are_loaded_and_reloaded() {
    let dir = temp_dir("files");
    let policy_dir = dir.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(
        policy_dir.join("a.yaml"),
        "kind: Service\nname: a\n---\nkind: Service\nname: b\n",
    )
    .unwrap();

    // An invalid file refuses the start.
    std::fs::write(
        policy_dir.join("bad.yml"),
        "kind: Service\nname: c\nspec: {timeout: 0ms}\n",
    )
    .unwrap();
    let config = sinew_control::Config {
        policy: Some(policy_dir.clone()),
        policy_poll_interval: Duration::from_millis(100),
        ..sinew_control::Config::local(dir.join("data"))
    };
    let err = sinew_control::serve(config.clone()).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("bad.yml: document 1 (Service c): spec.timeout"),
        "{text}"
    );
    std::fs::remove_file(policy_dir.join("bad.yml")).unwrap();

    let control = sinew_control::serve(config).await.unwrap();
    let mut admin = Admin::new(&control).await;
    assert!(admin.get("service", "b").await.is_ok());
    // The files are the policy: the admin API neither applies nor deletes.
    let refused = admin
        .apply("kind: Service\nname: manual\n")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().starts_with(&format!(
            "this control plane takes its policy from {} (sinew-control --policy)",
            policy_dir.display()
        )),
        "{refused:?}"
    );
    let refused = admin.delete("service", "a").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(admin.get("service", "a").await.is_ok());
    assert_eq!(
        admin.status().await.policy_source,
        policy_dir.display().to_string()
    );

    // A change: b removed, a changed.
    std::fs::write(
        policy_dir.join("a.yaml"),
        "kind: Service\nname: a\nspec: {timeout: 5s}\n",
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while admin.get("service", "b").await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "file change not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        admin
            .get("service", "a")
            .await
            .unwrap()
            .contains("timeout: 5s")
    );

    // An invalid change is logged and changes nothing.
    let version = admin.status().await.version;
    std::fs::write(
        policy_dir.join("a.yaml"),
        "kind: Service\nname: a\nspec: {timeout: nope}\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(admin.status().await.version, version);
    assert!(
        admin
            .get("service", "a")
            .await
            .unwrap()
            .contains("timeout: 5s")
    );

    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: control\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn healthz_and_metrics() {
    let dir = temp_dir("http");
    let control = start(&dir, Duration::from_secs(10)).await;
    let mut admin = Admin::new(&control).await;
    admin.apply(ORDERS).await.unwrap();
    let mut web = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    let update = web.next_update().await;
    web.ack(&update).await;
    admin
        .wait_for_sidecar("web-1", "ACK", |s| s.state == "ACK")
        .await;

    let health = http_get(control.http_addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("ok"), "{health}");
    let metrics = http_get(control.http_addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for name in [
        "sinew_control_sidecars_connected",
        "sinew_control_instances",
        "sinew_control_config_version",
        "sinew_control_updates_sent_total",
        "sinew_control_acks_total",
        "sinew_control_policy_apply_total{result=\"ok\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    let missing = http_get(control.http_addr, "/nope").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
