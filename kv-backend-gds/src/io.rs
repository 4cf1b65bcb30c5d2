//! The unit of work every I/O engine takes and gives back: one contiguous piece between
//! memory and a file ([`IoReq`]), how it ended ([`IoDone`], [`IoFail`]), and the retry
//! limit the engines share.

use std::os::fd::RawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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
