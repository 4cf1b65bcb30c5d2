//! Reading NVMe records back into DRAM (promotion, prefetch).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam::channel::Receiver;
use kv_core::{Error, Op, Result};

use super::{NvmeLoc, PfJob};
use crate::key::BlockKey;
use crate::policy::ChainPos;
use crate::record::decode_record;
use crate::record::PAGE;
use crate::store::{checksum, Inner, Wait};

/// The prefetch thread.
pub(crate) fn prefetch_loop(inner: Arc<Inner>, rx: Receiver<PfJob>) {
    loop {
        let r = match rx.recv() {
            Ok(PfJob::Keys(keys)) => inner.promote(&keys).map(|_| ()),
            Ok(PfJob::Chain { keys, max_bytes }) => inner.prefetch_chain(&keys, max_bytes),
            Ok(PfJob::Shutdown) | Err(_) => return,
        };
        if let Err(e) = r {
            tracing::warn!("kv-tier prefetch: {e}");
        }
    }
}

/// A block to read from NVMe for `get_many`: index into the caller's buffers, key,
/// payload length, where its record is.
pub(crate) type ReadItem = (usize, BlockKey, u64, NvmeLoc);

impl Inner {
    /// Reads the NVMe-only blocks among `keys` into DRAM, `batch` at a time; returns how
    /// many were brought in.
    pub(crate) fn promote(&self, keys: &[BlockKey]) -> Result<usize> {
        let Some(nv) = self.nvme.as_ref() else {
            return Ok(0);
        };
        let mut want = Vec::new();
        for &k in keys {
            if let Some(e) = self.shard(k).read().get(&k) {
                if let (None, Some(loc)) = (&e.dram, e.nvme) {
                    want.push((k, e.len, e.version, loc, e.parent));
                }
            }
        }
        let mut brought = 0;
        for chunk in want.chunks(nv.opts.batch.max(1)) {
            let mut plan = Vec::new();
            let mut pairs = Vec::new();
            for &(k, len, version, loc, parent) in chunk {
                let reg = {
                    let g = nv.segs.lock();
                    g.map.get(&loc.seg).map(|s| s.reg.clone())
                };
                let Some(reg) = reg else {
                    continue;
                };
                let slot = self
                    .alloc_slot(loc.rec, Wait::Yes)?
                    .ok_or_else(|| Error::Busy("no DRAM to read a block into".into()))?;
                pairs.push((
                    nv.io.arena_range(slot.offset, loc.rec),
                    reg.range(loc.offset, loc.rec),
                ));
                plan.push((k, len, version, loc, parent, slot, reg));
            }
            let start = std::time::Instant::now();
            nv.io.transfer(Op::Read, &pairs)?;
            self.c.nvme_read_ns.since(start);
            for (k, len, version, loc, parent, slot, _reg) in plan {
                // A copy, not a reference into the arena (see `Arena::digest`).
                let mut bytes = vec![0u8; loc.rec as usize];
                self.arena.read(slot.offset, &mut bytes)?;
                let ok = decode_record(&bytes).is_ok_and(|(h, _)| {
                    h.key == k
                        && h.len == len
                        && h.seq == loc.seq
                        && h.segment == loc.seg
                        && h.offset == loc.offset
                });
                if !ok {
                    tracing::warn!("kv-tier: block {k} failed its checksum on NVMe; dropped");
                    self.c.corrupt.fetch_add(1, Ordering::Relaxed);
                    self.drop_nvme_copy(k, loc, true);
                    continue;
                }
                let size = slot.size;
                let sum = checksum(&bytes[PAGE as usize..(PAGE + len) as usize]);
                let installed = {
                    let mut sh = self.shard(k).write();
                    match sh.get_mut(&k) {
                        // Cleaning may have moved the record while we waited for a
                        // slot: a moved record keeps its sequence number and bytes.
                        Some(e)
                            if e.version == version
                                && e.nvme.is_some_and(|l| l.seq == loc.seq)
                                && e.dram.is_none() =>
                        {
                            e.dram = Some(slot);
                            e.sum = Some(sum);
                            true
                        }
                        _ => false,
                    }
                };
                if installed {
                    brought += 1;
                    self.c.prefetched.fetch_add(1, Ordering::Relaxed);
                    self.dram_policy
                        .lock()
                        .insert_child(k, size, ChainPos { parent, end: false });
                    nv.policy.lock().access(k);
                }
            }
        }
        Ok(brought)
    }

    /// Promotes the NVMe-only blocks of a prefix chain in order, with at most
    /// `max_bytes` of records being read at once; stops at the first key no tier holds
    /// (nothing after it can be hit).
    pub(crate) fn prefetch_chain(&self, keys: &[BlockKey], max_bytes: u64) -> Result<()> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for &k in keys {
            let rec = match self.shard(k).read().get(&k) {
                None => break,
                Some(e) if e.dram.is_some() => continue,
                Some(e) => e.nvme.map_or(0, |l| l.rec),
            };
            if !batch.is_empty() && bytes + rec > max_bytes {
                self.promote(&batch)?;
                batch.clear();
                bytes = 0;
            }
            batch.push(k);
            bytes += rec;
        }
        if !batch.is_empty() {
            self.promote(&batch)?;
        }
        Ok(())
    }

    /// Reads `items` from NVMe straight into the caller's buffers `out[i]` (through a
    /// registered bounce buffer: no DRAM slot is taken and nothing is evicted), checking
    /// every record; true per item read intact. A record that fails its checks is
    /// dropped and counted.
    pub(crate) fn read_nvme(&self, items: &[ReadItem], out: &mut [&mut [u8]]) -> Result<Vec<bool>> {
        let Some(nv) = self.nvme.as_ref() else {
            return Ok(vec![false; items.len()]);
        };
        let total: u64 = items.iter().map(|(_, _, _, l)| l.rec).sum();
        let mut cached = nv.bounce.try_lock();
        let mut own = None;
        let bounce = match cached.as_deref_mut() {
            Some(slot) => {
                if slot.as_ref().is_none_or(|b| (b.buf.len() as u64) < total) {
                    *slot = Some(nv.io.bounce(total as usize)?);
                }
                slot.as_mut()
            }
            None => {
                own = Some(nv.io.bounce(total as usize)?);
                own.as_mut()
            }
        }
        .ok_or_else(|| Error::Busy("no bounce buffer".into()))?;
        let base = bounce.buf.descriptor().addr;
        let mut pairs = Vec::new();
        let mut placed = Vec::new();
        let mut off = 0;
        for &(i, k, len, loc) in items {
            let reg = nv.segs.lock().map.get(&loc.seg).map(|s| s.reg.clone());
            if let Some(reg) = reg {
                pairs.push((
                    kv_core::Descriptor::new(base + off, loc.rec, 0),
                    reg.range(loc.offset, loc.rec),
                ));
                placed.push(Some((off, reg)));
            } else {
                placed.push(None);
            }
            let _ = (i, k, len);
            off += loc.rec;
        }
        let start = std::time::Instant::now();
        nv.io.transfer(Op::Read, &pairs)?;
        self.c.nvme_read_ns.since(start);
        let bytes = bounce.buf.as_slice();
        let mut ok = Vec::with_capacity(items.len());
        for (&(i, k, len, loc), p) in items.iter().zip(&placed) {
            let Some((off, _)) = p else {
                ok.push(false);
                continue;
            };
            let rec = &bytes[*off as usize..(*off + loc.rec) as usize];
            let good = decode_record(rec).ok().filter(|(h, _)| {
                h.key == k
                    && h.len == len
                    && h.seq == loc.seq
                    && h.segment == loc.seg
                    && h.offset == loc.offset
            });
            match (good, out.get_mut(i)) {
                (Some((_, payload)), Some(dst)) if dst.len() == payload.len() => {
                    dst.copy_from_slice(payload);
                    ok.push(true);
                }
                (None, _) => {
                    tracing::warn!("kv-tier: block {k} failed its checksum on NVMe; dropped");
                    self.c.corrupt.fetch_add(1, Ordering::Relaxed);
                    self.drop_nvme_copy(k, loc, true);
                    ok.push(false);
                }
                _ => ok.push(false),
            }
        }
        drop(own);
        Ok(ok)
    }
}
