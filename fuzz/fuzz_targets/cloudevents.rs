//! The events API's decoders: binary mode (`ce-*` headers + body), structured mode (one
//! CloudEvents JSON object) and batches (a JSON array of them). The first byte picks a
//! mode; the rest is the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sinew_sidecar::events::wire::{self, Origin};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let origin = Origin {
        source: "/svc/fuzz".into(),
        publisher: "fuzz".into(),
    };
    match selector % 3 {
        0 => {
            // Lines of `name: value` headers, a blank line, then the body.
            let text = String::from_utf8_lossy(rest);
            let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
            let mut headers = http::HeaderMap::new();
            for line in head.lines() {
                if let Some((name, value)) = line.split_once(':')
                    && let (Ok(name), Ok(value)) = (
                        http::HeaderName::from_bytes(name.trim().as_bytes()),
                        http::HeaderValue::from_str(value.trim()),
                    )
                {
                    headers.append(name, value);
                }
            }
            let content_type = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            let _ = wire::mode(content_type);
            if let Ok(event) = wire::from_binary(
                "fuzz.topic",
                &headers,
                bytes::Bytes::copy_from_slice(body.as_bytes()),
                &origin,
            ) {
                let _ = wire::with_key_header(event, &headers);
            }
        }
        1 => {
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) {
                let _ = wire::from_json("fuzz.topic", &value, &origin);
            }
        }
        _ => {
            if let Ok(entries) = serde_json::from_slice::<Vec<serde_json::Value>>(rest) {
                for entry in &entries {
                    let _ = wire::from_json("fuzz.topic", entry, &origin);
                }
            }
        }
    }
});
