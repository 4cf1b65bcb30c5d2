//! The store: a sharded index over the DRAM and NVMe tiers.

mod batch;
mod handle;
mod inner;
mod stats;
#[cfg(test)]
mod tests;

pub use handle::{BlockHandle, Prefix};
pub(crate) use inner::{checksum, Entry, Inner, Wait};
use inner::{Counters, Shard};
pub use stats::{Latency, Stats};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam::channel::{bounded, unbounded};
use kv_core::{Error, Result};
use kv_mem::{HostBuffer, Region};
use parking_lot::{Mutex, RwLock};

use crate::arena::Arena;
use crate::key::{BlockKey, ChunkHasher};
use crate::nvme::{self, Job, Nvme, PfJob};
use crate::options::Options;

/// The KV block store. `Send + Sync`: the index is sharded behind `RwLock`s (lookups
/// take one shard's read lock), each tier's policy sits behind its own mutex, and the
/// NVMe tier's appends belong to one write-back thread.
///
/// Dropping the store flushes: blocks not yet on NVMe are written and synced, waiting
/// at most `Options::flush_on_drop` (blocks still unwritten then are lost, with a
/// warning); then its threads stop. Without an NVMe tier there is nothing to keep.
pub struct Store {
    pub(crate) inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dram_capacity", &self.inner.arena.capacity())
            .field("nvme", &self.inner.nvme.is_some())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens a store: allocates the DRAM arena and, with an NVMe tier, recovers its
    /// index from the segment files in `nvme.dir` and starts the write-back and
    /// prefetch threads.
    pub fn open(opts: Options) -> Result<Store> {
        if opts.chunk_tokens == 0 {
            return Err(Error::invalid_argument("chunk_tokens must be at least 1"));
        }
        let Some(compat) = opts.compat else {
            return Err(Error::invalid_argument(
                "Options::compat (the model identity) is required: use Options::for_model(\"model/dtype/layout/tp\") or set compat to ChunkHasher::compat_of(...)",
            ));
        };
        let arena = Arena::new(opts.dram_capacity, opts.slab_page_bytes, opts.host)?;
        let nshards = opts.shards.clamp(1, 1 << 16).next_power_of_two();
        let shards: Box<[Shard]> = (0..nshards).map(|_| RwLock::default()).collect();
        let dram_policy = Mutex::new(opts.dram_policy.build(arena.capacity()));
        let hasher = ChunkHasher::new(opts.chunk_tokens, compat);
        let (wb_tx, wb_rx) = unbounded();
        let (pf_tx, pf_rx) = unbounded();
        let nvme = match &opts.nvme {
            Some(n) => Some(Nvme::open(n.clone(), arena.clone(), wb_tx, pf_tx)?),
            None => None,
        };
        let inner = Arc::new(Inner {
            payload_off: inner::payload_off(nvme.is_some()),
            opts,
            hasher,
            arena,
            shards,
            dram_policy,
            nvme,
            version: AtomicU64::new(1),
            c: Counters::default(),
        });
        let mut threads = Vec::new();
        if inner.nvme.is_some() {
            inner.recover()?;
            let i = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("kv-tier-writeback".into())
                    .spawn(move || nvme::writeback_loop(i, wb_rx))
                    .map_err(|e| Error::io("spawning the write-back thread", e))?,
            );
            let i = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("kv-tier-prefetch".into())
                    .spawn(move || nvme::prefetch_loop(i, pf_rx))
                    .map_err(|e| Error::io("spawning the prefetch thread", e))?,
            );
        }
        Ok(Store { inner, threads })
    }

    /// Arena bytes one block of `len` bytes takes in DRAM (`nvme`: in a store with an
    /// NVMe tier, where a slot also carries the record's header page).
    pub fn dram_slot_bytes(nvme: bool, len: u64) -> u64 {
        Inner::slot_len(nvme, len)
    }

    /// The DRAM arena, for an agent to register: block handles' descriptors lie in it.
    /// Register it read-only (`kv_agent::RegisterOptions { access: Access::ReadOnly, .. }`):
    /// transfers then only read it (a WRITE to a peer, a peer's READ), which is what
    /// [`BlockHandle::as_slice`]'s safety contract asks — the store owns its contents.
    pub fn arena(&self) -> &Region<HostBuffer> {
        self.inner.arena.region()
    }

    /// The chunk hasher (chunk size and compatibility hash) of this store.
    pub fn hasher(&self) -> ChunkHasher {
        self.inner.hasher
    }

    /// Keys of the full chunks of `tokens`, in order.
    pub fn chunk_keys(&self, tokens: &[u32]) -> Vec<BlockKey> {
        self.inner.hasher.keys(tokens)
    }

    /// Stores `data` under `key` in DRAM (replacing any earlier block of that key). It
    /// reaches NVMe when evicted from DRAM or on [`Store::flush`].
    /// Waits (up to `Options::evict_wait`) for write-back when DRAM is full of blocks
    /// not yet on NVMe; [`Store::put_many`] never waits.
    pub fn put(&self, key: BlockKey, data: &[u8]) -> Result<()> {
        self.inner
            .insert(key, data, None, true, Wait::Yes)
            .map(|_| ())
    }

    /// Stores `len` bytes of `region` from `offset` (e.g. a staging buffer a transfer
    /// just filled) under `key`.
    ///
    /// # Safety
    ///
    /// Nothing writes `offset..offset + len` of `region` during the call (the transfer
    /// that filled it has completed); see [`kv_mem::Region::bytes`].
    #[allow(unsafe_code)]
    pub unsafe fn put_region(
        &self,
        key: BlockKey,
        region: &Region<HostBuffer>,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        region.slice(offset, len)?;
        // SAFETY: the caller promises no writer (above).
        let src = unsafe { region.bytes(offset, len)? };
        self.put(key, src)
    }

    /// Stores `data` and returns only once it is on NVMe and synced: it survives a crash
    /// (`kill -9`, power loss where the device honours flushes). Needs an NVMe tier.
    pub fn put_durable(&self, key: BlockKey, data: &[u8]) -> Result<()> {
        let nv = self.inner.nvme.as_ref().ok_or_else(|| {
            Error::Unsupported("put_durable needs an NVMe tier (Options::nvme)".into())
        })?;
        let (version, slot) = self
            .inner
            .insert(key, data, None, true, Wait::Yes)?
            .ok_or_else(|| Error::Busy("no DRAM for the block".into()))?;
        let (tx, rx) = bounded(1);
        self.inner.c.wb_queue.fetch_add(1, Ordering::Relaxed);
        nv.send(Job::Durable {
            item: nvme::Item {
                key,
                version,
                len: data.len() as u64,
                slot,
            },
            ack: tx,
        })?;
        rx.recv()
            .map_err(|_| Error::Busy("the write-back thread stopped".into()))?
    }

    /// Writes every block not yet on NVMe and syncs the segment files; everything `put`
    /// before the call survives a crash once it returns. Without an NVMe tier, `Ok`.
    pub fn flush(&self) -> Result<()> {
        let Some(nv) = self.inner.nvme.as_ref() else {
            return Ok(());
        };
        let (tx, rx) = bounded(1);
        nv.send(Job::Flush(tx))?;
        rx.recv()
            .map_err(|_| Error::Busy("the write-back thread stopped".into()))?
    }

    /// The block, pinned in DRAM while the handle lives; reads it from NVMe first if it
    /// is only there. `None` when no tier has it (or its NVMe copy was corrupt).
    pub fn get(&self, key: BlockKey) -> Result<Option<BlockHandle>> {
        let start = Instant::now();
        let r = self.get_inner(key);
        self.inner.c.get_ns.since(start);
        r
    }

    fn get_inner(&self, key: BlockKey) -> Result<Option<BlockHandle>> {
        let i = &self.inner;
        if let Some(h) = i.dram_handle(key) {
            i.c.dram_hits.fetch_add(1, Ordering::Relaxed);
            i.dram_policy.lock().access(key);
            return Ok(Some(h));
        }
        let on_nvme = i
            .shard(key)
            .read()
            .get(&key)
            .is_some_and(|e| e.nvme.is_some());
        if on_nvme {
            i.promote(&[key])?;
            if let Some(h) = i.dram_handle(key) {
                i.c.nvme_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(h));
            }
        }
        i.c.misses.fetch_add(1, Ordering::Relaxed);
        Ok(None)
    }

    /// True when some tier holds `key`.
    pub fn contains(&self, key: BlockKey) -> bool {
        self.inner.shard(key).read().contains_key(&key)
    }

    /// How many leading tokens of `tokens` are stored: full chunks, in order, up to the
    /// first chunk no tier holds.
    pub fn lookup_prefix(&self, tokens: &[u32]) -> usize {
        let h = self.inner.hasher;
        let mut parent = None;
        let mut hit = 0;
        let mut buf = Vec::new();
        for c in tokens.chunks_exact(h.chunk_tokens) {
            let k = h.chunk_key_with(parent, c, &mut buf);
            if !self.contains(k) {
                break;
            }
            hit += c.len();
            parent = Some(k);
        }
        hit
    }

    /// The longest stored prefix of `tokens`, pinned: the keys of its full chunks up to
    /// the first one no tier holds, each checked and pinned in one step under its index
    /// lock, so nothing (our own write-back included) evicts them before the caller
    /// reads them. Dropping the [`Prefix`] unpins.
    pub fn lookup(&self, tokens: &[u32]) -> Prefix {
        let h = self.inner.hasher;
        let mut keys = Vec::new();
        let mut parent = None;
        let mut buf = Vec::new();
        for c in tokens.chunks_exact(h.chunk_tokens) {
            let k = h.chunk_key_with(parent, c, &mut buf);
            if !self.inner.try_pin(k) {
                break;
            }
            keys.push(k);
            parent = Some(k);
        }
        self.prefix(keys)
    }

    /// [`Store::lookup`] for keys already computed (with [`Store::chunk_keys`]): the
    /// leading stored run of `keys`, pinned.
    pub fn lookup_keys(&self, keys: &[BlockKey]) -> Prefix {
        let n = keys.iter().take_while(|k| self.inner.try_pin(**k)).count();
        self.prefix(keys[..n].to_vec())
    }

    fn prefix(&self, keys: Vec<BlockKey>) -> Prefix {
        Prefix {
            inner: self.inner.clone(),
            keys,
            chunk_tokens: self.inner.hasher.chunk_tokens,
        }
    }

    /// Starts bringing `keys` that are only on NVMe into DRAM in the background.
    pub fn prefetch(&self, keys: &[BlockKey]) -> Result<()> {
        match &self.inner.nvme {
            Some(nv) => nv.send_prefetch(PfJob::Keys(keys.to_vec())),
            None => Ok(()),
        }
    }

    /// Brings `keys` that are only on NVMe into DRAM now, `batch` reads at a time;
    /// returns how many were brought in.
    pub fn fetch(&self, keys: &[BlockKey]) -> Result<usize> {
        self.inner.promote(keys)
    }

    /// Drops the DRAM copy of `key` if it is clean (also on NVMe) and unpinned; true when
    /// dropped.
    pub fn evict_from_dram(&self, key: BlockKey) -> bool {
        let i = &self.inner;
        let dropped = {
            let mut sh = i.shard(key).write();
            match sh.get_mut(&key) {
                Some(e) if e.nvme.is_some() && e.dram_evictable(true) => {
                    e.dram = None;
                    true
                }
                _ => false,
            }
        };
        if dropped {
            i.dram_policy.lock().remove(key);
        }
        dropped
    }

    /// Pins `key`: the store keeps it (in DRAM, or on NVMe where there is an NVMe tier)
    /// until as many `unpin`s. False when absent.
    pub fn pin(&self, key: BlockKey) -> bool {
        match self.inner.shard(key).write().get_mut(&key) {
            Some(e) => {
                e.pins += 1;
                true
            }
            None => false,
        }
    }

    /// Undoes one `pin`. False when absent or not pinned.
    pub fn unpin(&self, key: BlockKey) -> bool {
        match self.inner.shard(key).write().get_mut(&key) {
            Some(e) if e.pins > 0 => {
                e.pins -= 1;
                true
            }
            _ => false,
        }
    }

    /// Removes `key` from every tier; false when absent. Pinned blocks are
    /// [`Error::Busy`]. Durable: with an NVMe tier it returns once a tombstone record
    /// is written and synced, so no earlier copy of the block comes back after a
    /// crash (an error means the block is gone from the store but its tombstone may
    /// not have reached the disk).
    pub fn remove(&self, key: BlockKey) -> Result<bool> {
        let i = &self.inner;
        let old = {
            let mut sh = i.shard(key).write();
            match sh.get(&key) {
                None => return Ok(false),
                Some(e) if e.pins > 0 => {
                    return Err(Error::Busy(format!("block {key} is pinned")));
                }
                Some(_) => sh.remove(&key),
            }
        };
        i.dram_policy.lock().remove(key);
        if let (Some(nv), Some(e)) = (&i.nvme, old) {
            if let Some(loc) = e.nvme {
                nv.policy.lock().remove(key);
                nv.mark_dead(loc);
            }
        }
        i.lost(key);
        if let Some(nv) = &i.nvme {
            let (tx, rx) = bounded(1);
            nv.send(Job::Tombstone { key, ack: tx })?;
            rx.recv()
                .map_err(|_| Error::Busy("the write-back thread stopped".into()))??;
        }
        Ok(true)
    }

    /// Counters and sizes (walks the index: O(blocks)).
    pub fn stats(&self) -> Stats {
        let i = &self.inner;
        let (mut dram_blocks, mut nvme_blocks) = (0, 0);
        for s in i.shards.iter() {
            for e in s.read().values() {
                dram_blocks += u64::from(e.dram.is_some());
                nvme_blocks += u64::from(e.nvme.is_some());
            }
        }
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (nvme_bytes, nvme_file_bytes, segments, nvme_capacity) = match &i.nvme {
            Some(nv) => {
                let g = nv.segs.lock();
                let files: u64 = g.map.values().map(|s| s.file_len).sum();
                (g.live, files, g.map.len() as u64, nv.opts.capacity)
            }
            None => (0, 0, 0, 0),
        };
        Stats {
            dram_hits: ld(&i.c.dram_hits),
            nvme_hits: ld(&i.c.nvme_hits),
            misses: ld(&i.c.misses),
            dram_blocks,
            dram_bytes: i.arena.used(),
            dram_capacity: i.arena.capacity(),
            dram_quarantined: i.arena.quarantined(),
            nvme_blocks,
            nvme_bytes,
            nvme_file_bytes,
            nvme_capacity,
            dram_evictions: ld(&i.c.dram_evictions),
            nvme_evictions: ld(&i.c.nvme_evictions),
            write_backs: ld(&i.c.write_backs),
            write_back_failures: ld(&i.c.write_back_failures),
            write_back_queue: ld(&i.c.wb_queue),
            dropped_writes: ld(&i.c.dropped_writes),
            prefetched: ld(&i.c.prefetched),
            corrupt_dram: ld(&i.c.corrupt_dram),
            corrupt_records: ld(&i.c.corrupt),
            compactions: ld(&i.c.compactions),
            segments,
            dram_policy: i.dram_policy.lock().sizes(),
            nvme_policy: i
                .nvme
                .as_ref()
                .map_or_else(Default::default, |nv| nv.policy.lock().sizes()),
            get_latency: i.c.get_ns.summary(),
            put_latency: i.c.put_ns.summary(),
            nvme_read_latency: i.c.nvme_read_ns.summary(),
        }
    }

    /// The NVMe tier's I/O engine in words (`None` without an NVMe tier).
    pub fn nvme_engine(&self) -> Option<String> {
        self.inner.nvme.as_ref().map(|n| n.io.describe())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let (Some(nv), Some(limit)) = (&self.inner.nvme, self.inner.opts.flush_on_drop) {
            let (tx, rx) = bounded(1);
            if nv.send(Job::Flush(tx)).is_ok() {
                match rx.recv_timeout(limit) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("kv-tier: flush on drop failed: {e}"),
                    Err(_) => tracing::warn!("kv-tier: flush on drop took over {limit:?}; blocks not yet on NVMe are lost"),
                }
            }
        }
        if let Some(nv) = &self.inner.nvme {
            let _ = nv.send(Job::Shutdown);
            let _ = nv.send_prefetch(PfJob::Shutdown);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
