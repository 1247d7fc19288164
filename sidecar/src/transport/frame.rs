//! The framing on a request's QUIC stream (see `proto/sinew/mesh/v1/transport.proto`):
//! `[type: u8][length: u32 BE][payload]`, HEAD first, DATA as the body comes, TRAILERS
//! optionally, then FIN. Bodies are never gathered whole: each DATA frame is forwarded as its
//! chunks arrive, so QUIC flow control is the only buffer.

use super::{Body, BoxError};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use quinn::{RecvStream, SendStream, VarInt};
use sinew_proto::v1::Header;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pub const HEAD: u8 = 1;
pub const DATA: u8 = 2;
pub const TRAILERS: u8 = 3;

/// Largest HEAD or TRAILERS frame accepted (the same bound HTTP servers put on headers).
pub const MAX_HEAD_LEN: u32 = 64 * 1024;
/// Largest DATA frame accepted; senders write at most [`MAX_WRITE_CHUNK`].
pub const MAX_DATA_LEN: u32 = 4 << 20;
const MAX_WRITE_CHUNK: usize = 256 * 1024;

/// Stream reset codes.
pub const CANCELLED: VarInt = VarInt::from_u32(1);
pub const BODY_ERROR: VarInt = VarInt::from_u32(2);
pub const PROTOCOL_ERROR: VarInt = VarInt::from_u32(3);
/// The request head did not arrive in time.
pub const TIMED_OUT: VarInt = VarInt::from_u32(4);

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream ended")]
    End,
    #[error("{0}")]
    Read(#[from] quinn::ReadError),
    #[error("{0}")]
    Write(#[from] quinn::WriteError),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A frame longer than its type's limit: refused before any of its payload is read.
    #[error("frame type {kind} of {len} bytes exceeds the limit of {limit}")]
    TooLarge { kind: u8, len: u32, limit: u32 },
}

fn header_bytes(kind: u8, len: usize) -> [u8; 5] {
    let len = (len as u32).to_be_bytes();
    [kind, len[0], len[1], len[2], len[3]]
}

/// Writes one HEAD or TRAILERS frame holding a protobuf message.
pub async fn write_message(
    send: &mut SendStream,
    kind: u8,
    message: &impl Message,
) -> Result<(), FrameError> {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_slice(&header_bytes(kind, len));
    message
        .encode(&mut buf)
        .map_err(|e| FrameError::Protocol(e.to_string()))?;
    send.write_chunk(buf.freeze()).await?;
    Ok(())
}

/// Writes body bytes as one or more DATA frames, without copying them.
pub async fn write_data(send: &mut SendStream, mut data: Bytes) -> Result<(), FrameError> {
    while !data.is_empty() {
        let part = data.split_to(data.len().min(MAX_WRITE_CHUNK));
        let mut chunks = [
            Bytes::copy_from_slice(&header_bytes(DATA, part.len())),
            part,
        ];
        send.write_all_chunks(&mut chunks).await?;
    }
    Ok(())
}

/// Reads a frame's type and length; `Err(End)` at a clean end of stream.
pub async fn read_frame_header(recv: &mut RecvStream) -> Result<(u8, u32), FrameError> {
    let mut header = [0u8; 5];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(FrameError::End),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Protocol(format!(
                "stream ended inside a frame header ({n} of 5 bytes)"
            )));
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    parse_frame_header(&header)
}

/// A frame header's type and length, with the length checked against the type's limit.
pub fn parse_frame_header(header: &[u8; 5]) -> Result<(u8, u32), FrameError> {
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let limit = if header[0] == DATA {
        MAX_DATA_LEN
    } else {
        MAX_HEAD_LEN
    };
    if len > limit {
        return Err(FrameError::TooLarge {
            kind: header[0],
            len,
            limit,
        });
    }
    Ok((header[0], len))
}

/// Reads a whole (small) frame payload. Memory grows only as its bytes arrive: a peer that
/// announces a large frame and sends little of it holds little (a stalled head costs what it
/// sent, not what it announced).
pub async fn read_payload(recv: &mut RecvStream, len: u32) -> Result<Bytes, FrameError> {
    let len = len as usize;
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut have = 0;
    while have < len {
        let Some(chunk) = recv.read_chunk(len - have, true).await? else {
            return Err(FrameError::Protocol("stream ended inside a frame".into()));
        };
        have += chunk.bytes.len();
        // The usual case, a whole payload in one chunk, is taken without a copy.
        match first.take() {
            None if buf.is_empty() => first = Some(chunk.bytes),
            Some(earlier) => {
                buf.extend_from_slice(&earlier);
                buf.extend_from_slice(&chunk.bytes);
            }
            None => buf.extend_from_slice(&chunk.bytes),
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// The encoded length of a HEAD frame's payload, and whether the framing carries it.
pub fn check_head_len(message: &impl Message) -> Result<usize, usize> {
    let len = message.encoded_len();
    if len <= MAX_HEAD_LEN as usize {
        Ok(len)
    } else {
        Err(len)
    }
}

/// Reads the HEAD frame that must open every stream.
pub async fn read_head<M: Message + Default>(recv: &mut RecvStream) -> Result<M, FrameError> {
    let (kind, len) = read_frame_header(recv).await?;
    if kind != HEAD {
        return Err(FrameError::Protocol(format!(
            "expected a HEAD frame, got type {kind}"
        )));
    }
    let payload = read_payload(recv, len).await?;
    M::decode(payload).map_err(|e| FrameError::Protocol(format!("bad HEAD frame: {e}")))
}

/// Copies an HTTP body onto the stream as DATA and TRAILERS frames, then finishes it.
/// A body error resets the stream, so the peer sees the failure instead of a short body.
pub async fn send_body(mut body: Body, send: &mut SendStream) -> Result<(), FrameError> {
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                let _ = send.reset(BODY_ERROR);
                return Err(FrameError::Protocol(format!("body failed: {e}")));
            }
        };
        match frame.into_data() {
            Ok(data) => {
                write_data(send, data).await?;
                // The body knows it has ended (hyper's, by its `content-length`): finish now,
                // so the stream's end travels with the last DATA frame instead of a packet
                // later, and the reader knows its body is complete with its last chunk.
                if http_body::Body::is_end_stream(&body) {
                    break;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let message = sinew_proto::v1::Trailers {
                        headers: to_proto_headers(&trailers, false),
                    };
                    write_message(send, TRAILERS, &message).await?;
                    // Trailers end a body.
                    break;
                }
            }
        }
    }
    let _ = send.finish();
    Ok(())
}

/// The rest of a stream whose HEAD said no body follows (`end_stream`). The sender finished
/// the stream right after the head, so its end is almost always in hand already: it is read
/// here (without waiting), and dropping the stream then sends nothing. If it is not in hand
/// yet, dropping the stream stops it, which costs the peer nothing: it has sent all it will.
/// Data where none may follow is a protocol error.
pub fn end_of_stream(mut recv: RecvStream) -> Result<(), FrameError> {
    use futures_util::FutureExt;
    match recv.read_chunk(1, true).now_or_never() {
        Some(Ok(None)) | None => Ok(()),
        Some(Ok(Some(_))) => {
            let _ = recv.stop(PROTOCOL_ERROR);
            Err(FrameError::Protocol(
                "data after a HEAD frame that ended the stream".into(),
            ))
        }
        Some(Err(e)) => Err(e.into()),
    }
}

/// Turns the rest of a stream (DATA*, TRAILERS?) into an HTTP body that reads the stream
/// itself when polled: no task and no channel, so a consumer that writes what it polls (hyper
/// writing a response) finds a body chunk that is already in hand in the same poll as the head,
/// and writes both with one system call. Nothing is read ahead of the consumer but the next
/// frame's header, right after a DATA frame ([`StreamBody::read_ahead`]). When the
/// consumer drops the body before its end, the stream is stopped at once (the peer sees a
/// cancellation). `guard` is dropped when the body ends, however it ends: the caller ties the
/// other direction's lifetime to it.
pub fn recv_body<G: Send + Sync + Unpin + 'static>(
    recv: RecvStream,
    size_hint: Option<u64>,
    guard: G,
) -> Body {
    StreamBody {
        recv,
        state: State::Header {
            buf: [0; 5],
            have: 0,
        },
        size_hint,
        guard: Some(guard),
    }
    .boxed()
}

/// Where a [`StreamBody`] is in the stream's frames.
#[derive(Debug)]
enum State {
    /// Between frames: `have` bytes of the next frame's header are in `buf`.
    Header { buf: [u8; 5], have: usize },
    /// Inside a DATA frame.
    Data { remaining: usize },
    /// Inside a TRAILERS frame: its payload so far.
    Trailers { payload: BytesMut, len: usize },
    /// Trailers delivered: only the end of the stream may follow.
    AfterTrailers,
    /// Reading ahead after a DATA frame failed; told on the next poll.
    Failed(quinn::ReadError),
    /// The stream ended (the body is complete), failed, or was stopped.
    Done,
}

struct StreamBody<G> {
    recv: RecvStream,
    state: State,
    size_hint: Option<u64>,
    guard: Option<G>,
}

/// Polls the stream once for up to `max` bytes, in order.
fn poll_chunk(
    recv: &mut RecvStream,
    cx: &mut Context<'_>,
    max: usize,
) -> Poll<Result<Option<Bytes>, quinn::ReadError>> {
    use std::future::Future;
    // `read_chunk` registers the waker on its first poll and keeps no other state, so a fresh
    // future per poll is a poll of the stream itself.
    let read = std::pin::pin!(recv.read_chunk(max, true));
    read.poll(cx).map_ok(|chunk| chunk.map(|c| c.bytes))
}

impl<G> StreamBody<G> {
    /// The next frame of the body, `Ok(None)` at its end.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, FrameError>> {
        loop {
            match &mut self.state {
                State::Header { buf, have } if *have < 5 => {
                    let Some(chunk) = ready!(poll_chunk(&mut self.recv, cx, 5 - *have))? else {
                        return Poll::Ready(if *have == 0 {
                            Ok(None)
                        } else {
                            Err(FrameError::Protocol(format!(
                                "stream ended inside a frame header ({have} of 5 bytes)"
                            )))
                        });
                    };
                    buf[*have..*have + chunk.len()].copy_from_slice(&chunk);
                    *have += chunk.len();
                }
                State::Header { buf, .. } => {
                    let (kind, len) = parse_frame_header(buf)?;
                    self.state = match kind {
                        DATA => State::Data {
                            remaining: len as usize,
                        },
                        TRAILERS => State::Trailers {
                            payload: BytesMut::with_capacity(len as usize),
                            len: len as usize,
                        },
                        other => {
                            return Poll::Ready(Err(FrameError::Protocol(format!(
                                "unexpected frame type {other} in a body"
                            ))));
                        }
                    };
                }
                State::Data { remaining: 0 } => self.read_ahead(cx),
                State::Data { remaining } => {
                    let Some(chunk) = ready!(poll_chunk(&mut self.recv, cx, *remaining))? else {
                        return Poll::Ready(Err(FrameError::Protocol(
                            "stream ended inside a DATA frame".into(),
                        )));
                    };
                    *remaining -= chunk.len();
                    if *remaining == 0 {
                        self.read_ahead(cx);
                    }
                    return Poll::Ready(Ok(Some(Frame::data(chunk))));
                }
                State::Trailers { payload, len } => {
                    if payload.len() < *len {
                        let want = *len - payload.len();
                        let Some(chunk) = ready!(poll_chunk(&mut self.recv, cx, want))? else {
                            return Poll::Ready(Err(FrameError::Protocol(
                                "stream ended inside a frame".into(),
                            )));
                        };
                        payload.extend_from_slice(&chunk);
                        continue;
                    }
                    let trailers = sinew_proto::v1::Trailers::decode(payload.split().freeze())
                        .map_err(|e| FrameError::Protocol(format!("bad TRAILERS frame: {e}")))?;
                    let map =
                        from_proto_headers(&trailers.headers).map_err(FrameError::Protocol)?;
                    self.state = State::AfterTrailers;
                    return Poll::Ready(Ok(Some(Frame::trailers(map))));
                }
                State::AfterTrailers => {
                    // Trailers end the body; anything after them is a peer bug.
                    return Poll::Ready(match ready!(poll_chunk(&mut self.recv, cx, 1))? {
                        None => Ok(None),
                        Some(_) => Err(FrameError::Protocol("data after TRAILERS".into())),
                    });
                }
                State::Failed(e) => return Poll::Ready(Err(FrameError::Read(e.clone()))),
                State::Done => return Poll::Ready(Ok(None)),
            }
        }
    }

    /// After a DATA frame: reads what is already in hand of the next frame header, so the end
    /// of the stream right behind the last DATA frame (the usual case: the peer sends a small
    /// body and its end in one packet) makes the body's end known with its last chunk
    /// (`is_end_stream`). A consumer that knows the length (hyper with `content-length`)
    /// drops the body once it has every byte, without polling for the end; knowing it here
    /// means that drop stops nothing. (When the end comes a packet later, that drop stops the
    /// stream as cancelled although every byte arrived; `send_body` finishes a stream with
    /// its last frame so that this stays rare.)
    fn read_ahead(&mut self, cx: &mut Context<'_>) {
        let mut buf = [0; 5];
        self.state = match poll_chunk(&mut self.recv, cx, 5) {
            Poll::Ready(Ok(None)) => {
                self.guard = None;
                State::Done
            }
            Poll::Ready(Ok(Some(chunk))) => {
                buf[..chunk.len()].copy_from_slice(&chunk);
                State::Header {
                    buf,
                    have: chunk.len(),
                }
            }
            Poll::Ready(Err(e)) => State::Failed(e),
            Poll::Pending => State::Header { buf, have: 0 },
        };
    }

    /// Polls the stream once without a waker: what is already in hand, if anything.
    fn poll_now(&mut self, max: usize) -> Poll<Result<Option<Bytes>, quinn::ReadError>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        poll_chunk(&mut self.recv, &mut cx, max)
    }
}

impl<G: Unpin> http_body::Body for StreamBody<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match ready!(this.step(cx)) {
            Ok(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Ok(None) => {
                this.state = State::Done;
                this.guard = None;
                Poll::Ready(None)
            }
            Err(e) => {
                this.state = State::Done;
                this.guard = None;
                let _ = this.recv.stop(PROTOCOL_ERROR);
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.size_hint {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}

impl<G> Drop for StreamBody<G> {
    fn drop(&mut self) {
        let complete = match self.state {
            State::Done | State::Failed(_) => true,
            // Only the stream's end may follow the trailers: data is a protocol error, and an
            // end not yet in hand is stopped as a cancellation (quinn would stop it with 0).
            State::AfterTrailers => {
                match self.poll_now(1) {
                    Poll::Ready(Ok(None)) | Poll::Ready(Err(_)) => {}
                    Poll::Ready(Ok(Some(_))) => {
                        let _ = self.recv.stop(PROTOCOL_ERROR);
                    }
                    Poll::Pending => {
                        let _ = self.recv.stop(CANCELLED);
                    }
                }
                true
            }
            // Dropped between frames: complete if the end is already in hand.
            State::Header { have: 0, .. } => matches!(self.poll_now(1), Poll::Ready(Ok(None))),
            _ => false,
        };
        if !complete {
            tracing::debug!("body consumer went away");
            let _ = self.recv.stop(CANCELLED);
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are dropped at each hop, with any header the
/// `Connection` header names. `te: trailers` is kept: gRPC relies on it end to end.
pub fn to_proto_headers(headers: &HeaderMap, strip_hop_by_hop: bool) -> Vec<Header> {
    let named_by_connection: Vec<String> = if strip_hop_by_hop {
        headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|name| name.trim().to_ascii_lowercase())
            .collect()
    } else {
        Vec::new()
    };
    headers
        .iter()
        .filter(|(name, value)| {
            !strip_hop_by_hop
                || !(is_hop_by_hop(name, value)
                    || named_by_connection.iter().any(|n| n == name.as_str()))
        })
        .map(|(name, value)| Header {
            name: name.as_str().to_string(),
            value: value.as_bytes().to_vec(),
        })
        .collect()
}

fn is_hop_by_hop(name: &HeaderName, value: &HeaderValue) -> bool {
    match name.as_str() {
        "connection"
        | "proxy-connection"
        | "keep-alive"
        | "transfer-encoding"
        | "upgrade"
        | "proxy-authorization"
        | "proxy-authenticate"
        | "host" => true,
        "te" => !value.as_bytes().eq_ignore_ascii_case(b"trailers"),
        _ => false,
    }
}

/// Rebuilds a header map; a name or value no HTTP stack would accept is a protocol error.
pub fn from_proto_headers(headers: &[Header]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for h in headers {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("invalid header name {:?}", h.name))?;
        let value = HeaderValue::from_bytes(&h.value)
            .map_err(|_| format!("invalid value for header {:?}", h.name))?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use std::sync::Arc;
    use std::time::Duration;

    /// A real QUIC connection on loopback (self-signed certificate, no client certificate):
    /// the framing is what is under test here, not mutual TLS.
    struct Pair {
        client: quinn::Connection,
        server: quinn::Connection,
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
    }

    async fn pair() -> Pair {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server_config = quinn::ServerConfig::with_single_cert(vec![der.clone()], key).unwrap();
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client_config = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config);
        let connecting = client
            .connect(server.local_addr().unwrap(), "localhost")
            .unwrap();
        let (client_conn, server_conn) =
            tokio::join!(connecting, async { server.accept().await.unwrap().await });
        Pair {
            client: client_conn.unwrap(),
            server: server_conn.unwrap(),
            _endpoints: (client, server),
        }
    }

    /// Sends `bytes` on a new stream (finishing it when asked) and returns both ends.
    async fn stream(p: &Pair, bytes: &[u8], finish: bool) -> (SendStream, RecvStream) {
        let (mut send, _) = p.client.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        if finish {
            send.finish().unwrap();
        }
        let (_, recv) = p.server.accept_bi().await.unwrap();
        (send, recv)
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = header_bytes(kind, payload.len()).to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn trailers(name: &str, value: &str) -> Vec<u8> {
        let message = sinew_proto::v1::Trailers {
            headers: vec![Header {
                name: name.into(),
                value: value.as_bytes().to_vec(),
            }],
        };
        frame(TRAILERS, &message.encode_to_vec())
    }

    /// A guard whose drop the test can see.
    fn guard() -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        tokio::sync::oneshot::channel()
    }

    #[tokio::test]
    async fn a_body_streams_data_and_trailers_and_ends_with_the_stream() {
        let p = pair().await;
        let mut bytes = frame(DATA, b"hello");
        bytes.extend(frame(DATA, b""));
        bytes.extend(frame(DATA, b" world"));
        bytes.extend(trailers("grpc-status", "0"));
        let (_send, recv) = stream(&p, &bytes, true).await;
        let (keep, mut dropped) = guard();
        let body = recv_body(recv, Some(11), keep);
        assert_eq!(body.size_hint().exact(), Some(11));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "hello world");
        assert_eq!(
            dropped.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed),
            "the guard goes with the body"
        );

        // A body without trailers ends at the stream's end, and its guard is dropped then,
        // while the body itself is still held.
        let (_send, recv) = stream(&p, &frame(DATA, b"abc"), true).await;
        let (keep, mut dropped) = guard();
        let mut body = recv_body(recv, None, keep);
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, "abc");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
        assert_eq!(
            dropped.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        );
    }

    #[tokio::test]
    async fn a_broken_body_is_an_error_and_stops_the_stream() {
        let p = pair().await;
        let cases: [(&str, Vec<u8>); 5] = [
            ("data after trailers", {
                let mut b = trailers("x", "1");
                b.extend(frame(DATA, b"late"));
                b
            }),
            ("a HEAD inside a body", frame(HEAD, b"")),
            ("a stream ending inside a DATA frame", {
                let mut b = header_bytes(DATA, 10).to_vec();
                b.extend_from_slice(b"short");
                b
            }),
            ("a stream ending inside a frame header", vec![DATA, 0, 0]),
            (
                "a DATA frame over the limit",
                header_bytes(DATA, MAX_DATA_LEN as usize + 1).to_vec(),
            ),
        ];
        for (case, bytes) in cases {
            // Left open unless the case is its end: a stream whose bytes were all delivered
            // and acknowledged no longer reports a stop to its writer.
            let finish = case.contains("ending inside");
            let (send, recv) = stream(&p, &bytes, finish).await;
            let (keep, mut dropped) = guard();
            let body = recv_body(recv, None, keep);
            let err = body.collect().await.err();
            assert!(err.is_some(), "{case}: must be an error");
            assert_eq!(
                dropped.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Closed),
                "{case}: guard dropped"
            );
            if finish {
                continue;
            }
            let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
                .await
                .unwrap_or_else(|_| panic!("{case}: the writer never saw a stop"));
            assert_eq!(stopped.unwrap(), Some(PROTOCOL_ERROR), "{case}");
        }
    }

    #[tokio::test]
    async fn dropping_a_body_midway_stops_the_stream_as_cancelled() {
        let p = pair().await;
        // One DATA frame announced as 100 bytes, 10 of them sent, the stream left open.
        let mut bytes = header_bytes(DATA, 100).to_vec();
        bytes.extend_from_slice(b"0123456789");
        let (send, recv) = stream(&p, &bytes, false).await;
        let (keep, mut dropped) = guard();
        let mut body = recv_body(recv, None, keep);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "0123456789");
        assert!(!body.is_end_stream());
        drop(body);
        assert_eq!(
            dropped.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        );
        let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
            .await
            .expect("the writer sees the stop");
        assert_eq!(stopped.unwrap(), Some(CANCELLED));
    }

    #[tokio::test]
    async fn a_complete_body_dropped_without_polling_its_end_stops_nothing() {
        let p = pair().await;
        // What hyper does with a `content-length` body: it takes the last chunk and drops
        // the body without asking for the end.
        let (send, recv) = stream(&p, &frame(DATA, b"abc"), true).await;
        // Let the stream's end arrive (it travels with the data; this only makes it certain).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (keep, mut dropped) = guard();
        let mut body = recv_body(recv, Some(3), keep);
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, "abc");
        assert!(body.is_end_stream(), "the end is known with the last chunk");
        assert_eq!(
            dropped.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed),
            "the guard went at the end"
        );
        drop(body);
        let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
            .await
            .expect("the stream is acknowledged");
        assert_eq!(stopped.unwrap(), None, "finished, not stopped");

        // Dropped between frames of a stream that is still open: that is a cancellation.
        let (send, recv) = stream(&p, &frame(DATA, b"abc"), false).await;
        let mut body = recv_body(recv, None, ());
        body.frame().await.unwrap().unwrap();
        assert!(!body.is_end_stream());
        drop(body);
        let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
            .await
            .expect("the writer sees the stop");
        assert_eq!(stopped.unwrap(), Some(CANCELLED));
    }

    /// One data frame, after which the body says it has ended but never yields `None`
    /// (as a body that knows its length may be dropped, not polled, after its last byte).
    struct KnowsItsEnd(Option<Bytes>);

    impl http_body::Body for KnowsItsEnd {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.0.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Poll::Pending,
            }
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_none()
        }
    }

    #[tokio::test]
    async fn a_sent_body_finishes_the_stream_with_its_last_frame() {
        let p = pair().await;
        let (mut send, _) = p.client.open_bi().await.unwrap();
        let body = KnowsItsEnd(Some(Bytes::from_static(b"abc"))).boxed();
        tokio::time::timeout(Duration::from_secs(5), send_body(body, &mut send))
            .await
            .expect("finished without waiting for a None")
            .unwrap();
        let (_, recv) = p.server.accept_bi().await.unwrap();
        let body = recv_body(recv, None, ()).collect().await.unwrap();
        assert_eq!(body.to_bytes(), "abc");
    }

    #[tokio::test]
    async fn data_after_a_head_that_ended_the_stream_is_a_protocol_error() {
        let p = pair().await;
        let head = sinew_proto::v1::RequestHead {
            end_stream: true,
            ..Default::default()
        };
        let mut bytes = frame(HEAD, &head.encode_to_vec());
        bytes.extend(frame(DATA, b"sneaked in"));
        let (_send, mut recv) = stream(&p, &bytes, true).await;
        let read: sinew_proto::v1::RequestHead = read_head(&mut recv).await.unwrap();
        assert!(read.end_stream);
        assert!(matches!(end_of_stream(recv), Err(FrameError::Protocol(_))));

        // The well-behaved case: the head, then the end.
        let (_send, mut recv) = stream(&p, &frame(HEAD, &head.encode_to_vec()), true).await;
        let _: sinew_proto::v1::RequestHead = read_head(&mut recv).await.unwrap();
        assert!(end_of_stream(recv).is_ok());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_end_to_end_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("host", HeaderValue::from_static("orders"));
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let kept: Vec<String> = to_proto_headers(&headers, true)
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(kept, ["te", "content-type", "x-multi", "x-multi"]);

        let mut not_trailers = HeaderMap::new();
        not_trailers.insert("te", HeaderValue::from_static("gzip"));
        assert!(to_proto_headers(&not_trailers, true).is_empty());
    }

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "grpc-status-details-bin",
            HeaderValue::from_bytes(b"AAEC\xff").unwrap(),
        );
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let back = from_proto_headers(&to_proto_headers(&headers, true)).unwrap();
        assert_eq!(back, headers);

        let bad = [Header {
            name: "bad name".into(),
            value: b"x".to_vec(),
        }];
        assert!(from_proto_headers(&bad).is_err());
        let bad = [Header {
            name: "x".into(),
            value: b"line\nbreak".to_vec(),
        }];
        assert!(from_proto_headers(&bad).is_err());
    }
}
