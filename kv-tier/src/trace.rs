//! Trace-driven hit-ratio simulation of the two tiers under each eviction policy.
//!
//! [`multi_turn_chat`] and [`shared_system_prompt`] build synthetic request traces with
//! Zipfian popularity; [`run_trace`] replays one through a DRAM tier and an NVMe tier
//! sized in bytes, with the same policy implementations and chained chunk keys the
//! [`crate::Store`] uses, and reports which tier served each chunk. A request's chunks
//! are looked up in order; after the first miss the rest are misses too (a prefix cache
//! cannot reuse KV after a gap). Missed chunks are then stored in DRAM, DRAM evictions
//! are written to NVMe, NVMe evictions are dropped, and NVMe hits are promoted to DRAM.
//!
//! `kv-bench tier` calls this to print LRU vs S3-FIFO:
//!
//! ```
//! use kv_tier::trace::{multi_turn_chat, run_trace, Capacity, ChatParams};
//! use kv_tier::PolicyKind;
//!
//! let trace = multi_turn_chat(&ChatParams { requests: 200, ..Default::default() });
//! let cap = Capacity { dram_bytes: 64 << 20, nvme_bytes: 256 << 20, block_bytes: 2 << 20 };
//! for p in [PolicyKind::Lru, PolicyKind::S3Fifo] {
//!     let r = run_trace(p, cap, &trace);
//!     println!("{}: dram {:.3} nvme {:.3} total {:.3}", r.policy, r.dram_hit_ratio(), r.nvme_hit_ratio(), r.hit_ratio());
//! }
//! ```

use std::collections::HashSet;
use std::sync::Arc;

use crate::key::{BlockKey, ChunkHasher};
use crate::policy::{EvictionPolicy, PolicyKind};

/// One request: the first `len` tokens of a shared token sequence. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Request {
    seq: Arc<[u32]>,
    len: usize,
}

impl Request {
    /// The request's prompt tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.seq[..self.len]
    }
}

/// A request trace. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Trace {
    /// What generated it.
    pub name: String,
    /// Tokens per chunk (block).
    pub chunk_tokens: usize,
    /// The requests, in arrival order.
    pub requests: Vec<Request>,
}

impl Trace {
    /// Total prompt tokens.
    pub fn tokens(&self) -> usize {
        self.requests.iter().map(|r| r.len).sum()
    }
}

/// Parameters of [`multi_turn_chat`]. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct ChatParams {
    /// Conversations; each request picks one with Zipfian popularity.
    pub conversations: usize,
    /// Turns per conversation before it starts over.
    pub turns: usize,
    /// Shared system prompts (conversation `i` uses prompt `i % system_prompts`).
    pub system_prompts: usize,
    /// Tokens of a system prompt.
    pub system_tokens: usize,
    /// Mean tokens of a user message and of an answer (uniform in 0.5×..1.5×).
    pub turn_tokens: usize,
    /// Requests in the trace.
    pub requests: usize,
    /// Zipf exponent of conversation popularity.
    pub zipf_s: f64,
    /// Tokens per chunk.
    pub chunk_tokens: usize,
    /// Random seed.
    pub seed: u64,
}

impl Default for ChatParams {
    fn default() -> Self {
        ChatParams {
            conversations: 400,
            turns: 8,
            system_prompts: 4,
            system_tokens: 1024,
            turn_tokens: 384,
            requests: 4000,
            zipf_s: 1.0,
            chunk_tokens: 256,
            seed: 1,
        }
    }
}

/// Parameters of [`shared_system_prompt`]. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct PromptParams {
    /// Distinct system prompts (agents, apps), picked with Zipfian popularity.
    pub prompts: usize,
    /// Tokens of a system prompt.
    pub prompt_tokens: usize,
    /// Mean tokens of the unique user part (uniform in 0.5×..1.5×).
    pub user_tokens: usize,
    /// Requests in the trace.
    pub requests: usize,
    /// Zipf exponent of prompt popularity.
    pub zipf_s: f64,
    /// Tokens per chunk.
    pub chunk_tokens: usize,
    /// Random seed.
    pub seed: u64,
}

impl Default for PromptParams {
    fn default() -> Self {
        PromptParams {
            prompts: 200,
            prompt_tokens: 4096,
            user_tokens: 512,
            requests: 4000,
            zipf_s: 1.0,
            chunk_tokens: 256,
            seed: 2,
        }
    }
}

/// splitmix64: small, fast and good enough for synthetic traces.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `mean/2 ..= mean*3/2` (at least 1).
    fn around(&mut self, mean: usize) -> usize {
        let lo = (mean / 2).max(1);
        lo + (self.next() % (mean as u64 + 1)) as usize
    }

    fn tokens(&mut self, n: usize, out: &mut Vec<u32>) {
        out.extend((0..n).map(|_| (self.next() % 128_000) as u32));
    }
}

/// Zipf(s) over `0..n` by inverse CDF.
#[derive(Debug, Clone)]
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|i| {
                acc += 1.0 / (i as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// Multi-turn chat: each request continues a conversation (picked by Zipf), sending the
/// system prompt, every earlier turn and a new user message.
pub fn multi_turn_chat(p: &ChatParams) -> Trace {
    let mut rng = Rng(p.seed);
    let prompts: Vec<Vec<u32>> = (0..p.system_prompts.max(1))
        .map(|_| {
            let mut v = Vec::new();
            rng.tokens(p.system_tokens, &mut v);
            v
        })
        .collect();
    // Each conversation's full token sequence and where each turn's user message ends.
    let mut convs: Vec<(Arc<[u32]>, Vec<usize>)> = Vec::with_capacity(p.conversations);
    for c in 0..p.conversations.max(1) {
        let mut seq = prompts[c % prompts.len()].clone();
        let mut ends = Vec::new();
        for _ in 0..p.turns.max(1) {
            let u = rng.around(p.turn_tokens);
            rng.tokens(u, &mut seq);
            ends.push(seq.len());
            let a = rng.around(p.turn_tokens);
            rng.tokens(a, &mut seq);
        }
        convs.push((seq.into(), ends));
    }
    let zipf = Zipf::new(convs.len(), p.zipf_s);
    let mut progress = vec![0usize; convs.len()];
    let requests = (0..p.requests)
        .map(|_| {
            let c = zipf.sample(&mut rng);
            let (seq, ends) = &convs[c];
            let t = progress[c] % ends.len();
            progress[c] += 1;
            Request {
                seq: seq.clone(),
                len: ends[t],
            }
        })
        .collect();
    Trace {
        name: format!(
            "multi-turn chat ({} conversations, zipf {})",
            p.conversations, p.zipf_s
        ),
        chunk_tokens: p.chunk_tokens,
        requests,
    }
}

/// Shared system prompts: each request is a popular system prompt (picked by Zipf)
/// followed by a unique user part.
pub fn shared_system_prompt(p: &PromptParams) -> Trace {
    let mut rng = Rng(p.seed);
    let prompts: Vec<Vec<u32>> = (0..p.prompts.max(1))
        .map(|_| {
            let mut v = Vec::new();
            rng.tokens(p.prompt_tokens, &mut v);
            v
        })
        .collect();
    let zipf = Zipf::new(prompts.len(), p.zipf_s);
    let requests = (0..p.requests)
        .map(|_| {
            let mut seq = prompts[zipf.sample(&mut rng)].clone();
            let u = rng.around(p.user_tokens);
            rng.tokens(u, &mut seq);
            let len = seq.len();
            Request {
                seq: seq.into(),
                len,
            }
        })
        .collect();
    Trace {
        name: format!(
            "shared system prompt ({} prompts, zipf {})",
            p.prompts, p.zipf_s
        ),
        chunk_tokens: p.chunk_tokens,
        requests,
    }
}

/// Tier sizes for [`run_trace`]. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// DRAM tier bytes.
    pub dram_bytes: u64,
    /// NVMe tier bytes (0: no NVMe tier).
    pub nvme_bytes: u64,
    /// Bytes of one chunk's KV block.
    pub block_bytes: u64,
}

/// Where each chunk of a trace was found. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceResult {
    /// The policy.
    pub policy: &'static str,
    /// Requests replayed.
    pub requests: u64,
    /// Chunks looked up.
    pub chunks: u64,
    /// Chunks served from DRAM.
    pub dram_hits: u64,
    /// Chunks served from NVMe.
    pub nvme_hits: u64,
    /// Chunks that had to be recomputed.
    pub misses: u64,
}

impl TraceResult {
    fn ratio(&self, n: u64) -> f64 {
        if self.chunks == 0 {
            0.0
        } else {
            n as f64 / self.chunks as f64
        }
    }

    /// Fraction of chunks served from DRAM.
    pub fn dram_hit_ratio(&self) -> f64 {
        self.ratio(self.dram_hits)
    }

    /// Fraction of chunks served from NVMe.
    pub fn nvme_hit_ratio(&self) -> f64 {
        self.ratio(self.nvme_hits)
    }

    /// Fraction of chunks served by either tier.
    pub fn hit_ratio(&self) -> f64 {
        self.ratio(self.dram_hits + self.nvme_hits)
    }
}

struct SimTier {
    policy: Box<dyn EvictionPolicy>,
    present: HashSet<BlockKey>,
    blocks: usize,
}

impl SimTier {
    fn new(kind: PolicyKind, bytes: u64, block: u64) -> Self {
        SimTier {
            policy: kind.build(bytes),
            present: HashSet::new(),
            blocks: (bytes / block.max(1)) as usize,
        }
    }

    /// Inserts `k`; returns what was evicted to make room.
    fn insert(&mut self, k: BlockKey, block: u64, evicted: &mut Vec<BlockKey>) {
        if self.blocks == 0 {
            return;
        }
        if !self.present.insert(k) {
            self.policy.access(k);
            return;
        }
        while self.present.len() > self.blocks {
            match self.policy.evict(&mut |v| v != k) {
                Some(v) => {
                    self.present.remove(&v);
                    evicted.push(v);
                }
                None => break,
            }
        }
        self.policy.insert(k, block);
    }
}

/// Replays `trace` through a DRAM and an NVMe tier of `capacity` under `policy`.
pub fn run_trace(policy: PolicyKind, capacity: Capacity, trace: &Trace) -> TraceResult {
    let hasher = ChunkHasher::new(trace.chunk_tokens, 0);
    let block = capacity.block_bytes.max(1);
    let mut dram = SimTier::new(policy, capacity.dram_bytes, block);
    let mut nvme = SimTier::new(policy, capacity.nvme_bytes, block);
    let mut r = TraceResult {
        policy: policy.as_str(),
        requests: trace.requests.len() as u64,
        chunks: 0,
        dram_hits: 0,
        nvme_hits: 0,
        misses: 0,
    };
    let mut evicted = Vec::new();
    let mut dropped = Vec::new();
    for req in &trace.requests {
        let mut missing = false;
        for k in hasher.keys(req.tokens()) {
            r.chunks += 1;
            if !missing && dram.present.contains(&k) {
                r.dram_hits += 1;
                dram.policy.access(k);
                continue;
            }
            if !missing && nvme.present.contains(&k) {
                r.nvme_hits += 1;
                nvme.policy.access(k);
            } else {
                missing = true;
                r.misses += 1;
            }
            dram.insert(k, block, &mut evicted);
            for v in evicted.drain(..) {
                if !nvme.present.contains(&v) {
                    nvme.insert(v, block, &mut dropped);
                    dropped.clear();
                }
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_deterministic_and_shaped() {
        let a = multi_turn_chat(&ChatParams {
            requests: 300,
            ..Default::default()
        });
        let b = multi_turn_chat(&ChatParams {
            requests: 300,
            ..Default::default()
        });
        assert_eq!(a.requests.len(), 300);
        assert!(a
            .requests
            .iter()
            .zip(&b.requests)
            .all(|(x, y)| x.tokens() == y.tokens()));
        let s = shared_system_prompt(&PromptParams {
            requests: 100,
            ..Default::default()
        });
        assert!(s.requests.iter().all(|r| r.tokens().len() >= 4096 + 256));
    }

    #[test]
    fn hit_ratios_grow_with_capacity_and_add_up() {
        let t = shared_system_prompt(&PromptParams {
            requests: 1500,
            prompts: 100,
            prompt_tokens: 1024,
            ..Default::default()
        });
        let small = Capacity {
            dram_bytes: 16 << 20,
            nvme_bytes: 0,
            block_bytes: 1 << 20,
        };
        let big = Capacity {
            dram_bytes: 16 << 20,
            nvme_bytes: 1 << 30,
            block_bytes: 1 << 20,
        };
        for p in [PolicyKind::Lru, PolicyKind::S3Fifo] {
            let a = run_trace(p, small, &t);
            let b = run_trace(p, big, &t);
            assert_eq!(a.dram_hits + a.nvme_hits + a.misses, a.chunks);
            assert_eq!(a.nvme_hits, 0);
            assert!(b.hit_ratio() > a.hit_ratio(), "{a:?} {b:?}");
            // 100 prompts of 4 chunks fit in 1 GiB of NVMe: only the first sight misses.
            assert!(b.hit_ratio() > 0.5, "{b:?}");
        }
    }
}
