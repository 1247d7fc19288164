//! The QUIC transport: a pool of one connection per peer sidecar, one bidirectional stream
//! per request, and the inbound half that reads requests off accepted streams.

use super::frame::{self, FrameError};
use super::tls;
use super::{Body, Target, Transport, TransportError};
use http::{Request, Response};
use quinn::{Connection, ConnectionError, Endpoint, ReadError};
use sinew_proto::v1::{RequestHead, ResponseHead};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Slot = Arc<tokio::sync::Mutex<Option<Connection>>>;

/// The client half: pooled, mutually authenticated connections to peer sidecars.
pub struct QuicTransport {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    /// One slot per peer address *and* the identity expected there: if the control plane says
    /// another service now lives at an address, the old connection is not reused. (Keyed by
    /// address, then identity, so a request finds its slot without copying the identity.) The
    /// std mutex guards only the map (never held across an await); a slot's async mutex makes
    /// concurrent first requests share one handshake.
    pool: Mutex<HashMap<SocketAddr, Vec<(String, Slot)>>>,
}

impl QuicTransport {
    pub fn new(endpoint: Endpoint, config: quinn::ClientConfig) -> Self {
        QuicTransport {
            endpoint,
            config,
            pool: Mutex::new(HashMap::new()),
        }
    }

    /// Number of live pooled connections.
    pub fn connections(&self) -> usize {
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.values()
            .flatten()
            .map(|(_, slot)| slot)
            .filter(|slot| {
                slot.try_lock()
                    .map(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
                    .unwrap_or(true)
            })
            .count()
    }

    async fn connection(
        &self,
        target: &Target,
        connect_timeout: Duration,
    ) -> Result<Connection, TransportError> {
        let slot = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            let slots = pool.entry(target.addr).or_default();
            match slots.iter().find(|(id, _)| *id == target.identity) {
                Some((_, slot)) => slot.clone(),
                None => {
                    let slot = Slot::default();
                    slots.push((target.identity.clone(), slot.clone()));
                    slot
                }
            }
        };
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref()
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        *guard = None;
        let conn = self.connect(target, connect_timeout).await?;
        metrics::counter!("sinew_quic_connections_opened_total").increment(1);
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(
        &self,
        target: &Target,
        connect_timeout: Duration,
    ) -> Result<Connection, TransportError> {
        let connect_error = |detail: String| TransportError::Connect {
            addr: target.addr,
            detail,
        };
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), target.addr, "sinew.mesh")
            .map_err(|e| connect_error(e.to_string()))?;
        let conn = match tokio::time::timeout(connect_timeout, connecting).await {
            Err(_) => {
                return Err(connect_error(format!(
                    "no handshake within {connect_timeout:?}"
                )));
            }
            Ok(Err(e)) if is_tls_refusal(&e) => {
                return Err(TransportError::Refused {
                    addr: target.addr,
                    detail: e.to_string(),
                });
            }
            Ok(Err(e)) => return Err(connect_error(e.to_string())),
            Ok(Ok(conn)) => conn,
        };
        match tls::peer_spiffe_id(&conn) {
            Some(id) if id == target.identity => Ok(conn),
            other => {
                conn.close(quinn::VarInt::from_u32(1), b"unexpected identity");
                Err(TransportError::Refused {
                    addr: target.addr,
                    detail: format!(
                        "peer is {}, expected {}",
                        other.as_deref().unwrap_or("(no spiffe id)"),
                        target.identity
                    ),
                })
            }
        }
    }

    fn evict(&self, target: &Target, conn: &Connection) {
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, slot)) = pool
            .get(&target.addr)
            .and_then(|slots| slots.iter().find(|(id, _)| *id == target.identity))
            && let Ok(mut guard) = slot.try_lock()
            && guard
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            *guard = None;
        }
    }

    /// Sends the request on a new stream and reads the response head. Nothing reached the
    /// peer's app when this fails with `Connect`/`Refused`.
    async fn exchange(
        &self,
        target: &Target,
        conn: &Connection,
        request: Request<Body>,
    ) -> Result<Response<Body>, TransportError> {
        let addr = target.addr;
        let (parts, body) = request.into_parts();
        let end_stream = http_body::Body::is_end_stream(&body);
        let head = request_head(&parts, end_stream);
        // A head the framing cannot carry is the caller's error: refused before a stream is
        // opened, so the peer never sees it and never counts as failing.
        frame::check_head_len(&head).map_err(|len| TransportError::RequestHeadTooLarge {
            len,
            max: frame::MAX_HEAD_LEN as usize,
        })?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| TransportError::Connect {
            addr,
            detail: e.to_string(),
        })?;
        frame::write_message(&mut send, frame::HEAD, &head)
            .await
            .map_err(|e| classify(addr, e))?;
        // The request body streams on its own task. It is reset (not finished: the peer must
        // not take a truncated body for a whole one) when the exchange is abandoned: dropped
        // before the response head (timeout, client gone) or, later, when the response body
        // ends or is dropped, which holds `cancel` from then on. A request without a body
        // (most GETs) needs no task: the stream's sending side just ends after the head.
        let cancel = if end_stream {
            let _ = send.finish();
            None
        } else {
            let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                tokio::select! {
                    result = frame::send_body(body, &mut send) => {
                        if let Err(e) = result {
                            tracing::debug!("request body to {addr} ended early: {e}");
                        }
                    }
                    _ = cancelled => {
                        let _ = send.reset(frame::CANCELLED);
                    }
                }
            });
            Some(cancel)
        };
        let head: ResponseHead = frame::read_head(&mut recv)
            .await
            .map_err(|e| classify(addr, e))?;
        let mut response = Response::new(Body::default());
        *response.status_mut() = status(head.status).map_err(|detail| {
            let _ = recv.stop(frame::PROTOCOL_ERROR);
            TransportError::Reset { addr, detail }
        })?;
        *response.headers_mut() = frame::from_proto_headers(&head.headers)
            .map_err(|detail| TransportError::Reset { addr, detail })?;
        if !head.sidecar_error.is_empty() {
            response.extensions_mut().insert(super::SidecarAnswer {
                reason: head.sidecar_error,
                refused: head.refused,
            });
        }
        if head.end_stream {
            // No body: nothing to read, so no reader task. Ending here ends the exchange as
            // the end of a body would (`cancel` dropped).
            frame::end_of_stream(recv).map_err(|e| classify(addr, e))?;
        } else {
            let length = content_length(response.headers());
            *response.body_mut() = frame::recv_body(recv, length, cancel);
        }
        Ok(response)
    }
}

impl Transport for QuicTransport {
    async fn send(
        &self,
        target: &Target,
        request: Request<Body>,
    ) -> Result<Response<Body>, TransportError> {
        let conn = self.connection(target, target.connect_timeout).await?;
        let result = self.exchange(target, &conn, request).await;
        if let Err(e) = &result
            && (conn.close_reason().is_some() || e.is_connect_failure())
        {
            self.evict(target, &conn);
        }
        result
    }

    fn check_head(&self, parts: &http::request::Parts) -> Result<(), (usize, usize)> {
        let max = frame::MAX_HEAD_LEN as usize;
        // A bound first (each header costs its name, value and at most 12 bytes of protobuf
        // framing), so the usual small head costs no encoding here.
        let bound = 64
            + parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
            + parts.uri.host().map_or(0, str::len)
            + parts.method.as_str().len()
            + parts
                .headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 12)
                .sum::<usize>();
        if bound <= max {
            return Ok(());
        }
        frame::check_head_len(&request_head(parts, false))
            .map(|_| ())
            .map_err(|len| (len, max))
    }
}

/// A TLS alert from the peer: it did not accept our certificate. With TLS 1.3 the client
/// learns this only after its side of the handshake is done, often at the first read.
fn is_tls_refusal(e: &ConnectionError) -> bool {
    match e {
        ConnectionError::ConnectionClosed(close) => {
            (0x100..0x200).contains(&u64::from(close.error_code))
        }
        _ => false,
    }
}

fn classify(addr: SocketAddr, e: FrameError) -> TransportError {
    match e {
        FrameError::TooLarge { len, limit, .. } => TransportError::ResponseHeadTooLarge {
            addr,
            len: len as usize,
            max: limit as usize,
        },
        FrameError::Read(ReadError::ConnectionLost(ref lost))
        | FrameError::Write(quinn::WriteError::ConnectionLost(ref lost))
            if is_tls_refusal(lost) =>
        {
            TransportError::Refused {
                addr,
                detail: lost.to_string(),
            }
        }
        other => TransportError::Reset {
            addr,
            detail: other.to_string(),
        },
    }
}

/// The request head as the framing carries it: origin-form path, the service as authority,
/// hop-by-hop headers dropped.
pub fn request_head(parts: &http::request::Parts, end_stream: bool) -> RequestHead {
    RequestHead {
        method: parts.method.as_str().to_string(),
        authority: parts.uri.host().unwrap_or_default().to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: frame::to_proto_headers(&parts.headers, true),
        end_stream,
    }
}

/// A status off the wire: three digits (100-999, as `http` accepts), else a protocol error.
/// (A plain `as u16` would wrap 65,736 to 200.)
fn status(code: u32) -> Result<http::StatusCode, String> {
    u16::try_from(code)
        .ok()
        .and_then(|code| http::StatusCode::from_u16(code).ok())
        .ok_or_else(|| format!("peer sent status {code}, not a three-digit HTTP status"))
}

/// The declared body length, if any.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A request head off the wire, as HTTP takes it: its method, its origin-form URI, its
/// headers; anything no HTTP stack would accept is a protocol error. (Pure: fuzzed.)
pub fn request_parts(
    head: &RequestHead,
) -> Result<(http::Method, http::Uri, http::HeaderMap), FrameError> {
    let headers = frame::from_proto_headers(&head.headers).map_err(FrameError::Protocol)?;
    let method = http::Method::from_bytes(head.method.as_bytes())
        .map_err(|_| FrameError::Protocol(format!("invalid method {:?}", head.method)))?;
    let uri: http::Uri = head
        .path
        .parse()
        .map_err(|_| FrameError::Protocol(format!("invalid path {:?}", head.path)))?;
    Ok((method, uri, headers))
}

/// A response head off the wire: its status (three digits) and headers.
pub fn response_parts(head: &ResponseHead) -> Result<(http::StatusCode, http::HeaderMap), String> {
    Ok((
        status(head.status)?,
        frame::from_proto_headers(&head.headers)?,
    ))
}

/// The inbound half: reads a request off an accepted stream. The URI is origin-form
/// (`/path?query`); the authority the caller asked for is returned beside it.
pub async fn read_request(recv: quinn::RecvStream) -> Result<(String, Request<Body>), FrameError> {
    let mut recv = recv;
    let head: RequestHead = frame::read_head(&mut recv).await?;
    let (method, uri, headers) = request_parts(&head)?;
    let body = if head.end_stream {
        frame::end_of_stream(recv)?;
        Body::default()
    } else {
        frame::recv_body(recv, content_length(&headers), ())
    };
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok((head.authority, request))
}

/// A response ready for the stream: its head as the framing carries it, and its body.
pub struct OutgoingResponse {
    head: ResponseHead,
    body: Body,
}

impl OutgoingResponse {
    /// Frames a response for the stream. An answer of the sidecar itself
    /// ([`super::SidecarAnswer`] in the extensions) says so in the head's framing. A head the
    /// framing cannot carry is refused here, before anything is written: `Err(encoded length)`
    /// (the response is dropped; the caller answers something else).
    pub fn new(response: Response<Body>) -> Result<Self, usize> {
        let (parts, body) = response.into_parts();
        let head = ResponseHead {
            status: u32::from(parts.status.as_u16()),
            headers: frame::to_proto_headers(&parts.headers, true),
            end_stream: http_body::Body::is_end_stream(&body),
            sidecar_error: String::new(),
            refused: false,
        };
        let mut head = head;
        if let Some(answer) = parts.extensions.get::<super::SidecarAnswer>() {
            head.sidecar_error = answer.reason.clone();
            head.refused = answer.refused;
        }
        frame::check_head_len(&head)?;
        Ok(OutgoingResponse { head, body })
    }

    pub fn status(&self) -> http::StatusCode {
        status(self.head.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Writes the head, then the body as it comes.
    pub async fn write(self, send: &mut quinn::SendStream) -> Result<(), FrameError> {
        frame::write_message(send, frame::HEAD, &self.head).await?;
        frame::send_body(self.body, send).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_off_the_wire_are_three_digits_or_refused() {
        assert_eq!(status(200), Ok(http::StatusCode::OK));
        assert_eq!(status(999).map(|s| s.as_u16()), Ok(999));
        for bad in [0, 99, 1000, 65_736, 70_000, u32::MAX] {
            // 65,736 as u16 is 200: the old cast turned it into a success.
            assert!(status(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_response_head_over_the_limit_is_refused_before_writing() {
        let mut response = Response::new(Body::default());
        response.headers_mut().insert(
            "x-big",
            http::HeaderValue::from_str(&"a".repeat(frame::MAX_HEAD_LEN as usize)).unwrap(),
        );
        let len = OutgoingResponse::new(response).err().expect("too large");
        assert!(len > frame::MAX_HEAD_LEN as usize);

        let mut refusal = Response::new(Body::default());
        refusal
            .extensions_mut()
            .insert(super::super::SidecarAnswer {
                reason: "unhealthy".into(),
                refused: true,
            });
        let framed = OutgoingResponse::new(refusal).expect("fits");
        assert_eq!(framed.head.sidecar_error, "unhealthy");
        assert!(framed.head.refused);
        let plain = OutgoingResponse::new(Response::new(Body::default())).expect("fits");
        assert!(plain.head.sidecar_error.is_empty() && !plain.head.refused);
    }
}
