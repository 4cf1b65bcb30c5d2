//! Both ends of an operation, inside UCX's active-message callbacks.
//!
//! * Target ([`on_op`]): an operation (a WRITE with its data, or a READ request) is
//!   served only when its tag verifies under a session this target created (or, without
//!   a cluster secret, when it claims none), every range it names lies inside a live,
//!   not revoked registration with the right access, and the lengths agree. Anything
//!   else is answered with an error and moves nothing. WRITE data is copied into place
//!   (eager) or received straight into it (rendezvous, the registration held until the
//!   receive ends); a READ is answered with the data (eager copy, or rendezvous straight
//!   from the registration, held until the send ends).
//! * Initiator ([`on_answer`]): an answer counts only for one of our operations still
//!   awaiting it and only when its session checks out; READ data lands only in that
//!   operation's local pieces.
//!
//! Peer input never panics: every callback body runs under [`ffi_guard`].

use std::ffi::c_void;
use std::time::Instant;

use kv_core::Descriptor;

use crate::ffi::{self, ucs_status_t};
use crate::send::{send, Payload};
use crate::session::Client;
use crate::shared::{ffi_guard, Inner, ReadDest, Shared};
use crate::wire::{AckCode, Answer, MapSrc, OpHeader, OpKind, ANSWER_LEN};

/// Active-message id of operations (initiator → target).
pub const AM_OP_ID: u32 = 0x4b57;
/// Active-message id of answers (target → initiator).
pub const AM_ANSWER_ID: u32 = 0x4b58;
/// Largest READ a target answers with one eager message (its bytes are gathered into
/// a buffer); our initiators ask for at most `request::BATCH_MAX`.
const MAX_EAGER_READ: u64 = 4 << 20;

/// What UCX passed to an active-message callback.
pub struct Msg<'a> {
    /// The header bytes.
    pub header: &'a [u8],
    /// The data (eager: the bytes; rendezvous: UCX's descriptor).
    pub data: *mut c_void,
    /// The data's length.
    pub length: usize,
    /// The data comes by rendezvous.
    pub rndv: bool,
    /// Where to answer (null when the sender asked for no reply).
    pub reply_ep: ffi::ucp_ep_h,
}

impl Msg<'_> {
    /// The message of a callback's arguments.
    ///
    /// # Safety
    /// As for [`am_bytes`]; `param` null or valid for the callback.
    pub unsafe fn new<'a>(
        header: *const c_void,
        header_length: usize,
        data: *mut c_void,
        length: usize,
        param: *const ffi::ucp_am_recv_param_t,
    ) -> Msg<'a> {
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
        Msg {
            // SAFETY: the caller's contract.
            header: unsafe { am_bytes(header, header_length) },
            data,
            length,
            rndv: attr & ffi::UCP_AM_RECV_ATTR_FLAG_RNDV != 0,
            reply_ep,
        }
    }

    /// The eager data as bytes (empty for rendezvous or none).
    ///
    /// # Safety
    /// Only during the callback that received the message.
    pub unsafe fn eager(&self) -> &[u8] {
        if self.rndv {
            return &[];
        }
        // SAFETY: UCX guarantees `length` readable bytes at `data` during the callback.
        unsafe { am_bytes(self.data, self.length) }
    }
}

/// The bytes UCX passed to an active-message callback.
///
/// # Safety
/// `p` must be null or point at `n` readable bytes for as long as the slice is used
/// (UCX guarantees that during the callback; callers use it only there).
pub unsafe fn am_bytes<'a>(p: *const c_void, n: usize) -> &'a [u8] {
    if p.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: see the function's contract.
        unsafe { std::slice::from_raw_parts(p as *const u8, n) }
    }
}

/// `Shared` from a callback's `arg`.
///
/// # Safety
/// `arg` must be the `Shared` the handlers were installed with (it outlives the worker).
pub unsafe fn shared_of<'a>(arg: *mut c_void) -> Option<&'a Shared> {
    // SAFETY: the function's contract.
    (!arg.is_null()).then(|| unsafe { &*(arg as *const Shared) })
}

/// Defines a `ucp_am_recv_callback_t` that runs `$body` with the `Shared` of its `arg`
/// (`$shared`) and the message (`$m`: a [`Msg`]), under `ffi_guard`.
macro_rules! am_callback {
    ($(#[$doc:meta])* $vis:vis fn $name:ident(|$shared:ident, $m:ident| $body:block)) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// Called by UCX with the handler's `arg` (the `Shared` it was installed with,
        /// which outlives the worker) and a message valid for the duration of the call.
        $vis unsafe extern "C" fn $name(
            arg: *mut std::ffi::c_void,
            header: *const std::ffi::c_void,
            header_length: usize,
            data: *mut std::ffi::c_void,
            length: usize,
            param: *const $crate::ffi::ucp_am_recv_param_t,
        ) -> $crate::ffi::ucs_status_t {
            $crate::shared::ffi_guard($crate::ffi::UCS_OK, || {
                // SAFETY: the handler's contract.
                let Some($shared) = (unsafe { $crate::serve::shared_of(arg) }) else {
                    return $crate::ffi::UCS_OK;
                };
                // SAFETY: UCX's arguments, used only during this callback.
                let $m = unsafe {
                    $crate::serve::Msg::new(header, header_length, data, length, param)
                };
                $body
                $crate::ffi::UCS_OK
            })
        }
    };
}
pub(crate) use am_callback;

/// Why an operation is not served.
enum Refusal {
    /// Drop silently (forged or replayed: answering would help nobody legitimate).
    Drop,
    /// Answer with this code.
    Answer(AckCode),
}

/// Checks that `h` (raw bytes `raw`) comes under a session we created, or that we and
/// it are unauthenticated.
fn authenticate(shared: &Shared, s: &mut Inner, h: &OpHeader, raw: &[u8]) -> Result<(), Refusal> {
    if shared.secret.is_none() {
        return match h.session {
            0 => Ok(()),
            _ => Err(Refusal::Answer(AckCode::Unauthenticated)),
        };
    }
    let Some(sess) = s.server.sessions.get_mut(&h.session) else {
        return Err(Refusal::Answer(AckCode::Unauthenticated));
    };
    sess.keyed
        .open(h.seq, raw, &[])
        .map_err(|_| Refusal::Drop)?;
    sess.used = Instant::now();
    Ok(())
}

/// One checked range: where, how long, in which registration.
type Dst = (u64, u64, u128);

/// Checks every range of `h` against live registrations; holds the registration for a
/// rendezvous transfer. All-or-nothing: the first failure refuses the whole operation.
fn check(s: &mut Inner, h: &OpHeader, m: &Msg<'_>) -> Result<Vec<Dst>, AckCode> {
    let mut total: u64 = 0;
    let mut dsts = Vec::with_capacity(h.entries.len());
    // The registration of the entry before (entries mostly name one): looked up once.
    let mut last: Option<(u128, Descriptor, bool)> = None;
    for e in &h.entries {
        let (desc, writable) = match last {
            Some((key, desc, writable)) if key == e.key_id => (desc, writable),
            _ => {
                let t = s
                    .targets
                    .get(&e.key_id)
                    .filter(|t| !t.revoked)
                    .ok_or(AckCode::NotRegistered)?;
                last = Some((e.key_id, t.desc, t.access.writable()));
                (t.desc, t.access.writable())
            }
        };
        if e.len == 0 {
            return Err(AckCode::InvalidMetadata);
        }
        let start = desc
            .addr
            .checked_add(e.offset)
            .ok_or(AckCode::OutOfBounds)?;
        let want = Descriptor::new(start, e.len, desc.device);
        if want.end().is_none() || !desc.contains(&want) {
            return Err(AckCode::OutOfBounds);
        }
        if h.kind == OpKind::Write && !writable {
            return Err(AckCode::AccessDenied);
        }
        total = total.checked_add(e.len).ok_or(AckCode::InvalidMetadata)?;
        dsts.push((start, e.len, e.key_id));
    }
    let single = dsts.len() == 1;
    let hold = match h.kind {
        // Mapped: no data travels; the target copies through the mapping at once.
        _ if h.src.is_some() && (m.length != 0 || m.rndv || h.rndv_reply) => {
            return Err(AckCode::InvalidMetadata)
        }
        _ if h.src.is_some() => false,
        OpKind::Write if total != m.length as u64 || (m.rndv && !single) => {
            return Err(AckCode::InvalidMetadata)
        }
        OpKind::Write => m.rndv,
        OpKind::Read if m.length != 0 || m.rndv => return Err(AckCode::InvalidMetadata),
        OpKind::Read if h.rndv_reply && single => true,
        OpKind::Read if total > MAX_EAGER_READ => return Err(AckCode::InvalidMetadata),
        OpKind::Read => false,
    };
    if hold {
        if let Some(t) = s.targets.get_mut(&dsts[0].2) {
            t.inflight += 1;
        }
    }
    Ok(dsts)
}

/// The answer to `h` with `code` and `len` bytes of data, tagged under its session.
fn answer_bytes(shared: &Shared, h: &OpHeader, code: AckCode, len: u64) -> [u8; ANSWER_LEN] {
    let mut s = shared.lock();
    let mut a = Answer {
        code,
        instance: h.instance,
        op: h.op,
        session: 0,
        seq: 0,
        len,
    };
    let sess = match shared.secret {
        Some(_) => s.server.sessions.get_mut(&h.session),
        None => None,
    };
    match sess {
        Some(sess) => {
            a.session = h.session;
            a.seq = sess.keyed.next_seq();
            let mut v = a.encode();
            sess.keyed.seal(a.seq, &mut v, &[]);
            v
        }
        None => a.encode(),
    }
}

/// Answers `h` on `reply_ep` with `code` (no data).
fn answer(shared: &Shared, reply_ep: ffi::ucp_ep_h, h: &OpHeader, code: AckCode) {
    let bytes = answer_bytes(shared, h, code, 0);
    send(
        shared,
        reply_ep,
        AM_ANSWER_ID,
        &bytes,
        Payload::None,
        ffi::UCP_AM_SEND_FLAG_EAGER,
    );
}

/// What a rendezvous receive does when it ends (with its status).
type OnEnd = Box<dyn FnOnce(&Shared, ucs_status_t)>;

/// A rendezvous receive in progress: its `Shared` and what to do when it ends.
struct Landing {
    shared: *const Shared,
    end: OnEnd,
}

/// Starts receiving rendezvous descriptor `data` into `[addr, addr + len)`; `end` runs
/// once with the outcome: here when UCX finishes (or fails) at once, else from
/// [`on_landed`].
///
/// # Safety
/// `data` must be the rendezvous descriptor of the running callback, and the range
/// valid for writes until `end` runs.
unsafe fn recv_into(shared: &Shared, data: *mut c_void, addr: u64, len: u64, end: OnEnd) {
    let ctx = Box::into_raw(Box::new(Landing { shared, end }));
    let mut p = ffi::ucp_request_param_t::empty();
    p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_CALLBACK
        | ffi::UCP_OP_ATTR_FIELD_USER_DATA
        | ffi::UCP_OP_ATTR_FIELD_MEMORY_TYPE;
    p.cb = ffi::ucp_request_cb_t {
        recv_am: Some(on_landed),
    };
    p.user_data = ctx as *mut c_void;
    p.memory_type = ffi::UCS_MEMORY_TYPE_HOST;
    // SAFETY: the function's contract; `ctx` is the `Landing` `on_landed` expects.
    let r = unsafe {
        (shared.lib.am_recv_data_nbx)(
            shared.worker,
            data,
            addr as usize as *mut c_void,
            len as usize,
            &p,
        )
    };
    if !ffi::ptr_is_request(r) {
        // Finished (or failed) at once: no callback will run.
        // SAFETY: the box leaked above; UCX did not keep it.
        let ctx = unsafe { Box::from_raw(ctx) };
        (ctx.end)(shared, ffi::ptr_status(r));
    }
}

/// `ucp_am_recv_data_nbx_callback_t` of [`recv_into`]: a rendezvous receive ended.
///
/// # Safety
/// Called only by UCX, once per receive that [`recv_into`] started and UCX did not
/// finish at once: `user_data` is the `Landing` box leaked for that receive (null is
/// ignored) and `req` is its request, freed here and nowhere else.
unsafe extern "C" fn on_landed(
    req: *mut c_void,
    status: ucs_status_t,
    _length: usize,
    user_data: *mut c_void,
) {
    ffi_guard((), || {
        if user_data.is_null() {
            return;
        }
        // SAFETY: `user_data` is the `Landing` box `recv_into` leaked for this receive
        // only; UCX calls this once.
        let ctx = unsafe { Box::from_raw(user_data as *mut Landing) };
        // SAFETY: the `Shared` outlives the worker.
        let shared = unsafe { &*ctx.shared };
        (ctx.end)(shared, status);
        if !req.is_null() {
            // SAFETY: the request `recv_into` got from ucp_am_recv_data_nbx and kept
            // no copy of; freed once, here.
            unsafe { (shared.lib.request_free)(req) };
        }
    })
}

/// What a rendezvous WRITE receive needs when it ends.
struct RecvCtx {
    key_id: u128,
    reply_ep: ffi::ucp_ep_h,
    header: OpHeader,
}

fn end_write(shared: &Shared, ctx: &RecvCtx, status: ucs_status_t) {
    shared.release_target(ctx.key_id);
    let code = if status == ffi::UCS_OK {
        AckCode::Ok
    } else {
        AckCode::Failed
    };
    answer(shared, ctx.reply_ep, &ctx.header, code);
}

am_callback! {
    /// `ucp_am_recv_callback_t` for [`AM_OP_ID`]: an operation from a peer.
    pub fn on_op(|shared, m| {
        serve_op(shared, &m);
    })
}

fn serve_op(shared: &Shared, m: &Msg<'_>) {
    let Ok(h) = OpHeader::decode(m.header) else {
        shared.lock().n.malformed += 1;
        tracing::warn!(
            "ucx: dropped a malformed operation header ({} bytes)",
            m.header.len()
        );
        return;
    };
    let checked = {
        let mut s = shared.lock();
        let r = authenticate(shared, &mut s, &h, m.header)
            .and_then(|()| check(&mut s, &h, m).map_err(Refusal::Answer));
        match &r {
            Err(Refusal::Drop) => s.n.malformed += 1,
            Err(Refusal::Answer(_)) => s.n.refused += 1,
            Ok(_) => {
                s.n.accepted += 1;
                // Counted here, under this lock, and taken back below in the rare case
                // that the copy is refused (no second lock per operation).
                s.n.mapped += u64::from(h.src.is_some());
            }
        }
        r
    };
    let dsts = match checked {
        Ok(d) => d,
        Err(Refusal::Drop) => {
            tracing::warn!(
                "ucx: dropped an operation whose tag did not verify (forged or replayed)"
            );
            return;
        }
        Err(Refusal::Answer(code)) => {
            tracing::warn!("ucx: refused an operation ({code:?})");
            answer(shared, m.reply_ep, &h, code);
            return;
        }
    };
    if let Some(src) = &h.src {
        let code = match copy_mapped(shared, m, &h, src, &dsts) {
            Ok(()) => AckCode::Ok,
            Err(code) => {
                shared.lock().n.mapped -= 1;
                tracing::warn!("ucx: refused a mapped operation ({code:?})");
                code
            }
        };
        answer(shared, m.reply_ep, &h, code);
        return;
    }
    match h.kind {
        OpKind::Write if m.rndv => receive_write(shared, m, h, dsts[0]),
        OpKind::Write => {
            // SAFETY: during the callback.
            let src = unsafe { m.eager() };
            let mut at = 0usize;
            for &(dst, len, _) in &dsts {
                let len = len as usize;
                let Some(piece) = src.get(at..at + len) else {
                    break; // cannot happen: the lengths were checked to add up
                };
                // SAFETY: `check` proved [dst, dst + len) inside a live registration
                // (whose owner promised valid, writable memory until deregister, which
                // cannot run concurrently: the core's state lock is held around this
                // callback); UCX's eager data is a distinct buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(piece.as_ptr(), dst as usize as *mut u8, len)
                };
                at += len;
            }
            answer(shared, m.reply_ep, &h, AckCode::Ok);
        }
        OpKind::Read => serve_read(shared, m, &h, &dsts),
    }
}

/// Serves a mapped operation whose ranges `check` proved (`dsts`): maps the initiator's
/// memory named by `src` (see `crate::mapping`) and copies each piece from it (WRITE) or
/// into it (READ). All-or-nothing for the checks: every piece must lie inside `src`.
fn copy_mapped(
    shared: &Shared,
    m: &Msg<'_>,
    h: &OpHeader,
    src: &MapSrc,
    dsts: &[Dst],
) -> Result<(), AckCode> {
    let end = src.base.checked_add(src.len).ok_or(AckCode::OutOfBounds)?;
    for e in &h.entries {
        let e_end = e.local.checked_add(e.len).ok_or(AckCode::OutOfBounds)?;
        if e.local < src.base || e_end > end {
            return Err(AckCode::OutOfBounds);
        }
    }
    let mut maps = shared.maps.lock();
    let base = maps.resolve(&shared.lib, m.reply_ep, h.instance, src)?;
    for (e, &(ours, len, _)) in h.entries.iter().zip(dsts) {
        // `resolve` proved [base, base + src.len) mapped here, readable and writable,
        // and every piece was checked inside `src` above.
        let theirs = base + (e.local - src.base) as usize;
        let (from, to) = match h.kind {
            OpKind::Write => (theirs, ours as usize),
            OpKind::Read => (ours as usize, theirs),
        };
        // SAFETY: `ours` lies inside a live registration (`check`; its owner promised
        // valid memory until deregister, which cannot run concurrently: the core's
        // state lock is held around this callback), `theirs` inside the peer's memory
        // mapped here (see above); `copy` tolerates the two overlapping.
        unsafe { std::ptr::copy(from as *const u8, to as *mut u8, len as usize) };
    }
    Ok(())
}

/// Receives a rendezvous WRITE straight into `dst` (held by `check`).
fn receive_write(shared: &Shared, m: &Msg<'_>, h: OpHeader, dst: Dst) {
    let (addr, len, key_id) = dst;
    let ctx = RecvCtx {
        key_id,
        reply_ep: m.reply_ep,
        header: h,
    };
    // SAFETY: `m.data` is the rendezvous descriptor UCX passed to this callback; the
    // destination was checked as for the eager copy and the registration stays held
    // (`inflight`, so deregister waits or says Busy) until `end_write` runs.
    unsafe {
        recv_into(
            shared,
            m.data,
            addr,
            len,
            Box::new(move |shared, status| end_write(shared, &ctx, status)),
        )
    };
}

/// Answers a READ with the data of `dsts`.
fn serve_read(shared: &Shared, m: &Msg<'_>, h: &OpHeader, dsts: &[Dst]) {
    let total: u64 = dsts.iter().map(|d| d.1).sum();
    let bytes = answer_bytes(shared, h, AckCode::Ok, total);
    if h.rndv_reply && dsts.len() == 1 {
        let (addr, len, key_id) = dsts[0];
        let payload = Payload::Registered {
            ptr: addr as usize as *const u8,
            len: len as usize,
            key_id,
        };
        send(
            shared,
            m.reply_ep,
            AM_ANSWER_ID,
            &bytes,
            payload,
            ffi::UCP_AM_SEND_FLAG_RNDV,
        );
        return;
    }
    let mut data = Vec::with_capacity(total as usize);
    for &(src, len, _) in dsts {
        // SAFETY: `check` proved the range inside a live registration (valid for reads
        // until deregister, which cannot run concurrently: the state lock is held).
        data.extend_from_slice(unsafe {
            std::slice::from_raw_parts(src as usize as *const u8, len as usize)
        });
    }
    send(
        shared,
        m.reply_ep,
        AM_ANSWER_ID,
        &bytes,
        Payload::Owned(data),
        ffi::UCP_AM_SEND_FLAG_EAGER,
    );
}

/// A READ's data landed (or failed): the operation is answered.
fn end_read(shared: &Shared, op: u64, status: ucs_status_t) {
    let mut s = shared.lock();
    s.ops.remove(&op);
    let code = if status == ffi::UCS_OK {
        AckCode::Ok
    } else {
        AckCode::Failed
    };
    shared.answered(&mut s, op, code);
}

am_callback! {
    /// `ucp_am_recv_callback_t` for [`AM_ANSWER_ID`]: a target answered one of ours.
    pub fn on_answer(|shared, m| {
        if !take_answer(shared, &m) {
            shared.lock().n.malformed += 1;
            tracing::warn!("ucx: dropped an answer that is not for an operation of ours");
        }
    })
}

/// Takes an answer; false when it is malformed, unverifiable or for no operation of
/// ours awaiting one (a late answer to a forgotten operation counts as taken).
fn take_answer(shared: &Shared, m: &Msg<'_>) -> bool {
    let Ok(a) = Answer::decode(m.header) else {
        return false;
    };
    if a.instance != shared.instance {
        return false;
    }
    let mut guard = shared.lock();
    let s = &mut *guard;
    let Some(entry) = s.ops.get(&a.op) else {
        return true; // forgotten (cancelled, timed out): ignored, nothing lands
    };
    if entry.receiving {
        return false;
    }
    let endpoint = entry.endpoint;
    let read = entry.read.as_ref().map(|d| ReadDest {
        pieces: d.pieces.clone(),
        total: d.total,
    });
    let verified = match s.clients.get_mut(&endpoint) {
        Some(Client::Ready { session, keyed }) if a.session == *session => {
            keyed.open(a.seq, m.header, &[]).is_ok()
        }
        // A target that lost our session can only refuse, untagged.
        Some(Client::Ready { .. }) => a.session == 0 && a.code == AckCode::Unauthenticated,
        Some(Client::Open) => a.session == 0,
        _ => false,
    };
    if !verified {
        return false;
    }
    if a.code == AckCode::Unmapped {
        s.unmapped.insert(endpoint);
    }
    let op = a.op;
    let dest = match (&read, a.code) {
        (Some(d), AckCode::Ok) => d,
        (None, code) if m.length == 0 => {
            s.ops.remove(&op);
            shared.answered(s, op, code);
            return true;
        }
        (None, _) => return false,
        (Some(_), code) => {
            s.ops.remove(&op);
            shared.answered(s, op, code);
            return true;
        }
    };
    if a.len != dest.total || m.length as u64 != dest.total {
        s.ops.remove(&op);
        shared.answered(s, op, AckCode::InvalidMetadata);
        return true;
    }
    if m.rndv {
        let [(addr, len)] = dest.pieces[..] else {
            s.ops.remove(&op);
            shared.answered(s, op, AckCode::InvalidMetadata);
            return true;
        };
        if let Some(e) = s.ops.get_mut(&op) {
            e.receiving = true;
        }
        drop(guard);
        receive_read(shared, m, op, addr, len);
        return true;
    }
    // SAFETY: during the callback.
    let src = unsafe { m.eager() };
    let mut at = 0usize;
    for &(dst, len) in &dest.pieces {
        let len = len as usize;
        let Some(piece) = src.get(at..at + len) else {
            break; // cannot happen: the total was checked
        };
        // SAFETY: the pieces are the local ranges of a READ we posted: registered and
        // kept valid by the caller of `post` until the transfer finishes, and the
        // transfer cannot finish while this operation is recorded (we are inside the
        // core's progress, under its state lock).
        unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), dst as usize as *mut u8, len) };
        at += len;
    }
    s.ops.remove(&op);
    shared.answered(s, op, AckCode::Ok);
    true
}

/// Receives a rendezvous READ answer straight into the local piece `addr`.
fn receive_read(shared: &Shared, m: &Msg<'_>, op: u64, addr: u64, len: u64) {
    // SAFETY: `m.data` is the rendezvous descriptor of this callback; the destination
    // is the local range of our READ (see `take_answer`), which stays registered and
    // busy while the operation is recorded as receiving (a cancelled or timed-out
    // transfer is quarantined until `end_read` ran).
    unsafe {
        recv_into(
            shared,
            m.data,
            addr,
            len,
            Box::new(move |shared, status| end_read(shared, op, status)),
        )
    };
}
