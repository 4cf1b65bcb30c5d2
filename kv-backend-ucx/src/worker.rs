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
use crate::wire::{AmHeader, ConnInfo, RemoteKey};
use crate::Options;

/// Active-message id of notifications.
const AM_ID: u32 = 0x4b56;
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
}

/// What UCX's callbacks write: endpoint failures and received notifications.
/// `Send + Sync` (a lock around plain data).
pub struct Shared {
    inner: Mutex<SharedInner>,
}

impl Shared {
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
            next_id: 1,
        };
        let shared = Box::new(Shared {
            inner: Mutex::new(SharedInner::default()),
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
        if let Some((aid, memh)) = owner {
            let key = self.pack(&st, memh, desc)?;
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
                    busy: 0,
                },
            );
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
        let key = match self.pack(&st, memh, desc) {
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
                busy: 0,
            },
        );
        Ok(id)
    }

    /// Packs `memh`'s rkey into our envelope for the range `desc`.
    fn pack(&self, st: &State, memh: ffi::ucp_mem_h, desc: &Descriptor) -> Result<Bytes> {
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
        Ok(Bytes::from(RemoteKey { range: *desc, rkey }.encode()?))
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
        let (memh, alloc) = (r.memh, r.alloc);
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
            .collect();
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
        let mut rkeys: Vec<(Descriptor, ffi::ucp_rkey_h)> = Vec::with_capacity(t.remote_ids.len());
        for r in &t.remote_ids {
            let rem = st.remotes.get(r).ok_or_else(|| {
                Error::NotRegistered(format!(
                    "RemoteId#{r} named by TransferId#{id} was released"
                ))
            })?;
            rkeys.push((rem.desc, rem.rkey));
        }
        let header = match &opts.notification {
            Some(_) => Some(self.header_for(t.endpoint, ep.next_seq)?),
            None => None,
        };
        let segs = segments(&t.local, &t.remote)?;
        let mut data = Group::new(lib);
        let uep = ep.ep;
        let mut last = 0usize;
        for seg in segs {
            // Segments usually fall in the same imported range as the one before.
            let hit = if rkeys[last].0.contains(&seg.remote) {
                Some(last)
            } else {
                rkeys.iter().position(|(d, _)| d.contains(&seg.remote))
            };
            let Some(i) = hit else {
                // Cannot happen: prepare checked every remote descriptor.
                data.fail(ffi::UCS_ERR_IO_ERROR);
                break;
            };
            last = i;
            let rkey = rkeys[i].1;
            let r = match t.op {
                // SAFETY: the caller of `Backend::post` keeps the local range valid and
                // registered until the transfer finishes or `cancel` returns; the remote
                // range was checked against the peer's registration at prepare; `uep`
                // and `rkey` are live (checked above, under the lock).
                Op::Write => data.issue(0, |p| unsafe {
                    (lib.put_nbx)(
                        uep,
                        seg.local.addr as usize as *const c_void,
                        seg.local.len as usize,
                        seg.remote.addr,
                        rkey,
                        p,
                    )
                }),
                // SAFETY: as for the write.
                Op::Read => data.issue(0, |p| unsafe {
                    (lib.get_nbx)(
                        uep,
                        seg.local.addr as usize as *mut c_void,
                        seg.local.len as usize,
                        seg.remote.addr,
                        rkey,
                        p,
                    )
                }),
            };
            if r.is_err() {
                break;
            }
        }
        if t.op == Op::Write && data.error().is_none() {
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
        t.flight = Some(Flight {
            data,
            post,
            posted: Instant::now(),
            deadline: opts.deadline,
            note,
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
        // Endpoint failures reported by UCX.
        let errors = std::mem::take(&mut self.shared.inner.lock().ep_errors);
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
                            }) if f.post == *post => {
                                f.data.done().then_some(f.data.error().is_none())
                            }
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
            if f.data.done() {
                match (f.data.error(), f.note) {
                    (Some(s), _) => finished.push((tid, Some(s))),
                    (None, NoteState::None | NoteState::Delivered) => finished.push((tid, None)),
                    (None, NoteState::Failed(s)) => finished.push((tid, Some(s))),
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
                Some(s) => Status::Failed(self.map_status(st, tid, s)),
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
        let won = f.data.error().is_none()
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
