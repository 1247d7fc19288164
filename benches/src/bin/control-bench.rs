//! The control plane's push: 100 and 1,000 simulated sidecars (real gRPC clients of
//! `Connect`, one process) over 100 services, against the real `sinew-control` binary run as
//! a child.
//!
//!     cargo build --release --workspace && target/release/control-bench
//!
//! writes `benches/results/control.{md,json}`. `--smoke` uses 20 sidecars over 10 services.
//!
//! Every service `svc-i` declares `calls: [svc-0, svc-(i+1)]`, so a change to `svc-0`
//! concerns every sidecar and a change to `svc-50` only the sidecars of `svc-49` and `svc-50`
//! (a scoped sidecar also gets its own service). Ten sidecars of `unscoped` (no `calls`) get
//! everything. Each simulated sidecar ACKs every Update as soon as it arrives; the time of a
//! change is from just before the `Apply` call to each affected sidecar's ACK, and then until
//! the control plane's status shows every one of them ACKed. Snapshot sizes are the encoded
//! size of the full Update a newly joining sidecar receives, scoped and unscoped, before and
//! after 100 more services (which no one calls) are applied.

use prost::Message as _;
use sinew_bench::report::median;
use sinew_bench::sys;
use sinew_e2e::Mesh;
use sinew_proto::v1::admin_api_client::AdminApiClient;
use sinew_proto::v1::sidecar_api_client::SidecarApiClient;
use sinew_proto::v1::{
    Ack, ApplyRequest, Hello, SidecarMessage, StatusRequest, control_message, sidecar_message,
};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Sidecars per HTTP/2 connection (servers cap concurrent streams per connection).
const PER_CONNECTION: usize = 50;
const UNSCOPED: usize = 10;

#[derive(Debug)]
struct Received {
    sidecar: usize,
    version: u64,
    full: bool,
    services: Vec<String>,
    bytes: usize,
    at: Instant,
}

#[derive(Debug, serde::Serialize)]
struct ChangeResult {
    service: String,
    version: u64,
    affected_expected: usize,
    affected_acked: usize,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    ack_max_ms: f64,
    /// Until the control plane's status showed every affected sidecar at the version.
    status_all_acked_ms: f64,
}

#[derive(Debug, serde::Serialize)]
struct Sizes {
    scoped_full_update_bytes: usize,
    scoped_services: usize,
    unscoped_full_update_bytes: usize,
    unscoped_services: usize,
}

#[derive(Debug, serde::Serialize)]
struct Scale {
    sidecars: usize,
    services: usize,
    connect_seconds: f64,
    control_rss_kib_after_connect: u64,
    control_peak_rss_kib: u64,
    control_cpu_s_connect: f64,
    control_cpu_s_changes: f64,
    changes: Vec<ChangeResult>,
    all_p50_ms: f64,
    all_p99_ms: f64,
    all_max_ms: f64,
    scoped_p50_ms: f64,
    scoped_p99_ms: f64,
    scoped_max_ms: f64,
    sizes_before: Sizes,
    sizes_after_100_more_services: Sizes,
}

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

async fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// One simulated sidecar: Connect, Hello, then ACK every Update and report it.
async fn sidecar(
    channel: Channel,
    join_token: String,
    index: usize,
    service: String,
    events: mpsc::UnboundedSender<Received>,
) -> anyhow::Result<()> {
    let mut client = SidecarApiClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    tx.send(SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(Hello {
            node_id: format!("sim-{index}"),
            service,
            instance_addr: format!("127.0.{}.{}:4143", index / 250, index % 250 + 1),
            zone: "z1".into(),
            ..Hello::default()
        })),
    })
    .await?;
    let mut updates = client
        .connect(bearer(ReceiverStream::new(rx), &join_token))
        .await?
        .into_inner();
    while let Some(message) = updates.message().await? {
        let Some(control_message::Kind::Update(update)) = message.kind else {
            continue;
        };
        tx.send(SidecarMessage {
            kind: Some(sidecar_message::Kind::Ack(Ack {
                version: update.version,
                nonce: update.nonce.clone(),
            })),
        })
        .await?;
        let _ = events.send(Received {
            sidecar: index,
            version: update.version,
            full: update.full,
            bytes: update.encoded_len(),
            services: update.services.iter().map(|s| s.name.clone()).collect(),
            at: Instant::now(),
        });
    }
    Ok(())
}

/// Receives until `done` says so or `timeout` passes; returns whether `done` held.
async fn drain(
    rx: &mut mpsc::UnboundedReceiver<Received>,
    timeout: Duration,
    mut on: impl FnMut(Received) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => {
                if on(event) {
                    return true;
                }
            }
            _ => return false,
        }
    }
}

/// Waits until nothing arrives for `quiet` (at most `timeout`).
async fn settle(rx: &mut mpsc::UnboundedReceiver<Received>, quiet: Duration, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tokio::time::timeout(quiet, rx.recv()).await.is_err() {
            return;
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn policies(services: usize, extra: &str) -> String {
    (0..services)
        .map(|i| {
            let next = (i + 1) % services;
            let calls = if i == 0 {
                format!("[svc-{next}]")
            } else if next == 0 {
                "[svc-0]".to_string()
            } else {
                format!("[svc-0, svc-{next}]")
            };
            format!(
                "kind: Service\nname: svc-{i}\nspec:\n  calls: {calls}\n{extra_for}---\n",
                extra_for = if i == 0 || i == services / 2 {
                    extra
                } else {
                    ""
                }
            )
        })
        .collect()
}

/// The size of the full Update a sidecar joining now as `service` gets.
async fn probe(
    control: std::net::SocketAddr,
    join_token: &str,
    service: &str,
    index: usize,
) -> anyhow::Result<(usize, usize)> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(sidecar(
        channel(control).await?,
        join_token.to_string(),
        index,
        service.to_string(),
        tx,
    ));
    let mut size = None;
    drain(&mut rx, Duration::from_secs(10), |e| {
        if e.full {
            size = Some((e.bytes, e.services.len()));
            true
        } else {
            false
        }
    })
    .await;
    task.abort();
    size.ok_or_else(|| anyhow::anyhow!("probe {service}: no full Update in 10 s"))
}

async fn sizes(
    control: std::net::SocketAddr,
    join_token: &str,
    index: usize,
) -> anyhow::Result<Sizes> {
    let (scoped, scoped_services) = probe(control, join_token, "svc-5", index).await?;
    let (unscoped, unscoped_services) = probe(control, join_token, "unscoped", index + 1).await?;
    Ok(Sizes {
        scoped_full_update_bytes: scoped,
        scoped_services,
        unscoped_full_update_bytes: unscoped,
        unscoped_services,
    })
}

async fn scale(sidecars: usize, services: usize, changes: usize) -> anyhow::Result<Scale> {
    let mesh = Mesh::start_with(&format!("control-bench-{sidecars}"), "10s");
    let control_pid = mesh.control.as_ref().map(|c| c.pid).unwrap_or(0);
    let join_token = std::fs::read_to_string(mesh.dir().join("control/join-token"))?
        .trim()
        .to_string();
    let admin_token = mesh.admin_token();
    let mut admin = AdminApiClient::new(channel(mesh.grpc).await?);
    let apply = |yaml: String| ApplyRequest {
        yaml,
        ..ApplyRequest::default()
    };
    admin
        .apply(bearer(apply(policies(services, "")), &admin_token))
        .await?;
    let ticks = sys::clock_ticks();

    // Connect every sidecar; each must get its full view.
    let total = sidecars + UNSCOPED;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut channels = Vec::new();
    for _ in 0..total.div_ceil(PER_CONNECTION) {
        channels.push(channel(mesh.grpc).await?);
    }
    let service_of = |i: usize| {
        if i < sidecars {
            format!("svc-{}", i % services)
        } else {
            "unscoped".to_string()
        }
    };
    let cpu_before = sys::cpu_ticks(control_pid);
    let connect_started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tasks.spawn(sidecar(
            channels[i / PER_CONNECTION].clone(),
            join_token.clone(),
            i,
            service_of(i),
            events_tx.clone(),
        ));
    }
    let mut have_full = HashSet::new();
    let connected = drain(&mut events, Duration::from_secs(120), |e| {
        if e.full {
            have_full.insert(e.sidecar);
        }
        have_full.len() == total
    })
    .await;
    anyhow::ensure!(
        connected,
        "only {} of {total} sidecars got their full view in 120 s",
        have_full.len()
    );
    settle(
        &mut events,
        Duration::from_millis(1000),
        Duration::from_secs(60),
    )
    .await;
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let control_cpu_s_connect =
        sys::cpu_ticks(control_pid).saturating_sub(cpu_before) as f64 / ticks;
    let control_rss_kib_after_connect = sys::rss_kib(control_pid);
    eprintln!(
        "{sidecars} sidecars: connected in {connect_seconds:.1} s, control plane RSS {} KiB",
        control_rss_kib_after_connect
    );

    let sizes_before = sizes(mesh.grpc, &join_token, total + 10).await?;
    settle(
        &mut events,
        Duration::from_millis(300),
        Duration::from_secs(10),
    )
    .await;

    // Who each change concerns.
    let affected = |changed: usize| -> HashSet<usize> {
        (0..total)
            .filter(|&i| {
                if i >= sidecars {
                    return true;
                }
                let own = i % services;
                changed == 0 || own == changed || (own + 1) % services == changed
            })
            .collect()
    };
    let mut results = Vec::new();
    let cpu_before = sys::cpu_ticks(control_pid);
    for round in 0..changes * 2 {
        let changed = if round % 2 == 0 { 0 } else { services / 2 };
        let expected = affected(changed);
        let name = format!("svc-{changed}");
        let calls = if changed == 0 {
            "[svc-1]".to_string()
        } else {
            format!("[svc-0, svc-{}]", (changed + 1) % services)
        };
        let yaml = format!(
            "kind: Service\nname: {name}\nspec:\n  calls: {calls}\n  timeout: {}s\n",
            round + 2
        );
        let started = Instant::now();
        let version = admin
            .apply(bearer(apply(yaml), &admin_token))
            .await?
            .into_inner()
            .version;
        let mut acked: HashMap<usize, f64> = HashMap::new();
        drain(&mut events, Duration::from_secs(30), |e| {
            if e.version >= version && expected.contains(&e.sidecar) && e.services.contains(&name) {
                acked
                    .entry(e.sidecar)
                    .or_insert((e.at - started).as_secs_f64() * 1000.0);
            }
            acked.len() == expected.len()
        })
        .await;
        // The control plane's own record of the ACKs.
        let expected_nodes: HashSet<String> = expected.iter().map(|i| format!("sim-{i}")).collect();
        let status_deadline = Instant::now() + Duration::from_secs(30);
        let status_ms = loop {
            let status = admin
                .status(bearer(StatusRequest {}, &admin_token))
                .await?
                .into_inner();
            let done = status
                .sidecars
                .iter()
                .filter(|s| expected_nodes.contains(&s.node_id) && s.applied_version >= version)
                .count();
            if done == expected_nodes.len() {
                break started.elapsed().as_secs_f64() * 1000.0;
            }
            if Instant::now() > status_deadline {
                break f64::NAN;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let mut times: Vec<f64> = acked.values().copied().collect();
        times.sort_by(f64::total_cmp);
        let result = ChangeResult {
            service: name,
            version,
            affected_expected: expected.len(),
            affected_acked: acked.len(),
            ack_p50_ms: percentile(&times, 50.0),
            ack_p99_ms: percentile(&times, 99.0),
            ack_max_ms: times.last().copied().unwrap_or(f64::NAN),
            status_all_acked_ms: status_ms,
        };
        eprintln!(
            "  change of {}: {}/{} ACKed, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; status shows all after {:.1} ms",
            result.service,
            result.affected_acked,
            result.affected_expected,
            result.ack_p50_ms,
            result.ack_p99_ms,
            result.ack_max_ms,
            result.status_all_acked_ms
        );
        results.push(result);
        settle(
            &mut events,
            Duration::from_millis(200),
            Duration::from_secs(10),
        )
        .await;
    }
    let control_cpu_s_changes =
        sys::cpu_ticks(control_pid).saturating_sub(cpu_before) as f64 / ticks;

    // 100 services that no one calls: a scoped sidecar's view must not grow.
    let extra: String = (0..100)
        .map(|i| format!("kind: Service\nname: extra-{i}\n---\n"))
        .collect();
    admin.apply(bearer(apply(extra), &admin_token)).await?;
    settle(
        &mut events,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    let sizes_after = sizes(mesh.grpc, &join_token, total + 20).await?;
    let control_peak_rss_kib = sys::peak_rss_kib(control_pid);
    tasks.abort_all();
    drop(events_tx);

    let pick = |all: bool, f: fn(&ChangeResult) -> f64| {
        median(
            results
                .iter()
                .filter(|r| (r.service == "svc-0") == all)
                .map(f)
                .collect(),
        )
    };
    let worst = |all: bool| {
        results
            .iter()
            .filter(|r| (r.service == "svc-0") == all)
            .map(|r| r.ack_max_ms)
            .fold(f64::NAN, f64::max)
    };
    Ok(Scale {
        sidecars,
        services,
        connect_seconds,
        control_rss_kib_after_connect,
        control_peak_rss_kib,
        control_cpu_s_connect,
        control_cpu_s_changes,
        all_p50_ms: pick(true, |r| r.ack_p50_ms),
        all_p99_ms: pick(true, |r| r.ack_p99_ms),
        all_max_ms: worst(true),
        scoped_p50_ms: pick(false, |r| r.ack_p50_ms),
        scoped_p99_ms: pick(false, |r| r.ack_p99_ms),
        scoped_max_ms: worst(false),
        changes: results,
        sizes_before,
        sizes_after_100_more_services: sizes_after,
    })
}

fn markdown(scales: &[Scale]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| sidecars (+{UNSCOPED} unscoped) | services | change to a service all call: ACK p50 / p99 / max | change concerning 2 services' sidecars: p50 / p99 / max | control plane RSS after connect / peak | control CPU s: connect all / all changes | full snapshot, scoped (svc-5) | unscoped | after 100 uncalled services: scoped / unscoped |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for s in scales {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} / {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms | {:.1} / {:.1} MiB | {:.2} / {:.2} | {} B ({} services) | {} B ({} services) | {} B / {} B |",
            s.sidecars,
            s.services,
            s.all_p50_ms,
            s.all_p99_ms,
            s.all_max_ms,
            s.scoped_p50_ms,
            s.scoped_p99_ms,
            s.scoped_max_ms,
            s.control_rss_kib_after_connect as f64 / 1024.0,
            s.control_peak_rss_kib as f64 / 1024.0,
            s.control_cpu_s_connect,
            s.control_cpu_s_changes,
            s.sizes_before.scoped_full_update_bytes,
            s.sizes_before.scoped_services,
            s.sizes_before.unscoped_full_update_bytes,
            s.sizes_before.unscoped_services,
            s.sizes_after_100_more_services.scoped_full_update_bytes,
            s.sizes_after_100_more_services.unscoped_full_update_bytes,
        );
    }
    if let Some(big) = scales.iter().max_by_key(|s| s.sidecars) {
        let met = |ok: bool| if ok { "met" } else { "MISSED" };
        let _ = writeln!(
            out,
            "\nGoals at {} sidecars: every sidecar ACKed within 1 s p99: {} ({:.1} ms p99, {:.1} ms max); \
             control plane < 100 MB: {} ({:.1} MiB peak); scoped snapshot does not grow with uncalled services: {} ({} B -> {} B).",
            big.sidecars,
            met(big.all_p99_ms <= 1000.0),
            big.all_p99_ms,
            big.all_max_ms,
            met((big.control_peak_rss_kib as f64) < 100.0 * 1000.0 * 1000.0 / 1024.0),
            big.control_peak_rss_kib as f64 / 1024.0,
            met(big.sizes_after_100_more_services.scoped_full_update_bytes
                <= big.sizes_before.scoped_full_update_bytes),
            big.sizes_before.scoped_full_update_bytes,
            big.sizes_after_100_more_services.scoped_full_update_bytes,
        );
    }
    out
}

fn main() -> anyhow::Result<()> {
    let mut smoke = false;
    let mut out = sinew_e2e::workspace_root().join("benches/results");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--out" => {
                out = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--out needs a value"))?
                    .into()
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    sinew_e2e::bin("sinew-control");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let plan: &[(usize, usize, usize)] = if smoke {
        &[(20, 10, 1)]
    } else {
        &[(100, 100, 5), (1000, 100, 5)]
    };
    let mut scales = Vec::new();
    for &(sidecars, services, changes) in plan {
        scales.push(runtime.block_on(scale(sidecars, services, changes))?);
    }
    let markdown = markdown(&scales);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("control.md"), &markdown)?;
    std::fs::write(
        out.join("control.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "smoke": smoke, "scales": scales }))?,
    )?;
    println!("{markdown}");
    eprintln!("results in {}", out.display());
    Ok(())
}
