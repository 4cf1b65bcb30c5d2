//! Rebuilding the NVMe index from the segment files at open.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kv_core::{Error, Result};

use super::{parse_seg_name, seg_path, NvmeLoc, Seg};
use crate::key::BlockKey;
use crate::record::{scan_segment, RecordHeader, PAGE};
use crate::store::{Entry, Inner};

impl Inner {
    /// Recovers the NVMe index from the segment files.
    pub(crate) fn recover(&self) -> Result<()> {
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
        let mut tombs = Vec::new();
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
                if h.is_tombstone() {
                    tombs.push(*h);
                }
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
                    tombs: Vec::new(),
                    unsynced: false,
                },
            );
        }
        let mut winners: Vec<RecordHeader> = best.into_values().collect();
        winners.sort_unstable_by_key(|h| h.seq);
        let mut live = 0;
        // Every tombstone is kept (cleaning decides when one is no longer needed).
        for h in &tombs {
            if let Some(s) = segs.get_mut(&h.segment) {
                let loc = NvmeLoc {
                    seg: h.segment,
                    offset: h.offset,
                    seq: h.seq,
                    rec: h.record_len(),
                };
                s.tombs.push((h.key, loc, h.guard));
                s.live += loc.rec;
                live += loc.rec;
            }
        }
        let mut policy = nv.policy.lock();
        for h in &winners {
            if h.is_tombstone() {
                continue; // removed: its newest record is its tombstone
            }
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
                    sum: None,
                    parent: None,
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
}
