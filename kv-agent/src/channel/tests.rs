use super::*;
use crate::frame::{parse_header, read_frame};
use proptest::prelude::*;

proptest! {
    #[test]
    fn headers_never_panic(v in proptest::collection::vec(any::<u8>(), 0..24)) {
        let _ = parse_header(&v);
        let _ = read_frame(&mut &v[..]);
    }
}

#[test]
fn oversized_frames_are_refused() {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&crate::frame::MAGIC);
    h[4] = PUT;
    h[8..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(parse_header(&h), Err(Error::InvalidMetadata(_))));
}
