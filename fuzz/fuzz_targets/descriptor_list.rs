//! Descriptor lists from the wire: decoding, bounds checks, slicing, coalescing and
//! segment pairing never panic and keep their byte counts.
//!
//! A list of a few dozen bytes can name 2^64 descriptors (one strided run), so what
//! expands a list descriptor by descriptor (`has_overlap`, iteration, segment pairing)
//! runs only on lists of at most `SMALL` descriptors, or on their first `SMALL`
//! segments: the expansion is the same code at any count, and expanding up to 100 000
//! descriptors per input held the campaign at ~1 300 executions per second. What works
//! per entry (decoding, `coalesced`, `within`, `slice`, byte counts) sees every list.
#![no_main]
use kv_core::codec::Reader;
use kv_core::{segments, Descriptor};
use libfuzzer_sys::fuzz_target;

/// Most descriptors a check expands one by one.
const SMALL: u64 = 512;
/// Most descriptors checked pairwise against `has_overlap`.
const PAIRWISE: usize = 48;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let Ok(a) = r.list() else { return };
    let Ok(b) = r.list() else { return };
    let c = a.coalesced();
    assert_eq!(c.total_bytes(), a.total_bytes());
    assert!(c.len() <= a.len());
    let _ = a.within(&[Descriptor::new(0, u64::MAX / 2, 0)]);
    if let Ok(s) = a.slice(a.len() / 3, a.len()) {
        assert_eq!(s.len(), a.len() - a.len() / 3);
    }
    if a.len() <= SMALL {
        let ds: Vec<Descriptor> = a.iter().collect();
        assert_eq!(ds.len() as u64, a.len());
        // The list checked its byte count, so the sum fits.
        assert_eq!(ds.iter().map(|d| d.len).sum::<u64>(), a.total_bytes());
        let overlap = a.has_overlap();
        if ds.len() <= PAIRWISE {
            let naive = ds
                .iter()
                .enumerate()
                .any(|(i, x)| ds[i + 1..].iter().any(|y| x.overlaps(y)));
            assert_eq!(overlap, naive, "{ds:?}");
        }
    }
    if let Ok(s) = segments(&a, &b) {
        let whole = a.len().saturating_add(b.len()) <= SMALL;
        let mut moved = 0u64;
        for x in s.take(SMALL as usize) {
            assert!(x.local.len > 0 && x.local.len == x.remote.len, "{x:?}");
            moved += x.local.len;
        }
        assert!(moved <= a.total_bytes());
        if whole {
            assert_eq!(moved, a.total_bytes());
        }
    }
});
