//! The inbound accepts only peers holding a certificate of the mesh CA.

#![allow(clippy::unwrap_used)]

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sinew_e2e::*;
use std::time::Duration;

/// Connects to `addr`, sends a request head, and returns what happened.
async fn try_request(
    addr: std::net::SocketAddr,
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<Vec<u8>, String> {
    let endpoint = sinew_e2e::quic::client_endpoint(client_cert);
    let attempt = async {
        let conn = endpoint
            .connect(addr, "sinew.mesh")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        // A HEAD frame for GET /whoami on `orders`.
        let head = sinew_proto::v1::RequestHead {
            method: "GET".into(),
            authority: "orders".into(),
            path: "/whoami".into(),
            headers: vec![],
            end_stream: true,
        };
        let payload = prost::Message::encode_to_vec(&head);
        let mut frame = vec![1u8];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "timed out".to_string())?;
    endpoint.close(0u32.into(), b"");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_peers_without_a_mesh_certificate() {
    let p = pair("refusal", 1).await;
    let inbound = p.orders[0].1.addr("inbound");

    let self_signed = rcgen::generate_simple_self_signed(vec!["evil.example".to_string()]).unwrap();
    let cert = self_signed.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        self_signed.signing_key.serialize_der(),
    ));
    let refused = try_request(inbound, Some((cert, key))).await;
    assert!(
        refused.is_err(),
        "a self-signed client got an answer: {refused:?}"
    );
    // The refusal shows as a closed or lost connection, depending on timing; the sidecar's
    // handshake-failure counter below is what proves it refused.
    eprintln!("self-signed client: {}", refused.unwrap_err());

    let refused = try_request(inbound, None).await;
    assert!(
        refused.is_err(),
        "a client without a certificate got an answer: {refused:?}"
    );

    // The same request from a real sidecar works, and the refusals were counted.
    let answer = get(&p.client, p.web.addr("outbound"), "orders", "/whoami")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let failures = metric(
        &p.client,
        p.orders[0].1.addr("admin"),
        "sinew_inbound_handshake_failures_total",
    )
    .await;
    assert!(failures >= 2.0, "handshake failures counted: {failures}");
}
