//! The UCP context and worker, and every table the backend keeps, behind one lock.
//!
//! Thread mode: the worker is created `UCS_THREAD_MODE_SERIALIZED` and every UCX call
//! on it (posting, progress, callbacks, teardown) happens with [`Core::state`]'s
//! `parking_lot::Mutex` held, so UCX sees one thread at a time, as that mode requires.
//! UCX's callbacks (request completion, endpoint error, active-message receive) run
//! inside those calls and therefore must not take the state lock: they touch only
//! [`Shared`] (its own short lock) or a request group's atomic counter.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{c_void, CString};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{
    check_request_shape, segments, Descriptor, DescriptorList, Error, MemKind, Notification, Op,
    PostOptions, Result, Status, TransferRequest,
};
use parking_lot::Mutex;

use crate::endpoint::{Endpoint, Gate, Note};
use crate::ffi::{self, ucs_status_t, Lib};
use crate::memory::{covering, HostAlloc, Registration, Remote};
use crate::request::Group;
use crate::wire::{self, Ack, AckCode, AmHeader, ConnInfo, RemoteKey, WriteHeader};
use crate::Options;

/// Active-message id of notifications.
const AM_ID: u32 = 0x4b56;
/// Active-message id of WRITEs sent as active messages (TCP; see [`on_write`]).
const AM_WRITE_ID: u32 = 0x4b57;
/// Active-message id of the target's answers to those WRITEs.
const AM_ACK_ID: u32 = 0x4b58;
/// Default of `Options::am_write_min`: over TCP, WRITE segments of at least this many
/// bytes go as active messages with rendezvous (received straight into the target's
/// registered memory); smaller ones stay `ucp_put_nbx`. See README, "TCP WRITEs".
pub const AM_WRITE_MIN: u64 = 512 << 10;
/// Most out-of-order notifications held per sender before giving up on a gap.
const MAX_HELD: usize = 4096;
/// UCX settings this backend changes from UCX's defaults unless the caller sets them
/// (`Options::config` / `ucx.<NAME>` params, or the `UCX_<NAME>` environment).
///
/// UCX 1.13 emulates `ucp_put`/`ucp_get` over TCP with active messages of at most
/// `TCP_TX_SEG_SIZE` bytes (default 8 KiB): a 1 MiB WRITE was 128 messages, each a
/// `send`, a `recv` and two user-space copies, at ~0.7 GiB/s on loopback; with 1 MiB
/// segments it is one message, ~4.7 GiB/s (256 KiB: ~4.1). The cost is memory: UCX's
/// TCP send and receive buffers grow to these sizes. A receiver must take a sender's whole segment (UCX
/// resets the connection otherwise), so both are raised, and `connect` refuses a peer
/// whose sizes do not fit ours (see `tests/tcp_segments.rs`).
///
/// The names are unprefixed on purpose: UCX 1.13's `ucp_config_modify` keeps names it
/// does not know and applies them to each transport's own table, whose fields carry no
/// `TCP_` prefix (`TCP_TX_SEG_SIZE` given there is silently unused; UCX warns
/// "invalid configurations"). `TX_SEG_SIZE`/`RX_SEG_SIZE` exist only in the TCP table.
pub const TCP_DEFAULTS: [(&str, &str); 2] = [("TX_SEG_SIZE", "1M"), ("RX_SEG_SIZE", "1M")];

/// The name under which `ucp_config_modify` applies setting `name`: UCX 1.13 matches
/// a transport's settings by their name inside the transport's table, so the `TCP_`
/// prefix (as in `UCX_TCP_NODELAY`) is dropped (`TCP_CM_*`, a table of its own, is
/// kept). Other names pass unchanged.
fn ucx_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    match upper.strip_prefix("TCP_") {
        Some(rest) if !upper.starts_with("TCP_CM_") && !rest.is_empty() => rest.to_owned(),
        _ => name.to_owned(),
    }
}

/// The value the caller chose for TCP setting `name` (`TX_SEG_SIZE`), through
/// `config` (with or without the `TCP_` prefix; the last one wins) or the
/// `UCX_TCP_<name>` environment.
fn tcp_setting(config: &[(String, String)], name: &str) -> Option<String> {
    let prefixed = format!("TCP_{name}");
    config
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(name) || k.eq_ignore_ascii_case(&prefixed))
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var(format!("UCX_{prefixed}")).ok())
}

/// UCX 1.13's own `TCP_TX_SEG_SIZE` / `TCP_RX_SEG_SIZE`.
const UCX_TCP_SEGS: (u32, u32) = (8 << 10, 64 << 10);

/// A UCX memory-units value (`"256K"`, `"1m"`, `"65536"`), in bytes.
fn parse_memunits(v: &str) -> Option<u32> {
    let v = v.trim();
    let v = v.strip_suffix(['b', 'B']).unwrap_or(v);
    let (num, shift) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 10),
        (i, 'm' | 'M') => (&v[..i], 20),
        (i, 'g' | 'G') => (&v[..i], 30),
        _ => (v, 0),
    };
    let n: u64 = num.trim().parse().ok()?;
    u32::try_from(n.checked_shl(shift)?.min(u64::from(u32::MAX) + 1)).ok()
}

/// Whether a `UCX_TLS` value lets UCX use TCP.
fn tls_has_tcp(tls: Option<&str>) -> bool {
    let Some(t) = tls else { return true };
    let has = |name: &str| {
        t.trim_start_matches('^')
            .split(',')
            .any(|x| x.trim() == name)
    };
    if t.starts_with('^') {
        !has("tcp")
    } else {
        has("tcp") || has("all")
    }
}

/// The TCP segment sizes (send, receive) this context ends up with: the last value in
/// `settings` (given to `ucp_config_modify`), else the environment, else UCX's default.
/// (0, 0) when the transports exclude TCP; 0 for a value we cannot read.
fn tcp_segments(settings: &[(String, String)], tls: Option<&str>) -> (u32, u32) {
    let env_tls = std::env::var("UCX_TLS").ok();
    if !tls_has_tcp(tls.or(env_tls.as_deref())) {
        return (0, 0);
    }
    let get = |name: &str, default: u32| match tcp_setting(settings, name) {
        Some(v) => parse_memunits(&v).unwrap_or(0),
        None => default,
    };
    (
        get("TX_SEG_SIZE", UCX_TCP_SEGS.0),
        get("RX_SEG_SIZE", UCX_TCP_SEGS.1),
    )
}

/// Worker progress calls per `progress()` when there is work.
const PROGRESS_BURST: usize = 32;

/// Backend instances alive in this process: a peer in the same process whose instance
/// is gone has freed (or may free) its memory, so nothing is posted to it. A peer in
/// another process is judged by UCX's error handling and the deadline.
static LIVE: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

fn new_instance_id() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // splitmix64 over pid, time and a counter: unique per process and across restarts.
    let mut z =
        nanos ^ (u64::from(std::process::id()) << 40) ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hasher for the tables keyed by our own sequential ids (never peer-chosen): the id
/// itself, spread by one multiply. SipHash showed up at ~8% of a 16 KiB post's time.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A table keyed by one of our ids.
type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// This process's id, read once (`getpid` is a system call; posts check it).
fn own_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

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

impl Shared {
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

/// The in-flight part of a posted transfer.
struct Flight {
    data: Group,
    post: u64,
    posted: Instant,
    deadline: Option<Instant>,
    note: NoteState,
    /// Sequence numbers of this post's WRITEs sent as active messages.
    am_seqs: Vec<u64>,
    /// How many of them the target has not answered yet.
    acks: usize,
    /// The first error a target answered with.
    ack_error: Option<AckCode>,
}

/// Why a transfer's data failed.
#[derive(Debug, Clone, Copy)]
enum Fail {
    Ucs(ucs_status_t),
    Ack(AckCode),
}

impl Flight {
    /// Every request completed and every active-message WRITE answered.
    fn complete(&self) -> bool {
        self.data.done() && self.acks == 0
    }

    /// The first failure (UCX's before the target's).
    fn failure(&self) -> Option<Fail> {
        self.data
            .error()
            .map(Fail::Ucs)
            .or(self.ack_error.map(Fail::Ack))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoteState {
    None,
    Queued,
    Issued,
    Delivered,
    Failed(ucs_status_t),
}

struct Transfer {
    op: Op,
    endpoint: u64,
    local: DescriptorList,
    remote: DescriptorList,
    local_regs: Vec<u64>,
    remote_ids: Vec<u64>,
    status: Status,
    flight: Option<Flight>,
    posts: u64,
    /// The segments (`kv_core::segments`) with their import, computed at prepare
    /// (unless there are more than [`PLAN_MAX`]): a post then walks a flat array.
    plan: Option<Vec<Seg>>,
}

/// Most segments a prepared transfer keeps precomputed (32 bytes each).
const PLAN_MAX: usize = 1 << 16;

/// One put/get of a post: addresses, length and the index of its import in the
/// transfer's `remote_ids`.
#[derive(Debug, Clone, Copy)]
struct Seg {
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

/// Everything behind the lock. UCX handles are raw pointers; they are only used under
/// the lock, which is what makes moving the state between threads sound.
pub struct State {
    ctx: ffi::ucp_context_h,
    worker: ffi::ucp_worker_h,
    regs: IdMap<Registration>,
    eps: IdMap<Endpoint>,
    remotes: IdMap<Remote>,
    transfers: IdMap<Transfer>,
    active: Vec<u64>,
    quarantine: Vec<Quarantined>,
    allocs: IdMap<HostAlloc>,
    /// Our WRITEs sent as active messages awaiting an answer: seq -> (transfer, post).
    am_writes: IdMap<(u64, u64)>,
    next_write_seq: u64,
    /// WRITE segments sent as active messages so far.
    am_sent: u64,
    next_id: u64,
}

/// Requests of an aborted transfer that UCX did not give back; they keep the transfer's
/// registrations busy until they complete.
struct Quarantined {
    data: Group,
    local_regs: Vec<u64>,
    remote_ids: Vec<u64>,
}

// SAFETY: the raw UCX handles inside are used only with the state lock held (the
// worker runs in UCS_THREAD_MODE_SERIALIZED), never concurrently from two threads.
unsafe impl Send for State {}

/// The backend's engine: library, context, worker, tables.
pub struct Core {
    pub lib: Arc<Lib>,
    pub agent: String,
    pub instance: u64,
    pub opts: Options,
    pub info: Bytes,
    /// The TCP segment sizes (send, receive) published in `info` (0: no TCP).
    tcp_segs: (u32, u32),
    max_am_header: usize,
    shared: Box<Shared>,
    state: Mutex<State>,
}

fn unavailable(reason: String) -> Error {
    Error::BackendUnavailable {
        name: "ucx".into(),
        reason,
    }
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid_argument(format!("{what} contains a NUL byte")))
}

impl Core {
    /// Loads UCX, creates the context (RMA + AM) and the worker, registers the
    /// notification handler and publishes the worker address.
    pub fn new(agent: &str, opts: Options) -> Result<Core> {
        let lib = Lib::shared(opts.lib_path.as_deref())?;
        let instance = new_instance_id();
        let name = cstring(agent, "agent name")?;

        let mut config: ffi::ucp_config_p = std::ptr::null_mut();
        // SAFETY: NULL prefix and file mean "UCX_ environment"; out-pointer valid.
        lib.check("ucp_config_read", unsafe {
            (lib.config_read)(std::ptr::null(), std::ptr::null(), &mut config)
        })
        .map_err(|e| unavailable(e.to_string()))?;
        let mut settings: Vec<(String, String)> = opts
            .config
            .iter()
            .map(|(k, v)| (ucx_name(k), v.clone()))
            .collect();
        let env_tls = std::env::var("UCX_TLS").ok();
        if tls_has_tcp(opts.tls.as_deref().or(env_tls.as_deref())) {
            for (name, value) in TCP_DEFAULTS {
                if tcp_setting(&opts.config, name).is_none() {
                    settings.push((name.to_string(), value.to_string()));
                }
            }
        }
        if let Some(tls) = &opts.tls {
            settings.push(("TLS".into(), tls.clone()));
        }
        for (k, v) in &settings {
            let (ck, cv) = (cstring(k, "UCX setting")?, cstring(v, "UCX setting")?);
            // SAFETY: `config` came from ucp_config_read; both strings are NUL-terminated.
            let s = unsafe { (lib.config_modify)(config, ck.as_ptr(), cv.as_ptr()) };
            if s != ffi::UCS_OK {
                // SAFETY: releasing the config read above, once.
                unsafe { (lib.config_release)(config) };
                return Err(Error::invalid_argument(format!(
                    "UCX setting {k}={v}: {}",
                    lib.status_text(s)
                )));
            }
        }
        let tcp_segs = tcp_segments(&settings, opts.tls.as_deref());
        let params = ffi::ucp_params_t {
            field_mask: ffi::UCP_PARAM_FIELD_FEATURES
                | ffi::UCP_PARAM_FIELD_MT_WORKERS_SHARED
                | ffi::UCP_PARAM_FIELD_NAME,
            features: ffi::UCP_FEATURE_RMA | ffi::UCP_FEATURE_AM,
            request_size: 0,
            request_init: None,
            request_cleanup: None,
            tag_sender_mask: 0,
            mt_workers_shared: 0,
            estimated_num_eps: 0,
            estimated_num_ppn: 0,
            name: name.as_ptr(),
        };
        let mut ctx: ffi::ucp_context_h = std::ptr::null_mut();
        // SAFETY: `ucp_init` is a static inline over ucp_init_version with the header's
        // API version; params, config and out-pointer are valid for the call.
        let s = unsafe {
            (lib.init_version)(
                ffi::API_VERSION.0,
                ffi::API_VERSION.1,
                &params,
                config,
                &mut ctx,
            )
        };
        // SAFETY: the context copied what it needed; the config is released once.
        unsafe { (lib.config_release)(config) };
        if s != ffi::UCS_OK {
            return Err(unavailable(format!(
                "ucp_init failed: {} (UCX_TLS / tls = {:?}; check `ucx_info -d` for the transports this host has)",
                lib.status_text(s),
                opts.tls
            )));
        }
        let mut wp = ffi::ucp_worker_params_t {
            field_mask: ffi::UCP_WORKER_PARAM_FIELD_THREAD_MODE,
            thread_mode: ffi::UCS_THREAD_MODE_SERIALIZED,
            cpu_mask: ffi::ucs_cpu_set_t { bits: [0; 16] },
            events: 0,
            user_data: std::ptr::null_mut(),
            event_fd: -1,
            flags: 0,
            name: std::ptr::null(),
            am_alignment: 0,
            client_id: 0,
        };
        let mut worker: ffi::ucp_worker_h = std::ptr::null_mut();
        // SAFETY: valid context, params and out-pointer.
        let s = unsafe { (lib.worker_create)(ctx, &mut wp, &mut worker) };
        if s != ffi::UCS_OK {
            // SAFETY: the context was created above and nothing else uses it.
            unsafe { (lib.cleanup)(ctx) };
            return Err(unavailable(format!(
                "ucp_worker_create failed: {}",
                lib.status_text(s)
            )));
        }
        let state = State {
            ctx,
            worker,
            regs: IdMap::default(),
            eps: IdMap::default(),
            remotes: IdMap::default(),
            transfers: IdMap::default(),
            active: Vec::new(),
            quarantine: Vec::new(),
            allocs: IdMap::default(),
            am_writes: IdMap::default(),
            next_write_seq: 0,
            am_sent: 0,
            next_id: 1,
        };
        let shared = Box::new(Shared {
            inner: Mutex::new(SharedInner::default()),
            lib: lib.clone(),
            worker,
            instance,
        });
        // From here on `Core::drop` tears everything down on any error.
        let mut core = Core {
            lib: lib.clone(),
            agent: agent.to_owned(),
            instance,
            opts,
            info: Bytes::new(),
            tcp_segs,
            max_am_header: 0,
            shared,
            state: Mutex::new(state),
        };
        let shared_ptr = &*core.shared as *const Shared as *mut c_void;
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
        let mut attr = ffi::ucp_worker_attr_t {
            field_mask: ffi::UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER,
            thread_mode: 0,
            address_flags: 0,
            address: std::ptr::null_mut(),
            address_length: 0,
            max_am_header: 0,
            name: [0; 32],
            max_debug_string: 0,
        };
        // SAFETY: valid worker and attribute struct.
        lib.check("ucp_worker_query", unsafe {
            (lib.worker_query)(worker, &mut attr)
        })?;
        core.max_am_header = attr.max_am_header;
        let mut addr: ffi::ucp_address_p = std::ptr::null_mut();
        let mut addr_len = 0usize;
        // SAFETY: valid worker and out-pointers.
        lib.check("ucp_worker_get_address", unsafe {
            (lib.worker_get_address)(worker, &mut addr, &mut addr_len)
        })?;
        // SAFETY: UCX returned `addr_len` readable bytes at `addr`.
        let worker_address =
            unsafe { std::slice::from_raw_parts(addr as *const u8, addr_len) }.to_vec();
        // SAFETY: releasing the address obtained above, once.
        unsafe { (lib.worker_release_address)(worker, addr) };
        let info = ConnInfo {
            name: agent.to_owned(),
            instance,
            pid: own_pid(),
            tcp_tx_seg: tcp_segs.0,
            tcp_rx_seg: tcp_segs.1,
            worker_address,
        };
        core.info = Bytes::from(info.encode()?);
        LIVE.lock().insert(instance);
        Ok(core)
    }

    fn header_for(&self, ep_id: u64, seq: u64) -> Result<Vec<u8>> {
        let h = AmHeader {
            instance: self.instance,
            endpoint: ep_id,
            seq,
            name: self.agent.clone(),
        }
        .encode()?;
        if h.len() > self.max_am_header {
            return Err(Error::invalid_argument(format!(
                "notification header of {} bytes exceeds UCX's limit of {}; use a shorter agent name",
                h.len(),
                self.max_am_header
            )));
        }
        Ok(h)
    }

    fn check_payload(&self, p: &Bytes) -> Result<()> {
        if p.len() > self.opts.max_notification {
            return Err(Error::invalid_argument(format!(
                "notification of {} bytes; the limit is {} (Options::max_notification)",
                p.len(),
                self.opts.max_notification
            )));
        }
        Ok(())
    }

    /// `Backend::register`.
    pub fn register(&self, kind: MemKind, desc: &Descriptor) -> Result<u64> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "ucx registers dram (this UCX build has no CUDA support), not {kind}"
            )));
        }
        if desc.len == 0 || desc.end().is_none() || desc.device != 0 {
            return Err(Error::invalid_argument(format!(
                "cannot register {desc:?}: empty, overflowing or not host memory"
            )));
        }
        let lib = &self.lib;
        let mut st = self.state.lock();
        // Memory from `alloc_host` keeps its own handle: packing that one gives peers a
        // key to UCX's shared-memory mapping (a direct copy instead of emulated RMA).
        let owner = st
            .allocs
            .iter()
            .find(|(_, a)| !a.dropped && a.desc.contains(desc))
            .map(|(id, a)| (*id, a.memh));
        let key_id = new_instance_id();
        if let Some((aid, memh)) = owner {
            let key = self.pack(&st, memh, desc, key_id)?;
            if let Some(a) = st.allocs.get_mut(&aid) {
                a.users += 1;
            }
            let id = st.next_id;
            st.next_id += 1;
            st.regs.insert(
                id,
                Registration {
                    memh,
                    alloc: Some(aid),
                    desc: *desc,
                    key,
                    key_id,
                    busy: 0,
                },
            );
            self.add_target(key_id, desc);
            return Ok(id);
        }
        let mp = ffi::ucp_mem_map_params_t {
            field_mask: ffi::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | ffi::UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | ffi::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE,
            address: desc.addr as usize as *mut c_void,
            length: desc.len as usize,
            // No UCP_MEM_MAP_ALLOCATE: map the caller's existing memory.
            flags: 0,
            prot: 0,
            memory_type: ffi::UCS_MEMORY_TYPE_HOST,
        };
        let mut memh: ffi::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: the caller of `Backend::register` promised the range is valid memory
        // until deregister; params and out-pointer are valid.
        lib.check("ucp_mem_map", unsafe {
            (lib.mem_map)(st.ctx, &mp, &mut memh)
        })?;
        let key = match self.pack(&st, memh, desc, key_id) {
            Ok(k) => k,
            Err(e) => {
                // SAFETY: unmapping the handle mapped above; nothing uses it yet.
                unsafe { (lib.mem_unmap)(st.ctx, memh) };
                return Err(e);
            }
        };
        let id = st.next_id;
        st.next_id += 1;
        st.regs.insert(
            id,
            Registration {
                memh,
                alloc: None,
                desc: *desc,
                key,
                key_id,
                busy: 0,
            },
        );
        self.add_target(key_id, desc);
        Ok(id)
    }

    /// Lets WRITEs sent as active messages land in a new registration.
    fn add_target(&self, key_id: u64, desc: &Descriptor) {
        self.shared.inner.lock().targets.insert(
            key_id,
            Target {
                desc: *desc,
                inflight: 0,
            },
        );
    }

    /// Packs `memh`'s rkey into our envelope for the range `desc`.
    fn pack(
        &self,
        st: &State,
        memh: ffi::ucp_mem_h,
        desc: &Descriptor,
        key_id: u64,
    ) -> Result<Bytes> {
        let lib = &self.lib;
        let mut buf: *mut c_void = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: valid context and memory handle; out-pointers valid.
        lib.check("ucp_rkey_pack", unsafe {
            (lib.rkey_pack)(st.ctx, memh, &mut buf, &mut len)
        })?;
        // SAFETY: UCX returned `len` readable bytes at `buf`.
        let rkey = unsafe { std::slice::from_raw_parts(buf as *const u8, len) }.to_vec();
        // SAFETY: releasing the packed buffer obtained above, once.
        unsafe { (lib.rkey_buffer_release)(buf) };
        Ok(Bytes::from(
            RemoteKey {
                range: *desc,
                key_id,
                rkey,
            }
            .encode()?,
        ))
    }

    /// `UcxBackend::alloc_host`: `len` bytes allocated by UCX (`UCP_MEM_MAP_ALLOCATE`),
    /// zeroed. Returns the allocation's id and range.
    pub fn alloc_host(&self, len: usize) -> Result<(u64, Descriptor)> {
        if len == 0 {
            return Err(Error::invalid_argument("alloc_host of 0 bytes"));
        }
        let lib = &self.lib;
        let mut st = self.state.lock();
        let mp = ffi::ucp_mem_map_params_t {
            field_mask: ffi::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | ffi::UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | ffi::UCP_MEM_MAP_PARAM_FIELD_FLAGS
                | ffi::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE,
            address: std::ptr::null_mut(),
            length: len,
            flags: ffi::UCP_MEM_MAP_ALLOCATE,
            prot: 0,
            memory_type: ffi::UCS_MEMORY_TYPE_HOST,
        };
        let mut memh: ffi::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: valid context, params and out-pointer; UCX allocates the memory.
        lib.check("ucp_mem_map(ALLOCATE)", unsafe {
            (lib.mem_map)(st.ctx, &mp, &mut memh)
        })?;
        let mut attr = ffi::ucp_mem_attr_t {
            field_mask: ffi::UCP_MEM_ATTR_FIELD_ADDRESS | ffi::UCP_MEM_ATTR_FIELD_LENGTH,
            address: std::ptr::null_mut(),
            length: 0,
            mem_type: 0,
        };
        // SAFETY: the handle mapped above; valid attribute struct.
        let s = unsafe { (lib.mem_query)(memh, &mut attr) };
        if s != ffi::UCS_OK || attr.address.is_null() || attr.length < len {
            // SAFETY: releasing the allocation made above, once; nothing else has it.
            unsafe { (lib.mem_unmap)(st.ctx, memh) };
            return Err(if s != ffi::UCS_OK {
                lib.error("ucp_mem_query", s)
            } else {
                Error::Backend {
                    name: "ucx".into(),
                    code: 0,
                    message: format!(
                        "ucp_mem_map(ALLOCATE) returned {} bytes at {:?} for {len}",
                        attr.length, attr.address
                    ),
                }
            });
        }
        // SAFETY: UCX allocated at least `len` writable bytes at `attr.address`; zeroing
        // them makes every byte initialised whatever allocator UCX picked.
        unsafe { std::ptr::write_bytes(attr.address as *mut u8, 0, len) };
        let desc = Descriptor::new(attr.address as usize as u64, len as u64, 0);
        let id = st.next_id;
        st.next_id += 1;
        st.allocs.insert(
            id,
            HostAlloc {
                memh,
                desc,
                users: 0,
                dropped: false,
            },
        );
        Ok((id, desc))
    }

    /// The owner of allocation `id` is gone: unmap it now, or when the last
    /// registration that reuses it is deregistered.
    pub fn free_host(&self, id: u64) {
        let mut st = self.state.lock();
        let ctx = st.ctx;
        let Some(a) = st.allocs.get_mut(&id) else {
            return;
        };
        a.dropped = true;
        if a.users == 0 {
            let memh = a.memh;
            st.allocs.remove(&id);
            // SAFETY: no registration uses the handle, so no transfer can touch the
            // memory; the allocation is unmapped (freed) once.
            unsafe { (self.lib.mem_unmap)(ctx, memh) };
        } else {
            tracing::warn!(
                "ucx: memory from alloc_host dropped while registered; freed at deregister"
            );
        }
    }

    /// `Backend::deregister`.
    pub fn deregister(&self, id: u64) -> Result<()> {
        let mut st = self.state.lock();
        let r = st
            .regs
            .get(&id)
            .ok_or_else(|| Error::NotRegistered(format!("RegistrationId#{id}")))?;
        if r.busy > 0 {
            return Err(Error::Busy(format!(
                "RegistrationId#{id} is named by {} posted transfer(s); wait for them or cancel them first",
                r.busy
            )));
        }
        let (memh, alloc, key_id) = (r.memh, r.alloc, r.key_id);
        {
            // Under the state lock no WRITE handler runs; a rendezvous WRITE still
            // receiving into the range keeps it.
            let mut sh = self.shared.inner.lock();
            if let Some(t) = sh.targets.get(&key_id) {
                if t.inflight > 0 {
                    return Err(Error::Busy(format!(
                        "RegistrationId#{id} is receiving {} WRITE(s) from a peer; progress and retry",
                        t.inflight
                    )));
                }
            }
            sh.targets.remove(&key_id);
        }
        st.regs.remove(&id);
        let ctx = st.ctx;
        if let Some(aid) = alloc {
            // The handle belongs to the allocation; free it only if its owner is gone
            // and this was the last registration on it.
            let Some(a) = st.allocs.get_mut(&aid) else {
                return Ok(());
            };
            a.users = a.users.saturating_sub(1);
            if !(a.dropped && a.users == 0) {
                return Ok(());
            }
            st.allocs.remove(&aid);
        }
        // SAFETY: no posted transfer names the registration (busy == 0), so UCX has no
        // operation on it in flight; the handle is unmapped once (a shared allocation
        // handle only after its owner and every other registration let go).
        self.lib
            .check("ucp_mem_unmap", unsafe { (self.lib.mem_unmap)(ctx, memh) })
    }

    /// `Backend::remote_key`.
    pub fn remote_key(&self, id: u64) -> Result<Bytes> {
        self.state
            .lock()
            .regs
            .get(&id)
            .map(|r| r.key.clone())
            .ok_or_else(|| Error::NotRegistered(format!("RegistrationId#{id}")))
    }

    /// `Backend::connect`: an endpoint to the peer's worker address, with peer error
    /// handling so a dead peer fails its requests.
    pub fn connect(&self, peer_name: &str, info: &[u8]) -> Result<u64> {
        let info = ConnInfo::decode(info)?;
        self.check_segments(peer_name, &info)?;
        if let Some(why) = peer_gone(&info) {
            return Err(Error::RemoteDisconnected {
                peer: peer_name.to_owned(),
                reason: why,
            });
        }
        let lib = &self.lib;
        let mut st = self.state.lock();
        let worker = st.worker;
        let create = |mode: std::ffi::c_uint| {
            let params = ffi::ucp_ep_params_t {
                field_mask: ffi::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                    | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                    | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLER,
                address: info.worker_address.as_ptr() as *const c_void,
                err_mode: mode,
                err_handler: ffi::ucp_err_handler_t {
                    cb: Some(on_ep_error),
                    arg: &*self.shared as *const Shared as *mut c_void,
                },
                user_data: std::ptr::null_mut(),
                flags: 0,
                sockaddr: ffi::ucs_sock_addr_t {
                    addr: std::ptr::null(),
                    addrlen: 0,
                },
                conn_request: std::ptr::null_mut(),
                name: std::ptr::null(),
                local_sockaddr: ffi::ucs_sock_addr_t {
                    addr: std::ptr::null(),
                    addrlen: 0,
                },
            };
            let mut ep: ffi::ucp_ep_h = std::ptr::null_mut();
            // SAFETY: valid worker, params (the address bytes passed our envelope checks
            // and live through the call) and out-pointer; under the state lock.
            let s = unsafe { (lib.ep_create)(worker, &params, &mut ep) };
            (s, ep)
        };
        // Peer error handling first; UCX 1.13's shared-memory transports have no peer
        // failure detection and refuse it (UCS_ERR_UNREACHABLE), so those endpoints fall
        // back to no error handling, the deadline and the in-process liveness check.
        let shm_only = self.opts.tls.as_deref().is_some_and(|t| {
            t.split(',').all(|x| {
                matches!(
                    x.trim(),
                    "posix" | "sysv" | "cma" | "self" | "knem" | "xpmem" | "sm" | "shm" | "mm"
                )
            })
        });
        let (mut s, mut ep, mut peer_errors) = if shm_only {
            (ffi::UCS_ERR_UNREACHABLE, std::ptr::null_mut(), false)
        } else {
            let (s, ep) = create(ffi::UCP_ERR_HANDLING_MODE_PEER);
            (s, ep, true)
        };
        if s == ffi::UCS_ERR_UNREACHABLE {
            (s, ep) = create(ffi::UCP_ERR_HANDLING_MODE_NONE);
            peer_errors = false;
            tracing::debug!("ucx: transports without peer failure detection; deadlines only");
        }
        if s != ffi::UCS_OK {
            return Err(if ffi::is_disconnect_status(s) {
                Error::RemoteDisconnected {
                    peer: peer_name.to_owned(),
                    reason: lib.status_text(s),
                }
            } else {
                lib.error("ucp_ep_create", s)
            });
        }
        let id = st.next_id;
        st.next_id += 1;
        let mut e = Endpoint::new(ep, peer_name.to_owned(), info);
        e.peer_errors = peer_errors;
        if self.opts.am_write_min != u64::MAX {
            // SAFETY: the endpoint created above and an open FILE stream, under the lock.
            let lanes = ffi::capture_file(|f| unsafe { (lib.ep_print_info)(ep, f) });
            if lanes.as_deref().is_some_and(all_lanes_tcp) {
                e.am_write_min = self.opts.am_write_min.max(1);
            }
        }
        st.eps.insert(id, e);
        Ok(id)
    }

    /// Refuses a peer whose UCX would send TCP segments larger than ours receives, or
    /// receive smaller ones than ours sends: UCX resets such a connection (and a write
    /// can report success before the reset).
    fn check_segments(&self, peer_name: &str, peer: &ConnInfo) -> Result<()> {
        let (tx, rx) = self.tcp_segs;
        let fits = |send: u32, recv: u32| send == 0 || recv == 0 || send <= recv;
        if fits(tx, peer.tcp_rx_seg) && fits(peer.tcp_tx_seg, rx) {
            return Ok(());
        }
        Err(Error::invalid_argument(format!(
            "ucx: TCP segment sizes do not match {peer_name}: we send {tx} and receive {rx} \
             bytes, it sends {} and receives {}; every sender's TCP_TX_SEG_SIZE must be at \
             most its receiver's TCP_RX_SEG_SIZE (params ucx.TCP_TX_SEG_SIZE / \
             ucx.TCP_RX_SEG_SIZE; this backend's defaults are {:?})",
            peer.tcp_tx_seg, peer.tcp_rx_seg, TCP_DEFAULTS
        )))
    }

    /// `Backend::disconnect`.
    pub fn disconnect(&self, id: u64) -> Result<()> {
        let mut st = self.state.lock();
        let ep = st
            .eps
            .get(&id)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{id}")))?;
        let err = ep.disconnected("disconnected locally");
        let tids: Vec<u64> = st
            .active
            .iter()
            .copied()
            .filter(|t| st.transfers.get(t).is_some_and(|t| t.endpoint == id))
            .collect();
        for t in tids {
            self.abort(&mut st, t, err.clone())?;
        }
        let rids: Vec<u64> = st
            .remotes
            .iter()
            .filter(|(_, r)| r.endpoint == id)
            .map(|(k, _)| *k)
            .collect();
        for r in rids {
            st.remotes.remove(&r);
        }
        self.close_endpoint(&mut st, id, "disconnected locally");
        if let Some(mut ep) = st.eps.remove(&id) {
            self.destroy_rkeys(&mut ep);
        }
        Ok(())
    }

    fn destroy_rkeys(&self, ep: &mut Endpoint) {
        for (_, (rkey, _)) in ep.rkeys.drain() {
            // SAFETY: every transfer that used the rkey finished (aborted or done) and
            // the rkey is destroyed once.
            unsafe { (self.lib.rkey_destroy)(rkey) };
        }
    }

    /// Force-closes an endpoint: UCX completes its outstanding requests with
    /// `UCS_ERR_CANCELED`. Unsent notifications are dropped.
    /// An endpoint without peer error handling is closed in flush mode instead (UCX
    /// requires peer error handling on both sides for a forced close); its requests
    /// then complete only if the peer progresses.
    fn close_endpoint(&self, st: &mut State, id: u64, reason: &str) {
        let lib = &self.lib;
        let worker = st.worker;
        let Some(ep) = st.eps.get_mut(&id) else {
            return;
        };
        if ep.dead.is_none() {
            ep.dead = Some(reason.to_owned());
        }
        if ep.ep.is_null() {
            return;
        }
        let mut p = ffi::ucp_request_param_t::empty();
        // A forced close needs peer error handling on both sides; without it, close
        // in flush mode (bounded below).
        if ep.peer_errors {
            p.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = ffi::UCP_EP_CLOSE_FLAG_FORCE;
        }
        // SAFETY: a live endpoint of this worker, closed once (set to null below).
        let r = unsafe { (lib.ep_close_nbx)(ep.ep, &p) };
        ep.ep = std::ptr::null_mut();
        ep.notes.retain(|n| n.sent.is_some());
        if ffi::ptr_is_request(r) {
            let end = Instant::now() + Duration::from_secs(2);
            // SAFETY: `r` is a live request of this worker until freed below.
            while unsafe { (lib.request_check_status)(r) } == ffi::UCS_INPROGRESS
                && Instant::now() < end
            {
                // SAFETY: valid worker, under the state lock.
                unsafe { (lib.worker_progress)(worker) };
            }
            // SAFETY: freeing the close request once (complete or not).
            unsafe { (lib.request_free)(r) };
        }
    }

    /// `Backend::import_remote`: unpacks the rkey once per endpoint and caches it.
    pub fn import_remote(
        &self,
        ep_id: u64,
        kind: MemKind,
        desc: &Descriptor,
        key: &[u8],
    ) -> Result<u64> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "ucx addresses dram, not {kind}"
            )));
        }
        let key = RemoteKey::decode(key)?;
        if !key.range.contains(desc) {
            return Err(Error::OutOfBounds(format!(
                "imported range {desc:?} is not inside the registration {:?} its key covers",
                key.range
            )));
        }
        let lib = &self.lib;
        let mut st = self.state.lock();
        let ep = st
            .eps
            .get_mut(&ep_id)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{ep_id}")))?;
        if let Some(why) = &ep.dead {
            return Err(ep.disconnected(why.clone()));
        }
        let rkey = match ep.rkeys.get_mut(&key.rkey) {
            Some((rkey, refs)) => {
                *refs += 1;
                *rkey
            }
            None => {
                let mut rkey: ffi::ucp_rkey_h = std::ptr::null_mut();
                // SAFETY: a live endpoint; the packed bytes passed the envelope checks
                // and live through the call; out-pointer valid.
                lib.check("ucp_ep_rkey_unpack", unsafe {
                    (lib.ep_rkey_unpack)(ep.ep, key.rkey.as_ptr() as *const c_void, &mut rkey)
                })
                .map_err(|e| Error::invalid_metadata(format!("remote key refused by UCX: {e}")))?;
                ep.rkeys.insert(key.rkey.clone(), (rkey, 1));
                rkey
            }
        };
        let id = st.next_id;
        st.next_id += 1;
        st.remotes.insert(
            id,
            Remote {
                endpoint: ep_id,
                desc: *desc,
                packed: key.rkey,
                rkey,
                key_id: key.key_id,
                key_base: key.range.addr,
                busy: 0,
            },
        );
        Ok(id)
    }

    /// `Backend::release_remote`.
    pub fn release_remote(&self, id: u64) -> Result<()> {
        let mut st = self.state.lock();
        let r = st
            .remotes
            .get(&id)
            .ok_or_else(|| Error::NotRegistered(format!("RemoteId#{id}")))?;
        if r.busy > 0 {
            return Err(Error::Busy(format!(
                "RemoteId#{id} is used by {} posted transfer(s)",
                r.busy
            )));
        }
        let Some(r) = st.remotes.remove(&id) else {
            return Ok(());
        };
        if let Some(ep) = st.eps.get_mut(&r.endpoint) {
            if let Some((rkey, refs)) = ep.rkeys.get_mut(&r.packed) {
                *refs -= 1;
                if *refs == 0 {
                    let rkey = *rkey;
                    ep.rkeys.remove(&r.packed);
                    // SAFETY: no transfer uses it (busy was 0 for every import sharing
                    // it, and this was the last); destroyed once.
                    unsafe { (self.lib.rkey_destroy)(rkey) };
                }
            }
        }
        Ok(())
    }

    /// `Backend::prepare`: bounds are checked here, once.
    pub fn prepare(&self, req: &TransferRequest) -> Result<u64> {
        check_request_shape(req)?;
        if req.local_kind != MemKind::Dram || req.remote_kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "ucx moves dram to dram, not {} to {}",
                req.local_kind, req.remote_kind
            )));
        }
        let mut st = self.state.lock();
        let ep = st
            .eps
            .get(&req.peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{}", req.peer)))?;
        if let Some(why) = &ep.dead {
            return Err(ep.disconnected(why.clone()));
        }
        let (lids, ldescs): (Vec<u64>, Vec<Descriptor>) =
            st.regs.iter().map(|(i, r)| (*i, r.desc)).unzip();
        let local_regs = covering(&req.local, &ldescs)
            .ok_or_else(|| {
                Error::NotRegistered(
                    "a local descriptor lies outside every local registration".into(),
                )
            })?
            .into_iter()
            .map(|i| lids[i])
            .collect();
        let (rids, rdescs): (Vec<u64>, Vec<Descriptor>) = st
            .remotes
            .iter()
            .filter(|(_, r)| r.endpoint == req.peer.0)
            .map(|(i, r)| (*i, r.desc))
            .unzip();
        let remote_ids = covering(&req.remote, &rdescs)
            .ok_or_else(|| {
                Error::OutOfBounds(format!(
                    "a remote descriptor lies outside what {} registered and we imported",
                    ep.peer_name
                ))
            })?
            .into_iter()
            .map(|i| rids[i])
            .collect::<Vec<u64>>();
        let ranges: Vec<Descriptor> = remote_ids
            .iter()
            .filter_map(|r| st.remotes.get(r).map(|r| r.desc))
            .collect();
        let plan = plan(&req.local, &req.remote, &ranges, PLAN_MAX);
        let id = st.next_id;
        st.next_id += 1;
        st.transfers.insert(
            id,
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
            },
        );
        Ok(id)
    }

    /// `Backend::post`: one `put_nbx`/`get_nbx` per segment, then (for writes) an
    /// endpoint flush so completion means the data landed; the notification, if any,
    /// is queued behind it.
    pub fn post(&self, id: u64, opts: &PostOptions) -> Result<()> {
        if let Some(p) = &opts.notification {
            self.check_payload(p)?;
        }
        let lib = &self.lib;
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let t = st
            .transfers
            .get_mut(&id)
            .ok_or_else(|| Error::NotRegistered(format!("TransferId#{id}")))?;
        if t.flight.is_some() {
            return Err(Error::Busy(format!(
                "TransferId#{id} is already in progress"
            )));
        }
        let ep = st
            .eps
            .get_mut(&t.endpoint)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{}", t.endpoint)))?;
        if ep.dead.is_none() {
            if let Some(why) = peer_gone(&ep.info) {
                ep.dead = Some(why);
            }
        }
        if let Some(why) = &ep.dead {
            return Err(ep.disconnected(why.clone()));
        }
        for r in &t.local_regs {
            if !st.regs.contains_key(r) {
                return Err(Error::NotRegistered(format!(
                    "RegistrationId#{r} named by TransferId#{id} was deregistered"
                )));
            }
        }
        let mut rkeys: Vec<(Descriptor, ffi::ucp_rkey_h, u64, u64)> =
            Vec::with_capacity(t.remote_ids.len());
        for r in &t.remote_ids {
            let rem = st.remotes.get(r).ok_or_else(|| {
                Error::NotRegistered(format!(
                    "RemoteId#{r} named by TransferId#{id} was released"
                ))
            })?;
            rkeys.push((rem.desc, rem.rkey, rem.key_id, rem.key_base));
        }
        let header = match &opts.notification {
            Some(_) => Some(self.header_for(t.endpoint, ep.next_seq)?),
            None => None,
        };
        // Over PLAN_MAX segments the plan is made for this post only.
        let made;
        let segs: &[Seg] = match &t.plan {
            Some(p) => p,
            None => {
                segments(&t.local, &t.remote)?; // the lists' sizes must agree
                let ranges: Vec<Descriptor> = rkeys.iter().map(|r| r.0).collect();
                made = plan(&t.local, &t.remote, &ranges, usize::MAX).ok_or_else(|| {
                    Error::OutOfBounds("a remote descriptor lies outside every import".into())
                })?;
                &made
            }
        };
        let mut data = Group::new(lib);
        let uep = ep.ep;
        // WRITE segments this large go as active messages (TCP endpoints only).
        let am_min = match t.op {
            Op::Write => ep.am_write_min,
            Op::Read => u64::MAX,
        };
        let mut am_seqs = Vec::new();
        let mut puts = 0usize;
        // One parameter block for every put/get of the post (same group, no flags).
        let rma = data.param(0);
        for seg in segs {
            let Some(&(_, rkey, key_id, key_base)) = rkeys.get(seg.range) else {
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
                let seq = st.next_write_seq;
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
                st.next_write_seq += 1;
                st.am_sent += 1;
                am_seqs.push(seq);
                continue;
            }
            puts += 1;
            let r = match t.op {
                // SAFETY: the caller of `Backend::post` keeps the local range valid and
                // registered until the transfer finishes or `cancel` returns; the remote
                // range was checked against the peer's registration at prepare; `uep`
                // and `rkey` are live (checked above, under the lock).
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
        if t.op == Op::Write && puts > 0 && data.error().is_none() {
            // A put completes locally when its buffer may be reused; the flush completes
            // when every earlier operation on the endpoint is complete at the peer.
            // SAFETY: live endpoint; parameters valid for the call.
            let _ = data.issue(0, |p| unsafe { (lib.ep_flush_nbx)(uep, p) });
        }
        t.posts += 1;
        let post = t.posts;
        let note = match (&opts.notification, header) {
            (Some(payload), Some(header)) => {
                ep.notes.push_back(Note {
                    gate: Gate::Transfer { transfer: id, post },
                    header,
                    payload: payload.clone(),
                    sent: None,
                });
                ep.next_seq += 1;
                NoteState::Queued
            }
            _ => NoteState::None,
        };
        for &seq in &am_seqs {
            st.am_writes.insert(seq, (id, post));
        }
        t.flight = Some(Flight {
            data,
            post,
            posted: Instant::now(),
            deadline: opts.deadline,
            note,
            acks: am_seqs.len(),
            am_seqs,
            ack_error: None,
        });
        t.status = Status::InProgress;
        for r in &t.local_regs {
            if let Some(r) = st.regs.get_mut(r) {
                r.busy += 1;
            }
        }
        for r in &t.remote_ids {
            if let Some(r) = st.remotes.get_mut(r) {
                r.busy += 1;
            }
        }
        st.active.push(id);
        self.advance(st);
        Ok(())
    }

    /// `Backend::poll`.
    pub fn poll(&self, id: u64) -> Status {
        let mut st = self.state.lock();
        if st.transfers.get(&id).is_some_and(|t| t.flight.is_some()) {
            // SAFETY: valid worker, under the state lock.
            unsafe { (self.lib.worker_progress)(st.worker) };
            self.advance(&mut st);
        }
        match st.transfers.get(&id) {
            Some(t) => t.status.clone(),
            None => Status::Failed(Error::NotRegistered(format!("TransferId#{id}"))),
        }
    }

    /// `Backend::cancel`.
    pub fn cancel(&self, id: u64) -> Result<()> {
        let mut st = self.state.lock();
        if !st.transfers.contains_key(&id) {
            return Err(Error::NotRegistered(format!("TransferId#{id}")));
        }
        if self.abort(&mut st, id, Error::Canceled)? {
            return Err(Error::Busy(format!(
                "TransferId#{id} failed as cancelled, but UCX still holds its requests (the peer does not \
                 progress); its registrations stay busy until UCX completes them: keep the memory alive"
            )));
        }
        Ok(())
    }

    /// `Backend::release`.
    pub fn release(&self, id: u64) -> Result<()> {
        let mut st = self.state.lock();
        match st.transfers.get(&id) {
            None => Err(Error::NotRegistered(format!("TransferId#{id}"))),
            Some(t) if t.flight.is_some() => Err(Error::Busy(format!(
                "TransferId#{id} is in progress; cancel it first"
            ))),
            Some(_) => {
                st.transfers.remove(&id);
                Ok(())
            }
        }
    }

    /// `Backend::progress`.
    pub fn progress(&self) -> Result<usize> {
        let mut st = self.state.lock();
        let mut n = 0usize;
        for _ in 0..PROGRESS_BURST {
            // SAFETY: valid worker, under the state lock.
            let k = unsafe { (self.lib.worker_progress)(st.worker) } as usize;
            n += k;
            if k == 0 {
                break;
            }
        }
        Ok(n + self.advance(&mut st))
    }

    /// `Backend::notify`: queued behind a flush, so it arrives after earlier posts' data.
    pub fn notify(&self, ep_id: u64, payload: Bytes) -> Result<()> {
        self.check_payload(&payload)?;
        let lib = &self.lib;
        let mut st = self.state.lock();
        let ep = st
            .eps
            .get_mut(&ep_id)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{ep_id}")))?;
        if ep.dead.is_none() {
            if let Some(why) = peer_gone(&ep.info) {
                ep.dead = Some(why);
            }
        }
        if let Some(why) = &ep.dead {
            return Err(ep.disconnected(why.clone()));
        }
        let header = self.header_for(ep_id, ep.next_seq)?;
        let mut flush = Group::new(lib);
        let uep = ep.ep;
        // SAFETY: live endpoint; parameters valid for the call.
        let _ = flush.issue(0, |p| unsafe { (lib.ep_flush_nbx)(uep, p) });
        ep.notes.push_back(Note {
            gate: Gate::Flush(flush),
            header,
            payload,
            sent: None,
        });
        ep.next_seq += 1;
        self.advance(&mut st);
        Ok(())
    }

    /// `Backend::drain_notifications`.
    pub fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        let mut s = self.shared.inner.lock();
        let n = s.inbox.len();
        out.extend(s.inbox.drain(..));
        Ok(n)
    }

    /// Moves every in-flight transfer and queued notification as far as it can go
    /// without waiting; returns how many state changes happened.
    fn advance(&self, st: &mut State) -> usize {
        let lib = &self.lib;
        let mut events = 0;
        // Endpoint failures reported by UCX, answers to our active-message WRITEs.
        let (errors, acks) = {
            let mut sh = self.shared.inner.lock();
            (
                std::mem::take(&mut sh.ep_errors),
                std::mem::take(&mut sh.acks),
            )
        };
        for (seq, code) in acks {
            let Some((tid, post)) = st.am_writes.remove(&seq) else {
                continue; // the transfer was aborted or released meanwhile
            };
            if let Some(f) = st.transfers.get_mut(&tid).and_then(|t| t.flight.as_mut()) {
                if f.post == post {
                    f.acks = f.acks.saturating_sub(1);
                    if code != AckCode::Ok && f.ack_error.is_none() {
                        f.ack_error = Some(code);
                    }
                    events += 1;
                }
            }
        }
        for (ptr, status) in errors {
            for ep in st.eps.values_mut() {
                if !ep.ep.is_null() && ep.ep as usize == ptr && ep.dead.is_none() {
                    ep.dead = Some(format!("UCX reported {}", lib.status_text(status)));
                    events += 1;
                }
            }
        }
        // Notifications: send, in order, each whose data is complete.
        let State { eps, transfers, .. } = st;
        for (ep_id, ep) in eps.iter_mut() {
            let mut blocked = false;
            let dead = ep.dead.is_some() || ep.ep.is_null();
            let uep = ep.ep;
            let mut i = 0;
            while i < ep.notes.len() {
                let n = &mut ep.notes[i];
                if n.sent.is_none() && !blocked {
                    // None: wait; Some(true): send; Some(false): drop.
                    let ready = match &n.gate {
                        Gate::Flush(g) => g.done().then_some(g.error().is_none()),
                        Gate::Transfer { transfer, post } => match transfers.get(transfer) {
                            Some(Transfer {
                                flight: Some(f), ..
                            }) if f.post == *post => f.complete().then_some(f.failure().is_none()),
                            _ => Some(false),
                        },
                    };
                    match ready {
                        None => blocked = true,
                        Some(false) => {
                            if let Gate::Transfer { transfer, .. } = n.gate {
                                if let Some(f) =
                                    transfers.get_mut(&transfer).and_then(|t| t.flight.as_mut())
                                {
                                    f.note = NoteState::Failed(ffi::UCS_ERR_CANCELED);
                                }
                            }
                            ep.notes.remove(i);
                            events += 1;
                            continue;
                        }
                        Some(true) if dead => {
                            if let Gate::Transfer { transfer, .. } = n.gate {
                                if let Some(f) =
                                    transfers.get_mut(&transfer).and_then(|t| t.flight.as_mut())
                                {
                                    f.note = NoteState::Failed(ffi::UCS_ERR_NOT_CONNECTED);
                                }
                            }
                            ep.notes.remove(i);
                            events += 1;
                            continue;
                        }
                        Some(true) => {
                            let mut g = Group::new(lib);
                            let (h, p) = (&n.header, &n.payload);
                            // SAFETY: live endpoint; header and payload stay alive in the
                            // note until the send group completes.
                            let _ = g.issue(ffi::UCP_AM_SEND_FLAG_EAGER, |prm| unsafe {
                                (lib.am_send_nbx)(
                                    uep,
                                    AM_ID,
                                    h.as_ptr() as *const c_void,
                                    h.len(),
                                    p.as_ptr() as *const c_void,
                                    p.len(),
                                    prm,
                                )
                            });
                            if let Gate::Transfer { transfer, .. } = n.gate {
                                if let Some(f) =
                                    transfers.get_mut(&transfer).and_then(|t| t.flight.as_mut())
                                {
                                    f.note = NoteState::Issued;
                                }
                            }
                            n.sent = Some(g);
                            events += 1;
                        }
                    }
                }
                // Completed sends leave the queue.
                let n = &mut ep.notes[i];
                if let Some(g) = &n.sent {
                    if g.done() {
                        let state = match g.error() {
                            None => NoteState::Delivered,
                            Some(s) => NoteState::Failed(s),
                        };
                        if let Gate::Transfer { transfer, post } = n.gate {
                            if let Some(f) =
                                transfers.get_mut(&transfer).and_then(|t| t.flight.as_mut())
                            {
                                if f.post == post {
                                    f.note = state;
                                }
                            }
                        }
                        ep.notes.remove(i);
                        events += 1;
                        continue;
                    }
                }
                i += 1;
            }
            let _ = ep_id;
        }
        // Quarantined requests that UCX finally completed release their memory.
        let mut i = 0;
        while i < st.quarantine.len() {
            if st.quarantine[i].data.done() {
                let q = st.quarantine.swap_remove(i);
                for r in &q.local_regs {
                    if let Some(r) = st.regs.get_mut(r) {
                        r.busy = r.busy.saturating_sub(1);
                    }
                }
                for r in &q.remote_ids {
                    if let Some(r) = st.remotes.get_mut(r) {
                        r.busy = r.busy.saturating_sub(1);
                    }
                }
                events += 1;
            } else {
                i += 1;
            }
        }
        // Transfers: finish the complete ones, abort the late ones.
        let mut now = None;
        let mut late = Vec::new();
        let mut finished = Vec::new();
        for &tid in &st.active {
            let Some(t) = st.transfers.get(&tid) else {
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
        for (tid, err) in finished {
            let status = match err {
                None => Status::Done,
                Some(Fail::Ucs(s)) => Status::Failed(self.map_status(st, tid, s)),
                Some(Fail::Ack(c)) => Status::Failed(ack_error(c)),
            };
            self.finish(st, tid, status);
            events += 1;
        }
        for tid in late {
            let after = st
                .transfers
                .get(&tid)
                .and_then(|t| t.flight.as_ref())
                .and_then(|f| f.deadline.map(|d| d.saturating_duration_since(f.posted)))
                .unwrap_or_default();
            let what = format!("ucx transfer TransferId#{tid}");
            let _ = self.abort(st, tid, Error::TimedOut { what, after });
            events += 1;
        }
        events
    }

    /// The error for a transfer whose requests failed with `s`.
    fn map_status(&self, st: &State, tid: u64, s: ucs_status_t) -> Error {
        let ep = st.transfers.get(&tid).and_then(|t| st.eps.get(&t.endpoint));
        match ep {
            Some(ep) if ep.dead.is_some() || ffi::is_disconnect_status(s) => {
                ep.disconnected(ep.dead.clone().unwrap_or_else(|| self.lib.status_text(s)))
            }
            _ if s == ffi::UCS_ERR_CANCELED => Error::Canceled,
            _ => self.lib.error("transfer", s),
        }
    }

    /// Ends a transfer whose requests all completed: frees them, releases the busy
    /// marks, records the status.
    fn finish(&self, st: &mut State, tid: u64, status: Status) {
        let Some(t) = st.transfers.get_mut(&tid) else {
            return;
        };
        let Some(flight) = t.flight.take() else {
            return;
        };
        debug_assert!(flight.data.done());
        for s in &flight.am_seqs {
            st.am_writes.remove(s);
        }
        drop(flight);
        t.status = status;
        for r in &t.local_regs {
            if let Some(r) = st.regs.get_mut(r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
        for r in &t.remote_ids {
            if let Some(r) = st.remotes.get_mut(r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
        st.active.retain(|x| *x != tid);
    }

    /// Stops a transfer: cancels its requests, drives progress until UCX completed them
    /// (force-closing the endpoint when they will not cancel within the grace period),
    /// then finishes it with `err` (or `Done` if it won the race).
    ///
    /// Returns `true` when UCX kept requests that may still touch the memory: the
    /// transfer then reports `Failed(err)` but its registrations stay busy
    /// (quarantined) until UCX completes them.
    fn abort(&self, st: &mut State, tid: u64, err: Error) -> Result<bool> {
        let lib = &self.lib;
        let worker = st.worker;
        let Some(t) = st.transfers.get(&tid) else {
            return Ok(false);
        };
        let Some(f) = &t.flight else {
            return Ok(false);
        };
        let ep_id = t.endpoint;
        f.data.cancel_all(worker);
        let spin = |st: &State, until: Instant| {
            let done = |st: &State| match st.transfers.get(&tid).and_then(|t| t.flight.as_ref()) {
                Some(f) => f.data.done(),
                None => true,
            };
            while !done(st) && Instant::now() < until {
                // SAFETY: valid worker, under the state lock.
                unsafe { (lib.worker_progress)(worker) };
            }
            done(st)
        };
        let mut done = spin(st, Instant::now() + self.opts.cancel_grace);
        let peer_errors = st.eps.get(&ep_id).is_some_and(|e| e.peer_errors);
        if !done && peer_errors {
            // UCX cannot cancel RMA requests that already left; a forced close completes
            // them all (UCS_ERR_CANCELED).
            tracing::warn!("ucx: TransferId#{tid} did not cancel; force-closing its endpoint");
            self.close_endpoint(
                st,
                ep_id,
                "endpoint force-closed to stop a transfer that would not cancel",
            );
            done = spin(st, Instant::now() + Duration::from_secs(2));
        }
        let Some(t) = st.transfers.get_mut(&tid) else {
            return Ok(false);
        };
        let Some(f) = t.flight.as_ref() else {
            return Ok(false);
        };
        let post = f.post;
        // Unsent notifications of this post are dropped.
        if let Some(ep) = st.eps.get_mut(&ep_id) {
            ep.notes.retain(|n| {
                n.sent.is_some()
                    || !matches!(n.gate, Gate::Transfer { transfer, post: p } if transfer == tid && p == post)
            });
        }
        if !done {
            // UCX still owns requests that may read or write the memory (on shared memory
            // UCX 1.13 emulates RMA in software and only the peer's progress completes
            // them). The transfer fails now; its registrations stay busy (deregister
            // says Busy) until UCX gives the requests back.
            let Some(t) = st.transfers.get_mut(&tid) else {
                return Ok(false);
            };
            let Some(flight) = t.flight.take() else {
                return Ok(false);
            };
            t.status = Status::Failed(err);
            for s in &flight.am_seqs {
                st.am_writes.remove(s);
            }
            st.quarantine.push(Quarantined {
                data: flight.data,
                local_regs: t.local_regs.clone(),
                remote_ids: t.remote_ids.clone(),
            });
            st.active.retain(|x| *x != tid);
            tracing::warn!(
                "ucx: TransferId#{tid} abandoned with requests in flight; its memory stays busy"
            );
            return Ok(true);
        }
        let Some(f) = st.transfers.get(&tid).and_then(|t| t.flight.as_ref()) else {
            return Ok(false);
        };
        let won = f.failure().is_none()
            && f.acks == 0
            && matches!(
                f.note,
                NoteState::None | NoteState::Issued | NoteState::Delivered
            );
        let status = if won {
            Status::Done
        } else {
            Status::Failed(err)
        };
        self.finish(st, tid, status);
        Ok(false)
    }

    /// Transports and lanes each endpoint uses (`ucp_ep_print_info`), with the settings.
    pub fn describe(&self) -> String {
        let st = self.state.lock();
        let (a, b, c) = self.lib.version;
        let mut s = format!(
            "ucx {a}.{b}.{c} from {}; tls={}; worker thread mode SERIALIZED (one lock)\n",
            self.lib.path.display(),
            self.opts
                .tls
                .clone()
                .or_else(|| std::env::var("UCX_TLS").ok())
                .unwrap_or_else(|| "(UCX default)".into())
        );
        {
            let sh = self.shared.inner.lock();
            s.push_str(&format!(
                "active-message WRITEs: sent {}, received {}, refused {}, unanswered {}; \
                 malformed messages dropped {}\n",
                st.am_sent, sh.accepted, sh.refused, sh.unanswered, sh.malformed
            ));
        }
        let mut ids: Vec<&u64> = st.eps.keys().collect();
        ids.sort();
        for id in ids {
            let ep = &st.eps[id];
            s.push_str(&format!(
                "endpoint {} -> {} (error handling {})",
                id,
                ep.peer_name,
                if ep.peer_errors {
                    "PEER"
                } else {
                    "NONE: deadline only"
                }
            ));
            if let Some(d) = &ep.dead {
                s.push_str(&format!(" (dead: {d})\n"));
                continue;
            }
            s.push('\n');
            if ep.am_write_min != u64::MAX {
                s.push_str(&format!(
                    "WRITE segments of >= {} bytes go as active messages (rendezvous, \
                     received into the target's registration)\n",
                    ep.am_write_min
                ));
            }
            let lib = &self.lib;
            let uep = ep.ep;
            // SAFETY: live endpoint and an open FILE stream, under the state lock.
            if let Some(text) = ffi::capture_file(|f| unsafe { (lib.ep_print_info)(uep, f) }) {
                s.push_str(&text);
            }
        }
        s
    }
}

#[cfg(test)]
impl Core {
    /// Test hook: rewrites what an import says about the peer's registration (to forge
    /// the headers of WRITEs sent as active messages).
    fn tamper_remote(&self, rid: u64, key_id: u64, key_base: u64) {
        let mut st = self.state.lock();
        if let Some(r) = st.remotes.get_mut(&rid) {
            r.key_id = key_id;
            r.key_base = key_base;
        }
    }

    /// Test hook: the import's key id and base.
    fn remote_key_of(&self, rid: u64) -> Option<(u64, u64)> {
        let st = self.state.lock();
        st.remotes.get(&rid).map(|r| (r.key_id, r.key_base))
    }

    /// Test hook: sends `header` as the header of a WRITE active message with `data`
    /// (eager unless `rndv`). The returned group keeps the header; `data` must outlive
    /// it and the send (drive both workers until `done()`).
    fn send_raw_write(&self, ep_id: u64, header: &[u8], data: &[u8], rndv: bool) -> Group {
        let lib = &self.lib;
        let st = self.state.lock();
        let mut g = Group::new(lib);
        let Some(uep) = st.eps.get(&ep_id).map(|e| e.ep) else {
            return g;
        };
        let hp = g.keep(header.to_vec().into_boxed_slice());
        let flags = ffi::UCP_AM_SEND_FLAG_REPLY
            | if rndv {
                ffi::UCP_AM_SEND_FLAG_RNDV
            } else {
                ffi::UCP_AM_SEND_FLAG_EAGER
            };
        // SAFETY: live endpoint; the group keeps the header, the caller the data.
        let _ = g.issue(flags, |p| unsafe {
            (lib.am_send_nbx)(
                uep,
                AM_WRITE_ID,
                hp as *const c_void,
                header.len(),
                data.as_ptr() as *const c_void,
                data.len(),
                p,
            )
        });
        g
    }

    /// Test hook: (accepted, refused, malformed) counters of the WRITE handler.
    fn write_counters(&self) -> (u64, u64, u64) {
        let s = self.shared.inner.lock();
        (s.accepted, s.refused, s.malformed)
    }
}

/// The error for a WRITE the target refused.
fn ack_error(c: AckCode) -> Error {
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

/// Whether `ucp_ep_print_info`'s report shows lanes and every one of them is TCP (then
/// UCX 1.13 emulates put with active messages that the target copies).
fn all_lanes_tcp(report: &str) -> bool {
    let mut lanes = report.lines().filter(|l| l.contains("lane["));
    let mut any = false;
    lanes.all(|l| {
        any = true;
        l.contains("tcp/")
    }) && any
}

/// `Some(reason)` when the peer is a backend of this process that was dropped.
fn peer_gone(info: &ConnInfo) -> Option<String> {
    (info.pid == own_pid() && !LIVE.lock().contains(&info.instance))
        .then(|| "the peer backend in this process was dropped".to_owned())
}

impl Drop for Core {
    fn drop(&mut self) {
        LIVE.lock().remove(&self.instance);
        let mut guard = self.state.lock();
        let st = &mut *guard;
        for tid in st.active.clone() {
            if let Err(e) = self.abort(st, tid, Error::Canceled) {
                tracing::error!("ucx: dropping backend with a transfer UCX would not release: {e}");
            }
        }
        let ids: Vec<u64> = st.eps.keys().copied().collect();
        for id in ids {
            self.close_endpoint(st, id, "backend dropped");
        }
        let lib = &self.lib;
        for (_, mut ep) in st.eps.drain() {
            self.destroy_rkeys(&mut ep);
            // Dropping the notes frees their requests (before the worker goes).
            drop(ep);
        }
        st.remotes.clear();
        st.transfers.clear();
        // Destroying the worker below ends any request UCX still held.
        st.quarantine.clear();
        for (_, r) in st.regs.drain() {
            if r.alloc.is_none() {
                // SAFETY: every transfer was aborted, so UCX no longer uses the handle.
                unsafe { (lib.mem_unmap)(st.ctx, r.memh) };
            }
        }
        for (_, a) in st.allocs.drain() {
            // SAFETY: as above; allocation handles are unmapped once, here (their owners
            // hold the core alive, so every owner was dropped already).
            unsafe { (lib.mem_unmap)(st.ctx, a.memh) };
        }
        // SAFETY: every endpoint, request and memory handle of the worker and context
        // was released above; each is destroyed once.
        unsafe {
            (lib.worker_destroy)(st.worker);
            (lib.cleanup)(st.ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_report_detection() {
        let tcp = "#  lane[0]:  0:tcp/lo.0 md[0] -> md[0]/tcp/sysdev[255] am am_bw#0\n";
        let shm = "#  lane[0]:  1:posix/memory.0 md[1] am\n#  lane[1]:  2:cma/memory.0 rma_bw#0\n";
        let mixed = format!("{tcp}#  lane[1]:  2:cma/memory.0 rma_bw#0\n");
        assert!(all_lanes_tcp(tcp));
        assert!(!all_lanes_tcp(shm));
        assert!(!all_lanes_tcp(&mixed));
        assert!(!all_lanes_tcp("no lanes at all"));
    }

    /// Drives `a` and `b` until transfer `t` of `a` finished (10 s at most).
    fn run(a: &Core, b: &Core, t: u64) -> Status {
        let opts = PostOptions {
            notification: None,
            deadline: Some(Instant::now() + Duration::from_secs(10)),
        };
        a.post(t, &opts).unwrap();
        loop {
            a.progress().unwrap();
            b.progress().unwrap();
            let st = a.poll(t);
            if st.is_finished() {
                return st;
            }
        }
    }

    /// WRITEs sent as active messages whose header names an unknown registration, a
    /// range outside it, or a length that differs from the data are refused (the
    /// initiator gets `NotRegistered` / `OutOfBounds`), a header that does not parse is
    /// dropped, and the target's memory is untouched by all of them; a genuine WRITE
    /// then lands.
    #[test]
    fn forged_write_headers_are_refused() {
        const LEN: usize = 512 << 10;
        let opts = Options {
            tls: Some("tcp".into()),
            ..Default::default()
        };
        let Some(a) = kv_core::require_or_skip("ucx", Core::new("a", opts.clone())) else {
            return;
        };
        let b = Core::new("b", opts).unwrap();
        let src: Vec<u8> = (0..LEN).map(|i| (i * 7 + 3) as u8).collect();
        // The target's memory is written by UCX behind Rust's back: a HostBuffer, read
        // through fresh borrows only.
        let mut dst = kv_mem::HostBuffer::alloc(LEN, 4096).unwrap();
        dst.as_mut_slice().fill(0x11);
        let sd = Descriptor::new(src.as_ptr() as usize as u64, LEN as u64, 0);
        let dd = dst.descriptor();
        let rs = a.register(MemKind::Dram, &sd).unwrap();
        let rd = b.register(MemKind::Dram, &dd).unwrap();
        let ep = a.connect("b", &b.info).unwrap();
        assert!(
            a.describe().contains("go as active messages"),
            "{}",
            a.describe()
        );
        let rid = a
            .import_remote(ep, MemKind::Dram, &dd, &b.remote_key(rd).unwrap())
            .unwrap();
        let (key_id, key_base) = a.remote_key_of(rid).unwrap();
        let t = a
            .prepare(&TransferRequest {
                op: Op::Write,
                local_kind: MemKind::Dram,
                local: DescriptorList::single(sd),
                peer: kv_core::EndpointId(ep),
                remote_kind: MemKind::Dram,
                remote: DescriptorList::single(dd),
            })
            .unwrap();
        let untouched = |dst: &kv_mem::HostBuffer, what: &str| {
            assert!(
                dst.as_slice().iter().all(|&x| x == 0x11),
                "target memory written by {what}"
            );
        };
        a.tamper_remote(rid, key_id ^ 1, key_base);
        let st = run(&a, &b, t);
        assert!(
            matches!(st, Status::Failed(Error::NotRegistered(_))),
            "{st:?}"
        );
        untouched(&dst, "a WRITE naming an unknown key");
        a.tamper_remote(rid, key_id, key_base - LEN as u64 / 2);
        let st = run(&a, &b, t);
        assert!(
            matches!(st, Status::Failed(Error::OutOfBounds(_))),
            "{st:?}"
        );
        untouched(&dst, "a WRITE past the registration's end");
        // Offsets that overflow, a zero length, and a length that is not the data's.
        let mut sends = Vec::new();
        for (offset, len, data, rndv) in [
            (u64::MAX - 10, 64, 64, false),
            (0, 0, 0, false),
            (0, LEN as u64, LEN / 2, true),
            (0, 16, 32, false),
        ] {
            let h = WriteHeader {
                instance: a.instance,
                seq: 1 << 40,
                key_id,
                offset,
                len,
            }
            .encode();
            sends.push(a.send_raw_write(ep, &h, &src[..data], rndv));
        }
        let garbage = [0x4bu8; 17];
        sends.push(a.send_raw_write(ep, &garbage, &src[..64], false));
        let end = Instant::now() + Duration::from_secs(5);
        while (b.write_counters() != (0, 6, 1) || !sends.iter().all(Group::done))
            && Instant::now() < end
        {
            b.progress().unwrap();
            a.progress().unwrap();
        }
        assert!(
            sends.iter().all(Group::done),
            "forged sends did not complete"
        );
        drop(sends);
        assert_eq!(
            b.write_counters(),
            (0, 6, 1),
            "(accepted, refused, malformed)"
        );
        untouched(&dst, "forged headers");
        a.tamper_remote(rid, key_id, key_base);
        let st = run(&a, &b, t);
        assert!(matches!(st, Status::Done), "{st:?}");
        assert!(dst.as_slice() == &src[..], "the genuine WRITE");
        assert_eq!(b.write_counters().0, 1);
        a.release(t).unwrap();
        a.release_remote(rid).unwrap();
        a.deregister(rs).unwrap();
        b.deregister(rd).unwrap();
    }

    #[test]
    fn memunits_parse_like_ucx() {
        assert_eq!(parse_memunits("256K"), Some(256 << 10));
        assert_eq!(parse_memunits("8k"), Some(8 << 10));
        assert_eq!(parse_memunits("1M"), Some(1 << 20));
        assert_eq!(parse_memunits("1mb"), Some(1 << 20));
        assert_eq!(parse_memunits("65536"), Some(65536));
        assert_eq!(parse_memunits("auto"), None);
        assert_eq!(parse_memunits(""), None);
        assert_eq!(parse_memunits("K"), None);
    }

    #[test]
    fn tcp_detection_and_effective_segments() {
        assert!(tls_has_tcp(Some("tcp")));
        assert!(tls_has_tcp(Some("rc,tcp")));
        assert!(tls_has_tcp(Some("all")));
        assert!(tls_has_tcp(Some("^posix")));
        assert!(!tls_has_tcp(Some("^tcp,posix")));
        assert!(!tls_has_tcp(Some("posix,cma,self")));
        let set = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(tcp_segments(&[], Some("posix,self")), (0, 0));
        let s = [
            set("TX_SEG_SIZE", "8K"),
            set("TX_SEG_SIZE", "256K"),
            set("RX_SEG_SIZE", "1M"),
        ];
        assert_eq!(tcp_segments(&s, Some("tcp")), (256 << 10, 1 << 20));
        assert_eq!(ucx_name("TCP_TX_SEG_SIZE"), "TX_SEG_SIZE");
        assert_eq!(ucx_name("tcp_nodelay"), "NODELAY");
        assert_eq!(ucx_name("TCP_CM_REUSEADDR"), "TCP_CM_REUSEADDR");
        assert_eq!(ucx_name("RNDV_THRESH"), "RNDV_THRESH");
    }
}
