//! Descriptor lists from the wire: decoding, bounds checks, slicing, coalescing and
//! segment pairing never panic and keep their byte counts.
#![no_main]
use kv_core::codec::Reader;
use kv_core::{segments, Descriptor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let Ok(a) = r.list() else { return };
    let Ok(b) = r.list() else { return };
    let c = a.coalesced();
    assert_eq!(c.total_bytes(), a.total_bytes());
    let _ = a.within(&[Descriptor::new(0, u64::MAX / 2, 0)]);
    if a.len() < 100_000 {
        let _ = a.has_overlap();
        let _ = a.slice(a.len() / 3, a.len());
    }
    if let Ok(s) = segments(&a, &b) {
        let moved: u64 = s.take(100_000).map(|x| x.local.len).sum();
        assert!(moved <= a.total_bytes());
    }
});
