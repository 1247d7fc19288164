//! `demo-orders`: the called service of the quick start.
//!
//! `GET /items/<id>` answers `{"id":<id>,"name":"item-<id>","served_by":"<instance>"}`, where
//! the instance is `$SINEW_INSTANCE` (set by `sinewctl up`) or `orders@<port>`, so you can see
//! the sidecars balance over the instances. Anything else is 404.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use hyper::{Method, StatusCode};
use serde_json::json;
use sinew_demo::{Reply, id_after, json, port_from_env, serve, text};
use std::sync::Arc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port = port_from_env(8081)?;
    let served_by: Arc<str> = std::env::var("SINEW_INSTANCE")
        .unwrap_or_else(|_| format!("orders@{port}"))
        .into();
    serve("demo-orders", port, move |req| {
        let served_by = served_by.clone();
        async move { item(req.method(), req.uri().path(), &served_by) }
    })
    .await
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
}
