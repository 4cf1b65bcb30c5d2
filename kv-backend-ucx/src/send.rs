//! Messages the callbacks send (answers, READ data, authentication steps) and the
//! client's first authentication step: one `ucp_am_send_nbx` whose header (and any
//! data it owns) lives in a box until UCX completes the send, when the completion
//! callback frees it and releases the registration a rendezvous send read from.

use std::ffi::c_void;

use crate::ffi::{self, ucs_status_t};
use crate::shared::{ffi_guard, Shared};

/// What a message sends as its data.
pub enum Payload {
    /// Nothing.
    None,
    /// `len` bytes at `ptr` inside a registration peers may read; the registration's
    /// key id is held (`Target::inflight`) until the send completes.
    Registered {
        /// Start.
        ptr: *const u8,
        /// Length.
        len: usize,
        /// The registration it lies in (released at completion).
        key_id: u128,
    },
    /// Bytes the message owns.
    Owned(Vec<u8>),
}

/// A send on its way: its header and data, and what to release when it completes.
struct SendCtx {
    shared: *const Shared,
    header: Vec<u8>,
    owned: Vec<u8>,
    release: Option<u128>,
}

impl SendCtx {
    /// Ends the send: releases the registration it read from.
    fn end(self, status: ucs_status_t) {
        // SAFETY: the `Shared` outlives the worker, and so every send of it.
        let shared = unsafe { &*self.shared };
        if let Some(k) = self.release {
            shared.release_target(k);
        }
        count_failure(shared, status);
    }
}

/// Counts and logs a reply that could not be sent.
fn count_failure(shared: &Shared, status: ucs_status_t) {
    if status != ffi::UCS_OK {
        shared.lock().n.unanswered += 1;
        tracing::warn!(
            "ucx: a reply could not be sent: {}",
            shared.lib.status_text(status)
        );
    }
}

/// Sends active message `id` with `header` and no data on `ep` only if UCX can finish
/// it at once (`UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL`: a short message into the transport),
/// so nothing needs to outlive the call (no box, no copy of the header). `None` when it
/// cannot (too long, no room, no endpoint): [`send`] then keeps the header for UCX;
/// `Some(false)` when UCX refused it (counted as unanswered).
fn send_now(
    shared: &Shared,
    ep: ffi::ucp_ep_h,
    id: u32,
    header: &[u8],
    flags: u32,
) -> Option<bool> {
    if ep.is_null() {
        return None;
    }
    let mut p = ffi::ucp_request_param_t::empty();
    p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_FLAGS | ffi::UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL;
    p.flags = flags;
    // SAFETY: `ep` is a live endpoint of the worker (callers' contract); with
    // FORCE_IMM_CMPL UCX either sends the header before returning or does nothing, so
    // it keeps no pointer to it.
    let r = unsafe {
        (shared.lib.am_send_nbx)(
            ep,
            id,
            header.as_ptr() as *const c_void,
            header.len(),
            std::ptr::null(),
            0,
            &p,
        )
    };
    if ffi::ptr_is_request(r) {
        // ucp.h: with FORCE_IMM_CMPL the operation "either completes immediately or
        // returns UCS_ERR_NO_RESOURCE" (1.13's ucp_am_send_nbx returns before it makes
        // a request); never leak one if that changes.
        // SAFETY: a request UCX just returned to us, freed once (no callback was set).
        unsafe { (shared.lib.request_free)(r) };
        return Some(true);
    }
    match ffi::ptr_status(r) {
        ffi::UCS_ERR_NO_RESOURCE => None,
        status => {
            count_failure(shared, status);
            Some(status == ffi::UCS_OK)
        }
    }
}

/// Completion of a send made by [`send`]: frees its context and the request.
///
/// # Safety
/// Called only by UCX, once per send that [`send`] started and UCX did not finish at
/// once: `user_data` is the `SendCtx` box leaked for that send (null is ignored) and
/// `req` is its request, freed here and nowhere else.
unsafe extern "C" fn on_sent(req: *mut c_void, status: ucs_status_t, user_data: *mut c_void) {
    ffi_guard((), || {
        if user_data.is_null() {
            return;
        }
        // SAFETY: `user_data` is the box `send` leaked for this send only; UCX calls
        // this once.
        let ctx = unsafe { Box::from_raw(user_data as *mut SendCtx) };
        // SAFETY: as in `SendCtx::end`.
        let free = unsafe { &*ctx.shared }.lib.request_free;
        ctx.end(status);
        if !req.is_null() {
            // SAFETY: the request `send` got from ucp_am_send_nbx and kept no copy of;
            // freed once, here.
            unsafe { free(req) };
        }
    })
}

/// Sends active message `id` with `header` and `payload` on `ep` with `flags`
/// (`UCP_AM_SEND_FLAG_*`). A message without data goes out at once when UCX can finish
/// it so (most answers: nothing allocated); otherwise a copy of `header` lives until UCX
/// completes the send. Returns false when UCX refused it at once (counted as
/// unanswered, the registration released).
///
/// Callers: inside UCX callbacks, or the core under its state lock (either way the
/// worker is ours alone). `ep` must be a live endpoint of `shared`'s worker.
pub fn send(
    shared: &Shared,
    ep: ffi::ucp_ep_h,
    id: u32,
    header: &[u8],
    payload: Payload,
    flags: u32,
) -> bool {
    if matches!(payload, Payload::None) {
        if let Some(sent) = send_now(shared, ep, id, header, flags) {
            return sent;
        }
    }
    let header = header.to_vec();
    let (ptr, len, owned, release) = match payload {
        Payload::None => (std::ptr::null(), 0, Vec::new(), None),
        Payload::Registered { ptr, len, key_id } => (ptr, len, Vec::new(), Some(key_id)),
        Payload::Owned(v) => (std::ptr::null(), v.len(), v, None),
    };
    if ep.is_null() {
        SendCtx {
            shared,
            header,
            owned,
            release,
        }
        .end(ffi::UCS_ERR_NOT_CONNECTED);
        return false;
    }
    let ctx = Box::into_raw(Box::new(SendCtx {
        shared,
        header,
        owned,
        release,
    }));
    // SAFETY: `ctx` is the box just leaked; its vectors do not move while it lives.
    let (hp, hl, dp) = unsafe {
        let c = &*ctx;
        let dp = if c.owned.is_empty() {
            ptr
        } else {
            c.owned.as_ptr()
        };
        (c.header.as_ptr(), c.header.len(), dp)
    };
    let mut p = ffi::ucp_request_param_t::empty();
    p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_CALLBACK
        | ffi::UCP_OP_ATTR_FIELD_USER_DATA
        | ffi::UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = flags;
    p.cb = ffi::ucp_request_cb_t {
        send: Some(on_sent),
    };
    p.user_data = ctx as *mut c_void;
    // SAFETY: `ep` is a live endpoint of the worker (callers' contract); the header and
    // owned data stay alive in `ctx` until `on_sent` frees it (or below); registered
    // data stays valid while its registration is held (deregister waits for
    // `inflight`).
    let r = unsafe {
        (shared.lib.am_send_nbx)(
            ep,
            id,
            hp as *const c_void,
            hl,
            dp as *const c_void,
            len,
            &p,
        )
    };
    if ffi::ptr_is_request(r) {
        return true;
    }
    // Done at once (or failed): no callback will run.
    // SAFETY: the box leaked above, not referenced by UCX any more.
    let ctx = unsafe { Box::from_raw(ctx) };
    let status = ffi::ptr_status(r);
    ctx.end(status);
    status == ffi::UCS_OK
}
