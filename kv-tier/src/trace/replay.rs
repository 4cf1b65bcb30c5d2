//! Replays a trace through the real [`Store`] API, as a prefill engine drives it.
//!
//! Per request: synthesise the prompt's tokens from its hash ids (outside the timed
//! part), then — timed — compute the chunk keys, look the prefix up (`lookup_keys`,
//! pinning it), copy every hit into a buffer (`get_many`), and store the blocks after
//! the first miss (`put_many`). A hit is a block
//! of the matched prefix (prefix semantics: nothing after the first miss is reused).

use std::time::{Duration, Instant};

use kv_core::Result;

use super::{block_tokens, Trace};
use crate::options::Options;
use crate::policy::PolicyKind;
use crate::store::{Stats, Store};

/// How to replay. Plain struct with `Default`. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Replay {
    /// DRAM capacity in blocks.
    pub capacity_blocks: u64,
    /// Payload bytes per block (default 4 KiB: hit ratios do not depend on it).
    pub block_bytes: usize,
    /// Eviction policy.
    pub policy: PolicyKind,
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            capacity_blocks: 1024,
            block_bytes: 4096,
            policy: PolicyKind::default(),
        }
    }
}

/// What a replay measured. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct ReplayResult {
    /// The policy's name.
    pub policy: &'static str,
    /// DRAM capacity in blocks.
    pub capacity_blocks: u64,
    /// Requests replayed.
    pub requests: u64,
    /// Blocks looked up.
    pub blocks: u64,
    /// Blocks found (in the matched prefix).
    pub hits: u64,
    /// Time spent in the store's API (key hashing included, token synthesis not).
    pub store_time: Duration,
    /// Resident memory of the process at the end (bytes; 0 where unknown).
    pub rss_bytes: u64,
    /// The store's counters at the end.
    pub stats: Stats,
}

impl ReplayResult {
    /// Hits / blocks.
    pub fn hit_ratio(&self) -> f64 {
        if self.blocks == 0 {
            0.0
        } else {
            self.hits as f64 / self.blocks as f64
        }
    }

    /// Blocks processed per second of store time.
    pub fn blocks_per_sec(&self) -> f64 {
        self.blocks as f64 / self.store_time.as_secs_f64().max(1e-9)
    }

    /// Requests per second of store time.
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.store_time.as_secs_f64().max(1e-9)
    }
}

/// Resident memory of this process in bytes (0 where `/proc` is missing).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// Replays `trace` through a DRAM-only store (see the module docs).
pub fn replay(trace: &Trace, r: &Replay) -> Result<ReplayResult> {
    let slot = Store::dram_slot_bytes(false, r.block_bytes as u64);
    let store = Store::open(Options {
        dram_capacity: r.capacity_blocks.max(1) * slot,
        slab_page_bytes: slot * 256,
        dram_policy: r.policy,
        chunk_tokens: trace.block_tokens,
        evict_wait: Duration::from_secs(5),
        ..Options::for_model("kv-tier trace replay")
    })?;
    let payload = vec![0x5au8; r.block_bytes];
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut tokens = Vec::new();
    let mut out = ReplayResult {
        policy: r.policy.as_str(),
        capacity_blocks: r.capacity_blocks,
        requests: trace.requests.len() as u64,
        blocks: 0,
        hits: 0,
        store_time: Duration::ZERO,
        rss_bytes: 0,
        stats: Stats::default(),
    };
    for req in &trace.requests {
        tokens.clear();
        for id in &req.hash_ids {
            block_tokens(*id, trace.block_tokens, &mut tokens);
        }
        let t = Instant::now();
        let keys = store.chunk_keys(&tokens);
        let prefix = store.lookup_keys(&keys);
        while bufs.len() < prefix.len() {
            bufs.push(vec![0u8; r.block_bytes]);
        }
        let mut outs: Vec<&mut [u8]> = bufs[..prefix.len()]
            .iter_mut()
            .map(|b| &mut b[..])
            .collect();
        let n = store.get_many(prefix.keys(), &mut outs)?;
        drop(prefix);
        let blocks: Vec<&[u8]> = vec![&payload[..]; keys.len() - n];
        store.put_many(&keys, n, &blocks)?;
        out.store_time += t.elapsed();
        out.blocks += keys.len() as u64;
        out.hits += n as u64;
    }
    out.rss_bytes = rss_bytes();
    out.stats = store.stats();
    Ok(out)
}
