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
use std::task::{Context, Poll};
use tokio::sync::mpsc;

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
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let limit = if header[0] == DATA {
        MAX_DATA_LEN
    } else {
        MAX_HEAD_LEN
    };
    if len > limit {
        return Err(FrameError::Protocol(format!(
            "frame type {} of {len} bytes exceeds the limit of {limit}",
            header[0]
        )));
    }
    Ok((header[0], len))
}

/// Reads a whole (small) frame payload.
pub async fn read_payload(recv: &mut RecvStream, len: u32) -> Result<Bytes, FrameError> {
    let mut buf = vec![0u8; len as usize];
    recv.read_exact(&mut buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => {
            FrameError::Protocol("stream ended inside a frame".into())
        }
        quinn::ReadExactError::ReadError(e) => FrameError::Read(e),
    })?;
    Ok(Bytes::from(buf))
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
            Ok(data) => write_data(send, data).await?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let message = sinew_proto::v1::Trailers {
                        headers: to_proto_headers(&trailers, false),
                    };
                    write_message(send, TRAILERS, &message).await?;
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

/// Turns the rest of a stream (DATA*, TRAILERS?) into an HTTP body. A task reads the stream
/// and hands frames over a channel of one, so the reader never runs ahead of the consumer.
/// When the consumer drops the body, the stream is stopped at once, even while the peer is
/// silent (the peer sees a cancellation). `guard` is dropped when the body ends, however it
/// ends: the caller ties the other direction's lifetime to it.
pub fn recv_body<G: Send + 'static>(
    mut recv: RecvStream,
    size_hint: Option<u64>,
    guard: G,
) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    tokio::spawn(async move {
        let result = tokio::select! {
            result = pump_frames(&mut recv, &tx) => result,
            _ = tx.closed() => Err(FrameError::Protocol("body consumer went away".into())),
        };
        drop(guard);
        match result {
            Ok(()) => {}
            Err(FrameError::End) => {}
            Err(e) if tx.is_closed() => {
                tracing::debug!("body consumer went away: {e}");
                let _ = recv.stop(CANCELLED);
            }
            Err(e) => {
                let _ = recv.stop(PROTOCOL_ERROR);
                let _ = tx.send(Err(Box::new(e))).await;
            }
        }
    });
    ChannelBody { rx, size_hint }.boxed()
}

async fn pump_frames(
    recv: &mut RecvStream,
    tx: &mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
) -> Result<(), FrameError> {
    let closed = || FrameError::Protocol("body consumer went away".into());
    loop {
        let (kind, len) = read_frame_header(recv).await?;
        match kind {
            DATA => {
                let mut remaining = len as usize;
                while remaining > 0 {
                    let chunk = recv.read_chunk(remaining, true).await?.ok_or_else(|| {
                        FrameError::Protocol("stream ended inside a DATA frame".into())
                    })?;
                    remaining -= chunk.bytes.len();
                    tx.send(Ok(Frame::data(chunk.bytes)))
                        .await
                        .map_err(|_| closed())?;
                }
            }
            TRAILERS => {
                let payload = read_payload(recv, len).await?;
                let trailers = sinew_proto::v1::Trailers::decode(payload)
                    .map_err(|e| FrameError::Protocol(format!("bad TRAILERS frame: {e}")))?;
                let map = from_proto_headers(&trailers.headers).map_err(FrameError::Protocol)?;
                tx.send(Ok(Frame::trailers(map)))
                    .await
                    .map_err(|_| closed())?;
                // Trailers end the body; anything after them is a peer bug.
                return match read_frame_header(recv).await {
                    Err(FrameError::End) => Ok(()),
                    Err(e) => Err(e),
                    Ok((kind, _)) => Err(FrameError::Protocol(format!(
                        "frame type {kind} after TRAILERS"
                    ))),
                };
            }
            other => {
                return Err(FrameError::Protocol(format!(
                    "unexpected frame type {other} in a body"
                )));
            }
        }
    }
}

struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    size_hint: Option<u64>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.size_hint {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
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
