//! Regression tests for the bugs of issue 19, each failing on the code before its fix.

mod common;

use std::time::Duration;

use common::{block, opts, tmpdir};
use kv_tier::{BlockKey, Options, PolicyKind, Store};

fn k(i: u64) -> BlockKey {
    BlockKey::from_u64(i)
}

/// Slot bytes one block of `len` takes in a DRAM-only store of `policy`.
fn slot_bytes(len: usize) -> u64 {
    let s = Store::open(Options {
        dram_capacity: 4 << 20,
        slab_page_bytes: 1 << 20,
        ..Options::for_model("test")
    })
    .unwrap();
    s.put(k(0), &block(0, len)).unwrap();
    s.stats().dram_bytes
}

/// Bug 1: pinned blocks filling S3-FIFO's small queue made `evict` spin on them and
/// `put` time out although main held evictable blocks.
#[test]
fn s3fifo_pinned_small_queue_does_not_livelock() {
    const LEN: usize = 8000;
    let slot = slot_bytes(LEN);
    for policy in [PolicyKind::Lru, PolicyKind::S3Fifo] {
        let s = Store::open(Options {
            dram_capacity: 100 * slot,
            slab_page_bytes: 10 * slot,
            dram_policy: policy,
            evict_wait: Duration::from_secs(2),
            ..Options::for_model("test")
        })
        .unwrap();
        // Ordinary blocks that are read (hit) twice: S3-FIFO moves them to main.
        for i in 0..90 {
            s.put(k(i), &block(i, LEN)).unwrap();
            for _ in 0..2 {
                assert!(s.get(k(i)).unwrap().is_some());
            }
        }
        for i in 90..100 {
            s.put(k(i), &block(i, LEN)).unwrap();
            assert!(s.pin(k(i)));
        }
        for i in 100..300 {
            s.put(k(i), &block(i, LEN))
                .unwrap_or_else(|e| panic!("{policy:?}: put {i}: {e}"));
        }
        for i in 90..100 {
            assert!(s.contains(k(i)), "{policy:?}: pinned block {i} evicted");
        }
    }
}

/// Bug 2: `get` of a pinned NVMe-only block waited for DRAM while write-back rolled a
/// segment; the cleaning that followed moved the block's record, and `get` then
/// reported a miss instead of reading the block.
#[test]
fn get_survives_compaction_moving_the_record_during_promotion() {
    const LEN: usize = 60 << 10; // 64 KiB records and slots (with the header page)
    let dir = tmpdir("bug2");
    // DRAM: 8 slots. NVMe: 3 segments of 16 records, 16 records live at most.
    let mut o = opts(&dir, 512 << 10, 3 << 20, 1 << 20, PolicyKind::Lru);
    o.slab_page_bytes = 256 << 10;
    let s = Store::open(o).unwrap();
    let key = k(7);
    s.put_durable(key, &block(7, LEN)).unwrap();
    assert!(s.evict_from_dram(key));
    assert!(s.pin(key));
    // Fill segment 1 behind the block and all of segment 2; the NVMe budget drops the
    // older fillers, so segment 1 ends with the pinned block as its only live record.
    for i in 100..131 {
        s.put_durable(k(i), &block(i, LEN)).unwrap();
    }
    for i in 100..131 {
        s.evict_from_dram(k(i));
    }
    // DRAM full of blocks not yet on NVMe: reading the block needs a write-back, which
    // rolls to a third segment and cleans segment 1.
    for i in 200..208 {
        s.put(k(i), &block(i, LEN)).unwrap();
    }
    let before = s.stats().compactions;
    let h = s.get(key).unwrap().expect("pinned block reported missing");
    assert_eq!(h.to_vec(), block(7, LEN));
    assert!(
        s.stats().compactions > before,
        "the scenario did not clean a segment"
    );
    drop(h);
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}

/// Bug 3: blocks `lookup_prefix` reported were lost before the engine's `get`s reached
/// them: promoting the first ones queued write-backs whose NVMe room came from evicting
/// the later ones (on the old code, with `lookup_prefix` in place of `lookup`, blocks
/// 0, 4, 5 and 6 of 12 were lost). `lookup` pins what it finds.
#[test]
fn blocks_found_by_lookup_survive_promotion_of_their_prefix() {
    const LEN: usize = 60 << 10;
    let dir = tmpdir("bug3");
    let mut o = opts(&dir, 512 << 10, 3 << 20, 1 << 20, PolicyKind::Lru);
    o.slab_page_bytes = 256 << 10;
    let s = Store::open(o).unwrap();
    let tokens: Vec<u32> = (0..12 * 16).collect();
    let keys = s.chunk_keys(&tokens);
    for (i, key) in keys.iter().enumerate() {
        s.put_durable(*key, &block(i as u64, LEN)).unwrap();
        assert!(s.evict_from_dram(*key));
    }
    for i in 200..208 {
        s.put(k(i), &block(i, LEN)).unwrap();
    }
    let prefix = s.lookup(&tokens);
    assert_eq!(prefix.keys(), &keys[..]);
    assert_eq!(prefix.tokens(), tokens.len());
    let n = prefix.len();
    let mut lost = Vec::new();
    for (i, key) in keys.iter().enumerate().take(n) {
        match s.get(*key).unwrap() {
            Some(h) => assert_eq!(h.to_vec(), block(i as u64, LEN)),
            None => lost.push(i),
        }
    }
    assert!(
        lost.is_empty(),
        "blocks {lost:?} of {n} promised by lookup were lost"
    );
    // Pins end with the prefix: the blocks can be removed again.
    assert!(matches!(s.remove(keys[0]), Err(kv_core::Error::Busy(_))));
    drop(prefix);
    assert!(s.remove(keys[0]).unwrap());
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}

/// Bug 4: the model identity defaulted to 0, so two models sharing a store without
/// setting it got identical keys and read each other's KV. It is now required.
#[test]
fn model_identity_is_required() {
    let r = Store::open(Options {
        dram_capacity: 1 << 20,
        slab_page_bytes: 256 << 10,
        ..Default::default()
    });
    assert!(
        matches!(r, Err(kv_core::Error::InvalidArgument(_))),
        "a store without a model identity was opened"
    );
    let keys = |model: &str| {
        let s = Store::open(Options {
            dram_capacity: 1 << 20,
            slab_page_bytes: 256 << 10,
            ..Options::for_model(model)
        })
        .unwrap();
        s.chunk_keys(&[1; 512])
    };
    assert_ne!(keys("llama-3-8b/bf16/tp1"), keys("qwen2-7b/bf16/tp1"));
    assert_eq!(keys("llama-3-8b/bf16/tp1"), keys("llama-3-8b/bf16/tp1"));
}
