//! What UCX's callbacks touch, and the callbacks: the endpoint error handler, the
//! receive side of notifications (with per-sender reordering), the target side of WRITEs
//! sent as active messages (checked against our registrations, received straight into
//! them, answered), and the initiator's receipt of those answers.
//!
//! The callbacks run inside UCX calls the core makes with its state lock held (the
//! worker is `UCS_THREAD_MODE_SERIALIZED`), so they never take that lock: they touch
//! only [`Shared`] (its own short lock). The core reads what they recorded through
//! [`Shared`]'s methods (`take_events`, `drain_inbox`, ...).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::Arc;

use bytes::Bytes;
use kv_core::{Descriptor, Error, Notification, Result};
use parking_lot::Mutex;

use crate::ffi::{self, ucs_status_t, Lib};
use crate::ids::IdMap;
use crate::wire::{self, Ack, AckCode, AmHeader, WriteHeader};

/// Active-message id of notifications.
pub const AM_ID: u32 = 0x4b56;
/// Active-message id of WRITEs sent as active messages (TCP; see [`on_write`]).
pub const AM_WRITE_ID: u32 = 0x4b57;
/// Active-message id of the target's answers to those WRITEs.
const AM_ACK_ID: u32 = 0x4b58;
/// Most out-of-order notifications held per sender before giving up on a gap.
const MAX_HELD: usize = 4096;
/// Per-sender reordering of notifications by sequence number.
#[derive(Default)]
struct Reorder {
    next: u64,
    held: BTreeMap<u64, Notification>,
}

#[derive(Default)]
struct SharedInner {
    ep_errors: Vec<(usize, ucs_status_t)>,
    inbox: VecDeque<Notification>,
    order: HashMap<(u64, u64), Reorder>,
    malformed: u64,
    /// Local registrations by key id, as WRITEs sent as active messages find them.
    targets: IdMap<Target>,
    /// Answers to our WRITEs sent as active messages: (sequence number, outcome).
    acks: Vec<(u64, AckCode)>,
    /// WRITEs from peers taken (eager or rendezvous).
    accepted: u64,
    /// WRITEs from peers refused (unknown key, out of bounds, bad length).
    refused: u64,
    /// Answers that could not be sent (no reply endpoint, or UCX refused).
    unanswered: u64,
}

/// A local registration as the active-message WRITE handler sees it.
struct Target {
    desc: Descriptor,
    /// Rendezvous receives into it still running (deregister says `Busy` meanwhile).
    inflight: usize,
}

/// What UCX's callbacks touch: endpoint failures, received notifications, the
/// registrations that WRITEs sent as active messages may land in, and their answers.
pub struct Shared {
    inner: Mutex<SharedInner>,
    lib: Arc<Lib>,
    worker: ffi::ucp_worker_h,
    instance: u64,
}

// SAFETY: `worker` is used only inside UCX's callbacks, which run inside UCX calls made
// with the core's state lock held (UCS_THREAD_MODE_SERIALIZED); the rest is a lock
// around plain data and an `Arc<Lib>` of function pointers.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// What a rendezvous receive of a WRITE needs when it completes.
struct RecvCtx {
    shared: *const Shared,
    key_id: u64,
    reply_ep: ffi::ucp_ep_h,
    header: WriteHeader,
}

/// What the callbacks recorded for the core ([`Shared::take_events`]).
pub struct Events {
    /// Endpoints UCX reported failed: (endpoint address, status).
    pub ep_errors: Vec<(usize, ucs_status_t)>,
    /// Answers to our WRITEs sent as active messages: (sequence number, outcome).
    pub acks: Vec<(u64, AckCode)>,
}

/// What the WRITE handler has counted (for `describe()` and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// WRITEs from peers taken (eager or rendezvous).
    pub accepted: u64,
    /// WRITEs from peers refused.
    pub refused: u64,
    /// Answers that could not be sent.
    pub unanswered: u64,
    /// Malformed messages dropped (notifications, WRITE headers, answers).
    pub malformed: u64,
}

impl Shared {
    /// The callbacks' state for `worker` of backend `instance`. Keep it in a `Box` (its
    /// address is the callbacks' `arg`) that outlives the worker.
    pub fn new(lib: Arc<Lib>, worker: ffi::ucp_worker_h, instance: u64) -> Shared {
        Shared {
            inner: Mutex::new(SharedInner::default()),
            lib,
            worker,
            instance,
        }
    }

    /// Installs the active-message handlers (notifications, WRITEs, answers) on the
    /// worker, with `self` as their `arg`: `self` must stay at its address (boxed) and
    /// outlive the worker.
    pub fn set_handlers(&self) -> Result<()> {
        let (lib, worker) = (&self.lib, self.worker);
        let shared_ptr = self as *const Shared as *mut c_void;
        let hp = ffi::ucp_am_handler_param_t {
            field_mask: ffi::UCP_AM_HANDLER_PARAM_FIELD_ID
                | ffi::UCP_AM_HANDLER_PARAM_FIELD_FLAGS
                | ffi::UCP_AM_HANDLER_PARAM_FIELD_CB
                | ffi::UCP_AM_HANDLER_PARAM_FIELD_ARG,
            id: AM_ID,
            flags: ffi::UCP_AM_FLAG_WHOLE_MSG,
            cb: Some(on_am),
            arg: shared_ptr,
        };
        // SAFETY: valid worker and params; `arg` outlives the worker (see `on_ep_error`).
        lib.check("ucp_worker_set_am_recv_handler", unsafe {
            (lib.worker_set_am_recv_handler)(worker, &hp)
        })?;
        let handlers: [(u32, ffi::ucp_am_recv_callback_t); 2] =
            [(AM_WRITE_ID, on_write), (AM_ACK_ID, on_ack)];
        for (id, cb) in handlers {
            let hp = ffi::ucp_am_handler_param_t {
                id,
                cb: Some(cb),
                ..hp
            };
            // SAFETY: as above.
            lib.check("ucp_worker_set_am_recv_handler", unsafe {
                (lib.worker_set_am_recv_handler)(worker, &hp)
            })?;
        }
        Ok(())
    }

    /// The error handler for endpoints of this worker ([`on_ep_error`] with `self`, which
    /// outlives the worker, as its `arg`).
    pub fn err_handler(&self) -> ffi::ucp_err_handler_t {
        ffi::ucp_err_handler_t {
            cb: Some(on_ep_error),
            arg: self as *const Shared as *mut c_void,
        }
    }

    /// Lets WRITEs sent as active messages land in a new registration.
    pub fn add_target(&self, key_id: u64, desc: &Descriptor) {
        self.inner.lock().targets.insert(
            key_id,
            Target {
                desc: *desc,
                inflight: 0,
            },
        );
    }

    /// Stops WRITEs from landing in registration `key_id`; `Err(n)` (and nothing
    /// changes) while `n` rendezvous receives into it still run. Called under the state
    /// lock, so no WRITE handler starts meanwhile.
    pub fn remove_target(&self, key_id: u64) -> std::result::Result<(), usize> {
        let mut sh = self.inner.lock();
        if let Some(t) = sh.targets.get(&key_id) {
            if t.inflight > 0 {
                return Err(t.inflight);
            }
        }
        sh.targets.remove(&key_id);
        Ok(())
    }

    /// Takes what the callbacks recorded for the core since the last call.
    #[inline]
    pub fn take_events(&self) -> Events {
        let mut sh = self.inner.lock();
        Events {
            ep_errors: std::mem::take(&mut sh.ep_errors),
            acks: std::mem::take(&mut sh.acks),
        }
    }

    /// Moves the received notifications, in order, to `out`; returns how many.
    pub fn drain_inbox(&self, out: &mut Vec<Notification>) -> usize {
        let mut s = self.inner.lock();
        let n = s.inbox.len();
        out.extend(s.inbox.drain(..));
        n
    }

    /// The WRITE handler's counters.
    pub fn counters(&self) -> Counters {
        let s = self.inner.lock();
        Counters {
            accepted: s.accepted,
            refused: s.refused,
            unanswered: s.unanswered,
            malformed: s.malformed,
        }
    }

    /// Checks a WRITE header against the registrations: the destination address, or
    /// the code to answer with. A rendezvous receive (`hold`) marks the registration.
    fn check_write(
        &self,
        h: &WriteHeader,
        data_len: usize,
        hold: bool,
    ) -> std::result::Result<*mut u8, AckCode> {
        if h.len != data_len as u64 {
            return Err(AckCode::InvalidMetadata);
        }
        let mut s = self.inner.lock();
        let t = s.targets.get_mut(&h.key_id).ok_or(AckCode::NotRegistered)?;
        let start = t
            .desc
            .addr
            .checked_add(h.offset)
            .ok_or(AckCode::OutOfBounds)?;
        let want = Descriptor::new(start, h.len, t.desc.device);
        if h.len == 0 || want.end().is_none() || !t.desc.contains(&want) {
            return Err(AckCode::OutOfBounds);
        }
        if hold {
            t.inflight += 1;
        }
        Ok(start as usize as *mut u8)
    }

    /// A rendezvous receive ended: release the registration and answer.
    fn end_recv(&self, ctx: &RecvCtx, status: ucs_status_t) {
        {
            let mut s = self.inner.lock();
            if let Some(t) = s.targets.get_mut(&ctx.key_id) {
                t.inflight = t.inflight.saturating_sub(1);
            }
        }
        let code = if status == ffi::UCS_OK {
            AckCode::Ok
        } else {
            AckCode::Failed
        };
        self.answer(ctx.reply_ep, &ctx.header, code);
    }

    /// Sends the answer to a WRITE on the endpoint UCX gave for replies. Called inside
    /// UCX callbacks (under the state lock); never holds `inner` across the UCX call.
    fn answer(&self, reply_ep: ffi::ucp_ep_h, h: &WriteHeader, code: AckCode) {
        if reply_ep.is_null() {
            self.inner.lock().unanswered += 1;
            tracing::warn!("ucx: a WRITE without a reply endpoint; not answered");
            return;
        }
        let ack = Box::new(AnswerBuf {
            bytes: Ack {
                instance: h.instance,
                seq: h.seq,
                code,
            }
            .encode(),
            request_free: self.lib.request_free,
        });
        let ptr = Box::into_raw(ack);
        let mut p = ffi::ucp_request_param_t::empty();
        p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_CALLBACK
            | ffi::UCP_OP_ATTR_FIELD_USER_DATA
            | ffi::UCP_OP_ATTR_FIELD_FLAGS;
        p.flags = ffi::UCP_AM_SEND_FLAG_EAGER;
        p.cb = ffi::ucp_request_cb_t {
            send: Some(on_answer_sent),
        };
        p.user_data = ptr as *mut c_void;
        // SAFETY: `reply_ep` is the live endpoint UCX passed with this message (we are
        // inside its callback, or that of the receive it started, under the state
        // lock); the header stays alive until `on_answer_sent` frees it, or below.
        let r = unsafe {
            (self.lib.am_send_nbx)(
                reply_ep,
                AM_ACK_ID,
                std::ptr::addr_of!((*ptr).bytes) as *const c_void,
                wire::ACK_LEN,
                std::ptr::null(),
                0,
                &p,
            )
        };
        if ffi::ptr_is_request(r) {
            return;
        }
        // Done at once (or failed): no callback will run.
        // SAFETY: the box leaked above, not referenced by UCX any more.
        drop(unsafe { Box::from_raw(ptr) });
        if ffi::ptr_status(r) != ffi::UCS_OK {
            self.inner.lock().unanswered += 1;
            tracing::warn!(
                "ucx: could not answer a WRITE: {}",
                self.lib.status_text(ffi::ptr_status(r))
            );
        }
    }

    fn deliver(&self, h: AmHeader, payload: Bytes) {
        let mut s = self.inner.lock();
        let SharedInner { inbox, order, .. } = &mut *s;
        let r = order.entry((h.instance, h.endpoint)).or_default();
        let n = Notification {
            peer: h.name,
            payload,
        };
        if h.seq < r.next {
            return; // a duplicate
        }
        if h.seq > r.next {
            r.held.insert(h.seq, n);
            if r.held.len() > MAX_HELD {
                // The gap will not fill (the sender lost a message); deliver what we have.
                tracing::warn!("ucx: notification gap before seq {}; skipping", h.seq);
                while let Some((seq, n)) = r.held.pop_first() {
                    inbox.push_back(n);
                    r.next = seq + 1;
                }
            }
            return;
        }
        inbox.push_back(n);
        r.next += 1;
        while let Some(n) = r.held.remove(&r.next) {
            inbox.push_back(n);
            r.next += 1;
        }
    }
}

/// `ucp_err_handler_cb_t`: an endpoint failed (peer died, connection reset, timeout).
unsafe extern "C" fn on_ep_error(arg: *mut c_void, ep: ffi::ucp_ep_h, status: ucs_status_t) {
    if arg.is_null() {
        return;
    }
    // SAFETY: `arg` is the `Shared` of the core that owns the worker; it outlives the
    // worker (destroyed first in `Core::drop`).
    let shared = unsafe { &*(arg as *const Shared) };
    shared.inner.lock().ep_errors.push((ep as usize, status));
}

/// An answer on its way: its bytes (UCX 1.13 reads an AM header until the send
/// completes) and `ucp_request_free` for the completion callback.
struct AnswerBuf {
    bytes: [u8; wire::ACK_LEN],
    request_free: unsafe extern "C" fn(*mut c_void),
}

/// Completion of an answer's send: frees the request and the answer's bytes.
unsafe extern "C" fn on_answer_sent(
    req: *mut c_void,
    _status: ucs_status_t,
    user_data: *mut c_void,
) {
    if user_data.is_null() {
        return;
    }
    // SAFETY: `user_data` is the box `Shared::answer` leaked for this send only; UCX
    // calls this once.
    let buf = unsafe { Box::from_raw(user_data as *mut AnswerBuf) };
    if !req.is_null() {
        // SAFETY: the request UCX returned to `answer`, which kept no copy; freed once.
        unsafe { (buf.request_free)(req) };
    }
}

/// `ucp_am_recv_data_nbx_callback_t`: a rendezvous WRITE landed (or failed).
unsafe extern "C" fn on_write_data(
    req: *mut c_void,
    status: ucs_status_t,
    _length: usize,
    user_data: *mut c_void,
) {
    if user_data.is_null() {
        return;
    }
    // SAFETY: `user_data` is the `RecvCtx` box `on_write` leaked for this receive only;
    // UCX calls this once.
    let ctx = unsafe { Box::from_raw(user_data as *mut RecvCtx) };
    // SAFETY: the `Shared` outlives the worker (see `on_ep_error`).
    let shared = unsafe { &*ctx.shared };
    shared.end_recv(&ctx, status);
    if !req.is_null() {
        // SAFETY: the request `on_write` got from ucp_am_recv_data_nbx and kept no copy
        // of; freed once, here.
        unsafe { (shared.lib.request_free)(req) };
    }
}

/// `ucp_am_recv_callback_t`: a WRITE sent as an active message. The header names one
/// of our registrations (key id, offset, length); anything that does not fit one is
/// answered with an error and nothing is written. Rendezvous data is received straight
/// into the registered range (`ucp_am_recv_data_nbx`), eager data copied there once.
/// Never panics on peer input; a header that does not parse is dropped (counted).
unsafe extern "C" fn on_write(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const ffi::ucp_am_recv_param_t,
) -> ucs_status_t {
    if arg.is_null() {
        return ffi::UCS_OK;
    }
    // SAFETY: as in `on_ep_error`.
    let shared = unsafe { &*(arg as *const Shared) };
    let (attr, reply_ep) = if param.is_null() {
        (0, std::ptr::null_mut())
    } else {
        // SAFETY: UCX passes a valid parameter struct for the duration of the call.
        let p = unsafe { &*param };
        let ep = if p.recv_attr & ffi::UCP_AM_RECV_ATTR_FIELD_REPLY_EP != 0 {
            p.reply_ep
        } else {
            std::ptr::null_mut()
        };
        (p.recv_attr, ep)
    };
    let rndv = attr & ffi::UCP_AM_RECV_ATTR_FLAG_RNDV != 0;
    // SAFETY: UCX's header pointer and length, used only during this callback.
    let h = match WriteHeader::decode(unsafe { am_bytes(header, header_length) }) {
        Ok(h) => h,
        Err(_) => {
            shared.inner.lock().malformed += 1;
            tracing::warn!("ucx: dropped a malformed WRITE header ({header_length} bytes)");
            return ffi::UCS_OK;
        }
    };
    let dst = match shared.check_write(&h, length, rndv) {
        Ok(d) => d,
        Err(code) => {
            shared.inner.lock().refused += 1;
            tracing::warn!(
                "ucx: refused a WRITE ({code:?}): key {:#x} offset {} length {}",
                h.key_id,
                h.offset,
                h.len
            );
            shared.answer(reply_ep, &h, code);
            return ffi::UCS_OK;
        }
    };
    shared.inner.lock().accepted += 1;
    if !rndv {
        if !data.is_null() {
            // SAFETY: `check_write` proved [dst, dst + length) inside a live registration
            // (the caller of `register` promised it is valid memory until deregister,
            // which cannot run concurrently: we hold the state lock); UCX guarantees
            // `length` readable bytes at `data` during the callback; distinct memory.
            unsafe { std::ptr::copy_nonoverlapping(data as *const u8, dst, length) };
        }
        shared.answer(reply_ep, &h, AckCode::Ok);
        return ffi::UCS_OK;
    }
    let ctx = Box::into_raw(Box::new(RecvCtx {
        shared: shared as *const Shared,
        key_id: h.key_id,
        reply_ep,
        header: h,
    }));
    let mut p = ffi::ucp_request_param_t::empty();
    p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_CALLBACK
        | ffi::UCP_OP_ATTR_FIELD_USER_DATA
        | ffi::UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    p.cb = ffi::ucp_request_cb_t {
        recv_am: Some(on_write_data),
    };
    p.user_data = ctx as *mut c_void;
    p.memory_type = ffi::UCS_MEMORY_TYPE_HOST;
    // SAFETY: `data` is the rendezvous descriptor UCX passed to this callback; the
    // destination was checked as for the eager copy and the registration stays held
    // (`inflight`, so deregister says Busy) until `on_write_data` runs.
    let r = unsafe {
        (shared.lib.am_recv_data_nbx)(shared.worker, data, dst as *mut c_void, length, &p)
    };
    if !ffi::ptr_is_request(r) {
        // Finished (or failed) at once: no callback will run.
        // SAFETY: the box leaked above; UCX did not keep it.
        let ctx = unsafe { Box::from_raw(ctx) };
        shared.end_recv(&ctx, ffi::ptr_status(r));
    }
    ffi::UCS_OK
}

/// `ucp_am_recv_callback_t`: the target answered one of our WRITEs.
unsafe extern "C" fn on_ack(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    _data: *mut c_void,
    _length: usize,
    _param: *const ffi::ucp_am_recv_param_t,
) -> ucs_status_t {
    if arg.is_null() {
        return ffi::UCS_OK;
    }
    // SAFETY: as in `on_ep_error`.
    let shared = unsafe { &*(arg as *const Shared) };
    let mut s = shared.inner.lock();
    // SAFETY: UCX's header pointer and length, used only during this callback.
    match Ack::decode(unsafe { am_bytes(header, header_length) }) {
        Ok(a) if a.instance == shared.instance => s.acks.push((a.seq, a.code)),
        _ => {
            s.malformed += 1;
            tracing::warn!("ucx: dropped a malformed or misdirected WRITE answer");
        }
    }
    ffi::UCS_OK
}

/// The bytes UCX passed to an active-message callback.
///
/// # Safety
/// `p` must be null or point at `n` readable bytes for as long as the slice is used
/// (UCX guarantees that during the callback; callers use it only there).
unsafe fn am_bytes<'a>(p: *const c_void, n: usize) -> &'a [u8] {
    if p.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: see the function's contract.
        unsafe { std::slice::from_raw_parts(p as *const u8, n) }
    }
}

/// `ucp_am_recv_callback_t`: a notification arrived.
unsafe extern "C" fn on_am(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const ffi::ucp_am_recv_param_t,
) -> ucs_status_t {
    if arg.is_null() {
        return ffi::UCS_OK;
    }
    // SAFETY: as in `on_ep_error`.
    let shared = unsafe { &*(arg as *const Shared) };
    // SAFETY: UCX passes a valid parameter struct for the duration of the call.
    let rndv =
        !param.is_null() && unsafe { (*param).recv_attr } & ffi::UCP_AM_RECV_ATTR_FLAG_RNDV != 0;
    let bytes = |p: *const c_void, n: usize| -> &[u8] {
        if p.is_null() || n == 0 {
            &[]
        } else {
            // SAFETY: UCX guarantees `n` readable bytes at `p` during the callback.
            unsafe { std::slice::from_raw_parts(p as *const u8, n) }
        }
    };
    let parsed = AmHeader::decode(bytes(header, header_length));
    match parsed {
        // Senders of this crate force eager sends, so a rendezvous message is foreign.
        Ok(h) if !rndv => {
            let payload = Bytes::copy_from_slice(bytes(data, length));
            shared.deliver(h, payload);
        }
        _ => {
            shared.inner.lock().malformed += 1;
            tracing::warn!("ucx: dropped a malformed notification ({header_length} header bytes)");
        }
    }
    ffi::UCS_OK
}

/// The error for a WRITE the target refused.
pub fn ack_error(c: AckCode) -> Error {
    let what = "the peer refused a WRITE sent as an active message";
    match c {
        AckCode::NotRegistered => Error::NotRegistered(format!(
            "{what}: it has no such registration (deregistered?)"
        )),
        AckCode::OutOfBounds => {
            Error::OutOfBounds(format!("{what}: the range lies outside its registration"))
        }
        AckCode::InvalidMetadata => {
            Error::invalid_metadata(format!("{what}: header and data disagree"))
        }
        AckCode::Ok | AckCode::Failed => Error::Backend {
            name: "ucx".into(),
            code: 0,
            message: format!("{what}: its UCX failed to receive the data"),
        },
    }
}
