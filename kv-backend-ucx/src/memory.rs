//! Local registrations (`ucp_mem_map` of the caller's memory, or of memory UCX
//! allocated: [`UcxHostMemory`]) and imported remote registrations (unpacked rkeys),
//! the [`Memory`] tables that hold them, and the range checks that guard both.

use std::ffi::c_void;
use std::sync::Arc;

use bytes::Bytes;
use kv_core::{Descriptor, DescriptorList, Entry, Error, MemKind, Result};

use crate::ffi::{self, ucp_mem_h, ucp_rkey_h, Lib};
use crate::ids::{new_instance_id, IdMap};
use crate::wire::RemoteKey;

/// What a [`UcxHostMemory`] needs from the backend that allocated it (the backend's
/// core): the allocation, and its release when the memory drops.
pub trait HostAllocator: Send + Sync {
    /// `len` bytes allocated by UCX, zeroed: the allocation's id and range.
    fn alloc_host(&self, len: usize) -> Result<(u64, Descriptor)>;
    /// The owner of allocation `id` is gone: unmap it now, or when the last
    /// registration that reuses it is deregistered.
    fn free_host(&self, id: u64);
}

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
    core: Arc<dyn HostAllocator>,
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
    pub(crate) fn new(core: Arc<dyn HostAllocator>, len: usize) -> Result<UcxHostMemory> {
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

/// What a post needs of one import: its range, the unpacked rkey, the peer
/// registration's key id and base (for WRITEs sent as active messages).
pub type RemoteRef = (Descriptor, ucp_rkey_h, u64, u64);

/// The backend's registrations, UCX allocations and imports. Only touched under the
/// core's state lock.
#[derive(Default)]
pub struct Memory {
    /// Local registrations by id.
    pub regs: IdMap<Registration>,
    /// Memory UCX allocated, by id.
    pub allocs: IdMap<HostAlloc>,
    /// Imported remote registrations by id.
    pub remotes: IdMap<Remote>,
}

impl Memory {
    /// Registers `desc` (host memory) under `id` in context `ctx`; returns the key id
    /// peers' WRITEs sent as active messages will name.
    pub fn register(
        &mut self,
        lib: &Lib,
        ctx: ffi::ucp_context_h,
        desc: &Descriptor,
        id: u64,
    ) -> Result<u64> {
        // Memory from `alloc_host` keeps its own handle: packing that one gives peers a
        // key to UCX's shared-memory mapping (a direct copy instead of emulated RMA).
        let owner = self
            .allocs
            .iter()
            .find(|(_, a)| !a.dropped && a.desc.contains(desc))
            .map(|(id, a)| (*id, a.memh));
        let key_id = new_instance_id();
        if let Some((aid, memh)) = owner {
            let key = pack(lib, ctx, memh, desc, key_id)?;
            if let Some(a) = self.allocs.get_mut(&aid) {
                a.users += 1;
            }
            self.regs.insert(
                id,
                Registration {
                    memh,
                    alloc: Some(aid),
                    desc: *desc,
                    key,
                    key_id,
                    busy: 0,
                },
            );
            return Ok(key_id);
        }
        let mp = ffi::ucp_mem_map_params_t {
            field_mask: ffi::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | ffi::UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | ffi::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE,
            address: desc.addr as usize as *mut c_void,
            length: desc.len as usize,
            // No UCP_MEM_MAP_ALLOCATE: map the caller's existing memory.
            flags: 0,
            prot: 0,
            memory_type: ffi::UCS_MEMORY_TYPE_HOST,
        };
        let mut memh: ffi::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: the caller of `Backend::register` promised the range is valid memory
        // until deregister; params and out-pointer are valid.
        lib.check("ucp_mem_map", unsafe { (lib.mem_map)(ctx, &mp, &mut memh) })?;
        let key = match pack(lib, ctx, memh, desc, key_id) {
            Ok(k) => k,
            Err(e) => {
                // SAFETY: unmapping the handle mapped above; nothing uses it yet.
                unsafe { (lib.mem_unmap)(ctx, memh) };
                return Err(e);
            }
        };
        self.regs.insert(
            id,
            Registration {
                memh,
                alloc: None,
                desc: *desc,
                key,
                key_id,
                busy: 0,
            },
        );
        Ok(key_id)
    }

    /// `len` bytes allocated by UCX (`UCP_MEM_MAP_ALLOCATE`) in context `ctx`, zeroed,
    /// recorded under `id`; returns the range.
    pub fn alloc_host(
        &mut self,
        lib: &Lib,
        ctx: ffi::ucp_context_h,
        len: usize,
        id: u64,
    ) -> Result<Descriptor> {
        let mp = ffi::ucp_mem_map_params_t {
            field_mask: ffi::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | ffi::UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | ffi::UCP_MEM_MAP_PARAM_FIELD_FLAGS
                | ffi::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE,
            address: std::ptr::null_mut(),
            length: len,
            flags: ffi::UCP_MEM_MAP_ALLOCATE,
            prot: 0,
            memory_type: ffi::UCS_MEMORY_TYPE_HOST,
        };
        let mut memh: ffi::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: valid context, params and out-pointer; UCX allocates the memory.
        lib.check("ucp_mem_map(ALLOCATE)", unsafe {
            (lib.mem_map)(ctx, &mp, &mut memh)
        })?;
        let mut attr = ffi::ucp_mem_attr_t {
            field_mask: ffi::UCP_MEM_ATTR_FIELD_ADDRESS | ffi::UCP_MEM_ATTR_FIELD_LENGTH,
            address: std::ptr::null_mut(),
            length: 0,
            mem_type: 0,
        };
        // SAFETY: the handle mapped above; valid attribute struct.
        let s = unsafe { (lib.mem_query)(memh, &mut attr) };
        if s != ffi::UCS_OK || attr.address.is_null() || attr.length < len {
            // SAFETY: releasing the allocation made above, once; nothing else has it.
            unsafe { (lib.mem_unmap)(ctx, memh) };
            return Err(if s != ffi::UCS_OK {
                lib.error("ucp_mem_query", s)
            } else {
                Error::Backend {
                    name: "ucx".into(),
                    code: 0,
                    message: format!(
                        "ucp_mem_map(ALLOCATE) returned {} bytes at {:?} for {len}",
                        attr.length, attr.address
                    ),
                }
            });
        }
        // SAFETY: UCX allocated at least `len` writable bytes at `attr.address`; zeroing
        // them makes every byte initialised whatever allocator UCX picked.
        unsafe { std::ptr::write_bytes(attr.address as *mut u8, 0, len) };
        let desc = Descriptor::new(attr.address as usize as u64, len as u64, 0);
        self.allocs.insert(
            id,
            HostAlloc {
                memh,
                desc,
                users: 0,
                dropped: false,
            },
        );
        Ok(desc)
    }

    /// The owner of allocation `id` is gone: unmap it now, or when the last
    /// registration that reuses it is deregistered.
    pub fn free_host(&mut self, lib: &Lib, ctx: ffi::ucp_context_h, id: u64) {
        let Some(a) = self.allocs.get_mut(&id) else {
            return;
        };
        a.dropped = true;
        if a.users == 0 {
            let memh = a.memh;
            self.allocs.remove(&id);
            // SAFETY: no registration uses the handle, so no transfer can touch the
            // memory; the allocation is unmapped (freed) once.
            unsafe { (lib.mem_unmap)(ctx, memh) };
        } else {
            tracing::warn!(
                "ucx: memory from alloc_host dropped while registered; freed at deregister"
            );
        }
    }

    /// Deregisters `id` unless a posted transfer names it; `release_target` (given the
    /// key id) must first stop peers' WRITEs from landing in it, or refuse.
    pub fn deregister(
        &mut self,
        lib: &Lib,
        ctx: ffi::ucp_context_h,
        id: u64,
        release_target: impl FnOnce(u64) -> Result<()>,
    ) -> Result<()> {
        let r = self
            .regs
            .get(&id)
            .ok_or_else(|| Error::NotRegistered(format!("RegistrationId#{id}")))?;
        if r.busy > 0 {
            return Err(Error::Busy(format!(
                "RegistrationId#{id} is named by {} posted transfer(s); wait for them or cancel them first",
                r.busy
            )));
        }
        let (memh, alloc, key_id) = (r.memh, r.alloc, r.key_id);
        release_target(key_id)?;
        self.regs.remove(&id);
        if let Some(aid) = alloc {
            // The handle belongs to the allocation; free it only if its owner is gone
            // and this was the last registration on it.
            let Some(a) = self.allocs.get_mut(&aid) else {
                return Ok(());
            };
            a.users = a.users.saturating_sub(1);
            if !(a.dropped && a.users == 0) {
                return Ok(());
            }
            self.allocs.remove(&aid);
        }
        // SAFETY: no posted transfer names the registration (busy == 0), so UCX has no
        // operation on it in flight; the handle is unmapped once (a shared allocation
        // handle only after its owner and every other registration let go).
        lib.check("ucp_mem_unmap", unsafe { (lib.mem_unmap)(ctx, memh) })
    }

    /// The remote key of registration `id`.
    pub fn remote_key(&self, id: u64) -> Result<Bytes> {
        self.regs
            .get(&id)
            .map(|r| r.key.clone())
            .ok_or_else(|| Error::NotRegistered(format!("RegistrationId#{id}")))
    }

    /// Removes import `id` unless a posted transfer uses it; returns it (its rkey is
    /// the endpoint's to release).
    pub fn remove_import(&mut self, id: u64) -> Result<Option<Remote>> {
        let r = self
            .remotes
            .get(&id)
            .ok_or_else(|| Error::NotRegistered(format!("RemoteId#{id}")))?;
        if r.busy > 0 {
            return Err(Error::Busy(format!(
                "RemoteId#{id} is used by {} posted transfer(s)",
                r.busy
            )));
        }
        Ok(self.remotes.remove(&id))
    }

    /// Forgets every import made on endpoint `endpoint` (it is being disconnected).
    pub fn forget_imports(&mut self, endpoint: u64) {
        let rids: Vec<u64> = self
            .remotes
            .iter()
            .filter(|(_, r)| r.endpoint == endpoint)
            .map(|(k, _)| *k)
            .collect();
        for r in rids {
            self.remotes.remove(&r);
        }
    }

    /// The registrations that hold every descriptor of `local` (checked once, at
    /// prepare).
    pub fn local_cover(&self, local: &DescriptorList) -> Result<Vec<u64>> {
        let (lids, ldescs): (Vec<u64>, Vec<Descriptor>) =
            self.regs.iter().map(|(i, r)| (*i, r.desc)).unzip();
        Ok(covering(local, &ldescs)
            .ok_or_else(|| {
                Error::NotRegistered(
                    "a local descriptor lies outside every local registration".into(),
                )
            })?
            .into_iter()
            .map(|i| lids[i])
            .collect())
    }

    /// The imports on `endpoint` (peer `peer_name`) that hold every descriptor of
    /// `remote`, and their ranges.
    pub fn remote_cover(
        &self,
        endpoint: u64,
        peer_name: &str,
        remote: &DescriptorList,
    ) -> Result<(Vec<u64>, Vec<Descriptor>)> {
        let (rids, rdescs): (Vec<u64>, Vec<Descriptor>) = self
            .remotes
            .iter()
            .filter(|(_, r)| r.endpoint == endpoint)
            .map(|(i, r)| (*i, r.desc))
            .unzip();
        let remote_ids = covering(remote, &rdescs)
            .ok_or_else(|| {
                Error::OutOfBounds(format!(
                    "a remote descriptor lies outside what {peer_name} registered and we imported"
                ))
            })?
            .into_iter()
            .map(|i| rids[i])
            .collect::<Vec<u64>>();
        let ranges: Vec<Descriptor> = remote_ids
            .iter()
            .filter_map(|r| self.remotes.get(r).map(|r| r.desc))
            .collect();
        Ok((remote_ids, ranges))
    }

    /// Refuses a post of transfer `tid` when one of its registrations `regs` is gone.
    #[inline]
    pub fn check_local(&self, regs: &[u64], tid: u64) -> Result<()> {
        for r in regs {
            if !self.regs.contains_key(r) {
                return Err(Error::NotRegistered(format!(
                    "RegistrationId#{r} named by TransferId#{tid} was deregistered"
                )));
            }
        }
        Ok(())
    }

    /// What a post of transfer `tid` needs of its imports `ids` (in order); refuses
    /// when one was released.
    #[inline]
    pub fn rkeys(&self, ids: &[u64], tid: u64) -> Result<Vec<RemoteRef>> {
        let mut rkeys: Vec<RemoteRef> = Vec::with_capacity(ids.len());
        for r in ids {
            let rem = self.remotes.get(r).ok_or_else(|| {
                Error::NotRegistered(format!(
                    "RemoteId#{r} named by TransferId#{tid} was released"
                ))
            })?;
            rkeys.push((rem.desc, rem.rkey, rem.key_id, rem.key_base));
        }
        Ok(rkeys)
    }

    /// Marks registrations and imports busy for one more posted transfer.
    #[inline(always)]
    pub fn hold(&mut self, regs: &[u64], remotes: &[u64]) {
        for r in regs {
            if let Some(r) = self.regs.get_mut(r) {
                r.busy += 1;
            }
        }
        for r in remotes {
            if let Some(r) = self.remotes.get_mut(r) {
                r.busy += 1;
            }
        }
    }

    /// Undoes one [`Memory::hold`].
    #[inline(always)]
    pub fn release(&mut self, regs: &[u64], remotes: &[u64]) {
        for r in regs {
            if let Some(r) = self.regs.get_mut(r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
        for r in remotes {
            if let Some(r) = self.remotes.get_mut(r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
    }
}

/// Packs `memh`'s rkey into our envelope for the range `desc`.
fn pack(
    lib: &Lib,
    ctx: ffi::ucp_context_h,
    memh: ffi::ucp_mem_h,
    desc: &Descriptor,
    key_id: u64,
) -> Result<Bytes> {
    let mut buf: *mut c_void = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: valid context and memory handle; out-pointers valid.
    lib.check("ucp_rkey_pack", unsafe {
        (lib.rkey_pack)(ctx, memh, &mut buf, &mut len)
    })?;
    // SAFETY: UCX returned `len` readable bytes at `buf`.
    let rkey = unsafe { std::slice::from_raw_parts(buf as *const u8, len) }.to_vec();
    // SAFETY: releasing the packed buffer obtained above, once.
    unsafe { (lib.rkey_buffer_release)(buf) };
    Ok(Bytes::from(
        RemoteKey {
            range: *desc,
            key_id,
            rkey,
        }
        .encode()?,
    ))
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
        let l = DescriptorList::try_from_iter([
            Descriptor::new(10, 10, 0),
            Descriptor::new(250, 10, 0),
        ])
        .unwrap();
        assert_eq!(covering(&l, &ranges), Some(vec![0, 1]));
        // A strided run whose extent straddles the gap but whose pieces do not.
        let s = DescriptorList::strided(0, 200, 2, 50, 0).unwrap();
        assert_eq!(covering(&s, &ranges), Some(vec![0, 1]));
        let out = DescriptorList::single(Descriptor::new(90, 20, 0)).unwrap();
        assert_eq!(covering(&out, &ranges), None);
        let other_dev = DescriptorList::single(Descriptor::new(10, 1, 1)).unwrap();
        assert_eq!(covering(&other_dev, &ranges), None);
    }
}
