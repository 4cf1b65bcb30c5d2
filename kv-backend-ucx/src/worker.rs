//! The worker core: the UCP context and worker, every table the backend keeps behind
//! one lock, creation and teardown, and the progress engine that moves transfers and
//! notifications along (`progress`, `poll`, `advance`, `abort`). Each `Backend`
//! operation is a short method here that takes the lock and calls the room that owns
//! the work: [`crate::memory`], [`crate::endpoint`], [`crate::request`], [`crate::am`].
//!
//! Thread mode: the worker is created `UCS_THREAD_MODE_SERIALIZED` and every UCX call
//! on it (posting, progress, callbacks, teardown) happens with [`Core::state`]'s
//! `parking_lot::Mutex` held, so UCX sees one thread at a time, as that mode requires.
//! UCX's callbacks (request completion, endpoint error, active-message receive) run
//! inside those calls and therefore must not take the state lock: they touch only
//! [`Shared`] (its own short lock) or a request group's atomic counter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::{
    check_request_shape, Descriptor, Error, MemKind, Notification, Op, PostOptions, Result, Status,
    TransferRequest,
};
use parking_lot::Mutex;

use crate::am::{ack_error, Shared};
use crate::config;
use crate::config::Options;
use crate::context;
use crate::endpoint::{self, check_segments, peer_gone, Endpoint, Gate};
use crate::ffi::{self, ucs_status_t, Lib};
use crate::ids::{self, new_instance_id, own_pid, IdMap};
use crate::memory::{HostAllocator, Memory, Remote};
use crate::request::{Fail, Flight, Group, Issue, Issued, NoteState, Transfers};
use crate::wire::{AmHeader, ConnInfo, RemoteKey};

/// Worker progress calls per `progress()` when there is work.
const PROGRESS_BURST: usize = 32;

/// Everything behind the lock. UCX handles are raw pointers; they are only used under
/// the lock, which is what makes moving the state between threads sound.
pub struct State {
    ctx: ffi::ucp_context_h,
    worker: ffi::ucp_worker_h,
    mem: Memory,
    eps: IdMap<Endpoint>,
    transfers: Transfers,
    next_id: u64,
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

impl Core {
    /// Loads UCX, creates the context (RMA + AM) and the worker, registers the
    /// notification handler and publishes the worker address.
    pub fn new(agent: &str, opts: Options) -> Result<Core> {
        let lib = Lib::shared(opts.lib_path.as_deref())?;
        let instance = new_instance_id();
        let (ctx, worker, tcp_segs) =
            context::open(&lib, agent, &opts.config, opts.tls.as_deref())?;
        let state = State {
            ctx,
            worker,
            mem: Memory::default(),
            eps: IdMap::default(),
            transfers: Transfers::default(),
            next_id: 1,
        };
        let shared = Box::new(Shared::new(lib.clone(), worker, instance));
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
        core.shared.set_handlers()?;
        core.max_am_header = context::max_am_header(&lib, worker)?;
        let info = ConnInfo {
            name: agent.to_owned(),
            instance,
            pid: own_pid(),
            tcp_tx_seg: tcp_segs.0,
            tcp_rx_seg: tcp_segs.1,
            worker_address: context::worker_address(&lib, worker)?,
        };
        core.info = Bytes::from(info.encode()?);
        ids::mark_live(instance);
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
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let id = st.next_id;
        let key_id = st.mem.register(&self.lib, st.ctx, desc, id)?;
        st.next_id += 1;
        self.shared.add_target(key_id, desc);
        Ok(id)
    }

    /// `Backend::deregister`.
    pub fn deregister(&self, id: u64) -> Result<()> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        st.mem.deregister(&self.lib, st.ctx, id, |key_id| {
            // Under the state lock no WRITE handler runs; a rendezvous WRITE still
            // receiving into the range keeps it.
            self.shared.remove_target(key_id).map_err(|n| {
                Error::Busy(format!(
                    "RegistrationId#{id} is receiving {n} WRITE(s) from a peer; progress and retry"
                ))
            })
        })
    }

    /// `Backend::remote_key`.
    pub fn remote_key(&self, id: u64) -> Result<Bytes> {
        self.state.lock().mem.remote_key(id)
    }

    /// `Backend::connect`: an endpoint to the peer's worker address, with peer error
    /// handling so a dead peer fails its requests.
    pub fn connect(&self, peer_name: &str, info: &[u8]) -> Result<u64> {
        let info = ConnInfo::decode(info)?;
        check_segments(self.tcp_segs, peer_name, &info)?;
        if let Some(why) = peer_gone(&info) {
            return Err(Error::RemoteDisconnected {
                peer: peer_name.to_owned(),
                reason: why,
            });
        }
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let shm_only = config::shm_only(self.opts.tls.as_deref());
        let e = Endpoint::open(
            &self.lib,
            st.worker,
            &self.shared,
            peer_name,
            info,
            shm_only,
            self.opts.am_write_min,
        )?;
        let id = st.next_id;
        st.next_id += 1;
        st.eps.insert(id, e);
        Ok(id)
    }

    /// `Backend::disconnect`.
    pub fn disconnect(&self, id: u64) -> Result<()> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let ep = st
            .eps
            .get(&id)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{id}")))?;
        let err = ep.disconnected("disconnected locally");
        let tids: Vec<u64> = st
            .transfers
            .active
            .iter()
            .copied()
            .filter(|t| st.transfers.by_id.get(t).is_some_and(|t| t.endpoint == id))
            .collect();
        for t in tids {
            self.abort(st, t, err.clone())?;
        }
        st.mem.forget_imports(id);
        self.close_endpoint(st, id, "disconnected locally");
        if let Some(mut ep) = st.eps.remove(&id) {
            ep.destroy_rkeys(&self.lib);
        }
        Ok(())
    }

    /// Force-closes endpoint `id` (see [`Endpoint::close`]).
    fn close_endpoint(&self, st: &mut State, id: u64, reason: &str) {
        let worker = st.worker;
        if let Some(ep) = st.eps.get_mut(&id) {
            ep.close(&self.lib, worker, reason);
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
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let ep = st
            .eps
            .get_mut(&ep_id)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{ep_id}")))?;
        ep.usable()?;
        let rkey = ep.rkey(&self.lib, &key.rkey)?;
        let id = st.next_id;
        st.next_id += 1;
        st.mem.remotes.insert(
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
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let Some(r) = st.mem.remove_import(id)? else {
            return Ok(());
        };
        if let Some(ep) = st.eps.get_mut(&r.endpoint) {
            ep.release_rkey(&self.lib, &r.packed);
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
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let ep = st
            .eps
            .get(&req.peer.0)
            .ok_or_else(|| Error::NotRegistered(format!("{}", req.peer)))?;
        ep.usable()?;
        let local_regs = st.mem.local_cover(&req.local)?;
        let (remote_ids, ranges) = st
            .mem
            .remote_cover(req.peer.0, &ep.peer_name, &req.remote)?;
        let t = crate::request::Transfer::new(req, local_regs, remote_ids, &ranges);
        let id = st.next_id;
        st.next_id += 1;
        st.transfers.by_id.insert(id, t);
        Ok(id)
    }

    /// `Backend::post`: one `put_nbx`/`get_nbx` per segment, then (for writes) an
    /// endpoint flush so completion means the data landed; the notification, if any,
    /// is queued behind it.
    pub fn post(&self, id: u64, opts: &PostOptions) -> Result<()> {
        if let Some(p) = &opts.notification {
            self.check_payload(p)?;
        }
        let mut guard = self.state.lock();
        let st = &mut *guard;
        // Everything that can refuse the post, before anything is issued.
        let t = st
            .transfers
            .by_id
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
        ep.usable_now()?;
        st.mem.check_local(&t.local_regs, id)?;
        let rkeys = st.mem.rkeys(&t.remote_ids, id)?;
        let header = match &opts.notification {
            Some(_) => Some(self.header_for(t.endpoint, ep.next_seq)?),
            None => None,
        };
        let segs = t.segments(&rkeys)?;
        // Issue the operations.
        let issue = Issue {
            lib: &self.lib,
            op: t.op,
            uep: ep.ep,
            am_min: match t.op {
                Op::Write => ep.am_write_min,
                Op::Read => u64::MAX,
            },
            rkeys: &rkeys,
            instance: self.instance,
        };
        let Issued { data, am_seqs } = issue.run(&segs, &mut st.transfers.am);
        drop(segs);
        // Record the post: its notification, its WRITEs awaiting answers, its flight,
        // the busy marks on its memory.
        t.posts += 1;
        let post = t.posts;
        let note = match (&opts.notification, header) {
            (Some(payload), Some(header)) => {
                let gate = Gate::Transfer { transfer: id, post };
                ep.queue_note(gate, header, payload.clone());
                NoteState::Queued
            }
            _ => NoteState::None,
        };
        for &seq in &am_seqs {
            st.transfers.am.pending.insert(seq, (id, post));
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
        st.mem.hold(&t.local_regs, &t.remote_ids);
        st.transfers.active.push(id);
        self.advance(st);
        Ok(())
    }

    /// `Backend::poll`.
    pub fn poll(&self, id: u64) -> Status {
        let mut st = self.state.lock();
        if st
            .transfers
            .by_id
            .get(&id)
            .is_some_and(|t| t.flight.is_some())
        {
            // SAFETY: valid worker, under the state lock.
            unsafe { (self.lib.worker_progress)(st.worker) };
            self.advance(&mut st);
        }
        match st.transfers.by_id.get(&id) {
            Some(t) => t.status.clone(),
            None => Status::Failed(Error::invalid_argument(format!(
                "TransferId#{id} is released or unknown"
            ))),
        }
    }

    /// `Backend::cancel`.
    pub fn cancel(&self, id: u64) -> Result<()> {
        let mut st = self.state.lock();
        if !st.transfers.by_id.contains_key(&id) {
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
        match st.transfers.by_id.get(&id) {
            None => Err(Error::NotRegistered(format!("TransferId#{id}"))),
            Some(t) if t.flight.is_some() => Err(Error::Busy(format!(
                "TransferId#{id} is in progress; cancel it first"
            ))),
            Some(_) => {
                st.transfers.by_id.remove(&id);
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
        ep.usable_now()?;
        let header = self.header_for(ep_id, ep.next_seq)?;
        let mut flush = Group::new(lib);
        let uep = ep.ep;
        // SAFETY: live endpoint; parameters valid for the call.
        let _ = flush.issue(0, |p| unsafe { (lib.ep_flush_nbx)(uep, p) });
        ep.queue_note(Gate::Flush(flush), header, payload);
        self.advance(&mut st);
        Ok(())
    }

    /// `Backend::drain_notifications`.
    pub fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        Ok(self.shared.drain_inbox(out))
    }

    /// Moves every in-flight transfer and queued notification as far as it can go
    /// without waiting; returns how many state changes happened.
    fn advance(&self, st: &mut State) -> usize {
        let lib = &self.lib;
        // Endpoint failures reported by UCX, answers to our active-message WRITEs.
        let taken = self.shared.take_events();
        let mut events = st.transfers.apply_acks(taken.acks);
        events += endpoint::mark_failed(&mut st.eps, taken.ep_errors, lib);
        // Notifications: send, in order, each whose data is complete.
        for ep in st.eps.values_mut() {
            events += ep.advance_notes(lib, &mut st.transfers.by_id);
        }
        // Quarantined requests that UCX finally completed release their memory.
        events += st.transfers.release_quarantined(&mut st.mem);
        // Transfers: finish the complete ones, abort the late ones.
        let (finished, late) = st.transfers.due();
        for (tid, err) in finished {
            let status = match err {
                None => Status::Done,
                Some(Fail::Ucs(s)) => Status::Failed(self.map_status(st, tid, s)),
                Some(Fail::Ack(c)) => Status::Failed(ack_error(c)),
            };
            st.transfers.finish(&mut st.mem, tid, status);
            events += 1;
        }
        for tid in late {
            let after = st
                .transfers
                .by_id
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
        let ep = st
            .transfers
            .by_id
            .get(&tid)
            .and_then(|t| st.eps.get(&t.endpoint));
        match ep {
            Some(ep) if ep.dead.is_some() || ffi::is_disconnect_status(s) => {
                ep.disconnected(ep.dead.clone().unwrap_or_else(|| self.lib.status_text(s)))
            }
            _ if s == ffi::UCS_ERR_CANCELED => Error::Canceled,
            _ => self.lib.error("transfer", s),
        }
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
        let Some(t) = st.transfers.by_id.get(&tid) else {
            return Ok(false);
        };
        let Some(f) = &t.flight else {
            return Ok(false);
        };
        let ep_id = t.endpoint;
        f.data.cancel_all(worker);
        let spin = |st: &State, until: Instant| {
            let done =
                |st: &State| match st.transfers.by_id.get(&tid).and_then(|t| t.flight.as_ref()) {
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
        let Some(f) = st.transfers.by_id.get(&tid).and_then(|t| t.flight.as_ref()) else {
            return Ok(false);
        };
        let post = f.post;
        // Unsent notifications of this post are dropped.
        if let Some(ep) = st.eps.get_mut(&ep_id) {
            ep.drop_unsent(tid, post);
        }
        if !done {
            // UCX still owns requests that may read or write the memory (on shared memory
            // UCX 1.13 emulates RMA in software and only the peer's progress completes
            // them). The transfer fails now; its registrations stay busy (deregister
            // says Busy) until UCX gives the requests back.
            if !st.transfers.quarantine(tid, err) {
                return Ok(false);
            }
            tracing::warn!(
                "ucx: TransferId#{tid} abandoned with requests in flight; its memory stays busy"
            );
            return Ok(true);
        }
        let Some(f) = st.transfers.by_id.get(&tid).and_then(|t| t.flight.as_ref()) else {
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
        st.transfers.finish(&mut st.mem, tid, status);
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
        let n = self.shared.counters();
        s.push_str(&format!(
            "active-message WRITEs: sent {}, received {}, refused {}, unanswered {}; \
             malformed messages dropped {}\n",
            st.transfers.am.sent, n.accepted, n.refused, n.unanswered, n.malformed
        ));
        let mut ids: Vec<&u64> = st.eps.keys().collect();
        ids.sort();
        for id in ids {
            st.eps[id].describe(*id, &self.lib, &mut s);
        }
        s
    }
}

impl HostAllocator for Core {
    /// `UcxBackend::alloc_host`: `len` bytes allocated by UCX (`UCP_MEM_MAP_ALLOCATE`),
    /// zeroed. Returns the allocation's id and range.
    fn alloc_host(&self, len: usize) -> Result<(u64, Descriptor)> {
        if len == 0 {
            return Err(Error::invalid_argument("alloc_host of 0 bytes"));
        }
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let id = st.next_id;
        let desc = st.mem.alloc_host(&self.lib, st.ctx, len, id)?;
        st.next_id += 1;
        Ok((id, desc))
    }

    fn free_host(&self, id: u64) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        st.mem.free_host(&self.lib, st.ctx, id);
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        ids::mark_dropped(self.instance);
        let mut guard = self.state.lock();
        let st = &mut *guard;
        for tid in st.transfers.active.clone() {
            if let Err(e) = self.abort(st, tid, Error::Canceled) {
                tracing::error!("ucx: dropping backend with a transfer UCX would not release: {e}");
            }
        }
        let ep_ids: Vec<u64> = st.eps.keys().copied().collect();
        for id in ep_ids {
            self.close_endpoint(st, id, "backend dropped");
        }
        let lib = &self.lib;
        for (_, mut ep) in st.eps.drain() {
            ep.destroy_rkeys(lib);
            // Dropping the notes frees their requests (before the worker goes).
            drop(ep);
        }
        st.mem.remotes.clear();
        st.transfers.by_id.clear();
        // Destroying the worker below ends any request UCX still held.
        st.transfers.quarantine.clear();
        for (_, r) in st.mem.regs.drain() {
            if r.alloc.is_none() {
                // SAFETY: every transfer was aborted, so UCX no longer uses the handle.
                unsafe { (lib.mem_unmap)(st.ctx, r.memh) };
            }
        }
        for (_, a) in st.mem.allocs.drain() {
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
mod tests;
