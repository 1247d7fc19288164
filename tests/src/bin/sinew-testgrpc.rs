//! A tonic server for the end-to-end tests, on 127.0.0.1:$PORT (h2c). Besides `Echo` it
//! answers grpc.health.v1 `Check`: SERVING for `""` and `sinew.test.v1.Echo`, NOT_SERVING
//! for `broken`, NOT_FOUND for anything else.

use sinew_e2e::echo::echo_server::{Echo, EchoServer};
use sinew_e2e::echo::{EchoReply, EchoRequest};
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

struct Service;

fn caller<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("sinew-caller")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tonic::async_trait]
impl Echo for Service {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let caller = caller(&request);
        Ok(Response::new(EchoReply {
            message: request.into_inner().message,
            index: 0,
            caller,
        }))
    }

    type ServerStreamStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let request = request.into_inner();
        let replies = (0..request.count).map(move |index| {
            Ok(EchoReply {
                message: format!("{} {index}", request.message),
                index,
                caller: String::new(),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(replies))))
    }

    async fn fail(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let request = request.into_inner();
        let mut status = Status::with_details(
            tonic::Code::from_i32(request.code),
            request.message,
            bytes::Bytes::from_static(b"\x00\x01detail\xff"),
        );
        status.metadata_mut().insert_bin(
            "x-trace-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x00\xfe"),
        );
        Err(status)
    }
}

struct Health;

#[tonic::async_trait]
impl sinew_proto::health::health_server::Health for Health {
    async fn check(
        &self,
        request: Request<sinew_proto::health::HealthCheckRequest>,
    ) -> Result<Response<sinew_proto::health::HealthCheckResponse>, Status> {
        use sinew_proto::health::health_check_response::ServingStatus;
        let status = match request.into_inner().service.as_str() {
            "" | "sinew.test.v1.Echo" => ServingStatus::Serving,
            "broken" => ServingStatus::NotServing,
            other => return Err(Status::not_found(format!("unknown service {other}"))),
        };
        Ok(Response::new(sinew_proto::health::HealthCheckResponse {
            status: status as i32,
        }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")?.parse()?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening grpc={}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(Service))
        .add_service(sinew_proto::health::health_server::HealthServer::new(
            Health,
        ))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await?;
    Ok(())
}
