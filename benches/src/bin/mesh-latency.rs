//! Sequential request latency: directly to an app, and through two sidecars (the mesh), in
//! one run on the same machine. Also each sidecar's RSS idle and after the run.
//!
//!     cargo build --release --workspace && target/release/mesh-latency [REQUESTS]
//!
//! (Build the whole workspace first: `cargo run -p sinew-bench` alone resolves features for
//! fewer packages, and the binaries it then needs would be rebuilt on every run.)
//! `SINEW_THREADS=1` in the environment gives each sidecar one worker thread.
//! Builds and starts a real control plane, two sidecars and the test app (release binaries
//! when run with --release). Requests are sent one at a time over one keep-alive connection,
//! interleaved in rounds of 100 (direct, mesh, direct, ...) so drift on a shared machine hits
//! both sides alike.

use sinew_e2e::{HttpClient, get, http_client, pair, proc_status_kib};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

async fn timed(
    client: &HttpClient,
    addr: SocketAddr,
    host: &str,
    n: usize,
    into: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    for _ in 0..n {
        let start = Instant::now();
        let answer = get(client, addr, host, "/whoami").await?;
        let elapsed = start.elapsed();
        anyhow::ensure!(answer.status == 200, "status {} via {addr}", answer.status);
        into.push(elapsed);
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let requests: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let p = pair("bench-latency", 1).await;
    let (app, orders) = &p.orders[0];
    let direct = app.addr("http");
    let mesh = p.web.addr("outbound");
    let idle = [
        proc_status_kib(p.web.pid, "VmRSS:"),
        proc_status_kib(orders.pid, "VmRSS:"),
    ];

    let client = http_client();
    let (mut warm, mut d, mut m) = (Vec::new(), Vec::new(), Vec::new());
    timed(&client, direct, "orders", 500, &mut warm).await?;
    timed(&client, mesh, "orders", 500, &mut warm).await?;
    let rounds = requests.div_ceil(100);
    for _ in 0..rounds {
        timed(&client, direct, "orders", 100, &mut d).await?;
        timed(&client, mesh, "orders", 100, &mut m).await?;
    }
    let after = [
        proc_status_kib(p.web.pid, "VmRSS:"),
        proc_status_kib(orders.pid, "VmRSS:"),
    ];
    let peak = [
        proc_status_kib(p.web.pid, "VmHWM:"),
        proc_status_kib(orders.pid, "VmHWM:"),
    ];
    d.sort();
    m.sort();
    println!(
        "{} sequential requests each, one keep-alive connection, interleaved rounds of 100",
        d.len()
    );
    println!("| path | p50 | p90 | p99 | p99.9 | max |");
    println!("|---|---|---|---|---|---|");
    for (name, v) in [("direct", &d), ("mesh (2 sidecars)", &m)] {
        println!(
            "| {name} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
            percentile(v, 50.0).as_secs_f64() * 1e6,
            percentile(v, 90.0).as_secs_f64() * 1e6,
            percentile(v, 99.0).as_secs_f64() * 1e6,
            percentile(v, 99.9).as_secs_f64() * 1e6,
            v[v.len() - 1].as_secs_f64() * 1e6,
        );
    }
    println!(
        "added by the mesh: p50 {:.0} µs, p99 {:.0} µs",
        (percentile(&m, 50.0).as_secs_f64() - percentile(&d, 50.0).as_secs_f64()) * 1e6,
        (percentile(&m, 99.0).as_secs_f64() - percentile(&d, 99.0).as_secs_f64()) * 1e6,
    );
    println!(
        "sidecar RSS (KiB): web idle {} after {} peak {}; orders idle {} after {} peak {}",
        idle[0], after[0], peak[0], idle[1], after[1], peak[1]
    );
    Ok(())
}
