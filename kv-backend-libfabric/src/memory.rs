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

    /// Leaks every region without closing it (the endpoint is being leaked), keeping
    /// the handles reachable ([`keep_forever`]).
    pub fn forget_mrs(&mut self) {
        let mrs: Vec<Mr> = self.take_mrs().collect();
        keep_forever(mrs);
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

/// Addresses of what this process leaked on purpose (memory or handles the provider may
/// still touch): kept in a static so they stay reachable for the life of the process.
/// LeakSanitizer then sees them as kept, not lost, and reports every *other* leak.
static KEPT: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// Never drops `x`: moves it to the heap and keeps its address in [`KEPT`].
pub fn keep_forever<T>(x: T) {
    keep_address(Box::into_raw(Box::new(x)) as usize);
}

/// Keeps `addr` (of an allocation leaked on purpose) in [`KEPT`].
pub fn keep_address(addr: usize) {
    KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(addr);
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

    /// Start of buffer `i` (`i == count` is the end of the slab).
    pub fn buf(&self, i: usize) -> *mut u8 {
        assert!(i <= self.count, "slab buffer {i} of {}", self.count);
        // SAFETY: i <= count, so the offset stays inside the allocation or one past its
        // end (and is 0 for an empty slab's null pointer).
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

    /// The first `len` bytes (at most [`MSG_BUF`]) of buffer `i` (`i < count`, checked).
    ///
    /// # Safety
    /// The provider does not own buffer `i` while the slice lives: its operation
    /// completed (the provider is done writing) or it was never posted, and it is not
    /// posted again before the slice is dropped.
    pub unsafe fn slice(&self, i: usize, len: usize) -> &[u8] {
        assert!(i < self.count, "slab buffer {i} of {}", self.count);
        // SAFETY: inside the allocation (i < count); nothing writes it meanwhile: the
        // provider does not own it (the caller's promise) and a `&mut` to it would need
        // `&mut self`.
        unsafe { std::slice::from_raw_parts(self.buf(i), len.min(MSG_BUF)) }
    }

    /// Buffer `i` as a mutable slice (`i < count`, checked). `&mut self`: at most one
    /// such slice, and no shared one, exists at a time.
    ///
    /// # Safety
    /// As for [`Slab::slice`]: the provider does not own buffer `i` while the slice
    /// lives.
    pub unsafe fn slice_mut(&mut self, i: usize) -> &mut [u8] {
        assert!(i < self.count, "slab buffer {i} of {}", self.count);
        // SAFETY: inside the allocation; exclusive: the caller's promise keeps the
        // provider off it, and `&mut self` every other slice.
        unsafe { std::slice::from_raw_parts_mut(self.buf(i), MSG_BUF) }
    }

    /// `fi_mr_desc` of the slab.
    pub fn desc(&self) -> *mut std::ffi::c_void {
        self.mr.as_ref().map_or(std::ptr::null_mut(), Mr::desc)
    }

    /// Closes the slab's registration on `fabric`; the slab may then be dropped. If the
    /// provider keeps the region open the slab keeps it too, and leaks its memory on
    /// drop.
    pub fn close(&mut self, fabric: &mut Fabric) {
        if let Some(mr) = self.mr.take() {
            if let Err((mr, _)) = fabric.close_mr(mr) {
                self.mr = Some(mr);
            }
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
            keep_address(self.ptr as usize);
            if let Some(mr) = self.mr.take() {
                keep_forever(mr);
            }
            return;
        }
        // SAFETY: allocated in `new` with this layout; the region was closed first.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slab of `count` buffers that is not registered (no fabric needed).
    fn unregistered(count: usize) -> Slab {
        let layout = Layout::from_size_align(count * MSG_BUF, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Slab {
            ptr,
            layout,
            mr: None,
            count,
        }
    }

    /// UNSAFE.md finding: `slice_mut(&self)` could hand out two `&mut` to one buffer;
    /// it takes `&mut self` now (two live mutable slices no longer compile), and an
    /// index past the slab panics instead of pointing outside the allocation (it was a
    /// `debug_assert`, gone in release builds).
    #[test]
    fn slab_buffers_are_exclusive_disjoint_and_bounds_checked() {
        let mut s = unregistered(2);
        // SAFETY (all below): never posted, so the provider owns none of them.
        unsafe {
            s.slice_mut(0).fill(1);
            s.slice_mut(1).fill(2);
            assert!(s.slice(0, MSG_BUF).iter().all(|&b| b == 1));
            assert!(s.slice(1, usize::MAX).iter().all(|&b| b == 2));
            assert_eq!(s.slice(1, 5).len(), 5);
        }
        assert_eq!(s.buf(2), s.buf(0).wrapping_add(2 * MSG_BUF));
        let past = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: as above (the call panics before touching memory).
            unsafe { s.slice(2, 1).len() }
        }));
        assert!(past.is_err());
        let past = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.buf(3)));
        assert!(past.is_err());
        assert!(Slab::empty().buf(0).is_null());
    }
}
