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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_keep_a_not_serving_app_out_of_the_mesh() {
    let mesh = Mesh::start("grpc-health");
    let client = http_client();
    let app = |name: &str| {
        let mut command = Command::new(bin("sinew-testgrpc"));
        command.env("PORT", "0");
        Proc::spawn(name, command, mesh.dir())
    };
    let (well, sick) = (app("app-grpc-1"), app("app-grpc-2"));
    let flags = |service: &'static str| {
        vec![
            "--app-protocol",
            "h2c",
            "--health-grpc",
            service,
            "--health-interval",
            "200ms",
        ]
    };
    let serving = mesh.sidecar(
        "orders-1",
        "orders",
        well.addr("grpc"),
        &flags("sinew.test.v1.Echo"),
    );
    let broken = mesh.sidecar("orders-2", "orders", sick.addr("grpc"), &flags("broken"));
    let web = mesh.sidecar("web-1", "web", "127.0.0.1:9".parse().unwrap(), &[]);
    for sidecar in [&serving, &broken, &web] {
        wait_ready(&client, sidecar).await;
    }
    let only_serving = vec![serving.addr("inbound").to_string()];
    let web_admin = web.addr("admin");
    wait_until(
        "web to see only the serving instance",
        std::time::Duration::from_secs(15),
        || async { endpoints(&client, web_admin, "orders").await == only_serving },
    )
    .await;
    // And it stays that way: the NOT_SERVING app keeps failing its checks.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(endpoints(&client, web_admin, "orders").await, only_serving);
    let broken_admin = broken.addr("admin");
    assert_eq!(
        metric(&client, broken_admin, "sinew_app_healthy").await,
        0.0
    );
    assert!(
        metric(&client, serving.addr("admin"), "sinew_health_checks_total").await >= 3.0,
        "the serving app is checked too"
    );
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", web.addr("outbound")))
            .unwrap()
            .origin("http://orders".parse().unwrap())
            .connect()
            .await
            .unwrap();
    let mut echo = EchoClient::new(channel);
    for _ in 0..10 {
        let reply = echo
            .unary(EchoRequest {
                message: "hi".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().message, "hi");
    }
}
