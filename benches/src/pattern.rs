//! A deterministic fill pattern both processes compute on their own, so the receiver
//! checks every byte without the data crossing twice.

/// The 8-byte word at word index `i` of a buffer filled with `seed`.
#[inline]
pub fn word(seed: u64, i: u64) -> u64 {
    // splitmix64: cheap, and every word differs, so a misplaced page is caught.
    let mut z = (i ^ seed.rotate_left(17)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` (whose first byte is word-aligned offset `offset` of the pattern).
pub fn fill(buf: &mut [u8], seed: u64, offset: u64) {
    debug_assert_eq!(offset % 8, 0);
    let base = offset / 8;
    let words = (buf.len() / 8) as u64;
    let mut chunks = buf.chunks_exact_mut(8);
    for (i, c) in (&mut chunks).enumerate() {
        c.copy_from_slice(&word(seed, base + i as u64).to_le_bytes());
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let n = rest.len();
        rest.copy_from_slice(&word(seed, base + words).to_le_bytes()[..n]);
    }
}

/// Offset of the first byte of `buf` that differs from the pattern, if any.
pub fn first_mismatch(buf: &[u8], seed: u64, offset: u64) -> Option<u64> {
    let base = offset / 8;
    let mut chunks = buf.chunks_exact(8);
    for (i, c) in (&mut chunks).enumerate() {
        if c != word(seed, base + i as u64).to_le_bytes() {
            return Some(offset + i as u64 * 8);
        }
    }
    let rest = chunks.remainder();
    let w = word(seed, base + (buf.len() / 8) as u64).to_le_bytes();
    if rest != &w[..rest.len()] {
        return Some(offset + (buf.len() - rest.len()) as u64);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check() {
        let mut v = vec![0u8; 4099];
        fill(&mut v, 7, 0);
        assert_eq!(first_mismatch(&v, 7, 0), None);
        assert_eq!(first_mismatch(&v, 8, 0), Some(0));
        v[4097] ^= 1;
        assert_eq!(first_mismatch(&v, 7, 0), Some(4096));
        let mut w = vec![0u8; 64];
        fill(&mut w, 7, 1024);
        assert_eq!(
            &w[..],
            &{
                let mut all = vec![0u8; 1088];
                fill(&mut all, 7, 0);
                all
            }[1024..]
        );
    }
}
