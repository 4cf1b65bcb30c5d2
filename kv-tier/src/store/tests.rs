//! Checks that need the store's insides: DRAM corruption.

use super::*;

fn store() -> Store {
    Store::open(Options {
        dram_capacity: 1 << 20,
        slab_page_bytes: 256 << 10,
        chunk_tokens: 4,
        ..Options::for_model("test")
    })
    .unwrap()
}

/// A DRAM copy whose bytes changed under the store is a miss, dropped and counted —
/// never returned (by `get` or `get_many`).
#[test]
fn flipped_dram_bytes_are_never_returned() {
    let s = store();
    let keys = s.chunk_keys(&(0..12).collect::<Vec<u32>>());
    let blocks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 5000]).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
    assert_eq!(s.put_many(&keys, 0, &refs).unwrap(), 3);
    let flip = |k: BlockKey| {
        let off = s.get(k).unwrap().unwrap().offset();
        s.inner.arena.write(off + 100, &[0xee]).unwrap();
    };
    flip(keys[2]);
    assert!(s.get(keys[2]).unwrap().is_none());
    assert!(!s.contains(keys[2]));
    assert_eq!(s.stats().corrupt_dram, 1);
    flip(keys[1]);
    let mut bufs = vec![vec![0u8; 5000]; 3];
    let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    assert_eq!(s.get_many(&keys, &mut outs).unwrap(), 1);
    assert_eq!(bufs[0], blocks[0]);
    assert_eq!(bufs[1], vec![0u8; 5000], "corrupt bytes were copied out");
    let st = s.stats();
    assert_eq!((st.corrupt_dram, st.dram_blocks), (2, 1));
}
