//! The reference re-layout for engine tests: every element of a KV cache gets a value
//! computed from its logical coordinates, so a destination rank's expected memory can
//! be written element by element, independently of the lists kv-agent builds.
#![allow(dead_code)] // each test binary uses part of it

use kv_agent::layout::KvLayout;

/// The bytes of element (layer, plane, token, global head, dim): distinct for every
/// element and byte.
pub fn value(layer: u32, plane: u32, token: u64, head: u32, dim: u32, byte: u64) -> u8 {
    let x = (layer as u64) << 40
        | (plane as u64) << 36
        | token << 20
        | (head as u64) << 12
        | (dim as u64) << 4
        | byte;
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// Writes the values of tokens `0..tokens` of a request held in `blocks` into `image`,
/// the memory of `l` (one allocation starting at `base`), for every head `l` holds.
pub fn write_values(l: &KvLayout, image: &mut [u8], base: u64, blocks: &[u32], tokens: u64) {
    let bt = l.block_tokens as u64;
    let e = l.dtype.bytes();
    for layer in 0..l.layers {
        for plane in 0..l.planes() {
            for t in 0..tokens {
                for head in l.first_head..l.first_head + l.heads_held {
                    for dim in 0..l.head_dim {
                        let a = l
                            .element_addr(
                                layer,
                                plane,
                                blocks[(t / bt) as usize] as u64,
                                (t % bt) as u32,
                                head,
                                dim,
                            )
                            .unwrap();
                        for b in 0..e {
                            image[(a - base + b) as usize] = value(layer, plane, t, head, dim, b);
                        }
                    }
                }
            }
        }
    }
}

/// The source rank's memory: every token of the request's blocks (whole blocks).
pub fn source_image(l: &KvLayout, base: u64, len: usize, blocks: &[u32], tokens: u64) -> Vec<u8> {
    let mut v = vec![0x11; len];
    let whole = tokens.div_ceil(l.block_tokens as u64) * l.block_tokens as u64;
    write_values(l, &mut v, base, blocks, whole);
    v
}

/// What a destination rank must hold afterwards: `initial`, with every head it holds
/// for the request's tokens rounded up to `chunk` tokens (transfers move whole chunks).
pub fn expected_image(
    l: &KvLayout,
    initial: &[u8],
    base: u64,
    blocks: &[u32],
    tokens: u64,
    chunk: u64,
) -> Vec<u8> {
    let mut v = initial.to_vec();
    write_values(l, &mut v, base, blocks, tokens.div_ceil(chunk) * chunk);
    v
}

/// The first byte where two images differ.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|i| a.get(*i) != b.get(*i))
}
