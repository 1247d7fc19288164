//! W3C Trace Context (`traceparent`, `tracestate`) through every hop.
//!
//! Each sidecar is a hop: it keeps the trace id of a valid `traceparent` and replaces the
//! parent id with a span id of its own, so a trace shows app -> caller's sidecar -> callee's
//! sidecar -> app. A request without one (or with one that does not parse, whose
//! `tracestate` is then dropped too, as the specification asks) starts a new trace at the
//! first sidecar. The sampled flag is kept as it came; a new trace is sampled.

use http::{HeaderMap, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A parsed `traceparent` (version 00): trace id, parent id, flags, in lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub flags: String,
}

impl TraceParent {
    /// `00-<32 hex>-<16 hex>-<2 hex>`, neither id all zeros. Later versions are read by the
    /// version-00 layout of their first four fields, as the specification allows.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let mut fields = text.trim().split('-');
        let version = fields.next()?;
        let trace_id = fields.next()?;
        let parent_id = fields.next()?;
        let flags = fields.next()?;
        let rest = fields.next();
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let valid = hex(version, 2)
            && version != "ff"
            && (version != "00" || rest.is_none())
            && hex(trace_id, 32)
            && hex(parent_id, 16)
            && hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && parent_id.bytes().any(|b| b != b'0');
        valid.then(|| TraceParent {
            trace_id: trace_id.to_string(),
            parent_id: parent_id.to_string(),
            flags: flags.to_string(),
        })
    }

    fn to_header(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.parent_id, self.flags)
    }
}

/// A random trace id: 32 lower-case hex digits, never all zeros.
fn new_trace_id() -> String {
    format!("{:032x}", fastrand::u128(1..))
}

/// A random span id: 16 lower-case hex digits, never all zeros.
fn new_span_id() -> String {
    format!("{:016x}", fastrand::u64(1..))
}

/// Makes this sidecar a hop of the request's trace (see the module doc) and returns the
/// trace id, for logs.
pub fn next_hop(headers: &mut HeaderMap) -> String {
    let parent = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let next = match parent {
        Some(parent) => TraceParent {
            parent_id: new_span_id(),
            ..parent
        },
        None => {
            headers.remove(TRACESTATE);
            TraceParent {
                trace_id: new_trace_id(),
                parent_id: new_span_id(),
                flags: "01".into(),
            }
        }
    };
    if let Ok(value) = HeaderValue::from_str(&next.to_header()) {
        headers.insert(TRACEPARENT, value);
    }
    next.trace_id
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_keeps_its_trace_and_gets_a_new_parent() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(GOOD));
        headers.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let trace = next_hop(&mut headers);
        assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        let after = TraceParent::parse(headers[TRACEPARENT].to_str().unwrap()).unwrap();
        assert_eq!(after.trace_id, trace);
        assert_ne!(after.parent_id, "00f067aa0ba902b7");
        assert_eq!(after.flags, "01");
        assert_eq!(headers[TRACESTATE], "vendor=x");
    }

    #[test]
    fn a_missing_or_bad_traceparent_starts_a_trace_and_drops_tracestate() {
        for bad in [
            None,
            Some("garbage"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(bad) = bad {
                headers.insert(TRACEPARENT, HeaderValue::from_static(bad));
            }
            headers.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
            let trace = next_hop(&mut headers);
            let after = TraceParent::parse(headers[TRACEPARENT].to_str().unwrap()).unwrap();
            assert_eq!(after.trace_id, trace, "{bad:?}");
            assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:?}");
            assert_eq!(after.flags, "01");
            assert!(headers.get(TRACESTATE).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn new_ids_have_their_length_and_parse() {
        for _ in 0..100 {
            let (trace, span) = (new_trace_id(), new_span_id());
            assert_eq!((trace.len(), span.len()), (32, 16));
            let header = format!("00-{trace}-{span}-01");
            assert!(TraceParent::parse(&header).is_some(), "{header}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_the_version_00_layout() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        let parsed = TraceParent::parse(later).unwrap();
        assert_eq!(parsed.flags, "00");
    }
}
