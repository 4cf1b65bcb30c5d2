//! Side-channel frame headers from the network never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, len)) = kv_agent::parse_channel_header(data) {
        assert!(len <= kv_core::codec::MAX_METADATA_BYTES);
    }
});
