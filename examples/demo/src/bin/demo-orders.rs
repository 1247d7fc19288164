//! `demo-orders`: the called service of the quick start.
//!
//! `GET /items/<id>` answers `{"id":<id>,"name":"item-<id>","served_by":"<instance>"}`, where
//! the instance is `$SINEW_INSTANCE` (set by `sinewctl up`) or `orders@<port>`, so you can see
//! the sidecars balance over the instances. `GET /healthz` answers `ok` (and publishes
//! nothing). Anything else is 404.
//!
//! Each order served is also published as an event: `POST /v1/events/order.created` to its
//! own sidecar (`$SINEW_OUTBOUND`), which stores it and delivers it to every subscribing
//! service (in the quick start, `billing`). Publishing does not hold up the answer.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use sinew_demo::{Reply, healthz, id_after, json, port_from_env, serve, text};
use std::sync::Arc;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port = port_from_env(8081)?;
    let served_by: Arc<str> = std::env::var("SINEW_INSTANCE")
        .unwrap_or_else(|_| format!("orders@{port}"))
        .into();
    let outbound: Arc<str> = std::env::var("SINEW_OUTBOUND")
        .unwrap_or_else(|_| "127.0.0.1:4140".into())
        .into();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    serve("demo-orders", port, move |req| {
        let served_by = served_by.clone();
        let (client, outbound) = (client.clone(), outbound.clone());
        async move {
            let (reply, order) = handle(req.method(), req.uri().path(), &served_by);
            if let Some(id) = order {
                tokio::spawn(publish(client, outbound, id, served_by));
            }
            reply
        }
    })
    .await
}

/// Publishes `order.created` for order `id` through the sidecar (keyed by the order, so
/// events of one order stay in order).
async fn publish(client: HttpClient, outbound: Arc<str>, id: u64, served_by: Arc<str>) {
    let body = json!({"order": id, "served_by": &*served_by}).to_string();
    let request = hyper::Request::post(format!("http://{outbound}/v1/events/order.created"))
        .header("content-type", "application/json")
        .header("sinew-key", format!("order-{id}"))
        .body(Full::new(Bytes::from(body)));
    let Ok(request) = request else {
        return;
    };
    match client.request(request).await {
        Ok(response) if response.status() == StatusCode::ACCEPTED => {}
        Ok(response) => eprintln!(
            "demo-orders: publishing order.created: {}",
            response.status()
        ),
        Err(e) => eprintln!("demo-orders: publishing order.created: {e}"),
    }
}

/// The answer, and the order to publish as `order.created` (only an item served).
fn handle(method: &Method, path: &str, served_by: &str) -> (Reply, Option<u64>) {
    if path == "/healthz" {
        return (healthz(), None);
    }
    let reply = item(method, path, served_by);
    let order = id_after(path, "/items/").filter(|_| reply.status() == StatusCode::OK);
    (reply, order)
}

fn item(method: &Method, path: &str, served_by: &str) -> Reply {
    match (method, id_after(path, "/items/")) {
        (&Method::GET, Some(id)) => json(
            StatusCode::OK,
            &json!({"id": id, "name": format!("item-{id}"), "served_by": served_by}),
        ),
        (_, Some(_)) => text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"),
        (_, None) => text(
            StatusCode::NOT_FOUND,
            "not found: try GET /items/<number>\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn items_and_not_found() {
        let reply = item(&Method::GET, "/items/42", "orders-1");
        assert_eq!(reply.status(), StatusCode::OK);
        let body = reply.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            br#"{"id":42,"name":"item-42","served_by":"orders-1"}"#
        );
        assert_eq!(
            item(&Method::GET, "/items/x", "o").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(item(&Method::GET, "/", "o").status(), StatusCode::NOT_FOUND);
        assert_eq!(
            item(&Method::POST, "/items/1", "o").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn a_health_check_answers_and_publishes_nothing() {
        let (reply, order) = handle(&Method::GET, "/healthz", "orders-1");
        assert_eq!(reply.status(), StatusCode::OK);
        assert_eq!(order, None);
        let body = reply.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok\n");
        assert_eq!(handle(&Method::GET, "/items/3", "o").1, Some(3));
        assert_eq!(handle(&Method::POST, "/items/3", "o").1, None);
        assert_eq!(handle(&Method::GET, "/nope", "o").1, None);
    }
}
