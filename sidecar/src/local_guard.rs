//! Guards for the listeners meant for local programs only: the admin port and the events API
//! (`POST /v1/events/<topic>` addressed to the sidecar itself).
//!
//! Binding to 127.0.0.1 keeps other machines out, not web pages: a browser on the same
//! machine sends a page's requests to 127.0.0.1 too. Three rules close that door:
//!
//! - **Origin.** Browsers add `Origin` to cross-site requests (every POST); local programs
//!   (curl, the app's HTTP client, Prometheus) do not. A request with an `Origin` not listed
//!   in `--allowed-origins` (default: none) is refused with 403 `origin-not-allowed`.
//! - **Host.** A DNS-rebinding page reaches 127.0.0.1 under its own name, and the browser then
//!   treats the answers as same-origin and sends no `Origin`. It cannot change `Host`, so the
//!   admin port answers only `Host` values that are `localhost` or an IP literal (403
//!   `host-not-allowed`). The events API is picked by the same test (a request with another
//!   `Host` is a mesh request routed by service name, never an event).
//! - **`POST /shutdown` needs `sinew-admin: 1`.** A custom header makes a browser ask first
//!   (CORS preflight), which the admin port never grants; a page cannot send it.

use crate::errors::HEADER;
use crate::transport::{Body, BoxError};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

/// The header `POST /shutdown` must carry.
pub const ADMIN_HEADER: &str = "sinew-admin";

/// The origins `--allowed-origins` lets through (lower case, no trailing `/`).
#[derive(Debug, Clone, Default)]
pub struct LocalGuard {
    allowed_origins: Vec<String>,
}

impl LocalGuard {
    /// Validates `--allowed-origins`: each `scheme://host[:port]`, or `null`.
    pub fn new(origins: &[String]) -> Result<LocalGuard, String> {
        let mut allowed_origins = Vec::new();
        for origin in origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
            let normal = origin.trim_end_matches('/').to_ascii_lowercase();
            let valid = normal == "null"
                || normal
                    .split_once("://")
                    .is_some_and(|(scheme, rest)| !scheme.is_empty() && !rest.is_empty())
                    && normal.parse::<http::Uri>().is_ok();
            if !valid {
                return Err(format!(
                    "`{origin}` is not an origin such as http://localhost:3000 (scheme://host[:port]) or null"
                ));
            }
            allowed_origins.push(normal);
        }
        Ok(LocalGuard { allowed_origins })
    }

    /// 403 `origin-not-allowed` for an `Origin` header not listed in `--allowed-origins`.
    pub fn check_origin(&self, headers: &HeaderMap, listener: &'static str) -> Result<(), Refused> {
        let Some(origin) = headers.get(http::header::ORIGIN) else {
            return Ok(());
        };
        let text = origin.to_str().unwrap_or("(not text)");
        let normal = text.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed_origins.contains(&normal) {
            return Ok(());
        }
        Err(Refused {
            listener,
            reason: "origin-not-allowed",
            message: format!(
                "requests from web pages are refused: Origin `{text}` is not in --allowed-origins"
            ),
        })
    }
}

/// 403 `host-not-allowed` unless the request is addressed to `localhost` or an IP literal.
pub fn check_host<B>(request: &Request<B>, listener: &'static str) -> Result<(), Refused> {
    if host_is_local(request) {
        return Ok(());
    }
    Err(Refused {
        listener,
        reason: "host-not-allowed",
        message: format!(
            "Host `{}` is not localhost or an IP address (a web page's DNS name pointing here?)",
            request_host(request).unwrap_or_default()
        ),
    })
}

/// 403 `admin-header-required` unless `sinew-admin` is present.
pub fn check_admin_header(headers: &HeaderMap) -> Result<(), Refused> {
    if headers.contains_key(ADMIN_HEADER) {
        return Ok(());
    }
    Err(Refused {
        listener: "admin",
        reason: "admin-header-required",
        message: format!(
            "POST /shutdown needs the header `{ADMIN_HEADER}: 1` (which a web page cannot send)"
        ),
    })
}

/// The host a request is addressed to: the absolute URI's, else the `Host` header's, without
/// the port. `None` when neither is there (HTTP/1.0).
pub fn request_host<B>(request: &Request<B>) -> Option<String> {
    match request.uri().host() {
        Some(host) => Some(host.to_string()),
        None => request.headers().get(http::header::HOST).map(|h| {
            h.to_str()
                .ok()
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .map(|a| a.host().to_string())
                // A Host that does not parse is nobody's name: refused, not absent.
                .unwrap_or_else(|| String::from_utf8_lossy(h.as_bytes()).into_owned())
        }),
    }
}

/// Whether the request is addressed to this machine by `localhost` or an IP literal (or
/// names no host at all).
pub fn host_is_local<B>(request: &Request<B>) -> bool {
    match request_host(request) {
        None => true,
        Some(host) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok()
        }
    }
}

/// A request refused by a guard.
#[derive(Debug)]
pub struct Refused {
    listener: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl Refused {
    /// 403 with `sinew-error: <reason>`; counted in `sinew_local_refused_total`.
    pub fn into_response(self) -> Response<Body> {
        metrics::counter!("sinew_local_refused_total", "listener" => self.listener, "reason" => self.reason)
            .increment(1);
        let mut response = Response::new(
            Full::new(Bytes::from(format!("{}\n", self.message)))
                .map_err(|never| -> BoxError { match never {} })
                .boxed(),
        );
        *response.status_mut() = StatusCode::FORBIDDEN;
        let headers = response.headers_mut();
        headers.insert(HEADER, HeaderValue::from_static(self.reason));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::post(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_listed_origins_pass() {
        let guard = LocalGuard::new(&["http://Dash.local:3000/".into()]).unwrap();
        let origin = |o: &str| {
            let r = request("/", &[("origin", o)]);
            guard
                .check_origin(r.headers(), "admin")
                .map_err(|e| e.reason)
        };
        assert_eq!(origin("http://dash.local:3000"), Ok(()));
        assert_eq!(origin("http://evil.example"), Err("origin-not-allowed"));
        assert_eq!(origin("null"), Err("origin-not-allowed"));
        let none = request("/", &[]);
        assert!(guard.check_origin(none.headers(), "admin").is_ok());
        let default = LocalGuard::default();
        let r = request("/", &[("origin", "http://localhost:3000")]);
        assert!(default.check_origin(r.headers(), "admin").is_err());
        assert!(LocalGuard::new(&["dash.local".into()]).is_err());
        assert!(LocalGuard::new(&["null".into()]).is_ok());
    }

    #[test]
    fn hosts_must_be_localhost_or_an_ip() {
        let local = |uri: &str, host: Option<&str>| {
            let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
            host_is_local(&request(uri, &headers))
        };
        assert!(local("/", Some("127.0.0.1:4191")));
        assert!(local("/", Some("LOCALHOST:4191")));
        assert!(local("/", Some("[::1]:4191")));
        assert!(local("/", Some("10.1.2.3")));
        assert!(local("http://[::1]:4191/", None));
        assert!(local("/", None));
        assert!(!local("/", Some("evil.example:4191")));
        assert!(!local("/", Some("localhost.evil.example")));
        assert!(!local("/", Some("127.0.0.1.nip.io")));
        assert!(!local("/", Some("bad host")));
        assert!(!local("http://evil.example/", Some("127.0.0.1")));
        let r = request("/", &[("host", "evil.example")]);
        assert_eq!(
            check_host(&r, "admin").map_err(|e| e.reason),
            Err("host-not-allowed")
        );
    }

    #[test]
    fn shutdown_needs_the_admin_header() {
        assert!(check_admin_header(request("/", &[]).headers()).is_err());
        assert!(check_admin_header(request("/", &[(ADMIN_HEADER, "1")]).headers()).is_ok());
    }
}
