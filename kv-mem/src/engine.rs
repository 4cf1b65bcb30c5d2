//! Memory the engine owns: a range kvx did not allocate (a tensor's storage, an `mmap`,
//! pinned host memory, a VRAM pointer), described by address, length, kind and device.

use std::any::Any;

use kv_core::{Descriptor, Error, MemKind, Result};

use crate::host::{shared_backing, SharedBacking};
use crate::Memory;

/// A range of memory that kvx did not allocate, wrapped so it can back a
/// [`Region`](crate::Region) and be registered. Optionally holds an owner (the tensor,
/// the allocation) that is dropped exactly when kvx lets go of the memory.
///
/// `Send + Sync`: it holds an address, not a reference, and an owner that is
/// `Send + Sync`.
pub struct EngineMemory {
    desc: Descriptor,
    kind: MemKind,
    _owner: Option<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for EngineMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineMemory")
            .field("kind", &self.kind)
            .field("addr", &format_args!("{:#x}", self.desc.addr))
            .field("len", &self.desc.len)
            .field("device", &self.desc.device)
            .field("owned", &self._owner.is_some())
            .finish()
    }
}

impl EngineMemory {
    /// Wraps `len` bytes at `addr` of `kind` on `device` (GPU ordinal for VRAM, 0 for
    /// host memory). Fails with [`Error::InvalidArgument`] for an empty, null or
    /// overflowing range.
    ///
    /// # Safety
    ///
    /// The range must stay valid for reads and writes — mapped (or allocated on the
    /// device), not freed, not moved — until this value is dropped. kvx drops it when
    /// the last holder lets go: the `Region` that wraps it, every `Registration` of it
    /// and every posted transfer that names it (`Region::into_inner` returning `Ok`
    /// proves nothing holds it any more). Peers and devices write into registered
    /// memory outside the compiler's view: the engine reads those bytes only after the
    /// transfer that writes them completed or its notification arrived. Use
    /// [`EngineMemory::with_owner`] to tie the allocation's lifetime to this value.
    pub unsafe fn new(addr: u64, len: u64, kind: MemKind, device: u32) -> Result<EngineMemory> {
        let desc = Descriptor::new(addr, len, device);
        if len == 0 || addr == 0 || desc.end().is_none() {
            return Err(Error::invalid_argument(format!(
                "engine memory {addr:#x}+{len} is empty, null or overflows"
            )));
        }
        Ok(EngineMemory {
            desc,
            kind,
            _owner: None,
        })
    }

    /// Like [`EngineMemory::new`], and keeps `owner` (the tensor or allocation the range
    /// lies in) alive until kvx lets go of the memory, then drops it.
    ///
    /// # Safety
    ///
    /// As for [`EngineMemory::new`]; it is met when the range lies in memory that
    /// `owner` keeps valid, at a fixed address, for as long as `owner` lives.
    pub unsafe fn with_owner<O: Send + Sync + 'static>(
        owner: O,
        addr: u64,
        len: u64,
        kind: MemKind,
        device: u32,
    ) -> Result<EngineMemory> {
        // SAFETY: forwarded to our caller.
        let mut m = unsafe { Self::new(addr, len, kind, device)? };
        m._owner = Some(Box::new(owner));
        Ok(m)
    }

    /// The whole range.
    pub fn descriptor(&self) -> Descriptor {
        self.desc
    }

    /// The memfd behind the range when it lies in memory allocated from a
    /// [`SharedArena`](crate::SharedArena) or a shared [`HostBuffer`](crate::HostBuffer):
    /// same-host peers then map it instead of copying through the kernel.
    pub fn shared_backing(&self) -> Option<SharedBacking> {
        (self.kind == MemKind::Dram)
            .then(|| shared_backing(&self.desc))
            .flatten()
    }
}

// SAFETY: the caller of `new`/`with_owner` promised the range stays valid for reads and
// writes, at a fixed address, until this value is dropped.
unsafe impl Memory for EngineMemory {
    fn kind(&self) -> MemKind {
        self.kind
    }
    fn descriptor(&self) -> Descriptor {
        self.desc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HostBuffer, Region};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn wraps_a_range_and_drops_its_owner_with_the_last_holder() {
        struct Owner {
            _buf: Vec<u8>,
            dropped: Arc<AtomicBool>,
        }
        impl Drop for Owner {
            fn drop(&mut self) {
                self.dropped.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let v = vec![7u8; 4096];
        let addr = v.as_ptr() as u64;
        // SAFETY: the range lies in `v`, which the owner keeps alive and never moves
        // (a Vec's heap buffer stays put when the Vec itself is moved).
        let m = unsafe {
            let owner = Owner {
                _buf: v,
                dropped: dropped.clone(),
            };
            EngineMemory::with_owner(owner, addr, 4096, MemKind::Dram, 0)
        }
        .unwrap();
        assert_eq!(m.descriptor(), Descriptor::new(addr, 4096, 0));
        assert!(
            m.shared_backing().is_none(),
            "heap memory is not memfd-backed"
        );
        let r = Region::new(m);
        let keep = r.keep_alive();
        drop(r);
        assert!(!dropped.load(Ordering::SeqCst));
        drop(keep);
        assert!(dropped.load(Ordering::SeqCst));
        for (addr, len) in [(0u64, 10u64), (4096, 0), (u64::MAX - 1, 10)] {
            // SAFETY: refused before anything could touch it.
            assert!(unsafe { EngineMemory::new(addr, len, MemKind::Dram, 0) }.is_err());
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri supports neither memfd_create nor MAP_SHARED")]
    fn memfd_backing_is_found_for_engine_ranges_inside_shared_buffers() {
        let b = HostBuffer::shared(1 << 20).unwrap();
        let d = b.descriptor();
        // SAFETY: the range lies in `b`, which outlives `m` in this test.
        let m = unsafe { EngineMemory::new(d.addr + 8192, 4096, MemKind::Dram, 0) }.unwrap();
        let s = m.shared_backing().unwrap();
        assert_eq!((s.offset, s.len), (8192, 1 << 20));
        // SAFETY: never dereferenced (VRAM kinds are not looked up).
        let v = unsafe { EngineMemory::new(d.addr, 4096, MemKind::Vram, 0) }.unwrap();
        assert!(v.shared_backing().is_none());
    }

    #[test]
    fn engine_and_arena_memory_are_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<EngineMemory>();
        check::<Region<EngineMemory>>();
        check::<crate::SharedArena>();
        check::<crate::ArenaBuffer>();
    }
}
