//! The process and memory calls the backend needs beyond `std`: cross-memory attach,
//! pidfds (a peer's descriptors, whether it exited), `mmap`/`munmap` of a peer's memfd
//! and copies over such mappings. Every `unsafe` block of these lives here.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::sys::{iovec, pidfd_open, IOV_MAX};

/// This host's identity: the kernel boot id and the host name. Two processes with the
/// same identity share a kernel, which is what cross-memory attach needs.
pub(crate) fn host_identity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{}", boot.trim(), host.trim())
}

/// Which way cross-memory attach moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmaDir {
    /// Local → remote process (`process_vm_writev`).
    Write,
    /// Remote process → local (`process_vm_readv`).
    Read,
}

/// Moves the bytes of `local` to/from `remote` in process `pid`, at most [`IOV_MAX`]
/// iovecs a call. Returns the bytes moved, which is less than asked only on a fault.
///
/// # Safety
///
/// `local` must describe memory of this process valid for reads (`Write`) or writes
/// (`Read`) that nothing else accesses meanwhile; `remote` must be ranges the other
/// process exported for this purpose. Both lists have the same total length.
pub(crate) unsafe fn cma(
    dir: CmaDir,
    pid: u32,
    local: &[libc::iovec],
    remote: &[libc::iovec],
) -> io::Result<usize> {
    let mut done = 0usize;
    for (l, r) in local.chunks(IOV_MAX).zip(remote.chunks(IOV_MAX)) {
        let want: usize = l.iter().map(|v| v.iov_len).sum();
        // SAFETY: the caller promises the local ranges are valid; the kernel checks the
        // remote ones against the target's address space and our ptrace access to it.
        let n = unsafe {
            match dir {
                CmaDir::Write => libc::process_vm_writev(
                    pid as libc::pid_t,
                    l.as_ptr(),
                    l.len() as libc::c_ulong,
                    r.as_ptr(),
                    r.len() as libc::c_ulong,
                    0,
                ),
                CmaDir::Read => libc::process_vm_readv(
                    pid as libc::pid_t,
                    l.as_ptr(),
                    l.len() as libc::c_ulong,
                    r.as_ptr(),
                    r.len() as libc::c_ulong,
                    0,
                ),
            }
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        done += n as usize;
        if (n as usize) < want {
            return Ok(done);
        }
    }
    Ok(done)
}

/// Reads 8 bytes at `addr` of process `pid` with cross-memory attach: the probe that
/// tells whether a same-host peer can be reached that way.
pub(crate) fn cma_probe(pid: u32, addr: u64) -> io::Result<u64> {
    let mut v = 0u64;
    let l = [iovec(&mut v as *mut u64 as usize as u64, 8)];
    let r = [iovec(addr, 8)];
    // SAFETY: `l` describes the local `v`; the kernel validates the remote range.
    let n = unsafe { cma(CmaDir::Read, pid, &l, &r)? };
    if n != 8 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short probe read",
        ));
    }
    Ok(v)
}

/// A duplicate of `fd` (close-on-exec) that stays open until the result drops.
pub(crate) fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; a closed or invalid one gives EBADF.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `r` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Device, inode and size of an open file, and whether it is shared memory (a memfd or
/// another shmem file: `F_GET_SEALS` works only on those).
/// (device, inode, size, sealed): `sealed` is true for a memfd sealed against
/// shrinking (`F_SEAL_SHRINK`), which a peer may map without risking `SIGBUS`.
pub(crate) fn shm_identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64, u64, bool)> {
    // SAFETY: `stat` is plain data; zeroed is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the borrow; `st` is a live, writable stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_GET_SEALS only reads the descriptor's file.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    let sealed = seals >= 0 && seals & libc::F_SEAL_SHRINK != 0;
    Ok((st.st_dev, st.st_ino, st.st_size.max(0) as u64, sealed))
}

/// A copy, in this process, of descriptor `fd` of the process `pidfd` names (pid
/// `pid`): `pidfd_getfd` (Linux ≥ 5.6), else opening `/proc/<pid>/fd/<fd>`. Both need
/// the ptrace access that cross-memory attach needs.
pub(crate) fn peer_fd(pidfd: Option<BorrowedFd<'_>>, pid: u32, fd: i32) -> io::Result<OwnedFd> {
    let getfd = || -> io::Result<OwnedFd> {
        let own;
        let pidfd = match pidfd {
            Some(p) => p,
            None => {
                own = pidfd_open(pid)?;
                own.as_fd()
            }
        };
        // SAFETY: pidfd_getfd reads the pidfd and a descriptor number of that process
        // and returns a new close-on-exec descriptor of ours, or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `r` is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
    };
    match getfd() {
        Ok(f) => Ok(f),
        Err(first) => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/fd/{fd}"))
            .map(OwnedFd::from)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("pidfd_getfd: {first}; /proc/{pid}/fd/{fd}: {e}"),
                )
            }),
    }
}

/// The system page size.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no memory inputs.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// A `MAP_SHARED` mapping of part of a file, read-write or read-only; unmapped on drop. The mapping
/// holds its own reference to the file's pages, so it stays valid (never faults for a
/// missing mapping) after the descriptor is closed and after the other process frees
/// its buffer or exits. `Send + Sync`: it is a range of raw bytes that the backend only
/// touches through raw-pointer copies.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only accessed through
// raw-pointer copies whose callers uphold the Backend contract.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` exposes only the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset` (page-aligned) shared, read-write when
    /// `writable`, else read-only (`PROT_READ`: a stray write faults instead of landing).
    pub(crate) fn map_shared(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> io::Result<Mapping> {
        if len == 0 || offset % page_size() != 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh mapping at an address the kernel picks; it overlaps nothing
        // of ours. The file's size was checked by the caller to cover the range.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                if writable {
                    libc::PROT_READ | libc::PROT_WRITE
                } else {
                    libc::PROT_READ
                },
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { base, len })
    }

    /// Start address of the mapping.
    pub(crate) fn addr(&self) -> u64 {
        self.base as usize as u64
    }

    /// Length of the mapping.
    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `map_shared`, unmapped
        // once; nothing uses it any more (transfers hold an `Arc` of its owner).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Copies `len` bytes from address `src` to address `dst` (memmove semantics, so
/// ranges that alias the same pages through two mappings are harmless).
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `len` bytes for the duration
/// of the call, and no Rust reference may cover `dst` meanwhile.
pub(crate) unsafe fn copy(dst: u64, src: u64, len: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        std::ptr::copy(
            src as usize as *const u8,
            dst as usize as *mut u8,
            len as usize,
        )
    }
}

/// Posts on the shared-memory path of at least this many bytes copy with
/// [`copy_streaming`]: their source and target do not stay in the CPU caches anyway
/// (a KV cache layer is tens of MiB), and a smaller post is likely still cached.
pub(crate) const STREAMING_MIN: u64 = 8 << 20;

/// Below this length a copy is not worth the alignment head and tail.
const STREAMING_PIECE_MIN: u64 = 4096;

/// Copies like [`copy`], but the 64-byte-aligned bulk of the target with non-temporal
/// stores that bypass the caches (x86-64 `movntdq`): the target's cache lines are not
/// read before they are overwritten, which saves a third of the memory traffic of a
/// copy between ranges that are not cached (1 GiB in 256 KiB pieces on the development
/// VM: 19.5 GB/s against 11 GB/s with `memcpy`). Ends with a store fence, so the bytes
/// are visible to other threads and processes before anything the caller does next.
/// Overlapping ranges, short ones and other architectures take [`copy`].
///
/// # Safety
///
/// As [`copy`].
pub(crate) unsafe fn copy_streaming(dst: u64, src: u64, len: u64) {
    let overlap = dst < src.saturating_add(len) && src < dst.saturating_add(len);
    #[cfg(target_arch = "x86_64")]
    if !overlap && len >= STREAMING_PIECE_MIN {
        // SAFETY: the caller's promise; the ranges do not overlap.
        unsafe { stream_x86_64(dst, src, len) };
        return;
    }
    let _ = overlap;
    // SAFETY: the caller's promise.
    unsafe { copy(dst, src, len) }
}

/// [`copy_streaming`] on x86-64: head up to the first 64-byte boundary of `dst` and the
/// tail with [`copy`], the rest four 16-byte non-temporal stores at a time (SSE2, which
/// every x86-64 CPU has), then `sfence`.
///
/// # Safety
///
/// As [`copy`], and the ranges must not overlap.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_x86_64(dst: u64, src: u64, len: u64) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let head = ((64 - dst % 64) % 64).min(len);
    let body = (len - head) & !63;
    let tail = len - head - body;
    // SAFETY: every access lies in `dst..dst+len` or `src..src+len` (the caller's
    // promise); `d` is 64-byte aligned, so each 16-byte streaming store is aligned as
    // `_mm_stream_si128` requires; loads are unaligned. The fence orders the weakly
    // ordered streaming stores before every later store of this thread.
    unsafe {
        copy(dst, src, head);
        let mut d = (dst + head) as usize as *mut __m128i;
        let mut s = (src + head) as usize as *const __m128i;
        for _ in 0..body / 64 {
            let a = _mm_loadu_si128(s);
            let b = _mm_loadu_si128(s.add(1));
            let c = _mm_loadu_si128(s.add(2));
            let e = _mm_loadu_si128(s.add(3));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
            d = d.add(4);
            s = s.add(4);
        }
        _mm_sfence();
        copy(dst + head + body, src + head + body, tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_copy_is_byte_exact_at_every_alignment() {
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for len in [0usize, 1, 63, 64, 4095, 4096, 4097, 4096 + 63, 65_536 + 5] {
            for (so, doff) in [(0, 0), (1, 0), (0, 1), (17, 63), (63, 33), (5, 48)] {
                let mut dst = vec![0xeeu8; len + 128];
                // SAFETY: `src[so..so+len]` and `dst[doff..doff+len]` are in bounds of
                // two distinct live vectors.
                unsafe {
                    copy_streaming(
                        dst.as_mut_ptr() as u64 + doff as u64,
                        src.as_ptr() as u64 + so as u64,
                        len as u64,
                    )
                };
                assert_eq!(
                    &dst[doff..doff + len],
                    &src[so..so + len],
                    "{len} {so} {doff}"
                );
                assert!(dst[..doff].iter().all(|&b| b == 0xee), "{len} {so} {doff}");
                assert!(
                    dst[doff + len..].iter().all(|&b| b == 0xee),
                    "{len} {so} {doff}"
                );
            }
        }
    }

    #[test]
    fn streaming_copy_of_overlapping_ranges_moves_like_memmove() {
        let orig: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        for (from, to) in [(0usize, 100usize), (100, 0), (0, 1), (1, 0)] {
            let mut v = orig.clone();
            let len = 10_000;
            let base = v.as_mut_ptr() as u64;
            // SAFETY: both ranges lie inside `v`, which no reference covers meanwhile.
            unsafe { copy_streaming(base + to as u64, base + from as u64, len as u64) };
            assert_eq!(&v[to..to + len], &orig[from..from + len], "{from}->{to}");
        }
    }

    #[test]
    fn peer_fd_and_shared_mapping_of_own_memfd() {
        // SAFETY: a valid NUL-terminated name; no other inputs.
        let fd = unsafe {
            libc::memfd_create(
                c"kv-tcp-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor, owned here.
        let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(3 * page_size()).unwrap();
        use std::os::fd::AsFd;
        assert!(!shm_identity(f.as_fd()).unwrap().3, "not sealed yet");
        // SAFETY: fcntl on our own fd with integer arguments.
        assert_eq!(
            unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) },
            0
        );
        let dupe = peer_fd(None, std::process::id(), f.as_raw_fd()).unwrap();
        let (dev, ino, size, shmem) = shm_identity(f.as_fd()).unwrap();
        assert_eq!(shm_identity(dupe.as_fd()).unwrap(), (dev, ino, size, shmem));
        assert!(shmem && size == 3 * page_size());
        let m = Mapping::map_shared(dupe.as_fd(), page_size(), page_size() as usize, true).unwrap();
        let ro =
            Mapping::map_shared(dupe.as_fd(), page_size(), page_size() as usize, false).unwrap();
        drop(dupe);
        let v = [7u8; 16];
        // SAFETY: the mapping covers one page; `v` is 16 readable bytes.
        unsafe { copy(m.addr() + 8, v.as_ptr() as u64, 16) };
        use std::os::unix::fs::FileExt;
        let mut got = [0u8; 16];
        f.read_exact_at(&mut got, page_size() + 8).unwrap();
        assert_eq!(got, v);
        // The read-only mapping sees the same pages.
        // SAFETY: 16 readable bytes of the read-only mapping into `got`.
        unsafe { copy(got.as_mut_ptr() as u64, ro.addr() + 8, 16) };
        assert_eq!(got, v);
        assert!(Mapping::map_shared(f.as_fd(), 1, 4096, true).is_err());
        assert!(peer_fd(None, std::process::id(), 1 << 30).is_err());
        let me = pidfd_open(std::process::id()).unwrap();
        assert!(!crate::sys::pidfd_exited(me.as_fd()));
        let d = dup_cloexec(f.as_raw_fd()).unwrap();
        assert_eq!(shm_identity(d.as_fd()).unwrap().1, ino);
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(!shm_identity(file.as_fd()).unwrap().3);
    }

    #[test]
    fn cma_reads_own_process() {
        let v: u64 = 0x1122_3344_5566_7788;
        let got = cma_probe(std::process::id(), &v as *const u64 as u64).unwrap();
        assert_eq!(got, v);
        assert!(host_identity().len() > 2);
    }
}
