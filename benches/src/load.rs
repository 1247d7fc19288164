//! The load generator, the same for every contender: HTTP/1.1 keep-alive connections (hyper),
//! either open loop at a fixed rate or closed loop as fast as answers come.
//!
//! Open loop corrects for coordinated omission as wrk2 does: one schedule at `rate` requests
//! per second, dealt round-robin to the connections; when a request's connection is still
//! busy with the previous answer at its scheduled time, its latency is measured from the
//! scheduled time, not from when the connection was free again. A proxy that stalls for
//! 100 ms is charged for every request that should have left during the stall, not for one.
//! The schedule is kept by a pacer thread sleeping with the OS's high-resolution timer (tokio's
//! timer ticks in milliseconds); when the connection was idle, latency counts from the actual
//! send, so the pacer's own wake-up delay (tens of µs) is not charged to the proxy.
//!
//! Bounded: `rate × duration` requests at most, and each connection stops at twice the
//! duration plus 5 s even when behind (the requests not sent are counted as `unsent`).

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The size of the app's answer.
pub const BODY_LEN: usize = 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Load {
    pub addr: SocketAddr,
    /// `Host` header (the mesh routes by it; the peers ignore it).
    pub host: String,
    /// Requests per second over all connections; `None` is closed loop.
    pub rate: Option<u32>,
    pub connections: usize,
    pub duration: Duration,
}

#[derive(Debug)]
pub struct Outcome {
    /// Latency in nanoseconds of every answered request.
    pub histogram: Histogram<u64>,
    pub ok: u64,
    /// Wrong status, wrong body length, transport error or timeout.
    pub errors: u64,
    /// Scheduled requests never sent because the run hit its time bound.
    pub unsent: u64,
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

impl Outcome {
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 120_000_000_000, 3).expect("valid histogram bounds")
}

/// One keep-alive connection.
struct Conn {
    sender: http1::SendRequest<Empty<Bytes>>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn { sender })
    }

    /// One GET; Ok when the answer is 200 with the whole 1 KiB body.
    async fn get(&mut self, host: &str) -> anyhow::Result<()> {
        self.sender.ready().await?;
        // Origin form, routed by `Host` (an absolute URI would read as a forward-proxy request).
        let request = http::Request::get("/")
            .header("host", host)
            .body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status == 200, "status {status}");
        anyhow::ensure!(
            body.len() == BODY_LEN,
            "body of {} bytes, not {BODY_LEN}",
            body.len()
        );
        Ok(())
    }
}

/// Checks that `addr` answers `n` requests with 200 and 1 KiB, each within 10 s.
pub async fn check(addr: SocketAddr, host: &str, n: usize) -> anyhow::Result<()> {
    let mut conn = Conn::open(addr).await?;
    for i in 0..n {
        tokio::time::timeout(REQUEST_TIMEOUT, conn.get(host))
            .await
            .map_err(|_| anyhow::anyhow!("request {i}: no answer in {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| anyhow::anyhow!("request {i}: {e}"))?;
    }
    Ok(())
}

pub async fn run(load: &Load) -> anyhow::Result<Outcome> {
    let connections = load.connections.max(1);
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(load.addr).await?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let hard_stop = start + load.duration * 2 + Duration::from_secs(5);
    let count = load.rate.map_or(0, |r| {
        (f64::from(r) * load.duration.as_secs_f64()).round() as u64
    });
    let mut senders = Vec::new();
    let mut tasks = Vec::with_capacity(connections);
    for (index, conn) in conns.into_iter().enumerate() {
        let load = load.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        // Requests dealt round-robin: connection `index` gets every `connections`-th one.
        let expected =
            count / connections as u64 + u64::from((index as u64) < count % connections as u64);
        tasks.push(tokio::spawn(async move {
            match load.rate {
                Some(_) => open_loop(conn, &load, rx, expected, start, hard_stop).await,
                None => closed_loop(conn, &load, start).await,
            }
        }));
    }
    let pacer = match load.rate {
        Some(rate) => {
            // tokio's Instant is std's (no paused test clock here), so a thread may use it.
            Some(std::thread::spawn(move || {
                pace(rate, count, start, hard_stop, senders)
            }))
        }
        None => {
            drop(senders);
            None
        }
    };
    let mut total = Outcome {
        histogram: histogram(),
        ok: 0,
        errors: 0,
        unsent: 0,
        elapsed: Duration::ZERO,
        first_error: None,
    };
    for task in tasks {
        let part = task.await?;
        total.histogram.add(&part.histogram)?;
        total.ok += part.ok;
        total.errors += part.errors;
        total.unsent += part.unsent;
        total.elapsed = total.elapsed.max(part.elapsed);
        if total.first_error.is_none() {
            total.first_error = part.first_error;
        }
    }
    if let Some(pacer) = pacer {
        let _ = pacer.join();
    }
    Ok(total)
}

fn empty_outcome() -> Outcome {
    Outcome {
        histogram: histogram(),
        ok: 0,
        errors: 0,
        unsent: 0,
        elapsed: Duration::ZERO,
        first_error: None,
    }
}

/// Sends one request and records it; on failure opens a new connection for the next one.
async fn one(conn: &mut Conn, load: &Load, from: Instant, out: &mut Outcome) {
    let result = tokio::time::timeout(REQUEST_TIMEOUT, conn.get(&load.host)).await;
    let error = match result {
        Ok(Ok(())) => {
            let nanos = from.elapsed().as_nanos() as u64;
            out.histogram.saturating_record(nanos.max(1_000));
            out.ok += 1;
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer in {REQUEST_TIMEOUT:?}"),
    };
    out.errors += 1;
    if out.first_error.is_none() {
        out.first_error = Some(error);
    }
    if let Ok(fresh) = Conn::open(load.addr).await {
        *conn = fresh;
    }
}

/// The pacer: sleeps until each scheduled time and hands the request to its connection.
fn pace(
    rate: u32,
    count: u64,
    start: Instant,
    hard_stop: Instant,
    conns: Vec<mpsc::UnboundedSender<Instant>>,
) {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    for i in 0..count {
        let intended = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if now > hard_stop {
            break;
        }
        if intended > now {
            std::thread::sleep(intended - now);
        }
        if conns[(i as usize) % conns.len()].send(intended).is_err() {
            break;
        }
    }
}

async fn open_loop(
    mut conn: Conn,
    load: &Load,
    mut schedule: mpsc::UnboundedReceiver<Instant>,
    expected: u64,
    start: Instant,
    hard_stop: Instant,
) -> Outcome {
    let mut out = empty_outcome();
    let mut done = 0;
    // When the previous request on this connection finished.
    let mut free_since = start;
    loop {
        let intended = tokio::select! {
            next = schedule.recv() => match next {
                Some(at) => at,
                None => break,
            },
            _ = tokio::time::sleep_until(hard_stop) => break,
        };
        let from = if free_since > intended {
            intended
        } else {
            Instant::now()
        };
        one(&mut conn, load, from, &mut out).await;
        free_since = Instant::now();
        done += 1;
    }
    out.unsent = expected.saturating_sub(done);
    out.elapsed = start.elapsed();
    out
}

async fn closed_loop(mut conn: Conn, load: &Load, start: Instant) -> Outcome {
    tokio::time::sleep_until(start).await;
    let deadline = start + load.duration;
    let mut out = empty_outcome();
    // Bounded in count too: no proxy answers 1 KiB over loopback in under 1 µs.
    let max = load.duration.as_micros() as u64;
    let mut sent = 0;
    while Instant::now() < deadline && sent < max {
        let at = Instant::now();
        one(&mut conn, load, at, &mut out).await;
        sent += 1;
    }
    out.elapsed = start.elapsed();
    out
}
