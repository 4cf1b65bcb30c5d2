//! `Region`: owned memory that stays alive while anything may touch it.

use std::sync::Arc;

use kv_core::{Descriptor, Error, MemKind, Result};

use crate::{FileSegment, HostBuffer};

/// Memory that can back a [`Region`].
///
/// # Safety
///
/// Implementors promise that [`Memory::descriptor`] describes memory that is valid for
/// reads and writes by devices and peers for as long as the value lives, at an address
/// that does not change when the value is moved (heap, mapping, device allocation —
/// never an inline array). Backends rely on this to write into it after registration.
pub unsafe trait Memory: Send + Sync + 'static {
    /// Kind of the memory.
    fn kind(&self) -> MemKind;
    /// The whole range.
    fn descriptor(&self) -> Descriptor;
}

// SAFETY: heap or mapped memory at a fixed address, owned until drop.
unsafe impl Memory for HostBuffer {
    fn kind(&self) -> MemKind {
        MemKind::Dram
    }
    fn descriptor(&self) -> Descriptor {
        HostBuffer::descriptor(self)
    }
}

// SAFETY: a file range addressed by offset; the fd stays open while the Arc<File> lives.
unsafe impl Memory for FileSegment {
    fn kind(&self) -> MemKind {
        MemKind::File
    }
    fn descriptor(&self) -> Descriptor {
        FileSegment::descriptor(self)
    }
}

/// Owned memory that can be registered. Cheap to clone (an `Arc`); every clone keeps
/// the memory alive, so a registration or in-flight transfer that holds one makes the
/// memory impossible to free under it. `Send + Sync` when `M` is.
pub struct Region<M: Memory = HostBuffer> {
    mem: Arc<M>,
    desc: Descriptor,
}

impl<M: Memory> Clone for Region<M> {
    fn clone(&self) -> Self {
        Region {
            mem: self.mem.clone(),
            desc: self.desc,
        }
    }
}

impl<M: Memory + std::fmt::Debug> std::fmt::Debug for Region<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("mem", &self.mem)
            .field("holders", &Arc::strong_count(&self.mem))
            .finish()
    }
}

impl<M: Memory> Region<M> {
    /// Takes ownership of `mem`.
    pub fn new(mem: M) -> Self {
        let desc = mem.descriptor();
        Region {
            mem: Arc::new(mem),
            desc,
        }
    }

    /// The whole region.
    pub fn descriptor(&self) -> Descriptor {
        self.desc
    }

    /// Memory kind.
    pub fn kind(&self) -> MemKind {
        self.mem.kind()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.desc.len
    }

    /// True for an empty region.
    pub fn is_empty(&self) -> bool {
        self.desc.len == 0
    }

    /// The sub-range `offset..offset + len`, checked.
    pub fn slice(&self, offset: u64, len: u64) -> Result<Descriptor> {
        match offset.checked_add(len) {
            Some(end) if end <= self.desc.len => Ok(Descriptor::new(
                self.desc.addr + offset,
                len,
                self.desc.device,
            )),
            _ => Err(Error::OutOfBounds(format!(
                "{offset}+{len} of a region of {} bytes",
                self.desc.len
            ))),
        }
    }

    /// The memory, for reading (and for `&self` methods of `M`).
    ///
    /// # Safety
    ///
    /// While bytes of the memory are read through the returned reference, nothing may
    /// write them: no transfer that writes them (a local READ, a peer's WRITE into a
    /// registration) is in flight, and no `write_at` runs. Read after the transfer
    /// completed or its notification arrived. Registered memory is written by backends
    /// and peers outside the compiler's view, which is why this is `unsafe`.
    pub unsafe fn memory(&self) -> &M {
        &self.mem
    }

    /// Mutable access, only while no registration or transfer holds a clone.
    pub fn memory_mut(&mut self) -> Option<&mut M> {
        Arc::get_mut(&mut self.mem)
    }

    /// How many holders (this one, clones, registrations, transfers) keep it alive.
    pub fn holders(&self) -> usize {
        Arc::strong_count(&self.mem)
    }

    /// A type-erased keep-alive handle, for registrations and transfers to hold.
    pub fn keep_alive(&self) -> Arc<dyn Memory> {
        self.mem.clone()
    }

    /// Gives the memory back if nothing else holds it; otherwise returns the region.
    pub fn into_inner(self) -> std::result::Result<M, Region<M>> {
        let desc = self.desc;
        Arc::try_unwrap(self.mem).map_err(|mem| Region { mem, desc })
    }
}

impl Region<HostBuffer> {
    /// The bytes of `offset..offset + len`, as a shared slice over that range only.
    ///
    /// # Safety
    ///
    /// While the slice lives nothing writes those bytes (see [`Region::memory`]): no
    /// transfer or peer writes into them and no `write_at` overlaps them.
    pub unsafe fn bytes(&self, offset: u64, len: u64) -> Result<&[u8]> {
        let d = self.slice(offset, len)?;
        // SAFETY: `d` lies inside our live allocation (checked by `slice`), which stays
        // alive while `self` is borrowed; no concurrent writer is the caller's promise.
        Ok(unsafe { std::slice::from_raw_parts(d.addr as *const u8, len as usize) })
    }

    /// Copies `data` into the region at `offset`.
    ///
    /// # Safety
    ///
    /// For the duration of the call nothing else reads or writes these bytes (through
    /// `read_at`, `write_at`, [`Region::bytes`], `memory().as_slice()`, a transfer, or a
    /// backend serving a peer). Region clones share the memory, so the compiler cannot
    /// check this. (A peer writing them over the network at the same time makes the
    /// result unspecified but is not a memory-safety issue for this process.)
    pub unsafe fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let d = self.slice(offset, data.len() as u64)?;
        // SAFETY: `d` lies inside our live allocation (checked by `slice`); the source
        // is a distinct Rust slice, so the ranges cannot overlap; exclusivity of the
        // destination bytes is the caller's promise.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), d.addr as *mut u8, data.len());
        }
        Ok(())
    }

    /// Copies bytes out of the region at `offset` into `out`.
    ///
    /// # Safety
    ///
    /// For the duration of the call no other thread of this process writes these bytes
    /// (see [`Region::write_at`]).
    pub unsafe fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let d = self.slice(offset, out.len() as u64)?;
        // SAFETY: as in `write_at`; no concurrent in-process writer is the caller's promise.
        unsafe {
            std::ptr::copy_nonoverlapping(d.addr as *const u8, out.as_mut_ptr(), out.len());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn into_inner_only_when_unshared() {
        let r = Region::new(HostBuffer::alloc(4096, 64).unwrap());
        let keep = r.keep_alive();
        assert_eq!(r.holders(), 2);
        let r = r.into_inner().unwrap_err();
        drop(keep);
        assert!(r.into_inner().is_ok());
    }

    #[test]
    fn slices_are_checked() {
        let r = Region::new(HostBuffer::alloc(4096, 64).unwrap());
        assert!(r.slice(4000, 96).is_ok());
        assert!(r.slice(4000, 97).is_err());
        assert!(r.slice(u64::MAX, 2).is_err());
        // SAFETY: this test is the only user of the region.
        unsafe {
            r.write_at(10, b"abc").unwrap();
            let mut out = [0u8; 3];
            r.read_at(10, &mut out).unwrap();
            assert_eq!(&out, b"abc");
            assert!(r.write_at(4095, b"ab").is_err());
        }
        // SAFETY: as above.
        unsafe {
            assert_eq!(r.bytes(10, 3).unwrap(), b"abc");
            assert!(r.bytes(4095, 2).is_err());
        }
    }

    #[test]
    fn region_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Region<HostBuffer>>();
        check::<Region<FileSegment>>();
    }
}
