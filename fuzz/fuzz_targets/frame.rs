//! The transport framing a peer sidecar sends: a frame header, then a HEAD (request or
//! response) or TRAILERS payload, decoded and turned into HTTP parts as the inbound and the
//! outbound do. Nothing a peer sends may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sinew_proto::v1::{RequestHead, ResponseHead, Trailers};
use sinew_sidecar::transport::{frame, quic};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 5 {
        let header: [u8; 5] = [data[0], data[1], data[2], data[3], data[4]];
        let _ = frame::parse_frame_header(&header);
    }
    let payload = data.get(5..).unwrap_or_default();
    if let Ok(head) = RequestHead::decode(payload) {
        if let Ok((method, uri, headers)) = quic::request_parts(&head) {
            // What the inbound forwards must be a request hyper can build.
            let mut request = http::Request::new(());
            *request.method_mut() = method;
            *request.uri_mut() = uri;
            *request.headers_mut() = headers;
            let _ = frame::to_proto_headers(request.headers(), true);
        }
    }
    if let Ok(head) = ResponseHead::decode(payload) {
        if let Ok((status, _)) = quic::response_parts(&head) {
            assert!((100..=999).contains(&status.as_u16()));
        }
    }
    if let Ok(trailers) = Trailers::decode(payload) {
        let _ = frame::from_proto_headers(&trailers.headers);
    }
});
