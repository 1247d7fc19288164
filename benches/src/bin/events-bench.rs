//! Events, both backends (embedded outbox, NATS JetStream): durable publish throughput
//! (single events and batches of 100) and publish→deliver latency at a fixed rate with two
//! subscribing services.
//!
//!     cargo build --release --workspace && target/release/events-bench [SECONDS] [--backend embedded|nats|nats-sync|both|all]
//!
//! NATS: a `nats-server` from PATH is started for the run (or `SINEW_TEST_NATS_URL` is used),
//! with JetStream's default fsync interval (`nats`) or an fsync before every acknowledgement
//! (`nats-sync`, `jetstream { sync_interval: always }`). `both` (the default) is embedded and
//! nats; `all` adds nats-sync.
//!
//! Starts a real control plane, the publisher's sidecar (in front of the test app) and one
//! sidecar for each subscriber; the subscriber apps run in this process and record, for each
//! event, now minus the send time carried in its data (same clock, same machine).
//! Phases: (1) 16 concurrent publishers of single events, (2) 4 concurrent publishers of
//! batches of 100, each for SECONDS (default 5) after the outbox drained; (3) an open-loop
//! 1,000 events/s for 2×SECONDS, every event delivered to both subscribers.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sinew_e2e::{
    HttpClient, Mesh, Nats, http_client, metric, wait_endpoints, wait_ready, wait_until,
};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A subscriber app: records publish→deliver latency (µs) of events whose data is the send
/// time in ns; answers 204.
async fn subscriber(latencies: Arc<Mutex<Vec<u64>>>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let latencies = latencies.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let latencies = latencies.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let sent = body.ok().and_then(|b| {
                            std::str::from_utf8(&b).ok()?.trim().parse::<u128>().ok()
                        });
                        if let Some(sent) = sent {
                            let micros = now_ns().saturating_sub(sent) / 1000;
                            if let Ok(mut l) = latencies.lock() {
                                l.push(micros as u64);
                            }
                        }
                        let mut response = http::Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = http::StatusCode::NO_CONTENT;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Publishes; `Ok(false)` when the outbox is full (503 `outbox-full`: back-pressure).
async fn publish(
    client: &HttpClient,
    outbound: SocketAddr,
    path: &str,
    body: Bytes,
    ct: &str,
) -> anyhow::Result<bool> {
    let request = http::Request::post(format!("http://{outbound}{path}"))
        .header("content-type", ct)
        .body(Full::new(body))?;
    let response = client.request(request).await?;
    let status = response.status();
    let full = response
        .headers()
        .get("sinew-error")
        .is_some_and(|v| v == "outbox-full");
    let text = response
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    if full {
        return Ok(false);
    }
    anyhow::ensure!(
        status == http::StatusCode::ACCEPTED,
        "publish answered {status}: {text}"
    );
    Ok(true)
}

/// Runs `workers` publishers for `secs`; returns events published and publishes refused
/// as `outbox-full` (each then waits 10 ms).
async fn throughput(
    outbound: SocketAddr,
    workers: usize,
    secs: u64,
    batch: usize,
) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let (mut n, mut refused) = (0u64, 0u64);
            // Bounded by time and by count.
            while Instant::now() < deadline && n < 2_000_000 {
                let stored = if batch == 1 {
                    publish(&client, outbound, "/v1/events/bench", Bytes::from(now_ns().to_string()), "text/plain").await?
                } else {
                    let entries: Vec<serde_json::Value> = (0..batch)
                        .map(|_| serde_json::json!({"datacontenttype": "text/plain", "data": now_ns().to_string()}))
                        .collect();
                    let body = Bytes::from(serde_json::to_vec(&entries)?);
                    publish(&client, outbound, "/v1/events/bench:batch", body, "application/cloudevents-batch+json").await?
                };
                if stored {
                    n += batch as u64;
                } else {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            anyhow::Ok((n, refused))
        }));
    }
    let (mut total, mut refused) = (0, 0);
    for t in tasks {
        let (n, r) = t.await??;
        total += n;
        refused += r;
    }
    Ok((total, refused))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn drained(client: &HttpClient, admin: SocketAddr) {
    wait_until("the outbox to drain", Duration::from_secs(300), || async {
        metric(client, admin, "sinew_outbox_events").await == 0.0
    })
    .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut secs = 5u64;
    let mut backends = vec!["embedded", "nats"];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => {
                backends = match args.next().as_deref() {
                    Some("embedded") => vec!["embedded"],
                    Some("nats") => vec!["nats"],
                    Some("nats-sync") => vec!["nats-sync"],
                    Some("both") => vec!["embedded", "nats"],
                    Some("all") => vec!["embedded", "nats", "nats-sync"],
                    other => {
                        anyhow::bail!("--backend embedded|nats|nats-sync|both|all, not {other:?}")
                    }
                }
            }
            n => secs = n.parse()?,
        }
    }
    let mut tables = Vec::new();
    for backend in backends {
        tables.push(run(backend, secs).await?);
    }
    for table in tables {
        println!("{table}");
    }
    Ok(())
}

async fn run(backend: &str, secs: u64) -> anyhow::Result<String> {
    let mesh = Mesh::start(&format!("bench-events-{backend}"));
    let nats = match backend {
        "nats" => Some(Nats::start("bench-events", mesh.dir())),
        "nats-sync" => Some(Nats::start_with(
            "bench-events",
            mesh.dir(),
            sinew_e2e::NATS_CONFIG_SYNC_ALWAYS,
        )),
        _ => None,
    };
    let flags = nats.as_ref().map(Nats::sidecar_flags).unwrap_or_default();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let client = http_client();
    let out = mesh.apply(
        "kind: Subscription\nname: a-bench\nspec: {topic: bench, service: sub-a, delivery: {max_in_flight: 64}}\n---\n\
         kind: Subscription\nname: b-bench\nspec: {topic: bench, service: sub-b, delivery: {max_in_flight: 64}}\n",
    );
    anyhow::ensure!(out.status.success(), "apply: {out:?}");
    let lat_a = Arc::new(Mutex::new(Vec::new()));
    let lat_b = Arc::new(Mutex::new(Vec::new()));
    let app_a = subscriber(lat_a.clone()).await?;
    let app_b = subscriber(lat_b.clone()).await?;
    let sa = mesh.sidecar("sub-a-1", "sub-a", app_a, &flags);
    let sb = mesh.sidecar("sub-b-1", "sub-b", app_b, &flags);
    let app = mesh.app("pub-1");
    let publisher = mesh.sidecar("pub-1", "pub", app.addr("http"), &flags);
    for s in [&sa, &sb, &publisher] {
        wait_ready(&client, s).await;
    }
    wait_endpoints(&client, &publisher, "sub-a", 1).await;
    wait_endpoints(&client, &publisher, "sub-b", 1).await;
    let outbound = publisher.addr("outbound");
    let admin = publisher.addr("admin");

    let single = throughput(outbound, 16, secs, 1).await?;
    drained(&client, admin).await;
    let batched = throughput(outbound, 4, secs, 100).await?;
    drained(&client, admin).await;
    for l in [&lat_a, &lat_b] {
        l.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clear();
    }

    // Open loop: one event every millisecond, sent at its planned time.
    let rate = 1000u64;
    let total = rate * secs * 2;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        let planned = start + Duration::from_micros(i * 1_000_000 / rate);
        tokio::time::sleep_until(planned.into()).await;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            publish(
                &client,
                outbound,
                "/v1/events/bench",
                Bytes::from(now_ns().to_string()),
                "text/plain",
            )
            .await
        }));
    }
    for t in tasks {
        anyhow::ensure!(t.await??, "the outbox filled up at {rate}/s");
    }
    drained(&client, admin).await;
    use std::fmt::Write as _;
    let mut t = String::new();
    writeln!(
        t,
        "events, {backend} backend: publisher sidecar + 2 subscriber sidecars, one machine"
    )?;
    writeln!(t, "| measure | value |")?;
    writeln!(t, "|---|---|")?;
    writeln!(
        t,
        "| durable publishes/s, single events, 16 concurrent publishers | {:.0} ({} refused as outbox-full) |",
        single.0 as f64 / secs as f64,
        single.1
    )?;
    writeln!(
        t,
        "| durable publishes/s, batches of 100, 4 concurrent publishers | {:.0} ({} batches refused as outbox-full) |",
        batched.0 as f64 / secs as f64,
        batched.1
    )?;
    for (name, l) in [("sub-a", &lat_a), ("sub-b", &lat_b)] {
        let mut v = l.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
        v.sort_unstable();
        writeln!(
            t,
            "| publish→deliver at {rate}/s to {name} ({} events): p50 / p99 / max | {} µs / {} µs / {} µs |",
            v.len(),
            percentile(&v, 50.0),
            percentile(&v, 99.0),
            v.last().copied().unwrap_or(0)
        )?;
    }
    Ok(t)
}
