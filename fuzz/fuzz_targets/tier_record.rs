//! kv-tier segment bytes from disk (index recovery): records and whole segments never
//! panic, and a record that decodes has a payload of its header's length.
#![no_main]
use kv_tier::record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = record::decode_header(data);
    if let Ok((h, payload)) = record::decode_record(data) {
        assert_eq!(payload.len() as u64, h.len);
    }
    let _ = record::scan_segment(0, data, true);
    let _ = record::scan_segment(1, data, false);
});
