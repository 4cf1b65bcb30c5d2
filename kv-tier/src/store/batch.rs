//! The batched, engine-facing calls: `put_many`, `get_many` (LMCache's `batched_put`
//! and `batched_get`) and prefetch along a prefix chain.

use std::sync::atomic::Ordering;
use std::time::Instant;

use kv_core::{Error, Result};

use super::{Store, Wait};
use crate::key::BlockKey;
use crate::nvme::{PfJob, ReadItem};
use crate::policy::ChainPos;

impl Store {
    /// Stores `blocks` as the chunks `from..from + blocks.len()` of `chain` (the keys
    /// of one token sequence, from [`Store::chunk_keys`]): each is recorded as chained
    /// from the chunk before it, which the default eviction policy uses. Never waits:
    /// when DRAM has no room at once (everything pinned, or waiting for write-back)
    /// the blocks that do not fit are dropped from the end of the run and counted in
    /// [`crate::Stats::dropped_writes`] (a block stored without its prefix could never
    /// be hit). Returns how many were stored (the first ones).
    pub fn put_many(&self, chain: &[BlockKey], from: usize, blocks: &[&[u8]]) -> Result<usize> {
        from.checked_add(blocks.len())
            .filter(|e| *e <= chain.len())
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "put_many of {} blocks from chunk {from} of a chain of {}",
                    blocks.len(),
                    chain.len()
                ))
            })?;
        let start = Instant::now();
        for data in blocks {
            self.inner.check_block(data)?;
        }
        // Room for the whole run first, then publish: evictions made for the run can
        // never take its own first blocks (a chain cut at its start is lost whole).
        let mut slots = Vec::with_capacity(blocks.len());
        for data in blocks {
            match self.inner.alloc_slot(self.inner.slot_for(data), Wait::No)? {
                Some(s) => slots.push(s),
                None => break,
            }
        }
        let stored = slots.len();
        for (at, (slot, data)) in (from..).zip(slots.iter().zip(blocks)) {
            let pos = ChainPos {
                parent: at.checked_sub(1).map(|p| chain[p]),
                end: at + 1 == from + stored,
            };
            self.inner.publish(chain[at], slot, data, pos)?;
        }
        if stored > 0 {
            self.inner.c.put_ns.since(start);
        }
        self.inner
            .c
            .dropped_writes
            .fetch_add((blocks.len() - stored) as u64, Ordering::Relaxed);
        Ok(stored)
    }

    /// Copies the blocks of `keys` into `out` (`out[i]` must be exactly block `i`'s
    /// length), in order, up to the first block no tier holds (or whose copy fails its
    /// checksum); returns how many were copied. DRAM copies are read in place; blocks
    /// only on NVMe are read in batches straight into `out` through a bounce buffer, so
    /// a read never evicts anything or waits for write-back — only for its own I/O.
    /// Pass a [`crate::Prefix`]'s keys so that nothing is evicted before it is read.
    pub fn get_many(&self, keys: &[BlockKey], out: &mut [&mut [u8]]) -> Result<usize> {
        if out.len() < keys.len() {
            return Err(Error::invalid_argument(format!(
                "get_many of {} keys into {} buffers",
                keys.len(),
                out.len()
            )));
        }
        let i = &self.inner;
        let batch = i.nvme.as_ref().map_or(1, |nv| nv.opts.batch.max(1));
        let start = Instant::now();
        let (mut from_dram, mut from_nvme) = (Vec::new(), Vec::new());
        let mut n = 0;
        'chain: while n < keys.len() {
            if let Some(h) = i.dram_handle(keys[n]) {
                h.read_into(out[n])?;
                from_dram.push(keys[n]);
                n += 1;
                continue;
            }
            // A run of blocks that are only on NVMe, read as one batch.
            let mut run: Vec<ReadItem> = Vec::new();
            while n + run.len() < keys.len() && run.len() < batch {
                let at = n + run.len();
                let k = keys[at];
                let item = i
                    .shard(k)
                    .read()
                    .get(&k)
                    .and_then(|e| match (&e.dram, e.nvme) {
                        (None, Some(loc)) => Some((at, k, e.len, loc)),
                        _ => None,
                    });
                match item {
                    Some(it) if out[at].len() as u64 == it.2 => run.push(it),
                    Some(it) => {
                        return Err(Error::invalid_argument(format!(
                            "get_many: buffer {at} has {} bytes, block {k} has {}",
                            out[at].len(),
                            it.2
                        )))
                    }
                    None => break,
                }
            }
            if run.is_empty() {
                break;
            }
            let ok = i.read_nvme(&run, out)?;
            for (it, good) in run.iter().zip(ok) {
                if !good {
                    break 'chain;
                }
                from_nvme.push(it.1);
                n += 1;
            }
        }
        i.c.get_ns.since(start);
        if n < keys.len() {
            i.c.misses.fetch_add(1, Ordering::Relaxed);
        }
        i.c.dram_hits
            .fetch_add(from_dram.len() as u64, Ordering::Relaxed);
        i.c.nvme_hits
            .fetch_add(from_nvme.len() as u64, Ordering::Relaxed);
        // Chain ends first, so that for recency policies a prefix stays more recent
        // than what is chained from it.
        let mut p = i.dram_policy.lock();
        for k in from_dram.iter().rev() {
            p.access(*k);
        }
        drop(p);
        if let (Some(nv), false) = (&i.nvme, from_nvme.is_empty()) {
            let mut p = nv.policy.lock();
            for k in from_nvme.iter().rev() {
                p.access(*k);
            }
        }
        Ok(n)
    }

    /// Starts bringing the blocks of a prefix chain that are only on NVMe into DRAM in
    /// the background, in chain order, with at most `max_bytes_in_flight` of records
    /// being read at once (at least one block); stops at the first key no tier holds.
    pub fn prefetch_chain(&self, keys: &[BlockKey], max_bytes_in_flight: u64) -> Result<()> {
        match &self.inner.nvme {
            Some(nv) => nv.send_prefetch(PfJob::Chain {
                keys: keys.to_vec(),
                max_bytes: max_bytes_in_flight,
            }),
            None => Ok(()),
        }
    }
}
