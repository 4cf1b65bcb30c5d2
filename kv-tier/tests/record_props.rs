//! The record decoder never panics and never accepts damaged records.

use kv_core::Error;
use kv_tier::record::{decode_header, decode_record, scan_segment, RecordHeader, PAGE};
use kv_tier::BlockKey;
use proptest::prelude::*;

fn record(seg: u32, off: u64, key: u64, payload: &[u8]) -> Vec<u8> {
    let h = RecordHeader {
        key: BlockKey::from_u64(key),
        len: payload.len() as u64,
        seq: key + 1,
        segment: seg,
        offset: off,
        payload_crc: crc32c::crc32c(payload),
        flags: 0,
        guard: 0,
    };
    let mut v = vec![0u8; h.record_len() as usize];
    h.encode_into(&mut v).unwrap();
    v[PAGE as usize..PAGE as usize + payload.len()].copy_from_slice(payload);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_corrupt_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
        match decode_record(&bytes) {
            Ok(_) => prop_assert!(false, "random bytes decoded"),
            Err(e) => prop_assert!(matches!(e, Error::Corrupt(_))),
        }
        prop_assert!(decode_header(&bytes).is_err());
        let s = scan_segment(1, &bytes, true);
        prop_assert!(s.records.is_empty());
    }

    #[test]
    fn any_flipped_bit_is_detected(
        payload in proptest::collection::vec(any::<u8>(), 1..6000),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut r = record(2, 0, 9, &payload);
        let (h, p) = decode_record(&r).unwrap();
        prop_assert_eq!(p, &payload[..]);
        prop_assert_eq!(h.len as usize, payload.len());
        // Flip a bit among the bytes the checksums cover: header fields or payload.
        let covered: Vec<usize> = (0..64).chain(PAGE as usize..PAGE as usize + payload.len()).collect();
        let at = covered[pos.index(covered.len())];
        r[at] ^= 1 << bit;
        prop_assert!(matches!(decode_record(&r), Err(Error::Corrupt(_))));
        prop_assert!(scan_segment(2, &r, true).records.is_empty());
    }

    #[test]
    fn truncated_records_are_corrupt(payload in proptest::collection::vec(any::<u8>(), 1..6000), cut in any::<prop::sample::Index>()) {
        let r = record(2, 0, 9, &payload);
        let at = cut.index(PAGE as usize + payload.len());
        prop_assert!(decode_record(&r[..at]).is_err());
    }
}
