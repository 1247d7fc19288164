//! `SidecarApi`: what sidecars call — the `Connect` stream and `IssueCertificate`.
//!
//! `Connect` reads and checks the Hello before answering, so a malformed stream is refused
//! with a status the sidecar can log, then hands the stream to its own task ([`Session`]).

use crate::ca::{CaError, MeshCa};
use crate::clock::unix_ms;
use crate::mesh::Mesh;
use crate::metrics as m;
use crate::registry::InstanceSpec;
use crate::session::{Session, Streams};
use crate::tokens::constant_time_eq;
use sinew_proto::policy::validate_name;
use sinew_proto::v1::sidecar_api_server::{self, SidecarApi, SidecarApiServer};
use sinew_proto::v1::{
    CertificateRequest, CertificateResponse, ControlMessage, Hello, SidecarMessage, sidecar_message,
};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, watch};
use tonic::codegen::Service;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

/// Updates queued per stream before the stream task waits for the sidecar to read.
const OUTBOUND_QUEUE: usize = 16;
/// How long a new stream may take to send its Hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Node ids are free-form (hostnames, pod names, UUIDs) but bounded.
const MAX_NODE_ID: usize = 253;
/// Bound on a Hello's zone (labels: [`sinew_proto::limits::check_labels`]), which every
/// sidecar that sees the instance carries.
const MAX_ZONE: usize = 253;
/// The largest message a sidecar may send on its `Connect` stream (the join token is checked
/// before any is read): an EventsReply with up to 1,000 dead letters fits.
pub const MAX_CONNECT_MESSAGE: usize = 4 * 1024 * 1024;
/// The largest `IssueCertificate` request. Its join token is in the message, so the message
/// is read before the token is checked: a CSR is about 1 KiB, a token and a service name
/// less.
pub const MAX_CERTIFICATE_REQUEST: usize = 64 * 1024;

/// `Connect` carries the join token as `authorization: Bearer <token>`, so only sidecars that
/// may join can register instances (and so steer traffic).
fn check_join_token<T>(request: &Request<T>, join_token: &str) -> Result<(), Status> {
    let presented = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("Connect needs `authorization: Bearer <join token>`")
        })?;
    if constant_time_eq(presented.trim().as_bytes(), join_token.as_bytes()) {
        Ok(())
    } else {
        Err(Status::unauthenticated("the join token is not this mesh's"))
    }
}

pub struct SidecarApiService {
    pub mesh: Arc<Mesh>,
    pub ca: Arc<MeshCa>,
    pub join_token: String,
    pub streams: Arc<Streams>,
    pub shutdown: watch::Receiver<bool>,
    /// See [`crate::Config::max_update_bytes`].
    pub max_update_bytes: usize,
}

#[tonic::async_trait]
impl SidecarApi for SidecarApiService {
    type ConnectStream = ReceiverStream<Result<ControlMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<SidecarMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        check_join_token(&request, &self.join_token)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no Hello within {HELLO_TIMEOUT:?} of opening the stream"
                ))
            })??;
        let hello = match first {
            Some(SidecarMessage {
                kind: Some(sidecar_message::Kind::Hello(hello)),
            }) => hello,
            Some(_) => return Err(Status::invalid_argument("the first message must be Hello")),
            None => {
                return Err(Status::invalid_argument(
                    "the stream ended before its Hello",
                ));
            }
        };
        let spec = instance_spec(&hello).map_err(Status::invalid_argument)?;
        let node_id = spec.node_id.clone();
        let service = spec.service.clone();
        tracing::info!(node_id = %node_id, service = %service, addr = %spec.addr, "sidecar connected");
        let session = self.mesh.register(spec, hello.last_applied_version);
        let (outbound, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let replaced =
            self.streams
                .install(&node_id, session, outbound.clone(), &hello.events_store);
        let task = Session {
            mesh: self.mesh.clone(),
            streams: self.streams.clone(),
            node_id,
            service,
            session,
            inbound,
            outbound,
            replaced,
            shutdown: self.shutdown.clone(),
            max_update_bytes: self.max_update_bytes,
        };
        tokio::spawn(task.run());
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn issue_certificate(
        &self,
        request: Request<CertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let request = request.into_inner();
        if !constant_time_eq(request.join_token.as_bytes(), self.join_token.as_bytes()) {
            return Err(Status::unauthenticated("invalid join token"));
        }
        validate_name(&request.service)
            .map_err(|reason| Status::invalid_argument(format!("service: {reason}")))?;
        let now_unix = unix_ms() / 1000;
        let issued = self
            .ca
            .issue(&request.service, &request.csr_pem, now_unix)
            .map_err(|e| match e {
                CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
                CaError::Sign(_) => Status::internal(e.to_string()),
            })?;
        metrics::counter!(m::CERTIFICATES_ISSUED).increment(1);
        tracing::info!(service = %request.service, id = %issued.spiffe_id, "issued a certificate");
        Ok(Response::new(CertificateResponse {
            certificate_pem: issued.certificate_pem,
            ca_pem: self.ca.ca_pem().to_string(),
            spiffe_id: issued.spiffe_id,
            not_after_unix: issued.not_after_unix,
        }))
    }
}

/// Checks a Hello; the error names the field.
fn instance_spec(hello: &Hello) -> Result<InstanceSpec, String> {
    if hello.node_id.is_empty() || hello.node_id.len() > MAX_NODE_ID {
        return Err(format!("hello.node_id: must be 1-{MAX_NODE_ID} characters"));
    }
    validate_name(&hello.service).map_err(|reason| format!("hello.service: {reason}"))?;
    // Sidecars refuse an Update with an endpoint they cannot dial, so a bad address must
    // stop here, not freeze every caller's configuration.
    let addr: std::net::SocketAddr = hello.instance_addr.parse().map_err(|_| {
        format!(
            "hello.instance_addr: `{}` is not an ip:port where other sidecars reach this one",
            hello.instance_addr
        )
    })?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!(
            "hello.instance_addr: `{addr}` cannot be dialled (unspecified address or port 0)"
        ));
    }
    if hello.zone.len() > MAX_ZONE {
        return Err(format!("hello.zone: at most {MAX_ZONE} bytes"));
    }
    sinew_proto::limits::check_labels(&hello.labels)
        .map_err(|reason| format!("hello.labels: {reason}"))?;
    Ok(InstanceSpec {
        node_id: hello.node_id.clone(),
        service: hello.service.clone(),
        addr: hello.instance_addr.clone(),
        zone: hello.zone.clone(),
        labels: hello.labels.clone(),
    })
}

/// The `SidecarApi` with a decode limit per method: `Connect` checks its token before it
/// reads a message and may carry large EventsReplies; `IssueCertificate` carries its token in
/// the message, so an unauthenticated caller may make it read at most
/// [`MAX_CERTIFICATE_REQUEST`] bytes.
#[derive(Clone)]
pub struct SidecarApiRoutes {
    connect: SidecarApiServer<SidecarApiService>,
    certificates: SidecarApiServer<SidecarApiService>,
}

/// The path of `IssueCertificate`, which [`SidecarApiRoutes`] serves with the small limit.
const ISSUE_CERTIFICATE: &str = "/sinew.mesh.v1.SidecarApi/IssueCertificate";

impl SidecarApiRoutes {
    pub fn new(service: SidecarApiService) -> Self {
        let service = Arc::new(service);
        SidecarApiRoutes {
            connect: SidecarApiServer::from_arc(service.clone())
                .max_decoding_message_size(MAX_CONNECT_MESSAGE),
            certificates: SidecarApiServer::from_arc(service)
                .max_decoding_message_size(MAX_CERTIFICATE_REQUEST),
        }
    }
}

impl NamedService for SidecarApiRoutes {
    const NAME: &'static str = sidecar_api_server::SERVICE_NAME;
}

type Inner = SidecarApiServer<SidecarApiService>;

impl Service<http::Request<tonic::body::Body>> for SidecarApiRoutes {
    type Response = <Inner as Service<http::Request<tonic::body::Body>>>::Response;
    type Error = <Inner as Service<http::Request<tonic::body::Body>>>::Error;
    type Future = <Inner as Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both are always ready (the generated server is); ask both anyway.
        match Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.connect, cx) {
            Poll::Ready(Ok(())) => {
                Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.certificates, cx)
            }
            other => other,
        }
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() == ISSUE_CERTIFICATE {
            self.certificates.call(request)
        } else {
            self.connect.call(request)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hello_fields_are_checked() {
        let good = Hello {
            node_id: "n1".into(),
            service: "orders".into(),
            instance_addr: "127.0.0.1:4143".into(),
            ..Hello::default()
        };
        assert!(instance_spec(&good).is_ok());
        let err = instance_spec(&Hello {
            node_id: String::new(),
            ..good.clone()
        })
        .unwrap_err();
        assert!(err.starts_with("hello.node_id"));
        let err = instance_spec(&Hello {
            service: "Bad".into(),
            ..good.clone()
        })
        .unwrap_err();
        assert!(err.starts_with("hello.service"));
        for addr in ["", "orders:4143", "0.0.0.0:4143", "127.0.0.1:0"] {
            let err = instance_spec(&Hello {
                instance_addr: addr.into(),
                ..good.clone()
            })
            .unwrap_err();
            assert!(err.starts_with("hello.instance_addr"), "{addr}: {err}");
        }
        let mut labels = std::collections::HashMap::new();
        labels.insert(String::new(), "x".to_string());
        let err = instance_spec(&Hello { labels, ..good }).unwrap_err();
        assert!(err.starts_with("hello.labels"));
    }
}
