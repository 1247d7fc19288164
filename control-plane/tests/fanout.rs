//! A policy change reaches 1,000 connected sidecars quickly: one snapshot rebuild, one wake-up
//! per stream, and only the streams whose view changed send anything.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use sinew_proto::v1::sidecar_api_client::SidecarApiClient;
use sinew_proto::v1::{SidecarMessage, sidecar_message};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

const SIDECARS: usize = 1000;
/// HTTP/2 servers cap concurrent streams per connection; spread the sidecars.
const CONNECTIONS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_a_thousand_sidecars() {
    let dir = temp_dir("fanout");
    let control = start(&dir, Duration::from_secs(10)).await;
    let mut admin = Admin::new(&control).await;
    admin.apply("kind: Service\nname: orders\n").await.unwrap();

    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(channel(&control).await);
    }
    let mut streams = Vec::new();
    let mut senders = Vec::new();
    for i in 0..SIDECARS {
        let mut client = SidecarApiClient::new(channels[i % CONNECTIONS].clone());
        let (tx, rx) = mpsc::channel(4);
        // Scoped: each calls only `orders`, so joins of other sidecars do not reach it.
        let service = format!("web{}", i % 50);
        if i < 50 {
            admin
                .apply(&format!(
                    "kind: Service\nname: {service}\nspec: {{calls: [orders]}}\n"
                ))
                .await
                .unwrap();
        }
        tx.send(SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(hello(
                &format!("node-{i}"),
                &service,
            ))),
        })
        .await
        .unwrap();
        let stream = client
            .connect(common::with_join_token(
                ReceiverStream::new(rx),
                &control.join_token,
            ))
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
        senders.push(tx);
    }
    // Drain the full views.
    for stream in &mut streams {
        let first = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(first.kind, Some(sinew_proto::v1::control_message::Kind::Update(ref u)) if u.full)
        );
    }
    assert_eq!(admin.status().await.sidecars.len(), SIDECARS);

    let started = Instant::now();
    let applied = admin
        .apply("kind: Service\nname: orders\nspec: {timeout: 2s}\n")
        .await
        .unwrap();
    let mut received = 0;
    for stream in &mut streams {
        let message = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("update not received in time")
            .unwrap()
            .unwrap();
        let Some(sinew_proto::v1::control_message::Kind::Update(update)) = message.kind else {
            panic!("not an update");
        };
        if update.version >= applied.version && update.services.iter().any(|s| s.name == "orders") {
            received += 1;
        }
    }
    let elapsed = started.elapsed();
    // How fast is for the benchmark to say; this test asserts that every sidecar got it.
    eprintln!("policy change reached {received} sidecars in {elapsed:?}");
    assert_eq!(received, SIDECARS);
    drop(senders);
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
