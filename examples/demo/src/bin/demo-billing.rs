//! `demo-billing`: the event subscriber of the quick start.
//!
//! Its sidecar delivers every `order.created` event as `POST /events/order.created` with
//! CloudEvents headers. It keeps the ids it received (`ce-id`; a redelivery is counted once)
//! and answers `GET /received` with `{"served_by", "count", "ids"}` (the last 20 ids).

#![cfg_attr(test, allow(clippy::unwrap_used))]

use hyper::{Method, StatusCode};
use serde_json::json;
use sinew_demo::{Reply, json, port_from_env, serve, text};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Received {
    seen: HashSet<String>,
    ids: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port = port_from_env(8082)?;
    let served_by: Arc<str> = std::env::var("SINEW_INSTANCE")
        .unwrap_or_else(|_| format!("billing@{port}"))
        .into();
    let received = Arc::new(Mutex::new(Received::default()));
    serve("demo-billing", port, move |req| {
        let (served_by, received) = (served_by.clone(), received.clone());
        async move {
            let id = req
                .headers()
                .get("ce-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            handle(req.method(), req.uri().path(), id, &served_by, &received)
        }
    })
    .await
}

fn handle(
    method: &Method,
    path: &str,
    id: Option<String>,
    served_by: &str,
    received: &Mutex<Received>,
) -> Reply {
    let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
    match (method, path) {
        (&Method::POST, "/events/order.created") => match id {
            Some(id) => {
                if received.seen.insert(id.clone()) {
                    received.ids.push(id);
                }
                text(StatusCode::NO_CONTENT, "")
            }
            None => text(StatusCode::BAD_REQUEST, "no ce-id: not a CloudEvent\n"),
        },
        (&Method::GET, "/received") => {
            let last: Vec<&String> = received.ids.iter().rev().take(20).collect();
            json(
                StatusCode::OK,
                &json!({"served_by": served_by, "count": received.ids.len(), "ids": last}),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: POST /events/order.created, GET /received\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn counts_each_event_once() {
        let r = Mutex::new(Received::default());
        let post = |id: &str| {
            handle(
                &Method::POST,
                "/events/order.created",
                Some(id.into()),
                "b-1",
                &r,
            )
            .status()
        };
        assert_eq!(post("e1"), StatusCode::NO_CONTENT);
        assert_eq!(post("e1"), StatusCode::NO_CONTENT);
        assert_eq!(post("e2"), StatusCode::NO_CONTENT);
        let none = handle(&Method::POST, "/events/order.created", None, "b-1", &r);
        assert_eq!(none.status(), StatusCode::BAD_REQUEST);
        let reply = handle(&Method::GET, "/received", None, "b-1", &r);
        let body = reply.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["count"], 2);
        assert_eq!(v["ids"], json!(["e2", "e1"]));
    }
}
