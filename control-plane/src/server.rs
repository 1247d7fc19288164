//! Starting and stopping a control plane: bind, wire the parts, run until told to stop.
//!
//! [`serve`] is what both the binary and the tests use; it returns once both ports are bound,
//! with their actual addresses (port 0 picks a free one).

use crate::admin_api::{AdminApiService, RequireToken};
use crate::ca::MeshCa;
use crate::clock::unix_ms;
use crate::config::Config;
use crate::listen::{self, Limits};
use crate::mesh::Mesh;
use crate::session::Streams;
use crate::sidecar_api::{SidecarApiRoutes, SidecarApiService};
use crate::store::Store;
use crate::{http, metrics, policy_files, tokens};
use anyhow::Context;
use sinew_proto::v1::admin_api_server::AdminApiServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

/// How long a graceful stop may take before the remaining connections are dropped.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

// Limits of the gRPC port (the accept-side ones are in [`listen`]). A sidecar uses one stream
// on one connection, `sinewctl` a few; 128 leaves room for tests and tools that multiplex.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Streams the peer reset before they were accepted, at most (h2's default, made explicit).
const MAX_PENDING_RESETS: usize = 20;
/// Streams we had to reset for the peer's errors, at most, before GOAWAY.
const MAX_LOCAL_ERROR_RESETS: usize = 256;
/// A request's headers at most (bytes, as HTTP/2 counts them).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// The largest admin request: a policy stream of many documents.
const MAX_ADMIN_MESSAGE: usize = 16 * 1024 * 1024;

/// A running control plane.
#[derive(Debug)]
pub struct RunningControl {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The admin token `sinewctl` must present.
    pub admin_token: String,
    /// The join token sidecars must present to get a certificate.
    pub join_token: String,
    shutdown: watch::Sender<bool>,
    grpc: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningControl {
    /// Resolves if the gRPC server stops on its own (an error).
    pub async fn stopped(&mut self) -> anyhow::Result<()> {
        match self.grpc.as_mut() {
            Some(handle) => {
                let result = handle.await;
                self.grpc = None;
                flatten(result)
            }
            None => std::future::pending().await,
        }
    }

    /// Stops gracefully: sidecar streams end, in-flight calls finish (up to a few seconds).
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        let mut result = Ok(());
        if let Some(mut handle) = self.grpc.take() {
            match tokio::time::timeout(STOP_TIMEOUT, &mut handle).await {
                Ok(joined) => result = flatten(joined),
                Err(_) => {
                    tracing::warn!(
                        "gRPC connections still open after {STOP_TIMEOUT:?}; dropping them"
                    );
                    handle.abort();
                }
            }
        }
        for task in self.tasks.drain(..) {
            if tokio::time::timeout(STOP_TIMEOUT, task).await.is_err() {
                tracing::warn!("a background task did not stop in time");
            }
        }
        result
    }
}

impl Drop for RunningControl {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn flatten(
    joined: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("the gRPC server failed")),
        Err(e) => Err(anyhow::Error::new(e).context("the gRPC server task failed")),
    }
}

/// Starts a control plane: opens the store, loads the CA and the policy, binds both ports.
pub async fn serve(config: Config) -> anyhow::Result<RunningControl> {
    config.validate().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create --data-dir {}", config.data_dir.display()))?;
    // It holds the CA's key and the tokens: its owner's only.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| {
                format!(
                    "cannot make --data-dir {} private (0700)",
                    config.data_dir.display()
                )
            })?;
    }
    let admin_token = tokens::load_or_create(
        config.admin_token_file.as_deref(),
        &config.data_dir.join("admin-token"),
    )
    .context("admin token")?;
    let join_token = tokens::load_or_create(
        config.join_token_file.as_deref(),
        &config.data_dir.join("join-token"),
    )
    .context("join token")?;

    let store = Store::open(&config.data_dir.join("control.redb"))?;
    let ca = MeshCa::load_or_create(
        &store,
        &config.trust_domain,
        config.cert_lifetime,
        config.ca_lifetime,
        unix_ms() / 1000,
    )
    .context("mesh CA")?;
    let ca_validity = (ca.not_before_unix, ca.not_after_unix);
    let mut mesh = Mesh::open(store, &config.trust_domain, config.lease_grace)?;
    if let Some(path) = &config.policy {
        mesh = mesh.with_policy_source(path);
    }
    let mesh = Arc::new(mesh);

    let policy = match &config.policy {
        Some(path) => {
            let contents = policy_files::read(path)?;
            let docs = policy_files::parse(&contents).context("invalid policy")?;
            let count = docs.len();
            mesh.sync_files(docs)?;
            tracing::info!(path = %path.display(), documents = count, "policy files loaded");
            Some((path.clone(), contents))
        }
        None => None,
    };

    let prometheus = metrics::install();
    ::metrics::gauge!(metrics::CA_EXPIRY).set(ca_validity.1 as f64);
    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot bind --grpc {}", config.grpc_addr))?;
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot bind --http {}", config.http_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let streams = Arc::new(Streams::default());
    let sidecar_api = SidecarApiService {
        mesh: mesh.clone(),
        ca: Arc::new(ca),
        join_token: join_token.clone(),
        streams: streams.clone(),
        shutdown: shutdown_rx.clone(),
        max_update_bytes: config.max_update_bytes,
    };
    let admin_api = AdminApiService {
        mesh: mesh.clone(),
        streams,
        ca_validity,
    };
    let mut stop = shutdown_rx.clone();
    let limits = Limits {
        max_connections: config.max_connections,
        handshake_timeout: config.handshake_timeout,
    };
    let incoming = listen::grpc_incoming(grpc_listener, limits, shutdown_rx.clone());
    let admin_api = AdminApiServer::new(admin_api).max_decoding_message_size(MAX_ADMIN_MESSAGE);
    let grpc = tonic::transport::Server::builder()
        // Find sidecars that vanished without closing their connection (and connections that
        // sent the preface, then nothing).
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // Rapid reset (streams opened and reset at once) and a peer provoking errors: GOAWAY.
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        // Bounds a request's headers, CONTINUATION frames included.
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .add_service(SidecarApiRoutes::new(sidecar_api))
        // The interceptor checks the token before the message is read.
        .add_service(InterceptedService::new(
            admin_api,
            RequireToken::new(&admin_token),
        ))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        });

    let mut tasks = vec![
        tokio::spawn(http::serve(
            http_listener,
            prometheus,
            limits,
            shutdown_rx.clone(),
        )),
        tokio::spawn(reap(mesh.clone(), shutdown_rx.clone())),
    ];
    if let Some((path, contents)) = policy {
        tasks.push(tokio::spawn(policy_files::watch(
            path,
            mesh.clone(),
            contents,
            config.policy_poll_interval,
            shutdown_rx.clone(),
        )));
    }
    tracing::info!(%grpc_addr, %http_addr, version = mesh.version(), "control plane started");
    Ok(RunningControl {
        grpc_addr,
        http_addr,
        admin_token,
        join_token,
        shutdown,
        grpc: Some(tokio::spawn(grpc)),
        tasks,
    })
}

/// Ends leases when they run out: sleeps until the next deadline, or until a lease starts.
async fn reap(mesh: Arc<Mesh>, mut shutdown: watch::Receiver<bool>) {
    // Instances restored from the store have leases running from the start.
    let mut next: Option<i64> = mesh.expire(unix_ms());
    loop {
        let wait = match next {
            Some(deadline) => {
                Duration::from_millis(u64::try_from(deadline - unix_ms()).unwrap_or(0))
            }
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = mesh.lease_changed() => {}
            _ = shutdown.changed() => return,
        }
        next = mesh.expire(unix_ms());
    }
}

/// Runs a control plane until SIGTERM or SIGINT: what `sinew-control` does. Prints the one
/// `listening grpc=<addr> http=<addr>` line to stdout once both ports are bound.
pub async fn run(config: Config) -> anyhow::Result<()> {
    use std::io::Write;
    // Listen for signals before announcing the ports: whoever reads the line may stop us.
    let stop = stop_signal()?;
    let mut running = serve(config).await?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            "listening grpc={} http={}",
            running.grpc_addr, running.http_addr
        )?;
        stdout.flush()?;
    }
    tokio::select! {
        signal = stop => {
            signal?;
            tracing::info!("stopping");
        }
        result = running.stopped() => {
            return result;
        }
    }
    running.shutdown().await
}

/// Registers for SIGTERM and SIGINT now; the future resolves when one arrives.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}
