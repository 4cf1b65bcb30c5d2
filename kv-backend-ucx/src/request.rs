//! Transfers: the prepared [`Transfer`] with its plan (the segments, computed once at
//! `prepare`), the state of one post ([`Flight`]), the issuing of a post's operations
//! ([`Issue`]), and the tracking of UCX requests: a [`Group`] is every request one post
//! (or one notification) issued, completed through a shared counter that UCX's send
//! callback decrements. [`Transfers`] is the table of them with the bookkeeping that
//! finishes, quarantines and answers them.

use std::borrow::Cow;
use std::ffi::c_void;
use std::sync::atomic::{AtomicI8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kv_core::{segments, Descriptor, DescriptorList, Error, Op, Result, Status, TransferRequest};

use crate::am::AM_WRITE_ID;
use crate::ffi::{self, ucs_status_ptr_t, ucs_status_t, Lib, UCS_OK};
use crate::ids::IdMap;
use crate::memory::{Memory, RemoteRef};
use crate::wire::{self, AckCode, WriteHeader};

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
unsafe extern "C" fn on_complete(_req: *mut c_void, status: ucs_status_t, user_data: *mut c_void) {
    if user_data.is_null() {
        return;
    }
    // SAFETY: `user_data` is the `Counter` of a live `Group`: a group is never dropped
    // while requests that name it are outstanding (see `Group::drop`).
    let c = unsafe { &*(user_data as *const Counter) };
    if status != UCS_OK {
        let _ = c
            .error
            .compare_exchange(0, status, Ordering::AcqRel, Ordering::Acquire);
    }
    c.pending.fetch_sub(1, Ordering::AcqRel);
}

/// The requests of one post or notification, and their completion state.
///
/// Not `Send` by itself (raw request pointers); it lives inside the backend's worker
/// state, which is only touched under the worker lock.
pub struct Group {
    counter: Box<Counter>,
    reqs: Vec<*mut c_void>,
    /// Buffers UCX reads until the group's requests complete (active-message headers).
    keep: Vec<Box<[u8]>>,
    lib: Arc<Lib>,
}

impl Group {
    /// An empty group (done until something is tracked).
    pub fn new(lib: &Arc<Lib>) -> Group {
        Group {
            counter: new_counter(),
            reqs: Vec::new(),
            keep: Vec::new(),
            lib: lib.clone(),
        }
    }

    /// Request parameters whose completion lands in this group; `flags` are
    /// operation-specific (`UCP_AM_SEND_FLAG_*`).
    pub fn param(&self, flags: u32) -> ffi::ucp_request_param_t {
        let mut p = ffi::ucp_request_param_t::empty();
        p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_CALLBACK | ffi::UCP_OP_ATTR_FIELD_USER_DATA;
        if flags != 0 {
            p.op_attr_mask |= ffi::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = flags;
        }
        p.cb = ffi::ucp_request_cb_t {
            send: Some(on_complete),
        };
        p.user_data = &*self.counter as *const Counter as *mut c_void;
        p
    }

    /// Issues one operation through `issue` (which gets this group's parameters) and
    /// tracks what UCX returned. Returns the status of an operation that finished at
    /// once with an error; `Ok` when it completed or is in flight.
    pub fn issue(
        &mut self,
        flags: u32,
        issue: impl FnOnce(&ffi::ucp_request_param_t) -> ucs_status_ptr_t,
    ) -> Result<(), ucs_status_t> {
        let p = self.param(flags);
        self.issue_with(&p, issue)
    }

    /// As [`Group::issue`] with parameters from [`Group::param`] of this group, built
    /// once for many operations (a post's puts).
    ///
    /// Operations that complete at once (a put over shared memory) cost no atomic
    /// operation: the count goes up only for a request UCX returned. UCX runs the
    /// callback only from a later progress call (never inside the call that returned
    /// the request), and both happen under the worker lock; the counter's arithmetic
    /// wraps, so even the other order would leave it right once both happened.
    pub fn issue_with(
        &mut self,
        p: &ffi::ucp_request_param_t,
        issue: impl FnOnce(&ffi::ucp_request_param_t) -> ucs_status_ptr_t,
    ) -> Result<(), ucs_status_t> {
        debug_assert!(std::ptr::eq(
            p.user_data as *const Counter,
            &*self.counter as *const Counter
        ));
        let r = issue(p);
        if ffi::ptr_is_request(r) {
            self.counter.pending.fetch_add(1, Ordering::AcqRel);
            self.reqs.push(r);
            return Ok(());
        }
        match ffi::ptr_status(r) {
            UCS_OK => Ok(()),
            s => {
                self.fail(s);
                Err(s)
            }
        }
    }

    /// Keeps `buf` alive (at a fixed address) for as long as the group's requests may
    /// read it; returns its address.
    pub fn keep(&mut self, buf: Box<[u8]>) -> *const u8 {
        let p = buf.as_ptr();
        self.keep.push(buf);
        p
    }

    /// Records an error that happened outside UCX's callbacks.
    pub fn fail(&self, s: ucs_status_t) {
        let _ = self
            .counter
            .error
            .compare_exchange(0, s, Ordering::AcqRel, Ordering::Acquire);
    }

    /// True when no request of the group is outstanding.
    pub fn done(&self) -> bool {
        self.counter.pending.load(Ordering::Acquire) == 0
    }

    /// The first error any request of the group reported.
    pub fn error(&self) -> Option<ucs_status_t> {
        match self.counter.error.load(Ordering::Acquire) {
            0 => None,
            s => Some(s),
        }
    }

    /// Asks UCX to cancel every request still in flight (`ucp_request_cancel`).
    pub fn cancel_all(&self, worker: ffi::ucp_worker_h) {
        let lib = &self.lib;
        for &r in &self.reqs {
            // SAFETY: `r` is a request of this worker not yet freed (requests are freed
            // only once complete, or when the group drops).
            unsafe {
                if (lib.request_check_status)(r) == ffi::UCS_INPROGRESS {
                    (lib.request_cancel)(worker, r);
                }
            }
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
            // UCX was still driving an operation of this group. Its callback will not
            // run any more (the request was freed), but leak the counter anyway rather
            // than free memory a racing completion could still name.
            Box::leak(std::mem::replace(&mut self.counter, new_counter()));
            // The same for buffers UCX may still read.
            for b in self.keep.drain(..) {
                Box::leak(b);
            }
        }
    }
}

/// The in-flight part of a posted transfer.
pub struct Flight {
    /// The post's requests.
    pub data: Group,
    /// Which post of the transfer this is.
    pub post: u64,
    /// When it was posted.
    pub posted: Instant,
    /// When it times out.
    pub deadline: Option<Instant>,
    /// Where its notification is.
    pub note: NoteState,
    /// Sequence numbers of this post's WRITEs sent as active messages.
    pub am_seqs: Vec<u64>,
    /// How many of them the target has not answered yet.
    pub acks: usize,
    /// The first error a target answered with.
    pub ack_error: Option<AckCode>,
}

/// Why a transfer's data failed.
#[derive(Debug, Clone, Copy)]
pub enum Fail {
    /// A UCX request failed.
    Ucs(ucs_status_t),
    /// The target refused a WRITE sent as an active message.
    Ack(AckCode),
}

impl Flight {
    /// Every request completed and every active-message WRITE answered.
    #[inline]
    pub fn complete(&self) -> bool {
        self.data.done() && self.acks == 0
    }

    /// The first failure (UCX's before the target's).
    #[inline]
    pub fn failure(&self) -> Option<Fail> {
        self.data
            .error()
            .map(Fail::Ucs)
            .or(self.ack_error.map(Fail::Ack))
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

/// One put/get of a post: addresses, length and the index of its import in the
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
            status: Status::Idle,
            flight: None,
            posts: 0,
            plan,
        }
    }

    /// The segments of a post: the plan made at prepare, or (over [`PLAN_MAX`]
    /// segments) one made for this post only against `rkeys`' ranges.
    #[inline]
    pub fn segments(&self, rkeys: &[RemoteRef]) -> Result<Cow<'_, [Seg]>> {
        match &self.plan {
            Some(p) => Ok(Cow::Borrowed(p)),
            None => {
                segments(&self.local, &self.remote)?; // the lists' sizes must agree
                let ranges: Vec<Descriptor> = rkeys.iter().map(|r| r.0).collect();
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
    /// WRITE or READ.
    pub op: Op,
    /// The live UCP endpoint.
    pub uep: ffi::ucp_ep_h,
    /// WRITE segments this large go as active messages (TCP endpoints only).
    pub am_min: u64,
    /// The transfer's imports, indexed as the segments' `range`.
    pub rkeys: &'a [RemoteRef],
    /// Our backend instance (named in WRITE headers, so answers find us).
    pub instance: u64,
}

/// What [`Issue::run`] started.
pub struct Issued {
    /// Every request of the post.
    pub data: Group,
    /// Sequence numbers of its WRITEs sent as active messages.
    pub am_seqs: Vec<u64>,
}

impl Issue<'_> {
    /// Issues one `put_nbx`/`get_nbx` per segment (WRITE segments of at least
    /// `am_min` bytes as active messages instead), then, for puts of a WRITE, an
    /// endpoint flush so completion means the data landed. Stops at the first
    /// operation UCX refused (the group then carries its error).
    ///
    /// Only for `Core::post`, under the state lock: the segments' local ranges are
    /// those the caller of `Backend::post` keeps valid and registered, and `uep` and
    /// the rkeys were checked live.
    #[inline(always)]
    pub fn run(&self, segs: &[Seg], am: &mut AmWrites) -> Issued {
        let (lib, uep) = (self.lib, self.uep);
        let mut data = Group::new(lib);
        let am_min = self.am_min;
        let mut am_seqs = Vec::new();
        let mut puts = 0usize;
        // One parameter block for every put/get of the post (same group, no flags).
        let rma = data.param(0);
        for seg in segs {
            let Some(&(_, rkey, key_id, key_base)) = self.rkeys.get(seg.range) else {
                // Cannot happen: the plan indexes `remote_ids`, as `rkeys` does.
                data.fail(ffi::UCS_ERR_IO_ERROR);
                break;
            };
            if seg.len >= am_min {
                let Some(offset) = seg.remote.checked_sub(key_base) else {
                    // Cannot happen: imports lie inside the key's range (import_remote).
                    data.fail(ffi::UCS_ERR_IO_ERROR);
                    break;
                };
                let seq = am.next_seq;
                let h = WriteHeader {
                    instance: self.instance,
                    seq,
                    key_id,
                    offset,
                    len: seg.len,
                }
                .encode();
                let hp = data.keep(Box::new(h));
                // SAFETY: as for the put below; the header stays alive in the group
                // until its requests complete.
                let r = data.issue(
                    ffi::UCP_AM_SEND_FLAG_RNDV | ffi::UCP_AM_SEND_FLAG_REPLY,
                    |p| unsafe {
                        (lib.am_send_nbx)(
                            uep,
                            AM_WRITE_ID,
                            hp as *const c_void,
                            wire::WRITE_HEADER_LEN,
                            seg.local as usize as *const c_void,
                            seg.len as usize,
                            p,
                        )
                    },
                );
                if r.is_err() {
                    break;
                }
                am.next_seq += 1;
                am.sent += 1;
                am_seqs.push(seq);
                continue;
            }
            puts += 1;
            let r = match self.op {
                // SAFETY: the caller of `Backend::post` keeps the local range valid and
                // registered until the transfer finishes or `cancel` returns; the remote
                // range was checked against the peer's registration at prepare; `uep`
                // and `rkey` are live (checked by `Core::post`, under the lock).
                Op::Write => data.issue_with(&rma, |p| unsafe {
                    (lib.put_nbx)(
                        uep,
                        seg.local as usize as *const c_void,
                        seg.len as usize,
                        seg.remote,
                        rkey,
                        p,
                    )
                }),
                // SAFETY: as for the write.
                Op::Read => data.issue_with(&rma, |p| unsafe {
                    (lib.get_nbx)(
                        uep,
                        seg.local as usize as *mut c_void,
                        seg.len as usize,
                        seg.remote,
                        rkey,
                        p,
                    )
                }),
            };
            if r.is_err() {
                break;
            }
        }
        if self.op == Op::Write && puts > 0 && data.error().is_none() {
            // A put completes locally when its buffer may be reused; the flush completes
            // when every earlier operation on the endpoint is complete at the peer.
            // SAFETY: live endpoint; parameters valid for the call.
            let _ = data.issue(0, |p| unsafe { (lib.ep_flush_nbx)(uep, p) });
        }
        Issued { data, am_seqs }
    }
}

/// Requests of an aborted transfer that UCX did not give back; they keep the transfer's
/// registrations busy until they complete.
pub struct Quarantined {
    data: Group,
    local_regs: Vec<u64>,
    remote_ids: Vec<u64>,
}

/// Our WRITEs sent as active messages: their numbering and those awaiting an answer.
#[derive(Default)]
pub struct AmWrites {
    /// Awaiting an answer: seq -> (transfer, post).
    pub pending: IdMap<(u64, u64)>,
    /// Sequence number of the next one.
    pub next_seq: u64,
    /// WRITE segments sent as active messages so far.
    pub sent: u64,
}

/// Every prepared transfer, the posted ones, and what aborted ones left behind.
#[derive(Default)]
pub struct Transfers {
    /// Prepared transfers by id.
    pub by_id: IdMap<Transfer>,
    /// Ids of the transfers in flight.
    pub active: Vec<u64>,
    /// Requests of aborted transfers that UCX still holds.
    pub quarantine: Vec<Quarantined>,
    /// WRITEs sent as active messages.
    pub am: AmWrites,
}

impl Transfers {
    /// Counts the targets' answers `acks` (sequence number, outcome) against the posts
    /// that sent those WRITEs; returns how many matched a post still in flight.
    #[inline]
    pub fn apply_acks(&mut self, acks: Vec<(u64, AckCode)>) -> usize {
        let mut events = 0;
        for (seq, code) in acks {
            let Some((tid, post)) = self.am.pending.remove(&seq) else {
                continue; // the transfer was aborted or released meanwhile
            };
            if let Some(f) = self.by_id.get_mut(&tid).and_then(|t| t.flight.as_mut()) {
                if f.post == post {
                    f.acks = f.acks.saturating_sub(1);
                    if code != AckCode::Ok && f.ack_error.is_none() {
                        f.ack_error = Some(code);
                    }
                    events += 1;
                }
            }
        }
        events
    }

    /// Quarantined requests that UCX finally completed release their memory; returns
    /// how many.
    #[inline]
    pub fn release_quarantined(&mut self, mem: &mut Memory) -> usize {
        let mut events = 0;
        let mut i = 0;
        while i < self.quarantine.len() {
            if self.quarantine[i].data.done() {
                let q = self.quarantine.swap_remove(i);
                mem.release(&q.local_regs, &q.remote_ids);
                events += 1;
            } else {
                i += 1;
            }
        }
        events
    }

    /// The transfers in flight that can finish now (with their failure, if any), and
    /// those past their deadline.
    #[inline]
    pub fn due(&self) -> (Vec<(u64, Option<Fail>)>, Vec<u64>) {
        let mut now = None;
        let mut late = Vec::new();
        let mut finished = Vec::new();
        for &tid in &self.active {
            let Some(t) = self.by_id.get(&tid) else {
                continue;
            };
            let Some(f) = &t.flight else {
                continue;
            };
            if f.complete() {
                match (f.failure(), f.note) {
                    (Some(x), _) => finished.push((tid, Some(x))),
                    (None, NoteState::None | NoteState::Delivered) => finished.push((tid, None)),
                    (None, NoteState::Failed(s)) => finished.push((tid, Some(Fail::Ucs(s)))),
                    (None, NoteState::Queued | NoteState::Issued) => {}
                }
            } else if f
                .deadline
                .is_some_and(|d| *now.get_or_insert_with(Instant::now) > d)
            {
                late.push(tid);
            }
        }
        (finished, late)
    }

    /// Ends a transfer whose requests all completed: frees them, releases the busy
    /// marks, records the status.
    #[inline]
    pub fn finish(&mut self, mem: &mut Memory, tid: u64, status: Status) {
        let Some(t) = self.by_id.get_mut(&tid) else {
            return;
        };
        let Some(flight) = t.flight.take() else {
            return;
        };
        debug_assert!(flight.data.done());
        for s in &flight.am_seqs {
            self.am.pending.remove(s);
        }
        drop(flight);
        t.status = status;
        mem.release(&t.local_regs, &t.remote_ids);
        self.active.retain(|x| *x != tid);
    }

    /// Fails transfer `tid` with `err` while UCX still owns requests of its post: the
    /// requests go to quarantine and keep its registrations busy. False when it has no
    /// post in flight.
    pub fn quarantine(&mut self, tid: u64, err: Error) -> bool {
        let Some(t) = self.by_id.get_mut(&tid) else {
            return false;
        };
        let Some(flight) = t.flight.take() else {
            return false;
        };
        t.status = Status::Failed(err);
        for s in &flight.am_seqs {
            self.am.pending.remove(s);
        }
        self.quarantine.push(Quarantined {
            data: flight.data,
            local_regs: t.local_regs.clone(),
            remote_ids: t.remote_ids.clone(),
        });
        self.active.retain(|x| *x != tid);
        true
    }
}
