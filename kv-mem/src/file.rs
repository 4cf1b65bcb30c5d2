//! File segments: a range of an open file, for `MemKind::File` registrations.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use kv_core::{Descriptor, Error, MemKind, Result};

/// `len` bytes of `file` starting at `offset`. `Clone` (the file is shared),
/// `Send + Sync`.
///
/// Its descriptor carries the offset as `addr` and the file descriptor number as
/// `device`, which is how storage backends find the file.
#[derive(Debug, Clone)]
pub struct FileSegment {
    file: Arc<File>,
    offset: u64,
    len: u64,
}

impl FileSegment {
    /// A segment of an open file. Fails if `offset + len` overflows.
    pub fn new(file: Arc<File>, offset: u64, len: u64) -> Result<Self> {
        offset.checked_add(len).ok_or_else(|| {
            Error::invalid_argument(format!("file segment {offset}+{len} overflows"))
        })?;
        Ok(FileSegment { file, offset, len })
    }

    /// The whole file, as long as it is now.
    pub fn whole(file: Arc<File>) -> Result<Self> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("reading file length", e))?
            .len();
        Self::new(file, 0, len)
    }

    /// The open file.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Offset of the segment in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the segment.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-length segment.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segment as a `MemKind::File` descriptor (`device` = the fd number).
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.offset, self.len, self.file.as_raw_fd() as u32)
    }

    /// Memory kind (always FILE).
    pub fn kind(&self) -> MemKind {
        MemKind::File
    }
}
