//! The app behind a sidecar in the end-to-end tests. HTTP/1.1 and h2c on $PORT.
//!
//! - `/whoami`: the instance name ($INSTANCE); or 503 for the share of requests set by
//!   `/control/fail?percent=N` (deterministic: N of every 100).
//! - `/control/served`: how many `/whoami` requests were answered 200.
//! - `/control/latency?ms=N`: every `/whoami` answers N ms later (0: at once).
//! - `/control/stall?ms=N&percent=P`: P of every 100 `/whoami` requests (deterministic: the
//!   first P of each hundred, counted from this call) answer N ms later;
//!   `/control/stalled` says how many requests were stalled since (whether or not the caller
//!   waited for the answer).
//! - `/health`: 200, or 503 while `/control/health?ok=0` (`?ok=1` heals it);
//!   `/control/health-checks` counts the `/health` requests.
//! - `/echo`: streams the request body back; request headers come back as `echo-<name>`
//!   (or 503, like `/whoami`, while failures are induced).
//! - `/bytes?n=N`: streams N bytes (a repeating pattern) in 64 KiB chunks.
//! - `/sink`: reads the body, answers with its length and SHA-256.
//! - `/status/N`: answers status N.
//! - `/slow?ms=N`: answers after N ms.
//! - `POST /events/...`: an event subscriber. Records each delivery it accepts (`ce-id`,
//!   `sinew-key`, body) and answers with the status set by `/control/event-status?code=N`
//!   (default 200); `/control/event-flaky?percent=N` makes the first delivery of N of every
//!   100 event ids fail with 503. `/control/received` shows what was accepted, as JSON.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::Digest;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

type Body = BoxBody<Bytes, hyper::Error>;

static FAIL_PERCENT: AtomicU32 = AtomicU32::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static SERVED: AtomicU64 = AtomicU64::new(0);
static EVENT_STATUS: AtomicU32 = AtomicU32::new(200);
static EVENT_FLAKY: AtomicU32 = AtomicU32::new(0);

/// What the event subscriber accepted, in arrival order, and every id it has seen.
#[derive(Default)]
struct EventLog {
    /// (ce-id, sinew-key, body as text, when: ns since the Unix epoch)
    accepted: Vec<(String, String, String, u128)>,
    seen: std::collections::HashSet<String>,
    attempts: u64,
}

static EVENTS: std::sync::Mutex<Option<EventLog>> = std::sync::Mutex::new(None);

fn with_log<R>(f: impl FnOnce(&mut EventLog) -> R) -> R {
    let mut guard = EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(EventLog::default))
}

async fn event(request: Request<Incoming>) -> Response<Body> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (id, key) = (header("ce-id"), header("sinew-key"));
    let body = match request.into_body().collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(e) => return Response::new(full(format!("body error: {e}"))),
    };
    let status = EVENT_STATUS.load(Ordering::Relaxed) as u16;
    let flaky = EVENT_FLAKY.load(Ordering::Relaxed);
    let status = with_log(|log| {
        log.attempts += 1;
        let first = log.seen.insert(id.clone());
        let hash = id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let status = if first && hash % 100 < flaky {
            503
        } else {
            status
        };
        if (200..300).contains(&status) {
            let when = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            log.accepted.push((id, key, body, when));
        }
        status
    });
    let mut response = Response::new(full(format!("event status {status}")));
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response
}
static LATENCY_MS: AtomicU64 = AtomicU64::new(0);
static STALL_MS: AtomicU64 = AtomicU64::new(0);
static STALL_PERCENT: AtomicU32 = AtomicU32::new(0);
static STALL_COUNTER: AtomicU64 = AtomicU64::new(0);
static HEALTHY: AtomicBool = AtomicBool::new(true);
static HEALTH_CHECKS: AtomicU64 = AtomicU64::new(0);

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

fn query(request: &Request<Incoming>, key: &str) -> Option<u64> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if k == key { v.parse().ok() } else { None }
    })
}

async fn handle(
    request: Request<Incoming>,
    instance: String,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_string();
    let response = match path.as_str() {
        "/whoami" => {
            let mut delay = LATENCY_MS.load(Ordering::Relaxed);
            let stall = STALL_COUNTER.fetch_add(1, Ordering::Relaxed) % 100
                < u64::from(STALL_PERCENT.load(Ordering::Relaxed));
            if stall {
                delay += STALL_MS.load(Ordering::Relaxed);
            }
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if failing() {
                let mut response = Response::new(full("induced failure"));
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                response
            } else {
                SERVED.fetch_add(1, Ordering::Relaxed);
                Response::new(full(instance))
            }
        }
        "/control/fail" => {
            let percent = query(&request, "percent").unwrap_or(0).min(100) as u32;
            FAIL_PERCENT.store(percent, Ordering::Relaxed);
            Response::new(full(format!("failing {percent}%")))
        }
        "/control/latency" => {
            let ms = query(&request, "ms").unwrap_or(0);
            LATENCY_MS.store(ms, Ordering::Relaxed);
            Response::new(full(format!("latency {ms} ms")))
        }
        "/control/stall" => {
            let ms = query(&request, "ms").unwrap_or(0);
            let percent = query(&request, "percent").unwrap_or(0).min(100) as u32;
            STALL_MS.store(ms, Ordering::Relaxed);
            STALL_PERCENT.store(percent, Ordering::Relaxed);
            STALL_COUNTER.store(0, Ordering::Relaxed);
            Response::new(full(format!("stalling {percent}% for {ms} ms")))
        }
        "/control/stalled" => {
            let received = STALL_COUNTER.load(Ordering::Relaxed);
            let percent = u64::from(STALL_PERCENT.load(Ordering::Relaxed));
            let stalled = received / 100 * percent + (received % 100).min(percent);
            Response::new(full(stalled.to_string()))
        }
        "/control/health" => {
            let ok = query(&request, "ok").unwrap_or(1) != 0;
            HEALTHY.store(ok, Ordering::Relaxed);
            Response::new(full(format!("healthy {ok}")))
        }
        "/control/health-checks" => {
            Response::new(full(HEALTH_CHECKS.load(Ordering::Relaxed).to_string()))
        }
        "/health" => {
            HEALTH_CHECKS.fetch_add(1, Ordering::Relaxed);
            let mut response = Response::new(full("health"));
            if !HEALTHY.load(Ordering::Relaxed) {
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            response
        }
        "/control/served" => Response::new(full(SERVED.load(Ordering::Relaxed).to_string())),
        "/forge" => {
            // Does the work, then answers as if it were a sidecar refusing the request: the
            // caller's sidecar must not take that for a refusal and send it again.
            SERVED.fetch_add(1, Ordering::Relaxed);
            let _ = request.into_body().collect().await;
            let mut response = Response::new(full("done, but claiming to be unhealthy"));
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            response
                .headers_mut()
                .insert("sinew-error", HeaderValue::from_static("unhealthy"));
            response
        }
        "/big-header" => {
            // An answer whose head is `kb` KiB: past the mesh's head limit when large.
            let kb = query(&request, "kb").unwrap_or(70) as usize;
            let mut response = Response::new(full("big header"));
            if let Ok(value) = HeaderValue::from_str(&"c".repeat(kb * 1024)) {
                response.headers_mut().insert("x-big", value);
            }
            response
        }
        p if p.starts_with("/events/") && request.method() == http::Method::POST => {
            event(request).await
        }
        "/control/event-status" => {
            let code = query(&request, "code").unwrap_or(200) as u32;
            EVENT_STATUS.store(code, Ordering::Relaxed);
            Response::new(full(format!("events answered {code}")))
        }
        "/control/event-flaky" => {
            let percent = query(&request, "percent").unwrap_or(0).min(100) as u32;
            EVENT_FLAKY.store(percent, Ordering::Relaxed);
            Response::new(full(format!("first deliveries failing {percent}%")))
        }
        "/control/received" => {
            let json = with_log(|log| {
                let accepted: Vec<serde_json::Value> = log
                    .accepted
                    .iter()
                    .map(|(id, key, body, when)| {
                        serde_json::json!([id, key, body, when.to_string()])
                    })
                    .collect();
                serde_json::json!({
                    "count": log.accepted.len(),
                    "attempts": log.attempts,
                    "accepted": accepted,
                })
            });
            Response::new(full(json.to_string()))
        }
        "/echo" if failing() => {
            // Read the body first, as a real app would: a server that answers before reading
            // closes the connection under the sender, which then may see a reset instead of
            // the answer (see the README's known limits).
            let _ = request.into_body().collect().await;
            let mut response = Response::new(full("induced failure"));
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            response
        }
        "/echo" => {
            let mut response = Response::builder();
            for (name, value) in request.headers() {
                if let Ok(name) = HeaderName::from_bytes(format!("echo-{name}").as_bytes()) {
                    response = response.header(name, value.clone());
                }
            }
            response
                .body(request.into_body().boxed())
                .unwrap_or_else(|_| Response::new(full("bad")))
        }
        "/bytes" => {
            let n = query(&request, "n").unwrap_or(0);
            let chunk = Bytes::from((0..65536u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            let stream = futures_util::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let take = left.min(chunk.len() as u64) as usize;
                    Some((
                        Ok::<_, hyper::Error>(Frame::data(chunk.slice(..take))),
                        left - take as u64,
                    ))
                }
            });
            let mut response = Response::new(StreamBody::new(stream).boxed());
            response
                .headers_mut()
                .insert("content-length", HeaderValue::from(n));
            response
        }
        "/sink" => {
            let mut body = request.into_body();
            let mut hasher = sha2::Sha256::new();
            let mut length = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data() {
                            length += data.len() as u64;
                            hasher.update(&data);
                        }
                    }
                    Err(e) => return Ok(Response::new(full(format!("body error: {e}")))),
                }
            }
            let hex: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Response::new(full(format!("{length} {hex}")))
        }
        "/sse" => {
            // Server-sent events: `n` events, `ms` apart, each its own chunk.
            let n = query(&request, "n").unwrap_or(10);
            let ms = query(&request, "ms").unwrap_or(100);
            let stream = futures_util::stream::unfold(0u64, move |i| async move {
                if i == n {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let event = Bytes::from(format!("id: {i}\ndata: event {i}\n\n"));
                Some((Ok::<_, hyper::Error>(Frame::data(event)), i + 1))
            });
            let mut response = Response::new(StreamBody::new(stream).boxed());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            response
        }
        "/slow" => {
            let ms = query(&request, "ms").unwrap_or(1000);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            Response::new(full("slow"))
        }
        p if p.starts_with("/status/") => {
            let code = p["/status/".len()..].parse::<u16>().unwrap_or(500);
            let mut response = Response::new(full(format!("status {code}")));
            *response.status_mut() =
                http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
            response
        }
        _ => {
            let mut response = Response::new(full("not found"));
            *response.status_mut() = http::StatusCode::NOT_FOUND;
            response
        }
    };
    let mut response = response;
    if let Ok(value) = HeaderValue::from_str(&instance_header()) {
        response.headers_mut().insert("x-instance", value);
    }
    Ok(response)
}

/// Whether this request is one of the induced failures (N of every 100).
fn failing() -> bool {
    let n = REQUESTS.fetch_add(1, Ordering::Relaxed);
    n % 100 < u64::from(FAIL_PERCENT.load(Ordering::Relaxed))
}

fn instance_header() -> String {
    std::env::var("INSTANCE").unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")?.parse()?;
    let instance = instance_header();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening http={}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let instance = instance.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, instance.clone()));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
