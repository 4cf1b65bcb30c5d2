//! Prepared transfers: how `prepare` cuts a request into I/O pieces, their run state,
//! and the bounce buffers that let unaligned pieces reach `O_DIRECT` files.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kv_core::{segments, Access, Descriptor, Error, Op, Result, Status, TransferRequest};
use kv_mem::HostBuffer;

use crate::io::IoFail;
use crate::memory::{find, LocalReg, Reg};

/// One piece of a transfer: `len` bytes between memory at `addr` and the file at
/// `offset`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IoOp {
    pub fd: RawFd,
    pub fixed_file: Option<u32>,
    pub offset: u64,
    pub addr: u64,
    pub len: u32,
    pub buf_index: Option<u16>,
    /// Unaligned for its `O_DIRECT` file: goes through a bounce buffer.
    pub bounce: bool,
    /// The file's alignment (1 when buffered).
    pub align: u64,
    /// VRAM on the memory side (cuFile path).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub vram: bool,
    /// Start of the memory registration (cuFile addresses registered VRAM as base +
    /// offset).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub base: u64,
}

/// A prepared transfer.
pub(crate) struct Transfer {
    pub op: Op,
    pub ops: Vec<IoOp>,
    /// Registrations (local memory and files) the transfer names.
    pub regs: Vec<u64>,
    pub total: u64,
    pub status: Status,
    pub run: Run,
    pub notification: Option<Bytes>,
    pub deadline: Option<Instant>,
}

/// What `prepare` checks and splits pieces against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// VRAM on the memory side (cuFile path).
    pub vram: bool,
    /// Pieces longer than this are split (kept a multiple of the file's alignment).
    pub max_io: u64,
    /// Unaligned pieces on `O_DIRECT` files go through bounce buffers instead of
    /// failing `prepare`.
    pub bounce: bool,
}

/// Cuts `req` into pieces: each segment is matched to the local registration
/// (`local`) and the imported file registration (`remote`) holding it. Returns the
/// pieces and the registrations (memory and files) they name, each once.
pub(crate) fn plan(
    req: &TransferRequest,
    regs: &HashMap<u64, Reg>,
    local: &[(Descriptor, LocalReg)],
    remote: &[(Descriptor, u64)],
    shape: Shape,
) -> Result<(Vec<IoOp>, Vec<u64>)> {
    let mut ops = Vec::new();
    let mut named: Vec<u64> = Vec::new();
    let (mut li, mut ri) = (0usize, 0usize);
    for seg in segments(&req.local, &req.remote)? {
        let (lreg, buf_index, base) = find(local, &seg.local, &mut li).ok_or_else(|| {
            Error::NotRegistered(format!(
                "local {} range {:#x}+{} lies outside every local registration",
                req.local_kind, seg.local.addr, seg.local.len
            ))
        })?;
        let freg = find(remote, &seg.remote, &mut ri).ok_or_else(|| {
            Error::OutOfBounds(format!(
                "{} range {}+{} of fd {} lies outside every imported registration",
                req.remote_kind, seg.remote.addr, seg.remote.len, seg.remote.device
            ))
        })?;
        check_access(req.op, regs, lreg, freg)?;
        for r in [lreg, freg] {
            if !named.contains(&r) {
                named.push(r);
            }
        }
        let Some((info, fixed)) = regs.get(&freg).and_then(|r| r.file()) else {
            return Err(Error::NotRegistered(format!("file registration {freg}")));
        };
        let first = IoOp {
            fd: info.fd.as_raw_fd(),
            fixed_file: fixed,
            offset: seg.remote.addr,
            addr: seg.local.addr,
            len: 0,
            buf_index,
            bounce: false,
            align: info.align,
            vram: shape.vram,
            base,
        };
        push_pieces(&mut ops, first, seg.local.len, seg.remote.device, shape)?;
    }
    Ok((ops, named))
}

/// Refuses a transfer that would write into a read-only registration: a READ's local
/// memory (`lreg`) or a WRITE's file range (`freg`).
fn check_access(op: Op, regs: &HashMap<u64, Reg>, lreg: u64, freg: u64) -> Result<()> {
    let (dest, what) = match op {
        Op::Read => (lreg, "memory a READ would fill"),
        Op::Write => (freg, "file range a WRITE would fill"),
    };
    match regs.get(&dest) {
        Some(r) if r.access == Access::ReadOnly => Err(Error::AccessDenied(format!(
            "registration {dest} ({what}) is read-only"
        ))),
        _ => Ok(()),
    }
}

/// Appends the pieces of one segment of `len` bytes starting as `first` (on the file
/// with descriptor number `device`): one bounce piece when it is unaligned for its
/// `O_DIRECT` file and bouncing is allowed, else pieces of at most `max_io`.
fn push_pieces(
    ops: &mut Vec<IoOp>,
    first: IoOp,
    len: u64,
    device: u32,
    shape: Shape,
) -> Result<()> {
    let (align, vram) = (first.align, shape.vram);
    let aligned =
        first.offset % align == 0 && len % align == 0 && (vram || first.addr % align == 0);
    if !aligned && !shape.bounce {
        return Err(Error::invalid_argument(format!(
            "fd {} is open with O_DIRECT, which needs file offset, length and memory address aligned to {align} bytes (its logical block size); got offset {}, length {}, address {:#x}. Align the blocks, open the file without O_DIRECT, or create the backend with bounce: true",
            device, first.offset, len, first.addr
        )));
    }
    if !aligned && vram {
        return Err(Error::invalid_argument(format!(
            "vram transfers to O_DIRECT files need offsets and lengths aligned to {align} bytes"
        )));
    }
    if !aligned {
        let len = u32::try_from(len).map_err(|_| {
            Error::invalid_argument(format!(
                "an unaligned piece of {len} bytes is too large for the bounce path (4 GiB at most)"
            ))
        })?;
        ops.push(IoOp {
            len,
            buf_index: None,
            bounce: true,
            ..first
        });
        return Ok(());
    }
    // Split at max_io, kept a multiple of the alignment.
    let step = (shape.max_io - shape.max_io % align).max(align);
    let mut off = 0u64;
    while off < len {
        let n = step.min(len - off);
        ops.push(IoOp {
            offset: first.offset + off,
            addr: first.addr + off,
            len: n as u32,
            buf_index: if vram { None } else { first.buf_index },
            ..first
        });
        off += n;
    }
    Ok(())
}

/// Why a running transfer stops early.
#[derive(Debug, Clone)]
pub(crate) enum Stop {
    Canceled,
    TimedOut(Instant),
}

/// The first failure of a run and the piece it happened on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failure {
    pub fail: IoFail,
    pub op: IoOp,
    /// Bytes of that piece that moved.
    pub bytes: u64,
}

/// The state of one post.
#[derive(Default)]
pub(crate) struct Run {
    /// Next piece to issue.
    pub next: usize,
    pub in_flight: usize,
    /// Bytes that reached their destination.
    pub landed: u64,
    pub failure: Option<Failure>,
    /// The engine failed while the transfer was being posted (after pieces were handed
    /// to it): nothing more is issued and the run ends with this error.
    pub engine_error: Option<Error>,
    pub stop: Option<Stop>,
    pub cancel_flag: Arc<AtomicBool>,
    pub started: Option<Instant>,
}

impl Run {
    /// True when no more pieces will be issued.
    pub fn issuing_done(&self, ops: usize) -> bool {
        self.next >= ops
            || self.failure.is_some()
            || self.stop.is_some()
            || self.engine_error.is_some()
    }
}

impl Transfer {
    /// A prepared, idle transfer of `op` moving `total` bytes in `ops`, naming the
    /// registrations `regs`.
    pub fn new(op: Op, ops: Vec<IoOp>, regs: Vec<u64>, total: u64) -> Transfer {
        Transfer {
            op,
            ops,
            regs,
            total,
            status: Status::Idle,
            run: Run::default(),
            notification: None,
            deadline: None,
        }
    }

    /// The final error of a failed run, naming how many bytes landed.
    pub fn final_error(&self) -> Option<Error> {
        let run = &self.run;
        if let Some(stop) = &run.stop {
            return Some(match stop {
                Stop::Canceled => Error::Canceled,
                Stop::TimedOut(start) => Error::TimedOut {
                    what: format!(
                        "gds {} of {} bytes ({} landed)",
                        self.op, self.total, run.landed
                    ),
                    after: start.elapsed(),
                },
            });
        }
        let tail = format!(
            "{} of {} bytes of the transfer landed before it failed; the rest did not",
            run.landed, self.total
        );
        if let Some(e) = &run.engine_error {
            let what = format!("gds {} of {} bytes, while posting", self.op, self.total);
            return Some(match e {
                Error::Io { context, source } => Error::Io {
                    context: format!("{what}: {context} ({tail})"),
                    source: source.clone(),
                },
                other => other.clone(),
            });
        }
        let f = run.failure?;
        let what = format!(
            "gds {} of {} bytes at offset {} of fd {}",
            self.op, f.op.len, f.op.offset, f.op.fd
        );
        Some(match f.fail {
            IoFail::Eof => Error::OutOfBounds(format!(
                "{what}: read past the end of the file after {} bytes of this piece; {tail}",
                f.bytes
            )),
            IoFail::Os(errno) => Error::io(
                format!("{what} ({tail})"),
                std::io::Error::from_raw_os_error(errno),
            ),
        })
    }
}

/// A bounce buffer standing in for an unaligned piece on an `O_DIRECT` file.
pub(crate) struct Bounce {
    buf: HostBuffer,
    /// Where the user's bytes start inside `buf`.
    head: usize,
    user_addr: u64,
    user_len: usize,
    write: bool,
    fd: RawFd,
    /// File offset of the user's bytes.
    offset: u64,
    /// For a write that extends the file: its size before, to cut the padding off.
    size_before: Option<u64>,
}

impl Bounce {
    /// Allocates the aligned buffer for `op` and, for a write, fills it: the partial
    /// blocks at both ends are read from the file first (read-modify-write), then the
    /// user's bytes copied in. Returns the bounce and the aligned (addr, len, offset).
    ///
    /// # Safety
    ///
    /// `op.addr..+len` must be valid for reads (the `post` contract).
    pub unsafe fn new(op: &IoOp, write: bool) -> Result<(Bounce, u64, u32, u64)> {
        let a = op.align.max(1);
        let end = op.offset + u64::from(op.len);
        let a_off = op.offset - op.offset % a;
        let a_end = end.div_ceil(a) * a;
        let blen = usize::try_from(a_end - a_off)
            .map_err(|_| Error::invalid_argument("bounce piece too large"))?;
        let blen32 = u32::try_from(blen)
            .map_err(|_| Error::invalid_argument("bounce pieces are limited to 4 GiB"))?;
        let mut buf = HostBuffer::alloc(blen, (a as usize).max(4096))?;
        let head = (op.offset - a_off) as usize;
        let mut size_before = None;
        if write {
            let size = crate::file::size_of(op.fd)
                .map_err(|e| Error::io(format!("fstat of fd {}", op.fd), e))?;
            let a = a as usize;
            let s = buf.as_mut_slice();
            if head != 0 {
                pread_full(op.fd, &mut s[..a], a_off)?;
            }
            if end % op.align.max(1) != 0 && (head == 0 || blen > a) {
                pread_full(op.fd, &mut s[blen - a..], a_end - a as u64)?;
            }
            // SAFETY: the caller guarantees the user range is readable; `s` is our own
            // allocation, so they cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    op.addr as *const u8,
                    s[head..].as_mut_ptr(),
                    op.len as usize,
                );
            }
            if a_end > size {
                size_before = Some(size);
            }
        }
        let addr = buf.as_mut_ptr() as u64;
        Ok((
            Bounce {
                buf,
                head,
                user_addr: op.addr,
                user_len: op.len as usize,
                write,
                fd: op.fd,
                offset: op.offset,
                size_before,
            },
            addr,
            blen32,
            a_off,
        ))
    }

    /// Ends the piece: for a read copies the user's bytes out (the aligned read may
    /// legitimately stop at the end of the file after them); for a write that extended
    /// the file trims the block padding. Returns the user bytes that landed.
    ///
    /// # Safety
    ///
    /// `user_addr..+user_len` must be valid for writes (the `post` contract).
    pub unsafe fn finish(
        &self,
        bytes: u64,
        fail: Option<IoFail>,
    ) -> std::result::Result<u64, IoFail> {
        let need = (self.head + self.user_len) as u64;
        if !self.write {
            match fail {
                None | Some(IoFail::Eof) if bytes >= need => {
                    // SAFETY: the user range is writable (caller); the source is ours.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.buf.as_slice()[self.head..].as_ptr(),
                            self.user_addr as *mut u8,
                            self.user_len,
                        );
                    }
                    Ok(self.user_len as u64)
                }
                Some(f) => Err(f),
                None => Err(IoFail::Eof),
            }
        } else {
            if let Some(f) = fail {
                return Err(f);
            }
            if let Some(before) = self.size_before {
                let user_end = self.offset + self.user_len as u64;
                let padded_end = self.offset - self.head as u64 + self.buf.len() as u64;
                // Trim only if no later write moved the end past our padding.
                if crate::file::size_of(self.fd).is_ok_and(|s| s == padded_end) {
                    // SAFETY: ftruncate on our own open fd.
                    let rc =
                        unsafe { libc::ftruncate(self.fd, before.max(user_end) as libc::off_t) };
                    if rc != 0 {
                        return Err(IoFail::Os(
                            std::io::Error::last_os_error()
                                .raw_os_error()
                                .unwrap_or(libc::EIO),
                        ));
                    }
                }
            }
            Ok(self.user_len as u64)
        }
    }

    /// True for a write (bounce writes run one at a time: read-modify-write of shared
    /// edge blocks must not interleave).
    pub fn is_write(&self) -> bool {
        self.write
    }

    /// Bytes of the bounce buffer (what is leaked if the backend must give it up).
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }
}

/// `pread` until `buf` is full or the file ends (the rest stays zero).
fn pread_full(fd: RawFd, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0usize;
    let mut retries = 0;
    while done < buf.len() {
        // SAFETY: reading into our own slice.
        let r = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) && retries < 1000 {
                retries += 1;
                continue;
            }
            return Err(Error::io(
                format!("reading the edge block at offset {offset} of fd {fd} for a bounce write"),
                e,
            ));
        }
        let short = (r as usize) < buf.len() - done;
        done += r as usize;
        // A short read of a regular file is its end (and continuing at an unaligned
        // offset would be refused by O_DIRECT anyway).
        if short {
            break;
        }
    }
    Ok(())
}
