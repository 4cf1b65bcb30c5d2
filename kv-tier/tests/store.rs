//! Store behaviour: both tiers, eviction, pins, recovery, corruption, prefetch, threads.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{block, opts, tmpdir};
use kv_core::Error;
use kv_tier::{BlockKey, Options, PolicyKind, Store};

fn k(i: u64) -> BlockKey {
    BlockKey::from_u64(i)
}

#[test]
fn store_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
    check::<kv_tier::BlockHandle>();
}

#[test]
fn dram_only_put_get_prefix_pin_remove() {
    for policy in [PolicyKind::Lru, PolicyKind::S3Fifo] {
        let s = Store::open(Options {
            dram_capacity: 1 << 20,
            slab_page_bytes: 256 << 10,
            dram_policy: policy,
            chunk_tokens: 16,
            ..Options::for_model("test")
        })
        .unwrap();
        let tokens: Vec<u32> = (0..70).collect();
        let keys = s.chunk_keys(&tokens);
        assert_eq!(keys.len(), 4);
        for (i, key) in keys.iter().take(3).enumerate() {
            s.put(*key, &block(i as u64, 10_000)).unwrap();
        }
        assert_eq!(s.lookup_prefix(&tokens), 48);
        assert_eq!(s.lookup_prefix(&tokens[..40]), 32);
        let h = s.get(keys[1]).unwrap().unwrap();
        assert_eq!(h.to_vec(), block(1, 10_000));
        let mut out = vec![0u8; 10_000];
        h.read_into(&mut out).unwrap();
        assert_eq!(out, block(1, 10_000));
        assert_eq!(h.descriptor().len, 10_000);
        assert!(s.arena().descriptor().contains(&h.descriptor()));
        assert!(s.get(k(999)).unwrap().is_none());
        assert!(s.pin(keys[0]));
        assert!(matches!(s.remove(keys[0]), Err(Error::Busy(_))));
        assert!(s.unpin(keys[0]));
        assert!(!s.unpin(keys[0]));
        assert!(s.remove(keys[0]).unwrap());
        assert!(!s.contains(keys[0]));
        assert_eq!(s.lookup_prefix(&tokens), 0);
        // Fill far past capacity: memory stays within the arena, the pinned block and the
        // handle's block stay, the rest is evicted.
        assert!(s.pin(keys[2]));
        for i in 100..400 {
            s.put(k(i), &block(i, 20_000)).unwrap();
        }
        let st = s.stats();
        assert!(st.dram_bytes <= st.dram_capacity, "{st:?}");
        assert!(st.dram_evictions > 0);
        assert!(s.contains(keys[2]) && s.contains(keys[1]));
        assert_eq!(h.to_vec(), block(1, 10_000));
        assert_eq!(s.get(keys[2]).unwrap().unwrap().to_vec(), block(2, 10_000));
        let st = s.stats();
        assert_eq!(st.dram_hits, 2);
        assert_eq!(st.misses, 1);
        assert!(matches!(
            s.put_durable(k(1), b"x"),
            Err(Error::Unsupported(_))
        ));
        s.flush().unwrap();
    }
}

#[test]
fn everything_pinned_times_out_instead_of_hanging() {
    let s = Store::open(Options {
        dram_capacity: 64 << 10,
        slab_page_bytes: 64 << 10,
        evict_wait: Duration::from_millis(200),
        ..Options::for_model("test")
    })
    .unwrap();
    let mut n = 0;
    let mut handles = Vec::new();
    while n < 100 {
        match s.put(k(n), &block(n, 8000)) {
            Ok(()) => handles.push(s.get(k(n)).unwrap().unwrap()),
            Err(e) => {
                assert!(matches!(e, Error::TimedOut { .. }), "{e}");
                break;
            }
        }
        n += 1;
    }
    // 8000 bytes take 8 KiB slots in a DRAM-only store (no record header page): eight
    // in 64 KiB.
    assert_eq!(n, 8);
    drop(handles);
    s.put(k(1000), &block(1000, 8000)).unwrap();
}

#[test]
fn spills_to_nvme_and_reads_back_for_both_policies() {
    for policy in [PolicyKind::Lru, PolicyKind::S3Fifo] {
        let dir = tmpdir(&format!("spill-{}", policy.as_str()));
        let s = Store::open(opts(&dir, 512 << 10, 8 << 20, 1 << 20, policy)).unwrap();
        for i in 0..60 {
            s.put(k(i), &block(i, 50_000)).unwrap();
        }
        let st = s.stats();
        assert!(st.dram_bytes <= 512 << 10);
        for i in 0..60 {
            let h = s
                .get(k(i))
                .unwrap()
                .unwrap_or_else(|| panic!("block {i} lost"));
            assert_eq!(h.to_vec(), block(i, 50_000), "block {i}");
        }
        let st = s.stats();
        assert!(st.nvme_hits > 0 && st.write_backs > 0, "{st:?}");
        assert!(st.nvme_file_bytes <= 8 << 20, "{st:?}");
        drop(s);
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn nvme_capacity_is_bounded_with_eviction_and_compaction() {
    let dir = tmpdir("compact");
    let s = Store::open(opts(&dir, 256 << 10, 3 << 20, 1 << 20, PolicyKind::S3Fifo)).unwrap();
    for i in 0..200 {
        s.put(k(i), &block(i, 40_000)).unwrap();
        if i % 7 == 0 {
            // Dead records (removed blocks) are what compaction reclaims.
            let _ = s.remove(k(i / 2));
        }
    }
    s.flush().unwrap();
    let st = s.stats();
    assert!(st.nvme_file_bytes <= 3 << 20, "{st:?}");
    assert!(st.nvme_evictions > 0 && st.compactions > 0, "{st:?}");
    let mut found = 0;
    for i in 0..200 {
        if let Some(h) = s.get(k(i)).unwrap() {
            assert_eq!(h.to_vec(), block(i, 40_000), "block {i}");
            found += 1;
        }
    }
    assert!(found > 10, "{found}");
    let files = std::fs::read_dir(&dir).unwrap().count() as u64;
    assert!(files <= 3, "{files} segment files");
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn flushed_blocks_survive_reopen_and_prefetch_brings_them_back() {
    let dir = tmpdir("reopen");
    let o = opts(&dir, 2 << 20, 16 << 20, 2 << 20, PolicyKind::S3Fifo);
    {
        let s = Store::open(o.clone()).unwrap();
        for i in 0..20 {
            s.put(k(i), &block(i, 30_000 + i as usize)).unwrap();
        }
        s.flush().unwrap();
        s.put(k(999), &block(999, 100)).unwrap(); // not flushed: may or may not survive
    }
    let s = Store::open(o.clone()).unwrap();
    let st = s.stats();
    assert_eq!(st.dram_blocks, 0);
    assert!(st.nvme_blocks >= 20, "{st:?}");
    let keys: Vec<_> = (0..20).map(k).collect();
    s.prefetch(&keys).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while s.stats().prefetched < 20 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.stats().prefetched, 20);
    for i in 0..20 {
        let h = s.get(k(i)).unwrap().unwrap();
        assert_eq!(h.to_vec(), block(i, 30_000 + i as usize));
    }
    assert_eq!(s.stats().dram_hits, 20);
    // Demote and fetch synchronously.
    assert!(s.evict_from_dram(k(3)));
    assert_eq!(s.fetch(&[k(3), k(4)]).unwrap(), 1);
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn corrupt_records_are_skipped_never_returned() {
    for verify in [true, false] {
        let dir = tmpdir(&format!("corrupt-{verify}"));
        let mut o = opts(&dir, 2 << 20, 16 << 20, 2 << 20, PolicyKind::Lru);
        if let Some(n) = o.nvme.as_mut() {
            n.verify_on_open = verify;
        }
        {
            let s = Store::open(o.clone()).unwrap();
            for i in 0..4 {
                s.put_durable(k(i), &block(i, 10_000)).unwrap();
            }
        }
        // Records are 4 KiB header + 12 KiB payload = 16 KiB each, in order.
        let seg = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[16384 + 4096 + 100] ^= 0x40; // payload of block 1
        bytes[2 * 16384 + 20] ^= 0x01; // header of block 2
        std::fs::write(&seg, &bytes).unwrap();
        let s = Store::open(o).unwrap();
        for i in [0u64, 3] {
            assert_eq!(s.get(k(i)).unwrap().unwrap().to_vec(), block(i, 10_000));
        }
        assert!(s.get(k(1)).unwrap().is_none(), "torn payload returned");
        assert!(s.get(k(2)).unwrap().is_none(), "torn header returned");
        assert!(s.stats().corrupt_records >= 1);
        drop(s);
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn concurrent_put_get_keeps_bytes_exact() {
    let dir = tmpdir("threads");
    let s =
        Arc::new(Store::open(opts(&dir, 1 << 20, 16 << 20, 2 << 20, PolicyKind::S3Fifo)).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for round in 0..150u64 {
                    let id = t * 1000 + round % 40;
                    s.put(k(id), &block(id, 20_000 + (id % 5) as usize * 1000))
                        .unwrap();
                    let other = ((t + 1) % 4) * 1000 + round % 40;
                    if let Some(h) = s.get(k(other)).unwrap() {
                        assert_eq!(
                            h.to_vec(),
                            block(other, 20_000 + (other % 5) as usize * 1000)
                        );
                    }
                    if round % 10 == 0 {
                        s.prefetch(&[k(id), k(other)]).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = s.stats();
    assert!(st.dram_bytes <= st.dram_capacity);
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}
