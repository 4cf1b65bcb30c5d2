//! The io_uring engine: one ring, registered (fixed) buffers and files, batched
//! submission, completions reaped without blocking unless asked to.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use kv_core::{Error, Result};

use crate::io::{IoDone, IoFail, IoReq, MAX_RETRIES};

/// `user_data` of cancel SQEs, whose own completions are ignored.
const CANCEL_TAG: u64 = u64::MAX;
/// Slots of the sparse registered-buffer table.
const BUFFER_SLOTS: u32 = 256;
/// Slots of the sparse registered-file table.
const FILE_SLOTS: u32 = 1024;
/// The kernel's per-buffer limit for `IORING_REGISTER_BUFFERS`.
const MAX_FIXED_BUFFER: u64 = 1 << 30;
/// Attempts to hand a full submission queue to the kernel before an entry is given up
/// (a request then fails with `EBUSY`; a cancel is dropped): no loop here is unbounded.
const SQ_FULL_TRIES: u32 = 1_000;
/// Rounds a non-blocking flush makes while the kernel refuses queued entries (`EBUSY`,
/// `EAGAIN`); they stay queued for the next flush.
const FLUSH_ROUNDS: u32 = 64;

struct Slot {
    req: IoReq,
    done: u64,
    retries: u32,
    canceled: bool,
}

/// One ring. `Send` (owned by the backend's lock), not shared.
pub(crate) struct UringEngine {
    ring: IoUring,
    depth: usize,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    buffers: Option<Vec<bool>>,
    files: Option<Vec<bool>>,
    cqes: Vec<(u64, i32)>,
    /// Requests finished since the last reap (handed out by it).
    finished: Vec<IoDone>,
    /// SQEs are handed to the kernel as soon as this many are queued.
    submit_batch: usize,
    /// The kernel bounds a wait by a timeout (`IORING_FEAT_EXT_ARG`, 5.11).
    ext_arg: bool,
}

impl UringEngine {
    /// A ring of `depth` entries that hands queued SQEs to the kernel in groups of
    /// `submit_batch` (see [`crate::Options::submit_batch`]). Fails when io_uring is
    /// missing or blocked (old kernel, `kernel.io_uring_disabled`, seccomp).
    pub fn new(
        depth: usize,
        submit_batch: usize,
        fixed_buffers: bool,
        fixed_files: bool,
    ) -> Result<UringEngine> {
        let depth = depth.clamp(1, 4096);
        let unavailable = |what: &str, e: std::io::Error| Error::BackendUnavailable {
            name: "gds".into(),
            reason: format!(
                "io_uring {what} failed: {e}; the kernel lacks io_uring or it is blocked \
                 (kernel.io_uring_disabled, seccomp)"
            ),
        };
        let mut ring = IoUring::builder()
            .setup_cqsize(2 * depth as u32)
            .build(depth as u32)
            .map_err(|e| unavailable("setup", e))?;
        // A NOP round trip: seccomp may allow io_uring_setup yet block io_uring_enter.
        let nop = opcode::Nop::new().build().user_data(CANCEL_TAG);
        // SAFETY: a NOP references no memory.
        unsafe { ring.submission().push(&nop) }
            .map_err(|_| unavailable("first submission", std::io::ErrorKind::Other.into()))?;
        ring.submit_and_wait(1)
            .map_err(|e| unavailable("io_uring_enter", e))?;
        ring.completion().for_each(drop);
        let buffers = if fixed_buffers {
            match ring.submitter().register_buffers_sparse(BUFFER_SLOTS) {
                Ok(()) => Some(vec![false; BUFFER_SLOTS as usize]),
                Err(e) => {
                    tracing::info!(
                        "io_uring registered buffers unavailable ({e}); using plain READ/WRITE"
                    );
                    None
                }
            }
        } else {
            None
        };
        let files = if fixed_files {
            match ring.submitter().register_files_sparse(FILE_SLOTS) {
                Ok(()) => Some(vec![false; FILE_SLOTS as usize]),
                Err(e) => {
                    tracing::info!("io_uring registered files unavailable ({e}); using plain fds");
                    None
                }
            }
        } else {
            None
        };
        let ext_arg = ring.params().is_feature_ext_arg();
        Ok(UringEngine {
            ring,
            depth,
            slots: Vec::new(),
            free_slots: Vec::new(),
            in_flight: 0,
            buffers,
            files,
            cqes: Vec::with_capacity(2 * depth),
            finished: Vec::new(),
            submit_batch: submit_batch.clamp(1, depth),
            ext_arg,
        })
    }

    /// The queue depth.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// How many queued SQEs trigger a submission.
    pub fn submit_batch(&self) -> usize {
        self.submit_batch
    }

    /// Whether registered buffers / files are in use.
    pub fn fixed(&self) -> (bool, bool) {
        (self.buffers.is_some(), self.files.is_some())
    }

    pub fn free(&self) -> usize {
        self.depth - self.in_flight
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// # Safety
    ///
    /// See [`crate::engine::Engine::push`].
    pub unsafe fn push(&mut self, req: IoReq) {
        let idx = match self.free_slots.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[idx] = Some(Slot {
            req,
            done: 0,
            retries: 0,
            canceled: false,
        });
        self.in_flight += 1;
        self.enqueue(idx);
    }

    /// Puts slot `idx`'s remaining bytes in the submission queue; when the kernel will
    /// not take entries, the request ends with `EBUSY` (it never reached the kernel).
    fn enqueue(&mut self, idx: usize) {
        let Some(slot) = self.slots[idx].as_ref() else {
            return;
        };
        let entry = build(&slot.req, slot.done).user_data(idx as u64);
        if !self.push_entry(&entry) {
            self.finish(idx, Some(IoFail::Os(libc::EBUSY)));
        }
    }

    /// Queues `entry`, submitting when `submit_batch` entries wait. Returns false when
    /// the submission queue stayed full for [`SQ_FULL_TRIES`] submissions (the entry was
    /// not queued).
    fn push_entry(&mut self, entry: &squeue::Entry) -> bool {
        for _ in 0..SQ_FULL_TRIES {
            // SAFETY: the entry's buffer is valid until its completion is reaped (the
            // `push` contract); cancel and NOP entries reference no memory.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                if self.ring.submission().len() >= self.submit_batch {
                    // Start the device on these now rather than after the whole refill
                    // is built: a batch submitted at once is plugged and kicked as one,
                    // and the device idles meanwhile (README, "Measured"). On failure
                    // the entries stay queued for `flush`.
                    if let Err(e) = self.ring.submit() {
                        tracing::debug!("io_uring eager submit: {e}; left for flush");
                    }
                }
                return true;
            }
            // The SQ is full (only when cancels pile on top of requests): hand it over.
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submit while the SQ was full: {e}");
                std::thread::yield_now();
            }
        }
        false
    }

    /// Submits what was queued and reaps completions into `out`. With `wait`, blocks up
    /// to that long for a first completion when requests are in flight: the wait is
    /// bounded even when the device never answers.
    pub fn flush(&mut self, wait: Option<Duration>, out: &mut Vec<IoDone>) -> Result<()> {
        let before = out.len();
        let deadline = wait.map(|d| Instant::now() + d);
        let mut rounds = 0u32;
        loop {
            let left = deadline.map_or(Duration::ZERO, |d| {
                d.saturating_duration_since(Instant::now())
            });
            let block = !left.is_zero() && self.in_flight > 0 && out.len() == before;
            let pending = !self.ring.submission().is_empty();
            if pending || block || self.in_flight > 0 {
                // Entering the kernel also runs completion task work, so even a
                // non-blocking flush with nothing to submit makes progress visible.
                let r = if block {
                    self.enter_and_wait(left)
                } else {
                    self.ring.submit()
                };
                match r {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
                        ) => {}
                    Err(e) => return Err(Error::io("io_uring_enter", e)),
                }
            }
            self.reap(out);
            rounds += 1;
            let waiting = deadline.is_some_and(|d| Instant::now() < d)
                && self.in_flight > 0
                && out.len() == before;
            let pending = !self.ring.submission().is_empty();
            if waiting {
                continue;
            }
            if !pending || rounds >= FLUSH_ROUNDS {
                return Ok(());
            }
        }
    }

    /// Submits and waits up to `left` for one completion.
    fn enter_and_wait(&mut self, left: Duration) -> std::io::Result<usize> {
        if self.ext_arg {
            let ts = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&ts);
            return self.ring.submitter().submit_with_args(1, &args);
        }
        // Kernels before 5.11 cannot bound the wait: poll instead.
        let n = self.ring.submit()?;
        if self.ring.completion().is_empty() {
            std::thread::sleep(left.min(Duration::from_micros(200)));
        }
        Ok(n)
    }

    fn reap(&mut self, out: &mut Vec<IoDone>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &cqes {
            if ud == CANCEL_TAG {
                continue;
            }
            self.complete(ud as usize, res);
        }
        self.cqes = cqes;
        out.append(&mut self.finished);
    }

    fn complete(&mut self, idx: usize, res: i32) {
        let Some(slot) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            tracing::warn!(idx, "io_uring completion for an unknown slot");
            return;
        };
        let len = u64::from(slot.req.len);
        let fail = if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EINTR | libc::EAGAIN)
                && !slot.canceled
                && slot.retries < MAX_RETRIES
            {
                slot.retries += 1;
                self.enqueue(idx);
                return;
            }
            Some(IoFail::Os(errno))
        } else {
            slot.done += res as u64;
            if slot.done >= len {
                None
            } else if slot.canceled {
                Some(IoFail::Os(libc::ECANCELED))
            } else if !slot.req.write
                && (res == 0 || crate::file::at_eof(slot.req.fd, slot.req.offset + slot.done))
            {
                Some(IoFail::Eof)
            } else if res == 0 {
                // A write that moved nothing and reported no error: do not spin on it.
                Some(IoFail::Os(libc::EIO))
            } else {
                // Short transfer: resubmit the remainder.
                self.enqueue(idx);
                return;
            }
        };
        self.finish(idx, fail);
    }

    /// Frees slot `idx` and reports its request finished with `fail` (through
    /// `finished`, handed out by the next reap).
    fn finish(&mut self, idx: usize, fail: Option<IoFail>) {
        let Some(slot) = self.slots.get_mut(idx).and_then(|s| s.take()) else {
            return;
        };
        self.free_slots.push(idx);
        self.in_flight -= 1;
        self.finished.push(IoDone {
            tag: slot.req.tag,
            bytes: slot.done,
            fail,
        });
    }

    pub fn cancel(&mut self, matches: &dyn Fn(u64) -> bool) {
        let mut targets = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(s) = s {
                if matches(s.req.tag) && !s.canceled {
                    s.canceled = true;
                    targets.push(i);
                }
            }
        }
        for i in targets {
            let e = opcode::AsyncCancel::new(i as u64)
                .build()
                .user_data(CANCEL_TAG);
            if !self.push_entry(&e) {
                // Best effort: the request still ends on its own.
                tracing::warn!(slot = i, "io_uring cancel not queued: the SQ stayed full");
            }
        }
    }

    /// # Safety
    ///
    /// See [`crate::engine::Engine::register_buffer`].
    pub unsafe fn register_buffer(&mut self, addr: u64, len: u64) -> Option<u16> {
        if len == 0 || len > MAX_FIXED_BUFFER {
            return None;
        }
        let table = self.buffers.as_mut()?;
        let idx = table.iter().position(|used| !used)?;
        let iov = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len as usize,
        };
        // SAFETY: the caller keeps the range valid until `unregister_buffer`.
        match unsafe {
            self.ring
                .submitter()
                .register_buffers_update(idx as u32, &[iov], None)
        } {
            Ok(()) => {
                table[idx] = true;
                Some(idx as u16)
            }
            Err(e) => {
                tracing::debug!(
                    addr,
                    len,
                    "registering a fixed buffer failed ({e}); plain I/O for it"
                );
                None
            }
        }
    }

    pub fn unregister_buffer(&mut self, index: u16) {
        let Some(table) = self.buffers.as_mut() else {
            return;
        };
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty iovec clears the slot; it references no memory.
        if let Err(e) = unsafe {
            self.ring
                .submitter()
                .register_buffers_update(u32::from(index), &[empty], None)
        } {
            tracing::warn!(index, "clearing a fixed buffer slot failed: {e}");
        }
        if let Some(u) = table.get_mut(usize::from(index)) {
            *u = false;
        }
    }

    pub fn register_file(&mut self, fd: RawFd) -> Option<u32> {
        let table = self.files.as_mut()?;
        let idx = table.iter().position(|used| !used)?;
        match self
            .ring
            .submitter()
            .register_files_update(idx as u32, &[fd])
        {
            Ok(_) => {
                table[idx] = true;
                Some(idx as u32)
            }
            Err(e) => {
                tracing::debug!(fd, "registering a file failed ({e}); plain fd for it");
                None
            }
        }
    }

    pub fn unregister_file(&mut self, index: u32) {
        let Some(table) = self.files.as_mut() else {
            return;
        };
        if let Err(e) = self.ring.submitter().register_files_update(index, &[-1]) {
            tracing::warn!(index, "clearing a registered file slot failed: {e}");
        }
        if let Some(u) = table.get_mut(index as usize) {
            *u = false;
        }
    }
}

/// The SQE for the remaining bytes of `req`, after `done` bytes moved.
fn build(req: &IoReq, done: u64) -> squeue::Entry {
    let addr = (req.addr + done) as *mut u8;
    let len = req.len - done as u32;
    let off = req.offset + done;
    macro_rules! rw {
        ($fd:expr) => {
            match (req.write, req.buf_index) {
                (false, Some(b)) => opcode::ReadFixed::new($fd, addr, len, b)
                    .offset(off)
                    .build(),
                (true, Some(b)) => opcode::WriteFixed::new($fd, addr, len, b)
                    .offset(off)
                    .build(),
                (false, None) => opcode::Read::new($fd, addr, len).offset(off).build(),
                (true, None) => opcode::Write::new($fd, addr, len).offset(off).build(),
            }
        };
    }
    match req.fixed_file {
        Some(i) => rw!(types::Fixed(i)),
        None => rw!(types::Fd(req.fd)),
    }
}
