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
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| TransportError::Connect {
            addr,
            detail: e.to_string(),
        })?;
        let (parts, body) = request.into_parts();
        let end_stream = http_body::Body::is_end_stream(&body);
        let head = RequestHead {
            method: parts.method.as_str().to_string(),
            authority: parts.uri.host().unwrap_or_default().to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            headers: frame::to_proto_headers(&parts.headers, true),
            end_stream,
        };
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
        *response.status_mut() =
            http::StatusCode::from_u16(head.status as u16).map_err(|_| TransportError::Reset {
                addr,
                detail: format!("peer sent status {}", head.status),
            })?;
        *response.headers_mut() = frame::from_proto_headers(&head.headers)
            .map_err(|detail| TransportError::Reset { addr, detail })?;
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

/// The declared body length, if any.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The inbound half: reads a request off an accepted stream. The URI is origin-form
/// (`/path?query`); the authority the caller asked for is returned beside it.
pub async fn read_request(recv: quinn::RecvStream) -> Result<(String, Request<Body>), FrameError> {
    let mut recv = recv;
    let head: RequestHead = frame::read_head(&mut recv).await?;
    let headers = frame::from_proto_headers(&head.headers).map_err(FrameError::Protocol)?;
    let method = http::Method::from_bytes(head.method.as_bytes())
        .map_err(|_| FrameError::Protocol(format!("invalid method {:?}", head.method)))?;
    let uri: http::Uri = head
        .path
        .parse()
        .map_err(|_| FrameError::Protocol(format!("invalid path {:?}", head.path)))?;
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

/// The inbound half: writes a response (head, then its body as it comes) onto the stream.
pub async fn write_response(
    send: &mut quinn::SendStream,
    response: Response<Body>,
) -> Result<(), FrameError> {
    let (parts, body) = response.into_parts();
    let head = ResponseHead {
        status: u32::from(parts.status.as_u16()),
        headers: frame::to_proto_headers(&parts.headers, true),
        end_stream: http_body::Body::is_end_stream(&body),
    };
    frame::write_message(send, frame::HEAD, &head).await?;
    frame::send_body(body, send).await
}
