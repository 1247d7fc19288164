//! Control-plane messages a sidecar decodes: an `Update` off the stream (protobuf), applied
//! on top of an empty snapshot and then on top of what it produced, as the control task
//! does. A bad update is refused (NACK), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sinew_proto::v1::{ControlMessage, Update};
use sinew_sidecar::snapshot::Snapshot;

fuzz_target!(|data: &[u8]| {
    if let Ok(update) = Update::decode(data) {
        let empty = Snapshot::default();
        if let Ok(applied) = empty.apply(&update) {
            let _ = applied.to_json();
            let _ = applied.apply(&update);
            let _ = applied.apply(&applied.to_update());
        }
    }
    let _ = ControlMessage::decode(data);
});
