//! Local registrations (the caller's memory, or memory UCX allocated:
//! [`UcxHostMemory`]), each with its access and random key id, imported remote
//! registrations, the [`Memory`] tables that hold them, and the range checks that guard
//! both. Peers never get a UCX handle to our memory: their operations name a key id
//! that the target side (`crate::serve`) checks.

use std::sync::Arc;

use bytes::Bytes;
use kv_core::{Access, Descriptor, DescriptorList, Entry, Error, MemKind, Result};

use crate::ffi::{self, ucp_mem_h, Lib};
use crate::ids::IdMap;
use crate::wire::{MapSrc, RemoteKey, MAX_PACKED_RKEY};

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
/// `ucp_mem_map` with `UCP_MEM_MAP_ALLOCATE` (posix or sysv shared memory with
/// shared-memory transports). Peers reach it like any registered memory: through
/// operations this backend's target side checks.
///
/// Register it (or any part of it) with the backend that allocated it. Freed with
/// `ucp_mem_unmap` on drop (or, if still registered, at the last `deregister`). Zeroed
/// when allocated. Keeps the backend's UCX context alive while it lives. `Send + Sync`.
///
/// While it is registered read-write, a peer may WRITE into it at any time, so the
/// slice views are `unsafe`; [`UcxHostMemory::to_vec`] copies.
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

    /// A copy of the bytes (peers may be writing them meanwhile: the copy is a
    /// snapshot).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: `len` initialised (zeroed at allocation) bytes owned by `self`; a
        // byte copy through raw pointers creates no reference that a concurrent peer
        // write could invalidate.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, v.as_mut_ptr(), self.len) };
        v
    }

    /// The bytes.
    ///
    /// # Safety
    /// No peer may WRITE into the memory, and no READ may land in it, while the slice
    /// lives (register it read-only, or have no transfer naming it).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised (zeroed at allocation) bytes owned by `self`; the
        // caller rules out concurrent writers.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable.
    ///
    /// # Safety
    /// As [`UcxHostMemory::as_slice`]: nothing else writes or reads the memory through
    /// a transfer while the slice lives.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` is exclusive in this process.
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

/// A local registration: its range, access and the remote key peers need to name it.
pub struct Registration {
    /// The [`HostAlloc`] it lies in, if any (that allocation is freed only after its
    /// last registration is gone).
    pub alloc: Option<u64>,
    /// The registered range.
    pub desc: Descriptor,
    /// Whether peers may WRITE it (and READs may land in it).
    pub access: Access,
    /// The encoded remote key ([`crate::wire::RemoteKey`]).
    pub key: Bytes,
    /// The 128 random bits in that key, which peers' operations name.
    pub key_id: u128,
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
    /// Registrations that lie in it.
    pub users: usize,
    /// The owner was dropped; unmap when `users` reaches zero.
    pub dropped: bool,
    /// What a target on this host needs to map it (mapped operations), when UCX could
    /// pack a key for it.
    pub map: Option<MapSrc>,
}

/// A peer's registration imported on one endpoint.
pub struct Remote {
    /// The endpoint it was imported on.
    pub endpoint: u64,
    /// The range imported (inside what the peer registered).
    pub desc: Descriptor,
    /// The peer registration's key id (named by every operation).
    pub key_id: u128,
    /// Start of the peer's whole registration (operations' offsets count from it).
    pub key_base: u64,
    /// What the peer allows (a WRITE into a read-only import is refused at prepare).
    pub access: Access,
    /// Posted transfers that use it; releasing waits for zero.
    pub busy: usize,
}

/// What a post needs of one import.
#[derive(Debug, Clone, Copy)]
pub struct Import {
    /// The imported range.
    pub desc: Descriptor,
    /// The peer registration's key id.
    pub key_id: u128,
    /// Start of the peer's registration.
    pub key_base: u64,
}

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
    /// Registers `desc` (host memory) with `access` under `id`; returns the new
    /// registration's key id (128 random bits from the OS).
    pub fn register(&mut self, desc: &Descriptor, access: Access, id: u64) -> Result<u128> {
        let key_id = kv_core::auth::random_u128()?.max(1);
        let owner = self
            .allocs
            .iter_mut()
            .find(|(_, a)| !a.dropped && a.desc.contains(desc))
            .map(|(id, a)| {
                a.users += 1;
                *id
            });
        let key = RemoteKey {
            range: *desc,
            key_id,
            access,
        };
        self.regs.insert(
            id,
            Registration {
                alloc: owner,
                desc: *desc,
                access,
                key: Bytes::from(key.encode()),
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
        // Names the allocation in mapped operations (never reused: a target's cached
        // mapping of an earlier allocation is never taken for this one).
        let map_id = kv_core::auth::random_u128()? as u64;
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
        let map = pack_key(lib, ctx, memh).map(|rkey| MapSrc {
            id: map_id,
            base: desc.addr,
            len: desc.len,
            rkey,
        });
        self.allocs.insert(
            id,
            HostAlloc {
                memh,
                desc,
                users: 0,
                dropped: false,
                map,
            },
        );
        Ok(desc)
    }

    /// The allocation every one of registrations `regs` lies in, as a mapped
    /// operation names it; `None` when they are not all in one allocation UCX packed a
    /// key for.
    pub fn map_src(&self, regs: &[u64]) -> Option<&MapSrc> {
        let mut alloc = None;
        for id in regs {
            let a = self.regs.get(id)?.alloc?;
            if alloc.is_some_and(|x| x != a) {
                return None;
            }
            alloc = Some(a);
        }
        self.allocs.get(&alloc?)?.map.as_ref()
    }

    /// The owner of allocation `id` is gone: unmap it now, or when the last
    /// registration in it is deregistered.
    pub fn free_host(&mut self, lib: &Lib, ctx: ffi::ucp_context_h, id: u64) {
        let Some(a) = self.allocs.get_mut(&id) else {
            return;
        };
        a.dropped = true;
        if a.users == 0 {
            let memh = a.memh;
            self.allocs.remove(&id);
            // SAFETY: no registration lies in it, so no transfer or peer can touch the
            // memory; the allocation is unmapped (freed) once.
            unsafe { (lib.mem_unmap)(ctx, memh) };
        } else {
            tracing::warn!(
                "ucx: memory from alloc_host dropped while registered; freed at deregister"
            );
        }
    }

    /// The key id of registration `id`, unless a posted transfer names it.
    pub fn key_of_idle(&self, id: u64) -> Result<u128> {
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
        Ok(r.key_id)
    }

    /// Forgets registration `id` (peers can no longer name it: the caller removed its
    /// target first); unmaps its allocation if that was the last use of a dropped one.
    pub fn remove_reg(&mut self, lib: &Lib, ctx: ffi::ucp_context_h, id: u64) -> Result<()> {
        let Some(r) = self.regs.remove(&id) else {
            return Ok(());
        };
        let Some(aid) = r.alloc else {
            return Ok(());
        };
        let Some(a) = self.allocs.get_mut(&aid) else {
            return Ok(());
        };
        a.users = a.users.saturating_sub(1);
        if !(a.dropped && a.users == 0) {
            return Ok(());
        }
        let memh = a.memh;
        self.allocs.remove(&aid);
        // SAFETY: the owner is gone and no registration lies in the allocation any more
        // (no transfer or peer operation can touch it); unmapped once.
        lib.check("ucp_mem_unmap", unsafe { (lib.mem_unmap)(ctx, memh) })
    }

    /// The remote key of registration `id`.
    pub fn remote_key(&self, id: u64) -> Result<Bytes> {
        self.regs
            .get(&id)
            .map(|r| r.key.clone())
            .ok_or_else(|| Error::NotRegistered(format!("RegistrationId#{id}")))
    }

    /// Removes import `id` unless a posted transfer uses it.
    pub fn remove_import(&mut self, id: u64) -> Result<()> {
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
        self.remotes.remove(&id);
        Ok(())
    }

    /// Forgets every import made on endpoint `endpoint` (it is being disconnected).
    pub fn forget_imports(&mut self, endpoint: u64) {
        self.remotes
            .retain(|_, r| r.endpoint != endpoint || r.busy > 0);
    }

    /// The registrations that hold every descriptor of `local` (checked once, at
    /// prepare); `AccessDenied` when `write` (a READ lands there) and one is read-only.
    pub fn local_cover(&self, local: &DescriptorList, write: bool) -> Result<Vec<u64>> {
        let (lids, ldescs): (Vec<u64>, Vec<Descriptor>) =
            self.regs.iter().map(|(i, r)| (*i, r.desc)).unzip();
        let ids: Vec<u64> = covering(local, &ldescs)
            .ok_or_else(|| {
                Error::NotRegistered(
                    "a local descriptor lies outside every local registration".into(),
                )
            })?
            .into_iter()
            .map(|i| lids[i])
            .collect();
        if write {
            if let Some(id) = ids
                .iter()
                .find(|i| self.regs.get(i).is_some_and(|r| !r.access.writable()))
            {
                return Err(Error::AccessDenied(format!(
                    "RegistrationId#{id} is read-only: it cannot be a READ's destination"
                )));
            }
        }
        Ok(ids)
    }

    /// The imports on `endpoint` (peer `peer_name`) that hold every descriptor of
    /// `remote`, and their ranges; `AccessDenied` when `write` and one is read-only.
    pub fn remote_cover(
        &self,
        endpoint: u64,
        peer_name: &str,
        remote: &DescriptorList,
        write: bool,
    ) -> Result<(Vec<u64>, Vec<Descriptor>)> {
        // Newest import first: when the peer re-registered memory at the same address
        // (and the old import was never released), the newest key is the live one.
        let mut mine: Vec<(u64, Descriptor)> = self
            .remotes
            .iter()
            .filter(|(_, r)| r.endpoint == endpoint)
            .map(|(i, r)| (*i, r.desc))
            .collect();
        mine.sort_unstable_by_key(|m| std::cmp::Reverse(m.0));
        let (rids, rdescs): (Vec<u64>, Vec<Descriptor>) = mine.into_iter().unzip();
        let remote_ids = covering(remote, &rdescs)
            .ok_or_else(|| {
                Error::OutOfBounds(format!(
                    "a remote descriptor lies outside what {peer_name} registered and we imported"
                ))
            })?
            .into_iter()
            .map(|i| rids[i])
            .collect::<Vec<u64>>();
        if write
            && remote_ids
                .iter()
                .any(|r| self.remotes.get(r).is_some_and(|r| !r.access.writable()))
        {
            return Err(Error::AccessDenied(format!(
                "{peer_name} registered that memory read-only: it cannot be written"
            )));
        }
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

    /// Refuses a post of transfer `tid` when one of its imports `ids` was released.
    #[inline]
    pub fn check_imports(&self, ids: &[u64], tid: u64) -> Result<()> {
        ids.iter()
            .try_for_each(|r| self.import(*r, tid).map(|_| ()))
    }

    /// Import `r` of transfer `tid`, or why not.
    fn import(&self, r: u64, tid: u64) -> Result<&Remote> {
        self.remotes.get(&r).ok_or_else(|| {
            Error::NotRegistered(format!(
                "RemoteId#{r} named by TransferId#{tid} was released"
            ))
        })
    }

    /// What a post of transfer `tid` needs of its imports `ids` (in order); refuses
    /// when one was released.
    #[inline]
    pub fn imports(&self, ids: &[u64], tid: u64) -> Result<Vec<Import>> {
        ids.iter()
            .map(|r| {
                let rem = self.import(*r, tid)?;
                Ok(Import {
                    desc: rem.desc,
                    key_id: rem.key_id,
                    key_base: rem.key_base,
                })
            })
            .collect()
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

/// `ucp_rkey_pack` of `memh`, copied; `None` (mapped operations off for it) when UCX
/// cannot pack one or it is longer than a header may carry.
fn pack_key(lib: &Lib, ctx: ffi::ucp_context_h, memh: ucp_mem_h) -> Option<Bytes> {
    let mut buf: *mut std::ffi::c_void = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: a live context and a handle it mapped; valid out-pointers.
    let s = unsafe { (lib.rkey_pack)(ctx, memh, &mut buf, &mut len) };
    if s != ffi::UCS_OK || buf.is_null() {
        tracing::debug!("ucx: ucp_rkey_pack: {}", lib.status_text(s));
        return None;
    }
    // SAFETY: UCX wrote `len` bytes at `buf`, ours until released below.
    let key = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
    let out = (1..=MAX_PACKED_RKEY)
        .contains(&len)
        .then(|| Bytes::copy_from_slice(key));
    // SAFETY: the buffer ucp_rkey_pack returned, released once.
    unsafe { (lib.rkey_buffer_release)(buf) };
    out
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
