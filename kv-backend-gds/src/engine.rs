//! The I/O engines: io_uring, or a thread pool of `pread`/`pwrite` workers.
//!
//! Both take [`IoReq`]s (one contiguous piece between memory and a file) and hand back
//! [`IoDone`]s. Each engine finishes a request completely before reporting it: short
//! transfers are resubmitted for the remainder, `EINTR`/`EAGAIN` are retried, a read
//! that reaches the end of the file is reported as [`IoFail::Eof`].

use std::os::fd::RawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use kv_core::Result;

use crate::pool::PoolEngine;
use crate::uring::UringEngine;

/// How many times `EAGAIN`/`EINTR` are retried for one request before it fails.
pub(crate) const MAX_RETRIES: u32 = 10_000;

/// One contiguous piece of I/O. `addr` must stay valid until its [`IoDone`] is reaped.
#[derive(Debug, Clone)]
pub(crate) struct IoReq {
    /// The caller's tag, returned in [`IoDone::tag`].
    pub tag: u64,
    /// Memory → file when true.
    pub write: bool,
    /// The file (our own dup).
    pub fd: RawFd,
    /// Its slot in the ring's registered-file table, if it has one.
    pub fixed_file: Option<u32>,
    /// Memory address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// File offset.
    pub offset: u64,
    /// Registered-buffer index covering `addr..addr+len`, if any.
    pub buf_index: Option<u16>,
    /// Set when the transfer is cancelled; the thread pool checks it before each call.
    pub cancel: Arc<AtomicBool>,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoFail {
    /// An errno from the kernel.
    Os(i32),
    /// A read reached the end of the file before `len` bytes.
    Eof,
}

/// A finished request: how many bytes moved, and the failure if it did not complete.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IoDone {
    /// The request's tag.
    pub tag: u64,
    /// Bytes transferred (all of `len` on success).
    pub bytes: u64,
    /// `None` when every byte moved.
    pub fail: Option<IoFail>,
}

/// The engine in use. `Send`.
pub(crate) enum Engine {
    Uring(Box<UringEngine>),
    Pool(PoolEngine),
}

impl Engine {
    /// Requests that can be added now without exceeding the queue depth.
    pub fn free(&self) -> usize {
        match self {
            Engine::Uring(e) => e.free(),
            Engine::Pool(e) => e.free(),
        }
    }

    /// Requests in flight (queued or running).
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(e) => e.in_flight(),
            Engine::Pool(e) => e.in_flight(),
        }
    }

    /// Queues `req`; the caller checked [`Engine::free`].
    ///
    /// # Safety
    ///
    /// `req.addr..+len` must stay valid for the kernel (or a worker) to read or write
    /// until the request's [`IoDone`] has been returned by [`Engine::flush`].
    pub unsafe fn push(&mut self, req: IoReq) {
        match self {
            // SAFETY: forwarded contract.
            Engine::Uring(e) => unsafe { e.push(req) },
            Engine::Pool(e) => e.push(req),
        }
    }

    /// Submits what was queued and appends finished requests to `out`; when `wait`,
    /// blocks until at least one request finishes (if any is in flight).
    pub fn flush(&mut self, wait: bool, out: &mut Vec<IoDone>) -> Result<()> {
        match self {
            Engine::Uring(e) => e.flush(wait, out),
            Engine::Pool(e) => e.flush(wait, out),
        }
    }

    /// Asks the kernel to cancel the in-flight requests whose tag matches; they still
    /// report through [`Engine::flush`] (as `ECANCELED` or with their real result).
    pub fn cancel(&mut self, matches: &dyn Fn(u64) -> bool) {
        match self {
            Engine::Uring(e) => e.cancel(matches),
            // Workers watch the request's cancel flag; nothing to submit.
            Engine::Pool(_) => {}
        }
    }

    /// Registers a memory range as a fixed buffer; `None` when the engine has none
    /// (thread pool, table full, kernel refused).
    ///
    /// # Safety
    ///
    /// The range must stay valid until [`Engine::unregister_buffer`] of the index.
    pub unsafe fn register_buffer(&mut self, addr: u64, len: u64) -> Option<u16> {
        match self {
            // SAFETY: forwarded contract.
            Engine::Uring(e) => unsafe { e.register_buffer(addr, len) },
            Engine::Pool(_) => None,
        }
    }

    /// Frees a fixed-buffer slot (no request may still use it).
    pub fn unregister_buffer(&mut self, index: u16) {
        if let Engine::Uring(e) = self {
            e.unregister_buffer(index)
        }
    }

    /// Registers a file in the ring's table; `None` when not possible.
    pub fn register_file(&mut self, fd: RawFd) -> Option<u32> {
        match self {
            Engine::Uring(e) => e.register_file(fd),
            Engine::Pool(_) => None,
        }
    }

    /// Frees a registered-file slot (no request may still use it).
    pub fn unregister_file(&mut self, index: u32) {
        if let Engine::Uring(e) = self {
            e.unregister_file(index)
        }
    }
}

/// True when `pos` is at or past the end of the file open as `fd` (a short read there
/// is the end of the file, not a partial read to resubmit).
pub(crate) fn at_eof(fd: RawFd, pos: u64) -> bool {
    crate::file::size_of(fd).is_ok_and(|size| pos >= size)
}
