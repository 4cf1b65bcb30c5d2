//! The backend's state behind its one mutex, and the steps that move posted work
//! forward: starting a post, posting segments (and the flush read of a write), reading
//! the completion queue, handing due notifications to the message layer, deadlines,
//! cancellation and disconnects.
//!
//! A transfer's status becomes final at its end, its deadline, its cancel or its peer's
//! disconnect — whether or not the provider has handed back every operation. Operations
//! it still holds are *abandoned*: the transfer's local registrations stay busy (a
//! `deregister` is refused) until they come back, so the caller keeps the memory; if
//! they never do, the memory is leaked, never freed under the provider.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::c_void;
use std::time::{Duration, Instant};

use kv_core::auth::ClusterSecret;
use kv_core::{Error, PostOptions, Result, Status, TransferId};

use crate::endpoint::{self, OutMsg, Peer};
use crate::fabric::{self, CqError, Fabric, MrUse};
use crate::ffi;
use crate::memory::{keep_forever, Liveness, Registry, Remote, Slab};
use crate::messages::{InboxLimits, Messages};
use crate::request::{OpCtx, OpKind, Transfer};

mod faults;
mod notes;

/// How long a liveness probe of a peer may take (at a deadline or a dropped connection).
const PROBE_WAIT: Duration = Duration::from_millis(200);
/// How long a transfer may see nothing returned before its peer is probed.
const STALL: Duration = Duration::from_secs(1);
/// How long a backend being dropped waits for the provider to return what it holds.
const DROP_DRAIN: Duration = Duration::from_millis(500);

/// Endpoints leaked by dropped backends because the provider still held operations.
static LEAKED_ENDPOINTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Number of endpoints (with their buffers and regions) this process leaked because a
/// backend was dropped while the provider still held its operations.
pub fn leaked_endpoints() -> usize {
    LEAKED_ENDPOINTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Everything the backend holds; one mutex guards it (and so serialises every
/// libfabric call). `Send` (its parts are), not `Sync`.
pub struct State {
    /// The opened fabric objects (taken only by `Drop`).
    fabric: Option<Fabric>,
    next_id: u64,
    /// Local registrations.
    pub regs: Registry,
    /// Connected peers by endpoint id (disconnected ones stay, marked `gone`).
    pub peers: HashMap<u64, Peer>,
    /// Imported remote registrations by id.
    pub remotes: HashMap<u64, Remote>,
    /// Prepared transfers by id.
    pub transfers: HashMap<u64, Transfer>,
    /// Transfers with segments left to post, in post order.
    pending: VecDeque<u64>,
    /// Transfers in progress.
    active: HashSet<u64>,
    /// Posted RMA operations by context address.
    ops: HashMap<usize, Box<OpCtx>>,
    /// Target of the one-byte flush reads (never read by us).
    pub flush: Slab,
    /// Notifications and sessions.
    pub msgs: Messages,
    /// Address-vector entries to remove once nothing posted names them.
    graveyard: Vec<u64>,
    /// The provider is `tcp` (peers can be probed on their listening port).
    tcp: bool,
    timeout: Duration,
    /// The completion queue failed: nothing completes any more.
    broken: Option<Error>,
}

impl State {
    /// The state of agent `agent` on `fabric`: registers the flush byte and the message
    /// buffers and posts the receives. On failure everything registered is closed
    /// before its memory is freed.
    pub fn open(
        agent: &str,
        secret: Option<ClusterSecret>,
        mut fabric: Fabric,
        limits: InboxLimits,
        timeout: Duration,
    ) -> Result<State> {
        let (flush, msgs) = open_buffers(&mut fabric, agent, secret, limits)?;
        if fabric.provider == "shm" {
            endpoint::shm_born(&fabric.address);
        }
        let tcp = fabric.provider.split(';').any(|p| p == "tcp");
        Ok(State {
            fabric: Some(fabric),
            next_id: 0,
            regs: Registry::default(),
            peers: HashMap::new(),
            remotes: HashMap::new(),
            transfers: HashMap::new(),
            pending: VecDeque::new(),
            active: HashSet::new(),
            ops: HashMap::new(),
            flush,
            msgs,
            graveyard: Vec::new(),
            tcp,
            timeout,
            broken: None,
        })
    }

    /// The fabric (present until the state is dropped).
    pub fn fabric(&mut self) -> &mut Fabric {
        self.fabric
            .as_mut()
            .unwrap_or_else(|| unreachable!("the fabric is taken only by Drop"))
    }

    /// The fabric, shared.
    pub fn fabric_ref(&self) -> &Fabric {
        self.fabric
            .as_ref()
            .unwrap_or_else(|| unreachable!("the fabric is taken only by Drop"))
    }

    /// A fresh id for a registration, peer, import or transfer.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn peer_name(&self, peer: u64) -> String {
        self.peers
            .get(&peer)
            .map_or_else(|| format!("endpoint {peer}"), |p| p.name.clone())
    }

    /// `Err(RemoteDisconnected)` when `peer` was disconnected or its endpoint is gone
    /// (marking it gone); `Err(NotRegistered)` when there is no such peer.
    pub fn live_peer(&mut self, peer: u64) -> Result<&mut Peer> {
        let p = self
            .peers
            .get_mut(&peer)
            .ok_or_else(|| Error::NotRegistered(format!("EndpointId#{peer}")))?;
        if p.gone.is_none() && !p.alive() {
            p.gone = Some("the peer's endpoint is closed".into());
        }
        if let Some(why) = &p.gone {
            return Err(Error::RemoteDisconnected {
                peer: p.name.clone(),
                reason: why.clone(),
            });
        }
        Ok(p)
    }

    /// Connects to a peer at `address` (the body of `Backend::connect`).
    pub fn connect(&mut self, name: String, address: Vec<u8>) -> Result<u64> {
        let addr = self.fabric().insert(&address)?;
        let id = self.id();
        if let Err(e) = self.msgs.connect(id, addr, &address) {
            self.fabric().remove(addr);
            return Err(e);
        }
        self.peers.insert(id, Peer::new(name, addr, address));
        self.pump_messages();
        Ok(id)
    }

    /// Starts transfer `id` (the body of `Backend::post`). Every check happens before
    /// the first operation is issued; afterwards failures go into the status.
    pub fn post(&mut self, id: TransferId, opts: &PostOptions) -> Result<()> {
        // Learn of revocations and dead connections before deciding.
        self.poll_cq();
        let now = Instant::now();
        let t = self.live(id)?;
        if matches!(t.status, Status::InProgress) {
            return Err(Error::Busy(format!("{id} is already in progress")));
        }
        if t.outstanding != 0 {
            return Err(Error::Busy(format!(
                "the provider still holds {} operation(s) of an earlier post of {id} (its peer \
                 stalled?); post it again once they returned",
                t.outstanding
            )));
        }
        let (peer, local_regs, remotes) = (t.peer, t.local_regs.clone(), t.remotes.clone());
        self.live_peer(peer)?;
        // The transfer's pieces carry the local MRs' descriptors: a deregistered (closed)
        // MR must never reach the provider.
        if let Some(r) = self.regs.missing(&local_regs) {
            return Err(Error::NotRegistered(format!(
                "local registration {r} of {id} was deregistered; prepare the transfer again"
            )));
        }
        for r in &remotes {
            match self.remotes.get(r) {
                None => {
                    return Err(Error::NotRegistered(format!(
                        "an imported registration of {id} was released; prepare it again"
                    )))
                }
                Some(x) if x.live == Liveness::Gone => {
                    return Err(Error::NotRegistered(format!(
                        "the peer deregistered memory {id} names ({:#x}+{})",
                        x.desc.addr, x.desc.len
                    )))
                }
                Some(_) => {}
            }
        }
        let deadline = opts.deadline.unwrap_or(now + self.timeout);
        if deadline <= now {
            return Err(Error::TimedOut {
                what: format!("{id}: its deadline passed before it was posted"),
                after: Duration::ZERO,
            });
        }
        let Some(t) = self.transfers.get_mut(&id.0) else {
            return Err(Error::NotRegistered(format!("{id}")));
        };
        t.arm(now, deadline, opts.notification.is_some());
        t.holding = true;
        let epoch = t.epoch;
        self.regs.mark_busy(&local_regs);
        self.active.insert(id.0);
        if let Some(payload) = &opts.notification {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.outbox.push_back(OutMsg {
                    payload: payload.clone(),
                    after: vec![(id.0, epoch)],
                    transfer: Some((id.0, epoch)),
                });
            }
        }
        self.pending.push_back(id.0);
        // Post what the provider takes now; on EAGAIN, reap completions and retry a
        // few times, then leave the rest to `progress`.
        for _ in 0..4 {
            self.post_pending();
            if self.pending.is_empty() {
                break;
            }
            self.poll_cq();
        }
        self.check_finished(id.0);
        Ok(())
    }

    /// The status of `id` (the body of `Backend::poll`): fails it first if its deadline
    /// passed.
    pub fn status(&mut self, id: TransferId) -> Status {
        match self.transfers.get(&id.0) {
            Some(t) if !t.released => {
                if matches!(t.status, Status::InProgress) && Instant::now() >= t.deadline {
                    self.check_deadlines();
                }
            }
            _ => {
                return Status::Failed(Error::invalid_argument(format!(
                    "{id} is released or unknown"
                )))
            }
        }
        self.transfers
            .get(&id.0)
            .map_or(Status::Idle, |t| t.status.clone())
    }

    /// Transfer `id`, unless it is unknown or released (`NotRegistered`).
    pub(super) fn live(&mut self, id: TransferId) -> Result<&mut Transfer> {
        self.transfers
            .get_mut(&id.0)
            .filter(|t| !t.released)
            .ok_or_else(|| Error::NotRegistered(format!("{id}")))
    }

    /// Forgets transfer `id` (the body of `Backend::release`); one whose operations the
    /// provider still holds is kept, hidden, until they return.
    pub fn release(&mut self, id: TransferId) -> Result<()> {
        let t = self.live(id)?;
        if matches!(t.status, Status::InProgress) {
            return Err(Error::Busy(format!("{id} is in progress; cancel it first")));
        }
        if t.outstanding > 0 {
            t.released = true;
        } else {
            self.transfers.remove(&id.0);
        }
        Ok(())
    }

    /// Deregisters local registration `id` (the body of `Backend::deregister`): closes
    /// its region, so the provider refuses every later peer operation naming it, and
    /// tells the peers with a session, so they refuse such transfers before posting.
    pub fn deregister(&mut self, id: u64) -> Result<()> {
        // Sessions peers opened since the last progress get the revocation too.
        self.poll_cq();
        let r = self
            .regs
            .get(id)
            .ok_or_else(|| Error::NotRegistered(format!("RegistrationId#{id}")))?;
        if r.busy > 0 {
            return Err(Error::Busy(format!(
                "RegistrationId#{id} is named by {} transfer(s) whose operations the provider \
                 may still hold; wait, cancel them, or keep (leak) the memory",
                r.busy
            )));
        }
        if let Some(mut r) = self.regs.remove(id) {
            let key = r.key;
            if let Some(mr) = r.mr.take() {
                if let Err((mr, e)) = self.fabric().close_mr(mr) {
                    // The provider kept the region open: the registration stays (a
                    // retry may close it); `Ok` would let the caller free its memory.
                    r.mr = Some(mr);
                    self.regs.insert(id, r);
                    return Err(Error::Busy(format!(
                        "RegistrationId#{id}: the provider did not close its region ({e}); \
                         it stays registered: retry, or keep (leak) the memory"
                    )));
                }
            }
            self.msgs.revoke(key);
            self.pump_messages();
        }
        Ok(())
    }

    /// Posts the next segments of `tid`. Returns false when the provider said EAGAIN.
    fn post_segments(&mut self, tid: u64) -> bool {
        let Some(peer) = self.transfers.get(&tid).map(|t| t.peer) else {
            return true;
        };
        let addr = match self.live_peer(peer) {
            Ok(p) => p.addr,
            Err(e) => {
                self.cancel_ops(tid);
                self.finish(tid, Some(e));
                return true;
            }
        };
        if let Some(e) = self.msgs.client_failure(peer) {
            self.cancel_ops(tid);
            self.finish(tid, Some(e));
            return true;
        }
        // Nothing is posted until the peer said every registration it names is live.
        let mut unknown = false;
        if let Some(t) = self.transfers.get(&tid) {
            for r in &t.remotes {
                match self.remotes.get(r).map(|x| x.live) {
                    Some(Liveness::Live) => {}
                    Some(Liveness::Unknown) => unknown = true,
                    Some(Liveness::Gone) | None => {
                        let e = Error::NotRegistered(format!(
                            "the peer deregistered memory {} names",
                            TransferId(tid)
                        ));
                        self.cancel_ops(tid);
                        self.finish(tid, Some(e));
                        return true;
                    }
                }
            }
        }
        if unknown {
            return false;
        }
        loop {
            let Some(t) = self.transfers.get(&tid) else {
                return true;
            };
            if !matches!(t.status, Status::InProgress) {
                return true;
            }
            let Some((seg, write, is_flush)) = t.next_op() else {
                return true;
            };
            let ctx = OpCtx::new(OpKind::Rma {
                transfer: tid,
                user: !is_flush,
                addr,
            });
            let key = &*ctx as *const OpCtx as usize;
            // SAFETY: the local range lies in a registration the caller of `post`
            // promised to keep valid until the transfer finishes, and its registration
            // stays busy (so it is not deregistered) until the provider returned every
            // operation; the flush byte and the boxed context live as long (or leak).
            let rc = unsafe {
                self.fabric().rma(
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
                    self.fabric().lib.strerror(rc as i32)
                );
                let e = fabric::op_error(rc as i64, msg, || self.peer_name(peer));
                if let Some(t) = self.transfers.get_mut(&tid) {
                    t.fail(e);
                }
                self.check_finished(tid);
                return true;
            }
            self.ops.insert(key, ctx);
            if let Some(t) = self.transfers.get_mut(&tid) {
                t.posted(is_flush);
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
            return; // the message layer sends it; its completion finishes the transfer
        }
        let failed = t.error.take();
        self.finish(tid, failed);
    }

    /// Makes `tid`'s status final (`Done` or `Failed(error)`), drops its queued
    /// notification, and releases its registrations unless the provider still holds
    /// operations on them (then they are released when those return).
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
        let notified = std::mem::take(&mut t.notify_pending);
        let (peer, epoch) = (t.peer, t.epoch);
        self.active.remove(&tid);
        self.pending.retain(|x| *x != tid);
        if notified {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.outbox.retain(|m| m.transfer != Some((tid, epoch)));
            }
        }
        self.release_holds(tid);
        if let Some(t) = self.transfers.get(&tid) {
            if t.holding {
                tracing::warn!(
                    "libfabric: {} ended while the provider holds {} of its operations; its \
                     memory stays registered until they return",
                    TransferId(tid),
                    t.user_outstanding
                );
            }
        }
    }

    /// Releases `tid`'s registrations once it is final and nothing of it touching them
    /// is with the provider; forgets a released transfer with nothing outstanding.
    fn release_holds(&mut self, tid: u64) {
        let Some(t) = self.transfers.get_mut(&tid) else {
            return;
        };
        if matches!(t.status, Status::InProgress) {
            return;
        }
        if t.holding && t.user_outstanding == 0 {
            t.holding = false;
            let regs = t.local_regs.clone();
            self.regs.release(&regs);
        }
        if t.released && t.outstanding == 0 {
            self.transfers.remove(&tid);
        }
    }

    /// Imports peer `peer`'s registration `desc` under `key` (the body of
    /// `Backend::import_remote`) and asks the peer whether it is live: transfers naming
    /// it wait for the answer, so none reaches the provider for memory the peer no
    /// longer has (libfabric's shm provider never completes such an operation).
    pub fn import(
        &mut self,
        peer: u64,
        desc: kv_core::Descriptor,
        key: crate::wire::RemoteKey,
    ) -> Result<u64> {
        self.live_peer(peer)?;
        let id = self.id();
        self.remotes.insert(
            id,
            Remote {
                peer,
                desc,
                key,
                live: Liveness::Unknown,
            },
        );
        self.msgs.check(peer, key.key);
        self.pump_messages();
        Ok(id)
    }

    /// Handles one completion (or failed completion) of the operation at `ctx`.
    fn complete(&mut self, ctx: usize, len: usize, err: Option<CqError>) {
        let Some(op) = self.ops.remove(&ctx) else {
            let mut events = Vec::new();
            let Some(fabric) = self.fabric.as_mut() else {
                return;
            };
            if !self.msgs.complete(fabric, ctx, len, err, &mut events) {
                tracing::warn!("libfabric: completion for an unknown context {ctx:#x}");
            }
            self.apply(events);
            return;
        };
        let OpKind::Rma {
            transfer,
            user,
            addr: _,
            ..
        } = op.kind
        else {
            return;
        };
        let peer = self.transfers.get(&transfer).map_or(0, |t| t.peer);
        let in_progress = self
            .transfers
            .get(&transfer)
            .is_some_and(|t| matches!(t.status, Status::InProgress));
        let e = match err {
            Some(e) if in_progress => Some(self.map_error(peer, e)),
            _ => None,
        };
        if let Some(t) = self.transfers.get_mut(&transfer) {
            t.returned(user);
            if let Some(e) = e {
                t.fail(e);
            }
            if t.flush_due() && !self.pending.contains(&transfer) {
                self.pending.push_back(transfer);
            }
        }
        self.check_finished(transfer);
        self.release_holds(transfer);
    }

    /// Reads the completion queue until it is empty (bounded); returns entries handled.
    /// A failed queue fails every transfer in progress (their operations abandoned).
    fn poll_cq(&mut self) -> usize {
        if self.broken.is_some() {
            return 0;
        }
        let mut buf = [ffi::fi_cq_data_entry {
            op_context: std::ptr::null_mut(),
            flags: 0,
            len: 0,
            buf: std::ptr::null_mut(),
            data: 0,
        }; 32];
        let mut n = 0;
        for _ in 0..64 {
            match self.fabric().read_cq(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    for e in &buf[..k] {
                        self.complete(e.op_context as usize, e.len, None);
                    }
                    n += k;
                }
                Err(e) if e.context.is_null() => {
                    let err = Error::Backend {
                        name: "libfabric".into(),
                        code: e.code,
                        message: e.message,
                    };
                    tracing::error!("libfabric: the completion queue failed: {err}");
                    self.broken = Some(err.clone());
                    let tids: Vec<u64> = self.active.iter().copied().collect();
                    for tid in tids {
                        self.finish(tid, Some(err.clone()));
                    }
                    break;
                }
                Err(e) => {
                    self.complete(e.context as usize, 0, Some(e));
                    n += 1;
                }
            }
        }
        n
    }

    /// Reads completions, posts what is pending, sends due notifications, fails
    /// transfers past their deadline and retries stalled handshakes; returns the work
    /// done.
    pub fn progress(&mut self) -> Result<usize> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let mut n = self.poll_cq();
        n += self.post_pending();
        n += self.pump_outboxes();
        n += self.pump_messages();
        self.check_deadlines();
        self.msgs.retry_handshakes(self.timeout);
        if !self.graveyard.is_empty() {
            self.sweep_graveyard();
        }
        Ok(n)
    }

    /// Operations the provider holds for transfers that already ended.
    pub fn abandoned(&self) -> usize {
        self.transfers
            .values()
            .filter(|t| !matches!(t.status, Status::InProgress))
            .map(|t| t.outstanding)
            .sum()
    }
}

/// The reason a locally disconnected peer carries.
const DISCONNECTED: &str = "disconnected locally";

/// Registers the flush byte and the message buffers on `fabric`. On failure closes what
/// it registered, so that nothing is freed while registered.
pub fn open_buffers(
    fabric: &mut Fabric,
    agent: &str,
    secret: Option<ClusterSecret>,
    limits: InboxLimits,
) -> Result<(Slab, Messages)> {
    let mut flush = Slab::new(fabric, 1, MrUse::FlushTarget)?;
    match Messages::open(fabric, agent, secret, limits) {
        Ok(m) => Ok((flush, m)),
        Err(e) => {
            flush.close(fabric);
            Err(e)
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        let Some(address) = self.fabric.as_ref().map(|f| f.address.clone()) else {
            return;
        };
        endpoint::shm_died(&address);
        // Give the provider a moment to hand back what it holds.
        let end = Instant::now() + DROP_DRAIN;
        while (!self.ops.is_empty() || self.msgs.sends_outstanding() > 0)
            && Instant::now() < end
            && self.broken.is_none()
        {
            self.pump_messages();
            if self.poll_cq() == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let Some(mut fabric) = self.fabric.take() else {
            return;
        };
        if !self.ops.is_empty() || self.msgs.sends_outstanding() > 0 {
            // Closing an endpoint with operations outstanding crashed ofi_rxm (libfabric
            // 1.17), and would not stop a peer's provider from finishing them: leak the
            // endpoint, its buffers, regions and contexts instead.
            LEAKED_ENDPOINTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(
                "libfabric: dropped with {} operation(s) the provider still holds; leaking \
                 the endpoint and its buffers",
                self.ops.len() + self.msgs.sends_outstanding()
            );
            keep_forever(std::mem::take(&mut self.ops));
            keep_forever(std::mem::replace(&mut self.flush, Slab::empty()));
            let msgs = std::mem::replace(&mut self.msgs, Messages::empty());
            msgs.leak();
            self.regs.forget_mrs();
            fabric.leak();
            return;
        }
        // The endpoint first: afterwards the provider touches no posted buffer.
        fabric.close_ep();
        let mrs: Vec<_> = self.regs.take_mrs().collect();
        for mr in mrs {
            // A region the provider keeps open is leaked with its memory: the caller's
            // deregister never returned `Ok` for it.
            if let Err((mr, _)) = fabric.close_mr(mr) {
                keep_forever(mr);
            }
        }
        self.msgs.close(&mut fabric);
        self.flush.close(&mut fabric);
        drop(fabric);
    }
}
