//! Doubly linked lists over one node slab, shared by the LRU and S3-FIFO policies.

use std::collections::{HashMap, VecDeque};

use crate::key::BlockKey;

pub(super) const NIL: usize = usize::MAX;

#[derive(Debug, Clone, Copy)]
pub(super) struct Node {
    pub key: BlockKey,
    pub size: u64,
    pub prev: usize,
    pub next: usize,
    pub freq: u8,
    pub queue: u8,
}

/// Doubly linked lists over one node slab: O(1) push, unlink and move.
#[derive(Debug, Default)]
pub(super) struct Lists {
    pub nodes: Vec<Node>,
    free: Vec<usize>,
    // (head, tail, len, bytes) per list.
    pub heads: [usize; 2],
    pub tails: [usize; 2],
    pub lens: [usize; 2],
    pub bytes: [u64; 2],
}

impl Lists {
    pub fn new() -> Self {
        Lists {
            heads: [NIL; 2],
            tails: [NIL; 2],
            ..Default::default()
        }
    }

    pub fn alloc(&mut self, key: BlockKey, size: u64, queue: u8) -> usize {
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
    pub fn push_head(&mut self, i: usize) {
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

    pub fn unlink(&mut self, i: usize) {
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

    pub fn release(&mut self, i: usize) {
        self.free.push(i);
    }
}

/// A FIFO of recently evicted keys ("ghosts"), bounded in bytes and in count: a key
/// that comes back while remembered is a sign the tier should have kept it.
#[derive(Debug, Default)]
pub(super) struct Ghost {
    fifo: VecDeque<(u64, BlockKey)>,
    live: HashMap<BlockKey, (u64, u64)>,
    seq: u64,
    bytes: u64,
    max_bytes: u64,
    max_len: usize,
}

impl Ghost {
    pub fn new(max_bytes: u64, max_len: usize) -> Self {
        Ghost {
            max_bytes,
            max_len: max_len.max(1),
            ..Default::default()
        }
    }

    /// Remembers `key` (of `size` bytes) as just evicted.
    pub fn add(&mut self, key: BlockKey, size: u64) {
        self.take(key);
        self.seq += 1;
        self.fifo.push_back((self.seq, key));
        self.live.insert(key, (self.seq, size));
        self.bytes += size;
        self.trim();
    }

    /// Forgets `key`; true when it was remembered.
    pub fn take(&mut self, key: BlockKey) -> bool {
        match self.live.remove(&key) {
            Some((_, size)) => {
                self.bytes -= size;
                // Stale FIFO entries are skipped when popped; compact when they pile up.
                if self.fifo.len() > 2 * self.live.len() + 64 {
                    let live = &self.live;
                    self.fifo
                        .retain(|(s, k)| live.get(k).is_some_and(|(ls, _)| ls == s));
                }
                true
            }
            None => false,
        }
    }

    fn trim(&mut self) {
        while self.bytes > self.max_bytes || self.live.len() > self.max_len {
            let Some((s, k)) = self.fifo.pop_front() else {
                break;
            };
            if self.live.get(&k).is_some_and(|(ls, _)| *ls == s) {
                if let Some((_, size)) = self.live.remove(&k) {
                    self.bytes -= size;
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}
