//! The libfabric backend of kvx: one-sided `fi_write`/`fi_read` between registered
//! memory over an `FI_EP_RDM` endpoint, with notifications as messages after the data.
//!
//! `libfabric.so.1` is opened at run time (`KV_FABRIC_LIB` overrides the path), so the
//! crate builds and links without libfabric; where it is missing, [`create`] fails with
//! [`kv_core::Error::BackendUnavailable`]. The provider is chosen at run time: the
//! `provider` option, else `FI_PROVIDER`, else `verbs;ofi_rxm`, `efa`, `tcp;ofi_rxm`
//! (never `sockets`); `shm` is selectable for peers on one host.
//!
//! ```no_run
//! use kv_backend_libfabric::{create, Options};
//! use kv_core::Params;
//!
//! let mut params = Params::new();
//! params.insert("provider".into(), "tcp;ofi_rxm".into());
//! params.insert("node".into(), "127.0.0.1".into());
//! let backend = create("prefill-0", &params)?;
//! let info = backend.connection_info()?; // hand this to the peer's `connect`
//! assert_eq!(backend.name(), "libfabric");
//! # let _ = (info, Options::default());
//! # Ok::<(), kv_core::Error>(())
//! ```
#![warn(missing_docs)]

mod endpoint;
mod ffi;
mod memory;
mod request;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{
    check_request_shape, Backend, Capabilities, Descriptor, EndpointId, Error, MemKind, MemKinds,
    Notification, Op, Params, PostOptions, RegistrationId, RemoteId, Result, Status, TransferId,
    TransferRequest,
};
use parking_lot::Mutex;

use endpoint::{CqError, Endpoint};
use memory::{Registration, Remote, Slab};
use request::{OpCtx, OpKind, OutMsg, Peer, Seg, Transfer};
use wire::{ConnectionInfo, RemoteKey, MSG_BUF};

pub use endpoint::DEFAULT_PROVIDERS;

/// Number of posted receive buffers for notifications.
const RECV_BUFS: usize = 16;
/// Number of send bounce buffers for notifications.
const SEND_BUFS: usize = 8;

/// Options of the libfabric backend. `Clone`, `Send + Sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Provider to use (`tcp;ofi_rxm`, `shm`, `verbs;ofi_rxm`, `efa`); param `provider`.
    /// `None`: `FI_PROVIDER`, else [`DEFAULT_PROVIDERS`] in order.
    pub provider: Option<String>,
    /// Local address to bind (`127.0.0.1`), passed to `fi_getinfo` with `FI_SOURCE`;
    /// param `node`.
    pub node: Option<String>,
    /// Deadline for posts that carry none, for notifications and for `cancel`;
    /// param `timeout_ms`.
    pub timeout: Duration,
    /// Path of `libfabric.so.1` (else `KV_FABRIC_LIB`, else the loader's search);
    /// param `library`.
    pub library: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            provider: None,
            node: None,
            timeout: Duration::from_secs(30),
            library: None,
        }
    }
}

impl Options {
    /// Reads `provider`, `node`, `timeout_ms` and `library`; unknown keys are refused.
    pub fn from_params(params: &Params) -> Result<Options> {
        let mut o = Options::default();
        for (k, v) in params {
            match k.as_str() {
                "provider" => o.provider = Some(v.clone()).filter(|s| !s.is_empty()),
                "node" => o.node = Some(v.clone()).filter(|s| !s.is_empty()),
                "library" => o.library = Some(v.clone()).filter(|s| !s.is_empty()),
                "timeout_ms" => {
                    let ms: u64 = v.parse().map_err(|_| {
                        Error::invalid_argument(format!("timeout_ms={v:?} is not a number"))
                    })?;
                    o.timeout = Duration::from_millis(ms.max(1));
                }
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown libfabric parameter {k:?} (known: provider, node, timeout_ms, library)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// Creates the backend for the agent `agent_name` from `params` (see [`Options`]).
pub fn create(agent_name: &str, params: &Params) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(FabricBackend::new(
        agent_name,
        Options::from_params(params)?,
    )?))
}

/// The libfabric backend. `Send + Sync`: all state sits behind one mutex, which also
/// serialises every libfabric call (the domain is opened `FI_THREAD_DOMAIN`).
pub struct FabricBackend {
    agent: String,
    timeout: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for FabricBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricBackend")
            .field("agent", &self.agent)
            .field("provider", &self.state.lock().ep.provider)
            .finish_non_exhaustive()
    }
}

struct State {
    /// Our agent name, carried by every notification.
    agent: String,
    ep: Endpoint,
    next_id: u64,
    regs: HashMap<u64, Registration>,
    /// Local registrations by start address, for prepare's lookups.
    by_addr: BTreeMap<(u64, u64), ()>,
    peers: HashMap<u64, Peer>,
    remotes: HashMap<u64, Remote>,
    transfers: HashMap<u64, Transfer>,
    /// Transfers with segments left to post, in post order.
    pending: VecDeque<u64>,
    /// Transfers in progress.
    active: HashSet<u64>,
    /// Posted operations by context address.
    ops: HashMap<usize, Box<OpCtx>>,
    send: Slab,
    free_send: Vec<usize>,
    recv: Slab,
    /// Target of the one-byte flush reads (never read by us).
    flush: Slab,
    inbox: VecDeque<Notification>,
}

impl FabricBackend {
    /// Opens libfabric and an endpoint for the agent `agent_name`.
    pub fn new(agent_name: &str, opts: Options) -> Result<FabricBackend> {
        if agent_name.len() > wire::MAX_NAME {
            return Err(Error::invalid_argument("agent name longer than 1024 bytes"));
        }
        let lib = ffi::Lib::open(opts.library.as_deref())?;
        let mut ep = Endpoint::open(lib, opts.provider.as_deref(), opts.node.as_deref())?;
        let send = Slab::new(&mut ep, SEND_BUFS)?;
        let recv = Slab::new(&mut ep, RECV_BUFS)?;
        let flush = Slab::new(&mut ep, 1)?;
        let mut s = State {
            agent: agent_name.to_string(),
            ep,
            next_id: 0,
            regs: HashMap::new(),
            by_addr: BTreeMap::new(),
            peers: HashMap::new(),
            remotes: HashMap::new(),
            transfers: HashMap::new(),
            pending: VecDeque::new(),
            active: HashSet::new(),
            ops: HashMap::new(),
            send,
            free_send: (0..SEND_BUFS).rev().collect(),
            recv,
            flush,
            inbox: VecDeque::new(),
        };
        if s.ep.provider == "shm" {
            request::shm_born(&s.ep.address);
        }
        for slot in 0..RECV_BUFS {
            s.post_recv(slot)?;
        }
        Ok(FabricBackend {
            agent: agent_name.to_string(),
            timeout: opts.timeout,
            state: Mutex::new(s),
        })
    }

    /// The provider in use (`tcp;ofi_rxm`, `shm`, …).
    pub fn provider(&self) -> String {
        self.state.lock().ep.provider.clone()
    }

    /// The `FI_MR_*` mode bits the provider asked for.
    pub fn mr_mode(&self) -> i32 {
        self.state.lock().ep.mr_mode
    }
}

fn is_disconnect(code: i64) -> bool {
    [
        libc::ECONNREFUSED,
        libc::ECONNRESET,
        libc::ECONNABORTED,
        libc::ENOTCONN,
        libc::EHOSTUNREACH,
        libc::EPIPE,
        libc::ESHUTDOWN,
        libc::ENETUNREACH,
    ]
    .iter()
    .any(|e| code == -(*e as i64))
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn peer_name(&self, peer: u64) -> String {
        self.peers
            .get(&peer)
            .map_or_else(|| format!("endpoint {peer}"), |p| p.name.clone())
    }

    /// Turns a posting or completion error into a `kv_core::Error` for `peer`.
    fn op_error(&self, peer: u64, code: i64, message: String) -> Error {
        if code == -(libc::ECANCELED as i64) {
            Error::Canceled
        } else if is_disconnect(code) {
            Error::RemoteDisconnected {
                peer: self.peer_name(peer),
                reason: message,
            }
        } else {
            Error::Backend {
                name: "libfabric".into(),
                code,
                message,
            }
        }
    }

    fn post_recv(&mut self, slot: usize) -> Result<()> {
        let ctx = OpCtx::new(OpKind::Recv { slot });
        let key = &*ctx as *const OpCtx as usize;
        let (buf, desc) = (self.recv.buf(slot), self.recv.desc());
        // SAFETY: the slab and the boxed context live until the completion is read or
        // the endpoint is closed (State::drop closes it before freeing either).
        let rc = unsafe { self.ep.recv(buf, MSG_BUF, desc, key as *mut c_void) };
        if rc < 0 {
            return Err(self.ep.lib.error("fi_recv", rc as i64));
        }
        self.ops.insert(key, ctx);
        Ok(())
    }

    /// Posts the next segments of `tid`. Returns false when the provider said EAGAIN.
    fn post_segments(&mut self, tid: u64) -> bool {
        let Some(t) = self.transfers.get(&tid) else {
            return true;
        };
        let Some(addr) = self
            .peers
            .get(&t.peer)
            .filter(|p| p.alive())
            .map(|p| p.addr)
        else {
            let e = Error::RemoteDisconnected {
                peer: self.peer_name(t.peer),
                reason: "the peer's endpoint is closed (or it was disconnected)".into(),
            };
            if let Some(t) = self.transfers.get_mut(&tid) {
                t.fail(e);
            }
            return true;
        };
        loop {
            let Some(t) = self.transfers.get(&tid) else {
                return true;
            };
            let (seg, write, is_flush) = if t.error.is_some() {
                return true;
            } else if t.next < t.segs.len() {
                (t.segs[t.next], t.op == Op::Write, false)
            } else if let (true, Some(f)) = (t.flush_due(), t.flush) {
                (f, false, true)
            } else {
                return true;
            };
            let epoch = t.epoch;
            let ctx = OpCtx::new(OpKind::Rma {
                transfer: tid,
                epoch,
            });
            let key = &*ctx as *const OpCtx as usize;
            // SAFETY: the local range lies in a registration the caller of `post`
            // promised to keep valid until the transfer finishes, and a transfer only
            // finishes once every posted operation completed; the boxed context is kept
            // in `ops` until then.
            let rc = unsafe {
                self.ep.rma(
                    write,
                    seg.local,
                    seg.len,
                    seg.desc as *mut c_void,
                    addr,
                    seg.raddr,
                    seg.key,
                    key as *mut c_void,
                )
            };
            if rc == -ffi::FI_EAGAIN {
                return false;
            }
            if rc < 0 {
                let msg = format!(
                    "fi_{}: {}",
                    if write { "write" } else { "read" },
                    self.ep.lib.strerror(rc as i32)
                );
                let peer = self.transfers.get(&tid).map_or(0, |t| t.peer);
                let e = self.op_error(peer, rc as i64, msg);
                if let Some(t) = self.transfers.get_mut(&tid) {
                    t.fail(e);
                }
                return true;
            }
            self.ops.insert(key, ctx);
            if let Some(t) = self.transfers.get_mut(&tid) {
                if is_flush {
                    t.flushed = true;
                } else {
                    t.next += 1;
                }
                t.outstanding += 1;
            }
        }
    }

    /// Posts what the pending transfers still have to post, oldest first.
    fn post_pending(&mut self) -> usize {
        let mut n = 0;
        while let Some(&tid) = self.pending.front() {
            if !self.post_segments(tid) {
                break;
            }
            self.pending.pop_front();
            n += 1;
            self.check_finished(tid);
        }
        n
    }

    /// Ends `tid` if its data (and notification) are done.
    fn check_finished(&mut self, tid: u64) {
        let Some(t) = self.transfers.get_mut(&tid) else {
            return;
        };
        if !matches!(t.status, Status::InProgress) || !t.data_done() {
            return;
        }
        if t.error.is_none() && t.notify_pending {
            return; // the outbox sends it; the send completion finishes the transfer
        }
        let (peer, epoch) = (t.peer, t.epoch);
        let failed = t.error.take();
        if failed.is_some() && t.notify_pending {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.outbox.retain(|m| m.transfer != Some((tid, epoch)));
            }
        }
        self.finish(tid, failed);
    }

    fn finish(&mut self, tid: u64, error: Option<Error>) {
        let Some(t) = self.transfers.get_mut(&tid) else {
            return;
        };
        if !matches!(t.status, Status::InProgress) {
            return;
        }
        t.status = match error {
            None => Status::Done,
            Some(e) => Status::Failed(e),
        };
        t.notify_pending = false;
        let regs = t.local_regs.clone();
        for r in regs {
            if let Some(r) = self.regs.get_mut(&r) {
                r.busy = r.busy.saturating_sub(1);
            }
        }
        self.active.remove(&tid);
    }

    /// True once the data of transfer `(tid, epoch)` no longer holds a message back.
    fn data_finished(&self, tid: u64, epoch: u64) -> bool {
        match self.transfers.get(&tid) {
            Some(t) if t.epoch == epoch && matches!(t.status, Status::InProgress) => t.data_done(),
            _ => true,
        }
    }

    /// Sends queued notifications whose turn has come.
    fn pump_outboxes(&mut self) -> usize {
        let mut n = 0;
        let peers: Vec<u64> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.outbox.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for pid in peers {
            if self.peers.get(&pid).is_some_and(|p| !p.alive()) {
                let msgs: Vec<OutMsg> = self
                    .peers
                    .get_mut(&pid)
                    .map(|p| p.outbox.drain(..).collect())
                    .unwrap_or_default();
                for m in msgs {
                    if let Some((t, _)) = m.transfer {
                        let e = Error::RemoteDisconnected {
                            peer: self.peer_name(pid),
                            reason: "the peer's endpoint is closed".into(),
                        };
                        if let Some(x) = self.transfers.get_mut(&t) {
                            x.fail(e);
                            x.notify_pending = false;
                        }
                        self.check_finished(t);
                    }
                }
                continue;
            }
            while let Some(p) = self.peers.get(&pid) {
                let Some(m) = p.outbox.front() else { break };
                if !m.after.iter().all(|(t, e)| self.data_finished(*t, *e)) {
                    break;
                }
                // A transfer whose data failed drops its notification.
                if let Some((t, e)) = m.transfer {
                    let ok = self.transfers.get(&t).is_some_and(|x| {
                        x.epoch == e && matches!(x.status, Status::InProgress) && x.error.is_none()
                    });
                    if !ok {
                        if let Some(p) = self.peers.get_mut(&pid) {
                            p.outbox.pop_front();
                        }
                        self.check_finished(t);
                        continue;
                    }
                }
                let Some(slot) = self.free_send.pop() else {
                    break;
                };
                let addr = p.addr;
                let transfer = m.transfer;
                let len = match wire::encode_notification(
                    self.send.slice_mut(slot),
                    &self.agent,
                    &m.payload,
                ) {
                    Ok(l) => l,
                    Err(e) => {
                        // Checked at queue time; only a bug gets here.
                        tracing::warn!("dropping notification: {e}");
                        self.free_send.push(slot);
                        if let Some(p) = self.peers.get_mut(&pid) {
                            p.outbox.pop_front();
                        }
                        continue;
                    }
                };
                let ctx = OpCtx::new(OpKind::Send { slot, transfer });
                let key = &*ctx as *const OpCtx as usize;
                // SAFETY: the slab and the boxed context live until the completion is
                // read or the endpoint is closed.
                let rc = unsafe {
                    self.ep.send(
                        self.send.buf(slot),
                        len,
                        self.send.desc(),
                        addr,
                        key as *mut c_void,
                    )
                };
                if rc == -ffi::FI_EAGAIN {
                    self.free_send.push(slot);
                    break;
                }
                if let Some(p) = self.peers.get_mut(&pid) {
                    p.outbox.pop_front();
                }
                if rc < 0 {
                    self.free_send.push(slot);
                    let e = self.op_error(
                        pid,
                        rc as i64,
                        format!("fi_send: {}", self.ep.lib.strerror(rc as i32)),
                    );
                    tracing::debug!("notification to {} failed: {e}", self.peer_name(pid));
                    if let Some((t, _)) = transfer {
                        self.finish(t, Some(e));
                    }
                    continue;
                }
                self.ops.insert(key, ctx);
                n += 1;
            }
        }
        n
    }

    /// Handles one completion (or failed completion) of the operation at `ctx`.
    fn complete(&mut self, ctx: usize, len: usize, err: Option<CqError>) {
        let Some(op) = self.ops.remove(&ctx) else {
            tracing::warn!("completion for an unknown context {ctx:#x}");
            return;
        };
        match op.kind {
            OpKind::Rma { transfer, epoch } => {
                let peer = self.transfers.get(&transfer).map_or(0, |t| t.peer);
                let e = err.map(|e| self.op_error(peer, e.code, e.message));
                if let Some(t) = self.transfers.get_mut(&transfer) {
                    if t.epoch == epoch {
                        t.outstanding = t.outstanding.saturating_sub(1);
                        if let Some(e) = e {
                            t.fail(e);
                        }
                        if t.flush_due() && !self.pending.contains(&transfer) {
                            self.pending.push_back(transfer);
                        }
                    }
                }
                self.check_finished(transfer);
            }
            OpKind::Send { slot, transfer } => {
                self.free_send.push(slot);
                if let Some((tid, epoch)) = transfer {
                    let current = self.transfers.get(&tid).is_some_and(|t| t.epoch == epoch);
                    if current {
                        let peer = self.transfers.get(&tid).map_or(0, |t| t.peer);
                        let e = err.map(|e| self.op_error(peer, e.code, e.message));
                        self.finish(tid, e);
                    }
                } else if let Some(e) = err {
                    tracing::warn!("notification send failed: {}", e.message);
                }
            }
            OpKind::Recv { slot } => {
                match err {
                    Some(e) if e.code == -(libc::ECANCELED as i64) => return,
                    Some(e) => tracing::warn!("notification receive failed: {}", e.message),
                    None => match wire::decode_notification(self.recv.slice(slot, len)) {
                        Ok((peer, payload)) => self.inbox.push_back(Notification { peer, payload }),
                        Err(e) => tracing::warn!("dropping malformed notification: {e}"),
                    },
                }
                if let Err(e) = self.post_recv(slot) {
                    tracing::warn!("re-posting a notification buffer: {e}");
                }
            }
        }
    }

    /// Reads the completion queue until it is empty (bounded); returns entries handled.
    fn poll_cq(&mut self) -> Result<usize> {
        let mut buf = [ffi::fi_cq_data_entry {
            op_context: std::ptr::null_mut(),
            flags: 0,
            len: 0,
            buf: std::ptr::null_mut(),
            data: 0,
        }; 32];
        let mut n = 0;
        for _ in 0..64 {
            match self.ep.read_cq(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    for e in &buf[..k] {
                        self.complete(e.op_context as usize, e.len, None);
                    }
                    n += k;
                }
                Err(e) if e.context.is_null() => {
                    return Err(Error::Backend {
                        name: "libfabric".into(),
                        code: e.code,
                        message: e.message,
                    })
                }
                Err(e) => {
                    let ctx = e.context as usize;
                    let len = 0;
                    self.complete(ctx, len, Some(e));
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Fails transfers past their deadline: stops posting, cancels what is posted.
    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .active
            .iter()
            .filter(|t| self.transfers.get(t).is_some_and(|t| now > t.deadline))
            .copied()
            .collect();
        for tid in late {
            let Some(t) = self.transfers.get_mut(&tid) else {
                continue;
            };
            let what = format!("libfabric {} of {} segments", t.op, t.segs.len());
            let after = t.timeout;
            t.fail(Error::TimedOut { what, after });
            if t.data_done() && t.notify_pending {
                // Waiting for the notification: the data is done, nothing touches the
                // user's memory any more.
                let e = t.error.take();
                let epoch = t.epoch;
                let peer = t.peer;
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.outbox.retain(|m| m.transfer != Some((tid, epoch)));
                }
                self.finish(tid, e);
                continue;
            }
            self.cancel_ops(tid);
            self.check_finished(tid);
        }
    }

    /// `fi_cancel` on every operation still posted for `tid`.
    fn cancel_ops(&mut self, tid: u64) {
        let ctxs: Vec<usize> = self
            .ops
            .iter()
            .filter(|(_, o)| matches!(o.kind, OpKind::Rma { transfer, .. } if transfer == tid))
            .map(|(k, _)| *k)
            .collect();
        for c in ctxs {
            self.ep.cancel(c as *mut c_void);
        }
    }

    fn progress(&mut self) -> Result<usize> {
        let mut n = self.poll_cq()?;
        n += self.post_pending();
        n += self.pump_outboxes();
        self.check_deadlines();
        Ok(n)
    }
}

impl Drop for State {
    fn drop(&mut self) {
        request::shm_died(&self.ep.address);
        // The endpoint first: afterwards the provider touches no posted buffer.
        self.ep.close_ep();
        let mrs: Vec<_> = self
            .regs
            .values_mut()
            .filter_map(|r| r.mr.take())
            .chain(self.send.mr.take())
            .chain(self.recv.mr.take())
            .chain(self.flush.mr.take())
            .collect();
        for mr in mrs {
            self.ep.close_mr(mr);
        }
    }
}

#[allow(unsafe_code)]
impl Backend for FabricBackend {
    fn name(&self) -> &str {
        "libfabric"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            local: true,
            remote: true,
            notifications: true,
            write: true,
            read: true,
            mem_kinds: MemKinds::of(&[MemKind::Dram]),
        }
    }

    unsafe fn register(&self, kind: MemKind, desc: &Descriptor) -> Result<RegistrationId> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "libfabric registers dram, not {kind}"
            )));
        }
        if desc.len == 0 || desc.end().is_none() || desc.len > usize::MAX as u64 {
            return Err(Error::invalid_argument(format!("cannot register {desc:?}")));
        }
        let mut s = self.state.lock();
        let id = s.id();
        // SAFETY: the caller promises the range stays valid until deregister, which
        // closes the region first.
        let mr = unsafe { s.ep.register(desc.addr, desc.len as usize, id)? };
        let key = if s.ep.prov_key() { mr.key() } else { id };
        s.regs.insert(
            id,
            Registration {
                desc: *desc,
                key,
                mr: Some(mr),
                busy: 0,
            },
        );
        s.by_addr.insert((desc.addr, id), ());
        Ok(RegistrationId(id))
    }

    fn deregister(&self, id: RegistrationId) -> Result<()> {
        let mut s = self.state.lock();
        let r = s
            .regs
            .get(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if r.busy > 0 {
            return Err(Error::Busy(format!(
                "{id} is named by {} transfer(s) in progress; wait or cancel them first",
                r.busy
            )));
        }
        let addr = r.desc.addr;
        if let Some(mut r) = s.regs.remove(&id.0) {
            if let Some(mr) = r.mr.take() {
                s.ep.close_mr(mr);
            }
        }
        s.by_addr.remove(&(addr, id.0));
        Ok(())
    }

    fn remote_key(&self, id: RegistrationId) -> Result<Bytes> {
        let s = self.state.lock();
        let r = s
            .regs
            .get(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        Ok(r.remote_key().encode())
    }

    fn connection_info(&self) -> Result<Bytes> {
        let s = self.state.lock();
        ConnectionInfo {
            agent: self.agent.clone(),
            provider: s.ep.provider.clone(),
            address: s.ep.address.clone(),
        }
        .encode()
    }

    fn connect(&self, peer_name: &str, info: &[u8]) -> Result<EndpointId> {
        let info = ConnectionInfo::decode(info)?;
        let mut s = self.state.lock();
        if info.provider != s.ep.provider {
            return Err(Error::Unsupported(format!(
                "peer {peer_name} uses provider {:?}, this backend {:?}; choose the same provider on both",
                info.provider, s.ep.provider
            )));
        }
        let addr = s.ep.insert(&info.address)?;
        let id = s.id();
        s.peers.insert(
            id,
            Peer {
                name: if peer_name.is_empty() {
                    info.agent.clone()
                } else {
                    peer_name.to_string()
                },
                addr,
                outbox: VecDeque::new(),
                address: info.address,
            },
        );
        Ok(EndpointId(id))
    }

    fn disconnect(&self, peer: EndpointId) -> Result<()> {
        let mut s = self.state.lock();
        let p = s
            .peers
            .get(&peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{peer}")))?;
        let name = p.name.clone();
        let tids: Vec<u64> = s
            .active
            .iter()
            .filter(|t| s.transfers.get(t).is_some_and(|t| t.peer == peer.0))
            .copied()
            .collect();
        for tid in tids {
            if let Some(t) = s.transfers.get_mut(&tid) {
                t.fail(Error::RemoteDisconnected {
                    peer: name.clone(),
                    reason: "disconnected locally".into(),
                });
                t.notify_pending = false;
            }
            s.cancel_ops(tid);
            s.check_finished(tid);
        }
        s.remotes.retain(|_, r| r.peer != peer.0);
        // Keep the AV entry while operations to it may still be outstanding; they
        // complete (or fail) and are then ignored.
        if let Some(p) = s.peers.remove(&peer.0) {
            if !s.ops.is_empty() {
                tracing::debug!("disconnect of {} with operations outstanding", p.name);
            }
            s.ep.remove(p.addr);
        }
        Ok(())
    }

    fn import_remote(
        &self,
        peer: EndpointId,
        kind: MemKind,
        desc: &Descriptor,
        key: &[u8],
    ) -> Result<RemoteId> {
        if kind != MemKind::Dram {
            return Err(Error::Unsupported(format!(
                "libfabric addresses dram, not {kind}"
            )));
        }
        let key = RemoteKey::decode(key)?;
        if key.base != desc.addr || key.len != desc.len {
            return Err(Error::invalid_metadata(format!(
                "remote key is for {:#x}+{}, the descriptor says {:#x}+{}",
                key.base, key.len, desc.addr, desc.len
            )));
        }
        let mut s = self.state.lock();
        if !s.peers.contains_key(&peer.0) {
            return Err(Error::NotRegistered(format!("{peer}")));
        }
        let id = s.id();
        s.remotes.insert(
            id,
            Remote {
                peer: peer.0,
                desc: *desc,
                key,
            },
        );
        Ok(RemoteId(id))
    }

    fn release_remote(&self, id: RemoteId) -> Result<()> {
        self.state
            .lock()
            .remotes
            .remove(&id.0)
            .map(|_| ())
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    fn prepare(&self, req: &TransferRequest) -> Result<TransferId> {
        check_request_shape(req)?;
        if req.local_kind != MemKind::Dram || req.remote_kind != MemKind::Dram {
            return Err(Error::Unsupported("libfabric moves dram only".into()));
        }
        let mut s = self.state.lock();
        if !s.peers.contains_key(&req.peer.0) {
            return Err(Error::NotRegistered(format!("{}", req.peer)));
        }
        let remotes: Vec<&Remote> = s
            .remotes
            .values()
            .filter(|r| r.peer == req.peer.0)
            .collect();
        let (virt, local_mr, max) = (s.ep.virt_addr(), s.ep.local_mr(), s.ep.max_msg_size as u64);
        let mut segs = Vec::new();
        let mut local_regs = Vec::new();
        for seg in kv_core::segments(&req.local, &req.remote)? {
            let (l, r) = (seg.local, seg.remote);
            // The registration holding the local piece: the last one starting at or
            // before it that contains it.
            let reg = s
                .by_addr
                .range(..=(l.addr, u64::MAX))
                .rev()
                .map(|((_, id), _)| *id)
                .find(|id| s.regs.get(id).is_some_and(|x| x.desc.contains(&l)))
                .ok_or_else(|| {
                    Error::NotRegistered(format!(
                        "local range {:#x}+{} lies outside every local registration",
                        l.addr, l.len
                    ))
                })?;
            let rem = remotes
                .iter()
                .find(|x| x.desc.contains(&r))
                .ok_or_else(|| {
                    Error::OutOfBounds(format!(
                        "remote range {:#x}+{} lies outside what the peer registered",
                        r.addr, r.len
                    ))
                })?;
            if local_regs.last() != Some(&reg) && !local_regs.contains(&reg) {
                local_regs.push(reg);
            }
            let desc = if local_mr {
                s.regs.get(&reg).map_or(0, Registration::mr_desc)
            } else {
                0
            };
            let mut off = 0;
            while off < l.len {
                let n = (l.len - off).min(max);
                let raddr = if virt {
                    r.addr + off
                } else {
                    r.addr - rem.key.base + off
                };
                segs.push(Seg {
                    local: l.addr + off,
                    len: n as usize,
                    desc,
                    raddr,
                    key: rem.key.key,
                });
                off += n;
            }
        }
        let id = s.id();
        let flush = match (req.op, segs.last()) {
            (Op::Write, Some(last)) => Some(Seg {
                local: s.flush.buf(0) as u64,
                len: 1,
                desc: if local_mr { s.flush.desc() as usize } else { 0 },
                raddr: last.raddr + last.len as u64 - 1,
                key: last.key,
            }),
            _ => None,
        };
        s.transfers.insert(
            id,
            Transfer {
                flush,
                flushed: false,
                op: req.op,
                peer: req.peer.0,
                segs,
                local_regs,
                status: Status::Idle,
                epoch: 0,
                next: 0,
                outstanding: 0,
                error: None,
                deadline: Instant::now(),
                timeout: self.timeout,
                notify_pending: false,
            },
        );
        Ok(TransferId(id))
    }

    unsafe fn post(&self, id: TransferId, opts: &PostOptions) -> Result<()> {
        if let Some(p) = &opts.notification {
            if p.len() > wire::MAX_PAYLOAD {
                return Err(Error::invalid_argument(format!(
                    "notification of {} bytes; at most {}",
                    p.len(),
                    wire::MAX_PAYLOAD
                )));
            }
        }
        let mut s = self.state.lock();
        let now = Instant::now();
        let t = s
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        if matches!(t.status, Status::InProgress) {
            return Err(Error::Busy(format!("{id} is already in progress")));
        }
        if t.outstanding != 0 {
            return Err(Error::Busy(format!("{id} still has operations in flight")));
        }
        // The transfer's pieces carry the local MRs' descriptors: a deregistered (closed)
        // MR must never reach the provider.
        let regs = t.local_regs.clone();
        if let Some(r) = regs.iter().find(|r| !s.regs.contains_key(r)) {
            return Err(Error::NotRegistered(format!(
                "local registration {r} of {id} was deregistered; prepare the transfer again"
            )));
        }
        let t = s
            .transfers
            .get_mut(&id.0)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
        let deadline = opts.deadline.unwrap_or(now + self.timeout);
        t.status = Status::InProgress;
        t.epoch += 1;
        t.next = 0;
        t.flushed = false;
        t.error = None;
        t.deadline = deadline;
        t.timeout = deadline.saturating_duration_since(now);
        t.notify_pending = opts.notification.is_some();
        let (peer, epoch, regs) = (t.peer, t.epoch, t.local_regs.clone());
        for r in regs {
            if let Some(r) = s.regs.get_mut(&r) {
                r.busy += 1;
            }
        }
        s.active.insert(id.0);
        if let Some(payload) = &opts.notification {
            if let Some(p) = s.peers.get_mut(&peer) {
                p.outbox.push_back(OutMsg {
                    payload: payload.clone(),
                    after: vec![(id.0, epoch)],
                    transfer: Some((id.0, epoch)),
                });
            }
        }
        s.pending.push_back(id.0);
        // Post what the provider takes now; on EAGAIN, reap completions and retry a
        // few times, then leave the rest to `progress`.
        for _ in 0..4 {
            s.post_pending();
            if s.pending.is_empty() {
                break;
            }
            s.poll_cq()?;
        }
        s.check_finished(id.0);
        Ok(())
    }

    fn poll(&self, id: TransferId) -> Status {
        match self.state.lock().transfers.get(&id.0) {
            Some(t) => t.status.clone(),
            None => Status::Failed(Error::NotRegistered(format!("{id}"))),
        }
    }

    fn cancel(&self, id: TransferId) -> Result<()> {
        let end = Instant::now() + self.timeout;
        {
            let mut s = self.state.lock();
            let t = s
                .transfers
                .get_mut(&id.0)
                .ok_or_else(|| Error::NotRegistered(format!("{id}")))?;
            if !matches!(t.status, Status::InProgress) {
                return Ok(());
            }
            t.fail(Error::Canceled);
            s.pending.retain(|x| *x != id.0);
            s.cancel_ops(id.0);
            s.check_finished(id.0);
        }
        // Drain until the provider gave back every posted operation.
        loop {
            {
                let mut s = self.state.lock();
                let _ = s.progress();
                s.check_finished(id.0);
                match s.transfers.get(&id.0) {
                    Some(t) if matches!(t.status, Status::InProgress) => {}
                    _ => return Ok(()),
                }
            }
            if Instant::now() > end {
                return Err(Error::TimedOut {
                    what: format!("cancel of {id} (the provider still holds its buffers)"),
                    after: self.timeout,
                });
            }
            std::thread::yield_now();
        }
    }

    fn release(&self, id: TransferId) -> Result<()> {
        let mut s = self.state.lock();
        match s.transfers.get(&id.0) {
            None => Err(Error::NotRegistered(format!("{id}"))),
            Some(t) if matches!(t.status, Status::InProgress) => {
                Err(Error::Busy(format!("{id} is in progress; cancel it first")))
            }
            Some(_) => {
                s.transfers.remove(&id.0);
                Ok(())
            }
        }
    }

    fn progress(&self) -> Result<usize> {
        self.state.lock().progress()
    }

    fn notify(&self, peer: EndpointId, payload: Bytes) -> Result<()> {
        if payload.len() > wire::MAX_PAYLOAD {
            return Err(Error::invalid_argument(format!(
                "notification of {} bytes; at most {}",
                payload.len(),
                wire::MAX_PAYLOAD
            )));
        }
        let mut s = self.state.lock();
        let after: Vec<(u64, u64)> = s
            .active
            .iter()
            .filter_map(|t| {
                s.transfers
                    .get(t)
                    .filter(|x| x.peer == peer.0)
                    .map(|x| (*t, x.epoch))
            })
            .collect();
        let p = s
            .peers
            .get_mut(&peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{peer}")))?;
        if !p.alive() {
            return Err(Error::RemoteDisconnected {
                peer: p.name.clone(),
                reason: "the peer's endpoint is closed".into(),
            });
        }
        p.outbox.push_back(OutMsg {
            payload,
            after,
            transfer: None,
        });
        s.pump_outboxes();
        Ok(())
    }

    fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        let mut s = self.state.lock();
        let n = s.inbox.len();
        out.extend(s.inbox.drain(..));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<FabricBackend>();
        check::<Options>();
    }

    #[test]
    fn options_from_params() {
        let mut p = Params::new();
        p.insert("provider".into(), "shm".into());
        p.insert("timeout_ms".into(), "250".into());
        let o = Options::from_params(&p).unwrap();
        assert_eq!(o.provider.as_deref(), Some("shm"));
        assert_eq!(o.timeout, Duration::from_millis(250));
        p.insert("timeout_ms".into(), "soon".into());
        assert!(matches!(
            Options::from_params(&p),
            Err(Error::InvalidArgument(_))
        ));
        let mut q = Params::new();
        q.insert("colour".into(), "blue".into());
        assert!(Options::from_params(&q).is_err());
    }

    #[test]
    fn connect_refuses_another_provider_and_garbage() {
        let open = |prov: &str| {
            let mut p = Params::new();
            p.insert("provider".into(), prov.into());
            kv_core::require_or_skip(
                "libfabric",
                FabricBackend::new("t", Options::from_params(&p)?),
            )
            .map(Ok)
            .unwrap_or(Err(Error::Canceled))
        };
        let (Ok(shm), Ok(tcp)) = (open("shm"), open("tcp;ofi_rxm")) else {
            return;
        };
        assert_eq!(shm.provider(), "shm");
        let e = shm.connect("tcp-peer", &tcp.connection_info().unwrap());
        assert!(matches!(e, Err(Error::Unsupported(_))), "{e:?}");
        let mut info = shm.connection_info().unwrap().to_vec();
        info[6] ^= 0x40;
        assert!(matches!(
            shm.connect("x", &info),
            Err(Error::InvalidMetadata(_))
        ));
    }
}
