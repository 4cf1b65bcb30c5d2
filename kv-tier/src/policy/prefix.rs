//! The default policy: prefix-aware adaptive replacement.
//!
//! What an engine's cache knows that a generic cache does not: a block is only ever
//! read after its whole prefix (prefix semantics), so
//!
//! * **a block whose prefix left the store can never hit** — it is an orphan, evicted
//!   before anything else (the store reports lost prefixes with
//!   [`EvictionPolicy::prefix_lost`]);
//! * **a block is worth at least as much as any block chained from it** — only leaves
//!   (blocks with no child in the tier) are eviction candidates, so a chain is eaten
//!   from its end and never cut at its start (which would orphan the rest).
//!
//! Among the leaves it adapts between recency and frequency the way ARC does (Megiddo
//! and Modha, FAST 2003), with one change of what "seen once" means: T1 holds chain
//! ends that were never hit — the last block a writer stored of its sequence, often a
//! partial block that the next turn rewrites — and T2 everything else (blocks that
//! were hit, or that something is chained from), each ordered by last access. Two
//! ghost lists remember keys recently evicted from each; a ghost hit in T1's grows
//! T1's target share, one in T2's shrinks it. On traces where chain ends are reused
//! the target grows and the policy becomes LRU over leaves; where they are not, they
//! go first, as S3-FIFO's small queue would send them.
//!
//! Out of T2, a third list T3 keeps **shared prefixes**: a block from which two
//! sequences really continued (two children that are not never-hit chain ends — a
//! system prompt that several conversations start with). T3 has its own target and
//! ghost list, adapted the same way against T2's: while evicted shared prefixes come
//! back (small tiers, where conversations cannot stay but popular prompts could), T3
//! is kept; while T2's blocks come back, T2 is. A shared prefix's own prefix is kept
//! by the leaves-only rule.

use std::collections::{BTreeSet, HashMap};

use super::lists::Ghost;
use super::{ChainPos, EvictionPolicy, PolicySizes};
use crate::key::BlockKey;

const T1: u8 = 0;
const T2: u8 = 1;
const T3: u8 = 2;
const ORPHAN: u8 = 3;
const NONE: u8 = 4;
const NIL: u32 = u32::MAX;
/// Most keys a ghost list remembers, whatever their bytes.
const GHOST_MAX_LEN: usize = 1 << 22;
/// Most blocks one ghost hit moves T3's target by (ARC's step, the ratio of the ghost
/// lists, is unbounded). Chosen on the generator's traces (1, 2, 4, 8, 16, 64 and
/// unbounded tried): smaller steps lose the tiny-capacity gains, larger ones cost up
/// to 0.7 points at 1/64 on the agent trace.
const Q_STEP_MAX_BLOCKS: u64 = 16;

#[derive(Debug, Clone, Copy)]
struct Node {
    key: BlockKey,
    size: u64,
    parent: Option<BlockKey>,
    tick: u64,
    list: u8,
    orphan: bool,
    /// The candidate set the node is in (`NONE` when it has children here).
    set: u8,
    prev_sib: u32,
    next_sib: u32,
}

/// Prefix-aware adaptive replacement (the module docs say how). `Send`.
#[derive(Debug)]
pub struct PrefixAware {
    map: HashMap<BlockKey, u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// Children in this tier, by parent key (resident or not): first child and count.
    families: HashMap<BlockKey, (u32, u32)>,
    /// Eviction candidates by (last access, node): T1, T2 and T3 leaves, orphans.
    cand: [BTreeSet<(u64, u32)>; 4],
    bytes: [u64; 3],
    orphans: usize,
    tick: u64,
    /// Target bytes of T1.
    p: u64,
    /// Target bytes of T3 (shared prefixes).
    q: u64,
    capacity: u64,
    ghosts: [Ghost; 3],
}

impl PrefixAware {
    /// A policy for a tier of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity.max(1);
        PrefixAware {
            map: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            families: HashMap::new(),
            cand: Default::default(),
            bytes: [0; 3],
            orphans: 0,
            tick: 0,
            p: 0,
            q: 0,
            capacity,
            ghosts: [
                Ghost::new(capacity, GHOST_MAX_LEN),
                Ghost::new(capacity, GHOST_MAX_LEN),
                Ghost::new(capacity, GHOST_MAX_LEN),
            ],
        }
    }

    fn is_leaf(&self, key: BlockKey) -> bool {
        self.families.get(&key).is_none_or(|f| f.1 == 0)
    }

    /// Puts node `i` in the candidate set its state calls for.
    fn place(&mut self, i: u32) {
        let n = self.nodes[i as usize];
        let want = if n.orphan {
            ORPHAN
        } else if self.is_leaf(n.key) {
            n.list
        } else {
            NONE
        };
        if want == n.set {
            return;
        }
        if n.set != NONE {
            self.cand[n.set as usize].remove(&(n.tick, i));
        }
        if want != NONE {
            self.cand[want as usize].insert((n.tick, i));
        }
        self.nodes[i as usize].set = want;
    }

    fn unplace(&mut self, i: u32) {
        let n = self.nodes[i as usize];
        if n.set != NONE {
            self.cand[n.set as usize].remove(&(n.tick, i));
            self.nodes[i as usize].set = NONE;
        }
    }

    /// Sets node `i`'s last access to now, keeping its candidate set ordered.
    fn touch(&mut self, i: u32) {
        self.unplace(i);
        self.tick += 1;
        self.nodes[i as usize].tick = self.tick;
        self.place(i);
    }

    fn link(&mut self, i: u32) {
        let Some(p) = self.nodes[i as usize].parent else {
            return;
        };
        let f = self.families.entry(p).or_insert((NIL, 0));
        let head = f.0;
        f.0 = i;
        f.1 += 1;
        let shared = self.nodes[i as usize].list != T1 && self.has_continuation(head);
        self.nodes[i as usize].next_sib = head;
        self.nodes[i as usize].prev_sib = NIL;
        if head != NIL {
            self.nodes[head as usize].prev_sib = i;
        }
        if let Some(&pi) = self.map.get(&p) {
            // A block that something is chained from is not a chain end any more.
            self.promote(pi);
            if shared {
                // Two sequences continue from it: a shared prefix.
                self.move_to(pi, T3);
            }
            self.place(pi);
        }
    }

    /// True when one of the (up to four) most recent children from `first` on is not
    /// a never-hit chain end: a sequence that really continued (bounded walk, O(1)).
    fn has_continuation(&self, first: u32) -> bool {
        let mut c = first;
        for _ in 0..4 {
            if c == NIL {
                return false;
            }
            if self.nodes[c as usize].list != T1 {
                return true;
            }
            c = self.nodes[c as usize].next_sib;
        }
        false
    }

    /// Moves node `i` from T1 to T2.
    fn promote(&mut self, i: u32) {
        if self.nodes[i as usize].list == T1 {
            self.move_to(i, T2);
        }
    }

    fn move_to(&mut self, i: u32, to: u8) {
        let n = self.nodes[i as usize];
        if n.list != to {
            self.unplace(i);
            self.bytes[n.list as usize] -= n.size;
            self.bytes[to as usize] += n.size;
            self.nodes[i as usize].list = to;
        }
    }

    fn unlink(&mut self, i: u32) {
        let n = self.nodes[i as usize];
        let Some(p) = n.parent else {
            return;
        };
        if n.prev_sib != NIL {
            self.nodes[n.prev_sib as usize].next_sib = n.next_sib;
        }
        if n.next_sib != NIL {
            self.nodes[n.next_sib as usize].prev_sib = n.prev_sib;
        }
        if let Some(f) = self.families.get_mut(&p) {
            if f.0 == i {
                f.0 = n.next_sib;
            }
            f.1 -= 1;
            if f.1 == 0 {
                self.families.remove(&p);
            }
        }
        if let Some(&pi) = self.map.get(&p) {
            self.place(pi);
        }
    }

    /// Marks (or clears) the orphan flag on every block chained from `root`.
    fn set_orphans(&mut self, root: BlockKey, orphan: bool) {
        let mut stack = vec![root];
        while let Some(k) = stack.pop() {
            let mut c = self.families.get(&k).map_or(NIL, |f| f.0);
            while c != NIL {
                let n = self.nodes[c as usize];
                if n.orphan != orphan {
                    self.nodes[c as usize].orphan = orphan;
                    if orphan {
                        self.orphans += 1;
                    } else {
                        self.orphans -= 1;
                    }
                    self.place(c);
                    stack.push(n.key);
                }
                c = n.next_sib;
            }
        }
    }

    /// Removes node `i` entirely; returns it.
    fn drop_node(&mut self, i: u32) -> Node {
        self.unplace(i);
        self.unlink(i);
        let n = self.nodes[i as usize];
        self.map.remove(&n.key);
        self.bytes[n.list as usize] -= n.size;
        if n.orphan {
            self.orphans -= 1;
        }
        self.free.push(i);
        n
    }

    /// The first evictable candidate of set `s`, in last-access order (pinned ones are
    /// stepped over in place).
    fn pick(&self, s: u8, evictable: &mut dyn FnMut(BlockKey) -> bool) -> Option<u32> {
        self.cand[s as usize]
            .iter()
            .map(|&(_, i)| i)
            .find(|&i| evictable(self.nodes[i as usize].key))
    }
}

impl EvictionPolicy for PrefixAware {
    fn name(&self) -> &'static str {
        "prefix"
    }

    fn insert(&mut self, key: BlockKey, size: u64) {
        self.insert_child(
            key,
            size,
            ChainPos {
                parent: None,
                end: true,
            },
        );
    }

    fn insert_child(&mut self, key: BlockKey, size: u64, pos: ChainPos) {
        let parent = pos.parent;
        if self.map.contains_key(&key) {
            self.access(key);
            return;
        }
        // ARC: a ghost hit says which list should have kept the block.
        let g = [
            self.ghosts[0].bytes(),
            self.ghosts[1].bytes(),
            self.ghosts[2].bytes(),
        ];
        let ratio = |a: u64, b: u64| size.saturating_mul((a / b.max(1)).max(1));
        let q_step = |a: u64, b: u64| ratio(a, b).min(size.saturating_mul(Q_STEP_MAX_BLOCKS));
        let list = if self.ghosts[0].take(key) {
            self.p = (self.p + ratio(g[1] + g[2], g[0])).min(self.capacity);
            T2
        } else if self.ghosts[1].take(key) {
            self.p = self.p.saturating_sub(ratio(g[0], g[1] + g[2]));
            self.q = self.q.saturating_sub(q_step(g[2], g[1]));
            T2
        } else if self.ghosts[2].take(key) {
            self.p = self.p.saturating_sub(ratio(g[0], g[1] + g[2]));
            self.q = (self.q + q_step(g[1], g[2])).min(self.capacity);
            T3
        } else if pos.end {
            T1
        } else {
            T2
        };
        self.tick += 1;
        let n = Node {
            key,
            size,
            parent,
            tick: self.tick,
            list,
            orphan: false,
            set: NONE,
            prev_sib: NIL,
            next_sib: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = n;
                i
            }
            None => {
                self.nodes.push(n);
                (self.nodes.len() - 1) as u32
            }
        };
        self.map.insert(key, i);
        self.bytes[list as usize] += size;
        self.link(i);
        // Blocks chained from this one that were orphans have their prefix back.
        if self.families.contains_key(&key) {
            self.set_orphans(key, false);
        }
        self.place(i);
    }

    fn access(&mut self, key: BlockKey) {
        let Some(&i) = self.map.get(&key) else {
            return;
        };
        self.promote(i);
        self.touch(i);
    }

    fn remove(&mut self, key: BlockKey) {
        if let Some(&i) = self.map.get(&key) {
            self.drop_node(i);
        }
    }

    fn prefix_lost(&mut self, parent: BlockKey) {
        self.set_orphans(parent, true);
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(BlockKey) -> bool) -> Option<BlockKey> {
        let i = match self.pick(ORPHAN, evictable) {
            Some(i) => i,
            None => {
                let rest = if self.bytes[T3 as usize] > self.q {
                    [T3, T2]
                } else {
                    [T2, T3]
                };
                let order = if self.bytes[T1 as usize] > self.p {
                    [T1, rest[0], rest[1]]
                } else {
                    [rest[0], rest[1], T1]
                };
                order.iter().find_map(|&s| self.pick(s, evictable))?
            }
        };
        let n = self.drop_node(i);
        if !n.orphan {
            self.ghosts[n.list as usize].add(n.key, n.size);
        }
        Some(n.key)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn sizes(&self) -> PolicySizes {
        PolicySizes {
            blocks: self.map.len() as u64,
            bytes: self.bytes.iter().sum(),
            probation_bytes: self.bytes[T1 as usize],
            probation_target: self.p,
            ghost_blocks: self.ghosts.iter().map(|g| g.len() as u64).sum(),
            ghost_bytes: self.ghosts.iter().map(|g| g.bytes()).sum(),
            orphan_blocks: self.orphans as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u64) -> BlockKey {
        BlockKey(i as u128)
    }

    fn end(parent: Option<BlockKey>) -> ChainPos {
        ChainPos { parent, end: true }
    }

    fn mid(parent: Option<BlockKey>) -> ChainPos {
        ChainPos { parent, end: false }
    }

    /// A chain 1 → 2 → 3 and a lone block 9 accessed before the chain.
    fn chain() -> PrefixAware {
        let mut p = PrefixAware::new(100);
        p.insert_child(k(9), 1, end(None));
        p.insert_child(k(1), 1, mid(None));
        p.insert_child(k(2), 1, mid(Some(k(1))));
        p.insert_child(k(3), 1, end(Some(k(2))));
        p
    }

    #[test]
    fn chains_are_eaten_from_their_end() {
        let mut p = chain();
        // 1 is older than 9 but has a child: 9 goes first, then 3, 2, 1.
        let order: Vec<_> = (0..4).filter_map(|_| p.evict(&mut |_| true)).collect();
        assert_eq!(order, vec![k(9), k(3), k(2), k(1)]);
        assert!(p.is_empty());
        assert_eq!(p.sizes().ghost_blocks, 4);
    }

    #[test]
    fn orphans_go_first_and_come_back_with_their_prefix() {
        let mut p = chain();
        p.remove(k(1));
        p.prefix_lost(k(1));
        assert_eq!(p.sizes().orphan_blocks, 2);
        p.insert_child(k(1), 1, mid(None));
        assert_eq!(p.sizes().orphan_blocks, 0);
        // The chain is whole again: the lone block (the oldest leaf) goes first.
        assert_eq!(p.evict(&mut |_| true), Some(k(9)));
        p.insert_child(k(8), 1, end(None));
        p.remove(k(1));
        p.prefix_lost(k(1));
        // The orphans go before the newer lone block, oldest first.
        assert_eq!(p.evict(&mut |_| true), Some(k(2)));
        assert_eq!(p.evict(&mut |_| true), Some(k(3)));
        assert_eq!(p.evict(&mut |_| true), Some(k(8)));
        assert_eq!(p.sizes().orphan_blocks, 0);
    }

    #[test]
    fn pinned_leaves_are_skipped_and_hits_move_to_t2() {
        let mut p = chain();
        p.access(k(9));
        // Only the chain's end is on probation (1 and 2 have children).
        assert_eq!(p.sizes().probation_bytes, 1);
        // T1 is over its target (0): its leaf would go, but it is pinned.
        assert_eq!(p.evict(&mut |x| x != k(3)), Some(k(9)));
        assert_eq!(p.evict(&mut |x| x != k(3)), None);
        assert_eq!(p.len(), 3);
    }

    /// A block two sequences continue from is a shared prefix (T3); a block whose only
    /// other child is a never-hit chain end is not. With T3 over its target (0) the
    /// shared prefix goes before an older ordinary leaf, and its ghost hit raises T3's
    /// target so that it is then kept.
    #[test]
    fn shared_prefixes_adapt_their_own_target() {
        let mut p = PrefixAware::new(100);
        p.insert_child(k(1), 1, mid(None));
        p.insert_child(k(2), 1, end(Some(k(1))));
        p.insert_child(k(3), 1, mid(Some(k(1))));
        assert_eq!(p.nodes[p.map[&k(1)] as usize].list, T2);
        p.insert_child(k(4), 1, mid(Some(k(1))));
        assert_eq!(p.nodes[p.map[&k(1)] as usize].list, T3);
        p.insert_child(k(9), 1, mid(None));
        for c in [2, 3, 4] {
            p.remove(k(c));
        }
        assert_eq!(p.evict(&mut |_| true), Some(k(1)));
        assert_eq!(p.sizes().probation_target, 0);
        p.insert_child(k(1), 1, mid(None));
        assert!(p.q > 0);
        assert_eq!(p.nodes[p.map[&k(1)] as usize].list, T3);
        p.insert_child(k(8), 1, mid(None));
        assert_eq!(p.evict(&mut |_| true), Some(k(9)));
    }

    #[test]
    fn ghost_hits_adapt_the_target() {
        let mut p = PrefixAware::new(10);
        for i in 0..20 {
            p.insert(k(i), 1);
            while p.len() > 10 {
                p.evict(&mut |_| true);
            }
        }
        assert_eq!(p.sizes().probation_target, 0);
        p.insert(k(5), 1); // evicted from T1, remembered
        assert!(p.sizes().probation_target > 0);
    }
}
