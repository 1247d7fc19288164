//! The plain HTTP port: `/healthz` for liveness probes and `/metrics` for Prometheus.
//!
//! Kept apart from the gRPC port so a scraper or a load balancer's probe needs no token and
//! no HTTP/2. Its limits are in [`serve`].

use crate::listen::{Limits, accept_loop};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The read buffer of a connection, which bounds a request head (hyper's minimum is 8 KiB).
const MAX_HEAD: usize = 16 * 1024;

/// Serves until `shutdown` turns true; open connections are dropped with the task.
///
/// HTTP/1.1 only (Prometheus and probes speak it). A connection must send each request's
/// headers within `limits.handshake_timeout` (an idle keep-alive connection too), or it is
/// closed; at most `limits.max_connections` are open.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size(MAX_HEAD);
    let conn_shutdown = shutdown.clone();
    accept_loop(
        listener,
        limits.max_connections,
        "http",
        shutdown,
        move |conn| {
            let metrics = metrics.clone();
            let builder = builder.clone();
            let mut conn_shutdown = conn_shutdown.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = route(&request, &metrics);
                    async move { Ok::<_, Infallible>(response) }
                });
                // The permit (its place in the count) lives until the connection ends.
                let (stream, _permit) = conn.into_parts();
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    result = conn => {
                        if let Err(e) = result {
                            tracing::debug!("http connection: {e}");
                        }
                    }
                    _ = conn_shutdown.changed() => {}
                }
            });
        },
    )
    .await;
}

fn route(request: &Request<Incoming>, metrics: &PrometheusHandle) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => {
            text(StatusCode::OK, "text/plain; charset=utf-8", "ok".into())
        }
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (_, "/healthz" | "/metrics") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use GET\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found (try /healthz or /metrics)\n".into(),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
