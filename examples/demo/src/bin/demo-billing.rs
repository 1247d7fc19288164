//! `demo-billing`: the event subscriber of the quick start.
//!
//! Its sidecar delivers every `order.created` event as `POST /events/order.created` with
//! CloudEvents headers. It keeps the ids it received (`ce-id`; a redelivery is counted once)
//! and answers `GET /received` with `{"served_by", "count", "ids"}` (the last 20 ids), and
//! `GET /received?all=1` with every id in arrival order plus `deliveries`, how many times
//! each id arrived (more than 1: redelivered), so delivery can be checked event by event.
//! `GET /healthz` answers `ok` and counts nothing.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use hyper::{Method, StatusCode};
use serde_json::json;
use sinew_demo::{Reply, healthz, json, port_from_env, serve, text};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Received {
    /// Per id, how many times it was delivered.
    deliveries: HashMap<String, u64>,
    /// Distinct ids in arrival order.
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
            let uri = req.uri();
            handle(
                req.method(),
                uri.path(),
                uri.query(),
                id,
                &served_by,
                &received,
            )
        }
    })
    .await
}

fn handle(
    method: &Method,
    path: &str,
    query: Option<&str>,
    id: Option<String>,
    served_by: &str,
    received: &Mutex<Received>,
) -> Reply {
    let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
    match (method, path) {
        (&Method::POST, "/events/order.created") => match id {
            Some(id) => {
                let count = received.deliveries.entry(id.clone()).or_insert(0);
                *count += 1;
                if *count == 1 {
                    received.ids.push(id);
                }
                text(StatusCode::NO_CONTENT, "")
            }
            None => text(StatusCode::BAD_REQUEST, "no ce-id: not a CloudEvent\n"),
        },
        (&Method::GET, "/received")
            if query.is_some_and(|q| q.split('&').any(|p| p == "all=1")) =>
        {
            json(
                StatusCode::OK,
                &json!({
                    "served_by": served_by,
                    "count": received.ids.len(),
                    "ids": received.ids,
                    "deliveries": received.deliveries,
                }),
            )
        }
        (&Method::GET, "/received") => {
            let last: Vec<&String> = received.ids.iter().rev().take(20).collect();
            json(
                StatusCode::OK,
                &json!({"served_by": served_by, "count": received.ids.len(), "ids": last}),
            )
        }
        (&Method::GET, "/healthz") => healthz(),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: POST /events/order.created, GET /received[?all=1], GET /healthz\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn get(r: &Mutex<Received>, query: Option<&str>) -> serde_json::Value {
        let reply = handle(&Method::GET, "/received", query, None, "b-1", r);
        let body = reply.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn counts_each_event_once() {
        let r = Mutex::new(Received::default());
        let post = |id: &str| {
            handle(
                &Method::POST,
                "/events/order.created",
                None,
                Some(id.into()),
                "b-1",
                &r,
            )
            .status()
        };
        assert_eq!(post("e1"), StatusCode::NO_CONTENT);
        assert_eq!(post("e1"), StatusCode::NO_CONTENT);
        assert_eq!(post("e2"), StatusCode::NO_CONTENT);
        let none = handle(
            &Method::POST,
            "/events/order.created",
            None,
            None,
            "b-1",
            &r,
        );
        assert_eq!(none.status(), StatusCode::BAD_REQUEST);
        let v = get(&r, None).await;
        assert_eq!(v["count"], 2);
        assert_eq!(v["ids"], json!(["e2", "e1"]));
        // A health check counts nothing.
        let health = handle(&Method::GET, "/healthz", None, None, "b-1", &r);
        assert_eq!(health.status(), StatusCode::OK);
        assert_eq!(get(&r, None).await["count"], 2);
    }

    #[tokio::test]
    async fn all_ids_and_their_deliveries_past_the_last_20() {
        let r = Mutex::new(Received::default());
        for i in 0..25 {
            let id = format!("e{i}");
            handle(
                &Method::POST,
                "/events/order.created",
                None,
                Some(id),
                "b-1",
                &r,
            );
        }
        handle(
            &Method::POST,
            "/events/order.created",
            None,
            Some("e3".into()),
            "b-1",
            &r,
        );
        let v = get(&r, Some("all=1")).await;
        assert_eq!(v["count"], 25);
        assert_eq!(v["ids"].as_array().unwrap().len(), 25);
        assert_eq!(v["ids"][0], "e0");
        assert_eq!(v["deliveries"]["e3"], 2);
        assert_eq!(v["deliveries"]["e24"], 1);
    }
}
