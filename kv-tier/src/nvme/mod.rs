//! The NVMe tier: log-structured segment files, write-back, cleaning, recovery, reads.
//!
//! One write-back thread owns every append: it writes evicted (and flushed, and durable)
//! blocks as records at the end of the active segment straight from their arena slots,
//! in batches, through the gds backend. When the active segment is full a new one is
//! created; when that makes `capacity / segment_bytes` files, the segment with the
//! fewest live bytes is cleaned (its live records copied into the new one, the file
//! deleted). The NVMe policy keeps live bytes under `(files − 2) × segment_bytes`, so a
//! cleaned segment's live records always fit.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crossbeam::channel::Sender;
use kv_core::{Error, Result};
use parking_lot::Mutex;

use crate::arena::{Arena, Slot};
use crate::io::{FileReg, GdsIo};
use crate::key::BlockKey;
use crate::options::NvmeOptions;
use crate::policy::EvictionPolicy;
use crate::record::PAGE;
use crate::store::Inner;

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
    Durable {
        item: Item,
        ack: Sender<Result<()>>,
    },
    Flush(Sender<Result<()>>),
    /// Writes and syncs a tombstone for a removed key.
    Tombstone {
        key: BlockKey,
        ack: Sender<Result<()>>,
    },
    Shutdown,
}

pub(crate) enum PfJob {
    Keys(Vec<BlockKey>),
    /// Along a prefix chain, in order, at most `max_bytes` of records read at once,
    /// stopping at the first key no tier holds.
    Chain {
        keys: Vec<BlockKey>,
        max_bytes: u64,
    },
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
    /// Tombstones written here: key, where, guard segment.
    pub tombs: Vec<(BlockKey, NvmeLoc, u32)>,
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
    pub(crate) seq: AtomicU64,
    pub(crate) wb_tx: Sender<Job>,
    pub(crate) pf_tx: Sender<PfJob>,
    pub(crate) max_segments: u64,
    pub(crate) budget: u64,
    /// A registered buffer `get_many` reads records into (reused while large enough).
    pub(crate) bounce: Mutex<Option<crate::io::Bounce>>,
    /// The write-back thread's buffer for tombstone pages.
    pub(crate) tomb_bounce: Mutex<Option<crate::io::Bounce>>,
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
    pub(crate) fn open(
        opts: NvmeOptions,
        arena: Arc<Arena>,
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
            bounce: Mutex::new(None),
            tomb_bounce: Mutex::new(None),
        })
    }

    pub(crate) fn send(&self, job: Job) -> Result<()> {
        self.wb_tx
            .send(job)
            .map_err(|_| Error::Busy("the write-back thread stopped".into()))
    }

    pub(crate) fn send_prefetch(&self, job: PfJob) -> Result<()> {
        self.pf_tx
            .send(job)
            .map_err(|_| Error::Busy("the prefetch thread stopped".into()))
    }

    /// A record no index entry points at any more.
    pub(crate) fn mark_dead(&self, loc: NvmeLoc) {
        let mut g = self.segs.lock();
        if let Some(s) = g.map.get_mut(&loc.seg) {
            s.live = s.live.saturating_sub(loc.rec);
            g.live = g.live.saturating_sub(loc.rec);
        }
    }

    /// Reserves `rec` bytes at the end of the active segment; `None` when it is full.
    pub(crate) fn reserve(
        &self,
        key: BlockKey,
        rec: u64,
        seq: u64,
    ) -> Option<(NvmeLoc, Arc<FileReg>)> {
        self.reserve_as(key, rec, seq, None)
    }

    /// [`Nvme::reserve`] for a tombstone page: `guard` is kept when a tombstone moves;
    /// a new one (`None`) guards up to the segment it lands in. Returns the guard too.
    pub(crate) fn reserve_tomb(
        &self,
        key: BlockKey,
        seq: u64,
        guard: Option<u32>,
    ) -> Option<(NvmeLoc, Arc<FileReg>, u32)> {
        let guard = match guard {
            Some(g) => g,
            None => self.segs.lock().active?,
        };
        let (loc, reg) = self.reserve_as(key, PAGE, seq, Some(guard))?;
        Some((loc, reg, guard))
    }

    fn reserve_as(
        &self,
        key: BlockKey,
        rec: u64,
        seq: u64,
        tomb: Option<u32>,
    ) -> Option<(NvmeLoc, Arc<FileReg>)> {
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
        match tomb {
            Some(guard) => s.tombs.push((key, loc, guard)),
            None => s.records.push((key, loc)),
        }
        let reg = s.reg.clone();
        g.live += rec;
        Some((loc, reg))
    }

    pub(crate) fn create_segment(&self, id: u32) -> Result<Seg> {
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
            tombs: Vec::new(),
            unsynced: false,
        })
    }

    /// Syncs every segment written since the last sync.
    pub(crate) fn sync(&self) -> Result<()> {
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

impl Inner {
    fn nv(&self) -> Result<&Nvme> {
        self.nvme
            .as_ref()
            .ok_or_else(|| Error::Unsupported("this store has no NVMe tier".into()))
    }
}

mod clean;
mod read;
mod recover;
mod writeback;

pub(crate) use read::{prefetch_loop, ReadItem};
pub(crate) use writeback::writeback_loop;
