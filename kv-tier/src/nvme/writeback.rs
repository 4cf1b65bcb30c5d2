//! The write-back thread: appends evicted, flushed and durable blocks as records.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};
use kv_core::{Error, Op, Result};

use super::{Item, Job, NvmeLoc};
use crate::key::BlockKey;
use crate::policy::ChainPos;
use crate::record::{record_len, RecordHeader, FLAG_TOMBSTONE, PAGE};
use crate::store::Inner;

/// The write-back thread: batches jobs, writes them, syncs for durable puts and flushes.
pub(crate) fn writeback_loop(inner: Arc<Inner>, rx: Receiver<Job>) {
    let Some(nv) = inner.nvme.as_ref() else {
        return;
    };
    loop {
        let Ok(first) = rx.recv() else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < nv.opts.batch {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Items and tombstones are written in job order (runs of each), so a key put
        // again after its removal gets a newer record than its tombstone.
        let mut items = Vec::new();
        let mut results: Vec<Result<()>> = Vec::new();
        let mut tomb_keys = Vec::new();
        let mut acks: Vec<(usize, Sender<Result<()>>)> = Vec::new();
        let mut flushes = Vec::new();
        let mut shutdown = false;
        for j in jobs {
            match j {
                Job::WriteBack(it) => {
                    inner.c.wb_queue.fetch_sub(1, Ordering::Relaxed);
                    inner.write_tombstone_run(&mut tomb_keys, &mut results);
                    items.push(it);
                }
                Job::Durable { item, ack } => {
                    inner.c.wb_queue.fetch_sub(1, Ordering::Relaxed);
                    inner.write_tombstone_run(&mut tomb_keys, &mut results);
                    acks.push((results.len() + items.len(), ack));
                    items.push(item);
                }
                Job::Tombstone { key, ack } => {
                    results.extend(inner.write_items(std::mem::take(&mut items)));
                    acks.push((results.len() + tomb_keys.len(), ack));
                    tomb_keys.push(key);
                }
                Job::Flush(ack) => flushes.push(ack),
                Job::Shutdown => shutdown = true,
            }
        }
        results.extend(inner.write_items(items));
        inner.write_tombstone_run(&mut tomb_keys, &mut results);
        let flushed = if flushes.is_empty() {
            Ok(())
        } else {
            inner.flush_dirty()
        };
        let synced = if acks.is_empty() && flushes.is_empty() {
            Ok(())
        } else {
            nv.sync()
        };
        for (i, ack) in acks {
            let r = match (&results[i], &synced) {
                (Err(e), _) | (Ok(()), Err(e)) => Err(e.clone()),
                _ => Ok(()),
            };
            let _ = ack.send(r);
        }
        for ack in flushes {
            let r = match (&flushed, &synced) {
                (Err(e), _) | (Ok(()), Err(e)) => Err(e.clone()),
                _ => Ok(()),
            };
            let _ = ack.send(r);
        }
        inner.arena.wake();
        if shutdown {
            return;
        }
    }
}

impl Inner {
    /// Makes NVMe room for a record of `rec` bytes by evicting through the NVMe policy.
    pub(crate) fn nvme_make_room(&self, rec: u64) -> Result<()> {
        let nv = self.nv()?;
        loop {
            if nv.segs.lock().live + rec <= nv.budget {
                return Ok(());
            }
            if !self.nvme_evict_one() {
                return Err(Error::Busy("the NVMe tier is full of pinned blocks".into()));
            }
        }
    }

    pub(crate) fn nvme_evict_one(&self) -> bool {
        let Some(nv) = self.nvme.as_ref() else {
            return false;
        };
        let victim = nv.policy.lock().evict(&mut |k| {
            self.shard(k)
                .read()
                .get(&k)
                .is_some_and(|e| e.pins == 0 && e.nvme.is_some())
        });
        let Some(k) = victim else {
            return false;
        };
        let (loc, gone) = {
            let mut sh = self.shard(k).write();
            match sh.get_mut(&k) {
                Some(e) if e.pins == 0 => {
                    let l = e.nvme.take();
                    let gone = e.dram.is_none();
                    if gone {
                        sh.remove(&k);
                    }
                    (l, gone)
                }
                _ => (None, false),
            }
        };
        if let Some(l) = loc {
            nv.mark_dead(l);
            self.c.nvme_evictions.fetch_add(1, Ordering::Relaxed);
        }
        if gone {
            self.lost(k);
        }
        true
    }

    /// Writes every block that has no NVMe copy yet.
    pub(crate) fn flush_dirty(&self) -> Result<()> {
        let mut items = Vec::new();
        for s in self.shards.iter() {
            for (k, e) in s.read().iter() {
                if let (Some(slot), None) = (&e.dram, &e.nvme) {
                    items.push(Item {
                        key: *k,
                        version: e.version,
                        len: e.len,
                        slot: slot.clone(),
                    });
                }
            }
        }
        let batch = self.nv()?.opts.batch.max(1);
        let mut first_err = None;
        while !items.is_empty() {
            let rest = items.split_off(items.len().min(batch));
            for r in self.write_items(std::mem::replace(&mut items, rest)) {
                if let (Err(e), None) = (r, &first_err) {
                    first_err = Some(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Writes `items` as records (appends at the end of the log); one result per item.
    pub(crate) fn write_items(&self, items: Vec<Item>) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(items.len());
        let Some(nv) = self.nvme.as_ref() else {
            return items
                .iter()
                .map(|_| Err(Error::Unsupported("no NVMe tier".into())))
                .collect();
        };
        let mut pending: Vec<(usize, NvmeLoc)> = Vec::new();
        let mut pairs = Vec::new();
        for (i, it) in items.iter().enumerate() {
            results.push(Ok(()));
            let state = self
                .shard(it.key)
                .read()
                .get(&it.key)
                .map(|e| (e.version == it.version, e.nvme.is_some()));
            match state {
                Some((true, false)) => {}
                // Already written (by a flush or an earlier job), replaced or removed.
                _ => {
                    self.finish_item(it, None);
                    continue;
                }
            }
            let rec = record_len(it.len);
            let placed = self.nvme_make_room(rec).and_then(|()| {
                let seq = nv.seq.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = nv.reserve(it.key, rec, seq) {
                    return Ok(p);
                }
                // The active segment is full: write what is planned, then roll.
                self.submit(&items, &mut pending, &mut pairs, &mut results);
                self.roll()?;
                nv.reserve(it.key, rec, seq)
                    .ok_or_else(|| Error::Busy("no room in a fresh NVMe segment".into()))
            });
            let (loc, reg) = match placed {
                Ok(p) => p,
                Err(e) => {
                    results[i] = Err(e);
                    self.fail_item(it);
                    continue;
                }
            };
            let mut payload_crc = 0;
            let summed = self
                .arena
                .digest(it.slot.offset + self.payload_off, it.len, |c| {
                    payload_crc = crc32c::crc32c_append(payload_crc, c)
                });
            if let Err(e) = summed {
                nv.mark_dead(loc);
                results[i] = Err(e);
                self.fail_item(it);
                continue;
            }
            let h = RecordHeader {
                key: it.key,
                len: it.len,
                seq: loc.seq,
                segment: loc.seg,
                offset: loc.offset,
                payload_crc,
                flags: 0,
                guard: 0,
            };
            if let Err(e) = self.arena.write(it.slot.offset, &h.encode()) {
                nv.mark_dead(loc);
                results[i] = Err(e);
                self.fail_item(it);
                continue;
            }
            pairs.push((
                nv.io.arena_range(it.slot.offset, rec),
                reg.range(loc.offset, rec),
            ));
            pending.push((i, loc));
        }
        self.submit(&items, &mut pending, &mut pairs, &mut results);
        results
    }

    /// Posts the planned writes and publishes (or fails) each.
    pub(crate) fn submit(
        &self,
        items: &[Item],
        pending: &mut Vec<(usize, NvmeLoc)>,
        pairs: &mut Vec<(kv_core::Descriptor, kv_core::Descriptor)>,
        results: &mut [Result<()>],
    ) {
        let Some(nv) = self.nvme.as_ref() else {
            return;
        };
        if pending.is_empty() {
            return;
        }
        let r = nv.io.transfer(Op::Write, pairs);
        pairs.clear();
        for (i, loc) in pending.drain(..) {
            let it = &items[i];
            match &r {
                Ok(()) => self.finish_item(it, Some(loc)),
                Err(e) => {
                    nv.mark_dead(loc);
                    results[i] = Err(e.clone());
                    self.fail_item(it);
                }
            }
        }
    }

    /// Publishes a written record (or none) and lets an evicting DRAM copy go.
    pub(crate) fn finish_item(&self, it: &Item, written: Option<NvmeLoc>) {
        let Some(nv) = self.nvme.as_ref() else {
            return;
        };
        let mut installed = false;
        let mut dropped_dram = false;
        let mut parent = None;
        {
            let mut sh = self.shard(it.key).write();
            if let Some(e) = sh.get_mut(&it.key).filter(|e| e.version == it.version) {
                parent = e.parent;
                if let (Some(loc), None) = (written, e.nvme) {
                    e.nvme = Some(loc);
                    installed = true;
                }
                e.wb_queued = false;
                if e.evicting && e.nvme.is_some() {
                    e.evicting = false;
                    e.dram = None;
                    dropped_dram = true;
                }
            }
        }
        if let Some(loc) = written {
            if installed {
                nv.policy
                    .lock()
                    .insert_child(it.key, loc.rec, ChainPos { parent, end: false });
                self.c.write_backs.fetch_add(1, Ordering::Relaxed);
            } else {
                nv.mark_dead(loc);
            }
        }
        if dropped_dram {
            self.c.dram_evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A write-back that failed: an evicting DRAM copy is dropped anyway (it must free
    /// its slot) unless the block is pinned, which keeps it in DRAM; other copies stay
    /// dirty.
    pub(crate) fn fail_item(&self, it: &Item) {
        self.c.write_back_failures.fetch_add(1, Ordering::Relaxed);
        let (mut keep, mut gone) = (None, false);
        {
            let mut sh = self.shard(it.key).write();
            if let Some(e) = sh.get_mut(&it.key).filter(|e| e.version == it.version) {
                e.wb_queued = false;
                if e.evicting {
                    e.evicting = false;
                    if e.pins > 0 {
                        keep = e.dram.as_ref().map(|s| (s.size, e.parent));
                    } else {
                        e.dram = None;
                        gone = e.nvme.is_none();
                        if gone {
                            sh.remove(&it.key);
                        }
                        self.c.dram_evictions.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Some((size, parent)) = keep {
            self.dram_policy
                .lock()
                .insert_child(it.key, size, ChainPos { parent, end: false });
        }
        if gone {
            self.lost(it.key);
        }
    }

    /// Writes the tombstones of `keys` (if any), one result each appended to
    /// `results`, and empties `keys`.
    pub(crate) fn write_tombstone_run(
        &self,
        keys: &mut Vec<BlockKey>,
        results: &mut Vec<Result<()>>,
    ) {
        if keys.is_empty() {
            return;
        }
        let r = self.write_tombstones(keys);
        results.extend(keys.iter().map(|_| r.clone()));
        keys.clear();
    }

    /// Appends a tombstone page for each of `keys` (not synced).
    fn write_tombstones(&self, keys: &[BlockKey]) -> Result<()> {
        let nv = self.nv()?;
        let mut held = nv.tomb_bounce.lock();
        let need = keys.len() * PAGE as usize;
        if held.as_ref().is_none_or(|b| b.buf.len() < need) {
            *held = Some(nv.io.bounce(need)?);
        }
        let b = held
            .as_mut()
            .ok_or_else(|| Error::Busy("no tombstone buffer".into()))?;
        let base = b.buf.descriptor().addr;
        let mut pairs = Vec::new();
        for (i, &key) in keys.iter().enumerate() {
            self.nvme_make_room(PAGE)?;
            let seq = nv.seq.fetch_add(1, Ordering::Relaxed);
            let placed = match nv.reserve_tomb(key, seq, None) {
                Some(p) => p,
                None => {
                    // The active segment is full: write what is planned, then roll.
                    nv.io.transfer(Op::Write, &pairs)?;
                    pairs.clear();
                    self.roll()?;
                    nv.reserve_tomb(key, seq, None).ok_or_else(|| {
                        Error::Busy("no room for a tombstone in a fresh NVMe segment".into())
                    })?
                }
            };
            let (loc, reg, guard) = placed;
            let page = &mut b.buf.as_mut_slice()[i * PAGE as usize..(i + 1) * PAGE as usize];
            page.fill(0);
            RecordHeader {
                key,
                len: 0,
                seq,
                segment: loc.seg,
                offset: loc.offset,
                payload_crc: crc32c::crc32c(&[]),
                flags: FLAG_TOMBSTONE,
                guard,
            }
            .encode_into(page)?;
            pairs.push((
                kv_core::Descriptor::new(base + (i as u64) * PAGE, PAGE, 0),
                reg.range(loc.offset, PAGE),
            ));
        }
        nv.io.transfer(Op::Write, &pairs)
    }
}
