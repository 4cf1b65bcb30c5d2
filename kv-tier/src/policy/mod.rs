//! Eviction policies behind one trait: LRU, S3-FIFO and the default, prefix-aware
//! adaptive replacement ([`PrefixAware`]).

mod lists;
mod lru;
mod prefix;
mod s3fifo;

pub use lru::Lru;
pub use prefix::PrefixAware;
pub use s3fifo::{S3Fifo, S3FifoParams};

use crate::key::BlockKey;

/// Which policy a tier uses. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// S3-FIFO (Yang et al., SOSP 2023) with the paper's parameters: a small
    /// probationary FIFO (10 %), a main FIFO with reinsertion, a ghost FIFO.
    S3Fifo,
    /// S3-FIFO with other parameters (small queue share, promotion threshold).
    S3FifoWith(S3FifoParams),
    /// Prefix-aware adaptive replacement (the default): orphans first, only chain
    /// ends evicted, ARC-like balance of recency and frequency.
    #[default]
    Prefix,
}

impl PolicyKind {
    /// A fresh policy for a tier of `capacity` bytes.
    pub fn build(self, capacity: u64) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::S3Fifo => Box::new(S3Fifo::new(capacity)),
            PolicyKind::S3FifoWith(p) => Box::new(S3Fifo::with_params(capacity, p)),
            PolicyKind::Prefix => Box::new(PrefixAware::new(capacity)),
        }
    }

    /// `lru`, `s3fifo` or `prefix`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::S3Fifo | PolicyKind::S3FifoWith(_) => "s3fifo",
            PolicyKind::Prefix => "prefix",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = kv_core::Error;
    fn from_str(s: &str) -> kv_core::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(PolicyKind::Lru),
            "s3fifo" | "s3-fifo" => Ok(PolicyKind::S3Fifo),
            "prefix" | "default" => Ok(PolicyKind::Prefix),
            _ => Err(kv_core::Error::invalid_argument(format!(
                "unknown eviction policy {s:?}; use lru, s3fifo or prefix (the default)"
            ))),
        }
    }
}

/// Where a block sits in its token sequence, as its writer said. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainPos {
    /// The chunk it is chained from (`None`: a first chunk, or not known).
    pub parent: Option<BlockKey>,
    /// The last block its writer stored of the sequence (nothing chained from it yet).
    pub end: bool,
}

/// Sizes a policy reports for [`crate::Stats`]. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicySizes {
    /// Blocks tracked.
    pub blocks: u64,
    /// Bytes tracked.
    pub bytes: u64,
    /// Bytes on probation: S3-FIFO's small queue, the prefix policy's seen-once list.
    pub probation_bytes: u64,
    /// Their target: S3-FIFO's small-queue size, the prefix policy's adaptive target.
    pub probation_target: u64,
    /// Keys remembered by the ghost list(s).
    pub ghost_blocks: u64,
    /// Bytes of those keys' blocks.
    pub ghost_bytes: u64,
    /// Blocks whose prefix left the store (evicted first).
    pub orphan_blocks: u64,
}

/// Decides which block of a tier to evict. Implementations are `Send` and used behind
/// a lock; every method is O(1) amortised (the prefix policy: O(log n)).
///
/// The tier tells the policy about insertions, accesses and removals; `evict` picks a
/// victim among the keys for which `evictable` returns true (pinned blocks return
/// false and stay), removes it from the policy and returns it.
pub trait EvictionPolicy: Send {
    /// The policy's name.
    fn name(&self) -> &'static str;
    /// A new key of `size` bytes (a key already present is treated as an access).
    fn insert(&mut self, key: BlockKey, size: u64);
    /// A new key at `pos` in its token sequence. Policies that use prefix structure
    /// override it; the default forgets the position.
    fn insert_child(&mut self, key: BlockKey, size: u64, pos: ChainPos) {
        let _ = pos;
        self.insert(key, size);
    }
    /// A hit on `key`.
    fn access(&mut self, key: BlockKey);
    /// `key` left the tier for another reason (removed, replaced, dropped).
    fn remove(&mut self, key: BlockKey);
    /// `parent` left the store: no block chained from it can be hit any more.
    fn prefix_lost(&mut self, parent: BlockKey) {
        let _ = parent;
    }
    /// Picks, removes and returns a victim, skipping keys that are not `evictable`;
    /// `None` when nothing can be evicted.
    fn evict(&mut self, evictable: &mut dyn FnMut(BlockKey) -> bool) -> Option<BlockKey>;
    /// Keys tracked.
    fn len(&self) -> usize;
    /// True when no key is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sizes for [`crate::Stats`].
    fn sizes(&self) -> PolicySizes {
        PolicySizes {
            blocks: self.len() as u64,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u64) -> BlockKey {
        BlockKey(i as u128)
    }

    #[test]
    fn lru_evicts_least_recent_and_skips_pinned() {
        let mut p = Lru::default();
        for i in 0..4 {
            p.insert(k(i), 1);
        }
        p.access(k(0));
        assert_eq!(p.evict(&mut |_| true), Some(k(1)));
        assert_eq!(p.evict(&mut |x| x != k(2)), Some(k(3)));
        assert_eq!(p.evict(&mut |_| false), None);
        assert_eq!(p.len(), 2);
        p.remove(k(2));
        assert_eq!(p.evict(&mut |_| true), Some(k(0)));
        assert!(p.is_empty());
    }

    #[test]
    fn names_parse_back() {
        for p in [PolicyKind::Lru, PolicyKind::S3Fifo, PolicyKind::Prefix] {
            assert_eq!(p.as_str().parse::<PolicyKind>().unwrap(), p);
            assert_eq!(p.build(1 << 20).name(), p.as_str());
        }
        assert_eq!(
            "default".parse::<PolicyKind>().unwrap(),
            PolicyKind::default()
        );
        assert!("mru".parse::<PolicyKind>().is_err());
    }
}
