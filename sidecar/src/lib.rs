//! sinew-sidecar: the data plane beside one instance of a service.
//!
//! Start-up, in order: bind every listener (and print them, so scripts can find ports picked
//! with `:0`); load the last good snapshot from disk; obtain a certificate (cache or control
//! plane); accept inbound QUIC; serve outbound; connect to the control plane. Shutdown
//! (SIGTERM, SIGINT or `POST /shutdown`): stop accepting, tell the control plane this
//! instance no longer serves, let in-flight requests finish within `--drain-timeout`, exit 0.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod balance;
pub mod config;
pub mod control;
pub mod endpoint;
pub mod errors;
pub mod events;
pub mod health;
pub mod http_server;
pub mod identity;
pub mod inbound;
pub mod local_guard;
pub mod outbound;
pub mod renewal;
pub mod resilience;
pub mod snapshot;
pub mod state;
pub mod trace;
pub mod transport;

use anyhow::Context;
use arc_swap::ArcSwap;
use config::Config;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use snapshot::Snapshot;
use state::Shared;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use transport::quic::QuicTransport;
use transport::tls;

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Listen for signals before announcing the ports: whoever reads the line may stop us.
    let signals = signals()?;
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("sinew_request_duration_seconds".into()),
            admin::LATENCY_BUCKETS,
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    admin::describe_metrics();
    renewal::describe();
    private_dir(&config.data_dir)?;
    warn_if_readable_by_others(&config.join_token_file);
    let node_id = node_id(&config)?;

    let outbound_listener = tokio::net::TcpListener::bind(config.outbound)
        .await
        .with_context(|| format!("binding the outbound listener {}", config.outbound))?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("binding the admin listener {}", config.admin))?;
    let udp = std::net::UdpSocket::bind(config.inbound)
        .with_context(|| format!("binding the inbound QUIC socket {}", config.inbound))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        udp,
        Arc::new(quinn::TokioRuntime),
    )?;
    let inbound_addr = endpoint.local_addr()?;
    println!(
        "listening outbound={} inbound={} admin={}",
        outbound_listener.local_addr()?,
        inbound_addr,
        admin_listener.local_addr()?
    );
    std::io::stdout().flush()?;

    let snapshot_path = config.data_dir.join("snapshot.pb");
    let snapshot = match Snapshot::load(&snapshot_path) {
        Ok(Some(s)) => {
            tracing::info!(
                version = s.version,
                "serving the cached snapshot until the control plane answers"
            );
            s
        }
        Ok(None) => Snapshot::default(),
        Err(e) => {
            tracing::warn!("ignoring the cached snapshot: {e}");
            Snapshot::default()
        }
    };
    metrics::gauge!("sinew_config_version").set(snapshot.version as f64);
    metrics::gauge!("sinew_control_connected").set(0.0);
    let (shutdown, _) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        service: config.service.clone(),
        node_id: node_id.clone(),
        snapshot: ArcSwap::from_pointee(snapshot),
        snapshot_path,
        join_token_file: config.join_token_file.clone(),
        identity_ready: AtomicBool::new(false),
        control_connected: AtomicBool::new(false),
        shutdown,
        events: std::sync::OnceLock::new(),
        updated: tokio::sync::watch::channel(0).0,
        app_healthy: tokio::sync::watch::channel(true).0,
        certificate: tokio::sync::watch::channel(None).0,
    });

    // The outbound and the admin listener stop last, once the inbound has drained: requests
    // still being served often call their own dependencies.
    let (stop_listeners, listeners_stopped) = tokio::sync::watch::channel(false);
    let admin_shared = shared.clone();
    let guard = Arc::new(config.local_guard.clone());
    let admin_guard = guard.clone();
    tokio::spawn(http_server::serve(
        admin_listener,
        listeners_stopped.clone(),
        move |req| {
            admin::handle(
                req,
                admin_shared.clone(),
                prometheus.clone(),
                admin_guard.clone(),
            )
        },
    ));
    tokio::spawn(shutdown_on_signal(shared.clone(), signals));

    let mut shutdown_rx = shared.shutdown.subscribe();
    let held = tokio::select! {
        held = identity::obtain(&config) => held?,
        _ = state::shutdown_begun(&mut shutdown_rx) => return Ok(()),
    };
    let ca = held.identity.ca.clone();
    let current = tls::CurrentCert::new(&held.identity).context("the certificate's key")?;
    endpoint.set_server_config(Some(tls::server_config(
        &ca,
        current.clone(),
        config.inbound_limits.max_streams_per_connection,
    )?));
    let transport = Arc::new(QuicTransport::new(
        endpoint.clone(),
        tls::client_config(&ca, current.clone())?,
    ));
    let validity = held.info.validity;
    renewal::publish(&shared, held.info);
    shared.identity_ready.store(true, Ordering::Relaxed);
    tokio::spawn(renewal::run(
        config.clone(),
        shared.clone(),
        current,
        ca,
        validity,
    ));

    let inbound = Arc::new(inbound::Inbound::new(
        shared.clone(),
        config.app_addr,
        config.app_protocol,
        config.inbound_limits,
    ));
    tokio::spawn(inbound.clone().serve(endpoint.clone()));
    let outbound = Arc::new(outbound::Outbound::new(shared.clone(), transport));
    let events = events::Events::start(
        shared.clone(),
        outbound.clone(),
        inbound.clone(),
        &config.data_dir,
        config.event_limits.clone(),
        config.nats.as_ref(),
    )
    .await?;
    let _ = shared.events.set(events.clone());
    let events_store = events.store();
    let outbound_task = tokio::spawn(http_server::serve(
        outbound_listener,
        listeners_stopped,
        move |req| {
            let outbound = outbound.clone();
            let events = events.clone();
            let guard = guard.clone();
            async move {
                if events::api::is_events_request(&req) {
                    // A web page may not publish (its proxied mesh requests are the app's).
                    if let Err(refused) = guard.check_origin(req.headers(), "events") {
                        return refused.into_response();
                    }
                    events.handle(req).await
                } else {
                    outbound.handle(req).await
                }
            }
        },
    ));
    if let Some(health) = config.health.clone() {
        tokio::spawn(health::run(
            shared.clone(),
            config.app_addr,
            config.service.clone(),
            health,
        ));
    }
    let registration = control::Registration {
        node_id,
        service: config.service.clone(),
        instance_addr: advertised(config.advertise, inbound_addr).to_string(),
        zone: config.zone.clone(),
        events_store,
    };
    let control_task = tokio::spawn(control::run(
        shared.clone(),
        config.control.clone(),
        registration,
    ));

    state::shutdown_begun(&mut shutdown_rx).await;
    let deadline = Instant::now() + config.drain_timeout;
    tracing::info!("draining for at most {:?}", config.drain_timeout);
    // 1. Withdraw: the control plane hears `serving: false` and tells every caller.
    let _ = tokio::time::timeout(Duration::from_secs(3), control_task).await;
    // 2. Peers learn of the withdrawal within milliseconds; serve what they had already sent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while inbound.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if inbound.in_flight() > 0 {
        tracing::warn!(
            "{} inbound requests still running at the drain deadline",
            inbound.in_flight()
        );
    }
    // 3. Stop the app's way out, letting open requests finish.
    stop_listeners.send_replace(true);
    let _ = tokio::time::timeout_at(deadline.into(), outbound_task).await;
    endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    tracing::info!("stopped");
    Ok(())
}

type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

fn signals() -> anyhow::Result<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok((
        signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
    ))
}

async fn shutdown_on_signal(shared: Arc<Shared>, (mut term, mut int): Signals) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shared.begin_shutdown();
}

/// Where peers reach this sidecar: `--advertise`, else the inbound address with an
/// unspecified IP (0.0.0.0, ::) replaced by loopback.
fn advertised(advertise: Option<SocketAddr>, inbound: SocketAddr) -> SocketAddr {
    match advertise {
        Some(addr) => addr,
        None if inbound.ip().is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), inbound.port())
        }
        None => inbound,
    }
}

/// `--node-id`, else the id kept in the data dir, else a new `<service>-<random>` kept there.
fn node_id(config: &Config) -> anyhow::Result<String> {
    if let Some(id) = &config.node_id {
        return Ok(id.clone());
    }
    let path = config.data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_string());
    }
    let id = format!("{}-{:08x}", config.service, fastrand::u32(..));
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// Creates the data dir readable by its owner only (0700): it holds the certificate's key.
/// An existing dir is narrowed to 0700 too.
fn private_dir(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)
        .with_context(|| format!("creating the data dir {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making the data dir {} private (0700)", path.display()))
}

/// The join token is a secret: say so when its file is readable by group or others (it is
/// the operator's file, so it is not changed).
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "the join token file {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
}
