//! Helpers for the integration tests: an in-process control plane on 127.0.0.1:0, and real
//! tonic clients talking to it.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use sinew_control::{Config, RunningControl, serve};
use sinew_proto::v1::admin_api_client::AdminApiClient;
use sinew_proto::v1::sidecar_api_client::SidecarApiClient;
use sinew_proto::v1::{
    ApplyRequest, ApplyResponse, ControlMessage, GetRequest, Hello, ListServicesRequest,
    ServiceInfo, SidecarMessage, SidecarStatus, StatusRequest, StatusResponse, Update,
    control_message, sidecar_message,
};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

pub const WAIT: Duration = Duration::from_secs(5);

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sinew-control-it-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub async fn start(dir: &std::path::Path, grace: Duration) -> RunningControl {
    let config = Config {
        lease_grace: grace,
        ..Config::local(dir)
    };
    serve(config).await.unwrap()
}

pub async fn channel(control: &RunningControl) -> Channel {
    Endpoint::from_shared(format!("http://{}", control.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub struct Admin {
    client: AdminApiClient<Channel>,
    token: String,
}

impl Admin {
    pub async fn new(control: &RunningControl) -> Admin {
        Admin {
            client: AdminApiClient::new(channel(control).await),
            token: control.admin_token.clone(),
        }
    }

    fn req<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        request
    }

    pub async fn apply(&mut self, yaml: &str) -> Result<ApplyResponse, Status> {
        let request = self.req(ApplyRequest {
            yaml: yaml.into(),
            ..ApplyRequest::default()
        });
        self.client.apply(request).await.map(|r| r.into_inner())
    }

    pub async fn get(&mut self, kind: &str, name: &str) -> Result<String, Status> {
        let request = self.req(GetRequest {
            kind: kind.into(),
            name: name.into(),
        });
        self.client.get(request).await.map(|r| r.into_inner().yaml)
    }

    pub async fn delete(&mut self, kind: &str, name: &str) -> Result<u64, Status> {
        let request = self.req(sinew_proto::v1::DeleteRequest {
            kind: kind.into(),
            name: name.into(),
        });
        self.client
            .delete(request)
            .await
            .map(|r| r.into_inner().version)
    }

    pub async fn services(&mut self) -> Vec<ServiceInfo> {
        let request = self.req(ListServicesRequest {});
        self.client
            .list_services(request)
            .await
            .unwrap()
            .into_inner()
            .services
    }

    pub async fn status(&mut self) -> StatusResponse {
        let request = self.req(StatusRequest {});
        self.client.status(request).await.unwrap().into_inner()
    }

    pub async fn sidecar(&mut self, node_id: &str) -> Option<SidecarStatus> {
        self.status()
            .await
            .sidecars
            .into_iter()
            .find(|s| s.node_id == node_id)
    }

    /// Polls status until `check` holds (or panics after a few seconds).
    pub async fn wait_for_sidecar(
        &mut self,
        node_id: &str,
        what: &str,
        check: impl Fn(&SidecarStatus) -> bool,
    ) -> SidecarStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(s) = self.sidecar(node_id).await {
                if check(&s) {
                    return s;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!("sidecar {node_id}: {what}: last status {s:?}");
                }
            } else if tokio::time::Instant::now() > deadline {
                panic!("sidecar {node_id}: {what}: not in status");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A fake sidecar: one Connect stream.
pub struct Sidecar {
    pub tx: mpsc::Sender<SidecarMessage>,
    pub updates: Streaming<ControlMessage>,
}

pub fn hello(node_id: &str, service: &str) -> Hello {
    Hello {
        node_id: node_id.into(),
        service: service.into(),
        instance_addr: format!("127.0.0.1:{}", 4000 + node_id.len()),
        zone: "z1".into(),
        ..Hello::default()
    }
}

impl Sidecar {
    pub async fn connect(control: &RunningControl, hello: Hello) -> Result<Sidecar, Status> {
        Self::connect_with(
            control,
            SidecarMessage {
                kind: Some(sidecar_message::Kind::Hello(hello)),
            },
        )
        .await
    }

    pub async fn connect_with(
        control: &RunningControl,
        first: SidecarMessage,
    ) -> Result<Sidecar, Status> {
        let mut client = SidecarApiClient::new(channel(control).await);
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let updates = client
            .connect(with_join_token(
                ReceiverStream::new(rx),
                &control.join_token,
            ))
            .await?
            .into_inner();
        Ok(Sidecar { tx, updates })
    }

    pub async fn next_update(&mut self) -> Update {
        let message = tokio::time::timeout(WAIT, self.updates.message())
            .await
            .expect("no Update in time")
            .expect("stream error")
            .expect("stream ended");
        match message.kind {
            Some(control_message::Kind::Update(update)) => update,
            Some(other) => panic!("expected an Update, got {other:?}"),
            None => panic!("empty ControlMessage"),
        }
    }

    /// Asserts that nothing arrives for a little while.
    pub async fn expect_quiet(&mut self, for_: Duration) {
        if let Ok(message) = tokio::time::timeout(for_, self.updates.message()).await {
            panic!("expected no Update, got {message:?}");
        }
    }

    pub async fn send(&self, kind: sidecar_message::Kind) {
        self.tx
            .send(SidecarMessage { kind: Some(kind) })
            .await
            .unwrap();
    }

    pub async fn ack(&self, update: &Update) {
        self.send(sidecar_message::Kind::Ack(sinew_proto::v1::Ack {
            version: update.version,
            nonce: update.nonce.clone(),
        }))
        .await;
    }

    pub async fn nack(&self, update: &Update, error: &str) {
        self.send(sidecar_message::Kind::Nack(sinew_proto::v1::Nack {
            version: update.version,
            nonce: update.nonce.clone(),
            error: error.into(),
        }))
        .await;
    }
}

pub fn names(update: &Update) -> Vec<&str> {
    update.services.iter().map(|s| s.name.as_str()).collect()
}

/// A Connect request carrying the join token, as sidecars send it.
pub fn with_join_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}
