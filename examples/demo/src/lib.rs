//! What the demo services share: read `PORT`, serve HTTP/1.1 on 127.0.0.1, build responses.
//!
//! The demo apps know nothing about the mesh except the environment `sinewctl up` gives them
//! (`PORT`, `SINEW_OUTBOUND`, `SINEW_INSTANCE`): that is the point of a sidecar.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// The response type of every demo handler.
pub type Reply = Response<Full<Bytes>>;

/// `$PORT` as a port number, or `default` when unset.
pub fn port_from_env(default: u16) -> anyhow::Result<u16> {
    match std::env::var("PORT") {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("PORT={text} is not a port number")),
        Err(_) => Ok(default),
    }
}

/// Serves `handler` over HTTP/1.1 on 127.0.0.1:`port` until the process ends.
pub async fn serve<H, F>(name: &str, port: u16, handler: H) -> anyhow::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{name}: cannot listen on {addr}: {e}"))?;
    println!("{name} listening on http://{addr}");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("{name}: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let reply = handler(req);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            // A client that hangs up mid-request is not worth a log line.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body.into())));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(value.to_string())));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    reply
}

/// `GET /healthz`: what a health check (`health: /healthz` in a `sinewctl up` file) asks.
/// It only answers: a check never publishes, counts or changes anything.
pub fn healthz() -> Reply {
    text(StatusCode::OK, "ok\n")
}

/// The numeric id after `prefix` in `path` (`/items/7` with prefix `/items/` -> 7).
pub fn id_after(path: &str, prefix: &str) -> Option<u64> {
    path.strip_prefix(prefix)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_numbers_only() {
        assert_eq!(id_after("/items/7", "/items/"), Some(7));
        assert_eq!(id_after("/items/", "/items/"), None);
        assert_eq!(id_after("/items/7/x", "/items/"), None);
        assert_eq!(id_after("/items/-1", "/items/"), None);
        assert_eq!(id_after("/other/7", "/items/"), None);
    }
}
