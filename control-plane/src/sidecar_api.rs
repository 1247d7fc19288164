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
use sinew_proto::v1::sidecar_api_server::SidecarApi;
use sinew_proto::v1::{
    CertificateRequest, CertificateResponse, ControlMessage, Hello, SidecarMessage, sidecar_message,
};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Updates queued per stream before the stream task waits for the sidecar to read.
const OUTBOUND_QUEUE: usize = 16;
/// How long a new stream may take to send its Hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Node ids are free-form (hostnames, pod names, UUIDs) but bounded.
const MAX_NODE_ID: usize = 253;
/// Bounds on what a Hello may make every sidecar carry.
const MAX_LABELS: usize = 32;
const MAX_LABEL: usize = 253;

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
    if hello.zone.len() > MAX_LABEL {
        return Err(format!("hello.zone: at most {MAX_LABEL} bytes"));
    }
    if hello.labels.len() > MAX_LABELS
        || hello
            .labels
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > MAX_LABEL || v.len() > MAX_LABEL)
    {
        return Err(format!(
            "hello.labels: at most {MAX_LABELS} labels, keys of 1-{MAX_LABEL} bytes, values up to {MAX_LABEL}"
        ));
    }
    Ok(InstanceSpec {
        node_id: hello.node_id.clone(),
        service: hello.service.clone(),
        addr: hello.instance_addr.clone(),
        zone: hello.zone.clone(),
        labels: hello.labels.clone(),
    })
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
