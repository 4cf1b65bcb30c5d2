//! The operating-system calls the backend needs beyond `std`: vectored socket I/O
//! straight from and into registered memory, cross-memory attach, socket options, and
//! the shared-memory calls (dup, `pidfd_getfd`, `mmap`/`munmap`, copies over mappings).
//! Every `unsafe` block of the crate's I/O lives here.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kv_core::{Error, Result};

/// Most iovecs one system call takes (Linux `IOV_MAX`).
pub(crate) const IOV_MAX: usize = 1024;

/// How often a blocked socket call wakes up to check cancellation, deadlines and
/// shutdown.
pub(crate) const TICK: Duration = Duration::from_millis(20);

/// An empty iovec (for reusable vectors).
pub(crate) fn iovec(addr: u64, len: u64) -> libc::iovec {
    libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: len as usize,
    }
}

/// This host's identity: the kernel boot id and the host name. Two processes with the
/// same identity share a kernel, which is what cross-memory attach needs.
pub(crate) fn host_identity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{}", boot.trim(), host.trim())
}

/// What a blocked socket call watches while it waits: the transfer's deadline and
/// cancel flag, the backend's shutdown flag, and how long the peer may stay silent.
pub(crate) struct Watch<'a> {
    /// Peer name for error messages.
    pub peer: &'a str,
    /// The post's deadline.
    pub deadline: Option<Instant>,
    /// The longest time without progress before the peer counts as gone.
    pub stall: Duration,
    /// Set by `cancel`.
    pub cancel: Option<&'a AtomicBool>,
    /// Set when the backend or the peer is being torn down.
    pub shutdown: Option<&'a AtomicBool>,
    /// The peer may stay silent forever before the first byte (a server waiting for
    /// the next request).
    pub idle_ok: bool,
    /// Absolute limit for the whole call, however steadily the peer trickles bytes (a
    /// served request): past it the call fails with `TimedOut`.
    pub limit: Option<Instant>,
    /// Asked before every system call: true stops the call with `NotRegistered` (a
    /// registration being served was revoked by `deregister`).
    pub abort: Option<&'a dyn Fn() -> bool>,
    last: Instant,
}

impl<'a> Watch<'a> {
    pub(crate) fn new(peer: &'a str, stall: Duration) -> Watch<'a> {
        Watch {
            peer,
            deadline: None,
            stall,
            cancel: None,
            shutdown: None,
            idle_ok: false,
            limit: None,
            abort: None,
            last: Instant::now(),
        }
    }

    /// The checks that run before every system call, progress or not: the absolute
    /// limit and the abort hook.
    fn check_hard(&self) -> Result<()> {
        if let Some(l) = self.limit {
            if Instant::now() >= l {
                return Err(Error::TimedOut {
                    what: format!("serving a request of {}", self.peer),
                    after: self.stall,
                });
            }
        }
        if self.abort.is_some_and(|f| f()) {
            return Err(Error::NotRegistered(
                "the target registration was deregistered while the request was served".into(),
            ));
        }
        Ok(())
    }

    fn progressed(&mut self) {
        self.idle_ok = false;
        self.last = Instant::now();
    }

    /// Called when a call timed out: is it time to give up?
    fn check(&self) -> Result<()> {
        self.check_hard()?;
        if self.shutdown.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(self.gone("the backend is shutting down"));
        }
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Canceled);
        }
        let now = Instant::now();
        if let Some(d) = self.deadline {
            if now >= d {
                return Err(Error::TimedOut {
                    what: format!("tcp transfer with {}", self.peer),
                    after: now.saturating_duration_since(self.last),
                });
            }
        }
        if !self.idle_ok && now.duration_since(self.last) > self.stall {
            return Err(self.gone(&format!("no progress for {:?}", self.stall)));
        }
        Ok(())
    }

    fn gone(&self, reason: &str) -> Error {
        Error::RemoteDisconnected {
            peer: self.peer.to_string(),
            reason: reason.to_string(),
        }
    }

    fn io_error(&self, what: &str, e: io::Error) -> Error {
        self.gone(&format!("{what}: {e}"))
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Drops the first `n` bytes from the iovecs starting at `*first`.
fn advance(iov: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iov.len() {
        let v = &mut iov[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            v.iov_len = 0;
            *first += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same range.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
            v.iov_len -= n;
            n = 0;
        }
    }
    while *first < iov.len() && iov[*first].iov_len == 0 {
        *first += 1;
    }
}

/// A connected TCP stream with the options the backend uses (`TCP_NODELAY`,
/// keepalive, [`TICK`] timeouts). `Send + Sync` like `TcpStream`.
#[derive(Debug)]
pub(crate) struct Stream {
    pub sock: TcpStream,
}

impl Stream {
    /// Connects within `timeout`.
    pub(crate) fn connect(addr: &SocketAddr, timeout: Duration) -> io::Result<Stream> {
        let sock = TcpStream::connect_timeout(addr, timeout)?;
        Stream::from_std(sock)
    }

    /// Sets the options on an accepted or connected socket.
    pub(crate) fn from_std(sock: TcpStream) -> io::Result<Stream> {
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(TICK))?;
        sock.set_write_timeout(Some(TICK))?;
        let fd = sock.as_raw_fd();
        let one: libc::c_int = 1;
        let idle: libc::c_int = 10;
        let intvl: libc::c_int = 2;
        let cnt: libc::c_int = 3;
        for (level, opt, val) in [
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, one),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, intvl),
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, cnt),
        ] {
            // SAFETY: `val` is a live c_int and its size is passed; fd is open.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    opt,
                    &val as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Stream { sock })
    }

    /// Sends every byte the iovecs describe (at most [`IOV_MAX`] per call), resuming
    /// after partial writes; the iovecs are consumed.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory valid for reads for the duration of the call.
    pub(crate) unsafe fn send_all(&self, iov: &mut [libc::iovec], w: &mut Watch<'_>) -> Result<()> {
        let fd = self.sock.as_raw_fd();
        let mut first = 0;
        advance(iov, &mut first, 0);
        while first < iov.len() {
            w.check_hard()?;
            let n = (iov.len() - first).min(IOV_MAX);
            // SAFETY: msghdr is plain data; zeroed is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov[first..].as_mut_ptr();
            msg.msg_iovlen = n as _;
            // SAFETY: the iovecs point to readable memory (caller's promise); MSG_NOSIGNAL
            // turns a closed peer into EPIPE instead of SIGPIPE.
            let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if would_block(&e) {
                    w.check()?;
                    continue;
                }
                return Err(w.io_error("send", e));
            }
            w.progressed();
            advance(iov, &mut first, r as usize);
        }
        Ok(())
    }

    /// Receives exactly the bytes the iovecs describe, resuming after partial reads.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory valid for writes for the duration of the call,
    /// and nothing else may access it meanwhile.
    pub(crate) unsafe fn recv_all(&self, iov: &mut [libc::iovec], w: &mut Watch<'_>) -> Result<()> {
        let fd = self.sock.as_raw_fd();
        let mut first = 0;
        advance(iov, &mut first, 0);
        while first < iov.len() {
            w.check_hard()?;
            let n = (iov.len() - first).min(IOV_MAX);
            // SAFETY: the iovecs point to writable memory (caller's promise).
            let r = unsafe { libc::readv(fd, iov[first..].as_ptr(), n as libc::c_int) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if would_block(&e) {
                    w.check()?;
                    continue;
                }
                return Err(w.io_error("receive", e));
            }
            if r == 0 {
                return Err(w.gone("connection closed by the peer"));
            }
            w.progressed();
            advance(iov, &mut first, r as usize);
        }
        Ok(())
    }

    /// Receives exactly `buf.len()` bytes into `buf`.
    pub(crate) fn recv_exact(&self, buf: &mut [u8], w: &mut Watch<'_>) -> Result<()> {
        let mut iov = [iovec(buf.as_mut_ptr() as usize as u64, buf.len() as u64)];
        // SAFETY: the iovec describes `buf`, which we borrow mutably for the call.
        unsafe { self.recv_all(&mut iov, w) }
    }

    /// Sends `buf` whole.
    pub(crate) fn send_bytes(&self, bufs: &[&[u8]], w: &mut Watch<'_>) -> Result<()> {
        let mut iov = [iovec(0, 0), iovec(0, 0), iovec(0, 0)];
        let mut k = 0;
        for b in bufs.iter().take(iov.len()) {
            iov[k] = iovec(b.as_ptr() as usize as u64, b.len() as u64);
            k += 1;
        }
        // SAFETY: the iovecs describe the borrowed slices.
        unsafe { self.send_all(&mut iov[..k], w) }
    }

    /// True when the peer closed or reset the connection (does not block).
    pub(crate) fn peer_closed(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r < 0 || (r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
    }

    /// Shuts both directions down, waking any thread blocked on the socket.
    pub(crate) fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
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

/// A copy, in this process, of descriptor `fd` of process `pid`: `pidfd_getfd` (Linux
/// ≥ 5.6), else opening `/proc/<pid>/fd/<fd>`. Both need the ptrace access that
/// cross-memory attach needs.
pub(crate) fn peer_fd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    let getfd = || -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let p = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if p < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `p` is a fresh descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(p as RawFd) };
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

/// A `MAP_SHARED` read-write mapping of part of a file; unmapped on drop. The mapping
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
    /// Maps `len` bytes of `fd` from `offset` (page-aligned) shared and read-write.
    pub(crate) fn map_shared(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Mapping> {
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
                libc::PROT_READ | libc::PROT_WRITE,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_skips_whole_and_partial_vectors() {
        let a = [0u8; 10];
        let b = [0u8; 5];
        let mut iov = [
            iovec(a.as_ptr() as u64, 10),
            iovec(0, 0),
            iovec(b.as_ptr() as u64, 5),
        ];
        let mut first = 0;
        advance(&mut iov, &mut first, 12);
        assert_eq!(first, 2);
        assert_eq!(iov[2].iov_len, 3);
        assert_eq!(iov[2].iov_base as u64, b.as_ptr() as u64 + 2);
        advance(&mut iov, &mut first, 3);
        assert_eq!(first, 3);
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
        let dupe = peer_fd(std::process::id(), f.as_raw_fd()).unwrap();
        let (dev, ino, size, shmem) = shm_identity(f.as_fd()).unwrap();
        assert_eq!(shm_identity(dupe.as_fd()).unwrap(), (dev, ino, size, shmem));
        assert!(shmem && size == 3 * page_size());
        let m = Mapping::map_shared(dupe.as_fd(), page_size(), page_size() as usize).unwrap();
        drop(dupe);
        let v = [7u8; 16];
        // SAFETY: the mapping covers one page; `v` is 16 readable bytes.
        unsafe { copy(m.addr() + 8, v.as_ptr() as u64, 16) };
        use std::os::unix::fs::FileExt;
        let mut got = [0u8; 16];
        f.read_exact_at(&mut got, page_size() + 8).unwrap();
        assert_eq!(got, v);
        assert!(Mapping::map_shared(f.as_fd(), 1, 4096).is_err());
        assert!(peer_fd(std::process::id(), 1 << 30).is_err());
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
