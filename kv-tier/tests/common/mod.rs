//! Helpers shared by the kv-tier integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use kv_tier::{NvmeOptions, Options, PolicyKind};

/// Deterministic block contents for block `id` of `len` bytes.
pub fn block(id: u64, len: usize) -> Vec<u8> {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A fresh, empty directory under the target temp dir.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kv-tier-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Small DRAM + small NVMe tier options.
pub fn opts(dir: &std::path::Path, dram: u64, nvme: u64, seg: u64, policy: PolicyKind) -> Options {
    Options {
        dram_capacity: dram,
        slab_page_bytes: 256 << 10,
        dram_policy: policy,
        chunk_tokens: 16,
        evict_wait: std::time::Duration::from_secs(10),
        nvme: Some(NvmeOptions {
            capacity: nvme,
            segment_bytes: seg,
            policy,
            ..NvmeOptions::new(dir)
        }),
        ..Options::for_model("test")
    }
}
