//! Rolling segments and cleaning the one with the fewest live bytes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kv_core::{Descriptor, Error, Op, Result};

use super::{Nvme, NvmeLoc};
use crate::io::FileReg;
use crate::key::BlockKey;
use crate::record::{decode_header, decode_record};
use crate::store::Inner;

impl Inner {
    /// Opens a new active segment, cleaning old ones to keep the file count bounded.
    pub(crate) fn roll(&self) -> Result<()> {
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
    pub(crate) fn clean_one(&self) -> Result<()> {
        let nv = self.nv()?;
        let (victim, records, tombs, vreg) = {
            let g = nv.segs.lock();
            let Some((&id, s)) = g
                .map
                .iter()
                .filter(|(id, _)| Some(**id) != g.active)
                .min_by_key(|(_, s)| s.live)
            else {
                return Ok(());
            };
            // A tombstone stays while another segment up to its guard may hold an
            // older record of its key.
            let tombs: Vec<_> = s
                .tombs
                .iter()
                .filter(|(_, _, guard)| g.map.keys().any(|o| *o != id && o <= guard))
                .map(|&(k, loc, guard)| (k, loc, Some(guard), true))
                .collect();
            (id, s.records.clone(), tombs, s.reg.clone())
        };
        let mut live: Vec<(BlockKey, NvmeLoc, Option<u32>, bool)> = records
            .into_iter()
            .filter_map(|(k, loc)| {
                let sh = self.shard(k).read();
                let e = sh.get(&k).filter(|e| e.nvme == Some(loc))?;
                Some((k, loc, None, e.pins > 0))
            })
            .chain(tombs)
            .collect();
        // Pinned records and needed tombstones are moved first: only unpinned blocks
        // may be dropped for room.
        live.sort_by_key(|l| !l.3);
        let room = {
            let g = nv.segs.lock();
            g.active
                .and_then(|a| g.map.get(&a))
                .map_or(0, |s| s.file_len - s.write_off)
        };
        let pinned_bytes: u64 = live.iter().filter(|l| l.3).map(|l| l.1.rec).sum();
        if pinned_bytes > room {
            return Err(Error::Busy(format!(
                "NVMe segment {victim} holds {pinned_bytes} bytes of pinned blocks and tombstones and the active segment has room for {room}"
            )));
        }
        let mut used = 0;
        let mut keep = Vec::new();
        for (k, loc, tomb, _) in live {
            if used + loc.rec <= room {
                used += loc.rec;
                keep.push((k, loc, tomb));
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
    pub(crate) fn points_at(&self, k: BlockKey, loc: NvmeLoc) -> bool {
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
        let (dropped, gone) = {
            let mut sh = self.shard(k).write();
            match sh.get_mut(&k) {
                Some(e) if e.nvme == Some(loc) && (corrupt || e.pins == 0) => {
                    e.nvme = None;
                    let gone = e.dram.is_none();
                    if gone {
                        sh.remove(&k);
                    }
                    (true, gone)
                }
                _ => (false, false),
            }
        };
        if dropped {
            nv.policy.lock().remove(k);
            nv.mark_dead(loc);
            self.c.nvme_evictions.fetch_add(1, Ordering::Relaxed);
        }
        if gone {
            self.lost(k);
        }
        dropped
    }

    /// Reads `keep` (blocks, and tombstones with their guard) from the victim into a
    /// bounce buffer and appends them to the active segment, then repoints the index.
    /// False when a pinned record or a needed tombstone stayed behind (the victim must
    /// then be kept).
    pub(crate) fn move_records(
        &self,
        nv: &Nvme,
        vreg: &Arc<FileReg>,
        keep: Vec<(BlockKey, NvmeLoc, Option<u32>)>,
    ) -> Result<bool> {
        let mut all_moved = true;
        let total: u64 = keep.iter().map(|(_, l, _)| l.rec).sum();
        let mut bounce = nv.io.bounce(total as usize)?;
        let base = bounce.buf.descriptor().addr;
        let mut pairs = Vec::new();
        let mut off = 0;
        for (_, l, _) in &keep {
            pairs.push((
                Descriptor::new(base + off, l.rec, 0),
                vreg.range(l.offset, l.rec),
            ));
            off += l.rec;
        }
        nv.io.transfer(Op::Read, &pairs)?;
        let mut writes = Vec::new();
        let mut moved = Vec::new();
        let mut tombs_moved = Vec::new();
        let mut off = 0u64;
        for (k, old, tomb) in keep {
            let at = off as usize;
            off += old.rec;
            let rec_bytes = &mut bounce.buf.as_mut_slice()[at..at + old.rec as usize];
            let ok = decode_record(rec_bytes).is_ok_and(|(h, _)| {
                h.key == k && h.seq == old.seq && h.segment == old.seg && h.offset == old.offset
            });
            if let Some(guard) = tomb {
                // A tombstone whose write never landed has nothing to keep.
                if ok {
                    match nv.reserve_tomb(k, old.seq, Some(guard)) {
                        Some((new, reg, _)) => {
                            plan_move(rec_bytes, new, &reg, base + at as u64, &mut writes)?;
                            tombs_moved.push(new);
                        }
                        None => all_moved = false,
                    }
                }
                continue;
            }
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
            plan_move(rec_bytes, new, &reg, base + at as u64, &mut writes)?;
            moved.push((k, old, new));
        }
        if let Err(e) = nv.io.transfer(Op::Write, &writes) {
            for new in moved.iter().map(|m| &m.2).chain(&tombs_moved) {
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
}

/// Rewrites a moved record's header (`rec_bytes`, at `src` in memory) for its new
/// place and plans its write there.
fn plan_move(
    rec_bytes: &mut [u8],
    new: NvmeLoc,
    reg: &FileReg,
    src: u64,
    writes: &mut Vec<(Descriptor, Descriptor)>,
) -> Result<()> {
    let mut h = decode_header(rec_bytes)?;
    h.segment = new.seg;
    h.offset = new.offset;
    h.encode_into(rec_bytes)?;
    writes.push((
        Descriptor::new(src, new.rec, 0),
        reg.range(new.offset, new.rec),
    ));
    Ok(())
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
