//! Eviction policies: LRU and S3-FIFO behind one trait.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::key::BlockKey;

/// Which policy a tier uses. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO with
    /// reinsertion, and a ghost FIFO of recently evicted keys. AIBrix's default.
    #[default]
    S3Fifo,
}

impl PolicyKind {
    /// A fresh policy for a tier of `capacity` bytes.
    pub fn build(self, capacity: u64) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::S3Fifo => Box::new(S3Fifo::new(capacity)),
        }
    }

    /// `lru` or `s3fifo`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::S3Fifo => "s3fifo",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = kv_core::Error;
    fn from_str(s: &str) -> kv_core::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(PolicyKind::Lru),
            "s3fifo" | "s3-fifo" => Ok(PolicyKind::S3Fifo),
            "default" => Ok(PolicyKind::default()),
            _ => Err(kv_core::Error::invalid_argument(format!(
                "unknown eviction policy {s:?}; use lru, s3fifo or default"
            ))),
        }
    }
}

/// Decides which block of a tier to evict. Implementations are `Send` and used behind
/// a lock; every method is O(1) amortised.
///
/// The tier tells the policy about insertions, accesses and removals; `evict` picks a
/// victim among the keys for which `evictable` returns true (pinned blocks return
/// false and stay), removes it from the policy and returns it.
pub trait EvictionPolicy: Send {
    /// The policy's name.
    fn name(&self) -> &'static str;
    /// A new key of `size` bytes (a key already present is treated as an access).
    fn insert(&mut self, key: BlockKey, size: u64);
    /// A hit on `key`.
    fn access(&mut self, key: BlockKey);
    /// `key` left the tier for another reason (removed, replaced, dropped).
    fn remove(&mut self, key: BlockKey);
    /// Picks, removes and returns a victim, skipping keys that are not `evictable`;
    /// `None` when nothing can be evicted.
    fn evict(&mut self, evictable: &mut dyn FnMut(BlockKey) -> bool) -> Option<BlockKey>;
    /// Keys tracked.
    fn len(&self) -> usize;
    /// True when no key is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const NIL: usize = usize::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    key: BlockKey,
    size: u64,
    prev: usize,
    next: usize,
    freq: u8,
    queue: u8,
}

/// Doubly linked lists over one node slab: O(1) push, unlink and move.
#[derive(Debug, Default)]
struct Lists {
    nodes: Vec<Node>,
    free: Vec<usize>,
    // (head, tail, len, bytes) per list.
    heads: [usize; 2],
    tails: [usize; 2],
    lens: [usize; 2],
    bytes: [u64; 2],
}

impl Lists {
    fn new() -> Self {
        Lists {
            heads: [NIL; 2],
            tails: [NIL; 2],
            ..Default::default()
        }
    }

    fn alloc(&mut self, key: BlockKey, size: u64, queue: u8) -> usize {
        let n = Node {
            key,
            size,
            prev: NIL,
            next: NIL,
            freq: 0,
            queue,
        };
        match self.free.pop() {
            Some(i) => {
                self.nodes[i] = n;
                i
            }
            None => {
                self.nodes.push(n);
                self.nodes.len() - 1
            }
        }
    }

    /// Links node `i` at the head (most recent end) of its queue.
    fn push_head(&mut self, i: usize) {
        let q = self.nodes[i].queue as usize;
        let h = self.heads[q];
        self.nodes[i].prev = NIL;
        self.nodes[i].next = h;
        if h != NIL {
            self.nodes[h].prev = i;
        } else {
            self.tails[q] = i;
        }
        self.heads[q] = i;
        self.lens[q] += 1;
        self.bytes[q] += self.nodes[i].size;
    }

    fn unlink(&mut self, i: usize) {
        let Node {
            prev, next, queue, ..
        } = self.nodes[i];
        let q = queue as usize;
        if prev != NIL {
            self.nodes[prev].next = next;
        } else {
            self.heads[q] = next;
        }
        if next != NIL {
            self.nodes[next].prev = prev;
        } else {
            self.tails[q] = prev;
        }
        self.lens[q] -= 1;
        self.bytes[q] -= self.nodes[i].size;
    }

    fn release(&mut self, i: usize) {
        self.free.push(i);
    }
}

/// Least recently used. `Send`.
#[derive(Debug)]
pub struct Lru {
    map: HashMap<BlockKey, usize>,
    lists: Lists,
}

impl Default for Lru {
    fn default() -> Self {
        Lru {
            map: HashMap::new(),
            lists: Lists::new(),
        }
    }
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn insert(&mut self, key: BlockKey, size: u64) {
        if self.map.contains_key(&key) {
            self.access(key);
            return;
        }
        let i = self.lists.alloc(key, size, 0);
        self.lists.push_head(i);
        self.map.insert(key, i);
    }

    fn access(&mut self, key: BlockKey) {
        if let Some(&i) = self.map.get(&key) {
            self.lists.unlink(i);
            self.lists.push_head(i);
        }
    }

    fn remove(&mut self, key: BlockKey) {
        if let Some(i) = self.map.remove(&key) {
            self.lists.unlink(i);
            self.lists.release(i);
        }
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(BlockKey) -> bool) -> Option<BlockKey> {
        // Walk from the cold end; pinned keys are skipped in place (not moved), so a
        // fully pinned tier ends the walk after one pass.
        let mut i = self.lists.tails[0];
        while i != NIL {
            let n = self.lists.nodes[i];
            if evictable(n.key) {
                self.lists.unlink(i);
                self.lists.release(i);
                self.map.remove(&n.key);
                return Some(n.key);
            }
            i = n.prev;
        }
        None
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

const SMALL: u8 = 0;
const MAIN: u8 = 1;

/// S3-FIFO with byte-sized queues: the small queue holds 10 % of the capacity, main the
/// rest; the ghost remembers as many evicted keys as main holds. `Send`.
#[derive(Debug)]
pub struct S3Fifo {
    map: HashMap<BlockKey, usize>,
    lists: Lists,
    small_target: u64,
    ghost: VecDeque<BlockKey>,
    ghost_set: HashSet<BlockKey>,
}

impl S3Fifo {
    /// A policy for a tier of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        S3Fifo {
            map: HashMap::new(),
            lists: Lists::new(),
            small_target: (capacity / 10).max(1),
            ghost: VecDeque::new(),
            ghost_set: HashSet::new(),
        }
    }

    fn ghost_add(&mut self, key: BlockKey) {
        if self.ghost_set.insert(key) {
            self.ghost.push_back(key);
        }
        let limit = self.lists.lens[MAIN as usize].max(16);
        while self.ghost.len() > limit {
            if let Some(k) = self.ghost.pop_front() {
                self.ghost_set.remove(&k);
            }
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
        if q == SMALL && n.freq > 1 {
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
            self.ghost_add(n.key);
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
        let q = if self.ghost_set.remove(&key) {
            MAIN
        } else {
            SMALL
        };
        let i = self.lists.alloc(key, size, q);
        self.lists.push_head(i);
        self.map.insert(key, i);
    }

    fn access(&mut self, key: BlockKey) {
        if let Some(&i) = self.map.get(&key) {
            let f = &mut self.lists.nodes[i].freq;
            *f = (*f + 1).min(3);
        }
    }

    fn remove(&mut self, key: BlockKey) {
        if let Some(i) = self.map.remove(&key) {
            self.lists.unlink(i);
            self.lists.release(i);
        }
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(BlockKey) -> bool) -> Option<BlockKey> {
        // Each step either evicts or moves one node; nodes carry at most 3 credits, so
        // 5 × len steps visit every node with credits spent: anything left is pinned.
        // Consecutive pinned skips are counted per queue: once a queue has been walked
        // through finding only pinned blocks, the other queue is used even when the
        // size rule prefers this one (a small queue full of pinned blocks must not
        // starve an evictable main).
        let budget = 5 * self.map.len() + 8;
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
    fn s3fifo_keeps_reused_keys_and_drops_one_hit_wonders() {
        let mut p = S3Fifo::new(100);
        // Hot keys, accessed twice, get promoted to main on the next eviction pass.
        for i in 0..5 {
            p.insert(k(i), 1);
            p.access(k(i));
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
}
