//! Local registrations (`ucp_mem_map` of the caller's memory) and imported remote
//! registrations (unpacked rkeys), plus the range checks that guard both.

use std::sync::Arc;

use bytes::Bytes;
use kv_core::{Descriptor, DescriptorList, Entry, MemKind};

use crate::ffi::{ucp_mem_h, ucp_rkey_h};
use crate::worker::Core;

/// Host memory allocated by UCX for one backend ([`crate::UcxBackend::alloc_host`]):
/// `ucp_mem_map` with `UCP_MEM_MAP_ALLOCATE`, so with shared-memory transports it is a
/// posix (or sysv) shared mapping that a peer's puts and gets reach with a plain copy,
/// instead of UCX 1.13's software-emulated RMA through the target's worker.
///
/// Register it (or any part of it) with the backend that allocated it: the registration
/// reuses the allocation's UCX handle. Freed with `ucp_mem_unmap` on drop (or, if still
/// registered, at the last `deregister`). Zeroed when allocated. Keeps the backend's UCX
/// context alive while it lives. `Send + Sync`.
pub struct UcxHostMemory {
    core: Arc<Core>,
    id: u64,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is to memory this value owns (UCX frees it only after the value is
// dropped); sharing it is as safe as sharing a `HostBuffer`.
unsafe impl Send for UcxHostMemory {}
// SAFETY: as above; `&self` methods only read.
unsafe impl Sync for UcxHostMemory {}

impl UcxHostMemory {
    pub(crate) fn new(core: Arc<Core>, len: usize) -> kv_core::Result<UcxHostMemory> {
        let (id, desc) = core.alloc_host(len)?;
        Ok(UcxHostMemory {
            core,
            id,
            ptr: desc.addr as usize as *mut u8,
            len,
        })
    }

    /// Start of the memory.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Start of the memory, writable.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (zero-length allocations are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes (peers may write them while a transfer runs, as with any registered
    /// memory).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised (zeroed at allocation) bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The whole range (device 0).
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.ptr as usize as u64, self.len as u64, 0)
    }
}

impl std::fmt::Debug for UcxHostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxHostMemory")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: UCX-allocated memory at a fixed address, valid until drop (see `Drop`).
unsafe impl kv_mem::Memory for UcxHostMemory {
    fn kind(&self) -> MemKind {
        MemKind::Dram
    }
    fn descriptor(&self) -> Descriptor {
        UcxHostMemory::descriptor(self)
    }
}

impl Drop for UcxHostMemory {
    fn drop(&mut self) {
        self.core.free_host(self.id);
    }
}

/// A local registration: the UCX memory handle over the caller's range and the remote
/// key peers need to address it.
pub struct Registration {
    /// `ucp_mem_map` handle: mapped over the caller's memory, or (when `alloc` is set)
    /// the handle of a [`HostAlloc`] that the registration borrows.
    pub memh: ucp_mem_h,
    /// The [`HostAlloc`] whose handle this registration reuses (not unmapped with it).
    pub alloc: Option<u64>,
    /// The registered range.
    pub desc: Descriptor,
    /// The encoded remote key ([`crate::wire::RemoteKey`]).
    pub key: Bytes,
    /// The random id in that key, which WRITEs sent as active messages name.
    pub key_id: u64,
    /// Posted transfers that name this registration; deregistering waits for zero.
    pub busy: usize,
}

/// Memory UCX allocated (`UCP_MEM_MAP_ALLOCATE`, posix/sysv shared memory where the
/// context has those transports), owned by a `crate::UcxHostMemory`.
pub struct HostAlloc {
    /// The handle that owns the memory; `ucp_mem_unmap` frees it.
    pub memh: ucp_mem_h,
    /// Where UCX put it.
    pub desc: Descriptor,
    /// Registrations that reuse `memh`.
    pub users: usize,
    /// The owner was dropped; unmap when `users` reaches zero.
    pub dropped: bool,
}

/// A peer's registration imported on one endpoint.
pub struct Remote {
    /// The endpoint it was imported on.
    pub endpoint: u64,
    /// The range the peer registered (what transfers are checked against).
    pub desc: Descriptor,
    /// The packed rkey bytes (key into the endpoint's rkey cache).
    pub packed: Vec<u8>,
    /// The unpacked rkey (shared through the cache).
    pub rkey: ucp_rkey_h,
    /// The peer registration's key id (named by WRITEs sent as active messages).
    pub key_id: u64,
    /// Start of the peer's whole registration (offsets in those WRITEs count from it).
    pub key_base: u64,
    /// Posted transfers that use this rkey; releasing waits for zero.
    pub busy: usize,
}

/// For every descriptor of `list`, finds a range of `ranges` that holds it; returns the
/// indices of the ranges used (sorted, deduplicated) or `None` if some descriptor lies
/// outside every range. Strided runs are checked by their extent first, one by one only
/// when the extent straddles ranges.
pub fn covering(list: &DescriptorList, ranges: &[Descriptor]) -> Option<Vec<usize>> {
    let mut used = Vec::new();
    let find = |d: &Descriptor| ranges.iter().position(|r| r.contains(d));
    for e in list.entries() {
        match e.extent().and_then(|x| find(&x)) {
            Some(i) => used.push(i),
            None => match *e {
                Entry::Single(_) => return None,
                Entry::Strided { count, .. } => {
                    for i in 0..count {
                        let d = e.get(i)?;
                        used.push(find(&d)?);
                    }
                }
            },
        }
    }
    used.sort_unstable();
    used.dedup();
    Some(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_finds_ranges_and_refuses_outside() {
        let ranges = [Descriptor::new(0, 100, 0), Descriptor::new(200, 100, 0)];
        let l: DescriptorList = [Descriptor::new(10, 10, 0), Descriptor::new(250, 10, 0)]
            .into_iter()
            .collect();
        assert_eq!(covering(&l, &ranges), Some(vec![0, 1]));
        // A strided run whose extent straddles the gap but whose pieces do not.
        let s = DescriptorList::strided(0, 200, 2, 50, 0).unwrap();
        assert_eq!(covering(&s, &ranges), Some(vec![0, 1]));
        let out = DescriptorList::single(Descriptor::new(90, 20, 0));
        assert_eq!(covering(&out, &ranges), None);
        let other_dev = DescriptorList::single(Descriptor::new(10, 1, 1));
        assert_eq!(covering(&other_dev, &ranges), None);
    }
}
