//! A tonic client and server with two sidecars between them: unary, server streaming, and a
//! failing call whose status, details and binary metadata must arrive intact.

#![allow(clippy::unwrap_used)]

use sinew_e2e::echo::EchoRequest;
use sinew_e2e::echo::echo_client::EchoClient;
use sinew_e2e::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_streaming_and_errors_cross_the_mesh() {
    let mesh = Mesh::start("grpc");
    let client = http_client();
    let mut command = Command::new(bin("sinew-testgrpc"));
    command.env("PORT", "0");
    let app = Proc::spawn("app-grpc", command, mesh.dir());
    let orders = mesh.sidecar(
        "orders-1",
        "orders",
        app.addr("grpc"),
        &["--app-protocol", "h2c"],
    );
    let web = mesh.sidecar("web-1", "web", "127.0.0.1:9".parse().unwrap(), &[]);
    wait_ready(&client, &orders).await;
    wait_ready(&client, &web).await;
    wait_endpoints(&client, &web, "orders", 1).await;

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", web.addr("outbound")))
            .unwrap()
            .origin("http://orders".parse().unwrap())
            .connect()
            .await
            .unwrap();
    let mut echo = EchoClient::new(channel);

    let reply = echo
        .unary(EchoRequest {
            message: "hello".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.caller, "spiffe://sinew.local/svc/web");

    let mut stream = echo
        .server_stream(EchoRequest {
            message: "part".into(),
            count: 200,
            code: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        assert_eq!(reply.message, format!("part {}", reply.index));
        indexes.push(reply.index);
    }
    assert_eq!(indexes, (0..200).collect::<Vec<u32>>());

    let status = echo
        .fail(EchoRequest {
            message: "no stock".into(),
            count: 0,
            code: tonic::Code::FailedPrecondition as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "no stock");
    assert_eq!(status.details(), b"\x00\x01detail\xff");
    let trace = status
        .metadata()
        .get_bin("x-trace-bin")
        .expect("binary metadata arrived");
    assert_eq!(trace.to_bytes().unwrap().as_ref(), b"\x00\xfe");
}
