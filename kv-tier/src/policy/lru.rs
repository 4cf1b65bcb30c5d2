//! Least recently used.

use std::collections::HashMap;

use super::lists::{Lists, NIL};
use super::{EvictionPolicy, PolicySizes};
use crate::key::BlockKey;

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

    fn sizes(&self) -> PolicySizes {
        PolicySizes {
            blocks: self.map.len() as u64,
            bytes: self.lists.bytes[0],
            ..Default::default()
        }
    }
}
