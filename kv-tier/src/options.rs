//! Options of the store and of its NVMe tier.

use std::path::PathBuf;
use std::time::Duration;

use kv_core::{Error, Result};
use kv_mem::HostOptions;

use crate::policy::PolicyKind;

/// How to open a [`crate::Store`]. Plain struct with `Default`. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes of the DRAM arena, allocated once at open (default 1 GiB): exactly this
    /// many, a multiple of 4 KiB ([`crate::Store::open`] refuses others, never rounds).
    pub dram_capacity: u64,
    /// Slab page size: the arena is handed to block sizes in pages of this many bytes,
    /// and no block may be larger (default 64 MiB, clamped to the capacity; the last
    /// page is shorter when the capacity is not a whole number of pages).
    pub slab_page_bytes: u64,
    /// How the arena is allocated (huge pages, `mlock`).
    pub host: HostOptions,
    /// Eviction policy of the DRAM tier (default S3-FIFO).
    pub dram_policy: PolicyKind,
    /// Tokens per chunk for [`crate::Store::lookup_prefix`] (default 256).
    pub chunk_tokens: usize,
    /// Model identity: the compatibility hash mixed into every chunk key
    /// ([`crate::ChunkHasher::compat_of`] of model, dtype, layout, TP). Required —
    /// [`crate::Store::open`] refuses `None`, so two models never share keys by accident.
    pub compat: Option<u64>,
    /// Index shards (rounded up to a power of two; default 64).
    pub shards: usize,
    /// How long a `put` waits for write-back to free DRAM before failing with
    /// `TimedOut` (default 30 s).
    pub evict_wait: Duration,
    /// The NVMe tier; `None` keeps blocks in DRAM only (evictions drop them).
    pub nvme: Option<NvmeOptions>,
    /// Dropping a store with an NVMe tier writes the blocks not yet on NVMe and syncs,
    /// waiting at most this long (default 30 s); `None` drops them instead.
    pub flush_on_drop: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dram_capacity: 1 << 30,
            slab_page_bytes: 64 << 20,
            host: HostOptions::default(),
            dram_policy: PolicyKind::S3Fifo,
            chunk_tokens: 256,
            compat: None,
            shards: 64,
            evict_wait: Duration::from_secs(30),
            nvme: None,
            flush_on_drop: Some(Duration::from_secs(30)),
        }
    }
}

impl Options {
    /// Defaults for the model described by `model` (`"llama-3-8b/bf16/paged16/tp1"`):
    /// everything that makes two KV caches incompatible belongs in it.
    pub fn for_model(model: &str) -> Options {
        Options {
            compat: Some(crate::ChunkHasher::compat_of(model)),
            ..Default::default()
        }
    }
}

/// The NVMe tier: log-structured segment files in a directory. `Clone`, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct NvmeOptions {
    /// Directory of the segment files (created if missing).
    pub dir: PathBuf,
    /// Bytes of segment files at most (default 16 GiB); at least 3 segments.
    pub capacity: u64,
    /// Size of one segment file (default 256 MiB; a multiple of 4 KiB). A block's record
    /// (4 KiB header + payload padded to 4 KiB) must fit in one segment.
    pub segment_bytes: u64,
    /// Eviction policy of the NVMe tier (default S3-FIFO).
    pub policy: PolicyKind,
    /// Check every payload checksum while recovering the index at open (reads every
    /// segment once). Reads check checksums either way.
    pub verify_on_open: bool,
    /// Blocks written (or read by prefetch) per batch: the I/O queue depth the tier asks
    /// for (default 16).
    pub batch: usize,
    /// Options of the gds backend under the tier (default: io_uring, queue depth 64,
    /// 4 MiB pieces so 2 MiB blocks go out as one I/O).
    pub gds: kv_backend_gds::Options,
    /// Deadline of one batch of I/O (default 60 s).
    pub io_timeout: Duration,
}

impl NvmeOptions {
    /// Defaults with segment files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        NvmeOptions {
            dir: dir.into(),
            capacity: 16 << 30,
            segment_bytes: 256 << 20,
            policy: PolicyKind::S3Fifo,
            verify_on_open: true,
            batch: 16,
            gds: kv_backend_gds::Options {
                max_io_size: 4 << 20,
                ..Default::default()
            },
            io_timeout: Duration::from_secs(60),
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.segment_bytes < 64 << 10 || self.segment_bytes % 4096 != 0 {
            return Err(Error::invalid_argument(format!(
                "segment_bytes {} must be a multiple of 4 KiB and at least 64 KiB",
                self.segment_bytes
            )));
        }
        if self.capacity / self.segment_bytes < 3 {
            return Err(Error::invalid_argument(format!(
                "NVMe capacity {} holds fewer than 3 segments of {} bytes; raise it or shrink segment_bytes",
                self.capacity, self.segment_bytes
            )));
        }
        if self.batch == 0 {
            return Err(Error::invalid_argument("NVMe batch must be at least 1"));
        }
        Ok(())
    }
}
