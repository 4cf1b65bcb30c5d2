//! The DRAM tier's memory: one fixed `HostBuffer` carved by a slab allocator.
//!
//! The arena is split into pages of `page_bytes`; a page is given to one slot size (a
//! multiple of 4 KiB) when that size runs out of free slots, and goes back to the free
//! pages when its last slot is freed. Memory use is the arena, allocated once: it can
//! never grow past the configured capacity.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kv_core::{Error, Result};
use kv_mem::{HostBuffer, HostOptions, Region};
use parking_lot::{Condvar, Mutex};

use crate::record::PAGE;

#[derive(Debug, Default)]
struct Alloc {
    free_pages: Vec<u32>,
    /// Free slot offsets per slot size.
    classes: HashMap<u64, Vec<u64>>,
    /// Per page: (slot size it serves, slots in use); `None` when free.
    pages: Vec<Option<(u64, u32)>>,
    used: u64,
    /// Arena ranges `[start, end)` that a transfer whose cancel failed may still write:
    /// a slot overlapping one is never handed out again (see [`Arena::quarantine`]).
    quarantine: Vec<(u64, u64)>,
    /// Bytes of slots kept out of the allocator by `quarantine` (still in `used`).
    quarantined: u64,
}

/// The arena. `Send + Sync`: the allocator sits behind a mutex, the memory in a
/// `Region` (reads and writes of distinct slots go through `Region::read_at/write_at`).
pub(crate) struct Arena {
    region: Region<HostBuffer>,
    page_bytes: u64,
    capacity: u64,
    alloc: Mutex<Alloc>,
    /// Signalled whenever a slot is freed.
    freed: Condvar,
}

/// One allocated slot; dropping the last `Arc<Slot>` frees it. `Send + Sync`.
pub(crate) struct Slot {
    arena: Arc<Arena>,
    /// Offset in the arena (4 KiB-aligned).
    pub offset: u64,
    /// Slot size in bytes (a multiple of 4 KiB).
    pub size: u64,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot({}+{})", self.offset, self.size)
    }
}

impl Slot {
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.arena.free(self.offset, self.size);
    }
}

impl Arena {
    /// An arena of exactly `capacity` bytes (a multiple of 4 KiB, else refused) in
    /// pages of `page_bytes` (rounded down to 4 KiB); the last page is shorter when
    /// the capacity is not a whole number of pages, and serves the slot sizes that fit.
    pub fn new(capacity: u64, page_bytes: u64, host: HostOptions) -> Result<Arc<Arena>> {
        if capacity == 0 || capacity % PAGE != 0 {
            return Err(Error::invalid_argument(format!(
                "DRAM capacity {capacity} is not a positive multiple of 4096 bytes; round it (the store never rounds a capacity for you)"
            )));
        }
        let page_bytes = page_bytes.min(capacity) / PAGE * PAGE;
        if page_bytes == 0 {
            return Err(Error::invalid_argument(
                "the slab page size must be at least 4 KiB",
            ));
        }
        let pages = u32::try_from(capacity.div_ceil(page_bytes))
            .map_err(|_| Error::invalid_argument("too many slab pages; raise slab_page_bytes"))?;
        let len = usize::try_from(capacity)
            .map_err(|_| Error::invalid_argument("DRAM capacity does not fit in memory"))?;
        let host = HostOptions {
            align: host.align.max(PAGE as usize),
            ..host
        };
        let buf = HostBuffer::with_options(len, host)?;
        Ok(Arc::new(Arena {
            region: Region::new(buf),
            page_bytes,
            capacity,
            alloc: Mutex::new(Alloc {
                free_pages: (0..pages).rev().collect(),
                pages: vec![None; pages as usize],
                ..Default::default()
            }),
            freed: Condvar::new(),
        }))
    }

    /// Bytes of page `page` (the last one may be short).
    fn page_len(&self, page: u32) -> u64 {
        let start = u64::from(page) * self.page_bytes;
        self.page_bytes.min(self.capacity - start)
    }

    pub fn region(&self) -> &Region<HostBuffer> {
        &self.region
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn used(&self) -> u64 {
        self.alloc.lock().used
    }

    /// The slot size for `bytes`: rounded up to 4 KiB.
    pub fn slot_size(bytes: u64) -> u64 {
        bytes.div_ceil(PAGE).max(1) * PAGE
    }

    /// A slot of at least `bytes`, or `None` when the arena is full for that size.
    pub fn alloc(self: &Arc<Self>, bytes: u64) -> Result<Option<Slot>> {
        let size = Self::slot_size(bytes);
        if size > self.page_bytes {
            return Err(Error::invalid_argument(format!(
                "a block slot of {size} bytes is larger than the slab page ({} bytes); raise slab_page_bytes",
                self.page_bytes
            )));
        }
        let mut a = self.alloc.lock();
        let offset = match a.classes.get_mut(&size).and_then(|f| f.pop()) {
            Some(o) => o,
            None => {
                // The most recently freed page that is long enough (only the short last
                // page can be too short).
                let Some(at) = a.free_pages.iter().rposition(|&p| self.page_len(p) >= size) else {
                    return Ok(None);
                };
                let page = a.free_pages.remove(at);
                let per = self.page_len(page) / size;
                let base = u64::from(page) * self.page_bytes;
                let list = a.classes.entry(size).or_default();
                // Highest first so pops hand out ascending offsets.
                list.extend((0..per).rev().map(|i| base + i * size));
                a.pages[page as usize] = Some((size, 0));
                match a.classes.get_mut(&size).and_then(|f| f.pop()) {
                    Some(o) => o,
                    None => return Ok(None),
                }
            }
        };
        let page = (offset / self.page_bytes) as usize;
        if let Some((_, n)) = a.pages[page].as_mut() {
            *n += 1;
        }
        a.used += size;
        Ok(Some(Slot {
            arena: self.clone(),
            offset,
            size,
        }))
    }

    /// Never hands out `offset..offset+len` again: a transfer the backend could not
    /// cancel (the kernel may still write there) names it. Call while holding the slots
    /// that cover it; when they are freed they stay allocated (counted in `used` and
    /// [`Arena::quarantined`]), and their page never returns to the free pages.
    pub fn quarantine(&self, offset: u64, len: u64) {
        if len > 0 {
            let end = offset.saturating_add(len);
            self.alloc.lock().quarantine.push((offset, end));
        }
    }

    /// Bytes of freed slots kept out of the allocator by [`Arena::quarantine`].
    pub fn quarantined(&self) -> u64 {
        self.alloc.lock().quarantined
    }

    fn free(&self, offset: u64, size: u64) {
        let mut a = self.alloc.lock();
        let end = offset.saturating_add(size);
        if a.quarantine.iter().any(|&(s, e)| s < end && offset < e) {
            // Leaked on purpose: its page keeps a slot in use, so no size class gets it.
            a.quarantined += size;
            tracing::warn!("kv-tier: arena slot {offset}+{size} quarantined (a transfer that could not be cancelled names it)");
            return;
        }
        a.used = a.used.saturating_sub(size);
        let page = (offset / self.page_bytes) as usize;
        let empty = match a.pages.get_mut(page).and_then(|p| p.as_mut()) {
            Some((_, n)) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        let base = page as u64 * self.page_bytes;
        let class = a.classes.entry(size).or_default();
        if empty {
            // The page's slots all came back: give the page to any size.
            let end = base + self.page_len(page as u32);
            class.retain(|o| *o < base || *o >= end);
            a.pages[page] = None;
            a.free_pages.push(page as u32);
        } else {
            class.push(offset);
        }
        drop(a);
        self.freed.notify_all();
    }

    /// Waits up to `d` for a slot to be freed.
    pub fn wait_freed(&self, d: Duration) {
        let mut a = self.alloc.lock();
        self.freed.wait_for(&mut a, d);
    }

    /// Wakes the waiters of [`Arena::wait_freed`] (write-back progress).
    pub fn wake(&self) {
        self.freed.notify_all();
    }

    /// The bytes of `offset..offset+len` (a slice over that range only).
    ///
    /// Other threads write other slots of the arena at the same time (through
    /// [`Arena::write`]); a slot's bytes are written only while one owner holds it
    /// unpublished, so kv-tier itself never changes the range while it is borrowed.
    ///
    /// # Safety
    /// Nothing outside kv-tier writes the range while the slice lives: no registration
    /// of the arena ([`crate::Store::arena`]) lets a transfer or a peer write into it
    /// (`BlockHandle::as_slice` passes this promise on to its caller). kv-tier's own
    /// reads use [`Arena::read`] and [`Arena::digest`] (copies), never this.
    #[allow(unsafe_code)]
    pub unsafe fn bytes(&self, offset: u64, len: u64) -> Result<&[u8]> {
        // SAFETY: the range is checked against the allocation (`Region::bytes`); no
        // in-process writer is kv-tier's slot discipline, no outside writer the caller's
        // promise.
        unsafe { self.region.bytes(offset, len) }
    }

    /// Feeds `offset..offset+len` to `f` in chunks copied out of the arena (never a
    /// reference into it: a peer writing through a registration of the arena meanwhile
    /// only changes what `f` sees, which the checksums it computes then catch).
    pub fn digest(&self, offset: u64, len: u64, mut f: impl FnMut(&[u8])) -> Result<()> {
        let mut buf = [0u8; 16 << 10];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            self.read(offset + at, &mut buf[..n])?;
            f(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    }

    /// Copies `data` into the arena at `offset` (a slot this thread owns).
    #[allow(unsafe_code)]
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        // SAFETY: every caller writes a slot it holds unpublished (freshly allocated, not
        // yet in any index, or being re-headed by the single write-back owner), so no
        // other thread reads or writes those bytes during the copy.
        unsafe { self.region.write_at(offset, data) }
    }

    /// Copies bytes out of the arena at `offset` (a published, pinned slot, or one the
    /// caller owns unpublished).
    #[allow(unsafe_code)]
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        // SAFETY: callers read a published slot under a pin or a slot they own
        // unpublished; kv-tier writes a slot only while one owner holds it unpublished
        // and unpinned, so no thread of kv-tier writes it concurrently. (A peer writing
        // through a registration of the arena makes the copy unspecified, not unsound:
        // `Region::write_at`'s contract; the checksums catch it.)
        unsafe { self.region.read_at(offset, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slabs_reuse_pages_and_never_exceed_capacity() {
        let a = Arena::new(1 << 20, 256 << 10, HostOptions::default()).unwrap();
        assert_eq!(a.capacity(), 1 << 20);
        let mut held = Vec::new();
        while let Some(s) = a.alloc(100 << 10).unwrap() {
            held.push(s);
        }
        // 112 KiB slots: two per 256 KiB page, four pages.
        assert_eq!(held.len(), 8);
        assert!(a.used() <= a.capacity());
        assert!(a.alloc(4096).unwrap().is_none());
        held.truncate(6); // frees the last page entirely
        let small: Vec<_> = (0..64).map_while(|_| a.alloc(4096).unwrap()).collect();
        assert_eq!(small.len(), 64);
        assert!(a.alloc(1 << 20).is_err());
        drop(held);
        drop(small);
        assert_eq!(a.used(), 0);
    }

    /// A slot named by a transfer whose cancel failed (the kernel may still write it)
    /// never comes back from the allocator, nor does its page (UNSAFE.md finding: it
    /// returned to the free lists and was reused).
    #[test]
    fn quarantined_slots_are_never_reused() {
        let a = Arena::new(1 << 20, 256 << 10, HostOptions::default()).unwrap();
        let stuck = a.alloc(8192).unwrap().unwrap();
        let neighbour = a.alloc(8192).unwrap().unwrap();
        let (off, size) = (stuck.offset, stuck.size);
        // Part of the slot is enough to quarantine all of it.
        a.quarantine(off + 4096, 100);
        drop(stuck);
        drop(neighbour);
        assert_eq!(a.quarantined(), size);
        assert_eq!(a.used(), size);
        let mut held = Vec::new();
        for bytes in [8192, 4096, 256 << 10, 8192] {
            while let Some(s) = a.alloc(bytes).unwrap() {
                assert!(
                    s.offset + s.size <= off || s.offset >= off + size,
                    "{s:?} overlaps the quarantined {off}+{size}"
                );
                held.push(s);
            }
        }
        // Everything but the quarantined slot's page was handed out.
        assert!(held.iter().map(|s| s.size).sum::<u64>() >= (1 << 20) - (256 << 10));
        drop(held);
        assert_eq!(a.used(), size);
    }

    /// `digest` hands out exactly the range, in copies, across its chunk size.
    #[test]
    fn digest_copies_exactly_the_range() {
        let a = Arena::new(1 << 20, 256 << 10, HostOptions::default()).unwrap();
        let s = a.alloc(100_000).unwrap().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        a.write(s.offset, &data).unwrap();
        for (off, len) in [
            (0, 100_000),
            (5, 16 << 10),
            (3, (16 << 10) + 1),
            (99_999, 1),
            (7, 0),
        ] {
            let mut got = Vec::new();
            let mut calls = 0;
            a.digest(s.offset + off, len, |c| {
                got.extend_from_slice(c);
                calls += 1;
            })
            .unwrap();
            assert_eq!(got, data[off as usize..(off + len) as usize]);
            assert_eq!(calls, len.div_ceil(16 << 10));
        }
        assert!(a.digest(a.capacity() - 10, 11, |_| {}).is_err());
    }

    /// 500 MiB in 64 MiB pages used to become 448 MiB; the capacity is now exact (the
    /// last page is short) or refused.
    #[test]
    fn capacity_is_exact_or_refused() {
        let a = Arena::new((1 << 20) + 12288, 256 << 10, HostOptions::default()).unwrap();
        assert_eq!(a.capacity(), (1 << 20) + 12288);
        let mut held = Vec::new();
        while let Some(s) = a.alloc(4096).unwrap() {
            held.push(s);
        }
        assert_eq!(held.len(), 256 + 3);
        assert!(held.iter().all(|s| s.offset + s.size <= a.capacity()));
        drop(held);
        // A size the short page cannot serve still finds the whole pages.
        let big: Vec<_> = (0..8).map_while(|_| a.alloc(100 << 10).unwrap()).collect();
        assert_eq!(big.len(), 8);
        drop(big);
        assert_eq!(a.used(), 0);
        for bad in [0, 1000, (1 << 20) + 1] {
            assert!(
                Arena::new(bad, 256 << 10, HostOptions::default()).is_err(),
                "{bad}"
            );
        }
    }
}
