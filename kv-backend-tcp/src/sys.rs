//! The socket calls the backend needs beyond `std`: vectored I/O straight from and
//! into registered memory with deadlines ([`Watch`]), TCP and abstract Unix sockets,
//! socket options and the kernel's word on who is at the other end of a Unix socket
//! (`SO_PEERCRED`, `SO_PEERPIDFD`). Process and memory calls are in `os`.

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

/// A connected stream socket with the options the backend uses ([`TICK`] timeouts;
/// for TCP also `TCP_NODELAY` and keepalive): TCP to any peer, or an abstract Unix
/// socket to a same-host peer, whose process the kernel names ([`Stream::peer_pid`]).
/// `Send + Sync` like the std sockets.
#[derive(Debug)]
pub(crate) struct Stream {
    sock: OwnedFd,
    unix: bool,
}

/// A `sockaddr_un` for the abstract name `name` (no file), and its length.
fn abstract_addr(name: &str) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; zeroed is a valid empty address.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = name.as_bytes();
    if b.is_empty() || b.len() + 1 > a.sun_path.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // sun_path[0] stays 0: the abstract namespace.
    for (d, s) in a.sun_path[1..].iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + b.len();
    Ok((a, len as libc::socklen_t))
}

/// A new close-on-exec socket of `domain`/`ty`.
fn socket(domain: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Listens on the abstract Unix socket `name` (non-blocking, for the accept loop).
pub(crate) fn listen_local(name: &str) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK)?;
    let (a, len) = abstract_addr(name)?;
    // SAFETY: `a` is a valid sockaddr_un of `len` bytes; fd is open.
    if unsafe { libc::bind(fd.as_raw_fd(), &a as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Accepts one connection from a non-blocking Unix listener (`WouldBlock` if none).
pub(crate) fn accept_local(l: BorrowedFd<'_>) -> io::Result<Stream> {
    // SAFETY: accept4 on our listener; the peer address is not wanted (null, null).
    let fd = unsafe {
        libc::accept4(
            l.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Stream::from_unix(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd of process `pid` (`pidfd_open`, Linux ≥ 5.3).
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let p = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if p < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(p as RawFd) })
}

/// True once the process of `pidfd` exited (its pidfd polls readable); such a process
/// can touch no memory any more.
pub(crate) fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

fn set_timeouts(fd: RawFd) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: TICK.as_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a live timeval and its size is passed; fd is open.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Stream {
    /// Connects over TCP within `timeout`.
    pub(crate) fn connect(addr: &SocketAddr, timeout: Duration) -> io::Result<Stream> {
        let sock = TcpStream::connect_timeout(addr, timeout)?;
        Stream::from_std(sock)
    }

    /// Connects to the abstract Unix socket `name` within `timeout` (a full backlog is
    /// retried, never waited on without bound).
    pub(crate) fn connect_local(name: &str, timeout: Duration) -> io::Result<Stream> {
        let (a, len) = abstract_addr(name)?;
        let end = Instant::now() + timeout;
        loop {
            let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK)?;
            // SAFETY: `a` is a valid sockaddr_un of `len` bytes; fd is open.
            let r = unsafe {
                libc::connect(fd.as_raw_fd(), &a as *const _ as *const libc::sockaddr, len)
            };
            if r == 0 {
                // SAFETY: clears O_NONBLOCK on our socket (timeouts bound every call).
                unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, 0) };
                return Stream::from_unix(fd);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) || Instant::now() >= end {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sets the options on an accepted or connected TCP socket.
    pub(crate) fn from_std(sock: TcpStream) -> io::Result<Stream> {
        sock.set_nodelay(true)?;
        sock.set_nonblocking(false)?;
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
        set_timeouts(fd)?;
        Ok(Stream {
            sock: OwnedFd::from(sock),
            unix: false,
        })
    }

    /// Sets the options on an accepted or connected Unix socket.
    pub(crate) fn from_unix(sock: OwnedFd) -> io::Result<Stream> {
        set_timeouts(sock.as_raw_fd())?;
        Ok(Stream { sock, unix: true })
    }

    /// True for a Unix-socket (same-host) connection.
    pub(crate) fn is_local(&self) -> bool {
        self.unix
    }

    /// The pid of the process at the other end of a Unix socket, from the kernel
    /// (`SO_PEERCRED`: the peer's pid when it connected or listened), never claimed by
    /// the peer. `None` for TCP.
    pub(crate) fn peer_pid(&self) -> Option<u32> {
        if !self.unix {
            return None;
        }
        // SAFETY: ucred is plain data; zeroed is valid for getsockopt to overwrite.
        let mut c: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `c` is a live ucred of `len` bytes; fd is open.
        let r = unsafe {
            libc::getsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut c as *mut libc::ucred as *mut libc::c_void,
                &mut len,
            )
        };
        (r == 0 && c.pid > 0).then_some(c.pid as u32)
    }

    /// A pidfd of the process at the other end of a Unix socket: `SO_PEERPIDFD` (Linux
    /// ≥ 6.5, immune to pid reuse), else `pidfd_open` of [`Stream::peer_pid`].
    pub(crate) fn peer_pidfd(&self) -> Option<OwnedFd> {
        const SO_PEERPIDFD: libc::c_int = 77;
        if !self.unix {
            return None;
        }
        let mut fd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `fd` is a live c_int of `len` bytes; the socket is open.
        let r = unsafe {
            libc::getsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                &mut fd as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        if r == 0 && fd >= 0 {
            // SAFETY: the kernel handed us a fresh descriptor.
            return Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        pidfd_open(self.peer_pid()?).ok()
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
        shutdown_fd(self.sock.as_raw_fd());
    }

    /// A handle that shuts this socket down from another thread (a duplicate of its
    /// descriptor: shutting it down acts on the socket itself).
    pub(crate) fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(self.sock.try_clone()?))
    }
}

fn shutdown_fd(fd: RawFd) {
    // SAFETY: shutdown of an open socket; errors (already shut) are harmless.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Shuts a [`Stream`] down from elsewhere (see [`Stream::shutdown_handle`]).
#[derive(Debug)]
pub(crate) struct ShutdownHandle(OwnedFd);

impl ShutdownHandle {
    /// Shuts the socket down: every call blocked on it returns.
    pub(crate) fn shutdown(&self) {
        shutdown_fd(self.0.as_raw_fd());
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
}
