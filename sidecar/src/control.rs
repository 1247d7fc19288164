//! The control-plane client: one `Connect` stream for the sidecar's whole life.
//!
//! Hello registers the instance; every Update is validated against the current snapshot,
//! swapped in atomically and ACKed, or NACKed with the reason while the last good snapshot
//! keeps serving. The applied snapshot is cached on disk so a restart serves without a
//! control plane. When the stream breaks, traffic goes on; the client reconnects with
//! jittered exponential backoff (100 ms up to 30 s) to any configured address and resyncs.

use crate::backoff::Backoff;
use crate::state::Shared;
use anyhow::{Context, anyhow};
use sinew_proto::v1::control_message::Kind as ControlKind;
use sinew_proto::v1::sidecar_api_client::SidecarApiClient;
use sinew_proto::v1::sidecar_message::Kind;
use sinew_proto::v1::{
    Ack, CertificateStatus, EventsReply, Health, Hello, Nack, SidecarMessage, Update,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What this sidecar tells the control plane about itself.
#[derive(Debug, Clone)]
pub struct Registration {
    pub node_id: String,
    pub service: String,
    pub instance_addr: String,
    pub zone: String,
    /// See `Hello.events_store`.
    pub events_store: String,
}

/// Runs until shutdown: on shutdown it reports `serving: false` (so peers stop sending at
/// once instead of after the lease grace) and closes the stream.
pub async fn run(shared: Arc<Shared>, addrs: Vec<String>, me: Registration) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut shutdown = shared.shutdown.subscribe();
    let mut next = 0usize;
    loop {
        let addr = &addrs[next % addrs.len()];
        next += 1;
        let started = Instant::now();
        // Not raced against shutdown: the session watches for it itself, so that an open
        // stream reports `serving: false` before it closes.
        let result = session(&shared, addr, &me).await;
        shared.control_connected.store(false, Ordering::Relaxed);
        metrics::gauge!("sinew_control_connected").set(0.0);
        match result {
            Ok(()) => return,
            Err(e) => tracing::warn!("control plane {addr}: {e:#}; serving the last good snapshot"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        let delay = backoff.next_delay(fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::state::shutdown_begun(&mut shutdown) => return,
        }
    }
}

async fn session(shared: &Shared, addr: &str, me: &Registration) -> anyhow::Result<()> {
    let mut shutdown = shared.shutdown.subscribe();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = tokio::select! {
        channel = endpoint.connect() => channel.context("connect")?,
        _ = crate::state::shutdown_begun(&mut shutdown) => return Ok(()),
    };
    let (tx, rx) = mpsc::channel::<SidecarMessage>(16);
    let hello = Hello {
        node_id: me.node_id.clone(),
        service: me.service.clone(),
        instance_addr: me.instance_addr.clone(),
        zone: me.zone.clone(),
        labels: Default::default(),
        last_applied_version: shared.snapshot.load().version,
        events_store: me.events_store.clone(),
    };
    send(&tx, Kind::Hello(hello)).await?;
    // Then the certificate, and each renewed one, for `sinewctl status` and `check`.
    let mut certificate = shared.certificate.subscribe();
    let status = certificate_status(&certificate.borrow_and_update());
    if let Some(status) = status {
        send(&tx, Kind::Certificate(status)).await?;
    }
    let outgoing = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|message| (message, rx))
    });
    let token = std::fs::read_to_string(&shared.join_token_file).with_context(|| {
        format!(
            "reading the join token {}",
            shared.join_token_file.display()
        )
    })?;
    let mut request = tonic::Request::new(outgoing);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim())
            .parse()
            .context("the join token is not printable ASCII")?,
    );
    // The same limit the control plane sends within (it refuses larger Updates, with an error
    // `sinewctl status` shows), so an Update that was sent can always be decoded here.
    let mut client = SidecarApiClient::new(channel)
        .max_decoding_message_size(sinew_proto::limits::MAX_UPDATE_BYTES);
    let mut updates = tokio::select! {
        response = client.connect(request) => response
            .map_err(|s| anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner(),
        _ = crate::state::shutdown_begun(&mut shutdown) => return Ok(()),
    };
    tracing::info!("connected to the control plane at {addr}");
    // Hello registers the instance as serving; an app found unhealthy before says so now.
    let mut health = shared.app_healthy.subscribe();
    let healthy = *health.borrow_and_update();
    if !healthy {
        send(&tx, Kind::Health(Health { serving: false })).await?;
    }
    shared.control_connected.store(true, Ordering::Relaxed);
    metrics::gauge!("sinew_control_connected").set(1.0);

    loop {
        let message = tokio::select! {
            m = updates.message() => m.map_err(|s| anyhow!("{}: {}", s.code(), s.message()))?,
            changed = certificate.changed() => {
                if changed.is_ok() {
                    let status = certificate_status(&certificate.borrow_and_update());
                    if let Some(status) = status {
                        send(&tx, Kind::Certificate(status)).await?;
                    }
                }
                continue;
            }
            changed = health.changed() => {
                if changed.is_ok() {
                    let serving = *health.borrow_and_update();
                    tracing::info!(serving, "reporting the app's health");
                    send(&tx, Kind::Health(Health { serving })).await?;
                }
                continue;
            }
            _ = crate::state::shutdown_begun(&mut shutdown) => {
                send(&tx, Kind::Health(Health { serving: false })).await?;
                // End our half; the control plane reads the Health first, then ends its half.
                drop(tx);
                let closed = async { while let Ok(Some(_)) = updates.message().await {} };
                let _ = tokio::time::timeout(Duration::from_secs(2), closed).await;
                return Ok(());
            }
        };
        match message {
            None => return Err(anyhow!("the control plane closed the stream")),
            Some(m) => match m.kind {
                Some(ControlKind::Update(update)) => {
                    let reply = apply(shared, &update);
                    send(&tx, reply).await?;
                }
                Some(ControlKind::EventsRequest(request)) => {
                    // Answered beside the stream: a replay of many dead letters must not
                    // hold up Updates.
                    let tx = tx.clone();
                    let events = shared.events.get().cloned();
                    tokio::spawn(async move {
                        let reply = match events {
                            Some(events) => events.answer(request).await,
                            None => EventsReply {
                                id: request.id,
                                error: "the outbox is not open yet".into(),
                                ..EventsReply::default()
                            },
                        };
                        let _ = send(&tx, Kind::EventsReply(reply)).await;
                    });
                }
                None => {}
            },
        }
    }
}

/// Validates and swaps in an Update; the reply to send back.
fn apply(shared: &Shared, update: &Update) -> Kind {
    let current = shared.snapshot.load();
    match current.apply(update) {
        Ok(next) => {
            if let Err(e) = next.save(&shared.snapshot_path) {
                tracing::warn!("could not cache snapshot {}: {e}", update.version);
            }
            let services = next.services.len();
            shared.snapshot.store(Arc::new(next));
            shared.updated.send_replace(update.version);
            metrics::gauge!("sinew_config_version").set(update.version as f64);
            metrics::counter!("sinew_control_updates_total", "result" => "ack").increment(1);
            tracing::info!(
                version = update.version,
                full = update.full,
                services,
                "applied update"
            );
            Kind::Ack(Ack {
                version: update.version,
                nonce: update.nonce.clone(),
            })
        }
        Err(error) => {
            metrics::counter!("sinew_control_updates_total", "result" => "nack").increment(1);
            tracing::warn!(
                version = update.version,
                "refused update: {error}; keeping version {}",
                current.version
            );
            Kind::Nack(Nack {
                version: update.version,
                nonce: update.nonce.clone(),
                error,
            })
        }
    }
}

async fn send(tx: &mpsc::Sender<SidecarMessage>, kind: Kind) -> anyhow::Result<()> {
    tx.send(SidecarMessage { kind: Some(kind) })
        .await
        .map_err(|_| anyhow!("the control stream closed"))
}

fn certificate_status(
    info: &Option<crate::identity::CertificateInfo>,
) -> Option<CertificateStatus> {
    info.as_ref().map(|c| CertificateStatus {
        not_before_unix: c.validity.not_before_unix,
        not_after_unix: c.validity.not_after_unix,
        serial: c.serial.clone(),
    })
}
