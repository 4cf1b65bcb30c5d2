//! Any bytes: decode never panics, and whatever decodes re-encodes to the same value.
#![no_main]
use kv_core::AgentMetadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = AgentMetadata::decode(data) {
        let again = m.encode().expect("a decoded message re-encodes");
        assert_eq!(AgentMetadata::decode(&again).expect("round trip"), m);
    }
});
