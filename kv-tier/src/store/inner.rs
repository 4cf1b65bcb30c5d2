//! The index and the DRAM tier: entries, insertion, slot allocation, eviction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::{Error, Result};
use parking_lot::{Mutex, RwLock};

use super::handle::BlockHandle;
pub(crate) use super::stats::Counters;
use crate::arena::{Arena, Slot};
use crate::key::{BlockKey, ChunkHasher};
use crate::nvme::{self, Job, Nvme, NvmeLoc};
use crate::options::Options;
use crate::policy::ChainPos;
use crate::policy::EvictionPolicy;
use crate::record::{record_len, PAGE};

/// One index entry: where a block lives.
#[derive(Debug)]
pub(crate) struct Entry {
    pub len: u64,
    /// xxh3-64 of the payload, checked on every DRAM read (three times faster than
    /// crc32c here); `None` until a DRAM copy exists (a block recovered from NVMe
    /// gets it when read back, after its record's crc32c was checked).
    pub sum: Option<u64>,
    /// The chunk this one is chained from, where the writer said (`put_many`).
    pub parent: Option<BlockKey>,
    /// Bumped by every `put` of the key, so background work on an old copy is dropped.
    pub version: u64,
    pub dram: Option<Arc<Slot>>,
    /// The DRAM copy leaves once the write-back under way lands.
    pub evicting: bool,
    /// A write-back job for this version is queued.
    pub wb_queued: bool,
    pub nvme: Option<NvmeLoc>,
    /// Explicit pins ([`crate::Store::pin`], [`crate::Prefix`]); handles pin by
    /// holding the slot.
    pub pins: u32,
}

impl Entry {
    /// DRAM copy present and nothing holds it but the index. A pinned block's DRAM copy
    /// may go only where an NVMe tier keeps the block (`spill`): a pin keeps the block
    /// in the store, a handle keeps it in DRAM.
    pub(crate) fn dram_evictable(&self, spill: bool) -> bool {
        (self.pins == 0 || spill)
            && !self.evicting
            && self
                .dram
                .as_ref()
                .is_some_and(|s| Arc::strong_count(s) == 1)
    }
}

pub(crate) type Shard = RwLock<HashMap<BlockKey, Entry>>;

pub(crate) struct Inner {
    pub opts: Options,
    pub hasher: ChunkHasher,
    pub arena: Arc<Arena>,
    /// Where a block's payload starts in its slot: after the record's header page
    /// with an NVMe tier (so the slot is written to NVMe as it is), at 0 without.
    pub payload_off: u64,
    pub shards: Box<[Shard]>,
    pub dram_policy: Mutex<Box<dyn EvictionPolicy>>,
    pub nvme: Option<Nvme>,
    pub version: AtomicU64,
    pub c: Counters,
}

/// Whether an allocation may wait for write-back to free DRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Up to `Options::evict_wait`, then `TimedOut`.
    Yes,
    /// Not at all: `None` when nothing can be evicted at once.
    No,
}

impl Inner {
    pub(crate) fn shard(&self, key: BlockKey) -> &Shard {
        &self.shards[key.shard(self.shards.len())]
    }

    /// Arena bytes a block of `len` bytes takes.
    pub(crate) fn slot_len(nvme: bool, len: u64) -> u64 {
        if nvme {
            record_len(len)
        } else {
            Arena::slot_size(len)
        }
    }

    /// Pins `key` if some tier holds it.
    pub(crate) fn try_pin(&self, key: BlockKey) -> bool {
        match self.shard(key).write().get_mut(&key) {
            Some(e) if e.pins < u32::MAX => {
                e.pins += 1;
                true
            }
            _ => false,
        }
    }

    /// `key` left the store: blocks chained from it can no longer be hit.
    pub(crate) fn lost(&self, key: BlockKey) {
        self.dram_policy.lock().prefix_lost(key);
        if let Some(nv) = &self.nvme {
            nv.policy.lock().prefix_lost(key);
        }
    }

    /// A handle on `key`'s DRAM copy after checking its checksum. A copy that fails is
    /// dropped and counted (the block stays where it has an NVMe copy); `None` then,
    /// as when there is no DRAM copy.
    pub(crate) fn dram_handle(&self, key: BlockKey) -> Option<BlockHandle> {
        let (h, sum) = {
            let sh = self.shard(key).read();
            let e = sh.get(&key)?;
            let slot = e.dram.clone()?;
            let h = BlockHandle {
                key,
                len: e.len,
                offset: slot.offset + self.payload_off,
                slot,
            };
            (h, e.sum)
        };
        if sum.is_some() && sum == checksum_at(h.slot.arena(), h.offset, h.len).ok() {
            return Some(h);
        }
        self.drop_corrupt_dram(key, &h.slot);
        None
    }

    /// Drops a DRAM copy (`slot`) that failed its checksum.
    pub(crate) fn drop_corrupt_dram(&self, key: BlockKey, slot: &Arc<Slot>) {
        tracing::warn!("kv-tier: block {key} failed its checksum in DRAM; dropped");
        self.c.corrupt_dram.fetch_add(1, Ordering::Relaxed);
        let gone = {
            let mut sh = self.shard(key).write();
            match sh.get_mut(&key) {
                Some(e) if e.dram.as_ref().is_some_and(|s| Arc::ptr_eq(s, slot)) => {
                    e.dram = None;
                    e.evicting = false;
                    if e.nvme.is_none() {
                        sh.remove(&key);
                        true
                    } else {
                        false
                    }
                }
                _ => false,
            }
        };
        self.dram_policy.lock().remove(key);
        if gone {
            self.lost(key);
        }
    }

    /// Copies `data` into a fresh slot and publishes it under `key` (chained from
    /// `parent`; `end`: the last block its writer stores of the sequence); returns the
    /// version and slot, or `None` when `wait` is `No` and DRAM has no room at once.
    pub(crate) fn insert(
        &self,
        key: BlockKey,
        data: &[u8],
        parent: Option<BlockKey>,
        end: bool,
        wait: Wait,
    ) -> Result<Option<(u64, Arc<Slot>)>> {
        let start = Instant::now();
        self.check_block(data)?;
        let Some(slot) = self.alloc_slot(self.slot_for(data), wait)? else {
            self.c.dropped_writes.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let version = self.publish(key, &slot, data, ChainPos { parent, end })?;
        self.c.put_ns.since(start);
        Ok(Some((version, slot)))
    }

    /// Refuses blocks the store cannot keep.
    pub(crate) fn check_block(&self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Err(Error::invalid_argument("a block of zero bytes"));
        }
        let len = data.len() as u64;
        if let Some(nv) = &self.nvme {
            if record_len(len) > nv.opts.segment_bytes {
                return Err(Error::invalid_argument(format!(
                    "a block of {len} bytes does not fit in an NVMe segment of {} bytes; raise segment_bytes",
                    nv.opts.segment_bytes
                )));
            }
        }
        Ok(())
    }

    /// Arena bytes for a block of `data`.
    pub(crate) fn slot_for(&self, data: &[u8]) -> u64 {
        Self::slot_len(self.nvme.is_some(), data.len() as u64)
    }

    /// Copies `data` into `slot` (allocated for it) and publishes it under `key` at
    /// `pos`; returns its version.
    pub(crate) fn publish(
        &self,
        key: BlockKey,
        slot: &Arc<Slot>,
        data: &[u8],
        pos: ChainPos,
    ) -> Result<u64> {
        self.arena.write(slot.offset + self.payload_off, data)?;
        let sum = Some(checksum(data));
        let version = self.version.fetch_add(1, Ordering::Relaxed);
        let (old, parent) = {
            let mut sh = self.shard(key).write();
            let (pins, old_parent) = sh.get(&key).map_or((0, None), |e| (e.pins, e.parent));
            let parent = pos.parent.or(old_parent);
            let old = sh.insert(
                key,
                Entry {
                    len: data.len() as u64,
                    sum,
                    parent,
                    version,
                    dram: Some(slot.clone()),
                    evicting: false,
                    wb_queued: false,
                    nvme: None,
                    pins,
                },
            );
            (old, parent)
        };
        self.dram_policy
            .lock()
            .insert_child(key, slot.size, ChainPos { parent, ..pos });
        if let Some(p) = parent {
            if !self.shard(p).read().contains_key(&p) {
                // Stored after its prefix left: it cannot be hit until that comes back.
                self.dram_policy.lock().prefix_lost(p);
            }
        }
        if let (
            Some(nv),
            Some(Entry {
                nvme: Some(loc), ..
            }),
        ) = (&self.nvme, old)
        {
            nv.policy.lock().remove(key);
            nv.mark_dead(loc);
        }
        Ok(version)
    }

    /// A slot of `bytes`, evicting from DRAM (and, with `Wait::Yes`, waiting for
    /// write-back) as needed. `None` only with `Wait::No`.
    pub(crate) fn alloc_slot(&self, bytes: u64, wait: Wait) -> Result<Option<Arc<Slot>>> {
        let deadline = Instant::now() + self.opts.evict_wait;
        // Without waiting: as many evictions as it takes to free one slot of any size
        // (slab pages serve one size each), then give up.
        let mut tries = 0;
        loop {
            if let Some(s) = self.arena.alloc(bytes)? {
                return Ok(Some(Arc::new(s)));
            }
            let wb_busy = self.nvme.as_ref().is_some_and(|nv| {
                self.c.wb_queue.load(Ordering::Relaxed) >= 2 * nv.opts.batch as u64
            });
            let evicted = !wb_busy && self.evict_one_dram();
            if wait == Wait::No {
                tries += 1;
                if !evicted || tries > 4096 {
                    return Ok(None);
                }
                continue;
            }
            if !evicted {
                if Instant::now() >= deadline {
                    return Err(Error::TimedOut {
                        what: format!(
                            "waiting for {bytes} bytes of DRAM (every block is pinned or being written back)"
                        ),
                        after: self.opts.evict_wait,
                    });
                }
                self.arena.wait_freed(Duration::from_millis(2));
            }
        }
    }

    /// Evicts one DRAM block (or queues its write-back); false when nothing can go.
    pub(crate) fn evict_one_dram(&self) -> bool {
        let spill = self.nvme.is_some();
        let victim = self.dram_policy.lock().evict(&mut |k| {
            self.shard(k)
                .read()
                .get(&k)
                .is_some_and(|e| e.dram_evictable(spill))
        });
        let Some(k) = victim else {
            return false;
        };
        let mut sh = self.shard(k).write();
        let Some(e) = sh.get_mut(&k) else {
            return true;
        };
        if !e.dram_evictable(spill) {
            // Pinned or handed out since the policy looked: keep it.
            let (size, parent) = (e.dram.as_ref().map_or(0, |s| s.size), e.parent);
            drop(sh);
            if size > 0 {
                self.dram_policy
                    .lock()
                    .insert_child(k, size, ChainPos { parent, end: false });
            }
            return true;
        }
        match &self.nvme {
            Some(nv) if e.nvme.is_none() => {
                e.evicting = true;
                if let (false, Some(slot)) = (e.wb_queued, e.dram.clone()) {
                    e.wb_queued = true;
                    let item = nvme::Item {
                        key: k,
                        version: e.version,
                        len: e.len,
                        slot,
                    };
                    drop(sh);
                    self.c.wb_queue.fetch_add(1, Ordering::Relaxed);
                    if nv.send(Job::WriteBack(item)).is_err() {
                        self.c.wb_queue.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                e.dram = None;
                let gone = e.nvme.is_none();
                if gone {
                    sh.remove(&k);
                }
                drop(sh);
                self.c.dram_evictions.fetch_add(1, Ordering::Relaxed);
                if gone {
                    self.lost(k);
                }
            }
        }
        true
    }
}

/// The checksum of a DRAM copy.
pub(crate) fn checksum(payload: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(payload)
}

/// [`checksum`] of `offset..offset+len` of the arena, computed over copies
/// ([`Arena::digest`]), never over a reference into memory a peer might write.
pub(crate) fn checksum_at(arena: &Arena, offset: u64, len: u64) -> Result<u64> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    arena.digest(offset, len, |c| h.update(c))?;
    Ok(h.digest())
}

/// The payload offset of a store with (`true`) or without an NVMe tier.
pub(crate) fn payload_off(nvme: bool) -> u64 {
    if nvme {
        PAGE
    } else {
        0
    }
}
