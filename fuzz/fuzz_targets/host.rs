//! How the outbound names the service of an app's request: the request-target (origin or
//! absolute form) and the `Host` header. The input is `<target>\n<host>`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sinew_sidecar::events::api::is_events_request;
use sinew_sidecar::outbound::service_name;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (target, host) = text.split_once('\n').unwrap_or((&text, ""));
    let Ok(uri) = target.parse::<http::Uri>() else {
        return;
    };
    let mut request = http::Request::new(());
    *request.uri_mut() = uri;
    if let Ok(value) = http::HeaderValue::from_str(host) {
        request.headers_mut().insert(http::header::HOST, value);
    }
    let _ = is_events_request(&request);
    if let Ok(name) = service_name(&request) {
        // A name is lower case, without a port or a trailing dot.
        assert_eq!(name, name.to_ascii_lowercase());
        assert!(!name.ends_with('.'));
    }
});
