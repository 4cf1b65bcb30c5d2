//! S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO with
//! reinsertion and a ghost FIFO of keys recently evicted from the small queue.

use std::collections::HashMap;

use super::lists::{Ghost, Lists};
use super::{EvictionPolicy, PolicySizes};
use crate::key::BlockKey;

const SMALL: u8 = 0;
const MAIN: u8 = 1;

/// Most ghost entries S3-FIFO remembers, whatever their bytes.
const GHOST_MAX_LEN: usize = 1 << 22;

/// The parameters of [`S3Fifo`]. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S3FifoParams {
    /// The small queue's share of the capacity, in percent (default 10).
    pub small_percent: u8,
    /// Hits a block needs while in the small queue to move to main when it reaches the
    /// queue's end (default 1, as in the paper).
    pub promote_hits: u8,
    /// Reinsertion credits a block in main can hold (default 3).
    pub max_freq: u8,
}

impl Default for S3FifoParams {
    fn default() -> Self {
        S3FifoParams {
            small_percent: 10,
            promote_hits: 1,
            max_freq: 3,
        }
    }
}

/// S3-FIFO with byte-sized queues: the small queue holds `small_percent` of the
/// capacity, main the rest; the ghost remembers keys evicted from the small queue up to
/// main's capacity in bytes (and [`GHOST_MAX_LEN`] keys). `Send`.
#[derive(Debug)]
pub struct S3Fifo {
    map: HashMap<BlockKey, usize>,
    lists: Lists,
    small_target: u64,
    params: S3FifoParams,
    ghost: Ghost,
}

impl S3Fifo {
    /// A policy for a tier of `capacity` bytes with the paper's parameters.
    pub fn new(capacity: u64) -> Self {
        S3Fifo::with_params(capacity, S3FifoParams::default())
    }

    /// A policy for a tier of `capacity` bytes.
    pub fn with_params(capacity: u64, params: S3FifoParams) -> Self {
        let pct = u64::from(params.small_percent.clamp(1, 90));
        let small_target = (capacity / 100 * pct).max(1);
        S3Fifo {
            map: HashMap::new(),
            lists: Lists::new(),
            small_target,
            params: S3FifoParams {
                promote_hits: params.promote_hits.max(1),
                max_freq: params.max_freq.max(params.promote_hits).max(1),
                ..params
            },
            ghost: Ghost::new(capacity.saturating_sub(small_target).max(1), GHOST_MAX_LEN),
        }
    }

    /// One step of eviction from queue `q`: `Ok(victim)`, or `Err(pinned)` after moving
    /// the tail elsewhere (promotion, reinsertion: `false`; a pinned skip: `true`).
    fn step(
        &mut self,
        q: u8,
        evictable: &mut dyn FnMut(BlockKey) -> bool,
    ) -> Result<BlockKey, bool> {
        let i = self.lists.tails[q as usize];
        let n = self.lists.nodes[i];
        self.lists.unlink(i);
        if q == SMALL && n.freq >= self.params.promote_hits {
            self.lists.nodes[i].queue = MAIN;
            self.lists.nodes[i].freq = 0;
            self.lists.push_head(i);
            return Err(false);
        }
        if q == MAIN && n.freq > 0 {
            self.lists.nodes[i].freq = n.freq - 1;
            self.lists.push_head(i);
            return Err(false);
        }
        if !evictable(n.key) {
            self.lists.push_head(i);
            return Err(true);
        }
        self.lists.release(i);
        self.map.remove(&n.key);
        if q == SMALL {
            self.ghost.add(n.key, n.size);
        }
        Ok(n.key)
    }
}

impl EvictionPolicy for S3Fifo {
    fn name(&self) -> &'static str {
        "s3fifo"
    }

    fn insert(&mut self, key: BlockKey, size: u64) {
        if self.map.contains_key(&key) {
            self.access(key);
            return;
        }
        let q = if self.ghost.take(key) { MAIN } else { SMALL };
        let i = self.lists.alloc(key, size, q);
        self.lists.push_head(i);
        self.map.insert(key, i);
    }

    fn access(&mut self, key: BlockKey) {
        if let Some(&i) = self.map.get(&key) {
            let f = &mut self.lists.nodes[i].freq;
            *f = (*f + 1).min(self.params.max_freq);
        }
    }

    fn remove(&mut self, key: BlockKey) {
        if let Some(i) = self.map.remove(&key) {
            self.lists.unlink(i);
            self.lists.release(i);
        }
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(BlockKey) -> bool) -> Option<BlockKey> {
        // Each step either evicts or moves one node; nodes carry at most `max_freq`
        // credits, so (max_freq + 2) × len steps visit every node with credits spent.
        // Consecutive pinned skips are counted per queue: once a queue has been walked
        // through finding only pinned blocks, the other queue is used even when the
        // size rule prefers this one (a small queue full of pinned blocks must not
        // starve an evictable main).
        let budget = (usize::from(self.params.max_freq) + 2) * self.map.len() + 8;
        let mut skipped = [0usize; 2];
        for _ in 0..budget {
            let small = self.lists.lens[SMALL as usize];
            let main = self.lists.lens[MAIN as usize];
            let small_open = small > 0 && skipped[SMALL as usize] < small;
            let main_open = main > 0 && skipped[MAIN as usize] < main;
            if !small_open && !main_open {
                return None;
            }
            let q = if small_open
                && (self.lists.bytes[SMALL as usize] >= self.small_target || !main_open)
            {
                SMALL
            } else {
                MAIN
            };
            match self.step(q, evictable) {
                Ok(k) => return Some(k),
                Err(true) => skipped[q as usize] += 1,
                // Something moved: the next pass may find it evictable.
                Err(false) => skipped[q as usize] = 0,
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn sizes(&self) -> PolicySizes {
        PolicySizes {
            blocks: self.map.len() as u64,
            bytes: self.lists.bytes[0] + self.lists.bytes[1],
            probation_bytes: self.lists.bytes[SMALL as usize],
            probation_target: self.small_target,
            ghost_blocks: self.ghost.len() as u64,
            ghost_bytes: self.ghost.bytes(),
            orphan_blocks: 0,
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
    fn keeps_reused_keys_and_drops_one_hit_wonders() {
        let mut p = S3Fifo::new(100);
        for i in 0..5 {
            p.insert(k(i), 1);
            p.access(k(i));
        }
        for i in 100..200 {
            p.insert(k(i), 1);
        }
        let mut evicted = Vec::new();
        for _ in 0..50 {
            evicted.push(p.evict(&mut |_| true).unwrap());
        }
        assert!(evicted.iter().all(|x| x.0 >= 100), "{evicted:?}");
        // A key evicted from small goes to the ghost, and re-enters straight into main.
        p.insert(k(149), 1);
        assert_eq!(p.lists.nodes[p.map[&k(149)]].queue, MAIN);
        assert_eq!(p.evict(&mut |_| false), None);
        assert_eq!(p.len(), 56);
    }

    /// The ghost is sized by main's capacity, not main's current length: with main
    /// empty it still remembers (the old sizing collapsed to 16 keys, so S3-FIFO
    /// degenerated to FIFO on traces whose reuse skips main).
    #[test]
    fn ghost_remembers_main_capacity_even_with_main_empty() {
        let mut p = S3Fifo::new(1000);
        for i in 0..2000 {
            p.insert(k(i), 1);
            while p.len() > 1000 {
                p.evict(&mut |_| true);
            }
        }
        let s = p.sizes();
        assert_eq!(s.ghost_blocks, 900, "{s:?}");
        p.insert(k(500), 1);
        assert_eq!(p.lists.nodes[p.map[&k(500)]].queue, MAIN);
    }

    #[test]
    fn promotion_threshold_is_a_parameter() {
        for (hits, promoted) in [(1u8, true), (2, false)] {
            let mut p = S3Fifo::with_params(
                10,
                S3FifoParams {
                    promote_hits: hits,
                    ..Default::default()
                },
            );
            p.insert(k(1), 1);
            p.access(k(1));
            for i in 2..=10 {
                p.insert(k(i), 1);
            }
            let first = p.evict(&mut |_| true);
            assert_eq!(first != Some(k(1)), promoted, "promote_hits {hits}");
        }
    }

    #[test]
    fn pinned_small_queue_falls_through_to_main() {
        let mut p = S3Fifo::new(100);
        for i in 0..90 {
            p.insert(k(i), 1);
            p.access(k(i));
        }
        for i in 90..100 {
            p.insert(k(i), 1);
        }
        let v = p.evict(&mut |x| x.0 < 90);
        assert!(v.is_some_and(|x| x.0 < 90), "{v:?}");
    }
}
