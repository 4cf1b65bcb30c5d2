//! Transfers: the prepared [`Transfer`] with its plan (the segments, computed once at
//! `prepare`), the state of one post ([`Flight`]), the issuing of a post's operations
//! ([`Issue`]: segments grouped into operation messages), and the tracking of UCX
//! requests: a [`Group`] is every request one post (or one notification) issued,
//! completed through a shared counter that UCX's send callback decrements, and it keeps
//! every buffer those requests read alive until they complete. [`Transfers`] is the
//! table of transfers with the bookkeeping of their operations and of what aborted
//! ones left behind (quarantine).

use std::borrow::Cow;
use std::ffi::c_void;
use std::sync::atomic::{AtomicI8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kv_core::{segments, Descriptor, DescriptorList, Error, Op, Result, Status, TransferRequest};

use crate::clock::{Coarse, Deadline};
use crate::ffi::{self, ucs_status_ptr_t, ucs_status_t, Lib, UCS_OK};
use crate::ids::IdMap;
use crate::memory::Import;
use crate::serve::AM_OP_ID;
use crate::shared::{ffi_guard, OpEntry, ReadDest, Shared};
use crate::wire::{AckCode, MapSrc, OpEntry as WireEntry, OpHeader, OpKind, MAX_ENTRIES};

/// Most bytes one batched (eager) operation message carries.
pub const BATCH_MAX: u64 = 256 << 10;
/// Most bytes one mapped operation moves (the target copies them inside one callback).
pub const MAPPED_BATCH_MAX: u64 = 4 << 20;
/// Longest piece of a mapped operation (longer segments are split).
pub const MAPPED_PIECE: u64 = 4 << 20;

/// Outstanding-request count and first error of a group. Lives in a `Box` so its address
/// stays fixed while UCX holds it as a callback's `user_data`.
struct Counter {
    pending: AtomicUsize,
    error: AtomicI8,
}

/// UCX's completion callback for every request of a group (`ucp_send_nbx_callback_t`).
///
/// Runs inside `ucp_worker_progress` (or a UCX call that completes requests, such as a
/// forced endpoint close), always with the backend's worker lock held.
///
/// # Safety
/// Called only by UCX, once per request of a group: `user_data` is the boxed `Counter`
/// of that group (null is ignored), which stays allocated while any of its requests is
/// outstanding (`Group::drop` frees them first, or leaks the counter).
unsafe extern "C" fn on_complete(_req: *mut c_void, status: ucs_status_t, user_data: *mut c_void) {
    ffi_guard((), || {
        if user_data.is_null() {
            return;
        }
        // SAFETY: `user_data` is the `Counter` of a live `Group`: a group is never
        // dropped while requests that name it are outstanding (see `Group::drop`).
        let c = unsafe { &*(user_data as *const Counter) };
        if status != UCS_OK {
            let _ = c
                .error
                .compare_exchange(0, status, Ordering::AcqRel, Ordering::Acquire);
        }
        c.pending.fetch_sub(1, Ordering::AcqRel);
    })
}

/// The requests of one post or notification, their completion state, and the buffers
/// they read (kept until they complete; leaked if the group drops before).
///
/// Not `Send` by itself (raw request pointers); it lives inside the backend's worker
/// state, which is only touched under the worker lock.
pub struct Group {
    /// Made at the group's first issue (UCX needs its address before the call), so a
    /// group that never issues — the placeholder of a post not issued yet — allocates
    /// none.
    counter: Option<Box<Counter>>,
    reqs: Vec<*mut c_void>,
    /// Buffers UCX reads until the group's requests complete (headers, gathered data).
    keep: Vec<Vec<u8>>,
    /// Payloads UCX reads until the group's requests complete (notifications).
    keep_bytes: Vec<Bytes>,
    lib: Arc<Lib>,
}

impl Group {
    /// An empty group (done until something is tracked).
    pub fn new(lib: &Arc<Lib>) -> Group {
        Group {
            counter: None,
            reqs: Vec::new(),
            keep: Vec::new(),
            keep_bytes: Vec::new(),
            lib: lib.clone(),
        }
    }

    /// Request parameters whose completion lands in this group; `flags` are
    /// operation-specific (`UCP_AM_SEND_FLAG_*`).
    fn param(&mut self, flags: u32) -> ffi::ucp_request_param_t {
        let mut p = ffi::ucp_request_param_t::empty();
        p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_CALLBACK | ffi::UCP_OP_ATTR_FIELD_USER_DATA;
        if flags != 0 {
            p.op_attr_mask |= ffi::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = flags;
        }
        p.cb = ffi::ucp_request_cb_t {
            send: Some(on_complete),
        };
        let c: &Counter = self.counter.get_or_insert_with(new_counter);
        p.user_data = c as *const Counter as *mut c_void;
        p
    }

    /// Issues one operation through `issue` (which gets this group's parameters) and
    /// tracks what UCX returned. Returns the status of an operation that finished at
    /// once with an error; `Ok(true)` when it is in flight (what it reads must then be
    /// kept, [`Group::keep`], until the group is done), `Ok(false)` when it completed
    /// (UCX keeps no pointer into its buffers).
    ///
    /// UCX runs the callback only from a later progress call (never inside the call
    /// that returned the request), and both happen under the worker lock.
    pub fn issue(
        &mut self,
        flags: u32,
        issue: impl FnOnce(&ffi::ucp_request_param_t) -> ucs_status_ptr_t,
    ) -> Result<bool, ucs_status_t> {
        let p = self.param(flags);
        let r = issue(&p);
        if ffi::ptr_is_request(r) {
            // `param` made the counter; UCX calls back only from a later progress.
            if let Some(c) = &self.counter {
                c.pending.fetch_add(1, Ordering::AcqRel);
            }
            self.reqs.push(r);
            return Ok(true);
        }
        match ffi::ptr_status(r) {
            UCS_OK => Ok(false),
            s => {
                self.fail(s);
                Err(s)
            }
        }
    }

    /// Keeps `buf` alive (its heap data at a fixed address) for as long as the group's
    /// requests may read it; returns its address.
    pub fn keep(&mut self, buf: Vec<u8>) -> *const u8 {
        let p = buf.as_ptr();
        self.keep.push(buf);
        p
    }

    /// Keeps `b` alive for as long as the group's requests may read it; returns its
    /// address.
    pub fn keep_bytes(&mut self, b: Bytes) -> *const u8 {
        let p = b.as_ptr();
        self.keep_bytes.push(b);
        p
    }

    /// Records an error that happened outside UCX's callbacks.
    fn fail(&mut self, s: ucs_status_t) {
        let _ = self
            .counter
            .get_or_insert_with(new_counter)
            .error
            .compare_exchange(0, s, Ordering::AcqRel, Ordering::Acquire);
    }

    /// True when no request of the group is outstanding.
    pub fn done(&self) -> bool {
        self.counter
            .as_ref()
            .is_none_or(|c| c.pending.load(Ordering::Acquire) == 0)
    }

    /// The first error any request of the group reported.
    pub fn error(&self) -> Option<ucs_status_t> {
        match self.counter.as_ref()?.error.load(Ordering::Acquire) {
            0 => None,
            s => Some(s),
        }
    }
}

fn new_counter() -> Box<Counter> {
    Box::new(Counter {
        pending: AtomicUsize::new(0),
        error: AtomicI8::new(0),
    })
}

impl Drop for Group {
    fn drop(&mut self) {
        for r in self.reqs.drain(..) {
            // SAFETY: ucp_request_free may be called on any request not yet freed,
            // complete or not; no callback runs for it afterwards.
            unsafe { (self.lib.request_free)(r) };
        }
        if !self.done() {
            // UCX was still driving an operation of this group: it may still read the
            // buffers. Leak them (and the counter) rather than free memory UCX may use.
            if let Some(c) = self.counter.take() {
                Box::leak(c);
            }
            for b in self.keep.drain(..) {
                std::mem::forget(b);
            }
            for b in self.keep_bytes.drain(..) {
                std::mem::forget(b);
            }
        }
    }
}

/// The in-flight part of a posted transfer.
pub struct Flight {
    /// The post's send requests.
    pub data: Group,
    /// Which post of the transfer this is.
    pub post: u64,
    /// When it was posted (read only for a post with a deadline, which reads the clock
    /// anyway): the deadline's coarse form is made from it, and it says how long a
    /// timed-out post had.
    pub posted: Option<Instant>,
    /// When it times out.
    pub deadline: Option<Deadline>,
    /// Where its notification is.
    pub note: NoteState,
    /// The operations it sent (awaiting or having had their answers).
    pub ops: Vec<u64>,
    /// How many of them the target has not answered yet.
    pub unanswered: usize,
    /// The first error a target answered with.
    pub answer_error: Option<AckCode>,
    /// The operations were issued (false while the endpoint authenticates).
    pub issued: bool,
    /// `cancel` could not stop it at once: it ends `Canceled` when it completes.
    pub canceled: bool,
    /// A failure outside UCX and the target (authentication, a refused send,
    /// the endpoint gone).
    pub error: Option<Error>,
}

/// Why a transfer's data failed.
#[derive(Debug, Clone)]
pub enum Fail {
    /// A UCX request failed.
    Ucs(ucs_status_t),
    /// The target refused an operation.
    Ack(AckCode),
    /// Something else (see [`Flight::error`]).
    Other(Error),
}

impl Flight {
    /// A post not issued yet.
    pub fn new(
        lib: &Arc<Lib>,
        post: u64,
        posted: Option<Instant>,
        deadline: Option<Instant>,
        note: NoteState,
    ) -> Flight {
        Flight {
            data: Group::new(lib),
            post,
            posted,
            deadline: deadline.map(|at| Deadline::new(at, posted)),
            note,
            ops: Vec::new(),
            unanswered: 0,
            answer_error: None,
            issued: false,
            canceled: false,
            error: None,
        }
    }

    /// UCX gave back every request and every operation was answered (or the post
    /// failed and UCX gave back its requests).
    #[inline]
    pub fn complete(&self) -> bool {
        self.issued && self.data.done() && (self.unanswered == 0 || self.error.is_some())
    }

    /// The first failure (ours, then UCX's, then the target's).
    #[inline]
    pub fn failure(&self) -> Option<Fail> {
        self.error
            .clone()
            .map(Fail::Other)
            .or(self.data.error().map(Fail::Ucs))
            .or(self.answer_error.map(Fail::Ack))
    }
}

/// Where a post's notification is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteState {
    /// The post has none.
    None,
    /// Waiting for the data.
    Queued,
    /// Sent, not yet complete.
    Issued,
    /// Sent and complete.
    Delivered,
    /// Dropped or failed.
    Failed(ucs_status_t),
}

/// A prepared transfer.
pub struct Transfer {
    /// WRITE or READ.
    pub op: Op,
    /// The endpoint it goes through.
    pub endpoint: u64,
    /// Local descriptors.
    pub local: DescriptorList,
    /// Remote descriptors.
    pub remote: DescriptorList,
    /// The local registrations that hold `local`.
    pub local_regs: Vec<u64>,
    /// The imports that hold `remote`.
    pub remote_ids: Vec<u64>,
    /// What a post needs of them (an import never changes while its id lives; a post
    /// first checks that each still does).
    pub imports: Vec<Import>,
    /// What `poll` reports.
    pub status: Status,
    /// The post in flight, if any.
    pub flight: Option<Flight>,
    /// How many times it was posted.
    pub posts: u64,
    /// The segments (`kv_core::segments`) with their import, computed at prepare
    /// (unless there are more than [`PLAN_MAX`]): a post then walks a flat array.
    pub plan: Option<Vec<Seg>>,
}

/// Most segments a prepared transfer keeps precomputed (32 bytes each).
const PLAN_MAX: usize = 1 << 16;

/// One piece of a post: addresses, length and the index of its import in the
/// transfer's `remote_ids`.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    local: u64,
    remote: u64,
    len: u64,
    range: usize,
}

/// The index of the range in `ranges` that holds `d`, trying `*last` first (segments
/// usually fall in the same range as the one before); updates `*last`.
fn find_range<'a>(
    d: &Descriptor,
    ranges: impl Iterator<Item = &'a Descriptor> + Clone,
    last: &mut usize,
) -> Option<usize> {
    if ranges.clone().nth(*last).is_some_and(|r| r.contains(d)) {
        return Some(*last);
    }
    let i = ranges.into_iter().position(|r| r.contains(d))?;
    *last = i;
    Some(i)
}

/// The segments of `local` x `remote` with the index of the range in `ranges` each
/// remote piece lies in; `None` when there are more than `max` (or a piece lies outside
/// every range, which prepare rules out first).
fn plan(
    local: &DescriptorList,
    remote: &DescriptorList,
    ranges: &[Descriptor],
    max: usize,
) -> Option<Vec<Seg>> {
    let mut out = Vec::new();
    let mut last = 0;
    for seg in segments(local, remote).ok()? {
        if out.len() == max {
            return None;
        }
        let range = find_range(&seg.remote, ranges.iter(), &mut last)?;
        out.push(Seg {
            local: seg.local.addr,
            remote: seg.remote.addr,
            len: seg.local.len,
            range,
        });
    }
    Some(out)
}

impl Transfer {
    /// A transfer prepared from `req`: its local registrations, its imports and their
    /// ranges (the plan's `range` indexes them).
    pub fn new(
        req: &TransferRequest,
        local_regs: Vec<u64>,
        remote_ids: Vec<u64>,
        imports: Vec<Import>,
        ranges: &[Descriptor],
    ) -> Transfer {
        let plan = plan(&req.local, &req.remote, ranges, PLAN_MAX);
        Transfer {
            op: req.op,
            endpoint: req.peer.0,
            local: req.local.clone(),
            remote: req.remote.clone(),
            local_regs,
            remote_ids,
            imports,
            status: Status::Idle,
            flight: None,
            posts: 0,
            plan,
        }
    }

    /// The segments of a post: the plan made at prepare, or (over [`PLAN_MAX`]
    /// segments) one made for this post only against `imports`' ranges.
    #[inline]
    pub fn segments(&self, imports: &[Import]) -> Result<Cow<'_, [Seg]>> {
        match &self.plan {
            Some(p) => Ok(Cow::Borrowed(p)),
            None => {
                segments(&self.local, &self.remote)?; // the lists' sizes must agree
                let ranges: Vec<Descriptor> = imports.iter().map(|r| r.desc).collect();
                let made =
                    plan(&self.local, &self.remote, &ranges, usize::MAX).ok_or_else(|| {
                        Error::OutOfBounds("a remote descriptor lies outside every import".into())
                    })?;
                Ok(Cow::Owned(made))
            }
        }
    }
}

/// Where and how one post's operations go (see [`Issue::run`]).
pub struct Issue<'a> {
    /// The library.
    pub lib: &'a Arc<Lib>,
    /// The callbacks' state (operations are recorded and sealed there).
    pub shared: &'a Shared,
    /// WRITE or READ.
    pub op: Op,
    /// The live UCP endpoint.
    pub uep: ffi::ucp_ep_h,
    /// Its id (its session seals the headers).
    pub ep_id: u64,
    /// Segments of at least this many bytes go alone, by rendezvous.
    pub rndv_min: u64,
    /// Most entries per message (what UCX's header limit allows).
    pub max_entries: usize,
    /// The transfer's imports, indexed as the segments' `range`.
    pub imports: &'a [Import],
    /// Our backend instance (named in headers, so answers find us).
    pub instance: u64,
    /// Send mapped operations naming this allocation (every local piece lies in it, and
    /// the target reaches it over shared memory); `None`: the data travels in messages.
    pub src: Option<&'a MapSrc>,
    /// Largest header UCX takes (bounds a mapped operation's entries).
    pub max_header: usize,
}

/// What [`Issue::run`] started.
pub struct Issued {
    /// Every send request of the post.
    pub data: Group,
    /// The operations sent.
    pub ops: Vec<u64>,
    /// Why issuing stopped early, if it did.
    pub error: Option<Error>,
}

/// One operation message being built: its entries and local pieces.
#[derive(Default)]
struct Batch {
    entries: Vec<WireEntry>,
    pieces: Vec<(u64, u64)>,
    bytes: u64,
}

impl Issue<'_> {
    /// Sends the segments as operation messages: a segment of at least `rndv_min` bytes
    /// alone (rendezvous, straight from/into place), smaller ones batched (eager, up to
    /// [`BATCH_MAX`] bytes or `max_entries`). Stops at the first message UCX refused.
    ///
    /// Only for `Core`, under the state lock: the segments' local ranges are those the
    /// caller of `Backend::post` keeps valid and registered, and `uep` was checked live.
    pub fn run(&self, segs: &[Seg], next_op: &mut u64) -> Issued {
        let mut out = Issued {
            data: Group::new(self.lib),
            ops: Vec::new(),
            error: None,
        };
        if let Some(src) = self.src {
            self.run_mapped(src, segs, &mut out, next_op);
            return out;
        }
        let batch_max = self.rndv_min.min(BATCH_MAX);
        let mut batch = Batch::default();
        for seg in segs {
            let (key_id, offset) = match self.locate(seg) {
                Ok(x) => x,
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            };
            let entry = WireEntry {
                key_id,
                offset,
                len: seg.len,
                local: 0,
            };
            if seg.len >= self.rndv_min {
                let single = Batch {
                    entries: vec![entry],
                    pieces: vec![(seg.local, seg.len)],
                    bytes: seg.len,
                };
                if !self.flush(&mut batch, None, &mut out, next_op)
                    || !self.send_op(single, None, true, &mut out, next_op)
                {
                    return out;
                }
                continue;
            }
            if (batch.entries.len() == self.max_entries || batch.bytes + seg.len > batch_max)
                && !self.flush(&mut batch, None, &mut out, next_op)
            {
                return out;
            }
            batch.entries.push(entry);
            batch.pieces.push((seg.local, seg.len));
            batch.bytes += seg.len;
        }
        self.flush(&mut batch, None, &mut out, next_op);
        out
    }

    /// The registration key and offset a segment's remote piece has in its import.
    fn locate(&self, seg: &Seg) -> Result<(u128, u64)> {
        let imp = self
            .imports
            .get(seg.range)
            .ok_or_else(|| Error::OutOfBounds("segment outside every import".into()))?;
        let offset = seg
            .remote
            .checked_sub(imp.key_base)
            .ok_or_else(|| Error::OutOfBounds("segment before its import".into()))?;
        Ok((imp.key_id, offset))
    }

    /// Sends the segments as mapped operations: no data, only ranges (pieces over
    /// [`MAPPED_PIECE`] split), up to [`MAPPED_BATCH_MAX`] bytes and as many entries as
    /// a header holds per message; the target copies through its mapping of `src`.
    fn run_mapped(&self, src: &MapSrc, segs: &[Seg], out: &mut Issued, next_op: &mut u64) {
        // As many entries as a header holds, found like `Core::new`'s `max_entries`.
        let max_entries = (1..=MAX_ENTRIES)
            .rev()
            .find(|&n| OpHeader::encoded_len_mapped(n, src.rkey.len()) <= self.max_header)
            .unwrap_or(1);
        let mut batch = Batch::default();
        for seg in segs {
            let (key_id, offset) = match self.locate(seg) {
                Ok(x) => x,
                Err(e) => {
                    out.error = Some(e);
                    return;
                }
            };
            let mut done = 0;
            while done < seg.len {
                let len = (seg.len - done).min(MAPPED_PIECE);
                if (batch.entries.len() == max_entries || batch.bytes + len > MAPPED_BATCH_MAX)
                    && !self.flush(&mut batch, Some(src), out, next_op)
                {
                    return;
                }
                batch.entries.push(WireEntry {
                    key_id,
                    offset: offset + done,
                    len,
                    local: seg.local + done,
                });
                batch.bytes += len;
                done += len;
            }
        }
        self.flush(&mut batch, Some(src), out, next_op);
    }

    /// Sends the batch being built (if any; mapped when `src` is given); false when UCX
    /// refused it.
    fn flush(
        &self,
        batch: &mut Batch,
        src: Option<&MapSrc>,
        out: &mut Issued,
        next_op: &mut u64,
    ) -> bool {
        if batch.entries.is_empty() {
            return true;
        }
        self.send_op(std::mem::take(batch), src, false, out, next_op)
    }

    /// Sends one operation message (mapped when `src` is given: no data travels, and a
    /// READ's answer carries none); false when it could not be sent.
    fn send_op(
        &self,
        b: Batch,
        src: Option<&MapSrc>,
        rndv: bool,
        out: &mut Issued,
        next_op: &mut u64,
    ) -> bool {
        let (lib, uep) = (self.lib, self.uep);
        let op = *next_op;
        *next_op = next_op.wrapping_add(1);
        let kind = match self.op {
            Op::Write => OpKind::Write,
            Op::Read => OpKind::Read,
        };
        let read = (kind == OpKind::Read && src.is_none()).then(|| ReadDest {
            pieces: b.pieces.clone(),
            total: b.bytes,
        });
        let entry = OpEntry {
            endpoint: self.ep_id,
            read,
            receiving: false,
            mapped: src.is_some(),
        };
        let header = self.shared.seal_op(self.ep_id, op, entry, |session, seq| {
            Ok(OpHeader {
                kind,
                rndv_reply: rndv && kind == OpKind::Read,
                instance: self.instance,
                op,
                session,
                seq,
                entries: b.entries,
                src: src.cloned(),
            }
            .encode())
        });
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                out.error = Some(e);
                return false;
            }
        };
        let mut gathered = None;
        let (data, len) = match (kind, &b.pieces[..]) {
            // A mapped operation or a READ request: no data travels.
            _ if src.is_some() => (std::ptr::null(), 0usize),
            (OpKind::Read, _) => (std::ptr::null(), 0usize),
            (OpKind::Write, [(addr, len)]) => (*addr as usize as *const u8, *len as usize),
            (OpKind::Write, pieces) => {
                let mut v = Vec::with_capacity(b.bytes as usize);
                for &(addr, len) in pieces {
                    // SAFETY: the local pieces of a post: registered, and kept valid by
                    // the caller of `post` until the transfer finishes.
                    v.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(addr as usize as *const u8, len as usize)
                    });
                }
                let n = v.len();
                let p = v.as_ptr();
                gathered = Some(v);
                (p, n)
            }
        };
        let (hp, hlen) = (header.as_ptr(), header.len());
        let flags = ffi::UCP_AM_SEND_FLAG_REPLY
            | if rndv && kind == OpKind::Write {
                ffi::UCP_AM_SEND_FLAG_RNDV
            } else {
                ffi::UCP_AM_SEND_FLAG_EAGER
            };
        // SAFETY: live endpoint (checked by the core under the lock); the header and
        // any gathered data live until the call returns, and on in the group (below)
        // while UCX holds a request that reads them; a single local piece is registered
        // memory the caller of `post` keeps valid until the transfer finishes (which
        // waits for the group).
        let r = out.data.issue(flags, |p| unsafe {
            (lib.am_send_nbx)(
                uep,
                AM_OP_ID,
                hp as *const c_void,
                hlen,
                data as *const c_void,
                len,
                p,
            )
        });
        match r {
            Err(s) => {
                self.shared.forget_ops(&[op]);
                out.error = Some(lib.error("ucp_am_send_nbx", s));
                return false;
            }
            // Moving a vector leaves its heap data where UCX reads it.
            Ok(true) => {
                out.data.keep(header);
                if let Some(v) = gathered {
                    out.data.keep(v);
                }
            }
            // Sent (copied out by UCX): nothing to keep.
            Ok(false) => {}
        }
        out.ops.push(op);
        true
    }
}

/// Requests and operations of an aborted transfer that UCX (or a peer's answer) did not
/// give back; they keep the transfer's registrations busy until they end.
pub struct Quarantined {
    /// The post's send requests.
    pub data: Group,
    /// Operations still receiving into local memory.
    pub receiving: Vec<u64>,
    /// Mapped operations not answered: the target may still copy to or from local
    /// memory, until it answers or is gone.
    pub mapped: Vec<u64>,
    /// The peer (pid, backend instance) those mapped operations went to.
    pub peer: Option<(u32, u64)>,
    /// The endpoint they went through (its session stays known until they end, so
    /// their answers still verify after a `disconnect`).
    pub endpoint: u64,
    /// The transfer's local registrations.
    pub local_regs: Vec<u64>,
    /// The transfer's imports.
    pub remote_ids: Vec<u64>,
}

/// Every prepared transfer, the posted ones, and what aborted ones left behind.
#[derive(Default)]
pub struct Transfers {
    /// Prepared transfers by id.
    pub by_id: IdMap<Transfer>,
    /// Ids of the transfers in flight.
    pub active: Vec<u64>,
    /// Those of them whose post is not issued yet (their endpoint authenticates).
    pub unissued: Vec<u64>,
    /// What aborted transfers left with UCX.
    pub quarantine: Vec<Quarantined>,
    /// Operations awaiting answers: op -> (transfer, post).
    pub ops: IdMap<(u64, u64)>,
    /// Number of the next operation.
    pub next_op: u64,
    /// Operation messages sent so far.
    pub sent: u64,
}

impl Transfers {
    /// Counts the targets' answers `answers` (operation, outcome) against the posts
    /// that sent those operations; returns how many matched a post still in flight.
    #[inline]
    pub fn apply_answers(&mut self, answers: Vec<(u64, AckCode)>) -> usize {
        let mut events = 0;
        for (op, code) in answers {
            let Some((tid, post)) = self.ops.remove(&op) else {
                continue; // the transfer was aborted or released meanwhile
            };
            if let Some(f) = self.by_id.get_mut(&tid).and_then(|t| t.flight.as_mut()) {
                if f.post == post {
                    f.unanswered = f.unanswered.saturating_sub(1);
                    if code != AckCode::Ok && f.answer_error.is_none() {
                        f.answer_error = Some(code);
                    }
                    events += 1;
                }
            }
        }
        events
    }

    /// The transfers in flight that can finish now (with their failure, if any), and
    /// those past their deadline.
    #[inline]
    pub fn due(&self) -> (Vec<(u64, Option<Fail>)>, Vec<u64>) {
        let mut now = Coarse::default();
        let mut late = Vec::new();
        let mut finished = Vec::new();
        for &tid in &self.active {
            let Some(f) = self.by_id.get(&tid).and_then(|t| t.flight.as_ref()) else {
                continue;
            };
            if f.complete() {
                match (f.failure(), f.note) {
                    (Some(x), _) => finished.push((tid, Some(x))),
                    (None, NoteState::None | NoteState::Delivered) => finished.push((tid, None)),
                    (None, NoteState::Failed(s)) => finished.push((tid, Some(Fail::Ucs(s)))),
                    (None, NoteState::Queued | NoteState::Issued) => {}
                }
            } else if f.deadline.is_some_and(|d| d.passed(&mut now)) {
                late.push(tid);
            }
        }
        (finished, late)
    }
}
