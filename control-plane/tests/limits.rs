//! Size limits of the sidecar API, in-process with real tonic clients: labels past the limits
//! are refused at Hello, an unauthenticated `IssueCertificate` cannot make the control plane
//! read a large message, and an Update larger than a sidecar decodes is not sent but shown
//! like a NACK, the stream staying open.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use sinew_control::{Config, serve};
use sinew_proto::v1::CertificateRequest;
use sinew_proto::v1::sidecar_api_client::SidecarApiClient;
use std::collections::HashMap;
use std::time::Duration;
use tonic::Code;

fn labels(n: usize, key: usize, value: usize) -> HashMap<String, String> {
    (0..n)
        .map(|i| (format!("{i:0>key$}"), "v".repeat(value)))
        .collect()
}

#[tokio::test]
async fn a_hello_with_labels_past_the_limits_is_refused_with_the_reason() {
    let dir = temp_dir("labels");
    let control = start(&dir, Duration::from_secs(10)).await;
    let cases = [
        (
            labels(33, 2, 1),
            "hello.labels: 33 labels; at most 32 labels per instance",
        ),
        (
            labels(1, 64, 1),
            "hello.labels: label key `0000000000000000000000000000000000000000000000000000000000000000` is 64 bytes; keys are 1-63 bytes",
        ),
        (
            labels(1, 3, 256),
            "hello.labels: label `000` has a value of 256 bytes; values are at most 255 bytes",
        ),
        (
            labels(20, 10, 250),
            "hello.labels: labels of 5200 bytes (keys and values); at most 4096 bytes per instance",
        ),
    ];
    for (i, (labels, reason)) in cases.into_iter().enumerate() {
        let hello = sinew_proto::v1::Hello {
            labels,
            ..hello(&format!("n-{i}"), "orders")
        };
        let Err(status) = Sidecar::connect(&control, hello).await else {
            panic!("case {i}: a Hello with labels past the limits was accepted");
        };
        assert_eq!(status.code(), Code::InvalidArgument, "case {i}: {status:?}");
        assert_eq!(status.message(), reason, "case {i}");
    }
    // The largest labels allowed pass.
    let hello = sinew_proto::v1::Hello {
        labels: labels(32, 63, 65),
        ..hello("n-ok", "orders")
    };
    let mut ok = Sidecar::connect(&control, hello).await.unwrap();
    assert!(ok.next_update().await.full);
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_large_certificate_request_is_refused_before_its_token_is_read() {
    let dir = temp_dir("csr-size");
    let control = start(&dir, Duration::from_secs(10)).await;
    let mut client = SidecarApiClient::new(channel(&control).await);
    let status = client
        .issue_certificate(CertificateRequest {
            join_token: "not-the-token".into(),
            service: "orders".into(),
            csr_pem: "A".repeat(1024 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("the limit is: 65536 bytes"),
        "{status:?}"
    );
    // A request of normal size gets its answer (here: the token is wrong).
    let status = client
        .issue_certificate(CertificateRequest {
            join_token: "not-the-token".into(),
            service: "orders".into(),
            csr_pem: "A".repeat(2048),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_update_past_the_size_limit_is_not_sent_and_shows_like_a_nack() {
    let dir = temp_dir("update-size");
    let config = Config {
        lease_grace: Duration::from_millis(200),
        max_update_bytes: 64 * 1024,
        ..Config::local(&dir)
    };
    let control = serve(config).await.unwrap();
    let mut admin = Admin::new(&control).await;
    // The big instances see only their own service's policy; web sees everything.
    admin
        .apply("kind: Service\nname: big\nspec: {calls: []}\n")
        .await
        .unwrap();
    let mut web = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    let full = web.next_update().await;
    web.ack(&full).await;

    // 20 instances of 4 KiB labels: about 90 KB of endpoints, over the 64 KiB configured.
    let mut big = Vec::new();
    for i in 0..20 {
        let hello = sinew_proto::v1::Hello {
            labels: labels(32, 63, 65),
            ..hello(&format!("big-{i:02}"), "big")
        };
        let mut sidecar = Sidecar::connect(&control, hello).await.unwrap();
        let update = sidecar.next_update().await;
        sidecar.ack(&update).await;
        big.push(sidecar);
    }
    let refused = admin
        .wait_for_sidecar("web-1", "the refusal recorded", |s| {
            s.state == "NACK" && s.last_nack_error.contains("bytes a sidecar accepts")
        })
        .await;
    assert!(
        refused.last_nack_error.contains("over the 65536 bytes"),
        "{refused:?}"
    );
    // Every update web did receive fits, and its stream is still open.
    while let Ok(message) =
        tokio::time::timeout(Duration::from_millis(300), web.updates.message()).await
    {
        let message = message.unwrap().expect("the stream stays open");
        let size = prost::Message::encoded_len(&message);
        assert!(size <= 64 * 1024, "an update of {size} bytes was sent");
    }
    assert!(admin.sidecar("web-1").await.unwrap().connected);

    // The instances leave; the next Update that fits goes in full (web kept an older
    // snapshot than the one refused), and web ACKs its way to the end.
    drop(big);
    let mut first = true;
    let last = loop {
        let update = web.next_update().await;
        if first {
            assert!(update.full, "the first Update after a refusal is full");
            first = false;
        }
        web.ack(&update).await;
        let big = update.services.iter().find(|s| s.name == "big");
        if big.is_some_and(|b| b.endpoints.is_empty()) {
            break update;
        }
    };
    let acked = admin
        .wait_for_sidecar("web-1", "ACK after the refusal", |s| s.state == "ACK")
        .await;
    assert_eq!(acked.applied_version, last.version);
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
