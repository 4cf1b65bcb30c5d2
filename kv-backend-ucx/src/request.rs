//! Tracking of UCX requests: a [`Group`] is every request one post (or one notification)
//! issued, completed through a shared counter that UCX's send callback decrements.

use std::ffi::c_void;
use std::sync::atomic::{AtomicI8, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::ffi::{self, ucs_status_ptr_t, ucs_status_t, Lib, UCS_OK};

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
