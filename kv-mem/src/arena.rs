//! `SharedArena`: one memfd-backed mapping an engine allocates its KV tensors from, so
//! that same-host peers map the memory and copy with plain loads and stores instead of
//! cross-memory attach.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use kv_core::{Descriptor, Error, MemKind, Result};

use crate::host::{memfd_mapping, publish_shared, withdraw_shared};
use crate::Memory;

struct Inner {
    base: NonNull<u8>,
    len: usize,
    /// Free ranges: offset → length, coalesced.
    free: Mutex<BTreeMap<usize, usize>>,
    // Dropped after `free`: the mapping, then the memfd.
    _map: memmap2::MmapMut,
    _file: std::fs::File,
}

// SAFETY: `Inner` owns its mapping; the raw base pointer is only offset to hand out
// disjoint ranges (under the `free` lock), never dereferenced through `&Inner`.
unsafe impl Send for Inner {}
// SAFETY: as above; shared access reads immutable fields or takes the lock.
unsafe impl Sync for Inner {}

impl Inner {
    /// The free list; a panic while it was held left it consistent (every update is a
    /// few map operations), so poisoning is ignored.
    fn lock_free(&self) -> MutexGuard<'_, BTreeMap<usize, usize>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        withdraw_shared(self.base.as_ptr() as u64);
    }
}

/// A memfd-backed allocator for KV memory: one `MAP_SHARED` mapping of a sealed memfd,
/// carved into [`ArenaBuffer`]s (first fit, freed ranges coalesced). Every buffer is
/// found by [`shared_backing`](crate::shared_backing), so the same-host path of the tcp
/// backend maps it into a peer — whether the engine registers the `ArenaBuffer`'s
/// `Region` or the raw range through [`EngineMemory`](crate::EngineMemory).
///
/// Cheap to clone (an `Arc`); the mapping lives until the arena and every buffer from
/// it are dropped. `Send + Sync`.
#[derive(Clone)]
pub struct SharedArena {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SharedArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedArena")
            .field(
                "addr",
                &format_args!("{:#x}", self.inner.base.as_ptr() as usize),
            )
            .field("len", &self.inner.len)
            .field("available", &self.available())
            .finish()
    }
}

impl SharedArena {
    /// An arena of `len` bytes (rounded up to a page) in one new memfd; zeroed.
    pub fn new(len: usize) -> Result<SharedArena> {
        Self::with_huge_pages(len, false)
    }

    /// An arena backed by huge pages (`MFD_HUGETLB`; `len` rounded up to 2 MiB) when
    /// `huge` is set; fails with a hint when none are reserved.
    pub fn with_huge_pages(len: usize, huge: bool) -> Result<SharedArena> {
        let page = if huge { 2 << 20 } else { 4096 };
        let len = len
            .checked_next_multiple_of(page)
            .filter(|l| *l > 0)
            .ok_or_else(|| Error::invalid_argument(format!("an arena of {len} bytes")))?;
        let (mut map, file) = memfd_mapping(len, huge, c"kvx-shared-arena").map_err(|e| {
            if huge {
                Error::invalid_argument(format!(
                    "{e} (reserve huge pages with `sysctl vm.nr_hugepages=N`)"
                ))
            } else {
                e
            }
        })?;
        let base = NonNull::new(map.as_mut_ptr())
            .ok_or_else(|| Error::invalid_argument("mmap returned a null address"))?;
        publish_shared(base.as_ptr() as u64, len as u64, &file);
        Ok(SharedArena {
            inner: Arc::new(Inner {
                base,
                len,
                free: Mutex::new(BTreeMap::from([(0, len)])),
                _map: map,
                _file: file,
            }),
        })
    }

    /// The whole mapping.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.inner.base.as_ptr() as u64, self.inner.len as u64, 0)
    }

    /// Bytes not handed out (possibly fragmented).
    pub fn available(&self) -> usize {
        self.inner.lock_free().values().sum()
    }

    /// `len` bytes aligned to `align` (a power of two), first fit. The bytes are zero
    /// the first time a range is handed out and whatever was left in it after.
    pub fn alloc(&self, len: usize, align: usize) -> Result<ArenaBuffer> {
        if len == 0 || !align.is_power_of_two() {
            return Err(Error::invalid_argument(format!(
                "arena allocation of {len} bytes aligned to {align}"
            )));
        }
        let base = self.inner.base.as_ptr() as usize;
        let mut free = self.inner.lock_free();
        let found = free.iter().find_map(|(&off, &flen)| {
            let start = (base + off).checked_next_multiple_of(align)? - base;
            let end = start.checked_add(len)?;
            (end <= off + flen).then_some((off, flen, start, end))
        });
        let Some((off, flen, start, end)) = found else {
            return Err(Error::Io {
                context: format!(
                    "arena of {} bytes has no free range of {len} bytes aligned to {align}",
                    self.inner.len
                ),
                source: Arc::new(std::io::Error::from(std::io::ErrorKind::OutOfMemory)),
            });
        };
        free.remove(&off);
        if start > off {
            free.insert(off, start - off);
        }
        if off + flen > end {
            free.insert(end, off + flen - end);
        }
        Ok(ArenaBuffer {
            arena: self.inner.clone(),
            offset: start,
            len,
        })
    }
}

/// A range allocated from a [`SharedArena`]; returned to it on drop. Owns its bytes
/// like a `Vec<u8>`: `Send + Sync`, shared access gives `&[u8]`, mutation needs `&mut`.
pub struct ArenaBuffer {
    arena: Arc<Inner>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for ArenaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaBuffer")
            .field("addr", &format_args!("{:#x}", self.as_ptr() as usize))
            .field("len", &self.len)
            .finish()
    }
}

impl ArenaBuffer {
    /// Start address.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: `offset + len` lies inside the arena's mapping (checked at alloc).
        unsafe { self.arena.base.as_ptr().add(self.offset) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: buffers have at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: our range of the live mapping, handed out to this buffer only.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The bytes, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr().cast_mut(), self.len) }
    }

    /// The buffer as a DRAM descriptor.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.as_ptr() as u64, self.len as u64, 0)
    }
}

impl Drop for ArenaBuffer {
    fn drop(&mut self) {
        let mut free = self.arena.lock_free();
        let (mut off, mut len) = (self.offset, self.len);
        if let Some((&p, &plen)) = free.range(..off).next_back() {
            if p + plen == off {
                free.remove(&p);
                (off, len) = (p, plen + len);
            }
        }
        if let Some(&nlen) = free.get(&(off + len)) {
            free.remove(&(off + len));
            len += nlen;
        }
        free.insert(off, len);
    }
}

// SAFETY: a range of a shared mapping at a fixed address, kept mapped by the `Arc` this
// buffer holds, handed out to this buffer alone until it drops.
unsafe impl Memory for ArenaBuffer {
    fn kind(&self) -> MemKind {
        MemKind::Dram
    }
    fn descriptor(&self) -> Descriptor {
        ArenaBuffer::descriptor(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_backing;

    #[test]
    #[cfg_attr(miri, ignore = "Miri supports neither memfd_create nor MAP_SHARED")]
    fn allocations_are_aligned_disjoint_and_memfd_backed() {
        let a = SharedArena::new(1 << 20).unwrap();
        let mut x = a.alloc(1000, 64).unwrap();
        let y = a.alloc(4096, 4096).unwrap();
        assert_eq!(x.as_ptr() as usize % 64, 0);
        assert_eq!(y.as_ptr() as usize % 4096, 0);
        assert!(!x.descriptor().overlaps(&y.descriptor()));
        assert!(y.as_slice().iter().all(|b| *b == 0));
        x.as_mut_slice()[999] = 5;
        let s = shared_backing(&y.descriptor()).unwrap();
        assert_eq!(s.len, 1 << 20);
        assert_eq!(s.offset, y.descriptor().addr - a.descriptor().addr);
        // The memfd holds the bytes.
        use std::os::unix::fs::FileExt;
        // SAFETY: the memfd stays open while the arena lives (all of this test).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(s.fd) };
        let f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
        let mut one = [0u8; 1];
        f.read_exact_at(&mut one, x.descriptor().addr - a.descriptor().addr + 999)
            .unwrap();
        assert_eq!(one[0], 5);
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri supports neither memfd_create nor MAP_SHARED")]
    fn freed_ranges_coalesce_and_exhaustion_is_an_error() {
        let a = SharedArena::new(64 << 10).unwrap();
        let all = a.available();
        let bufs: Vec<ArenaBuffer> = (0..16).map(|_| a.alloc(4096, 4096).unwrap()).collect();
        assert_eq!(a.available(), 0);
        assert!(a.alloc(1, 1).is_err());
        drop(bufs);
        assert_eq!(a.available(), all);
        // One range again: the whole arena fits in one allocation.
        let whole = a.alloc(all, 4096).unwrap();
        assert_eq!(whole.len(), all);
        assert!(a.alloc(0, 64).is_err() && a.alloc(64, 3).is_err());
        let d = a.descriptor();
        drop(whole);
        drop(a);
        assert!(
            shared_backing(&d).is_none(),
            "the range is withdrawn with the arena"
        );
    }
}
