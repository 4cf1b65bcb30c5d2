//! Regression tests for the bugs of issue 19, each failing on the code before its fix.

mod common;

use std::time::Duration;

use common::block;
use kv_tier::{BlockKey, Options, PolicyKind, Store};

fn k(i: u64) -> BlockKey {
    BlockKey::from_u64(i)
}

/// Slot bytes one block of `len` takes in a DRAM-only store of `policy`.
fn slot_bytes(len: usize) -> u64 {
    let s = Store::open(Options {
        dram_capacity: 4 << 20,
        slab_page_bytes: 1 << 20,
        ..Default::default()
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
            ..Default::default()
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
