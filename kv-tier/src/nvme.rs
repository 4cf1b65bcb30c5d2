//! The NVMe tier: log-structured segment files, write-back, cleaning, recovery, reads.
//!
//! One write-back thread owns every append: it writes evicted (and flushed, and durable)
//! blocks as records at the end of the active segment straight from their arena slots,
//! in batches, through the gds backend. When the active segment is full a new one is
//! created; when that makes `capacity / segment_bytes` files, the segment with the
//! fewest live bytes is cleaned (its live records copied into the new one, the file
//! deleted). The NVMe policy keeps live bytes under `(files − 2) × segment_bytes`, so a
//! cleaned segment's live records always fit.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};
use kv_core::{Error, Op, Result};
use kv_mem::{HostBuffer, Region};
use parking_lot::Mutex;

use crate::arena::Slot;
use crate::io::{FileReg, GdsIo};
use crate::key::BlockKey;
use crate::options::NvmeOptions;
use crate::policy::EvictionPolicy;
use crate::record::{decode_record, record_len, scan_segment, RecordHeader, PAGE};
use crate::store::{Entry, Inner};

/// Where a block's record is. `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NvmeLoc {
    pub seg: u32,
    pub offset: u64,
    pub seq: u64,
    /// Record bytes on disk.
    pub rec: u64,
}

/// A block to write: the slot is held so its bytes stay put until written.
pub(crate) struct Item {
    pub key: BlockKey,
    pub version: u64,
    pub len: u64,
    pub slot: Arc<Slot>,
}

pub(crate) enum Job {
    WriteBack(Item),
    Durable { item: Item, ack: Sender<Result<()>> },
    Flush(Sender<Result<()>>),
    Shutdown,
}

pub(crate) enum PfJob {
    Keys(Vec<BlockKey>),
    Shutdown,
}

pub(crate) struct Seg {
    pub reg: Arc<FileReg>,
    pub file: Arc<File>,
    pub path: PathBuf,
    pub file_len: u64,
    pub write_off: u64,
    pub live: u64,
    pub records: Vec<(BlockKey, NvmeLoc)>,
    pub unsynced: bool,
}

#[derive(Default)]
pub(crate) struct Segs {
    pub map: BTreeMap<u32, Seg>,
    pub active: Option<u32>,
    pub next_id: u32,
    /// Live record bytes over all segments.
    pub live: u64,
}

pub(crate) struct Nvme {
    pub opts: NvmeOptions,
    pub io: Arc<GdsIo>,
    pub segs: Mutex<Segs>,
    pub policy: Mutex<Box<dyn EvictionPolicy>>,
    seq: AtomicU64,
    wb_tx: Sender<Job>,
    pf_tx: Sender<PfJob>,
    max_segments: u64,
    budget: u64,
}

fn seg_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("seg-{id:010}.kvt"))
}

fn parse_seg_name(name: &str) -> Option<u32> {
    name.strip_prefix("seg-")?
        .strip_suffix(".kvt")?
        .parse()
        .ok()
}

impl Nvme {
    pub fn open(
        opts: NvmeOptions,
        arena: Region<HostBuffer>,
        wb_tx: Sender<Job>,
        pf_tx: Sender<PfJob>,
    ) -> Result<Nvme> {
        opts.check()?;
        std::fs::create_dir_all(&opts.dir)
            .map_err(|e| Error::io(format!("creating {}", opts.dir.display()), e))?;
        let io = Arc::new(GdsIo::new(opts.gds.clone(), arena, opts.io_timeout)?);
        let max_segments = opts.capacity / opts.segment_bytes;
        let budget = (max_segments - 2) * opts.segment_bytes;
        Ok(Nvme {
            policy: Mutex::new(opts.policy.build(budget)),
            opts,
            io,
            segs: Mutex::new(Segs::default()),
            seq: AtomicU64::new(1),
            wb_tx,
            pf_tx,
            max_segments,
            budget,
        })
    }

    pub fn send(&self, job: Job) -> Result<()> {
        self.wb_tx
            .send(job)
            .map_err(|_| Error::Busy("the write-back thread stopped".into()))
    }

    pub fn send_prefetch(&self, job: PfJob) -> Result<()> {
        self.pf_tx
            .send(job)
            .map_err(|_| Error::Busy("the prefetch thread stopped".into()))
    }

    /// A record no index entry points at any more.
    pub fn mark_dead(&self, loc: NvmeLoc) {
        let mut g = self.segs.lock();
        if let Some(s) = g.map.get_mut(&loc.seg) {
            s.live = s.live.saturating_sub(loc.rec);
            g.live = g.live.saturating_sub(loc.rec);
        }
    }

    /// Reserves `rec` bytes at the end of the active segment; `None` when it is full.
    fn reserve(&self, key: BlockKey, rec: u64, seq: u64) -> Option<(NvmeLoc, Arc<FileReg>)> {
        let mut g = self.segs.lock();
        let id = g.active?;
        let s = g.map.get_mut(&id)?;
        if s.write_off + rec > s.file_len {
            return None;
        }
        let loc = NvmeLoc {
            seg: id,
            offset: s.write_off,
            seq,
            rec,
        };
        s.write_off += rec;
        s.live += rec;
        s.unsynced = true;
        s.records.push((key, loc));
        let reg = s.reg.clone();
        g.live += rec;
        Some((loc, reg))
    }

    fn create_segment(&self, id: u32) -> Result<Seg> {
        let path = seg_path(&self.opts.dir, id);
        let (file, _direct) = kv_backend_gds::open_direct(&path, true)?;
        file.set_len(self.opts.segment_bytes)
            .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
        // The new name must survive a crash before records in it are acknowledged.
        if let Ok(d) = File::open(&self.opts.dir) {
            d.sync_all()
                .map_err(|e| Error::io(format!("syncing {}", self.opts.dir.display()), e))?;
        }
        let file = Arc::new(file);
        let reg = Arc::new(
            self.io
                .register_file(file.clone(), self.opts.segment_bytes)?,
        );
        Ok(Seg {
            reg,
            file,
            path,
            file_len: self.opts.segment_bytes,
            write_off: 0,
            live: 0,
            records: Vec::new(),
            unsynced: false,
        })
    }

    /// Syncs every segment written since the last sync.
    fn sync(&self) -> Result<()> {
        let files: Vec<(Arc<File>, PathBuf)> = {
            let mut g = self.segs.lock();
            g.map
                .values_mut()
                .filter(|s| s.unsynced)
                .map(|s| {
                    s.unsynced = false;
                    (s.file.clone(), s.path.clone())
                })
                .collect()
        };
        for (f, p) in files {
            f.sync_data()
                .map_err(|e| Error::io(format!("syncing {}", p.display()), e))?;
        }
        Ok(())
    }
}

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
        let mut items = Vec::new();
        let mut acks: Vec<(usize, Sender<Result<()>>)> = Vec::new();
        let mut flushes = Vec::new();
        let mut shutdown = false;
        for j in jobs {
            match j {
                Job::WriteBack(it) => {
                    inner.c.wb_queue.fetch_sub(1, Ordering::Relaxed);
                    items.push(it);
                }
                Job::Durable { item, ack } => {
                    inner.c.wb_queue.fetch_sub(1, Ordering::Relaxed);
                    acks.push((items.len(), ack));
                    items.push(item);
                }
                Job::Flush(ack) => flushes.push(ack),
                Job::Shutdown => shutdown = true,
            }
        }
        let results = inner.write_items(items);
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

/// The prefetch thread.
pub(crate) fn prefetch_loop(inner: Arc<Inner>, rx: Receiver<PfJob>) {
    while let Ok(PfJob::Keys(keys)) = rx.recv() {
        if let Err(e) = inner.promote(&keys) {
            tracing::warn!("kv-tier prefetch of {} block(s): {e}", keys.len());
        }
    }
}

impl Inner {
    fn nv(&self) -> Result<&Nvme> {
        self.nvme
            .as_ref()
            .ok_or_else(|| Error::Unsupported("this store has no NVMe tier".into()))
    }

    /// Recovers the NVMe index from the segment files.
    pub fn recover(&self) -> Result<()> {
        let nv = self.nv()?;
        let dir = &nv.opts.dir;
        let mut ids = Vec::new();
        let rd = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        for ent in rd.flatten() {
            if let Some(id) = ent.file_name().to_str().and_then(parse_seg_name) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut best: HashMap<BlockKey, RecordHeader> = HashMap::new();
        let mut segs = BTreeMap::new();
        for &id in &ids {
            let path = seg_path(dir, id);
            let bytes = std::fs::read(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let scan = scan_segment(id, &bytes, nv.opts.verify_on_open);
            if scan.corrupt_records > 0 || scan.skipped_pages > 0 {
                tracing::info!(
                    "kv-tier recovery: {}: {} record(s), {} corrupt, {} unreadable page(s) skipped",
                    path.display(),
                    scan.records.len(),
                    scan.corrupt_records,
                    scan.skipped_pages
                );
            }
            self.c
                .corrupt
                .fetch_add(scan.corrupt_records, Ordering::Relaxed);
            for h in &scan.records {
                let newer = best
                    .get(&h.key)
                    .is_none_or(|b| (h.seq, h.segment) > (b.seq, b.segment));
                if newer {
                    best.insert(h.key, *h);
                }
            }
            let file_len = bytes.len() as u64 / PAGE * PAGE;
            drop(bytes);
            let (file, _) = kv_backend_gds::open_direct(&path, false)?;
            let file = Arc::new(file);
            if file_len == 0 {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let reg = Arc::new(nv.io.register_file(file.clone(), file_len)?);
            segs.insert(
                id,
                Seg {
                    reg,
                    file,
                    path,
                    file_len,
                    write_off: file_len,
                    live: 0,
                    records: Vec::new(),
                    unsynced: false,
                },
            );
        }
        let mut winners: Vec<RecordHeader> = best.into_values().collect();
        winners.sort_unstable_by_key(|h| h.seq);
        let mut live = 0;
        let mut policy = nv.policy.lock();
        for h in &winners {
            let Some(s) = segs.get_mut(&h.segment) else {
                continue;
            };
            let loc = NvmeLoc {
                seg: h.segment,
                offset: h.offset,
                seq: h.seq,
                rec: h.record_len(),
            };
            s.live += loc.rec;
            s.records.push((h.key, loc));
            live += loc.rec;
            let version = self.version.fetch_add(1, Ordering::Relaxed);
            self.shard(h.key).write().insert(
                h.key,
                Entry {
                    len: h.len,
                    version,
                    dram: None,
                    evicting: false,
                    wb_queued: false,
                    nvme: Some(loc),
                    pins: 0,
                },
            );
            policy.insert(h.key, loc.rec);
        }
        drop(policy);
        let max_seq = winners.iter().map(|h| h.seq).max().unwrap_or(0);
        nv.seq.store(max_seq + 1, Ordering::Relaxed);
        let mut g = nv.segs.lock();
        g.next_id = ids.last().map_or(1, |m| m + 1);
        g.map = segs;
        g.live = live;
        g.active = None;
        Ok(())
    }

    /// Makes NVMe room for a record of `rec` bytes by evicting through the NVMe policy.
    fn nvme_make_room(&self, rec: u64) -> Result<()> {
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

    fn nvme_evict_one(&self) -> bool {
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
        let loc = {
            let mut sh = self.shard(k).write();
            match sh.get_mut(&k) {
                Some(e) if e.pins == 0 => {
                    let l = e.nvme.take();
                    if e.dram.is_none() {
                        sh.remove(&k);
                    }
                    l
                }
                _ => None,
            }
        };
        if let Some(l) = loc {
            nv.mark_dead(l);
            self.c.nvme_evictions.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Writes every block that has no NVMe copy yet.
    pub fn flush_dirty(&self) -> Result<()> {
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
    pub fn write_items(&self, items: Vec<Item>) -> Vec<Result<()>> {
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
            let payload = self.arena.bytes(it.slot.offset + PAGE, it.len);
            let h = RecordHeader {
                key: it.key,
                len: it.len,
                seq: loc.seq,
                segment: loc.seg,
                offset: loc.offset,
                payload_crc: crc32c::crc32c(payload),
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
    fn submit(
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
    fn finish_item(&self, it: &Item, written: Option<NvmeLoc>) {
        let Some(nv) = self.nvme.as_ref() else {
            return;
        };
        let mut installed = false;
        let mut dropped_dram = false;
        {
            let mut sh = self.shard(it.key).write();
            if let Some(e) = sh.get_mut(&it.key).filter(|e| e.version == it.version) {
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
                nv.policy.lock().insert(it.key, loc.rec);
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
    fn fail_item(&self, it: &Item) {
        self.c.write_back_failures.fetch_add(1, Ordering::Relaxed);
        let mut keep = None;
        {
            let mut sh = self.shard(it.key).write();
            if let Some(e) = sh.get_mut(&it.key).filter(|e| e.version == it.version) {
                e.wb_queued = false;
                if e.evicting {
                    e.evicting = false;
                    if e.pins > 0 {
                        keep = e.dram.as_ref().map(|s| s.size);
                    } else {
                        e.dram = None;
                        if e.nvme.is_none() {
                            sh.remove(&it.key);
                        }
                        self.c.dram_evictions.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Some(size) = keep {
            self.dram_policy.lock().insert(it.key, size);
        }
    }

    /// Opens a new active segment, cleaning old ones to keep the file count bounded.
    fn roll(&self) -> Result<()> {
        let nv = self.nv()?;
        if nv.segs.lock().map.len() as u64 >= nv.max_segments {
            // An earlier cleaning failed (pinned records): clean into what room the
            // active segment has left before adding a file.
            self.clean_one()?;
        }
        let id = {
            let mut g = nv.segs.lock();
            let id = g.next_id.max(1);
            g.next_id = id + 1;
            id
        };
        let seg = nv.create_segment(id)?;
        {
            let mut g = nv.segs.lock();
            g.map.insert(id, seg);
            g.active = Some(id);
        }
        // Up to `max_segments` files including the new one; clean down to one fewer so
        // the next roll has room.
        let mut guard = 0;
        while nv.segs.lock().map.len() as u64 > nv.max_segments - 1 && guard < 1024 {
            guard += 1;
            self.clean_one()?;
        }
        Ok(())
    }

    /// Copies the live records of the sealed segment with the fewest live bytes into
    /// the active segment and deletes its file.
    fn clean_one(&self) -> Result<()> {
        let nv = self.nv()?;
        let (victim, records, vreg) = {
            let g = nv.segs.lock();
            let Some((&id, s)) = g
                .map
                .iter()
                .filter(|(id, _)| Some(**id) != g.active)
                .min_by_key(|(_, s)| s.live)
            else {
                return Ok(());
            };
            (id, s.records.clone(), s.reg.clone())
        };
        let mut live: Vec<(BlockKey, NvmeLoc, bool)> = records
            .into_iter()
            .filter_map(|(k, loc)| {
                let sh = self.shard(k).read();
                let e = sh.get(&k).filter(|e| e.nvme == Some(loc))?;
                Some((k, loc, e.pins > 0))
            })
            .collect();
        // Pinned records are moved first: only unpinned ones may be dropped for room.
        live.sort_by_key(|(_, _, pinned)| !*pinned);
        let room = {
            let g = nv.segs.lock();
            g.active
                .and_then(|a| g.map.get(&a))
                .map_or(0, |s| s.file_len - s.write_off)
        };
        let pinned_bytes: u64 = live.iter().filter(|l| l.2).map(|l| l.1.rec).sum();
        if pinned_bytes > room {
            return Err(Error::Busy(format!(
                "NVMe segment {victim} holds {pinned_bytes} bytes of pinned blocks and the active segment has room for {room}"
            )));
        }
        let mut used = 0;
        let mut keep = Vec::new();
        for (k, loc, _) in live {
            if used + loc.rec <= room {
                used += loc.rec;
                keep.push((k, loc));
            } else {
                self.drop_nvme_copy(k, loc, false);
            }
        }
        if !keep.is_empty() && !self.move_records(nv, &vreg, keep)? {
            return Err(Error::Busy(format!(
                "NVMe segment {victim} keeps pinned blocks that could not be moved"
            )));
        }
        let removed = nv.segs.lock().map.remove(&victim);
        if let Some(s) = removed {
            {
                let mut g = nv.segs.lock();
                g.live = g.live.saturating_sub(s.live);
            }
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::warn!("kv-tier: removing {}: {e}", s.path.display());
            }
        }
        self.c.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// True while the index places `k`'s NVMe copy at `loc`.
    fn points_at(&self, k: BlockKey, loc: NvmeLoc) -> bool {
        self.shard(k)
            .read()
            .get(&k)
            .is_some_and(|e| e.nvme == Some(loc))
    }

    /// Drops the NVMe copy of `k` at `loc`; a pinned block keeps it unless `corrupt`
    /// (a record that failed its checks is never kept). True when dropped.
    pub(crate) fn drop_nvme_copy(&self, k: BlockKey, loc: NvmeLoc, corrupt: bool) -> bool {
        let Some(nv) = self.nvme.as_ref() else {
            return false;
        };
        let dropped = {
            let mut sh = self.shard(k).write();
            match sh.get_mut(&k) {
                Some(e) if e.nvme == Some(loc) && (corrupt || e.pins == 0) => {
                    e.nvme = None;
                    if e.dram.is_none() {
                        sh.remove(&k);
                    }
                    true
                }
                _ => false,
            }
        };
        if dropped {
            nv.policy.lock().remove(k);
            nv.mark_dead(loc);
            self.c.nvme_evictions.fetch_add(1, Ordering::Relaxed);
        }
        dropped
    }

    /// Reads `keep` from the victim into a bounce buffer and appends them to the active
    /// segment, then repoints the index. False when a pinned record stayed behind (the
    /// victim must then be kept).
    fn move_records(
        &self,
        nv: &Nvme,
        vreg: &Arc<FileReg>,
        keep: Vec<(BlockKey, NvmeLoc)>,
    ) -> Result<bool> {
        let mut all_moved = true;
        let total: u64 = keep.iter().map(|(_, l)| l.rec).sum();
        let mut bounce = nv.io.bounce(total as usize)?;
        let base = bounce.buf.descriptor().addr;
        let mut pairs = Vec::new();
        let mut off = 0;
        for (_, l) in &keep {
            pairs.push((
                kv_core::Descriptor::new(base + off, l.rec, 0),
                vreg.range(l.offset, l.rec),
            ));
            off += l.rec;
        }
        nv.io.transfer(Op::Read, &pairs)?;
        let mut writes = Vec::new();
        let mut moved = Vec::new();
        let mut off = 0u64;
        for (k, old) in keep {
            let at = off as usize;
            off += old.rec;
            let rec_bytes = &mut bounce.buf.as_mut_slice()[at..at + old.rec as usize];
            let ok = decode_record(rec_bytes).is_ok_and(|(h, _)| {
                h.key == k && h.seq == old.seq && h.segment == old.seg && h.offset == old.offset
            });
            if !ok {
                self.c.corrupt.fetch_add(1, Ordering::Relaxed);
                self.drop_nvme_copy(k, old, true);
                continue;
            }
            let Some((new, reg)) = nv.reserve(k, old.rec, old.seq) else {
                if !self.drop_nvme_copy(k, old, false) && self.points_at(k, old) {
                    all_moved = false; // pinned: it stays where it is
                }
                continue;
            };
            let Ok(mut h) = crate::record::decode_header(rec_bytes) else {
                continue;
            };
            h.segment = new.seg;
            h.offset = new.offset;
            h.encode_into(rec_bytes)?;
            writes.push((
                kv_core::Descriptor::new(base + at as u64, old.rec, 0),
                reg.range(new.offset, new.rec),
            ));
            moved.push((k, old, new));
        }
        if let Err(e) = nv.io.transfer(Op::Write, &writes) {
            for (_, _, new) in &moved {
                nv.mark_dead(*new);
            }
            return Err(e);
        }
        // The copies must be durable before the old file goes away.
        nv.sync()?;
        for (k, old, new) in moved {
            let repointed = {
                let mut sh = self.shard(k).write();
                match sh.get_mut(&k) {
                    Some(e) if e.nvme == Some(old) => {
                        e.nvme = Some(new);
                        true
                    }
                    _ => false,
                }
            };
            if !repointed {
                nv.mark_dead(new);
            }
        }
        drop(bounce);
        Ok(all_moved)
    }

    /// Reads the NVMe-only blocks among `keys` into DRAM, `batch` at a time; returns how
    /// many were brought in.
    pub fn promote(&self, keys: &[BlockKey]) -> Result<usize> {
        let Some(nv) = self.nvme.as_ref() else {
            return Ok(0);
        };
        let mut want = Vec::new();
        for &k in keys {
            if let Some(e) = self.shard(k).read().get(&k) {
                if let (None, Some(loc)) = (&e.dram, e.nvme) {
                    want.push((k, e.len, e.version, loc));
                }
            }
        }
        let mut brought = 0;
        for chunk in want.chunks(nv.opts.batch.max(1)) {
            let mut plan = Vec::new();
            let mut pairs = Vec::new();
            for &(k, len, version, loc) in chunk {
                let reg = {
                    let g = nv.segs.lock();
                    g.map.get(&loc.seg).map(|s| s.reg.clone())
                };
                let Some(reg) = reg else {
                    continue;
                };
                let slot = self.alloc_slot(loc.rec)?;
                pairs.push((
                    nv.io.arena_range(slot.offset, loc.rec),
                    reg.range(loc.offset, loc.rec),
                ));
                plan.push((k, len, version, loc, slot, reg));
            }
            nv.io.transfer(Op::Read, &pairs)?;
            for (k, len, version, loc, slot, _reg) in plan {
                let bytes = self.arena.bytes(slot.offset, loc.rec);
                let ok = decode_record(bytes).is_ok_and(|(h, _)| {
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
                            true
                        }
                        _ => false,
                    }
                };
                if installed {
                    brought += 1;
                    self.c.prefetched.fetch_add(1, Ordering::Relaxed);
                    self.dram_policy.lock().insert(k, size);
                    nv.policy.lock().access(k);
                }
            }
        }
        Ok(brought)
    }
}

#[cfg(test)]
mod tests {
    use crate::{BlockKey, NvmeOptions, Options, Store};

    /// Bug 3: cleaning dropped NVMe copies without looking at pins.
    #[test]
    fn dropping_for_room_keeps_pinned_copies() {
        let dir = std::env::temp_dir().join(format!("kv-tier-unit-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::open(Options {
            dram_capacity: 1 << 20,
            nvme: Some(NvmeOptions {
                capacity: 4 << 20,
                segment_bytes: 1 << 20,
                ..NvmeOptions::new(&dir)
            }),
            ..Options::for_model("test")
        })
        .unwrap();
        let (a, b) = (BlockKey::from_u64(1), BlockKey::from_u64(2));
        for k in [a, b] {
            s.put_durable(k, &[5u8; 10_000]).unwrap();
            assert!(s.evict_from_dram(k));
        }
        assert!(s.pin(a));
        let i = &s.inner;
        let loc = |k: BlockKey| i.shard(k).read().get(&k).and_then(|e| e.nvme).unwrap();
        let (la, lb) = (loc(a), loc(b));
        assert!(
            !i.drop_nvme_copy(a, la, false),
            "a pinned copy was dropped for room"
        );
        assert!(i.drop_nvme_copy(b, lb, false));
        assert!(s.contains(a) && !s.contains(b));
        // A corrupt record goes even when pinned.
        assert!(i.drop_nvme_copy(a, la, true));
        drop(s);
        std::fs::remove_dir_all(&dir).ok();
    }
}
