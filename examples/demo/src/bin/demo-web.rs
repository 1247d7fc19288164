//! `demo-web`: the calling service of the quick start.
//!
//! `GET /` (item 1) or `GET /order/<id>` calls `http://orders/items/<id>` through the local
//! sidecar — a plain TCP connection to `$SINEW_OUTBOUND` (default 127.0.0.1:4140) with
//! `Host: orders` — and answers `web got from orders: <orders' body>`. When the call fails it
//! answers 502 with the sidecar's status and its `sinew-error` reason, so you can watch the
//! mesh's decisions (timeouts, no endpoints, forbidden) from a browser. `GET /healthz`
//! answers `ok` without calling anything.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sinew_demo::{Reply, healthz, id_after, port_from_env, serve, text};
use std::sync::Arc;
use std::time::Duration;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

struct Web {
    client: HttpClient,
    outbound: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port = port_from_env(8080)?;
    let web = Arc::new(Web {
        client: Client::builder(TokioExecutor::new()).build_http(),
        outbound: std::env::var("SINEW_OUTBOUND").unwrap_or_else(|_| "127.0.0.1:4140".into()),
    });
    serve("demo-web", port, move |req| {
        let web = web.clone();
        async move {
            let path = req.uri().path();
            if path == "/healthz" {
                return healthz();
            }
            let id = match path {
                "/" => Some(1),
                _ => id_after(path, "/order/"),
            };
            match (req.method(), id) {
                (&Method::GET, Some(id)) => web.order(id).await,
                (_, Some(_)) => text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"),
                (_, None) => text(
                    StatusCode::NOT_FOUND,
                    "not found: try GET / or GET /order/<number>\n",
                ),
            }
        }
    })
    .await
}

impl Web {
    /// Fetches item `id` from the `orders` service through the sidecar.
    async fn order(&self, id: u64) -> Reply {
        let request = Request::get(format!("http://{}/items/{id}", self.outbound))
            .header(hyper::header::HOST, "orders")
            .body(Empty::new());
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("bad SINEW_OUTBOUND: {e}\n"),
                );
            }
        };
        let call = async {
            let response = self.client.request(request).await.map_err(|e| {
                format!(
                    "cannot reach the sidecar at {}: {}",
                    self.outbound,
                    root_cause(&e)
                )
            })?;
            let (head, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("reading the answer from orders: {e}"))?
                .to_bytes();
            Ok::<_, String>((head, body))
        };
        let (head, body) = match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(why)) => return text(StatusCode::BAD_GATEWAY, format!("{why}\n")),
            Err(_) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    "orders did not answer within 10s\n",
                );
            }
        };
        let body = String::from_utf8_lossy(&body);
        if head.status.is_success() {
            return text(StatusCode::OK, format!("web got from orders: {body}\n"));
        }
        let reason = head
            .headers
            .get("sinew-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        text(
            StatusCode::BAD_GATEWAY,
            format!(
                "orders call failed: status {}, sinew-error: {reason}: {}\n",
                head.status.as_u16(),
                body.trim_end()
            ),
        )
    }
}

/// The innermost error's text ("Connection refused") rather than the outermost ("client error").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
