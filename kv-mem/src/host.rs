//! Host (DRAM) buffers: aligned heap, anonymous `mmap`, huge pages, `mlock`.

use std::alloc::Layout;
use std::ptr::NonNull;

use kv_core::{Descriptor, Error, MemKind, Result};

/// How to allocate a [`HostBuffer`]. Plain options struct; `Default` is a zeroed,
/// page-aligned heap buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostOptions {
    /// Alignment of the start address (a power of two; heap buffers only — mappings are
    /// page-aligned).
    pub align: usize,
    /// Use an anonymous `mmap` instead of the heap.
    pub mmap: bool,
    /// Back the mapping with huge pages (`MAP_HUGETLB`); implies `mmap`.
    pub huge_pages: bool,
    /// `mlock` the buffer so it is never swapped out (needs `RLIMIT_MEMLOCK`).
    pub lock: bool,
    /// Back the buffer with a `memfd` mapped `MAP_SHARED`, so a backend can let a peer
    /// process on the same host map it too (see [`shared_backing`]); implies `mmap`.
    pub shared: bool,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            align: 4096,
            mmap: false,
            huge_pages: false,
            lock: false,
            shared: false,
        }
    }
}

enum Backing {
    Heap(Layout),
    // Held only so the mapping is unmapped on drop.
    Map(#[allow(dead_code)] memmap2::MmapMut),
    // The mapping and its memfd.
    Shared(#[allow(dead_code)] memmap2::MmapMut, std::fs::File),
}

/// Where a shared (memfd-backed) host range lives: a file descriptor of this process and
/// the offset of the range in it. `Copy`, `Send + Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedBacking {
    /// The memfd (owned by the [`HostBuffer`]; valid while the buffer lives — a backend
    /// that keeps it past `register` should `dup` it).
    pub fd: std::os::fd::RawFd,
    /// Offset of the range's first byte in the memfd.
    pub offset: u64,
    /// Length of the whole memfd mapping.
    pub len: u64,
}

/// Live shared buffers by start address: (length, fd).
static SHARED: std::sync::RwLock<std::collections::BTreeMap<u64, (u64, std::os::fd::RawFd)>> =
    std::sync::RwLock::new(std::collections::BTreeMap::new());

/// The memfd behind `desc`, if it lies inside a live buffer made with
/// [`HostOptions::shared`]. Same-host backends use it to let the peer map the memory.
pub fn shared_backing(desc: &Descriptor) -> Option<SharedBacking> {
    let end = desc.end()?;
    let map = SHARED.read().unwrap_or_else(|e| e.into_inner());
    let (start, (len, fd)) = map.range(..=desc.addr).next_back()?;
    (end <= start + len).then_some(SharedBacking {
        fd: *fd,
        offset: desc.addr - start,
        len: *len,
    })
}

/// Makes the memfd-backed range `addr..addr + len` (the whole mapping of `file`) known
/// to [`shared_backing`].
pub(crate) fn publish_shared(addr: u64, len: u64, file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    SHARED
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(addr, (len, file.as_raw_fd()));
}

/// Forgets the range published at `addr` (before its mapping goes away).
pub(crate) fn withdraw_shared(addr: u64) {
    SHARED
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&addr);
}

/// A new memfd of `len` bytes, sealed against resizing, mapped `MAP_SHARED`.
pub(crate) fn memfd_mapping(
    len: usize,
    huge: bool,
    name: &std::ffi::CStr,
) -> Result<(memmap2::MmapMut, std::fs::File)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if huge {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: the name is a valid NUL-terminated string; the call has no other inputs.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::io(
            "memfd_create for shared host memory",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len as u64)
        .map_err(|e| Error::io(format!("sizing a {len}-byte memfd"), e))?;
    // Sealed against resizing: a peer that maps it can never be made to fault (SIGBUS)
    // by a truncate, from us or from anyone it is shared with.
    // SAFETY: fcntl on our own open fd with integer arguments only.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if rc != 0 && !huge {
        return Err(Error::io(
            "sealing a shared memfd",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the memfd is private to its owner until it is shared on purpose (peers
    // map it to read and write it, which is the point); no Rust reference to the
    // mapping outlives the owner.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file) }
        .map_err(|e| Error::io(format!("mapping a {len}-byte memfd"), e))?;
    Ok((map, file))
}

/// A zero-initialised host buffer at a stable address.
///
/// `Send + Sync`: it owns its bytes like a `Vec<u8>`; shared access hands out `&[u8]`
/// only, mutation needs `&mut`.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    locked: bool,
    backing: Backing,
}

// SAFETY: HostBuffer uniquely owns its allocation (like Vec<u8>); the raw pointer is
// never shared outside borrows of `self`.
unsafe impl Send for HostBuffer {}
// SAFETY: `&HostBuffer` only gives out `&[u8]` and raw addresses; mutation needs `&mut`.
unsafe impl Sync for HostBuffer {}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("addr", &format_args!("{:#x}", self.ptr.as_ptr() as usize))
            .field("len", &self.len)
            .field("mmap", &matches!(self.backing, Backing::Map(_)))
            .field("locked", &self.locked)
            .finish()
    }
}

impl HostBuffer {
    /// `len` zeroed bytes on the heap, aligned to `align` (a power of two).
    pub fn alloc(len: usize, align: usize) -> Result<HostBuffer> {
        Self::with_options(
            len,
            HostOptions {
                align,
                ..Default::default()
            },
        )
    }

    /// `len` zeroed bytes in an anonymous private mapping.
    pub fn mmap(len: usize) -> Result<HostBuffer> {
        Self::with_options(
            len,
            HostOptions {
                mmap: true,
                ..Default::default()
            },
        )
    }

    /// `len` zeroed bytes allocated as `opts` says. Errors say what to change (e.g. how
    /// to reserve huge pages or raise the memlock limit).
    pub fn with_options(len: usize, opts: HostOptions) -> Result<HostBuffer> {
        if len == 0 {
            return Err(Error::invalid_argument("a host buffer of zero bytes"));
        }
        let mut buf = if opts.shared {
            Self::memfd(len, opts.huge_pages)?
        } else if opts.mmap || opts.huge_pages {
            let mut o = memmap2::MmapOptions::new();
            o.len(len);
            if opts.huge_pages {
                o.huge(None);
            }
            let mut map = o.map_anon().map_err(|e| {
                if opts.huge_pages {
                    Error::io(
                        format!("huge-page mapping of {len} bytes (reserve pages with `sysctl vm.nr_hugepages=N`)"),
                        e,
                    )
                } else {
                    Error::io(format!("anonymous mapping of {len} bytes"), e)
                }
            })?;
            let ptr = NonNull::new(map.as_mut_ptr())
                .ok_or_else(|| Error::invalid_argument("mmap returned a null address"))?;
            HostBuffer {
                ptr,
                len,
                locked: false,
                backing: Backing::Map(map),
            }
        } else {
            let layout = Layout::from_size_align(len, opts.align.max(1)).map_err(|_| {
                Error::invalid_argument(format!(
                    "alignment {} is not a power of two (or {len} bytes is too large)",
                    opts.align
                ))
            })?;
            // SAFETY: layout has non-zero size (len > 0 checked above).
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            let ptr = NonNull::new(p).ok_or_else(|| Error::Io {
                context: format!("allocating {len} bytes"),
                source: std::sync::Arc::new(std::io::Error::from(std::io::ErrorKind::OutOfMemory)),
            })?;
            HostBuffer {
                ptr,
                len,
                locked: false,
                backing: Backing::Heap(layout),
            }
        };
        if opts.lock {
            buf.lock()?;
        }
        Ok(buf)
    }

    fn memfd(len: usize, huge: bool) -> Result<HostBuffer> {
        let (mut map, file) = memfd_mapping(len, huge, c"kvx-host-buffer")?;
        let ptr = NonNull::new(map.as_mut_ptr())
            .ok_or_else(|| Error::invalid_argument("mmap returned a null address"))?;
        publish_shared(ptr.as_ptr() as u64, len as u64, &file);
        Ok(HostBuffer {
            ptr,
            len,
            locked: false,
            backing: Backing::Shared(map, file),
        })
    }

    /// `len` zeroed bytes in a shared memfd mapping (see [`HostOptions::shared`]).
    pub fn shared(len: usize) -> Result<HostBuffer> {
        Self::with_options(
            len,
            HostOptions {
                shared: true,
                ..Default::default()
            },
        )
    }

    /// The memfd behind a shared buffer.
    pub fn shared_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match &self.backing {
            Backing::Shared(_, f) => Some(f.as_fd()),
            _ => None,
        }
    }

    /// Pins the buffer in RAM with `mlock`.
    pub fn lock(&mut self) -> Result<()> {
        if self.locked {
            return Ok(());
        }
        // SAFETY: the range is our live allocation.
        let rc = unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            return Err(Error::io(
                format!(
                    "mlock of {} bytes (raise `ulimit -l` or grant CAP_IPC_LOCK)",
                    self.len
                ),
                std::io::Error::last_os_error(),
            ));
        }
        self.locked = true;
        Ok(())
    }

    /// True when the buffer is `mlock`ed.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: buffers have at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start address, for writing.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe our live, initialised (zeroed) allocation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The whole buffer as a DRAM descriptor.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.ptr.as_ptr() as u64, self.len as u64, 0)
    }

    /// Memory kind (always DRAM).
    pub fn kind(&self) -> MemKind {
        MemKind::Dram
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if self.locked {
            // SAFETY: unlocking our own live range.
            unsafe { libc::munlock(self.ptr.as_ptr().cast(), self.len) };
        }
        if let Backing::Heap(layout) = self.backing {
            // SAFETY: allocated with this layout in `with_options`, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
        if matches!(self.backing, Backing::Shared(..)) {
            withdraw_shared(self.ptr.as_ptr() as u64);
        }
        // Mappings unmap themselves when `backing` drops.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_is_aligned_and_zeroed() {
        for align in [1, 64, 4096, 1 << 21] {
            let b = HostBuffer::alloc(10_000, align).unwrap();
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert!(b.as_slice().iter().all(|x| *x == 0));
        }
        assert!(HostBuffer::alloc(10, 3).is_err());
        assert!(HostBuffer::alloc(0, 64).is_err());
    }

    #[test]
    fn mmap_round_trips() {
        let mut b = HostBuffer::mmap(1 << 20).unwrap();
        b.as_mut_slice()[12345] = 7;
        assert_eq!(b.as_slice()[12345], 7);
        assert_eq!(b.descriptor().len, 1 << 20);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri supports neither MAP_HUGETLB nor mlock")]
    fn huge_pages_and_lock_fail_cleanly_or_work() {
        // Either works or says what to do; never panics.
        match HostBuffer::with_options(
            2 << 20,
            HostOptions {
                huge_pages: true,
                ..Default::default()
            },
        ) {
            Ok(b) => assert_eq!(b.len(), 2 << 20),
            Err(e) => assert!(e.to_string().contains("nr_hugepages"), "{e}"),
        }
        match HostBuffer::with_options(
            4096,
            HostOptions {
                lock: true,
                ..Default::default()
            },
        ) {
            Ok(b) => assert!(b.is_locked()),
            Err(e) => assert!(e.to_string().contains("ulimit -l"), "{e}"),
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri supports neither memfd_create nor MAP_SHARED")]
    fn shared_buffers_are_found_by_address() {
        let mut b = HostBuffer::shared(1 << 20).unwrap();
        b.as_mut_slice()[4096] = 9;
        let d = Descriptor::new(b.descriptor().addr + 4096, 100, 0);
        let s = shared_backing(&d).unwrap();
        assert_eq!((s.offset, s.len), (4096, 1 << 20));
        assert!(b.shared_fd().is_some());
        // The memfd holds the bytes: read them through the fd.
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::from(b.shared_fd().unwrap().try_clone_to_owned().unwrap());
        let mut one = [0u8; 1];
        f.read_exact_at(&mut one, 4096).unwrap();
        assert_eq!(one[0], 9);
        assert!(shared_backing(&Descriptor::new(d.addr, 1 << 20, 0)).is_none());
        // Sealed: nobody can shrink it under a peer's mapping.
        assert!(f.set_len(4096).is_err());
        let heap = HostBuffer::alloc(4096, 4096).unwrap();
        assert!(shared_backing(&heap.descriptor()).is_none());
        let addr = b.descriptor();
        drop(b);
        assert!(shared_backing(&addr).is_none());
    }

    #[test]
    fn is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<HostBuffer>();
    }
}
