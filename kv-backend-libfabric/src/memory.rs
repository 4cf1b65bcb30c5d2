//! Registrations (local and imported) and the registered bounce buffers that carry
//! notification messages.

use std::alloc::Layout;
use std::collections::{BTreeMap, HashMap};

use kv_core::{Access, Descriptor, Error, Result};

use crate::fabric::{Fabric, Mr, MrUse};
use crate::wire::{RemoteKey, MSG_BUF};

/// A local registration.
pub struct Registration {
    /// The registered range.
    pub desc: Descriptor,
    /// The key peers use: `fi_mr_key` under FI_MR_PROV_KEY, else the key we requested.
    pub key: u64,
    /// Its memory region; `None` only while it is being closed.
    pub mr: Option<Mr>,
    /// Transfers whose local side names it and whose operations the provider may still
    /// hold (in progress, or failed with operations abandoned to the provider).
    pub busy: u32,
    /// What peers (and READs landing here) may do.
    pub access: Access,
}

impl Registration {
    /// The remote key a peer needs.
    pub fn remote_key(&self) -> RemoteKey {
        RemoteKey {
            key: self.key,
            base: self.desc.addr,
            len: self.desc.len,
            access: self.access,
        }
    }

    /// `fi_mr_desc` as an integer (0 when closed).
    pub fn mr_desc(&self) -> usize {
        self.mr.as_ref().map_or(0, |m| m.desc() as usize)
    }
}

/// The local registrations, by id and by start address (for `prepare`'s lookups).
#[derive(Default)]
pub struct Registry {
    regs: HashMap<u64, Registration>,
    /// Registrations by (start address, id).
    by_addr: BTreeMap<(u64, u64), ()>,
    /// Registration ids by key.
    by_key: HashMap<u64, u64>,
}

impl Registry {
    /// Adds registration `id`.
    pub fn insert(&mut self, id: u64, r: Registration) {
        let addr = r.desc.addr;
        self.by_key.insert(r.key, id);
        self.regs.insert(id, r);
        self.by_addr.insert((addr, id), ());
    }

    /// True when a registration with `key` exists.
    pub fn has_key(&self, key: u64) -> bool {
        self.by_key.contains_key(&key)
    }

    /// Removes registration `id` and returns it (its region still open).
    pub fn remove(&mut self, id: u64) -> Option<Registration> {
        let r = self.regs.remove(&id)?;
        self.by_addr.remove(&(r.desc.addr, id));
        self.by_key.remove(&r.key);
        Some(r)
    }

    /// Registration `id`.
    pub fn get(&self, id: u64) -> Option<&Registration> {
        self.regs.get(&id)
    }

    /// The registration holding `l`: the last one starting at or before it that
    /// contains it.
    pub fn find(&self, l: &Descriptor) -> Option<u64> {
        self.by_addr
            .range(..=(l.addr, u64::MAX))
            .rev()
            .map(|((_, id), _)| *id)
            .find(|id| self.regs.get(id).is_some_and(|x| x.desc.contains(l)))
    }

    /// The first of `ids` that is no longer registered.
    pub fn missing<'a>(&self, ids: &'a [u64]) -> Option<&'a u64> {
        ids.iter().find(|r| !self.regs.contains_key(r))
    }

    /// Marks `ids` as named by one more transfer in progress.
    pub fn mark_busy(&mut self, ids: &[u64]) {
        for r in ids {
            if let Some(r) = self.regs.get_mut(r) {
                r.busy += 1;
            }
        }
    }

    /// Marks `ids` as named by one transfer in progress fewer.
    pub fn release(&mut self, ids: &[u64]) {
        for r in ids {
            if let Some(r) = self.regs.get_mut(r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
    }

    /// Takes every registration's memory region out, for closing.
    pub fn take_mrs(&mut self) -> impl Iterator<Item = Mr> + '_ {
        self.regs.values_mut().filter_map(|r| r.mr.take())
    }

    /// Forgets every region without closing it (the endpoint is being leaked): an `Mr`
    /// dropped unclosed leaves the region open.
    pub fn forget_mrs(&mut self) {
        self.take_mrs().for_each(drop);
    }
}

/// What the owner of an imported registration said about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Asked, no answer yet: transfers naming it wait (until their deadline).
    Unknown,
    /// Live when asked (and not revoked since).
    Live,
    /// Gone: transfers naming it are refused.
    Gone,
}

/// A peer's registration, imported with its remote key.
pub struct Remote {
    /// The endpoint it belongs to.
    pub peer: u64,
    /// What the peer registered.
    pub desc: Descriptor,
    /// Its key, base address and access.
    pub key: RemoteKey,
    /// Whether the owner says it is still registered.
    pub live: Liveness,
}

/// `count` page-aligned bounce buffers of [`MSG_BUF`] bytes in one registration.
///
/// Its owner closes the registration (`mr`) before dropping it; a slab dropped with
/// its registration still open leaks its memory (and region) instead of freeing memory
/// the provider may still touch.
pub struct Slab {
    ptr: *mut u8,
    layout: Layout,
    /// The registration; taken and closed by the owner before the slab is dropped.
    pub mr: Option<Mr>,
    /// Number of buffers.
    pub count: usize,
}

// SAFETY: the slab owns its allocation; it is only used under the backend's mutex.
unsafe impl Send for Slab {}

impl Slab {
    /// Allocates and registers `count` buffers on `fabric` for `usage`.
    pub fn new(fabric: &mut Fabric, count: usize, usage: MrUse) -> Result<Slab> {
        let layout = Layout::from_size_align(count * MSG_BUF, 4096)
            .map_err(|e| Error::invalid_argument(format!("slab layout: {e}")))?;
        // SAFETY: the layout has a non-zero size (count >= 1 and MSG_BUF > 0).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::io(
                "allocating notification buffers",
                std::io::Error::from(std::io::ErrorKind::OutOfMemory),
            ));
        }
        let mut slab = Slab {
            ptr,
            layout,
            mr: None,
            count,
        };
        // SAFETY: the allocation lives until `self` drops, and the owner closes the
        // region before that (or the slab leaks the allocation).
        slab.mr = Some(unsafe { fabric.register(ptr as u64, layout.size(), usage)? });
        Ok(slab)
    }

    /// Start of buffer `i`.
    pub fn buf(&self, i: usize) -> *mut u8 {
        debug_assert!(i < self.count);
        // SAFETY: i < count, so the offset stays inside the allocation.
        unsafe { self.ptr.add(i * MSG_BUF) }
    }

    /// A slab of no buffers (what a leaked slab leaves behind).
    pub fn empty() -> Slab {
        Slab {
            ptr: std::ptr::null_mut(),
            layout: Layout::new::<u8>(),
            mr: None,
            count: 0,
        }
    }

    /// Buffer `i` as a slice (only while the provider does not own it).
    pub fn slice(&self, i: usize, len: usize) -> &[u8] {
        // SAFETY: inside the allocation; the caller only reads buffers whose operation
        // completed (the provider is done writing) or that were never posted.
        unsafe { std::slice::from_raw_parts(self.buf(i), len.min(MSG_BUF)) }
    }

    /// Buffer `i` as a mutable slice (only while the provider does not own it).
    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut(&self, i: usize) -> &mut [u8] {
        // SAFETY: as for `slice`; the owner's mutex gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.buf(i), MSG_BUF) }
    }

    /// `fi_mr_desc` of the slab.
    pub fn desc(&self) -> *mut std::ffi::c_void {
        self.mr.as_ref().map_or(std::ptr::null_mut(), Mr::desc)
    }

    /// Closes the slab's registration on `fabric`; the slab may then be dropped.
    pub fn close(&mut self, fabric: &mut Fabric) {
        if let Some(mr) = self.mr.take() {
            fabric.close_mr(mr);
        }
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        if self.mr.is_some() {
            tracing::error!(
                "libfabric: a notification buffer was dropped while registered; leaking it"
            );
            return;
        }
        // SAFETY: allocated in `new` with this layout; the region was closed first.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}
