//! The worker core: the UCP context and worker, every table the backend keeps behind
//! one lock, creation and teardown, `progress` and `poll` (the engine they drive,
//! `advance`, `end_flight` and the rest, is in `worker/engine.rs`). Each `Backend`
//! operation is a short method here that takes the lock and calls the room that owns
//! the work: [`crate::memory`], [`crate::endpoint`], [`crate::request`], and the
//! callbacks' state [`Shared`].
//!
//! Thread mode: the worker is created `UCS_THREAD_MODE_SERIALIZED` and every UCX call
//! on it (posting, progress, callbacks, teardown) happens with [`Core::state`]'s
//! `parking_lot::Mutex` held, so UCX sees one thread at a time, as that mode requires.
//! UCX's callbacks run inside those calls and therefore must not take the state lock:
//! they touch only [`Shared`] (its own short lock) or a request group's atomic counter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::auth::ClusterSecret;
use kv_core::{
    check_request_shape, Access, Descriptor, Error, MemKind, Notification, Op, PostOptions, Result,
    Status, TransferRequest,
};
use parking_lot::Mutex;

use crate::am;
use crate::config::{self, Options};
use crate::context;
use crate::endpoint::{check_segments, peer_gone, Endpoint, Gate};
use crate::ffi::{self, Lib};
use crate::guard::{self, Guard};
use crate::ids::{self, new_instance_id, own_pid, IdMap};
use crate::memory::{HostAllocator, Memory, Remote};
use crate::request::{Flight, Group, NoteState, Transfer, Transfers};
use crate::session::Client;
use crate::shared::{Limits, Shared};
use crate::wire::{ConnInfo, OpHeader, RemoteKey, MAX_ENTRIES};

/// Worker progress calls per `progress()` when there is work.
const PROGRESS_BURST: usize = 32;
/// How long `notify` drives the worker to get a ready notification out.
const NOTIFY_PUSH: Duration = Duration::from_millis(20);

/// Everything behind the lock. UCX handles are raw pointers; they are only used under
/// the lock, which is what makes moving the state between threads sound.
pub struct State {
    ctx: ffi::ucp_context_h,
    worker: ffi::ucp_worker_h,
    mem: Memory,
    eps: IdMap<Endpoint>,
    transfers: Transfers,
    /// Notification sends of disconnected endpoints still running.
    graveyard: Vec<Group>,
    next_id: u64,
}

// SAFETY: the raw UCX handles inside are used only with the state lock held (the
// worker runs in UCS_THREAD_MODE_SERIALIZED), never concurrently from two threads.
unsafe impl Send for State {}

/// The backend's engine: library, context, worker, tables.
pub struct Core {
    pub lib: Arc<Lib>,
    pub instance: u64,
    pub opts: Options,
    pub info: Bytes,
    /// The TCP segment sizes (send, receive) published in `info` (0: no TCP).
    tcp_segs: (u32, u32),
    /// Most entries per operation message (UCX's header limit allows).
    max_entries: usize,
    /// UCX's active-message header limit.
    max_header: usize,
    shared: Box<Shared>,
    /// The cap on connections UCX's TCP transport accepts.
    guard: Mutex<Guard>,
    /// UCX may listen on TCP (else the guard has nothing to watch: not even locked).
    guarded: bool,
    state: Mutex<State>,
}

impl Core {
    /// Loads UCX, creates the context (active messages only: peers reach our memory
    /// only through operations we check) and the worker, installs the handlers and
    /// publishes the worker address.
    pub fn new(
        agent: &str,
        secret: Option<ClusterSecret>,
        bind_ip: std::net::IpAddr,
        opts: Options,
    ) -> Result<Core> {
        config::authenticates(&opts, agent, secret.is_some(), bind_ip)?;
        let lib = Lib::shared(opts.lib_path.as_deref())?;
        let instance = new_instance_id();
        let settings = config::with_bind_ip(&opts.config, bind_ip)?;
        // The TCP guard reads the host's socket table (each read walks the kernel's
        // whole connection hash: tens of milliseconds here); not when UCX cannot listen.
        let tcp = !config::shm_only(opts.tls.as_deref());
        let before = if tcp {
            guard::listening()
        } else {
            Default::default()
        };
        let (ctx, worker, tcp_segs) = context::open(&lib, agent, &settings, opts.tls.as_deref())?;
        let state = State {
            ctx,
            worker,
            mem: Memory::default(),
            eps: IdMap::default(),
            transfers: Transfers::default(),
            graveyard: Vec::new(),
            next_id: 1,
        };
        let limits = Limits {
            max_notification: opts.max_notification,
            max_inbox: opts.max_inbox,
            max_inbox_bytes: opts.max_inbox_bytes,
        };
        let shared = Box::new(Shared::new(
            lib.clone(),
            worker,
            instance,
            agent,
            secret,
            limits,
        ));
        // From here on `Core::drop` tears everything down on any error.
        let mut core = Core {
            lib: lib.clone(),
            instance,
            opts,
            info: Bytes::new(),
            tcp_segs,
            max_entries: 1,
            max_header: 0,
            shared,
            guard: Mutex::new(Guard::idle()),
            guarded: tcp,
            state: Mutex::new(state),
        };
        am::install(&core.shared)?;
        let max_header = context::max_am_header(&lib, worker)?;
        core.max_header = max_header;
        core.max_entries = (1..=MAX_ENTRIES)
            .rev()
            .find(|&n| OpHeader::encoded_len(n) <= max_header)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "UCX allows active-message headers of {max_header} bytes only"
                ))
            })?;
        let worker_address = context::worker_address(&lib, worker)?;
        if tcp {
            *core.guard.lock() = Guard::new(&before, &worker_address, core.opts.max_connections);
        }
        let info = ConnInfo {
            name: agent.to_owned(),
            instance,
            pid: own_pid(),
            tcp_tx_seg: tcp_segs.0,
            tcp_rx_seg: tcp_segs.1,
            worker_address,
        };
        core.info = Bytes::from(info.encode()?);
        ids::mark_live(instance);
        Ok(core)
    }

    /// Whether operations and notifications are authenticated (a cluster secret).
    pub fn authenticated(&self) -> bool {
        self.shared.secret.is_some()
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
    pub fn register(&self, kind: MemKind, desc: &Descriptor, access: Access) -> Result<u64> {
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
        let mut st = self.state.lock();
        let id = st.next_id;
        let key_id = st.mem.register(desc, access, id)?;
        st.next_id += 1;
        self.shared.add_target(key_id, *desc, access);
        Ok(id)
    }

    /// `Backend::deregister`: no posted transfer of ours may name it; peers' new
    /// operations are refused at once, and running rendezvous transfers of peers into or
    /// out of it are waited for (`cancel_grace` at most, then `Busy`).
    pub fn deregister(&self, id: u64) -> Result<()> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        // A post that already ended may still hold the memory in quarantine (requests
        // UCX has not given back, mapped operations the target has not answered): give
        // them up to `cancel_grace` to end, as for peers' transfers below.
        let quarantined = |st: &State| {
            st.transfers
                .quarantine
                .iter()
                .any(|q| q.local_regs.contains(&id))
        };
        if st.mem.key_of_idle(id).is_err() && quarantined(st) && !self.posted_with(st, id) {
            self.drive_until(st, self.opts.cancel_grace, |st| !quarantined(st));
        }
        let key_id = st.mem.key_of_idle(id)?;
        if self.shared.revoke_target(key_id) > 0 {
            let end = Instant::now() + self.opts.cancel_grace;
            while self.shared.target_inflight(key_id) > 0 && Instant::now() < end {
                // SAFETY: valid worker, under the state lock.
                unsafe { (self.lib.worker_progress)(st.worker) };
            }
            let n = self.shared.target_inflight(key_id);
            if n > 0 {
                return Err(Error::Busy(format!(
                    "RegistrationId#{id} is in {n} transfer(s) with a peer that does not progress; \
                     peers can no longer start new ones; retry"
                )));
            }
        }
        self.shared.remove_target(key_id);
        st.mem.remove_reg(&self.lib, st.ctx, id)
    }

    /// Whether a transfer in flight names local registration `id`.
    fn posted_with(&self, st: &State, id: u64) -> bool {
        st.transfers.active.iter().any(|t| {
            st.transfers
                .by_id
                .get(t)
                .is_some_and(|t| t.local_regs.contains(&id))
        })
    }

    /// `Backend::remote_key`.
    pub fn remote_key(&self, id: u64) -> Result<Bytes> {
        self.state.lock().mem.remote_key(id)
    }

    /// `Backend::connect`: an endpoint to the peer's worker address, with peer error
    /// handling so a dead peer fails its requests, and (with a cluster secret) the
    /// authentication handshake started.
    pub fn connect(&self, peer_name: &str, info: &[u8]) -> Result<u64> {
        let info = ConnInfo::decode(info)?;
        check_segments(self.tcp_segs, peer_name, &info)?;
        if let Some(why) = peer_gone(&info) {
            return Err(Error::RemoteDisconnected {
                peer: peer_name.to_owned(),
                reason: why,
            });
        }
        let mut st = self.state.lock();
        let shm_only = config::shm_only(self.opts.tls.as_deref());
        let e = Endpoint::open(&self.shared, peer_name, info, shm_only, self.opts.rndv_min)?;
        let id = st.next_id;
        st.next_id += 1;
        let uep = e.ep;
        st.eps.insert(id, e);
        if self.authenticated() {
            am::start_client(&self.shared, uep, id);
        } else {
            self.shared.set_client(id, Client::Open);
        }
        Ok(id)
    }

    /// `Backend::disconnect`: in-flight transfers end `RemoteDisconnected` (or `Done`
    /// if they won), the endpoint closes, and its id stays to say so.
    pub fn disconnect(&self, id: u64) -> Result<()> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let ep = st
            .eps
            .get_mut(&id)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{id}")))?;
        if ep.gone {
            return Ok(());
        }
        ep.gone = true;
        let err = ep.disconnected("disconnected locally");
        if ep.dead.is_none() {
            ep.dead = Some("disconnected locally".into());
        }
        let peer_errors = ep.peer_errors;
        let tids = self.transfers_on(st, id);
        if peer_errors {
            // A forced close completes every request on the endpoint (CANCELED).
            self.close_endpoint(st, id, "disconnected locally");
        }
        // Let the posts end by themselves (answered, or cut off by the close).
        let limit = if peer_errors {
            Duration::from_secs(2)
        } else {
            self.opts.cancel_grace
        };
        self.drive_until(st, limit, |st| {
            tids.iter().all(|t| !Self::in_flight(st, *t))
        });
        for t in tids {
            self.stop(st, t, err.clone());
        }
        self.close_endpoint(st, id, "disconnected locally");
        if let Some(ep) = st.eps.get_mut(&id) {
            let notes: Vec<Group> = ep.notes.drain(..).filter_map(|n| n.sent).collect();
            st.graveyard.extend(notes);
        }
        st.mem.forget_imports(id);
        // The session goes now, unless mapped operations of a post cut off here still
        // await answers (the target may still copy; its answers must verify to free
        // our memory): then when the last of them ends.
        if !Self::awaits_mapped(st, id) {
            self.shared.remove_client(id);
        }
        Ok(())
    }

    /// `Backend::import_remote`: checks the key's envelope and that `desc` lies in the
    /// range it covers; nothing reaches UCX (the peer checks every operation).
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
        if desc.len == 0 || !key.range.contains(desc) {
            return Err(Error::OutOfBounds(format!(
                "imported range {desc:?} is not inside the registration {:?} its key covers",
                key.range
            )));
        }
        let mut st = self.state.lock();
        st.eps
            .get(&ep_id)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{ep_id}")))?
            .usable()?;
        let id = st.next_id;
        st.next_id += 1;
        st.mem.remotes.insert(
            id,
            Remote {
                endpoint: ep_id,
                desc: *desc,
                key_id: key.key_id,
                key_base: key.range.addr,
                access: key.access,
                busy: 0,
            },
        );
        Ok(id)
    }

    /// `Backend::release_remote`.
    pub fn release_remote(&self, id: u64) -> Result<()> {
        self.state.lock().mem.remove_import(id)
    }

    /// `Backend::prepare`: bounds and access are checked here, once.
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
        let local_regs = st.mem.local_cover(&req.local, req.op == Op::Read)?;
        let (remote_ids, ranges) =
            st.mem
                .remote_cover(req.peer.0, &ep.peer_name, &req.remote, req.op == Op::Write)?;
        let id = st.next_id;
        let imports = st.mem.imports(&remote_ids, id)?;
        let t = Transfer::new(req, local_regs, remote_ids, imports, &ranges);
        st.next_id += 1;
        st.transfers.by_id.insert(id, t);
        Ok(id)
    }

    /// `Backend::post`: refuses what it must before anything moves (an expired deadline,
    /// a dead endpoint, a deregistered or released range), records the post and issues
    /// its operations (or holds them until the endpoint has authenticated).
    pub fn post(&self, id: u64, opts: &PostOptions) -> Result<()> {
        if let Some(p) = &opts.notification {
            self.check_payload(p)?;
        }
        let mut guard = self.state.lock();
        let st = &mut *guard;
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
        // The clock is read only for a post with a deadline (once: the deadline's
        // coarse form is made from the same reading).
        let posted = opts.deadline.map(|_| Instant::now());
        if opts.deadline.zip(posted).is_some_and(|(d, now)| d <= now) {
            return Err(Error::TimedOut {
                what: format!("ucx TransferId#{id} (its deadline passed before the post)"),
                after: Duration::ZERO,
            });
        }
        st.mem.check_local(&t.local_regs, id)?;
        st.mem.check_imports(&t.remote_ids, id)?;
        t.posts += 1;
        let post = t.posts;
        let note = match &opts.notification {
            Some(payload) => {
                ep.queue_note(Gate::Transfer { transfer: id, post }, payload.clone());
                NoteState::Queued
            }
            None => NoteState::None,
        };
        t.flight = Some(Flight::new(&self.lib, post, posted, opts.deadline, note));
        t.status = Status::InProgress;
        st.mem.hold(&t.local_regs, &t.remote_ids);
        st.transfers.active.push(id);
        self.try_issue(st, id);
        if !Self::issued(st, id) {
            st.transfers.unissued.push(id);
        }
        // A post that failed while issuing ends now; one under way is moved on by the
        // next `poll`/`progress` (nothing of it can be answered yet: no walk over every
        // transfer in flight per post).
        if Self::failed_to_issue(st, id) {
            self.advance(st);
        }
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

    /// `Backend::cancel`: waits up to `cancel_grace` for every operation to end (the
    /// target answers once its data landed); a READ's unanswered operations are then
    /// forgotten (their data will not land); a WRITE's are cut off by force-closing the
    /// endpoint where UCX allows it. `Busy` when something may still move: the
    /// transfer then ends `Canceled` by itself once it does.
    pub fn cancel(&self, id: u64) -> Result<()> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let t = st
            .transfers
            .by_id
            .get(&id)
            .ok_or_else(|| Error::NotRegistered(format!("TransferId#{id}")))?;
        let (op, ep_id) = (t.op, t.endpoint);
        if let Some(f) = st
            .transfers
            .by_id
            .get_mut(&id)
            .and_then(|t| t.flight.as_mut())
        {
            f.canceled = true;
        }
        self.drive_until(st, self.opts.cancel_grace, |st| !Self::in_flight(st, id));
        if !Self::in_flight(st, id) {
            return Ok(());
        }
        let peer_errors = st.eps.get(&ep_id).is_some_and(|e| e.peer_errors);
        if op == Op::Write && peer_errors {
            tracing::warn!("ucx: TransferId#{id} did not cancel; force-closing its endpoint");
            self.close_endpoint(
                st,
                ep_id,
                "endpoint force-closed to stop a transfer that would not cancel",
            );
            // UCX completes the endpoint's requests (CANCELED); the post then ends.
            self.drive_until(st, Duration::from_secs(2), |st| !Self::in_flight(st, id));
        }
        if (op == Op::Read || peer_errors) && !self.stop(st, id, Error::Canceled) {
            return Ok(());
        }
        Err(Error::Busy(format!(
            "TransferId#{id} is being cancelled, but the peer has not answered yet (it does not \
             progress) and UCX cannot cut it off on these transports; it ends Canceled by \
             itself; keep its memory registered until then"
        )))
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

    /// `Backend::progress` (and, at most every 500 ms, the connection cap).
    pub fn progress(&self) -> Result<usize> {
        if self.guarded {
            self.guard.lock().check();
        }
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

    /// `Backend::notify`: queued behind every post in flight on the endpoint (so it
    /// arrives after their data); sent at once when nothing is in flight, and pushed
    /// out for a moment even if nobody progresses afterwards.
    pub fn notify(&self, ep_id: u64, payload: Bytes) -> Result<()> {
        self.check_payload(&payload)?;
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let posts: Vec<(u64, u64)> = self
            .transfers_on(st, ep_id)
            .into_iter()
            .filter_map(|t| {
                let f = st.transfers.by_id.get(&t)?.flight.as_ref()?;
                Some((t, f.post))
            })
            .collect();
        let ep = st
            .eps
            .get_mut(&ep_id)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{ep_id}")))?;
        ep.usable_now()?;
        let number = ep.next_note;
        ep.queue_note(Gate::Posts(posts), payload);
        self.advance(st);
        let out = |st: &State| {
            st.eps.get(&ep_id).is_none_or(|e| {
                e.notes
                    .iter()
                    .find(|n| n.number == number)
                    .is_none_or(|n| n.sent.as_ref().is_some_and(Group::done))
            })
        };
        self.drive_until(st, NOTIFY_PUSH, out);
        Ok(())
    }

    /// `Backend::drain_notifications`.
    pub fn drain_notifications(&self, out: &mut Vec<Notification>) -> Result<usize> {
        Ok(self.shared.drain_inbox(out))
    }

    /// Transports and lanes each endpoint uses (`ucp_ep_print_info`), with the settings.
    pub fn describe(&self) -> String {
        let st = self.state.lock();
        let (a, b, c) = self.lib.version;
        let mut s = format!(
            "ucx {a}.{b}.{c} from {}; tls={}; worker thread mode SERIALIZED (one lock); {}\n",
            self.lib.path.display(),
            self.opts
                .tls
                .clone()
                .or_else(|| std::env::var("UCX_TLS").ok())
                .unwrap_or_else(|| "(UCX default)".into()),
            if self.authenticated() {
                "operations authenticated (cluster secret)"
            } else {
                "operations NOT authenticated (no cluster secret)"
            }
        );
        let g = self.guard.lock();
        let ports: Vec<String> = g
            .ports
            .iter()
            .map(|(p, a)| match a {
                Some(a) => format!("{}.{}.{}.{}:{p}", a[0], a[1], a[2], a[3]),
                None => format!("[v6]:{p}"),
            })
            .collect();
        s.push_str(&format!(
            "UCX TCP listeners: {}; accepted connections capped at {} ({} shut down)\n",
            if ports.is_empty() {
                "none".to_string()
            } else {
                ports.join(", ")
            },
            g.cap,
            g.shut
        ));
        drop(g);
        let n = self.shared.counters();
        s.push_str(&format!(
            "operations: sent {}; from peers served {} (mapped {}), refused {}, unanswered {}; \
             malformed or unverifiable messages dropped {}; notifications dropped {}\n",
            st.transfers.sent,
            n.accepted,
            n.mapped,
            n.refused,
            n.unanswered,
            n.malformed,
            n.dropped_notes
        ));
        s.push_str(&format!(
            "peers' allocations mapped here: {} (at most {})\n",
            self.shared.maps.lock().len(),
            crate::mapping::MAX_MAPPINGS
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
        let ep_ids: Vec<u64> = st.eps.keys().copied().collect();
        for id in &ep_ids {
            if st.eps.get(id).is_some_and(|e| e.peer_errors) {
                self.close_endpoint(st, *id, "backend dropped");
            }
        }
        for tid in st.transfers.active.clone() {
            self.stop(st, tid, Error::Canceled);
        }
        for id in ep_ids {
            self.close_endpoint(st, id, "backend dropped");
        }
        for (_, mut ep) in st.eps.drain() {
            ep.reap_close(&self.lib);
            if let Some(r) = ep.closing.take() {
                // SAFETY: a close request of this worker, freed once before the worker
                // is destroyed (UCX then ends it).
                unsafe { (self.lib.request_free)(r) };
            }
            // Dropping the notes frees their requests (before the worker goes).
            drop(ep);
        }
        st.graveyard.clear();
        st.transfers.by_id.clear();
        // Destroying the worker below ends any request UCX still held; the groups
        // leak the buffers such requests may have read.
        st.transfers.quarantine.clear();
        for (_, a) in st.mem.allocs.drain() {
            // SAFETY: every transfer was stopped and every endpoint closed; allocation
            // handles are unmapped once, here (their owners hold the core alive, so every
            // owner was dropped already).
            unsafe { (self.lib.mem_unmap)(st.ctx, a.memh) };
        }
        // Peers' memory mapped for their operations: unmapped before the worker goes.
        self.shared.maps.lock().clear(&self.lib);
        // SAFETY: every endpoint, request, key and memory handle of the worker and
        // context was released above; each is destroyed once.
        unsafe {
            (self.lib.worker_destroy)(st.worker);
            (self.lib.cleanup)(st.ctx);
        }
    }
}

mod engine;
#[cfg(test)]
mod tests;
