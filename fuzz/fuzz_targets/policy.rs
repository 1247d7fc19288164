//! Policy as users write it (YAML documents) and as sidecars receive it (canonical JSON).
//! Bad input is refused with an error, never a panic; what parses survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sinew_proto::policy::{self, ServiceSpec, SubscriptionSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(documents) = policy::parse_documents(text) {
        for document in &documents {
            let _ = document.to_yaml();
            let _ = document.spec.to_json();
        }
    }
    if let Ok(spec) = ServiceSpec::from_json(text) {
        let _ = spec.validate();
        let again = ServiceSpec::from_json(&spec.to_json());
        assert!(again.is_ok(), "a parsed spec's canonical JSON parses again");
    }
    if let Ok(spec) = SubscriptionSpec::from_json(text) {
        let _ = spec.validate();
        assert!(SubscriptionSpec::from_json(&spec.to_json()).is_ok());
    }
    let _ = policy::validate_name(text);
    let _ = policy::validate_topic(text);
});
