//! The engine-facing API: chained puts and batched gets, prefix lookup with pins,
//! prefetch along a chain, NVMe corruption, durable removal, flush on drop, stats.

mod common;

use std::time::{Duration, Instant};

use common::{block, opts, tmpdir};
use kv_tier::{BlockKey, Options, PolicyKind, Store};

const LEN: usize = 20_000;

fn blocks(n: usize, seed: u64) -> Vec<Vec<u8>> {
    (0..n as u64).map(|i| block(seed + i, LEN)).collect()
}

fn refs(b: &[Vec<u8>]) -> Vec<&[u8]> {
    b.iter().map(|x| &x[..]).collect()
}

/// Reads `keys` with `get_many`; returns the count and the buffers.
fn read(s: &Store, keys: &[BlockKey]) -> (usize, Vec<Vec<u8>>) {
    let mut bufs = vec![vec![0u8; LEN]; keys.len()];
    let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    let n = s.get_many(keys, &mut outs).unwrap();
    (n, bufs)
}

#[test]
fn engine_round_trip_through_both_tiers() {
    let dir = tmpdir("engine");
    // 20 DRAM slots of 24 KiB (header page + 20 KiB) for 40 blocks.
    let s = Store::open(opts(&dir, 512 << 10, 16 << 20, 2 << 20, PolicyKind::Prefix)).unwrap();
    let tokens: Vec<u32> = (0..16 * 40 + 7).collect();
    let keys = s.chunk_keys(&tokens);
    assert_eq!(keys.len(), 40);
    let data = blocks(40, 1000);
    // A request: nothing stored yet, then its 40 blocks (more than DRAM holds).
    assert!(s.lookup(&tokens).is_empty());
    assert_eq!(s.put_many(&keys, 0, &refs(&data[..20])).unwrap(), 20);
    s.flush().unwrap();
    assert_eq!(s.put_many(&keys, 20, &refs(&data[20..])).unwrap(), 20);
    s.flush().unwrap();
    // The next request: the whole prefix is found, pinned, and read back exactly from
    // wherever each block is.
    let prefix = s.lookup(&tokens);
    assert_eq!(prefix.len(), 40);
    assert_eq!(prefix.keys(), &keys[..]);
    let before = s.stats();
    let (n, bufs) = read(&s, prefix.keys());
    assert_eq!(n, 40);
    assert!(bufs.iter().zip(&data).all(|(a, b)| a == b));
    let st = s.stats();
    assert_eq!(
        (st.dram_hits - before.dram_hits) + (st.nvme_hits - before.nvme_hits),
        40,
        "{st:?}"
    );
    assert!(
        st.nvme_hits > before.nvme_hits,
        "some blocks came from NVMe"
    );
    assert!(
        st.get_latency.count >= 1 && st.put_latency.count >= 2,
        "{st:?}"
    );
    assert!(st.get_latency.p99_ns >= st.get_latency.p50_ns, "{st:?}");
    drop(prefix);
    // Prefetch along the chain brings NVMe-only blocks back into DRAM, in order,
    // stopping at the first key no tier holds.
    for k in &keys[..8] {
        s.evict_from_dram(*k);
    }
    let before = s.stats().prefetched;
    let mut chain = keys[..8].to_vec();
    chain.push(BlockKey::from_u64(7)); // not stored: the walk ends here
    chain.extend_from_slice(&keys[8..12]);
    s.prefetch_chain(&chain, 64 << 10).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while s.stats().prefetched < before + 8 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.stats().prefetched, before + 8, "{:?}", s.stats());
    let dram_before = s.stats().dram_hits;
    assert_eq!(read(&s, &keys[..8]).0, 8);
    assert_eq!(s.stats().dram_hits, dram_before + 8);
    // A key missing in the middle ends the batch there.
    let mut holed = keys[..10].to_vec();
    holed[5] = BlockKey::from_u64(7);
    assert_eq!(read(&s, &holed).0, 5);
    // Bad arguments.
    assert!(s.put_many(&keys, 39, &refs(&data[..2])).is_err());
    let mut small = [0u8; 10];
    assert!(s.get_many(&keys[..1], &mut [&mut small[..]]).is_err());
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn put_many_never_waits_and_counts_dropped_writes() {
    let s = Store::open(Options {
        // Ten slots of 20 KiB.
        dram_capacity: 10 * 20480,
        slab_page_bytes: 5 * 20480,
        evict_wait: Duration::from_secs(30),
        ..Options::for_model("test")
    })
    .unwrap();
    let keys: Vec<BlockKey> = (0..20).map(BlockKey::from_u64).collect();
    let data = blocks(20, 0);
    // Fill DRAM, pin what is stored, then ask for more.
    assert_eq!(s.put_many(&keys, 0, &refs(&data[..10])).unwrap(), 10);
    let held = s.lookup_keys(&keys[..10]);
    assert_eq!(held.len(), 10);
    let t = Instant::now();
    assert_eq!(s.put_many(&keys, 10, &refs(&data[10..])).unwrap(), 0);
    assert!(t.elapsed() < Duration::from_secs(30), "put_many waited");
    assert_eq!(s.stats().dropped_writes, 10);
    drop(held);
    assert_eq!(s.put_many(&keys, 10, &refs(&data[10..12])).unwrap(), 2);
}

#[test]
fn flipped_nvme_bytes_are_never_returned() {
    let dir = tmpdir("flip-nvme");
    let s = Store::open(opts(&dir, 1 << 20, 16 << 20, 2 << 20, PolicyKind::Lru)).unwrap();
    let keys: Vec<BlockKey> = (0..4).map(BlockKey::from_u64).collect();
    let data = blocks(4, 50);
    for (k, d) in keys.iter().zip(&data) {
        s.put_durable(*k, d).unwrap();
        assert!(s.evict_from_dram(*k));
    }
    // Records are 4 KiB + 20 KiB (24 KiB), in order, in the one segment file.
    let seg = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[24 * 1024 + 4096 + 77] ^= 0x10; // block 1's payload
    bytes[3 * 24 * 1024 + 4096 + 5] ^= 0x01; // block 3's payload
    std::fs::write(&seg, &bytes).unwrap();
    let (n, bufs) = read(&s, &keys);
    assert_eq!(n, 1);
    assert_eq!(bufs[0], data[0]);
    assert_ne!(bufs[1], data[1]);
    assert_eq!(bufs[1], vec![0u8; LEN], "corrupt bytes were copied out");
    assert!(s.get(keys[3]).unwrap().is_none());
    assert!(!s.contains(keys[1]) && !s.contains(keys[3]));
    assert_eq!(s.get(keys[2]).unwrap().unwrap().to_vec(), data[2]);
    assert_eq!(s.stats().corrupt_records, 2);
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn remove_is_durable_and_survives_cleaning() {
    let dir = tmpdir("remove");
    let o = opts(&dir, 256 << 10, 4 << 20, 1 << 20, PolicyKind::Lru);
    let gone = BlockKey::from_u64(1);
    {
        let s = Store::open(o.clone()).unwrap();
        s.put_durable(gone, &block(1, LEN)).unwrap();
        s.put_durable(BlockKey::from_u64(2), &block(2, LEN))
            .unwrap();
        assert!(s.remove(gone).unwrap());
        assert!(!s.remove(gone).unwrap());
    }
    {
        let s = Store::open(o.clone()).unwrap();
        assert!(
            !s.contains(gone),
            "a removed block came back after reopening"
        );
        assert!(s.contains(BlockKey::from_u64(2)));
        // Churn through many segments: cleaning moves the tombstone along while the
        // removed block's old record may still be on disk.
        for i in 100..400u64 {
            s.put(BlockKey::from_u64(i), &block(i, LEN)).unwrap();
        }
        s.flush().unwrap();
        assert!(s.stats().compactions > 0, "{:?}", s.stats());
    }
    let s = Store::open(o).unwrap();
    assert!(
        !s.contains(gone),
        "a removed block came back after cleaning"
    );
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dropping_the_store_flushes() {
    let dir = tmpdir("drop-flush");
    let o = opts(&dir, 1 << 20, 8 << 20, 2 << 20, PolicyKind::S3Fifo);
    let keys: Vec<BlockKey> = (0..5).map(BlockKey::from_u64).collect();
    {
        let s = Store::open(o.clone()).unwrap();
        for (i, k) in keys.iter().enumerate() {
            s.put(*k, &block(i as u64, LEN)).unwrap();
        }
        assert_eq!(s.stats().nvme_blocks, 0);
    }
    let s = Store::open(o.clone()).unwrap();
    for (i, k) in keys.iter().enumerate() {
        let h = s.get(*k).unwrap().expect("lost by drop");
        assert_eq!(h.to_vec(), block(i as u64, LEN));
    }
    drop(s);
    // Opting out drops them.
    let dir2 = tmpdir("drop-noflush");
    let o2 = Options {
        flush_on_drop: None,
        ..opts(&dir2, 1 << 20, 8 << 20, 2 << 20, PolicyKind::S3Fifo)
    };
    {
        let s = Store::open(o2.clone()).unwrap();
        s.put(keys[0], &block(0, LEN)).unwrap();
    }
    assert!(!Store::open(o2).unwrap().contains(keys[0]));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&dir2).ok();
}
